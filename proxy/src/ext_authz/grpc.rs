//! Envoy's ext_authz gRPC protocol (`envoyExtAuthzGrpc`): one
//! `envoy.service.auth.v3.Authorization/Check` call, with the official protocol definitions.
//! The `CheckRequest` carries the source and destination (address and SPIFFE principal) and
//! the HTTP request: id, method, every header (repeated values joined by `,`), path with query,
//! host, scheme and protocol; never the body. An `OK` status allows, with the `ok_response`
//! header changes (`append` unset or false replaces, true appends; else `append_action`) and
//! `headers_to_remove`. Any other status denies: the client gets the `denied_response` status
//! (403 when unset, 401 for `UNAUTHENTICATED` as Envoy does), headers and body. A call that
//! fails, or an `error_response`, fails the check.

use std::collections::HashMap;

use ::http::header::{HeaderName, HeaderValue};
use ::http::{HeaderMap, Request, Version};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValueOption, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttributeRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tonic::transport::Channel;

use super::{Answer, HeaderChanges, Peers, denial_response};
use crate::http::headers::{self, X_REQUEST_ID};

/// gRPC's `UNAUTHENTICATED`, which Envoy answers with 401 when the authorizer sets no status.
const UNAUTHENTICATED: i32 = 16;

pub(super) async fn check<B>(
    channel: Channel,
    peers: &Peers<'_>,
    req: &Request<B>,
) -> Result<Answer, String> {
    let mut client = AuthorizationClient::new(channel);
    let response = client
        .check(check_request(peers, req))
        .await
        .map_err(|status| format!("Check failed: {status}"))?
        .into_inner();
    let code = response.status.as_ref().map_or(0, |status| status.code);
    match (code, response.http_response) {
        (_, Some(HttpResponse::ErrorResponse(_))) => {
            Err("the authorizer answered with an error_response".to_owned())
        }
        (0, ok) => {
            let mut changes = HeaderChanges::default();
            if let Some(HttpResponse::OkResponse(ok)) = ok {
                for option in &ok.headers {
                    header_change(option, &mut changes)?;
                }
                for name in &ok.headers_to_remove {
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| format!("headers_to_remove {name:?}: {e}"))?;
                    changes.remove.push(name);
                }
            }
            Ok(Answer::Allow(changes))
        }
        (code, denied) => {
            let denied = match denied {
                Some(HttpResponse::DeniedResponse(denied)) => Some(denied),
                _ => None,
            };
            let status = denied
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .map(|s| s.code)
                .filter(|code| *code > 0)
                .and_then(|code| u16::try_from(code).ok())
                .unwrap_or(if code == UNAUTHENTICATED { 401 } else { 403 });
            let mut headers = HeaderMap::new();
            let mut body = Bytes::new();
            if let Some(denied) = denied {
                for option in &denied.headers {
                    let (name, value) = header(option)?;
                    headers.append(name, value);
                }
                body = Bytes::from(denied.body);
            }
            Ok(Answer::Deny(denial_response(status, headers, body)))
        }
    }
}

fn check_request<B>(peers: &Peers<'_>, req: &Request<B>) -> CheckRequest {
    let mut joined: HashMap<String, String> = HashMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        joined
            .entry(name.as_str().to_owned())
            .and_modify(|values| {
                values.push(',');
                values.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let http = HttpRequest {
        id: req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        method: req.method().as_str().to_owned(),
        headers: joined,
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        host: headers::authority(req).unwrap_or_default(),
        scheme: "http".to_owned(),
        protocol: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .to_owned(),
        // Unknown (the body is not read before the check), as Envoy reports it.
        size: -1,
        ..HttpRequest::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(
                peers.source,
                peers.source_principal.unwrap_or_default(),
            )),
            destination: Some(peer(peers.destination, peers.destination_principal)),
            request: Some(AttributeRequest {
                time: None,
                http: Some(http),
            }),
            ..AttributeContext::default()
        }),
    }
}

fn peer(address: std::net::SocketAddr, principal: &str) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: address.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    address.port(),
                ))),
                ..SocketAddress::default()
            })),
        }),
        principal: principal.to_owned(),
        ..Peer::default()
    }
}

fn header(option: &HeaderValueOption) -> Result<(HeaderName, HeaderValue), String> {
    let header = option
        .header
        .as_ref()
        .ok_or("a header option without a header")?;
    let name = HeaderName::from_bytes(header.key.as_bytes())
        .map_err(|e| format!("header {:?}: {e}", header.key))?;
    let value = if header.raw_value.is_empty() {
        HeaderValue::from_str(&header.value)
    } else {
        HeaderValue::from_bytes(&header.raw_value)
    }
    .map_err(|e| format!("header {name}: {e}"))?;
    Ok((name, value))
}

/// An `ok_response` header: replaced unless `append` says true; without `append`, by
/// `append_action` (its default, append-or-add, counts as unset: for ext_authz Envoy
/// documents `append` as false by default).
fn header_change(option: &HeaderValueOption, changes: &mut HeaderChanges) -> Result<(), String> {
    let (name, value) = header(option)?;
    #[allow(deprecated)] // `append` is deprecated, and still what authorizers send.
    let append = match option.append.as_ref().map(|append| append.value) {
        Some(append) => append,
        None => match HeaderAppendAction::try_from(option.append_action) {
            Ok(HeaderAppendAction::AddIfAbsent) => {
                // Added only where the request has none: as an append that the set pass below
                // cannot override.
                changes.add_if_absent.push((name, value));
                return Ok(());
            }
            Ok(HeaderAppendAction::OverwriteIfExists) => {
                changes.overwrite_if_exists.push((name, value));
                return Ok(());
            }
            _ => false,
        },
    };
    if append {
        changes.append.append(name, value);
    } else {
        changes.set.append(name, value);
    }
    Ok(())
}
