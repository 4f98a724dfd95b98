//! `segment-worker ingest` against real result files (local and on a real
//! S3 server) and the stores: the embedded one and a real Redis.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use segment_compute::ingest;
use segment_core::api::SegmentKey;
use segment_core::index::INDEX_FILE;
use segment_core::manifest::Manifest;
use segment_core::reasons::FailureReason;
use segment_core::store::{CountedChange, MembershipReader, MemoryStore, Override, OverrideOp, SegmentStore};
use segment_core::task::{IngestTask, VersionFiles};
use segment_store::redis::RedisStore;
use segment_tests::RedisServer;

fn snapshot() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap()
}

fn users(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("user-{i:06}")).collect()
}

async fn write_result(uri: &str, segment: &SegmentKey, version: u64, parts: &[Vec<String>]) -> Manifest {
    segment_tests::write_result(uri, segment, version, snapshot(), parts).await
}

fn task(segment: &SegmentKey, version: u64, uri: &str, tolerance: u32) -> IngestTask {
    IngestTask {
        segment: segment.clone(),
        version,
        snapshot_time: snapshot(),
        results_uri: uri.to_string(),
        max_failed_parts: tolerance,
        compare_with: None,
        overrides_from: None,
    }
}

fn local_uri(dir: &tempfile::TempDir, version: u64) -> String {
    format!("file://{}/v{version}/", dir.path().display())
}

/// Ingests `members` as v1 and serves it, as a segment looks before the run under test.
async fn serve_v1<S: SegmentStore>(store: &S, segment: &SegmentKey, dir: &tempfile::TempDir, members: Vec<String>) {
    write_result(&local_uri(dir, 1), segment, 1, &[members]).await;
    ingest::run(&task(segment, 1, &local_uri(dir, 1), 0), store).await.unwrap();
    store.activate(segment, 1).await.unwrap();
}

/// Members a reader sees through the active version.
async fn served<S: MembershipReader>(store: &S, segment: &SegmentKey, candidates: &[String]) -> BTreeSet<String> {
    let Some(version) = store.aliases().await.unwrap().get(segment).copied() else { return BTreeSet::new() };
    let pairs: Vec<_> = candidates.iter().map(|u| (segment.clone(), version, u.clone())).collect();
    let found = store.check(&pairs).await.unwrap();
    candidates.iter().zip(found).filter(|(_, f)| *f).map(|(u, _)| u.clone()).collect()
}

async fn loads_every_part_invisibly<S: SegmentStore + MembershipReader>(store: &S, segment: &SegmentKey) {
    let dir = tempfile::tempdir().unwrap();
    serve_v1(store, segment, &dir, users(0..100)).await;

    write_result(&local_uri(&dir, 2), segment, 2, &[users(50..2050), users(2050..4050), users(4050..4100)]).await;
    let report = ingest::run(&task(segment, 2, &local_uri(&dir, 2), 0), store).await.unwrap();
    assert_eq!((report.members, report.parts), (4050, 3));
    assert_eq!(store.versions(segment).await.unwrap()[&2].members, 4050);
    assert_eq!(store.versions(segment).await.unwrap()[&2].definition_hash.as_deref(), Some("feedc0de"));
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1), "ingest never flips the alias");
    assert_eq!(served(store, segment, &users(0..4100)).await, users(0..100).into_iter().collect());

    // A retried Job loads the same sets: nothing changes.
    let again = ingest::run(&task(segment, 2, &local_uri(&dir, 2), 0), store).await.unwrap();
    assert_eq!(again.members, 4050);
    assert_eq!(store.change_count(segment, 1, 2).await.unwrap(), 50 + 4000);
}

/// Ingest counts how the version differs from the one active at launch by
/// merging the two index files, and records it with the version: the same
/// count as the store's set arithmetic, without it. Without the earlier
/// version's files, nothing is recorded and the store counts.
async fn the_change_from_the_active_version_is_counted_from_the_index_files<S: SegmentStore + MembershipReader>(
    store: &S,
    segment: &SegmentKey,
) {
    let dir = tempfile::tempdir().unwrap();
    serve_v1(store, segment, &dir, users(0..100)).await;
    write_result(&local_uri(&dir, 2), segment, 2, &[users(50..2050), users(2050..4050)]).await;
    let compare_with = |version: u64| Some(VersionFiles { version, results_uri: local_uri(&dir, version) });
    let counted = IngestTask { compare_with: compare_with(1), ..task(segment, 2, &local_uri(&dir, 2), 0) };
    ingest::run(&counted, store).await.unwrap();
    let change = store.versions(segment).await.unwrap()[&2].change;
    assert_eq!(change, Some(CountedChange { from: 1, changed: 50 + 3950 }));
    assert_eq!(store.change_count(segment, 1, 2).await.unwrap(), 50 + 3950, "the store agrees");

    let missing = IngestTask { compare_with: compare_with(9), ..task(segment, 2, &local_uri(&dir, 2), 0) };
    ingest::run(&missing, store).await.unwrap();
    assert_eq!(store.versions(segment).await.unwrap()[&2].change, None);
}

async fn a_corrupted_part_fails_the_run_and_leaves_the_active_version<S: SegmentStore + MembershipReader>(
    store: &S,
    segment: &SegmentKey,
) {
    let dir = tempfile::tempdir().unwrap();
    serve_v1(store, segment, &dir, users(0..10)).await;

    write_result(&local_uri(&dir, 2), segment, 2, &[users(100..200), users(200..300)]).await;
    let part = dir.path().join("v2/part-00001.txt");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&part, bytes).unwrap();

    let error = ingest::run(&task(segment, 2, &local_uri(&dir, 2), 0), store).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("part-00001.txt") && error.message.contains("checksum"), "{error}");
    assert!(!store.versions(segment).await.unwrap().contains_key(&2), "nothing is sealed");
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1));
    assert_eq!(served(store, segment, &users(0..300)).await, users(0..10).into_iter().collect());

    // The Segment tolerates one bad part: the rest loads.
    let report = ingest::run(&task(segment, 2, &local_uri(&dir, 2), 1), store).await.unwrap();
    assert_eq!(report.failed_parts.len(), 1);
    assert_eq!(store.versions(segment).await.unwrap()[&2].members, 100);
    assert_eq!(store.active_version(segment).await.unwrap(), Some(1));

    // A damaged index file fails the whole run, whatever the tolerance.
    write_result(&local_uri(&dir, 3), segment, 3, &[users(300..400)]).await;
    let index = dir.path().join(format!("v3/{INDEX_FILE}"));
    let mut bytes = std::fs::read(&index).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&index, bytes).unwrap();
    let error = ingest::run(&task(segment, 3, &local_uri(&dir, 3), 5), store).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains(INDEX_FILE) && error.message.contains("checksum"), "{error}");
    assert!(!store.versions(segment).await.unwrap().contains_key(&3), "nothing is sealed");
}

async fn missing_or_foreign_results_are_refused<S: SegmentStore>(store: &S, segment: &SegmentKey) {
    let dir = tempfile::tempdir().unwrap();
    let error = ingest::run(&task(segment, 5, &local_uri(&dir, 5), 0), store).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::NoResult);
    write_result(&local_uri(&dir, 6), segment, 7, &[users(0..3)]).await;
    let error = ingest::run(&task(segment, 6, &local_uri(&dir, 6), 0), store).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("v7"), "{error}");
    assert!(store.versions(segment).await.unwrap().is_empty());
}

async fn overrides_newer_than_the_snapshot_survive_the_rollover<S: SegmentStore + MembershipReader>(
    store: &S,
    segment: &SegmentKey,
) {
    let dir = tempfile::tempdir().unwrap();
    serve_v1(store, segment, &dir, users(0..10)).await;
    let at = |minutes: i64| snapshot() + Duration::minutes(minutes);
    let ov = |user: &str, op, ts, id: &str| Override { user: user.into(), op, ts, id: id.into(), offset: None };
    // Before the snapshot: the lake already reflects it, so it is not re-applied.
    store.record_override(segment, &ov("user-000001", OverrideOp::Exclude, at(-5), "a")).await.unwrap();
    // After the snapshot: the new version must keep them.
    store.record_override(segment, &ov("user-000002", OverrideOp::Exclude, at(5), "b")).await.unwrap();
    store.record_override(segment, &ov("vip-7", OverrideOp::Include, at(6), "c")).await.unwrap();

    write_result(&local_uri(&dir, 2), segment, 2, &[users(0..10)]).await;
    let report = ingest::run(&task(segment, 2, &local_uri(&dir, 2), 0), store).await.unwrap();
    assert_eq!(report.overrides_applied, 2);
    store.activate(segment, 2).await.unwrap();
    let mut candidates = users(0..10);
    candidates.push("vip-7".into());
    let now_served = served(store, segment, &candidates).await;
    assert!(now_served.contains("user-000001"), "an override older than the snapshot is not re-applied");
    assert!(!now_served.contains("user-000002"), "the exclude survives the rollover");
    assert!(now_served.contains("vip-7"), "the include survives the rollover");
    assert_eq!(store.versions(segment).await.unwrap()[&2].members, 10, "10 - 1 excluded + 1 included");
}

#[tokio::test]
async fn embedded_store() {
    let store = MemoryStore::new();
    loads_every_part_invisibly(&store, &SegmentKey::new("t", "loads")).await;
    a_corrupted_part_fails_the_run_and_leaves_the_active_version(&store, &SegmentKey::new("t", "corrupt")).await;
    the_change_from_the_active_version_is_counted_from_the_index_files(&store, &SegmentKey::new("t", "counted")).await;
    missing_or_foreign_results_are_refused(&store, &SegmentKey::new("t", "missing")).await;
    overrides_newer_than_the_snapshot_survive_the_rollover(&store, &SegmentKey::new("t", "overrides")).await;
}

#[tokio::test]
async fn redis_store() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    loads_every_part_invisibly(&store, &SegmentKey::new("t", "loads")).await;
    a_corrupted_part_fails_the_run_and_leaves_the_active_version(&store, &SegmentKey::new("t", "corrupt")).await;
    the_change_from_the_active_version_is_counted_from_the_index_files(&store, &SegmentKey::new("t", "counted")).await;
    missing_or_foreign_results_are_refused(&store, &SegmentKey::new("t", "missing")).await;
    overrides_newer_than_the_snapshot_survive_the_rollover(&store, &SegmentKey::new("t", "overrides")).await;
}

#[tokio::test]
async fn results_on_a_real_s3_server() {
    segment_tests::shared_s3().create_bucket("results");
    let store = MemoryStore::new();
    let segment = SegmentKey::new("t", "s3");
    let uri = "s3://results/t/s3/v1/";
    write_result(uri, &segment, 1, &[users(0..500), users(500..700)]).await;
    let report = ingest::run(&task(&segment, 1, uri, 0), &store).await.unwrap();
    assert_eq!(report.members, 700);
    assert_eq!(store.versions(&segment).await.unwrap()[&1].members, 700);
}
