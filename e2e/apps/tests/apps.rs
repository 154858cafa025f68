//! End-to-end tests of the demo apps: start the real `demo-server` (and
//! `cluster-dns`) binaries on free loopback ports and drive them with the
//! real `demo-client` binary and with raw hyper / TCP / UDP clients.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_demo::grpc::{GrpcDecoder, encode_message};
use trellis_demo::ws;

/// A running binary, killed on drop.
struct Proc {
    child: Child,
    /// The first stdout line (the `listening` JSON).
    hello: Value,
}

impl Proc {
    fn start(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .env_remove("NAME")
            .env_remove("VERSION")
            .env_remove("PORT");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start binary");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read first line");
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{bin}: bad first line {line:?}: {e}"));
        // Keep draining stdout so request logs never block the process.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Proc { child, hello }
    }

    fn server(envs: &[(&str, &str)]) -> Proc {
        Proc::start(
            env!("CARGO_BIN_EXE_demo-server"),
            &[
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tcp-echo-port",
                "0",
                "--tcp-greeting",
            ],
            envs,
        )
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.hello[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}", self.hello))
            .parse()
            .expect("socket address")
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr("http"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs demo-client; returns its exit code and parsed stdout.
fn client(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_demo-client"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run demo-client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

fn summary(args: &[&str]) -> Value {
    let (code, v) = client(args);
    assert_eq!(code, 0, "demo-client {args:?} failed: {v}");
    assert!(v.is_object(), "no summary for {args:?}");
    v
}

#[test]
fn fixed_rate_counts_failures() {
    let server = Proc::server(&[]);
    let s = summary(&[
        "--url",
        &server.url("/?fail_percent=100"),
        "--rate",
        "100",
        "--count",
        "30",
    ]);
    assert_eq!(s["sent"], 30);
    assert_eq!(s["ok"], 0);
    assert_eq!(s["failed"], 30);
    assert_eq!(s["dropped"], 0);
    assert_eq!(s["byStatus"]["503"], 30);
    // The same control as a header.
    let s = summary(&[
        "--url",
        &server.url("/"),
        "--rate",
        "100",
        "--count",
        "10",
        "--header",
        "x-demo-status: 418",
    ]);
    assert_eq!(s["failed"], 10);
    assert_eq!(s["byStatus"]["418"], 10);
}

#[test]
fn fixed_rate_counts_ok_and_versions() {
    let server = Proc::server(&[("VERSION", "v2"), ("NAME", "alpha")]);
    let start = Instant::now();
    let s = summary(&[
        "--url",
        &server.url("/?status=200"),
        "--rate",
        "50",
        "--duration",
        "1s",
    ]);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "open loop paces requests"
    );
    assert_eq!(s["sent"], 50);
    assert_eq!(s["ok"], 50);
    assert_eq!(s["failed"], 0);
    assert_eq!(s["byStatus"]["200"], 50);
    assert_eq!(s["byVersion"]["v2"], 50);
    assert_eq!(s["byName"]["alpha"], 50);
    assert!(s["latencyMs"]["p50"].as_f64().unwrap() > 0.0);
    assert!(s["durationSecs"].as_f64().unwrap() >= 0.9);
    // Non-JSON answers are attributed through the x-demo-* headers.
    let s = summary(&[
        "--url",
        &server.url("/echo"),
        "--method",
        "POST",
        "--data",
        "hi",
        "--count",
        "5",
        "--rate",
        "100",
    ]);
    assert_eq!(s["ok"], 5);
    assert_eq!(s["byVersion"]["v2"], 5);
    assert_eq!(s["byName"]["alpha"], 5);
}

#[test]
fn http2_prior_knowledge() {
    let server = Proc::server(&[]);
    let s = summary(&[
        "--url",
        &server.url("/"),
        "--http2",
        "--rate",
        "200",
        "--count",
        "40",
    ]);
    assert_eq!(s["ok"], 40);
    let (code, v) = client(&[
        "--url",
        &server.url("/x?a=b"),
        "--http2",
        "--until-ok",
        "--header",
        "x-test: 1",
    ]);
    assert_eq!(code, 0);
    assert_eq!(v["body"]["protocol"], "HTTP/2");
    assert_eq!(v["body"]["path"], "/x");
    assert_eq!(v["body"]["query"], "a=b");
    assert_eq!(v["body"]["headers"]["x-test"][0], "1");
    let (code, v) = client(&["--url", &server.url("/"), "--until-ok"]);
    assert_eq!(code, 0);
    assert_eq!(v["body"]["protocol"], "HTTP/1.1");
}

#[test]
fn bounded_in_flight_drops() {
    let server = Proc::server(&[]);
    let s = summary(&[
        "--url",
        &server.url("/?delay=300ms"),
        "--rate",
        "100",
        "--count",
        "20",
        "--max-in-flight",
        "2",
    ]);
    let (sent, dropped) = (s["sent"].as_u64().unwrap(), s["dropped"].as_u64().unwrap());
    assert_eq!(sent + dropped, 20);
    assert!(dropped >= 10, "{s}");
    assert_eq!(s["ok"].as_u64().unwrap(), sent);
}

#[test]
fn delay_is_respected() {
    let server = Proc::server(&[]);
    let s = summary(&[
        "--url",
        &server.url("/?delay=300ms"),
        "--rate",
        "20",
        "--count",
        "3",
    ]);
    assert_eq!(s["ok"], 3);
    let p50 = s["latencyMs"]["p50"].as_f64().unwrap();
    assert!((300.0..2000.0).contains(&p50), "{s}");
}

#[test]
fn hang_triggers_client_timeout() {
    let server = Proc::server(&[]);
    let start = Instant::now();
    let s = summary(&[
        "--url",
        &server.url("/?hang=1"),
        "--rate",
        "20",
        "--count",
        "3",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(s["failed"], 3);
    assert_eq!(s["errors"]["timeout"], 3);
    assert!(start.elapsed() < Duration::from_secs(5));
    // The server keeps serving others.
    let s = summary(&["--url", &server.url("/"), "--count", "1"]);
    assert_eq!(s["ok"], 1);
}

#[test]
fn client_errors_and_usage() {
    // Nothing listens on port 1.
    let s = summary(&[
        "--url",
        "http://127.0.0.1:1/",
        "--rate",
        "100",
        "--count",
        "3",
    ]);
    assert_eq!(s["failed"], 3);
    assert_eq!(s["errors"]["connect"], 3);
    let (code, v) = client(&[
        "--url",
        "http://127.0.0.1:1/",
        "--until-ok",
        "--timeout-total",
        "700ms",
    ]);
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);
    assert!(v["attempts"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(client(&[]).0, 2);
    assert_eq!(client(&["--url", "https://example.invalid/"]).0, 2);
    assert_eq!(client(&["--url", "http://x/", "--rate", "0"]).0, 2);
    assert_eq!(client(&["--url", "http://x/", "--header", "nocolon"]).0, 2);
}

async fn h1(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn h2(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn chunked_body(
    data: &[u8],
) -> http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> {
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(futures::stream::iter(chunks)).boxed()
}

#[tokio::test]
async fn echo_round_trips_megabytes() {
    let server = Proc::server(&[]);
    let addr = server.addr("http");
    let data = payload(6 * 1024 * 1024 + 17);
    let mut c1 = h1(addr).await;
    let req = Request::post("/echo")
        .header("host", "demo")
        .body(chunked_body(&data))
        .unwrap();
    let resp = c1.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == data, "HTTP/1.1 echo differs ({} bytes)", got.len());

    let mut c2 = h2(addr).await;
    let req = Request::post(format!("http://{addr}/echo"))
        .body(chunked_body(&data))
        .unwrap();
    let resp = c2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == data, "HTTP/2 echo differs ({} bytes)", got.len());

    // size=N answers N filler bytes.
    let req = Request::get(format!("http://{addr}/?size=1000001"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let resp = c2.send_request(req).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        1_000_001
    );
}

#[tokio::test]
async fn grpc_echo_unary_and_streaming() {
    let server = Proc::server(&[]);
    let addr = server.addr("http");
    let mut client = h2(addr).await;

    // Unary: one message, echoed, then grpc-status 0.
    let req = Request::post(format!("http://{addr}/demo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(encode_message(false, b"hello grpc")).boxed())
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let mut dec = GrpcDecoder::default();
    dec.push(&collected.to_bytes());
    assert_eq!(
        dec.next_message().unwrap().unwrap().data.as_ref(),
        b"hello grpc"
    );
    assert_eq!(dec.next_message().unwrap(), None);

    // Requested status.
    let req = Request::post(format!("http://{addr}/demo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("x-demo-grpc-status", "7")
        .header("x-demo-grpc-message", "not allowed")
        .body(Full::new(encode_message(false, b"x")).boxed())
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "7");
    assert_eq!(trailers["grpc-message"], "not allowed");

    // Bidi streaming: each message comes back before the next is sent.
    let (mut tx, rx) =
        futures::channel::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let req = Request::post(format!("http://{addr}/demo.Echo/Chat"))
        .header("content-type", "application/grpc")
        .body(StreamBody::new(rx).boxed())
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut dec = GrpcDecoder::default();
    for i in 0..3 {
        let msg = format!("message {i}");
        // Split each message across two frames.
        let wire = encode_message(false, msg.as_bytes());
        use futures::SinkExt;
        tx.send(Ok(Frame::data(wire.slice(..3)))).await.unwrap();
        tx.send(Ok(Frame::data(wire.slice(3..)))).await.unwrap();
        let got = loop {
            if let Some(m) = dec.next_message().unwrap() {
                break m;
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("echo arrives while the stream is open")
                .unwrap()
                .unwrap();
            dec.push(&frame.into_data().unwrap());
        };
        assert_eq!(got.data.as_ref(), msg.as_bytes());
    }
    drop(tx);
    let rest = body.collect().await.unwrap();
    assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn websocket_echo() {
    let server = Proc::server(&[]);
    let mut stream = TcpStream::connect(server.addr("http")).await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: demo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = stream.read_u8().await.unwrap();
        head.push(b);
        assert!(head.len() < 4096);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    use futures::{SinkExt as _, StreamExt as _};
    // The client end rejects masked frames from a server, so the echo's are unmasked.
    let mut ws = ws::client(stream).await;
    let text = "hello websocket";
    ws.send(ws::Message::text(text)).await.unwrap();
    let big = payload(70_000);
    ws.send(ws::Message::binary(big.clone())).await.unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .expect("the server closed early")
            .unwrap()
    };
    assert_eq!(next().await, ws::Message::text(text));
    assert!(next().await == ws::Message::binary(big));
}

#[tokio::test]
async fn tcp_echo_with_greeting() {
    let server = Proc::server(&[("NAME", "tcpdemo")]);
    let mut stream = TcpStream::connect(server.addr("tcpEcho")).await.unwrap();
    let mut greeting = vec![0u8; "hello tcpdemo\n".len()];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello tcpdemo\n");
    stream.write_all(b"opaque bytes\x00\xff").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"opaque bytes\x00\xff");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight() {
    let mut server = Proc::server(&[]);
    let addr = server.addr("http");
    let mut c = h1(addr).await;
    let req = Request::get("/?delay=700ms")
        .header("host", "demo")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let pending = tokio::spawn(async move { c.send_request(req).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(pending.await.unwrap().unwrap(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn healthz_and_bad_controls() {
    let server = Proc::server(&[]);
    let mut c = h1(server.addr("http")).await;
    let req = Request::get("/healthz?status=500")
        .header("host", "demo")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    assert_eq!(c.send_request(req).await.unwrap().status(), StatusCode::OK);
    let req = Request::get("/?delay=soon")
        .header("host", "demo")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["x-demo-version"], "v1");
}

#[tokio::test]
async fn cluster_dns_answers_udp_and_tcp() {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::RecordType;
    use trellis_demo::dns::{a_records, build_query};
    let dns = Proc::start(
        env!("CARGO_BIN_EXE_cluster-dns"),
        &[
            "--no-kube",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--service",
            "demo/web=10.96.0.7",
        ],
        &[],
    );
    let addr = dns.addr("addr");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |name: &'static str, qtype: RecordType| {
        let sock = &sock;
        async move {
            sock.send_to(&build_query(42, name, qtype).unwrap(), addr)
                .await
                .unwrap();
            let mut buf = [0u8; 600];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    let r = ask("web.demo.svc.cluster.local", RecordType::A).await;
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (42, ResponseCode::NoError)
    );
    assert_eq!(
        a_records(&r),
        vec!["10.96.0.7".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    let r = ask("web.demo.svc.cluster.local", RecordType::AAAA).await;
    assert_eq!(
        (r.metadata.response_code, r.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(
        ask(
            "web.demo.svc.cluster.local.demo.svc.cluster.local",
            RecordType::A
        )
        .await
        .metadata
        .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        ask("example.com", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    // Garbage gets no answer but does not hurt the server.
    sock.send_to(&[1, 2, 3], addr).await.unwrap();
    assert_eq!(
        ask("web.demo.svc.cluster.local", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NoError
    );

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let q = build_query(7, "WEB.demo.svc.cluster.local", RecordType::A).unwrap();
    tcp.write_u16(q.len() as u16).await.unwrap();
    tcp.write_all(&q).await.unwrap();
    let len = tcp.read_u16().await.unwrap();
    let mut resp = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut resp).await.unwrap();
    let r = Message::from_vec(&resp).unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code, a_records(&r).len()),
        (7, ResponseCode::NoError, 1)
    );
}
