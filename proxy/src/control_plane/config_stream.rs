//! The config stream: a long-lived `GET /v1/config` whose body is newline-delimited JSON
//! `ControlMessage`s. Good snapshots are swapped in whole; bad ones are rejected and logged; on
//! disconnect the proxy reconnects with backoff and keeps serving the last good config. When the
//! workload certificate is renewed the stream is reopened at once with the new one, so the
//! control plane always sees the certificate the proxy holds and no stream outlives the
//! certificate it was opened with.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use tokio::sync::watch;
use tracing::{info, warn};
use trellis_config::protocol::{ControlMessage, POD_NAME_HEADER, PROXY_VERSION_HEADER};
use trellis_config::wellknown::CONFIG_STREAM_PATH;

use super::backoff::Backoff;
use super::ndjson::{self, Line};
use super::{ControlPlane, error_from};
use crate::identity::Identity;
use crate::state::ProxyState;

/// Bound on one message; a longer line is a protocol error and ends the stream.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How a stream ended without an error.
enum StreamEnd {
    /// The server closed the body.
    Closed,
    /// The server told the proxy to exit.
    Exit(String),
    /// The workload certificate changed: reconnect with the new one.
    Renewed,
}

/// Follows the config stream until the control plane says `exit` (then starts the drain).
pub async fn run(control_plane: Arc<ControlPlane>, state: Arc<ProxyState>) {
    let mut identity_updates = state.identity.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let identity = match identity_updates.wait_for(Option::is_some).await {
            Ok(identity) => identity.clone(),
            Err(_) => return,
        };
        let Some(identity) = identity else { continue };
        let mut applied_any = false;
        let followed = follow(
            &control_plane,
            &state,
            &identity,
            &mut identity_updates,
            &mut applied_any,
        )
        .await;
        match followed {
            Ok(StreamEnd::Exit(reason)) => {
                info!(reason, "control plane asked the proxy to exit");
                state.drain.start("control plane exit");
                return;
            }
            Ok(StreamEnd::Renewed) => {
                info!("workload certificate renewed; reopening the config stream with it");
                backoff.reset();
                continue;
            }
            Ok(StreamEnd::Closed) => warn!("control plane closed the config stream"),
            Err(e) => warn!(error = format!("{e:#}"), "config stream failed"),
        }
        if applied_any {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        info!(
            retry_in_ms = delay.as_millis() as u64,
            "reconnecting to the control plane"
        );
        tokio::time::sleep(delay).await;
    }
}

async fn follow(
    control_plane: &ControlPlane,
    state: &ProxyState,
    identity: &Identity,
    identity_updates: &mut watch::Receiver<Option<Arc<Identity>>>,
    applied_any: &mut bool,
) -> anyhow::Result<StreamEnd> {
    let mut sender = control_plane.connect(state, Some(identity)).await?;
    let request = http::Request::get(control_plane.url(CONFIG_STREAM_PATH))
        .header(POD_NAME_HEADER, &control_plane.pod_name)
        .header(PROXY_VERSION_HEADER, &control_plane.proxy_version)
        .body(Full::<Bytes>::default())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    if !status.is_success() {
        return Err(error_from(status, response.into_body()).await);
    }
    info!("config stream connected");
    let mut lines = ndjson::lines(response.into_body(), MAX_LINE_BYTES);
    loop {
        let line = tokio::select! {
            line = lines.next() => line,
            changed = identity_updates.changed() => {
                // The sender lives as long as the proxy state; a closed channel is shutdown.
                return Ok(if changed.is_ok() { StreamEnd::Renewed } else { StreamEnd::Closed });
            }
        };
        let Some(line) = line else {
            return Ok(StreamEnd::Closed);
        };
        let applied = match line? {
            Line::Text(line) => apply(state, line.as_bytes()),
            Line::NotUtf8 => {
                warn!("rejected a control message that is not UTF-8; keeping the last good config");
                Applied::Rejected
            }
        };
        match applied {
            Applied::Config => *applied_any = true,
            Applied::Rejected => {}
            Applied::Renew(reason) => {
                info!(reason, "control plane asked for a new certificate");
                control_plane.renew.notify_one();
            }
            Applied::Exit(reason) => return Ok(StreamEnd::Exit(reason)),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Applied {
    Config,
    Rejected,
    Renew(String),
    Exit(String),
}

/// Applies one line of the stream: a valid snapshot replaces the config atomically; anything
/// that does not decode or validate is rejected whole.
fn apply(state: &ProxyState, line: &[u8]) -> Applied {
    let message = match serde_json::from_slice::<ControlMessage>(line) {
        Ok(message) => message,
        Err(e) => {
            warn!(error = %e, "rejected a control message that does not decode; keeping the last good config");
            return Applied::Rejected;
        }
    };
    match message {
        ControlMessage::Config(config) => match config.validate() {
            Ok(()) => {
                info!(version = config.version, "config applied");
                state.set_config(Arc::from(config));
                Applied::Config
            }
            Err(e) => {
                warn!(version = config.version, error = %e, "rejected an invalid config snapshot; keeping the last good config");
                Applied::Rejected
            }
        },
        ControlMessage::Renew { reason } => Applied::Renew(reason),
        ControlMessage::Exit { reason } => Applied::Exit(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn state() -> ProxyState {
        let Command::Sidecar(args) =
            Cli::parse_from(["trellis-proxy", "sidecar", "--config", "unused.json"]).command
        else {
            panic!("parsed as another subcommand")
        };
        let log = crate::logging::LogControl::for_tests();
        ProxyState::new(&args, true, log)
    }

    fn version(state: &ProxyState) -> Option<String> {
        state.config.load().as_ref().map(|c| c.version.clone())
    }

    #[test]
    fn applies_good_snapshots_and_rejects_bad_ones_whole() {
        let state = state();
        assert_eq!(
            apply(&state, br#"{"type":"config","version":"1"}"#),
            Applied::Config
        );
        assert_eq!(version(&state).as_deref(), Some("1"));

        for bad in [
            &b"garbage"[..],
            br#"{"type":"reboot"}"#,
            br#"{"type":"config","version":"2","services":"nope"}"#,
            br#"{"type":"config","version":"2","services":[{"hostnames":[],"namespace":"a","vips":[],"ports":[],"endpoints":[]}]}"#,
        ] {
            assert_eq!(apply(&state, bad), Applied::Rejected);
            assert_eq!(version(&state).as_deref(), Some("1"));
        }
        assert_eq!(
            apply(&state, br#"{"type":"renew","reason":"root rotation"}"#),
            Applied::Renew("root rotation".into())
        );
        assert_eq!(version(&state).as_deref(), Some("1"));
        assert_eq!(
            apply(&state, br#"{"type":"exit","reason":"job done"}"#),
            Applied::Exit("job done".into())
        );
    }
}
