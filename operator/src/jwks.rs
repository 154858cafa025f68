//! The JWKS resolver: fetches the key sets RequestAuthentications name (`jwksUri`, or the
//! issuer's OpenID discovery document), keeps them, and refreshes them, as istiod does before it
//! inlines them into proxy config. Proxies never fetch keys; a changed key set (a rotated signing
//! key) is announced on [`JwksResolver::changes`], and the control plane republishes.
//!
//! Bounds: one fetch takes at most the rule's `timeout` (Istio's default 5s), a document is at
//! most [`MAX_DOCUMENT_BYTES`], and a key set is fetched again every
//! `Mesh.spec.jwt.jwksRefreshInterval` (after a failure, after at most [`RETRY_AFTER_FAILURE`]).
//! A failed refresh keeps the last key set fetched; one never fetched stays absent, and the rules
//! that need it refuse every token (see [`crate::request_authentication`]). Key sets no policy
//! names any more are dropped with their fetch task.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::request_authentication::{Fetch, JwksSource};

/// The largest key set (or discovery) document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 512 * 1024;
/// How soon a failed fetch is tried again (sooner when the refresh interval is shorter).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// See the module doc. Cheap to clone.
#[derive(Clone)]
pub struct JwksResolver {
    client: HttpClient,
    key_sets: Arc<Mutex<BTreeMap<JwksSource, String>>>,
    tasks: Arc<Mutex<BTreeMap<Fetch, (Duration, AbortHandle)>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl JwksResolver {
    /// A resolver trusting the system's root certificates for `https` URLs.
    pub fn new() -> Self {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "reading the system's root certificates");
        }
        roots.add_parsable_certificates(native.certs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            key_sets: Arc::default(),
            tasks: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    /// Bumped whenever a key set changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The key set documents fetched so far.
    pub fn key_sets(&self) -> BTreeMap<JwksSource, String> {
        self.key_sets.lock().clone()
    }

    /// Keeps exactly `fetches` fetched, each refreshed every `interval`: starts what is new,
    /// restarts what the interval changed for, and stops (and forgets) what is no longer named.
    pub fn track(&self, fetches: &BTreeSet<Fetch>, interval: Duration) {
        let mut tasks = self.tasks.lock();
        tasks.retain(|fetch, (every, task)| {
            let keep = fetches.contains(fetch) && *every == interval;
            if !keep {
                task.abort();
            }
            keep
        });
        let wanted: BTreeSet<&JwksSource> = fetches.iter().map(|f| &f.source).collect();
        let removed = {
            let mut key_sets = self.key_sets.lock();
            let before = key_sets.len();
            key_sets.retain(|source, _| wanted.contains(source));
            before != key_sets.len()
        };
        if removed {
            self.changed.send_modify(|n| *n += 1);
        }
        for fetch in fetches {
            if tasks.contains_key(fetch) {
                continue;
            }
            let task = tokio::spawn(self.clone().refresh(fetch.clone(), interval));
            tasks.insert(fetch.clone(), (interval, task.abort_handle()));
        }
    }

    async fn refresh(self, fetch: Fetch, interval: Duration) {
        loop {
            let wait = match self.fetch(&fetch).await {
                Ok(document) => {
                    let changed = self
                        .key_sets
                        .lock()
                        .insert(fetch.source.clone(), document.clone())
                        != Some(document);
                    if changed {
                        info!(source = ?fetch.source, "JWKS fetched (new or changed)");
                        self.changed.send_modify(|n| *n += 1);
                    }
                    interval
                }
                Err(error) => {
                    warn!(source = ?fetch.source, error = format!("{error:#}"), "JWKS fetch failed");
                    interval.min(RETRY_AFTER_FAILURE)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One key set document, checked to be a JSON Web Key Set.
    async fn fetch(&self, fetch: &Fetch) -> anyhow::Result<String> {
        let uri = match &fetch.source {
            JwksSource::Uri(uri) => uri.clone(),
            JwksSource::Discovery { issuer } => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let discovery: serde_json::Value =
                    serde_json::from_str(&self.get(&url, fetch.timeout).await?)
                        .with_context(|| format!("{url}: not JSON"))?;
                discovery["jwks_uri"]
                    .as_str()
                    .with_context(|| format!("{url}: no jwks_uri"))?
                    .to_owned()
            }
        };
        let document = self.get(&uri, fetch.timeout).await?;
        let parsed: serde_json::Value =
            serde_json::from_str(&document).with_context(|| format!("{uri}: not JSON"))?;
        if !parsed["keys"].is_array() {
            bail!("{uri}: not a JSON Web Key Set (no \"keys\" list)");
        }
        Ok(document)
    }

    async fn get(&self, url: &str, timeout: Duration) -> anyhow::Result<String> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("{url:?} is not a URL"))?;
        let exchange = async {
            let response = self.client.get(uri).await?;
            let status = response.status();
            if !status.is_success() {
                bail!("{url}: HTTP {status}");
            }
            let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).with_context(|| format!("{url}: not UTF-8"))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .with_context(|| format!("{url}: no answer within {timeout:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    /// An HTTP server on 127.0.0.1 answering `/jwks` with the current document and
    /// `/.well-known/openid-configuration` with a discovery document pointing there.
    async fn key_server(document: Arc<Mutex<String>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let jwks_uri = format!("{base}/jwks");
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (document, jwks_uri) = (document.clone(), jwks_uri.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/jwks" => document.lock().clone(),
                        "/.well-known/openid-configuration" => {
                            serde_json::json!({"jwks_uri": jwks_uri}).to_string()
                        }
                        _ => "x".repeat(MAX_DOCUMENT_BYTES + 1),
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        base
    }

    async fn wait_for_key_sets(
        resolver: &JwksResolver,
        changes: &mut watch::Receiver<u64>,
        expected: &BTreeMap<JwksSource, String>,
    ) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while resolver.key_sets() != *expected {
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("key sets {:?}, expected {expected:?}", resolver.key_sets()));
    }

    #[tokio::test]
    async fn a_rotated_key_set_is_picked_up_on_the_next_refresh() {
        let document = Arc::new(Mutex::new(r#"{"keys":[{"kid":"old"}]}"#.to_owned()));
        let base = key_server(document.clone()).await;
        let resolver = JwksResolver::new();
        let mut changes = resolver.changes();
        let by_uri = JwksSource::Uri(format!("{base}/jwks"));
        let discovered = JwksSource::Discovery {
            issuer: format!("{base}/"),
        };
        let fetch = |source: &JwksSource| Fetch {
            source: source.clone(),
            timeout: Duration::from_secs(2),
        };
        let fetches = BTreeSet::from([fetch(&by_uri), fetch(&discovered)]);
        resolver.track(&fetches, Duration::from_millis(200));
        let old = document.lock().clone();
        wait_for_key_sets(
            &resolver,
            &mut changes,
            &BTreeMap::from([(by_uri.clone(), old.clone()), (discovered.clone(), old)]),
        )
        .await;

        let rotated = r#"{"keys":[{"kid":"new"}]}"#.to_owned();
        *document.lock() = rotated.clone();
        wait_for_key_sets(
            &resolver,
            &mut changes,
            &BTreeMap::from([
                (by_uri.clone(), rotated.clone()),
                (discovered.clone(), rotated.clone()),
            ]),
        )
        .await;

        // Not a key set any more: the last good one is kept.
        *document.lock() = "<html>oops</html>".to_owned();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(resolver.key_sets()[&by_uri], rotated);

        // No longer named: forgotten.
        resolver.track(
            &BTreeSet::from([fetch(&discovered)]),
            Duration::from_secs(60),
        );
        assert_eq!(
            resolver.key_sets().keys().collect::<Vec<_>>(),
            [&discovered]
        );
    }

    #[tokio::test]
    async fn oversized_and_slow_documents_are_refused() {
        let document = Arc::new(Mutex::new(String::new()));
        let base = key_server(document).await;
        let resolver = JwksResolver::new();
        let oversized = Fetch {
            source: JwksSource::Uri(format!("{base}/large")),
            timeout: Duration::from_secs(2),
        };
        let error = resolver.fetch(&oversized).await.unwrap_err();
        assert!(format!("{error:#}").contains("length limit"), "{error:#}");

        // A server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slow = Fetch {
            source: JwksSource::Uri(format!("http://{}/jwks", silent.local_addr().unwrap())),
            timeout: Duration::from_millis(300),
        };
        let started = std::time::Instant::now();
        let error = resolver.fetch(&slow).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("no answer within"),
            "{error:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
