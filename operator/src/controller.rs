//! The `Mesh` reconcile loop, in the shape of kube-rs's controller-rs: a [`Context`], one error
//! type with a metric label, an `error_policy` that requeues, server-side apply ([`apply`]) of
//! everything the operator owns (the objects built by [`injector`], [`validation`] and [`cni`]),
//! `ownerReferences` to the Mesh for its children, and events on the Mesh.
//!
//! Only the Mesh named `default` is active; any other Mesh is reported as inactive in its status
//! and left alone, so a second Mesh can never half-apply over the first.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event as CoreEvent, EventSource, Namespace, Pod, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};
use trellis_api::Mesh;
use trellis_api::istio::duration;
use trellis_api::mesh::{Interception, MeshCondition, MeshSpec, MeshStatus};
use trellis_config::wellknown::{MESH_NAME, OPERATOR_NAME, ROOT_CERT_CONFIGMAP};

use crate::ca::{CaMaterial, CertificateAuthority};
use crate::context::{Context, MeshState};
use crate::error::{Error, Result};
use crate::rotation::{self, Rotation};
use crate::{apply, cni, injector, validation};

/// Secret holding the CA the operator generated.
pub const CA_SECRET: &str = "trellis-ca";

/// Runs the Mesh controller until the process stops. Fails at once when the Mesh CRD is
/// missing: nothing can work without it, so say so plainly instead of retrying silently.
pub async fn run(ctx: Arc<Context>) -> Result<()> {
    let meshes = Api::<Mesh>::all(ctx.client.clone());
    if let Err(e) = meshes.list(&ListParams::default().limit(1)).await {
        return Err(Error::CrdMissing(e));
    }
    let namespaces = Api::<Namespace>::all(ctx.client.clone());
    Controller::new(meshes, watcher::Config::default())
        // New namespaces, and relabelled ones, may need the trust-bundle ConfigMap.
        .watches(namespaces, watcher::Config::default(), |_| {
            Some(ObjectRef::<Mesh>::new(MESH_NAME))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // A namespace changed while no Mesh exists: nothing to do.
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    tracing::debug!(%object, "no such Mesh")
                }
                Err(e) => warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    Ok(())
}

fn error_policy(_mesh: Arc<Mesh>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile error, requeueing");
    ctx.metrics.reconcile_failure(error);
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let name = mesh.name_any();
    if name != MESH_NAME {
        let message =
            format!("only the Mesh named {MESH_NAME:?} is active; {name:?} is ignored (delete it)");
        publish_status(&ctx, &mesh, false, "NotTheActiveMesh", &message).await?;
        publish_event(
            &ctx,
            &mesh,
            EventType::Warning,
            "NotTheActiveMesh",
            &message,
        )
        .await;
        return Ok(Action::await_change());
    }
    match reconcile_active(&mesh, &ctx).await {
        Ok(rotating) => {
            publish_status(&ctx, &mesh, true, "Reconciled", "mesh is ready").await?;
            // A root rotation advances as soon as the proxies have renewed: look again soon.
            let every = if rotating { 2 } else { 15 };
            Ok(Action::requeue(Duration::from_secs(every)))
        }
        Err(error) => {
            let message = error.to_string();
            publish_status(&ctx, &mesh, false, error_reason(&error), &message).await?;
            publish_event(
                &ctx,
                &mesh,
                EventType::Warning,
                error_reason(&error),
                &message,
            )
            .await;
            Err(error)
        }
    }
}

fn error_reason(error: &Error) -> &'static str {
    match error {
        Error::InvalidSpec(_) => "InvalidSpec",
        Error::Ca(_) => "CertificateAuthorityFailed",
        _ => "ReconcileFailed",
    }
}

/// Returns whether a root rotation is in progress.
async fn reconcile_active(mesh: &Mesh, ctx: &Context) -> Result<bool> {
    let spec = &mesh.spec;
    let workload_ttl = workload_ttl(&spec.certificates.workload_ttl)?;
    crate::compile::listener_limits(&spec.proxy.listeners).map_err(Error::InvalidSpec)?;
    let root_ttl = duration_field(&spec.certificates.root_ttl, "spec.certificates.rootTtl")?;
    let ext_authz_errors = crate::ext_authz::Providers::of(spec).errors;
    if !ext_authz_errors.is_empty() {
        return Err(Error::InvalidSpec(ext_authz_errors.join("; ")));
    }
    let (ca, root_rotation, entered) = ensure_ca(ctx, spec, root_ttl, workload_ttl).await?;
    if let Some(phase) = entered {
        let status = root_rotation
            .as_ref()
            .map(|r| r.status(workload_ttl).message)
            .unwrap_or_default();
        publish_event(
            ctx,
            mesh,
            EventType::Normal,
            &format!("RootRotation{phase:?}"),
            &status,
        )
        .await;
    }
    let rotating = root_rotation.as_ref().is_some_and(Rotation::in_progress);
    let state = Arc::new(MeshState {
        spec: spec.clone(),
        ca,
        workload_ttl,
        root_rotation,
    });
    let owner = mesh
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("Mesh"))?;
    ensure_root_cert_configmaps(ctx, &owner, &state).await?;
    let ca_bundle = state.ca.trust_bundle().concat();
    let injector_webhooks = injector::webhook_configuration(&ctx.namespace, &ca_bundle, &owner);
    apply::cluster_scoped(
        &ctx.client,
        injector::WEBHOOK_CONFIGURATION,
        &injector_webhooks,
    )
    .await?;
    let validation_webhook = validation::webhook_configuration(&ctx.namespace, &ca_bundle, &owner);
    apply::cluster_scoped(
        &ctx.client,
        validation::WEBHOOK_CONFIGURATION,
        &validation_webhook,
    )
    .await?;
    ensure_cni_installer(ctx, mesh, &owner).await?;
    publish_state(ctx, state);
    Ok(rotating)
}

/// Hands `state` to the CA endpoint, injector and discovery when it differs from the last one.
fn publish_state(ctx: &Context, state: Arc<MeshState>) {
    if ctx.mesh_state.borrow().as_ref().is_none_or(|old| {
        old.spec != state.spec
            || old.ca.material() != state.ca.material()
            || old.ca.trust_bundle() != state.ca.trust_bundle()
            || old.root_rotation != state.root_rotation
    }) {
        info!(version = %state.spec.version, "mesh state updated");
        ctx.mesh_state.send_replace(Some(state));
    }
}

/// How often a replica that is not the leader reads the Mesh and the CA Secret.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(5);

/// Until this replica leads: publishes the mesh state the leader reconciled, read without
/// writing anything (the active Mesh and the CA Secret, every [`FOLLOW_INTERVAL`]). A replica
/// that is not the leader (a second replica, or the new pod of a rolling update waiting for the
/// lease) thus signs certificates, injects sidecars and streams config like the leader; only the
/// leader writes (CA creation, root rotation steps, webhook configurations, status). Never
/// returns: drop it once leadership is acquired.
pub async fn follow(ctx: Arc<Context>) {
    loop {
        match observe(&ctx).await {
            Ok(Some(state)) => publish_state(&ctx, state),
            Ok(None) => info!("no active Mesh or mesh CA yet: waiting for the leader"),
            Err(error) => warn!(%error, "reading the mesh state as a follower"),
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// The active Mesh's state as the leader left it; `None` until the Mesh and the CA exist.
async fn observe(ctx: &Context) -> Result<Option<Arc<MeshState>>> {
    let Some(mesh) = Api::<Mesh>::all(ctx.client.clone())
        .get_opt(MESH_NAME)
        .await?
    else {
        return Ok(None);
    };
    let spec = &mesh.spec;
    let workload_ttl = workload_ttl(&spec.certificates.workload_ttl)?;
    crate::compile::listener_limits(&spec.proxy.listeners).map_err(Error::InvalidSpec)?;
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace);
    let (ca, root_rotation) = match spec.certificates.ca_secret.as_deref() {
        Some(user_secret) => (user_ca(&secrets, user_secret, &ctx.namespace).await?, None),
        None => {
            let Some(secret) = secrets.get_opt(CA_SECRET).await? else {
                return Ok(None);
            };
            let rotation = rotation::recorded(&secret)?;
            let current = material_from_secret(&secret)?;
            (
                rotation::load(&secret, current, rotation.as_ref())?,
                rotation,
            )
        }
    };
    Ok(Some(Arc::new(MeshState {
        spec: spec.clone(),
        ca,
        workload_ttl,
        root_rotation,
    })))
}

/// Shortest accepted `workloadTtl`: below it a proxy would spend a noticeable share of the
/// certificate's life renewing it.
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(60);

/// `spec.certificates.workloadTtl`, refused below [`MIN_WORKLOAD_TTL`].
fn workload_ttl(text: &str) -> Result<Duration> {
    let ttl = duration_field(text, "spec.certificates.workloadTtl")?;
    if ttl < MIN_WORKLOAD_TTL {
        return Err(Error::InvalidSpec(format!(
            "spec.certificates.workloadTtl: {text:?} is shorter than the minimum of {}s",
            MIN_WORKLOAD_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

fn duration_field(text: &str, field: &str) -> Result<Duration> {
    duration::parse(text)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::InvalidSpec(format!("{field}: {text:?} is not a positive duration")))
}

/// Loads the CA from the user's Secret or from ours, creating ours once, and takes the next step
/// of a root rotation of ours (`rotation`). Creation races between replicas resolve through the
/// API server: the loser of `create` reads the winner's Secret. Returns the CA, the rotation it
/// is in and the rotation phase entered now, if any.
async fn ensure_ca(
    ctx: &Context,
    spec: &MeshSpec,
    root_ttl: Duration,
    workload_ttl: Duration,
) -> Result<(
    CertificateAuthority,
    Option<Rotation>,
    Option<trellis_api::mesh::RootRotationPhase>,
)> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace);
    let trigger = spec.certificates.root_rotation.as_deref();
    if let Some(user_secret) = spec.certificates.ca_secret.as_deref() {
        if trigger.is_some() {
            warn!(
                secret = user_secret,
                "spec.certificates.rootRotation is ignored with caSecret: rotate a user CA by \
                 rotating its Secret"
            );
        }
        return Ok((
            user_ca(&secrets, user_secret, &ctx.namespace).await?,
            None,
            None,
        ));
    }
    let existing = secrets.get_opt(CA_SECRET).await?;
    let secret = match existing {
        Some(secret) => secret,
        None => {
            let material = CaMaterial::generate_root(&spec.trust_domain, root_ttl)?;
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(CA_SECRET.to_owned()),
                    namespace: Some(ctx.namespace.clone()),
                    annotations: Some(rotation::annotations_for_new_root(trigger)),
                    ..Default::default()
                },
                data: Some(
                    material
                        .to_secret_data()
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                        .collect(),
                ),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    info!("created the mesh root CA");
                    created
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    secrets.get(CA_SECRET).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let current = material_from_secret(&secret)?;
    let settings = rotation::Settings {
        trigger,
        trust_domain: &spec.trust_domain,
        root_ttl,
        bound: workload_ttl,
        sole_server: ready_replicas(ctx).await? <= 1,
    };
    let outcome =
        rotation::reconcile(&secrets, secret, current, settings, &ctx.proxy_certificates).await?;
    Ok((outcome.ca, outcome.rotation, outcome.entered))
}

/// How many operator replicas are ready, i.e. serve proxies (this one included).
async fn ready_replicas(ctx: &Context) -> Result<usize> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.namespace)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={OPERATOR_NAME}")))
        .await?;
    Ok(pods.items.iter().filter(|pod| pod_ready(pod)).count())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The CA of the user's `caSecret`.
async fn user_ca(
    secrets: &Api<Secret>,
    name: &str,
    namespace: &str,
) -> Result<CertificateAuthority> {
    let Some(secret) = secrets.get_opt(name).await? else {
        return Err(Error::InvalidSpec(format!(
            "spec.certificates.caSecret: Secret {namespace}/{name} does not exist"
        )));
    };
    Ok(CertificateAuthority::load(material_from_secret(&secret)?)?)
}

fn material_from_secret(secret: &Secret) -> Result<CaMaterial> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &'static str| {
        data.get(key)
            .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).into_owned())
            .filter(|text| !text.trim().is_empty())
    };
    Ok(CaMaterial::from_secret_data(get)?)
}

async fn ensure_root_cert_configmaps(
    ctx: &Context,
    owner: &OwnerReference,
    state: &MeshState,
) -> Result<()> {
    let namespaces = Api::<Namespace>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    // A namespace being deleted refuses new objects; it needs no trust bundle any more.
    for ns in namespaces.items.iter().filter(|ns| {
        injector::may_inject_in(&ns.name_any(), ns.labels(), &ctx.namespace)
            && ns.metadata.deletion_timestamp.is_none()
    }) {
        let ns_name = ns.name_any();
        let configmap = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": ROOT_CERT_CONFIGMAP,
                "namespace": ns_name,
                "ownerReferences": [owner],
                "labels": {"app.kubernetes.io/part-of": "trellis"},
            },
            "data": {"root-cert.pem": state.ca.trust_bundle().concat()},
        });
        let applied = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns_name)
            .patch(
                ROOT_CERT_CONFIGMAP,
                &apply::params(),
                &Patch::Apply(&configmap),
            )
            .await;
        match applied {
            Ok(_) => {}
            // Deleted (or started terminating) since the list: nothing to publish there.
            Err(kube::Error::Api(status))
                if status.code == 404
                    || status.code == 403 && status.message.contains("being terminated") =>
            {
                tracing::debug!(namespace = %ns_name, "namespace went away; skipping its trust bundle");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies the CNI installer DaemonSet while the Mesh asks for CNI interception, and deletes
/// it once it no longer does.
async fn ensure_cni_installer(ctx: &Context, mesh: &Mesh, owner: &OwnerReference) -> Result<()> {
    let daemonsets = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.namespace);
    if mesh.spec.interception == Interception::Cni {
        let object = cni::daemonset(&mesh.spec, &ctx.namespace, owner);
        daemonsets
            .patch(cni::DAEMONSET, &apply::params(), &Patch::Apply(&object))
            .await?;
    } else if daemonsets.get_opt(cni::DAEMONSET).await?.is_some() {
        info!("interception is no longer cni: removing the CNI installer");
        daemonsets
            .delete(cni::DAEMONSET, &DeleteParams::default())
            .await?;
    }
    Ok(())
}

/// Writes the Mesh's status with server-side apply, keeping `lastTransitionTime` of a condition
/// whose status did not change.
async fn publish_status(
    ctx: &Context,
    mesh: &Mesh,
    ready: bool,
    reason: &str,
    message: &str,
) -> Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let previous = mesh.status.clone().unwrap_or_default();
    let condition = |type_: &str, status: bool, reason: &str, message: &str| {
        let status = if status { "True" } else { "False" }.to_owned();
        let last_transition_time = previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        MeshCondition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time,
            observed_generation: mesh.metadata.generation,
        }
    };
    let active = mesh.name_any() == MESH_NAME;
    let state = ctx.mesh_state.borrow().clone().filter(|_| active);
    let (connected_proxies, proxies_by_version) = if active {
        ctx.proxies.counts()
    } else {
        Default::default()
    };
    let status = MeshStatus {
        observed_generation: mesh.metadata.generation,
        conditions: vec![
            condition("Ready", ready, reason, message),
            // Kubernetes 1.20's server-side apply turns an empty string into null, which the
            // schema refuses, so every condition carries a real message.
            condition(
                "Progressing",
                false,
                reason,
                "no data-plane rollout in progress",
            ),
            condition(
                "Degraded",
                !ready && active,
                reason,
                if ready { "no problems found" } else { message },
            ),
        ],
        root_cert_expiry: state.as_ref().map(|s| rfc3339(s.ca.root_not_after())),
        intermediate_cert_expiry: state
            .as_ref()
            .and_then(|s| s.ca.intermediate_not_after())
            .map(rfc3339),
        root_rotation: state.as_ref().and_then(|s| {
            s.root_rotation
                .as_ref()
                .map(|rotation| rotation.status(s.workload_ttl))
        }),
        connected_proxies,
        proxies_by_version,
    };
    if mesh.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": Mesh::api_version(&()),
        "kind": Mesh::kind(&()),
        "status": status,
    });
    Api::<Mesh>::all(ctx.client.clone())
        .patch_status(&mesh.name_any(), &apply::params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Records an event on the Mesh. Written through the core `v1` Events API in `default`:
/// Kubernetes before 1.22 refuses `events.k8s.io/v1` events about cluster-scoped objects (their
/// namespace must equal the object's, which has none), and `kubectl describe mesh` reads these.
async fn publish_event(ctx: &Context, mesh: &Mesh, type_: EventType, reason: &str, note: &str) {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    let event = CoreEvent {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{}.", mesh.name_any())),
            namespace: Some("default".to_owned()),
            ..Default::default()
        },
        involved_object: mesh.object_ref(&()),
        reason: Some(reason.to_owned()),
        message: Some(note.to_owned()),
        type_: Some(
            match type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .to_owned(),
        ),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(EventSource {
            component: Some(OPERATOR_NAME.to_owned()),
            ..EventSource::default()
        }),
        ..CoreEvent::default()
    };
    let events = Api::<CoreEvent>::namespaced(ctx.client.clone(), "default");
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        warn!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
