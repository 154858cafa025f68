//! The injector's admission endpoint on 15017 (`POST /inject`): decodes an AdmissionReview,
//! decides and injects with the pure functions of [`crate::injector`], and answers with the JSON
//! patch between the original and the injected Pod.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::context::MeshStateRx;
use crate::https::{self, Body, Peer};
use crate::injector::{self, Decision, INJECT_PATH, InjectionParams};
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
        let Some(state) = self.mesh.borrow().clone() else {
            // Pods of a meshed namespace must not start unmeshed; the API server retries.
            return allow.deny("trellis injector: the mesh is not ready yet (no active Mesh)");
        };
        let params = InjectionParams {
            mesh: state.spec.clone(),
            operator_namespace: self.operator_namespace.clone(),
            native_sidecars: self.native_sidecars,
        };
        let name = pod
            .metadata
            .name
            .clone()
            .or(pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match injector::decide(&pod, &namespace, &namespace_labels, &params) {
            Decision::Skip(reason) => {
                info!(pod = %name, %namespace, reason, "not injecting");
                allow
            }
            Decision::Inject => {
                let injected = injector::inject(&pod, &params);
                let (Ok(before), Ok(after)) =
                    (serde_json::to_value(&pod), serde_json::to_value(&injected))
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
