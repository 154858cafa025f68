//! `trellis-operator`: the Trellis control plane. It reconciles the `Mesh` (CA, trust-bundle
//! ConfigMaps, injector webhook configuration, status), runs the certificate authority and the
//! config discovery stream on 15012, the sidecar injector and the validation of Istio's traffic
//! resources on 15017, and prints the install manifest generated from its own types.

pub(crate) mod apply;
pub(crate) mod authorization;
pub mod ca;
pub mod cni;
pub mod compile;
pub mod context;
pub mod control_plane;
pub mod controller;
pub mod discovery;
pub(crate) mod env;
pub(crate) mod error;
pub(crate) mod ext_authz;
pub mod https;
pub mod injector;
pub(crate) mod jwks;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub(crate) mod peer_authentication;
pub mod proxies;
pub mod rate_limit;
pub(crate) mod request_authentication;
pub mod rotation;
pub(crate) mod stream_access;
pub(crate) mod traffic;
pub mod validation;
pub mod webhook;
