//! Server-side apply of the objects the operator owns, all under one field manager.

use k8s_openapi::ClusterResourceScope;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;

/// Field manager name for server-side apply.
pub const MANAGER: &str = "trellis-operator";

/// Apply as [`MANAGER`], taking over fields another manager set: what the operator owns is
/// what the Mesh says, whoever edited it since.
pub fn params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Applies a cluster-scoped object the operator owns (the admission webhook configurations).
pub async fn cluster_scoped<K>(client: &Client, name: &str, object: &K) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let mut value = serde_json::to_value(object)?;
    // Apply needs both in the body; typed objects serialize without them.
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    Api::<K>::all(client.clone())
        .patch(name, &params(), &Patch::Apply(&value))
        .await?;
    Ok(())
}
