//! Istio's traffic resources on the real cluster: the documentation's VirtualServices,
//! DestinationRules and ServiceEntries apply unchanged with `kubectl` under every served
//! `apiVersion` (v1, v1beta1, v1alpha3) and are stored without losing a field; misspelt fields
//! and invalid specs are refused with an error naming the field — enum values by the API
//! server's schema, typos (kept by the schema instead of pruned, whatever the client) and
//! everything else by the operator's validating webhook.

use std::time::Duration;

use serde_json::Value;
use trellis_api::fixtures::{ISTIO_EXAMPLES, istio_example};
use trellis_api::networking::{EXTRA_VERSIONS, STORED_VERSION};
use trellis_e2e::*;

const WEBHOOK_CONFIGURATION: &str = "trellis-networking-validator";
const DENIED: &str = "admission webhook \"validation.networking.trellis.dev\" denied the request";

fn with_version(yaml: &str, version: &str) -> String {
    yaml.replace(
        "apiVersion: networking.istio.io/v1\n",
        &format!("apiVersion: networking.istio.io/{version}\n"),
    )
}

/// What `kubectl` would send for `yaml` (converted on the client, nothing stored).
fn client_object(namespace: &str, yaml: &str) -> anyhow::Result<Value> {
    let json = kubectl(
        &[
            "-n",
            namespace,
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            "-",
        ],
        Some(yaml),
    )?;
    Ok(serde_json::from_str(&json)?)
}

fn apply_in(namespace: &str, yaml: &str) -> anyhow::Result<String> {
    kubectl(&["-n", namespace, "apply", "-f", "-"], Some(yaml))
}

/// Waits until the webhook is registered and answering, so the refusals below are its own.
async fn wait_for_webhook(namespace: &str) -> anyhow::Result<()> {
    let probe = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: webhook-probe}\nspec:\n  hosts: [probe]\n  http:\n  - route:\n    - destination: {host: probe}\n      weight: -1\n";
    wait_for(
        "the validating webhook to refuse an invalid VirtualService",
        Duration::from_secs(120),
        || async move {
            match apply_in(namespace, probe) {
                Err(e) if e.to_string().contains(DENIED) => Ok(Some(())),
                Err(e) => Err(e),
                // Admitted before the webhook was registered: try again (now an update).
                Ok(_) => Ok(None),
            }
        },
    )
    .await
}

#[tokio::test]
async fn istio_documentation_examples_apply_under_every_served_version() -> anyhow::Result<()> {
    client().await?;
    let versions = std::iter::once(&STORED_VERSION).chain(EXTRA_VERSIONS);
    for version in versions {
        let ns = TestNamespace::create(&format!("e2e-traffic-{version}"), &[])?;
        // DestinationRules come first in ISTIO_EXAMPLES, so the subsets the routes use exist.
        for (name, yaml) in ISTIO_EXAMPLES {
            let yaml = with_version(yaml, version);
            let sent = client_object(&ns.name, &yaml)?;
            apply_in(&ns.name, &yaml)
                .map_err(|e| anyhow::anyhow!("{name} ({version}) refused: {e:#}"))?;
            // Read back through the same version: every field survived (nothing pruned).
            let kind = sent["kind"].as_str().unwrap_or_default().to_lowercase();
            let object_name = sent["metadata"]["name"].as_str().unwrap_or_default();
            let resource = format!("{kind}.{version}.networking.istio.io");
            let stored: Value = serde_json::from_str(&kubectl(
                &["-n", &ns.name, "get", &resource, object_name, "-o", "json"],
                None,
            )?)?;
            assert_eq!(
                stored["apiVersion"],
                format!("networking.istio.io/{version}")
            );
            assert_eq!(
                stored["spec"], sent["spec"],
                "{name} ({version}) was not stored as sent"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn typos_and_invalid_specs_are_refused_naming_the_field() -> anyhow::Result<()> {
    client().await?;
    let ns = TestNamespace::create("e2e-traffic-invalid", &[])?;
    wait_for_webhook(&ns.name).await?;
    let config: Value = serde_json::from_str(&kubectl(
        &[
            "get",
            "validatingwebhookconfiguration",
            WEBHOOK_CONFIGURATION,
            "-o",
            "json",
        ],
        None,
    )?)?;
    assert_eq!(config["metadata"]["ownerReferences"][0]["kind"], "Mesh");
    assert_eq!(config["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(config["webhooks"][0]["sideEffects"], "None");

    // The bookinfo rule for `reviews` (subsets v1, v2, v3) is what a route's subset is checked
    // against.
    apply_in(&ns.name, istio_example("reviews-destination-rule"))?;

    let vs = |version: &str, name: &str, http: &str| {
        format!(
            "apiVersion: networking.istio.io/{version}\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
        )
    };
    let cases: Vec<(&str, String, &[&str])> = vec![
        // Misspelt fields: kept by the schema, refused by the webhook.
        (
            "misspelt subset",
            vs(
                "v1",
                "typo-subset",
                "  - route:\n    - destination: {host: reviews, subsett: v1}\n",
            ),
            &[DENIED, "spec.http[0].route[0].destination.subsett: unknown field \"subsett\""],
        ),
        (
            "misspelt top-level field of a v1alpha3 rule",
            "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: typo-top}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConections: 10}\n".to_owned(),
            &[DENIED, "spec.trafficPolicy.connectionPool.tcp.maxConections: unknown field \"maxConections\""],
        ),
        // An enum value Istio does not have: refused by the API server's schema.
        (
            "unknown resolution",
            "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: bad-resolution}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  resolution: DNS_ROUNDROBIN\n".to_owned(),
            &["spec.resolution", "DNS_ROUNDROBIN"],
        ),
        // Everything else: the operator's validating webhook.
        (
            "negative weight",
            vs(
                "v1",
                "negative-weight",
                "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 110\n    - destination: {host: reviews, subset: v2}\n      weight: -10\n",
            ),
            &[DENIED, "spec.http[0].route[1].weight: weight -10 must not be negative"],
        ),
        (
            "weights above 100",
            vs(
                "v1beta1",
                "heavy-weights",
                "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v2}\n      weight: 30\n",
            ),
            &[DENIED, "spec.http[0].route: the weights add up to 110"],
        ),
        (
            "subset the DestinationRule does not define",
            vs(
                "v1alpha3",
                "missing-subset",
                "  - route:\n    - destination: {host: reviews, subset: v7}\n",
            ),
            &[DENIED, "spec.http[0].route[0].destination.subset: subset \"v7\" is not defined by DestinationRule reviews"],
        ),
        (
            "invalid regex",
            vs(
                "v1",
                "bad-regex",
                "  - match:\n    - uri: {regex: \"/api/(v1\"}\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].match[0].uri.regex: invalid RE2 regex"],
        ),
        (
            "duration in days",
            vs(
                "v1",
                "bad-timeout",
                "  - timeout: 1d\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].timeout: \"1d\" is not a duration"],
        ),
        (
            "abort status outside HTTP",
            vs(
                "v1",
                "bad-abort",
                "  - fault:\n      abort: {httpStatus: 600, percentage: {value: 50}}\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].fault.abort.httpStatus: 600 is not an HTTP status"],
        ),
        (
            "percentage above 100",
            vs(
                "v1",
                "bad-percentage",
                "  - fault:\n      delay: {fixedDelay: 1s, percentage: {value: 150}}\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].fault.delay.percentage.value: 150 is not a percentage"],
        ),
        (
            "unknown retry condition",
            vs(
                "v1",
                "bad-retry",
                "  - retries: {attempts: 3, retryOn: \"5xx,connect-failures\"}\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].retries.retryOn: \"connect-failures\" is not a retry condition"],
        ),
        (
            "negative retry attempts",
            vs(
                "v1",
                "negative-attempts",
                "  - retries: {attempts: -1}\n    route:\n    - destination: {host: reviews}\n",
            ),
            &[DENIED, "spec.http[0].retries.attempts: -1 must not be negative"],
        ),
        (
            "duplicate subset names",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: duplicate-subsets}\nspec:\n  host: ratings\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v1, labels: {version: v2}}\n".to_owned(),
            &[DENIED, "spec.subsets[1].name: duplicate subset name \"v1\""],
        ),
        (
            "STATIC without endpoints",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: static-nothing}\nspec:\n  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]\n  resolution: STATIC\n".to_owned(),
            &[DENIED, "spec.endpoints: resolution STATIC needs endpoints or a workloadSelector"],
        ),
        (
            "DNS with a wildcard host",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: dns-wildcard}\nspec:\n  hosts: [\"*.example.com\"]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  resolution: DNS\n".to_owned(),
            &[DENIED, "spec.hosts[0]: wildcard host \"*.example.com\" cannot be resolved with DNS"],
        ),
        (
            "address that is not an IP",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad-address}\nspec:\n  hosts: [db.example.com]\n  addresses: [10.0.0.300]\n  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]\n  resolution: NONE\n".to_owned(),
            &[DENIED, "spec.addresses[0]: \"10.0.0.300\" is not an IP address or CIDR"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, yaml, fragments) in cases {
        match apply_in(&ns.name, &yaml) {
            Ok(out) => failures.push(format!("{what}: admitted ({})", out.trim())),
            Err(e) => {
                let message = e.to_string();
                if let Some(missing) = fragments.iter().find(|f| !message.contains(**f)) {
                    failures.push(format!("{what}: error lacks {missing:?}: {message}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Without kubectl's validation (any API client) the typo reaches the webhook all the same:
    // the schema keeps unknown fields rather than pruning them before admission.
    let unvalidated = vs(
        "v1",
        "typo-unvalidated",
        "  - route:\n    - destination: {host: reviews, subsett: v1}\n",
    );
    let refused = kubectl(
        &["-n", &ns.name, "apply", "--validate=false", "-f", "-"],
        Some(&unvalidated),
    );
    let message = refused
        .expect_err("a typo is refused without kubectl's validation too")
        .to_string();
    assert!(
        message.contains(DENIED) && message.contains("destination.subsett"),
        "{message}"
    );

    // The same VirtualService with the subset the rule defines is admitted.
    apply_in(
        &ns.name,
        &vs(
            "v1",
            "valid-subset",
            "  - route:\n    - destination: {host: reviews, subset: v3}\n",
        ),
    )?;
    Ok(())
}
