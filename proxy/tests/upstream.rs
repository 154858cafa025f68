//! Circuit breaking and outlier detection through the real proxy binary in static mode, inside a
//! private network namespace whose capture rule sends the client's connections to the proxy's
//! outbound listener (as `tests/http.rs`). The backends are the demo server (`trellis-demo`) with
//! server-wide default controls (`delay=300ms`, `status=500`), on 127.0.0.x addresses the config
//! lists as plain (not meshed) endpoints. The clusters are what the operator compiles from a
//! DestinationRule (`traffic.clusters`).
//!
//! ```text
//! client (127.0.0.5) ─REDIRECT→ proxy:15001 ─→ endpoint 127.0.0.x:port (demo server)
//! ```
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::{APP, Ports, Proxy, app_connection, connect_from, runtime, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_demo::body::{BoxBody, empty};
use trellis_demo::control::Controls;
use trellis_demo::server::{Identity, ServerState};

const INSIDE: &str = "TRELLIS_PROXY_UPSTREAM_TEST_IN_NETNS";

const POOL_VIP: [u8; 4] = [127, 0, 0, 100];
const EJECT_VIP: [u8; 4] = [127, 0, 0, 101];
const TCP_VIP: [u8; 4] = [127, 0, 0, 102];
const POOL_PORT: u16 = 7300;
const EJECT_PORT: u16 = 7301;
const TCP_PORT: u16 = 7302;

const POOL_CLUSTER: &str = "outbound|80||pool.shop.svc.cluster.local";
const EJECT_CLUSTER: &str = "outbound|80||eject.shop.svc.cluster.local";
const TCP_CLUSTER: &str = "outbound|80||tcp.shop.svc.cluster.local";

/// Runs `test` inside a fresh network namespace where the client's connections are captured.
fn in_netns() -> bool {
    support::in_netns(
        INSIDE,
        &[&["-s", APP, "-j", "REDIRECT", "--to-ports", "15001"]],
    )
}

fn service(name: &str, vip: [u8; 4], port: u16, protocol: &str, endpoints: &[&str]) -> String {
    let vip = std::net::Ipv4Addr::from(vip);
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!(r#"{{"address":"{a}","ready":true,"meshed":false}}"#))
        .collect();
    format!(
        r#"{{"hostnames":["{name}.shop.svc.cluster.local"],"namespace":"shop","vips":["{vip}"],
            "ports":[{{"name":"{protocol}","port":80,"targetPort":{port},"protocol":"{protocol}"}}],
            "endpoints":[{}]}}"#,
        endpoints.join(",")
    )
}

/// The static config: three services and the clusters their DestinationRules compile to.
fn config() -> String {
    let services = [
        service(
            "eject",
            EJECT_VIP,
            EJECT_PORT,
            "http",
            &["127.0.0.1", "127.0.0.2"],
        ),
        service("pool", POOL_VIP, POOL_PORT, "http", &["127.0.0.1"]),
        service("tcp", TCP_VIP, TCP_PORT, "tcp", &["127.0.0.1"]),
    ]
    .join(",");
    // Sorted by host, as the compile publishes them.
    let clusters = r#"[
        {"host":"eject.shop.svc.cluster.local","lb":"roundRobin","outlierDetection":{
            "consecutive5xxErrors":3,"consecutiveGatewayErrors":0,"intervalMs":1000,
            "baseEjectionTimeMs":60000,"maxEjectionPercent":100,"minHealthPercent":0}},
        {"host":"pool.shop.svc.cluster.local","connectionPool":{
            "maxConnections":1,"http1MaxPendingRequests":1}},
        {"host":"tcp.shop.svc.cluster.local","connectionPool":{"maxConnections":1}}
    ]"#;
    format!(r#"{{"version":"u-1","services":[{services}],"traffic":{{"clusters":{clusters}}}}}"#)
}

/// A demo server on `ip:port` applying `defaults` to every request.
async fn demo(ip: &str, port: u16, defaults: &str) {
    let identity = Identity {
        name: format!("demo-{ip}"),
        version: "v1".into(),
        namespace: "shop".into(),
        pod: format!("demo-{ip}"),
    };
    let state = ServerState::new(identity, true)
        .with_default_controls(Controls::parse_defaults(defaults).unwrap());
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(trellis_demo::server::serve_http(
        listener,
        Arc::new(state),
        std::future::pending(),
        Duration::from_secs(1),
    ));
}

fn start_proxy() -> Proxy {
    let mut ports = Ports::free();
    ports.outbound = 15001;
    let mut proxy = Proxy::with_config(ports, &config(), &[]);
    proxy.wait_ready();
    proxy
}

/// One request from the client application on a connection of its own: status and the
/// `x-trellis-reason` header.
async fn request(vip: [u8; 4]) -> (StatusCode, Option<String>) {
    let dst = SocketAddr::from((vip, 80));
    let (mut sender, connection) =
        http1::handshake::<_, BoxBody>(TokioIo::new(app_connection(dst)))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", "svc")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let reason = response
        .headers()
        .get("x-trellis-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    response.into_body().collect().await.unwrap();
    (status, reason)
}

#[test]
fn connection_pool_limits_overflow_with_uo() {
    if !in_netns() {
        return;
    }
    runtime().block_on(async {
        demo("127.0.0.1", POOL_PORT, "delay=300ms").await;
        let echo = tokio::net::TcpListener::bind(("127.0.0.1", TCP_PORT))
            .await
            .unwrap();
        tokio::spawn(trellis_demo::server::serve_tcp_echo(
            echo,
            None,
            std::future::pending(),
        ));
        let proxy = start_proxy();

        // maxConnections 1 + http1MaxPendingRequests 1 against 300 ms answers: of 10 requests
        // at once, one runs, one waits for the connection, the rest overflow at once.
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..10).map(|_| tokio::spawn(request(POOL_VIP))).collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
        let overflowed = answers
            .iter()
            .filter(|(s, reason)| {
                *s == StatusCode::SERVICE_UNAVAILABLE
                    && reason.as_deref() == Some("upstream_overflow")
            })
            .count();
        println!(
            "10 requests at once: {answers:?} in {:?}",
            started.elapsed()
        );
        assert_eq!(ok, 2, "{answers:?}\n{}", proxy.logs());
        assert_eq!(overflowed, 8, "{answers:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(550),
            "the second request waited for the first's connection: {:?}",
            started.elapsed()
        );
        let metrics = proxy.scrape();
        let flagged: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && l.contains("response_flags=\"UO\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum();
        assert_eq!(flagged, overflowed as u64, "{metrics}");
        let cluster = format!("cluster=\"{POOL_CLUSTER}\"");
        assert_eq!(
            sample(
                &metrics,
                "trellis_upstream_overflow_total",
                &[&cluster, "limit=\"max_pending_requests\""]
            ),
            Some(overflowed as u64),
            "{metrics}"
        );

        // The limit is per cluster and lifts when the requests end.
        let (status, _) = request(POOL_VIP).await;
        assert_eq!(status, StatusCode::OK);

        // Opaque TCP: maxConnections 1 holds a second connection off (closed at once, UO).
        let first = connect_from(APP, SocketAddr::from((TCP_VIP, 80)));
        first.set_nonblocking(true).unwrap();
        let mut first = tokio::net::TcpStream::from_std(first).unwrap();
        first.write_all(b"ping").await.unwrap();
        let mut echoed = [0; 4];
        first.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        let second = connect_from(APP, SocketAddr::from((TCP_VIP, 80)));
        second.set_nonblocking(true).unwrap();
        let mut second = tokio::net::TcpStream::from_std(second).unwrap();
        let mut buf = [0; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("the overflowing connection is closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(first);
        let metrics = proxy.scrape();
        let tcp_cluster = format!("cluster=\"{TCP_CLUSTER}\"");
        assert_eq!(
            sample(
                &metrics,
                "trellis_upstream_overflow_total",
                &[&tcp_cluster, "limit=\"max_connections\""]
            ),
            Some(1),
            "{metrics}"
        );
        assert_eq!(
            sample(
                &metrics,
                "istio_tcp_connections_opened_total",
                &["response_flags=\"UO\""]
            ),
            Some(1),
            "{metrics}"
        );
    });
}

#[test]
fn outlier_detection_ejects_the_failing_endpoint() {
    if !in_netns() {
        return;
    }
    runtime().block_on(async {
        demo("127.0.0.1", EJECT_PORT, "").await;
        demo("127.0.0.2", EJECT_PORT, "status=500").await;
        let proxy = start_proxy();

        // Round robin over a good and a bad endpoint: the bad one answers every other request
        // until its third 500 in a row ejects it (consecutive5xxErrors 3) for 60 s.
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(request(EJECT_VIP).await.0.as_u16());
        }
        println!("40 requests: {statuses:?}");
        let failed: Vec<usize> = statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != 200)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(failed.len(), 3, "{statuses:?}\n{}", proxy.logs());
        assert!(
            statuses.iter().all(|s| matches!(s, 200 | 500)),
            "{statuses:?}"
        );
        let last_failure = failed.last().copied().unwrap_or(0);
        assert!(last_failure < 10, "ejected early: {statuses:?}");
        let metrics = proxy.scrape();
        let cluster = format!("cluster=\"{EJECT_CLUSTER}\"");
        assert_eq!(
            sample(&metrics, "trellis_outlier_ejections_total", &[&cluster]),
            Some(1),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "trellis_outlier_ejections_active", &[&cluster]),
            Some(1),
            "{metrics}"
        );
        let logs = proxy.logs();
        assert!(
            logs.contains("outlier detection ejected an endpoint") && logs.contains("127.0.0.2"),
            "{logs}"
        );
    });
}
