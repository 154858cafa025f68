//! What the Mesh controller shares: its [`Context`] (client, recorder, metrics, connected
//! proxies) and the [`MeshState`] the active Mesh resolves to, published on a watch channel to
//! the CA endpoint, the injector and discovery.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;
use trellis_api::mesh::MeshSpec;
use trellis_config::wellknown::OPERATOR_NAME;

use crate::ca::CertificateAuthority;
use crate::metrics::Metrics;
use crate::proxies::ConnectedProxies;
use crate::rotation::{ProxyCertificates, Rotation};

/// What the active Mesh resolves to; read by the CA endpoint, injector and discovery.
#[derive(Debug)]
pub struct MeshState {
    pub spec: MeshSpec,
    pub ca: CertificateAuthority,
    pub workload_ttl: Duration,
    /// The root rotation the CA is in (or last completed); `None` for a user CA.
    pub root_rotation: Option<Rotation>,
}

pub type MeshStateRx = watch::Receiver<Option<Arc<MeshState>>>;

/// Shared inputs of the reconcile loop.
pub struct Context {
    pub client: Client,
    pub namespace: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub mesh_state: watch::Sender<Option<Arc<MeshState>>>,
    pub proxies: Arc<ConnectedProxies>,
    /// Certificates presented on this replica's config streams: root rotation's progress.
    pub proxy_certificates: Arc<ProxyCertificates>,
}

impl Context {
    pub fn new(
        client: Client,
        namespace: String,
        pod_name: String,
        metrics: Arc<Metrics>,
        proxies: Arc<ConnectedProxies>,
    ) -> (Arc<Self>, MeshStateRx) {
        let (mesh_state, rx) = watch::channel(None);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: OPERATOR_NAME.to_owned(),
                instance: Some(pod_name),
            },
        );
        let context = Self {
            client,
            namespace,
            recorder,
            metrics,
            mesh_state,
            proxies,
            proxy_certificates: Arc::default(),
        };
        (Arc::new(context), rx)
    }
}
