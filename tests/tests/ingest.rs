//! `segment-worker ingest` against real result files (local and on a real
//! S3 server): it verifies them, writes its verdict (`_seal.json`) next to
//! them and touches no store.

use chrono::{DateTime, Duration, TimeZone, Utc};
use segment_compute::ingest;
use segment_core::api::{RunPhase, RunStatus, RunTrigger, SegmentKey};
use segment_core::index::INDEX_FILE;
use segment_core::manifest::Manifest;
use segment_core::reasons::FailureReason;
use segment_core::seal::{judge, SealFile, Verdict, SEAL_FILE, SEAL_FORMAT};
use segment_core::store::{CountedChange, ResultStore};
use segment_core::task::{IngestTask, VersionFiles};
use segment_store::results::ObjectResults;
use segment_tests::as_before_index_files;

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

/// The verdict ingest wrote under `dir`'s `v<version>/`, if any.
fn verdict_in(dir: &tempfile::TempDir, version: u64) -> Option<SealFile> {
    let bytes = std::fs::read(dir.path().join(format!("v{version}/{SEAL_FILE}"))).ok()?;
    Some(serde_json::from_slice(&bytes).expect("a seal file"))
}

/// The run in flight the operator judges a verdict against.
fn run(version: u64) -> RunStatus {
    RunStatus {
        version,
        phase: RunPhase::Ingesting,
        job: None,
        snapshot_time: snapshot(),
        started_at: snapshot(),
        trigger: RunTrigger::Schedule,
        definition_hash: "feedc0de".into(),
        generation: 1,
        computed_at: None,
        ingested_at: None,
        reason: None,
        message: None,
    }
}

/// Every file is checked and the verdict, the seal the operator records
/// the version with, is written next to the manifest: the index file's
/// count, the manifest's definition hash, the run's snapshot time and the
/// time realtime overrides count from. A retried Job writes the same.
#[tokio::test]
async fn verifies_the_result_and_writes_its_verdict_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let segment = SegmentKey::new("t", "verdict");
    write_result(&local_uri(&dir, 2), &segment, 2, &[users(50..2050), users(2050..4050), users(4050..4100)]).await;
    let lagged =
        IngestTask { overrides_from: Some(snapshot() - Duration::hours(1)), ..task(&segment, 2, &local_uri(&dir, 2), 0) };
    let report = ingest::verify(&lagged).await.unwrap();
    assert_eq!((report.members, report.parts, report.failed_parts.len(), report.change), (4050, 3, 0, None));

    let verdict = verdict_in(&dir, 2).expect("the verdict is written");
    assert_eq!((verdict.format.as_str(), &verdict.segment, verdict.version), (SEAL_FORMAT, &segment, 2));
    let seal = &verdict.seal;
    assert_eq!(seal.members, 4050);
    assert_eq!(seal.definition_hash.as_deref(), Some("feedc0de"));
    assert_eq!((seal.snapshot_time, seal.overrides_from), (Some(snapshot()), Some(snapshot() - Duration::hours(1))));
    assert_eq!(judge(Some(&verdict.to_bytes()), &segment, &run(2)), Verdict::Sealable(seal.clone()), "the operator seals it");

    // A retried Job writes the same verdict.
    ingest::verify(&lagged).await.unwrap();
    assert_eq!(verdict_in(&dir, 2), Some(verdict));
    // Without a lag grace, overrides count from the snapshot.
    ingest::verify(&task(&segment, 2, &local_uri(&dir, 2), 0)).await.unwrap();
    assert_eq!(verdict_in(&dir, 2).unwrap().seal.overrides_from, Some(snapshot()));
}

/// Ingest counts how the version differs from the one active at launch by
/// merging the two index files, and records it in its verdict. Without the
/// earlier version's files, nothing is counted (the rollover guard then
/// holds the version for approval, if it has a change limit).
#[tokio::test]
async fn the_change_from_the_active_version_is_counted_from_the_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let segment = SegmentKey::new("t", "counted");
    write_result(&local_uri(&dir, 1), &segment, 1, &[users(0..100)]).await;
    write_result(&local_uri(&dir, 2), &segment, 2, &[users(50..2050), users(2050..4050)]).await;
    let compare_with = |version: u64| Some(VersionFiles { version, results_uri: local_uri(&dir, version) });
    let counted = IngestTask { compare_with: compare_with(1), ..task(&segment, 2, &local_uri(&dir, 2), 0) };
    let report = ingest::verify(&counted).await.unwrap();
    let change = Some(CountedChange { from: 1, changed: 50 + 3950 });
    assert_eq!(report.change, change);
    assert_eq!(verdict_in(&dir, 2).unwrap().seal.change, change);

    // The active version was written before index files (its manifest
    // lists none, its parts out of order): counted from its parts.
    write_result(&local_uri(&dir, 3), &segment, 3, &[users(50..100), users(0..50)]).await;
    as_before_index_files(&local_uri(&dir, 3)).await;
    let from_parts = IngestTask { compare_with: compare_with(3), ..task(&segment, 2, &local_uri(&dir, 2), 0) };
    assert_eq!(ingest::verify(&from_parts).await.unwrap().change, Some(CountedChange { from: 3, changed: 50 + 3950 }));

    let missing = IngestTask { compare_with: compare_with(9), ..task(&segment, 2, &local_uri(&dir, 2), 0) };
    ingest::verify(&missing).await.unwrap();
    assert_eq!(verdict_in(&dir, 2).unwrap().seal.change, None);

    // Its parts damaged: nothing counted.
    let part = dir.path().join("v3/part-00000.txt");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&part, bytes).unwrap();
    assert_eq!(ingest::verify(&from_parts).await.unwrap().change, None);
}

/// A damaged part fails the run (no verdict is written) unless
/// `maxFailedParts` tolerates it: parts are what other segments' rules and
/// previews read, not what is served. The index file, which is served, has
/// no tolerance: damaged, or missing (a result written before index
/// files), it fails the run.
#[tokio::test]
async fn a_damaged_part_fails_the_run_unless_tolerated_and_a_damaged_or_missing_index_always_does() {
    let dir = tempfile::tempdir().unwrap();
    let segment = SegmentKey::new("t", "corrupt");
    write_result(&local_uri(&dir, 2), &segment, 2, &[users(100..200), users(200..300)]).await;
    let part = dir.path().join("v2/part-00001.txt");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&part, bytes).unwrap();

    let error = ingest::verify(&task(&segment, 2, &local_uri(&dir, 2), 0)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("part-00001.txt") && error.message.contains("checksum"), "{error}");
    assert_eq!(verdict_in(&dir, 2), None, "no verdict");

    // The Segment tolerates one bad part: the version is whole in its index.
    let report = ingest::verify(&task(&segment, 2, &local_uri(&dir, 2), 1)).await.unwrap();
    assert_eq!(report.failed_parts.len(), 1, "{report:?}");
    assert_eq!(verdict_in(&dir, 2).unwrap().seal.members, 200, "the index's count");

    // A damaged index file fails the whole run, whatever the tolerance.
    write_result(&local_uri(&dir, 3), &segment, 3, &[users(300..400)]).await;
    let index = dir.path().join(format!("v3/{INDEX_FILE}"));
    let mut bytes = std::fs::read(&index).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&index, bytes).unwrap();
    let error = ingest::verify(&task(&segment, 3, &local_uri(&dir, 3), 5)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains(INDEX_FILE) && error.message.contains("checksum"), "{error}");
    assert_eq!(verdict_in(&dir, 3), None);

    // So does a result without one: compute writes one with every result
    // (only versions from before index files, already served, are read
    // from their parts instead).
    write_result(&local_uri(&dir, 4), &segment, 4, &[users(0..10)]).await;
    as_before_index_files(&local_uri(&dir, 4)).await;
    let error = ingest::verify(&task(&segment, 4, &local_uri(&dir, 4), 5)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("no index file"), "{error}");
    assert_eq!(verdict_in(&dir, 4), None);
}

/// No manifest, or one of another version or snapshot time than the
/// task's, fails the run and writes no verdict.
#[tokio::test]
async fn missing_or_foreign_results_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let segment = SegmentKey::new("t", "missing");
    let error = ingest::verify(&task(&segment, 5, &local_uri(&dir, 5), 0)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::NoResult);
    write_result(&local_uri(&dir, 6), &segment, 7, &[users(0..3)]).await;
    let error = ingest::verify(&task(&segment, 6, &local_uri(&dir, 6), 0)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("v7"), "{error}");
    write_result(&local_uri(&dir, 8), &segment, 8, &[users(0..3)]).await;
    let later = IngestTask { snapshot_time: snapshot() + Duration::hours(1), ..task(&segment, 8, &local_uri(&dir, 8), 0) };
    let error = ingest::verify(&later).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::CorruptResult);
    assert!(error.message.contains("snapshot time"), "{error}");
    assert!([6, 8].iter().all(|v| verdict_in(&dir, *v).is_none()));
}

/// On S3: ingest reads the result and writes its verdict there, and the
/// operator's results reader finds it and judges it sealable.
#[tokio::test]
async fn results_on_a_real_s3_server() {
    segment_tests::shared_s3().create_bucket("results");
    let segment = SegmentKey::new("t", "s3");
    let uri = "s3://results/t/s3/v1/";
    write_result(uri, &segment, 1, &[users(0..500), users(500..700)]).await;
    let report = ingest::verify(&task(&segment, 1, uri, 0)).await.unwrap();
    assert_eq!(report.members, 700);

    let results = ObjectResults::new("s3://results");
    let bytes = results.seal_file(&segment, 1).await.unwrap().expect("the verdict is on S3");
    match judge(Some(&bytes), &segment, &run(1)) {
        Verdict::Sealable(seal) => assert_eq!(seal.members, 700),
        other => panic!("{other:?}"),
    }
    assert_eq!(results.seal_file(&segment, 2).await.unwrap(), None, "no verdict on a version never ingested");
}
