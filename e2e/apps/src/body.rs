//! Response body helpers: a boxed body type and a streaming filler body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

/// Boxed error used by all demo bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Boxed body used for all demo-server responses.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(data: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

const FILLER_CHUNK: usize = 64 * 1024;
static FILLER: [u8; FILLER_CHUNK] = [b'x'; FILLER_CHUNK];

/// A body of `n` filler bytes (`x`), streamed in 64 KiB chunks without
/// allocating.
#[derive(Debug)]
pub struct FillerBody {
    remaining: u64,
}

impl FillerBody {
    /// A body of exactly `len` bytes.
    pub fn new(len: u64) -> Self {
        FillerBody { remaining: len }
    }
}

impl Body for FillerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(FILLER_CHUNK as u64);
        self.remaining -= n;
        // `n` is at most FILLER_CHUNK, so the cast cannot truncate.
        let chunk = Bytes::from_static(&FILLER[..n as usize]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn filler_has_exact_length() {
        for len in [0u64, 1, 65535, 65536, 65537, 300_000] {
            let body = FillerBody::new(len);
            assert_eq!(body.size_hint().exact(), Some(len));
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(bytes.len() as u64, len);
            assert!(bytes.iter().all(|&b| b == b'x'));
        }
    }
}
