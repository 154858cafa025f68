//! Opaque TCP forwarding: connecting upstream and relaying bytes both ways with half-close.
//!
//! [`relay`] is generic over the stream types so that later layers (mutual TLS, protocol
//! detection) can wrap either side and still reuse it.
//!
//! Kept by hand rather than `tokio::io::copy_bidirectional`: the relay counts bytes per
//! direction while they flow (the TCP byte metrics move during a long connection, not only at
//! its end).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BUFFER_SIZE: usize = 16 * 1024;

/// Connects to `dst`, optionally from a fixed local source address, within `timeout`.
pub async fn connect(
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where [`relay`] counts bytes while they flow (Istio's direction names).
#[derive(Clone, Default)]
pub struct ByteCounters {
    /// Downstream → upstream (the request direction).
    pub received: Counter,
    /// Upstream → downstream (the response direction).
    pub sent: Counter,
}

/// Totals of one relayed connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub received: u64,
    pub sent: u64,
}

/// Copies bytes both ways until both directions have ended. When one side finishes sending
/// (FIN), the write half of the other side is shut down and the opposite direction keeps flowing.
/// An error in either direction ends both.
pub async fn relay<D, U>(downstream: D, upstream: U, counters: &ByteCounters) -> io::Result<Relayed>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let (received, sent) = tokio::try_join!(
        copy_one_way(&mut down_read, &mut up_write, &counters.received),
        copy_one_way(&mut up_read, &mut down_write, &counters.sent),
    )?;
    Ok(Relayed { received, sent })
}

async fn copy_one_way<R, W>(reader: &mut R, writer: &mut W, counter: &Counter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
        counter.inc_by(n as u64);
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An echo server that, after its peer half-closes, sends a trailer and closes.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut data = Vec::new();
            stream.read_to_end(&mut data).await.unwrap();
            stream.write_all(&data).await.unwrap();
            stream.write_all(b"|bye").await.unwrap();
        });
        addr
    }

    /// A tiny proxy: accept one connection and relay it to `upstream` from `source`.
    async fn relay_once(
        upstream: SocketAddr,
        source: Option<IpAddr>,
        counters: ByteCounters,
    ) -> (SocketAddr, tokio::task::JoinHandle<Relayed>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (down, _) = listener.accept().await.unwrap();
            let up = connect(upstream, source, Duration::from_secs(2))
                .await
                .unwrap();
            relay(down, up, &counters).await.unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn relays_both_ways_and_keeps_the_reply_flowing_after_client_half_close() {
        let server = echo_server().await;
        let counters = ByteCounters::default();
        let (proxy, task) = relay_once(server, None, counters.clone()).await;

        let mut client = TcpStream::connect(proxy).await.unwrap();
        client.write_all(b"hello through the proxy").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();

        assert_eq!(reply, b"hello through the proxy|bye");
        let relayed = task.await.unwrap();
        assert_eq!(
            relayed,
            Relayed {
                received: 23,
                sent: 27
            }
        );
        assert_eq!(counters.received.get(), 23);
        assert_eq!(counters.sent.get(), 27);
    }

    #[tokio::test]
    async fn counts_bytes_while_the_connection_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(b"pong").await.unwrap();
            // Hold the connection open.
            let _ = stream.read_to_end(&mut Vec::new()).await;
        });
        let counters = ByteCounters::default();
        let (proxy, _task) = relay_once(server, None, counters.clone()).await;
        let mut client = TcpStream::connect(proxy).await.unwrap();
        client.write_all(b"ping!").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        assert_eq!(counters.received.get(), 5);
        assert_eq!(counters.sent.get(), 4);
    }

    #[tokio::test]
    async fn upstream_sees_the_fixed_source_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut stream, peer) = listener.accept().await.unwrap();
            stream.write_all(b"x").await.unwrap();
            peer
        });
        let source: IpAddr = "127.0.0.6".parse().unwrap();
        let (proxy, _task) = relay_once(server, Some(source), ByteCounters::default()).await;
        let mut client = TcpStream::connect(proxy).await.unwrap();
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(peer.await.unwrap().ip(), source);
    }

    #[tokio::test]
    async fn connect_fails_fast_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(addr, None, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}
