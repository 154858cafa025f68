//! CNI interception on the real cluster: with `Mesh.spec.interception: cni` the chained plugin
//! captures pods that have no NET_ADMIN init container, the node's primary plugin stays in the
//! conflist, and switching back to `initContainer` removes the plugin from the node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);

fn dir_from_env(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
        anyhow::anyhow!(
            "{name} is not set: run through `make e2e`, which passes the cluster's CNI directories"
        )
    })
}

/// Switches the Mesh's interception mode; dropping it switches back to `initContainer`, so a
/// failing test never leaves the cluster in CNI mode for the tests after it.
struct InterceptionMode;

impl InterceptionMode {
    fn cni(bin_dir: &Path, conf_dir: &Path) -> anyhow::Result<Self> {
        patch_mesh_spec(
            &serde_json::json!({"interception": "cni", "cni": {"binDir": bin_dir, "confDir": conf_dir}}),
        )?;
        Ok(Self)
    }
}

impl Drop for InterceptionMode {
    fn drop(&mut self) {
        let reset =
            serde_json::json!({"interception": "initContainer", "cni": {"excludeNamespaces": []}});
        let _ = patch_mesh_spec(&reset);
    }
}

fn set_excluded_namespaces(namespaces: &[&str]) -> anyhow::Result<()> {
    patch_mesh_spec(&serde_json::json!({"cni": {"excludeNamespaces": namespaces}}))
}

/// Waits until our entry in the node's conflist satisfies `check`.
async fn wait_for_plugin_config(
    conf_dir: &Path,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    wait_for(
        "the plugin's conflist entry to be updated",
        Duration::from_secs(120),
        || {
            let conflist = primary_conflist(conf_dir);
            let matched = conflist.map(|c| {
                c["plugins"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["type"] == "trellis-cni" && check(p))
            });
            async move { Ok(matched?.then_some(())) }
        },
    )
    .await
}

fn primary_conflist(conf_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    files.sort();
    let first = files
        .first()
        .ok_or_else(|| anyhow::anyhow!("no conflist in {}", conf_dir.display()))?;
    Ok(serde_json::from_slice(&std::fs::read(first)?)?)
}

fn plugin_types(conflist: &serde_json::Value) -> Vec<String> {
    conflist["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn cni_mode_captures_without_net_admin_and_switching_back_removes_the_plugin()
-> anyhow::Result<()> {
    let client = client().await?;
    let (bin_dir, conf_dir) = (
        dir_from_env("TRELLIS_CNI_BIN_DIR")?,
        dir_from_env("TRELLIS_CNI_CONF_DIR")?,
    );
    let mode = InterceptionMode::cni(&bin_dir, &conf_dir)?;

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "trellis-system");
    wait_for("the CNI installer DaemonSet to be ready", READY, || {
        let daemonsets = daemonsets.clone();
        async move {
            let ready = daemonsets
                .get_opt("trellis-cni")
                .await?
                .and_then(|d| d.status)
                .map(|s| s.number_ready)
                .unwrap_or(0);
            Ok((ready >= 1).then_some(()))
        }
    })
    .await?;
    let conf = conf_dir.clone();
    let types = wait_for(
        "trellis-cni chained into the node's conflist",
        Duration::from_secs(60),
        || {
            let conf = conf.clone();
            async move {
                let types = plugin_types(&primary_conflist(&conf)?);
                Ok(types.contains(&"trellis-cni".to_owned()).then_some(types))
            }
        },
    )
    .await?;
    assert_eq!(
        types.first().map(String::as_str),
        Some("bridge"),
        "the primary plugin stays first: {types:?}"
    );
    assert_eq!(
        types.last().map(String::as_str),
        Some("trellis-cni"),
        "ours is chained last: {types:?}"
    );
    assert!(
        bin_dir.join("trellis-cni").exists(),
        "plugin binary installed"
    );

    // Meshed pods: no NET_ADMIN anywhere, yet their traffic crosses both sidecars.
    let ns = TestNamespace::create("e2e-cni", &[("trellis.dev/inject", "enabled")])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    let servers = wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let url = format!("http://echo.{}.svc.cluster.local/", ns.name);
    apply(&client_pod_yaml(
        &ns.name,
        "client",
        &[
            "--url", &url, "--rate", "20", "--count", "40", "--linger", "120s",
        ],
        &[],
    ))?;
    let summary = client_summary(&client, &ns.name, "client", READY).await?;
    assert_eq!((summary.sent, summary.ok), (40, 40), "{summary:?}");
    let client_pod = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .get("client")
        .await?;
    for pod in [&servers[0], &client_pod] {
        let spec = pod.spec.clone().unwrap_or_default();
        let all: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .collect();
        let names: Vec<_> = all.iter().map(|c| c.name.as_str()).collect();
        assert!(
            !names.contains(&"trellis-init"),
            "no capture init container in CNI mode: {names:?}"
        );
        assert!(
            names.contains(&"trellis-validation") && names.contains(&"trellis-proxy"),
            "{names:?}"
        );
        for container in all {
            let added = container
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.add.clone())
                .unwrap_or_default();
            assert!(
                !added.iter().any(|c| c == "NET_ADMIN"),
                "{} asks for NET_ADMIN",
                container.name
            );
        }
    }
    let server = servers[0].metadata.name.clone().unwrap_or_default();
    let outbound = pod_http_get(&client, &ns.name, "client", 15020, "/stats/prometheus").await?;
    let inbound = pod_http_get(&client, &ns.name, &server, 15020, "/stats/prometheus").await?;
    assert!(
        counter_sum(&outbound, "istio_requests_total", &[("reporter", "source")]) >= 1.0,
        "{outbound}"
    );
    assert!(
        counter_sum(
            &inbound,
            "istio_requests_total",
            &[("reporter", "destination")]
        ) >= 1.0,
        "{inbound}"
    );

    // A pod whose network was set up without the plugin (here: its namespace excluded from the
    // plugin, so ADD leaves it alone) fails its capture check, is deleted by the repair loop,
    // and comes back captured once the plugin handles its namespace again.
    let victim = TestNamespace::create("e2e-cni-repair", &[("trellis.dev/inject", "enabled")])?;
    set_excluded_namespaces(&[&victim.name])?;
    wait_for_plugin_config(&conf_dir, |entry| {
        entry["excludeNamespaces"]
            .as_array()
            .is_some_and(|e| e.iter().any(|n| n == victim.name.as_str()))
    })
    .await?;
    apply(&echo_server_yaml(&victim.name, "victim", "v1", 1))?;
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &victim.name);
    wait_for(
        "the repair loop to report a pod without capture",
        READY,
        || {
            let events = events.clone();
            async move {
                let list = events.list(&Default::default()).await?;
                Ok(list
                    .items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("CaptureMissing"))
                    .then_some(()))
            }
        },
    )
    .await?;
    set_excluded_namespaces(&[])?;
    let recreated = wait_pods_ready(
        &client,
        &victim.name,
        "app=victim",
        1,
        Duration::from_secs(240),
    )
    .await?;
    let checks = recreated[0]
        .status
        .clone()
        .unwrap_or_default()
        .init_container_statuses
        .unwrap_or_default();
    let validation = checks
        .iter()
        .find(|c| c.name == "trellis-validation")
        .expect("validation container status");
    let passed = validation
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    assert_eq!(
        passed,
        Some(0),
        "the recreated pod passed its capture check: {validation:?}"
    );

    // Back to init containers: the installer goes away and takes the plugin off the node.
    drop(mode);
    let conf = conf_dir.clone();
    let types = wait_for(
        "trellis-cni removed from the node's conflist",
        Duration::from_secs(90),
        || {
            let conf = conf.clone();
            async move {
                let types = plugin_types(&primary_conflist(&conf)?);
                Ok((!types.contains(&"trellis-cni".to_owned())).then_some(types))
            }
        },
    )
    .await?;
    assert_eq!(
        types,
        ["bridge", "portmap"],
        "the primary conflist is as it was"
    );
    assert!(
        !bin_dir.join("trellis-cni").exists(),
        "plugin binary removed"
    );
    assert!(
        daemonsets.get_opt("trellis-cni").await?.is_none(),
        "installer DaemonSet deleted"
    );
    Ok(())
}
