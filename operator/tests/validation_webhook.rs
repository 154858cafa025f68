//! The traffic-rule validation webhook as the API server reaches it: the real HTTPS server of
//! `trellis_operator::https` with the real handler on a loopback socket, TLS from the operator's
//! own CA, AdmissionReviews posted over HTTP/1.1 and HTTP/2.
//!
//! The Kubernetes client points at a closed port, so the DestinationRules of a namespace cannot
//! be read: that must skip the subset check only, never the rest of the validation.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use trellis_operator::ca::{CaMaterial, CertificateAuthority};
use trellis_operator::https::{self, Limits};
use trellis_operator::validation::{VALIDATE_PATH, Validation};

const SERVER_NAME: &str = "trellis-operator.trellis-system.svc";

struct Server {
    address: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

async fn start() -> Server {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let day = Duration::from_secs(86_400);
    let ca = CertificateAuthority::load(CaMaterial::generate_root("cluster.local", day).unwrap())
        .unwrap();
    let (chain, key) = ca.issue_serving(&[SERVER_NAME.to_owned()], day).unwrap();
    let tls = Arc::new(ArcSwapOption::from_pointee(
        https::server_config(&chain, &key, None).unwrap(),
    ));
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca.trust_bundle() {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let client_tls = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unreachable = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = kube::Client::try_from(kube::Config::new(unreachable.parse().unwrap())).unwrap();
    let validation = Arc::new(Validation { client });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(https::serve(
        listener,
        tls,
        Limits::webhook(),
        move |request, peer| validation.clone().handle(request, peer),
    ));
    Server {
        address,
        client_tls,
    }
}

impl Server {
    async fn send(
        &self,
        version: Version,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> (StatusCode, Bytes) {
        let request = Request::builder()
            .method(method)
            .uri(format!("https://{SERVER_NAME}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap();
        let mut config = (*self.client_tls).clone();
        config.alpn_protocols = vec![match version {
            Version::Http1 => b"http/1.1".to_vec(),
            Version::Http2 => b"h2".to_vec(),
        }];
        let tcp = TcpStream::connect(self.address).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        let response = match version {
            Version::Http1 => {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                sender.send_request(request).await.unwrap()
            }
            Version::Http2 => {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                sender.send_request(request).await.unwrap()
            }
        };
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }
}

fn review(kind: &str, spec: Value) -> Bytes {
    Bytes::from(
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "7c1f3a52-0000-4000-8000-000000000001",
                "kind": {"group": "networking.istio.io", "version": "v1beta1", "kind": kind},
                "resource": {"group": "networking.istio.io", "version": "v1beta1", "resource": "virtualservices"},
                "name": "reviews",
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": {
                    "apiVersion": "networking.istio.io/v1beta1",
                    "kind": kind,
                    "metadata": {"name": "reviews", "namespace": "shop"},
                    "spec": spec,
                },
            },
        })
        .to_string(),
    )
}

fn verdict(body: &Bytes) -> (bool, String) {
    let answer: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    assert_eq!(
        answer["response"]["uid"],
        "7c1f3a52-0000-4000-8000-000000000001"
    );
    (
        answer["response"]["allowed"].as_bool().unwrap(),
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn admission_reviews_are_answered_with_the_verdict_over_both_http_versions() {
    let server = start().await;
    for version in [Version::Http1, Version::Http2] {
        // A subset no rule can be read for: the unreadable DestinationRules skip that check only.
        let valid = review(
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}], "timeout": "0.5s"}]}),
        );
        let (status, body) = server
            .send(version, Method::POST, VALIDATE_PATH, valid)
            .await;
        assert_eq!(status, StatusCode::OK, "{version:?}");
        assert_eq!(verdict(&body), (true, String::new()), "{version:?}");

        let invalid = review(
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"match": [{"uri": {"regex": "(unclosed"}}], "route": [{"destination": {"host": "reviews"}}]}]}),
        );
        let (status, body) = server
            .send(version, Method::POST, VALIDATE_PATH, invalid)
            .await;
        assert_eq!(status, StatusCode::OK);
        let (allowed, message) = verdict(&body);
        assert!(!allowed, "{version:?}");
        assert!(
            message.starts_with(
                "VirtualService shop/reviews is invalid: spec.http[0].match[0].uri.regex: invalid RE2 regex"
            ),
            "{message}"
        );

        let typo = review(
            "ServiceEntry",
            json!({"hosts": ["api.example.com"], "resolution": "DNS", "ports": [{"number": 443, "name": "https", "protocl": "TLS"}]}),
        );
        let (_, body) = server
            .send(version, Method::POST, VALIDATE_PATH, typo)
            .await;
        let (allowed, message) = verdict(&body);
        assert!(!allowed);
        assert!(
            message.contains("spec.ports[0].protocl: unknown field \"protocl\""),
            "{message}"
        );
    }
}

#[tokio::test]
async fn garbage_oversized_and_misdirected_requests_get_clear_http_errors() {
    let server = start().await;
    let cases: [(Method, &str, Bytes, StatusCode, &str); 5] = [
        (
            Method::POST,
            VALIDATE_PATH,
            Bytes::from_static(b"\x00\xffnot json"),
            StatusCode::BAD_REQUEST,
            "not an AdmissionReview",
        ),
        (
            Method::POST,
            VALIDATE_PATH,
            Bytes::from_static(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            StatusCode::BAD_REQUEST,
            "AdmissionReview without request",
        ),
        (
            Method::POST,
            VALIDATE_PATH,
            Bytes::from(vec![b' '; 5 * 1024 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "exceeds",
        ),
        (
            Method::GET,
            VALIDATE_PATH,
            Bytes::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "",
        ),
        (
            Method::POST,
            "/validate/other",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
    ];
    for (method, path, body, status, fragment) in cases {
        let (got, answer) = server
            .send(Version::Http1, method.clone(), path, body)
            .await;
        assert_eq!(got, status, "{method} {path}");
        assert!(
            String::from_utf8_lossy(&answer).contains(fragment),
            "{method} {path}: {answer:?}"
        );
    }
    // Still serving after all of that.
    let (status, body) = server
        .send(
            Version::Http2,
            Method::POST,
            VALIDATE_PATH,
            review(
                "DestinationRule",
                json!({"host": "reviews", "subsets": [{"name": "v1"}, {"name": "v1"}]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (allowed, message) = verdict(&body);
    assert!(!allowed);
    assert!(
        message.contains("spec.subsets[1].name: duplicate subset name \"v1\""),
        "{message}"
    );
}
