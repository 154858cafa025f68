//! Unit tests of the Mesh controller: spec parsing, and the reconcile of a Mesh against a mocked
//! API server ([`super::fixtures`]), one scenario per situation, each checking every request the
//! reconcile makes, in order, and that it makes no other.

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use super::fixtures::{self, ApiServer, NAMESPACE};
use super::*;
use crate::ca::ROOT_CERT_KEY;

const MESH_PATH: &str = "/apis/trellis.dev/v1alpha1/meshes";
const SECRETS_PATH: &str = "/api/v1/namespaces/trellis-system/secrets";

fn mesh(name: &str) -> Mesh {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "Mesh",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"version": "1.2.3"},
    }))
    .unwrap()
}

/// The Secret our CA lives in, holding `material`.
fn ca_secret(material: &CaMaterial) -> Value {
    let data: std::collections::BTreeMap<_, _> = material
        .to_secret_data()
        .into_iter()
        .map(|(key, value)| (key.to_owned(), ByteString(value.into_bytes())))
        .collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    serde_json::to_value(secret).unwrap()
}

/// A base64 `bytes` field of a request body, decoded.
fn bytes_field(value: &Value) -> String {
    let ByteString(bytes) = serde_json::from_value(value.clone()).unwrap();
    String::from_utf8(bytes).unwrap()
}

fn assert_owned_by_the_mesh(object: &Value) {
    let owner = &object["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"], &owner["controller"]),
        (&json!("Mesh"), &json!("uid-default"), &json!(true)),
        "{object}"
    );
}

/// The CA Secret read at the start of a reconcile, answered with `material`.
async fn answer_existing_ca(api: &mut ApiServer, material: &CaMaterial) {
    api.expect(Method::GET, &format!("{SECRETS_PATH}/{CA_SECRET}"))
        .await
        .respond(StatusCode::OK, &ca_secret(material));
}

/// The operator replicas' readiness count, asked before any rotation step.
async fn answer_replica_count(api: &mut ApiServer) {
    let pods = api
        .expect(Method::GET, "/api/v1/namespaces/trellis-system/pods")
        .await;
    assert!(
        pods.query
            .contains("labelSelector=app.kubernetes.io%2Fname%3Dtrellis-operator"),
        "{}",
        pods.query
    );
    pods.respond(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
    );
}

/// Answers what the active Mesh's reconcile applies once its CA is loaded, checking that each
/// object is a forced apply owned by the Mesh and trusts exactly `root`: the trust-bundle
/// ConfigMap of each live namespace where a pod may be injected (not the disabled, the system
/// or the terminating one), both webhook configurations; then the CNI
/// installer is looked up (absent: interception is `initContainer`).
async fn answer_owned_objects(api: &mut ApiServer, root: &str) {
    api.expect(Method::GET, "/api/v1/namespaces").await.respond(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": [
            {"metadata": {"name": "demo", "labels": {"istio-injection": "enabled"}}},
            {"metadata": {"name": "plain"}},
            {"metadata": {"name": "opted-out", "labels": {"istio-injection": "disabled"}}},
            {"metadata": {"name": "kube-system"}},
            {"metadata": {
                "name": "leaving",
                "labels": {"trellis.dev/inject": "enabled"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            }},
        ]}),
    );
    // Pods opt in one by one with their own label, so an unlabelled namespace gets one too.
    for namespace in ["demo", "plain"] {
        let configmap = api
            .expect(
                Method::PATCH,
                &format!("/api/v1/namespaces/{namespace}/configmaps/trellis-ca-root-cert"),
            )
            .await;
        configmap.assert_forced_apply();
        assert_owned_by_the_mesh(&configmap.body);
        assert_eq!(configmap.body["data"]["root-cert.pem"], root);
        configmap.echo();
    }
    for (resource, name) in [
        (
            "mutatingwebhookconfigurations",
            injector::WEBHOOK_CONFIGURATION,
        ),
        (
            "validatingwebhookconfigurations",
            validation::WEBHOOK_CONFIGURATION,
        ),
    ] {
        let path = format!("/apis/admissionregistration.k8s.io/v1/{resource}/{name}");
        let configuration = api.expect(Method::PATCH, &path).await;
        configuration.assert_forced_apply();
        assert_owned_by_the_mesh(&configuration.body);
        let webhooks = configuration.body["webhooks"].as_array().unwrap();
        assert!(!webhooks.is_empty(), "{path}");
        for webhook in webhooks {
            assert_eq!(
                bytes_field(&webhook["clientConfig"]["caBundle"]),
                root,
                "{path}"
            );
        }
        configuration.echo();
    }
    api.expect(
        Method::GET,
        "/apis/apps/v1/namespaces/trellis-system/daemonsets/trellis-cni",
    )
    .await
    .not_found();
}

/// Answers the status apply of `mesh`, checking its `Ready` condition, and returns the status.
async fn answer_status(api: &mut ApiServer, mesh: &Mesh, ready: &str, reason: &str) -> Value {
    let path = format!("{MESH_PATH}/{}/status", mesh.name_any());
    let patch = api.expect(Method::PATCH, &path).await;
    patch.assert_forced_apply();
    let status = patch.body["status"].clone();
    let condition = &status["conditions"][0];
    assert_eq!(
        (
            &condition["type"],
            &condition["status"],
            &condition["reason"]
        ),
        (&json!("Ready"), &json!(ready), &json!(reason)),
        "{status}"
    );
    let mut answer = serde_json::to_value(mesh).unwrap();
    answer["status"] = status.clone();
    patch.respond(StatusCode::OK, &answer);
    status
}

fn test_root() -> CaMaterial {
    CaMaterial::generate_root("cluster.local", Duration::from_secs(86_400 * 365)).unwrap()
}

/// (a) and (b, absent): the first reconcile of the Mesh creates the CA Secret and applies
/// everything the operator owns with that new root, then reports the Mesh ready.
#[tokio::test]
async fn a_new_mesh_gets_a_new_ca_and_everything_it_owns() {
    let (ctx, mut api) = fixtures::context();
    let mesh = mesh(MESH_NAME);
    let scenario = async {
        api.expect(Method::GET, &format!("{SECRETS_PATH}/{CA_SECRET}"))
            .await
            .not_found();
        let create = api.expect(Method::POST, SECRETS_PATH).await;
        assert_eq!(create.body["metadata"]["name"], CA_SECRET);
        let root = bytes_field(&create.body["data"][ROOT_CERT_KEY]);
        assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
        let created = create.body.clone();
        create.respond(StatusCode::CREATED, &created);
        answer_replica_count(&mut api).await;
        answer_owned_objects(&mut api, &root).await;
        let status = answer_status(&mut api, &mesh, "True", "Reconciled").await;
        assert!(status["rootCertExpiry"].is_string(), "{status}");
        api.done().await;
    };
    let (action, ()) = fixtures::run(reconcile(Arc::new(mesh.clone()), ctx), scenario).await;
    assert_eq!(action.unwrap(), Action::requeue(Duration::from_secs(15)));
}

/// (b, present): an existing CA Secret is read and its root used: no create, no new root.
#[tokio::test]
async fn an_existing_ca_secret_is_reused_not_regenerated() {
    let (ctx, mut api) = fixtures::context();
    let mesh = mesh(MESH_NAME);
    let material = test_root();
    let scenario = async {
        answer_existing_ca(&mut api, &material).await;
        answer_replica_count(&mut api).await;
        answer_owned_objects(&mut api, &material.root_cert).await;
        answer_status(&mut api, &mesh, "True", "Reconciled").await;
        api.done().await;
    };
    let (action, ()) = fixtures::run(reconcile(Arc::new(mesh.clone()), ctx), scenario).await;
    assert_eq!(action.unwrap(), Action::requeue(Duration::from_secs(15)));
}

/// (c): the reconcile never trusts what the webhook configurations hold. Someone changes their
/// caBundle after a first reconcile; the next one, with nothing changed in the Mesh or the CA,
/// applies both configurations again, forced (taking the field back from whoever set it), with
/// the mesh root; the Mesh's status, unchanged, is not written again.
#[tokio::test]
async fn webhook_ca_bundle_drift_is_re_applied_with_the_mesh_root() {
    let (ctx, mut api) = fixtures::context();
    let mesh = mesh(MESH_NAME);
    let material = test_root();
    let first = async {
        answer_existing_ca(&mut api, &material).await;
        answer_replica_count(&mut api).await;
        answer_owned_objects(&mut api, &material.root_cert).await;
        answer_status(&mut api, &mesh, "True", "Reconciled").await
    };
    let (action, status) =
        fixtures::run(reconcile(Arc::new(mesh.clone()), ctx.clone()), first).await;
    action.unwrap();
    // Drift: the webhook configurations now hold another bundle. The reconcile does not read
    // them, so the mock has nothing to serve; what matters is that they are applied again.
    let mut reconciled = mesh.clone();
    reconciled.status = Some(serde_json::from_value(status).unwrap());
    let second = async {
        answer_existing_ca(&mut api, &material).await;
        answer_replica_count(&mut api).await;
        answer_owned_objects(&mut api, &material.root_cert).await;
        api.done().await;
    };
    let (action, ()) = fixtures::run(reconcile(Arc::new(reconciled), ctx), second).await;
    assert_eq!(action.unwrap(), Action::requeue(Duration::from_secs(15)));
}

/// (d): a Mesh not named `default` is told in its status and by an event that it is inactive;
/// nothing is read or applied for it.
#[tokio::test]
async fn a_second_mesh_is_reported_inactive_and_nothing_else_is_applied() {
    let (ctx, mut api) = fixtures::context();
    let mesh = mesh("other");
    let scenario = async {
        let status = answer_status(&mut api, &mesh, "False", "NotTheActiveMesh").await;
        assert!(status["rootCertExpiry"].is_null(), "{status}");
        let event = api
            .expect(Method::POST, "/api/v1/namespaces/default/events")
            .await;
        assert_eq!(
            (&event.body["type"], &event.body["reason"]),
            (&json!("Warning"), &json!("NotTheActiveMesh"))
        );
        assert_eq!(event.body["involvedObject"]["name"], "other");
        let created = event.body.clone();
        event.respond(StatusCode::CREATED, &created);
        api.done().await;
    };
    let (action, ()) = fixtures::run(reconcile(Arc::new(mesh.clone()), ctx), scenario).await;
    assert_eq!(action.unwrap(), Action::await_change());
}

#[test]
fn workload_ttls_from_one_minute_up_are_accepted() {
    let cases = [
        ("2m", Some(120)),
        ("1m", Some(60)),
        ("24h", Some(86_400)),
        ("59s", None),
        ("0s", None),
        ("forever", None),
    ];
    for (text, expected) in cases {
        let got = workload_ttl(text).ok().map(|d| d.as_secs());
        assert_eq!(got, expected, "{text}");
    }
    let err = workload_ttl("30s").unwrap_err().to_string();
    assert!(err.contains("shorter than the minimum of 60s"), "{err}");
}
