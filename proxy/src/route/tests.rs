use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use trellis_config::proxy::ProxyConfig;
use trellis_config::traffic::{AbortStatus, HttpAction};

use super::*;
use crate::destination::lookup;

const HOST: &str = "reviews.default.svc.cluster.local";

/// One service (reviews, VIP 10.96.0.20, ports 9080 http and 9090 tcp) and the given traffic.
fn snapshot(traffic: serde_json::Value) -> ProxyConfig {
    let snapshot = json!({
        "version": "1",
        "services": [
            {"hostnames": [HOST, "reviews.default.svc", "reviews.default"], "namespace": "default",
             "vips": ["10.96.0.20"],
             "ports": [{"name": "http", "port": 9080, "targetPort": 8080, "protocol": "http"},
                       {"name": "tcp", "port": 9090, "targetPort": 9090, "protocol": "tcp"}],
             "endpoints": [
                {"address": "10.244.0.1", "ready": true, "meshed": true, "labels": {"version": "v1"}},
                {"address": "10.244.0.2", "ready": true, "meshed": true, "labels": {"version": "v2"}}
             ]},
            {"hostnames": ["ratings.default.svc.cluster.local"], "namespace": "default",
             "vips": ["10.96.0.30"],
             "ports": [{"name": "http", "port": 9080, "targetPort": 8080, "protocol": "http"}],
             "endpoints": []}
        ],
        "traffic": traffic
    });
    ProxyConfig::from_json(snapshot.to_string().as_bytes()).expect("test config is valid")
}

/// A route table for reviews:9080 holding one route per match block given, each routing to a
/// distinct subset named after its position, so the test can read which route matched.
fn one_route_per_match(blocks: &[serde_json::Value]) -> ProxyConfig {
    let http: Vec<_> = blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            json!({"matches": [block], "action": {"route": [{"host": HOST, "subset": format!("r{i}"), "weight": 100}]}})
        })
        .collect();
    snapshot(json!({"routes": [{"host": HOST, "port": 9080, "http": http}]}))
}

#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    query: &'static str,
    authority: &'static str,
    scheme: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    labels: Vec<(&'static str, &'static str)>,
    namespace: &'static str,
}

impl Default for Req {
    fn default() -> Self {
        Self {
            method: "GET",
            path: "/",
            query: "",
            authority: "reviews:9080",
            scheme: "http",
            headers: Vec::new(),
            labels: Vec::new(),
            namespace: "default",
        }
    }
}

/// Runs the matcher for `req` sent to `dst` and hands the decision to `inspect`.
fn with_decision<T>(
    config: &ProxyConfig,
    dst: &str,
    req: &Req,
    inspect: impl FnOnce(HttpDecision<'_>) -> T,
) -> T {
    let destination = lookup(config, dst.parse().unwrap()).expect("destination known");
    let mut headers = HeaderMap::new();
    for (name, value) in &req.headers {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let labels: BTreeMap<String, String> = req
        .labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let authority = crate::host::Authority::parse(req.authority);
    let attributes = RequestAttributes {
        method: req.method,
        path: req.path,
        query: req.query,
        authority: &authority,
        scheme: req.scheme,
        headers: &headers,
        source_labels: &labels,
        source_namespace: req.namespace,
        port: destination.port.port,
    };
    inspect(match_http(config, &destination, &attributes))
}

fn decide(config: &ProxyConfig, dst: &str, req: &Req) -> String {
    with_decision(config, dst, req, outcome)
}

/// The subset of the matched route (`r<index>`), or what else happened.
fn outcome(decision: HttpDecision<'_>) -> String {
    match decision {
        HttpDecision::Default => "default".into(),
        HttpDecision::NoRoute => "no route".into(),
        HttpDecision::Matched(m) => match &m.route.action {
            HttpAction::Route(d) => d[0].subset.clone(),
            other => format!("{other:?}"),
        },
    }
}

#[test]
fn every_match_field_selects_its_route() {
    // (match block, request, matches?)
    let get = Req::default;
    let cases: Vec<(serde_json::Value, Req, bool)> = vec![
        (
            json!({"uri": {"exact": "/a"}}),
            Req {
                path: "/a",
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"exact": "/a"}}),
            Req {
                path: "/a/b",
                ..get()
            },
            false,
        ),
        (
            json!({"uri": {"exact": "/a"}}),
            Req {
                path: "/A",
                ..get()
            },
            false,
        ),
        (
            json!({"uri": {"exact": "/a"}, "ignoreUriCase": true}),
            Req {
                path: "/A",
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"prefix": "/api"}}),
            Req {
                path: "/api/v1",
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"prefix": "/api"}}),
            Req {
                path: "/ap",
                ..get()
            },
            false,
        ),
        (
            json!({"uri": {"prefix": "/api"}, "ignoreUriCase": true}),
            Req {
                path: "/API/x",
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"regex": "/v[0-9]+/.*"}}),
            Req {
                path: "/v2/x",
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"regex": "/v[0-9]+"}}),
            Req {
                path: "/v2/x",
                ..get()
            },
            false,
        ),
        (
            json!({"uri": {"regex": "/v[0-9]+"}}),
            Req {
                path: "/x/v2",
                ..get()
            },
            false,
        ),
        (
            json!({"uri": {"exact": "/q"}}),
            Req {
                path: "/q",
                query: "a=1",
                ..get()
            },
            true,
        ),
        (
            json!({"scheme": {"exact": "https"}}),
            Req {
                scheme: "https",
                ..get()
            },
            true,
        ),
        (json!({"scheme": {"exact": "https"}}), get(), false),
        (
            json!({"method": {"exact": "POST"}}),
            Req {
                method: "POST",
                ..get()
            },
            true,
        ),
        (
            json!({"method": {"regex": "PUT|POST"}}),
            Req {
                method: "PUT",
                ..get()
            },
            true,
        ),
        (json!({"method": {"exact": "POST"}}), get(), false),
        (json!({"authority": {"prefix": "reviews"}}), get(), true),
        (json!({"authority": {"exact": "ratings"}}), get(), false),
        // The normalised authority, with its port and without it: case, a trailing dot and a
        // port do not step around an authority match.
        (json!({"authority": {"exact": "reviews"}}), get(), true),
        (json!({"authority": {"exact": "reviews:9080"}}), get(), true),
        (
            json!({"authority": {"exact": "admin.example.com"}}),
            Req {
                authority: "ADMIN.Example.com.:80",
                ..get()
            },
            true,
        ),
        (
            json!({"authority": {"regex": "admin\\.example\\.com"}}),
            Req {
                authority: "Admin.example.com.",
                ..get()
            },
            true,
        ),
        (
            json!({"authority": {"exact": "admin.example.com"}}),
            Req {
                authority: "admin.example.com.evil",
                ..get()
            },
            false,
        ),
        (
            json!({"headers": {"end-user": {"exact": "jason"}}}),
            Req {
                headers: vec![("end-user", "jason")],
                ..get()
            },
            true,
        ),
        (
            json!({"headers": {"end-user": {"exact": "jason"}}}),
            Req {
                headers: vec![("end-user", "json")],
                ..get()
            },
            false,
        ),
        (
            json!({"headers": {"end-user": {"exact": "jason"}}}),
            get(),
            false,
        ),
        (
            json!({"headers": {"x-v": {"prefix": "v2"}}}),
            Req {
                headers: vec![("x-v", "v2-beta")],
                ..get()
            },
            true,
        ),
        (
            json!({"headers": {"x-v": {"regex": "v[12]"}}}),
            Req {
                headers: vec![("x-v", "v3")],
                ..get()
            },
            false,
        ),
        (
            json!({"headers": {"x-debug": "present"}}),
            Req {
                headers: vec![("x-debug", "")],
                ..get()
            },
            true,
        ),
        (json!({"headers": {"x-debug": "present"}}), get(), false),
        (
            json!({"headers": {"x-a": {"exact": "1,2"}}}),
            Req {
                headers: vec![("x-a", "1"), ("x-a", "2")],
                ..get()
            },
            true,
        ),
        (
            json!({"headers": {"x-a": {"exact": "1"}, "x-b": {"exact": "2"}}}),
            Req {
                headers: vec![("x-a", "1")],
                ..get()
            },
            false,
        ),
        (
            json!({"withoutHeaders": {"x-canary": "present"}}),
            get(),
            true,
        ),
        (
            json!({"withoutHeaders": {"x-canary": "present"}}),
            Req {
                headers: vec![("x-canary", "1")],
                ..get()
            },
            false,
        ),
        (
            json!({"withoutHeaders": {"x-canary": {"exact": "yes"}}}),
            Req {
                headers: vec![("x-canary", "no")],
                ..get()
            },
            true,
        ),
        (
            json!({"queryParams": {"v": {"exact": "2"}}}),
            Req {
                query: "a=1&v=2",
                ..get()
            },
            true,
        ),
        (
            json!({"queryParams": {"v": {"exact": "2"}}}),
            Req {
                query: "v=3",
                ..get()
            },
            false,
        ),
        (
            json!({"queryParams": {"v": {"regex": "[0-9]+"}}}),
            Req {
                query: "v=42",
                ..get()
            },
            true,
        ),
        (
            json!({"queryParams": {"debug": {"exact": ""}}}),
            Req {
                query: "debug",
                ..get()
            },
            true,
        ),
        (json!({"queryParams": {"v": {"exact": "2"}}}), get(), false),
        (json!({"port": 9080}), get(), true),
        (json!({"port": 9081}), get(), false),
        (
            json!({"sourceLabels": {"app": "productpage"}}),
            Req {
                labels: vec![("app", "productpage"), ("v", "1")],
                ..get()
            },
            true,
        ),
        (
            json!({"sourceLabels": {"app": "productpage", "v": "2"}}),
            Req {
                labels: vec![("app", "productpage"), ("v", "1")],
                ..get()
            },
            false,
        ),
        (json!({"sourceNamespace": "default"}), get(), true),
        (json!({"sourceNamespace": "other"}), get(), false),
        (
            json!({"uri": {"prefix": "/"}, "method": {"exact": "GET"}, "headers": {"x": {"exact": "1"}}}),
            Req {
                headers: vec![("x", "1")],
                ..get()
            },
            true,
        ),
        (
            json!({"uri": {"prefix": "/"}, "method": {"exact": "GET"}, "headers": {"x": {"exact": "1"}}}),
            Req {
                method: "HEAD",
                headers: vec![("x", "1")],
                ..get()
            },
            false,
        ),
    ];
    for (block, req, expected) in cases {
        let config = one_route_per_match(std::slice::from_ref(&block));
        let got = decide(&config, "10.96.0.20:9080", &req);
        let want = if expected { "r0" } else { "no route" };
        assert_eq!(
            got, want,
            "match {block} against {} {}?{} {:?}",
            req.method, req.path, req.query, req.headers
        );
    }
}

#[test]
fn first_match_wins_blocks_are_ored_and_unrouted_hosts_use_the_default() {
    let config = one_route_per_match(&[
        json!({"headers": {"end-user": {"exact": "jason"}}}),
        json!({"uri": {"prefix": "/"}}),
    ]);
    let jason = Req {
        headers: vec![("end-user", "jason")],
        ..Req::default()
    };
    assert_eq!(decide(&config, "10.96.0.20:9080", &jason), "r0");
    assert_eq!(decide(&config, "10.96.0.20:9080", &Req::default()), "r1");
    // The other port of the same host has no table: the default route.
    assert_eq!(
        decide(&config, "10.96.0.20:9090", &Req::default()),
        "default"
    );
    // Another host without a VirtualService: the default route.
    assert_eq!(
        decide(&config, "10.96.0.30:9080", &Req::default()),
        "default"
    );

    let ored = snapshot(json!({"routes": [{"host": HOST, "port": 9080, "http": [
        {"matches": [{"uri": {"exact": "/a"}}, {"uri": {"exact": "/b"}}],
         "action": {"route": [{"host": HOST, "subset": "ab", "weight": 1}]}},
        {"action": {"route": [{"host": HOST, "subset": "rest", "weight": 1}]}}
    ]}]}));
    for (path, subset) in [("/a", "ab"), ("/b", "ab"), ("/c", "rest")] {
        let req = Req {
            path,
            ..Req::default()
        };
        assert_eq!(decide(&ored, "10.96.0.20:9080", &req), subset, "{path}");
    }
    let matched = with_decision(
        &ored,
        "10.96.0.20:9080",
        &Req {
            path: "/b",
            ..Req::default()
        },
        |d| match d {
            HttpDecision::Matched(m) => Some((m.index, m.matched.and_then(|b| b.uri.clone()))),
            _ => None,
        },
    );
    assert_eq!(
        matched,
        Some((0, Some(StringMatch::Exact("/b".into())))),
        "the block that matched is reported"
    );
}

#[test]
fn weighted_choice_follows_the_draw() {
    let destinations: Vec<WeightedDestination> = serde_json::from_value(json!([
        {"host": "a", "subset": "v1", "weight": 75},
        {"host": "a", "subset": "v2", "weight": 20},
        {"host": "a", "subset": "v3", "weight": 5}
    ]))
    .unwrap();
    let cases = [
        (0, "v1"),
        (74, "v1"),
        (75, "v2"),
        (94, "v2"),
        (95, "v3"),
        (99, "v3"),
        (100, "v1"),
        (175, "v2"),
    ];
    for (draw, subset) in cases {
        assert_eq!(
            pick_weighted(&destinations, draw).map(|d| d.subset.as_str()),
            Some(subset),
            "draw {draw}"
        );
    }
    assert!(pick_weighted(&[], 3).is_none());
}

#[test]
fn targets_resolve_services_subsets_ports_and_clusters() {
    let config = snapshot(json!({"clusters": [
        {"host": HOST, "port": 0, "lb": "random"},
        {"host": HOST, "subset": "v2", "port": 9080, "selector": {"version": "v2"}, "lb": "roundRobin"}
    ]}));
    // (host, subset, destination port, request port, expected (port, cluster LB))
    type Case<'a> = (&'a str, &'a str, Option<u16>, u16, Option<(u16, &'a str)>);
    let cases: [Case<'_>; 6] = [
        (HOST, "v2", None, 9080, Some((9080, "roundRobin"))),
        (HOST, "", None, 9080, Some((9080, "random"))),
        (HOST, "", Some(9090), 9080, Some((9090, "random"))),
        ("reviews.default", "", None, 9080, Some((9080, "random"))),
        ("ratings.default.svc.cluster.local", "", Some(1), 9080, None),
        ("nowhere", "", None, 9080, None),
    ];
    for (host, subset, port, request_port, expected) in cases {
        let got = resolve_target(&config, host, subset, port, request_port).map(|t| {
            (
                t.port.port,
                t.cluster.map_or("none".to_owned(), |c| {
                    serde_json::to_value(&c.lb)
                        .unwrap()
                        .as_str()
                        .unwrap_or("")
                        .to_owned()
                }),
            )
        });
        assert_eq!(
            got,
            expected.map(|(p, lb)| (p, lb.to_owned())),
            "{host}/{subset}:{port:?}"
        );
    }
    // A lone-port service accepts a destination without port from any request port.
    let ratings =
        resolve_target(&config, "ratings.default.svc.cluster.local", "", None, 80).unwrap();
    assert_eq!((ratings.port.port, ratings.cluster.is_none()), (9080, true));
    let destination = lookup(&config, "10.96.0.20:9080".parse().unwrap()).unwrap();
    assert_eq!(
        default_target(&config, &destination)
            .cluster
            .map(|c| c.port),
        Some(0)
    );
}

#[test]
fn rewrites_redirects_faults_mirrors_and_cors() {
    let prefix = HttpMatch {
        uri: Some(StringMatch::Prefix("/v1/".into())),
        ..HttpMatch::default()
    };
    let exact = HttpMatch {
        uri: Some(StringMatch::Exact("/v1/x".into())),
        ..HttpMatch::default()
    };
    let rewrite = |value: serde_json::Value| -> Rewrite { serde_json::from_value(value).unwrap() };
    let cases = [
        (
            rewrite(json!({"uri": "/v2/"})),
            Some(&prefix),
            "/v1/users",
            "/v2/users",
        ),
        (
            rewrite(json!({"uri": "/v2/"})),
            Some(&exact),
            "/v1/x",
            "/v2/",
        ),
        (rewrite(json!({"uri": "/"})), None, "/anything", "/"),
        (
            rewrite(
                json!({"uriRegex": {"match": "^/service/([^/]+)(/.*)$", "rewrite": "\\2/instance/\\1"}}),
            ),
            None,
            "/service/foo/v1/api",
            "/v1/api/instance/foo",
        ),
        (
            rewrite(json!({"uriRegex": {"match": "a", "rewrite": "$b"}})),
            None,
            "/aa",
            "/$b$b",
        ),
        (
            rewrite(json!({"authority": "other"})),
            None,
            "/keep",
            "/keep",
        ),
    ];
    for (rw, matched, path, expected) in cases {
        assert_eq!(
            rewrite_path(&rw, matched, path),
            expected,
            "{rw:?} on {path}"
        );
    }

    let headers = HeaderMap::new();
    let labels = BTreeMap::new();
    let request = RequestAttributes {
        method: "GET",
        path: "/old",
        query: "a=1",
        authority: &crate::host::Authority::parse("Shop.:8080"),
        scheme: "http",
        headers: &headers,
        source_labels: &labels,
        source_namespace: "default",
        port: 8080,
    };
    let redirect =
        |value: serde_json::Value| -> Redirect { serde_json::from_value(value).unwrap() };
    let cases = [
        (
            redirect(json!({"uri": "/new", "code": 301})),
            "http://shop:8080/new",
        ),
        (redirect(json!({"code": 302})), "http://shop:8080/old?a=1"),
        (
            redirect(json!({"authority": "store", "code": 301})),
            "http://store/old?a=1",
        ),
        (
            redirect(json!({"scheme": "https", "port": {"number": 8443}, "code": 301})),
            "https://shop:8443/old?a=1",
        ),
        (
            redirect(json!({"scheme": "https", "port": "fromProtocolDefault", "code": 301})),
            "https://shop/old?a=1",
        ),
        (
            redirect(json!({"authority": "x", "port": "fromRequestPort", "code": 301})),
            "http://x:8080/old?a=1",
        ),
    ];
    for (r, expected) in cases {
        assert_eq!(redirect_location(&r, &request), expected, "{r:?}");
    }

    let fault: Fault = serde_json::from_value(json!({
        "delay": {"fixedDelayMs": 5000, "percentage": 100_000},
        "abort": {"status": {"grpc": 14}, "percentage": 500_000}
    }))
    .unwrap();
    let cases = [
        (0, 0, Some(5000), Some(AbortStatus::Grpc(14))),
        (99_999, 499_999, Some(5000), Some(AbortStatus::Grpc(14))),
        (100_000, 500_000, None, None),
        (1_000_000, 1_500_000, Some(5000), None),
    ];
    for (delay_draw, abort_draw, delay, abort) in cases {
        assert_eq!(
            decide_fault(&fault, delay_draw, abort_draw),
            FaultDecision {
                delay_ms: delay,
                abort
            },
            "{delay_draw} {abort_draw}"
        );
    }
    let http_abort: Fault =
        serde_json::from_value(json!({"abort": {"status": {"http": 503}}})).unwrap();
    assert_eq!(
        decide_fault(&http_abort, 7, 999_999).abort,
        Some(AbortStatus::Http(503)),
        "no percentage is 100 %"
    );

    let mirrors: Vec<Mirror> = serde_json::from_value(json!([
        {"host": "a", "percentage": 250_000},
        {"host": "b"}
    ]))
    .unwrap();
    let mut draws = [10u64, 0].into_iter();
    let chosen: Vec<_> = mirrors_for(&mirrors, || draws.next().unwrap())
        .iter()
        .map(|m| m.host.as_str())
        .collect();
    assert_eq!(chosen, ["a", "b"]);
    let mut draws = [300_000u64, 999_999].into_iter();
    let chosen: Vec<_> = mirrors_for(&mirrors, || draws.next().unwrap())
        .iter()
        .map(|m| m.host.as_str())
        .collect();
    assert_eq!(chosen, ["b"]);

    let cors: trellis_config::traffic::CorsPolicy = serde_json::from_value(json!({
        "allowOrigins": [{"exact": "https://a.example"}, {"regex": "https://.*\\.b\\.example"}]
    }))
    .unwrap();
    for (origin, allowed) in [
        ("https://a.example", true),
        ("https://x.b.example", true),
        ("https://c.example", false),
    ] {
        assert_eq!(cors.allows_origin(origin), allowed, "{origin}");
    }
}

#[test]
fn redirect_and_direct_response_routes_are_returned_as_actions() {
    let config = snapshot(json!({"routes": [{"host": HOST, "port": 9080, "http": [
        {"matches": [{"uri": {"exact": "/moved"}}], "action": {"redirect": {"uri": "/new", "code": 308}}},
        {"action": {"directResponse": {"status": 418, "body": {"string": "teapot"}}}}
    ]}]}));
    let moved = Req {
        path: "/moved",
        ..Req::default()
    };
    assert!(with_decision(
        &config,
        "10.96.0.20:9080",
        &moved,
        |d| matches!(d, HttpDecision::Matched(m) if matches!(&m.route.action, HttpAction::Redirect(r) if r.code == 308))
    ));
    assert!(with_decision(
        &config,
        "10.96.0.20:9080",
        &Req::default(),
        |d| matches!(d, HttpDecision::Matched(m) if matches!(&m.route.action, HttpAction::DirectResponse(r) if r.status == 418))
    ));
}

#[test]
fn tcp_and_tls_routes_match_connections() {
    let config = snapshot(json!({"routes": [{"host": HOST, "port": 9090,
    "tcp": [
        {"matches": [{"destinationSubnets": ["10.96.0.0/16"], "sourceLabels": {"app": "a"}}], "route": [{"host": HOST, "subset": "subnet", "weight": 1}]},
        {"matches": [{"port": 9090, "sourceNamespace": "prod"}], "route": [{"host": HOST, "subset": "prod", "weight": 1}]}
    ],
    "tls": [
        {"matches": [{"sniHosts": ["*.example.com"], "port": 9090}], "route": [{"host": HOST, "subset": "wild", "weight": 1}]},
        {"matches": [{"sniHosts": ["example.com"], "destinationSubnets": ["10.96.0.20"]}], "route": [{"host": HOST, "subset": "apex", "weight": 1}]}
    ]}]}));
    let destination = lookup(&config, "10.96.0.20:9090".parse().unwrap()).unwrap();
    let app_a = BTreeMap::from([("app".to_owned(), "a".to_owned())]);
    let none = BTreeMap::new();
    let conn = |ip: &str, labels, ns| ConnectionAttributes {
        destination_ip: ip.parse().unwrap(),
        port: 9090,
        source_labels: labels,
        source_namespace: ns,
    };
    let tcp_cases = [
        (conn("10.96.0.20", &app_a, "dev"), Some("subnet")),
        (conn("10.96.0.20", &none, "prod"), Some("prod")),
        (conn("10.97.0.20", &app_a, "prod"), Some("prod")),
        (conn("10.96.0.20", &none, "dev"), None),
    ];
    for (c, expected) in tcp_cases {
        assert_eq!(
            match_tcp(&config, &destination, &c).map(|r| r.route[0].subset.as_str()),
            expected,
            "{c:?}"
        );
    }
    let tls_cases = [
        ("api.example.com", "10.1.1.1", Some("wild")),
        ("a.b.EXAMPLE.com", "10.1.1.1", Some("wild")),
        ("example.com", "10.96.0.20", Some("apex")),
        ("example.com", "10.96.0.21", None),
        ("example.org", "10.96.0.20", None),
    ];
    for (sni, ip, expected) in tls_cases {
        assert_eq!(
            match_tls(&config, &destination, sni, &conn(ip, &none, "dev"))
                .map(|r| r.route[0].subset.as_str()),
            expected,
            "{sni} {ip}"
        );
    }
}

#[test]
fn subnets() {
    let cases = [
        ("10.0.0.0/8", "10.200.1.1", true),
        ("10.0.0.0/8", "11.0.0.1", false),
        ("10.1.2.3", "10.1.2.3", true),
        ("0.0.0.0/0", "8.8.8.8", true),
        ("fd00::/8", "fd12::1", true),
        ("fd00::/8", "10.0.0.1", false),
        ("garbage", "10.0.0.1", false),
    ];
    for (cidr, ip, expected) in cases {
        assert_eq!(
            in_subnet(cidr, ip.parse().unwrap()),
            expected,
            "{cidr} {ip}"
        );
    }
}
