//! Trellis API: the `Mesh` custom resource, the Istio-compatible resources (`PeerAuthentication`,
//! `AuthorizationPolicy`, `VirtualService`, `DestinationRule`, `ServiceEntry`),
//! the compiled proxy configuration that the control plane streams to proxies, SPIFFE identities
//! and the well-known ports, labels and annotations.
//!
//! Plain data and validation only: no runtime, no Kubernetes client. Every other crate depends on
//! this one, so the operator, the proxy and the CLI agree on names and wire formats.

pub mod authz;
pub mod config;
pub mod identity;
pub mod mesh;
pub mod networking;
pub mod protocol;
pub mod schema;
pub mod security;
pub mod traffic;
pub mod validate;
pub mod wellknown;

pub use identity::SpiffeId;
pub use mesh::{Mesh, MeshSpec, MeshStatus};
pub use security::{
    AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, PeerAuthenticationSpec,
};
