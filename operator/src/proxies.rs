//! Proxies connected to this replica's config stream, counted by data-plane version for
//! `Mesh.status`.

use parking_lot::Mutex;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct ConnectedProxies {
    by_version: Mutex<BTreeMap<String, u32>>,
}

/// Removes its proxy from the count when the stream ends, however it ends.
#[derive(Debug)]
pub struct Connection<'a> {
    registry: &'a ConnectedProxies,
    version: String,
}

impl ConnectedProxies {
    pub fn connect(&self, version: &str) -> Connection<'_> {
        *self
            .by_version
            .lock()
            .entry(version.to_owned())
            .or_default() += 1;
        Connection {
            registry: self,
            version: version.to_owned(),
        }
    }

    /// Total and per-version counts.
    pub fn counts(&self) -> (u32, BTreeMap<String, u32>) {
        let map = self.by_version.lock().clone();
        (map.values().sum(), map)
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let mut map = self.registry.by_version.lock();
        if let Some(count) = map.get_mut(&self.version) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_connection_lifetimes() {
        let registry = ConnectedProxies::default();
        let a = registry.connect("1.0");
        let b = registry.connect("1.0");
        let c = registry.connect("1.1");
        assert_eq!(registry.counts().0, 3);
        assert_eq!(registry.counts().1["1.0"], 2);
        drop(a);
        drop(c);
        let (total, by_version) = registry.counts();
        assert_eq!(total, 1);
        assert_eq!(
            by_version.into_iter().collect::<Vec<_>>(),
            [("1.0".to_owned(), 1)]
        );
        drop(b);
        assert_eq!(registry.counts().0, 0);
    }
}
