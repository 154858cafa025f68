//! Graceful drain: one shutdown signal for every source (SIGTERM, `/quitquitquit`, the control
//! plane's `exit`), and the set of open connections the drain waits for.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Drain {
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        }
    }

    /// Starts the drain; later calls are no-ops.
    pub fn start(&self, reason: &str) {
        if !self.shutdown.is_cancelled() {
            tracing::info!(reason, "draining");
            self.shutdown.cancel();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub async fn started(&self) {
        self.shutdown.cancelled().await
    }

    /// Runs a connection handler that the drain waits for.
    pub fn spawn_connection<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(task);
    }

    /// Waits for open connections to finish, at most `deadline`; returns how many were left.
    pub async fn wait_connections(&self, deadline: Duration) -> usize {
        self.connections.close();
        let _ = tokio::time::timeout(deadline, self.connections.wait()).await;
        self.connections.len()
    }
}
