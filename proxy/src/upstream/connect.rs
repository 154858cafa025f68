//! One way to open a connection to a chosen endpoint, for the opaque TCP path and the HTTP
//! pool alike: the TCP connect, then the security the endpoint gets — the mesh's mutual TLS
//! (with the SPIFFE ID the endpoint must present), TLS the proxy originates for a
//! DestinationRule's `tls` (`SIMPLE` / `MUTUAL`), or none — each handshake within the cluster's
//! connect timeout.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use trellis_config::traffic::ClientTls;

use crate::forward;
use crate::http::pool::BoxedIo;
use crate::tls::mtls::{self, MeshTls};
use crate::tls::origination;

/// How a connection to an endpoint is secured.
pub enum Security<'a> {
    /// Plain TCP: a non-meshed endpoint, a port its PeerAuthentication sets to DISABLE, or a
    /// proxy without a certificate.
    Plain,
    /// The mesh's mutual TLS; the endpoint must present `peer`. `alpn` is the one protocol
    /// offered and the one the endpoint must agree to: it tells the inbound side what the
    /// stream carries (`MESH_ALPN` opaque bytes, `MESH_H2_ALPN` the mesh's HTTP/2).
    Mesh {
        tls: &'a MeshTls,
        peer: &'a str,
        alpn: &'static [u8],
    },
    /// TLS the proxy originates (DestinationRule `tls.mode` `SIMPLE` / `MUTUAL`), offering
    /// `alpn` (none for opaque TCP).
    Originate {
        tls: &'a ClientTls,
        alpn: Option<&'static [u8]>,
    },
}

/// Why a connection to an endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {error}")]
    Tcp {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("{0:#}")]
    Handshake(anyhow::Error),
}

/// A connection to `addr`, secured as `security` says; `hostname` is the service the endpoint
/// belongs to (the server name of the TLS handshake). `timeout` bounds the TCP connect and,
/// separately, the handshake.
pub async fn connect(
    addr: SocketAddr,
    hostname: &str,
    security: &Security<'_>,
    timeout: Duration,
) -> Result<BoxedIo, ConnectError> {
    let tcp = forward::connect(addr, None, timeout)
        .await
        .map_err(|error| ConnectError::Tcp { addr, error })?;
    match security {
        Security::Plain => Ok(Box::new(tcp)),
        Security::Originate { tls, alpn } => {
            origination::originate(tls, hostname, *alpn, tcp, timeout)
                .await
                .map(|stream| Box::new(stream) as BoxedIo)
                .map_err(ConnectError::Handshake)
        }
        Security::Mesh { tls, peer, alpn } => {
            mesh_handshake(tls, peer, alpn, hostname, tcp, addr, timeout)
                .await
                .map_err(ConnectError::Handshake)
        }
    }
}

async fn mesh_handshake(
    tls: &MeshTls,
    peer: &str,
    alpn: &'static [u8],
    hostname: &str,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<BoxedIo> {
    let connector = tls.connector(peer)?;
    let handshake = connector
        .with_alpn(vec![alpn.to_vec()])
        .connect(mtls::server_name(hostname), tcp);
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| anyhow::anyhow!("mutual TLS handshake with {addr} timed out"))?
        .with_context(|| format!("mutual TLS handshake with {addr} (expecting {peer})"))?;
    if stream.get_ref().1.alpn_protocol() != Some(alpn) {
        anyhow::bail!(
            "{addr} did not agree to ALPN {}",
            String::from_utf8_lossy(alpn)
        );
    }
    Ok(Box::new(stream))
}
