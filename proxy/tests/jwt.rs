//! RequestAuthentication with the real proxy binary and real signed tokens: a server sidecar
//! (static config, pod address 127.0.0.20, port declared `http`, PERMISSIVE) in front of the demo
//! server, which answers with the headers and query it received. ECDSA P-256 signing keys are
//! generated for the run; the tokens are signed with them, and the JWKS in the config holds
//! their public halves. Plaintext clients connect from 127.0.0.7; a REDIRECT rule sends them to
//! the inbound listener.
//!
//! It proves Istio's semantics: no token passes RequestAuthentication without a principal (so a
//! policy requiring one answers 403), a token that fails (expired, not yet valid, wrong issuer,
//! wrong audience, wrong key, unreadable) is refused with 401 wherever it is sent, a valid token
//! is verified and then removed (or forwarded when the rule says so), its payload and claims
//! reach the configured headers and the policies (`requestPrincipals`, `request.auth.claims`),
//! and a forged output header never reaches the application.
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};
use support::{Ports, Proxy, RawReply, in_netns, raw_request, runtime};

const INSIDE: &str = "TRELLIS_PROXY_JWT_TEST_IN_NETNS";
const PEER: &str = "127.0.0.7";
const POD_B: &str = "127.0.0.20";
const HTTP_PORT: u16 = 7310;

/// A signing key of the run and its public JWK.
struct SigningKey {
    kid: Option<&'static str>,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: Option<&'static str>) -> Self {
        let pair = KeyPair::generate().unwrap();
        let raw = pair.public_key_raw();
        // An uncompressed P-256 point: 0x04, then x and y.
        assert_eq!((raw.len(), raw[0]), (65, 4));
        let mut jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        });
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        Self {
            kid,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk,
        }
    }

    fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = self.kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a valid `issuer-foo` token for `sub`, with `extra` merged in (a null removes).
fn foo_claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({
        "iss": "issuer-foo", "sub": sub, "aud": ["web", "other"], "azp": "cli",
        "exp": now() + 600, "iat": now(),
    });
    for (key, value) in extra.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

/// A GET from [`PEER`] with `headers` (`name: value` lines).
fn get(target: &str, headers: &[(&str, &str)]) -> RawReply {
    let dst: SocketAddr = format!("{POD_B}:{HTTP_PORT}").parse().unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    raw_request(
        PEER,
        dst,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: web.shop.svc.cluster.local\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
}

/// What the application received: its JSON answer.
fn seen(reply: &RawReply) -> Value {
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not the application's answer ({e}): {reply:?}"))
}

#[test]
fn jwt_requests_are_authenticated_then_authorized_as_istio_does() {
    if !in_netns(
        INSIDE,
        &[
            &["-s", "127.0.0.6", "-j", "RETURN"],
            &["-d", POD_B, "-j", "REDIRECT", "--to-ports", "15006"],
        ],
    ) {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let state = Arc::new(trellis_demo::server::ServerState::new(
            trellis_demo::server::Identity {
                name: "web".into(),
                version: "v1".into(),
                namespace: "shop".into(),
                pod: "web-0".into(),
            },
            true,
        ));
        // All addresses: the sidecar reaches the application on the pod's address.
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", HTTP_PORT))
            .await
            .unwrap();
        tokio::spawn(trellis_demo::server::serve_http(
            listener,
            state,
            std::future::pending(),
            Duration::from_secs(1),
        ));
    });

    let foo_key = SigningKey::generate(Some("foo-1"));
    let bar_key = SigningKey::generate(None);
    let stranger = SigningKey::generate(Some("foo-1"));
    let jwks = |key: &SigningKey| json!({"keys": [key.jwk]}).to_string();
    let authentication = json!({"jwtRules": [
        {"policy": "shop.jwt-foo", "issuer": "issuer-foo", "audiences": ["web"],
         "jwks": jwks(&foo_key), "outputPayloadToHeader": "x-jwt-payload",
         "outputClaimToHeaders": [{"header": "x-jwt-role", "claim": "role"}]},
        {"policy": "shop.jwt-bar", "issuer": "issuer-bar", "jwks": jwks(&bar_key),
         "fromHeaders": [{"name": "x-jwt"}], "fromParams": ["jwt"],
         "forwardOriginalToken": true},
    ]});
    let authorization = json!({
        "deny": [{"name": "shop.deny-banned", "rules": [{"when": [
            {"key": "requestAuthClaim", "claim": ["groups"], "values": [{"exact": "banned"}]}]}]}],
        "allow": [{"name": "shop.allow", "rules": [
            {"to": [{"paths": [{"prefix": "/public"}]}]},
            {"from": [{"requestPrincipals": [{"exact": "issuer-foo/alice"}, {"prefix": "issuer-bar/"}]}],
             "to": [{"paths": [{"prefix": "/private"}]}]},
            {"to": [{"paths": [{"prefix": "/admin"}]}],
             "when": [{"key": "requestAuthClaim", "claim": ["org", "role"], "values": [{"exact": "admin"}]},
                      {"key": "requestAuthPresenter", "values": [{"exact": "cli"}]},
                      {"key": "requestAuthAudiences", "values": [{"exact": "web"}]}]},
        ]}],
    });
    let config = json!({
        "version": "b-1",
        "services": [{
            "hostnames": ["web.shop.svc.cluster.local"], "namespace": "shop", "vips": ["10.96.0.1"],
            "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "http"}],
            "endpoints": [{"address": POD_B, "ready": true, "meshed": true}],
        }],
        "inbound": {"mtlsMode": "PERMISSIVE", "authentication": authentication,
                    "authorization": authorization},
    });
    let mut ports = Ports::free();
    ports.inbound = 15006;
    let mut proxy = Proxy::with_config_and_env(
        ports,
        &config.to_string(),
        &[],
        &[
            ("POD_NAME", "web-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "web"),
            ("WORKLOAD_NAME", "web"),
        ],
    );
    proxy.wait_ready();
    let bearer = |token: &str| format!("Bearer {token}");

    // No token: accepted without a principal, so only what needs none is allowed.
    let reply = get("/public", &[]);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    let reply = get("/private", &[]);
    assert_eq!(
        (reply.status, reply.body.trim_end()),
        (403, "RBAC: access denied")
    );

    // A valid token: verified, its principal allowed, the token removed, the payload and claim
    // headers set.
    let alice = foo_key.sign(foo_claims("alice", json!({"role": "reader"})));
    let reply = get("/private", &[("authorization", &bearer(&alice))]);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    let headers = &seen(&reply)["headers"];
    assert!(headers.get("authorization").is_none(), "{headers}");
    let payload = alice.split('.').nth(1).unwrap();
    assert_eq!(headers["x-jwt-payload"], json!([payload]));
    assert_eq!(headers["x-jwt-role"], json!(["reader"]));
    let decoded: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(headers["x-jwt-payload"][0].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["sub"], "alice");
    // Another subject of the same issuer is authenticated but not allowed.
    let bob = foo_key.sign(foo_claims("bob", json!({})));
    assert_eq!(
        get("/private", &[("authorization", &bearer(&bob))]).status,
        403
    );
    // The default query parameter, removed before the application sees the request.
    let reply = get(&format!("/private?a=1&access_token={alice}"), &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(seen(&reply)["query"], "a=1");

    // Failing tokens: 401 with the challenge, even where no principal is needed.
    let failing = [
        (
            "expired",
            foo_key.sign(foo_claims("alice", json!({"exp": now() - 120}))),
        ),
        (
            "not yet valid",
            foo_key.sign(foo_claims("alice", json!({"nbf": now() + 600}))),
        ),
        (
            "wrong issuer",
            foo_key.sign(foo_claims("alice", json!({"iss": "issuer-baz"}))),
        ),
        (
            "wrong audience",
            foo_key.sign(foo_claims("alice", json!({"aud": "other"}))),
        ),
        (
            "no audience",
            foo_key.sign(foo_claims("alice", json!({"aud": null}))),
        ),
        (
            "another key, same kid",
            stranger.sign(foo_claims("alice", json!({}))),
        ),
        ("not a JWT", "not-a-token".to_owned()),
        // issuer-bar's rule reads x-jwt and ?jwt, not the Authorization header.
        (
            "issuer at a location its rule does not read",
            bar_key.sign(json!({"iss": "issuer-bar", "sub": "carol"})),
        ),
    ];
    for (case, token) in &failing {
        for target in ["/private", "/public"] {
            let reply = get(target, &[("authorization", &bearer(token))]);
            assert_eq!(reply.status, 401, "{case} on {target}: {reply:?}");
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer error=\"invalid_token\""),
                "{case}"
            );
            assert_eq!(
                reply.header("x-trellis-reason"),
                Some("jwt_authentication_failed")
            );
        }
    }
    // A token without exp does not expire (Envoy's default).
    let forever = foo_key.sign(foo_claims("alice", json!({"exp": null})));
    assert_eq!(
        get("/private", &[("authorization", &bearer(&forever))]).status,
        200
    );

    // A rule with its own locations, which keeps the token (forwardOriginalToken).
    let carol = bar_key.sign(json!({"iss": "issuer-bar", "sub": "carol", "exp": now() + 600}));
    let reply = get("/private", &[("x-jwt", &carol)]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(seen(&reply)["headers"]["x-jwt"], json!([carol]));
    let reply = get(&format!("/private?jwt={carol}"), &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(seen(&reply)["query"], format!("jwt={carol}"));

    // request.auth.claims (nested), presenter and audiences in `when`.
    let admin = foo_key.sign(foo_claims("dave", json!({"org": {"role": "admin"}})));
    assert_eq!(
        get("/admin", &[("authorization", &bearer(&admin))]).status,
        200
    );
    let user = foo_key.sign(foo_claims("dave", json!({"org": {"role": "user"}})));
    assert_eq!(
        get("/admin", &[("authorization", &bearer(&user))]).status,
        403
    );
    let other_presenter = foo_key.sign(foo_claims(
        "dave",
        json!({"org": {"role": "admin"}, "azp": "web-ui"}),
    ));
    assert_eq!(
        get("/admin", &[("authorization", &bearer(&other_presenter))]).status,
        403
    );
    // A list claim matches by any of its strings (a DENY here).
    let banned = foo_key.sign(foo_claims("alice", json!({"groups": ["dev", "banned"]})));
    let reply = get("/public", &[("authorization", &bearer(&banned))]);
    assert_eq!(reply.status, 403, "{reply:?}");

    // Output headers are the proxy's: a client's own value never reaches the application.
    let reply = get(
        "/public",
        &[("x-jwt-payload", "forged"), ("x-jwt-role", "admin")],
    );
    assert_eq!(reply.status, 200);
    let headers = &seen(&reply)["headers"];
    assert!(
        headers.get("x-jwt-payload").is_none() && headers.get("x-jwt-role").is_none(),
        "{headers}"
    );

    let metrics = proxy.scrape();
    assert_eq!(
        support::sample(&metrics, "istio_requests_total", &["response_code=\"401\""]),
        Some(2 * failing.len() as u64),
        "{metrics}"
    );
}
