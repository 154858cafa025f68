//! Mesh-wide modes that the `Mesh` resource sets and every proxy config carries: the default
//! mutual-TLS mode for inbound connections and the outbound traffic policy. They live here, not
//! with the CRD, so the proxy reads them without linking the Kubernetes API types; the `schema`
//! feature gives the CRD its JSON schema for them.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Accept both mutual TLS and plaintext on every port (Istio's default).
    #[default]
    Permissive,
    /// Refuse plaintext.
    Strict,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficMode {
    /// Destinations outside the registry are passed through.
    #[default]
    AllowAny,
    /// Destinations outside the registry are refused.
    RegistryOnly,
}
