//! Readiness: the proxy is ready once its listeners are bound and, in control-plane mode, it
//! holds a certificate and a first config; it is not ready while draining.

use std::sync::atomic::Ordering;

use http::StatusCode;

use crate::http_server::{Body, text};
use crate::state::ProxyState;

pub fn is_ready(state: &ProxyState) -> bool {
    let bound = state.listeners_bound.load(Ordering::Acquire);
    let inputs = !state.control_plane_mode
        || (state.current_identity().is_some() && state.config.load().is_some());
    bound && inputs && !state.drain.is_draining()
}

/// Answer of `/healthz/ready` and the admin `/ready`.
pub fn response(state: &ProxyState) -> http::Response<Body> {
    if is_ready(state) {
        text(StatusCode::OK, "ready\n")
    } else if state.drain.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
