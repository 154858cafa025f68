//! A small HTTPS server shared by the control-plane and webhook endpoints: TLS from a
//! hot-swappable rustls config (re-issued when the mesh CA changes), HTTP/1.1 and HTTP/2 on the
//! same port, and the peer's address and certificate chain handed to the handler.
//!
//! Both ports are reachable by anything in the cluster before it has authenticated, so the server
//! bounds what a client can hold without sending a request ([`Limits`]): connections, the TLS
//! handshake, the time to a request's headers, their size, HTTP/2 streams, and the time to read
//! a body. Malformed input ends the connection, never the process.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, warn};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Who is on the other end of a connection.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The client's address (for per-source rate limits).
    pub address: Option<SocketAddr>,
    /// Verified client chain (leaf first) when the client presented one.
    pub certificates: Vec<CertificateDer<'static>>,
}

/// A request body that has not arrived whole within this is refused (408), so a slow body
/// cannot hold a handler (and whatever permit it holds) open.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What one server lets a client hold before it has been answered.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// From accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// From the handshake to the first request's headers (both protocols), and for each later
    /// request's headers on HTTP/1.1.
    pub header_timeout: Duration,
    /// Request line and headers (HTTP/1.1 read buffer; HTTP/2 header list). At least 8 KiB.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Limits {
    /// 15012: every proxy of the mesh holds one long-lived config stream here, so connections
    /// are many; each of them carries at most a few requests.
    pub fn control_plane() -> Self {
        Self {
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 16,
        }
    }

    /// 15017: only the API server calls it, a request per pod creation.
    pub fn webhook() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 64,
        }
    }
}

/// hyper refuses a smaller HTTP/1.1 read buffer.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// Builds a server config for a certificate chain and key, optionally verifying client
/// certificates against `client_roots` (clients without a certificate are still accepted and
/// the handler decides).
pub fn server_config(
    chain_pem: &[String],
    key_pem: &str,
    client_roots: Option<&[String]>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_roots {
        Some(roots_pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for pem in roots_pem {
                roots.add(CertificateDer::from_pem_slice(pem.as_bytes())?)?;
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

pub fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(body.into())
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

/// A JSON error answer in the control plane's `ErrorResponse` shape.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    let body = serde_json::json!({ "error": message.to_string() }).to_string();
    full(status, body)
}

/// 405 for a known path asked with another method, naming the one it serves.
pub fn method_not_allowed(allowed: &http::Method) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this endpoint only serves {allowed}"),
    );
    response.headers_mut().insert(
        http::header::ALLOW,
        http::HeaderValue::from_str(allowed.as_str()).expect("a method is a valid header value"),
    );
    response
}

/// 429 with `Retry-After` in whole seconds (rounded up, at least 1).
pub fn too_many_requests(wait: Duration, message: impl std::fmt::Display) -> Response<Body> {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, message);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, seconds.max(1).into());
    response
}

/// Reads a whole request body of at most `limit` bytes within [`BODY_TIMEOUT`].
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Response<Body>> {
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {limit} bytes"),
        )),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, format!("reading body: {e}"))),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {BODY_TIMEOUT:?}"),
        )),
    }
}

/// Serves HTTPS on `listener` within `limits` until the process ends. Connections arriving
/// before a TLS config exists are closed.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
    limits: Limits,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let limits = Arc::new(limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%address, limit = limits.max_connections, "too many connections; closing");
            continue;
        };
        let Some(config) = tls.load_full() else {
            debug!(%address, "no serving certificate yet; closing connection");
            continue;
        };
        // Small request/response exchanges (a CSR answer, the TLS handshake's last flight) must
        // not wait for Nagle behind the peer's delayed ACK: ~40 ms per certificate otherwise.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%address, error = %e, "could not set TCP_NODELAY");
        }
        let handler = handler.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            serve_connection(stream, address, config, &limits, handler).await;
            drop(permit);
        });
    }
}

async fn serve_connection<H, F>(
    stream: tokio::net::TcpStream,
    address: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    limits: &Limits,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%address, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%address, "TLS handshake timed out");
            return;
        }
    };
    let peer = Arc::new(Peer {
        address: Some(address),
        certificates: stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
    });
    // hyper has no timer on the protocol detection of `auto` nor on an HTTP/2 connection that
    // never opens a stream: the first request must arrive within the header timeout.
    let first_request = Arc::new(Notify::new());
    let service = {
        let first_request = first_request.clone();
        hyper::service::service_fn(move |request| {
            first_request.notify_one();
            let handler = handler.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handler(request, peer).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Finds dead peers of long-lived config streams.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(%address, error = %e, "connection ended with error");
            }
            return;
        }
        () = first_request.notified() => {}
        () = tokio::time::sleep(limits.header_timeout) => {
            debug!(%address, "no request within the header timeout; closing");
            return;
        }
    }
    if let Err(e) = connection.await {
        debug!(%address, error = %e, "connection ended with error");
    }
}
