//! The single install manifest (`manifests/operator.yaml`), generated from the Rust types so the
//! CRD schemas can never drift from the code: Namespace, CRDs, ServiceAccount, RBAC, Service and
//! the operator Deployment. `make manifests` writes it; CI diffs it.

use crate::env::{field_env, restricted_security_context};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, Namespace, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResourceExt;
use serde::Serialize;
use std::collections::BTreeMap;
use trellis_api::networking::{
    self, DestinationRule, NETWORKING_GROUP, ServiceEntry, VirtualService,
};
use trellis_api::security::{self, SECURITY_EXTRA_VERSIONS, SECURITY_GROUP};
use trellis_api::{AuthorizationPolicy, Mesh, PeerAuthentication, RequestAuthentication};
use trellis_config::wellknown::{
    CONTROL_PLANE_PORT, INJECT_LABEL, OPERATOR_NAME, OPERATOR_NAMESPACE, ROOT_CERT_CONFIGMAP,
    WEBHOOK_PORT,
};

use trellis_config::version;

use crate::controller::CA_SECRET;
use crate::{cni, injector, leader, validation};

/// Port of the operator's own `/metrics`, `/healthz` and `/readyz`.
pub const HEALTH_PORT: u16 = 8080;

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            OPERATOR_NAME.to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "trellis".to_owned()),
    ])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| Some(items.iter().map(|s| (*s).to_owned()).collect());
    PolicyRule {
        api_groups: strings(groups),
        resources: strings(resources).unwrap_or_default().into(),
        verbs: strings(verbs).unwrap_or_default(),
        ..PolicyRule::default()
    }
}

/// A rule for the objects named `names` only. `create` may be among `verbs` for objects the
/// operator writes with server-side apply: the API server authorizes an apply that creates its
/// object as `create` of that name, while a plain `POST` carries no name and so is never allowed
/// by a named grant.
fn named_rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        resource_names: Some(names.iter().map(|s| (*s).to_owned()).collect()),
        ..rule(groups, resources, verbs)
    }
}

const READ: &[&str] = &["get", "list", "watch"];
/// What server-side apply of one named object needs.
const APPLY: &[&str] = &["create", "patch"];

/// The operator's cluster-wide rights: reading what it compiles into proxy config, and writing
/// only objects it owns, by name. No Secrets, no RBAC objects, no `escalate`, `bind` or
/// `impersonate`, no wildcard.
fn cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(OPERATOR_NAME, None),
        rules: Some(vec![
            rule(&["trellis.dev"], &["meshes"], READ),
            rule(&["trellis.dev"], &["meshes/status"], &["patch"]),
            // Pods: discovery, the proxies' identity checks, the CNI repair loop's watch.
            rule(&[""], &["services", "namespaces", "pods"], READ),
            rule(&["discovery.k8s.io"], &["endpointslices"], READ),
            rule(&[SECURITY_GROUP], &["peerauthentications"], READ),
            rule(&[SECURITY_GROUP], &["authorizationpolicies"], READ),
            rule(&[SECURITY_GROUP], &["requestauthentications"], READ),
            // Compiled into routes; the validating webhook reads a namespace's DestinationRules.
            rule(
                &[NETWORKING_GROUP],
                &["virtualservices", "destinationrules", "serviceentries"],
                READ,
            ),
            // The trust bundle proxies bootstrap with, in each namespace where a pod may be
            // injected: which namespaces that is changes with every pod's labels, and RBAC cannot
            // select namespaces by label, so the grant is by name in every namespace.
            named_rule(&[""], &["configmaps"], &[ROOT_CERT_CONFIGMAP], APPLY),
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            named_rule(
                &["admissionregistration.k8s.io"],
                &["mutatingwebhookconfigurations"],
                &[injector::WEBHOOK_CONFIGURATION],
                APPLY,
            ),
            named_rule(
                &["admissionregistration.k8s.io"],
                &["validatingwebhookconfigurations"],
                &[validation::WEBHOOK_CONFIGURATION],
                APPLY,
            ),
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
        ]),
        ..ClusterRole::default()
    }
}

/// Name of the ClusterRole (and its binding) that lets the operator delete pods.
pub const CNI_REPAIR_ROLE: &str = "trellis-operator-cni-repair";

/// Pod deletion, for the CNI repair loop alone (it deletes meshed pods that started before the
/// plugin was in place, so their controller recreates them captured). RBAC cannot narrow a
/// delete to pods by label or owner, nor to namespaces chosen at run time, so it is its own
/// ClusterRole: a cluster that never uses `interception: cni` may delete the binding, and the
/// repair loop (which has nothing to repair there) would only count failures.
fn cni_repair_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(CNI_REPAIR_ROLE, None),
        rules: Some(vec![rule(&[""], &["pods"], &["delete"])]),
        ..ClusterRole::default()
    }
}

/// Rights in the operator's own namespace: its CA Secret (created once, then rotated in place;
/// `get` of any Secret there for a user's `caSecret`), its leader Lease and the CNI installer
/// DaemonSet. `create` by `POST` cannot be limited by name, so it is granted here only.
fn namespace_role() -> Role {
    Role {
        metadata: meta(OPERATOR_NAME, Some(OPERATOR_NAMESPACE)),
        rules: Some(vec![
            rule(&[""], &["secrets"], &["get", "create"]),
            named_rule(&[""], &["secrets"], &[CA_SECRET], &["update"]),
            rule(&["coordination.k8s.io"], &["leases"], &["create"]),
            named_rule(
                &["coordination.k8s.io"],
                &["leases"],
                &[leader::LEASE_NAME],
                &["get", "update"],
            ),
            named_rule(
                &["apps"],
                &["daemonsets"],
                &[cni::DAEMONSET],
                &["get", "create", "patch", "delete"],
            ),
        ]),
    }
}

/// The CNI plugin reads the pod it is asked to capture, nothing else.
fn cni_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(crate::cni::SERVICE_ACCOUNT, None),
        rules: Some(vec![rule(&[""], &["pods"], &["get"])]),
        ..ClusterRole::default()
    }
}

fn subject() -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: OPERATOR_NAME.to_owned(),
        namespace: Some(OPERATOR_NAMESPACE.to_owned()),
        ..Subject::default()
    }
}

/// Binds the ClusterRole `name` to the operator's ServiceAccount.
fn cluster_role_binding(name: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(name, None),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(vec![subject()]),
    }
}

fn service() -> Service {
    let port = |name: &str, port: u16, target: u16| ServicePort {
        name: Some(name.to_owned()),
        port: port.into(),
        target_port: Some(IntOrString::Int(target.into())),
        ..ServicePort::default()
    };
    Service {
        metadata: meta(OPERATOR_NAME, Some(OPERATOR_NAMESPACE)),
        spec: Some(ServiceSpec {
            selector: Some(labels()),
            ports: Some(vec![
                port("https-discovery", CONTROL_PLANE_PORT, CONTROL_PLANE_PORT),
                port("https-webhook", 443, WEBHOOK_PORT),
                port("http-metrics", HEALTH_PORT, HEALTH_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn deployment(image_registry: &str) -> Deployment {
    let http_probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(HEALTH_PORT.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let container_port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port.into(),
        ..ContainerPort::default()
    };
    Deployment {
        metadata: meta(OPERATOR_NAME, Some(OPERATOR_NAMESPACE)),
        spec: DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(OPERATOR_NAME.to_owned()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "operator".to_owned(),
                        image: Some(format!("{image_registry}/operator:{}", version::current())),
                        image_pull_policy: Some("IfNotPresent".to_owned()),
                        args: Some(vec!["run".to_owned()]),
                        env: Some(vec![
                            field_env("POD_NAME", "metadata.name"),
                            field_env("POD_NAMESPACE", "metadata.namespace"),
                            EnvVar {
                                name: "RUST_LOG".to_owned(),
                                value: Some("info".to_owned()),
                                ..EnvVar::default()
                            },
                        ]),
                        ports: Some(vec![
                            container_port("https-discovery", CONTROL_PLANE_PORT),
                            container_port("https-webhook", WEBHOOK_PORT),
                            container_port("http-metrics", HEALTH_PORT),
                        ]),
                        readiness_probe: Some(http_probe("/readyz")),
                        liveness_probe: Some(Probe {
                            initial_delay_seconds: Some(10),
                            ..http_probe("/healthz")
                        }),
                        security_context: Some(restricted_security_context(None)),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

/// `PeerAuthentication` (security.istio.io): `v1` stored, `v1beta1` served with the same schema.
fn peer_authentication_crd() -> CustomResourceDefinition {
    with_extra_versions(security::published_crd::<PeerAuthentication>())
}

/// `RequestAuthentication` (security.istio.io): `v1` stored, `v1beta1` served with the same
/// schema.
fn request_authentication_crd() -> CustomResourceDefinition {
    with_extra_versions(security::published_crd::<RequestAuthentication>())
}

/// `AuthorizationPolicy` (security.istio.io): `v1` stored, `v1beta1` served with the same schema.
fn authorization_policy_crd() -> CustomResourceDefinition {
    with_extra_versions(security::published_crd::<AuthorizationPolicy>())
}

/// Adds [`SECURITY_EXTRA_VERSIONS`] (Istio's security versions) to a `v1` CRD. The schemas are
/// identical, so the API server converts between them itself (strategy `None`).
fn with_extra_versions(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let stored = crd.spec.versions[0].clone();
    for name in SECURITY_EXTRA_VERSIONS {
        let mut version = stored.clone();
        version.name = (*name).to_owned();
        version.served = true;
        version.storage = false;
        crd.spec.versions.push(version);
    }
    crd.spec.conversion = Some(CustomResourceConversion {
        strategy: "None".to_owned(),
        webhook: None,
    });
    crd
}

/// The operator's namespace, labelled so that no injection webhook selects it even on servers
/// that do not label namespaces with their name (before 1.21): pods there never wait for the
/// operator's own webhook.
fn operator_namespace() -> Namespace {
    let mut metadata = meta(OPERATOR_NAMESPACE, None);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECT_LABEL.to_owned(), "disabled".to_owned());
    Namespace {
        metadata,
        ..Namespace::default()
    }
}

/// The Mesh CRD with `image_registry` as the default of `spec.proxy.imageRegistry`, so a Mesh
/// that names no registry pulls its data plane from where the operator itself was pulled.
fn mesh_crd(image_registry: &str) -> serde_json::Value {
    let mut crd = serde_json::to_value(Mesh::crd()).expect("the Mesh CRD always serializes");
    for version in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
        let proxy =
            &mut version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["proxy"];
        proxy["default"]["imageRegistry"] = image_registry.into();
        proxy["properties"]["imageRegistry"]["default"] = image_registry.into();
    }
    crd
}

/// Whether `registry` can prefix an image reference: `host[:port][/path]`, no scheme, no tag.
pub fn valid_image_registry(registry: &str) -> bool {
    let mut parts = registry.split('/');
    let host = parts.next().unwrap_or_default();
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    let path_ok = parts.all(|part| {
        !part.is_empty()
            && part.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    });
    host_ok && path_ok
}

/// Every object of the install manifest, in apply order, its images pulled from `image_registry`.
pub fn objects(image_registry: &str) -> Vec<serde_json::Value> {
    fn value(object: impl Serialize) -> serde_json::Value {
        serde_json::to_value(object).expect("manifest objects always serialize")
    }
    vec![
        value(operator_namespace()),
        mesh_crd(image_registry),
        value(peer_authentication_crd()),
        value(request_authentication_crd()),
        value(authorization_policy_crd()),
        // Istio's traffic resources: v1 stored, v1beta1 and v1alpha3 served with one schema.
        value(networking::networking_crd::<VirtualService>()),
        value(networking::networking_crd::<DestinationRule>()),
        value(networking::networking_crd::<ServiceEntry>()),
        value(ServiceAccount {
            metadata: meta(OPERATOR_NAME, Some(OPERATOR_NAMESPACE)),
            ..ServiceAccount::default()
        }),
        value(cluster_role()),
        value(cluster_role_binding(OPERATOR_NAME)),
        value(cni_repair_cluster_role()),
        value(cluster_role_binding(CNI_REPAIR_ROLE)),
        value(namespace_role()),
        value(RoleBinding {
            metadata: meta(OPERATOR_NAME, Some(OPERATOR_NAMESPACE)),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "Role".to_owned(),
                name: OPERATOR_NAME.to_owned(),
            },
            subjects: Some(vec![subject()]),
        }),
        value(service()),
        value(deployment(image_registry)),
        value(ServiceAccount {
            metadata: meta(crate::cni::SERVICE_ACCOUNT, Some(OPERATOR_NAMESPACE)),
            ..ServiceAccount::default()
        }),
        value(cni_cluster_role()),
        value(ClusterRoleBinding {
            metadata: meta(crate::cni::SERVICE_ACCOUNT, None),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "ClusterRole".to_owned(),
                name: crate::cni::SERVICE_ACCOUNT.to_owned(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: crate::cni::SERVICE_ACCOUNT.to_owned(),
                namespace: Some(OPERATOR_NAMESPACE.to_owned()),
                ..Subject::default()
            }]),
        }),
    ]
}

/// The manifest as multi-document YAML.
pub fn render(image_registry: &str) -> String {
    let mut out = String::from(
        "# Generated by `trellis-operator manifests` (make manifests). Do not edit by hand.\n",
    );
    for object in objects(image_registry) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object).expect("JSON values always render as YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::wellknown::DEFAULT_IMAGE_REGISTRY;

    #[test]
    fn the_image_registry_names_the_operator_image_and_the_data_plane_default() {
        let registry = "127.0.0.1:5001/team/trellis";
        let rendered = render(registry);
        assert!(rendered.contains(&format!(
            "image: {registry}/operator:{}",
            version::current()
        )));
        assert_eq!(
            rendered
                .matches(&format!("imageRegistry: {registry}"))
                .count(),
            1,
            "the proxy object's default"
        );
        assert_eq!(rendered.matches(&format!("default: {registry}")).count(), 1);
        assert!(!rendered.contains(DEFAULT_IMAGE_REGISTRY));
        let proxy_default = mesh_crd(registry)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            ["properties"]["spec"]["properties"]["proxy"]["default"]
            .clone();
        let defaulted: trellis_api::MeshSpec =
            serde_json::from_value(serde_json::json!({"version": "1", "proxy": proxy_default}))
                .unwrap();
        assert_eq!(defaulted.proxy.image_registry, registry);
    }

    #[test]
    fn image_registries_are_repository_prefixes() {
        for good in [
            "trellis.local",
            "127.0.0.1:5000/x",
            "registry.example.com/a/b-c_d.e",
        ] {
            assert!(valid_image_registry(good), "{good}");
        }
        for bad in [
            "",
            "http://r.example",
            "r.example/",
            "r.example/A",
            "r.example//x",
            "r x",
        ] {
            assert!(!valid_image_registry(bad), "{bad}");
        }
    }

    #[test]
    fn manifest_holds_every_install_object_once() {
        let kinds: Vec<String> = objects(DEFAULT_IMAGE_REGISTRY)
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Service",
                "Deployment",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding"
            ]
        );
        let rendered = render(DEFAULT_IMAGE_REGISTRY);
        assert!(rendered.contains(&format!(
            "image: trellis.local/operator:{}",
            version::current()
        )));
        assert_eq!(
            rendered.lines().filter(|l| *l == "---").count(),
            kinds.len()
        );
    }

    /// Whether `rules` allow `verb` on `group`/`resource` (named `name`, when the request names
    /// one): RBAC's own reading, where a rule with resourceNames never matches an unnamed request.
    fn allows(
        rules: &[PolicyRule],
        group: &str,
        resource: &str,
        verb: &str,
        name: Option<&str>,
    ) -> bool {
        rules.iter().any(|r| {
            let has = |list: &Option<Vec<String>>, item: &str| {
                list.iter().flatten().any(|x| x == item || x == "*")
            };
            has(&r.api_groups, group)
                && has(&r.resources, resource)
                && r.verbs.iter().any(|v| v == verb || v == "*")
                && match (&r.resource_names, name) {
                    (None, _) => true,
                    (Some(names), _) if names.is_empty() => true,
                    (Some(names), Some(name)) => names.iter().any(|n| n == name),
                    (Some(_), None) => false,
                }
        })
    }

    #[test]
    fn the_operator_writes_only_what_it_owns_and_cannot_escalate() {
        let cluster = cluster_role().rules.unwrap();
        let namespaced = namespace_role().rules.unwrap();
        let repair = cni_repair_cluster_role().rules.unwrap();
        for rule in cluster.iter().chain(&namespaced).chain(&repair) {
            let everything = [&rule.api_groups, &rule.resources, &Some(rule.verbs.clone())];
            assert!(
                everything
                    .iter()
                    .all(|l| !l.iter().flatten().any(|x| x == "*")),
                "no wildcard: {rule:?}"
            );
            for verb in ["escalate", "bind", "impersonate", "deletecollection"] {
                assert!(!rule.verbs.iter().any(|v| v == verb), "{verb}: {rule:?}");
            }
            assert!(
                !rule
                    .api_groups
                    .iter()
                    .flatten()
                    .any(|g| g == "rbac.authorization.k8s.io"),
                "no RBAC objects: {rule:?}"
            );
        }
        let writes = ["create", "update", "patch", "delete"];
        // ConfigMaps: the trust bundle, by name, in any namespace; nothing else, no POST.
        for verb in ["create", "patch"] {
            assert!(
                allows(&cluster, "", "configmaps", verb, Some(ROOT_CERT_CONFIGMAP)),
                "{verb}"
            );
        }
        for verb in writes {
            assert!(
                !allows(&cluster, "", "configmaps", verb, Some("coredns")),
                "{verb}"
            );
            assert!(
                !allows(&cluster, "", "configmaps", verb, None),
                "{verb} without a name"
            );
        }
        assert!(!allows(&cluster, "", "configmaps", "get", Some("coredns")));
        // Webhook configurations: our two, each only under its own kind.
        for (resource, ours, other) in [
            (
                "mutatingwebhookconfigurations",
                injector::WEBHOOK_CONFIGURATION,
                validation::WEBHOOK_CONFIGURATION,
            ),
            (
                "validatingwebhookconfigurations",
                validation::WEBHOOK_CONFIGURATION,
                injector::WEBHOOK_CONFIGURATION,
            ),
        ] {
            let group = "admissionregistration.k8s.io";
            assert!(
                allows(&cluster, group, resource, "patch", Some(ours)),
                "{resource}"
            );
            for verb in writes {
                assert!(
                    !allows(&cluster, group, resource, verb, Some(other)),
                    "{resource} {verb}"
                );
                assert!(!allows(
                    &cluster,
                    group,
                    resource,
                    verb,
                    Some("istio-sidecar-injector")
                ));
                assert!(
                    !allows(&cluster, group, resource, verb, None),
                    "{resource} {verb}"
                );
            }
        }
        // Secrets: none cluster-wide; in our namespace created, read, and only ours rewritten.
        for verb in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            assert!(
                !allows(&cluster, "", "secrets", verb, Some(CA_SECRET)),
                "{verb}"
            );
        }
        assert!(allows(
            &namespaced,
            "",
            "secrets",
            "update",
            Some(CA_SECRET)
        ));
        assert!(!allows(&namespaced, "", "secrets", "update", Some("other")));
        assert!(!allows(&namespaced, "", "secrets", "list", None));
        assert!(!allows(
            &namespaced,
            "",
            "secrets",
            "delete",
            Some(CA_SECRET)
        ));
        // Pods: read everywhere, deleted only through the CNI repair role, never written.
        assert!(!allows(&cluster, "", "pods", "delete", Some("p")));
        assert!(allows(&repair, "", "pods", "delete", Some("p")));
        for verb in ["create", "update", "patch"] {
            assert!(!allows(
                &cluster.iter().chain(&repair).cloned().collect::<Vec<_>>(),
                "",
                "pods",
                verb,
                Some("p")
            ));
        }
        // The Mesh: read, and only its status written.
        assert!(allows(
            &cluster,
            "trellis.dev",
            "meshes/status",
            "patch",
            Some("default")
        ));
        for verb in writes {
            assert!(
                !allows(&cluster, "trellis.dev", "meshes", verb, Some("default")),
                "{verb}"
            );
        }
    }

    #[test]
    fn request_authentication_serves_v1_and_v1beta1_and_the_operator_may_read_it() {
        let crd = serde_json::to_value(request_authentication_crd()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "requestauthentications.security.istio.io"
        );
        let versions: Vec<_> = crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].clone(), v["served"].clone()))
            .collect();
        assert_eq!(
            versions,
            [("v1".into(), true.into()), ("v1beta1".into(), true.into())]
        );
        assert!(objects(DEFAULT_IMAGE_REGISTRY).contains(&crd));
        let rules = serde_json::to_value(cluster_role()).unwrap()["rules"].clone();
        let reads = rules.as_array().unwrap().iter().any(|r| {
            r["resources"] == serde_json::json!(["requestauthentications"])
                && r["verbs"] == serde_json::json!(READ)
        });
        assert!(reads, "{rules}");
    }

    #[test]
    fn authorization_policy_serves_v1_and_v1beta1_and_the_operator_may_read_it() {
        let crd = serde_json::to_value(authorization_policy_crd()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "authorizationpolicies.security.istio.io"
        );
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let names: Vec<_> = versions
            .iter()
            .map(|v| (v["name"].clone(), v["storage"].clone()))
            .collect();
        assert_eq!(
            names,
            [("v1".into(), true.into()), ("v1beta1".into(), false.into())]
        );
        assert_eq!(versions[0]["schema"], versions[1]["schema"]);
        let rules = serde_json::to_value(cluster_role()).unwrap()["rules"].clone();
        let allowed = |resource: &str, verb: &str| {
            rules.as_array().unwrap().iter().any(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == resource)
                    && r["verbs"].as_array().unwrap().iter().any(|x| x == verb)
            })
        };
        for verb in ["list", "watch"] {
            assert!(allowed("authorizationpolicies", verb), "{verb}");
        }
        assert!(allowed("events", "create"), "Unsupported events");
    }

    #[test]
    fn networking_crds_are_installed_and_the_operator_may_read_them() {
        let names: Vec<_> = objects(DEFAULT_IMAGE_REGISTRY)
            .iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .filter(|o| o["spec"]["group"] == NETWORKING_GROUP)
            .map(|o| {
                let versions: Vec<_> = o["spec"]["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["name"].as_str().unwrap().to_owned())
                    .collect();
                (o["metadata"]["name"].as_str().unwrap().to_owned(), versions)
            })
            .collect();
        let versions = ["v1", "v1beta1", "v1alpha3"].map(str::to_owned).to_vec();
        assert_eq!(
            names,
            [
                (
                    "virtualservices.networking.istio.io".to_owned(),
                    versions.clone()
                ),
                (
                    "destinationrules.networking.istio.io".to_owned(),
                    versions.clone()
                ),
                ("serviceentries.networking.istio.io".to_owned(), versions),
            ]
        );
        let rules = serde_json::to_value(cluster_role()).unwrap()["rules"].clone();
        let rules = rules.as_array().unwrap();
        assert!(
            rules.iter().any(|r| {
                r["apiGroups"] == serde_json::json!([NETWORKING_GROUP])
                    && r["resources"]
                        == serde_json::json!([
                            "virtualservices",
                            "destinationrules",
                            "serviceentries"
                        ])
                    && r["verbs"] == serde_json::json!(["get", "list", "watch"])
            }),
            "the operator may list and watch the traffic resources"
        );
        assert!(
            rules.iter().any(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "validatingwebhookconfigurations")
                    && r["verbs"].as_array().unwrap().iter().any(|x| x == "patch")
            }),
            "the operator may apply its ValidatingWebhookConfiguration"
        );
    }

    #[test]
    fn peer_authentication_serves_v1_and_v1beta1_with_one_schema() {
        let crd = serde_json::to_value(peer_authentication_crd()).unwrap();
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let summary: Vec<_> = versions
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap(),
                    v["served"].clone(),
                    v["storage"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("v1", true.into(), true.into()),
                ("v1beta1", true.into(), false.into())
            ]
        );
        assert_eq!(versions[0]["schema"], versions[1]["schema"]);
        assert_eq!(crd["spec"]["conversion"]["strategy"], "None");
        let rules = serde_json::to_value(cluster_role()).unwrap()["rules"].clone();
        assert!(
            rules.as_array().unwrap().iter().any(|r| {
                r["apiGroups"] == serde_json::json!(["security.istio.io"])
                    && r["resources"] == serde_json::json!(["peerauthentications"])
                    && r["verbs"] == serde_json::json!(["get", "list", "watch"])
            }),
            "the operator may read PeerAuthentications"
        );
    }
}
