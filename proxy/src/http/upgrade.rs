//! After a `101 Switching Protocols` has gone back to the downstream, the two upgraded streams
//! (downstream connection, upstream connection) are spliced until both directions end.

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::headers;
use super::telemetry::Record;
use super::telemetry::body::Observed;

/// Passes the upstream's answer to an upgrade request back: a `101` with its upgrade headers,
/// the two connections spliced once both sides have switched; anything else as a response.
pub fn respond(
    record: Record,
    downstream: OnUpgrade,
    mut response: Response<Incoming>,
) -> Response<Observed> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        splice(downstream, hyper::upgrade::on(&mut response));
        headers::strip_hop_by_hop_keep_upgrade(response.headers_mut());
    } else {
        headers::strip_hop_by_hop(response.headers_mut());
    }
    record.respond(response.map(|b| b.map_err(Into::into).boxed_unsync()))
}

/// Spawns the splice of the downstream's and the upstream's upgraded connections.
fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
            Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
        }
    });
}
