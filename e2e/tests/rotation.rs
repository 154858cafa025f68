//! Certificate rotation on the real cluster: workload certificates with a 2-minute lifetime
//! renewed twice under a fixed-rate load, then a root rotation through all its phases, with
//! not one failed request. Every request opens a new connection (`connection: close`), so each
//! one is a fresh mutual-TLS handshake between the sidecars with whatever certificates and trust
//! bundles they hold at that instant.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;
use trellis_api::Mesh;
use trellis_api::mesh::RootRotationPhase;
use trellis_e2e::*;

const INJECT: (&str, &str) = ("trellis.dev/inject", "enabled");
const READY: Duration = Duration::from_secs(180);
/// Seconds of load: long enough for two workload rotations and a root rotation, with margin.
/// `make e2e-long` runs the same test as a soak (suite `rotation-soak`): a longer load over
/// many more 30-second renewals, still without one failed request.
fn load_seconds() -> u64 {
    match std::env::var("TRELLIS_E2E_SOAK_SECONDS") {
        Err(_) => 200,
        // A soak that silently ran the short test would pass having soaked nothing.
        Ok(s) => s.parse().unwrap_or_else(|_| {
            panic!("TRELLIS_E2E_SOAK_SECONDS={s:?} is not a number of seconds")
        }),
    }
}
const RATE: u64 = 20;
/// Load clients and the Service each calls.
const CLIENTS: [(&str, &str); 2] = [("tcp-client", "echo-tcp"), ("http-client", "echo")];

/// Sets the `default` Mesh's certificate settings for the test and puts the original ones back
/// when dropped, also when the test fails, so other e2e tests see the usual mesh.
struct MeshCertificates {
    original: Value,
}

impl MeshCertificates {
    async fn set(client: &kube::Client, settings: Value) -> anyhow::Result<Self> {
        let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
        let original = serde_json::to_value(&mesh.spec.certificates)?;
        patch_certificates(&settings)?;
        Ok(Self { original })
    }
}

impl Drop for MeshCertificates {
    fn drop(&mut self) {
        // A merge patch cannot drop a key it does not name: name every one we may have set.
        let mut restore = self.original.clone();
        for key in ["workloadTtl", "rotationPercent", "rootRotation"] {
            if restore.get(key).is_none() {
                restore[key] = Value::Null;
            }
        }
        if let Err(e) = patch_certificates(&restore) {
            eprintln!("could not restore the Mesh's certificate settings: {e:#}");
        }
    }
}

fn patch_certificates(settings: &Value) -> anyhow::Result<()> {
    patch_mesh_spec(&serde_json::json!({ "certificates": settings }))
}

/// What a proxy's `/config_dump` says about its certificate and trust bundle.
#[derive(Debug, Clone)]
struct Held {
    serial: String,
    not_before: String,
    leaf: Vec<u8>,
    trust_bundle: Vec<String>,
}

async fn held(admin: &PortForward) -> anyhow::Result<Held> {
    let dump: Value = serde_json::from_str(&admin.get("/config_dump").await?)?;
    let certificate = &dump["certificate"];
    let leaf = certificate["certChain"][0]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no certificate in the config dump: {dump:#}"))?;
    Ok(Held {
        serial: certificate["serial"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        not_before: certificate["notBefore"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        leaf: base64::engine::general_purpose::STANDARD.decode(leaf)?,
        trust_bundle: dump["config"]["trustBundle"]
            .as_array()
            .map(|roots| {
                roots
                    .iter()
                    .filter_map(|r| r.as_str().map(|r| r.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Whether the DER leaf is signed by the PEM root.
fn signed_by(leaf: &[u8], root_pem: &str) -> anyhow::Result<bool> {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes())?;
    let root = pem.parse_x509()?;
    Ok(leaf.verify_signature(Some(root.public_key())).is_ok())
}

async fn configmap_roots(client: &kube::Client, namespace: &str) -> anyhow::Result<Vec<String>> {
    let configmap = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get("trellis-ca-root-cert")
        .await?;
    let pems = configmap
        .data
        .unwrap_or_default()
        .remove("root-cert.pem")
        .unwrap_or_default();
    Ok(pems
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|block| block.ends_with("-----END CERTIFICATE-----"))
        .map(str::to_owned)
        .collect())
}

async fn mesh_rotation(
    client: &kube::Client,
) -> anyhow::Result<Option<(String, RootRotationPhase)>> {
    let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
    Ok(mesh
        .status
        .and_then(|s| s.root_rotation)
        .map(|r| (r.trigger, r.phase)))
}

#[tokio::test]
async fn certificates_and_the_root_rotate_under_load_without_a_failed_request() -> anyhow::Result<()>
{
    let client = client().await?;
    // Renew at a quarter of the lifetime: two rotations within a minute of the pods starting.
    let _settings = MeshCertificates::set(
        &client,
        serde_json::json!({"workloadTtl": "2m", "rotationPercent": 25}),
    )
    .await?;
    wait_for("the Mesh to take the 2m workload TTL", READY, || {
        let client = client.clone();
        async move {
            let mesh = Api::<Mesh>::all(client).get("default").await?;
            let status = mesh.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((ready && status.observed_generation == mesh.metadata.generation).then_some(()))
        }
    })
    .await?;

    let ns = TestNamespace::create("e2e-rotation", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    let servers = wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let server = servers[0].metadata.name.clone().unwrap_or_default();
    // The same server behind an opaque-TCP port: there the client's sidecar opens one mutual
    // TLS connection per application connection, so with `connection: close` every request is
    // a new handshake. Through the HTTP port the sidecars share one pooled HTTP/2 connection,
    // which must keep working across renewals and the expiry of the certificates it began with.
    apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo-tcp, namespace: {}}}\nspec:\n  \
         selector: {{app: echo}}\n  ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}]\n",
        ns.name
    ))?;
    let (load, rate) = (format!("{}s", load_seconds()), RATE.to_string());
    for (name, service) in CLIENTS {
        let url = format!("http://{service}.{}.svc.cluster.local/", ns.name);
        apply(&client_pod_yaml(
            &ns.name,
            name,
            &[
                "--url",
                &url,
                "--rate",
                &rate,
                "--duration",
                &load,
                "--header",
                "connection: close",
                "--timeout",
                "3s",
                "--linger",
                "300s",
            ],
            &[],
        ))?;
    }
    for (name, _) in CLIENTS {
        wait_pods_ready(&client, &ns.name, &format!("app={name}"), 1, READY).await?;
    }
    let server_admin = PortForward::start(&ns.name, &format!("pod/{server}"), 15000)?;
    let client_admin = PortForward::start(&ns.name, "pod/tcp-client", 15000)?;

    // Two workload rotations on the server's sidecar: three distinct certificates in turn.
    let first = held(&server_admin).await?;
    let seen = RefCell::new(vec![first]);
    wait_for(
        "two renewals of the server's 2-minute certificate",
        Duration::from_secs(150),
        || {
            let (admin, seen) = (&server_admin, &seen);
            async move {
                let now = held(admin).await?;
                let mut seen = seen.borrow_mut();
                if seen.last().map(|h| &h.serial) != Some(&now.serial) {
                    eprintln!("server certificate {} from {}", now.serial, now.not_before);
                    seen.push(now);
                }
                Ok((seen.len() >= 3).then_some(()))
            }
        },
    )
    .await?;
    let seen = seen.into_inner();
    let serials: Vec<&String> = seen.iter().map(|h| &h.serial).collect();
    let not_befores: BTreeSet<&String> = seen.iter().map(|h| &h.not_before).collect();
    assert_eq!(
        serials.iter().collect::<BTreeSet<_>>().len(),
        serials.len(),
        "every renewal is a new certificate: {serials:?}"
    );
    assert!(
        not_befores.len() >= 2,
        "renewed certificates start later: {not_befores:?}"
    );
    let client_before = held(&client_admin).await?;

    // Root rotation: both roots trusted, then the new one signs, then the old one goes.
    let old_roots = configmap_roots(&client, &ns.name).await?;
    assert_eq!(old_roots.len(), 1, "one root before the rotation");
    let old_root = old_roots[0].clone();
    assert!(signed_by(&client_before.leaf, &old_root)?);
    let trigger = format!("e2e-{:08x}", rand::random::<u32>());
    // Events are kept for an hour: only those from this rotation count.
    let triggered =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1);
    patch_certificates(&serde_json::json!({"rootRotation": trigger}))?;
    let phases = RefCell::new(Vec::new());
    wait_for(
        "the root rotation to complete",
        Duration::from_secs(150),
        || {
            let (client, trigger, phases) = (&client, &trigger, &phases);
            async move {
                let Some((seen, phase)) = mesh_rotation(client).await? else {
                    return Ok(None);
                };
                if &seen != trigger {
                    return Ok(None);
                }
                let mut phases = phases.borrow_mut();
                if phases.last() != Some(&phase) {
                    eprintln!("root rotation phase {phase:?}");
                    phases.push(phase);
                }
                Ok((phase == RootRotationPhase::Complete).then_some(()))
            }
        },
    )
    .await?;

    // Every phase was entered, in order, and announced with an event on the Mesh.
    let events = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default().fields("involvedObject.kind=Mesh,involvedObject.name=default"))
        .await?;
    let announced: BTreeSet<String> = events
        .items
        .iter()
        .filter(|e| e.last_timestamp.as_ref().is_some_and(|t| t.0 >= triggered))
        .filter_map(|e| e.reason.clone())
        .filter(|r| r.starts_with("RootRotation"))
        .collect();
    for reason in [
        "RootRotationTrustBoth",
        "RootRotationSignNew",
        "RootRotationComplete",
    ] {
        assert!(announced.contains(reason), "{reason} in {announced:?}");
    }

    // Afterwards: one root, the new one, everywhere; both sidecars hold certificates from it.
    let new_roots = configmap_roots(&client, &ns.name).await?;
    assert_eq!(
        new_roots.len(),
        1,
        "only the new root is left: {new_roots:?}"
    );
    let new_root = new_roots[0].clone();
    assert_ne!(new_root, old_root, "the root changed");
    for (name, admin) in [("server", &server_admin), ("client", &client_admin)] {
        let new_root = &new_root;
        let now = wait_for(
            &format!("the {name}'s sidecar to drop the old root"),
            Duration::from_secs(30),
            || async move {
                let now = held(admin).await?;
                Ok((now.trust_bundle == [new_root.clone()]).then_some(now))
            },
        )
        .await?;
        assert!(
            signed_by(&now.leaf, new_root)?,
            "{name}'s certificate {} chains to the new root",
            now.serial
        );
        assert!(!signed_by(&now.leaf, &old_root)?);
    }
    let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
    let status = mesh.status.unwrap_or_default();
    let (_, root) = x509_parser::pem::parse_x509_pem(new_root.as_bytes())?;
    let expiry = root.parse_x509()?.validity().not_after.timestamp();
    let reported = status
        .root_cert_expiry
        .map(|t| serde_json::from_value::<Time>(Value::String(t)))
        .transpose()?
        .map(|t| t.0.as_second());
    assert_eq!(
        reported,
        Some(expiry),
        "status.rootCertExpiry is the new root's"
    );

    // The load ran through all of it: not one failed request.
    let mut tcp_sent = 0;
    for (name, _) in CLIENTS {
        let summary = client_summary(
            &client,
            &ns.name,
            name,
            Duration::from_secs(load_seconds() + 40),
        )
        .await?;
        eprintln!("{name}: {summary:?}");
        assert!(
            summary.sent >= RATE * load_seconds() * 3 / 4,
            "{name}: the load ran at the fixed rate: {summary:?}"
        );
        assert_eq!(summary.failed, 0, "{name}: {summary:?}");
        assert_eq!(summary.dropped, 0, "{name}: {summary:?}");
        assert_eq!(summary.ok, summary.sent, "{name}: {summary:?}");
        if name == "tcp-client" {
            tcp_sent = summary.sent;
        }
    }
    // Each request through the TCP port was its own mutual-TLS handshake with the client's
    // identity, whatever certificate and root were current at that moment.
    let metrics = pod_http_get(&client, &ns.name, &server, 15020, "/stats/prometheus").await?;
    let principal = format!("spiffe://cluster.local/ns/{}/sa/default", ns.name);
    let handshakes = counter_sum(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", principal.as_str()),
        ],
    );
    assert!(
        handshakes >= tcp_sent as f64,
        "{handshakes} mutual-TLS connections for {tcp_sent} requests:\n{metrics}"
    );
    Ok(())
}
