//! The validating admission webhook for Istio's traffic resources (`VirtualService`,
//! `DestinationRule`, `ServiceEntry`) and security policies (`PeerAuthentication`,
//! `AuthorizationPolicy`) on 15017 (`POST /validate/networking`, the path kept from when only
//! the traffic kinds were validated), and the `ValidatingWebhookConfiguration` that sends their
//! creations and updates to it (built here, applied by the Mesh controller).
//!
//! This module only adapts: it decodes the AdmissionReview (garbage is a 400, a body over the
//! bound a 413), reads the namespace's DestinationRules for a VirtualService's subset check, and
//! answers with the verdict of the pure [`trellis_api::validate`], whose message
//! names the offending field.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ListParams;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, Client};
use tracing::{debug, info, warn};
use trellis_api::networking::{DestinationRule, EXTRA_VERSIONS, NETWORKING_GROUP, STORED_VERSION};
use trellis_api::security::{SECURITY_EXTRA_VERSIONS, SECURITY_GROUP};
use trellis_api::validate::{Kind, validate_object};
use trellis_config::wellknown::OPERATOR_NAME;

use crate::https::{self, Body, Peer};
use crate::webhook::admission_request;

/// Path of the validating webhook on the webhook port.
pub const VALIDATE_PATH: &str = "/validate/networking";
/// Name of the `ValidatingWebhookConfiguration` the controller applies.
pub const WEBHOOK_CONFIGURATION: &str = "trellis-networking-validator";
/// Name of its single webhook (API servers want a fully qualified name).
pub const WEBHOOK_NAME: &str = "validation.networking.trellis.dev";
/// Resources of `networking.istio.io` sent to the webhook.
pub const RESOURCES: &[&str] = &["virtualservices", "destinationrules", "serviceentries"];
/// Resources of `security.istio.io` sent to the webhook.
pub const SECURITY_RESOURCES: &[&str] = &[
    "peerauthentications",
    "requestauthentications",
    "authorizationpolicies",
];

pub struct Validation {
    pub client: Client,
}

impl Validation {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: Arc<Peer>,
    ) -> Response<Body> {
        let admission = match admission_request(request, VALIDATE_PATH).await {
            Ok(admission) => admission,
            Err(response) => return response,
        };
        let destination_rules = match (&admission.object, kind_of(&admission)) {
            (Some(_), Some(Kind::VirtualService)) => {
                self.destination_rules(admission.namespace.as_deref().unwrap_or_default())
                    .await
            }
            _ => Vec::new(),
        };
        let response = review(&admission, &destination_rules);
        https::full(
            StatusCode::OK,
            serde_json::to_vec(&response.into_review()).unwrap_or_default(),
        )
    }

    /// The DestinationRules of `namespace`, for the subset check. A failure to read them skips
    /// that one check rather than refusing every VirtualService while the read fails; rules that
    /// do not decode (stored before this validation existed) are left out.
    async fn destination_rules(&self, namespace: &str) -> Vec<DestinationRule> {
        let resource = ApiResource::erase::<DestinationRule>(&());
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &resource);
        match api.list(&ListParams::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|object| {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    serde_json::to_value(object)
                        .and_then(serde_json::from_value::<DestinationRule>)
                        .inspect_err(|e| {
                            debug!(%namespace, rule = %name, error = %e, "DestinationRule does not decode; not used for subset checks");
                        })
                        .ok()
                })
                .collect(),
            Err(e) => {
                warn!(%namespace, error = %e, "could not list DestinationRules; skipping the subset check");
                Vec::new()
            }
        }
    }
}

/// Our kind for the request's resource, if it is one of `networking.istio.io`'s we validate.
fn kind_of(request: &AdmissionRequest<DynamicObject>) -> Option<Kind> {
    Kind::from_group_and_name(&request.kind.group, &request.kind.kind)
}

/// The verdict on one admission request, given the DestinationRules of its namespace. Pure.
pub fn review(
    request: &AdmissionRequest<DynamicObject>,
    destination_rules: &[DestinationRule],
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    // Deletions carry no object: nothing to validate.
    let Some(object) = &request.object else {
        return allow;
    };
    let Some(kind) = kind_of(request) else {
        // Only our kinds are registered; anything else is not ours to judge.
        debug!(kind = ?request.kind, "not a validated kind; allowing");
        return allow;
    };
    let value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => return allow.deny(format!("trellis validation: unreadable object: {e}")),
    };
    let namespace = request.namespace.as_deref().unwrap_or_default();
    match validate_object(kind, &value, namespace, destination_rules) {
        Ok(()) => allow,
        Err(rejection) => {
            let name = object
                .metadata
                .name
                .as_deref()
                .or(object.metadata.generate_name.as_deref())
                .unwrap_or_default();
            let message = format!(
                "{} {namespace}/{name} is invalid: {rejection}",
                request.kind.kind
            );
            info!(%message, "refused");
            allow.deny(message)
        }
    }
}

/// The configuration that sends creations and updates of our kinds, in every served version,
/// to [`VALIDATE_PATH`] of the operator's Service.
pub fn webhook_configuration(
    operator_namespace: &str,
    ca_bundle: &str,
    owner: &OwnerReference,
) -> ValidatingWebhookConfiguration {
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let versions = |extra: &[&str]| -> Vec<String> {
        std::iter::once(STORED_VERSION)
            .chain(extra.iter().copied())
            .map(str::to_owned)
            .collect()
    };
    let rule = |group: &str, extra_versions: &[&str], resources: &[&str]| RuleWithOperations {
        api_groups: Some(strings(&[group])),
        api_versions: Some(versions(extra_versions)),
        operations: Some(strings(&["CREATE", "UPDATE"])),
        resources: Some(strings(resources)),
        scope: Some("Namespaced".to_owned()),
    };
    ValidatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(WEBHOOK_CONFIGURATION.to_owned()),
            owner_references: Some(vec![owner.clone()]),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "trellis".to_owned())].into()),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: WEBHOOK_NAME.to_owned(),
            admission_review_versions: strings(&["v1", "v1beta1"]),
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                service: Some(ServiceReference {
                    name: OPERATOR_NAME.to_owned(),
                    namespace: operator_namespace.to_owned(),
                    path: Some(VALIDATE_PATH.to_owned()),
                    port: Some(443),
                }),
                ..WebhookClientConfig::default()
            },
            // As Istio's: an object that was not validated is not admitted. Only these kinds are
            // sent, so an operator outage blocks traffic-rule and policy edits, nothing else.
            failure_policy: Some("Fail".to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            rules: Some(vec![
                rule(NETWORKING_GROUP, EXTRA_VERSIONS, RESOURCES),
                rule(SECURITY_GROUP, SECURITY_EXTRA_VERSIONS, SECURITY_RESOURCES),
            ]),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(10),
            ..ValidatingWebhook::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use trellis_api::fixtures::istio_example;

    use crate::webhook::decode_review;

    fn admission(
        operation: &str,
        kind: &str,
        version: &str,
        object: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        admission_in(NETWORKING_GROUP, operation, kind, version, object)
    }

    fn admission_in(
        group: &str,
        operation: &str,
        kind: &str,
        version: &str,
        object: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0df28fbd-5f5f-4f7a-8b5a-1b2a3c4d5e6f",
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": "x"},
                "name": "reviews",
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": object,
            },
        });
        decode_review(review.to_string().as_bytes()).unwrap()
    }

    fn object(yaml: &str, version: &str) -> Value {
        let mut value: Value = serde_yaml::from_str(yaml).unwrap();
        value["apiVersion"] = format!("{NETWORKING_GROUP}/{version}").into();
        value["metadata"]["namespace"] = "shop".into();
        value
    }

    fn reviews_rule() -> DestinationRule {
        serde_json::from_value(object(istio_example("reviews-destination-rule"), "v1")).unwrap()
    }

    #[test]
    fn answers_with_the_verdict_and_the_field_path() {
        let mut bad_weights = object(istio_example("reviews-jason-v2"), "v1");
        bad_weights["spec"]["http"][1]["route"][0]["weight"] = json!(-5);
        let mut missing_subset = object(istio_example("reviews-jason-v2"), "v1");
        missing_subset["spec"]["http"][0]["route"][0]["destination"]["subset"] = json!("v9");
        let cases = [
            (
                "valid, v1",
                "CREATE",
                "v1",
                Some(object(istio_example("reviews-jason-v2"), "v1")),
                Ok(()),
            ),
            (
                "valid, v1alpha3 update",
                "UPDATE",
                "v1alpha3",
                Some(object(istio_example("reviews-jason-v2"), "v1alpha3")),
                Ok(()),
            ),
            (
                "negative weight",
                "CREATE",
                "v1beta1",
                Some(bad_weights),
                Err(
                    "VirtualService shop/reviews is invalid: spec.http[1].route[0].weight: weight -5 must not be negative",
                ),
            ),
            (
                "subset missing from the namespace's rule",
                "CREATE",
                "v1",
                Some(missing_subset),
                Err(
                    "spec.http[0].route[0].destination.subset: subset \"v9\" is not defined by DestinationRule reviews",
                ),
            ),
            ("deletion", "DELETE", "v1", None, Ok(())),
        ];
        for (name, operation, version, object, expected) in cases {
            let request = admission(operation, "VirtualService", version, object);
            let response = review(&request, &[reviews_rule()]);
            assert_eq!(response.uid, request.uid, "{name}");
            match expected {
                Ok(()) => assert!(response.allowed, "{name}: {:?}", response.result),
                Err(fragment) => {
                    assert!(!response.allowed, "{name}");
                    assert!(
                        response.result.message.contains(fragment),
                        "{name}: {}",
                        response.result.message
                    );
                }
            }
        }
    }

    #[test]
    fn validates_each_kind_by_its_own_rules_and_leaves_other_kinds_alone() {
        let mut duplicate_subsets = object(istio_example("reviews-destination-rule"), "v1");
        duplicate_subsets["spec"]["subsets"][1]["name"] = json!("v1");
        let response = review(
            &admission("CREATE", "DestinationRule", "v1", Some(duplicate_subsets)),
            &[],
        );
        assert!(!response.allowed);
        assert!(
            response
                .result
                .message
                .contains("spec.subsets[1].name: duplicate subset name \"v1\""),
            "{}",
            response.result.message
        );

        let mut static_without_endpoints = object(istio_example("httpbin-external"), "v1beta1");
        static_without_endpoints["spec"]["resolution"] = json!("STATIC");
        let response = review(
            &admission(
                "CREATE",
                "ServiceEntry",
                "v1beta1",
                Some(static_without_endpoints),
            ),
            &[],
        );
        assert!(!response.allowed);
        assert!(response.result.message.contains("spec.endpoints"));

        let gateway = json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g"}, "spec": {"anything": 1}});
        assert!(review(&admission("CREATE", "Gateway", "v1", Some(gateway)), &[]).allowed);
    }

    #[test]
    fn security_policies_with_a_misspelt_field_are_refused() {
        let policy = |source: Value| {
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "allow-a", "namespace": "shop"},
                   "spec": {"rules": [{"from": [{"source": source}]}]}})
        };
        let typo = policy(json!({"principles": ["cluster.local/ns/shop/sa/a"]}));
        let request = admission_in(
            SECURITY_GROUP,
            "CREATE",
            "AuthorizationPolicy",
            "v1",
            Some(typo),
        );
        let response = review(&request, &[]);
        assert!(!response.allowed);
        assert!(
            response
                .result
                .message
                .contains("spec.rules[0].from[0].source.principles: unknown field"),
            "{}",
            response.result.message
        );
        let good = policy(json!({"principals": ["cluster.local/ns/shop/sa/a"]}));
        let request = admission_in(
            SECURITY_GROUP,
            "UPDATE",
            "AuthorizationPolicy",
            "v1beta1",
            Some(good),
        );
        assert!(review(&request, &[]).allowed);
    }

    #[test]
    fn configuration_sends_our_kinds_to_the_validation_path_and_fails_closed() {
        let owner = OwnerReference {
            api_version: "trellis.dev/v1alpha1".to_owned(),
            kind: "Mesh".to_owned(),
            name: "default".to_owned(),
            uid: "u".to_owned(),
            controller: Some(true),
            ..OwnerReference::default()
        };
        let value =
            serde_json::to_value(webhook_configuration("trellis-system", "PEM", &owner)).unwrap();
        assert_eq!(value["metadata"]["name"], WEBHOOK_CONFIGURATION);
        assert_eq!(value["metadata"]["ownerReferences"][0]["kind"], "Mesh");
        let webhook = &value["webhooks"][0];
        assert_eq!(webhook["name"], WEBHOOK_NAME);
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(webhook["admissionReviewVersions"], json!(["v1", "v1beta1"]));
        assert_eq!(
            webhook["clientConfig"]["service"],
            json!({"name": "trellis-operator", "namespace": "trellis-system", "path": "/validate/networking", "port": 443})
        );
        // base64 of "PEM"
        assert_eq!(webhook["clientConfig"]["caBundle"], "UEVN");
        assert_eq!(
            webhook["rules"],
            json!([{
                "apiGroups": ["networking.istio.io"],
                "apiVersions": ["v1", "v1beta1", "v1alpha3"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["virtualservices", "destinationrules", "serviceentries"],
                "scope": "Namespaced",
            }, {
                "apiGroups": ["security.istio.io"],
                "apiVersions": ["v1", "v1beta1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["peerauthentications", "requestauthentications", "authorizationpolicies"],
                "scope": "Namespaced",
            }])
        );
    }
}
