//! Helpers for the end-to-end tests: a client for the cluster named by `KUBECONFIG` (the local
//! cluster of `e2e/cluster.sh`, or any other), throw-away namespaces, bounded waits with clear
//! timeout messages, and the demo apps run as pods whose JSON summaries the tests assert on.

use std::future::Future;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, LogParams};
use kube::{Api, Client};
use serde::Deserialize;

/// Version of the images under test (`make e2e` passes the workspace version).
pub fn version() -> String {
    std::env::var("TRELLIS_VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned())
}

/// Where the node pulls the images under test from (`make e2e` passes the local cluster's
/// registry, which is also this default: `e2e/cluster.sh registry`).
pub fn image_registry() -> String {
    std::env::var("TRELLIS_IMAGE_REGISTRY").unwrap_or_else(|_| "10.88.0.1:5000/trellis".to_owned())
}

/// The image of one component (`proxy`, `demo`, ...) under test.
pub fn image(component: &str) -> String {
    format!("{}/{component}:{}", image_registry(), version())
}

pub fn demo_image() -> String {
    image("demo")
}

pub async fn client() -> Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!("KUBECONFIG is not set: run the e2e tests through `make e2e` (or `make up` first)");
    }
    Client::try_default()
        .await
        .context("connecting to the cluster named by KUBECONFIG")
}

/// Polls `check` every 250 ms until it yields a value or `timeout` passes; the error names
/// `what` and the last observation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("no observation yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `kubectl` against `KUBECONFIG`, with `stdin` piped in; fails with kubectl's stderr.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let kubectl =
        std::env::var("KUBECTL").unwrap_or_else(|_| "/var/cache/local-kube/bin/kubectl".to_owned());
    let mut child = Command::new(&kubectl)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {kubectl}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Merge-patches the `default` Mesh's `spec` with `spec` (a key set to null is removed).
pub fn patch_mesh_spec(spec: &serde_json::Value) -> Result<()> {
    let patch = serde_json::json!({ "spec": spec });
    kubectl(
        &[
            "patch",
            "mesh",
            "default",
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ],
        None,
    )?;
    Ok(())
}

/// Applies YAML with `kubectl apply` (server-side validation included).
pub fn apply(yaml: &str) -> Result<String> {
    kubectl(&["apply", "-f", "-"], Some(yaml))
}

/// A namespace for one test, deleted when dropped (without waiting, so tests stay fast).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn create(prefix: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let name = format!("{prefix}-{:04x}", rand::random::<u16>());
        let labels: String = labels
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    trellis-e2e: \"true\"\n{labels}"
        ))?;
        Ok(Self { name })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("TRELLIS_E2E_KEEP").is_none() {
            let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
        }
    }
}

/// A namespaced object a test applied, deleted when dropped so that a failing test leaves no
/// policy or rule behind.
pub struct Applied {
    kind: String,
    namespace: String,
    name: String,
}

impl Applied {
    /// Applies `{apiVersion, kind, metadata: {namespace, name}, spec}`.
    pub fn spec(
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<Self> {
        let object = serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        });
        apply(&object.to_string())?;
        Ok(Self {
            kind: kind.to_ascii_lowercase(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "-n",
                &self.namespace,
                "delete",
                &self.kind,
                &self.name,
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// An echo server Deployment (`app: <name>`, version label) and its Service on port 80.
pub fn echo_server_yaml(namespace: &str, name: &str, version: &str, replicas: u32) -> String {
    let image = demo_image();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}-{version}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}, version: {version}}}}}
  template:
    metadata: {{labels: {{app: {name}, version: {version}}}}}
    spec:
      containers:
      - name: server
        image: {image}
        imagePullPolicy: IfNotPresent
        args: [--port, "8080"]
        env:
        - {{name: VERSION, value: {version}}}
        - {{name: NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: NAMESPACE, value: {namespace}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    )
}

/// Waits until `count` pods matching `selector` are Ready.
pub async fn wait_pods_ready(
    client: &Client,
    namespace: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let what = format!("{count} ready pod(s) {selector} in {namespace}");
    wait_for(&what, timeout, || {
        let pods = pods.clone();
        let selector = selector.to_owned();
        async move {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
            Ok((ready.len() >= count).then_some(ready))
        }
    })
    .await
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The JSON summary printed by `demo-client`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientSummary {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(default)]
    pub by_status: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub errors: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub by_version: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub by_name: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub latency_ms: Latency,
    /// `http`, `grpc-unary`, `grpc-stream`, `websocket` or `upload`.
    #[serde(default)]
    pub mode: String,
    /// gRPC modes: calls by the `grpc-status` they ended with.
    #[serde(default)]
    pub by_grpc_status: std::collections::BTreeMap<String, u64>,
    /// gRPC and WebSocket modes: messages that came back intact.
    #[serde(default)]
    pub messages: u64,
    /// Upload mode: bytes echoed back intact, and their rate in MB/s.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub mb_per_sec: f64,
}

/// Latency percentiles of answered requests, in milliseconds.
#[derive(Debug, Default, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// A pod running `demo-client ARGS` once (restartPolicy Never).
pub fn client_pod_yaml(
    namespace: &str,
    name: &str,
    args: &[&str],
    annotations: &[(&str, &str)],
) -> String {
    let image = demo_image();
    let args = serde_json::to_string(args).expect("strings serialize");
    let annotations: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{app: {name}}}
{annotations}spec:
  restartPolicy: Never
  containers:
  - name: client
    image: {image}
    imagePullPolicy: IfNotPresent
    command: [/demo-client]
    args: {args}
"#
    )
}

/// Waits for a pod to finish (Succeeded or Failed) and returns its phase.
pub async fn wait_pod_finished(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    wait_for(
        &format!("pod {namespace}/{name} to finish"),
        timeout,
        || {
            let pods = pods.clone();
            let name = name.to_owned();
            async move {
                let pod = pods.get(&name).await?;
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
            }
        },
    )
    .await
}

/// Waits until the `client` container of a pod has printed its summary (it may linger
/// afterwards, and the pod may still run a sidecar) and parses it.
pub async fn client_summary(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<ClientSummary> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let line = wait_for(
        &format!("the summary of {namespace}/{name}"),
        timeout,
        || {
            let pods = pods.clone();
            let name = name.to_owned();
            async move {
                let params = LogParams {
                    container: Some("client".to_owned()),
                    ..LogParams::default()
                };
                let logs = pods.logs(&name, &params).await?;
                Ok(logs
                    .lines()
                    .find(|l| l.trim_start().starts_with('{') && l.contains("\"sent\""))
                    .map(str::to_owned))
            }
        },
    )
    .await?;
    serde_json::from_str(&line).with_context(|| format!("unparsable summary {line:?}"))
}

/// Runs `demo-client ARGS` as a pod and returns its summary.
pub async fn run_client(
    client: &Client,
    namespace: &str,
    name: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<ClientSummary> {
    apply(&client_pod_yaml(namespace, name, args, &[]))?;
    client_summary(client, namespace, name, timeout).await
}

/// GET on a pod's port through the API server's proxy (reaches the pod IP from the control
/// plane; no port-forward needed).
pub async fn pod_http_get(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<String> {
    let request = http::Request::get(format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}"
    ))
    .body(Vec::new())?;
    Ok(client.request_text(request).await?)
}

/// Sum of a Prometheus counter over the series whose labels contain every `label="value"`.
///
/// Hand-written rather than `prometheus-parse` (0.2.5): that crate splits label sets at every
/// comma, so a value such as `response_flags="UF,URX"` would read as `UF`.
pub fn counter_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            // Whole `key="value"` labels bounded by commas: `a="1"` must not match `ba="1"`.
            let bounded = format!(",{label_text},");
            labels
                .iter()
                .all(|(k, v)| bounded.contains(&format!(",{k}=\"{v}\",")))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

pub async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<()> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// A `kubectl port-forward` to a pod or service port, stopped when dropped. Reaches ports bound
/// to 127.0.0.1 inside the pod (the proxy's admin endpoint) on any cluster.
pub struct PortForward {
    child: std::process::Child,
    pub local_port: u16,
}

impl PortForward {
    pub fn start(namespace: &str, target: &str, remote_port: u16) -> Result<Self> {
        use std::io::BufRead;
        let kubectl = std::env::var("KUBECTL")
            .unwrap_or_else(|_| "/var/cache/local-kube/bin/kubectl".to_owned());
        let mut child = Command::new(kubectl)
            .args([
                "-n",
                namespace,
                "port-forward",
                target,
                &format!(":{remote_port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // kubectl reports every connection on stdout: keep draining it, or it dies of EPIPE on
        // the first connection.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        // "Forwarding from 127.0.0.1:41234 -> 15000"
        let local_port = line
            .split_whitespace()
            .nth(2)
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected port-forward output {line:?}"))?;
        Ok(Self { child, local_port })
    }

    /// GET over the forward with plain HTTP/1.1.
    pub async fn get(&self, path: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.local_port)).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        // Read until the answer is complete rather than until the close: kubectl's forward
        // passes the server's close on up to a second late, which would make every poll that
        // slow.
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut chunk = [0u8; 16 * 1024];
            while !http_answer_complete(&response) {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                response.extend_from_slice(&chunk[..n]);
            }
            anyhow::Ok(())
        })
        .await??;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        // The admin endpoint answers with a length or with chunks; JSON bodies need no more than
        // stripping chunk framing, which never starts with '{'.
        Ok(match body.find('{') {
            Some(start)
                if head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked") =>
            {
                body[start..body.rfind('}').map_or(body.len(), |e| e + 1)].to_owned()
            }
            _ => body.to_owned(),
        })
    }
}

/// Whether `response` holds a whole HTTP/1.1 answer: headers plus `Content-Length` bytes, or
/// a chunked body up to its last chunk.
fn http_answer_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let body = &response[end + 4..];
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= length;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_complete_by_length_or_last_chunk() {
        let cases: [(&[u8], bool); 6] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n", false),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nuntil close", false),
        ];
        for (response, complete) in cases {
            assert_eq!(
                http_answer_complete(response),
                complete,
                "{}",
                String::from_utf8_lossy(response)
            );
        }
    }

    #[test]
    fn sums_counters_by_label_subset() {
        let text = "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"9\"} 4\nx_total_other{a=\"1\"} 100\nx_total{a=\"2\"} 5\nx_total{ba=\"1\",c=\"UF,URX\"} 20\nx_total 1\n";
        assert_eq!(counter_sum(text, "x_total", &[("a", "1")]), 7.0);
        assert_eq!(counter_sum(text, "x_total", &[]), 33.0);
        assert_eq!(counter_sum(text, "x_total", &[("c", "UF,URX")]), 20.0);
        assert_eq!(counter_sum(text, "x_total", &[("b", "9")]), 4.0);
        assert_eq!(counter_sum(text, "missing", &[]), 0.0);
    }
}
