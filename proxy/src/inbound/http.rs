//! Inbound HTTP: after the PeerAuthentication decision and TLS termination (`crate::inbound`),
//! the connection is served as HTTP (HTTP/1.1 or HTTP/2; the mesh HTTP/2 inside mutual TLS) and
//! each request is forwarded to the application on `127.0.0.1:<port>` from
//! [`inbound_source`](super::inbound_source) over a pooled connection in the port's declared protocol.
//!
//! Before a request is forwarded, in this order:
//! 1. identity headers are made unforgeable: a client-supplied `x-forwarded-client-cert` is
//!    always removed, and set from the verified peer certificate when there is one (as Envoy
//!    does);
//! 2. the path is normalised once with [`crate::path::normalize`] (`400 invalid_path` when it
//!    cannot be), and the normalised path is what is both authorized and forwarded;
//! 3. the workload's AuthorizationPolicies decide ([`crate::authz::evaluate`]); a denial is
//!    answered `403 RBAC: access denied`.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tracing::info;
use trellis_config::proxy::Protocol;

use super::inbound_source;
use crate::authz::{self, ConnectionAttributes, HttpAttributes, Verdict};
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
use crate::{forward, path};

/// Where the application listens, as in Istio's inbound forwarding.
const APP_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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
        let headers = req.headers_mut();
        record.request_id = headers::ensure_request_id(headers);
        let app_version = headers.remove(X_TRELLIS_APP_VERSION);
        headers.remove(X_FORWARDED_CLIENT_CERT);
        if let Some(xfcc) = self.forwarded_client_cert() {
            headers.insert(X_FORWARDED_CLIENT_CERT, xfcc);
        }
        if !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        if let Err(reason) = self.admit(&mut req) {
            return record.reply(reason);
        }

        let app = SocketAddr::new(APP_HOST, self.dst.port());
        record.upstream = Some(app);
        let upgrading = headers::is_upgrade(&req);
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
                Ok(response) => upgrade::respond(record, downstream_upgrade, response),
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
                record.respond(response.map(|b| b.map_err(Into::into).boxed_unsync()))
            }
            Err(e) => record.fail(&e),
        }
    }

    /// Normalises the request's path in place and authorizes the request.
    fn admit(&self, req: &mut Request<Incoming>) -> Result<(), Reason> {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let normalized = match path::normalize(target) {
            Ok(normalized) => normalized,
            Err(e) => {
                info!(peer = %self.peer, target, error = %e, "request path refused");
                return Err(Reason::InvalidPath);
            }
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = normalized.path_and_query().parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        let config = self.state.current_config();
        let connection = ConnectionAttributes {
            source_ip: self.peer.ip(),
            source_principal: self.peer_principal.as_deref(),
            destination_port: self.dst.port(),
            sni: self.sni.as_deref(),
        };
        let authority = headers::authority(req).unwrap_or_default();
        let request = HttpAttributes {
            method: req.method().as_str(),
            path: &normalized.path,
            authority: &authority,
            host: host_without_port(&authority),
            headers: req.headers(),
        };
        match authz::evaluate(&config.inbound.authorization, &connection, Some(&request)) {
            Verdict::Allow => Ok(()),
            Verdict::Deny { policy } => {
                self.state.metrics.count_denied(&policy);
                info!(
                    peer = %self.peer, source_principal = ?self.peer_principal,
                    method = request.method, path = request.path, policy,
                    "request denied by AuthorizationPolicy"
                );
                Err(Reason::RbacAccessDenied)
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
        let stream = forward::connect(
            app,
            Some(inbound_source(app.ip())),
            self.state.connect_timeout,
        )
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the application on {app}: {e}"))?;
        Ok(Box::new(stream))
    }
}

/// `host` of `host:port` (`[v6]` of `[v6]:port`).
fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port() {
        for (authority, host) in [
            ("reviews:9080", "reviews"),
            ("reviews", "reviews"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("", ""),
        ] {
            assert_eq!(host_without_port(authority), host, "{authority}");
        }
    }
}
