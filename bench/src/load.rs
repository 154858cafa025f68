//! The load generators, identical for every system: h2load for maximum throughput (HTTP/1.1 and
//! HTTP/2), oha at fixed rates (open loop, latency corrected for coordinated omission), and a
//! built-in bulk TCP client/server for opaque byte throughput.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::procs::output_within;
use crate::systems::{BULK_PORT, HTTP1_PORT, HTTP2_PORT};
use crate::tools::Tools;

/// Connections for HTTP/1.1 maximum throughput; HTTP/2 uses fewer, with concurrent streams.
pub const H1_CONNECTIONS: u32 = 32;
pub const H2_CONNECTIONS: u32 = 8;
pub const H2_STREAMS: u32 = 16;
/// Connections oha spreads a fixed rate over.
pub const RATE_CONNECTIONS: u32 = 16;
const SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Test {
    Http1Max,
    Http2Max,
    TcpBulk,
    Http1Rate(u32),
}

impl Test {
    pub fn name(&self) -> String {
        match self {
            Self::Http1Max => "http1-max".into(),
            Self::Http2Max => "http2-max".into(),
            Self::TcpBulk => "tcp-bulk".into(),
            Self::Http1Rate(rate) => format!("http1-{rate}rps"),
        }
    }
}

/// What one load run measured. For the bulk test `units` are bytes, otherwise requests.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub units: u64,
    pub per_sec: f64,
    /// p50, p90, p99, p99.9 in milliseconds (fixed-rate runs only).
    pub latency_ms: Option<[f64; 4]>,
}

pub fn run(test: Test, ip: &str, secs: u64, tools: &Tools, scratch: &Path) -> Result<Outcome> {
    let limit = Duration::from_secs(secs) + SLACK;
    let duration = secs.to_string();
    match test {
        Test::Http1Max => {
            let mut cmd = Command::new(&tools.h2load);
            cmd.args(["--h1", "-t", "1", "-D", &duration]);
            cmd.args(["-c", &H1_CONNECTIONS.to_string()]);
            cmd.arg(format!("http://{ip}:{HTTP1_PORT}/"));
            parse_h2load(&output_within(&mut cmd, limit, scratch)?)
        }
        Test::Http2Max => {
            let mut cmd = Command::new(&tools.h2load);
            cmd.args(["-t", "1", "-D", &duration]);
            cmd.args(["-c", &H2_CONNECTIONS.to_string()]);
            cmd.args(["-m", &H2_STREAMS.to_string()]);
            cmd.arg(format!("http://{ip}:{HTTP2_PORT}/"));
            parse_h2load(&output_within(&mut cmd, limit, scratch)?)
        }
        Test::TcpBulk => bulk(ip, Duration::from_secs(secs)),
        Test::Http1Rate(rate) => {
            let mut cmd = Command::new(&tools.oha);
            cmd.args([
                "--no-tui",
                "--output-format",
                "json",
                "--latency-correction",
                "--wait-ongoing-requests-after-deadline",
            ]);
            cmd.args(["-q", &rate.to_string(), "-z", &format!("{secs}s")]);
            cmd.args(["-c", &RATE_CONNECTIONS.to_string()]);
            // The JSON goes to its own file, away from anything oha says on stderr.
            let json = scratch.with_extension("json");
            cmd.arg("-o").arg(&json);
            cmd.arg(format!("http://{ip}:{HTTP1_PORT}/"));
            output_within(&mut cmd, limit, scratch)?;
            parse_oha(&std::fs::read_to_string(&json)?)
        }
    }
}

fn parse_h2load(out: &str) -> Result<Outcome> {
    let number_before = |line: &str, unit: &str| -> Option<f64> {
        let end = line.find(unit)?;
        line[..end].rsplit([' ', ',']).next()?.parse().ok()
    };
    let finished = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .context("no `finished in` line in h2load output")?;
    let per_sec = number_before(finished, " req/s").context("no req/s in h2load output")?;
    let requests = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| number_before(l, " succeeded"))
        .context("no succeeded count in h2load output")?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| number_before(l, " failed"))
        .unwrap_or(0.0);
    if requests == 0.0 || failed > 0.0 {
        bail!("h2load: {requests} succeeded, {failed} failed:\n{out}");
    }
    Ok(Outcome {
        units: requests as u64,
        per_sec,
        latency_ms: None,
    })
}

fn parse_oha(out: &str) -> Result<Outcome> {
    let json: Value = serde_json::from_str(out).with_context(|| format!("oha output: {out}"))?;
    let ok = json["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 = json["statusCodeDistribution"]
        .as_object()
        .map_or(0, |codes| codes.values().filter_map(Value::as_u64).sum());
    let errors = json["errorDistribution"].as_object().map_or(0, |e| e.len());
    if ok == 0 || ok != total || errors > 0 {
        bail!("oha: {ok} of {total} requests answered 200, errors {errors}: {out}");
    }
    let percentile = |p: &str| -> Result<f64> {
        json["latencyPercentiles"][p]
            .as_f64()
            .map(|s| s * 1000.0)
            .with_context(|| format!("no {p} in oha output"))
    };
    Ok(Outcome {
        units: ok,
        per_sec: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        latency_ms: Some([
            percentile("p50")?,
            percentile("p90")?,
            percentile("p99")?,
            percentile("p99.9")?,
        ]),
    })
}

/// Serves the bulk test: every connection receives an endless stream of bytes.
pub fn serve_bulk() -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", BULK_PORT))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let chunk = vec![0u8; 64 * 1024];
                let mut stream = stream;
                while stream.write_all(&chunk).is_ok() {}
            });
        }
    });
    Ok(())
}

/// Reads from the bulk server for `duration` on one connection; bytes per second.
fn bulk(ip: &str, duration: Duration) -> Result<Outcome> {
    let mut stream = TcpStream::connect((ip, BULK_PORT))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("bulk connection closed after {bytes} bytes");
        }
        bytes += n as u64;
    }
    Ok(Outcome {
        units: bytes,
        per_sec: bytes as f64 / start.elapsed().as_secs_f64(),
        latency_ms: None,
    })
}
