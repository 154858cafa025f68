//! JSON-lines logging to stderr with a filter that can be changed at runtime.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

pub fn init(level: &str) -> anyhow::Result<LogControl> {
    let filter = EnvFilter::try_new(level)?;
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .flatten_event(true)
                // The connection span's fields (direction, peer, destination) on every line
                // logged inside it.
                .with_current_span(false)
                .with_span_list(true)
                .with_writer(std::io::stderr),
        )
        .try_init()?;
    Ok(LogControl { handle })
}

impl LogControl {
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| e.to_string())
    }
}

#[cfg(test)]
impl LogControl {
    /// A control not attached to the global subscriber.
    pub fn for_tests() -> Self {
        let (_layer, handle) = reload::Layer::new(EnvFilter::new("info"));
        Self { handle }
    }
}
