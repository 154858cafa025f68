//! DNS resolution of ServiceEntry clusters (`resolution: DNS` and `DNS_ROUND_ROBIN`): the names
//! of the config's external services (their endpoints' addresses, or the host itself) are looked
//! up in the background, one task per name, as soon as a config names them, and looked up again
//! when their answer's TTL runs out. A request only ever reads the cached answer, never waits on
//! a lookup. A failed lookup keeps the last good answer (Envoy does the same); a name never
//! answered leaves its cluster without endpoints (`UH`).
//!
//! Lookups go through hickory's stub resolver, because the system resolver (`getaddrinfo`)
//! does not report record TTLs. It is configured as the system resolver is: the nameservers,
//! search list and options of `/etc/resolv.conf`, `/etc/hosts` first (both read once, when the
//! first name is resolved; a pod's do not change). A name asks for its A records, and for AAAA
//! only if it has none (Envoy's `V4_PREFERRED`; `getaddrinfo` gave both families, and hickory
//! would add `::1` to `localhost` even where `/etc/hosts` lists only `127.0.0.1`). Each refresh
//! asks the nameserver: hickory's own cache is off, the refresh task is the cache.
//!
//! The refresh follows the smallest TTL of the answer's records, within [`MIN_REFRESH`] (a TTL
//! of 0, "do not cache", must not turn into a lookup loop) and [`MAX_REFRESH`] (the fixed period
//! used before TTLs were read, so no answer is followed less closely than it was, whatever its
//! TTL; answers without a TTL, from `/etc/hosts` or for an IP literal, are looked up that often).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use parking_lot::RwLock;
use tokio::task::AbortHandle;
use tracing::{info, warn};
use trellis_config::proxy::{Endpoint, ProxyConfig};
use trellis_config::traffic::{ExternalService, Resolution};

/// The shortest time an answer is kept before its name is looked up again.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest time an answer is kept before its name is looked up again; also how soon a
/// failed lookup of an answered name is retried.
pub const MAX_REFRESH: Duration = Duration::from_secs(30);
/// How soon a name that has never been answered is tried again.
const RETRY_UNANSWERED: Duration = Duration::from_secs(2);

/// One endpoint from a DNS answer: an address of a resolved name, with that name's labels, and
/// the port to connect to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub endpoint: Endpoint,
    pub port: u16,
}

/// The DNS view of the config's external services and the cached answers of their names.
#[derive(Default)]
pub struct Resolver {
    /// Host → its ServiceEntry facts.
    services: RwLock<HashMap<String, Arc<ExternalService>>>,
    names: RwLock<HashMap<String, Arc<Name>>>,
    /// The stub resolver the names' tasks share, built on the first name to resolve (`None`:
    /// the system configuration could not be read, and no name is ever answered).
    dns: OnceLock<Option<TokioResolver>>,
}

/// A name being resolved: its last good answer and the task refreshing it.
struct Name {
    answer: RwLock<Option<Arc<[IpAddr]>>>,
    task: RwLock<Option<AbortHandle>>,
}

impl Drop for Name {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

impl Resolver {
    /// Follows a new config: starts resolving names it adds and stops those it no longer has
    /// (kept names keep their answers, so a config swap never empties a cluster).
    pub fn sync(&self, config: &ProxyConfig) {
        let services: HashMap<String, Arc<ExternalService>> = config
            .traffic
            .external_services
            .iter()
            .map(|s| (s.host.clone(), Arc::new(s.clone())))
            .collect();
        let mut names = self.names.write();
        let wanted: HashMap<&str, ()> = services
            .values()
            .filter(|s| resolves_by_dns(s))
            .flat_map(|s| s.dns_endpoints.iter().map(|e| (e.address.as_str(), ())))
            .collect();
        names.retain(|name, _| wanted.contains_key(name.as_str()));
        for name in wanted.keys() {
            if !names.contains_key(*name) {
                names.insert((*name).to_owned(), self.start(name));
            }
        }
        *self.services.write() = services;
    }

    /// The ServiceEntry facts of `host` (its resolution, and the names to resolve for DNS).
    pub fn external(&self, host: &str) -> Option<Arc<ExternalService>> {
        self.services.read().get(host).cloned()
    }

    /// The cached answer for `name` (`None`: not answered yet, or not a name of the config).
    fn answer(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        let names = self.names.read();
        let name = names.get(name)?;
        name.answer.read().clone()
    }

    /// The endpoints of `service` for its port `port_name` (target port `target_port` unless a
    /// DNS endpoint overrides it) from the cached answers. Err: the names none of which has an
    /// answer yet.
    pub fn endpoints(
        &self,
        service: &ExternalService,
        port_name: &str,
        target_port: u16,
    ) -> Result<Vec<Resolved>, UnresolvedNames> {
        endpoints(service, port_name, target_port, |name| self.answer(name))
    }
}

/// Whether the ServiceEntry's endpoints come from DNS answers.
pub fn resolves_by_dns(service: &ExternalService) -> bool {
    matches!(
        service.resolution,
        Resolution::Dns | Resolution::DnsRoundRobin
    )
}

/// Names of a cluster none of which has been answered yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no DNS answer yet for {}", .0.join(", "))]
pub struct UnresolvedNames(pub Vec<String>);

/// Pure: every address of every answered name is an endpoint (DNS, Envoy's STRICT_DNS); the
/// names still unanswered add none. DNS_ROUND_ROBIN has one name (validation) and its answer's
/// addresses are the rotation the caller turns through per new connection.
fn endpoints(
    service: &ExternalService,
    port_name: &str,
    target_port: u16,
    answer: impl Fn(&str) -> Option<Arc<[IpAddr]>>,
) -> Result<Vec<Resolved>, UnresolvedNames> {
    let mut resolved = Vec::new();
    let mut unanswered = Vec::new();
    for dns in &service.dns_endpoints {
        let Some(addresses) = answer(&dns.address) else {
            unanswered.push(dns.address.clone());
            continue;
        };
        let port = dns.ports.get(port_name).copied().unwrap_or(target_port);
        resolved.extend(addresses.iter().map(|address| Resolved {
            endpoint: endpoint(*address, &dns.labels),
            port,
        }));
    }
    if resolved.is_empty() && !unanswered.is_empty() {
        return Err(UnresolvedNames(unanswered));
    }
    Ok(resolved)
}

fn endpoint(address: IpAddr, labels: &BTreeMap<String, String>) -> Endpoint {
    Endpoint {
        address,
        ready: true,
        // An external name is never a Trellis sidecar: mesh mTLS does not apply.
        meshed: false,
        identity: None,
        labels: labels.into(),
        plaintext_ports: Default::default(),
    }
}

impl Resolver {
    /// Starts resolving `name` in the background (no-op outside an async runtime: the name then
    /// never gets an answer, which only unit tests of the config handling see).
    fn start(&self, name: &str) -> Arc<Name> {
        let state = Arc::new(Name {
            answer: RwLock::new(None),
            task: RwLock::new(None),
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(name, "no async runtime: DNS name will not be resolved");
            return state;
        };
        let Some(dns) = self.dns.get_or_init(system_resolver) else {
            warn!(name, "no DNS configuration: DNS name will not be resolved");
            return state;
        };
        let task = runtime.spawn(refresh(
            dns.clone(),
            name.to_owned(),
            Arc::downgrade(&state),
        ));
        *state.task.write() = Some(task.abort_handle());
        state
    }
}

/// A stub resolver configured as the system's (see the module doc).
fn system_resolver() -> Option<TokioResolver> {
    TokioResolver::builder_tokio()
        .and_then(build)
        .inspect_err(|e| warn!(error = %e, "reading the system DNS configuration failed"))
        .ok()
}

/// The stub resolver `builder` configures, with the lookup options of the module doc.
fn build(mut builder: ResolverBuilder<TokioRuntimeProvider>) -> Result<TokioResolver, NetError> {
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    options.use_hosts_file = ResolveHosts::Always;
    options.cache_size = 0;
    builder.build()
}

/// Looks `name` up until its state is dropped: when its answer's TTL runs out once answered,
/// sooner until then. Logs every change of the answer and every failure.
async fn refresh(dns: TokioResolver, name: String, state: Weak<Name>) {
    loop {
        let looked_up = lookup(&dns, &name).await;
        let Some(state) = state.upgrade() else { return };
        let wait = record(&name, &state, looked_up);
        drop(state);
        tokio::time::sleep(wait).await;
    }
}

/// A lookup's addresses and how long they may be kept.
#[derive(Debug)]
struct Answer {
    /// Sorted and deduplicated, so a reordered answer is no change.
    addresses: Vec<IpAddr>,
    /// The smallest TTL of the answer's records.
    ttl: Duration,
}

/// Keeps a lookup's answer (the last good one on failure); returns when to look up again.
fn record(name: &str, state: &Name, looked_up: anyhow::Result<Answer>) -> Duration {
    let mut answer = state.answer.write();
    match looked_up {
        Ok(Answer { addresses, ttl }) => {
            if answer.as_deref() != Some(&addresses[..]) {
                info!(
                    name,
                    ?addresses,
                    ttl_s = ttl.as_secs(),
                    "DNS answer changed"
                );
                *answer = Some(addresses.into());
            }
            ttl.clamp(MIN_REFRESH, MAX_REFRESH)
        }
        Err(e) if answer.is_some() => {
            warn!(
                name,
                error = format!("{e:#}"),
                "DNS lookup failed; keeping the last answer"
            );
            MAX_REFRESH
        }
        Err(e) => {
            warn!(
                name,
                error = format!("{e:#}"),
                "DNS lookup failed; cluster has no endpoint"
            );
            RETRY_UNANSWERED
        }
    }
}

/// The addresses of `name` and how long they may be kept.
async fn lookup(dns: &TokioResolver, name: &str) -> anyhow::Result<Answer> {
    let lookup = dns
        .lookup_ip(name)
        .await
        .with_context(|| format!("looking up {name}"))?;
    let ttl = lookup
        .valid_until()
        .saturating_duration_since(Instant::now());
    let mut addresses: Vec<IpAddr> = lookup.iter().collect();
    addresses.sort_unstable();
    addresses.dedup();
    anyhow::ensure!(!addresses.is_empty(), "{name} has no address");
    Ok(Answer { addresses, ttl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::traffic::{DnsEndpoint, Location};

    fn service(endpoints: &[(&str, &[(&str, u16)])]) -> ExternalService {
        ExternalService {
            host: "api.example.com".into(),
            location: Location::MeshExternal,
            resolution: Resolution::Dns,
            dns_endpoints: endpoints
                .iter()
                .map(|(address, ports)| DnsEndpoint {
                    address: (*address).into(),
                    ports: ports.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect(),
                    labels: BTreeMap::from([("name".to_owned(), (*address).to_owned())]),
                })
                .collect(),
        }
    }

    /// A `resolution: DNS` ServiceEntry for `host` whose endpoints are `names`.
    fn service_entry(host: &str, names: &[&str]) -> ExternalService {
        ExternalService {
            host: host.into(),
            location: Location::MeshExternal,
            resolution: Resolution::Dns,
            dns_endpoints: names
                .iter()
                .map(|n| DnsEndpoint {
                    address: (*n).into(),
                    ports: BTreeMap::new(),
                    labels: BTreeMap::new(),
                })
                .collect(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// (address, port) of every endpoint, or the unanswered names.
    type Expected = Result<Vec<(&'static str, u16)>, Vec<&'static str>>;

    #[test]
    fn answered_names_give_every_address_as_an_endpoint() {
        let answers: HashMap<&str, Arc<[IpAddr]>> = HashMap::from([
            ("a.example.com", vec![ip("10.0.0.1"), ip("10.0.0.2")].into()),
            ("b.example.com", vec![ip("10.0.0.3")].into()),
        ]);
        let answer = |name: &str| answers.get(name).cloned();
        let both = service(&[
            ("a.example.com", &[]),
            ("b.example.com", &[("https", 8443)]),
        ]);
        let one_unanswered = service(&[("a.example.com", &[]), ("c.example.com", &[])]);
        let none_answered = service(&[("c.example.com", &[]), ("d.example.com", &[])]);
        let cases: [(&ExternalService, &str, Expected); 4] = [
            (
                &both,
                "https",
                Ok(vec![
                    ("10.0.0.1", 443),
                    ("10.0.0.2", 443),
                    ("10.0.0.3", 8443),
                ]),
            ),
            (
                &both,
                "http",
                Ok(vec![
                    ("10.0.0.1", 443),
                    ("10.0.0.2", 443),
                    ("10.0.0.3", 443),
                ]),
            ),
            (
                &one_unanswered,
                "https",
                Ok(vec![("10.0.0.1", 443), ("10.0.0.2", 443)]),
            ),
            (
                &none_answered,
                "https",
                Err(vec!["c.example.com", "d.example.com"]),
            ),
        ];
        for (service, port_name, expected) in cases {
            let got = endpoints(service, port_name, 443, answer).map(|resolved| {
                resolved
                    .iter()
                    .map(|r| (r.endpoint.address, r.port))
                    .collect::<Vec<_>>()
            });
            let expected = expected
                .map(|e| e.iter().map(|(a, p)| (ip(a), *p)).collect::<Vec<_>>())
                .map_err(|names| UnresolvedNames(names.iter().map(|n| (*n).to_owned()).collect()));
            assert_eq!(got, expected, "{port_name} {service:?}");
        }
        // Endpoints carry their name's labels (subsets select on them) and are never meshed.
        let resolved = endpoints(&both, "https", 443, answer).unwrap();
        assert_eq!(
            resolved[2].endpoint.labels.get("name"),
            Some("b.example.com")
        );
        assert!(
            resolved
                .iter()
                .all(|r| !r.endpoint.meshed && r.endpoint.ready)
        );
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_answer() {
        let state = Name {
            answer: RwLock::new(None),
            task: RwLock::new(None),
        };
        let failed = || Err(anyhow::anyhow!("resolver timed out"));
        let answered = |address: &str, ttl: u64| {
            Ok(Answer {
                addresses: vec![ip(address)],
                ttl: Duration::from_secs(ttl),
            })
        };
        let answer = || state.answer.read().as_deref().map(<[IpAddr]>::to_vec);
        assert_eq!(record("n", &state, failed()), RETRY_UNANSWERED);
        assert_eq!(answer(), None);
        assert_eq!(
            record("n", &state, answered("10.0.0.1", 5)),
            Duration::from_secs(5)
        );
        assert_eq!(record("n", &state, failed()), MAX_REFRESH);
        assert_eq!(answer(), Some(vec![ip("10.0.0.1")]));
        assert_eq!(
            record("n", &state, answered("10.0.0.2", 20)),
            Duration::from_secs(20)
        );
        assert_eq!(answer(), Some(vec![ip("10.0.0.2")]));
        // The TTL is followed within its bounds.
        assert_eq!(record("n", &state, answered("10.0.0.2", 0)), MIN_REFRESH);
        assert_eq!(
            record("n", &state, answered("10.0.0.2", 86_400)),
            MAX_REFRESH
        );
    }

    /// The cluster DNS of the demo app, for one service whose address the test changes.
    struct OneService(parking_lot::Mutex<std::net::Ipv4Addr>);

    impl trellis_demo::dns::ServiceLookup for OneService {
        fn ready(&self) -> bool {
            true
        }

        fn service(&self, namespace: &str, name: &str) -> Option<Vec<std::net::Ipv4Addr>> {
            ((namespace, name) == ("ext", "api")).then(|| vec![*self.0.lock()])
        }
    }

    #[tokio::test]
    async fn a_changed_address_is_seen_when_its_ttl_runs_out() {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};

        // A nameserver answering `api.ext.svc.cluster.local` with a TTL of 1 s.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let service = Arc::new(OneService(parking_lot::Mutex::new([10, 0, 0, 1].into())));
        let answering = Arc::clone(&service);
        tokio::spawn(async move {
            let mut packet = [0u8; 512];
            loop {
                let (n, from) = server.recv_from(&mut packet).await.unwrap();
                let response = trellis_demo::dns::handle_packet(
                    &packet[..n],
                    "cluster.local",
                    answering.as_ref(),
                    1,
                    512,
                );
                if let Some(response) = response {
                    server.send_to(&response, from).await.unwrap();
                }
            }
        });

        let mut udp = ConnectionConfig::udp();
        udp.port = server_addr.port();
        let nameserver = NameServerConfig::new(server_addr.ip(), true, vec![udp]);
        let config = ResolverConfig::from_name_servers(vec![nameserver]);
        let dns = build(TokioResolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        ))
        .unwrap();
        let resolver = Resolver {
            dns: OnceLock::from(Some(dns)),
            ..Resolver::default()
        };
        let mut config = ProxyConfig::default();
        config.traffic.external_services =
            vec![service_entry("api.test", &["api.ext.svc.cluster.local"])];
        resolver.sync(&config);
        let external = resolver.external("api.test").unwrap();
        let addresses = || {
            resolver.endpoints(&external, "http", 80).map(|resolved| {
                resolved
                    .iter()
                    .map(|r| r.endpoint.address)
                    .collect::<Vec<_>>()
            })
        };
        let wait_for = |expected: &'static str| async move {
            let started = tokio::time::Instant::now();
            while addresses() != Ok(vec![ip(expected)]) {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{expected} not seen within 5 s: {:?}",
                    addresses()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            started.elapsed()
        };
        wait_for("10.0.0.1").await;
        *service.0.lock() = [10, 0, 0, 2].into();
        let followed = wait_for("10.0.0.2").await;
        // Within the TTL (1 s) and a lookup, not the 30 s a fixed refresh would take.
        assert!(followed <= Duration::from_secs(3), "{followed:?}");
    }

    #[tokio::test]
    async fn names_are_resolved_in_the_background_and_dropped_with_the_config() {
        let config = |host: &str, names: &[&str]| {
            let mut config = ProxyConfig::default();
            config.traffic.external_services = vec![service_entry(host, names)];
            config
        };
        let resolver = Resolver::default();
        resolver.sync(&config("local.test", &["localhost"]));
        let external = resolver.external("local.test").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let resolved = loop {
            if let Ok(resolved) = resolver.endpoints(&external, "http", 80) {
                break resolved;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "localhost never resolved"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            resolved.iter().all(|r| r.endpoint.address.is_loopback()),
            "{resolved:?}"
        );
        assert_eq!(resolver.external("other.test"), None);
        resolver.sync(&config("other.test", &["localhost.invalid"]));
        assert_eq!(resolver.external("local.test"), None);
        let other = resolver.external("other.test").unwrap();
        assert_eq!(
            resolver.endpoints(&other, "http", 80),
            Err(UnresolvedNames(vec!["localhost.invalid".into()]))
        );
    }
}
