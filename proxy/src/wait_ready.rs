//! `trellis-proxy wait-ready`: blocks until the local proxy answers 200 on its readiness port.
//! The injector runs it as the proxy container's postStart hook, so the kubelet starts the
//! application containers only once the proxy can carry their traffic.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// One readiness probe: `true` on an HTTP 200.
fn probe(address: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.write_all(
        b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.1 200"))
}

/// Polls until ready (Ok) or until `timeout` passes (Err with the last observation).
pub fn wait(port: u16, timeout: Duration) -> Result<(), String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    loop {
        let last = match probe(address) {
            Ok(true) => return Ok(()),
            Ok(false) => "not ready yet".to_owned(),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(format!(
                "proxy on {address} not ready after {timeout:?}: {last}"
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(status_line: &'static str) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(status_line.as_bytes());
            }
        });
        port
    }

    #[test]
    fn returns_once_ready_and_times_out_otherwise() {
        let ready = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(wait(ready, Duration::from_secs(2)), Ok(()));
        let not_ready = serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        let err = wait(not_ready, Duration::from_millis(500)).unwrap_err();
        assert!(err.contains("not ready yet"), "{err}");
        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(wait(closed, Duration::from_millis(300)).is_err());
    }
}
