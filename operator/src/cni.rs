//! CNI interception: while `Mesh.spec.interception` is `cni`, the Mesh controller applies the
//! installer DaemonSet built here ([`daemonset`]), which runs `trellis-cni install` on every node
//! (it copies the plugin, chains it into the node's primary conflist and keeps it there);
//! switching back to `initContainer` deletes the DaemonSet, and each installer removes the plugin
//! again as it stops. The repair loop deletes pods that started before the plugin was in place,
//! so their controller recreates them with capture.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::DeleteParams;
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;
use trellis_api::mesh::MeshSpec;
use trellis_config::wellknown::VALIDATION_CONTAINER;

use crate::context::Context;
use crate::injector::PROXY_VERSION_LABEL;
use crate::metrics::OutcomeLabels;

pub const DAEMONSET: &str = "trellis-cni";
/// ServiceAccount of the installer (in the install manifest): it may only read pods.
pub const SERVICE_ACCOUNT: &str = "trellis-cni";

/// The installer DaemonSet for this Mesh, owned by it.
pub fn daemonset(mesh: &MeshSpec, namespace: &str, owner: &OwnerReference) -> serde_json::Value {
    let excluded: Vec<&str> = ["kube-system", namespace]
        .into_iter()
        .chain(mesh.cni.exclude_namespaces.iter().map(String::as_str))
        .collect();
    let labels =
        json!({"app.kubernetes.io/name": DAEMONSET, "app.kubernetes.io/part-of": "trellis"});
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": DAEMONSET,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    // The node's networking must work before any pod network exists.
                    "hostNetwork": true,
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "install",
                        "image": format!("{}/cni:{}", mesh.proxy.image_registry, mesh.version),
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["install"],
                        "env": [
                            {"name": "TRELLIS_CNI_BIN_DIR", "value": "/host/cni/bin"},
                            {"name": "TRELLIS_CNI_CONF_DIR", "value": "/host/cni/net.d"},
                            {"name": "TRELLIS_HOST_CNI_CONF_DIR", "value": mesh.cni.conf_dir},
                            {"name": "TRELLIS_CNI_EXCLUDE_NAMESPACES", "value": excluded.join(",")},
                        ],
                        // Writes into the node's CNI directories, nothing else.
                        "securityContext": {"runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false},
                        "volumeMounts": [
                            {"name": "cni-bin", "mountPath": "/host/cni/bin"},
                            {"name": "cni-conf", "mountPath": "/host/cni/net.d"},
                        ],
                    }],
                    "volumes": [
                        {"name": "cni-bin", "hostPath": {"path": mesh.cni.bin_dir, "type": "DirectoryOrCreate"}},
                        {"name": "cni-conf", "hostPath": {"path": mesh.cni.conf_dir, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    })
}

/// Whether the pod's capture check failed: its validation container exited non-zero (now or
/// before a restart).
pub fn capture_missing(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref());
    statuses.into_iter().flatten().any(|status| {
        status.name == VALIDATION_CONTAINER
            && [status.state.as_ref(), status.last_state.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|state| state.terminated.as_ref())
                .any(|terminated| terminated.exit_code != 0)
    })
}

/// Deletes meshed pods whose capture check failed, when a controller will recreate them.
pub async fn repair_loop(ctx: Arc<Context>) {
    let pods = Api::<Pod>::all(ctx.client.clone());
    let config = watcher::Config::default().labels(PROXY_VERSION_LABEL);
    let mut stream = std::pin::pin!(watcher(pods, config).default_backoff().applied_objects());
    while let Some(event) = stream.next().await {
        let pod = match event {
            Ok(pod) => pod,
            Err(e) => {
                warn!(error = %e, "repair watch error (retrying)");
                continue;
            }
        };
        let owned = pod
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true));
        if !capture_missing(&pod) || pod.metadata.deletion_timestamp.is_some() || !owned {
            continue;
        }
        let (name, namespace) = (pod.name_any(), pod.namespace().unwrap_or_default());
        warn!(pod = %name, %namespace, "pod started without CNI capture: deleting it so it is recreated");
        let note = "the CNI plugin was not in place when this pod started; deleting it so that its controller recreates it with traffic capture";
        let event = Event {
            type_: EventType::Warning,
            reason: "CaptureMissing".to_owned(),
            note: Some(note.to_owned()),
            action: "Repair".to_owned(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &pod.object_ref(&())).await {
            warn!(error = %e, "could not publish the repair event");
        }
        let outcome = match Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => "deleted",
            Err(e) => {
                warn!(error = %e, pod = %name, "could not delete the pod");
                "failed"
            }
        };
        ctx.metrics
            .cni_repairs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use trellis_api::mesh::Interception;

    use super::*;

    fn pod(init_statuses: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "status": {"initContainerStatuses": init_statuses}}),
        )
        .unwrap()
    }

    #[test]
    fn detects_a_failed_capture_check_now_or_before_a_restart() {
        let status = |state: serde_json::Value, last: serde_json::Value| json!([{"name": VALIDATION_CONTAINER, "ready": false, "restartCount": 1, "image": "i", "imageID": "", "state": state, "lastState": last}]);
        let failed = json!({"terminated": {"exitCode": 1}});
        let passed = json!({"terminated": {"exitCode": 0}});
        let waiting = json!({"waiting": {"reason": "CrashLoopBackOff"}});
        assert!(capture_missing(&pod(status(failed.clone(), json!({})))));
        assert!(capture_missing(&pod(status(waiting.clone(), failed))));
        assert!(!capture_missing(&pod(status(passed, json!({})))));
        assert!(!capture_missing(&pod(status(waiting, json!({})))));
        let other = json!([{"name": "trellis-init", "ready": false, "restartCount": 0, "image": "i", "imageID": "", "state": {"terminated": {"exitCode": 1}}}]);
        assert!(!capture_missing(&pod(other)));
    }

    #[test]
    fn installer_mounts_the_meshs_cni_directories() {
        let mut mesh: MeshSpec = serde_json::from_value(
            json!({"version": "2.0", "cni": {"binDir": "/b", "confDir": "/c", "excludeNamespaces": ["batch"]}}),
        )
        .unwrap();
        mesh.interception = Interception::Cni;
        let owner = OwnerReference {
            kind: "Mesh".to_owned(),
            name: "default".to_owned(),
            ..OwnerReference::default()
        };
        let ds = daemonset(&mesh, "trellis-system", &owner);
        assert_eq!(ds["metadata"]["ownerReferences"][0]["kind"], "Mesh");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["image"], "trellis.local/cni:2.0");
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/b");
        assert_eq!(pod["volumes"][1]["hostPath"]["path"], "/c");
        assert_eq!(pod["containers"][0]["env"][2]["value"], "/c");
        assert_eq!(
            pod["containers"][0]["env"][3]["value"],
            "kube-system,trellis-system,batch"
        );
    }
}
