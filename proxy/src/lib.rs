//! `trellis-proxy`: the Trellis data plane, run as a sidecar beside every meshed workload.
//!
//! This crate owns everything that happens inside the proxy process: the capture listeners that
//! iptables redirects the pod's traffic to (outbound 15001, inbound 15006), endpoint choice and
//! the opaque TCP forwarding behind them, and mutual TLS between sidecars; the workload identity
//! (key, CSR, certificate rotation against the control plane's CA); the config stream from the
//! control plane (or a static `--config` file); Istio-compatible Prometheus telemetry; the
//! readiness and admin endpoints; and graceful drain. It does not own the capture rules
//! (`trellis-init` / `trellis-cni`) nor the config model and wire format (`trellis-config`).
//!
//! Modules follow the request's path: [`inbound`] and [`outbound`] (each listener with its TCP
//! and [`inbound::http`] / [`outbound::http`] paths), [`http`] (what both HTTP paths share),
//! [`route`] (the pure routing decisions), [`upstream`] (cluster runtime state: endpoint choice,
//! outlier ejection, DNS) and [`tls`] (mesh mutual TLS, TLS origination).

pub(crate) mod admin;
pub(crate) mod app_probe;
pub mod authn;
pub mod authz;
pub(crate) mod capture;
pub mod cli;
pub(crate) mod config_file;
pub mod control_plane;
pub(crate) mod destination;
pub(crate) mod drain;
pub(crate) mod ext_authz;
pub(crate) mod forward;
pub(crate) mod host;
pub(crate) mod http;
pub(crate) mod http_server;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod limits;
pub mod logging;
pub mod metrics;
pub(crate) mod orig_dst;
pub(crate) mod outbound;
pub mod path;
pub(crate) mod readiness;
pub(crate) mod route;
pub mod sidecar;
pub mod sniff;
pub(crate) mod state;
pub mod tls;
pub mod upstream;
pub mod wait_ready;
