//! `trellisctl`: the command-line companion of a Trellis mesh. It owns user-facing workflows
//! that need no server of their own; today it prints the install manifest's version and the
//! data-plane defaults, and grows `check`, `analyze`, `inject` and `proxy-config` next.

use clap::{Parser, Subcommand};
use trellis_api::wellknown;

#[derive(Parser)]
#[command(
    name = "trellisctl",
    version,
    about = "Install, check and inspect a Trellis mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the client version and the well-known ports a sidecar uses.
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => {
            println!("trellisctl {}", env!("CARGO_PKG_VERSION"));
            println!(
                "proxy ports: outbound {} inbound {} admin {} metrics {} readiness {}",
                wellknown::OUTBOUND_CAPTURE_PORT,
                wellknown::INBOUND_CAPTURE_PORT,
                wellknown::ADMIN_PORT,
                wellknown::METRICS_PORT,
                wellknown::READINESS_PORT
            );
        }
    }
}
