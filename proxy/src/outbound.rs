//! The outbound capture listener (15001): the application's connections, redirected by iptables.
//! A connection to a service VIP goes to a ready endpoint of the service port chosen by round
//! robin, one to an endpoint's address to that endpoint; either way with mutual TLS when the
//! endpoint is meshed. Anything else is passed through to its original destination
//! (`ALLOW_ANY`) or refused (`REGISTRY_ONLY`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use trellis_api::config::{Endpoint, ProxyConfig};

use crate::capture::{self, CaptureListener};
use crate::destination::{self, Destination};
use crate::forward;
use crate::metrics::{MUTUAL_TLS, PLAINTEXT, TcpLabels, flags};
use crate::mtls::{self, MeshTls};
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
    let mut labels = labels(&state, found.as_ref());
    if !destination::outbound_allowed(&config, found.as_ref()) {
        capture::count_refused(&state, labels, flags::NO_ROUTE);
        info!(%peer, %dst, "outbound destination not in the registry, closing (REGISTRY_ONLY)");
        return;
    }
    let (upstream, endpoint) = match &found {
        None => (dst, None),
        Some(found) => match state.balancer.pick(found) {
            Some((endpoint, addr)) => (addr, Some(endpoint)),
            None => {
                capture::count_refused(&state, labels, flags::NO_HEALTHY_UPSTREAM);
                info!(%peer, %dst, service = found.hostname(), "no ready endpoint, closing");
                return;
            }
        },
    };

    let mesh = match mesh_peer(&state, &config, endpoint, upstream.port()) {
        Ok(mesh) => mesh,
        Err(e) => {
            capture::count_refused(&state, labels, flags::UPSTREAM_FAILURE);
            warn!(%peer, %dst, %upstream, error = format!("{e:#}"), "mutual TLS unavailable");
            return;
        }
    };
    let tcp = match forward::connect(upstream, None, state.connect_timeout).await {
        Ok(tcp) => tcp,
        Err(e) => {
            capture::count_refused(&state, labels, flags::UPSTREAM_FAILURE);
            warn!(%peer, %dst, %upstream, error = %e, "outbound upstream connect failed");
            return;
        }
    };
    let Some((tls, peer_id)) = mesh else {
        labels.connection_security_policy = PLAINTEXT.into();
        capture::serve(&state, labels, stream, tcp, peer, upstream).await;
        return;
    };
    labels.source_principal = tls.local_id().to_string();
    labels.destination_principal = peer_id.to_owned();
    labels.connection_security_policy = MUTUAL_TLS.into();
    let hostname = found.as_ref().map_or("", Destination::hostname);
    let handshake = async {
        let connector = tls.connector(peer_id)?;
        let name = mtls::server_name(hostname);
        anyhow::Ok(connector.connect(name, tcp).await?)
    };
    match tokio::time::timeout(state.connect_timeout, handshake).await {
        Ok(Ok(tls_stream)) => {
            debug!(%peer, %upstream, peer_id, "mutual TLS established");
            capture::serve(&state, labels, stream, tls_stream, peer, upstream).await;
        }
        Ok(Err(e)) => {
            capture::count_refused(&state, labels, flags::UPSTREAM_FAILURE);
            warn!(%peer, %upstream, expected = peer_id, error = format!("{e:#}"), "mutual TLS handshake with the endpoint failed");
        }
        Err(_) => {
            capture::count_refused(&state, labels, flags::UPSTREAM_FAILURE);
            warn!(%peer, %upstream, expected = peer_id, "mutual TLS handshake with the endpoint timed out");
        }
    }
}

/// The TLS settings and the SPIFFE ID to require when `endpoint` is meshed and has an identity;
/// `None` for plain TCP: to non-meshed endpoints, to ports the endpoint's PeerAuthentication
/// sets to DISABLE (Istio's auto mTLS), and from a proxy that holds no certificate (static mode
/// without one).
fn mesh_peer<'a>(
    state: &ProxyState,
    config: &ProxyConfig,
    endpoint: Option<&'a Endpoint>,
    port: u16,
) -> anyhow::Result<Option<(Arc<MeshTls>, &'a str)>> {
    let Some(peer_id) = endpoint
        .filter(|e| e.meshed && !e.plaintext_ports.contains(&port))
        .and_then(|e| e.identity.as_deref())
    else {
        return Ok(None);
    };
    let Some(identity) = state.current_identity() else {
        debug!(
            peer_id,
            "no workload certificate: plain TCP to a meshed endpoint"
        );
        return Ok(None);
    };
    let tls = state.mesh_tls.get(&identity, config)?;
    Ok(Some((tls, peer_id)))
}

fn labels(state: &ProxyState, found: Option<&Destination<'_>>) -> TcpLabels {
    let workload = &state.workload;
    let mut labels = TcpLabels::unknown("source");
    labels.source_workload = workload.name.clone();
    labels.source_workload_namespace = workload.namespace.clone();
    labels.source_principal = workload.spiffe_id().to_string();
    if let Some(found) = found {
        labels = labels.with_service(found.hostname(), &found.service.namespace);
        labels.destination_workload_namespace = found.service.namespace.clone();
    }
    labels
}
