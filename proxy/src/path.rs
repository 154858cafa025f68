//! Request path normalisation: the one place a request target becomes the path that is both
//! authorized and forwarded. Doing it once, and forwarding exactly what was authorized, is what
//! keeps a policy on `/admin` from being walked around with `/public/../admin`.
//!
//! [`normalize`] takes the origin-form request target (`/a/b?x=1`) and:
//!
//! * keeps the query separate and untouched (after the first `?`); policies match the path only;
//! * rejects (HTTP 400, reason `invalid_path`):
//!   - a target that does not start with `/` (asterisk- or authority-form never reaches a
//!     workload's inbound listener),
//!   - `#` (a fragment is never sent by a client; one on the wire is an attack on parsers that
//!     disagree about where the path ends),
//!   - NUL, other control bytes, DEL and non-ASCII bytes, raw or as `%00` (RFC 3986 requires
//!     them encoded; C-based servers truncate at NUL),
//!   - `%2F`/`%2f` (an encoded `/`), `%5C`/`%5c` (an encoded `\`) and a raw `\`, like Envoy's
//!     `path_with_escaped_slashes_action: REJECT_REQUEST`: applications disagree on whether an
//!     encoded slash separates segments (many frameworks decode before routing, others keep it as
//!     data, and some treat `\` as `/`), so any choice the proxy made would be wrong for some
//!     application and `/admin%2Fconfig` could reach `/admin/config` past a rule on `/admin/*`.
//!     Rejecting is the only choice safe for all; legitimate clients do not send them in paths,
//!   - a malformed escape (`%` not followed by two hex digits),
//!   - `;` and `%3B`/`%3b`: path parameters (RFC 3986 §3.3, "matrix parameters", Java's
//!     `;jsessionid=`). Servlet containers and frameworks (Tomcat, Jetty, Spring) cut a
//!     segment at `;` before routing, and some do so after decoding, so `/admin;x=1` serves
//!     `/admin` past a rule on exactly `/admin`, `/admin;/users` serves `/admin/users` past one
//!     on `/admin/*`, and `/public/..;/admin` serves `/admin` while it is no dot segment here.
//!     Envoy and Istio keep `;` as data and leave this to the application; stripping the
//!     parameters would change what other applications get. Rejecting, the choice Spring
//!     Security's firewall makes by default, is safe for every application; a `;` in the query
//!     is data and passes;
//! * decodes percent-escapes of unreserved characters only (`A-Z a-z 0-9 - . _ ~`, RFC 3986
//!   §2.3), so `/%61dmin` is `/admin` and `%2E%2E` is a `..` segment; other escapes stay encoded
//!   with uppercase hex digits (`%3a` → `%3A`), the RFC's normal form, so one resource has one
//!   spelling;
//! * merges repeated slashes (`//a///b` → `/a/b`);
//! * resolves `.` and `..` segments (RFC 3986 §5.2.4), never above the root (`/../a` → `/a`),
//!   keeping a trailing slash where the last segment was empty, `.` or `..`.
//!
//! Case is kept: path matching is case-sensitive, as in Istio (AuthorizationPolicy has no
//! `ignoreUriCase`), so `/ADMIN` is a different path from `/admin` and a rule on `/admin*` does
//! not cover it. An application that serves paths case-insensitively (some Windows and Java
//! servers do) must either reject or redirect paths that are not in its canonical case, or be
//! protected by policies written as an ALLOW list of the exact paths it serves (then `/ADMIN`
//! matches no ALLOW and is denied) rather than a DENY on `/admin`.
//!
//! Kept by hand: authorization depends on exactly these rules (Envoy's and Istio's, not a URL
//! library's), and every branch is table-tested and fuzzed (`path_normalize`).

use std::fmt::Write as _;

/// A request path normalised once, the way it is both authorized and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// Starts with `/`; no query, no fragment.
    pub path: String,
    /// Everything after the first `?`, untouched (`Some("")` for a bare `?`).
    pub query: Option<String>,
}

impl NormalizedPath {
    /// The request target to forward: the path and, when there was one, the query.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Why a request path is refused (answered with HTTP 400, reason `invalid_path`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the request path must start with '/'")]
    NotOriginForm,
    #[error("the request target contains a fragment ('#')")]
    Fragment,
    #[error("the request target contains a control or non-ASCII byte 0x{0:02X}")]
    ControlByte(u8),
    #[error("the request path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error(
        "the request path contains an escaped slash or backslash ({0}); it is rejected because \
         applications disagree on whether it separates path segments"
    )]
    EscapedSlash(String),
    #[error("the request path contains a backslash")]
    Backslash,
    #[error("the request path contains a malformed percent-escape at byte {0}")]
    MalformedEscape(usize),
    #[error(
        "the request path contains a path parameter ({0}); it is rejected because applications \
         disagree on whether it is part of the segment"
    )]
    PathParameter(String),
}

/// Normalises an origin-form request target (path and optional query). See the module doc.
pub fn normalize(path_and_query: &str) -> Result<NormalizedPath, PathError> {
    for byte in path_and_query.bytes() {
        match byte {
            b'#' => return Err(PathError::Fragment),
            0x00..=0x1f | 0x7f..=0xff => return Err(PathError::ControlByte(byte)),
            _ => {}
        }
    }
    let (raw_path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (path_and_query, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let decoded = decode_unreserved(raw_path)?;
    Ok(NormalizedPath {
        path: remove_dot_segments(&decoded),
        query,
    })
}

/// Decodes escapes of unreserved characters; keeps the others (uppercased); rejects escaped
/// slashes, encoded NUL, raw backslashes, path parameters and malformed escapes.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter(";".to_owned())),
            b'%' => {
                let escape = bytes
                    .get(i + 1..i + 3)
                    .ok_or(PathError::MalformedEscape(i))?;
                let (Some(high), Some(low)) = (hex_value(escape[0]), hex_value(escape[1])) else {
                    return Err(PathError::MalformedEscape(i));
                };
                let value = high << 4 | low;
                match value {
                    b'/' | b'\\' => {
                        return Err(PathError::EscapedSlash(path[i..i + 3].to_owned()));
                    }
                    0 => return Err(PathError::EncodedNul),
                    b';' => return Err(PathError::PathParameter(path[i..i + 3].to_owned())),
                    _ if is_unreserved(value) => out.push(char::from(value)),
                    // Writing into a String cannot fail.
                    _ => {
                        let _ = write!(out, "%{value:02X}");
                    }
                }
                i += 3;
            }
            byte => {
                out.push(char::from(byte));
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Resolves `.`/`..` and merges empty segments; `path` starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normalized.push('/');
    }
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_paths_once_and_keeps_the_query_apart() {
        let table: &[(&str, &str, Option<&str>)] = &[
            ("/", "/", None),
            ("/a/b", "/a/b", None),
            ("/a/b/", "/a/b/", None),
            ("/a/b?x=1&y=%2F", "/a/b", Some("x=1&y=%2F")),
            ("/a?", "/a", Some("")),
            ("/a?b?c", "/a", Some("b?c")),
            ("//a///b//", "/a/b/", None),
            ("/a/./b/.", "/a/b/", None),
            ("/a/b/../c", "/a/c", None),
            ("/a/b/..", "/a/", None),
            ("/../../etc/passwd", "/etc/passwd", None),
            ("/..", "/", None),
            ("/public/../admin", "/admin", None),
            ("/public/%2e%2e/admin", "/admin", None),
            ("/public/%2E%2E/admin", "/admin", None),
            ("/public/.%2e/admin", "/admin", None),
            ("/%61dmin", "/admin", None),
            ("/a%7Eb%2D%5F", "/a~b-_", None),
            ("/a%3ab%3A", "/a%3Ab%3A", None),
            ("/caf%C3%A9", "/caf%C3%A9", None),
            ("/a%20b", "/a%20b", None),
            ("/ADMIN", "/ADMIN", None),
            ("/a/...", "/a/...", None),
            ("/a/..b", "/a/..b", None),
        ];
        for (input, path, query) in table {
            let normalized = normalize(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(normalized.path, *path, "path of {input}");
            assert_eq!(normalized.query.as_deref(), *query, "query of {input}");
        }
    }

    #[test]
    fn rejects_what_applications_would_read_differently() {
        let table = [
            ("/admin%2Fconfig", PathError::EscapedSlash("%2F".into())),
            ("/admin%2fconfig", PathError::EscapedSlash("%2f".into())),
            ("/admin%5Cconfig", PathError::EscapedSlash("%5C".into())),
            ("/admin%5cconfig", PathError::EscapedSlash("%5c".into())),
            ("/admin\\config", PathError::Backslash),
            ("/a#frag", PathError::Fragment),
            ("/a?x=1#frag", PathError::Fragment),
            ("/a\0b", PathError::ControlByte(0)),
            ("/a\tb", PathError::ControlByte(b'\t')),
            ("/a\x7fb", PathError::ControlByte(0x7f)),
            ("/a?x=\r\n", PathError::ControlByte(b'\r')),
            ("/café", PathError::ControlByte(0xc3)),
            ("/a%00b", PathError::EncodedNul),
            ("/a%", PathError::MalformedEscape(2)),
            ("/a%4", PathError::MalformedEscape(2)),
            ("/a%zz", PathError::MalformedEscape(2)),
            ("/admin;x=1", PathError::PathParameter(";".into())),
            ("/public/..;/admin", PathError::PathParameter(";".into())),
            ("/admin;/users", PathError::PathParameter(";".into())),
            ("/;", PathError::PathParameter(";".into())),
            ("/admin%3Bx=1", PathError::PathParameter("%3B".into())),
            (
                "/public/..%3b/admin",
                PathError::PathParameter("%3b".into()),
            ),
            ("a/b", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("", PathError::NotOriginForm),
            ("?x=1", PathError::NotOriginForm),
        ];
        for (input, expected) in table {
            assert_eq!(normalize(input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn an_escaped_slash_or_a_semicolon_in_the_query_is_data() {
        let normalized = normalize("/search?q=a%2Fb%5C;c%3B").unwrap();
        assert_eq!(normalized.path, "/search");
        assert_eq!(normalized.path_and_query(), "/search?q=a%2Fb%5C;c%3B");
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for input in ["/a/./b/../c//d/", "/%61%3a/x/..", "/x?y", "/"] {
            let once = normalize(input).unwrap();
            let twice = normalize(&once.path_and_query()).unwrap();
            assert_eq!(once, twice, "{input}");
        }
    }
}
