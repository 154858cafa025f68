//! Mutual TLS between sidecars: TLS 1.3 only, ALPN [`MESH_ALPN`] (opaque TCP) or
//! [`MESH_H2_ALPN`] (HTTP/2, see `crate::http`), the workload certificate on
//! both sides. A server is verified against the trust bundle and must present the SPIFFE ID the
//! config names for the endpoint (never a DNS name); a client is verified against the trust
//! bundle and must carry a SPIFFE ID in our own trust domain, which becomes the connection's
//! source principal. The trust-domain check matters when one root signs for several trust
//! domains: without it a workload of another domain would be accepted and could satisfy
//! policies that name only namespaces or service accounts.
//!
//! The TLS settings follow the workload certificate and the trust bundle: [`MeshTlsCache`]
//! rebuilds them when either changes, so a rotated certificate is used from the next connection.

use std::fmt;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_config::SpiffeId;
use trellis_config::proxy::{MESH_ALPN, MESH_H2_ALPN, ProxyConfig};

use crate::identity::{self, Identity};

/// SNI of mesh connections when the service hostname is no valid DNS name. Peers are never
/// verified by name: the server's SPIFFE ID is what counts.
const FALLBACK_SERVER_NAME: &str = "mesh.trellis.invalid";

/// TLS settings built from one workload certificate and one trust bundle.
pub struct MeshTls {
    identity: Arc<Identity>,
    /// The config's trust bundle these settings were built from (empty: the identity's).
    config_bundle: Vec<String>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    client_cert: Arc<ClientCert>,
    server: Arc<ServerConfig>,
}

impl MeshTls {
    /// Peers are verified against the config's trust bundle, or the bundle that came with the
    /// certificate when the config carries none.
    pub fn new(identity: Arc<Identity>, config_bundle: &[String]) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bundle = if config_bundle.is_empty() {
            identity.trust_bundle.clone()
        } else {
            identity::parse_pems(config_bundle).context("config trust bundle")?
        };
        let mut roots = RootCertStore::empty();
        for root in bundle {
            roots.add(root).context("trust bundle")?;
        }
        if roots.is_empty() {
            anyhow::bail!("no trust bundle to verify peers against");
        }
        let roots = Arc::new(roots);
        let client_cert = Arc::new(ClientCert(Arc::new(
            CertifiedKey::from_der(
                identity.cert_chain.clone(),
                identity.key.clone_key(),
                &provider,
            )
            .context("workload certificate")?,
        )));
        let chain = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("client certificate verifier")?;
        let verifier = Arc::new(SpiffeClientVerifier {
            chain,
            trust_domain: identity.spiffe_id.trust_domain.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .context("workload certificate as server certificate")?;
        // The server's order decides: HTTP between sidecars when the client offers it.
        server.alpn_protocols = vec![MESH_H2_ALPN.to_vec(), MESH_ALPN.to_vec()];
        Ok(Self {
            identity,
            config_bundle: config_bundle.to_vec(),
            provider,
            roots,
            client_cert,
            server: Arc::new(server),
        })
    }

    /// Our own SPIFFE ID, as presented to peers.
    pub fn local_id(&self) -> &SpiffeId {
        &self.identity.spiffe_id
    }

    /// Terminates mesh TLS: requires a client certificate chaining to the trust bundle, with a
    /// SPIFFE ID in our trust domain.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// Originates mesh TLS to a server that must present `peer` (a SPIFFE ID).
    pub fn connector(&self, peer: &str) -> anyhow::Result<TlsConnector> {
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected: peer.to_owned(),
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.client_cert.clone());
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        // A config lives for one connection: a session cache would never be hit.
        config.resumption = Resumption::disabled();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The SNI sent to a mesh server: the service's hostname (informational only).
pub fn server_name(hostname: &str) -> ServerName<'static> {
    ServerName::try_from(hostname.to_owned())
        .unwrap_or_else(|_| ServerName::try_from(FALLBACK_SERVER_NAME).expect("a valid DNS name"))
}

/// The SPIFFE ID of the peer of an established mesh TLS connection.
pub fn peer_id(connection: &rustls::CommonState) -> Result<String, identity::PeerIdentityError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| identity::PeerIdentityError::NotSpiffe(Vec::new()))?;
    identity::spiffe_id_of(leaf)
}

/// The current [`MeshTls`], rebuilt when the workload certificate or the trust bundle changes.
#[derive(Default)]
pub struct MeshTlsCache(ArcSwapOption<MeshTls>);

impl MeshTlsCache {
    pub fn get(
        &self,
        identity: &Arc<Identity>,
        config: &ProxyConfig,
    ) -> anyhow::Result<Arc<MeshTls>> {
        if let Some(cached) = self.0.load_full()
            && Arc::ptr_eq(&cached.identity, identity)
            && cached.config_bundle == config.trust_bundle
        {
            return Ok(cached);
        }
        let fresh = Arc::new(MeshTls::new(identity.clone(), &config.trust_bundle)?);
        self.0.store(Some(fresh.clone()));
        Ok(fresh)
    }
}

/// Always presents the workload certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a mesh server: webpki chain verification against the trust bundle (validity,
/// signatures, server-auth usage), then its SPIFFE ID against the endpoint's. The TLS server
/// name is ignored.
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

#[derive(thiserror::Error)]
#[error("server presented {presented}, expected {expected}")]
struct WrongPeer {
    presented: String,
    expected: String,
}

/// rustls shows certificate errors with `Debug`: make that the readable message.
impl fmt::Debug for WrongPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn invalid(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identity::spiffe_id_of(end_entity).map_err(invalid)?;
        if presented != self.expected {
            return Err(invalid(WrongPeer {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a mesh client: webpki chain verification against the trust bundle (validity,
/// signatures, client-auth usage), then that its SPIFFE ID is in our trust domain, so a
/// handshake with another domain's workload fails instead of yielding a principal.
struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

#[derive(thiserror::Error)]
#[error("client presented {presented}, which is not in the trust domain {trust_domain}")]
struct ForeignTrustDomain {
    presented: String,
    trust_domain: String,
}

/// rustls shows certificate errors with `Debug`: make that the readable message.
impl fmt::Debug for ForeignTrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The trust domain of a `spiffe://` URI: the authority before the first `/`.
fn trust_domain_of(spiffe_id: &str) -> Option<&str> {
    spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = identity::spiffe_id_of(end_entity).map_err(invalid)?;
        if trust_domain_of(&presented) != Some(self.trust_domain.as_str()) {
            return Err(invalid(ForeignTrustDomain {
                presented,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, SanType,
    };
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    pub const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub der: CertificateDer<'static>,
        pub pem: String,
    }

    impl Ca {
        pub fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            Self {
                der: cert.der().clone(),
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A workload certificate for `uri`, shaped like the operator's, valid for the given
        /// number of days around now (negative `until` gives an expired one).
        pub fn leaf(
            &self,
            uri: &str,
            from: i64,
            until: i64,
        ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::days(from);
            params.not_after = now + time::Duration::days(until);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
        }

        pub fn identity(&self, uri: &str) -> Arc<Identity> {
            self.identity_valid(uri, -1, 1)
        }

        /// An identity whose certificate is valid from `from` to `until` days around now.
        pub fn identity_valid(&self, uri: &str, from: i64, until: i64) -> Arc<Identity> {
            let (cert_chain, key) = self.leaf(uri, from, until);
            Arc::new(Identity {
                spiffe_id: uri.parse().unwrap(),
                cert_chain,
                key,
                trust_bundle: vec![self.der.clone()],
                not_before: 0,
                not_after: 0,
                received: std::time::SystemTime::now(),
            })
        }
    }

    fn verifier(ca: &Ca, expected: &str) -> SpiffeServerVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        SpiffeServerVerifier {
            roots: Arc::new(roots),
            expected: expected.to_owned(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn verify(
        verifier: &SpiffeServerVerifier,
        chain: &[CertificateDer<'static>],
    ) -> Result<ServerCertVerified, rustls::Error> {
        verifier.verify_server_cert(
            &chain[0],
            &chain[1..],
            &server_name("reviews.demo.svc.cluster.local"),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn server_verifier_accepts_only_the_expected_spiffe_id_from_the_bundle() {
        let ca = Ca::new("mesh root");
        let verifier = verifier(&ca, SERVER);

        let (good, _) = ca.leaf(SERVER, -1, 1);
        assert!(verify(&verifier, &good).is_ok());

        let (other_identity, _) = ca.leaf(CLIENT, -1, 1);
        let err = verify(&verifier, &other_identity).unwrap_err().to_string();
        assert!(
            err.contains("server presented spiffe://cluster.local/ns/demo/sa/client, expected"),
            "{err}"
        );

        let (foreign, _) = Ca::new("other root").leaf(SERVER, -1, 1);
        assert_eq!(
            verify(&verifier, &foreign).unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );

        let (expired, _) = ca.leaf(SERVER, -3, -1);
        let err = verify(&verifier, &expired).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );

        // The DNS name is never what is verified: a DNS-only certificate is refused.
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["reviews.demo.svc.cluster.local".to_owned()]).unwrap();
        let dns_only = params.signed_by(&key, &ca.issuer).unwrap();
        let err = verify(&verifier, &[dns_only.der().clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not exactly one spiffe:// URI SAN"), "{err}");
    }

    /// One mesh TLS connection over loopback: the client's result, and the server's peer id
    /// and what it read.
    async fn handshake(
        server: &MeshTls,
        client: &MeshTls,
        expected: &str,
    ) -> (anyhow::Result<Vec<u8>>, anyhow::Result<(String, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let peer = peer_id(tls.get_ref().1)?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
            anyhow::Ok((peer, got))
        });
        let connector = client.connector(expected).unwrap();
        let client_result = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = connector
                .connect(server_name("server.demo.svc.cluster.local"), tcp)
                .await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(MESH_ALPN));
            tls.write_all(b"ping").await?;
            // close_notify, then the reply still arrives (half-close over TLS).
            tls.shutdown().await?;
            let mut reply = Vec::new();
            tls.read_to_end(&mut reply).await?;
            anyhow::Ok(reply)
        }
        .await;
        (client_result, served.await.unwrap())
    }

    #[tokio::test]
    async fn sidecars_authenticate_each_other_and_half_close() {
        let ca = Ca::new("mesh root");
        let server = MeshTls::new(ca.identity(SERVER), &[]).unwrap();
        let client = MeshTls::new(ca.identity(CLIENT), std::slice::from_ref(&ca.pem)).unwrap();

        let (reply, served) = handshake(&server, &client, SERVER).await;
        assert_eq!(reply.unwrap(), b"pong");
        let (peer, got) = served.unwrap();
        assert_eq!(peer, CLIENT);
        assert_eq!(got, b"ping");

        // The client refuses a server with another identity.
        let (reply, _) =
            handshake(&server, &client, "spiffe://cluster.local/ns/demo/sa/other").await;
        let err = format!("{:#}", reply.unwrap_err());
        assert!(err.contains("server presented"), "{err}");

        // The server refuses a client certificate from another root.
        let stranger = MeshTls::new(
            Ca::new("other root").identity(CLIENT),
            std::slice::from_ref(&ca.pem),
        )
        .unwrap();
        let (_, served) = handshake(&server, &stranger, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    /// During a root rotation the bundle holds the old and the new root: sidecars with
    /// certificates from either root authenticate each other, in both directions, while a
    /// certificate from a third root or an expired one is still refused.
    #[tokio::test]
    async fn a_two_root_bundle_accepts_both_roots_and_nothing_else() {
        let old = Ca::new("old root");
        let new = Ca::new("new root");
        let both = [old.pem.clone(), new.pem.clone()];
        let server_old = MeshTls::new(old.identity(SERVER), &both).unwrap();
        let server_new = MeshTls::new(new.identity(SERVER), &both).unwrap();
        let client_old = MeshTls::new(old.identity(CLIENT), &both).unwrap();
        let client_new = MeshTls::new(new.identity(CLIENT), &both).unwrap();
        for (name, server, client) in [
            ("old client to new server", &server_new, &client_old),
            ("new client to old server", &server_old, &client_new),
            ("new to new", &server_new, &client_new),
            ("old to old", &server_old, &client_old),
        ] {
            let (reply, served) = handshake(server, client, SERVER).await;
            assert_eq!(reply.unwrap(), b"pong", "{name}");
            assert_eq!(served.unwrap().0, CLIENT, "{name}");
        }

        // Once the old root is removed, its certificates are refused on both sides.
        let new_only = std::slice::from_ref(&new.pem);
        let strict_server = MeshTls::new(new.identity(SERVER), new_only).unwrap();
        let strict_client = MeshTls::new(new.identity(CLIENT), new_only).unwrap();
        let (_, served) = handshake(&strict_server, &client_old, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(
            err.contains("UnknownIssuer"),
            "old client after removal: {err}"
        );
        let (reply, _) = handshake(&server_old, &strict_client, SERVER).await;
        let err = format!("{:#}", reply.unwrap_err());
        assert!(
            err.contains("UnknownIssuer"),
            "old server after removal: {err}"
        );

        // A third root is refused even by a two-root bundle.
        let foreign = MeshTls::new(Ca::new("foreign root").identity(CLIENT), &both).unwrap();
        let (_, served) = handshake(&server_new, &foreign, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(err.contains("UnknownIssuer"), "foreign client: {err}");
    }

    /// One root may sign for several trust domains: the server still refuses a client of
    /// another domain, and a client without a SPIFFE ID, at the handshake.
    #[tokio::test]
    async fn a_client_of_another_trust_domain_is_refused() {
        let ca = Ca::new("mesh root");
        let bundle = std::slice::from_ref(&ca.pem);
        let server = MeshTls::new(ca.identity(SERVER), bundle).unwrap();
        let foreign = MeshTls::new(
            ca.identity("spiffe://evil.example/ns/demo/sa/client"),
            bundle,
        )
        .unwrap();
        let (reply, served) = handshake(&server, &foreign, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(
            err.contains(
                "client presented spiffe://evil.example/ns/demo/sa/client, which is not in the \
                 trust domain cluster.local"
            ),
            "{err}"
        );
        assert!(reply.is_err(), "the client sees the refusal too");
        // A look-alike domain that merely starts with ours is another domain.
        let look_alike = MeshTls::new(
            ca.identity("spiffe://cluster.local.evil/ns/demo/sa/client"),
            bundle,
        )
        .unwrap();
        let (_, served) = handshake(&server, &look_alike, SERVER).await;
        assert!(served.is_err());
        // Our own domain still passes.
        let client = MeshTls::new(ca.identity(CLIENT), bundle).unwrap();
        let (reply, served) = handshake(&server, &client, SERVER).await;
        assert_eq!(reply.unwrap(), b"pong");
        assert_eq!(served.unwrap().0, CLIENT);
    }

    #[test]
    fn trust_domains_are_the_authority_of_the_spiffe_uri() {
        assert_eq!(trust_domain_of(CLIENT), Some("cluster.local"));
        assert_eq!(trust_domain_of("spiffe://example.org"), Some("example.org"));
        assert_eq!(trust_domain_of("https://cluster.local/ns/a"), None);
    }

    #[tokio::test]
    async fn expired_peer_certificates_are_refused_on_both_sides() {
        let ca = Ca::new("mesh root");
        let bundle = std::slice::from_ref(&ca.pem);
        let server = MeshTls::new(ca.identity(SERVER), bundle).unwrap();
        let client = MeshTls::new(ca.identity(CLIENT), bundle).unwrap();
        let expired_client = MeshTls::new(ca.identity_valid(CLIENT, -3, -1), bundle).unwrap();
        let (_, served) = handshake(&server, &expired_client, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(err.contains("certificate expired"), "expired client: {err}");

        let expired_server = MeshTls::new(ca.identity_valid(SERVER, -3, -1), bundle).unwrap();
        let (reply, _) = handshake(&expired_server, &client, SERVER).await;
        let err = format!("{:#}", reply.unwrap_err());
        assert!(err.contains("certificate expired"), "expired server: {err}");

        let not_yet = MeshTls::new(ca.identity_valid(CLIENT, 1, 3), bundle).unwrap();
        let (_, served) = handshake(&server, &not_yet, SERVER).await;
        let err = format!("{:#}", served.unwrap_err());
        assert!(err.contains("not valid yet"), "not yet valid client: {err}");
    }

    #[test]
    fn the_cache_follows_the_certificate_and_the_bundle() {
        let ca = Ca::new("mesh root");
        let cache = MeshTlsCache::default();
        let first = ca.identity(SERVER);
        let config = ProxyConfig::default();
        let a = cache.get(&first, &config).unwrap();
        assert!(Arc::ptr_eq(&a, &cache.get(&first, &config).unwrap()));

        let rotated = ca.identity(SERVER);
        let b = cache.get(&rotated, &config).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));

        let rebundled = ProxyConfig {
            trust_bundle: vec![ca.pem.clone()],
            ..ProxyConfig::default()
        };
        assert!(!Arc::ptr_eq(&b, &cache.get(&rotated, &rebundled).unwrap()));

        let nothing = Arc::new(Identity {
            spiffe_id: rotated.spiffe_id.clone(),
            cert_chain: rotated.cert_chain.clone(),
            key: rotated.key.clone_key(),
            trust_bundle: Vec::new(),
            not_before: 0,
            not_after: 0,
            received: std::time::SystemTime::now(),
        });
        assert!(
            cache.get(&nothing, &config).is_err(),
            "no roots, no mesh TLS"
        );
    }
}
