//! The control-plane protocol as a proxy speaks it (`trellis_config::protocol`), for simulated
//! proxies: like trellis-proxy's `control_plane` module, one HTTP/2-over-TLS connection per
//! certificate request and one per config stream (a proxy never shares a connection with
//! another), the operator verified against the mesh root, the workload certificate presented
//! on the stream. Keys, CSRs and the answer's checks are the proxy's own code
//! (`trellis_proxy::identity`). Each simulated proxy dials from its own loopback address
//! ([`source_address`]), as pods do from their own IPs: the operator limits certificate requests
//! per source address, and serves a config stream only to a proxy dialling from the IP of the
//! pod it names ([`pod_name`]; the benchmark creates those pods with those IPs).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use trellis_config::SpiffeId;
use trellis_config::protocol::{
    CertificateRequest, CertificateResponse, ErrorResponse, POD_NAME_HEADER, PROXY_VERSION_HEADER,
};
use trellis_config::wellknown::{CERTIFICATE_PATH, CONFIG_STREAM_PATH};
use trellis_proxy::identity::{self, Identity};

/// The name the operator's serving certificate carries (the proxy's default).
const SERVER_NAME: &str = "trellis-operator.trellis-system.svc";
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Where the control plane is and how to trust it.
#[derive(Clone)]
pub struct ControlPlane {
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
}

/// How a certificate request ended.
pub enum Signed {
    Issued(Box<Identity>),
    /// 429: the operator sheds load; the caller retries after the `Retry-After` it names.
    Throttled(Duration),
}

impl ControlPlane {
    pub fn new(addr: SocketAddr, root_pems: &[String]) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for pem in root_pems {
            use rustls_pki_types::pem::PemObject;
            roots.add(rustls_pki_types::CertificateDer::from_pem_slice(
                pem.as_bytes(),
            )?)?;
        }
        Ok(Self {
            addr,
            roots: Arc::new(roots),
        })
    }

    /// A TLS handshake only: `Ok` when the operator serves 15012 with a certificate from the
    /// mesh root, else the handshake's error.
    pub async fn handshake(&self) -> Result<()> {
        self.connect(None, source_address(0)).await.map(drop)
    }

    async fn connect(
        &self,
        client: Option<&Identity>,
        source: IpAddr,
    ) -> Result<http2::SendRequest<Full<Bytes>>> {
        let builder = ClientConfig::builder().with_root_certificates(self.roots.clone());
        let mut config = match client {
            Some(identity) => builder
                .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding to source address {source}"))?;
        let tcp = tokio::time::timeout(TIMEOUT, socket.connect(self.addr))
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", self.addr))??;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME)?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake with {} timed out", self.addr))?
        .with_context(|| format!("TLS handshake with {}", self.addr))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake with the control plane")?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// `POST /v1/certificate` with a fresh key for `id`, authenticated by `token`, from the
    /// address of simulated proxy `proxy`.
    pub async fn request_certificate(
        &self,
        token: &str,
        id: &SpiffeId,
        proxy: usize,
    ) -> Result<Signed> {
        let (key, csr) = identity::new_csr(id)?;
        let body = serde_json::to_vec(&CertificateRequest { csr })?;
        let request = http::Request::post(format!("https://{SERVER_NAME}{CERTIFICATE_PATH}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))?;
        let exchange = async {
            let mut sender = self.connect(None, source_address(proxy)).await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::from_secs(1), Duration::from_secs);
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the certificate answer: {e}"))?
                .to_bytes();
            anyhow::Ok((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("certificate request timed out"))??;
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            return Ok(Signed::Throttled(retry_after));
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("control plane answered {status}: {message}");
        }
        let response: CertificateResponse = serde_json::from_slice(&bytes)?;
        let identity = Identity::from_response(id.clone(), &key, &response)
            .context("certificate answer rejected")?;
        Ok(Signed::Issued(Box::new(identity)))
    }

    /// Opens `GET /v1/config` on its own connection with the workload certificate, as
    /// simulated proxy `proxy`.
    pub async fn open_stream(&self, identity: &Identity, proxy: usize) -> Result<ConfigStream> {
        let pod = pod_name(proxy);
        let mut sender = self.connect(Some(identity), source_address(proxy)).await?;
        let request = http::Request::get(format!("https://{SERVER_NAME}{CONFIG_STREAM_PATH}"))
            .header(POD_NAME_HEADER, pod.as_str())
            .header(PROXY_VERSION_HEADER, "bench")
            .body(Full::<Bytes>::default())?;
        let response = tokio::time::timeout(TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| anyhow!("config stream request timed out"))??;
        if !response.status().is_success() {
            bail!("config stream answered {}", response.status());
        }
        Ok(ConfigStream {
            _sender: sender,
            body: response.into_body(),
            pending: BytesMut::new(),
        })
    }
}

/// The pod simulated proxy `proxy` runs in.
pub fn pod_name(proxy: usize) -> String {
    format!("bench-proxy-{proxy}")
}

/// The loopback address simulated proxy `proxy` dials from (its pod's IP): 127.1.x.y, distinct
/// for the first 64,000 proxies.
pub fn source_address(proxy: usize) -> IpAddr {
    let (hi, lo) = (proxy / 250 % 256, proxy % 250 + 1);
    IpAddr::V4(Ipv4Addr::new(127, 1, hi as u8, lo as u8))
}

/// A config stream: newline-delimited JSON control messages.
pub struct ConfigStream {
    /// Keeps the connection's request side alive.
    _sender: http2::SendRequest<Full<Bytes>>,
    body: Incoming,
    pending: BytesMut,
}

impl ConfigStream {
    /// The next complete line and when its last byte arrived; `None` when the stream ends.
    pub async fn next_line(&mut self) -> Result<Option<(Bytes, Instant)>> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.pending) {
                let line = self.pending.split_to(end + 1).freeze();
                return Ok(Some((line.slice(..end), Instant::now())));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_proxies_dial_from_distinct_loopback_addresses() {
        let addresses: std::collections::BTreeSet<IpAddr> = (0..1000).map(source_address).collect();
        assert_eq!(addresses.len(), 1000);
        assert!(addresses.iter().all(|a| a.is_loopback()));
        assert_eq!(source_address(0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(source_address(251), IpAddr::V4(Ipv4Addr::new(127, 1, 1, 2)));
    }
}
