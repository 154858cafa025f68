//! The operator's admission and authority on the real cluster: what its ServiceAccount may do
//! (compared with the checked-in `expected/operator-rbac.txt`), that an operator outage blocks
//! nothing but the pods and objects Trellis must see, Istio's injection selection (a pod's own
//! label, revisions), and the refusal of an application that would run as the proxy's uid.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use trellis_e2e::*;

const OPERATOR_NAMESPACE: &str = "trellis-system";
const OPERATOR_USER: &str = "system:serviceaccount:trellis-system:trellis-operator";
/// Namespaces whose `can-i --list` is pinned: a plain one, Kubernetes' own, the operator's.
const LISTED_NAMESPACES: [&str; 3] = ["default", "kube-system", OPERATOR_NAMESPACE];
const EXPECTED_RBAC: &str = "tests/expected/operator-rbac.txt";
const READY: Duration = Duration::from_secs(120);

/// `kubectl auth can-i --list` as the operator, per namespace, with runs of blanks collapsed
/// (column widths follow the longest entry).
fn rbac_listing() -> anyhow::Result<String> {
    let mut text = format!(
        "# kubectl auth can-i --list --as={OPERATOR_USER} -n <namespace>, blanks collapsed.\n\
         # Regenerate after a deliberate RBAC change: TRELLIS_E2E_BLESS=1 /work/e2e-one.sh admission operator_rbac\n"
    );
    for namespace in LISTED_NAMESPACES {
        text.push_str(&format!("== -n {namespace}\n"));
        let listing = kubectl(
            &[
                "auth",
                "can-i",
                "--list",
                "--as",
                OPERATOR_USER,
                "-n",
                namespace,
            ],
            None,
        )?;
        for line in listing.lines() {
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            if !line.is_empty() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    }
    Ok(text)
}

/// The grants of a listing, each row prefixed with its namespace and its verbs sorted: compared
/// as a set, whatever order kubectl prints rows and verbs in (it prints a row once per rule that
/// grants it, and merges verbs in rule order).
fn grants(listing: &str) -> std::collections::BTreeSet<String> {
    let mut namespace = "";
    listing
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| match line.strip_prefix("== -n ") {
            Some(name) => {
                namespace = name;
                None
            }
            None => Some(format!("{namespace}: {}", sorted_verbs(line))),
        })
        .collect()
}

/// A `can-i --list` row with the words of its last `[...]` (the verbs) sorted.
fn sorted_verbs(row: &str) -> String {
    match (row.rfind('['), row.ends_with(']')) {
        (Some(open), true) => {
            let mut verbs: Vec<&str> = row[open + 1..row.len() - 1].split_whitespace().collect();
            verbs.sort_unstable();
            format!("{}[{}]", &row[..open], verbs.join(" "))
        }
        _ => row.to_owned(),
    }
}

/// Whether the API server authorizes the operator's ServiceAccount for `verb` on `resource`
/// (`group`, optionally `name` in `namespace`): the question `kubectl auth can-i` asks.
async fn operator_can(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(OPERATOR_USER.to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{OPERATOR_NAMESPACE}"),
                "system:authenticated".to_owned(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|status| status.allowed))
}

#[tokio::test]
async fn operator_rbac_matches_the_checked_in_expectation() -> anyhow::Result<()> {
    let client = client().await?;
    let actual = rbac_listing()?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(EXPECTED_RBAC);
    if std::env::var_os("TRELLIS_E2E_BLESS").is_some() {
        std::fs::write(&path, &actual)?;
    }
    let expected = std::fs::read_to_string(&path)?;
    let (actual, expected) = (grants(&actual), grants(&expected));
    let missing: Vec<&String> = expected.difference(&actual).collect();
    let extra: Vec<&String> = actual.difference(&expected).collect();
    assert!(
        actual == expected,
        "the operator's RBAC differs from {EXPECTED_RBAC}\n\
         granted now but not expected: {extra:#?}\nexpected but not granted: {missing:#?}"
    );

    // The questions that matter most, asked one by one (cluster-scoped ones included, which no
    // namespace listing shows on its own).
    type Check<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        bool,
    );
    let rbac = "rbac.authorization.k8s.io";
    let admission = "admissionregistration.k8s.io";
    let checks: &[Check] = &[
        ("escalate", rbac, "clusterroles", None, None, false),
        ("bind", rbac, "clusterroles", None, None, false),
        ("create", rbac, "clusterrolebindings", None, None, false),
        (
            "create",
            rbac,
            "rolebindings",
            Some(OPERATOR_NAMESPACE),
            None,
            false,
        ),
        ("impersonate", "", "users", None, None, false),
        (
            "impersonate",
            "",
            "serviceaccounts",
            Some("kube-system"),
            None,
            false,
        ),
        ("get", "", "secrets", Some("kube-system"), None, false),
        ("list", "", "secrets", Some("default"), None, false),
        ("create", "", "secrets", Some("kube-system"), None, false),
        (
            "patch",
            "",
            "configmaps",
            Some("kube-system"),
            Some("coredns"),
            false,
        ),
        ("create", "", "configmaps", Some("kube-system"), None, false),
        (
            "get",
            "",
            "configmaps",
            Some("kube-system"),
            Some("coredns"),
            false,
        ),
        ("create", "", "pods", Some("kube-system"), None, false),
        ("create", "", "pods/exec", Some("default"), Some("p"), false),
        ("patch", "", "nodes", None, Some("n"), false),
        (
            "patch",
            admission,
            "mutatingwebhookconfigurations",
            None,
            Some("istio-sidecar-injector"),
            false,
        ),
        (
            "delete",
            admission,
            "validatingwebhookconfigurations",
            None,
            Some("trellis-networking-validator"),
            false,
        ),
        // What it must be able to do.
        (
            "patch",
            "",
            "configmaps",
            Some("default"),
            Some("trellis-ca-root-cert"),
            true,
        ),
        (
            "create",
            "",
            "configmaps",
            Some("default"),
            Some("trellis-ca-root-cert"),
            true,
        ),
        (
            "patch",
            admission,
            "mutatingwebhookconfigurations",
            None,
            Some("trellis-sidecar-injector"),
            true,
        ),
        (
            "patch",
            admission,
            "validatingwebhookconfigurations",
            None,
            Some("trellis-networking-validator"),
            true,
        ),
        (
            "update",
            "",
            "secrets",
            Some(OPERATOR_NAMESPACE),
            Some("trellis-ca"),
            true,
        ),
        ("delete", "", "pods", Some("default"), Some("p"), true),
        (
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            None,
            None,
            true,
        ),
    ];
    let mut wrong = Vec::new();
    for &(verb, group, resource, namespace, name, expected) in checks {
        let allowed = operator_can(&client, verb, group, resource, namespace, name).await?;
        if allowed != expected {
            wrong.push(format!(
                "{verb} {group}/{resource} {namespace:?} {name:?}: allowed={allowed}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

/// A bare pod running the demo server, with `labels` and the container's `securityContext`.
fn server_pod_yaml(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    security_context: &str,
) -> String {
    let image = demo_image();
    let labels: BTreeMap<&str, &str> = labels.iter().copied().chain([("app", name)]).collect();
    let labels = serde_json::to_string(&labels).expect("labels serialize");
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {labels}
spec:
  containers:
  - name: server
    image: {image}
    imagePullPolicy: IfNotPresent
    args: [--port, "8080"]
    securityContext: {security_context}
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
"#
    )
}

async fn containers_of(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Vec<String>> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let spec = pod.spec.unwrap_or_default();
    Ok(spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .map(|c| c.name)
        .collect())
}

fn injected(containers: &[String]) -> bool {
    containers.iter().any(|c| c == "trellis-proxy")
}

#[tokio::test]
async fn a_pod_opts_in_with_its_own_label_and_unknown_revisions_are_reported() -> anyhow::Result<()>
{
    let client = client().await?;
    let plain = TestNamespace::create("e2e-optin", &[])?;
    let revision = TestNamespace::create("e2e-rev", &[("istio.io/rev", "default")])?;
    let ns = plain.name.as_str();

    // The pod's own label opts it in, in a namespace without any injection label; it starts,
    // so the trust bundle it mounts is published there too.
    apply(&server_pod_yaml(
        ns,
        "opted-in",
        &[("sidecar.istio.io/inject", "true")],
        "{}",
    ))?;
    apply(&server_pod_yaml(ns, "unlabelled", &[], "{}"))?;
    assert!(injected(&containers_of(&client, ns, "opted-in").await?));
    assert!(!injected(&containers_of(&client, ns, "unlabelled").await?));

    // istio.io/rev: "default" is this mesh, on a namespace or on a pod.
    apply(&server_pod_yaml(&revision.name, "rev-namespace", &[], "{}"))?;
    apply(&server_pod_yaml(
        ns,
        "rev-pod",
        &[("istio.io/rev", "default")],
        "{}",
    ))?;
    assert!(injected(
        &containers_of(&client, &revision.name, "rev-namespace").await?
    ));
    assert!(injected(&containers_of(&client, ns, "rev-pod").await?));

    // Another revision: admitted without a sidecar, and an event says why.
    apply(&server_pod_yaml(
        ns,
        "canary",
        &[("istio.io/rev", "canary")],
        "{}",
    ))?;
    assert!(!injected(&containers_of(&client, ns, "canary").await?));
    let event = wait_for(
        "the UnknownRevision event",
        Duration::from_secs(30),
        || async {
            let events = kubectl(
                &[
                    "-n",
                    ns,
                    "get",
                    "events",
                    "--field-selector",
                    "reason=UnknownRevision",
                    "-o",
                    "json",
                ],
                None,
            )?;
            let events: serde_json::Value = serde_json::from_str(&events)?;
            Ok(events["items"]
                .as_array()
                .and_then(|items| items.first())
                .map(|e| e["message"].as_str().unwrap_or_default().to_owned()))
        },
    )
    .await?;
    assert!(event.contains("istio.io/rev \"canary\""), "{event}");

    wait_pods_ready(&client, ns, "app=opted-in", 1, READY).await?;
    Ok(())
}

#[tokio::test]
async fn app_container_running_as_1337_is_refused() -> anyhow::Result<()> {
    let client = client().await?;
    let meshed = TestNamespace::create("e2e-uid", &[("trellis.dev/inject", "enabled")])?;
    let pod = server_pod_yaml(&meshed.name, "as-proxy", &[], "{runAsUser: 1337}");
    let refusal = apply(&pod).expect_err("a pod running as the proxy's uid is refused");
    let refusal = format!("{refusal:#}");
    assert!(
        refusal.contains("container \"server\" would run with runAsUser 1337")
            && refusal.contains("bypass the sidecar"),
        "{refusal}"
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &meshed.name);
    assert!(pods.get_opt("as-proxy").await?.is_none());
    // Any other uid is meshed as usual.
    apply(&server_pod_yaml(
        &meshed.name,
        "as-app",
        &[],
        "{runAsUser: 1338}",
    ))?;
    assert!(injected(
        &containers_of(&client, &meshed.name, "as-app").await?
    ));
    Ok(())
}

/// Scales the operator back to one replica and waits for it, however the test ends.
struct OperatorRestored;

impl Drop for OperatorRestored {
    fn drop(&mut self) {
        let deployment = "deployment/trellis-operator";
        let scaled = kubectl(
            &[
                "-n",
                OPERATOR_NAMESPACE,
                "scale",
                deployment,
                "--replicas=1",
            ],
            None,
        );
        let ready = kubectl(
            &[
                "-n",
                OPERATOR_NAMESPACE,
                "rollout",
                "status",
                deployment,
                "--timeout=180s",
            ],
            None,
        );
        if let Err(e) = scaled.and(ready) {
            eprintln!("restoring the operator failed: {e:#}");
        }
    }
}

async fn operator_pods(client: &Client) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/name=trellis-operator"))
        .await?
        .items)
}

#[tokio::test]
async fn an_operator_outage_blocks_only_what_trellis_must_see() -> anyhow::Result<()> {
    let client = client().await?;
    let meshed = TestNamespace::create("e2e-outage-meshed", &[("trellis.dev/inject", "enabled")])?;
    let plain = TestNamespace::create("e2e-outage-plain", &[])?;
    let canary = TestNamespace::create("e2e-outage-canary", &[("istio.io/rev", "canary")])?;
    let system_pod = format!("e2e-outage-{:04x}", rand::random::<u16>());

    let restored = OperatorRestored;
    kubectl(
        &[
            "-n",
            OPERATOR_NAMESPACE,
            "scale",
            "deployment/trellis-operator",
            "--replicas=0",
        ],
        None,
    )?;
    wait_for(
        "the operator to be gone",
        Duration::from_secs(90),
        || async { Ok(operator_pods(&client).await?.is_empty().then_some(())) },
    )
    .await?;

    let outcome = async {
        // Admitted: anything Trellis does not judge, in any namespace.
        let p = plain.name.as_str();
        apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {p}}}\ndata: {{a: b}}\n"
        ))?;
        apply(&echo_server_yaml(p, "plain", "v1", 1))?;
        apply(&server_pod_yaml("kube-system", &system_pod, &[], "{}"))?;
        apply(&server_pod_yaml(&canary.name, "canary", &[], "{}"))?;
        apply(&server_pod_yaml(p, "opted-out", &[("sidecar.istio.io/inject", "false")], "{}"))?;
        // The Deployment's pod is created by its ReplicaSet, through admission.
        wait_for("the plain Deployment's pod", Duration::from_secs(60), || async {
            let pods = Api::<Pod>::namespaced(client.clone(), p)
                .list(&ListParams::default().labels("app=plain"))
                .await?;
            Ok((!pods.items.is_empty()).then_some(()))
        })
        .await?;

        // Refused, as documented: a pod that asks for the mesh, and Trellis' validated kinds.
        let refusals = [
            apply(&server_pod_yaml(&meshed.name, "meshed", &[], "{}")),
            apply(&server_pod_yaml(p, "opted-in", &[("sidecar.istio.io/inject", "true")], "{}")),
            Applied::spec(
                "networking.istio.io/v1",
                "VirtualService",
                p,
                "routes",
                serde_json::json!({"hosts": ["plain"], "http": [{"route": [{"destination": {"host": "plain"}}]}]}),
            )
            .map(|_| String::new()),
        ];
        for (what, refusal) in ["meshed pod", "opted-in pod", "VirtualService"].iter().zip(refusals) {
            let error = match refusal {
                Ok(_) => anyhow::bail!("{what} was admitted while the operator was down"),
                Err(e) => format!("{e:#}"),
            };
            anyhow::ensure!(error.contains("failed calling webhook"), "{what}: {error}");
        }
        anyhow::Ok(())
    }
    .await;

    drop(restored);
    let _ = kubectl(
        &[
            "-n",
            "kube-system",
            "delete",
            "pod",
            &system_pod,
            "--wait=false",
        ],
        None,
    );
    outcome?;
    // Back to normal: a meshed pod is injected again (once the new replica has the mesh state).
    wait_for("the injector to admit pods again", READY, || async {
        apply(&server_pod_yaml(&meshed.name, "after", &[], "{}"))?;
        Ok(Some(()))
    })
    .await?;
    assert!(injected(
        &containers_of(&client, &meshed.name, "after").await?
    ));
    Ok(())
}
