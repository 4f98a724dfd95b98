//! The store contract (`core/src/store.rs`), one suite run against the
//! embedded store, a single redis-server and a three-node Redis Cluster,
//! plus what only Redis has: rollover notifications, readers racing
//! rollovers, failing fast when Redis is gone, and memory per membership.
//!
//! Every contract takes its own namespace, so they share a server.

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
use segment_tests::{RedisCluster, RedisServer};

trait Store: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry {}
impl<S: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry> Store for S {}

fn users(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:05}")).collect()
}

fn set(users: &[String]) -> BTreeSet<String> {
    users.iter().cloned().collect()
}

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

async fn load_sealed(store: &impl Store, segment: &SegmentKey, version: u64, members: &[String], snapshot: DateTime<Utc>) {
    // Two batches, the second overlapping the first, as a retried part would.
    let half = members.len() / 2;
    store.load_members(segment, version, &members[..half]).await.unwrap();
    store.load_members(segment, version, &members[half.saturating_sub(3)..]).await.unwrap();
    let sealed = store.seal_version(segment, version, Some(snapshot), Some("hash")).await.unwrap();
    assert_eq!(sealed.members, set(members).len() as u64, "{segment} v{version}: the store counts its own members");
}

/// The members of `candidates` a reader is served right now: the alias,
/// then one batch check against that version.
async fn served(store: &impl Store, segment: &SegmentKey, candidates: &[String]) -> BTreeSet<String> {
    let Some(version) = store.aliases().await.unwrap().get(segment).copied() else {
        return BTreeSet::new();
    };
    let pairs: Vec<_> = candidates.iter().map(|u| (segment.clone(), version, u.clone())).collect();
    let found = store.check(&pairs).await.unwrap();
    candidates.iter().zip(found).filter(|(_, f)| *f).map(|(u, _)| u.clone()).collect()
}

/// The version of `segment` a user is served in, if any: the reverse index
/// filtered by the aliases ("which segments is U in", for one segment).
async fn served_version(store: &impl Store, segment: &SegmentKey, user: &str) -> Option<u64> {
    let aliases = store.aliases().await.unwrap();
    let listed = store.user_versions(user).await.unwrap();
    listed.into_iter().find(|(s, v)| s == segment && aliases.get(s) == Some(v)).map(|(_, v)| v)
}

async fn versions_of(store: &impl Store, segment: &SegmentKey, user: &str) -> BTreeSet<u64> {
    store.user_versions(user).await.unwrap().into_iter().filter(|(s, _)| s == segment).map(|(_, v)| v).collect()
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

async fn load_seal_and_list(store: &impl Store, segment: &SegmentKey) {
    let members = users("u", 0..120);
    assert!(store.versions(segment).await.unwrap().is_empty());
    load_sealed(store, segment, 1, &members, at(0)).await;
    store.load_members(segment, 2, &users("u", 50..80)).await.unwrap();
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(versions.keys().copied().collect::<Vec<_>>(), [1], "a version being loaded is not listed");
    assert_eq!(versions[&1].members, 120);
    assert_eq!(versions[&1].snapshot_time, Some(at(0)), "snapshot time round-trips to the nanosecond");
    assert_eq!(versions[&1].definition_hash.as_deref(), Some("hash"));

    let sealed = store.seal_version(segment, 2, None, None).await.unwrap();
    assert_eq!((sealed.members, sealed.snapshot_time, sealed.definition_hash), (30, None, None));
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(versions[&2].members, 30);
    assert_eq!((versions[&2].snapshot_time, versions[&2].definition_hash.clone()), (None, None));
    // An empty version can be sealed: a definition may match nobody.
    assert_eq!(store.seal_version(segment, 3, Some(at(1)), None).await.unwrap().members, 0);
    assert_eq!(store.versions(segment).await.unwrap()[&3].members, 0);
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

async fn invisible_until_activated(store: &impl Store, segment: &SegmentKey) {
    let old = users("old", 0..50);
    let new = users("new", 0..50);
    let all: Vec<String> = old.iter().chain(&new).cloned().collect();
    load_sealed(store, segment, 1, &old, at(0)).await;
    assert!(!store.aliases().await.unwrap().contains_key(segment), "sealed is not active");
    assert!(served(store, segment, &all).await.is_empty());
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment, &all).await, set(&old));

    store.load_members(segment, 2, &new).await.unwrap();
    missing(store.activate(segment, 2).await, 2);
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1), "a refused activate changes nothing");
    assert_eq!(served(store, segment, &all).await, set(&old), "a version being loaded is invisible");
    assert_eq!(served_version(store, segment, &new[0]).await, None);
    store.seal_version(segment, 2, Some(at(1)), None).await.unwrap();
    assert_eq!(served(store, segment, &all).await, set(&old), "a sealed version is invisible until activated");

    store.activate(segment, 2).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), Some(2));
    assert_eq!(store.aliases().await.unwrap().get(segment), Some(&2));
    assert_eq!(served(store, segment, &all).await, set(&new));
    assert_eq!(served_version(store, segment, &new[0]).await, Some(2));
    assert_eq!(served_version(store, segment, &old[0]).await, None);
    missing(store.activate(segment, 9).await, 9);
}

async fn rollback_to_an_older_version(store: &impl Store, segment: &SegmentKey) {
    let both = users("both", 0..40);
    let only_old = users("old", 0..40);
    let only_new = users("new", 0..40);
    let v1: Vec<String> = both.iter().chain(&only_old).cloned().collect();
    let v2: Vec<String> = both.iter().chain(&only_new).cloned().collect();
    let all: Vec<String> = v1.iter().chain(&only_new).cloned().collect();
    load_sealed(store, segment, 1, &v1, at(0)).await;
    load_sealed(store, segment, 2, &v2, at(10)).await;
    store.activate(segment, 1).await.unwrap();
    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment, &all).await, set(&v2));

    // pinVersion: 1
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment, &all).await, set(&v1), "users in both versions stay, new ones go");
    assert!(store.is_member(segment, 1, &both[0]).await.unwrap());
    assert!(!store.is_member(segment, 1, &only_new[0]).await.unwrap());
    assert_eq!(versions_of(store, segment, &both[0]).await, BTreeSet::from([1, 2]), "one reverse entry per version");
    assert_eq!(served_version(store, segment, &both[0]).await, Some(1));
    assert_eq!(served_version(store, segment, &only_new[0]).await, None);
    assert_eq!(served_version(store, segment, &only_old[0]).await, Some(1));
}

async fn deleting_an_old_version_keeps_the_active_one(store: &impl Store, segment: &SegmentKey) {
    // More than one SSCAN batch, so the incremental delete loops.
    let v1 = users("u", 0..2500);
    let v2 = users("u", 1000..3000);
    load_sealed(store, segment, 1, &v1, at(0)).await;
    load_sealed(store, segment, 2, &v2, at(10)).await;
    store.activate(segment, 2).await.unwrap();
    store.delete_version(segment, 1).await.unwrap();

    assert_eq!(store.versions(segment).await.unwrap().keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(store.active_version(segment).await.unwrap(), Some(2));
    let all = users("u", 0..3000);
    assert_eq!(served(store, segment, &all).await, set(&v2), "every active member is still readable");
    assert_eq!(versions_of(store, segment, "u-01500").await, BTreeSet::from([2]), "the deleted version's field is gone");
    assert!(versions_of(store, segment, "u-00010").await.is_empty(), "a user only in the deleted version has no field left");
    assert!(!store.is_member(segment, 1, "u-00010").await.unwrap());
    missing(store.change_count(segment, 1, 2).await, 1);
    // Deleting what is not there is fine (a retried retention pass).
    store.delete_version(segment, 1).await.unwrap();
    store.delete_version(segment, 77).await.unwrap();

    // A partially loaded version (failed ingest) is deleted the same way.
    store.load_members(segment, 3, &users("partial", 0..10)).await.unwrap();
    store.delete_version(segment, 3).await.unwrap();
    assert!(versions_of(store, segment, "partial-00001").await.is_empty());
    missing(store.change_count(segment, 2, 3).await, 3);

    // Never asked by the operator, but safe: deleting the active version
    // leaves the segment without one rather than pointing at nothing.
    store.delete_version(segment, 2).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert!(!store.aliases().await.unwrap().contains_key(segment));
}

async fn loads_are_idempotent(store: &impl Store, segment: &SegmentKey) {
    let batch = users("u", 0..300);
    store.load_members(segment, 1, &batch).await.unwrap();
    let first = store.seal_version(segment, 1, Some(at(0)), Some("h")).await.unwrap();
    store.load_members(segment, 1, &batch).await.unwrap();
    store.load_members(segment, 1, &batch[100..200]).await.unwrap();
    let again = store.seal_version(segment, 1, Some(at(0)), Some("h")).await.unwrap();
    assert_eq!(first, again, "a retried ingest records the same version");
    assert_eq!(again.members, 300);
    assert_eq!(store.versions(segment).await.unwrap()[&1].members, 300);
    assert_eq!(store.user_versions("u-00150").await.unwrap().iter().filter(|(s, _)| s == segment).count(), 1);
    store.activate(segment, 1).await.unwrap();
    store.activate(segment, 1).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1));
    // Empty loads change nothing.
    store.load_members(segment, 1, &[]).await.unwrap();
    assert_eq!(store.seal_version(segment, 1, Some(at(0)), Some("h")).await.unwrap().members, 300);
}

async fn changes_are_set_arithmetic(store: &impl Store, segment: &SegmentKey) {
    // Big enough for the sets to be hash tables scanned in several steps.
    let a = users("u", 0..1800);
    let b = users("u", 1200..3300);
    load_sealed(store, segment, 1, &a, at(0)).await;
    load_sealed(store, segment, 2, &b, at(10)).await;
    let (sa, sb) = (set(&a), set(&b));
    let entered: BTreeSet<String> = sb.difference(&sa).cloned().collect();
    let exited: BTreeSet<String> = sa.difference(&sb).cloned().collect();
    assert_eq!(store.change_count(segment, 1, 2).await.unwrap(), (entered.len() + exited.len()) as u64);
    assert_eq!(store.change_count(segment, 2, 1).await.unwrap(), (entered.len() + exited.len()) as u64);
    assert_eq!(store.change_count(segment, 1, 1).await.unwrap(), 0);

    for page_size in [37, 500] {
        let (mut got_entered, mut got_exited) = (BTreeSet::new(), BTreeSet::new());
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = store.diff_page(segment, 1, 2, cursor.as_deref(), page_size).await.unwrap();
            pages += 1;
            assert!(page.changes.len() <= page_size, "a page holds at most {page_size}");
            assert!(page.next.is_none() || page.changes.len() == page_size, "only the last page is short");
            for change in page.changes {
                let fresh = if change.entered { got_entered.insert(change.user) } else { got_exited.insert(change.user) };
                assert!(fresh, "no user is reported twice");
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
            assert!(pages < 10_000, "the diff must end");
        }
        assert_eq!(got_entered, entered, "page size {page_size}: entered = to - from");
        assert_eq!(got_exited, exited, "page size {page_size}: exited = from - to");
        assert!(pages >= (entered.len() + exited.len()) / page_size, "pages of {page_size}: {pages}");
    }
    let same = store.diff_page(segment, 2, 2, None, 10).await.unwrap();
    assert!(same.changes.is_empty() && same.next.is_none());
    missing(store.change_count(segment, 1, 9).await, 9);
    missing(store.diff_page(segment, 9, 2, None, 10).await, 9);
    // A version being loaded can be compared too (the guard runs before sealing is not required).
    store.load_members(segment, 3, &users("u", 0..10)).await.unwrap();
    assert_eq!(store.change_count(segment, 1, 3).await.unwrap(), 1790);
}

async fn the_newest_override_wins(store: &impl Store, segment: &SegmentKey) {
    load_sealed(store, segment, 1, &users("u", 0..3), at(0)).await;
    store.activate(segment, 1).await.unwrap();
    let u1 = "u-00001";

    assert!(store.record_override(segment, &ov(u1, OverrideOp::Exclude, at(10), "a")).await.unwrap());
    assert!(!store.is_member(segment, 1, u1).await.unwrap(), "an exclude leaves the active version");
    assert_eq!(served_version(store, segment, u1).await, None, "and the reverse index");
    assert!(!store.record_override(segment, &ov(u1, OverrideOp::Exclude, at(10), "a")).await.unwrap(), "redelivery");
    assert!(!store.record_override(segment, &ov(u1, OverrideOp::Include, at(5), "z")).await.unwrap(), "an older one loses");
    assert!(!store.is_member(segment, 1, u1).await.unwrap());
    // Same time: the id breaks the tie, the same way everywhere.
    assert!(store.record_override(segment, &ov(u1, OverrideOp::Include, at(10), "b")).await.unwrap());
    assert!(store.is_member(segment, 1, u1).await.unwrap());
    assert_eq!(served_version(store, segment, u1).await, Some(1));

    assert!(store.record_override(segment, &ov("vip", OverrideOp::Include, at(12), "c")).await.unwrap());
    assert!(store.is_member(segment, 1, "vip").await.unwrap(), "an include adds a user who was not computed");
    assert_eq!(served_version(store, segment, "vip").await, Some(1));
    assert_eq!(store.versions(segment).await.unwrap()[&1].members, 3, "the count recorded at sealing stays");
    assert!(!store.record_override(segment, &ov("vip", OverrideOp::Include, at(12), "c")).await.unwrap());
    assert_eq!(store.versions(segment).await.unwrap()[&1].members, 3, "a redelivery changes nothing");

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
/// wins, whatever the producer's ids say, in `record_override` and in
/// ingest's `apply_overrides`; the same event again changes nothing.
async fn equal_times_go_to_the_later_offset(store: &impl Store, segment: &SegmentKey) {
    load_sealed(store, segment, 1, &users("u", 0..3), at(0)).await;
    store.activate(segment, 1).await.unwrap();
    let u1 = "u-00001";
    let first = ov_at(u1, OverrideOp::Exclude, at(10), "z", 5);
    let second = ov_at(u1, OverrideOp::Include, at(10), "a", 6);
    assert!(store.record_override(segment, &first).await.unwrap());
    assert!(!store.is_member(segment, 1, u1).await.unwrap());
    assert!(store.record_override(segment, &second).await.unwrap(), "the later offset wins though its id sorts first");
    assert!(store.is_member(segment, 1, u1).await.unwrap());
    assert!(!store.record_override(segment, &first).await.unwrap(), "the earlier event, redelivered, loses");
    assert!(!store.record_override(segment, &second).await.unwrap(), "a redelivery changes nothing");
    let duplicate = Override { offset: Some(9), ..second.clone() };
    assert!(!store.record_override(segment, &duplicate).await.unwrap(), "nor does the producer's duplicate of the event");
    assert!(store.is_member(segment, 1, u1).await.unwrap());
    assert_eq!(served_version(store, segment, u1).await, Some(1));

    // Recorded without an offset (before offsets were kept): older than any with one.
    let u2 = "u-00002";
    assert!(store.record_override(segment, &ov(u2, OverrideOp::Exclude, at(10), "z")).await.unwrap());
    assert!(store.record_override(segment, &ov_at(u2, OverrideOp::Include, at(10), "a", 0)).await.unwrap());
    assert!(store.is_member(segment, 1, u2).await.unwrap());

    // Ingest read a list with the earlier event: the recorded later one is applied.
    store.load_members(segment, 2, &users("u", 0..3)).await.unwrap();
    store.apply_overrides(segment, 2, &[ov_at(u1, OverrideOp::Exclude, at(10), "z", 5)]).await.unwrap();
    assert!(store.seal_version(segment, 2, Some(at(0)), None).await.unwrap().members == 3, "u-00001 stays in v2");
    let recorded = store.overrides_since(segment, at(0)).await.unwrap();
    let mut found: Vec<(String, String, Option<u64>)> = recorded.into_iter().map(|o| (o.user, o.id, o.offset)).collect();
    found.sort();
    assert_eq!(found, [(u1.to_string(), "a".to_string(), Some(6)), (u2.to_string(), "a".to_string(), Some(0))]);
}

/// The realtime worker's call: nothing is recorded for a segment that has no
/// active version, and the same as `record_override` once it has one.
async fn overrides_only_for_served_segments(store: &impl Store, segment: &SegmentKey) {
    load_sealed(store, segment, 1, &users("u", 0..3), at(0)).await;
    let exclude = ov("u-00001", OverrideOp::Exclude, at(10), "a");
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), None, "not served yet");
    assert!(store.overrides_since(segment, at(0)).await.unwrap().is_empty(), "nothing recorded");
    assert!(store.is_member(segment, 1, "u-00001").await.unwrap(), "nothing applied");
    store.activate(segment, 1).await.unwrap();
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), Some(true));
    assert!(!store.is_member(segment, 1, "u-00001").await.unwrap());
    assert_eq!(store.record_override_if_active(segment, &exclude).await.unwrap(), Some(false), "redelivery");
}

/// The ingest flow: overrides newer than a version's snapshot are applied to
/// it before sealing, older ones are not, and they survive the rollover.
async fn overrides_survive_the_rollover(store: &impl Store, segment: &SegmentKey) {
    let computed = users("u", 0..10);
    load_sealed(store, segment, 1, &computed, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    store.record_override(segment, &ov("u-00001", OverrideOp::Exclude, at(5), "a")).await.unwrap();
    store.record_override(segment, &ov("u-00002", OverrideOp::Exclude, at(15), "b")).await.unwrap();
    store.record_override(segment, &ov("vip", OverrideOp::Include, at(16), "c")).await.unwrap();

    let snapshot = at(10);
    store.load_members(segment, 2, &computed).await.unwrap();
    let newer = store.overrides_since(segment, snapshot).await.unwrap();
    assert_eq!(newer.len(), 2);
    store.apply_overrides(segment, 2, &newer).await.unwrap();
    assert_eq!(store.seal_version(segment, 2, Some(snapshot), None).await.unwrap().members, 10);
    store.activate(segment, 2).await.unwrap();

    let mut candidates = computed.clone();
    candidates.push("vip".into());
    let now = served(store, segment, &candidates).await;
    assert!(now.contains("u-00001"), "an override older than the snapshot is not re-applied");
    assert!(!now.contains("u-00002"), "the exclude survives the rollover");
    assert!(now.contains("vip"), "the include survives the rollover");
    assert_eq!(served_version(store, segment, "vip").await, Some(2));
    assert_eq!(served_version(store, segment, "u-00002").await, None);
}

/// A version reflects the events before its `overrides_from` (its snapshot
/// minus the lake's lag), not its snapshot: an override recorded between
/// the two reaches it although it is sealed with a later snapshot. Old
/// overrides are pruned, unless one was recorded for the user meanwhile.
async fn overrides_reach_what_the_lake_may_not_hold_yet_and_old_ones_are_pruned(store: &impl Store, segment: &SegmentKey) {
    let computed = users("u", 0..10);
    load_sealed(store, segment, 1, &computed, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    // v2 computed at 60, the lake an hour behind: it reflects events until 0.
    store.load_members(segment, 2, &computed).await.unwrap();
    let read = segment_core::manifest::SourceRead {
        table: "orders".into(),
        format: segment_core::api::SourceFormat::Delta,
        version: Some(12),
    };
    let seal =
        Seal { snapshot_time: Some(at(60)), overrides_from: Some(at(0)), table_versions: vec![read.clone()], ..Seal::default() };
    let sealed = store.seal_with(segment, 2, &seal).await.unwrap();
    assert_eq!(sealed.overrides_from, Some(at(0)));
    let listed = &store.versions(segment).await.unwrap()[&2];
    assert_eq!((listed.overrides_from, &listed.table_versions), (Some(at(0)), &vec![read]), "kept with the version");

    store.record_override(segment, &ov("u-00001", OverrideOp::Exclude, at(30), "a")).await.unwrap();
    assert!(!store.is_member(segment, 2, "u-00001").await.unwrap(), "v2's lake may not hold an event at 30 yet");
    store.activate(segment, 2).await.unwrap();
    assert!(!served(store, segment, &computed).await.contains("u-00001"), "the exclude survives the rollover");

    store.record_override(segment, &ov("u-00002", OverrideOp::Exclude, at(70), "b")).await.unwrap();
    assert_eq!(store.prune_overrides(segment, at(50)).await.unwrap(), 1);
    let left: Vec<String> = store.overrides_since(segment, at(-1000)).await.unwrap().into_iter().map(|o| o.user).collect();
    assert_eq!(left, ["u-00002"]);
    assert_eq!(store.prune_overrides(segment, at(50)).await.unwrap(), 0);
}

/// Overrides that arrive after ingest read its list still reach the new
/// version: while it is loading, while it awaits rollover, and when ingest
/// applies a list that is stale by then.
async fn late_overrides_reach_versions_in_flight(store: &impl Store, segment: &SegmentKey) {
    let computed = users("u", 0..10);
    load_sealed(store, segment, 1, &computed, at(0)).await;
    store.activate(segment, 1).await.unwrap();
    // v2 sealed (snapshot at 10), held by the guard; v3 still loading.
    load_sealed(store, segment, 2, &computed, at(10)).await;
    store.load_members(segment, 3, &computed).await.unwrap();

    store.record_override(segment, &ov("u-00003", OverrideOp::Exclude, at(11), "late")).await.unwrap();
    store.record_override(segment, &ov("early", OverrideOp::Include, at(9), "early")).await.unwrap();

    // Ingest of v3 read its list before a newer override of the same user.
    let list = vec![ov("u-00005", OverrideOp::Exclude, at(12), "x")];
    store.record_override(segment, &list[0]).await.unwrap();
    store.record_override(segment, &ov("u-00005", OverrideOp::Include, at(13), "y")).await.unwrap();
    store.apply_overrides(segment, 3, &list).await.unwrap();
    store.seal_version(segment, 3, Some(at(11)), None).await.unwrap();

    // (Read once sealed: what readers see of a version still loading is
    // not part of the contract.)
    for version in [1, 2, 3] {
        assert!(!store.is_member(segment, version, "u-00003").await.unwrap(), "v{version} got the late exclude");
    }
    assert!(store.is_member(segment, 1, "early").await.unwrap(), "the active version gets every override");
    assert!(!store.is_member(segment, 2, "early").await.unwrap(), "v2's snapshot already reflects an older event");
    assert!(store.is_member(segment, 3, "early").await.unwrap(), "a loading version's snapshot is not known yet");
    assert!(store.is_member(segment, 3, "u-00005").await.unwrap(), "the newest override wins over a stale list");
    assert_eq!(versions_of(store, segment, "u-00005").await, BTreeSet::from([1, 2, 3]));
    assert_eq!(versions_of(store, segment, "early").await, BTreeSet::from([1, 3]));
    assert_eq!(store.versions(segment).await.unwrap()[&3].members, 10, "10 - u-00003 + early");

    store.activate(segment, 2).await.unwrap();
    assert!(!served(store, segment, &computed).await.contains("u-00003"), "v2 kept the exclude through the rollover");
    store.activate(segment, 3).await.unwrap();
    let now = served(store, segment, &computed).await;
    assert!(!now.contains("u-00003") && now.contains("u-00005"));
    // Retained older versions are left as they were computed.
    store.record_override(segment, &ov("u-00007", OverrideOp::Exclude, at(20), "z")).await.unwrap();
    assert!(store.is_member(segment, 1, "u-00007").await.unwrap());
    assert!(!store.is_member(segment, 3, "u-00007").await.unwrap());
}

async fn reads_agree(store: &impl Store, namespace: &str) {
    let a = SegmentKey::new(namespace, "a");
    let b = SegmentKey::new(namespace, "b");
    load_sealed(store, &a, 1, &users("u", 0..60), at(0)).await;
    load_sealed(store, &a, 2, &users("u", 30..90), at(1)).await;
    load_sealed(store, &b, 1, &users("u", 50..120), at(0)).await;
    load_sealed(store, &b, 4, &users("u", 0..10), at(1)).await;
    store.activate(&a, 2).await.unwrap();
    store.activate(&b, 1).await.unwrap();
    let sample = users("u", 0..130);
    let mut pairs = Vec::new();
    for user in &sample {
        for (segment, version) in [(&a, 1), (&a, 2), (&a, 3), (&b, 1), (&b, 4)] {
            pairs.push((segment.clone(), version, user.clone()));
        }
    }
    let checked = store.check(&pairs).await.unwrap();
    assert_eq!(checked.len(), pairs.len());
    let mut expected: BTreeMap<String, BTreeSet<(SegmentKey, u64)>> = BTreeMap::new();
    for ((segment, version, user), found) in pairs.iter().zip(&checked) {
        assert_eq!(*found, store.is_member(segment, *version, user).await.unwrap(), "{segment} v{version} {user}");
        if *found {
            expected.entry(user.clone()).or_default().insert((segment.clone(), *version));
        }
    }
    for user in &sample {
        let listed: BTreeSet<(SegmentKey, u64)> =
            store.user_versions(user).await.unwrap().into_iter().filter(|(s, _)| s.namespace == namespace).collect();
        assert_eq!(listed, expected.get(user).cloned().unwrap_or_default(), "user_versions({user}) agrees with is_member");
    }
    assert_eq!(served_version(store, &a, "u-00055").await, Some(2));
    assert_eq!(served_version(store, &b, "u-00055").await, Some(1));
    assert_eq!(served_version(store, &a, "u-00005").await, None, "in a's retained v1 only");
    assert!(store.check(&[]).await.unwrap().is_empty());
    assert!(store.user_versions("nobody-at-all").await.unwrap().is_empty());
}

async fn deleting_a_segment_removes_everything(store: &impl Store, segment: &SegmentKey) {
    load_sealed(store, segment, 1, &users("u", 0..1500), at(0)).await;
    load_sealed(store, segment, 2, &users("u", 500..2000), at(10)).await;
    store.load_members(segment, 3, &users("u", 0..5)).await.unwrap();
    store.activate(segment, 2).await.unwrap();
    store.record_override(segment, &ov("vip", OverrideOp::Include, at(20), "v")).await.unwrap();

    store.delete_segment(segment).await.unwrap();
    assert!(!store.aliases().await.unwrap().contains_key(segment));
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert!(store.versions(segment).await.unwrap().is_empty());
    assert!(store.overrides_since(segment, at(-1000)).await.unwrap().is_empty());
    for user in ["u-00000", "u-01000", "u-01999", "vip"] {
        assert!(versions_of(store, segment, user).await.is_empty(), "{user} keeps no reverse entry");
    }
    assert!(!store.is_member(segment, 2, "u-01000").await.unwrap());
    missing(store.change_count(segment, 1, 2).await, 1);
    store.delete_segment(segment).await.unwrap();

    // The name can be used again from scratch.
    load_sealed(store, segment, 1, &users("u", 0..3), at(30)).await;
    store.activate(segment, 1).await.unwrap();
    assert_eq!(served(store, segment, &users("u", 0..2000)).await, set(&users("u", 0..3)));
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

/// Unsealed data is listed (a load in progress, a half-done delete); a
/// deleted version is fenced: a late seal fails and lists nothing; only an
/// activate records a version as promoted.
async fn deletes_fence_and_unsealed_data_is_listed(store: &impl Store, segment: &SegmentKey) {
    load_sealed(store, segment, 1, &users("u", 0..20), at(0)).await;
    store.load_members(segment, 2, &users("u", 0..5)).await.unwrap();
    assert_eq!(store.unsealed_versions(segment).await.unwrap(), BTreeSet::from([2]));
    assert!(!store.versions(segment).await.unwrap()[&1].promoted, "sealed, never served");
    store.activate(segment, 1).await.unwrap();
    assert!(store.versions(segment).await.unwrap()[&1].promoted);

    // The run of v2 is cancelled: its version is deleted while its ingest
    // Job still runs; what the Job loads and seals afterwards is refused.
    store.delete_version(segment, 2).await.unwrap();
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty());
    assert!(store.is_fenced(segment, 2).await.unwrap() && !store.is_fenced(segment, 1).await.unwrap());
    store.load_members(segment, 2, &users("late", 0..3)).await.unwrap();
    assert_eq!(store.unsealed_versions(segment).await.unwrap(), BTreeSet::from([2]), "the late load is found");
    match store.seal_version(segment, 2, Some(at(5)), Some("hash")).await {
        Err(StoreError::Fenced { version: 2, .. }) => {}
        other => panic!("expected Fenced v2, got {other:?}"),
    }
    assert_eq!(store.versions(segment).await.unwrap().keys().copied().collect::<Vec<_>>(), [1]);
    store.delete_version(segment, 2).await.unwrap();
    assert!(store.unsealed_versions(segment).await.unwrap().is_empty());
    assert!(versions_of(store, segment, "late-00001").await.is_empty());

    // A version deleted after being served is no longer promoted.
    load_sealed(store, segment, 3, &users("u", 0..30), at(10)).await;
    store.activate(segment, 3).await.unwrap();
    store.delete_version(segment, 1).await.unwrap();
    let versions = store.versions(segment).await.unwrap();
    assert_eq!(versions.keys().copied().collect::<Vec<_>>(), [3]);
    assert!(versions[&3].promoted);
}

/// A withdrawn segment has no active version and is not served, and keeps
/// every version for a Segment created again under its name.
async fn withdrawing_stops_serving_and_keeps_the_versions(store: &impl Store, segment: &SegmentKey) {
    let members = users("u", 0..40);
    load_sealed(store, segment, 1, &members, at(0)).await;
    load_sealed(store, segment, 2, &members[..10], at(10)).await;
    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment, &members).await.len(), 10);

    store.withdraw(segment).await.unwrap();
    assert_eq!(store.active_version(segment).await.unwrap(), None);
    assert!(!store.aliases().await.unwrap().contains_key(segment));
    assert!(served(store, segment, &members).await.is_empty());
    assert_eq!(served_version(store, segment, "u-00001").await, None);
    let kept = store.versions(segment).await.unwrap();
    assert_eq!(kept.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert!(kept[&2].promoted && !kept[&1].promoted);
    store.withdraw(segment).await.unwrap();

    store.activate(segment, 2).await.unwrap();
    assert_eq!(served(store, segment, &members).await.len(), 10, "served again once activated");
}

/// Replicas are asked to load a version ahead of its rollover: the request
/// is listed and announced, and lasts until the segment is switched to
/// that version (not to another one), withdrawn or deleted. A replica
/// counts while its liveness lasts and holds what it reported last. (The
/// only contract that registers replicas: liveness is global.)
async fn replicas_load_what_is_requested(store: &impl Store, segment: &SegmentKey) {
    let namespace = segment.namespace.as_str();
    let other = SegmentKey::new(namespace, "other");
    for version in 1..=3 {
        load_sealed(store, segment, version, &users("u", 0..5), at(version as i64)).await;
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
    load_sealed(store, segment, 1, &users("u", 0..3), at(0)).await;
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
    load_seal_and_list(store, &segment("load")).await;
    a_version_is_sealed_with_the_count_it_is_given(store, &segment("given")).await;
    invisible_until_activated(store, &segment("invisible")).await;
    rollback_to_an_older_version(store, &segment("rollback")).await;
    deleting_an_old_version_keeps_the_active_one(store, &segment("delete-version")).await;
    loads_are_idempotent(store, &segment("idempotent")).await;
    changes_are_set_arithmetic(store, &segment("diff")).await;
    the_newest_override_wins(store, &segment("overrides")).await;
    equal_times_go_to_the_later_offset(store, &segment("offsets")).await;
    overrides_only_for_served_segments(store, &segment("served-only")).await;
    overrides_survive_the_rollover(store, &segment("survive")).await;
    late_overrides_reach_versions_in_flight(store, &segment("late")).await;
    overrides_reach_what_the_lake_may_not_hold_yet_and_old_ones_are_pruned(store, &segment("lake-lag")).await;
    reads_agree(store, &format!("{prefix}-reads")).await;
    deleting_a_segment_removes_everything(store, &segment("delete-segment")).await;
    change_events_are_claimed_once(store, &segment("changes")).await;
    deletes_fence_and_unsealed_data_is_listed(store, &segment("fence")).await;
    withdrawing_stops_serving_and_keeps_the_versions(store, &segment("withdraw")).await;
    replicas_load_what_is_requested(store, &segment("replicas")).await;
    overrides_that_take_effect_are_announced(store, &segment("override-notices")).await;
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    run_contract(&MemoryStore::new(), "mem").await;
}

#[tokio::test]
async fn redis_keeps_the_contract() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    run_contract(&store, "single").await;
    // The deleted segment was created again with one version, activated: only that is left.
    let mut left = server.keys("sg:{single-delete-segment/segment}*");
    left.sort();
    assert_eq!(
        left,
        [
            "sg:{single-delete-segment/segment}:loaded",
            "sg:{single-delete-segment/segment}:meta",
            "sg:{single-delete-segment/segment}:promoted",
            "sg:{single-delete-segment/segment}:v1"
        ]
    );
    assert!(server.keys("sg:{single-delete-version/segment}:v*").is_empty(), "deleted versions leave no set behind");
    assert_eq!(
        server.keys("sg:{single-replicas/segment}*"),
        Vec::<String>::new(),
        "a deleted segment leaves no key, reports of replicas included"
    );
}

#[tokio::test]
async fn redis_cluster_keeps_the_contract() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    run_contract(&store, "cluster").await;
    let mut left = cluster.keys("sg:{cluster-delete-segment/segment}*");
    left.sort();
    assert_eq!(
        left,
        [
            "sg:{cluster-delete-segment/segment}:loaded",
            "sg:{cluster-delete-segment/segment}:meta",
            "sg:{cluster-delete-segment/segment}:promoted",
            "sg:{cluster-delete-segment/segment}:v1"
        ]
    );
    assert!(cluster.keys("sg:{cluster-delete-version/segment}:v*").is_empty(), "deleted versions leave no set behind");
    assert_eq!(
        cluster.keys("sg:{cluster-replicas/segment}*"),
        Vec::<String>::new(),
        "a deleted segment leaves no key, reports of replicas included"
    );
}

// ------------------------------------------------------------- Redis only

async fn next_notice(notices: &mut (impl futures::Stream<Item = Rollover> + Unpin)) -> Rollover {
    tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a rollover notice within 5s")
        .expect("the notice stream is open")
}

async fn rollovers_are_announced(store: &RedisStore, namespace: &str) {
    let segment = SegmentKey::new(namespace, "announced");
    let mut notices = store.rollovers().await.unwrap();
    load_sealed(store, &segment, 1, &users("u", 0..5), at(0)).await;
    load_sealed(store, &segment, 2, &users("u", 0..5), at(1)).await;
    store.activate(&segment, 1).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(1) });
    store.activate(&segment, 2).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(2) });
    store.delete_version(&segment, 1).await.unwrap();
    store.delete_version(&segment, 2).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: None }, "no active version");
    load_sealed(store, &segment, 3, &users("u", 0..5), at(2)).await;
    store.activate(&segment, 3).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: Some(3) });
    store.withdraw(&segment).await.unwrap();
    assert_eq!(next_notice(&mut notices).await, Rollover { segment: segment.clone(), version: None }, "withdrawn");
}

/// Readers take the alias once and read with it while rollovers flip the
/// segment between two versions: each read sees exactly one version.
async fn readers_never_see_a_mix(store: &RedisStore, namespace: &str) {
    let segment = SegmentKey::new(namespace, "flip");
    let a = users("u", 0..2000);
    let b = users("u", 1000..3000);
    load_sealed(store, &segment, 1, &a, at(0)).await;
    load_sealed(store, &segment, 2, &b, at(1)).await;
    store.activate(&segment, 1).await.unwrap();
    // Users only in A, in both, and only in B.
    let sample: Vec<String> = users("u", 0..3000).into_iter().step_by(15).collect();
    let expected = |version: u64| -> Vec<bool> {
        let members = if version == 1 { set(&a) } else { set(&b) };
        sample.iter().map(|u| members.contains(u)).collect()
    };
    let (only_a, only_b) = ("u-00003".to_string(), "u-02999".to_string());

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (store, segment, sample, done) = (store.clone(), segment.clone(), sample.clone(), done.clone());
        let (expected_a, expected_b) = (expected(1), expected(2));
        let (only_a, only_b) = (only_a.clone(), only_b.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = BTreeMap::<u64, usize>::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let version = store.aliases().await.unwrap()[&segment];
                let pairs: Vec<_> = sample.iter().map(|u| (segment.clone(), version, u.clone())).collect();
                let found = store.check(&pairs).await.unwrap();
                assert_eq!(&found, if version == 1 { &expected_a } else { &expected_b }, "a read of v{version} saw a mix");
                // "Which segments is U in", filtered by the alias just read.
                for (user, in_version) in [(&only_a, 1), (&only_b, 2)] {
                    let listed = store.user_versions(user).await.unwrap();
                    let served = listed.iter().any(|(s, v)| *s == segment && *v == version);
                    assert_eq!(served, version == in_version, "{user} under v{version}");
                }
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
    readers_never_see_a_mix(&store, "single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_rollover_is_atomic_and_announced() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    rollovers_are_announced(&store, "cluster").await;
    readers_never_see_a_mix(&store, "cluster").await;
}

/// Slots move between nodes under a running store: batches built from
/// its cached slot table meet MOVED replies and must still land right.
#[tokio::test]
async fn redis_cluster_survives_resharding() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    let segments: Vec<SegmentKey> = (0..6).map(|i| SegmentKey::new("reshard", format!("s{i}"))).collect();
    let v1 = users("u", 0..3000);
    let v2 = users("u", 1500..4500);
    for segment in &segments {
        load_sealed(&store, segment, 1, &v1, at(0)).await;
        store.activate(segment, 1).await.unwrap();
    }
    // Half of each node's slots move on; the store's slot table is stale.
    cluster.reshard(0, 1, 2700);
    cluster.reshard(2, 0, 2700);
    let all = users("u", 0..4500);
    for segment in &segments {
        assert_eq!(served(&store, segment, &all).await, set(&v1), "{segment} reads right after resharding");
        load_sealed(&store, segment, 2, &v2, at(1)).await;
        store.activate(segment, 2).await.unwrap();
        assert_eq!(served(&store, segment, &all).await, set(&v2));
        store.delete_version(segment, 1).await.unwrap();
    }
    for user in ["u-00000", "u-02000", "u-04499"] {
        let listed: BTreeSet<(SegmentKey, u64)> = store.user_versions(user).await.unwrap().into_iter().collect();
        let expected: BTreeSet<(SegmentKey, u64)> =
            if user == "u-00000" { BTreeSet::new() } else { segments.iter().map(|s| (s.clone(), 2)).collect() };
        assert_eq!(listed, expected, "reverse index of {user}");
    }
}

/// Overrides stored before offsets were kept (no `offset` in their JSON)
/// are read back, and are older than an event at the same time that has one.
#[tokio::test]
async fn redis_reads_overrides_stored_before_offsets() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let segment = SegmentKey::new("legacy", "segment");
    load_sealed(&store, &segment, 1, &users("u", 0..3), at(0)).await;
    store.activate(&segment, 1).await.unwrap();
    let ts = at(10).to_rfc3339_opts(SecondsFormat::Nanos, true);
    let stored = format!(r#"{ts}{{"user":"u-00001","op":"exclude","ts":"{ts}","id":"old"}}"#);
    let written = segment_tests::redis_call(server.port, &["HSET", "sg:{legacy/segment}:ov", "u-00001", &stored]);
    assert_eq!(written, Some(segment_tests::Resp::Int(1)));

    assert_eq!(store.overrides_since(&segment, at(0)).await.unwrap(), [ov("u-00001", OverrideOp::Exclude, at(10), "old")]);
    let again = ov_at("u-00001", OverrideOp::Exclude, at(10), "old", 3);
    assert!(!store.record_override(&segment, &again).await.unwrap(), "the same event, now with its offset");
    let later = ov_at("u-00001", OverrideOp::Include, at(10), "a", 4);
    assert!(store.record_override(&segment, &later).await.unwrap(), "an event with an offset is the later");
    assert!(store.is_member(&segment, 1, "u-00001").await.unwrap());
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
    unavailable!(store.user_versions("u-1"));
    unavailable!(store.is_member(&segment, 1, "u-1"));
    unavailable!(store.check(&[(segment.clone(), 1, "u-1".to_string()), (SegmentKey::new("down", "other"), 1, "u-2".into())]));
    unavailable!(store.active_version(&segment));
    unavailable!(store.versions(&segment));
    unavailable!(store.load_members(&segment, 2, &users("u", 0..100)));
    unavailable!(store.seal_version(&segment, 2, None, None));
    unavailable!(store.activate(&segment, 1));
    unavailable!(store.record_override(&segment, &ov("u-1", OverrideOp::Exclude, at(1), "x")));
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
    load_sealed(&store, &segment, 1, &users("u", 0..10), at(0)).await;
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
    load_sealed(&store, &segment, 1, &users("u", 0..10), at(0)).await;
    store.activate(&segment, 1).await.unwrap();
    drop(cluster);
    fails_fast_when_down(&store).await;
}

/// Loads `ids` into each of `segments` segments (so users share their
/// reverse-index key) and returns Redis bytes per membership.
async fn bytes_per_membership(store: &RedisStore, used_memory: impl Fn() -> u64, ids: &[String], segments: usize) -> f64 {
    let before = used_memory();
    let start = Instant::now();
    for s in 0..segments {
        let segment = SegmentKey::new("memory", format!("s{s}"));
        for chunk in ids.chunks(5_000) {
            store.load_members(&segment, 1, chunk).await.unwrap();
        }
        store.seal_version(&segment, 1, Some(at(0)), Some("h")).await.unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    let total = (ids.len() * segments) as f64;
    let per_membership = used_memory().saturating_sub(before) as f64 / total;
    println!(
        "{total} memberships ({} users of {} bytes x {segments} segments): {per_membership:.1} bytes/membership, {:.0} memberships/s (debug build)",
        ids.len(),
        ids[0].len(),
        total / seconds
    );
    per_membership
}

/// Memory per membership, reported (docs/storage.md quotes it). Each
/// figure comes from a fresh server, so nothing freed lazily before skews
/// it. `SEGMENT_MEMORY_MEMBERS` sets the size of a run.
#[tokio::test]
async fn redis_memory_per_membership() {
    let members: usize = std::env::var("SEGMENT_MEMORY_MEMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let short = users("member", 0..members);
    let uuids: Vec<String> = (0..members).map(|i| format!("{i:08x}-7d3e-4a1b-9c2f-{:012x}", i * 7919)).collect();
    let mut figures = Vec::new();
    for (ids, segments) in [(&short[..], 1), (&uuids[..], 1), (&short[..members / 10], 10)] {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        figures.push(bytes_per_membership(&store, || server.used_memory(), ids, segments).await);
    }
    assert!(figures.iter().all(|f| *f > 0.0));
    assert!(figures[2] < figures[0], "a user in several segments shares one reverse-index key: {figures:?}");

    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    bytes_per_membership(&store, || cluster.used_memory(), &short[..members / 4], 1).await;
}
