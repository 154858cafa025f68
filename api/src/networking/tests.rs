use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::*;
use crate::fixtures::{ISTIO_EXAMPLES, istio_example};
use crate::schema::objects_dropping_unknown_fields;
use crate::validate::{Kind, validate_object};

fn example_value(yaml: &str, version: &str) -> Value {
    let mut value: Value = serde_yaml::from_str(yaml).unwrap();
    value["apiVersion"] = format!("{NETWORKING_GROUP}/{version}").into();
    value
}

/// Decodes `value` as `K` and checks that its spec serializes back to exactly what was read.
fn round_trip<K>(name: &str, version: &str, value: &Value)
where
    K: kube::Resource + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{name} ({version}) does not decode: {e}"));
    let encoded = serde_json::to_value(&object).unwrap();
    assert_eq!(
        encoded["spec"], value["spec"],
        "{name} ({version}) changed in a round trip"
    );
}

#[test]
fn istio_documentation_examples_round_trip_in_every_served_version() {
    // The namespace the examples live in; `prod` makes the reference example's FQDNs local.
    let namespace = "prod";
    let rules: Vec<DestinationRule> = ISTIO_EXAMPLES
        .iter()
        .map(|(_, yaml)| example_value(yaml, STORED_VERSION))
        .filter(|value| value["kind"] == "DestinationRule")
        .map(|mut value| {
            value["metadata"]["namespace"] = namespace.into();
            serde_json::from_value(value).unwrap()
        })
        .collect();
    assert_eq!(rules.len(), 4);
    for version in std::iter::once(&STORED_VERSION).chain(EXTRA_VERSIONS) {
        for (name, yaml) in ISTIO_EXAMPLES {
            let value = example_value(yaml, version);
            let kind = value["kind"].as_str().unwrap();
            match kind {
                "VirtualService" => round_trip::<VirtualService>(name, version, &value),
                "DestinationRule" => round_trip::<DestinationRule>(name, version, &value),
                "ServiceEntry" => round_trip::<ServiceEntry>(name, version, &value),
                other => panic!("{name}: unexpected kind {other}"),
            }
            let kind = Kind::from_group_and_name(NETWORKING_GROUP, kind).unwrap();
            if let Err(rejection) = validate_object(kind, &value, namespace, &rules) {
                panic!("{name} ({version}) is refused: {rejection}");
            }
        }
    }
}

#[test]
fn examples_decode_into_the_fields_istio_documents() {
    let vs: VirtualService =
        serde_json::from_value(example_value(istio_example("reviews-jason-v2"), "v1beta1"))
            .unwrap();
    let first = &vs.spec.http[0];
    assert_eq!(
        first.r#match[0].headers["end-user"],
        StringMatch::Exact("jason".into())
    );
    assert_eq!(first.route[0].destination.host, "reviews");
    assert_eq!(first.route[0].destination.subset.as_deref(), Some("v2"));

    let vs: VirtualService = serde_json::from_value(example_value(
        istio_example("ratings-fault-delay"),
        "v1alpha3",
    ))
    .unwrap();
    let delay = vs.spec.http[0]
        .fault
        .as_ref()
        .unwrap()
        .delay
        .as_ref()
        .unwrap();
    assert_eq!(delay.fixed_delay.as_deref(), Some("7s"));
    assert_eq!(delay.percentage, Some(Percent { value: 100.0 }));

    let dr: DestinationRule =
        serde_json::from_value(example_value(istio_example("circuit-breaker"), "v1")).unwrap();
    let policy = dr.spec.traffic_policy.unwrap();
    let pool = policy.connection_pool.unwrap();
    assert_eq!(pool.tcp.unwrap().max_connections, Some(1));
    assert_eq!(pool.http.unwrap().http1_max_pending_requests, Some(1));
    let outlier = policy.outlier_detection.unwrap();
    assert_eq!(outlier.consecutive_5xx_errors, Some(1));
    assert_eq!(outlier.base_ejection_time.as_deref(), Some("3m"));

    let se: ServiceEntry =
        serde_json::from_value(example_value(istio_example("httpbin-external"), "v1")).unwrap();
    assert_eq!(se.spec.resolution, Some(service_entry::Resolution::Dns));
    assert_eq!(
        se.spec.location,
        Some(service_entry::Location::MeshExternal)
    );
    assert_eq!(se.spec.ports[0].protocol.as_deref(), Some("HTTP"));
}

#[test]
fn string_match_is_a_oneof_that_allows_the_empty_match() {
    let cases = [
        (json!({"exact": "a"}), Ok(StringMatch::Exact("a".into()))),
        (
            json!({"prefix": "/a"}),
            Ok(StringMatch::Prefix("/a".into())),
        ),
        (json!({"regex": "a+"}), Ok(StringMatch::Regex("a+".into()))),
        (json!({}), Ok(StringMatch::Any)),
        (json!({"exact": "a", "prefix": "b"}), Err("only one of")),
        (json!({"exct": "a"}), Err("unknown field \"exct\"")),
        (json!("a"), Err("invalid type")),
    ];
    for (input, expected) in cases {
        let decoded = decode_strict::<StringMatch>(&input);
        match (decoded, expected) {
            (Ok(decoded), Ok(expected)) => {
                assert_eq!(decoded, expected, "{input}");
                assert_eq!(serde_json::to_value(&decoded).unwrap(), input);
            }
            (Err(e), Err(fragment)) => {
                assert!(e.to_string().contains(fragment), "{input}: {e}")
            }
            (decoded, expected) => panic!("{input}: got {decoded:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn strict_decoding_names_the_path_of_a_misspelt_field() {
    let cases = [
        (
            json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "subsett": "v1"}}]}]}),
            "http[0].route[0].destination.subsett",
            "unknown field \"subsett\"",
        ),
        (
            json!({"hosts": ["a"], "htttp": []}),
            "htttp",
            "unknown field \"htttp\"",
        ),
        (
            json!({"hosts": ["a"], "http": [{"match": [{"uri": {"prefx": "/"}}]}]}),
            "http[0].match[0].uri.prefx",
            "unknown field \"prefx\"",
        ),
        (
            json!({"hosts": ["a"], "http": [{"timeout": 5}]}),
            "http[0].timeout",
            "invalid type: integer `5`, expected a string",
        ),
    ];
    for (spec, path, message) in cases {
        let error = decode_strict::<VirtualServiceSpec>(&spec).unwrap_err();
        assert!(error.path.starts_with(path), "{spec}: path {error}");
        assert!(error.message.contains(message), "{spec}: {error}");
    }
    let error = decode_strict::<DestinationRuleSpec>(&json!({
        "host": "a",
        "trafficPolicy": {"connectionPool": {"tcp": {"maxConections": 1}}}
    }))
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("trafficPolicy.connectionPool.tcp.maxConections")
    );
    let error = decode_strict::<ServiceEntrySpec>(&json!({
        "hosts": ["a"], "resolution": "DNS_ROUNDROBIN"
    }))
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("resolution: unknown variant `DNS_ROUNDROBIN`"),
        "{error}"
    );
}

#[test]
fn crds_serve_three_versions_with_one_structural_schema_that_keeps_unknown_fields() {
    let expected = [
        ("virtualservices.networking.istio.io", "vs"),
        ("destinationrules.networking.istio.io", "dr"),
        ("serviceentries.networking.istio.io", "se"),
    ];
    let crds = [
        networking_crd::<VirtualService>(),
        networking_crd::<DestinationRule>(),
        networking_crd::<ServiceEntry>(),
    ];
    assert_eq!(crds.len(), expected.len());
    for (crd, (name, short_name)) in crds.iter().zip(expected) {
        let crd = serde_json::to_value(crd).unwrap();
        assert_eq!(crd["metadata"]["name"], name);
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"], json!([short_name]));
        assert_eq!(
            crd["spec"]["names"]["categories"],
            json!(["istio-io", "networking-istio-io"])
        );
        assert_eq!(crd["spec"]["conversion"]["strategy"], "None");
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let summary: Vec<_> = versions
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap(),
                    v["served"].clone(),
                    v["storage"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("v1", json!(true), json!(true)),
                ("v1beta1", json!(true), json!(false)),
                ("v1alpha3", json!(true), json!(false)),
            ],
            "{name}"
        );
        assert!(
            versions
                .iter()
                .all(|v| v["schema"] == versions[0]["schema"])
        );
        // Every object that lists its properties keeps unknown fields, for the webhook to refuse
        // naming them (pruning would drop them silently before admission).
        let closed = objects_dropping_unknown_fields(&versions[0]["schema"]["openAPIV3Schema"]);
        assert!(closed.is_empty(), "{name}: {closed:?}");
        let text = crd.to_string();
        for forbidden in [
            "\"$ref\"",
            "anyOf",
            "oneOf",
            "allOf",
            "\"default\"",
            "nullable",
            "additionalProperties\":false",
            "null",
        ] {
            assert!(
                !text.contains(forbidden),
                "{name} schema contains {forbidden}"
            );
        }
    }
    // The generated (unpatched) CRD is where `nullable` would come from, and it prunes unknown
    // fields: make sure the patch matters, so this test fails if `networking_crd` stops making it.
    let generated = VirtualService::crd();
    let closed = objects_dropping_unknown_fields(
        &serde_json::to_value(&generated).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
    );
    assert!(!closed.is_empty());
    assert!(
        serde_json::to_string(&VirtualService::crd())
            .unwrap()
            .contains("nullable")
    );
}

#[test]
fn schema_spells_fields_and_enums_as_istio_does() {
    let schema = |crd: CustomResourceDefinition| {
        serde_json::to_value(crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            ["properties"]["spec"]
            .clone()
    };
    let vs = schema(networking_crd::<VirtualService>());
    let http = &vs["properties"]["http"]["items"]["properties"];
    for field in [
        "name",
        "match",
        "route",
        "redirect",
        "directResponse",
        "delegate",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrorPercent",
        "mirror_percent",
        "mirrorPercentage",
        "mirrors",
        "corsPolicy",
        "headers",
    ] {
        assert!(http.get(field).is_some(), "http route field {field}");
    }
    let uri = &http["match"]["items"]["properties"]["uri"];
    assert_eq!(uri["maxProperties"], 1);
    assert_eq!(uri["properties"]["regex"]["type"], "string");
    assert_eq!(http["route"]["items"]["required"], json!(["destination"]));
    let dr = schema(networking_crd::<DestinationRule>());
    let lb = &dr["properties"]["trafficPolicy"]["properties"]["loadBalancer"]["properties"];
    assert_eq!(
        lb["simple"]["enum"],
        json!([
            "UNSPECIFIED",
            "LEAST_CONN",
            "RANDOM",
            "PASSTHROUGH",
            "ROUND_ROBIN",
            "LEAST_REQUEST"
        ])
    );
    let tls = &dr["properties"]["trafficPolicy"]["properties"]["tls"]["properties"];
    assert_eq!(
        tls["mode"]["enum"],
        json!(["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"])
    );
    let se = schema(networking_crd::<ServiceEntry>());
    assert_eq!(
        se["properties"]["resolution"]["enum"],
        json!(["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"])
    );
    assert_eq!(
        se["properties"]["location"]["enum"],
        json!(["MESH_EXTERNAL", "MESH_INTERNAL"])
    );
    assert_eq!(
        se["properties"]["ports"]["items"]["required"],
        json!(["name", "number"])
    );
}
