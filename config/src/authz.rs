//! The compiled form of Istio's `AuthorizationPolicy`, as a proxy receives it in
//! `ProxyConfig.inbound.authorization`: only the policies that apply to the proxy's workload,
//! already split by action, with every string matcher pre-parsed (exact, `prefix*`, `*suffix`,
//! `*` presence), IP blocks parsed and ports numeric. The proxy evaluates it without knowing
//! anything about Kubernetes; the operator owns which policies apply and what the CRD fields
//! compile to.
//!
//! `requestPrincipals` and the `request.auth.*` conditions compare what the proxy's
//! RequestAuthentication rules ([`crate::authn`]) verified in the request's JWT; a request without
//! a verified token has none of these attributes.
//!
//! What is not here on purpose: `destination.ip` (always the workload's own address, so it is
//! decided when compiling for one workload). The operator resolves it, and what it cannot
//! compile, with Istio's rule for what cannot be generated — an ALLOW rule never matches, a DENY
//! or AUDIT rule drops the condition and so matches more widely — before a policy reaches the
//! proxy.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The AuthorizationPolicies that apply to one workload. Empty = no policy = allow everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InboundAuthorization {
    /// CUSTOM policies: a request one matches is first checked with its external authorizer,
    /// before DENY and ALLOW policies are looked at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom: Vec<CustomPolicy>,
    /// DENY policies: any match denies, before ALLOW policies are looked at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Policy>,
    /// AUDIT policies: a match is logged and counted; it never changes the verdict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<Policy>,
    /// ALLOW policies: when there is at least one, a request must match one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Policy>,
}

impl InboundAuthorization {
    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && self.audit.is_empty()
            && self.allow.is_empty()
    }

    /// Every policy with its action, CUSTOM first, then DENY (evaluation order).
    pub fn policies(&self) -> impl Iterator<Item = (Action, &Policy)> {
        self.custom
            .iter()
            .map(|c| (Action::Custom, &c.policy))
            .chain(self.deny.iter().map(|p| (Action::Deny, p)))
            .chain(self.audit.iter().map(|p| (Action::Audit, p)))
            .chain(self.allow.iter().map(|p| (Action::Allow, p)))
    }

    /// What must hold for the proxy to enforce the policies as written.
    pub fn validate(&self) -> Result<(), AuthorizationError> {
        for (_, policy) in self.policies() {
            policy.validate()?;
        }
        for custom in &self.custom {
            custom.provider.validate()?;
        }
        Ok(())
    }
}

/// The actions a compiled policy can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// Asks an external authorizer about what it matches; matched like a DENY (what cannot be
    /// evaluated widens the match, so more is checked, never less).
    Custom,
}

/// A CUSTOM policy with the external authorizer its `provider.name` names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CustomPolicy {
    pub policy: Policy,
    pub provider: crate::ext_authz::ExtAuthzProvider,
}

/// One AuthorizationPolicy. No rules = never matches; a rule with nothing in it matches
/// everything (Istio's `rules: [{}]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `<namespace>.<name>` of the AuthorizationPolicy, reported when it decides.
    pub name: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    fn validate(&self) -> Result<(), AuthorizationError> {
        if self.name.is_empty() {
            return Err(AuthorizationError::UnnamedPolicy);
        }
        let invalid = |reason: String| AuthorizationError::InvalidPolicy {
            policy: self.name.clone(),
            reason,
        };
        for rule in &self.rules {
            for condition in &rule.when {
                if let Condition::RequestHeader { name, .. } = condition
                    && !crate::authn::is_lowercase_header_name(name)
                {
                    return Err(invalid(format!(
                        "request.headers[{name}] is not a valid lowercase HTTP header name"
                    )));
                }
                if let Condition::RequestAuthClaim { claim, .. } = condition
                    && (claim.is_empty() || claim.iter().any(String::is_empty))
                {
                    return Err(invalid(
                        "request.auth.claims names an empty claim".to_owned(),
                    ));
                }
            }
            let matchers = rule
                .from
                .iter()
                .flat_map(Source::string_matchers)
                .chain(rule.to.iter().flat_map(Operation::string_matchers))
                .chain(rule.when.iter().flat_map(Condition::string_matchers));
            for matcher in matchers {
                if let StringMatch::Prefix(text) | StringMatch::Suffix(text) = matcher
                    && text.is_empty()
                {
                    return Err(invalid(
                        "an empty prefix or suffix matcher (write presence for `*`)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `from`, `to` and `when` must all match; within `from` and `to` one entry suffices.
/// An empty list places no condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Istio's `Source`: every non-empty field must match. `principals` are SPIFFE IDs without the
/// `spiffe://` scheme (`cluster.local/ns/default/sa/sleep`), as Istio writes them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Principals of the request's verified JWT, `<iss>/<sub>` (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<IpBlock>,
}

impl Source {
    fn string_matchers(&self) -> impl Iterator<Item = &StringMatch> {
        self.principals
            .iter()
            .chain(&self.not_principals)
            .chain(&self.request_principals)
            .chain(&self.not_request_principals)
            .chain(&self.namespaces)
            .chain(&self.not_namespaces)
    }

    /// Whether the source names an HTTP-only field (a request principal, which only a request's
    /// JWT carries).
    pub fn has_http_fields(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }
}

/// Istio's `Operation`: every non-empty field must match. `hosts`, `methods` and `paths` are
/// HTTP-only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<StringMatch>,
}

impl Operation {
    fn string_matchers(&self) -> impl Iterator<Item = &StringMatch> {
        self.hosts
            .iter()
            .chain(&self.not_hosts)
            .chain(&self.methods)
            .chain(&self.not_methods)
            .chain(&self.paths)
            .chain(&self.not_paths)
    }

    /// Whether the operation names an HTTP-only field (which a TCP connection cannot have).
    pub fn has_http_fields(&self) -> bool {
        self.string_matchers().next().is_some()
    }
}

/// Values and excluded values of one `when` attribute: the attribute must match one of
/// `values` (when there are any) and none of `not_values`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Values<T> {
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<T>,
}

/// One `when` condition, by attribute (Istio's `when[].key`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "key", rename_all = "camelCase")]
pub enum Condition {
    /// `request.headers[<name>]` (HTTP only); `name` is lowercase.
    RequestHeader {
        name: String,
        #[serde(flatten)]
        values: Values<StringMatch>,
    },
    /// `source.ip`: the peer address of the connection.
    SourceIp(Values<IpBlock>),
    /// `remote.ip`: the original client address; with no trusted proxies configured it is the
    /// peer address, as in Istio's default (`numTrustedProxies: 0`).
    RemoteIp(Values<IpBlock>),
    /// `source.namespace`: the namespace of the peer's SPIFFE ID (mutual TLS only).
    SourceNamespace(Values<StringMatch>),
    /// `source.principal`: the peer's SPIFFE ID without `spiffe://` (mutual TLS only).
    SourcePrincipal(Values<StringMatch>),
    /// `destination.port`: the workload port the connection arrived for.
    DestinationPort(Values<u16>),
    /// `connection.sni`: the server name the client sent in its TLS ClientHello.
    ConnectionSni(Values<StringMatch>),
    /// `request.auth.principal`: `<iss>/<sub>` of the verified JWT (HTTP only).
    RequestAuthPrincipal(Values<StringMatch>),
    /// `request.auth.audiences`: the verified JWT's `aud`, one value or each of a list (HTTP only).
    RequestAuthAudiences(Values<StringMatch>),
    /// `request.auth.presenter`: the verified JWT's `azp` (HTTP only).
    RequestAuthPresenter(Values<StringMatch>),
    /// `request.auth.claims[a][b]…`: the claim at that path of the verified JWT's payload, a string
    /// or each string of a list (HTTP only).
    RequestAuthClaim {
        claim: Vec<String>,
        #[serde(flatten)]
        values: Values<StringMatch>,
    },
}

impl Condition {
    fn string_matchers(&self) -> Box<dyn Iterator<Item = &StringMatch> + '_> {
        match self {
            Self::RequestHeader { values, .. }
            | Self::SourceNamespace(values)
            | Self::SourcePrincipal(values)
            | Self::ConnectionSni(values)
            | Self::RequestAuthPrincipal(values)
            | Self::RequestAuthAudiences(values)
            | Self::RequestAuthPresenter(values)
            | Self::RequestAuthClaim { values, .. } => {
                Box::new(values.values.iter().chain(&values.not_values))
            }
            Self::SourceIp(_) | Self::RemoteIp(_) | Self::DestinationPort(_) => {
                Box::new(std::iter::empty())
            }
        }
    }

    /// Whether the attribute exists only on an HTTP request (a header, or the request's JWT).
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            Self::RequestHeader { .. }
                | Self::RequestAuthPrincipal(_)
                | Self::RequestAuthAudiences(_)
                | Self::RequestAuthPresenter(_)
                | Self::RequestAuthClaim { .. }
        )
    }
}

/// Istio's string match syntax, parsed once: `*` alone (presence), a leading `*` (suffix), a
/// trailing `*` (prefix), or exact. A `*` anywhere else has no meaning in Istio and is exact
/// text here (the operator reports it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any value, as long as the attribute is present.
    Presence,
}

impl StringMatch {
    /// Parses Istio's syntax.
    pub fn parse(text: &str) -> Self {
        if text == "*" {
            Self::Presence
        } else if let Some(suffix) = text.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else if let Some(prefix) = text.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::Exact(text.to_owned())
        }
    }

    /// Case-sensitive match (principals, namespaces, methods, paths, header values, SNI).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Presence => true,
        }
    }

    /// Whether the pattern names a port (`example.com:8080`, `example.com:*`): such a `hosts`
    /// value is matched against the whole authority, a value without one against the host.
    pub fn names_a_port(&self) -> bool {
        match self {
            Self::Exact(text) | Self::Prefix(text) | Self::Suffix(text) => text.contains(':'),
            Self::Presence => false,
        }
    }

    /// ASCII case-insensitive match, for host names (Istio's `hosts` ignore case).
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        let fold = |s: &str| s.to_ascii_lowercase();
        match self {
            Self::Exact(exact) => value.eq_ignore_ascii_case(exact),
            Self::Prefix(prefix) => fold(value).starts_with(&fold(prefix)),
            Self::Suffix(suffix) => fold(value).ends_with(&fold(suffix)),
            Self::Presence => true,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(exact) => f.write_str(exact),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::Suffix(suffix) => write!(f, "*{suffix}"),
            Self::Presence => f.write_str("*"),
        }
    }
}

/// An address block (`10.1.0.0/16`, or a single address, which is a full-length block).
/// Serialized as its text.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    pub fn new(address: IpAddr, prefix_len: u8) -> Result<Self, AuthorizationError> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(AuthorizationError::InvalidIpBlock(format!(
                "{address}/{prefix_len}: the prefix length is over {max}"
            )));
        }
        Ok(Self {
            network: address,
            prefix_len,
        })
    }

    /// Whether `address` is inside the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as
    /// a dual-stack socket reports IPv4 peers) counts as its IPv4 address.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                prefix_equal(&net.octets(), &addr.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                prefix_equal(&net.octets(), &addr.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_equal(a: &[u8], b: &[u8], prefix_len: u8) -> bool {
    let full = usize::from(prefix_len / 8);
    let rest = prefix_len % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

impl FromStr for IpBlock {
    type Err = AuthorizationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || AuthorizationError::InvalidIpBlock(text.to_owned());
        match text.split_once('/') {
            Some((address, len)) => {
                let address: IpAddr = address.trim().parse().map_err(|_| invalid())?;
                let len: u8 = len.trim().parse().map_err(|_| invalid())?;
                Self::new(address, len)
            }
            None => {
                let address: IpAddr = text.trim().parse().map_err(|_| invalid())?;
                let len = if address.is_ipv4() { 32 } else { 128 };
                Self::new(address, len)
            }
        }
    }
}

impl TryFrom<String> for IpBlock {
    type Error = AuthorizationError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<IpBlock> for String {
    fn from(block: IpBlock) -> Self {
        block.to_string()
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizationError {
    #[error("an authorization policy has no name (expected <namespace>.<name>)")]
    UnnamedPolicy,
    #[error("authorization policy {policy}: {reason}")]
    InvalidPolicy { policy: String, reason: String },
    #[error("{0:?} is not an IP address or CIDR block")]
    InvalidIpBlock(String),
    #[error(transparent)]
    InvalidProvider(#[from] crate::ext_authz::ProviderError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn string_matchers_parse_istio_syntax() {
        let table = [
            ("*", StringMatch::Presence),
            ("/admin/*", StringMatch::Prefix("/admin/".into())),
            ("*.png", StringMatch::Suffix(".png".into())),
            ("GET", StringMatch::Exact("GET".into())),
            ("", StringMatch::Exact(String::new())),
        ];
        for (text, expected) in table {
            let parsed = StringMatch::parse(text);
            assert_eq!(parsed, expected, "{text:?}");
            assert_eq!(parsed.to_string(), text, "round trip of {text:?}");
        }
    }

    #[test]
    fn string_matchers_match_case_sensitively_except_hosts() {
        let table = [
            ("/admin*", "/admin/x", true, true),
            ("/admin*", "/ADMIN/x", false, true),
            ("*.example.com", "api.example.com", true, true),
            ("*.example.com", "api.EXAMPLE.com", false, true),
            ("*.example.com", "example.com", false, false),
            ("GET", "GET", true, true),
            ("GET", "get", false, true),
            ("*", "", true, true),
        ];
        for (pattern, value, sensitive, insensitive) in table {
            let matcher = StringMatch::parse(pattern);
            assert_eq!(matcher.matches(value), sensitive, "{pattern} ~ {value}");
            assert_eq!(
                matcher.matches_ignoring_case(value),
                insensitive,
                "{pattern} ~i {value}"
            );
        }
    }

    #[test]
    fn ip_blocks_parse_and_contain() {
        let table = [
            ("10.1.0.0/16", "10.1.200.3", true),
            ("10.1.0.0/16", "10.2.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("10.0.0.0/9", "10.127.0.1", true),
            ("10.0.0.0/9", "10.128.0.1", false),
            ("10.0.0.0/8", "::ffff:10.9.9.9", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("fd00::/8", "10.0.0.1", false),
        ];
        for (block, address, expected) in table {
            let block: IpBlock = block.parse().unwrap();
            let address: IpAddr = address.parse().unwrap();
            assert_eq!(block.contains(address), expected, "{block} ∋ {address}");
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0", "10.0.0.0/x", "host"] {
            let error = bad.parse::<IpBlock>().unwrap_err();
            assert!(
                error.to_string().contains(bad.split('/').next().unwrap()),
                "{error}"
            );
        }
    }

    #[test]
    fn the_model_round_trips_through_json_and_validates() {
        let text = json!({
            "deny": [{"name": "foo.deny-admin", "rules": [{
                "from": [{"principals": [{"exact": "cluster.local/ns/foo/sa/bad"}],
                          "ipBlocks": ["10.0.0.0/8"]}],
                "to": [{"ports": [8080], "paths": [{"prefix": "/admin/"}]}],
                "when": [
                    {"key": "requestHeader", "name": "x-user", "values": ["presence"]},
                    {"key": "destinationPort", "notValues": [9090]}
                ]
            }]}],
            "allow": [{"name": "foo.allow-all", "rules": [{}]}, {"name": "foo.nothing", "rules": []}]
        });
        let parsed: InboundAuthorization = serde_json::from_value(text.clone()).unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.allow[1].rules, vec![], "no rules stays no rules");
        assert_eq!(
            parsed.allow[0].rules,
            vec![Rule::default()],
            "{{}} stays {{}}"
        );
        assert_eq!(serde_json::to_value(&parsed).unwrap(), text);
        let order: Vec<_> = parsed
            .policies()
            .map(|(a, p)| (a, p.name.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (Action::Deny, "foo.deny-admin"),
                (Action::Allow, "foo.allow-all"),
                (Action::Allow, "foo.nothing")
            ]
        );
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let table = [
            (json!({"allow": [{"name": ""}]}), "no name"),
            (
                json!({"deny": [{"name": "a.b", "rules": [{"when": [
                    {"key": "requestHeader", "name": "X-User", "values": ["presence"]}]}]}]}),
                "request.headers[X-User]",
            ),
            (
                json!({"allow": [{"name": "a.b", "rules": [{"to": [{"paths": [{"prefix": ""}]}]}]}]}),
                "empty prefix",
            ),
        ];
        for (config, message) in table {
            let parsed: InboundAuthorization = serde_json::from_value(config).unwrap();
            let error = parsed.validate().unwrap_err().to_string();
            assert!(error.contains(message), "{error:?} should name {message:?}");
        }
        let bad_block = serde_json::from_value::<InboundAuthorization>(
            json!({"allow": [{"name": "a.b", "rules": [{"from": [{"ipBlocks": ["10.0.0.0/40"]}]}]}]}),
        );
        assert!(bad_block.unwrap_err().to_string().contains("10.0.0.0/40"));
    }
}
