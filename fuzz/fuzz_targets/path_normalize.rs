//! Fuzzes the request path normaliser, the one place a request target becomes the path that is
//! both authorized and forwarded. Besides never panicking, what it accepts must come out in
//! normal form: idempotent, rooted, without empty, `.` or `..` segments, without an escaped
//! slash, with the query untouched.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normalized) = normalize(target) else {
        return;
    };
    let path = &normalized.path;
    assert!(path.starts_with('/'), "{target:?} → {path:?} is not rooted");
    assert!(
        !path.contains("//"),
        "{target:?} → {path:?} has an empty segment"
    );
    assert!(
        !path
            .split('/')
            .any(|segment| segment == "." || segment == ".."),
        "{target:?} → {path:?} has a dot segment"
    );
    let upper = path.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C") && !path.contains('\\'),
        "{target:?} → {path:?} has an escaped slash or a backslash"
    );
    assert!(
        !path.contains('?') && !path.contains('#'),
        "{target:?} → {path:?}"
    );
    assert_eq!(
        normalized.query.as_deref(),
        target.split_once('?').map(|(_, query)| query),
        "the query of {target:?} was changed"
    );
    // Normalising the output again changes nothing (what is authorized is what is forwarded).
    let again = normalize(&normalized.path_and_query()).unwrap_or_else(|e| {
        panic!("{target:?} → {normalized:?} is refused when normalised again: {e}")
    });
    assert_eq!(
        again, normalized,
        "normalising {target:?} is not idempotent"
    );
});
