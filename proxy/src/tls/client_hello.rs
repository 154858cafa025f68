//! The one parser of a TLS ClientHello (RFC 8446 §4.1.2) the proxy reads before any TLS stack
//! sees the connection: its server name (SNI, for VirtualService `tls` routes and services
//! found by name) and its ALPN list (a sidecar's mutual TLS offers a mesh ALPN). It is fed the
//! bytes peeked so far and says whether they are a ClientHello, not one, or not enough yet;
//! [`crate::sniff`] owns the peeking.
//!
//! Kept by hand, not taken from rustls: rustls parses a ClientHello only inside a server
//! connection that consumes the bytes, and here nothing may be consumed (the connection is then
//! relayed opaque, or handed to another TLS stack, from its first byte). It is written
//! defensively (every read bounds-checked: any input, however short or malformed, gives an
//! answer and never a panic; fuzzed by `fuzz/fuzz_targets/client_hello.rs`) and borrows from
//! its input, so a ClientHello in one record (every real one) costs no allocation.

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const NAME_TYPE_HOST: u8 = 0;
/// Type, version and length of a TLS record.
pub const RECORD_HEADER: usize = 5;
/// Largest plaintext TLS record (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// At most this much is looked at: one full record. A ClientHello longer than that (no mesh
/// sidecar's, which are a few hundred bytes) is not parsed.
pub const PEEK_LIMIT: usize = RECORD_HEADER + MAX_RECORD;
/// Type and length of a handshake message.
const HANDSHAKE_HEADER: usize = 4;

/// The answer for a prefix of a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// The bytes so far are a valid beginning of a ClientHello; more are needed.
    NeedMore,
    /// Not TLS, not a ClientHello, malformed, or longer than [`PEEK_LIMIT`].
    NotClientHello,
    /// A complete ClientHello; the bytes after it do not matter.
    ClientHello(ClientHello<'a>),
}

/// What the proxy reads of a ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientHello<'a> {
    server_name: Option<&'a [u8]>,
    /// The ALPN extension's `protocol_name_list` (already checked to be well formed).
    alpn: &'a [u8],
}

impl<'a> ClientHello<'a> {
    /// The first host name of the SNI extension, as sent (DNS names are case-insensitive: the
    /// caller folds the case if it compares); `None` without one, or if it is not UTF-8.
    pub fn server_name(&self) -> Option<&'a str> {
        std::str::from_utf8(self.server_name?).ok()
    }

    /// The protocols the ALPN extension offers, in the client's order (none without one).
    pub fn alpn(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut names = Reader(self.alpn);
        std::iter::from_fn(move || names.vec8())
    }
}

/// Parses the ClientHello at the start of `bytes`. Handshake messages may span several records;
/// they are then reassembled into `scratch` (left empty, so never allocated, in the usual case
/// of a ClientHello in one record).
pub fn parse<'a>(bytes: &'a [u8], scratch: &'a mut Vec<u8>) -> Parse<'a> {
    scratch.clear();
    let mut rest = bytes;
    // The first record's fragment, borrowed; `scratch` takes over from the second record on.
    let mut first: &'a [u8] = &[];
    loop {
        let Some(&content_type) = rest.first() else {
            return Parse::NeedMore;
        };
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Parse::NotClientHello;
        }
        // Record layer version: 3.x for every TLS version (TLS 1.3 still writes 3.1 or 3.3).
        if rest.get(1).is_some_and(|&major| major != 3) {
            return Parse::NotClientHello;
        }
        let Some(header) = rest.get(..RECORD_HEADER) else {
            return Parse::NeedMore;
        };
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD {
            return Parse::NotClientHello;
        }
        let Some(fragment) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            return Parse::NeedMore;
        };
        rest = &rest[RECORD_HEADER + length..];
        if first.is_empty() {
            first = fragment;
        } else {
            if scratch.is_empty() {
                scratch.extend_from_slice(first);
            }
            scratch.extend_from_slice(fragment);
        }
        let message: &[u8] = if scratch.is_empty() { first } else { scratch };

        if message[0] != HANDSHAKE_CLIENT_HELLO {
            return Parse::NotClientHello;
        }
        let Some(len) = message.get(1..HANDSHAKE_HEADER) else {
            continue;
        };
        let body_len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
        if body_len > PEEK_LIMIT {
            return Parse::NotClientHello;
        }
        if message.len() >= HANDSHAKE_HEADER + body_len {
            // Only now is `scratch` borrowed for the answer's lifetime.
            let message: &'a [u8] = if scratch.is_empty() { first } else { scratch };
            let body = &message[HANDSHAKE_HEADER..HANDSHAKE_HEADER + body_len];
            return parse_body(body).map_or(Parse::NotClientHello, Parse::ClientHello);
        }
    }
}

/// The fields of a ClientHello body; `None` if malformed.
fn parse_body(body: &[u8]) -> Option<ClientHello<'_>> {
    let mut hello = Reader(body);
    hello.take(2)?; // legacy_version
    hello.take(32)?; // random
    hello.vec8()?; // legacy_session_id
    hello.vec16()?; // cipher_suites
    hello.vec8()?; // legacy_compression_methods
    let mut found = ClientHello::default();
    if hello.0.is_empty() {
        return Some(found); // TLS ≤ 1.2 without extensions
    }
    let mut extensions = Reader(hello.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        match kind {
            EXTENSION_SERVER_NAME if found.server_name.is_none() => {
                found.server_name = host_name(Reader(data).vec16()?)?;
            }
            EXTENSION_ALPN if found.alpn.is_empty() => {
                let names = Reader(data).vec16()?;
                let mut check = Reader(names);
                while !check.0.is_empty() {
                    check.vec8()?;
                }
                found.alpn = names;
            }
            _ => {}
        }
    }
    Some(found)
}

/// The first `host_name` of a `server_name_list` (RFC 6066 §3); `Some(None)` without one.
fn host_name(list: &[u8]) -> Option<Option<&[u8]>> {
    let mut names = Reader(list);
    while !names.0.is_empty() {
        let name_type = names.take(1)?[0];
        let name = names.vec16()?;
        if name_type == NAME_TYPE_HOST {
            return Some(Some(name));
        }
    }
    Some(None)
}

/// A cursor over bytes whose every read is bounds-checked.
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

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.take(1)?[0];
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use trellis_config::proxy::MESH_ALPN;

    /// The first flight of a real rustls client connecting to `name` and offering `alpn`.
    pub(crate) fn client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut connection = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Splits one-record `hello` into two records at `at` bytes into its fragment.
    fn split_record(hello: &[u8], at: usize) -> Vec<u8> {
        let fragment = &hello[RECORD_HEADER..];
        let mut out = Vec::new();
        for part in [&fragment[..at], &fragment[at..]] {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// The server name and ALPN list `bytes` parse to; `Err` with the other answers.
    fn read(bytes: &[u8]) -> Result<(Option<String>, Vec<Vec<u8>>), Parse<'static>> {
        let mut scratch = Vec::new();
        match parse(bytes, &mut scratch) {
            Parse::ClientHello(hello) => Ok((
                hello.server_name().map(str::to_owned),
                hello.alpn().map(<[u8]>::to_vec).collect(),
            )),
            Parse::NeedMore => Err(Parse::NeedMore),
            Parse::NotClientHello => Err(Parse::NotClientHello),
        }
    }

    fn name_and_alpn(name: &str, alpn: &[&[u8]]) -> (Option<String>, Vec<Vec<u8>>) {
        (
            Some(name.to_owned()),
            alpn.iter().map(|p| p.to_vec()).collect(),
        )
    }

    #[test]
    fn reads_the_server_name_and_alpn_of_a_real_rustls_client_hello() {
        let hello = client_hello("DB.Example.com", &[b"h2", MESH_ALPN]);
        let expected = name_and_alpn("DB.Example.com", &[b"h2", MESH_ALPN]);
        assert_eq!(read(&hello), Ok(expected.clone()));
        // Trailing bytes (the client's next flight) change nothing.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(read(&more), Ok(expected));
        // Neither extension is required.
        assert_eq!(read(&client_hello("10.1.2.3", &[])), Ok((None, Vec::new())));
        let one_record = client_hello("a.example", &[b"h2"]);
        let mut scratch = Vec::new();
        assert!(matches!(
            parse(&one_record, &mut scratch),
            Parse::ClientHello(_)
        ));
        assert_eq!(scratch.capacity(), 0, "one record is parsed in place");
    }

    #[test]
    fn every_truncation_of_a_client_hello_needs_more() {
        let hello = client_hello("db.example.com", &[MESH_ALPN]);
        for end in 0..hello.len() {
            assert_eq!(read(&hello[..end]), Err(Parse::NeedMore), "prefix of {end}");
        }
    }

    #[test]
    fn reassembles_a_client_hello_split_across_records() {
        let hello = client_hello("db.example.com", &[MESH_ALPN]);
        let expected = name_and_alpn("db.example.com", &[MESH_ALPN]);
        for at in [1, 3, 4, 40, hello.len() - RECORD_HEADER - 1] {
            let split = split_record(&hello, at);
            assert_eq!(read(&split), Ok(expected.clone()), "{at}");
            for end in 0..split.len() {
                assert_eq!(read(&split[..end]), Err(Parse::NeedMore), "{at} {end}");
            }
        }
    }

    #[test]
    fn plaintext_and_garbage_are_not_a_client_hello_at_once() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"\x00",
            b"\x16\x02",                                 // record version 2.x
            b"\x16\x03\x01\x00\x00",                     // empty record
            b"\x16\x03\x01\xff\xff",                     // record longer than 2^14
            b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",     // a ServerHello, not a ClientHello
            b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",     // a ClientHello longer than we peek
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", // a body that does not parse
        ] {
            assert_eq!(read(bytes), Err(Parse::NotClientHello), "{bytes:?}");
        }
    }

    #[test]
    fn corrupted_client_hellos_never_panic() {
        let hello = client_hello("db.example.com", &[MESH_ALPN, b"h2"]);
        // Every single-byte corruption at every position, with a few values.
        for position in 0..hello.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bad = hello.clone();
                bad[position] = value;
                let _ = read(&bad);
                let _ = read(&bad[..position]);
            }
        }
        // Pseudo-random inputs that start like a handshake record.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 % 64) & 0xff) as u8)
                .collect();
            if bytes.len() > 5 {
                bytes[..3].copy_from_slice(&[22, 3, 3]);
            }
            let _ = read(&bytes);
        }
    }
}
