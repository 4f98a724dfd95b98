//! The `segment-worker` binary as a Job runs it: the task in
//! `TASK`, a one-line `Reason: message` in the termination log when
//! it fails, the report on stdout when it succeeds.

use segment_core::reasons::FailureReason;
use segment_core::task::Failure;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

const WORKER: &str = env!("CARGO_BIN_EXE_segment-worker");

fn generate_lake(dir: &Path) -> Value {
    let out = Command::new(WORKER)
        .args(["generate-lake", "--users", "400", "--seed", "5", "--now", "2025-06-01T00:00:00Z", "--out"])
        .arg(dir.join("lake"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn compute(cwd: &Path, task: &Value, termination_log: &Path) -> Output {
    compute_with(cwd, task, termination_log, "256")
}

fn compute_with(cwd: &Path, task: &Value, termination_log: &Path, memory_mb: &str) -> Output {
    Command::new(WORKER)
        .arg("compute")
        .current_dir(cwd)
        .env("TASK", task.to_string())
        .env("TERMINATION_LOG", termination_log)
        .env("COMPUTE_MEMORY_MB", memory_mb)
        .output()
        .unwrap()
}

/// A task as the operator writes it, with the example's relative sources.
fn task(sql: &str, results: &str) -> Value {
    json!({
        "segment": {"namespace": "growth", "name": "lapsed"},
        "version": 4,
        "generation": 2,
        "definitionHash": "sha256:abc",
        "snapshotTime": "2025-06-01T00:00:00Z",
        "definition": {"sql": sql},
        "sources": [
            {"table": "orders", "uri": "file://./lake/orders/", "format": "parquet", "timestampColumn": "created_at"},
            {"table": "users", "uri": "file://./lake/users/", "format": "csv"}
        ],
        "resultsUri": results,
    })
}

#[test]
fn a_failing_compute_writes_its_reason_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    generate_lake(dir.path());
    let log = dir.path().join("termination-log");
    let out = compute(dir.path(), &task("SELECT user_id FROM refunds", "file://./results/v4/"), &log);
    assert!(!out.status.success());
    let written = std::fs::read_to_string(&log).unwrap();
    assert_eq!(written.lines().count(), 1, "{written}");
    assert!(written.starts_with("UnknownTable: table `refunds`"), "{written}");
    let failure = Failure::from_termination_message(&written).unwrap();
    assert_eq!(failure.reason, FailureReason::UnknownTable);
    assert!(!failure.is_transient());

    let out = Command::new(WORKER).arg("compute").env("TASK", "{not json").env("TERMINATION_LOG", &log).output().unwrap();
    assert!(!out.status.success());
    assert!(std::fs::read_to_string(&log).unwrap().starts_with("BadTask: --task (TASK)"));

    // A setting that is not a number is a bad task too, naming the flag.
    let out = compute_with(dir.path(), &task("SELECT user_id FROM orders", "file://./results/v4/"), &log, "0");
    assert!(!out.status.success());
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(written.starts_with("BadTask: ") && written.contains("--compute-memory-mb"), "{written}");
    assert!(!Failure::from_termination_message(&written).unwrap().is_transient(), "a retry cannot fix it");
}

#[test]
fn a_compute_job_reads_relative_sources_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate_lake(dir.path());
    assert_eq!(summary["users"], 400);
    let log = dir.path().join("termination-log");
    let sql = "SELECT user_id FROM orders WHERE created_at >= now() - INTERVAL '90 days' \
               GROUP BY user_id HAVING count(*) >= 3 AND max(created_at) < now() - INTERVAL '30 days'";
    let out = compute(dir.path(), &task(sql, "file://./results/v4/"), &log);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["version"], 4);
    assert!(report["members"].as_u64().unwrap() > 0, "{report}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.path().join("results/v4/_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["members"], report["members"]);
    assert!(!log.exists());
}

/// `realtime` needs the results base its change events are read from, and
/// refuses one that names no store before connecting to anything.
#[test]
fn the_realtime_worker_refuses_a_results_uri_that_names_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let realtime = |results_uri: Option<&str>| {
        let mut command = Command::new(WORKER);
        // A refused command line writes a termination log, as a Job's would.
        command.env("TERMINATION_LOG", dir.path().join("termination-log"));
        command.args(["realtime", "--redis-url", "redis://127.0.0.1:1/", "--kafka-brokers", "127.0.0.1:1"]);
        command.args(["--metrics-addr", "127.0.0.1:0"]).env_remove("RESULTS_URI");
        if let Some(uri) = results_uri {
            command.args(["--results-uri", uri]);
        }
        command.output().unwrap()
    };
    let out = realtime(None);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--results-uri"), "{}", String::from_utf8_lossy(&out.stderr));

    for uri in ["ftp://results/base", "s3:///no-bucket"] {
        let out = realtime(Some(uri));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{uri}: {stderr}");
        assert!(stderr.contains("--results-uri") && stderr.contains(uri), "{uri}: {stderr}");
    }
}

/// The Spark driver is in the binary: the file the images install and a
/// SparkApplication runs is what `spark-driver` prints.
#[test]
fn spark_driver_prints_the_embedded_driver() {
    let out = Command::new(WORKER).arg("spark-driver").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("spark/segment_spark.py")).unwrap();
    assert!(
        out.stdout == file,
        "spark-driver printed {} bytes, workers/spark/segment_spark.py has {}",
        out.stdout.len(),
        file.len()
    );
}
