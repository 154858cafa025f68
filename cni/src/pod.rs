//! Which pods the plugin captures, and with what parameters: a pure function of the Pod object,
//! mirroring what the injector (operator/src/injector.rs) wrote into it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use trellis_config::wellknown::{ISTIO_INJECT_ANNOTATION, PROXY_GID, PROXY_UID};
use trellis_init::{
    CaptureConfig, CidrSelection, ConfigError, PortSelection, parse_cidr_list, parse_port_list,
};

use trellis_config::wellknown::{
    EXCLUDE_INBOUND_PORTS_ANNOTATION as EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION as EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_PORTS_ANNOTATION as EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS_ANNOTATION as INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION as INCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_PORTS_ANNOTATION as INCLUDE_OUTBOUND_PORTS,
};
pub use trellis_config::wellknown::{INIT_CONTAINER, STATUS_ANNOTATION};

/// What to do with a pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Capture(CaptureConfig),
    /// Leave the namespace alone, for the reason given.
    Skip(&'static str),
}

/// Decides from the pod as the API server returned it. Errors are annotations the rules cannot be
/// built from; the pod must not start uncaptured, so the caller fails the ADD.
pub fn decide(pod: &Pod) -> Result<Decision, ConfigError> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    if !expects_cni_capture(annotations.get(STATUS_ANNOTATION).map(String::as_str)) {
        return Ok(Decision::Skip("not injected for CNI interception"));
    }
    let opted_out = |map: &BTreeMap<String, String>| {
        map.get(ISTIO_INJECT_ANNOTATION)
            .is_some_and(|value| value == "false")
    };
    if opted_out(annotations) || opted_out(labels) {
        return Ok(Decision::Skip("opted out of injection"));
    }
    let spec = pod.spec.as_ref();
    if spec.is_some_and(|spec| spec.host_network == Some(true)) {
        return Ok(Decision::Skip("host network pod"));
    }
    let has_init_container = spec
        .and_then(|spec| spec.init_containers.as_ref())
        .is_some_and(|containers| containers.iter().any(|c| c.name == INIT_CONTAINER));
    if has_init_container {
        return Ok(Decision::Skip("its trellis-init container captures"));
    }
    capture_config(annotations).map(Decision::Capture)
}

/// Whether the status annotation's JSON says `"interception":"cni"`.
fn expects_cni_capture(status: Option<&str>) -> bool {
    status
        .and_then(|status| serde_json::from_str::<serde_json::Value>(status).ok())
        .is_some_and(|status| status.get("interception").and_then(|i| i.as_str()) == Some("cni"))
}

/// The capture parameters from Istio's annotations: the same mapping the injector makes onto
/// `trellis-init` flags, parsed by the same parsers, with errors naming the annotation.
pub fn capture_config(
    annotations: &BTreeMap<String, String>,
) -> Result<CaptureConfig, ConfigError> {
    let get = |name: &str| annotations.get(name).map(String::as_str);
    let mut config = CaptureConfig {
        proxy_uid: PROXY_UID,
        proxy_gid: PROXY_GID,
        ..CaptureConfig::default()
    };
    if let Some(value) = get(INCLUDE_INBOUND_PORTS) {
        config.include_inbound_ports = PortSelection::parse(INCLUDE_INBOUND_PORTS, value)?;
    }
    if let Some(value) = get(EXCLUDE_INBOUND_PORTS) {
        config.exclude_inbound_ports = parse_port_list(EXCLUDE_INBOUND_PORTS, value)?;
    }
    if let Some(value) = get(INCLUDE_OUTBOUND_PORTS) {
        config.include_outbound_ports = parse_port_list(INCLUDE_OUTBOUND_PORTS, value)?;
    }
    if let Some(value) = get(EXCLUDE_OUTBOUND_PORTS) {
        config.exclude_outbound_ports = parse_port_list(EXCLUDE_OUTBOUND_PORTS, value)?;
    }
    if let Some(value) = get(INCLUDE_OUTBOUND_IP_RANGES) {
        config.include_outbound_ip_ranges =
            CidrSelection::parse(INCLUDE_OUTBOUND_IP_RANGES, value)?;
    }
    if let Some(value) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
        config.exclude_outbound_ip_ranges = parse_cidr_list(EXCLUDE_OUTBOUND_IP_RANGES, value)?;
    }
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const CNI_STATUS: &str = r#"{"version":"1.2.0","interception":"cni"}"#;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod JSON")
    }

    fn injected(extra_annotations: serde_json::Value) -> Pod {
        let mut annotations = json!({ STATUS_ANNOTATION: CNI_STATUS });
        annotations
            .as_object_mut()
            .unwrap()
            .extend(extra_annotations.as_object().unwrap().clone());
        pod(json!({
            "metadata": {"name": "cart", "namespace": "shop", "annotations": annotations},
            "spec": {"containers": [{"name": "trellis-proxy"}, {"name": "app"}]}
        }))
    }

    #[test]
    fn injected_pod_is_captured_with_defaults() {
        assert_eq!(
            decide(&injected(json!({}))),
            Ok(Decision::Capture(CaptureConfig::default()))
        );
    }

    #[test]
    fn skips() {
        let cases = [
            (
                "no status annotation",
                pod(json!({"metadata": {"name": "a"}, "spec": {"containers": []}})),
            ),
            (
                "init-container interception",
                pod(json!({
                    "metadata": {"annotations": {STATUS_ANNOTATION: r#"{"version":"1","interception":"initContainer"}"#}},
                    "spec": {"containers": []}
                })),
            ),
            (
                "malformed status",
                pod(json!({"metadata": {"annotations": {STATUS_ANNOTATION: "cni"}}})),
            ),
            (
                "opt-out annotation",
                injected(json!({"sidecar.istio.io/inject": "false"})),
            ),
            ("opt-out label", {
                let mut p = injected(json!({}));
                p.metadata.labels = Some(BTreeMap::from([(
                    "sidecar.istio.io/inject".to_owned(),
                    "false".to_owned(),
                )]));
                p
            }),
            ("host network", {
                let mut p = injected(json!({}));
                p.spec.as_mut().unwrap().host_network = Some(true);
                p
            }),
            ("has trellis-init", {
                let mut p = injected(json!({}));
                p.spec.as_mut().unwrap().init_containers = Some(vec![
                    serde_json::from_value(json!({"name": "trellis-init"})).unwrap(),
                ]);
                p
            }),
        ];
        for (name, pod) in cases {
            assert!(
                matches!(decide(&pod), Ok(Decision::Skip(_))),
                "{name}: {:?}",
                decide(&pod)
            );
        }
    }

    #[test]
    fn annotations_map_like_the_injector_flags() {
        let decision = decide(&injected(json!({
            INCLUDE_INBOUND_PORTS: "8080,9090",
            EXCLUDE_INBOUND_PORTS: "9090",
            INCLUDE_OUTBOUND_PORTS: "443",
            EXCLUDE_OUTBOUND_PORTS: "5432",
            INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8",
            EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.1/32, 169.254.169.254",
            "sidecar.istio.io/inject": "true",
        })));
        let expected = CaptureConfig {
            include_inbound_ports: PortSelection::Only(vec![8080, 9090]),
            exclude_inbound_ports: vec![9090],
            include_outbound_ports: vec![443],
            exclude_outbound_ports: vec![5432],
            include_outbound_ip_ranges: CidrSelection::parse("x", "10.0.0.0/8").unwrap(),
            exclude_outbound_ip_ranges: parse_cidr_list("x", "10.96.0.1/32,169.254.169.254/32")
                .unwrap(),
            ..CaptureConfig::default()
        };
        assert_eq!(decision, Ok(Decision::Capture(expected)));
    }

    #[test]
    fn bad_annotation_is_an_error_naming_it() {
        let error = decide(&injected(json!({EXCLUDE_OUTBOUND_PORTS: "http"}))).unwrap_err();
        assert!(
            error.to_string().contains(EXCLUDE_OUTBOUND_PORTS),
            "{error}"
        );
    }
}
