//! What is measured: the backend, and the proxies in front of it (trellis-proxy or Envoy, one or
//! two hops, both behind the same iptables capture and both with two worker threads).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::netns::PROXY_UID;
use crate::procs::{Proc, http_status};
use crate::tools::Tools;

pub const HTTP1_PORT: u16 = 8080;
pub const HTTP2_PORT: u16 = 8081;
pub const BULK_PORT: u16 = 8082;
pub const WORKERS: &str = "2";
const RESPONSE_BYTES: usize = 1024;
const START_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Direct,
    Trellis,
    Envoy,
}

/// A system and how many proxies the request crosses (0 for the direct path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub system: System,
    pub hops: u8,
}

pub const SETUPS: [Setup; 5] = [
    Setup::new(System::Direct, 0),
    Setup::new(System::Trellis, 1),
    Setup::new(System::Envoy, 1),
    Setup::new(System::Trellis, 2),
    Setup::new(System::Envoy, 2),
];

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.system {
            System::Direct => f.write_str("direct"),
            System::Trellis => write!(f, "trellis-{}hop", self.hops),
            System::Envoy => write!(f, "envoy-{}hop", self.hops),
        }
    }
}

/// The ports of one proxy: the client side (outbound capture) or the server side (inbound).
struct Role {
    name: &'static str,
    capture: u16,
    /// trellis-proxy always binds both capture listeners; the other one goes unused.
    spare: u16,
    admin: u16,
    metrics: u16,
    readiness: u16,
    /// Source address of the connection to the backend (the inbound proxy's 127.0.0.6).
    source: Option<&'static str>,
}

const OUTBOUND: Role = Role {
    name: "outbound",
    capture: 15001,
    spare: 15016,
    admin: 15000,
    metrics: 15020,
    readiness: 15021,
    source: None,
};
const INBOUND: Role = Role {
    name: "inbound",
    capture: 15006,
    spare: 15011,
    admin: 15100,
    metrics: 15120,
    readiness: 15121,
    source: Some("127.0.0.6"),
};

impl Setup {
    pub const fn new(system: System, hops: u8) -> Self {
        Self { system, hops }
    }

    /// The address the client dials; the capture rules decide how many proxies it crosses.
    pub fn target_ip(&self) -> &'static str {
        match self.hops {
            0 => "127.0.0.2",
            1 => "127.0.0.3",
            _ => "127.0.0.4",
        }
    }

    /// Starts the setup's proxies and waits until they are ready.
    pub fn start(&self, tools: &Tools, work: &Path) -> Result<Vec<Proc>> {
        let roles: &[Role] = match self.hops {
            0 => &[],
            1 => &[OUTBOUND],
            _ => &[OUTBOUND, INBOUND],
        };
        roles
            .iter()
            .map(|role| match self.system {
                System::Direct => unreachable!("the direct path has no proxy"),
                System::Trellis => trellis(tools, work, role, &work.join("trellis.json"), &[]),
                System::Envoy => envoy(tools, work, role),
            })
            .collect()
    }
}

/// `program` run as the proxy user (whose connections the capture rules leave alone), behind
/// an optional wrapper such as valgrind.
fn as_proxy_user(wrapper: &[&str], program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"]);
    cmd.args(wrapper).arg(program);
    cmd
}

fn trellis(
    tools: &Tools,
    work: &Path,
    role: &Role,
    config: &Path,
    wrapper: &[&str],
) -> Result<Proc> {
    let mut cmd = as_proxy_user(wrapper, &tools.trellis);
    cmd.arg("sidecar").arg("--config").arg(config);
    cmd.args(["--concurrency", WORKERS, "--log-level", "warn"]);
    let (outbound, inbound) = match role.source {
        None => (role.capture, role.spare),
        Some(_) => (role.spare, role.capture),
    };
    for (flag, port) in [
        ("--outbound-port", outbound),
        ("--inbound-port", inbound),
        ("--admin-port", role.admin),
        ("--metrics-port", role.metrics),
        ("--readiness-port", role.readiness),
    ] {
        cmd.arg(flag).arg(port.to_string());
    }
    let name = format!("trellis-proxy ({})", role.name);
    let mut proc = Proc::spawn(&name, &mut cmd, &work.join("trellis.log"))?;
    let port = role.readiness;
    proc.wait_until(START_LIMIT, || {
        http_status("GET", port, "/healthz/ready") == Some(200)
    })?;
    Ok(proc)
}

/// Starts trellis-proxy as the outbound proxy with `config` (and `wrapper`), outside a setup.
pub fn trellis_with_config(
    tools: &Tools,
    work: &Path,
    config: &Path,
    wrapper: &[&str],
) -> Result<Proc> {
    trellis(tools, work, &OUTBOUND, config, wrapper)
}

/// Envoy as Istio runs it: a listener with the `original_dst` listener filter in front of a
/// `tcp_proxy` to an ORIGINAL_DST cluster, no access log, same worker count.
fn envoy(tools: &Tools, work: &Path, role: &Role) -> Result<Proc> {
    let mut cluster = json!({
        "name": "original_dst",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
    });
    if let Some(source) = role.source {
        cluster["upstream_bind_config"] =
            json!({"source_address": {"address": source, "port_value": 0}});
    }
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": role.admin}}},
        "static_resources": {
            "listeners": [{
                "name": role.name,
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": role.capture}},
                "listener_filters": [{
                    "name": "envoy.filters.listener.original_dst",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}
                }],
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": role.name,
                        "cluster": "original_dst"
                    }
                }]}]
            }],
            "clusters": [cluster]
        }
    });
    let config = work.join(format!("envoy-{}.json", role.name));
    std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
    let mut cmd = as_proxy_user(&[], &tools.envoy);
    cmd.arg("-c").arg(&config);
    cmd.args(["--concurrency", WORKERS, "--disable-hot-restart"]);
    cmd.args(["--log-level", "error"]);
    let name = format!("envoy ({})", role.name);
    let mut proc = Proc::spawn(&name, &mut cmd, &work.join("envoy.log"))?;
    let port = role.admin;
    proc.wait_until(START_LIMIT, || {
        http_status("GET", port, "/ready") == Some(200)
    })?;
    Ok(proc)
}

/// trellis-proxy's static config: the backend as a registered service on each proxied address.
/// The proxy picks the endpoint itself, so each service's one (non-meshed) endpoint is its own
/// address, where the backend listens; for the two-hop path that address is redirected again,
/// to the inbound proxy.
pub fn trellis_config() -> serde_json::Value {
    let port = |name: &str, port: u16, protocol: &str| json!({"name": name, "port": port, "targetPort": port, "protocol": protocol});
    let service = |name: &str, address: &str| {
        json!({
            "hostnames": [format!("{name}.bench.svc.cluster.local")],
            "namespace": "bench",
            "vips": [address],
            "ports": [
                port("http", HTTP1_PORT, "http"),
                port("http2", HTTP2_PORT, "http2"),
                port("tcp-bulk", BULK_PORT, "tcp"),
            ],
            "endpoints": [{"address": address, "ready": true, "meshed": false}]
        })
    };
    json!({
        "version": "bench",
        "outboundTrafficPolicy": "ALLOW_ANY",
        "services": [service("backend-1hop", "127.0.0.3"), service("backend-2hop", "127.0.0.4")]
    })
}

/// A config of `n` services, each with a VIP, a port and three endpoints.
pub fn services_config(n: u32) -> serde_json::Value {
    let services: Vec<_> = (0..n)
        .map(|i| {
            let (hi, lo) = (i / 256, i % 256);
            let endpoints: Vec<_> = (0..3)
                .map(|e| json!({"address": format!("10.{}.{hi}.{lo}", 200 + e), "ready": true,
                                "meshed": true, "labels": {"app": format!("svc-{i}")},
                                "identity": format!("spiffe://cluster.local/ns/ns-{}/sa/svc-{i}", i % 100)}))
                .collect();
            json!({
                "hostnames": [format!("svc-{i}.ns-{}.svc.cluster.local", i % 100)],
                "namespace": format!("ns-{}", i % 100),
                "vips": [format!("10.96.{hi}.{lo}")],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}],
                "endpoints": endpoints
            })
        })
        .collect();
    json!({"version": format!("services-{n}"), "services": services})
}

/// nginx as a fixed 1 KiB response server: HTTP/1.1 on 8080, HTTP/2 (prior knowledge) on 8081.
pub fn nginx(tools: &Tools, work: &Path) -> Result<Proc> {
    let dir: PathBuf = work.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let body = "x".repeat(RESPONSE_BYTES);
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log error;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
         default_type text/plain;\n  client_body_temp_path {dir};\n\
         server {{\n    listen {HTTP1_PORT};\n    listen {HTTP2_PORT} http2;\n\
         location / {{ return 200 \"{body}\"; }}\n  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(&tools.nginx);
    cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
    cmd.arg("-e").arg(dir.join("error.log"));
    let mut proc = Proc::spawn("nginx", &mut cmd, &dir.join("stdout.log"))?;
    proc.wait_until(START_LIMIT, || {
        http_status("GET", HTTP1_PORT, "/") == Some(200)
    })?;
    Ok(proc)
}
