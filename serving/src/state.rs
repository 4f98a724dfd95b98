//! Shared state: the versions this replica holds (each an index file in
//! memory), the alias map pointing at the active ones, the realtime
//! overrides laid on top, and the task that keeps all of it current from
//! the store's notices (docs/serving.md, "Index files").

use std::collections::{BTreeMap, HashMap};
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
use crate::indexes::{self, merge_override, IndexOptions, LoadedVersion, Overlay};
use crate::metrics::Metrics;
use crate::{ServingConfig, ServingStore};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A value with the cache generation it was read in. A read that started
/// before a notice may finish after it: tagging makes its answer invalid
/// instead of letting it outlive the notice.
#[derive(Clone)]
struct Tagged<T> {
    generation: u64,
    value: T,
}

/// A segment's active version as this replica holds it, with the
/// segment's entry in the users route's answer rendered once, when the
/// version became active, instead of on every request (serializing it was
/// a fifth of a request's work).
#[derive(Debug)]
pub struct ActiveSegment {
    pub segment: SegmentKey,
    pub version: u64,
    /// The version's members.
    pub(crate) index: Arc<LoadedVersion>,
    /// This segment as a [`UserSegment`](crate::api::UserSegment) in JSON.
    pub(crate) json: Box<str>,
}

impl ActiveSegment {
    pub(crate) fn new(segment: SegmentKey, index: Arc<LoadedVersion>) -> ActiveSegment {
        let json = crate::api::user_segment_json(&segment, index.version);
        ActiveSegment { segment, version: index.version, index, json }
    }
}

/// Segment → its active version. Hashed rather than ordered: the users
/// route probes every entry.
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
    /// What requests read through (the versions route only): one
    /// connection per serving thread, so a request and its store round
    /// trip stay on one thread.
    store: Arc<dyn ServingStore>,
}

struct Inner {
    /// The connection notices are followed, and indexes' metadata read,
    /// through.
    store: Arc<dyn ServingStore>,
    config: ServingConfig,
    metrics: Metrics,
    aliases: RwLock<Arc<AliasMap>>,
    /// Bumped by every notice and alias change: a version listing read
    /// before it may be stale.
    generation: AtomicU64,
    ready: AtomicBool,
    /// The store epoch last seen ([`StoreEpoch`]).
    epoch: Mutex<Option<String>>,
    /// The epoch seen before is gone: the store lost its state (flushed,
    /// replaced). Every read answers 503 until an epoch is back, rather
    /// than "in no segment" for everyone.
    state_lost: AtomicBool,
    /// segment → its sealed versions, for the versions route.
    versions: TtlCache<SegmentKey, Tagged<Versions>>,
    held: Held,
}

/// The versions this replica holds, and the overrides laid on top of
/// them. Only the task following the notices loads and evicts; requests
/// only read.
#[derive(Default)]
struct Held {
    /// Segment → version → its members. The active version, plus the one
    /// the operator asked to load ahead of a switch.
    versions: RwLock<HashMap<SegmentKey, BTreeMap<u64, Arc<LoadedVersion>>>>,
    /// Segment → the version the operator asked to load ([`Notice::Load`]).
    requested: Mutex<HashMap<SegmentKey, u64>>,
    /// Segment → its realtime overrides, newest per user.
    overlays: RwLock<HashMap<SegmentKey, Overlay>>,
    /// Every active version was held at once at least once: the replica
    /// may report itself live.
    complete: AtomicBool,
}

impl AppState {
    /// Builds the state and, inside a Tokio runtime, starts the task that
    /// loads the active versions and follows the notices (it stops once
    /// every clone of the state is dropped). Outside a runtime nothing is
    /// started and [`refresh_aliases`](Self::refresh_aliases) is up to the
    /// caller.
    pub fn new(store: Arc<dyn ServingStore>, config: ServingConfig) -> AppState {
        let inner = Arc::new(Inner {
            versions: TtlCache::new(config.cache_capacity, config.cache_ttl),
            store: store.clone(),
            config,
            metrics: Metrics::default(),
            aliases: Default::default(),
            generation: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            epoch: Mutex::new(None),
            state_lost: AtomicBool::new(false),
            held: Held::default(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow_notices(Arc::downgrade(&inner)));
        }
        AppState { inner, store }
    }

    /// A state sharing this one's versions, alias map and metrics that
    /// reads through `store`, another connection to the same store.
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

    /// True once every active version was held.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The active version of every segment, as this replica serves it.
    pub fn aliases(&self) -> Arc<AliasMap> {
        self.inner.aliases()
    }

    pub fn active_version(&self, segment: &SegmentKey) -> Option<u64> {
        self.aliases().get(segment).map(|active| active.version)
    }

    /// Re-reads the alias map and load requests from the store and holds
    /// whatever they name that is not held yet.
    pub async fn refresh_aliases(&self) -> Result<(), StoreError> {
        self.inner.refresh(false).await
    }

    /// Whether this replica answers for `user` (its shard holds the user).
    pub(crate) fn owns(&self, user: &str) -> bool {
        self.inner.config.index.shard.owns(user)
    }

    /// The user's active segments: one probe of each active version.
    pub(crate) fn user_segments(&self, user: &str) -> Result<ActiveSegments, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let aliases = inner.aliases();
        let overlays = inner.held.overlays.read().unwrap_or_else(|e| e.into_inner());
        let overlay_of = |segment: &SegmentKey| if overlays.is_empty() { None } else { overlays.get(segment) };
        let versions = aliases.values().map(|active| (active, &*active.index, overlay_of(&active.segment)));
        let mut active: Vec<Arc<ActiveSegment>> = indexes::holding(user, versions).into_iter().cloned().collect();
        active.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok(active.into())
    }

    /// The segment's active version as this replica serves it.
    pub(crate) fn active(&self, segment: &SegmentKey) -> Option<Arc<ActiveSegment>> {
        self.aliases().get(segment).cloned()
    }

    /// Each (active version, user) answered from that version. The caller
    /// holds the versions it took from one alias map, so a switch (and the
    /// eviction of the version left) in the middle of a request cannot
    /// take a version from under it.
    pub(crate) fn members(&self, checks: &[(Arc<ActiveSegment>, &str)]) -> Result<Vec<bool>, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let overlays = inner.held.overlays.read().unwrap_or_else(|e| e.into_inner());
        Ok(checks.iter().map(|(active, user)| active.index.has(user, overlays.get(&active.segment))).collect())
    }

    /// The sealed versions of a segment: cache, else one `versions` round trip.
    pub(crate) async fn versions(&self, segment: &SegmentKey) -> Result<Versions, StoreError> {
        let inner = &self.inner;
        inner.check_state()?;
        let generation = inner.generation.load(Ordering::Acquire);
        if let Some(hit) = inner.versions.get(segment).filter(|e| e.generation == generation) {
            inner.metrics.cache("versions", 1, 0);
            return Ok(hit.value);
        }
        inner.metrics.cache("versions", 0, 1);
        let value = Arc::new(inner.call("versions", self.store.versions(segment)).await?);
        inner.versions.insert(segment.clone(), Tagged { generation, value: value.clone() });
        Ok(value)
    }
}

impl Inner {
    fn aliases(&self) -> Arc<AliasMap> {
        self.aliases.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn options(&self) -> &IndexOptions {
        &self.config.index
    }

    fn held_version(&self, segment: &SegmentKey, version: u64) -> Option<Arc<LoadedVersion>> {
        let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
        held.get(segment).and_then(|versions| versions.get(&version)).cloned()
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

    /// Refuses every read while the store's state is lost, and before the
    /// replica holds every active version: "in no segment" would be wrong.
    fn check_state(&self) -> Result<(), StoreError> {
        if self.state_lost.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "the store lost its state (its epoch is gone); reads fail until it is restored or rebuilt".into(),
            ));
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("this replica is still loading the active versions' index files".into()));
        }
        Ok(())
    }

    /// Compares the epoch just read with the one seen before. Returns
    /// `None` when the state was lost (nothing read with it may be used),
    /// else whether the store changed under us (a restore or a rebuilt
    /// store: everything held is stale).
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
                    info!(epoch = %id, "the store has state again; versions held dropped");
                }
                *seen = Some(id);
                Some(was_lost || changed)
            }
        }
    }

    /// Holds `version` of `segment` in memory: fetches its index and the
    /// overrides it does not reflect, then reports what the segment holds.
    /// Only the task following the notices calls it.
    async fn hold(&self, segment: &SegmentKey, version: u64) -> Result<Arc<LoadedVersion>, StoreError> {
        if let Some(loaded) = self.held_version(segment, version) {
            return Ok(loaded);
        }
        let started = std::time::Instant::now();
        let versions = self.call("versions", self.store.versions(segment)).await?;
        let stored = versions.get(&version).ok_or(StoreError::MissingVersion { segment: segment.to_string(), version })?;
        let reflects_until = stored.reflects_events_until();
        // No store deadline: fetching a large file takes what it takes,
        // and requests are answered from what is held meanwhile.
        let ids = self.options().source.fetch(segment, version).await?;
        let shard = self.options().shard;
        let ids =
            shard.part_of(ids).map_err(|e| StoreError::Other(format!("{segment} v{version}: shard {shard}: {e}").into()))?;
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
        self.report(segment).await;
        Ok(loaded)
    }

    /// Drops the segment's versions that are neither active nor requested,
    /// and its overrides once it holds none.
    async fn evict(&self, segment: &SegmentKey) {
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
            self.report(segment).await;
        }
    }

    /// Tells the operator which versions of `segment` this replica holds.
    /// A failed report only delays a switch: the next load or refresh
    /// reports again.
    async fn report(&self, segment: &SegmentKey) {
        let versions: Vec<u64> = {
            let held = self.held.versions.read().unwrap_or_else(|e| e.into_inner());
            held.get(segment).map(|versions| versions.keys().copied().collect()).unwrap_or_default()
        };
        let report = self.store.report_loaded(&self.options().replica, segment, &versions);
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

    /// Applies one notice: a rollover switches once the version is held, a
    /// load request is fetched ahead of its switch, an override goes on top
    /// of the segment's versions.
    async fn apply(&self, notice: Notice) {
        match notice {
            Notice::Rollover(Rollover { segment, version: Some(version) }) => {
                self.metrics.rollover_notice();
                debug!(%segment, version, "rollover notice");
                match self.hold(&segment, version).await {
                    Ok(loaded) => {
                        self.finish_request(&segment, version);
                        self.switch(&segment, Some(Arc::new(ActiveSegment::new(segment.clone(), loaded))));
                        self.evict(&segment).await;
                    }
                    // The operator switched without this replica (its load
                    // timeout ran out): it keeps answering from the version
                    // it holds; the periodic refresh tries again.
                    Err(e) => warn!(%segment, version, error = %e, "loading the new active version failed"),
                }
            }
            Notice::Rollover(Rollover { segment, version: None }) => {
                self.metrics.rollover_notice();
                debug!(%segment, "withdrawn");
                self.held.requested.lock().unwrap_or_else(|e| e.into_inner()).remove(&segment);
                self.switch(&segment, None);
                self.evict(&segment).await;
            }
            Notice::Load { segment, version } => {
                self.held.requested.lock().unwrap_or_else(|e| e.into_inner()).insert(segment.clone(), version);
                if let Err(e) = self.hold(&segment, version).await {
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

    /// Points `segment`'s alias at `active` (`None`: removes it).
    fn switch(&self, segment: &SegmentKey, active: Option<Arc<ActiveSegment>>) {
        {
            let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**aliases).clone();
            match active {
                Some(active) => next.insert(segment.clone(), active),
                None => next.remove(segment),
            };
            *aliases = Arc::new(next);
        }
        // After the alias changed: a listing read from now on is at least
        // as new as the switch.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Re-reads the aliases and load requests, holds every version they
    /// name (fetching what is missing, a few at a time), then points the
    /// alias map at them. Ready, and reported live, only once every active
    /// version is held. `resubscribed`: notices may have been missed, so
    /// the overrides are read again too.
    async fn refresh(&self, resubscribed: bool) -> Result<(), StoreError> {
        let (fresh, epoch) = self.call("aliases", self.store.aliases_with_epoch()).await?;
        let Some(store_changed) = self.follow_epoch(epoch) else {
            // Keeps what it holds: answers resume once the state is back.
            return Ok(());
        };
        if store_changed {
            // A rebuilt store's version numbers may name other members.
            self.held.versions.write().unwrap_or_else(|e| e.into_inner()).clear();
            self.held.overlays.write().unwrap_or_else(|e| e.into_inner()).clear();
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let requests = self.call("load_requests", self.store.load_requests()).await?;
        *self.held.requested.lock().unwrap_or_else(|e| e.into_inner()) = requests.clone().into_iter().collect();
        if resubscribed || store_changed {
            self.reload_overlays().await?;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let wanted: Vec<(SegmentKey, u64)> = fresh
            .iter()
            .chain(requests.iter())
            .filter(|(segment, version)| self.held_version(segment, **version).is_none())
            .map(|(segment, version)| (segment.clone(), *version))
            .collect();
        let failed: Vec<(SegmentKey, u64, StoreError)> = futures::stream::iter(wanted)
            .map(|(segment, version)| async move {
                let result = self.hold(&segment, version).await;
                (segment, version, result)
            })
            .buffer_unordered(self.options().parallel_loads.max(1))
            .filter_map(|(segment, version, result)| async move { result.err().map(|e| (segment, version, e)) })
            .collect()
            .await;
        for (segment, version, error) in &failed {
            warn!(%segment, version, %error, "loading an index failed; retrying on the next refresh");
        }
        let complete = self.point_aliases_at_held(&fresh);
        let segments: Vec<SegmentKey> = self.held.versions.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for segment in segments {
            self.evict(&segment).await;
        }
        if complete {
            self.held.complete.store(true, Ordering::Release);
        }
        if self.held.complete.load(Ordering::Acquire) {
            let until = Utc::now() + self.options().liveness;
            self.call("replica_alive", self.store.replica_alive(&self.options().replica, until)).await?;
            if !self.ready.swap(true, Ordering::AcqRel) {
                info!(segments = fresh.len(), "every active version is held; ready");
            }
        }
        Ok(())
    }

    /// Makes the alias map serve, for each active version of `fresh`, the
    /// held version; a segment whose active version is not held keeps the
    /// version it was served from. True when every active version is held.
    fn point_aliases_at_held(&self, fresh: &BTreeMap<SegmentKey, u64>) -> bool {
        let mut complete = true;
        let before = self.aliases();
        let mut next = AliasMap::default();
        for (segment, version) in fresh {
            match self.held_version(segment, *version) {
                Some(loaded) => {
                    let unchanged = before.get(segment).filter(|active| Arc::ptr_eq(&active.index, &loaded));
                    let entry = unchanged.cloned().unwrap_or_else(|| Arc::new(ActiveSegment::new(segment.clone(), loaded)));
                    next.insert(segment.clone(), entry);
                }
                None => {
                    complete = false;
                    if let Some(kept) = before.get(segment).filter(|kept| self.held_version(segment, kept.version).is_some()) {
                        next.insert(segment.clone(), kept.clone());
                    }
                }
            }
        }
        let changed = next.len() != before.len()
            || next.iter().any(|(segment, active)| before.get(segment).is_none_or(|old| !Arc::ptr_eq(old, active)));
        if changed {
            *self.aliases.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        complete
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

/// Keeps the held versions current: subscribe, hold what the aliases and
/// load requests name, apply notices as they come, refresh every
/// `refresh_interval` as a safety net (and to renew the liveness report),
/// and when the feed ends, subscribe again with backoff. Holds only a weak
/// reference between events, so dropping the state stops it.
async fn follow_notices(state: Weak<Inner>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(inner) = state.upgrade() else { return };
        let subscribe_timeout = inner.config.subscribe_timeout;
        let refresh_interval = inner.config.refresh_interval;
        let feed = match tokio::time::timeout(subscribe_timeout, inner.store.notices()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("subscribing took longer than {subscribe_timeout:?}").into())),
        };
        // Read after subscribing, so a notice in between reaches us through
        // one or the other; and re-subscribing means notices may have been
        // missed, so overrides are read again too.
        if let Err(e) = inner.refresh(true).await {
            warn!(error = %e, "loading the active versions failed; retrying");
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
                                Some(notice) => inner.apply(notice).await,
                                None => {
                                    warn!("notice feed ended; subscribing again");
                                    break;
                                }
                            }
                        }
                        _ = tick.tick() => {
                            let Some(inner) = state.upgrade() else { return };
                            if let Err(e) = inner.refresh(false).await {
                                warn!(error = %e, "periodic refresh failed");
                            }
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, retry_in = ?backoff, "subscribing to notices failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
