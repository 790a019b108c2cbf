//! `cache`: a plugin config's in-memory cache, shared by its instances, bounded in bytes
//! (`PLUGIN_CACHE_MAX_BYTES`): past it the least recently used entries are evicted. Every
//! operation, `incr` included, happens under one lock, so concurrent instances see each other's
//! changes whole.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::super::runtime::bindings::appliance::plugin::cache;
use super::HostState;

/// What one entry costs beyond its key and value (the map's own bookkeeping).
const ENTRY_OVERHEAD: usize = 64;

/// One plugin config's cache.
pub struct PluginCache {
    entries: LruCache<String, (String, Option<Instant>)>,
    bytes: usize,
    max_bytes: usize,
}

/// What a plugin config's instances share.
pub type SharedCache = Arc<Mutex<PluginCache>>;

/// A new cache of at most `max_bytes`.
pub fn new_cache(max_bytes: usize) -> SharedCache {
    Arc::new(Mutex::new(PluginCache {
        entries: LruCache::unbounded(),
        bytes: 0,
        max_bytes,
    }))
}

fn cost(key: &str, value: &str) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl PluginCache {
    /// The live value at `key` (an expired one is removed), marked as just used.
    fn get(&mut self, key: &str) -> Option<&mut (String, Option<Instant>)> {
        let expired =
            matches!(self.entries.peek(key), Some((_, Some(at))) if *at <= Instant::now());
        if expired {
            if let Some((value, _)) = self.entries.pop(key) {
                self.bytes -= cost(key, &value);
            }
            return None;
        }
        self.entries.get_mut(key)
    }

    fn put(&mut self, key: String, value: String, expiry: Option<Instant>) -> Result<(), String> {
        let size = cost(&key, &value);
        if size > self.max_bytes {
            return Err(format!(
                "the entry is {size} bytes, more than the whole cache (PLUGIN_CACHE_MAX_BYTES, {})",
                self.max_bytes
            ));
        }
        if let Some((old, _)) = self.entries.pop(&key) {
            self.bytes -= cost(&key, &old);
        }
        while self.bytes + size > self.max_bytes {
            match self.entries.pop_lru() {
                Some((k, (v, _))) => self.bytes -= cost(&k, &v),
                None => break,
            }
        }
        self.bytes += size;
        self.entries.put(key, (value, expiry));
        Ok(())
    }

    /// Bytes in use now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

fn lock(cache: &SharedCache) -> std::sync::MutexGuard<'_, PluginCache> {
    cache.lock().unwrap_or_else(|p| p.into_inner())
}

impl cache::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        lock(&self.scope.cache).get(&key).map(|(v, _)| v.clone())
    }

    fn set(&mut self, key: String, value: String, ttl_seconds: Option<u32>) -> Result<(), String> {
        let expiry = ttl_seconds.map(|s| Instant::now() + Duration::from_secs(s.into()));
        lock(&self.scope.cache).put(key, value, expiry)
    }

    fn incr(&mut self, key: String, by: i64) -> i64 {
        let mut cache = lock(&self.scope.cache);
        let (current, expiry) = match cache.get(&key) {
            Some((v, expiry)) => (v.parse::<i64>().unwrap_or(0), *expiry),
            None => (0, None),
        };
        let next = current.saturating_add(by);
        // A number is far smaller than any cache's limit.
        let _ = cache.put(key, next.to_string(), expiry);
        next
    }

    fn expire(&mut self, key: String, ttl_seconds: u32) -> bool {
        match lock(&self.scope.cache).get(&key) {
            Some(entry) => {
                entry.1 = Some(Instant::now() + Duration::from_secs(ttl_seconds.into()));
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entries_go_first_and_the_bytes_stay_bounded() {
        let cache = new_cache(1000);
        let mut c = lock(&cache);
        for n in 0..100 {
            c.put(format!("k{n}"), "v".repeat(50), None).unwrap();
            assert!(c.bytes() <= 1000);
        }
        assert!(c.get("k0").is_none(), "the oldest were evicted");
        assert!(c.get("k99").is_some());
        assert!(c.put("big".into(), "x".repeat(2000), None).is_err());
        c.put("t".into(), "1".into(), Some(Instant::now())).unwrap();
        assert!(c.get("t").is_none(), "expired");
    }
}
