//! The compiled form of Istio's `RequestAuthentication`, as a proxy receives it in
//! `ProxyConfig.inbound.authentication`: the JWT rules of every RequestAuthentication that
//! applies to the proxy's workload, merged (as Istio merges them), each with its key set already
//! resolved. The operator fetches `jwksUri` (or the issuer's OpenID discovery document) and
//! inlines the key set, as istiod does, so a proxy never fetches keys and verifies every token
//! against the keys of its current config only.
//!
//! The proxy owns what the rules mean on a request (where a token is read, which rule verifies
//! it, what a failure answers); this module owns their shape and what must hold for them.

use serde::{Deserialize, Serialize};

/// The JWT rules that apply to one workload. Empty: no RequestAuthentication, so no request is
/// authenticated and every token is left alone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InboundAuthentication {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

impl InboundAuthentication {
    pub fn is_empty(&self) -> bool {
        self.jwt_rules.is_empty()
    }

    /// What must hold for the proxy to apply the rules as written.
    pub fn validate(&self) -> Result<(), AuthenticationError> {
        self.jwt_rules.iter().try_for_each(JwtRule::validate)
    }
}

/// Istio's `JWTRule`, with its key set resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// `<namespace>.<name>` of the RequestAuthentication, reported when a token fails.
    pub policy: String,
    /// The `iss` a token must carry for this rule to verify it.
    pub issuer: String,
    /// A token must name one of these in `aud`; none: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The JSON Web Key Set document (inline `jwks`, or what `jwksUri` served). Empty while the
    /// keys could not be fetched: every token of this issuer is then rejected, as Istio does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jwks: String,
    /// Headers a token is read from. With no header, parameter or cookie configured a token is
    /// read from `Authorization: Bearer <token>` and the `access_token` query parameter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Header that receives the verified payload (base64url JSON), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_payload_to_header: String,
    /// Headers that receive a claim of the verified token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request forwarded to the application (default: removed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
}

/// Where Istio looks for a token when a rule names no location.
pub const DEFAULT_HEADER: &str = "authorization";
pub const DEFAULT_HEADER_PREFIX: &str = "Bearer ";
pub const DEFAULT_PARAM: &str = "access_token";

impl JwtRule {
    /// The headers tokens are read from (the default `Authorization: Bearer` when the rule names
    /// no location at all).
    pub fn headers(&self) -> Vec<JwtHeader> {
        if self.names_no_location() {
            vec![JwtHeader {
                name: DEFAULT_HEADER.to_owned(),
                prefix: DEFAULT_HEADER_PREFIX.to_owned(),
            }]
        } else {
            self.from_headers.clone()
        }
    }

    /// The query parameters tokens are read from (`access_token` by default).
    pub fn params(&self) -> Vec<String> {
        if self.names_no_location() {
            vec![DEFAULT_PARAM.to_owned()]
        } else {
            self.from_params.clone()
        }
    }

    fn names_no_location(&self) -> bool {
        self.from_headers.is_empty() && self.from_params.is_empty() && self.from_cookies.is_empty()
    }

    fn validate(&self) -> Result<(), AuthenticationError> {
        let invalid = |reason: String| AuthenticationError::InvalidRule {
            policy: self.policy.clone(),
            reason,
        };
        if self.policy.is_empty() {
            return Err(invalid("the rule names no RequestAuthentication".into()));
        }
        if self.issuer.is_empty() {
            return Err(invalid("the rule has no issuer".into()));
        }
        let header_names = self
            .from_headers
            .iter()
            .map(|h| h.name.as_str())
            .chain(Some(self.output_payload_to_header.as_str()).filter(|name| !name.is_empty()))
            .chain(
                self.output_claim_to_headers
                    .iter()
                    .map(|c| c.header.as_str()),
            );
        for name in header_names {
            if !is_lowercase_header_name(name) {
                return Err(invalid(format!(
                    "{name:?} is not a valid lowercase HTTP header name"
                )));
            }
        }
        Ok(())
    }
}

/// Header names travel lowercase (HTTP/2 requires it and `http::HeaderMap` stores them so).
pub fn is_lowercase_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// A header a token is read from; `prefix` (such as `Bearer `) is stripped first, and a value
/// without it holds no token for this location.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// Lowercase.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Istio's `ClaimToHeader`: the claim's value (a string, a number, a boolean, or a list of them
/// joined with commas) in `header`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// Lowercase.
    pub header: String,
    pub claim: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthenticationError {
    #[error("request authentication {policy}: {reason}")]
    InvalidRule { policy: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rule_without_locations_reads_istios_defaults() {
        let rule: JwtRule =
            serde_json::from_value(json!({"policy": "foo.jwt", "issuer": "issuer-foo"})).unwrap();
        rule.validate().unwrap();
        assert_eq!(
            rule.headers(),
            [JwtHeader {
                name: "authorization".into(),
                prefix: "Bearer ".into()
            }]
        );
        assert_eq!(rule.params(), ["access_token"]);

        let only_param = JwtRule {
            from_params: vec!["token".into()],
            ..rule.clone()
        };
        assert_eq!(only_param.headers(), []);
        assert_eq!(only_param.params(), ["token"]);
        let only_cookie = JwtRule {
            from_cookies: vec!["session".into()],
            ..rule
        };
        assert!(only_cookie.headers().is_empty() && only_cookie.params().is_empty());
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let base = json!({"policy": "foo.jwt", "issuer": "issuer-foo"});
        let table = [
            (json!({"policy": "foo.jwt"}), "no issuer"),
            (
                json!({"policy": "", "issuer": "i"}),
                "names no RequestAuthentication",
            ),
            (
                json!({"policy": "foo.jwt", "issuer": "i", "fromHeaders": [{"name": "X-Jwt"}]}),
                "\"X-Jwt\"",
            ),
            (
                json!({"policy": "foo.jwt", "issuer": "i", "outputPayloadToHeader": "bad header"}),
                "\"bad header\"",
            ),
        ];
        for (rule, message) in table {
            let mut rule = rule;
            if rule.get("issuer").is_none() {
                rule["issuer"] = json!("");
            }
            let parsed: JwtRule = serde_json::from_value(rule).unwrap();
            let error = parsed.validate().unwrap_err().to_string();
            assert!(error.contains(message), "{error:?} should name {message:?}");
        }
        let fine: JwtRule = serde_json::from_value(base).unwrap();
        let config = InboundAuthentication {
            jwt_rules: vec![fine],
        };
        config.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({"jwtRules": [{"policy": "foo.jwt", "issuer": "issuer-foo"}]}),
            "defaults stay off the wire"
        );
    }
}
