//! Human-friendly byte sizes for the client's `--bytes`: `100MB`, `1GiB`,
//! `1.5KiB`, `512` (bytes). Decimal units (`KB`, `MB`, `GB`, `TB`) are powers
//! of 1000, binary ones (`KiB`, `MiB`, `GiB`, `TiB`) powers of 1024; unit
//! letters are case-insensitive.

/// Parses a byte size such as `100MB`, `1GiB`, `64k` or `512`.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(format!("invalid size {input:?}: missing number"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {input:?}: bad number"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size {input:?}: unknown unit {other:?}")),
    };
    let bytes = (value * scale).round();
    // 2^53: beyond it f64 no longer holds every integer, and no test needs it.
    if !(0.0..=9_007_199_254_740_992.0).contains(&bytes) {
        return Err(format!("invalid size {input:?}: out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        for (input, want) in [
            ("512", 512u64),
            ("0", 0),
            ("100MB", 100_000_000),
            ("100mb", 100_000_000),
            ("1GiB", 1 << 30),
            ("1gib", 1 << 30),
            ("1.5KiB", 1536),
            ("64k", 64_000),
            ("2 MiB", 2 << 20),
            ("3TB", 3_000_000_000_000),
            ("1Ti", 1 << 40),
            ("10B", 10),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for (input, needle) in [
            ("", "missing number"),
            ("MB", "missing number"),
            ("-1MB", "missing number"),
            ("1.2.3MB", "bad number"),
            ("5 parsecs", "unknown unit"),
            ("10 Mbit", "unknown unit"),
            ("99999999999TB", "out of range"),
        ] {
            let err = parse_size(input).unwrap_err();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }
}
