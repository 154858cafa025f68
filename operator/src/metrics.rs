//! Operator metrics (Prometheus text on `/metrics`) and the health endpoints `/healthz` and
//! `/readyz` on the plain-HTTP health port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    pub certificates_signed: Family<OutcomeLabels, Counter>,
    pub injections: Family<OutcomeLabels, Counter>,
    pub cni_repairs: Family<OutcomeLabels, Counter>,
    /// Config stream requests: `accepted`, or why one was refused
    /// (`crate::stream_access::Refusal::metric_label`).
    pub config_streams: Family<OutcomeLabels, Counter>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let certificates_signed = Family::<OutcomeLabels, Counter>::default();
        let injections = Family::<OutcomeLabels, Counter>::default();
        let cni_repairs = Family::<OutcomeLabels, Counter>::default();
        let config_streams = Family::<OutcomeLabels, Counter>::default();
        registry.register("reconciles", "Mesh reconciliations", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed Mesh reconciliations",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of Mesh reconciliations",
            reconcile_duration.clone(),
        );
        registry.register(
            "certificates",
            "Workload certificate requests",
            certificates_signed.clone(),
        );
        registry.register(
            "injections",
            "Sidecar injection decisions",
            injections.clone(),
        );
        registry.register(
            "cni_repairs",
            "Pods deleted by the CNI repair loop because they started without capture",
            cni_repairs.clone(),
        );
        registry.register(
            "config_streams",
            "Config stream requests: accepted, or why refused",
            config_streams.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            certificates_signed,
            injections,
            cni_repairs,
            config_streams,
            ready: AtomicBool::new(false),
        }
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.reconcile_duration,
        }
    }

    pub fn reconcile_failure(&self, error: &Error) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric reaches `/metrics`. The destructuring names every field, so a metric added to
    /// [`Metrics`] stops this test compiling until it records and checks a sample of it too.
    #[test]
    fn every_metric_is_exported() {
        let metrics = Metrics::default();
        let Metrics {
            registry: _,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            certificates_signed,
            injections,
            cni_repairs,
            config_streams,
            ready: _,
        } = &metrics;
        let outcome = OutcomeLabels { outcome: "tested" };
        reconciles.inc();
        reconcile_errors
            .get_or_create(&ErrorLabels { error: "tested" })
            .inc();
        reconcile_duration.observe(0.2);
        certificates_signed.get_or_create(&outcome).inc();
        injections.get_or_create(&outcome).inc();
        cni_repairs.get_or_create(&outcome).inc();
        config_streams.get_or_create(&outcome).inc();
        let text = metrics.encode();
        for sample in [
            "trellis_operator_reconciles_total 1",
            r#"trellis_operator_reconcile_errors_total{error="tested"} 1"#,
            "trellis_operator_reconcile_duration_seconds_count 1",
            r#"trellis_operator_certificates_total{outcome="tested"} 1"#,
            r#"trellis_operator_injections_total{outcome="tested"} 1"#,
            r#"trellis_operator_cni_repairs_total{outcome="tested"} 1"#,
            r#"trellis_operator_config_streams_total{outcome="tested"} 1"#,
        ] {
            assert!(
                text.lines().any(|line| line == sample),
                "{sample:?} missing from /metrics:\n{text}"
            );
        }
    }
}
