//! `trellis-cni`: the chained CNI plugin that installs a meshed pod's traffic capture from the
//! node, so injected pods need no NET_ADMIN `trellis-init` container, and the installer that puts
//! the plugin on the node.
//!
//! This crate owns the CNI side only: deciding from the Pod (as the injector annotated it)
//! whether and how to capture, and speaking the CNI protocol. The rules themselves are
//! `trellis-init`'s [`CapturePlan`](trellis_init::CapturePlan), applied with its
//! [`apply`](trellis_init::apply) inside the pod's namespace (`nsenter --net=$CNI_NETNS`), so
//! init-container and CNI interception can never disagree.
//!
//! # Protocol choices
//!
//! - Spec versions 0.4.0 and 1.0.0 ([`protocol::SUPPORTED_VERSIONS`]); the plugin is chained only.
//!   ADD prints `prevResult` unchanged (the runtime already converted it to the config's
//!   version) and fails with code 7 without one. CHECK prints nothing and fails with code 102 if
//!   a captured pod's chains are missing. VERSION never fails. GC and STATUS belong to 1.1.0,
//!   which is not declared, so they get code 1 (incompatible version).
//! - Error codes are the spec's: 1 incompatible version, 4 invalid environment variables
//!   (missing `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, malformed
//!   `CNI_ARGS`, a netns that does not exist), 6 stdin not JSON, 7 invalid network config, 11
//!   try again later (pod lookup failed); ours are 100 bad capture annotation, 101 iptables
//!   failed, 102 capture missing on CHECK. Errors go to stdout as the spec's error object with a
//!   non-zero exit; logs go to stderr and the config's `logFile`, never stdout.
//! - ADD fails closed: when the pod cannot be fetched within a few seconds it answers 11 so the
//!   runtime retries, because a pod started without capture would bypass the mesh. Pods in
//!   `excludeNamespaces` (default `kube-system`, `trellis-system`) are never looked up, so the
//!   cluster and the mesh come up even when the API server is unreachable.
//! - DEL never fails and prints nothing: whatever is missing or malformed, it removes our chains
//!   if the namespace still exists and otherwise just logs. The namespace is destroyed with its
//!   rules, so cleanup is a courtesy, and a failing DEL would block the pod's deletion.
//! - Network config keys besides the spec's: `kubeconfig` (path the pod lookup uses),
//!   `logFile`, `logLevel` (a `tracing` filter, default `info`), `excludeNamespaces`.

pub mod install;
pub mod lookup;
pub mod plugin;
pub mod pod;
pub mod protocol;
