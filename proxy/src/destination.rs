//! What the config knows about a destination: the service behind a VIP or endpoint address, or
//! (for a service without addresses, such as a ServiceEntry without `addresses`) behind an HTTP
//! authority or TLS server name on a port; and whether `outboundTrafficPolicy` lets a
//! connection to it through. Which endpoint a connection or request then goes to is
//! `crate::upstream`'s choice.

use std::net::SocketAddr;

use trellis_config::mesh::OutboundTrafficMode;
use trellis_config::proxy::{Endpoint, ProxyConfig, Service, ServicePort};

use crate::host::Authority;

/// A destination address matched against the config.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub service: &'a Service,
    /// The service port the address matched (by `port` for a VIP, `targetPort` for an endpoint).
    pub port: &'a ServicePort,
    /// The endpoint, when the address was an endpoint's rather than a VIP.
    pub endpoint: Option<&'a Endpoint>,
}

impl Destination<'_> {
    /// The service's first hostname (validation guarantees one).
    pub fn hostname(&self) -> &str {
        self.service.hostnames.first().map_or("", String::as_str)
    }
}

/// Finds the service whose VIP:port or endpoint address:port is `dst`.
pub fn lookup(config: &ProxyConfig, dst: SocketAddr) -> Option<Destination<'_>> {
    let by_vip = config.services.iter().find_map(|service| {
        if !service.vips.contains(&dst.ip()) {
            return None;
        }
        let port = service.ports.iter().find(|p| p.port == dst.port())?;
        Some(Destination {
            service,
            port,
            endpoint: None,
        })
    });
    if by_vip.is_some() {
        return by_vip;
    }
    config.services.iter().find_map(|service| {
        let endpoint = service.endpoints.iter().find(|e| e.address == dst.ip())?;
        let port = service.ports.iter().find(|p| p.target_port == dst.port())?;
        Some(Destination {
            service,
            port,
            endpoint: Some(endpoint),
        })
    })
}

/// Finds the service without addresses that names `host` (an HTTP authority or a TLS server
/// name, normalised by [`Authority::parse`]: case, a trailing dot and a port do not matter)
/// and has a port numbered `port`. No address identifies such a service, so Istio matches it
/// by name on the port the application dialled, whatever address the application resolved. An exact hostname beats a wildcard (`*.example.com`), a longer
/// wildcard a shorter one; among equals the config's first.
pub fn lookup_host<'a>(config: &'a ProxyConfig, host: &str, port: u16) -> Option<Destination<'a>> {
    let authority = Authority::parse(host);
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    let mut best: Option<(usize, Destination<'a>)> = None;
    for service in config.services.iter().filter(|s| s.vips.is_empty()) {
        let Some(port) = service.ports.iter().find(|p| p.port == port) else {
            continue;
        };
        let Some(specificity) = service
            .hostnames
            .iter()
            .filter_map(|name| name_matches(name, host))
            .max()
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(found, _)| specificity > *found) {
            let destination = Destination {
                service,
                port,
                endpoint: None,
            };
            best = Some((specificity, destination));
        }
    }
    best.map(|(_, destination)| destination)
}

/// How specifically the service hostname `name` matches `host` (case-insensitively): an exact
/// name above any wildcard, a wildcard by the length of the suffix it requires.
fn name_matches(name: &str, host: &str) -> Option<usize> {
    if name.eq_ignore_ascii_case(host) {
        return Some(usize::MAX);
    }
    let suffix = name.strip_prefix('*')?;
    let at = host.len().checked_sub(suffix.len()).filter(|at| *at > 0)?;
    host.get(at..)
        .filter(|tail| tail.eq_ignore_ascii_case(suffix))
        .map(|_| suffix.len())
}

/// Whether an outbound connection to `dst` may leave: always under `ALLOW_ANY`, only to a known
/// service VIP or endpoint under `REGISTRY_ONLY`.
pub fn outbound_allowed(config: &ProxyConfig, destination: Option<&Destination<'_>>) -> bool {
    match config.outbound_traffic_policy {
        OutboundTrafficMode::AllowAny => true,
        OutboundTrafficMode::RegistryOnly => destination.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: &str) -> ProxyConfig {
        ProxyConfig::from_json(
            format!(
                r#"{{"version":"1","outboundTrafficPolicy":"{policy}","services":[{{
                "hostnames":["reviews.default.svc.cluster.local"],"namespace":"default",
                "vips":["10.96.0.20"],
                "ports":[{{"name":"http","port":9080,"targetPort":8080,"protocol":"http"}}],
                "endpoints":[{{"address":"10.244.0.7","ready":true,"meshed":true,
                  "identity":"spiffe://cluster.local/ns/default/sa/reviews"}}]}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn decide(config: &ProxyConfig, dst: &str) -> (bool, Option<String>) {
        let dst: SocketAddr = dst.parse().unwrap();
        let found = lookup(config, dst);
        (
            outbound_allowed(config, found.as_ref()),
            found.map(|d| d.service.hostnames[0].clone()),
        )
    }

    #[test]
    fn registry_only_admits_service_vips_and_endpoints_only() {
        let registry_only = config("REGISTRY_ONLY");
        let reviews = Some("reviews.default.svc.cluster.local".to_owned());
        assert_eq!(
            decide(&registry_only, "10.96.0.20:9080"),
            (true, reviews.clone())
        );
        assert_eq!(
            decide(&registry_only, "10.244.0.7:8080"),
            (true, reviews.clone())
        );
        assert_eq!(decide(&registry_only, "10.96.0.20:22"), (false, None));
        assert_eq!(decide(&registry_only, "1.1.1.1:443"), (false, None));
        assert_eq!(decide(&registry_only, "10.244.0.7:9999"), (false, None));

        let allow_any = config("ALLOW_ANY");
        assert_eq!(decide(&allow_any, "1.1.1.1:443"), (true, None));
        assert_eq!(decide(&allow_any, "10.96.0.20:9080"), (true, reviews));
    }

    #[test]
    fn an_endpoint_match_carries_its_identity() {
        let config = config("ALLOW_ANY");
        let found = lookup(&config, "10.244.0.7:8080".parse().unwrap()).unwrap();
        assert_eq!(
            found.endpoint.and_then(|e| e.identity.as_deref()),
            Some("spiffe://cluster.local/ns/default/sa/reviews")
        );
    }

    #[test]
    fn hosts_without_addresses_are_found_by_name_on_their_port() {
        let service = |host: &str, vips: &str, port: u16| {
            format!(
                r#"{{"hostnames":["{host}"],"namespace":"egress","vips":[{vips}],
                "ports":[{{"name":"p","port":{port},"targetPort":{port},"protocol":"http"}}],
                "endpoints":[]}}"#
            )
        };
        let services = [
            service("api.example.com", "", 443),
            service("*.example.com", "", 443),
            service("*.eu.example.com", "", 443),
            service("*.example.com", "", 80),
            service("addressed.example.org", r#""10.1.2.3""#, 443),
            service("api.example.com", "", 443),
        ]
        .join(",");
        let config = ProxyConfig::from_json(
            format!(r#"{{"version":"1","services":[{services}]}}"#).as_bytes(),
        )
        .unwrap();
        /// The index of the service found, and its port.
        type Found = Option<(usize, u16)>;
        let cases: [(&str, u16, Found); 13] = [
            ("api.example.com", 443, Some((0, 443))),
            // Case, a port in the authority and a trailing dot do not matter.
            ("API.Example.com:443", 443, Some((0, 443))),
            ("api.example.com.", 443, Some((0, 443))),
            // Wildcards: the longest suffix wins; the bare domain is not under `*.`.
            ("www.example.com", 443, Some((1, 443))),
            ("db.eu.example.com", 443, Some((2, 443))),
            ("example.com", 443, None),
            // The port the application dialled chooses among a host's ports.
            ("www.example.com", 80, Some((3, 80))),
            ("api.example.com", 8443, None),
            // A service with addresses is found by address, never by name.
            ("addressed.example.org", 443, None),
            ("other.test", 443, None),
            ("", 443, None),
            (":443", 443, None),
            ("[::1]:443", 443, None),
        ];
        let index = |found: &Destination<'_>| {
            config
                .services
                .iter()
                .position(|s| std::ptr::eq(s, found.service))
                .unwrap()
        };
        for (host, port, expected) in cases {
            let found = lookup_host(&config, host, port);
            assert_eq!(
                found.map(|d| (index(&d), d.port.port)),
                expected,
                "{host} on {port}"
            );
        }
    }
}
