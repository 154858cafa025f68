//! Upstream HTTP connections, reused across requests and across downstream connections: one
//! HTTP/2 connection per upstream (mesh HTTP/2 or h2c), multiplexing every request to it, or a
//! set of HTTP/1.1 keep-alive connections. A request that a pooled connection could not even
//! start (the upstream closed it while idle) is sent once more on a fresh connection.
//!
//! A [`Pool`] belongs to one cluster (`crate::upstream` makes one per host/subset/port; the
//! inbound side uses one unlimited pool) and enforces the DestinationRule's `connectionPool`
//! [`Limits`] the way Envoy's connection pools and circuit breakers do:
//!
//! - `tcp.maxConnections` counts connections open or opening across every endpoint of the
//!   cluster. As Envoy, an endpoint with no connection at all may always open one (otherwise
//!   the other endpoints' connections could starve it forever).
//! - `http.http1MaxPendingRequests` bounds the requests waiting for a connection: an HTTP/1.1
//!   request when every connection is busy and no new one may open, an HTTP/2 request while its
//!   endpoint's connection is being made or may not be made. Beyond it the request overflows at
//!   once ([`SendError::Overflow`], answered `503` with flag `UO`).
//! - HTTP/2 multiplexes: requests (streams) are not pending once the connection exists, so the
//!   mesh hop between sidecars is bounded by `http2MaxRequests`, which `crate::upstream` admits
//!   per request before the pool. `maxConnections` matters for HTTP/2 only when
//!   `maxRequestsPerConnection` retires connections that still carry streams.
//! - `maxRequestsPerConnection`: an HTTP/1.1 connection is closed after that many requests, an
//!   HTTP/2 one stops taking new streams (and closes once its streams end).
//! - `idleTimeout`: an HTTP/1.1 connection idle that long is closed; an HTTP/2 connection that
//!   took no new stream for that long is retired.
//! - `tcp.connectTimeout`: bounds making a connection, TCP and TLS handshake together.
//!
//! Kept by hand rather than hyper-util's client pool: connections are keyed by the endpoint and
//! the identity it must present (the SPIFFE ID, or the server name of originated TLS), counted
//! per cluster against Envoy's `connectionPool` limits, and an HTTP/2 connection is shared by
//! every request to its endpoint; hyper-util's pool keys by scheme and authority and has none of
//! these limits.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tracing::debug;
use trellis_config::traffic::ConnectionPool;

use super::Body;

/// Idle HTTP/1.1 connections kept per upstream; more are closed when they become idle.
const MAX_IDLE_HTTP1: usize = 64;

/// A connection's byte stream, whatever it is (TCP, TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxedIo = Box<dyn Io>;

/// How requests are framed on an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

/// What makes two upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    /// Local source address (`127.0.0.6` towards the application).
    pub source: Option<IpAddr>,
    /// The SPIFFE ID the upstream proved, for mutual TLS; `tls:<server name>` for TLS the proxy
    /// originates (DestinationRule `tls.mode` `SIMPLE`/`MUTUAL`); `None` for plaintext.
    pub peer: Option<String>,
    pub wire: Wire,
}

/// A DestinationRule `connectionPool` limit (the `limit` label of
/// `trellis_upstream_overflow_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `tcp.maxConnections`.
    Connections,
    /// `http.http1MaxPendingRequests`.
    PendingRequests,
    /// `http.http2MaxRequests`.
    Requests,
    /// `http.maxRetries`.
    Retries,
}

impl Limit {
    /// Envoy's circuit-breaker name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::PendingRequests => "max_pending_requests",
            Self::Requests => "max_requests",
            Self::Retries => "max_retries",
        }
    }

    /// The DestinationRule field that sets it.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Connections => "tcp.maxConnections",
            Self::PendingRequests => "http.http1MaxPendingRequests",
            Self::Requests => "http.http2MaxRequests",
            Self::Retries => "http.maxRetries",
        }
    }
}

/// A request or connection refused because a cluster limit is reached (Envoy's `UO`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster {cluster}: {} ({max}) reached", limit.setting())]
pub struct Overflow {
    pub cluster: Arc<str>,
    pub limit: Limit,
    pub max: u32,
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the upstream failed: {0:#}")]
    Connect(anyhow::Error),
    #[error("HTTP handshake with the upstream failed: {0}")]
    Handshake(hyper::Error),
    #[error("the upstream reset the request: {0}")]
    Reset(hyper::Error),
    /// No connection may be opened and the pending queue is full.
    #[error("{0}")]
    Overflow(Overflow),
}

/// The `connectionPool` settings a pool enforces. Unset fields take Istio's defaults: 2^32-1
/// connections and pending requests, unlimited requests per connection, no idle timeout, and
/// the connect closure's own timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
}

impl Limits {
    pub const UNLIMITED: Self = Self {
        max_connections: u32::MAX,
        max_pending_requests: u32::MAX,
        max_requests_per_connection: 0,
        idle_timeout: None,
        connect_timeout: None,
    };

    pub fn from_settings(pool: &ConnectionPool) -> Self {
        Self {
            max_connections: pool.max_connections.unwrap_or(u32::MAX),
            max_pending_requests: pool.http1_max_pending_requests.unwrap_or(u32::MAX),
            max_requests_per_connection: pool.max_requests_per_connection.unwrap_or(0),
            idle_timeout: pool.idle_timeout_ms.map(Duration::from_millis),
            connect_timeout: pool.connect_timeout_ms.map(Duration::from_millis),
        }
    }

    fn exhausted(&self, served: u32) -> bool {
        self.max_requests_per_connection > 0 && served >= self.max_requests_per_connection
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// Called with every overflow, for the cluster's metrics.
pub type OverflowHook = Box<dyn Fn(&Overflow) + Send + Sync>;

/// The connections of one cluster.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// The cluster's name, for overflow errors and logs.
    name: Arc<str>,
    limits: Mutex<Limits>,
    /// Connections open or opening, across every key.
    connections: AtomicU32,
    /// Requests waiting for a connection.
    pending: AtomicU32,
    /// Woken when a connection closes, becomes free or is made: pending requests look again.
    changed: Notify,
    on_overflow: Option<OverflowHook>,
    next_id: AtomicU64,
    http2: Mutex<HashMap<Key, Arc<Http2Entry>>>,
    http1: Mutex<HashMap<Key, Arc<Http1Entry>>>,
}

#[derive(Default)]
struct Http1Entry {
    idle: Mutex<Vec<IdleHttp1>>,
    /// Connections of this key, open or opening.
    open: Arc<AtomicU32>,
}

struct IdleHttp1 {
    id: u64,
    since: Instant,
    served: u32,
    sender: http1::SendRequest<Body>,
}

#[derive(Default)]
struct Http2Entry {
    slot: Mutex<Http2Slot>,
    open: Arc<AtomicU32>,
}

#[derive(Default)]
struct Http2Slot {
    current: Option<Http2Connection>,
    /// A request is making this key's connection; others wait for it (as pending requests).
    connecting: bool,
}

struct Http2Connection {
    id: u64,
    sender: http2::SendRequest<Body>,
    served: u32,
    last_used: Instant,
}

/// Holds one unit of the cluster's connection count (and of its key's) until dropped: for an
/// HTTP connection, by the task driving it, so the count falls when the connection ends.
pub struct ConnectionGuard {
    shared: Arc<Shared>,
    key_open: Option<Arc<AtomicU32>>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(open) = &self.key_open {
            open.fetch_sub(1, Ordering::AcqRel);
        }
        self.shared.changed.notify_waiters();
    }
}

/// One request counted as pending until dropped.
struct PendingGuard(Arc<Shared>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clears an HTTP/2 key's `connecting` mark however the connecting request ends (a cancelled
/// request must not leave the key waiting forever).
struct ConnectingGuard<'a> {
    entry: &'a Http2Entry,
    shared: &'a Shared,
}

impl Drop for ConnectingGuard<'_> {
    fn drop(&mut self) {
        self.entry.slot.lock().connecting = false;
        self.shared.changed.notify_waiters();
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new("unlimited", Limits::UNLIMITED, None)
    }
}

impl Shared {
    fn limits(&self) -> Limits {
        self.limits.lock().clone()
    }

    fn overflow(&self, limit: Limit, max: u32) -> Overflow {
        let overflow = Overflow {
            cluster: self.name.clone(),
            limit,
            max,
        };
        if let Some(hook) = &self.on_overflow {
            hook(&overflow);
        }
        overflow
    }

    /// Takes a connection slot: below `maxConnections`, or when the key has no connection at
    /// all (`key_open` given, Envoy's rule against starving an endpoint).
    fn try_open(
        self: &Arc<Self>,
        key_open: Option<&Arc<AtomicU32>>,
    ) -> Result<ConnectionGuard, Overflow> {
        let max = self.limits.lock().max_connections;
        let first_of_key = key_open.is_some_and(|open| open.load(Ordering::Acquire) == 0);
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max || first_of_key).then(|| n.saturating_add(1))
            });
        if taken.is_err() {
            return Err(Overflow {
                cluster: self.name.clone(),
                limit: Limit::Connections,
                max,
            });
        }
        if let Some(open) = key_open {
            open.fetch_add(1, Ordering::AcqRel);
        }
        Ok(ConnectionGuard {
            shared: self.clone(),
            key_open: key_open.cloned(),
        })
    }

    /// Counts the request as pending, or overflows.
    fn pend(self: &Arc<Self>) -> Result<PendingGuard, Overflow> {
        let max = self.limits.lock().max_pending_requests;
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then(|| n + 1)
            })
            .map_err(|_| self.overflow(Limit::PendingRequests, max))?;
        Ok(PendingGuard(self.clone()))
    }

    async fn connect<C, F>(&self, connect: &C) -> Result<BoxedIo, SendError>
    where
        C: Fn() -> F,
        F: Future<Output = anyhow::Result<BoxedIo>>,
    {
        match self.limits().connect_timeout {
            None => connect().await.map_err(SendError::Connect),
            Some(limit) => tokio::time::timeout(limit, connect())
                .await
                .map_err(|_| {
                    SendError::Connect(anyhow::anyhow!(
                        "no connection within the connect timeout ({limit:?})"
                    ))
                })?
                .map_err(SendError::Connect),
        }
    }
}

impl Pool {
    /// A pool for the cluster `name`, enforcing `limits`; `on_overflow` sees every overflow.
    pub fn new(name: &str, limits: Limits, on_overflow: Option<OverflowHook>) -> Self {
        Self {
            shared: Arc::new(Shared {
                name: Arc::from(name),
                limits: Mutex::new(limits),
                connections: AtomicU32::new(0),
                pending: AtomicU32::new(0),
                changed: Notify::new(),
                on_overflow,
                next_id: AtomicU64::new(0),
                http2: Mutex::default(),
                http1: Mutex::default(),
            }),
        }
    }

    /// New limits (a config swap); open connections and waiting requests stay.
    pub fn set_limits(&self, limits: Limits) {
        *self.shared.limits.lock() = limits;
        // A raised limit may let pending requests proceed.
        self.shared.changed.notify_waiters();
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits()
    }

    /// Connections open or opening now.
    pub fn connections(&self) -> u32 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> u32 {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// One connection of the cluster outside HTTP pooling (an opaque TCP connection), counted
    /// against `maxConnections` until the guard drops. Overflow is immediate: a TCP connection
    /// has nothing to wait in.
    pub fn admit_connection(&self) -> Result<ConnectionGuard, Overflow> {
        self.shared.try_open(None).inspect_err(|overflow| {
            if let Some(hook) = &self.shared.on_overflow {
                hook(overflow);
            }
        })
    }

    /// Sends `req` to the upstream of `key`, on a pooled connection or one made by `connect`.
    pub async fn send<C, F>(
        &self,
        key: &Key,
        req: Request<Body>,
        connect: C,
    ) -> Result<Response<Incoming>, SendError>
    where
        C: Fn() -> F,
        F: Future<Output = anyhow::Result<BoxedIo>>,
    {
        match key.wire {
            Wire::Http2 => self.send_http2(key, req, &connect).await,
            Wire::Http1 => self.send_http1(key, req, &connect).await,
        }
    }

    async fn send_http2<C, F>(
        &self,
        key: &Key,
        mut req: Request<Body>,
        connect: &C,
    ) -> Result<Response<Incoming>, SendError>
    where
        C: Fn() -> F,
        F: Future<Output = anyhow::Result<BoxedIo>>,
    {
        let shared = &self.shared;
        let entry = shared.http2.lock().entry(key.clone()).or_default().clone();
        let mut pending = None;
        let mut retried = false;
        loop {
            let mut changed = pin!(shared.changed.notified());
            changed.as_mut().enable();
            let (id, mut sender, fresh) = match self.http2_step(&entry)? {
                Http2Step::Use(id, sender) => (id, sender, false),
                Http2Step::Wait => {
                    if pending.is_none() {
                        pending = Some(shared.pend().map_err(SendError::Overflow)?);
                    }
                    changed.await;
                    continue;
                }
                Http2Step::Connect(guard) => {
                    drop(pending.take());
                    let connecting = ConnectingGuard {
                        entry: &entry,
                        shared,
                    };
                    let io = shared.connect(connect).await?;
                    let sender = handshake_http2(io, guard).await?;
                    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    let limits = shared.limits();
                    {
                        let mut slot = entry.slot.lock();
                        slot.current = (!limits.exhausted(1)).then(|| Http2Connection {
                            id,
                            sender: sender.clone(),
                            served: 1,
                            last_used: Instant::now(),
                        });
                    }
                    drop(connecting);
                    if let Some(idle) = limits.idle_timeout
                        && !limits.exhausted(1)
                    {
                        retire_idle_http2(Arc::downgrade(&entry), id, idle);
                    }
                    (id, sender, true)
                }
            };
            drop(pending.take());
            let outcome = match sender.ready().await {
                Err(e) => Err((Some(req), e)),
                Ok(()) => sender.try_send_request(req).await.map_err(split),
            };
            match outcome {
                Ok(response) => return Ok(response),
                Err((Some(unsent), e)) if !fresh && !retried => {
                    debug!(upstream = %key.addr, error = %e, "pooled HTTP/2 connection unusable, reconnecting");
                    let mut slot = entry.slot.lock();
                    if slot.current.as_ref().is_some_and(|c| c.id == id) {
                        slot.current = None;
                    }
                    req = unsent;
                    retried = true;
                }
                Err((_, e)) => return Err(SendError::Reset(e)),
            }
        }
    }

    /// What a request to an HTTP/2 key does next: use the connection (counting the stream),
    /// make it, or wait for it.
    fn http2_step(&self, entry: &Http2Entry) -> Result<Http2Step, SendError> {
        let shared = &self.shared;
        let limits = shared.limits();
        let mut slot = entry.slot.lock();
        if let Some(current) = slot.current.as_mut().filter(|c| !c.sender.is_closed()) {
            current.served += 1;
            current.last_used = Instant::now();
            let step = Http2Step::Use(current.id, current.sender.clone());
            if limits.exhausted(current.served) {
                // Retired: its streams finish, new requests get a new connection.
                slot.current = None;
            }
            return Ok(step);
        }
        slot.current = None;
        if slot.connecting {
            return Ok(Http2Step::Wait);
        }
        match shared.try_open(Some(&entry.open)) {
            Ok(guard) => {
                slot.connecting = true;
                Ok(Http2Step::Connect(guard))
            }
            Err(_) => Ok(Http2Step::Wait),
        }
    }

    async fn send_http1<C, F>(
        &self,
        key: &Key,
        mut req: Request<Body>,
        connect: &C,
    ) -> Result<Response<Incoming>, SendError>
    where
        C: Fn() -> F,
        F: Future<Output = anyhow::Result<BoxedIo>>,
    {
        let shared = &self.shared;
        let entry = shared.http1.lock().entry(key.clone()).or_default().clone();
        let mut pending = None;
        let mut retried = false;
        loop {
            let mut changed = pin!(shared.changed.notified());
            changed.as_mut().enable();
            let idle = if retried { None } else { take_idle(&entry) };
            let (mut sender, id, served, fresh) = match idle {
                Some(idle) => (idle.sender, idle.id, idle.served, false),
                None => match shared.try_open(Some(&entry.open)) {
                    Ok(guard) => {
                        drop(pending.take());
                        let io = shared.connect(connect).await?;
                        let sender = handshake_http1(io, guard).await?;
                        (
                            sender,
                            shared.next_id.fetch_add(1, Ordering::Relaxed),
                            0,
                            true,
                        )
                    }
                    Err(_) => {
                        if pending.is_none() {
                            pending = Some(shared.pend().map_err(SendError::Overflow)?);
                        }
                        changed.await;
                        continue;
                    }
                },
            };
            drop(pending.take());
            let outcome = match sender.ready().await {
                Err(e) => Err((Some(req), e)),
                Ok(()) => sender.try_send_request(req).await.map_err(split),
            };
            match outcome {
                Ok(response) => {
                    self.release_http1(entry, id, served + 1, sender);
                    return Ok(response);
                }
                Err((Some(unsent), e)) if !fresh && !retried => {
                    debug!(upstream = %key.addr, error = %e, "pooled HTTP/1.1 connection unusable, reconnecting");
                    req = unsent;
                    retried = true;
                }
                Err((_, e)) => return Err(SendError::Reset(e)),
            }
        }
    }

    /// Returns an HTTP/1.1 connection to the idle set once its response has been read to the
    /// end (or closes it after `maxRequestsPerConnection` requests), waking pending requests,
    /// and closes it if it then stays idle for `idleTimeout`.
    fn release_http1(
        &self,
        entry: Arc<Http1Entry>,
        id: u64,
        served: u32,
        mut sender: http1::SendRequest<Body>,
    ) {
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(limits) = shared.upgrade().map(|s| s.limits()) else {
                return;
            };
            if limits.exhausted(served) {
                // Dropping the last handle closes the connection; its guard then wakes waiters.
                return;
            }
            let since = Instant::now();
            {
                let mut idle = entry.idle.lock();
                idle.retain(|s| !s.sender.is_closed());
                if idle.len() >= MAX_IDLE_HTTP1 {
                    return;
                }
                idle.push(IdleHttp1 {
                    id,
                    since,
                    served,
                    sender,
                });
            }
            if let Some(shared) = shared.upgrade() {
                shared.changed.notify_waiters();
            }
            if let Some(timeout) = limits.idle_timeout {
                tokio::time::sleep(timeout).await;
                let expired = {
                    let mut idle = entry.idle.lock();
                    idle.iter()
                        .position(|s| s.id == id && s.since == since)
                        .map(|at| idle.swap_remove(at))
                };
                if expired.is_some() {
                    debug!(
                        connection = id,
                        ?timeout,
                        "idle HTTP/1.1 upstream connection closed"
                    );
                }
            }
        });
    }
}

enum Http2Step {
    Use(u64, http2::SendRequest<Body>),
    Connect(ConnectionGuard),
    Wait,
}

/// A pooled connection ready for a request; closed ones are dropped on the way.
fn take_idle(entry: &Http1Entry) -> Option<IdleHttp1> {
    let mut idle = entry.idle.lock();
    idle.retain(|s| !s.sender.is_closed());
    let ready = idle.iter().position(|s| s.sender.is_ready())?;
    Some(idle.swap_remove(ready))
}

/// Retires the HTTP/2 connection `id` once it has taken no new stream for `timeout`.
fn retire_idle_http2(entry: Weak<Http2Entry>, id: u64, timeout: Duration) {
    tokio::spawn(async move {
        let mut wait = timeout;
        loop {
            tokio::time::sleep(wait).await;
            let Some(entry) = entry.upgrade() else { return };
            let mut slot = entry.slot.lock();
            let Some(current) = slot.current.as_ref().filter(|c| c.id == id) else {
                return;
            };
            let idle_for = current.last_used.elapsed();
            if idle_for >= timeout {
                slot.current = None;
                debug!(
                    connection = id,
                    ?timeout,
                    "idle HTTP/2 upstream connection retired"
                );
                return;
            }
            wait = timeout - idle_for;
        }
    });
}

/// The request back when it was never sent, and the error.
fn split(mut e: TrySendError<Request<Body>>) -> (Option<Request<Body>>, hyper::Error) {
    (e.take_message(), e.into_error())
}

async fn handshake_http2(
    io: BoxedIo,
    guard: ConnectionGuard,
) -> Result<http2::SendRequest<Body>, SendError> {
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .adaptive_window(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream HTTP/2 connection ended");
        }
        drop(guard);
    });
    Ok(sender)
}

async fn handshake_http1(
    io: BoxedIo,
    guard: ConnectionGuard,
) -> Result<http1::SendRequest<Body>, SendError> {
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
        drop(guard);
    });
    Ok(sender)
}

/// Sends an upgrade request on a connection of its own (never pooled: after the `101` it
/// carries the upgraded protocol), returning the upstream's response.
pub async fn send_upgrade(
    io: BoxedIo,
    req: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let (mut sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "upstream upgrade connection ended");
        }
    });
    sender.send_request(req).await.map_err(SendError::Reset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use tokio::net::{TcpListener, TcpStream};

    /// A local HTTP/1.1 + h2c server answering after `delay`; counts connections accepted and
    /// connections ended.
    struct Server {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
    }

    async fn server(delay: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (counted, finished) = (accepted.clone(), ended.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let finished = finished.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Server {
            addr,
            accepted,
            ended,
        }
    }

    fn key(addr: SocketAddr, wire: Wire) -> Key {
        Key {
            addr,
            source: None,
            peer: None,
            wire,
        }
    }

    fn limits(max_connections: u32, max_pending: u32, per_connection: u32) -> Limits {
        Limits {
            max_connections,
            max_pending_requests: max_pending,
            max_requests_per_connection: per_connection,
            ..Limits::UNLIMITED
        }
    }

    /// Sends one GET through `pool` and reads the body: `Ok(status)` or the error.
    async fn get(pool: &Pool, key: &Key) -> Result<u16, String> {
        let req = Request::builder()
            .uri(format!("http://{}/", key.addr))
            .version(match key.wire {
                Wire::Http1 => http::Version::HTTP_11,
                Wire::Http2 => http::Version::HTTP_2,
            })
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .unwrap();
        let addr = key.addr;
        let connect = move || async move {
            Ok::<BoxedIo, anyhow::Error>(Box::new(TcpStream::connect(addr).await?))
        };
        match pool.send(key, req, connect).await {
            Ok(response) => {
                let status = response.status().as_u16();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(status)
            }
            Err(SendError::Overflow(overflow)) => Err(overflow.limit.as_str().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Fires `n` requests at once; returns how many got 200 and the errors, sorted.
    async fn burst(pool: &Arc<Pool>, key: &Key, n: usize) -> (usize, Vec<String>) {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (pool, key) = (pool.clone(), key.clone());
                tokio::spawn(async move {
                    // Staggered so the first request owns the connection.
                    tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                    get(&pool, &key).await
                })
            })
            .collect();
        let mut ok = 0;
        let mut errors = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(200) => ok += 1,
                Ok(other) => errors.push(other.to_string()),
                Err(e) => errors.push(e),
            }
        }
        errors.sort();
        (ok, errors)
    }

    #[tokio::test]
    async fn one_connection_and_one_pending_slot_admit_two_requests() {
        let server = server(Duration::from_millis(300)).await;
        let overflows = Arc::new(AtomicUsize::new(0));
        let counted = overflows.clone();
        let pool = Arc::new(Pool::new(
            "outbound|80||slow",
            limits(1, 1, 0),
            Some(Box::new(move |o: &Overflow| {
                assert_eq!(o.limit, Limit::PendingRequests);
                counted.fetch_add(1, Ordering::SeqCst);
            })),
        ));
        // (wire, requests at once, successes): HTTP/1.1 runs one request and queues one. HTTP/2
        // multiplexes streams on its one connection: none pending, all served (Envoy counts
        // them against http2MaxRequests, admitted before the pool).
        let cases = [(Wire::Http1, 6, 2), (Wire::Http2, 6, 6)];
        for (wire, n, served) in cases {
            let before = overflows.load(Ordering::SeqCst);
            let (ok, errors) = burst(&pool, &key(server.addr, wire), n).await;
            assert_eq!(ok, served, "{wire:?}: {errors:?}");
            assert!(
                errors.iter().all(|e| e == "max_pending_requests"),
                "{errors:?}"
            );
            assert_eq!(overflows.load(Ordering::SeqCst) - before, n - served);
        }
        assert_eq!(pool.pending(), 0);
        assert_eq!(
            server.accepted.load(Ordering::SeqCst),
            2,
            "one HTTP/1.1 and one HTTP/2 connection"
        );
    }

    #[tokio::test]
    async fn requests_per_connection_retire_connections() {
        let server = server(Duration::from_millis(50)).await;
        // (wire, maxRequestsPerConnection, sequential requests, connections made)
        let cases = [
            (Wire::Http1, 1, 3, 3),
            (Wire::Http1, 2, 4, 2),
            (Wire::Http1, 0, 4, 1),
            (Wire::Http2, 1, 3, 3),
            (Wire::Http2, 0, 3, 1),
        ];
        for (wire, per_connection, requests, connections) in cases {
            let pool = Pool::new("c", limits(u32::MAX, u32::MAX, per_connection), None);
            let before = server.accepted.load(Ordering::SeqCst);
            for _ in 0..requests {
                assert_eq!(get(&pool, &key(server.addr, wire)).await, Ok(200));
                // Let the released connection reach the idle set.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                server.accepted.load(Ordering::SeqCst) - before,
                connections,
                "{wire:?} maxRequestsPerConnection {per_connection}"
            );
        }
    }

    #[tokio::test]
    async fn retired_http2_connections_count_until_they_close() {
        // maxRequestsPerConnection 1 over HTTP/2 with one connection and one pending slot: the
        // retired connection still carries its stream, so the next request waits and the rest
        // overflow, as with HTTP/1.1.
        let server = server(Duration::from_millis(300)).await;
        let pool = Arc::new(Pool::new("c", limits(1, 1, 1), None));
        let (ok, errors) = burst(&pool, &key(server.addr, Wire::Http2), 5).await;
        assert_eq!(ok, 2, "{errors:?}");
        assert_eq!(errors, vec!["max_pending_requests"; 3]);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let server = server(Duration::ZERO).await;
        for wire in [Wire::Http1, Wire::Http2] {
            let pool = Pool::new(
                "c",
                Limits {
                    idle_timeout: Some(Duration::from_millis(100)),
                    ..Limits::UNLIMITED
                },
                None,
            );
            let ended = server.ended.load(Ordering::SeqCst);
            assert_eq!(get(&pool, &key(server.addr, wire)).await, Ok(200));
            assert_eq!(pool.connections(), 1);
            let start = Instant::now();
            while pool.connections() > 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "{wire:?} never closed"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(start.elapsed() >= Duration::from_millis(80), "{wire:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(server.ended.load(Ordering::SeqCst), ended + 1, "{wire:?}");
        }
    }

    #[tokio::test]
    async fn connect_timeout_bounds_connecting() {
        let pool = Pool::new(
            "c",
            Limits {
                connect_timeout: Some(Duration::from_millis(100)),
                ..Limits::UNLIMITED
            },
            None,
        );
        let key = key("127.0.0.1:9".parse().unwrap(), Wire::Http1);
        let req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        let start = Instant::now();
        let never = || async {
            std::future::pending::<()>().await;
            Ok::<BoxedIo, anyhow::Error>(Box::new(tokio::io::empty()))
        };
        let error = pool.send(&key, req, never).await.unwrap_err();
        assert!(matches!(error, SendError::Connect(_)), "{error}");
        assert!(error.to_string().contains("connect timeout"), "{error}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            pool.connections(),
            0,
            "the failed connection is not counted"
        );
    }

    #[tokio::test]
    async fn tcp_connections_count_against_max_connections() {
        let pool = Pool::new("c", limits(2, 0, 0), None);
        let first = pool.admit_connection().unwrap();
        let _second = pool.admit_connection().unwrap();
        let overflow = pool.admit_connection().err().unwrap();
        assert_eq!((overflow.limit, overflow.max), (Limit::Connections, 2));
        drop(first);
        assert!(pool.admit_connection().is_ok());
    }
}
