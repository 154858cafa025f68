//! Trellis API: the `Mesh` custom resource and the Istio-compatible resources
//! (`PeerAuthentication`, `AuthorizationPolicy`, `VirtualService`, `DestinationRule`,
//! `ServiceEntry`) with their schemas and the admission rules the webhook and `trellisctl validate`
//! share.
//!
//! Plain data and validation only: no runtime and no Kubernetes client (the kube and k8s-openapi
//! dependencies are for the CRD derive and the object metadata types). What a proxy reads — the
//! compiled config, identities, well-known names — lives in the kube-free `trellis-config`.

#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;
pub mod istio;
pub mod mesh;
pub mod networking;
pub mod schema;
pub mod security;
pub mod validate;

pub use mesh::{Mesh, MeshSpec, MeshStatus};
pub use security::{
    AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, PeerAuthenticationSpec,
    RequestAuthentication, RequestAuthenticationSpec,
};
