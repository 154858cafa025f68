//! `trellisctl`: the command-line companion of a Trellis mesh. It owns user-facing workflows
//! that need no server of their own: the version and the data-plane defaults, and `validate`,
//! which checks Istio resources in files with the admission webhook's rules before they are
//! applied. `check`, `inject` and `proxy-config` come next.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis_config::wellknown;

mod validate;

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
    /// Check the Istio resources (networking.istio.io, security.istio.io) in YAML files as the
    /// admission webhook would. Exit status 1 when one is refused, 2 when an input cannot be
    /// read.
    Validate {
        /// Files or directories (their .yaml/.yml files, recursively); `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        inputs: Vec<PathBuf>,
        /// The namespace of objects that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Version => {
            println!("trellisctl {}", trellis_config::version::current());
            println!(
                "proxy ports: outbound {} inbound {} admin {} metrics {} readiness {}",
                wellknown::OUTBOUND_CAPTURE_PORT,
                wellknown::INBOUND_CAPTURE_PORT,
                wellknown::ADMIN_PORT,
                wellknown::METRICS_PORT,
                wellknown::READINESS_PORT
            );
            ExitCode::SUCCESS
        }
        Command::Validate { inputs, namespace } => match read_documents(&inputs) {
            Err(message) => {
                eprintln!("trellisctl validate: {message}");
                ExitCode::from(2)
            }
            Ok(documents) => {
                let report = validate::validate(&documents, &namespace);
                for finding in &report.invalid {
                    print!("{finding}");
                }
                println!(
                    "{} valid, {} invalid, {} skipped (not of {})",
                    report.valid,
                    report.invalid.len(),
                    report.skipped,
                    validate::GROUPS.join(" or ")
                );
                if report.invalid.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
        },
    }
}

/// Every document of every input, in order.
fn read_documents(inputs: &[PathBuf]) -> Result<Vec<validate::Document>, String> {
    let mut documents = Vec::new();
    for input in inputs {
        for file in yaml_files(input)? {
            let (text, name) = if file == Path::new("-") {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| format!("reading standard input: {e}"))?;
                (text, "<stdin>".to_owned())
            } else {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("reading {}: {e}", file.display()))?;
                (text, file.display().to_string())
            };
            documents.extend(validate::documents(&text, &name)?);
        }
    }
    Ok(documents)
}

/// `input` itself, or the YAML files under a directory, sorted.
fn yaml_files(input: &Path) -> Result<Vec<PathBuf>, String> {
    if input == Path::new("-") || !input.is_dir() {
        return Ok(vec![input.to_owned()]);
    }
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(input).map_err(|e| format!("reading {}: {e}", input.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", input.display()))?
            .path();
        if path.is_dir() {
            files.extend(yaml_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
