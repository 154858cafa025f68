//! The inbound capture listener (15006): connections to the pod's ports, redirected by iptables,
//! forwarded to the application from source 127.0.0.6 or `::6` (which the capture rules exempt)
//! on the address they were sent to, the pod's ([`connect_app`]).
//!
//! The first bytes of each connection are peeked to tell a sidecar's mutual TLS (a ClientHello
//! offering a mesh ALPN) from anything else; the port's PeerAuthentication mode then decides
//! (see [`decide`]). Mesh TLS is terminated with the workload certificate and a client
//! certificate verified against the trust bundle.
//!
//! What the (decrypted) stream then carries decides who serves it: HTTP (the mesh HTTP/2 ALPN,
//! a port a local service declares `http`/`http2`/`grpc`, or, with no declaration, HTTP first
//! bytes) goes to [`crate::inbound::http`]; everything else is forwarded to the application
//! untouched.

pub mod http;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;
use trellis_config::SpiffeId;
use trellis_config::proxy::{MESH_H2_ALPN, PeerAuthenticationMode, Protocol, ProxyConfig};
use trellis_config::wellknown::{INBOUND_PASSTHROUGH_SOURCE_V4, INBOUND_PASSTHROUGH_SOURCE_V6};

use crate::authz;
use crate::capture::{self, CaptureListener, Refusal};
use crate::destination;
use crate::forward;
use crate::http::rewind::Rewind;
use crate::metrics::{TcpLabels, flags, values};
use crate::sniff::{self, Detected};
use crate::state::ProxyState;
use crate::tls::mtls;

/// Source address of forwarded inbound connections, as in Istio's inbound passthrough: 127.0.0.6,
/// or `::6` towards an IPv6 application address (the capture rules let exactly these through).
pub fn inbound_source(app: IpAddr) -> IpAddr {
    match app {
        IpAddr::V4(_) => INBOUND_PASSTHROUGH_SOURCE_V4.into(),
        IpAddr::V6(_) => INBOUND_PASSTHROUGH_SOURCE_V6.into(),
    }
}

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

/// What happens to an inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Terminate the mesh TLS and forward the decrypted stream.
    TerminateMtls,
    /// Forward the bytes untouched (plaintext, or TLS the application terminates itself).
    Forward,
    /// Close at once: the port requires mesh mutual TLS.
    Refuse,
}

/// The decision by the port's mode and what the first bytes are (`None`: not looked at, since
/// DISABLE forwards whatever arrives and needs no detection). A silent connection counts as
/// not mesh TLS: plaintext under PERMISSIVE, refused under STRICT.
pub fn decide(mode: PeerAuthenticationMode, detected: Option<Detected>) -> Action {
    use PeerAuthenticationMode::{Disable, Permissive, Strict};
    match (mode, detected) {
        // Istio does the same: under DISABLE the application gets mesh TLS bytes as they are.
        (Disable, _) => Action::Forward,
        (Permissive | Strict, Some(Detected::MeshTls)) => Action::TerminateMtls,
        (Permissive, _) => Action::Forward,
        (Strict, _) => Action::Refuse,
    }
}

async fn handle(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    let config = state.current_config();
    let mode = config.inbound.mode_for(dst.port());
    let detected = if mode == PeerAuthenticationMode::Disable {
        None
    } else {
        match sniff::detect(&stream).await {
            Ok(detected) => Some(detected),
            Err(e) => {
                debug!(%peer, %dst, error = %e, "inbound connection failed before its first bytes");
                return;
            }
        }
    };
    let labels = labels(&state, &config, dst);
    match decide(mode, detected) {
        Action::Refuse => {
            Refusal::policy(
                flags::NO_ROUTE,
                format!(
                    "connection without mesh mutual TLS refused (STRICT), first bytes {detected:?}"
                ),
            )
            .record(&state, labels);
        }
        Action::Forward => {
            let declared = declared_protocol(&config, dst);
            if plaintext_is_http(declared, detected, &stream).await {
                let http = http::Connection {
                    state: state.clone(),
                    peer,
                    dst,
                    labels,
                    peer_principal: None,
                    sni: None,
                    declared,
                };
                http.serve(stream).await;
            } else if authz::admit_tcp(&state, &labels, peer, dst, None, None)
                && let Some(app) = forward_to_app(&state, &labels, dst).await
            {
                capture::serve(&state, labels, stream, app, peer, dst).await;
            }
        }
        Action::TerminateMtls => terminate(&state, &config, labels, stream, peer, dst).await,
    }
}

/// The protocol a local service port declares for `dst` (the workload's address and port).
fn declared_protocol(config: &ProxyConfig, dst: SocketAddr) -> Option<Protocol> {
    destination::lookup(config, dst).map(|found| found.port.protocol)
}

/// Whether a plaintext connection carries HTTP: as declared, else as its first bytes say. A
/// connection already found silent is opaque without waiting again.
async fn plaintext_is_http(
    declared: Option<Protocol>,
    detected: Option<Detected>,
    stream: &TcpStream,
) -> bool {
    if let Some(protocol) = declared {
        return crate::http::is_http(protocol);
    }
    if detected == Some(Detected::Silent) {
        return false;
    }
    sniff::detect_protocol(stream)
        .await
        .is_ok_and(sniff::Sniffed::is_http)
}

/// Mesh TLS: handshake with a verified client certificate, then the decrypted stream to the app.
async fn terminate(
    state: &Arc<ProxyState>,
    config: &ProxyConfig,
    mut labels: TcpLabels,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    labels.connection_security_policy = values::mutual_tls();
    let tls = match state.current_identity() {
        Some(identity) => state.mesh_tls.get(&identity, config),
        None => Err(anyhow::anyhow!("no workload certificate")),
    };
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            Refusal::failure(
                flags::NO_ROUTE,
                format!("cannot terminate mesh mutual TLS, closing: {e:#}"),
            )
            .record(state, labels);
            return;
        }
    };
    labels.destination_principal = tls.local_id().to_string().into();
    let handshake = async {
        let stream = tls.acceptor().accept(stream).await?;
        let peer_id = mtls::peer_id(stream.get_ref().1)?;
        anyhow::Ok((stream, peer_id))
    };
    let (stream, peer_id) = match tokio::time::timeout(state.connect_timeout, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            Refusal::failure(
                flags::DOWNSTREAM_PROTOCOL_ERROR,
                format!("mesh mutual TLS handshake failed: {e:#}"),
            )
            .record(state, labels);
            return;
        }
        Err(_) => {
            Refusal::failure(
                flags::DOWNSTREAM_PROTOCOL_ERROR,
                "mesh mutual TLS handshake timed out",
            )
            .record(state, labels);
            return;
        }
    };
    if let Ok(id) = peer_id.parse::<SpiffeId>() {
        labels.source_workload_namespace = id.namespace.into();
    }
    labels.source_principal = peer_id.as_str().into();
    debug!(%peer, %dst, source_principal = %labels.source_principal, "mesh mutual TLS accepted");
    let declared = declared_protocol(config, dst);
    let mesh_http = stream.get_ref().1.alpn_protocol() == Some(MESH_H2_ALPN);
    let sni = stream.get_ref().1.server_name().map(str::to_owned);
    let mut stream = stream;
    // Bytes read to sniff an undeclared port are replayed in front of the stream.
    let (http, prefix) = match declared {
        _ if mesh_http => (true, Vec::new()),
        Some(protocol) => (crate::http::is_http(protocol), Vec::new()),
        None => match sniff::read_protocol(&mut stream).await {
            Ok((sniffed, prefix)) => (sniffed.is_http(), prefix),
            Err(e) => {
                debug!(%peer, %dst, error = %e, "mesh connection failed before its first bytes");
                return;
            }
        },
    };
    let stream = Rewind::new(prefix, stream);
    if http {
        let http = http::Connection {
            state: state.clone(),
            peer,
            dst,
            labels,
            peer_principal: Some(peer_id),
            sni,
            declared,
        };
        http.serve(stream).await;
    } else if authz::admit_tcp(state, &labels, peer, dst, Some(&peer_id), sni.as_deref())
        && let Some(app) = forward_to_app(state, &labels, dst).await
    {
        capture::serve(state, labels, stream, app, peer, dst).await;
    }
}

/// Connects to the application on `dst`, the address the connection or request was sent to
/// (the pod's address and port), from [`inbound_source`]. Never on loopback: an application
/// that listens on `127.0.0.1` only is not reachable from the network through the sidecar, as
/// with Istio since 1.10 (and as without a mesh); it must listen on the pod's address (or all
/// addresses) to be served.
pub(crate) async fn connect_app(dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    forward::connect(dst, Some(inbound_source(dst.ip())), timeout).await
}

/// [`connect_app`] for an opaque connection; a failure is counted and logged.
async fn forward_to_app(
    state: &ProxyState,
    labels: &TcpLabels,
    dst: SocketAddr,
) -> Option<TcpStream> {
    match connect_app(dst, state.connect_timeout).await {
        Ok(app) => Some(app),
        Err(e) => {
            Refusal::failure(
                flags::UPSTREAM_FAILURE,
                format!("inbound connect to the application failed: {e}"),
            )
            .record(state, labels.clone());
            None
        }
    }
}

fn labels(state: &ProxyState, config: &ProxyConfig, dst: SocketAddr) -> TcpLabels {
    let mut labels = state.inbound_labels.clone();
    if let Some(found) = destination::lookup(config, dst) {
        labels = labels.with_service(found.hostname(), &found.service.namespace);
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerAuthenticationMode::{Disable, Permissive, Strict};

    #[test]
    fn the_mode_decides_what_happens_to_mesh_tls_and_everything_else() {
        let table = [
            (Strict, Some(Detected::MeshTls), Action::TerminateMtls),
            (Strict, Some(Detected::Other), Action::Refuse),
            (Strict, Some(Detected::Silent), Action::Refuse),
            (Strict, None, Action::Refuse),
            (Permissive, Some(Detected::MeshTls), Action::TerminateMtls),
            (Permissive, Some(Detected::Other), Action::Forward),
            (Permissive, Some(Detected::Silent), Action::Forward),
            (Permissive, None, Action::Forward),
            (Disable, Some(Detected::MeshTls), Action::Forward),
            (Disable, Some(Detected::Other), Action::Forward),
            (Disable, Some(Detected::Silent), Action::Forward),
            (Disable, None, Action::Forward),
        ];
        for (mode, detected, expected) in table {
            assert_eq!(decide(mode, detected), expected, "{mode:?} {detected:?}");
        }
    }
}
