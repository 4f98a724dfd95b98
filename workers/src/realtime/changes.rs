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

use std::time::Duration;

use async_trait::async_trait;
use segment_core::api::SegmentKey;
use segment_core::store::{Change, ChangesClaim, SegmentStore, StoreError, Transition};
use serde::{Deserialize, Serialize};

/// Users per diff page: one page is published and acknowledged before the
/// next is read, so memory stays bounded whatever the diff's size.
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
    /// The version announced last was deleted (retention) before this one
    /// was announced, so the diff cannot be computed; this version becomes
    /// the new base.
    BaseGone {
        from: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing change events: {0}")]
    Sink(String),
    #[error("the claim on {segment} version {version} was taken over by another worker")]
    ClaimLost { segment: String, version: u64 },
}

/// Publishes the entered/exited events of `version` of `segment` unless
/// they were published already or another worker is publishing them.
/// `lease` must cover publishing one page; it is renewed on every page.
pub async fn announce(
    store: &dyn SegmentStore,
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
    let (mut entered, mut exited) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let page = match store.diff_page(segment, from, version, cursor.as_deref(), PAGE_SIZE).await {
            Ok(page) => page,
            Err(StoreError::MissingVersion { version: missing, .. }) if missing == from => {
                return finish(store, segment, version, holder, Announcement::BaseGone { from }).await;
            }
            Err(e) => return Err(e.into()),
        };
        let events: Vec<ChangeEvent> =
            page.changes.iter().map(|c| ChangeEvent::new(segment, transition, from, version, c)).collect();
        if !events.is_empty() {
            sink.publish(&events).await.map_err(AnnounceError::Sink)?;
        }
        entered += page.changes.iter().filter(|c| c.entered).count() as u64;
        exited += page.changes.iter().filter(|c| !c.entered).count() as u64;
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
        // Renews the lease; a claim taken over meanwhile is reported below.
        if store.claim_changes(segment, version, holder, lease).await? != granted {
            return Err(AnnounceError::ClaimLost { segment: segment.to_string(), version });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use segment_core::store::MemoryStore;
    use std::collections::BTreeSet;
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

    fn users(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("u{i:05}")).collect()
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn each_version_is_announced_once_as_the_diff_from_the_last() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, users(0..3000), None, None);
        store.load_version(&segment, 2, users(1000..4500), None, None);
        let sink = Collect::default();

        assert_eq!(announce(&store, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        assert!(sink.events.lock().unwrap().is_empty());

        let done = announce(&store, &sink, &segment, 2, "w1", LEASE).await.unwrap();
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

        // A second worker, or this one after a restart, publishes nothing.
        assert_eq!(announce(&store, &sink, &segment, 2, "w2", LEASE).await.unwrap(), Announcement::AlreadyPublished);
        assert_eq!(sink.events.lock().unwrap().len(), 2500);

        // A rollback is announced as the diff back.
        let back = announce(&store, &sink, &segment, 1, "w2", LEASE).await.unwrap();
        assert_eq!(back, Announcement::Published { from: 2, entered: 1000, exited: 1500 });
    }

    #[tokio::test]
    async fn a_failed_publish_is_retried_by_the_same_worker() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, users(0..10), None, None);
        store.load_version(&segment, 2, users(0..2500), None, None);
        let sink = Collect::default();
        announce(&store, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        *sink.fail_call.lock().unwrap() = Some(2);
        let error = announce(&store, &sink, &segment, 2, "w1", LEASE).await.unwrap_err();
        assert!(matches!(error, AnnounceError::Sink(ref m) if m == "broker unreachable"), "{error}");
        assert_eq!(announce(&store, &sink, &segment, 2, "w2", LEASE).await.unwrap(), Announcement::HeldElsewhere);
        let retried = announce(&store, &sink, &segment, 2, "w1", LEASE).await.unwrap();
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
    async fn published(store: &MemoryStore, segment: &SegmentKey, version: u64) -> Vec<ChangeEvent> {
        let sink = Collect::default();
        let done = announce(store, &sink, segment, version, "w1", LEASE).await.unwrap();
        assert!(matches!(done, Announcement::Published { .. }), "v{version}: {done:?}");
        sink.events.into_inner().unwrap()
    }

    #[tokio::test]
    async fn every_announcement_has_ids_of_its_own() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, users(0..10), None, None);
        store.load_version(&segment, 2, users(5..20), None, None);
        let sink = Collect::default();
        assert_eq!(announce(&store, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        let forward = published(&store, &segment, 2).await;
        let back = published(&store, &segment, 1).await;
        let forward_again = published(&store, &segment, 2).await;
        // The same users enter the same version twice: two announcements, two sets of ids.
        assert_eq!(
            forward.iter().map(|e| (&e.user, &e.change)).collect::<Vec<_>>(),
            forward_again.iter().map(|e| (&e.user, &e.change)).collect::<Vec<_>>()
        );
        assert!(ids(&forward).is_disjoint(&ids(&forward_again)), "{:?} / {:?}", forward[0].id, forward_again[0].id);
        assert!(ids(&forward).is_disjoint(&ids(&back)) && ids(&back).is_disjoint(&ids(&forward_again)));

        // Deleted and created again: its versions start from 1 again, its ids do not repeat.
        store.delete_segment(&segment).await.unwrap();
        store.load_version(&segment, 1, users(0..10), None, None);
        store.load_version(&segment, 2, users(5..20), None, None);
        assert_eq!(announce(&store, &sink, &segment, 1, "w1", LEASE).await.unwrap(), Announcement::Baseline);
        let recreated = published(&store, &segment, 2).await;
        assert_eq!(recreated.len(), forward.len());
        assert!(ids(&forward).is_disjoint(&ids(&recreated)), "{:?} / {:?}", forward[0].id, recreated[0].id);
    }

    #[tokio::test]
    async fn a_worker_taking_over_a_dead_ones_claim_publishes_under_the_same_ids() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, users(0..10), None, None);
        store.load_version(&segment, 2, users(5..2500), None, None);
        announce(&store, &Collect::default(), &segment, 1, "w1", LEASE).await.unwrap();
        // w1 publishes the first page, then dies; its claim (no lease left) expires.
        let dead = Collect { fail_call: Mutex::new(Some(2)), ..Default::default() };
        announce(&store, &dead, &segment, 2, "w1", Duration::ZERO).await.unwrap_err();
        let first_page = ids(&dead.events.into_inner().unwrap());
        assert_eq!(first_page.len(), PAGE_SIZE);

        let again = Collect::default();
        let done = announce(&store, &again, &segment, 2, "w2", LEASE).await.unwrap();
        assert_eq!(done, Announcement::Published { from: 1, entered: 2490, exited: 5 });
        let all = ids(&again.events.into_inner().unwrap());
        assert!(first_page.is_subset(&all), "the republished events keep their ids, so consumers drop them");
    }

    #[tokio::test]
    async fn a_deleted_base_makes_a_new_baseline() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, users(0..10), None, None);
        store.load_version(&segment, 3, users(5..20), None, None);
        let sink = Collect::default();
        announce(&store, &sink, &segment, 1, "w1", LEASE).await.unwrap();
        store.delete_version(&segment, 1).await.unwrap();
        assert_eq!(announce(&store, &sink, &segment, 3, "w1", LEASE).await.unwrap(), Announcement::BaseGone { from: 1 });
        assert!(sink.events.lock().unwrap().is_empty());
        assert_eq!(announce(&store, &sink, &segment, 3, "w1", LEASE).await.unwrap(), Announcement::AlreadyPublished);
    }
}
