//! Fuzzes the proxy's decoding of the control-plane config stream: the newline-delimited JSON
//! framing (`NdjsonCodec`, fed in fuzzer-chosen chunk sizes, as HTTP/2 frames arrive), then each
//! line as a `ControlMessage` and its snapshot's validation, exactly as the proxy applies them.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use trellis_config::protocol::ControlMessage;
use trellis_config::proxy::ProxyConfig;
use trellis_proxy::control_plane::ndjson::{FramingError, Line, NdjsonCodec};

/// Small, so over-long lines are reached; the proxy's bound is 16 MiB.
const MAX_LINE: usize = 4096;

/// The lines `stream` decodes to when it arrives in chunks of `frame` bytes, up to the end of
/// the stream or the first error (which ends the stream in the proxy): `Err` carries the lines
/// before it.
fn decode(stream: &[u8], frame: usize) -> Result<Vec<Line>, Vec<Line>> {
    let mut codec = NdjsonCodec::new(MAX_LINE);
    let mut buffer = BytesMut::new();
    let mut lines = Vec::new();
    for chunk in stream.chunks(frame) {
        buffer.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => break,
                Err(FramingError::LineTooLong { max }) => {
                    assert_eq!(max, MAX_LINE);
                    return Err(lines);
                }
                Err(e) => panic!("decoding does no I/O, yet: {e}"),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buffer) {
            Ok(Some(line)) => lines.push(line),
            Ok(None) => break,
            Err(e) => panic!("the end of a stream is no error, yet: {e}"),
        }
    }
    Ok(lines)
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the frame size the rest of the stream arrives in.
    let Some((&frame, stream)) = data.split_first() else {
        return;
    };
    let frame = usize::from(frame).max(1);

    let whole = decode(stream, stream.len().max(1));
    // Frame boundaries never change what is read.
    assert_eq!(whole, decode(stream, frame), "frames of {frame} bytes");
    let Ok(lines) = whole else { return };

    for line in lines {
        let Line::Text(line) = line else { continue };
        assert!(line.len() <= MAX_LINE, "a line longer than the bound");
        assert!(!line.contains('\n'), "a line holding a newline");
        assert!(!line.trim_ascii().is_empty(), "a blank line");
        let _ = ProxyConfig::from_json(line.as_bytes());
        let Ok(message) = serde_json::from_str::<ControlMessage>(&line) else {
            continue;
        };
        if let ControlMessage::Config(config) = &message {
            let _ = config.validate();
        }
        // What the operator sends back out of a decoded message decodes to the same message.
        let encoded = serde_json::to_vec(&message).expect("a decoded message encodes");
        let decoded: ControlMessage =
            serde_json::from_slice(&encoded).expect("an encoded message decodes");
        assert_eq!(decoded, message, "round trip changed {line}");
    }
});
