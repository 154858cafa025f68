//! Istio-standard TCP metrics (`istio_tcp_*`) in the Prometheus/OpenMetrics text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::forward::ByteCounters;

pub const UNKNOWN: &str = "unknown";

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
}

/// `connection_security_policy` values.
pub const MUTUAL_TLS: &str = "mutual_tls";
pub const PLAINTEXT: &str = "none";

/// Istio's standard TCP labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_principal: String,
    pub request_protocol: String,
    pub connection_security_policy: String,
    pub response_flags: String,
}

impl TcpLabels {
    /// Labels with every peer field `unknown`, for `reporter` (`source` or `destination`).
    pub fn unknown(reporter: &str) -> Self {
        Self {
            reporter: reporter.to_owned(),
            source_workload: UNKNOWN.into(),
            source_workload_namespace: UNKNOWN.into(),
            source_principal: UNKNOWN.into(),
            destination_workload: UNKNOWN.into(),
            destination_workload_namespace: UNKNOWN.into(),
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            destination_principal: UNKNOWN.into(),
            request_protocol: "tcp".into(),
            connection_security_policy: UNKNOWN.into(),
            response_flags: "-".into(),
        }
    }

    /// Fills the `destination_service*` labels from a service's first hostname and namespace.
    pub fn with_service(mut self, hostname: &str, namespace: &str) -> Self {
        self.destination_service = hostname.to_owned();
        self.destination_service_name = hostname.split('.').next().unwrap_or(hostname).to_owned();
        self.destination_service_namespace = namespace.to_owned();
        self
    }
}

pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
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
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
        }
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
}
