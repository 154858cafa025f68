//! Command line of the `trellis-proxy` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use trellis_config::wellknown;

#[derive(Parser, Debug)]
#[command(name = "trellis-proxy", version = trellis_config::version::current(), about = "Trellis data plane proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run as the sidecar beside a workload (traffic captured by iptables).
    Sidecar(SidecarArgs),
    /// Wait until the local proxy is ready (the injected postStart hook).
    WaitReady {
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
        /// Readiness port of the proxy to wait for.
        #[arg(long, default_value_t = wellknown::READINESS_PORT)]
        port: u16,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    /// Static config file (JSON `ProxyConfig`); no control plane, and no identity unless
    /// `--cert-chain` and `--key` give one. Takes precedence over `--control-plane`.
    #[arg(
        long,
        value_name = "FILE.json",
        required_unless_present = "control_plane"
    )]
    pub config: Option<PathBuf>,

    /// Static mode: PEM workload certificate chain (leaf first) for mutual TLS; the identity is
    /// its SPIFFE URI SAN and peers are verified against the config's `trustBundle`.
    #[arg(long, value_name = "FILE.pem", requires_all = ["config", "key"])]
    pub cert_chain: Option<PathBuf>,

    /// Static mode: PEM private key of `--cert-chain`.
    #[arg(long, value_name = "FILE.pem", requires = "cert_chain")]
    pub key: Option<PathBuf>,

    /// Control plane URL (discovery + CA).
    #[arg(long, env = "TRELLIS_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<http::Uri>,

    /// TLS server name the control plane's certificate must carry.
    #[arg(long, default_value = "trellis-operator.trellis-system.svc")]
    pub control_plane_name: String,

    /// PEM file of the mesh trust bundle, used to verify the control plane.
    #[arg(long, default_value = "/var/run/secrets/trellis/root/root-cert.pem")]
    pub root_cert: PathBuf,

    /// Projected ServiceAccount token file (audience `trellis`); re-read on every request.
    #[arg(long, default_value = "/var/run/secrets/trellis/token/token")]
    pub token: PathBuf,

    #[arg(long, env = "POD_NAME", default_value = "unknown")]
    pub pod_name: String,

    #[arg(long, env = "POD_NAMESPACE", default_value = "unknown")]
    pub pod_namespace: String,

    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,

    /// Workload name reported in telemetry (a Deployment's name); defaults to the pod name.
    #[arg(long, env = "WORKLOAD_NAME")]
    pub workload_name: Option<String>,

    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The pod's labels as a JSON object (`{"app":"web","version":"v1"}`), written by the
    /// injector from the pod it injects; VirtualService `sourceLabels` matches read them.
    #[arg(long, env = "TRELLIS_WORKLOAD_LABELS", default_value = "{}",
          value_parser = parse_labels)]
    pub workload_labels: std::collections::BTreeMap<String, String>,

    /// Worker threads.
    #[arg(long, env = "TRELLIS_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,

    /// Log filter (`info`, `debug`, `trellis_proxy=trace,info`); changeable at runtime through
    /// the admin endpoint `/logging?level=`.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Renew the workload certificate once this share of its lifetime has passed.
    #[arg(long, env = "TRELLIS_ROTATION_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub rotation_percent: u8,

    /// How long open connections may run after a drain starts before the process exits.
    #[arg(long, env = "TRELLIS_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,

    /// Log every HTTP request as one JSON line on stdout (`--access-log false` turns it off).
    #[arg(long, env = "TRELLIS_ACCESS_LOG", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub access_log: bool,

    /// Upstream connect timeout.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_seconds: u64,

    #[arg(long, default_value_t = wellknown::OUTBOUND_CAPTURE_PORT)]
    pub outbound_port: u16,

    #[arg(long, default_value_t = wellknown::INBOUND_CAPTURE_PORT)]
    pub inbound_port: u16,

    #[arg(long, default_value_t = wellknown::ADMIN_PORT)]
    pub admin_port: u16,

    #[arg(long, default_value_t = wellknown::METRICS_PORT)]
    pub metrics_port: u16,

    #[arg(long, default_value_t = wellknown::READINESS_PORT)]
    pub readiness_port: u16,
}

fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("workload labels must be a JSON object of strings: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_needs_a_config_source() {
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["trellis-proxy", "sidecar"]).is_err());
        let cli = Cli::try_parse_from(["trellis-proxy", "sidecar", "--config", "c.json"]).unwrap();
        let Command::Sidecar(args) = cli.command else {
            panic!("parsed as another subcommand")
        };
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.rotation_percent, 50);
        assert!(args.access_log, "the access log is on by default");
        let quiet = [
            "trellis-proxy",
            "sidecar",
            "--config",
            "c.json",
            "--access-log",
            "false",
        ];
        let Command::Sidecar(quiet) = Cli::try_parse_from(quiet).unwrap().command else {
            panic!("parsed as another subcommand")
        };
        assert!(!quiet.access_log);
        assert!(args.workload_labels.is_empty());
        let labelled = [
            "trellis-proxy",
            "sidecar",
            "--config",
            "c.json",
            "--workload-labels",
            r#"{"app":"web","version":"v2"}"#,
        ];
        let Command::Sidecar(labelled) = Cli::try_parse_from(labelled).unwrap().command else {
            panic!("parsed as another subcommand")
        };
        assert_eq!(labelled.workload_labels["version"], "v2");
        let bad = [
            "trellis-proxy",
            "sidecar",
            "--config",
            "c.json",
            "--workload-labels",
            "app=web",
        ];
        let error = Cli::try_parse_from(bad).unwrap_err().to_string();
        assert!(error.contains("JSON object"), "{error}");
        // A static certificate needs its key, and static mode.
        let static_tls = ["trellis-proxy", "sidecar", "--config", "c.json"];
        let with = |extra: &[&'static str]| {
            Cli::try_parse_from(static_tls.iter().chain(extra).copied()).is_ok()
        };
        assert!(with(&["--cert-chain", "a.pem", "--key", "a.key"]));
        assert!(!with(&["--cert-chain", "a.pem"]));
        assert!(!with(&["--key", "a.key"]));
        assert!(
            Cli::try_parse_from([
                "trellis-proxy",
                "sidecar",
                "--control-plane",
                "https://cp:15012",
                "--cert-chain",
                "a.pem",
                "--key",
                "a.key"
            ])
            .is_err()
        );
    }
}
