//! Istio-standard metrics in the Prometheus/OpenMetrics text format: TCP (`istio_tcp_*`) for
//! opaque connections, requests (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) for HTTP.
//!
//! Every label value is bounded, so no client or upstream can mint series: values come from the
//! config (services, namespaces, policies, clusters), the proxy itself (reporter, protocol,
//! flags) or a verified certificate (principals), never from what a request or response says.
//! The two that come from the wire are bounded here: `response_code` is a status (at most 900
//! values) and `grpc_response_status` one of gRPC's 17 codes ([`grpc_status`]). Methods,
//! hosts and paths are never labels (they go to the access log only).

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::forward::ByteCounters;

pub const UNKNOWN: &str = "unknown";

/// A label value. Shared: the label sets of every request are copies of a few values, so a copy
/// is a reference count, not an allocation.
pub type LabelValue = Arc<str>;

/// Shared [`LabelValue`]s of the values most label sets carry, allocated once.
pub mod values {
    use std::sync::LazyLock;

    use super::LabelValue;

    macro_rules! shared {
        ($($name:ident = $text:expr;)*) => {$(
            pub fn $name() -> LabelValue {
                static VALUE: LazyLock<LabelValue> = LazyLock::new(|| LabelValue::from($text));
                VALUE.clone()
            }
        )*};
    }

    shared! {
        unknown = super::UNKNOWN;
        no_flags = "-";
        empty = "";
        tcp = "tcp";
        http = "http";
        grpc = "grpc";
        mutual_tls = super::MUTUAL_TLS;
        plaintext = super::PLAINTEXT;
    }
}

/// The `grpc_response_status` of a `grpc-status` value from the wire: the code when it is one
/// of gRPC's (`0`–`16`), else `2` (UNKNOWN, what a gRPC client makes of a status it cannot
/// read), so an upstream cannot mint a series per value it sends.
pub fn grpc_status(value: &str) -> LabelValue {
    match value.parse::<u8>() {
        Ok(code @ 0..=16) if value.len() <= 2 && value.bytes().all(|b| b.is_ascii_digit()) => {
            code.to_string().into()
        }
        _ => "2".into(),
    }
}

/// `response_flags` values (Envoy's names, as Istio reports them).
pub mod flags {
    /// No route: outbound under `REGISTRY_ONLY` to an unknown destination; inbound, a
    /// connection a STRICT port cannot accept (no mesh mutual TLS), which Envoy reports as `NR`
    /// too (no filter chain matched).
    pub const NO_ROUTE: &str = "NR";
    /// No ready endpoint for the service port.
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// Connecting to the upstream failed, its mutual TLS handshake included.
    pub const UPSTREAM_FAILURE: &str = "UF";
    /// The downstream's mutual TLS handshake failed (untrusted or missing client certificate,
    /// no SPIFFE ID, timeout).
    pub const DOWNSTREAM_PROTOCOL_ERROR: &str = "DPE";
    /// The upstream reset or closed the connection before a complete response.
    pub const UPSTREAM_CONNECTION_TERMINATION: &str = "UC";
    /// The downstream went away before the response was complete.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: &str = "DC";
    /// Denied by an AuthorizationPolicy.
    pub const RBAC: &str = "RBAC";
    /// Denied by an external authorizer (AuthorizationPolicy CUSTOM), or its check failed.
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: &str = "UAEX";
    /// The route's timeout (or the last per-try timeout) passed before a response.
    pub const UPSTREAM_REQUEST_TIMEOUT: &str = "UT";
    /// Every retry the route allows was used and the last try failed too.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: &str = "URX";
    /// A route's fault injection delayed the request.
    pub const DELAY_INJECTED: &str = "DI";
    /// A route's fault injection aborted the request.
    pub const FAULT_INJECTED: &str = "FI";
    /// A route's destination names a host the proxy has no service for.
    pub const NO_CLUSTER_FOUND: &str = "NC";
    /// A cluster's circuit breaker (DestinationRule `connectionPool` limit) refused the
    /// request or connection.
    pub const UPSTREAM_OVERFLOW: &str = "UO";
}

/// `connection_security_policy` values.
pub const MUTUAL_TLS: &str = "mutual_tls";
pub const PLAINTEXT: &str = "none";

/// Istio's standard TCP labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: LabelValue,
    pub source_workload: LabelValue,
    pub source_workload_namespace: LabelValue,
    pub source_principal: LabelValue,
    pub destination_workload: LabelValue,
    pub destination_workload_namespace: LabelValue,
    pub destination_service: LabelValue,
    pub destination_service_name: LabelValue,
    pub destination_service_namespace: LabelValue,
    pub destination_principal: LabelValue,
    pub request_protocol: LabelValue,
    pub connection_security_policy: LabelValue,
    pub response_flags: LabelValue,
}

impl TcpLabels {
    /// Labels with every peer field `unknown`, for `reporter` (`source` or `destination`).
    pub fn unknown(reporter: &str) -> Self {
        Self {
            reporter: reporter.into(),
            source_workload: values::unknown(),
            source_workload_namespace: values::unknown(),
            source_principal: values::unknown(),
            destination_workload: values::unknown(),
            destination_workload_namespace: values::unknown(),
            destination_service: values::unknown(),
            destination_service_name: values::unknown(),
            destination_service_namespace: values::unknown(),
            destination_principal: values::unknown(),
            request_protocol: values::tcp(),
            connection_security_policy: values::unknown(),
            response_flags: values::no_flags(),
        }
    }

    /// Fills the `destination_service*` labels from a service's first hostname and namespace.
    pub fn with_service(mut self, hostname: &str, namespace: &str) -> Self {
        self.set_service(hostname, namespace);
        self
    }

    /// [`Self::with_service`] in place.
    pub fn set_service(&mut self, hostname: &str, namespace: &str) {
        self.destination_service = hostname.into();
        self.destination_service_name = hostname.split('.').next().unwrap_or(hostname).into();
        self.destination_service_namespace = namespace.into();
    }
}

/// Istio's standard request labels: the connection's, plus what the response was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: TcpLabels,
    pub response_code: u16,
    /// `grpc-status` of a gRPC response (trailers, or headers of a trailers-only response);
    /// empty for other requests, as Istio reports it.
    pub grpc_response_status: LabelValue,
}

/// Envoy's default histogram buckets, which Istio's request histograms use (milliseconds for
/// the duration, bytes for the sizes).
pub const ISTIO_BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Builds the histograms of a [`Family`] with [`ISTIO_BUCKETS`].
#[derive(Clone, Copy, Debug, Default)]
pub struct IstioBuckets;

impl MetricConstructor<Histogram> for IstioBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(ISTIO_BUCKETS)
    }
}

type Histograms = Family<RequestLabels, Histogram, IstioBuckets>;

/// The AuthorizationPolicy (`<namespace>.<name>`, or `none`) that denied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

/// One finished HTTP request, as counted.
#[derive(Clone, Debug)]
pub struct RequestSample {
    pub labels: RequestLabels,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The request metrics of one label set.
struct RequestMetrics {
    count: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

pub struct Metrics {
    registry: Registry,
    /// Each label set's request metrics, found with one fast hash per request rather than a
    /// SipHash of the whole label set in each of the four families (the hot path's largest
    /// single cost before). Keys hold the proxy's own label values; the hasher is seeded.
    by_labels: RwLock<HashMap<RequestLabels, RequestMetrics, foldhash::fast::RandomState>>,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    authorization_denied: Family<PolicyLabels, Counter>,
    upstream: UpstreamMetrics,
    listener_connections: Family<ListenerLabels, Gauge>,
    listener_overflows: Family<ListenerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection",
            received.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Histograms::new_with_constructor(IstioBuckets);
        let request_bytes = Histograms::new_with_constructor(IstioBuckets);
        let response_bytes = Histograms::new_with_constructor(IstioBuckets);
        registry.register("istio_requests", "Total requests", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Duration of requests, from the first request byte to the last response byte",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Size of request bodies",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Size of response bodies",
            response_bytes.clone(),
        );
        let authorization_denied = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "trellis_authorization_denied",
            "Connections and requests denied by an AuthorizationPolicy",
            authorization_denied.clone(),
        );
        let upstream = UpstreamMetrics::register(&mut registry);
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "trellis_listener_connections",
            "Downstream connections a listener holds open",
            listener_connections.clone(),
        );
        let listener_overflows = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "trellis_listener_overflow",
            "Connections closed on accept because the listener held its connection limit",
            listener_overflows.clone(),
        );
        Self {
            listener_connections,
            listener_overflows,
            registry,
            by_labels: RwLock::default(),
            upstream,
            opened,
            closed,
            sent,
            received,
            authorization_denied,
            requests,
            duration,
            request_bytes,
            response_bytes,
        }
    }

    /// The per-cluster metrics, for `crate::upstream`.
    pub fn upstream(&self) -> UpstreamMetrics {
        self.upstream.clone()
    }

    /// The open-connection gauge and the overflow counter of the listener `name`.
    pub fn listener(&self, name: &'static str) -> ListenerMetrics {
        let labels = ListenerLabels { listener: name };
        ListenerMetrics {
            open: self.listener_connections.get_or_create(&labels).clone(),
            overflows: self.listener_overflows.get_or_create(&labels).clone(),
        }
    }

    /// Counts a connection or request denied by `policy`.
    pub fn count_denied(&self, policy: &str) {
        self.authorization_denied
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Counts one finished HTTP request.
    pub fn record_request(&self, sample: &RequestSample) {
        let observe = |metrics: &RequestMetrics| {
            metrics.count.inc();
            metrics.duration.observe(sample.duration_ms);
            metrics.request_bytes.observe(sample.request_bytes as f64);
            metrics.response_bytes.observe(sample.response_bytes as f64);
        };
        let labels = &sample.labels;
        if let Some(metrics) = self.by_labels.read().get(labels) {
            return observe(metrics);
        }
        // A new label set: its metrics from the families (the same counters they encode).
        let metrics = RequestMetrics {
            count: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        };
        observe(&metrics);
        self.by_labels
            .write()
            .entry(labels.clone())
            .or_insert(metrics);
    }

    /// Counts a connection as opened; it is counted as closed when the guard drops.
    pub fn open_connection(&self, labels: TcpLabels) -> ConnectionMetrics {
        self.opened.get_or_create(&labels).inc();
        ConnectionMetrics {
            bytes: ByteCounters {
                received: self.received.get_or_create(&labels).clone(),
                sent: self.sent.get_or_create(&labels).clone(),
            },
            closed: self.closed.get_or_create(&labels).clone(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One of the proxy's listeners: `outbound`, `inbound`, `admin`, `metrics`, `readiness`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// A listener's connection metrics: `trellis_listener_connections` (open now) and
/// `trellis_listener_overflow_total` (closed on accept at the limit).
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub open: Gauge,
    pub overflows: Counter,
}

/// A cluster (`outbound|port|subset|host`, as Istio names Envoy clusters).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

/// A cluster and the `connectionPool` limit that overflowed (Envoy's circuit-breaker name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub cluster: String,
    pub limit: String,
}

/// Outlier detection and circuit breaking, per cluster: `trellis_outlier_ejections_total`,
/// `trellis_outlier_ejections_active`, `trellis_upstream_overflow_total`.
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    ejections: Family<ClusterLabels, Counter>,
    ejected: Family<ClusterLabels, Gauge>,
    overflows: Family<OverflowLabels, Counter>,
}

impl UpstreamMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "trellis_outlier_ejections",
            "Endpoints ejected by outlier detection",
            metrics.ejections.clone(),
        );
        registry.register(
            "trellis_outlier_ejections_active",
            "Endpoints currently ejected by outlier detection",
            metrics.ejected.clone(),
        );
        registry.register(
            "trellis_upstream_overflow",
            "Requests and connections refused by a cluster's connection-pool limits",
            metrics.overflows.clone(),
        );
        metrics
    }

    pub fn count_ejection(&self, cluster: &str) {
        self.ejections
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    pub fn set_ejected(&self, cluster: &str, ejected: usize) {
        self.ejected
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .set(i64::try_from(ejected).unwrap_or(i64::MAX));
    }

    pub fn count_overflow(&self, cluster: &str, limit: &str) {
        self.overflows
            .get_or_create(&OverflowLabels {
                cluster: cluster.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }
}

/// The counters of one open connection.
pub struct ConnectionMetrics {
    pub bytes: ByteCounters,
    closed: Counter,
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_from_the_wire_are_bounded_to_grpc_codes() {
        for (wire, label) in [
            ("0", "0"),
            ("14", "14"),
            ("16", "16"),
            ("17", "2"),
            ("014", "2"),
            ("+1", "2"),
            ("-1", "2"),
            ("", "2"),
            ("unavailable", "2"),
            ("4294967296", "2"),
        ] {
            assert_eq!(&*grpc_status(wire), label, "{wire:?}");
        }
    }

    #[test]
    fn encodes_istio_names_and_labels() {
        let metrics = Metrics::new();
        let labels = TcpLabels::unknown("source")
            .with_service("reviews.default.svc.cluster.local", "default");
        {
            let connection = metrics.open_connection(labels);
            connection.bytes.received.inc_by(10);
            connection.bytes.sent.inc_by(20);
            let text = metrics.encode();
            assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\""));
            assert!(
                text.lines()
                    .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                        && l.ends_with(" 0"))
            );
        }
        let text = metrics.encode();
        assert!(text.contains("destination_service_name=\"reviews\""));
        assert!(text.contains("request_protocol=\"tcp\""));
        assert!(text.contains("response_flags=\"-\"} 1"));
        assert!(text.contains("istio_tcp_received_bytes_total{"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 20"))
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 1"))
        );
    }

    #[test]
    fn request_metrics_carry_istio_labels_and_buckets() {
        let metrics = Metrics::new();
        let mut connection = TcpLabels::unknown("destination")
            .with_service("reviews.default.svc.cluster.local", "default");
        connection.request_protocol = "grpc".into();
        let sample = RequestSample {
            labels: RequestLabels {
                connection,
                response_code: 200,
                grpc_response_status: "5".into(),
            },
            duration_ms: 7.0,
            request_bytes: 3,
            response_bytes: 2_000,
        };
        metrics.record_request(&sample);
        metrics.record_request(&sample);
        let text = metrics.encode();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
                .to_owned()
        };
        let total = line("istio_requests_total{");
        assert!(total.ends_with("} 2"), "{total}");
        for label in [
            "reporter=\"destination\"",
            "request_protocol=\"grpc\"",
            "response_code=\"200\"",
            "grpc_response_status=\"5\"",
            "response_flags=\"-\"",
            "destination_service_name=\"reviews\"",
        ] {
            assert!(total.contains(label), "{label} missing from {total}");
        }
        let bucket = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("istio_request_duration_milliseconds_bucket{")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in {text}"))
                .to_owned()
        };
        // 7 ms falls in the 10 ms bucket, not the 5 ms one.
        assert!(bucket("5.0").ends_with(" 0"), "{}", bucket("5.0"));
        assert!(bucket("10.0").ends_with(" 2"), "{}", bucket("10.0"));
        assert!(line("istio_response_bytes_sum{").ends_with(" 4000.0"));
        assert!(line("istio_request_bytes_count{").ends_with(" 2"));

        metrics.count_denied("shop.deny-admin");
        let text = metrics.encode();
        assert!(
            text.contains("trellis_authorization_denied_total{policy=\"shop.deny-admin\"} 1"),
            "{text}"
        );
    }
}
