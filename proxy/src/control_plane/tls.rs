//! TLS client settings for the control plane: server verified against the mesh roots, ALPN h2,
//! and the workload certificate as client certificate once the proxy holds one.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::identity::Identity;

/// Trusts the roots in `root_cert` (re-read on every call, so a rotated file is picked up on
/// reconnect) and `delivered`: the roots the control plane itself has since sent. During a root
/// rotation the control plane's certificate moves to the new root while the kubelet may not
/// have refreshed the mounted file yet; the bundle that came over the verified channel already
/// holds the new root.
pub fn client_config(
    root_cert: &Path,
    delivered: Vec<CertificateDer<'static>>,
    client: Option<&Identity>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root_cert)
        .with_context(|| format!("reading --root-cert {}", root_cert.display()))?
    {
        let cert = cert.with_context(|| format!("--root-cert {}", root_cert.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--root-cert {}", root_cert.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("--root-cert {} holds no certificate", root_cert.display());
    }
    // Already validated when they were received; one that does not parse is skipped.
    roots.add_parsable_certificates(delivered);
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        Some(identity) => builder
            .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .context("workload certificate unusable as client certificate")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
