//! Summary statistics for the demo client.

use std::collections::BTreeMap;

use serde::Serialize;

/// Nearest-rank percentile `p` (0..=100) of an ascending slice; 0 if empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Latency {
    /// Percentiles of `samples` (milliseconds, any order), rounded to µs.
    pub fn from_samples(samples: &mut [f64]) -> Latency {
        samples.sort_by(f64::total_cmp);
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        Latency {
            p50: round(percentile(samples, 50.0)),
            p90: round(percentile(samples, 90.0)),
            p99: round(percentile(samples, 99.0)),
            max: round(samples.last().copied().unwrap_or(0.0)),
        }
    }
}

/// The JSON summary printed by `demo-client`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Requests started.
    pub sent: u64,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests not answered 2xx (other statuses and errors).
    pub failed: u64,
    /// Requests not started because `max-in-flight` were outstanding.
    pub dropped: u64,
    /// Answers by status code.
    pub by_status: BTreeMap<String, u64>,
    /// Failures without an answer, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Answers by the server's reported `version`.
    pub by_version: BTreeMap<String, u64>,
    /// Answers by the server's reported `name`.
    pub by_name: BTreeMap<String, u64>,
    /// Latency of answered requests (until the body was read).
    pub latency_ms: Latency,
    /// Wall time of the run.
    pub duration_secs: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        let l = Latency::from_samples(&mut v);
        assert_eq!(l.p50, 50.0);
        assert_eq!(l.p90, 90.0);
        assert_eq!(l.p99, 99.0);
        assert_eq!(l.max, 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0], 0.0), 1.0);
    }
}
