//! Istio's `security.istio.io` resources, schema-compatible with Istio's API so that existing YAML
//! applies unchanged. Only `PeerAuthentication` so far.
//!
//! The CRD is generated for `v1` (the stored version); the install manifest adds `v1beta1` with
//! the same schema (served, not stored), as Istio serves both.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::PeerAuthenticationMode;

/// API group of Istio's security resources.
pub const SECURITY_GROUP: &str = "security.istio.io";

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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
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
    fn crd_schema_is_structural_and_closed() {
        let crd = serde_json::to_value(PeerAuthentication::crd()).unwrap();
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
        let text = crd.to_string();
        for forbidden in [
            "x-kubernetes-preserve-unknown-fields",
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
}
