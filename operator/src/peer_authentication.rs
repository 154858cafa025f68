//! PeerAuthentication resolution with Istio's semantics (`ComposePeerAuthentication` in Istio's
//! pilot). Pure: policies, the root namespace, the workload and the Mesh default in, the
//! workload's [`InboundPolicy`] out.
//!
//! * Levels, narrowest first: workload (a selector matching the pod's labels, in the pod's
//!   namespace), namespace (no selector, in the pod's namespace), mesh (no selector, in the root
//!   namespace, `Mesh.spec.rootNamespace`), then `Mesh.spec.mtls.mode`. A selector without labels
//!   is no selector. A policy with a selector in the root namespace applies nowhere (Istio ignores
//!   it too).
//! * UNSET (or no `mtls`) inherits from the next level out.
//! * Several policies at one level: the oldest wins (`creationTimestamp`, then name).
//! * `portLevelMtls` comes only from the workload-level policy; an UNSET port inherits the
//!   workload's effective mode. Keys are workload ports (the container/target port a connection
//!   arrives on), never Service ports; like Istio, they apply whether or not the pod declares the
//!   port, and keys that are not declared container ports are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use trellis_api::PeerAuthentication;
use trellis_config::proxy::{InboundPolicy, PeerAuthenticationMode};
use trellis_config::wellknown::PROXY_CONTAINER;

/// The workload a proxy serves, as far as PeerAuthentication is concerned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// TCP ports the application containers declare (the proxy's own are left out).
    pub container_ports: BTreeSet<u16>,
}

impl Workload {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        // Native sidecars (restartable init containers) serve traffic like containers do.
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        let container_ports = spec
            .containers
            .iter()
            .chain(sidecars)
            .filter(|c| c.name != PROXY_CONTAINER)
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            container_ports,
        })
    }
}

/// The effective policy of one workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    pub inbound: InboundPolicy,
    /// `portLevelMtls` ports of the deciding policy that the pod does not declare as container
    /// ports. They apply anyway; often they are a Service port written by mistake.
    pub undeclared_ports: Vec<u16>,
}

/// A `portLevelMtls` key as a port: a decimal number in 1..=65535.
pub fn parse_port(key: &str) -> Option<u16> {
    key.parse::<u16>().ok().filter(|port| *port != 0)
}

/// Resolves the workload's inbound policy from `policies` (any set: those outside the workload's
/// namespace and the root namespace are ignored).
pub fn resolve<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
    root_namespace: &str,
    workload: &Workload,
    mesh_default: PeerAuthenticationMode,
) -> Resolution {
    // The deciding policy of each level.
    let (mut mesh, mut namespace, mut selected) = (None, None, None);
    for policy in policies {
        let Some(policy_namespace) = policy.metadata.namespace.as_deref() else {
            continue;
        };
        let in_root = policy_namespace == root_namespace;
        let in_workload_namespace = policy_namespace == workload.namespace;
        let slot = match policy.spec.workload_labels() {
            None if in_root => &mut mesh,
            None if in_workload_namespace => &mut namespace,
            Some(selector)
                if in_workload_namespace && !in_root && is_subset(selector, &workload.labels) =>
            {
                &mut selected
            }
            _ => continue,
        };
        if slot.is_none_or(|current| age_key(policy) < age_key(current)) {
            *slot = Some(policy);
        }
    }

    let mut mode = mesh_default;
    for policy in [mesh, namespace, selected].into_iter().flatten() {
        if let Some(own) = policy.spec.mode() {
            mode = own;
        }
    }
    let port_mtls: BTreeMap<u16, PeerAuthenticationMode> = selected
        .into_iter()
        .flat_map(|policy| &policy.spec.port_level_mtls)
        .filter_map(|(key, mtls)| Some((parse_port(key)?, mtls.mode.resolved().unwrap_or(mode))))
        .collect();
    let undeclared_ports = port_mtls
        .keys()
        .filter(|port| !workload.container_ports.contains(port))
        .copied()
        .collect();
    Resolution {
        inbound: InboundPolicy {
            mtls_mode: mode,
            port_mtls,
            ..InboundPolicy::default()
        },
        undeclared_ports,
    }
}

/// Istio's order within a level: oldest first, then by name. An object without a timestamp
/// (never one from the API server) counts as the newest.
fn age_key(policy: &PeerAuthentication) -> (bool, Option<&k8s_openapi::jiff::Timestamp>, &str) {
    let created = policy.metadata.creation_timestamp.as_ref().map(|t| &t.0);
    (
        created.is_none(),
        created,
        policy.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn is_subset(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// What a schema cannot express (structural schemas on Kubernetes 1.20 have no rules across
/// fields or on map keys). The policy is still accepted and used; the named parts are ignored.
pub fn validate(policy: &PeerAuthentication, root_namespace: &str) -> Vec<String> {
    let spec = &policy.spec;
    let mut warnings = Vec::new();
    match spec.workload_labels() {
        None if !spec.port_level_mtls.is_empty() => warnings.push(
            "portLevelMtls is ignored: it applies only to a policy with a selector, not to a \
             namespace-wide or mesh-wide one"
                .to_owned(),
        ),
        Some(_) if policy.namespace().as_deref() == Some(root_namespace) => warnings.push(format!(
            "the policy is ignored: in the root namespace {root_namespace:?} only policies \
             without a selector apply (mesh-wide)"
        )),
        _ => {}
    }
    for key in spec.port_level_mtls.keys() {
        if parse_port(key).is_none() {
            warnings.push(format!(
                "portLevelMtls key {key:?} is not a port number (1-65535) and is ignored"
            ));
        }
    }
    warnings
}

/// PeerAuthentications grouped by namespace, so a workload's resolution reads only its own
/// namespace and the root namespace.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    by_namespace: BTreeMap<String, Vec<Arc<PeerAuthentication>>>,
}

impl PolicyIndex {
    pub fn new(policies: impl IntoIterator<Item = Arc<PeerAuthentication>>) -> Self {
        let mut by_namespace: BTreeMap<String, Vec<Arc<PeerAuthentication>>> = BTreeMap::new();
        for policy in policies {
            if let Some(namespace) = policy.metadata.namespace.clone() {
                by_namespace.entry(namespace).or_default().push(policy);
            }
        }
        Self { by_namespace }
    }

    pub fn resolve(
        &self,
        root_namespace: &str,
        workload: &Workload,
        mesh_default: PeerAuthenticationMode,
    ) -> Resolution {
        let own = self.by_namespace.get(&workload.namespace);
        let root = (workload.namespace != root_namespace)
            .then(|| self.by_namespace.get(root_namespace))
            .flatten();
        let policies = own.into_iter().chain(root).flatten().map(Arc::as_ref);
        resolve(policies, root_namespace, workload, mesh_default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use trellis_config::proxy::PeerAuthenticationMode::{Disable, Permissive, Strict};

    /// `Mesh.spec.rootNamespace`'s default.
    const ROOT: &str = trellis_api::mesh::DEFAULT_ROOT_NAMESPACE;

    /// `created` is minutes after a fixed epoch, so ties and ages read plainly in the table.
    fn policy(
        namespace: &str,
        name: &str,
        created: u32,
        spec: serde_json::Value,
    ) -> PeerAuthentication {
        serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": format!("2026-01-01T{:02}:{:02}:00Z", created / 60, created % 60),
            },
            "spec": spec,
        }))
        .unwrap()
    }

    fn mode(m: &str) -> serde_json::Value {
        json!({"mtls": {"mode": m}})
    }

    fn selector(app: &str, mtls: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
        spec.as_object_mut()
            .unwrap()
            .extend(mtls.as_object().unwrap().clone());
        spec
    }

    fn web() -> Workload {
        Workload {
            namespace: "demo".into(),
            labels: BTreeMap::from([
                ("app".into(), "web".into()),
                ("version".into(), "v1".into()),
            ]),
            container_ports: BTreeSet::from([8080, 9090]),
        }
    }

    fn inbound(
        mode: PeerAuthenticationMode,
        ports: &[(u16, PeerAuthenticationMode)],
    ) -> InboundPolicy {
        InboundPolicy {
            mtls_mode: mode,
            port_mtls: ports.iter().copied().collect(),
            ..InboundPolicy::default()
        }
    }

    #[test]
    fn resolves_with_istio_semantics() {
        let cases: Vec<(
            &str,
            Vec<PeerAuthentication>,
            PeerAuthenticationMode,
            InboundPolicy,
        )> = vec![
            (
                "no policy: the Mesh default",
                vec![],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "no policy: a STRICT Mesh default",
                vec![],
                Strict,
                inbound(Strict, &[]),
            ),
            (
                "mesh-wide STRICT",
                vec![policy(ROOT, "default", 0, mode("STRICT"))],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "the operator's namespace is not the root namespace: a policy there is not \
                 mesh-wide",
                vec![policy("trellis-system", "default", 0, mode("STRICT"))],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "namespace PERMISSIVE overrides mesh-wide STRICT",
                vec![
                    policy(ROOT, "default", 0, mode("STRICT")),
                    policy("demo", "default", 0, mode("PERMISSIVE")),
                ],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "namespace DISABLE overrides a STRICT Mesh default",
                vec![policy("demo", "default", 0, mode("DISABLE"))],
                Strict,
                inbound(Disable, &[]),
            ),
            (
                "workload PERMISSIVE under namespace STRICT",
                vec![
                    policy("demo", "default", 0, mode("STRICT")),
                    policy("demo", "web", 0, selector("web", mode("PERMISSIVE"))),
                ],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "port-level DISABLE under workload STRICT",
                vec![policy(
                    "demo",
                    "web",
                    0,
                    selector(
                        "web",
                        json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                    ),
                )],
                Permissive,
                inbound(Strict, &[(8080, Disable)]),
            ),
            (
                "UNSET mesh-wide inherits the Mesh default",
                vec![policy(ROOT, "default", 0, mode("UNSET"))],
                Strict,
                inbound(Strict, &[]),
            ),
            (
                "absent mtls at namespace level inherits mesh-wide",
                vec![
                    policy(ROOT, "default", 0, mode("STRICT")),
                    policy("demo", "default", 0, json!({})),
                ],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "UNSET namespace level inherits mesh-wide",
                vec![
                    policy(ROOT, "default", 0, mode("DISABLE")),
                    policy("demo", "default", 0, json!({"mtls": {}})),
                ],
                Strict,
                inbound(Disable, &[]),
            ),
            (
                "UNSET workload inherits the namespace",
                vec![
                    policy(ROOT, "default", 0, mode("PERMISSIVE")),
                    policy("demo", "default", 0, mode("STRICT")),
                    policy("demo", "web", 0, selector("web", mode("UNSET"))),
                ],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "UNSET workload with port-level settings: the workload mode is inherited, ports kept",
                vec![
                    policy("demo", "default", 0, mode("STRICT")),
                    policy(
                        "demo",
                        "web",
                        0,
                        selector(
                            "web",
                            json!({"portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
                        ),
                    ),
                ],
                Permissive,
                inbound(Strict, &[(9090, Permissive)]),
            ),
            (
                "UNSET port inherits the workload's effective mode",
                vec![
                    policy("demo", "default", 0, mode("DISABLE")),
                    policy(
                        "demo",
                        "web",
                        0,
                        selector(
                            "web",
                            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "UNSET"}, "9090": {}}}),
                        ),
                    ),
                ],
                Permissive,
                inbound(Strict, &[(8080, Strict), (9090, Strict)]),
            ),
            (
                "UNSET port under an UNSET workload inherits the namespace",
                vec![
                    policy("demo", "default", 0, mode("DISABLE")),
                    policy(
                        "demo",
                        "web",
                        0,
                        selector("web", json!({"portLevelMtls": {"8080": {}}})),
                    ),
                ],
                Strict,
                inbound(Disable, &[(8080, Disable)]),
            ),
            (
                "mesh-wide tie: the oldest wins",
                vec![
                    policy(ROOT, "newer", 5, mode("PERMISSIVE")),
                    policy(ROOT, "older", 1, mode("STRICT")),
                ],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "namespace tie at the same second: the name decides",
                vec![
                    policy("demo", "b", 3, mode("PERMISSIVE")),
                    policy("demo", "a", 3, mode("DISABLE")),
                ],
                Strict,
                inbound(Disable, &[]),
            ),
            (
                "workload tie: the oldest wins, with its ports only",
                vec![
                    policy(
                        "demo",
                        "web-new",
                        9,
                        selector(
                            "web",
                            json!({"mtls": {"mode": "DISABLE"}, "portLevelMtls": {"9090": {"mode": "DISABLE"}}}),
                        ),
                    ),
                    policy(
                        "demo",
                        "web-old",
                        2,
                        selector(
                            "web",
                            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
                        ),
                    ),
                ],
                Permissive,
                inbound(Strict, &[(8080, Permissive)]),
            ),
            (
                "an oldest UNSET policy still wins its level (and inherits)",
                vec![
                    policy("demo", "old", 1, mode("UNSET")),
                    policy("demo", "new", 2, mode("STRICT")),
                ],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "selector not matching: the namespace level applies",
                vec![
                    policy("demo", "default", 0, mode("STRICT")),
                    policy(
                        "demo",
                        "other",
                        0,
                        selector(
                            "other",
                            json!({"mtls": {"mode": "DISABLE"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                        ),
                    ),
                ],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "selector needs every label",
                vec![policy(
                    "demo",
                    "web-v2",
                    0,
                    json!({"selector": {"matchLabels": {"app": "web", "version": "v2"}}, "mtls": {"mode": "STRICT"}}),
                )],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "empty selector is namespace-wide",
                vec![policy(
                    "demo",
                    "default",
                    0,
                    json!({"selector": {}, "mtls": {"mode": "STRICT"}}),
                )],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "policies in other namespaces are ignored",
                vec![
                    policy("other", "default", 0, mode("STRICT")),
                    policy("other", "web", 0, selector("web", mode("DISABLE"))),
                ],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "a selector policy in the root namespace is ignored",
                vec![policy(ROOT, "web", 0, selector("web", mode("STRICT")))],
                Permissive,
                inbound(Permissive, &[]),
            ),
            (
                "port-level on a namespace-wide policy is ignored",
                vec![policy(
                    "demo",
                    "default",
                    0,
                    json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                )],
                Permissive,
                inbound(Strict, &[]),
            ),
            (
                "port-level on a mesh-wide policy is ignored",
                vec![policy(
                    ROOT,
                    "default",
                    0,
                    json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                )],
                Strict,
                inbound(Strict, &[]),
            ),
            (
                "invalid port keys are skipped",
                vec![policy(
                    "demo",
                    "web",
                    0,
                    selector(
                        "web",
                        json!({"portLevelMtls": {"0": {"mode": "DISABLE"}, "http": {"mode": "DISABLE"}, "70000": {"mode": "DISABLE"}, "8080": {"mode": "DISABLE"}}}),
                    ),
                )],
                Permissive,
                inbound(Permissive, &[(8080, Disable)]),
            ),
        ];
        for (name, policies, default, expected) in cases {
            let resolution = resolve(&policies, ROOT, &web(), default);
            assert_eq!(resolution.inbound, expected, "{name}");
            let index = PolicyIndex::new(policies.into_iter().map(Arc::new));
            assert_eq!(
                index.resolve(ROOT, &web(), default).inbound,
                expected,
                "{name} (indexed)"
            );
        }
    }

    #[test]
    fn workload_in_the_root_namespace_sees_mesh_wide_policies_only() {
        let workload = Workload {
            namespace: ROOT.into(),
            ..web()
        };
        let policies = [
            policy(ROOT, "default", 0, mode("STRICT")),
            policy(ROOT, "web", 0, selector("web", mode("DISABLE"))),
        ];
        assert_eq!(
            resolve(&policies, ROOT, &workload, Permissive).inbound,
            inbound(Strict, &[])
        );
    }

    #[test]
    fn reports_ports_the_pod_does_not_declare() {
        let policies = [policy(
            "demo",
            "web",
            0,
            selector(
                "web",
                json!({"portLevelMtls": {"80": {"mode": "DISABLE"}, "8080": {"mode": "STRICT"}}}),
            ),
        )];
        let resolution = resolve(&policies, ROOT, &web(), Permissive);
        assert_eq!(
            resolution.inbound,
            inbound(Permissive, &[(80, Disable), (8080, Strict)]),
            "keys are applied as written: they are workload ports"
        );
        assert_eq!(resolution.undeclared_ports, [80]);
    }

    #[test]
    fn workload_from_pod_reads_labels_and_application_ports() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
            "spec": {
                "initContainers": [
                    {"name": "trellis-init"},
                    {"name": "log-shipper", "restartPolicy": "Always", "ports": [{"containerPort": 9100}]}
                ],
                "containers": [
                    {"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]},
                    {"name": "trellis-proxy", "ports": [{"containerPort": 15021}]}
                ]
            }
        }))
        .unwrap();
        let workload = Workload::from_pod(&pod).unwrap();
        assert_eq!(workload.namespace, "demo");
        assert_eq!(workload.labels["app"], "web");
        assert_eq!(workload.container_ports, BTreeSet::from([8080, 9100]));
    }

    #[test]
    fn validation_names_what_the_schema_cannot() {
        let cases = [
            (
                policy(
                    "demo",
                    "ok",
                    0,
                    selector("web", json!({"portLevelMtls": {"8080": {}}})),
                ),
                0,
            ),
            (
                policy(
                    "demo",
                    "ns",
                    0,
                    json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                ),
                1,
            ),
            (
                policy(
                    ROOT,
                    "mesh",
                    0,
                    json!({"selector": {}, "portLevelMtls": {"8080": {}}}),
                ),
                1,
            ),
            (
                policy(ROOT, "selected", 0, selector("web", mode("STRICT"))),
                1,
            ),
            (
                policy(
                    "demo",
                    "keys",
                    0,
                    selector(
                        "web",
                        json!({"portLevelMtls": {"0": {}, "web": {}, "443": {}}}),
                    ),
                ),
                2,
            ),
        ];
        for (policy, expected) in cases {
            let warnings = validate(&policy, ROOT);
            assert_eq!(
                warnings.len(),
                expected,
                "{}: {warnings:?}",
                policy.name_any()
            );
        }
        let warnings = validate(
            &policy("demo", "ns", 0, json!({"portLevelMtls": {"8080": {}}})),
            ROOT,
        );
        assert!(
            warnings[0].contains("portLevelMtls is ignored"),
            "{warnings:?}"
        );
    }
}
