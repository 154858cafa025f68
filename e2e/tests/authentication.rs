//! RequestAuthentication on the real cluster, with Istio's reference pairing: a
//! RequestAuthentication whose `jwksUri` the operator fetches, and an AuthorizationPolicy that
//! requires a request principal. The key set is served in-cluster by the demo server
//! (`--documents`, in a namespace outside the mesh); the ECDSA signing keys and the tokens are
//! made by this test. Requests reach the meshed demo server through the API server's pod proxy
//! (plaintext, PERMISSIVE), with the token in Istio's default `access_token` query parameter
//! (the API server consumes an `Authorization` header itself).
//!
//! A valid token passes (200); an expired, wrong-issuer or wrong-audience token gets 401; no
//! token gets 403. Then the signing key is rotated at the key set's URL, and once the operator's
//! refresh (set to 1s in the Mesh for this test, restored after) has pushed the new keys, a
//! token of the new key passes and one of the old key no longer does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use trellis_e2e::*;

const READY: Duration = Duration::from_secs(180);
const ISSUER: &str = "https://issuer.e2e.trellis.dev";

/// An ECDSA P-256 signing key made for this run, with its public JWK.
struct SigningKey {
    kid: &'static str,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate().expect("an ECDSA P-256 key");
        // An uncompressed P-256 point: 0x04, then x and y.
        let raw = pair.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        });
        Self {
            kid,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk,
        }
    }

    /// A token for `sub` valid for 10 minutes, with `extra` claims merged in.
    fn sign(&self, extra: Value) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let mut claims = json!({
            "iss": ISSUER, "sub": "alice", "aud": "web", "iat": now, "exp": now + 600,
        });
        for (key, value) in extra.as_object().expect("an object") {
            claims[key] = value.clone();
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("signing")
    }
}

/// `Mesh.spec.jwt` back to its default when dropped, even when the test fails.
struct RefreshIntervalRestored;

impl Drop for RefreshIntervalRestored {
    fn drop(&mut self) {
        if let Err(e) = patch_mesh_spec(&json!({"jwt": null})) {
            eprintln!("could not restore the Mesh's jwt settings: {e}");
        }
    }
}

/// The key set server: the demo server keeping documents, outside the mesh.
fn jwks_server_yaml(namespace: &str) -> String {
    let image = demo_image();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: jwks, namespace: {namespace}, labels: {{app: jwks}}}}
spec:
  containers:
  - name: server
    image: {image}
    imagePullPolicy: IfNotPresent
    args: [--port, "8080", --documents]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: jwks, namespace: {namespace}}}
spec:
  selector: {{app: jwks}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    )
}

/// Serves `keys` as the key set, through the API server's pod proxy.
async fn publish_keys(
    client: &kube::Client,
    namespace: &str,
    keys: &[&SigningKey],
) -> anyhow::Result<()> {
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    let request = http::Request::put(format!(
        "/api/v1/namespaces/{namespace}/pods/jwks:8080/proxy/documents/jwks.json"
    ))
    .body(jwks.to_string().into_bytes())?;
    client.request_text(request).await?;
    Ok(())
}

/// The status of a GET to the server pod with `token` in `access_token`, if any.
async fn call(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    token: Option<&str>,
) -> anyhow::Result<u16> {
    let query = token.map_or(String::new(), |t| format!("?access_token={t}"));
    let request = http::Request::get(format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}:8080/proxy/{query}"
    ))
    .body(kube::client::Body::empty())?;
    let response = client.send(request).await?;
    let status = response.status().as_u16();
    // Drained so the connection is reused.
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// Waits until the server's proxy holds a key set with the key `kid` (and, when `gone` is
/// given, without that one).
async fn wait_for_keys(
    namespace: &str,
    pod: &str,
    kid: &str,
    gone: Option<&str>,
) -> anyhow::Result<()> {
    let admin = PortForward::start(namespace, &format!("pod/{pod}"), 15000)?;
    wait_for(
        &format!("{namespace}/{pod} to hold the key {kid}"),
        Duration::from_secs(60),
        || {
            let admin = &admin;
            async move {
                let dump: Value = serde_json::from_str(&admin.get("/config_dump").await?)?;
                let rules = &dump["config"]["inbound"]["authentication"]["jwtRules"];
                let jwks = rules[0]["jwks"].as_str().unwrap_or_default();
                let has = |kid: &str| jwks.contains(&format!("\"kid\":\"{kid}\""));
                Ok((has(kid) && gone.is_none_or(|old| !has(old))).then_some(()))
            }
        },
    )
    .await
}

#[tokio::test]
async fn jwt_is_verified_required_by_policy_and_key_rotation_is_picked_up() -> anyhow::Result<()> {
    let client = client().await?;
    let server_ns = TestNamespace::create("e2e-authn", &[("trellis.dev/inject", "enabled")])?;
    let jwks_ns = TestNamespace::create("e2e-authn-jwks", &[])?;
    patch_mesh_spec(&json!({"jwt": {"jwksRefreshInterval": "1s"}}))?;
    let _restored = RefreshIntervalRestored;
    apply(&jwks_server_yaml(&jwks_ns.name))?;
    apply(&echo_server_yaml(&server_ns.name, "web", "v1", 1))?;
    wait_pods_ready(&client, &jwks_ns.name, "app=jwks", 1, READY).await?;
    let first = SigningKey::generate("first");
    publish_keys(&client, &jwks_ns.name, &[&first]).await?;
    let pods = wait_pods_ready(&client, &server_ns.name, "app=web", 1, READY).await?;
    let server = pods[0].metadata.name.clone().context("a pod name")?;

    let _authentication = Applied::spec(
        "security.istio.io/v1",
        "RequestAuthentication",
        &server_ns.name,
        "web-jwt",
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "jwtRules": [{
                "issuer": ISSUER,
                "audiences": ["web"],
                "jwksUri": format!("http://jwks.{}.svc.cluster.local/documents/jwks.json", jwks_ns.name),
            }],
        }),
    )?;
    let _authorization = Applied::spec(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &server_ns.name,
        "require-jwt",
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"requestPrincipals": [format!("{ISSUER}/*")]}}]}],
        }),
    )?;
    wait_for_keys(&server_ns.name, &server, "first", None).await?;
    // The AuthorizationPolicy travels in the same stream; wait until a token-less call is denied.
    wait_for(
        "the policy to require a principal",
        Duration::from_secs(30),
        || async {
            Ok((call(&client, &server_ns.name, &server, None).await? == 403).then_some(()))
        },
    )
    .await?;

    let valid = first.sign(json!({}));
    let table = [
        ("a valid token", Some(valid.clone()), 200),
        (
            "an expired token",
            Some(first.sign(json!({"exp": 1_000_000_000, "iat": 999_000_000}))),
            401,
        ),
        (
            "another issuer's token",
            Some(first.sign(json!({"iss": "https://elsewhere.example"}))),
            401,
        ),
        (
            "a token for another audience",
            Some(first.sign(json!({"aud": "api"}))),
            401,
        ),
        ("no token", None, 403),
    ];
    for (case, token, expected) in &table {
        let status = call(&client, &server_ns.name, &server, token.as_deref()).await?;
        assert_eq!(status, *expected, "{case}");
    }

    // Key rotation: the new key is unknown until the key set is refreshed.
    let second = SigningKey::generate("second");
    let rotated = second.sign(json!({}));
    assert_eq!(
        call(&client, &server_ns.name, &server, Some(&rotated)).await?,
        401,
        "a token of a key not yet published"
    );
    publish_keys(&client, &jwks_ns.name, &[&second]).await?;
    wait_for_keys(&server_ns.name, &server, "second", Some("first")).await?;
    assert_eq!(
        call(&client, &server_ns.name, &server, Some(&rotated)).await?,
        200,
        "a token of the rotated-in key"
    );
    assert_eq!(
        call(&client, &server_ns.name, &server, Some(&valid)).await?,
        401,
        "a token of the rotated-out key"
    );
    Ok(())
}
