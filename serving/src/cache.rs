//! The version listings' cache in front of the store: bounded, and each
//! entry expires a fixed time after it was stored.
//!
//! quick_cache (S3-FIFO eviction, sharded locks) does the bounding; the
//! expiry is checked on read from a deadline kept next to the value. A
//! lookup is a hash, a shard read lock and a clock read, with no
//! background housekeeping and no allocation: this sits on every request,
//! and the moka cache it replaced was a fifth of serving's CPU time in the
//! benchmark's profile (docs/benchmarks.md).

use std::hash::Hash;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache as Bounded;
use quick_cache::{Equivalent, UnitWeighter};

/// Seeded per process like the standard hasher, far cheaper per key than
/// SipHash.
type Hasher = foldhash::fast::RandomState;

#[derive(Clone)]
struct Entry<V> {
    expires: Instant,
    value: V,
}

pub(crate) struct TtlCache<K, V> {
    /// `None` when the capacity is 0: nothing is cached.
    entries: Option<Bounded<K, Entry<V>, UnitWeighter, Hasher>>,
    ttl: Duration,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// Holds about `capacity` entries, each served for `ttl` after it was stored.
    pub fn new(capacity: u64, ttl: Duration) -> TtlCache<K, V> {
        let entries = (capacity > 0).then(|| {
            let items = usize::try_from(capacity).unwrap_or(usize::MAX);
            Bounded::with(items, capacity, UnitWeighter, Hasher::default(), Default::default())
        });
        TtlCache { entries, ttl }
    }

    /// The value stored for `key`, unless it has expired.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let entry = self.entries.as_ref()?.get(key)?;
        (Instant::now() < entry.expires).then_some(entry.value)
    }

    pub fn insert(&self, key: K, value: V) {
        if let Some(entries) = &self.entries {
            entries.insert(key, Entry { expires: Instant::now() + self.ttl, value });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = TtlCache::new(10, Duration::from_millis(50));
        cache.insert("a".to_string(), 1);
        assert_eq!(cache.get("a"), Some(1), "looked up by &str");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None, "expired");
        cache.insert("a".to_string(), 2);
        assert_eq!(cache.get("a"), Some(2), "stored again after expiring");
    }

    #[test]
    fn bounded() {
        let cache = TtlCache::new(100, Duration::from_secs(60));
        for i in 0..10_000u32 {
            cache.insert(i, i);
        }
        let kept = (0..10_000u32).filter(|i| cache.get(i).is_some()).count();
        assert!(kept > 0 && kept <= 200, "about the capacity is kept, not everything: {kept}");
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let cache = TtlCache::new(0, Duration::from_secs(60));
        cache.insert(1u8, 1u8);
        assert_eq!(cache.get(&1), None);
    }
}
