//! Zero-trust on the real cluster: automatic mutual TLS between sidecars and PeerAuthentication
//! (mesh-wide STRICT, PERMISSIVE, a workload override under namespace STRICT, port-level
//! DISABLE), observed from a meshed and an unmeshed client.

use std::time::Duration;

use serde_json::Value;
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);
const ROOT_NAMESPACE: &str = "trellis-system";

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

impl Clients {
    /// Five requests from each client; returns (meshed ok, unmeshed ok).
    async fn run(&self, client: &kube::Client) -> anyhow::Result<(u64, u64)> {
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
        let meshed = run_client(
            client,
            &self.meshed_ns,
            &format!("meshed-{n}"),
            &args,
            READY,
        )
        .await?;
        let plain = run_client(client, &self.plain_ns, &format!("plain-{n}"), &args, READY).await?;
        Ok((meshed.ok, plain.ok))
    }
}

#[tokio::test]
async fn peer_authentication_modes_are_enforced_between_meshed_and_unmeshed_clients()
-> anyhow::Result<()> {
    let client = client().await?;
    let server_ns = TestNamespace::create("e2e-mtls", &[("trellis.dev/inject", "enabled")])?;
    let meshed_ns = TestNamespace::create("e2e-mtls-client", &[("trellis.dev/inject", "enabled")])?;
    let plain_ns = TestNamespace::create("e2e-mtls-plain", &[])?;
    apply(&echo_server_yaml(&server_ns.name, "secure", "v1", 1))?;
    let pods = wait_pods_ready(&client, &server_ns.name, "app=secure", 1, READY).await?;
    let server = pods[0].metadata.name.clone().unwrap_or_default();
    let clients = Clients {
        meshed_ns: meshed_ns.name.clone(),
        plain_ns: plain_ns.name.clone(),
        url: format!("http://secure.{}.svc.cluster.local/", server_ns.name),
        runs: Default::default(),
    };

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

    // Mesh-wide STRICT: plaintext from the unmeshed client is refused, meshed still works.
    let mesh_wide = peer_authentication(
        ROOT_NAMESPACE,
        "default",
        serde_json::json!({"mtls": {"mode": "STRICT"}}),
    )?;
    wait_for_mode(&server_ns.name, &server, "STRICT").await?;
    assert_eq!(
        clients.run(&client).await?,
        (5, 0),
        "mesh-wide STRICT refuses plaintext only"
    );

    // Namespace STRICT with a workload-level PERMISSIVE override: the override wins.
    let namespace_strict = peer_authentication(
        &server_ns.name,
        "default",
        serde_json::json!({"mtls": {"mode": "STRICT"}}),
    )?;
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
    drop(mesh_wide);
    Ok(())
}
