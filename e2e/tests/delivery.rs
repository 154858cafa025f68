//! Delivery: every image the cluster runs is pulled from the in-cluster registry (nothing is
//! side-loaded into the node), `make push` delivers the same images to any other registry and a
//! pod runs from there, and images stamped with another version report it from every binary.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{ListParams, LogParams};
use trellis_e2e::*;

const INJECT: (&str, &str) = ("trellis.dev/inject", "enabled");
const READY: Duration = Duration::from_secs(180);
const REPOSITORIES: [&str; 6] = ["operator", "proxy", "init", "cni", "cli", "demo"];

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The in-cluster registry as the node pulls from it and as this host reaches it.
fn cluster_registry() -> Result<(String, String)> {
    let out = run(Command::new(workspace().join("e2e/cluster.sh")).arg("registry"))?;
    let mut words = out.split_whitespace();
    match (words.next(), words.next()) {
        (Some(pull), Some(push)) => Ok((pull.to_owned(), push.to_owned())),
        _ => bail!("cluster.sh registry printed {out:?}"),
    }
}

/// GET from a registry's distribution API (`/v2/...`) on this host.
fn registry_get(registry: &str, path: &str) -> Result<serde_json::Value> {
    let body = run(Command::new("curl").args([
        "-fsS",
        "--max-time",
        "10",
        &format!("http://{registry}/v2/{path}"),
    ]))?;
    serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))
}

fn catalogue(registry: &str) -> Result<BTreeSet<String>> {
    let catalogue = registry_get(registry, "_catalog")?;
    Ok(catalogue["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect())
}

fn tags(registry: &str, repository: &str) -> Result<BTreeSet<String>> {
    let list = registry_get(registry, &format!("{repository}/tags/list"))?;
    Ok(list["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect())
}

fn next_version() -> Result<String> {
    std::env::var("TRELLIS_NEXT_VERSION")
        .context("TRELLIS_NEXT_VERSION is not set: run the e2e tests through `make e2e`")
}

/// Every container of every pod (init containers included): (pod, image, imageID).
async fn running_images(client: &kube::Client) -> Result<Vec<(String, String, String)>> {
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut images = Vec::new();
    // Pods on their way out (a namespace another test deleted) no longer count.
    for pod in pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.unwrap_or_default(),
            pod.metadata.name.unwrap_or_default()
        );
        let status = pod.status.unwrap_or_default();
        for c in status
            .container_statuses
            .into_iter()
            .flatten()
            .chain(status.init_container_statuses.into_iter().flatten())
        {
            images.push((name.clone(), c.image, c.image_id));
        }
    }
    Ok(images)
}

#[tokio::test]
async fn every_image_is_pulled_from_the_in_cluster_registry() -> Result<()> {
    let client = client().await?;
    let (pull, push) = cluster_registry()?;
    // A meshed pod, so the proxy and init images are among those checked.
    let ns = TestNamespace::create("e2e-delivery", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;

    let images = running_images(&client).await?;
    let mut seen = BTreeSet::new();
    for (pod, image, image_id) in &images {
        ensure!(
            image.starts_with(&format!("{pull}/")),
            "{pod} runs {image}, not an image of the in-cluster registry {pull}"
        );
        // A pulled image is known by its registry digest; an imported archive has none.
        let repository = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
        ensure!(
            image_id.starts_with(&format!("{repository}@sha256:")),
            "{pod}: {image} was not pulled from the registry (image ID {image_id:?})"
        );
        seen.insert(
            repository
                .trim_start_matches(&format!("{pull}/"))
                .to_owned(),
        );
    }
    for component in ["operator", "proxy", "init", "demo"] {
        ensure!(
            seen.contains(&format!("trellis/{component}")),
            "no running {component} image in {seen:?}"
        );
    }

    // The registry holds every image in both versions e2e made, and the node's containerd holds
    // only what it pulled from there: the pause image included, nothing imported by name.
    let repositories = catalogue(&push)?;
    let next = next_version()?;
    for component in REPOSITORIES {
        let repository = format!("trellis/{component}");
        ensure!(
            repositories.contains(&repository),
            "{repository} not in the registry's catalogue {repositories:?}"
        );
        let tags = tags(&push, &repository)?;
        ensure!(
            tags.contains(&version()) && tags.contains(&next),
            "{repository} tags {tags:?}"
        );
    }
    ensure!(repositories.contains("kube/pause"), "{repositories:?}");
    let state = std::env::var("KUBE_STATE").unwrap_or_else(|_| "/tmp/trellis-kube".to_owned());
    let node_images = run(Command::new("ctr").args([
        "--address",
        &format!("{state}/containerd/containerd.sock"),
        "-n",
        "k8s.io",
        "images",
        "ls",
        "-q",
    ]))?;
    // (127.0.0.1:<port>: the registries `make push` is tested with, below.)
    let foreign: Vec<&str> = node_images
        .lines()
        .filter(|name| {
            !name.starts_with("sha256:")
                && !name.starts_with(&format!("{pull}/"))
                && !name.starts_with("127.0.0.1:")
        })
        .collect();
    ensure!(
        foreign.is_empty(),
        "images on the node that did not come from a registry: {foreign:?}"
    );
    Ok(())
}

#[tokio::test]
async fn make_push_delivers_the_images_to_another_registry_and_a_pod_runs_from_it() -> Result<()> {
    let client = client().await?;
    // A second registry, on a port both this host and the node reach as 127.0.0.1.
    let port = 15100 + rand::random::<u16>() % 800;
    let user_registry = format!("127.0.0.1:{port}");
    run(Command::new(workspace().join("e2e/cluster.sh")).args([
        "registry-start",
        &format!("user{port}"),
        &port.to_string(),
    ]))?;
    let target = format!("{user_registry}/x");
    // The e2e images' build (push's default profile is release, a second long build here).
    run(Command::new("make")
        .current_dir(workspace())
        .args(["--no-print-directory", "push", "PUSH_PROFILE=release-fast"])
        .arg(format!("REGISTRY={target}")))?;
    let repositories = catalogue(&user_registry)?;
    for component in REPOSITORIES {
        ensure!(
            repositories.contains(&format!("x/{component}")),
            "x/{component} not in {repositories:?}"
        );
    }

    let ns = TestNamespace::create("e2e-push", &[])?;
    let image = format!("{target}/demo:{}", version());
    apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pushed, namespace: {ns}, labels: {{app: pushed}}}}\n\
         spec:\n  containers:\n  - name: server\n    image: {image}\n    \
         readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n",
        ns = ns.name
    ))?;
    wait_pods_ready(&client, &ns.name, "app=pushed", 1, READY).await?;
    // The images are reproducible, so the node may already hold the same content under the
    // cluster registry's name (and report that name in the pod's status); the kubelet's event
    // shows it pulled this reference, from this registry.
    let events = Api::<Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default().fields("involvedObject.name=pushed"))
        .await?;
    let pulled = format!("Successfully pulled image \"{image}\"");
    ensure!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Pulled")
                && e.message.as_deref().is_some_and(|m| m.starts_with(&pulled))),
        "no event of the kubelet pulling {image}: {:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.message))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn each_binary_reports_the_version_its_image_was_made_for() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-version", &[])?;
    // (image, container, the command that prints the version, what it prints before it)
    let binaries = [
        (
            "operator",
            ["/trellis-operator", "--version"],
            "trellis-operator ",
        ),
        ("proxy", ["/trellis-proxy", "--version"], "trellis-proxy "),
        ("init", ["/trellis-init", "--version"], "trellis-init "),
        ("cni", ["/trellis-cni", "--version"], "trellis-cni "),
        ("cli", ["/trellisctl", "version"], "trellisctl "),
    ];
    let versions = [version(), next_version()?];
    for (index, stamped) in versions.iter().enumerate() {
        let containers: String = binaries
            .iter()
            .map(|(component, command, _)| {
                format!(
                    "  - name: {component}\n    image: {}/{component}:{stamped}\n    command: {command:?}\n",
                    image_registry()
                )
            })
            .collect();
        apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: version-{index}, namespace: {ns}}}\n\
             spec:\n  restartPolicy: Never\n  containers:\n{containers}",
            ns = ns.name
        ))?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for (index, stamped) in versions.iter().enumerate() {
        let name = format!("version-{index}");
        wait_for(&format!("pod {name} to finish"), READY, || {
            let pods = pods.clone();
            let name = name.clone();
            async move {
                let pod = pods.get(&name).await?;
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                ensure!(phase != "Failed", "{name} failed: a binary exited non-zero");
                Ok((phase == "Succeeded").then_some(()))
            }
        })
        .await?;
        for (component, _, prefix) in &binaries {
            let logs = pods
                .logs(
                    &name,
                    &LogParams {
                        container: Some((*component).to_owned()),
                        ..LogParams::default()
                    },
                )
                .await?;
            let first = logs.lines().next().unwrap_or_default();
            ensure!(
                first == format!("{prefix}{stamped}"),
                "{component} image {stamped} says {first:?}"
            );
        }
    }
    Ok(())
}
