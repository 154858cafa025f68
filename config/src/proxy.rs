//! The compiled proxy configuration: what the discovery server sends to a proxy and what a proxy
//! loads from `--config file.json`. It is the resolved form of cluster state (services with
//! their VIPs and endpoints, the inbound policy, the trust bundle), never the CRDs themselves,
//! so a proxy needs no Kubernetes knowledge.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::mesh::{MtlsMode, OutboundTrafficMode};

/// A full, versioned configuration for one proxy. Snapshots are replaced whole, never patched.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Opaque version; a proxy reports the version it applied.
    pub version: String,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub inbound: InboundPolicy,
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficMode,
    /// PEM roots a peer certificate must chain to.
    #[serde(default)]
    pub trust_bundle: Vec<String>,
    /// Routes, clusters and ServiceEntry facts (VirtualService, DestinationRule, ServiceEntry).
    #[serde(
        default,
        skip_serializing_if = "crate::traffic::TrafficConfig::is_empty"
    )]
    pub traffic: crate::traffic::TrafficConfig,
    /// Limits on every listener's downstream connections; applied to connections accepted
    /// after the config arrives.
    #[serde(
        default,
        skip_serializing_if = "crate::limits::ListenerLimits::is_default"
    )]
    pub limits: crate::limits::ListenerLimits,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Fully qualified hostnames (`reviews.default.svc.cluster.local`).
    pub hostnames: Vec<String>,
    pub namespace: String,
    /// Cluster IPs the application dials.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tls,
    #[default]
    Tcp,
}

impl Protocol {
    /// Istio's port-naming convention: `appProtocol` first, else the port name's prefix
    /// (`http-web`, `grpc`, `tcp-db`); anything else is opaque TCP.
    pub fn from_port(name: &str, app_protocol: Option<&str>) -> Self {
        let declared = app_protocol.unwrap_or(name).to_ascii_lowercase();
        let prefix = declared.split('-').next().unwrap_or("");
        match prefix {
            "http" => Self::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Self::Http2,
            "grpc" => Self::Grpc,
            "tls" | "https" => Self::Tls,
            _ => Self::Tcp,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    /// Whether a Trellis sidecar runs beside the endpoint (then the hop uses mutual TLS).
    pub meshed: bool,
    /// SPIFFE identity of the endpoint's workload when meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    /// Target ports on which the endpoint's PeerAuthentication is DISABLE: a sidecar calls them
    /// in plaintext even though the endpoint is meshed (Istio's auto mTLS does the same).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub plaintext_ports: std::collections::BTreeSet<u16>,
}

/// A set of labels: on the wire a JSON object like a `BTreeMap<String, String>`; in memory the
/// pairs sorted by key in one boxed slice. An endpoint usually carries one or two labels, and a
/// B-tree allocates a 544-byte node for even one: in a 10,000-service config the endpoints'
/// label maps were 16 MB, 60 % of the config's heap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|at| &*self.0[at].1)
    }

    /// Whether every `key: value` of `selector` is among these labels.
    pub fn contains_all(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(key, value)| self.get(key) == Some(value.as_str()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    /// A key given twice keeps its last value, as a JSON object decoded into a map does.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut pairs: Vec<(Box<str>, Box<str>)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable: among equal keys the input order stays, so the last one is kept below.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match unique.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => unique.push(pair),
            }
        }
        Self(unique.into_boxed_slice())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Labels;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of label names to values")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InboundPolicy {
    /// Effective peer-authentication mode of the proxy's workload (PeerAuthentication resolved
    /// with Istio's inheritance: workload, then namespace, then mesh-wide, then the Mesh default).
    #[serde(default)]
    pub mtls_mode: PeerAuthenticationMode,
    /// Port-level overrides (`portLevelMtls`), keyed by the workload's container port.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "port_keyed"
    )]
    pub port_mtls: std::collections::BTreeMap<u16, PeerAuthenticationMode>,
    /// The AuthorizationPolicies that apply to the workload (empty: allow everything).
    #[serde(
        default,
        skip_serializing_if = "crate::authz::InboundAuthorization::is_empty"
    )]
    pub authorization: crate::authz::InboundAuthorization,
    /// The RequestAuthentication JWT rules that apply to the workload (empty: no request is
    /// authenticated).
    #[serde(
        default,
        skip_serializing_if = "crate::authn::InboundAuthentication::is_empty"
    )]
    pub authentication: crate::authn::InboundAuthentication,
}

/// JSON object keys are strings; a config inside a tagged [`ControlMessage`] is buffered by serde
/// before it is decoded, and that path does not turn `"8080"` back into a number, so the keys are
/// parsed here.
///
/// [`ControlMessage`]: crate::protocol::ControlMessage
fn port_keyed<'de, D, V>(deserializer: D) -> Result<std::collections::BTreeMap<u16, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    let by_text = std::collections::BTreeMap::<String, V>::deserialize(deserializer)?;
    by_text
        .into_iter()
        .map(|(key, value)| {
            key.parse::<u16>()
                .map(|port| (port, value))
                .map_err(|_| serde::de::Error::custom(format!("{key:?} is not a port number")))
        })
        .collect()
}

impl InboundPolicy {
    /// The mode that applies to a connection for `port`.
    pub fn mode_for(&self, port: u16) -> PeerAuthenticationMode {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls_mode)
    }

    /// Which of `ports` (and of the port-level overrides) take plaintext only.
    pub fn disabled_ports(
        &self,
        ports: &std::collections::BTreeSet<u16>,
    ) -> std::collections::BTreeSet<u16> {
        ports
            .iter()
            .chain(self.port_mtls.keys())
            .copied()
            .filter(|port| self.mode_for(*port) == PeerAuthenticationMode::Disable)
            .collect()
    }
}

/// What an inbound port accepts, as resolved from PeerAuthentication (UNSET never reaches a
/// proxy: it has been replaced by the inherited mode).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthenticationMode {
    /// Mutual TLS from sidecars and plaintext both.
    #[default]
    Permissive,
    /// Mutual TLS only; plaintext is refused at the connection.
    Strict,
    /// Plaintext only: TLS is passed to the application untouched.
    Disable,
}

impl From<MtlsMode> for PeerAuthenticationMode {
    fn from(mode: MtlsMode) -> Self {
        match mode {
            MtlsMode::Permissive => Self::Permissive,
            MtlsMode::Strict => Self::Strict,
        }
    }
}

/// ALPN protocol a sidecar offers when it originates mutual TLS to another sidecar, so the
/// inbound side can tell mesh TLS from an application's own TLS.
pub const MESH_ALPN: &[u8] = b"trellis-mtls";

/// ALPN protocol of HTTP between sidecars: HTTP/2 inside the mutual TLS, multiplexing the
/// requests of many application connections over one connection per endpoint.
pub const MESH_H2_ALPN: &[u8] = b"trellis-h2";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid JSON for the proxy config model: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("service {host}: port {port} has endpoints but no target port")]
    MissingTargetPort { host: String, port: u16 },
    #[error("service {0}: a service needs at least one hostname")]
    NoHostname(String),
    #[error("inbound authorization: {0}")]
    Authorization(#[from] crate::authz::AuthorizationError),
    #[error("inbound authentication: {0}")]
    Authentication(#[from] crate::authn::AuthenticationError),
    #[error("traffic: {0}")]
    Traffic(#[from] crate::traffic::TrafficError),
    #[error("listener limits: {0}")]
    Limits(#[from] crate::limits::LimitsError),
}

impl ProxyConfig {
    /// Decodes and validates a snapshot. A snapshot that fails here must be rejected whole.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let mut config: Self = serde_json::from_slice(bytes)?;
        config.validate()?;
        config.shrink_to_fit();
        Ok(config)
    }

    /// Gives back the spare capacity decoding leaves in the per-service vectors (serde grows
    /// them by doubling): a proxy holds its config for as long as it runs.
    fn shrink_to_fit(&mut self) {
        self.services.shrink_to_fit();
        for service in &mut self.services {
            service.hostnames.shrink_to_fit();
            service.vips.shrink_to_fit();
            service.ports.shrink_to_fit();
            service.endpoints.shrink_to_fit();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for service in &self.services {
            let host = service
                .hostnames
                .first()
                .ok_or_else(|| ConfigError::NoHostname(format!("{:?}", service.vips)))?;
            for port in &service.ports {
                if port.target_port == 0 && !service.endpoints.is_empty() {
                    return Err(ConfigError::MissingTargetPort {
                        host: host.clone(),
                        port: port.port,
                    });
                }
            }
        }
        self.inbound.authorization.validate()?;
        self.inbound.authentication.validate()?;
        self.traffic.validate()?;
        self.limits.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_and_write_as_a_json_object() {
        let labels: Labels =
            serde_json::from_str(r#"{"zone": "a", "app": "web", "version": "v1", "app": "api"}"#)
                .unwrap();
        // Sorted by key; a repeated key keeps its last value, as a map would.
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            [("app", "api"), ("version", "v1"), ("zone", "a")]
        );
        assert_eq!(labels.get("version"), Some("v1"));
        assert_eq!(labels.get("missing"), None);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"api","version":"v1","zone":"a"}"#
        );
        let selector = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(labels.contains_all(&selector(&[])));
        assert!(labels.contains_all(&selector(&[("app", "api"), ("zone", "a")])));
        assert!(!labels.contains_all(&selector(&[("app", "web")])));
        assert!(!labels.contains_all(&selector(&[("region", "eu")])));
        assert_eq!(Labels::from(selector(&[("b", "2"), ("a", "1")])).len(), 2);
        assert!(serde_json::from_str::<Labels>(r#"["app"]"#).is_err());
        assert!(serde_json::from_str::<Labels>(r#"{"app": 1}"#).is_err());
    }

    #[test]
    fn protocol_follows_istio_port_naming() {
        let cases = [
            ("http", None, Protocol::Http),
            ("http-web", None, Protocol::Http),
            ("http2", None, Protocol::Http2),
            ("grpc-api", None, Protocol::Grpc),
            ("tcp-db", None, Protocol::Tcp),
            ("https", None, Protocol::Tls),
            ("web", None, Protocol::Tcp),
            ("web", Some("http"), Protocol::Http),
            ("web", Some("kubernetes.io/h2c"), Protocol::Http2),
            ("HTTP", None, Protocol::Http),
        ];
        for (name, app, expected) in cases {
            assert_eq!(Protocol::from_port(name, app), expected, "{name} {app:?}");
        }
    }

    #[test]
    fn rejects_garbage_and_invalid_snapshots_whole() {
        assert!(ProxyConfig::from_json(b"{not json").is_err());
        assert!(ProxyConfig::from_json(br#"{"version":"1","services":[{"hostnames":[],"namespace":"a","vips":[],"ports":[],"endpoints":[]}]}"#).is_err());
        let ok = ProxyConfig::from_json(br#"{"version":"7"}"#).unwrap();
        assert_eq!(ok.version, "7");
    }
}
