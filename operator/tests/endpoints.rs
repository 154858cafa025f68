//! The control-plane (15012) and webhook (15017) endpoints under hostile clients: the real HTTPS
//! server of `trellis_operator::https` with the real handlers, on a loopback socket, with TLS
//! certificates issued by the operator's own CA. Each test throws one kind of abuse at it and
//! then checks that a well-formed request is still answered.
//!
//! The Kubernetes client points at a closed port: a request that gets as far as a TokenReview
//! (or a Namespace read) is answered with the API server's failure, which is what these tests
//! need to tell "reached the expensive work" from "refused before it".

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsConnector;
use trellis_api::MeshSpec;
use trellis_config::protocol::MAX_REQUEST_BYTES;
use trellis_config::wellknown::{CERTIFICATE_PATH, CONFIG_STREAM_PATH};
use trellis_operator::ca::{CaMaterial, CertificateAuthority};
use trellis_operator::context::MeshState;
use trellis_operator::control_plane::{self, ControlPlane};
use trellis_operator::discovery::Discovery;
use trellis_operator::https::{self, Limits};
use trellis_operator::injector::INJECT_PATH;
use trellis_operator::metrics::Metrics;
use trellis_operator::proxies::ConnectedProxies;
use trellis_operator::rate_limit::{Rate, RateLimiter};
use trellis_operator::rotation::ProxyCertificates;
use trellis_operator::webhook::Webhook;

const SERVER_NAME: &str = "trellis-operator.trellis-system.svc";
const TEN_MEGABYTES: usize = 10 * 1024 * 1024;

/// The handshake and header timeouts of these tests: short enough to watch them act, long
/// enough that "refused at once" (well under it) is told apart on a loaded machine.
const TIMEOUT: Duration = Duration::from_millis(1500);
/// Closing earlier than this is not the timeout acting.
const ALMOST_TIMEOUT: Duration = Duration::from_millis(1400);
/// What "at once" allows for scheduling on a loaded machine.
const AT_ONCE: Duration = Duration::from_millis(1000);

fn test_limits() -> Limits {
    Limits {
        handshake_timeout: TIMEOUT,
        header_timeout: TIMEOUT,
        ..Limits::control_plane()
    }
}

/// Certificate requests allowed at once from one source in these tests.
const TEST_BURST: u32 = 5;

struct Endpoints {
    control_plane: SocketAddr,
    webhook: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    /// Presents a workload certificate of `WORKLOAD_IDENTITY`.
    workload_tls: Arc<rustls::ClientConfig>,
    client_hello: Vec<u8>,
    metrics: Arc<Metrics>,
    /// Held so the handlers' watch receivers see a live mesh and snapshot source, as in the
    /// operator.
    _mesh: watch::Sender<Option<Arc<MeshState>>>,
    _snapshots: watch::Sender<Option<Arc<control_plane::Snapshot>>>,
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    // kube's client and ours share rustls' process default.
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A Kubernetes client whose API server refuses every connection.
async fn unreachable_kubernetes() -> kube::Client {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

/// Starts both servers with `limits`, the real handlers and a Mesh with a fresh CA.
async fn start(limits: Limits) -> Endpoints {
    install_crypto_provider();
    let day = Duration::from_secs(86_400);
    let ca = CertificateAuthority::load(CaMaterial::generate_root("cluster.local", day).unwrap())
        .unwrap();
    let (chain, key) = ca.issue_serving(&[SERVER_NAME.to_owned()], day).unwrap();
    let roots = ca.trust_bundle();
    let control_plane_tls = Arc::new(ArcSwapOption::from_pointee(
        https::server_config(&chain, &key, Some(&roots)).unwrap(),
    ));
    let webhook_tls = Arc::new(ArcSwapOption::from_pointee(
        https::server_config(&chain, &key, None).unwrap(),
    ));
    let client_tls = client_tls(&roots);
    let client_hello = client_hello(&client_tls);
    let workload_tls = workload_tls(&ca, &roots);

    let spec: MeshSpec = serde_json::from_str(r#"{"version":"0.1.0"}"#).unwrap();
    let (mesh_tx, mesh) = watch::channel(Some(Arc::new(MeshState {
        spec,
        ca,
        workload_ttl: day,
        root_rotation: None,
    })));
    let (snapshots_tx, snapshots) = watch::channel(None);
    let client = unreachable_kubernetes().await;
    let metrics = Arc::new(Metrics::default());
    let metrics_handle = metrics.clone();
    let rate = Rate {
        per_second: 1.0,
        burst: TEST_BURST,
    };
    let control_plane = Arc::new(ControlPlane {
        client: client.clone(),
        mesh: mesh.clone(),
        discovery: Discovery::start(client.clone()).await,
        snapshots,
        proxies: Arc::new(ConnectedProxies::default()),
        proxy_certificates: Arc::new(ProxyCertificates::default()),
        metrics: metrics.clone(),
        signing_permits: Semaphore::new(control_plane::MAX_CONCURRENT_SIGNINGS),
        certificate_rate: RateLimiter::new(rate, rate),
        pod_read_rate: RateLimiter::new(
            control_plane::POD_READ_RATE,
            control_plane::POD_READ_RATE_PER_SOURCE,
        ),
    });
    let webhook = Arc::new(Webhook {
        client,
        mesh,
        operator_namespace: "trellis-system".to_owned(),
        native_sidecars: false,
        metrics,
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_plane_address = listener.local_addr().unwrap();
    tokio::spawn(https::serve(
        listener,
        control_plane_tls,
        limits.clone(),
        move |request, peer| control_plane.clone().handle(request, peer),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook_address = listener.local_addr().unwrap();
    tokio::spawn(https::serve(
        listener,
        webhook_tls,
        limits,
        move |request, peer| webhook.clone().handle(request, peer),
    ));
    Endpoints {
        control_plane: control_plane_address,
        webhook: webhook_address,
        client_tls,
        workload_tls,
        client_hello,
        metrics: metrics_handle,
        _mesh: mesh_tx,
        _snapshots: snapshots_tx,
    }
}

fn client_tls(roots_pem: &[String]) -> Arc<rustls::ClientConfig> {
    let mut config = client_builder(roots_pem).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

fn client_builder(
    roots_pem: &[String],
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
}

/// The identity of the workload certificate [`workload_tls`] presents.
const WORKLOAD_IDENTITY: &str = "spiffe://cluster.local/ns/demo/sa/web";

/// A client presenting a workload certificate the CA signed for [`WORKLOAD_IDENTITY`], as a
/// proxy does on its config stream (HTTP/2 only).
fn workload_tls(ca: &CertificateAuthority, roots_pem: &[String]) -> Arc<rustls::ClientConfig> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(WORKLOAD_IDENTITY.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let identity = WORKLOAD_IDENTITY.parse().unwrap();
    let chain = ca
        .sign_workload(&csr, &identity, Duration::from_secs(3600))
        .unwrap()
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let mut config = client_builder(roots_pem)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The first flight a real client sends to these servers.
fn client_hello(config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let mut connection = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).unwrap();
    }
    hello
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

impl Endpoints {
    async fn tls(
        &self,
        address: SocketAddr,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut config = (*self.client_tls).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(address).await.unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap()
    }

    /// One request on a new connection; the status, headers and body of the answer.
    async fn send(
        &self,
        address: SocketAddr,
        version: Version,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, hyper::Error> {
        let response = match version {
            Version::Http1 => {
                let tls = self.tls(address, b"http/1.1").await;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
            Version::Http2 => {
                let tls = self.tls(address, b"h2").await;
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    /// `GET /v1/config` over HTTP/2 with the workload certificate, naming `pod` when given;
    /// the status and body of the answer.
    async fn config_stream_as_workload(&self, pod: Option<&str>) -> (StatusCode, String) {
        let tcp = TcpStream::connect(self.control_plane).await.unwrap();
        let tls = TlsConnector::from(self.workload_tls.clone())
            .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let headers: Vec<(&str, &str)> = pod
            .map(|pod| (trellis_config::protocol::POD_NAME_HEADER, pod))
            .into_iter()
            .collect();
        let response = sender
            .send_request(request(Method::GET, CONFIG_STREAM_PATH, &headers, ""))
            .await
            .unwrap();
        let status = response.status();
        if status.is_success() {
            // An accepted stream's body never ends.
            return (status, String::new());
        }
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Asserts both servers still answer well-formed requests, over both HTTP versions.
    async fn assert_serving(&self) {
        for version in [Version::Http1, Version::Http2] {
            // A config stream without a workload certificate: a complete, authenticated refusal.
            let response = self
                .send(self.control_plane, version, get(CONFIG_STREAM_PATH))
                .await
                .unwrap_or_else(|e| panic!("control plane over {version:?}: {e}"));
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{version:?}");
            assert!(
                String::from_utf8_lossy(response.body()).contains("workload certificate"),
                "{response:?}"
            );
            let response = self
                .send(self.webhook, version, get("/no-such-path"))
                .await
                .unwrap_or_else(|e| panic!("webhook over {version:?}: {e}"));
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{version:?}");
        }
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    request(Method::GET, path, &[], Bytes::new())
}

fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("https://{SERVER_NAME}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

/// A well-formed certificate request body (its identity is never reached: no TokenReview
/// succeeds against the unreachable API server).
fn certificate_request_body() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/demo/sa/web".try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    serde_json::json!({ "csr": csr }).to_string()
}

/// Whether the server closes `stream` within `limit` (EOF or reset; bytes it sends first, such
/// as a TLS alert, are read and ignored).
async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_plaintext_and_truncated_handshakes_are_closed_without_harm() {
    let endpoints = start(test_limits()).await;
    let mut corrupted_hello = endpoints.client_hello.clone();
    for byte in corrupted_hello.iter_mut().skip(9).step_by(7) {
        *byte ^= 0x5a;
    }
    // (what is sent, whether the server may wait for the handshake timeout before closing)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("random bytes", noise(4096, 0x9e37_79b9_7f4a_7c15), false),
        (
            "plaintext HTTP/1.1",
            b"GET /v1/config HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "plaintext HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            false,
        ),
        ("corrupted ClientHello", corrupted_hello, false),
        (
            "truncated ClientHello",
            endpoints.client_hello[..endpoints.client_hello.len() / 2].to_vec(),
            true,
        ),
        ("nothing at all", Vec::new(), true),
    ];
    for address in [endpoints.control_plane, endpoints.webhook] {
        for (name, bytes, waits_for_timeout) in &cases {
            let mut stream = TcpStream::connect(address).await.unwrap();
            let started = Instant::now();
            stream.write_all(bytes).await.unwrap();
            assert!(
                closed_within(&mut stream, Duration::from_secs(5)).await,
                "{name}: the server kept the connection open"
            );
            let took = started.elapsed();
            if *waits_for_timeout {
                assert!(
                    took >= ALMOST_TIMEOUT,
                    "{name}: closed after {took:?}, before the handshake timeout"
                );
            } else {
                assert!(
                    took < AT_ONCE,
                    "{name}: took {took:?}; malformed input should be refused at once"
                );
            }
        }
    }
    endpoints.assert_serving().await;
}

/// The status an HTTP/1.1 server answers to `head` followed by `body`, read while the body is
/// still being written (the server answers a too-large body early and stops reading it).
async fn http1_status_while_sending(
    endpoints: &Endpoints,
    address: SocketAddr,
    head: String,
    body: Bytes,
) -> u16 {
    let tls = endpoints.tls(address, b"http/1.1").await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let sender = tokio::spawn(async move {
        // Fails with a broken pipe once the server has answered and closed: expected.
        let _ = writer.write_all(head.as_bytes()).await;
        let _ = writer.write_all(&body).await;
        let _ = writer.flush().await;
        writer
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer to {address}: {other:?}"),
        }
    }
    sender.abort();
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_bodies_are_refused_with_413() {
    let endpoints = start(test_limits()).await;
    let big = Bytes::from(vec![b'{'; TEN_MEGABYTES]);
    let targets = [
        (endpoints.control_plane, CERTIFICATE_PATH, MAX_REQUEST_BYTES),
        (endpoints.webhook, INJECT_PATH, 4 * 1024 * 1024),
    ];
    for (address, path, limit) in targets {
        // HTTP/2: the whole exchange through hyper's client.
        let response = endpoints
            .send(
                address,
                Version::Http2,
                request(
                    Method::POST,
                    path,
                    &[("authorization", "Bearer token")],
                    big.clone(),
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("{path} over HTTP/2: {e}"));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let message = String::from_utf8_lossy(response.body()).into_owned();
        assert!(message.contains(&limit.to_string()), "{message}");
        // HTTP/1.1, declared length and chunked.
        for framing in [
            format!("Content-Length: {TEN_MEGABYTES}"),
            "Transfer-Encoding: chunked".to_owned(),
        ] {
            let chunked = framing.starts_with("Transfer");
            let body = if chunked {
                let mut encoded = format!("{TEN_MEGABYTES:x}\r\n").into_bytes();
                encoded.extend_from_slice(&big);
                encoded.extend_from_slice(b"\r\n0\r\n\r\n");
                Bytes::from(encoded)
            } else {
                big.clone()
            };
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nAuthorization: Bearer token\r\n\
                 {framing}\r\n\r\n"
            );
            let status = http1_status_while_sending(&endpoints, address, head, body).await;
            assert_eq!(status, 413, "{path} over HTTP/1.1 with {framing}");
        }
    }
    endpoints.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_neither_block_requests_nor_stay_open() {
    let endpoints = start(test_limits()).await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(endpoints.control_plane).await.unwrap());
    }
    // Served while they are all open.
    endpoints.assert_serving().await;
    // Each is closed by the handshake timeout rather than held forever.
    let deadline = Duration::from_secs(10);
    let closes = idle
        .iter_mut()
        .map(|stream| closed_within(stream, deadline));
    let closed = futures::future::join_all(closes).await;
    assert_eq!(
        closed.iter().filter(|&&c| c).count(),
        1000,
        "idle connections still open after {deadline:?}"
    );
    endpoints.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let endpoints = start(Limits {
        max_connections: 8,
        ..test_limits()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(endpoints.control_plane).await.unwrap());
    }
    // Give the server time to accept all eight before the ninth arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ninth = TcpStream::connect(endpoints.control_plane).await.unwrap();
    assert!(
        closed_within(&mut ninth, AT_ONCE).await,
        "a connection over the limit was kept"
    );
    // The eight are dropped at the handshake timeout, and the server takes new clients again.
    for stream in &mut idle {
        assert!(closed_within(stream, Duration::from_secs(5)).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    endpoints.assert_serving().await;
}

/// Writes `chunks` one by one, `every` apart, until the server closes the stream; returns how
/// long after the first write it closed it (None if it never did while chunks lasted).
async fn trickle<S>(stream: &mut S, chunks: &[&[u8]], every: Duration) -> Option<Duration>
where
    S: AsyncReadExt + AsyncWrite + Unpin,
{
    let started = Instant::now();
    for chunk in chunks {
        if stream.write_all(chunk).await.is_err() || stream.flush().await.is_err() {
            return Some(started.elapsed());
        }
        if closed_within(stream, every).await {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_at_the_header_timeout() {
    let endpoints = start(test_limits()).await;
    let header_line: &[u8] = b"X-Slow: a\r\n";
    let mut http1 = vec![&b"GET /v1/config HTTP/1.1\r\nHost: x\r\n"[..]];
    http1.extend(std::iter::repeat_n(header_line, 40));
    // HTTP/2: the connection preface, one byte at a time.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let http2: Vec<&[u8]> = preface.chunks(1).collect();
    for address in [endpoints.control_plane, endpoints.webhook] {
        for (alpn, chunks) in [(&b"http/1.1"[..], &http1), (&b"h2"[..], &http2)] {
            let mut stream = endpoints.tls(address, alpn).await;
            let closed = trickle(&mut stream, chunks, Duration::from_millis(150)).await;
            let alpn = String::from_utf8_lossy(alpn);
            let closed = closed.unwrap_or_else(|| panic!("{alpn} trickle was never cut off"));
            assert!(
                closed >= ALMOST_TIMEOUT && closed < TIMEOUT * 3,
                "{alpn}: cut off after {closed:?}, expected about the header timeout of {TIMEOUT:?}"
            );
        }
        // Completed TLS, then silence.
        let mut silent = endpoints.tls(address, b"h2").await;
        assert!(closed_within(&mut silent, TIMEOUT * 3).await);
        // An HTTP/1.1 keep-alive connection left idle after its request.
        let mut kept = endpoints.tls(address, b"http/1.1").await;
        kept.write_all(b"GET /no-such-path HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        kept.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 404");
        let started = Instant::now();
        assert!(
            closed_within(&mut kept, TIMEOUT * 3).await,
            "an idle keep-alive connection stayed open"
        );
        assert!(started.elapsed() >= ALMOST_TIMEOUT);
    }
    endpoints.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let endpoints = start(test_limits()).await;
    let huge = "a".repeat(64 * 1024);
    // HTTP/1.1, read while writing: the server answers before it has read the whole head and
    // closes, so a client that writes first may only see the reset.
    let head = format!("GET {CONFIG_STREAM_PATH} HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n");
    let status =
        http1_status_while_sending(&endpoints, endpoints.control_plane, head, Bytes::new()).await;
    assert_eq!(status, 431);
    let refused = endpoints
        .send(
            endpoints.control_plane,
            Version::Http2,
            request(Method::GET, CONFIG_STREAM_PATH, &[("x-huge", &huge)], ""),
        )
        .await;
    // HTTP/2: the h2 crate refuses it before any handler, here (far over the bound) with
    // GOAWAY ENHANCE_YOUR_CALM; a 431 answer is the other refusal it may give.
    match refused {
        Err(e) => assert!(
            format!("{e:?}").contains("header_list"),
            "unexpected HTTP/2 failure: {e:?}"
        ),
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{response:?}"
        ),
    }
    endpoints.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_wrong_methods_405_and_bad_bodies_400() {
    let endpoints = start(test_limits()).await;
    let bearer = [("authorization", "Bearer token")];
    let cases = [
        (
            endpoints.control_plane,
            Method::GET,
            "/",
            &[][..],
            "",
            404,
            None,
        ),
        (
            endpoints.control_plane,
            Method::GET,
            "/v1/certificatex",
            &[],
            "",
            404,
            None,
        ),
        (
            endpoints.control_plane,
            Method::GET,
            CERTIFICATE_PATH,
            &[],
            "",
            405,
            Some("POST"),
        ),
        (
            endpoints.control_plane,
            Method::PUT,
            CERTIFICATE_PATH,
            &bearer,
            "{}",
            405,
            Some("POST"),
        ),
        (
            endpoints.control_plane,
            Method::POST,
            CONFIG_STREAM_PATH,
            &[],
            "",
            405,
            Some("GET"),
        ),
        (
            endpoints.control_plane,
            Method::POST,
            CERTIFICATE_PATH,
            &[],
            "{}",
            401,
            None,
        ),
        (
            endpoints.control_plane,
            Method::POST,
            CERTIFICATE_PATH,
            &[("authorization", "Basic eA==")],
            "{}",
            401,
            None,
        ),
        (
            endpoints.control_plane,
            Method::POST,
            CERTIFICATE_PATH,
            &bearer,
            "garbage",
            400,
            None,
        ),
        (
            endpoints.control_plane,
            Method::POST,
            CERTIFICATE_PATH,
            &bearer,
            r#"{"csr":"not a PEM"}"#,
            400,
            None,
        ),
        (
            endpoints.webhook,
            Method::GET,
            INJECT_PATH,
            &[],
            "",
            405,
            Some("POST"),
        ),
        (
            endpoints.webhook,
            Method::POST,
            "/mutate",
            &[],
            "{}",
            404,
            None,
        ),
        (
            endpoints.webhook,
            Method::POST,
            INJECT_PATH,
            &[],
            "\u{0}\u{ff}garbage",
            400,
            None,
        ),
        (
            endpoints.webhook,
            Method::POST,
            INJECT_PATH,
            &[],
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            400,
            None,
        ),
    ];
    for (address, method, path, headers, body, status, allow) in cases {
        for version in [Version::Http1, Version::Http2] {
            let response = endpoints
                .send(
                    address,
                    version,
                    request(method.clone(), path, headers, body),
                )
                .await
                .unwrap();
            let what = format!("{method} {path} {body:?} over {version:?}");
            assert_eq!(response.status().as_u16(), status, "{what}");
            let allowed = response.headers().get(http::header::ALLOW);
            assert_eq!(allowed.map(|v| v.to_str().unwrap()), allow, "{what}");
            // Every refusal carries the JSON error shape proxies decode.
            let error: trellis_config::protocol::ErrorResponse =
                serde_json::from_slice(response.body()).unwrap();
            assert!(!error.error.is_empty(), "{what}");
        }
    }
    endpoints.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_certificate_requests_beyond_the_rate_gets_429_with_retry_after() {
    let endpoints = Arc::new(start(test_limits()).await);
    let body = certificate_request_body();
    let burst = 3 * TEST_BURST as usize;
    let requests = (0..burst).map(|_| {
        let endpoints = endpoints.clone();
        let body = body.clone();
        async move {
            endpoints
                .send(
                    endpoints.control_plane,
                    Version::Http2,
                    request(
                        Method::POST,
                        CERTIFICATE_PATH,
                        &[("authorization", "Bearer token")],
                        body,
                    ),
                )
                .await
                .unwrap()
        }
    });
    let responses = futures::future::join_all(requests).await;
    let throttled: Vec<_> = responses
        .iter()
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    // The ones within the burst reached the TokenReview (which fails: no API server).
    let reviewed = responses
        .iter()
        .filter(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
        .filter(|r| String::from_utf8_lossy(r.body()).contains("TokenReview failed"))
        .count();
    assert_eq!(reviewed, TEST_BURST as usize, "{responses:?}");
    assert_eq!(
        throttled.len(),
        burst - TEST_BURST as usize,
        "{responses:?}"
    );
    for response in &throttled {
        let retry_after: u64 = response.headers()[http::header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    }
    // Other endpoints are not rate limited...
    endpoints.assert_serving().await;
    // ...and after the wait the server named, certificate requests reach the review again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = endpoints
        .send(
            endpoints.control_plane,
            Version::Http1,
            request(
                Method::POST,
                CERTIFICATE_PATH,
                &[("authorization", "Bearer token")],
                body,
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{response:?}"
    );
}

/// A proxy with a valid workload certificate still gets a config stream only for a pod the
/// control plane can confirm as its own: naming none is refused (403), and a pod that cannot be
/// read (here the API server is unreachable) is a 503 the proxy retries. Each refusal says why
/// and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_stream_is_refused_unless_its_pod_is_confirmed() {
    let endpoints = start(test_limits()).await;
    let (status, body) = endpoints.config_stream_as_workload(None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("x-trellis-pod-name"), "{body}");
    let (status, body) = endpoints.config_stream_as_workload(Some("web-1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("pod demo/web-1 could not be read"), "{body}");
    let metrics = endpoints.metrics.encode();
    for sample in [
        r#"trellis_operator_config_streams_total{outcome="no_pod_name"} 1"#,
        r#"trellis_operator_config_streams_total{outcome="unavailable"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|line| line == sample),
            "{sample}:\n{metrics}"
        );
    }
    assert!(!metrics.contains(r#"outcome="accepted""#), "{metrics}");
}
