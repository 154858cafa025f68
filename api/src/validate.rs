//! Validation of the Istio kinds the operator admits — `VirtualService`, `DestinationRule`,
//! `ServiceEntry`, `PeerAuthentication` and `AuthorizationPolicy` — as Istio's admission webhook
//! validates them, as pure functions: an object (and, for a VirtualService, the DestinationRules
//! of its namespace) in, every problem out, each naming the field path
//! (`spec.http[0].route[1].weight`). Unknown fields are refused everywhere (strict decoding). The
//! operator's webhook only adapts this to AdmissionReviews. Durations, hosts and `exportTo` are
//! read as `crate::istio` defines them, the module the traffic compiler reads them with too.
//!
//! Where Istio only warns, or where this file decides differently, the rule says why:
//! - A route's `subset` is refused only when DestinationRules of the namespace being admitted
//!   apply to its host (as the compiler picks them: the most specific covering host, exact
//!   before wildcard) and none of them defines the subset. Istio only warns (a rule can
//!   be applied before its DestinationRule); a DestinationRule that exists without the subset is
//!   a certain mistake, while a missing one may still be on its way.
//! - Weights are refused when negative, when they add up to more than 100, or to 0 over several
//!   destinations (nothing would be sent anywhere).
//! - A VirtualService without hosts is a delegate (as in Istio); it may have no gateways, TLS or
//!   TCP routes. Empty host strings are refused everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;

use crate::istio::duration::{self, Minimum};
use crate::istio::export_to;
use crate::istio::host::{self, is_dns_label, is_wildcard_domain};
use crate::networking::NETWORKING_GROUP;
use crate::networking::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, LocalityLbSetting,
    OutlierDetection, PortTrafficPolicy, TlsMode, TrafficPolicy,
};
use crate::networking::service_entry::{Resolution, ServiceEntrySpec, WorkloadEntry};
use crate::networking::virtual_service::{
    Destination, FaultAbort, FaultDelay, HttpFaultInjection, HttpMatchRequest, HttpRetry,
    HttpRewrite, HttpRoute, RouteDestination, TcpRoute, TlsRoute,
};
use crate::networking::{DestinationRule, DestinationRuleSpec, StringMatch, VirtualServiceSpec};
use crate::schema::decode_strict;
use crate::security::{
    AuthorizationAction, AuthorizationOperation, AuthorizationPolicySpec, AuthorizationSource,
    PeerAuthenticationSpec, SECURITY_GROUP,
};

/// Istio's `retryOn` policies (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on`); HTTP
/// status codes are accepted as well.
pub const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// One problem: the field's path from the object root, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why an object was refused: every problem found, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejection {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The kinds validated here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    ServiceEntry,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    /// The kind of an object of API group `group` named by its `kind`, if it is one of ours.
    pub fn from_group_and_name(group: &str, kind: &str) -> Option<Self> {
        match (group, kind) {
            (NETWORKING_GROUP, "VirtualService") => Some(Self::VirtualService),
            (NETWORKING_GROUP, "DestinationRule") => Some(Self::DestinationRule),
            (NETWORKING_GROUP, "ServiceEntry") => Some(Self::ServiceEntry),
            (SECURITY_GROUP, "PeerAuthentication") => Some(Self::PeerAuthentication),
            (SECURITY_GROUP, "AuthorizationPolicy") => Some(Self::AuthorizationPolicy),
            _ => None,
        }
    }
}

/// Top-level keys of a custom resource; anything else is a misspelling.
const OBJECT_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// Validates a whole object as sent for admission: unknown fields anywhere (strict decoding),
/// then Istio's rules. `destination_rules` are those of `namespace`, used to check the subsets
/// a VirtualService routes to; they are ignored for the other kinds.
pub fn validate_object(
    kind: Kind,
    object: &serde_json::Value,
    namespace: &str,
    destination_rules: &[DestinationRule],
) -> Result<(), Rejection> {
    let mut errors = Vec::new();
    if let Some(map) = object.as_object() {
        for key in map.keys().filter(|k| !OBJECT_KEYS.contains(&k.as_str())) {
            errors.push(FieldError {
                path: key.clone(),
                message: format!("unknown field {key:?}"),
            });
        }
    } else {
        errors.push(FieldError {
            path: ".".to_owned(),
            message: "the object is not a JSON object".to_owned(),
        });
    }
    let empty = serde_json::Value::Object(Default::default());
    let spec = object.get("spec").unwrap_or(&empty);
    match kind {
        Kind::VirtualService => decode_spec::<VirtualServiceSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| {
                errors.extend(validate_virtual_service(spec, namespace, destination_rules))
            }),
        Kind::DestinationRule => decode_spec::<DestinationRuleSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_destination_rule(spec))),
        Kind::ServiceEntry => decode_spec::<ServiceEntrySpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_service_entry(spec))),
        Kind::PeerAuthentication => decode_spec::<PeerAuthenticationSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_peer_authentication(spec))),
        Kind::AuthorizationPolicy => decode_spec::<AuthorizationPolicySpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_authorization_policy(spec))),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Rejection { errors })
    }
}

fn decode_spec<T: DeserializeOwned>(
    spec: &serde_json::Value,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    match decode_strict::<T>(spec) {
        Ok(spec) => Some(spec),
        Err(error) => {
            let path = if error.path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{}", error.path)
            };
            errors.push(FieldError {
                path,
                message: error.message,
            });
            None
        }
    }
}

/// Collects errors under paths built by the caller.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// A duration held to Istio's `ValidateDuration` (at least 1ms, whole milliseconds).
    fn duration(&mut self, path: &str, value: Option<&String>) {
        self.duration_with(path, value, Minimum::Millisecond);
    }

    fn duration_with(&mut self, path: &str, value: Option<&String>, minimum: Minimum) {
        if let Some(text) = value
            && let Err(e) = duration::parse_with_minimum(text, minimum)
        {
            self.add(path, e.to_string());
        }
    }

    fn percent(&mut self, path: &str, value: Option<f64>) {
        if let Some(value) = value
            && !(0.0..=100.0).contains(&value)
        {
            self.add(path, format!("{value} is not a percentage in 0..=100"));
        }
    }

    fn int_percent(&mut self, path: &str, value: Option<i64>) {
        if let Some(value) = value
            && !(0..=100).contains(&value)
        {
            self.add(path, format!("{value} is not a percentage in 0..=100"));
        }
    }

    fn non_negative(&mut self, path: &str, value: Option<i32>) {
        if let Some(value) = value
            && value < 0
        {
            self.add(path, format!("{value} must not be negative"));
        }
    }

    fn port(&mut self, path: &str, value: Option<u32>) {
        if let Some(port) = value
            && !(1..=65535).contains(&port)
        {
            self.add(path, format!("{port} is not a port number in 1..=65535"));
        }
    }

    fn string_match(&mut self, path: &str, value: &StringMatch) {
        if let StringMatch::Regex(pattern) = value {
            self.regex(&format!("{path}.regex"), pattern);
        }
    }

    fn regex(&mut self, path: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            self.add(path, format!("invalid RE2 regex {pattern:?}: {e}"));
        }
    }

    fn subnet(&mut self, path: &str, value: &str) {
        if !is_ip_or_cidr(value) {
            self.add(path, format!("{value:?} is not an IP address or CIDR"));
        }
    }

    fn export_to(&mut self, path: &str, export_to: &[String]) {
        for (index, message) in export_to::problems(export_to) {
            match index {
                Some(i) => self.add(&format!("{path}[{i}]"), message),
                None => self.add(path, message),
            }
        }
    }
}

fn is_ip_or_cidr(text: &str) -> bool {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let Ok(ip) = address.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| !p.starts_with('+') && p.parse::<u8>().is_ok_and(|bits| bits <= max))
}

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

/// Checks a DestinationRule.
pub fn validate_destination_rule(spec: &DestinationRuleSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.host.is_empty() {
        errors.add("spec.host", "host must not be empty");
    } else if !is_wildcard_domain(&spec.host) {
        errors.add(
            "spec.host",
            format!("{:?} is not a valid host name", spec.host),
        );
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(&mut errors, "spec.trafficPolicy", policy);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if !is_dns_label(&subset.name) {
            errors.add(
                &format!("{path}.name"),
                format!("{:?} is not a valid subset name (a DNS label)", subset.name),
            );
        } else if !names.insert(subset.name.as_str()) {
            errors.add(
                &format!("{path}.name"),
                format!("duplicate subset name {:?}", subset.name),
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(&mut errors, &format!("{path}.trafficPolicy"), policy);
        }
    }
    errors.export_to("spec.exportTo", &spec.export_to);
    errors.0
}

fn traffic_policy(errors: &mut Errors, path: &str, policy: &TrafficPolicy) {
    port_independent_policy(
        errors,
        path,
        policy.load_balancer.as_ref(),
        policy.connection_pool.as_ref(),
        policy.outlier_detection.as_ref(),
        policy.tls.as_ref(),
    );
    let mut ports = BTreeSet::new();
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        port_traffic_policy(
            errors,
            &format!("{path}.portLevelSettings[{i}]"),
            port_policy,
            &mut ports,
        );
    }
    if let Some(tunnel) = &policy.tunnel {
        if tunnel.target_host.is_empty() {
            errors.add(
                &format!("{path}.tunnel.targetHost"),
                "targetHost must not be empty",
            );
        }
        errors.port(
            &format!("{path}.tunnel.targetPort"),
            Some(tunnel.target_port),
        );
        if let Some(protocol) = &tunnel.protocol
            && !matches!(protocol.as_str(), "CONNECT" | "POST")
        {
            errors.add(
                &format!("{path}.tunnel.protocol"),
                format!("{protocol:?} is not CONNECT or POST"),
            );
        }
    }
    if let Some(budget) = &policy.retry_budget {
        errors.percent(&format!("{path}.retryBudget.percent"), budget.percent);
    }
}

fn port_traffic_policy(
    errors: &mut Errors,
    path: &str,
    policy: &PortTrafficPolicy,
    seen: &mut BTreeSet<u32>,
) {
    match policy.port.and_then(|p| p.number) {
        None => errors.add(&format!("{path}.port.number"), "port number is required"),
        Some(number) => {
            errors.port(&format!("{path}.port.number"), Some(number));
            if !seen.insert(number) {
                errors.add(
                    &format!("{path}.port.number"),
                    format!("port {number} has settings twice"),
                );
            }
        }
    }
    port_independent_policy(
        errors,
        path,
        policy.load_balancer.as_ref(),
        policy.connection_pool.as_ref(),
        policy.outlier_detection.as_ref(),
        policy.tls.as_ref(),
    );
}

fn port_independent_policy(
    errors: &mut Errors,
    path: &str,
    load_balancer: Option<&LoadBalancerSettings>,
    connection_pool: Option<&ConnectionPoolSettings>,
    outlier_detection: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = load_balancer {
        load_balancer_settings(errors, &format!("{path}.loadBalancer"), lb);
    }
    if let Some(pool) = connection_pool {
        connection_pool_settings(errors, &format!("{path}.connectionPool"), pool);
    }
    if let Some(outlier) = outlier_detection {
        outlier_detection_settings(errors, &format!("{path}.outlierDetection"), outlier);
    }
    if let Some(tls) = tls {
        client_tls(errors, &format!("{path}.tls"), tls);
    }
}

fn load_balancer_settings(errors: &mut Errors, path: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        errors.add(path, "only one of simple or consistentHash may be set");
    }
    if let Some(hash) = &lb.consistent_hash {
        let hash_path = format!("{path}.consistentHash");
        let keys = [
            hash.http_header_name.is_some(),
            hash.http_cookie.is_some(),
            hash.use_source_ip.is_some(),
            hash.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|set| **set).count() > 1 {
            errors.add(
                &hash_path,
                "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
            );
        }
        if hash.ring_hash.is_some() && hash.maglev.is_some() {
            errors.add(&hash_path, "only one of ringHash or maglev may be set");
        }
        if let Some(cookie) = &hash.http_cookie {
            if cookie.name.is_empty() {
                errors.add(
                    &format!("{hash_path}.httpCookie.name"),
                    "name must not be empty",
                );
            }
            errors.duration_with(
                &format!("{hash_path}.httpCookie.ttl"),
                cookie.ttl.as_ref(),
                Minimum::None,
            );
        }
    }
    if let Some(locality) = &lb.locality_lb_setting {
        locality_lb(errors, &format!("{path}.localityLbSetting"), locality);
    }
    errors.duration(
        &format!("{path}.warmupDurationSecs"),
        lb.warmup_duration_secs.as_ref(),
    );
    if let Some(warmup) = &lb.warmup {
        errors.duration(&format!("{path}.warmup.duration"), Some(&warmup.duration));
        errors.percent(
            &format!("{path}.warmup.minimumPercent"),
            warmup.minimum_percent,
        );
        if let Some(aggression) = warmup.aggression
            && aggression < 1.0
        {
            errors.add(
                &format!("{path}.warmup.aggression"),
                format!("{aggression} must be at least 1"),
            );
        }
    }
}

fn locality_lb(errors: &mut Errors, path: &str, locality: &LocalityLbSetting) {
    if !locality.distribute.is_empty()
        && (!locality.failover.is_empty() || !locality.failover_priority.is_empty())
    {
        errors.add(
            path,
            "only one of distribute or failover/failoverPriority may be set",
        );
    }
    for (i, distribute) in locality.distribute.iter().enumerate() {
        let total: u64 = distribute.to.values().map(|w| u64::from(*w)).sum();
        if total != 100 {
            errors.add(
                &format!("{path}.distribute[{i}].to"),
                format!("the weights add up to {total}, not 100"),
            );
        }
    }
    for (i, failover) in locality.failover.iter().enumerate() {
        if failover.from.is_some() && failover.from == failover.to {
            errors.add(
                &format!("{path}.failover[{i}]"),
                "from and to must be different regions",
            );
        }
    }
}

fn connection_pool_settings(errors: &mut Errors, path: &str, pool: &ConnectionPoolSettings) {
    if let Some(tcp) = &pool.tcp {
        let tcp_path = format!("{path}.tcp");
        errors.non_negative(&format!("{tcp_path}.maxConnections"), tcp.max_connections);
        errors.duration(
            &format!("{tcp_path}.connectTimeout"),
            tcp.connect_timeout.as_ref(),
        );
        errors.duration(
            &format!("{tcp_path}.maxConnectionDuration"),
            tcp.max_connection_duration.as_ref(),
        );
        errors.duration_with(
            &format!("{tcp_path}.idleTimeout"),
            tcp.idle_timeout.as_ref(),
            Minimum::ZeroOrMillisecond,
        );
        if let Some(keepalive) = &tcp.tcp_keepalive {
            errors.duration(
                &format!("{tcp_path}.tcpKeepalive.time"),
                keepalive.time.as_ref(),
            );
            errors.duration(
                &format!("{tcp_path}.tcpKeepalive.interval"),
                keepalive.interval.as_ref(),
            );
        }
    }
    if let Some(http) = &pool.http {
        let http_path = format!("{path}.http");
        for (field, value) in [
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ] {
            errors.non_negative(&format!("{http_path}.{field}"), value);
        }
        errors.duration(
            &format!("{http_path}.idleTimeout"),
            http.idle_timeout.as_ref(),
        );
    }
}

fn outlier_detection_settings(errors: &mut Errors, path: &str, outlier: &OutlierDetection) {
    errors.non_negative(
        &format!("{path}.consecutiveErrors"),
        outlier.consecutive_errors,
    );
    errors.duration(&format!("{path}.interval"), outlier.interval.as_ref());
    errors.duration(
        &format!("{path}.baseEjectionTime"),
        outlier.base_ejection_time.as_ref(),
    );
    errors.int_percent(
        &format!("{path}.maxEjectionPercent"),
        outlier.max_ejection_percent.map(i64::from),
    );
    errors.int_percent(
        &format!("{path}.minHealthPercent"),
        outlier.min_health_percent.map(i64::from),
    );
}

fn client_tls(errors: &mut Errors, path: &str, tls: &ClientTlsSettings) {
    // As in Istio: MUTUAL needs the client's certificate and key, as files or as a Secret.
    if tls.mode == Some(TlsMode::Mutual) && tls.credential_name.is_none() {
        if tls.client_certificate.is_none() {
            errors.add(
                &format!("{path}.clientCertificate"),
                "clientCertificate is required with mode MUTUAL (or set credentialName)",
            );
        }
        if tls.private_key.is_none() {
            errors.add(
                &format!("{path}.privateKey"),
                "privateKey is required with mode MUTUAL (or set credentialName)",
            );
        }
    }
}

/// Checks a ServiceEntry.
pub fn validate_service_entry(spec: &ServiceEntrySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    entry_hosts(&mut errors, &spec.hosts, resolution);
    for (i, address) in spec.addresses.iter().enumerate() {
        errors.subnet(&format!("spec.addresses[{i}]"), address);
    }
    entry_ports(&mut errors, spec);
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        errors.add(
            "spec.workloadSelector",
            "only one of endpoints or workloadSelector may be set",
        );
    }
    match resolution {
        Resolution::Static if spec.endpoints.is_empty() && spec.workload_selector.is_none() => {
            errors.add(
                "spec.endpoints",
                "resolution STATIC needs endpoints or a workloadSelector",
            );
        }
        Resolution::None if !spec.endpoints.is_empty() => errors.add(
            "spec.endpoints",
            "resolution NONE takes no endpoints (connections go where the client asked)",
        ),
        Resolution::DnsRoundRobin if spec.endpoints.len() > 1 => errors.add(
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN takes at most one endpoint",
        ),
        _ => {}
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        entry_endpoint(
            &mut errors,
            &format!("spec.endpoints[{i}]"),
            endpoint,
            spec,
            resolution,
        );
    }
    errors.export_to("spec.exportTo", &spec.export_to);
    errors.0
}

fn entry_hosts(errors: &mut Errors, hosts: &[String], resolution: Resolution) {
    if hosts.is_empty() {
        errors.add("spec.hosts", "at least one host is required");
    }
    let resolved_by_dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
    for (i, host) in hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if host.is_empty() {
            errors.add(&path, "host must not be empty");
        } else if host == "*" || !is_wildcard_domain(host) {
            errors.add(&path, format!("{host:?} is not a valid host name"));
        } else if host.contains('*') && resolved_by_dns {
            errors.add(
                &path,
                format!("wildcard host {host:?} cannot be resolved with DNS resolution"),
            );
        }
    }
}

/// Port numbers in range, and numbers and names unique (they key the entry's listeners).
fn entry_ports(errors: &mut Errors, spec: &ServiceEntrySpec) {
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        errors.port(&format!("{path}.number"), Some(port.number));
        errors.port(&format!("{path}.targetPort"), port.target_port);
        if !numbers.insert(port.number) {
            let message = format!("port {} is listed twice", port.number);
            errors.add(&format!("{path}.number"), message);
        }
        if port.name.is_empty() {
            errors.add(&format!("{path}.name"), "name must not be empty");
        } else if !names.insert(port.name.as_str()) {
            let message = format!("port name {:?} is listed twice", port.name);
            errors.add(&format!("{path}.name"), message);
        }
    }
}

fn entry_endpoint(
    errors: &mut Errors,
    path: &str,
    endpoint: &WorkloadEntry,
    spec: &ServiceEntrySpec,
    resolution: Resolution,
) {
    let address_path = format!("{path}.address");
    match endpoint.address.as_deref() {
        None | Some("") if endpoint.network.is_none() => {
            errors.add(&address_path, "address is required")
        }
        Some(address)
            if resolution == Resolution::Static
                && !address.starts_with("unix://")
                && address.parse::<IpAddr>().is_err() =>
        {
            let message = format!("{address:?} is not an IP address (resolution STATIC)");
            errors.add(&address_path, message)
        }
        Some(address)
            if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                && address.parse::<IpAddr>().is_err()
                && !is_wildcard_domain(address) =>
        {
            let message = format!("{address:?} is not a host name or IP address");
            errors.add(&address_path, message)
        }
        _ => {}
    }
    for (name, port) in &endpoint.ports {
        let port_path = format!("{path}.ports.{name}");
        errors.port(&port_path, Some(*port));
        if !spec.ports.iter().any(|p| &p.name == name) {
            let message = format!("{name:?} is not the name of a port of the ServiceEntry");
            errors.add(&port_path, message);
        }
    }
}

#[cfg(test)]
mod tests;

/// `PeerAuthentication`: Istio's rules for `portLevelMtls` (only with a selector, keys that are
/// port numbers).
pub fn validate_peer_authentication(spec: &PeerAuthenticationSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if !spec.port_level_mtls.is_empty() && spec.selector.match_labels.is_empty() {
        errors.add(
            "spec.portLevelMtls",
            "needs a selector: port-level settings apply to the selected workloads' ports",
        );
    }
    for port in spec.port_level_mtls.keys() {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            errors.add(
                &format!("spec.portLevelMtls[{port}]"),
                "not a port number in 1..=65535",
            );
        }
    }
    errors.0
}

/// `AuthorizationPolicy`, as Istio validates it: one attachment (selector or targetRef), a
/// provider exactly for CUSTOM, no empty `from.source` / `to.operation` (an empty one would
/// match everything — typically a field whose name was mistyped), conditions with a key and
/// values, valid ports and IP blocks.
pub fn validate_authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if !spec.selector.match_labels.is_empty() && spec.has_target_ref() {
        errors.add(
            "spec",
            "only one of selector, targetRef or targetRefs may be set",
        );
    }
    match (&spec.action, spec.provider.is_empty()) {
        (AuthorizationAction::Custom, true) => {
            errors.add("spec.provider", "action CUSTOM needs a provider");
        }
        (AuthorizationAction::Custom, false) | (_, true) => {}
        (_, false) => errors.add(
            "spec.provider",
            "a provider is only allowed with action CUSTOM",
        ),
    }
    if spec.action == AuthorizationAction::Unknown {
        errors.add("spec.action", "not one of ALLOW, DENY, AUDIT, CUSTOM");
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{r}]");
        for (f, from) in rule.from.iter().enumerate() {
            authorization_source(
                &mut errors,
                &format!("{path}.from[{f}].source"),
                &from.source,
            );
        }
        for (t, to) in rule.to.iter().enumerate() {
            authorization_operation(
                &mut errors,
                &format!("{path}.to[{t}].operation"),
                &to.operation,
            );
        }
        for (w, when) in rule.when.iter().enumerate() {
            let path = format!("{path}.when[{w}]");
            if when.key.is_empty() {
                errors.add(&format!("{path}.key"), "must not be empty");
            }
            if when.values.is_empty() && when.not_values.is_empty() {
                errors.add(&path, "needs values or notValues");
            }
        }
    }
    errors.0
}

fn authorization_source(errors: &mut Errors, path: &str, source: &AuthorizationSource) {
    if source.is_empty() {
        errors.add(path, "must not be empty");
        return;
    }
    for (field, blocks) in [
        ("ipBlocks", &source.ip_blocks),
        ("notIpBlocks", &source.not_ip_blocks),
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
    ] {
        for (i, block) in blocks.iter().enumerate() {
            if !is_ip_or_cidr(block) {
                errors.add(
                    &format!("{path}.{field}[{i}]"),
                    format!("{block:?} is not an IP address or CIDR block"),
                );
            }
        }
    }
}

fn authorization_operation(errors: &mut Errors, path: &str, operation: &AuthorizationOperation) {
    if operation.is_empty() {
        errors.add(path, "must not be empty");
        return;
    }
    for (field, ports) in [
        ("ports", &operation.ports),
        ("notPorts", &operation.not_ports),
    ] {
        for (i, port) in ports.iter().enumerate() {
            if port.parse::<u16>().is_err() {
                errors.add(
                    &format!("{path}.{field}[{i}]"),
                    format!("{port:?} is not a port number"),
                );
            }
        }
    }
}
