//! Real-process tests of `demo-client`'s protocol modes and `demo-server`'s
//! default controls: start the `demo-server` binary on a free loopback port,
//! run the `demo-client` binary in each mode against it, and check the JSON
//! summary it prints (and, for the upload, that neither process held the
//! stream in memory).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running demo-server, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo-server"));
        cmd.args(["--port", "0", "--bind", "127.0.0.1", "--quiet"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .env_remove("PORT")
            .env_remove("DEMO_DEFAULTS")
            .env("VERSION", "v3")
            .env("NAME", "modes");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start demo-server");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("read the listening line");
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("demo-server: bad first line {line:?}: {e}"));
        let addr = hello["http"]
            .as_str()
            .expect("http address")
            .parse()
            .unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Server { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Peak resident memory of the server so far, in bytes.
    fn peak_rss(&self) -> u64 {
        peak_rss(self.child.id()).expect("server is running")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` (peak resident set) of a live process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs demo-client to completion; returns its exit code, its summary (or
/// `Null`) and the last peak RSS seen while it ran.
fn run_client(args: &[&str]) -> (i32, Value, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo-client"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run demo-client");
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for demo-client") {
            break status;
        }
        if let Some(rss) = peak_rss(child.id()) {
            peak = peak.max(rss);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    if value.is_null() {
        eprintln!("demo-client {args:?}: stdout {stdout:?} stderr {stderr:?}");
    }
    (status.code().unwrap_or(-1), value, peak)
}

fn summary(args: &[&str]) -> Value {
    let (code, v, _) = run_client(args);
    assert_eq!(code, 0, "demo-client {args:?} failed: {v}");
    assert!(v.is_object(), "no summary for {args:?}");
    v
}

#[test]
fn http_mode_keeps_its_summary_shape() {
    let server = Server::start(&[], &[]);
    let s = summary(&["--url", &server.url("/"), "--count", "5", "--rate", "100"]);
    assert_eq!(s["mode"], "http");
    assert_eq!((s["sent"].as_u64(), s["ok"].as_u64()), (Some(5), Some(5)));
    assert_eq!(s["byStatus"]["200"], 5);
    assert_eq!(s["byVersion"]["v3"], 5);
    for absent in ["byGrpcStatus", "messages", "bytes", "mbPerSec"] {
        assert!(s.get(absent).is_none(), "{absent} in {s}");
    }
}

#[test]
fn grpc_unary_mode() {
    let server = Server::start(&[], &[]);
    let base = server.url("");
    for http2 in [false, true] {
        // gRPC is HTTP/2 whether or not --http2 is given.
        let mut args = vec!["--url", &base, "--mode", "grpc-unary", "--count", "20"];
        args.extend(["--rate", "200", "--data", "ping"]);
        if http2 {
            args.push("--http2");
        }
        let s = summary(&args);
        assert_eq!(s["mode"], "grpc-unary");
        assert_eq!(s["sent"], 20, "{s}");
        assert_eq!(s["ok"], 20, "{s}");
        assert_eq!(s["byStatus"]["200"], 20);
        assert_eq!(s["byGrpcStatus"]["0"], 20);
        assert_eq!(s["messages"], 20);
        assert_eq!(s["byName"]["modes"], 20);
    }
    // A non-zero grpc-status is a failure, counted by status.
    let s = summary(&[
        "--url",
        &base,
        "--mode",
        "grpc-unary",
        "--count",
        "10",
        "--rate",
        "200",
        "-H",
        "x-demo-grpc-status: 14",
    ]);
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(10))
    );
    assert_eq!(s["byStatus"]["200"], 10);
    assert_eq!(s["byGrpcStatus"]["14"], 10);
    assert!(
        s.get("errors").unwrap().as_object().unwrap().is_empty(),
        "{s}"
    );
}

#[test]
fn grpc_stream_mode() {
    let server = Server::start(&[], &[]);
    let s = summary(&[
        "--url",
        &server.url(""),
        "--mode",
        "grpc-stream",
        "--messages",
        "250",
        "--count",
        "4",
        "--rate",
        "50",
        "--data",
        "tick",
    ]);
    assert_eq!(s["mode"], "grpc-stream");
    assert_eq!(s["ok"], 4, "{s}");
    assert_eq!(s["byGrpcStatus"]["0"], 4);
    assert_eq!(s["messages"], 1000);
    // The unary echo method answers once: status 0, but messages missing.
    let s = summary(&[
        "--url",
        &server.url("/trellis.demo.Echo/Echo"),
        "--mode",
        "grpc-stream",
        "--messages",
        "5",
        "--count",
        "2",
        "--rate",
        "50",
    ]);
    assert_eq!(s["failed"], 2, "{s}");
    assert_eq!(s["byGrpcStatus"]["0"], 2);
    assert_eq!(s["errors"]["incomplete"], 2, "{s}");
    assert_eq!(s["messages"], 2);
    // The status comes after the messages: all arrive, the call still fails.
    let bad = Server::start(&["--defaults", "grpc_status=14"], &[]);
    let s = summary(&[
        "--url",
        &bad.url(""),
        "--mode",
        "grpc-stream",
        "--messages",
        "3",
        "--count",
        "2",
        "--rate",
        "50",
    ]);
    assert_eq!(s["failed"], 2, "{s}");
    assert_eq!(s["byGrpcStatus"]["14"], 2);
    assert_eq!(s["messages"], 6);
}

#[test]
fn websocket_mode() {
    let server = Server::start(&[], &[]);
    let s = summary(&[
        "--url",
        &server.url("/chat?room=1"),
        "--mode",
        "websocket",
        "--messages",
        "25",
        "--count",
        "6",
        "--rate",
        "50",
        "--data",
        "héllo",
    ]);
    assert_eq!(s["mode"], "websocket");
    assert_eq!(s["ok"], 6, "{s}");
    assert_eq!(s["byStatus"]["101"], 6);
    assert_eq!(s["messages"], 150);
    assert_eq!(s["byVersion"]["v3"], 6);
    // A refused upgrade is an answered failure.
    let s = summary(&[
        "--url",
        &server.url("/?status=403"),
        "--mode",
        "websocket",
        "--count",
        "2",
        "--rate",
        "50",
    ]);
    assert_eq!(s["failed"], 2, "{s}");
    assert_eq!(s["byStatus"]["403"], 2);
    assert_eq!(s["messages"], 0);
    let (code, _, _) = run_client(&["--url", &server.url("/"), "--mode", "websocket", "--http2"]);
    assert_eq!(code, 2, "--http2 is refused for websocket");
}

#[test]
fn upload_mode_streams_100_mb() {
    let server = Server::start(&[], &[]);
    let start = Instant::now();
    let (code, s, client_peak) = run_client(&[
        "--url",
        &server.url(""),
        "--mode",
        "upload",
        "--bytes",
        "100MB",
        "--count",
        "1",
        "--timeout",
        "300s",
    ]);
    assert_eq!(code, 0, "{s}");
    eprintln!("100 MB upload: {s} in {:?}", start.elapsed());
    assert_eq!(s["mode"], "upload");
    assert_eq!(s["ok"], 1, "{s}");
    assert_eq!(s["byStatus"]["200"], 1);
    assert_eq!(s["bytes"], 100_000_000u64);
    assert!(s["mbPerSec"].as_f64().unwrap() > 0.0, "{s}");
    // Neither side held the 100 MB: generated, sent, echoed and checked as a
    // stream.
    let limit = 48 * 1024 * 1024;
    assert!(
        client_peak > 0 && client_peak < limit,
        "client peak RSS {client_peak}"
    );
    let server_peak = server.peak_rss();
    eprintln!("peak RSS: client {client_peak}, server {server_peak}");
    assert!(server_peak < limit, "server peak RSS {server_peak}");

    // Over h2c, several uploads at once.
    let s = summary(&[
        "--url",
        &server.url("/echo"),
        "--mode",
        "upload",
        "--bytes",
        "3MiB",
        "--http2",
        "--count",
        "4",
        "--rate",
        "100",
        "--timeout",
        "120s",
    ]);
    assert_eq!(s["ok"], 4, "{s}");
    assert_eq!(s["bytes"], 4 * 3 * 1024 * 1024u64);

    // A path that does not echo. Over HTTP/2 its short JSON answer arrives
    // and fails the length check; over HTTP/1.1 the server answers without
    // reading the upload and closes, so the send fails.
    let url = server.url("/not-echo");
    let args = [
        "--url", &url, "--mode", "upload", "--bytes", "1MB", "--count", "1",
    ];
    let mut h2 = args.to_vec();
    h2.push("--http2");
    let s = summary(&h2);
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
    assert_eq!(s["byStatus"]["200"], 1);
    assert_eq!(s["errors"]["short"], 1, "{s}");
    assert_eq!(s["bytes"], 0);
    let s = summary(&args);
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
    assert_eq!(s["bytes"], 0);
}

#[test]
fn server_default_controls() {
    // A "bad pod": every request 503 unless it asks otherwise; /healthz
    // stays up so the pod stays Ready.
    let bad = Server::start(&["--defaults", "status=503"], &[]);
    let s = summary(&["--url", &bad.url("/"), "--count", "5", "--rate", "100"]);
    assert_eq!(
        (s["ok"].as_u64(), s["byStatus"]["503"].as_u64()),
        (Some(0), Some(5))
    );
    let s = summary(&[
        "--url",
        &bad.url("/?status=200"),
        "--count",
        "3",
        "--rate",
        "100",
    ]);
    assert_eq!(s["ok"], 3, "the request's own control wins: {s}");
    let s = summary(&[
        "--url",
        &bad.url("/"),
        "--count",
        "3",
        "--rate",
        "100",
        "-H",
        "x-demo-status: 202",
    ]);
    assert_eq!(s["byStatus"]["202"], 3, "a header control wins: {s}");
    let s = summary(&[
        "--url",
        &bad.url("/healthz"),
        "--count",
        "2",
        "--rate",
        "100",
    ]);
    assert_eq!(s["ok"], 2);
    // Uploads see the default status too.
    let s = summary(&[
        "--url",
        &bad.url(""),
        "--mode",
        "upload",
        "--bytes",
        "1KB",
        "--count",
        "1",
    ]);
    assert_eq!(s["byStatus"]["503"], 1, "{s}");
    assert_eq!(s["bytes"], 0);

    // A slow pod, configured through the environment.
    let slow = Server::start(&[], &[("DEMO_DEFAULTS", "delay=300ms")]);
    let s = summary(&["--url", &slow.url("/"), "--count", "2", "--rate", "20"]);
    let p50 = s["latencyMs"]["p50"].as_f64().unwrap();
    assert!((300.0..3000.0).contains(&p50), "{s}");
    let s = summary(&[
        "--url",
        &slow.url("/?delay=0s"),
        "--count",
        "2",
        "--rate",
        "20",
    ]);
    assert!(s["latencyMs"]["max"].as_f64().unwrap() < 300.0, "{s}");

    // Unknown or bad defaults stop the server with a clear message.
    for (defaults, needle) in [
        ("stauts=503", "unknown control \"stauts\""),
        ("delay=soon", "default delay"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_demo-server"))
            .args(["--port", "0", "--bind", "127.0.0.1", "--defaults", defaults])
            .stdin(Stdio::null())
            .output()
            .expect("run demo-server");
        assert!(!out.status.success(), "{defaults} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{defaults}: {stderr}");
    }
}

#[test]
fn modes_report_unreachable_targets() {
    for mode in ["grpc-unary", "grpc-stream", "websocket", "upload"] {
        let s = summary(&[
            "--url",
            "http://127.0.0.1:1/",
            "--mode",
            mode,
            "--count",
            "2",
            "--rate",
            "100",
        ]);
        assert_eq!(s["mode"], mode);
        assert_eq!(s["failed"], 2, "{mode}: {s}");
        assert_eq!(s["errors"]["connect"], 2, "{mode}: {s}");
    }
}

#[test]
fn websocket_mode_reports_bad_handshakes() {
    use std::io::Write as _;
    // A 101 with a wrong accept key, then a server that hangs up before answering.
    let wrong_accept = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n";
    for (answer, kind) in [(&wrong_accept[..], "handshake"), (&b""[..], "closed")] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = stream.write_all(answer);
            }
        });
        let s = summary(&[
            "--url",
            &url,
            "--mode",
            "websocket",
            "--count",
            "2",
            "--rate",
            "100",
        ]);
        assert_eq!(s["failed"], 2, "{kind}: {s}");
        assert_eq!(s["errors"][kind], 2, "{kind}: {s}");
    }
}
