//! The demo external authorizer (`ext-authz`), for AuthorizationPolicy action CUSTOM: Envoy's
//! ext_authz HTTP protocol and its gRPC service (`envoy.service.auth.v3.Authorization/Check`,
//! on the official protocol definitions of `envoy-types`). Both decide alike, by the checked
//! request's [`DECISION_HEADER`], as Istio's sample authorizer does:
//!
//! * `allow`: allowed, telling the proxy to add [`RESULT_HEADER`]`: allowed` and
//!   [`CHECKED_PATH_HEADER`] (the path it was asked about) to the request;
//! * `slow`: the same after [`SLOW`] (for proxy timeouts);
//! * `fail`: the check fails (HTTP 500, gRPC `INTERNAL`);
//! * anything else, or no header: denied with 403, [`RESULT_HEADER`]`: denied`, the checked
//!   path and the body `denied by ext-authz (<protocol>)`.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderValue as EnvoyHeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::body::{BoxBody, empty, full};

/// The checked request's header the decision follows.
pub const DECISION_HEADER: &str = "x-ext-authz";
/// `allowed` or `denied`, on the request (allowed) or the client's response (denied).
pub const RESULT_HEADER: &str = "x-ext-authz-check-result";
/// The path the authorizer was asked about (for the HTTP protocol, with the proxy's prefix).
pub const CHECKED_PATH_HEADER: &str = "x-ext-authz-checked-path";
/// How long a `slow` check takes.
pub const SLOW: Duration = Duration::from_secs(3);

/// gRPC's `PERMISSION_DENIED` and `INTERNAL`.
const PERMISSION_DENIED: i32 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allow,
    Deny,
    Fail,
}

async fn decide(value: Option<&str>) -> Decision {
    match value {
        Some("allow") => Decision::Allow,
        Some("slow") => {
            tokio::time::sleep(SLOW).await;
            Decision::Allow
        }
        Some("fail") => Decision::Fail,
        _ => Decision::Deny,
    }
}

/// Serves the HTTP protocol on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let builder = builder.clone();
        tokio::spawn(async move {
            let service =
                service_fn(|req| async move { Ok::<_, hyper::Error>(http_check(req).await) });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn http_check(req: Request<Incoming>) -> Response<BoxBody> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let value = req
        .headers()
        .get(DECISION_HEADER)
        .and_then(|v| v.to_str().ok());
    let decision = decide(value).await;
    crate::print_json(&serde_json::json!({
        "protocol": "http", "method": req.method().as_str(), "path": path,
        "decision": format!("{decision:?}"),
    }));
    let builder = Response::builder().header(CHECKED_PATH_HEADER, &path);
    let response = match decision {
        Decision::Allow => builder
            .status(StatusCode::OK)
            .header(RESULT_HEADER, "allowed")
            .body(empty()),
        Decision::Deny => builder
            .status(StatusCode::FORBIDDEN)
            .header(RESULT_HEADER, "denied")
            .body(full("denied by ext-authz (http)\n".to_owned())),
        Decision::Fail => builder
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(empty()),
    };
    response.expect("static response parts are valid")
}

/// Serves the gRPC protocol (HTTP/2 with prior knowledge) on `listener` until the task is
/// dropped.
pub async fn serve_grpc(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(AuthorizationServer::new(GrpcAuthorizer));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct GrpcAuthorizer;

#[tonic::async_trait]
impl Authorization for GrpcAuthorizer {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let http = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .unwrap_or_default();
        let decision = decide(http.headers.get(DECISION_HEADER).map(String::as_str)).await;
        let source = "grpc";
        crate::print_json(&serde_json::json!({
            "protocol": source, "method": http.method, "path": http.path,
            "decision": format!("{decision:?}"),
        }));
        let header = |key: &str, value: &str| HeaderValueOption {
            header: Some(EnvoyHeaderValue {
                key: key.to_owned(),
                value: value.to_owned(),
                ..EnvoyHeaderValue::default()
            }),
            ..HeaderValueOption::default()
        };
        let response = match decision {
            Decision::Fail => return Err(tonic::Status::internal("asked to fail")),
            Decision::Allow => CheckResponse {
                status: Some(RpcStatus::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![
                        header(RESULT_HEADER, "allowed"),
                        header(CHECKED_PATH_HEADER, &http.path),
                    ],
                    ..OkHttpResponse::default()
                })),
                ..CheckResponse::default()
            },
            Decision::Deny => CheckResponse {
                status: Some(RpcStatus {
                    code: PERMISSION_DENIED,
                    ..RpcStatus::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(StatusCode::FORBIDDEN.as_u16()),
                    }),
                    headers: vec![
                        header(RESULT_HEADER, "denied"),
                        header(CHECKED_PATH_HEADER, &http.path),
                    ],
                    body: "denied by ext-authz (grpc)\n".to_owned(),
                })),
                ..CheckResponse::default()
            },
        };
        Ok(tonic::Response::new(response))
    }
}

/// Binds both protocols' listeners (`0` picks a free port) and serves them; returns the bound
/// addresses once listening.
pub async fn spawn(
    http: SocketAddr,
    grpc: SocketAddr,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let http = TcpListener::bind(http).await?;
    let grpc = TcpListener::bind(grpc).await?;
    let addresses = (http.local_addr()?, grpc.local_addr()?);
    tokio::spawn(serve_http(http));
    tokio::spawn(serve_grpc(grpc));
    Ok(addresses)
}
