//! The compiled form of an external authorizer, as a proxy receives it inside a CUSTOM
//! policy ([`crate::authz::CustomPolicy`]): Istio's MeshConfig `extensionProviders[]` entries
//! of kind `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`, resolved by the operator from the
//! `Mesh` (`spec.extensionProviders`) — durations in milliseconds, the status on error as a
//! number, header patterns pre-parsed and lowercase. The proxy asks the authorizer with
//! Envoy's ext_authz protocols; what the fields mean at request time is documented where they
//! are enforced (`trellis-proxy`'s `ext_authz` module).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Istio's default `timeout` of both provider kinds (600 s).
pub const DEFAULT_TIMEOUT_MS: u64 = 600_000;
/// Istio's default `statusOnError` (403 Forbidden).
pub const DEFAULT_STATUS_ON_ERROR: u16 = 403;

/// One external authorizer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzProvider {
    /// `extensionProviders[].name`, as CUSTOM policies name it.
    pub name: String,
    /// The host the proxy dials: the provider's `service` without its `<namespace>/` prefix
    /// (`ext-authz.foo.svc.cluster.local`).
    pub host: String,
    pub port: u16,
    /// How long the proxy waits for the authorizer's answer; past it the check failed.
    pub timeout_ms: u64,
    /// A failed check (unreachable, timed out, an HTTP 5xx or a gRPC error) allows the request
    /// instead of denying it.
    pub fail_open: bool,
    /// The status a client gets when the check failed and `fail_open` is off.
    pub status_on_error: u16,
    pub protocol: ExtAuthzProtocol,
}

/// Which of Envoy's ext_authz protocols the authorizer speaks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ExtAuthzProtocol {
    /// `envoyExtAuthzHttp`: the request's method, path and chosen headers, without a body,
    /// as a plain HTTP request; a 200 allows.
    Http(HttpCheck),
    /// `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check`.
    Grpc,
}

/// The HTTP protocol's settings, with header name patterns ([`HeaderPattern`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// Put before the request's path in the check request (`/check` + `/admin`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path_prefix: String,
    /// Client request headers sent along (`includeRequestHeadersInCheck`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers: Vec<HeaderPattern>,
    /// Fixed headers added to every check request, overriding the client's
    /// (`includeAdditionalHeadersInCheck`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub additional_headers: BTreeMap<String, String>,
    /// The authorizer's response headers copied into the allowed request, overriding the
    /// client's (`headersToUpstreamOnAllow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<HeaderPattern>,
    /// The authorizer's response headers a denied client gets (`headersToDownstreamOnDeny`);
    /// empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<HeaderPattern>,
}

/// A header name pattern as Istio writes them for ext_authz providers: exact, `prefix*` or
/// `*suffix` (no presence match), lowercase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum HeaderPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl HeaderPattern {
    /// Parses Istio's syntax, lowercased; `None` for `*` alone or an empty name.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.to_ascii_lowercase();
        let pattern = if let Some(suffix) = text.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else if let Some(prefix) = text.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::Exact(text)
        };
        (!pattern.text().is_empty()).then_some(pattern)
    }

    fn text(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Prefix(text) | Self::Suffix(text) => text,
        }
    }

    /// Whether the (lowercase) header name matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => name.ends_with(suffix.as_str()),
        }
    }
}

/// What is wrong with a provider.
#[derive(Debug, thiserror::Error)]
#[error("external authorizer {provider:?}: {reason}")]
pub struct ProviderError {
    pub provider: String,
    pub reason: String,
}

impl ExtAuthzProvider {
    /// What must hold for the proxy to ask the authorizer as configured.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let invalid = |reason: &str| ProviderError {
            provider: self.name.clone(),
            reason: reason.to_owned(),
        };
        if self.name.is_empty() {
            return Err(invalid("no name"));
        }
        if self.host.is_empty() || self.port == 0 {
            return Err(invalid("no service host or port"));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("a zero timeout"));
        }
        if !(200..=599).contains(&self.status_on_error) {
            return Err(invalid(
                "statusOnError is not an HTTP status from 200 to 599",
            ));
        }
        if let ExtAuthzProtocol::Http(check) = &self.protocol {
            if !check.path_prefix.is_empty() && !check.path_prefix.starts_with('/') {
                return Err(invalid("pathPrefix does not start with /"));
            }
            let patterns = check
                .include_request_headers
                .iter()
                .chain(&check.headers_to_upstream_on_allow)
                .chain(&check.headers_to_downstream_on_deny);
            for pattern in patterns {
                if pattern.text().is_empty()
                    || pattern.text().bytes().any(|b| b.is_ascii_uppercase())
                {
                    return Err(invalid("a header pattern is empty or not lowercase"));
                }
            }
        }
        Ok(())
    }
}

/// Whether a (lowercase) header name matches one of `patterns`.
pub fn header_listed(patterns: &[HeaderPattern], name: &str) -> bool {
    patterns.iter().any(|pattern| pattern.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider(protocol: serde_json::Value) -> serde_json::Value {
        json!({
            "name": "opa", "host": "opa.authz.svc.cluster.local", "port": 9191,
            "timeoutMs": 1000, "failOpen": false, "statusOnError": 403, "protocol": protocol
        })
    }

    #[test]
    fn both_protocols_round_trip_through_json() {
        for protocol in [
            json!({"kind": "grpc"}),
            json!({"kind": "http", "pathPrefix": "/check", "includeRequestHeaders": [{"exact": "x-user"}],
                   "additionalHeaders": {"x-from": "mesh"}, "headersToUpstreamOnAllow": [{"prefix": "x-auth-"}],
                   "headersToDownstreamOnDeny": [{"suffix": "-reason"}]}),
        ] {
            let text = provider(protocol);
            let parsed: ExtAuthzProvider = serde_json::from_value(text.clone()).unwrap();
            parsed.validate().unwrap();
            assert_eq!(serde_json::to_value(&parsed).unwrap(), text);
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let table = [
            (json!({"port": 0}), "no service host or port"),
            (json!({"host": ""}), "no service host or port"),
            (json!({"timeoutMs": 0}), "zero timeout"),
            (json!({"statusOnError": 99}), "statusOnError"),
            (
                json!({"protocol": {"kind": "http", "pathPrefix": "check"}}),
                "pathPrefix",
            ),
            (
                json!({"protocol": {"kind": "http", "includeRequestHeaders": [{"prefix": ""}]}}),
                "header pattern",
            ),
            (
                json!({"protocol": {"kind": "http", "headersToUpstreamOnAllow": [{"exact": "X-User"}]}}),
                "header pattern",
            ),
        ];
        for (change, message) in table {
            let mut text = provider(json!({"kind": "grpc"}));
            for (key, value) in change.as_object().unwrap() {
                text[key] = value.clone();
            }
            let parsed: ExtAuthzProvider = serde_json::from_value(text).unwrap();
            let error = parsed.validate().unwrap_err().to_string();
            assert!(error.contains(message), "{error:?} should name {message:?}");
            assert!(error.contains("opa"), "{error:?} names the provider");
        }
    }

    #[test]
    fn header_patterns_match_names() {
        let patterns: Vec<HeaderPattern> = ["X-User", "x-auth-*", "*-reason"]
            .iter()
            .map(|text| HeaderPattern::parse(text).unwrap())
            .collect();
        assert_eq!(HeaderPattern::parse("*"), None, "no presence match");
        assert_eq!(HeaderPattern::parse(""), None);
        for (name, listed) in [
            ("x-user", true),
            ("x-username", false),
            ("x-auth-subject", true),
            ("x-deny-reason", true),
            ("authorization", false),
        ] {
            assert_eq!(header_listed(&patterns, name), listed, "{name}");
        }
    }
}
