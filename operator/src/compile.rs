//! Compiles cluster state into the proxy config model. Pure: inputs are plain Kubernetes objects
//! and the Mesh spec, output is a [`ProxyConfig`], so every rule is table-tested without a
//! cluster (the way Linkerd's policy controller keeps its index).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::istio::duration;
use trellis_api::istio::host::service_fqdn;
use trellis_api::mesh::{ListenerSettings, MeshSpec};
use trellis_config::SpiffeId;
use trellis_config::limits::{Http2Limits, ListenerLimits};
use trellis_config::proxy::{
    Endpoint, InboundPolicy, Labels, Protocol, ProxyConfig, Service, ServicePort,
};

use crate::injector::TLS_MODE_LABEL;

/// Everything discovery knows, as plain objects.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: Vec<KubeService>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
}

/// Label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The configuration every proxy of the mesh receives. Services are sorted so that the same
/// cluster state always compiles to the same snapshot (equal snapshots are not re-sent).
/// `plaintext_ports` gives, for a meshed pod, the ports its PeerAuthentication sets to DISABLE.
pub fn compile(
    state: &ClusterState,
    mesh: &MeshSpec,
    trust_bundle: &[String],
    plaintext_ports: &dyn Fn(&Pod) -> BTreeSet<u16>,
) -> ProxyConfig {
    let pods: BTreeMap<String, &Pod> = state
        .pods
        .iter()
        .filter_map(|p| {
            let ns = p.metadata.namespace.as_deref()?;
            let name = p.metadata.name.as_deref()?;
            Some((pod_key(ns, name), p))
        })
        .collect();
    let mut services: Vec<Service> = state
        .services
        .iter()
        .filter_map(|svc| compile_service(svc, state, &pods, mesh, plaintext_ports))
        .collect();
    services.sort_by(|a, b| a.hostnames.cmp(&b.hostnames));
    let mut config = ProxyConfig {
        version: String::new(),
        services,
        inbound: InboundPolicy {
            mtls_mode: mesh.mtls.mode.into(),
            ..InboundPolicy::default()
        },
        outbound_traffic_policy: mesh.outbound_traffic_policy.mode,
        trust_bundle: trust_bundle.to_vec(),
        traffic: Default::default(),
        // A spec whose limits do not compile never becomes the mesh state (the controller
        // refuses it as InvalidSpec), so the defaults here are never used in its place.
        limits: listener_limits(&mesh.proxy.listeners).unwrap_or_default(),
    };
    config.version = content_version(&config);
    config
}

/// `spec.proxy.listeners` in the proxy config's terms (durations in milliseconds), each value
/// checked against the range [`ListenerLimits::validate`] accepts. Err: what is wrong, naming
/// the field.
pub fn listener_limits(settings: &ListenerSettings) -> Result<ListenerLimits, String> {
    const FIELD: &str = "spec.proxy.listeners";
    let millis = |text: &str, field: &str| {
        duration::parse(text)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok())
            .ok_or_else(|| format!("{FIELD}.{field}: {text:?} is not a duration"))
    };
    let http2 = &settings.http2;
    let limits = ListenerLimits {
        header_read_timeout_ms: millis(&settings.header_read_timeout, "headerReadTimeout")?,
        idle_timeout_ms: millis(&settings.idle_timeout, "idleTimeout")?,
        max_request_headers_kb: settings.max_request_headers_kb,
        max_request_headers: settings.max_request_headers,
        max_connections: settings.max_connections,
        max_endpoint_connections: settings.max_endpoint_connections,
        http2: Http2Limits {
            max_concurrent_streams: http2.max_concurrent_streams,
            max_pending_accept_reset_streams: http2.max_pending_accept_reset_streams,
            keepalive_interval_ms: http2
                .keepalive_interval
                .as_deref()
                .map(|text| millis(text, "http2.keepaliveInterval"))
                .transpose()?,
            keepalive_timeout_ms: millis(&http2.keepalive_timeout, "http2.keepaliveTimeout")?,
        },
    };
    limits.validate().map_err(|e| {
        let unit = if e.field.ends_with("Timeout") || e.field.ends_with("Interval") {
            " (milliseconds)"
        } else {
            ""
        };
        format!("{FIELD}.{e}{unit}")
    })?;
    Ok(limits)
}

/// A version derived from the content, so every replica and every restart agree on it.
fn content_version(config: &ProxyConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(config)
        .expect("the config model always serializes")
        .hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The snapshot one proxy receives: the mesh-wide snapshot with the proxy's own inbound policy
/// (its PeerAuthentication, resolved). Its version derives from the mesh-wide version and that
/// policy only, so a PeerAuthentication change re-versions just the proxies it affects.
pub fn for_workload(mesh_wide: &ProxyConfig, inbound: InboundPolicy) -> ProxyConfig {
    ProxyConfig {
        version: workload_version(&mesh_wide.version, &inbound),
        inbound,
        ..mesh_wide.clone()
    }
}

/// The version [`for_workload`] gives, computable without building the snapshot.
pub fn workload_version(mesh_version: &str, inbound: &InboundPolicy) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    mesh_version.hash(&mut hasher);
    serde_json::to_string(inbound)
        .expect("the config model always serializes")
        .hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn compile_service(
    svc: &KubeService,
    state: &ClusterState,
    pods: &BTreeMap<String, &Pod>,
    mesh: &MeshSpec,
    plaintext_ports: &dyn Fn(&Pod) -> BTreeSet<u16>,
) -> Option<Service> {
    let name = svc.metadata.name.as_deref()?;
    let namespace = svc.metadata.namespace.as_deref()?;
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let slices: Vec<&EndpointSlice> = state
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| {
            let port_name = p.name.clone().unwrap_or_default();
            // The slice's port of the same name is authoritative (it resolves named targetPorts).
            let target_port = slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|sp| sp.name.clone().unwrap_or_default() == port_name)
                .and_then(|sp| sp.port)
                .or(match &p.target_port {
                    Some(IntOrString::Int(n)) => Some(*n),
                    _ => None,
                })
                .unwrap_or(p.port);
            ServicePort {
                name: port_name.clone(),
                port: u16::try_from(p.port).unwrap_or(0),
                target_port: u16::try_from(target_port).unwrap_or(0),
                protocol: Protocol::from_port(&port_name, p.app_protocol.as_deref()),
            }
        })
        .filter(|p| p.port != 0)
        .collect();
    let mut endpoints = Vec::new();
    for slice in &slices {
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    pods.get(&pod_key(
                        r.namespace.as_deref().unwrap_or(namespace),
                        r.name.as_deref()?,
                    ))
                })
                .copied();
            let meshed = pod.is_some_and(is_meshed);
            let identity = pod.filter(|_| meshed).map(|p| {
                let sa = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                SpiffeId::new(&mesh.trust_domain, namespace, sa).to_string()
            });
            let labels: Labels = pod
                .and_then(|p| p.metadata.labels.as_ref())
                .map(Into::into)
                .unwrap_or_default();
            let plaintext = pod
                .filter(|_| meshed)
                .map(plaintext_ports)
                .unwrap_or_default();
            for address in &ep.addresses {
                let Ok(address) = address.parse() else {
                    continue;
                };
                endpoints.push(Endpoint {
                    address,
                    ready,
                    meshed,
                    identity: identity.clone(),
                    labels: labels.clone(),
                    plaintext_ports: plaintext.clone(),
                });
            }
        }
    }
    endpoints.sort_by_key(|e| e.address);
    endpoints.dedup_by(|a, b| a.address == b.address);
    Some(Service {
        hostnames: vec![
            service_fqdn(name, namespace),
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}"),
        ],
        namespace: namespace.to_owned(),
        vips,
        ports,
        endpoints,
    })
}

/// A pod is meshed when the injector marked it and its proxy container exists.
pub fn is_meshed(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TLS_MODE_LABEL))
        .map(String::as_str)
        == Some("istio")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_plaintext(_: &Pod) -> BTreeSet<u16> {
        BTreeSet::new()
    }

    fn mesh() -> MeshSpec {
        serde_json::from_value(json!({"version": "1"})).unwrap()
    }

    fn listeners(value: serde_json::Value) -> ListenerSettings {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn listener_defaults_compile_to_the_proxy_defaults_and_stay_out_of_the_snapshot() {
        assert_eq!(
            listener_limits(&ListenerSettings::default()),
            Ok(ListenerLimits::default())
        );
        let config = compile(&ClusterState::default(), &mesh(), &[], &no_plaintext);
        assert!(config.limits.is_default());
        let json = serde_json::to_value(&config).unwrap();
        assert!(json.get("limits").is_none(), "{json}");
    }

    #[test]
    fn listener_settings_compile_to_milliseconds() {
        let mut mesh = mesh();
        mesh.proxy.listeners = listeners(json!({
            "headerReadTimeout": "250ms", "idleTimeout": "2m", "maxRequestHeadersKb": 16,
            "maxRequestHeaders": 40, "maxConnections": 100, "maxEndpointConnections": 8,
            "http2": {"maxConcurrentStreams": 50, "maxPendingAcceptResetStreams": 5,
                      "keepaliveInterval": "10s", "keepaliveTimeout": "1.5s"}
        }));
        let config = compile(&ClusterState::default(), &mesh, &[], &no_plaintext);
        let expected = ListenerLimits {
            header_read_timeout_ms: 250,
            idle_timeout_ms: 120_000,
            max_request_headers_kb: 16,
            max_request_headers: 40,
            max_connections: 100,
            max_endpoint_connections: 8,
            http2: Http2Limits {
                max_concurrent_streams: 50,
                max_pending_accept_reset_streams: 5,
                keepalive_interval_ms: Some(10_000),
                keepalive_timeout_ms: 1_500,
            },
        };
        assert_eq!(config.limits, expected);
        // The proxy reads back what the operator sends.
        let bytes = serde_json::to_vec(&config).unwrap();
        assert_eq!(ProxyConfig::from_json(&bytes).unwrap().limits, expected);
    }

    #[test]
    fn bad_listener_settings_are_refused_naming_the_field() {
        for (settings, field) in [
            (
                json!({"idleTimeout": "0s"}),
                "spec.proxy.listeners.idleTimeout",
            ),
            (
                json!({"idleTimeout": "25h"}),
                "spec.proxy.listeners.idleTimeout",
            ),
            (
                json!({"headerReadTimeout": "soon"}),
                "spec.proxy.listeners.headerReadTimeout",
            ),
            (
                json!({"headerReadTimeout": "0.1ms"}),
                "spec.proxy.listeners.headerReadTimeout",
            ),
            (
                json!({"maxRequestHeadersKb": 4}),
                "spec.proxy.listeners.maxRequestHeadersKb",
            ),
            (
                json!({"maxConnections": 0}),
                "spec.proxy.listeners.maxConnections",
            ),
            (
                json!({"http2": {"keepaliveInterval": "2h"}}),
                "spec.proxy.listeners.http2.keepaliveInterval",
            ),
            (
                json!({"http2": {"maxConcurrentStreams": 0}}),
                "spec.proxy.listeners.http2.maxConcurrentStreams",
            ),
        ] {
            let error = listener_limits(&listeners(settings.clone())).unwrap_err();
            assert!(
                error.starts_with(&format!("{field}:")),
                "{settings}: {error}"
            );
        }
    }

    fn service(name: &str, ns: &str, ip: &str, ports: serde_json::Value) -> KubeService {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": ports}
        }))
        .unwrap()
    }

    fn slice(
        svc: &str,
        ns: &str,
        endpoints: serde_json::Value,
        ports: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{svc}-abc"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports
        }))
        .unwrap()
    }

    fn pod(name: &str, ns: &str, sa: &str, meshed: bool) -> Pod {
        let mut labels = json!({"app": name});
        if meshed {
            labels["security.istio.io/tlsMode"] = json!("istio");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"serviceAccountName": sa, "containers": []}
        }))
        .unwrap()
    }

    #[test]
    fn compiles_services_ports_and_endpoints() {
        let state = ClusterState {
            services: vec![
                service("web", "demo", "10.96.0.20", json!([
                    {"name": "http", "port": 80, "targetPort": "http-alt"},
                    {"name": "grpc-api", "port": 9000, "targetPort": 9000},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ])),
                service("headless", "demo", "None", json!([{"name": "tcp", "port": 5432}])),
                serde_json::from_value(json!({"metadata": {"name": "ext", "namespace": "demo"}, "spec": {"type": "ExternalName", "externalName": "example.org"}})).unwrap(),
            ],
            endpoint_slices: vec![slice(
                "web",
                "demo",
                json!([
                    {"addresses": ["10.244.0.7"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}},
                    {"addresses": ["10.244.0.8"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "demo"}},
                    {"addresses": ["10.244.0.9"], "targetRef": {"kind": "Pod", "name": "gone", "namespace": "demo"}}
                ]),
                json!([{"name": "http", "port": 8080}, {"name": "grpc-api", "port": 9000}]),
            )],
            pods: vec![pod("web-1", "demo", "web", true), pod("web-2", "demo", "web", false)],
        };
        let config = compile(&state, &mesh(), &["ROOT".into()], &no_plaintext);
        assert_eq!(
            config.services.len(),
            2,
            "ExternalName is not a mesh service"
        );
        let web = config
            .services
            .iter()
            .find(|s| s.hostnames[0] == "web.demo.svc.cluster.local")
            .unwrap();
        assert_eq!(web.vips, ["10.96.0.20".parse::<IpAddr>().unwrap()]);
        let ports: Vec<_> = web
            .ports
            .iter()
            .map(|p| (p.port, p.target_port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [(80, 8080, Protocol::Http), (9000, 9000, Protocol::Grpc)],
            "UDP dropped, named target resolved"
        );
        let eps: Vec<_> = web
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready, e.meshed, e.identity.clone()))
            .collect();
        assert_eq!(
            eps,
            [
                (
                    "10.244.0.7".into(),
                    true,
                    true,
                    Some("spiffe://cluster.local/ns/demo/sa/web".into())
                ),
                ("10.244.0.8".into(), false, false, None),
                ("10.244.0.9".into(), true, false, None),
            ]
        );
        let headless = config
            .services
            .iter()
            .find(|s| s.hostnames[0].starts_with("headless"))
            .unwrap();
        assert!(headless.vips.is_empty(), "clusterIP None has no VIP");
        assert_eq!(config.trust_bundle, ["ROOT"]);
    }

    #[test]
    fn meshed_endpoints_carry_their_disabled_ports() {
        let state = ClusterState {
            services: vec![service(
                "web",
                "demo",
                "10.96.0.20",
                json!([{"name": "http", "port": 80, "targetPort": 8080}]),
            )],
            endpoint_slices: vec![slice(
                "web",
                "demo",
                json!([
                    {"addresses": ["10.244.0.7"], "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}},
                    {"addresses": ["10.244.0.8"], "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "demo"}}
                ]),
                json!([{"name": "http", "port": 8080}]),
            )],
            pods: vec![
                pod("web-1", "demo", "web", true),
                pod("web-2", "demo", "web", false),
            ],
        };
        let disable_8080 = |_: &Pod| BTreeSet::from([8080]);
        let config = compile(&state, &mesh(), &[], &disable_8080);
        let ports: Vec<_> = config.services[0]
            .endpoints
            .iter()
            .map(|e| e.plaintext_ports.clone())
            .collect();
        assert_eq!(
            ports,
            [BTreeSet::from([8080]), BTreeSet::new()],
            "only meshed endpoints need the hint"
        );
    }

    #[test]
    fn version_is_a_pure_function_of_content() {
        let state = ClusterState {
            services: vec![service(
                "a",
                "x",
                "10.96.0.1",
                json!([{"name": "http", "port": 80}]),
            )],
            ..ClusterState::default()
        };
        let one = compile(&state, &mesh(), &[], &no_plaintext);
        let two = compile(&state, &mesh(), &[], &no_plaintext);
        assert_eq!(one.version, two.version);
        let mut changed = state.clone();
        changed.services.push(service(
            "b",
            "x",
            "10.96.0.2",
            json!([{"name": "http", "port": 80}]),
        ));
        assert_ne!(
            compile(&changed, &mesh(), &[], &no_plaintext).version,
            one.version
        );
    }

    #[test]
    fn workload_snapshot_overlays_inbound_and_versions_both() {
        use trellis_config::proxy::PeerAuthenticationMode;
        let mesh_wide = compile(
            &ClusterState::default(),
            &mesh(),
            &["ROOT".into()],
            &no_plaintext,
        );
        let strict = InboundPolicy {
            mtls_mode: PeerAuthenticationMode::Strict,
            port_mtls: BTreeMap::from([(8080, PeerAuthenticationMode::Disable)]),
            ..InboundPolicy::default()
        };
        let config = for_workload(&mesh_wide, strict.clone());
        assert_eq!(config.inbound, strict);
        assert_eq!(config.trust_bundle, mesh_wide.trust_bundle);
        assert_eq!(
            config.version,
            workload_version(&mesh_wide.version, &strict)
        );
        assert_eq!(
            for_workload(&mesh_wide, strict.clone()).version,
            config.version,
            "same inputs, same version"
        );
        let default = for_workload(&mesh_wide, mesh_wide.inbound.clone());
        assert_ne!(
            default.version, config.version,
            "the inbound policy is versioned"
        );
        let other_mesh = ProxyConfig {
            version: "another".into(),
            ..mesh_wide.clone()
        };
        assert_ne!(
            for_workload(&other_mesh, strict).version,
            config.version,
            "the mesh-wide version is versioned"
        );
    }
}
