//! Header handling shared by both directions: hop-by-hop headers (RFC 9110 §7.6.1), the
//! proxy's internal `x-trellis-*` headers, the forwarding headers the proxy adds, and moving a
//! request between HTTP/1.1 and HTTP/2 form.
//!
//! Internal headers are the proxy's own word: `x-trellis-reason` on a response it made, and
//! `x-trellis-app-version` between two sidecars (which selects the HTTP version spoken to the
//! application). Nobody else may speak it, so [`strip_internal`] removes every `x-trellis-*`
//! header, whatever follows the prefix, from what crosses a trust boundary: requests from the
//! network and from the application, and responses from an application or any upstream that
//! is not a sidecar met over mesh mutual TLS (which has already removed its application's).

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Request, Uri, Version};

pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The proxy's reason for a response it generated itself.
pub const X_TRELLIS_REASON: HeaderName = HeaderName::from_static("x-trellis-reason");
/// Between sidecars only: the HTTP version the application spoke, so the inbound side can
/// speak it to the application on a port whose protocol is not declared (the hop itself is
/// always HTTP/2). Honoured only from a peer over mesh mutual TLS; removed by the inbound side.
pub const X_TRELLIS_APP_VERSION: HeaderName = HeaderName::from_static("x-trellis-app-version");
/// The prefix of every internal header.
const INTERNAL_PREFIX: &str = "x-trellis-";

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Hop-by-hop by definition (RFC 9113 §3.2.1): it only accompanies an `h2c` upgrade.
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Removes hop-by-hop headers: those named by `Connection`, `Connection` itself, the standard
/// ones (`HTTP2-Settings` included), and `TE` unless it is `trailers` (which gRPC needs end to
/// end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = tokens(headers, &CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        HTTP2_SETTINGS,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(TE);
    }
}

/// The comma-separated tokens of every value of `name`, trimmed (values that are not text are
/// skipped).
pub fn tokens<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes every internal `x-trellis-*` header (see the module doc).
pub fn strip_internal(headers: &mut HeaderMap) {
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(INTERNAL_PREFIX))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// [`strip_hop_by_hop`] for an upgrade request or its `101` response: the `Upgrade` header and
/// `Connection: upgrade` are what the next hop must see.
pub fn strip_hop_by_hop_keep_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.get(UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if let Some(upgrade) = upgrade {
        headers.insert(UPGRADE, upgrade);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Sets `x-request-id` to a fresh UUID (version 4) when the request carries none; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        return id.to_owned();
    }
    let id = uuid_v4(rand::random());
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(X_REQUEST_ID, value);
    }
    id
}

fn uuid_v4(random: u128) -> String {
    let bits = (random & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The request's authority: `:authority` (HTTP/2, or an absolute-form HTTP/1.1 target), else
/// `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

/// Puts a request into the form `version` sends: HTTP/2 takes scheme and authority in the URI
/// (`:scheme`, `:authority`) and no `Host`; HTTP/1.1 takes an origin-form target and `Host`.
/// `fallback_authority` is used when the request names none (an HTTP/1.0 client).
pub fn set_version<B>(req: &mut Request<B>, version: Version, fallback_authority: &str) {
    let authority = authority(req).unwrap_or_else(|| fallback_authority.to_owned());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if version == Version::HTTP_2 {
        req.headers_mut().remove(HOST);
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path_and_query.as_str())
            .build();
        if let Ok(uri) = uri {
            *req.uri_mut() = uri;
        }
    } else {
        if let Ok(host) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(HOST, host);
        }
        if let Ok(uri) = path_and_query.parse() {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = version;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_end_to_end_ones_kept() {
        // (headers given, header names kept)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let table: &[Case] = &[
            (
                &[
                    ("connection", "keep-alive, x-hop"),
                    ("keep-alive", "timeout=5"),
                    ("x-hop", "1"),
                    ("x-end", "2"),
                    ("host", "a"),
                ],
                &["host", "x-end"],
            ),
            (
                &[("transfer-encoding", "chunked"), ("upgrade", "websocket")],
                &[],
            ),
            (
                &[("te", "trailers"), ("content-type", "application/grpc")],
                &["content-type", "te"],
            ),
            (&[("te", "gzip"), ("proxy-connection", "close")], &[]),
        ];
        for (given, kept) in table {
            let mut map = headers(given);
            strip_hop_by_hop(&mut map);
            assert_eq!(names(&map), *kept, "{given:?}");
        }
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
        ]);
        strip_hop_by_hop_keep_upgrade(&mut map);
        assert_eq!(names(&map), ["connection", "upgrade"]);
        assert_eq!(map[CONNECTION], "upgrade");
    }

    #[test]
    fn an_h2c_upgrade_loses_every_header_that_asks_for_it() {
        let mut map = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(names(&map), ["host"]);
    }

    #[test]
    fn internal_headers_are_stripped_whatever_their_suffix() {
        let mut map = headers(&[
            ("x-trellis-reason", "rbac_access_denied"),
            ("X-Trellis-App-Version", "HTTP/2"),
            ("x-trellis-anything-new", "1"),
            ("x-trellis", "not internal: no dash after the prefix"),
            ("x-trellisx", "2"),
            ("x-user", "alice"),
        ]);
        strip_internal(&mut map);
        assert_eq!(names(&map), ["x-trellis", "x-trellisx", "x-user"]);
    }

    #[test]
    fn request_ids_are_kept_or_fresh_uuids() {
        let mut given = headers(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut given), "abc");
        let mut none = HeaderMap::new();
        let id = ensure_request_id(&mut none);
        assert_eq!(none[X_REQUEST_ID], id.as_str());
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "{id}");
        assert!("89ab".contains(&id[19..20]), "{id}");
        assert_eq!(uuid_v4(0), "00000000-0000-4000-8000-000000000000");
        assert_eq!(uuid_v4(u128::MAX), "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn requests_move_between_http1_and_http2_form() {
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header(HOST, "reviews:9080")
            .body(())
            .unwrap();
        set_version(&mut req, Version::HTTP_2, "10.0.0.1:80");
        assert_eq!(req.uri(), "http://reviews:9080/a?b=1");
        assert!(req.headers().get(HOST).is_none());
        set_version(&mut req, Version::HTTP_11, "10.0.0.1:80");
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()[HOST], "reviews:9080");

        let mut bare = Request::builder().uri("/").body(()).unwrap();
        set_version(&mut bare, Version::HTTP_2, "10.0.0.1:80");
        assert_eq!(bare.uri(), "http://10.0.0.1:80/");
    }
}
