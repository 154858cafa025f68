//! The mesh certificates of the load benchmark's mutual-TLS path: one root from the operator's
//! own CA code (`trellis_operator::ca`), and a workload certificate for each proxy of the pair,
//! requested the way a sidecar does it (the proxy's CSR code) and signed the way the operator
//! signs one. Both trellis-proxy and Envoy get these same files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_config::SpiffeId;
use trellis_operator::ca::{CaMaterial, CertificateAuthority};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";
/// Service accounts of the two sides of the mesh path.
pub const CLIENT_SA: &str = "client";
pub const SERVER_SA: &str = "server";
const TTL: Duration = Duration::from_secs(24 * 3600);

/// A workload certificate on disk: the chain (leaf first) and its PKCS#8 key, both PEM.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub spiffe_id: String,
    pub chain: PathBuf,
    pub key: PathBuf,
}

/// The root and the two workload certificates.
#[derive(Debug, Clone)]
pub struct MeshCerts {
    pub root: PathBuf,
    pub root_pem: String,
    pub client: CertFiles,
    pub server: CertFiles,
}

impl MeshCerts {
    /// Creates a fresh root and both workload certificates under `dir`.
    pub fn issue(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let material =
            CaMaterial::generate_root(TRUST_DOMAIN, TTL).context("generating the mesh root")?;
        let root_pem = material.root_cert.clone();
        let ca = CertificateAuthority::load(material).context("loading the mesh root")?;
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, &root_pem)?;
        Ok(Self {
            client: workload(&ca, dir, CLIENT_SA)?,
            server: workload(&ca, dir, SERVER_SA)?,
            root,
            root_pem,
        })
    }
}

fn workload(ca: &CertificateAuthority, dir: &Path, service_account: &str) -> Result<CertFiles> {
    let id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, service_account);
    let (key, csr) = trellis_proxy::identity::new_csr(&id)?;
    let chain = ca
        .sign_workload(&csr, &id, TTL)
        .with_context(|| format!("signing the certificate of {id}"))?;
    let files = CertFiles {
        spiffe_id: id.to_string(),
        chain: dir.join(format!("{service_account}.pem")),
        key: dir.join(format!("{service_account}-key.pem")),
    };
    std::fs::write(&files.chain, chain.concat())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_workload_certificates_carry_their_spiffe_id_and_chain_to_the_root() {
        let dir = std::env::temp_dir().join(format!("trellis-bench-certs-{}", std::process::id()));
        let certs = MeshCerts::issue(&dir).unwrap();
        for (files, sa) in [(&certs.client, CLIENT_SA), (&certs.server, SERVER_SA)] {
            let expected = format!("spiffe://cluster.local/ns/bench/sa/{sa}");
            assert_eq!(files.spiffe_id, expected);
            // The proxy's own loader accepts the pair and reads the identity from the leaf.
            let identity =
                trellis_proxy::identity::Identity::from_pem_files(&files.chain, &files.key)
                    .unwrap();
            assert_eq!(identity.spiffe_id.to_string(), expected);
            let leaf = rustls_pki_types::CertificateDer::from(identity.cert_chain[0].to_vec());
            let mut roots = rustls::RootCertStore::empty();
            use rustls_pki_types::pem::PemObject;
            roots
                .add(rustls_pki_types::CertificateDer::from_pem_file(&certs.root).unwrap())
                .unwrap();
            let parsed = rustls::server::ParsedCertificate::try_from(&leaf).unwrap();
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &[],
                rustls_pki_types::UnixTime::now(),
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .all,
            )
            .unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
