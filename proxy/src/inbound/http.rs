//! Inbound HTTP: after the PeerAuthentication decision and TLS termination (`crate::inbound`),
//! the connection is served as HTTP (HTTP/1.1 or HTTP/2; the mesh HTTP/2 inside mutual TLS) and
//! each request is forwarded to the application on the address it was sent to (the pod's,
//! [`super::connect_app`]) over a pooled connection in the port's declared protocol.
//!
//! Before a request is forwarded, in this order:
//! 1. `CONNECT` is refused and only a WebSocket upgrade is honoured ([`crate::http::upgrade`]);
//! 2. identity and internal headers are made unforgeable: a client-supplied
//!    `x-forwarded-client-cert` is always removed, and set from the verified peer certificate
//!    when there is one (as Envoy does); every `x-trellis-*` header is removed, the application
//!    version a peer sidecar tells being read first, and only over mesh mutual TLS;
//! 3. the path is normalised once with [`crate::path::normalize`] (`400 invalid_path` when it
//!    cannot be), and the authority with [`crate::host::Authority`]; the normalised forms are
//!    what is both authorized and forwarded;
//! 4. the workload's RequestAuthentications verify the request's JWTs ([`crate::authn`]); a
//!    token that fails is answered `401`, and a verified one's principal and claims are what
//!    the policies below see;
//! 5. the external authorizers of the CUSTOM policies the request matches are asked
//!    ([`crate::ext_authz`]), then the other AuthorizationPolicies decide
//!    ([`crate::authz::evaluate`]); a policy's denial is answered `403 RBAC: access denied`, an
//!    authorizer's with its own response.
//!
//! The application's `x-trellis-*` response headers are removed too: only the proxy speaks them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tracing::info;
use trellis_config::proxy::Protocol;

use super::inbound_source;
use crate::authn::{self, Authenticated};
use crate::authz::{self, ConnectionAttributes, HttpAttributes, Verdict};
use crate::host::Authority;
use crate::http::headers::{
    self, X_FORWARDED_CLIENT_CERT, X_FORWARDED_PROTO, X_TRELLIS_APP_VERSION,
};
use crate::http::pool::{self, BoxedIo, Io, Key, SendError, Wire};
use crate::http::reply::Reason;
use crate::http::telemetry::Record;
use crate::http::telemetry::body::{Counted, Observed};
use crate::http::upgrade;
use crate::metrics::TcpLabels;
use crate::state::ProxyState;
use crate::{ext_authz, path};

/// One inbound HTTP connection, as the connection handler learned it.
pub struct Connection {
    pub state: Arc<ProxyState>,
    pub peer: SocketAddr,
    /// The workload's address and port the connection was for.
    pub dst: SocketAddr,
    /// The connection's metric labels (reporter `destination`, principals, security policy).
    pub labels: TcpLabels,
    /// The SPIFFE ID of the verified peer certificate; `None` for plaintext.
    pub peer_principal: Option<String>,
    /// The TLS server name the peer asked for; `None` for plaintext.
    pub sni: Option<String>,
    /// The port's declared protocol, when a local service port declares one.
    pub declared: Option<Protocol>,
}

impl Connection {
    /// Serves `io` (plaintext, or decrypted mutual TLS) as HTTP until it closes.
    pub async fn serve(self, io: impl Io) {
        let state = self.state.clone();
        let connection = Arc::new(self);
        let service = service_fn(move |req| {
            let connection = connection.clone();
            // Boxed here, once: hyper's HTTP/2 server moves a stream's future into the task
            // it spawns, and this future is large (callgrind: 3 % fewer instructions a request
            // on the mesh's inbound side).
            Box::pin(async move { Ok::<_, Infallible>(connection.proxy(req).await) })
        });
        crate::http::serve_connection(&state, io, service, "inbound").await;
    }

    async fn proxy(&self, mut req: Request<Incoming>) -> Response<Observed> {
        let mut record = Record::start(self.state.clone(), self.labels.clone(), &req, self.peer);
        if upgrade::is_connect(&req) {
            info!(peer = %self.peer, "CONNECT refused");
            return record.reply(Reason::ConnectNotAllowed);
        }
        let headers = req.headers_mut();
        record.request_id = headers::ensure_request_id(headers);
        // Only a peer sidecar, over mesh mutual TLS, may tell the application's version.
        let app_version = self
            .peer_principal
            .is_some()
            .then(|| headers.get(X_TRELLIS_APP_VERSION).cloned())
            .flatten();
        headers::strip_internal(headers);
        headers.remove(X_FORWARDED_CLIENT_CERT);
        if let Some(xfcc) = self.forwarded_client_cert() {
            headers.insert(X_FORWARDED_CLIENT_CERT, xfcc);
        }
        if !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        match self.admit(&mut req).await {
            Ok(()) => {}
            Err(Refused::Proxy(reason)) => return record.reply(reason),
            Err(Refused::Authorizer(denial)) => return denial.respond(record),
        }

        let app = self.dst;
        record.upstream = Some(app);
        let upgrading = upgrade::is_websocket(&req);
        let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let wire = self.app_wire(app_version.as_ref(), req.version());
        let request_bytes = record.request_bytes();
        let mut req = req.map(|body| {
            Counted::new(body, request_bytes)
                .map_err(Into::into)
                .boxed_unsync()
        });
        let fallback_authority = self.dst.to_string();

        if let Some(downstream_upgrade) = downstream_upgrade {
            headers::strip_hop_by_hop_keep_upgrade(req.headers_mut());
            headers::set_version(&mut req, Version::HTTP_11, &fallback_authority);
            let sent = match self.connect_app(app).await {
                Ok(io) => pool::send_upgrade(io, req).await,
                Err(e) => Err(SendError::Connect(e)),
            };
            return match sent {
                Ok(response) => upgrade::respond(record, downstream_upgrade, response, false),
                Err(e) => record.fail(&e),
            };
        }

        headers::strip_hop_by_hop(req.headers_mut());
        let version = match wire {
            Wire::Http2 => Version::HTTP_2,
            Wire::Http1 => Version::HTTP_11,
        };
        headers::set_version(&mut req, version, &fallback_authority);
        let key = Key {
            addr: app,
            source: Some(inbound_source(app.ip())),
            peer: None,
            wire,
        };
        match self
            .state
            .pool
            .send(&key, req, || self.connect_app(app))
            .await
        {
            Ok(mut response) => {
                headers::strip_hop_by_hop(response.headers_mut());
                headers::strip_internal(response.headers_mut());
                record.respond(response.map(|b| b.map_err(Into::into).boxed_unsync()))
            }
            Err(e) => record.fail(&e),
        }
    }

    /// Normalises the request's path and authority in place and authorizes the request.
    async fn admit(&self, req: &mut Request<Incoming>) -> Result<(), Refused> {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let normalized = match path::normalize(target) {
            Ok(normalized) => normalized,
            Err(e) => {
                info!(peer = %self.peer, target, error = %e, "request path refused");
                return Err(Refused::Proxy(Reason::InvalidPath));
            }
        };
        let authority = Authority::parse(&headers::authority(req).unwrap_or_default());
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = normalized.path_and_query().parse().ok();
        if parts.authority.is_some()
            && let Ok(normalized) = authority.as_str().parse()
        {
            parts.authority = Some(normalized);
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        if req.headers().contains_key(HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(HOST, host);
        }
        let config = self.state.current_config();
        let auth = authn::admit(&self.state.authenticators, &config, req, self.peer)
            .map_err(Refused::Proxy)?;
        let connection = ConnectionAttributes {
            source_ip: self.peer.ip(),
            source_principal: self.peer_principal.as_deref(),
            destination_port: self.dst.port(),
            sni: self.sni.as_deref(),
        };
        let checks = authz::custom_checks(
            &config.inbound.authorization,
            &connection,
            &attributes(req, &normalized.path, &authority, auth.as_ref()),
        );
        if !checks.is_empty() {
            let peers = ext_authz::Peers {
                source: self.peer,
                source_principal: self.peer_principal.as_deref(),
                destination: self.dst,
                destination_principal: &self.labels.destination_principal,
            };
            ext_authz::authorize(&self.state, &checks, &peers, req)
                .await
                .map_err(Refused::Authorizer)?;
        }
        // After the authorizers, whose header changes the policies see.
        let request = attributes(req, &normalized.path, &authority, auth.as_ref());
        match authz::evaluate(&config.inbound.authorization, &connection, Some(&request)) {
            Verdict::Allow => Ok(()),
            Verdict::Deny { policy } => {
                self.state.metrics.count_denied(&policy);
                info!(
                    peer = %self.peer, source_principal = ?self.peer_principal,
                    method = request.method, path = request.path, policy,
                    "request denied by AuthorizationPolicy"
                );
                Err(Refused::Proxy(Reason::RbacAccessDenied))
            }
        }
    }

    /// `By=<this workload>;URI=<verified peer>`, Envoy's format for a SPIFFE peer.
    fn forwarded_client_cert(&self) -> Option<HeaderValue> {
        let peer = self.peer_principal.as_deref()?;
        let value = format!("By={};URI={peer}", self.labels.destination_principal);
        HeaderValue::from_str(&value).ok()
    }

    /// The application's protocol: the declared one; else the one the client application
    /// spoke (told by the peer sidecar over the mesh hop), else this connection's.
    fn app_wire(&self, app_version: Option<&HeaderValue>, version: Version) -> Wire {
        match self.declared {
            Some(Protocol::Http2 | Protocol::Grpc) => Wire::Http2,
            Some(Protocol::Http | Protocol::Tcp | Protocol::Tls) => Wire::Http1,
            None => match app_version.map(HeaderValue::as_bytes) {
                Some(b"HTTP/2") => Wire::Http2,
                Some(_) => Wire::Http1,
                None if version == Version::HTTP_2 => Wire::Http2,
                None => Wire::Http1,
            },
        }
    }

    async fn connect_app(&self, app: SocketAddr) -> anyhow::Result<BoxedIo> {
        let stream = super::connect_app(app, self.state.connect_timeout)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the application on {app}: {e}"))?;
        Ok(Box::new(stream))
    }
}

/// Why [`Connection::admit`] refused a request.
enum Refused {
    Proxy(Reason),
    /// An external authorizer (CUSTOM policy) denied it, or could not be asked.
    Authorizer(ext_authz::Denial),
}

/// The request's attributes as AuthorizationPolicies see them.
fn attributes<'a>(
    req: &'a Request<Incoming>,
    path: &'a str,
    authority: &'a Authority,
    auth: Option<&'a Authenticated>,
) -> HttpAttributes<'a> {
    HttpAttributes {
        method: req.method().as_str(),
        path,
        authority: authority.as_str(),
        host: authority.host(),
        headers: req.headers(),
        auth,
    }
}
