//! The security kinds' admission rules: `PeerAuthentication` (port-level mTLS),
//! `RequestAuthentication` (JWT rules) and `AuthorizationPolicy` (actions, sources, operations,
//! conditions).

use crate::security::{
    AuthorizationAction, AuthorizationOperation, AuthorizationPolicySpec, AuthorizationSource,
    JwtRule, PeerAuthenticationSpec, RequestAuthenticationSpec,
};

use super::{Errors, FieldError, is_ip_or_cidr};

/// `PeerAuthentication`: Istio's rules for `portLevelMtls` (only with a selector, keys that are
/// port numbers).
pub fn validate_peer_authentication(spec: &PeerAuthenticationSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if !spec.port_level_mtls.is_empty() && spec.selector.match_labels.is_empty() {
        errors.add(
            "spec.portLevelMtls",
            "needs a selector: port-level settings apply to the selected workloads' ports",
        );
    }
    for port in spec.port_level_mtls.keys() {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            errors.add(
                &format!("spec.portLevelMtls[{port}]"),
                "not a port number in 1..=65535",
            );
        }
    }
    errors.0
}

/// `RequestAuthentication`, as Istio validates it: one attachment (selector or targetRef), and
/// per JWT rule an issuer, an `http`/`https` `jwksUri`, a `jwks` that is a JSON object, named
/// headers, parameters and cookies, valid output header names and a parsable `timeout`.
pub fn validate_request_authentication(spec: &RequestAuthenticationSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if !spec.selector.match_labels.is_empty() && spec.has_target_ref() {
        errors.add(
            "spec",
            "only one of selector, targetRef or targetRefs may be set",
        );
    }
    for (r, rule) in spec.jwt_rules.iter().enumerate() {
        jwt_rule(&mut errors, &format!("spec.jwtRules[{r}]"), rule);
    }
    errors.0
}

fn jwt_rule(errors: &mut Errors, path: &str, rule: &JwtRule) {
    if rule.issuer.is_empty() {
        errors.add(&format!("{path}.issuer"), "must not be empty");
    }
    for (i, audience) in rule.audiences.iter().enumerate() {
        if audience.is_empty() {
            errors.add(&format!("{path}.audiences[{i}]"), "must not be empty");
        }
    }
    if !rule.jwks_uri.is_empty() {
        let authority = rule
            .jwks_uri
            .strip_prefix("https://")
            .or_else(|| rule.jwks_uri.strip_prefix("http://"))
            .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
        if authority.is_none_or(str::is_empty) {
            errors.add(
                &format!("{path}.jwksUri"),
                format!("{:?} is not an http or https URL", rule.jwks_uri),
            );
        }
    }
    if !rule.jwks.is_empty()
        && !serde_json::from_str::<serde_json::Value>(&rule.jwks)
            .is_ok_and(|v| v["keys"].is_array())
    {
        errors.add(
            &format!("{path}.jwks"),
            "is not a JSON Web Key Set (a JSON object with a \"keys\" list)",
        );
    }
    for (h, header) in rule.from_headers.iter().enumerate() {
        if !is_header_name(&header.name) {
            errors.add(
                &format!("{path}.fromHeaders[{h}].name"),
                format!("{:?} is not an HTTP header name", header.name),
            );
        }
    }
    for (field, names) in [
        ("fromParams", &rule.from_params),
        ("fromCookies", &rule.from_cookies),
    ] {
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                errors.add(&format!("{path}.{field}[{i}]"), "must not be empty");
            }
        }
    }
    if !rule.output_payload_to_header.is_empty() && !is_header_name(&rule.output_payload_to_header)
    {
        errors.add(
            &format!("{path}.outputPayloadToHeader"),
            format!(
                "{:?} is not an HTTP header name",
                rule.output_payload_to_header
            ),
        );
    }
    for (c, output) in rule.output_claim_to_headers.iter().enumerate() {
        if !is_header_name(&output.header) {
            errors.add(
                &format!("{path}.outputClaimToHeaders[{c}].header"),
                format!("{:?} is not an HTTP header name", output.header),
            );
        }
        if output.claim.is_empty() {
            errors.add(
                &format!("{path}.outputClaimToHeaders[{c}].claim"),
                "must not be empty",
            );
        }
    }
    if !rule.timeout.is_empty() && crate::istio::duration::parse(&rule.timeout).is_err() {
        errors.add(
            &format!("{path}.timeout"),
            format!("{:?} is not a duration", rule.timeout),
        );
    }
}

/// An HTTP header name (a token of RFC 9110), in any case: the proxy compares it lowercased.
fn is_header_name(name: &str) -> bool {
    trellis_config::authn::is_lowercase_header_name(&name.to_ascii_lowercase())
}

/// `AuthorizationPolicy`, as Istio validates it: one attachment (selector or targetRef), a
/// provider exactly for CUSTOM, no empty `from.source` / `to.operation` (an empty one would
/// match everything — typically a field whose name was mistyped), conditions with a key and
/// values, valid ports and IP blocks.
pub fn validate_authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if !spec.selector.match_labels.is_empty() && spec.has_target_ref() {
        errors.add(
            "spec",
            "only one of selector, targetRef or targetRefs may be set",
        );
    }
    match (&spec.action, spec.provider.is_empty()) {
        (AuthorizationAction::Custom, true) => {
            errors.add("spec.provider", "action CUSTOM needs a provider");
        }
        (AuthorizationAction::Custom, false) | (_, true) => {}
        (_, false) => errors.add(
            "spec.provider",
            "a provider is only allowed with action CUSTOM",
        ),
    }
    if spec.action == AuthorizationAction::Unknown {
        errors.add("spec.action", "not one of ALLOW, DENY, AUDIT, CUSTOM");
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{r}]");
        for (f, from) in rule.from.iter().enumerate() {
            authorization_source(
                &mut errors,
                &format!("{path}.from[{f}].source"),
                &from.source,
            );
        }
        for (t, to) in rule.to.iter().enumerate() {
            authorization_operation(
                &mut errors,
                &format!("{path}.to[{t}].operation"),
                &to.operation,
            );
        }
        for (w, when) in rule.when.iter().enumerate() {
            let path = format!("{path}.when[{w}]");
            if when.key.is_empty() {
                errors.add(&format!("{path}.key"), "must not be empty");
            }
            if when.values.is_empty() && when.not_values.is_empty() {
                errors.add(&path, "needs values or notValues");
            }
        }
    }
    errors.0
}

fn authorization_source(errors: &mut Errors, path: &str, source: &AuthorizationSource) {
    if source.is_empty() {
        errors.add(path, "must not be empty");
        return;
    }
    for (field, blocks) in [
        ("ipBlocks", &source.ip_blocks),
        ("notIpBlocks", &source.not_ip_blocks),
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
    ] {
        for (i, block) in blocks.iter().enumerate() {
            if !is_ip_or_cidr(block) {
                errors.add(
                    &format!("{path}.{field}[{i}]"),
                    format!("{block:?} is not an IP address or CIDR block"),
                );
            }
        }
    }
}

fn authorization_operation(errors: &mut Errors, path: &str, operation: &AuthorizationOperation) {
    if operation.is_empty() {
        errors.add(path, "must not be empty");
        return;
    }
    for (field, ports) in [
        ("ports", &operation.ports),
        ("notPorts", &operation.not_ports),
    ] {
        for (i, port) in ports.iter().enumerate() {
            if port.parse::<u16>().is_err() {
                errors.add(
                    &format!("{path}.{field}[{i}]"),
                    format!("{port:?} is not a port number"),
                );
            }
        }
    }
}
