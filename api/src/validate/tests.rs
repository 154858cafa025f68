use serde_json::{Value, json};

use super::*;

const NAMESPACE: &str = "shop";

/// DestinationRules visible to the VirtualService cases: `reviews` (v1, v2) here, and one for
/// `ratings` in another namespace, which must not count.
fn destination_rules() -> Vec<DestinationRule> {
    let rule = |namespace: &str, name: &str, host: &str, subsets: &[&str]| {
        serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "host": host,
                "subsets": subsets.iter().map(|s| json!({"name": s, "labels": {"version": s}})).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    };
    vec![
        rule(NAMESPACE, "reviews", "reviews", &["v1", "v2"]),
        rule("elsewhere", "ratings", "ratings", &["v1"]),
    ]
}

/// A VirtualService with one HTTP route and `extra` merged into that route.
fn vs_route(extra: Value) -> Value {
    let mut route = json!({"route": [{"destination": {"host": "reviews", "subset": "v1"}}]});
    merge(&mut route, extra);
    json!({"hosts": ["reviews"], "http": [route]})
}

fn merge(target: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
        target.extend(extra);
    }
}

fn dr(extra: Value) -> Value {
    let mut spec =
        json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]});
    merge(&mut spec, extra);
    spec
}

fn se(extra: Value) -> Value {
    let mut spec = json!({
        "hosts": ["api.example.com"],
        "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
        "resolution": "DNS",
    });
    merge(&mut spec, extra);
    spec
}

type Case = (
    &'static str,
    Kind,
    Value,
    Option<(&'static str, &'static str)>,
);

fn cases() -> Vec<Case> {
    use Kind::{DestinationRule as Dr, ServiceEntry as Se, VirtualService as Vs};
    let route_to = |subset: &str, weight: i64| json!({"destination": {"host": "reviews", "subset": subset}, "weight": weight});
    vec![
        // VirtualService: hosts, gateways, delegates.
        ("minimal route", Vs, vs_route(json!({})), None),
        (
            "empty host",
            Vs,
            json!({"hosts": [""], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some(("spec.hosts[0]", "must not be empty")),
        ),
        (
            "bad host",
            Vs,
            json!({"hosts": ["re views"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some(("spec.hosts[0]", "not a valid host")),
        ),
        (
            "wildcard host on the mesh",
            Vs,
            json!({"hosts": ["*"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some((
                "spec.hosts[0]",
                "only allowed for VirtualServices bound to gateways",
            )),
        ),
        (
            "wildcard host on a gateway",
            Vs,
            json!({"hosts": ["*"], "gateways": ["ingress"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            None,
        ),
        (
            "IP host",
            Vs,
            json!({"hosts": ["10.1.2.3"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            None,
        ),
        (
            "delegate without hosts",
            Vs,
            json!({"http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            None,
        ),
        (
            "delegate with gateways",
            Vs,
            json!({"gateways": ["ingress"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some(("spec.gateways", "delegate")),
        ),
        (
            "no hosts with tcp routes",
            Vs,
            json!({"tcp": [{"route": [{"destination": {"host": "db"}}]}]}),
            Some(("spec.hosts", "at least one host is required")),
        ),
        (
            "no routes",
            Vs,
            json!({"hosts": ["reviews"]}),
            Some(("spec", "at least one of http, tls or tcp")),
        ),
        (
            "empty destination host",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": ""}}]}]}),
            Some((
                "spec.http[0].route[0].destination.host",
                "must not be empty",
            )),
        ),
        (
            "bad exportTo",
            Vs,
            json!({"hosts": ["reviews"], "exportTo": ["Not_A_Namespace"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some((
                "spec.exportTo[0]",
                "not \".\", \"*\", \"~\" or a namespace name",
            )),
        ),
        (
            "exportTo star with others",
            Vs,
            json!({"hosts": ["reviews"], "exportTo": ["*", "."], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            Some(("spec.exportTo", "cannot be combined")),
        ),
        // Subsets against the namespace's DestinationRules.
        (
            "subset missing from the rule for the host",
            Vs,
            vs_route(json!({"route": [{"destination": {"host": "reviews", "subset": "v3"}}]})),
            Some((
                "spec.http[0].route[0].destination.subset",
                "subset \"v3\" is not defined by DestinationRule reviews for host \"reviews.shop.svc.cluster.local\"",
            )),
        ),
        (
            "subset missing, host written in full",
            Vs,
            vs_route(
                json!({"route": [{"destination": {"host": "reviews.shop.svc.cluster.local", "subset": "v9"}}]}),
            ),
            Some((
                "spec.http[0].route[0].destination.subset",
                "\"v9\" is not defined",
            )),
        ),
        (
            "subset of a host without rule",
            Vs,
            vs_route(json!({"route": [{"destination": {"host": "details", "subset": "v9"}}]})),
            None,
        ),
        (
            "rule in another namespace does not count",
            Vs,
            vs_route(json!({"route": [{"destination": {"host": "ratings", "subset": "v7"}}]})),
            None,
        ),
        (
            "mirror to a missing subset",
            Vs,
            vs_route(json!({"mirror": {"host": "reviews", "subset": "v5"}})),
            Some(("spec.http[0].mirror.subset", "\"v5\" is not defined")),
        ),
        (
            "tcp route to a missing subset",
            Vs,
            json!({"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews", "subset": "v4"}}]}]}),
            Some((
                "spec.tcp[0].route[0].destination.subset",
                "\"v4\" is not defined",
            )),
        ),
        // Weights.
        (
            "weights adding to 100",
            Vs,
            vs_route(json!({"route": [route_to("v1", 90), route_to("v2", 10)]})),
            None,
        ),
        (
            "negative weight",
            Vs,
            vs_route(json!({"route": [route_to("v1", 50), route_to("v2", -10)]})),
            Some(("spec.http[0].route[1].weight", "must not be negative")),
        ),
        (
            "weights above 100",
            Vs,
            vs_route(json!({"route": [route_to("v1", 80), route_to("v2", 30)]})),
            Some(("spec.http[0].route", "add up to 110, more than 100")),
        ),
        (
            "weights of several destinations all 0",
            Vs,
            vs_route(
                json!({"route": [route_to("v1", 0), {"destination": {"host": "reviews", "subset": "v2"}}]}),
            ),
            Some(("spec.http[0].route", "add up to 0")),
        ),
        (
            "single destination weight 0",
            Vs,
            vs_route(json!({"route": [route_to("v1", 0)]})),
            None,
        ),
        (
            "tcp weight negative",
            Vs,
            json!({"hosts": ["db"], "tcp": [{"route": [{"destination": {"host": "db"}, "weight": -1}]}]}),
            Some(("spec.tcp[0].route[0].weight", "must not be negative")),
        ),
        // Route actions.
        (
            "route and redirect",
            Vs,
            vs_route(json!({"redirect": {"uri": "/new"}})),
            Some((
                "spec.http[0]",
                "only one of route, redirect, directResponse or delegate",
            )),
        ),
        (
            "no action",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"name": "nothing"}]}),
            Some((
                "spec.http[0]",
                "one of route, redirect, directResponse or delegate is required",
            )),
        ),
        (
            "redirect code not 3xx",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"redirect": {"uri": "/new", "redirectCode": 200}}]}),
            Some((
                "spec.http[0].redirect.redirectCode",
                "200 is not a redirect status",
            )),
        ),
        (
            "redirect port and derivePort",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"redirect": {"port": 8080, "derivePort": "FROM_REQUEST_PORT"}}]}),
            Some(("spec.http[0].redirect", "only one of port or derivePort")),
        ),
        (
            "direct response",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"directResponse": {"status": 418, "body": {"string": "teapot"}}}]}),
            None,
        ),
        (
            "direct response status above 599",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"directResponse": {"status": 700}}]}),
            Some((
                "spec.http[0].directResponse.status",
                "700 is not an HTTP status in 200..=599",
            )),
        ),
        (
            "direct response status below 200",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"directResponse": {"status": 100}}]}),
            Some((
                "spec.http[0].directResponse.status",
                "100 is not an HTTP status",
            )),
        ),
        (
            "delegate without name",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"delegate": {"namespace": "x"}}]}),
            Some(("spec.http[0].delegate.name", "name is required")),
        ),
        (
            "mirror and mirrors",
            Vs,
            vs_route(
                json!({"mirror": {"host": "reviews"}, "mirrors": [{"destination": {"host": "reviews"}}]}),
            ),
            Some(("spec.http[0].mirrors", "only one of mirror or mirrors")),
        ),
        // Regexes.
        (
            "valid regexes",
            Vs,
            vs_route(
                json!({"match": [{"uri": {"regex": "^/api/v[0-9]+/.*"}, "headers": {"x-user": {"regex": "(alice|bob)"}}}]}),
            ),
            None,
        ),
        (
            "invalid uri regex",
            Vs,
            vs_route(json!({"match": [{"uri": {"regex": "/api/(v1"}}]})),
            Some((
                "spec.http[0].match[0].uri.regex",
                "invalid RE2 regex \"/api/(v1\"",
            )),
        ),
        (
            "invalid header regex",
            Vs,
            vs_route(json!({"match": [{"headers": {"x-user": {"regex": "[a-"}}}]})),
            Some((
                "spec.http[0].match[0].headers.x-user.regex",
                "invalid RE2 regex",
            )),
        ),
        (
            "lookahead is not RE2",
            Vs,
            vs_route(json!({"match": [{"queryParams": {"q": {"regex": "a(?=b)"}}}]})),
            Some((
                "spec.http[0].match[0].queryParams.q.regex",
                "invalid RE2 regex",
            )),
        ),
        (
            "invalid cors origin regex",
            Vs,
            vs_route(json!({"corsPolicy": {"allowOrigins": [{"regex": "["}]}})),
            Some((
                "spec.http[0].corsPolicy.allowOrigins[0].regex",
                "invalid RE2 regex",
            )),
        ),
        (
            "invalid regex rewrite",
            Vs,
            vs_route(json!({"rewrite": {"uriRegexRewrite": {"match": "(", "rewrite": "/"}}})),
            Some((
                "spec.http[0].rewrite.uriRegexRewrite.match",
                "invalid RE2 regex",
            )),
        ),
        // Durations.
        (
            "durations in Istio's syntax",
            Vs,
            vs_route(
                json!({"timeout": "1.5s", "retries": {"attempts": 2, "perTryTimeout": "100ms", "backoff": "1h"}, "corsPolicy": {"maxAge": "1h30m"}}),
            ),
            None,
        ),
        (
            "duration without unit",
            Vs,
            vs_route(json!({"timeout": "5"})),
            Some(("spec.http[0].timeout", "\"5\" is not a duration")),
        ),
        (
            "duration in days",
            Vs,
            vs_route(json!({"timeout": "1d"})),
            Some(("spec.http[0].timeout", "is not a duration")),
        ),
        (
            "duration under 1ms",
            Vs,
            vs_route(json!({"timeout": "0.5ms"})),
            Some(("spec.http[0].timeout", "shorter than the minimum of 1ms")),
        ),
        (
            "zero timeout",
            Vs,
            vs_route(json!({"timeout": "0s"})),
            Some(("spec.http[0].timeout", "shorter than the minimum of 1ms")),
        ),
        (
            "bad per-try timeout",
            Vs,
            vs_route(json!({"retries": {"attempts": 3, "perTryTimeout": "two seconds"}})),
            Some(("spec.http[0].retries.perTryTimeout", "is not a duration")),
        ),
        (
            "bad fixed delay",
            Vs,
            vs_route(json!({"fault": {"delay": {"fixedDelay": "-1s"}}})),
            Some(("spec.http[0].fault.delay.fixedDelay", "is negative")),
        ),
        (
            "sub-millisecond timeout (Istio's ValidateDuration: ms precision)",
            Vs,
            vs_route(json!({"timeout": "1500us"})),
            Some((
                "spec.http[0].timeout",
                "is not a whole number of milliseconds",
            )),
        ),
        (
            "signed timeout in microseconds (Go's syntax)",
            Vs,
            vs_route(json!({"timeout": "+2000μs"})),
            None,
        ),
        // Retries.
        (
            "negative attempts",
            Vs,
            vs_route(json!({"retries": {"attempts": -1}})),
            Some(("spec.http[0].retries.attempts", "-1 must not be negative")),
        ),
        (
            "retryOn with status codes",
            Vs,
            vs_route(
                json!({"retries": {"attempts": 2, "retryOn": "5xx, 503,retriable-4xx,unavailable,reset-before-request"}}),
            ),
            None,
        ),
        (
            "retries switched off",
            Vs,
            vs_route(json!({"retries": {"attempts": 0}})),
            None,
        ),
        (
            "settings for switched-off retries",
            Vs,
            vs_route(json!({"retries": {"attempts": 0, "retryOn": "5xx"}})),
            Some(("spec.http[0].retries.attempts", "attempts is 0")),
        ),
        (
            "redirect to nowhere",
            Vs,
            json!({"hosts": ["reviews"], "http": [{"redirect": {"redirectCode": 302}}]}),
            Some((
                "spec.http[0].redirect",
                "must set uri, authority, scheme or port",
            )),
        ),
        (
            "unknown retryOn condition",
            Vs,
            vs_route(json!({"retries": {"attempts": 2, "retryOn": "5xx,connect-failures"}})),
            Some((
                "spec.http[0].retries.retryOn",
                "\"connect-failures\" is not a retry condition",
            )),
        ),
        (
            "retryOn status outside HTTP",
            Vs,
            vs_route(json!({"retries": {"attempts": 2, "retryOn": "999"}})),
            Some((
                "spec.http[0].retries.retryOn",
                "\"999\" is not a retry condition",
            )),
        ),
        // Fault injection and percentages.
        (
            "fault abort",
            Vs,
            vs_route(
                json!({"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0.1}}}}),
            ),
            None,
        ),
        (
            "fault without delay or abort",
            Vs,
            vs_route(json!({"fault": {}})),
            Some(("spec.http[0].fault", "one of delay or abort is required")),
        ),
        (
            "abort status above 599",
            Vs,
            vs_route(json!({"fault": {"abort": {"httpStatus": 600}}})),
            Some((
                "spec.http[0].fault.abort.httpStatus",
                "600 is not an HTTP status in 200..=599",
            )),
        ),
        (
            "abort status below 200",
            Vs,
            vs_route(json!({"fault": {"abort": {"httpStatus": 199}}})),
            Some((
                "spec.http[0].fault.abort.httpStatus",
                "199 is not an HTTP status",
            )),
        ),
        (
            "abort with grpc status",
            Vs,
            vs_route(json!({"fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}})),
            None,
        ),
        (
            "abort with two kinds",
            Vs,
            vs_route(json!({"fault": {"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}}})),
            Some((
                "spec.http[0].fault.abort",
                "only one of httpStatus, grpcStatus",
            )),
        ),
        (
            "delay percentage above 100",
            Vs,
            vs_route(
                json!({"fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 100.5}}}}),
            ),
            Some((
                "spec.http[0].fault.delay.percentage.value",
                "100.5 is not a percentage in 0..=100",
            )),
        ),
        (
            "deprecated delay percent above 100",
            Vs,
            vs_route(json!({"fault": {"delay": {"fixedDelay": "1s", "percent": 101}}})),
            Some((
                "spec.http[0].fault.delay.percent",
                "101 is not a percentage",
            )),
        ),
        (
            "exponential delay",
            Vs,
            vs_route(json!({"fault": {"delay": {"exponentialDelay": "1s"}}})),
            Some(("spec.http[0].fault.delay.exponentialDelay", "not supported")),
        ),
        (
            "negative mirror percentage",
            Vs,
            vs_route(json!({"mirror": {"host": "reviews"}, "mirrorPercentage": {"value": -1.0}})),
            Some((
                "spec.http[0].mirrorPercentage.value",
                "-1 is not a percentage",
            )),
        ),
        (
            "mirrors percentage above 100",
            Vs,
            vs_route(
                json!({"mirrors": [{"destination": {"host": "reviews"}, "percentage": {"value": 250.0}}]}),
            ),
            Some((
                "spec.http[0].mirrors[0].percentage.value",
                "250 is not a percentage",
            )),
        ),
        // Matches and L4 routes.
        (
            "match port out of range",
            Vs,
            vs_route(json!({"match": [{"port": 70000}]})),
            Some(("spec.http[0].match[0].port", "70000 is not a port number")),
        ),
        (
            "destination port 0",
            Vs,
            vs_route(
                json!({"route": [{"destination": {"host": "reviews", "port": {"number": 0}}}]}),
            ),
            Some((
                "spec.http[0].route[0].destination.port.number",
                "0 is not a port number",
            )),
        ),
        (
            "tls route",
            Vs,
            json!({"hosts": ["*.example.com"], "gateways": ["egress"], "tls": [{"match": [{"port": 443, "sniHosts": ["a.example.com"], "destinationSubnets": ["10.0.0.0/8", "fd00::/8"]}], "route": [{"destination": {"host": "a.example.com"}}]}]}),
            None,
        ),
        (
            "tls route without sniHosts",
            Vs,
            json!({"hosts": ["a.example.com"], "tls": [{"match": [{"port": 443}], "route": [{"destination": {"host": "a.example.com"}}]}]}),
            Some(("spec.tls[0].match[0].sniHosts", "at least one SNI host")),
        ),
        (
            "tls route without match",
            Vs,
            json!({"hosts": ["a.example.com"], "tls": [{"route": [{"destination": {"host": "a.example.com"}}]}]}),
            Some(("spec.tls[0].match", "at least one match")),
        ),
        (
            "tcp subnet not a CIDR",
            Vs,
            json!({"hosts": ["db"], "tcp": [{"match": [{"destinationSubnets": ["10.0.0.0/40"]}], "route": [{"destination": {"host": "db"}}]}]}),
            Some((
                "spec.tcp[0].match[0].destinationSubnets[0]",
                "\"10.0.0.0/40\" is not an IP address or CIDR",
            )),
        ),
        (
            "tcp source subnet not an IP",
            Vs,
            json!({"hosts": ["db"], "tcp": [{"match": [{"sourceSubnet": "db.example.com"}], "route": [{"destination": {"host": "db"}}]}]}),
            Some((
                "spec.tcp[0].match[0].sourceSubnet",
                "not an IP address or CIDR",
            )),
        ),
        (
            "tcp route without destination",
            Vs,
            json!({"hosts": ["db"], "tcp": [{"match": [{"port": 5432}]}]}),
            Some(("spec.tcp[0].route", "at least one destination")),
        ),
        // DestinationRule.
        ("minimal destination rule", Dr, dr(json!({})), None),
        (
            "empty host",
            Dr,
            dr(json!({"host": ""})),
            Some(("spec.host", "must not be empty")),
        ),
        (
            "duplicate subset names",
            Dr,
            dr(json!({"subsets": [{"name": "v1"}, {"name": "v1", "labels": {"version": "v1b"}}]})),
            Some(("spec.subsets[1].name", "duplicate subset name \"v1\"")),
        ),
        (
            "subset name not a DNS label",
            Dr,
            dr(json!({"subsets": [{"name": "version 1"}]})),
            Some(("spec.subsets[0].name", "not a valid subset name")),
        ),
        (
            "simple and consistent hash",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": true}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer",
                "only one of simple or consistentHash",
            )),
        ),
        (
            "two hash keys",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"useSourceIp": true, "httpHeaderName": "x-user"}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "only one of httpHeaderName",
            )),
        ),
        (
            "session cookie ttl 0s",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}}}}),
            ),
            None,
        ),
        (
            "session cookie ttl as a lone 0",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0"}}}}}),
            ),
            None,
        ),
        (
            "negative cookie ttl",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "-1s"}}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
                "is negative",
            )),
        ),
        (
            "bad cookie ttl",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "forever"}}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
                "is not a duration",
            )),
        ),
        (
            "bad connect timeout",
            Dr,
            dr(json!({"trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "30"}}}})),
            Some((
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "\"30\" is not a duration",
            )),
        ),
        (
            "negative pending requests",
            Dr,
            dr(
                json!({"trafficPolicy": {"connectionPool": {"http": {"http1MaxPendingRequests": -5}}}}),
            ),
            Some((
                "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
                "-5 must not be negative",
            )),
        ),
        (
            "ejection percent above 100",
            Dr,
            dr(json!({"trafficPolicy": {"outlierDetection": {"maxEjectionPercent": 150}}})),
            Some((
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "150 is not a percentage",
            )),
        ),
        (
            "interval under 1ms in a subset",
            Dr,
            dr(
                json!({"subsets": [{"name": "v1", "trafficPolicy": {"outlierDetection": {"interval": "10us"}}}]}),
            ),
            Some((
                "spec.subsets[0].trafficPolicy.outlierDetection.interval",
                "shorter than the minimum of 1ms",
            )),
        ),
        (
            "mutual TLS without certificate",
            Dr,
            dr(json!({"trafficPolicy": {"tls": {"mode": "MUTUAL", "privateKey": "/k.pem"}}})),
            Some((
                "spec.trafficPolicy.tls.clientCertificate",
                "required with mode MUTUAL",
            )),
        ),
        (
            "mutual TLS from a Secret",
            Dr,
            dr(json!({"trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "client"}}})),
            None,
        ),
        (
            "port settings without port",
            Dr,
            dr(
                json!({"trafficPolicy": {"portLevelSettings": [{"loadBalancer": {"simple": "RANDOM"}}]}}),
            ),
            Some((
                "spec.trafficPolicy.portLevelSettings[0].port.number",
                "port number is required",
            )),
        ),
        (
            "port settings twice",
            Dr,
            dr(
                json!({"trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}}, {"port": {"number": 80}}]}}),
            ),
            Some((
                "spec.trafficPolicy.portLevelSettings[1].port.number",
                "port 80 has settings twice",
            )),
        ),
        (
            "locality weights not 100",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "a/*", "to": {"a/*": 70, "b/*": 20}}]}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
                "add up to 90, not 100",
            )),
        ),
        (
            "tunnel to port 0",
            Dr,
            dr(json!({"trafficPolicy": {"tunnel": {"targetHost": "proxy", "targetPort": 0}}})),
            Some((
                "spec.trafficPolicy.tunnel.targetPort",
                "0 is not a port number",
            )),
        ),
        (
            "warmup aggression below 1",
            Dr,
            dr(
                json!({"trafficPolicy": {"loadBalancer": {"warmup": {"duration": "60s", "aggression": 0.5}}}}),
            ),
            Some((
                "spec.trafficPolicy.loadBalancer.warmup.aggression",
                "must be at least 1",
            )),
        ),
        // ServiceEntry.
        ("external DNS entry", Se, se(json!({})), None),
        (
            "no hosts",
            Se,
            se(json!({"hosts": []})),
            Some(("spec.hosts", "at least one host is required")),
        ),
        (
            "host is only a wildcard",
            Se,
            se(json!({"hosts": ["*"], "resolution": "NONE"})),
            Some(("spec.hosts[0]", "\"*\" is not a valid host name")),
        ),
        (
            "wildcard host with DNS",
            Se,
            se(json!({"hosts": ["*.example.com"]})),
            Some(("spec.hosts[0]", "cannot be resolved with DNS")),
        ),
        (
            "wildcard host with DNS_ROUND_ROBIN",
            Se,
            se(json!({"hosts": ["*.example.com"], "resolution": "DNS_ROUND_ROBIN"})),
            Some(("spec.hosts[0]", "cannot be resolved with DNS")),
        ),
        (
            "wildcard host without resolution",
            Se,
            se(json!({"hosts": ["*.example.com"], "resolution": "NONE"})),
            None,
        ),
        (
            "STATIC without endpoints",
            Se,
            se(json!({"resolution": "STATIC"})),
            Some((
                "spec.endpoints",
                "STATIC needs endpoints or a workloadSelector",
            )),
        ),
        (
            "STATIC with a workload selector",
            Se,
            se(
                json!({"resolution": "STATIC", "location": "MESH_INTERNAL", "workloadSelector": {"labels": {"app": "vm"}}}),
            ),
            None,
        ),
        (
            "STATIC endpoint that is a name",
            Se,
            se(json!({"resolution": "STATIC", "endpoints": [{"address": "db.example.com"}]})),
            Some((
                "spec.endpoints[0].address",
                "not an IP address (resolution STATIC)",
            )),
        ),
        (
            "STATIC unix socket endpoint",
            Se,
            se(json!({"resolution": "STATIC", "endpoints": [{"address": "unix:///var/run/sock"}]})),
            None,
        ),
        (
            "addresses that are IPs and CIDRs",
            Se,
            se(json!({"addresses": ["240.0.0.1", "10.0.0.0/16", "2001:db8::/32"]})),
            None,
        ),
        (
            "address that is not an IP",
            Se,
            se(json!({"addresses": ["300.1.1.1"]})),
            Some((
                "spec.addresses[0]",
                "\"300.1.1.1\" is not an IP address or CIDR",
            )),
        ),
        (
            "CIDR prefix too long",
            Se,
            se(json!({"addresses": ["10.0.0.0/33"]})),
            Some(("spec.addresses[0]", "is not an IP address or CIDR")),
        ),
        (
            "endpoints and workload selector",
            Se,
            se(
                json!({"resolution": "STATIC", "endpoints": [{"address": "1.2.3.4"}], "workloadSelector": {"labels": {"app": "vm"}}}),
            ),
            Some((
                "spec.workloadSelector",
                "only one of endpoints or workloadSelector",
            )),
        ),
        (
            "NONE with endpoints",
            Se,
            se(json!({"resolution": "NONE", "endpoints": [{"address": "1.2.3.4"}]})),
            Some(("spec.endpoints", "NONE takes no endpoints")),
        ),
        (
            "DNS_ROUND_ROBIN with two endpoints",
            Se,
            se(
                json!({"resolution": "DNS_ROUND_ROBIN", "endpoints": [{"address": "a.example.com"}, {"address": "b.example.com"}]}),
            ),
            Some(("spec.endpoints", "at most one endpoint")),
        ),
        (
            "port 0",
            Se,
            se(json!({"ports": [{"number": 0, "name": "http"}]})),
            Some(("spec.ports[0].number", "0 is not a port number")),
        ),
        (
            "duplicate port number",
            Se,
            se(
                json!({"ports": [{"number": 80, "name": "http"}, {"number": 80, "name": "http-alt"}]}),
            ),
            Some(("spec.ports[1].number", "port 80 is listed twice")),
        ),
        (
            "endpoint port of no service port",
            Se,
            se(
                json!({"resolution": "STATIC", "endpoints": [{"address": "1.2.3.4", "ports": {"grpc": 9000}}]}),
            ),
            Some((
                "spec.endpoints[0].ports.grpc",
                "\"grpc\" is not the name of a port",
            )),
        ),
        (
            "endpoint without address",
            Se,
            se(json!({"resolution": "STATIC", "endpoints": [{"labels": {"a": "b"}}]})),
            Some(("spec.endpoints[0].address", "address is required")),
        ),
    ]
}

#[test]
fn every_rule_refuses_with_the_field_path_and_accepts_the_valid_forms() {
    let rules = destination_rules();
    let mut failures = Vec::new();
    for (name, kind, spec, expected) in cases() {
        let object = json!({"apiVersion": "networking.istio.io/v1", "kind": "X", "metadata": {"name": "x"}, "spec": spec});
        let result = validate_object(kind, &object, NAMESPACE, &rules);
        match (&result, expected) {
            (Ok(()), None) => {}
            (Err(rejection), Some((path, fragment)))
                if rejection.errors.len() == 1
                    && rejection.errors[0].path == path
                    && rejection.errors[0].message.contains(fragment) => {}
            _ => failures.push(format!("{name}: expected {expected:?}, got {result:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn unknown_fields_are_refused_at_their_path() {
    let cases = [
        (
            Kind::VirtualService,
            json!({"sepc": {}, "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}]}]}}),
            "sepc",
            "unknown field \"sepc\"",
        ),
        (
            Kind::VirtualService,
            json!({"spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "subsett": "v1"}}]}]}}),
            "spec.http[0].route[0].destination.subsett",
            "unknown field \"subsett\"",
        ),
        (
            Kind::DestinationRule,
            json!({"spec": {"host": "a", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrrors": 1}}}}),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrrors",
            "unknown field \"consecutive5xxErrrors\"",
        ),
        (
            Kind::ServiceEntry,
            json!({"spec": {"hosts": ["a.com"], "resolution": "DNS", "endpoint": []}}),
            "spec.endpoint",
            "unknown field \"endpoint\"",
        ),
        (
            Kind::ServiceEntry,
            json!({"spec": {"hosts": ["a.com"], "location": "EXTERNAL"}}),
            "spec.location",
            "unknown variant `EXTERNAL`, expected `MESH_EXTERNAL` or `MESH_INTERNAL`",
        ),
    ];
    for (kind, object, path, message) in cases {
        let rejection = validate_object(kind, &object, NAMESPACE, &[]).unwrap_err();
        let error = &rejection.errors[0];
        assert_eq!(error.path, path, "{object}");
        assert!(error.message.contains(message), "{object}: {error}");
    }
    let rejection = validate_object(Kind::VirtualService, &json!([1]), NAMESPACE, &[]).unwrap_err();
    assert_eq!(rejection.errors[0].path, ".");
}

#[test]
fn rejection_lists_every_problem() {
    let spec = vs_route(json!({"timeout": "soon", "retries": {"attempts": -2}}));
    let rejection = validate_object(
        Kind::VirtualService,
        &json!({"spec": spec}),
        NAMESPACE,
        &destination_rules(),
    )
    .unwrap_err();
    assert_eq!(
        rejection.to_string(),
        "spec.http[0].timeout: \"soon\" is not a duration (write it like \"1.5s\", \"100ms\" or \"1h\"); \
         spec.http[0].retries.attempts: -2 must not be negative"
    );
}

#[test]
fn security_kinds_refuse_typos_and_what_istio_refuses() {
    use Kind::{AuthorizationPolicy as Ap, PeerAuthentication as Pa};
    let ok: Result<(), &str> = Ok(());
    // (kind, spec, Ok or the path of the first error)
    let cases: Vec<(Kind, Value, Result<(), &str>)> = vec![
        (Pa, json!({"mtls": {"mode": "STRICT"}}), ok),
        (
            Pa,
            json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
            ok,
        ),
        (
            Pa,
            json!({"mtls": {"mdoe": "STRICT"}}),
            Err("spec.mtls.mdoe"),
        ),
        (
            Pa,
            json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
            Err("spec.portLevelMtls"),
        ),
        (
            Pa,
            json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"http": {"mode": "DISABLE"}}}),
            Err("spec.portLevelMtls[http]"),
        ),
        (Ap, json!({}), ok),
        (Ap, json!({"action": "DENY", "rules": [{}]}), ok),
        (
            Ap,
            json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}],
                              "to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}],
                              "when": [{"key": "request.headers[x]", "values": ["y"]}]}]}),
            ok,
        ),
        // A misspelt field: refused, never read as an empty (match-everything) source.
        (
            Ap,
            json!({"rules": [{"from": [{"source": {"principles": ["cluster.local/ns/a/sa/b"]}}]}]}),
            Err("spec.rules[0].from[0].source.principles"),
        ),
        (
            Ap,
            json!({"rules": [{"from": [{"source": {}}]}]}),
            Err("spec.rules[0].from[0].source"),
        ),
        (
            Ap,
            json!({"rules": [{"to": [{"operation": {}}]}]}),
            Err("spec.rules[0].to[0].operation"),
        ),
        (
            Ap,
            json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
            Err("spec.rules[0].to[0].operation.ports[0]"),
        ),
        (
            Ap,
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
            Err("spec.rules[0].from[0].source.ipBlocks[0]"),
        ),
        (
            Ap,
            json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
            Err("spec.rules[0].when[0]"),
        ),
        (
            Ap,
            json!({"action": "CUSTOM", "rules": [{}]}),
            Err("spec.provider"),
        ),
        (
            Ap,
            json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
            ok,
        ),
        (
            Ap,
            json!({"action": "DENY", "provider": {"name": "ext"}}),
            Err("spec.provider"),
        ),
        (
            Ap,
            json!({"selector": {"matchLabels": {"app": "a"}},
                   "targetRef": {"kind": "Gateway", "name": "g"}}),
            Err("spec"),
        ),
    ];
    assert_verdicts(cases);
}

fn assert_verdicts(cases: Vec<(Kind, Value, Result<(), &str>)>) {
    for (kind, spec, expected) in cases {
        let verdict = validate_object(kind, &json!({"spec": spec}), NAMESPACE, &[]);
        match (verdict, expected) {
            (Ok(()), Ok(())) => {}
            (Err(rejection), Err(path)) => {
                assert_eq!(
                    rejection.errors[0].path, path,
                    "{kind:?} {spec}: {rejection}"
                )
            }
            (verdict, expected) => panic!("{kind:?} {spec}: {verdict:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn request_authentication_admits_istios_examples_and_refuses_what_istio_refuses() {
    use Kind::RequestAuthentication as Ra;
    let ok: Result<(), &str> = Ok(());
    let cases: Vec<(Kind, Value, Result<(), &str>)> = vec![
        // The reference's examples.
        (
            Ra,
            json!({"selector": {"matchLabels": {"app": "httpbin"}},
                   "jwtRules": [{"issuer": "issuer-foo",
                                 "jwksUri": "https://example.com/.well-known/jwks.json"}]}),
            ok,
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "issuer-foo"}, {"issuer": "issuer-bar"}]}),
            ok,
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "https://example.com",
                                 "audiences": ["bookstore_android.apps.example.com"],
                                 "jwksUri": "https://example.com/.secret/jwks.json",
                                 "fromHeaders": [{"name": "x-goog-iap-jwt-assertion"}],
                                 "fromParams": ["my_token"],
                                 "fromCookies": ["session"],
                                 "outputPayloadToHeader": "x-jwt-payload",
                                 "outputClaimToHeaders": [{"header": "x-my-company-jwt-group",
                                                           "claim": "my-group"}],
                                 "forwardOriginalToken": true,
                                 "timeout": "20s"}]}),
            ok,
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "jwks": "{\"keys\": []}"}]}),
            ok,
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": ""}]}),
            Err("spec.jwtRules[0].issuer"),
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "jwksUri": "example.com/jwks"}]}),
            Err("spec.jwtRules[0].jwksUri"),
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "jwks": "not json"}]}),
            Err("spec.jwtRules[0].jwks"),
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "fromHeaders": [{"name": "bad header"}]}]}),
            Err("spec.jwtRules[0].fromHeaders[0].name"),
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "timeout": "soon"}]}),
            Err("spec.jwtRules[0].timeout"),
        ),
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "outputClaimToHeaders": [{"header": "x-a", "claim": ""}]}]}),
            Err("spec.jwtRules[0].outputClaimToHeaders[0].claim"),
        ),
        // A misspelt field is refused, never silently dropped.
        (
            Ra,
            json!({"jwtRules": [{"issuer": "i", "jwksUrl": "https://example.com/jwks"}]}),
            Err("spec.jwtRules[0].jwksUrl"),
        ),
        (
            Ra,
            json!({"selector": {"matchLabels": {"app": "a"}},
                   "targetRef": {"kind": "Gateway", "name": "g"}}),
            Err("spec"),
        ),
    ];
    assert_verdicts(cases);
}
