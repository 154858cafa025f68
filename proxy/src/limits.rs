//! The listener limits of `trellis_config::limits` applied to downstream connections: each
//! listener's connection cap ([`ConnectionCap`]) and how every downstream HTTP connection is
//! served ([`serve_http`]) — hyper's header read timeout, head size and header count bounds and
//! HTTP/2 settings, and what hyper does not do itself: the idle timeout, the first request's
//! deadline on HTTP/2 and the header count of HTTP/2 requests. The limits are read from the
//! current config when a connection is accepted, so a new config applies to the connections
//! accepted after it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{self, Join, Map, Ready};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use trellis_config::limits::ListenerLimits;

use crate::metrics::ListenerMetrics;

/// hyper's connection error (the same as `crate::http::BoxError`, not imported from there:
/// the HTTP paths build on this module).
type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection closed for being idle gets to finish closing (an HTTP/2 GOAWAY
/// exchange) before it is dropped: Envoy's default `drain_timeout`.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// hyper's own HTTP/1.1 header-count bound. It is set only when the limit differs: setting it
/// moves hyper's per-request header slots from the stack to the heap.
const HYPER_MAX_HEADERS: u32 = 100;

/// The open connections of one listener, counted against its limit.
pub struct ConnectionCap {
    metrics: ListenerMetrics,
}

impl ConnectionCap {
    pub fn new(metrics: ListenerMetrics) -> Self {
        Self { metrics }
    }

    /// The accepted connection counted as open until the returned value drops; `None` (counted
    /// as an overflow) when the listener already holds `max`.
    pub fn admit(&self, max: u32) -> Option<OpenConnection> {
        let before = self.metrics.open.inc();
        if before >= i64::from(max) {
            self.metrics.open.dec();
            self.metrics.overflows.inc();
            return None;
        }
        Some(OpenConnection(self.metrics.open.clone()))
    }
}

/// One connection counted by a [`ConnectionCap`].
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Which HTTP versions a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 or HTTP/2, told apart by the first bytes, upgrades allowed: the capture
    /// listeners.
    Any,
    /// HTTP/1.1 only: the proxy's own endpoints.
    Http1,
}

/// Serves `io` as HTTP under `limits` until it closes, `stop` resolves (then the connection is
/// shut down gracefully: in-flight requests finish, HTTP/2 gets a GOAWAY) or it is idle: no
/// request in flight for the idle timeout, or no first request within the header read timeout.
pub async fn serve_http<I, S, B>(
    limits: &ListenerLimits,
    protocols: Protocols,
    io: I,
    service: S,
    stop: impl Future<Output = ()>,
) -> Result<(), ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<ConnectionError>,
{
    let activity = Arc::new(Activity::default());
    let service = Limited {
        inner: service,
        activity: activity.clone(),
        max_headers: usize::try_from(limits.max_request_headers).unwrap_or(usize::MAX),
    };
    let builder = builder(limits, protocols);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let first = Duration::from_millis(limits.header_read_timeout_ms);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    tokio::select! {
        result = connection.as_mut() => result,
        () = stop => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = activity.idle(first, idle) => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(IDLE_CLOSE_GRACE, connection)
                .await
                .unwrap_or(Ok(()))
        }
    }
}

/// hyper's server settings for `limits`.
fn builder(limits: &ListenerLimits, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head_bytes = usize::try_from(limits.max_request_headers_kb)
        .unwrap_or(usize::MAX)
        .saturating_mul(1024);
    let mut http1 = builder.http1();
    // hyper answers 431 when a request head outgrows its read buffer; validation keeps the
    // limit at or above the buffer's 8 KiB minimum.
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(head_bytes);
    if limits.max_request_headers != HYPER_MAX_HEADERS {
        http1.max_headers(usize::try_from(limits.max_request_headers).unwrap_or(usize::MAX));
    }
    let http2 = &limits.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http2.max_concurrent_streams)
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(
            usize::try_from(http2.max_pending_accept_reset_streams).unwrap_or(usize::MAX),
        )
        .keep_alive_interval(http2.keepalive_interval_ms.map(Duration::from_millis))
        .keep_alive_timeout(Duration::from_millis(http2.keepalive_timeout_ms));
    match protocols {
        Protocols::Any => builder,
        Protocols::Http1 => builder.http1_only(),
    }
}

/// Whether a connection has requests in flight, and whether it has had any.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    started: AtomicBool,
    /// Told when `in_flight` leaves or returns to 0.
    changed: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Release);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_waiters();
        }
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight for `idle`, or for `first` before the first
    /// request.
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a change after the read is not missed.
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let wait = if self.started.load(Ordering::Acquire) {
                idle
            } else {
                first
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => return,
                () = changed => {}
            }
        }
    }
}

/// One request in flight, from its headers until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// A response body that keeps its request counted as in flight.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The service's body, or the proxy's own `431`.
type LimitedBody<B> = Tracked<Either<B, Full<Bytes>>>;
type Reply<B> = Result<Response<LimitedBody<B>>, Infallible>;
/// Named (a function pointer, not a closure) so that the service's future needs no box.
type Finish<B> = fn((Result<Response<B>, Infallible>, InFlight)) -> Reply<B>;

/// The service behind [`serve_http`]: counts requests in flight for the idle timeout and
/// answers `431` to a request with more headers than the limit (HTTP/1.1 heads are already
/// bounded by hyper, HTTP/2 header lists only by their size).
struct Limited<S> {
    inner: S,
    activity: Arc<Activity>,
    max_headers: usize,
}

impl<S, B> Service<Request<Incoming>> for Limited<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<LimitedBody<B>>;
    type Error = Infallible;
    type Future = future::Either<Map<Join<S::Future, Ready<InFlight>>, Finish<B>>, Ready<Reply<B>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        if req.headers().len() > self.max_headers {
            let mut response = Response::new(Tracked {
                body: Either::Right(Full::new(Bytes::from_static(
                    b"request header fields too large\n",
                ))),
                _in_flight: in_flight,
            });
            *response.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            return future::Either::Right(future::ready(Ok(response)));
        }
        let finish: Finish<B> = |(response, in_flight)| {
            let Ok(response) = response;
            Ok(response.map(|body| Tracked {
                body: Either::Left(body),
                _in_flight: in_flight,
            }))
        };
        future::Either::Left(
            future::join(self.inner.call(req), future::ready(in_flight)).map(finish),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_requests_in_flight() {
        let activity = Arc::new(Activity::default());
        let short = Duration::from_millis(50);
        let generous = Duration::from_secs(10);
        // No request yet: the first-request deadline.
        tokio::time::timeout(generous, activity.idle(short, short))
            .await
            .expect("idle before any request");

        let request = activity.begin();
        let idle = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle(short, short).await })
        };
        tokio::time::sleep(short * 8).await;
        assert!(!idle.is_finished(), "idle while a request is in flight");
        drop(request);
        tokio::time::timeout(generous, idle)
            .await
            .expect("idle once the request is done")
            .unwrap();
    }

    #[test]
    fn a_full_listener_refuses_and_counts_the_overflow() {
        let metrics = crate::metrics::Metrics::new();
        let cap = ConnectionCap::new(metrics.listener("inbound"));
        let one = cap.admit(2).unwrap();
        let two = cap.admit(2).unwrap();
        assert!(cap.admit(2).is_none());
        drop(one);
        let three = cap.admit(2).unwrap();
        let text = metrics.encode();
        assert!(
            text.contains("trellis_listener_connections{listener=\"inbound\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("trellis_listener_overflow_total{listener=\"inbound\"} 1"),
            "{text}"
        );
        drop((two, three));
        assert!(
            metrics
                .encode()
                .contains("trellis_listener_connections{listener=\"inbound\"} 0")
        );
    }
}
