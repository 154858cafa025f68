//! Compiles Istio's traffic resources (VirtualService, DestinationRule, ServiceEntry) into the
//! traffic model a proxy receives, as seen from one namespace. Pure: plain objects in, a
//! [`NamespaceTraffic`] out, table-tested without a cluster.
//!
//! Istio's semantics, and where Istio leaves a choice, ours:
//! - Hosts, `exportTo` and durations read as `trellis_api::istio` defines them, the same module
//!   the admission webhook checks with: short hosts resolve in the resource's namespace, hosts
//!   with a dot are taken as written and match any hostname of a service (so `reviews.default`
//!   matches too), wildcards match by suffix; durations become whole milliseconds, rounded up.
//! - `gateways` absent means `mesh`; only routes that apply to `mesh` reach sidecars. A match
//!   block with its own `gateways` without `mesh` is dropped, and a route left without blocks too.
//! - Several VirtualServices for one host (Istio: "undefined" for sidecars): merged in creation
//!   order (oldest first; ties by namespace, then name): their `http`, `tcp` and `tls` routes are
//!   concatenated, so the oldest one's routes are tried first.
//! - DestinationRule lookup for a service: the client's namespace, then the service's namespace,
//!   then the root namespace (each only if exported to the client); inside one namespace an exact
//!   host beats a wildcard and the oldest rule wins. Rules with a `workloadSelector` are skipped
//!   (they target single workloads; the snapshot is per namespace).
//! - Traffic policy merge, as Istio's `MergeSubsetTrafficPolicy`: top level, replaced whole by its
//!   `portLevelSettings` entry for the port; the subset's policy (likewise port-resolved) then
//!   overrides field by field (loadBalancer, connectionPool, outlierDetection, tls).
//! - ServiceEntry: each host becomes a service (addresses as VIPs, ports with their protocols,
//!   `STATIC` endpoints and pods chosen by `workloadSelector` as endpoints; `DNS` names kept for
//!   the proxy to resolve); a host that a Kubernetes Service already has is left to the Service.
//! - Fault `percentage` absent: no request is delayed or aborted (Istio's documented default);
//!   mirror percentage absent: 100 %.
//!
//! Anything that cannot be compiled (a bad regex, an unknown `retryOn`, an unparsable duration
//! in an object admitted before the webhook was in place) is skipped with a warning naming the
//! resource, never failing the snapshot: the admission webhook is where such resources are
//! refused, and whatever it admits compiles (property-tested in `tests.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tracing::warn;
use trellis_api::istio::export_to::exported_to;
use trellis_api::istio::{duration, host};
use trellis_api::networking::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection as DrOutlier,
    SimpleLb, TlsMode as DrTlsMode, TrafficPolicy,
};
use trellis_api::networking::service_entry::{Location as SeLocation, Resolution as SeResolution};
use trellis_api::networking::virtual_service::{
    self as vs, HttpMatchRequest, L4MatchAttributes, RedirectPortSelection, TlsMatchAttributes,
};
use trellis_api::networking::{
    DestinationRule, Percent as IstioPercent, ServiceEntry, StringMatch as IstioMatch,
    VirtualService,
};
use trellis_config::SpiffeId;
use trellis_config::proxy::{Endpoint, Protocol, ProxyConfig, Service, ServicePort};
use trellis_config::traffic::{
    AbortStatus, ClientTls, Cluster, ConnectionPool, ConsistentHash, CorsPolicy, DirectBody,
    DirectResponse, DnsEndpoint, ExternalService, Fault, FaultAbort, FaultDelay, HashKey,
    HeaderEdits, Headers, HttpAction, HttpMatch, HttpRoute, L4Match, LoadBalancer, Location,
    Mirror, OutlierDetection, Pattern, Percent, Redirect, RedirectPort, RegexRewrite, Resolution,
    RetryOn, RetryPolicy, Rewrite, RouteTable, StringMatch, TcpKeepalive, TcpRoute, TlsMatch,
    TlsMode, TlsRoute, TrafficConfig, WeightedDestination,
};

use crate::compile::is_meshed;

/// The gateway name that means "every sidecar".
pub const MESH_GATEWAY: &str = "mesh";

/// What the traffic compile reads.
#[derive(Debug, Clone, Copy)]
pub struct TrafficInputs<'a> {
    pub virtual_services: &'a [VirtualService],
    pub destination_rules: &'a [DestinationRule],
    pub service_entries: &'a [ServiceEntry],
    /// The Kubernetes Services as compiled (hostnames, ports, endpoints).
    pub services: &'a [Service],
    /// Pods, for ServiceEntry `workloadSelector`.
    pub pods: &'a [Pod],
    /// Istio's root namespace (the operator's).
    pub root_namespace: &'a str,
    pub trust_domain: &'a str,
}

/// The traffic configuration of the proxies of one namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceTraffic {
    pub traffic: TrafficConfig,
    /// Services from the ServiceEntries visible in the namespace (added to the snapshot's).
    pub services: Vec<Service>,
    /// What was skipped, and why, naming the resource.
    pub warnings: Vec<String>,
}

/// Compiles the traffic model as seen by proxies in `namespace`.
pub fn compile_for_namespace(inputs: &TrafficInputs<'_>, namespace: &str) -> NamespaceTraffic {
    let mut warnings = Vec::new();
    let (entry_services, external_services) = service_entries(inputs, namespace, &mut warnings);
    let all: Vec<&Service> = inputs.services.iter().chain(&entry_services).collect();
    let routes = route_tables(inputs, namespace, &all, &mut warnings);
    let clusters = clusters(inputs, namespace, &all, &mut warnings);
    let mut traffic = TrafficConfig {
        routes,
        clusters,
        external_services,
    };
    traffic.normalize();
    NamespaceTraffic {
        traffic,
        services: entry_services,
        warnings,
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery: one index per published snapshot, compiled per namespace on first use
// ---------------------------------------------------------------------------------------------

/// The traffic resources discovery reflects (all namespaces).
#[derive(Debug, Clone, Default)]
pub struct TrafficResources {
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub service_entries: Vec<ServiceEntry>,
}

/// A namespace's compiled traffic and the version it adds to a snapshot.
#[derive(Debug)]
pub struct CompiledNamespace {
    pub traffic: NamespaceTraffic,
    /// Content hash of what [`with_traffic`] adds.
    pub version: String,
}

/// Everything one burst's traffic compile needs, and the namespaces compiled so far: streams of
/// proxies in the same namespace share one compile per burst.
pub struct TrafficIndex {
    resources: TrafficResources,
    services: Vec<Service>,
    pods: Vec<Pod>,
    root_namespace: String,
    trust_domain: String,
    compiled: Mutex<HashMap<String, Arc<CompiledNamespace>>>,
    /// Warnings already logged (shared across bursts, so each is logged once).
    reported: Arc<Mutex<BTreeSet<String>>>,
}

impl std::fmt::Debug for TrafficIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficIndex")
            .field("virtual_services", &self.resources.virtual_services.len())
            .field("destination_rules", &self.resources.destination_rules.len())
            .field("service_entries", &self.resources.service_entries.len())
            .finish_non_exhaustive()
    }
}

impl TrafficIndex {
    pub fn new(
        resources: TrafficResources,
        services: Vec<Service>,
        pods: Vec<Pod>,
        root_namespace: &str,
        trust_domain: &str,
        reported: Arc<Mutex<BTreeSet<String>>>,
    ) -> Self {
        Self {
            resources,
            services,
            pods,
            root_namespace: root_namespace.to_owned(),
            trust_domain: trust_domain.to_owned(),
            compiled: Mutex::new(HashMap::new()),
            reported,
        }
    }

    /// The traffic of proxies in `namespace`, compiled on first use in this burst.
    pub fn for_namespace(&self, namespace: &str) -> Arc<CompiledNamespace> {
        if let Some(done) = lock(&self.compiled).get(namespace) {
            return done.clone();
        }
        let inputs = TrafficInputs {
            virtual_services: &self.resources.virtual_services,
            destination_rules: &self.resources.destination_rules,
            service_entries: &self.resources.service_entries,
            services: &self.services,
            pods: &self.pods,
            root_namespace: &self.root_namespace,
            trust_domain: &self.trust_domain,
        };
        let traffic = compile_for_namespace(&inputs, namespace);
        {
            let mut reported = lock(&self.reported);
            for warning in &traffic.warnings {
                if reported.insert(warning.clone()) {
                    warn!("traffic: {warning}");
                }
            }
        }
        let version = content_hash(&traffic);
        let compiled = Arc::new(CompiledNamespace { traffic, version });
        lock(&self.compiled)
            .entry(namespace.to_owned())
            .or_insert(compiled)
            .clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn content_hash(traffic: &NamespaceTraffic) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&traffic.traffic)
        .expect("the traffic model always serializes")
        .hash(&mut hasher);
    serde_json::to_string(&traffic.services)
        .expect("the config model always serializes")
        .hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The version of a workload snapshot once its namespace's traffic is added.
pub fn versioned(workload_version: &str, traffic: &CompiledNamespace) -> String {
    if traffic.traffic.traffic.is_empty() && traffic.traffic.services.is_empty() {
        // Nothing added: the snapshot is the one without traffic management.
        return workload_version.to_owned();
    }
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    workload_version.hash(&mut hasher);
    traffic.version.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Adds a namespace's traffic (routes, clusters, ServiceEntry services) to a workload snapshot.
pub fn with_traffic(mut config: ProxyConfig, traffic: &CompiledNamespace) -> ProxyConfig {
    config.version = versioned(&config.version, traffic);
    if !traffic.traffic.services.is_empty() {
        config
            .services
            .extend(traffic.traffic.services.iter().cloned());
        config
            .services
            .sort_by(|a, b| a.hostnames.cmp(&b.hostnames));
    }
    config.traffic = traffic.traffic.traffic.clone();
    config
}

// ---------------------------------------------------------------------------------------------
// Names, visibility, ordering
// ---------------------------------------------------------------------------------------------

/// Creation order: oldest first, then namespace, then name (a stable order for equal times).
fn creation_key<K: kube::Resource>(resource: &K) -> (Option<String>, String, String) {
    let meta = resource.meta();
    (
        meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn describe<K: kube::Resource>(kind: &str, resource: &K) -> String {
    let meta = resource.meta();
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

fn fqdn(service: &Service) -> &str {
    service.hostnames.first().map_or("", String::as_str)
}

fn duration_field(
    value: Option<&String>,
    field: &str,
    owner: &str,
    warnings: &mut Vec<String>,
) -> Option<u64> {
    let text = value?;
    match duration::parse(text) {
        Ok(parsed) => Some(duration::millis(parsed)),
        Err(e) => {
            warnings.push(format!("{owner}: {field} ignored: {e}"));
            None
        }
    }
}

fn percent(value: &IstioPercent) -> Percent {
    Percent::from_percent(value.value)
}

fn port_u16(port: u32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry
// ---------------------------------------------------------------------------------------------

fn service_entries(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    warnings: &mut Vec<String>,
) -> (Vec<Service>, Vec<ExternalService>) {
    let known: BTreeSet<&str> = inputs
        .services
        .iter()
        .flat_map(|s| s.hostnames.iter().map(String::as_str))
        .collect();
    let mut entries: Vec<&ServiceEntry> = inputs
        .service_entries
        .iter()
        .filter(|se| {
            exported_to(
                &se.spec.export_to,
                se.namespace().as_deref().unwrap_or_default(),
                namespace,
            )
        })
        .collect();
    entries.sort_by_key(|se| creation_key(*se));
    let mut services: Vec<Service> = Vec::new();
    let mut external = Vec::new();
    for entry in entries {
        let owner = describe("ServiceEntry", entry);
        for host in &entry.spec.hosts {
            if known.contains(host.as_str()) || services.iter().any(|s| fqdn(s) == host) {
                warnings.push(format!(
                    "{owner}: host {host} is already defined (a Service or an older ServiceEntry wins)"
                ));
                continue;
            }
            if let Some((service, facts)) =
                service_entry_host(inputs, entry, host, &owner, warnings)
            {
                services.push(service);
                external.push(facts);
            }
        }
    }
    (services, external)
}

fn service_entry_host(
    inputs: &TrafficInputs<'_>,
    entry: &ServiceEntry,
    host: &str,
    owner: &str,
    warnings: &mut Vec<String>,
) -> Option<(Service, ExternalService)> {
    let spec = &entry.spec;
    let namespace = entry.namespace().unwrap_or_default();
    let mut ignored: Vec<&str> = Vec::new();
    if !spec.subject_alt_names.is_empty() {
        ignored.push("subjectAltNames");
    }
    if spec
        .endpoints
        .iter()
        .any(|e| e.network.is_some() || e.locality.is_some())
    {
        ignored.push("endpoints[].network/locality");
    }
    if spec.endpoints.iter().any(|e| e.weight.is_some()) {
        ignored.push("endpoints[].weight");
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "{owner}: not supported, ignored: {}",
            ignored.join(", ")
        ));
    }
    let location = match spec.location {
        Some(SeLocation::MeshInternal) => Location::MeshInternal,
        Some(SeLocation::MeshExternal) | None => Location::MeshExternal,
    };
    let resolution = match spec.resolution {
        Some(SeResolution::Static) => Resolution::Static,
        Some(SeResolution::Dns) => Resolution::Dns,
        Some(SeResolution::DnsRoundRobin) => Resolution::DnsRoundRobin,
        Some(SeResolution::None) | None => Resolution::None,
    };
    let mut vips = Vec::new();
    for address in &spec.addresses {
        let single = address
            .strip_suffix("/32")
            .or_else(|| address.strip_suffix("/128"))
            .unwrap_or(address);
        match single.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip),
            Err(_) => warnings.push(format!(
                "{owner}: address {address} ignored (only single addresses can be VIPs)"
            )),
        }
    }
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .filter_map(|port| {
            let number = port_u16(port.number)?;
            // The endpoints' own port for this name, when every STATIC endpoint agrees on one.
            let endpoint_ports: BTreeSet<u32> = spec
                .endpoints
                .iter()
                .filter_map(|e| e.ports.get(&port.name).copied())
                .collect();
            let target = match (endpoint_ports.len(), port.target_port) {
                (1, _) => endpoint_ports.first().copied().and_then(port_u16),
                (_, Some(target)) => port_u16(target),
                _ => Some(number),
            };
            if endpoint_ports.len() > 1 {
                warnings.push(format!(
                    "{owner}: endpoints map port {} to different ports; using the port's targetPort",
                    port.name
                ));
            }
            let protocol = port.protocol.as_deref().map(str::to_ascii_lowercase);
            Some(ServicePort {
                name: port.name.clone(),
                port: number,
                target_port: target.unwrap_or(number),
                protocol: Protocol::from_port(&port.name, protocol.as_deref()),
            })
        })
        .collect();
    if ports.is_empty() {
        warnings.push(format!("{owner}: host {host} has no valid port; skipped"));
        return None;
    }
    let mut endpoints = Vec::new();
    let mut dns_endpoints = Vec::new();
    let identity = |service_account: &str| {
        SpiffeId::new(inputs.trust_domain, &namespace, service_account).to_string()
    };
    for workload in &spec.endpoints {
        let Some(address) = workload.address.as_deref() else {
            continue;
        };
        match resolution {
            Resolution::Static => match address.parse::<IpAddr>() {
                Ok(ip) => {
                    let meshed =
                        location == Location::MeshInternal && workload.service_account.is_some();
                    endpoints.push(Endpoint {
                        address: ip,
                        ready: true,
                        meshed,
                        identity: workload
                            .service_account
                            .as_deref()
                            .filter(|_| meshed)
                            .map(identity),
                        labels: (&workload.labels).into(),
                        plaintext_ports: BTreeSet::new(),
                    });
                }
                Err(_) => warnings.push(format!(
                    "{owner}: STATIC endpoint {address} is not an IP address; skipped"
                )),
            },
            Resolution::Dns | Resolution::DnsRoundRobin => dns_endpoints.push(DnsEndpoint {
                address: address.to_owned(),
                ports: workload
                    .ports
                    .iter()
                    .filter_map(|(name, port)| Some((name.clone(), port_u16(*port)?)))
                    .collect(),
                labels: workload.labels.clone(),
            }),
            Resolution::None => {}
        }
    }
    if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) && dns_endpoints.is_empty()
    {
        dns_endpoints.push(DnsEndpoint {
            address: host.to_owned(),
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
        });
    }
    if let Some(selector) = spec
        .workload_selector
        .as_ref()
        .filter(|s| !s.labels.is_empty())
    {
        endpoints.extend(selected_pods(inputs, &namespace, &selector.labels));
    }
    endpoints.sort_by_key(|e| e.address);
    endpoints.dedup_by(|a, b| a.address == b.address);
    Some((
        Service {
            hostnames: vec![host.to_owned()],
            namespace: namespace.clone(),
            vips,
            ports,
            endpoints,
        },
        ExternalService {
            host: host.to_owned(),
            location,
            resolution,
            dns_endpoints,
        },
    ))
}

/// Pods of `namespace` carrying every selector label, as endpoints.
fn selected_pods(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<Endpoint> {
    inputs
        .pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace))
        .filter(|pod| {
            let labels = pod.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter_map(|pod| {
            let address = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            let meshed = is_meshed(pod);
            let service_account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_none_or(|c| c.status == "True");
            Some(Endpoint {
                address,
                ready,
                meshed,
                identity: meshed.then(|| {
                    SpiffeId::new(inputs.trust_domain, namespace, service_account).to_string()
                }),
                labels: pod
                    .metadata
                    .labels
                    .as_ref()
                    .map(Into::into)
                    .unwrap_or_default(),
                plaintext_ports: BTreeSet::new(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// VirtualService → route tables
// ---------------------------------------------------------------------------------------------

/// A VirtualService's routes, compiled once, before they are spread over host:ports.
struct CompiledRoutes {
    http: Vec<HttpRoute>,
    tcp: Vec<TcpRoute>,
    tls: Vec<TlsRoute>,
}

fn route_tables(
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

// ---------------------------------------------------------------------------------------------
// DestinationRule → clusters
// ---------------------------------------------------------------------------------------------

fn clusters(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    services: &[&Service],
    warnings: &mut Vec<String>,
) -> Vec<Cluster> {
    let mut usable: Vec<&DestinationRule> = Vec::new();
    for rule in inputs.destination_rules {
        if rule.spec.workload_selector.is_some() {
            warnings.push(format!(
                "{}: workloadSelector is not supported; rule skipped",
                describe("DestinationRule", rule)
            ));
            continue;
        }
        let ignored = destination_rule_ignored_fields(rule);
        if !ignored.is_empty() {
            warnings.push(format!(
                "{}: not supported, ignored: {}",
                describe("DestinationRule", rule),
                ignored.join(", ")
            ));
        }
        usable.push(rule);
    }
    usable.sort_by_key(|r| creation_key(*r));
    let mut out = Vec::new();
    for service in services {
        let Some(rule) = destination_rule_for(&usable, namespace, service, inputs.root_namespace)
        else {
            continue;
        };
        out.extend(service_clusters(service, rule, warnings));
    }
    out
}

/// Fields a DestinationRule may set that the proxy does not implement (locality load
/// balancing, slow start, tunnels, PROXY protocol, retry budgets, local-origin outlier counting,
/// CRLs), named for the warning.
fn destination_rule_ignored_fields(rule: &DestinationRule) -> Vec<String> {
    let mut ignored = Vec::new();
    let mut check = |prefix: &str, policy: &TrafficPolicy| {
        let lb = policy.load_balancer.as_ref();
        let found = [
            (
                "loadBalancer.localityLbSetting",
                lb.is_some_and(|l| l.locality_lb_setting.is_some()),
            ),
            (
                "loadBalancer.warmupDurationSecs",
                lb.is_some_and(|l| l.warmup_duration_secs.is_some()),
            ),
            (
                "loadBalancer.warmup",
                lb.is_some_and(|l| l.warmup.is_some()),
            ),
            ("tunnel", policy.tunnel.is_some()),
            ("proxyProtocol", policy.proxy_protocol.is_some()),
            ("retryBudget", policy.retry_budget.is_some()),
            (
                "outlierDetection.consecutiveLocalOriginFailures",
                policy
                    .outlier_detection
                    .as_ref()
                    .is_some_and(|o| o.consecutive_local_origin_failures.is_some()),
            ),
            (
                "tls.caCrl",
                policy.tls.as_ref().is_some_and(|t| t.ca_crl.is_some()),
            ),
        ];
        for (field, set) in found {
            if set {
                ignored.push(format!("{prefix}{field}"));
            }
        }
    };
    if let Some(policy) = &rule.spec.traffic_policy {
        check("trafficPolicy.", policy);
    }
    for subset in &rule.spec.subsets {
        if let Some(policy) = &subset.traffic_policy {
            check(&format!("subsets[{}].trafficPolicy.", subset.name), policy);
        }
    }
    ignored
}

/// Istio's lookup order: the client's namespace, the service's, the root namespace.
fn destination_rule_for<'r>(
    rules: &[&'r DestinationRule],
    client_namespace: &str,
    service: &Service,
    root_namespace: &str,
) -> Option<&'r DestinationRule> {
    let in_namespace = |namespace: &str| {
        // `rules` is in creation order and only a more specific host replaces the pick, so the
        // oldest wins ties.
        let mut best: Option<((bool, usize), &'r DestinationRule)> = None;
        for rule in rules
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace))
            .filter(|r| exported_to(&r.spec.export_to, namespace, client_namespace))
        {
            let pattern = host::qualify(&rule.spec.host, namespace);
            if !service.hostnames.iter().any(|h| host::matches(&pattern, h)) {
                continue;
            }
            let score = host::specificity(&pattern);
            if best.is_none_or(|(current, _)| score > current) {
                best = Some((score, *rule));
            }
        }
        best.map(|(_, rule)| rule)
    };
    in_namespace(client_namespace)
        .or_else(|| in_namespace(&service.namespace))
        .or_else(|| in_namespace(root_namespace))
}

/// The four mergeable parts of a traffic policy.
#[derive(Clone, Default)]
struct Effective {
    load_balancer: Option<LoadBalancerSettings>,
    connection_pool: Option<ConnectionPoolSettings>,
    outlier_detection: Option<DrOutlier>,
    tls: Option<ClientTlsSettings>,
}

/// A policy's fields for `port`: its port-level entry for the port replaces all four (Istio:
/// port-level settings do not inherit), else the top level.
fn port_resolved(policy: Option<&TrafficPolicy>, port: Option<u16>) -> Effective {
    let Some(policy) = policy else {
        return Effective::default();
    };
    let port_level = port.and_then(|port| {
        policy
            .port_level_settings
            .iter()
            .find(|p| p.port.and_then(|s| s.number) == Some(u32::from(port)))
    });
    match port_level {
        Some(p) => Effective {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            tls: p.tls.clone(),
        },
        None => Effective {
            load_balancer: policy.load_balancer.clone(),
            connection_pool: policy.connection_pool.clone(),
            outlier_detection: policy.outlier_detection.clone(),
            tls: policy.tls.clone(),
        },
    }
}

/// Istio's `MergeSubsetTrafficPolicy`: the subset's (port-resolved) fields override the
/// destination's (port-resolved) ones, field by field.
fn merged(
    top: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: Option<u16>,
) -> Effective {
    let base = port_resolved(top, port);
    let over = port_resolved(subset, port);
    Effective {
        load_balancer: over.load_balancer.or(base.load_balancer),
        connection_pool: over.connection_pool.or(base.connection_pool),
        outlier_detection: over.outlier_detection.or(base.outlier_detection),
        tls: over.tls.or(base.tls),
    }
}

fn policy_ports(policy: Option<&TrafficPolicy>) -> BTreeSet<u16> {
    policy
        .map(|p| {
            p.port_level_settings
                .iter()
                .filter_map(|s| s.port.and_then(|p| p.number).and_then(port_u16))
                .collect()
        })
        .unwrap_or_default()
}

fn service_clusters(
    service: &Service,
    rule: &DestinationRule,
    warnings: &mut Vec<String>,
) -> Vec<Cluster> {
    let owner = describe("DestinationRule", rule);
    let top = rule.spec.traffic_policy.as_ref();
    let host = fqdn(service).to_owned();
    let mut out = Vec::new();
    let mut emit =
        |subset: &str, selector: &BTreeMap<String, String>, policy: Option<&TrafficPolicy>| {
            // Port 0: the host-wide entry; then one per port that has port-level settings.
            let ports = std::iter::once(None).chain(
                policy_ports(top)
                    .union(&policy_ports(policy))
                    .copied()
                    .map(Some)
                    .collect::<Vec<_>>(),
            );
            for port in ports {
                let effective = merged(top, policy, port);
                out.push(cluster(
                    &host,
                    subset,
                    port.unwrap_or(0),
                    selector,
                    &effective,
                    &owner,
                    warnings,
                ));
            }
        };
    emit("", &BTreeMap::new(), None);
    for subset in &rule.spec.subsets {
        emit(&subset.name, &subset.labels, subset.traffic_policy.as_ref());
    }
    out
}

fn cluster(
    host: &str,
    subset: &str,
    port: u16,
    selector: &BTreeMap<String, String>,
    effective: &Effective,
    owner: &str,
    warnings: &mut Vec<String>,
) -> Cluster {
    Cluster {
        host: host.to_owned(),
        subset: subset.to_owned(),
        port,
        selector: selector.clone(),
        lb: effective
            .load_balancer
            .as_ref()
            .map_or(LoadBalancer::default(), |lb| {
                load_balancer(lb, owner, warnings)
            }),
        connection_pool: effective
            .connection_pool
            .as_ref()
            .map(|p| connection_pool(p, owner, warnings))
            .unwrap_or_default(),
        outlier_detection: effective
            .outlier_detection
            .as_ref()
            .map(|o| outlier(o, owner, warnings)),
        tls: effective.tls.as_ref().map(client_tls),
    }
}

fn load_balancer(
    lb: &LoadBalancerSettings,
    owner: &str,
    warnings: &mut Vec<String>,
) -> LoadBalancer {
    if let Some(hash) = &lb.consistent_hash {
        let key = if let Some(header) = &hash.http_header_name {
            HashKey::Header(header.to_ascii_lowercase())
        } else if let Some(cookie) = &hash.http_cookie {
            HashKey::Cookie {
                name: cookie.name.clone(),
                path: cookie.path.clone(),
                ttl_ms: duration_field(cookie.ttl.as_ref(), "httpCookie.ttl", owner, warnings),
            }
        } else if hash.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else if let Some(name) = &hash.http_query_parameter_name {
            HashKey::QueryParam(name.clone())
        } else {
            warnings.push(format!(
                "{owner}: consistentHash without a hash key; LEAST_REQUEST used"
            ));
            return LoadBalancer::LeastRequest;
        };
        if hash.maglev.is_some() {
            warnings.push(format!("{owner}: maglev is served by the ring hash"));
        }
        let ring_size = hash
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(hash.minimum_ring_size)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        return LoadBalancer::ConsistentHash(ConsistentHash { key, ring_size });
    }
    match lb.simple {
        Some(SimpleLb::RoundRobin) => LoadBalancer::RoundRobin,
        Some(SimpleLb::Random) => LoadBalancer::Random,
        Some(SimpleLb::Passthrough) => LoadBalancer::Passthrough,
        Some(SimpleLb::LeastConn | SimpleLb::LeastRequest | SimpleLb::Unspecified) | None => {
            LoadBalancer::LeastRequest
        }
    }
}

fn positive(value: Option<i32>) -> Option<u32> {
    value.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

fn connection_pool(
    pool: &ConnectionPoolSettings,
    owner: &str,
    warnings: &mut Vec<String>,
) -> ConnectionPool {
    let tcp = pool.tcp.as_ref();
    let http = pool.http.as_ref();
    let mut duration =
        |value: Option<&String>, field: &str| duration_field(value, field, owner, warnings);
    ConnectionPool {
        max_connections: positive(tcp.and_then(|t| t.max_connections)),
        connect_timeout_ms: duration(
            tcp.and_then(|t| t.connect_timeout.as_ref()),
            "tcp.connectTimeout",
        ),
        tcp_keepalive: tcp
            .and_then(|t| t.tcp_keepalive.as_ref())
            .map(|k| TcpKeepalive {
                probes: k.probes,
                time_ms: duration(k.time.as_ref(), "tcpKeepalive.time"),
                interval_ms: duration(k.interval.as_ref(), "tcpKeepalive.interval"),
            }),
        max_connection_duration_ms: duration(
            tcp.and_then(|t| t.max_connection_duration.as_ref()),
            "tcp.maxConnectionDuration",
        ),
        http1_max_pending_requests: positive(http.and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: positive(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection)),
        max_retries: positive(http.and_then(|h| h.max_retries)),
        // HTTP's idle timeout when set, else TCP's (Istio applies both to the upstream).
        idle_timeout_ms: duration(
            http.and_then(|h| h.idle_timeout.as_ref())
                .or_else(|| tcp.and_then(|t| t.idle_timeout.as_ref())),
            "idleTimeout",
        ),
        max_concurrent_streams: positive(http.and_then(|h| h.max_concurrent_streams)),
        h2_upgrade: http.and_then(|h| h.h2_upgrade_policy)
            == Some(trellis_api::networking::destination_rule::H2UpgradePolicy::Upgrade),
        use_client_protocol: http.and_then(|h| h.use_client_protocol).unwrap_or(false),
    }
}

fn outlier(o: &DrOutlier, owner: &str, warnings: &mut Vec<String>) -> OutlierDetection {
    let defaults = OutlierDetection::default();
    let percent = |value: Option<i32>, default: u32| {
        value.map_or(default, |v| {
            u32::try_from(v.clamp(0, 100)).unwrap_or(default)
        })
    };
    if o.split_external_local_origin_errors == Some(true) {
        warnings.push(format!(
            "{owner}: splitExternalLocalOriginErrors is not supported; local errors count as 5xx"
        ));
    }
    OutlierDetection {
        consecutive_5xx_errors: o
            .consecutive_5xx_errors
            .or_else(|| o.consecutive_errors.and_then(|v| u32::try_from(v).ok()))
            .unwrap_or(defaults.consecutive_5xx_errors),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval_ms: duration_field(
            o.interval.as_ref(),
            "outlierDetection.interval",
            owner,
            warnings,
        )
        .filter(|ms| *ms > 0)
        .unwrap_or(defaults.interval_ms),
        base_ejection_time_ms: duration_field(
            o.base_ejection_time.as_ref(),
            "outlierDetection.baseEjectionTime",
            owner,
            warnings,
        )
        .filter(|ms| *ms > 0)
        .unwrap_or(defaults.base_ejection_time_ms),
        max_ejection_percent: percent(o.max_ejection_percent, defaults.max_ejection_percent),
        min_health_percent: percent(o.min_health_percent, defaults.min_health_percent),
    }
}

fn client_tls(tls: &ClientTlsSettings) -> ClientTls {
    ClientTls {
        mode: match tls.mode {
            Some(DrTlsMode::Simple) => TlsMode::Simple,
            Some(DrTlsMode::Mutual) => TlsMode::Mutual,
            Some(DrTlsMode::IstioMutual) => TlsMode::IstioMutual,
            Some(DrTlsMode::Disable) | None => TlsMode::Disable,
        },
        sni: tls.sni.clone(),
        subject_alt_names: tls.subject_alt_names.clone(),
        ca_certificates: tls.ca_certificates.clone(),
        client_certificate: tls.client_certificate.clone(),
        private_key: tls.private_key.clone(),
        credential_name: tls.credential_name.clone(),
        insecure_skip_verify: tls.insecure_skip_verify.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests;
