//! The inbound capture listener (15006): connections to the pod's ports, redirected by iptables,
//! forwarded to the application from source 127.0.0.6 (which the capture rules exempt).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::capture::CaptureListener;
use crate::destination;
use crate::forward;
use crate::metrics::{TcpLabels, UNKNOWN};
use crate::state::ProxyState;

/// Source address of forwarded inbound connections, as in Istio's inbound passthrough.
pub const INBOUND_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

pub struct Inbound(CaptureListener);

impl Inbound {
    pub async fn new(addr: SocketAddr, state: Arc<ProxyState>) -> io::Result<Self> {
        CaptureListener::bind(addr, state, "inbound")
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
