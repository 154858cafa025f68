//! Listener limits: what every proxy listener bounds for each downstream connection — how long
//! a request head may take, how long an HTTP connection may sit without a request, how large
//! and how many request headers may be, how many connections a listener holds open, and the
//! HTTP/2 settings the proxy's servers announce and enforce. The defaults follow Envoy's where
//! Envoy has one; [`ListenerLimits::validate`] holds the accepted ranges, which the `Mesh` CRD's
//! schema repeats so that the API server refuses a bad value before the operator sees it.

use serde::{Deserialize, Serialize};

/// Envoy's `max_request_headers_kb` default.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's `max_headers_count` default.
pub const DEFAULT_MAX_REQUEST_HEADERS: u32 = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 30_000;
/// Envoy's `idle_timeout` default (one hour).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16_384;
pub const DEFAULT_MAX_ENDPOINT_CONNECTIONS: u32 = 256;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1_024;
/// The `h2` crate's default, the bound on the "rapid reset" attack (CVE-2023-44487).
pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: u32 = 20;
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 20_000;

/// The smallest `maxRequestHeadersKb`: HTTP/1.1 heads are bounded by the size of hyper's read
/// buffer, which cannot be smaller than 8 KiB.
pub const MIN_REQUEST_HEADERS_KB: u32 = 8;
/// The largest `maxRequestHeadersKb`.
pub const MAX_REQUEST_HEADERS_KB: u32 = 256;
/// The largest `maxRequestHeaders`: hyper reserves room for this many headers per request.
pub const MAX_REQUEST_HEADERS: u32 = 1_000;
/// HTTP/2's largest stream count (2^31 - 1), Envoy's default for `max_concurrent_streams`.
pub const MAX_CONCURRENT_STREAMS: u32 = 2_147_483_647;
pub const MAX_CONNECTIONS: u32 = 1_000_000;
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: u32 = 10_000;
/// The longest `headerReadTimeout`, HTTP/2 `keepaliveTimeout` and `keepaliveInterval`.
pub const MAX_SHORT_TIMEOUT_MS: u64 = 3_600_000;
/// The longest `idleTimeout` (a day).
pub const MAX_IDLE_TIMEOUT_MS: u64 = 86_400_000;

/// The limits of every listener's downstream connections (outbound 15001, inbound 15006 and the
/// proxy's own HTTP endpoints), as the `Mesh`'s `spec.proxy.listeners` sets them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerLimits {
    /// How long an HTTP connection may take to send a complete request head. HTTP/1.1: counted
    /// from when the proxy starts waiting for the head (the connection's start, or the end of the
    /// previous exchange on a keep-alive connection, so it also bounds how long a keep-alive
    /// connection may wait between requests); HTTP/2: the first request's headers, counted from
    /// the start of the connection's HTTP.
    pub header_read_timeout_ms: u64,
    /// An HTTP connection without a request in flight for this long is closed (HTTP/2 with a
    /// GOAWAY first).
    pub idle_timeout_ms: u64,
    /// The largest request head: HTTP/1.1 request line and headers, HTTP/2 header list (also
    /// the `SETTINGS_MAX_HEADER_LIST_SIZE` announced). Larger: `431`.
    pub max_request_headers_kb: u32,
    /// The most request headers. More: `431`.
    pub max_request_headers: u32,
    /// Connections each capture listener (15001, 15006) holds open; one more is closed at
    /// once.
    pub max_connections: u32,
    /// Connections each of the proxy's own HTTP endpoints (admin, metrics, readiness) holds
    /// open.
    pub max_endpoint_connections: u32,
    pub http2: Http2Limits,
}

/// The HTTP/2 settings of every downstream HTTP/2 connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Http2Limits {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`: streams a client may have open at once.
    pub max_concurrent_streams: u32,
    /// Streams the client may reset before the proxy accepted them, at once; more and the
    /// connection is closed with `ENHANCE_YOUR_CALM`.
    pub max_pending_accept_reset_streams: u32,
    /// A PING is sent after this long without a frame from the client; `None`: no pings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_interval_ms: Option<u64>,
    /// A PING not acknowledged within this closes the connection.
    pub keepalive_timeout_ms: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            max_request_headers_kb: DEFAULT_MAX_REQUEST_HEADERS_KB,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_endpoint_connections: DEFAULT_MAX_ENDPOINT_CONNECTIONS,
            http2: Http2Limits::default(),
        }
    }
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_pending_accept_reset_streams: DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
            keepalive_interval_ms: None,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
        }
    }
}

/// A limit outside its accepted range, named by its `Mesh` field under
/// `spec.proxy.listeners`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {value} is outside the accepted range {min}..={max}")]
pub struct LimitsError {
    pub field: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

impl ListenerLimits {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every limit against its accepted range (durations in milliseconds).
    pub fn validate(&self) -> Result<(), LimitsError> {
        let http2 = &self.http2;
        let checks: [(&'static str, u64, u64, u64); 10] = [
            (
                "headerReadTimeout",
                self.header_read_timeout_ms,
                1,
                MAX_SHORT_TIMEOUT_MS,
            ),
            ("idleTimeout", self.idle_timeout_ms, 1, MAX_IDLE_TIMEOUT_MS),
            (
                "maxRequestHeadersKb",
                self.max_request_headers_kb.into(),
                MIN_REQUEST_HEADERS_KB.into(),
                MAX_REQUEST_HEADERS_KB.into(),
            ),
            (
                "maxRequestHeaders",
                self.max_request_headers.into(),
                1,
                MAX_REQUEST_HEADERS.into(),
            ),
            (
                "maxConnections",
                self.max_connections.into(),
                1,
                MAX_CONNECTIONS.into(),
            ),
            (
                "maxEndpointConnections",
                self.max_endpoint_connections.into(),
                1,
                MAX_CONNECTIONS.into(),
            ),
            (
                "http2.maxConcurrentStreams",
                http2.max_concurrent_streams.into(),
                1,
                MAX_CONCURRENT_STREAMS.into(),
            ),
            (
                "http2.maxPendingAcceptResetStreams",
                http2.max_pending_accept_reset_streams.into(),
                1,
                MAX_PENDING_ACCEPT_RESET_STREAMS.into(),
            ),
            (
                "http2.keepaliveInterval",
                // Unset means no pings: nothing to check.
                http2.keepalive_interval_ms.unwrap_or(1),
                1,
                MAX_SHORT_TIMEOUT_MS,
            ),
            (
                "http2.keepaliveTimeout",
                http2.keepalive_timeout_ms,
                1,
                MAX_SHORT_TIMEOUT_MS,
            ),
        ];
        match checks
            .into_iter()
            .find(|(_, value, min, max)| !(min..=max).contains(&value))
        {
            Some((field, value, min, max)) => Err(LimitsError {
                field,
                value,
                min,
                max,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_an_empty_object_means_the_defaults() {
        let limits: ListenerLimits = serde_json::from_str("{}").unwrap();
        assert!(limits.is_default());
        assert_eq!(limits.validate(), Ok(()));
        assert_eq!(limits.max_request_headers_kb, 60);
        assert_eq!(limits.max_request_headers, 100);
        assert_eq!(limits.idle_timeout_ms, 3_600_000);
        let partial: ListenerLimits =
            serde_json::from_str(r#"{"maxConnections": 3, "http2": {"maxConcurrentStreams": 7}}"#)
                .unwrap();
        assert_eq!(partial.max_connections, 3);
        assert_eq!(partial.http2.max_concurrent_streams, 7);
        assert_eq!(
            partial.http2.max_pending_accept_reset_streams,
            DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS
        );
    }

    #[test]
    fn every_limit_outside_its_range_is_refused_by_its_field_name() {
        type Edit = fn(&mut ListenerLimits);
        let cases: [(Edit, &str); 11] = [
            (|l| l.header_read_timeout_ms = 0, "headerReadTimeout"),
            (
                |l| l.header_read_timeout_ms = 3_600_001,
                "headerReadTimeout",
            ),
            (|l| l.idle_timeout_ms = 0, "idleTimeout"),
            (|l| l.max_request_headers_kb = 7, "maxRequestHeadersKb"),
            (|l| l.max_request_headers_kb = 257, "maxRequestHeadersKb"),
            (|l| l.max_request_headers = 1_001, "maxRequestHeaders"),
            (|l| l.max_connections = 0, "maxConnections"),
            (|l| l.max_endpoint_connections = 0, "maxEndpointConnections"),
            (
                |l| l.http2.max_concurrent_streams = u32::MAX,
                "http2.maxConcurrentStreams",
            ),
            (
                |l| l.http2.keepalive_interval_ms = Some(0),
                "http2.keepaliveInterval",
            ),
            (
                |l| l.http2.max_pending_accept_reset_streams = 0,
                "http2.maxPendingAcceptResetStreams",
            ),
        ];
        for (edit, field) in cases {
            let mut limits = ListenerLimits::default();
            edit(&mut limits);
            let error = limits.validate().unwrap_err();
            assert_eq!(error.field, field, "{limits:?}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
        let edge = ListenerLimits {
            header_read_timeout_ms: 1,
            max_request_headers_kb: MIN_REQUEST_HEADERS_KB,
            http2: Http2Limits {
                max_concurrent_streams: MAX_CONCURRENT_STREAMS,
                keepalive_interval_ms: Some(MAX_SHORT_TIMEOUT_MS),
                ..Http2Limits::default()
            },
            ..ListenerLimits::default()
        };
        assert_eq!(edge.validate(), Ok(()));
    }
}
