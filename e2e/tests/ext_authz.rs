//! External authorization on the real cluster: the demo authorizer (`ext-authz`, on the official
//! ext_authz protocol definitions) runs outside the mesh in its own namespace and serves both
//! protocols; the Mesh names it as three `extensionProviders` (HTTP, gRPC, and HTTP with
//! `failOpen`), and CUSTOM AuthorizationPolicies send `/http/*`, `/grpc/*` and `/open/*` of the
//! meshed demo server to them. A meshed client calls through its sidecar (mesh mutual TLS).
//!
//! It shows that the authorizer's answer decides (the `x-ext-authz` header of the request) with
//! both protocols, that its denial reaches the client, and that with the authorizer scaled to 0
//! requests are denied — or allowed where the provider is `failOpen`. The Mesh's providers are
//! restored at the end, whatever happened.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);
/// How long a policy or Mesh change may take to reach the server's proxy.
const PROPAGATION: Duration = Duration::from_secs(60);

/// Puts the Mesh's `extensionProviders` back as they were when dropped.
struct RestoreProviders(Value);

impl Drop for RestoreProviders {
    fn drop(&mut self) {
        if let Err(e) = patch_mesh_spec(&json!({"extensionProviders": self.0})) {
            eprintln!("could not restore the Mesh's extensionProviders: {e}");
        }
    }
}

fn authorizer_yaml(namespace: &str) -> String {
    let image = demo_image();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: ext-authz, namespace: {namespace}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: ext-authz}}}}
  template:
    metadata: {{labels: {{app: ext-authz}}}}
    spec:
      containers:
      - name: authz
        image: {image}
        imagePullPolicy: IfNotPresent
        command: [/ext-authz]
        args: [--http-port, "8000", --grpc-port, "9000"]
        ports: [{{name: http, containerPort: 8000}}, {{name: grpc, containerPort: 9000}}]
        readinessProbe: {{tcpSocket: {{port: 9000}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: ext-authz, namespace: {namespace}}}
spec:
  selector: {{app: ext-authz}}
  ports: [{{name: http, port: 8000}}, {{name: grpc, port: 9000}}]
"#
    )
}

/// A meshed pod that stays up, so each call is one `kubectl exec` of `demo-client`.
fn caller_yaml(namespace: &str) -> String {
    let image = demo_image();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: caller, namespace: {namespace}, labels: {{app: caller}}}}
spec:
  containers:
  - name: client
    image: {image}
    imagePullPolicy: IfNotPresent
    args: [--port, "8080"]
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
"#
    )
}

struct Caller {
    namespace: String,
    url: String,
}

impl Caller {
    /// One GET of `path` with `x-ext-authz: <decision>` (none when empty); the status, or the
    /// client's error.
    fn status(&self, path: &str, decision: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.url);
        let header = format!("x-ext-authz: {decision}");
        let mut args = vec![
            "exec",
            "-n",
            &self.namespace,
            "caller",
            "-c",
            "client",
            "--",
            "/demo-client",
            "--url",
            &url,
            "--count",
            "1",
            "--timeout",
            "10s",
        ];
        if !decision.is_empty() {
            args.extend(["-H", header.as_str()]);
        }
        let output = kubectl(&args, None)?;
        let line = output
            .lines()
            .find(|l| l.contains("\"sent\""))
            .ok_or_else(|| anyhow::anyhow!("no summary in {output:?}"))?;
        let summary: ClientSummary = serde_json::from_str(line)?;
        Ok(summary
            .by_status
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| format!("error {:?}", summary.errors)))
    }

    /// Waits until GET `path` with `decision` answers `expected` (a change propagating).
    async fn expect(&self, path: &str, decision: &str, expected: &str) -> anyhow::Result<()> {
        let mut last = String::new();
        let waited = wait_for(
            &format!("GET {path} (x-ext-authz: {decision:?}) to answer {expected}"),
            PROPAGATION,
            || {
                let got = self.status(path, decision);
                let matched = matches!(&got, Ok(status) if status == expected);
                last = format!("{got:?}");
                async move { Ok(matched.then_some(())) }
            },
        )
        .await;
        waited.map_err(|e| anyhow::anyhow!("{e} (last answer: {last})"))
    }
}

#[tokio::test]
async fn custom_policies_follow_the_external_authorizer() -> anyhow::Result<()> {
    let client = client().await?;
    let authz_ns = TestNamespace::create("e2e-extauthz-authz", &[])?;
    let ns = TestNamespace::create("e2e-extauthz", &[("trellis.dev/inject", "enabled")])?;
    apply(&authorizer_yaml(&authz_ns.name))?;
    apply(&echo_server_yaml(&ns.name, "web", "v1", 1))?;
    apply(&caller_yaml(&ns.name))?;

    let original =
        serde_json::from_str::<Value>(&kubectl(&["get", "mesh", "default", "-o", "json"], None)?)?
            ["spec"]["extensionProviders"]
            .clone();
    let _restore = RestoreProviders(original);
    let service = format!("ext-authz.{}.svc.cluster.local", authz_ns.name);
    patch_mesh_spec(&json!({"extensionProviders": [
        {"name": "e2e-http", "envoyExtAuthzHttp": {
            "service": service, "port": 8000, "timeout": "3s",
            "includeRequestHeadersInCheck": ["x-ext-authz"],
            "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
            "headersToDownstreamOnDeny": ["x-ext-authz-check-result"]}},
        {"name": "e2e-grpc", "envoyExtAuthzGrpc": {"service": service, "port": 9000, "timeout": "3s"}},
        {"name": "e2e-open", "envoyExtAuthzHttp": {
            "service": service, "port": 8000, "timeout": "3s", "failOpen": true,
            "includeRequestHeadersInCheck": ["x-ext-authz"]}},
    ]}))?;
    let mut policies = Vec::new();
    for (name, provider, prefix) in [
        ("ext-http", "e2e-http", "/http/*"),
        ("ext-grpc", "e2e-grpc", "/grpc/*"),
        ("ext-open", "e2e-open", "/open/*"),
    ] {
        policies.push(Applied::spec(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            &ns.name,
            name,
            json!({
                "selector": {"matchLabels": {"app": "web"}},
                "action": "CUSTOM",
                "provider": {"name": provider},
                "rules": [{"to": [{"operation": {"paths": [prefix]}}]}],
            }),
        )?);
    }
    wait_pods_ready(&client, &authz_ns.name, "app=ext-authz", 1, READY).await?;
    wait_pods_ready(&client, &ns.name, "app=web", 1, READY).await?;
    wait_pods_ready(&client, &ns.name, "app=caller", 1, READY).await?;
    let caller = Caller {
        namespace: ns.name.clone(),
        url: format!("http://web.{}.svc.cluster.local", ns.name),
    };

    // The authorizer decides, with both protocols; what no CUSTOM policy matches is not asked.
    for path in ["/http/items", "/grpc/items", "/open/items"] {
        caller.expect(path, "deny", "403").await?;
        assert_eq!(caller.status(path, "allow")?, "200", "{path}");
        assert_eq!(caller.status(path, "")?, "403", "{path}: no header, denied");
    }
    assert_eq!(caller.status("/public", "")?, "200");

    // The authorizer down: fail closed, except where the provider is failOpen.
    kubectl(
        &[
            "scale",
            "deployment/ext-authz",
            "-n",
            &authz_ns.name,
            "--replicas=0",
        ],
        None,
    )?;
    caller.expect("/open/items", "", "200").await?;
    for path in ["/http/items", "/grpc/items"] {
        assert_eq!(
            caller.status(path, "allow")?,
            "403",
            "{path}: authorizer down"
        );
    }
    assert_eq!(caller.status("/public", "")?, "200");
    drop(policies);
    Ok(())
}
