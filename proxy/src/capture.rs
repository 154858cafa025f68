//! What the two capture listeners share: the accept loop that stops when the drain starts, one
//! task per connection (with TCP_NODELAY on the accepted socket), and recovering the original
//! destination of a redirected connection (refusing connections that were not redirected, so a
//! direct dial can never loop).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::forward;
use crate::metrics::TcpLabels;
use crate::orig_dst;
use crate::state::ProxyState;

pub struct CaptureListener {
    listener: TcpListener,
    state: Arc<ProxyState>,
    /// `inbound` or `outbound`, for logs.
    direction: &'static str,
}

impl CaptureListener {
    pub async fn bind(
        addr: SocketAddr,
        state: Arc<ProxyState>,
        direction: &'static str,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            state,
            direction,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts; each redirected connection runs `handle(state, stream,
    /// peer, original destination)` in its own task, tracked by the drain.
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
                () = self.state.drain.started() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Small writes (HTTP/2 frames, handshakes) must not wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, direction, "cannot set TCP_NODELAY");
                    }
                    if let Some(dst) = redirected_destination(&stream, peer, port, direction) {
                        let task = handle(self.state.clone(), stream, peer, dst);
                        self.state.drain.spawn_connection(task);
                    }
                }
                Err(e) => warn!(error = %e, direction, "accept failed"),
            }
        }
        info!(direction, "listener stopped accepting");
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

/// Counts a connection closed before anything was relayed, with `flags` as its response flags.
pub fn count_refused(state: &ProxyState, mut labels: TcpLabels, flags: &str) {
    labels.response_flags = flags.into();
    drop(state.metrics.open_connection(labels));
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
