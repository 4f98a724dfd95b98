//! Change events: on every rollover, one event per user who entered or
//! exited the segment, published to the changes topic (docs/realtime.md).
//!
//! Each version is announced once: the store hands out a claim per
//! (segment, version) and remembers the version announced last, which is
//! also the base of the next diff. Several workers seeing the same rollover
//! publish it once; a restarted worker does not publish it again. A worker
//! that dies in the middle of a version leaves a claim that expires; the
//! next one publishes the whole version again, so every event carries an
//! id for consumers to dedupe: the same for every publication of one
//! announcement, different for every other one ([`ChangeEvent::id`]).
//!
//! The diff itself comes from the two versions' index files (the
//! [`IndexSource`]), merged page by page ([`segment_core::index::diff_page`]),
//! with the realtime overrides each version does not reflect laid on top
//! as serving lays them ([`Diff`]): the store is asked for small state only
//! (the claim, the versions' metadata, the overrides), never for members.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use segment_core::api::SegmentKey;
use segment_core::index::{self, IdSet};
use segment_core::store::{Change, ChangesClaim, IndexSource, Override, SegmentStore, StoreError, Transition};
use serde::{Deserialize, Serialize};

/// Users per diff page: one page is published and acknowledged before the
/// next is read, so the events in flight stay bounded whatever the diff's
/// size (the two index files are held for the whole announcement).
pub const PAGE_SIZE: usize = 1_000;

/// One entered/exited event as published (JSON value; the key is the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// `ns/name@<incarnation>.<sequence>:<from>-<to>/<user>`, from the
    /// claim's [`Transition`]: the same for every publication of this
    /// announcement, so consumers dedupe on it; different in every other
    /// announcement, also when a rollback and the roll forward after it
    /// diff the same versions, or a re-created Segment numbers them from 1.
    pub id: String,
    pub segment: String,
    pub user: String,
    /// `entered` or `exited`.
    pub change: String,
    pub version: u64,
    pub previous_version: u64,
}

impl ChangeEvent {
    fn new(segment: &SegmentKey, transition: &Transition, from: u64, to: u64, change: &Change) -> ChangeEvent {
        let Transition { incarnation, sequence } = transition;
        ChangeEvent {
            id: format!("{segment}@{incarnation}.{sequence}:{from}-{to}/{}", change.user),
            segment: segment.to_string(),
            user: change.user.clone(),
            change: if change.entered { "entered" } else { "exited" }.to_string(),
            version: to,
            previous_version: from,
        }
    }
}

/// Where change events go (the changes topic in production).
#[async_trait]
pub trait ChangeSink: Send + Sync {
    /// Publishes the events and returns once every one is acknowledged.
    async fn publish(&self, events: &[ChangeEvent]) -> Result<(), String>;
}

/// What announcing one version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    Published {
        from: u64,
        entered: u64,
        exited: u64,
    },
    /// The first version seen: it becomes the base of the next diff, and
    /// there is nothing to diff it against.
    Baseline,
    AlreadyPublished,
    HeldElsewhere,
    /// The version announced last was deleted (retention: from the store,
    /// or its result files) before this one was announced, so the diff
    /// cannot be computed; this version becomes the new base.
    BaseGone {
        from: u64,
    },
    /// The index file of `version` (one of the two diffed) cannot be read,
    /// and reading it again would fail the same way: the version was
    /// computed before index files existed, or its file fails its checks.
    /// No events; the announced version becomes the new base.
    IndexUnreadable {
        from: u64,
        version: u64,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The store, or the object storage holding the index files, failed;
    /// the next resync retries.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing change events: {0}")]
    Sink(String),
    #[error("the claim on {segment} version {version} was taken over by another worker")]
    ClaimLost { segment: String, version: u64 },
}

/// Publishes the entered/exited events of `version` of `segment` unless
/// they were published already or another worker is publishing them.
/// `lease` must cover reading the two index files, and publishing one
/// page; it is renewed after the first and after every page.
///
/// An index file that cannot be read for now (object storage unreachable,
/// a read that failed) is an error: the claim stays with this worker,
/// which retries on its next resync (another takes over once the lease
/// expires). One that can never be read ends the announcement with no
/// events ([`Announcement::BaseGone`] when the base's result files were
/// collected, [`Announcement::IndexUnreadable`] otherwise).
pub async fn announce(
    store: &dyn SegmentStore,
    index: &dyn IndexSource,
    sink: &dyn ChangeSink,
    segment: &SegmentKey,
    version: u64,
    holder: &str,
    lease: Duration,
) -> Result<Announcement, AnnounceError> {
    let granted = store.claim_changes(segment, version, holder, lease).await?;
    let (from, transition) = match &granted {
        ChangesClaim::AlreadyPublished => return Ok(Announcement::AlreadyPublished),
        ChangesClaim::HeldElsewhere => return Ok(Announcement::HeldElsewhere),
        ChangesClaim::Granted { from: None, .. } => return finish(store, segment, version, holder, Announcement::Baseline).await,
        ChangesClaim::Granted { from: Some(from), transition } => (*from, transition),
    };
    let diff = match Diff::read(store, index, segment, from, version).await {
        Ok(diff) => diff,
        Err(Unreadable::BaseGone) => return finish(store, segment, version, holder, Announcement::BaseGone { from }).await,
        Err(Unreadable::Index { version: unreadable, error }) => {
            let done = Announcement::IndexUnreadable { from, version: unreadable, error: error.to_string() };
            return finish(store, segment, version, holder, done).await;
        }
        Err(Unreadable::ForNow(error)) => return Err(error.into()),
    };
    let renew = || async {
        // A claim taken over meanwhile is reported.
        match store.claim_changes(segment, version, holder, lease).await? == granted {
            true => Ok(()),
            false => Err(AnnounceError::ClaimLost { segment: segment.to_string(), version }),
        }
    };
    // Reading the files may have taken a while.
    renew().await?;
    let (mut entered, mut exited) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let (changes, next) = diff.page(cursor.as_deref(), PAGE_SIZE);
        let events: Vec<ChangeEvent> = changes.iter().map(|c| ChangeEvent::new(segment, transition, from, version, c)).collect();
        if !events.is_empty() {
            sink.publish(&events).await.map_err(AnnounceError::Sink)?;
        }
        entered += changes.iter().filter(|c| c.entered).count() as u64;
        exited += changes.iter().filter(|c| !c.entered).count() as u64;
        cursor = next;
        if cursor.is_none() {
            break;
        }
        renew().await?;
    }
    finish(store, segment, version, holder, Announcement::Published { from, entered, exited }).await
}

async fn finish(
    store: &dyn SegmentStore,
    segment: &SegmentKey,
    version: u64,
    holder: &str,
    done: Announcement,
) -> Result<Announcement, AnnounceError> {
    if store.finish_changes(segment, version, holder).await? {
        Ok(done)
    } else {
        Err(AnnounceError::ClaimLost { segment: segment.to_string(), version })
    }
}

/// Why a rollover's diff cannot be read.
#[derive(Debug)]
enum Unreadable {
    /// The base version is gone: deleted from the store, or its result
    /// files collected.
    BaseGone,
    /// The index file of `version` fails the same way on every read.
    Index { version: u64, error: StoreError },
    /// A store or object storage call failed; a later one may succeed.
    ForNow(StoreError),
}

/// One version as readers saw it: its index file, and the time up to
/// which its lake data reflects realtime events.
struct Seen {
    ids: IdSet,
    reflects_until: Option<DateTime<Utc>>,
}

impl Seen {
    /// Whether the user's override counts for this version
    /// ([`Override::counts_for`], the rule serving applies).
    fn counts(&self, change: &Override) -> bool {
        change.counts_for(self.reflects_until)
    }

    /// Whether readers saw `user` as a member: the override when it
    /// counts, else the index.
    fn has(&self, user: &str, change: &Override) -> bool {
        match self.counts(change) {
            true => change.includes(),
            false => self.ids.contains(user),
        }
    }
}

/// The members of two versions as readers saw them: each version's index
/// file, with the realtime overrides it does not reflect on top. So a user
/// an override kept in (or out of) the segment on both sides of the
/// rollover is no change, whether the new version's lake data agrees or
/// not: realtime includes and excludes are not announced.
pub struct Diff {
    old: Seen,
    new: Seen,
    /// The newest override of each user that counts for either version.
    overrides: BTreeMap<String, Override>,
}

impl Diff {
    /// The diff of `old` to `new`; `*_reflects_until` as
    /// [`StoredVersion::reflects_events_until`](segment_core::store::StoredVersion::reflects_events_until),
    /// `overrides` the segment's recorded ones (any order; the newest of a
    /// user wins, [`Override::supersedes`]).
    pub fn new(
        old: IdSet,
        old_reflects_until: Option<DateTime<Utc>>,
        new: IdSet,
        new_reflects_until: Option<DateTime<Utc>>,
        overrides: impl IntoIterator<Item = Override>,
    ) -> Diff {
        let old = Seen { ids: old, reflects_until: old_reflects_until };
        let new = Seen { ids: new, reflects_until: new_reflects_until };
        let mut newest: BTreeMap<String, Override> = BTreeMap::new();
        for change in overrides {
            if change.replaces(newest.get(&change.user)) {
                newest.insert(change.user.clone(), change);
            }
        }
        newest.retain(|_, change| old.counts(change) || new.counts(change));
        Diff { old, new, overrides: newest }
    }

    /// Reads what the diff of `from` to `to` needs: the versions' metadata
    /// and the overrides from the store, the index files from `index`.
    async fn read(
        store: &dyn SegmentStore,
        index: &dyn IndexSource,
        segment: &SegmentKey,
        from: u64,
        to: u64,
    ) -> Result<Diff, Unreadable> {
        let versions = store.versions(segment).await.map_err(Unreadable::ForNow)?;
        let Some(old) = versions.get(&from) else { return Err(Unreadable::BaseGone) };
        // The version being announced was deleted since it was activated:
        // the next rollover notice or resync announces what is active now.
        let new = versions
            .get(&to)
            .ok_or_else(|| Unreadable::ForNow(StoreError::MissingVersion { segment: segment.to_string(), version: to }))?;
        let (old_until, new_until) = (old.reflects_events_until(), new.reflects_events_until());
        let since = old_until.zip(new_until).map_or(DateTime::UNIX_EPOCH, |(a, b)| a.min(b));
        let overrides = store.overrides_since(segment, since).await.map_err(Unreadable::ForNow)?;
        let (old_ids, new_ids) = futures::join!(index.fetch(segment, from), index.fetch(segment, to));
        let unreadable = |version: u64, error: StoreError| match error {
            error if error.is_transient() => Unreadable::ForNow(error),
            StoreError::MissingVersion { .. } if version == from => Unreadable::BaseGone,
            error => Unreadable::Index { version, error },
        };
        let old_ids = old_ids.map_err(|e| unreadable(from, e))?;
        let new_ids = new_ids.map_err(|e| unreadable(to, e))?;
        Ok(Diff::new(old_ids, old_until, new_ids, new_until, overrides))
    }

    /// One page of the users who entered or exited, in id order, after the
    /// cursor `after`: at most `limit` (at least 1), and the next cursor,
    /// `None` once the diff is complete. A page may be empty with a next
    /// cursor (every change of the index's page was an override's).
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Change>, Option<String>) {
        let limit = limit.max(1);
        let (listed, index_next) = index::diff_page(&self.old.ids, &self.new.ids, after, limit);
        // The users this page decides: after the cursor, up to the last one
        // the index listed (all of them once it has listed its last).
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let upper = index_next.as_deref().map_or(Bound::Unbounded, Bound::Included);
        // A user with an override that counts is decided by it, listed by
        // the index or not.
        let mut page: Vec<Change> = listed.into_iter().filter(|c| !self.overrides.contains_key(&c.user)).collect();
        for (user, change) in self.overrides.range::<str, _>((lower, upper)) {
            let (was, is) = (self.old.has(user, change), self.new.has(user, change));
            if was != is {
                page.push(Change { user: user.clone(), entered: is });
            }
        }
        page.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        if page.len() > limit {
            page.truncate(limit);
            let next = page.last().map(|c| c.user.clone());
            return (page, next);
        }
        (page, index_next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segment_core::store::OverrideOp;
    use segment_core::store::{MemoryStore, Seal};
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect {
        events: Mutex<Vec<ChangeEvent>>,
        /// Fail the publish call with this number (1-based), once.
        fail_call: Mutex<Option<usize>>,
        calls: Mutex<usize>,
    }

    #[async_trait]
    impl ChangeSink for Collect {
        async fn publish(&self, events: &[ChangeEvent]) -> Result<(), String> {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            if *self.fail_call.lock().unwrap() == Some(*calls) {
                *self.fail_call.lock().unwrap() = None;
                return Err("broker unreachable".into());
            }
            self.events.lock().unwrap().extend_from_slice(events);
            Ok(())
        }
    }

    /// Index files in memory: each version's file, or the error reading it
    /// fails with. No entry: no result files (`MissingVersion`), as
    /// `ResultFiles` answers.
    #[derive(Default)]
    struct Files {
        files: Mutex<HashMap<u64, Result<Vec<u8>, StoreError>>>,
        fetches: Mutex<usize>,
    }

    impl Files {
        fn put(&self, version: u64, members: &[String]) {
            let bytes = index::build(members.iter().map(String::as_str)).unwrap();
            self.files.lock().unwrap().insert(version, Ok(bytes));
        }

        fn fail(&self, version: u64, error: StoreError) {
            self.files.lock().unwrap().insert(version, Err(error));
        }

        fn remove(&self, version: u64) {
            self.files.lock().unwrap().remove(&version);
        }
    }

    #[async_trait]
    impl IndexSource for Files {
        async fn fetch(&self, segment: &SegmentKey, version: u64) -> Result<IdSet, StoreError> {
            *self.fetches.lock().unwrap() += 1;
            match self.files.lock().unwrap().get(&version) {
                Some(Ok(bytes)) => IdSet::open(bytes.clone()).map_err(|e| StoreError::Other(e.to_string().into())),
                Some(Err(error)) => Err(error.clone()),
                None => Err(StoreError::MissingVersion { segment: segment.to_string(), version }),
            }
        }
    }

    fn users(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("u{i:05}")).collect()
    }

    const LEASE: Duration = Duration::from_secs(30);

    /// A computed version: its index file holds `members`; the store seals
    /// it with no members loaded, so nothing can be read from its sets.
    async fn computed(store: &MemoryStore, files: &Files, segment: &SegmentKey, version: u64, members: Vec<String>) {
        computed_at(store, files, segment, version, members, None).await;
    }

    /// [`computed`] with the time up to which its lake data reflects
    /// realtime events ([`Seal::overrides_from`]).
    async fn computed_at(
        store: &MemoryStore,
        files: &Files,
        segment: &SegmentKey,
        version: u64,
        members: Vec<String>,
        reflects_until: Option<DateTime<Utc>>,
    ) {
        files.put(version, &members);
        let seal = Seal { snapshot_time: reflects_until, overrides_from: reflects_until, ..Seal::default() };
        let sealed = store.seal_with(segment, version, &seal).await.unwrap();
        assert_eq!(sealed.members, 0, "no member sets in the store");
    }

    #[tokio::test]
    async fn each_version_is_announced_once_as_the_diff_from_the_last() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..3000)).await;
        computed(&store, &files, &segment, 2, users(1000..4500)).await;
        let sink = Collect::default();

        assert_eq!(announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        assert!(sink.events.lock().unwrap().is_empty());
        assert_eq!(*files.fetches.lock().unwrap(), 0, "a baseline reads no index file");

        let done = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 1, entered: 1500, exited: 1000 });
        let events = sink.events.lock().unwrap().clone();
        let entered: BTreeSet<String> = events.iter().filter(|e| e.change == "entered").map(|e| e.user.clone()).collect();
        let exited: BTreeSet<String> = events.iter().filter(|e| e.change == "exited").map(|e| e.user.clone()).collect();
        assert_eq!(entered, users(3000..4500).into_iter().collect());
        assert_eq!(exited, users(0..1000).into_iter().collect());
        assert_eq!(events.len(), 2500, "no user twice");
        assert!(events.iter().all(|e| e.version == 2 && e.previous_version == 1));
        let prefix = events[0].id.split_once(':').map(|(p, _)| p.to_string()).unwrap();
        assert!(prefix.starts_with("growth/vip@") && prefix.ends_with(".2"), "the second announcement: {prefix}");
        assert!(events.iter().all(|e| e.id == format!("{prefix}:1-2/{}", e.user)), "{:?}", &events[..2]);
        assert_eq!(*sink.calls.lock().unwrap(), 3, "pages of {PAGE_SIZE}");

        // A second worker, or this one after a restart, publishes nothing.
        assert_eq!(announce(&store, &files, &sink, &segment, 2, "w2", LEASE).await.unwrap(), Announcement::AlreadyPublished);
        assert_eq!(sink.events.lock().unwrap().len(), 2500);

        // A rollback is announced as the diff back.
        let back = announce(&store, &files, &sink, &segment, 1, "w2", LEASE).await.unwrap();
        assert_eq!(back, Announcement::Published { from: 2, entered: 1000, exited: 1500 });
    }

    #[tokio::test]
    async fn a_failed_publish_is_retried_by_the_same_worker() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(0..2500)).await;
        let sink = Collect::default();
        announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        *sink.fail_call.lock().unwrap() = Some(2);
        let error = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap_err();
        assert!(matches!(error, AnnounceError::Sink(ref m) if m == "broker unreachable"), "{error}");
        assert_eq!(announce(&store, &files, &sink, &segment, 2, "w2", LEASE).await.unwrap(), Announcement::HeldElsewhere);
        let retried = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap();
        assert_eq!(retried, Announcement::Published { from: 1, entered: 2490, exited: 0 });
        let events = sink.events.lock().unwrap();
        let distinct: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(distinct.len(), 2490, "every change published");
        assert_eq!(events.len(), 2490 + PAGE_SIZE, "the first page twice, under the same ids");
    }

    fn ids(events: &[ChangeEvent]) -> BTreeSet<String> {
        events.iter().map(|e| e.id.clone()).collect()
    }

    /// Publishes `version` and returns its events.
    async fn published(store: &MemoryStore, files: &Files, segment: &SegmentKey, version: u64) -> Vec<ChangeEvent> {
        let sink = Collect::default();
        let done = announce(store, files, &sink, segment, version, "w1", LEASE).await.unwrap();
        assert!(matches!(done, Announcement::Published { .. }), "v{version}: {done:?}");
        sink.events.into_inner().unwrap()
    }

    #[tokio::test]
    async fn every_announcement_has_ids_of_its_own() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(5..20)).await;
        let sink = Collect::default();
        assert_eq!(announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        let forward = published(&store, &files, &segment, 2).await;
        let back = published(&store, &files, &segment, 1).await;
        let forward_again = published(&store, &files, &segment, 2).await;
        // The same users enter the same version twice: two announcements, two sets of ids.
        assert_eq!(
            forward.iter().map(|e| (&e.user, &e.change)).collect::<Vec<_>>(),
            forward_again.iter().map(|e| (&e.user, &e.change)).collect::<Vec<_>>()
        );
        assert!(ids(&forward).is_disjoint(&ids(&forward_again)), "{:?} / {:?}", forward[0].id, forward_again[0].id);
        assert!(ids(&forward).is_disjoint(&ids(&back)) && ids(&back).is_disjoint(&ids(&forward_again)));

        // Deleted and created again: its versions start from 1 again, its ids do not repeat.
        store.delete_segment(&segment).await.unwrap();
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(5..20)).await;
        assert_eq!(announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        let recreated = published(&store, &files, &segment, 2).await;
        assert_eq!(recreated.len(), forward.len());
        assert!(ids(&forward).is_disjoint(&ids(&recreated)), "{:?} / {:?}", forward[0].id, recreated[0].id);
    }

    #[tokio::test]
    async fn a_worker_taking_over_a_dead_ones_claim_publishes_under_the_same_ids() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(5..2500)).await;
        announce(&store, &files, &Collect::default(), &segment, 1, "w1", LEASE).await.unwrap();
        // w1 publishes the first page, then dies; its claim (no lease left) expires.
        let dead = Collect { fail_call: Mutex::new(Some(2)), ..Default::default() };
        announce(&store, &files, &dead, &segment, 2, "w1", Duration::ZERO).await.unwrap_err();
        let first_page = ids(&dead.events.into_inner().unwrap());
        assert_eq!(first_page.len(), PAGE_SIZE);

        let again = Collect::default();
        let done = announce(&store, &files, &again, &segment, 2, "w2", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 1, entered: 2490, exited: 5 });
        let all = ids(&again.events.into_inner().unwrap());
        assert!(first_page.is_subset(&all), "the republished events keep their ids, so consumers drop them");
    }

    #[tokio::test]
    async fn a_deleted_base_makes_a_new_baseline() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 3, users(5..20)).await;
        let sink = Collect::default();
        announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        store.delete_version(&segment, 1).await.unwrap();
        assert_eq!(announce(&store, &files, &sink, &segment, 3, "w1", LEASE).await.unwrap(), Announcement::BaseGone { from: 1 });
        assert!(sink.events.lock().unwrap().is_empty());
        assert_eq!(announce(&store, &files, &sink, &segment, 3, "w1", LEASE).await.unwrap(), Announcement::AlreadyPublished);

        // The base still in the store, its result files collected
        // (`retention.keepResultsFor`): the same.
        computed(&store, &files, &segment, 4, users(0..30)).await;
        files.remove(3);
        assert_eq!(announce(&store, &files, &sink, &segment, 4, "w1", LEASE).await.unwrap(), Announcement::BaseGone { from: 3 });
        assert!(sink.events.lock().unwrap().is_empty());
    }

    /// An index file that cannot be read for now (object storage down) is
    /// retried: the claim stays with the worker, which publishes once the
    /// file reads again; meanwhile another worker leaves the version to it.
    #[tokio::test]
    async fn an_index_file_unreadable_for_now_is_retried_under_the_same_claim() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(5..20)).await;
        let sink = Collect::default();
        announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        files.fail(2, StoreError::Unavailable("reading s3://results/growth/vip/v2/: connection refused".into()));
        let error = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap_err();
        assert!(matches!(error, AnnounceError::Store(ref e) if e.is_transient()), "{error}");
        assert_eq!(announce(&store, &files, &sink, &segment, 2, "w2", LEASE).await.unwrap(), Announcement::HeldElsewhere);
        assert!(sink.events.lock().unwrap().is_empty());

        files.put(2, &users(5..20));
        let done = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 1, entered: 10, exited: 5 });
    }

    /// A version computed before index files existed (or whose file fails
    /// its checks) can never be diffed: the rollovers into and out of it
    /// publish nothing, each version becoming the base in turn, and the
    /// first rollover between two readable versions publishes again.
    #[tokio::test]
    async fn a_version_without_a_readable_index_file_is_announced_with_no_events() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        computed(&store, &files, &segment, 1, users(0..10)).await;
        computed(&store, &files, &segment, 2, users(5..20)).await;
        computed(&store, &files, &segment, 3, users(10..30)).await;
        computed(&store, &files, &segment, 4, users(0..30)).await;
        let no_index = StoreError::Other("file:///results/growth/vip/v2/: the version has no index file; recompute it".into());
        files.fail(2, no_index.clone());
        let sink = Collect::default();
        announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap();

        let into = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap();
        assert_eq!(into, Announcement::IndexUnreadable { from: 1, version: 2, error: no_index.to_string() });
        let out_of = announce(&store, &files, &sink, &segment, 3, "w1", LEASE).await.unwrap();
        assert_eq!(out_of, Announcement::IndexUnreadable { from: 2, version: 2, error: no_index.to_string() });
        assert!(sink.events.lock().unwrap().is_empty());
        assert_eq!(announce(&store, &files, &sink, &segment, 3, "w2", LEASE).await.unwrap(), Announcement::AlreadyPublished);

        // A damaged file: refused, never half-read.
        let mut damaged = index::build(users(0..30).iter().map(String::as_str)).unwrap();
        damaged[40] ^= 0x20;
        let checked = IdSet::open(damaged.clone()).map_err(|e| StoreError::Other(e.to_string().into())).unwrap_err();
        files.files.lock().unwrap().insert(4, Ok(damaged));
        let done = announce(&store, &files, &sink, &segment, 4, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::IndexUnreadable { from: 3, version: 4, error: checked.to_string() });

        computed(&store, &files, &segment, 5, users(25..40)).await;
        let done = announce(&store, &files, &sink, &segment, 5, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::IndexUnreadable { from: 4, version: 4, error: checked.to_string() });
        files.put(4, &users(0..30));
        computed(&store, &files, &segment, 6, users(30..40)).await;
        let done = announce(&store, &files, &sink, &segment, 6, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 5, entered: 0, exited: 5 });
    }

    fn at(hour: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 11, 1, hour, 0, 0).unwrap()
    }

    fn change(user: &str, op: OverrideOp, ts: DateTime<Utc>) -> Override {
        Override { user: user.into(), op, ts, id: format!("{user}@{ts}"), offset: None }
    }

    /// Readers see a version's index with the overrides it does not reflect
    /// on top, and the events describe what they saw change: a user an
    /// override keeps in or out on both sides is no change, whatever the
    /// index files say, and an override only the old version did not
    /// reflect yet is no change once the new version's lake data agrees.
    #[tokio::test]
    async fn overrides_count_on_each_side_as_readers_saw_them() {
        let (store, files) = (MemoryStore::new(), Files::default());
        let segment = SegmentKey::new("growth", "vip");
        // v1 reflects events until 10:00, v2 until 12:00.
        let v1 = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let v2 = ["a", "c", "f", "g", "h"].map(String::from).to_vec();
        computed_at(&store, &files, &segment, 1, v1, Some(at(10))).await;
        computed_at(&store, &files, &segment, 2, v2, Some(at(12))).await;
        store.activate(&segment, 1).await.unwrap();
        for change in [
            // After both: counts on both sides.
            change("a", OverrideOp::Exclude, at(13)), // out, out: no change (the index keeps a)
            change("b", OverrideOp::Include, at(13)), // in, in: no change (the index drops b)
            change("g", OverrideOp::Exclude, at(13)), // out, out: no change (the index adds g)
            change("x", OverrideOp::Include, at(13)), // in, in: no change (in neither index)
            // Between the two: v2's lake data has it.
            change("f", OverrideOp::Include, at(11)), // in (override), in (index): no change
            change("d", OverrideOp::Exclude, at(11)), // out (override), out (index): no change
            change("c", OverrideOp::Exclude, at(11)), // out (override), in (index): entered
            // Before both: the index answers on both sides.
            change("e", OverrideOp::Include, at(9)), // in, out: exited
            change("h", OverrideOp::Exclude, at(9)), // out, in: entered
        ] {
            store.record_override(&segment, &change).await.unwrap();
        }
        let sink = Collect::default();
        announce(&store, &files, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        let done = announce(&store, &files, &sink, &segment, 2, "w1", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 1, entered: 2, exited: 1 });
        let events: Vec<(String, String)> =
            sink.events.lock().unwrap().iter().map(|e| (e.user.clone(), e.change.clone())).collect();
        let expected = [("c", "entered"), ("e", "exited"), ("h", "entered")];
        assert_eq!(events, expected.map(|(u, c)| (u.to_string(), c.to_string())));
    }

    /// Pages mix the index's changes with the overrides' in id order, hold
    /// at most the page size, and every user is decided once, whatever the
    /// page size.
    #[test]
    fn pages_merge_the_index_and_the_overrides_in_order() {
        let old = users(0..100);
        let new = users(50..150);
        let open = |members: &[String]| IdSet::open(index::build(members.iter().map(String::as_str)).unwrap()).unwrap();
        let overrides = [
            // No change either side: drops a change the index lists.
            change("u00010", OverrideOp::Exclude, at(13)),
            change("u00120", OverrideOp::Include, at(13)),
            // Changes the index does not list, between and after its own.
            change("u00060", OverrideOp::Exclude, at(11)),
            change("u00070", OverrideOp::Exclude, at(11)),
            change("u99999", OverrideOp::Include, at(11)),
            change("zzz", OverrideOp::Include, at(9)), // reflected by both: no user
        ];
        let diff = Diff::new(open(&old), Some(at(10)), open(&new), Some(at(12)), overrides);
        let mut expected: Vec<Change> = Vec::new();
        for user in users(0..50).into_iter().filter(|u| u != "u00010") {
            expected.push(Change { user, entered: false });
        }
        for user in ["u00060", "u00070"] {
            expected.push(Change { user: user.into(), entered: true });
        }
        for user in users(100..150).into_iter().filter(|u| u != "u00120") {
            expected.push(Change { user, entered: true });
        }
        expected.push(Change { user: "u99999".into(), entered: false });
        for limit in [1, 2, 3, 7, 48, 49, 50, 51, 200] {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let (page, next) = diff.page(cursor.as_deref(), limit);
                assert!(page.len() <= limit, "limit {limit}: {} changes", page.len());
                all.extend(page);
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            assert_eq!(all, expected, "limit {limit}");
        }
    }
}
