//! `segment-worker ingest` as a Job runs it: with the task only, no
//! `REDIS_URL` and no store flag. It writes its verdict (`_seal.json`) next
//! to the result, prints its report, and on failure writes the reason to
//! the termination log.

use std::process::Command;

use chrono::{TimeZone, Utc};
use segment_core::api::SegmentKey;
use segment_core::reasons::FailureReason;
use segment_core::seal::{SealFile, SEAL_FILE};
use segment_core::task::{Failure, IngestTask};
use serde_json::Value;

const WORKER: &str = env!("CARGO_BIN_EXE_segment-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_runs_without_store_credentials_and_writes_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let segment = SegmentKey::new("growth", "lapsed");
    let snapshot = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
    let uri = format!("file://{}/v4/", dir.path().display());
    let members: Vec<String> = (0..250).map(|i| format!("u{i:05}")).collect();
    segment_tests::write_result(&uri, &segment, 4, snapshot, &[members]).await;
    let task = IngestTask {
        segment: segment.clone(),
        version: 4,
        snapshot_time: snapshot,
        results_uri: uri.clone(),
        max_failed_parts: 0,
        compare_with: None,
        overrides_from: None,
    };
    let log = dir.path().join("termination-log");
    let ingest = |task: &IngestTask| {
        Command::new(WORKER)
            .arg("ingest")
            .env("TASK", serde_json::to_string(task).unwrap())
            .env("TERMINATION_LOG", &log)
            .env_remove("REDIS_URL")
            .output()
            .unwrap()
    };

    let out = ingest(&task);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["version"].as_u64(), report["members"].as_u64()), (Some(4), Some(250)), "{report}");
    let verdict: SealFile = serde_json::from_slice(&std::fs::read(dir.path().join("v4").join(SEAL_FILE)).unwrap()).unwrap();
    assert_eq!((verdict.segment, verdict.version, verdict.seal.members), (segment, 4, 250));
    assert!(!log.exists());

    let nothing = IngestTask { version: 5, results_uri: format!("file://{}/v5/", dir.path().display()), ..task };
    let out = ingest(&nothing);
    assert!(!out.status.success());
    let failure = Failure::from_termination_message(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(failure.reason, FailureReason::NoResult);
    assert!(!dir.path().join("v5").join(SEAL_FILE).exists());
}
