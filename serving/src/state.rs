//! Shared state: the store handle, the alias map kept in memory, the
//! caches in front of the store, and the task that keeps the alias map
//! current from rollover notices.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use segment_core::api::SegmentKey;
use segment_core::store::{Rollover, StoreEpoch, StoreError, StoredVersion};
use tracing::{debug, info, warn};

use crate::auth::Tokens;
use crate::cache::TtlCache;
use crate::metrics::Metrics;
use crate::{ServingConfig, ServingStore};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Rollover notices remembered for patching cached users entries; an
/// entry older than the oldest is fetched again.
const NOTICE_LOG: usize = 4096;
/// A cached user entry with more segments rolled over since it was read
/// is fetched again rather than patched segment by segment.
const MAX_PATCHED_SEGMENTS: usize = 64;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A user's active segments as cached: read in cache generation
/// `generation`, with the rollover notices up to `seq` reflected. Notices
/// after `seq` name the segments whose answer must be checked again; the
/// other segments' answers still hold.
#[derive(Clone)]
struct UserEntry {
    generation: u64,
    seq: u64,
    value: ActiveSegments,
}

/// The segments rolled over, in notice order, so that a rollover
/// invalidates only that segment's cached answers.
#[derive(Default)]
struct NoticeLog {
    /// The newest notice's number.
    latest: u64,
    /// Segment → the number of its newest notice.
    last_of: HashMap<SegmentKey, u64>,
    /// The newest notices, oldest first, at most [`NOTICE_LOG`].
    recent: VecDeque<(u64, SegmentKey)>,
}

impl NoticeLog {
    fn record(&mut self, segment: &SegmentKey) -> u64 {
        self.latest += 1;
        self.last_of.insert(segment.clone(), self.latest);
        self.recent.push_back((self.latest, segment.clone()));
        if self.recent.len() > NOTICE_LOG {
            self.recent.pop_front();
        }
        self.latest
    }

    /// The segments with a notice after `seq`; `None` when notices after
    /// it were forgotten.
    fn rolled_since(&self, seq: u64) -> Option<Vec<SegmentKey>> {
        let oldest = self.recent.front().map(|(n, _)| *n).unwrap_or(self.latest + 1);
        if seq + 1 < oldest && seq < self.latest {
            return None;
        }
        let mut segments: Vec<SegmentKey> = self.recent.iter().filter(|(n, _)| *n > seq).map(|(_, s)| s.clone()).collect();
        segments.sort();
        segments.dedup();
        Some(segments)
    }
}

/// A cached value with the cache generation it was read in. A read that
/// started before a rollover notice may finish after it: tagging makes its
/// answer invalid instead of letting it outlive the notice.
#[derive(Clone)]
struct Tagged<T> {
    generation: u64,
    /// The newest rollover notice applied when the value was read.
    seq: u64,
    value: T,
}

/// A segment's active version, with the segment's entry in the users
/// route's answer rendered once, when the version became active, instead
/// of on every request (serializing it was a fifth of a request's work).
#[derive(Debug)]
pub struct ActiveSegment {
    pub segment: SegmentKey,
    pub version: u64,
    /// This segment as a [`UserSegment`](crate::api::UserSegment) in JSON.
    pub(crate) json: Box<str>,
}

impl ActiveSegment {
    pub(crate) fn new(segment: SegmentKey, version: u64) -> ActiveSegment {
        let json = crate::api::user_segment_json(&segment, version);
        ActiveSegment { segment, version, json }
    }

    /// The alias map's entry for `segment` at `version`.
    fn entry(segment: SegmentKey, version: u64) -> (SegmentKey, Arc<ActiveSegment>) {
        (segment.clone(), Arc::new(ActiveSegment::new(segment, version)))
    }
}

/// Segment → its active version. Hashed rather than ordered: a users
/// answer looks up every segment the user is loaded in.
pub type AliasMap = HashMap<SegmentKey, Arc<ActiveSegment>, foldhash::fast::RandomState>;

/// A user's active segments, sorted by segment, shared with the alias map.
pub(crate) type ActiveSegments = Arc<[Arc<ActiveSegment>]>;
type Versions = Arc<BTreeMap<u64, StoredVersion>>;

/// Cheap to clone: clones share everything. [`with_store`](Self::with_store)
/// makes one that shares everything but the store connection it reads
/// through.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
    /// What requests read through: one connection per serving thread, so
    /// a request and its store round trip stay on one thread.
    store: Arc<dyn ServingStore>,
}

struct Inner {
    /// The connection the alias map is loaded and followed through.
    store: Arc<dyn ServingStore>,
    config: ServingConfig,
    metrics: Metrics,
    aliases: RwLock<Arc<AliasMap>>,
    /// Bumped whenever any user or version-list entry may be stale: a
    /// re-subscription, an alias change found by a periodic refresh, a
    /// store that changed. A rollover notice only makes its segment's
    /// answers stale ([`NoticeLog`]).
    generation: AtomicU64,
    /// The newest rollover notice's number ([`NoticeLog::latest`]), read
    /// without the lock on every cache hit.
    notice_seq: AtomicU64,
    notices: RwLock<NoticeLog>,
    ready: AtomicBool,
    /// The store epoch last seen ([`StoreEpoch`]).
    epoch: Mutex<Option<String>>,
    /// The epoch seen before is gone: the store lost its state (flushed,
    /// replaced). Every read answers 503 until an epoch is back, rather
    /// than "in no segment" for everyone.
    state_lost: AtomicBool,
    /// user → the user's active segments, filtered by the alias map when
    /// read from the store. A rollover of one segment makes only that
    /// segment's part of each entry stale: it is checked again on the next
    /// read (one membership check), the rest is served as it is.
    users: TtlCache<String, UserEntry>,
    /// (segment, version, user) → member. Keyed by version, so a rollover
    /// moves readers to new keys instead of needing invalidation.
    members: TtlCache<(SegmentKey, u64, String), bool>,
    /// Tagged with the notice number read before the store call: an entry
    /// older than its segment's newest notice is stale.
    versions: TtlCache<SegmentKey, Tagged<Versions>>,
}

impl AppState {
    /// Builds the state and, inside a Tokio runtime, starts the task that
    /// loads the alias map and follows rollover notices (it stops once
    /// every clone of the state is dropped). Outside a runtime nothing is
    /// started and [`refresh_aliases`](Self::refresh_aliases) is up to the
    /// caller.
    pub fn new(store: Arc<dyn ServingStore>, config: ServingConfig) -> AppState {
        let inner = Arc::new(Inner {
            users: TtlCache::new(config.cache_capacity, config.cache_ttl),
            members: TtlCache::new(config.cache_capacity, config.cache_ttl),
            versions: TtlCache::new(config.cache_capacity, config.cache_ttl),
            store: store.clone(),
            config,
            metrics: Metrics::default(),
            aliases: Default::default(),
            generation: AtomicU64::new(0),
            notice_seq: AtomicU64::new(0),
            notices: Default::default(),
            ready: AtomicBool::new(false),
            epoch: Mutex::new(None),
            state_lost: AtomicBool::new(false),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow_rollovers(Arc::downgrade(&inner)));
        }
        AppState { inner, store }
    }

    /// A state sharing this one's caches, alias map and metrics that reads
    /// through `store`, another connection to the same store.
    pub fn with_store(&self, store: Arc<dyn ServingStore>) -> AppState {
        AppState { inner: self.inner.clone(), store }
    }

    pub fn config(&self) -> &ServingConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn tokens(&self) -> Option<&Tokens> {
        self.inner.config.tokens.as_ref()
    }

    /// True once the alias map was loaded at least once.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The active version of every segment, as last learned.
    pub fn aliases(&self) -> Arc<AliasMap> {
        self.inner.aliases()
    }

    pub fn active_version(&self, segment: &SegmentKey) -> Option<u64> {
        self.aliases().get(segment).map(|active| active.version)
    }

    /// Re-reads the alias map from the store; stale user entries are dropped
    /// if anything changed.
    pub async fn refresh_aliases(&self) -> Result<(), StoreError> {
        self.inner.refresh_aliases(false).await
    }

    /// The user's active segments: cache (its segments rolled over since
    /// checked again), else one `user_versions` round trip filtered by the
    /// alias map.
    pub(crate) async fn user_segments(&self, user: &str) -> Result<ActiveSegments, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let generation = inner.generation.load(Ordering::Acquire);
        let seq = inner.notice_seq.load(Ordering::Acquire);
        if let Some(hit) = inner.users.get(user).filter(|e| e.generation == generation) {
            if hit.seq == seq {
                inner.metrics.cache("users", 1, 0);
                return Ok(hit.value);
            }
            if let Some(patched) = self.patch_user_entry(user, &hit, generation, seq).await? {
                inner.metrics.cache("users", 1, 0);
                return Ok(patched);
            }
        }
        inner.metrics.cache("users", 0, 1);
        let loaded = inner.call("user_versions", self.store.user_versions(user)).await?;
        // Read after the generation: aliases change before the generation
        // is bumped, so this map is at least as new as `generation` says.
        let aliases = inner.aliases();
        let mut active: Vec<Arc<ActiveSegment>> = loaded
            .iter()
            .filter_map(|(segment, version)| aliases.get(segment).filter(|active| active.version == *version).cloned())
            .collect();
        active.sort_by(|a, b| a.segment.cmp(&b.segment));
        active.dedup_by(|a, b| a.segment == b.segment);
        let value: ActiveSegments = active.into();
        inner.users.insert(user.to_string(), UserEntry { generation, seq, value: value.clone() });
        Ok(value)
    }

    /// Brings a cached entry up to notice `seq` by checking the user in the
    /// active version of each segment rolled over since the entry was
    /// read; `None` when it is cheaper, or only possible, to read the
    /// user's versions again.
    async fn patch_user_entry(
        &self,
        user: &str,
        entry: &UserEntry,
        generation: u64,
        seq: u64,
    ) -> Result<Option<ActiveSegments>, StoreError> {
        let inner = &self.inner;
        let rolled = inner.notices.read().unwrap_or_else(|e| e.into_inner()).rolled_since(entry.seq);
        let Some(rolled) = rolled.filter(|r| r.len() <= MAX_PATCHED_SEGMENTS) else { return Ok(None) };
        let aliases = inner.aliases();
        let checks: Vec<(SegmentKey, u64, String)> = rolled
            .iter()
            .filter_map(|segment| aliases.get(segment).map(|active| (segment.clone(), active.version, user.to_string())))
            .collect();
        let members = if checks.is_empty() { Vec::new() } else { self.members(&checks).await? };
        let mut active: Vec<Arc<ActiveSegment>> =
            entry.value.iter().filter(|segment| !rolled.contains(&segment.segment)).cloned().collect();
        for ((segment, _, _), member) in checks.iter().zip(members) {
            if let Some(now) = aliases.get(segment).filter(|_| member) {
                active.push(now.clone());
            }
        }
        active.sort_by(|a, b| a.segment.cmp(&b.segment));
        let value: ActiveSegments = active.into();
        inner.users.insert(user.to_string(), UserEntry { generation, seq, value: value.clone() });
        Ok(Some(value))
    }

    /// Answers each (segment, version, user) from cache, and the misses with
    /// one `check` round trip (`is_member` for a single one).
    pub(crate) async fn members(&self, triples: &[(SegmentKey, u64, String)]) -> Result<Vec<bool>, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let mut answers = Vec::with_capacity(triples.len());
        let mut misses = Vec::new();
        for (i, triple) in triples.iter().enumerate() {
            let hit = inner.members.get(triple);
            if hit.is_none() {
                misses.push(i);
            }
            answers.push(hit.unwrap_or(false));
        }
        inner.metrics.cache("members", (triples.len() - misses.len()) as u64, misses.len() as u64);
        let fetched = match misses.as_slice() {
            [] => return Ok(answers),
            [one] => {
                let (segment, version, user) = &triples[*one];
                vec![inner.call("is_member", self.store.is_member(segment, *version, user)).await?]
            }
            _ => {
                let asked: Vec<_> = misses.iter().map(|i| triples[*i].clone()).collect();
                let fetched = inner.call("check", self.store.check(&asked)).await?;
                if fetched.len() != asked.len() {
                    return Err(StoreError::Other(format!("check answered {} of {} pairs", fetched.len(), asked.len()).into()));
                }
                fetched
            }
        };
        for (i, member) in misses.into_iter().zip(fetched) {
            answers[i] = member;
            inner.members.insert(triples[i].clone(), member);
        }
        Ok(answers)
    }

    /// The sealed versions of a segment: cache, else one `versions` round trip.
    pub(crate) async fn versions(&self, segment: &SegmentKey) -> Result<Versions, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let generation = inner.generation.load(Ordering::Acquire);
        let seq = inner.notice_seq.load(Ordering::Acquire);
        let rolled_at = || inner.notices.read().unwrap_or_else(|e| e.into_inner()).last_of.get(segment).copied().unwrap_or(0);
        if let Some(hit) = inner.versions.get(segment).filter(|e| e.generation == generation && rolled_at() <= e.seq) {
            inner.metrics.cache("versions", 1, 0);
            return Ok(hit.value);
        }
        inner.metrics.cache("versions", 0, 1);
        let value = Arc::new(inner.call("versions", self.store.versions(segment)).await?);
        inner.versions.insert(segment.clone(), Tagged { generation, seq, value: value.clone() });
        Ok(value)
    }
}

impl Inner {
    fn aliases(&self) -> Arc<AliasMap> {
        self.aliases.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a store call under the configured deadline; a missed deadline
    /// counts as the store being unavailable.
    async fn call<T>(&self, operation: &'static str, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let timeout = self.config.store_timeout;
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("{operation}: no answer from the store within {timeout:?}").into())),
        };
        if let Err(e) = &result {
            self.metrics.store_error(operation, matches!(e, StoreError::Unavailable(_)));
        }
        result
    }

    /// Refuses every read while the store's state is lost.
    fn check_state(&self) -> Result<(), StoreError> {
        if self.state_lost.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "the store lost its state (its epoch is gone); reads fail until it is restored or rebuilt".into(),
            ));
        }
        Ok(())
    }

    /// Compares the epoch just read with the one seen before. Returns
    /// `None` when the state was lost (nothing read with it may be used),
    /// else whether the store changed under us (a restore or a rebuilt
    /// store: everything cached is stale).
    fn follow_epoch(&self, epoch: StoreEpoch) -> Option<bool> {
        let mut seen = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        match epoch {
            StoreEpoch::Untracked => Some(false),
            // Never seen one: a store nothing was activated in yet.
            StoreEpoch::Missing if seen.is_none() => Some(false),
            StoreEpoch::Missing => {
                if !self.state_lost.swap(true, Ordering::AcqRel) {
                    warn!(epoch = seen.as_deref().unwrap_or(""), "the store lost its state; answering 503 until it is back");
                }
                None
            }
            StoreEpoch::Id(id) => {
                let was_lost = self.state_lost.swap(false, Ordering::AcqRel);
                let changed = seen.as_ref().is_some_and(|before| *before != id);
                if was_lost || changed {
                    info!(epoch = %id, "the store has state again; caches dropped");
                }
                *seen = Some(id);
                Some(was_lost || changed)
            }
        }
    }

    /// Drops whatever may be stale after an unknown change.
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        // Tagged entries are already unreachable; this frees their memory.
        self.users.clear();
        self.versions.clear();
    }

    fn apply(&self, notice: Rollover) {
        self.metrics.rollover_notice();
        debug!(segment = %notice.segment, version = ?notice.version, "rollover notice");
        {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**aliases).clone();
            match notice.version {
                Some(version) => {
                    let (segment, active) = ActiveSegment::entry(notice.segment.clone(), version);
                    next.insert(segment, active);
                }
                None => {
                    next.remove(&notice.segment);
                }
            }
            *aliases = Arc::new(next);
        }
        // After the alias changed: a request that sees the new notice
        // number also sees the new alias. Only this segment's cached
        // answers are stale; the version list goes, user entries are
        // patched when read.
        let seq = self.notices.write().unwrap_or_else(|e| e.into_inner()).record(&notice.segment);
        self.notice_seq.store(seq, Ordering::Release);
        self.versions.remove(&notice.segment);
    }

    /// Replaces the alias map with the store's. `changed_anyway` says the
    /// caches must be dropped even if the map is unchanged (notices may
    /// have been missed, e.g. after re-subscribing).
    async fn refresh_aliases(&self, changed_anyway: bool) -> Result<(), StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let (fresh, epoch) = self.call("aliases", self.store.aliases_with_epoch()).await?;
        let Some(store_changed) = self.follow_epoch(epoch) else {
            // Keeps the alias map it has: an empty one would answer "in no
            // segment" once the state is back but not yet re-read.
            return Ok(());
        };
        if store_changed {
            // Version numbers of a rebuilt store name other members: the
            // membership cache, keyed by version, goes too.
            self.members.clear();
        }
        let changed_anyway = changed_anyway || store_changed;
        {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            // A notice applied while this read was in flight is newer than
            // what the read returned; the next refresh picks up the rest.
            if self.generation.load(Ordering::Acquire) == generation && !same_versions(&aliases, &fresh) {
                *aliases = Arc::new(fresh.into_iter().map(|(segment, version)| ActiveSegment::entry(segment, version)).collect());
                drop(aliases);
                self.invalidate();
            } else if changed_anyway {
                drop(aliases);
                self.invalidate();
            }
        }
        if !self.ready.swap(true, Ordering::AcqRel) {
            info!(segments = self.aliases.read().map(|a| a.len()).unwrap_or(0), "alias map loaded; ready");
        }
        Ok(())
    }
}

fn same_versions(aliases: &AliasMap, versions: &BTreeMap<SegmentKey, u64>) -> bool {
    aliases.len() == versions.len()
        && versions.iter().all(|(segment, version)| aliases.get(segment).is_some_and(|active| active.version == *version))
}

/// Keeps the alias map current: subscribe, load the map, apply notices as
/// they come, re-read the map every `refresh_interval` as a safety net, and
/// when the feed ends, subscribe again with backoff. Holds only a weak
/// reference between events, so dropping the state stops it.
async fn follow_rollovers(state: Weak<Inner>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(inner) = state.upgrade() else { return };
        let subscribe_timeout = inner.config.subscribe_timeout;
        let refresh_interval = inner.config.refresh_interval;
        let feed = match tokio::time::timeout(subscribe_timeout, inner.store.rollovers()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("subscribing took longer than {subscribe_timeout:?}").into())),
        };
        // Loaded after subscribing, so a rollover in between reaches us
        // through one or the other; and re-subscribing means notices may
        // have been missed, so the caches go too.
        if let Err(e) = inner.refresh_aliases(true).await {
            warn!(error = %e, "loading the alias map failed; retrying");
        }
        drop(inner);
        match feed {
            Ok(mut notices) => {
                if let Some(inner) = state.upgrade() {
                    inner.metrics.feed_reconnect();
                }
                backoff = MIN_BACKOFF;
                let mut tick = tokio::time::interval(refresh_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tokio::select! {
                        notice = notices.next() => {
                            let Some(inner) = state.upgrade() else { return };
                            match notice {
                                Some(notice) => inner.apply(notice),
                                None => {
                                    warn!("rollover feed ended; subscribing again");
                                    break;
                                }
                            }
                        }
                        _ = tick.tick() => {
                            let Some(inner) = state.upgrade() else { return };
                            if let Err(e) = inner.refresh_aliases(false).await {
                                warn!(error = %e, "periodic alias refresh failed");
                            }
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, retry_in = ?backoff, "subscribing to rollover notices failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_log_names_the_segments_rolled_over_since_and_forgets_the_oldest() {
        let (a, b) = (SegmentKey::new("ns", "a"), SegmentKey::new("ns", "b"));
        let mut log = NoticeLog::default();
        assert_eq!(log.rolled_since(0), Some(vec![]));
        let first = log.record(&a);
        log.record(&b);
        log.record(&a);
        assert_eq!(log.rolled_since(0), Some(vec![a.clone(), b.clone()]));
        assert_eq!(log.rolled_since(first), Some(vec![a.clone(), b.clone()]));
        assert_eq!(log.rolled_since(log.latest), Some(vec![]));
        assert_eq!(log.last_of[&a], 3);
        for _ in 0..NOTICE_LOG {
            log.record(&b);
        }
        assert_eq!(log.rolled_since(first), None, "notices after it were forgotten: read the user again");
        assert_eq!(log.rolled_since(log.latest - 1), Some(vec![b]));
    }
}
