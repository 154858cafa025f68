//! DNS resolution of ServiceEntry clusters (`resolution: DNS` and `DNS_ROUND_ROBIN`): the names
//! of the config's external services (their endpoints' addresses, or the host itself) are looked
//! up in the background, one task per name, as soon as a config names them, and looked up again
//! every [`REFRESH`]. A request only ever reads the cached answer, never waits on a lookup. A
//! failed lookup keeps the last good answer (Envoy does the same); a name never answered leaves
//! its cluster without endpoints (`UH`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio::task::AbortHandle;
use tracing::{info, warn};
use trellis_config::proxy::{Endpoint, ProxyConfig};
use trellis_config::traffic::{ExternalService, Resolution};

/// How often an answered name is looked up again. The system resolver (`getaddrinfo`, behind
/// tokio's `lookup_host`) does not report record TTLs, so the period is fixed: often enough to
/// follow an address change within a minute, rarely enough not to load the resolver.
pub const REFRESH: Duration = Duration::from_secs(30);
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
}

/// A name being resolved: its last good answer and the task refreshing it.
struct Name {
    answer: RwLock<Option<Arc<[IpAddr]>>>,
    task: RwLock<Option<AbortHandle>>,
}

impl Drop for Name {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
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
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        let wanted: HashMap<&str, ()> = services
            .values()
            .filter(|s| resolves_by_dns(s))
            .flat_map(|s| s.dns_endpoints.iter().map(|e| (e.address.as_str(), ())))
            .collect();
        names.retain(|name, _| wanted.contains_key(name.as_str()));
        for name in wanted.keys() {
            if !names.contains_key(*name) {
                names.insert((*name).to_owned(), start(name));
            }
        }
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = services;
    }

    /// The ServiceEntry facts of `host` (its resolution, and the names to resolve for DNS).
    pub fn external(&self, host: &str) -> Option<Arc<ExternalService>> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host)
            .cloned()
    }

    /// The cached answer for `name` (`None`: not answered yet, or not a name of the config).
    fn answer(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        let name = names.get(name)?;
        name.answer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

/// Starts resolving `name` in the background (no-op outside an async runtime: the name then
/// never gets an answer, which only unit tests of the config handling see).
fn start(name: &str) -> Arc<Name> {
    let state = Arc::new(Name {
        answer: RwLock::new(None),
        task: RwLock::new(None),
    });
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        warn!(name, "no async runtime: DNS name will not be resolved");
        return state;
    };
    let task = runtime.spawn(refresh(name.to_owned(), Arc::downgrade(&state)));
    *state.task.write().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    state
}

/// Looks `name` up until its state is dropped: every [`REFRESH`] once answered, sooner until
/// then. Logs every change of the answer and every failure.
async fn refresh(name: String, state: Weak<Name>) {
    loop {
        let looked_up = lookup(&name).await;
        let Some(state) = state.upgrade() else { return };
        let wait = record(&name, &state, looked_up);
        drop(state);
        tokio::time::sleep(wait).await;
    }
}

/// Keeps a lookup's answer (the last good one on failure); returns when to look up again.
fn record(name: &str, state: &Name, looked_up: std::io::Result<Vec<IpAddr>>) -> Duration {
    let mut answer = state.answer.write().unwrap_or_else(PoisonError::into_inner);
    match looked_up {
        Ok(addresses) if answer.as_deref() != Some(&addresses[..]) => {
            info!(name, ?addresses, "DNS answer changed");
            *answer = Some(addresses.into());
        }
        Ok(_) => {}
        Err(e) if answer.is_some() => {
            warn!(name, error = %e, "DNS lookup failed; keeping the last answer");
        }
        Err(e) => warn!(name, error = %e, "DNS lookup failed; cluster has no endpoint"),
    }
    if answer.is_some() {
        REFRESH
    } else {
        RETRY_UNANSWERED
    }
}

/// The addresses of `name`, sorted and deduplicated (so a reordered answer is no change).
async fn lookup(name: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = tokio::net::lookup_host((name, 0))
        .await?
        .map(|a| a.ip())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    if addresses.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{name} has no address"),
        ));
    }
    Ok(addresses)
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
        let failed = || Err(std::io::Error::other("resolver timed out"));
        let answer = || {
            state
                .answer
                .read()
                .unwrap()
                .as_deref()
                .map(<[IpAddr]>::to_vec)
        };
        assert_eq!(record("n", &state, failed()), RETRY_UNANSWERED);
        assert_eq!(answer(), None);
        assert_eq!(record("n", &state, Ok(vec![ip("10.0.0.1")])), REFRESH);
        assert_eq!(record("n", &state, failed()), REFRESH);
        assert_eq!(answer(), Some(vec![ip("10.0.0.1")]));
        assert_eq!(record("n", &state, Ok(vec![ip("10.0.0.2")])), REFRESH);
        assert_eq!(answer(), Some(vec![ip("10.0.0.2")]));
    }

    #[tokio::test]
    async fn names_are_resolved_in_the_background_and_dropped_with_the_config() {
        let config = |host: &str, names: &[&str]| {
            let mut config = ProxyConfig::default();
            config.traffic.external_services = vec![ExternalService {
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
            }];
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
