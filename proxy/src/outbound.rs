//! The outbound capture listener (15001): the application's connections, redirected by iptables,
//! forwarded to their original destination.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::capture::CaptureListener;
use crate::destination;
use crate::forward;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::state::ProxyState;

pub struct Outbound(CaptureListener);

impl Outbound {
    pub async fn new(addr: SocketAddr, state: Arc<ProxyState>) -> io::Result<Self> {
        CaptureListener::bind(addr, state, "outbound")
            .await
            .map(Self)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    pub async fn run(self) {
        self.0.run(handle).await
    }
}

async fn handle(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
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
