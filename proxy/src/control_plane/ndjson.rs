//! The framing of the config stream: newline-delimited JSON, split into lines by tokio-util's
//! [`LinesCodec`] with a bound on one line's length, whatever the body's frame boundaries.
//!
//! [`NdjsonCodec`] only adds what the stream's protocol says around it: blank lines are no
//! message, a line that is not UTF-8 is one bad message (rejected like one that does not decode,
//! the stream goes on), an over-long line is an error that ends the stream, and an unterminated
//! last line at the end of the body is no message (it was cut short).

use std::io;

use bytes::BytesMut;
use futures::TryStreamExt;
use http_body_util::BodyDataStream;
use hyper::body::Incoming;
use tokio::io::AsyncRead;
use tokio_util::codec::{Decoder, FramedRead, LinesCodec, LinesCodecError};
use tokio_util::io::StreamReader;

/// One line of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A non-blank line (without `\n` or a trailing `\r`).
    Text(String),
    /// A line whose bytes are not UTF-8, so not JSON.
    NotUtf8,
}

/// Why the stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("line longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error("reading the stream: {0}")]
    Io(#[from] io::Error),
}

/// Newline-delimited JSON lines, at most `max` bytes each.
pub struct NdjsonCodec {
    lines: LinesCodec,
    max: usize,
}

impl NdjsonCodec {
    pub fn new(max: usize) -> Self {
        Self {
            lines: LinesCodec::new_with_max_length(max),
            max,
        }
    }
}

impl Decoder for NdjsonCodec {
    type Item = Line;
    type Error = FramingError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, FramingError> {
        loop {
            match self.lines.decode(buf) {
                Ok(Some(line)) if line.trim_ascii().is_empty() => {}
                Ok(Some(line)) => return Ok(Some(Line::Text(line))),
                Ok(None) => return Ok(None),
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    return Err(FramingError::LineTooLong { max: self.max });
                }
                // Decoding reads no I/O: its only I/O error is a line that is not UTF-8 (the
                // codec has consumed it, so the next line decodes normally).
                Err(LinesCodecError::Io(_)) => return Ok(Some(Line::NotUtf8)),
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, FramingError> {
        let line = self.decode(buf)?;
        if line.is_none() {
            // The unterminated rest was cut short: not a message. The codec's own end of stream
            // consumes it (and resets its search position), its answer is dropped.
            let _cut_short = self.lines.decode_eof(buf);
        }
        Ok(line)
    }
}

/// The lines of a response body.
pub fn lines(body: Incoming, max: usize) -> FramedRead<impl AsyncRead + Unpin, NdjsonCodec> {
    let bytes = BodyDataStream::new(body).map_err(io::Error::other);
    FramedRead::new(StreamReader::new(bytes), NdjsonCodec::new(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The lines `frames` decode to, one frame at a time, up to the first error.
    async fn decode(max: usize, frames: &[&[u8]]) -> (Vec<Line>, Option<FramingError>) {
        let frames: Vec<io::Result<bytes::Bytes>> = frames
            .iter()
            .map(|f| Ok(bytes::Bytes::copy_from_slice(f)))
            .collect();
        let mut lines = FramedRead::new(
            StreamReader::new(futures::stream::iter(frames)),
            NdjsonCodec::new(max),
        );
        let mut decoded = Vec::new();
        while let Some(line) = lines.next().await {
            match line {
                Ok(line) => decoded.push(line),
                Err(e) => return (decoded, Some(e)),
            }
        }
        (decoded, None)
    }

    fn text(lines: &[&str]) -> Vec<Line> {
        lines.iter().map(|l| Line::Text((*l).to_owned())).collect()
    }

    #[tokio::test]
    async fn joins_lines_split_over_frames_and_skips_blank_ones() {
        let (lines, error) = decode(
            64,
            &[
                b"{\"a\":",
                b"1}\n\n{\"b\"",
                b":2}\r\nxyz\n",
                b" \r\n",
                b"\n",
            ],
        )
        .await;
        assert_eq!(lines, text(&["{\"a\":1}", "{\"b\":2}", "xyz"]));
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn byte_at_a_time_gives_the_same_lines_and_drops_a_cut_last_line() {
        let bytes = b"one\ntwo\nthree\nfou";
        let frames: Vec<&[u8]> = bytes.chunks(1).collect();
        let (lines, error) = decode(64, &frames).await;
        assert_eq!(lines, text(&["one", "two", "three"]));
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn a_line_that_is_not_utf8_is_one_bad_line() {
        let (lines, error) = decode(64, &[b"{}\n\xff\xfe\n{\"b\":2}\n"]).await;
        assert_eq!(
            lines,
            vec![
                Line::Text("{}".into()),
                Line::NotUtf8,
                Line::Text("{\"b\":2}".into())
            ]
        );
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn bounds_a_line_even_without_a_newline() {
        // A line of exactly the bound passes.
        let (lines, error) = decode(8, &[b"12345678\n"]).await;
        assert_eq!(lines, text(&["12345678"]));
        assert!(error.is_none());
        // One byte more is an error before its newline arrives: the codec does not buffer on.
        let (lines, error) = decode(8, &[b"12345", b"6789"]).await;
        assert_eq!(lines, Vec::new());
        assert!(
            matches!(error, Some(FramingError::LineTooLong { max: 8 })),
            "{error:?}"
        );
        let (lines, error) = decode(8, &[b"ok\n123456789\n"]).await;
        assert_eq!(lines, text(&["ok"]));
        assert!(
            matches!(error, Some(FramingError::LineTooLong { max: 8 })),
            "{error:?}"
        );
    }
}
