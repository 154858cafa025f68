//! Fuzzes the TLS ClientHello parser both the inbound mesh-TLS detection and the outbound SNI
//! routes read (`trellis_proxy::tls::client_hello`): it must answer for any bytes; a final
//! answer must stay the same when more bytes arrive (the peek loops stop at the first final
//! answer); and splitting the first record's fragment into two records must not change the
//! answer (handshake messages spanning records are reassembled).

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::tls::client_hello::{PEEK_LIMIT, Parse, RECORD_HEADER, parse};

/// Appended to a parsed prefix: another record and text.
const MORE: &[u8] = b"\x16\x03\x03\x00\x01\x01\r\n trailing bytes";

/// What an answer says, owned, so answers over different buffers compare.
#[derive(Debug, PartialEq)]
enum Answer {
    NeedMore,
    NotClientHello,
    ClientHello {
        server_name: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
}

fn answer(bytes: &[u8]) -> Answer {
    let mut scratch = Vec::new();
    match parse(bytes, &mut scratch) {
        Parse::NeedMore => Answer::NeedMore,
        Parse::NotClientHello => Answer::NotClientHello,
        Parse::ClientHello(hello) => Answer::ClientHello {
            server_name: hello.server_name().map(str::to_owned),
            alpn: hello.alpn().map(<[u8]>::to_vec).collect(),
        },
    }
}

/// `bytes` with its first record's fragment split in two records at `at`, if it has a whole
/// first record with a fragment longer than `at` (and `at` is not 0).
fn split_first_record(bytes: &[u8], at: usize) -> Option<Vec<u8>> {
    let header = bytes.get(..RECORD_HEADER)?;
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let fragment = bytes.get(RECORD_HEADER..RECORD_HEADER + length)?;
    if at == 0 || at >= fragment.len() {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() + RECORD_HEADER);
    for part in [&fragment[..at], &fragment[at..]] {
        out.extend_from_slice(&header[..3]);
        out.extend_from_slice(&u16::try_from(part.len()).ok()?.to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&bytes[RECORD_HEADER + length..]);
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let bytes = &data[..data.len().min(PEEK_LIMIT)];
    let first = answer(bytes);
    if first != Answer::NeedMore {
        let longer = [bytes, MORE].concat();
        assert_eq!(
            answer(&longer),
            first,
            "more bytes changed a final answer for {bytes:?}"
        );
    }
    let at = usize::from(bytes.last().copied().unwrap_or(0));
    if let Some(split) = split_first_record(bytes, at) {
        assert_eq!(
            answer(&split),
            first,
            "splitting the first record at {at} changed the answer for {bytes:?}"
        );
    }
});
