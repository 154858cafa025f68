//! Responses the proxy generates itself. Each carries a machine-readable reason: the Envoy
//! response flag (metrics, access log) and an `x-trellis-reason` header in snake_case, with a
//! one-line text body, so a proxy-made 503 is never mistaken for the application's.

use http::header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;
use super::headers::X_TRELLIS_REASON;
use super::pool::SendError;
use crate::metrics::flags;

/// Why the proxy answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The service's VirtualService has no route the request matches (Envoy's 404 `NR`).
    NoRoute,
    /// Under `outboundTrafficPolicy: REGISTRY_ONLY`, neither the address nor the authority is a
    /// service of the registry (Istio answers 502 from its `BlackHoleCluster`).
    NotInRegistry,
    /// The service port has no ready endpoint.
    NoHealthyUpstream,
    /// Connecting to the endpoint failed, its mutual TLS handshake included.
    UpstreamConnectFailure,
    /// The upstream reset or closed the connection before the response headers.
    UpstreamReset,
    /// The request path cannot be normalised safely (`crate::path`).
    InvalidPath,
    /// An AuthorizationPolicy denied the request.
    RbacAccessDenied,
    /// A JWT in the request failed its RequestAuthentication rule (`crate::authn`).
    JwtAuthenticationFailed,
    /// The route's timeout passed before the upstream answered (every try included).
    UpstreamTimeout,
    /// The chosen route destination names a host no service of the config has.
    NoCluster,
    /// A circuit breaker of the cluster (`connectionPool` limit) refused the request.
    UpstreamOverflow,
    /// A `CONNECT` request: the proxy opens no such tunnel (`crate::http::upgrade`).
    ConnectNotAllowed,
}

impl Reason {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NotInRegistry => StatusCode::BAD_GATEWAY,
            Self::InvalidPath => StatusCode::BAD_REQUEST,
            Self::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RbacAccessDenied => StatusCode::FORBIDDEN,
            Self::JwtAuthenticationFailed => StatusCode::UNAUTHORIZED,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NoCluster | Self::UpstreamOverflow => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoHealthyUpstream | Self::UpstreamConnectFailure | Self::UpstreamReset => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Envoy's response flag.
    pub fn flag(self) -> &'static str {
        match self {
            Self::NoRoute | Self::NotInRegistry | Self::ConnectNotAllowed => flags::NO_ROUTE,
            Self::NoHealthyUpstream => flags::NO_HEALTHY_UPSTREAM,
            Self::UpstreamConnectFailure => flags::UPSTREAM_FAILURE,
            Self::UpstreamReset => flags::UPSTREAM_CONNECTION_TERMINATION,
            Self::InvalidPath => flags::DOWNSTREAM_PROTOCOL_ERROR,
            Self::RbacAccessDenied => flags::RBAC,
            // Envoy's JWT filter sets no response flag.
            Self::JwtAuthenticationFailed => "-",
            Self::UpstreamTimeout => flags::UPSTREAM_REQUEST_TIMEOUT,
            Self::NoCluster => flags::NO_CLUSTER_FOUND,
            Self::UpstreamOverflow => flags::UPSTREAM_OVERFLOW,
        }
    }

    /// The `x-trellis-reason` value.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NotInRegistry => "not_in_registry",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::UpstreamConnectFailure => "upstream_connect_failure",
            Self::UpstreamReset => "upstream_reset",
            Self::InvalidPath => "invalid_path",
            Self::RbacAccessDenied => "rbac_access_denied",
            Self::JwtAuthenticationFailed => "jwt_authentication_failed",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::NoCluster => "no_cluster",
            Self::UpstreamOverflow => "upstream_overflow",
            Self::ConnectNotAllowed => "connect_not_allowed",
        }
    }

    /// The body line (Envoy's wording where it has one).
    fn message(self) -> &'static str {
        match self {
            Self::NoRoute => "route not found",
            Self::NotInRegistry => {
                "destination not in the service registry (outboundTrafficPolicy REGISTRY_ONLY)"
            }
            Self::NoHealthyUpstream => "no healthy upstream",
            Self::UpstreamConnectFailure => "upstream connect error",
            Self::UpstreamReset => "upstream reset before response headers",
            Self::InvalidPath => "invalid request path",
            Self::RbacAccessDenied => "RBAC: access denied",
            Self::JwtAuthenticationFailed => "Jwt verification fails",
            Self::UpstreamTimeout => "upstream request timeout",
            Self::NoCluster => "no cluster for the route's destination",
            Self::UpstreamOverflow => "upstream overflow: a connection pool limit was reached",
            Self::ConnectNotAllowed => "CONNECT is not allowed through the mesh proxy",
        }
    }

    /// Why a request that got no response from the upstream failed.
    pub fn of(error: &SendError) -> Self {
        match error {
            SendError::Connect(_) | SendError::Handshake(_) => Self::UpstreamConnectFailure,
            SendError::Reset(_) => Self::UpstreamReset,
            SendError::Overflow(_) => Self::UpstreamOverflow,
        }
    }

    pub fn response(self) -> Response<Body> {
        let body = Full::from(format!("{}\n", self.message()))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(X_TRELLIS_REASON, HeaderValue::from_static(self.code()));
        if self == Self::JwtAuthenticationFailed {
            // RFC 6750's challenge, as Envoy answers a failed JWT.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_reason_has_a_status_flag_header_and_one_line() {
        let table = [
            (Reason::NoRoute, 404, "NR", "no_route"),
            (Reason::NotInRegistry, 502, "NR", "not_in_registry"),
            (Reason::NoHealthyUpstream, 503, "UH", "no_healthy_upstream"),
            (
                Reason::UpstreamConnectFailure,
                503,
                "UF",
                "upstream_connect_failure",
            ),
            (Reason::UpstreamReset, 503, "UC", "upstream_reset"),
            (Reason::InvalidPath, 400, "DPE", "invalid_path"),
            (Reason::RbacAccessDenied, 403, "RBAC", "rbac_access_denied"),
            (
                Reason::JwtAuthenticationFailed,
                401,
                "-",
                "jwt_authentication_failed",
            ),
            (Reason::UpstreamTimeout, 504, "UT", "upstream_timeout"),
            (Reason::NoCluster, 503, "NC", "no_cluster"),
            (Reason::UpstreamOverflow, 503, "UO", "upstream_overflow"),
            (Reason::ConnectNotAllowed, 405, "NR", "connect_not_allowed"),
        ];
        for (reason, status, flag, code) in table {
            assert_eq!(reason.flag(), flag);
            let response = reason.response();
            assert_eq!(response.status().as_u16(), status, "{reason:?}");
            assert_eq!(response.headers()[X_TRELLIS_REASON], code);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(
                text.ends_with('\n') && text.lines().count() == 1,
                "{text:?}"
            );
            if reason == Reason::RbacAccessDenied {
                assert_eq!(text, "RBAC: access denied\n");
            }
        }
    }
}
