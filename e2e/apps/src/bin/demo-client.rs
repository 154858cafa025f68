//! `demo-client`: an open-loop, fixed-rate load generator for Trellis
//! end-to-end tests. A unit of work is started every `1/rate` seconds
//! whatever the completions, with at most `--max-in-flight` outstanding
//! (units that cannot start are counted as `dropped`). At the end it prints
//! one JSON summary (see `trellis_demo::stats::Summary`) and exits 0,
//! whatever failed. `--until-ok` instead retries one unit every 200 ms until
//! it succeeds (exit 0) or `--timeout-total` elapses (exit 1).
//!
//! `--mode` picks the unit of work (see `trellis_demo::client::Mode`):
//! - `http` (default): one request (`--method`, `--data`, `-H`); ok when 2xx.
//! - `grpc-unary`: one unary call to the demo gRPC echo (`--data` is the
//!   message); ok when the trailers say `grpc-status: 0` and the message
//!   came back. Adds `byGrpcStatus` and `messages`.
//! - `grpc-stream`: one server-streaming call asking for `--messages` M
//!   copies (`x-demo-stream-messages`); ok when all M arrive intact and the
//!   status is 0.
//! - `websocket`: one connection (HTTP/1.1 upgrade) sending M text messages,
//!   each checked against its echo, then the close handshake; `--count` and
//!   `--rate` count connections. Adds `messages`.
//! - `upload`: one POST to `/echo` of `--bytes` N (`100MB`, `1GiB`)
//!   generated on the fly, sent chunked while the echo is read back and
//!   checked for length and a running checksum. Adds `bytes` and `mbPerSec`.
//!
//! `--http2` uses prior-knowledge h2c for `http` and `upload`; gRPC always
//! uses HTTP/2 and WebSocket always HTTP/1.1 (`--http2` is refused there).
//! A URL without a path (`http://host:port`) gets the mode's demo-server
//! path: `/`, `/trellis.demo.Echo/Echo`, `/trellis.demo.Echo/Stream`, `/ws`,
//! `/echo`.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::Semaphore;
use trellis_api::istio::duration;
use trellis_demo::client::{Answer, HttpClient, Mode, Outcome, Plan, attempt};
use trellis_demo::size::parse_size;
use trellis_demo::stats::{Latency, Summary};

#[derive(Debug, Parser)]
#[command(
    name = "demo-client",
    about = "Fixed-rate HTTP/gRPC/WebSocket/upload client printing a JSON summary"
)]
struct Args {
    /// Target URL (http:// only).
    #[arg(long)]
    url: String,
    /// What each unit of work is.
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    mode: Mode,
    /// Messages per gRPC stream (grpc-stream) or per connection (websocket).
    #[arg(long, default_value_t = 10)]
    messages: u64,
    /// Upload size (upload): `100MB`, `1GiB`, `512KiB`, or plain bytes.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    bytes: u64,
    /// Requests started per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// How long to send for (ignored with --count).
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    duration: Duration,
    /// Send exactly this many requests (at --rate) instead of --duration.
    #[arg(long)]
    count: Option<u64>,
    /// Most requests outstanding at once; further ones are dropped.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Extra request header `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request body (http); message payload (gRPC, WebSocket; default
    /// `hello`).
    #[arg(long)]
    data: Option<String>,
    /// Use HTTP/2 with prior knowledge (h2c) for http and upload.
    #[arg(long)]
    http2: bool,
    /// Per-unit timeout (connect, answer and body; the whole stream,
    /// connection or upload).
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
    /// Retry one unit every 200 ms until it succeeds.
    #[arg(long)]
    until_ok: bool,
    /// Give up --until-ok after this long.
    #[arg(long, default_value = "60s", value_parser = duration::parse)]
    timeout_total: Duration,
    /// Keep running this long after printing the summary (so a test can still read the
    /// sidecar beside this client before the pod finishes).
    #[arg(long, default_value = "0s", value_parser = duration::parse)]
    linger: Duration,
}

fn usage_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("demo-client: {msg}");
    std::process::exit(2);
}

fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| format!("header {raw:?} is not `name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("header name {name:?}: {e}"))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|e| format!("header value {value:?}: {e}"))?;
    Ok((name, value))
}

#[derive(Default)]
struct Tally {
    summary: Summary,
    latencies: Vec<f64>,
    messages: u64,
    bytes: u64,
}

impl Tally {
    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Answered(a) => self.record_answer(a),
            Outcome::Failed { kind, .. } => {
                self.summary.failed += 1;
                *self.summary.errors.entry(kind.to_string()).or_default() += 1;
            }
        }
    }

    fn record_answer(&mut self, a: Answer) {
        let s = &mut self.summary;
        if a.ok {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
        *s.by_status.entry(a.status.to_string()).or_default() += 1;
        if let Some(code) = a.grpc_status {
            *s.by_grpc_status.entry(code.to_string()).or_default() += 1;
        }
        if let Some(problem) = a.problem {
            *s.errors.entry(problem.to_string()).or_default() += 1;
        }
        if let Some(v) = a.version {
            *s.by_version.entry(v).or_default() += 1;
        }
        if let Some(n) = a.name {
            *s.by_name.entry(n).or_default() += 1;
        }
        self.messages += a.messages;
        self.bytes += a.bytes;
        self.latencies.push(a.latency_ms);
    }

    /// The summary, with the fields that apply to `mode`.
    fn finish(mut self, mode: Mode, elapsed_secs: f64) -> Summary {
        let mut summary = std::mem::take(&mut self.summary);
        summary.mode = mode.name().to_string();
        summary.latency_ms = Latency::from_samples(&mut self.latencies);
        summary.duration_secs = (elapsed_secs * 1000.0).round() / 1000.0;
        match mode {
            Mode::Http => {}
            Mode::GrpcUnary | Mode::GrpcStream | Mode::Websocket => {
                summary.messages = Some(self.messages);
            }
            Mode::Upload => {
                summary.bytes = Some(self.bytes);
                let rate = if elapsed_secs > 0.0 {
                    self.bytes as f64 / elapsed_secs / 1e6
                } else {
                    0.0
                };
                summary.mb_per_sec = Some((rate * 1000.0).round() / 1000.0);
            }
        }
        summary
    }
}

async fn run_load(client: HttpClient, plan: Arc<Plan>, args: &Args) -> Summary {
    let total = match args.count {
        Some(n) => n,
        None => (args.rate * args.duration.as_secs_f64()).round() as u64,
    };
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let limit = Arc::new(Semaphore::new(args.max_in_flight));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut dropped = 0u64;
    let mut sent = 0u64;
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        sent += 1;
        let (client, plan, tally) = (client.clone(), plan.clone(), tally.clone());
        tasks.spawn(async move {
            let outcome = attempt(&client, &plan).await;
            drop(permit);
            tally.lock().record(outcome);
        });
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let tally = match Arc::try_unwrap(tally) {
        Ok(m) => m.into_inner(),
        Err(shared) => std::mem::take(&mut *shared.lock()),
    };
    let mut summary = tally.finish(plan.mode, elapsed);
    summary.sent = sent;
    summary.dropped = dropped;
    summary
}

async fn run_until_ok(client: HttpClient, plan: Plan, total: Duration) -> i32 {
    let deadline = Instant::now() + total;
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let one = Plan {
            timeout: plan.timeout.min(remaining.max(Duration::from_millis(1))),
            ..plan.clone()
        };
        let last = match attempt(&client, &one).await {
            Outcome::Answered(Answer {
                ok: true,
                status,
                body,
                ..
            }) => {
                let body_json = serde_json::from_slice::<serde_json::Value>(&body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
                println!(
                    "{}",
                    json!({"ok": true, "attempts": attempts, "status": status, "body": body_json})
                );
                return 0;
            }
            Outcome::Answered(answer) => failure_text(&answer),
            Outcome::Failed { kind, message } => format!("{kind}: {message}"),
        };
        if Instant::now() + Duration::from_millis(200) >= deadline {
            println!(
                "{}",
                json!({"ok": false, "attempts": attempts, "lastError": last})
            );
            eprintln!("demo-client: gave up after {attempts} attempts: {last}");
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why an answered unit failed, for `--until-ok`'s `lastError`.
fn failure_text(answer: &Answer) -> String {
    let mut text = format!("status {}", answer.status);
    if let Some(code) = answer.grpc_status {
        text.push_str(&format!(", grpc-status {code}"));
    }
    if let Some(problem) = answer.problem {
        text.push_str(&format!(", {problem}"));
    }
    text
}

/// `uri` with `path` when it has none of its own (only `/`, no query).
fn with_default_path(uri: Uri, path: &'static str) -> Uri {
    let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/");
    if !bare {
        return uri;
    }
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(PathAndQuery::from_static(path));
    Uri::from_parts(parts).expect("an absolute URI with a new path stays valid")
}

fn build_plan(args: &Args) -> Plan {
    let uri: Uri = args
        .url
        .parse()
        .unwrap_or_else(|e| usage_error(format!("bad --url {:?}: {e}", args.url)));
    match uri.scheme_str() {
        Some("http") => {}
        _ => usage_error(format!("--url {:?} must be an http:// URL", args.url)),
    }
    if uri.host().is_none() {
        usage_error(format!("--url {:?} has no host", args.url));
    }
    if args.http2 && args.mode == Mode::Websocket {
        usage_error(
            "--http2 does not apply to --mode websocket (the demo WebSocket is HTTP/1.1 Upgrade)",
        );
    }
    let method = Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .unwrap_or_else(|e| usage_error(format!("bad --method: {e}")));
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h).unwrap_or_else(|e| usage_error(e)))
        .collect();
    let body = match (&args.data, args.mode) {
        (Some(data), _) => Bytes::from(data.clone()),
        (None, Mode::Http | Mode::Upload) => Bytes::new(),
        (None, _) => Bytes::from_static(b"hello"),
    };
    Plan {
        mode: args.mode,
        uri: with_default_path(uri, args.mode.default_path()),
        method,
        headers,
        body,
        timeout: args.timeout,
        messages: args.messages,
        upload_bytes: args.bytes,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !(args.rate.is_finite() && args.rate > 0.0) {
        usage_error("--rate must be positive");
    }
    if args.max_in_flight == 0 {
        usage_error("--max-in-flight must be at least 1");
    }
    if args.timeout.is_zero() {
        usage_error("--timeout must be positive");
    }
    let plan = build_plan(&args);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(args.http2 || args.mode.forces_http2())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    if args.until_ok {
        let code = run_until_ok(client, plan, args.timeout_total).await;
        std::process::exit(code);
    }
    let summary = run_load(client, Arc::new(plan), &args).await;
    match serde_json::to_string(&summary) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("demo-client: cannot encode summary: {e}");
            std::process::exit(3);
        }
    }
    tokio::time::sleep(args.linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        let (n, v) = parse_header("X-Demo-Status: 503").unwrap();
        assert_eq!(n.as_str(), "x-demo-status");
        assert_eq!(v, "503");
        let (n, v) = parse_header("host:web.demo:8080").unwrap();
        assert_eq!(n.as_str(), "host");
        assert_eq!(v, "web.demo:8080");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "demo-client",
            "--url",
            "http://x/",
            "--rate",
            "50",
            "--duration",
            "2s",
            "-H",
            "a: b",
            "--header",
            "c: d",
            "--http2",
        ])
        .unwrap();
        assert_eq!(a.rate, 50.0);
        assert_eq!(a.duration, Duration::from_secs(2));
        assert_eq!(a.headers.len(), 2);
        assert!(a.http2);
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert_eq!(a.mode, Mode::Http);
        assert!(Args::try_parse_from(["demo-client"]).is_err());
    }

    #[test]
    fn mode_args_parse() {
        let a = Args::try_parse_from([
            "demo-client",
            "--url",
            "http://x/",
            "--mode",
            "upload",
            "--bytes",
            "100MB",
        ])
        .unwrap();
        assert_eq!((a.mode, a.bytes), (Mode::Upload, 100_000_000));
        let a = Args::try_parse_from([
            "demo-client",
            "--url",
            "http://x",
            "--mode",
            "grpc-stream",
            "--messages",
            "7",
        ])
        .unwrap();
        assert_eq!((a.mode, a.messages), (Mode::GrpcStream, 7));
        let plan = build_plan(&a);
        assert_eq!(plan.uri, "http://x/trellis.demo.Echo/Stream");
        assert_eq!(plan.body, "hello");
        for bad in [["--mode", "ftp"], ["--bytes", "lots"]] {
            let mut argv = vec!["demo-client", "--url", "http://x/"];
            argv.extend(bad);
            assert!(Args::try_parse_from(&argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failure_texts() {
        for (answer, want) in [
            (
                Answer {
                    status: 503,
                    ..Answer::default()
                },
                "status 503",
            ),
            (
                Answer {
                    status: 200,
                    grpc_status: Some(5),
                    ..Answer::default()
                },
                "status 200, grpc-status 5",
            ),
            (
                Answer {
                    status: 200,
                    grpc_status: Some(0),
                    problem: Some("incomplete"),
                    ..Answer::default()
                },
                "status 200, grpc-status 0, incomplete",
            ),
        ] {
            assert_eq!(failure_text(&answer), want);
        }
    }

    #[test]
    fn default_paths() {
        for (url, path, want) in [
            ("http://x", "/echo", "http://x/echo"),
            ("http://x/", "/ws", "http://x/ws"),
            ("http://x:81/", "/echo", "http://x:81/echo"),
            ("http://x/?a=1", "/echo", "http://x/?a=1"),
            ("http://x/other", "/echo", "http://x/other"),
        ] {
            let uri: Uri = url.parse().unwrap();
            assert_eq!(with_default_path(uri, path), want, "{url}");
        }
    }
}
