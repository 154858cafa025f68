//! Helpers shared by the integration tests: start the real `trellis-proxy` binary on free ports
//! and talk HTTP/1.1 to its endpoints over real sockets.

#![allow(dead_code)] // each test crate uses a different part of this module

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique path in the temp dir for this test process.
pub fn temp_path(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!(
        "trellis-proxy-test-{}-{n}-{name}",
        std::process::id()
    ))
}

/// A port nothing listens on and no other test of this binary was given. Counted up from a base
/// below the kernel's ephemeral range (32768–60999 by default): a port from `bind(0)` lies in
/// that range, where the tests' own client connections take their source ports, and one of
/// them could take it before the proxy binds it. The base moves with the process id, so test
/// binaries run one after the other do not reuse each other's ports.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 100) * 100;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(offset < SPAN, "no free port left for this test binary");
        let port = u16::try_from(FIRST + (base + offset) % SPAN).expect("below 32,000");
        // Binding the wildcard address fails for a port in use on any local address.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Ports {
    pub fn free() -> Self {
        Self {
            outbound: free_port(),
            inbound: free_port(),
            admin: free_port(),
            metrics: free_port(),
            readiness: free_port(),
        }
    }

    pub fn well_known() -> Self {
        Self {
            outbound: 15001,
            inbound: 15006,
            admin: 15000,
            metrics: 15020,
            readiness: 15021,
        }
    }
}

/// A running `trellis-proxy sidecar`, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub ports: Ports,
    pub log: PathBuf,
    /// The proxy's stdout: the access log.
    pub stdout: PathBuf,
    /// Files removed on drop (kept when the test failed, for a look).
    pub files: Vec<PathBuf>,
}

impl Proxy {
    /// Starts the proxy with `args` after `sidecar` plus the port flags and test identity env.
    pub fn start(ports: Ports, args: &[&str]) -> Self {
        Self::start_with_env(ports, args, &[])
    }

    /// [`Proxy::start`] with environment overrides (another workload's name, namespace, ...).
    pub fn start_with_env(ports: Ports, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = temp_path("proxy.log");
        let stdout = temp_path("proxy.stdout");
        let mut command = Command::new(BIN);
        command
            .arg("sidecar")
            .args(args)
            .args(["--outbound-port", &ports.outbound.to_string()])
            .args(["--inbound-port", &ports.inbound.to_string()])
            .args(["--admin-port", &ports.admin.to_string()])
            .args(["--metrics-port", &ports.metrics.to_string()])
            .args(["--readiness-port", &ports.readiness.to_string()])
            .env("POD_NAME", "client-7d9f-abcde")
            .env("POD_NAMESPACE", "demo")
            .env("SERVICE_ACCOUNT", "client")
            .env("WORKLOAD_NAME", "client")
            .env_remove("TRELLIS_CONTROL_PLANE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("start trellis-proxy");
        Self {
            child,
            ports,
            files: vec![log.clone(), stdout.clone()],
            log,
            stdout,
        }
    }

    /// Starts the proxy from a static config given as JSON text.
    pub fn with_config(ports: Ports, config: &str, extra: &[&str]) -> Self {
        Self::with_config_and_env(ports, config, extra, &[])
    }

    pub fn with_config_and_env(
        ports: Ports,
        config: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let path = temp_path("config.json");
        std::fs::write(&path, config).unwrap();
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut proxy = Self::start_with_env(ports, &args, env);
        proxy.files.push(path);
        proxy
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access-log lines written so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("an access-log line is JSON"))
            .collect()
    }

    /// The peak resident memory of the proxy process so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Waits until `/healthz/ready` answers 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("proxy exited early with {status}:\n{}", self.logs());
            }
            if let Ok((200, _)) = try_http("GET", self.ports.readiness, "/healthz/ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy not ready in time:\n{}", self.logs());
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy did not exit within {within:?}:\n{}", self.logs());
    }

    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(method, self.ports.admin, path)
    }

    pub fn scrape(&self) -> String {
        let (status, body) = http("GET", self.ports.metrics, "/stats/prometheus");
        assert_eq!(status, 200);
        body
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            for file in &self.files {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns status and body.
pub fn try_http(method: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn http(method: &str, port: u16, path: &str) -> (u16, String) {
    try_http(method, port, path).unwrap_or_else(|e| panic!("{method} :{port}{path}: {e}"))
}

/// The value of the sample of `metric` whose labels contain every `label="value"` in `labels`.
///
/// Hand-written rather than `prometheus-parse` (0.2.5): that crate splits label sets at every
/// comma and drops samples with a `}` in a label value, so `response_flags="UF,URX"` would read
/// as `UF`, and it types OpenMetrics counters (`# TYPE x counter` over `x_total`) as untyped.
pub fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (label_text, value) = rest.rsplit_once("} ")?;
        // Whole `key="value"` labels bounded by commas: values may hold commas ("UF,URX").
        let bounded = format!(",{label_text},");
        labels
            .iter()
            .all(|l| bounded.contains(&format!(",{l},")))
            .then(|| value.trim().parse().ok())?
    })
}

/// An echo server: echoes every chunk at once; after the peer's FIN, sends `|bye` and closes.
/// Returns its address and the peers it saw.
pub fn echo_server(
    addr: &str,
) -> (
    SocketAddr,
    std::sync::Arc<parking_lot::Mutex<Vec<SocketAddr>>>,
) {
    let listener = TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap();
    let peers = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            seen.lock().push(stream.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            let _ = stream.write_all(b"|bye");
                            return;
                        }
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (local, peers)
}

/// A private network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn create(tag: &str) -> Option<Self> {
        let name = format!("trellis-proxy-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        ok.then(|| Self(name))
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> ExitStatus {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .status()
            .unwrap()
    }

    /// Appends a rule to the nat OUTPUT chain, e.g. `["-s", "127.0.0.5", "-j", "REDIRECT",
    /// "--to-ports", "15001"]`.
    pub fn nat_output(&self, rule: &[&str]) {
        let mut args = vec!["-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        args.extend_from_slice(rule);
        assert!(self.exec("iptables", &args).success(), "iptables {args:?}");
    }

    /// Re-runs the test `name` of the current test binary inside the namespace with `marker`
    /// set in its environment; panics if it fails.
    pub fn rerun_inside(&self, marker: &str) {
        let name = current_test();
        let me = std::env::current_exe().unwrap();
        let run = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(me)
            .args([&name, "--exact", "--nocapture", "--test-threads=1"])
            .env(marker, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&run.stderr));
        assert!(
            run.status.success(),
            "the test inside the network namespace failed"
        );
        // A name that selects no test would pass having run nothing.
        assert!(
            stdout.contains("running 1 test\n") && stdout.contains("1 passed"),
            "the run inside the network namespace did not run exactly the test {name:?}"
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The running test's name: libtest names the thread it runs a test on after the test, so the
/// re-run inside a namespace selects the calling test without a hand-typed name.
fn current_test() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => panic!("a network-namespace test must be called from a #[test] function's thread"),
    }
}

/// Runs the calling test inside a fresh network namespace with loopback up and the iptables nat
/// OUTPUT `rules` (each the arguments after `-A OUTPUT`) in place. Returns true when already
/// inside (`marker` set: run the test's body), false once the run inside has passed.
pub fn in_netns(marker: &str, rules: &[&[&str]]) -> bool {
    if std::env::var_os(marker).is_some() {
        return true;
    }
    let netns = Netns::create(&current_test())
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    for rule in rules {
        netns.nat_output(rule);
    }
    netns.rerun_inside(marker);
    false
}

/// A TCP connection to `dst` from the local address `source` (which the capture rules of a test
/// namespace may redirect), with a 10 s read timeout.
pub fn connect_from(source: &str, dst: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: std::net::IpAddr = source.parse().unwrap();
    socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
    socket.connect(&dst.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Source address of the tests' client application: the capture rules redirect its traffic.
pub const APP: &str = "127.0.0.5";

/// A connection from the client application to `dst`, for tokio.
pub fn app_connection(dst: SocketAddr) -> tokio::net::TcpStream {
    let stream = connect_from(APP, dst);
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

/// An HTTP/1.1 connection from the client application to `dst`.
pub async fn h1(
    dst: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<trellis_demo::body::BoxBody> {
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(app_connection(dst)))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// The runtime the async parts of a test run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An in-test mesh CA issuing workload certificates shaped like the operator's.
pub struct MeshCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl MeshCa {
    pub fn new(name: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        };
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe_id`, valid for an hour around now; returns the
    /// `--cert-chain` and `--key` files.
    pub fn workload_files(&self, spiffe_id: &str) -> (String, String) {
        let now = time::OffsetDateTime::now_utc();
        self.workload_files_valid(
            spiffe_id,
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
    }

    /// A certificate for the DNS names `dns_names` (server and client auth), valid for an hour
    /// around now, as a non-mesh TLS peer holds one; returns the chain and key files.
    pub fn dns_files(&self, dns_names: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = dns_names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = temp_path("dns-chain.pem");
        let key_file = temp_path("dns-key.pem");
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (
            chain.to_str().unwrap().to_owned(),
            key_file.to_str().unwrap().to_owned(),
        )
    }

    /// [`MeshCa::workload_files`] valid from `not_before` to `not_after` (an expired one, say).
    pub fn workload_files_valid(
        &self,
        spiffe_id: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> (String, String) {
        use rcgen::{
            CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, SanType,
        };
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = temp_path("chain.pem");
        let key_file = temp_path("key.pem");
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (
            chain.to_str().unwrap().to_owned(),
            key_file.to_str().unwrap().to_owned(),
        )
    }
}

/// An HTTP/1.1 application on every address, port `port` (keep-alive, as the proxy pools
/// connections) answering every request `200` with the request head it received (request line
/// and headers) as the body. Returns the heads it saw, so a test can prove a request never
/// reached it.
pub fn recording_http_app(port: u16) -> std::sync::Arc<parking_lot::Mutex<Vec<String>>> {
    recording_http_app_on("0.0.0.0", port)
}

/// [`recording_http_app`] listening on `ip` only (`127.0.0.1`: an application bound to loopback).
pub fn recording_http_app_on(
    ip: &str,
    port: u16,
) -> std::sync::Arc<parking_lot::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let listener = TcpListener::bind((ip, port)).unwrap();
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = std::io::BufReader::new(stream);
                loop {
                    let mut head = String::new();
                    let mut content_length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            content_length = value.trim().parse().unwrap_or(0);
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0u8; content_length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    record.lock().push(head.clone());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
                        head.len()
                    );
                    if writer.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    seen
}

/// An HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    /// 0 when the connection closed without a status line.
    pub status: u16,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `request` (a whole HTTP/1.1 request, byte for byte, so tests can send what a
/// well-behaved client library would refuse to) on a connection from `source` to `dst` and reads
/// the reply until the peer closes.
pub fn raw_request(source: &str, dst: SocketAddr, request: &str) -> RawReply {
    let mut stream = connect_from(source, dst);
    let _ = stream.write_all(request.as_bytes());
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawReply {
        status,
        headers,
        body: body.to_owned(),
    }
}
