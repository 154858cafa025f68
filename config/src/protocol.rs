//! Wire format of the control-plane endpoint (HTTP/2 over TLS on
//! [`CONTROL_PLANE_PORT`](crate::wellknown::CONTROL_PLANE_PORT)).
//!
//! * `POST /v1/certificate` — body [`CertificateRequest`], header `Authorization: Bearer <projected
//!   ServiceAccount token, audience "trellis">`; answer [`CertificateResponse`]. Server
//!   authentication only: this is how a proxy gets its first client certificate.
//! * `GET /v1/config` — mutual TLS with the workload certificate; headers [`POD_NAME_HEADER`] and
//!   [`PROXY_VERSION_HEADER`]. The answer is a never-ending body of newline-delimited JSON
//!   [`ControlMessage`]s: a full config snapshot whenever the proxy's config changes (bursts
//!   coalesced), `renew` when the proxy must replace its workload certificate now (a root
//!   rotation moves on once every proxy holds a certificate issued after the phase began), and
//!   `exit` when the pod's application containers have all terminated so that a classic sidecar
//!   lets a Job's pod complete. A proxy ignores (and logs) a message it does not know, so the
//!   server may add message types without breaking older proxies.

use serde::{Deserialize, Serialize};

use crate::proxy::ProxyConfig;

pub const POD_NAME_HEADER: &str = "x-trellis-pod-name";
pub const PROXY_VERSION_HEADER: &str = "x-trellis-proxy-version";

/// Largest request body the control plane reads; a CSR is well under 2 KiB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    /// PKCS#10 CSR in PEM whose only URI SAN is the caller's SPIFFE identity.
    pub csr: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// Leaf first, then intermediates, PEM.
    pub cert_chain: Vec<String>,
    /// Roots the proxy must trust for peers (may hold two during a root rotation).
    pub trust_bundle: Vec<String>,
}

/// An error answer of the control plane (any non-2xx status carries one).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorResponse {
    pub error: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControlMessage {
    /// Replace the whole configuration with this snapshot.
    Config(Box<ProxyConfig>),
    /// Request a new workload certificate now instead of at the rotation point. Sent after any
    /// config carrying a new trust bundle on the same stream, so a proxy that renews has already
    /// applied that bundle.
    Renew { reason: String },
    /// The workload beside this proxy has finished: drain and exit 0.
    Exit { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_are_tagged_json_lines() {
        let exit = ControlMessage::Exit {
            reason: "application containers terminated".into(),
        };
        let line = serde_json::to_string(&exit).unwrap();
        assert_eq!(
            line,
            r#"{"type":"exit","reason":"application containers terminated"}"#
        );
        let config: ControlMessage =
            serde_json::from_str(r#"{"type":"config","version":"3"}"#).unwrap();
        assert!(matches!(config, ControlMessage::Config(c) if c.version == "3"));
        assert!(serde_json::from_str::<ControlMessage>(r#"{"type":"reboot"}"#).is_err());
        let renew = ControlMessage::Renew {
            reason: "root rotation".into(),
        };
        let line = serde_json::to_string(&renew).unwrap();
        assert_eq!(line, r#"{"type":"renew","reason":"root rotation"}"#);
        assert_eq!(
            serde_json::from_str::<ControlMessage>(&line).unwrap(),
            renew
        );
    }

    #[test]
    fn port_keyed_policies_survive_the_tagged_envelope() {
        let mut config = ProxyConfig::default();
        config
            .inbound
            .port_mtls
            .insert(8080, crate::proxy::PeerAuthenticationMode::Disable);
        let line =
            serde_json::to_string(&ControlMessage::Config(Box::new(config.clone()))).unwrap();
        let decoded: ControlMessage = serde_json::from_str(&line).unwrap();
        assert_eq!(decoded, ControlMessage::Config(Box::new(config)));
        let bad = r#"{"type":"config","version":"1","inbound":{"portMtls":{"http":"STRICT"}}}"#;
        assert!(serde_json::from_str::<ControlMessage>(bad).is_err());
    }
}
