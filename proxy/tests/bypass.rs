//! The regression suite for the known bypass classes of service meshes, each attempt sent through
//! the real `trellis-proxy` binary (static mode) and each test named by the class it covers:
//! path normalisation (dot segments, merged slashes, encoded unreserved characters, encoded
//! slashes, case, `#` and `?`), repeated header values, forged identity headers, plaintext to a
//! STRICT port, and client certificates from another root, another trust domain or past their
//! validity. Every attempt must be refused (`403 RBAC: access denied`, `400 invalid_path`, a
//! closed connection or a failed handshake) and must never reach the application, a recorder
//! that keeps the head of every request it is sent.
//!
//! Each test runs in its own network namespace:
//!
//! ```text
//! client app (127.0.0.5) ─REDIRECT→ A:15001 (outbound, routes) ─→ 127.0.0.20:7300
//! peer (127.0.0.7) or A ─(dst 127.0.0.20)─REDIRECT→ B:15006 (inbound, policies)
//!     B ─(from 127.0.0.6)→ recording app 127.0.0.1:7300
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
use support::{APP, MeshCa, Ports, Proxy, RawReply, raw_request, recording_http_app, sample};

const INSIDE: &str = "TRELLIS_PROXY_BYPASS_TEST_IN_NETNS";
/// A plaintext peer outside the mesh: its connections to B's pod reach B's inbound listener.
const PEER: &str = "127.0.0.7";
/// B's pod address.
const POD_B: &str = "127.0.0.20";
/// The application's port, declared `http`.
const HTTP_PORT: u16 = 7300;
/// The service whose VirtualService matches `/admin` with `ignoreUriCase: true`.
const WEB: &str = "web.shop.svc.cluster.local";
/// The same workload behind a VirtualService matching `/admin` case-sensitively.
const WEB_EXACT: &str = "web-exact.shop.svc.cluster.local";

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
    let service = |host: &str, vip: &str| {
        json!({"hostnames": [host], "namespace": "shop", "vips": [vip],
               "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "http"}],
               "endpoints": [endpoint.clone()]})
    };
    let admin_is_internal = json!({"directResponse": {"status": 403,
                                                      "body": {"string": "admin is internal"}}});
    let routes = json!([
        // Sorted by host, as the proxy's route tables must be.
        {"host": WEB_EXACT, "port": 80, "http": [
            {"matches": [{"uri": {"prefix": "/admin"}}], "action": admin_is_internal},
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
        "services": [service(WEB, "127.0.0.100"), service(WEB_EXACT, "127.0.0.101")],
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
    assert_eq!(reply.header("x-trellis-reason"), Some("rbac_access_denied"));
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
