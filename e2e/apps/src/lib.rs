//! Shared code for the Trellis demo applications (`demo-server`, `demo-client`
//! and `cluster-dns`): request behaviour controls, gRPC and WebSocket framing,
//! DNS packet handling, and the demo HTTP server itself.

pub mod body;
pub mod control;
pub mod dns;
pub mod duration;
pub mod grpc;
pub mod server;
pub mod stats;
pub mod ws;

/// Writes one JSON line to stdout, ignoring errors (a closed stdout must
/// not take the process down, unlike `println!`).
pub fn print_json(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}
