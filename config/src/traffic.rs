//! The compiled traffic model: what a proxy needs to route a request (Istio's VirtualService,
//! resolved per host:port), to pick and treat an upstream (DestinationRule, resolved per
//! host/subset/port into a [`Cluster`]) and to know external hosts (ServiceEntry). Plain data,
//! produced by the operator's traffic compile and consumed by the proxy's route matcher.
//!
//! Compactness matters (a proxy holds configs of 10,000 services): durations are milliseconds,
//! percentages are parts per million, optional parts are skipped when empty, and a host without a
//! VirtualService or DestinationRule has no entry at all (the proxy then uses every endpoint of
//! the service, round robin, as before traffic management existed).
//!
//! Regular expressions are kept as source text ([`Pattern`]) and compiled once, by
//! [`TrafficConfig::validate`], which [`ProxyConfig::validate`](crate::proxy::ProxyConfig) calls:
//! a snapshot with one bad regex is rejected whole, and a validated one matches without
//! recompiling.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Compiled regexes larger than this are refused: one hostile VirtualService must not make every
/// proxy allocate megabytes (Envoy bounds RE2 program size for the same reason).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Parts per million in 100 %.
pub const MILLION: u32 = 1_000_000;

/// Traffic management for one proxy: route tables, clusters and ServiceEntry facts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficConfig {
    /// One table per host:port that has a VirtualService; sorted by (host, port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteTable>,
    /// One cluster per host/subset/port that a DestinationRule or ServiceEntry shapes; sorted by
    /// (host, subset, port). Port 0 means "every port of the host without its own entry".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Cluster>,
    /// What ServiceEntries say about their hosts beyond the plain service (which is compiled
    /// into `ProxyConfig::services` like a Kubernetes Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_services: Vec<ExternalService>,
}

impl TrafficConfig {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.clusters.is_empty() && self.external_services.is_empty()
    }

    /// The route table of `host` (a service's FQDN) on service port `port`.
    pub fn route_table(&self, host: &str, port: u16) -> Option<&RouteTable> {
        self.routes
            .binary_search_by(|t| (t.host.as_str(), t.port).cmp(&(host, port)))
            .ok()
            .map(|i| &self.routes[i])
    }

    /// The cluster for `host`/`subset`/`port`: the port's own entry, else the host-wide one
    /// (port 0). `None` means defaults (all endpoints, default LB, no outlier detection).
    pub fn cluster(&self, host: &str, subset: &str, port: u16) -> Option<&Cluster> {
        let find = |port: u16| {
            self.clusters
                .binary_search_by(|c| {
                    (c.host.as_str(), c.subset.as_str(), c.port).cmp(&(host, subset, port))
                })
                .ok()
                .map(|i| &self.clusters[i])
        };
        find(port).or_else(|| find(0))
    }

    pub fn external_service(&self, host: &str) -> Option<&ExternalService> {
        self.external_services.iter().find(|s| s.host == host)
    }

    /// Sorts tables and clusters into lookup order; the compile calls it before publishing.
    pub fn normalize(&mut self) {
        self.routes
            .sort_by(|a, b| (a.host.as_str(), a.port).cmp(&(b.host.as_str(), b.port)));
        self.clusters.sort_by(|a, b| {
            (a.host.as_str(), a.subset.as_str(), a.port).cmp(&(
                b.host.as_str(),
                b.subset.as_str(),
                b.port,
            ))
        });
        self.external_services.sort_by(|a, b| a.host.cmp(&b.host));
    }

    /// Checks what serde cannot: every regex compiles (and is compiled now, for the matcher),
    /// weights and percentages are in range, tables are sorted for lookup.
    pub fn validate(&self) -> Result<(), TrafficError> {
        for pair in self.routes.windows(2) {
            if (pair[0].host.as_str(), pair[0].port) >= (pair[1].host.as_str(), pair[1].port) {
                return Err(TrafficError::Unsorted(format!(
                    "route table {}:{}",
                    pair[1].host, pair[1].port
                )));
            }
        }
        for pair in self.clusters.windows(2) {
            let key = |c: &Cluster| (c.host.clone(), c.subset.clone(), c.port);
            if key(&pair[0]) >= key(&pair[1]) {
                return Err(TrafficError::Unsorted(format!(
                    "cluster {}/{}:{}",
                    pair[1].host, pair[1].subset, pair[1].port
                )));
            }
        }
        for table in &self.routes {
            table.validate()?;
        }
        for cluster in &self.clusters {
            cluster.validate()?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TrafficError {
    #[error("{place}: invalid regex {pattern:?}: {reason}")]
    Regex {
        place: String,
        pattern: String,
        reason: String,
    },
    #[error("{0}: a percentage must be between 0 and 100")]
    Percentage(String),
    #[error("{0}: an HTTP route must have a destination, a redirect or a direct response")]
    NoAction(String),
    #[error("{0}: the destination weights add up to 0")]
    ZeroWeight(String),
    #[error("{0} is out of order (tables must be sorted for lookup)")]
    Unsorted(String),
    #[error("retryOn {value:?}: unknown condition {condition:?}")]
    RetryOn { value: String, condition: String },
    #[error("{0}: a status code must be between 100 and 599")]
    Status(String),
}

// ---------------------------------------------------------------------------------------------
// Matching primitives
// ---------------------------------------------------------------------------------------------

/// A regular expression matched against the whole input (RE2 syntax, as Istio/Envoy), stored as
/// its source and compiled once on first use or at validation.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    compiled: OnceLock<Result<regex::Regex, String>>,
}

impl Pattern {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            compiled: OnceLock::new(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The anchored regex, or why it does not compile.
    pub fn regex(&self) -> Result<&regex::Regex, &str> {
        self.compiled
            .get_or_init(|| {
                // Full match, as Envoy's safe_regex: `^(?:...)$` keeps alternations inside.
                regex::RegexBuilder::new(&format!("^(?:{})$", self.source))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Full match; a pattern that does not compile matches nothing (validation refuses it first).
    pub fn is_full_match(&self, input: &str) -> bool {
        self.regex().is_ok_and(|r| r.is_match(input))
    }

    /// The same source without anchors, for rewrites that replace every match.
    pub fn unanchored(&self) -> Result<regex::Regex, String> {
        regex::RegexBuilder::new(&self.source)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| e.to_string())
    }

    fn check(&self, place: impl FnOnce() -> String) -> Result<(), TrafficError> {
        self.regex()
            .map(drop)
            .map_err(|reason| TrafficError::Regex {
                place: place(),
                pattern: self.source.clone(),
                reason: reason.to_owned(),
            })
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

/// Istio's `StringMatch`, plus `present` for a header or query parameter named with an empty
/// match (`headers: {x-debug: {}}` matches any value of a present header).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    Present,
}

impl StringMatch {
    /// Whether `value` matches; `ignore_case` applies to exact and prefix only (as Envoy's
    /// `ignore_case`, which regexes do not honour).
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Self::Exact(s) if ignore_case => value.eq_ignore_ascii_case(s),
            Self::Exact(s) => value == s,
            Self::Prefix(p) if ignore_case => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(r) => r.is_full_match(value),
            Self::Present => true,
        }
    }

    fn check(&self, place: impl FnOnce() -> String) -> Result<(), TrafficError> {
        match self {
            Self::Regex(r) => r.check(place),
            _ => Ok(()),
        }
    }
}

/// A share of requests, in parts per million (so 0.1 % is exact and comparisons are integer).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Percent(pub u32);

impl Percent {
    pub const ALL: Self = Self(MILLION);

    /// From Istio's `Percent.value` (a double in 0..=100).
    pub fn from_percent(value: f64) -> Self {
        let ppm = (value * 10_000.0).round();
        Self(if ppm <= 0.0 {
            0
        } else if ppm >= f64::from(MILLION) {
            MILLION
        } else {
            // In range by the two checks above.
            ppm as u32
        })
    }

    /// Whether a request with the uniformly random `draw` falls into the share.
    pub fn admits(self, draw: u64) -> bool {
        draw % u64::from(MILLION) < u64::from(self.0)
    }

    fn check(self, place: impl FnOnce() -> String) -> Result<(), TrafficError> {
        if self.0 > MILLION {
            return Err(TrafficError::Percentage(place()));
        }
        Ok(())
    }
}

impl Default for Percent {
    fn default() -> Self {
        Self::ALL
    }
}

fn is_all(p: &Percent) -> bool {
    *p == Percent::ALL
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// Routes of one host:port, in VirtualService order (first match wins).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// The service's FQDN (`reviews.default.svc.cluster.local`) or ServiceEntry host.
    pub host: String,
    /// Service port.
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRoute>,
}

impl RouteTable {
    fn validate(&self) -> Result<(), TrafficError> {
        for (i, route) in self.http.iter().enumerate() {
            route.validate(&|| format!("{}:{} http[{i}]", self.host, self.port))?;
        }
        for (i, route) in self.tcp.iter().enumerate() {
            check_weights(&route.route, || {
                format!("{}:{} tcp[{i}]", self.host, self.port)
            })?;
        }
        for (i, route) in self.tls.iter().enumerate() {
            check_weights(&route.route, || {
                format!("{}:{} tls[{i}]", self.host, self.port)
            })?;
        }
        Ok(())
    }
}

fn check_weights(
    destinations: &[WeightedDestination],
    place: impl Fn() -> String,
) -> Result<(), TrafficError> {
    if destinations
        .iter()
        .map(|d| u64::from(d.weight))
        .sum::<u64>()
        == 0
    {
        return Err(TrafficError::ZeroWeight(place()));
    }
    Ok(())
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// `name` of the route, for logs and metrics.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Match blocks, OR-ed; empty matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    /// Whole-request timeout; `None` means none (Istio's default for HTTP routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Istio's default policy when the route says nothing (and then not serialized).
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retries: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Route-level header edits; destination-level ones are on each destination.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// `mirror`+`mirrorPercentage` and `mirrors`, as one list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
}

impl HttpRoute {
    fn validate(&self, place: &dyn Fn() -> String) -> Result<(), TrafficError> {
        for (m, block) in self.matches.iter().enumerate() {
            block.validate(&|| format!("{} match[{m}]", place()))?;
        }
        match &self.action {
            HttpAction::Route(destinations) => {
                if destinations.is_empty() {
                    return Err(TrafficError::NoAction(place()));
                }
                check_weights(destinations, place)?;
            }
            HttpAction::Redirect(redirect) => check_status(redirect.code, place)?,
            HttpAction::DirectResponse(response) => check_status(response.status, place)?,
        }
        if let Some(fault) = &self.fault {
            fault.validate(place)?;
        }
        if let Some(rewrite) = &self.rewrite
            && let Some(regex) = &rewrite.uri_regex
        {
            regex
                .pattern
                .check(|| format!("{} rewrite.uriRegexRewrite", place()))?;
        }
        for mirror in &self.mirrors {
            mirror.percentage.check(|| format!("{} mirror", place()))?;
        }
        if let Some(cors) = &self.cors {
            for origin in &cors.allow_origins {
                origin.check(|| format!("{} corsPolicy.allowOrigins", place()))?;
            }
        }
        Ok(())
    }
}

fn check_status(code: u16, place: impl Fn() -> String) -> Result<(), TrafficError> {
    if !(100..=599).contains(&code) {
        return Err(TrafficError::Status(place()));
    }
    Ok(())
}

/// One match block: every condition set must hold (AND).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Lower-cased header names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Lower-cased header names; the block fails if any of these matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

impl HttpMatch {
    fn validate(&self, place: &dyn Fn() -> String) -> Result<(), TrafficError> {
        let singles = [
            ("uri", &self.uri),
            ("scheme", &self.scheme),
            ("method", &self.method),
            ("authority", &self.authority),
        ];
        for (field, value) in singles {
            if let Some(value) = value {
                value.check(|| format!("{} {field}", place()))?;
            }
        }
        let maps = [
            ("headers", &self.headers),
            ("withoutHeaders", &self.without_headers),
            ("queryParams", &self.query_params),
        ];
        for (field, map) in maps {
            for (name, value) in map {
                value.check(|| format!("{} {field}.{name}", place()))?;
            }
        }
        Ok(())
    }
}

/// What a matched HTTP route does (Istio: `route`, `redirect` and `directResponse` exclude each
/// other).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum HttpAction {
    Route(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

impl Default for HttpAction {
    fn default() -> Self {
        Self::Route(Vec::new())
    }
}

/// Where a share of traffic goes: a cluster (host/subset/port) and its weight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WeightedDestination {
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// `None`: the port the request arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative weight; a lone destination without weight gets 100.
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
}

/// Request and response header edits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request: HeaderEdits,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response: HeaderEdits,
}

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    /// Replace (or create) these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// Replaces the matched prefix when the route matched `uri.prefix`, else the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    /// Every match in the path is replaced (RE2 `GlobalReplace`, as Envoy's `regex_rewrite`).
    #[serde(rename = "match")]
    pub pattern: Pattern,
    /// Replacement with `\1`-style groups (stored as given; the matcher converts them).
    pub rewrite: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<RedirectPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// 301 unless the route says otherwise.
    pub code: u16,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RedirectPort {
    Number(u16),
    /// `derivePort: FROM_PROTOCOL_DEFAULT`: 80 for http, 443 for https.
    FromProtocolDefault,
    /// `derivePort: FROM_REQUEST_PORT`.
    FromRequestPort,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<DirectBody>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum DirectBody {
    String(String),
    /// Base64, as Istio's `bytes`; the I/O layer decodes it.
    Bytes(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "is_all")]
    pub percentage: Percent,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
}

impl CorsPolicy {
    /// Whether a request's `Origin` is allowed (exact, prefix or regex, case-sensitive).
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin, false))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

impl Fault {
    fn validate(&self, place: &dyn Fn() -> String) -> Result<(), TrafficError> {
        if let Some(delay) = &self.delay {
            delay
                .percentage
                .check(|| format!("{} fault.delay", place()))?;
        }
        if let Some(abort) = &self.abort {
            abort
                .percentage
                .check(|| format!("{} fault.abort", place()))?;
            if let AbortStatus::Http(code) = abort.status {
                check_status(code, || format!("{} fault.abort.httpStatus", place()))?;
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay_ms: u64,
    #[serde(default, skip_serializing_if = "is_all")]
    pub percentage: Percent,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub status: AbortStatus,
    #[serde(default, skip_serializing_if = "is_all")]
    pub percentage: Percent,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code (`UNAVAILABLE` is 14), sent as `grpc-status` with HTTP 200.
    Grpc(u32),
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// Retry policy of a route. The default is Istio's: 2 attempts on connect-failure,
/// refused-stream, unavailable, cancelled and retriable-status-codes (503).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retries.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: RetryOn::istio_default(),
        }
    }
}

/// `retryOn` parsed: Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` conditions and the
/// retriable status codes (a bare number in Istio's list adds a code and implies
/// `retriable-status-codes`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    pub conditions: Vec<RetryCondition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
}

impl RetryOn {
    pub fn istio_default() -> Self {
        Self {
            conditions: vec![
                RetryCondition::ConnectFailure,
                RetryCondition::RefusedStream,
                RetryCondition::Unavailable,
                RetryCondition::Cancelled,
                RetryCondition::RetriableStatusCodes,
            ],
            status_codes: vec![503],
        }
    }

    /// Parses Istio's comma-separated `retryOn`.
    pub fn parse(value: &str) -> Result<Self, TrafficError> {
        let mut parsed = Self::default();
        for condition in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if let Ok(code) = condition.parse::<u16>() {
                check_status(code, || format!("retryOn {value:?}"))?;
                if !parsed.status_codes.contains(&code) {
                    parsed.status_codes.push(code);
                }
                parsed.add(RetryCondition::RetriableStatusCodes);
                continue;
            }
            let known =
                RetryCondition::from_name(condition).ok_or_else(|| TrafficError::RetryOn {
                    value: value.to_owned(),
                    condition: condition.to_owned(),
                })?;
            parsed.add(known);
        }
        Ok(parsed)
    }

    fn add(&mut self, condition: RetryCondition) {
        if !self.conditions.contains(&condition) {
            self.conditions.push(condition);
        }
    }

    pub fn has(&self, condition: RetryCondition) -> bool {
        self.conditions.contains(&condition)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryCondition {
    /// Any 5xx, a reset or a connect failure.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// Connection reset, disconnect or timeout before a response.
    Reset,
    ConnectFailure,
    /// 409.
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    EnvoyRatelimited,
    /// gRPC status CANCELLED (1).
    Cancelled,
    /// gRPC DEADLINE_EXCEEDED (4).
    DeadlineExceeded,
    /// gRPC INTERNAL (13).
    Internal,
    /// gRPC RESOURCE_EXHAUSTED (8).
    ResourceExhausted,
    /// gRPC UNAVAILABLE (14).
    Unavailable,
}

impl RetryCondition {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "5xx" => Self::FiveXx,
            "gateway-error" => Self::GatewayError,
            "reset" => Self::Reset,
            "connect-failure" => Self::ConnectFailure,
            "retriable-4xx" => Self::Retriable4xx,
            "refused-stream" => Self::RefusedStream,
            "retriable-status-codes" => Self::RetriableStatusCodes,
            "envoy-ratelimited" => Self::EnvoyRatelimited,
            "cancelled" => Self::Cancelled,
            "deadline-exceeded" => Self::DeadlineExceeded,
            "internal" => Self::Internal,
            "resource-exhausted" => Self::ResourceExhausted,
            "unavailable" => Self::Unavailable,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TCP and TLS routes
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4Match>,
    pub route: Vec<WeightedDestination>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    /// Match blocks; each needs at least one SNI host (Istio requires `sniHosts`).
    pub matches: Vec<TlsMatch>,
    pub route: Vec<WeightedDestination>,
}

/// Conditions shared by TCP and TLS matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// CIDRs (`10.1.0.0/16`) or single addresses the connection's destination IP must be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    /// Exact names or `*.suffix` wildcards.
    pub sni_hosts: Vec<String>,
    #[serde(flatten)]
    pub l4: L4Match,
}

// ---------------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------------

/// Upstream settings of one host/subset/port: the DestinationRule's traffic policy merged the way
/// Istio merges it (top level, then its port-level settings, then the subset's policy, then the
/// subset's port-level settings).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub host: String,
    /// Empty: the whole service.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// 0: every port without an entry of its own.
    #[serde(default)]
    pub port: u16,
    /// Labels an endpoint must carry to belong to the subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub lb: LoadBalancer,
    #[serde(default, skip_serializing_if = "ConnectionPool::is_empty")]
    pub connection_pool: ConnectionPool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

impl Cluster {
    fn validate(&self) -> Result<(), TrafficError> {
        if let Some(outlier) = &self.outlier_detection
            && (outlier.max_ejection_percent > 100 || outlier.min_health_percent > 100)
        {
            return Err(TrafficError::Percentage(format!(
                "cluster {}/{}:{} outlierDetection",
                self.host, self.subset, self.port
            )));
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Istio's default since 1.14 (and what `LEAST_CONN` means).
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// Connect to the address the application dialled.
    Passthrough,
    ConsistentHash(ConsistentHash),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    pub key: HashKey,
    /// Virtual nodes on the ring (Istio's `minimumRingSize`, Envoy's default 1024).
    pub ring_size: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// Lower-cased header name.
    Header(String),
    #[serde(rename_all = "camelCase")]
    Cookie {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// When set and the cookie is absent, the proxy generates it (Envoy's behaviour).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    SourceIp,
    QueryParam(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    /// `h2UpgradePolicy: UPGRADE`: speak HTTP/2 upstream to an HTTP/1.1 port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2_upgrade: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_client_protocol: bool,
}

impl ConnectionPool {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

/// Istio's `OutlierDetection` with its defaults filled in by the compile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 0 disables this trigger. Istio's default 5.
    pub consecutive_5xx_errors: u32,
    /// 502/503/504 and connect failures; 0 (Istio's default) disables it.
    pub consecutive_gateway_errors: u32,
    /// Sweep interval: ejections end only on a tick. Default 10 s.
    pub interval_ms: u64,
    /// Default 30 s; an endpoint ejected n times stays out n × this (capped at 300 s or this,
    /// whichever is larger, as Envoy's `max_ejection_time`).
    pub base_ejection_time_ms: u64,
    /// Default 10.
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection stops (default 0: never).
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// Upstream TLS for a cluster whose endpoints are not Trellis sidecars (`ISTIO_MUTUAL` is the
/// sidecars' own mutual TLS and needs no entry).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: TlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// File paths inside the proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// A Secret name, resolved by the gateway flavour of the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry facts
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalService {
    pub host: String,
    pub location: Location,
    pub resolution: Resolution,
    /// For `DNS` resolution: names to resolve (the endpoints' addresses, or the host itself when
    /// the entry lists no endpoint), each with its own port overrides and labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_endpoints: Vec<DnsEndpoint>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Connect to the address the application dialled.
    None,
    /// Endpoints are IP addresses (compiled into the service's endpoints).
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsEndpoint {
    pub address: String,
    /// Port name → target port, overriding the service port's target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(route: serde_json::Value) -> TrafficConfig {
        serde_json::from_value(
            json!({"routes": [{"host": "a.ns.svc.cluster.local", "port": 80, "http": [route]}]}),
        )
        .unwrap()
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let ok_route = json!({"action": {"route": [{"host": "a", "weight": 100}]}});
        assert_eq!(table(ok_route).validate(), Ok(()));
        let cases = [
            (
                json!({"matches": [{"uri": {"regex": "(unclosed"}}], "action": {"route": [{"host": "a", "weight": 1}]}}),
                "a.ns.svc.cluster.local:80 http[0] match[0] uri: invalid regex",
            ),
            (
                json!({"matches": [{"headers": {"x": {"regex": "[z-a]"}}}], "action": {"route": [{"host": "a", "weight": 1}]}}),
                "match[0] headers.x: invalid regex",
            ),
            (
                json!({"matches": [{"withoutHeaders": {"x": {"regex": "*"}}}], "action": {"route": [{"host": "a", "weight": 1}]}}),
                "withoutHeaders.x: invalid regex",
            ),
            (
                json!({"matches": [{"queryParams": {"q": {"regex": "a{99999}"}}}], "action": {"route": [{"host": "a", "weight": 1}]}}),
                "queryParams.q: invalid regex",
            ),
            (
                json!({"action": {"route": [{"host": "a", "weight": 1}]}, "rewrite": {"uriRegex": {"match": "(", "rewrite": "/"}}}),
                "rewrite.uriRegexRewrite: invalid regex",
            ),
            (
                json!({"action": {"route": [{"host": "a", "weight": 1}]}, "cors": {"allowOrigins": [{"regex": "("}]}}),
                "corsPolicy.allowOrigins: invalid regex",
            ),
            (json!({"action": {"route": []}}), "must have a destination"),
            (
                json!({"action": {"route": [{"host": "a", "weight": 0}]}}),
                "weights add up to 0",
            ),
            (
                json!({"action": {"redirect": {"code": 999}}}),
                "status code",
            ),
            (
                json!({"action": {"route": [{"host": "a", "weight": 1}]}, "fault": {"abort": {"status": {"http": 42}}}}),
                "fault.abort.httpStatus",
            ),
            (
                json!({"action": {"route": [{"host": "a", "weight": 1}]}, "fault": {"delay": {"fixedDelayMs": 5, "percentage": 1000001}}}),
                "fault.delay: a percentage",
            ),
        ];
        for (route, expected) in cases {
            let error = table(route.clone()).validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{route}: {error}");
        }
    }

    #[test]
    fn a_snapshot_with_one_bad_regex_is_rejected_whole() {
        let snapshot = json!({"version": "1", "traffic": {"routes": [
            {"host": "a", "port": 80, "http": [
                {"matches": [{"uri": {"prefix": "/"}}], "action": {"route": [{"host": "a", "weight": 1}]}},
                {"matches": [{"uri": {"regex": "/(x"}}], "action": {"route": [{"host": "a", "weight": 1}]}}
            ]}
        ]}});
        let error = crate::proxy::ProxyConfig::from_json(snapshot.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("a:80 http[1] match[0] uri: invalid regex \"/(x\""),
            "{error}"
        );
    }

    #[test]
    fn lookups_need_sorted_tables() {
        let mut config: TrafficConfig = serde_json::from_value(json!({
            "routes": [
                {"host": "b", "port": 80},
                {"host": "a", "port": 81},
                {"host": "a", "port": 80}
            ],
            "clusters": [
                {"host": "b", "port": 0},
                {"host": "a", "subset": "v1", "port": 80},
                {"host": "a", "port": 0}
            ]
        }))
        .unwrap();
        assert!(matches!(config.validate(), Err(TrafficError::Unsorted(_))));
        config.normalize();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.route_table("a", 81).map(|t| t.port), Some(81));
        assert!(config.route_table("a", 82).is_none());
        assert_eq!(
            config.cluster("a", "v1", 80).map(|c| c.subset.as_str()),
            Some("v1")
        );
        assert_eq!(
            config.cluster("a", "", 9090).map(|c| c.port),
            Some(0),
            "host-wide entry"
        );
        assert!(config.cluster("a", "v2", 80).is_none());
    }

    #[test]
    fn retry_on_parses_conditions_and_codes() {
        let cases: [(&str, Result<RetryOn, &str>); 5] = [
            (
                "5xx,reset",
                Ok(RetryOn {
                    conditions: vec![RetryCondition::FiveXx, RetryCondition::Reset],
                    status_codes: vec![],
                }),
            ),
            (
                "gateway-error, 503 ,429,503",
                Ok(RetryOn {
                    conditions: vec![
                        RetryCondition::GatewayError,
                        RetryCondition::RetriableStatusCodes,
                    ],
                    status_codes: vec![503, 429],
                }),
            ),
            (
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                Ok(RetryOn {
                    conditions: RetryOn::istio_default().conditions,
                    status_codes: vec![],
                }),
            ),
            ("reset,bogus", Err("bogus")),
            ("700", Err("status code")),
        ];
        for (value, expected) in cases {
            match (RetryOn::parse(value), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{value}"),
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{value}: {e}"),
                (got, want) => panic!("{value}: got {got:?}, want {want:?}"),
            }
        }
        let default = RetryPolicy::default();
        assert_eq!(default.attempts, 2);
        assert!(default.retry_on.has(RetryCondition::RetriableStatusCodes));
        assert_eq!(default.retry_on.status_codes, [503]);
    }

    #[test]
    fn string_matches_and_percentages() {
        let cases = [
            (StringMatch::Exact("/a".into()), "/a", false, true),
            (StringMatch::Exact("/a".into()), "/A", false, false),
            (StringMatch::Exact("/a".into()), "/A", true, true),
            (StringMatch::Prefix("/api".into()), "/api/v1", false, true),
            (StringMatch::Prefix("/api".into()), "/API/v1", true, true),
            (StringMatch::Prefix("/api".into()), "/ap", true, false),
            (
                StringMatch::Regex(Pattern::new("/v[0-9]+")),
                "/v12",
                false,
                true,
            ),
            (
                StringMatch::Regex(Pattern::new("/v[0-9]+")),
                "/v12/x",
                false,
                false,
            ),
            (StringMatch::Regex(Pattern::new("a|b")), "ab", false, false),
            (StringMatch::Present, "", false, true),
        ];
        for (matcher, value, ignore_case, expected) in cases {
            assert_eq!(
                matcher.matches(value, ignore_case),
                expected,
                "{matcher:?} {value}"
            );
        }
        assert_eq!(Percent::from_percent(0.1), Percent(1_000));
        assert_eq!(Percent::from_percent(150.0), Percent::ALL);
        assert_eq!(Percent::from_percent(-1.0), Percent(0));
        assert!(Percent(10).admits(9) && !Percent(10).admits(10));
        assert!(Percent(10).admits(u64::from(MILLION) + 3));
    }

    #[test]
    fn round_trips_compactly() {
        let config = table(json!({"action": {"route": [{"host": "a", "weight": 100}]}}));
        let text = serde_json::to_string(&config).unwrap();
        assert!(
            !text.contains("clusters") && !text.contains("matches"),
            "{text}"
        );
        let back: TrafficConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, config);
    }
}
