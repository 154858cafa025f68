//! AuthorizationPolicy on the real cluster: the demo server behind its sidecar, called by meshed
//! demo clients from two namespaces (two SPIFFE identities). Istio's seed example (ALLOW GET on
//! `app: productpage`: GET 200, POST 403), a DENY on one caller's principal, an ALLOW by
//! namespace, the empty-spec ALLOW that denies everything, and the `Unsupported` Event on a
//! policy with a field Trellis does not enforce (CUSTOM has its own suite, `ext_authz`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);

/// An AuthorizationPolicy, deleted when dropped.
fn authorization_policy(namespace: &str, name: &str, spec: Value) -> anyhow::Result<Applied> {
    Applied::spec(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        namespace,
        name,
        spec,
    )
}

/// Waits until the server's proxy holds exactly the policies `names` (`<namespace>.<name>`).
async fn wait_for_policies(namespace: &str, pod: &str, names: &[String]) -> anyhow::Result<()> {
    let expected: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let admin = PortForward::start(namespace, &format!("pod/{pod}"), 15000)?;
    wait_for(
        &format!("{namespace}/{pod} to hold the policies {expected:?}"),
        Duration::from_secs(60),
        || {
            let (admin, expected) = (&admin, &expected);
            async move {
                let dump: Value = serde_json::from_str(&admin.get("/config_dump").await?)?;
                let authorization = &dump["config"]["inbound"]["authorization"];
                let held: BTreeSet<String> = ["deny", "audit", "allow"]
                    .iter()
                    .flat_map(|action| {
                        authorization[action]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .filter_map(|policy| policy["name"].as_str().map(str::to_owned))
                    .collect();
                let held: BTreeSet<&str> = held.iter().map(String::as_str).collect();
                Ok((held == *expected).then_some(()))
            }
        },
    )
    .await
}

/// The demo clients and what they call.
struct Callers {
    first_ns: String,
    second_ns: String,
    url: String,
    runs: std::cell::Cell<u32>,
}

impl Callers {
    /// Three requests with `method` from the caller in `namespace`; returns the count per status.
    async fn call(
        &self,
        client: &kube::Client,
        namespace: &str,
        method: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let args = [
            "--url",
            self.url.as_str(),
            "--method",
            method,
            "--count",
            "3",
            "--rate",
            "10",
            "--timeout",
            "3s",
        ];
        let name = format!("caller-{}-{n}", method.to_ascii_lowercase());
        Ok(run_client(client, namespace, &name, &args, READY)
            .await?
            .by_status)
    }
}

fn only(status: &str) -> std::collections::BTreeMap<String, u64> {
    std::collections::BTreeMap::from([(status.to_owned(), 3)])
}

/// The Events with reason `Unsupported` on the AuthorizationPolicy `name`.
fn unsupported_events(namespace: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let text = kubectl(&["-n", namespace, "get", "events", "-o", "json"], None)?;
    let events: Value = serde_json::from_str(&text)?;
    Ok(events["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["reason"] == "Unsupported")
        .filter(|e| {
            e["involvedObject"]["kind"] == "AuthorizationPolicy"
                && e["involvedObject"]["name"] == name
        })
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect())
}

#[tokio::test]
async fn authorization_policies_allow_deny_and_report_what_is_unsupported() -> anyhow::Result<()> {
    let client = client().await?;
    let server_ns = TestNamespace::create("e2e-authz", &[("trellis.dev/inject", "enabled")])?;
    let first = TestNamespace::create("e2e-authz-first", &[("trellis.dev/inject", "enabled")])?;
    let second = TestNamespace::create("e2e-authz-second", &[("trellis.dev/inject", "enabled")])?;
    apply(&echo_server_yaml(&server_ns.name, "productpage", "v1", 1))?;
    let pods = wait_pods_ready(&client, &server_ns.name, "app=productpage", 1, READY).await?;
    let server = pods[0].metadata.name.clone().unwrap_or_default();
    let callers = Callers {
        first_ns: first.name.clone(),
        second_ns: second.name.clone(),
        url: format!("http://productpage.{}.svc.cluster.local/", server_ns.name),
        runs: Default::default(),
    };
    let qualified = |name: &str| format!("{}.{name}", server_ns.name);

    // No policy: everything is allowed.
    assert_eq!(
        callers.call(&client, &callers.first_ns, "POST").await?,
        only("200")
    );

    // The seed example: ALLOW GET on app: productpage.
    let allow_get = authorization_policy(
        &server_ns.name,
        "allow-get",
        serde_json::json!({
            "selector": {"matchLabels": {"app": "productpage"}},
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        }),
    )?;
    wait_for_policies(&server_ns.name, &server, &[qualified("allow-get")]).await?;
    assert_eq!(
        callers.call(&client, &callers.first_ns, "GET").await?,
        only("200")
    );
    assert_eq!(
        callers.call(&client, &callers.first_ns, "POST").await?,
        only("403"),
        "POST is not in the ALLOW"
    );
    let metrics = pod_http_get(
        &client,
        &server_ns.name,
        &server,
        15020,
        "/stats/prometheus",
    )
    .await?;
    assert!(
        counter_sum(
            &metrics,
            "trellis_authorization_denied_total",
            &[("policy", "none")]
        ) >= 3.0,
        "{metrics}"
    );

    // A DENY on the second caller's principal blocks that caller only (GET is allowed).
    let second_principal = format!("cluster.local/ns/{}/sa/default", second.name);
    let deny_second = authorization_policy(
        &server_ns.name,
        "deny-second",
        serde_json::json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [second_principal]}}]}],
        }),
    )?;
    wait_for_policies(
        &server_ns.name,
        &server,
        &[qualified("allow-get"), qualified("deny-second")],
    )
    .await?;
    assert_eq!(
        callers.call(&client, &callers.first_ns, "GET").await?,
        only("200")
    );
    assert_eq!(
        callers.call(&client, &callers.second_ns, "GET").await?,
        only("403"),
        "the denied principal"
    );
    drop(deny_second);
    drop(allow_get);

    // ALLOW by namespace: only the first caller's namespace.
    let allow_first = authorization_policy(
        &server_ns.name,
        "allow-first-namespace",
        serde_json::json!({
            "rules": [{"from": [{"source": {"namespaces": [first.name.clone()]}}]}],
        }),
    )?;
    wait_for_policies(
        &server_ns.name,
        &server,
        &[qualified("allow-first-namespace")],
    )
    .await?;
    assert_eq!(
        callers.call(&client, &callers.first_ns, "POST").await?,
        only("200")
    );
    assert_eq!(
        callers.call(&client, &callers.second_ns, "GET").await?,
        only("403")
    );
    drop(allow_first);

    // `spec: {}` is an ALLOW policy that matches nothing: everything is denied.
    let deny_all = authorization_policy(&server_ns.name, "allow-nothing", serde_json::json!({}))?;
    wait_for_policies(&server_ns.name, &server, &[qualified("allow-nothing")]).await?;
    assert_eq!(
        callers.call(&client, &callers.first_ns, "GET").await?,
        only("403")
    );
    drop(deny_all);

    // `source.serviceAccounts` is not enforced: reported, and dropped from the DENY rule, which
    // then denies /admin to everyone (wider, never narrower).
    let _unsupported = authorization_policy(
        &server_ns.name,
        "unsupported",
        serde_json::json!({
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"serviceAccounts": ["other/sa"]}}],
                "to": [{"operation": {"paths": ["/admin*"]}}],
            }],
        }),
    )?;
    let events = wait_for(
        "the Unsupported event on the policy",
        Duration::from_secs(60),
        || {
            let namespace = server_ns.name.clone();
            async move {
                let events = unsupported_events(&namespace, "unsupported")?;
                Ok((!events.is_empty()).then_some(events))
            }
        },
    )
    .await?;
    assert!(
        events.iter().any(|m| m.contains("serviceAccounts")),
        "{events:?}"
    );
    wait_for_policies(&server_ns.name, &server, &[qualified("unsupported")]).await?;
    assert_eq!(
        callers.call(&client, &callers.first_ns, "GET").await?,
        only("200"),
        "the DENY rules match /admin only"
    );

    // A misspelt field is refused by the API server (through the validating webhook) for any
    // client: pruned, `principles` would have left an empty source that matches every caller.
    let typo = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: typo, namespace: {}}}\nspec:\n  rules:\n  - from:\n    - source: {{principles: [cluster.local/ns/x/sa/y]}}\n",
        server_ns.name
    );
    let refused = kubectl(&["apply", "--validate=false", "-f", "-"], Some(&typo))
        .expect_err("a misspelt AuthorizationPolicy field is refused");
    let message = refused.to_string();
    assert!(
        message.contains("denied the request")
            && message.contains("spec.rules[0].from[0].source.principles: unknown field"),
        "{message}"
    );
    Ok(())
}
