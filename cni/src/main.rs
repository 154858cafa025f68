//! The `trellis-cni` binary: without arguments it is the CNI plugin a runtime executes; with a
//! subcommand (`install`, `uninstall`) it is the node installer run by the operator's DaemonSet.

use std::fs::OpenOptions;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt as _;
use trellis_cni::install::{InstallOptions, Installer, api_server_url};
use trellis_cni::plugin::{self, SystemHost};
use trellis_cni::protocol::{Environment, LogSettings};

/// Node installer for the Trellis CNI plugin. Run without arguments, the binary is the plugin.
#[derive(Parser, Debug)]
#[command(name = "trellis-cni", version = trellis_config::version::current())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the plugin, keep its entry in the primary config until SIGTERM, then uninstall.
    Install(InstallArgs),
    /// Remove the plugin's entry, binary and kubeconfig once.
    Uninstall(InstallArgs),
}

#[derive(Args, Debug)]
struct InstallArgs {
    /// The host's CNI bin dir, as mounted here.
    #[arg(long, env = "TRELLIS_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted here.
    #[arg(
        long,
        env = "TRELLIS_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: PathBuf,
    /// The CNI conf dir as the host sees it (the plugin runs on the host).
    #[arg(
        long,
        env = "TRELLIS_HOST_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    host_cni_conf_dir: PathBuf,
    /// The plugin binary to install; defaults to this executable.
    #[arg(long, env = "TRELLIS_CNI_PLUGIN_BINARY")]
    plugin_binary: Option<PathBuf>,
    /// File name of the kubeconfig written into the conf dir for the plugin.
    #[arg(
        long,
        env = "TRELLIS_CNI_KUBECONFIG_NAME",
        default_value = "trellis-cni.kubeconfig"
    )]
    kubeconfig_name: String,
    /// Where this pod's ServiceAccount token and CA are mounted.
    #[arg(
        long,
        env = "TRELLIS_CNI_SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    service_account_dir: PathBuf,
    /// API server host for the kubeconfig (set in every pod by Kubernetes).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    kubernetes_service_host: Option<String>,
    /// API server port for the kubeconfig (set in every pod by Kubernetes).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value = "443")]
    kubernetes_service_port: String,
    /// Host path the plugin appends its log to (besides the runtime's stderr capture).
    #[arg(long, env = "TRELLIS_CNI_PLUGIN_LOG_FILE")]
    plugin_log_file: Option<PathBuf>,
    /// The plugin's log filter.
    #[arg(long, env = "TRELLIS_CNI_PLUGIN_LOG_LEVEL", default_value = "info")]
    plugin_log_level: String,
    /// Namespaces whose pods the plugin never captures, comma-separated.
    #[arg(
        long,
        env = "TRELLIS_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,trellis-system"
    )]
    exclude_namespaces: Vec<String>,
    /// Seconds between checks that the entry is still in the primary config.
    #[arg(long, env = "TRELLIS_CNI_POLL_SECONDS", default_value_t = 1)]
    poll_seconds: u64,
}

impl InstallArgs {
    fn options(&self) -> anyhow::Result<InstallOptions> {
        let plugin_binary = match &self.plugin_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe().context("locating this executable")?,
        };
        let api_server = match &self.kubernetes_service_host {
            Some(host) => api_server_url(host, &self.kubernetes_service_port),
            // Uninstalling needs no API server; installing checks it below.
            None => String::new(),
        };
        Ok(InstallOptions {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            host_conf_dir: self.host_cni_conf_dir.clone(),
            plugin_binary,
            kubeconfig_name: self.kubeconfig_name.clone(),
            service_account_dir: self.service_account_dir.clone(),
            api_server,
            plugin_log_file: self.plugin_log_file.clone(),
            plugin_log_level: self.plugin_log_level.clone(),
            exclude_namespaces: self.exclude_namespaces.clone(),
        })
    }
}

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        run_installer(Cli::parse())
    } else {
        run_plugin()
    }
}

fn run_installer(cli: Cli) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let result = match &cli.command {
        Command::Install(args) => args.options().and_then(|options| {
            anyhow::ensure!(
                args.kubernetes_service_host.is_some(),
                "KUBERNETES_SERVICE_HOST is not set: cannot write the plugin's kubeconfig"
            );
            Installer::new(options).run(Duration::from_secs(args.poll_seconds.max(1)))
        }),
        Command::Uninstall(args) => args
            .options()
            .and_then(|options| Installer::new(options).uninstall()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin);
    init_plugin_logging(&LogSettings::from_stdin(&stdin));
    let environment = Environment::from_lookup(|name| std::env::var(name).ok());
    tracing::debug!(?environment, "invoked");
    let outcome = match read {
        Ok(_) => plugin::handle(&environment, &stdin, &SystemHost),
        Err(error) => {
            // Answered as a config that cannot be decoded: nothing usable arrived.
            tracing::error!(%error, "reading stdin");
            plugin::handle(&environment, b"", &SystemHost)
        }
    };
    let (answer, status) = match outcome {
        Ok(Some(answer)) => (Some(answer), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(rejection) => {
            tracing::error!(
                code = rejection.error.code,
                msg = %rejection.error.msg,
                details = %rejection.error.details,
                command = ?environment.command,
                "request failed"
            );
            (Some(rejection.to_json()), ExitCode::FAILURE)
        }
    };
    if let Some(answer) = answer {
        let mut stdout = std::io::stdout().lock();
        let written = serde_json::to_writer(&mut stdout, &answer)
            .map_err(std::io::Error::from)
            .and_then(|()| stdout.write_all(b"\n"))
            .and_then(|()| stdout.flush());
        if let Err(error) = written {
            tracing::error!(%error, "writing the answer");
            return ExitCode::FAILURE;
        }
    }
    status
}

/// Logs to stderr, and also to the config's `logFile` when it can be opened.
fn init_plugin_logging(settings: &LogSettings) {
    let filter = settings
        .log_level
        .as_deref()
        .and_then(|level| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(filter);
    let file = settings.log_file.as_ref().map(|path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| (path, error))
    });
    match file {
        Some(Ok(file)) => builder
            .with_writer(std::io::stderr.and(Arc::new(file)))
            .init(),
        Some(Err((path, error))) => {
            builder.with_writer(std::io::stderr).init();
            tracing::warn!(path = %path.display(), %error, "cannot open logFile; logging to stderr only");
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}
