//! The version every Trellis binary reports (`--version`, the control plane, the operator's
//! default data-plane version).
//!
//! It is read from a fixed-size slot in the binary's read-only data rather than compiled in as a
//! constant, so that images of another version (an upgrade test's "next" release) are made from
//! the same build by rewriting the slot in a copy of the binary (`e2e/oci-image.py --version`),
//! without recompiling the workspace. A normal build's slot holds the workspace version.
//!
//! Slot layout: [`MARKER`] followed by the version, NUL-padded to [`SLOT_LEN`] bytes. The marker
//! appears exactly once in a binary (nothing else spells it), which is how the stamper finds it.

/// Bytes that precede the version in the slot.
pub const MARKER: &[u8] = b"trellis-version-slot:";
/// Total size of the slot; a version is at most `SLOT_LEN - MARKER.len() - 1` bytes.
pub const SLOT_LEN: usize = 80;

/// The slot itself. `#[used]` keeps it even if the optimiser could prove `current` constant.
#[used]
static SLOT: [u8; SLOT_LEN] = slot(env!("CARGO_PKG_VERSION"));

const fn slot(version: &str) -> [u8; SLOT_LEN] {
    let version = version.as_bytes();
    assert!(
        MARKER.len() + version.len() < SLOT_LEN,
        "version too long for the slot"
    );
    let mut out = [0u8; SLOT_LEN];
    let mut i = 0;
    while i < MARKER.len() {
        out[i] = MARKER[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() {
        out[MARKER.len() + j] = version[j];
        j += 1;
    }
    out
}

/// The version this binary reports: the workspace version, or the one stamped into the slot.
pub fn current() -> &'static str {
    // black_box: the compiler must read the slot at run time instead of folding the build-time
    // contents into the code, or a stamped binary would still report the old version.
    parse(std::hint::black_box(&SLOT)).unwrap_or(env!("CARGO_PKG_VERSION"))
}

/// The version in a slot, if it is well formed (1.. version bytes after the marker, then NULs).
/// The marker is skipped, never compared: comparing would put a second copy of its bytes into
/// the binary, and the stamper requires exactly one.
fn parse(slot: &[u8]) -> Option<&str> {
    let value = slot.get(MARKER.len()..)?;
    let end = value.iter().position(|b| *b == 0)?;
    if end == 0 || value[end..].iter().any(|b| *b != 0) {
        return None;
    }
    let version = std::str::from_utf8(&value[..end]).ok()?;
    version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        .then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normal_build_reports_the_workspace_version() {
        assert_eq!(current(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_stamped_slot_reports_the_stamp() {
        assert_eq!(parse(&slot("0.2.0-next.1")), Some("0.2.0-next.1"));
    }

    #[test]
    fn a_damaged_slot_is_not_trusted() {
        let mut s = slot("0.2.0");
        s[MARKER.len() + 1] = b'/';
        assert_eq!(parse(&s), None);
        let mut s = slot("0.2.0");
        s[SLOT_LEN - 1] = b'x';
        assert_eq!(parse(&s), None, "no garbage after the version");
        assert_eq!(parse(&[0u8; SLOT_LEN]), None, "an empty version");
    }
}
