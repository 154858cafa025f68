//! What is measured: the backend, and the proxies in front of it (trellis-proxy or Envoy, one
//! hop, two hops in plaintext, or the mesh path with mutual TLS between the two proxies; both
//! behind the same iptables capture and both with two worker threads).
//!
//! Envoy gets the configuration Istio would give it for the same job. In [`EnvoyMode::L4`] (the
//! default, trellis-proxy's own level today) that is `tcp_proxy`; [`EnvoyMode::Http`] puts
//! `http_connection_manager` + router on the HTTP ports, Envoy's fair counterpart once
//! trellis-proxy proxies declared `http` ports as HTTP.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use trellis_config::proxy::MESH_ALPN;

use crate::certs::{CertFiles, MeshCerts};
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

/// The path a request takes from the client to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No proxy: the baseline (no TLS either).
    Direct,
    /// client → proxy → backend.
    OneHop,
    /// client → outbound proxy → inbound proxy → backend, plaintext between the proxies.
    TwoHop,
    /// The mesh path: as [`Route::TwoHop`], with mutual TLS between the proxies.
    Mesh,
}

/// A system and the route through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub system: System,
    pub route: Route,
}

/// Every setup of a full run, in the order they are reported.
pub const SETUPS: [Setup; 7] = [
    Setup::new(System::Direct, Route::Direct),
    Setup::new(System::Trellis, Route::OneHop),
    Setup::new(System::Envoy, Route::OneHop),
    Setup::new(System::Trellis, Route::TwoHop),
    Setup::new(System::Envoy, Route::TwoHop),
    Setup::new(System::Trellis, Route::Mesh),
    Setup::new(System::Envoy, Route::Mesh),
];

/// The setups of a run: a quick run leaves out the plaintext two-hop path (the mesh path is the
/// one the targets name).
pub fn setups(quick: bool) -> Vec<Setup> {
    SETUPS
        .into_iter()
        .filter(|s| !quick || s.route != Route::TwoHop)
        .collect()
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let system = match self.system {
            System::Direct => return f.write_str("direct"),
            System::Trellis => "trellis",
            System::Envoy => "envoy",
        };
        let route = match self.route {
            Route::Direct | Route::OneHop => "1hop",
            Route::TwoHop => "2hop",
            Route::Mesh => "mtls",
        };
        write!(f, "{system}-{route}")
    }
}

/// How Envoy handles the HTTP ports: `tcp_proxy` (L4) or `http_connection_manager` + router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyMode {
    L4,
    Http,
}

impl EnvoyMode {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "l4" => Ok(Self::L4),
            "http" => Ok(Self::Http),
            other => bail!("--envoy {other:?}: expected `l4` or `http`"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::L4 => "l4",
            Self::Http => "http",
        }
    }
}

/// What the proxies of every setup share: the tools, the work dir, the certificates and how
/// Envoy is configured.
pub struct Bench<'a> {
    pub tools: &'a Tools,
    pub work: &'a Path,
    pub certs: &'a MeshCerts,
    pub envoy_mode: EnvoyMode,
}

/// The ports of one proxy: the client side (outbound capture) or the server side (inbound).
#[derive(Debug)]
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

impl Role {
    fn inbound(&self) -> bool {
        self.source.is_some()
    }

    /// The workload certificate this side presents.
    fn cert<'c>(&self, certs: &'c MeshCerts) -> &'c CertFiles {
        if self.inbound() {
            &certs.server
        } else {
            &certs.client
        }
    }
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
    pub const fn new(system: System, route: Route) -> Self {
        Self { system, route }
    }

    /// How many proxies a request crosses.
    pub fn hops(&self) -> u8 {
        match self.route {
            Route::Direct => 0,
            Route::OneHop => 1,
            Route::TwoHop | Route::Mesh => 2,
        }
    }

    /// The address the client dials; the capture rules decide how many proxies it crosses.
    pub fn target_ip(&self) -> &'static str {
        match self.route {
            Route::Direct => "127.0.0.2",
            Route::OneHop => "127.0.0.3",
            Route::TwoHop => "127.0.0.4",
            Route::Mesh => "127.0.0.5",
        }
    }

    fn roles(&self) -> &'static [Role] {
        match self.hops() {
            0 => &[],
            1 => &[OUTBOUND],
            _ => &[OUTBOUND, INBOUND],
        }
    }

    /// The proxies a request crosses, in order: (role name, admin port).
    pub fn proxy_roles(&self) -> Vec<(&'static str, u16)> {
        self.roles().iter().map(|r| (r.name, r.admin)).collect()
    }

    /// Starts the setup's proxies and waits until they are ready.
    pub fn start(&self, bench: &Bench) -> Result<Vec<Proc>> {
        self.start_wrapped(bench, &|_| Vec::new())
    }

    /// As [`Setup::start`], each trellis-proxy behind the wrapper (valgrind) that `wrapper`
    /// gives for its role name; Envoy is never wrapped.
    pub fn start_wrapped(
        &self,
        bench: &Bench,
        wrapper: &dyn Fn(&str) -> Vec<String>,
    ) -> Result<Vec<Proc>> {
        self.roles()
            .iter()
            .map(|role| match self.system {
                System::Direct => unreachable!("the direct path has no proxy"),
                System::Trellis => {
                    let wrapper = wrapper(role.name);
                    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
                    trellis(
                        bench.tools,
                        bench.work,
                        role,
                        &bench.work.join("trellis.json"),
                        Some(role.cert(bench.certs)),
                        &wrapper,
                    )
                }
                System::Envoy => envoy(bench, role, self.route),
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

/// trellis-proxy from a static config, with its workload certificate when given (a sidecar
/// always holds one; only meshed endpoints make it speak mutual TLS).
fn trellis(
    tools: &Tools,
    work: &Path,
    role: &Role,
    config: &Path,
    cert: Option<&CertFiles>,
    wrapper: &[&str],
) -> Result<Proc> {
    let mut cmd = as_proxy_user(wrapper, &tools.trellis);
    cmd.arg("sidecar").arg("--config").arg(config);
    if let Some(cert) = cert {
        cmd.arg("--cert-chain").arg(&cert.chain);
        cmd.arg("--key").arg(&cert.key);
    }
    // Access logs off for both proxies (Envoy's bootstraps configure none).
    cmd.args([
        "--concurrency",
        WORKERS,
        "--log-level",
        "warn",
        "--access-log",
        "false",
    ]);
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
    trellis(tools, work, &OUTBOUND, config, None, wrapper)
}

fn envoy(bench: &Bench, role: &Role, route: Route) -> Result<Proc> {
    let bootstrap = envoy_bootstrap(role, route, bench.certs, bench.envoy_mode);
    let config = bench.work.join(format!(
        "envoy-{}-{}-{}.json",
        role.name,
        route_name(route),
        bench.envoy_mode.name()
    ));
    std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
    let mut cmd = as_proxy_user(&[], &bench.tools.envoy);
    cmd.arg("-c").arg(&config);
    cmd.args(["--concurrency", WORKERS, "--disable-hot-restart"]);
    cmd.args(["--log-level", "error"]);
    let name = format!("envoy ({})", role.name);
    let mut proc = Proc::spawn(&name, &mut cmd, &bench.work.join("envoy.log"))?;
    let port = role.admin;
    proc.wait_until(START_LIMIT, || {
        http_status("GET", port, "/ready") == Some(200)
    })?;
    Ok(proc)
}

fn route_name(route: Route) -> &'static str {
    match route {
        Route::Direct => "direct",
        Route::OneHop => "1hop",
        Route::TwoHop => "2hop",
        Route::Mesh => "mtls",
    }
}

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

fn mesh_alpn() -> String {
    String::from_utf8_lossy(MESH_ALPN).into_owned()
}

/// TLS 1.3 only, the mesh ALPN, our workload certificate, peers verified against the root and
/// by SPIFFE URI SAN — what trellis-proxy's `mtls` module does.
fn common_tls(cert: &CertFiles, root: &Path, peer_san: Value) -> Value {
    json!({
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3"
        },
        "alpn_protocols": [mesh_alpn()],
        "tls_certificates": [{
            "certificate_chain": {"filename": cert.chain},
            "private_key": {"filename": cert.key}
        }],
        "validation_context": {
            "trusted_ca": {"filename": root},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}]
        }
    })
}

/// Envoy as Istio runs it: a listener with the `original_dst` listener filter (and, on the
/// inbound side, `tls_inspector` to tell mesh TLS from plaintext, as in PERMISSIVE mode) in
/// front of an ORIGINAL_DST cluster, no access log. On the mesh route the outbound cluster
/// originates mutual TLS (client certificate, server verified by its SPIFFE ID, no session
/// resumption — trellis-proxy resumes none either) and the inbound listener terminates it
/// (client certificate required and verified against the root).
fn envoy_bootstrap(role: &Role, route: Route, certs: &MeshCerts, mode: EnvoyMode) -> Value {
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
    if mode == EnvoyMode::Http {
        // HTTP/1.1 upstream for HTTP/1.1 downstream, HTTP/2 for HTTP/2, as Istio's inbound.
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "use_downstream_protocol_config": {
                    "http_protocol_options": {},
                    "http2_protocol_options": {}
                }
            }
        });
    }
    if route == Route::Mesh && !role.inbound() {
        cluster["transport_socket"] = json!({
            "name": TLS_SOCKET,
            "typed_config": {
                "@type": UPSTREAM_TLS,
                "sni": "backend-mtls.bench.svc.cluster.local",
                "max_session_keys": 0,
                "common_tls_context": common_tls(
                    &certs.client,
                    &certs.root,
                    json!({"exact": certs.server.spiffe_id}),
                )
            }
        });
    }
    let mut listener_filters = vec![json!({
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}
    })];
    let mut filter_chains = Vec::new();
    if role.inbound() {
        listener_filters.push(json!({
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
        }));
        let terminate = json!({
            "name": TLS_SOCKET,
            "typed_config": {
                "@type": DOWNSTREAM_TLS,
                "require_client_certificate": true,
                "common_tls_context": common_tls(
                    &certs.server,
                    &certs.root,
                    json!({"prefix": format!("spiffe://{}/", crate::certs::TRUST_DOMAIN)}),
                )
            }
        });
        let mesh_tls = json!({"transport_protocol": "tls", "application_protocols": [mesh_alpn()]});
        filter_chains.extend(chains(role, mode, Some((&mesh_tls, &terminate))));
    }
    filter_chains.extend(chains(role, mode, None));
    let mut listener = json!({
        "name": role.name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": role.capture}},
        "listener_filters": listener_filters,
        "filter_chains": filter_chains
    });
    if role.inbound() {
        // A client that sends nothing first (server-speaks-first, like the bulk test) is
        // treated as plaintext after the same wait as trellis-proxy's sniffing.
        listener["listener_filters_timeout"] = json!(format!(
            "{}s",
            trellis_proxy::sniff::FIRST_BYTE_TIMEOUT.as_secs_f64()
        ));
        listener["continue_on_listener_filters_timeout"] = json!(true);
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": role.admin}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [cluster]
        }
    })
}

/// The filter chains of one listener for connections that match `tls` (a filter-chain match
/// and the transport socket terminating it), or plaintext ones when `tls` is `None`. In HTTP
/// mode the two HTTP ports get the HTTP router and every other port `tcp_proxy`.
fn chains(role: &Role, mode: EnvoyMode, tls: Option<(&Value, &Value)>) -> Vec<Value> {
    let base_match = || tls.map_or_else(|| json!({}), |(m, _)| m.clone());
    let with_tls = |mut chain: Value| {
        if let Some((_, socket)) = tls {
            chain["transport_socket"] = socket.clone();
        }
        chain
    };
    let tcp_proxy = json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": role.name,
            "cluster": "original_dst"
        }
    });
    let mut out = Vec::new();
    if mode == EnvoyMode::Http {
        for (port, codec) in [(HTTP1_PORT, "HTTP1"), (HTTP2_PORT, "HTTP2")] {
            let mut matcher = base_match();
            matcher["destination_port"] = json!(port);
            out.push(with_tls(json!({
                "filter_chain_match": matcher,
                "filters": [http_router(role, codec)]
            })));
        }
    }
    let matcher = base_match();
    let mut chain = json!({"filters": [tcp_proxy]});
    if matcher.as_object().is_some_and(|m| !m.is_empty()) {
        chain["filter_chain_match"] = matcher;
    }
    out.push(with_tls(chain));
    out
}

/// `http_connection_manager` with one catch-all route to the ORIGINAL_DST cluster, no access
/// log. The codec is the port's (HTTP/1.1 or HTTP/2 prior knowledge): `AUTO` would follow the
/// TLS ALPN, which on the mesh path is `trellis-mtls`, and so read HTTP/2 as HTTP/1.1.
fn http_router(role: &Role, codec: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": role.name,
            "codec_type": codec,
            "route_config": {
                "name": "all",
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "original_dst"}}]
                }]
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
            }]
        }
    })
}

/// trellis-proxy's static config: the backend as a registered service on each proxied address.
/// The proxy picks the endpoint itself, so each service's one endpoint is its own address, where
/// the backend listens; for the two-hop paths that address is redirected again, to the inbound
/// proxy. The mesh path's endpoint is meshed and names the server's SPIFFE ID, so the outbound
/// proxy originates mutual TLS to it; the trust bundle verifies both sides.
pub fn trellis_config(certs: &MeshCerts) -> Value {
    let port = |name: &str, port: u16, protocol: &str| json!({"name": name, "port": port, "targetPort": port, "protocol": protocol});
    let service = |name: &str, address: &str, identity: Option<&str>| {
        let mut endpoint = json!({"address": address, "ready": true, "meshed": identity.is_some()});
        if let Some(identity) = identity {
            endpoint["identity"] = json!(identity);
        }
        json!({
            "hostnames": [format!("{name}.bench.svc.cluster.local")],
            "namespace": "bench",
            "vips": [address],
            "ports": [
                port("http", HTTP1_PORT, "http"),
                port("http2", HTTP2_PORT, "http2"),
                port("tcp-bulk", BULK_PORT, "tcp"),
            ],
            "endpoints": [endpoint]
        })
    };
    let mesh = Setup::new(System::Trellis, Route::Mesh).target_ip();
    json!({
        "version": "bench",
        "outboundTrafficPolicy": "ALLOW_ANY",
        "trustBundle": [certs.root_pem],
        "services": [
            service("backend-1hop", Setup::new(System::Trellis, Route::OneHop).target_ip(), None),
            service("backend-2hop", Setup::new(System::Trellis, Route::TwoHop).target_ip(), None),
            service("backend-mtls", mesh, Some(&certs.server.spiffe_id)),
        ]
    })
}

/// A config of `n` services, each with a VIP, a port and three endpoints.
pub fn services_config(n: u32) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> MeshCerts {
        let files = |sa: &str| CertFiles {
            spiffe_id: format!("spiffe://cluster.local/ns/bench/sa/{sa}"),
            chain: format!("/certs/{sa}.pem").into(),
            key: format!("/certs/{sa}-key.pem").into(),
        };
        MeshCerts {
            root: "/certs/root-cert.pem".into(),
            root_pem: "ROOT".into(),
            client: files("client"),
            server: files("server"),
        }
    }

    /// (transport socket of the cluster, filter chains as (match, tls?, first filter)).
    fn shape(config: &Value) -> (Option<Value>, Vec<(Value, bool, String)>) {
        let cluster = &config["static_resources"]["clusters"][0];
        let chains = config["static_resources"]["listeners"][0]["filter_chains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["filter_chain_match"].clone(),
                    !c["transport_socket"].is_null(),
                    c["filters"][0]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let socket = cluster.get("transport_socket").cloned();
        (socket, chains)
    }

    const TCP: &str = "envoy.filters.network.tcp_proxy";
    const HCM: &str = "envoy.filters.network.http_connection_manager";

    /// An expected filter chain: its match, whether it terminates TLS, its first filter.
    type Chain = (Value, bool, &'static str);
    /// (role, route, mode, whether the cluster originates TLS, the listener's chains).
    type Case = (&'static Role, Route, EnvoyMode, bool, Vec<Chain>);

    #[test]
    fn envoy_originates_mtls_only_on_the_mesh_route_and_terminates_it_inbound() {
        let certs = certs();
        let mesh_tls =
            json!({"transport_protocol": "tls", "application_protocols": ["trellis-mtls"]});
        // (role, route, mode, cluster originates TLS, chains)
        let table: Vec<Case> = vec![
            (
                &OUTBOUND,
                Route::OneHop,
                EnvoyMode::L4,
                false,
                vec![(Value::Null, false, TCP)],
            ),
            (
                &OUTBOUND,
                Route::TwoHop,
                EnvoyMode::L4,
                false,
                vec![(Value::Null, false, TCP)],
            ),
            (
                &OUTBOUND,
                Route::Mesh,
                EnvoyMode::L4,
                true,
                vec![(Value::Null, false, TCP)],
            ),
            (
                &INBOUND,
                Route::Mesh,
                EnvoyMode::L4,
                false,
                vec![(mesh_tls.clone(), true, TCP), (Value::Null, false, TCP)],
            ),
            (
                &OUTBOUND,
                Route::Mesh,
                EnvoyMode::Http,
                true,
                vec![
                    (json!({"destination_port": 8080}), false, HCM),
                    (json!({"destination_port": 8081}), false, HCM),
                    (Value::Null, false, TCP),
                ],
            ),
            (
                &INBOUND,
                Route::TwoHop,
                EnvoyMode::Http,
                false,
                vec![
                    (
                        json!({"transport_protocol": "tls", "application_protocols": ["trellis-mtls"], "destination_port": 8080}),
                        true,
                        HCM,
                    ),
                    (
                        json!({"transport_protocol": "tls", "application_protocols": ["trellis-mtls"], "destination_port": 8081}),
                        true,
                        HCM,
                    ),
                    (mesh_tls.clone(), true, TCP),
                    (json!({"destination_port": 8080}), false, HCM),
                    (json!({"destination_port": 8081}), false, HCM),
                    (Value::Null, false, TCP),
                ],
            ),
        ];
        for (role, route, mode, originates, chains) in table {
            let config = envoy_bootstrap(role, route, &certs, mode);
            let (socket, got) = shape(&config);
            let case = format!("{} {route:?} {mode:?}", role.name);
            assert_eq!(socket.is_some(), originates, "{case}");
            let expected: Vec<(Value, bool, String)> = chains
                .into_iter()
                .map(|(m, t, f)| (m, t, f.to_owned()))
                .collect();
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn envoy_tls_matches_trellis_mesh_tls() {
        let certs = certs();
        let outbound = envoy_bootstrap(&OUTBOUND, Route::Mesh, &certs, EnvoyMode::L4);
        let upstream =
            &outbound["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(upstream["max_session_keys"], 0);
        let common = &upstream["common_tls_context"];
        assert_eq!(
            common["tls_params"]["tls_minimum_protocol_version"],
            "TLSv1_3"
        );
        assert_eq!(common["alpn_protocols"], json!(["trellis-mtls"]));
        assert_eq!(
            common["tls_certificates"][0]["certificate_chain"]["filename"],
            "/certs/client.pem"
        );
        assert_eq!(
            common["validation_context"]["match_typed_subject_alt_names"],
            json!([{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/bench/sa/server"}}])
        );

        let inbound = envoy_bootstrap(&INBOUND, Route::Mesh, &certs, EnvoyMode::L4);
        let listener = &inbound["static_resources"]["listeners"][0];
        let downstream = &listener["filter_chains"][0]["transport_socket"]["typed_config"];
        assert_eq!(downstream["require_client_certificate"], true);
        assert_eq!(
            downstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"],
            "/certs/root-cert.pem"
        );
        assert_eq!(
            downstream["common_tls_context"]["tls_certificates"][0]["private_key"]["filename"],
            "/certs/server-key.pem"
        );
        assert_eq!(
            inbound["static_resources"]["clusters"][0]["upstream_bind_config"]["source_address"]["address"],
            "127.0.0.6"
        );
        let http = envoy_bootstrap(&INBOUND, Route::Mesh, &certs, EnvoyMode::Http);
        let chains = &http["static_resources"]["listeners"][0]["filter_chains"];
        let codecs: Vec<&str> = (0..2)
            .map(|i| {
                chains[i]["filters"][0]["typed_config"]["codec_type"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(codecs, ["HTTP1", "HTTP2"]);
        assert_eq!(listener["listener_filters_timeout"], "0.5s");
        assert_eq!(listener["continue_on_listener_filters_timeout"], true);
        let filters: Vec<&str> = listener["listener_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            filters,
            [
                "envoy.filters.listener.original_dst",
                "envoy.filters.listener.tls_inspector"
            ]
        );
    }

    /// Every bootstrap the runner can write passes `envoy --mode validate` (certificates
    /// loaded, filter chains unique). Needs the Envoy the runner installs under the target dir.
    #[test]
    fn envoy_accepts_every_bootstrap() {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        let envoy = Tools::locate(&target).envoy;
        if !envoy.exists() {
            eprintln!(
                "skipped: {} is not installed (make bench-quick installs it)",
                envoy.display()
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("trellis-bench-envoy-{}", std::process::id()));
        let certs = MeshCerts::issue(&dir).unwrap();
        for mode in [EnvoyMode::L4, EnvoyMode::Http] {
            for route in [Route::OneHop, Route::TwoHop, Route::Mesh] {
                for role in [&OUTBOUND, &INBOUND] {
                    let path = dir.join(format!("{}-{route:?}-{mode:?}.json", role.name));
                    let config = envoy_bootstrap(role, route, &certs, mode);
                    std::fs::write(&path, config.to_string()).unwrap();
                    let out = Command::new(&envoy)
                        .args(["--mode", "validate", "-c"])
                        .arg(&path)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn trellis_meshes_only_the_mesh_route() {
        let config = trellis_config(&certs());
        let parsed =
            trellis_config::proxy::ProxyConfig::from_json(config.to_string().as_bytes()).unwrap();
        let meshed: Vec<(String, bool, Option<String>)> = parsed
            .services
            .iter()
            .map(|s| {
                (
                    s.vips[0].to_string(),
                    s.endpoints[0].meshed,
                    s.endpoints[0].identity.clone(),
                )
            })
            .collect();
        assert_eq!(
            meshed,
            [
                ("127.0.0.3".to_owned(), false, None),
                ("127.0.0.4".to_owned(), false, None),
                (
                    "127.0.0.5".to_owned(),
                    true,
                    Some("spiffe://cluster.local/ns/bench/sa/server".to_owned())
                ),
            ]
        );
        assert_eq!(parsed.trust_bundle, ["ROOT"]);
    }
}
