//! RequestAuthentication compilation with Istio's semantics: which policies apply to a workload
//! (the same selection as AuthorizationPolicy's, [`crate::authorization::selects`]), and their
//! JWT rules merged into the proxy's [`InboundAuthentication`], each with its key set resolved.
//!
//! Key sets, as istiod resolves them: an inline `jwks` wins; else `jwksUri`; else the issuer's
//! OpenID discovery document names the key set's URL. Fetched sets come from
//! [`crate::jwks::JwksResolver`]; a set not (yet) fetched compiles as an empty one, so every
//! token of that issuer is refused (istiod inlines a key set no token matches for the same
//! reason) while requests without a token still pass.
//!
//! A policy attached with `targetRef`/`targetRefs` is for a gateway, waypoint or Service, not
//! for sidecars: it is left out, as Istio does not apply it to sidecars either.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use trellis_api::istio::duration;
use trellis_api::{MeshSpec, RequestAuthentication};
use trellis_config::authn::{ClaimToHeader, InboundAuthentication, JwtHeader, JwtRule};

use crate::authorization::{Workload, selects};

/// Istio's default for a JWT rule's `timeout` (fetching its key set).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// istiod's default refresh interval, used when `Mesh.spec.jwt.jwksRefreshInterval` is unusable.
const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The shortest refresh interval honoured, so a `0s` cannot turn fetching into a busy loop.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How often key sets are fetched again (`Mesh.spec.jwt.jwksRefreshInterval`).
pub fn refresh_interval(mesh: &MeshSpec) -> Duration {
    duration::parse(&mesh.jwt.jwks_refresh_interval)
        .unwrap_or(DEFAULT_REFRESH_INTERVAL)
        .max(MIN_REFRESH_INTERVAL)
}

/// Where a rule's key set is fetched from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JwksSource {
    /// `jwksUri`.
    Uri(String),
    /// The `jwks_uri` of `<issuer>/.well-known/openid-configuration`.
    Discovery { issuer: String },
}

/// A key set to keep fetched, with how long one fetch may take.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fetch {
    pub source: JwksSource,
    pub timeout: Duration,
}

/// What a rule's keys are resolved from.
fn key_source(rule: &trellis_api::security::JwtRule) -> Option<JwksSource> {
    if !rule.jwks.is_empty() {
        None
    } else if !rule.jwks_uri.is_empty() {
        Some(JwksSource::Uri(rule.jwks_uri.clone()))
    } else {
        Some(JwksSource::Discovery {
            issuer: rule.issuer.clone(),
        })
    }
}

/// Every key set the policies need fetched (sidecar policies only).
pub fn fetches(policies: &[std::sync::Arc<RequestAuthentication>]) -> BTreeSet<Fetch> {
    policies
        .iter()
        .filter(|policy| !policy.spec.has_target_ref())
        .flat_map(|policy| &policy.spec.jwt_rules)
        .filter_map(|rule| {
            let timeout = duration::parse(&rule.timeout).unwrap_or(DEFAULT_FETCH_TIMEOUT);
            Some(Fetch {
                source: key_source(rule)?,
                timeout,
            })
        })
        .collect()
}

/// The JWT rules of the policies that apply to `workload`, in a stable order (namespace, then
/// name, then the policy's own order). `key_sets` are the fetched key set documents by source.
pub fn for_workload<'a>(
    policies: impl IntoIterator<Item = &'a RequestAuthentication>,
    root_namespace: &str,
    workload: &Workload,
    key_sets: &BTreeMap<JwksSource, String>,
) -> InboundAuthentication {
    let mut applicable: Vec<&RequestAuthentication> = policies
        .into_iter()
        .filter(|policy| {
            !policy.spec.has_target_ref()
                && selects(
                    policy.metadata.namespace.as_deref(),
                    policy.spec.workload_labels(),
                    root_namespace,
                    workload,
                )
        })
        .collect();
    applicable.sort_by_key(|policy| policy_name(policy));
    let jwt_rules = applicable
        .into_iter()
        .flat_map(|policy| {
            let name = policy_name(policy);
            policy
                .spec
                .jwt_rules
                .iter()
                .map(move |rule| compile_rule(&name, rule, key_sets))
        })
        .collect();
    InboundAuthentication { jwt_rules }
}

/// `<namespace>.<name>`, the name a proxy reports for a policy.
fn policy_name(policy: &RequestAuthentication) -> String {
    format!(
        "{}.{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

fn compile_rule(
    policy: &str,
    rule: &trellis_api::security::JwtRule,
    key_sets: &BTreeMap<JwksSource, String>,
) -> JwtRule {
    let jwks = match key_source(rule) {
        None => rule.jwks.clone(),
        Some(source) => key_sets.get(&source).cloned().unwrap_or_default(),
    };
    JwtRule {
        policy: policy.to_owned(),
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        jwks,
        from_headers: rule
            .from_headers
            .iter()
            .map(|header| JwtHeader {
                name: header.name.to_ascii_lowercase(),
                prefix: header.prefix.clone(),
            })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        output_payload_to_header: rule.output_payload_to_header.to_ascii_lowercase(),
        output_claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|output| ClaimToHeader {
                header: output.header.to_ascii_lowercase(),
                claim: output.claim.clone(),
            })
            .collect(),
        forward_original_token: rule.forward_original_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> RequestAuthentication {
        serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"namespace": namespace, "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: namespace.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addresses: None,
        }
    }

    #[test]
    fn policies_apply_by_namespace_root_namespace_and_selector() {
        let rule =
            |issuer: &str| json!({"jwtRules": [{"issuer": issuer, "jwks": "{\"keys\":[]}"}]});
        let mut selected = rule("selected");
        selected["selector"] = json!({"matchLabels": {"app": "web"}});
        let mut gateway = rule("gateway");
        gateway["targetRef"] = json!({"kind": "Gateway", "name": "gw"});
        let mut root_selected = rule("root-selected");
        root_selected["selector"] = json!({"matchLabels": {"app": "web"}});
        let policies = [
            policy("shop", "b-namespace", rule("namespace")),
            policy("shop", "a-selected", selected),
            policy("shop", "gateway", gateway),
            policy("istio-system", "mesh", rule("mesh")),
            policy("istio-system", "root-selected", root_selected),
            policy("other", "elsewhere", rule("elsewhere")),
        ];
        let issuers = |w: &Workload| -> Vec<String> {
            for_workload(&policies, "istio-system", w, &BTreeMap::new())
                .jwt_rules
                .into_iter()
                .map(|r| r.issuer)
                .collect()
        };
        assert_eq!(
            issuers(&workload("shop", &[("app", "web")])),
            ["mesh", "root-selected", "selected", "namespace"]
        );
        assert_eq!(
            issuers(&workload("shop", &[("app", "db")])),
            ["mesh", "namespace"]
        );
        assert_eq!(
            issuers(&workload("third", &[("app", "web")])),
            ["mesh", "root-selected"]
        );
    }

    #[test]
    fn key_sets_come_inline_from_the_uri_or_from_discovery() {
        let spec = json!({"jwtRules": [
            {"issuer": "inline", "jwks": "{\"keys\":[1]}", "jwksUri": "https://ignored/jwks"},
            {"issuer": "by-uri", "jwksUri": "https://idp.example/jwks", "timeout": "2s",
             "fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}],
             "outputPayloadToHeader": "X-Payload"},
            {"issuer": "https://discovered.example"},
            {"issuer": "not-fetched-yet", "jwksUri": "https://slow.example/jwks"},
        ]});
        let policies = vec![Arc::new(policy("shop", "jwt", spec))];
        assert_eq!(
            fetches(&policies),
            BTreeSet::from([
                Fetch {
                    source: JwksSource::Uri("https://idp.example/jwks".into()),
                    timeout: Duration::from_secs(2)
                },
                Fetch {
                    source: JwksSource::Uri("https://slow.example/jwks".into()),
                    timeout: DEFAULT_FETCH_TIMEOUT
                },
                Fetch {
                    source: JwksSource::Discovery {
                        issuer: "https://discovered.example".into()
                    },
                    timeout: DEFAULT_FETCH_TIMEOUT
                },
            ])
        );
        let key_sets = BTreeMap::from([
            (
                JwksSource::Uri("https://idp.example/jwks".into()),
                "uri-keys".to_owned(),
            ),
            (
                JwksSource::Discovery {
                    issuer: "https://discovered.example".into(),
                },
                "discovered-keys".to_owned(),
            ),
        ]);
        let compiled = for_workload(
            policies.iter().map(Arc::as_ref),
            "istio-system",
            &workload("shop", &[]),
            &key_sets,
        );
        let keys: Vec<&str> = compiled.jwt_rules.iter().map(|r| r.jwks.as_str()).collect();
        assert_eq!(keys, ["{\"keys\":[1]}", "uri-keys", "discovered-keys", ""]);
        let by_uri = &compiled.jwt_rules[1];
        assert_eq!(by_uri.policy, "shop.jwt");
        assert_eq!(
            by_uri.from_headers,
            [JwtHeader {
                name: "x-jwt".into(),
                prefix: "Token ".into()
            }]
        );
        assert_eq!(by_uri.output_payload_to_header, "x-payload");
        compiled.validate().unwrap();
    }
}
