//! Static mode: the proxy config read once from `--config FILE.json`.

use std::path::Path;

use anyhow::Context;
use trellis_config::proxy::ProxyConfig;

pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    // The decode error already names its cause; keep it a single message, not a chain.
    ProxyConfig::from_json(&bytes)
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}
