//! DestinationRule behaviour towards the endpoints of a cluster, through the real
//! `trellis-proxy` binary in static mode inside a private network namespace whose capture rule
//! sends the client application's connections (from 127.0.0.5) to the proxy's outbound listener
//! (15001). The backends are demo servers (`trellis-demo`) on their own loopback addresses, each
//! answering with its own version, so a response names the endpoint that served it.
//!
//! ```text
//! client (127.0.0.5) ─REDIRECT→ proxy:15001 ─→ endpoint 127.0.0.3x:7400 (demo server)
//! ```
//!
//! TLS origination has HTTPS servers of its own (127.0.0.50-51:7443) with certificates from a
//! CA made in the test: the application still sends plain HTTP.
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{APP, MeshCa, Ports, Proxy, h1, runtime};
use trellis_demo::body::{BoxBody, empty, full};
use trellis_demo::control::Controls;
use trellis_demo::server::{Identity, ServerState};

const INSIDE: &str = "TRELLIS_PROXY_EXTERNAL_TEST_IN_NETNS";
const HTTP_PORT: u16 = 7400;
const STICKY: &str = "sticky.shop.svc.cluster.local";
/// ServiceEntry hosts resolved by DNS: `localhost` (the backend on 127.0.0.1) by each mode, and
/// a name no resolver answers.
const BY_DNS: &str = "api.dns.test";
const BY_DNS_ROUND_ROBIN: &str = "api.dns-rr.test";
const UNRESOLVABLE: &str = "api.unresolvable.test";
/// The last octets of the sticky service's endpoints.
const STICKY_ENDPOINTS: [u8; 4] = [31, 32, 33, 34];
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the test inside a fresh network namespace with the client's capture rule.
fn in_netns() -> bool {
    support::in_netns(
        INSIDE,
        &[&["-s", APP, "-j", "REDIRECT", "--to-ports", "15001"]],
    )
}

fn vip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// A service balanced by a consistent hash on the `session` cookie, generated when missing, and
/// ServiceEntry services resolved by DNS (VIPs 127.0.0.14x).
fn config() -> String {
    let endpoints: Vec<serde_json::Value> = STICKY_ENDPOINTS
        .iter()
        .map(|last| {
            serde_json::json!({"address": format!("127.0.0.{last}"), "ready": true,
                               "meshed": false, "labels": {}})
        })
        .collect();
    let external = |host: &str, vip: &str| {
        serde_json::json!({
            "hostnames": [host], "namespace": "shop", "vips": [vip],
            "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "http"}],
            "endpoints": [],
        })
    };
    let services = serde_json::json!([{
        "hostnames": [STICKY], "namespace": "shop", "vips": ["127.0.0.130"],
        "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "http"}],
        "endpoints": endpoints,
    }, external(BY_DNS, "127.0.0.140"), external(BY_DNS_ROUND_ROBIN, "127.0.0.141"),
       external(UNRESOLVABLE, "127.0.0.142")]);
    let resolved = |host: &str, resolution: &str, name: &str| {
        serde_json::json!({"host": host, "location": "MESH_EXTERNAL", "resolution": resolution,
                           "dnsEndpoints": [{"address": name}]})
    };
    let external_services = serde_json::json!([
        resolved(BY_DNS, "DNS", "localhost"),
        resolved(BY_DNS_ROUND_ROBIN, "DNS_ROUND_ROBIN", "localhost"),
        resolved(UNRESOLVABLE, "DNS", "unresolvable.invalid"),
    ]);
    let clusters = serde_json::json!([{
        "host": STICKY, "port": 0,
        "lb": {"consistentHash": {
            "key": {"cookie": {"name": "session", "path": "/", "ttlMs": 3_600_000}},
            "ringSize": 1024
        }}
    }]);
    serde_json::json!({"version": "external-1", "services": services,
                       "traffic": {"routes": [], "clusters": clusters,
                                   "externalServices": external_services}})
    .to_string()
}

async fn start_backends() {
    // 127.0.0.1: where `localhost` resolves.
    for last in STICKY_ENDPOINTS.into_iter().chain([1]) {
        let identity = Identity {
            name: "backend".into(),
            version: format!("e{last}"),
            namespace: "shop".into(),
            pod: format!("sticky-{last}"),
        };
        let state =
            Arc::new(ServerState::new(identity, true).with_default_controls(Controls::default()));
        let listener = tokio::net::TcpListener::bind(vip(last, HTTP_PORT))
            .await
            .unwrap();
        tokio::spawn(trellis_demo::server::serve_http(
            listener,
            state,
            std::future::pending(),
            Duration::from_secs(1),
        ));
    }
}

fn start_proxy() -> Proxy {
    start_proxy_with(&config())
}

fn start_proxy_with(config: &str) -> Proxy {
    let mut ports = Ports::free();
    ports.outbound = 15001;
    let mut proxy = Proxy::with_config(ports, config, &[]);
    proxy.wait_ready();
    proxy
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

/// Sends a plain-HTTP GET for `host` with `cookie` (if any).
async fn request(
    sender: &mut http1::SendRequest<BoxBody>,
    host: &str,
    cookie: Option<&str>,
) -> Answer {
    let mut request = Request::get("/").header("host", host);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    sender.ready().await.unwrap();
    let response = sender
        .send_request(request.body(empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The serving endpoint's version, from the demo server's JSON.
fn served_by(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    json["version"].as_str().unwrap().to_owned()
}

/// Sends a GET to the sticky service with `cookie` (if any); returns the serving endpoint's
/// version and the `Set-Cookie` headers of the response.
async fn get(
    sender: &mut http1::SendRequest<BoxBody>,
    cookie: Option<&str>,
) -> (String, Vec<String>) {
    let answer = request(sender, STICKY, cookie).await;
    let version = served_by(&answer);
    let parts = answer;
    let set_cookies = parts
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    (version, set_cookies)
}

async fn cookie_stickiness() {
    let mut client = h1(vip(130, 80)).await;
    let mut first_endpoints = BTreeSet::new();
    // Ten clients without the cookie: each is given one, then sticks to one endpoint.
    for _ in 0..10 {
        let (first, set_cookies) = get(&mut client, None).await;
        first_endpoints.insert(first.clone());
        assert_eq!(set_cookies.len(), 1, "{set_cookies:?}");
        let set_cookie = &set_cookies[0];
        let (pair, attributes) = set_cookie.split_once(';').unwrap();
        assert_eq!(
            attributes, " Path=/; Max-Age=3600; HttpOnly",
            "{set_cookie}"
        );
        assert!(pair.starts_with("session="), "{set_cookie}");
        for _ in 0..20 {
            let (served, set_cookies) = get(&mut client, Some(pair)).await;
            assert_eq!(served, first, "{pair} moved");
            assert!(
                set_cookies.is_empty(),
                "cookie sent, none set: {set_cookies:?}"
            );
        }
    }
    // Generated values spread clients over the endpoints (10 clients on one of 4 endpoints has
    // probability 4 · 0.25^10 ≈ 4e-6).
    assert!(first_endpoints.len() > 1, "{first_endpoints:?}");
}

#[test]
fn consistent_hash_cookie_is_generated_and_sticks() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    runtime.block_on(start_backends());
    let proxy = start_proxy();
    let run = runtime.block_on(async { tokio::time::timeout(TIMEOUT, cookie_stickiness()).await });
    assert!(run.is_ok(), "timed out\n{}", proxy.logs());
}

async fn dns_resolution() {
    // The proxy resolves the names at start, in the background: wait for the first answer.
    let mut client = h1(vip(140, 80)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = request(&mut client, BY_DNS, None).await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{:?}",
            answer.body
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "localhost never resolved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both modes reach the backend `localhost` names, on every request.
    for (host, vip_last) in [(BY_DNS, 140), (BY_DNS_ROUND_ROBIN, 141)] {
        let mut client = h1(vip(vip_last, 80)).await;
        for _ in 0..20 {
            assert_eq!(
                served_by(&request(&mut client, host, None).await),
                "e1",
                "{host}"
            );
        }
    }
    // A name without an answer: no endpoint, the proxy's own 503 UH.
    let mut client = h1(vip(142, 80)).await;
    let answer = request(&mut client, UNRESOLVABLE, None).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer
            .headers
            .get("x-trellis-reason")
            .map(|v| v.to_str().unwrap()),
        Some("no_healthy_upstream")
    );
}

#[test]
fn service_entries_resolved_by_dns_reach_the_answer() {
    if !in_netns() {
        return;
    }
    let runtime = runtime();
    runtime.block_on(start_backends());
    let proxy = start_proxy();
    let run = runtime.block_on(async { tokio::time::timeout(TIMEOUT, dns_resolution()).await });
    assert!(run.is_ok(), "timed out\n{}", proxy.logs());
    let logs = proxy.logs();
    assert!(logs.contains("DNS answer changed"), "{logs}");
    assert!(
        logs.contains("no DNS answer yet for unresolvable.invalid"),
        "{logs}"
    );
    let flags: Vec<String> = proxy
        .access_log()
        .iter()
        .filter(|l| l["authority"] == UNRESOLVABLE)
        .map(|l| l["response_flags"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(flags, ["UH"], "{logs}");
}

const TLS_PORT: u16 = 7443;

/// Services whose DestinationRules originate TLS to the HTTPS servers (VIPs 127.0.0.15x).
fn tls_config(ca: &str, (client_cert, client_key): (&str, &str)) -> String {
    let service = |name: &str, vip: u8, endpoint: u8| {
        serde_json::json!({
            "hostnames": [format!("{name}.ext.test")], "namespace": "shop",
            "vips": [format!("127.0.0.{vip}")],
            "ports": [{"name": "http", "port": 80, "targetPort": TLS_PORT, "protocol": "http"}],
            "endpoints": [{"address": format!("127.0.0.{endpoint}"), "ready": true,
                           "meshed": false}],
        })
    };
    let services = serde_json::json!([
        service("secure", 150, 50),
        service("mismatch", 151, 50),
        service("mutual", 152, 51),
        service("nocert", 153, 51),
    ]);
    let cluster = |name: &str, tls: serde_json::Value| serde_json::json!({"host": format!("{name}.ext.test"), "port": 0, "tls": tls});
    // Sorted by host, as the proxy's lookup tables must be.
    let clusters = serde_json::json!([
        cluster(
            "mismatch",
            serde_json::json!({"mode": "SIMPLE", "caCertificates": ca,
                                               "subjectAltNames": ["other.ext.test"]})
        ),
        cluster(
            "mutual",
            serde_json::json!({"mode": "MUTUAL", "caCertificates": ca,
                                             "clientCertificate": client_cert,
                                             "privateKey": client_key})
        ),
        cluster(
            "nocert",
            serde_json::json!({"mode": "SIMPLE", "caCertificates": ca})
        ),
        cluster(
            "secure",
            serde_json::json!({"mode": "SIMPLE", "caCertificates": ca})
        ),
    ]);
    serde_json::json!({"version": "external-tls-1", "services": services,
                       "traffic": {"routes": [], "clusters": clusters}})
    .to_string()
}

fn certificates(path: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// An HTTPS server on `addr`; with `client_ca`, it requires a client certificate signed by it.
/// Answers every request with what its TLS connection saw: the SNI and the client's chain.
async fn https_server(addr: SocketAddr, (chain, key): (String, String), client_ca: Option<&str>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca) {
                roots.add(cert).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            certificates(&chain),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, connection) = tls.get_ref();
                let seen = format!(
                    "tls sni={} client_certs={}",
                    connection.server_name().unwrap_or("-"),
                    connection.peer_certificates().map_or(0, <[_]>::len)
                );
                let service = hyper::service::service_fn(move |_| {
                    let seen = seen.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(seen))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

async fn tls_origination(proxy_logs: impl Fn() -> String) {
    // Ok: the server's answer (what its TLS connection saw); Err: the proxy's 503 reason.
    let cases: [(&str, u8, Result<&str, &str>); 4] = [
        // SIMPLE: the server sees TLS with the host as SNI; the application sent plain HTTP.
        ("secure", 150, Ok("tls sni=secure.ext.test client_certs=0")),
        // The certificate is valid for the host but not for the required subjectAltNames.
        ("mismatch", 151, Err("upstream_connect_failure")),
        // MUTUAL: the server demands a client certificate and gets one.
        ("mutual", 152, Ok("tls sni=mutual.ext.test client_certs=1")),
        // SIMPLE to the server that demands a client certificate: refused. TLS 1.3 completes
        // the client's side of the handshake before the server checks, so the refusal arrives
        // as a reset of the connection.
        ("nocert", 153, Err("upstream_reset")),
    ];
    for (name, vip_last, expected) in cases {
        let host = format!("{name}.ext.test");
        let mut client = h1(vip(vip_last, 80)).await;
        let answer = request(&mut client, &host, None).await;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        let reason = answer
            .headers
            .get("x-trellis-reason")
            .map(|v| v.to_str().unwrap().to_owned());
        let got = if answer.status == StatusCode::OK {
            Ok(text.as_str())
        } else {
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{host}: {text}"
            );
            Err(reason.as_deref().unwrap_or("-"))
        };
        assert_eq!(got, expected, "{host}\n{}", proxy_logs());
    }
}

/// A CA made for the test, and the file holding its certificate.
fn test_ca() -> (MeshCa, String) {
    let ca = MeshCa::new("external test CA");
    let ca_file = support::temp_path("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    (ca, ca_file.to_str().unwrap().to_owned())
}

#[test]
fn destination_rule_tls_originates_tls_to_plain_http_requests() {
    if !in_netns() {
        return;
    }
    let (ca, ca_file) = test_ca();
    let client = ca.dns_files(&["client.shop.test"]);
    let runtime = runtime();
    runtime.block_on(async {
        let simple = ca.dns_files(&["secure.ext.test", "mismatch.ext.test"]);
        https_server(vip(50, TLS_PORT), simple, None).await;
        let mutual = ca.dns_files(&["mutual.ext.test", "nocert.ext.test"]);
        https_server(vip(51, TLS_PORT), mutual, Some(&ca_file)).await;
    });
    let proxy = start_proxy_with(&tls_config(&ca_file, (&client.0, &client.1)));
    let run = runtime
        .block_on(async { tokio::time::timeout(TIMEOUT, tls_origination(|| proxy.logs())).await });
    assert!(run.is_ok(), "timed out\n{}", proxy.logs());
    let logs = proxy.logs();
    assert!(
        logs.contains("TLS origination to 127.0.0.50:7443"),
        "{logs}"
    );
}

/// A registry of names only, under `REGISTRY_ONLY`: ServiceEntry hosts without addresses (found
/// by HTTP authority or TLS server name on the dialled port; one resolved by DNS to `localhost`,
/// a wildcard with `resolution: NONE`), and a TCP port whose DestinationRule originates TLS.
fn registry_config(ca: &str) -> String {
    let by_name = |host: &str, port: &str, number: u16| {
        serde_json::json!({
            "hostnames": [host], "namespace": "egress", "vips": [],
            "ports": [{"name": port, "port": number, "targetPort": number, "protocol": port}],
            "endpoints": [],
        })
    };
    let services = serde_json::json!([
        by_name(BY_NAME, "http", HTTP_PORT),
        by_name(ORIGINAL_WILDCARD, "http", HTTP_PORT),
        by_name(TLS_BY_NAME, "tls", TLS_PORT),
        {
            "hostnames": [TCP_ORIGINATED], "namespace": "egress", "vips": ["127.0.0.154"],
            "ports": [{"name": "tcp", "port": 9000, "targetPort": TLS_PORT, "protocol": "tcp"}],
            "endpoints": [{"address": "127.0.0.52", "ready": true, "meshed": false}],
        },
    ]);
    let external = |host: &str, resolution: &str, names: &[&str]| {
        let names: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"address": n}))
            .collect();
        serde_json::json!({"host": host, "location": "MESH_EXTERNAL", "resolution": resolution,
                           "dnsEndpoints": names})
    };
    let external_services = serde_json::json!([
        external(BY_NAME, "DNS", &["localhost"]),
        external(ORIGINAL_WILDCARD, "NONE", &[]),
        external(TLS_BY_NAME, "DNS", &["localhost"]),
        external(TCP_ORIGINATED, "STATIC", &[]),
    ]);
    let clusters = serde_json::json!([{"host": TCP_ORIGINATED, "port": 0,
                                       "tls": {"mode": "SIMPLE", "caCertificates": ca}}]);
    serde_json::json!({"version": "registry-1", "outboundTrafficPolicy": "REGISTRY_ONLY",
                       "services": services,
                       "traffic": {"routes": [], "clusters": clusters,
                                   "externalServices": external_services}})
    .to_string()
}

const BY_NAME: &str = "api.by-name.test";
const ORIGINAL_WILDCARD: &str = "*.original.test";
const TLS_BY_NAME: &str = "tls.by-name.test";
const TCP_ORIGINATED: &str = "db.ext.test";
/// An address no service has and nothing listens on.
const NOWHERE: u8 = 9;

/// A GET over TLS the application makes itself to `dst`, naming `server_name` (SNI and Host)
/// and trusting `ca_file`.
async fn https_get(dst: SocketAddr, server_name: &str, ca_file: &str) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_file) {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, support::app_connection(dst))
        .await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", server_name)
        .body(empty())?;
    let body = sender.send_request(request).await?.into_body();
    Ok(String::from_utf8_lossy(&body.collect().await?.to_bytes()).into_owned())
}

async fn registry_by_name(ca_file: &str) {
    // `localhost` is resolved in the background: wait for the first answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut client = h1(vip(NOWHERE, HTTP_PORT)).await;
    loop {
        let answer = request(&mut client, BY_NAME, None).await;
        if answer.status == StatusCode::OK {
            // Found by its authority although the address dialled is no service's.
            assert_eq!(served_by(&answer), "e1");
            break;
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(tokio::time::Instant::now() < deadline, "never resolved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `resolution: NONE` under a wildcard: where the application sent it.
    let mut client = h1(vip(33, HTTP_PORT)).await;
    let answer = request(&mut client, "www.original.test", None).await;
    assert_eq!(served_by(&answer), "e33");

    // Outside the registry: the proxy's own 502 with its reason, whether or not something
    // listens at the address.
    for dialled in [NOWHERE, 33] {
        let mut client = h1(vip(dialled, HTTP_PORT)).await;
        let answer = request(&mut client, "unknown.test", None).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{:?}", answer.body);
        assert_eq!(answer.headers["x-trellis-reason"], "not_in_registry");
        // The same name on a port it does not have is outside too.
        let mut client = h1(vip(dialled, 7401)).await;
        let answer = request(&mut client, BY_NAME, None).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{:?}", answer.body);
    }

    // TLS the application makes itself: found by its server name, relayed untouched.
    let tls_dst = vip(NOWHERE, TLS_PORT);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        match https_get(tls_dst, TLS_BY_NAME, ca_file).await {
            Ok(seen) => break seen,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("TLS to {TLS_BY_NAME} never passed: {e:#}"),
        }
    };
    assert_eq!(seen, "tls sni=tls.by-name.test client_certs=0");
    // A server name outside the registry: the connection is closed.
    let refused = https_get(tls_dst, "other.by-name.test", ca_file).await;
    assert!(refused.is_err(), "{refused:?}");

    // Plain bytes to a TCP port whose DestinationRule says SIMPLE: TLS the proxy originates.
    let mut client = h1(vip(154, 9000)).await;
    let answer = request(&mut client, TCP_ORIGINATED, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "tls sni=db.ext.test client_certs=0");
}

#[test]
fn registry_only_finds_hosts_without_addresses_by_name_and_refuses_the_rest() {
    if !in_netns() {
        return;
    }
    let (ca, ca_file) = test_ca();
    let runtime = runtime();
    runtime.block_on(async {
        start_backends().await;
        // `localhost` for the name found by SNI; 127.0.0.52 for the originated TCP.
        let by_name = ca.dns_files(&[TLS_BY_NAME, "other.by-name.test"]);
        https_server(vip(1, TLS_PORT), by_name, None).await;
        https_server(vip(52, TLS_PORT), ca.dns_files(&[TCP_ORIGINATED]), None).await;
    });
    let proxy = start_proxy_with(&registry_config(&ca_file));
    let run =
        runtime.block_on(async { tokio::time::timeout(TIMEOUT, registry_by_name(&ca_file)).await });
    assert!(run.is_ok(), "timed out\n{}", proxy.logs());
    let logs = proxy.logs();
    assert!(
        logs.contains("request for a host outside the registry refused (REGISTRY_ONLY): 502"),
        "{logs}"
    );
    assert!(
        logs.contains("outbound destination not in the registry, closing (REGISTRY_ONLY)"),
        "{logs}"
    );
    let refused: Vec<(String, String)> = proxy
        .access_log()
        .iter()
        .filter(|l| l["response_code"] == 502)
        .map(|l| {
            (
                l["authority"].as_str().unwrap_or_default().to_owned(),
                l["response_flags"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}\n{logs}");
    assert!(
        refused.iter().all(|(_, flags)| flags == "NR"),
        "{refused:?}"
    );
}
