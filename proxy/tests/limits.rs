//! Listener limits against abusive clients, through the real `trellis-proxy` binary (static
//! mode, the limits set in its config file) over real sockets: a slowloris, a header flood, a
//! connection flood, HTTP/2 stream floods, an idle HTTP/2 connection and a peer that stops
//! answering pings. Each test sets small limits and asserts on what a client sees (a `431`, a
//! closed connection), on what the application sees (nothing, for a refused request), and on the
//! proxy's own counts (`trellis_listener_connections`, `trellis_listener_overflow_total`, the
//! process's peak RSS).
//!
//! Each test runs in its own network namespace:
//!
//! ```text
//! client (127.0.0.7) ─(dst 127.0.0.20)─REDIRECT→ B:15006 (inbound)
//! application (127.0.0.5) ─(dst VIP 127.0.0.100:80)─REDIRECT→ B:15001 (outbound)
//!     B ─(from 127.0.0.6)→ application on *:7300 (declared `http`)
//! ```
//!
//! Timeouts in assertions are generous multiples of the configured limits; nothing asserts how
//! fast anything is. Needs root, iproute2 and iptables.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::{APP, Ports, Proxy, connect_from, raw_request, runtime, sample};
use trellis_demo::body::{BoxBody, empty};

const INSIDE: &str = "TRELLIS_PROXY_LIMITS_TEST_IN_NETNS";
/// The client: any source works, B's pod address is what is redirected.
const PEER: &str = "127.0.0.7";
/// B's pod address.
const POD_B: &str = "127.0.0.20";
/// The application's port, declared `http`.
const APP_PORT: u16 = 7300;
/// How long a test waits for something the limits make happen.
const GENEROUS: Duration = Duration::from_secs(20);

fn in_netns() -> bool {
    support::in_netns(
        INSIDE,
        &[
            // B's forwards to its application return, as the real capture rules do.
            &["-s", "127.0.0.6", "-j", "RETURN"],
            &["-s", APP, "-j", "REDIRECT", "--to-ports", "15001"],
            &["-d", POD_B, "-j", "REDIRECT", "--to-ports", "15006"],
        ],
    )
}

fn pod_b() -> SocketAddr {
    SocketAddr::new(POD_B.parse().unwrap(), APP_PORT)
}

/// The service's VIP, as the client application dials it (through A's outbound listener).
fn vip() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 100], 80))
}

/// B, the server's sidecar on the inbound port the capture rule targets, with `limits` as its
/// config's `limits` section.
fn server(limits: Value) -> Proxy {
    let config = json!({
        "version": "limits-1",
        "services": [{
            "hostnames": ["web.shop.svc.cluster.local"], "namespace": "shop",
            "vips": ["127.0.0.100"],
            "ports": [{"name": "http", "port": 80, "targetPort": APP_PORT, "protocol": "http"}],
            "endpoints": [{"address": POD_B, "ready": true, "meshed": false}]
        }],
        "limits": limits,
    });
    let mut ports = Ports::free();
    ports.inbound = 15006;
    ports.outbound = 15001;
    let mut b = Proxy::with_config(ports, &config.to_string(), &[]);
    b.wait_ready();
    b
}

/// What the application saw: requests in total, in flight now, and the most in flight at once.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// The application on every address, port [`APP_PORT`]: `200 ok` to every request, after
/// `release` is notified for `/hold`.
fn application(runtime: &tokio::runtime::Runtime, release: Arc<tokio::sync::Notify>) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(("0.0.0.0", APP_PORT)))
        .unwrap();
    let app_seen = seen.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = app_seen.clone();
            let release = release.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let release = release.clone();
                    async move {
                        seen.requests.fetch_add(1, Ordering::SeqCst);
                        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
                        if req.uri().path() == "/hold" {
                            release.notified().await;
                        }
                        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok\n"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    seen
}

/// The proxy's open connections on `listener` (`trellis_listener_connections`).
fn open_connections(proxy: &Proxy, listener: &str) -> u64 {
    let label = format!("listener=\"{listener}\"");
    sample(&proxy.scrape(), "trellis_listener_connections", &[&label]).unwrap_or(0)
}

fn overflows(proxy: &Proxy, listener: &str) -> u64 {
    let label = format!("listener=\"{listener}\"");
    sample(
        &proxy.scrape(),
        "trellis_listener_overflow_total",
        &[&label],
    )
    .unwrap_or(0)
}

/// Waits until `check` holds, at most [`GENEROUS`]; false if it never did.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + GENEROUS;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether the peer closes `stream` (EOF or reset) within [`GENEROUS`], reading and discarding
/// anything it sends first.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: web.shop\r\nConnection: close\r\n\r\n")
}

/// An HTTP/2 (prior knowledge) connection to B's pod.
async fn h2() -> (
    http2::SendRequest<BoxBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = connect_from(PEER, pod_b());
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_get(path: &str) -> http::request::Builder {
    Request::get(format!("http://web.shop{path}"))
}

#[test]
fn slowloris_is_closed_on_time() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let seen = application(&runtime, Arc::default());
    let b = server(json!({"headerReadTimeoutMs": 1000}));
    // A client that sends its request at once is served.
    assert_eq!(raw_request(PEER, pod_b(), &get("/")).status, 200);
    let served = seen.requests.load(Ordering::SeqCst);

    // Twenty clients trickle one header line every 100 ms and never end the head: ten to the
    // inbound listener, five from the application to the outbound listener, five to the
    // readiness endpoint.
    let readiness = SocketAddr::from(([127, 0, 0, 1], b.ports.readiness));
    let targets = std::iter::repeat_n((PEER, pod_b()), 10)
        .chain(std::iter::repeat_n((APP, vip()), 5))
        .chain(std::iter::repeat_n(("127.0.0.1", readiness), 5));
    let started = Instant::now();
    let slow: Vec<_> = targets
        .enumerate()
        .map(|(i, (source, dst))| {
            std::thread::spawn(move || {
                let mut stream = connect_from(source, dst);
                let mut writer = stream.try_clone().unwrap();
                let trickle = std::thread::spawn(move || {
                    let _ = writer.write_all(b"GET / HTTP/1.1\r\nHost: web.shop\r\n");
                    let until = Instant::now() + GENEROUS;
                    while Instant::now() < until
                        && writer
                            .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                            .is_ok()
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
                let closed = closed_by_peer(&mut stream);
                drop(stream);
                trickle.join().unwrap();
                closed
            })
        })
        .collect();
    for client in slow {
        assert!(
            client.join().unwrap(),
            "a slowloris connection was still open after {GENEROUS:?}:\n{}",
            b.logs()
        );
    }
    println!(
        "20 slowloris connections closed after {:?}",
        started.elapsed()
    );
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        served,
        "no trickled request reached the application"
    );
    for listener in ["inbound", "outbound", "readiness"] {
        assert!(
            eventually(|| open_connections(&b, listener) == 0),
            "the {listener} listener still counts open connections"
        );
    }
}

#[test]
fn header_flood_is_bounded() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let seen = application(&runtime, Arc::default());
    let b = server(json!({"maxRequestHeadersKb": 8, "maxRequestHeaders": 20}));
    assert_eq!(raw_request(PEER, pod_b(), &get("/")).status, 200);
    let served = seen.requests.load(Ordering::SeqCst);

    // A flood: 200 connections each send 256 KiB of header lines and keep their socket open.
    // The proxy holds at most 8 KiB of each head and closes the connection; without a bound it
    // would buffer every head.
    let before = b.peak_rss_kib();
    let line = format!("X-Flood: {}\r\n", "f".repeat(1_000));
    let head: String = std::iter::once("GET / HTTP/1.1\r\nHost: web.shop\r\n".to_owned())
        .chain(std::iter::repeat_n(line, 256))
        .collect();
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut stream = connect_from(PEER, pod_b());
            stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // Fails once the proxy has closed the connection.
            let _ = stream.write_all(head.as_bytes());
            stream
        })
        .collect();
    let released = eventually(|| open_connections(&b, "inbound") == 0);
    let grown_kib = b.peak_rss_kib().saturating_sub(before);
    println!("peak RSS grew by {grown_kib} KiB during the flood");
    assert!(
        grown_kib < 32 * 1024,
        "peak RSS grew by {grown_kib} KiB for 200 heads bounded at 8 KiB each"
    );
    assert!(
        released,
        "the proxy still holds flooding connections ({} open) though every head is over the \
         limit",
        open_connections(&b, "inbound")
    );
    drop(flood);

    // HTTP/1.1: 30 headers is more than 20.
    let many: String = (0..30).map(|i| format!("X-Many-{i}: v\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: web.shop\r\n{many}Connection: close\r\n\r\n");
    assert_eq!(raw_request(PEER, pod_b(), &request).status, 431);
    // HTTP/1.1: a 12 KiB head is larger than 8 KiB: 431, or a reset when the proxy closes with
    // the rest of the head unread.
    let big = "b".repeat(12 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: web.shop\r\nX-Big: {big}\r\n\r\n");
    let reply = raw_request(PEER, pod_b(), &request);
    assert!(matches!(reply.status, 0 | 431), "{reply:?}");

    // HTTP/2: the same two, on one connection.
    runtime.block_on(async {
        let (mut sender, _connection) = h2().await;
        let mut request = h2_get("/");
        for i in 0..30 {
            request = request.header(format!("x-many-{i}"), "v");
        }
        let response = sender.send_request(request.body(empty()).unwrap()).await;
        assert_eq!(
            response.unwrap().status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let request = h2_get("/")
            .header("x-big", big.as_str())
            .body(empty())
            .unwrap();
        match sender.send_request(request).await {
            Ok(response) => assert_eq!(
                response.status(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            ),
            // Refused (REFUSED_STREAM after the 431), or refused by the client library
            // honouring the proxy's SETTINGS_MAX_HEADER_LIST_SIZE.
            Err(e) => println!("oversized HTTP/2 header list refused: {e}"),
        }
    });
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        served,
        "no oversized request reached the application"
    );

    assert_eq!(overflows(&b, "inbound"), 0);
    assert_eq!(seen.requests.load(Ordering::SeqCst), served);
}

#[test]
fn connection_cap_is_enforced() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let seen = application(&runtime, Arc::default());
    let b = server(json!({
        "maxConnections": 5, "maxEndpointConnections": 2, "headerReadTimeoutMs": 60_000
    }));

    // Five idle connections fill the inbound listener; the sixth is closed at once.
    let held: Vec<TcpStream> = (0..5).map(|_| connect_from(PEER, pod_b())).collect();
    assert!(
        eventually(|| open_connections(&b, "inbound") == 5),
        "five connections open"
    );
    let mut sixth = connect_from(PEER, pod_b());
    assert!(
        closed_by_peer(&mut sixth),
        "the sixth connection was kept open"
    );
    assert_eq!(overflows(&b, "inbound"), 1);
    assert_eq!(open_connections(&b, "inbound"), 5);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);

    // Once they close, the listener serves again.
    drop(held);
    assert!(eventually(|| open_connections(&b, "inbound") == 0));
    assert_eq!(raw_request(PEER, pod_b(), &get("/")).status, 200);

    // The outbound listener has its own cap: five of the application's connections, the sixth
    // is closed.
    let held: Vec<TcpStream> = (0..5).map(|_| connect_from(APP, vip())).collect();
    assert!(eventually(|| open_connections(&b, "outbound") == 5));
    let mut sixth = connect_from(APP, vip());
    assert!(
        closed_by_peer(&mut sixth),
        "the sixth outbound connection was kept open"
    );
    assert_eq!(overflows(&b, "outbound"), 1);
    drop(held);
    assert!(eventually(|| open_connections(&b, "outbound") == 0));

    // The proxy's own endpoints have their own cap: two idle connections to readiness, the
    // third is closed.
    let readiness = SocketAddr::from(([127, 0, 0, 1], b.ports.readiness));
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(readiness).unwrap())
        .collect();
    assert!(eventually(|| open_connections(&b, "readiness") == 2));
    let mut third = TcpStream::connect(readiness).unwrap();
    assert!(
        closed_by_peer(&mut third),
        "the third connection was kept open"
    );
    assert_eq!(overflows(&b, "readiness"), 1);
    drop(held);
    assert!(eventually(|| open_connections(&b, "readiness") == 0));
}

#[test]
fn http2_stream_cap_is_enforced() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let release = Arc::new(tokio::sync::Notify::new());
    let seen = application(&runtime, release.clone());
    let b = server(json!({"http2": {"maxConcurrentStreams": 3}}));

    runtime.block_on(async {
        let (mut sender, _connection) = h2().await;
        // One request first: the client then knows the proxy's SETTINGS. (A client that opens
        // streams before it does gets the extra ones refused, REFUSED_STREAM.)
        let response = sender
            .send_request(h2_get("/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let warm_up = seen.requests.load(Ordering::SeqCst);
        // Six requests at once on one connection that allows three streams.
        let requests: Vec<_> = (0..6)
            .map(|_| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let request = h2_get("/hold").body(empty()).unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    status
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + GENEROUS;
        while seen.in_flight.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.in_flight.load(Ordering::SeqCst), 3, "{}", b.logs());
        // Room for a fourth stream would show now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(seen.most_in_flight.load(Ordering::SeqCst), 3);
        // Each released request makes room for a waiting one.
        while seen.requests.load(Ordering::SeqCst) < warm_up + 6
            || seen.in_flight.load(Ordering::SeqCst) > 0
        {
            release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                tokio::time::Instant::now() < deadline + GENEROUS,
                "requests stuck"
            );
        }
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(request.await.unwrap());
        }
        assert_eq!(statuses, vec![StatusCode::OK; 6]);
    });
    assert_eq!(seen.most_in_flight.load(Ordering::SeqCst), 3);
}

#[test]
fn idle_http2_connection_is_closed() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let seen = application(&runtime, Arc::default());
    let b = server(json!({"idleTimeoutMs": 500}));
    runtime.block_on(async {
        let (mut sender, connection) = h2().await;
        let response = sender
            .send_request(h2_get("/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
        // Nothing more is sent: the proxy closes the connection.
        let ended = tokio::time::timeout(GENEROUS, connection).await;
        assert!(
            ended.is_ok(),
            "the idle connection was still open after {GENEROUS:?}"
        );
    });
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    assert!(eventually(|| open_connections(&b, "inbound") == 0));
}

#[test]
fn http2_peer_that_ignores_pings_is_closed() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    application(&runtime, Arc::default());
    let b = server(json!({
        "headerReadTimeoutMs": 60_000,
        "http2": {"keepaliveIntervalMs": 200, "keepaliveTimeoutMs": 200}
    }));
    // The HTTP/2 preface and an empty SETTINGS frame, then silence: no SETTINGS ACK, no PING
    // ACK, ever.
    let mut stream = connect_from(PEER, pod_b());
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    assert!(
        closed_by_peer(&mut stream),
        "a peer that never answered a PING was still connected after {GENEROUS:?}"
    );
    assert!(eventually(|| open_connections(&b, "inbound") == 0));
}

/// Reads HTTP/2 frames until a GOAWAY; its error code, or `None` when the connection ended (or
/// stayed silent for [`GENEROUS`]) without one.
fn goaway_error(stream: &mut TcpStream) -> Option<u32> {
    stream.set_read_timeout(Some(GENEROUS)).unwrap();
    loop {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).ok()?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).ok()?;
        // GOAWAY: last stream id, then the error code.
        if header[3] == 0x7 && length >= 8 {
            return Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
    }
}

#[test]
fn http2_rapid_reset_is_refused() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    let seen = application(&runtime, Arc::default());
    let b = server(json!({"http2": {"maxPendingAcceptResetStreams": 5}}));
    // The preface, an empty SETTINGS, then ten requests each reset right after its HEADERS, in
    // one write: the proxy has accepted none of them when the resets arrive.
    let mut frames =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
    // :method GET, :scheme http, :path /, :authority x (literal, not indexed).
    let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];
    for id in (1u32..20).step_by(2) {
        // HEADERS with END_STREAM and END_HEADERS.
        frames.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5]);
        frames.extend_from_slice(&id.to_be_bytes());
        frames.extend_from_slice(&block);
        // RST_STREAM CANCEL.
        frames.extend_from_slice(&[0, 0, 4, 0x3, 0]);
        frames.extend_from_slice(&id.to_be_bytes());
        frames.extend_from_slice(&0x8u32.to_be_bytes());
    }
    let mut stream = connect_from(PEER, pod_b());
    stream.write_all(&frames).unwrap();
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    assert_eq!(goaway_error(&mut stream), Some(ENHANCE_YOUR_CALM));
    assert!(closed_by_peer(&mut stream));
    assert!(eventually(|| open_connections(&b, "inbound") == 0));
    println!(
        "{} reset requests reached the application",
        seen.requests.load(Ordering::SeqCst)
    );
}
