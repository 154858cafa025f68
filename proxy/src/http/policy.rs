//! The HTTP pieces of a VirtualService route that shape requests and responses, as pure
//! functions over headers: header edits, CORS, the responses the proxy makes for a fault abort, a
//! redirect, a direct response or a CORS preflight, a mirror's authority, how a try ended (for
//! retries) and response-flag lists (`DI,FI`). [`crate::outbound::http`] does the I/O around them.

use parking_lot::Mutex;
use std::collections::BTreeSet;

use base64::Engine;
use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, HeaderName, HeaderValue, LOCATION, ORIGIN,
};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use trellis_config::traffic::{AbortStatus, CorsPolicy, DirectBody, DirectResponse, HeaderEdits};

use super::Body;
use super::headers::X_TRELLIS_REASON;
use super::pool::SendError;
use super::telemetry::GRPC_STATUS;
use crate::host::Authority;
use crate::route::retry::Outcome;

/// Envoy's body for a fault-injected abort.
const FAULT_ABORT_MESSAGE: &str = "fault filter abort";

/// Applies one set of edits: removals first, then `set` (replace), then `add` (append), as
/// Envoy's header parser orders them. Names or values that are not valid HTTP are skipped (the
/// compile checks them; a hand-written static config may not).
pub fn apply_edits(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &edits.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &edits.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// A mirror's authority: `-shadow` appended to the host, before any port (Envoy's
/// `shadow_policy` does the same, so the mirror's server can tell copies from originals).
pub fn shadow_authority(authority: &str) -> String {
    let authority = Authority::parse(authority);
    match authority.port() {
        Some(port) => format!("{}-shadow:{port}", authority.host()),
        None => format!("{}-shadow", authority.host()),
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The request's `Origin` when the policy allows it.
pub fn allowed_origin<'h>(cors: &CorsPolicy, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
    let origin = headers.get(ORIGIN)?;
    cors.allows_origin(origin.to_str().ok()?).then_some(origin)
}

/// The proxy's answer to a preflight whose origin is allowed (Envoy's CORS filter answers these
/// itself; a preflight from another origin goes to the application unchanged).
pub fn preflight_response(cors: &CorsPolicy, origin: &HeaderValue) -> Response<Body> {
    let mut response = proxy_response(StatusCode::OK, "cors_preflight", Bytes::new());
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    let lists = [
        (ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods),
        (ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers),
    ];
    for (name, list) in lists {
        insert_list(headers, name, list);
    }
    if let Some(max_age) = cors.max_age_ms {
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(max_age / 1_000));
    }
    if cors.allow_credentials == Some(true) {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// The CORS headers of an actual (non-preflight) response to an allowed origin.
pub fn add_cors_headers(cors: &CorsPolicy, origin: &HeaderValue, headers: &mut HeaderMap) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    insert_list(headers, ACCESS_CONTROL_EXPOSE_HEADERS, &cors.expose_headers);
    if cors.allow_credentials == Some(true) {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

fn insert_list(headers: &mut HeaderMap, name: HeaderName, list: &[String]) {
    if list.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(&list.join(",")) {
        headers.insert(name, value);
    }
}

/// The `x-trellis-reason` values of the responses made here, for the telemetry record.
const ROUTE_REASONS: [&str; 4] = [
    "fault_abort",
    "direct_response",
    "redirect",
    "cors_preflight",
];

/// The `&'static` form of a reason this module put on a response.
pub fn route_reason(value: &[u8]) -> Option<&'static str> {
    ROUTE_REASONS
        .into_iter()
        .find(|reason| reason.as_bytes() == value)
}

/// A response the proxy makes for a route, with its `x-trellis-reason`.
fn proxy_response(status: StatusCode, reason: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(X_TRELLIS_REASON, HeaderValue::from_static(reason));
    response
}

/// A fault-injected abort: the HTTP status with Envoy's one-line body, or a trailers-only gRPC
/// response (HTTP 200, `grpc-status` in the headers).
pub fn abort_response(status: AbortStatus) -> Response<Body> {
    match status {
        AbortStatus::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = proxy_response(
                status,
                "fault_abort",
                Bytes::from(format!("{FAULT_ABORT_MESSAGE}\n")),
            );
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        }
        AbortStatus::Grpc(code) => {
            let mut response = proxy_response(StatusCode::OK, "fault_abort", Bytes::new());
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(GRPC_STATUS, HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static(FAULT_ABORT_MESSAGE),
            );
            response
        }
    }
}

/// A route's `directResponse` (a `bytes` body is base64, as Istio's API carries it).
pub fn direct_response(direct: &DirectResponse) -> Response<Body> {
    let status = StatusCode::from_u16(direct.status).unwrap_or(StatusCode::OK);
    let body = match &direct.body {
        None => Bytes::new(),
        Some(DirectBody::String(text)) => Bytes::from(text.clone()),
        Some(DirectBody::Bytes(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map(Bytes::from)
            .unwrap_or_default(),
    };
    let text = matches!(direct.body, Some(DirectBody::String(_)));
    let mut response = proxy_response(status, "direct_response", body);
    if text {
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

/// A route's `redirect` to `location`.
pub fn redirect_response(code: u16, location: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut response = proxy_response(status, "redirect", Bytes::new());
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// How a try that got response headers ended, for the retry decision: a non-zero
/// `grpc-status` in the headers (a trailers-only gRPC error) counts as that gRPC status.
pub fn response_outcome(status: StatusCode, headers: &HeaderMap) -> Outcome {
    let grpc = headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|code| *code != 0);
    match grpc {
        Some(code) => Outcome::GrpcStatus(code),
        None => Outcome::Status(status.as_u16()),
    }
}

/// How a try that got no response ended; `None` when it was never sent because a cluster
/// limit refused it (an overflow, `UO`, is answered at once and never retried, as Envoy does).
pub fn error_outcome(error: &SendError) -> Option<Outcome> {
    Some(match error {
        SendError::Connect(_) | SendError::Handshake(_) => Outcome::ConnectFailure,
        // hyper does not export h2's error type; its debug form names the reason code.
        SendError::Reset(e) if format!("{e:?}").contains("REFUSED_STREAM") => {
            Outcome::RefusedStream
        }
        SendError::Reset(_) => Outcome::Reset,
        SendError::Overflow(_) => return None,
    })
}

/// The order Envoy prints response flags in (`ResponseFlagUtils`), so lists read as Istio's
/// do: `UF,URX`, `DI,FI`, `UT,DI`.
const ENVOY_FLAG_ORDER: [&str; 17] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "DPE",
];

/// Envoy's response-flag list for several flags (`DI,FI`, `UF,URX`), as the `&'static str` the
/// telemetry record keeps: `-` dropped, duplicates removed, in Envoy's order (flags Envoy does
/// not list, such as `RBAC`, go last). Each distinct list is allocated once; there are only a
/// few, so the interned set stays small.
pub fn join_flags(flags: &[&'static str]) -> &'static str {
    static INTERNED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let rank = |flag: &str| {
        ENVOY_FLAG_ORDER
            .iter()
            .position(|f| *f == flag)
            .unwrap_or(ENVOY_FLAG_ORDER.len())
    };
    let mut present: Vec<&'static str> = flags.iter().copied().filter(|f| *f != "-").collect();
    present.sort_by_key(|f| rank(f));
    present.dedup();
    match present.as_slice() {
        [] => "-",
        [one] => one,
        many => {
            let joined = many.join(",");
            let mut interned = INTERNED.lock();
            if let Some(existing) = interned.get(joined.as_str()) {
                return existing;
            }
            let leaked: &'static str = Box::leak(joined.into_boxed_str());
            interned.insert(leaked);
            leaked
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use trellis_config::traffic::{Pattern, StringMatch};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn edits_remove_then_set_then_add() {
        let mut headers = HeaderMap::new();
        headers.insert("x-old", "1".parse().unwrap());
        headers.insert("x-keep", "k".parse().unwrap());
        headers.insert("x-set", "before".parse().unwrap());
        headers.append("x-set", "before-2".parse().unwrap());
        headers.insert("x-add", "a".parse().unwrap());
        let edits = HeaderEdits {
            set: map(&[("x-set", "after"), ("x-new", "n"), ("bad name", "v")]),
            add: map(&[("x-add", "b"), ("x-old", "again")]),
            remove: vec!["x-old".into(), "x-missing".into()],
        };
        apply_edits(&mut headers, &edits);
        let values = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(values("x-set"), ["after"]);
        assert_eq!(values("x-new"), ["n"]);
        assert_eq!(values("x-add"), ["a", "b"]);
        assert_eq!(values("x-old"), ["again"], "removed, then added");
        assert_eq!(values("x-keep"), ["k"]);
        assert_eq!(headers.len(), 6);
    }

    #[test]
    fn shadow_authorities_keep_their_port() {
        let cases = [
            ("web", "web-shadow"),
            (
                "web.shop.svc.cluster.local:8080",
                "web.shop.svc.cluster.local-shadow:8080",
            ),
            ("10.0.0.1:80", "10.0.0.1-shadow:80"),
            ("[::1]:80", "[::1]-shadow:80"),
            ("[::1]", "[::1]-shadow"),
        ];
        for (authority, expected) in cases {
            assert_eq!(shadow_authority(authority), expected, "{authority}");
        }
    }

    #[test]
    fn cors_preflights_and_actual_responses() {
        let cors = CorsPolicy {
            allow_origins: vec![
                StringMatch::Exact("https://shop.example".into()),
                StringMatch::Regex(Pattern::new(r"https://.*\.partner\.example")),
            ],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec!["x-trace".into()],
            max_age_ms: Some(86_400_000),
            allow_credentials: Some(true),
        };
        let request = |method: Method, origin: Option<&str>, ask: bool| {
            let mut headers = HeaderMap::new();
            if let Some(origin) = origin {
                headers.insert(ORIGIN, origin.parse().unwrap());
            }
            if ask {
                headers.insert(ACCESS_CONTROL_REQUEST_METHOD, "POST".parse().unwrap());
            }
            (method, headers)
        };
        let cases = [
            (
                request(Method::OPTIONS, Some("https://shop.example"), true),
                true,
                true,
            ),
            (
                request(Method::OPTIONS, Some("https://a.partner.example"), true),
                true,
                true,
            ),
            (
                request(Method::OPTIONS, Some("https://evil.example"), true),
                true,
                false,
            ),
            (
                request(Method::OPTIONS, Some("https://shop.example"), false),
                false,
                true,
            ),
            (
                request(Method::GET, Some("https://shop.example"), true),
                false,
                true,
            ),
            (request(Method::OPTIONS, None, true), false, false),
        ];
        for ((method, headers), preflight, allowed) in cases {
            assert_eq!(
                is_preflight(&method, &headers),
                preflight,
                "{method} {headers:?}"
            );
            assert_eq!(
                allowed_origin(&cors, &headers).is_some(),
                allowed,
                "{headers:?}"
            );
        }
        let origin = HeaderValue::from_static("https://shop.example");
        let answer = preflight_response(&cors, &origin);
        let h = answer.headers();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "x-token");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "86400");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[X_TRELLIS_REASON], "cors_preflight");
        let mut actual = HeaderMap::new();
        add_cors_headers(&cors, &origin, &mut actual);
        assert_eq!(actual[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert_eq!(actual[ACCESS_CONTROL_EXPOSE_HEADERS], "x-trace");
        assert!(!actual.contains_key(ACCESS_CONTROL_ALLOW_METHODS));
    }

    #[tokio::test]
    async fn proxy_made_route_responses() {
        let body = |r: Response<Body>| async move {
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
        };
        let abort = abort_response(AbortStatus::Http(418));
        assert_eq!(abort.status(), 418);
        assert_eq!(abort.headers()[X_TRELLIS_REASON], "fault_abort");
        assert_eq!(body(abort).await, "fault filter abort\n");
        let grpc = abort_response(AbortStatus::Grpc(14));
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()[GRPC_STATUS], "14");
        assert_eq!(grpc.headers()[CONTENT_TYPE], "application/grpc");
        let cases = [
            (DirectBody::String("teapot".into()), "teapot"),
            (DirectBody::Bytes("aGVsbG8=".into()), "hello"),
        ];
        for (direct_body, expected) in cases {
            let direct = direct_response(&DirectResponse {
                status: 418,
                body: Some(direct_body),
            });
            assert_eq!(direct.status(), 418);
            assert_eq!(direct.headers()[X_TRELLIS_REASON], "direct_response");
            assert_eq!(body(direct).await, expected);
        }
        let redirect = redirect_response(302, "https://new.example/x");
        assert_eq!(redirect.status(), 302);
        assert_eq!(redirect.headers()[LOCATION], "https://new.example/x");
        assert_eq!(redirect.headers()[X_TRELLIS_REASON], "redirect");
    }

    #[test]
    fn outcomes_and_flag_lists() {
        let mut grpc_error = HeaderMap::new();
        grpc_error.insert(GRPC_STATUS, "14".parse().unwrap());
        let mut grpc_ok = HeaderMap::new();
        grpc_ok.insert(GRPC_STATUS, "0".parse().unwrap());
        let cases = [
            (StatusCode::OK, HeaderMap::new(), Outcome::Status(200)),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                HeaderMap::new(),
                Outcome::Status(503),
            ),
            (StatusCode::OK, grpc_error, Outcome::GrpcStatus(14)),
            (StatusCode::OK, grpc_ok, Outcome::Status(200)),
        ];
        for (status, headers, expected) in cases {
            assert_eq!(
                response_outcome(status, &headers),
                expected,
                "{status} {headers:?}"
            );
        }
        assert_eq!(
            error_outcome(&SendError::Connect(anyhow::anyhow!("refused"))),
            Some(Outcome::ConnectFailure)
        );
        let flags = [
            (&["DI", "FI"][..], "DI,FI"),
            (&["-", "UT"][..], "UT"),
            (&["DI", "-"][..], "DI"),
            (&["-"][..], "-"),
            (&[][..], "-"),
            (&["DI", "URX"][..], "DI,URX"),
            (&["URX", "UF"][..], "UF,URX"),
            (&["DI", "UT"][..], "UT,DI"),
            (&["FI", "DI", "FI"][..], "DI,FI"),
        ];
        for (parts, expected) in flags {
            assert_eq!(join_flags(parts), expected, "{parts:?}");
        }
        assert!(std::ptr::eq(
            join_flags(&["DI", "FI"]),
            join_flags(&["DI", "FI"])
        ));
    }
}
