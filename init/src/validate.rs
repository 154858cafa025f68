//! The capture check of CNI mode (`trellis-init --validate`): run as an unprivileged init
//! container before the proxy starts, it listens on the outbound capture port and dials an
//! address that exists nowhere. Only the capture rules can deliver that connection to the local
//! listener; without them the dial fails and the pod is known to be uncaptured.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// TEST-NET-1 (RFC 5737): documentation addresses are never routed, so a connection to this
/// address can only complete through the REDIRECT rule.
pub const PROBE_TARGET: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("cannot listen on the outbound capture port {port}: {source}")]
    Listen { port: u16, source: io::Error },
    #[error(
        "traffic is not captured: a connection to {target} did not reach the capture port {port} ({reason}); \
         the CNI plugin was probably not installed when this pod's network was created"
    )]
    NotCaptured {
        target: SocketAddrV4,
        port: u16,
        reason: String,
    },
}

/// Succeeds when a connection to `target` is redirected to `capture_port` on this host.
pub fn validate(
    capture_port: u16,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<(), ValidationError> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, capture_port)).map_err(|source| {
        ValidationError::Listen {
            port: capture_port,
            source,
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ValidationError::Listen {
            port: capture_port,
            source,
        })?;
    let not_captured = |reason: String| ValidationError::NotCaptured {
        target,
        port: capture_port,
        reason,
    };
    let _client = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)
        .map_err(|e| not_captured(format!("connect: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(not_captured(format!("accept: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_when_nothing_redirects_the_probe() {
        // A loopback "target" that refuses: without capture the dial fails and says why.
        let refused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = match refused.local_addr().unwrap() {
            SocketAddr::V4(addr) => addr,
            SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        drop(refused);
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = validate(free, target, Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, ValidationError::NotCaptured { .. }), "{err}");
        assert!(err.to_string().contains("not captured"), "{err}");
    }

    #[test]
    fn succeeds_when_the_probe_reaches_the_capture_port() {
        // Stand-in for the redirect: the probe target is the capture port itself.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        validate(port, target, Duration::from_secs(2)).unwrap();
    }
}
