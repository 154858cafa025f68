//! `trellis-proxy`: the Trellis data plane, run as a sidecar beside every meshed workload.
//!
//! This crate owns everything that happens inside the proxy process: the capture listeners that
//! iptables redirects the pod's traffic to (outbound 15001, inbound 15006), endpoint choice and
//! the opaque TCP forwarding behind them, and mutual TLS between sidecars; the workload identity
//! (key, CSR, certificate rotation against the control plane's CA); the config stream from the
//! control plane (or a static `--config` file); Istio-compatible Prometheus telemetry; the
//! readiness and admin endpoints; and graceful drain. It does not own the capture rules
//! (`trellis-init` / `trellis-cni`) nor the config model and wire format (`trellis-api`).

mod admin;
mod app_probe;
mod capture;
mod cli;
mod config_file;
mod control_plane;
mod destination;
mod drain;
mod forward;
mod http_server;
mod identity;
mod inbound;
mod logging;
mod metrics;
mod mtls;
mod orig_dst;
mod outbound;
mod readiness;
mod sidecar;
mod sniff;
mod state;
mod wait_ready;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let args = match cli.command {
        cli::Command::Sidecar(args) => args,
        cli::Command::WaitReady {
            timeout_seconds,
            port,
        } => {
            return match wait_ready::wait(port, std::time::Duration::from_secs(timeout_seconds)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis-proxy wait-ready: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("trellis-proxy: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let log = match logging::init(&args.log_level) {
        Ok(log) => log,
        Err(e) => {
            eprintln!(
                "trellis-proxy: invalid --log-level {:?}: {e}",
                args.log_level
            );
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.concurrency.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sidecar::run(args, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "proxy failed");
            eprintln!("trellis-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
