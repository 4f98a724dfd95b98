//! Serving from index files (docs/serving.md, "Index files"): a replica
//! holds each active version's `members.sgix` in memory and answers every
//! membership question from it, with the realtime overrides the version
//! does not reflect laid on top. The store keeps only small state: aliases,
//! overrides, notices and the replicas' load reports.
//!
//! - [`IndexSource`] (core): where a version's index comes from;
//!   [`ResultFiles`] (store) reads it from the result files compute wrote,
//!   checksum verified.
//! - [`LoadedVersion`]: one version's ids, and the time up to which its lake
//!   data reflects realtime events.
//! - [`Overlay`]: a segment's realtime overrides, newest per user.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use segment_core::index::IdSet;
pub use segment_core::store::IndexSource;
use segment_core::store::{Override, OverrideOp};
pub use segment_store::results::ResultFiles;

use crate::shard::Shard;

/// How a replica serves from index files.
#[derive(Clone)]
pub struct IndexOptions {
    pub source: Arc<dyn IndexSource>,
    /// This replica's name in load reports: unique among live replicas
    /// (the pod name).
    pub replica: String,
    /// How long one liveness report lasts; the replica renews it on every
    /// alias refresh, so keep it a few refresh intervals long.
    pub liveness: Duration,
    /// Indexes fetched at once when many are missing (start-up, after a
    /// gap in the notices).
    pub parallel_loads: usize,
    /// The part of every version this replica holds.
    pub shard: Shard,
}

impl std::fmt::Debug for IndexOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexOptions")
            .field("replica", &self.replica)
            .field("liveness", &self.liveness)
            .field("parallel_loads", &self.parallel_loads)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl IndexOptions {
    pub fn new(source: Arc<dyn IndexSource>, replica: impl Into<String>) -> IndexOptions {
        IndexOptions {
            source,
            replica: replica.into(),
            liveness: Duration::from_secs(20),
            parallel_loads: 4,
            shard: Shard::WHOLE,
        }
    }
}

/// One version's members as a replica holds them.
#[derive(Debug)]
pub struct LoadedVersion {
    pub version: u64,
    ids: IdSet,
    /// Overrides after this time are not in the version's lake data
    /// ([`StoredVersion::reflects_events_until`](segment_core::store::StoredVersion::reflects_events_until));
    /// `None`: every override counts.
    reflects_until: Option<DateTime<Utc>>,
}

impl LoadedVersion {
    pub fn new(version: u64, ids: IdSet, reflects_until: Option<DateTime<Utc>>) -> LoadedVersion {
        LoadedVersion { version, ids, reflects_until }
    }

    /// Whether `user` is a member: the user's override when the version
    /// does not reflect it, else the index. The same rule as the Redis
    /// layout's ingest: an override recorded after the version's lake data
    /// wins, an older one is in the lake data already.
    pub fn has(&self, user: &str, overlay: Option<&Overlay>) -> bool {
        if let Some(change) = overlay.and_then(|overlay| overlay.get(user)) {
            if self.reflects_until.is_none_or(|until| change.ts > until) {
                return change.op == OverrideOp::Include;
            }
        }
        self.ids.contains(user)
    }

    pub fn members(&self) -> u64 {
        self.ids.len()
    }

    /// Bytes held for it: the index file, which is the whole in-memory form.
    pub fn bytes(&self) -> usize {
        self.ids.file_len()
    }

    pub fn reflects_until(&self) -> Option<DateTime<Utc>> {
        self.reflects_until
    }
}

/// A segment's realtime overrides, the newest per user.
pub type Overlay = HashMap<String, Override>;

/// Adds `change` unless the user has a newer override ([`Override::supersedes`]).
pub fn merge_override(overlay: &mut Overlay, change: Override) {
    match overlay.get(&change.user) {
        Some(current) if !change.supersedes(current) => {}
        _ => {
            overlay.insert(change.user.clone(), change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(user: &str, op: OverrideOp, ts: i64) -> Override {
        Override { user: user.into(), op, ts: DateTime::from_timestamp(ts, 0).unwrap(), id: format!("{user}-{ts}"), offset: None }
    }

    #[test]
    fn an_override_counts_only_where_the_version_does_not_reflect_it() {
        let ids = IdSet::open(segment_core::index::build(["a", "b"]).unwrap()).unwrap();
        let version = LoadedVersion::new(3, ids, Some(DateTime::from_timestamp(100, 0).unwrap()));
        let mut overlay = Overlay::new();
        merge_override(&mut overlay, change("a", OverrideOp::Exclude, 150));
        merge_override(&mut overlay, change("c", OverrideOp::Include, 150));
        merge_override(&mut overlay, change("b", OverrideOp::Exclude, 100));
        assert!(!version.has("a", Some(&overlay)), "excluded after the version's lake data");
        assert!(version.has("c", Some(&overlay)), "included after the version's lake data");
        assert!(version.has("b", Some(&overlay)), "an override the lake data reflects already does not count");
        assert!(version.has("a", None) && !version.has("c", None));
        assert!(!version.has("z", Some(&overlay)));
    }

    #[test]
    fn the_newest_override_of_a_user_is_kept() {
        let mut overlay = Overlay::new();
        merge_override(&mut overlay, change("a", OverrideOp::Exclude, 200));
        merge_override(&mut overlay, change("a", OverrideOp::Include, 150));
        assert_eq!(overlay["a"].op, OverrideOp::Exclude, "an older event does not replace a newer one");
        merge_override(&mut overlay, change("a", OverrideOp::Include, 250));
        assert_eq!(overlay["a"].op, OverrideOp::Include);
    }
}
