//! Proves the capture plan with real iptables and real sockets: each test builds throwaway network
//! namespaces — a "pod" and a "peer" joined by a veth pair — runs the built `trellis-init` inside
//! the pod namespace, and connects through it with small Python clients and listeners.
//!
//! Needs root, iproute2, util-linux (`nsenter`, `setpriv`), iptables and python3. It fails rather
//! than skips without them: CI runs it as root, and a skipped capture test proves nothing.
//! All traffic stays between the namespaces the test creates.

mod probes;

use std::path::Path;

use probes::{CLIENT_PY, Listener, run};
use std::process::{Command, Stdio};
use trellis_init::{Ipv6Mode, SystemExecutor};

const TRELLIS_INIT: &str = env!("CARGO_BIN_EXE_trellis-init");

/// Pod side of the veth pair.
const POD_IP: &str = "10.254.0.2";
/// Peer side of the veth pair: stands for another pod or service endpoint.
const PEER_IP: &str = "10.254.0.1";
/// A second peer address, used as the excluded destination range.
const PEER_EXCLUDED_IP: &str = "10.254.0.3";
/// Routed towards the peer but assigned nowhere: only a redirect can make connecting work.
const UNASSIGNED_IP: &str = "10.254.0.77";
/// The IPv6 counterparts of the addresses above, for a dual-stack pod.
const POD_IP6: &str = "fd00:254::2";
const PEER_IP6: &str = "fd00:254::1";
const PEER_EXCLUDED_IP6: &str = "fd00:254::3";
const UNASSIGNED_IP6: &str = "fd00:254::77";
const PROXY_UID: &str = "1337";

/// The system interpreter: pyenv-style shims under /root are unreadable once setpriv drops to the
/// proxy uid.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        effective_uid, "0",
        "the netns tests must run as root (they create network namespaces and program iptables)"
    );
    for (program, version_flag) in [
        ("ip", "-V"),
        ("nsenter", "--version"),
        ("setpriv", "--version"),
        ("iptables", "-V"),
        ("ip6tables", "-V"),
        ("iptables-save", "-V"),
        (python(), "--version"),
    ] {
        let ran = Command::new(program)
            .arg(version_flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            ran.is_ok_and(|status| status.success()),
            "`{program}` is required by the netns tests (packages iproute2, util-linux, \
             iptables, python3)"
        );
    }
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Self {
        // A namespace left over from a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    /// `program` run inside this namespace (network only: files and users stay the host's).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        command
    }

    /// `program` run inside this namespace as `uid`/`gid` with no supplementary groups.
    fn command_as(&self, uid: &str, gid: &str, program: &str) -> Command {
        let mut command = self.command("setpriv");
        command.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            program,
        ]);
        command
    }

    fn trellis_init(&self, args: &[&str]) -> String {
        run(self.command(TRELLIS_INIT).args(args))
    }

    /// The tables as a save command prints them, minus the timestamped comment lines and
    /// packet counters, which differ between two saves of the same rules.
    fn tables(&self, save_command: &str) -> String {
        run(&mut self.command(save_command))
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.split_once(" [") {
                Some((chain, _counters)) if line.starts_with(':') => format!("{chain} [0:0]\n"),
                _ => format!("{line}\n"),
            })
            .collect()
    }

    fn restore(&self, restore_command: &str, text: &str) {
        use std::io::Write as _;
        let mut child = self
            .command(restore_command)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning restore");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("writing restore input");
        assert!(child.wait().expect("waiting for restore").success());
    }

    /// Connects from inside this namespace and returns the listener's answer line.
    fn connect(&self, mut client: Command, ip: &str, port: u16) -> String {
        run(client.args(["-c", CLIENT_PY, ip, &port.to_string()]))
            .trim()
            .to_owned()
    }

    fn connect_as_root(&self, ip: &str, port: u16) -> String {
        self.connect(self.command(python()), ip, port)
    }

    fn connect_as(&self, uid: &str, gid: &str, ip: &str, port: u16) -> String {
        self.connect(self.command_as(uid, gid, python()), ip, port)
    }

    /// [`Self::connect_as`] from the local address `source`.
    fn connect_from_as(&self, uid: &str, source: &str, ip: &str, port: u16) -> String {
        let mut client = self.command_as(uid, uid, python());
        client.args(["-c", CLIENT_PY, ip, &port.to_string(), source]);
        run(&mut client).trim().to_owned()
    }

    /// How the CNI plugin, running on the host, judges this namespace's IPv6: it enters the
    /// namespace to read its addresses, which must not be the host's (a host with IPv6 addresses
    /// of its own would make an IPv4-only pod look dual-stack, a host without any the reverse).
    fn ipv6_mode_seen_from_the_host(&self) -> Ipv6Mode {
        let path = format!("/var/run/netns/{}", self.name);
        SystemExecutor::detect_in_netns(Path::new(&path))
            .ipv6_mode()
            .expect("reading the namespace's IPv6 addresses")
    }

    /// The link-local IPv6 address of `eth0` (`fe80::…%eth0`), which the kernel assigns itself
    /// once the link is up.
    fn link_local_address(&self) -> String {
        let shown = run(self
            .command("ip")
            .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]));
        let address = shown
            .split_whitespace()
            .skip_while(|word| *word != "inet6")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .unwrap_or_else(|| panic!("no link-local address on eth0: {shown:?}"));
        format!("{address}%eth0")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A pod namespace wired to a peer namespace, with stand-ins listening on both sides:
/// in the pod, the proxy (uid 1337) on its capture and readiness ports and an app on 9090;
/// in the peer, a server on 8080 and 5432.
struct PodNetwork {
    // Fields drop in order: listeners go before the namespaces they live in.
    _listeners: Vec<Listener>,
    pod: Netns,
    peer: Netns,
}

impl PodNetwork {
    /// An IPv4-only pod: besides loopback its only IPv6 addresses are link-local.
    fn new(test: &str) -> Self {
        Self::build(test, false)
    }

    /// A dual-stack pod: the same, plus [`POD_IP6`] and the peers' IPv6 addresses.
    fn dual_stack(test: &str) -> Self {
        Self::build(test, true)
    }

    fn build(test: &str, dual_stack: bool) -> Self {
        require_root_and_tools();
        let prefix = format!("trellis-init-test-{}-{test}", std::process::id());
        let pod = Netns::create(format!("{prefix}-pod"));
        let peer = Netns::create(format!("{prefix}-peer"));
        ip(&[
            "-n", &pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &peer.name,
        ]);
        ip(&[
            "-n",
            &pod.name,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &pod.name, "link", "set", "eth0", "up"]);
        // Without a route connect() fails with ENETUNREACH before OUTPUT is ever consulted.
        ip(&["-n", &pod.name, "route", "add", "default", "via", PEER_IP]);
        for address in [PEER_IP, PEER_EXCLUDED_IP] {
            ip(&[
                "-n",
                &peer.name,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
        }
        ip(&["-n", &peer.name, "link", "set", "eth0", "up"]);
        if dual_stack {
            // `nodad`: usable at once, not after duplicate address detection's second.
            let add6 = |netns: &Netns, address: &str| {
                ip(&[
                    "-n",
                    &netns.name,
                    "-6",
                    "addr",
                    "add",
                    &format!("{address}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
            };
            add6(&pod, POD_IP6);
            add6(&peer, PEER_IP6);
            add6(&peer, PEER_EXCLUDED_IP6);
            ip(&[
                "-n", &pod.name, "-6", "route", "add", "default", "via", PEER_IP6,
            ]);
        }
        wait_for_link_local(&pod);
        wait_for_link_local(&peer);

        let listeners = vec![
            Listener::start(
                pod.command_as(PROXY_UID, PROXY_UID, python()),
                &[
                    (15001, "outbound-capture"),
                    (15006, "inbound-capture"),
                    (15021, "proxy-readiness"),
                ],
            ),
            Listener::start(
                pod.command_as("1000", "1000", python()),
                &[(9090, "app"), (8080, "app-8080")],
            ),
            Listener::start(peer.command(python()), &[(8080, "peer"), (5432, "peer")]),
        ];
        Self {
            _listeners: listeners,
            pod,
            peer,
        }
    }
}

#[test]
fn capture_redirects_and_exemptions_hold_for_real_connections() {
    let network = PodNetwork::new("capture");
    let (pod, peer) = (&network.pod, &network.peer);
    assert_eq!(
        pod.connect_as_root(PEER_IP, 8080),
        format!("peer {PEER_IP}:8080"),
        "before apply nothing is captured"
    );

    pod.trellis_init(&[
        "--exclude-inbound-ports=9090",
        "--exclude-outbound-ports=5432",
        &format!("--exclude-outbound-ip-ranges={PEER_EXCLUDED_IP}/32"),
    ]);

    let cases: &[(&str, String, String)] = &[
        (
            "outbound from the app goes to the outbound listener",
            pod.connect_as_root(PEER_IP, 8080),
            format!("outbound-capture {PEER_IP}:8080"),
        ),
        (
            "outbound to an address nobody holds is still captured",
            pod.connect_as_root(UNASSIGNED_IP, 80),
            format!("outbound-capture {UNASSIGNED_IP}:80"),
        ),
        (
            "the proxy uid is not captured",
            pod.connect_as(PROXY_UID, "1000", PEER_IP, 8080),
            format!("peer {PEER_IP}:8080"),
        ),
        (
            "the proxy gid is not captured",
            pod.connect_as("1000", PROXY_UID, PEER_IP, 8080),
            format!("peer {PEER_IP}:8080"),
        ),
        (
            "an excluded outbound port is not captured",
            pod.connect_as_root(PEER_IP, 5432),
            format!("peer {PEER_IP}:5432"),
        ),
        (
            "an excluded outbound range is not captured",
            pod.connect_as_root(PEER_EXCLUDED_IP, 8080),
            format!("peer {PEER_EXCLUDED_IP}:8080"),
        ),
        (
            "the app reaching itself on loopback is not captured",
            pod.connect_as_root("127.0.0.1", 9090),
            "app 127.0.0.1:9090".to_owned(),
        ),
        (
            "the app reaching its own pod IP is not captured",
            pod.connect_as_root(POD_IP, 9090),
            format!("app {POD_IP}:9090"),
        ),
        (
            "the proxy reaching its own pod IP is handed to the inbound side",
            pod.connect_as(PROXY_UID, PROXY_UID, POD_IP, 9090),
            format!("inbound-capture {POD_IP}:9090"),
        ),
        (
            "inbound to an app port goes to the inbound listener",
            peer.connect_as_root(POD_IP, 8080),
            format!("inbound-capture {POD_IP}:8080"),
        ),
        (
            "an excluded inbound port reaches the app",
            peer.connect_as_root(POD_IP, 9090),
            format!("app {POD_IP}:9090"),
        ),
        (
            "the proxy's readiness port is never captured",
            peer.connect_as_root(POD_IP, 15021),
            format!("proxy-readiness {POD_IP}:15021"),
        ),
    ];
    assert_cases(pod, cases);
}

/// Waits (bounded) until `netns`'s `eth0` has a usable link-local address: the kernel assigns it
/// when the link comes up and keeps it tentative during duplicate address detection.
fn wait_for_link_local(netns: &Netns) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let shown = run(netns
            .command("ip")
            .args(["-6", "addr", "show", "dev", "eth0", "scope", "link"]));
        if shown.contains("inet6") && !shown.contains("tentative") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no link-local address: {shown}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lists every case whose answer differs from the expected one, with the tables for context.
fn assert_cases(pod: &Netns, cases: &[(&str, String, String)]) {
    let failures: Vec<String> = cases
        .iter()
        .filter(|(_, actual, expected)| actual != expected)
        .map(|(name, actual, expected)| format!("{name}: expected {expected:?}, got {actual:?}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{}\nIPv4 tables:\n{}\nIPv6 tables:\n{}",
        failures.join("\n"),
        pod.tables("iptables-save"),
        pod.tables("ip6tables-save")
    );
}

/// A dual-stack pod's IPv6 meets exactly the IPv4 cases of the test above: `trellis-init`
/// finds the pod's IPv6 address itself (`--ipv6` left at `auto`, as the injector and the CNI
/// plugin leave it) and programs ip6tables like iptables, `::6` included. Before IPv6 was
/// planned from the pod's addresses, every IPv6 case reached the peer or the app uncaptured.
#[test]
fn ipv6_is_captured_exactly_as_ipv4_in_a_dual_stack_pod() {
    let network = PodNetwork::dual_stack("ipv6");
    let (pod, peer) = (&network.pod, &network.peer);
    assert_eq!(
        pod.ipv6_mode_seen_from_the_host(),
        Ipv6Mode::Capture,
        "the CNI plugin's view from the host"
    );
    assert_eq!(
        pod.connect_as_root(PEER_IP6, 8080),
        format!("peer [{PEER_IP6}]:8080"),
        "before apply nothing is captured"
    );

    pod.trellis_init(&[
        "--exclude-inbound-ports=9090",
        "--exclude-outbound-ports=5432",
        &format!("--exclude-outbound-ip-ranges={PEER_EXCLUDED_IP}/32,{PEER_EXCLUDED_IP6}/128"),
    ]);

    let bracketed = |ip: &str, port: u16| format!("[{ip}]:{port}");
    let cases: &[(&str, String, String)] = &[
        (
            "outbound from the app goes to the outbound listener",
            pod.connect_as_root(PEER_IP6, 8080),
            format!("outbound-capture {}", bracketed(PEER_IP6, 8080)),
        ),
        (
            "outbound to an address nobody holds is still captured",
            pod.connect_as_root(UNASSIGNED_IP6, 80),
            format!("outbound-capture {}", bracketed(UNASSIGNED_IP6, 80)),
        ),
        (
            "the proxy uid is not captured",
            pod.connect_as(PROXY_UID, "1000", PEER_IP6, 8080),
            format!("peer {}", bracketed(PEER_IP6, 8080)),
        ),
        (
            "the proxy gid is not captured",
            pod.connect_as("1000", PROXY_UID, PEER_IP6, 8080),
            format!("peer {}", bracketed(PEER_IP6, 8080)),
        ),
        (
            "an excluded outbound port is not captured",
            pod.connect_as_root(PEER_IP6, 5432),
            format!("peer {}", bracketed(PEER_IP6, 5432)),
        ),
        (
            "an excluded outbound range is not captured",
            pod.connect_as_root(PEER_EXCLUDED_IP6, 8080),
            format!("peer {}", bracketed(PEER_EXCLUDED_IP6, 8080)),
        ),
        (
            "the app reaching itself on loopback is not captured",
            pod.connect_as_root("::1", 9090),
            "app [::1]:9090".to_owned(),
        ),
        (
            "the app reaching its own pod IP is not captured",
            pod.connect_as_root(POD_IP6, 9090),
            format!("app {}", bracketed(POD_IP6, 9090)),
        ),
        (
            "the proxy reaching its own pod IP is handed to the inbound side",
            pod.connect_as(PROXY_UID, PROXY_UID, POD_IP6, 9090),
            format!("inbound-capture {}", bracketed(POD_IP6, 9090)),
        ),
        (
            "the proxy forwarding inbound from ::6 reaches the app",
            pod.connect_from_as(PROXY_UID, "::6", POD_IP6, 8080),
            format!("app-8080 {}", bracketed(POD_IP6, 8080)),
        ),
        (
            "inbound to an app port goes to the inbound listener",
            peer.connect_as_root(POD_IP6, 8080),
            format!("inbound-capture {}", bracketed(POD_IP6, 8080)),
        ),
        (
            "an excluded inbound port reaches the app",
            peer.connect_as_root(POD_IP6, 9090),
            format!("app {}", bracketed(POD_IP6, 9090)),
        ),
        (
            "the proxy's readiness port is never captured",
            peer.connect_as_root(POD_IP6, 15021),
            format!("proxy-readiness {}", bracketed(POD_IP6, 15021)),
        ),
        (
            "IPv4 is still captured",
            peer.connect_as_root(POD_IP, 8080),
            format!("inbound-capture {POD_IP}:8080"),
        ),
    ];
    assert_cases(pod, cases);
}

/// Where IPv6 is not captured it does not pass: an IPv4-only pod (IPv6 only link-local, `auto`
/// rejects) and a dual-stack pod told `--ipv6=reject` answer no IPv6 connection either way, while
/// IPv4 is captured and IPv6 loopback still works. Before, a neighbour reached the app on the
/// pod's link-local address and the app reached the network, both past the proxy.
#[test]
fn uncaptured_ipv6_is_rejected_never_passed() {
    let network = PodNetwork::new("ipv6-reject");
    let (pod, peer) = (&network.pod, &network.peer);
    assert_eq!(
        pod.ipv6_mode_seen_from_the_host(),
        Ipv6Mode::Reject,
        "the CNI plugin's view from the host"
    );
    let pod_link_local = pod.link_local_address();
    let peer_link_local = peer.link_local_address();
    assert!(
        peer.connect_as_root(&pod_link_local, 9090)
            .starts_with("app "),
        "before apply the app answers on its link-local address"
    );
    pod.trellis_init(&[]);
    let refused = |answer: String| answer.starts_with("no connection");
    let cases = [
        (
            "a neighbour reaching the app on its link-local address",
            peer.connect_as_root(&pod_link_local, 9090),
        ),
        (
            "a neighbour reaching a captured port on its link-local address",
            peer.connect_as_root(&pod_link_local, 8080),
        ),
        (
            "the app reaching a neighbour's link-local address",
            pod.connect_as_root(&peer_link_local, 8080),
        ),
        (
            "the proxy reaching a neighbour's link-local address",
            pod.connect_as(PROXY_UID, PROXY_UID, &peer_link_local, 8080),
        ),
    ];
    for (name, answer) in &cases {
        assert!(
            refused(answer.clone()),
            "{name}: {answer}\n{}",
            pod.tables("ip6tables-save")
        );
    }
    assert_eq!(
        pod.connect_as_root("::1", 9090),
        "app [::1]:9090",
        "IPv6 loopback works"
    );
    assert_eq!(
        peer.connect_as_root(POD_IP, 8080),
        format!("inbound-capture {POD_IP}:8080")
    );

    let dual = PodNetwork::dual_stack("ipv6-forced-reject");
    dual.pod.trellis_init(&["--ipv6=reject"]);
    for answer in [
        dual.peer.connect_as_root(POD_IP6, 9090),
        dual.pod.connect_as_root(PEER_IP6, 8080),
    ] {
        assert!(
            refused(answer.clone()),
            "--ipv6=reject let through: {answer}"
        );
    }
}

#[test]
fn include_lists_capture_only_what_they_name() {
    let network = PodNetwork::new("include");
    let (pod, peer) = (&network.pod, &network.peer);
    pod.trellis_init(&[
        "--include-inbound-ports=8080",
        &format!("--include-outbound-ip-ranges={PEER_IP}/32"),
    ]);

    assert_eq!(
        peer.connect_as_root(POD_IP, 8080),
        format!("inbound-capture {POD_IP}:8080")
    );
    assert_eq!(
        peer.connect_as_root(POD_IP, 9090),
        format!("app {POD_IP}:9090")
    );
    assert_eq!(
        pod.connect_as_root(PEER_IP, 8080),
        format!("outbound-capture {PEER_IP}:8080")
    );
    assert_eq!(
        pod.connect_as_root(PEER_EXCLUDED_IP, 8080),
        format!("peer {PEER_EXCLUDED_IP}:8080")
    );
}

/// Someone else's rules in both families, so the test can tell "ours removed" from "table reset".
fn seed_foreign_rules(netns: &Netns) {
    let foreign = "*nat\n:FOREIGN_DNS - [0:0]\n-A FOREIGN_DNS -j RETURN\n\
                   -A OUTPUT -p udp --dport 53 -j FOREIGN_DNS\nCOMMIT\n\
                   *filter\n:FOREIGN_FILTER - [0:0]\n-A FOREIGN_FILTER -j RETURN\n\
                   -A INPUT -p udp --dport 53 -j FOREIGN_FILTER\nCOMMIT\n";
    netns.restore("iptables-restore", foreign);
    netns.restore("ip6tables-restore", foreign);
}

#[test]
fn apply_is_idempotent_and_cleanup_restores_the_previous_table() {
    require_root_and_tools();
    let pod = Netns::create(format!("trellis-init-test-{}-idem", std::process::id()));
    seed_foreign_rules(&pod);
    let tables = || (pod.tables("iptables-save"), pod.tables("ip6tables-save"));
    let before = tables();

    pod.trellis_init(&["--ipv6=capture"]);
    let applied = tables();
    assert_ne!(applied, before, "apply changed nothing");
    for table in [&applied.0, &applied.1] {
        assert_eq!(
            table.matches("-A OUTPUT -p tcp -j TRELLIS_OUTPUT").count(),
            1
        );
        assert_eq!(
            table
                .matches("-A PREROUTING -p tcp -j TRELLIS_INBOUND")
                .count(),
            1
        );
        assert!(table.contains("-A FOREIGN_DNS -j RETURN"));
    }
    assert!(applied.1.contains("-d ::1/128 -j RETURN"), "{}", applied.1);

    pod.trellis_init(&["--ipv6=capture"]);
    assert_eq!(tables(), applied, "second apply changed the tables");

    pod.trellis_init(&[
        "--ipv6=capture",
        "--include-inbound-ports=",
        "--exclude-outbound-ports=22",
    ]);
    let changed = tables();
    assert!(!changed.0.contains("TRELLIS_INBOUND"), "{}", changed.0);
    assert!(changed.0.contains("--dport 22 -j RETURN"), "{}", changed.0);
    pod.trellis_init(&["--ipv6=capture"]);
    assert_eq!(
        tables(),
        applied,
        "re-applying the first config after a change"
    );

    pod.trellis_init(&["--cleanup"]);
    assert_eq!(tables(), before, "cleanup left a different table");
    pod.trellis_init(&["--cleanup"]);
    assert_eq!(tables(), before, "cleanup of a clean table changed it");
}

#[test]
fn backend_already_holding_rules_is_used() {
    require_root_and_tools();
    let pod = Netns::create(format!("trellis-init-test-{}-legacy", std::process::id()));
    pod.restore(
        "iptables-legacy-restore",
        "*nat\n:FOREIGN - [0:0]\n-A OUTPUT -p udp -j FOREIGN\nCOMMIT\n",
    );
    let legacy_before = pod.tables("iptables-legacy-save");
    let nft_before = pod.tables("iptables-nft-save");

    pod.trellis_init(&[]);
    let legacy = pod.tables("iptables-legacy-save");
    assert!(
        legacy.contains("-A OUTPUT -p tcp -j TRELLIS_OUTPUT"),
        "{legacy}"
    );
    assert_eq!(
        pod.tables("iptables-nft-save"),
        nft_before,
        "nft was written to although legacy holds the rules"
    );

    pod.trellis_init(&["--cleanup"]);
    assert_eq!(pod.tables("iptables-legacy-save"), legacy_before);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    require_root_and_tools();
    let pod = Netns::create(format!("trellis-init-test-{}-dry", std::process::id()));
    seed_foreign_rules(&pod);
    let before = pod.tables("iptables-save");

    let printed = pod.trellis_init(&["--dry-run"]);
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/defaults.golden"
    ))
    .expect("defaults golden file");
    assert_eq!(
        golden.split_once('\n').map(|(_description, plan)| plan),
        Some(printed.as_str())
    );
    assert_eq!(pod.tables("iptables-save"), before);

    pod.trellis_init(&["--dry-run", "--cleanup"]);
    assert_eq!(pod.tables("iptables-save"), before);
}
