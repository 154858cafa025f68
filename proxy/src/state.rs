//! Inputs shared by every listener and task of the proxy, held in one `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use trellis_config::SpiffeId;
use trellis_config::proxy::ProxyConfig;

use crate::cli::SidecarArgs;
use crate::drain::Drain;
use crate::http::pool::Pool;
use crate::identity::Identity;
use crate::logging::LogControl;
use crate::metrics::{Metrics, TcpLabels, values};
use crate::tls::mtls::MeshTlsCache;
use crate::upstream::Upstreams;

/// The pod this proxy runs beside, as told by the injector through the environment.
#[derive(Clone, Debug)]
pub struct Workload {
    pub pod_name: String,
    pub namespace: String,
    pub service_account: String,
    pub name: String,
    pub trust_domain: String,
    /// The pod's labels (the source of its requests, for `sourceLabels` route matches).
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Workload {
    pub fn from_args(args: &SidecarArgs) -> Self {
        Self {
            pod_name: args.pod_name.clone(),
            namespace: args.pod_namespace.clone(),
            service_account: args.service_account.clone(),
            name: args
                .workload_name
                .clone()
                .unwrap_or_else(|| args.pod_name.clone()),
            trust_domain: args.trust_domain.clone(),
            labels: args.workload_labels.clone(),
        }
    }

    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

pub struct ProxyState {
    pub workload: Workload,
    /// The last good config; `None` until the first snapshot arrives.
    pub config: ArcSwapOption<ProxyConfig>,
    /// The current workload certificate; `None` until the first one is signed.
    pub identity: watch::Sender<Option<Arc<Identity>>>,
    /// Mutual TLS settings built from the current identity and trust bundle.
    pub mesh_tls: MeshTlsCache,
    /// Whether readiness waits for an identity and a config from the control plane.
    pub control_plane_mode: bool,
    pub listeners_bound: AtomicBool,
    pub metrics: Metrics,
    pub drain: Drain,
    pub log: LogControl,
    pub connect_timeout: Duration,
    /// Upstream HTTP connections, shared by every downstream connection.
    pub pool: Pool,
    /// The current config's RequestAuthentication rules with their keys parsed.
    pub authenticators: crate::authn::AuthenticatorCache,
    /// Per-cluster state: load balancing, circuit breakers, outlier detection. Kept in step
    /// with `config` by [`ProxyState::set_config`].
    pub upstreams: Arc<Upstreams>,
    /// Whether every HTTP request is logged as one JSON line on stdout.
    pub access_log: bool,
    /// Connections to the external authorizers of CUSTOM policies.
    pub ext_authz: crate::ext_authz::client::Clients,
    /// The label set of an outbound connection or request before its destination is known:
    /// `reporter="source"`, this workload as the source. Built once; requests copy it.
    pub outbound_labels: TcpLabels,
    /// The same for inbound: `reporter="destination"`, this workload as the destination.
    pub inbound_labels: TcpLabels,
}

impl ProxyState {
    pub fn new(args: &SidecarArgs, control_plane_mode: bool, log: LogControl) -> Self {
        let metrics = Metrics::new();
        let connect_timeout = Duration::from_secs(args.connect_timeout_seconds);
        let upstreams = Arc::new(Upstreams::new(metrics.upstream(), connect_timeout));
        let workload = Workload::from_args(args);
        let principal = workload.spiffe_id().to_string();
        let outbound_labels = TcpLabels {
            source_workload: workload.name.as_str().into(),
            source_workload_namespace: workload.namespace.as_str().into(),
            source_principal: principal.as_str().into(),
            ..TcpLabels::unknown("source")
        };
        let inbound_labels = TcpLabels {
            destination_workload: workload.name.as_str().into(),
            destination_workload_namespace: workload.namespace.as_str().into(),
            destination_principal: principal.as_str().into(),
            connection_security_policy: values::plaintext(),
            ..TcpLabels::unknown("destination")
        };
        Self {
            workload,
            outbound_labels,
            inbound_labels,
            config: ArcSwapOption::empty(),
            identity: watch::Sender::new(None),
            mesh_tls: MeshTlsCache::default(),
            control_plane_mode,
            listeners_bound: AtomicBool::new(false),
            metrics,
            drain: Drain::new(),
            log,
            connect_timeout: Duration::from_secs(args.connect_timeout_seconds),
            pool: Pool::default(),
            authenticators: Default::default(),
            upstreams,
            access_log: args.access_log,
            ext_authz: Default::default(),
        }
    }

    /// Installs a new config (static file or control-plane snapshot) and brings the
    /// per-cluster upstream state in step with it.
    pub fn set_config(&self, config: Arc<ProxyConfig>) {
        self.config.store(Some(config.clone()));
        self.upstreams.sync(&config);
    }

    /// The current config, or an empty one (pass-through everything) before the first snapshot.
    pub fn current_config(&self) -> Arc<ProxyConfig> {
        self.config.load_full().unwrap_or_default()
    }

    pub fn current_identity(&self) -> Option<Arc<Identity>> {
        self.identity.borrow().clone()
    }
}
