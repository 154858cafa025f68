//! The workload certificate: requested with the pod's ServiceAccount token, renewed once
//! `--rotation-percent` of its remaining lifetime has passed (or at once when the control plane
//! sends `renew`), the old one kept until a new one is held.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full, Limited};
use tracing::{info, warn};
use trellis_config::protocol::{CertificateRequest, CertificateResponse};
use trellis_config::wellknown::CERTIFICATE_PATH;

use super::backoff::Backoff;
use super::{ControlPlane, MAX_ANSWER_BYTES, error_from};
use crate::identity::{self, Identity};
use crate::state::ProxyState;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Never renew more often than this, whatever the certificate's validity says.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps a valid certificate in `state.identity`, forever.
pub async fn run(control_plane: Arc<ControlPlane>, state: Arc<ProxyState>, rotation_percent: u8) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match request(&control_plane, &state).await {
            Ok(identity) => {
                let renew_at = identity.renew_at(rotation_percent);
                info!(
                    spiffe_id = %identity.spiffe_id,
                    not_after = identity.not_after,
                    "workload certificate issued"
                );
                state.identity.send_replace(Some(Arc::new(identity)));
                backoff.reset();
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(MIN_RENEW_INTERVAL);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = control_plane.renew.notified() => {
                        // The control plane asks when a rotation phase began after this
                        // certificate was issued, and counts certificates by issue time with
                        // second precision: waiting a second makes the new one count.
                        tokio::time::sleep(MIN_RENEW_INTERVAL).await;
                        info!("renewing the workload certificate at the control plane's request");
                    }
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = delay.as_millis() as u64,
                    "certificate request failed"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Creates a new key and has the control plane sign a certificate for it.
async fn request(control_plane: &ControlPlane, state: &ProxyState) -> anyhow::Result<Identity> {
    let spiffe_id = state.workload.spiffe_id();
    let (key, csr) = identity::new_csr(&spiffe_id)?;
    // The projected token rotates: read it fresh for every request.
    let token = tokio::fs::read_to_string(&control_plane.token)
        .await
        .with_context(|| format!("reading --token {}", control_plane.token.display()))?;
    let body = serde_json::to_vec(&CertificateRequest { csr })?;
    let request = http::Request::post(control_plane.url(CERTIFICATE_PATH))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .body(Full::new(Bytes::from(body)))?;
    let exchange = async {
        let mut sender = control_plane.connect(state, None).await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(error_from(status, response.into_body()).await);
        }
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the certificate answer: {e}"))?
            .to_bytes();
        anyhow::Ok(serde_json::from_slice::<CertificateResponse>(&bytes)?)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("certificate request timed out"))??;
    Identity::from_response(spiffe_id, &key, &response).context("certificate answer rejected")
}
