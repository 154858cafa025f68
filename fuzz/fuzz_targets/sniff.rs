//! Fuzzes the inbound and outbound protocol sniffers: `classify` (mesh TLS ClientHello, over the
//! ClientHello parser `fuzz_targets/client_hello.rs` fuzzes on its own) and
//! `classify_http` (HTTP/1.x request line, HTTP/2 preface) must answer for any bytes, and a
//! final answer must stay final when more bytes arrive, as `detect`/`detect_protocol` rely on
//! when they re-peek a growing buffer and stop at the first final answer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::sniff::{
    Detected, HttpParse, Parse, REQUEST_LINE_LIMIT, classify, classify_http,
};
use trellis_proxy::tls::client_hello::PEEK_LIMIT;

/// Appended to a classified prefix: a TLS record start, a CRLF and text, so neither sniffer can
/// mistake it for the end of what it was parsing.
const MORE: &[u8] = b"\x16\x03\x03\x00\x01\x00\r\n trailing bytes";

fuzz_target!(|data: &[u8]| {
    let tls = &data[..data.len().min(PEEK_LIMIT)];
    let answer = classify(tls);
    assert_ne!(
        answer,
        Parse::Done(Detected::Silent),
        "classify never sees silence, only bytes: {tls:?}"
    );
    if let Parse::Done(_) = answer {
        let longer = [tls, MORE].concat();
        assert_eq!(
            classify(&longer),
            answer,
            "more bytes changed a final answer for {tls:?}"
        );
    }

    let http = &data[..data.len().min(REQUEST_LINE_LIMIT)];
    let answer = classify_http(http);
    if let HttpParse::Done(_) = answer {
        let longer = [http, MORE].concat();
        assert_eq!(
            classify_http(&longer),
            answer,
            "more bytes changed a final answer for {http:?}"
        );
    }
    if http.is_empty() {
        assert_eq!(answer, HttpParse::NeedMore, "no bytes is no answer yet");
    }
});
