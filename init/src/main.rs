//! `trellis-init`: the init container that installs the capture rules in a pod's network namespace.
fn main() {}
