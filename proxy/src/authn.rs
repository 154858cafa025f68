//! RequestAuthentication on inbound HTTP, with Istio's semantics: JWT verification against the
//! workload's compiled rules ([`InboundAuthentication`], key sets inlined by the operator), before
//! AuthorizationPolicy decides. [`Authenticator::authenticate`] is the one entry point: a request
//! without a token passes unauthenticated (no request principal, so a policy that requires one
//! denies it), a request whose every token verifies passes with the [`Authenticated`] claims,
//! and a request with a token that fails is refused (`401`).
//!
//! Which rule verifies a token: the one whose `issuer` is the token's `iss` among the rules that
//! read the location the token was found in (a header with its prefix, a query parameter or a
//! cookie; by default `Authorization: Bearer` and `access_token`). A token no such rule claims
//! fails ("Jwt issuer is not configured"), as in Envoy. Verification: the signature with the
//! key of the token's `kid` (every key of the algorithm's family when it names none), `exp` and
//! `nbf` with Envoy's 60 s of clock skew (a token without `exp` does not expire, as in Envoy),
//! and `aud` against the rule's audiences when it has any.
//!
//! After a success the token is removed from where it was found unless the rule keeps it
//! (`forwardOriginalToken`), and the rule's output headers get the payload and claims. Output
//! headers are always removed from the incoming request first, so the application never sees a
//! value the proxy did not verify.
//!
//! Key sets are parsed once per config ([`AuthenticatorCache`]), not per request.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{COOKIE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tracing::{info, warn};
use trellis_config::authn::{InboundAuthentication, JwtHeader, JwtRule};
use trellis_config::proxy::ProxyConfig;

use crate::http::reply::Reason;

/// Envoy's default clock skew for `exp` and `nbf`.
const CLOCK_SKEW_SECONDS: u64 = 60;

/// What a verified token says about the request (Istio's `request.auth.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    /// The verified payload.
    pub claims: Map<String, Value>,
}

impl Authenticated {
    /// The strings of the claim at `path` (`["groups"]`, `["a", "b"]` for a nested claim): the
    /// value itself when it is a string, each string of it when it is a list, else none.
    pub fn claim_strings(&self, path: &[String]) -> Vec<&str> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut value = self.claims.get(first);
        for key in rest {
            value = value.and_then(|v| v.get(key));
        }
        match value {
            Some(Value::String(text)) => vec![text.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// `request.auth.audiences`: the `aud` claim.
    pub fn audiences(&self) -> Vec<&str> {
        self.claim_strings(&["aud".to_owned()])
    }

    /// `request.auth.presenter`: the `azp` claim.
    pub fn presenter(&self) -> Option<&str> {
        self.claims.get("azp").and_then(Value::as_str)
    }
}

/// Why a token was refused; the text is Envoy's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    NoKey,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
    #[error("Jwt verification fails")]
    Signature,
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header(JwtHeader),
    Param(String),
    Cookie(String),
}

/// The rules of one config with their keys parsed.
#[derive(Default)]
pub struct Authenticator {
    rules: Vec<Rule>,
}

struct Rule {
    config: JwtRule,
    locations: Vec<Location>,
    keys: Vec<Key>,
}

struct Key {
    kid: Option<String>,
    decoding: DecodingKey,
    /// The key's family, as jsonwebtoken decides which algorithms a key verifies.
    family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Okp,
    Hmac,
}

impl Family {
    fn of(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Self::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => Self::Ec,
            Algorithm::EdDSA => Self::Okp,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Self::Hmac,
        }
    }
}

impl Authenticator {
    pub fn new(config: &InboundAuthentication) -> Self {
        let rules = config
            .jwt_rules
            .iter()
            .map(|rule| {
                let locations = rule
                    .headers()
                    .into_iter()
                    .map(Location::Header)
                    .chain(rule.params().into_iter().map(Location::Param))
                    .chain(rule.from_cookies.iter().cloned().map(Location::Cookie))
                    .collect();
                Rule {
                    keys: parse_keys(rule),
                    locations,
                    config: rule.clone(),
                }
            })
            .collect();
        Self { rules }
    }

    /// Authenticates the request and rewrites it for the application (see the module doc):
    /// `Ok(None)` without a token, `Ok(Some(_))` when every token verified, `Err` otherwise.
    pub fn authenticate(
        &self,
        headers: &mut HeaderMap,
        uri: &mut Uri,
    ) -> Result<Option<Authenticated>, Rejection> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        for rule in &self.rules {
            for name in output_headers(&rule.config) {
                headers.remove(name);
            }
        }
        let found = self.find_tokens(headers, uri);
        let mut verified: Vec<(&Rule, Location, Authenticated, &str)> = Vec::new();
        for (location, token) in &found {
            let (rule, authenticated) = self.verify(location, token)?;
            let payload = token.split('.').nth(1).unwrap_or_default();
            verified.push((rule, location.clone(), authenticated, payload));
        }
        for (rule, location, authenticated, payload) in &verified {
            if !rule.config.forward_original_token {
                remove_token(headers, uri, location);
            }
            output(headers, &rule.config, authenticated, payload);
        }
        // Several tokens: Istio leaves the principal undefined; the first one found is used.
        Ok(verified.into_iter().next().map(|(_, _, auth, _)| auth))
    }

    /// Every distinct token at a location some rule reads, in rule order.
    fn find_tokens(&self, headers: &HeaderMap, uri: &Uri) -> Vec<(Location, String)> {
        let mut found: Vec<(Location, String)> = Vec::new();
        for location in self.rules.iter().flat_map(|rule| &rule.locations) {
            for token in read_location(headers, uri, location) {
                let entry = (location.clone(), token);
                if !found.contains(&entry) {
                    found.push(entry);
                }
            }
        }
        found
    }

    fn verify(
        &self,
        location: &Location,
        token: &str,
    ) -> Result<(&Rule, Authenticated), Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
        let issuer = unverified_issuer(token).ok_or(Rejection::Malformed)?;
        let rule = self
            .rules
            .iter()
            .find(|rule| rule.config.issuer == issuer && rule.locations.contains(location))
            .ok_or(Rejection::UnknownIssuer)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = CLOCK_SKEW_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&rule.config.issuer]);
        validation.required_spec_claims.clear();
        if rule.config.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&rule.config.audiences);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        let candidates = rule.keys.iter().filter(|key| {
            key.family == Family::of(header.alg)
                && header
                    .kid
                    .as_ref()
                    .is_none_or(|kid| key.kid.as_ref() == Some(kid))
        });
        let mut rejection = Rejection::NoKey;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
                Ok(data) => {
                    let sub = data.claims.get("sub").and_then(Value::as_str).unwrap_or("");
                    return Ok((
                        rule,
                        Authenticated {
                            principal: format!("{issuer}/{sub}"),
                            claims: data.claims,
                        },
                    ));
                }
                Err(error) => {
                    rejection = match error.kind() {
                        ErrorKind::ExpiredSignature => Rejection::Expired,
                        ErrorKind::ImmatureSignature => Rejection::NotYetValid,
                        ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                            Rejection::Audience
                        }
                        _ => Rejection::Signature,
                    };
                    // Claims are checked after the signature: a claim failure is final.
                    if rejection != Rejection::Signature {
                        return Err(rejection);
                    }
                }
            }
        }
        Err(rejection)
    }
}

/// The keys of a rule's key set that jsonwebtoken can verify with; an unusable key is skipped
/// (and logged), an unusable set leaves none, so every token of the issuer fails.
fn parse_keys(rule: &JwtRule) -> Vec<Key> {
    if rule.jwks.is_empty() {
        return Vec::new();
    }
    let set: JwkSet = match serde_json::from_str(&rule.jwks) {
        Ok(set) => set,
        Err(error) => {
            warn!(policy = %rule.policy, issuer = %rule.issuer, %error, "unusable JWKS");
            return Vec::new();
        }
    };
    set.keys
        .iter()
        .filter_map(|jwk| {
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Okp,
                AlgorithmParameters::OctetKey(_) => Family::Hmac,
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(decoding) => Some(Key {
                    kid: jwk.common.key_id.clone(),
                    decoding,
                    family,
                }),
                Err(error) => {
                    warn!(policy = %rule.policy, kid = ?jwk.common.key_id, %error, "unusable JWK");
                    None
                }
            }
        })
        .collect()
}

/// `iss` of a token's payload, read before verification to pick the rule.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

fn read_location(headers: &HeaderMap, uri: &Uri, location: &Location) -> Vec<String> {
    match location {
        Location::Header(header) => headers
            .get_all(header.name.as_str())
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(|value| strip_prefix_ignoring_case(value, &header.prefix))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned)
            .collect(),
        Location::Param(name) => query_pairs(uri.query().unwrap_or_default())
            .filter(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.to_owned())
            .collect(),
        Location::Cookie(name) => headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.to_owned())
            .collect(),
    }
}

/// `value` without `prefix` (ASCII case ignored, as `Bearer` is a case-insensitive scheme);
/// `None` when it does not start with it.
fn strip_prefix_ignoring_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn remove_token(headers: &mut HeaderMap, uri: &mut Uri, location: &Location) {
    match location {
        Location::Header(header) => {
            headers.remove(header.name.as_str());
        }
        Location::Param(name) => {
            let Some(query) = uri.query() else { return };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| pair.split_once('=').map_or(*pair, |(key, _)| key) != name)
                .collect();
            let path_and_query = if kept.is_empty() {
                uri.path().to_owned()
            } else {
                format!("{}?{}", uri.path(), kept.join("&"))
            };
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = path_and_query.parse().ok();
            if let Ok(rewritten) = Uri::from_parts(parts) {
                *uri = rewritten;
            }
        }
        Location::Cookie(name) => {
            let kept: Vec<String> = headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(';'))
                .map(str::trim)
                .filter(|pair| {
                    !pair.is_empty() && pair.split_once('=').map(|(k, _)| k) != Some(name)
                })
                .map(str::to_owned)
                .collect();
            headers.remove(COOKIE);
            if !kept.is_empty()
                && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
            {
                headers.insert(COOKIE, value);
            }
        }
    }
}

/// The header names a rule writes after a success.
fn output_headers(rule: &JwtRule) -> impl Iterator<Item = &str> {
    Some(rule.output_payload_to_header.as_str())
        .filter(|name| !name.is_empty())
        .into_iter()
        .chain(
            rule.output_claim_to_headers
                .iter()
                .map(|c| c.header.as_str()),
        )
}

fn output(headers: &mut HeaderMap, rule: &JwtRule, authenticated: &Authenticated, payload: &str) {
    let mut set = |name: &str, value: String| {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    };
    if !rule.output_payload_to_header.is_empty() {
        set(
            &rule.output_payload_to_header,
            payload.trim_end_matches('=').to_owned(),
        );
    }
    for claim in &rule.output_claim_to_headers {
        let path: Vec<String> = claim.claim.split('.').map(str::to_owned).collect();
        let mut value = authenticated.claims.get(&path[0]);
        for key in &path[1..] {
            value = value.and_then(|v| v.get(key));
        }
        let text = match value {
            Some(Value::String(text)) => Some(text.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| match item {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        };
        if let Some(text) = text {
            set(&claim.header, text);
        }
    }
}

/// The inbound hook: authenticates `req` with the rules of `config` (see the module doc) and
/// rewrites it for the application; a failure is logged and answered `401`.
pub fn admit<B>(
    authenticators: &AuthenticatorCache,
    config: &Arc<ProxyConfig>,
    req: &mut Request<B>,
    peer: SocketAddr,
) -> Result<Option<Authenticated>, Reason> {
    if config.inbound.authentication.is_empty() {
        return Ok(None);
    }
    let authenticator = authenticators.for_config(config);
    let mut uri = req.uri().clone();
    let verdict = authenticator.authenticate(req.headers_mut(), &mut uri);
    *req.uri_mut() = uri;
    verdict.map_err(|rejection| {
        info!(%peer, path = req.uri().path(), %rejection, "request refused by RequestAuthentication");
        Reason::JwtAuthenticationFailed
    })
}

/// The [`Authenticator`] of the current config, rebuilt only when the config changes.
#[derive(Default)]
pub struct AuthenticatorCache {
    current: Mutex<Option<(Arc<ProxyConfig>, Arc<Authenticator>)>>,
}

impl AuthenticatorCache {
    pub fn for_config(&self, config: &Arc<ProxyConfig>) -> Arc<Authenticator> {
        let mut current = self.current.lock();
        if let Some((cached_for, authenticator)) = current.as_ref()
            && (Arc::ptr_eq(cached_for, config)
                || cached_for.inbound.authentication == config.inbound.authentication)
        {
            return authenticator.clone();
        }
        let authenticator = Arc::new(Authenticator::new(&config.inbound.authentication));
        *current = Some((config.clone(), authenticator.clone()));
        authenticator
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn authenticated(claims: Value) -> Authenticated {
        Authenticated {
            principal: "issuer/sub".into(),
            claims: claims.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn claims_are_strings_or_lists_of_strings_at_a_path() {
        let auth = authenticated(json!({
            "groups": ["admin", "dev", 3],
            "role": "ops",
            "aud": "web",
            "azp": "cli",
            "org": {"team": "a", "ids": ["x"]},
            "admin": true
        }));
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(auth.claim_strings(&path(&["groups"])), ["admin", "dev"]);
        assert_eq!(auth.claim_strings(&path(&["role"])), ["ops"]);
        assert_eq!(auth.claim_strings(&path(&["org", "team"])), ["a"]);
        assert_eq!(auth.claim_strings(&path(&["org", "ids"])), ["x"]);
        assert!(auth.claim_strings(&path(&["org"])).is_empty());
        assert!(auth.claim_strings(&path(&["admin"])).is_empty());
        assert!(auth.claim_strings(&path(&["missing", "x"])).is_empty());
        assert_eq!(auth.audiences(), ["web"]);
        assert_eq!(auth.presenter(), Some("cli"));
    }

    fn rule(extra: Value) -> JwtRule {
        let mut value = json!({"policy": "ns.ra", "issuer": "issuer-foo"});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    fn tokens(rule: JwtRule, headers: &[(&str, &str)], uri: &str) -> Vec<(Location, String)> {
        let authenticator = Authenticator::new(&InboundAuthentication {
            jwt_rules: vec![rule],
        });
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        authenticator.find_tokens(&map, &uri.parse().unwrap())
    }

    #[test]
    fn tokens_are_read_from_istios_default_locations() {
        let bearer = Location::Header(JwtHeader {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        });
        let param = Location::Param("access_token".into());
        assert_eq!(
            tokens(rule(json!({})), &[("authorization", "Bearer a.b.c")], "/"),
            [(bearer.clone(), "a.b.c".to_owned())]
        );
        assert_eq!(
            tokens(rule(json!({})), &[("authorization", "bearer a.b.c")], "/"),
            [(bearer, "a.b.c".to_owned())],
            "the scheme is case-insensitive"
        );
        assert!(
            tokens(rule(json!({})), &[("authorization", "Basic dXNlcg==")], "/").is_empty(),
            "another scheme carries no token"
        );
        assert_eq!(
            tokens(rule(json!({})), &[], "/x?a=1&access_token=t.o.k&b=2"),
            [(param, "t.o.k".to_owned())]
        );
        assert!(tokens(rule(json!({})), &[], "/x?access_token=").is_empty());
    }

    #[test]
    fn configured_locations_replace_the_defaults() {
        let custom = rule(json!({
            "fromHeaders": [{"name": "x-jwt", "prefix": "Token "}, {"name": "x-raw"}],
            "fromParams": ["jwt"],
            "fromCookies": ["session"]
        }));
        let found = tokens(
            custom,
            &[
                ("authorization", "Bearer ignored.x.y"),
                ("x-jwt", "Token h.e.ad"),
                ("x-raw", "r.a.w"),
                ("cookie", "theme=dark; session=c.o.okie"),
            ],
            "/?access_token=ignored&jwt=p.a.ram",
        );
        let values: Vec<&str> = found.iter().map(|(_, token)| token.as_str()).collect();
        assert_eq!(values, ["h.e.ad", "r.a.w", "p.a.ram", "c.o.okie"]);
    }

    #[test]
    fn a_token_is_removed_from_where_it_was_found() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_static("a=1; session=tok; b=2"));
        headers.insert("authorization", HeaderValue::from_static("Bearer tok"));
        let mut uri: Uri = "/p?x=1&access_token=tok&y=2".parse().unwrap();
        remove_token(&mut headers, &mut uri, &Location::Cookie("session".into()));
        remove_token(
            &mut headers,
            &mut uri,
            &Location::Param("access_token".into()),
        );
        remove_token(
            &mut headers,
            &mut uri,
            &Location::Header(JwtHeader {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            }),
        );
        assert_eq!(headers[COOKIE], "a=1; b=2");
        assert!(!headers.contains_key("authorization"));
        assert_eq!(uri.to_string(), "/p?x=1&y=2");
        let mut only: Uri = "/p?access_token=tok".parse().unwrap();
        remove_token(
            &mut headers,
            &mut only,
            &Location::Param("access_token".into()),
        );
        assert_eq!(only.to_string(), "/p");
    }
}
