//! Host normalisation: the one place a request's authority (`:authority` / `Host`) or a TLS
//! server name becomes the host that routing (`crate::route`, `crate::destination`) and
//! authorization (`crate::authz`) both compare, and that is forwarded. Normalising once, for
//! both, is what keeps a DENY on `admin.example.com` or a route for it from being walked around
//! with `ADMIN.example.com`, `admin.example.com.` or `admin.example.com:80`.
//!
//! [`Authority::parse`]:
//! * lowers ASCII case (host names are case-insensitive, RFC 3986 §3.2.2);
//! * drops trailing dots (`example.com.` is the fully qualified spelling of `example.com`;
//!   Envoy's `strip_trailing_host_dot` does the same);
//! * keeps the port apart: [`Authority::host`] has none, [`Authority::as_str`] is `host:port`
//!   when the request named a port. A bracketed IPv6 literal keeps its brackets.

use std::fmt;

/// An authority normalised once (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authority {
    /// `host` or `host:port`, normalised.
    normalized: String,
    /// Where the host ends in `normalized`.
    host_len: usize,
    port: Option<u16>,
}

impl Authority {
    /// Normalises `authority` (`host`, `host:port`, `[v6]:port`; empty when the request named
    /// none).
    pub fn parse(authority: &str) -> Self {
        let (host, port) = split_port(authority);
        let mut normalized = host.trim_end_matches('.').to_ascii_lowercase();
        let host_len = normalized.len();
        if let Some(port) = port {
            normalized.push(':');
            normalized.push_str(&port.to_string());
        }
        Self {
            normalized,
            host_len,
            port,
        }
    }

    /// The host without its port.
    pub fn host(&self) -> &str {
        &self.normalized[..self.host_len]
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `host` or `host:port`: what is matched where a port may be named, and forwarded.
    pub fn as_str(&self) -> &str {
        &self.normalized
    }

    pub fn is_empty(&self) -> bool {
        self.normalized.is_empty()
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.normalized)
    }
}

/// `(host, port)` of `host:port`; a bare IPv6 address (more than one `:` outside brackets) and
/// a port that is not a number stay part of the host.
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.contains(':') || (host.starts_with('[') && host.ends_with(']')) =>
        {
            match port.parse::<u16>() {
                Ok(port) => (host, Some(port)),
                Err(_) if port.is_empty() => (host, None),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_case_trailing_dots_and_keep_their_port_apart() {
        // (authority, host, port, normalised authority)
        let table: &[(&str, &str, Option<u16>, &str)] = &[
            ("reviews", "reviews", None, "reviews"),
            ("reviews:9080", "reviews", Some(9080), "reviews:9080"),
            (
                "Admin.Example.COM",
                "admin.example.com",
                None,
                "admin.example.com",
            ),
            (
                "admin.example.com.",
                "admin.example.com",
                None,
                "admin.example.com",
            ),
            (
                "ADMIN.example.com.:80",
                "admin.example.com",
                Some(80),
                "admin.example.com:80",
            ),
            (
                "admin.example.com..",
                "admin.example.com",
                None,
                "admin.example.com",
            ),
            ("admin:", "admin", None, "admin"),
            ("10.0.0.1:80", "10.0.0.1", Some(80), "10.0.0.1:80"),
            ("[::1]:8080", "[::1]", Some(8080), "[::1]:8080"),
            ("[FE80::1]", "[fe80::1]", None, "[fe80::1]"),
            ("fe80::1", "fe80::1", None, "fe80::1"),
            ("host:http", "host:http", None, "host:http"),
            ("host:99999", "host:99999", None, "host:99999"),
            ("", "", None, ""),
        ];
        for (authority, host, port, normalized) in table {
            let parsed = Authority::parse(authority);
            assert_eq!(parsed.host(), *host, "host of {authority}");
            assert_eq!(parsed.port(), *port, "port of {authority}");
            assert_eq!(parsed.as_str(), *normalized, "{authority}");
            assert_eq!(
                Authority::parse(parsed.as_str()),
                parsed,
                "idempotent: {authority}"
            );
        }
    }
}
