//! AuthorizationPolicy action CUSTOM with the real proxy binary and real external authorizers:
//! the demo authorizer (`trellis_demo::ext_authz`, on the official ext_authz protocol
//! definitions) serving Envoy's HTTP protocol and the gRPC `Authorization/Check` service on
//! 127.0.0.1, in front of the demo server (which echoes the request headers it received). A
//! server sidecar (static config, pod address 127.0.0.20, port declared `http`, PERMISSIVE)
//! takes plaintext clients from 127.0.0.7 through a REDIRECT rule.
//!
//! Each path prefix has its CUSTOM policy and provider: `/http/` (HTTP protocol, path prefix,
//! header lists), `/grpc/` (gRPC), `/closed/` (an address nothing listens on, fail closed),
//! `/open/` (the same, `failOpen`), `/unavailable/` (the same, `statusOnError: 503`). It
//! proves: the authorizer's allow goes on to the application with its headers, its denial
//! reaches the client as it wrote it, an authorizer that is down or too slow denies (or allows
//! where `failOpen`), CUSTOM comes before a DENY policy, and requests no CUSTOM policy matches
//! are never checked.
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Netns, Ports, Proxy, connect_from, free_port, sample};
use trellis_demo::ext_authz::{CHECKED_PATH_HEADER, DECISION_HEADER, RESULT_HEADER};

const INSIDE: &str = "TRELLIS_PROXY_EXT_AUTHZ_TEST_IN_NETNS";
const PEER: &str = "127.0.0.7";
const POD_B: &str = "127.0.0.20";
/// The application's port, declared `http`.
const HTTP_PORT: u16 = 7310;
/// Every provider's timeout: well under the demo authorizer's `slow` answer.
const TIMEOUT_MS: u64 = 500;

#[test]
fn custom_policies_ask_external_authorizers_over_http_and_grpc() {
    if std::env::var_os(INSIDE).is_some() {
        inside_netns();
        return;
    }
    let netns = Netns::create("ext-authz")
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    netns.nat_output(&["-s", "127.0.0.6", "-j", "RETURN"]);
    netns.nat_output(&["-d", POD_B, "-j", "REDIRECT", "--to-ports", "15006"]);
    netns.rerun_inside(INSIDE);
}

/// A response as the client saw it: status, headers (lowercase names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The values of header `name` the application received (the demo server's JSON echo).
    fn app_saw(&self, name: &str) -> Option<String> {
        let echo: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        echo["headers"][name][0].as_str().map(str::to_owned)
    }
}

/// One HTTP/1.1 GET from [`PEER`] to the pod, with `headers`.
fn get(target: &str, headers: &[(&str, &str)]) -> Answer {
    let dst: SocketAddr = format!("{POD_B}:{HTTP_PORT}").parse().unwrap();
    let mut stream = connect_from(PEER, dst);
    let mut head = format!(
        "GET {target} HTTP/1.1\r\nHost: web.shop.svc.cluster.local\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn custom(name: &str, prefix: &str, provider: serde_json::Value) -> serde_json::Value {
    json!({
        "policy": {"name": format!("shop.{name}"), "rules": [{"to": [{"paths": [{"prefix": prefix}]}]}]},
        "provider": provider,
    })
}

fn provider(
    name: &str,
    port: u16,
    fail_open: bool,
    status: u16,
    protocol: serde_json::Value,
) -> serde_json::Value {
    json!({
        "name": name, "host": "127.0.0.1", "port": port, "timeoutMs": TIMEOUT_MS,
        "failOpen": fail_open, "statusOnError": status, "protocol": protocol,
    })
}

fn inside_netns() {
    let runtime = support::runtime();
    let (http, grpc) = runtime.block_on(async {
        let app = tokio::net::TcpListener::bind(("0.0.0.0", HTTP_PORT))
            .await
            .unwrap();
        let state = Arc::new(trellis_demo::server::ServerState::new(
            trellis_demo::server::Identity {
                name: "web".into(),
                version: "v1".into(),
                namespace: "shop".into(),
                pod: "web-0".into(),
            },
            true,
        ));
        tokio::spawn(trellis_demo::server::serve_http(
            app,
            state,
            std::future::pending(),
            Duration::ZERO,
        ));
        trellis_demo::ext_authz::spawn(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap()
    });
    // Nothing listens here: connections are refused.
    let down = free_port();
    let http_check = json!({
        "kind": "http", "pathPrefix": "/check",
        "includeRequestHeaders": [{"exact": DECISION_HEADER}],
        "headersToUpstreamOnAllow": [{"prefix": "x-ext-authz-"}],
        "headersToDownstreamOnDeny": [{"exact": RESULT_HEADER}],
    });
    let authorization = json!({
        "custom": [
            custom("ext-http", "/http/", provider("http", http.port(), false, 403, http_check)),
            custom("ext-grpc", "/grpc/", provider("grpc", grpc.port(), false, 403, json!({"kind": "grpc"}))),
            custom("ext-closed", "/closed/", provider("closed", down, false, 403, json!({"kind": "grpc"}))),
            custom("ext-open", "/open/", provider("open", down, true, 403, json!({"kind": "http"}))),
            custom("ext-unavailable", "/unavailable/", provider("unavailable", down, false, 503, json!({"kind": "grpc"}))),
        ],
        "deny": [{"name": "shop.deny-admin", "rules": [{"to": [{"paths": [{"suffix": "/admin"}]}]}]}],
    });
    let config = json!({
        "version": "b-1",
        "services": [{
            "hostnames": ["web.shop.svc.cluster.local"], "namespace": "shop", "vips": ["10.96.0.1"],
            "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "http"}],
            "endpoints": [{"address": POD_B, "ready": true, "meshed": true}],
        }],
        "inbound": {"mtlsMode": "PERMISSIVE", "authorization": authorization},
    })
    .to_string();
    let mut ports = Ports::free();
    ports.inbound = 15006;
    let mut proxy = Proxy::with_config_and_env(
        ports,
        &config,
        &[],
        &[
            ("POD_NAME", "web-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "web"),
            ("WORKLOAD_NAME", "web"),
        ],
    );
    proxy.wait_ready();

    // Allowed: the request goes on with the headers the authorizer chose for it; the HTTP
    // protocol asked about the prefixed path.
    let allowed = get("/http/items?x=1", &[(DECISION_HEADER, "allow")]);
    assert_eq!(allowed.status, 200, "{}\n{}", allowed.body, proxy.logs());
    assert_eq!(allowed.app_saw(RESULT_HEADER).as_deref(), Some("allowed"));
    assert_eq!(
        allowed.app_saw(CHECKED_PATH_HEADER).as_deref(),
        Some("/check/http/items?x=1")
    );
    let allowed = get("/grpc/items", &[(DECISION_HEADER, "allow")]);
    assert_eq!(allowed.status, 200, "{}\n{}", allowed.body, proxy.logs());
    assert_eq!(allowed.app_saw(RESULT_HEADER).as_deref(), Some("allowed"));
    assert_eq!(
        allowed.app_saw(CHECKED_PATH_HEADER).as_deref(),
        Some("/grpc/items")
    );

    // Denied: the client gets the authorizer's status, body and (listed) headers.
    for (target, protocol) in [("/http/items", "http"), ("/grpc/items", "grpc")] {
        let denied = get(target, &[(DECISION_HEADER, "deny")]);
        assert_eq!(denied.status, 403, "{target}: {}", denied.body);
        assert_eq!(
            denied.body,
            format!("denied by ext-authz ({protocol})\n"),
            "{target}"
        );
        assert_eq!(denied.header(RESULT_HEADER), Some("denied"), "{target}");
        assert_eq!(
            denied.header("x-trellis-reason"),
            None,
            "{target}: the authorizer's answer"
        );
        // No decision header at all is a denial too.
        assert_eq!(get(target, &[]).status, 403, "{target}");
    }
    // The HTTP protocol passes only the listed headers of a denial.
    let denied = get("/http/items", &[(DECISION_HEADER, "deny")]);
    assert_eq!(denied.header(CHECKED_PATH_HEADER), None);
    let denied = get("/grpc/items", &[(DECISION_HEADER, "deny")]);
    assert_eq!(denied.header(CHECKED_PATH_HEADER), Some("/grpc/items"));

    // CUSTOM comes first, then DENY: an allowed request can still be denied by a policy.
    let admin = get("/grpc/admin", &[(DECISION_HEADER, "allow")]);
    assert_eq!(
        (admin.status, admin.body.trim_end()),
        (403, "RBAC: access denied")
    );

    // The authorizer cannot answer: fail closed by default, `statusOnError`, or `failOpen`.
    let closed = get("/closed/items", &[(DECISION_HEADER, "allow")]);
    assert_eq!(closed.status, 403, "{}", closed.body);
    assert_eq!(closed.header("x-trellis-reason"), Some("ext_authz_error"));
    assert_eq!(
        get("/unavailable/items", &[(DECISION_HEADER, "allow")]).status,
        503
    );
    let open = get("/open/items", &[]);
    assert_eq!(open.status, 200, "failOpen: {}", open.body);
    // An authorizer error (HTTP 500, gRPC INTERNAL) fails the check too.
    for target in ["/http/items", "/grpc/items"] {
        let failed = get(target, &[(DECISION_HEADER, "fail")]);
        assert_eq!(failed.status, 403, "{target}");
        assert_eq!(
            failed.header("x-trellis-reason"),
            Some("ext_authz_error"),
            "{target}"
        );
    }
    // Too slow: denied at the provider's timeout, not when the authorizer would answer.
    for target in ["/http/items", "/grpc/items"] {
        let started = Instant::now();
        let slow = get(target, &[(DECISION_HEADER, "slow")]);
        let took = started.elapsed();
        assert_eq!(slow.status, 403, "{target}");
        assert_eq!(
            slow.header("x-trellis-reason"),
            Some("ext_authz_error"),
            "{target}"
        );
        assert!(
            took >= Duration::from_millis(TIMEOUT_MS) && took < trellis_demo::ext_authz::SLOW,
            "{target} answered after {took:?}"
        );
    }

    // No CUSTOM policy matches: never checked, whatever the client claims.
    let public = get("/public", &[(RESULT_HEADER, "forged")]);
    assert_eq!(public.status, 200);
    assert_eq!(public.app_saw(RESULT_HEADER).as_deref(), Some("forged"));
    assert_eq!(public.app_saw(CHECKED_PATH_HEADER), None);

    let metrics = proxy.scrape();
    for (policy, denials) in [
        ("shop.ext-http", 5),
        ("shop.ext-grpc", 5),
        ("shop.ext-closed", 1),
        ("shop.ext-unavailable", 1),
    ] {
        assert_eq!(
            sample(
                &metrics,
                "trellis_authorization_denied_total",
                &[&format!("policy=\"{policy}\"")]
            ),
            Some(denials),
            "{policy}\n{metrics}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "istio_requests_total",
            &["response_code=\"403\"", "response_flags=\"UAEX\""]
        ),
        Some(11),
        "{metrics}"
    );
    drop(runtime);
}
