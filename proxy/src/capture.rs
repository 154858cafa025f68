//! What the two capture listeners share: the accept loop that stops when the drain starts and
//! holds the listener's connection limit, one task per connection (with TCP_NODELAY on the
//! accepted socket), and recovering the original
//! destination of a redirected connection (refusing connections that were not redirected, so a
//! direct dial can never loop). A listener on the IPv4 wildcard listens on the IPv6 wildcard too,
//! so IPv6 the capture rules redirect meets the proxy exactly as IPv4 does.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward;
use crate::limits::ConnectionCap;
use crate::metrics::TcpLabels;
use crate::orig_dst;
use crate::state::ProxyState;

pub struct CaptureListener {
    listener: TcpListener,
    /// The IPv6 wildcard on the same port, when `listener` is the IPv4 wildcard and the kernel
    /// has IPv6: redirected IPv6 connections arrive here.
    listener_v6: Option<TcpListener>,
    state: Arc<ProxyState>,
    /// `inbound` or `outbound`, for logs and the listener metrics.
    direction: &'static str,
    connections: ConnectionCap,
}

impl CaptureListener {
    pub async fn bind(
        addr: SocketAddr,
        state: Arc<ProxyState>,
        direction: &'static str,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let listener_v6 = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                ipv6_wildcard(listener.local_addr()?.port(), direction)?
            }
            _ => None,
        };
        let connections = ConnectionCap::new(state.metrics.listener(direction));
        Ok(Self {
            listener,
            listener_v6,
            state,
            direction,
            connections,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts; each redirected connection runs `handle(state, stream,
    /// peer, original destination)` in its own task, tracked by the drain. A connection beyond
    /// the config's `maxConnections` is closed as soon as it is accepted.
    pub async fn run<H, F>(self, handle: H)
    where
        H: Fn(Arc<ProxyState>, TcpStream, SocketAddr, SocketAddr) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let port = self.listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let direction = self.direction;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                accepted = accept_if_bound(self.listener_v6.as_ref()) => accepted,
                () = self.state.drain.started() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let max = self.state.current_config().limits.max_connections;
                    let Some(open) = self.connections.admit(max) else {
                        debug!(%peer, direction, max, "connection limit reached, closing");
                        continue;
                    };
                    // Small writes (HTTP/2 frames, handshakes) must not wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, direction, "cannot set TCP_NODELAY");
                    }
                    if let Some(dst) = redirected_destination(&stream, peer, port, direction) {
                        // Every line logged from the connection's task carries these fields
                        // (HTTP/2 streams run in tasks hyper spawns, outside the span).
                        let span = info_span!("connection", direction, %peer, %dst);
                        let task = handle(self.state.clone(), stream, peer, dst);
                        let task = async move {
                            task.await;
                            drop(open);
                        };
                        self.state.drain.spawn_connection(task.instrument(span));
                    }
                }
                Err(e) => warn!(error = %e, direction, "accept failed"),
            }
        }
        info!(direction, "listener stopped accepting");
    }
}

/// Linux's `EAFNOSUPPORT`: the kernel was built or booted without IPv6.
const ADDRESS_FAMILY_NOT_SUPPORTED: i32 = 97;

/// A listener on `[::]:port` that takes IPv6 only (`IPV6_V6ONLY`), so that it can sit beside the
/// IPv4 wildcard and each connection keeps its own family's addresses and original-destination
/// lookup; `None` on a kernel without IPv6, where no IPv6 can be captured either.
fn ipv6_wildcard(port: u16, direction: &str) -> io::Result<Option<TcpListener>> {
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(ADDRESS_FAMILY_NOT_SUPPORTED) => {
            info!(direction, "the kernel has no IPv6: listening on IPv4 only");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into()).map(Some)
}

/// The next connection on `listener`; never, without one.
async fn accept_if_bound(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// The destination iptables redirected the connection from, or `None` (logged) when the
/// connection was not redirected at all.
fn redirected_destination(
    stream: &TcpStream,
    peer: SocketAddr,
    listen_port: u16,
    direction: &str,
) -> Option<SocketAddr> {
    let dst = match orig_dst::original_dst(stream) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(%peer, error = %e, direction, "connection without an original destination (not redirected), refusing");
            return None;
        }
    };
    let local = stream.local_addr().unwrap_or(dst);
    if orig_dst::is_own_listener(dst, local, listen_port) {
        warn!(%peer, %dst, direction, "connection to the listener itself was not redirected, refusing");
        return None;
    }
    Some(dst)
}

/// A connection closed before anything was relayed, and why. [`Refusal::record`] is the one
/// place where such a connection is counted (the TCP connection metrics with its response flag)
/// and logged, for the inbound and the outbound path alike; the connection's span carries the
/// peer and the destination.
#[derive(Debug)]
pub struct Refusal {
    flags: &'static str,
    /// A failure on the way to the upstream (logged as a warning) rather than a refusal by
    /// policy or configuration (logged at info).
    failure: bool,
    reason: String,
}

impl Refusal {
    /// Refused by policy or configuration: `REGISTRY_ONLY`, `STRICT`, no route, RBAC, a limit.
    pub fn policy(flags: &'static str, reason: impl Into<String>) -> Self {
        Self {
            flags,
            failure: false,
            reason: reason.into(),
        }
    }

    /// Failed on the way: no certificate, a TLS handshake, the upstream connect.
    pub fn failure(flags: &'static str, reason: impl Into<String>) -> Self {
        Self {
            flags,
            failure: true,
            reason: reason.into(),
        }
    }

    /// Counts the connection under `labels` with this refusal's response flags, and logs it.
    pub fn record(self, state: &ProxyState, mut labels: TcpLabels) {
        labels.response_flags = self.flags.into();
        drop(state.metrics.open_connection(labels));
        let Self {
            flags,
            failure,
            reason,
        } = self;
        if failure {
            warn!(flags, "{reason}");
        } else {
            info!(flags, "{reason}");
        }
    }
}

/// Relays `downstream` ⇄ `upstream` (either may be a TLS stream) under `labels` until both
/// directions have ended.
pub async fn serve<D, U>(
    state: &ProxyState,
    labels: TcpLabels,
    downstream: D,
    upstream: U,
    peer: SocketAddr,
    dst: SocketAddr,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let reporter = labels.reporter.clone();
    let connection = state.metrics.open_connection(labels);
    match forward::relay(downstream, upstream, &connection.bytes).await {
        Ok(totals) => debug!(
            %peer, %dst, %reporter, received = totals.received, sent = totals.sent,
            "connection closed"
        ),
        Err(e) => debug!(%peer, %dst, %reporter, error = %e, "connection ended with an error"),
    }
}
