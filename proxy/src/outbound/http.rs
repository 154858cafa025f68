//! Outbound HTTP: the application's connection is served as HTTP (HTTP/1.1 or h2c, detected),
//! and every request is sent on its own: [`route`] finds the service the request is for, its
//! VirtualService route (the pure matcher in `crate::route`) decides what happens (a weighted
//! destination, a redirect, a direct response, faults, rewrites, header edits, CORS, mirrors,
//! timeout and retries), the cluster's runtime state (`crate::upstream`) picks an endpoint per
//! try, and [`send_to_endpoint`] sends it over the cluster's pooled connections: HTTP/2 inside
//! mutual TLS (ALPN [`MESH_H2_ALPN`]) to a meshed endpoint, plaintext HTTP/1.1 keep-alive (h2c
//! for `http2`/`grpc` ports) otherwise. Every request keeps the config snapshot it started with.
//!
//! An HTTP/1.1 upgrade (WebSocket) crosses the mutual TLS hop as HTTP/1.1 on a connection of its
//! own (ALPN [`MESH_ALPN`]); the inbound side serves it as HTTP, so it authorizes the upgrade
//! request like any other, and after the `101` both sidecars splice the upgraded streams. No
//! other upgrade is honoured and `CONNECT` is refused ([`crate::http::upgrade`]).
//!
//! The request's authority is normalised once ([`Authority`]) for routing and forwarding. The
//! application's `x-trellis-*` headers are removed before routing, and an upstream's unless the
//! upstream is a sidecar met over mesh mutual TLS ([`crate::http::headers`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use trellis_config::mesh::OutboundTrafficMode;
use trellis_config::proxy::{Endpoint, MESH_ALPN, MESH_H2_ALPN, Protocol, ProxyConfig};
use trellis_config::traffic::{
    ClientTls, Headers, HttpAction, HttpMatch, HttpRoute, LoadBalancer, Mirror, RetryPolicy,
};

use crate::destination::{self, Destination};
use crate::host::Authority;
use crate::http::headers::{self, X_FORWARDED_PROTO, X_TRELLIS_APP_VERSION, X_TRELLIS_REASON};
use crate::http::pool::{self, BoxedIo, Key, Pool, SendError, Wire};
use crate::http::replay::ReplayBody;
use crate::http::reply::Reason;
use crate::http::telemetry::Record;
use crate::http::telemetry::body::{Counted, Observed, RouteTimeout};
use crate::http::{Body, BoxError, policy, upgrade};
use crate::metrics::{flags, values};
use crate::route::retry::{self, Outcome, RetryDecision, Stop};
use crate::route::{self, HttpDecision, RequestAttributes, Target, balance};
use crate::state::ProxyState;
use crate::tls::mtls::MeshTls;
use crate::tls::origination;
use crate::upstream::connect::{self, Security};
use crate::upstream::{PickError, Picked, RequestGuard};

/// One application connection to `dst`.
struct Connection {
    state: Arc<ProxyState>,
    peer: SocketAddr,
    dst: SocketAddr,
}

/// Serves the application's connection to `dst` (its original destination) as HTTP.
pub async fn serve(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    let connection = Arc::new(Connection {
        state: state.clone(),
        peer,
        dst,
    });
    let service = service_fn(move |req| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(proxy(&connection, req).await) }
    });
    crate::http::serve_connection(&state, stream, service, "outbound").await;
}

/// Where a request goes before routing.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// A service port: its VirtualService routes (or the default route) decide the cluster.
    Service(Destination<'a>),
    /// No service known for the address: straight to it (`ALLOW_ANY`).
    Passthrough(SocketAddr),
    /// Not allowed to leave (`REGISTRY_ONLY`).
    OutsideRegistry,
}

/// Which service a request to `dst` with `authority` is for: the service of the address, else
/// the service without addresses that names the authority on the dialled port (a ServiceEntry
/// without `addresses`); [`plan_route`] then applies its routes.
pub fn route<'a>(config: &'a ProxyConfig, dst: SocketAddr, authority: &str) -> Route<'a> {
    let found = destination::lookup(config, dst)
        .or_else(|| destination::lookup_host(config, authority, dst.port()));
    match found {
        Some(found) => Route::Service(found),
        None if config.outbound_traffic_policy == OutboundTrafficMode::AllowAny => {
            Route::Passthrough(dst)
        }
        None => Route::OutsideRegistry,
    }
}

/// The chosen endpoint and how to reach it.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Mutual TLS settings and the SPIFFE ID the endpoint must present, when meshed.
    pub mesh: Option<(Arc<MeshTls>, String)>,
    pub wire: Wire,
    /// SNI of the mutual TLS (the service hostname; informational).
    pub hostname: String,
    /// DestinationRule `tls` mode `SIMPLE`/`MUTUAL`: the proxy originates TLS to the endpoint.
    pub origination: Option<ClientTls>,
    /// The cluster's `connectTimeout`, else the proxy's.
    pub connect_timeout: Duration,
}

impl Upstream {
    fn key(&self) -> Key {
        Key {
            addr: self.addr,
            source: None,
            peer: match (&self.mesh, &self.origination) {
                (Some((_, peer)), _) => Some(peer.clone()),
                // Originated TLS connections are pooled apart from plain ones to the address.
                (None, Some(tls)) => Some(format!(
                    "tls:{}",
                    tls.sni.as_deref().unwrap_or(&self.hostname)
                )),
                (None, None) => None,
            },
            wire: self.wire,
        }
    }

    /// A new connection to the endpoint; for mutual TLS, `alpn` is the one protocol offered and
    /// the one the endpoint must agree to. Originated TLS offers the ALPN of the wire the pool
    /// speaks on it.
    async fn connect(&self, alpn: &'static [u8]) -> anyhow::Result<BoxedIo> {
        let security = match (&self.origination, &self.mesh) {
            (Some(tls), _) => Security::Originate {
                tls,
                alpn: Some(match self.wire {
                    Wire::Http2 => b"h2",
                    Wire::Http1 => b"http/1.1",
                }),
            },
            (None, Some((tls, peer))) => Security::Mesh { tls, peer, alpn },
            (None, None) => Security::Plain,
        };
        Ok(connect::connect(self.addr, &self.hostname, &security, self.connect_timeout).await?)
    }
}

/// Sends `req` to one endpoint over a pooled connection: the cluster's pool (its
/// `connectionPool` limits apply) or, for a passthrough destination, the proxy-wide one.
pub async fn send_to_endpoint(
    pool: &Pool,
    upstream: &Upstream,
    req: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    pool.send(&upstream.key(), req, || upstream.connect(MESH_H2_ALPN))
        .await
}

async fn proxy(connection: &Connection, mut req: Request<Incoming>) -> Response<Observed> {
    let state = &connection.state;
    // The snapshot this request uses to its end, whatever config arrives meanwhile.
    let config = state.current_config();
    let authority = Authority::parse(&headers::authority(&req).unwrap_or_default());
    let route = route(&config, connection.dst, authority.as_str());
    let found = match route {
        Route::Service(found) => Some(found),
        Route::Passthrough(_) | Route::OutsideRegistry => None,
    };
    let labels = super::labels(state, found.as_ref());
    let mut record = Record::start(state.clone(), labels, &req, connection.peer);
    if upgrade::is_connect(&req) {
        info!(peer = %connection.peer, dst = %connection.dst, "CONNECT refused");
        return record.reply(Reason::ConnectNotAllowed);
    }
    record.request_id = headers::ensure_request_id(req.headers_mut());
    headers::strip_internal(req.headers_mut());
    let plan = match route {
        Route::OutsideRegistry => {
            info!(peer = %connection.peer, dst = %connection.dst, %authority,
                  "request for a host outside the registry refused (REGISTRY_ONLY): 502");
            return record.reply(Reason::NotInRegistry);
        }
        Route::Passthrough(addr) => Plan::to(Upstreams::Passthrough(addr)),
        // An endpoint the application dialled itself: no VirtualService applies to it.
        Route::Service(found) if found.endpoint.is_some() => Plan::to(Upstreams::Cluster {
            target: route::default_target(&config, &found),
            original: Some(connection.dst),
        }),
        Route::Service(found) => match plan_route(connection, &config, found, &req, &authority) {
            Ok(plan) => with_generated_cookie(Plan {
                dialled: Some(connection.dst),
                ..plan
            }),
            Err(Answer::Reason(reason)) => return record.reply(reason),
            Err(Answer::Made(response)) => return answer(record, *response, &[]),
        },
    };
    if let Upstreams::Cluster { target, .. } = &plan.upstreams {
        super::set_destination_service(
            &mut record.labels,
            target.hostname(),
            &target.service.namespace,
        );
    }
    forward(connection, &config, record, req, &authority, plan).await
}

/// What a matched route (or the default route) does with a request that goes upstream.
struct Plan<'a> {
    upstreams: Upstreams<'a>,
    /// `None` for the default route (no VirtualService): Istio's default retries, no timeout.
    route: Option<&'a HttpRoute>,
    /// The chosen weighted destination's header edits.
    destination_headers: Option<&'a Headers>,
    matched: Option<&'a HttpMatch>,
    /// The request's consistent-hash key, when the cluster balances by one.
    hash: Option<u64>,
    /// The hash cookie the proxy generated for this request, set on the upstream's response.
    set_cookie: Option<HeaderValue>,
    /// The address the application dialled: where `PASSTHROUGH` (or `resolution: NONE`) sends a
    /// request to a service without a VIP.
    dialled: Option<SocketAddr>,
}

impl<'a> Plan<'a> {
    fn to(upstreams: Upstreams<'a>) -> Self {
        Self {
            upstreams,
            route: None,
            destination_headers: None,
            matched: None,
            hash: None,
            set_cookie: None,
            dialled: None,
        }
    }
}

/// Where the tries of a request go.
enum Upstreams<'a> {
    /// An address outside every service (`ALLOW_ANY`), over the proxy-wide pool.
    Passthrough(SocketAddr),
    /// A cluster (service port, subset, DestinationRule settings): an endpoint picked per try
    /// by the cluster's runtime state; `original`, the address the application dialled when it
    /// named one endpoint itself.
    Cluster {
        target: Target<'a>,
        original: Option<SocketAddr>,
    },
}

/// A request the proxy answers itself.
enum Answer {
    Reason(Reason),
    /// A route's redirect or direct response (boxed: it is the rare, large case).
    Made(Box<Response<Body>>),
}

/// Chooses the route (first match wins) and, for a routed request, the weighted destination
/// (a fresh random draw per request).
fn plan_route<'a>(
    connection: &Connection,
    config: &'a ProxyConfig,
    found: Destination<'a>,
    req: &Request<Incoming>,
    authority: &Authority,
) -> Result<Plan<'a>, Answer> {
    let state = &connection.state;
    let port = found.port.port;
    let request = RequestAttributes {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        authority,
        scheme: "http",
        headers: req.headers(),
        source_labels: &state.workload.labels,
        source_namespace: &state.workload.namespace,
        port,
    };
    let hash = |target: &Target<'_>| match target.cluster.map(|c| &c.lb) {
        Some(LoadBalancer::ConsistentHash(hash)) => {
            balance::hash_key(&hash.key, &request, connection.peer.ip())
        }
        _ => None,
    };
    let matched = match route::match_http(config, &found, &request) {
        HttpDecision::Default => {
            let target = route::default_target(config, &found);
            return Ok(Plan {
                hash: hash(&target),
                ..Plan::to(Upstreams::Cluster {
                    target,
                    original: None,
                })
            });
        }
        HttpDecision::NoRoute => return Err(Answer::Reason(Reason::NoRoute)),
        HttpDecision::Matched(matched) => matched,
    };
    let destinations = match &matched.route.action {
        HttpAction::Redirect(redirect) => {
            let location = route::redirect_location(redirect, &request);
            return Err(Answer::Made(Box::new(policy::redirect_response(
                redirect.code,
                &location,
            ))));
        }
        HttpAction::DirectResponse(direct) => {
            return Err(Answer::Made(Box::new(policy::direct_response(direct))));
        }
        HttpAction::Route(destinations) => destinations,
    };
    let chosen = route::pick_weighted(destinations, rand::random())
        .ok_or(Answer::Reason(Reason::NoCluster))?;
    let Some(target) =
        route::resolve_target(config, &chosen.host, &chosen.subset, chosen.port, port)
    else {
        warn!(
            host = chosen.host,
            subset = chosen.subset,
            "route destination has no service"
        );
        return Err(Answer::Reason(Reason::NoCluster));
    };
    Ok(Plan {
        hash: hash(&target),
        upstreams: Upstreams::Cluster {
            target,
            original: None,
        },
        route: Some(matched.route),
        destination_headers: Some(&chosen.headers),
        matched: matched.matched,
        set_cookie: None,
        dialled: None,
    })
}

/// A request to a cluster hashing on a cookie with a `ttl` that lacks the cookie: generate one,
/// route by it and set it on the response, so the client's next requests stick to the same
/// endpoint (Envoy's cookie generation).
fn with_generated_cookie(mut plan: Plan<'_>) -> Plan<'_> {
    if plan.hash.is_some() {
        return plan;
    }
    let Upstreams::Cluster { target, .. } = &plan.upstreams else {
        return plan;
    };
    let Some(LoadBalancer::ConsistentHash(hash)) = target.cluster.map(|c| &c.lb) else {
        return plan;
    };
    if let Some(cookie) = balance::generate_cookie(&hash.key, rand::random()) {
        plan.hash = Some(cookie.hash);
        plan.set_cookie = HeaderValue::from_str(&cookie.set_cookie).ok();
    }
    plan
}

/// Answers with a response the proxy made for the route (its `x-trellis-reason` recorded).
fn answer(
    mut record: Record,
    response: Response<Body>,
    flags: &[&'static str],
) -> Response<Observed> {
    record.flags = policy::join_flags(flags);
    record.reason = response
        .headers()
        .get(X_TRELLIS_REASON)
        .and_then(|v| policy::route_reason(v.as_bytes()));
    record.respond(response)
}

/// Answers with the proxy's own response for `reason`, after the flags already raised (`DI`).
fn reply(mut record: Record, reason: Reason, earlier: &[&'static str]) -> Response<Observed> {
    let mut flags = earlier.to_vec();
    flags.push(reason.flag());
    record.flags = policy::join_flags(&flags);
    record.reason = Some(reason.code());
    record.respond(reason.response())
}

/// The request as every try sends it: the edited head, framed per try for its upstream.
struct Head {
    method: Method,
    path_and_query: String,
    authority: String,
    /// Without `Host` and hop-by-hop headers.
    headers: HeaderMap,
    downstream_version: Version,
}

impl Head {
    fn request(&self, body: Body, wire: Wire, meshed: bool) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        if let Ok(uri) = self.path_and_query.parse() {
            *req.uri_mut() = uri;
        }
        *req.headers_mut() = self.headers.clone();
        if let Ok(host) = HeaderValue::from_str(&self.authority) {
            req.headers_mut().insert(HOST, host);
        }
        if meshed {
            let app_version = if self.downstream_version == Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            };
            req.headers_mut()
                .insert(X_TRELLIS_APP_VERSION, HeaderValue::from_static(app_version));
        }
        let version = match wire {
            Wire::Http2 => Version::HTTP_2,
            Wire::Http1 => Version::HTTP_11,
        };
        headers::set_version(&mut req, version, &self.authority);
        req
    }
}

/// The route's request-side edits: rewrite, then header edits (the destination's, then the
/// route's, so the route's `set` wins as in Envoy's default ordering).
fn edit_head(plan: &Plan<'_>, head: &mut Head) {
    let Some(route) = plan.route else { return };
    if let Some(rewrite) = &route.rewrite {
        let (path, query) = match head.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (head.path_and_query.as_str(), None),
        };
        let path = route::rewrite_path(rewrite, plan.matched, path);
        head.path_and_query = match query {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        if let Some(authority) = &rewrite.authority {
            head.authority.clone_from(authority);
        }
    }
    if let Some(edits) = plan.destination_headers {
        policy::apply_edits(&mut head.headers, &edits.request);
    }
    policy::apply_edits(&mut head.headers, &route.headers.request);
}

/// Response-side edits and CORS headers, in the same order as the request's.
fn edit_response(plan: &Plan<'_>, cors_origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    let Some(route) = plan.route else { return };
    if let Some(edits) = plan.destination_headers {
        policy::apply_edits(headers, &edits.response);
    }
    policy::apply_edits(headers, &route.headers.response);
    if let (Some(cors), Some(origin)) = (&route.cors, cors_origin) {
        policy::add_cors_headers(cors, origin, headers);
    }
}

/// The request as routed: its normalised `authority` (the dialled address when it named none).
fn head_of(
    parts: http::request::Parts,
    authority: &Authority,
    dialled: SocketAddr,
    upgrading: bool,
) -> Head {
    let authority = if authority.is_empty() {
        dialled.to_string()
    } else {
        authority.as_str().to_owned()
    };
    let mut head = Head {
        authority,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        method: parts.method,
        headers: parts.headers,
        downstream_version: parts.version,
    };
    head.headers.remove(HOST);
    if upgrading {
        headers::strip_hop_by_hop_keep_upgrade(&mut head.headers);
    } else {
        headers::strip_hop_by_hop(&mut head.headers);
    }
    head.headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    head
}

async fn forward(
    connection: &Connection,
    config: &Arc<ProxyConfig>,
    record: Record,
    mut req: Request<Incoming>,
    authority: &Authority,
    plan: Plan<'_>,
) -> Response<Observed> {
    let state = &connection.state;
    let route = plan.route;
    let cors = route.and_then(|r| r.cors.as_ref());
    let cors_origin = cors.and_then(|cors| policy::allowed_origin(cors, req.headers()).cloned());
    if let (Some(cors), Some(origin)) = (cors, &cors_origin)
        && policy::is_preflight(req.method(), req.headers())
    {
        return answer(record, policy::preflight_response(cors, origin), &[]);
    }

    let mut flags: Vec<&'static str> = Vec::new();
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        // Envoy's fault filter: the delay first, then the abort, each drawn on its own.
        let decision = route::decide_fault(fault, rand::random(), rand::random());
        if let Some(delay_ms) = decision.delay_ms {
            flags.push(flags::DELAY_INJECTED);
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if let Some(status) = decision.abort {
            flags.push(flags::FAULT_INJECTED);
            let mut response = policy::abort_response(status);
            edit_response(&plan, cors_origin.as_ref(), response.headers_mut());
            return answer(record, response, &flags);
        }
    }

    let upgrading = upgrade::is_websocket(&req);
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let request_bytes = record.request_bytes();
    let (parts, body) = req.into_parts();
    let mut head = head_of(parts, authority, connection.dst, upgrading);
    edit_head(&plan, &mut head);
    let body = Counted::new(body, request_bytes)
        .map_err(Into::into)
        .boxed_unsync();

    if let Some(downstream_upgrade) = downstream_upgrade {
        return upgrade(
            state,
            config,
            record,
            &plan,
            &head,
            body,
            downstream_upgrade,
        )
        .await;
    }

    let default_retries = RetryPolicy::default();
    let retries = route.map_or(&default_retries, |r| &r.retries);
    let replay = ReplayBody::new(body);
    let tries = tries(state, config, &plan, &head, &replay, retries);
    // The route's timeout covers every try and backoff and the whole response, its body
    // included (Envoy's route timeout): before the headers it is a 504, after them the response
    // is cut. `x-envoy-upstream-rq-timeout-ms` from the application is not honoured. 0 means no
    // timeout, as in Istio and Envoy.
    let deadline = route
        .and_then(|r| r.timeout_ms)
        .filter(|ms| *ms > 0)
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let ended = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, tries)
            .await
            .unwrap_or_else(|_| Ended::unavailable(Reason::UpstreamTimeout)),
        None => tries.await,
    };
    if let Some(route) = route {
        mirror(&connection.state, config, route, &plan, &head, &replay);
    }
    let answer = Answered {
        plan: &plan,
        cors_origin: cors_origin.as_ref(),
        deadline,
    };
    respond(record, answer, flags, ended)
}

/// How a request that went upstream is answered.
struct Answered<'p, 'a> {
    plan: &'p Plan<'a>,
    /// The CORS origin to allow on the response.
    cors_origin: Option<&'p HeaderValue>,
    /// The route timeout's end, which the response body must meet too.
    deadline: Option<tokio::time::Instant>,
}

fn respond(
    mut record: Record,
    answered: Answered<'_, '_>,
    mut flags: Vec<&'static str>,
    ended: Ended,
) -> Response<Observed> {
    let Answered {
        plan,
        cors_origin,
        deadline,
    } = answered;
    record.upstream = ended.upstream;
    match &ended.security {
        Some((local, peer)) => {
            if *record.labels.source_principal != **local {
                record.labels.source_principal = local.as_str().into();
            }
            record.labels.destination_principal = peer.as_str().into();
            record.labels.connection_security_policy = values::mutual_tls();
        }
        None if ended.upstream.is_some() => {
            record.labels.connection_security_policy = values::plaintext();
        }
        None => {}
    }
    if ended.exhausted {
        flags.push(flags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
    }
    match ended.result {
        TryResult::Response(mut response) => {
            headers::strip_hop_by_hop(response.headers_mut());
            if ended.security.is_none() {
                headers::strip_internal(response.headers_mut());
            }
            edit_response(plan, cors_origin, response.headers_mut());
            if let Some(cookie) = &plan.set_cookie {
                response
                    .headers_mut()
                    .append(http::header::SET_COOKIE, cookie.clone());
            }
            record.flags = policy::join_flags(&flags);
            let admitted = ended.admitted;
            record.respond(response.map(|inner| {
                Admitted {
                    inner,
                    _guard: admitted,
                    deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                }
                .boxed_unsync()
            }))
        }
        TryResult::Failed(e) => {
            warn!(upstream = ?record.upstream, error = %e, "request failed");
            reply(record, Reason::of(&e), &flags)
        }
        TryResult::Unavailable(reason) => reply(record, reason, &flags),
    }
}

/// How the tries of a request ended.
struct Ended {
    result: TryResult,
    /// The last endpoint tried.
    upstream: Option<SocketAddr>,
    /// Local and peer SPIFFE IDs of the last try, when it used mutual TLS.
    security: Option<(String, String)>,
    /// Every allowed retry was used and the last try failed as well (`URX`).
    exhausted: bool,
    /// The last try's admission, held until its response body ends.
    admitted: Option<RequestGuard>,
}

impl Ended {
    fn unavailable(reason: Reason) -> Self {
        Self {
            result: TryResult::Unavailable(reason),
            upstream: None,
            security: None,
            exhausted: false,
            admitted: None,
        }
    }
}

/// A response body that keeps its request admitted on the cluster (`http2MaxRequests`, the
/// endpoint's in-flight count for `LEAST_REQUEST`) until the body ends or is dropped, and ends
/// in a [`RouteTimeout`] error when the route's timeout passes first.
struct Admitted {
    inner: Incoming,
    _guard: Option<RequestGuard>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for Admitted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Checked first, so a body that is always ready cannot outrun it.
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            return Poll::Ready(Some(Err(Box::new(RouteTimeout))));
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum TryResult {
    Response(Response<Incoming>),
    Failed(SendError),
    /// No try could be sent, or none answered in time.
    Unavailable(Reason),
}

/// The endpoint of one try: picked in the cluster (so its limits, balancing and outlier
/// detection apply), or the passthrough address.
struct Chosen<'a> {
    endpoint: Option<&'a Endpoint>,
    addr: SocketAddr,
    picked: Option<Picked<'a>>,
    /// The cluster's DestinationRule `tls` settings.
    tls: Option<&'a ClientTls>,
}

impl Chosen<'_> {
    fn pool<'p>(&'p self, state: &'p ProxyState) -> &'p Pool {
        self.picked.as_ref().map_or(&state.pool, Picked::pool)
    }

    fn connect_timeout(&self, state: &ProxyState) -> Duration {
        self.picked
            .as_ref()
            .map_or(state.connect_timeout, Picked::connect_timeout)
    }
}

/// Picks the endpoint of a try, avoiding `avoid` (hosts already tried) when the cluster has
/// another.
fn choose<'a>(
    state: &ProxyState,
    plan: &Plan<'a>,
    avoid: &[SocketAddr],
) -> Result<Chosen<'a>, Reason> {
    let (target, original) = match &plan.upstreams {
        Upstreams::Passthrough(addr) => {
            return Ok(Chosen {
                endpoint: None,
                addr: *addr,
                picked: None,
                tls: None,
            });
        }
        Upstreams::Cluster { target, original } => (target, *original),
    };
    let picked = match original {
        Some(dst) => state.upstreams.passthrough(target, dst),
        None => match state.upstreams.pick(target, plan.hash, avoid) {
            Ok(picked) => picked,
            // `PASSTHROUGH`: the service's VIP (which kube-proxy balances), else the address
            // the application dialled; still counted against the cluster.
            Err(PickError::Passthrough(_)) => {
                let vip = target.service.vips.first();
                let addr = vip.map(|vip| SocketAddr::new(*vip, target.port.port));
                let Some(addr) = addr.or(plan.dialled) else {
                    return Err(Reason::NoHealthyUpstream);
                };
                state.upstreams.passthrough(target, addr)
            }
            Err(PickError::NoHealthyUpstream(cluster)) => {
                debug!(cluster, "no healthy endpoint");
                return Err(Reason::NoHealthyUpstream);
            }
            Err(e @ PickError::Unresolved { .. }) => {
                warn!(error = %e, "no endpoint");
                return Err(Reason::NoHealthyUpstream);
            }
        },
    };
    Ok(Chosen {
        endpoint: picked.endpoint,
        addr: picked.addr,
        picked: Some(picked),
        tls: target.cluster.and_then(|c| c.tls.as_ref()),
    })
}

/// Sends the request, retrying as the route's policy says: a new endpoint per try (previous
/// ones avoided), retry admission (`maxRetries`), Envoy's jittered backoff between tries, and
/// only while the body can be replayed. Every try's outcome goes to outlier detection.
async fn tries(
    state: &ProxyState,
    config: &ProxyConfig,
    plan: &Plan<'_>,
    head: &Head,
    replay: &ReplayBody,
    retries: &RetryPolicy,
) -> Ended {
    let per_try = retries
        .per_try_timeout_ms
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let service = service_of(plan);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut ended = Ended::unavailable(Reason::NoHealthyUpstream);
    let mut body = replay.try_again();
    let mut retries_done = 0;
    // Held for the duration of a retry's try.
    let mut _retry_guard = None;
    while let Some(this_body) = body.take() {
        let chosen = match choose(state, plan, &tried) {
            Ok(chosen) => chosen,
            Err(reason) => {
                ended.result = TryResult::Unavailable(reason);
                return ended;
            }
        };
        // Replaces (and so releases) the previous try's admission.
        ended.admitted = match &chosen.picked {
            Some(picked) => match state.upstreams.admit_request(picked) {
                Ok(guard) => Some(guard),
                Err(overflow) => {
                    ended.result = TryResult::Failed(SendError::Overflow(overflow));
                    return ended;
                }
            },
            None => None,
        };
        tried.push(chosen.addr);
        ended.upstream = Some(chosen.addr);
        let upstream = match upstream(state, config, &chosen, service, head.downstream_version) {
            Ok(upstream) => upstream,
            Err(e) => {
                warn!(addr = %chosen.addr, error = format!("{e:#}"), "mutual TLS unavailable");
                ended.result = TryResult::Unavailable(Reason::UpstreamConnectFailure);
                return ended;
            }
        };
        ended.security = upstream
            .mesh
            .as_ref()
            .map(|(tls, peer)| (tls.local_id().to_string(), peer.clone()));
        let req = head.request(
            this_body.into_body(),
            upstream.wire,
            upstream.mesh.is_some(),
        );
        let sent = send_to_endpoint(chosen.pool(state), &upstream, req);
        let (outcome, result) = match per_try {
            Some(limit) => match tokio::time::timeout(limit, sent).await {
                Ok(sent) => classify(sent),
                Err(_) => (
                    Some(Outcome::PerTryTimeout),
                    TryResult::Unavailable(Reason::UpstreamTimeout),
                ),
            },
            None => classify(sent.await),
        };
        ended.result = result;
        // An overflow was never sent: answered at once, not retried.
        let Some(outcome) = outcome else { break };
        if let Some(picked) = &chosen.picked {
            state.upstreams.record(picked, outcome);
        }
        match retry::decide(retries, retries_done, outcome, rand::random()) {
            RetryDecision::Stop(Stop::Exhausted) => ended.exhausted = true,
            RetryDecision::Stop(Stop::Succeeded | Stop::NotRetriable) => {}
            RetryDecision::Retry { after } => {
                if let Some(picked) = &chosen.picked {
                    match state.upstreams.admit_retry(picked) {
                        Ok(guard) => _retry_guard = Some(guard),
                        Err(overflow) => {
                            debug!(%overflow, "retry budget exhausted: not retried");
                            break;
                        }
                    }
                }
                let Some(next) = replay.try_again() else {
                    debug!("request body too large to replay: not retried");
                    break;
                };
                debug!(addr = %chosen.addr, ?outcome, ?after, "retrying");
                // The failed try's response is dropped before the backoff.
                ended.result = TryResult::Unavailable(Reason::UpstreamReset);
                tokio::time::sleep(after).await;
                retries_done += 1;
                body = Some(next);
            }
        }
    }
    ended
}

/// The upstream service's hostname and declared protocol, when the request goes to a service.
fn service_of<'a>(plan: &Plan<'a>) -> Option<(&'a str, Protocol)> {
    match &plan.upstreams {
        Upstreams::Cluster { target, .. } => Some((target.hostname(), target.port.protocol)),
        Upstreams::Passthrough(_) => None,
    }
}

fn classify(sent: Result<Response<Incoming>, SendError>) -> (Option<Outcome>, TryResult) {
    match sent {
        Ok(response) => (
            Some(policy::response_outcome(
                response.status(),
                response.headers(),
            )),
            TryResult::Response(response),
        ),
        Err(e) => (policy::error_outcome(&e), TryResult::Failed(e)),
    }
}

/// An upgrade (WebSocket) request: one try on a connection of its own, no retries.
async fn upgrade(
    state: &ProxyState,
    config: &ProxyConfig,
    mut record: Record,
    plan: &Plan<'_>,
    head: &Head,
    body: Body,
    downstream_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<Observed> {
    let chosen = match choose(state, plan, &[]) {
        Ok(chosen) => chosen,
        Err(reason) => return record.reply(reason),
    };
    record.upstream = Some(chosen.addr);
    let service = service_of(plan);
    let upstream = match upstream(state, config, &chosen, service, head.downstream_version) {
        Ok(upstream) => upstream,
        Err(e) => {
            warn!(addr = %chosen.addr, error = format!("{e:#}"), "mutual TLS unavailable");
            return record.reply(Reason::UpstreamConnectFailure);
        }
    };
    match &upstream.mesh {
        Some((tls, peer)) => {
            record.labels.source_principal = tls.local_id().to_string().into();
            record.labels.destination_principal = peer.as_str().into();
            record.labels.connection_security_policy = values::mutual_tls();
        }
        None => record.labels.connection_security_policy = values::plaintext(),
    }
    // `Upgrade` and `Connection: upgrade` were kept; the upgrade crosses as HTTP/1.1.
    let req = head.request(body, Wire::Http1, upstream.mesh.is_some());
    let sent = match upstream.connect(MESH_ALPN).await {
        Ok(io) => pool::send_upgrade(io, req).await,
        Err(e) => Err(SendError::Connect(e)),
    };
    match sent {
        Ok(response) => upgrade::respond(
            record,
            downstream_upgrade,
            response,
            upstream.mesh.is_some(),
        ),
        Err(e) => record.fail(&e),
    }
}

/// Copies the request to the route's mirrors, fire and forget: after the main request has its
/// answer (so a mirror never delays or fails it), and only when the whole body was read and
/// kept (within the replay limit). The copy's authority ends in `-shadow`.
fn mirror(
    state: &Arc<ProxyState>,
    config: &Arc<ProxyConfig>,
    route: &HttpRoute,
    plan: &Plan<'_>,
    head: &Head,
    replay: &ReplayBody,
) {
    let mirrors = route::mirrors_for(&route.mirrors, rand::random);
    if mirrors.is_empty() {
        return;
    }
    let Some(body) = replay.complete() else {
        debug!("request body not kept whole: not mirrored");
        return;
    };
    let request_port = match &plan.upstreams {
        Upstreams::Cluster { target, .. } => target.port.port,
        Upstreams::Passthrough(addr) => addr.port(),
    };
    for mirror in mirrors {
        let shadow = Head {
            method: head.method.clone(),
            path_and_query: head.path_and_query.clone(),
            authority: policy::shadow_authority(&head.authority),
            headers: head.headers.clone(),
            downstream_version: head.downstream_version,
        };
        tokio::spawn(send_mirror(
            state.clone(),
            config.clone(),
            mirror.clone(),
            request_port,
            shadow,
            body.clone(),
        ));
    }
}

async fn send_mirror(
    state: Arc<ProxyState>,
    config: Arc<ProxyConfig>,
    mirror: Mirror,
    request_port: u16,
    shadow: Head,
    body: Bytes,
) {
    let Some(target) = route::resolve_target(
        &config,
        &mirror.host,
        &mirror.subset,
        mirror.port,
        request_port,
    ) else {
        debug!(host = mirror.host, "mirror destination has no service");
        return;
    };
    let plan = Plan::to(Upstreams::Cluster {
        target,
        original: None,
    });
    let Ok(chosen) = choose(&state, &plan, &[]) else {
        debug!(
            host = mirror.host,
            "mirror destination has no healthy endpoint"
        );
        return;
    };
    let service = service_of(&plan);
    let upstream = match upstream(&state, &config, &chosen, service, shadow.downstream_version) {
        Ok(upstream) => upstream,
        Err(e) => {
            debug!(addr = %chosen.addr, error = format!("{e:#}"), "mirror: mutual TLS unavailable");
            return;
        }
    };
    let body = Full::new(body)
        .map_err(|never| match never {})
        .boxed_unsync();
    let req = shadow.request(body, upstream.wire, upstream.mesh.is_some());
    match send_to_endpoint(chosen.pool(&state), &upstream, req).await {
        Ok(response) => {
            let status = response.status();
            // Read to the end so the pooled connection can be reused.
            let _ = response.into_body().collect().await;
            debug!(addr = %upstream.addr, %status, "mirror answered");
        }
        Err(e) => debug!(addr = %upstream.addr, error = %e, "mirror failed"),
    }
}

/// How the request reaches the chosen endpoint: mesh HTTP/2 to a meshed endpoint; otherwise
/// HTTP/2 (h2c) for `http2`/`grpc` ports, HTTP/1.1 for `http` ports, and the application's own
/// version where nothing is declared. `service`: the upstream's hostname and declared protocol.
fn upstream(
    state: &ProxyState,
    config: &ProxyConfig,
    chosen: &Chosen<'_>,
    service: Option<(&str, Protocol)>,
    downstream: Version,
) -> anyhow::Result<Upstream> {
    let addr = chosen.addr;
    let declared = service.map(|(_, protocol)| protocol);
    let origination = chosen
        .tls
        .filter(|tls| origination::originates(tls))
        .cloned();
    let mesh = if origination::mesh_tls_allowed(chosen.tls) {
        super::mesh_peer(state, config, chosen.endpoint, addr.port())?
            .map(|(tls, peer)| (tls, peer.to_owned()))
    } else {
        None
    };
    let wire = match (&mesh, declared) {
        (Some(_), _) | (None, Some(Protocol::Http2 | Protocol::Grpc)) => Wire::Http2,
        (None, Some(_)) => Wire::Http1,
        (None, None) if downstream == Version::HTTP_2 => Wire::Http2,
        (None, None) => Wire::Http1,
    };
    debug!(%addr, ?wire, meshed = mesh.is_some(), "upstream chosen");
    Ok(Upstream {
        addr,
        mesh,
        wire,
        hostname: service.map_or_else(String::new, |(host, _)| host.to_owned()),
        origination,
        connect_timeout: chosen.connect_timeout(state),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_route_to_their_service_or_pass_through_or_nowhere() {
        let config = |policy: &str| {
            ProxyConfig::from_json(
                format!(
                    r#"{{"version":"1","outboundTrafficPolicy":"{policy}","services":[{{
                    "hostnames":["reviews.default.svc.cluster.local"],"namespace":"default",
                    "vips":["10.96.0.20"],
                    "ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"http"}}],
                    "endpoints":[]}},{{
                    "hostnames":["api.example.com"],"namespace":"egress","vips":[],
                    "ports":[{{"name":"http","port":80,"targetPort":80,"protocol":"http"}}],
                    "endpoints":[]}}]}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let allow_any = config("ALLOW_ANY");
        let registry_only = config("REGISTRY_ONLY");
        let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let other: SocketAddr = "10.1.1.1:80".parse().unwrap();
        let hostname = |route: Route<'_>| match route {
            Route::Service(found) => found.hostname().to_owned(),
            Route::Passthrough(addr) => format!("passthrough {addr}"),
            Route::OutsideRegistry => "none".to_owned(),
        };
        let other_port: SocketAddr = "10.1.1.1:8080".parse().unwrap();
        // (config, address dialled, authority) → where the request goes
        let table = [
            (&allow_any, vip, "", "reviews.default.svc.cluster.local"),
            (&registry_only, vip, "", "reviews.default.svc.cluster.local"),
            // The address decides before the authority.
            (
                &registry_only,
                vip,
                "api.example.com",
                "reviews.default.svc.cluster.local",
            ),
            (&allow_any, other, "", "passthrough 10.1.1.1:80"),
            (&registry_only, other, "", "none"),
            // A service without addresses, by its name on its port.
            (&registry_only, other, "api.example.com", "api.example.com"),
            (&allow_any, other, "api.example.com:80", "api.example.com"),
            (&registry_only, other_port, "api.example.com:8080", "none"),
            (&registry_only, other, "www.example.com", "none"),
        ];
        for (config, dst, authority, expected) in table {
            assert_eq!(
                hostname(route(config, dst, authority)),
                expected,
                "{dst} {authority}"
            );
        }
    }

    fn head(path_and_query: &str, headers: &[(&str, &str)]) -> Head {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Head {
            method: Method::GET,
            path_and_query: path_and_query.to_owned(),
            authority: "reviews:80".to_owned(),
            headers: map,
            downstream_version: Version::HTTP_11,
        }
    }

    #[test]
    fn request_edits_rewrite_then_apply_destination_then_route_headers() {
        let route: HttpRoute = serde_json::from_value(serde_json::json!({
            "matches": [{"uri": {"prefix": "/old/"}}],
            "action": {"route": [{"host": "reviews", "weight": 1}]},
            "rewrite": {"uri": "/new/", "authority": "rewritten:8080"},
            "headers": {"request": {"set": {"x-both": "route"}, "remove": ["x-dest-only"]},
                        "response": {"set": {"x-both": "route"}}}
        }))
        .unwrap();
        let destination: Headers = serde_json::from_value(serde_json::json!({
            "request": {"set": {"x-both": "destination", "x-dest-only": "d", "x-kept": "k"}},
            "response": {"set": {"x-both": "destination", "x-resp": "r"}}
        }))
        .unwrap();
        let plan = Plan {
            route: Some(&route),
            destination_headers: Some(&destination),
            matched: route.matches.first(),
            ..Plan::to(Upstreams::Passthrough("127.0.0.1:80".parse().unwrap()))
        };
        let cases = [
            ("/old/a?x=1&y", "/new/a?x=1&y"),
            ("/old/", "/new/"),
            ("/old/a/b", "/new/a/b"),
        ];
        for (path, expected) in cases {
            let mut edited = head(path, &[("x-both", "app")]);
            edit_head(&plan, &mut edited);
            assert_eq!(edited.path_and_query, expected);
            assert_eq!(edited.authority, "rewritten:8080");
            let h = &edited.headers;
            assert_eq!(h["x-both"], "route", "the route's set wins");
            assert_eq!(h["x-kept"], "k");
            assert!(
                !h.contains_key("x-dest-only"),
                "the route removes after the destination"
            );
        }
        let mut response = HeaderMap::new();
        let origin = HeaderValue::from_static("https://shop.example");
        edit_response(&plan, Some(&origin), &mut response);
        assert_eq!(response["x-both"], "route");
        assert_eq!(response["x-resp"], "r");
        assert!(
            !response.contains_key("access-control-allow-origin"),
            "no CORS policy, no CORS headers"
        );
        let default_route = Plan::to(Upstreams::Passthrough("127.0.0.1:80".parse().unwrap()));
        let mut untouched = head("/old/a", &[("x-both", "app")]);
        edit_head(&default_route, &mut untouched);
        assert_eq!(untouched.path_and_query, "/old/a");
        assert_eq!(untouched.headers["x-both"], "app");
    }
}
