//! The mesh certificate authority: an ECDSA P-256 root created once and kept in a Secret (or the
//! user's CA in Istio's `cacerts` layout), signing workload certificates whose only identity is
//! a SPIFFE URI, and the operator's own serving certificates. The trust bundle it hands out is
//! its root plus, during a root rotation, the other root still trusted (see `rotation`).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use trellis_config::SpiffeId;

/// Keys of the CA Secret, in Istio's `cacerts` layout so a user-provided CA drops in unchanged.
pub const CA_CERT_KEY: &str = "ca-cert.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";

/// Allowed clock skew between nodes: certificates start being valid this long before issue.
pub const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "CSR must carry exactly one URI SAN, the SPIFFE identity {expected}; it asked for {got:?}"
    )]
    IdentityMismatch { expected: String, got: Vec<String> },
    #[error("CSR must not request a CA certificate")]
    CaRequested,
    #[error("the CA secret is missing {0}")]
    MissingKey(&'static str),
    #[error("the CA material is not valid PEM: {0}")]
    BadPem(String),
    #[error("the CA Secret's root-rotation record is inconsistent: {0}")]
    RotationState(String),
}

/// PEM material of a CA, as stored in the Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct CaMaterial {
    pub ca_cert: String,
    pub ca_key: String,
    pub root_cert: String,
    /// Intermediates from the signing CA up to (excluding) the root; empty for a self-signed root.
    pub cert_chain: String,
}

/// A loaded, ready-to-sign CA.
pub struct CertificateAuthority {
    material: CaMaterial,
    issuer: Issuer<'static, KeyPair>,
    /// Expiry of the signing CA certificate (the root itself, or the user's intermediate).
    not_after: OffsetDateTime,
    root_not_after: OffsetDateTime,
    /// Roots proxies must trust: ours first, then any other root still trusted.
    trust_bundle: Vec<String>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_after", &self.not_after)
            .field("roots", &self.trust_bundle.len())
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// A new self-signed root valid for `ttl`.
    pub fn generate_root(trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Trellis root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Self {
            ca_cert: pem.clone(),
            ca_key: key.serialize_pem(),
            root_cert: pem,
            cert_chain: String::new(),
        })
    }

    /// Reads the material from a Secret's data (Istio `cacerts` layout; `cert-chain.pem` optional).
    pub fn from_secret_data(get: impl Fn(&'static str) -> Option<String>) -> Result<Self, CaError> {
        let ca_cert = get(CA_CERT_KEY).ok_or(CaError::MissingKey(CA_CERT_KEY))?;
        let root_cert = get(ROOT_CERT_KEY).unwrap_or_else(|| ca_cert.clone());
        let cert_chain = get(CERT_CHAIN_KEY)
            .map(|chain| chain_without_root(&chain, &root_cert))
            .unwrap_or_default();
        Ok(Self {
            ca_key: get(CA_KEY_KEY).ok_or(CaError::MissingKey(CA_KEY_KEY))?,
            ca_cert,
            root_cert,
            cert_chain,
        })
    }

    pub fn to_secret_data(&self) -> [(&'static str, String); 4] {
        [
            (CA_CERT_KEY, self.ca_cert.clone()),
            (CA_KEY_KEY, self.ca_key.clone()),
            (ROOT_CERT_KEY, self.root_cert.clone()),
            (CERT_CHAIN_KEY, self.cert_chain.clone()),
        ]
    }
}

/// Istio's `cert-chain.pem` holds the chain including the root; we send the root separately.
fn chain_without_root(chain: &str, root: &str) -> String {
    chain.replace(root.trim(), "").trim().to_owned()
}

impl CertificateAuthority {
    pub fn load(material: CaMaterial) -> Result<Self, CaError> {
        Self::load_trusting(material, &[])
    }

    /// Loads the CA and also hands out `other_roots` (PEM) in its trust bundle: during a root
    /// rotation, the root that is not signing is still trusted.
    pub fn load_trusting(material: CaMaterial, other_roots: &[String]) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(&material.ca_key)?;
        let issuer = Issuer::from_ca_cert_pem(&material.ca_cert, key)?;
        let not_after = not_after_of(&material.ca_cert)?;
        let root_not_after = not_after_of(&material.root_cert)?;
        let mut trust_bundle = vec![material.root_cert.clone()];
        for root in other_roots {
            not_after_of(root)?;
            if !trust_bundle.iter().any(|r| r.trim() == root.trim()) {
                trust_bundle.push(root.clone());
            }
        }
        Ok(Self {
            material,
            issuer,
            not_after,
            root_not_after,
            trust_bundle,
        })
    }

    pub fn material(&self) -> &CaMaterial {
        &self.material
    }

    /// PEM roots proxies must trust (two during a root rotation).
    pub fn trust_bundle(&self) -> Vec<String> {
        self.trust_bundle.clone()
    }

    /// Expiry of the signing CA certificate: no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Expiry of the root this CA chains to.
    pub fn root_not_after(&self) -> OffsetDateTime {
        self.root_not_after
    }

    /// Expiry of the signing intermediate, when the CA signs with one (a user's `cacerts`).
    pub fn intermediate_not_after(&self) -> Option<OffsetDateTime> {
        (self.material.ca_cert.trim() != self.material.root_cert.trim()).then_some(self.not_after)
    }

    /// Chain to send with a leaf: the leaf, the signing CA when it is not the root, and the
    /// intermediates above it.
    fn chain_for(&self, leaf_pem: String) -> Vec<String> {
        let mut chain = vec![leaf_pem];
        if self.material.ca_cert.trim() != self.material.root_cert.trim() {
            chain.push(self.material.ca_cert.clone());
        }
        chain.extend(split_pem(&self.material.cert_chain));
        chain
    }

    /// Signs a workload CSR after checking that it asks for exactly `identity` and nothing else.
    /// Returns the chain, leaf first.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let expected = identity.to_string();
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested != [expected.clone()] {
            return Err(CaError::IdentityMismatch {
                expected,
                got: requested,
            });
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CaError::CaRequested);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(self.chain_for(leaf.pem()))
    }

    /// A serving certificate for the operator's own endpoints (DNS names), with its new key.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((self.chain_for(cert.pem()), key.serialize_pem()))
    }
}

/// When a certificate this CA signed was issued: its notBefore is backdated by [`BACKDATE`].
/// Second precision, rounded down (X.509 times carry no fractions).
pub fn issued_at(leaf_der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).ok()?;
    Some(cert.validity().not_before.to_datetime() + BACKDATE)
}

fn not_after_of(cert_pem: &str) -> Result<OffsetDateTime, CaError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CaError::BadPem(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CaError::BadPem(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Splits concatenated PEM blocks.
pub fn split_pem(pems: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pems.split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.ends_with(END))
        .map(|block| format!("{block}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateParams;

    fn csr_for(uris: &[&str]) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn ca() -> CertificateAuthority {
        let material =
            CaMaterial::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        CertificateAuthority::load(material).unwrap()
    }

    #[test]
    fn signs_exactly_the_tokens_identity() {
        let ca = ca();
        let id = SpiffeId::new("cluster.local", "demo", "client");
        let chain = ca
            .sign_workload(
                &csr_for(&["spiffe://cluster.local/ns/demo/sa/client"]),
                &id,
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(
            chain.len(),
            1,
            "self-signed root: the chain is the leaf alone"
        );
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            r#"[URI("spiffe://cluster.local/ns/demo/sa/client")]"#
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 600 + BACKDATE.as_secs() as i64);
    }

    #[test]
    fn refuses_csrs_for_other_or_extra_identities() {
        let ca = ca();
        let id = SpiffeId::new("cluster.local", "demo", "client");
        for uris in [
            vec!["spiffe://cluster.local/ns/demo/sa/server"],
            vec!["spiffe://other.domain/ns/demo/sa/client"],
            vec![
                "spiffe://cluster.local/ns/demo/sa/client",
                "spiffe://cluster.local/ns/kube-system/sa/admin",
            ],
            vec![],
        ] {
            let err = ca
                .sign_workload(&csr_for(&uris), &id, Duration::from_secs(60))
                .unwrap_err();
            assert!(
                matches!(err, CaError::IdentityMismatch { .. }),
                "{uris:?}: {err}"
            );
        }
        assert!(
            ca.sign_workload("garbage", &id, Duration::from_secs(60))
                .is_err()
        );
    }

    #[test]
    fn a_rotating_ca_hands_out_both_roots_and_dates_its_certificates() {
        let old = CaMaterial::generate_root("td", Duration::from_secs(3600)).unwrap();
        let new = CaMaterial::generate_root("td", Duration::from_secs(7200)).unwrap();
        let ca = CertificateAuthority::load_trusting(
            new.clone(),
            &[old.root_cert.clone(), new.root_cert.clone()],
        )
        .unwrap();
        assert_eq!(ca.trust_bundle(), [new.root_cert.clone(), old.root_cert]);
        assert_eq!(ca.intermediate_not_after(), None);
        assert!(ca.root_not_after() > OffsetDateTime::now_utc() + Duration::from_secs(7000));
        assert!(
            CertificateAuthority::load_trusting(new, &["not pem".to_owned()]).is_err(),
            "a corrupt extra root is refused, not silently dropped"
        );

        let id = SpiffeId::new("td", "demo", "client");
        let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let chain = ca
            .sign_workload(
                &csr_for(&["spiffe://td/ns/demo/sa/client"]),
                &id,
                Duration::from_secs(120),
            )
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
        let issued = issued_at(&pem.contents).unwrap();
        assert!(
            issued >= before && issued <= OffsetDateTime::now_utc(),
            "{issued} not within the signing call"
        );
        assert_eq!(issued_at(b"garbage"), None);
    }

    #[test]
    fn round_trips_through_secret_data_and_splits_chains() {
        let material = CaMaterial::generate_root("td", Duration::from_secs(60)).unwrap();
        let data: std::collections::BTreeMap<_, _> =
            material.to_secret_data().into_iter().collect();
        let loaded = CaMaterial::from_secret_data(|k| data.get(k).cloned()).unwrap();
        assert_eq!(loaded, material);
        let two = format!("{}{}", material.root_cert, material.root_cert);
        assert_eq!(split_pem(&two).len(), 2);
        assert!(CaMaterial::from_secret_data(|_| None).is_err());
    }
}
