//! Looking at the first bytes of a connection without consuming them, to learn what it speaks:
//!
//! - on the inbound side, a sidecar's mutual TLS (a TLS ClientHello whose ALPN list offers
//!   [`MESH_ALPN`] or [`MESH_H2_ALPN`]) from everything else ([`detect`], [`classify`]);
//! - on the outbound side, the server name (SNI) of the application's own TLS ClientHello, for
//!   VirtualService `tls` routes and services found by name ([`server_name`]);
//! - on ports whose protocol is not declared, HTTP (an HTTP/1.x request line or the HTTP/2
//!   preface) from opaque TCP ([`detect_protocol`], [`read_protocol`], [`classify_http`]),
//!   within [`FIRST_BYTE_TIMEOUT`] so a server-speaks-first protocol is never stalled.
//!
//! The ClientHello is parsed by [`crate::tls::client_hello`]; the request-line parser here is
//! written by hand and defensively: any input, however short or malformed, gives an answer and
//! never a panic.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use trellis_config::proxy::{MESH_ALPN, MESH_H2_ALPN};

use crate::tls::client_hello::{self, PEEK_LIMIT};

/// How long the first byte may take. Our outbound side sends its ClientHello in the same flight
/// as the TCP handshake's last ACK, so this only bounds a lost-segment retransmit (Linux's
/// minimum RTO is 200 ms); it is also the delay a server-speaks-first protocol sees before its
/// greeting under PERMISSIVE, after which the silent connection is treated as plaintext.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a ClientHello that has started may take to arrive whole.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two peeks of an incomplete prefix (a peek returns the queued bytes at once, so
/// waiting for more cannot rely on readiness).
const REPEEK_INTERVAL: Duration = Duration::from_millis(5);

const CONTENT_TYPE_HANDSHAKE: u8 = 22;

/// What the first bytes of an inbound connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello offering a mesh ALPN: another sidecar's mutual TLS.
    MeshTls,
    /// Anything else: plaintext, the application's own TLS, garbage, or a connection closed
    /// before sending anything.
    Other,
    /// Nothing within [`FIRST_BYTE_TIMEOUT`] (a server-speaks-first protocol, or a slow client).
    Silent,
}

/// The answer for a prefix of a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The bytes so far are a valid beginning of a ClientHello; more are needed.
    NeedMore,
    Done(Detected),
}

/// What peeking until an answer gave.
enum Peeked<T> {
    /// The bytes peeked were enough to answer.
    Answer(T),
    /// The connection closed, the prefix outgrew the peek buffer or took too long to complete.
    NoAnswer,
    /// Nothing within [`FIRST_BYTE_TIMEOUT`].
    Silent,
}

/// Peeks at `stream`, at most `limit` bytes, until `answer` (`None`: need more bytes) answers
/// for its first bytes; nothing is consumed. Once the first bytes are in, the rest may take
/// `patience`.
async fn peek_until<T>(
    stream: &TcpStream,
    limit: usize,
    patience: Duration,
    mut answer: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Peeked<T>> {
    let mut buf = vec![0u8; limit];
    let mut n = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut buf)).await {
        Err(_) => return Ok(Peeked::Silent),
        Ok(peeked) => peeked?,
    };
    let deadline = Instant::now() + patience;
    loop {
        if n == 0 {
            return Ok(Peeked::NoAnswer);
        }
        if let Some(answer) = answer(&buf[..n]) {
            return Ok(Peeked::Answer(answer));
        }
        if n == buf.len() || Instant::now() >= deadline {
            return Ok(Peeked::NoAnswer);
        }
        tokio::time::sleep(REPEEK_INTERVAL).await;
        n = stream.peek(&mut buf).await?;
    }
}

/// Peeks at `stream` until its first bytes are classified; nothing is consumed.
pub async fn detect(stream: &TcpStream) -> io::Result<Detected> {
    let peeked = peek_until(
        stream,
        PEEK_LIMIT,
        CLIENT_HELLO_TIMEOUT,
        |bytes| match classify(bytes) {
            Parse::NeedMore => None,
            Parse::Done(detected) => Some(detected),
        },
    );
    Ok(match peeked.await? {
        Peeked::Answer(detected) => detected,
        Peeked::NoAnswer => Detected::Other,
        Peeked::Silent => Detected::Silent,
    })
}

/// Classifies the first bytes of a connection: mesh TLS is a ClientHello offering a mesh ALPN.
pub fn classify(bytes: &[u8]) -> Parse {
    let mut scratch = Vec::new();
    match client_hello::parse(bytes, &mut scratch) {
        client_hello::Parse::NeedMore => Parse::NeedMore,
        client_hello::Parse::NotClientHello => Parse::Done(Detected::Other),
        client_hello::Parse::ClientHello(hello) => Parse::Done(
            if hello.alpn().any(|p| p == MESH_ALPN || p == MESH_H2_ALPN) {
                Detected::MeshTls
            } else {
                Detected::Other
            },
        ),
    }
}

/// Peeks at `stream` until its ClientHello's server name is known, in lower case; `None` for a
/// connection that is not TLS, names no server, or stays silent for [`FIRST_BYTE_TIMEOUT`].
pub async fn server_name(stream: &TcpStream) -> io::Result<Option<String>> {
    let peeked = peek_until(stream, PEEK_LIMIT, CLIENT_HELLO_TIMEOUT, |bytes| {
        let mut scratch = Vec::new();
        match client_hello::parse(bytes, &mut scratch) {
            client_hello::Parse::NeedMore => None,
            client_hello::Parse::NotClientHello => Some(None),
            client_hello::Parse::ClientHello(hello) => {
                Some(hello.server_name().map(str::to_ascii_lowercase))
            }
        }
    });
    Ok(match peeked.await? {
        Peeked::Answer(name) => name,
        Peeked::NoAnswer | Peeked::Silent => None,
    })
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// At most this much is looked at for a request line; a longer one is treated as opaque.
pub const REQUEST_LINE_LIMIT: usize = 8 * 1024;
/// How long a request line that has started may take to arrive whole.
pub const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest method token accepted (the standard ones are at most 7 characters).
const MAX_METHOD: usize = 32;

/// What a connection on a port without a declared protocol speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    Http2,
    /// A TLS handshake record (the application's own TLS): opaque, but its ClientHello names a
    /// server.
    Tls,
    /// Anything else, a silent client included: forwarded as opaque TCP.
    Opaque,
}

impl Sniffed {
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http1 | Self::Http2)
    }
}

/// The answer for a prefix of a connection's bytes, for HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpParse {
    NeedMore,
    Done(Sniffed),
}

/// Classifies the first bytes of a connection as HTTP/1.x, HTTP/2 (prior knowledge), TLS or
/// opaque.
pub fn classify_http(bytes: &[u8]) -> HttpParse {
    match bytes.first() {
        None => return HttpParse::NeedMore,
        Some(&CONTENT_TYPE_HANDSHAKE) => return HttpParse::Done(Sniffed::Tls),
        Some(_) => {}
    }
    let common = bytes.len().min(H2_PREFACE.len());
    if bytes[..common] == H2_PREFACE[..common] {
        return if common == H2_PREFACE.len() {
            HttpParse::Done(Sniffed::Http2)
        } else {
            HttpParse::NeedMore
        };
    }
    classify_request_line(bytes)
}

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3), checked as far as bytes go.
fn classify_request_line(bytes: &[u8]) -> HttpParse {
    const OPAQUE: HttpParse = HttpParse::Done(Sniffed::Opaque);
    let method_len = bytes.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len > MAX_METHOD {
        return OPAQUE;
    }
    let Some(&after_method) = bytes.get(method_len) else {
        return HttpParse::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return OPAQUE;
    }
    let rest = &bytes[method_len + 1..];
    let target_len = rest
        .iter()
        .take_while(|&&b| (0x21..=0x7e).contains(&b))
        .count();
    let Some(&after_target) = rest.get(target_len) else {
        return HttpParse::NeedMore;
    };
    if target_len == 0 || after_target != b' ' {
        return OPAQUE;
    }
    let version = &rest[target_len + 1..];
    for expected in [&b"HTTP/1.1\r\n"[..], b"HTTP/1.0\r\n"] {
        let common = version.len().min(expected.len());
        if version[..common] == expected[..common] {
            return if common == expected.len() {
                HttpParse::Done(Sniffed::Http1)
            } else {
                HttpParse::NeedMore
            };
        }
    }
    OPAQUE
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Peeks at `stream` until its protocol is known; nothing is consumed. Silence for
/// [`FIRST_BYTE_TIMEOUT`], a request line not complete within [`REQUEST_LINE_TIMEOUT`] or longer
/// than [`REQUEST_LINE_LIMIT`] are opaque.
pub async fn detect_protocol(stream: &TcpStream) -> io::Result<Sniffed> {
    let peeked =
        peek_until(
            stream,
            REQUEST_LINE_LIMIT,
            REQUEST_LINE_TIMEOUT,
            |bytes| match classify_http(bytes) {
                HttpParse::NeedMore => None,
                HttpParse::Done(sniffed) => Some(sniffed),
            },
        );
    Ok(match peeked.await? {
        Peeked::Answer(sniffed) => sniffed,
        Peeked::NoAnswer | Peeked::Silent => Sniffed::Opaque,
    })
}

/// [`detect_protocol`] for a stream that cannot be peeked (decrypted TLS): the bytes read to
/// decide are returned, to be replayed in front of the stream.
pub async fn read_protocol<S>(stream: &mut S) -> io::Result<(Sniffed, Vec<u8>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut deadline = Instant::now() + FIRST_BYTE_TIMEOUT;
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
        let n = match read {
            Err(_) => return Ok((Sniffed::Opaque, buf)),
            Ok(read) => read?,
        };
        if n == 0 {
            return Ok((Sniffed::Opaque, buf));
        }
        if buf.is_empty() {
            deadline = Instant::now() + REQUEST_LINE_TIMEOUT;
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify_http(&buf) {
            HttpParse::Done(sniffed) => return Ok((sniffed, buf)),
            HttpParse::NeedMore if buf.len() >= REQUEST_LINE_LIMIT => {
                return Ok((Sniffed::Opaque, buf));
            }
            HttpParse::NeedMore => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::client_hello::tests::client_hello as hello_to;

    /// The first flight of a real rustls client offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        hello_to("Reviews.demo.svc.cluster.local", alpn)
    }

    #[test]
    fn recognises_a_real_rustls_client_hello_offering_the_mesh_alpn() {
        let hello = client_hello(&[b"h2", MESH_ALPN]);
        assert_eq!(classify(&hello), Parse::Done(Detected::MeshTls));
        // Trailing bytes (the client's next flight) change nothing.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(classify(&more), Parse::Done(Detected::MeshTls));
    }

    #[test]
    fn other_alpn_or_none_is_not_mesh_tls() {
        assert_eq!(
            classify(&client_hello(&[b"h2", b"http/1.1"])),
            Parse::Done(Detected::Other)
        );
        assert_eq!(classify(&client_hello(&[])), Parse::Done(Detected::Other));
        // A protocol that merely starts with the mesh ALPN is another protocol.
        assert_eq!(
            classify(&client_hello(&[b"trellis-mtls2"])),
            Parse::Done(Detected::Other)
        );
    }

    #[tokio::test]
    async fn detect_peeks_without_consuming_and_times_out_on_silence() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = client_hello(&[MESH_ALPN]);

        // The ClientHello arrives in two writes; detection waits for the second.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (first, second) = hello.split_at(20);
        client.write_all(first).await.unwrap();
        let writer = {
            let second = second.to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                client.write_all(&second).await.unwrap();
                client
            })
        };
        assert_eq!(detect(&server).await.unwrap(), Detected::MeshTls);
        let _client = writer.await.unwrap();
        assert_eq!(
            server_name(&server).await.unwrap().as_deref(),
            Some("reviews.demo.svc.cluster.local"),
            "the server name, in lower case"
        );
        let mut read = vec![0u8; hello.len()];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(read, hello, "nothing was consumed");

        // Plaintext is recognised at once.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detect(&server).await.unwrap(), Detected::Other);

        // A silent client (server-speaks-first) is given FIRST_BYTE_TIMEOUT.
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(detect(&server).await.unwrap(), Detected::Silent);
        let waited = started.elapsed();
        assert!(waited >= FIRST_BYTE_TIMEOUT && waited < FIRST_BYTE_TIMEOUT * 4);

        // A client that closes without sending anything.
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(client);
        assert_eq!(detect(&server).await.unwrap(), Detected::Other);
    }
    #[test]
    fn http_request_lines_and_the_h2_preface_are_http_everything_else_opaque() {
        use HttpParse::{Done, NeedMore};
        use Sniffed::{Http1, Http2, Opaque, Tls};
        let table: &[(&[u8], HttpParse)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Done(Http1)),
            (b"GET / HTTP/1.1\r\n", Done(Http1)),
            (b"POST /upload?x=1 HTTP/1.0\r\n", Done(Http1)),
            (b"PROPFIND /dav HTTP/1.1\r\n", Done(Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", Done(Http1)),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", Done(Http1)),
            (b"GET http://a.b/c HTTP/1.1\r\n", Done(Http1)),
            (H2_PREFACE, Done(Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Done(Http2),
            ),
            // Prefixes that can still become HTTP.
            (b"", NeedMore),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET ", NeedMore),
            (b"GET /index.html", NeedMore),
            (b"GET / ", NeedMore),
            (b"GET / HTTP/1.", NeedMore),
            (b"GET / HTTP/1.1\r", NeedMore),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (b"PRI", NeedMore),
            // Not HTTP.
            (b"\x16\x03\x01\x02\x00\x01", Done(Tls)), // a TLS ClientHello
            (b"\x16", Done(Tls)),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Done(Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Done(Opaque)), // a PostgreSQL startup
            (b"GET / HTTP/2.0\r\n", Done(Opaque)),
            (b"GET / HTTP/1.1\n", Done(Opaque)),
            (b"GET  / HTTP/1.1\r\n", Done(Opaque)),
            (b" GET / HTTP/1.1\r\n", Done(Opaque)),
            (b"GET /a\tb HTTP/1.1\r\n", Done(Opaque)),
            (b"G(T / HTTP/1.1\r\n", Done(Opaque)),
            (b"hello world\n", Done(Opaque)),
            (b"PRI * HTTP/2.0\r\n\r\nXX", Done(Opaque)),
        ];
        for (bytes, expected) in table {
            assert_eq!(
                classify_http(bytes),
                *expected,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long_method = [b"A".repeat(MAX_METHOD + 1), b" / HTTP/1.1\r\n".to_vec()].concat();
        assert_eq!(classify_http(&long_method), Done(Opaque));
    }

    #[test]
    fn the_second_mesh_alpn_is_mesh_tls_too() {
        assert_eq!(
            classify(&client_hello(&[MESH_H2_ALPN])),
            Parse::Done(Detected::MeshTls)
        );
    }

    #[tokio::test]
    async fn protocol_detection_peeks_reads_and_falls_back_to_opaque_on_silence() {
        use tokio::io::AsyncWriteExt;
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        // A request line split over two writes, peeked and then read unchanged.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET /slow").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b" HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        assert_eq!(detect_protocol(&server).await.unwrap(), Sniffed::Http1);
        let _client = writer.await.unwrap();
        let mut line = [0u8; 20];
        server.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET /slow HTTP/1.1\r\n", "nothing was consumed");

        // The preface, read (not peeked): the bytes read come back for replay.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(H2_PREFACE).await.unwrap();
        let (sniffed, read) = read_protocol(&mut server).await.unwrap();
        assert_eq!((sniffed, read.as_slice()), (Sniffed::Http2, H2_PREFACE));

        // A server-speaks-first protocol: the client says nothing, and is opaque after the
        // first-byte timeout, both ways.
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(detect_protocol(&server).await.unwrap(), Sniffed::Opaque);
        assert_eq!(
            read_protocol(&mut server).await.unwrap(),
            (Sniffed::Opaque, Vec::new())
        );
        let waited = started.elapsed();
        assert!(
            waited >= FIRST_BYTE_TIMEOUT * 2 && waited < FIRST_BYTE_TIMEOUT * 6,
            "{waited:?}"
        );
    }
}
