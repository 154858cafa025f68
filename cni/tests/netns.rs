//! Runs the built `trellis-cni` the way a container runtime does: chained after the real
//! reference `bridge` plugin (with `host-local` IPAM) on a fresh network namespace, with the
//! bridge's result as `prevResult`. A small in-test HTTP server stands in for the API server and
//! serves the pods; everything else is real: the namespace, the bridge and veth, iptables inside
//! the namespace, and the TCP connections that prove the redirect.
//!
//! Needs root, iproute2, util-linux (`nsenter`), iptables, python3 and Debian's
//! `containernetworking-plugins` in /usr/lib/cni. It fails rather than skips without them: CI runs
//! it as root, and a skipped capture test proves nothing. Traffic stays inside the namespaces;
//! the host only gains a bridge without addresses, removed at the end.

/// The init crate's socket probes: same checks, one copy.
#[path = "../../init/tests/probes/mod.rs"]
mod probes;

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use probes::{CLIENT_PY, Listener, run};
use serde_json::{Value, json};

const TRELLIS_CNI: &str = env!("CARGO_BIN_EXE_trellis-cni");
const CNI_PATH: &str = "/usr/lib/cni";
const PYTHON: &str = "/usr/bin/python3";
const NETWORK_NAME: &str = "trellis-cni-test";

fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        effective_uid, "0",
        "the netns tests must run as root (they create network namespaces, bridges and iptables \
         rules)"
    );
    for (program, flag) in [
        ("ip", "-V"),
        ("nsenter", "--version"),
        ("iptables-save", "-V"),
        (PYTHON, "--version"),
    ] {
        let ran = Command::new(program)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            ran.is_ok_and(|status| status.success()),
            "`{program}` is required by the netns tests (packages iproute2, util-linux, \
             iptables, python3)"
        );
    }
    for plugin in ["bridge", "host-local"] {
        assert!(
            Path::new(CNI_PATH).join(plugin).exists(),
            "{CNI_PATH}/{plugin} is required (package containernetworking-plugins)"
        );
    }
}

/// A directory for this test's files (host-local's state, kubeconfig, log), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Self {
        // A namespace left over from a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Self { name };
        // What the runtime's loopback plugin does before the network's plugins run.
        run(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]));
        netns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path())).arg(program);
        command
    }

    /// The `nat` table, without comments and counters.
    fn nat_table(&self) -> String {
        run(self.command("iptables-save").args(["-t", "nat"]))
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    fn connect(&self, ip: &str, port: u16) -> String {
        run(self
            .command(PYTHON)
            .args(["-c", CLIENT_PY, ip, &port.to_string()]))
        .trim()
        .to_owned()
    }

    fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A host bridge created by the bridge plugin, deleted on drop.
struct BridgeLink(String);

impl Drop for BridgeLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// Stands in for the API server: answers `GET /api/v1/namespaces/<ns>/pods/<name>` from a map,
/// 404 otherwise, and records the paths asked for. Stopped on drop.
struct FakeApiServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    fn start(pods: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API server");
        let port = listener.local_addr().unwrap().port();
        let by_path: BTreeMap<String, String> = pods
            .into_iter()
            .map(|pod| {
                let meta = &pod["metadata"];
                let path = format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    meta["namespace"].as_str().unwrap(),
                    meta["name"].as_str().unwrap()
                );
                (path, pod.to_string())
            })
            .collect();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve(stream, &by_path, &requests);
                    }
                }
            })
        };
        Self {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn kubeconfig(&self) -> String {
        json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": format!("http://127.0.0.1:{}", self.port)}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test"
        })
        .to_string()
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
fn serve(mut stream: TcpStream, pods: &BTreeMap<String, String>, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (request_line.next(), request_line.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default().to_owned();
    requests.lock().push(path.clone());
    let (status, body) = match (method, pods.get(&path)) {
        (Some("GET"), Some(pod)) => ("200 OK", pod.clone()),
        _ => (
            "404 Not Found",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": format!("{path} not found")})
            .to_string(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// One plugin invocation's outcome.
struct Invocation {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Invocation {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// Executes a plugin exactly as a runtime does: `CNI_*` in the environment, config on stdin,
/// nothing else inherited that could change its behaviour.
fn invoke(
    plugin: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    cni_args: &str,
    config: &Value,
) -> Invocation {
    let mut child = Command::new(plugin)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {plugin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    Invocation {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn pod_args(namespace: &str, name: &str, container_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={container_id}"
    )
}

fn pod_json(namespace: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"containers": [{"name": "trellis-proxy", "image": "p"}, {"name": "app", "image": "a"}]}
    })
}

/// A pod sandbox being set up: its namespace, the bridge plugin's network, and the files the
/// plugins use. Everything is torn down on drop, in reverse order.
struct Sandbox {
    container_id: String,
    subnet_prefix: String,
    bridge_config: Value,
    trellis_config_base: Value,
    // Drop order: the namespace (and the veth in it) before the bridge, files last.
    netns: Netns,
    _bridge: BridgeLink,
    dir: TempDir,
}

impl Sandbox {
    /// `index` keeps concurrently running tests on distinct names and subnets.
    fn new(test: &str, index: u32, api: &FakeApiServer) -> Self {
        require_root_and_tools();
        let pid = std::process::id();
        let dir = TempDir::new(&format!("trellis-cni-netns-{pid}-{test}"));
        let kubeconfig = dir.0.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        // Interface names are limited to 15 characters.
        let bridge = format!("tcni{}{index}", pid % 10_000_000);
        let subnet_prefix = format!("10.251.{}", (pid % 100) * 2 + index);
        let bridge_config = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK_NAME,
            "type": "bridge",
            "bridge": bridge,
            // No gateway address or masquerading: the test must not change host routing,
            // forwarding or iptables.
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.0.join("ipam"),
                "ranges": [[{"subnet": format!("{subnet_prefix}.0/24"), "gateway": format!("{subnet_prefix}.1")}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        });
        let trellis_config_base = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK_NAME,
            "type": "trellis-cni",
            "kubeconfig": kubeconfig,
            "logFile": dir.0.join("trellis-cni.log"),
            "logLevel": "debug",
        });
        Self {
            container_id: format!("trellis-cni-test-{pid}-{test}"),
            subnet_prefix,
            bridge_config,
            trellis_config_base,
            netns: Netns::create(format!("trellis-cni-test-{pid}-{test}")),
            _bridge: BridgeLink(bridge),
            dir,
        }
    }

    fn bridge(&self, command: &str) -> Invocation {
        invoke(
            &format!("{CNI_PATH}/bridge"),
            command,
            &self.container_id,
            &self.netns.path(),
            "",
            &self.bridge_config,
        )
    }

    /// Our plugin's config as libcni builds it for the second plugin of the list.
    fn trellis_config(&self, prev_result: &Value) -> Value {
        let mut config = self.trellis_config_base.clone();
        config["prevResult"] = prev_result.clone();
        config
    }

    fn trellis(&self, command: &str, cni_args: &str, prev_result: &Value) -> Invocation {
        invoke(
            TRELLIS_CNI,
            command,
            &self.container_id,
            &self.netns.path(),
            cni_args,
            &self.trellis_config(prev_result),
        )
    }

    /// ADD through the bridge, asserting success; returns its result.
    fn add_bridge(&self) -> Value {
        let added = self.bridge("ADD");
        assert!(
            added.success,
            "bridge ADD: {}{}",
            added.stdout, added.stderr
        );
        let result = added.json();
        let address = result["ips"][0]["address"].as_str().expect("an IP");
        assert!(
            address.starts_with(&format!("{}.", self.subnet_prefix)),
            "{result}"
        );
        let addresses =
            run(Command::new("ip").args(["-n", &self.netns.name, "-4", "addr", "show", "eth0"]));
        assert!(
            addresses.contains(address),
            "eth0 lacks {address}: {addresses}"
        );
        result
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("trellis-cni.log")).unwrap_or_default()
    }
}

#[test]
fn injected_pod_is_captured_behind_the_bridge_plugin() {
    let api = FakeApiServer::start(vec![pod_json(
        "shop",
        "cart",
        json!({
            "trellis.dev/status": r#"{"version":"1.0.0","interception":"cni"}"#,
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
        }),
    )]);
    let sandbox = Sandbox::new("injected", 0, &api);
    let args = pod_args("shop", "cart", &sandbox.container_id);
    let prev_result = sandbox.add_bridge();
    let outside = format!("{}.77", sandbox.subnet_prefix);
    let proxy = Listener::start(
        sandbox.netns.command(PYTHON),
        &[(15001, "outbound-capture")],
    );
    assert!(
        sandbox
            .netns
            .connect(&outside, 8080)
            .starts_with("no connection"),
        "nothing answers at {outside} before capture"
    );

    let added = sandbox.trellis("ADD", &args, &prev_result);
    assert!(added.success, "ADD: {}\n{}", added.stdout, added.stderr);
    assert_eq!(
        added.json(),
        prev_result,
        "ADD must echo prevResult unchanged"
    );
    assert_eq!(api.requests(), ["/api/v1/namespaces/shop/pods/cart"]);

    let nat = sandbox.netns.nat_table();
    for line in [
        ":TRELLIS_OUTPUT - ",
        ":TRELLIS_INBOUND - ",
        "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
        "--dport 5432 -j RETURN",
        "-j REDIRECT --to-ports 15001",
    ] {
        assert!(
            nat.contains(line),
            "{line:?} missing from the nat table:\n{nat}"
        );
    }
    assert_eq!(
        sandbox.netns.connect(&outside, 8080),
        format!("outbound-capture {outside}:8080"),
        "an outbound connection from the pod reaches the proxy's outbound listener\n{nat}"
    );
    // The bridge network is IPv4-only: the plugin found no IPv6 address in the pod's namespace
    // and rejects IPv6 there rather than let it pass uncaptured.
    let ipv6 = run(&mut sandbox.netns.command("ip6tables-save"));
    for jump in [
        "-A INPUT -j TRELLIS_REJECT_INBOUND",
        "-A OUTPUT -j TRELLIS_REJECT_OUTPUT",
    ] {
        assert!(
            ipv6.contains(jump),
            "{jump:?} missing from ip6tables:\n{ipv6}"
        );
    }

    let checked = sandbox.trellis("CHECK", &args, &prev_result);
    assert!(
        checked.success,
        "CHECK: {}\n{}",
        checked.stdout, checked.stderr
    );
    assert_eq!(checked.stdout, "", "CHECK prints nothing on success");

    let added_again = sandbox.trellis("ADD", &args, &prev_result);
    assert!(added_again.success, "second ADD: {}", added_again.stdout);
    assert_eq!(
        sandbox.netns.nat_table(),
        nat,
        "a repeated ADD changes nothing"
    );

    for round in ["first", "second"] {
        let deleted = sandbox.trellis("DEL", &args, &prev_result);
        assert!(
            deleted.success,
            "{round} DEL: {}\n{}",
            deleted.stdout, deleted.stderr
        );
        assert_eq!(deleted.stdout, "", "DEL prints nothing");
        let nat = sandbox.netns.nat_table();
        assert!(!nat.contains("TRELLIS"), "{round} DEL left rules:\n{nat}");
        let ipv6 = run(&mut sandbox.netns.command("ip6tables-save"));
        assert!(
            !ipv6.contains("TRELLIS"),
            "{round} DEL left IPv6 rules:\n{ipv6}"
        );
    }
    drop(proxy);

    let bridge_deleted = sandbox.bridge("DEL");
    assert!(
        bridge_deleted.success,
        "bridge DEL: {}",
        bridge_deleted.stderr
    );
    sandbox.netns.delete();
    for container_id in [sandbox.container_id.as_str(), "never-seen-container"] {
        let gone = invoke(
            TRELLIS_CNI,
            "DEL",
            container_id,
            &sandbox.netns.path(),
            &args,
            &sandbox.trellis_config(&prev_result),
        );
        assert!(
            gone.success,
            "DEL after the netns is gone: {}\n{}",
            gone.stdout, gone.stderr
        );
    }
    let log = sandbox.log();
    assert!(log.contains("capture installed"), "log file:\n{log}");
    assert!(log.contains("netns already gone"), "log file:\n{log}");
}

#[test]
fn pods_not_injected_for_cni_are_left_alone() {
    let api = FakeApiServer::start(vec![
        pod_json("shop", "plain", json!({})),
        pod_json(
            "shop",
            "init-captured",
            json!({"trellis.dev/status": r#"{"version":"1.0.0","interception":"initContainer"}"#}),
        ),
        pod_json(
            "kube-system",
            "coredns",
            json!({"trellis.dev/status": r#"{"version":"1.0.0","interception":"cni"}"#}),
        ),
    ]);
    let sandbox = Sandbox::new("skipped", 1, &api);
    let prev_result = sandbox.add_bridge();
    let before = sandbox.netns.nat_table();
    for (namespace, name) in [
        ("shop", "plain"),
        ("shop", "init-captured"),
        ("kube-system", "coredns"),
    ] {
        let args = pod_args(namespace, name, &sandbox.container_id);
        let added = sandbox.trellis("ADD", &args, &prev_result);
        assert!(added.success, "{name}: {}\n{}", added.stdout, added.stderr);
        assert_eq!(added.json(), prev_result, "{name}: prevResult echoed");
        let nat = sandbox.netns.nat_table();
        assert!(!nat.contains("TRELLIS"), "{name} was captured:\n{nat}");
        assert_eq!(nat, before, "{name}");
    }
    assert_eq!(
        api.requests(),
        [
            "/api/v1/namespaces/shop/pods/plain",
            "/api/v1/namespaces/shop/pods/init-captured"
        ],
        "pods in excluded namespaces are never looked up"
    );
    let deleted = sandbox.bridge("DEL");
    assert!(deleted.success, "bridge DEL: {}", deleted.stderr);
}

#[test]
fn unreachable_api_server_fails_the_add_for_a_retry_within_the_deadline() {
    let dir = TempDir::new(&format!("trellis-cni-unreachable-{}", std::process::id()));
    // A port that was just free: connecting is refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": format!("http://127.0.0.1:{port}")}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x"
        })
        .to_string(),
    )
    .unwrap();
    let config = json!({
        "cniVersion": "0.4.0", "name": NETWORK_NAME, "type": "trellis-cni",
        "kubeconfig": kubeconfig,
        "prevResult": {"cniVersion": "0.4.0", "interfaces": [], "ips": [], "dns": {}},
    });
    let started = Instant::now();
    let added = invoke(
        TRELLIS_CNI,
        "ADD",
        "c1",
        "/var/run/netns/unused",
        &pod_args("shop", "cart", "c1"),
        &config,
    );
    let elapsed = started.elapsed();
    assert!(!added.success);
    let error = added.json();
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(error["cniVersion"], "0.4.0");
    assert!(
        elapsed < Duration::from_secs(10),
        "lookup took {elapsed:?}; the runtime is waiting"
    );
    assert!(!added.stderr.is_empty(), "the failure is logged on stderr");
}
