//! Runs `trellis-cni install` as the DaemonSet will, against temporary directories standing in
//! for the host's mounted CNI dirs and the pod's ServiceAccount mount: it installs, keeps its
//! entry through a rewrite by the "primary CNI", and uninstalls on SIGTERM.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TRELLIS_CNI: &str = env!("CARGO_BIN_EXE_trellis-cni");

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("trellis-cni-install-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        for sub in ["bin", "net.d", "serviceaccount"] {
            std::fs::create_dir_all(path.join(sub)).unwrap();
        }
        std::fs::write(path.join("serviceaccount/token"), "sa-token\n").unwrap();
        std::fs::write(
            path.join("serviceaccount/ca.crt"),
            "-----BEGIN CERTIFICATE-----\n",
        )
        .unwrap();
        Self(path)
    }

    fn installer(&self, subcommand: &str) -> Command {
        let mut command = Command::new(TRELLIS_CNI);
        command
            .arg(subcommand)
            .arg(format!("--cni-bin-dir={}", self.0.join("bin").display()))
            .arg(format!("--cni-conf-dir={}", self.0.join("net.d").display()))
            .arg(format!(
                "--service-account-dir={}",
                self.0.join("serviceaccount").display()
            ))
            .arg("--plugin-log-file=/var/log/trellis-cni.log")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The installer process, killed on drop if a failing test left it running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn primary_conflist() -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": "podnet",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn read(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_our_entry_last(conflist: &Path) -> bool {
    read(conflist).is_some_and(|config| {
        let plugins = config["plugins"].as_array().cloned().unwrap_or_default();
        plugins
            .iter()
            .filter(|p| p["type"] == "trellis-cni")
            .count()
            == 1
            && plugins.last().is_some_and(|p| p["type"] == "trellis-cni")
    })
}

#[test]
fn install_keeps_the_entry_and_sigterm_uninstalls() {
    let dir = TempDir::new("run");
    let conflist = dir.0.join("net.d/10-podnet.conflist");
    std::fs::write(&conflist, primary_conflist().to_string()).unwrap();
    let installer = Running(dir.installer("install").spawn().unwrap());

    wait_for("the entry", || has_our_entry_last(&conflist));
    let installed = read(&conflist).unwrap();
    assert_eq!(
        installed["plugins"].as_array().unwrap()[..2],
        primary_conflist()["plugins"].as_array().unwrap()[..],
        "the primary's plugins are untouched"
    );
    assert_eq!(
        installed["plugins"][2],
        json!({
            "type": "trellis-cni",
            "kubeconfig": "/etc/cni/net.d/trellis-cni.kubeconfig",
            "logFile": "/var/log/trellis-cni.log",
            "logLevel": "info",
            "excludeNamespaces": ["kube-system", "trellis-system"],
        })
    );
    let binary = dir.0.join("bin/trellis-cni");
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(TRELLIS_CNI).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let kubeconfig_path = dir.0.join("net.d/trellis-cni.kubeconfig");
    assert_eq!(
        std::fs::metadata(&kubeconfig_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let kubeconfig = read(&kubeconfig_path).expect("kubeconfig is JSON");
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["server"],
        "https://10.96.0.1:443"
    );
    assert_eq!(kubeconfig["users"][0]["user"]["token"], "sa-token");

    // The primary CNI rewrites its config; the installer puts its entry back.
    std::fs::write(&conflist, primary_conflist().to_string()).unwrap();
    wait_for("the entry to come back", || has_our_entry_last(&conflist));
    // The token rotates; the kubeconfig follows.
    std::fs::write(dir.0.join("serviceaccount/token"), "rotated").unwrap();
    wait_for("the rotated token", || {
        read(&kubeconfig_path).is_some_and(|k| k["users"][0]["user"]["token"] == "rotated")
    });

    let mut installer = installer;
    let pid = installer.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = installer.0.wait().unwrap();
    let mut stderr = String::new();
    installer
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "installer exit after SIGTERM: {stderr}");
    assert!(stderr.contains("uninstalled"), "{stderr}");
    assert_eq!(read(&conflist).unwrap(), primary_conflist());
    assert!(!binary.exists() && !kubeconfig_path.exists());
}

#[test]
fn uninstall_removes_everything_once_and_is_idempotent() {
    let dir = TempDir::new("uninstall");
    let conf = dir.0.join("net.d/10-bridge.conf");
    let single = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge"});
    std::fs::write(&conf, single.to_string()).unwrap();
    let installer = Running(dir.installer("install").spawn().unwrap());
    let conflist = dir.0.join("net.d/10-bridge.conflist");
    wait_for("the converted conflist", || has_our_entry_last(&conflist));
    assert!(!conf.exists(), "the .conf was replaced by the conflist");
    drop(installer);

    for round in ["first", "second"] {
        let output = dir.installer("uninstall").output().unwrap();
        assert!(
            output.status.success(),
            "{round} uninstall: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            read(&conflist).unwrap(),
            json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [single]})
        );
        assert!(!dir.0.join("bin/trellis-cni").exists());
        assert!(!dir.0.join("net.d/trellis-cni.kubeconfig").exists());
    }
}
