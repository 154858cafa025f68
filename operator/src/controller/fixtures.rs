//! A mocked API server for the reconcile tests (and other code that reads the cluster), in the
//! shape of kube-rs controller-rs's `fixtures.rs`: [`context`] builds a [`Context`] (and
//! [`client`] a bare client) that talks to a `tower-test` mock, and [`ApiServer`] takes each
//! request the code under test makes, checks its method and path, and lets the scenario check the
//! body and answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use crate::context::Context;

/// The operator's namespace in every scenario.
pub const NAMESPACE: &str = "trellis-system";

/// A client of a mocked API server, and that server.
pub fn client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer(handle))
}

/// A [`Context`] on a mocked API server, and that server.
pub fn context() -> (Arc<Context>, ApiServer) {
    let (client, api) = client();
    let (ctx, _mesh_state) = Context::new(
        client,
        NAMESPACE.to_owned(),
        "trellis-operator-0".to_owned(),
        Arc::default(),
        Arc::default(),
    );
    (ctx, api)
}

/// Runs the reconcile and the scenario that answers its requests side by side, and returns what
/// both returned. Bounded: a side waiting for the other forever fails instead of hanging.
pub async fn run<R: Future, S: Future>(reconcile: R, scenario: S) -> (R::Output, S::Output) {
    let both = async { tokio::join!(reconcile, scenario) };
    tokio::time::timeout(Duration::from_secs(30), both)
        .await
        .expect("the reconcile or its scenario got stuck")
}

pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the reconcile made, waiting for its answer.
pub struct Exchange {
    pub query: String,
    /// The JSON body (`Null` when there is none).
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Exchange {
        let (request, send) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, the reconcile sent nothing"));
        assert_eq!(
            (request.method(), request.uri().path()),
            (&method, path),
            "unexpected request {}",
            request.uri()
        );
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Exchange { query, body, send }
    }

    /// Asserts that the reconcile made no other request: the mock sees its client dropped.
    pub async fn done(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

impl Exchange {
    pub fn respond(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.send.send_response(response);
    }

    /// Answers with the request's own body, as the API server does for a create or an apply of
    /// an object it did not change further.
    pub fn echo(self) {
        let body = self.body.clone();
        self.respond(StatusCode::OK, &body);
    }

    pub fn not_found(self) {
        self.respond(
            StatusCode::NOT_FOUND,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404,
            }),
        );
    }

    /// Asserts that this is a server-side apply as the operator's field manager, forced: without
    /// `force` the API server refuses to take over a field another manager set (a drifted
    /// caBundle, say) with a conflict.
    pub fn assert_forced_apply(&self) {
        let pairs: Vec<&str> = self.query.split('&').collect();
        for pair in ["fieldManager=trellis-operator", "force=true"] {
            assert!(pairs.contains(&pair), "not a forced apply: {}", self.query);
        }
    }
}
