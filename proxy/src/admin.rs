//! The admin endpoint (127.0.0.1 only): `/ready`, `/config_dump`, `/quitquitquit`, `/logging`.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::http_server::{Body, query_param, respond, text};
use crate::readiness;
use crate::state::ProxyState;

pub async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => readiness::response(&state),
        (&Method::GET, "/config_dump") => config_dump(&state),
        (&Method::POST, "/quitquitquit") => {
            state.drain.start("admin /quitquitquit");
            text(StatusCode::OK, "OK\n")
        }
        (&Method::GET | &Method::POST, "/logging") => logging(&state, &req),
        (_, "/ready" | "/config_dump" | "/quitquitquit" | "/logging") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn config_dump(state: &ProxyState) -> Response<Body> {
    let config = state.config.load_full();
    let certificate = state.current_identity().map(|identity| identity.summary());
    let dump = json!({
        "workload": {
            "podName": state.workload.pod_name,
            "namespace": state.workload.namespace,
            "serviceAccount": state.workload.service_account,
            "spiffeId": state.workload.spiffe_id().to_string(),
        },
        "config": config.as_deref(),
        "certificate": certificate,
    });
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn logging(state: &ProxyState, req: &Request<Incoming>) -> Response<Body> {
    match query_param(req, "level") {
        None => text(StatusCode::OK, format!("{}\n", state.log.current())),
        Some(level) => match state.log.set(level) {
            Ok(()) => {
                tracing::info!(level, "log level changed");
                text(StatusCode::OK, format!("{}\n", state.log.current()))
            }
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!("invalid level {level:?}: {e}\n"),
            ),
        },
    }
}
