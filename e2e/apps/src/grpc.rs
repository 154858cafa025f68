//! gRPC length-prefixed message framing and the bodies used by the demo
//! server: the echo (every message received is sent back, then
//! `grpc-status` trailers; serves unary and bidi calls alike) and the
//! server-streaming `…/Stream` method (the one request message sent back
//! `x-demo-stream-messages` times). Also the client-side reading of a call's
//! `grpc-status`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame};

use crate::body::BoxError;

/// Largest message the echo accepts (gRPC's usual default is 4 MiB).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The method name (last path segment, any service) served as a
/// server-streaming call, e.g. `/trellis.demo.Echo/Stream`.
pub const STREAM_METHOD: &str = "Stream";
/// Request header: how many times a `Stream` call sends its request
/// message back (default 1).
pub const STREAM_MESSAGES_HEADER: &str = "x-demo-stream-messages";
/// Most messages one `Stream` call may ask for; bounds the work one request
/// can cause.
pub const MAX_STREAM_MESSAGES: u64 = 1_000_000;

/// gRPC status codes used here (the full table is in the gRPC spec).
pub const STATUS_INVALID_ARGUMENT: u32 = 3;
/// `RESOURCE_EXHAUSTED`.
pub const STATUS_RESOURCE_EXHAUSTED: u32 = 8;
/// `INTERNAL`.
pub const STATUS_INTERNAL: u32 = 13;

/// The request path names the server-streaming method.
pub fn is_stream_method(path: &str) -> bool {
    path.rsplit('/').next() == Some(STREAM_METHOD)
}

/// Reads the `x-demo-stream-messages` value: a count in
/// `0..=MAX_STREAM_MESSAGES`, 1 when absent.
pub fn parse_stream_messages(value: Option<&str>) -> Result<u64, String> {
    let Some(value) = value else {
        return Ok(1);
    };
    let count: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{STREAM_MESSAGES_HEADER}: bad count {value:?}"))?;
    if count > MAX_STREAM_MESSAGES {
        return Err(format!(
            "{STREAM_MESSAGES_HEADER}: {count} exceeds the limit of {MAX_STREAM_MESSAGES}"
        ));
    }
    Ok(count)
}

/// The `grpc-status` of a finished call: from the trailers, or from the
/// response headers of a Trailers-Only answer. `None` when neither has a
/// readable one (the call did not end as gRPC).
pub fn call_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u32> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

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

/// The trailers ending a call whose request was read without error: the
/// configured status, with `message` (or a default text) when not OK.
fn end_trailers(status: u32, message: Option<&str>) -> HeaderMap {
    if status == 0 {
        return status_trailers(0, None);
    }
    let default = format!("demo status {status}");
    status_trailers(status, Some(message.unwrap_or(&default)))
}

/// The trailers for a request stream that could not be decoded.
fn decode_error_trailers(e: &GrpcDecodeError) -> HeaderMap {
    let code = match e {
        GrpcDecodeError::TooLarge(_) => STATUS_RESOURCE_EXHAUSTED,
        GrpcDecodeError::BadFlag(_) => STATUS_INTERNAL,
    };
    status_trailers(code, Some(&e.to_string()))
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
                    this.state = EchoState::Trailers(decode_error_trailers(&e));
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
                        status_trailers(STATUS_INTERNAL, Some("request ended inside a message"))
                    } else {
                        end_trailers(this.status, this.message.as_deref())
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

enum StreamState {
    /// Collecting the one request message.
    Reading(Option<Bytes>),
    /// Sending the encoded request message `remaining` more times.
    Sending {
        message: Bytes,
        remaining: u64,
    },
    Trailers(HeaderMap),
    Done,
}

/// The response body of a server-streaming `Stream` call: reads exactly one
/// request message from `B`, sends it back `count` times (each a separate
/// frame, so HTTP/2 flow control paces the stream), then trailers with the
/// configured status.
pub struct GrpcStreamBody<B> {
    inner: B,
    decoder: GrpcDecoder,
    state: StreamState,
    count: u64,
    status: u32,
    message: Option<String>,
}

impl<B> GrpcStreamBody<B> {
    /// Stream the request message of `inner` back `count` times, ending with
    /// `grpc-status: status` (and `grpc-message`).
    pub fn new(inner: B, count: u64, status: u32, message: Option<String>) -> Self {
        GrpcStreamBody {
            inner,
            decoder: GrpcDecoder::default(),
            state: StreamState::Reading(None),
            count,
            status,
            message,
        }
    }

    /// A call refused before reading the request: only `status` trailers.
    pub fn refused(inner: B, status: u32, message: &str) -> Self {
        GrpcStreamBody {
            inner,
            decoder: GrpcDecoder::default(),
            state: StreamState::Trailers(status_trailers(status, Some(message))),
            count: 0,
            status,
            message: None,
        }
    }
}

impl<B> Body for GrpcStreamBody<B>
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
            let mut request = match std::mem::replace(&mut this.state, StreamState::Done) {
                StreamState::Done => return Poll::Ready(None),
                StreamState::Trailers(map) => return Poll::Ready(Some(Ok(Frame::trailers(map)))),
                StreamState::Sending { remaining: 0, .. } => {
                    this.state =
                        StreamState::Trailers(end_trailers(this.status, this.message.as_deref()));
                    continue;
                }
                StreamState::Sending { message, remaining } => {
                    this.state = StreamState::Sending {
                        message: message.clone(),
                        remaining: remaining - 1,
                    };
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                StreamState::Reading(request) => request,
            };
            match this.decoder.next_message() {
                Ok(Some(msg)) if request.is_none() => {
                    request = Some(encode_message(msg.compressed, &msg.data));
                    this.state = StreamState::Reading(request);
                    continue;
                }
                Ok(Some(_)) => {
                    this.state = StreamState::Trailers(status_trailers(
                        STATUS_INVALID_ARGUMENT,
                        Some("a server-streaming call takes exactly one request message"),
                    ));
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    this.state = StreamState::Trailers(decode_error_trailers(&e));
                    continue;
                }
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            let Poll::Ready(polled) = polled else {
                this.state = StreamState::Reading(request);
                return Poll::Pending;
            };
            this.state = match (polled, request) {
                (Some(Ok(frame)), request) => {
                    if let Ok(data) = frame.into_data() {
                        this.decoder.push(&data);
                    }
                    StreamState::Reading(request)
                }
                (Some(Err(e)), _) => return Poll::Ready(Some(Err(e.into()))),
                (None, _) if this.decoder.has_partial() => StreamState::Trailers(status_trailers(
                    STATUS_INTERNAL,
                    Some("request ended inside a message"),
                )),
                (None, None) => StreamState::Trailers(status_trailers(
                    STATUS_INVALID_ARGUMENT,
                    Some("a server-streaming call takes exactly one request message"),
                )),
                (None, Some(message)) => StreamState::Sending {
                    message,
                    remaining: this.count,
                },
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, StreamState::Done)
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

    fn wire_body(wire: &[u8], chunk: usize) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = wire
            .chunks(chunk)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn stream_body_repeats_the_request() {
        let request = encode_message(false, b"tick");
        for (count, chunk) in [(0u64, 3usize), (1, 1), (5, 2), (1000, 64)] {
            let body = GrpcStreamBody::new(wire_body(&request, chunk), count, 0, None);
            let collected = body.collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
            let mut dec = GrpcDecoder::default();
            dec.push(&collected.to_bytes());
            let mut got = 0u64;
            while let Some(m) = dec.next_message().unwrap() {
                assert_eq!(m.data.as_ref(), b"tick");
                got += 1;
            }
            assert_eq!(got, count, "chunk {chunk}");
        }
        let body = GrpcStreamBody::new(wire_body(&request, 5), 2, 14, Some("drain".into()));
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(collected.to_bytes().len(), 2 * request.len());
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(trailers["grpc-message"], "drain");
    }

    #[tokio::test]
    async fn stream_body_rejects_bad_requests() {
        let mut two = encode_message(false, b"a").to_vec();
        two.extend_from_slice(&encode_message(false, b"b"));
        // (request wire, expected grpc-status)
        let cases: [(Vec<u8>, &str); 4] = [
            (Vec::new(), "3"),
            (two, "3"),
            (vec![0, 0, 0, 0, 9, 1], "13"),
            (vec![7, 0, 0, 0, 0], "13"),
        ];
        for (wire, status) in cases {
            let collected = GrpcStreamBody::new(wire_body(&wire, 2), 3, 0, None)
                .collect()
                .await
                .unwrap();
            assert_eq!(
                collected.trailers().unwrap()["grpc-status"],
                status,
                "{wire:?}"
            );
            assert!(collected.to_bytes().is_empty(), "{wire:?}");
        }
        let refused = GrpcStreamBody::refused(wire_body(b"", 1), 3, "bad count")
            .collect()
            .await
            .unwrap();
        assert_eq!(refused.trailers().unwrap()["grpc-message"], "bad count");
    }

    #[test]
    fn stream_method_and_count() {
        for (path, want) in [
            ("/trellis.demo.Echo/Stream", true),
            ("/other.Svc/Stream", true),
            ("/trellis.demo.Echo/Echo", false),
            ("/Stream/Echo", false),
        ] {
            assert_eq!(is_stream_method(path), want, "{path}");
        }
        assert_eq!(parse_stream_messages(None), Ok(1));
        assert_eq!(parse_stream_messages(Some(" 25 ")), Ok(25));
        assert_eq!(parse_stream_messages(Some("0")), Ok(0));
        assert!(parse_stream_messages(Some("-1")).is_err());
        assert!(parse_stream_messages(Some("1000001")).is_err());
    }

    #[test]
    fn call_status_prefers_trailers() {
        let mut headers = HeaderMap::new();
        let mut trailers = HeaderMap::new();
        assert_eq!(call_status(&headers, None), None);
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(call_status(&headers, None), Some(14));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(call_status(&headers, Some(&trailers)), Some(0));
        trailers.insert("grpc-status", HeaderValue::from_static("x"));
        assert_eq!(call_status(&HeaderMap::new(), Some(&trailers)), None);
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
