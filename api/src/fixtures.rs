//! Test fixtures shared by the tests of every crate: Istio's documentation examples (bookinfo
//! request routing, fault injection, timeouts, retries, circuit breaking, egress ServiceEntries
//! and the API reference's samples), kept as YAML files in `api/tests/fixtures/istio/` with
//! `apiVersion: networking.istio.io/v1`. Unit tests round-trip them through the types, the
//! webhook's and `trellisctl validate`'s tests admit them, and the e2e tests apply them to a real
//! cluster under every served version. Compiled only for tests (the `test-fixtures` feature,
//! which other crates enable as a dev-dependency).

/// `(name, YAML)` of every example, DestinationRules first so their subsets exist when the
/// VirtualServices that use them are admitted.
pub const ISTIO_EXAMPLES: &[(&str, &str)] = &[
    (
        "reviews-destination-rule",
        include_str!("../tests/fixtures/istio/reviews-destination-rule.yaml"),
    ),
    (
        "ratings-destination-rule",
        include_str!("../tests/fixtures/istio/ratings-destination-rule.yaml"),
    ),
    (
        "circuit-breaker",
        include_str!("../tests/fixtures/istio/circuit-breaker.yaml"),
    ),
    (
        "destination-rule-reference",
        include_str!("../tests/fixtures/istio/destination-rule-reference.yaml"),
    ),
    (
        "reviews-jason-v2",
        include_str!("../tests/fixtures/istio/reviews-jason-v2.yaml"),
    ),
    (
        "ratings-fault-delay",
        include_str!("../tests/fixtures/istio/ratings-fault-delay.yaml"),
    ),
    (
        "ratings-fault-abort",
        include_str!("../tests/fixtures/istio/ratings-fault-abort.yaml"),
    ),
    (
        "reviews-timeout",
        include_str!("../tests/fixtures/istio/reviews-timeout.yaml"),
    ),
    (
        "httpbin-timeout",
        include_str!("../tests/fixtures/istio/httpbin-timeout.yaml"),
    ),
    (
        "ratings-retries",
        include_str!("../tests/fixtures/istio/ratings-retries.yaml"),
    ),
    (
        "virtual-service-reference",
        include_str!("../tests/fixtures/istio/virtual-service-reference.yaml"),
    ),
    (
        "tcp-and-tls-routes",
        include_str!("../tests/fixtures/istio/tcp-and-tls-routes.yaml"),
    ),
    (
        "httpbin-external",
        include_str!("../tests/fixtures/istio/httpbin-external.yaml"),
    ),
    (
        "mongo-static",
        include_str!("../tests/fixtures/istio/mongo-static.yaml"),
    ),
    (
        "details-workload-selector",
        include_str!("../tests/fixtures/istio/details-workload-selector.yaml"),
    ),
];

/// The example named `name` (its file name without `.yaml`).
///
/// # Panics
/// When there is no such example: a test naming a fixture that does not exist is a bug.
pub fn istio_example(name: &str) -> &'static str {
    ISTIO_EXAMPLES
        .iter()
        .find(|(example, _)| *example == name)
        .map(|(_, yaml)| *yaml)
        .unwrap_or_else(|| panic!("no Istio example fixture named {name}"))
}
