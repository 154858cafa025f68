//! External authorization: AuthorizationPolicy action CUSTOM. Before DENY and ALLOW policies
//! look at an HTTP request, every external authorizer whose CUSTOM policy matches it
//! ([`crate::authz::custom_checks`]) is asked, in policy order, with Envoy's ext_authz
//! protocols — [`http`] (a plain HTTP request) or [`grpc`]
//! (`envoy.service.auth.v3.Authorization/Check`). This module owns the outcome of one check:
//!
//! * allowed: the authorizer's header changes are applied to the request, which goes on to the
//!   next authorizer, then to DENY and ALLOW policies (which see the changed headers, as
//!   Envoy's RBAC filters after its ext_authz filter do);
//! * denied: the client gets the authorizer's status, headers and body (response flag `UAEX`);
//! * failed — unreachable, past the provider's `timeout`, an HTTP 5xx or a gRPC error: denied
//!   with the provider's `statusOnError` (default 403, flag `UAEX`), unless the provider is
//!   `failOpen`, which lets the request go on as if allowed.
//!
//! Fail closed is the default at every step: a check that cannot be completed never allows.
//! Every denial counts in `trellis_authorization_denied_total{policy}` under the CUSTOM
//! policy's name. The authorizer is dialled directly, in plaintext (the proxy's own traffic is
//! not captured); connections are kept and reused per provider address.

pub(crate) mod client;
mod grpc;
mod http;

use std::net::SocketAddr;
use std::time::Duration;

use ::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use ::http::{HeaderMap, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tracing::{info, warn};
use trellis_config::authz::CustomPolicy;
use trellis_config::ext_authz::{ExtAuthzProtocol, ExtAuthzProvider};

use crate::http::Body;
use crate::http::headers::{self, X_TRELLIS_REASON};
use crate::http::telemetry::Record;
use crate::http::telemetry::body::Observed;
use crate::metrics::flags;
use crate::state::ProxyState;

/// The largest authorizer response body passed on to a denied client; a longer one fails the
/// check (Envoy buffers it whole; a bound keeps a misbehaving authorizer from filling memory).
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// The connection facts the authorizer is told (Envoy's `AttributeContext` source and
/// destination).
#[derive(Debug, Clone, Copy)]
pub struct Peers<'a> {
    pub source: SocketAddr,
    /// The verified peer's SPIFFE ID (`spiffe://...`); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    pub destination: SocketAddr,
    pub destination_principal: &'a str,
}

/// A request the authorizers refused, answered to the client by [`Denial::respond`].
#[derive(Debug)]
pub struct Denial(Response<Body>);

impl Denial {
    pub fn respond(self, mut record: Record) -> Response<Observed> {
        record.flags = flags::UNAUTHORIZED_EXTERNAL_SERVICE;
        record.respond(self.0)
    }
}

/// What one authorizer answered.
enum Answer {
    /// Allowed; the header changes to make to the request.
    Allow(HeaderChanges),
    /// Denied with this response to the client.
    Deny(Response<Body>),
}

/// How an allowed request's headers change, applied in this order: removed, set (replacing
/// every value), appended, added where absent, replaced where present.
#[derive(Debug, Default)]
struct HeaderChanges {
    remove: Vec<HeaderName>,
    set: HeaderMap,
    append: HeaderMap,
    add_if_absent: Vec<(HeaderName, HeaderValue)>,
    overwrite_if_exists: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderChanges {
    fn apply(self, headers: &mut HeaderMap) {
        for name in self.remove {
            headers.remove(name);
        }
        for name in self.set.keys() {
            headers.remove(name);
        }
        for (name, value) in self.set.iter().chain(&self.append) {
            headers.append(name.clone(), value.clone());
        }
        for (name, value) in self.add_if_absent {
            headers.entry(name).or_insert(value);
        }
        for (name, value) in self.overwrite_if_exists {
            if headers.contains_key(&name) {
                headers.insert(name, value);
            }
        }
        // The authorizer does not speak for the proxy.
        headers::strip_internal(headers);
    }
}

/// Asks the authorizer of each of `checks` (once per provider) about `req`, whose path is
/// already normalised; applies what allowing authorizers change. `Err` is the response the
/// client gets.
pub async fn authorize<B>(
    state: &ProxyState,
    checks: &[&CustomPolicy],
    peers: &Peers<'_>,
    req: &mut Request<B>,
) -> Result<(), Denial> {
    let mut asked: Vec<&str> = Vec::new();
    for check in checks {
        let provider = &check.provider;
        if asked.contains(&provider.name.as_str()) {
            continue;
        }
        asked.push(&provider.name);
        let timeout = Duration::from_millis(provider.timeout_ms);
        let answer = match tokio::time::timeout(timeout, ask(state, provider, peers, req)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let policy = check.policy.name.as_str();
        match answer {
            Ok(Answer::Allow(changes)) => changes.apply(req.headers_mut()),
            Ok(Answer::Deny(response)) => {
                state.metrics.count_denied(policy);
                info!(
                    peer = %peers.source, provider = %provider.name, policy,
                    status = response.status().as_u16(), path = req.uri().path(),
                    "request denied by the external authorizer"
                );
                return Err(Denial(response));
            }
            Err(error) if provider.fail_open => {
                warn!(
                    provider = %provider.name, policy, %error,
                    "external authorizer check failed; failOpen lets the request through"
                );
            }
            Err(error) => {
                state.metrics.count_denied(policy);
                warn!(
                    peer = %peers.source, provider = %provider.name, policy, %error,
                    "external authorizer check failed; the request is denied"
                );
                return Err(Denial(error_response(provider.status_on_error)));
            }
        }
    }
    Ok(())
}

/// One check with one provider; `Err` says why it failed.
async fn ask<B>(
    state: &ProxyState,
    provider: &ExtAuthzProvider,
    peers: &Peers<'_>,
    req: &Request<B>,
) -> Result<Answer, String> {
    match &provider.protocol {
        ExtAuthzProtocol::Http(check) => {
            let client = state.ext_authz.http(state.connect_timeout);
            http::check(client, provider, check, req).await
        }
        ExtAuthzProtocol::Grpc => {
            let channel = state.ext_authz.grpc(provider, state.connect_timeout)?;
            grpc::check(channel, peers, req).await
        }
    }
}

/// The authorizer's denial as the client gets it: `status` (403 when the authorizer gave none
/// that is valid), its headers but hop-by-hop and internal ones, and its body.
fn denial_response(status: u16, mut headers: HeaderMap, body: Bytes) -> Response<Body> {
    headers::strip_hop_by_hop(&mut headers);
    headers::strip_internal(&mut headers);
    headers.remove(::http::header::CONTENT_LENGTH);
    headers.remove(::http::header::HOST);
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or(StatusCode::FORBIDDEN);
    *response.headers_mut() = headers;
    response
}

/// The proxy's own answer to a failed check: `statusOnError`, empty like Envoy's.
fn error_response(status: u16) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        X_TRELLIS_REASON,
        HeaderValue::from_static("ext_authz_error"),
    );
    response
}

fn full(body: Bytes) -> Body {
    Full::from(body)
        .map_err(|never| match never {})
        .boxed_unsync()
}
