//! Validation of the Istio kinds the operator admits — `VirtualService`, `DestinationRule`,
//! `ServiceEntry`, `PeerAuthentication` and `AuthorizationPolicy` — as Istio's admission webhook
//! validates them, as pure functions: an object (and, for a VirtualService, the DestinationRules
//! of its namespace) in, every problem out, each naming the field path
//! (`spec.http[0].route[1].weight`). Unknown fields are refused everywhere (strict decoding). The
//! operator's webhook only adapts this to AdmissionReviews. Durations, hosts and `exportTo` are
//! read as `crate::istio` defines them, the module the traffic compiler reads them with too.
//!
//! One file per kind holds its rules (`virtual_service.rs`, `destination_rule.rs`,
//! `service_entry.rs`, and `security.rs` for the two security kinds); this one holds the entry
//! point, the error types and the checks they share.
//!
//! Where Istio only warns, or where these files decide differently, the rule says why:
//! - A route's `subset` is refused only when DestinationRules of the namespace being admitted
//!   apply to its host (as the compiler picks them: the most specific covering host, exact
//!   before wildcard) and none of them defines the subset. Istio only warns (a rule can
//!   be applied before its DestinationRule); a DestinationRule that exists without the subset is
//!   a certain mistake, while a missing one may still be on its way.
//! - Weights are refused when negative, when they add up to more than 100, or to 0 over several
//!   destinations (nothing would be sent anywhere).
//! - A VirtualService without hosts is a delegate (as in Istio); it may have no gateways, TLS or
//!   TCP routes. Empty host strings are refused everywhere.

use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;

use crate::istio::duration::{self, Minimum};
use crate::istio::export_to;
use crate::networking::NETWORKING_GROUP;
use crate::networking::service_entry::ServiceEntrySpec;
use crate::networking::{DestinationRule, DestinationRuleSpec, StringMatch, VirtualServiceSpec};
use crate::schema::decode_strict;
use crate::security::{
    AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec, SECURITY_GROUP,
};

mod destination_rule;
mod security;
mod service_entry;
mod virtual_service;

pub use destination_rule::validate_destination_rule;
pub use security::{
    validate_authorization_policy, validate_peer_authentication, validate_request_authentication,
};
pub use service_entry::validate_service_entry;
pub use virtual_service::validate_virtual_service;

/// Istio's `retryOn` policies (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on`); HTTP
/// status codes are accepted as well.
pub const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// One problem: the field's path from the object root, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why an object was refused: every problem found, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejection {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The kinds validated here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    ServiceEntry,
    PeerAuthentication,
    RequestAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    /// The kind of an object of API group `group` named by its `kind`, if it is one of ours.
    pub fn from_group_and_name(group: &str, kind: &str) -> Option<Self> {
        match (group, kind) {
            (NETWORKING_GROUP, "VirtualService") => Some(Self::VirtualService),
            (NETWORKING_GROUP, "DestinationRule") => Some(Self::DestinationRule),
            (NETWORKING_GROUP, "ServiceEntry") => Some(Self::ServiceEntry),
            (SECURITY_GROUP, "PeerAuthentication") => Some(Self::PeerAuthentication),
            (SECURITY_GROUP, "RequestAuthentication") => Some(Self::RequestAuthentication),
            (SECURITY_GROUP, "AuthorizationPolicy") => Some(Self::AuthorizationPolicy),
            _ => None,
        }
    }
}

/// Top-level keys of a custom resource; anything else is a misspelling.
const OBJECT_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// Validates a whole object as sent for admission: unknown fields anywhere (strict decoding),
/// then Istio's rules. `destination_rules` are those of `namespace`, used to check the subsets
/// a VirtualService routes to; they are ignored for the other kinds.
pub fn validate_object(
    kind: Kind,
    object: &serde_json::Value,
    namespace: &str,
    destination_rules: &[DestinationRule],
) -> Result<(), Rejection> {
    let mut errors = Vec::new();
    if let Some(map) = object.as_object() {
        for key in map.keys().filter(|k| !OBJECT_KEYS.contains(&k.as_str())) {
            errors.push(FieldError {
                path: key.clone(),
                message: format!("unknown field {key:?}"),
            });
        }
    } else {
        errors.push(FieldError {
            path: ".".to_owned(),
            message: "the object is not a JSON object".to_owned(),
        });
    }
    let empty = serde_json::Value::Object(Default::default());
    let spec = object.get("spec").unwrap_or(&empty);
    match kind {
        Kind::VirtualService => decode_spec::<VirtualServiceSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| {
                errors.extend(validate_virtual_service(spec, namespace, destination_rules))
            }),
        Kind::DestinationRule => decode_spec::<DestinationRuleSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_destination_rule(spec))),
        Kind::ServiceEntry => decode_spec::<ServiceEntrySpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_service_entry(spec))),
        Kind::PeerAuthentication => decode_spec::<PeerAuthenticationSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_peer_authentication(spec))),
        Kind::RequestAuthentication => decode_spec::<RequestAuthenticationSpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_request_authentication(spec))),
        Kind::AuthorizationPolicy => decode_spec::<AuthorizationPolicySpec>(spec, &mut errors)
            .iter()
            .for_each(|spec| errors.extend(validate_authorization_policy(spec))),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Rejection { errors })
    }
}

fn decode_spec<T: DeserializeOwned>(
    spec: &serde_json::Value,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    match decode_strict::<T>(spec) {
        Ok(spec) => Some(spec),
        Err(error) => {
            let path = if error.path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{}", error.path)
            };
            errors.push(FieldError {
                path,
                message: error.message,
            });
            None
        }
    }
}

/// Collects errors under paths built by the caller.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// A duration held to Istio's `ValidateDuration` (at least 1ms, whole milliseconds).
    fn duration(&mut self, path: &str, value: Option<&String>) {
        self.duration_with(path, value, Minimum::Millisecond);
    }

    fn duration_with(&mut self, path: &str, value: Option<&String>, minimum: Minimum) {
        if let Some(text) = value
            && let Err(e) = duration::parse_with_minimum(text, minimum)
        {
            self.add(path, e.to_string());
        }
    }

    fn percent(&mut self, path: &str, value: Option<f64>) {
        if let Some(value) = value
            && !(0.0..=100.0).contains(&value)
        {
            self.add(path, format!("{value} is not a percentage in 0..=100"));
        }
    }

    fn int_percent(&mut self, path: &str, value: Option<i64>) {
        if let Some(value) = value
            && !(0..=100).contains(&value)
        {
            self.add(path, format!("{value} is not a percentage in 0..=100"));
        }
    }

    fn non_negative(&mut self, path: &str, value: Option<i32>) {
        if let Some(value) = value
            && value < 0
        {
            self.add(path, format!("{value} must not be negative"));
        }
    }

    fn port(&mut self, path: &str, value: Option<u32>) {
        if let Some(port) = value
            && !(1..=65535).contains(&port)
        {
            self.add(path, format!("{port} is not a port number in 1..=65535"));
        }
    }

    fn string_match(&mut self, path: &str, value: &StringMatch) {
        if let StringMatch::Regex(pattern) = value {
            self.regex(&format!("{path}.regex"), pattern);
        }
    }

    fn regex(&mut self, path: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            self.add(path, format!("invalid RE2 regex {pattern:?}: {e}"));
        }
    }

    fn subnet(&mut self, path: &str, value: &str) {
        if !is_ip_or_cidr(value) {
            self.add(path, format!("{value:?} is not an IP address or CIDR"));
        }
    }

    fn export_to(&mut self, path: &str, export_to: &[String]) {
        for (index, message) in export_to::problems(export_to) {
            match index {
                Some(i) => self.add(&format!("{path}[{i}]"), message),
                None => self.add(path, message),
            }
        }
    }
}

fn is_ip_or_cidr(text: &str) -> bool {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let Ok(ip) = address.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| !p.starts_with('+') && p.parse::<u8>().is_ok_and(|bits| bits <= max))
}

#[cfg(test)]
mod tests;
