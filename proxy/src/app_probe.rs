//! Application health probes through the sidecar, as Istio's probe rewrite: the injector points
//! the kubelet's HTTP probes at `/app-health/<container>/<kind>` on the readiness port and passes
//! the original probes in `TRELLIS_KUBE_APP_PROBERS`; the proxy runs them against the app on
//! 127.0.0.1. The kubelet's plaintext probe then never meets a STRICT mutual-TLS port.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Environment variable carrying the rewritten probes (JSON: path → probe).
pub const APP_PROBERS_ENV: &str = "TRELLIS_KUBE_APP_PROBERS";
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// One original HTTP probe of the application.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    1
}

#[derive(Clone, Debug, Default)]
pub struct AppProbers(BTreeMap<String, AppProbe>);

impl AppProbers {
    /// Parses the injector's JSON; an absent variable means no rewritten probes.
    pub fn from_json(text: Option<&str>) -> Result<Self, serde_json::Error> {
        match text {
            Some(text) if !text.trim().is_empty() => Ok(Self(serde_json::from_str(text)?)),
            _ => Ok(Self::default()),
        }
    }

    /// Runs the probe registered for `path`; `None` when there is none.
    pub async fn check(&self, path: &str) -> Option<StatusCode> {
        let probe = self.0.get(path)?;
        let timeout = Duration::from_secs(probe.timeout_seconds.max(1));
        let healthy = tokio::time::timeout(timeout, http_get_status(probe))
            .await
            .ok()
            .and_then(Result::ok)
            // The kubelet counts 200–399 as success.
            .is_some_and(|status| (200..400).contains(&status));
        Some(if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })
    }
}

/// The status code of `GET path` on the app's port over loopback.
async fn http_get_status(probe: &AppProbe) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", probe.port)).await?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: kube-probe/trellis\r\nConnection: close\r\n\r\n",
        probe.path, probe.port
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP status line")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn app_answering(status_line: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(status_line.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn runs_the_apps_probe_and_maps_the_kubelets_success_range() {
        let healthy = app_answering("HTTP/1.1 204 No Content\r\n\r\n").await;
        let failing = app_answering("HTTP/1.1 500 Oops\r\n\r\n").await;
        let json = format!(
            r#"{{"/app-health/web/readyz": {{"port": {healthy}, "path": "/healthz"}},
                 "/app-health/web/livez": {{"port": {failing}, "path": "/live", "timeoutSeconds": 2}},
                 "/app-health/gone/readyz": {{"port": 1, "path": "/"}}}}"#
        );
        let probers = AppProbers::from_json(Some(&json)).unwrap();
        assert_eq!(
            probers.check("/app-health/web/readyz").await,
            Some(StatusCode::OK)
        );
        assert_eq!(
            probers.check("/app-health/web/livez").await,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            probers.check("/app-health/gone/readyz").await,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(probers.check("/app-health/other/readyz").await, None);
        assert!(AppProbers::from_json(Some("{not json")).is_err());
        assert!(AppProbers::from_json(None).unwrap().0.is_empty());
    }
}
