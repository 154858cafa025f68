//! VirtualService → route tables: the routes that apply to sidecars, compiled once per
//! VirtualService and spread over the host:ports they cover (http, tls and tcp routes, matches,
//! weighted destinations, rewrites, redirects, retries, faults, mirrors).

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use trellis_api::istio::export_to::exported_to;
use trellis_api::istio::host;
use trellis_api::networking::virtual_service::{
    self as vs, HttpMatchRequest, L4MatchAttributes, RedirectPortSelection, TlsMatchAttributes,
};
use trellis_api::networking::{Percent as IstioPercent, StringMatch as IstioMatch, VirtualService};
use trellis_config::proxy::Service;
use trellis_config::traffic::{
    AbortStatus, CorsPolicy, DirectBody, DirectResponse, Fault, FaultAbort, FaultDelay,
    HeaderEdits, Headers, HttpAction, HttpMatch, HttpRoute, L4Match, Mirror, Pattern, Percent,
    Redirect, RedirectPort, RegexRewrite, RetryOn, RetryPolicy, Rewrite, RouteTable, StringMatch,
    TcpRoute, TlsMatch, TlsRoute, TrafficConfig, WeightedDestination,
};

use super::{
    MESH_GATEWAY, TrafficInputs, creation_key, describe, duration_field, fqdn, percent, port_u16,
};

/// A VirtualService's routes, compiled once, before they are spread over host:ports.
struct CompiledRoutes {
    http: Vec<HttpRoute>,
    tcp: Vec<TcpRoute>,
    tls: Vec<TlsRoute>,
}

pub(super) fn route_tables(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    services: &[&Service],
    warnings: &mut Vec<String>,
) -> Vec<RouteTable> {
    let mut applicable: Vec<&VirtualService> = inputs
        .virtual_services
        .iter()
        .filter(|v| {
            exported_to(
                &v.spec.export_to,
                v.namespace().as_deref().unwrap_or_default(),
                namespace,
            )
        })
        .filter(|v| applies_to_mesh(&v.spec.gateways))
        .collect();
    applicable.sort_by_key(|v| creation_key(*v));
    let mut tables: BTreeMap<(String, u16), RouteTable> = BTreeMap::new();
    for virtual_service in applicable {
        let vs_namespace = virtual_service.namespace().unwrap_or_default();
        let owner = describe("VirtualService", virtual_service);
        let compiled = compile_routes(virtual_service, &vs_namespace, services, &owner, warnings);
        let mut targets: BTreeSet<(String, u16)> = BTreeSet::new();
        for host in &virtual_service.spec.hosts {
            let pattern = host::qualify(host, &vs_namespace);
            for service in services
                .iter()
                .filter(|s| s.hostnames.iter().any(|h| host::matches(&pattern, h)))
            {
                for port in &service.ports {
                    targets.insert((fqdn(service).to_owned(), port.port));
                }
            }
        }
        for (host, port) in targets {
            let table = tables
                .entry((host.clone(), port))
                .or_insert_with(|| RouteTable {
                    host,
                    port,
                    ..RouteTable::default()
                });
            table
                .http
                .extend(compiled.http.iter().filter_map(|r| http_for_port(r, port)));
            table.tcp.extend(compiled.tcp.iter().filter_map(|r| {
                l4_for_port(&r.matches, port, |m| &m.port).map(|matches| TcpRoute {
                    matches,
                    route: r.route.clone(),
                })
            }));
            table.tls.extend(compiled.tls.iter().filter_map(|r| {
                l4_for_port(&r.matches, port, |m| &m.l4.port).map(|matches| TlsRoute {
                    matches,
                    route: r.route.clone(),
                })
            }));
        }
    }
    tables
        .into_values()
        .filter(|t| !(t.http.is_empty() && t.tcp.is_empty() && t.tls.is_empty()))
        .collect()
}

fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY)
}

/// The route as it applies on `port`: blocks for other ports dropped; `None` when none is left.
fn http_for_port(route: &HttpRoute, port: u16) -> Option<HttpRoute> {
    if route.matches.is_empty() {
        return Some(route.clone());
    }
    let matches: Vec<HttpMatch> = route
        .matches
        .iter()
        .filter(|m| m.port.is_none_or(|p| p == port))
        .cloned()
        .collect();
    (!matches.is_empty()).then(|| HttpRoute {
        matches,
        ..route.clone()
    })
}

fn l4_for_port<M: Clone>(
    matches: &[M],
    port: u16,
    port_of: impl Fn(&M) -> &Option<u16>,
) -> Option<Vec<M>> {
    if matches.is_empty() {
        return Some(Vec::new());
    }
    let kept: Vec<M> = matches
        .iter()
        .filter(|m| port_of(m).is_none_or(|p| p == port))
        .cloned()
        .collect();
    (!kept.is_empty()).then_some(kept)
}

fn compile_routes(
    virtual_service: &VirtualService,
    namespace: &str,
    services: &[&Service],
    owner: &str,
    warnings: &mut Vec<String>,
) -> CompiledRoutes {
    let spec = &virtual_service.spec;
    let mut http = Vec::new();
    for (i, route) in spec.http.iter().enumerate() {
        let place = format!("{owner} http[{i}]");
        if route.delegate.is_some() {
            warnings.push(format!("{place}: delegate is not supported; route skipped"));
            continue;
        }
        let Some(compiled) = http_route(route, namespace, services, &place, warnings) else {
            continue;
        };
        // Regexes and ranges are checked here, so one bad route never fails the snapshot.
        let probe = TrafficConfig {
            routes: vec![RouteTable {
                host: place.clone(),
                port: 0,
                http: vec![compiled.clone()],
                ..RouteTable::default()
            }],
            ..TrafficConfig::default()
        };
        match probe.validate() {
            Ok(()) => http.push(compiled),
            Err(e) => warnings.push(format!("route skipped: {e}")),
        }
    }
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            let place = format!("{owner} tcp[{i}]");
            let matches = l4_blocks(&route.r#match, |m| Some(l4_match(m, &place, warnings)))?;
            Some(TcpRoute {
                matches,
                route: route_destinations(&route.route, namespace, services, &place, warnings)?,
            })
        })
        .collect();
    let tls = spec
        .tls
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            let place = format!("{owner} tls[{i}]");
            let blocks = l4_blocks(&route.r#match, Some)?;
            if blocks.is_empty() || blocks.iter().any(|m| m.sni_hosts.is_empty()) {
                warnings.push(format!(
                    "{place}: a TLS route needs a match with sniHosts; skipped"
                ));
                return None;
            }
            let matches = blocks.into_iter().map(tls_match).collect();
            Some(TlsRoute {
                matches,
                route: route_destinations(&route.route, namespace, services, &place, warnings)?,
            })
        })
        .collect();
    CompiledRoutes { http, tcp, tls }
}

/// Compiles match blocks, dropping those bound to gateways other than `mesh`; `None` when the
/// route had blocks and none is left for sidecars.
fn l4_blocks<'a, S, M>(blocks: &'a [S], compile: impl FnMut(&'a S) -> Option<M>) -> Option<Vec<M>>
where
    S: GatewayBound,
{
    let kept: Vec<M> = blocks
        .iter()
        .filter(|b| applies_to_mesh(b.gateways()))
        .filter_map(compile)
        .collect();
    (blocks.is_empty() || !kept.is_empty()).then_some(kept)
}

trait GatewayBound {
    fn gateways(&self) -> &[String];
}

impl GatewayBound for L4MatchAttributes {
    fn gateways(&self) -> &[String] {
        &self.gateways
    }
}

impl GatewayBound for TlsMatchAttributes {
    fn gateways(&self) -> &[String] {
        &self.gateways
    }
}

impl GatewayBound for HttpMatchRequest {
    fn gateways(&self) -> &[String] {
        &self.gateways
    }
}

fn l4_match(m: &L4MatchAttributes, place: &str, warnings: &mut Vec<String>) -> L4Match {
    if m.source_subnet.is_some() {
        warnings.push(format!(
            "{place}: sourceSubnet applies to gateways only; ignored for sidecars"
        ));
    }
    L4Match {
        destination_subnets: m.destination_subnets.clone(),
        port: m.port.and_then(port_u16),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    }
}

fn tls_match(m: &TlsMatchAttributes) -> TlsMatch {
    TlsMatch {
        sni_hosts: m.sni_hosts.clone(),
        l4: L4Match {
            destination_subnets: m.destination_subnets.clone(),
            port: m.port.and_then(port_u16),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        },
    }
}

fn http_route(
    route: &vs::HttpRoute,
    namespace: &str,
    services: &[&Service],
    place: &str,
    warnings: &mut Vec<String>,
) -> Option<HttpRoute> {
    let matches = l4_blocks(&route.r#match, |m| Some(http_match(m)))?;
    let action = if let Some(redirect) = &route.redirect {
        HttpAction::Redirect(Redirect {
            uri: redirect.uri.clone(),
            authority: redirect.authority.clone(),
            port: match (redirect.derive_port, redirect.port.and_then(port_u16)) {
                (Some(RedirectPortSelection::FromProtocolDefault), _) => {
                    Some(RedirectPort::FromProtocolDefault)
                }
                (Some(RedirectPortSelection::FromRequestPort), _) => {
                    Some(RedirectPort::FromRequestPort)
                }
                (None, port) => port.map(RedirectPort::Number),
            },
            scheme: redirect.scheme.clone(),
            code: redirect
                .redirect_code
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(301),
        })
    } else if let Some(direct) = &route.direct_response {
        HttpAction::DirectResponse(DirectResponse {
            status: u16::try_from(direct.status).unwrap_or(0),
            body: direct.body.as_ref().and_then(|b| {
                b.string
                    .clone()
                    .map(DirectBody::String)
                    .or_else(|| b.bytes.clone().map(DirectBody::Bytes))
            }),
        })
    } else {
        let destinations: Vec<RawDestination> = route
            .route
            .iter()
            .map(|d| RawDestination::new(&d.destination, d.weight, headers(d.headers.as_ref())))
            .collect();
        HttpAction::Route(weighted(
            destinations,
            namespace,
            services,
            place,
            warnings,
        )?)
    };
    Some(HttpRoute {
        name: route.name.clone().unwrap_or_default(),
        matches,
        action,
        timeout_ms: duration_field(route.timeout.as_ref(), "timeout", place, warnings)
            .filter(|ms| *ms > 0),
        retries: retry_policy(route.retries.as_ref(), place, warnings),
        fault: route.fault.as_ref().map(|f| fault(f, place, warnings)),
        headers: headers(route.headers.as_ref()),
        rewrite: route.rewrite.as_ref().map(|r| Rewrite {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            uri_regex: r.uri_regex_rewrite.as_ref().and_then(|rr| {
                Some(RegexRewrite {
                    pattern: Pattern::new(rr.r#match.clone()?),
                    rewrite: rr.rewrite.clone().unwrap_or_default(),
                })
            }),
        }),
        mirrors: mirrors(route, namespace, services),
        cors: route.cors_policy.as_ref().map(|c| CorsPolicy {
            allow_origins: c
                .allow_origins
                .iter()
                .filter_map(|m| string_match(m, false))
                .chain(c.allow_origin.iter().map(|o| StringMatch::Exact(o.clone())))
                .collect(),
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age_ms: duration_field(c.max_age.as_ref(), "corsPolicy.maxAge", place, warnings),
            allow_credentials: c.allow_credentials,
        }),
    })
}

/// Istio's `StringMatch` in the model. `{}` matches anything: for a header or query parameter
/// that means "present" (`keyed`), elsewhere it is no condition (`None`).
fn string_match(m: &IstioMatch, keyed: bool) -> Option<StringMatch> {
    match m {
        IstioMatch::Exact(s) => Some(StringMatch::Exact(s.clone())),
        IstioMatch::Prefix(s) => Some(StringMatch::Prefix(s.clone())),
        IstioMatch::Regex(s) => Some(StringMatch::Regex(Pattern::new(s.clone()))),
        IstioMatch::Any => keyed.then_some(StringMatch::Present),
    }
}

fn keyed_matches(
    map: &BTreeMap<String, IstioMatch>,
    lowercase: bool,
) -> BTreeMap<String, StringMatch> {
    map.iter()
        .filter_map(|(name, m)| {
            let name = if lowercase {
                name.to_ascii_lowercase()
            } else {
                name.clone()
            };
            Some((name, string_match(m, true)?))
        })
        .collect()
}

fn http_match(m: &HttpMatchRequest) -> HttpMatch {
    let single = |value: &Option<IstioMatch>| value.as_ref().and_then(|v| string_match(v, false));
    HttpMatch {
        name: m.name.clone().unwrap_or_default(),
        uri: single(&m.uri),
        scheme: single(&m.scheme),
        method: single(&m.method),
        authority: single(&m.authority),
        headers: keyed_matches(&m.headers, true),
        without_headers: keyed_matches(&m.without_headers, true),
        query_params: keyed_matches(&m.query_params, false),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
        port: m.port.and_then(port_u16),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    }
}

/// A destination host as the model names it: the FQDN of the service it resolves to, else the
/// resolved name (the proxy then finds no service and answers 503, as Envoy does).
fn destination_host(host: &str, namespace: &str, services: &[&Service]) -> String {
    let resolved = host::qualify(host, namespace);
    services
        .iter()
        .find(|s| s.hostnames.contains(&resolved))
        .map_or(resolved, |s| fqdn(s).to_owned())
}

/// A route destination before weights are settled.
struct RawDestination {
    host: String,
    subset: String,
    port: Option<u16>,
    weight: Option<i32>,
    headers: Headers,
}

impl RawDestination {
    fn new(destination: &vs::Destination, weight: Option<i32>, headers: Headers) -> Self {
        Self {
            host: destination.host.clone(),
            subset: destination.subset.clone().unwrap_or_default(),
            port: destination.port.and_then(|p| p.number).and_then(port_u16),
            weight,
            headers,
        }
    }
}

/// Weighted destinations: a lone destination gets 100; weights that add up to 0 over several
/// destinations are split evenly (Istio's webhook refuses them; we keep traffic flowing).
fn weighted(
    destinations: Vec<RawDestination>,
    namespace: &str,
    services: &[&Service],
    place: &str,
    warnings: &mut Vec<String>,
) -> Option<Vec<WeightedDestination>> {
    if destinations.is_empty() {
        warnings.push(format!(
            "{place}: no route, redirect or directResponse; skipped"
        ));
        return None;
    }
    let lone = destinations.len() == 1;
    let total: i64 = destinations
        .iter()
        .map(|d| i64::from(d.weight.unwrap_or(0).max(0)))
        .sum();
    if !lone && total == 0 {
        warnings.push(format!(
            "{place}: destination weights add up to 0; traffic split evenly"
        ));
    }
    Some(
        destinations
            .into_iter()
            .map(|d| WeightedDestination {
                host: destination_host(&d.host, namespace, services),
                subset: d.subset,
                port: d.port,
                weight: match (lone, total) {
                    (true, _) => 100,
                    (false, 0) => 1,
                    (false, _) => u32::try_from(d.weight.unwrap_or(0).max(0)).unwrap_or(0),
                },
                headers: d.headers,
            })
            .collect(),
    )
}

fn route_destinations(
    route: &[vs::RouteDestination],
    namespace: &str,
    services: &[&Service],
    place: &str,
    warnings: &mut Vec<String>,
) -> Option<Vec<WeightedDestination>> {
    let destinations = route
        .iter()
        .map(|d| RawDestination::new(&d.destination, d.weight, Headers::default()))
        .collect();
    weighted(destinations, namespace, services, place, warnings)
}

fn headers(headers: Option<&vs::Headers>) -> Headers {
    let edits = |ops: Option<&vs::HeaderOperations>| {
        ops.map_or_else(HeaderEdits::default, |ops| HeaderEdits {
            set: lowercase_keys(&ops.set),
            add: lowercase_keys(&ops.add),
            remove: ops.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        })
    };
    Headers {
        request: edits(headers.and_then(|h| h.request.as_ref())),
        response: edits(headers.and_then(|h| h.response.as_ref())),
    }
}

fn lowercase_keys(map: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    map.iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

/// Istio's `ConvertPolicy`: absent → the default policy; `attempts <= 0` → none; a `retryOn`
/// replaces the default conditions and codes.
fn retry_policy(
    retries: Option<&vs::HttpRetry>,
    place: &str,
    warnings: &mut Vec<String>,
) -> RetryPolicy {
    let Some(retries) = retries else {
        return RetryPolicy::default();
    };
    let ignored: Vec<&str> = [
        (
            "retryRemoteLocalities",
            retries.retry_remote_localities.is_some(),
        ),
        (
            "retryIgnorePreviousHosts",
            retries.retry_ignore_previous_hosts.is_some(),
        ),
        ("backoff", retries.backoff.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    if !ignored.is_empty() {
        warnings.push(format!(
            "{place}: retries fields not supported, ignored: {} (Envoy's 25 ms jittered backoff applies)",
            ignored.join(", ")
        ));
    }
    let attempts = u32::try_from(retries.attempts.unwrap_or(0)).unwrap_or(0);
    if attempts == 0 {
        return RetryPolicy {
            attempts: 0,
            ..RetryPolicy::default()
        };
    }
    let retry_on = match retries.retry_on.as_deref() {
        Some(text) if !text.trim().is_empty() => RetryOn::parse(text).unwrap_or_else(|e| {
            warnings.push(format!("{place}: {e}; Istio's default conditions used"));
            RetryOn::istio_default()
        }),
        _ => RetryOn::istio_default(),
    };
    RetryPolicy {
        attempts,
        per_try_timeout_ms: duration_field(
            retries.per_try_timeout.as_ref(),
            "retries.perTryTimeout",
            place,
            warnings,
        )
        .filter(|ms| *ms > 0),
        retry_on,
    }
}

fn fault(fault: &vs::HttpFaultInjection, place: &str, warnings: &mut Vec<String>) -> Fault {
    let delay = fault.delay.as_ref().and_then(|d| {
        let fixed = duration_field(
            d.fixed_delay.as_ref(),
            "fault.delay.fixedDelay",
            place,
            warnings,
        );
        if fixed.is_none() && d.exponential_delay.is_some() {
            warnings.push(format!(
                "{place}: exponentialDelay is not supported; ignored"
            ));
        }
        Some(FaultDelay {
            fixed_delay_ms: fixed?,
            percentage: fault_percent(d.percentage.as_ref(), d.percent),
        })
    });
    let abort = fault.abort.as_ref().and_then(|a| {
        let status = if let Some(code) = a.http_status {
            AbortStatus::Http(u16::try_from(code).unwrap_or(0))
        } else if let Some(name) = &a.grpc_status {
            match grpc_code(name) {
                Some(code) => AbortStatus::Grpc(code),
                None => {
                    warnings.push(format!(
                        "{place}: unknown grpcStatus {name:?}; abort ignored"
                    ));
                    return None;
                }
            }
        } else {
            warnings.push(format!(
                "{place}: abort without httpStatus or grpcStatus; ignored"
            ));
            return None;
        };
        Some(FaultAbort {
            status,
            percentage: fault_percent(a.percentage.as_ref(), None),
        })
    });
    Fault { delay, abort }
}

/// `percentage`, else the deprecated integer `percent`, else none at all.
fn fault_percent(percentage: Option<&IstioPercent>, deprecated: Option<i32>) -> Percent {
    match (percentage, deprecated) {
        (Some(p), _) => percent(p),
        (None, Some(p)) => Percent::from_percent(f64::from(p)),
        (None, None) => Percent(0),
    }
}

/// gRPC status names (`UNAVAILABLE`) or numbers.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(code) = name.parse::<u32>() {
        return (code < 17).then_some(code);
    }
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .and_then(|i| u32::try_from(i).ok())
}

fn mirrors(route: &vs::HttpRoute, namespace: &str, services: &[&Service]) -> Vec<Mirror> {
    let mirror = |d: &vs::Destination, percentage: Percent| Mirror {
        host: destination_host(&d.host, namespace, services),
        subset: d.subset.clone().unwrap_or_default(),
        port: d.port.and_then(|p| p.number).and_then(port_u16),
        percentage,
    };
    let single = route.mirror.as_ref().map(|d| {
        let share = route
            .mirror_percentage
            .as_ref()
            .map(percent)
            .or_else(|| {
                route
                    .mirror_percent
                    .or(route.mirror_percent_snake_case)
                    .map(|p| Percent::from_percent(f64::from(p)))
            })
            .unwrap_or(Percent::ALL);
        mirror(d, share)
    });
    single
        .into_iter()
        .chain(route.mirrors.iter().map(|m| {
            mirror(
                &m.destination,
                m.percentage.as_ref().map_or(Percent::ALL, percent),
            )
        }))
        .collect()
}
