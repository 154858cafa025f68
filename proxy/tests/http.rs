//! The HTTP data plane between two real proxies, inside a private network namespace with REDIRECT
//! rules (as `tests/mtls.rs`): proxy A is the client pod's sidecar (outbound 15001), proxy B the
//! server pod's (inbound 15006, pod address 127.0.0.20). The backend is the demo server
//! (`trellis-demo`: HTTP/1.1 + h2c, gRPC echo and server streaming, WebSocket echo, streaming
//! `/echo`) listening on every address: B forwards to the pod address, and the `split` service
//! reaches it directly on 127.0.0.1. A's connections to B pass through a tap that counts them.
//! Certificates come from an in-test CA.
//!
//! ```text
//! client (127.0.0.5) ─REDIRECT→ A:15001 ─→ 127.0.0.20:port ─REDIRECT→ tap:15050
//!     tap (from 127.0.0.7) ─REDIRECT→ B:15006 ─(from 127.0.0.6)→ demo server 127.0.0.20:port
//! ```
//!
//! Needs root, iproute2 and iptables.

mod support;

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{APP, MeshCa, Ports, Proxy, app_connection, connect_from, h1, runtime, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_demo::body::{BoxBody, FillerBody, empty, full};
use trellis_demo::grpc::{GrpcDecoder, encode_message};
use trellis_demo::ws;

const INSIDE: &str = "TRELLIS_PROXY_HTTP_TEST_IN_NETNS";
/// The tap's source: redirected to B's inbound listener.
const PEER: &str = "127.0.0.7";
/// B's pod address: what A dials, redirected to the tap.
const POD_B: &str = "127.0.0.20";
const TAP_PORT: u16 = 15050;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// Demo server ports (B's application, on every address).
const HTTP_PORT: u16 = 7200;
const GRPC_PORT: u16 = 7201;
/// Declared by no service: protocol sniffed on both sides.
const UNDECLARED_PORT: u16 = 7202;
/// A server-speaks-first TCP service on an undeclared port.
const GREETING_PORT: u16 = 7203;

const WEB_VIP: [u8; 4] = [127, 0, 0, 100];
const GRPC_VIP: [u8; 4] = [127, 0, 0, 101];
const DOWN_VIP: [u8; 4] = [127, 0, 0, 102];
const GONE_VIP: [u8; 4] = [127, 0, 0, 103];
const SPLIT_VIP: [u8; 4] = [127, 0, 0, 104];

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `test` inside a fresh network namespace with the capture rules of the two pods.
fn in_netns() -> bool {
    let tap = TAP_PORT.to_string();
    support::in_netns(
        INSIDE,
        &[
            // B's forwards to its application return (as the real capture rules do).
            &["-s", "127.0.0.6", "-j", "RETURN"],
            &["-s", APP, "-j", "REDIRECT", "--to-ports", "15001"],
            &["-s", PEER, "-j", "REDIRECT", "--to-ports", "15006"],
            &["-d", POD_B, "-j", "REDIRECT", "--to-ports", &tap],
        ],
    )
}

fn vip(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((ip, 80))
}

fn pod_b(port: u16) -> SocketAddr {
    SocketAddr::new(POD_B.parse().unwrap(), port)
}

fn endpoint(address: &str, ready: bool, identity: Option<&str>) -> String {
    match identity {
        Some(id) => {
            format!(r#"{{"address":"{address}","ready":{ready},"meshed":true,"identity":"{id}"}}"#)
        }
        None => format!(r#"{{"address":"{address}","ready":{ready},"meshed":false}}"#),
    }
}

fn service(name: &str, vip: [u8; 4], ports: &[(&str, u16, &str)], endpoints: &[String]) -> String {
    let vip = std::net::Ipv4Addr::from(vip);
    let ports: Vec<String> = ports
        .iter()
        .map(|(port_name, target, protocol)| {
            format!(
                r#"{{"name":"{port_name}","port":80,"targetPort":{target},"protocol":"{protocol}"}}"#
            )
        })
        .collect();
    format!(
        r#"{{"hostnames":["{name}.shop.svc.cluster.local"],"namespace":"shop","vips":["{vip}"],
            "ports":[{}],"endpoints":[{}]}}"#,
        ports.join(","),
        endpoints.join(",")
    )
}

/// Counts the connections A makes to B, per destination port.
fn tap() -> Arc<Mutex<HashMap<u16, usize>>> {
    let listener = TcpListener::bind(("0.0.0.0", TAP_PORT)).unwrap();
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let seen = counts.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let dst = socket2::SockRef::from(&client)
                .original_dst_v4()
                .unwrap()
                .as_socket()
                .unwrap();
            *seen.lock().entry(dst.port()).or_insert(0) += 1;
            let server = connect_from(PEER, dst);
            server.set_read_timeout(None).unwrap();
            client.set_read_timeout(None).unwrap();
            let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || pipe(c, s));
            std::thread::spawn(move || pipe(server, client));
        }
    });
    counts
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// B's application: the demo server on the HTTP ports, a greeting TCP server on another.
async fn start_backends() {
    let state = Arc::new(trellis_demo::server::ServerState::new(
        trellis_demo::server::Identity {
            name: "backend".into(),
            version: "v1".into(),
            namespace: "shop".into(),
            pod: "server-0".into(),
        },
        true,
    ));
    for port in [HTTP_PORT, GRPC_PORT, UNDECLARED_PORT] {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .unwrap();
        tokio::spawn(trellis_demo::server::serve_http(
            listener,
            state.clone(),
            std::future::pending(),
            Duration::from_secs(1),
        ));
    }
    let greeting = tokio::net::TcpListener::bind(("0.0.0.0", GREETING_PORT))
        .await
        .unwrap();
    tokio::spawn(trellis_demo::server::serve_tcp_echo(
        greeting,
        Some("trellis".into()),
        std::future::pending(),
    ));
}

/// The two sidecars. `b_extra` adds flags to B's command line.
struct Mesh {
    a: Proxy,
    b: Proxy,
}

fn start_mesh(b_extra: &[&str]) -> Mesh {
    let ca = MeshCa::new("mesh root");
    let (a_chain, a_key) = ca.workload_files(CLIENT_ID);
    let (b_chain, b_key) = ca.workload_files(SERVER_ID);
    let bundle = serde_json::to_string(&ca.pem).unwrap();
    let meshed = endpoint(POD_B, true, Some(SERVER_ID));
    let a_services = [
        service(
            "web",
            WEB_VIP,
            &[("http", HTTP_PORT, "http")],
            std::slice::from_ref(&meshed),
        ),
        service(
            "grpc",
            GRPC_VIP,
            &[("grpc", GRPC_PORT, "grpc")],
            std::slice::from_ref(&meshed),
        ),
        service(
            "down",
            DOWN_VIP,
            &[("http", HTTP_PORT, "http")],
            &[endpoint(POD_B, false, Some(SERVER_ID))],
        ),
        // Ready, not meshed, and nothing listens there.
        service(
            "gone",
            GONE_VIP,
            &[("http", 7299, "http")],
            &[endpoint("127.0.0.30", true, None)],
        ),
        // One endpoint behind B, one reached directly (the demo server itself).
        service(
            "split",
            SPLIT_VIP,
            &[("http", HTTP_PORT, "http")],
            &[meshed.clone(), endpoint("127.0.0.1", true, None)],
        ),
    ]
    .join(",");
    let a_config =
        format!(r#"{{"version":"a-1","trustBundle":[{bundle}],"services":[{a_services}]}}"#);
    let b_services = service(
        "web",
        [10, 96, 0, 1],
        &[("http", HTTP_PORT, "http"), ("grpc", GRPC_PORT, "grpc")],
        &[meshed],
    );
    // A DENY with HTTP-only fields denies every TCP connection it could match (Istio's
    // semantics), so it names the HTTP port.
    let b_config = format!(
        r#"{{"version":"b-1","trustBundle":[{bundle}],"services":[{b_services}],
            "inbound":{{"mtlsMode":"PERMISSIVE","authorization":{{"deny":[
              {{"name":"shop.deny-admin","rules":[{{"to":[{{"ports":[{HTTP_PORT}],"paths":[{{"prefix":"/admin"}}]}}]}}]}}
            ]}}}}}}"#
    );
    let mut a_ports = Ports::free();
    a_ports.outbound = 15001;
    let mut a = Proxy::with_config(
        a_ports,
        &a_config,
        &["--cert-chain", &a_chain, "--key", &a_key],
    );
    let mut b_ports = Ports::free();
    b_ports.inbound = 15006;
    let mut b_args = vec!["--cert-chain", b_chain.as_str(), "--key", b_key.as_str()];
    b_args.extend_from_slice(b_extra);
    let mut b = Proxy::with_config_and_env(
        b_ports,
        &b_config,
        &b_args,
        &[
            ("POD_NAME", "server-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "server"),
            ("WORKLOAD_NAME", "server"),
        ],
    );
    a.wait_ready();
    b.wait_ready();
    Mesh { a, b }
}

impl Mesh {
    fn logs(&self) -> String {
        format!("A:\n{}\nB:\n{}", self.a.logs(), self.b.logs())
    }
}

async fn h2(dst: SocketAddr) -> http2::SendRequest<BoxBody> {
    let (sender, connection) =
        http2::handshake(TokioExecutor::new(), TokioIo::new(app_connection(dst)))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends on an HTTP/1.1 connection once it is ready for another request.
async fn send(
    sender: &mut http1::SendRequest<BoxBody>,
    request: Request<BoxBody>,
) -> Response<Incoming> {
    sender.ready().await.unwrap();
    sender.send_request(request).await.unwrap()
}

fn get(uri: &str, host: &str) -> Request<BoxBody> {
    Request::get(uri)
        .header("host", host)
        .body(empty())
        .unwrap()
}

/// Status, headers and the demo server's JSON answer.
async fn json(response: Response<Incoming>) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (parts.status, parts.headers, value)
}

async fn text(response: Response<Incoming>) -> (StatusCode, http::HeaderMap, String) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn header<'a>(answer: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    answer["headers"][name][0].as_str()
}

fn remote_ip(answer: &serde_json::Value) -> String {
    let remote: SocketAddr = answer["remoteAddr"].as_str().unwrap().parse().unwrap();
    remote.ip().to_string()
}

/// A gRPC call on `sender`: its messages and `grpc-status`.
async fn grpc_call(
    sender: &mut http2::SendRequest<BoxBody>,
    method: &str,
    extra: &[(&str, &str)],
    message: &[u8],
) -> (Vec<Bytes>, Option<String>) {
    let mut request = Request::post(format!("http://grpc.shop.svc.cluster.local{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let request = request.body(full(encode_message(false, message))).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    let mut decoder = GrpcDecoder::default();
    decoder.push(&collected.to_bytes());
    let mut messages = Vec::new();
    while let Some(message) = decoder.next_message().unwrap() {
        messages.push(message.data);
    }
    (messages, status)
}

#[test]
fn http_grpc_and_websocket_cross_two_sidecars() {
    if !in_netns() {
        return;
    }
    let taps = tap();
    let runtime = runtime();
    runtime.block_on(start_backends());
    let mesh = start_mesh(&[]);
    let run =
        runtime.block_on(async { tokio::time::timeout(TIMEOUT, exchanges(&mesh, &taps)).await });
    assert!(run.is_ok(), "timed out\n{}", mesh.logs());

    // Istio request metrics on both sides, with the peers' identities.
    let a_metrics = mesh.a.scrape();
    let web_source = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_workload_namespace=\"demo\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
        "destination_service_name=\"web\"",
        "destination_service_namespace=\"shop\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"",
        "request_protocol=\"http\"",
        "response_code=\"200\"",
        "grpc_response_status=\"\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    // 1 + 4 + 2 (h2c) + 2 on the web VIP; B also serves the 2 split requests sent its way.
    assert_eq!(
        sample(&a_metrics, "istio_requests_total", &web_source),
        Some(9),
        "{a_metrics}"
    );
    assert_eq!(
        sample(
            &a_metrics,
            "istio_request_duration_milliseconds_count",
            &web_source
        ),
        Some(9),
        "{a_metrics}"
    );
    let b_metrics = mesh.b.scrape();
    let web_destination = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "source_workload_namespace=\"demo\"",
        "destination_workload=\"server\"",
        "destination_workload_namespace=\"shop\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
        "request_protocol=\"http\"",
        "response_code=\"200\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(
        sample(&b_metrics, "istio_requests_total", &web_destination),
        Some(11),
        "{b_metrics}"
    );
    for (reporter, metrics) in [("source", &a_metrics), ("destination", &b_metrics)] {
        for (code, count) in [("0", 2), ("5", 1)] {
            let grpc = [
                format!("reporter=\"{reporter}\""),
                "request_protocol=\"grpc\"".to_owned(),
                "response_code=\"200\"".to_owned(),
                format!("grpc_response_status=\"{code}\""),
            ];
            let grpc: Vec<&str> = grpc.iter().map(String::as_str).collect();
            assert_eq!(
                sample(metrics, "istio_requests_total", &grpc),
                Some(count),
                "{reporter} grpc-status {code}: {metrics}"
            );
        }
        let reporter = format!("reporter=\"{reporter}\"");
        let upgrade = [reporter.as_str(), "response_code=\"101\""];
        assert_eq!(
            sample(metrics, "istio_requests_total", &upgrade),
            Some(1),
            "{metrics}"
        );
    }
    // HTTP connections are counted per request, not as TCP connections.
    assert_eq!(
        sample(
            &b_metrics,
            "istio_tcp_connections_opened_total",
            &["destination_service=\"web.shop.svc.cluster.local\""]
        ),
        None,
        "{b_metrics}"
    );

    // The access log: one JSON line per request, on both sides.
    let a_log = mesh.a.access_log();
    let ws_line = a_log
        .iter()
        .find(|l| l["path"] == "/ws")
        .expect("the upgrade request is logged");
    assert_eq!(ws_line["response_code"], 101);
    assert_eq!(ws_line["reporter"], "source");
    let b_log = mesh.b.access_log();
    let grpc_line = b_log
        .iter()
        .find(|l| l["grpc_status"] == "5")
        .expect("the failing gRPC call is logged");
    assert_eq!(grpc_line["method"], "POST");
    // B reaches its application on the pod address, never on loopback.
    assert_eq!(grpc_line["upstream_host"], "127.0.0.20:7201");
    assert_eq!(grpc_line["response_flags"], "-");
}

async fn exchanges(mesh: &Mesh, taps: &Mutex<HashMap<u16, usize>>) {
    // 1. HTTP/1.1 through both sidecars: Host kept, forwarding headers added, hop-by-hop
    //    headers stripped, a forged client certificate header replaced by the verified peer's.
    let mut web = h1(vip(WEB_VIP)).await;
    let request = Request::get("/hello?x=1")
        .header("host", "web.shop.svc.cluster.local")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header(
            "x-forwarded-client-cert",
            "By=forged;URI=spiffe://cluster.local/ns/x/sa/admin",
        )
        .body(empty())
        .unwrap();
    let (status, _, answer) = json(send(&mut web, request).await).await;
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", mesh.logs());
    assert_eq!(answer["path"], "/hello");
    assert_eq!(answer["query"], "x=1");
    assert_eq!(answer["authority"], "web.shop.svc.cluster.local");
    assert_eq!(answer["protocol"], "HTTP/1.1", "an http port gets HTTP/1.1");
    assert_eq!(remote_ip(&answer), "127.0.0.6");
    assert_eq!(header(&answer, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&answer, "x-request-id").map(str::len), Some(36));
    assert_eq!(header(&answer, "x-hop"), None, "{answer}");
    assert_eq!(header(&answer, "x-trellis-app-version"), None, "{answer}");
    assert_eq!(
        header(&answer, "x-forwarded-client-cert"),
        Some(
            "By=spiffe://cluster.local/ns/shop/sa/server;URI=spiffe://cluster.local/ns/demo/sa/client"
        )
    );
    assert_eq!(
        answer["headers"]["x-forwarded-client-cert"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // 2. Four more requests, each on a new application connection: one mesh connection
    //    (HTTP/2) carries them all, and one pooled connection to the application.
    let mut remotes = BTreeSet::new();
    for _ in 0..4 {
        let mut web = h1(vip(WEB_VIP)).await;
        let request = get("/pooled", "web.shop.svc.cluster.local");
        let (status, _, answer) = json(send(&mut web, request).await).await;
        assert_eq!(status, StatusCode::OK);
        remotes.insert(answer["remoteAddr"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        remotes.len(),
        1,
        "one keep-alive connection to the app: {remotes:?}"
    );
    assert_eq!(
        taps.lock().get(&HTTP_PORT),
        Some(&1),
        "one mesh connection for every request to the port"
    );

    // 3. h2c from the application (prior knowledge); the http port still gets HTTP/1.1.
    let mut web2 = h2(vip(WEB_VIP)).await;
    for _ in 0..2 {
        let request = Request::get("http://web.shop.svc.cluster.local/h2c")
            .body(empty())
            .unwrap();
        let (status, _, answer) = json(web2.send_request(request).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["authority"], "web.shop.svc.cluster.local");
        assert_eq!(answer["protocol"], "HTTP/1.1");
    }

    // 4. Per-request balancing: one application connection, requests alternate between the
    //    endpoint behind B (seen from 127.0.0.6) and the one reached directly.
    let mut split = h1(vip(SPLIT_VIP)).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, _, answer) = json(send(&mut split, get("/split", "split")).await).await;
        assert_eq!(status, StatusCode::OK);
        seen.push(remote_ip(&answer));
    }
    assert_ne!(seen[0], seen[1], "{seen:?}");
    assert_eq!(seen[0], seen[2], "{seen:?}");
    assert_eq!(seen[1], seen[3], "{seen:?}");
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>(),
        ["127.0.0.1".to_owned(), "127.0.0.6".to_owned()]
            .iter()
            .collect()
    );

    // 5. gRPC to a grpc port (h2c to the application): unary, server streaming, and an error
    //    status, each with its trailers.
    let mut grpc = h2(vip(GRPC_VIP)).await;
    let (messages, status) = grpc_call(&mut grpc, "/trellis.demo.Echo/Unary", &[], b"ping").await;
    assert_eq!(messages, [Bytes::from_static(b"ping")]);
    assert_eq!(status.as_deref(), Some("0"));
    let (messages, status) = grpc_call(
        &mut grpc,
        "/trellis.demo.Echo/Stream",
        &[("x-demo-stream-messages", "5")],
        b"tick",
    )
    .await;
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert!(messages.iter().all(|m| m.as_ref() == b"tick"));
    assert_eq!(status.as_deref(), Some("0"));
    let (_, status) = grpc_call(
        &mut grpc,
        "/trellis.demo.Echo/Unary",
        &[("x-demo-grpc-status", "5"), ("x-demo-grpc-message", "gone")],
        b"x",
    )
    .await;
    assert_eq!(status.as_deref(), Some("5"));

    // 6. WebSocket echo through both sidecars.
    let mut socket = app_connection(vip(WEB_VIP));
    socket
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: web.shop.svc.cluster.local\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = ws::client(socket).await;
    for text in ["hello through two sidecars", "and back again"] {
        ws.send(ws::Message::text(text)).await.unwrap();
        let echoed = ws.next().await.expect("the upgraded connection closed");
        assert_eq!(echoed.unwrap(), ws::Message::text(text));
    }

    // 7. A port no service declares: sniffed as HTTP on both sides (HTTP/1.1 and h2c, each
    //    reaching the application in the version the client spoke).
    let mut undeclared = h1(pod_b(UNDECLARED_PORT)).await;
    let (status, _, answer) = json(send(&mut undeclared, get("/sniffed", "pod-b")).await).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["protocol"], "HTTP/1.1");
    let mut undeclared2 = h2(pod_b(UNDECLARED_PORT)).await;
    let request = Request::get("http://pod-b/sniffed2").body(empty()).unwrap();
    let (status, _, answer) = json(undeclared2.send_request(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["protocol"], "HTTP/2");

    // 8. A server-speaks-first protocol on an undeclared port is not stalled: the greeting
    //    arrives after the detection timeouts, without the client saying anything.
    let mut greeting = app_connection(pod_b(GREETING_PORT));
    let mut line = [0u8; 14];
    let started = std::time::Instant::now();
    if let Err(e) = greeting.read_exact(&mut line).await {
        panic!("no greeting: {e}\n{}", mesh.logs());
    }
    assert_eq!(&line, b"hello trellis\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // 9. Two more HTTP/1.1 requests to the web port on the first connection (keep-alive).
    for _ in 0..2 {
        let (status, _, _) =
            json(send(&mut web, get("/again", "web.shop.svc.cluster.local")).await).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[test]
fn proxy_made_responses_carry_a_reason() {
    if !in_netns() {
        return;
    }
    let _taps = tap();
    let runtime = runtime();
    runtime.block_on(start_backends());
    let mesh = start_mesh(&["--access-log", "false"]);
    let run = runtime.block_on(async { tokio::time::timeout(TIMEOUT, reasons()).await });
    assert!(run.is_ok(), "timed out\n{}", mesh.logs());
    check_reasons(&mesh);
}

async fn reasons() {
    // No ready endpoint: 503 from A, never opaque.
    let mut down = h1(vip(DOWN_VIP)).await;
    let (status, headers, body) = text(send(&mut down, get("/", "down")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-trellis-reason"], "no_healthy_upstream");
    assert_eq!(body, "no healthy upstream\n");

    // Nothing listens at the endpoint: 503, connect failure.
    let mut gone = h1(vip(GONE_VIP)).await;
    let (status, headers, _) = text(send(&mut gone, get("/", "gone")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-trellis-reason"], "upstream_connect_failure");

    // B normalises the path before authorizing: /public/../admin is /admin, denied.
    let mut web = h1(vip(WEB_VIP)).await;
    let (status, headers, body) =
        text(send(&mut web, get("/public/../admin/users", "web")).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-trellis-reason"], "rbac_access_denied");
    assert_eq!(body, "RBAC: access denied\n");

    // A path that cannot be normalised safely is refused.
    let (status, headers, _) = text(send(&mut web, get("/a%2Fb", "web")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-trellis-reason"], "invalid_path");

    // The normalised path is what the application gets.
    let (status, _, answer) = json(send(&mut web, get("/a/./b/../c", "web")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["path"], "/a/c");

    // A client that leaves before its (delayed) response: recorded as DC, not as a success.
    let mut impatient = app_connection(vip(WEB_VIP));
    impatient
        .write_all(b"GET /slow?delay=1s HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(impatient);
}

fn check_reasons(mesh: &Mesh) {
    let a_metrics = mesh.a.scrape();
    for (service, code, flags) in [("down", "503", "UH"), ("gone", "503", "UF,URX")] {
        let labels = [
            "reporter=\"source\"".to_owned(),
            format!("destination_service=\"{service}.shop.svc.cluster.local\""),
            format!("response_code=\"{code}\""),
            format!("response_flags=\"{flags}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert_eq!(
            sample(&a_metrics, "istio_requests_total", &labels),
            Some(1),
            "{service}: {a_metrics}"
        );
    }
    let b_metrics = mesh.b.scrape();
    assert_eq!(
        sample(
            &b_metrics,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "response_code=\"403\"",
                "response_flags=\"RBAC\""
            ]
        ),
        Some(1),
        "{b_metrics}"
    );
    assert_eq!(
        sample(
            &b_metrics,
            "trellis_authorization_denied_total",
            &["policy=\"shop.deny-admin\""]
        ),
        Some(1),
        "{b_metrics}"
    );
    assert_eq!(
        sample(
            &b_metrics,
            "istio_requests_total",
            &["response_code=\"400\"", "response_flags=\"DPE\""]
        ),
        Some(1),
        "{b_metrics}"
    );

    let left = [
        "reporter=\"source\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
        "response_flags=\"DC\"",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sample(&mesh.a.scrape(), "istio_requests_total", &left).is_none()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let a_metrics = mesh.a.scrape();
    assert_eq!(
        sample(&a_metrics, "istio_requests_total", &left),
        Some(1),
        "{a_metrics}"
    );

    let a_log = mesh.a.access_log();
    let uh = a_log
        .iter()
        .find(|l| l["response_flags"] == "UH")
        .expect("the UH response is logged");
    assert_eq!(uh["reason"], "no_healthy_upstream");
    assert_eq!(uh["response_code"], 503);
    assert!(
        mesh.b.access_log().is_empty(),
        "--access-log false writes nothing"
    );
}

#[test]
fn a_100_mb_body_streams_through_with_bounded_memory() {
    if !in_netns() {
        return;
    }
    let _taps = tap();
    let runtime = runtime();
    runtime.block_on(start_backends());
    let mesh = start_mesh(&["--access-log", "false"]);
    const SIZE: u64 = 100 * 1024 * 1024;
    let baseline = (mesh.a.peak_rss_kib(), mesh.b.peak_rss_kib());
    let run = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), stream_100_mb(SIZE)).await
    });
    let received = run.unwrap_or_else(|_| panic!("timed out\n{}", mesh.logs()));
    check_streamed(&mesh, baseline, received, SIZE);
}

async fn stream_100_mb(size: u64) -> u64 {
    let mut web = h1(vip(WEB_VIP)).await;
    let request = Request::post("/echo")
        .header("host", "web.shop.svc.cluster.local")
        .header("content-type", "application/octet-stream")
        .body(FillerBody::new(size).boxed())
        .unwrap();
    let response = send(&mut web, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            received += data.len() as u64;
        }
    }
    received
}

fn check_streamed(mesh: &Mesh, baseline: (u64, u64), received: u64, size: u64) {
    assert_eq!(received, size);
    let peak = (mesh.a.peak_rss_kib(), mesh.b.peak_rss_kib());
    eprintln!("peak RSS (KiB): before {baseline:?}, after {peak:?}");
    for (name, before, after) in [("A", baseline.0, peak.0), ("B", baseline.1, peak.1)] {
        assert!(
            after < before + 32 * 1024,
            "{name}'s peak RSS grew from {before} KiB to {after} KiB for a 100 MiB body"
        );
    }
    let b_metrics = mesh.b.scrape();
    let sum = b_metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_request_bytes_sum{") && l.contains("reporter=\"destination\"")
        })
        .unwrap_or_else(|| panic!("{b_metrics}"));
    assert!(sum.ends_with(&format!(" {size}.0")), "{sum}");
}
