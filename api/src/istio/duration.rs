//! Duration strings as Istio reads them, and the minimum each field has.
//!
//! Istio's webhook decodes a `google.protobuf.Duration` field of its YAML with the Go protobuf
//! JSON decoder (`github.com/golang/protobuf/jsonpb`), which hands the string to Go's
//! `time.ParseDuration` (its error reads "bad Duration: time: unknown unit ..."), not the
//! protobuf-JSON `"1.5s"`-only form. So the syntax here is Go's:
//! - one or more `<number><unit>` pairs (`1h30m`, `1.5s`, `.5s`, `1.s`), units `ns`, `us`, `µs`
//!   (U+00B5), `μs` (U+03BC), `ms`, `s`, `m`, `h`; no `d`, no spaces, no exponent;
//! - a lone `0` (also `+0`), the one number allowed without a unit;
//! - a leading `+`;
//! - fractions kept to the nanosecond, digits below it dropped (Go truncates too);
//! - at most `i64::MAX` nanoseconds (about 2562047h), Go's limit; more is refused.
//!
//! Where Trellis is stricter than Go: a leading `-` is refused, even for zero. Go parses a
//! negative duration, and Istio's `ValidateDuration` refuses it only on the fields it checks;
//! no Istio field means anything by a negative one (a negative `httpCookie.ttl` would reach
//! Envoy), so the webhook refuses them everywhere.
//!
//! The minimums per field ([`Minimum`]) are those of Istio's webhook (`pkg/config/validation`):
//! `ValidateDuration` (at least 1ms, whole milliseconds) on timeouts, intervals and the like;
//! TCP `idleTimeout` may also be `0s` (disabled); `httpCookie.ttl` has none (`0s` is a session
//! cookie). The compiler takes any duration that parses and rounds it up to whole milliseconds
//! ([`millis`]), so nothing the webhook admits is dropped and nothing non-zero becomes zero.
//!
//! The demo apps read their flags and `delay=` controls with this parser too: one syntax for
//! the whole repository, and `trellis-api` costs the demo crate nothing it does not already
//! link (it depends on kube and k8s-openapi already).

use std::time::Duration;

/// Why a duration string was refused; the message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration (write it like \"1.5s\", \"100ms\" or \"1h\")")]
    Syntax(String),
    #[error("{0:?} is negative, and no duration field takes a negative value")]
    Negative(String),
    #[error("{0:?} is longer than the longest duration Istio holds (about 2562047h)")]
    TooLong(String),
    #[error("{0:?} is shorter than the minimum of 1ms")]
    BelowMillisecond(String),
    #[error("{0:?} is not a whole number of milliseconds (Istio supports only ms precision here)")]
    NotWholeMilliseconds(String),
}

/// What Istio's webhook requires of a duration field beyond its syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Minimum {
    /// Any duration, zero included (`httpCookie.ttl`).
    None,
    /// Istio's `ValidateDuration`: at least 1ms and a whole number of milliseconds (route
    /// `timeout`, `perTryTimeout`, fault `fixedDelay`, connect/idle timeouts, outlier intervals…).
    Millisecond,
    /// TCP `idleTimeout`: whatever is under a millisecond (`0s`: never time out) is left alone
    /// by Istio, anything longer is held to [`Minimum::Millisecond`].
    ZeroOrMillisecond,
}

/// Longest duration Go holds: `i64::MAX` nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

/// Parses a duration as Istio's webhook decodes it (see the module doc).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_owned());
    let mut rest = match text.as_bytes().first() {
        Some(b'-') => return Err(DurationError::Negative(text.to_owned())),
        Some(b'+') => &text[1..],
        _ => text,
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(syntax());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (whole, after) = rest.split_at(digits(rest));
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after_dot) => after_dot.split_at(digits(after_dot)),
            None => ("", after),
        };
        // `.` alone, or a unit with no number before it.
        if whole.is_empty() && fraction.is_empty() {
            return Err(syntax());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(syntax()),
        };
        rest = after;
        let too_long = || DurationError::TooLong(text.to_owned());
        // More than 20 digits cannot fit Go's limit whatever the unit.
        let whole: u128 = if whole.is_empty() {
            0
        } else if whole.len() > 20 {
            return Err(too_long());
        } else {
            whole.parse().map_err(|_| syntax())?
        };
        // 19 digits are finer than a nanosecond of an hour: the rest cannot change the sum.
        let fraction = &fraction[..fraction.len().min(19)];
        let scaled = if fraction.is_empty() {
            0
        } else {
            let numerator: u128 = fraction.parse().map_err(|_| syntax())?;
            numerator * unit / 10u128.pow(fraction.len() as u32)
        };
        total += whole * unit + scaled;
        if total > MAX_NANOS {
            return Err(too_long());
        }
    }
    let nanos = u64::try_from(total).expect("at most i64::MAX nanoseconds");
    Ok(Duration::from_nanos(nanos))
}

/// Parses a duration and holds it to the field's [`Minimum`], as Istio's webhook does.
pub fn parse_with_minimum(text: &str, minimum: Minimum) -> Result<Duration, DurationError> {
    let duration = parse(text)?;
    let exempt = minimum == Minimum::None
        || (minimum == Minimum::ZeroOrMillisecond && duration < Duration::from_millis(1));
    if exempt {
        Ok(duration)
    } else if duration < Duration::from_millis(1) {
        Err(DurationError::BelowMillisecond(text.to_owned()))
    } else if duration.subsec_nanos() % 1_000_000 != 0 {
        Err(DurationError::NotWholeMilliseconds(text.to_owned()))
    } else {
        Ok(duration)
    }
}

/// Whole milliseconds, rounded up: the proxy's traffic model counts in milliseconds, and a
/// sub-millisecond duration must not turn into 0 (which for most fields means "no limit").
pub fn millis(duration: Duration) -> u64 {
    let rounded_up = duration.as_nanos().div_ceil(1_000_000);
    u64::try_from(rounded_up).expect("durations are at most i64::MAX nanoseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_as_go_time_parse_duration() {
        let ns = Duration::from_nanos;
        let cases = [
            ("1.5s", Ok(ns(1_500_000_000))),
            ("100ms", Ok(ns(100_000_000))),
            ("1h", Ok(ns(3_600_000_000_000))),
            ("1h30m", Ok(ns(5_400_000_000_000))),
            ("1m30s", Ok(ns(90_000_000_000))),
            (".5s", Ok(ns(500_000_000))),
            ("1.s", Ok(ns(1_000_000_000))),
            ("250us", Ok(ns(250_000))),
            ("250µs", Ok(ns(250_000))),
            ("250μs", Ok(ns(250_000))),
            ("10ns", Ok(ns(10))),
            ("0", Ok(Duration::ZERO)),
            ("+0", Ok(Duration::ZERO)),
            ("0s", Ok(Duration::ZERO)),
            ("+2s", Ok(ns(2_000_000_000))),
            ("1.0000000001s", Ok(ns(1_000_000_000))),
            ("0.1234567891234567891234h", Ok(ns(444_444_440_844))),
            ("2562047h47m16.854775807s", Ok(ns(i64::MAX as u64))),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), expected, "{text:?}");
        }
    }

    #[test]
    fn refuses_what_go_refuses_and_negatives() {
        let syntax = [
            "", "+", "s", ".s", ".", "5", "00", "1d", "1 s", " 1s", "1s ", "1s5", "1e3s", "1S",
            "1.2.3s", "++1s", "1h-1m",
        ];
        for text in syntax {
            assert_eq!(
                parse(text),
                Err(DurationError::Syntax(text.to_owned())),
                "{text:?}"
            );
        }
        for text in ["-1s", "-0", "-0s"] {
            assert_eq!(parse(text), Err(DurationError::Negative(text.to_owned())));
        }
        for text in [
            "2562047h47m16.854775808s",
            "3000000h",
            "99999999999999999999999h",
        ] {
            assert_eq!(parse(text), Err(DurationError::TooLong(text.to_owned())));
        }
    }

    #[test]
    fn minimums_follow_istio_per_field() {
        use Minimum::*;
        let ok = |ms: u64| Ok(Duration::from_millis(ms));
        let below = |t: &str| Err(DurationError::BelowMillisecond(t.to_owned()));
        let fine = |t: &str| Err(DurationError::NotWholeMilliseconds(t.to_owned()));
        let cases = [
            ("0", None, ok(0)),
            ("0s", Millisecond, below("0s")),
            ("0s", ZeroOrMillisecond, ok(0)),
            ("1ms", Millisecond, ok(1)),
            ("1.5ms", Millisecond, fine("1.5ms")),
            ("1500us", ZeroOrMillisecond, fine("1500us")),
            ("1.5s", Millisecond, ok(1500)),
            ("999us", Millisecond, below("999us")),
        ];
        for (text, minimum, expected) in cases {
            assert_eq!(
                parse_with_minimum(text, minimum),
                expected,
                "{text:?} {minimum:?}"
            );
        }
        assert_eq!(
            parse_with_minimum("999us", ZeroOrMillisecond),
            Ok(Duration::from_micros(999))
        );
        assert_eq!(
            parse_with_minimum("1us", None),
            Ok(Duration::from_micros(1))
        );
    }

    #[test]
    fn millis_round_up() {
        assert_eq!(millis(Duration::ZERO), 0);
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::from_nanos(1_000_001)), 2);
        assert_eq!(
            millis(Duration::from_nanos(i64::MAX as u64)),
            9_223_372_036_855
        );
    }
}
