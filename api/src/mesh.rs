//! The `Mesh` custom resource (`trellis.dev`, cluster-scoped): one object, named `default`,
//! declares the whole mesh — data-plane version, identity, mTLS default, interception mode,
//! proxy settings, certificate lifetimes and outbound policy.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_config::mesh::{MtlsMode, OutboundTrafficMode};

/// The durations the `Mesh` CRD's schema admits (`500ms`, `30s`, `24h`, `1h30m`): a subset of
/// the syntax of [`crate::istio::duration`], which the operator parses them with — no `0`, sign
/// or sub-millisecond units, none of which makes sense for a certificate lifetime.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

// Several printer columns share `type_ = "string"`; clippy reads those as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "Mesh",
    status = "MeshStatus",
    derive = "PartialEq",
    shortname = "mesh",
    category = "trellis",
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "mTLS", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Proxies",
        type_ = "integer",
        json_path = ".status.connectedProxies"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// Data-plane version: selects the proxy, init and CNI images (`<registry>/proxy:<version>`).
    /// Changing it rolls the data plane.
    #[schemars(pattern(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$"))]
    pub version: String,
    /// SPIFFE trust domain of every workload identity in the mesh.
    #[serde(default = "default_trust_domain")]
    #[schemars(pattern(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$"))]
    pub trust_domain: String,
    #[serde(default)]
    pub mtls: MtlsSettings,
    /// How pod traffic is captured: a NET_ADMIN init container, or the chained CNI plugin.
    #[serde(default)]
    pub interception: Interception,
    /// Where the nodes keep their CNI plugins and configuration (used when interception is
    /// `cni`).
    #[serde(default)]
    pub cni: CniSettings,
    #[serde(default)]
    pub proxy: ProxySettings,
    #[serde(default)]
    pub certificates: CertificateSettings,
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// External authorizers, named by `AuthorizationPolicy` action `CUSTOM` in
    /// `provider.name`: Istio's MeshConfig `extensionProviders`, of the kinds
    /// `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`. A sidecar asks the authorizer about every
    /// HTTP request a CUSTOM policy's rules match, before DENY and ALLOW policies; an opaque
    /// TCP connection a CUSTOM policy matches is denied (the authorizer is not asked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Istio's root namespace (`meshConfig.rootNamespace`): a PeerAuthentication here without a
    /// selector applies to every workload of the mesh, an AuthorizationPolicy here to the
    /// workloads it selects in every namespace (all of them without a selector), and a
    /// DestinationRule here is the last one looked up for a service. Only this namespace is
    /// mesh-wide (the operator's own is not, unless named here); the default is Istio's, so
    /// mesh-wide policies written for Istio apply unchanged.
    #[serde(default = "default_root_namespace")]
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub root_namespace: String,
    /// End-user (JWT) authentication: how the operator keeps RequestAuthentication key sets.
    #[serde(default)]
    pub jwt: JwtSettings,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtSettings {
    /// How often the operator fetches every `jwksUri` again, so that a rotated signing key
    /// reaches the proxies (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`; the same default). A
    /// key set that failed to fetch is retried sooner, after at most 10s. At least 1s.
    #[serde(default = "default_jwks_refresh_interval")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub jwks_refresh_interval: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            jwks_refresh_interval: default_jwks_refresh_interval(),
        }
    }
}

fn default_jwks_refresh_interval() -> String {
    "20m".to_owned()
}

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_owned()
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSettings {
    /// Mesh-wide default for inbound connections when no PeerAuthentication says otherwise.
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Interception {
    #[default]
    InitContainer,
    Cni,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CniSettings {
    /// The node's CNI plugin directory (containerd's `bin_dir`).
    #[serde(default = "default_cni_bin_dir")]
    pub bin_dir: String,
    /// The node's CNI configuration directory (containerd's `conf_dir`).
    #[serde(default = "default_cni_conf_dir")]
    pub conf_dir: String,
    /// Namespaces whose pods the plugin never captures, besides kube-system and the operator's.
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
}

impl Default for CniSettings {
    fn default() -> Self {
        Self {
            bin_dir: default_cni_bin_dir(),
            conf_dir: default_cni_conf_dir(),
            exclude_namespaces: Vec::new(),
        }
    }
}

fn default_cni_bin_dir() -> String {
    "/opt/cni/bin".to_owned()
}

fn default_cni_conf_dir() -> String {
    "/etc/cni/net.d".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySettings {
    /// Repository prefix of the data-plane images.
    #[serde(default = "default_image_registry")]
    pub image_registry: String,
    /// Resources of the injected proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ProxyResources>,
    /// Worker threads per proxy.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: u32,
    #[serde(default)]
    pub log_level: LogLevel,
    /// Limits on the downstream connections of every proxy listener: outbound (15001), inbound
    /// (15006) and the proxy's own HTTP endpoints (admin 15000, metrics 15020, readiness 15021).
    /// Proxies apply a change to the connections they accept after it, without a restart.
    #[serde(default)]
    pub listeners: ListenerSettings,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            image_registry: default_image_registry(),
            resources: None,
            concurrency: default_concurrency(),
            log_level: LogLevel::default(),
            listeners: ListenerSettings::default(),
        }
    }
}

/// `spec.proxy.listeners`: the bounds a slow or flooding client meets. Defaults follow Envoy's
/// where Envoy has one (`max_request_headers_kb` 60, `max_headers_count` 100, `idle_timeout`
/// 1h).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSettings {
    /// How long an HTTP connection may take to send a complete request head (default `30s`,
    /// at most `1h`); the connection is closed when it runs out. HTTP/1.1 counts from when the
    /// proxy starts waiting for a head, so an idle keep-alive connection is closed after it
    /// too; HTTP/2 counts to the connection's first request.
    #[serde(default = "default_header_read_timeout")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub header_read_timeout: String,
    /// An HTTP connection without a request in flight for this long is closed, HTTP/2 after a
    /// GOAWAY (default `1h`, as Envoy's `idle_timeout`; at most `24h`).
    #[serde(default = "default_idle_timeout")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub idle_timeout: String,
    /// The largest request head in KiB: the HTTP/1.1 request line and headers, the HTTP/2
    /// header list (announced as `SETTINGS_MAX_HEADER_LIST_SIZE`). Larger is answered `431`.
    /// Default 60, as Envoy's `max_request_headers_kb`; 8 to 256.
    #[serde(default = "default_max_request_headers_kb")]
    #[schemars(range(min = 8, max = 256))]
    pub max_request_headers_kb: u32,
    /// The most headers a request may carry; more is answered `431`. Default 100, as Envoy's
    /// `max_headers_count`.
    #[serde(default = "default_max_request_headers")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_request_headers: u32,
    /// Connections each capture listener (outbound 15001, inbound 15006) holds open at once;
    /// a connection beyond it is closed as soon as it is accepted. Default 16384.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: u32,
    /// The same for each of the proxy's own HTTP endpoints (15000, 15020, 15021). Default 256.
    #[serde(default = "default_max_endpoint_connections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_endpoint_connections: u32,
    #[serde(default)]
    pub http2: Http2Settings,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_request_headers_kb: default_max_request_headers_kb(),
            max_request_headers: default_max_request_headers(),
            max_connections: default_max_connections(),
            max_endpoint_connections: default_max_endpoint_connections(),
            http2: Http2Settings::default(),
        }
    }
}

fn default_header_read_timeout() -> String {
    "30s".to_owned()
}

fn default_idle_timeout() -> String {
    "1h".to_owned()
}

fn default_max_request_headers_kb() -> u32 {
    trellis_config::limits::DEFAULT_MAX_REQUEST_HEADERS_KB
}

fn default_max_request_headers() -> u32 {
    trellis_config::limits::DEFAULT_MAX_REQUEST_HEADERS
}

fn default_max_connections() -> u32 {
    trellis_config::limits::DEFAULT_MAX_CONNECTIONS
}

fn default_max_endpoint_connections() -> u32 {
    trellis_config::limits::DEFAULT_MAX_ENDPOINT_CONNECTIONS
}

/// `spec.proxy.listeners.http2`: the settings of every downstream HTTP/2 connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Http2Settings {
    /// Streams a client may have open at once on one connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`); more are refused. Default 1024: one connection
    /// between two sidecars carries all of a client's requests to an endpoint.
    #[serde(default = "default_max_concurrent_streams")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub max_concurrent_streams: u32,
    /// Streams a client may reset before the proxy has accepted them; one more closes the
    /// connection with `ENHANCE_YOUR_CALM` (the "rapid reset" attack). Default 20.
    #[serde(default = "default_max_pending_accept_reset_streams")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_pending_accept_reset_streams: u32,
    /// Send a PING after this long without a frame from the client (at most `1h`). Unset (the
    /// default, as in Envoy): no pings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub keepalive_interval: Option<String>,
    /// A PING not acknowledged within this closes the connection (default `20s`, at most
    /// `1h`).
    #[serde(default = "default_keepalive_timeout")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub keepalive_timeout: String,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: default_max_concurrent_streams(),
            max_pending_accept_reset_streams: default_max_pending_accept_reset_streams(),
            keepalive_interval: None,
            keepalive_timeout: default_keepalive_timeout(),
        }
    }
}

fn default_max_concurrent_streams() -> u32 {
    trellis_config::limits::DEFAULT_MAX_CONCURRENT_STREAMS
}

fn default_max_pending_accept_reset_streams() -> u32 {
    trellis_config::limits::DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS
}

fn default_keepalive_timeout() -> String {
    "20s".to_owned()
}

fn default_image_registry() -> String {
    trellis_config::wellknown::DEFAULT_IMAGE_REGISTRY.to_owned()
}

fn default_concurrency() -> u32 {
    2
}

/// Requests and limits of the proxy container, as Kubernetes quantities (`100m`, `64Mi`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSettings {
    /// Lifetime of workload certificates.
    #[serde(default = "default_workload_ttl")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub workload_ttl: String,
    /// Percentage of a certificate's lifetime after which the proxy renews it.
    #[serde(default = "default_rotation_percent")]
    #[schemars(range(min = 10, max = 90))]
    pub rotation_percent: u32,
    /// Lifetime of a self-signed root created by the operator.
    #[serde(default = "default_root_ttl")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub root_ttl: String,
    /// A Secret in the operator's namespace holding the user's CA in Istio's `cacerts` layout
    /// (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// Set, or change, to rotate the operator-generated root without failing a request: the
    /// operator adds a new root to every trust bundle, then signs with it, then removes the old
    /// root once every proxy holds a certificate from the new one (`status.rootRotation`
    /// reports the phase). Any new value starts one rotation, e.g. the date of the request.
    /// Ignored with `caSecret`: a user CA is rotated by its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub root_rotation: Option<String>,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        Self {
            workload_ttl: default_workload_ttl(),
            rotation_percent: default_rotation_percent(),
            root_ttl: default_root_ttl(),
            ca_secret: None,
            root_rotation: None,
        }
    }
}

fn default_workload_ttl() -> String {
    "24h".to_owned()
}

fn default_rotation_percent() -> u32 {
    50
}

fn default_root_ttl() -> String {
    "87600h".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundTrafficMode,
}

/// One `extensionProviders[]` entry: a name and exactly one provider kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// Unique among the providers; CUSTOM policies refer to it.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// An authorizer speaking Envoy's ext_authz HTTP protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<EnvoyExtAuthzHttpProvider>,
    /// An authorizer serving Envoy's `envoy.service.auth.v3.Authorization/Check` over gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<EnvoyExtAuthzGrpcProvider>,
}

/// Istio's `EnvoyExternalAuthorizationHttpProvider`, without `includeRequestBodyInCheck`,
/// `headersToDownstreamOnAllow` and the deprecated `includeHeadersInCheck`. Header patterns
/// are exact, `prefix*` or `*suffix` names, compared ignoring case.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyExtAuthzHttpProvider {
    /// `[<namespace>/]<hostname>` of the authorizer (`ext-authz.foo.svc.cluster.local`). The
    /// sidecar dials the hostname in plaintext, from outside its own traffic capture.
    #[schemars(length(min = 1))]
    pub service: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// How long the sidecar waits for the answer (default `600s`); then the check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// Put before the request's path in the check request: `/check` checks `/admin` as
    /// `/check/admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^/"))]
    pub path_prefix: Option<String>,
    /// Allow the request when the check fails (the authorizer cannot be reached, times out or
    /// answers 5xx); by default it is denied with `statusOnError`.
    #[serde(default)]
    pub fail_open: bool,
    /// The HTTP status a client gets when the check fails (default `403`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[2-5][0-9][0-9]$"))]
    pub status_on_error: Option<String>,
    /// Client request headers sent to the authorizer besides `Host`, the method, the path
    /// and `Content-Length: 0` (the body is never sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers_in_check: Vec<String>,
    /// Fixed headers added to every check request, overriding the client's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    /// The authorizer's response headers set on an allowed request before it goes to the
    /// application (replacing the client's). Without it the request goes on unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// The authorizer's response headers a denied client gets, with its status and body.
    /// Without it every header but `Host` is passed on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
}

/// Istio's `EnvoyExternalAuthorizationGrpcProvider`, without `includeRequestBodyInCheck`. An
/// OK answer's `ok_response` headers are set on (or appended to) the request and its
/// `headers_to_remove` removed; a denial's `denied_response` status (default 403, 401 for
/// `UNAUTHENTICATED`), headers and body go to the client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyExtAuthzGrpcProvider {
    /// `[<namespace>/]<hostname>` of the authorizer. The sidecar dials the hostname with
    /// plaintext HTTP/2, from outside its own traffic capture.
    #[schemars(length(min = 1))]
    pub service: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// How long the sidecar waits for the answer (default `600s`); then the check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// Allow the request when the check fails (the authorizer cannot be reached, times out or
    /// answers with a gRPC error); by default it is denied with `statusOnError`.
    #[serde(default)]
    pub fail_open: bool,
    /// The HTTP status a client gets when the check fails (default `403`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[2-5][0-9][0-9]$"))]
    pub status_on_error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<MeshCondition>,
    /// Expiry of the root certificate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cert_expiry: Option<String>,
    /// Expiry of the signing intermediate (RFC 3339), when the CA is not the root itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_cert_expiry: Option<String>,
    /// The last root rotation (`spec.certificates.rootRotation`) and how far it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_rotation: Option<RootRotationStatus>,
    /// Proxies connected to the control plane, all versions together.
    #[serde(default)]
    pub connected_proxies: u32,
    /// Connected proxies by data-plane version.
    #[serde(default)]
    pub proxies_by_version: std::collections::BTreeMap<String, u32>,
}

/// Progress of a root rotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootRotationStatus {
    /// The `spec.certificates.rootRotation` value this rotation carries out.
    pub trigger: String,
    pub phase: RootRotationPhase,
    /// When the phase began (RFC 3339).
    pub since: String,
    /// What the phase waits for.
    pub message: String,
}

/// The phases of a root rotation, in order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RootRotationPhase {
    /// Both roots are trusted everywhere; certificates are still signed by the old root.
    TrustBoth,
    /// Both roots are trusted; certificates are signed by the new root.
    SignNew,
    /// Only the new root is trusted and signs.
    Complete,
}

/// A condition in the shape of `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshCondition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_almost_empty_spec() {
        let mesh: MeshSpec = serde_yaml::from_str("version: 0.1.0").unwrap();
        assert_eq!(mesh.trust_domain, "cluster.local");
        assert_eq!(mesh.mtls.mode, MtlsMode::Permissive);
        assert_eq!(mesh.interception, Interception::InitContainer);
        assert_eq!(mesh.certificates.workload_ttl, "24h");
        assert_eq!(mesh.root_namespace, "istio-system");
        assert_eq!(
            mesh.outbound_traffic_policy.mode,
            OutboundTrafficMode::AllowAny
        );
    }

    #[test]
    fn what_the_schema_admits_parses() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for text in ["24h", "1h30m", "0.5s", "250ms", "2m", "1.5h"] {
            assert!(pattern.is_match(text), "{text}");
            assert!(crate::istio::duration::parse(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn crd_schema_pins_field_validation() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Mesh::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["version"]));
        assert_eq!(
            spec["properties"]["mtls"]["properties"]["mode"]["enum"],
            serde_json::json!(["PERMISSIVE", "STRICT"])
        );
        assert_eq!(
            spec["properties"]["certificates"]["properties"]["workloadTtl"]["pattern"],
            DURATION_PATTERN
        );
        assert_eq!(crd["spec"]["scope"], "Cluster");
    }

    /// The API server refuses what the proxy's validation refuses: the schema's ranges are
    /// `trellis_config::limits`'s.
    #[test]
    fn crd_schema_bounds_listener_limits_as_the_proxy_does() {
        use kube::CustomResourceExt;
        use trellis_config::limits as l;
        let crd = serde_json::to_value(Mesh::crd()).unwrap();
        let listeners = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["proxy"]["properties"]["listeners"]["properties"];
        let http2 = &listeners["http2"]["properties"];
        for (field, min, max) in [
            (
                &listeners["maxRequestHeadersKb"],
                l::MIN_REQUEST_HEADERS_KB,
                l::MAX_REQUEST_HEADERS_KB,
            ),
            (&listeners["maxRequestHeaders"], 1, l::MAX_REQUEST_HEADERS),
            (&listeners["maxConnections"], 1, l::MAX_CONNECTIONS),
            (&listeners["maxEndpointConnections"], 1, l::MAX_CONNECTIONS),
            (&http2["maxConcurrentStreams"], 1, l::MAX_CONCURRENT_STREAMS),
            (
                &http2["maxPendingAcceptResetStreams"],
                1,
                l::MAX_PENDING_ACCEPT_RESET_STREAMS,
            ),
        ] {
            assert_eq!(field["minimum"].as_f64(), Some(f64::from(min)), "{field}");
            assert_eq!(field["maximum"].as_f64(), Some(f64::from(max)), "{field}");
        }
        for duration in [
            &listeners["headerReadTimeout"],
            &listeners["idleTimeout"],
            &http2["keepaliveInterval"],
            &http2["keepaliveTimeout"],
        ] {
            assert_eq!(duration["pattern"], DURATION_PATTERN, "{duration}");
        }
    }
}
