//! The inbound capture listener (15006): connections to the pod's ports, redirected by iptables,
//! forwarded to the application from source 127.0.0.6 (which the capture rules exempt).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::destination;
use crate::forward;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::orig_dst;
use crate::state::ProxyState;

/// Source address of forwarded inbound connections, as in Istio's inbound passthrough.
pub const INBOUND_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

pub struct Inbound {
    listener: TcpListener,
    state: Arc<ProxyState>,
}

impl Inbound {
    pub async fn new(addr: SocketAddr, state: Arc<ProxyState>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts; each connection runs in its own task.
    pub async fn run(self) {
        let port = self.listener.local_addr().map(|a| a.port()).unwrap_or(0);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = self.state.drain.started() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let state = self.state.clone();
                    self.state
                        .drain
                        .spawn_connection(handle(state, stream, peer, port));
                }
                Err(e) => warn!(error = %e, "inbound accept failed"),
            }
        }
        info!("inbound listener stopped accepting");
    }
}

async fn handle(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, listen_port: u16) {
    let dst = match orig_dst::original_dst(&stream) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(%peer, error = %e, "inbound connection without an original destination (not redirected), refusing");
            return;
        }
    };
    let local = stream.local_addr().unwrap_or(dst);
    if orig_dst::is_own_listener(dst, local, listen_port) {
        warn!(%peer, %dst, "connection to the inbound listener itself was not redirected, refusing");
        return;
    }
    let labels = labels(&state, dst);
    let upstream = match forward::connect(dst, Some(INBOUND_SOURCE), state.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let mut labels = labels;
            labels.response_flags = "UF".into();
            drop(state.metrics.open_connection(labels));
            warn!(%peer, %dst, error = %e, "inbound connect to the application failed");
            return;
        }
    };
    let connection = state.metrics.open_connection(labels);
    match forward::relay(stream, upstream, &connection.bytes).await {
        Ok(totals) => {
            debug!(%peer, %dst, received = totals.received, sent = totals.sent, "inbound connection closed")
        }
        Err(e) => debug!(%peer, %dst, error = %e, "inbound connection ended with an error"),
    }
}

fn labels(state: &ProxyState, dst: SocketAddr) -> TcpLabels {
    let workload = &state.workload;
    let mut labels = TcpLabels::unknown("destination");
    labels.destination_workload = workload.name.clone();
    labels.destination_workload_namespace = workload.namespace.clone();
    labels.destination_principal = workload.spiffe_id().to_string();
    labels.connection_security_policy = "none".into();
    let config = state.current_config();
    if let Some(found) = destination::lookup(&config, dst) {
        let hostname = found
            .service
            .hostnames
            .first()
            .map_or(UNKNOWN, String::as_str);
        labels = labels.with_service(hostname, &found.service.namespace);
    }
    labels
}
