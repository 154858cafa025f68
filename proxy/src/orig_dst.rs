//! The original destination of a connection redirected by iptables: `SO_ORIGINAL_DST` for IPv4,
//! `IP6T_SO_ORIGINAL_DST` (ip6tables) for IPv6, chosen by the family the listener accepted it on.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Whether `dst` is the capture listener itself: the connection was not redirected (someone
/// dialled the listener directly), and forwarding it would loop back into the proxy.
pub fn is_own_listener(dst: SocketAddr, local: SocketAddr, listen_port: u16) -> bool {
    dst == local
        || (dst.port() == listen_port && (dst.ip().is_loopback() || dst.ip() == local.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_direct_dial_of_the_listener() {
        let local: SocketAddr = "10.0.0.5:15001".parse().unwrap();
        assert!(is_own_listener(local, local, 15001));
        assert!(is_own_listener(
            "127.0.0.1:15001".parse().unwrap(),
            local,
            15001
        ));
        assert!(!is_own_listener(
            "10.96.0.10:80".parse().unwrap(),
            local,
            15001
        ));
        assert!(!is_own_listener(
            "10.96.0.10:15001".parse().unwrap(),
            local,
            15001
        ));
    }
}
