//! gRPC length-prefixed message framing and the echo body used by the demo
//! server: every message received is sent back, then `grpc-status`
//! trailers.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame};

use crate::body::BoxError;

/// Largest message the echo accepts (gRPC's usual default is 4 MiB).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// One gRPC message: the compressed flag and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcMessage {
    /// The compressed-flag byte was 1.
    pub compressed: bool,
    /// The message payload.
    pub data: Bytes,
}

/// Why a gRPC byte stream could not be split into messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcDecodeError {
    /// The compressed flag was neither 0 nor 1.
    BadFlag(u8),
    /// The announced length exceeds the limit.
    TooLarge(u32),
}

impl std::fmt::Display for GrpcDecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcDecodeError::BadFlag(b) => write!(f, "bad compressed flag {b}"),
            GrpcDecodeError::TooLarge(n) => write!(f, "message of {n} bytes is too large"),
        }
    }
}

/// Splits a byte stream, fed in arbitrary chunks, into gRPC messages.
#[derive(Debug)]
pub struct GrpcDecoder {
    buf: BytesMut,
    max: usize,
}

impl Default for GrpcDecoder {
    fn default() -> Self {
        GrpcDecoder::new(MAX_MESSAGE)
    }
}

impl GrpcDecoder {
    /// A decoder accepting messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        GrpcDecoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Takes the next complete message, if one has been received in full.
    pub fn next_message(&mut self) -> Result<Option<GrpcMessage>, GrpcDecodeError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flag = self.buf[0];
        if flag > 1 {
            return Err(GrpcDecodeError::BadFlag(flag));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize > self.max {
            return Err(GrpcDecodeError::TooLarge(len));
        }
        if self.buf.len() - 5 < len_usize {
            self.buf.reserve(len_usize + 5 - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len_usize).freeze();
        Ok(Some(GrpcMessage {
            compressed: flag == 1,
            data,
        }))
    }

    /// Bytes of an incomplete message are buffered.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Encodes one length-prefixed gRPC message.
pub fn encode_message(compressed: bool, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + data.len());
    out.put_u8(u8::from(compressed));
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
    out.freeze()
}

/// Percent-encodes a `grpc-message` value as the gRPC HTTP/2 spec requires.
pub fn percent_encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The trailers that end a gRPC response.
pub fn status_trailers(code: u32, message: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from(code));
    if let Some(message) = message
        && let Ok(value) = HeaderValue::from_str(&percent_encode_message(message))
    {
        map.insert("grpc-message", value);
    }
    map
}

enum EchoState {
    Streaming,
    Trailers(HeaderMap),
    Done,
}

/// A response body echoing each gRPC message of the request body `B` as it
/// arrives, then trailers with the configured status.
pub struct GrpcEchoBody<B> {
    inner: B,
    decoder: GrpcDecoder,
    state: EchoState,
    status: u32,
    message: Option<String>,
}

impl<B> GrpcEchoBody<B> {
    /// Echo `inner`, ending with `grpc-status: status` (and `grpc-message`).
    pub fn new(inner: B, status: u32, message: Option<String>) -> Self {
        GrpcEchoBody {
            inner,
            decoder: GrpcDecoder::default(),
            state: EchoState::Streaming,
            status,
            message,
        }
    }
}

impl<B> Body for GrpcEchoBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.state, EchoState::Done) {
                EchoState::Done => return Poll::Ready(None),
                EchoState::Trailers(map) => return Poll::Ready(Some(Ok(Frame::trailers(map)))),
                EchoState::Streaming => {}
            }
            this.state = EchoState::Streaming;
            match this.decoder.next_message() {
                Ok(Some(msg)) => {
                    let out = encode_message(msg.compressed, &msg.data);
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Ok(None) => {}
                Err(e) => {
                    let code = match e {
                        GrpcDecodeError::TooLarge(_) => 8,
                        GrpcDecodeError::BadFlag(_) => 13,
                    };
                    this.state = EchoState::Trailers(status_trailers(code, Some(&e.to_string())));
                    continue;
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    this.state = EchoState::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    let trailers = if this.decoder.has_partial() {
                        status_trailers(13, Some("request ended inside a message"))
                    } else if this.status == 0 {
                        status_trailers(0, None)
                    } else {
                        let default = format!("demo status {}", this.status);
                        status_trailers(
                            this.status,
                            Some(this.message.as_deref().unwrap_or(&default)),
                        )
                    };
                    this.state = EchoState::Trailers(trailers);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, EchoState::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[test]
    fn splits_messages_across_chunks() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&encode_message(false, b"hello"));
        stream.extend_from_slice(&encode_message(true, b""));
        stream.extend_from_slice(&encode_message(false, &[7u8; 1000]));
        // Feed one byte at a time, then in odd-sized chunks.
        for chunk_size in [1usize, 3, 7, 1000, stream.len()] {
            let mut dec = GrpcDecoder::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                dec.push(chunk);
                while let Some(m) = dec.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert!(!dec.has_partial());
            assert_eq!(got.len(), 3, "chunk size {chunk_size}");
            assert_eq!(got[0].data.as_ref(), b"hello");
            assert!(!got[0].compressed);
            assert!(got[1].compressed);
            assert!(got[1].data.is_empty());
            assert_eq!(got[2].data.len(), 1000);
        }
    }

    #[test]
    fn partial_and_errors() {
        let mut dec = GrpcDecoder::new(10);
        dec.push(&[0, 0, 0]);
        assert_eq!(dec.next_message().unwrap(), None);
        assert!(dec.has_partial());
        let mut dec = GrpcDecoder::new(10);
        dec.push(&[0, 0, 0, 0, 11]);
        assert_eq!(dec.next_message(), Err(GrpcDecodeError::TooLarge(11)));
        let mut dec = GrpcDecoder::new(10);
        dec.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(dec.next_message().is_err());
        let mut dec = GrpcDecoder::new(10);
        dec.push(&[2, 0, 0, 0, 0]);
        assert_eq!(dec.next_message(), Err(GrpcDecodeError::BadFlag(2)));
    }

    #[test]
    fn message_encoding() {
        assert_eq!(percent_encode_message("a b%\n"), "a b%25%0A");
        let t = status_trailers(14, Some("unavailable"));
        assert_eq!(t["grpc-status"], "14");
        assert_eq!(t["grpc-message"], "unavailable");
    }

    #[tokio::test]
    async fn echo_body_echoes_and_trails() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_message(false, b"one"));
        wire.extend_from_slice(&encode_message(false, b"two"));
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = wire
            .chunks(4)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let inner = StreamBody::new(futures::stream::iter(chunks));
        let collected = GrpcEchoBody::new(inner, 0, None).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes().as_ref(), wire.as_slice());

        let inner = StreamBody::new(futures::stream::iter(vec![Ok::<_, BoxError>(Frame::data(
            Bytes::from_static(&[0, 0, 0]),
        ))]));
        let collected = GrpcEchoBody::new(inner, 0, None).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "13");

        let inner = StreamBody::new(futures::stream::iter(
            Vec::<Result<Frame<Bytes>, BoxError>>::new(),
        ));
        let collected = GrpcEchoBody::new(inner, 5, Some("nope".into()))
            .collect()
            .await
            .unwrap();
        let t = collected.trailers().unwrap();
        assert_eq!(t["grpc-status"], "5");
        assert_eq!(t["grpc-message"], "nope");
    }
}
