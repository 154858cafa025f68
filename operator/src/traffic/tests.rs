use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::ResourceExt;
use serde_json::{Value, json};
use trellis_config::proxy::Protocol;
use trellis_config::traffic::{Cluster, HttpAction, Location, Resolution, StringMatch, TlsMode};

use super::virtual_service::grpc_code;
use super::*;

const ROOT: &str = "trellis-system";

fn svc(name: &str, ns: &str, ports: &[(&str, u16)]) -> Service {
    serde_json::from_value(json!({
        "hostnames": [format!("{name}.{ns}.svc.cluster.local"), format!("{name}.{ns}.svc"), format!("{name}.{ns}")],
        "namespace": ns,
        "vips": [],
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "targetPort": p, "protocol": "http"})).collect::<Vec<_>>(),
        "endpoints": []
    }))
    .unwrap()
}

fn services() -> Vec<Service> {
    vec![
        svc("reviews", "bookinfo", &[("http", 9080), ("grpc", 9090)]),
        svc("ratings", "bookinfo", &[("http", 9080)]),
        svc("details", "other", &[("http", 80)]),
    ]
}

fn meta(name: &str, ns: &str, created: &str) -> Value {
    json!({"name": name, "namespace": ns, "creationTimestamp": created})
}

fn vs(name: &str, ns: &str, created: &str, spec: Value) -> VirtualService {
    serde_json::from_value(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta(name, ns, created), "spec": spec}))
        .unwrap()
}

fn dr(name: &str, ns: &str, created: &str, spec: Value) -> DestinationRule {
    serde_json::from_value(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": meta(name, ns, created), "spec": spec}))
        .unwrap()
}

fn se(name: &str, ns: &str, spec: Value) -> ServiceEntry {
    serde_json::from_value(json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": meta(name, ns, "2024-01-01T00:00:00Z"), "spec": spec}))
        .unwrap()
}

struct World {
    virtual_services: Vec<VirtualService>,
    destination_rules: Vec<DestinationRule>,
    service_entries: Vec<ServiceEntry>,
    services: Vec<Service>,
    pods: Vec<Pod>,
}

impl World {
    fn new() -> Self {
        Self {
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            service_entries: Vec::new(),
            services: services(),
            pods: Vec::new(),
        }
    }

    fn compile(&self, namespace: &str) -> NamespaceTraffic {
        let inputs = TrafficInputs {
            virtual_services: &self.virtual_services,
            destination_rules: &self.destination_rules,
            service_entries: &self.service_entries,
            services: &self.services,
            pods: &self.pods,
            root_namespace: ROOT,
            trust_domain: "cluster.local",
        };
        let compiled = compile_for_namespace(&inputs, namespace);
        compiled
            .traffic
            .validate()
            .expect("the compile only emits valid traffic config");
        compiled
    }
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

/// Compiles one VirtualService for `reviews` with the given http route and returns the compiled
/// route on port 9080 as JSON (or `null` when it was skipped), with the warnings.
fn http_route_json(route: Value) -> (Value, Vec<String>) {
    let mut world = World::new();
    world.virtual_services.push(vs(
        "r",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"hosts": ["reviews"], "http": [route]}),
    ));
    let compiled = world.compile("bookinfo");
    let route = compiled
        .traffic
        .route_table(REVIEWS, 9080)
        .and_then(|t| t.http.first())
        .map_or(Value::Null, |r| serde_json::to_value(r).unwrap());
    (route, compiled.warnings)
}

#[test]
fn every_http_route_field_compiles() {
    let to_reviews = json!([{"destination": {"host": "reviews"}}]);
    let dest = json!([{"host": REVIEWS, "weight": 100}]);
    // (input route fields besides `route`, expected fields of the compiled route besides
    // `action` and `retries` when those are the defaults)
    let cases: Vec<(Value, Value)> = vec![
        (json!({"name": "r1"}), json!({"name": "r1"})),
        (
            json!({"match": [{"uri": {"exact": "/a"}}]}),
            json!({"matches": [{"uri": {"exact": "/a"}}]}),
        ),
        (
            json!({"match": [{"uri": {"prefix": "/a"}, "ignoreUriCase": true}]}),
            json!({"matches": [{"uri": {"prefix": "/a"}, "ignoreUriCase": true}]}),
        ),
        (
            json!({"match": [{"uri": {"regex": "/v[0-9]"}}]}),
            json!({"matches": [{"uri": {"regex": "/v[0-9]"}}]}),
        ),
        (json!({"match": [{"uri": {}}]}), json!({"matches": [{}]})),
        (
            json!({"match": [{"scheme": {"exact": "https"}, "method": {"exact": "GET"}, "authority": {"prefix": "rev"}}]}),
            json!({"matches": [{"scheme": {"exact": "https"}, "method": {"exact": "GET"}, "authority": {"prefix": "rev"}}]}),
        ),
        (
            json!({"match": [{"headers": {"End-User": {"exact": "jason"}, "x-debug": {}}}]}),
            json!({"matches": [{"headers": {"end-user": {"exact": "jason"}, "x-debug": "present"}}]}),
        ),
        (
            json!({"match": [{"withoutHeaders": {"X-Canary": {}}}]}),
            json!({"matches": [{"withoutHeaders": {"x-canary": "present"}}]}),
        ),
        (
            json!({"match": [{"queryParams": {"Ver": {"exact": "2"}}}]}),
            json!({"matches": [{"queryParams": {"Ver": {"exact": "2"}}}]}),
        ),
        (
            json!({"match": [{"port": 9080}]}),
            json!({"matches": [{"port": 9080}]}),
        ),
        (
            json!({"match": [{"sourceLabels": {"app": "productpage"}, "sourceNamespace": "bookinfo", "name": "m"}]}),
            json!({"matches": [{"name": "m", "sourceLabels": {"app": "productpage"}, "sourceNamespace": "bookinfo"}]}),
        ),
        (
            json!({"match": [{"uri": {"exact": "/gw"}, "gateways": ["ingress"]}, {"uri": {"exact": "/mesh"}, "gateways": ["mesh"]}]}),
            json!({"matches": [{"uri": {"exact": "/mesh"}}]}),
        ),
        (json!({"timeout": "1.5s"}), json!({"timeoutMs": 1500})),
        (json!({"timeout": "0s"}), json!({})),
        (
            json!({"headers": {"request": {"set": {"X-A": "1"}, "add": {"x-b": "2"}, "remove": ["X-C"]}, "response": {"set": {"x-d": "4"}}}}),
            json!({"headers": {"request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]}, "response": {"set": {"x-d": "4"}}}}),
        ),
        (
            json!({"rewrite": {"uri": "/v2", "authority": "ratings"}}),
            json!({"rewrite": {"uri": "/v2", "authority": "ratings"}}),
        ),
        (
            json!({"rewrite": {"uriRegexRewrite": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}}}),
            json!({"rewrite": {"uriRegex": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}}}),
        ),
        (
            json!({"fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 10.0}}}}),
            json!({"fault": {"delay": {"fixedDelayMs": 5000, "percentage": 100_000}}}),
        ),
        (
            json!({"fault": {"delay": {"fixedDelay": "7s", "percent": 50}}}),
            json!({"fault": {"delay": {"fixedDelayMs": 7000, "percentage": 500_000}}}),
        ),
        (
            json!({"fault": {"delay": {"fixedDelay": "1s"}}}),
            json!({"fault": {"delay": {"fixedDelayMs": 1000, "percentage": 0}}}),
        ),
        (
            json!({"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100.0}}}}),
            json!({"fault": {"abort": {"status": {"http": 503}}}}),
        ),
        (
            json!({"fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.1}}}}),
            json!({"fault": {"abort": {"status": {"grpc": 14}, "percentage": 1000}}}),
        ),
        (
            json!({"mirror": {"host": "ratings"}}),
            json!({"mirrors": [{"host": "ratings.bookinfo.svc.cluster.local"}]}),
        ),
        (
            json!({"mirror": {"host": "ratings", "subset": "v2", "port": {"number": 9080}}, "mirrorPercentage": {"value": 25.0}}),
            json!({"mirrors": [{"host": "ratings.bookinfo.svc.cluster.local", "subset": "v2", "port": 9080, "percentage": 250_000}]}),
        ),
        (
            json!({"mirror": {"host": "ratings"}, "mirrorPercent": 5}),
            json!({"mirrors": [{"host": "ratings.bookinfo.svc.cluster.local", "percentage": 50_000}]}),
        ),
        (
            json!({"mirrors": [{"destination": {"host": "details.other"}}, {"destination": {"host": "ext.example.com"}, "percentage": {"value": 1.0}}]}),
            json!({"mirrors": [{"host": "details.other.svc.cluster.local"}, {"host": "ext.example.com", "percentage": 10_000}]}),
        ),
        (
            json!({"corsPolicy": {"allowOrigins": [{"exact": "https://a"}, {"regex": "https://.*\\.b"}], "allowOrigin": ["https://old"], "allowMethods": ["GET"], "allowHeaders": ["x-h"], "exposeHeaders": ["x-e"], "maxAge": "24h", "allowCredentials": true}}),
            json!({"cors": {"allowOrigins": [{"exact": "https://a"}, {"regex": "https://.*\\.b"}, {"exact": "https://old"}], "allowMethods": ["GET"], "allowHeaders": ["x-h"], "exposeHeaders": ["x-e"], "maxAgeMs": 86_400_000, "allowCredentials": true}}),
        ),
    ];
    for (fields, expected_fields) in cases {
        let mut route = fields.clone();
        route["route"] = to_reviews.clone();
        let (got, warnings) = http_route_json(route);
        let mut expected = expected_fields.clone();
        expected["action"] = json!({"route": dest});
        assert_eq!(got, expected, "input {fields}; warnings {warnings:?}");
    }
}

#[test]
fn http_actions_retries_and_weights_compile() {
    let dest = |host: &str| json!({"destination": {"host": host}});
    // (route, expected action, expected retries (null = default))
    let cases: Vec<(Value, Value, Value)> = vec![
        (
            json!({"route": [
            {"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}, "weight": 75,
             "headers": {"request": {"set": {"x-v": "1"}}}},
            {"destination": {"host": "reviews.bookinfo", "subset": "v2"}, "weight": 25}]}),
            json!({"route": [
            {"host": REVIEWS, "subset": "v1", "port": 9080, "weight": 75, "headers": {"request": {"set": {"x-v": "1"}}}},
            {"host": REVIEWS, "subset": "v2", "weight": 25}]}),
            Value::Null,
        ),
        (
            json!({"route": [dest("reviews"), dest("ratings")]}),
            json!({"route": [{"host": REVIEWS, "weight": 1}, {"host": "ratings.bookinfo.svc.cluster.local", "weight": 1}]}),
            Value::Null,
        ),
        (
            json!({"route": [dest("unknown.example.com")]}),
            json!({"route": [{"host": "unknown.example.com", "weight": 100}]}),
            Value::Null,
        ),
        (
            json!({"redirect": {"uri": "/new", "authority": "a", "scheme": "https", "port": 8443, "redirectCode": 308}}),
            json!({"redirect": {"uri": "/new", "authority": "a", "scheme": "https", "port": {"number": 8443}, "code": 308}}),
            Value::Null,
        ),
        (
            json!({"redirect": {"derivePort": "FROM_PROTOCOL_DEFAULT"}}),
            json!({"redirect": {"port": "fromProtocolDefault", "code": 301}}),
            Value::Null,
        ),
        (
            json!({"redirect": {"derivePort": "FROM_REQUEST_PORT"}}),
            json!({"redirect": {"port": "fromRequestPort", "code": 301}}),
            Value::Null,
        ),
        (
            json!({"directResponse": {"status": 503, "body": {"string": "down"}}}),
            json!({"directResponse": {"status": 503, "body": {"string": "down"}}}),
            Value::Null,
        ),
        (
            json!({"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}),
            json!({"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}),
            Value::Null,
        ),
        (
            json!({"route": [dest("reviews")], "retries": {"attempts": 0}}),
            json!({"route": [{"host": REVIEWS, "weight": 100}]}),
            json!({"attempts": 0, "retryOn": {"conditions": ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"], "statusCodes": [503]}}),
        ),
        (
            json!({"route": [dest("reviews")], "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,429"}}),
            json!({"route": [{"host": REVIEWS, "weight": 100}]}),
            json!({"attempts": 3, "perTryTimeoutMs": 2000, "retryOn": {"conditions": ["5xx", "retriable-status-codes"], "statusCodes": [429]}}),
        ),
        (
            json!({"route": [dest("reviews")], "retries": {"attempts": 4}}),
            json!({"route": [{"host": REVIEWS, "weight": 100}]}),
            json!({"attempts": 4, "retryOn": {"conditions": ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"], "statusCodes": [503]}}),
        ),
    ];
    for (route, action, retries) in cases {
        let (got, warnings) = http_route_json(route.clone());
        assert_eq!(got["action"], action, "{route}: {warnings:?}");
        if !retries.is_null() {
            assert_eq!(got["retries"], retries, "{route}");
        }
    }
}

#[test]
fn broken_routes_are_skipped_with_a_warning_naming_them() {
    let cases = [
        (
            json!({"match": [{"uri": {"regex": "(unclosed"}}], "route": [{"destination": {"host": "reviews"}}]}),
            "VirtualService bookinfo/r http[0]",
        ),
        (
            json!({"match": [{"headers": {"x": {"regex": "*"}}}], "route": [{"destination": {"host": "reviews"}}]}),
            "headers.x: invalid regex",
        ),
        (json!({"route": []}), "no route, redirect or directResponse"),
        (
            json!({"delegate": {"name": "d"}}),
            "delegate is not supported",
        ),
    ];
    for (route, warning) in cases {
        let (got, warnings) = http_route_json(route.clone());
        assert_eq!(got, Value::Null, "{route} must be skipped");
        assert!(
            warnings.iter().any(|w| w.contains(warning)),
            "{route}: {warnings:?}"
        );
    }
    // A route bound to gateways only is not for sidecars: skipped, and nothing is wrong.
    let (got, warnings) = http_route_json(
        json!({"match": [{"gateways": ["ingress"]}], "route": [{"destination": {"host": "reviews"}}]}),
    );
    assert_eq!((got, warnings), (Value::Null, Vec::<String>::new()));
    // A field that cannot be parsed is dropped with a warning; the route stays.
    let (got, warnings) = http_route_json(
        json!({"timeout": "soon", "retries": {"attempts": 3, "retryOn": "5xx,sometimes"}, "route": [{"destination": {"host": "reviews"}}]}),
    );
    assert!(got.get("timeoutMs").is_none());
    assert_eq!(
        got["retries"]["retryOn"]["conditions"][0],
        "connect-failure"
    );
    assert!(
        warnings.iter().any(|w| w.contains("timeout ignored")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("unknown condition \"sometimes\"")),
        "{warnings:?}"
    );
}

#[test]
fn virtual_services_merge_in_creation_order_and_respect_visibility() {
    let route_to =
        |subset: &str| json!([{"route": [{"destination": {"host": "reviews", "subset": subset}}]}]);
    let mut world = World::new();
    world.virtual_services = vec![
        vs(
            "newer",
            "bookinfo",
            "2024-02-01T00:00:00Z",
            json!({"hosts": ["reviews"], "http": route_to("newer")}),
        ),
        vs(
            "older",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"hosts": ["reviews.bookinfo.svc.cluster.local"], "http": route_to("older")}),
        ),
        vs(
            "private",
            "bookinfo",
            "2023-01-01T00:00:00Z",
            json!({"hosts": ["reviews"], "exportTo": ["."], "http": route_to("private")}),
        ),
        vs(
            "to-other",
            "bookinfo",
            "2023-06-01T00:00:00Z",
            json!({"hosts": ["reviews"], "exportTo": ["other"], "http": route_to("to-other")}),
        ),
        vs(
            "hidden",
            "bookinfo",
            "2023-01-01T00:00:00Z",
            json!({"hosts": ["reviews"], "exportTo": ["~"], "http": route_to("hidden")}),
        ),
        vs(
            "gateway-only",
            "bookinfo",
            "2023-01-01T00:00:00Z",
            json!({"hosts": ["reviews"], "gateways": ["istio-system/ingress"], "http": route_to("gw")}),
        ),
        vs(
            "mesh-and-gateway",
            "bookinfo",
            "2025-01-01T00:00:00Z",
            json!({"hosts": ["reviews"], "gateways": ["ingress", "mesh"], "http": route_to("both")}),
        ),
    ];
    let subsets = |ns: &str| -> Vec<String> {
        world
            .compile(ns)
            .traffic
            .route_table(REVIEWS, 9080)
            .map(|t| {
                t.http
                    .iter()
                    .map(|r| match &r.action {
                        HttpAction::Route(d) => d[0].subset.clone(),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(subsets("bookinfo"), ["private", "older", "newer", "both"]);
    assert_eq!(subsets("other"), ["to-other", "older", "newer", "both"]);
    assert_eq!(subsets("third"), ["older", "newer", "both"]);
}

#[test]
fn routes_spread_over_the_ports_and_hosts_they_cover() {
    let mut world = World::new();
    world.virtual_services = vec![
        vs(
            "ports",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"hosts": ["reviews"], "http": [
                {"match": [{"port": 9090}], "route": [{"destination": {"host": "reviews", "subset": "grpc"}}]},
                {"match": [{"port": 9080, "uri": {"prefix": "/a"}}, {"port": 9090, "uri": {"prefix": "/b"}}], "route": [{"destination": {"host": "reviews", "subset": "ab"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "all"}}]}
            ]}),
        ),
        vs(
            "wild",
            "other",
            "2024-01-01T00:00:00Z",
            json!({"hosts": ["*.bookinfo.svc.cluster.local"], "http": [
                {"route": [{"destination": {"host": "ratings.bookinfo.svc.cluster.local", "subset": "wild"}}]}
            ]}),
        ),
    ];
    let compiled = world.compile("bookinfo");
    let table = |host: &str, port: u16| -> Vec<(String, Vec<String>)> {
        compiled
            .traffic
            .route_table(host, port)
            .map(|t| {
                t.http
                    .iter()
                    .map(|r| {
                        let subset = match &r.action {
                            HttpAction::Route(d) => d[0].subset.clone(),
                            _ => String::new(),
                        };
                        let uris = r
                            .matches
                            .iter()
                            .filter_map(|m| match &m.uri {
                                Some(StringMatch::Prefix(p)) => Some(p.clone()),
                                _ => None,
                            })
                            .collect();
                        (subset, uris)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let s = |v: &str| v.to_owned();
    assert_eq!(
        table(REVIEWS, 9080),
        [
            (s("ab"), vec![s("/a")]),
            (s("all"), vec![]),
            (s("wild"), vec![])
        ]
    );
    assert_eq!(
        table(REVIEWS, 9090),
        [
            (s("grpc"), vec![]),
            (s("ab"), vec![s("/b")]),
            (s("all"), vec![]),
            (s("wild"), vec![])
        ]
    );
    assert_eq!(
        table("ratings.bookinfo.svc.cluster.local", 9080),
        [(s("wild"), vec![])]
    );
    assert!(
        compiled
            .traffic
            .route_table("details.other.svc.cluster.local", 80)
            .is_none(),
        "not covered"
    );
}

#[test]
fn tcp_and_tls_routes_compile() {
    let mut world = World::new();
    world.virtual_services = vec![vs(
        "l4",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"hosts": ["reviews"],
        "tcp": [
            {"match": [{"port": 9090, "destinationSubnets": ["10.0.0.0/8"], "sourceLabels": {"app": "a"}, "sourceNamespace": "x"}],
             "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80}, {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]},
            {"match": [{"gateways": ["ingress"]}], "route": [{"destination": {"host": "reviews"}}]},
            {"route": [{"destination": {"host": "ratings"}}]}
        ],
        "tls": [
            {"match": [{"sniHosts": ["*.example.com"], "port": 9080}], "route": [{"destination": {"host": "reviews"}}]},
            {"match": [{"destinationSubnets": ["10.0.0.1"]}], "route": [{"destination": {"host": "reviews"}}]}
        ]}),
    )];
    let compiled = world.compile("bookinfo");
    assert!(
        compiled
            .warnings
            .iter()
            .any(|w| w.contains("tls[1]: a TLS route needs a match with sniHosts")),
        "{:?}",
        compiled.warnings
    );
    let t9090 = compiled.traffic.route_table(REVIEWS, 9090).unwrap();
    assert_eq!(
        serde_json::to_value(&t9090.tcp).unwrap(),
        json!([
            {"matches": [{"destinationSubnets": ["10.0.0.0/8"], "port": 9090, "sourceLabels": {"app": "a"}, "sourceNamespace": "x"}],
             "route": [{"host": REVIEWS, "subset": "v1", "weight": 80}, {"host": REVIEWS, "subset": "v2", "weight": 20}]},
            {"route": [{"host": "ratings.bookinfo.svc.cluster.local", "weight": 100}]}
        ])
    );
    assert!(t9090.tls.is_empty(), "the TLS route is bound to port 9080");
    let t9080 = compiled.traffic.route_table(REVIEWS, 9080).unwrap();
    assert_eq!(t9080.tcp.len(), 1, "the port-9090 TCP route is not on 9080");
    assert_eq!(
        serde_json::to_value(&t9080.tls).unwrap(),
        json!([{"matches": [{"sniHosts": ["*.example.com"], "port": 9080}], "route": [{"host": REVIEWS, "weight": 100}]}])
    );
}

fn cluster_of<'a>(
    compiled: &'a NamespaceTraffic,
    host: &str,
    subset: &str,
    port: u16,
) -> Option<&'a Cluster> {
    compiled.traffic.cluster(host, subset, port)
}

#[test]
fn destination_rule_lookup_follows_istio_precedence() {
    let rule = |name: &str, ns: &str, created: &str, host: &str, export: Value| {
        dr(
            name,
            ns,
            created,
            json!({"host": host, "exportTo": export, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}, "subsets": [{"name": name, "labels": {"rule": name}}]}),
        )
    };
    let t = "2024-01-01T00:00:00Z";
    // (rules, client namespace, expected rule name for reviews.bookinfo)
    let cases: Vec<(Vec<DestinationRule>, &str, Option<&str>)> = vec![
        (
            vec![
                rule(
                    "client",
                    "frontend",
                    t,
                    "reviews.bookinfo.svc.cluster.local",
                    json!([]),
                ),
                rule("service", "bookinfo", t, "reviews", json!([])),
                rule("root", ROOT, t, "*.bookinfo.svc.cluster.local", json!([])),
            ],
            "frontend",
            Some("client"),
        ),
        (
            vec![
                rule("service", "bookinfo", t, "reviews", json!([])),
                rule("root", ROOT, t, "*.svc.cluster.local", json!([])),
            ],
            "frontend",
            Some("service"),
        ),
        (
            vec![
                rule("service", "bookinfo", t, "reviews", json!(["."])),
                rule("root", ROOT, t, "*.svc.cluster.local", json!([])),
            ],
            "frontend",
            Some("root"),
        ),
        (
            vec![rule("service", "bookinfo", t, "reviews", json!(["."]))],
            "bookinfo",
            Some("service"),
        ),
        (
            vec![rule(
                "elsewhere",
                "third",
                t,
                "reviews.bookinfo.svc.cluster.local",
                json!(["*"]),
            )],
            "frontend",
            None,
        ),
        (
            vec![rule("short", "frontend", t, "reviews", json!([]))],
            "frontend",
            None,
        ),
        (
            vec![
                rule(
                    "wild",
                    "bookinfo",
                    t,
                    "*.bookinfo.svc.cluster.local",
                    json!([]),
                ),
                rule(
                    "exact",
                    "bookinfo",
                    "2025-01-01T00:00:00Z",
                    "reviews",
                    json!([]),
                ),
            ],
            "x",
            Some("exact"),
        ),
        (
            vec![
                rule(
                    "younger",
                    "bookinfo",
                    "2025-01-01T00:00:00Z",
                    "reviews",
                    json!([]),
                ),
                rule("oldest", "bookinfo", t, "reviews", json!([])),
            ],
            "x",
            Some("oldest"),
        ),
    ];
    for (rules, client, expected) in cases {
        let names: Vec<String> = rules.iter().map(|r| r.name_any()).collect();
        let mut world = World::new();
        world.destination_rules = rules;
        let compiled = world.compile(client);
        let got = compiled
            .traffic
            .clusters
            .iter()
            .find(|c| c.host == REVIEWS && !c.subset.is_empty())
            .map(|c| c.subset.clone());
        assert_eq!(got.as_deref(), expected, "rules {names:?} from {client}");
    }
}

#[test]
fn traffic_policies_merge_like_istio() {
    let mut world = World::new();
    world.destination_rules = vec![dr(
        "reviews",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({
            "host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 100}},
                "outlierDetection": {"consecutive5xxErrors": 7},
                "portLevelSettings": [{"port": {"number": 9090}, "loadBalancer": {"simple": "RANDOM"}}]
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {
                    "loadBalancer": {"simple": "LEAST_REQUEST"},
                    "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 5}}}]
                }}
            ]
        }),
    )];
    let compiled = world.compile("bookinfo");
    let summary = |subset: &str, port: u16| -> (String, Option<u32>, Option<u32>) {
        let c = cluster_of(&compiled, REVIEWS, subset, port).expect("cluster");
        (
            serde_json::to_value(&c.lb)
                .unwrap()
                .as_str()
                .unwrap_or("hash")
                .to_owned(),
            c.connection_pool.max_connections,
            c.outlier_detection
                .as_ref()
                .map(|o| o.consecutive_5xx_errors),
        )
    };
    let s = |v: &str| v.to_owned();
    let cases = [
        // Top level.
        ("", 9080, (s("roundRobin"), Some(100), Some(7))),
        // Port-level settings replace the whole policy for that port (no inheritance).
        ("", 9090, (s("random"), None, None)),
        // A subset without a policy inherits the destination's, port-resolved.
        ("v1", 9080, (s("roundRobin"), Some(100), Some(7))),
        ("v1", 9090, (s("random"), None, None)),
        // The subset's fields override field by field.
        ("v2", 9090, (s("leastRequest"), None, None)),
        // The subset's port-level entry replaces its own policy on that port; its unset fields
        // fall back to the destination's.
        ("v2", 9080, (s("roundRobin"), Some(5), Some(7))),
        ("v2", 1234, (s("leastRequest"), Some(100), Some(7))),
    ];
    for (subset, port, expected) in cases {
        assert_eq!(summary(subset, port), expected, "{subset}:{port}");
    }
    let v2 = cluster_of(&compiled, REVIEWS, "v2", 0).unwrap();
    assert_eq!(
        v2.selector,
        BTreeMap::from([("version".to_owned(), "v2".to_owned())])
    );
    assert!(
        cluster_of(&compiled, "ratings.bookinfo.svc.cluster.local", "", 9080).is_none(),
        "no rule, no cluster"
    );
}

#[test]
fn every_destination_rule_field_compiles() {
    // (trafficPolicy, expected cluster JSON fields besides host)
    let cases: Vec<(Value, Value)> = vec![
        (json!({}), json!({"port": 0, "lb": "leastRequest"})),
        (
            json!({"loadBalancer": {"simple": "LEAST_CONN"}}),
            json!({"port": 0, "lb": "leastRequest"}),
        ),
        (
            json!({"loadBalancer": {"simple": "PASSTHROUGH"}}),
            json!({"port": 0, "lb": "passthrough"}),
        ),
        (
            json!({"loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}}}),
            json!({"port": 0, "lb": {"consistentHash": {"key": {"header": "x-user"}, "ringSize": 0}}}),
        ),
        (
            json!({"loadBalancer": {"consistentHash": {"httpCookie": {"name": "s", "path": "/", "ttl": "10s"}, "ringHash": {"minimumRingSize": 2048}}}}),
            json!({"port": 0, "lb": {"consistentHash": {"key": {"cookie": {"name": "s", "path": "/", "ttlMs": 10000}}, "ringSize": 2048}}}),
        ),
        (
            json!({"loadBalancer": {"consistentHash": {"useSourceIp": true, "minimumRingSize": 64}}}),
            json!({"port": 0, "lb": {"consistentHash": {"key": "sourceIp", "ringSize": 64}}}),
        ),
        (
            json!({"loadBalancer": {"consistentHash": {"httpQueryParameterName": "user"}}}),
            json!({"port": 0, "lb": {"consistentHash": {"key": {"queryParam": "user"}, "ringSize": 0}}}),
        ),
        (
            json!({"connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "30ms", "tcpKeepalive": {"probes": 3, "time": "7200s", "interval": "75s"}, "maxConnectionDuration": "1h", "idleTimeout": "5m"},
                                   "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 2, "maxRequestsPerConnection": 3, "maxRetries": 4, "h2UpgradePolicy": "UPGRADE", "useClientProtocol": true, "maxConcurrentStreams": 5}}}),
            json!({"port": 0, "lb": "leastRequest", "connectionPool": {"maxConnections": 10, "connectTimeoutMs": 30, "tcpKeepalive": {"probes": 3, "timeMs": 7_200_000, "intervalMs": 75_000},
                "maxConnectionDurationMs": 3_600_000, "http1MaxPendingRequests": 1, "http2MaxRequests": 2, "maxRequestsPerConnection": 3, "maxRetries": 4, "idleTimeoutMs": 300_000,
                "maxConcurrentStreams": 5, "h2Upgrade": true, "useClientProtocol": true}}),
        ),
        (
            json!({"outlierDetection": {}}),
            json!({"port": 0, "lb": "leastRequest", "outlierDetection": {"consecutive5xxErrors": 5, "consecutiveGatewayErrors": 0, "intervalMs": 10_000, "baseEjectionTimeMs": 30_000, "maxEjectionPercent": 10, "minHealthPercent": 0}}),
        ),
        (
            json!({"outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 3, "interval": "1s", "baseEjectionTime": "3m", "maxEjectionPercent": 100, "minHealthPercent": 50}}),
            json!({"port": 0, "lb": "leastRequest", "outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 3, "intervalMs": 1000, "baseEjectionTimeMs": 180_000, "maxEjectionPercent": 100, "minHealthPercent": 50}}),
        ),
        (
            json!({"outlierDetection": {"consecutiveErrors": 2}}),
            json!({"port": 0, "lb": "leastRequest", "outlierDetection": {"consecutive5xxErrors": 2, "consecutiveGatewayErrors": 0, "intervalMs": 10_000, "baseEjectionTimeMs": 30_000, "maxEjectionPercent": 10, "minHealthPercent": 0}}),
        ),
        (
            json!({"tls": {"mode": "SIMPLE", "sni": "api.example.com", "subjectAltNames": ["api.example.com"], "caCertificates": "/etc/ca.pem", "insecureSkipVerify": false}}),
            json!({"port": 0, "lb": "leastRequest", "tls": {"mode": "SIMPLE", "sni": "api.example.com", "subjectAltNames": ["api.example.com"], "caCertificates": "/etc/ca.pem"}}),
        ),
        (
            json!({"tls": {"mode": "MUTUAL", "clientCertificate": "/c.pem", "privateKey": "/k.pem", "credentialName": "cred", "insecureSkipVerify": true}}),
            json!({"port": 0, "lb": "leastRequest", "tls": {"mode": "MUTUAL", "clientCertificate": "/c.pem", "privateKey": "/k.pem", "credentialName": "cred", "insecureSkipVerify": true}}),
        ),
        (
            json!({"tls": {"mode": "ISTIO_MUTUAL"}}),
            json!({"port": 0, "lb": "leastRequest", "tls": {"mode": "ISTIO_MUTUAL"}}),
        ),
    ];
    for (policy, expected) in cases {
        let mut world = World::new();
        world.destination_rules = vec![dr(
            "r",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"host": "ratings", "trafficPolicy": policy}),
        )];
        let compiled = world.compile("bookinfo");
        let cluster =
            cluster_of(&compiled, "ratings.bookinfo.svc.cluster.local", "", 0).expect("cluster");
        let mut got = serde_json::to_value(cluster).unwrap();
        got.as_object_mut().unwrap().remove("host");
        assert_eq!(got, expected, "{policy}: {:?}", compiled.warnings);
    }
    let mut world = World::new();
    world.destination_rules = vec![dr(
        "selected",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"host": "ratings", "workloadSelector": {"matchLabels": {"app": "x"}}}),
    )];
    let compiled = world.compile("bookinfo");
    assert!(compiled.traffic.clusters.is_empty());
    assert!(
        compiled
            .warnings
            .iter()
            .any(|w| w.contains("DestinationRule bookinfo/selected: workloadSelector")),
        "{:?}",
        compiled.warnings
    );
}

fn pod(name: &str, ns: &str, ip: &str, labels: Value, meshed: bool) -> Pod {
    let mut labels = labels;
    if meshed {
        labels["security.istio.io/tlsMode"] = json!("istio");
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": "vm", "containers": []},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

#[test]
fn service_entries_become_services() {
    let mut world = World::new();
    world.pods = vec![
        pod("vm-1", "legacy", "10.244.1.5", json!({"app": "vm"}), true),
        pod(
            "vm-2",
            "legacy",
            "10.244.1.6",
            json!({"app": "other"}),
            false,
        ),
        pod(
            "vm-3",
            "elsewhere",
            "10.244.1.7",
            json!({"app": "vm"}),
            false,
        ),
    ];
    world.service_entries = vec![
        se(
            "api",
            "egress",
            json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}], "resolution": "DNS", "location": "MESH_EXTERNAL"}),
        ),
        se(
            "db",
            "egress",
            json!({"hosts": ["db.internal"], "addresses": ["192.0.2.10", "192.0.2.11/32", "198.51.100.0/24"],
            "ports": [{"number": 5432, "name": "tcp-pg", "protocol": "TCP"}, {"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
            "resolution": "STATIC", "location": "MESH_INTERNAL",
            "endpoints": [{"address": "192.0.2.21", "ports": {"tcp-pg": 6432}, "labels": {"role": "primary"}, "serviceAccount": "pg"},
                          {"address": "192.0.2.22", "ports": {"tcp-pg": 6432}},
                          {"address": "db-3.example.com"}]}),
        ),
        se(
            "dns-endpoints",
            "egress",
            json!({"hosts": ["mirror.example.com"], "ports": [{"number": 80, "name": "http"}], "resolution": "DNS_ROUND_ROBIN",
            "endpoints": [{"address": "a.mirror.example.com", "ports": {"http": 8080}, "labels": {"zone": "a"}}]}),
        ),
        se(
            "passthrough",
            "egress",
            json!({"hosts": ["*.wild.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}),
        ),
        se(
            "vms",
            "legacy",
            json!({"hosts": ["vm.legacy.internal"], "ports": [{"number": 9000, "name": "grpc", "protocol": "GRPC"}], "resolution": "STATIC",
            "location": "MESH_INTERNAL", "workloadSelector": {"labels": {"app": "vm"}}}),
        ),
        se(
            "private",
            "egress",
            json!({"hosts": ["private.example.com"], "ports": [{"number": 80, "name": "http"}], "exportTo": ["."]}),
        ),
        se(
            "shadow",
            "egress",
            json!({"hosts": ["reviews.bookinfo.svc.cluster.local"], "ports": [{"number": 80, "name": "http"}]}),
        ),
        se(
            "portless",
            "egress",
            json!({"hosts": ["noport.example.com"]}),
        ),
    ];
    let compiled = world.compile("bookinfo");
    let service = |host: &str| compiled.services.iter().find(|s| s.hostnames == [host]);
    let external = |host: &str| compiled.traffic.external_service(host).cloned();

    let api = service("api.example.com").expect("api");
    assert_eq!(
        (
            api.ports[0].port,
            api.ports[0].target_port,
            api.ports[0].protocol
        ),
        (443, 443, Protocol::Tls)
    );
    assert!(api.vips.is_empty() && api.endpoints.is_empty());
    assert_eq!(
        serde_json::to_value(external("api.example.com")).unwrap(),
        json!({"host": "api.example.com", "location": "MESH_EXTERNAL", "resolution": "DNS", "dnsEndpoints": [{"address": "api.example.com"}]})
    );

    let db = service("db.internal").expect("db");
    assert_eq!(db.namespace, "egress");
    assert_eq!(
        db.vips,
        [
            "192.0.2.10".parse::<IpAddr>().unwrap(),
            "192.0.2.11".parse().unwrap()
        ],
        "a /24 is no VIP"
    );
    let ports: Vec<_> = db
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.target_port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            ("tcp-pg", 5432, 6432, Protocol::Tcp),
            ("http", 80, 8080, Protocol::Http)
        ]
    );
    let endpoints: Vec<_> = db
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.meshed,
                e.identity.clone(),
                e.labels.get("role").map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            (
                "192.0.2.21".to_owned(),
                true,
                Some("spiffe://cluster.local/ns/egress/sa/pg".to_owned()),
                Some("primary".to_owned())
            ),
            ("192.0.2.22".to_owned(), false, None, None),
        ]
    );
    assert_eq!(
        external("db.internal").map(|e| (e.location, e.resolution)),
        Some((Location::MeshInternal, Resolution::Static))
    );

    assert_eq!(
        serde_json::to_value(external("mirror.example.com")).unwrap()["dnsEndpoints"],
        json!([{"address": "a.mirror.example.com", "ports": {"http": 8080}, "labels": {"zone": "a"}}])
    );
    assert_eq!(
        external("*.wild.example.com").map(|e| e.resolution),
        Some(Resolution::None)
    );

    let vms = service("vm.legacy.internal").expect("vms");
    let selected: Vec<_> = vms
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.meshed, e.identity.clone()))
        .collect();
    assert_eq!(
        selected,
        [(
            "10.244.1.5".to_owned(),
            true,
            Some("spiffe://cluster.local/ns/legacy/sa/vm".to_owned())
        )]
    );
    assert_eq!(vms.ports[0].protocol, Protocol::Grpc);

    assert!(
        service("private.example.com").is_none(),
        "exported to its own namespace only"
    );
    assert!(
        world
            .compile("egress")
            .services
            .iter()
            .any(|s| s.hostnames == ["private.example.com"])
    );
    assert!(
        service(REVIEWS).is_none(),
        "a Kubernetes Service keeps its host"
    );
    assert!(service("noport.example.com").is_none());
    for expected in [
        "db-3.example.com is not an IP address",
        "198.51.100.0/24 ignored",
        "reviews.bookinfo.svc.cluster.local is already defined",
        "noport.example.com has no valid port",
    ] {
        assert!(
            compiled.warnings.iter().any(|w| w.contains(expected)),
            "{expected}: {:?}",
            compiled.warnings
        );
    }
}

#[test]
fn service_entry_hosts_take_routes_and_rules() {
    let mut world = World::new();
    world.service_entries = vec![se(
        "api",
        "egress",
        json!({"hosts": ["api.example.com"], "ports": [{"number": 80, "name": "http"}], "resolution": "DNS"}),
    )];
    world.virtual_services = vec![vs(
        "api",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"hosts": ["api.example.com"], "http": [{"timeout": "3s", "route": [{"destination": {"host": "api.example.com"}}]}]}),
    )];
    world.destination_rules = vec![dr(
        "api",
        "egress",
        "2024-01-01T00:00:00Z",
        json!({"host": "api.example.com", "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": "api.example.com"}}}),
    )];
    let compiled = world.compile("bookinfo");
    let table = compiled
        .traffic
        .route_table("api.example.com", 80)
        .expect("routed");
    assert_eq!(table.http[0].timeout_ms, Some(3000));
    let cluster = compiled
        .traffic
        .cluster("api.example.com", "", 80)
        .expect("rule from the entry's namespace");
    assert_eq!(cluster.tls.as_ref().map(|t| t.mode), Some(TlsMode::Simple));
}

#[test]
fn grpc_codes_by_name_or_number() {
    for (name, code) in [
        ("UNAVAILABLE", Some(14)),
        ("cancelled", Some(1)),
        ("13", Some(13)),
        ("17", None),
        ("NOPE", None),
    ] {
        assert_eq!(grpc_code(name), code, "{name}");
    }
}

#[test]
fn a_change_re_versions_only_the_namespaces_it_reaches() {
    let index = |world: &World| {
        TrafficIndex::new(
            TrafficResources {
                virtual_services: world.virtual_services.clone(),
                destination_rules: world.destination_rules.clone(),
                service_entries: world.service_entries.clone(),
            },
            world.services.clone(),
            world.pods.clone(),
            ROOT,
            "cluster.local",
            Arc::default(),
        )
    };
    let base = ProxyConfig {
        version: "base".into(),
        services: services(),
        ..ProxyConfig::default()
    };
    let mut world = World::new();
    let before = index(&world);
    // Without traffic resources a snapshot is unchanged, version included.
    let plain = with_traffic(base.clone(), &before.for_namespace("bookinfo"));
    assert_eq!(plain, base);

    world.virtual_services.push(vs("private", "bookinfo", "2024-01-01T00:00:00Z", json!({
        "hosts": ["reviews"], "exportTo": ["."], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}]
    })));
    world.service_entries.push(se("api", "egress", json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "tls"}], "exportTo": ["egress", "bookinfo"]})));
    let after = index(&world);
    let version = |index: &TrafficIndex, ns: &str| versioned("base", &index.for_namespace(ns));
    assert_ne!(
        version(&after, "bookinfo"),
        version(&before, "bookinfo"),
        "sees both"
    );
    assert_ne!(
        version(&after, "egress"),
        version(&before, "egress"),
        "sees the ServiceEntry"
    );
    assert_eq!(
        version(&after, "other"),
        version(&before, "other"),
        "sees neither"
    );
    // The namespace is compiled once per index and shared by its streams.
    assert!(Arc::ptr_eq(
        &after.for_namespace("bookinfo"),
        &after.for_namespace("bookinfo")
    ));

    let config = with_traffic(base.clone(), &after.for_namespace("bookinfo"));
    assert_eq!(config.version, version(&after, "bookinfo"));
    assert!(config.traffic.route_table(REVIEWS, 9080).is_some());
    let hosts: Vec<&str> = config
        .services
        .iter()
        .map(|s| s.hostnames[0].as_str())
        .collect();
    assert_eq!(
        hosts,
        [
            "api.example.com",
            "details.other.svc.cluster.local",
            "ratings.bookinfo.svc.cluster.local",
            REVIEWS
        ]
    );
    // What the proxy receives is a valid snapshot.
    let wire = serde_json::to_vec(&config).unwrap();
    assert_eq!(ProxyConfig::from_json(&wire).unwrap(), config);
}

#[test]
fn unsupported_fields_are_named_in_warnings() {
    let mut world = World::new();
    world.virtual_services = vec![vs(
        "r",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"hosts": ["reviews"], "http": [
        {"retries": {"attempts": 2, "retryRemoteLocalities": true, "backoff": "1s"}, "route": [{"destination": {"host": "reviews"}}]}
    ], "tcp": [{"match": [{"sourceSubnet": "10.0.0.0/8"}], "route": [{"destination": {"host": "reviews"}}]}]}),
    )];
    world.destination_rules = vec![dr(
        "r",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"host": "reviews",
        "trafficPolicy": {"loadBalancer": {"simple": "RANDOM", "localityLbSetting": {"enabled": true}}, "proxyProtocol": {}, "tls": {"mode": "SIMPLE", "caCrl": "/crl"}},
        "subsets": [{"name": "v1", "labels": {"v": "1"}, "trafficPolicy": {"outlierDetection": {"consecutiveLocalOriginFailures": 3, "splitExternalLocalOriginErrors": true}}}]}),
    )];
    world.service_entries = vec![se(
        "api",
        "egress",
        json!({"hosts": ["api.example.com"], "ports": [{"number": 80, "name": "http"}],
        "subjectAltNames": ["spiffe://x"], "resolution": "STATIC", "endpoints": [{"address": "192.0.2.1", "weight": 3, "locality": "r/z"}]}),
    )];
    let warnings = world.compile("bookinfo").warnings;
    let expected = [
        "VirtualService bookinfo/r http[0]: retries fields not supported, ignored: retryRemoteLocalities, backoff",
        "VirtualService bookinfo/r tcp[0]: sourceSubnet applies to gateways only",
        "DestinationRule bookinfo/r: not supported, ignored: trafficPolicy.loadBalancer.localityLbSetting, trafficPolicy.proxyProtocol, trafficPolicy.tls.caCrl, subsets[v1].trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        "DestinationRule bookinfo/r: splitExternalLocalOriginErrors is not supported",
        "ServiceEntry egress/api: not supported, ignored: subjectAltNames, endpoints[].network/locality, endpoints[].weight",
    ];
    for text in expected {
        assert!(
            warnings.iter().any(|w| w.starts_with(text)),
            "{text}\n{warnings:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The admission webhook and the compiler read Istio the same way: what one admits, the other
// compiles whole.
// ---------------------------------------------------------------------------------------------

use proptest::prelude::*;
use trellis_api::validate::{Kind, validate_object};

/// The webhook's verdict on an object built by `vs`/`dr`, with `destination_rules` being the
/// rules of its namespace.
fn admitted<K: serde::Serialize>(kind: Kind, object: &K, rules: &[DestinationRule]) -> bool {
    let object = serde_json::to_value(object).unwrap();
    let namespace = object["metadata"]["namespace"].as_str().unwrap().to_owned();
    validate_object(kind, &object, &namespace, rules).is_ok()
}

/// Where each duration field of a VirtualService http route lands in the compiled route.
const ROUTE_DURATIONS: &[(&str, &str)] = &[
    ("/timeout", "/timeoutMs"),
    ("/retries/perTryTimeout", "/retries/perTryTimeoutMs"),
    ("/fault/delay/fixedDelay", "/fault/delay/fixedDelayMs"),
    ("/corsPolicy/maxAge", "/cors/maxAgeMs"),
];

/// Where each duration field of a DestinationRule traffic policy lands in the compiled cluster.
const POLICY_DURATIONS: &[(&str, &str)] = &[
    (
        "/loadBalancer/consistentHash/httpCookie/ttl",
        "/lb/consistentHash/key/cookie/ttlMs",
    ),
    ("/outlierDetection/interval", "/outlierDetection/intervalMs"),
    (
        "/outlierDetection/baseEjectionTime",
        "/outlierDetection/baseEjectionTimeMs",
    ),
    (
        "/connectionPool/tcp/connectTimeout",
        "/connectionPool/connectTimeoutMs",
    ),
    (
        "/connectionPool/tcp/maxConnectionDuration",
        "/connectionPool/maxConnectionDurationMs",
    ),
    (
        "/connectionPool/tcp/idleTimeout",
        "/connectionPool/idleTimeoutMs",
    ),
    (
        "/connectionPool/tcp/tcpKeepalive/time",
        "/connectionPool/tcpKeepalive/timeMs",
    ),
    (
        "/connectionPool/http/idleTimeout",
        "/connectionPool/idleTimeoutMs",
    ),
];

/// An http route to `reviews` with every duration-bearing block present and `text` at
/// `pointer`.
fn route_with(pointer: &str, text: &str) -> Value {
    let mut route = json!({
        "route": [{"destination": {"host": "reviews"}}],
        "retries": {"attempts": 2},
        "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 50.0}}},
        "corsPolicy": {"allowOrigins": [{"exact": "https://a"}]},
    });
    set(&mut route, pointer, text);
    route
}

/// A traffic policy with `text` at `pointer`.
fn policy_with(pointer: &str, text: &str) -> Value {
    let mut policy = json!({});
    if pointer.contains("httpCookie") {
        policy = json!({"loadBalancer": {"consistentHash": {"httpCookie": {"name": "s"}}}});
    }
    set(&mut policy, pointer, text);
    policy
}

fn set(value: &mut Value, pointer: &str, text: &str) {
    let mut at = value;
    for key in pointer.trim_start_matches('/').split('/') {
        at = at
            .as_object_mut()
            .expect("an object on the way")
            .entry(key)
            .or_insert_with(|| json!({}));
    }
    *at = json!(text);
}

/// `Ok(compiled value)` for a route duration, or `Err(why)` when the webhook and the compiler
/// disagree; `None` when the webhook refuses the route.
fn route_duration(field: &str, compiled_at: &str, text: &str) -> Option<Result<Value, String>> {
    let route = route_with(field, text);
    let object = vs(
        "r",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"hosts": ["reviews"], "http": [route.clone()]}),
    );
    if !admitted(Kind::VirtualService, &object, &[]) {
        return None;
    }
    let (compiled, warnings) = http_route_json(route);
    Some(match compiled.pointer(compiled_at) {
        Some(value) if warnings.is_empty() => Ok(value.clone()),
        _ => Err(format!(
            "{field} = {text:?} admitted, compiled {compiled} {warnings:?}"
        )),
    })
}

/// As [`route_duration`], for a DestinationRule's traffic policy.
fn policy_duration(field: &str, compiled_at: &str, text: &str) -> Option<Result<Value, String>> {
    let object = dr(
        "r",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"host": "ratings", "trafficPolicy": policy_with(field, text)}),
    );
    if !admitted(Kind::DestinationRule, &object, &[]) {
        return None;
    }
    let mut world = World::new();
    world.destination_rules = vec![object];
    let compiled = world.compile("bookinfo");
    let cluster = cluster_of(&compiled, "ratings.bookinfo.svc.cluster.local", "", 0)
        .map(|c| serde_json::to_value(c).unwrap())
        .unwrap_or_default();
    Some(match cluster.pointer(compiled_at) {
        Some(value) if compiled.warnings.is_empty() => Ok(value.clone()),
        _ => Err(format!(
            "{field} = {text:?} admitted, compiled {cluster} {:?}",
            compiled.warnings
        )),
    })
}

#[test]
fn every_duration_field_is_admitted_and_compiled_when_plain() {
    // Keeps the property test below honest: each base object is valid, so a generated
    // duration decides the verdict alone.
    for (at, compiled_at) in ROUTE_DURATIONS {
        assert_eq!(
            route_duration(at, compiled_at, "2s"),
            Some(Ok(json!(2000))),
            "{at}"
        );
    }
    for (at, compiled_at) in POLICY_DURATIONS {
        assert_eq!(
            policy_duration(at, compiled_at, "2s"),
            Some(Ok(json!(2000))),
            "{at}"
        );
    }
}

#[test]
fn a_cookie_ttl_the_webhook_admits_is_compiled() {
    // Istio sets no minimum on `httpCookie.ttl` (`0s`: a session cookie) and reads it with Go's
    // `time.ParseDuration`, which takes a lone `0`, a `+` sign and `μs`.
    let ttl = POLICY_DURATIONS[0];
    for (text, ms) in [
        ("0", 0),
        ("0s", 0),
        ("+1s", 1000),
        ("1μs", 1),
        ("1.5s", 1500),
    ] {
        assert_eq!(
            policy_duration(ttl.0, ttl.1, text),
            Some(Ok(json!(ms))),
            "{text:?}"
        );
    }
    // What Istio refuses, or Trellis refuses on purpose (a negative ttl), never reaches it.
    for text in ["-1s", "1d", "1 s", ""] {
        assert_eq!(policy_duration(ttl.0, ttl.1, text), None, "{text:?}");
    }
}

#[test]
fn signed_and_micro_durations_are_kept_where_istio_admits_them() {
    assert_eq!(
        route_duration("/timeout", "/timeoutMs", "+1s"),
        Some(Ok(json!(1000)))
    );
    assert_eq!(
        route_duration("/timeout", "/timeoutMs", "1000μs"),
        Some(Ok(json!(1)))
    );
    // Istio's `ValidateDuration`: at least 1ms, whole milliseconds.
    for text in ["0", "0s", "999us", "1500us", "-1s"] {
        assert_eq!(
            route_duration("/timeout", "/timeoutMs", text),
            None,
            "{text:?}"
        );
    }
    let idle = POLICY_DURATIONS[5];
    assert_eq!(policy_duration(idle.0, idle.1, "0s"), Some(Ok(json!(0))));
}

#[test]
fn a_wildcard_destination_rule_host_is_qualified_alike() {
    // `*reviews` has no dot: Istio qualifies it in the rule's namespace like any short name, so
    // the rule covers `myreviews` and defines its only subsets. The webhook must refuse a route
    // to a subset the compiler will not build, and admit one it will.
    let rule = dr(
        "wild",
        "bookinfo",
        "2024-01-01T00:00:00Z",
        json!({"host": "*reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
    );
    let mut world = World::new();
    world
        .services
        .push(svc("myreviews", "bookinfo", &[("http", 9080)]));
    world.destination_rules = vec![rule.clone()];
    let compiled = world.compile("bookinfo");
    for subset in ["v1", "v2"] {
        let route = vs(
            "r",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"hosts": ["myreviews"], "http": [{"route": [{"destination": {"host": "myreviews", "subset": subset}}]}]}),
        );
        let built = cluster_of(
            &compiled,
            "myreviews.bookinfo.svc.cluster.local",
            subset,
            9080,
        )
        .is_some();
        assert_eq!(
            admitted(Kind::VirtualService, &route, std::slice::from_ref(&rule)),
            built,
            "subset {subset}: the webhook's verdict and the compiled clusters disagree"
        );
    }
}

/// Duration strings near and around Go's syntax: signs, a lone `0`, fractions with and
/// without digits on either side, every unit (both micro signs), units Go does not know, and
/// several segments.
fn duration_text() -> impl Strategy<Value = String> {
    let number = (
        prop::option::of(prop_oneof![0u64..10, 0u64..100_000, Just(u64::MAX)]),
        prop::option::of(prop_oneof![Just(String::new()), "[0-9]{1,12}"]),
    )
        .prop_map(|(whole, fraction)| {
            let whole = whole.map(|w| w.to_string()).unwrap_or_default();
            match fraction {
                Some(fraction) => format!("{whole}.{fraction}"),
                None => whole,
            }
        });
    let unit = prop::sample::select(vec![
        "ns", "us", "µs", "μs", "ms", "s", "m", "h", "", "d", "S", " s",
    ]);
    let segments = prop::collection::vec((number, unit), 1..4).prop_map(|segments| {
        segments
            .into_iter()
            .map(|(number, unit)| format!("{number}{unit}"))
            .collect::<String>()
    });
    let sign = prop::sample::select(vec!["", "", "", "+", "-"]);
    prop_oneof![
        8 => (sign, segments).prop_map(|(sign, rest)| format!("{sign}{rest}")),
        1 => prop::sample::select(vec!["0", "+0", "-0", "", "0.0", "00"]).prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn whatever_the_webhook_admits_compiles_without_dropping_a_duration(
        text in duration_text(),
        field in 0..ROUTE_DURATIONS.len() + POLICY_DURATIONS.len(),
    ) {
        let outcome = match ROUTE_DURATIONS.get(field) {
            Some((at, compiled_at)) => route_duration(at, compiled_at, &text),
            None => {
                let (at, compiled_at) = POLICY_DURATIONS[field - ROUTE_DURATIONS.len()];
                policy_duration(at, compiled_at, &text)
            }
        };
        if let Some(compiled) = outcome {
            prop_assert!(compiled.is_ok(), "{}", compiled.unwrap_err());
        }
    }

    #[test]
    fn the_webhook_and_the_compiler_agree_on_subsets_of_generated_hosts(
        rule_host in prop_oneof![
            Just("*".to_owned()),
            "[*]?[a-c]{0,3}reviews",
            "[*]?[a-c]{0,3}reviews[.]bookinfo[.]svc[.]cluster[.]local",
            "[*][.]bookinfo[.]svc[.]cluster[.]local",
        ],
        service in "[a-c]{0,3}reviews",
        subset in prop::sample::select(vec!["v1", "v2"]),
    ) {
        let rule = dr(
            "rule",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"host": rule_host, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
        );
        prop_assume!(admitted(Kind::DestinationRule, &rule, &[]));
        let mut world = World::new();
        world.services = vec![svc(&service, "bookinfo", &[("http", 9080)])];
        world.destination_rules = vec![rule.clone()];
        let compiled = world.compile("bookinfo");
        let fqdn = format!("{service}.bookinfo.svc.cluster.local");
        let route = vs(
            "r",
            "bookinfo",
            "2024-01-01T00:00:00Z",
            json!({"hosts": [&service], "http": [{"route": [{"destination": {"host": &service, "subset": subset}}]}]}),
        );
        // A rule that does not cover the host builds no subset clusters, and then the webhook
        // has nothing to check the subset against (it may be on its way): it admits.
        let covered = cluster_of(&compiled, &fqdn, "", 9080).is_some();
        let built = cluster_of(&compiled, &fqdn, subset, 9080).is_some();
        prop_assert_eq!(
            admitted(Kind::VirtualService, &route, std::slice::from_ref(&rule)),
            built || !covered,
            "rule host {:?}, service {:?}, subset {}", rule_host, service, subset
        );
    }
}
