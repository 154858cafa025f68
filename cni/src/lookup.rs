//! Fetching the pod being set up from the API server. The plugin lives for one request, so this
//! builds a current-thread runtime for the call alone and bounds it by a deadline: a runtime
//! waiting on a hung plugin holds up every pod on the node.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::protocol::PodRef;

/// Everything the lookup may take, retries included.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);
/// Per-request limits, so that one hung connection leaves time for a retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The kubeconfig cannot be used: an installation problem, not a transient one.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    /// The API server did not give us the pod in time.
    #[error("getting pod {namespace}/{name}: {reason}")]
    Api {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// GETs the pod through the kubeconfig at `kubeconfig`, retrying transient failures with a
/// doubling backoff until `deadline`.
pub fn fetch_pod(kubeconfig: &Path, pod: &PodRef, deadline: Duration) -> Result<Pod, LookupError> {
    let kubeconfig_error = |reason: String| LookupError::Kubeconfig {
        path: kubeconfig.display().to_string(),
        reason,
    };
    let api_error = |reason: String| LookupError::Api {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        reason,
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| kubeconfig_error(e.to_string()))?;
    // kube builds its TLS config from the process-default rustls provider, which is not chosen
    // for us when more than one is compiled in; the workspace standardises on ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| api_error(format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(|e| kubeconfig_error(e.to_string()))?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(REQUEST_TIMEOUT);
        config.write_timeout = Some(REQUEST_TIMEOUT);
        let client = Client::try_from(config).map_err(|e| kubeconfig_error(e.to_string()))?;
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        let mut last_error = String::from("deadline passed before the first attempt");
        let attempts = async {
            let mut backoff = FIRST_BACKOFF;
            let mut attempt = 0_u32;
            loop {
                attempt += 1;
                match pods.get(&pod.name).await {
                    Ok(found) => return Ok(found),
                    Err(error) if is_permanent(&error) => return Err(error.to_string()),
                    Err(error) => {
                        tracing::warn!(attempt, %error, "pod lookup failed, retrying");
                        last_error = error.to_string();
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        };
        match tokio::time::timeout(deadline, attempts).await {
            Ok(result) => result.map_err(api_error),
            Err(_) => Err(api_error(format!(
                "no answer within {deadline:?}; last error: {last_error}"
            ))),
        }
    })
}

/// Failures a retry cannot fix: the pod does not exist, or we may not read it.
fn is_permanent(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404))
}
