//! `demo-client`: an open-loop, fixed-rate HTTP load generator for Trellis
//! end-to-end tests. A request is started every `1/rate` seconds whatever
//! the completions, with at most `--max-in-flight` outstanding (requests
//! that cannot start are counted as `dropped`). At the end it prints one
//! JSON summary (see `trellis_demo::stats::Summary`) and exits 0, whatever
//! failed. `--until-ok` instead retries one request every 200 ms until it
//! is answered 2xx (exit 0) or `--timeout-total` elapses (exit 1).

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::Semaphore;
use trellis_demo::duration::parse_duration;
use trellis_demo::stats::{Latency, Summary};

#[derive(Debug, Parser)]
#[command(
    name = "demo-client",
    about = "Fixed-rate HTTP client printing a JSON summary"
)]
struct Args {
    /// Target URL (http:// only).
    #[arg(long)]
    url: String,
    /// Requests started per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// How long to send for (ignored with --count).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
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
    /// Request body.
    #[arg(long)]
    data: Option<String>,
    /// Use HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    http2: bool,
    /// Per-request timeout (connect, answer and body).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Retry one request every 200 ms until it is answered 2xx.
    #[arg(long)]
    until_ok: bool,
    /// Give up --until-ok after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout_total: Duration,
    /// Keep running this long after printing the summary (so a test can still read the
    /// sidecar beside this client before the pod finishes).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    linger: Duration,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Plan {
    uri: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    timeout: Duration,
}

/// What one request came to.
enum Outcome {
    Answered {
        status: u16,
        version: Option<String>,
        name: Option<String>,
        latency_ms: f64,
        body: Bytes,
    },
    Failed {
        kind: &'static str,
        message: String,
    },
}

/// Bodies above this are drained but not kept.
const MAX_KEPT_BODY: usize = 1 << 20;

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

/// Classifies an error by walking its source chain.
fn classify(err: &(dyn StdError + 'static)) -> &'static str {
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

fn error_message(err: &(dyn StdError + 'static)) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        cur = e.source();
    }
    msg
}

async fn one_request(client: &HttpClient, plan: &Plan) -> Outcome {
    let start = Instant::now();
    let mut req = Request::new(Full::new(plan.body.clone()));
    *req.method_mut() = plan.method.clone();
    *req.uri_mut() = plan.uri.clone();
    for (name, value) in &plan.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| (classify(&e), error_message(&e)))?;
        let status = resp.status().as_u16();
        let is_json = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (header_version, header_name) = (header("x-demo-version"), header("x-demo-name"));
        let mut body = resp.into_body();
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ("body", error_message(&e)))?;
            if let Ok(data) = frame.into_data()
                && kept.len() + data.len() <= MAX_KEPT_BODY
            {
                kept.extend_from_slice(&data);
            }
        }
        Ok::<_, (&'static str, String)>((
            status,
            is_json,
            Bytes::from(kept),
            header_version,
            header_name,
        ))
    };
    match tokio::time::timeout(plan.timeout, work).await {
        Err(_) => Outcome::Failed {
            kind: "timeout",
            message: format!("no complete answer within {:?}", plan.timeout),
        },
        Ok(Err((kind, message))) => Outcome::Failed { kind, message },
        Ok(Ok((status, is_json, body, header_version, header_name))) => {
            let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            // The server's identity: from its JSON answer, else from the
            // x-demo-* headers it puts on every answer (echo, size, gRPC).
            let (mut version, mut name) = (header_version, header_name);
            if is_json && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(s) = v.get("version").and_then(|s| s.as_str()) {
                    version = Some(s.to_string());
                }
                if let Some(s) = v.get("name").and_then(|s| s.as_str()) {
                    name = Some(s.to_string());
                }
            }
            Outcome::Answered {
                status,
                version,
                name,
                latency_ms,
                body,
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    summary: Summary,
    latencies: Vec<f64>,
}

impl Tally {
    fn record(&mut self, outcome: Outcome) {
        let s = &mut self.summary;
        match outcome {
            Outcome::Answered {
                status,
                version,
                name,
                latency_ms,
                ..
            } => {
                if (200..300).contains(&status) {
                    s.ok += 1;
                } else {
                    s.failed += 1;
                }
                *s.by_status.entry(status.to_string()).or_default() += 1;
                if let Some(v) = version {
                    *s.by_version.entry(v).or_default() += 1;
                }
                if let Some(n) = name {
                    *s.by_name.entry(n).or_default() += 1;
                }
                self.latencies.push(latency_ms);
            }
            Outcome::Failed { kind, .. } => {
                s.failed += 1;
                *s.errors.entry(kind.to_string()).or_default() += 1;
            }
        }
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
            let outcome = one_request(&client, &plan).await;
            drop(permit);
            if let Ok(mut t) = tally.lock() {
                t.record(outcome);
            }
        });
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let mut tally = match Arc::try_unwrap(tally) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(shared) => std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner())),
    };
    let mut summary = std::mem::take(&mut tally.summary);
    summary.sent = sent;
    summary.dropped = dropped;
    summary.latency_ms = Latency::from_samples(&mut tally.latencies);
    summary.duration_secs = (elapsed * 1000.0).round() / 1000.0;
    summary
}

async fn run_until_ok(client: HttpClient, plan: Plan, total: Duration) -> i32 {
    let deadline = Instant::now() + total;
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = Plan {
            timeout: plan.timeout.min(remaining.max(Duration::from_millis(1))),
            uri: plan.uri.clone(),
            method: plan.method.clone(),
            headers: plan.headers.clone(),
            body: plan.body.clone(),
        };
        let last = match one_request(&client, &attempt).await {
            Outcome::Answered { status, body, .. } if (200..300).contains(&status) => {
                let body_json = serde_json::from_slice::<serde_json::Value>(&body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
                println!(
                    "{}",
                    json!({"ok": true, "attempts": attempts, "status": status, "body": body_json})
                );
                return 0;
            }
            Outcome::Answered { status, .. } => format!("status {status}"),
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
    let method = Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .unwrap_or_else(|e| usage_error(format!("bad --method: {e}")));
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h).unwrap_or_else(|e| usage_error(e)))
        .collect();
    Plan {
        uri,
        method,
        headers,
        body: Bytes::from(args.data.clone().unwrap_or_default()),
        timeout: args.timeout,
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
        .http2_only(args.http2)
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
        assert!(Args::try_parse_from(["demo-client"]).is_err());
    }
}
