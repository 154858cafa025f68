//! Istio's `networking.istio.io` traffic resources — `VirtualService`, `DestinationRule` and
//! `ServiceEntry` — with every field of Istio's API under Istio's JSON names, so existing YAML
//! applies unchanged; the CRDs served for them (`v1` stored, `v1beta1` and `v1alpha3` served
//! with the same schema); and their validation ([`validate`]), which the operator's admission
//! webhook runs.
//!
//! A misspelt field is refused by the API server, whatever the client: every object of the
//! published schemas keeps unknown fields (`x-kubernetes-preserve-unknown-fields`) instead of
//! pruning them, so they reach the admission webhook, whose [`decode_strict`] refuses the first
//! one naming its path. (Pruning would drop a typo silently before admission on servers without
//! strict field validation, as Kubernetes before 1.25.) The types themselves decode leniently,
//! ignoring unknown fields, so that an object stored while the webhook was not yet registered
//! can never stop a watch from decoding.
//!
//! Optional fields are `Option`s in Rust (absent and zero differ in Istio, e.g. `retries` or
//! `consecutive5xxErrors`), but the published schema is made non-`nullable`
//! ([`networking_crd`]): the API server publishes nullable fields to OpenAPI v2 without their
//! properties, and `kubectl` could then no longer refuse a misspelt field inside them.

pub mod destination_rule;
pub mod examples;
pub mod service_entry;
pub mod validate;
pub mod virtual_service;

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

/// Marks every object schema that lists its properties with
/// `x-kubernetes-preserve-unknown-fields`: the API server then keeps a misspelt field for the
/// webhook to refuse instead of dropping it. Free-form maps (`additionalProperties`) are left
/// as they are: every key of theirs is valid.
fn keep_unknown_fields(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            if map.get("type").and_then(serde_json::Value::as_str) == Some("object")
                && map.contains_key("properties")
            {
                map.insert(
                    "x-kubernetes-preserve-unknown-fields".to_owned(),
                    serde_json::Value::Bool(true),
                );
            }
            map.values_mut().for_each(keep_unknown_fields);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(keep_unknown_fields),
        _ => {}
    }
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

/// Decodes a value strictly into `T`: a field `T` does not know is an error, like a value of the
/// wrong type. The error names the path of the offending field
/// (`http[0].route[0].destination.subsett: unknown field "subsett"`).
pub fn decode_strict<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, DecodeError> {
    let mut track = serde_path_to_error::Track::new();
    let mut unknown = Vec::new();
    let decoded = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(value, &mut track),
        |path| unknown.push(field_path(&path)),
    );
    let decoded = decoded.map_err(|error: serde_json::Error| DecodeError {
        path: track.path().to_string(),
        message: error.to_string(),
    })?;
    match unknown.into_iter().next() {
        None => Ok(decoded),
        Some((path, field)) => Err(DecodeError {
            path,
            message: format!("unknown field {field:?}"),
        }),
    }
}

/// The dotted path of an ignored field (as `serde_path_to_error` writes paths) and its name.
fn field_path(path: &serde_ignored::Path<'_>) -> (String, String) {
    use serde_ignored::Path;
    match path {
        Path::Root => (".".to_owned(), String::new()),
        Path::Seq { parent, index } => {
            let (parent, _) = field_path(parent);
            (
                format!("{}[{index}]", parent.trim_start_matches('.')),
                String::new(),
            )
        }
        Path::Map { parent, key } => {
            let (parent, _) = field_path(parent);
            let path = match parent.as_str() {
                "." => key.clone(),
                parent => format!("{parent}.{key}"),
            };
            (path, key.clone())
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// A field that failed to decode: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Dotted path from the decoded value's root (`.` when the root itself failed).
    pub path: String,
    pub message: String,
}

#[cfg(test)]
mod tests;
