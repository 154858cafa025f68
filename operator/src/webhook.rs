//! The injector's admission endpoint on 15017 (`POST /inject`): decodes an AdmissionReview,
//! decides and injects with the pure functions of [`crate::injector`], and answers with the JSON
//! patch between the original and the injected Pod, a refusal (a pod that would run as the
//! proxy's uid or gid), or, for a pod asking for another control-plane revision, an admission
//! warning and an `UnknownRevision` event.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};
use trellis_config::wellknown::OPERATOR_NAME;

use crate::context::MeshStateRx;
use crate::https::{self, Body, Peer};
use crate::injector::{self, DEFAULT_REVISION, Decision, INJECT_PATH, InjectionParams};
use crate::metrics::{Metrics, OutcomeLabels};

/// Largest AdmissionReview body read, for both admission webhooks: the API server caps objects
/// at about 3 MiB, and a review of an update carries the old object too. Anything larger is
/// refused unread.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

pub struct Webhook {
    pub client: Client,
    pub mesh: MeshStateRx,
    pub operator_namespace: String,
    pub native_sidecars: bool,
    pub metrics: Arc<Metrics>,
}

impl Webhook {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: Arc<Peer>,
    ) -> Response<Body> {
        let admission = match admission_request(request, INJECT_PATH).await {
            Ok(admission) => admission,
            Err(response) => return response,
        };
        let response = self.review(&admission).await;
        let outcome = if !response.allowed {
            "denied"
        } else if response.patch.is_some() {
            "injected"
        } else {
            "skipped"
        };
        self.metrics
            .injections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        https::full(
            StatusCode::OK,
            serde_json::to_vec(&response.into_review()).unwrap_or_default(),
        )
    }

    async fn review(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let allow = AdmissionResponse::from(request);
        let Some(object) = &request.object else {
            return allow;
        };
        let pod = match pod_from(object) {
            Ok(pod) => pod,
            Err(e) => return allow.deny(format!("trellis injector: object is not a Pod: {e}")),
        };
        let namespace = request.namespace.clone().unwrap_or_default();
        let namespace_labels = match Api::<Namespace>::all(self.client.clone())
            .get(&namespace)
            .await
        {
            Ok(ns) => ns.labels().clone(),
            Err(e) => {
                return allow.deny(format!(
                    "trellis injector: reading namespace {namespace}: {e}"
                ));
            }
        };
        let name = pod
            .metadata
            .name
            .clone()
            .or(pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match injector::decide(
            &pod,
            &namespace,
            &namespace_labels,
            &self.operator_namespace,
        ) {
            Decision::Skip(reason) => {
                info!(pod = %name, %namespace, reason, "not injecting");
                allow
            }
            Decision::Refuse(message) => {
                info!(pod = %name, %namespace, %message, "refused");
                allow.deny(message)
            }
            Decision::UnknownRevision(revision) => {
                let message = format!(
                    "trellis: istio.io/rev {revision:?} is not a revision of this mesh (only \
                     {DEFAULT_REVISION:?} is): pod {name} starts without a sidecar"
                );
                warn!(pod = %name, %namespace, %revision, "unknown revision: not injecting");
                self.publish_unknown_revision(&pod, &namespace, &message)
                    .await;
                let mut allow = allow;
                allow.warnings = Some(vec![message]);
                allow
            }
            Decision::Inject => self.inject(allow, &pod, &name, &namespace),
        }
    }

    fn inject(
        &self,
        allow: AdmissionResponse,
        pod: &Pod,
        name: &str,
        namespace: &str,
    ) -> AdmissionResponse {
        let Some(state) = self.mesh.borrow().clone() else {
            // Pods of a meshed namespace must not start unmeshed; the API server retries.
            return allow.deny("trellis injector: the mesh is not ready yet (no active Mesh)");
        };
        let params = InjectionParams {
            mesh: state.spec.clone(),
            operator_namespace: self.operator_namespace.clone(),
            native_sidecars: self.native_sidecars,
        };
        let injected = injector::inject(pod, &params);
        let (Ok(before), Ok(after)) = (serde_json::to_value(pod), serde_json::to_value(&injected))
        else {
            return allow.deny("trellis injector: could not encode the pod");
        };
        let patch = json_patch::diff(&before, &after);
        match allow.clone().with_patch(patch) {
            Ok(response) => {
                info!(pod = %name, %namespace, "injected sidecar");
                response
            }
            Err(e) => {
                warn!(error = %e, "could not encode patch");
                allow.deny(format!("trellis injector: could not encode patch: {e}"))
            }
        }
    }

    /// An `UnknownRevision` warning event where `kubectl describe` shows it: on the pod's
    /// controller (the ReplicaSet, Job, …) when it has one — its pods are created by a controller
    /// that drops admission warnings — else on the pod itself.
    async fn publish_unknown_revision(&self, pod: &Pod, namespace: &str, message: &str) {
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let regarding = match owner {
            Some(owner) => ObjectReference {
                api_version: Some(owner.api_version.clone()),
                kind: Some(owner.kind.clone()),
                name: Some(owner.name.clone()),
                uid: Some(owner.uid.clone()),
                namespace: Some(namespace.to_owned()),
                ..ObjectReference::default()
            },
            None => ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                namespace: Some(namespace.to_owned()),
                ..ObjectReference::default()
            },
        };
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: OPERATOR_NAME.to_owned(),
                instance: None,
            },
        );
        let event = Event {
            type_: EventType::Warning,
            reason: "UnknownRevision".to_owned(),
            note: Some(message.to_owned()),
            action: "Inject".to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &regarding).await {
            warn!(error = %e, "could not publish the UnknownRevision event");
        }
    }
}

/// The admission request a `POST` to `path` carries, or the answer to send instead: 404 for
/// another path, 405 for another method, 413 for a body over [`MAX_REVIEW_BYTES`], 400 for one
/// that is no AdmissionReview.
pub async fn admission_request(
    request: Request<Incoming>,
    path: &str,
) -> Result<AdmissionRequest<DynamicObject>, Response<Body>> {
    if request.uri().path() != path {
        return Err(https::error(StatusCode::NOT_FOUND, "no such endpoint"));
    }
    if request.method() != Method::POST {
        return Err(https::method_not_allowed(&Method::POST));
    }
    let body = https::read_body(request.into_body(), MAX_REVIEW_BYTES).await?;
    decode_review(&body).map_err(|e| https::error(StatusCode::BAD_REQUEST, e))
}

/// Decodes an AdmissionReview body into its request. Pure (fuzzed by `fuzz/admission_review`):
/// the body comes from whoever reaches 15017.
pub fn decode_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    review
        .try_into()
        .map_err(|e| format!("AdmissionReview without request: {e}"))
}

/// The Pod an admission request carries (any object kind may arrive; only a Pod decodes).
pub fn pod_from(object: &DynamicObject) -> Result<Pod, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}
