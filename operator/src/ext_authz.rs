//! The `Mesh`'s external authorizers (`spec.extensionProviders`) compiled into the proxy's
//! form ([`ExtAuthzProvider`]), by name. The Mesh controller refuses a spec with an invalid
//! entry ([`Providers::errors`]); the config streams attach the valid ones to the CUSTOM
//! policies that name them (`crate::authorization::for_workload`).

use std::collections::BTreeMap;

use trellis_api::istio::duration;
use trellis_api::mesh::{ExtensionProvider, MeshSpec};
use trellis_config::ext_authz::{
    DEFAULT_STATUS_ON_ERROR, DEFAULT_TIMEOUT_MS, ExtAuthzProtocol, ExtAuthzProvider, HeaderPattern,
    HttpCheck,
};

/// The valid providers by name, and what is wrong with the others.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Providers {
    pub by_name: BTreeMap<String, ExtAuthzProvider>,
    /// One sentence per invalid entry, naming it (`spec.extensionProviders[1] (opa): ...`).
    pub errors: Vec<String>,
}

impl Providers {
    pub fn of(spec: &MeshSpec) -> Self {
        let mut providers = Self::default();
        for (index, entry) in spec.extension_providers.iter().enumerate() {
            let at = format!("spec.extensionProviders[{index}] ({})", entry.name);
            if providers.by_name.contains_key(&entry.name) {
                providers
                    .errors
                    .push(format!("{at}: the name is used by an earlier provider"));
                continue;
            }
            match compile(entry) {
                Ok(provider) => {
                    providers.by_name.insert(entry.name.clone(), provider);
                }
                Err(error) => providers.errors.push(format!("{at}: {error}")),
            }
        }
        providers
    }
}

/// Everything a provider shares across both kinds.
struct Common<'a> {
    service: &'a str,
    port: u32,
    timeout: Option<&'a str>,
    fail_open: bool,
    status_on_error: Option<&'a str>,
}

fn compile(entry: &ExtensionProvider) -> Result<ExtAuthzProvider, String> {
    let (common, protocol) = match (&entry.envoy_ext_authz_http, &entry.envoy_ext_authz_grpc) {
        (Some(http), None) => {
            let patterns = |field: &str, values: &[String]| -> Result<Vec<HeaderPattern>, String> {
                values
                    .iter()
                    .map(|value| header_pattern(field, value))
                    .collect()
            };
            let check = HttpCheck {
                path_prefix: http.path_prefix.clone().unwrap_or_default(),
                include_request_headers: patterns(
                    "includeRequestHeadersInCheck",
                    &http.include_request_headers_in_check,
                )?,
                additional_headers: http
                    .include_additional_headers_in_check
                    .iter()
                    .map(|(name, value)| (name.to_ascii_lowercase(), value.clone()))
                    .collect(),
                headers_to_upstream_on_allow: patterns(
                    "headersToUpstreamOnAllow",
                    &http.headers_to_upstream_on_allow,
                )?,
                headers_to_downstream_on_deny: patterns(
                    "headersToDownstreamOnDeny",
                    &http.headers_to_downstream_on_deny,
                )?,
            };
            let common = Common {
                service: &http.service,
                port: http.port,
                timeout: http.timeout.as_deref(),
                fail_open: http.fail_open,
                status_on_error: http.status_on_error.as_deref(),
            };
            (common, ExtAuthzProtocol::Http(check))
        }
        (None, Some(grpc)) => {
            let common = Common {
                service: &grpc.service,
                port: grpc.port,
                timeout: grpc.timeout.as_deref(),
                fail_open: grpc.fail_open,
                status_on_error: grpc.status_on_error.as_deref(),
            };
            (common, ExtAuthzProtocol::Grpc)
        }
        _ => {
            return Err(
                "set exactly one of envoyExtAuthzHttp and envoyExtAuthzGrpc (the only kinds \
                 Trellis supports)"
                    .to_owned(),
            );
        }
    };
    // `[<namespace>/]<hostname>`: the namespace only disambiguates a registry lookup; the
    // hostname is what is dialled.
    let host = common
        .service
        .rsplit_once('/')
        .map_or(common.service, |(_, host)| host);
    let port = u16::try_from(common.port)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("port {} is not a TCP port", common.port))?;
    let timeout_ms = match common.timeout {
        None => DEFAULT_TIMEOUT_MS,
        Some(text) => duration::parse(text)
            .map(duration::millis)
            .map_err(|e| format!("timeout {text:?}: {e}"))?,
    };
    let status_on_error = match common.status_on_error {
        None | Some("") => DEFAULT_STATUS_ON_ERROR,
        Some(text) => text
            .parse()
            .map_err(|_| format!("statusOnError {text:?} is not an HTTP status"))?,
    };
    let provider = ExtAuthzProvider {
        name: entry.name.clone(),
        host: host.to_owned(),
        port,
        timeout_ms,
        fail_open: common.fail_open,
        status_on_error,
        protocol,
    };
    provider.validate().map_err(|e| e.to_string())?;
    Ok(provider)
}

/// Istio's header pattern: exact, `prefix*` or `*suffix`, ignoring case; `*` alone (presence)
/// is not part of it.
fn header_pattern(field: &str, value: &str) -> Result<HeaderPattern, String> {
    HeaderPattern::parse(value).ok_or_else(|| {
        format!("{field}: {value:?} is not an exact, prefix* or *suffix header name")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mesh(providers: serde_json::Value) -> MeshSpec {
        serde_json::from_value(json!({"version": "0.1.0", "extensionProviders": providers}))
            .unwrap()
    }

    #[test]
    fn istio_provider_entries_compile_with_istio_defaults() {
        let providers = Providers::of(&mesh(json!([
            {"name": "http", "envoyExtAuthzHttp": {
                "service": "authz/ext-authz.authz.svc.cluster.local", "port": 8000,
                "pathPrefix": "/check", "includeRequestHeadersInCheck": ["X-Ext-Authz", "x-auth-*"],
                "includeAdditionalHeadersInCheck": {"X-From": "mesh"},
                "headersToUpstreamOnAllow": ["*-user"], "headersToDownstreamOnDeny": ["x-reason"]}},
            {"name": "grpc", "envoyExtAuthzGrpc": {
                "service": "ext-authz.authz.svc.cluster.local", "port": 9000,
                "timeout": "1.5s", "failOpen": true, "statusOnError": "503"}}
        ])));
        assert_eq!(providers.errors, Vec::<String>::new());
        let http = &providers.by_name["http"];
        assert_eq!(http.host, "ext-authz.authz.svc.cluster.local");
        assert_eq!((http.port, http.timeout_ms), (8000, DEFAULT_TIMEOUT_MS));
        assert_eq!((http.fail_open, http.status_on_error), (false, 403));
        let ExtAuthzProtocol::Http(check) = &http.protocol else {
            panic!("{http:?}");
        };
        assert_eq!(check.path_prefix, "/check");
        assert_eq!(
            check.include_request_headers,
            [
                HeaderPattern::Exact("x-ext-authz".into()),
                HeaderPattern::Prefix("x-auth-".into())
            ]
        );
        assert_eq!(check.additional_headers["x-from"], "mesh");
        assert_eq!(
            check.headers_to_upstream_on_allow,
            [HeaderPattern::Suffix("-user".into())]
        );
        let grpc = &providers.by_name["grpc"];
        assert_eq!(grpc.protocol, ExtAuthzProtocol::Grpc);
        assert_eq!((grpc.timeout_ms, grpc.fail_open), (1500, true));
        assert_eq!(grpc.status_on_error, 503);
    }

    #[test]
    fn invalid_entries_are_named_and_left_out() {
        let grpc = json!({"service": "a.b.svc.cluster.local", "port": 9000});
        let providers = Providers::of(&mesh(json!([
            {"name": "ok", "envoyExtAuthzGrpc": grpc},
            {"name": "ok", "envoyExtAuthzGrpc": grpc},
            {"name": "none"},
            {"name": "both", "envoyExtAuthzGrpc": grpc, "envoyExtAuthzHttp": grpc},
            {"name": "port", "envoyExtAuthzGrpc": {"service": "a", "port": 70000}},
            {"name": "timeout", "envoyExtAuthzGrpc": {"service": "a", "port": 1, "timeout": "soon"}},
            {"name": "status", "envoyExtAuthzGrpc": {"service": "a", "port": 1, "statusOnError": "forbidden"}},
            {"name": "presence", "envoyExtAuthzHttp": {"service": "a", "port": 1, "headersToUpstreamOnAllow": ["*"]}}
        ])));
        assert_eq!(providers.by_name.keys().collect::<Vec<_>>(), ["ok"]);
        let expected = [
            "[1] (ok): the name is used",
            "[2] (none): set exactly one",
            "[3] (both): set exactly one",
            "[4] (port): port 70000",
            "[5] (timeout): timeout \"soon\"",
            "[6] (status): statusOnError \"forbidden\"",
            "[7] (presence): headersToUpstreamOnAllow",
        ];
        assert_eq!(
            providers.errors.len(),
            expected.len(),
            "{:?}",
            providers.errors
        );
        for (error, expected) in providers.errors.iter().zip(expected) {
            assert!(
                error.contains(expected),
                "{error:?} should contain {expected:?}"
            );
        }
    }
}
