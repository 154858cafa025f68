//! The walking skeleton on the real cluster: injection, capture through both sidecars, workload
//! identities, resilience to the control plane going away, Jobs, and Mesh validation/status.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;
use trellis_api::Mesh;
use trellis_e2e::*;

const INJECT: (&str, &str) = ("trellis.dev/inject", "enabled");
const READY: Duration = Duration::from_secs(180);

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.clone().unwrap_or_default();
    let names = |cs: Option<Vec<k8s_openapi::api::core::v1::Container>>| {
        cs.unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    (names(spec.init_containers), names(Some(spec.containers)))
}

fn assert_injected(pod: &Pod) {
    let (init, containers) = container_names(pod);
    let name = pod.metadata.name.clone().unwrap_or_default();
    assert!(
        init.contains(&"trellis-init".to_owned()),
        "{name}: init containers {init:?}"
    );
    let proxy_present = containers.contains(&"trellis-proxy".to_owned())
        || init.contains(&"trellis-proxy".to_owned());
    assert!(proxy_present, "{name}: containers {containers:?}");
}

async fn pod_named(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Pod> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns).get(name).await?)
}

#[tokio::test]
async fn meshed_traffic_crosses_both_sidecars_and_opt_outs_are_honoured() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-mesh", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    let servers = wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let server = servers[0].metadata.name.clone().unwrap_or_default();
    assert_injected(&servers[0]);

    let url = format!("http://echo.{}.svc.cluster.local/", ns.name);
    apply(&client_pod_yaml(
        &ns.name,
        "client",
        &[
            "--url", &url, "--rate", "20", "--count", "60", "--linger", "120s",
        ],
        &[],
    ))?;
    let summary = client_summary(&client, &ns.name, "client", READY).await?;
    assert_injected(&pod_named(&client, &ns.name, "client").await?);
    assert_eq!((summary.sent, summary.ok), (60, 60), "{summary:?}");

    // Both sidecars saw every request (the port is named `http`, so they proxy it as HTTP and
    // report Istio's request metrics), the hop between them over mutual TLS.
    let outbound = pod_http_get(&client, &ns.name, "client", 15020, "/stats/prometheus").await?;
    let inbound = pod_http_get(&client, &ns.name, &server, 15020, "/stats/prometheus").await?;
    let answered = |reporter| {
        [
            ("reporter", reporter),
            ("response_code", "200"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    assert_eq!(
        counter_sum(&outbound, "istio_requests_total", &answered("source")),
        60.0,
        "{outbound}"
    );
    assert_eq!(
        counter_sum(&inbound, "istio_requests_total", &answered("destination")),
        60.0,
        "{inbound}"
    );
    assert!(
        counter_sum(
            &inbound,
            "istio_response_bytes_sum",
            &[("reporter", "destination")]
        ) > 0.0,
        "{inbound}"
    );

    // Opt-out annotation: no sidecar, no init container.
    apply(&client_pod_yaml(
        &ns.name,
        "opted-out",
        &["--url", &url, "--count", "1"],
        &[("sidecar.istio.io/inject", "false")],
    ))?;
    let opted_out = pod_named(&client, &ns.name, "opted-out").await?;
    assert_eq!(
        container_names(&opted_out),
        (vec![], vec!["client".to_owned()])
    );

    // An unlabelled namespace gets nothing either.
    let plain = TestNamespace::create("e2e-plain", &[])?;
    apply(&client_pod_yaml(
        &plain.name,
        "plain",
        &["--url", &url, "--count", "1"],
        &[],
    ))?;
    let plain_pod = pod_named(&client, &plain.name, "plain").await?;
    assert_eq!(
        container_names(&plain_pod),
        (vec![], vec!["client".to_owned()])
    );
    Ok(())
}

#[tokio::test]
async fn each_proxy_holds_its_spiffe_identity_chained_to_the_mesh_root() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-identity", &[INJECT])?;
    apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: echo-sa, namespace: {}}}\n",
        ns.name
    ))?;
    let yaml = echo_server_yaml(&ns.name, "echo", "v1", 1).replace(
        "    spec:\n      containers:",
        "    spec:\n      serviceAccountName: echo-sa\n      containers:",
    );
    apply(&yaml)?;
    let pods = wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let pod = pods[0].metadata.name.clone().unwrap_or_default();
    let admin = PortForward::start(&ns.name, &format!("pod/{pod}"), 15000)?;
    let dump: Value = serde_json::from_str(&admin.get("/config_dump").await?)?;
    let expected = format!("spiffe://cluster.local/ns/{}/sa/echo-sa", ns.name);
    assert_eq!(dump["certificate"]["spiffeId"], expected, "{dump:#}");
    identity::assert_chain_of(&client, &ns.name, &dump, &expected).await?;
    Ok(())
}

/// What a workload asking for its certificate holds: the mesh root, its ServiceAccount token
/// and the identity it may ask for.
struct Caller {
    root: String,
    token: String,
    own: String,
}

/// A fresh meshed namespace with a ServiceAccount `caller`, and what `caller` needs to request
/// its certificate.
async fn caller(client: &kube::Client, prefix: &str) -> anyhow::Result<(TestNamespace, Caller)> {
    let ns = TestNamespace::create(prefix, &[INJECT])?;
    apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: caller, namespace: {}}}\n",
        ns.name
    ))?;
    let caller = Caller {
        root: identity::root_from_configmap(client, &ns.name).await?,
        token: identity::token_for(client, &ns.name, "caller").await?,
        own: format!("spiffe://cluster.local/ns/{}/sa/caller", ns.name),
    };
    Ok((ns, caller))
}

#[tokio::test]
async fn the_ca_refuses_a_csr_for_another_identity() -> anyhow::Result<()> {
    let client = client().await?;
    let (ns, Caller { root, token, own }) = caller(&client, "e2e-csr").await?;
    let control_plane = PortForward::start("trellis-system", "svc/trellis-operator", 15012)?;
    let (status, body) =
        identity::request_certificate(control_plane.local_port, &root, &token, &own).await?;
    assert_eq!(status, 200, "own identity is signed: {body}");
    for other in [
        format!("spiffe://cluster.local/ns/{}/sa/admin", ns.name),
        "spiffe://cluster.local/ns/kube-system/sa/default".to_owned(),
        format!("spiffe://evil.example/ns/{}/sa/caller", ns.name),
    ] {
        let (status, body) =
            identity::request_certificate(control_plane.local_port, &root, &token, &other).await?;
        assert_eq!(status, 403, "{other} must be refused: {body}");
    }
    let (status, _) =
        identity::request_certificate(control_plane.local_port, &root, "not-a-token", &own).await?;
    assert_eq!(status, 401, "a forged token is refused");
    Ok(())
}

#[tokio::test]
async fn proxies_keep_serving_while_the_operator_restarts() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-cpdown", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let url = format!("http://echo.{}.svc.cluster.local/", ns.name);
    apply(&client_pod_yaml(
        &ns.name,
        "client",
        &[
            "--url",
            &url,
            "--rate",
            "20",
            "--duration",
            "40s",
            "--linger",
            "120s",
        ],
        &[],
    ))?;
    wait_pods_ready(&client, &ns.name, "app=client", 1, READY).await?;

    let operators: Api<Pod> = Api::namespaced(client.clone(), "trellis-system");
    let selector = "app.kubernetes.io/name=trellis-operator";
    let old = operators
        .list(&ListParams::default().labels(selector))
        .await?
        .items;
    assert_eq!(old.len(), 1, "one operator replica");
    let old_name = old[0].metadata.name.clone().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(5)).await;
    delete_pod(&client, "trellis-system", &old_name).await?;

    let summary = client_summary(&client, &ns.name, "client", Duration::from_secs(150)).await?;
    assert!(summary.sent >= 790, "{summary:?}");
    assert_eq!(
        summary.failed + summary.dropped,
        0,
        "no request failed while the operator was away: {summary:?}"
    );

    // The new operator is up and both proxies reconnected to it.
    wait_for(
        "the restarted operator to count both proxies of the test",
        READY,
        || {
            let client = client.clone();
            let old_name = old_name.clone();
            async move {
                let pods = Api::<Pod>::namespaced(client.clone(), "trellis-system")
                    .list(&ListParams::default().labels("app.kubernetes.io/name=trellis-operator"))
                    .await?;
                let fresh = pods
                    .items
                    .iter()
                    .any(|p| p.metadata.name.as_deref() != Some(&old_name) && is_ready(p));
                let mesh = Api::<Mesh>::all(client).get("default").await?;
                let connected = mesh.status.map(|s| s.connected_proxies).unwrap_or(0);
                Ok((fresh && connected >= 2).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_job_in_the_mesh_completes() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-job", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    let url = format!("http://echo.{}.svc.cluster.local/", ns.name);
    apply(&format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: batch, namespace: {ns}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: client
        image: {image}
        imagePullPolicy: IfNotPresent
        command: [/demo-client, --url, "{url}", --count, "10", --rate, "20"]
"#,
        ns = ns.name,
        image = demo_image()
    ))?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    wait_for("the meshed Job to complete", READY, || {
        let jobs = jobs.clone();
        async move {
            let status = jobs.get("batch").await?.status.unwrap_or_default();
            if status.failed.unwrap_or(0) > 0 {
                anyhow::bail!("the Job failed");
            }
            Ok((status.succeeded == Some(1)).then_some(()))
        }
    })
    .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default().labels("job-name=batch"))
        .await?;
    assert_injected(&pods.items[0]);
    Ok(())
}

#[tokio::test]
async fn invalid_meshes_are_rejected_and_status_reports_ready() -> anyhow::Result<()> {
    let client = client().await?;
    let bad = "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  version: \"1\"\n  certificates: {workloadTtl: forever}\n";
    let error = apply(bad).expect_err("an invalid duration must be rejected");
    assert!(
        error.to_string().contains("spec.certificates.workloadTtl"),
        "{error}"
    );
    let bad_mode = "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  version: \"1\"\n  mtls: {mode: SOMETIMES}\n";
    let error = apply(bad_mode).expect_err("an unknown mTLS mode must be rejected");
    assert!(error.to_string().contains("spec.mtls.mode"), "{error}");

    // A second Mesh is reported, never applied.
    apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {name: second}\nspec: {version: \"9.9.9\"}\n",
    )?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    let reason = wait_for(
        "the second Mesh to be reported inactive",
        Duration::from_secs(60),
        || {
            let meshes = meshes.clone();
            async move {
                let status = meshes.get("second").await?.status.unwrap_or_default();
                Ok(status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| (c.status.clone(), c.reason.clone())))
            }
        },
    )
    .await?;
    kubectl(&["delete", "mesh", "second"], None)?;
    assert_eq!(reason, ("False".to_owned(), "NotTheActiveMesh".to_owned()));

    // The active Mesh is Ready and counts connected proxies.
    let ns = TestNamespace::create("e2e-status", &[INJECT])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 1))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 1, READY).await?;
    wait_for(
        "Mesh default Ready with a connected proxy",
        Duration::from_secs(60),
        || {
            let meshes = meshes.clone();
            async move {
                let mesh = meshes.get("default").await?;
                let status = mesh.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let current = status.observed_generation == mesh.metadata.generation;
                Ok((ready
                    && current
                    && status.connected_proxies >= 1
                    && status.root_cert_expiry.is_some())
                .then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

mod identity {
    //! Talks to the CA directly, as a proxy would, to prove what it signs and refuses.

    use std::sync::Arc;

    use anyhow::{Context as _, Result};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    use kube::api::PostParams;
    use kube::{Api, Client};
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

    pub async fn root_from_configmap(client: &Client, namespace: &str) -> Result<String> {
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        trellis_e2e::wait_for(
            "the trust bundle ConfigMap",
            std::time::Duration::from_secs(60),
            || {
                let configmaps = configmaps.clone();
                async move {
                    Ok(configmaps
                        .get_opt("trellis-ca-root-cert")
                        .await?
                        .and_then(|c| c.data)
                        .and_then(|d| d.get("root-cert.pem").cloned()))
                }
            },
        )
        .await
    }

    pub async fn token_for(
        client: &Client,
        namespace: &str,
        service_account: &str,
    ) -> Result<String> {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec!["trellis".to_owned()]),
                expiration_seconds: Some(600),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let response = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?;
        response
            .status
            .and_then(|s| s.token)
            .context("TokenRequest answered without a token")
    }

    /// POSTs a CSR for `identity` to the CA through a local port; returns status and body.
    pub async fn request_certificate(
        port: u16,
        root_pem: &str,
        token: &str,
        identity: &str,
    ) -> Result<(u16, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.to_owned().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let body = serde_json::json!({ "csr": csr }).to_string();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(root_pem.as_bytes())?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                ServerName::try_from("trellis-operator.trellis-system.svc")?,
                tcp,
            )
            .await
            .context("TLS to the control plane (verified against the mesh root)")?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(connection);
        let request =
            http::Request::post("https://trellis-operator.trellis-system.svc/v1/certificate")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The leaf of the proxy's chain (from `/config_dump`) names `expected` as its only URI SAN,
    /// and its signature verifies with the mesh root's key.
    pub async fn assert_chain_of(
        client: &Client,
        namespace: &str,
        dump: &serde_json::Value,
        expected: &str,
    ) -> Result<()> {
        use base64::Engine as _;
        let root = root_from_configmap(client, namespace).await?;
        let (_, root_pem) = x509_parser::pem::parse_x509_pem(root.as_bytes())?;
        let root_cert = root_pem.parse_x509()?;
        let leaf_b64 = dump["certificate"]["certChain"][0]
            .as_str()
            .context("no certChain in /config_dump")?;
        let leaf_der = base64::engine::general_purpose::STANDARD.decode(leaf_b64)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)?;
        let uris: Vec<String> = leaf
            .subject_alternative_name()?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        anyhow::ensure!(
            uris == [expected.to_owned()],
            "leaf URI SANs {uris:?}, expected [{expected}]"
        );
        // With a self-signed root the leaf is signed by the root directly.
        leaf.verify_signature(Some(root_cert.public_key()))
            .map_err(|e| {
                anyhow::anyhow!("the proxy's certificate does not chain to the mesh root: {e:?}")
            })?;
        Ok(())
    }
}

/// Puts the operator back to one replica, however the test ends.
struct OneReplicaAtTheEnd;

impl Drop for OneReplicaAtTheEnd {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "-n",
                "trellis-system",
                "scale",
                "deployment/trellis-operator",
                "--replicas=1",
            ],
            None,
        );
    }
}

/// The operator pod holding the leader Lease.
fn lease_holder() -> anyhow::Result<String> {
    let holder = kubectl(
        &[
            "-n",
            "trellis-system",
            "get",
            "lease",
            "trellis-operator-leader",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )?;
    Ok(holder.trim().to_owned())
}

async fn operator_pods(client: &kube::Client) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), "trellis-system")
        .list(&ListParams::default().labels("app.kubernetes.io/name=trellis-operator"))
        .await?
        .items)
}

#[tokio::test]
async fn a_replica_that_is_not_the_leader_signs_certificates() -> anyhow::Result<()> {
    let client = client().await?;
    let (_ns, Caller { root, token, own }) = caller(&client, "e2e-follower").await?;

    let _restore = OneReplicaAtTheEnd;
    kubectl(
        &[
            "-n",
            "trellis-system",
            "scale",
            "deployment/trellis-operator",
            "--replicas=2",
        ],
        None,
    )?;
    let follower = wait_for("a second operator replica, ready", READY, || {
        let client = client.clone();
        async move {
            let pods = operator_pods(&client).await?;
            let ready: Vec<&Pod> = pods.iter().filter(|p| is_ready(p)).collect();
            if ready.len() < 2 {
                return Ok(None);
            }
            let leader = lease_holder()?;
            Ok(ready
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .find(|name| *name != leader))
        }
    })
    .await?;

    // The follower signs (it publishes the mesh state it reads within a few seconds of start).
    let forward = PortForward::start("trellis-system", &format!("pod/{follower}"), 15012)?;
    let signed = wait_for(
        "the follower to sign a CSR",
        Duration::from_secs(60),
        || {
            let (root, token, own) = (root.clone(), token.clone(), own.clone());
            let port = forward.local_port;
            async move {
                match identity::request_certificate(port, &root, &token, &own).await {
                    Ok((200, _)) => Ok(Some(())),
                    Ok((status, body)) => {
                        eprintln!("follower answered {status}: {body}");
                        Ok(None)
                    }
                    Err(e) => {
                        eprintln!("follower not serving yet: {e:#}");
                        Ok(None)
                    }
                }
            }
        },
    )
    .await;
    drop(forward);
    let logs = kubectl(
        &["-n", "trellis-system", "logs", &format!("pod/{follower}")],
        None,
    )
    .unwrap_or_default();
    signed.with_context(|| format!("follower {follower} logs:\n{logs}"))?;
    assert!(
        !logs.contains("became leader"),
        "{follower} was the follower throughout:\n{logs}"
    );

    // Back to one replica, leading, before the next test.
    drop(_restore);
    wait_for("one operator replica, leading", READY, || {
        let client = client.clone();
        async move {
            let pods = operator_pods(&client).await?;
            let leader = lease_holder()?;
            Ok((pods.len() == 1
                && is_ready(&pods[0])
                && pods[0].metadata.name.as_deref() == Some(leader.as_str()))
            .then_some(()))
        }
    })
    .await?;
    Ok(())
}
