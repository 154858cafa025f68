//! What the config knows about a destination address: the service behind a VIP or endpoint
//! address, whether `outboundTrafficPolicy` lets a connection to it through, and which endpoint
//! a connection to a VIP goes to (round robin over the ready endpoints, per service port).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use trellis_api::config::{Endpoint, ProxyConfig, Service, ServicePort};
use trellis_api::mesh::OutboundTrafficMode;

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

/// Whether an outbound connection to `dst` may leave: always under `ALLOW_ANY`, only to a known
/// service VIP or endpoint under `REGISTRY_ONLY`.
pub fn outbound_allowed(config: &ProxyConfig, destination: Option<&Destination<'_>>) -> bool {
    match config.outbound_traffic_policy {
        OutboundTrafficMode::AllowAny => true,
        OutboundTrafficMode::RegistryOnly => destination.is_some(),
    }
}

/// Round robin over the ready endpoints of each service port.
#[derive(Default)]
pub struct RoundRobin {
    /// Next pick per (service hostname, service port).
    next: Mutex<HashMap<(String, u16), usize>>,
}

impl RoundRobin {
    /// The endpoint a connection to `destination` goes to, and its address: the endpoint the
    /// application dialled itself, else the next ready endpoint of the service port. `None`
    /// when the service port has no ready endpoint.
    pub fn pick<'a>(&self, destination: &Destination<'a>) -> Option<(&'a Endpoint, SocketAddr)> {
        let target_port = destination.port.target_port;
        if let Some(endpoint) = destination.endpoint {
            return Some((endpoint, SocketAddr::new(endpoint.address, target_port)));
        }
        let ready: Vec<&Endpoint> = destination
            .service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .collect();
        if ready.is_empty() {
            return None;
        }
        let turn = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let counter = next
                .entry((destination.hostname().to_owned(), destination.port.port))
                .or_default();
            let turn = *counter;
            *counter = counter.wrapping_add(1);
            turn
        };
        let endpoint = ready[turn % ready.len()];
        Some((endpoint, SocketAddr::new(endpoint.address, target_port)))
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

    fn balanced() -> ProxyConfig {
        ProxyConfig::from_json(
            br#"{"version":"1","services":[{
                "hostnames":["ratings.default.svc.cluster.local"],"namespace":"default",
                "vips":["10.96.0.30"],
                "ports":[{"name":"http","port":80,"targetPort":8080,"protocol":"http"},
                         {"name":"grpc","port":81,"targetPort":9090,"protocol":"grpc"}],
                "endpoints":[
                  {"address":"10.244.0.1","ready":true,"meshed":true},
                  {"address":"10.244.0.2","ready":false,"meshed":true},
                  {"address":"10.244.0.3","ready":true,"meshed":false}]},
              {"hostnames":["down.default.svc.cluster.local"],"namespace":"default",
                "vips":["10.96.0.31"],
                "ports":[{"name":"http","port":80,"targetPort":8080,"protocol":"http"}],
                "endpoints":[{"address":"10.244.0.9","ready":false,"meshed":true}]}]}"#,
        )
        .unwrap()
    }

    fn picks(config: &ProxyConfig, balancer: &RoundRobin, dst: &str, n: usize) -> Vec<String> {
        let found = lookup(config, dst.parse().unwrap()).unwrap();
        (0..n)
            .map(|_| {
                balancer
                    .pick(&found)
                    .map_or("none".to_owned(), |(_, addr)| addr.to_string())
            })
            .collect()
    }

    #[test]
    fn round_robin_skips_unready_endpoints_per_service_port() {
        let config = balanced();
        let balancer = RoundRobin::default();
        assert_eq!(
            picks(&config, &balancer, "10.96.0.30:80", 3),
            ["10.244.0.1:8080", "10.244.0.3:8080", "10.244.0.1:8080"]
        );
        // Another port of the same service has its own turn and its own target port.
        assert_eq!(
            picks(&config, &balancer, "10.96.0.30:81", 2),
            ["10.244.0.1:9090", "10.244.0.3:9090"]
        );
        assert_eq!(
            picks(&config, &balancer, "10.96.0.30:80", 1),
            ["10.244.0.3:8080"]
        );
        // No ready endpoint: nothing to connect to.
        assert_eq!(
            picks(&config, &balancer, "10.96.0.31:80", 2),
            ["none", "none"]
        );
        // An endpoint dialled directly is used as is, ready or not.
        assert_eq!(
            picks(&config, &balancer, "10.244.0.2:9090", 2),
            ["10.244.0.2:9090", "10.244.0.2:9090"]
        );
    }
}
