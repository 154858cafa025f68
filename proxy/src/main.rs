//! `trellis-proxy` binary: parses the command line, installs the crypto provider, logging and
//! the runtime, and runs the sidecar from the `trellis_proxy` library.

use trellis_proxy::{cli, logging, sidecar, wait_ready};

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
