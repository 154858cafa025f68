//! One [`Record`] per HTTP request, from its arrival to the end of its response body: Istio's
//! request metrics with the standard labels, and one JSON access-log line on stdout (switched
//! by `--access-log`). The record is emitted when it drops, whichever way the request ended.

pub mod body;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::CONTENT_TYPE;
use http::{Request, Response, Version};
use serde_json::json;
use tracing::warn;

use super::Body;
use super::pool::SendError;
use super::reply::Reason;
use crate::metrics::{self, RequestLabels, RequestSample, TcpLabels, values};
use crate::state::ProxyState;
use body::Observed;

pub const GRPC_STATUS: &str = "grpc-status";

pub struct Record {
    state: Arc<ProxyState>,
    /// The connection's labels; `request_protocol` is set from the request.
    pub labels: TcpLabels,
    started: Instant,
    start_time: SystemTime,
    method: String,
    path: String,
    authority: String,
    version: Version,
    downstream: SocketAddr,
    pub request_id: String,
    request_bytes: Arc<AtomicU64>,
    pub response_bytes: u64,
    pub status: u16,
    pub flags: &'static str,
    pub reason: Option<&'static str>,
    pub grpc_status: Option<String>,
    pub upstream: Option<SocketAddr>,
}

impl Record {
    pub fn start<B>(
        state: Arc<ProxyState>,
        mut labels: TcpLabels,
        req: &Request<B>,
        downstream: SocketAddr,
    ) -> Self {
        labels.request_protocol = if is_grpc(req) {
            values::grpc()
        } else {
            values::http()
        };
        Self {
            state,
            labels,
            started: Instant::now(),
            start_time: SystemTime::now(),
            method: req.method().as_str().to_owned(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            authority: super::headers::authority(req).unwrap_or_default(),
            version: req.version(),
            downstream,
            request_id: String::new(),
            request_bytes: Arc::default(),
            response_bytes: 0,
            status: 0,
            flags: "-",
            reason: None,
            grpc_status: None,
            upstream: None,
        }
    }

    /// Where the request body's bytes are counted.
    pub fn request_bytes(&self) -> Arc<AtomicU64> {
        self.request_bytes.clone()
    }

    /// Answers with the proxy's own response for `reason`.
    pub fn reply(mut self, reason: Reason) -> Response<Observed> {
        self.flags = reason.flag();
        self.reason = Some(reason.code());
        self.respond(reason.response())
    }

    /// Answers for a request the upstream never answered, logging why.
    pub fn fail(self, error: &SendError) -> Response<Observed> {
        let reason = Reason::of(error);
        warn!(
            reporter = %self.labels.reporter, upstream = ?self.upstream, %error,
            reason = reason.code(), "request failed"
        );
        self.reply(reason)
    }

    /// Answers with `response` (the upstream's, or the proxy's own), streaming its body.
    pub fn respond(mut self, response: Response<Body>) -> Response<Observed> {
        self.status = response.status().as_u16();
        // A trailers-only gRPC response carries its status in the headers.
        if let Some(status) = response
            .headers()
            .get(GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
        {
            self.grpc_status = Some(status.to_owned());
        }
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, Observed::new(body, self))
    }

    fn sample(&self) -> RequestSample {
        RequestSample {
            labels: RequestLabels {
                connection: TcpLabels {
                    response_flags: match self.flags {
                        "-" => values::no_flags(),
                        flags => flags.into(),
                    },
                    ..self.labels.clone()
                },
                response_code: self.status,
                grpc_response_status: self
                    .grpc_status
                    .as_deref()
                    .map_or_else(values::empty, metrics::grpc_status),
            },
            duration_ms: self.started.elapsed().as_secs_f64() * 1_000.0,
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes: self.response_bytes,
        }
    }

    fn access_log_line(&self, sample: &RequestSample) -> serde_json::Value {
        let start_ms = self
            .start_time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        json!({
            "type": "access",
            "start_time_unix_ms": start_ms,
            "reporter": &*self.labels.reporter,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "protocol": format!("{:?}", self.version),
            "response_code": self.status,
            "response_flags": self.flags,
            "reason": self.reason,
            "grpc_status": self.grpc_status,
            "duration_ms": (sample.duration_ms * 1_000.0).round() / 1_000.0,
            "bytes_received": sample.request_bytes,
            "bytes_sent": sample.response_bytes,
            "upstream_host": self.upstream.map(|a| a.to_string()),
            "downstream_peer": self.downstream.to_string(),
            "request_id": self.request_id,
            "source_principal": &*self.labels.source_principal,
            "destination_service": &*self.labels.destination_service,
            "connection_security_policy": &*self.labels.connection_security_policy,
        })
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.status == 0 {
            // Dropped before any response: the downstream went away while it waited.
            self.flags = crate::metrics::flags::DOWNSTREAM_CONNECTION_TERMINATION;
        }
        let sample = self.sample();
        self.state.metrics.record_request(&sample);
        if self.state.access_log {
            let line = self.access_log_line(&sample);
            // A closed stdout must not take the proxy down.
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
