//! What one unit of `demo-client` work is in each protocol mode, and how it
//! is judged: an HTTP request, a gRPC unary or server-streaming call, a
//! WebSocket connection exchanging messages, or a streamed upload to `/echo`
//! verified against its echo. Each comes to one [`Outcome`]; the binary
//! paces them and tallies the outcomes into the summary.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::ProtocolError;

use crate::body::{BoxBody, full};
use crate::grpc::{GrpcDecoder, STREAM_MESSAGES_HEADER, call_status, encode_message};
use crate::upload::{PatternBody, Verifier};
use crate::ws;

/// The pooled HTTP client every HTTP-based mode uses.
pub type HttpClient = Client<HttpConnector, BoxBody>;

/// What the client does for each unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One HTTP request (`--method`, `--data`); ok when answered 2xx.
    Http,
    /// One gRPC unary call echoing `--data`; ok on `grpc-status: 0` with
    /// the message back.
    GrpcUnary,
    /// One gRPC server-streaming call; ok when all `--messages` arrive and
    /// the status is 0.
    GrpcStream,
    /// One WebSocket connection sending `--messages` text messages; ok
    /// when every echo matches and the close handshake completes.
    Websocket,
    /// One streamed upload of `--bytes` to `/echo`; ok when the echo has the
    /// same length and checksum.
    Upload,
}

impl Mode {
    /// The name used on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::GrpcUnary => "grpc-unary",
            Mode::GrpcStream => "grpc-stream",
            Mode::Websocket => "websocket",
            Mode::Upload => "upload",
        }
    }

    /// The request path used when the URL has none (`http://host:port`):
    /// the demo server's method or endpoint for this mode.
    pub fn default_path(self) -> &'static str {
        match self {
            Mode::Http => "/",
            Mode::GrpcUnary => "/trellis.demo.Echo/Echo",
            Mode::GrpcStream => "/trellis.demo.Echo/Stream",
            Mode::Websocket => "/ws",
            Mode::Upload => "/echo",
        }
    }

    /// gRPC runs over HTTP/2 whatever `--http2` says.
    pub fn forces_http2(self) -> bool {
        matches!(self, Mode::GrpcUnary | Mode::GrpcStream)
    }
}

/// Everything needed to do one unit of work.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The mode.
    pub mode: Mode,
    /// Target (http://), with the mode's default path filled in.
    pub uri: Uri,
    /// HTTP method (http mode).
    pub method: Method,
    /// Extra request headers (all modes; the WebSocket handshake too).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body (http), message payload (gRPC, WebSocket).
    pub body: Bytes,
    /// Limit on the whole unit (connect, exchange, body).
    pub timeout: Duration,
    /// Messages per gRPC stream or WebSocket connection.
    pub messages: u64,
    /// Upload size.
    pub upload_bytes: u64,
}

/// A unit of work that got an answer.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// HTTP status (101 for an upgraded WebSocket).
    pub status: u16,
    /// Succeeded by the mode's measure.
    pub ok: bool,
    /// The server's `version` (JSON answer or `x-demo-version`).
    pub version: Option<String>,
    /// The server's `name` (JSON answer or `x-demo-name`).
    pub name: Option<String>,
    /// Start to finish, milliseconds.
    pub latency_ms: f64,
    /// The answer body (http mode; at most [`MAX_KEPT_BODY`] bytes kept).
    pub body: Bytes,
    /// The `grpc-status` the call ended with (gRPC modes, when present).
    pub grpc_status: Option<u32>,
    /// Messages that came back intact.
    pub messages: u64,
    /// Upload bytes that came back intact.
    pub bytes: u64,
    /// Why an answer did not pass the mode's check, when that is not just
    /// its status.
    pub problem: Option<&'static str>,
}

/// What one unit of work came to.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The server answered (whatever the answer).
    Answered(Answer),
    /// No usable answer.
    Failed {
        /// Short kind for the summary's `errors`.
        kind: &'static str,
        /// Details for logs.
        message: String,
    },
}

/// Bodies above this are drained but not kept.
pub const MAX_KEPT_BODY: usize = 1 << 20;

/// A failure without an answer: `(kind, message)`.
type CallError = (&'static str, String);

/// Classifies an error by walking its source chain.
pub fn classify(err: &(dyn StdError + 'static)) -> &'static str {
    let mut text = String::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(legacy) = e.downcast_ref::<hyper_util::client::legacy::Error>()
            && legacy.is_connect()
        {
            return "connect";
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return "timeout";
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return "closed";
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connect",
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                    return "reset";
                }
                std::io::ErrorKind::UnexpectedEof => return "closed",
                _ => {}
            }
        }
        text.push_str(&e.to_string().to_ascii_lowercase());
        text.push(' ');
        cur = e.source();
    }
    if text.contains("reset") || text.contains("goaway") || text.contains("go_away") {
        "reset"
    } else if text.contains("connection closed") || text.contains("broken pipe") {
        "closed"
    } else {
        "other"
    }
}

/// The error and its sources, `: `-joined.
pub fn error_message(err: &(dyn StdError + 'static)) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        cur = e.source();
    }
    msg
}

fn call_error(err: &(dyn StdError + 'static)) -> CallError {
    (classify(err), error_message(err))
}

fn body_error(err: &(dyn StdError + 'static)) -> CallError {
    ("body", error_message(err))
}

/// The server identity from its `x-demo-version` / `x-demo-name` headers.
fn identity(headers: &HeaderMap) -> (Option<String>, Option<String>) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    (header("x-demo-version"), header("x-demo-name"))
}

/// Does one unit of work of `plan.mode`, bounded by `plan.timeout`.
pub async fn attempt(client: &HttpClient, plan: &Plan) -> Outcome {
    let start = Instant::now();
    let work = async {
        match plan.mode {
            Mode::Http => http_request(client, plan).await,
            Mode::GrpcUnary => grpc_call(client, plan, false).await,
            Mode::GrpcStream => grpc_call(client, plan, true).await,
            Mode::Websocket => websocket_session(plan).await,
            Mode::Upload => upload(client, plan).await,
        }
    };
    match tokio::time::timeout(plan.timeout, work).await {
        Err(_) => Outcome::Failed {
            kind: "timeout",
            message: format!("not finished within {:?}", plan.timeout),
        },
        Ok(Err((kind, message))) => Outcome::Failed { kind, message },
        Ok(Ok(mut answer)) => {
            answer.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            Outcome::Answered(answer)
        }
    }
}

fn request(plan: &Plan, method: Method, body: BoxBody) -> Request<BoxBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = plan.uri.clone();
    for (name, value) in &plan.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    req
}

async fn http_request(client: &HttpClient, plan: &Plan) -> Result<Answer, CallError> {
    let req = request(plan, plan.method.clone(), full(plan.body.clone()));
    let resp = client.request(req).await.map_err(|e| call_error(&e))?;
    let status = resp.status().as_u16();
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    // The server's identity: from its JSON answer, else from the x-demo-*
    // headers it puts on every answer (echo, size, gRPC).
    let (mut version, mut name) = identity(resp.headers());
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        if let Ok(data) = frame.into_data()
            && kept.len() + data.len() <= MAX_KEPT_BODY
        {
            kept.extend_from_slice(&data);
        }
    }
    if is_json && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&kept) {
        if let Some(s) = v.get("version").and_then(|s| s.as_str()) {
            version = Some(s.to_string());
        }
        if let Some(s) = v.get("name").and_then(|s| s.as_str()) {
            name = Some(s.to_string());
        }
    }
    Ok(Answer {
        status,
        ok: (200..300).contains(&status),
        version,
        name,
        body: Bytes::from(kept),
        ..Answer::default()
    })
}

/// What the messages of a gRPC answer came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MessageCheck {
    /// Messages equal to the one sent.
    pub intact: u64,
    /// Messages that differ.
    pub wrong: u64,
}

/// Judges a finished gRPC call: `problem` is set only for a call that
/// ended with status 0 but did not deliver exactly `expected` intact
/// messages (a non-zero status is its own explanation).
pub fn grpc_problem(
    status: Option<u32>,
    check: &MessageCheck,
    expected: u64,
    partial: bool,
) -> Option<&'static str> {
    match status {
        Some(0) if check.wrong > 0 => Some("mismatch"),
        Some(0) if check.intact != expected || partial => Some("incomplete"),
        Some(_) => None,
        None => Some("no-grpc-status"),
    }
}

async fn grpc_call(client: &HttpClient, plan: &Plan, streaming: bool) -> Result<Answer, CallError> {
    let mut req = request(plan, Method::POST, full(encode_message(false, &plan.body)));
    let headers = req.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    if streaming {
        headers.insert(STREAM_MESSAGES_HEADER, HeaderValue::from(plan.messages));
    }
    let resp = client.request(req).await.map_err(|e| call_error(&e))?;
    let status = resp.status().as_u16();
    let (version, name) = identity(resp.headers());
    let (parts, mut body) = resp.into_parts();
    let mut decoder = GrpcDecoder::default();
    let mut check = MessageCheck::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        match frame.into_data() {
            Ok(data) => {
                decoder.push(&data);
                while let Some(msg) = decoder
                    .next_message()
                    .map_err(|e| ("grpc-framing", e.to_string()))?
                {
                    if msg.data == plan.body {
                        check.intact += 1;
                    } else {
                        check.wrong += 1;
                    }
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let grpc_status = call_status(&parts.headers, trailers.as_ref());
    let expected = if streaming { plan.messages } else { 1 };
    let problem = if status == 200 {
        grpc_problem(grpc_status, &check, expected, decoder.has_partial())
    } else {
        None
    };
    Ok(Answer {
        status,
        ok: status == 200 && grpc_status == Some(0) && problem.is_none(),
        version,
        name,
        grpc_status,
        messages: check.intact,
        problem,
        ..Answer::default()
    })
}

async fn websocket_session(plan: &Plan) -> Result<Answer, CallError> {
    let host = plan.uri.host().unwrap_or_default();
    let port = plan.uri.port_u16().unwrap_or(80);
    let io = TcpStream::connect((host, port))
        .await
        .map_err(|e| call_error(&e))?;
    let _ = io.set_nodelay(true);
    // Over the plain connection above, whatever the URL's scheme: tungstenite wants `ws`.
    let mut uri = plan.uri.clone().into_parts();
    uri.scheme = Some("ws".parse().expect("a valid scheme"));
    let mut request = Uri::from_parts(uri)
        .map_err(|e| ("handshake", e.to_string()))?
        .into_client_request()
        .map_err(|e| ("handshake", e.to_string()))?;
    for (name, value) in &plan.headers {
        // An extra `host` replaces the default one; other extras add to it.
        if name == http::header::HOST {
            request.headers_mut().insert(name, value.clone());
        } else {
            request.headers_mut().append(name, value.clone());
        }
    }
    let (mut ws, response) =
        match tokio_tungstenite::client_async_with_config(request, io, Some(ws::config())).await {
            Ok(upgraded) => upgraded,
            // Any status but 101: an answered failure.
            Err(WsError::Http(response)) => {
                let (version, name) = identity(response.headers());
                return Ok(Answer {
                    status: response.status().as_u16(),
                    version,
                    name,
                    ..Answer::default()
                });
            }
            Err(WsError::Protocol(ProtocolError::HandshakeIncomplete)) => {
                return Err((
                    "closed",
                    "connection closed during the handshake".to_string(),
                ));
            }
            Err(WsError::Io(e)) => return Err(call_error(&e)),
            // A bad answer: no `upgrade`/`connection` token, a wrong accept key, a broken head.
            Err(e) => return Err(("handshake", e.to_string())),
        };
    let (version, name) = identity(response.headers());
    let mut answer = Answer {
        status: response.status().as_u16(),
        version,
        name,
        ..Answer::default()
    };
    let payload = String::from_utf8_lossy(&plan.body);
    for i in 0..plan.messages {
        let text = format!("{payload} {i}");
        ws.send(ws::Message::text(text.as_str()))
            .await
            .map_err(ws_error)?;
        let echo = loop {
            match ws.next().await.transpose().map_err(ws_error)? {
                Some(ws::Message::Ping(_) | ws::Message::Pong(_)) => continue,
                other => break other,
            }
        };
        match echo {
            Some(ws::Message::Text(echoed)) if echoed.as_str() == text => answer.messages += 1,
            Some(ws::Message::Close(_)) | None => {
                answer.problem = Some("closed-early");
                return Ok(answer);
            }
            Some(_) => {
                answer.problem = Some("mismatch");
                return Ok(answer);
            }
        }
    }
    ws.close(None).await.map_err(ws_error)?;
    // The close handshake: the server answers with its own close frame.
    let closed = loop {
        match ws.next().await.transpose().map_err(ws_error)? {
            Some(ws::Message::Close(_)) => break true,
            Some(_) => continue,
            None => break false,
        }
    };
    if closed {
        answer.ok = true;
    } else {
        answer.problem = Some("no-close");
    }
    Ok(answer)
}

/// A WebSocket failure: I/O errors classified as for the other modes.
fn ws_error(err: WsError) -> CallError {
    match err {
        WsError::Io(e) => call_error(&e),
        e => ("ws-protocol", e.to_string()),
    }
}

async fn upload(client: &HttpClient, plan: &Plan) -> Result<Answer, CallError> {
    let (body, sent) = PatternBody::new(plan.upload_bytes);
    let mut req = request(plan, Method::POST, body.boxed());
    req.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // The response head comes back as soon as the server starts echoing;
    // the client connection task keeps sending the request body while this
    // reads the echo, so neither side ever holds the whole stream.
    let resp = client.request(req).await.map_err(|e| call_error(&e))?;
    let status = resp.status().as_u16();
    let (version, name) = identity(resp.headers());
    let mut body = resp.into_body();
    let mut verifier = Verifier::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        if let Ok(data) = frame.into_data() {
            verifier.push(&data);
        }
    }
    let answered = (200..300).contains(&status);
    let problem = if !answered {
        None
    } else if sent.bytes() != plan.upload_bytes {
        // The server finished the echo before the upload was sent whole.
        Some("short")
    } else {
        verifier.check(&sent)
    };
    let ok = answered && problem.is_none();
    Ok(Answer {
        status,
        ok,
        version,
        name,
        bytes: if ok { verifier.bytes() } else { 0 },
        problem,
        ..Answer::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_match_the_command_line() {
        use clap::ValueEnum;
        for mode in Mode::value_variants() {
            let parsed = Mode::from_str(mode.name(), false).unwrap();
            assert_eq!(parsed, *mode);
            assert!(mode.default_path().starts_with('/'));
        }
        assert!(Mode::GrpcStream.forces_http2());
        assert!(!Mode::Upload.forces_http2());
    }

    #[test]
    fn grpc_problems() {
        let check = |intact, wrong| MessageCheck { intact, wrong };
        // (status, check, expected, partial, problem)
        let cases = [
            (Some(0), check(3, 0), 3, false, None),
            (Some(0), check(2, 0), 3, false, Some("incomplete")),
            (Some(0), check(4, 0), 3, false, Some("incomplete")),
            (Some(0), check(3, 0), 3, true, Some("incomplete")),
            (Some(0), check(2, 1), 3, false, Some("mismatch")),
            (Some(14), check(0, 0), 3, false, None),
            (None, check(3, 0), 3, false, Some("no-grpc-status")),
        ];
        for (status, check, expected, partial, want) in cases {
            assert_eq!(
                grpc_problem(status, &check, expected, partial),
                want,
                "{status:?} {check:?} {expected} {partial}"
            );
        }
    }

    #[test]
    fn classifies_io_errors() {
        use std::io::{Error, ErrorKind};
        for (kind, want) in [
            (ErrorKind::ConnectionRefused, "connect"),
            (ErrorKind::ConnectionReset, "reset"),
            (ErrorKind::BrokenPipe, "reset"),
            (ErrorKind::UnexpectedEof, "closed"),
            (ErrorKind::Other, "other"),
        ] {
            assert_eq!(classify(&Error::new(kind, "x")), want, "{kind:?}");
        }
        assert_eq!(classify(&Error::other("stream got GOAWAY")), "reset");
    }
}
