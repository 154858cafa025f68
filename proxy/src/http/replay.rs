//! A request body that can be sent more than once, so a failed try can be retried: the bytes
//! are recorded as the first try streams them (nothing waits for the whole body), and a later
//! try replays the record before it reads on. Recording stops at [`REPLAY_LIMIT`]: a body larger
//! than that is streamed as usual but can no longer be replayed, and the request is then not
//! retried (Envoy bounds its retry buffer the same way, `per_request_buffer_limit_bytes`).

use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{Body, BoxError};

/// Request bodies up to this size can be retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

struct Shared {
    /// The original body; `None` once it has ended.
    inner: Option<Body>,
    /// Data frames read from `inner` so far, while within the limit.
    chunks: Vec<Bytes>,
    recorded: usize,
    /// More than [`REPLAY_LIMIT`] has been read: the record is incomplete.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    /// Bumped by every new try; a handle of an older try may no longer read `inner`.
    epoch: u64,
}

/// One try's view of the request body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    epoch: u64,
    /// Index of the next recorded chunk to replay.
    next: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was read by another try past what can be replayed")]
struct Superseded;

impl ReplayBody {
    pub fn new(body: Body) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner: (!ended).then_some(body),
                chunks: Vec::new(),
                recorded: 0,
                overflowed: false,
                trailers: None,
                epoch: 0,
            })),
            epoch: 0,
            next: 0,
            trailers_sent: false,
            hint,
        }
    }

    /// The body for another try, from its first byte; `None` when it is too large to replay.
    pub fn try_again(&self) -> Option<Self> {
        let mut shared = self.shared.lock();
        if shared.overflowed {
            return None;
        }
        shared.epoch += 1;
        Some(Self {
            shared: self.shared.clone(),
            epoch: shared.epoch,
            next: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }

    /// The bytes read so far when the whole body is known (read to its end within the limit);
    /// what a mirror copies.
    pub fn complete(&self) -> Option<Bytes> {
        let shared = self.shared.lock();
        if shared.inner.is_some() || shared.overflowed {
            return None;
        }
        Some(shared.chunks.concat().into())
    }

    pub fn into_body(self) -> Body {
        http_body_util::BodyExt::boxed_unsync(self)
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock();
        if let Some(chunk) = shared.chunks.get(this.next) {
            let chunk = chunk.clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.epoch != this.epoch || (shared.overflowed && this.next < shared.chunks.len()) {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        let Some(inner) = shared.inner.as_mut() else {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !shared.overflowed && shared.recorded + data.len() <= REPLAY_LIMIT {
                        shared.recorded += data.len();
                        shared.chunks.push(data.clone());
                        this.next = shared.chunks.len();
                    } else {
                        // Too large to replay: free the record, stream on.
                        shared.overflowed = true;
                        shared.chunks = Vec::new();
                        this.next = 0;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
            }
            Poll::Ready(None) => shared.inner = None,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock();
        shared.inner.is_none()
            && self.next >= shared.chunks.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use http_body_util::BodyExt;

    /// A body that yields prepared frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn body_of(chunks: &[&[u8]], trailers: bool) -> Body {
        let mut frames: VecDeque<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::copy_from_slice(c)))
            .collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", "0".parse().unwrap());
            frames.push_back(Frame::trailers(map));
        }
        Frames(frames).boxed_unsync()
    }

    async fn read(body: ReplayBody) -> (Vec<u8>, bool) {
        let collected = body.collect().await.unwrap();
        let had_trailers = collected.trailers().is_some();
        (collected.to_bytes().to_vec(), had_trailers)
    }

    #[tokio::test]
    async fn small_bodies_replay_whole_with_trailers_and_large_ones_do_not() {
        let big = vec![7u8; REPLAY_LIMIT];
        let cases: [(&[&[u8]], bool, bool); 5] = [
            (&[], false, true),
            (&[b"hello ", b"world"], false, true),
            (&[b"grpc", b"frame"], true, true),
            (&[&big], false, true),
            (&[b"x", &big], false, false),
        ];
        for (chunks, trailers, replayable) in cases {
            let expected: Vec<u8> = chunks.concat();
            let original = ReplayBody::new(body_of(chunks, trailers));
            let first = original.try_again().expect("nothing read yet: replayable");
            assert_eq!(read(first).await, (expected.clone(), trailers));
            match original.try_again() {
                Some(replay) => {
                    assert!(replayable, "{} bytes", expected.len());
                    assert_eq!(replay.complete().as_deref(), Some(expected.as_slice()));
                    assert_eq!(read(replay).await, (expected.clone(), trailers));
                }
                None => assert!(!replayable, "{} bytes", expected.len()),
            }
        }
    }

    #[tokio::test]
    async fn a_partly_read_body_replays_its_prefix_then_reads_on() {
        let mut first = ReplayBody::new(body_of(&[b"a", b"b", b"c"], false));
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        let second = first.try_again().unwrap();
        assert!(
            first.frame().await.unwrap().is_err(),
            "an old try must not read on"
        );
        assert_eq!(read(second).await.0, b"abc");
    }
}
