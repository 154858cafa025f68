//! Which pod's config a config stream may carry. A proxy names its pod in
//! [`POD_NAME_HEADER`]; its workload certificate proves only a namespace and a ServiceAccount.
//! A pod's snapshot holds that pod's own inbound policy (its PeerAuthentication and the
//! AuthorizationPolicies selecting it), which no other workload may read — neither one of another
//! ServiceAccount nor another pod of the same one. So the named pod must be in the certificate's
//! namespace, run under the certificate's ServiceAccount, not have finished, and have the
//! connection's source address among its pod IPs: only the proxy inside that pod dials from there.
//!
//! The discovery cache confirms nearly every stream; what it cannot confirm is read fresh from
//! the API server before it is refused, because the cache may lag (a pod that just got its IP, a
//! pod recreated under the same name). Those reads are rate-limited per source address and in
//! total, so a workload naming pods it does not run in cannot turn its refusals into load on the
//! API server. A pod without an IP yet, a failed read, or a throttled one is a transient refusal
//! (503, 429): the proxy retries with backoff as after any failed stream, and serves on its last
//! good config meanwhile. A `hostNetwork` pod's IP is its node's, so its proxy is recognised
//! by the node address it dials from.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use trellis_config::SpiffeId;
use trellis_config::protocol::POD_NAME_HEADER;

use crate::rate_limit::RateLimiter;

/// What a config stream asks for: the pod it names, as whom, from where.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// From the verified client certificate.
    pub identity: &'a SpiffeId,
    /// From [`POD_NAME_HEADER`].
    pub pod_name: &'a str,
    /// The connection's source address.
    pub source: Option<IpAddr>,
}

/// Why a config stream was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the {POD_NAME_HEADER} header naming the proxy's pod is missing")]
    NoPodName,
    #[error("the connection's source address is unknown")]
    NoSourceAddress,
    #[error(
        "there is no pod {namespace}/{pod}: a certificate of namespace {namespace:?} reads the \
         config of its own pods only"
    )]
    NoSuchPod { namespace: String, pod: String },
    #[error(
        "pod {namespace}/{pod} runs under ServiceAccount {actual:?}, and the certificate names \
         {claimed:?}: a proxy reads only the config of the pod it runs in"
    )]
    OtherServiceAccount {
        namespace: String,
        pod: String,
        actual: String,
        claimed: String,
    },
    #[error("pod {namespace}/{pod} has finished")]
    Finished { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} has no IP yet; retry once it has one")]
    NoPodIp { namespace: String, pod: String },
    #[error(
        "pod {namespace}/{pod} has IPs {ips:?} and this connection comes from {from}: a proxy \
         reads only the config of the pod it runs in"
    )]
    OtherAddress {
        namespace: String,
        pod: String,
        ips: Vec<IpAddr>,
        from: IpAddr,
    },
    #[error("pod {namespace}/{pod} could not be read: {error}")]
    Unavailable {
        namespace: String,
        pod: String,
        error: String,
    },
    #[error("too many config streams whose pod had to be read; retry in {retry_after:?}")]
    Throttled { retry_after: Duration },
}

impl Refusal {
    /// 503 or 429 for what passes on its own (the proxy retries anyway), 403 for the rest.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoPodIp { .. } | Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// The `outcome` label of the operator's `config_streams` counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoPodName => "no_pod_name",
            Self::NoSourceAddress => "no_source_address",
            Self::NoSuchPod { .. } => "no_such_pod",
            Self::OtherServiceAccount { .. } => "other_service_account",
            Self::Finished { .. } => "pod_finished",
            Self::NoPodIp { .. } => "no_pod_ip",
            Self::OtherAddress { .. } => "other_address",
            Self::Unavailable { .. } => "unavailable",
            Self::Throttled { .. } => "throttled",
        }
    }
}

/// The pod `claim` names, once it is the claimant's own: confirmed by `cached` (the discovery
/// cache's copy) when it can, else by a fresh read through `client` within `reads`.
pub async fn authorize(
    client: &Client,
    reads: &RateLimiter,
    cached: Option<Arc<Pod>>,
    claim: Claim<'_>,
) -> Result<Arc<Pod>, Refusal> {
    // What no read of the pod can change is refused at once.
    match (cached, check(claim, None)) {
        (_, Err(refusal @ (Refusal::NoPodName | Refusal::NoSourceAddress))) => return Err(refusal),
        (Some(pod), _) if check(claim, Some(&pod)).is_ok() => return Ok(pod),
        _ => {}
    }
    reads
        .try_acquire(claim.source)
        .map_err(|retry_after| Refusal::Throttled { retry_after })?;
    let namespace = &claim.identity.namespace;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(claim.pod_name)
        .await
        .map_err(|e| Refusal::Unavailable {
            namespace: namespace.clone(),
            pod: claim.pod_name.to_owned(),
            error: e.to_string(),
        })?
        .ok_or_else(|| Refusal::NoSuchPod {
            namespace: namespace.clone(),
            pod: claim.pod_name.to_owned(),
        })?;
    check(claim, Some(&pod))?;
    Ok(Arc::new(pod))
}

/// Whether `pod` (the pod `claim` names, if it exists) is the claimant's own. Pure.
pub fn check(claim: Claim<'_>, pod: Option<&Pod>) -> Result<(), Refusal> {
    let namespace = claim.identity.namespace.clone();
    let name = claim.pod_name.to_owned();
    if name.is_empty() {
        return Err(Refusal::NoPodName);
    }
    let Some(source) = claim.source.map(|ip| ip.to_canonical()) else {
        return Err(Refusal::NoSourceAddress);
    };
    let Some(pod) = pod.filter(|pod| {
        pod.metadata.namespace.as_deref() == Some(namespace.as_str())
            && pod.metadata.name.as_deref() == Some(name.as_str())
    }) else {
        return Err(Refusal::NoSuchPod {
            namespace,
            pod: name,
        });
    };
    let actual = service_account(pod);
    if actual != claim.identity.service_account {
        return Err(Refusal::OtherServiceAccount {
            namespace,
            pod: name,
            actual: actual.to_owned(),
            claimed: claim.identity.service_account.clone(),
        });
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        // Its IP is free to be given to another pod.
        return Err(Refusal::Finished {
            namespace,
            pod: name,
        });
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return Err(Refusal::NoPodIp {
            namespace,
            pod: name,
        });
    }
    if !ips.contains(&source) {
        return Err(Refusal::OtherAddress {
            namespace,
            pod: name,
            ips,
            from: source,
        });
    }
    Ok(())
}

/// The ServiceAccount a pod runs under (`default` when the spec names none, as Kubernetes
/// assigns it).
fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|spec| {
            spec.service_account_name
                .as_deref()
                .or(spec.service_account.as_deref())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or("default")
}

/// The pod's IPs (`status.podIPs` and `status.podIP`), without duplicates; empty until it has
/// one.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::controller::fixtures;

    const POD_PATH: &str = "/api/v1/namespaces/demo/pods/web-1";

    /// Fresh reads without a practical limit, for the tests that are not about the limit.
    fn reads() -> RateLimiter {
        let plenty = crate::rate_limit::Rate {
            per_second: 1000.0,
            burst: 1000,
        };
        RateLimiter::new(plenty, plenty)
    }

    fn identity(service_account: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", service_account)
    }

    fn claim<'a>(identity: &'a SpiffeId, pod_name: &'a str, source: &str) -> Claim<'a> {
        Claim {
            identity,
            pod_name,
            source: Some(source.parse().unwrap()),
        }
    }

    /// Pod `demo/<name>` (uid `<uid>`) under `service_account` with `ips`, running.
    fn pod_json(name: &str, uid: &str, service_account: &str, ips: &[&str]) -> Value {
        let mut status = json!({"phase": "Running"});
        if let Some(first) = ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = ips.iter().map(|ip| json!({"ip": ip})).collect();
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "uid": uid},
            "spec": {"serviceAccountName": service_account, "containers": [{"name": "app"}]},
            "status": status,
        })
    }

    fn pod(name: &str, service_account: &str, ips: &[&str]) -> Pod {
        serde_json::from_value(pod_json(name, "uid-1", service_account, ips)).unwrap()
    }

    #[test]
    fn only_the_proxy_inside_the_named_pod_reads_its_config() {
        let web = identity("web");
        let own = pod("web-1", "web", &["10.0.0.5"]);
        let other_service_account = pod("web-1", "db", &["10.0.0.5"]);
        let mut finished = own.clone();
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut unnamed_account = own.clone();
        unnamed_account.spec.as_mut().unwrap().service_account_name = None;
        let dual_stack = pod("web-1", "web", &["10.0.0.5", "fd00::5"]);
        let table: [(&str, Claim<'_>, Option<&Pod>, Option<&str>); 11] = [
            (
                "its own pod",
                claim(&web, "web-1", "10.0.0.5"),
                Some(&own),
                None,
            ),
            (
                "an IPv4-mapped source is the IPv4 address",
                claim(&web, "web-1", "::ffff:10.0.0.5"),
                Some(&own),
                None,
            ),
            (
                "a dual-stack pod's IPv6 address",
                claim(&web, "web-1", "fd00::5"),
                Some(&dual_stack),
                None,
            ),
            (
                "another pod of the same ServiceAccount",
                claim(&web, "web-1", "10.0.0.9"),
                Some(&own),
                Some("other_address"),
            ),
            (
                "a pod of another ServiceAccount, even from its address",
                claim(&web, "web-1", "10.0.0.5"),
                Some(&other_service_account),
                Some("other_service_account"),
            ),
            (
                "a pod that names no ServiceAccount runs under default",
                claim(&web, "web-1", "10.0.0.5"),
                Some(&unnamed_account),
                Some("other_service_account"),
            ),
            (
                "no such pod",
                claim(&web, "web-1", "10.0.0.5"),
                None,
                Some("no_such_pod"),
            ),
            (
                "a finished pod's address may be another pod's now",
                claim(&web, "web-1", "10.0.0.5"),
                Some(&finished),
                Some("pod_finished"),
            ),
            (
                "a pod without an IP yet",
                claim(&web, "web-1", "10.0.0.5"),
                Some(&pod("web-1", "web", &[])),
                Some("no_pod_ip"),
            ),
            (
                "no pod name",
                claim(&web, "", "10.0.0.5"),
                Some(&own),
                Some("no_pod_name"),
            ),
            (
                "a pod of another name",
                claim(&web, "web-2", "10.0.0.5"),
                Some(&own),
                Some("no_such_pod"),
            ),
        ];
        for (case, claim, pod, expected) in table {
            let verdict = check(claim, pod);
            assert_eq!(
                verdict.as_ref().err().map(Refusal::metric_label),
                expected,
                "{case}: {verdict:?}"
            );
        }
        let unknown_source = Claim {
            source: None,
            ..claim(&web, "web-1", "10.0.0.5")
        };
        assert_eq!(
            check(unknown_source, Some(&own)),
            Err(Refusal::NoSourceAddress)
        );
    }

    #[test]
    fn a_host_network_pod_is_recognised_by_its_node_address() {
        let mut agent = pod("web-1", "web", &["192.168.1.20"]);
        agent.spec.as_mut().unwrap().host_network = Some(true);
        let web = identity("web");
        assert_eq!(
            check(claim(&web, "web-1", "192.168.1.20"), Some(&agent)),
            Ok(())
        );
        assert!(check(claim(&web, "web-1", "192.168.1.21"), Some(&agent)).is_err());
    }

    #[test]
    fn refusals_are_forbidden_unless_they_pass_on_their_own() {
        let named = |pod: &str| (String::from("demo"), pod.to_owned());
        let (namespace, pod) = named("web-1");
        let other_address = Refusal::OtherAddress {
            namespace: namespace.clone(),
            pod: pod.clone(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            from: "10.0.0.9".parse().unwrap(),
        };
        assert_eq!(other_address.status(), StatusCode::FORBIDDEN);
        let message = other_address.to_string();
        assert!(
            message.contains("10.0.0.9") && message.contains("demo/web-1"),
            "{message}"
        );
        let no_ip = Refusal::NoPodIp { namespace, pod };
        assert_eq!(no_ip.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn the_cache_confirms_without_asking_the_api_server() {
        let (client, api) = fixtures::client();
        let web = identity("web");
        let cached = Arc::new(pod("web-1", "web", &["10.0.0.5"]));
        let pod = authorize(
            &client,
            &reads(),
            Some(cached.clone()),
            claim(&web, "web-1", "10.0.0.5"),
        )
        .await
        .unwrap();
        assert!(Arc::ptr_eq(&pod, &cached));
        drop(client);
        api.done().await;
    }

    #[tokio::test]
    async fn what_the_cache_cannot_confirm_is_read_fresh() {
        let web = identity("web");
        // Not in the cache yet, then a pod recreated under the same name with a new IP and uid.
        let recreated = Arc::new(pod("web-1", "web", &["10.0.0.4"]));
        for cached in [None, Some(recreated)] {
            let (client, mut api) = fixtures::client();
            let (pod, ()) = fixtures::run(
                authorize(&client, &reads(), cached, claim(&web, "web-1", "10.0.0.5")),
                async {
                    api.expect(Method::GET, POD_PATH).await.respond(
                        StatusCode::OK,
                        &pod_json("web-1", "uid-2", "web", &["10.0.0.5"]),
                    );
                },
            )
            .await;
            assert_eq!(pod.unwrap().metadata.uid.as_deref(), Some("uid-2"));
            drop(client);
            api.done().await;
        }
    }

    #[tokio::test]
    async fn a_refusal_is_decided_on_a_fresh_read() {
        let web = identity("web");
        let scenarios = [
            (
                "another ServiceAccount's pod",
                StatusCode::OK,
                pod_json("web-1", "uid-1", "db", &["10.0.0.5"]),
                "other_service_account",
            ),
            (
                "another pod of the same ServiceAccount",
                StatusCode::OK,
                pod_json("web-1", "uid-1", "web", &["10.0.0.9"]),
                "other_address",
            ),
            (
                "a pod without an IP yet",
                StatusCode::OK,
                pod_json("web-1", "uid-1", "web", &[]),
                "no_pod_ip",
            ),
            (
                "no such pod",
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": "not found"}),
                "no_such_pod",
            ),
            (
                "the API server fails",
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "InternalError", "code": 500, "message": "etcd is down"}),
                "unavailable",
            ),
        ];
        for (case, status, answer, expected) in scenarios {
            let (client, mut api) = fixtures::client();
            // The cache refuses too: it could be stale, so it is never the last word.
            let cached = serde_json::from_value::<Pod>(answer.clone())
                .ok()
                .map(Arc::new);
            let (verdict, ()) = fixtures::run(
                authorize(&client, &reads(), cached, claim(&web, "web-1", "10.0.0.5")),
                async {
                    api.expect(Method::GET, POD_PATH)
                        .await
                        .respond(status, &answer);
                },
            )
            .await;
            let refusal = verdict.expect_err(case);
            assert_eq!(refusal.metric_label(), expected, "{case}: {refusal}");
            drop(client);
            api.done().await;
        }
    }

    #[tokio::test]
    async fn fresh_reads_are_bounded_per_source() {
        let one_per_source = RateLimiter::new(
            crate::rate_limit::Rate {
                per_second: 1000.0,
                burst: 1000,
            },
            crate::rate_limit::Rate {
                per_second: 0.001,
                burst: 1,
            },
        );
        let (client, mut api) = fixtures::client();
        let web = identity("web");
        let (first, ()) = fixtures::run(
            authorize(
                &client,
                &one_per_source,
                None,
                claim(&web, "web-1", "10.0.0.9"),
            ),
            async {
                api.expect(Method::GET, POD_PATH).await.respond(
                    StatusCode::OK,
                    &pod_json("web-1", "uid-1", "web", &["10.0.0.5"]),
                );
            },
        )
        .await;
        assert_eq!(first.unwrap_err().metric_label(), "other_address");
        // The same source again: refused before any read.
        let second = authorize(
            &client,
            &one_per_source,
            None,
            claim(&web, "web-1", "10.0.0.9"),
        )
        .await
        .unwrap_err();
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS, "{second}");
        // A proxy the cache confirms is never throttled.
        let cached = Arc::new(pod("web-2", "web", &["10.0.0.9"]));
        assert!(
            authorize(
                &client,
                &one_per_source,
                Some(cached),
                claim(&web, "web-2", "10.0.0.9")
            )
            .await
            .is_ok()
        );
        drop(client);
        api.done().await;
    }

    #[tokio::test]
    async fn a_stream_naming_no_pod_is_refused_without_a_read() {
        let (client, api) = fixtures::client();
        let web = identity("web");
        let refusal = authorize(&client, &reads(), None, claim(&web, "", "10.0.0.5"))
            .await
            .unwrap_err();
        assert_eq!(refusal, Refusal::NoPodName);
        assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
        drop(client);
        api.done().await;
    }
}
