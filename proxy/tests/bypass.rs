//! The regression suite for the known bypass classes of service meshes, each attempt sent through
//! the real `trellis-proxy` binary (static mode) and each test named by the class it covers:
//! path normalisation (dot segments, merged slashes, encoded unreserved characters, encoded
//! slashes, case, `#` and `?`, `;` path parameters), host normalisation (case, trailing dot,
//! port), repeated header values, forged identity and internal (`x-trellis-*`) headers, an
//! application bound to loopback, `h2c` upgrade smuggling and `CONNECT` tunnels, label values
//! from the wire, plaintext to a STRICT port, and client certificates from another root, another
//! trust domain or past their validity. Every attempt must be refused (`403 RBAC: access
//! denied`, `400 invalid_path`, a closed connection or a failed handshake) or have no effect,
//! and must never reach the application, a recorder that keeps the head of every request it is
//! sent.
//!
//! Each test runs in its own network namespace:
//!
//! ```text
//! client app (127.0.0.5) ─REDIRECT→ A:15001 (outbound, routes) ─→ 127.0.0.20:7300
//!                                     A ─→ 127.0.0.1:7303 (the "direct" service, no sidecar)
//! peer (127.0.0.7) or A ─(dst 127.0.0.20)─REDIRECT→ B:15006 (inbound, policies)
//!     B ─(from 127.0.0.6)→ the application on the pod address 127.0.0.20:<port>
//! ```
//!
//! Case (`/ADMIN`): AuthorizationPolicy path matching is case-sensitive, as in Istio, so a DENY
//! on `/admin*` does not cover `/ADMIN`. The guidance the upper-case test demonstrates: protect
//! a workload that serves paths case-insensitively with an ALLOW list of the paths it serves
//! (`/ADMIN` then matches no ALLOW rule and is denied), and, where a route must catch every
//! spelling, a VirtualService match with `ignoreUriCase: true` (a `directResponse` 403 on prefix
//! `/admin` answers `/ADMIN` too). Without `ignoreUriCase` such a route does not match `/ADMIN`,
//! and only the ALLOW list stops it.
//!
//! Needs root, iproute2 and iptables.

mod support;

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use support::{
    APP, MeshCa, Ports, Proxy, RawReply, echo_server, raw_request, recording_http_app,
    recording_http_app_on, sample,
};

const INSIDE: &str = "TRELLIS_PROXY_BYPASS_TEST_IN_NETNS";
/// A plaintext peer outside the mesh: its connections to B's pod reach B's inbound listener.
const PEER: &str = "127.0.0.7";
/// B's pod address.
const POD_B: &str = "127.0.0.20";
/// The application's port, declared `http`.
const HTTP_PORT: u16 = 7300;
/// The service whose VirtualService matches `/admin` with `ignoreUriCase: true`.
const WEB: &str = "web.shop.svc.cluster.local";
/// The same workload behind a VirtualService matching `/admin` case-sensitively, and the
/// authority [`ADMIN_HOST`].
const WEB_EXACT: &str = "web-exact.shop.svc.cluster.local";
/// A service without a sidecar: its endpoint is [`SCRIPTED_PORT`] on 127.0.0.1, reached by A
/// directly.
const DIRECT: &str = "direct.shop.svc.cluster.local";
/// A port of B's pod that no service declares (its protocol is sniffed).
const UNDECLARED_PORT: u16 = 7302;
/// The scripted application's port ([`scripted_app`]).
const SCRIPTED_PORT: u16 = 7303;
/// An opaque TCP port of B's pod.
const TCP_PORT: u16 = 7304;
/// The host the host-normalisation test denies and routes.
const ADMIN_HOST: &str = "admin.example.com";

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// What the recording application saw: the head of every request.
type Seen = Arc<Mutex<Vec<String>>>;

/// Runs the test `name` inside a fresh network namespace with the capture rules above; returns
/// true when this process is the one inside.
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

/// The static config both sidecars load: two services on B's pod, their VirtualServices, and
/// B's PeerAuthentication `mode` and AuthorizationPolicies. With a CA the endpoint is meshed
/// (mutual TLS between the sidecars, verified against the CA's root).
fn config(mode: &str, authorization: Value, ca: Option<&MeshCa>) -> String {
    let endpoint = match ca {
        Some(_) => json!({"address": POD_B, "ready": true, "meshed": true, "identity": SERVER_ID}),
        None => json!({"address": POD_B, "ready": true, "meshed": false}),
    };
    let service = |host: &str, vip: &str, target_port: u16, endpoint: &Value| {
        json!({"hostnames": [host], "namespace": "shop", "vips": [vip],
               "ports": [{"name": "http", "port": 80, "targetPort": target_port, "protocol": "http"}],
               "endpoints": [endpoint]})
    };
    let admin_is_internal = json!({"directResponse": {"status": 403,
                                                      "body": {"string": "admin is internal"}}});
    let routes = json!([
        // Sorted by host, as the proxy's route tables must be.
        {"host": WEB_EXACT, "port": 80, "http": [
            {"matches": [{"uri": {"prefix": "/admin"}}], "action": admin_is_internal},
            {"matches": [{"authority": {"exact": ADMIN_HOST}}], "action": admin_is_internal},
            {"action": {"route": [{"host": WEB_EXACT, "subset": "", "weight": 100}]}}
        ]},
        {"host": WEB, "port": 80, "http": [
            {"matches": [{"uri": {"prefix": "/admin"}, "ignoreUriCase": true}],
             "action": admin_is_internal},
            {"action": {"route": [{"host": WEB, "subset": "", "weight": 100}]}}
        ]}
    ]);
    let mut config = json!({
        "version": "bypass-1",
        "services": [
            service(WEB, "127.0.0.100", HTTP_PORT, &endpoint),
            service(WEB_EXACT, "127.0.0.101", HTTP_PORT, &endpoint),
            service(DIRECT, "127.0.0.102", SCRIPTED_PORT,
                    &json!({"address": "127.0.0.1", "ready": true, "meshed": false})),
        ],
        "traffic": {"routes": routes, "clusters": []},
        "inbound": {"mtlsMode": mode, "authorization": authorization},
    });
    if let Some(ca) = ca {
        config["trustBundle"] = json!([ca.pem]);
    }
    config.to_string()
}

/// B, the server's sidecar, on the inbound port the capture rule targets.
fn server(config: &str, certs: Option<&(String, String)>) -> Proxy {
    let mut ports = Ports::free();
    ports.inbound = 15006;
    let mut b = Proxy::with_config_and_env(
        ports,
        config,
        &cert_args(certs),
        &[
            ("POD_NAME", "web-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "web"),
            ("WORKLOAD_NAME", "web"),
        ],
    );
    b.wait_ready();
    b
}

/// A, the client's sidecar, on the outbound port the capture rule targets.
fn client(config: &str, certs: Option<&(String, String)>) -> Proxy {
    let mut ports = Ports::free();
    ports.outbound = 15001;
    let mut a = Proxy::with_config(ports, config, &cert_args(certs));
    a.wait_ready();
    a
}

fn cert_args(certs: Option<&(String, String)>) -> Vec<&str> {
    match certs {
        Some((chain, key)) => vec!["--cert-chain", chain, "--key", key],
        None => Vec::new(),
    }
}

fn pod_b() -> SocketAddr {
    SocketAddr::new(POD_B.parse().unwrap(), HTTP_PORT)
}

fn vip(last: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], 80))
}

/// A `GET target` from `source` to `dst` with `host` and extra header lines, sent raw.
fn get(source: &str, dst: SocketAddr, host: &str, target: &str, headers: &[&str]) -> RawReply {
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    raw_request(
        source,
        dst,
        &format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"),
    )
}

/// A request from the plaintext peer straight to B.
fn from_peer(target: &str, headers: &[&str]) -> RawReply {
    get(PEER, pod_b(), WEB, target, headers)
}

fn deny_admin() -> Value {
    json!({"deny": [{"name": "shop.deny-admin",
                     "rules": [{"to": [{"paths": [{"prefix": "/admin"}]}]}]}]})
}

#[track_caller]
fn assert_rbac_denied(class: &str, target: &str, reply: &RawReply, proxy: &Proxy) {
    assert_eq!(
        (reply.status, reply.body.trim_end()),
        (403, "RBAC: access denied"),
        "{class}: GET {target} was not denied\n{}",
        proxy.logs()
    );
}

#[track_caller]
fn assert_never_reached(class: &str, seen: &Seen, forbidden: &str) {
    let seen = seen.lock();
    assert!(
        !seen.iter().any(|head| head.contains(forbidden)),
        "{class}: the application saw a request for {forbidden}: {seen:?}"
    );
}

/// Each target is `/admin...` once normalised: the DENY on `/admin*` must refuse every one, and
/// a harmless request must still go through (so the refusals are the policy's, not an outage).
fn deny_admin_refuses(class: &str, targets: &[&str]) {
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config("PERMISSIVE", deny_admin(), None), None);
    let control = from_peer("/public/page", &[]);
    assert_eq!(
        control.status,
        200,
        "{class}: control request\n{}",
        b.logs()
    );
    assert!(control.body.starts_with("GET /public/page HTTP/1.1"));
    for target in targets {
        let reply = from_peer(target, &[]);
        assert_rbac_denied(class, target, &reply, &b);
        assert_eq!(reply.header("x-trellis-reason"), Some("rbac_access_denied"));
    }
    assert_eq!(seen.lock().len(), 1, "{class}: only the control");
    assert_never_reached(class, &seen, "admin");
    assert_eq!(
        sample(
            &b.scrape(),
            "trellis_authorization_denied_total",
            &["policy=\"shop.deny-admin\""]
        ),
        Some(targets.len() as u64),
        "{class}"
    );
}

#[test]
fn path_dot_segments_cannot_reach_a_denied_path() {
    if !in_netns() {
        return;
    }
    deny_admin_refuses(
        "dot segments",
        &[
            "/public/../admin",
            "/./admin",
            "/admin/users/..",
            "/public/%2e%2e/admin/users",
            "/public/%2E%2E/%2E/admin",
            "/../../admin",
        ],
    );
}

#[test]
fn merged_slashes_cannot_reach_a_denied_path() {
    if !in_netns() {
        return;
    }
    deny_admin_refuses(
        "merged slashes",
        &["//admin", "///admin/users", "/public//..//admin"],
    );
}

#[test]
fn percent_encoded_unreserved_characters_cannot_reach_a_denied_path() {
    if !in_netns() {
        return;
    }
    deny_admin_refuses(
        "percent-encoded unreserved characters",
        &["/%61dmin", "/%61%64%6D%69%6E/users", "/adm%69n"],
    );
}

#[test]
fn encoded_slash_is_rejected() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config("PERMISSIVE", deny_admin(), None), None);
    for target in [
        "/admin%2Fusers",
        "/admin%2fusers",
        "/public%2F..%2Fadmin",
        "/public%5C..%5Cadmin",
        "/public\\..\\admin",
    ] {
        let reply = from_peer(target, &[]);
        assert_eq!(reply.status, 400, "GET {target}\n{}", b.logs());
        assert_eq!(
            reply.header("x-trellis-reason"),
            Some("invalid_path"),
            "GET {target}"
        );
    }
    assert!(seen.lock().is_empty(), "{:?}", seen.lock());
}

#[test]
fn upper_case_path_is_refused_by_an_allow_list_and_an_ignore_uri_case_route() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let allow_public = json!({"allow": [{"name": "shop.allow-public",
                     "rules": [{"to": [{"paths": [{"prefix": "/public"}]}]}]}]});
    let config = config("PERMISSIVE", allow_public, None);
    let b = server(&config, None);
    let a = client(&config, None);

    // (a) The ALLOW list: /ADMIN is not /public*, so it is denied; /public passes.
    assert_eq!(from_peer("/public/x", &[]).status, 200, "{}", b.logs());
    for target in ["/ADMIN", "/Admin/users", "/%41DMIN"] {
        assert_rbac_denied(
            "upper case, ALLOW list",
            target,
            &from_peer(target, &[]),
            &b,
        );
    }

    // (b) The VirtualService with `ignoreUriCase: true` answers every spelling itself.
    for target in ["/admin", "/ADMIN", "/aDmIn/users"] {
        let reply = get(APP, vip(100), WEB, target, &[]);
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (403, "admin is internal"),
            "upper case, ignoreUriCase route: GET {target}\n{}",
            a.logs()
        );
        assert_eq!(reply.header("x-trellis-reason"), Some("direct_response"));
    }

    // (c) Without `ignoreUriCase` the route matches /admin only: /ADMIN goes on to B, whose
    //     ALLOW list still refuses it.
    let reply = get(APP, vip(101), WEB_EXACT, "/admin", &[]);
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (403, "admin is internal")
    );
    let reply = get(APP, vip(101), WEB_EXACT, "/ADMIN", &[]);
    assert_rbac_denied("upper case, case-sensitive route", "/ADMIN", &reply, &a);
    // B's reason does not cross the plaintext hop: A cannot tell B from any other upstream.
    assert_eq!(reply.header("x-trellis-reason"), None);
    assert_eq!(
        sample(
            &b.scrape(),
            "trellis_authorization_denied_total",
            &["policy=\"none\""]
        ),
        Some(4),
        "three from the peer, one through A"
    );
    let reply = get(APP, vip(101), WEB_EXACT, "/public/y", &[]);
    assert_eq!(reply.status, 200, "{}", a.logs());

    assert_eq!(seen.lock().len(), 2, "{:?}", seen.lock());
    assert_never_reached("upper case", &seen, "dmin");
    assert_never_reached("upper case", &seen, "DMIN");
}

#[test]
fn fragment_and_query_cannot_dodge_a_denied_path() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config("PERMISSIVE", deny_admin(), None), None);
    // A raw `#` is either refused or cut off with everything after it; either way what is left
    // is /admin, so it must not pass.
    for target in ["/admin#x", "/admin#/../public", "/public/..%2F#/admin"] {
        let reply = from_peer(target, &[]);
        assert!(
            matches!(reply.status, 400 | 403),
            "fragment: GET {target} answered {reply:?}\n{}",
            b.logs()
        );
    }
    // The query is not part of the path: the DENY sees /admin.
    for target in [
        "/admin?x",
        "/admin?x=/public",
        "/admin/?",
        "/%61dmin?/public",
    ] {
        assert_rbac_denied("query", target, &from_peer(target, &[]), &b);
    }
    assert!(seen.lock().is_empty(), "{:?}", seen.lock());
}

#[test]
fn repeated_header_values_cannot_dodge_a_deny() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let deny_mallory = json!({"deny": [{"name": "shop.deny-mallory", "rules": [{"when": [
        {"key": "requestHeader", "name": "x-user", "values": [{"exact": "mallory"}]}]}]}]});
    let b = server(&config("PERMISSIVE", deny_mallory, None), None);
    let alice = from_peer("/alice", &["x-user: alice"]);
    assert_eq!(alice.status, 200, "{}", b.logs());
    for (target, headers) in [
        ("/mallory", ["x-user: mallory", "x-user: mallory"]),
        ("/alice-then-mallory", ["x-user: alice", "x-user: mallory"]),
        ("/mallory-then-alice", ["x-user: mallory", "x-user: alice"]),
        ("/mixed-case-name", ["X-User: alice", "x-USER: mallory"]),
    ] {
        assert_rbac_denied(
            "repeated header values",
            target,
            &from_peer(target, &headers),
            &b,
        );
    }
    assert_eq!(seen.lock().len(), 1, "{:?}", seen.lock());
    assert_never_reached("repeated header values", &seen, "mallory");
}

#[test]
fn forged_identity_headers_do_not_grant_a_principal() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    let intruder = ca.workload_files("spiffe://cluster.local/ns/demo/sa/intruder");
    let b_certs = ca.workload_files(SERVER_ID);
    // Only the client principal may reach anything but /whoami.
    let allow_client = json!({"allow": [{"name": "shop.allow-client", "rules": [
        {"from": [{"principals": [{"exact": "cluster.local/ns/demo/sa/client"}]}]},
        {"to": [{"paths": [{"exact": "/whoami"}]}]}]}]});
    let config = config("PERMISSIVE", allow_client, Some(&ca));
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config, Some(&b_certs));
    let a = client(&config, Some(&intruder));
    let forged = format!("x-forwarded-client-cert: By={SERVER_ID};URI={CLIENT_ID}");
    let forged_bare = format!("x-forwarded-client-cert: URI={CLIENT_ID}");

    // A plaintext peer (no principal at all) and a mesh peer with another identity both claim
    // the client's identity in the header.
    for headers in [[forged.as_str()], [forged_bare.as_str()]] {
        let reply = from_peer("/secret", &headers);
        assert_rbac_denied("forged identity, plaintext", "/secret", &reply, &b);
        let reply = get(APP, vip(100), WEB, "/secret", &headers);
        assert_rbac_denied("forged identity, mutual TLS", "/secret", &reply, &a);
    }
    assert!(seen.lock().is_empty(), "{:?}", seen.lock());

    // What the application is told is the verified certificate's identity, never the header's.
    let reply = get(APP, vip(100), WEB, "/whoami", &[forged.as_str()]);
    assert_eq!(reply.status, 200, "{}\n{}", a.logs(), b.logs());
    let xfcc: Vec<&str> = reply
        .body
        .lines()
        .filter(|l| {
            l.to_ascii_lowercase()
                .starts_with("x-forwarded-client-cert:")
        })
        .collect();
    assert_eq!(
        xfcc,
        [format!(
            "x-forwarded-client-cert: By={SERVER_ID};URI=spiffe://cluster.local/ns/demo/sa/intruder"
        )
        .as_str()],
        "{}",
        reply.body
    );
    let reply = from_peer("/whoami", &[forged.as_str()]);
    assert_eq!(reply.status, 200);
    assert!(
        !reply
            .body
            .to_ascii_lowercase()
            .contains("x-forwarded-client-cert"),
        "a plaintext peer's header is removed: {}",
        reply.body
    );
}

#[test]
fn plaintext_to_strict_port_is_refused() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    let b_certs = ca.workload_files(SERVER_ID);
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config("STRICT", json!({}), Some(&ca)), Some(&b_certs));
    for target in ["/", "/public/x"] {
        let reply = from_peer(target, &[]);
        assert_eq!(reply.status, 0, "plaintext to STRICT: {reply:?}");
        assert!(reply.body.is_empty());
    }
    // Nor any other plaintext protocol.
    let reply = raw_request(PEER, pod_b(), "hello\r\n");
    assert_eq!(reply.status, 0);
    assert!(seen.lock().is_empty(), "{:?}", seen.lock());
    assert_eq!(
        sample(
            &b.scrape(),
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "connection_security_policy=\"none\"",
                "response_flags=\"NR\""
            ]
        ),
        Some(3),
        "{}",
        b.logs()
    );
    assert!(b.logs().contains("refused (STRICT)"), "{}", b.logs());
}

/// A client sidecar with `client_certs` calls B (STRICT, trusting `ca`'s root only): B must
/// refuse the handshake, count it, and the application must see nothing. A control call from a
/// client with a good certificate proves the same path works.
fn strict_server_refuses_the_client_certificate(
    class: &str,
    ca: &MeshCa,
    client_certs: &(String, String),
) {
    let b_certs = ca.workload_files(SERVER_ID);
    let config = config("STRICT", json!({}), Some(ca));
    let seen = recording_http_app(HTTP_PORT);
    let b = server(&config, Some(&b_certs));
    {
        let good = ca.workload_files(CLIENT_ID);
        let a = client(&config, Some(&good));
        let reply = get(APP, vip(100), WEB, "/control", &[]);
        assert_eq!(reply.status, 200, "{class}: control\n{}", a.logs());
    }
    let a = client(&config, Some(client_certs));
    let reply = get(APP, vip(100), WEB, "/attack", &[]);
    assert!(
        reply.status != 200 && !reply.body.contains("/attack"),
        "{class}: {reply:?}\nA:\n{}\nB:\n{}",
        a.logs(),
        b.logs()
    );
    assert_eq!(seen.lock().len(), 1, "{class}: only the control");
    assert_never_reached(class, &seen, "/attack");
    let refused = sample(
        &b.scrape(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"DPE\"",
        ],
    );
    assert!(
        refused.is_some_and(|n| n >= 1),
        "{class}: the refused handshake is counted: {refused:?}\n{}",
        b.scrape()
    );
    assert!(
        b.logs().contains("mesh mutual TLS handshake failed"),
        "{class}: {}",
        b.logs()
    );
}

#[test]
fn certificate_from_another_root_is_refused() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    let other = MeshCa::new("another root");
    strict_server_refuses_the_client_certificate(
        "another root",
        &ca,
        &other.workload_files(CLIENT_ID),
    );
}

#[test]
fn certificate_from_another_trust_domain_is_refused() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    strict_server_refuses_the_client_certificate(
        "another trust domain",
        &ca,
        &ca.workload_files("spiffe://evil.example/ns/demo/sa/client"),
    );
}

#[test]
fn expired_certificate_is_refused() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    let now = time::OffsetDateTime::now_utc();
    strict_server_refuses_the_client_certificate(
        "expired certificate",
        &ca,
        &ca.workload_files_valid(
            CLIENT_ID,
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        ),
    );
}

/// An HTTP/1.1 application on every address, port `port`, answering each request as it asks:
/// the status in `x-reply-status` (200 without one) and each `x-reply-header: <name>: <value>`
/// as a response header, with a short body. Returns the heads it saw.
fn scripted_app(port: u16) -> Seen {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut head = String::new();
                    let mut status = "200".to_owned();
                    let mut reply_headers = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            let value = value.trim();
                            if name.eq_ignore_ascii_case("x-reply-status") {
                                value.clone_into(&mut status);
                            } else if name.eq_ignore_ascii_case("x-reply-header") {
                                reply_headers.push_str(&format!("{value}\r\n"));
                            }
                        }
                        head.push_str(&line);
                    }
                    record.lock().push(head);
                    let response = format!(
                        "HTTP/1.1 {status} Scripted\r\n{reply_headers}content-length: 9\r\n\r\nscripted\n"
                    );
                    if writer.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    seen
}

fn pod(port: u16) -> SocketAddr {
    SocketAddr::new(POD_B.parse().unwrap(), port)
}

#[test]
fn loopback_only_app_is_unreachable_through_inbound() {
    if !in_netns() {
        return;
    }
    // The application listens on loopback only (an admin endpoint meant for the pod itself).
    let loopback_only = recording_http_app_on("127.0.0.1", HTTP_PORT);
    let (_, tcp_peers) = echo_server(&format!("127.0.0.1:{TCP_PORT}"));
    let b = server(&config("PERMISSIVE", json!({}), None), None);
    for target in ["/", "/admin/console"] {
        let reply = from_peer(target, &[]);
        assert_eq!(
            (reply.status, reply.header("x-trellis-reason")),
            (503, Some("upstream_connect_failure")),
            "GET {target} from the network reached a loopback-only application: {reply:?}\n{}",
            b.logs()
        );
    }
    // Opaque TCP (a port no service declares, bytes that are not HTTP) the same.
    let reply = raw_request(PEER, pod(TCP_PORT), "hello\r\n");
    assert_eq!(reply.status, 0, "{reply:?}");
    assert!(
        loopback_only.lock().is_empty(),
        "{:?}",
        loopback_only.lock()
    );
    assert!(tcp_peers.lock().is_empty(), "{:?}", tcp_peers.lock());

    // The application listening on the pod's address is served, from 127.0.0.6.
    let on_pod = recording_http_app_on(POD_B, HTTP_PORT);
    let reply = from_peer("/public", &[]);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", b.logs());
    assert_eq!(on_pod.lock().len(), 1);
    assert!(
        loopback_only.lock().is_empty(),
        "{:?}",
        loopback_only.lock()
    );
}

/// An application that speaks `h2c` (RFC 7540 §3.2): an `Upgrade: h2c` request is answered `101`
/// and the connection then serves HTTP/2. Records `HTTP/1.1 <path> upgrade=<offer>` for each
/// HTTP/1.1 request and `HTTP/2 <path>` for each request over the upgraded connection.
async fn h2c_app(listener: std::net::TcpListener, seen: Seen) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    type Reply = hyper::Response<Full<Bytes>>;
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let offer = req
                    .headers()
                    .get("upgrade")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                seen.lock()
                    .push(format!("HTTP/1.1 {} upgrade={offer:?}", req.uri().path()));
                if offer.is_none_or(|o| !o.eq_ignore_ascii_case("h2c")) {
                    return Ok::<Reply, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from("plain"),
                    )));
                }
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let h2 = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        seen.lock().push(format!("HTTP/2 {}", req.uri().path()));
                        std::future::ready(Ok::<Reply, std::convert::Infallible>(
                            hyper::Response::new(Full::new(Bytes::from("smuggled"))),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(upgraded, h2)
                        .await;
                });
                let switching = hyper::Response::builder()
                    .status(101)
                    .header("connection", "Upgrade")
                    .header("upgrade", "h2c")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                Ok(switching)
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades(),
        );
    }
}

/// Tries h2c smuggling from `source` to `dst`: a harmless `GET /public` offering `Upgrade: h2c`,
/// then, if it is answered `101`, `GET /admin/secret` over HTTP/2 on the upgraded connection.
/// Returns the status of the first request and, if the tunnel opened, of the smuggled one.
async fn smuggle(source: &str, dst: SocketAddr, host: &str) -> (u16, Option<u16>) {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let stream = support::connect_from(source, dst);
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    let offer = hyper::Request::get("/public")
        .header("host", host)
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(offer).await.unwrap();
    let status = response.status().as_u16();
    if status != 101 {
        return (status, None);
    }
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
        TokioExecutor::new(),
        upgraded,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let smuggled = hyper::Request::get(format!("http://{host}/admin/secret"))
        .body(Empty::new())
        .unwrap();
    let answered = h2.send_request(smuggled).await.map(|r| r.status().as_u16());
    (status, Some(answered.unwrap_or(0)))
}

#[test]
fn h2c_upgrade_smuggling_is_refused() {
    if !in_netns() {
        return;
    }
    let runtime = support::runtime();
    let seen: Seen = Arc::default();
    let listener = std::net::TcpListener::bind(("0.0.0.0", HTTP_PORT)).unwrap();
    runtime.spawn(h2c_app(listener, seen.clone()));
    let config = config("PERMISSIVE", deny_admin(), None);
    let b = server(&config, None);
    let a = client(&config, None);
    // The DENY holds for a plain request.
    assert_rbac_denied("h2c", "/admin/secret", &from_peer("/admin/secret", &[]), &b);

    // From the network to B, and from the application through A (and B).
    for (source, dst, proxy) in [(PEER, pod_b(), &b), (APP, vip(100), &a)] {
        let attempt = runtime.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                smuggle(source, dst, WEB),
            )
            .await
        });
        assert_eq!(
            attempt.ok(),
            Some((200, None)),
            "h2c from {source}: the offer must be answered as a plain request\n{}",
            proxy.logs()
        );
    }
    let seen = seen.lock();
    assert_eq!(
        *seen,
        [
            "HTTP/1.1 /public upgrade=None",
            "HTTP/1.1 /public upgrade=None"
        ],
        "the application never sees the h2c offer, nor anything over HTTP/2"
    );
}

#[test]
fn connect_is_refused() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let config = config("PERMISSIVE", json!({}), None);
    let b = server(&config, None);
    let a = client(&config, None);
    let connect = |target: &str| {
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
    };
    for (source, dst, target, proxy) in [
        (PEER, pod_b(), "127.0.0.20:7300", &b),
        (PEER, pod_b(), "example.com:443", &b),
        (APP, vip(100), "example.com:443", &a),
        (APP, vip(100), "127.0.0.20:7300", &a),
    ] {
        let reply = raw_request(source, dst, &connect(target));
        assert_eq!(
            (reply.status, reply.header("x-trellis-reason")),
            (405, Some("connect_not_allowed")),
            "CONNECT {target} from {source}: {reply:?}\n{}",
            proxy.logs()
        );
    }
    // Plain requests still pass both ways.
    assert_eq!(from_peer("/public", &[]).status, 200, "{}", b.logs());
    assert_eq!(
        get(APP, vip(100), WEB, "/public", &[]).status,
        200,
        "{}",
        a.logs()
    );
    assert_eq!(seen.lock().len(), 2, "{:?}", seen.lock());
    assert_never_reached("CONNECT", &seen, "CONNECT");
}

#[test]
fn forged_trellis_headers_have_no_effect() {
    if !in_netns() {
        return;
    }
    let ca = MeshCa::new("mesh root");
    let b_certs = ca.workload_files(SERVER_ID);
    let a_certs = ca.workload_files(CLIENT_ID);
    let deny_private = json!({"deny": [{"name": "shop.deny-private",
                     "rules": [{"to": [{"paths": [{"prefix": "/private"}]}]}]}]});
    let config = config("PERMISSIVE", deny_private, Some(&ca));
    let seen = recording_http_app(HTTP_PORT);
    let undeclared = recording_http_app(UNDECLARED_PORT);
    let scripted = scripted_app(SCRIPTED_PORT);
    let b = server(&config, Some(&b_certs));
    let a = client(&config, Some(&a_certs));
    let forged = [
        "x-trellis-app-version: HTTP/2",
        "x-trellis-reason: rbac_access_denied",
        "X-Trellis-Future-Knob: on",
    ];

    // Inbound, from the network: on a port whose protocol nobody declares, a forged application
    // version would make B speak HTTP/2 to an HTTP/1.1 application; nothing internal reaches it.
    let reply = get(PEER, pod(UNDECLARED_PORT), WEB, "/public", &forged);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", b.logs());
    assert!(reply.body.starts_with("GET /public HTTP/1.1"), "{reply:?}");
    // From the application through A (mutual TLS to B): A's own word replaces the forgery.
    let reply = get(APP, vip(100), WEB, "/public", &forged);
    assert_eq!(reply.status, 200, "{reply:?}\n{}\n{}", a.logs(), b.logs());
    for heads in [&undeclared, &seen] {
        let heads = heads.lock();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert!(
            !heads[0].to_ascii_lowercase().contains("x-trellis"),
            "{heads:?}"
        );
    }

    // Responses: an application (behind B) or an upstream without a sidecar (behind A) that
    // claims the mesh refused is not believed; its own status and body pass, the claim does not.
    let claim = [
        "x-reply-status: 403",
        "x-reply-header: x-trellis-reason: rbac_access_denied",
        "x-reply-header: x-trellis-app-version: HTTP/2",
    ];
    for (source, dst, host, proxy) in [
        (PEER, pod(SCRIPTED_PORT), WEB, &b),
        (APP, vip(102), DIRECT, &a),
    ] {
        let reply = get(source, dst, host, "/claim", &claim);
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (403, "scripted\n"),
            "from {source}: {reply:?}\n{}",
            proxy.logs()
        );
        let internal: Vec<_> = reply
            .headers
            .iter()
            .filter(|(name, _)| name.starts_with("x-trellis-"))
            .collect();
        assert!(internal.is_empty(), "from {source}: {internal:?}");
    }
    assert_eq!(scripted.lock().len(), 2, "{:?}", scripted.lock());

    // The proxy's own word still crosses the mesh hop: B's denial reaches the application
    // through A with its reason.
    let reply = get(APP, vip(100), WEB, "/private", &[]);
    assert_rbac_denied("forged headers", "/private", &reply, &a);
    assert_eq!(reply.header("x-trellis-reason"), Some("rbac_access_denied"));
}

#[test]
fn trailing_dot_host_cannot_dodge_deny() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    let deny_admin_host = json!({"deny": [{"name": "shop.deny-admin-host",
                     "rules": [{"to": [{"hosts": [{"exact": ADMIN_HOST}]}]}]}]});
    let config = config("PERMISSIVE", deny_admin_host, None);
    let b = server(&config, None);
    let a = client(&config, None);
    let spellings = [
        "admin.example.com",
        "admin.example.com.",
        "ADMIN.example.com",
        "Admin.Example.Com.",
        "admin.example.com:7300",
        "admin.example.com.:80",
        "ADMIN.EXAMPLE.COM.:7300",
    ];
    // The AuthorizationPolicy (B) and the VirtualService route (A) see the same host.
    for host in spellings {
        let reply = get(PEER, pod_b(), host, "/public", &[]);
        assert_rbac_denied("host normalisation, DENY hosts", host, &reply, &b);
        let reply = get(APP, vip(101), host, "/public", &[]);
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (403, "admin is internal"),
            "host normalisation, route authority: Host {host}\n{}",
            a.logs()
        );
    }
    let reply = get(PEER, pod_b(), "public.example.com", "/public", &[]);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", b.logs());
    // The application is told the host as it was authorized.
    let reply = get(PEER, pod_b(), "Public.Example.com.:7300", "/public", &[]);
    assert!(
        reply.body.contains("\r\nhost: public.example.com:7300\r\n")
            || reply.body.contains("\r\nHost: public.example.com:7300\r\n"),
        "{reply:?}"
    );
    assert_eq!(seen.lock().len(), 2, "{:?}", seen.lock());
    assert_never_reached("host normalisation", &seen, "dmin");
    assert_never_reached("host normalisation", &seen, "DMIN");
    assert_eq!(
        sample(
            &b.scrape(),
            "trellis_authorization_denied_total",
            &["policy=\"shop.deny-admin-host\""]
        ),
        Some(spellings.len() as u64)
    );
}

#[test]
fn path_parameters_cannot_dodge_deny() {
    if !in_netns() {
        return;
    }
    let seen = recording_http_app(HTTP_PORT);
    // Exactly /admin, and everything under /admin/.
    let deny_admin_exactly = json!({"deny": [{"name": "shop.deny-admin",
        "rules": [{"to": [{"paths": [{"exact": "/admin"}, {"prefix": "/admin/"}]}]}]}]});
    let b = server(&config("PERMISSIVE", deny_admin_exactly, None), None);
    assert_eq!(from_peer("/public", &[]).status, 200, "{}", b.logs());
    assert_rbac_denied("path parameters", "/admin", &from_peer("/admin", &[]), &b);
    // What a servlet container serves as /admin or /admin/users; refused before authorization.
    for target in [
        "/admin;jsessionid=0123",
        "/admin;/users",
        "/public/..;/admin",
        "/public/..;/admin/users",
        "/admin%3Bx=1",
        "/public/..%3b/admin",
    ] {
        let reply = from_peer(target, &[]);
        assert_eq!(
            (reply.status, reply.header("x-trellis-reason")),
            (400, Some("invalid_path")),
            "GET {target}: {reply:?}\n{}",
            b.logs()
        );
    }
    // In the query, `;` is data.
    let reply = from_peer("/public?a=1;b=2", &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(seen.lock().len(), 2, "{:?}", seen.lock());
    assert_never_reached("path parameters", &seen, "admin");
}

/// The number of `metric` series (sample lines) in a scrape.
fn series(metrics: &str, metric: &str) -> usize {
    let prefix = format!("{metric}{{");
    metrics.lines().filter(|l| l.starts_with(&prefix)).count()
}

#[test]
fn wire_values_cannot_create_unbounded_series() {
    if !in_netns() {
        return;
    }
    let scripted = scripted_app(SCRIPTED_PORT);
    let config = config("PERMISSIVE", json!({}), None);
    let b = server(&config, None);
    let a = client(&config, None);
    const REQUESTS: usize = 24;
    // Every request differs in what a client or upstream controls: host, method, path, header
    // values, and the grpc-status its response carries.
    for i in 0..REQUESTS {
        let host = format!("host-{i}.example.com");
        let request = |status: &str| {
            format!(
                "METHOD{i} /path-{i}?q={i} HTTP/1.1\r\nHost: {host}\r\nuser-agent: agent-{i}\r\n\
                 content-type: application/grpc\r\nx-reply-header: grpc-status: {status}\r\n\
                 Connection: close\r\n\r\n"
            )
        };
        let bogus = [format!("{}", 1000 + i), format!("status-{i}")];
        let reply = raw_request(PEER, pod(SCRIPTED_PORT), &request(&bogus[i % 2]));
        assert_eq!(reply.status, 200, "{reply:?}\n{}", b.logs());
        let reply = raw_request(APP, vip(102), &request(&bogus[(i + 1) % 2]));
        assert_eq!(reply.status, 200, "{reply:?}\n{}", a.logs());
    }
    assert_eq!(scripted.lock().len(), 2 * REQUESTS);
    for (proxy, reporter) in [(&b, "destination"), (&a, "source")] {
        let metrics = proxy.scrape();
        let requests = series(&metrics, "istio_requests_total");
        assert_eq!(
            requests, 1,
            "{reporter}: one label set for every request\n{metrics}"
        );
        assert_eq!(
            sample(
                &metrics,
                "istio_requests_total",
                &[
                    &format!("reporter=\"{reporter}\""),
                    "grpc_response_status=\"2\""
                ]
            ),
            Some(REQUESTS as u64),
            "{metrics}"
        );
    }
}
