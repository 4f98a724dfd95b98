//! The store contract (`core/src/store.rs`), one suite run against the
//! embedded store, a single redis-server and a three-node Redis Cluster,
//! plus what only Redis has: rollover notifications, readers racing
//! rollovers, failing fast when Redis is gone, and that a version leaves
//! only small keys in Redis, whatever its member count.
//!
//! The store holds no memberships: versions' seals (with their member
//! counts), aliases, overrides and change bookkeeping. Every contract
//! takes its own namespace, so they share a server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use segment_core::api::SegmentKey;
use segment_core::store::{
    ChangesClaim, CountedChange, MembershipReader, MemoryStore, Notice, Override, OverrideOp, ReplicaRegistry, RolloverFeed,
    Seal, SegmentStore, StoreError, Transition,
};
use segment_store::redis::{RedisStore, RedisStoreOptions, Rollover};
use segment_tests::{redis_call, RedisCluster, RedisServer, Resp};

trait Store: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry {}
impl<S: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry> Store for S {}

/// A time `minutes` after a fixed origin, with nanoseconds, so round
/// trips through the store are checked to the nanosecond.
fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap()
        + chrono::Duration::minutes(minutes)
        + chrono::Duration::nanoseconds(123_456_789)
}

fn ov(user: &str, op: OverrideOp, ts: DateTime<Utc>, id: &str) -> Override {
    Override { user: user.into(), op, ts, id: id.into(), offset: None }
}

/// An override read from the membership topic at `offset`.
fn ov_at(user: &str, op: OverrideOp, ts: DateTime<Utc>, id: &str, offset: u64) -> Override {
    Override { offset: Some(offset), ..ov(user, op, ts, id) }
}

/// Seals a version as the operator does from ingest's verdict: with its
/// member count, snapshot time and definition hash.
async fn sealed(store: &impl Store, segment: &SegmentKey, version: u64, members: u64, snapshot: DateTime<Utc>) {
    let seal = Seal { members, snapshot_time: Some(snapshot), definition_hash: Some("hash".into()), ..Seal::default() };
    let stored = store.seal_with(segment, version, &seal).await.unwrap();
    assert_eq!(stored.members, members, "{segment} v{version}: the count given is recorded");
}

/// The version readers are switched to, as serving reads it.
async fn served(store: &impl Store, segment: &SegmentKey) -> Option<u64> {
    store.aliases().await.unwrap().get(segment).copied()
}

/// The override recorded for `user`, if any.
async fn recorded(store: &impl Store, segment: &SegmentKey, user: &str) -> Option<Override> {
    store.overrides_since(segment, at(-100_000)).await.unwrap().into_iter().find(|o| o.user == user)
}

fn listed(versions: &BTreeMap<u64, segment_core::store::StoredVersion>) -> Vec<u64> {
    versions.keys().copied().collect()
}

/// The next notice about `segment` (notices about others are skipped).
async fn notice_about(notices: &mut BoxStream<'static, Notice>, segment: &SegmentKey) -> Notice {
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.next())
            .await
            .unwrap_or_else(|_| panic!("a notice about {segment} within 5s"))
            .expect("the notice stream is open");
        let about = match &notice {
            Notice::Rollover(rollover) => &rollover.segment,
            Notice::Load { segment, .. } | Notice::Override { segment, .. } => segment,
        };
        if about == segment {
            return notice;
        }
    }
}

/// The load requests of segments in `namespace`.
async fn load_requests_in(store: &impl Store, namespace: &str) -> BTreeMap<SegmentKey, u64> {
    store.load_requests().await.unwrap().into_iter().filter(|(segment, _)| segment.namespace == namespace).collect()
}

fn names(replicas: &[&String]) -> BTreeSet<String> {
    replicas.iter().map(|r| r.to_string()).collect()
}

fn missing(result: Result<impl std::fmt::Debug, StoreError>, version: u64) {
    match result {
        Err(StoreError::MissingVersion { version: v, .. }) if v == version => {}
        other => panic!("expected MissingVersion v{version}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- contracts

/// A sealed version is listed with what it was sealed with (the snapshot
/// time to the nanosecond); an unsealed one is not; an empty version can
/// be sealed (a definition may match nobody); nothing is active before an
/// activate.
async fn seal_and_list(store: &impl Store, segment: &SegmentKey) {
    assert!(store.versions(segment).await.unwrap().is_empty());
    sealed(store, segment, 1, 120, at(0)).await;
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(listed(&versions), [1], "only sealed versions are listed");
    assert_eq!(versions[&1].members, 120);
    assert_eq!(versions[&1].snapshot_time, Some(at(0)), "snapshot time round-trips to the nanosecond");
    assert_eq!(versions[&1].definition_hash.as_deref(), Some("hash"));

    let bare = store.seal_with(segment, 2, &Seal { members: 30, ..Seal::default() }).await.unwrap();
    assert_eq!((bare.members, bare.snapshot_time, bare.definition_hash), (30, None, None));
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(versions[&2].members, 30);
    assert_eq!((versions[&2].snapshot_time, versions[&2].definition_hash.clone()), (None, None));
    sealed(store, segment, 3, 0, at(1)).await;
    assert_eq!(store.versions(segment).await.unwrap()[&3].members, 0);
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty(), "a seal leaves nothing unsealed");
    assert_eq!(store.active_version(segment).await.unwrap(), None, "nothing is active before activate");
}

/// The operator seals a version from ingest's verdict with no member
/// loaded into the store: the count recorded is the one given, and it is
/// what `versions` reports whatever overrides arrive later (serving lays
/// those over the index file). Sealing again records the new seal and
/// keeps a promotion. A deleted version is fenced, and sealing it is
/// refused.
async fn a_version_is_sealed_with_the_count_it_is_given(store: &impl Store, segment: &SegmentKey) {
    let seal = Seal {
        members: 1234,
        snapshot_time: Some(at(60)),
        definition_hash: Some("9f2c".into()),
        change: Some(CountedChange { from: 1, changed: 7 }),
        overrides_from: Some(at(0)),
        table_versions: Vec::new(),
    };
    assert_eq!(store.seal_with(segment, 2, &seal).await.unwrap(), seal.stored(false));
    assert_eq!(store.versions(segment).await.unwrap()[&2], seal.stored(false), "listed as given");
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty());
    store.activate(segment, 2).await.unwrap();
    assert!(store.record_override(segment, &ov("vip", OverrideOp::Include, at(70), "a")).await.unwrap());
    assert_eq!(store.versions(segment).await.unwrap()[&2].members, 1234, "overrides do not change it");

    let again = Seal { members: 1235, ..seal.clone() };
    assert_eq!(store.seal_with(segment, 2, &again).await.unwrap().members, 1235);
    let listed = &store.versions(segment).await.unwrap()[&2];
    assert_eq!((listed.members, listed.promoted), (1235, true), "sealed again, still promoted");

    // v3's run is cancelled before its ingest is done: deleted, fenced.
    assert!(!store.is_fenced(segment, 3).await.unwrap());
    store.delete_version(segment, 3).await.unwrap();
    assert!(store.is_fenced(segment, 3).await.unwrap());
    assert!(!store.is_fenced(segment, 2).await.unwrap());
    match store.seal_with(segment, 3, &seal).await {
        Err(StoreError::Fenced { version: 3, .. }) => {}
        other => panic!("expected Fenced v3, got {other:?}"),
    }
    assert_eq!(store.versions(segment).await.unwrap().keys().copied().collect::<Vec<_>>(), [2]);
}

/// Readers follow the alias only: a sealed version is not served until
/// activated, an activate of a version not sealed is refused and changes
/// nothing.
async fn invisible_until_activated(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 50, at(0)).await;
    assert_eq!(served(store, segment).await, None, "sealed is not active");
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment).await, Some(1));

    missing(store.activate(segment, 2).await, 2);
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1), "a refused activate changes nothing");
    sealed(store, segment, 2, 50, at(1)).await;
    assert_eq!(served(store, segment).await, Some(1), "a sealed version is invisible until activated");

    store.activate(segment, 2).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), Some(2));
    assert_eq!(served(store, segment).await, Some(2));
    missing(store.activate(segment, 9).await, 9);
}

/// Pinning back is one more activate: the older version is served again
/// and both stay listed, promoted.
async fn rollback_to_an_older_version(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 80, at(0)).await;
    sealed(store, segment, 2, 80, at(10)).await;
    store.activate(segment, 1).await.unwrap();
    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment).await, Some(2));

    // pinVersion: 1
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment).await, Some(1));
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(listed(&versions), [1, 2]);
    assert!(versions[&1].promoted && versions[&2].promoted);
}

async fn deleting_an_old_version_keeps_the_active_one(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 2500, at(0)).await;
    sealed(store, segment, 2, 2000, at(10)).await;
    store.activate(segment, 2).await.unwrap();
    store.delete_version(segment, 1).await.unwrap();

    assert_eq!(listed(&store.versions(segment).await.unwrap()), [2]);
    assert_eq!(store.active_version(segment).await.unwrap(), Some(2));
    assert_eq!(served(store, segment).await, Some(2));
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty(), "a finished delete leaves nothing unsealed");
    missing(store.activate(segment, 1).await, 1);
    // Deleting what is not there is fine (a retried retention pass).
    store.delete_version(segment, 1).await.unwrap();
    store.delete_version(segment, 77).await.unwrap();

    // Never asked by the operator, but safe: deleting the active version
    // leaves the segment without one rather than pointing at nothing.
    store.delete_version(segment, 2).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert_eq!(served(store, segment).await, None);
}

/// A retried seal records the same version; activating twice is one activate.
async fn seals_are_idempotent(store: &impl Store, segment: &SegmentKey) {
    let seal = Seal { members: 300, snapshot_time: Some(at(0)), definition_hash: Some("h".into()), ..Seal::default() };
    let first = store.seal_with(segment, 1, &seal).await.unwrap();
    let again = store.seal_with(segment, 1, &seal).await.unwrap();
    assert_eq!(first, again, "a retried seal records the same version");
    assert_eq!(store.versions(segment).await.unwrap()[&1], first);
    store.activate(segment, 1).await.unwrap();
    store.activate(segment, 1).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1));
    assert_eq!(store.seal_with(segment, 1, &seal).await.unwrap().members, 300, "a seal reports what it recorded");
    assert!(store.versions(segment).await.unwrap()[&1].promoted, "and keeps the promotion");
}

/// Recording an override keeps the newest per user and says whether it
/// took effect; it changes no version (the count recorded at sealing
/// stays: serving lays the overrides over the index files).
async fn the_newest_override_wins(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 3, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    let u1 = "u-00001";
    let op = |found: Option<Override>| found.map(|o| o.op);

    assert!(store.record_override(segment, &ov(u1, OverrideOp::Exclude, at(10), "a")).await.unwrap());
    assert_eq!(op(recorded(store, segment, u1).await), Some(OverrideOp::Exclude));
    assert!(!store.record_override(segment, &ov(u1, OverrideOp::Exclude, at(10), "a")).await.unwrap(), "redelivery");
    assert!(!store.record_override(segment, &ov(u1, OverrideOp::Include, at(5), "z")).await.unwrap(), "an older one loses");
    assert_eq!(op(recorded(store, segment, u1).await), Some(OverrideOp::Exclude));
    // Same time: the id breaks the tie, the same way everywhere.
    assert!(store.record_override(segment, &ov(u1, OverrideOp::Include, at(10), "b")).await.unwrap());
    assert_eq!(op(recorded(store, segment, u1).await), Some(OverrideOp::Include));

    assert!(store.record_override(segment, &ov("vip", OverrideOp::Include, at(12), "c")).await.unwrap());
    assert_eq!(store.versions(segment).await.unwrap()[&1].members, 3, "the count recorded at sealing stays");
    assert!(!store.record_override(segment, &ov("vip", OverrideOp::Include, at(12), "c")).await.unwrap());

    let since = |t| async move {
        let mut found: Vec<(String, String)> =
            store.overrides_since(segment, t).await.unwrap().into_iter().map(|o| (o.user, o.id)).collect();
        found.sort();
        found
    };
    assert_eq!(since(at(0)).await, [(u1.to_string(), "b".to_string()), ("vip".into(), "c".into())], "one, the newest, per user");
    assert_eq!(since(at(10)).await, [("vip".to_string(), "c".to_string())], "strictly after `since`");
    assert!(since(at(12)).await.is_empty());
}

/// Of one user's events with the same time, the one later in the partition
/// wins, whatever the producer's ids say; the same event again changes
/// nothing; an override recorded without an offset is the older.
async fn equal_times_go_to_the_later_offset(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 3, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    let u1 = "u-00001";
    let first = ov_at(u1, OverrideOp::Exclude, at(10), "z", 5);
    let second = ov_at(u1, OverrideOp::Include, at(10), "a", 6);
    assert!(store.record_override(segment, &first).await.unwrap());
    assert!(store.record_override(segment, &second).await.unwrap(), "the later offset wins though its id sorts first");
    assert!(!store.record_override(segment, &first).await.unwrap(), "the earlier event, redelivered, loses");
    assert!(!store.record_override(segment, &second).await.unwrap(), "a redelivery changes nothing");
    let duplicate = Override { offset: Some(9), ..second.clone() };
    assert!(!store.record_override(segment, &duplicate).await.unwrap(), "nor does the producer's duplicate of the event");
    assert_eq!(recorded(store, segment, u1).await, Some(second));

    // Recorded without an offset (before offsets were kept): older than any with one.
    let u2 = "u-00002";
    assert!(store.record_override(segment, &ov(u2, OverrideOp::Exclude, at(10), "z")).await.unwrap());
    assert!(store.record_override(segment, &ov_at(u2, OverrideOp::Include, at(10), "a", 0)).await.unwrap());
    let recorded = store.overrides_since(segment, at(0)).await.unwrap();
    let mut found: Vec<(String, String, Option<u64>)> = recorded.into_iter().map(|o| (o.user, o.id, o.offset)).collect();
    found.sort();
    assert_eq!(found, [(u1.to_string(), "a".to_string(), Some(6)), (u2.to_string(), "a".to_string(), Some(0))]);
}

/// The realtime worker's call: nothing is recorded for a segment that has no
/// active version, and the same as `record_override` once it has one.
async fn overrides_only_for_served_segments(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 3, at(0)).await;
    let exclude = ov("u-00001", OverrideOp::Exclude, at(10), "a");
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), None, "not served yet");
    assert!(store.overrides_since(segment, at(0)).await.unwrap().is_empty(), "nothing recorded");
    store.activate(segment, 1).await.unwrap();
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), Some(true));
    assert_eq!(recorded(store, segment, "u-00001").await, Some(exclude.clone()));
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), Some(false), "redelivery");
}

/// Overrides outlive rollovers: what serving lays over the new version is
/// what was recorded after the version's `reflects_events_until`.
async fn overrides_survive_the_rollover(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 10, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    store.record_override(segment, &ov("u-00001", OverrideOp::Exclude, at(5), "a")).await.unwrap();
    store.record_override(segment, &ov("u-00002", OverrideOp::Exclude, at(15), "b")).await.unwrap();
    store.record_override(segment, &ov("vip", OverrideOp::Include, at(16), "c")).await.unwrap();

    sealed(store, segment, 2, 10, at(10)).await;
    store.activate(segment, 2).await.unwrap();
    let v2 = store.versions(segment).await.unwrap()[&2].clone();
    let since = v2.reflects_events_until().expect("v2 says what it reflects");
    let mut laid_over: Vec<String> = store.overrides_since(segment, since).await.unwrap().into_iter().map(|o| o.user).collect();
    laid_over.sort();
    assert_eq!(laid_over, ["u-00002", "vip"], "the exclude and the include survive; the older one is in v2's lake data");
}

/// A version reflects the events before its `overrides_from` (its snapshot
/// minus the lake's lag), not its snapshot: an override recorded between
/// the two is laid over it although it is sealed with a later snapshot.
/// Old overrides are pruned, unless one was recorded for the user meanwhile.
async fn overrides_reach_what_the_lake_may_not_hold_yet_and_old_ones_are_pruned(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 10, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    // v2 computed at 60, the lake an hour behind: it reflects events until 0.
    let read = segment_core::manifest::SourceRead {
        table: "orders".into(),
        format: segment_core::api::SourceFormat::Delta,
        version: Some(12),
    };
    let seal = Seal {
        members: 10,
        snapshot_time: Some(at(60)),
        overrides_from: Some(at(0)),
        table_versions: vec![read.clone()],
        ..Seal::default()
    };
    let stored = store.seal_with(segment, 2, &seal).await.unwrap();
    assert_eq!(stored.overrides_from, Some(at(0)));
    let listed = &store.versions(segment).await.unwrap()[&2];
    assert_eq!((listed.overrides_from, &listed.table_versions), (Some(at(0)), &vec![read]), "kept with the version");
    assert_eq!(listed.reflects_events_until(), Some(at(0)));

    store.record_override(segment, &ov("u-00001", OverrideOp::Exclude, at(30), "a")).await.unwrap();
    store.activate(segment, 2).await.unwrap();
    let laid_over: Vec<String> = store.overrides_since(segment, at(0)).await.unwrap().into_iter().map(|o| o.user).collect();
    assert_eq!(laid_over, ["u-00001"], "v2's lake may not hold an event at 30 yet");

    store.record_override(segment, &ov("u-00002", OverrideOp::Exclude, at(70), "b")).await.unwrap();
    assert_eq!(store.prune_overrides(segment, at(50)).await.unwrap(), 1);
    let left: Vec<String> = store.overrides_since(segment, at(-1000)).await.unwrap().into_iter().map(|o| o.user).collect();
    assert_eq!(left, ["u-00002"]);
    assert_eq!(store.prune_overrides(segment, at(50)).await.unwrap(), 0);
}

/// One read lists the active version of every served segment, and of no
/// other (sealed only, or withdrawn).
async fn aliases_list_every_served_segment(store: &impl Store, namespace: &str) {
    let (a, b, c) = (SegmentKey::new(namespace, "a"), SegmentKey::new(namespace, "b"), SegmentKey::new(namespace, "c"));
    sealed(store, &a, 1, 60, at(0)).await;
    sealed(store, &a, 2, 60, at(1)).await;
    sealed(store, &b, 1, 70, at(0)).await;
    sealed(store, &b, 4, 10, at(1)).await;
    sealed(store, &c, 1, 5, at(0)).await;
    store.activate(&a, 2).await.unwrap();
    store.activate(&b, 1).await.unwrap();
    let in_namespace = || async {
        let all = store.aliases().await.unwrap();
        all.into_iter().filter(|(s, _)| s.namespace == namespace).collect::<BTreeMap<_, _>>()
    };
    assert_eq!(in_namespace().await, BTreeMap::from([(a.clone(), 2), (b.clone(), 1)]));
    let (with_epoch, _) = store.aliases_with_epoch().await.unwrap();
    assert_eq!(with_epoch.get(&a), Some(&2), "read with the epoch, the same aliases");
    store.withdraw(&b).await.unwrap();
    assert_eq!(in_namespace().await, BTreeMap::from([(a, 2)]));
}

async fn deleting_a_segment_removes_everything(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 1500, at(0)).await;
    sealed(store, segment, 2, 1500, at(10)).await;
    store.activate(segment, 2).await.unwrap();
    store.delete_version(segment, 1).await.unwrap();
    store.record_override(segment, &ov("vip", OverrideOp::Include, at(20), "v")).await.unwrap();

    store.delete_segment(segment).await.unwrap();
    assert_eq!(served(store, segment).await, None);
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert!(store.versions(segment).await.unwrap().is_empty());
    assert!(store.overrides_since(segment, at(-1000)).await.unwrap().is_empty());
    assert!(!store.is_fenced(segment, 1).await.unwrap(), "fences go with the segment");
    store.delete_segment(segment).await.unwrap();

    // The name can be used again from scratch.
    sealed(store, segment, 1, 3, at(30)).await;
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment).await, Some(1));
    let versions = store.versions(segment).await.unwrap();
    assert_eq!((listed(&versions), versions[&1].members), (vec![1], 3));
}
/// Each version's change events are published once: one claimant at a
/// time, a finished version is never claimed again, a dead claimant's
/// claim expires, and the diff base is the version published last. Every
/// claim of one announcement names it the same; every other announcement,
/// also after the segment was deleted and created again, differently.
async fn change_events_are_claimed_once(store: &impl Store, segment: &SegmentKey) {
    let long = Duration::from_secs(60);
    let granted = |claim: ChangesClaim| match claim {
        ChangesClaim::Granted { from, transition } => (from, transition),
        other => panic!("expected a granted claim, got {other:?}"),
    };
    let (from, first) = granted(store.claim_changes(segment, 1, "a", long).await.unwrap());
    assert_eq!((from, first.sequence), (None, 1));
    assert_eq!(store.claim_changes(segment, 1, "b", long).await.unwrap(), ChangesClaim::HeldElsewhere);
    // The holder may claim again (a retry after a failed page).
    assert_eq!(granted(store.claim_changes(segment, 1, "a", long).await.unwrap()), (None, first.clone()));
    assert!(!store.finish_changes(segment, 1, "b").await.unwrap(), "only the holder finishes");
    assert!(store.finish_changes(segment, 1, "a").await.unwrap());
    assert_eq!(store.claim_changes(segment, 1, "b", long).await.unwrap(), ChangesClaim::AlreadyPublished);

    // Holder "a" dies while publishing version 2; its claim (no lease left) has expired.
    let (from, second) = granted(store.claim_changes(segment, 2, "a", Duration::ZERO).await.unwrap());
    let expected = Transition { incarnation: first.incarnation.clone(), sequence: 2 };
    assert_eq!((from, &second), (Some(1), &expected));
    assert_eq!(
        granted(store.claim_changes(segment, 2, "b", long).await.unwrap()),
        (Some(1), second.clone()),
        "the next claimant publishes the same announcement"
    );
    assert!(!store.finish_changes(segment, 2, "a").await.unwrap(), "a claim taken over is lost");
    assert!(store.finish_changes(segment, 2, "b").await.unwrap());

    // A rollback to version 1 is announced as the diff from 2.
    let (from, rollback) = granted(store.claim_changes(segment, 1, "a", long).await.unwrap());
    assert_eq!((from, rollback.sequence), (Some(2), 3));
    assert!(store.finish_changes(segment, 1, "a").await.unwrap());

    store.delete_segment(segment).await.unwrap();
    let (from, recreated) = granted(store.claim_changes(segment, 1, "a", long).await.unwrap());
    assert_eq!((from, recreated.sequence), (None, 1));
    assert_ne!(recreated.incarnation, first.incarnation, "a re-created segment is a new incarnation");
}

/// A deleted version is fenced: a late seal fails and lists nothing, and
/// the delete leaves nothing unsealed; only an activate records a version
/// as promoted, and a delete forgets it.
async fn deletes_fence_and_only_an_activate_promotes(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 20, at(0)).await;
    assert!(!store.versions(segment).await.unwrap()[&1].promoted, "sealed, never served");
    store.activate(segment, 1).await.unwrap();
    assert!(store.versions(segment).await.unwrap()[&1].promoted);

    // The run of v2 is cancelled: its version is deleted while its ingest
    // Job still runs; the seal from its verdict is refused afterwards.
    store.delete_version(segment, 2).await.unwrap();
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty());
    assert!(store.is_fenced(segment, 2).await.unwrap() && !store.is_fenced(segment, 1).await.unwrap());
    let late = Seal { members: 3, snapshot_time: Some(at(5)), definition_hash: Some("hash".into()), ..Seal::default() };
    match store.seal_with(segment, 2, &late).await {
        Err(StoreError::Fenced { version: 2, .. }) => {}
        other => panic!("expected Fenced v2, got {other:?}"),
    }
    assert_eq!(listed(&store.versions(segment).await.unwrap()), [1]);
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty());

    // A version deleted after being served is no longer promoted.
    sealed(store, segment, 3, 30, at(10)).await;
    store.activate(segment, 3).await.unwrap();
    store.delete_version(segment, 1).await.unwrap();
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(listed(&versions), [3]);
    assert!(versions[&3].promoted);
}

/// A withdrawn segment has no active version and is not served, and keeps
/// every version for a Segment created again under its name.
async fn withdrawing_stops_serving_and_keeps_the_versions(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 40, at(0)).await;
    sealed(store, segment, 2, 10, at(10)).await;
    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment).await, Some(2));

    store.withdraw(segment).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert_eq!(served(store, segment).await, None);
    let kept = store.versions(segment).await.unwrap();
    assert_eq!(listed(&kept), [1, 2]);
    assert!(kept[&2].promoted && !kept[&1].promoted);
    store.withdraw(segment).await.unwrap();

    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment).await, Some(2), "served again once activated");
}
/// is listed and announced, and lasts until the segment is switched to
/// that version (not to another one), withdrawn or deleted. A replica
/// counts while its liveness lasts and holds what it reported last. (The
/// only contract that registers replicas: liveness is global.)
async fn replicas_load_what_is_requested(store: &impl Store, segment: &SegmentKey) {
    let namespace = segment.namespace.as_str();
    let other = SegmentKey::new(namespace, "other");
    for version in 1..=3 {
        sealed(store, segment, version, 5, at(version as i64)).await;
    }
    let mut notices = store.notices().await.unwrap();
    store.activate(segment, 1).await.unwrap();
    assert_eq!(
        notice_about(&mut notices, segment).await,
        Notice::Rollover(Rollover { segment: segment.clone(), version: Some(1) })
    );

    assert!(load_requests_in(store, namespace).await.is_empty());
    store.request_load(segment, 3).await.unwrap();
    assert_eq!(notice_about(&mut notices, segment).await, Notice::Load { segment: segment.clone(), version: 3 });
    store.request_load(&other, 1).await.unwrap();
    let both = BTreeMap::from([(segment.clone(), 3), (other.clone(), 1)]);
    assert_eq!(load_requests_in(store, namespace).await, both);
    store.activate(segment, 2).await.unwrap();
    assert_eq!(load_requests_in(store, namespace).await, both, "switching to another version leaves the request");
    store.activate(segment, 3).await.unwrap();
    assert_eq!(
        load_requests_in(store, namespace).await,
        BTreeMap::from([(other.clone(), 1)]),
        "switching to the version requested ends the request, and only the segment's"
    );
    store.request_load(segment, 2).await.unwrap();
    assert_eq!(load_requests_in(store, namespace).await.get(segment), Some(&2));
    store.withdraw(segment).await.unwrap();
    assert_eq!(load_requests_in(store, namespace).await.get(segment), None, "withdrawing ends the request");
    store.activate(segment, 2).await.unwrap();

    let replica = |name: &str| format!("{namespace}-{name}");
    let (r1, r2, r3) = (replica("r1"), replica("r2"), replica("r3"));
    let later = Utc::now() + chrono::Duration::hours(1);
    store.replica_alive(&r1, later).await.unwrap();
    store.replica_alive(&r2, later).await.unwrap();
    store.replica_alive(&r3, Utc::now() - chrono::Duration::seconds(1)).await.unwrap();
    store.report_loaded(&r1, segment, &[2, 3]).await.unwrap();
    store.report_loaded(&r2, segment, &[2]).await.unwrap();
    store.report_loaded(&r3, segment, &[3]).await.unwrap();
    store.report_loaded(&r2, &other, &[3]).await.unwrap();
    let status = |version| async move { store.load_status(segment, version).await.unwrap() };
    let of_3 = status(3).await;
    assert_eq!(of_3.live, names(&[&r1, &r2]), "a replica whose liveness ran out does not count");
    assert_eq!(of_3.holding, names(&[&r1]), "holding: live replicas that reported the version for this segment");
    assert_eq!(of_3.missing(), [r2.as_str()]);
    assert_eq!(status(2).await.holding, names(&[&r1, &r2]));
    assert!(status(1).await.holding.is_empty());
    store.replica_alive(&r3, later).await.unwrap();
    assert_eq!(status(3).await.holding, names(&[&r1, &r3]), "renewed, it counts again with what it reported");

    store.report_loaded(&r2, segment, &[3]).await.unwrap();
    assert_eq!(status(2).await.holding, names(&[&r1]), "a report replaces the one before");
    assert_eq!(status(3).await.holding, names(&[&r1, &r2, &r3]));
    store.report_loaded(&r1, segment, &[]).await.unwrap();
    assert_eq!(status(3).await.holding, names(&[&r2, &r3]), "an empty report clears it");
    assert!(status(2).await.holding.is_empty());

    store.replica_gone(&r2).await.unwrap();
    let of_3 = status(3).await;
    assert_eq!((of_3.live, of_3.holding), (names(&[&r1, &r3]), names(&[&r3])), "a replica gone does not count");

    // A liveness runs out by itself.
    let until = Utc::now() + chrono::Duration::seconds(1);
    store.replica_alive(&r3, until).await.unwrap();
    assert_eq!(status(3).await.holding, names(&[&r3]), "live until its time");
    tokio::time::sleep((until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50)).await;
    let of_3 = status(3).await;
    assert_eq!((of_3.live, of_3.holding), (names(&[&r1]), names(&[])), "and not after it");

    store.request_load(segment, 3).await.unwrap();
    assert_eq!(load_requests_in(store, namespace).await.get(segment), Some(&3));
    store.delete_segment(segment).await.unwrap();
    assert_eq!(load_requests_in(store, namespace).await, BTreeMap::from([(other, 1)]), "deleting ends the request");
}

/// Replicas answering from index files hear of each override that took
/// effect, with the override, and of no other: not of a stale one, nor of
/// the same event again, nor of one refused for a segment not served.
async fn overrides_that_take_effect_are_announced(store: &impl Store, segment: &SegmentKey) {
    sealed(store, segment, 1, 3, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    let mut notices = store.notices().await.unwrap();
    let announced = |change: &Override| Notice::Override { segment: segment.clone(), change: change.clone() };
    let u1 = "u-00001";

    let first = ov_at(u1, OverrideOp::Exclude, at(10), "a", 7);
    assert!(store.record_override(segment, &first).await.unwrap());
    assert_eq!(notice_about(&mut notices, segment).await, announced(&first));
    assert!(!store.record_override(segment, &ov(u1, OverrideOp::Include, at(5), "z")).await.unwrap(), "stale");
    assert!(!store.record_override(segment, &first).await.unwrap(), "redelivered");
    let newer = ov_at(u1, OverrideOp::Include, at(11), "b", 8);
    assert_eq!(store.record_override_if_active(segment, &newer).await.unwrap(), Some(true));
    assert_eq!(notice_about(&mut notices, segment).await, announced(&newer), "the next notice is the next that took effect");

    store.withdraw(segment).await.unwrap();
    assert_eq!(notice_about(&mut notices, segment).await, Notice::Rollover(Rollover { segment: segment.clone(), version: None }));
    let unserved = ov_at(u1, OverrideOp::Exclude, at(12), "c", 9);
    assert_eq!(store.record_override_if_active(segment, &unserved).await.unwrap(), None);
    store.activate(segment, 1).await.unwrap();
    assert_eq!(
        notice_about(&mut notices, segment).await,
        Notice::Rollover(Rollover { segment: segment.clone(), version: Some(1) }),
        "nothing announced for the override refused"
    );
}

/// Every contract, each in its own namespace under `prefix`.
async fn run_contract(store: &impl Store, prefix: &str) {
    let segment = |name: &str| SegmentKey::new(format!("{prefix}-{name}"), "segment");
    seal_and_list(store, &segment("load")).await;
    a_version_is_sealed_with_the_count_it_is_given(store, &segment("given")).await;
    invisible_until_activated(store, &segment("invisible")).await;
    rollback_to_an_older_version(store, &segment("rollback")).await;
    deleting_an_old_version_keeps_the_active_one(store, &segment("delete-version")).await;
    seals_are_idempotent(store, &segment("idempotent")).await;
    the_newest_override_wins(store, &segment("overrides")).await;
    equal_times_go_to_the_later_offset(store, &segment("offsets")).await;
    overrides_only_for_served_segments(store, &segment("served-only")).await;
    overrides_survive_the_rollover(store, &segment("survive")).await;
    overrides_reach_what_the_lake_may_not_hold_yet_and_old_ones_are_pruned(store, &segment("lake-lag")).await;
    aliases_list_every_served_segment(store, &format!("{prefix}-reads")).await;
    deleting_a_segment_removes_everything(store, &segment("delete-segment")).await;
    change_events_are_claimed_once(store, &segment("changes")).await;
    deletes_fence_and_only_an_activate_promotes(store, &segment("fence")).await;
    withdrawing_stops_serving_and_keeps_the_versions(store, &segment("withdraw")).await;
    replicas_load_what_is_requested(store, &segment("replicas")).await;
    overrides_that_take_effect_are_announced(store, &segment("override-notices")).await;
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    run_contract(&MemoryStore::new(), "mem").await;
}

/// What the contract leaves in Redis under `prefix`: the re-created
/// segment holds its seal and promotion only, a segment whose every
/// version was deleted only its fences, a deleted segment nothing; and no
/// key holds members (no version set `…:v<N>`, no per-user key `sg:u:…`).
fn only_small_state_is_left(keys: impl Fn(&str) -> Vec<String>, prefix: &str) {
    let sorted = |pattern: &str| {
        let mut found = keys(pattern);
        found.sort();
        found
    };
    let key = |name: &str, suffix: &str| format!("sg:{{{prefix}-{name}/segment}}:{suffix}");
    assert_eq!(
        sorted(&format!("sg:{{{prefix}-delete-segment/segment}}*")),
        [key("delete-segment", "meta"), key("delete-segment", "promoted")],
        "the deleted segment was created again with one version, activated: only that is left"
    );
    assert_eq!(
        sorted(&format!("sg:{{{prefix}-delete-version/segment}}*")),
        [key("delete-version", "fenced")],
        "deleted versions leave only their fences"
    );
    assert_eq!(
        sorted(&format!("sg:{{{prefix}-replicas/segment}}*")),
        Vec::<String>::new(),
        "a deleted segment leaves no key, reports of replicas included"
    );
    assert_eq!(sorted("sg:u:*"), Vec::<String>::new(), "no per-user key");
    let member_sets: Vec<String> =
        keys("sg:{*").into_iter().filter(|k| k.rsplit_once(":v").is_some_and(|(_, n)| n.parse::<u64>().is_ok())).collect();
    assert_eq!(member_sets, Vec::<String>::new(), "no version set");
}

#[tokio::test]
async fn redis_keeps_the_contract() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    run_contract(&store, "single").await;
    only_small_state_is_left(|pattern| server.keys(pattern), "single");
}

#[tokio::test]
async fn redis_cluster_keeps_the_contract() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    run_contract(&store, "cluster").await;
    only_small_state_is_left(|pattern| cluster.keys(pattern), "cluster");
}

// ------------------------------------------------------------- Redis only

/// Sends one command to whichever of `ports` holds its key: the node that
/// does not answer MOVED. A single server is a cluster of one.
fn call_owner(ports: &[u16], args: &[&str]) {
    let answered = ports.iter().any(|port| match redis_call(*port, args) {
        Some(Resp::Error(e)) if e.starts_with("MOVED") => false,
        Some(Resp::Error(e)) => panic!("{args:?}: {e}"),
        Some(_) => true,
        None => false,
    });
    assert!(answered, "{args:?}: no node took it");
}

/// An upgrade from the former per-membership layout: the store removes its
/// member sets and per-user hashes, on a single server and on every node
/// of a cluster, and leaves today's keys, of a segment named like a
/// version too, as they were; a second run finds nothing.
async fn the_former_layout_is_removed(store: &RedisStore, ports: &[u16], keys: impl Fn(&str) -> Vec<String>) {
    let segment = SegmentKey::new("upgraded", "v1");
    sealed(store, &segment, 3, 2, at(0)).await;
    store.activate(&segment, 3).await.unwrap();
    let mut former = Vec::new();
    for version in 1..=3 {
        let set = format!("sg:{{upgraded/v1}}:v{version}");
        call_owner(ports, &["SADD", &set, "user-1", "user-2"]);
        former.push(set);
    }
    for user in 0..300 {
        let hash = format!("sg:u:user-{user}");
        call_owner(ports, &["HSET", &hash, "upgraded/v1", "3"]);
        former.push(hash);
    }
    let today = |keys: &dyn Fn(&str) -> Vec<String>| {
        let mut found: Vec<String> = keys("sg:*").into_iter().filter(|k| !former.contains(k)).collect();
        found.sort();
        found
    };
    let before = today(&keys);
    assert!(before.contains(&"sg:{upgraded/v1}:meta".to_string()), "{before:?}");
    assert_eq!(store.remove_former_layout().await.unwrap(), former.len() as u64);
    assert_eq!(keys("sg:u:*"), Vec::<String>::new());
    assert!(keys("sg:{upgraded/v1}:v*").is_empty());
    assert_eq!(today(&keys), before, "today's keys are left as they were");
    assert_eq!(served(store, &segment).await, Some(3));
    assert_eq!(store.remove_former_layout().await.unwrap(), 0, "nothing is left to remove");
}

#[tokio::test]
async fn redis_removes_the_former_layout() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    the_former_layout_is_removed(&store, &[server.port], |pattern| server.keys(pattern)).await;
}

#[tokio::test]
async fn redis_cluster_removes_the_former_layout() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    the_former_layout_is_removed(&store, &cluster.ports, |pattern| cluster.keys(pattern)).await;
}

async fn next_notice(notices: &mut (impl futures::Stream<Item = Rollover> + Unpin)) -> Rollover {
    tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a rollover notice within 5s")
        .expect("the notice stream is open")
}

async fn rollovers_are_announced(store: &RedisStore, namespace: &str) {
    let segment = SegmentKey::new(namespace, "announced");
    let mut notices = store.rollovers().await.unwrap();
    sealed(store, &segment, 1, 5, at(0)).await;
    sealed(store, &segment, 2, 5, at(1)).await;
    store.activate(&segment, 1).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(1) });
    store.activate(&segment, 2).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(2) });
    store.delete_version(&segment, 1).await.unwrap();
    store.delete_version(&segment, 2).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: None }, "no active version");
    sealed(store, &segment, 3, 5, at(2)).await;
    store.activate(&segment, 3).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(3) });
    store.withdraw(&segment).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: None }, "withdrawn");
}

/// Readers read the aliases while rollovers flip the segment between two
/// versions: the rollover is one write, so every read finds the segment
/// served, at one of the two versions.
async fn readers_never_see_a_gap(store: &RedisStore, namespace: &str) {
    let segment = SegmentKey::new(namespace, "flip");
    sealed(store, &segment, 1, 2000, at(0)).await;
    sealed(store, &segment, 2, 2000, at(1)).await;
    store.activate(&segment, 1).await.unwrap();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (store, segment, done) = (store.clone(), segment.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = BTreeMap::<u64, usize>::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let version = store.aliases().await.unwrap().get(&segment).copied();
                let version = version.unwrap_or_else(|| panic!("{segment} not served in the middle of a rollover"));
                assert!(version == 1 || version == 2, "v{version}");
                *seen.entry(version).or_default() += 1;
            }
            seen
        }));
    }
    for flip in 0..300u64 {
        store.activate(&segment, 1 + flip % 2).await.unwrap();
        if flip % 20 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = BTreeMap::<u64, usize>::new();
    for reader in readers {
        for (version, reads) in reader.await.unwrap() {
            *seen.entry(version).or_default() += reads;
        }
    }
    println!("reads per version while flipping: {seen:?}");
    assert!(seen.values().sum::<usize>() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rollover_is_atomic_and_announced() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    rollovers_are_announced(&store, "single").await;
    readers_never_see_a_gap(&store, "single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_rollover_is_atomic_and_announced() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    rollovers_are_announced(&store, "cluster").await;
    readers_never_see_a_gap(&store, "cluster").await;
}

/// Slots move between nodes under a running store: commands and scripts
/// sent with its cached slot table meet MOVED replies and must still land
/// right.
#[tokio::test]
async fn redis_cluster_survives_resharding() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    let segments: Vec<SegmentKey> = (0..6).map(|i| SegmentKey::new("reshard", format!("s{i}"))).collect();
    for segment in &segments {
        sealed(&store, segment, 1, 3000, at(0)).await;
        store.activate(segment, 1).await.unwrap();
    }
    // Half of each node's slots move on; the store's slot table is stale.
    cluster.reshard(0, 1, 2700);
    cluster.reshard(2, 0, 2700);
    for segment in &segments {
        assert_eq!(listed(&store.versions(segment).await.unwrap()), [1], "{segment} reads right after resharding");
        sealed(&store, segment, 2, 3000, at(1)).await;
        store.activate(segment, 2).await.unwrap();
        assert_eq!(served(&store, segment).await, Some(2));
        assert!(store.record_override(segment, &ov("vip", OverrideOp::Include, at(2), "e")).await.unwrap());
        store.delete_version(segment, 1).await.unwrap();
        assert_eq!(listed(&store.versions(segment).await.unwrap()), [2]);
        assert!(store.is_fenced(segment, 1).await.unwrap());
    }
}

/// Overrides stored before offsets were kept (no `offset` in their JSON)
/// are read back, and are older than an event at the same time that has one.
#[tokio::test]
async fn redis_reads_overrides_stored_before_offsets() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let segment = SegmentKey::new("legacy", "segment");
    sealed(&store, &segment, 1, 3, at(0)).await;
    store.activate(&segment, 1).await.unwrap();
    let ts = at(10).to_rfc3339_opts(SecondsFormat::Nanos, true);
    let stored = format!(r#"{ts}{{"user":"u-00001","op":"exclude","ts":"{ts}","id":"old"}}"#);
    let written = redis_call(server.port, &["HSET", "sg:{legacy/segment}:ov", "u-00001", &stored]);
    assert_eq!(written, Some(Resp::Int(1)));

    assert_eq!(store.overrides_since(&segment, at(0)).await.unwrap(), [ov("u-00001", OverrideOp::Exclude, at(10), "old")]);
    let again = ov_at("u-00001", OverrideOp::Exclude, at(10), "old", 3);
    assert!(!store.record_override(&segment, &again).await.unwrap(), "the same event, now with its offset");
    let later = ov_at("u-00001", OverrideOp::Include, at(10), "a", 4);
    assert!(store.record_override(&segment, &later).await.unwrap(), "an event with an offset is the later");
    assert_eq!(store.overrides_since(&segment, at(0)).await.unwrap(), [later]);
}

/// With Redis gone every call fails with `Unavailable` within its deadline.
async fn fails_fast_when_down(store: &RedisStore) {
    let segment = SegmentKey::new("down", "segment");
    let limit = Duration::from_secs(3);
    macro_rules! unavailable {
        ($call:expr) => {{
            let start = Instant::now();
            let result = $call.await.map(|_| ());
            let took = start.elapsed();
            assert!(matches!(result, Err(StoreError::Unavailable(_))), "{}: {result:?}", stringify!($call));
            assert!(took < limit, "{} took {took:?}", stringify!($call));
        }};
    }
    unavailable!(store.aliases());
    unavailable!(store.active_version(&segment));
    unavailable!(store.versions(&segment));
    unavailable!(store.seal_with(&segment, 2, &Seal { members: 100, ..Seal::default() }));
    unavailable!(store.activate(&segment, 1));
    unavailable!(store.record_override(&segment, &ov("u-1", OverrideOp::Exclude, at(1), "x")));
    unavailable!(store.overrides_since(&segment, at(0)));
    unavailable!(store.delete_version(&segment, 1));
    unavailable!(store.rollovers());
    unavailable!(store.request_load(&segment, 2));
    unavailable!(store.load_requests());
    unavailable!(store.replica_alive("replica-1", Utc::now()));
    unavailable!(store.report_loaded("replica-1", &segment, &[1]));
    unavailable!(store.load_status(&segment, 1));
}
fn short_deadlines() -> RedisStoreOptions {
    RedisStoreOptions {
        connect_timeout: Duration::from_millis(500),
        read_timeout: Some(Duration::from_millis(500)),
        write_timeout: Duration::from_millis(500),
        bulk_timeout: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn redis_down_fails_fast() {
    let server = RedisServer::start();
    let store = RedisStore::connect_with(&server.url(), short_deadlines()).await.unwrap();
    let segment = SegmentKey::new("down", "segment");
    sealed(&store, &segment, 1, 10, at(0)).await;
    store.activate(&segment, 1).await.unwrap();
    let url = server.url();
    drop(server);
    fails_fast_when_down(&store).await;

    let start = Instant::now();
    let refused = RedisStore::connect_with(&url, short_deadlines()).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "connecting to nothing: {:?}", refused.err());
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn redis_cluster_down_fails_fast() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect_with(&cluster.url(), short_deadlines()).await.unwrap();
    let segment = SegmentKey::new("down", "segment");
    sealed(&store, &segment, 1, 10, at(0)).await;
    store.activate(&segment, 1).await.unwrap();
    drop(cluster);
    fails_fast_when_down(&store).await;
}

/// Bytes `MEMORY USAGE` reports for `key`.
fn memory_usage(port: u16, key: &str) -> u64 {
    match redis_call(port, &["MEMORY", "USAGE", key]) {
        Some(Resp::Int(bytes)) => bytes as u64,
        other => panic!("MEMORY USAGE {key}: {other:?}"),
    }
}

/// A version leaves only small keys in Redis, whatever its member count:
/// a segment of 10 members and one of 10 billion, each with two sealed
/// versions (one active, one deleted), an override and change
/// bookkeeping, hold the same keys, each a few hundred bytes at most, in
/// all as many bytes give or take the digits of the counts, and no
/// per-user key. Memberships are in the result files (docs/storage.md,
/// "Memory").
#[tokio::test]
async fn redis_keeps_only_small_state() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut shapes = Vec::new();
    let mut totals = Vec::new();
    for (name, members) in [("small", 10u64), ("huge", 10_000_000_000)] {
        let segment = SegmentKey::new("memory", name);
        let seal = |snapshot| Seal {
            members,
            snapshot_time: Some(snapshot),
            definition_hash: Some("9f2c41d07be3".into()),
            change: Some(CountedChange { from: 1, changed: members / 10 }),
            overrides_from: Some(snapshot),
            table_versions: Vec::new(),
        };
        store.seal_with(&segment, 1, &seal(at(0))).await.unwrap();
        store.activate(&segment, 1).await.unwrap();
        store.seal_with(&segment, 2, &seal(at(60))).await.unwrap();
        store.activate(&segment, 2).await.unwrap();
        store.delete_version(&segment, 1).await.unwrap();
        assert!(store.record_override(&segment, &ov_at("u-1", OverrideOp::Include, at(61), "e1", 1)).await.unwrap());
        store.claim_changes(&segment, 2, "worker-0", Duration::from_secs(60)).await.unwrap();
        assert_eq!(store.versions(&segment).await.unwrap()[&2].members, members);

        let prefix = format!("sg:{{memory/{name}}}:");
        let mut keys = server.keys(&format!("{prefix}*"));
        keys.sort();
        let (mut shape, mut total) = (Vec::new(), 0);
        for key in &keys {
            let bytes = memory_usage(server.port, key);
            assert!(bytes <= 512, "{key}: {bytes} bytes");
            total += bytes;
            shape.push(key.trim_start_matches(&prefix).to_string());
        }
        println!("{name} ({members} members): {total} bytes in {keys:?}");
        shapes.push(shape);
        totals.push(total);
    }
    assert_eq!(shapes[0], shapes[1], "the same keys whatever the member count");
    assert_eq!(shapes[0], ["changes", "fenced", "meta", "ov", "promoted"]);
    assert!(totals[1].abs_diff(totals[0]) <= 64, "as many bytes whatever the member count: {totals:?}");
    assert!(server.keys("sg:u:*").is_empty(), "no per-user key");
}
