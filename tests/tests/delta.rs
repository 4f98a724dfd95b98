//! `format: delta` sources: Delta Lake tables written by a real writer
//! (deltalake, delta-rs's Python package, via `tests/delta_table.py`)
//! and read by the compute worker from their transaction log as of the
//! run's snapshot time. Every expected set of members comes from
//! deltalake's own reader (`DeltaTable(path, version=N)` and its timestamp
//! time travel), not from this project's code.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use segment_compute::compute;
use segment_core::api::{ComputeClassSpec, Definition, SegmentKey, SegmentSourceSpec, SegmentSpec, SourceFormat};
use segment_core::policy::{check_allowed, Tenant};
use segment_core::reasons::{FailureReason, SpecProblem};
use segment_core::task::ComputeTask;
use segment_store::results::ResultDir;
use segment_tests::table_history::{between, ingested_and_sealed, members_of, run_helper, Commit, TABLE_SEGMENT_SQL};
use serde_json::{json, Value};

/// The segment the helper's `members` evaluates (`country` is the
/// table's partition column).
const SQL: &str = TABLE_SEGMENT_SQL;

/// Runs the helper; its one line of JSON.
fn helper(args: &[&str]) -> Value {
    run_helper("delta_table.py", args)
}

fn versions(printed: &Value) -> Vec<Commit> {
    printed["versions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            assert_eq!(v["version"].as_u64(), Some(i as u64));
            Commit {
                id: i as u64,
                committed: DateTime::from_timestamp_nanos(v["mtimeNanos"].as_i64().unwrap()),
                members: members_of(&v["members"]),
            }
        })
        .collect()
}

fn delta_source(table_root: &Path) -> SegmentSourceSpec {
    SegmentSourceSpec {
        table: "orders".into(),
        uri: format!("file://{}/", table_root.display()),
        format: SourceFormat::Delta,
        user_id_column: "user_id".into(),
        timestamp_column: None,
    }
}

fn task(name: &str, source: SegmentSourceSpec, results: &Path, snapshot: DateTime<Utc>) -> ComputeTask {
    ComputeTask {
        segment: SegmentKey::new("growth", name),
        version: 1,
        generation: 1,
        definition_hash: format!("sha256:{name}"),
        snapshot_time: snapshot,
        definition: Definition { sql: Some(SQL.into()), rules: None, static_list: None },
        sources: vec![source],
        segment_inputs: Vec::new(),
        results_uri: format!("file://{}/{name}/", results.display()),
        engine: Default::default(),
        iceberg: None,
    }
}

/// Computes `task`; its members and the Delta version its manifest
/// records for `orders`.
async fn compute_members(task: &ComputeTask) -> (BTreeSet<String>, u64) {
    let report = compute::run(task).await.unwrap_or_else(|e| panic!("{}: {e}", task.segment));
    let dir = ResultDir::open(&task.results_uri).unwrap();
    let manifest = dir.read_manifest().await.unwrap().expect("a manifest");
    let mut ids = BTreeSet::new();
    for part in &manifest.parts {
        let bytes = dir.read_part(part).await.unwrap();
        ids.extend(part.decode(&bytes).unwrap().into_iter().map(str::to_string));
    }
    assert_eq!(report.members as usize, ids.len());
    let [read] = manifest.sources.as_slice() else { panic!("one source in {:?}", manifest.sources) };
    assert_eq!((read.table.as_str(), read.format), ("orders", SourceFormat::Delta));
    (ids, read.version.expect("a Delta source's version"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_table_is_read_as_of_the_snapshot_time() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("orders");
    let results = dir.path().join("results");
    let root = table.to_str().unwrap().to_string();
    // Version 0 an append, 1 a delete (then a checkpoint), 2 an overwrite.
    let written = versions(&helper(&["write", &root]));
    assert_eq!(written.len(), 3);
    assert_ne!(written[0].members, written[1].members);
    assert_ne!(written[1].members, written[2].members);

    let mut first_reads = Vec::new();
    for (v, version) in written.iter().enumerate() {
        let snapshot = between(&written, v);
        // deltalake's own timestamp time travel agrees on the version.
        let theirs = helper(&["at", &root, &snapshot.to_rfc3339()]);
        assert_eq!(theirs["version"].as_u64(), Some(v as u64), "deltalake as of {snapshot}");
        assert_eq!(members_of(&theirs["members"]), version.members);

        let (members, read) = compute_members(&task(&format!("v{v}"), delta_source(&table), &results, snapshot)).await;
        assert_eq!(read, v as u64, "the version read as of {snapshot}");
        assert_eq!(members, version.members, "the members of version {v}");
        first_reads.push((snapshot, members));
    }

    // More commits later: the same snapshot times give the same members.
    let later = versions(&helper(&["more", &root]));
    assert_eq!(later.len(), 4);
    for (v, (snapshot, members)) in first_reads.iter().enumerate() {
        let (again, read) = compute_members(&task(&format!("again-v{v}"), delta_source(&table), &results, *snapshot)).await;
        assert_eq!((read, &again), (v as u64, members), "recomputed as of {snapshot}");
    }
    let (newest, read) = compute_members(&task("v3", delta_source(&table), &results, between(&later, 3))).await;
    assert_eq!((read, &newest), (3, &later[3].members));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_before_the_oldest_readable_commit_fails_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("orders");
    let results = dir.path().join("results");
    let written = versions(&helper(&["write", table.to_str().unwrap()]));

    let before = written[0].committed - Duration::hours(1);
    let error = compute::run(&task("before", delta_source(&table), &results, before)).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory, "{error}");
    assert!(!error.reason.is_transient());
    assert!(error.message.contains("table `orders`"), "{error}");
    assert!(error.message.contains("before the oldest version that can be read, 0"), "{error}");
    assert!(!dir.path().join("results/before/_manifest.json").exists());

    // History expired: the first commit is gone, the checkpoint at version
    // 1 stands in for it. Version 0 can no longer be read; 1 can.
    std::fs::remove_file(table.join("_delta_log/00000000000000000000.json")).unwrap();
    let error = compute::run(&task("expired", delta_source(&table), &results, between(&written, 0))).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory, "{error}");
    assert!(error.message.contains("versions before 1 were removed"), "{error}");
    let (members, read) = compute_members(&task("from-checkpoint", delta_source(&table), &results, between(&written, 1))).await;
    assert_eq!((read, members), (1, written[1].members.clone()));
}

#[tokio::test]
async fn a_glob_or_a_plain_directory_is_not_a_delta_table() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let mut glob = delta_source(dir.path());
    glob.uri = format!("file://{}/*.parquet", dir.path().display());
    let error = compute::run(&task("glob", glob, &results, Utc::now())).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::UnsupportedSource, "{error}");
    assert!(error.message.contains("spec.uri") && error.message.contains("not a glob"), "{error}");

    std::fs::create_dir_all(dir.path().join("plain")).unwrap();
    std::fs::write(dir.path().join("plain/part-0.parquet"), b"PAR1").unwrap();
    let error =
        compute::run(&task("plain", delta_source(&dir.path().join("plain")), &results, Utc::now())).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("not a Delta table"), "{error}");
}

/// The location checks apply to a Delta table's root as to any source:
/// the operator refuses it before launching anything.
#[test]
fn a_delta_table_root_outside_the_allowed_prefixes_is_refused() {
    let spec: SegmentSpec = serde_json::from_value(json!({"definition": {"sql": SQL}})).unwrap();
    let class: ComputeClassSpec = serde_json::from_value(json!({"allowedSourcePrefixes": ["s3://lake/{namespace}/"]})).unwrap();
    let tenant = Tenant { namespace: "growth", results_base: "s3://results" };
    let source = |uri: &str| SegmentSourceSpec { uri: uri.into(), ..delta_source(Path::new("/unused")) };

    assert_eq!(check_allowed(&spec, &[&source("s3://lake/growth/orders")], &class, tenant), Ok(()));
    for uri in ["s3://lake/finance/orders", "s3://results/finance/orders/", "s3://lake/growth/../finance/orders"] {
        let error = check_allowed(&spec, &[&source(uri)], &class, tenant).unwrap_err();
        assert_eq!(error.reason, SpecProblem::NotAllowed, "{uri}: {error}");
        assert_eq!(error.field, "SegmentSource of table `orders`: spec.uri", "{uri}");
    }
}

/// The example lake's `users-delta` table, written by the lake generator,
/// is a Delta table deltalake reads: the same users, columns and values as
/// the generator's rows.
#[test]
fn the_example_lakes_delta_table_is_read_by_deltalake() {
    let lake = tempfile::tempdir().unwrap();
    let spec = segment_compute::lakegen::LakeSpec::new(300, 7);
    segment_compute::lakegen::generate(lake.path(), &spec).unwrap();
    let read = helper(&["read", lake.path().join("users-delta").to_str().unwrap()]);
    assert_eq!(read["version"], 0);
    // Committed at the lake's `now` (an in-commit timestamp), whatever the
    // file times: deltalake's time travel to that moment finds version 0.
    let at_now = helper(&["at", lake.path().join("users-delta").to_str().unwrap(), &spec.now.to_rfc3339()]);
    assert_eq!(at_now["version"], 0, "{at_now}");
    assert_eq!(read["columns"], serde_json::json!(["user_id", "country", "signup_at", "plan"]));
    let got: BTreeSet<(String, String, String)> = read["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["user_id"].as_str().unwrap().into(), r["country"].as_str().unwrap().into(), r["plan"].as_str().unwrap().into())
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = segment_compute::lakegen::rows(&spec)
        .map(|r| (r.user.user_id.clone(), r.user.country.to_string(), r.user.plan.to_string()))
        .collect();
    assert_eq!(got.len(), 300);
    assert_eq!(got, want);
}

/// Ingest records in its verdict the table version its compute read (from
/// the manifest); the operator seals the version with it and copies it
/// into the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_records_the_table_version_read_with_the_version() {
    use segment_core::manifest::SourceRead;
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("orders");
    let results = dir.path().join("results");
    let written = versions(&helper(&["write", table.to_str().unwrap()]));
    let snapshot = between(&written, 1);
    let compute_task = task("ingested", delta_source(&table), &results, snapshot);
    let (members, read) = compute_members(&compute_task).await;
    assert_eq!(read, 1);

    let stored = ingested_and_sealed(&compute_task).await;
    assert_eq!(stored.members, members.len() as u64);
    assert_eq!(stored.table_versions, vec![SourceRead { table: "orders".into(), format: SourceFormat::Delta, version: Some(1) }]);
}
