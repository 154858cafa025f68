//! Zero-trust on the real cluster: automatic mutual TLS between sidecars and PeerAuthentication
//! (PERMISSIVE, namespace STRICT, a workload override under it, port-level DISABLE, and a
//! mesh-wide STRICT policy in Istio's root namespace), observed from a meshed and an unmeshed
//! client; and the config stream, which hands a proxy the config of its own pod only.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::LogParams;
use serde_json::Value;
use trellis_api::mesh::DEFAULT_ROOT_NAMESPACE;
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);
const INJECT: (&str, &str) = ("trellis.dev/inject", "enabled");

/// A PeerAuthentication, deleted when dropped.
fn peer_authentication(namespace: &str, name: &str, spec: Value) -> anyhow::Result<Applied> {
    Applied::spec(
        "security.istio.io/v1beta1",
        "PeerAuthentication",
        namespace,
        name,
        spec,
    )
}

/// Waits until the server's proxy applies `mode` on port 8080.
async fn wait_for_mode(namespace: &str, pod: &str, mode: &str) -> anyhow::Result<()> {
    let admin = PortForward::start(namespace, &format!("pod/{pod}"), 15000)?;
    wait_for(
        &format!("{namespace}/{pod} to apply {mode} on port 8080"),
        Duration::from_secs(60),
        || {
            let admin = &admin;
            async move {
                let dump: Value = serde_json::from_str(&admin.get("/config_dump").await?)?;
                let inbound = &dump["config"]["inbound"];
                let effective = inbound["portMtls"]["8080"]
                    .as_str()
                    .or(inbound["mtlsMode"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                Ok((effective == mode).then_some(()))
            }
        },
    )
    .await
}

struct Clients {
    meshed_ns: String,
    plain_ns: String,
    url: String,
    runs: std::cell::Cell<u32>,
}

/// The `secure` echo server in `server_ns`, ready; returns its pod's name and the clients that
/// call it from `meshed_ns` (with a sidecar) and `plain_ns` (without).
async fn secure_server(
    client: &kube::Client,
    server_ns: &str,
    meshed_ns: &str,
    plain_ns: &str,
) -> anyhow::Result<(String, Clients)> {
    apply(&echo_server_yaml(server_ns, "secure", "v1", 1))?;
    let pods = wait_pods_ready(client, server_ns, "app=secure", 1, READY).await?;
    let server = pods[0].metadata.name.clone().unwrap_or_default();
    let clients = Clients {
        meshed_ns: meshed_ns.to_owned(),
        plain_ns: plain_ns.to_owned(),
        url: format!("http://secure.{server_ns}.svc.cluster.local/"),
        runs: Default::default(),
    };
    Ok((server, clients))
}

impl Clients {
    /// Five requests from each client; returns (meshed ok, unmeshed ok).
    async fn run(&self, client: &kube::Client) -> anyhow::Result<(u64, u64)> {
        let meshed = self.run_in(client, &self.meshed_ns, "meshed").await?;
        Ok((meshed, self.run_plain(client).await?))
    }

    /// Five requests from the unmeshed client; returns how many were answered.
    async fn run_plain(&self, client: &kube::Client) -> anyhow::Result<u64> {
        self.run_in(client, &self.plain_ns, "plain").await
    }

    /// Five requests from a new client pod in `namespace`; returns how many were answered.
    async fn run_in(
        &self,
        client: &kube::Client,
        namespace: &str,
        prefix: &str,
    ) -> anyhow::Result<u64> {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let args = [
            "--url",
            self.url.as_str(),
            "--count",
            "5",
            "--rate",
            "10",
            "--timeout",
            "3s",
        ];
        let name = format!("{prefix}-{n}");
        Ok(run_client(client, namespace, &name, &args, READY).await?.ok)
    }
}

#[tokio::test]
async fn peer_authentication_modes_are_enforced_between_meshed_and_unmeshed_clients()
-> anyhow::Result<()> {
    let client = client().await?;
    let server_ns = TestNamespace::create("e2e-mtls", &[INJECT])?;
    let meshed_ns = TestNamespace::create("e2e-mtls-client", &[INJECT])?;
    let plain_ns = TestNamespace::create("e2e-mtls-plain", &[])?;
    let (server, clients) =
        secure_server(&client, &server_ns.name, &meshed_ns.name, &plain_ns.name).await?;

    // Default PERMISSIVE: both are served, the meshed one over mutual TLS.
    wait_for_mode(&server_ns.name, &server, "PERMISSIVE").await?;
    assert_eq!(
        clients.run(&client).await?,
        (5, 5),
        "PERMISSIVE serves both"
    );
    let metrics = pod_http_get(
        &client,
        &server_ns.name,
        &server,
        15020,
        "/stats/prometheus",
    )
    .await?;
    let meshed_principal = format!("spiffe://cluster.local/ns/{}/sa/default", meshed_ns.name);
    let mutual = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", meshed_principal.as_str()),
    ];
    assert!(
        counter_sum(&metrics, "istio_requests_total", &mutual) >= 1.0,
        "meshed client arrived over mTLS with its identity:\n{metrics}"
    );

    // Namespace STRICT: plaintext from the unmeshed client is refused, meshed still works.
    let namespace_strict = peer_authentication(
        &server_ns.name,
        "default",
        serde_json::json!({"mtls": {"mode": "STRICT"}}),
    )?;
    wait_for_mode(&server_ns.name, &server, "STRICT").await?;
    assert_eq!(
        clients.run(&client).await?,
        (5, 0),
        "namespace STRICT refuses plaintext only"
    );

    // A workload-level PERMISSIVE override under namespace STRICT: the override wins.
    let workload = peer_authentication(
        &server_ns.name,
        "secure",
        serde_json::json!({"selector": {"matchLabels": {"app": "secure"}}, "mtls": {"mode": "PERMISSIVE"}}),
    )?;
    wait_for_mode(&server_ns.name, &server, "PERMISSIVE").await?;
    assert_eq!(
        clients.run(&client).await?,
        (5, 5),
        "workload PERMISSIVE overrides namespace STRICT"
    );
    drop(workload);

    // Port-level DISABLE under a STRICT workload: port 8080 takes plaintext again.
    let _port_level = peer_authentication(
        &server_ns.name,
        "secure-port",
        serde_json::json!({
            "selector": {"matchLabels": {"app": "secure"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "DISABLE"}},
        }),
    )?;
    wait_for_mode(&server_ns.name, &server, "DISABLE").await?;
    let (meshed_ok, plain_ok) = clients.run(&client).await?;
    assert_eq!(plain_ok, 5, "port-level DISABLE accepts plaintext");
    assert_eq!(meshed_ok, 5, "a meshed client still reaches a DISABLE port");
    drop(namespace_strict);
    Ok(())
}

/// Istio YAML runs unchanged: a mesh-wide policy lives in Istio's root namespace
/// (`Mesh.spec.rootNamespace`, by default `istio-system`), and deleting it lifts it again.
#[tokio::test]
async fn mesh_wide_strict_peer_authentication_in_istio_system_is_enforced() -> anyhow::Result<()> {
    let client = client().await?;
    // Created if missing and left in place: deleting it would race the next run's create while
    // it terminates, and an empty namespace changes nothing.
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {DEFAULT_ROOT_NAMESPACE}\n"
    ))?;
    let server_ns = TestNamespace::create("e2e-root", &[INJECT])?;
    let plain_ns = TestNamespace::create("e2e-root-plain", &[])?;
    // The server's namespace is meshed: a client there has a sidecar.
    let (server, clients) =
        secure_server(&client, &server_ns.name, &server_ns.name, &plain_ns.name).await?;

    // Deleted when dropped, so a failing assertion leaves no mesh-wide STRICT behind.
    let mesh_wide = peer_authentication(
        DEFAULT_ROOT_NAMESPACE,
        "default",
        serde_json::json!({"mtls": {"mode": "STRICT"}}),
    )?;
    wait_for_mode(&server_ns.name, &server, "STRICT").await?;
    assert_eq!(
        clients.run(&client).await?,
        (5, 0),
        "a mesh-wide STRICT policy in {DEFAULT_ROOT_NAMESPACE} refuses plaintext only"
    );
    drop(mesh_wide);
    wait_for_mode(&server_ns.name, &server, "PERMISSIVE").await?;
    assert_eq!(
        clients.run_plain(&client).await?,
        5,
        "plaintext is served again once the mesh-wide policy is gone"
    );
    Ok(())
}

/// How a proxy's config stream went, from its log (JSON lines).
#[derive(Debug, PartialEq)]
enum Stream {
    /// A config snapshot was applied.
    Served,
    /// The control plane refused the stream (403); its answer.
    Refused(String),
}

async fn stream_outcome(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
) -> anyhow::Result<Option<Stream>> {
    let params = LogParams {
        container: Some(container.to_owned()),
        ..LogParams::default()
    };
    let logs = pods.logs(pod, &params).await?;
    for line in logs.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match entry["message"].as_str() {
            Some("config applied") => return Ok(Some(Stream::Served)),
            // Only a 403 is an answer: a 503 (the pod has no IP yet) or a 429 is transient, and
            // the proxy retries.
            Some("config stream failed") => {
                let error = entry["error"].as_str().unwrap_or_default();
                if error.contains("control plane answered 403") {
                    return Ok(Some(Stream::Refused(error.to_owned())));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// A pod of the mesh obtains a real workload certificate the way its proxy does (the proxy
/// binary itself, with the pod's projected ServiceAccount token) and asks for the config of
/// other pods: one of another ServiceAccount, and another pod of its own ServiceAccount. Both
/// are refused; the pod's own sidecar is served.
#[tokio::test]
async fn meshed_pod_cannot_fetch_another_pods_config() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-cfgauth", &[INJECT])?;
    let namespace = &ns.name;
    let demo = demo_image();
    let proxy = image("proxy");
    // Two pods to spy on, not meshed (their config is served for their names all the same).
    let victim = |name: &str, service_account: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  annotations: {{sidecar.istio.io/inject: "false"}}
spec:
  serviceAccountName: {service_account}
  containers:
  - {{name: server, image: {demo}, imagePullPolicy: IfNotPresent, args: [--port, "8080"]}}
"#
        )
    };
    // The spy's containers run the proxy binary with the pod's own token and the mesh root,
    // each claiming another pod's name, on ports of their own beside the injected sidecar.
    let spy_container = |name: &str, claimed: &str, port_base: u16| {
        format!(
            r#"  - name: {name}
    image: {proxy}
    imagePullPolicy: IfNotPresent
    args: [sidecar, --control-plane, "https://trellis-operator.trellis-system.svc:15012",
           --pod-name, {claimed}, --pod-namespace, {namespace}, --service-account, spy,
           --token, /claim/token/token, --root-cert, /claim/root/root-cert.pem,
           --admin-port, "{admin}", --outbound-port, "{outbound}", --inbound-port, "{inbound}",
           --metrics-port, "{metrics}", --readiness-port, "{readiness}"]
    volumeMounts:
    - {{name: claim-token, mountPath: /claim/token, readOnly: true}}
    - {{name: claim-root, mountPath: /claim/root, readOnly: true}}
"#,
            admin = port_base,
            outbound = port_base + 1,
            inbound = port_base + 6,
            metrics = port_base + 20,
            readiness = port_base + 21,
        )
    };
    let yaml = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: spy, namespace: {namespace}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: other, namespace: {namespace}}}
---
{other_account}---
{same_account}---
apiVersion: v1
kind: Pod
metadata:
  name: spy
  namespace: {namespace}
  # The spies dial the control plane directly, as the sidecar does (uncaptured).
  annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: "15012"}}
spec:
  serviceAccountName: spy
  containers:
{claims_other_account}{claims_same_account}  volumes:
  - name: claim-token
    projected:
      sources:
      - serviceAccountToken: {{audience: trellis, expirationSeconds: 3600, path: token}}
  - name: claim-root
    configMap: {{name: trellis-ca-root-cert}}
"#,
        other_account = victim("victim-other-account", "other"),
        same_account = victim("victim-same-account", "spy"),
        claims_other_account = spy_container("claims-other-account", "victim-other-account", 16000),
        claims_same_account = spy_container("claims-same-account", "victim-same-account", 17000),
    );
    apply(&yaml)?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let containers = [
        "trellis-proxy",
        "claims-other-account",
        "claims-same-account",
    ];
    let outcomes = wait_for(
        "a config stream outcome of each proxy in the spy pod",
        READY,
        || {
            let pods = &pods;
            async move {
                let mut outcomes = Vec::new();
                for container in containers {
                    match stream_outcome(pods, "spy", container).await? {
                        Some(outcome) => outcomes.push(outcome),
                        None => return Ok(None),
                    }
                }
                Ok(Some(outcomes))
            }
        },
    )
    .await?;
    assert_eq!(
        outcomes[0],
        Stream::Served,
        "the spy pod's own sidecar is served"
    );
    for (container, outcome, reason) in [
        (
            "claims-other-account",
            &outcomes[1],
            "runs under ServiceAccount \"other\"",
        ),
        (
            "claims-same-account",
            &outcomes[2],
            "this connection comes from",
        ),
    ] {
        match outcome {
            Stream::Refused(error) => assert!(
                error.contains("403") && error.contains(reason),
                "{container}: refused for another reason: {error}"
            ),
            Stream::Served => panic!("{container}: read the config of another pod"),
        }
    }
    Ok(())
}
