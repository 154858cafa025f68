//! What the config knows about a destination address: the service behind a VIP or endpoint
//! address, and whether `outboundTrafficPolicy` lets a connection to it through. Which endpoint
//! a connection or request then goes to is `crate::upstream`'s choice.

use std::net::SocketAddr;

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
}
