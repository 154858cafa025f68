//! Envoy's ext_authz HTTP protocol (`envoyExtAuthzHttp`): the check is an HTTP/1.1 request
//! to the authorizer with the client request's method, `pathPrefix` + its path and query, its
//! `Host`, `Content-Length: 0` and no body, the client headers `includeRequestHeadersInCheck`
//! names, and `includeAdditionalHeadersInCheck` on top. A `200` allows (the response headers
//! `headersToUpstreamOnAllow` names replace the request's); a 5xx fails the check; any other
//! status denies, and the client gets that status, the body, and the headers
//! `headersToDownstreamOnDeny` names (with `WWW-Authenticate` and `Location`), or all of them
//! when it names none.

use ::http::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue, LOCATION, WWW_AUTHENTICATE};
use ::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use trellis_config::ext_authz::{ExtAuthzProvider, HttpCheck, header_listed};

use super::client::HttpClient;
use super::{Answer, HeaderChanges, MAX_DENIAL_BODY, denial_response};
use crate::http::headers;

pub(super) async fn check<B>(
    client: &HttpClient,
    provider: &ExtAuthzProvider,
    check: &HttpCheck,
    req: &Request<B>,
) -> Result<Answer, String> {
    let request = check_request(provider, check, req)?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("asking {}:{}: {e}", provider.host, provider.port))?;
    let status = response.status();
    if status.is_server_error() {
        return Err(format!("the authorizer answered {status}"));
    }
    let (parts, body) = response.into_parts();
    if status == StatusCode::OK {
        let mut changes = HeaderChanges::default();
        for (name, value) in &parts.headers {
            if header_listed(&check.headers_to_upstream_on_allow, name.as_str()) {
                changes.set.append(name.clone(), value.clone());
            }
        }
        return Ok(Answer::Allow(changes));
    }
    let body = Limited::new(body, MAX_DENIAL_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the authorizer's denial: {e}"))?
        .to_bytes();
    let headers = if check.headers_to_downstream_on_deny.is_empty() {
        parts.headers
    } else {
        let mut listed = HeaderMap::new();
        for (name, value) in &parts.headers {
            if header_listed(&check.headers_to_downstream_on_deny, name.as_str())
                || *name == WWW_AUTHENTICATE
                || *name == LOCATION
            {
                listed.append(name.clone(), value.clone());
            }
        }
        listed
    };
    Ok(Answer::Deny(denial_response(
        status.as_u16(),
        headers,
        body,
    )))
}

fn check_request<B>(
    provider: &ExtAuthzProvider,
    check: &HttpCheck,
    req: &Request<B>,
) -> Result<Request<Full<Bytes>>, String> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = format!(
        "http://{}:{}{}{path}",
        provider.host, provider.port, check.path_prefix
    );
    let mut request = Request::builder()
        .method(req.method())
        .uri(&uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the check request for {uri}: {e}"))?;
    let headers = request.headers_mut();
    for (name, value) in req.headers() {
        if header_listed(&check.include_request_headers, name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &check.additional_headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("includeAdditionalHeadersInCheck {name:?}: {e}"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| format!("includeAdditionalHeadersInCheck {name}: {e}"))?;
        headers.insert(name, value);
    }
    headers::strip_hop_by_hop(headers);
    if let Some(authority) = headers::authority(req)
        && let Ok(host) = HeaderValue::from_str(&authority)
    {
        headers.insert(HOST, host);
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::ext_authz::{ExtAuthzProtocol, HeaderPattern};

    #[test]
    fn the_check_request_carries_method_prefixed_path_host_and_chosen_headers() {
        let check = HttpCheck {
            path_prefix: "/check".into(),
            include_request_headers: ["x-user", "x-a-*"]
                .iter()
                .filter_map(|text| HeaderPattern::parse(text))
                .collect(),
            additional_headers: [("x-from".to_owned(), "mesh".to_owned())].into(),
            ..HttpCheck::default()
        };
        let provider = ExtAuthzProvider {
            name: "http".into(),
            host: "authz.local".into(),
            port: 8000,
            timeout_ms: 1000,
            fail_open: false,
            status_on_error: 403,
            protocol: ExtAuthzProtocol::Http(check.clone()),
        };
        let req = Request::post("/admin/x?y=1")
            .header(HOST, "web.demo:8080")
            .header("x-user", "alice")
            .header("x-a-b", "1")
            .header("x-from", "client")
            .header("cookie", "secret")
            .header(CONTENT_LENGTH, "12")
            .body(())
            .unwrap();
        let sent = check_request(&provider, &check, &req).unwrap();
        assert_eq!(sent.method(), "POST");
        assert_eq!(
            sent.uri().to_string(),
            "http://authz.local:8000/check/admin/x?y=1"
        );
        let mut names: Vec<_> = sent.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-length", "host", "x-a-b", "x-from", "x-user"]
        );
        assert_eq!(sent.headers()[HOST], "web.demo:8080");
        assert_eq!(
            sent.headers()["x-from"],
            "mesh",
            "additional headers override"
        );
        assert_eq!(
            sent.headers()[CONTENT_LENGTH],
            "0",
            "the body is never sent"
        );
    }
}
