//! Fuzzes AuthorizationPolicy evaluation: a workload's compiled policies (JSON, as the proxy
//! receives them in its config) and the attributes of a connection and, optionally, of one HTTP
//! request, as the inbound listener builds them (the path normalised first).
//!
//! Input, one item per line: the `InboundAuthorization` JSON, the source IP, the peer's SPIFFE
//! ID (empty: plaintext), the destination port, the method (empty: a TCP connection, no
//! request), the request target, the authority, then `name: value` headers.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use trellis_config::authz::InboundAuthorization;
use trellis_proxy::authz::{
    ConnectionAttributes, HttpAttributes, NO_ALLOW_MATCHED, Verdict, evaluate,
};
use trellis_proxy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let Ok(policy) = serde_json::from_str::<InboundAuthorization>(lines.next().unwrap_or(""))
    else {
        return;
    };
    // A snapshot whose policies do not validate is rejected whole before any evaluation.
    if policy.validate().is_err() {
        return;
    }
    let mut next = || lines.next().unwrap_or("");
    let source_ip = next()
        .parse()
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 7)));
    let principal = Some(next()).filter(|p| !p.is_empty());
    let destination_port = next().parse().unwrap_or(8080);
    let method = next();
    let target = next();
    let authority = next();
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    let connection = ConnectionAttributes {
        source_ip,
        source_principal: principal,
        destination_port,
        sni: None,
    };
    let normalized = normalize(target);
    let request = match (&normalized, method.is_empty()) {
        (Ok(path), false) => Some(HttpAttributes {
            method,
            path: &path.path,
            authority,
            host,
            headers: &headers,
            // No verified JWT: request principals and claims are covered by the unit tables of
            // `proxy/src/authz.rs` and `proxy/src/authn.rs`, not by this target.
            auth: None,
        }),
        // The listener answers 400 before authorization for a path it cannot normalise.
        (Err(_), false) => return,
        (_, true) => None,
    };

    let verdict = evaluate(&policy, &connection, request.as_ref());
    match &verdict {
        Verdict::Allow => {}
        Verdict::Deny { policy: name }
            if name == NO_ALLOW_MATCHED && !policy.deny.iter().any(|p| &p.name == name) =>
        {
            assert!(
                !policy.allow.is_empty(),
                "no ALLOW policy matched, yet none exists"
            );
        }
        Verdict::Deny { policy: name } => assert!(
            policy.deny.iter().any(|p| &p.name == name),
            "denied by {name:?}, which is no DENY policy"
        ),
    }
    if policy.is_empty() {
        assert_eq!(verdict, Verdict::Allow, "no policy allows everything");
    }
    // The policies as the operator re-encodes them decide the same.
    let encoded = serde_json::to_string(&policy).expect("policies encode");
    let decoded: InboundAuthorization = serde_json::from_str(&encoded).expect("policies decode");
    assert_eq!(decoded, policy, "round trip changed the policies");
    assert_eq!(evaluate(&decoded, &connection, request.as_ref()), verdict);
});
