//! Minimal WebSocket support (RFC 6455) for the demo server: the
//! `Sec-WebSocket-Accept` computation (SHA-1 and base64 from their crates),
//! a frame parser that unmasks client frames, and an echo loop. No
//! extensions, no fragmentation reassembly (fragments are echoed as they
//! come, which is valid). For the client side: the opening handshake
//! request and the check of the server's answer to it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The GUID appended to the client key (RFC 6455 section 1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest frame payload the echo accepts.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OP_PING: u8 = 0x9;
/// Pong frame.
pub const OP_PONG: u8 = 0xA;

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = Sha1::new()
        .chain_update(key.trim())
        .chain_update(WS_GUID)
        .finalize();
    STANDARD.encode(digest)
}

/// A `Sec-WebSocket-Key`: 16 bytes derived from `seed`, base64-encoded.
pub fn client_key(seed: u64) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&crate::splitmix64(seed).to_be_bytes());
    raw[8..].copy_from_slice(&crate::splitmix64(!seed).to_be_bytes());
    STANDARD.encode(raw)
}

/// The HTTP/1.1 opening handshake for `path` (with query) on `authority`,
/// with `key` and extra header lines; an extra `host` header replaces the
/// default one.
pub fn client_handshake(
    authority: &str,
    path: &str,
    key: &str,
    extra: &[(http::HeaderName, http::HeaderValue)],
) -> Vec<u8> {
    let mut out = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    if !extra.iter().any(|(n, _)| n == http::header::HOST) {
        out.extend_from_slice(format!("host: {authority}\r\n").as_bytes());
    }
    for (name, value) in extra {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "upgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
        )
        .as_bytes(),
    );
    out
}

/// Parses an HTTP/1.x response head (status line and headers, up to and
/// including the blank line) into the status code and headers.
pub fn parse_response_head(head: &[u8]) -> Result<(u16, http::HeaderMap), String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("bad status code in {status_line:?}"))?;
    let mut headers = http::HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("bad header name in {line:?}"))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("bad header value in {line:?}"))?;
        headers.append(name, value);
    }
    Ok((status, headers))
}

/// Checks that a 101 answer's headers accept the handshake made with `key`.
pub fn check_accept(headers: &http::HeaderMap, key: &str) -> Result<(), String> {
    let has_token = |name: http::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(http::header::UPGRADE, "websocket") {
        return Err("101 without `upgrade: websocket`".to_string());
    }
    if !has_token(http::header::CONNECTION, "upgrade") {
        return Err("101 without `connection: upgrade`".to_string());
    }
    let want = accept_key(key);
    match headers.get("sec-websocket-accept").map(|v| v.to_str()) {
        Some(Ok(got)) if got.trim() == want => Ok(()),
        Some(got) => Err(format!(
            "sec-websocket-accept is {got:?}, expected {want:?}"
        )),
        None => Err("101 without sec-websocket-accept".to_string()),
    }
}

/// One WebSocket frame, payload already unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    /// Final fragment.
    pub fin: bool,
    /// Opcode (low 4 bits).
    pub opcode: u8,
    /// The frame arrived masked.
    pub masked: bool,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Why a frame was rejected; maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// RSV bits set, unknown opcode, or a bad control frame (close 1002).
    Protocol(&'static str),
    /// Payload larger than the limit (close 1009).
    TooLarge(u64),
}

impl WsError {
    /// The close status code for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => 1002,
            WsError::TooLarge(_) => 1009,
        }
    }
}

/// Parses one frame from the start of `buf`. `Ok(None)` means more bytes
/// are needed; on success returns the frame and the bytes it used.
pub fn parse_frame(buf: &[u8], max_payload: usize) -> Result<Option<(WsFrame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let opcode = buf[0] & 0x0f;
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(WsError::Protocol("unknown opcode"));
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= 0x8 && (len > 125 || !fin) {
        return Err(WsError::Protocol("bad control frame"));
    }
    if len > max_payload as u64 {
        return Err(WsError::TooLarge(len));
    }
    let len = len as usize; // bounded by max_payload above
    let mut mask = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        mask.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    if buf.len() - pos < len {
        return Ok(None);
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if masked {
        apply_mask(&mut payload, mask);
    }
    Ok(Some((
        WsFrame {
            fin,
            opcode,
            masked,
            payload,
        },
        pos + len,
    )))
}

/// XORs `data` with the masking key (masking and unmasking are the same).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Encodes a frame; `mask` is for clients (servers send unmasked frames).
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n <= 125 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Echoes text, binary and continuation frames back on `io`, answers pings
/// and close frames, until the peer closes or misbehaves.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut read_buf = vec![0u8; 16 * 1024];
    loop {
        match parse_frame(&buf, MAX_PAYLOAD) {
            Ok(Some((frame, used))) => {
                buf.drain(..used);
                if !frame.masked {
                    let close = encode_frame(true, OP_CLOSE, &1002u16.to_be_bytes(), None);
                    io.write_all(&close).await?;
                    return io.shutdown().await;
                }
                match frame.opcode {
                    OP_CLOSE => {
                        let out = encode_frame(true, OP_CLOSE, &frame.payload, None);
                        io.write_all(&out).await?;
                        return io.shutdown().await;
                    }
                    OP_PING => {
                        io.write_all(&encode_frame(true, OP_PONG, &frame.payload, None))
                            .await?;
                    }
                    OP_PONG => {}
                    op => {
                        io.write_all(&encode_frame(frame.fin, op, &frame.payload, None))
                            .await?;
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                let close = encode_frame(true, OP_CLOSE, &e.close_code().to_be_bytes(), None);
                io.write_all(&close).await?;
                return io.shutdown().await;
            }
        }
        let n = io.read(&mut read_buf).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&read_buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn client_handshake_round_trip() {
        let key = client_key(42);
        assert_eq!(key.len(), 24);
        assert_ne!(key, client_key(43));
        let extra = [(
            http::HeaderName::from_static("x-test"),
            http::HeaderValue::from_static("1"),
        )];
        let req = String::from_utf8(client_handshake("web:80", "/ws?a=b", &key, &extra)).unwrap();
        assert!(
            req.starts_with("GET /ws?a=b HTTP/1.1\r\nhost: web:80\r\nx-test: 1\r\n"),
            "{req}"
        );
        assert!(
            req.contains(&format!("sec-websocket-key: {key}\r\n")),
            "{req}"
        );
        assert!(req.ends_with("sec-websocket-version: 13\r\n\r\n"), "{req}");
        let host = [(http::header::HOST, http::HeaderValue::from_static("other"))];
        let req = String::from_utf8(client_handshake("web:80", "/", &key, &host)).unwrap();
        assert_eq!(req.matches("host:").count(), 1, "{req}");
        assert!(req.contains("host: other\r\n"), "{req}");

        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nx-demo-version: v2\r\n\r\n",
            accept_key(&key)
        );
        let (status, headers) = parse_response_head(head.as_bytes()).unwrap();
        assert_eq!(status, 101);
        assert_eq!(headers["x-demo-version"], "v2");
        assert_eq!(check_accept(&headers, &key), Ok(()));
        let err = check_accept(&headers, &client_key(1)).unwrap_err();
        assert!(err.contains("sec-websocket-accept is"), "{err}");
    }

    #[test]
    fn bad_response_heads() {
        let (status, _) = parse_response_head(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert_eq!(status, 400);
        for (head, needle) in [
            (&b"SSH-2.0-x\r\n\r\n"[..], "bad status line"),
            (b"HTTP/1.1 abc x\r\n\r\n", "bad status code"),
            (b"HTTP/1.1 101 x\r\nnocolon\r\n\r\n", "bad header line"),
            (b"HTTP/1.1 101 x\r\n\xff: y\r\n\r\n", "not UTF-8"),
        ] {
            let err = parse_response_head(head).unwrap_err();
            assert!(err.contains(needle), "{head:?}: {err}");
        }
        let mut headers = http::HeaderMap::new();
        headers.insert("upgrade", http::HeaderValue::from_static("h2c"));
        let err = check_accept(&headers, "k").unwrap_err();
        assert!(err.contains("upgrade: websocket"), "{err}");
    }

    #[test]
    fn parses_rfc_masked_hello() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let wire = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        for cut in 0..wire.len() {
            assert_eq!(parse_frame(&wire[..cut], 100).unwrap(), None, "cut {cut}");
        }
        let (frame, used) = parse_frame(&wire, 100).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert!(frame.fin && frame.masked);
        assert_eq!(frame.opcode, OP_TEXT);
        assert_eq!(frame.payload, b"Hello");
        assert_eq!(
            encode_frame(true, OP_TEXT, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d])),
            wire
        );
        // The unmasked server form.
        assert_eq!(
            encode_frame(true, OP_TEXT, b"Hello", None),
            [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
    }

    #[test]
    fn extended_lengths_round_trip() {
        for len in [0usize, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = encode_frame(false, OP_BINARY, &payload, Some([1, 2, 3, 4]));
            let (frame, used) = parse_frame(&wire, MAX_PAYLOAD).unwrap().unwrap();
            assert_eq!(used, wire.len());
            assert!(!frame.fin);
            assert_eq!(frame.payload, payload);
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(
            parse_frame(&[0xC1, 0x80, 0, 0, 0, 0], 10),
            Err(WsError::Protocol(_))
        ));
        assert!(matches!(
            parse_frame(&[0x83, 0x80, 0, 0, 0, 0], 10),
            Err(WsError::Protocol(_))
        ));
        // Fragmented ping.
        assert!(matches!(
            parse_frame(&[0x09, 0x80, 0, 0, 0, 0], 10),
            Err(WsError::Protocol(_))
        ));
        // Control frame with a 126-byte payload.
        assert!(matches!(
            parse_frame(&[0x89, 0xFE, 0, 126], 1000),
            Err(WsError::Protocol(_))
        ));
        // Huge declared length.
        let huge = [0x82, 0xFF, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_frame(&huge, MAX_PAYLOAD),
            Err(WsError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn echo_loop() {
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(echo(server));
        client
            .write_all(&encode_frame(
                true,
                OP_TEXT,
                b"hi there",
                Some([9, 8, 7, 6]),
            ))
            .await
            .unwrap();
        client
            .write_all(&encode_frame(true, OP_PING, b"p", Some([1, 1, 1, 1])))
            .await
            .unwrap();
        client
            .write_all(&encode_frame(
                true,
                OP_CLOSE,
                &1000u16.to_be_bytes(),
                Some([5, 5, 5, 5]),
            ))
            .await
            .unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap().unwrap();
        let (f1, n1) = parse_frame(&out, 100).unwrap().unwrap();
        assert_eq!(
            (f1.opcode, f1.masked, f1.payload.as_slice()),
            (OP_TEXT, false, &b"hi there"[..])
        );
        let (f2, n2) = parse_frame(&out[n1..], 100).unwrap().unwrap();
        assert_eq!((f2.opcode, f2.payload.as_slice()), (OP_PONG, &b"p"[..]));
        let (f3, _) = parse_frame(&out[n1 + n2..], 100).unwrap().unwrap();
        assert_eq!(
            (f3.opcode, f3.payload.as_slice()),
            (OP_CLOSE, &1000u16.to_be_bytes()[..])
        );
    }
}
