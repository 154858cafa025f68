//! The HTTP (L7) pieces that inbound and outbound share once a connection is known to carry HTTP
//! (declared by its service port, or sniffed). The request paths themselves live with their
//! listeners: [`crate::outbound::http`] (the application's requests, sent per request to an
//! endpoint chosen per request, over pooled mutual TLS speaking HTTP/2
//! ([`trellis_config::proxy::MESH_H2_ALPN`]) to a meshed endpoint, plaintext HTTP/1.1 keep-alive
//! or h2c otherwise) and [`crate::inbound::http`] (requests after the PeerAuthentication decision
//! and TLS termination, authorized and forwarded to the application over a pooled connection).
//!
//! - [`pool`]: the upstream connections, one HTTP/2 connection or a set of idle HTTP/1.1 ones
//!   per endpoint.
//! - [`reply`]: the responses the proxy generates itself, each with a machine-readable reason.
//! - [`telemetry`]: Istio request metrics and the JSON access log, one record per request, and
//!   the body wrappers that finish the record when the response body ends.
//! - [`policy`]: a VirtualService route's header edits, CORS, fault/redirect/direct responses
//!   and retry outcomes, as pure functions; [`replay`]: request bodies retries can send again.
//! - [`headers`], [`rewind`], [`upgrade`]: the pieces the above share.

pub mod headers;
pub mod policy;
pub mod pool;
pub mod replay;
pub mod reply;
pub mod rewind;
pub mod telemetry;
pub mod upgrade;

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use tracing::debug;
use trellis_config::proxy::Protocol;

use crate::limits;
use crate::state::ProxyState;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends, forwarded or generated.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Whether a declared port protocol is served as HTTP (`tcp` and `tls` stay opaque).
pub fn is_http(protocol: Protocol) -> bool {
    match protocol {
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Tcp | Protocol::Tls => false,
    }
}

/// Serves one downstream connection as HTTP/1.1 or HTTP/2 (detected from its first bytes),
/// upgrades allowed, under the current config's listener limits ([`crate::limits`]) until it
/// closes; when the drain starts, the connection is shut down gracefully (in-flight requests
/// finish, HTTP/2 gets a GOAWAY).
pub async fn serve_connection<I, S>(state: &ProxyState, io: I, service: S, direction: &str)
where
    I: pool::Io,
    S: Service<
            Request<Incoming>,
            Response = Response<telemetry::body::Observed>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let config = state.current_config();
    let result = limits::serve_http(
        &config.limits,
        limits::Protocols::Any,
        io,
        service,
        state.drain.started(),
    )
    .await;
    if let Err(e) = result {
        debug!(direction, error = %e, "HTTP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_ports_are_http_http2_and_grpc() {
        for (protocol, http) in [
            (Protocol::Http, true),
            (Protocol::Http2, true),
            (Protocol::Grpc, true),
            (Protocol::Tcp, false),
            (Protocol::Tls, false),
        ] {
            assert_eq!(is_http(protocol), http, "{protocol:?}");
        }
    }
}
