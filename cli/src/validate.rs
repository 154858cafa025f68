//! `trellisctl validate`: checks Istio resources in YAML files before they reach a cluster, with
//! the same rules the operator's admission webhook applies (`trellis_api::validate`), in the
//! manner of `istioctl validate -f`. Pure apart from reading the inputs: a text in, a
//! [`Report`] out.
//!
//! A VirtualService's subsets are checked against the DestinationRules of the same inputs and
//! namespace only (the cluster's own rules are not read). Documents of other kinds (Deployments,
//! Services...) are counted as skipped, not judged.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use trellis_api::networking::{DestinationRule, EXTRA_VERSIONS, NETWORKING_GROUP, STORED_VERSION};
use trellis_api::security::{SECURITY_EXTRA_VERSIONS, SECURITY_GROUP};
use trellis_api::validate::{Kind, Rejection, validate_object};

/// One YAML document of an input.
#[derive(Debug, Clone)]
pub struct Document {
    /// Where it came from: `file.yaml#2` (documents counted from 1).
    pub source: String,
    pub value: Value,
}

/// What validating a set of documents found.
#[derive(Debug, Default)]
pub struct Report {
    pub valid: usize,
    pub skipped: usize,
    /// The refused documents: where, which object, and why.
    pub invalid: Vec<Finding>,
}

#[derive(Debug)]
pub struct Finding {
    pub source: String,
    /// `Kind namespace/name`.
    pub object: String,
    pub problem: Problem,
}

#[derive(Debug)]
pub enum Problem {
    /// The object breaks the admission rules.
    Rejected(Rejection),
    /// `apiVersion` names a version of the group that is not served.
    UnservedVersion(String),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::Rejected(rejection) => {
                for error in &rejection.errors {
                    writeln!(f, "{}: {}: {error}", self.source, self.object)?;
                }
                Ok(())
            }
            Problem::UnservedVersion(version) => writeln!(
                f,
                "{}: {}: apiVersion {version} is not served",
                self.source, self.object
            ),
        }
    }
}

/// Splits a YAML text (`---`-separated documents) into documents; empty ones are dropped.
/// Err names the document that is not YAML.
pub fn documents(text: &str, name: &str) -> Result<Vec<Document>, String> {
    let mut found = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = format!("{name}#{}", index + 1);
        let value = Value::deserialize(document).map_err(|e| format!("{source}: not YAML: {e}"))?;
        if !value.is_null() {
            found.push(Document { source, value });
        }
    }
    Ok(found)
}

/// Validates every document; `namespace` stands in for objects that name none.
pub fn validate(documents: &[Document], namespace: &str) -> Report {
    let namespace_of = |value: &Value| {
        value["metadata"]["namespace"]
            .as_str()
            .unwrap_or(namespace)
            .to_owned()
    };
    // The DestinationRules given, for the VirtualServices' subset checks (read leniently: a
    // broken rule is reported on its own).
    let rules: Vec<(String, DestinationRule)> = documents
        .iter()
        .filter(|d| kind(&d.value).is_some_and(|(k, _)| k == Kind::DestinationRule))
        .filter_map(|d| {
            let rule = serde_json::from_value(d.value.clone()).ok()?;
            Some((namespace_of(&d.value), rule))
        })
        .collect();
    let mut report = Report::default();
    for document in documents {
        let Some((kind, version)) = kind(&document.value) else {
            report.skipped += 1;
            continue;
        };
        let namespace = namespace_of(&document.value);
        let object = format!(
            "{kind:?} {namespace}/{}",
            document.value["metadata"]["name"].as_str().unwrap_or("")
        );
        let problem = if served(kind, &version) {
            let in_namespace: Vec<DestinationRule> = rules
                .iter()
                .filter(|(ns, _)| *ns == namespace)
                .map(|(_, rule)| rule.clone())
                .collect();
            validate_object(kind, &document.value, &namespace, &in_namespace)
                .err()
                .map(Problem::Rejected)
        } else {
            Some(Problem::UnservedVersion(version))
        };
        match problem {
            None => report.valid += 1,
            Some(problem) => report.invalid.push(Finding {
                source: document.source.clone(),
                object,
                problem,
            }),
        }
    }
    report
}

/// The kind and version of an object of the validated groups; `None` for anything else.
fn kind(value: &Value) -> Option<(Kind, String)> {
    let (group, version) = value["apiVersion"].as_str()?.split_once('/')?;
    let kind = Kind::from_group_and_name(group, value["kind"].as_str()?)?;
    Some((kind, version.to_owned()))
}

fn served(kind: Kind, version: &str) -> bool {
    let extra = match kind {
        Kind::PeerAuthentication | Kind::RequestAuthentication | Kind::AuthorizationPolicy => {
            SECURITY_EXTRA_VERSIONS
        }
        Kind::VirtualService | Kind::DestinationRule | Kind::ServiceEntry => EXTRA_VERSIONS,
    };
    version == STORED_VERSION || extra.contains(&version)
}

/// The API groups whose kinds are validated, for the help text.
pub const GROUPS: [&str; 2] = [NETWORKING_GROUP, SECURITY_GROUP];

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::fixtures::ISTIO_EXAMPLES;

    fn report(text: &str) -> Report {
        validate(&documents(text, "in.yaml").unwrap(), "default")
    }

    #[test]
    fn istio_documentation_examples_are_valid() {
        let text: Vec<&str> = ISTIO_EXAMPLES.iter().map(|(_, yaml)| *yaml).collect();
        let report = report(&text.join("\n---\n"));
        assert!(report.invalid.is_empty(), "{:?}", report.invalid);
        assert_eq!(report.valid, ISTIO_EXAMPLES.len());
    }

    #[test]
    fn findings_name_the_document_object_and_field() {
        let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow}
spec:
  rules:
  - from:
    - source: {principles: [cluster.local/ns/a/sa/b]}
---
apiVersion: networking.istio.io/v2
kind: ServiceEntry
metadata: {name: future}
spec: {hosts: [a.example.com]}
"#;
        let report = report(text);
        assert_eq!((report.valid, report.skipped), (1, 1), "{report:?}");
        let lines: Vec<String> = report.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("in.yaml#3: VirtualService shop/reviews: spec.http[0].route[0]"),
            "{lines:?}"
        );
        assert!(lines[0].contains("v2"), "{lines:?}");
        assert!(
            lines[1].starts_with(
                "in.yaml#4: AuthorizationPolicy default/allow: \
                 spec.rules[0].from[0].source.principles: unknown field"
            ),
            "{lines:?}"
        );
        assert_eq!(
            lines[2],
            "in.yaml#5: ServiceEntry default/future: apiVersion v2 is not served\n"
        );
    }

    #[test]
    fn text_that_is_not_yaml_names_its_document() {
        let error = documents("kind: A\n---\nkey: [unclosed\n", "bad.yaml").unwrap_err();
        assert!(error.starts_with("bad.yaml#2: not YAML"), "{error}");
        assert!(documents("---\n---\n", "empty.yaml").unwrap().is_empty());
    }
}
