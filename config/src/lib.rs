//! Trellis config model: everything a proxy needs to know and nothing about Kubernetes. The
//! compiled proxy configuration the control plane streams ([`proxy`], with its [`traffic`],
//! [`authn`] and [`authz`] parts, CUSTOM policies' external authorizers in [`ext_authz`]), the control-plane wire format ([`protocol`]), SPIFFE identities
//! ([`identity`]), the listener limits ([`limits`]), the mesh-wide modes a config carries
//! ([`mesh`]), the well-known ports, labels and names ([`wellknown`]) and the version a
//! binary reports ([`version`]).
//!
//! Plain data and its validation only: no runtime and no Kubernetes client, so the proxy, the
//! init container and the CNI plugin link no Kubernetes types through it. The CRDs live in
//! `trellis-api`, which depends on this crate.

pub mod authn;
pub mod authz;
pub mod ext_authz;
pub mod identity;
pub mod limits;
pub mod mesh;
pub mod protocol;
pub mod proxy;
pub mod traffic;
pub mod version;
pub mod wellknown;

pub use identity::SpiffeId;
