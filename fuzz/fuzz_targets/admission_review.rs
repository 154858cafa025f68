//! Fuzzes the injector webhook on 15017 behind its decoding: an AdmissionReview body is decoded,
//! its object read as a Pod, and — as the handler does — the injection decided, the sidecar
//! injected and the JSON patch between the two computed. None of it may panic on any input.

#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use trellis_api::MeshSpec;
use trellis_operator::injector::{self, Decision, InjectionParams};
use trellis_operator::webhook::{decode_review, pod_from};

static PARAMS: LazyLock<InjectionParams> = LazyLock::new(|| InjectionParams {
    mesh: serde_json::from_str::<MeshSpec>(r#"{"version":"0.1.0"}"#).expect("a minimal Mesh"),
    operator_namespace: "trellis-system".to_owned(),
    native_sidecars: false,
});

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_review(data) else {
        return;
    };
    let Some(object) = &request.object else {
        return;
    };
    let Ok(pod) = pod_from(object) else {
        return;
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let labels = BTreeMap::from([("trellis.dev/inject".to_owned(), "enabled".to_owned())]);
    for native_sidecars in [false, true] {
        let params = InjectionParams {
            native_sidecars,
            ..PARAMS.clone()
        };
        if injector::decide(&pod, &namespace, &labels, &params.operator_namespace)
            == Decision::Inject
        {
            let injected = injector::inject(&pod, &params);
            let before = serde_json::to_value(&pod).expect("a decoded pod encodes");
            let after = serde_json::to_value(&injected).expect("an injected pod encodes");
            let mut patched = before.clone();
            json_patch::patch(&mut patched, &json_patch::diff(&before, &after))
                .expect("the patch applies to the pod it was computed from");
            assert_eq!(
                patched, after,
                "the patch does not produce the injected pod"
            );
        }
    }
});
