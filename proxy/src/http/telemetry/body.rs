//! Body wrappers that observe a streaming body without buffering it: [`Counted`] counts a
//! request body's bytes; [`Observed`] counts a response body's bytes, picks up `grpc-status`
//! from its trailers, and finishes the request's [`Record`] when the body ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{GRPC_STATUS, Record};
use crate::http::{Body, BoxError};
use crate::metrics::flags;

/// Counts the data bytes of `B` into a shared counter as they pass.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response cut because the route's timeout passed while its body was still coming.
#[derive(Debug, thiserror::Error)]
#[error("the route timeout passed before the response body ended")]
pub struct RouteTimeout;

/// A response body on its way to the downstream, carrying the request's record.
pub struct Observed {
    inner: Body,
    record: Option<Record>,
}

impl Observed {
    pub fn new(inner: Body, record: Record) -> Self {
        Self {
            inner,
            record: Some(record),
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(record) = self.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        record.response_bytes += data.len() as u64;
                    } else if let Some(status) = frame
                        .trailers_ref()
                        .and_then(|t| t.get(GRPC_STATUS))
                        .and_then(|v| v.to_str().ok())
                    {
                        record.grpc_status = Some(status.to_owned());
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut record) = self.record.take() {
                    record.flags = if e.is::<RouteTimeout>() {
                        flags::UPSTREAM_REQUEST_TIMEOUT
                    } else {
                        flags::UPSTREAM_CONNECTION_TERMINATION
                    };
                }
            }
            Poll::Ready(None) => drop(self.record.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Dropped before its end: the downstream went away (or reset the stream) mid-response.
        if let Some(record) = self.record.as_mut()
            && !self.inner.is_end_stream()
        {
            record.flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
        }
    }
}
