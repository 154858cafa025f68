//! The control-plane endpoint on 15012 (HTTP/2 over TLS), served by every replica:
//! `POST /v1/certificate` signs a workload CSR after a TokenReview of the caller's projected
//! ServiceAccount token, and `GET /v1/config` streams config snapshots to a proxy authenticated
//! by its workload certificate, for the pod it runs in only (`crate::stream_access`). Wire
//! format: `trellis_config::protocol`.
//!
//! One compile per burst of changes serves every proxy: each stream overlays its own inbound
//! policy (PeerAuthentication resolved for its pod, the RequestAuthentications and the
//! AuthorizationPolicies that apply to it) on the mesh-wide snapshot and sends it only when that
//! proxy's version changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{Semaphore, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};
use trellis_api::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use trellis_config::SpiffeId;
use trellis_config::authz::Action;
use trellis_config::ext_authz::ExtAuthzProvider;
use trellis_config::protocol::{
    CertificateRequest, CertificateResponse, ControlMessage, MAX_REQUEST_BYTES, POD_NAME_HEADER,
    PROXY_VERSION_HEADER,
};
use trellis_config::proxy::{InboundPolicy, PeerAuthenticationMode, ProxyConfig};
use trellis_config::wellknown::{
    CERTIFICATE_PATH, CONFIG_STREAM_PATH, PROXY_CONTAINER, TOKEN_AUDIENCE,
};

use crate::authorization;
use crate::compile::{compile, for_workload, workload_version};
use crate::context::MeshStateRx;
use crate::discovery::Discovery;
use crate::https::{self, Body, Peer};
use crate::jwks::JwksResolver;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::peer_authentication::{self, PolicyIndex, Workload};
use crate::proxies::ConnectedProxies;
use crate::rate_limit::{Rate, RateLimiter};
use crate::request_authentication::{self, JwksSource};
use crate::rotation::ProxyCertificates;
use crate::stream_access::{self, Claim, Refusal};
use crate::traffic::{self, TrafficIndex};

/// Bursts of cluster changes within this window produce one snapshot.
const COALESCE: Duration = Duration::from_millis(50);
/// Concurrent CSR signings (each costs a TokenReview round trip and an ECDSA signature).
pub const MAX_CONCURRENT_SIGNINGS: usize = 32;
/// Certificate requests per second this replica sends on to a TokenReview, all callers together:
/// enough for a node's worth of pods starting at once, far below what would load the API server.
pub const CERTIFICATE_RATE: Rate = Rate {
    per_second: 50.0,
    burst: 100,
};
/// The same per source address: a proxy asks once at start and once per rotation (and retries
/// with backoff), so more than this from one address is a misbehaving or hostile caller.
pub const CERTIFICATE_RATE_PER_SOURCE: Rate = Rate {
    per_second: 1.0,
    burst: 10,
};

/// Config streams whose pod the discovery cache cannot confirm cost a read of the pod; these bound
/// such reads per second, all callers together: a node's worth of pods starting before the cache
/// has their IPs.
pub const POD_READ_RATE: Rate = Rate {
    per_second: 50.0,
    burst: 100,
};
/// The same per source address: a proxy that needs more is naming pods it does not run in.
pub const POD_READ_RATE_PER_SOURCE: Rate = Rate {
    per_second: 1.0,
    burst: 5,
};

/// What every config stream builds its proxy's snapshot from; published once per burst.
#[derive(Debug)]
pub struct Snapshot {
    /// The mesh-wide config; its inbound policy is the Mesh default.
    pub config: Arc<ProxyConfig>,
    /// `Mesh.spec.mtls.mode`, the last level of PeerAuthentication inheritance.
    pub mesh_default: PeerAuthenticationMode,
    /// `Mesh.spec.rootNamespace`: where policies apply mesh-wide.
    pub root_namespace: String,
    pub peer_authentications: PolicyIndex,
    /// Every AuthorizationPolicy; each stream compiles those that apply to its workload.
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Every RequestAuthentication; each stream compiles those that apply to its workload.
    pub request_authentications: Vec<Arc<RequestAuthentication>>,
    /// The key sets fetched for them (`jwksUri`, OpenID discovery).
    pub jwks: BTreeMap<JwksSource, String>,
    /// The Mesh's valid external authorizers by name, for CUSTOM policies.
    pub ext_authz_providers: BTreeMap<String, ExtAuthzProvider>,
    /// During a root rotation: proxies whose certificate was issued before this are told to
    /// renew, right after this snapshot (and its trust bundle) on the same stream.
    pub renew_issued_before: Option<time::OffsetDateTime>,
    /// VirtualServices, DestinationRules and ServiceEntries, compiled per client namespace.
    pub traffic: TrafficIndex,
    /// Config lines already encoded for this snapshot, by per-proxy version: proxies with the
    /// same effective config (same namespace, same inbound policy) share one encoding, so a
    /// change costs one serialization per distinct config instead of one per proxy.
    pub encoded: parking_lot::Mutex<HashMap<String, Bytes>>,
}

pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;

pub struct ControlPlane {
    pub client: Client,
    pub mesh: MeshStateRx,
    pub discovery: Discovery,
    pub snapshots: SnapshotRx,
    pub proxies: Arc<ConnectedProxies>,
    /// When each stream's client certificate was issued (shared with the root rotation).
    pub proxy_certificates: Arc<ProxyCertificates>,
    pub metrics: Arc<Metrics>,
    pub signing_permits: Semaphore,
    /// Bounds certificate requests before their TokenReview ([`CERTIFICATE_RATE`]).
    pub certificate_rate: RateLimiter,
    /// Bounds the pod reads of config streams ([`POD_READ_RATE`]).
    pub pod_read_rate: RateLimiter,
}

/// Recompiles the mesh-wide snapshot whenever discovery or the Mesh changes, and publishes it
/// with the PeerAuthentications of the same moment. Call it once discovery is ready, so the first
/// snapshot is never compiled from a half-listed cluster.
pub fn publish_snapshots(discovery: Discovery, mut mesh: MeshStateRx) -> SnapshotRx {
    let (tx, rx) = watch::channel(None::<Arc<Snapshot>>);
    let mut changes = discovery.changes();
    tokio::spawn(async move {
        let mut validated = BTreeMap::new();
        let traffic_warnings = Arc::default();
        let jwks = JwksResolver::new();
        let mut jwks_changes = jwks.changes();
        loop {
            // Everything up to here is in this snapshot; only later changes wake the loop.
            changes.borrow_and_update();
            let state = mesh.borrow_and_update().clone();
            if let Some(state) = state {
                let root_namespace = state.spec.root_namespace.clone();
                let policies = discovery.peer_authentications();
                report_invalid(&policies, &root_namespace, &mut validated);
                let index = PolicyIndex::new(policies);
                let mesh_default = state.spec.mtls.mode.into();
                let plaintext_ports = |pod: &Pod| {
                    Workload::from_pod(pod).map_or_else(BTreeSet::new, |workload| {
                        index
                            .resolve(&root_namespace, &workload, mesh_default)
                            .inbound
                            .disabled_ports(&workload.container_ports)
                    })
                };
                let cluster = discovery.snapshot();
                let compiled = compile(
                    &cluster,
                    &state.spec,
                    &state.ca.trust_bundle(),
                    &plaintext_ports,
                );
                let traffic = TrafficIndex::new(
                    discovery.traffic_resources(),
                    compiled.services.clone(),
                    cluster.pods,
                    &root_namespace,
                    &state.spec.trust_domain,
                    Arc::clone(&traffic_warnings),
                );
                // Keep the previous Arc when the mesh-wide content is unchanged.
                let config = match tx.borrow().as_ref() {
                    Some(previous) if previous.config.version == compiled.version => {
                        previous.config.clone()
                    }
                    _ => Arc::new(compiled),
                };
                // Published on every burst: a PeerAuthentication or pod change can alter one
                // proxy's snapshot without touching the mesh-wide one. Each stream re-sends only
                // if its own version changed.
                tx.send_replace(Some(Arc::new(Snapshot {
                    config,
                    mesh_default,
                    root_namespace,
                    peer_authentications: index,
                    authorization_policies: discovery.authorization_policies(),
                    request_authentications: {
                        let policies = discovery.request_authentications();
                        jwks.track(
                            &request_authentication::fetches(&policies),
                            request_authentication::refresh_interval(&state.spec),
                        );
                        jwks_changes.borrow_and_update();
                        policies
                    },
                    jwks: jwks.key_sets(),
                    ext_authz_providers: crate::ext_authz::Providers::of(&state.spec).by_name,
                    renew_issued_before: state
                        .root_rotation
                        .as_ref()
                        .and_then(crate::rotation::Rotation::renew_issued_before),
                    traffic,
                    encoded: Default::default(),
                })));
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                changed = mesh.changed() => if changed.is_err() { return },
                changed = jwks_changes.changed() => if changed.is_err() { return },
            }
            tokio::time::sleep(COALESCE).await;
        }
    });
    rx
}

/// Logs, once per version of each PeerAuthentication (and of the root namespace), what the
/// schema cannot reject but the resolution ignores (Istio accepts such policies too).
/// `validated` remembers what was last checked per `namespace/name`.
fn report_invalid(
    policies: &[Arc<PeerAuthentication>],
    root_namespace: &str,
    validated: &mut BTreeMap<String, String>,
) {
    let mut seen = BTreeMap::new();
    for policy in policies {
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        let name = policy.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let resource_version = policy
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default();
        let version = format!("{resource_version} root={root_namespace}");
        if validated.get(&key) != Some(&version) {
            for warning in peer_authentication::validate(policy, root_namespace) {
                warn!(%namespace, %name, "PeerAuthentication: {warning}");
            }
        }
        seen.insert(key, version);
    }
    *validated = seen;
}

impl ControlPlane {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, CERTIFICATE_PATH) => self.certificate(request, &peer).await,
            (&Method::GET, CONFIG_STREAM_PATH) => self.config_stream(request, &peer).await,
            (_, CERTIFICATE_PATH) => https::method_not_allowed(&Method::POST),
            (_, CONFIG_STREAM_PATH) => https::method_not_allowed(&Method::GET),
            _ => https::error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .certificates_signed
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Cheap checks first (token present, body bounded and decodable), then the rate limit and
    /// the signing permit, so only well-formed requests within the rate reach a TokenReview.
    async fn certificate(&self, request: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let Some(token) = bearer_token(request.headers()) else {
            self.count("unauthenticated");
            return https::error(StatusCode::UNAUTHORIZED, "missing bearer token");
        };
        let body = match https::read_body(request.into_body(), MAX_REQUEST_BYTES).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let csr = match decode_certificate_request(&body) {
            Ok(csr) => csr,
            Err(e) => {
                self.count("malformed");
                return https::error(StatusCode::BAD_REQUEST, e);
            }
        };
        if let Err(wait) = self
            .certificate_rate
            .try_acquire(peer.address.map(|a| a.ip()))
        {
            self.count("throttled");
            return https::too_many_requests(wait, "too many certificate requests");
        }
        let Ok(_permit) = self.signing_permits.try_acquire() else {
            self.count("throttled");
            return https::too_many_requests(
                Duration::from_secs(1),
                "too many concurrent certificate requests",
            );
        };
        let Some(state) = self.mesh.borrow().clone() else {
            return https::error(StatusCode::SERVICE_UNAVAILABLE, "the mesh is not ready yet");
        };
        let (namespace, service_account) = match self.review_token(&token).await {
            Ok(identity) => identity,
            Err(response) => {
                self.count("unauthenticated");
                return response;
            }
        };
        let identity = SpiffeId::new(&state.spec.trust_domain, &namespace, &service_account);
        match state
            .ca
            .sign_workload(&csr.csr, &identity, state.workload_ttl)
        {
            Ok(cert_chain) => {
                self.count("signed");
                info!(%identity, "signed workload certificate");
                let response = CertificateResponse {
                    cert_chain,
                    trust_bundle: state.ca.trust_bundle(),
                };
                https::full(
                    StatusCode::OK,
                    serde_json::to_vec(&response).unwrap_or_default(),
                )
            }
            Err(e) => {
                self.count("refused");
                warn!(%identity, error = %e, "refused CSR");
                https::error(StatusCode::FORBIDDEN, e)
            }
        }
    }

    /// Authenticates a projected ServiceAccount token for our audience; returns its namespace
    /// and ServiceAccount.
    async fn review_token(&self, token: &str) -> Result<(String, String), Response<Body>> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                https::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("TokenReview failed: {e}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(https::error(
                StatusCode::UNAUTHORIZED,
                format!("token rejected: {}", status.error.unwrap_or_default()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == TOKEN_AUDIENCE)
        {
            return Err(https::error(
                StatusCode::UNAUTHORIZED,
                "token is not for the trellis audience",
            ));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        match username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((namespace, sa)) if !namespace.is_empty() && !sa.is_empty() => {
                Ok((namespace.to_owned(), sa.to_owned()))
            }
            _ => Err(https::error(
                StatusCode::FORBIDDEN,
                format!("{username:?} is not a ServiceAccount"),
            )),
        }
    }

    /// Opens a config stream for the pod the proxy names, once that pod is the proxy's own
    /// (`crate::stream_access`); refusals are counted, logged and answered with their reason.
    async fn config_stream(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: &Peer,
    ) -> Response<Body> {
        let Some(identity) = peer
            .certificates
            .first()
            .and_then(|leaf| spiffe_id_of(leaf))
        else {
            return https::error(
                StatusCode::UNAUTHORIZED,
                "a workload certificate is required",
            );
        };
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let pod_name = header(POD_NAME_HEADER);
        let version = header(PROXY_VERSION_HEADER);
        let claim = Claim {
            identity: &identity,
            pod_name: &pod_name,
            source: peer.address.map(|address| address.ip()),
        };
        let cached = self.discovery.pod(&identity.namespace, &pod_name);
        let authorized =
            stream_access::authorize(&self.client, &self.pod_read_rate, cached, claim).await;
        let pod = match authorized {
            Ok(pod) => pod,
            Err(refusal) => {
                self.count_stream(refusal.metric_label());
                warn!(
                    %identity, pod = %pod_name, source = ?claim.source, reason = %refusal,
                    "refused a config stream"
                );
                return match refusal {
                    Refusal::Throttled { retry_after } => {
                        https::too_many_requests(retry_after, refusal)
                    }
                    _ => https::error(refusal.status(), refusal),
                };
            }
        };
        self.count_stream("accepted");
        let issued = peer
            .certificates
            .first()
            .and_then(|leaf| crate::ca::issued_at(leaf));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            let _connection = self.proxies.connect(if version.is_empty() {
                "unknown"
            } else {
                &version
            });
            let _certificate = self.proxy_certificates.register(issued);
            info!(%identity, pod = %pod_name, %version, "proxy connected");
            self.stream_to(&identity, &pod, issued, tx).await;
            info!(%identity, pod = %pod_name, "proxy disconnected");
        });
        let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .expect("static response parts are valid")
    }

    fn count_stream(&self, outcome: &'static str) {
        self.metrics
            .config_streams
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The latest copy of the stream's pod: discovery's while it holds the same pod (same uid),
    /// else the one the stream was authorized with — discovery may not have it yet, and a pod
    /// recreated under the name is another pod, whose config this stream never carries.
    fn current_pod(&self, authorized: &Arc<Pod>) -> Arc<Pod> {
        let meta = &authorized.metadata;
        self.discovery
            .pod(
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default(),
            )
            .filter(|cached| cached.metadata.uid == meta.uid)
            .unwrap_or_else(|| authorized.clone())
    }

    /// `issued`: when the stream's client certificate was issued (a proxy reconnects with each
    /// new certificate), to tell it to renew during a root rotation.
    async fn stream_to(
        &self,
        identity: &SpiffeId,
        authorized: &Arc<Pod>,
        issued: Option<time::OffsetDateTime>,
        tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    ) {
        let mut snapshots = self.snapshots.clone();
        let mut changes = self.discovery.changes();
        let mut sent_version = String::new();
        let mut sent_inbound = None;
        let mut renew_sent = None;
        // The snapshot is rebuilt only when a (coalesced) snapshot is published, so a proxy gets
        // at most one per burst; raw discovery changes only re-check whether the pod finished.
        let mut snapshot_published = true;
        let pod_name = authorized.metadata.name.as_deref().unwrap_or_default();
        loop {
            let pod = self.current_pod(authorized);
            let mut lines = Vec::new();
            // Marked seen only when taken: a snapshot published while a raw change won the
            // select below is still pending and wakes the next select at once.
            let snapshot = snapshot_published
                .then(|| snapshots.borrow_and_update().clone())
                .flatten();
            if let Some(snapshot) = snapshot {
                let (inbound, undeclared_ports) = inbound_policy(&snapshot, &pod);
                // Routes and clusters depend on the namespace (exportTo, DestinationRule lookup).
                let routing = snapshot.traffic.for_namespace(&identity.namespace);
                let version = traffic::versioned(
                    &workload_version(&snapshot.config.version, &inbound),
                    &routing,
                );
                if version != sent_version {
                    if sent_inbound.as_ref() != Some(&inbound) {
                        log_inbound(identity, pod_name, &inbound, &undeclared_ports);
                        sent_inbound = Some(inbound.clone());
                    }
                    let cached = snapshot.encoded.lock().get(&version).cloned();
                    let line = match cached {
                        Some(line) => line,
                        None => {
                            let config = traffic::with_traffic(
                                for_workload(&snapshot.config, inbound),
                                &routing,
                            );
                            let line = encode_line(&ControlMessage::Config(Box::new(config)));
                            snapshot
                                .encoded
                                .lock()
                                .insert(version.clone(), line.clone());
                            line
                        }
                    };
                    sent_version = version;
                    lines.push(line);
                }
                // After the config: a proxy handles messages in order, so when it renews it has
                // applied this snapshot's trust bundle.
                if let Some(before) = snapshot.renew_issued_before
                    && issued.is_none_or(|issued| issued < before)
                    && renew_sent != Some(before)
                {
                    renew_sent = Some(before);
                    lines.push(encode_line(&ControlMessage::Renew {
                        reason: "root rotation: a certificate issued since the phase began is \
                                 needed"
                            .to_owned(),
                    }));
                }
            }
            if let Some(reason) = workload_finished(&pod) {
                lines.push(encode_line(&ControlMessage::Exit { reason }));
            }
            for line in lines {
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            snapshot_published = tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return } else { true },
                changed = changes.changed() => if changed.is_err() { return } else { false },
                () = tx.closed() => return,
            };
        }
    }
}

/// The pod's inbound policy, and the port-level ports it does not declare.
fn inbound_policy(snapshot: &Snapshot, pod: &Pod) -> (InboundPolicy, Vec<u16>) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let workload = Workload::from_pod(pod).unwrap_or_else(|| Workload {
        namespace: namespace.to_owned(),
        ..Workload::default()
    });
    let mut resolution = snapshot.peer_authentications.resolve(
        &snapshot.root_namespace,
        &workload,
        snapshot.mesh_default,
    );
    resolution.inbound.authorization = authorization::for_workload(
        snapshot.authorization_policies.iter().map(Arc::as_ref),
        &snapshot.root_namespace,
        &authorization::Workload::of(namespace, Some(pod)),
        &snapshot.ext_authz_providers,
    );
    resolution.inbound.authentication = request_authentication::for_workload(
        snapshot.request_authentications.iter().map(Arc::as_ref),
        &snapshot.root_namespace,
        &authorization::Workload::of(namespace, Some(pod)),
        &snapshot.jwks,
    );
    (resolution.inbound, resolution.undeclared_ports)
}

/// `Some(reason)` once every application container of the pod has terminated and the pod will
/// not restart them — then the classic sidecar must exit so the pod can complete.
fn workload_finished(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let restart_policy = spec.restart_policy.as_deref().unwrap_or("Always");
    if restart_policy == "Always" {
        return None;
    }
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let apps: Vec<_> = statuses
        .iter()
        .filter(|s| s.name != PROXY_CONTAINER)
        .collect();
    let all_done = !apps.is_empty()
        && apps.iter().all(|s| {
            s.state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                // Under OnFailure a failed container is restarted, so only success ends it.
                .is_some_and(|t| restart_policy == "Never" || t.exit_code == 0)
        });
    all_done.then(|| "application containers terminated".to_owned())
}

/// Logs a proxy's inbound policy when it changes (not on every re-send).
fn log_inbound(identity: &SpiffeId, pod: &str, inbound: &InboundPolicy, undeclared_ports: &[u16]) {
    let authorization: Vec<(Action, &str)> = inbound
        .authorization
        .policies()
        .map(|(action, policy)| (action, policy.name.as_str()))
        .collect();
    info!(
        %identity, %pod, mode = ?inbound.mtls_mode, ports = ?inbound.port_mtls, ?authorization,
        "inbound policy"
    );
    if !undeclared_ports.is_empty() {
        info!(
            %identity,
            %pod,
            ports = ?undeclared_ports,
            "portLevelMtls names ports the pod does not declare as container ports; they apply to \
             connections arriving on those ports (keys are workload ports, not Service ports)"
        );
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is a non-empty one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// Why a certificate request body was refused before any work was done for it.
#[derive(Debug, thiserror::Error)]
pub enum CertificateRequestError {
    #[error("body is not a certificate request: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the certificate request holds no PEM CSR")]
    NotPem,
}

/// Decodes the body of `POST /v1/certificate`. Pure (fuzzed by `fuzz/certificate_request`): the
/// CSR itself is parsed and checked against the caller's identity by the CA when signing.
pub fn decode_certificate_request(
    body: &[u8],
) -> Result<CertificateRequest, CertificateRequestError> {
    let request: CertificateRequest = serde_json::from_slice(body)?;
    if !request.csr.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(CertificateRequestError::NotPem);
    }
    Ok(request)
}

/// The SPIFFE identity in a leaf certificate's URI SAN.
pub fn spiffe_id_of(leaf: &rustls::pki_types::CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
        _ => None,
    })
}

/// One NDJSON line of the config stream.
fn encode_line(message: &ControlMessage) -> Bytes {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}
