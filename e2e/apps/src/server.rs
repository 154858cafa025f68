//! The demo HTTP server: HTTP/1.1 and prior-knowledge HTTP/2 on one port,
//! JSON echo of the request, per-request behaviour controls, streaming
//! `/echo`, gRPC echo and server streaming, WebSocket echo, and an optional
//! opaque TCP echo. Server-wide default controls
//! ([`ServerState::with_default_controls`]) apply to every request that does
//! not set the same control itself. With documents enabled
//! ([`ServerState::with_documents`]) it also keeps small documents under
//! `/documents/<name>`: a `PUT` stores the body, a `GET` answers it (a JWKS
//! endpoint whose keys a test rotates, for instance).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::body::{BoxBody, FillerBody, empty, full};
use crate::control::Controls;
use crate::grpc::{
    GrpcEchoBody, GrpcStreamBody, STATUS_INVALID_ARGUMENT, STREAM_MESSAGES_HEADER,
    is_stream_method, parse_stream_messages,
};
use crate::ws;

/// Who this server is, reported in every answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `NAME`, default: the host name.
    pub name: String,
    /// `VERSION`, default `v1`.
    pub version: String,
    /// `NAMESPACE`, default empty.
    pub namespace: String,
    /// `POD_NAME`, default empty.
    pub pod: String,
}

impl Identity {
    /// Reads the identity from the environment.
    pub fn from_env() -> Identity {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Identity {
            name: var("NAME").unwrap_or_else(hostname),
            version: var("VERSION").unwrap_or_else(|| "v1".to_string()),
            namespace: var("NAMESPACE").unwrap_or_default(),
            pod: var("POD_NAME").unwrap_or_default(),
        }
    }
}

/// The host name, from `HOSTNAME` or the kernel; `demo` if neither is set.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "demo".to_string())
}

/// Shared state of the HTTP server.
#[derive(Debug)]
pub struct ServerState {
    /// Reported identity.
    pub identity: Identity,
    /// Suppress the per-request log line.
    pub quiet: bool,
    defaults: Controls,
    rng: AtomicU64,
    /// `Some` when `/documents/<name>` is served.
    documents: Option<parking_lot::Mutex<BTreeMap<String, bytes::Bytes>>>,
}

/// The largest document `PUT /documents/<name>` stores, and how many it keeps.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
pub const MAX_DOCUMENTS: usize = 16;
/// Where documents are served.
pub const DOCUMENTS_PATH: &str = "/documents/";

impl ServerState {
    /// New state for `identity`.
    pub fn new(identity: Identity, quiet: bool) -> ServerState {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32);
        ServerState {
            identity,
            quiet,
            defaults: Controls::default(),
            rng: AtomicU64::new(seed),
            documents: None,
        }
    }

    /// Serves `/documents/<name>` (`PUT` stores, `GET` answers).
    pub fn with_documents(mut self) -> ServerState {
        self.documents = Some(Default::default());
        self
    }

    /// Applies `defaults` to every request, under the request's own
    /// `x-demo-*` headers and query parameters.
    pub fn with_default_controls(mut self, defaults: Controls) -> ServerState {
        self.defaults = defaults;
        self
    }

    /// The server-wide default controls.
    pub fn default_controls(&self) -> &Controls {
        &self.defaults
    }

    /// A uniform random number in `[0, 100)` (splitmix64).
    pub fn roll(&self) -> f64 {
        let z = crate::splitmix64(
            self.rng
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                .wrapping_add(0x9E37_79B9_7F4A_7C15),
        );
        (z >> 11) as f64 / (1u64 << 53) as f64 * 100.0
    }
}

/// The protocol name reported in answers.
pub fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// Handles one request; never fails (errors become HTTP answers).
pub async fn handle(
    state: Arc<ServerState>,
    remote: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let proto = protocol_name(req.version());
    let mut resp = route(&state, remote, req).await;
    let id = &state.identity;
    let headers = resp.headers_mut();
    for (name, value) in [
        ("x-demo-name", &id.name),
        ("x-demo-version", &id.version),
        ("x-demo-pod", &id.pod),
    ] {
        if let Ok(value) = HeaderValue::from_str(value)
            && !value.is_empty()
        {
            headers.insert(name, value);
        }
    }
    if !state.quiet {
        let line = json!({
            "method": method.as_str(),
            "path": path,
            "status": resp.status().as_u16(),
            "proto": proto,
            "remote": remote.to_string(),
            "ms": start.elapsed().as_millis() as u64,
        });
        crate::print_json(&line);
    }
    Ok(resp)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<BoxBody> {
    let mut resp = Response::new(full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("websocket"))
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn route(
    state: &ServerState,
    remote: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<BoxBody> {
    if req.uri().path() == "/healthz" {
        return text(StatusCode::OK, "ok\n");
    }
    if let (Some(documents), Some(name)) = (
        &state.documents,
        req.uri().path().strip_prefix(DOCUMENTS_PATH),
    ) {
        return document(documents, name.to_owned(), req).await;
    }
    let controls = match Controls::layered(&state.defaults, req.uri().query(), req.headers()) {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if let Some(delay) = controls.delay {
        tokio::time::sleep(delay).await;
    }
    if controls.hang {
        // Held until the client goes away (hyper then drops this future) or
        // the server shuts down.
        std::future::pending::<()>().await;
    }
    let status = status_code(controls.pick_status(state.roll()));
    if is_websocket(&req) {
        // A failing status (say a "bad pod" default) refuses the upgrade.
        if !status.is_success() {
            return text(status, format!("websocket refused with {status}\n"));
        }
        return websocket(&mut req);
    }
    if is_grpc(&req) {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/grpc"));
        let body = if status != StatusCode::OK {
            empty()
        } else if is_stream_method(req.uri().path()) {
            grpc_stream(req, &controls).boxed()
        } else {
            let status = controls.grpc_status.unwrap_or(0);
            GrpcEchoBody::new(req.into_body(), status, controls.grpc_message).boxed()
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        resp.headers_mut().insert(CONTENT_TYPE, content_type);
        return resp;
    }
    if req.uri().path() == "/echo" {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let mut resp = Response::new(req.into_body().map_err(Into::into).boxed());
        *resp.status_mut() = status;
        resp.headers_mut().insert(CONTENT_TYPE, content_type);
        return resp;
    }
    if let Some(size) = controls.size {
        let mut resp = Response::new(FillerBody::new(size).boxed());
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str().to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    let id = &state.identity;
    let answer = json!({
        "name": id.name,
        "version": id.version,
        "namespace": id.namespace,
        "pod": id.pod,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query().unwrap_or(""),
        "authority": authority,
        "protocol": protocol_name(req.version()),
        "headers": headers,
        "remoteAddr": remote.to_string(),
        "status": status.as_u16(),
    });
    let mut body = answer.to_string();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if req.method() == Method::HEAD {
        *resp.body_mut() = empty();
    }
    resp
}

/// `GET` or `PUT` of one stored document.
async fn document(
    documents: &parking_lot::Mutex<BTreeMap<String, bytes::Bytes>>,
    name: String,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    match *req.method() {
        Method::GET => match documents.lock().get(&name) {
            Some(body) => {
                let mut resp = Response::new(full(body.clone()));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            None => text(StatusCode::NOT_FOUND, format!("no document {name:?}\n")),
        },
        Method::PUT => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
            };
            let mut documents = documents.lock();
            if documents.len() >= MAX_DOCUMENTS && !documents.contains_key(&name) {
                return text(StatusCode::INSUFFICIENT_STORAGE, "too many documents\n");
            }
            documents.insert(name, body);
            text(StatusCode::NO_CONTENT, "")
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or PUT\n"),
    }
}

/// The body of a server-streaming call, or its refusal when the requested
/// message count is unusable.
fn grpc_stream(req: Request<Incoming>, controls: &Controls) -> GrpcStreamBody<Incoming> {
    let count = req
        .headers()
        .get(STREAM_MESSAGES_HEADER)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    match parse_stream_messages(count) {
        Ok(count) => GrpcStreamBody::new(
            req.into_body(),
            count,
            controls.grpc_status.unwrap_or(0),
            controls.grpc_message.clone(),
        ),
        Err(e) => GrpcStreamBody::refused(req.into_body(), STATUS_INVALID_ARGUMENT, &e),
    }
}

fn websocket(req: &mut Request<Incoming>) -> Response<BoxBody> {
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
    else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let accept = ws::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = ws::echo(TokioIo::new(upgraded)).await {
                    eprintln!("websocket echo ended: {e}");
                }
            }
            Err(e) => eprintln!("websocket upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", v);
    }
    resp
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until
/// `shutdown` completes, then drains connections for at most `grace`.
pub async fn serve_http(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let svc = service_fn(move |req| handle(state.clone(), remote, req));
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => eprintln!("grace period over, closing remaining connections"),
    }
}

/// Serves an opaque TCP echo on `listener` until `shutdown`; when
/// `greeting` is set, each connection first gets `hello <greeting>\n`.
pub async fn serve_tcp_echo(
    listener: TcpListener,
    greeting: Option<String>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if let Some(name) = greeting
                        && stream.write_all(format!("hello {name}\n").as_bytes()).await.is_err()
                    {
                        return;
                    }
                    let (mut rd, mut wr) = stream.split();
                    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                        let _ = wr.shutdown().await;
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_is_in_range_and_spread() {
        let state = ServerState::new(
            Identity {
                name: "n".into(),
                version: "v1".into(),
                namespace: String::new(),
                pod: String::new(),
            },
            true,
        );
        let rolls: Vec<f64> = (0..10_000).map(|_| state.roll()).collect();
        assert!(rolls.iter().all(|r| (0.0..100.0).contains(r)));
        let below_half = rolls.iter().filter(|&&r| r < 50.0).count();
        assert!((4000..6000).contains(&below_half), "{below_half}");
    }

    #[test]
    fn default_controls_builder() {
        let identity = Identity {
            name: "n".into(),
            version: "v1".into(),
            namespace: String::new(),
            pod: String::new(),
        };
        let plain = ServerState::new(identity.clone(), true);
        assert_eq!(plain.default_controls(), &Controls::default());
        let bad = Controls::parse_defaults("status=503").unwrap();
        let state = ServerState::new(identity, true).with_default_controls(bad.clone());
        assert_eq!(state.default_controls(), &bad);
        assert!(state.quiet);
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(Version::HTTP_11), "HTTP/1.1");
        assert_eq!(protocol_name(Version::HTTP_2), "HTTP/2");
    }
}
