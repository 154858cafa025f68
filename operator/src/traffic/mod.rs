//! Compiles Istio's traffic resources (VirtualService, DestinationRule, ServiceEntry) into the
//! traffic model a proxy receives, as seen from one namespace. Pure: plain objects in, a
//! [`NamespaceTraffic`] out, table-tested without a cluster. One file per kind compiles it
//! (`service_entry.rs`, `virtual_service.rs`, `destination_rule.rs`); this one holds the entry
//! points, the per-snapshot index and the helpers they share.
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

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tracing::warn;
use trellis_api::istio::duration;
use trellis_api::networking::{
    DestinationRule, Percent as IstioPercent, ServiceEntry, VirtualService,
};
use trellis_config::proxy::{ProxyConfig, Service};
use trellis_config::traffic::{Percent, TrafficConfig};

mod destination_rule;
mod service_entry;
mod virtual_service;

use destination_rule::clusters;
use service_entry::service_entries;
use virtual_service::route_tables;

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
    /// Istio's root namespace (`Mesh.spec.rootNamespace`).
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
        if let Some(done) = self.compiled.lock().get(namespace) {
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
            let mut reported = self.reported.lock();
            for warning in &traffic.warnings {
                if reported.insert(warning.clone()) {
                    warn!("traffic: {warning}");
                }
            }
        }
        let version = content_hash(&traffic);
        let compiled = Arc::new(CompiledNamespace { traffic, version });
        self.compiled
            .lock()
            .entry(namespace.to_owned())
            .or_insert(compiled)
            .clone()
    }
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

#[cfg(test)]
mod tests;
