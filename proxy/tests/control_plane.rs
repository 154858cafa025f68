//! The real binary against a real (in-test) control plane: HTTPS + HTTP/2 with a test CA. The
//! proxy gets its certificate with its token and CSR, opens the config stream with mutual TLS,
//! applies good snapshots, rejects bad ones whole, survives a disconnect with its last good
//! config, renews its certificate and reopens the stream with it on `renew`, and exits 0 on
//! `exit`.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use trellis_config::protocol::{CertificateRequest, CertificateResponse};
use x509_parser::extensions::GeneralName;

use support::{Ports, Proxy, http, temp_path};

const SERVER_NAME: &str = "trellis-operator.trellis-system.svc";
const TOKEN: &str = "projected-token-123";

/// One config stream opened by the proxy.
struct ConfigStream {
    body: mpsc::UnboundedSender<Bytes>,
    client_identity: Vec<String>,
    pod_name: String,
    proxy_version: String,
}

/// A body fed from a channel: frames as the test sends them; ends when the sender drops.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn new_ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

async fn handle(
    ca: Arc<Ca>,
    client_identity: Vec<String>,
    streams: std_mpsc::Sender<ConfigStream>,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let full = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        *r.status_mut() = status;
        r
    };
    match req.uri().path() {
        "/v1/certificate" => {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                return full(StatusCode::UNAUTHORIZED, r#"{"error":"bad token"}"#.into());
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let request: CertificateRequest = serde_json::from_slice(&body).unwrap();
            let csr = CertificateSigningRequestParams::from_pem(&request.csr).unwrap();
            let leaf = csr.signed_by(&ca.issuer).unwrap();
            let answer = CertificateResponse {
                cert_chain: vec![leaf.pem()],
                trust_bundle: vec![ca.pem.clone()],
            };
            full(StatusCode::OK, serde_json::to_string(&answer).unwrap())
        }
        "/v1/config" => {
            if client_identity.is_empty() {
                return full(
                    StatusCode::UNAUTHORIZED,
                    r#"{"error":"client certificate required"}"#.into(),
                );
            }
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let (tx, rx) = mpsc::unbounded_channel();
            streams
                .send(ConfigStream {
                    body: tx,
                    client_identity,
                    pod_name: header("x-trellis-pod-name"),
                    proxy_version: header("x-trellis-proxy-version"),
                })
                .unwrap();
            Response::new(ChannelBody(rx).boxed())
        }
        _ => full(StatusCode::NOT_FOUND, String::new()),
    }
}

/// Starts the control plane on its own runtime; returns its port, the root PEM file and the
/// config streams the proxy opens.
fn start_control_plane() -> (u16, std::path::PathBuf, std_mpsc::Receiver<ConfigStream>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Arc::new(new_ca());
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca.issuer)
        .unwrap();
    let root_file = temp_path("root-cert.pem");
    std::fs::write(&root_file, &ca.pem).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let mut tls = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (streams_tx, streams_rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, ca, streams) = (acceptor.clone(), ca.clone(), streams_tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| uri_sans(c))
                        .unwrap_or_default();
                    let service = hyper::service::service_fn(move |req| {
                        let (ca, identity, streams) =
                            (ca.clone(), identity.clone(), streams.clone());
                        async move { Ok::<_, Infallible>(handle(ca, identity, streams, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    (port, root_file, streams_rx)
}

fn config_version(proxy: &Proxy) -> Option<String> {
    let (_, body) = proxy.admin("GET", "/config_dump");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    dump["config"]["version"].as_str().map(str::to_owned)
}

fn wait_for(what: &str, proxy: &Proxy, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}:\n{}", proxy.logs());
}

fn line(json: &str) -> Bytes {
    Bytes::from(format!("{json}\n"))
}

#[test]
fn bootstraps_identity_follows_the_config_stream_and_exits_on_request() {
    let (port, root_cert, streams) = start_control_plane();
    let token = temp_path("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let mut proxy = Proxy::start(
        Ports::free(),
        &[
            "--control-plane",
            &url,
            "--control-plane-name",
            SERVER_NAME,
            "--root-cert",
            root_cert.to_str().unwrap(),
            "--token",
            token.to_str().unwrap(),
        ],
    );

    // The config stream only opens with the signed workload certificate as client certificate.
    let stream = streams
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or_else(|_| panic!("no config stream:\n{}", proxy.logs()));
    assert_eq!(
        stream.client_identity,
        vec!["spiffe://cluster.local/ns/demo/sa/client".to_owned()]
    );
    assert_eq!(stream.pod_name, "client-7d9f-abcde");
    // The version in the binary (a stamped image's binary reports its stamp: e2e `delivery`).
    assert_eq!(stream.proxy_version, env!("CARGO_PKG_VERSION"));
    // A certificate but no config yet: not ready.
    assert_eq!(http("GET", proxy.ports.readiness, "/healthz/ready").0, 503);

    // A snapshot split across frames, mid-line.
    let snapshot =
        line(r#"{"type":"config","version":"cp-1","outboundTrafficPolicy":"ALLOW_ANY"}"#);
    stream.body.send(snapshot.slice(..20)).unwrap();
    stream.body.send(snapshot.slice(20..)).unwrap();
    proxy.wait_ready();
    assert_eq!(config_version(&proxy).as_deref(), Some("cp-1"));
    let (_, dump) = proxy.admin("GET", "/config_dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["certificate"]["spiffeId"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert!(
        dump["certificate"]["notAfter"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // Garbage and an invalid snapshot are rejected whole; the last good config stays.
    stream.body.send(line("this is not json")).unwrap();
    stream.body.send(line(r#"{"type":"config","version":"cp-2","services":[{"hostnames":[],"namespace":"a","vips":[],"ports":[],"endpoints":[]}]}"#)).unwrap();
    wait_for("the invalid snapshot to be rejected", &proxy, || {
        proxy.logs().contains("rejected an invalid config snapshot")
    });
    assert!(proxy.logs().contains("does not decode"));
    assert_eq!(config_version(&proxy).as_deref(), Some("cp-1"));

    // The control plane goes away: the proxy stays ready on its last good config and reconnects.
    drop(stream);
    let stream = streams
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or_else(|_| panic!("no reconnect:\n{}", proxy.logs()));
    assert_eq!(http("GET", proxy.ports.readiness, "/healthz/ready").0, 200);
    assert_eq!(config_version(&proxy).as_deref(), Some("cp-1"));
    stream
        .body
        .send(line(r#"{"type":"config","version":"cp-3"}"#))
        .unwrap();
    wait_for("cp-3", &proxy, || {
        config_version(&proxy).as_deref() == Some("cp-3")
    });

    // `renew`: a new certificate at once, and the config stream reopened with it; the last
    // good config keeps serving in between.
    let serial = |proxy: &Proxy| {
        let (_, dump) = proxy.admin("GET", "/config_dump");
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["certificate"]["serial"].as_str().unwrap().to_owned()
    };
    let before = serial(&proxy);
    stream
        .body
        .send(line(r#"{"type":"renew","reason":"root rotation"}"#))
        .unwrap();
    let stream = streams
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or_else(|_| panic!("no stream with the renewed certificate:\n{}", proxy.logs()));
    assert_eq!(
        stream.client_identity,
        vec!["spiffe://cluster.local/ns/demo/sa/client".to_owned()]
    );
    assert_ne!(serial(&proxy), before, "{}", proxy.logs());
    assert!(
        proxy.logs().contains("reopening the config stream with it"),
        "{}",
        proxy.logs()
    );
    assert_eq!(http("GET", proxy.ports.readiness, "/healthz/ready").0, 200);
    assert_eq!(config_version(&proxy).as_deref(), Some("cp-3"));

    // `exit`: drain and exit 0 (a Job's pod must complete).
    stream
        .body
        .send(line(
            r#"{"type":"exit","reason":"application containers terminated"}"#,
        ))
        .unwrap();
    let exit = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
}
