//! The client side of the control-plane protocol (`trellis_config::protocol`): HTTP/2 over TLS to
//! the operator, for the workload certificate and the config stream.

mod backoff;
pub mod certificate;
pub mod config_stream;
pub mod ndjson;
mod tls;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_config::protocol::ErrorResponse;
use trellis_config::wellknown::CONTROL_PLANE_PORT;

use crate::cli::SidecarArgs;
use crate::identity::{self, Identity};
use crate::state::ProxyState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest non-stream answer (certificate, error) we read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Where and how to reach the control plane.
pub struct ControlPlane {
    /// `host:port` of the control-plane URL, as dialled and sent as `:authority`.
    authority: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    root_cert: PathBuf,
    token: PathBuf,
    pod_name: String,
    proxy_version: String,
    /// Set by a `renew` control message; wakes the certificate task before its rotation point.
    renew: tokio::sync::Notify,
}

impl ControlPlane {
    pub fn from_args(url: &http::Uri, args: &SidecarArgs) -> anyhow::Result<Self> {
        if url.scheme_str() != Some("https") {
            anyhow::bail!("--control-plane {url}: the control plane is only reachable over https");
        }
        let host = url
            .host()
            .ok_or_else(|| anyhow!("--control-plane {url}: no host"))?;
        let port = url.port_u16().unwrap_or(CONTROL_PLANE_PORT);
        let server_name = ServerName::try_from(args.control_plane_name.clone())
            .with_context(|| format!("--control-plane-name {}", args.control_plane_name))?;
        Ok(Self {
            authority: format!("{host}:{port}"),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            server_name,
            root_cert: args.root_cert.clone(),
            token: args.token.clone(),
            pod_name: args.pod_name.clone(),
            proxy_version: trellis_config::version::current().to_owned(),
            renew: tokio::sync::Notify::new(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority)
    }

    /// Opens an HTTP/2 connection, presenting `client` as the client certificate if given. The
    /// server is verified against the mounted roots and the trust bundles `state` holds.
    async fn connect(
        &self,
        state: &ProxyState,
        client: Option<&Identity>,
    ) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let config = tls::client_config(&self.root_cert, delivered_roots(state), client)?;
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", self.authority))?
        .with_context(|| format!("connecting to {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TlsConnector::from(config).connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake with {} timed out", self.authority))?
        .with_context(|| format!("TLS handshake with {}", self.authority))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake with the control plane")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control-plane connection ended");
            }
        });
        Ok(sender)
    }
}

/// The roots the control plane has sent: with the current certificate and in the current config.
fn delivered_roots(state: &ProxyState) -> Vec<CertificateDer<'static>> {
    let mut roots = state
        .current_identity()
        .map(|identity| identity.trust_bundle.clone())
        .unwrap_or_default();
    if let Some(config) = state.config.load_full()
        && let Ok(bundle) = identity::parse_pems(&config.trust_bundle)
    {
        roots.extend(bundle);
    }
    roots
}

/// Turns a non-2xx answer into an error carrying the server's `ErrorResponse` message.
async fn error_from(status: http::StatusCode, body: Incoming) -> anyhow::Error {
    let bytes = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return anyhow!("control plane answered {status} (body unreadable: {e})"),
    };
    match serde_json::from_slice::<ErrorResponse>(&bytes) {
        Ok(error) => anyhow!("control plane answered {status}: {}", error.error),
        Err(_) => anyhow!(
            "control plane answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}
