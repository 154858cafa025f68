//! The outbound capture listener (15001): the application's connections, redirected by iptables,
//! forwarded to their original destination.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::destination;
use crate::forward;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::orig_dst;
use crate::state::ProxyState;

pub struct Outbound {
    listener: TcpListener,
    state: Arc<ProxyState>,
}

impl Outbound {
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
                Err(e) => warn!(error = %e, "outbound accept failed"),
            }
        }
        info!("outbound listener stopped accepting");
    }
}

async fn handle(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, listen_port: u16) {
    let dst = match orig_dst::original_dst(&stream) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(%peer, error = %e, "outbound connection without an original destination (not redirected), refusing");
            return;
        }
    };
    let local = stream.local_addr().unwrap_or(dst);
    if orig_dst::is_own_listener(dst, local, listen_port) {
        warn!(%peer, %dst, "connection to the outbound listener itself was not redirected, refusing");
        return;
    }
    let config = state.current_config();
    let found = destination::lookup(&config, dst);
    let labels = labels(&state, found.as_ref());
    if !destination::outbound_allowed(&config, found.as_ref()) {
        let mut labels = labels;
        labels.response_flags = "NR".into();
        drop(state.metrics.open_connection(labels));
        info!(%peer, %dst, "outbound destination not in the registry, closing (REGISTRY_ONLY)");
        return;
    }
    let upstream = match forward::connect(dst, None, state.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let mut labels = labels;
            labels.response_flags = "UF".into();
            drop(state.metrics.open_connection(labels));
            warn!(%peer, %dst, error = %e, "outbound upstream connect failed");
            return;
        }
    };
    let connection = state.metrics.open_connection(labels);
    match forward::relay(stream, upstream, &connection.bytes).await {
        Ok(totals) => {
            debug!(%peer, %dst, received = totals.received, sent = totals.sent, "outbound connection closed")
        }
        Err(e) => debug!(%peer, %dst, error = %e, "outbound connection ended with an error"),
    }
}

fn labels(state: &ProxyState, found: Option<&destination::Destination<'_>>) -> TcpLabels {
    let workload = &state.workload;
    let mut labels = TcpLabels::unknown("source");
    labels.source_workload = workload.name.clone();
    labels.source_workload_namespace = workload.namespace.clone();
    labels.source_principal = workload.spiffe_id().to_string();
    if let Some(found) = found {
        let service = found.service;
        let hostname = service.hostnames.first().map_or(UNKNOWN, String::as_str);
        labels = labels.with_service(hostname, &service.namespace);
        labels.destination_workload_namespace = service.namespace.clone();
        if let Some(identity) = found.endpoint.and_then(|e| e.identity.as_ref()) {
            labels.destination_principal = identity.clone();
        }
    }
    labels
}
