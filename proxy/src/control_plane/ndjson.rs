//! Splits a byte stream into newline-delimited lines, whatever the frame boundaries, with a
//! bound on the length of one line.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line longer than {max} bytes")]
pub struct LineTooLong {
    pub max: usize,
}

pub struct LineSplitter {
    buffer: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max,
        }
    }

    /// Feeds one chunk; returns the complete, non-blank lines it finished (without `\n` or a
    /// trailing `\r`). A line that grows past the bound is an error; the stream is then unusable.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            if self.buffer.len() + pos > self.max {
                return Err(LineTooLong { max: self.max });
            }
            self.buffer.extend_from_slice(&rest[..pos]);
            rest = &rest[pos + 1..];
            let mut line = std::mem::take(&mut self.buffer);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        if self.buffer.len() + rest.len() > self.max {
            return Err(LineTooLong { max: self.max });
        }
        self.buffer.extend_from_slice(rest);
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_lines_split_over_frames_and_skips_blank_ones() {
        let mut splitter = LineSplitter::new(64);
        assert_eq!(splitter.push(b"{\"a\":").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            splitter.push(b"1}\n\n{\"b\"").unwrap(),
            vec![b"{\"a\":1}".to_vec()]
        );
        assert_eq!(
            splitter.push(b":2}\r\nxyz\n").unwrap(),
            vec![b"{\"b\":2}".to_vec(), b"xyz".to_vec()]
        );
        assert_eq!(splitter.push(b"\n").unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_lines() {
        let mut splitter = LineSplitter::new(64);
        let mut lines = Vec::new();
        for b in b"one\ntwo\nthree" {
            lines.extend(splitter.push(&[*b]).unwrap());
        }
        lines.extend(splitter.push(b"\n").unwrap());
        assert_eq!(
            lines,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn bounds_a_line_even_without_a_newline() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(
            splitter.push(b"12345678\n").unwrap(),
            vec![b"12345678".to_vec()]
        );
        assert_eq!(splitter.push(b"12345"), Ok(vec![]));
        assert_eq!(splitter.push(b"6789"), Err(LineTooLong { max: 8 }));
        let mut splitter = LineSplitter::new(8);
        assert_eq!(
            splitter.push(b"ok\n123456789\n"),
            Err(LineTooLong { max: 8 })
        );
    }
}
