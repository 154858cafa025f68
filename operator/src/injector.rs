//! The sidecar injector: a mutating admission webhook for Pods. The pure parts: [`decide`], which
//! pods get a sidecar (Istio's rules: namespace labels, the pod's own label, revisions, and the
//! refusal of pods running as the proxy's uid or gid), and [`inject`], which turns a Pod and the
//! active Mesh into the injected Pod; the webhook answers with the JSON patch between the two.
//! [`webhook_configuration`] builds the MutatingWebhookConfiguration (its caBundle is the mesh
//! root, its selectors Istio's) that the Mesh controller applies.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, Pod, Probe, ProjectedVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::mesh::{Interception, MeshSpec};
use trellis_config::wellknown::{
    CONTROL_PLANE_PORT, EXCLUDE_INBOUND_PORTS_ANNOTATION, EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
    EXCLUDE_OUTBOUND_PORTS_ANNOTATION, INCLUDE_INBOUND_PORTS_ANNOTATION,
    INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION, INCLUDE_OUTBOUND_PORTS_ANNOTATION, INIT_CONTAINER,
    INJECT_LABEL, ISTIO_INJECT_ANNOTATION, ISTIO_INJECTION_LABEL, METRICS_PORT, OPERATOR_NAME,
    PROXY_CONTAINER, PROXY_GID, PROXY_UID, READINESS_PORT, ROOT_CERT_CONFIGMAP, STATUS_ANNOTATION,
    TOKEN_AUDIENCE, VALIDATION_CONTAINER,
};

use crate::env::{field_env, restricted_security_context};

pub const WEBHOOK_CONFIGURATION: &str = "trellis-sidecar-injector";
pub const INJECT_PATH: &str = "/inject";
/// Label carrying the data-plane version, counted by the operator.
pub const PROXY_VERSION_LABEL: &str = "trellis.dev/proxy-version";
/// Istio's label saying the pod accepts mutual TLS from sidecars; discovery reads it.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
pub const TOKEN_VOLUME: &str = "trellis-token";
pub const ROOT_CERT_VOLUME: &str = "trellis-root-cert";
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis/token";
pub const ROOT_CERT_DIR: &str = "/var/run/secrets/trellis/root";

/// Istio's capture annotations, mapped to `trellis-init` flags.
const CAPTURE_ANNOTATIONS: &[(&str, &str)] = &[
    (INCLUDE_INBOUND_PORTS_ANNOTATION, "--include-inbound-ports"),
    (EXCLUDE_INBOUND_PORTS_ANNOTATION, "--exclude-inbound-ports"),
    (
        INCLUDE_OUTBOUND_PORTS_ANNOTATION,
        "--include-outbound-ports",
    ),
    (
        EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
        "--exclude-outbound-ports",
    ),
    (
        INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
        "--include-outbound-ip-ranges",
    ),
    (
        EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
        "--exclude-outbound-ip-ranges",
    ),
];

/// Kubernetes' own namespaces: never injected, and never sent to the injector where the API server
/// labels namespaces with their name (see [`NAMESPACE_NAME_LABEL`]).
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// The label Kubernetes 1.21 and later set, immutably, on every namespace: its name. On 1.20 it
/// does not exist, so selecting on it excludes nothing there (see the webhook configuration).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Istio's control-plane revision label, on a namespace or a pod.
pub const REVISION_LABEL: &str = "istio.io/rev";

/// The one revision Trellis answers to: the name Istio gives its default control plane (and the
/// `default` revision tag), so `istio.io/rev: default` means what it means with Istio.
pub const DEFAULT_REVISION: &str = "default";

/// Namespaces the injector never touches, whatever their labels say.
pub fn is_protected_namespace(namespace: &str, operator_namespace: &str) -> bool {
    namespace == operator_namespace || SYSTEM_NAMESPACES.contains(&namespace)
}

/// What injection needs besides the Pod.
#[derive(Clone, Debug)]
pub struct InjectionParams {
    pub mesh: MeshSpec,
    pub operator_namespace: String,
    /// Kubernetes ≥ 1.29 runs the proxy as a native sidecar (restartable init container).
    pub native_sidecars: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(&'static str),
    /// The pod or its namespace asks for a control-plane revision Trellis is not (anything but
    /// [`DEFAULT_REVISION`]): admitted without a sidecar, as Istio without that revision would,
    /// and said so in a warning and an event rather than silently.
    UnknownRevision(String),
    /// The pod would be injected but cannot be meshed safely; refused with this message.
    Refuse(String),
}

/// What a namespace's labels say about injection, read as Istio's webhook selectors read them.
#[derive(Debug, PartialEq, Eq)]
pub enum NamespaceInjection<'a> {
    /// `trellis.dev/inject` or `istio-injection` is `enabled`: every pod not opted out.
    Enabled,
    /// One of them is set to anything else: no pod, whatever it asks for.
    Disabled,
    /// Neither is set, `istio.io/rev` is: that revision's injector decides.
    Revision(&'a str),
    /// No injection label at all: each pod decides with its own labels.
    Unset,
}

pub fn namespace_injection(labels: &BTreeMap<String, String>) -> NamespaceInjection<'_> {
    let injection: Vec<&str> = [INJECT_LABEL, ISTIO_INJECTION_LABEL]
        .iter()
        .filter_map(|key| labels.get(*key).map(String::as_str))
        .collect();
    if injection.contains(&"enabled") {
        NamespaceInjection::Enabled
    } else if !injection.is_empty() {
        NamespaceInjection::Disabled
    } else if let Some(revision) = labels.get(REVISION_LABEL) {
        NamespaceInjection::Revision(revision)
    } else {
        NamespaceInjection::Unset
    }
}

/// Whether any pod of `namespace` may be injected: where the trust-bundle ConfigMap the proxies
/// mount must exist. Pods opt in one by one, so this is every namespace that does not rule
/// injection out.
pub fn may_inject_in(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    operator_namespace: &str,
) -> bool {
    !is_protected_namespace(namespace, operator_namespace)
        && match namespace_injection(labels) {
            NamespaceInjection::Enabled | NamespaceInjection::Unset => true,
            NamespaceInjection::Disabled => false,
            NamespaceInjection::Revision(revision) => revision == DEFAULT_REVISION,
        }
}

/// The pod's own answer in `sidecar.istio.io/inject` (label, or the older annotation), spelled as
/// Istio accepts it: `true`, `yes`, `y`, `on` (any case) say yes, an empty value says nothing,
/// anything else says no. A pod whose label and annotation disagree is not injected (the CNI
/// plugin reads a `false` in either the same way).
fn pod_choice(meta: &ObjectMeta) -> Option<bool> {
    let answers: Vec<bool> = [&meta.labels, &meta.annotations]
        .into_iter()
        .filter_map(|map| lookup(map, ISTIO_INJECT_ANNOTATION))
        .filter(|value| !value.is_empty())
        .map(|value| {
            ["true", "yes", "y", "on"]
                .iter()
                .any(|yes| value.eq_ignore_ascii_case(yes))
        })
        .collect();
    if answers.contains(&false) {
        Some(false)
    } else {
        answers.first().copied()
    }
}

/// Whether a pod in `namespace` (with `namespace_labels`) gets a sidecar: Istio's rules, which
/// [`webhook_configuration`]'s selectors mirror so that the API server sends exactly the pods
/// that may need one.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    operator_namespace: &str,
) -> Decision {
    let meta = &pod.metadata;
    if is_protected_namespace(namespace, operator_namespace) {
        return Decision::Skip("protected namespace");
    }
    if lookup(&meta.annotations, STATUS_ANNOTATION).is_some() {
        return Decision::Skip("already injected");
    }
    if pod
        .spec
        .as_ref()
        .is_some_and(|s| s.host_network == Some(true))
    {
        return Decision::Skip("host network pod");
    }
    let choice = pod_choice(meta);
    // As Istio's: a namespace injection label wins over any revision; a namespace revision over
    // the pod's; a pod in an unlabelled namespace opts in with the inject label or a revision.
    let (revision, opted_in) = match namespace_injection(namespace_labels) {
        NamespaceInjection::Enabled => (None, true),
        NamespaceInjection::Disabled => return Decision::Skip("namespace disables injection"),
        NamespaceInjection::Revision(revision) => (Some(revision), true),
        NamespaceInjection::Unset => match lookup(&meta.labels, REVISION_LABEL) {
            Some(revision) => (Some(revision), true),
            None => (None, choice == Some(true)),
        },
    };
    if choice == Some(false) {
        return Decision::Skip("pod opted out");
    }
    if let Some(revision) = revision.filter(|r| *r != DEFAULT_REVISION) {
        return Decision::UnknownRevision(revision.to_owned());
    }
    if !opted_in {
        return Decision::Skip("namespace not labelled for injection");
    }
    match runs_as_proxy_identity(pod) {
        Some(message) => Decision::Refuse(message),
        None => Decision::Inject,
    }
}

/// Why the pod cannot be meshed because some of its own containers would run as the proxy's uid
/// or gid: the capture rules exempt traffic of that owner (it is how the proxy's own traffic
/// leaves the pod), so that container's traffic would pass the sidecar uncaptured and unchecked.
/// `fsGroup` and `supplementalGroups` count too: an owner match on a gid can also cover a
/// socket's supplementary groups. An image whose own `USER` is 1337 is not visible here.
fn runs_as_proxy_identity(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let pod_context = spec.security_context.clone().unwrap_or_default();
    let uid = i64::from(PROXY_UID);
    let gid = i64::from(PROXY_GID);
    let refuse = |what: String| {
        Some(format!(
            "trellis injector: {what}, the sidecar's own identity: the capture rules let that \
             identity's traffic through uncaptured, so it would bypass the sidecar and every mesh \
             policy. Run it as another uid and gid, or opt the pod out of injection with \
             sidecar.istio.io/inject: \"false\""
        ))
    };
    let containers = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", spec.containers.as_slice()),
    ];
    for (list, containers) in containers {
        for (index, container) in containers.iter().enumerate() {
            let context = container.security_context.clone().unwrap_or_default();
            for (field, own, inherited, proxy) in [
                (
                    "runAsUser",
                    context.run_as_user,
                    pod_context.run_as_user,
                    uid,
                ),
                (
                    "runAsGroup",
                    context.run_as_group,
                    pod_context.run_as_group,
                    gid,
                ),
            ] {
                let path = match own {
                    Some(_) => format!("spec.{list}[{index}].securityContext.{field}"),
                    None => format!("spec.securityContext.{field}"),
                };
                if own.or(inherited) == Some(proxy) {
                    return refuse(format!(
                        "container {:?} would run with {field} {proxy} ({path})",
                        container.name
                    ));
                }
            }
        }
    }
    if pod_context.fs_group == Some(gid) {
        return refuse(format!("the pod's spec.securityContext.fsGroup is {gid}"));
    }
    if pod_context
        .supplemental_groups
        .iter()
        .flatten()
        .any(|group| *group == gid)
    {
        return refuse(format!(
            "the pod's spec.securityContext.supplementalGroups hold {gid}"
        ));
    }
    None
}

fn lookup<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.as_ref().and_then(|m| m.get(key)).map(String::as_str)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// The pod's labels as a JSON object (`{}` without labels).
fn pod_labels_json(pod: &Pod) -> String {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    serde_json::to_string(&labels).unwrap_or_else(|_| "{}".to_owned())
}

/// The workload a pod belongs to, as Istio's telemetry names it: the Deployment behind a
/// ReplicaSet, the owning controller otherwise, the pod's own (generate) name when unowned.
pub fn workload_name(pod: &Pod) -> String {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(o) if o.kind == "ReplicaSet" => match o.name.rsplit_once('-') {
            Some((deployment, _hash)) => deployment.to_owned(),
            None => o.name.clone(),
        },
        Some(o) => o.name.clone(),
        None => pod
            .metadata
            .name
            .clone()
            .or_else(|| {
                pod.metadata
                    .generate_name
                    .as_ref()
                    .map(|g| g.trim_end_matches('-').to_owned())
            })
            .unwrap_or_default(),
    }
}

fn image(mesh: &MeshSpec, component: &str) -> String {
    format!("{}/{component}:{}", mesh.proxy.image_registry, mesh.version)
}

fn init_container(pod: &Pod, mesh: &MeshSpec) -> Container {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut args = vec![
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--proxy-gid".to_owned(),
        PROXY_GID.to_string(),
        // The pod's IP families exist only once its network does, after admission: trellis-init
        // reads them from the pod's interfaces, capturing IPv6 where the pod has an IPv6 address
        // and rejecting it elsewhere (never letting it pass uncaptured).
        "--ipv6".to_owned(),
        "auto".to_owned(),
    ];
    for (annotation, flag) in CAPTURE_ANNOTATIONS {
        if let Some(value) = annotations.get(*annotation) {
            args.push((*flag).to_owned());
            args.push(value.clone());
        }
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(image(mesh, "init")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// In CNI mode: an unprivileged init container that fails fast when the pod's traffic is not
/// captured (the plugin was not installed when the pod's network was created); the repair loop
/// then deletes the pod so it is recreated with capture.
fn validation_container(mesh: &MeshSpec) -> Container {
    Container {
        name: VALIDATION_CONTAINER.to_owned(),
        image: Some(image(mesh, "init")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec!["--validate".to_owned()]),
        // Any uid but the proxy's: the capture rules exempt the proxy's own traffic.
        security_context: Some(restricted_security_context(Some(i64::from(PROXY_UID) + 1))),
        ..Container::default()
    }
}

fn proxy_container(pod: &Pod, params: &InjectionParams) -> Container {
    let mesh = &params.mesh;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let control_plane = format!(
        "https://{OPERATOR_NAME}.{}.svc:{CONTROL_PLANE_PORT}",
        params.operator_namespace
    );
    let mut resources = k8s_openapi::api::core::v1::ResourceRequirements::default();
    if let Some(r) = &mesh.proxy.resources {
        let quantities = |cpu: &Option<String>, memory: &Option<String>| {
            let map: BTreeMap<_, _> = [("cpu", cpu), ("memory", memory)]
                .into_iter()
                .filter_map(|(k, v)| {
                    v.clone().map(|v| {
                        (
                            k.to_owned(),
                            k8s_openapi::apimachinery::pkg::api::resource::Quantity(v),
                        )
                    })
                })
                .collect();
            (!map.is_empty()).then_some(map)
        };
        resources.requests = quantities(&r.cpu_request, &r.memory_request);
        resources.limits = quantities(&r.cpu_limit, &r.memory_limit);
    }
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port.into(),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(image(mesh, "proxy")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec!["sidecar".to_owned()]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            env("SERVICE_ACCOUNT", &service_account),
            env("TRUST_DOMAIN", &mesh.trust_domain),
            env("TRELLIS_CONTROL_PLANE", &control_plane),
            env("TRELLIS_CONCURRENCY", &mesh.proxy.concurrency.to_string()),
            env(
                "TRELLIS_LOG_LEVEL",
                &format!("{:?}", mesh.proxy.log_level).to_lowercase(),
            ),
            env(
                "TRELLIS_ROTATION_PERCENT",
                &mesh.certificates.rotation_percent.to_string(),
            ),
            env("WORKLOAD_NAME", &workload_name(pod)),
            // The labels at injection (the pod's creation), for `sourceLabels` route matches;
            // Istio's injector passed them the same way (ISTIO_METAJSON_LABELS).
            env("TRELLIS_WORKLOAD_LABELS", &pod_labels_json(pod)),
        ]),
        ports: Some(vec![
            port("http-envoy-prom", METRICS_PORT),
            port("http-health", READINESS_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(READINESS_PORT.into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            ..Probe::default()
        }),
        // Hold the application containers until the proxy is ready (the kubelet starts the next
        // container only after this hook returns), as Istio's holdApplicationUntilProxyStarts.
        lifecycle: (!params.native_sidecars).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/trellis-proxy".to_owned(),
                        "wait-ready".to_owned(),
                        "--timeout-seconds".to_owned(),
                        "120".to_owned(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        restart_policy: params.native_sidecars.then(|| "Always".to_owned()),
        resources: Some(resources),
        // The proxy's uid and gid are one number (1337), exempt from capture.
        security_context: Some(restricted_security_context(Some(PROXY_UID.into()))),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: ROOT_CERT_VOLUME.to_owned(),
                mount_path: ROOT_CERT_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn volumes() -> [Volume; 2] {
    [
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(43_200),
                        path: "token".to_owned(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: ROOT_CERT_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: ROOT_CERT_CONFIGMAP.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

/// Istio's per-pod switch for probe rewriting.
pub const REWRITE_PROBES_ANNOTATION: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Environment variable through which the proxy learns the application's original probes.
pub const APP_PROBERS_ENV: &str = "TRELLIS_KUBE_APP_PROBERS";

/// Points the application's HTTP probes at the proxy's readiness port
/// (`/app-health/<container>/<readyz|livez|startupz>`) and returns the original probes by that
/// path, as Istio does: the kubelet's plaintext probe would otherwise be refused on a port under
/// STRICT mutual TLS. HTTPS probes are left alone.
fn rewrite_probes(containers: &mut [Container]) -> BTreeMap<String, serde_json::Value> {
    let mut probers = BTreeMap::new();
    for container in containers.iter_mut() {
        let ports = container.ports.clone().unwrap_or_default();
        let probes = [
            ("readyz", &mut container.readiness_probe),
            ("livez", &mut container.liveness_probe),
            ("startupz", &mut container.startup_probe),
        ];
        for (kind, probe) in probes {
            let Some(probe) = probe else { continue };
            let timeout_seconds = probe.timeout_seconds.unwrap_or(1);
            let Some(get) = probe.http_get.as_mut() else {
                continue;
            };
            if get
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
            {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(port) => Some(*port),
                IntOrString::String(name) => ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port),
            };
            let Some(port) = port else { continue };
            let path = format!("/app-health/{}/{kind}", container.name);
            probers.insert(
                path.clone(),
                serde_json::json!({
                    "port": port,
                    "path": get.path.clone().unwrap_or_else(|| "/".to_owned()),
                    "timeoutSeconds": timeout_seconds,
                }),
            );
            get.port = IntOrString::Int(READINESS_PORT.into());
            get.path = Some(path);
            get.host = None;
        }
    }
    probers
}

/// The injected form of `pod`. Pure: no I/O, so every rule is unit-tested.
pub fn inject(pod: &Pod, params: &InjectionParams) -> Pod {
    let mut injected = pod.clone();
    let mut proxy = proxy_container(pod, params);
    let spec = injected.spec.get_or_insert_with(Default::default);
    if lookup(&pod.metadata.annotations, REWRITE_PROBES_ANNOTATION) != Some("false") {
        let probers = rewrite_probes(&mut spec.containers);
        if !probers.is_empty() {
            let json = serde_json::to_string(&probers).expect("probe maps always serialize");
            proxy
                .env
                .get_or_insert_with(Vec::new)
                .push(env(APP_PROBERS_ENV, &json));
        }
    }
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    let mut prepend = Vec::new();
    prepend.push(match params.mesh.interception {
        Interception::InitContainer => init_container(pod, &params.mesh),
        Interception::Cni => validation_container(&params.mesh),
    });
    if params.native_sidecars {
        prepend.push(proxy);
    } else {
        spec.containers.insert(0, proxy);
    }
    init_containers.splice(0..0, prepend);
    if init_containers.is_empty() {
        spec.init_containers = None;
    }
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes());
    let meta = &mut injected.metadata;
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(
        STATUS_ANNOTATION.to_owned(),
        format!(
            r#"{{"version":"{}","interception":"{}"}}"#,
            params.mesh.version,
            match params.mesh.interception {
                Interception::InitContainer => "initContainer",
                Interception::Cni => "cni",
            }
        ),
    );
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(PROXY_VERSION_LABEL.to_owned(), params.mesh.version.clone());
    labels.insert(TLS_MODE_LABEL.to_owned(), "istio".to_owned());
    injected
}

/// Names of the injector's webhooks, the Istio webhook each mirrors in brackets.
pub mod webhook_names {
    /// `trellis.dev/inject: enabled` namespaces.
    pub const NAMESPACE: &str = "namespace.sidecar-injector.trellis.dev";
    /// `istio-injection: enabled` namespaces [namespace.sidecar-injector.istio.io].
    pub const ISTIO_NAMESPACE: &str = "istio-namespace.sidecar-injector.trellis.dev";
    /// `istio.io/rev: default` namespaces [rev.namespace.sidecar-injector.istio.io].
    pub const REVISION_NAMESPACE: &str = "rev.namespace.sidecar-injector.trellis.dev";
    /// `istio.io/rev: default` pods in unlabelled namespaces [rev.object…].
    pub const REVISION_OBJECT: &str = "rev.object.sidecar-injector.trellis.dev";
    /// `sidecar.istio.io/inject: "true"` pods in unlabelled namespaces [object…].
    pub const OBJECT: &str = "object.sidecar-injector.trellis.dev";
    /// Namespaces asking for another revision: answered with a warning and an event.
    pub const UNKNOWN_REVISION_NAMESPACE: &str =
        "unknown-rev.namespace.sidecar-injector.trellis.dev";
    /// Pods (in unlabelled namespaces) asking for another revision: the same answer.
    pub const UNKNOWN_REVISION_OBJECT: &str = "unknown-rev.object.sidecar-injector.trellis.dev";
}

/// The webhook configuration that sends Pod creations to [`INJECT_PATH`] of the operator's
/// Service in `operator_namespace`, with Istio's namespace/object selector pairs so that a pod
/// can opt in by its own label in an unlabelled namespace, and [`decide`] sees exactly the pods
/// whose labels may ask for a sidecar.
///
/// Failure policies: a pod that asks for the mesh is refused while the injector is unreachable
/// (`Fail`, Istio's choice: a workload whose AuthorizationPolicy lives in its sidecar must not
/// start without it); a pod asking for an unknown revision is only told about it, so those
/// webhooks `Ignore` an outage. No webhook matches a pod that asks for nothing, so an outage
/// never blocks pods of plain namespaces, nor any other kind of object. Kubernetes' own
/// namespaces and the operator's are excluded by name where the API server labels namespaces
/// with it (1.21+); on older servers they are excluded by carrying no injection label (the
/// install manifest labels the operator's namespace `trellis.dev/inject: disabled`).
pub fn webhook_configuration(
    operator_namespace: &str,
    ca_bundle: &str,
    owner: &OwnerReference,
) -> MutatingWebhookConfiguration {
    use webhook_names::*;
    let requirement = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    };
    let is = |key: &str, value: &str| requirement(key, "In", &[value]);
    let is_not = |key: &str, value: &str| requirement(key, "NotIn", &[value]);
    let exists = |key: &str| requirement(key, "Exists", &[]);
    let absent = |key: &str| requirement(key, "DoesNotExist", &[]);
    let never_protected = {
        let mut names: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
        names.push(operator_namespace);
        requirement(NAMESPACE_NAME_LABEL, "NotIn", &names)
    };
    let unlabelled = || {
        vec![
            absent(INJECT_LABEL),
            absent(ISTIO_INJECTION_LABEL),
            absent(REVISION_LABEL),
        ]
    };
    let not_opted_out = || is_not(ISTIO_INJECT_ANNOTATION, "false");
    let webhook = |name: &str,
                   namespace: Vec<LabelSelectorRequirement>,
                   object: Vec<LabelSelectorRequirement>,
                   failure_policy: &str| {
        let selector = |match_expressions| LabelSelector {
            match_expressions: Some(match_expressions),
            ..LabelSelector::default()
        };
        let mut namespace = namespace;
        namespace.push(never_protected.clone());
        MutatingWebhook {
            name: name.to_owned(),
            admission_review_versions: vec!["v1".to_owned(), "v1beta1".to_owned()],
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                service: Some(ServiceReference {
                    name: OPERATOR_NAME.to_owned(),
                    namespace: operator_namespace.to_owned(),
                    path: Some(INJECT_PATH.to_owned()),
                    port: Some(443),
                }),
                ..WebhookClientConfig::default()
            },
            failure_policy: Some(failure_policy.to_owned()),
            namespace_selector: Some(selector(namespace)),
            object_selector: Some(selector(object)),
            reinvocation_policy: Some("Never".to_owned()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned()]),
                resources: Some(vec!["pods".to_owned()]),
                scope: Some("Namespaced".to_owned()),
            }]),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(10),
            ..MutatingWebhook::default()
        }
    };
    let revision_namespace = |revision: Vec<LabelSelectorRequirement>| {
        let mut requirements = revision;
        requirements.extend([absent(INJECT_LABEL), absent(ISTIO_INJECTION_LABEL)]);
        requirements
    };
    let unknown_revision = || {
        vec![
            exists(REVISION_LABEL),
            is_not(REVISION_LABEL, DEFAULT_REVISION),
        ]
    };
    MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(WEBHOOK_CONFIGURATION.to_owned()),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        webhooks: Some(vec![
            webhook(
                NAMESPACE,
                vec![is(INJECT_LABEL, "enabled")],
                vec![not_opted_out()],
                "Fail",
            ),
            webhook(
                ISTIO_NAMESPACE,
                vec![is(ISTIO_INJECTION_LABEL, "enabled")],
                vec![not_opted_out()],
                "Fail",
            ),
            webhook(
                REVISION_NAMESPACE,
                revision_namespace(vec![is(REVISION_LABEL, DEFAULT_REVISION)]),
                vec![not_opted_out()],
                "Fail",
            ),
            webhook(
                REVISION_OBJECT,
                unlabelled(),
                vec![not_opted_out(), is(REVISION_LABEL, DEFAULT_REVISION)],
                "Fail",
            ),
            webhook(
                OBJECT,
                unlabelled(),
                vec![is(ISTIO_INJECT_ANNOTATION, "true"), absent(REVISION_LABEL)],
                "Fail",
            ),
            webhook(
                UNKNOWN_REVISION_NAMESPACE,
                revision_namespace(unknown_revision()),
                vec![not_opted_out()],
                "Ignore",
            ),
            webhook(
                UNKNOWN_REVISION_OBJECT,
                unlabelled(),
                [vec![not_opted_out()], unknown_revision()].concat(),
                "Ignore",
            ),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(interception: Interception, native: bool) -> InjectionParams {
        let mut mesh: MeshSpec = serde_json::from_value(json!({"version": "1.2.3"})).unwrap();
        mesh.interception = interception;
        InjectionParams {
            mesh,
            operator_namespace: "trellis-system".into(),
            native_sidecars: native,
        }
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"serviceAccountName": "client", "containers": [{"name": "app", "image": "app:1"}]}
        }))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decides_like_istio() {
        let on = labels(&[("trellis.dev/inject", "enabled")]);
        let istio_on = labels(&[("istio-injection", "enabled")]);
        let off = labels(&[]);
        let cases = [
            (pod(json!({})), "demo", &on, Decision::Inject),
            (pod(json!({})), "demo", &istio_on, Decision::Inject),
            (
                pod(json!({})),
                "demo",
                &off,
                Decision::Skip("namespace not labelled for injection"),
            ),
            (
                pod(json!({"sidecar.istio.io/inject": "false"})),
                "demo",
                &on,
                Decision::Skip("pod opted out"),
            ),
            (
                pod(json!({"sidecar.istio.io/inject": "true"})),
                "demo",
                &off,
                Decision::Inject,
            ),
            (
                pod(json!({"trellis.dev/status": "{}"})),
                "demo",
                &on,
                Decision::Skip("already injected"),
            ),
            (
                pod(json!({})),
                "kube-system",
                &on,
                Decision::Skip("protected namespace"),
            ),
            (
                pod(json!({"sidecar.istio.io/inject": "true"})),
                "trellis-system",
                &on,
                Decision::Skip("protected namespace"),
            ),
        ];
        for (pod, ns, ns_labels, expected) in cases {
            assert_eq!(
                decide(&pod, ns, ns_labels, "trellis-system"),
                expected,
                "{ns} {:?}",
                pod.metadata.annotations
            );
        }
    }

    /// Whether `selector` selects `labels` (matchLabels and the four expression operators).
    fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
        let pairs = selector.match_labels.iter().flatten();
        let expressions = selector.match_expressions.iter().flatten();
        pairs.into_iter().all(|(k, v)| labels.get(k) == Some(v))
            && expressions.into_iter().all(|e| {
                let value = labels.get(&e.key);
                let listed = |v: &String| e.values.iter().flatten().any(|x| x == v);
                match e.operator.as_str() {
                    "In" => value.is_some_and(listed),
                    "NotIn" => !value.is_some_and(listed),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    other => panic!("unknown operator {other}"),
                }
            })
    }

    /// What happens to a pod created with `pod_labels` in namespace `name` with `ns_labels`,
    /// the API server's selection and [`decide`] together: the webhooks that select it, and the
    /// decision (`None` when no webhook sends it).
    fn admission(
        name: &str,
        ns_labels: &[(&str, &str)],
        pod_labels: &[(&str, &str)],
    ) -> (Vec<(String, String)>, Option<Decision>) {
        let owner = OwnerReference::default();
        let configuration = webhook_configuration("trellis-system", "PEM", &owner);
        let mut ns_labels = labels(ns_labels);
        // As a 1.21+ API server labels every namespace.
        ns_labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
        let mut p = pod(json!({}));
        p.metadata.labels = Some(labels(pod_labels));
        let selected: Vec<(String, String)> = configuration
            .webhooks
            .unwrap()
            .into_iter()
            .filter(|w| {
                selects(w.namespace_selector.as_ref().unwrap(), &ns_labels)
                    && selects(w.object_selector.as_ref().unwrap(), &labels(pod_labels))
            })
            .map(|w| (w.name, w.failure_policy.unwrap()))
            .collect();
        let decision =
            (!selected.is_empty()).then(|| decide(&p, name, &ns_labels, "trellis-system"));
        (selected, decision)
    }

    #[test]
    fn a_pod_opts_in_by_its_own_label_as_with_istios_object_selectors() {
        use Decision::*;
        type Label = (&'static str, &'static str);
        const INJECT: Label = ("sidecar.istio.io/inject", "true");
        const OPT_OUT: Label = ("sidecar.istio.io/inject", "false");
        const NO: Label = ("sidecar.istio.io/inject", "no");
        const DEFAULT: Label = ("istio.io/rev", "default");
        const CANARY: Label = ("istio.io/rev", "canary");
        let unknown = || UnknownRevision("canary".to_owned());
        let cases: Vec<(&[Label], &[Label], Option<Decision>)> = vec![
            // A namespace label decides for every pod but those opting out.
            (&[("istio-injection", "enabled")], &[], Some(Inject)),
            (&[("trellis.dev/inject", "enabled")], &[], Some(Inject)),
            (&[("istio-injection", "enabled")], &[OPT_OUT], None),
            (
                &[("istio-injection", "enabled")],
                &[NO],
                Some(Skip("pod opted out")),
            ),
            (&[("istio-injection", "enabled"), CANARY], &[], Some(Inject)),
            // The pod's label opts it in where the namespace says nothing (the bug fixed here:
            // the namespace selector used to filter such pods out before the label was read).
            (&[], &[INJECT], Some(Inject)),
            (&[], &[], None),
            (&[], &[OPT_OUT], None),
            // A namespace that disables injection wins over the pod.
            (&[("istio-injection", "disabled")], &[INJECT], None),
            (&[("trellis.dev/inject", "disabled")], &[INJECT], None),
            // Revisions: `default` is ours; another is admitted uninjected, with a warning.
            (&[DEFAULT], &[], Some(Inject)),
            (&[DEFAULT], &[OPT_OUT], None),
            (&[CANARY], &[], Some(unknown())),
            (&[CANARY], &[INJECT], Some(unknown())),
            (&[], &[DEFAULT], Some(Inject)),
            (&[], &[CANARY], Some(unknown())),
            (&[], &[INJECT, CANARY], Some(unknown())),
            (&[], &[OPT_OUT, DEFAULT], None),
        ];
        for (ns_labels, pod_labels, expected) in cases {
            let (selected, decision) = admission("demo", ns_labels, pod_labels);
            assert_eq!(
                decision, expected,
                "namespace {ns_labels:?}, pod {pod_labels:?}: {selected:?}"
            );
            // An unknown revision never blocks a pod; a pod to inject is never let through
            // uninjected while the injector is down.
            let fails_closed = selected.iter().any(|(_, policy)| policy == "Fail");
            match decision {
                Some(UnknownRevision(_)) => assert!(!fails_closed, "{selected:?}"),
                Some(Inject) => assert!(fails_closed, "{selected:?}"),
                _ => {}
            }
        }
    }

    #[test]
    fn system_namespaces_and_the_operators_are_never_sent_to_the_injector() {
        for namespace in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "trellis-system",
        ] {
            for ns_labels in [
                &[("istio-injection", "enabled")][..],
                &[("istio.io/rev", "default")],
                &[],
            ] {
                let (selected, _) =
                    admission(namespace, ns_labels, &[("sidecar.istio.io/inject", "true")]);
                assert!(
                    selected.is_empty(),
                    "{namespace} {ns_labels:?}: {selected:?}"
                );
            }
        }
    }

    #[test]
    fn trust_bundles_go_wherever_a_pod_may_be_injected() {
        let may =
            |ns: &str, pairs: &[(&str, &str)]| may_inject_in(ns, &labels(pairs), "trellis-system");
        assert!(may("demo", &[]), "a pod may opt in anywhere");
        assert!(may("demo", &[("istio-injection", "enabled")]));
        assert!(may("demo", &[("istio.io/rev", "default")]));
        assert!(!may("demo", &[("istio.io/rev", "canary")]));
        assert!(!may("demo", &[("trellis.dev/inject", "disabled")]));
        assert!(!may("kube-system", &[("istio-injection", "enabled")]));
        assert!(!may("trellis-system", &[]));
    }

    #[test]
    fn app_container_running_as_1337_is_refused() {
        let in_mesh = labels(&[("istio-injection", "enabled")]);
        let with = |spec: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
        };
        let app = |context: serde_json::Value| json!({"name": "app", "image": "a", "securityContext": context});
        let refused = [
            (
                with(json!({"containers": [app(json!({"runAsUser": 1337}))]})),
                "container \"app\" would run with runAsUser 1337 (spec.containers[0].securityContext.runAsUser)",
            ),
            (
                with(
                    json!({"containers": [{"name": "ok", "image": "o"}, app(json!({"runAsGroup": 1337}))]}),
                ),
                "container \"app\" would run with runAsGroup 1337 (spec.containers[1].securityContext.runAsGroup)",
            ),
            (
                with(
                    json!({"securityContext": {"runAsUser": 1337}, "containers": [app(json!({}))]}),
                ),
                "container \"app\" would run with runAsUser 1337 (spec.securityContext.runAsUser)",
            ),
            (
                with(
                    json!({"initContainers": [app(json!({"runAsUser": 1337}))], "containers": [{"name": "ok", "image": "o"}]}),
                ),
                "(spec.initContainers[0].securityContext.runAsUser)",
            ),
            (
                with(json!({"securityContext": {"fsGroup": 1337}, "containers": [app(json!({}))]})),
                "fsGroup is 1337",
            ),
            (
                with(
                    json!({"securityContext": {"supplementalGroups": [10, 1337]}, "containers": [app(json!({}))]}),
                ),
                "supplementalGroups hold 1337",
            ),
        ];
        for (pod, fragment) in refused {
            match decide(&pod, "demo", &in_mesh, "trellis-system") {
                Decision::Refuse(message) => {
                    assert!(message.contains(fragment), "{message}");
                    assert!(message.contains("bypass the sidecar"), "{message}");
                }
                other => panic!("{fragment}: {other:?}"),
            }
        }
        let allowed = [
            // The pod-level uid is overridden by the only container.
            with(
                json!({"securityContext": {"runAsUser": 1337}, "containers": [app(json!({"runAsUser": 1000}))]}),
            ),
            with(json!({"containers": [app(json!({"runAsUser": 1338, "runAsGroup": 1338}))]})),
        ];
        for pod in allowed {
            assert_eq!(
                decide(&pod, "demo", &in_mesh, "trellis-system"),
                Decision::Inject
            );
        }
        // Outside the mesh uid 1337 is nobody's business.
        let plain = with(json!({"containers": [app(json!({"runAsUser": 1337}))]}));
        assert_eq!(
            decide(&plain, "demo", &labels(&[]), "trellis-system"),
            Decision::Skip("namespace not labelled for injection")
        );
    }

    #[test]
    fn classic_sidecar_goes_first_with_init_container_and_hold() {
        let mut pod = pod(json!({"traffic.sidecar.istio.io/excludeInboundPorts": "9090"}));
        pod.metadata.labels = Some(labels(&[("app", "client"), ("version", "v1")]));
        let injected = inject(&pod, &params(Interception::InitContainer, false));
        let spec = injected.spec.unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["trellis-proxy", "app"]);
        let init = spec.init_containers.unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].image.as_deref(), Some("trellis.local/init:1.2.3"));
        let args = init[0].args.clone().unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--exclude-inbound-ports", "9090"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--ipv6", "auto"]),
            "IPv6 is planned from the pod's addresses: {args:?}"
        );
        let caps = init[0]
            .security_context
            .clone()
            .unwrap()
            .capabilities
            .unwrap()
            .add
            .unwrap();
        assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
        let proxy = &spec.containers[0];
        assert_eq!(proxy.image.as_deref(), Some("trellis.local/proxy:1.2.3"));
        assert!(proxy.lifecycle.as_ref().unwrap().post_start.is_some());
        assert_eq!(
            proxy.security_context.as_ref().unwrap().run_as_user,
            Some(1337)
        );
        assert_eq!(
            proxy
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        let env: BTreeMap<_, _> = proxy
            .env
            .clone()
            .unwrap()
            .into_iter()
            .filter_map(|e| e.value.map(|v| (e.name, v)))
            .collect();
        assert_eq!(env["SERVICE_ACCOUNT"], "client");
        let source_labels: BTreeMap<String, String> =
            serde_json::from_str(&env["TRELLIS_WORKLOAD_LABELS"]).unwrap();
        assert_eq!(
            source_labels,
            labels(&[("app", "client"), ("version", "v1")])
        );
        assert_eq!(
            env["TRELLIS_CONTROL_PLANE"],
            "https://trellis-operator.trellis-system.svc:15012"
        );
        let volumes = spec.volumes.unwrap();
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.clone().unwrap().sources.unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some("trellis"));
        let labels = injected.metadata.labels.unwrap();
        assert_eq!(labels[PROXY_VERSION_LABEL], "1.2.3");
        assert!(
            injected
                .metadata
                .annotations
                .unwrap()
                .contains_key(STATUS_ANNOTATION)
        );
    }

    #[test]
    fn http_probes_go_through_the_proxy_unless_opted_out() {
        let pod_with_probes = |annotations: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "annotations": annotations},
                "spec": {"containers": [{
                    "name": "web", "image": "w",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "timeoutSeconds": 3},
                    "livenessProbe": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTPS"}},
                    "startupProbe": {"tcpSocket": {"port": 8080}}
                }]}
            }))
            .unwrap()
        };
        let params = params(Interception::InitContainer, false);
        let injected = inject(&pod_with_probes(json!({})), &params);
        let spec = injected.spec.unwrap();
        let app = spec.containers.iter().find(|c| c.name == "web").unwrap();
        let readiness = app.readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(readiness.port, IntOrString::Int(15021));
        assert_eq!(readiness.path.as_deref(), Some("/app-health/web/readyz"));
        let liveness = app.liveness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(
            liveness.port,
            IntOrString::Int(8080),
            "HTTPS probes are left alone"
        );
        assert!(app.startup_probe.clone().unwrap().tcp_socket.is_some());
        let proxy = spec
            .containers
            .iter()
            .find(|c| c.name == PROXY_CONTAINER)
            .unwrap();
        let probers = proxy
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == APP_PROBERS_ENV)
            .unwrap();
        let probers: serde_json::Value = serde_json::from_str(&probers.value.unwrap()).unwrap();
        assert_eq!(
            probers,
            json!({"/app-health/web/readyz": {"port": 8080, "path": "/healthz", "timeoutSeconds": 3}})
        );

        let untouched = inject(
            &pod_with_probes(json!({REWRITE_PROBES_ANNOTATION: "false"})),
            &params,
        );
        let app = untouched
            .spec
            .unwrap()
            .containers
            .into_iter()
            .find(|c| c.name == "web")
            .unwrap();
        assert_eq!(
            app.readiness_probe.unwrap().http_get.unwrap().port,
            IntOrString::String("http".into())
        );
    }

    #[test]
    fn workload_names_follow_the_owning_controller() {
        let with_owner = |kind: &str, name: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p-1", "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}
            ]}}))
            .unwrap()
        };
        assert_eq!(
            workload_name(&with_owner("ReplicaSet", "web-v1-5d8f7c9b")),
            "web-v1"
        );
        assert_eq!(workload_name(&with_owner("Job", "backup")), "backup");
        assert_eq!(workload_name(&pod(json!({}))), "p");
        let generated: Pod =
            serde_json::from_value(json!({"metadata": {"generateName": "batch-"}})).unwrap();
        assert_eq!(workload_name(&generated), "batch");
    }

    #[test]
    fn native_sidecar_and_cni_mode() {
        let injected = inject(&pod(json!({})), &params(Interception::Cni, true));
        let spec = injected.spec.unwrap();
        let init = spec.init_containers.unwrap();
        let names: Vec<_> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [VALIDATION_CONTAINER, PROXY_CONTAINER],
            "cni mode: no capture init container"
        );
        let validation = init[0].security_context.clone().unwrap();
        assert_eq!(
            validation.capabilities.unwrap().add,
            None,
            "validation needs no capability"
        );
        assert_eq!(validation.run_as_user, Some(1338));
        assert_eq!(
            init[0].args.as_deref(),
            Some(&["--validate".to_owned()][..])
        );
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        assert!(init[1].lifecycle.is_none());
        assert_eq!(spec.containers.len(), 1);
    }
}
