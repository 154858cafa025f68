//! The pure "what should happen to this request" half of traffic management: given the config,
//! the destination `destination::lookup` found and the request's attributes, which VirtualService
//! route applies and what it does (weighted destination, redirect, direct response, rewrites,
//! faults, mirrors). Endpoint choice per cluster ([`balance`]), retry decisions and backoff
//! ([`retry`]) and outlier ejection ([`outlier`]) live in submodules. No I/O here: random draws,
//! in-flight counts and the clock are arguments, so every decision is testable; the HTTP path in
//! `outbound/http.rs` does the I/O.

pub mod balance;
pub mod outlier;
pub mod retry;

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::HeaderMap;
use trellis_config::proxy::{ProxyConfig, Service, ServicePort};
use trellis_config::traffic::{
    AbortStatus, Cluster, Fault, HttpMatch, HttpRoute, L4Match, Mirror, Redirect, RedirectPort,
    Rewrite, RouteTable, StringMatch, TcpRoute, TlsRoute, WeightedDestination,
};

use crate::destination::Destination;
use crate::host::Authority;

/// What the matcher reads from an HTTP request and its connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttributes<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Raw query string without `?` (not percent-decoded, as Envoy's query matcher).
    pub query: &'a str,
    /// Normalised once ([`Authority::parse`]): what `authority` matches and redirects see.
    pub authority: &'a Authority,
    /// `http` or `https`.
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// Labels of the workload this proxy runs beside (the request's source).
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
    /// The service port the request was sent to.
    pub port: u16,
}

/// The route chosen for an HTTP request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HttpDecision<'a> {
    /// The host:port has no VirtualService: every endpoint of the service, as without routing.
    Default,
    /// A VirtualService exists but no route matched: Envoy answers 404 (`NR`).
    NoRoute,
    Matched(MatchedRoute<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchedRoute<'a> {
    /// Position in the table's `http` list.
    pub index: usize,
    pub route: &'a HttpRoute,
    /// The match block that matched (`None` for a route without match blocks); a URI rewrite
    /// of a prefix match replaces only that prefix.
    pub matched: Option<&'a HttpMatch>,
}

/// The route table of the destination's service port, if any.
pub fn route_table<'a>(
    config: &'a ProxyConfig,
    destination: &Destination<'_>,
) -> Option<&'a RouteTable> {
    destination
        .service
        .hostnames
        .iter()
        .find_map(|host| config.traffic.route_table(host, destination.port.port))
}

/// First match wins, in `http[]` order.
pub fn match_http<'a>(
    config: &'a ProxyConfig,
    destination: &Destination<'_>,
    request: &RequestAttributes<'_>,
) -> HttpDecision<'a> {
    let Some(table) = route_table(config, destination) else {
        return HttpDecision::Default;
    };
    if table.http.is_empty() {
        return HttpDecision::Default;
    }
    for (index, route) in table.http.iter().enumerate() {
        if route.matches.is_empty() {
            return HttpDecision::Matched(MatchedRoute {
                index,
                route,
                matched: None,
            });
        }
        if let Some(block) = route
            .matches
            .iter()
            .find(|m| http_block_matches(m, request))
        {
            return HttpDecision::Matched(MatchedRoute {
                index,
                route,
                matched: Some(block),
            });
        }
    }
    HttpDecision::NoRoute
}

/// Every condition of one block (AND).
pub fn http_block_matches(block: &HttpMatch, request: &RequestAttributes<'_>) -> bool {
    let single = |condition: &Option<StringMatch>, value: &str, ignore_case: bool| {
        condition
            .as_ref()
            .is_none_or(|m| m.matches(value, ignore_case))
    };
    single(&block.uri, request.path, block.ignore_uri_case)
        && single(&block.scheme, request.scheme, false)
        && single(&block.method, request.method, false)
        && block
            .authority
            .as_ref()
            .is_none_or(|m| authority_matches(m, request.authority))
        && block.port.is_none_or(|port| port == request.port)
        && block
            .source_namespace
            .as_deref()
            .is_none_or(|ns| ns == request.source_namespace)
        && labels_match(&block.source_labels, request.source_labels)
        && block.headers.iter().all(|(name, m)| {
            header_value(request.headers, name).is_some_and(|v| m.matches(&v, false))
        })
        && !block.without_headers.iter().any(|(name, m)| {
            header_value(request.headers, name).is_some_and(|v| m.matches(&v, false))
        })
        && block
            .query_params
            .iter()
            .all(|(name, m)| query_value(request.query, name).is_some_and(|v| m.matches(v, false)))
}

/// An `authority` match compares the normalised authority, with its port and without it, so
/// neither case, a trailing dot nor a port added to the request steps around the route.
/// Envoy compares the raw `:authority` case-sensitively; a host is case-insensitive, so exact
/// and prefix patterns ignore case and a regex sees the lower-cased authority.
fn authority_matches(m: &StringMatch, authority: &Authority) -> bool {
    m.matches(authority.host(), true) || m.matches(authority.as_str(), true)
}

fn labels_match(wanted: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// A header's values joined with `,` (Envoy matches repeated headers that way); `None` when
/// absent or not valid text.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let texts: Option<Vec<&str>> = values.map(|v| v.to_str().ok()).collect();
    Some(texts?.join(","))
}

/// The first value of a query parameter (`a` in `?a` is present with an empty value).
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The weighted destination a uniformly random `draw` selects: destination `i` covers
/// `[w0+…+w(i-1), w0+…+wi)` of the total weight.
pub fn pick_weighted(
    destinations: &[WeightedDestination],
    draw: u64,
) -> Option<&WeightedDestination> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = draw % total;
    destinations.iter().find(|d| {
        let weight = u64::from(d.weight);
        if point < weight {
            return true;
        }
        point -= weight;
        false
    })
}

/// A destination resolved against the config: the service and port to connect to, the subset,
/// and the cluster settings (`None`: defaults).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub service: &'a Service,
    pub port: &'a ServicePort,
    pub subset: &'a str,
    pub cluster: Option<&'a Cluster>,
}

impl<'a> Target<'a> {
    /// The service's first hostname (its FQDN): what metrics and TLS server names use.
    pub fn hostname(&self) -> &'a str {
        self.service.hostnames.first().map_or("", String::as_str)
    }
}

/// Resolves a route destination (host, subset, port) to a service of the config. `request_port`
/// is used when the destination names no port (Istio allows that when the service has one port,
/// and Envoy then keeps the port the request came in on).
pub fn resolve_target<'a>(
    config: &'a ProxyConfig,
    host: &str,
    subset: &'a str,
    port: Option<u16>,
    request_port: u16,
) -> Option<Target<'a>> {
    let service = config
        .services
        .iter()
        .find(|s| s.hostnames.iter().any(|h| h == host))?;
    let wanted = port.unwrap_or(request_port);
    let service_port = service
        .ports
        .iter()
        .find(|p| p.port == wanted)
        .or_else(|| (port.is_none() && service.ports.len() == 1).then(|| &service.ports[0]))?;
    let fqdn = service.hostnames.first().map_or(host, String::as_str);
    Some(Target {
        service,
        port: service_port,
        subset,
        cluster: config.traffic.cluster(fqdn, subset, service_port.port),
    })
}

/// The target of the default route (no VirtualService): the destination's own service and port,
/// no subset, with the host-wide cluster settings if a DestinationRule exists.
pub fn default_target<'a>(config: &'a ProxyConfig, destination: &Destination<'a>) -> Target<'a> {
    Target {
        service: destination.service,
        port: destination.port,
        subset: "",
        cluster: config
            .traffic
            .cluster(destination.hostname(), "", destination.port.port),
    }
}

/// The path after a route's rewrite: `uri` replaces the matched prefix when the route matched by
/// prefix (Envoy's `prefix_rewrite`), else the whole path; `uriRegexRewrite` replaces every match.
pub fn rewrite_path(rewrite: &Rewrite, matched: Option<&HttpMatch>, path: &str) -> String {
    if let Some(uri) = &rewrite.uri {
        return match matched.and_then(|m| m.uri.as_ref()) {
            Some(StringMatch::Prefix(prefix)) if path.len() >= prefix.len() => {
                format!("{uri}{}", &path[prefix.len()..])
            }
            _ => uri.clone(),
        };
    }
    if let Some(regex) = &rewrite.uri_regex
        && let Ok(pattern) = regex.pattern.unanchored()
    {
        return pattern
            .replace_all(path, envoy_substitution(&regex.rewrite).as_str())
            .into_owned();
    }
    path.to_owned()
}

/// RE2 writes groups as `\1`; the `regex` crate as `${1}`.
fn envoy_substitution(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// The `Location` of a redirect: each part the redirect names replaces the request's.
pub fn redirect_location(redirect: &Redirect, request: &RequestAttributes<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(request.scheme);
    let rewritten = redirect.authority.as_deref().map(Authority::parse);
    let authority = rewritten.as_ref().unwrap_or(request.authority);
    let host = authority.host();
    let port = match redirect.port {
        Some(RedirectPort::Number(port)) => Some(port),
        Some(RedirectPort::FromRequestPort) => Some(request.port),
        Some(RedirectPort::FromProtocolDefault) => None,
        None => authority.port(),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let path = redirect.uri.as_deref().unwrap_or(request.path);
    let query = if redirect.uri.is_none() && !request.query.is_empty() {
        format!("?{}", request.query)
    } else {
        String::new()
    };
    match port.filter(|p| *p != default_port) {
        Some(port) => format!("{scheme}://{host}:{port}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    }
}

/// What a route's fault injection does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultDecision {
    pub delay_ms: Option<u64>,
    pub abort: Option<AbortStatus>,
}

/// Delay and abort are drawn independently (two draws), as Envoy's fault filter does.
pub fn decide_fault(fault: &Fault, delay_draw: u64, abort_draw: u64) -> FaultDecision {
    FaultDecision {
        delay_ms: fault
            .delay
            .as_ref()
            .filter(|d| d.percentage.admits(delay_draw))
            .map(|d| d.fixed_delay_ms),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| a.percentage.admits(abort_draw))
            .map(|a| a.status),
    }
}

/// The mirrors a request is copied to; `draw` is called once per mirror, in order.
pub fn mirrors_for(mirrors: &[Mirror], mut draw: impl FnMut() -> u64) -> Vec<&Mirror> {
    mirrors
        .iter()
        .filter(|mirror| mirror.percentage.admits(draw()))
        .collect()
}

/// What the matcher reads from a TCP or TLS connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttributes<'a> {
    pub destination_ip: IpAddr,
    pub port: u16,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

/// The first TCP route whose match blocks (OR) admit the connection; `None` means the default
/// (no table, or no TCP route matched: Istio then uses the service itself).
pub fn match_tcp<'a>(
    config: &'a ProxyConfig,
    destination: &Destination<'_>,
    connection: &ConnectionAttributes<'_>,
) -> Option<&'a TcpRoute> {
    route_table(config, destination)?.tcp.iter().find(|route| {
        route.matches.is_empty() || route.matches.iter().any(|m| l4_matches(m, connection))
    })
}

/// The first TLS route one of whose blocks matches the SNI and the connection.
pub fn match_tls<'a>(
    config: &'a ProxyConfig,
    destination: &Destination<'_>,
    sni: &str,
    connection: &ConnectionAttributes<'_>,
) -> Option<&'a TlsRoute> {
    route_table(config, destination)?.tls.iter().find(|route| {
        route.matches.iter().any(|m| {
            m.sni_hosts.iter().any(|pattern| sni_matches(pattern, sni))
                && l4_matches(&m.l4, connection)
        })
    })
}

/// `*.example.com` covers `a.example.com` and `a.b.example.com`, not `example.com`; `*` any.
pub fn sni_matches(pattern: &str, sni: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => sni.len() > suffix.len() && ends_with_ignore_case(sni, suffix),
        None => pattern.eq_ignore_ascii_case(sni),
    }
}

fn ends_with_ignore_case(value: &str, suffix: &str) -> bool {
    value
        .len()
        .checked_sub(suffix.len())
        .and_then(|start| value.get(start..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
}

fn l4_matches(block: &L4Match, connection: &ConnectionAttributes<'_>) -> bool {
    block.port.is_none_or(|p| p == connection.port)
        && block
            .source_namespace
            .as_deref()
            .is_none_or(|ns| ns == connection.source_namespace)
        && labels_match(&block.source_labels, connection.source_labels)
        && (block.destination_subnets.is_empty()
            || block
                .destination_subnets
                .iter()
                .any(|cidr| in_subnet(cidr, connection.destination_ip)))
}

/// Whether `ip` is inside `cidr` (`10.0.0.0/8`, or a bare address).
pub fn in_subnet(cidr: &str, ip: IpAddr) -> bool {
    let (network, bits) = match cidr.split_once('/') {
        Some((network, bits)) => (network, bits.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(network) = network.parse::<IpAddr>() else {
        return false;
    };
    match (network, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
