//! The stateful per-cluster upstream runtime: for every cluster (service host / subset / service
//! port) a request has gone to, its load-balancing cursor and per-endpoint in-flight counts, its
//! circuit breakers (`http2MaxRequests`, `maxRetries`; the connection limits live in the
//! cluster's own [`Pool`]) and its outlier detection ([`OutlierTracker`] fed by [`Upstreams::record`]
//! and swept on its `interval` by a task of its own).
//!
//! The pure decisions stay in `route::balance` and `route::outlier`; this module holds their
//! state between requests and keeps it across config swaps: [`Upstreams::sync`] updates the
//! clusters that persist (ejections, in-flight counts and cursors kept, new endpoints added,
//! changed limits applied) and drops the ones that are gone. Clusters are created on first use,
//! so a proxy that knows 10,000 services holds state only for those it calls.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};
use trellis_config::proxy::{Endpoint, ProxyConfig, Service};
use trellis_config::traffic::{Cluster, LoadBalancer, OutlierDetection, Resolution};

use crate::http::pool::{ConnectionGuard, Limits, Pool};
pub use crate::http::pool::{Limit, Overflow};
use crate::metrics::UpstreamMetrics;
use crate::route::Target;
use crate::route::balance::{self, Balancer, Pick, PickInput};
use crate::route::outlier::{OutlierTracker, Recorded};
use crate::route::retry::Outcome;

pub mod connect;
mod dns;

/// The load balancer of a service without a DestinationRule: round robin, as the proxy balanced
/// before traffic management (see `trellis_config::traffic`).
const DEFAULT_LB: LoadBalancer = LoadBalancer::RoundRobin;

/// Which cluster: the service's FQDN, the subset (empty for the whole service) and the service
/// port. Displayed as Envoy/Istio name clusters: `outbound|9080|v1|reviews.default.svc.cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub host: String,
    pub subset: String,
    pub port: u16,
}

impl ClusterKey {
    pub fn of(target: &Target<'_>) -> Self {
        Self {
            host: target
                .service
                .hostnames
                .first()
                .cloned()
                .unwrap_or_default(),
            subset: target.subset.to_owned(),
            port: target.port.port,
        }
    }
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outbound|{}|{}|{}", self.port, self.subset, self.host)
    }
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// No ready endpoint in the subset, or every one is ejected (Envoy's `UH`).
    #[error("cluster {0}: no healthy endpoint")]
    NoHealthyUpstream(String),
    /// The cluster's policy is `PASSTHROUGH`, or its ServiceEntry's resolution `NONE`: connect
    /// to the address the application dialled, via [`Upstreams::passthrough`].
    #[error("cluster {0}: load balancer PASSTHROUGH connects to the original destination")]
    Passthrough(String),
    /// A DNS-resolved ServiceEntry cluster none of whose names has an answer yet (`UH`).
    #[error("cluster {cluster}: {names}")]
    Unresolved {
        cluster: String,
        names: dns::UnresolvedNames,
    },
}

/// The endpoint chosen for one try, with its cluster's state.
#[derive(Clone)]
pub struct Picked<'a> {
    /// The endpoint (`None` for a passthrough address that is no endpoint of the service).
    pub endpoint: Option<&'a Endpoint>,
    /// Where to connect: the endpoint's address and the service port's target port.
    pub addr: SocketAddr,
    cluster: Arc<ClusterState>,
}

impl Picked<'_> {
    pub fn cluster(&self) -> &ClusterKey {
        &self.cluster.key
    }

    /// The cluster's connection pool: send the request through it (not the proxy-wide pool), so
    /// `maxConnections`, `http1MaxPendingRequests`, `maxRequestsPerConnection` and `idleTimeout`
    /// apply.
    pub fn pool(&self) -> &Pool {
        &self.cluster.pool
    }

    /// `tcp.connectTimeout` of the cluster, else the proxy's `--connect-timeout-seconds`.
    pub fn connect_timeout(&self) -> Duration {
        self.cluster.connect_timeout()
    }

    /// Admission of one opaque TCP connection against `tcp.maxConnections`; hold the guard for
    /// the connection's life. Err: close the downstream connection, flag `UO`.
    pub fn admit_connection(&self) -> Result<ConnectionGuard, Overflow> {
        self.cluster.pool.admit_connection()
    }
}

impl fmt::Debug for Picked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picked")
            .field("cluster", &self.cluster.label)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// One admitted request: counts towards `http2MaxRequests` and the endpoint's in-flight count
/// (LEAST_REQUEST) until dropped.
pub struct RequestGuard {
    cluster: Arc<ClusterState>,
    endpoint: Arc<EndpointLoad>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.requests.fetch_sub(1, Ordering::AcqRel);
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted retry: counts towards `maxRetries` until dropped (hold it for the retry's try).
pub struct RetryGuard {
    cluster: Arc<ClusterState>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.cluster.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every cluster's runtime state; one per proxy, in `ProxyState::upstreams`.
pub struct Upstreams {
    default_connect_timeout: Duration,
    metrics: UpstreamMetrics,
    /// The last config [`sync`](Self::sync) saw: clusters created on first use take their
    /// settings from it, so one created by a request still on the previous config cannot miss
    /// the swap.
    config: ArcSwapOption<ProxyConfig>,
    clusters: RwLock<HashMap<ClusterKey, Arc<ClusterState>>>,
    /// The ServiceEntry facts of external clusters, and the endpoints of those resolved by DNS.
    dns: dns::Resolver,
}

struct ClusterState {
    key: ClusterKey,
    label: Arc<str>,
    metrics: UpstreamMetrics,
    default_connect_timeout: Duration,
    settings: Mutex<Settings>,
    /// Requests in flight (`http2MaxRequests`) and retries in flight (`maxRetries`).
    requests: AtomicU32,
    retries: AtomicU32,
    /// Round-robin turn.
    turn: AtomicU64,
    load: RwLock<HashMap<IpAddr, Arc<EndpointLoad>>>,
    /// The consistent-hash ring of the last candidate set (built once, not per request).
    ring: Mutex<Option<CachedRing>>,
    outlier: Mutex<Option<Outlier>>,
    pool: Pool,
}

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    max_requests: u32,
    max_retries: u32,
    connect_timeout: Option<Duration>,
}

#[derive(Default)]
struct EndpointLoad {
    in_flight: AtomicU32,
}

struct CachedRing {
    lb: LoadBalancer,
    addresses: Vec<IpAddr>,
    balancer: Balancer,
}

struct Outlier {
    config: OutlierDetection,
    tracker: OutlierTracker,
    /// The subset's ready endpoints the tracker follows.
    hosts: Vec<IpAddr>,
    /// The interval sweep; aborted when this state goes (cluster removed or detection off).
    ticker: Option<AbortHandle>,
}

impl Drop for Outlier {
    fn drop(&mut self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
    }
}

impl Outlier {
    fn ejected(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| self.tracker.is_ejected(**h))
            .count()
    }
}

/// A pick among the cached DNS answers of an external service's names; the endpoint is no
/// endpoint of the service (`Picked::endpoint` is `None`). `resolution: DNS` is Envoy's
/// STRICT_DNS: every address is an endpoint and the cluster's LB policy chooses among them.
/// `DNS_ROUND_ROBIN` is Envoy's LOGICAL_DNS: the answer is one logical host, so the caller passes
/// round robin whatever the policy, and each pick (each new connection, as the pools are per
/// address) takes the next address of the answer.
fn pick_resolved<'a>(
    cluster: Arc<ClusterState>,
    subset: Option<&Cluster>,
    resolved: &[dns::Resolved],
    lb: &LoadBalancer,
    hash: Option<u64>,
    avoid: &[SocketAddr],
) -> Result<Picked<'a>, PickError> {
    let candidates: Vec<&Endpoint> = {
        let outlier = cluster.outlier.lock();
        resolved
            .iter()
            .map(|r| &r.endpoint)
            .filter(|e| balance::in_subset(e, subset))
            .filter(|e| {
                !outlier
                    .as_ref()
                    .is_some_and(|o| o.tracker.excludes(e.address))
            })
            .collect()
    };
    // A DNS endpoint may override the port; find its own entry (by identity, as two names may
    // share an address with different ports).
    let port = |e: &Endpoint| {
        resolved
            .iter()
            .find(|r| std::ptr::eq(&r.endpoint, e))
            .map_or(0, |r| r.port)
    };
    let endpoint = choose(&cluster, lb, candidates, port, hash, avoid)?;
    let addr = SocketAddr::new(endpoint.address, port(endpoint));
    Ok(Picked {
        endpoint: None,
        addr,
        cluster,
    })
}

/// The load balancer's choice among `candidates` (ejected endpoints already left out), avoiding
/// the hosts in `avoid` (tried already) while another candidate remains. `port`: the port an
/// endpoint is connected on.
fn choose<'e>(
    cluster: &ClusterState,
    lb: &LoadBalancer,
    candidates: Vec<&'e Endpoint>,
    port: impl Fn(&Endpoint) -> u16,
    hash: Option<u64>,
    avoid: &[SocketAddr],
) -> Result<&'e Endpoint, PickError> {
    let candidates = if avoid.is_empty() {
        candidates
    } else {
        let fresh: Vec<&Endpoint> = candidates
            .iter()
            .copied()
            .filter(|e| !avoid.contains(&SocketAddr::new(e.address, port(e))))
            .collect();
        if fresh.is_empty() { candidates } else { fresh }
    };
    let no_endpoint = || PickError::NoHealthyUpstream(cluster.label.to_string());
    if candidates.is_empty() {
        return Err(no_endpoint());
    }
    let in_flight: Vec<u32> = if *lb == LoadBalancer::LeastRequest {
        cluster.in_flight(&candidates)
    } else {
        Vec::new()
    };
    let input = PickInput {
        turn: cluster.turn.fetch_add(1, Ordering::Relaxed),
        draws: [rand::random(), rand::random()],
        in_flight: &in_flight,
        hash,
    };
    let pick = match lb {
        LoadBalancer::ConsistentHash(_) => cluster.pick_on_ring(lb, &candidates, &input),
        _ => Balancer::new(lb, &candidates).pick(&input),
    };
    match pick {
        Pick::Endpoint(index) => candidates.get(index).copied().ok_or_else(no_endpoint),
        Pick::Passthrough => Err(PickError::Passthrough(cluster.label.to_string())),
        Pick::NoHealthyUpstream => Err(no_endpoint()),
    }
}

impl Upstreams {
    /// `default_connect_timeout`: the proxy's own, for clusters without `tcp.connectTimeout`.
    pub fn new(metrics: UpstreamMetrics, default_connect_timeout: Duration) -> Self {
        Self {
            default_connect_timeout,
            metrics,
            config: ArcSwapOption::empty(),
            clusters: RwLock::default(),
            dns: dns::Resolver::default(),
        }
    }

    /// Follows a new config: clusters whose service port (and subset) still exist keep their
    /// state with the new settings and endpoint set; the others are dropped (stopping their
    /// outlier sweep). Call it whenever the config is swapped.
    pub fn sync(&self, config: &Arc<ProxyConfig>) {
        let services: HashMap<&str, &Service> = config
            .services
            .iter()
            .flat_map(|s| s.hostnames.iter().map(move |h| (h.as_str(), s)))
            .collect();
        let mut clusters = self.clusters.write();
        self.config.store(Some(config.clone()));
        self.dns.sync(config);
        clusters.retain(|key, state| match resolve(config, &services, key) {
            Some((service, cluster)) => {
                state.apply(service, cluster);
                true
            }
            None => {
                info!(cluster = %state.label, "cluster removed from the config");
                self.metrics.set_ejected(&state.label, 0);
                false
            }
        });
    }

    /// Chooses an endpoint of `target`'s cluster by its LB policy, skipping ejected endpoints
    /// (respecting maxEjectionPercent/minHealthPercent) and, when another candidate remains,
    /// those in `avoid` (hosts already tried: Istio's previous-hosts retry predicate). `hash`:
    /// the consistent-hash key if the policy uses one (`route::balance::hash_key`).
    pub fn pick<'a>(
        &self,
        target: &Target<'a>,
        hash: Option<u64>,
        avoid: &[SocketAddr],
    ) -> Result<Picked<'a>, PickError> {
        let cluster = self.cluster(target);
        let lb = target.cluster.map_or(&DEFAULT_LB, |c| &c.lb);
        if *lb == LoadBalancer::Passthrough {
            return Err(PickError::Passthrough(cluster.label.to_string()));
        }
        let external = self.dns.external(&cluster.key.host);
        // `resolution: NONE`: connections arrive resolved, so they go where the application
        // sent them (Envoy's ORIGINAL_DST cluster).
        if external.as_ref().is_some_and(|e| {
            e.resolution == Resolution::None && target.service.endpoints.is_empty()
        }) {
            return Err(PickError::Passthrough(cluster.label.to_string()));
        }
        if let Some(external) = external.filter(|e| dns::resolves_by_dns(e)) {
            let resolved = self
                .dns
                .endpoints(&external, &target.port.name, target.port.target_port)
                .map_err(|names| PickError::Unresolved {
                    cluster: cluster.label.to_string(),
                    names,
                })?;
            let lb = match external.resolution {
                Resolution::DnsRoundRobin => &LoadBalancer::RoundRobin,
                _ => lb,
            };
            return pick_resolved(cluster, target.cluster, &resolved, lb, hash, avoid);
        }
        let port = target.port.target_port;
        let candidates = {
            let outlier = cluster.outlier.lock();
            balance::candidates(target.service, target.cluster, |e| {
                outlier
                    .as_ref()
                    .is_some_and(|o| o.tracker.excludes(e.address))
            })
        };
        let endpoint = choose(&cluster, lb, candidates, |_| port, hash, avoid)?;
        Ok(Picked {
            endpoint: Some(endpoint),
            addr: SocketAddr::new(endpoint.address, port),
            cluster,
        })
    }

    /// The pick of a connection that goes to `dst` itself (policy `PASSTHROUGH`, or the
    /// application dialled an endpoint's address), still counted against `target`'s cluster.
    pub fn passthrough<'a>(&self, target: &Target<'a>, dst: SocketAddr) -> Picked<'a> {
        Picked {
            endpoint: target
                .service
                .endpoints
                .iter()
                .find(|e| e.address == dst.ip()),
            addr: dst,
            cluster: self.cluster(target),
        }
    }

    /// Admission for one request on the cluster: `http2MaxRequests`. Err = overflow: answer
    /// `503` with flag `UO`. (Connection and pending limits are the pool's, at send time.)
    pub fn admit_request(&self, picked: &Picked<'_>) -> Result<RequestGuard, Overflow> {
        let cluster = &picked.cluster;
        let max = cluster.settings.lock().max_requests;
        cluster.take(&cluster.requests, Limit::Requests, max)?;
        let endpoint = cluster.endpoint_load(picked.addr.ip());
        endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(RequestGuard {
            cluster: cluster.clone(),
            endpoint,
        })
    }

    /// Admission for a retry: `maxRetries` retries in flight across the cluster (Envoy's retry
    /// circuit breaker; Istio's default 2^32-1). Err = overflow: do not retry.
    pub fn admit_retry(&self, picked: &Picked<'_>) -> Result<RetryGuard, Overflow> {
        let cluster = &picked.cluster;
        let max = cluster.settings.lock().max_retries;
        cluster.take(&cluster.retries, Limit::Retries, max)?;
        Ok(RetryGuard {
            cluster: cluster.clone(),
        })
    }

    /// The outcome of a try to `picked`, for outlier detection (consecutive 5xx and gateway
    /// errors; an ejection is logged and counted).
    pub fn record(&self, picked: &Picked<'_>, outcome: Outcome) {
        picked
            .cluster
            .record(picked.addr.ip(), outcome, Instant::now());
    }

    /// Whether outlier detection has `addr`'s endpoint ejected in `target`'s cluster now.
    pub fn is_ejected(&self, target: &Target<'_>, addr: IpAddr) -> bool {
        let key = ClusterKey::of(target);
        let clusters = self.clusters.read();
        clusters.get(&key).is_some_and(|c| {
            c.outlier
                .lock()
                .as_ref()
                .is_some_and(|o| o.tracker.is_ejected(addr))
        })
    }

    /// The clusters with state now.
    pub fn clusters(&self) -> Vec<ClusterKey> {
        let clusters = self.clusters.read();
        let mut keys: Vec<ClusterKey> = clusters.keys().cloned().collect();
        keys.sort_by(|a, b| (&a.host, &a.subset, a.port).cmp(&(&b.host, &b.subset, b.port)));
        keys
    }

    /// The state of `target`'s cluster, created on first use from the last synced config.
    fn cluster(&self, target: &Target<'_>) -> Arc<ClusterState> {
        let key = ClusterKey::of(target);
        if let Some(state) = self.clusters.read().get(&key) {
            return state.clone();
        }
        let mut clusters = self.clusters.write();
        if let Some(state) = clusters.get(&key) {
            return state.clone();
        }
        let config = self.config.load_full();
        let synced = config.as_deref().and_then(|config| {
            let service = config
                .services
                .iter()
                .find(|s| s.hostnames.first() == Some(&key.host))?;
            service.ports.iter().find(|p| p.port == key.port)?;
            let cluster = config.traffic.cluster(&key.host, &key.subset, key.port);
            (key.subset.is_empty() || cluster.is_some()).then_some((service, cluster))
        });
        let state = ClusterState::new(
            key.clone(),
            self.metrics.clone(),
            self.default_connect_timeout,
        );
        match synced {
            Some((service, cluster)) => {
                state.apply(service, cluster);
                clusters.insert(key, state.clone());
            }
            None => {
                // Not in the last synced config (a request still on an older one): serve it
                // with its own settings, without keeping state for a cluster that is gone.
                debug!(cluster = %state.label, "cluster not in the current config, state not kept");
                state.apply(target.service, target.cluster);
            }
        }
        state
    }
}

/// The service and settings of `key` in `config`, `None` when the service port or the subset
/// is gone.
fn resolve<'c>(
    config: &'c ProxyConfig,
    services: &HashMap<&str, &'c Service>,
    key: &ClusterKey,
) -> Option<(&'c Service, Option<&'c Cluster>)> {
    let service = *services.get(key.host.as_str())?;
    service.ports.iter().find(|p| p.port == key.port)?;
    let cluster = config.traffic.cluster(&key.host, &key.subset, key.port);
    if !key.subset.is_empty() && cluster.is_none_or(|c| c.subset != key.subset) {
        return None;
    }
    Some((service, cluster))
}

impl ClusterState {
    fn new(
        key: ClusterKey,
        metrics: UpstreamMetrics,
        default_connect_timeout: Duration,
    ) -> Arc<Self> {
        let label: Arc<str> = Arc::from(key.to_string());
        let hook_metrics = metrics.clone();
        let pool = Pool::new(
            &label,
            Limits::UNLIMITED,
            Some(Box::new(move |overflow: &Overflow| {
                hook_metrics.count_overflow(&overflow.cluster, overflow.limit.as_str());
            })),
        );
        Arc::new(Self {
            key,
            label,
            metrics,
            default_connect_timeout,
            settings: Mutex::new(Settings {
                max_requests: u32::MAX,
                max_retries: u32::MAX,
                connect_timeout: None,
            }),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            turn: AtomicU64::new(0),
            load: RwLock::default(),
            ring: Mutex::new(None),
            outlier: Mutex::new(None),
            pool,
        })
    }

    /// Takes on `cluster`'s settings and `service`'s endpoints, keeping runtime state.
    fn apply(self: &Arc<Self>, service: &Service, cluster: Option<&Cluster>) {
        let pool_settings = cluster.map(|c| &c.connection_pool);
        let mut limits = pool_settings.map(Limits::from_settings).unwrap_or_default();
        limits.connect_timeout = Some(
            limits
                .connect_timeout
                .unwrap_or(self.default_connect_timeout),
        );
        self.pool.set_limits(limits);
        *self.settings.lock() = Settings {
            max_requests: pool_settings
                .and_then(|p| p.http2_max_requests)
                .unwrap_or(u32::MAX),
            max_retries: pool_settings
                .and_then(|p| p.max_retries)
                .unwrap_or(u32::MAX),
            connect_timeout: pool_settings
                .and_then(|p| p.connect_timeout_ms)
                .map(Duration::from_millis),
        };
        let hosts: Vec<IpAddr> = balance::candidates(service, cluster, |_| false)
            .iter()
            .map(|e| e.address)
            .collect();
        self.load
            .write()
            .retain(|ip, load| hosts.contains(ip) || load.in_flight.load(Ordering::Acquire) > 0);
        let detection = cluster.and_then(|c| c.outlier_detection.as_ref());
        let mut outlier = self.outlier.lock();
        match (outlier.as_mut(), detection) {
            (Some(current), Some(config)) if current.config == *config => {
                current.tracker.sync(hosts.iter().copied());
                current.hosts = hosts;
                self.metrics.set_ejected(&self.label, current.ejected());
            }
            (_, Some(config)) => {
                // New or changed settings start afresh, as Envoy rebuilds a changed cluster.
                let tracker = OutlierTracker::new(config.clone(), hosts.iter().copied());
                let ticker = self.start_sweep(tracker.interval());
                *outlier = Some(Outlier {
                    config: config.clone(),
                    tracker,
                    hosts,
                    ticker,
                });
                self.metrics.set_ejected(&self.label, 0);
            }
            (_, None) => {
                if outlier.take().is_some() {
                    self.metrics.set_ejected(&self.label, 0);
                }
            }
        }
    }

    /// Sweeps the outlier tracker every `interval` until aborted or the cluster is gone.
    fn start_sweep(self: &Arc<Self>, interval: Duration) -> Option<AbortHandle> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(cluster = %self.label, "no async runtime: outlier ejections will not end");
            return None;
        };
        let state: Weak<Self> = Arc::downgrade(self);
        let interval = interval.max(Duration::from_millis(1));
        let task = runtime.spawn(async move {
            let start = tokio::time::Instant::now() + interval;
            let mut timer = tokio::time::interval_at(start, interval);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                timer.tick().await;
                let Some(state) = state.upgrade() else { return };
                state.sweep(Instant::now());
            }
        });
        Some(task.abort_handle())
    }

    fn sweep(&self, now: Instant) {
        let mut outlier = self.outlier.lock();
        let Some(outlier) = outlier.as_mut() else {
            return;
        };
        let returned = outlier.tracker.tick(now);
        if returned.is_empty() {
            return;
        }
        for host in &returned {
            info!(cluster = %self.label, endpoint = %host, "outlier detection returned an endpoint");
        }
        self.metrics.set_ejected(&self.label, outlier.ejected());
    }

    fn record(&self, host: IpAddr, outcome: Outcome, now: Instant) {
        let mut outlier = self.outlier.lock();
        let Some(outlier) = outlier.as_mut() else {
            return;
        };
        match outlier.tracker.record(host, outcome, now) {
            Recorded::Counted => {}
            Recorded::Ejected { until } => {
                warn!(
                    cluster = %self.label, endpoint = %host, ?outcome,
                    ejected_for_ms = until.saturating_duration_since(now).as_millis(),
                    "outlier detection ejected an endpoint"
                );
                self.metrics.count_ejection(&self.label);
                self.metrics.set_ejected(&self.label, outlier.ejected());
            }
            Recorded::EjectionRefused => {
                debug!(cluster = %self.label, endpoint = %host, "ejection refused by maxEjectionPercent");
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.settings
            .lock()
            .connect_timeout
            .unwrap_or(self.default_connect_timeout)
    }

    /// Increments `counter` below `max`, or counts and returns the overflow.
    fn take(&self, counter: &AtomicU32, limit: Limit, max: u32) -> Result<(), Overflow> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then(|| n + 1)
            })
            .map(drop)
            .map_err(|_| {
                self.metrics.count_overflow(&self.label, limit.as_str());
                Overflow {
                    cluster: self.label.clone(),
                    limit,
                    max,
                }
            })
    }

    fn endpoint_load(&self, ip: IpAddr) -> Arc<EndpointLoad> {
        if let Some(load) = self.load.read().get(&ip) {
            return load.clone();
        }
        self.load.write().entry(ip).or_default().clone()
    }

    fn in_flight(&self, candidates: &[&Endpoint]) -> Vec<u32> {
        let load = self.load.read();
        candidates
            .iter()
            .map(|e| {
                load.get(&e.address)
                    .map_or(0, |l| l.in_flight.load(Ordering::Acquire))
            })
            .collect()
    }

    /// Picks on the cached ring, rebuilding it when the candidates or the policy changed.
    fn pick_on_ring(
        &self,
        lb: &LoadBalancer,
        candidates: &[&Endpoint],
        input: &PickInput<'_>,
    ) -> Pick {
        let mut ring = self.ring.lock();
        let current = ring.as_ref().is_some_and(|r| {
            r.lb == *lb
                && r.addresses.len() == candidates.len()
                && r.addresses
                    .iter()
                    .zip(candidates)
                    .all(|(a, e)| *a == e.address)
        });
        if !current {
            *ring = Some(CachedRing {
                lb: lb.clone(),
                addresses: candidates.iter().map(|e| e.address).collect(),
                balancer: Balancer::new(lb, candidates),
            });
        }
        ring.as_ref()
            .map_or(Pick::NoHealthyUpstream, |r| r.balancer.pick(input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use serde_json::json;

    const HOST: &str = "a.ns.svc.cluster.local";

    /// A config with service `a` (port 80 → 8080) over `endpoints` (10.0.0.N) and, when given,
    /// a DestinationRule-equivalent cluster for the whole service.
    fn config(endpoints: &[u8], cluster: Option<serde_json::Value>) -> Arc<ProxyConfig> {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|n| json!({"address": format!("10.0.0.{n}"), "ready": true, "meshed": false}))
            .collect();
        let mut traffic = json!({});
        if let Some(mut cluster) = cluster {
            cluster["host"] = json!(HOST);
            traffic = json!({"clusters": [cluster]});
        }
        let snapshot = json!({
            "version": "1",
            "services": [{
                "hostnames": [HOST], "namespace": "ns", "vips": ["10.96.0.1"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}],
                "endpoints": endpoints
            }],
            "traffic": traffic
        });
        Arc::new(ProxyConfig::from_json(snapshot.to_string().as_bytes()).unwrap())
    }

    fn target(config: &ProxyConfig) -> Target<'_> {
        crate::route::resolve_target(config, HOST, "", Some(80), 80).unwrap()
    }

    fn upstreams() -> (Metrics, Upstreams) {
        let metrics = Metrics::new();
        let upstreams = Upstreams::new(metrics.upstream(), Duration::from_secs(3));
        (metrics, upstreams)
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// The endpoints `n` picks choose, as last address octets.
    fn picks(
        upstreams: &Upstreams,
        config: &ProxyConfig,
        n: usize,
        avoid: &[SocketAddr],
    ) -> Vec<u8> {
        (0..n)
            .map(|_| match upstreams.pick(&target(config), None, avoid) {
                Ok(picked) => match picked.addr.ip() {
                    IpAddr::V4(v4) => v4.octets()[3],
                    IpAddr::V6(_) => panic!("v6"),
                },
                Err(e) => panic!("{e}"),
            })
            .collect()
    }

    fn outlier(consecutive: u32, max_percent: u32) -> serde_json::Value {
        json!({"outlierDetection": {
            "consecutive5xxErrors": consecutive, "consecutiveGatewayErrors": 0,
            "intervalMs": 60_000, "baseEjectionTimeMs": 60_000,
            "maxEjectionPercent": max_percent, "minHealthPercent": 0
        }})
    }

    #[tokio::test]
    async fn round_robin_by_default_and_previous_hosts_avoided() {
        let (_metrics, upstreams) = upstreams();
        let config = config(&[1, 2, 3], None);
        upstreams.sync(&config);
        assert_eq!(picks(&upstreams, &config, 4, &[]), [1, 2, 3, 1]);
        let tried = [SocketAddr::new(ip(2), 8080)];
        assert!(
            picks(&upstreams, &config, 6, &tried)
                .iter()
                .all(|n| *n != 2)
        );
        // Every candidate tried: one of them again rather than nothing.
        let all: Vec<SocketAddr> = [1, 2, 3].map(|n| SocketAddr::new(ip(n), 8080)).to_vec();
        assert_eq!(picks(&upstreams, &config, 3, &all).len(), 3);
        let picked = upstreams.pick(&target(&config), None, &[]).unwrap();
        assert_eq!(picked.cluster().to_string(), format!("outbound|80||{HOST}"));
        assert_eq!(picked.connect_timeout(), Duration::from_secs(3));
        assert_eq!(picked.endpoint.map(|e| e.address), Some(picked.addr.ip()));
    }

    #[tokio::test]
    async fn ejection_gates_picks_and_is_counted() {
        let (metrics, upstreams) = upstreams();
        let mut cluster = outlier(2, 100);
        cluster["lb"] = json!("roundRobin");
        let config = config(&[1, 2], Some(cluster));
        upstreams.sync(&config);
        let bad = upstreams.passthrough(&target(&config), SocketAddr::new(ip(1), 8080));
        upstreams.record(&bad, Outcome::Status(500));
        assert!(
            !upstreams.is_ejected(&target(&config), ip(1)),
            "one error of two"
        );
        upstreams.record(&bad, Outcome::Status(503));
        assert!(upstreams.is_ejected(&target(&config), ip(1)));
        assert_eq!(picks(&upstreams, &config, 4, &[]), [2, 2, 2, 2]);
        let text = metrics.encode();
        let cluster = format!("outbound|80||{HOST}");
        assert!(
            text.contains(&format!(
                "trellis_outlier_ejections_total{{cluster=\"{cluster}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_outlier_ejections_active{{cluster=\"{cluster}\"}} 1"
            )),
            "{text}"
        );
        // The other endpoint going bad too: maxEjectionPercent 100 ejects it, nothing is left.
        let other = upstreams.pick(&target(&config), None, &[]).unwrap();
        upstreams.record(&other, Outcome::ConnectFailure);
        upstreams.record(&other, Outcome::Reset);
        assert_eq!(
            upstreams.pick(&target(&config), None, &[]).unwrap_err(),
            PickError::NoHealthyUpstream(cluster)
        );
    }

    #[tokio::test]
    async fn max_ejection_percent_keeps_endpoints_in() {
        let (_metrics, upstreams) = upstreams();
        let config = config(&[1, 2, 3, 4], Some(outlier(1, 25)));
        upstreams.sync(&config);
        for n in [1, 2] {
            let picked = upstreams.passthrough(&target(&config), SocketAddr::new(ip(n), 8080));
            upstreams.record(&picked, Outcome::Status(500));
        }
        assert!(upstreams.is_ejected(&target(&config), ip(1)));
        assert!(
            !upstreams.is_ejected(&target(&config), ip(2)),
            "25 % of 4 is one"
        );
    }

    #[tokio::test]
    async fn sync_keeps_state_adds_endpoints_and_drops_removed_clusters() {
        let (_metrics, upstreams) = upstreams();
        let mut cluster = outlier(1, 100);
        cluster["lb"] = json!("roundRobin");
        cluster["connectionPool"] = json!({"http2MaxRequests": 2});
        let before = config(&[1, 2], Some(cluster.clone()));
        upstreams.sync(&before);
        let picked = upstreams.pick(&target(&before), None, &[]).unwrap();
        let held = upstreams.admit_request(&picked).unwrap();
        let bad = upstreams.passthrough(&target(&before), SocketAddr::new(ip(1), 8080));
        upstreams.record(&bad, Outcome::Status(500));

        // Endpoint 3 added, limits unchanged: the ejection and the request in flight persist.
        let after = config(&[1, 2, 3], Some(cluster));
        upstreams.sync(&after);
        assert!(upstreams.is_ejected(&target(&after), ip(1)));
        let mut seen = picks(&upstreams, &after, 4, &[]);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, [2, 3]);
        let picked = upstreams.pick(&target(&after), None, &[]).unwrap();
        let second = upstreams.admit_request(&picked).unwrap();
        let overflow = upstreams.admit_request(&picked).err().unwrap();
        assert_eq!(
            overflow.limit,
            Limit::Requests,
            "the first request still counts"
        );
        drop((held, second));

        // The DestinationRule gone: default settings, no outlier detection.
        let plain = config(&[1, 2, 3], None);
        upstreams.sync(&plain);
        assert!(!upstreams.is_ejected(&target(&plain), ip(1)));
        assert_eq!(upstreams.clusters().len(), 1);
        // The service gone: its cluster too.
        let other: Arc<ProxyConfig> =
            Arc::new(ProxyConfig::from_json(br#"{"version":"2","services":[]}"#).unwrap());
        upstreams.sync(&other);
        assert!(upstreams.clusters().is_empty());
    }

    /// An admission whose guard is kept as `Any` (request and retry guards differ).
    type Admit<'a> = &'a dyn Fn() -> Result<Box<dyn std::any::Any>, Overflow>;

    #[tokio::test]
    async fn a_request_on_a_replaced_config_keeps_no_state() {
        let (_metrics, upstreams) = upstreams();
        let old = config(&[1], None);
        let new: Arc<ProxyConfig> =
            Arc::new(ProxyConfig::from_json(br#"{"version":"2","services":[]}"#).unwrap());
        upstreams.sync(&new);
        // Still served (the request holds the old config), but the gone cluster is not kept.
        assert_eq!(picks(&upstreams, &old, 2, &[]), [1, 1]);
        assert!(upstreams.clusters().is_empty());
    }

    #[tokio::test]
    async fn request_and_retry_limits_overflow_and_release() {
        let (metrics, upstreams) = upstreams();
        let config = config(
            &[1],
            Some(
                json!({"connectionPool": {"http2MaxRequests": 1, "maxRetries": 1, "connectTimeoutMs": 250}}),
            ),
        );
        upstreams.sync(&config);
        let picked = upstreams.pick(&target(&config), None, &[]).unwrap();
        assert_eq!(picked.connect_timeout(), Duration::from_millis(250));
        // (admission, limit hit on the second)
        let cases: [(Admit<'_>, Limit); 2] = [
            (
                &|| {
                    upstreams
                        .admit_request(&picked)
                        .map(|g| Box::new(g) as Box<dyn std::any::Any>)
                },
                Limit::Requests,
            ),
            (
                &|| {
                    upstreams
                        .admit_retry(&picked)
                        .map(|g| Box::new(g) as Box<dyn std::any::Any>)
                },
                Limit::Retries,
            ),
        ];
        for (admit, limit) in cases {
            let first = admit().unwrap();
            let overflow = admit().err().unwrap();
            assert_eq!((overflow.limit, overflow.max), (limit, 1));
            assert!(overflow.to_string().contains(limit.setting()), "{overflow}");
            drop(first);
            assert!(admit().is_ok(), "{limit:?} released on drop");
        }
        let text = metrics.encode();
        for limit in ["max_requests", "max_retries"] {
            assert!(
                text.contains(&format!(
                    "trellis_upstream_overflow_total{{cluster=\"outbound|80||{HOST}\",limit=\"{limit}\"}} 1"
                )),
                "{limit}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn least_request_prefers_the_idle_endpoint() {
        let (_metrics, upstreams) = upstreams();
        let config = config(&[1, 2], Some(json!({"lb": "leastRequest"})));
        upstreams.sync(&config);
        let busy = upstreams.passthrough(&target(&config), SocketAddr::new(ip(1), 8080));
        let _in_flight: Vec<RequestGuard> = (0..5)
            .map(|_| upstreams.admit_request(&busy).unwrap())
            .collect();
        // P2C picks the busy endpoint only when both draws land on it: about 1 in 4.
        let seen = picks(&upstreams, &config, 400, &[]);
        let busy_picks = seen.iter().filter(|n| **n == 1).count();
        assert!((50..=150).contains(&busy_picks), "{busy_picks} of 400");
    }

    #[tokio::test]
    async fn consistent_hash_sticks_to_one_endpoint() {
        let (_metrics, upstreams) = upstreams();
        let config = config(
            &[1, 2, 3, 4],
            Some(json!({"lb": {"consistentHash": {"key": "sourceIp", "ringSize": 1024}}})),
        );
        upstreams.sync(&config);
        for key in 0..20u64 {
            let hash = Some(balance::stable_hash(&key.to_le_bytes()));
            let first = upstreams.pick(&target(&config), hash, &[]).unwrap().addr;
            for _ in 0..5 {
                assert_eq!(
                    upstreams.pick(&target(&config), hash, &[]).unwrap().addr,
                    first
                );
            }
        }
    }

    #[tokio::test]
    async fn the_interval_sweep_returns_ejected_endpoints() {
        let (metrics, upstreams) = upstreams();
        let config = config(
            &[1, 2],
            Some(json!({"outlierDetection": {
                "consecutive5xxErrors": 1, "consecutiveGatewayErrors": 0,
                "intervalMs": 20, "baseEjectionTimeMs": 100,
                "maxEjectionPercent": 100, "minHealthPercent": 0
            }})),
        );
        upstreams.sync(&config);
        let bad = upstreams.passthrough(&target(&config), SocketAddr::new(ip(1), 8080));
        upstreams.record(&bad, Outcome::Status(500));
        assert!(upstreams.is_ejected(&target(&config), ip(1)));
        let start = Instant::now();
        while upstreams.is_ejected(&target(&config), ip(1)) {
            assert!(start.elapsed() < Duration::from_secs(5), "never returned");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
        assert!(metrics.encode().contains(&format!(
            "trellis_outlier_ejections_active{{cluster=\"outbound|80||{HOST}\"}} 0"
        )));
    }
}
