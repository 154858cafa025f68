//! `trellis-init`: the init container that installs the capture rules in a pod's network namespace.
//!
//! Flags keep istio-iptables' long and short names so that existing habits and scripts carry
//! over; every flag can also be set through the `TRELLIS_*` environment variable shown in `--help`.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use trellis_init::validate::{PROBE_TARGET, validate};
use trellis_init::{
    CaptureConfig, CapturePlan, CidrSelection, Executor as _, IpFamily, Ipv6Mode, PortSelection,
    SystemExecutor, apply, cleanup, cleanup_text, parse_cidr_list, parse_port_list,
};

/// The `--ipv6` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Ipv6Choice {
    /// Capture IPv6 when the pod holds an IPv6 address beyond link-local, reject it otherwise.
    Auto,
    /// Capture IPv6 as IPv4 is captured.
    Capture,
    /// Reject all IPv6 but loopback.
    Reject,
}

/// Installs (or removes) the iptables rules that send a pod's TCP traffic through its sidecar.
#[derive(Parser, Debug)]
#[command(name = "trellis-init", version = trellis_config::version::current())]
struct Args {
    /// Uid of the proxy; its own connections are never captured.
    #[arg(short = 'u', long, env = "TRELLIS_PROXY_UID", default_value_t = trellis_config::wellknown::PROXY_UID)]
    proxy_uid: u32,
    /// Gid of the proxy; its own connections are never captured.
    #[arg(short = 'g', long, env = "TRELLIS_PROXY_GID", default_value_t = trellis_config::wellknown::PROXY_GID)]
    proxy_gid: u32,
    /// Port of the proxy's inbound capture listener.
    #[arg(short = 'z', long, env = "TRELLIS_INBOUND_CAPTURE_PORT", default_value_t = trellis_config::wellknown::INBOUND_CAPTURE_PORT)]
    inbound_capture_port: u16,
    /// Port of the proxy's outbound capture listener.
    #[arg(short = 'p', long, env = "TRELLIS_OUTBOUND_CAPTURE_PORT", default_value_t = trellis_config::wellknown::OUTBOUND_CAPTURE_PORT)]
    outbound_capture_port: u16,
    /// Inbound ports to capture: `*` for all, a comma-separated list, or "" for none.
    #[arg(
        short = 'b',
        long,
        env = "TRELLIS_INCLUDE_INBOUND_PORTS",
        default_value = "*"
    )]
    include_inbound_ports: String,
    /// Inbound ports never captured (the proxy's 15000, 15020, 15021, 15090 always are).
    #[arg(
        short = 'd',
        long,
        env = "TRELLIS_EXCLUDE_INBOUND_PORTS",
        default_value = ""
    )]
    exclude_inbound_ports: String,
    /// Outbound ports captured whatever the destination IP.
    #[arg(
        short = 'q',
        long,
        env = "TRELLIS_INCLUDE_OUTBOUND_PORTS",
        default_value = ""
    )]
    include_outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(
        short = 'o',
        long,
        env = "TRELLIS_EXCLUDE_OUTBOUND_PORTS",
        default_value = ""
    )]
    exclude_outbound_ports: String,
    /// Outbound destination CIDRs to capture: `*` for all, a comma-separated list, or "" for none.
    #[arg(
        short = 'i',
        long,
        env = "TRELLIS_INCLUDE_OUTBOUND_IP_RANGES",
        default_value = "*"
    )]
    include_outbound_ip_ranges: String,
    /// Outbound destination CIDRs never captured.
    #[arg(
        short = 'x',
        long,
        env = "TRELLIS_EXCLUDE_OUTBOUND_IP_RANGES",
        default_value = ""
    )]
    exclude_outbound_ip_ranges: String,
    /// IPv6 is never left uncaptured: `auto` captures it exactly as IPv4 when the pod's
    /// interfaces hold an IPv6 address beyond link-local and rejects it otherwise (a kernel
    /// without IPv6 gets IPv4 rules only); `capture` and `reject` force either.
    #[arg(long, env = "TRELLIS_IPV6", value_enum, default_value_t = Ipv6Choice::Auto)]
    ipv6: Ipv6Choice,
    /// Print the restore text instead of changing anything. With --cleanup, reads the current
    /// tables and prints what cleanup would restore.
    #[arg(long, env = "TRELLIS_DRY_RUN")]
    dry_run: bool,
    /// Remove the chains and jumps that apply adds, and nothing else.
    #[arg(long, env = "TRELLIS_CLEANUP")]
    cleanup: bool,
    /// Check that capture is in place (CNI mode's validation init container) instead of
    /// installing it; needs no capability.
    #[arg(long, env = "TRELLIS_VALIDATE", conflicts_with_all = ["cleanup", "dry_run"])]
    validate: bool,
}

impl Args {
    fn capture_config(&self, ipv6: Ipv6Mode) -> Result<CaptureConfig, trellis_init::ConfigError> {
        Ok(CaptureConfig {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_capture_port: self.inbound_capture_port,
            outbound_capture_port: self.outbound_capture_port,
            include_inbound_ports: PortSelection::parse(
                "include-inbound-ports",
                &self.include_inbound_ports,
            )?,
            exclude_inbound_ports: parse_port_list(
                "exclude-inbound-ports",
                &self.exclude_inbound_ports,
            )?,
            include_outbound_ports: parse_port_list(
                "include-outbound-ports",
                &self.include_outbound_ports,
            )?,
            exclude_outbound_ports: parse_port_list(
                "exclude-outbound-ports",
                &self.exclude_outbound_ports,
            )?,
            include_outbound_ip_ranges: CidrSelection::parse(
                "include-outbound-ip-ranges",
                &self.include_outbound_ip_ranges,
            )?,
            exclude_outbound_ip_ranges: parse_cidr_list(
                "exclude-outbound-ip-ranges",
                &self.exclude_outbound_ip_ranges,
            )?,
            ipv6,
            ..CaptureConfig::default()
        })
    }
}

/// What to do with IPv6 in the namespace `executor` serves.
fn ipv6_mode(choice: Ipv6Choice, executor: &SystemExecutor) -> anyhow::Result<Ipv6Mode> {
    Ok(match choice {
        Ipv6Choice::Auto => executor.ipv6_mode()?,
        Ipv6Choice::Capture => Ipv6Mode::Capture,
        Ipv6Choice::Reject => Ipv6Mode::Reject,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.validate {
        validate(
            args.outbound_capture_port,
            PROBE_TARGET,
            std::time::Duration::from_secs(3),
        )?;
        tracing::info!("traffic capture is in place");
        return Ok(());
    }
    let executor = SystemExecutor::detect();
    if args.cleanup {
        // Both families were programmed, unless the kernel has no IPv6 to program.
        let families: &[IpFamily] = match executor.ipv6_mode()? {
            Ipv6Mode::Absent => &[IpFamily::V4],
            Ipv6Mode::Capture | Ipv6Mode::Reject => &[IpFamily::V4, IpFamily::V6],
        };
        if args.dry_run {
            for &family in families {
                let current = executor.save(family)?;
                println!("# {}", family.restore_command());
                match cleanup_text(&current) {
                    Some(text) => print!("{text}"),
                    None => println!("# nothing of ours to remove"),
                }
            }
            return Ok(());
        }
        return cleanup(&executor, families).context("removing capture rules");
    }

    let config = args.capture_config(ipv6_mode(args.ipv6, &executor)?)?;
    tracing::info!(?config, "capture configuration");
    let plan = CapturePlan::new(&config)?;
    if args.dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    apply(&executor, &plan).context("applying capture rules")
}
