//! What the Istio-compatible kinds (`networking.istio.io`, `security.istio.io`) share: their
//! published schemas keep unknown fields instead of pruning them ([`keep_unknown_fields`]), so
//! that a misspelt field reaches the admission webhook, whose [`decode_strict`] refuses it
//! naming its path. The types themselves ignore unknown fields, so an object stored while the
//! webhook was not yet registered never stops a watch from decoding.

/// Marks every object schema that lists its properties with
/// `x-kubernetes-preserve-unknown-fields`: the API server then keeps a misspelt field for the
/// webhook to refuse instead of dropping it. Free-form maps (`additionalProperties`) are left
/// as they are: every key of theirs is valid.
pub fn keep_unknown_fields(schema: &mut serde_json::Value) {
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

/// The paths of object schemas with properties but without `x-kubernetes-preserve-unknown-fields`
/// (`""` is the root), for tests of published schemas.
#[cfg(test)]
pub(crate) fn objects_dropping_unknown_fields(schema: &serde_json::Value) -> Vec<String> {
    fn walk(schema: &serde_json::Value, at: &str, found: &mut Vec<String>) {
        let Some(map) = schema.as_object() else {
            return;
        };
        if let Some(properties) = map.get("properties").and_then(|p| p.as_object()) {
            if map.get("x-kubernetes-preserve-unknown-fields")
                != Some(&serde_json::Value::Bool(true))
            {
                found.push(at.to_owned());
            }
            for (name, property) in properties {
                walk(property, &format!("{at}.{name}"), found);
            }
        }
        if let Some(items) = map.get("items") {
            walk(items, &format!("{at}[]"), found);
        }
        if let Some(values) = map.get("additionalProperties") {
            walk(values, &format!("{at}{{}}"), found);
        }
    }
    let mut found = Vec::new();
    walk(schema, "", &mut found);
    found
}
