//! Shared state: the store handle, the alias map kept in memory, the
//! caches in front of the store, and the task that keeps the alias map
//! current from rollover notices.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use segment_core::api::SegmentKey;
use segment_core::store::{Notice, Rollover, StoreEpoch, StoreError, StoredVersion};
use tracing::{debug, info, warn};

use crate::auth::Tokens;
use crate::cache::TtlCache;
use crate::indexes::{merge_override, IndexOptions, LoadedVersion, Overlay};
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
    /// The version's members, when this replica serves from index files.
    pub(crate) index: Option<Arc<LoadedVersion>>,
    /// This segment as a [`UserSegment`](crate::api::UserSegment) in JSON.
    pub(crate) json: Box<str>,
}

impl ActiveSegment {
    pub(crate) fn new(segment: SegmentKey, version: u64) -> ActiveSegment {
        let json = crate::api::user_segment_json(&segment, version);
        ActiveSegment { segment, version, index: None, json }
    }

    /// The alias map's entry for `segment` at `version`.
    fn entry(segment: SegmentKey, version: u64) -> (SegmentKey, Arc<ActiveSegment>) {
        (segment.clone(), Arc::new(ActiveSegment::new(segment, version)))
    }

    /// The alias map's entry for a version held in memory.
    fn indexed(segment: SegmentKey, loaded: Arc<LoadedVersion>) -> (SegmentKey, Arc<ActiveSegment>) {
        let mut active = ActiveSegment::new(segment.clone(), loaded.version);
        active.index = Some(loaded);
        (segment, Arc::new(active))
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
    /// What this replica holds when it serves from index files.
    held: Held,
}

/// The versions a replica serving from index files holds, and the
/// overrides laid on top of them. Only the task following the notices
/// loads and evicts; requests only read.
#[derive(Default)]
struct Held {
    /// Segment → version → its members. The active version, plus the one
    /// the operator asked to load ahead of a switch.
    versions: RwLock<HashMap<SegmentKey, BTreeMap<u64, Arc<LoadedVersion>>>>,
    /// Segment → the version the operator asked to load ([`Notice::Load`]).
    requested: Mutex<HashMap<SegmentKey, u64>>,
    /// Segment → its realtime overrides, newest per user.
    overlays: RwLock<HashMap<SegmentKey, Overlay>>,
    /// Every active version was loaded at least once: the replica may
    /// report itself live.
    complete: AtomicBool,
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
            held: Held::default(),
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
        if inner.config.index.is_some() {
            return Ok(inner.indexed_user_segments(user));
        }
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
        if inner.config.index.is_some() {
            return inner.indexed_members(triples);
        }
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

    /// The user's active segments, one probe of each active version held.
    fn indexed_user_segments(&self, user: &str) -> ActiveSegments {
        let aliases = self.aliases();
        let overlays = self.held.overlays.read().unwrap_or_else(|e| e.into_inner());
        let overlay_of = |segment: &SegmentKey| if overlays.is_empty() { None } else { overlays.get(segment) };
        let mut active: Vec<Arc<ActiveSegment>> = aliases
            .values()
            .filter(|active| active.index.as_ref().is_some_and(|index| index.has(user, overlay_of(&active.segment))))
            .cloned()
            .collect();
        active.sort_by(|a, b| a.segment.cmp(&b.segment));
        active.into()
    }

    /// Each (segment, version, user) answered from the versions held.
    fn indexed_members(&self, triples: &[(SegmentKey, u64, String)]) -> Result<Vec<bool>, StoreError> {
        let aliases = self.aliases();
        let overlays = self.held.overlays.read().unwrap_or_else(|e| e.into_inner());
        let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
        triples
            .iter()
            .map(|(segment, version, user)| {
                let active =
                    aliases.get(segment).and_then(|active| active.index.as_ref()).filter(|index| index.version == *version);
                let loaded =
                    active.or_else(|| held.get(segment).and_then(|versions| versions.get(version))).ok_or_else(|| {
                        StoreError::Unavailable(format!("version {version} of {segment} is not loaded on this replica").into())
                    })?;
                Ok(loaded.has(user, overlays.get(segment)))
            })
            .collect()
    }

    fn index_options(&self) -> Option<&IndexOptions> {
        self.config.index.as_ref()
    }

    fn held_version(&self, segment: &SegmentKey, version: u64) -> Option<Arc<LoadedVersion>> {
        let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
        held.get(segment).and_then(|versions| versions.get(&version)).cloned()
    }

    /// Holds `version` of `segment` in memory: fetches its index and the
    /// overrides it does not reflect, then reports what the segment holds.
    /// Only the task following the notices calls it.
    async fn hold(&self, options: &IndexOptions, segment: &SegmentKey, version: u64) -> Result<Arc<LoadedVersion>, StoreError> {
        if let Some(loaded) = self.held_version(segment, version) {
            return Ok(loaded);
        }
        let started = std::time::Instant::now();
        let versions = self.call("versions", self.store.versions(segment)).await?;
        let stored = versions.get(&version).ok_or(StoreError::MissingVersion { segment: segment.to_string(), version })?;
        let reflects_until = stored.reflects_events_until();
        // No store deadline: fetching a large file takes what it takes,
        // and requests are answered from what is held meanwhile.
        let ids = options.source.fetch(segment, version).await?;
        let since = reflects_until.unwrap_or(DateTime::UNIX_EPOCH);
        let overrides = self.call("overrides_since", self.store.overrides_since(segment, since)).await?;
        {
            let mut overlays = self.held.overlays.write().unwrap_or_else(|e| e.into_inner());
            let overlay = overlays.entry(segment.clone()).or_default();
            for change in overrides {
                merge_override(overlay, change);
            }
        }
        let loaded = Arc::new(LoadedVersion::new(version, ids, reflects_until));
        self.held
            .versions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(segment.clone())
            .or_default()
            .insert(version, loaded.clone());
        self.metrics.index_loaded(started.elapsed().as_secs_f64());
        self.update_held_metrics();
        info!(%segment, version, members = loaded.members(), bytes = loaded.bytes(), seconds = started.elapsed().as_secs_f64(), "index loaded");
        self.report(options, segment).await;
        Ok(loaded)
    }

    /// Drops the segment's versions that are neither active nor requested,
    /// and its overrides once it holds none.
    async fn evict(&self, options: &IndexOptions, segment: &SegmentKey) {
        let active = self.aliases().get(segment).map(|active| active.version);
        let requested = self.held.requested.lock().unwrap_or_else(|e| e.into_inner()).get(segment).copied();
        let changed = {
            let mut held = self.held.versions.write().unwrap_or_else(|e| e.into_inner());
            let Some(versions) = held.get_mut(segment) else { return };
            let before = versions.len();
            versions.retain(|version, _| Some(*version) == active || Some(*version) == requested);
            let changed = versions.len() != before;
            if versions.is_empty() {
                held.remove(segment);
                self.held.overlays.write().unwrap_or_else(|e| e.into_inner()).remove(segment);
            }
            changed
        };
        if changed {
            self.update_held_metrics();
            self.report(options, segment).await;
        }
    }

    /// Tells the operator which versions of `segment` this replica holds.
    /// A failed report only delays a switch: the next load or refresh
    /// reports again.
    async fn report(&self, options: &IndexOptions, segment: &SegmentKey) {
        let versions: Vec<u64> = {
            let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
            held.get(segment).map(|versions| versions.keys().copied().collect()).unwrap_or_default()
        };
        let report = self.store.report_loaded(&options.replica, segment, &versions);
        if let Err(e) = self.call("report_loaded", report).await {
            warn!(%segment, error = %e, "reporting the versions held failed");
        }
    }

    fn update_held_metrics(&self) {
        let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
        let (bytes, members) = held
            .values()
            .flat_map(|versions| versions.values())
            .fold((0u64, 0u64), |(bytes, members), loaded| (bytes + loaded.bytes() as u64, members + loaded.members()));
        self.metrics.index_held(bytes, members);
    }

    /// Applies a notice when serving from index files: a rollover switches
    /// once the version is held, a load request is fetched ahead of its
    /// switch, an override goes on top of the segment's versions.
    async fn apply_indexed(&self, options: &IndexOptions, notice: Notice) {
        match notice {
            Notice::Rollover(Rollover { segment, version: Some(version) }) => {
                self.metrics.rollover_notice();
                match self.hold(options, &segment, version).await {
                    Ok(loaded) => {
                        self.finish_request(&segment, version);
                        self.switch(&segment, Some(ActiveSegment::indexed(segment.clone(), loaded).1));
                        self.evict(options, &segment).await;
                    }
                    // The operator switched without this replica (its load
                    // timeout ran out): it keeps answering from the version it
                    // has; the periodic refresh tries again.
                    Err(e) => warn!(%segment, version, error = %e, "loading the new active version failed"),
                }
            }
            Notice::Rollover(Rollover { segment, version: None }) => {
                self.metrics.rollover_notice();
                self.held.requested.lock().unwrap_or_else(|e| e.into_inner()).remove(&segment);
                self.switch(&segment, None);
                self.evict(options, &segment).await;
            }
            Notice::Load { segment, version } => {
                self.held.requested.lock().unwrap_or_else(|e| e.into_inner()).insert(segment.clone(), version);
                if let Err(e) = self.hold(options, &segment, version).await {
                    warn!(%segment, version, error = %e, "loading a requested version failed");
                }
            }
            Notice::Override { segment, change } => {
                let mut overlays = self.held.overlays.write().unwrap_or_else(|e| e.into_inner());
                if let Some(overlay) = overlays.get_mut(&segment) {
                    merge_override(overlay, change);
                }
            }
        }
    }

    fn finish_request(&self, segment: &SegmentKey, version: u64) {
        let mut requested = self.held.requested.lock().unwrap_or_else(|e| e.into_inner());
        if requested.get(segment) == Some(&version) {
            requested.remove(segment);
        }
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
        // A replica serving from index files knows nobody's segments until
        // it holds every active version: "in no segment" would be wrong.
        if self.config.index.is_some() && !self.ready.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("this replica is still loading the active versions' index files".into()));
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
        let active = notice.version.map(|version| ActiveSegment::entry(notice.segment.clone(), version).1);
        self.switch(&notice.segment, active);
    }

    /// Points `segment`'s alias at `active` (`None`: removes it) and marks
    /// the segment's cached answers stale.
    fn switch(&self, segment: &SegmentKey, active: Option<Arc<ActiveSegment>>) {
        {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**aliases).clone();
            match active {
                Some(active) => {
                    next.insert(segment.clone(), active);
                }
                None => {
                    next.remove(segment);
                }
            }
            *aliases = Arc::new(next);
        }
        // After the alias changed: a request that sees the new notice
        // number also sees the new alias. Only this segment's cached
        // answers are stale; the version list goes, user entries are
        // patched when read.
        let seq = self.notices.write().unwrap_or_else(|e| e.into_inner()).record(segment);
        self.notice_seq.store(seq, Ordering::Release);
        self.versions.remove(segment);
    }

    /// Applies one notice: rollovers only, unless serving from index files.
    async fn apply_notice(&self, notice: Notice) {
        match (self.index_options(), notice) {
            (Some(options), notice) => self.apply_indexed(options, notice).await,
            (None, Notice::Rollover(rollover)) => self.apply(rollover),
            // Overrides reach the Redis layout's members directly; cached
            // answers keep them out for at most the cache TTL.
            (None, Notice::Load { .. } | Notice::Override { .. }) => {}
        }
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
        if let Some(options) = self.index_options() {
            return self.refresh_indexed(options, fresh, changed_anyway, store_changed).await;
        }
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

impl Inner {
    /// [`refresh_aliases`](Self::refresh_aliases) when serving from index
    /// files: holds every active and requested version (fetching what is
    /// missing, a few at a time), then points the alias map at them. Ready,
    /// and reported live, only once every active version is held.
    async fn refresh_indexed(
        &self,
        options: &IndexOptions,
        fresh: BTreeMap<SegmentKey, u64>,
        resubscribed: bool,
        store_changed: bool,
    ) -> Result<(), StoreError> {
        if store_changed {
            // A rebuilt store's version numbers may name other members.
            self.held.versions.write().unwrap_or_else(|e| e.into_inner()).clear();
            self.held.overlays.write().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let requests = self.call("load_requests", self.store.load_requests()).await?;
        *self.held.requested.lock().unwrap_or_else(|e| e.into_inner()) = requests.clone().into_iter().collect();
        if resubscribed {
            // Override notices may have been missed: read each held
            // segment's overrides again.
            self.reload_overlays().await?;
        }
        let wanted: Vec<(SegmentKey, u64)> = fresh
            .iter()
            .chain(requests.iter())
            .filter(|(segment, version)| self.held_version(segment, **version).is_none())
            .map(|(segment, version)| (segment.clone(), *version))
            .collect();
        let failed: Vec<(SegmentKey, u64, StoreError)> = futures::stream::iter(wanted)
            .map(|(segment, version)| async move {
                let result = self.hold(options, &segment, version).await;
                (segment, version, result)
            })
            .buffer_unordered(options.parallel_loads.max(1))
            .filter_map(|(segment, version, result)| async move { result.err().map(|e| (segment, version, e)) })
            .collect()
            .await;
        for (segment, version, error) in &failed {
            warn!(%segment, version, %error, "loading an index failed; retrying on the next refresh");
        }
        let mut complete = true;
        let before = self.aliases();
        let mut next = AliasMap::default();
        for (segment, version) in &fresh {
            match self.held_version(segment, *version) {
                Some(loaded) => {
                    let unchanged =
                        before.get(segment).filter(|active| active.index.as_ref().is_some_and(|i| Arc::ptr_eq(i, &loaded)));
                    let entry = unchanged.cloned().unwrap_or_else(|| ActiveSegment::indexed(segment.clone(), loaded).1);
                    next.insert(segment.clone(), entry);
                }
                None => {
                    complete = false;
                    // Keeps answering from the version it has, if any.
                    if let Some(kept) = before.get(segment).filter(|active| active.index.is_some()) {
                        next.insert(segment.clone(), kept.clone());
                    }
                }
            }
        }
        let changed = next.len() != before.len()
            || next.iter().any(|(segment, active)| before.get(segment).is_none_or(|old| !Arc::ptr_eq(old, active)));
        if changed {
            let rolled: Vec<SegmentKey> = before
                .keys()
                .chain(next.keys())
                .filter(|segment| match (before.get(*segment), next.get(*segment)) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    _ => true,
                })
                .cloned()
                .collect();
            *self.aliases.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            for segment in rolled {
                self.versions.remove(&segment);
            }
        }
        let segments: Vec<SegmentKey> = self.held.versions.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for segment in segments {
            self.evict(options, &segment).await;
        }
        if complete {
            self.held.complete.store(true, Ordering::Release);
        }
        if self.held.complete.load(Ordering::Acquire) {
            let until = Utc::now() + options.liveness;
            self.call("replica_alive", self.store.replica_alive(&options.replica, until)).await?;
            if !self.ready.swap(true, Ordering::AcqRel) {
                info!(segments = fresh.len(), "every active version is held; ready");
            }
        }
        Ok(())
    }

    /// Reads every held segment's overrides again (after a gap in the
    /// notices), from the oldest time a held version does not reflect.
    async fn reload_overlays(&self) -> Result<(), StoreError> {
        let since: Vec<(SegmentKey, DateTime<Utc>)> = {
            let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
            held.iter()
                .map(|(segment, versions)| {
                    let oldest = versions.values().map(|v| v.reflects_until().unwrap_or(DateTime::UNIX_EPOCH)).min();
                    (segment.clone(), oldest.unwrap_or(DateTime::UNIX_EPOCH))
                })
                .collect()
        };
        for (segment, since) in since {
            let overrides = self.call("overrides_since", self.store.overrides_since(&segment, since)).await?;
            let mut overlays = self.held.overlays.write().unwrap_or_else(|e| e.into_inner());
            let overlay = overlays.entry(segment).or_default();
            for change in overrides {
                merge_override(overlay, change);
            }
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
        let feed = match tokio::time::timeout(subscribe_timeout, inner.store.notices()).await {
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
                                Some(notice) => inner.apply_notice(notice).await,
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
