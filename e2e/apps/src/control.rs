//! Per-request behaviour controls of the demo server, given as query
//! parameters (`?status=503&delay=2s`) or as the equivalent `x-demo-*`
//! request headers (`x-demo-status: 503`, `x-demo-delay: 2s`). A query
//! parameter wins over a header of the same control, and both win over the
//! server's defaults (`demo-server --defaults status=503`), so one pod can be
//! made "bad" or "slow" for every request while a request can still ask for
//! something else.

use std::time::Duration;

use http::HeaderMap;

use trellis_api::istio::duration;

/// The behaviour requested for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Controls {
    /// Answer with this HTTP status.
    pub status: Option<u16>,
    /// Answer 503 with this probability (percent, 0..=100), else 200.
    pub fail_percent: Option<f64>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Never answer; hold the request until the client goes away.
    pub hang: bool,
    /// Answer with a body of this many filler bytes instead of JSON.
    pub size: Option<u64>,
    /// gRPC status to end a gRPC echo with (`grpc-status` trailer).
    pub grpc_status: Option<u32>,
    /// gRPC message to send with a non-zero `grpc_status`.
    pub grpc_message: Option<String>,
}

/// The control names, as used in query parameters; the header form is
/// `x-demo-` followed by the name with `_` replaced by `-`.
pub const CONTROL_NAMES: [&str; 7] = [
    "status",
    "fail_percent",
    "delay",
    "hang",
    "size",
    "grpc_status",
    "grpc_message",
];

impl Controls {
    /// Reads the controls from a raw query string and request headers.
    pub fn from_request(query: Option<&str>, headers: &HeaderMap) -> Result<Controls, String> {
        Controls::layered(&Controls::default(), query, headers)
    }

    /// Parses server-wide default controls given as a query string
    /// (`status=503&delay=2s`). Unlike a request's query, every key must be
    /// a control: a typo would otherwise silently do nothing.
    pub fn parse_defaults(spec: &str) -> Result<Controls, String> {
        let mut controls = Controls::default();
        for (key, value) in parse_query(spec.trim().trim_start_matches('?')) {
            let name = key.replace('-', "_");
            if !CONTROL_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "unknown control {key:?} (known: {})",
                    CONTROL_NAMES.join(", ")
                ));
            }
            controls
                .set(&name, &value)
                .map_err(|e| format!("default {name}: {e}"))?;
        }
        Ok(controls)
    }

    /// The controls of one request: `defaults`, overridden by the request's
    /// `x-demo-*` headers, overridden by its query parameters.
    pub fn layered(
        defaults: &Controls,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Controls, String> {
        let mut controls = defaults.clone();
        for name in CONTROL_NAMES {
            let header = format!("x-demo-{}", name.replace('_', "-"));
            if let Some(value) = headers.get(header.as_str()) {
                let value = value
                    .to_str()
                    .map_err(|_| format!("header {header}: not valid text"))?;
                controls
                    .set(name, value)
                    .map_err(|e| format!("header {header}: {e}"))?;
            }
        }
        if let Some(query) = query {
            for (key, value) in parse_query(query) {
                let key = key.replace('-', "_");
                if CONTROL_NAMES.contains(&key.as_str()) {
                    controls
                        .set(&key, &value)
                        .map_err(|e| format!("query parameter {key}: {e}"))?;
                }
            }
        }
        Ok(controls)
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let value = value.trim();
        match name {
            "status" => {
                let status: u16 = value.parse().map_err(|_| format!("bad status {value:?}"))?;
                if !(100..=999).contains(&status) {
                    return Err(format!("status {status} out of range"));
                }
                self.status = Some(status);
            }
            "fail_percent" => {
                let pct: f64 = value
                    .trim_end_matches('%')
                    .parse()
                    .map_err(|_| format!("bad percentage {value:?}"))?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(format!("percentage {pct} out of range 0..100"));
                }
                self.fail_percent = Some(pct);
            }
            "delay" => self.delay = Some(duration::parse(value).map_err(|e| e.to_string())?),
            "hang" => {
                self.hang = match value.to_ascii_lowercase().as_str() {
                    "" | "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" => false,
                    _ => return Err(format!("bad boolean {value:?}")),
                }
            }
            "size" => self.size = Some(value.parse().map_err(|_| format!("bad size {value:?}"))?),
            "grpc_status" => {
                let code: u32 = value
                    .parse()
                    .map_err(|_| format!("bad grpc status {value:?}"))?;
                if code > 16 {
                    return Err(format!("grpc status {code} out of range 0..16"));
                }
                self.grpc_status = Some(code);
            }
            "grpc_message" => self.grpc_message = Some(value.to_string()),
            _ => {}
        }
        Ok(())
    }

    /// The HTTP status to answer with, drawing `fail_percent` with `roll`, a
    /// uniform number in `[0, 100)`.
    pub fn pick_status(&self, roll: f64) -> u16 {
        if let Some(status) = self.status {
            return status;
        }
        match self.fail_percent {
            Some(pct) if roll < pct => 503,
            _ => 200,
        }
    }
}

/// Splits a raw query string into percent-decoded `(key, value)` pairs.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes are kept as is.
pub fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn query_controls() {
        let c = Controls::from_request(
            Some("status=503&delay=500ms&size=10&hang=1&fail_percent=50&x=y"),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(c.status, Some(503));
        assert_eq!(c.delay, Some(Duration::from_millis(500)));
        assert_eq!(c.size, Some(10));
        assert!(c.hang);
        assert_eq!(c.fail_percent, Some(50.0));
    }

    #[test]
    fn header_controls_and_precedence() {
        let mut h = HeaderMap::new();
        h.insert("x-demo-status", HeaderValue::from_static("418"));
        h.insert("x-demo-fail-percent", HeaderValue::from_static("25"));
        h.insert("x-demo-delay", HeaderValue::from_static("2s"));
        h.insert("x-demo-hang", HeaderValue::from_static("true"));
        h.insert("x-demo-grpc-status", HeaderValue::from_static("14"));
        h.insert("x-demo-grpc-message", HeaderValue::from_static("go away"));
        let c = Controls::from_request(None, &h).unwrap();
        assert_eq!(c.status, Some(418));
        assert_eq!(c.fail_percent, Some(25.0));
        assert_eq!(c.delay, Some(Duration::from_secs(2)));
        assert!(c.hang);
        assert_eq!(c.grpc_status, Some(14));
        assert_eq!(c.grpc_message.as_deref(), Some("go away"));
        let c = Controls::from_request(Some("status=200&hang=0"), &h).unwrap();
        assert_eq!(c.status, Some(200));
        assert!(!c.hang);
    }

    #[test]
    fn rejects_bad_values() {
        let h = HeaderMap::new();
        for q in [
            "status=abc",
            "status=42",
            "fail_percent=101",
            "fail_percent=x",
            "delay=forever",
            "hang=maybe",
            "size=-1",
            "grpc_status=99",
        ] {
            assert!(Controls::from_request(Some(q), &h).is_err(), "{q}");
        }
    }

    #[test]
    fn defaults_layer_under_headers_and_query() {
        let defaults = Controls::parse_defaults("status=503&delay=2s&grpc-status=14").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-demo-status", HeaderValue::from_static("418"));
        // (query, with headers, want status, want delay, want grpc status)
        type Case<'a> = (
            Option<&'a str>,
            bool,
            Option<u16>,
            Option<Duration>,
            Option<u32>,
        );
        let cases: [Case; 5] = [
            (
                None,
                false,
                Some(503),
                Some(Duration::from_secs(2)),
                Some(14),
            ),
            (
                None,
                true,
                Some(418),
                Some(Duration::from_secs(2)),
                Some(14),
            ),
            (
                Some("status=200"),
                true,
                Some(200),
                Some(Duration::from_secs(2)),
                Some(14),
            ),
            (
                Some("delay=0s&grpc_status=0"),
                false,
                Some(503),
                Some(Duration::ZERO),
                Some(0),
            ),
            (
                Some("unrelated=1"),
                false,
                Some(503),
                Some(Duration::from_secs(2)),
                Some(14),
            ),
        ];
        for (query, with_headers, status, delay, grpc) in cases {
            let headers = if with_headers {
                h.clone()
            } else {
                HeaderMap::new()
            };
            let c = Controls::layered(&defaults, query, &headers).unwrap();
            assert_eq!(
                (c.status, c.delay, c.grpc_status),
                (status, delay, grpc),
                "{query:?} headers={with_headers}"
            );
        }
        // A default `hang` can be switched off per request.
        let hang = Controls::parse_defaults("hang").unwrap();
        assert!(hang.hang);
        let c = Controls::layered(&hang, Some("hang=false"), &HeaderMap::new()).unwrap();
        assert!(!c.hang);
        // No defaults: the same as from_request.
        assert_eq!(
            Controls::layered(&Controls::default(), Some("size=5"), &h).unwrap(),
            Controls::from_request(Some("size=5"), &h).unwrap()
        );
    }

    #[test]
    fn parse_defaults_accepts_controls_only() {
        assert_eq!(Controls::parse_defaults("").unwrap(), Controls::default());
        let c = Controls::parse_defaults("?fail_percent=20&size=100").unwrap();
        assert_eq!((c.fail_percent, c.size), (Some(20.0), Some(100)));
        for (spec, needle) in [
            ("stauts=503", "unknown control \"stauts\""),
            ("status=5000", "default status: status 5000 out of range"),
            ("delay=soon", "default delay"),
        ] {
            let err = Controls::parse_defaults(spec).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn pick_status() {
        let c = Controls::default();
        assert_eq!(c.pick_status(0.0), 200);
        let c = Controls {
            fail_percent: Some(100.0),
            ..Default::default()
        };
        assert_eq!(c.pick_status(99.999), 503);
        let c = Controls {
            fail_percent: Some(0.0),
            ..Default::default()
        };
        assert_eq!(c.pick_status(0.0), 200);
        let c = Controls {
            fail_percent: Some(50.0),
            ..Default::default()
        };
        assert_eq!(c.pick_status(49.0), 503);
        assert_eq!(c.pick_status(50.0), 200);
        let c = Controls {
            status: Some(404),
            fail_percent: Some(100.0),
            ..Default::default()
        };
        assert_eq!(c.pick_status(0.0), 404);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
        assert_eq!(
            parse_query("delay=1s&&flag&a=%31"),
            vec![
                ("delay".into(), "1s".into()),
                ("flag".into(), "".into()),
                ("a".into(), "1".into())
            ]
        );
    }
}
