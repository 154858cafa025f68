//! Istio's semantics that more than one part of Trellis must read the same way: the admission
//! rules (`crate::validate`, run by the operator's webhook and by `trellisctl validate`), the
//! operator's traffic compiler, the `Mesh` resource and the demo apps. One definition each, so
//! that what the webhook admits is exactly what the compiler compiles:
//! - [`duration`]: duration strings as Istio's webhook decodes them, and its per-field minimums;
//! - [`host`]: short names qualified to FQDNs, wildcard hosts and how they match;
//! - [`export_to`]: the `exportTo` visibility list;
//! - [`CLUSTER_DOMAIN`]: the one place the cluster domain is written.

pub mod duration;
pub mod export_to;
pub mod host;

/// Kubernetes' cluster domain. Istio appends `svc.<domain>` to short service names (its
/// `--domain`, default `cluster.local`); Trellis supports only the default, so it is a constant
/// rather than a setting.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
