//! AuthorizationPolicy evaluation with Istio's semantics. [`evaluate`] is pure (apart from
//! logging AUDIT matches): the workload's compiled policies ([`InboundAuthorization`]) and the
//! attributes of one connection (and, for HTTP, of one request) in, a [`Verdict`] out. The listeners own enforcement: the HTTP path
//! answers `403 RBAC: access denied`, and opaque TCP connections go through [`admit_tcp`], the
//! one function here with effects (it counts and logs a denial; the caller closes).
//!
//! Evaluation order, as Istio's:
//! 0. CUSTOM policies come first. For an HTTP request the caller asks the external authorizers
//!    of those that match ([`custom_checks`], `crate::ext_authz`) before calling [`evaluate`];
//!    an opaque TCP connection that one matches is denied by [`evaluate`] (the authorizer is
//!    not asked about connections, so they fail closed).
//! 1. AUDIT policies that match are logged (target `trellis::audit`); they never decide.
//! 2. Any matching DENY policy denies.
//! 3. No ALLOW policy: allow. ALLOW policies present: allow if one matches, else deny with
//!    [`NO_ALLOW_MATCHED`] as the deciding policy (Envoy reports `none` too).
//!
//! A policy matches when one of its rules matches; a policy without rules never matches, a rule
//! without conditions (`{}`) matches everything. Within a rule `from`, `to` and `when` must all
//! match, and one entry of `from` (of `to`) suffices. A field with values must match one of them,
//! a `not*` field none of its values; an absent attribute (no principal on a plaintext
//! connection, no header) matches no value and so satisfies every `not*` field.
//!
//! What cannot be evaluated is resolved as Istio does, towards the safe side of the action:
//! * TCP (`request: None`): HTTP-only fields (`hosts`, `methods`, `paths` and their `not*`,
//!   `request.headers[...]`) make an ALLOW rule not match, and are dropped from a DENY or AUDIT
//!   rule (which then matches on its other conditions): a TCP connection is never allowed by an
//!   HTTP rule and never slips past an HTTP DENY.
//! * A repeated request header: every value counts, so a second value cannot smuggle a request
//!   past a policy. For an ALLOW rule all values must match `values` and none `notValues`; for a
//!   DENY or AUDIT rule one value matching `values` (or escaping `notValues`) is enough.
//!
//! Matching: principals are SPIFFE IDs compared without `spiffe://` (Istio writes
//! `cluster.local/ns/foo/sa/bar`), namespaces come from the peer's SPIFFE ID, `remote.ip` is
//! the peer address (no trusted proxies), hosts ignore ASCII case, everything else (paths
//! included, see `crate::path`) is case-sensitive.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use tracing::info;
use trellis_config::SpiffeId;
use trellis_config::authz::{
    Action, Condition, CustomPolicy, InboundAuthorization, IpBlock, Operation, Policy, Rule,
    Source, StringMatch, Values,
};

use crate::authn::Authenticated;
use crate::capture::Refusal;
use crate::metrics::{TcpLabels, flags};
use crate::state::ProxyState;

/// The deciding "policy" of a denial because ALLOW policies exist and none matched.
pub const NO_ALLOW_MATCHED: &str = "none";

/// What is known of a connection before any request on it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttributes<'a> {
    pub source_ip: IpAddr,
    /// SPIFFE ID from the peer certificate, `None` if plaintext.
    pub source_principal: Option<&'a str>,
    /// The workload's port (original destination port).
    pub destination_port: u16,
    pub sni: Option<&'a str>,
}

/// The attributes of one HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// `NormalizedPath::path` (no query).
    pub path: &'a str,
    /// `:authority` / `Host` as sent (with its port, if any).
    pub authority: &'a str,
    /// The authority without its port.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// What the request's verified JWT says (`crate::authn`); `None` without one.
    pub auth: Option<&'a Authenticated>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `policy` is `<namespace>.<name>` of the deciding policy, or [`NO_ALLOW_MATCHED`].
    Deny {
        policy: String,
    },
}

/// Decides a connection (`request: None`, Istio's TCP semantics) or one HTTP request.
pub fn evaluate(
    policy: &InboundAuthorization,
    connection: &ConnectionAttributes,
    request: Option<&HttpAttributes>,
) -> Verdict {
    let peer = Peer::new(connection, request);
    for audit in policy
        .audit
        .iter()
        .filter(|p| policy_matches(p, Action::Audit, &peer))
    {
        info!(
            target: "trellis::audit",
            policy = %audit.name,
            source_ip = %connection.source_ip,
            source_principal = connection.source_principal.unwrap_or("-"),
            destination_port = connection.destination_port,
            method = request.map_or("-", |r| r.method),
            path = request.map_or("-", |r| r.path),
            "AuthorizationPolicy AUDIT matched"
        );
    }
    if request.is_none()
        && let Some(custom) = policy
            .custom
            .iter()
            .find(|c| policy_matches(&c.policy, Action::Custom, &peer))
    {
        return Verdict::Deny {
            policy: custom.policy.name.clone(),
        };
    }
    if let Some(deny) = policy
        .deny
        .iter()
        .find(|p| policy_matches(p, Action::Deny, &peer))
    {
        return Verdict::Deny {
            policy: deny.name.clone(),
        };
    }
    if policy.allow.is_empty()
        || policy
            .allow
            .iter()
            .any(|p| policy_matches(p, Action::Allow, &peer))
    {
        Verdict::Allow
    } else {
        Verdict::Deny {
            policy: NO_ALLOW_MATCHED.to_owned(),
        }
    }
}

/// The CUSTOM policies an HTTP request matches, in order: their external authorizers must allow
/// it before [`evaluate`] decides. A CUSTOM policy is matched like a DENY (what cannot be
/// evaluated is dropped from its rules, so more requests are checked, never fewer).
pub fn custom_checks<'p>(
    policy: &'p InboundAuthorization,
    connection: &ConnectionAttributes,
    request: &HttpAttributes,
) -> Vec<&'p CustomPolicy> {
    let peer = Peer::new(connection, Some(request));
    policy
        .custom
        .iter()
        .filter(|c| policy_matches(&c.policy, Action::Custom, &peer))
        .collect()
}

/// Decides an opaque TCP connection (a port that is not served as HTTP) with Istio's TCP
/// semantics. A denial is counted (`trellis_authorization_denied_total{policy}` and the
/// connection metrics with `response_flags="RBAC"`) and logged; the caller then drops (closes)
/// the connection without connecting to the application.
pub fn admit_tcp(
    state: &ProxyState,
    labels: &TcpLabels,
    peer: SocketAddr,
    dst: SocketAddr,
    source_principal: Option<&str>,
    sni: Option<&str>,
) -> bool {
    let config = state.current_config();
    let connection = ConnectionAttributes {
        source_ip: peer.ip(),
        source_principal,
        destination_port: dst.port(),
        sni,
    };
    match evaluate(&config.inbound.authorization, &connection, None) {
        Verdict::Allow => true,
        Verdict::Deny { policy } => {
            state.metrics.count_denied(&policy);
            let source = source_principal.unwrap_or("-");
            Refusal::policy(
                flags::RBAC,
                format!(
                    "connection denied by AuthorizationPolicy {policy} (source {source}), closing"
                ),
            )
            .record(state, labels.clone());
            false
        }
    }
}

/// The attributes in the form rules compare them.
struct Peer<'a> {
    connection: &'a ConnectionAttributes<'a>,
    request: Option<&'a HttpAttributes<'a>>,
    /// The SPIFFE ID without its scheme, as Istio's principals are written.
    principal: Option<&'a str>,
    namespace: Option<String>,
}

impl<'a> Peer<'a> {
    /// The request's verified JWT, if any.
    fn auth(&self) -> Option<&'a Authenticated> {
        self.request.and_then(|request| request.auth)
    }

    fn new(
        connection: &'a ConnectionAttributes<'a>,
        request: Option<&'a HttpAttributes<'a>>,
    ) -> Self {
        let principal = connection
            .source_principal
            .map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
        let namespace = connection
            .source_principal
            .and_then(|id| id.parse::<SpiffeId>().ok())
            .map(|id| id.namespace);
        Self {
            connection,
            request,
            principal,
            namespace,
        }
    }
}

fn policy_matches(policy: &Policy, action: Action, peer: &Peer) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule_matches(rule, action, peer))
}

fn rule_matches(rule: &Rule, action: Action, peer: &Peer) -> bool {
    // Istio cannot generate an HTTP-only field for a TCP connection: in an ALLOW policy the whole
    // rule is left out (it never matches), in a DENY or AUDIT policy only those fields are
    // (below, they pass on TCP).
    if peer.request.is_none() && action == Action::Allow && has_http_fields(rule) {
        return false;
    }
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, peer));
    from && to && rule.when.iter().all(|c| condition_matches(c, action, peer))
}

fn has_http_fields(rule: &Rule) -> bool {
    rule.from.iter().any(Source::has_http_fields)
        || rule.to.iter().any(Operation::has_http_fields)
        || rule.when.iter().any(Condition::is_http_only)
}

fn source_matches(source: &Source, peer: &Peer) -> bool {
    let ip = peer.connection.source_ip;
    // TCP: request principals are dropped (see `rule_matches`).
    let request_principals = peer.request.is_none_or(|request| {
        strings(
            &source.request_principals,
            &source.not_request_principals,
            request.auth.map(|auth| auth.principal.as_str()),
        )
    });
    request_principals
        && strings(&source.principals, &source.not_principals, peer.principal)
        && strings(
            &source.namespaces,
            &source.not_namespaces,
            peer.namespace.as_deref(),
        )
        && blocks(&source.ip_blocks, &source.not_ip_blocks, ip)
        && blocks(&source.remote_ip_blocks, &source.not_remote_ip_blocks, ip)
}

fn operation_matches(operation: &Operation, peer: &Peer) -> bool {
    let port = peer.connection.destination_port;
    let ports = (operation.ports.is_empty() || operation.ports.contains(&port))
        && !operation.not_ports.contains(&port);
    if !ports {
        return false;
    }
    // TCP: the HTTP-only fields are dropped (see `rule_matches`).
    let Some(request) = peer.request else {
        return true;
    };
    // A value with a port (`example.com:8080`, `example.com:*`) is matched against the whole
    // authority, as Envoy matches Istio's; one without against the host, so that a port in the
    // request cannot step around it.
    let host_matches = |m: &StringMatch| {
        m.matches_ignoring_case(if m.names_a_port() {
            request.authority
        } else {
            request.host
        })
    };
    let hosts = (operation.hosts.is_empty() || operation.hosts.iter().any(host_matches))
        && !operation.not_hosts.iter().any(host_matches);
    hosts
        && strings(
            &operation.methods,
            &operation.not_methods,
            Some(request.method),
        )
        && strings(&operation.paths, &operation.not_paths, Some(request.path))
}

fn condition_matches(condition: &Condition, action: Action, peer: &Peer) -> bool {
    let connection = peer.connection;
    match condition {
        Condition::RequestHeader { name, values } => match peer.request {
            Some(request) => header_matches(request.headers, name, values, action),
            // TCP: dropped (see `rule_matches`).
            None => true,
        },
        Condition::SourceIp(values) | Condition::RemoteIp(values) => {
            blocks(&values.values, &values.not_values, connection.source_ip)
        }
        Condition::SourceNamespace(values) => strings(
            &values.values,
            &values.not_values,
            peer.namespace.as_deref(),
        ),
        Condition::SourcePrincipal(values) => {
            strings(&values.values, &values.not_values, peer.principal)
        }
        Condition::DestinationPort(values) => {
            let port = connection.destination_port;
            (values.values.is_empty() || values.values.contains(&port))
                && !values.not_values.contains(&port)
        }
        Condition::ConnectionSni(values) => {
            strings(&values.values, &values.not_values, connection.sni)
        }
        // TCP: dropped (see `rule_matches`).
        Condition::RequestAuthPrincipal(_)
        | Condition::RequestAuthAudiences(_)
        | Condition::RequestAuthPresenter(_)
        | Condition::RequestAuthClaim { .. }
            if peer.request.is_none() =>
        {
            true
        }
        Condition::RequestAuthPrincipal(values) => {
            let principal = peer.auth().map(|auth| auth.principal.as_str());
            any_of(values, &Vec::from_iter(principal))
        }
        Condition::RequestAuthAudiences(values) => any_of(
            values,
            &peer
                .auth()
                .map(Authenticated::audiences)
                .unwrap_or_default(),
        ),
        Condition::RequestAuthPresenter(values) => any_of(
            values,
            &Vec::from_iter(peer.auth().and_then(Authenticated::presenter)),
        ),
        Condition::RequestAuthClaim { claim, values } => {
            let strings = peer.auth().map(|auth| auth.claim_strings(claim));
            any_of(values, &strings.unwrap_or_default())
        }
    }
}

/// A multi-valued attribute (a JWT list claim) against `values` / `not_values`: one element
/// matching `values` suffices, and no element may match `not_values`, as Istio matches list
/// claims. An absent attribute matches no value.
fn any_of(condition: &Values<StringMatch>, attribute: &[&str]) -> bool {
    let matched_by = |matchers: &[StringMatch]| {
        attribute
            .iter()
            .any(|value| matchers.iter().any(|m| m.matches(value)))
    };
    (condition.values.is_empty() || matched_by(&condition.values))
        && !matched_by(&condition.not_values)
}

/// A single-valued attribute against `values` / `not_values` (case-sensitive).
fn strings(values: &[StringMatch], not_values: &[StringMatch], attribute: Option<&str>) -> bool {
    let matched_by = |matchers: &[StringMatch]| {
        attribute.is_some_and(|value| matchers.iter().any(|m| m.matches(value)))
    };
    (values.is_empty() || matched_by(values)) && !matched_by(not_values)
}

fn blocks(values: &[IpBlock], not_values: &[IpBlock], ip: IpAddr) -> bool {
    (values.is_empty() || values.iter().any(|b| b.contains(ip)))
        && !not_values.iter().any(|b| b.contains(ip))
}

/// Every value of a repeated header counts (see the module doc): an ALLOW rule needs all of
/// them to pass, a DENY or AUDIT rule is satisfied by one.
fn header_matches(
    headers: &HeaderMap,
    name: &str,
    condition: &Values<StringMatch>,
    action: Action,
) -> bool {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let in_values = |v: &String| condition.values.iter().any(|m| m.matches(v));
    let in_not_values = |v: &String| condition.not_values.iter().any(|m| m.matches(v));
    let strict = action == Action::Allow;
    let values_ok = condition.values.is_empty()
        || if strict {
            !values.is_empty() && values.iter().all(in_values)
        } else {
            values.iter().any(in_values)
        };
    let not_values_ok = condition.not_values.is_empty()
        || values.is_empty()
        || if strict {
            !values.iter().any(in_not_values)
        } else {
            values.iter().any(|v| !in_not_values(v))
        };
    values_ok && not_values_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    const FOO_BAR: &str = "spiffe://cluster.local/ns/foo/sa/bar";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/web";

    fn policy(action: &str, rules: serde_json::Value) -> InboundAuthorization {
        let key = match action {
            "ALLOW" => "allow",
            "DENY" => "deny",
            _ => "audit",
        };
        let compiled: InboundAuthorization =
            serde_json::from_value(json!({ key: [{"name": "ns.p", "rules": rules}] })).unwrap();
        compiled.validate().unwrap();
        compiled
    }

    fn connection(principal: Option<&str>) -> ConnectionAttributes<'_> {
        ConnectionAttributes {
            source_ip: "10.1.2.3".parse().unwrap(),
            source_principal: principal,
            destination_port: 8080,
            sni: Some("web.foo.svc.cluster.local"),
        }
    }

    /// A request: method, path, authority (with port) and headers as `name: value` pairs
    /// (repeats kept).
    struct Request {
        method: &'static str,
        path: &'static str,
        authority: &'static str,
        headers: HeaderMap,
    }

    fn request(method: &'static str, path: &'static str, headers: &[(&str, &str)]) -> Request {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Request {
            method,
            path,
            authority: "web.foo.svc.cluster.local:8080",
            headers: map,
        }
    }

    fn decide(
        compiled: &InboundAuthorization,
        principal: Option<&str>,
        request: Option<&Request>,
    ) -> bool {
        let attributes = request.map(|r| HttpAttributes {
            method: r.method,
            path: r.path,
            authority: r.authority,
            host: r.authority.split(':').next().unwrap_or_default(),
            headers: &r.headers,
            auth: None,
        });
        evaluate(compiled, &connection(principal), attributes.as_ref()) == Verdict::Allow
    }

    /// Decides a GET with the verified JWT `auth` (`None`: no token), or a TCP connection.
    fn decide_jwt(
        compiled: &InboundAuthorization,
        auth: Option<&Authenticated>,
        tcp: bool,
    ) -> bool {
        let r = request("GET", "/", &[]);
        let attributes = HttpAttributes {
            method: r.method,
            path: r.path,
            authority: r.authority,
            host: "web.foo.svc.cluster.local",
            headers: &r.headers,
            auth,
        };
        let request = (!tcp).then_some(&attributes);
        evaluate(compiled, &connection(None), request) == Verdict::Allow
    }

    fn jwt(principal: &str, claims: serde_json::Value) -> Authenticated {
        Authenticated {
            principal: principal.to_owned(),
            claims: claims.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn request_principals_and_jwt_claims_match_as_istio_defines() {
        let alice = jwt(
            "issuer-foo/alice",
            json!({"aud": ["web", "api"], "azp": "cli", "groups": ["dev", "ops"], "org": {"tier": "gold"}}),
        );
        let bob = jwt("issuer-bar/bob", json!({"aud": "other", "groups": "dev"}));
        // (action, rules, alice, bob, no token, TCP)
        let table = [
            (
                "ALLOW",
                json!([{"from": [{"requestPrincipals": [{"prefix": "issuer-foo/"}]}]}]),
                true,
                false,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"from": [{"requestPrincipals": ["presence"]}]}]),
                true,
                true,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"from": [{"notRequestPrincipals": [{"exact": "issuer-bar/bob"}]}]}]),
                true,
                false,
                true,
                false,
            ),
            // notRequestPrincipals: ["*"] denies exactly the requests without a principal.
            (
                "DENY",
                json!([{"from": [{"notRequestPrincipals": ["presence"]}]}]),
                true,
                true,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthPrincipal", "values": [{"exact": "issuer-bar/bob"}]}]}]),
                false,
                true,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthAudiences", "values": [{"exact": "api"}]}]}]),
                true,
                false,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthPresenter", "values": [{"exact": "cli"}]}]}]),
                true,
                false,
                false,
                false,
            ),
            // A list claim matches by any element; a string claim by itself.
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthClaim", "claim": ["groups"], "values": [{"exact": "ops"}]}]}]),
                true,
                false,
                false,
                false,
            ),
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthClaim", "claim": ["groups"], "values": [{"exact": "dev"}]}]}]),
                true,
                true,
                false,
                false,
            ),
            // notValues: no element may match; an absent claim matches no value.
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthClaim", "claim": ["groups"], "notValues": [{"exact": "ops"}]}]}]),
                false,
                true,
                true,
                false,
            ),
            (
                "ALLOW",
                json!([{"when": [{"key": "requestAuthClaim", "claim": ["org", "tier"], "values": [{"exact": "gold"}]}]}]),
                true,
                false,
                false,
                false,
            ),
            // TCP: a JWT rule is left out of an ALLOW, its condition dropped from a DENY.
            (
                "DENY",
                json!([{"from": [{"requestPrincipals": [{"exact": "issuer-foo/alice"}]}]}]),
                false,
                true,
                true,
                false,
            ),
            (
                "DENY",
                json!([{"when": [{"key": "requestAuthClaim", "claim": ["groups"], "values": [{"exact": "ops"}]}]}]),
                false,
                true,
                true,
                false,
            ),
        ];
        for (action, rules, for_alice, for_bob, without_token, over_tcp) in table {
            let compiled = policy(action, rules.clone());
            assert_eq!(
                decide_jwt(&compiled, Some(&alice), false),
                for_alice,
                "{action} {rules} alice"
            );
            assert_eq!(
                decide_jwt(&compiled, Some(&bob), false),
                for_bob,
                "{action} {rules} bob"
            );
            assert_eq!(
                decide_jwt(&compiled, None, false),
                without_token,
                "{action} {rules} no token"
            );
            assert_eq!(
                decide_jwt(&compiled, None, true),
                over_tcp,
                "{action} {rules} TCP"
            );
        }
    }

    #[test]
    fn no_policy_allows_everything() {
        let empty = InboundAuthorization::default();
        assert!(decide(&empty, None, None));
        assert!(decide(
            &empty,
            Some(FOO_BAR),
            Some(&request("POST", "/x", &[]))
        ));
    }

    #[test]
    fn every_field_matches_as_istio_documents() {
        let get = request("GET", "/api/v1/items", &[("x-user", "alice")]);
        let post_admin = request("POST", "/admin/users", &[]);
        // (rule, principal, request, expected match of the ALLOW policy)
        let table: Vec<(serde_json::Value, Option<&str>, Option<&Request>, bool)> = vec![
            (json!({}), None, None, true),
            (
                json!({"from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}),
                Some(FOO_BAR),
                None,
                true,
            ),
            (
                json!({"from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}),
                Some(OTHER),
                None,
                false,
            ),
            (
                json!({"from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"from": [{"principals": [{"prefix": "cluster.local/ns/foo/"}]}]}),
                Some(FOO_BAR),
                None,
                true,
            ),
            (
                json!({"from": [{"principals": [{"suffix": "/sa/bar"}]}]}),
                Some(FOO_BAR),
                None,
                true,
            ),
            (
                json!({"from": [{"principals": ["presence"]}]}),
                Some(OTHER),
                None,
                true,
            ),
            (
                json!({"from": [{"principals": ["presence"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"from": [{"notPrincipals": ["presence"]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"from": [{"notPrincipals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}),
                Some(FOO_BAR),
                None,
                false,
            ),
            (
                json!({"from": [{"notPrincipals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}),
                Some(OTHER),
                None,
                true,
            ),
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}]}]}),
                Some(FOO_BAR),
                None,
                true,
            ),
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}]}]}),
                Some(OTHER),
                None,
                false,
            ),
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"from": [{"notNamespaces": [{"exact": "foo"}]}]}),
                Some(OTHER),
                None,
                true,
            ),
            (
                json!({"from": [{"notNamespaces": [{"exact": "foo"}]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"from": [{"ipBlocks": ["10.1.0.0/16"]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"from": [{"ipBlocks": ["10.2.0.0/16"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"from": [{"notIpBlocks": ["10.1.2.3"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"from": [{"remoteIpBlocks": ["10.1.2.0/24"]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"from": [{"notRemoteIpBlocks": ["10.0.0.0/8"]}]}),
                None,
                None,
                false,
            ),
            // from entries OR, fields within an entry AND
            (
                json!({"from": [{"namespaces": [{"exact": "x"}]}, {"ipBlocks": ["10.1.2.3"]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}], "ipBlocks": ["10.9.0.0/16"]}]}),
                Some(FOO_BAR),
                None,
                false,
            ),
            (json!({"to": [{"ports": [8080]}]}), None, None, true),
            (json!({"to": [{"ports": [9090]}]}), None, None, false),
            (json!({"to": [{"notPorts": [8080]}]}), None, None, false),
            (
                json!({"to": [{"methods": [{"exact": "GET"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"methods": [{"exact": "GET"}]}]}),
                None,
                Some(&post_admin),
                false,
            ),
            (
                json!({"to": [{"methods": [{"exact": "get"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"to": [{"notMethods": [{"exact": "POST"}]}]}),
                None,
                Some(&post_admin),
                false,
            ),
            (
                json!({"to": [{"paths": [{"prefix": "/api/"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"paths": [{"exact": "/api/v1/items"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"paths": [{"suffix": "/items"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"paths": [{"prefix": "/API/"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"to": [{"notPaths": [{"prefix": "/admin/"}]}]}),
                None,
                Some(&post_admin),
                false,
            ),
            (
                json!({"to": [{"notPaths": [{"prefix": "/admin/"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"hosts": [{"exact": "WEB.foo.svc.cluster.local"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"hosts": [{"suffix": ".bar.svc.cluster.local"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"to": [{"notHosts": [{"prefix": "web."}]}]}),
                None,
                Some(&get),
                false,
            ),
            // A hosts value with a port is matched against the authority (`host:*` is Istio's
            // way of naming any port); one without, against the host whatever the port.
            (
                json!({"to": [{"hosts": [{"exact": "web.foo.svc.cluster.local:8080"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"hosts": [{"exact": "web.foo.svc.cluster.local:9090"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"to": [{"hosts": [{"prefix": "WEB.foo.svc.cluster.local:"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"notHosts": [{"prefix": "web.foo.svc.cluster.local:"}]}]}),
                None,
                Some(&get),
                false,
            ),
            // to entries OR, fields within an entry AND
            (
                json!({"to": [{"methods": [{"exact": "POST"}]}, {"paths": [{"prefix": "/api/"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"to": [{"methods": [{"exact": "GET"}], "ports": [9090]}]}),
                None,
                Some(&get),
                false,
            ),
            // from, to and when AND
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}]}], "to": [{"methods": [{"exact": "GET"}]}]}),
                Some(FOO_BAR),
                Some(&post_admin),
                false,
            ),
            (
                json!({"from": [{"namespaces": [{"exact": "foo"}]}], "to": [{"methods": [{"exact": "GET"}]}]}),
                Some(FOO_BAR),
                Some(&get),
                true,
            ),
            (
                json!({"when": [{"key": "requestHeader", "name": "x-user", "values": [{"exact": "alice"}]}]}),
                None,
                Some(&get),
                true,
            ),
            (
                json!({"when": [{"key": "requestHeader", "name": "x-user", "values": [{"exact": "bob"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"when": [{"key": "requestHeader", "name": "x-user", "values": ["presence"]}]}),
                None,
                Some(&post_admin),
                false,
            ),
            (
                json!({"when": [{"key": "requestHeader", "name": "x-user", "notValues": [{"exact": "alice"}]}]}),
                None,
                Some(&get),
                false,
            ),
            (
                json!({"when": [{"key": "requestHeader", "name": "x-user", "notValues": [{"exact": "alice"}]}]}),
                None,
                Some(&post_admin),
                true,
            ),
            (
                json!({"when": [{"key": "sourceIp", "values": ["10.1.0.0/16"]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"when": [{"key": "sourceIp", "notValues": ["10.1.0.0/16"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"when": [{"key": "remoteIp", "values": ["10.9.0.0/16"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"when": [{"key": "sourceNamespace", "values": [{"exact": "foo"}]}]}),
                Some(FOO_BAR),
                None,
                true,
            ),
            (
                json!({"when": [{"key": "sourceNamespace", "notValues": [{"exact": "foo"}]}]}),
                Some(FOO_BAR),
                None,
                false,
            ),
            (
                json!({"when": [{"key": "sourcePrincipal", "values": [{"exact": "cluster.local/ns/other/sa/web"}]}]}),
                Some(OTHER),
                None,
                true,
            ),
            (
                json!({"when": [{"key": "sourcePrincipal", "values": ["presence"]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"when": [{"key": "destinationPort", "values": [8080]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"when": [{"key": "destinationPort", "notValues": [8080]}]}),
                None,
                None,
                false,
            ),
            (
                json!({"when": [{"key": "connectionSni", "values": [{"suffix": ".svc.cluster.local"}]}]}),
                None,
                None,
                true,
            ),
            (
                json!({"when": [{"key": "connectionSni", "notValues": [{"prefix": "web."}]}]}),
                None,
                None,
                false,
            ),
            // when conditions AND
            (
                json!({"when": [{"key": "destinationPort", "values": [8080]}, {"key": "sourceIp", "values": ["10.9.9.9"]}]}),
                None,
                None,
                false,
            ),
        ];
        for (rule, principal, request, expected) in table {
            let compiled = policy("ALLOW", json!([rule.clone()]));
            assert_eq!(
                decide(&compiled, principal, request),
                expected,
                "ALLOW rule {rule} principal {principal:?} request {:?}",
                request.map(|r| (r.method, r.path))
            );
        }
    }

    #[test]
    fn deny_comes_before_allow_and_allow_lists_deny_the_rest() {
        let compiled: InboundAuthorization = serde_json::from_value(json!({
            "deny": [{"name": "foo.deny-bar", "rules": [{"from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}]}],
            "audit": [{"name": "foo.audit-all", "rules": [{}]}],
            "allow": [
                {"name": "foo.allow-foo", "rules": [{"from": [{"namespaces": [{"exact": "foo"}]}]}]},
                {"name": "foo.allow-get", "rules": [{"to": [{"methods": [{"exact": "GET"}]}]}]}
            ]
        }))
        .unwrap();
        let get = request("GET", "/", &[]);
        let post = request("POST", "/", &[]);
        let verdict = |principal, request: Option<&Request>| {
            let attributes = request.map(|r| HttpAttributes {
                method: r.method,
                path: r.path,
                authority: r.authority,
                host: r.authority.split(':').next().unwrap_or_default(),
                headers: &r.headers,
                auth: None,
            });
            evaluate(&compiled, &connection(principal), attributes.as_ref())
        };
        let deny = |policy: &str| Verdict::Deny {
            policy: policy.into(),
        };
        // The DENY wins although an ALLOW (namespace foo, and GET) matches too.
        assert_eq!(verdict(Some(FOO_BAR), Some(&get)), deny("foo.deny-bar"));
        assert_eq!(verdict(Some(FOO_BAR), None), deny("foo.deny-bar"));
        assert_eq!(
            verdict(Some("spiffe://cluster.local/ns/foo/sa/web"), Some(&post)),
            Verdict::Allow
        );
        assert_eq!(verdict(Some(OTHER), Some(&get)), Verdict::Allow);
        assert_eq!(verdict(Some(OTHER), Some(&post)), deny(NO_ALLOW_MATCHED));
        assert_eq!(verdict(None, Some(&post)), deny(NO_ALLOW_MATCHED));
        // AUDIT alone never changes a verdict.
        let audit_only = policy("AUDIT", json!([{}]));
        assert!(decide(&audit_only, None, Some(&post)));
        assert!(decide(&audit_only, None, None));
    }

    #[test]
    fn no_rules_never_matches_and_an_empty_rule_matches_everything() {
        // ALLOW with no rules (Istio's `spec: {}`): nothing matches it, so everything is denied.
        let allow_nothing = policy("ALLOW", json!([]));
        assert!(!decide(
            &allow_nothing,
            Some(FOO_BAR),
            Some(&request("GET", "/", &[]))
        ));
        assert!(!decide(&allow_nothing, None, None));
        // DENY with no rules: denies nothing.
        let deny_nothing = policy("DENY", json!([]));
        assert!(decide(&deny_nothing, None, None));
        // `rules: [{}]`.
        let allow_all = policy("ALLOW", json!([{}]));
        assert!(decide(&allow_all, None, None));
        let deny_all = policy("DENY", json!([{}]));
        assert!(!decide(
            &deny_all,
            Some(FOO_BAR),
            Some(&request("GET", "/", &[]))
        ));
    }

    #[test]
    fn tcp_connections_fail_http_allow_rules_and_match_http_deny_rules() {
        let http_only = [
            json!({"to": [{"methods": [{"exact": "GET"}]}]}),
            json!({"to": [{"notMethods": [{"exact": "GET"}]}]}),
            json!({"to": [{"paths": [{"prefix": "/"}]}]}),
            json!({"to": [{"notPaths": [{"prefix": "/admin"}]}]}),
            json!({"to": [{"hosts": ["presence"]}]}),
            json!({"to": [{"notHosts": [{"exact": "x"}]}]}),
            json!({"when": [{"key": "requestHeader", "name": "x-user", "values": ["presence"]}]}),
            json!({"when": [{"key": "requestHeader", "name": "x-user", "notValues": ["presence"]}]}),
        ];
        for rule in http_only {
            let allow = policy("ALLOW", json!([rule.clone()]));
            assert!(
                !decide(&allow, Some(FOO_BAR), None),
                "TCP allowed by ALLOW {rule}"
            );
            let deny = policy("DENY", json!([rule.clone()]));
            assert!(
                !decide(&deny, Some(FOO_BAR), None),
                "TCP not denied by DENY {rule}"
            );
        }
        // The HTTP-only field is dropped from the DENY rule, not the rest of it.
        let deny_on_other_port = policy(
            "DENY",
            json!([{"to": [{"ports": [9090], "methods": [{"exact": "GET"}]}]}]),
        );
        assert!(decide(&deny_on_other_port, None, None));
        let deny_from_other = policy(
            "DENY",
            json!([{"from": [{"namespaces": [{"exact": "other"}]}], "to": [{"paths": [{"exact": "/"}]}]}]),
        );
        assert!(decide(&deny_from_other, Some(FOO_BAR), None));
        assert!(!decide(&deny_from_other, Some(OTHER), None));
        // Istio leaves a whole ALLOW rule out for TCP when any entry names an HTTP field, even
        // if another `to` entry is L4 only.
        let mixed = policy(
            "ALLOW",
            json!([{"to": [{"methods": [{"exact": "GET"}]}, {"ports": [8080]}]}]),
        );
        assert!(!decide(&mixed, None, None));
        assert!(
            decide(&mixed, None, Some(&request("POST", "/", &[]))),
            "HTTP uses the L4 entry"
        );
        // L4 fields still decide TCP.
        let allow_port = policy("ALLOW", json!([{"to": [{"ports": [8080]}]}]));
        assert!(decide(&allow_port, None, None));
    }

    #[test]
    fn a_repeated_header_cannot_smuggle_past_a_policy() {
        let deny_evil = policy(
            "DENY",
            json!([{"when": [{"key": "requestHeader", "name": "x-role", "values": [{"exact": "evil"}]}]}]),
        );
        let deny_unless_alice = policy(
            "DENY",
            json!([{"when": [{"key": "requestHeader", "name": "x-user", "notValues": [{"exact": "alice"}]}]}]),
        );
        let allow_alice = policy(
            "ALLOW",
            json!([{"when": [{"key": "requestHeader", "name": "x-user", "values": [{"exact": "alice"}]}]}]),
        );
        let allow_not_admin = policy(
            "ALLOW",
            json!([{"when": [{"key": "requestHeader", "name": "x-role", "notValues": [{"exact": "admin"}]}]}]),
        );
        let table = [
            (&deny_evil, vec![("x-role", "good")], true),
            (
                &deny_evil,
                vec![("x-role", "good"), ("x-role", "evil")],
                false,
            ),
            (
                &deny_evil,
                vec![("x-role", "evil"), ("x-role", "good")],
                false,
            ),
            (&deny_unless_alice, vec![("x-user", "alice")], true),
            (
                &deny_unless_alice,
                vec![("x-user", "alice"), ("x-user", "mallory")],
                false,
            ),
            (&deny_unless_alice, vec![], false),
            (&allow_alice, vec![("x-user", "alice")], true),
            (
                &allow_alice,
                vec![("x-user", "alice"), ("x-user", "mallory")],
                false,
            ),
            (&allow_alice, vec![], false),
            (&allow_not_admin, vec![("x-role", "user")], true),
            (
                &allow_not_admin,
                vec![("x-role", "user"), ("x-role", "admin")],
                false,
            ),
            (&allow_not_admin, vec![], true),
        ];
        for (compiled, headers, allowed) in table {
            let req = request("GET", "/", &headers);
            assert_eq!(
                decide(compiled, None, Some(&req)),
                allowed,
                "{headers:?} under {compiled:?}"
            );
        }
    }

    #[test]
    fn principals_compare_without_the_spiffe_scheme() {
        let compiled = policy(
            "ALLOW",
            json!([{"from": [{"principals": [{"prefix": "cluster.local/"}]}]}]),
        );
        assert!(decide(&compiled, Some(FOO_BAR), None));
        assert!(!decide(
            &compiled,
            Some("spiffe://other.domain/ns/foo/sa/bar"),
            None
        ));
    }

    #[test]
    fn custom_policies_are_checked_for_http_and_deny_tcp() {
        let provider = json!({"name": "opa", "host": "opa.authz", "port": 9191, "timeoutMs": 500,
            "failOpen": false, "statusOnError": 403, "protocol": {"kind": "grpc"}});
        let compiled: InboundAuthorization = serde_json::from_value(json!({
            "custom": [
                {"policy": {"name": "foo.ext-admin", "rules": [{"to": [{"paths": [{"prefix": "/admin"}]}]}]},
                 "provider": provider},
                {"policy": {"name": "foo.ext-bar", "rules": [{"from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bar"}]}]}]},
                 "provider": provider}
            ]
        }))
        .unwrap();
        compiled.validate().unwrap();
        let checked = |principal, method, path| {
            let request = request(method, path, &[]);
            let attributes = HttpAttributes {
                method: request.method,
                path: request.path,
                authority: request.authority,
                host: "web.foo.svc.cluster.local",
                headers: &request.headers,
                auth: None,
            };
            custom_checks(&compiled, &connection(principal), &attributes)
                .iter()
                .map(|c| c.policy.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(checked(None, "GET", "/admin/x"), ["foo.ext-admin"]);
        assert_eq!(
            checked(Some(FOO_BAR), "GET", "/admin/x"),
            ["foo.ext-admin", "foo.ext-bar"]
        );
        assert_eq!(checked(None, "GET", "/public"), Vec::<String>::new());
        // HTTP: CUSTOM alone never denies in `evaluate` (the authorizer decides).
        assert!(decide(
            &compiled,
            None,
            Some(&request("GET", "/admin/x", &[]))
        ));
        // TCP: the authorizer is not asked; a matching CUSTOM policy (its HTTP-only fields
        // dropped, as in a DENY) denies the connection.
        assert_eq!(
            evaluate(&compiled, &connection(None), None),
            Verdict::Deny {
                policy: "foo.ext-admin".into()
            }
        );
    }
}
