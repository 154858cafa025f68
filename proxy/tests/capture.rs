//! The capture path end to end: inside a private network namespace, iptables REDIRECTs a
//! client's connections to the real proxy's 15001/15006, which reads SO_ORIGINAL_DST and forwards.
//! The dual-stack test installs trellis-init's own rules (IPv4 and IPv6) in a pod namespace wired
//! to a peer namespace. Needs root, `ip`, `iptables`/`ip6tables` and python3 (the peer's client);
//! fails rather than skips without them.
//!
//! Each test re-runs itself inside the (pod) namespace (`ip netns exec`), so every socket it and
//! the proxy open live there; guards delete the namespaces afterwards.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::{Netns, Ports, Proxy, connect_from, echo_server, http, sample};
use trellis_init::{CaptureConfig, CapturePlan, Ipv6Mode, SystemExecutor, apply};

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

const DUAL_STACK_INSIDE: &str = "TRELLIS_PROXY_DUAL_STACK_TEST_IN_NETNS";
/// The pod's and the peer's ends of the veth pair, in both families.
const POD_IP: &str = "10.254.1.2";
const PEER_IP: &str = "10.254.1.1";
const POD_IP6: &str = "fd00:254:1::2";
const PEER_IP6: &str = "fd00:254:1::1";
/// The application's port the mesh serves, and the one an AuthorizationPolicy denies.
const APP_PORT: u16 = 7000;
const DENIED_PORT: u16 = 7001;

/// Run by python3 in the peer namespace: connects to argv[1]:argv[2], sends `in`, half-closes,
/// and prints everything read until the close (or why there was no connection).
const PEER_CLIENT_PY: &str = r#"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
        conn.sendall(b"in")
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(256):
            answer += chunk
        print(answer.decode() or "closed without answer")
except OSError as error:
    print(f"no connection: {error}")
"#;

/// A dual-stack pod: trellis-init's rules as the init container installs them (IPv6 found from
/// the pod's own address, so captured), the real proxy on 15001/15006, an application on the pod's
/// addresses and a peer pod on the other end of a veth pair. IPv6 then meets the proxy exactly as
/// IPv4 does, case by case: inbound is forwarded from the passthrough source (`::6` as
/// `127.0.0.6`) and counted, an AuthorizationPolicy DENY holds, and outbound goes through the
/// proxy's REGISTRY_ONLY check (the original destination read with IP6T_SO_ORIGINAL_DST).
/// Before IPv6 was captured, the peer reached the application directly over IPv6, past every
/// policy.
#[test]
fn ipv6_is_captured_in_dual_stack_netns() {
    if std::env::var_os(DUAL_STACK_INSIDE).is_some() {
        dual_stack_inside();
        return;
    }
    let create = |tag| {
        let netns = Netns::create(tag)
            .expect("cannot create a network namespace: this test needs root and iproute2");
        assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
        netns
    };
    let pod = create("dual-stack-pod");
    let peer = create("dual-stack-peer");
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&[
        "-n", &pod.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &peer.0,
    ]);
    for (netns, v4, v6) in [(&pod, POD_IP, POD_IP6), (&peer, PEER_IP, PEER_IP6)] {
        ip(&[
            "-n",
            &netns.0,
            "addr",
            "add",
            &format!("{v4}/24"),
            "dev",
            "eth0",
        ]);
        // `nodad`: usable at once, not after duplicate address detection's second.
        let v6 = format!("{v6}/64");
        ip(&[
            "-n", &netns.0, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
        ]);
        ip(&["-n", &netns.0, "link", "set", "eth0", "up"]);
    }
    ip(&["-n", &pod.0, "route", "add", "default", "via", PEER_IP]);
    ip(&[
        "-n", &pod.0, "-6", "route", "add", "default", "via", PEER_IP6,
    ]);
    pod.rerun_inside(DUAL_STACK_INSIDE);
}

/// The peer namespace of the pod namespace this process runs in (named alike by the outer run).
fn peer_netns() -> String {
    let output = Command::new("ip")
        .args(["netns", "identify"])
        .output()
        .unwrap();
    let pod = String::from_utf8(output.stdout).unwrap();
    assert!(
        pod.contains("dual-stack-pod"),
        "not in the test's pod namespace: {pod:?}"
    );
    pod.trim().replace("dual-stack-pod", "dual-stack-peer")
}

/// What the peer pod's client got from `ip`:`port`.
fn from_peer(peer: &str, ip: &str, port: u16) -> String {
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            peer,
            python,
            "-c",
            PEER_CLIENT_PY,
            ip,
            &port.to_string(),
        ])
        .output()
        .expect("running the peer's client (python3)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn dual_stack_inside() {
    // What trellis-init does in the pod: find the pod's IPv6 and install the rules.
    let executor = SystemExecutor::detect();
    let ipv6 = executor.ipv6_mode().unwrap();
    assert_eq!(
        ipv6,
        Ipv6Mode::Capture,
        "the pod's IPv6 address was not found"
    );
    let plan = CapturePlan::new(&CaptureConfig {
        ipv6,
        ..CaptureConfig::default()
    })
    .unwrap();
    apply(&executor, &plan).unwrap();

    let peer = peer_netns();
    let config = format!(
        r#"{{"version":"dual-stack-1","outboundTrafficPolicy":"REGISTRY_ONLY","services":[],
            "inbound":{{"mtlsMode":"PERMISSIVE","authorization":{{"deny":[{{
                "name":"demo.deny-port","rules":[{{"to":[{{"ports":[{DENIED_PORT}]}}]}}]}}]}}}}}}"#
    );
    let mut proxy = Proxy::with_config(Ports::well_known(), &config, &[]);
    proxy.wait_ready();
    let inbound_opened = |proxy: &Proxy| {
        sample(
            &proxy.scrape(),
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", "response_flags=\"-\""],
        )
        .unwrap_or(0)
    };
    let outbound_blocked = |proxy: &Proxy| {
        sample(
            &proxy.scrape(),
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", "response_flags=\"NR\""],
        )
        .unwrap_or(0)
    };

    // The same cases for IPv4 and then IPv6, with the same expectations.
    for (family, pod_ip, peer_ip, passthrough_source) in [
        ("IPv4", POD_IP, PEER_IP, "127.0.0.6"),
        ("IPv6", POD_IP6, PEER_IP6, "::6"),
    ] {
        let (_, app_peers) =
            echo_server(&SocketAddr::new(pod_ip.parse().unwrap(), APP_PORT).to_string());
        let (_, denied_peers) =
            echo_server(&SocketAddr::new(pod_ip.parse().unwrap(), DENIED_PORT).to_string());

        let before = inbound_opened(&proxy);
        assert_eq!(
            from_peer(&peer, pod_ip, APP_PORT),
            "in|bye",
            "{family}: inbound"
        );
        let seen = app_peers.lock().clone();
        assert_eq!(
            seen.iter().map(|p| p.ip().to_string()).collect::<Vec<_>>(),
            [passthrough_source],
            "{family}: the application must see the proxy's passthrough source, not the peer \
             (the connection went around the proxy)\n{}",
            proxy.logs()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while inbound_opened(&proxy) == before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            inbound_opened(&proxy),
            before + 1,
            "{family}: inbound counted"
        );

        let denied = from_peer(&peer, pod_ip, DENIED_PORT);
        assert!(
            denied == "closed without answer" || denied.starts_with("no connection"),
            "{family}: the DENY let the peer through: {denied}"
        );
        assert!(
            denied_peers.lock().is_empty(),
            "{family}: the denied app was reached"
        );

        // Outbound to an address no service holds: REGISTRY_ONLY closes it in the proxy. Not
        // captured, the connection would be refused by the peer, where nothing listens.
        let blocked_before = outbound_blocked(&proxy);
        let mut outbound = TcpStream::connect((peer_ip, 8080))
            .unwrap_or_else(|e| panic!("{family}: outbound did not reach the proxy: {e}"));
        outbound
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(outbound.read(&mut buf), Ok(0) | Err(_)));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while outbound_blocked(&proxy) == blocked_before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            outbound_blocked(&proxy),
            blocked_before + 1,
            "{family}: outbound not refused by the proxy\n{}",
            proxy.logs()
        );
    }
    assert!(
        proxy.logs().contains(&format!("[{PEER_IP6}]:8080")),
        "the proxy logs the IPv6 original destination\n{}",
        proxy.logs()
    );
}
