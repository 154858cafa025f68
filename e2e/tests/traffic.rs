//! Traffic management on the real cluster, with Istio's own YAML: header and source-label routing,
//! a weighted split, timeouts and retries, fault injection, circuit breaking and outlier
//! detection, protocols through two sidecars, and a VirtualService change under load.
//!
//! Every test runs meshed demo clients against meshed demo servers and asserts on what the
//! clients saw (their JSON summaries) and on what the client-side sidecars counted.

use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_e2e::*;

const INJECT: (&str, &str) = ("trellis.dev/inject", "enabled");
const READY: Duration = Duration::from_secs(180);

/// A demo-server Deployment `name-version` (labels `app: name`, `version`) with extra server
/// arguments (e.g. `--defaults status=500` for a bad replica).
fn server_yaml(namespace: &str, name: &str, version: &str, extra_args: &[&str]) -> String {
    let image = demo_image();
    let args = serde_json::to_string(
        &[&["--port", "8080", "--quiet"][..], extra_args]
            .concat()
            .to_vec(),
    )
    .expect("strings serialize");
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}-{version}, namespace: {namespace}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}, version: {version}}}}}
  template:
    metadata: {{labels: {{app: {name}, version: {version}}}}}
    spec:
      containers:
      - name: server
        image: {image}
        imagePullPolicy: IfNotPresent
        args: {args}
        env:
        - {{name: VERSION, value: {version}}}
        - {{name: NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
"#
    )
}

/// A Service `name` on port 80 (named `port_name`, which declares the protocol) → 8080.
fn service_yaml(namespace: &str, name: &str, port_name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: {port_name}, port: 80, targetPort: 8080}}]
"#
    )
}

/// Deploys `name` with the given versions (each `(version, extra server args)`) behind one
/// Service and waits for all of them to be ready.
async fn deploy(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    port_name: &str,
    versions: &[(&str, &[&str])],
) -> anyhow::Result<String> {
    for (version, args) in versions {
        apply(&server_yaml(namespace, name, version, args))?;
    }
    apply(&service_yaml(namespace, name, port_name))?;
    wait_pods_ready(
        client,
        namespace,
        &format!("app={name}"),
        versions.len(),
        READY,
    )
    .await?;
    Ok(format!("http://{name}.{namespace}.svc.cluster.local/"))
}

fn destination_rule(namespace: &str, name: &str, spec: Value) -> anyhow::Result<Applied> {
    Applied::spec(
        "networking.istio.io/v1",
        "DestinationRule",
        namespace,
        name,
        spec,
    )
}

fn virtual_service(namespace: &str, name: &str, spec: Value) -> anyhow::Result<Applied> {
    Applied::spec(
        "networking.istio.io/v1",
        "VirtualService",
        namespace,
        name,
        spec,
    )
}

fn subsets_v1_v2(host: &str) -> Value {
    serde_json::json!({
        "host": host,
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    })
}

/// For each client pod, whether its sidecar's config contains `marker`.
async fn meshed_proxies_with(
    namespace: &str,
    pods: &[&str],
    marker: &str,
) -> anyhow::Result<Vec<(String, bool)>> {
    let mut seen = Vec::new();
    for pod in pods {
        let admin = PortForward::start(namespace, &format!("pod/{pod}"), 15000)?;
        let dump = admin.get("/config_dump").await?;
        seen.push(((*pod).to_owned(), dump.contains(marker)));
    }
    Ok(seen)
}

/// Waits until every client sidecar in `pods` holds a config containing `marker`.
async fn wait_rule_everywhere(namespace: &str, pods: &[&str], marker: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("every client sidecar to hold the rule {marker}"),
        Duration::from_secs(60),
        || async {
            let seen = meshed_proxies_with(namespace, pods, marker).await?;
            Ok(seen.iter().all(|(_, has)| *has).then_some(()))
        },
    )
    .await
}

/// Time from `written` until the sidecar behind `admin` holds a config containing `marker`,
/// polled every 20 ms.
async fn time_until_applied(
    admin: &PortForward,
    marker: &str,
    written: Instant,
) -> anyhow::Result<Duration> {
    loop {
        if admin.get("/config_dump").await?.contains(marker) {
            return Ok(written.elapsed());
        }
        if written.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("no config with {marker} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `demo-client` pods concurrently (each `(pod name, args)`) and returns their summaries.
async fn run_clients(
    client: &kube::Client,
    namespace: &str,
    runs: &[(&str, Vec<&str>)],
) -> anyhow::Result<Vec<ClientSummary>> {
    for (name, args) in runs {
        apply(&client_pod_yaml(namespace, name, args, &[]))?;
    }
    let mut summaries = Vec::new();
    for (name, _) in runs {
        summaries.push(client_summary(client, namespace, name, READY).await?);
    }
    Ok(summaries)
}

fn version_count(summary: &ClientSummary, version: &str) -> u64 {
    summary.by_version.get(version).copied().unwrap_or(0)
}

fn status_count(summary: &ClientSummary, status: u16) -> u64 {
    summary
        .by_status
        .get(&status.to_string())
        .copied()
        .unwrap_or(0)
}

/// The client sidecar's Prometheus text (the client pod lingers after its summary for this).
async fn sidecar_metrics(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
) -> anyhow::Result<String> {
    pod_http_get(client, namespace, pod, 15020, "/stats/prometheus").await
}

/// Must-shows 1, 2 and 7: header routing and source-label routing as in Istio's Bookinfo
/// examples, a 90/10 split over 1,000 requests, and a VirtualService change under a fixed-rate
/// load that drops nothing and is in effect on every client sidecar within a second.
#[tokio::test]
async fn virtual_services_route_by_header_source_and_weight() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-routing", &[INJECT])?;
    let url = deploy(
        &client,
        &ns.name,
        "reviews",
        "http",
        &[("v1", &[]), ("v2", &[])],
    )
    .await?;
    let host = format!("reviews.{}.svc.cluster.local", ns.name);
    let _subsets = destination_rule(&ns.name, "reviews", subsets_v1_v2("reviews"))?;

    // Istio's "request routing" task: end-user jason gets v2, everyone else v1.
    let by_header = virtual_service(
        &ns.name,
        "reviews",
        serde_json::json!({
            "hosts": ["reviews"],
            "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        }),
    )?;
    let count = ["--url", url.as_str(), "--count", "20", "--rate", "20"];
    let jason = [&count[..], &["-H", "end-user: jason"]].concat();
    let others = [&count[..], &["-H", "end-user: someone"]].concat();
    let summaries =
        run_clients(&client, &ns.name, &[("jason", jason), ("someone", others)]).await?;
    assert_eq!(
        version_count(&summaries[0], "v2"),
        20,
        "end-user: jason → v2: {:?}",
        summaries[0]
    );
    assert_eq!(
        version_count(&summaries[1], "v1"),
        20,
        "other users → v1: {:?}",
        summaries[1]
    );
    drop(by_header);

    // Source-label routing: calls from pods labelled app=tester-b go to v2, the rest to v1.
    let by_source = virtual_service(
        &ns.name,
        "reviews",
        serde_json::json!({
            "hosts": [host],
            "http": [
                {"match": [{"sourceLabels": {"app": "tester-b"}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        }),
    )?;
    let count = vec!["--url", url.as_str(), "--count", "20", "--rate", "20"];
    let summaries = run_clients(
        &client,
        &ns.name,
        &[("tester-a", count.clone()), ("tester-b", count)],
    )
    .await?;
    assert_eq!(version_count(&summaries[0], "v1"), 20, "{:?}", summaries[0]);
    assert_eq!(version_count(&summaries[1], "v2"), 20, "{:?}", summaries[1]);
    drop(by_source);

    // 90/10 over 1,000 requests. v2's count is Binomial(1000, 0.1): mean 100, σ ≈ 9.49. The
    // test accepts 100 ± 48 (about 5σ), so a correct split fails it with probability ≈ 6e-7,
    // while a split that ignores weights (≈ 500) or inverts them (≈ 900) can never pass.
    let weighted = virtual_service(
        &ns.name,
        "reviews",
        serde_json::json!({
            "hosts": ["reviews"],
            "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
            ]}],
        }),
    )?;
    let split = vec!["--url", url.as_str(), "--count", "1000", "--rate", "100"];
    let summary = &run_clients(&client, &ns.name, &[("split", split)]).await?[0];
    let v2 = version_count(summary, "v2");
    println!(
        "90/10 split over 1000 requests: v1 {}, v2 {v2}",
        version_count(summary, "v1")
    );
    assert_eq!(summary.ok, 1000, "{summary:?}");
    assert!((52..=148).contains(&v2), "v2 got {v2} of 1000: {summary:?}");
    drop(weighted);

    // A change under a steady load: three clients at 50 rps each for 25 s; after 8 s the route
    // moves from v1 to v2. No request may fail and every client sidecar must hold the new rule
    // within a second of the API write.
    let all_to = |subset: &str, generation: &str| {
        serde_json::json!({
            "hosts": ["reviews"],
            "http": [{
                "route": [{"destination": {"host": "reviews", "subset": subset}}],
                "headers": {"response": {"set": {"x-e2e-rule": generation}}},
            }],
        })
    };
    let _steady = virtual_service(&ns.name, "reviews", all_to("v1", "steady-gen-1"))?;
    let load = vec![
        "--url",
        url.as_str(),
        "--rate",
        "50",
        "--duration",
        "25s",
        "--linger",
        "60s",
    ];
    let loaders = ["load-a", "load-b", "load-c"];
    for pod in loaders {
        apply(&client_pod_yaml(&ns.name, pod, &load, &[]))?;
    }
    wait_pods_ready(&client, &ns.name, "app in (load-a,load-b,load-c)", 3, READY).await?;
    wait_rule_everywhere(&ns.name, &loaders, "steady-gen-1").await?;
    tokio::time::sleep(Duration::from_secs(8)).await;

    let forwards: Vec<PortForward> = loaders
        .iter()
        .map(|pod| PortForward::start(&ns.name, &format!("pod/{pod}"), 15000))
        .collect::<anyhow::Result<_>>()?;
    apply(
        &serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": ns.name},
            "spec": all_to("v2", "steady-gen-2"),
        })
        .to_string(),
    )?;
    let written = Instant::now();
    let (a, b, c) = tokio::join!(
        time_until_applied(&forwards[0], "steady-gen-2", written),
        time_until_applied(&forwards[1], "steady-gen-2", written),
        time_until_applied(&forwards[2], "steady-gen-2", written),
    );
    let applied_after: Vec<(&str, Duration)> = loaders.into_iter().zip([a?, b?, c?]).collect();
    let slowest = applied_after
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    println!(
        "VirtualService change in effect on every client sidecar after: {applied_after:?} (slowest {slowest:?})"
    );

    for pod in loaders {
        let summary = client_summary(&client, &ns.name, pod, READY).await?;
        println!("{pod}: {summary:?}");
        assert_eq!(summary.failed, 0, "{pod} lost requests during the change");
        assert_eq!(
            summary.dropped, 0,
            "{pod} dropped requests during the change"
        );
        assert!(
            version_count(&summary, "v1") > 0 && version_count(&summary, "v2") > 0,
            "{pod} saw the switch from v1 to v2: {summary:?}"
        );
    }
    assert!(
        slowest <= Duration::from_secs(1),
        "the new rule took {slowest:?} to reach every proxy"
    );
    Ok(())
}

/// Must-shows 3 and 4: a 0.5 s timeout against a 2 s backend, retries turning a half-broken
/// backend into a working one, and delay/abort fault injection at the configured percentages.
#[tokio::test]
async fn timeouts_retries_and_faults_behave_as_configured() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-resilience", &[INJECT])?;
    let slow_url = deploy(
        &client,
        &ns.name,
        "slow",
        "http",
        &[("v1", &["--defaults", "delay=2s"])],
    )
    .await?;
    // One good and one bad replica (500 on every request): half of all requests fail. 500 is
    // not retried by Istio's default policy (which retries 503), so only `retryOn: 5xx` helps.
    let flaky_url = deploy(
        &client,
        &ns.name,
        "flaky",
        "http",
        &[("v1", &[]), ("v2", &["--defaults", "status=500"])],
    )
    .await?;
    let faulty_url = deploy(&client, &ns.name, "faulty", "http", &[("v1", &[])]).await?;

    let _timeout = virtual_service(
        &ns.name,
        "slow",
        serde_json::json!({
            "hosts": ["slow"],
            "http": [{"route": [{"destination": {"host": "slow"}}], "timeout": "0.5s"}],
        }),
    )?;
    let without_retries = vec![
        "--url",
        flaky_url.as_str(),
        "--count",
        "200",
        "--rate",
        "50",
    ];
    let summaries = run_clients(
        &client,
        &ns.name,
        &[
            (
                "timeout",
                vec!["--url", slow_url.as_str(), "--count", "10", "--rate", "5"],
            ),
            ("no-retries", without_retries),
        ],
    )
    .await?;
    let timeout = &summaries[0];
    println!("timeout 0.5s against a 2s backend: {timeout:?}");
    assert_eq!(status_count(timeout, 504), 10, "{timeout:?}");
    assert!(
        (450.0..=1200.0).contains(&timeout.latency_ms.p50),
        "504 after about 0.5 s: {timeout:?}"
    );
    let baseline = &summaries[1];
    println!("half-broken backend without retries: {baseline:?}");
    assert!(
        (40..=160).contains(&baseline.ok),
        "about half fail without retries: {baseline:?}"
    );

    let _retries = virtual_service(
        &ns.name,
        "flaky",
        serde_json::json!({
            "hosts": ["flaky"],
            "http": [{
                "route": [{"destination": {"host": "flaky"}}],
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
            }],
        }),
    )?;
    let faults = virtual_service(
        &ns.name,
        "faulty",
        serde_json::json!({
            "hosts": ["faulty"],
            "http": [{
                "route": [{"destination": {"host": "faulty"}}],
                "fault": {
                    "delay": {"percentage": {"value": 30.0}, "fixedDelay": "1s"},
                    "abort": {"percentage": {"value": 20.0}, "httpStatus": 418},
                },
            }],
        }),
    )?;
    // Give both rules time to reach the (new) client pods' sidecars: a pod starts with the
    // current config, so the rules only need to be in the operator's view first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summaries = run_clients(
        &client,
        &ns.name,
        &[
            (
                "retries",
                vec![
                    "--url",
                    flaky_url.as_str(),
                    "--count",
                    "200",
                    "--rate",
                    "50",
                ],
            ),
            (
                "faults",
                vec![
                    "--url",
                    faulty_url.as_str(),
                    "--count",
                    "400",
                    "--rate",
                    "50",
                    "--timeout",
                    "5s",
                    "--linger",
                    "120s",
                ],
            ),
        ],
    )
    .await?;
    let retried = &summaries[0];
    println!("half-broken backend with retries: {retried:?}");
    assert!(
        retried.ok * 100 >= retried.sent * 99,
        "≥ 99% success with retries: {retried:?}"
    );

    // Aborts: Binomial(400, 0.2), mean 80, σ = 8: 80 ± 40 (5σ). Delays are drawn independently
    // (Istio applies the delay first, then the abort): counted by the sidecar as response flag
    // DI, Binomial(400, 0.3), mean 120, σ ≈ 9.2: 120 ± 46.
    let faulted = &summaries[1];
    println!("fault injection over 400 requests: {faulted:?}");
    let aborted = status_count(faulted, 418);
    assert!((40..=120).contains(&aborted), "aborted {aborted} of 400");
    assert_eq!(
        faulted.failed, aborted,
        "only injected aborts fail: {faulted:?}"
    );
    let metrics = sidecar_metrics(&client, &ns.name, "faults").await?;
    let delayed = counter_sum(
        &metrics,
        "istio_requests_total",
        &[("reporter", "source"), ("response_flags", "DI")],
    ) + counter_sum(
        &metrics,
        "istio_requests_total",
        &[("reporter", "source"), ("response_flags", "DI,FI")],
    );
    let fault_aborted = counter_sum(
        &metrics,
        "istio_requests_total",
        &[("reporter", "source"), ("response_code", "418")],
    );
    println!("sidecar counted {delayed} delayed, {fault_aborted} aborted");
    assert!(
        (74.0..=166.0).contains(&delayed),
        "delayed {delayed} of 400:\n{metrics}"
    );
    assert_eq!(
        fault_aborted as u64, aborted,
        "the sidecar counted the aborts it injected"
    );
    drop(faults);
    Ok(())
}

/// Must-show 5: a connection pool of one connection and one pending request overflows under
/// concurrent load with 503s that say so, and outlier detection ejects a failing replica.
#[tokio::test]
async fn circuit_breaking_and_outlier_detection() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-breaker", &[INJECT])?;
    let pool_url = deploy(
        &client,
        &ns.name,
        "pool",
        "http",
        &[("v1", &["--defaults", "delay=200ms"])],
    )
    .await?;
    let eject_url = deploy(
        &client,
        &ns.name,
        "eject",
        "http",
        &[("v1", &[]), ("v2", &["--defaults", "status=500"])],
    )
    .await?;
    let _pool = destination_rule(
        &ns.name,
        "pool",
        serde_json::json!({
            "host": "pool",
            "trafficPolicy": {"connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1},
            }},
        }),
    )?;
    let _outlier = destination_rule(
        &ns.name,
        "eject",
        serde_json::json!({
            "host": "eject",
            "trafficPolicy": {"outlierDetection": {
                "consecutive5xxErrors": 3,
                "interval": "1s",
                "baseEjectionTime": "60s",
                "maxEjectionPercent": 100,
            }},
        }),
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summaries = run_clients(
        &client,
        &ns.name,
        &[
            (
                "pool-load",
                vec![
                    "--url",
                    pool_url.as_str(),
                    "--count",
                    "200",
                    "--rate",
                    "40",
                    "--linger",
                    "120s",
                ],
            ),
            (
                "eject-load",
                vec![
                    "--url",
                    eject_url.as_str(),
                    "--count",
                    "200",
                    "--rate",
                    "20",
                    "--linger",
                    "120s",
                ],
            ),
        ],
    )
    .await?;

    // 40 rps against 200 ms answers keeps about 8 requests in flight; one connection and one
    // pending slot admit 2, so most of the rest overflow.
    let pooled = &summaries[0];
    println!("connection pool 1+1 under load: {pooled:?}");
    assert!(status_count(pooled, 200) >= 20, "{pooled:?}");
    assert!(status_count(pooled, 503) >= 50, "{pooled:?}");
    let metrics = sidecar_metrics(&client, &ns.name, "pool-load").await?;
    let overflows = counter_sum(
        &metrics,
        "istio_requests_total",
        &[("reporter", "source"), ("response_flags", "UO")],
    );
    assert_eq!(
        overflows as u64,
        status_count(pooled, 503),
        "every 503 is an overflow flagged UO:\n{metrics}"
    );

    // The bad replica answers 500; after three in a row it is ejected for 60 s, so of 200
    // requests only the first few can fail.
    let ejected = &summaries[1];
    println!("outlier detection with one bad replica of two: {ejected:?}");
    assert!(ejected.failed <= 10, "{ejected:?}");
    let metrics = sidecar_metrics(&client, &ns.name, "eject-load").await?;
    let ejections = counter_sum(&metrics, "trellis_outlier_ejections_total", &[]);
    assert!(ejections >= 1.0, "the ejection is counted:\n{metrics}");
    Ok(())
}

/// Must-show 6: HTTP/2, gRPC unary and streaming, WebSocket and a 100 MB streamed body through
/// two sidecars.
#[tokio::test]
async fn protocols_pass_through_two_sidecars() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-protocols", &[INJECT])?;
    let http_url = deploy(&client, &ns.name, "web", "http", &[("v1", &[])]).await?;
    let grpc_url = deploy(&client, &ns.name, "grpc", "grpc", &[("v1", &[])]).await?;
    let summaries = run_clients(
        &client,
        &ns.name,
        &[
            (
                "h2",
                vec![
                    "--url",
                    http_url.as_str(),
                    "--http2",
                    "--count",
                    "20",
                    "--rate",
                    "20",
                ],
            ),
            (
                "grpc-unary",
                vec![
                    "--url",
                    grpc_url.as_str(),
                    "--mode",
                    "grpc-unary",
                    "--count",
                    "20",
                    "--rate",
                    "20",
                ],
            ),
            (
                "grpc-stream",
                vec![
                    "--url",
                    grpc_url.as_str(),
                    "--mode",
                    "grpc-stream",
                    "--messages",
                    "50",
                    "--count",
                    "5",
                    "--rate",
                    "5",
                ],
            ),
            (
                "websocket",
                vec![
                    "--url",
                    http_url.as_str(),
                    "--mode",
                    "websocket",
                    "--messages",
                    "20",
                    "--count",
                    "5",
                    "--rate",
                    "5",
                ],
            ),
            (
                "upload",
                vec![
                    "--url",
                    http_url.as_str(),
                    "--mode",
                    "upload",
                    "--bytes",
                    "100MB",
                    "--count",
                    "1",
                    "--timeout",
                    "120s",
                ],
            ),
        ],
    )
    .await?;
    for (summary, name) in
        summaries
            .iter()
            .zip(["h2", "grpc-unary", "grpc-stream", "websocket", "upload"])
    {
        println!("{name}: {summary:?}");
        assert!(
            summary.sent > 0 && summary.ok == summary.sent,
            "{name}: {summary:?}"
        );
    }
    Ok(())
}

/// Puts the `default` Mesh back to `ALLOW_ANY` when dropped, also when the test fails.
struct RegistryOnly;

impl RegistryOnly {
    fn set() -> anyhow::Result<Self> {
        set_outbound_traffic_policy("REGISTRY_ONLY")?;
        Ok(Self)
    }
}

impl Drop for RegistryOnly {
    fn drop(&mut self) {
        if let Err(e) = set_outbound_traffic_policy("ALLOW_ANY") {
            eprintln!("could not restore outboundTrafficPolicy ALLOW_ANY: {e:#}");
        }
    }
}

fn set_outbound_traffic_policy(mode: &str) -> anyhow::Result<()> {
    patch_mesh_spec(&serde_json::json!({"outboundTrafficPolicy": {"mode": mode}}))
}

/// `outboundTrafficPolicy: REGISTRY_ONLY` on the real cluster: a request for a host outside the
/// registry is answered by the client's sidecar with a 502 and the reason, and a ServiceEntry
/// host without `addresses` (resolved by DNS to an in-cluster Service) is reached by its name
/// although the address the application dialled belongs to no service.
#[tokio::test]
async fn registry_only_admits_service_entry_names_and_refuses_the_rest() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-egress", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: echo-by-name, namespace: {ns}}}\nspec:\n  hosts: [echo.external.test]\n  location: MESH_EXTERNAL\n  resolution: DNS\n  ports: [{{number: 7777, name: http, protocol: HTTP, targetPort: 80}}]\n  endpoints: [{{address: echo.{ns}.svc.cluster.local}}]\n",
        ns = ns.name
    );
    apply(&entry)?;
    let _registry_only = RegistryOnly::set()?;
    // An address that is no service VIP or endpoint: the node's own, on a port nothing serves.
    let node_ip = kubectl(
        &[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
        ],
        None,
    )?;
    let url = format!("http://{}:7777/", node_ip.trim());
    let runs = [
        (
            "by-name",
            vec![
                "--url",
                &url,
                "-H",
                "host:echo.external.test",
                "--count",
                "20",
                "--linger",
                "60s",
            ],
        ),
        (
            "unknown",
            vec![
                "--url",
                &url,
                "-H",
                "host:unknown.test",
                "--count",
                "20",
                "--linger",
                "60s",
            ],
        ),
    ];
    let summaries = run_clients(&client, &ns.name, &runs).await?;
    let (by_name, unknown) = (&summaries[0], &summaries[1]);
    println!("by name: {by_name:?}\nunknown: {unknown:?}");
    assert_eq!(
        status_count(by_name, 200),
        20,
        "the ServiceEntry name reaches the echo Service: {by_name:?}"
    );
    assert_eq!(version_count(by_name, "v1"), 20, "{by_name:?}");
    assert_eq!(
        status_count(unknown, 502),
        20,
        "a host outside the registry gets the sidecar's 502: {unknown:?}"
    );
    // One log line per refused request, read from the sidecar's log (which outlives the pod's
    // IP, unlike its metrics port); the `NR` flag is asserted in proxy/tests/external.rs.
    let logs = kubectl(
        &["-n", &ns.name, "logs", "unknown", "-c", "trellis-proxy"],
        None,
    )?;
    let refused = logs
        .lines()
        .filter(|l| {
            l.contains("request for a host outside the registry refused (REGISTRY_ONLY): 502")
                && l.contains("unknown.test")
        })
        .count();
    assert_eq!(refused, 20, "{logs}");
    Ok(())
}
