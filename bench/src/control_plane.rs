//! The control-plane benchmarks, against the real `trellis-operator run` binary (an ordinary
//! process, the leader of a private API server — see [`crate::apiserver`] for why not the shared
//! cluster): config propagation to N simulated proxies over the real protocol, the operator's
//! memory with 1,000 Services / 10,000 endpoints, and the CSR signing rate (TokenReview
//! included). Also records whether a replica that is not the leader serves 15012, and profiles
//! the operator with perf during a propagation round (`profile-operator.txt`): where its CPU per
//! change goes (snapshot compile, JSON encoding, TLS, HTTP/2 framing, kube watch handling).
//!
//! Runs inside its own network namespace (`--inside-control-plane`), so the operator's fixed
//! ports (15012, 15017, 8080) and the API server's cannot collide with anything on the host.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use trellis_config::SpiffeId;
use trellis_config::protocol::ControlMessage;
use trellis_config::wellknown::{CONTROL_PLANE_PORT, OPERATOR_NAMESPACE, TOKEN_AUDIENCE};
use trellis_proxy::identity::Identity;

use crate::Plan;
use crate::apiserver::ApiServer;
use crate::cp_client::{ConfigStream, ControlPlane, Signed, pod_name, source_address};
use crate::perf::{self, Category, Recording};
use crate::procs::{Proc, cpu_ticks, http_status, status_kib};
use crate::report::{cp_markdown, merge_section, operator_profile_markdown};
use crate::tools;

pub const SERVICES: usize = 1000;
pub const ENDPOINTS_PER_SERVICE: usize = 10;
pub const PROXY_COUNTS: [usize; 2] = [100, 1000];
/// Resource changes per proxy count; every proxy yields one latency sample per change.
pub const CHANGES: usize = 5;
/// (concurrent clients, certificate requests) of the CSR signing runs.
pub const CSR_RUNS: [(usize, usize); 3] = [(1, 100), (8, 300), (32, 1000)];
pub const NAMESPACE: &str = "trellis-bench-cp";
const SERVICE_ACCOUNT: &str = "bench-proxy";
const OPERATOR_POD: &str = "trellis-bench-operator";
const LEASE: &str = "trellis-operator-leader";
/// The operator's `/healthz`, `/readyz`, `/metrics` port (its manifest's HEALTH_PORT).
const HEALTH_PORT: u16 = 8080;
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
const SYNC_LIMIT: Duration = Duration::from_secs(300);
/// Concurrent connection set-ups while proxies join (a rollout, not a thundering herd).
const JOIN_CONCURRENCY: usize = 64;
/// Proxies of the profiled propagation round: the count the propagation target names (perf
/// slows the operator little enough for it).
pub const PROFILE_PROXIES: usize = 1000;

/// The operator's code by what it does for a change; a frame's first matching category wins,
/// a sample takes the category of its innermost matching frame.
pub const OPERATOR_CATEGORIES: &[Category] = &[
    Category {
        name: "JSON encoding (serde_json::ser)",
        patterns: &["serde_json::ser", "ser::Serialize", "encode_line"],
    },
    Category {
        name: "per-stream config (stream_to: inbound policy, version, config copy)",
        patterns: &[
            "stream_to",
            "config_stream",
            "inbound_policy",
            "for_workload",
            "workload_version",
            "with_traffic",
            "for_namespace",
            "traffic::versioned",
        ],
    },
    Category {
        name: "snapshot compile (publish_snapshots)",
        patterns: &[
            "trellis_operator::compile",
            "publish_snapshots",
            "TrafficIndex",
            "PolicyIndex",
        ],
    },
    Category {
        name: "TLS (rustls, ring)",
        patterns: &["rustls::", "tokio_rustls::", "ring::", "ring_core_"],
    },
    // Before HTTP/2: the API client's HTTP/1.1 frames are watch handling.
    Category {
        name: "kube watch handling (kube, k8s-openapi, discovery)",
        patterns: &[
            "kube_runtime::",
            "kube_client::",
            "kube::",
            "k8s_openapi::",
            "trellis_operator::discovery",
            "hyper::proto::h1",
            "hyper_util::client",
        ],
    },
    Category {
        name: "HTTP/2 framing (h2, hyper)",
        patterns: &["h2::", "hyper::"],
    },
    Category {
        name: "async runtime (tokio scheduler, channels, timers)",
        patterns: &["tokio::runtime", "tokio::sync", "tokio::time"],
    },
];

pub fn run(plan: Plan, target: &Path, out: &Path) -> Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let facts = crate::machine_facts_control_plane(target);
    let (results, profile) = runtime.block_on(bench(target, plan.profile_only))?;
    std::fs::create_dir_all(out)?;
    if let Some(results) = results {
        let results = json!({"facts": facts, "plan": {"envoy_mode": plan.envoy_mode.name()}, "results": results});
        std::fs::write(
            out.join("control-plane.json"),
            serde_json::to_vec_pretty(&results)?,
        )?;
        merge_section(
            &out.join("RESULTS.md"),
            crate::report::CP_BEGIN,
            crate::report::CP_END,
            &cp_markdown(&results),
        )?;
        eprintln!(
            "bench: wrote the control-plane results to {}",
            out.display()
        );
    }
    // After the measured results are written, so a failing profiler cannot lose them.
    let profile = profile?;
    let command = if plan.profile_only {
        "make bench-profile"
    } else {
        "make bench"
    };
    std::fs::write(
        out.join("profile-operator.txt"),
        perf::text(
            &format!(
                "trellis-operator during config propagation to {PROFILE_PROXIES} proxies ({CHANGES} changes)"
            ),
            &profile["profile"],
        ),
    )?;
    merge_section(
        &out.join("RESULTS.md"),
        crate::report::OPERATOR_PROFILE_BEGIN,
        crate::report::OPERATOR_PROFILE_END,
        &operator_profile_markdown(command, &facts, &profile),
    )?;
    eprintln!("bench: wrote the operator profile to {}", out.display());
    Ok(())
}

/// The measurements (none with `profile_only`) and the operator's profile, which may have
/// failed on its own.
async fn bench(target: &Path, profile_only: bool) -> Result<(Option<Value>, Result<Value>)> {
    let work = target.join("bench/control-plane");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // etcd on tmpfs: the benchmark measures the operator, not this VM's disk.
    let data = PathBuf::from(format!(
        "/dev/shm/trellis-bench-etcd-{}",
        std::process::id()
    ));
    let _data_guard = RemoveDir(data.clone());

    eprintln!("bench/cp: private etcd + kube-apiserver");
    let api = ApiServer::start(&tools::kube_bin(), &work, &data)?;
    let client = kube_client(&api.kubeconfig).await?;
    let operator_bin = target.join("release/trellis-operator");
    let manifests = std::process::Command::new(&operator_bin)
        .arg("manifests")
        .output()
        .with_context(|| format!("{} manifests", operator_bin.display()))?;
    api.apply(&String::from_utf8_lossy(&manifests.stdout))?;
    api.wait(&["crd", "--all"], "established", Duration::from_secs(60))?;
    let mesh = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/manifests/mesh.yaml"),
    )?
    .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    api.apply(&mesh)?;
    prepare_namespace(&client).await?;
    create_pods(
        &client,
        PROXY_COUNTS
            .into_iter()
            .chain([PROFILE_PROXIES])
            .max()
            .unwrap_or(0),
    )
    .await?;

    eprintln!("bench/cp: {SERVICES} Services with {ENDPOINTS_PER_SERVICE} endpoints each");
    let (slices, slice_version) = slice_api(&client).await;
    let started = Instant::now();
    create_services(&client, &slices, &slice_version).await?;
    let created_s = started.elapsed().as_secs_f64();

    // Someone else holds the lease: the operator starts as a follower.
    let leases = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    leases
        .create(&PostParams::default(), &foreign_lease())
        .await
        .context("creating the foreign lease")?;
    let started = Instant::now();
    let mut operator = start_operator(&operator_bin, &api.kubeconfig, &work)?;
    operator.wait_until(SYNC_LIMIT, || {
        http_status("GET", HEALTH_PORT, "/readyz") == Some(200)
    })?;
    let ready_s = started.elapsed().as_secs_f64();
    let follower = follower_check(&api).await;
    eprintln!("bench/cp: follower replica on 15012: {follower}");

    leases
        .delete(LEASE, &DeleteParams::default())
        .await
        .context("deleting the foreign lease")?;
    let started = Instant::now();
    let control_plane = wait_serving(&client, &operator).await?;
    let leader_s = started.elapsed().as_secs_f64();
    let pid = operator.pid();
    let idle = memory(pid)?;
    eprintln!(
        "bench/cp: leader serving after {leader_s:.1} s; operator RSS {:.1} MB",
        idle["rss_kib"].as_f64().unwrap_or(0.0) / 1000.0
    );

    let token = token(&client).await?;
    let mut csr_runs = Vec::new();
    let mut identities = Vec::new();
    // A profile needs only the certificates (those of the largest run, as the measurement uses).
    let csr_plan = if profile_only {
        &CSR_RUNS[CSR_RUNS.len() - 1..]
    } else {
        &CSR_RUNS[..]
    };
    for &(clients, requests) in csr_plan {
        let (row, issued) = csr_run(&control_plane, &token, clients, requests, pid).await?;
        eprintln!("bench/cp: CSR signing with {clients} clients: {row}");
        csr_runs.push(row);
        identities = issued;
    }
    let identities: Vec<Arc<Identity>> = identities.into_iter().map(Arc::new).collect();

    let mut propagation = Vec::new();
    let measured = if profile_only { 0 } else { PROXY_COUNTS.len() };
    for (round, proxies) in PROXY_COUNTS.into_iter().enumerate().take(measured) {
        let row = propagate(
            &control_plane,
            &slices,
            &identities,
            proxies,
            round * CHANGES,
            pid,
            None,
        )
        .await?;
        eprintln!("bench/cp: propagation to {proxies} proxies: {row}");
        propagation.push(row);
    }
    let after = memory(pid)?;
    eprintln!("bench/cp: perf profile of the operator, propagation to {PROFILE_PROXIES} proxies");
    let data = work.join("perf-operator.data");
    let profile = propagate(
        &control_plane,
        &slices,
        &identities,
        PROFILE_PROXIES,
        PROXY_COUNTS.len() * CHANGES,
        pid,
        Some(&data),
    )
    .await
    .and_then(|row| {
        let samples = tokio::task::block_in_place(|| perf::samples(&data))?;
        Ok(json!({"propagation": row, "profile": perf::summary(&samples, OPERATOR_CATEGORIES)}))
    });
    drop(operator);
    drop(api);
    if profile_only {
        return Ok((None, profile));
    }
    let results = json!({
        "services": SERVICES,
        "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
        "objects_created_s": created_s,
        "operator_ready_s": ready_s,
        "follower_15012": follower,
        "leader_serving_after_s": leader_s,
        "operator_memory_idle": idle,
        "operator_memory_end": after,
        "csr": csr_runs,
        "propagation": propagation,
    });
    Ok((Some(results), profile))
}

/// Removes a directory when dropped (the tmpfs etcd data).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn kube_client(kubeconfig: &Path) -> Result<Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

fn start_operator(bin: &Path, kubeconfig: &Path, work: &Path) -> Result<Proc> {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("run")
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
        .env("POD_NAME", OPERATOR_POD)
        // The level the install manifest gives the in-cluster operator.
        .env("RUST_LOG", "info");
    Proc::spawn("trellis-operator", &mut cmd, &work.join("operator.log"))
}

fn foreign_lease() -> Lease {
    let now = MicroTime(jiff::Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("bench-foreign-leader".to_owned()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    }
}

/// What a TLS client sees on 15012 of a replica that is not the leader: the handshake's outcome
/// after the replica reported ready. Trusts the API server's CA only, so a replica serving any
/// certificate fails verification ("invalid peer certificate") while one serving nothing closes
/// the connection.
async fn follower_check(api: &ApiServer) -> String {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ca = std::fs::read_to_string(api.kubeconfig.with_file_name("ca.crt")).unwrap_or_default();
    let outcome = match ControlPlane::new(local(CONTROL_PLANE_PORT), &[ca]) {
        Ok(cp) => cp.handshake().await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => "serves TLS".to_owned(),
        Err(e) => format!("does not serve: {e:#}"),
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Waits until the operator, now leader, has created the mesh CA and serves 15012 with a
/// certificate from it.
async fn wait_serving(client: &Client, operator: &Proc) -> Result<ControlPlane> {
    let secrets = Api::<Secret>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            bail!(
                "{} did not serve 15012 within 120 s of taking the lease",
                operator.name
            );
        }
        let root = secrets
            .get_opt(trellis_operator::controller::CA_SECRET)
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get(trellis_operator::ca::ROOT_CERT_KEY).cloned())
            .map(|b| String::from_utf8_lossy(&b.0).into_owned());
        if let Some(root) = root {
            let cp = ControlPlane::new(local(CONTROL_PLANE_PORT), &[root])?;
            if cp.handshake().await.is_ok() {
                return Ok(cp);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn memory(pid: u32) -> Result<Value> {
    Ok(json!({
        "rss_kib": status_kib(pid, "VmRSS")?,
        "hwm_kib": status_kib(pid, "VmHWM")?,
    }))
}

async fn prepare_namespace(client: &Client) -> Result<()> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": SERVICE_ACCOUNT}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &account)
        .await?;
    Ok(())
}

/// A pod for each of `count` simulated proxies: the operator serves a config stream only to the
/// proxy of the pod it names, under that pod's ServiceAccount and from that pod's IP. No kubelet
/// runs here, so the IP is written through the status subresource.
async fn create_pods(client: &Client, count: usize) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = pod_name(i);
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {
                        "serviceAccountName": SERVICE_ACCOUNT,
                        // No token Secrets exist here (no controller manager).
                        "automountServiceAccountToken": false,
                        "containers": [{"name": "app", "image": "app"}],
                    },
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                let ip = source_address(i).to_string();
                let status =
                    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the simulated proxies' pods")?;
    Ok(())
}

/// EndpointSlices as the server serves them (`v1beta1` on Kubernetes 1.20), and that
/// apiVersion.
async fn slice_api(client: &Client) -> (Api<DynamicObject>, String) {
    let version = trellis_operator::discovery::endpoint_slice_version(client).await;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    );
    (
        Api::namespaced_with(client.clone(), NAMESPACE, &resource),
        resource.api_version,
    )
}

fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// Endpoint addresses of service `i` (10,000 distinct ones overall), plus `extra`.
fn slice_endpoints(i: usize, extra: Option<&str>) -> Value {
    let mut endpoints: Vec<Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            let address = format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1);
            json!({"addresses": [address], "conditions": {"ready": true}})
        })
        .collect();
    if let Some(extra) = extra {
        endpoints.push(json!({"addresses": [extra], "conditions": {"ready": true}}));
    }
    Value::Array(endpoints)
}

async fn create_services(
    client: &Client,
    slices: &Api<DynamicObject>,
    api_version: &str,
) -> Result<()> {
    let services = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let services = services.clone();
            let slices = slices.clone();
            async move {
                let name = service_name(i);
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                }))?;
                services.create(&PostParams::default(), &service).await?;
                let slice: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": api_version,
                    "kind": "EndpointSlice",
                    "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": slice_endpoints(i, None),
                }))?;
                slices.create(&PostParams::default(), &slice).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the benchmark's Services and EndpointSlices")?;
    Ok(())
}

/// A projected-style ServiceAccount token for the trellis audience (TokenRequest API).
async fn token(client: &Client) -> Result<String> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .context("TokenRequest")?;
    answer
        .status
        .and_then(|s| s.token)
        .context("TokenRequest answered without a token")
}

fn spiffe_id() -> SpiffeId {
    SpiffeId::new("cluster.local", NAMESPACE, SERVICE_ACCOUNT)
}

/// `requests` certificate requests from `clients` concurrent clients, each request on its own
/// connection with a fresh key (as a proxy does). A throttled request (429) is counted and
/// retried after its `Retry-After`; its latency counts from the first attempt.
async fn csr_run(
    cp: &ControlPlane,
    token: &str,
    clients: usize,
    requests: usize,
    operator: u32,
) -> Result<(Value, Vec<Identity>)> {
    // Request numbers double as the simulated proxy (and so the source address) asking.
    let next = Arc::new(AtomicUsize::new(0));
    let throttled = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_ticks(operator)?;
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (cp, token, next, throttled) = (
                cp.clone(),
                token.to_owned(),
                next.clone(),
                throttled.clone(),
            );
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let proxy = next.fetch_add(1, Ordering::Relaxed);
                    if proxy >= requests {
                        break;
                    }
                    let sent = Instant::now();
                    loop {
                        match cp.request_certificate(&token, &spiffe_id(), proxy).await? {
                            Signed::Issued(identity) => {
                                done.push((sent.elapsed(), *identity));
                                break;
                            }
                            Signed::Throttled(retry_after) => {
                                throttled.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(retry_after).await;
                            }
                        }
                    }
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    let mut identities = Vec::with_capacity(requests);
    for worker in workers {
        for (latency, identity) in worker.await?? {
            latencies.push(latency.as_secs_f64() * 1000.0);
            identities.push(identity);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(operator)? - cpu_before) as f64 / crate::clock_ticks_per_second();
    let row = json!({
        "clients": clients,
        "signed": identities.len(),
        "seconds": elapsed,
        "per_sec": identities.len() as f64 / elapsed,
        "latency_ms": percentiles(&mut latencies),
        "throttled": throttled.load(Ordering::Relaxed),
        "operator_cpu_ms_per_cert": cpu_s * 1000.0 / identities.len().max(1) as f64,
    });
    Ok((row, identities))
}

/// p50, p90, p99 and max of `values` (sorted in place).
pub fn percentiles(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| -> Value {
        if values.is_empty() {
            return Value::Null;
        }
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        json!(values[rank - 1])
    };
    json!({"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)})
}

/// What the simulated proxies report to the coordinator.
enum Event {
    /// The first snapshot arrived, decoded and validated; its size in bytes.
    Synced(usize),
    /// The snapshot carrying change `change` arrived at this instant.
    Received {
        change: usize,
        at: Instant,
    },
    /// Proxy 0's cost to decode and validate one changed snapshot, as a real proxy does.
    ApplyCost(Duration),
    Failed(String),
}

/// Opens `proxies` config streams, waits until each has its first snapshot, then makes
/// [`CHANGES`] changes one after the other (an endpoint added to one EndpointSlice) and
/// measures, per proxy, the time from the API write to the snapshot containing it. With
/// `profile`, the operator runs under `perf record` (written there) during the changes only.
async fn propagate(
    cp: &ControlPlane,
    slices: &Api<DynamicObject>,
    identities: &[Arc<Identity>],
    proxies: usize,
    first_change: usize,
    operator: u32,
    profile: Option<&Path>,
) -> Result<Value> {
    if identities.is_empty() {
        bail!("no workload certificates to connect with");
    }
    // (change number, marker): the changed endpoint's address as it appears in the JSON.
    let (marker_tx, marker_rx) = watch::channel(None::<(usize, Vec<u8>)>);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let joining = Arc::new(tokio::sync::Semaphore::new(JOIN_CONCURRENCY));
    let started = Instant::now();
    let tasks: Vec<_> = (0..proxies)
        .map(|i| {
            let identity = identities[i % identities.len()].clone();
            let (cp, marker_rx, events_tx, joining) = (
                cp.clone(),
                marker_rx.clone(),
                events_tx.clone(),
                joining.clone(),
            );
            tokio::spawn(async move {
                let result = simulate_proxy(i, &cp, &identity, marker_rx, &events_tx, &joining);
                if let Err(e) = result.await {
                    let _ = events_tx.send((i, Event::Failed(format!("{e:#}"))));
                }
            })
        })
        .collect();
    let _abort = AbortOnDrop(tasks);

    let mut snapshot_bytes = 0;
    let mut synced = 0;
    while synced < proxies {
        match tokio::time::timeout_at((started + SYNC_LIMIT).into(), events.recv()).await {
            Ok(Some((_, Event::Synced(bytes)))) => {
                synced += 1;
                snapshot_bytes = bytes;
            }
            Ok(Some((i, Event::Failed(e)))) => bail!("simulated proxy {i}: {e}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                bail!("only {synced} of {proxies} proxies synced within {SYNC_LIMIT:?}")
            }
        }
    }
    let sync_s = started.elapsed().as_secs_f64();
    let synced_memory = memory(operator)?;
    let recording = profile
        .map(|data| tokio::task::block_in_place(|| Recording::attach(operator, data)))
        .transpose()?;
    let client_cpu_before = cpu_ticks(std::process::id())?;
    let cpu_before = cpu_ticks(operator)?;

    let mut latencies = Vec::with_capacity(proxies * CHANGES);
    let mut missing = 0;
    let mut apply_ms = Vec::new();
    for change in first_change..first_change + CHANGES {
        let address = format!("10.255.{}.1", change + 1);
        marker_tx.send_replace(Some((change, format!("\"{address}\"").into_bytes())));
        let service = change % SERVICES;
        let patch = json!({"endpoints": slice_endpoints(service, Some(&address))});
        let written = Instant::now();
        slices
            .patch(
                &service_name(service),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .with_context(|| format!("changing EndpointSlice {}", service_name(service)))?;
        let mut received = 0;
        let deadline = written + CHANGE_LIMIT;
        while received < proxies {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some((_, Event::Received { change: c, at }))) if c == change => {
                    received += 1;
                    latencies.push(at.duration_since(written).as_secs_f64() * 1000.0);
                }
                Ok(Some((_, Event::ApplyCost(cost)))) => {
                    apply_ms.push(cost.as_secs_f64() * 1000.0);
                }
                Ok(Some((i, Event::Failed(e)))) => bail!("simulated proxy {i}: {e}"),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missing += proxies - received;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ticks = crate::clock_ticks_per_second();
    let operator_cpu_s = (cpu_ticks(operator)? - cpu_before) as f64 / ticks;
    let client_cpu_s = (cpu_ticks(std::process::id())? - client_cpu_before) as f64 / ticks;
    if let Some(recording) = recording {
        tokio::task::block_in_place(|| recording.stop())?;
    }
    let peak = memory(operator)?;
    drop(_abort);
    // Let the operator notice the closed streams before the next round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(json!({
        "proxies": proxies,
        "changes": CHANGES,
        "samples": latencies.len(),
        "missing": missing,
        "latency_ms": percentiles(&mut latencies),
        "initial_sync_s": sync_s,
        "snapshot_bytes": snapshot_bytes,
        "apply_ms": percentiles(&mut apply_ms),
        "operator_cpu_s_per_change": operator_cpu_s / CHANGES as f64,
        "client_cpu_s_per_change": client_cpu_s / CHANGES as f64,
        "operator_memory_synced": synced_memory,
        "operator_memory_after_changes": peak,
    }))
}

/// Aborts the simulated proxies (closing their connections) when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One simulated proxy: joins (bounded concurrency), applies the first snapshot as a proxy
/// does (decode + validate), then reports each snapshot carrying the current change. Only
/// proxy 0 decodes every later snapshot (its cost is reported apart): decoding 1,000 copies on
/// the same two cores would measure this simulator instead of the operator.
async fn simulate_proxy(
    i: usize,
    cp: &ControlPlane,
    identity: &Identity,
    marker: watch::Receiver<Option<(usize, Vec<u8>)>>,
    events: &mpsc::UnboundedSender<(usize, Event)>,
    joining: &tokio::sync::Semaphore,
) -> Result<()> {
    let mut stream: ConfigStream = {
        let _permit = joining.acquire().await?;
        let mut stream = cp.open_stream(identity, i).await?;
        loop {
            let (line, _) = stream
                .next_line()
                .await?
                .context("the config stream ended before the first snapshot")?;
            if apply(&line)? {
                events.send((i, Event::Synced(line.len())))?;
                break;
            }
        }
        stream
    };
    while let Some((line, at)) = stream.next_line().await? {
        let current = marker.borrow().clone();
        let Some((change, needle)) = current else {
            continue;
        };
        if memchr::memmem::find(&line, &needle).is_some() {
            events.send((i, Event::Received { change, at }))?;
            if i == 0 {
                let started = Instant::now();
                apply(&line)?;
                events.send((i, Event::ApplyCost(started.elapsed())))?;
            }
        }
    }
    bail!("the config stream ended")
}

/// What a proxy does with a line: decode the control message and validate the snapshot.
/// `true` for a valid snapshot, `false` for another message (which a proxy would act on).
fn apply(line: &[u8]) -> Result<bool> {
    match serde_json::from_slice::<ControlMessage>(line)? {
        ControlMessage::Config(config) => {
            config.validate()?;
            Ok(true)
        }
        ControlMessage::Exit { reason } => bail!("the control plane said exit: {reason}"),
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let table: [(&[f64], [f64; 4]); 3] = [
            (&[5.0], [5.0, 5.0, 5.0, 5.0]),
            (&[4.0, 1.0, 3.0, 2.0], [2.0, 4.0, 4.0, 4.0]),
            (
                &[
                    10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 11.0, 12.0, 13.0, 14.0,
                    15.0, 16.0, 17.0, 18.0, 19.0, 20.0,
                ],
                [10.0, 18.0, 20.0, 20.0],
            ),
        ];
        for (values, [p50, p90, p99, max]) in table {
            let got = percentiles(&mut values.to_vec());
            assert_eq!(
                got,
                json!({"p50": p50, "p90": p90, "p99": p99, "max": max}),
                "{values:?}"
            );
        }
        assert_eq!(percentiles(&mut [])["p99"], Value::Null);
    }

    #[test]
    fn every_endpoint_address_is_distinct_and_the_change_adds_one() {
        let mut all = std::collections::BTreeSet::new();
        for i in 0..SERVICES {
            for e in slice_endpoints(i, None).as_array().unwrap() {
                assert!(all.insert(e["addresses"][0].as_str().unwrap().to_owned()));
            }
        }
        assert_eq!(all.len(), SERVICES * ENDPOINTS_PER_SERVICE);
        let changed = slice_endpoints(3, Some("10.255.1.1"));
        assert_eq!(changed.as_array().unwrap().len(), ENDPOINTS_PER_SERVICE + 1);
        assert!(!all.contains("10.255.1.1"));
    }
}
