//! A minimal HTTP/1.1 server for the proxy's own endpoints (admin, metrics, readiness), under
//! the same listener limits as the capture listeners ([`crate::limits`]), with its own
//! connection cap (`maxEndpointConnections`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::limits::{self, ConnectionCap, Protocols};
use crate::state::ProxyState;

pub type Body = Full<Bytes>;

/// Serves `handler` on `listener` until the process exits; `name` labels the listener's
/// metrics.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    state: Arc<ProxyState>,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let connections = ConnectionCap::new(state.metrics.listener(name));
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(server = name, error = %e, "accept failed");
                continue;
            }
        };
        let config = state.current_config();
        let Some(open) = connections.admit(config.limits.max_endpoint_connections) else {
            tracing::debug!(server = name, %peer, "connection limit reached, closing");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let served = limits::serve_http(
                &config.limits,
                Protocols::Http1,
                stream,
                service,
                std::future::pending(),
            );
            if let Err(e) = served.await {
                tracing::debug!(server = name, %peer, error = %e, "http connection error");
            }
            drop(open);
        });
    }
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// The value of `name` in a request's query string.
pub fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}
