//! Istio's `security.istio.io` resources, schema-compatible with Istio's API so that existing YAML
//! applies unchanged: `PeerAuthentication`, `RequestAuthentication` and `AuthorizationPolicy`.
//!
//! The CRDs are generated for `v1` (the stored version); the install manifest adds `v1beta1` with
//! the same schema (served, not stored), as Istio serves both.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use trellis_config::proxy::PeerAuthenticationMode;

/// API group of Istio's security resources.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// Versions served besides the stored `v1`, with the same schema, as Istio serves them.
pub const SECURITY_EXTRA_VERSIONS: &[&str] = &["v1beta1"];

/// Mutual TLS requirements for connections into the selected workloads (Istio's
/// `security.istio.io/v1` `PeerAuthentication`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced,
    derive = "PartialEq",
    shortname = "pa",
    category = "istio-io",
    category = "security-istio-io",
    doc = "PeerAuthentication defines mutual TLS (mTLS) requirements for incoming connections.",
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mtls.mode",
        description = "Defines the mTLS mode used for peer authentication."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads the policy applies to. Without a selector (or with no labels) the policy
    /// applies to the whole namespace, or to the whole mesh in the root namespace.
    #[serde(
        default,
        skip_serializing_if = "WorkloadSelector::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub selector: WorkloadSelector,
    /// Mutual TLS settings for the workload (all ports unless `portLevelMtls` overrides one).
    #[serde(
        default,
        skip_serializing_if = "MutualTls::is_unset",
        deserialize_with = "null_as_default"
    )]
    pub mtls: MutualTls,
    /// Port-specific mutual TLS settings, keyed by the workload's (container, target) port
    /// number, not the Service port. Only honoured on a policy with a selector.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

// Absent, empty and UNSET mean the same in Istio's API, so these fields are plain values rather
// than `Option`s: an `Option` would make the schema `nullable`, and the API server publishes
// nullable fields to OpenAPI v2 without their properties, so `kubectl` could no longer refuse a
// misspelt field inside them. An explicit `null` (the API server drops those) still decodes.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Istio's `istio.type.v1beta1.WorkloadSelector`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must all carry for the policy to apply to it.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty()
    }
}

/// Istio's `PeerAuthentication.MutualTLS`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// Defines the mTLS mode used for peer authentication.
    #[serde(
        default,
        skip_serializing_if = "MutualTlsMode::is_unset",
        deserialize_with = "null_as_default"
    )]
    pub mode: MutualTlsMode,
}

impl MutualTls {
    pub fn is_unset(&self) -> bool {
        self.mode.is_unset()
    }
}

/// Istio's `PeerAuthentication.MutualTLS.Mode`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MutualTlsMode {
    /// Inherit from the parent (port → workload → namespace → mesh → the Mesh default).
    #[default]
    Unset,
    /// Connections are not tunnelled (plaintext only).
    Disable,
    /// Connections can be either plaintext or mutual TLS.
    Permissive,
    /// Connections must be mutual TLS.
    Strict,
}

impl MutualTlsMode {
    pub fn is_unset(&self) -> bool {
        *self == Self::Unset
    }

    /// The resolved mode, or `None` for UNSET (inherit).
    pub fn resolved(self) -> Option<PeerAuthenticationMode> {
        match self {
            Self::Unset => None,
            Self::Disable => Some(PeerAuthenticationMode::Disable),
            Self::Permissive => Some(PeerAuthenticationMode::Permissive),
            Self::Strict => Some(PeerAuthenticationMode::Strict),
        }
    }
}

impl PeerAuthenticationSpec {
    /// The selector's labels when it selects workloads; `None` for a namespace- or mesh-wide
    /// policy (no selector, or a selector without labels, as in Istio).
    pub fn workload_labels(&self) -> Option<&BTreeMap<String, String>> {
        Some(&self.selector.match_labels).filter(|labels| !labels.is_empty())
    }

    /// The policy's own mode (`None` when `mtls` or its mode is absent or UNSET).
    pub fn mode(&self) -> Option<PeerAuthenticationMode> {
        self.mtls.mode.resolved()
    }
}

/// End-user (JWT) authentication for the selected workloads (Istio's `security.istio.io/v1`
/// `RequestAuthentication`). A request with a token that fails a rule is refused (401); a
/// request without a token is accepted without a request principal, so an AuthorizationPolicy
/// decides whether one is required.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "RequestAuthentication",
    namespaced,
    derive = "PartialEq",
    shortname = "ra",
    category = "istio-io",
    category = "security-istio-io",
    doc = "RequestAuthentication defines what request authentication methods are supported by a workload.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The workloads the policy applies to. Without a selector (or with no labels) the policy
    /// applies to every workload of the namespace, or of the mesh in the root namespace.
    #[serde(
        default,
        skip_serializing_if = "WorkloadSelector::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub selector: WorkloadSelector,
    /// A gateway, waypoint or Service the policy is attached to (Istio's alternative to
    /// `selector`). Accepted, but such a policy does not apply to sidecars.
    #[serde(
        default,
        skip_serializing_if = "PolicyTargetReference::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub target_ref: PolicyTargetReference,
    /// Several `targetRef`s; the same as `targetRef`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The JWTs the selected workloads accept. A token is checked by the rule of its issuer
    /// that reads the location it was found in; every present token must pass.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub jwt_rules: Vec<JwtRule>,
}

impl RequestAuthenticationSpec {
    /// The selector's labels when it selects workloads; `None` for a namespace- or mesh-wide
    /// policy (no selector, or a selector without labels).
    pub fn workload_labels(&self) -> Option<&BTreeMap<String, String>> {
        Some(&self.selector.match_labels).filter(|labels| !labels.is_empty())
    }

    /// Whether the policy names a target instead of (or besides) selecting workloads.
    pub fn has_target_ref(&self) -> bool {
        !self.target_ref.is_empty() || !self.target_refs.is_empty()
    }
}

/// Istio's `JWTRule`: how one issuer's tokens are found and verified.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// Identifies the issuer that issued the JWT; a token's `iss` claim must equal it.
    pub issuer: String,
    /// The audiences allowed to access: a token must name one of them in `aud`. Empty: `aud` is
    /// not checked.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub audiences: Vec<String>,
    /// URL of the provider's public key set (JWKS). The operator fetches it, refreshes it every
    /// `Mesh.spec.jwt.jwksRefreshInterval` and sends the keys to the proxies. Without `jwks` and
    /// `jwksUri` the key set is found through the issuer's OpenID discovery document.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwks_uri: String,
    /// The JSON Web Key Set itself (a JSON document); when set, `jwksUri` is ignored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwks: String,
    /// Headers a token is read from (`prefix` is stripped first). With no header, parameter or
    /// cookie, a token is read from `Authorization: Bearer <token>` and the `access_token`
    /// query parameter.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters a token is read from.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub from_params: Vec<String>,
    /// Cookies a token is read from.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub from_cookies: Vec<String>,
    /// A header that receives the verified token's payload (base64url-encoded JSON).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_payload_to_header: String,
    /// Claims of the verified token copied to request headers.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request forwarded to the application; by default it is removed
    /// from where it was found.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// How long the operator waits for `jwksUri` (Istio's default: 5s).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timeout: String,
}

/// Istio's `JWTHeader`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// The HTTP header name.
    pub name: String,
    /// The prefix that is stripped before the token is decoded (such as `Bearer `).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Istio's `ClaimToHeader`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The name of the header to be created.
    pub header: String,
    /// The name of the claim to be copied from.
    pub claim: String,
}

/// Access control on workloads (Istio's `security.istio.io/v1` `AuthorizationPolicy`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    derive = "PartialEq",
    shortname = "ap",
    category = "istio-io",
    category = "security-istio-io",
    doc = "AuthorizationPolicy enables access control on workloads.",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "The operation to take."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy applies to. Without a selector (or with no labels) the policy
    /// applies to every workload of the namespace, or of the mesh in the root namespace.
    #[serde(
        default,
        skip_serializing_if = "WorkloadSelector::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub selector: WorkloadSelector,
    /// A gateway, waypoint or Service the policy is attached to (Istio's alternative to
    /// `selector`). Accepted, but such a policy does not apply to sidecars and is reported.
    #[serde(
        default,
        skip_serializing_if = "PolicyTargetReference::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub target_ref: PolicyTargetReference,
    /// Several `targetRef`s; the same as `targetRef`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Optional. The action to take if the request is matched with the rules. Default is ALLOW
    /// if not specified.
    #[serde(
        default,
        skip_serializing_if = "AuthorizationAction::is_allow",
        deserialize_with = "null_as_default"
    )]
    pub action: AuthorizationAction,
    /// The external authorizer of a CUSTOM policy.
    #[serde(
        default,
        skip_serializing_if = "ExtensionProvider::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub provider: ExtensionProvider,
    /// Optional. A list of rules to match the request. A match occurs when at least one rule
    /// matches the request. No rules: the policy never matches.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub rules: Vec<AuthorizationRule>,
}

/// Istio's `AuthorizationPolicy.Action`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    /// Allow a request only if it matches the rules. This is the default type.
    #[default]
    Allow,
    /// Deny a request if it matches any of the rules.
    Deny,
    /// Audit a request if it matches any of the rules.
    Audit,
    /// The CUSTOM action allows an extension to handle the user request if the matching rules
    /// evaluate to true.
    Custom,
    /// A value this version does not know (the schema refuses it, so only an object written
    /// around the schema has one); such a policy is reported and ignored.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// Istio's `AuthorizationPolicy.ExtensionProvider`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// Specifies the name of the extension provider.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// Istio's `istio.type.v1beta1.PolicyTargetReference`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl AuthorizationSource {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl AuthorizationOperation {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl AuthorizationAction {
    pub fn is_allow(&self) -> bool {
        *self == Self::Allow
    }
}

impl PolicyTargetReference {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl ExtensionProvider {
    pub fn is_empty(&self) -> bool {
        self.name.is_empty()
    }
}

/// Istio's `Rule`: `from`, `to` and `when` must all match; one entry of `from` (of `to`)
/// suffices. An empty rule matches everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Optional. `from` specifies the source of a request.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub from: Vec<RuleFrom>,
    /// Optional. `to` specifies the operation of a request.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub to: Vec<RuleTo>,
    /// Optional. `when` specifies a list of additional conditions of a request.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub when: Vec<AuthorizationCondition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// Source specifies the source of a request.
    #[serde(
        default,
        skip_serializing_if = "AuthorizationSource::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub source: AuthorizationSource,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// Operation specifies the operation of a request.
    #[serde(
        default,
        skip_serializing_if = "AuthorizationOperation::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub operation: AuthorizationOperation,
}

/// Istio's `Source`. Every field is optional; the non-empty ones must all match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationSource {
    /// Peer identities (`<trust domain>/ns/<namespace>/sa/<service account>`), mutual TLS only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub principals: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_principals: Vec<String>,
    /// Request identities from a JWT verified by a RequestAuthentication (`<iss>/<sub>`). HTTP
    /// only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub request_principals: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity, mutual TLS only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub namespaces: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_namespaces: Vec<String>,
    /// Service accounts (`<namespace>/<name>` or `<name>`). Accepted so that the field is not
    /// pruned away (which would widen the rule); reported and resolved as unsupported.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub service_accounts: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_service_accounts: Vec<String>,
    /// Peer addresses: single IPs or CIDR blocks.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ip_blocks: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_ip_blocks: Vec<String>,
    /// Original client addresses (the peer address, as no trusted proxies are configured).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub remote_ip_blocks: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Istio's `Operation`. Every field is optional; the non-empty ones must all match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationOperation {
    /// Hosts as in the request's `Host`/`:authority` (case-insensitive). HTTP only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub hosts: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_hosts: Vec<String>,
    /// Workload ports the connection is for.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ports: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_ports: Vec<String>,
    /// HTTP methods (case-sensitive). HTTP only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub methods: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_methods: Vec<String>,
    /// Normalised request paths without the query (case-sensitive). HTTP only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub paths: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_paths: Vec<String>,
}

/// Istio's `Condition`: `key` must match one of `values` (if any) and none of `notValues`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationCondition {
    /// The name of an Istio attribute (`request.headers[x-user]`, `source.ip`, ...).
    pub key: String,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub values: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_values: Vec<String>,
}

impl AuthorizationPolicySpec {
    /// The selector's labels when it selects workloads; `None` for a namespace- or mesh-wide
    /// policy (no selector, or a selector without labels).
    pub fn workload_labels(&self) -> Option<&BTreeMap<String, String>> {
        Some(&self.selector.match_labels).filter(|labels| !labels.is_empty())
    }

    /// Whether the policy names a target instead of (or besides) selecting workloads.
    pub fn has_target_ref(&self) -> bool {
        !self.target_ref.is_empty() || !self.target_refs.is_empty()
    }
}

/// The CRD of a security kind as published: the generated one, with every object keeping
/// unknown fields for the admission webhook to refuse ([`crate::schema`]).
pub fn published_crd<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(K::crd()).expect("a CRD always serializes");
    for version in value["spec"]["versions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        crate::schema::keep_unknown_fields(&mut version["schema"]["openAPIV3Schema"]);
    }
    serde_json::from_value(value).expect("marking objects keeps the CRD valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_istio_yaml_unchanged() {
        let policy: PeerAuthentication = serde_yaml::from_str(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    "9090": {}
"#,
        )
        .unwrap();
        let spec = &policy.spec;
        assert_eq!(
            spec.workload_labels()
                .unwrap()
                .get("app")
                .map(String::as_str),
            Some("finance")
        );
        assert_eq!(spec.mode(), Some(PeerAuthenticationMode::Strict));
        assert_eq!(spec.port_level_mtls["8080"].mode, MutualTlsMode::Disable);
        assert_eq!(spec.port_level_mtls["9090"].mode, MutualTlsMode::Unset);

        let empty: PeerAuthenticationSpec =
            serde_json::from_value(json!({"selector": {}, "mtls": {}})).unwrap();
        assert_eq!(
            empty.workload_labels(),
            None,
            "empty selector = no selector"
        );
        assert_eq!(empty.mode(), None, "absent mode = UNSET");
        assert!(serde_json::from_value::<MutualTls>(json!({"mode": "strict"})).is_err());

        let nulls: PeerAuthenticationSpec = serde_json::from_value(
            json!({"selector": {"matchLabels": null}, "mtls": {"mode": null}, "portLevelMtls": null}),
        )
        .unwrap();
        assert_eq!(nulls, PeerAuthenticationSpec::default());
        assert_eq!(serde_json::to_value(&nulls).unwrap(), json!({}));
    }

    #[test]
    fn crd_schema_is_structural_and_keeps_unknown_fields() {
        let crd = serde_json::to_value(published_crd::<PeerAuthentication>()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "peerauthentications.security.istio.io"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["pa"]));
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1");
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let modes = json!(["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]);
        assert_eq!(
            spec["properties"]["mtls"]["properties"]["mode"]["enum"],
            modes
        );
        let ports = &spec["properties"]["portLevelMtls"];
        assert_eq!(ports["type"], "object");
        assert_eq!(
            ports["additionalProperties"]["properties"]["mode"]["enum"],
            modes
        );
        assert_eq!(
            spec["properties"]["selector"]["properties"]["matchLabels"]["additionalProperties"]["type"],
            "string"
        );
        let closed =
            crate::schema::objects_dropping_unknown_fields(&version["schema"]["openAPIV3Schema"]);
        assert!(closed.is_empty(), "{closed:?}");
        let text = crd.to_string();
        for forbidden in [
            "\"$ref\"",
            "anyOf",
            "oneOf",
            "allOf",
            "\"default\"",
            "nullable",
        ] {
            assert!(!text.contains(forbidden), "schema contains {forbidden}");
        }
    }

    #[test]
    fn reads_istio_authorization_policies_unchanged() {
        let policy: AuthorizationPolicy = serde_yaml::from_str(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
        notNamespaces: ["prod"]
        ipBlocks: ["10.0.0.0/8"]
        requestPrincipals: ["issuer/subject"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/admin/*"]
        ports: ["8080"]
        notHosts: ["*.example.com"]
    when:
    - key: request.headers[x-user]
      notValues: ["alice"]
  - {}
"#,
        )
        .unwrap();
        let spec = &policy.spec;
        assert_eq!(spec.action, AuthorizationAction::Deny);
        assert_eq!(
            spec.workload_labels()
                .unwrap()
                .get("app")
                .map(String::as_str),
            Some("httpbin")
        );
        let source = &spec.rules[0].from[0].source;
        assert_eq!(source.principals, ["cluster.local/ns/default/sa/sleep"]);
        assert_eq!(source.not_namespaces, ["prod"]);
        assert_eq!(source.request_principals, ["issuer/subject"]);
        let operation = &spec.rules[0].to[0].operation;
        assert_eq!(operation.ports, ["8080"]);
        assert_eq!(operation.not_hosts, ["*.example.com"]);
        assert_eq!(spec.rules[0].when[0].key, "request.headers[x-user]");
        assert_eq!(spec.rules[1], AuthorizationRule::default());
        assert!(!spec.has_target_ref());

        let table = [
            (json!({}), AuthorizationAction::Allow, 0),
            (
                json!({"action": null, "rules": null}),
                AuthorizationAction::Allow,
                0,
            ),
            (
                json!({"action": "AUDIT", "rules": [{}]}),
                AuthorizationAction::Audit,
                1,
            ),
            (
                json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
                AuthorizationAction::Custom,
                1,
            ),
            (
                json!({"action": "SOMETHING_NEW"}),
                AuthorizationAction::Unknown,
                0,
            ),
        ];
        for (spec, action, rules) in table {
            let parsed: AuthorizationPolicySpec = serde_json::from_value(spec.clone()).unwrap();
            assert_eq!(parsed.action, action, "{spec}");
            assert_eq!(parsed.rules.len(), rules, "{spec}");
        }
        let targeted: AuthorizationPolicySpec = serde_json::from_value(
            json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]}),
        )
        .unwrap();
        assert!(targeted.has_target_ref());
        assert_eq!(
            serde_json::to_value(AuthorizationPolicySpec::default()).unwrap(),
            json!({}),
            "an empty spec stays empty (`spec: {{}}` is the deny-all idiom)"
        );
    }

    #[test]
    fn authorization_policy_schema_is_structural_and_keeps_unknown_fields() {
        let crd = serde_json::to_value(published_crd::<AuthorizationPolicy>()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "authorizationpolicies.security.istio.io"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1");
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["action"]["enum"],
            json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"])
        );
        let rule = &spec["properties"]["rules"]["items"]["properties"];
        let source = &rule["from"]["items"]["properties"]["source"]["properties"];
        for field in [
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ] {
            assert_eq!(source[field]["items"]["type"], "string", "source.{field}");
        }
        let operation = &rule["to"]["items"]["properties"]["operation"]["properties"];
        for field in [
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ] {
            assert_eq!(
                operation[field]["items"]["type"], "string",
                "operation.{field}"
            );
        }
        let when = &rule["when"]["items"];
        assert_eq!(when["required"], json!(["key"]));
        for field in ["targetRef", "targetRefs", "provider", "selector"] {
            assert!(spec["properties"][field].is_object(), "{field}");
        }
        let closed =
            crate::schema::objects_dropping_unknown_fields(&version["schema"]["openAPIV3Schema"]);
        assert!(closed.is_empty(), "{closed:?}");
        let text = crd.to_string();
        for forbidden in [
            "\"$ref\"",
            "anyOf",
            "oneOf",
            "allOf",
            "\"default\"",
            "nullable",
            "UNKNOWN",
        ] {
            assert!(!text.contains(forbidden), "schema contains {forbidden}");
        }
    }
}
