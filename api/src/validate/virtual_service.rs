//! A VirtualService's admission rules: hosts, http/tls/tcp routes, their destinations,
//! weights and subsets (against the DestinationRules of the namespace), matches, rewrites,
//! redirects, retries, faults and mirrors.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::istio::host::{self, is_wildcard_domain};
use crate::networking::virtual_service::{
    Destination, FaultAbort, FaultDelay, HttpFaultInjection, HttpMatchRequest, HttpRetry,
    HttpRewrite, HttpRoute, RouteDestination, TcpRoute, TlsRoute,
};
use crate::networking::{DestinationRule, VirtualServiceSpec};

use super::{Errors, FieldError, RETRY_ON_POLICIES};

/// Checks a VirtualService. `destination_rules` are those of `namespace`.
pub fn validate_virtual_service(
    spec: &VirtualServiceSpec,
    namespace: &str,
    destination_rules: &[DestinationRule],
) -> Vec<FieldError> {
    let mut errors = Errors::default();
    let delegate = spec.hosts.is_empty();
    if delegate {
        // A VirtualService without hosts can only be a delegate, which carries HTTP routes only.
        if !spec.gateways.is_empty() {
            errors.add(
                "spec.gateways",
                "a VirtualService without hosts is a delegate and cannot name gateways",
            );
        }
        if spec.http.is_empty() || !spec.tls.is_empty() || !spec.tcp.is_empty() {
            errors.add(
                "spec.hosts",
                "at least one host is required (only a delegate VirtualService, with http routes alone, has none)",
            );
        }
    }
    let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if host.is_empty() {
            errors.add(&path, "host must not be empty");
        } else if host == "*" {
            if mesh_bound {
                errors.add(
                    &path,
                    "wildcard host \"*\" is only allowed for VirtualServices bound to gateways (not to \"mesh\")",
                );
            }
        } else if !is_wildcard_domain(host) && host.parse::<IpAddr>().is_err() {
            errors.add(&path, format!("{host:?} is not a valid host name or IP"));
        }
    }
    for (i, gateway) in spec.gateways.iter().enumerate() {
        if gateway.is_empty() {
            errors.add(
                &format!("spec.gateways[{i}]"),
                "gateway name must not be empty",
            );
        }
    }
    if spec.http.is_empty() && spec.tls.is_empty() && spec.tcp.is_empty() {
        errors.add(
            "spec",
            "at least one of http, tls or tcp routes is required",
        );
    }
    let subsets = SubsetIndex::new(destination_rules, namespace);
    for (i, route) in spec.http.iter().enumerate() {
        http_route(
            &mut errors,
            &format!("spec.http[{i}]"),
            route,
            namespace,
            &subsets,
        );
    }
    for (i, route) in spec.tls.iter().enumerate() {
        tls_route(
            &mut errors,
            &format!("spec.tls[{i}]"),
            route,
            namespace,
            &subsets,
        );
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        tcp_route(
            &mut errors,
            &format!("spec.tcp[{i}]"),
            route,
            namespace,
            &subsets,
        );
    }
    errors.export_to("spec.exportTo", &spec.export_to);
    errors.0
}

/// Subsets defined per fully qualified host by the DestinationRules of one namespace.
struct SubsetIndex<'a> {
    by_host: BTreeMap<String, Vec<(&'a str, BTreeSet<&'a str>)>>,
}

impl<'a> SubsetIndex<'a> {
    fn new(rules: &'a [DestinationRule], namespace: &str) -> Self {
        let mut by_host: BTreeMap<String, Vec<(&str, BTreeSet<&str>)>> = BTreeMap::new();
        for rule in rules {
            let rule_namespace = rule.metadata.namespace.as_deref().unwrap_or(namespace);
            if rule_namespace != namespace {
                continue;
            }
            let name = rule.metadata.name.as_deref().unwrap_or_default();
            let subsets = rule.spec.subsets.iter().map(|s| s.name.as_str()).collect();
            by_host
                .entry(host::qualify(&rule.spec.host, namespace))
                .or_default()
                .push((name, subsets));
        }
        Self { by_host }
    }

    /// `Err` with the rules' names when rules apply to the (qualified) host and none defines
    /// `subset`. The rules that apply are those the compiler picks from: the ones whose host
    /// covers this one, the most specific host first (exact beats wildcard).
    fn check(&self, host: &str, subset: &str) -> Result<(), Vec<&'a str>> {
        let best = self
            .by_host
            .iter()
            .filter(|(pattern, _)| host::matches(pattern, host))
            .max_by_key(|(pattern, _)| host::specificity(pattern));
        match best {
            Some((_, rules)) if !rules.iter().any(|(_, subsets)| subsets.contains(subset)) => {
                Err(rules.iter().map(|(name, _)| *name).collect())
            }
            _ => Ok(()),
        }
    }
}

fn destination(
    errors: &mut Errors,
    path: &str,
    destination: &Destination,
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    let host = &destination.host;
    if host.is_empty() {
        errors.add(&format!("{path}.host"), "host must not be empty");
    } else if host == "*" || (!is_wildcard_domain(host) && host.parse::<IpAddr>().is_err()) {
        errors.add(
            &format!("{path}.host"),
            format!("{host:?} is not a valid destination host"),
        );
    }
    if let Some(subset) = &destination.subset {
        let qualified = host::qualify(host, namespace);
        if subset.is_empty() {
            errors.add(&format!("{path}.subset"), "subset must not be empty");
        } else if let Err(rules) = subsets.check(&qualified, subset) {
            errors.add(
                &format!("{path}.subset"),
                format!(
                    "subset {subset:?} is not defined by DestinationRule {} for host {qualified:?} in namespace {namespace:?}",
                    rules.join(", ")
                ),
            );
        }
    }
    if let Some(port) = &destination.port {
        errors.port(&format!("{path}.port.number"), port.number);
    }
}

/// Weights: none negative, at most 100 in total, and not all 0 over several destinations.
fn weights(errors: &mut Errors, path: &str, weights: &[Option<i32>]) {
    let mut total: i64 = 0;
    for (i, weight) in weights.iter().enumerate() {
        let weight = weight.unwrap_or(0);
        if weight < 0 {
            errors.add(
                &format!("{path}[{i}].weight"),
                format!("weight {weight} must not be negative"),
            );
        }
        total += i64::from(weight);
    }
    if total > 100 {
        errors.add(
            path,
            format!("the weights add up to {total}, more than 100"),
        );
    } else if weights.len() > 1 && total == 0 {
        errors.add(
            path,
            "the weights of several destinations add up to 0: set the share of each",
        );
    }
}

fn http_route(
    errors: &mut Errors,
    path: &str,
    route: &HttpRoute,
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    http_action(errors, path, route);
    for (i, request) in route.r#match.iter().enumerate() {
        http_match(errors, &format!("{path}.match[{i}]"), request);
    }
    for (i, target) in route.route.iter().enumerate() {
        let target_path = format!("{path}.route[{i}].destination");
        destination(
            errors,
            &target_path,
            &target.destination,
            namespace,
            subsets,
        );
    }
    let route_weights: Vec<_> = route.route.iter().map(|r| r.weight).collect();
    weights(errors, &format!("{path}.route"), &route_weights);
    if let Some(rewrite) = &route.rewrite {
        http_rewrite(errors, &format!("{path}.rewrite"), rewrite);
    }
    errors.duration(&format!("{path}.timeout"), route.timeout.as_ref());
    if let Some(retries) = &route.retries {
        retry(errors, &format!("{path}.retries"), retries);
    }
    if let Some(fault) = &route.fault {
        fault_injection(errors, &format!("{path}.fault"), fault);
    }
    mirrors(errors, path, route, namespace, subsets);
    if let Some(cors) = &route.cors_policy {
        for (i, origin) in cors.allow_origins.iter().enumerate() {
            errors.string_match(&format!("{path}.corsPolicy.allowOrigins[{i}]"), origin);
        }
        errors.duration(&format!("{path}.corsPolicy.maxAge"), cors.max_age.as_ref());
    }
}

/// Exactly one of route, redirect, directResponse or delegate, each well formed.
fn http_action(errors: &mut Errors, path: &str, route: &HttpRoute) {
    let actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
        route.delegate.is_some(),
    ];
    match actions.iter().filter(|set| **set).count() {
        0 => errors.add(
            path,
            "one of route, redirect, directResponse or delegate is required",
        ),
        1 => {}
        _ => errors.add(
            path,
            "only one of route, redirect, directResponse or delegate may be set",
        ),
    }
    if let Some(redirect) = &route.redirect {
        if redirect.uri.is_none()
            && redirect.authority.is_none()
            && redirect.scheme.is_none()
            && redirect.port.is_none()
            && redirect.derive_port.is_none()
        {
            errors.add(
                &format!("{path}.redirect"),
                "a redirect must set uri, authority, scheme or port",
            );
        }
        if redirect.port.is_some() && redirect.derive_port.is_some() {
            errors.add(
                &format!("{path}.redirect"),
                "only one of port or derivePort may be set",
            );
        }
        errors.port(&format!("{path}.redirect.port"), redirect.port);
        if let Some(code) = redirect.redirect_code
            && !(300..=399).contains(&code)
        {
            errors.add(
                &format!("{path}.redirect.redirectCode"),
                format!("{code} is not a redirect status (300..=399)"),
            );
        }
        if route.rewrite.is_some() {
            errors.add(
                &format!("{path}.rewrite"),
                "rewrite cannot be combined with redirect",
            );
        }
    }
    if let Some(response) = &route.direct_response {
        let status = i64::from(response.status);
        http_status(errors, &format!("{path}.directResponse.status"), status);
        if let Some(body) = &response.body
            && body.string.is_some()
            && body.bytes.is_some()
        {
            errors.add(
                &format!("{path}.directResponse.body"),
                "only one of string or bytes may be set",
            );
        }
    }
    if let Some(delegate) = &route.delegate
        && delegate.name.as_deref().is_none_or(str::is_empty)
    {
        errors.add(&format!("{path}.delegate.name"), "name is required");
    }
}

fn http_rewrite(errors: &mut Errors, path: &str, rewrite: &HttpRewrite) {
    let Some(regex_rewrite) = &rewrite.uri_regex_rewrite else {
        return;
    };
    if rewrite.uri.is_some() {
        errors.add(path, "only one of uri or uriRegexRewrite may be set");
    }
    let match_path = format!("{path}.uriRegexRewrite.match");
    match &regex_rewrite.r#match {
        Some(pattern) => errors.regex(&match_path, pattern),
        None => errors.add(&match_path, "match is required"),
    }
}

fn fault_injection(errors: &mut Errors, path: &str, fault: &HttpFaultInjection) {
    if fault.delay.is_none() && fault.abort.is_none() {
        errors.add(path, "one of delay or abort is required");
    }
    if let Some(delay) = &fault.delay {
        fault_delay(errors, &format!("{path}.delay"), delay);
    }
    if let Some(abort) = &fault.abort {
        fault_abort(errors, &format!("{path}.abort"), abort);
    }
}

/// `mirror` (with its percentages) or `mirrors`, not both.
fn mirrors(
    errors: &mut Errors,
    path: &str,
    route: &HttpRoute,
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    if let Some(mirror) = &route.mirror {
        destination(
            errors,
            &format!("{path}.mirror"),
            mirror,
            namespace,
            subsets,
        );
        if !route.mirrors.is_empty() {
            errors.add(
                &format!("{path}.mirrors"),
                "only one of mirror or mirrors may be set",
            );
        }
    }
    let percentage = route.mirror_percentage.map(|p| p.value);
    errors.percent(&format!("{path}.mirrorPercentage.value"), percentage);
    let percent = route.mirror_percent.map(i64::from);
    errors.int_percent(&format!("{path}.mirrorPercent"), percent);
    let percent = route.mirror_percent_snake_case.map(i64::from);
    errors.int_percent(&format!("{path}.mirror_percent"), percent);
    for (i, mirror) in route.mirrors.iter().enumerate() {
        let mirror_path = format!("{path}.mirrors[{i}]");
        let target_path = format!("{mirror_path}.destination");
        destination(
            errors,
            &target_path,
            &mirror.destination,
            namespace,
            subsets,
        );
        let percentage = mirror.percentage.map(|p| p.value);
        errors.percent(&format!("{mirror_path}.percentage.value"), percentage);
    }
}

fn http_match(errors: &mut Errors, path: &str, request: &HttpMatchRequest) {
    for (field, value) in [
        ("uri", &request.uri),
        ("scheme", &request.scheme),
        ("method", &request.method),
        ("authority", &request.authority),
    ] {
        if let Some(value) = value {
            errors.string_match(&format!("{path}.{field}"), value);
        }
    }
    for (field, map) in [
        ("headers", &request.headers),
        ("withoutHeaders", &request.without_headers),
        ("queryParams", &request.query_params),
    ] {
        for (key, value) in map {
            if key.is_empty() {
                errors.add(&format!("{path}.{field}"), "names must not be empty");
            }
            errors.string_match(&format!("{path}.{field}.{key}"), value);
        }
    }
    errors.port(&format!("{path}.port"), request.port);
}

fn http_status(errors: &mut Errors, path: &str, status: i64) {
    if !(200..=599).contains(&status) {
        errors.add(path, format!("{status} is not an HTTP status in 200..=599"));
    }
}

fn retry(errors: &mut Errors, path: &str, retries: &HttpRetry) {
    match retries.attempts.unwrap_or(0) {
        attempts if attempts < 0 => errors.add(
            &format!("{path}.attempts"),
            format!("{attempts} must not be negative"),
        ),
        // As Istio: settings for retries that are switched off are a mistake.
        0 if retries.per_try_timeout.is_some()
            || retries.retry_on.is_some()
            || retries.retry_remote_localities.is_some() =>
        {
            errors.add(
                &format!("{path}.attempts"),
                "retry settings are given but attempts is 0 (retries disabled)",
            )
        }
        _ => {}
    }
    errors.duration(
        &format!("{path}.perTryTimeout"),
        retries.per_try_timeout.as_ref(),
    );
    errors.duration(&format!("{path}.backoff"), retries.backoff.as_ref());
    if let Some(retry_on) = &retries.retry_on {
        for condition in retry_on.split(',').map(str::trim) {
            let known = RETRY_ON_POLICIES.contains(&condition)
                || condition
                    .parse::<u16>()
                    .is_ok_and(|code| (100..=599).contains(&code));
            if !known {
                errors.add(
                    &format!("{path}.retryOn"),
                    format!(
                        "{condition:?} is not a retry condition (one of {} or an HTTP status code)",
                        RETRY_ON_POLICIES.join(", ")
                    ),
                );
            }
        }
    }
}

fn fault_delay(errors: &mut Errors, path: &str, delay: &FaultDelay) {
    match (&delay.fixed_delay, &delay.exponential_delay) {
        (Some(fixed), None) => errors.duration(&format!("{path}.fixedDelay"), Some(fixed)),
        (None, Some(_)) => errors.add(
            &format!("{path}.exponentialDelay"),
            "exponentialDelay is not supported (as in Istio); use fixedDelay",
        ),
        (Some(_), Some(_)) => errors.add(
            path,
            "only one of fixedDelay or exponentialDelay may be set",
        ),
        (None, None) => errors.add(&format!("{path}.fixedDelay"), "fixedDelay is required"),
    }
    errors.percent(
        &format!("{path}.percentage.value"),
        delay.percentage.map(|p| p.value),
    );
    errors.int_percent(&format!("{path}.percent"), delay.percent.map(i64::from));
}

fn fault_abort(errors: &mut Errors, path: &str, abort: &FaultAbort) {
    let kinds = [
        abort.http_status.is_some(),
        abort.grpc_status.is_some(),
        abort.http2_error.is_some(),
    ];
    match kinds.iter().filter(|set| **set).count() {
        0 => errors.add(path, "one of httpStatus or grpcStatus is required"),
        1 => {}
        _ => errors.add(
            path,
            "only one of httpStatus, grpcStatus or http2Error may be set",
        ),
    }
    if let Some(status) = abort.http_status {
        http_status(errors, &format!("{path}.httpStatus"), i64::from(status));
    }
    if abort.http2_error.is_some() {
        errors.add(
            &format!("{path}.http2Error"),
            "http2Error is not supported (as in Istio); use httpStatus or grpcStatus",
        );
    }
    errors.percent(
        &format!("{path}.percentage.value"),
        abort.percentage.map(|p| p.value),
    );
}

fn tls_route(
    errors: &mut Errors,
    path: &str,
    route: &TlsRoute,
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    if route.r#match.is_empty() {
        errors.add(&format!("{path}.match"), "at least one match is required");
    }
    for (i, request) in route.r#match.iter().enumerate() {
        let match_path = format!("{path}.match[{i}]");
        if request.sni_hosts.is_empty() {
            errors.add(
                &format!("{match_path}.sniHosts"),
                "at least one SNI host is required",
            );
        }
        for (j, sni) in request.sni_hosts.iter().enumerate() {
            if sni != "*" && !is_wildcard_domain(sni) {
                errors.add(
                    &format!("{match_path}.sniHosts[{j}]"),
                    format!("{sni:?} is not a valid host name"),
                );
            }
        }
        for (j, subnet) in request.destination_subnets.iter().enumerate() {
            errors.subnet(&format!("{match_path}.destinationSubnets[{j}]"), subnet);
        }
        errors.port(&format!("{match_path}.port"), request.port);
    }
    route_destinations(errors, path, &route.route, namespace, subsets);
}

fn tcp_route(
    errors: &mut Errors,
    path: &str,
    route: &TcpRoute,
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    for (i, request) in route.r#match.iter().enumerate() {
        let match_path = format!("{path}.match[{i}]");
        for (j, subnet) in request.destination_subnets.iter().enumerate() {
            errors.subnet(&format!("{match_path}.destinationSubnets[{j}]"), subnet);
        }
        if let Some(subnet) = &request.source_subnet {
            errors.subnet(&format!("{match_path}.sourceSubnet"), subnet);
        }
        errors.port(&format!("{match_path}.port"), request.port);
    }
    route_destinations(errors, path, &route.route, namespace, subsets);
}

fn route_destinations(
    errors: &mut Errors,
    path: &str,
    routes: &[RouteDestination],
    namespace: &str,
    subsets: &SubsetIndex<'_>,
) {
    if routes.is_empty() {
        errors.add(
            &format!("{path}.route"),
            "at least one destination is required",
        );
    }
    for (i, target) in routes.iter().enumerate() {
        destination(
            errors,
            &format!("{path}.route[{i}].destination"),
            &target.destination,
            namespace,
            subsets,
        );
    }
    let route_weights: Vec<_> = routes.iter().map(|r| r.weight).collect();
    weights(errors, &format!("{path}.route"), &route_weights);
}
