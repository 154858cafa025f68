//! Discovery: reflectors over Services, EndpointSlices, Pods, PeerAuthentications,
//! RequestAuthentications, AuthorizationPolicies, VirtualServices, DestinationRules and ServiceEntries (all namespaces),
//! and a change counter that the config streams wait on.
//! AuthorizationPolicies are also checked for what Trellis cannot enforce, which is reported as
//! Events (`crate::authorization::spawn_reporter`). EndpointSlices are read as
//! `discovery.k8s.io/v1` where the server has it and as `v1beta1` otherwise (Kubernetes < 1.21),
//! chosen by API discovery.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};
use trellis_api::networking::{DestinationRule, ServiceEntry, VirtualService};
use trellis_api::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

use crate::compile::ClusterState;
use crate::traffic::TrafficResources;

/// Read-only view of the cluster for compiling proxy config.
#[derive(Clone)]
pub struct Discovery {
    services: Store<Service>,
    endpoint_slices: Store<DynamicObject>,
    pods: Store<Pod>,
    peer_authentications: Store<PeerAuthentication>,
    request_authentications: Store<RequestAuthentication>,
    authorization_policies: Store<AuthorizationPolicy>,
    virtual_services: Store<VirtualService>,
    destination_rules: Store<DestinationRule>,
    service_entries: Store<ServiceEntry>,
    changes: watch::Receiver<u64>,
}

/// `discovery.k8s.io/v1` when served, else `v1beta1`.
pub async fn endpoint_slice_version(client: &Client) -> &'static str {
    match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => "v1",
        _ => "v1beta1",
    }
}

impl Discovery {
    /// Starts the reflectors; they run until the process ends.
    pub async fn start(client: Client) -> Self {
        let version = endpoint_slice_version(&client).await;
        info!(version, "reading EndpointSlices");
        let (changes_tx, changes) = watch::channel(0u64);
        let changes_tx = Arc::new(changes_tx);
        let services = spawn_reflector(Api::<Service>::all(client.clone()), (), changes_tx.clone());
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
            "endpointslices",
        );
        let endpoint_slices = spawn_reflector(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            resource,
            changes_tx.clone(),
        );
        let pods = spawn_reflector(Api::<Pod>::all(client.clone()), (), changes_tx.clone());
        let peer_authentications = spawn_reflector(
            Api::<PeerAuthentication>::all(client.clone()),
            (),
            changes_tx.clone(),
        );
        let request_authentications = spawn_reflector(
            Api::<RequestAuthentication>::all(client.clone()),
            (),
            changes_tx.clone(),
        );
        let authorization_policies = spawn_reflector(
            Api::<AuthorizationPolicy>::all(client.clone()),
            (),
            changes_tx.clone(),
        );
        let virtual_services = spawn_reflector(
            Api::<VirtualService>::all(client.clone()),
            (),
            changes_tx.clone(),
        );
        let destination_rules = spawn_reflector(
            Api::<DestinationRule>::all(client.clone()),
            (),
            changes_tx.clone(),
        );
        let service_entries =
            spawn_reflector(Api::<ServiceEntry>::all(client.clone()), (), changes_tx);
        crate::authorization::spawn_reporter(
            client,
            None,
            authorization_policies.clone(),
            changes.clone(),
        );
        Self {
            services,
            endpoint_slices,
            pods,
            peer_authentications,
            request_authentications,
            authorization_policies,
            virtual_services,
            destination_rules,
            service_entries,
            changes,
        }
    }

    /// Waits until every reflector has listed once. Await it from one task only: a store's
    /// readiness wakes a single waiter (kube-runtime's `DelayedInit` is a oneshot underneath).
    pub async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.endpoint_slices.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.peer_authentications.wait_until_ready().await;
        let _ = self.request_authentications.wait_until_ready().await;
        let _ = self.authorization_policies.wait_until_ready().await;
        let _ = self.virtual_services.wait_until_ready().await;
        let _ = self.destination_rules.wait_until_ready().await;
        let _ = self.service_entries.wait_until_ready().await;
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Every PeerAuthentication in the cluster (all namespaces).
    pub fn peer_authentications(&self) -> Vec<Arc<PeerAuthentication>> {
        self.peer_authentications.state()
    }

    /// Every RequestAuthentication in the cluster (all namespaces).
    pub fn request_authentications(&self) -> Vec<Arc<RequestAuthentication>> {
        self.request_authentications.state()
    }

    /// Every AuthorizationPolicy in the cluster (all namespaces).
    pub fn authorization_policies(&self) -> Vec<Arc<AuthorizationPolicy>> {
        self.authorization_policies.state()
    }

    /// Every VirtualService, DestinationRule and ServiceEntry in the cluster.
    pub fn traffic_resources(&self) -> TrafficResources {
        TrafficResources {
            virtual_services: owned(self.virtual_services.state()),
            destination_rules: owned(self.destination_rules.state()),
            service_entries: owned(self.service_entries.state()),
        }
    }

    pub fn snapshot(&self) -> ClusterState {
        ClusterState {
            services: owned(self.services.state()),
            endpoint_slices: self
                .endpoint_slices
                .state()
                .iter()
                .filter_map(|o| endpoint_slice_from_dynamic(o))
                .collect(),
            pods: owned(self.pods.state()),
        }
    }
}

fn owned<K: Clone>(objects: Vec<Arc<K>>) -> Vec<K> {
    objects.iter().map(|o| K::clone(o)).collect()
}

/// v1beta1 and v1 EndpointSlices share every field compile reads (addresses, conditions.ready,
/// targetRef, ports), so both decode into the v1 type.
fn endpoint_slice_from_dynamic(object: &DynamicObject) -> Option<EndpointSlice> {
    let mut value = object.data.clone();
    value["metadata"] = serde_json::to_value(&object.metadata).ok()?;
    match serde_json::from_value(value) {
        Ok(slice) => Some(slice),
        Err(e) => {
            warn!(error = %e, name = ?object.metadata.name, "skipping undecodable EndpointSlice");
            None
        }
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    changes: Arc<watch::Sender<u64>>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(drive(stream, changes));
    reader
}

async fn drive<S, T>(stream: S, changes: Arc<watch::Sender<u64>>)
where
    S: Stream<Item = Result<watcher::Event<T>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => {
                changes.send_modify(|n| *n += 1);
            }
            Err(e) => warn!(error = %e, "discovery watch error (retrying)"),
        }
    }
}
