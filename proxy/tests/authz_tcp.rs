//! AuthorizationPolicy on opaque TCP, with real proxies and real mutual TLS: two client
//! sidecars with different identities (`demo/bad` and `demo/good`, certificates from an
//! in-test CA) call a server sidecar whose static config carries a DENY by principal and an
//! ALLOW by namespace. Runs inside a private network namespace with REDIRECT rules.
//!
//! ```text
//! app (127.0.0.5) ─REDIRECT→ A_bad:15001  ─┐
//! app (127.0.0.8) ─REDIRECT→ A_good:15011 ─┴─→ 127.0.0.20:port ─REDIRECT→ B:15006 ─→ echo
//! peer (127.0.0.7, plaintext) ──────────────→ 127.0.0.20:port ─REDIRECT→ B:15006
//! ```
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use support::{MeshCa, Netns, Ports, Proxy, connect_from, echo_server, sample};

const INSIDE: &str = "TRELLIS_PROXY_AUTHZ_TCP_TEST_IN_NETNS";
const APP_BAD: &str = "127.0.0.5";
const APP_GOOD: &str = "127.0.0.8";
const PEER: &str = "127.0.0.7";
const POD_B: &str = "127.0.0.20";
const OUTBOUND_BAD: u16 = 15001;
const OUTBOUND_GOOD: u16 = 15011;

const BAD_ID: &str = "spiffe://cluster.local/ns/demo/sa/bad";
const GOOD_ID: &str = "spiffe://cluster.local/ns/demo/sa/good";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// STRICT: mutual TLS only.
const STRICT_PORT: u16 = 7100;
/// PERMISSIVE: plaintext reaches the policies too.
const PERMISSIVE_PORT: u16 = 7101;

#[test]
fn tcp_connections_are_denied_by_principal_and_allowed_by_namespace() {
    if std::env::var_os(INSIDE).is_some() {
        inside_netns();
        return;
    }
    let netns = Netns::create("authz")
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    netns.nat_output(&["-s", "127.0.0.6", "-j", "RETURN"]);
    let (bad, good) = (OUTBOUND_BAD.to_string(), OUTBOUND_GOOD.to_string());
    netns.nat_output(&["-s", APP_BAD, "-j", "REDIRECT", "--to-ports", &bad]);
    netns.nat_output(&["-s", APP_GOOD, "-j", "REDIRECT", "--to-ports", &good]);
    netns.nat_output(&["-d", POD_B, "-j", "REDIRECT", "--to-ports", "15006"]);
    netns.rerun_inside(INSIDE);
}

/// Sends `message`, half-closes, and returns everything read until the peer closes (empty if
/// the connection was closed without an answer).
fn exchange(mut stream: TcpStream, message: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(message);
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

fn service(name: &str, vip: &str, target: u16) -> String {
    format!(
        r#"{{"hostnames":["{name}.shop.svc.cluster.local"],"namespace":"shop","vips":["{vip}"],
            "ports":[{{"name":"tcp","port":80,"targetPort":{target},"protocol":"tcp"}}],
            "endpoints":[{{"address":"{POD_B}","ready":true,"meshed":true,"identity":"{SERVER_ID}"}}]}}"#
    )
}

fn vip(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 80))
}

fn client(ca: &MeshCa, identity: &str, outbound: u16, services: &str) -> Proxy {
    let (chain, key) = ca.workload_files(identity);
    let bundle = serde_json::to_string(&ca.pem).unwrap();
    let config = format!(r#"{{"version":"c-1","trustBundle":[{bundle}],"services":[{services}]}}"#);
    let mut ports = Ports::free();
    ports.outbound = outbound;
    let service_account = identity.rsplit('/').next().unwrap();
    Proxy::with_config_and_env(
        ports,
        &config,
        &["--cert-chain", &chain, "--key", &key],
        &[("SERVICE_ACCOUNT", service_account)],
    )
}

fn inside_netns() {
    let ca = MeshCa::new("mesh root");
    let (_, strict_peers) = echo_server(&format!("{POD_B}:{STRICT_PORT}"));
    let (permissive_app, permissive_peers) = echo_server(&format!("{POD_B}:{PERMISSIVE_PORT}"));

    let services = [
        service("orders", "127.0.0.100", STRICT_PORT),
        service("cart", "127.0.0.101", PERMISSIVE_PORT),
    ]
    .join(",");
    let mut a_bad = client(&ca, BAD_ID, OUTBOUND_BAD, &services);
    let mut a_good = client(&ca, GOOD_ID, OUTBOUND_GOOD, &services);

    let (b_chain, b_key) = ca.workload_files(SERVER_ID);
    let bundle = serde_json::to_string(&ca.pem).unwrap();
    let authorization = r#"{
        "deny": [{"name": "shop.deny-bad", "rules": [
            {"from": [{"principals": [{"exact": "cluster.local/ns/demo/sa/bad"}]}]}]}],
        "allow": [{"name": "shop.allow-demo", "rules": [
            {"from": [{"namespaces": [{"exact": "demo"}]}]}]}]
    }"#;
    let b_config = format!(
        r#"{{"version":"b-1","trustBundle":[{bundle}],"services":[{services}],
            "inbound":{{"mtlsMode":"STRICT","portMtls":{{"{PERMISSIVE_PORT}":"PERMISSIVE"}},
                        "authorization":{authorization}}}}}"#
    );
    let mut b_ports = Ports::free();
    b_ports.inbound = 15006;
    let mut b = Proxy::with_config_and_env(
        b_ports,
        &b_config,
        &["--cert-chain", &b_chain, "--key", &b_key],
        &[
            ("POD_NAME", "server-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "server"),
            ("WORKLOAD_NAME", "server"),
        ],
    );
    a_bad.wait_ready();
    a_good.wait_ready();
    b.wait_ready();

    // The allowed identity (namespace demo) is relayed, on both ports.
    for (target, message) in [(vip(100), "good-strict"), (vip(101), "good-permissive")] {
        let reply = exchange(connect_from(APP_GOOD, target), message.as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{message}|bye"),
            "B:\n{}\nA_good:\n{}",
            b.logs(),
            a_good.logs()
        );
    }
    assert_eq!(strict_peers.lock().len(), 1);
    assert_eq!(permissive_peers.lock().len(), 1);

    // The denied identity is in namespace demo too: the DENY wins over the ALLOW, the
    // connection is closed and never reaches the application.
    let reply = exchange(connect_from(APP_BAD, vip(100)), b"bad-strict");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(strict_peers.lock().len(), 1, "nothing reached the app");

    // Plaintext (no principal, no namespace) on the PERMISSIVE port: the ALLOW by namespace
    // does not match, so it is denied.
    let reply = exchange(connect_from(PEER, permissive_app), b"anonymous");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(permissive_peers.lock().len(), 1, "nothing reached the app");

    let metrics = b.scrape();
    assert_eq!(
        sample(
            &metrics,
            "trellis_authorization_denied_total",
            &["policy=\"shop.deny-bad\""]
        ),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "trellis_authorization_denied_total",
            &["policy=\"none\""]
        ),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"{BAD_ID}\""),
                "connection_security_policy=\"mutual_tls\"",
                "response_flags=\"RBAC\""
            ]
        ),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "connection_security_policy=\"none\"",
                "response_flags=\"RBAC\""
            ]
        ),
        Some(1),
        "{metrics}"
    );
    for service in ["orders", "cart"] {
        assert_eq!(
            sample(
                &metrics,
                "istio_tcp_connections_opened_total",
                &[
                    &format!("source_principal=\"{GOOD_ID}\""),
                    &format!("destination_service=\"{service}.shop.svc.cluster.local\""),
                    "response_flags=\"-\""
                ]
            ),
            Some(1),
            "{service}: {metrics}"
        );
    }
    let logs = b.logs();
    assert!(
        logs.contains("connection denied by AuthorizationPolicy") && logs.contains("shop.deny-bad"),
        "{logs}"
    );
}
