//! Fuzzes what the operator reads from an unauthenticated `POST /v1/certificate` on 15012: the
//! `Authorization` header, the JSON body, and the PEM CSR inside it, which the CA parses and
//! checks against the caller's identity before signing.
//!
//! Whatever is signed must be a leaf (not a CA) whose only name is the caller's identity.
//!
//! Input: the header value, a newline, then the body. A body that is not a certificate request
//! is also tried as the CSR PEM itself, so the CSR parser is reached without the JSON wrapper.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use libfuzzer_sys::fuzz_target;
use trellis_config::SpiffeId;
use trellis_operator::ca::{CaMaterial, CertificateAuthority};
use trellis_operator::control_plane::{bearer_token, decode_certificate_request};

static CA: LazyLock<CertificateAuthority> = LazyLock::new(|| {
    let material = CaMaterial::generate_root("cluster.local", Duration::from_secs(365 * 86_400))
        .expect("a root CA");
    CertificateAuthority::load(material).expect("the generated root loads")
});

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[][..], data),
    };
    if let Ok(value) = HeaderValue::from_bytes(header) {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value);
        if let Some(token) = bearer_token(&headers) {
            assert!(
                !token.is_empty() && token.trim() == token,
                "token {token:?}"
            );
        }
    }
    let csr = match decode_certificate_request(body) {
        Ok(request) => request.csr,
        Err(_) => match std::str::from_utf8(body) {
            Ok(pem) => pem.to_owned(),
            Err(_) => return,
        },
    };
    let identity = SpiffeId::new("cluster.local", "demo", "web");
    if let Ok(chain) = CA.sign_workload(&csr, &identity, Duration::from_secs(3600)) {
        let leaf = chain.first().expect("a signed chain has a leaf");
        let (uris, is_ca) = leaf_facts(leaf);
        assert_eq!(
            uris,
            [identity.to_string()],
            "signed a leaf for other names: {csr:?}"
        );
        assert!(!is_ca, "signed a CA certificate: {csr:?}");
    }
});

/// The URI SANs of a PEM certificate, and whether it is a CA.
fn leaf_facts(pem: &str) -> (Vec<String>, bool) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("the CA writes PEM");
    let cert = pem.parse_x509().expect("the CA writes X.509");
    let uris = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => (*uri).to_owned(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|constraints| constraints.value.ca);
    (uris, is_ca)
}
