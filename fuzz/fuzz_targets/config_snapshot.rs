//! Fuzzes the proxy's decoding of the control-plane config stream: the newline-delimited JSON
//! line splitter (fed in fuzzer-chosen chunk sizes, as HTTP/2 frames arrive), then each line as a
//! `ControlMessage` and its snapshot's validation, exactly as the proxy applies them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_config::proxy::ProxyConfig;
use trellis_config::protocol::ControlMessage;
use trellis_proxy::control_plane::ndjson::LineSplitter;

/// Small, so over-long lines are reached; the proxy's bound is 16 MiB.
const MAX_LINE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the frame size the rest of the stream arrives in.
    let Some((&frame, stream)) = data.split_first() else {
        return;
    };
    let frame = usize::from(frame).max(1);

    let whole = LineSplitter::new(MAX_LINE).push(stream);
    let mut framed = LineSplitter::new(MAX_LINE);
    let mut framed_lines = Vec::new();
    let mut framed_error = None;
    for chunk in stream.chunks(frame) {
        match framed.push(chunk) {
            Ok(lines) => framed_lines.extend(lines),
            Err(e) => {
                framed_error = Some(e);
                break;
            }
        }
    }
    // Frame boundaries never change what is read.
    match (&whole, framed_error) {
        (Ok(lines), None) => assert_eq!(lines, &framed_lines, "frames of {frame} bytes"),
        (Err(a), Some(b)) => assert_eq!(a, &b),
        (whole, framed) => panic!("one piece gave {whole:?}, frames of {frame} gave {framed:?}"),
    }
    let Ok(lines) = whole else { return };

    for line in lines {
        assert!(line.len() <= MAX_LINE, "a line longer than the bound");
        assert!(!line.contains(&b'\n'), "a line holding a newline");
        assert!(!line.iter().all(u8::is_ascii_whitespace), "a blank line");
        let _ = ProxyConfig::from_json(&line);
        let Ok(message) = serde_json::from_slice::<ControlMessage>(&line) else {
            continue;
        };
        if let ControlMessage::Config(config) = &message {
            let _ = config.validate();
        }
        // What the operator sends back out of a decoded message decodes to the same message.
        let encoded = serde_json::to_vec(&message).expect("a decoded message encodes");
        let decoded: ControlMessage =
            serde_json::from_slice(&encoded).expect("an encoded message decodes");
        assert_eq!(
            decoded,
            message,
            "round trip changed {}",
            String::from_utf8_lossy(&line)
        );
    }
});
