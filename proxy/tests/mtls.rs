//! Mutual TLS between two real proxies, inside a private network namespace with REDIRECT rules:
//! proxy A is the client pod's sidecar (outbound 15001), proxy B the server pod's (inbound
//! 15006, pod address 127.0.0.20). A's connections to B pass through a tap that records the
//! bytes on the wire between the sidecars. Certificates come from an in-test CA.
//!
//! ```text
//! app (127.0.0.5) ─REDIRECT→ A:15001 ─→ 127.0.0.20:port ─REDIRECT→ tap:15050
//!     tap (from 127.0.0.7) ─REDIRECT→ B:15006 ─(from 127.0.0.6)→ backend 127.0.0.20:port
//! ```
//!
//! Needs root, iproute2 and iptables.

mod support;

use parking_lot::Mutex;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use support::{APP, Netns, Ports, Proxy, connect_from, echo_server, sample, temp_path};

const INSIDE: &str = "TRELLIS_PROXY_MTLS_TEST_IN_NETNS";
/// Other pods (and the tap): redirected to B's inbound listener.
const PEER: &str = "127.0.0.7";
/// B's pod address: what A dials, redirected to the tap.
const POD_B: &str = "127.0.0.20";
const TAP_PORT: u16 = 15050;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";
const MESH_ALPN: &[u8] = b"trellis-mtls";

// B's ports and their PeerAuthentication modes.
const STRICT_PORT: u16 = 7100;
const PERMISSIVE_PORT: u16 = 7101;
const DISABLE_PORT: u16 = 7102;

#[test]
fn sidecars_speak_mutual_tls_and_enforce_peer_authentication() {
    if std::env::var_os(INSIDE).is_some() {
        inside_netns();
        return;
    }
    let netns = Netns::create("mtls")
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    // B's forwards to its application return (as the real capture rules do).
    netns.nat_output(&["-s", "127.0.0.6", "-j", "RETURN"]);
    netns.nat_output(&["-s", APP, "-j", "REDIRECT", "--to-ports", "15001"]);
    netns.nat_output(&["-s", PEER, "-j", "REDIRECT", "--to-ports", "15006"]);
    let tap = TAP_PORT.to_string();
    netns.nat_output(&["-d", POD_B, "-j", "REDIRECT", "--to-ports", &tap]);
    netns.rerun_inside(INSIDE);
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate shaped like the operator's; returns the `--cert-chain` and
    /// `--key` files.
    fn workload_files(&self, spiffe_id: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = temp_path("chain.pem");
        let key_file = temp_path("key.pem");
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (
            chain.to_str().unwrap().to_owned(),
            key_file.to_str().unwrap().to_owned(),
        )
    }
}

/// The bytes of one connection through the tap, per direction.
#[derive(Default)]
struct Wire {
    to_server: Mutex<Vec<u8>>,
    to_client: Mutex<Vec<u8>>,
}

/// A transparent relay on the sidecar-to-sidecar hop: accepts A's redirected connections,
/// records their bytes, and dials the original destination from [`PEER`] (so B gets them).
fn tap() -> Arc<Mutex<Vec<Arc<Wire>>>> {
    let listener = TcpListener::bind(("0.0.0.0", TAP_PORT)).unwrap();
    let wires = Arc::new(Mutex::new(Vec::new()));
    let seen = wires.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let dst = socket2::SockRef::from(&client)
                .original_dst_v4()
                .unwrap()
                .as_socket()
                .unwrap();
            let server = connect_from(PEER, dst);
            let wire = Arc::new(Wire::default());
            seen.lock().push(wire.clone());
            let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = wire.clone();
            std::thread::spawn(move || pipe(c, s, &up.to_server));
            std::thread::spawn(move || pipe(server, client, &wire.to_client));
        }
    });
    wires
}

fn pipe(mut from: TcpStream, mut to: TcpStream, record: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                record.lock().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Sends `message`, half-closes, and returns everything read until the peer closes (empty if
/// the connection was refused or reset).
fn exchange(mut stream: TcpStream, message: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(message);
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

fn vip(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 80))
}

fn pod_b(port: u16) -> SocketAddr {
    SocketAddr::new(POD_B.parse().unwrap(), port)
}

fn service(name: &str, vip: &str, target: u16, endpoints: &str) -> String {
    format!(
        r#"{{"hostnames":["{name}.shop.svc.cluster.local"],"namespace":"shop","vips":["{vip}"],
            "ports":[{{"name":"tcp","port":80,"targetPort":{target},"protocol":"tcp"}}],
            "endpoints":[{endpoints}]}}"#
    )
}

fn endpoint(address: &str, ready: bool, identity: Option<&str>) -> String {
    match identity {
        Some(id) => {
            format!(r#"{{"address":"{address}","ready":{ready},"meshed":true,"identity":"{id}"}}"#)
        }
        None => format!(r#"{{"address":"{address}","ready":{ready},"meshed":false}}"#),
    }
}

/// A rustls ClientHello offering the mesh ALPN, as raw bytes.
fn mesh_client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let name = rustls_pki_types::ServerName::try_from("ledger.shop.svc.cluster.local").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).unwrap();
    }
    hello
}

fn inside_netns() {
    let ca = Ca::new("mesh root");
    let (a_chain, a_key) = ca.workload_files(CLIENT_ID);
    let (b_chain, b_key) = ca.workload_files(SERVER_ID);
    let bundle = serde_json::to_string(&ca.pem).unwrap();

    let (strict_app, strict_peers) = echo_server(&pod_b(STRICT_PORT).to_string());
    let (permissive_app, _) = echo_server(&pod_b(PERMISSIVE_PORT).to_string());
    let (disable_app, _) = echo_server(&pod_b(DISABLE_PORT).to_string());
    let (legacy_app, legacy_peers) = echo_server("127.0.0.1:0");
    let wires = tap();

    let meshed = |ready| endpoint(POD_B, ready, Some(SERVER_ID));
    let a_services = [
        // A not-ready endpoint first: round robin must skip it (nothing listens there).
        service(
            "orders",
            "127.0.0.100",
            STRICT_PORT,
            &format!(
                "{},{}",
                endpoint("127.0.0.21", false, Some(SERVER_ID)),
                meshed(true)
            ),
        ),
        service("cart", "127.0.0.101", PERMISSIVE_PORT, &meshed(true)),
        service(
            "impostor",
            "127.0.0.102",
            STRICT_PORT,
            &endpoint(
                POD_B,
                true,
                Some("spiffe://cluster.local/ns/shop/sa/payments"),
            ),
        ),
        service(
            "legacy",
            "127.0.0.103",
            legacy_app.port(),
            &endpoint("127.0.0.1", true, None),
        ),
        service("down", "127.0.0.104", STRICT_PORT, &meshed(false)),
    ]
    .join(",");
    let a_config =
        format!(r#"{{"version":"a-1","trustBundle":[{bundle}],"services":[{a_services}]}}"#);
    let b_services = [
        service("orders", "10.96.0.1", STRICT_PORT, &meshed(true)),
        service("cart", "10.96.0.2", PERMISSIVE_PORT, &meshed(true)),
        service("ledger", "10.96.0.3", DISABLE_PORT, &meshed(true)),
    ]
    .join(",");
    let b_config = format!(
        r#"{{"version":"b-1","trustBundle":[{bundle}],"services":[{b_services}],
            "inbound":{{"mtlsMode":"STRICT",
              "portMtls":{{"{PERMISSIVE_PORT}":"PERMISSIVE","{DISABLE_PORT}":"DISABLE"}}}}}}"#
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
    a.wait_ready();
    b.wait_ready();

    // 1. Meshed endpoint behind a VIP: plaintext at both ends, TLS on the wire between the
    //    sidecars, half-close carried through (the backend's "|bye" comes after our FIN).
    for i in 0..3 {
        let message = format!("hello-mesh-{i}");
        let reply = exchange(connect_from(APP, vip(100)), message.as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{message}|bye"),
            "A:\n{}\nB:\n{}",
            a.logs(),
            b.logs()
        );
    }
    assert_eq!(strict_peers.lock().len(), 3);
    assert!(
        strict_peers
            .lock()
            .iter()
            .all(|p| p.ip().to_string() == "127.0.0.6")
    );
    {
        let wires = wires.lock();
        assert_eq!(wires.len(), 3, "every connection went A → tap → B");
        for wire in wires.iter() {
            let up = wire.to_server.lock();
            let down = wire.to_client.lock();
            assert_eq!(up[..3], [0x16, 0x03, 0x01], "a TLS handshake record");
            assert!(
                contains(&up, MESH_ALPN),
                "the ClientHello offers the mesh ALPN"
            );
            assert!(!contains(&up, b"hello-mesh"), "no plaintext on the wire");
            assert!(!contains(&down, b"hello-mesh"), "no plaintext on the wire");
            assert!(!contains(&down, b"|bye"), "no plaintext on the wire");
            assert_eq!(down[0], 0x16, "the server answers with a TLS record");
        }
    }
    let b_metrics = b.scrape();
    let b_mtls = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "source_workload_namespace=\"demo\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"",
        "destination_workload=\"server\"",
        "destination_service=\"orders.shop.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        sample(&b_metrics, "istio_tcp_connections_opened_total", &b_mtls),
        Some(3),
        "{b_metrics}"
    );
    assert_eq!(
        sample(&b_metrics, "istio_tcp_received_bytes_total", &b_mtls),
        Some(3 * 12),
        "{b_metrics}"
    );
    let a_metrics = a.scrape();
    let a_mtls = [
        "reporter=\"source\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"",
        "destination_service=\"orders.shop.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        sample(&a_metrics, "istio_tcp_connections_opened_total", &a_mtls),
        Some(3),
        "{a_metrics}"
    );

    // 2. A refuses a server presenting another identity than the endpoint's.
    let reply = exchange(connect_from(APP, vip(102)), b"to-impostor");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(strict_peers.lock().len(), 3, "nothing reached the app");
    let a_metrics = a.scrape();
    assert_eq!(
        sample(
            &a_metrics,
            "istio_tcp_connections_opened_total",
            &[
                "destination_service=\"impostor.shop.svc.cluster.local\"",
                "response_flags=\"UF\""
            ]
        ),
        Some(1),
        "{a_metrics}"
    );
    assert!(
        a.logs().contains(
            "server presented spiffe://cluster.local/ns/shop/sa/server, expected spiffe://cluster.local/ns/shop/sa/payments"
        ),
        "{}",
        a.logs()
    );

    // 3. STRICT refuses plaintext, and a silent client after the sniff timeout.
    let reply = exchange(connect_from(PEER, strict_app), b"plaintext");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    let mut silent = connect_from(PEER, strict_app);
    let started = Instant::now();
    assert!(matches!(silent.read(&mut [0u8; 8]), Ok(0) | Err(_)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after the sniff timeout"
    );
    assert_eq!(strict_peers.lock().len(), 3, "nothing reached the app");
    let b_metrics = b.scrape();
    assert_eq!(
        sample(
            &b_metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "destination_service=\"orders.shop.svc.cluster.local\"",
                "connection_security_policy=\"none\"",
                "response_flags=\"NR\""
            ]
        ),
        Some(2),
        "{b_metrics}"
    );
    assert!(b.logs().contains("refused (STRICT)"), "{}", b.logs());

    // 4. PERMISSIVE accepts plaintext and mutual TLS.
    let reply = exchange(connect_from(PEER, permissive_app), b"plain");
    assert_eq!(reply, b"plain|bye");
    let reply = exchange(connect_from(APP, vip(101)), b"mesh");
    assert_eq!(reply, b"mesh|bye");
    let b_metrics = b.scrape();
    for policy in ["none", "mutual_tls"] {
        assert_eq!(
            sample(
                &b_metrics,
                "istio_tcp_connections_opened_total",
                &[
                    "destination_service=\"cart.shop.svc.cluster.local\"",
                    &format!("connection_security_policy=\"{policy}\""),
                    "response_flags=\"-\""
                ]
            ),
            Some(1),
            "{policy}: {b_metrics}"
        );
    }

    // 5. DISABLE passes plaintext, and mesh TLS bytes untouched to the application.
    let reply = exchange(connect_from(PEER, disable_app), b"plain");
    assert_eq!(reply, b"plain|bye");
    let hello = mesh_client_hello();
    let reply = exchange(connect_from(PEER, disable_app), &hello);
    assert_eq!(reply, [hello.as_slice(), b"|bye"].concat());

    // 6. A non-meshed endpoint gets plain TCP, not through B.
    let taps_before = wires.lock().len();
    let reply = exchange(connect_from(APP, vip(103)), b"legacy");
    assert_eq!(reply, b"legacy|bye");
    assert_eq!(wires.lock().len(), taps_before);
    assert_eq!(legacy_peers.lock().len(), 1);

    // 7. No ready endpoint: closed, counted UH.
    let reply = exchange(connect_from(APP, vip(104)), b"anyone?");
    assert!(reply.is_empty());
    let a_metrics = a.scrape();
    let legacy = [
        "destination_service=\"legacy.shop.svc.cluster.local\"",
        "connection_security_policy=\"none\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        sample(&a_metrics, "istio_tcp_connections_opened_total", &legacy),
        Some(1),
        "{a_metrics}"
    );
    let down = [
        "destination_service=\"down.shop.svc.cluster.local\"",
        "response_flags=\"UH\"",
    ];
    assert_eq!(
        sample(&a_metrics, "istio_tcp_connections_opened_total", &down),
        Some(1),
        "{a_metrics}"
    );
}
