//! The outbound capture listener (15001): the application's connections, redirected by iptables.
//! A connection to a service VIP goes to a ready endpoint of the service port chosen by the
//! cluster's load balancer, one to an endpoint's address to that endpoint; either way with mutual TLS when the
//! endpoint is meshed. Anything else is passed through to its original destination
//! (`ALLOW_ANY`) or refused (`REGISTRY_ONLY`). A service without addresses (a ServiceEntry
//! without `addresses`) is found by the ClientHello's server name on the dialled port, as
//! Istio's listener per port does.
//!
//! A VIP whose service port has a VirtualService follows its `tls` routes (by the ClientHello's
//! SNI, see [`sniff::server_name`]) and `tcp` routes: the chosen weighted destination's cluster
//! gives the endpoint. A cluster whose DestinationRule sets `tls.mode` `SIMPLE` or `MUTUAL` gets
//! TLS the proxy originates instead of the mesh's mutual TLS.
//!
//! HTTP connections (the service port declares `http`, `http2` or `grpc`; or, with no declared
//! protocol, the first bytes are HTTP) are handed to [`crate::outbound::http`], which chooses the
//! endpoint per request instead; everything else is relayed as opaque TCP here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};
use trellis_config::proxy::{Endpoint, MESH_ALPN, ProxyConfig};

use crate::capture::{self, CaptureListener, Refusal};
use crate::destination::{self, Destination};
use crate::http::pool::{BoxedIo, ConnectionGuard};
use crate::metrics::{TcpLabels, flags, values};
use crate::route;
use crate::route::{ConnectionAttributes, Target};
use crate::sniff::{self, Sniffed};
use crate::state::ProxyState;
use crate::tls::mtls::MeshTls;
use crate::tls::origination;
use crate::upstream::connect::{self, Security};
use crate::upstream::{PickError, Picked};

pub mod http;

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
    let mut found = destination::lookup(&config, dst);
    // A known port's declared protocol decides; otherwise the first bytes (opaque when the
    // application stays silent, so a server-speaks-first protocol is only delayed by the
    // detection timeout).
    let sniffed = match &found {
        Some(_) => None,
        None => Some(sniff::detect_protocol(&stream).await.unwrap_or_else(|e| {
            debug!(error = %e, "outbound connection failed before its first bytes");
            Sniffed::Opaque
        })),
    };
    let http = match (&found, sniffed) {
        (Some(found), _) => crate::http::is_http(found.port.protocol),
        (None, sniffed) => sniffed.is_some_and(Sniffed::is_http),
    };
    // HTTP finds its service per request (by the authority when the address names none) and
    // answers a host outside the registry itself (`REGISTRY_ONLY`: 502).
    if http {
        http::serve(state, stream, peer, dst).await;
        return;
    }
    if sniffed == Some(Sniffed::Tls) {
        match sniff::server_name(&stream).await {
            Ok(Some(name)) => found = destination::lookup_host(&config, &name, dst.port()),
            Ok(None) => {}
            Err(e) => debug!(error = %e, "connection failed before its ClientHello"),
        }
    }
    let mut labels = labels(&state, found.as_ref());
    match connect_upstream(&state, &config, found.as_ref(), &stream, dst, &mut labels).await {
        Ok((upstream, addr, _admitted)) => {
            capture::serve(&state, labels, stream, upstream, peer, addr).await;
        }
        Err(refusal) => refusal.record(&state, labels),
    }
}

/// The upstream connection for an opaque TCP connection to `dst` (`found` when it is a known
/// destination), secured as the endpoint needs, with its address and the admission that counts
/// against the cluster's `tcp.maxConnections` for the connection's life. `labels` gain the
/// service and the security the connection gets.
async fn connect_upstream(
    state: &ProxyState,
    config: &ProxyConfig,
    found: Option<&Destination<'_>>,
    stream: &TcpStream,
    dst: SocketAddr,
    labels: &mut TcpLabels,
) -> Result<(BoxedIo, SocketAddr, Option<ConnectionGuard>), Refusal> {
    if !destination::outbound_allowed(config, found) {
        return Err(Refusal::policy(
            flags::NO_ROUTE,
            "outbound destination not in the registry, closing (REGISTRY_ONLY)",
        ));
    }
    let target = match found {
        None => None,
        Some(found) => match l4_target(state, config, found, dst, stream).await {
            Ok(target) => Some(target),
            Err(host) => {
                return Err(Refusal::policy(
                    flags::NO_CLUSTER_FOUND,
                    format!("route destination {host} has no service, closing"),
                ));
            }
        },
    };
    if let Some(target) = &target {
        set_destination_service(labels, target.hostname(), &target.service.namespace);
    }
    let picked = match (found, &target) {
        (Some(found), Some(target)) => match pick_tcp(state, target, found, dst) {
            Some(picked) => Some(picked),
            None => {
                return Err(Refusal::policy(
                    flags::NO_HEALTHY_UPSTREAM,
                    format!("no ready endpoint of {}, closing", found.hostname()),
                ));
            }
        },
        _ => None,
    };
    let admitted = picked
        .as_ref()
        .map(Picked::admit_connection)
        .transpose()
        .map_err(|overflow| {
            Refusal::policy(
                flags::UPSTREAM_OVERFLOW,
                format!("connection limit reached ({overflow}), closing"),
            )
        })?;
    let upstream = picked.as_ref().map_or(dst, |p| p.addr);
    let endpoint = picked.as_ref().and_then(|p| p.endpoint);
    let connect_timeout = picked
        .as_ref()
        .map_or(state.connect_timeout, Picked::connect_timeout);
    let hostname = target.as_ref().map_or("", Target::hostname);
    let cluster_tls = target
        .as_ref()
        .and_then(|t| t.cluster)
        .and_then(|c| c.tls.as_ref());
    let mesh = if origination::mesh_tls_allowed(cluster_tls) {
        mesh_peer(state, config, endpoint, upstream.port()).map_err(|e| {
            Refusal::failure(
                flags::UPSTREAM_FAILURE,
                format!("mutual TLS to {upstream} unavailable: {e:#}"),
            )
        })?
    } else {
        None
    };
    let security = match (
        &mesh,
        cluster_tls.filter(|tls| origination::originates(tls)),
    ) {
        (Some((tls, peer_id)), _) => {
            labels.source_principal = tls.local_id().to_string().into();
            labels.destination_principal = (*peer_id).into();
            labels.connection_security_policy = values::mutual_tls();
            Security::Mesh {
                tls,
                peer: peer_id,
                alpn: MESH_ALPN,
            }
        }
        // DestinationRule `tls.mode` SIMPLE/MUTUAL: the application's bytes go inside TLS the
        // proxy originates (egress TLS origination for a TCP port).
        (None, Some(tls)) => {
            labels.connection_security_policy = values::plaintext();
            Security::Originate { tls, alpn: None }
        }
        (None, None) => {
            labels.connection_security_policy = values::plaintext();
            Security::Plain
        }
    };
    let connection = connect::connect(upstream, hostname, &security, connect_timeout)
        .await
        .map_err(|e| {
            Refusal::failure(
                flags::UPSTREAM_FAILURE,
                format!("outbound upstream connection failed: {e}"),
            )
        })?;
    debug!(%upstream, "upstream connected");
    Ok((connection, upstream, admitted))
}

/// The cluster an opaque connection to `found` goes to. For a VIP with a VirtualService: the
/// first `tls` route whose `sniHosts` match the ClientHello's server name (peeked, only when the
/// table has TLS routes), else the first matching `tcp` route (port, destinationSubnets,
/// sourceLabels), a weighted destination drawn per connection; without a matching route, the
/// service port itself. Err: the chosen destination's host has no service.
async fn l4_target<'a>(
    state: &ProxyState,
    config: &'a ProxyConfig,
    found: &Destination<'a>,
    dst: SocketAddr,
    stream: &TcpStream,
) -> Result<Target<'a>, String> {
    let default = route::default_target(config, found);
    let Some(table) = route::route_table(config, found).filter(|_| found.endpoint.is_none()) else {
        return Ok(default);
    };
    let connection = ConnectionAttributes {
        destination_ip: dst.ip(),
        port: found.port.port,
        source_labels: &state.workload.labels,
        source_namespace: &state.workload.namespace,
    };
    let mut destinations = None;
    if !table.tls.is_empty() {
        match sniff::server_name(stream).await {
            Ok(Some(name)) => {
                destinations =
                    route::match_tls(config, found, &name, &connection).map(|r| &r.route);
                debug!(
                    sni = name,
                    matched = destinations.is_some(),
                    "TLS route lookup"
                );
            }
            Ok(None) => debug!("no server name in the first bytes: TLS routes skipped"),
            Err(e) => debug!(error = %e, "connection failed before its ClientHello"),
        }
    }
    let destinations =
        destinations.or_else(|| route::match_tcp(config, found, &connection).map(|r| &r.route));
    let Some(chosen) = destinations.and_then(|d| route::pick_weighted(d, rand::random())) else {
        return Ok(default);
    };
    route::resolve_target(
        config,
        &chosen.host,
        &chosen.subset,
        chosen.port,
        found.port.port,
    )
    .ok_or_else(|| chosen.host.clone())
}

/// The endpoint of an opaque TCP connection to `target`'s cluster, by its load balancer
/// (outlier ejections apply); the endpoint itself when the application dialled one or the
/// policy is `PASSTHROUGH`. `None`: no healthy endpoint.
fn pick_tcp<'a>(
    state: &ProxyState,
    target: &Target<'a>,
    found: &Destination<'a>,
    dst: SocketAddr,
) -> Option<Picked<'a>> {
    if found.endpoint.is_some() {
        return Some(state.upstreams.passthrough(target, dst));
    }
    match state.upstreams.pick(target, None, &[]) {
        Ok(picked) => Some(picked),
        Err(PickError::Passthrough(_)) => Some(state.upstreams.passthrough(target, dst)),
        Err(PickError::NoHealthyUpstream(_)) => None,
        Err(e @ PickError::Unresolved { .. }) => {
            warn!(error = %e, "no endpoint");
            None
        }
    }
}

/// The TLS settings and the SPIFFE ID to require when `endpoint` is meshed and has an identity;
/// `None` for plain TCP: to non-meshed endpoints, to ports the endpoint's PeerAuthentication
/// sets to DISABLE (Istio's auto mTLS), and from a proxy that holds no certificate (static mode
/// without one).
pub(crate) fn mesh_peer<'a>(
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

pub(crate) fn labels(state: &ProxyState, found: Option<&Destination<'_>>) -> TcpLabels {
    let mut labels = state.outbound_labels.clone();
    if let Some(found) = found {
        set_destination_service(&mut labels, found.hostname(), &found.service.namespace);
    }
    labels
}

/// Points an outbound connection's labels at the service `hostname` in `namespace`; the
/// destination workload is taken to live in its service's namespace.
pub(crate) fn set_destination_service(labels: &mut TcpLabels, hostname: &str, namespace: &str) {
    labels.set_service(hostname, namespace);
    labels.destination_workload_namespace = labels.destination_service_namespace.clone();
}
