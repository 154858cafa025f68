//! Putting a plan into the kernel: an [`Executor`] reads and writes a family's tables (and gives
//! loopback the IPv6 passthrough source), and [`apply`] / [`cleanup`] drive it with one atomic
//! `iptables-restore` per family.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::config::Ipv6Mode;
use crate::netns;
use crate::plan::{CapturePlan, IpFamily, cleanup_text};

/// Seconds `iptables-restore` waits for the xtables lock. The lock file is host-wide, so in the
/// CNI plugin kube-proxy or another pod's setup may hold it briefly; failing at once would fail
/// pod creation for no reason.
const XTABLES_LOCK_WAIT_SECONDS: u32 = 30;

/// Reads and atomically rewrites the tables of one IP family in a network namespace.
pub trait Executor {
    /// The current tables, as `iptables-save` prints them (possibly empty).
    fn save(&self, family: IpFamily) -> Result<String, ExecError>;
    /// Applies `text` with `iptables-restore --noflush`, all of it or none of it.
    fn restore(&self, family: IpFamily, text: &str) -> Result<(), ExecError>;
    /// Gives loopback the IPv6 inbound passthrough source (`::6/128`), which the proxy must be
    /// able to bind before IPv6 is redirected to it.
    fn add_ipv6_passthrough_source(&self) -> Result<(), ExecError>;
}

/// Why running iptables failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{action} in the network namespace: {source}")]
    Namespace {
        action: &'static str,
        source: std::io::Error,
    },
}

/// Makes the tables hold exactly `plan`, leaving rules that are not ours alone. Each family is
/// one restore transaction computed against that family's current table, so re-applying the same
/// plan leaves identical tables and a changed plan replaces the old one without a gap.
pub fn apply<E: Executor + ?Sized>(executor: &E, plan: &CapturePlan) -> Result<(), ExecError> {
    if plan.captures_ipv6() {
        executor.add_ipv6_passthrough_source()?;
    }
    for family_plan in plan.families() {
        let family = family_plan.family();
        let current = executor.save(family)?;
        let text = family_plan.restore_text(&current);
        if text.is_empty() {
            continue;
        }
        tracing::debug!(?family, %text, "restoring capture rules");
        executor.restore(family, &text)?;
        tracing::info!(?family, "capture rules applied");
    }
    Ok(())
}

/// Removes our chains and the jumps into them from each family's `nat` table, and nothing else.
/// A table without any of ours is not written to at all.
pub fn cleanup<E: Executor + ?Sized>(executor: &E, families: &[IpFamily]) -> Result<(), ExecError> {
    for &family in families {
        let current = executor.save(family)?;
        let Some(text) = cleanup_text(&current) else {
            tracing::info!(?family, "no capture rules to remove");
            continue;
        };
        tracing::debug!(?family, %text, "removing capture rules");
        executor.restore(family, &text)?;
        tracing::info!(?family, "capture rules removed");
    }
    Ok(())
}

/// Which iptables implementation to drive. Both program the same netfilter hooks, but rules
/// written through one are invisible to the other's save and restore, so every call must go
/// through the one the node (and the pod's earlier setup) already uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy-*`: the `x_tables` kernel interface.
    Legacy,
    /// `iptables-nft-*`: the `nf_tables` kernel interface.
    Nft,
    /// Plain `iptables-*`, whichever the image's alternatives point at.
    SystemDefault,
}

impl Backend {
    fn binary(self, family: IpFamily, tool: &str) -> String {
        let prefix = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        match self {
            Self::Legacy => format!("{prefix}-legacy-{tool}"),
            Self::Nft => format!("{prefix}-nft-{tool}"),
            Self::SystemDefault => format!("{prefix}-{tool}"),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
            Self::SystemDefault => "system default",
        })
    }
}

/// Runs the iptables binaries of one [`Backend`] in the current network namespace, or in the one
/// at a given path.
#[derive(Clone, Debug)]
pub struct SystemExecutor {
    backend: Backend,
    /// Namespace entered through `nsenter --net=` for every command; `None` is the current one.
    netns: Option<PathBuf>,
}

impl SystemExecutor {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            netns: None,
        }
    }

    /// Picks the backend as istio-iptables does: the one that already holds rules in this network
    /// namespace wins (the more rules, the more certainly it is the one in use); with none
    /// anywhere, the image's default `iptables`.
    pub fn detect() -> Self {
        Self::detect_with(None)
    }

    /// [`Self::detect`] for the network namespace at `netns` (a bind-mounted namespace file such
    /// as a CNI runtime's `CNI_NETNS`): the probes and every later command run through
    /// `nsenter --net=<netns>`, so a process on the host can program a pod's namespace.
    pub fn detect_in_netns(netns: &Path) -> Self {
        Self::detect_with(Some(netns.to_path_buf()))
    }

    fn detect_with(netns: Option<PathBuf>) -> Self {
        let legacy_rules = count_rules(Backend::Legacy, netns.as_deref());
        let nft_rules = count_rules(Backend::Nft, netns.as_deref());
        let backend = match (legacy_rules, nft_rules) {
            (Some(legacy), nft) if legacy > 0 && legacy >= nft.unwrap_or(0) => Backend::Legacy,
            (_, Some(nft)) if nft > 0 => Backend::Nft,
            _ => Backend::SystemDefault,
        };
        tracing::info!(
            %backend,
            ?legacy_rules,
            ?nft_rules,
            ?netns,
            "selected iptables backend"
        );
        Self { backend, netns }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How the namespace's IPv6 must be handled, from the addresses its interfaces hold.
    pub fn ipv6_mode(&self) -> Result<Ipv6Mode, ExecError> {
        netns::ipv6_mode(self.netns.as_deref()).map_err(|source| ExecError::Namespace {
            action: "reading the IPv6 addresses",
            source,
        })
    }
}

/// `binary`, run inside `netns` when one is given.
fn command_in(netns: Option<&Path>, binary: &str) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net={}", netns.display()))
                .arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// Rules (`-A` lines, all tables) the backend's IPv4 save shows; `None` if it cannot run, e.g.
/// because the image only ships the other backend.
fn count_rules(backend: Backend, netns: Option<&Path>) -> Option<usize> {
    let binary = backend.binary(IpFamily::V4, "save");
    let output = command_in(netns, &binary)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        tracing::debug!(
            %binary,
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "backend probe failed"
        );
        return None;
    }
    Some(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with("-A "))
            .count(),
    )
}

impl Executor for SystemExecutor {
    fn save(&self, family: IpFamily) -> Result<String, ExecError> {
        let binary = self.backend.binary(family, "save");
        let mut command = command_in(self.netns.as_deref(), &binary);
        command.stdin(Stdio::null());
        let output = command.output().map_err(|source| ExecError::Io {
            command: binary.clone(),
            source,
        })?;
        check_status(binary, output.status, &output.stderr)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn add_ipv6_passthrough_source(&self) -> Result<(), ExecError> {
        netns::add_inbound_passthrough_source(self.netns.as_deref()).map_err(|source| {
            ExecError::Namespace {
                action: "adding the IPv6 passthrough source to loopback",
                source,
            }
        })
    }

    fn restore(&self, family: IpFamily, text: &str) -> Result<(), ExecError> {
        let binary = self.backend.binary(family, "restore");
        let wait = format!("--wait={XTABLES_LOCK_WAIT_SECONDS}");
        let command = format!("{binary} --noflush {wait}");
        let io_error = |source| ExecError::Io {
            command: command.clone(),
            source,
        };
        let mut child = command_in(self.netns.as_deref(), &binary)
            .args(["--noflush", &wait])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error)?;
        // The closure drops stdin after writing, and the end of input is what commits. A restore
        // that rejects its input may exit before reading all of it; its status and stderr explain
        // that better than the broken pipe, so a write error only counts if restore succeeded.
        let written = child
            .stdin
            .take()
            .map_or(Ok(()), |mut stdin| stdin.write_all(text.as_bytes()));
        let output = child.wait_with_output().map_err(io_error)?;
        check_status(command.clone(), output.status, &output.stderr)?;
        written.map_err(io_error)
    }
}

fn check_status(command: String, status: ExitStatus, stderr: &[u8]) -> Result<(), ExecError> {
    if status.success() {
        return Ok(());
    }
    Err(ExecError::Failed {
        command,
        status,
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
    })
}
