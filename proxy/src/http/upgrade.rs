//! Which tunnels the proxy opens, and the splice behind one.
//!
//! A tunnel carries bytes the proxy no longer reads as requests: whatever crosses it after the
//! one request that opened it is neither routed nor authorized. So only what needs one gets one:
//! * an HTTP/1.1 `Upgrade` is honoured for WebSocket alone ([`is_websocket`]: the one token
//!   `websocket`, any case, with `Connection: upgrade`). Any other token, `h2c` above all (an
//!   `h2c` tunnel would carry HTTP/2 requests straight to the application, past every
//!   per-request AuthorizationPolicy: "h2c smuggling"), is not an upgrade: the request goes on as
//!   a plain one, its `Upgrade`, `Connection` and `HTTP2-Settings` removed with the other
//!   hop-by-hop headers, so the application never sees the offer;
//! * `CONNECT` ([`is_connect`], either HTTP version) is refused with `405` (reason
//!   `connect_not_allowed`); there is no setting that allows it, as Istio has no API for it.
//!
//! After a `101 Switching Protocols` has gone back to the downstream, the two upgraded streams
//! (downstream connection, upstream connection) are spliced until both directions end.

use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::headers;
use super::telemetry::Record;
use super::telemetry::body::Observed;

/// Whether a request asks for the one upgrade the proxy carries: an HTTP/1.1 `Upgrade` to
/// `websocket` alone, with `Connection: upgrade`.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    let mut offered = headers::tokens(headers, &UPGRADE);
    let websocket_only = offered
        .next()
        .is_some_and(|token| token.eq_ignore_ascii_case("websocket"))
        && offered.next().is_none();
    req.version() == Version::HTTP_11
        && websocket_only
        && headers::tokens(headers, &CONNECTION).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// Whether a request asks for a `CONNECT` tunnel (refused, see the module doc).
pub fn is_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
}

/// Passes the upstream's answer to an upgrade request back: a `101` with its upgrade headers,
/// the two connections spliced once both sides have switched; anything else as a response.
/// Internal headers are kept only from a sidecar met over mesh mutual TLS (`from_mesh_peer`).
pub fn respond(
    record: Record,
    downstream: OnUpgrade,
    mut response: Response<Incoming>,
    from_mesh_peer: bool,
) -> Response<Observed> {
    if !from_mesh_peer {
        headers::strip_internal(response.headers_mut());
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        splice(downstream, hyper::upgrade::on(&mut response));
        headers::strip_hop_by_hop_keep_upgrade(response.headers_mut());
    } else {
        headers::strip_hop_by_hop(response.headers_mut());
    }
    record.respond(response.map(|b| b.map_err(Into::into).boxed_unsync()))
}

/// Spawns the splice of the downstream's and the upstream's upgraded connections.
fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
            Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::new(());
        *req.version_mut() = version;
        for (name, value) in headers {
            req.headers_mut().append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        req
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        // (version, headers, whether it is the WebSocket upgrade)
        type Case<'a> = (Version, &'a [(&'a str, &'a str)], bool);
        let table: &[Case] = &[
            (
                HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
            ),
            (
                HTTP_11,
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "WebSocket"),
                ],
                true,
            ),
            (
                HTTP_11,
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                ],
                false,
            ),
            (
                HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "websocket, h2c")],
                false,
            ),
            (
                HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "h2c, websocket")],
                false,
            ),
            (
                HTTP_11,
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                    ("upgrade", "h2c"),
                ],
                false,
            ),
            (
                HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "tls/1.2")],
                false,
            ),
            (HTTP_11, &[("upgrade", "websocket")], false),
            (HTTP_11, &[("connection", "Upgrade")], false),
            (
                HTTP_2,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                false,
            ),
        ];
        for (version, headers, expected) in table {
            assert_eq!(
                is_websocket(&request(*version, headers)),
                *expected,
                "{version:?} {headers:?}"
            );
        }
    }

    #[test]
    fn connect_is_recognised_in_either_version() {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let mut req = request(version, &[]);
            assert!(!is_connect(&req));
            *req.method_mut() = Method::CONNECT;
            assert!(is_connect(&req), "{version:?}");
        }
    }
}
