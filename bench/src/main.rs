//! `trellis-bench`: trellis-proxy against Envoy and a direct connection, same topologies, same
//! load generators, one run, interleaved; then the control-plane benchmarks against the real
//! operator binary. See bench/RESULTS.md for what it measures and how.
//!
//! The runner installs its tools (outside the namespaces, where the registries are reachable),
//! creates a private network namespace with the capture rules and re-runs itself inside it
//! (`--inside`), where every load-benchmark process lives; then (full runs and
//! `--control-plane-only`) a second, plain namespace for the control-plane benchmark
//! (`--inside-control-plane`). Guards kill every child and delete the namespaces on any exit
//! path.
//!
//! Flags: `--quick` (< 3 min, no control plane, no profiles), `--out DIR`, `--envoy l4|http`
//! (Envoy's configuration: `tcp_proxy`, or the HTTP router on the HTTP ports),
//! `--control-plane-only`, `--profile-only` (the profiles of [`profiles`] and the operator's,
//! no measurement).

mod apiserver;
mod callgrind;
mod certs;
mod control_plane;
mod cp_client;
mod load;
mod massif;
mod netns;
mod perf;
mod procs;
mod profiles;
mod report;
mod systems;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use certs::MeshCerts;
use load::Test;
use procs::{Proc, cpu_ticks, fact, status_kib};
use systems::{Bench, EnvoyMode, Setup};
use tools::Tools;

const INSIDE: &str = "--inside";
const INSIDE_CONTROL_PLANE: &str = "--inside-control-plane";
const CONTROL_PLANE_ONLY: &str = "--control-plane-only";
const PROFILE_ONLY: &str = "--profile-only";
const RATES: [u32; 3] = [500, 1000, 2000];

/// How long and how often: `--quick` for a smoke run under three minutes; `--profile-only`
/// for the profiles without the measurements.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
    pub profile_only: bool,
    pub rounds: usize,
    pub secs: u64,
    pub envoy_mode: EnvoyMode,
}

/// One load run of one setup.
#[derive(Debug, Clone)]
pub struct Sample {
    pub test: Test,
    pub setup: Setup,
    pub round: usize,
    pub outcome: load::Outcome,
    /// CPU seconds of the setup's proxies during the run (summed over both for two hops).
    pub cpu_s: f64,
    pub rss_idle_kib: u64,
    pub rss_peak_kib: u64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let envoy_mode = match args.iter().position(|a| a == "--envoy") {
        Some(i) => EnvoyMode::parse(args.get(i + 1).context("--envoy needs l4 or http")?)?,
        None => EnvoyMode::L4,
    };
    let plan = Plan {
        quick,
        profile_only: args.iter().any(|a| a == PROFILE_ONLY),
        rounds: if quick { 1 } else { 3 },
        secs: if quick { 3 } else { 6 },
        envoy_mode,
    };
    let exe = std::env::current_exe()?;
    // target/release/trellis-bench → target
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the runner must live in the cargo target dir")?
        .to_path_buf();
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--out needs a directory")?),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
    };
    if args.iter().any(|a| a == INSIDE) {
        return inside(plan, &target, &out);
    }
    if args.iter().any(|a| a == INSIDE_CONTROL_PLANE) {
        return control_plane::run(plan, &target, &out);
    }
    let started = Instant::now();
    let control_plane_only = args.iter().any(|a| a == CONTROL_PLANE_ONLY);
    if !control_plane_only {
        Tools::ensure(&target)?;
        in_namespace(netns::Netns::create()?, &exe, INSIDE, &args)?;
    }
    if control_plane_only || !plan.quick {
        tools::ensure_control_plane(&target)?;
        in_namespace(
            netns::Netns::create_plain("cp")?,
            &exe,
            INSIDE_CONTROL_PLANE,
            &args,
        )?;
    }
    eprintln!("bench: done in {:.0?}", started.elapsed());
    Ok(())
}

/// Re-runs the runner inside `netns` with `phase`, then deletes the namespace.
fn in_namespace(netns: netns::Netns, exe: &Path, phase: &str, args: &[String]) -> Result<()> {
    eprintln!("bench: network namespace {} ready", netns.name);
    let status = Command::new("nsenter")
        .arg(format!("--net={}", netns.path()))
        .arg("--")
        .arg(exe)
        .arg(phase)
        .args(args)
        .status()?;
    drop(netns);
    if !status.success() {
        bail!("the benchmark ({phase}) failed ({status})");
    }
    Ok(())
}

fn inside(plan: Plan, target: &Path, out: &Path) -> Result<()> {
    let tools = Tools::locate(target);
    let work = target.join("bench/run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let certs = MeshCerts::issue(&work.join("certs"))?;
    std::fs::write(
        work.join("trellis.json"),
        serde_json::to_vec_pretty(&systems::trellis_config(&certs))?,
    )?;
    let bench = Bench {
        tools: &tools,
        work: &work,
        certs: &certs,
        envoy_mode: plan.envoy_mode,
    };
    let facts = machine_facts(&tools, plan);
    let _nginx = systems::nginx(&tools, &work)?;
    load::serve_bulk()?;
    if plan.profile_only {
        return profiles::run(&bench, out, &facts);
    }

    let mut tests = vec![Test::Http1Max, Test::Http2Max, Test::TcpBulk];
    tests.extend(RATES.map(Test::Http1Rate));
    let setups = systems::setups(plan.quick);
    let total = plan.rounds * tests.len() * setups.len();
    let mut samples = Vec::with_capacity(total);
    for round in 0..plan.rounds {
        for &test in &tests {
            // Rotate the order each round so drift in background load spreads over all setups.
            for k in 0..setups.len() {
                let setup = setups[(k + round) % setups.len()];
                eprint!(
                    "[{:>3}/{total}] round {} {:<13} {:<13} ",
                    samples.len() + 1,
                    round + 1,
                    test.name(),
                    setup.to_string()
                );
                let sample = measure(test, setup, round, plan, &bench)?;
                eprintln!("{}", report::progress_line(&sample));
                samples.push(sample);
            }
        }
    }
    eprintln!("bench: proxy RSS with an empty vs a 10,000-service config");
    let config_rss = config_rss(&tools, &work)?;
    let run_facts = json!({"start": facts, "load_after": fact("cat", &["/proc/loadavg"])});
    report::write(out, plan, &run_facts, &setups, &samples, &config_rss)?;
    eprintln!("bench: wrote {}", out.join("RESULTS.md").display());
    // After the measured results are written, so a failing profiler cannot lose them.
    if !plan.quick {
        profiles::run(&bench, out, &machine_facts(&tools, plan))?;
    }
    Ok(())
}

fn measure(test: Test, setup: Setup, round: usize, plan: Plan, bench: &Bench) -> Result<Sample> {
    let proxies = setup.start(bench)?;
    std::thread::sleep(Duration::from_millis(300));
    let pids: Vec<u32> = proxies.iter().map(Proc::pid).collect();
    let sum = |f: &dyn Fn(u32) -> Result<u64>| -> Result<u64> { pids.iter().map(|&p| f(p)).sum() };
    let rss_idle_kib = sum(&|p| status_kib(p, "VmRSS"))?;
    let cpu_before = sum(&cpu_ticks)?;
    let outcome = load::run(
        test,
        setup.target_ip(),
        plan.secs,
        bench.tools,
        &bench.work.join("load.out"),
    )
    .with_context(|| format!("{} through {setup}", test.name()))?;
    let cpu_ticks_used = sum(&cpu_ticks)? - cpu_before;
    let rss_peak_kib = sum(&|p| status_kib(p, "VmHWM"))?;
    Ok(Sample {
        test,
        setup,
        round,
        outcome,
        cpu_s: cpu_ticks_used as f64 / clock_ticks_per_second(),
        rss_idle_kib,
        rss_peak_kib,
    })
}

pub fn clock_ticks_per_second() -> f64 {
    fact("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

/// trellis-proxy's RSS with an empty config and with 10,000 services.
fn config_rss(tools: &Tools, work: &Path) -> Result<Vec<Value>> {
    let configs = [
        ("empty", json!({"version": "empty"})),
        ("10000 services", systems::services_config(10_000)),
    ];
    let mut rows = Vec::new();
    for (name, config) in configs {
        let path = work.join(format!("config-{}.json", name.replace(' ', "-")));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        let started = Instant::now();
        let proxy = systems::trellis_with_config(tools, work, &path, &[])?;
        let ready_ms = started.elapsed().as_millis();
        std::thread::sleep(Duration::from_millis(500));
        rows.push(json!({
            "config": name,
            "file_bytes": std::fs::metadata(&path)?.len(),
            "ready_ms": ready_ms,
            "rss_kib": status_kib(proxy.pid(), "VmRSS")?,
            "peak_kib": status_kib(proxy.pid(), "VmHWM")?,
        }));
    }
    Ok(rows)
}

/// The machine facts of a control-plane run (which needs none of the load tools).
pub fn machine_facts_control_plane(target: &Path) -> Value {
    let operator = target.join("release/trellis-operator");
    json!({
        "date": fact("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "cpus": fact("nproc", &[]),
        "kernel": fact("uname", &["-sr"]),
        "load_before": fact("cat", &["/proc/loadavg"]),
        "git": fact("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        "operator": fact(&operator.to_string_lossy(), &["--version"]),
        "kube_apiserver": fact(&tools::kube_bin().join("kube-apiserver").to_string_lossy(), &["--version"]),
        "etcd": fact("etcd", &["--version"]).lines().next().unwrap_or("unknown").to_owned(),
    })
}

fn machine_facts(tools: &Tools, plan: Plan) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = fact("sh", &["-c", "grep MemTotal /proc/meminfo"]);
    json!({
        "date": fact("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "command": match (plan.quick, plan.profile_only) {
            (true, _) => "make bench-quick",
            (_, true) => "make bench-profile",
            _ => "make bench",
        },
        "envoy_mode": plan.envoy_mode.name(),
        "cpus": fact("nproc", &[]),
        "cpu_model": cpu,
        "memory": mem,
        "kernel": fact("uname", &["-sr"]),
        "load_before": fact("cat", &["/proc/loadavg"]),
        "git": fact("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        "rustc": fact("rustc", &["-V"]),
        "envoy": fact(&tools.envoy.to_string_lossy(), &["--version"]),
        "oha": fact(&tools.oha.to_string_lossy(), &["--version"]),
        "h2load": fact(&tools.h2load.to_string_lossy(), &["--version"]),
        "nginx": fact(&tools.nginx.to_string_lossy(), &["-v"]),
    })
}
