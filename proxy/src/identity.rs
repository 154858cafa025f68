//! The workload identity: a P-256 key, the CSR for the pod's SPIFFE ID, and the certificate
//! chain the control plane signed for it.

use base64::Engine as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use trellis_config::SpiffeId;
use trellis_config::protocol::CertificateResponse;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// A fresh key and the PEM CSR asking for `id`.
pub fn new_csr(id: &SpiffeId) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

pub struct Identity {
    pub spiffe_id: SpiffeId,
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// Validity of the leaf, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// When this proxy received the certificate. The rotation point is measured from here, not
    /// from `not_before`: the CA backdates that to absorb clock skew (by minutes, more than a
    /// short-lived certificate's whole lifetime), and this clock is the one that will judge
    /// expiry on this side.
    pub received: SystemTime,
}

impl Identity {
    /// Checks the control plane's answer against the key and identity we asked for.
    pub fn from_response(
        spiffe_id: SpiffeId,
        key: &KeyPair,
        response: &CertificateResponse,
    ) -> anyhow::Result<Self> {
        let cert_chain = parse_pems(&response.cert_chain).context("certificate chain")?;
        let trust_bundle = parse_pems(&response.trust_bundle).context("trust bundle")?;
        let leaf = cert_chain
            .first()
            .ok_or_else(|| anyhow!("empty certificate chain"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| anyhow!("leaf certificate does not parse: {e}"))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            bail!("leaf certificate is not for the key we sent");
        }
        let expected = spiffe_id.to_string();
        let uris = uri_sans(&cert);
        if !uris.contains(&expected.as_str()) {
            bail!("leaf certificate carries {uris:?}, not {expected}");
        }
        let validity = cert.validity();
        Ok(Self {
            spiffe_id,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            cert_chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            trust_bundle,
            received: SystemTime::now(),
        })
    }

    /// A workload certificate read from PEM files (static mode): the chain, leaf first, and its
    /// private key. The identity is the leaf's SPIFFE URI SAN; peers are verified against the
    /// config's trust bundle, so the identity itself carries none.
    pub fn from_pem_files(chain: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_chain = CertificateDer::pem_file_iter(chain)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| anyhow!("--cert-chain {}: {e}", chain.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow!("--key {}: {e}", key.display()))?;
        let leaf = cert_chain
            .first()
            .ok_or_else(|| anyhow!("--cert-chain {}: no certificate", chain.display()))?;
        // Refuses a key that does not belong to the leaf.
        rustls::sign::CertifiedKey::from_der(
            cert_chain.clone(),
            key.clone_key(),
            &rustls::crypto::ring::default_provider(),
        )
        .map_err(|e| anyhow!("--key does not fit --cert-chain: {e}"))?;
        let spiffe_id = spiffe_id_of(leaf)?
            .parse::<SpiffeId>()
            .context("--cert-chain")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| anyhow!("leaf certificate does not parse: {e}"))?;
        let validity = cert.validity();
        Ok(Self {
            spiffe_id,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            cert_chain,
            key,
            trust_bundle: Vec::new(),
            received: SystemTime::now(),
        })
    }

    /// When the certificate should be renewed: once `percent` of the time between receiving it
    /// and its expiry has passed.
    pub fn renew_at(&self, percent: u8) -> SystemTime {
        let expiry = UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0));
        let remaining = expiry
            .duration_since(self.received)
            .unwrap_or(Duration::ZERO);
        self.received + remaining * u32::from(percent) / 100
    }

    /// The leaf's serial number in hex, as `openssl x509 -serial` prints it.
    pub fn serial(&self) -> String {
        self.cert_chain
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
            .map(|(_, cert)| cert.raw_serial_as_string().replace(':', "").to_uppercase())
            .unwrap_or_default()
    }

    /// What `/config_dump` shows about the certificate.
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "spiffeId": self.spiffe_id.to_string(),
            "notBefore": rfc3339(self.not_before),
            "notAfter": rfc3339(self.not_after),
            "serial": self.serial(),
            "chainLength": self.cert_chain.len(),
            // Public certificates only (as Envoy's config dump shows them): base64 DER, leaf first.
            "certChain": self
                .cert_chain
                .iter()
                .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                .collect::<Vec<_>>(),
            "trustBundleSize": self.trust_bundle.len(),
        })
    }
}

/// The URI SANs of a certificate.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(thiserror::Error)]
pub enum PeerIdentityError {
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate carries {0:?}, not exactly one spiffe:// URI SAN")]
    NotSpiffe(Vec<String>),
}

/// rustls shows certificate errors with `Debug`: make that the readable message.
impl std::fmt::Debug for PeerIdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The SPIFFE ID of a certificate: its only URI SAN, which must be a `spiffe://` URI (an X.509
/// SVID carries exactly one).
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Result<String, PeerIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| PeerIdentityError::Parse(e.to_string()))?;
    match uri_sans(&cert).as_slice() {
        [uri] if uri.starts_with("spiffe://") => Ok((*uri).to_owned()),
        other => Err(PeerIdentityError::NotSpiffe(
            other.iter().map(|s| (*s).to_owned()).collect(),
        )),
    }
}

/// Certificates from a list of PEM strings (each may hold several blocks).
pub fn parse_pems(pems: &[String]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut certs = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| anyhow!("bad PEM certificate: {e}"))?);
        }
    }
    if certs.is_empty() {
        bail!("no PEM certificate found");
    }
    Ok(certs)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer};

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_825_600), "2000-02-29T12:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn csr_round_trip_through_a_ca_gives_an_identity_renewed_halfway() {
        let id = SpiffeId::new("cluster.local", "demo", "client");
        let (key, csr) = new_csr(&id).unwrap();

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let mut request = CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(
            request.params.subject_alt_names,
            vec![SanType::URI(id.to_string().try_into().unwrap())]
        );
        request.params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        request.params.not_after = rcgen::date_time_ymd(2030, 1, 3);
        request.params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x4a, 0x7f]));
        let leaf = request.signed_by(&issuer).unwrap();
        let response = CertificateResponse {
            cert_chain: vec![leaf.pem()],
            trust_bundle: vec![ca_cert.pem()],
        };

        let mut identity = Identity::from_response(id.clone(), &key, &response).unwrap();
        assert_eq!(rfc3339(identity.not_after), "2030-01-03T00:00:00Z");
        assert_eq!(identity.serial(), "4A7F");
        // Measured from receipt, not from notBefore: received on 2030-01-01T12:00Z, half of the
        // remaining 36 h is 18 h later.
        identity.received = UNIX_EPOCH + Duration::from_secs(1_893_499_200);
        let at = UNIX_EPOCH + Duration::from_secs(1_893_499_200 + 18 * 3600);
        assert_eq!(identity.renew_at(50), at);
        // A backdated certificate whose notBefore lies long before receipt (the CA backdates by
        // minutes; a 2-minute certificate) still renews within its lifetime after receipt.
        identity.received = UNIX_EPOCH + Duration::from_secs(1_893_628_800 - 120);
        assert_eq!(
            identity.renew_at(50),
            UNIX_EPOCH + Duration::from_secs(1_893_628_800 - 60)
        );
        // Received after expiry (a wrong clock): renew at once.
        identity.received = UNIX_EPOCH + Duration::from_secs(1_893_628_800 + 5);
        assert_eq!(identity.renew_at(50), identity.received);
        assert_eq!(
            identity.summary()["spiffeId"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );

        let other = SpiffeId::new("cluster.local", "demo", "other");
        assert!(Identity::from_response(other, &key, &response).is_err());
        let (wrong_key, _) = new_csr(&id).unwrap();
        assert!(Identity::from_response(id, &wrong_key, &response).is_err());
    }
}
