//! Istio's `networking.istio.io` traffic resources — `VirtualService`, `DestinationRule` and
//! `ServiceEntry` — with every field of Istio's API under Istio's JSON names, so existing YAML
//! applies unchanged; the CRDs served for them (`v1` stored, `v1beta1` and `v1alpha3` served
//! with the same schema), validated by [`crate::validate`] in the operator's admission webhook.
//!
//! A misspelt field is refused by the API server, whatever the client: the published schemas
//! keep unknown fields ([`crate::schema`]) so that the webhook's [`decode_strict`] sees and
//! refuses them (pruning would drop a typo silently before admission on servers without strict
//! field validation, as Kubernetes before 1.25).
//!
//! Optional fields are `Option`s in Rust (absent and zero differ in Istio, e.g. `retries` or
//! `consecutive5xxErrors`), but the published schema is made non-`nullable`
//! ([`networking_crd`]): the API server publishes nullable fields to OpenAPI v2 without their
//! properties, and `kubectl` could then no longer refuse a misspelt field inside them.

pub mod destination_rule;
pub mod service_entry;
pub mod virtual_service;

use crate::schema::keep_unknown_fields;
pub use crate::schema::{DecodeError, decode_strict};

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition,
};
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use destination_rule::{DestinationRule, DestinationRuleSpec};
pub use service_entry::{ServiceEntry, ServiceEntrySpec};
pub use virtual_service::{VirtualService, VirtualServiceSpec};

/// API group of Istio's traffic resources.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
/// The stored version; the generated CRDs carry it first.
pub const STORED_VERSION: &str = "v1";
/// Versions served besides [`STORED_VERSION`], with the same schema, as Istio serves them.
pub const EXTRA_VERSIONS: &[&str] = &["v1beta1", "v1alpha3"];

/// Istio's `StringMatch`: at most one of `exact`, `prefix` or `regex` (RE2 syntax).
///
/// `{}` is valid in Istio: for a header or query parameter it asks only that the key be
/// present; elsewhere it matches anything.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    /// `{}`: no condition on the value.
    Any,
}

/// The wire shape of [`StringMatch`]: a protobuf `oneof`, i.e. an object with at most one key.
#[derive(Serialize, Deserialize, Default)]
struct StringMatchFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = StringMatchFields::default();
        match self {
            Self::Exact(value) => fields.exact = Some(value.clone()),
            Self::Prefix(value) => fields.prefix = Some(value.clone()),
            Self::Regex(value) => fields.regex = Some(value.clone()),
            Self::Any => {}
        }
        fields.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let fields = StringMatchFields::deserialize(deserializer)?;
        match (fields.exact, fields.prefix, fields.regex) {
            (None, None, None) => Ok(Self::Any),
            (Some(value), None, None) => Ok(Self::Exact(value)),
            (None, Some(value), None) => Ok(Self::Prefix(value)),
            (None, None, Some(value)) => Ok(Self::Regex(value)),
            _ => Err(D::Error::custom(
                "only one of `exact`, `prefix` or `regex` may be set",
            )),
        }
    }
}

impl JsonSchema for StringMatch {
    fn schema_name() -> Cow<'static, str> {
        "StringMatch".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // A closed object with at most one property: structural (no oneOf), and the API server
        // itself refuses two alternatives at once.
        json_schema!({
            "type": "object",
            "properties": {
                "exact": {"type": "string"},
                "prefix": {"type": "string"},
                "regex": {"type": "string", "description": "RE2 syntax."},
            },
            "maxProperties": 1,
        })
    }
}

/// Istio's `Percent`: a fraction of traffic, `0.0..=100.0`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
pub struct Percent {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub value: f64,
}

// Skipping zero keeps `default: 0.0` out of the schema (the API server would otherwise write it
// into every stored object) while `{}` still decodes, as in Istio.
fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

/// Istio's `PortSelector`: a port of the destination service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PortSelector {
    /// Valid port number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
}

/// Istio's `istio.type.v1beta1.WorkloadSelector` (as in `DestinationRule.workloadSelector`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// The CRD of a networking kind as installed: `v1` stored, [`EXTRA_VERSIONS`] served with the
/// same schema (conversion `None`, as the schemas are identical), a schema without `nullable`
/// so that `kubectl` validates the types inside optional objects, and every object keeping
/// unknown fields for the admission webhook to refuse (see the module documentation).
pub fn networking_crd<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut crd = K::crd();
    let mut value = serde_json::to_value(&crd).expect("a CRD always serializes");
    strip_nullable(&mut value);
    keep_unknown_fields(&mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]);
    crd = serde_json::from_value(value).expect("removing `nullable` keeps the CRD valid");
    let stored = crd.spec.versions[0].clone();
    for name in EXTRA_VERSIONS {
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

/// Removes `nullable: true` and the `null` that schemars lists among an optional enum's values.
fn strip_nullable(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("nullable");
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(strip_nullable);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nullable),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
