//! The connections to external authorizers, shared by every request of the proxy: one HTTP
//! client for every HTTP provider (it pools connections per address) and one gRPC channel per
//! provider address, each created on first use. The proxy's own connections are not captured,
//! so these dial the authorizer directly.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use trellis_config::ext_authz::ExtAuthzProvider;

pub type HttpClient = HyperClient<HttpConnector, Full<Bytes>>;

#[derive(Default)]
pub struct Clients {
    http: OnceLock<HttpClient>,
    grpc: Mutex<HashMap<(String, u16), Channel>>,
}

impl Clients {
    /// The HTTP client; `connect_timeout` applies from its first use on.
    pub fn http(&self, connect_timeout: Duration) -> &HttpClient {
        self.http.get_or_init(|| {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(connect_timeout));
            connector.set_nodelay(true);
            HyperClient::builder(TokioExecutor::new()).build(connector)
        })
    }

    /// The provider address's channel (it connects, and reconnects, by itself).
    pub fn grpc(
        &self,
        provider: &ExtAuthzProvider,
        connect_timeout: Duration,
    ) -> Result<Channel, String> {
        let key = (provider.host.clone(), provider.port);
        let mut channels = self.grpc.lock();
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let uri = format!("http://{}:{}", provider.host, provider.port);
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("{uri}: {e}"))?
            .connect_timeout(connect_timeout)
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}
