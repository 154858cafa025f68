//! Ports, labels, annotations and names shared by the control plane, the injector and the proxy.
//! Istio's numbers are kept wherever Istio has one, so operators' habits carry over.

/// Uid and gid the proxy runs as; the capture rules exempt its own traffic by this owner.
pub const PROXY_UID: u32 = 1337;
pub const PROXY_GID: u32 = 1337;

/// Source address of the proxy's connections to its own application (Istio's inbound
/// passthrough source). The capture rules let exactly these loopback connections through, so a
/// forwarded inbound connection does not loop back into the proxy; it is not 127.0.0.1/`::1`, so
/// an application cannot mistake mesh traffic for a local client.
pub const INBOUND_PASSTHROUGH_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 counterpart of [`INBOUND_PASSTHROUGH_SOURCE_V4`]. IPv6 loopback holds only `::1`, so
/// the capture setup assigns `::6/128` to `lo` when it captures IPv6.
pub const INBOUND_PASSTHROUGH_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Admin endpoint (`/ready`, `/config_dump`, `/quitquitquit`), bound to 127.0.0.1 only.
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
/// Discovery and CA endpoint of the operator (HTTP/2 over TLS).
pub const CONTROL_PLANE_PORT: u16 = 15012;
pub const WEBHOOK_PORT: u16 = 15017;

pub const MESH_GROUP: &str = "trellis.dev";
pub const INJECT_LABEL: &str = "trellis.dev/inject";
pub const ISTIO_INJECTION_LABEL: &str = "istio-injection";
pub const ISTIO_INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";

/// Audience of the projected ServiceAccount token a proxy presents to the CA.
pub const TOKEN_AUDIENCE: &str = "trellis";

/// Namespace the operator manifest installs into.
pub const OPERATOR_NAMESPACE: &str = "trellis-system";
/// Name of the operator's Deployment, ServiceAccount and Service.
pub const OPERATOR_NAME: &str = "trellis-operator";
/// Name of the single `Mesh` the operator acts on.
pub const MESH_NAME: &str = "default";
/// ConfigMap, published in every meshed namespace, that carries the mesh's trust bundle.
pub const ROOT_CERT_CONFIGMAP: &str = "trellis-ca-root-cert";

/// Control-plane HTTP paths on [`CONTROL_PLANE_PORT`].
pub const CERTIFICATE_PATH: &str = "/v1/certificate";
pub const CONFIG_STREAM_PATH: &str = "/v1/config";

/// Image repository prefix for locally built images; the tag is the mesh version.
pub const DEFAULT_IMAGE_REGISTRY: &str = "trellis.local";

/// Names of the injected containers.
pub const PROXY_CONTAINER: &str = "trellis-proxy";
pub const INIT_CONTAINER: &str = "trellis-init";
/// Init container (no capabilities) that fails fast when CNI capture is missing.
pub const VALIDATION_CONTAINER: &str = "trellis-validation";
/// Annotation recording what was injected (JSON: version and interception mode); its presence
/// makes injection idempotent, and `"interception":"cni"` tells the CNI plugin to capture.
pub const STATUS_ANNOTATION: &str = "trellis.dev/status";

/// Istio's per-pod capture annotations.
pub const INCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION: &str =
    "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION: &str =
    "traffic.sidecar.istio.io/excludeOutboundIPRanges";
