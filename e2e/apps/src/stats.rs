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

/// The JSON summary printed by `demo-client`. One "request" is one unit of
/// the client's mode: an HTTP request, a gRPC call, a WebSocket connection
/// or an upload. Mode-specific fields are left out where they do not apply.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The client mode (`http`, `grpc-unary`, `grpc-stream`, `websocket`,
    /// `upload`).
    pub mode: String,
    /// Requests started.
    pub sent: u64,
    /// Requests that succeeded by the mode's measure (HTTP: answered 2xx;
    /// gRPC: `grpc-status` 0 and every message back; WebSocket: upgraded
    /// and every message echoed; upload: the echo matched).
    pub ok: u64,
    /// Requests that did not succeed (other statuses and errors).
    pub failed: u64,
    /// Requests not started because `max-in-flight` were outstanding.
    pub dropped: u64,
    /// Answers by HTTP status code (101 for an upgraded WebSocket).
    pub by_status: BTreeMap<String, u64>,
    /// Failures by kind: no answer (`connect`, `timeout`, `reset`, …) or an
    /// answer that failed the mode's check (`incomplete`, `mismatch`, …).
    pub errors: BTreeMap<String, u64>,
    /// gRPC calls by the `grpc-status` they ended with (gRPC modes).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_grpc_status: BTreeMap<String, u64>,
    /// Messages that came back intact (gRPC and WebSocket modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Bytes echoed back intact (upload mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `bytes` over the run's wall time, in MB (10^6 bytes) per second
    /// (upload mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mb_per_sec: Option<f64>,
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
    fn mode_fields_only_when_set() {
        let http = serde_json::to_value(Summary {
            mode: "http".into(),
            ..Summary::default()
        })
        .unwrap();
        for absent in ["byGrpcStatus", "messages", "bytes", "mbPerSec"] {
            assert!(http.get(absent).is_none(), "{absent} in {http}");
        }
        assert_eq!(http["mode"], "http");
        assert!(http["latencyMs"]["p50"].is_number());
        let upload = serde_json::to_value(Summary {
            bytes: Some(10),
            mb_per_sec: Some(1.5),
            messages: Some(0),
            by_grpc_status: BTreeMap::from([("0".to_string(), 2)]),
            ..Summary::default()
        })
        .unwrap();
        assert_eq!(upload["bytes"], 10);
        assert_eq!(upload["mbPerSec"], 1.5);
        assert_eq!(upload["messages"], 0);
        assert_eq!(upload["byGrpcStatus"]["0"], 2);
    }

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
