//! Shared code for the Trellis demo applications (`demo-server`, `demo-client`,
//! `cluster-dns` and `ext-authz`): request behaviour controls, the external
//! authorizer (on envoy-types' ext_authz definitions), gRPC framing, the
//! WebSocket echo and client (on tokio-tungstenite), cluster-dns's answers
//! (on hickory-proto), the demo HTTP server itself, and the client's
//! protocol modes.

pub mod body;
pub mod client;
pub mod control;
pub mod dns;
pub mod ext_authz;
pub mod grpc;
pub mod server;
pub mod size;
pub mod stats;
pub mod upload;
pub mod ws;

/// The splitmix64 output function: a well-mixed 64-bit value from a state
/// that callers advance by the golden-ratio increment. Enough for failure
/// rolls and test patterns; not cryptographic.
pub fn splitmix64(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes one JSON line to stdout, ignoring errors (a closed stdout must
/// not take the process down, unlike `println!`).
pub fn print_json(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}
