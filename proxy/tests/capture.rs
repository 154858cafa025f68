//! The capture path end to end: inside a private network namespace, iptables REDIRECTs a
//! client's connections to the real proxy's 15001/15006, which reads SO_ORIGINAL_DST and forwards.
//! Needs root and `ip`/`iptables`; skipped (with a message) otherwise.
//!
//! The test re-runs itself inside the namespace (`ip netns exec`), so every socket it and the
//! proxy open live there; a guard deletes the namespace afterwards.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{Netns, Ports, Proxy, connect_from, echo_server, http, sample};

const INSIDE: &str = "TRELLIS_PROXY_TEST_IN_NETNS";
/// Connections from this source are redirected to the outbound listener...
const OUTBOUND_CLIENT: &str = "127.0.0.5";
/// ...and from this one to the inbound listener (standing in for traffic from another pod).
const INBOUND_CLIENT: &str = "127.0.0.7";

#[test]
fn redirected_traffic_is_forwarded_counted_filtered_and_drained() {
    if std::env::var_os(INSIDE).is_some() {
        inside_netns();
        return;
    }
    // CI runs as root: a missing namespace is a broken environment, not a reason to pass.
    let netns = Netns::create("test")
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    for (source, port) in [(OUTBOUND_CLIENT, "15001"), (INBOUND_CLIENT, "15006")] {
        netns.nat_output(&["-s", source, "-j", "REDIRECT", "--to-ports", port]);
    }
    netns.rerun_inside(INSIDE);
}

fn inside_netns() {
    let (echo, peers) = echo_server("127.0.0.1:7000");
    let (unregistered, unregistered_peers) = echo_server("127.0.0.1:7001");
    let config = format!(
        r#"{{"version":"netns-1","outboundTrafficPolicy":"REGISTRY_ONLY","services":[{{
            "hostnames":["echo.demo.svc.cluster.local"],"namespace":"demo","vips":["127.0.0.1"],
            "ports":[{{"name":"tcp-echo","port":{},"targetPort":{},"protocol":"tcp"}}],
            "endpoints":[{{"address":"127.0.0.1","ready":true,"meshed":false}}]}}]}}"#,
        echo.port(),
        echo.port()
    );
    let mut proxy = Proxy::with_config(Ports::well_known(), &config, &["--drain-seconds", "20"]);
    proxy.wait_ready();

    // Outbound, half-close: the client shuts its write side and still gets the reply.
    let mut client = connect_from(OUTBOUND_CLIENT, echo);
    client.write_all(b"hello").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "hello|bye");
    assert_ne!(
        peers.lock()[0].ip().to_string(),
        OUTBOUND_CLIENT,
        "went through the proxy"
    );

    // Outbound, long-lived: bytes are counted while the connection is still open.
    let mut open = connect_from(OUTBOUND_CLIENT, echo);
    open.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let outbound = [
        "reporter=\"source\"",
        "destination_service=\"echo.demo.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_service_namespace=\"demo\"",
        "source_workload=\"client\"",
        "source_workload_namespace=\"demo\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "request_protocol=\"tcp\"",
        "response_flags=\"-\"",
    ];
    // The relay counts a chunk once it is written and a connection as closed once its task
    // ends, so the client may see the bytes or the close an instant before the counters move:
    // wait (bounded) for the expected figures, then check each one.
    let expected = [
        ("istio_tcp_connections_opened_total", 2),
        ("istio_tcp_connections_closed_total", 1),
        ("istio_tcp_received_bytes_total", 9),
        ("istio_tcp_sent_bytes_total", 13),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = proxy.scrape();
        let settled = expected
            .iter()
            .all(|(name, value)| sample(&metrics, name, &outbound) == Some(*value));
        if settled || std::time::Instant::now() >= deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sample(&metrics, "istio_tcp_connections_opened_total", &outbound),
        Some(2),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "istio_tcp_connections_closed_total", &outbound),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "istio_tcp_received_bytes_total", &outbound),
        Some(9),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "istio_tcp_sent_bytes_total", &outbound),
        Some(13),
        "{metrics}"
    );

    // REGISTRY_ONLY: a destination that is no service VIP or endpoint is closed, never dialled.
    let mut blocked = connect_from(OUTBOUND_CLIENT, unregistered);
    let mut buf = [0u8; 8];
    assert!(matches!(blocked.read(&mut buf), Ok(0) | Err(_)));
    assert!(unregistered_peers.lock().is_empty());
    assert!(proxy.logs().contains("REGISTRY_ONLY"), "{}", proxy.logs());
    let metrics = proxy.scrape();
    assert_eq!(
        sample(
            &metrics,
            "istio_tcp_connections_opened_total",
            &["response_flags=\"NR\""]
        ),
        Some(1),
        "{metrics}"
    );

    // Inbound: forwarded to the original destination from 127.0.0.6.
    let mut inbound = connect_from(INBOUND_CLIENT, echo);
    inbound.write_all(b"in").unwrap();
    inbound.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    inbound.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "in|bye");
    assert_eq!(peers.lock().last().unwrap().ip().to_string(), "127.0.0.6");
    let metrics = proxy.scrape();
    let inbound_labels = [
        "reporter=\"destination\"",
        "destination_workload=\"client\"",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_service=\"echo.demo.svc.cluster.local\"",
        "connection_security_policy=\"none\"",
    ];
    assert_eq!(
        sample(&metrics, "istio_tcp_received_bytes_total", &inbound_labels),
        Some(2),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "istio_tcp_sent_bytes_total", &inbound_labels),
        Some(6),
        "{metrics}"
    );

    // Drain: not ready, no new connections, the open one keeps working until it closes.
    assert_eq!(proxy.admin("POST", "/quitquitquit").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http("GET", proxy.ports.readiness, "/healthz/ready").0, 503);
    assert!(
        TcpStream::connect(("127.0.0.1", proxy.ports.outbound)).is_err(),
        "stopped accepting"
    );
    open.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "waits for the open connection"
    );
    drop(open);
    let exit = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
}
