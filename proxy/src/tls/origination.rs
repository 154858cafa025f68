//! TLS origination towards a cluster's endpoints for DestinationRule `trafficPolicy.tls` modes
//! `SIMPLE` and `MUTUAL` (Istio's egress TLS origination: the application sends plain HTTP, the
//! proxy speaks TLS to the server). `DISABLE` is plain TCP and `ISTIO_MUTUAL` the mesh's own
//! mutual TLS (`crate::tls::mtls`), neither handled here.
//!
//! The server is verified against `caCertificates` only: the proxy image is the bare binary and
//! carries no system root store, so a `SIMPLE`/`MUTUAL` cluster without `caCertificates` (and
//! without `insecureSkipVerify`) fails its connections with an error that says so. The server
//! name is `sni`, else the cluster's host; when `subjectAltNames` is set, the certificate must
//! instead carry one of those names.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::warn;
use trellis_config::traffic::{ClientTls, TlsMode};

/// Why TLS origination to a cluster cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    #[error(
        "tls.mode {mode:?} to {host} needs tls.caCertificates: the proxy image has no system roots"
    )]
    NoRoots { mode: TlsMode, host: String },
    #[error("tls.mode MUTUAL to {0} needs tls.clientCertificate and tls.privateKey")]
    NoClientCertificate(String),
    #[error("reading tls.{field} {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("tls.{field} {path}: no certificate in the file")]
    Empty { field: &'static str, path: String },
    #[error("{value:?} is not a valid TLS server name")]
    ServerName { value: String },
    #[error("building the TLS client: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the server certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Whether the mesh's mutual TLS may be used towards a cluster with these `tls` settings: a
/// DestinationRule's `tls` replaces it unless it asks for it (`ISTIO_MUTUAL`).
pub fn mesh_tls_allowed(tls: Option<&ClientTls>) -> bool {
    tls.is_none_or(|tls| tls.mode == TlsMode::IstioMutual)
}

/// Whether the cluster's TLS settings make the proxy originate TLS.
pub fn originates(tls: &ClientTls) -> bool {
    matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual)
}

/// The server name a connection for `host` presents and verifies: `sni`, else the host.
fn server_name(tls: &ClientTls, host: &str) -> Result<ServerName<'static>, OriginationError> {
    let value = tls.sni.as_deref().unwrap_or(host);
    ServerName::try_from(value.to_owned()).map_err(|_| OriginationError::ServerName {
        value: value.to_owned(),
    })
}

/// TLS origination over `tcp` for a `SIMPLE`/`MUTUAL` cluster of `host`: the handshake,
/// offering `alpn` (none for opaque TCP), within `timeout`.
pub async fn originate(
    tls: &ClientTls,
    host: &str,
    alpn: Option<&[u8]>,
    tcp: TcpStream,
    timeout: Duration,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let addr = tcp.peer_addr()?;
    let connector = connector(tls, host, alpn)?;
    let server_name = server_name(tls, host)?;
    tokio::time::timeout(timeout, connector.connect(server_name, tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake with {addr} timed out"))?
        .with_context(|| format!("TLS origination to {addr} ({:?})", tls.mode))
}

/// A TLS client for a `SIMPLE`/`MUTUAL` cluster of `host`, offering `alpn`. Files are read on
/// every call, so call it per new connection (a rotated certificate is then picked up).
fn connector(
    tls: &ClientTls,
    host: &str,
    alpn: Option<&[u8]>,
) -> Result<TlsConnector, OriginationError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        warn!(
            host,
            "tls.insecureSkipVerify: the server's certificate is not verified"
        );
        Arc::new(SkipVerification(provider.clone()))
    } else {
        let path = tls
            .ca_certificates
            .as_deref()
            .ok_or_else(|| OriginationError::NoRoots {
                mode: tls.mode,
                host: host.to_owned(),
            })?;
        let mut roots = RootCertStore::empty();
        for cert in certificates("caCertificates", path)? {
            roots.add(cert)?;
        }
        let names = tls
            .subject_alt_names
            .iter()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| OriginationError::ServerName {
                    value: name.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
        Arc::new(SanVerifier { inner, names })
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match tls.mode {
        TlsMode::Mutual => {
            let (Some(cert_path), Some(key_path)) = (&tls.client_certificate, &tls.private_key)
            else {
                return Err(OriginationError::NoClientCertificate(host.to_owned()));
            };
            let chain = certificates("clientCertificate", cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| {
                OriginationError::Read {
                    field: "privateKey",
                    path: key_path.clone(),
                    source,
                }
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn certificates(
    field: &'static str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, OriginationError> {
    let read = |source| OriginationError::Read {
        field,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(OriginationError::Empty {
            field,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// WebPKI verification against the cluster's CA; with `subjectAltNames`, the certificate must
/// be valid for one of them rather than for the server name (Istio's SAN check).
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verify = |name: &ServerName<'_>| {
            self.inner
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
        };
        let mut last = None;
        for name in &self.names {
            match verify(name) {
                Ok(verified) => return Ok(verified),
                Err(e) => last = Some(e),
            }
        }
        last.map_or_else(|| verify(server_name), Err)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: any certificate is accepted, but the handshake signatures are still
/// checked (the peer must hold the key of the certificate it sent).
#[derive(Debug)]
struct SkipVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: TlsMode) -> ClientTls {
        ClientTls {
            mode,
            sni: None,
            subject_alt_names: Vec::new(),
            ca_certificates: None,
            client_certificate: None,
            private_key: None,
            credential_name: None,
            insecure_skip_verify: false,
        }
    }

    #[test]
    fn only_simple_and_mutual_originate_and_only_istio_mutual_keeps_the_mesh_tls() {
        // (mode, originates, mesh TLS allowed)
        let cases = [
            (TlsMode::Disable, false, false),
            (TlsMode::Simple, true, false),
            (TlsMode::Mutual, true, false),
            (TlsMode::IstioMutual, false, true),
        ];
        for (mode, originating, mesh) in cases {
            assert_eq!(originates(&tls(mode)), originating, "{mode:?}");
            assert_eq!(mesh_tls_allowed(Some(&tls(mode))), mesh, "{mode:?}");
        }
        assert!(
            mesh_tls_allowed(None),
            "no DestinationRule tls: the mesh's own"
        );
    }

    #[test]
    fn the_server_name_is_the_sni_else_the_host() {
        let with_sni = ClientTls {
            sni: Some("edge.example.com".into()),
            ..tls(TlsMode::Simple)
        };
        let name =
            |t: &ClientTls, host: &str| server_name(t, host).map(|n| n.to_str().into_owned());
        assert_eq!(
            name(&with_sni, "api.example.com").unwrap(),
            "edge.example.com"
        );
        assert_eq!(
            name(&tls(TlsMode::Simple), "api.example.com").unwrap(),
            "api.example.com"
        );
        assert!(matches!(
            name(&tls(TlsMode::Simple), "not a name"),
            Err(OriginationError::ServerName { .. })
        ));
    }

    #[test]
    fn settings_that_cannot_verify_or_authenticate_are_refused_with_their_cause() {
        let missing = "/nonexistent/ca.pem".to_owned();
        let cases = [
            (tls(TlsMode::Simple), "needs tls.caCertificates"),
            (
                ClientTls {
                    ca_certificates: Some(missing.clone()),
                    ..tls(TlsMode::Simple)
                },
                "reading tls.caCertificates /nonexistent/ca.pem",
            ),
            (
                ClientTls {
                    insecure_skip_verify: true,
                    ..tls(TlsMode::Mutual)
                },
                "needs tls.clientCertificate and tls.privateKey",
            ),
        ];
        for (settings, expected) in cases {
            let error = connector(&settings, "api.example.com", Some(b"http/1.1"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(expected), "{settings:?}: {error}");
        }
        // Skipping verification needs no CA.
        assert!(
            connector(
                &ClientTls {
                    insecure_skip_verify: true,
                    ..tls(TlsMode::Simple)
                },
                "api.example.com",
                None
            )
            .is_ok()
        );
    }
}
