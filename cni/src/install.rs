//! Installer mode: puts the plugin binary, its kubeconfig and its conflist entry on the node,
//! keeps the entry in place while the primary CNI rewrites its config, and takes it all away
//! again. Every file is replaced by writing a temporary file and renaming it over the target, so
//! the runtime never reads a half-written config or executes a half-copied binary.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};

/// The `type` of our conflist entry, which is also the binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "trellis-cni";
/// Suffix of temporary files: never one the runtime loads configs from.
const TEMP_SUFFIX: &str = ".trellis-tmp";
/// Extensions the runtime (libcni) loads network configs from.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Where things go and what our entry says.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The host's CNI bin dir, as mounted into the installer.
    pub bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted into the installer.
    pub conf_dir: PathBuf,
    /// The same conf dir as the host sees it: the plugin, run by the runtime on the host, reads
    /// its kubeconfig through this path.
    pub host_conf_dir: PathBuf,
    /// The plugin binary to copy.
    pub plugin_binary: PathBuf,
    /// File name of the kubeconfig written into the conf dir.
    pub kubeconfig_name: String,
    /// Where the installer pod's ServiceAccount token and CA are mounted.
    pub service_account_dir: PathBuf,
    /// API server URL the kubeconfig points at.
    pub api_server: String,
    /// `logFile` of our entry, a host path.
    pub plugin_log_file: Option<PathBuf>,
    /// `logLevel` of our entry.
    pub plugin_log_level: String,
    /// `excludeNamespaces` of our entry.
    pub exclude_namespaces: Vec<String>,
}

impl InstallOptions {
    fn kubeconfig_path(&self) -> PathBuf {
        self.conf_dir.join(&self.kubeconfig_name)
    }

    fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// Our conflist entry.
    pub fn plugin_entry(&self) -> Value {
        let mut entry = json!({
            "type": PLUGIN_TYPE,
            "kubeconfig": self.host_conf_dir.join(&self.kubeconfig_name),
            "logLevel": self.plugin_log_level,
            "excludeNamespaces": self.exclude_namespaces,
        });
        if let Some(log_file) = &self.plugin_log_file {
            entry["logFile"] = json!(log_file);
        }
        entry
    }
}

/// The API server URL from the `KUBERNETES_SERVICE_HOST`/`_PORT` values every pod gets.
pub fn api_server_url(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// A kubeconfig authenticating with `token` against `server`, trusting `ca_pem`. JSON, which
/// every kubeconfig reader accepts as YAML.
pub fn kubeconfig(server: &str, ca_pem: &[u8], token: &str) -> String {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server,
            "certificate-authority-data": ca_data,
        }}],
        "users": [{"name": "trellis-cni", "user": {"token": token.trim()}}],
        "contexts": [{"name": "trellis-cni", "context": {"cluster": "local", "user": "trellis-cni"}}],
        "current-context": "trellis-cni",
    });
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    text.push('\n');
    text
}

/// Whether a conflist plugin entry is ours.
fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `conflist` with `entry` as its last plugin and no other entry of ours; `None` if it already
/// is exactly that. The other plugins keep their content and order.
pub fn with_entry(conflist: &Value, entry: &Value) -> Option<Value> {
    let plugins = conflist.get("plugins")?.as_array()?;
    let ours = plugins.iter().filter(|plugin| is_ours(plugin)).count();
    if ours == 1 && plugins.last() == Some(entry) {
        return None;
    }
    let mut updated = conflist.clone();
    let list = updated["plugins"].as_array_mut()?;
    list.retain(|plugin| !is_ours(plugin));
    list.push(entry.clone());
    Some(updated)
}

/// `config` without our entries; `None` if it has none.
pub fn without_entry(config: &Value) -> Option<Value> {
    let plugins = config.get("plugins")?.as_array()?;
    if !plugins.iter().any(is_ours) {
        return None;
    }
    let mut updated = config.clone();
    updated["plugins"].as_array_mut()?.retain(|p| !is_ours(p));
    Some(updated)
}

/// A single-plugin `.conf` as the equivalent conflist, built the way libcni's `ConfListFromConf`
/// does: the list takes the plugin's name and version, the plugin stays whole.
pub fn conf_to_conflist(conf: &Value) -> Value {
    let mut list = json!({ "plugins": [conf] });
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.get(key) {
            list[key] = value.clone();
        }
    }
    list
}

/// Network config files in `dir` in the order the runtime considers them: by file name.
pub fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What [`insert_entry`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Insertion {
    /// No network config yet: the primary CNI has not installed itself.
    NoPrimary,
    /// The primary already ends with our entry.
    Unchanged(PathBuf),
    /// The entry was (re)inserted into this file.
    Written(PathBuf),
}

/// Makes the primary config (the first by name, which is the one the runtime uses) end with
/// `entry`, converting a single-plugin config into a conflist; removes our entry from every other
/// config, so a primary that changed names leaves nothing of ours behind.
pub fn insert_entry(conf_dir: &Path, entry: &Value) -> anyhow::Result<Insertion> {
    let files =
        config_files(conf_dir).with_context(|| format!("listing {}", conf_dir.display()))?;
    let Some((primary, others)) = files.split_first() else {
        return Ok(Insertion::NoPrimary);
    };
    for other in others {
        strip_file(other)?;
    }
    let config = read_json(primary)?;
    if config.get("plugins").is_some() {
        return Ok(match with_entry(&config, entry) {
            Some(updated) => {
                write_json(primary, &updated)?;
                Insertion::Written(primary.clone())
            }
            None => Insertion::Unchanged(primary.clone()),
        });
    }
    let conflist_path = primary.with_extension("conflist");
    let conflist = with_entry(&conf_to_conflist(&config), entry)
        .expect("a converted config has no entry of ours yet");
    // The new list is in place before the single config goes, so the runtime always has one.
    write_json(&conflist_path, &conflist)?;
    fs::remove_file(primary).with_context(|| format!("removing {}", primary.display()))?;
    Ok(Insertion::Written(conflist_path))
}

/// Removes our entry from every config in `conf_dir`; returns the files changed.
pub fn remove_entry(conf_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for file in config_files(conf_dir).with_context(|| format!("listing {}", conf_dir.display()))? {
        if strip_file(&file)? {
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Removes our entry from one config file; configs that are not JSON are not ours to judge.
fn strip_file(path: &Path) -> anyhow::Result<bool> {
    let Ok(config) = read_json(path) else {
        return Ok(false);
    };
    match without_entry(&config) {
        Some(updated) => {
            write_json(path, &updated)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("a JSON value serialises");
    text.push(b'\n');
    write_atomic(path, &text, 0o644).with_context(|| format!("writing {}", path.display()))
}

/// Replaces `path` with `contents` (mode `mode`) by writing a temporary file beside it, syncing
/// it, and renaming it over `path`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let temp = path.with_file_name(format!(".{}{TEMP_SUFFIX}", file_name.to_string_lossy()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        // `mode` at creation is filtered by the umask, and an old temp file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes `path`; already absent is success.
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Puts files in place and keeps our entry in the primary config.
#[derive(Debug)]
pub struct Installer {
    options: InstallOptions,
}

impl Installer {
    pub fn new(options: InstallOptions) -> Self {
        Self { options }
    }

    /// The kubeconfig from the current ServiceAccount token and CA.
    fn current_kubeconfig(&self) -> anyhow::Result<String> {
        let dir = &self.options.service_account_dir;
        let token = fs::read_to_string(dir.join("token"))
            .with_context(|| format!("reading the ServiceAccount token in {}", dir.display()))?;
        let ca = fs::read(dir.join("ca.crt"))
            .with_context(|| format!("reading the cluster CA in {}", dir.display()))?;
        Ok(kubeconfig(&self.options.api_server, &ca, &token))
    }

    /// Copies the binary, then writes the kubeconfig, then inserts the entry: in this order, the
    /// runtime never finds an entry whose binary or kubeconfig is missing.
    pub fn install(&self) -> anyhow::Result<Insertion> {
        let source = &self.options.plugin_binary;
        let binary = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let target = self.options.binary_path();
        write_atomic(&target, &binary, 0o755)
            .with_context(|| format!("installing {}", target.display()))?;
        tracing::info!(binary = %target.display(), "plugin binary installed");
        self.reconcile()
    }

    /// One round of keeping things in place: the kubeconfig follows token rotation, and the
    /// entry is re-inserted if the primary CNI rewrote its config. Writes only what changed.
    pub fn reconcile(&self) -> anyhow::Result<Insertion> {
        let wanted = self.current_kubeconfig()?;
        let path = self.options.kubeconfig_path();
        if fs::read_to_string(&path).ok().as_deref() != Some(wanted.as_str()) {
            write_atomic(&path, wanted.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(kubeconfig = %path.display(), "kubeconfig written");
        }
        let insertion = insert_entry(&self.options.conf_dir, &self.options.plugin_entry())?;
        match &insertion {
            Insertion::Written(file) => {
                tracing::info!(config = %file.display(), "plugin entry inserted");
            }
            Insertion::NoPrimary => tracing::info!(
                conf_dir = %self.options.conf_dir.display(),
                "no network config yet; waiting for the primary CNI"
            ),
            Insertion::Unchanged(_) => {}
        }
        Ok(insertion)
    }

    /// Takes the entry out first, so no pod is set up with a binary that is about to vanish.
    pub fn uninstall(&self) -> anyhow::Result<()> {
        for file in remove_entry(&self.options.conf_dir)? {
            tracing::info!(config = %file.display(), "plugin entry removed");
        }
        remove_if_present(&self.options.binary_path())?;
        remove_if_present(&self.options.kubeconfig_path())?;
        tracing::info!("uninstalled");
        Ok(())
    }

    /// Installs, then reconciles every `poll` until SIGTERM or SIGINT, then uninstalls.
    pub fn run(&self, poll: Duration) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
            let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
            self.install()?;
            let mut ticks = tokio::time::interval(poll);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                    _ = ticks.tick() => {
                        // A failed round (a config mid-write by the primary CNI, say) is retried
                        // on the next tick rather than ending the watch.
                        if let Err(error) = self.reconcile() {
                            tracing::warn!("{error:#}");
                        }
                    }
                }
            }
            tracing::info!("terminating");
            self.uninstall()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("trellis-cni-install-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry() -> Value {
        json!({"type": "trellis-cni", "kubeconfig": "/etc/cni/net.d/trellis-cni.kubeconfig"})
    }

    fn flannel_conflist() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "name": "cbr0",
            "plugins": [
                {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn write(path: &Path, value: &Value) {
        fs::write(path, serde_json::to_vec(value).unwrap()).unwrap();
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entry_goes_last_once_and_primary_plugins_stay() {
        let original = flannel_conflist();
        let updated = with_entry(&original, &entry()).expect("entry missing");
        let plugins = updated["plugins"].as_array().unwrap();
        assert_eq!(plugins[..2], original["plugins"].as_array().unwrap()[..]);
        assert_eq!(plugins[2], entry());
        assert_eq!(updated["name"], "cbr0");
        assert_eq!(with_entry(&updated, &entry()), None, "idempotent");

        let mut moved = updated.clone();
        moved["plugins"].as_array_mut().unwrap().swap(1, 2);
        let fixed = with_entry(&moved, &entry()).expect("ours not last");
        assert_eq!(
            fixed, updated,
            "ours moved back to the end, the others keep their order"
        );

        let mut stale = updated.clone();
        stale["plugins"][2]["kubeconfig"] = json!("/old");
        stale["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": "trellis-cni"}));
        assert_eq!(with_entry(&stale, &entry()), Some(updated.clone()));

        assert_eq!(without_entry(&updated), Some(original.clone()));
        assert_eq!(without_entry(&original), None);
    }

    #[test]
    fn conf_converts_like_libcni() {
        let conf =
            json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0"});
        assert_eq!(
            conf_to_conflist(&conf),
            json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [conf]})
        );
    }

    #[test]
    fn insert_and_remove_in_a_conf_dir() {
        let dir = TempDir::new("conflist");
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::NoPrimary
        );

        let primary = dir.0.join("10-flannel.conflist");
        let later = dir.0.join("20-other.conflist");
        write(&primary, &flannel_conflist());
        write(&later, &flannel_conflist());
        fs::write(dir.0.join("trellis-cni.kubeconfig"), "{}").unwrap();

        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Written(primary.clone())
        );
        let installed = read(&primary);
        assert_eq!(
            without_entry(&installed),
            Some(flannel_conflist()),
            "only our entry was added"
        );
        assert_eq!(
            read(&later),
            flannel_conflist(),
            "non-primary configs untouched"
        );
        let modified = fs::metadata(&primary).unwrap().modified().unwrap();
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Unchanged(primary.clone())
        );
        assert_eq!(
            fs::metadata(&primary).unwrap().modified().unwrap(),
            modified
        );
        assert_eq!(
            read(&primary),
            installed,
            "inserting twice never duplicates"
        );

        // The primary CNI rewrites its config without us; the next round notices.
        write(&primary, &flannel_conflist());
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Written(primary.clone())
        );
        assert_eq!(read(&primary), installed);

        // A new first config becomes the primary; the old one loses our entry.
        let newer = dir.0.join("05-cilium.conflist");
        write(&newer, &flannel_conflist());
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Written(newer.clone())
        );
        assert_eq!(read(&primary), flannel_conflist());
        assert_eq!(read(&newer), installed);

        assert_eq!(remove_entry(&dir.0).unwrap(), std::slice::from_ref(&newer));
        assert_eq!(read(&newer), flannel_conflist());
        assert_eq!(remove_entry(&dir.0).unwrap(), Vec::<PathBuf>::new());
        assert!(
            !names(&dir.0).iter().any(|n| n.ends_with(TEMP_SUFFIX)),
            "temporary files left: {:?}",
            names(&dir.0)
        );
    }

    #[test]
    fn single_conf_becomes_a_conflist() {
        let dir = TempDir::new("conf");
        let conf = json!({"cniVersion": "0.4.0", "name": "podnet", "type": "bridge", "bridge": "cni0",
                          "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}});
        write(&dir.0.join("10-bridge.conf"), &conf);
        let conflist = dir.0.join("10-bridge.conflist");
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Written(conflist.clone())
        );
        assert_eq!(names(&dir.0), ["10-bridge.conflist"]);
        assert_eq!(
            read(&conflist),
            json!({"cniVersion": "0.4.0", "name": "podnet", "plugins": [conf, entry()]})
        );
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Unchanged(conflist.clone())
        );

        // The primary CNI writes its .conf again: it sorts first, so it is converted again.
        write(&dir.0.join("10-bridge.conf"), &conf);
        assert_eq!(
            insert_entry(&dir.0, &entry()).unwrap(),
            Insertion::Written(conflist.clone())
        );
        assert_eq!(names(&dir.0), ["10-bridge.conflist"]);
    }

    #[test]
    fn unparsable_primary_is_left_alone() {
        let dir = TempDir::new("garbage");
        let primary = dir.0.join("10-half-written.conflist");
        fs::write(&primary, "{\"plugins\": [").unwrap();
        assert!(insert_entry(&dir.0, &entry()).is_err());
        assert_eq!(fs::read_to_string(&primary).unwrap(), "{\"plugins\": [");
        assert_eq!(remove_entry(&dir.0).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn atomic_write_sets_the_mode() {
        let dir = TempDir::new("mode");
        let path = dir.0.join("kubeconfig");
        write_atomic(&path, b"first", 0o644).unwrap();
        write_atomic(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(names(&dir.0), ["kubeconfig"]);
    }

    #[test]
    fn kubeconfig_is_readable_by_kube() {
        let text = kubeconfig(&api_server_url("10.96.0.1", "443"), b"CA PEM", "tok\n");
        let parsed = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig parses");
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.96.0.1:443"));
        assert!(
            parsed.auth_infos[0]
                .auth_info
                .as_ref()
                .unwrap()
                .token
                .is_some()
        );
        assert!(text.contains(r#""token": "tok""#), "token trimmed: {text}");
        assert_eq!(api_server_url("fd00::1", "6443"), "https://[fd00::1]:6443");
    }
}
