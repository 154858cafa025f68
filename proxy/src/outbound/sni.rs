//! The server name (SNI) of a TLS ClientHello the application sends, read without consuming it,
//! for VirtualService `tls` routes (`match.sniHosts`). A hand-written, defensive parser in the
//! manner of [`crate::sniff`]: any input, however short or malformed, gives an answer and never
//! a panic.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sniff::{CLIENT_HELLO_TIMEOUT, FIRST_BYTE_TIMEOUT, PEEK_LIMIT};

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
const RECORD_HEADER: usize = 5;
/// Between two peeks of an incomplete ClientHello.
const REPEEK_INTERVAL: Duration = Duration::from_millis(5);

/// What the first bytes say about the server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A valid beginning of a ClientHello; more bytes are needed.
    NeedMore,
    /// A complete ClientHello naming this server.
    Name(String),
    /// Not a ClientHello, or one without a host name.
    NoName,
}

/// Peeks at `stream` until its ClientHello's SNI is known; `None` for a connection that is not
/// TLS, names no server, or stays silent for [`FIRST_BYTE_TIMEOUT`].
pub async fn peek(stream: &TcpStream) -> io::Result<Option<String>> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    let Ok(peeked) = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut buf)).await else {
        return Ok(None);
    };
    let mut n = peeked?;
    let deadline = Instant::now() + CLIENT_HELLO_TIMEOUT;
    loop {
        match server_name(&buf[..n]) {
            Parse::Name(name) => return Ok(Some(name)),
            Parse::NoName => return Ok(None),
            Parse::NeedMore if n == 0 || n == buf.len() || Instant::now() >= deadline => {
                return Ok(None);
            }
            Parse::NeedMore => {
                tokio::time::sleep(REPEEK_INTERVAL).await;
                n = stream.peek(&mut buf).await?;
            }
        }
    }
}

/// The SNI host name of the ClientHello at the start of `bytes` (handshake messages spanning
/// several records are reassembled).
pub fn server_name(bytes: &[u8]) -> Parse {
    let mut message = Vec::new();
    let mut rest = bytes;
    loop {
        let Some(header) = rest.get(..RECORD_HEADER) else {
            return match rest.first() {
                Some(&t) if t != CONTENT_TYPE_HANDSHAKE => Parse::NoName,
                _ => Parse::NeedMore,
            };
        };
        if header[0] != CONTENT_TYPE_HANDSHAKE || header[1] != 3 {
            return Parse::NoName;
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(fragment) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            return Parse::NeedMore;
        };
        message.extend_from_slice(fragment);
        rest = &rest[RECORD_HEADER + length..];
        if message
            .first()
            .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return Parse::NoName;
        }
        let Some(declared) = message
            .get(1..4)
            .map(|l| usize::from(l[0]) << 16 | usize::from(l[1]) << 8 | usize::from(l[2]))
        else {
            continue;
        };
        if let Some(body) = message.get(4..4 + declared) {
            return client_hello_name(body).map_or(Parse::NoName, Parse::Name);
        }
    }
}

fn client_hello_name(body: &[u8]) -> Option<String> {
    let mut reader = Reader(body);
    reader.take(2 + 32)?; // legacy version, random
    reader.vec8()?; // session id
    reader.vec16()?; // cipher suites
    reader.vec8()?; // compression methods
    let mut extensions = Reader(reader.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != EXTENSION_SERVER_NAME {
            continue;
        }
        let mut names = Reader(Reader(data).vec16()?);
        while !names.0.is_empty() {
            let name_type = names.take(1)?[0];
            let name = names.vec16()?;
            if name_type == NAME_TYPE_HOST {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.0.get(..n)?;
        self.0 = &self.0[n..];
        Some(taken)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.take(1)?[0];
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real rustls client connecting to `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_server_name_of_real_and_split_client_hellos() {
        let hello = client_hello("DB.Example.com");
        // The same hello split into two records at an arbitrary point of the message.
        let body = &hello[RECORD_HEADER..];
        let at = 40;
        let mut split = Vec::new();
        for part in [&body[..at], &body[at..]] {
            split.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            split.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            split.extend_from_slice(part);
        }
        let cases: Vec<(&str, Vec<u8>, Parse)> = vec![
            ("whole", hello.clone(), Parse::Name("db.example.com".into())),
            ("split", split, Parse::Name("db.example.com".into())),
            ("empty", Vec::new(), Parse::NeedMore),
            ("half", hello[..hello.len() / 2].to_vec(), Parse::NeedMore),
            ("http", b"GET / HTTP/1.1\r\n\r\n".to_vec(), Parse::NoName),
            ("ip", client_hello("10.1.2.3"), Parse::NoName),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(server_name(&bytes), expected, "{name}");
        }
    }

    #[test]
    fn truncations_and_corruptions_never_panic() {
        let hello = client_hello("db.example.com");
        for end in 0..hello.len() {
            assert_eq!(server_name(&hello[..end]), Parse::NeedMore, "cut at {end}");
        }
        for at in 0..hello.len() {
            for value in [0u8, 0xff, 0x7f] {
                let mut corrupted = hello.clone();
                corrupted[at] = value;
                let _ = server_name(&corrupted);
            }
        }
    }
}
