//! The plugin's commands: ADD and CHECK decide from the pod whether to capture, DEL cleans up
//! best-effort. The outside world (API server, iptables) is behind [`Host`], so every branch is
//! driven by tests without either.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use trellis_init::{
    CapturePlan, ExecError, Executor as _, IpFamily, Ipv6Mode, SystemExecutor, apply, cleanup,
};

use crate::lookup::{self, LookupError};
use crate::pod::{self, Decision};
use crate::protocol::{
    self, CniError, Deletion, Environment, Invocation, PodRef, Rejection, Request, code,
};

/// The plugin's effects on the world.
pub trait Host {
    fn fetch_pod(&self, kubeconfig: &Path, pod: &PodRef) -> Result<Pod, LookupError>;
    /// How the namespace's IPv6 must be handled, from the addresses the previous plugins gave it.
    fn ipv6_mode(&self, netns: &Path) -> Result<Ipv6Mode, ExecError>;
    /// Makes the namespace's tables hold `plan`.
    fn apply_capture(&self, netns: &Path, plan: &CapturePlan) -> Result<(), ExecError>;
    /// Chains of `plan` absent from the namespace's tables.
    fn missing_chains(&self, netns: &Path, plan: &CapturePlan) -> Result<Vec<String>, ExecError>;
    /// Removes our chains from the namespace, both families.
    fn remove_capture(&self, netns: &Path) -> Result<(), ExecError>;
}

/// The real host: the API server through kube-rs, iptables through `nsenter` into the namespace.
#[derive(Debug, Default)]
pub struct SystemHost;

impl Host for SystemHost {
    fn fetch_pod(&self, kubeconfig: &Path, pod: &PodRef) -> Result<Pod, LookupError> {
        lookup::fetch_pod(kubeconfig, pod, lookup::LOOKUP_DEADLINE)
    }

    fn ipv6_mode(&self, netns: &Path) -> Result<Ipv6Mode, ExecError> {
        SystemExecutor::detect_in_netns(netns).ipv6_mode()
    }

    fn apply_capture(&self, netns: &Path, plan: &CapturePlan) -> Result<(), ExecError> {
        apply(&SystemExecutor::detect_in_netns(netns), plan)
    }

    fn missing_chains(&self, netns: &Path, plan: &CapturePlan) -> Result<Vec<String>, ExecError> {
        let executor = SystemExecutor::detect_in_netns(netns);
        let mut missing = Vec::new();
        for family_plan in plan.families() {
            let saved = executor.save(family_plan.family())?;
            missing.extend(
                declared_chains(&family_plan.render())
                    .filter(|chain| !declared_chains(&saved).any(|have| have == *chain))
                    .map(str::to_owned),
            );
        }
        Ok(missing)
    }

    fn remove_capture(&self, netns: &Path) -> Result<(), ExecError> {
        let executor = SystemExecutor::detect_in_netns(netns);
        // Each family on its own: a node without ip6tables must not keep the IPv4 rules.
        let results = [IpFamily::V4, IpFamily::V6].map(|family| cleanup(&executor, &[family]));
        results.into_iter().collect()
    }
}

/// Chain names declared (`:NAME POLICY [counters]`) in restore or save text.
fn declared_chains(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|line| line.split_whitespace().next())
}

/// What to print on stdout: nothing, or one JSON document.
pub type Answer = Option<Value>;

/// Handles one request, from the environment and stdin to the answer or the error to print.
pub fn handle(env: &Environment, stdin: &[u8], host: &dyn Host) -> Result<Answer, Rejection> {
    match protocol::parse_request(env, stdin)? {
        Request::Version { requested } => Ok(Some(protocol::version_info(requested.as_deref()))),
        Request::Add(invocation) => {
            let reject = |error| Rejection {
                error,
                cni_version: invocation.config.cni_version.clone(),
            };
            match decide(&invocation, host).map_err(reject)? {
                Some(plan) => {
                    host.apply_capture(&invocation.netns, &plan).map_err(|e| {
                        reject(
                            CniError::new(code::CAPTURE_FAILED, "installing capture rules failed")
                                .with_details(e.to_string()),
                        )
                    })?;
                    tracing::info!(container = %invocation.container_id, "capture installed");
                }
                None => tracing::debug!("prevResult passed through"),
            }
            Ok(Some(invocation.prev_result))
        }
        Request::Check(invocation) => {
            let reject = |error| Rejection {
                error,
                cni_version: invocation.config.cni_version.clone(),
            };
            if let Some(plan) = decide(&invocation, host).map_err(reject)? {
                let missing = host.missing_chains(&invocation.netns, &plan).map_err(|e| {
                    reject(
                        CniError::new(code::CAPTURE_FAILED, "reading capture rules failed")
                            .with_details(e.to_string()),
                    )
                })?;
                if !missing.is_empty() {
                    return Err(reject(CniError::new(
                        code::CAPTURE_MISSING,
                        format!("capture chains missing: {}", missing.join(", ")),
                    )));
                }
            }
            Ok(None)
        }
        Request::Del(deletion) => {
            delete(&deletion, host);
            Ok(None)
        }
    }
}

/// The plan for an ADD or CHECK, or `None` when the pod is not ours to capture.
fn decide(invocation: &Invocation, host: &dyn Host) -> Result<Option<CapturePlan>, CniError> {
    let Some(pod_ref) = &invocation.pod else {
        tracing::info!("no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS: not a Kubernetes pod");
        return Ok(None);
    };
    let span = tracing::info_span!("pod", namespace = %pod_ref.namespace, name = %pod_ref.name);
    let _entered = span.enter();
    if is_excluded(&invocation.config.exclude_namespaces, pod_ref) {
        tracing::debug!("namespace excluded");
        return Ok(None);
    }
    let Some(kubeconfig) = &invocation.config.kubeconfig else {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "no kubeconfig in the network configuration: pods cannot be looked up",
        ));
    };
    let pod = host
        .fetch_pod(kubeconfig, pod_ref)
        .map_err(|error| match error {
            LookupError::Kubeconfig { .. } => {
                CniError::new(code::INVALID_NETWORK_CONFIG, error.to_string())
            }
            // Failing closed: a pod started without its capture would bypass the mesh's policy.
            LookupError::Api { .. } => CniError::new(code::TRY_AGAIN_LATER, error.to_string()),
        })?;
    let mut config = match pod::decide(&pod) {
        Ok(Decision::Capture(config)) => config,
        Ok(Decision::Skip(reason)) => {
            tracing::info!(reason, "not capturing");
            return Ok(None);
        }
        Err(error) => {
            return Err(CniError::new(
                code::INVALID_CAPTURE_ANNOTATION,
                format!("pod {}/{}: {error}", pod_ref.namespace, pod_ref.name),
            ));
        }
    };
    if !invocation.netns.exists() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_NETNS {} does not exist", invocation.netns.display()),
        ));
    }
    // The pod's addresses, not its spec, say whether it has IPv6: the plugins before us have
    // just assigned them.
    config.ipv6 = host.ipv6_mode(&invocation.netns).map_err(|e| {
        CniError::new(code::CAPTURE_FAILED, "reading the pod's addresses failed")
            .with_details(e.to_string())
    })?;
    tracing::info!(?config, "capturing");
    CapturePlan::new(&config)
        .map(Some)
        .map_err(|error| CniError::new(code::INVALID_CAPTURE_ANNOTATION, error.to_string()))
}

fn is_excluded(excluded: &[String], pod: &PodRef) -> bool {
    excluded.contains(&pod.namespace)
}

/// Best-effort removal of our chains. Never fails: the namespace is about to be destroyed with
/// everything in it, so nothing depends on this, while an error would block the pod's deletion.
fn delete(deletion: &Deletion, host: &dyn Host) {
    for problem in &deletion.problems {
        tracing::warn!(%problem, "DEL request partly unusable; cleaning up what it names");
    }
    let excluded = deletion.config.as_ref().map_or_else(
        || {
            protocol::DEFAULT_EXCLUDED_NAMESPACES
                .map(str::to_owned)
                .to_vec()
        },
        |config| config.exclude_namespaces.clone(),
    );
    if deletion
        .pod
        .as_ref()
        .is_some_and(|pod| is_excluded(&excluded, pod))
    {
        return;
    }
    match &deletion.netns {
        Some(netns) if netns.exists() => match host.remove_capture(netns) {
            Ok(()) => tracing::debug!(netns = %netns.display(), "capture rules removed"),
            Err(error) => tracing::warn!(%error, "removing capture rules failed; ignored"),
        },
        Some(netns) => tracing::info!(netns = %netns.display(), "netns already gone"),
        None => tracing::info!("no CNI_NETNS: nothing to clean up"),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use serde_json::json;

    use super::*;

    /// Answers lookups from a fixed pod (or error) and records what the plugin asked of it.
    #[derive(Default)]
    struct FakeHost {
        pod: Option<Value>,
        api_down: bool,
        ipv6: Ipv6Mode,
        missing: Vec<String>,
        calls: RefCell<Vec<String>>,
    }

    impl Host for FakeHost {
        fn fetch_pod(&self, _kubeconfig: &Path, pod: &PodRef) -> Result<Pod, LookupError> {
            self.calls.borrow_mut().push(format!("fetch {}", pod.name));
            if self.api_down {
                return Err(LookupError::Api {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    reason: "connection refused".into(),
                });
            }
            Ok(serde_json::from_value(self.pod.clone().expect("pod to serve")).unwrap())
        }

        fn ipv6_mode(&self, _netns: &Path) -> Result<Ipv6Mode, ExecError> {
            Ok(self.ipv6)
        }

        fn apply_capture(&self, netns: &Path, plan: &CapturePlan) -> Result<(), ExecError> {
            let ipv6 = if plan.captures_ipv6() {
                "capturing"
            } else {
                "rejecting"
            };
            self.calls.borrow_mut().push(format!(
                "apply {} {} families, {ipv6} IPv6",
                netns.display(),
                plan.families().len()
            ));
            Ok(())
        }

        fn missing_chains(&self, _: &Path, _: &CapturePlan) -> Result<Vec<String>, ExecError> {
            self.calls.borrow_mut().push("check".into());
            Ok(self.missing.clone())
        }

        fn remove_capture(&self, netns: &Path) -> Result<(), ExecError> {
            self.calls
                .borrow_mut()
                .push(format!("remove {}", netns.display()));
            Ok(())
        }
    }

    fn injected_pod() -> Value {
        json!({
            "metadata": {
                "name": "cart", "namespace": "shop",
                "annotations": {"trellis.dev/status": r#"{"version":"1","interception":"cni"}"#}
            },
            "spec": {"containers": [{"name": "app"}]}
        })
    }

    fn prev_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}],
            "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    fn stdin() -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "trellis-cni",
            "kubeconfig": "/etc/cni/net.d/trellis-cni.kubeconfig",
            "prevResult": prev_result(),
        }))
        .unwrap()
    }

    /// An existing path standing in for a namespace file; the fake host never opens it.
    fn existing_netns() -> String {
        std::env::temp_dir().display().to_string()
    }

    fn env(command: &str, namespace: &str, netns: &str) -> Environment {
        Environment {
            command: Some(command.into()),
            container_id: Some("c1".into()),
            netns: Some(netns.into()),
            ifname: Some("eth0".into()),
            args: Some(format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=cart")),
        }
    }

    #[test]
    fn add_captures_an_injected_pod_and_echoes_prev_result() {
        let host = FakeHost {
            pod: Some(injected_pod()),
            ..FakeHost::default()
        };
        let netns = existing_netns();
        let answer = handle(&env("ADD", "shop", &netns), &stdin(), &host).unwrap();
        assert_eq!(answer, Some(prev_result()));
        assert_eq!(
            *host.calls.borrow(),
            [
                "fetch cart".to_owned(),
                format!("apply {netns} 2 families, rejecting IPv6")
            ]
        );
    }

    #[test]
    fn add_captures_ipv6_where_the_namespace_has_ipv6_addresses() {
        let host = FakeHost {
            pod: Some(injected_pod()),
            ipv6: Ipv6Mode::Capture,
            ..FakeHost::default()
        };
        let netns = existing_netns();
        handle(&env("ADD", "shop", &netns), &stdin(), &host).unwrap();
        assert_eq!(
            host.calls.borrow().last(),
            Some(&format!("apply {netns} 2 families, capturing IPv6"))
        );
    }

    #[test]
    fn add_skips_without_touching_the_namespace() {
        let plain = FakeHost {
            pod: Some(json!({"metadata": {"name": "cart"}, "spec": {"containers": []}})),
            ..FakeHost::default()
        };
        let answer = handle(&env("ADD", "shop", &existing_netns()), &stdin(), &plain).unwrap();
        assert_eq!(answer, Some(prev_result()));
        assert_eq!(*plain.calls.borrow(), ["fetch cart"]);

        let excluded = FakeHost::default();
        let answer = handle(
            &env("ADD", "kube-system", &existing_netns()),
            &stdin(),
            &excluded,
        )
        .unwrap();
        assert_eq!(answer, Some(prev_result()));
        assert!(
            excluded.calls.borrow().is_empty(),
            "no lookup when excluded"
        );

        let mut not_kubernetes = env("ADD", "shop", &existing_netns());
        not_kubernetes.args = None;
        assert_eq!(
            handle(&not_kubernetes, &stdin(), &excluded).unwrap(),
            Some(prev_result())
        );
    }

    #[test]
    fn add_fails_closed() {
        let down = FakeHost {
            api_down: true,
            ..FakeHost::default()
        };
        let rejection =
            handle(&env("ADD", "shop", &existing_netns()), &stdin(), &down).unwrap_err();
        assert_eq!(rejection.error.code, code::TRY_AGAIN_LATER);
        assert!(rejection.error.msg.contains("shop/cart"), "{rejection:?}");

        let injected = FakeHost {
            pod: Some(injected_pod()),
            ..FakeHost::default()
        };
        let rejection = handle(
            &env("ADD", "shop", "/var/run/netns/trellis-cni-no-such-netns"),
            &stdin(),
            &injected,
        )
        .unwrap_err();
        assert_eq!(rejection.error.code, code::INVALID_ENVIRONMENT);

        let mut bad_annotation = injected_pod();
        bad_annotation["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
            json!("http");
        let host = FakeHost {
            pod: Some(bad_annotation),
            ..FakeHost::default()
        };
        let rejection =
            handle(&env("ADD", "shop", &existing_netns()), &stdin(), &host).unwrap_err();
        assert_eq!(rejection.error.code, code::INVALID_CAPTURE_ANNOTATION);
        assert!(!host.calls.borrow().iter().any(|c| c.starts_with("apply")));
    }

    #[test]
    fn check_prints_nothing_and_reports_missing_chains() {
        let healthy = FakeHost {
            pod: Some(injected_pod()),
            ..FakeHost::default()
        };
        assert_eq!(
            handle(&env("CHECK", "shop", &existing_netns()), &stdin(), &healthy),
            Ok(None)
        );
        let broken = FakeHost {
            pod: Some(injected_pod()),
            missing: vec!["TRELLIS_OUTPUT".into()],
            ..FakeHost::default()
        };
        let rejection =
            handle(&env("CHECK", "shop", &existing_netns()), &stdin(), &broken).unwrap_err();
        assert_eq!(rejection.error.code, code::CAPTURE_MISSING);
        assert!(rejection.error.msg.contains("TRELLIS_OUTPUT"));
    }

    #[test]
    fn del_of_unknown_container_succeeds_without_output() {
        let host = FakeHost {
            api_down: true,
            ..FakeHost::default()
        };
        let gone = env("DEL", "shop", "/var/run/netns/trellis-cni-no-such-netns");
        assert_eq!(handle(&gone, &stdin(), &host), Ok(None));
        assert_eq!(handle(&gone, b"", &host), Ok(None), "even with no config");
        let mut no_netns = gone.clone();
        no_netns.netns = None;
        no_netns.container_id = None;
        assert_eq!(handle(&no_netns, &stdin(), &host), Ok(None));
        assert!(host.calls.borrow().is_empty(), "{:?}", host.calls.borrow());

        let netns = existing_netns();
        assert_eq!(
            handle(&env("DEL", "shop", &netns), &stdin(), &host),
            Ok(None)
        );
        assert_eq!(*host.calls.borrow(), [format!("remove {netns}")]);
    }

    #[test]
    fn declared_chains_reads_save_output() {
        let saved =
            "*nat\n:PREROUTING ACCEPT [0:0]\n:TRELLIS_OUTPUT - [0:0]\n-A OUTPUT -j X\nCOMMIT\n";
        assert_eq!(
            declared_chains(saved).collect::<Vec<_>>(),
            ["PREROUTING", "TRELLIS_OUTPUT"]
        );
    }
}
