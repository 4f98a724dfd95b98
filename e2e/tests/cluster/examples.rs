//! The bundled examples end to end on the real control plane: the operator
//! runs as a process with the chart's RBAC, its compute and ingest Jobs run
//! through the real Job controller on the node agent with the workspace's
//! `segment-worker`, every Segment becomes Ready with the members an
//! independent evaluation gives, kstatus says Current, and Events are
//! listed by `kubectl get events`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use segment_compute::lakegen;
use segment_operator::standalone::example_lake_spec;
use segment_tests::cluster::run_with_stdin;
use segment_tests::examples::{expected_members, SEGMENTS};
use serde_json::Value;

use crate::{cluster, is_true, Operator, Serving, Tenant};

/// The example lake, generated once per test binary.
pub fn example_lake() -> PathBuf {
    static LAKE: OnceLock<tempfile::TempDir> = OnceLock::new();
    LAKE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        lakegen::generate(dir.path(), &example_lake_spec()).expect("the example lake");
        dir
    })
    .path()
    .to_path_buf()
}

/// Uploads every file under `dir` to `bucket` on the shared S3 server,
/// at the same relative paths under `prefix`.
pub fn upload_dir(dir: &Path, bucket: &str, prefix: &str) {
    use object_store::{ObjectStoreExt, PutPayload};
    crate::s3();
    let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().expect("an S3 client");
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("a lake directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        for file in files {
            let key = format!("{prefix}{}", file.strip_prefix(dir).unwrap().to_str().expect("a UTF-8 path"));
            let body = std::fs::read(&file).expect("a lake file");
            store.put(&key.as_str().into(), PutPayload::from(body)).await.expect("an upload");
        }
    });
}

/// The active version's snapshot time from a Segment's status.
fn active_snapshot(segment: &Value) -> Option<DateTime<Utc>> {
    let active = segment["status"]["activeVersion"].as_u64()?;
    let version = segment["status"]["versions"].as_array()?.iter().find(|v| v["version"].as_u64() == Some(active))?;
    DateTime::parse_from_rfc3339(version["snapshotTime"].as_str()?).ok().map(|t| t.with_timezone(&Utc))
}

/// Members of every example segment as the serving API answers, user by user.
pub fn served(serving: &Serving, namespace: &str, users: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = SEGMENTS.iter().map(|s| (s.to_string(), BTreeSet::new())).collect();
    for user in users {
        let (status, body) = serving.get(&format!("/v1/users/{user}/segments"));
        assert_eq!(status, 200, "{body}");
        for segment in body["segments"].as_array().into_iter().flatten().filter(|s| s["namespace"] == namespace) {
            out.entry(segment["name"].as_str().unwrap_or("").to_string()).or_default().insert(user.clone());
        }
    }
    out
}

#[test]
fn the_examples_run_through_real_jobs_and_are_served() {
    let cluster = cluster();
    let tenant = Tenant::new("examples");
    let (sources, segments) = crate::example_manifests(&tenant);
    tenant.apply(&sources);
    tenant.apply(&segments);
    let operator = Operator::start(&tenant, &[]);

    let mut snapshots = BTreeMap::new();
    for name in SEGMENTS {
        let segment = tenant.wait_for_segment(name, Duration::from_secs(300), |s| is_true(s, "Ready"));
        snapshots.insert(name, active_snapshot(&segment).expect("an active version with its snapshot time"));
        let finalizers = segment["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        assert!(finalizers.contains(&"segmentation.dev/cleanup".into()), "{name}: {finalizers:?}");
        if name == "southern-europe-buyers" {
            // It reads `users`, a Delta table on the S3 server: its status
            // says which table version (the generated table has one commit).
            let active = segment["status"]["activeVersion"].clone();
            let version = segment["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == active).unwrap();
            assert_eq!(version["tableVersions"], serde_json::json!([{"table": "users", "format": "delta", "version": 0}]));
        }
    }

    // Flux's and Argo's view of health: kstatus computes Current for each.
    let segments = tenant.kubectl(&["get", "segments", "-o", "json"]);
    let verdict = run_with_stdin(cluster.tool("kstatus").arg("-"), &segments.stdout);
    assert!(verdict.success(), "kstatus: {}{}", verdict.stdout, verdict.stderr);
    assert_eq!(verdict.stdout.lines().filter(|l| l.contains(" Current")).count(), SEGMENTS.len(), "{}", verdict.stdout);

    // The printer columns are filled from the status.
    let table = tenant.kubectl(&["get", "segments"]).stdout;
    for name in SEGMENTS {
        let row: Vec<&str> =
            table.lines().find(|l| l.starts_with(&format!("{name} "))).expect("a row").split_whitespace().collect();
        assert_eq!(row[1], "True", "{table}");
        assert!(row[2].parse::<u64>().is_ok() && row[3].parse::<u64>().is_ok(), "ACTIVE and MEMBERS are numbers: {table}");
    }

    // Events of the runs are on the Segments.
    let events = tenant.kubectl(&["get", "events", "-o", "json"]);
    let events: Value = serde_json::from_str(&events.stdout).expect("events as JSON");
    let on_segments: Vec<&Value> =
        events["items"].as_array().unwrap().iter().filter(|e| e["involvedObject"]["kind"] == "Segment").collect();
    for name in SEGMENTS {
        assert!(on_segments.iter().any(|e| e["involvedObject"]["name"] == name), "no Event on Segment {name}: {on_segments:#?}");
    }

    // The Jobs ran as pods on the node agent and completed.
    let jobs: Value = serde_json::from_str(&tenant.kubectl(&["get", "jobs", "-o", "json"]).stdout).unwrap();
    let complete = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|c| c["type"] == "Complete")))
        .count();
    assert!(complete >= SEGMENTS.len() * 2, "a compute and an ingest Job per segment completed: {jobs:#}");

    // Serving answers the members of an independent evaluation.
    let spec = example_lake_spec();
    let want = expected_members(&spec, |name| snapshots[name]);
    let serving = Serving::start(&tenant);
    let users: Vec<String> = (0..spec.users).map(lakegen::user_id).collect();
    cluster.wait_until("serving answers", Duration::from_secs(30), || serving.get("/readyz").0 == 200);
    let got = served(&serving, &tenant.namespace, &users);
    for name in SEGMENTS {
        assert_eq!(got[name], want[name], "{name}: served members differ from the independent evaluation");
        assert!(!want[name].is_empty(), "{name} has members");
    }
    drop(operator);
}

/// The worker's root filesystem is read-only (the node agent enforces the
/// pod's securityContext): a sort that outgrows the memory pool spills to
/// the scratch emptyDir the operator mounts at /tmp.
#[test]
fn a_compute_that_outgrows_its_memory_spills_to_the_scratch_volume() {
    let tenant = Tenant::new("spill");
    let spec = lakegen::LakeSpec { users: 30_000, events_per_user: 8, orders_per_user: 1, ..lakegen::LakeSpec::new(0, 99) };
    let lake = tempfile::tempdir().unwrap();
    lakegen::generate(lake.path(), &spec).unwrap();
    upload_dir(&lake.path().join("app_events"), &tenant.lake_bucket, "app_events/");
    tenant.apply(&format!(
        r#"{{"apiVersion": "segmentation.dev/v1alpha1", "kind": "SegmentSource", "metadata": {{"name": "app-events"}},
            "spec": {{"table": "app_events", "uri": "s3://{}/app_events/", "format": "ndjson", "timestampColumn": "ts"}}}}"#,
        tenant.lake_bucket
    ));
    // Nearly every event is its own id: about 240,000 ids of 40 bytes,
    // more than a 16 MiB pool holds while sorting. The worker's settings
    // are the admin's: the namespace's ComputeClass gives the small pool.
    let cluster = crate::cluster();
    let class = format!("{}-small-memory", tenant.namespace);
    let class_object = serde_json::json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "ComputeClass",
        "metadata": {"name": class}, "spec": {"env": [{"name": "COMPUTE_MEMORY_MB", "value": "16"}]}});
    let output = cluster.apply("default", &class_object.to_string());
    assert!(output.success(), "the ComputeClass: {}", output.stderr);
    cluster.kubectl_ok(&["label", "namespace", &tenant.namespace, &format!("segmentation.dev/compute-class={class}")]);
    tenant.apply(
        &serde_json::json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "events"},
            "spec": {"definition": {"sql": "SELECT e.user_id || '/' || e.event || '/' || e.ts FROM app_events e"}}})
        .to_string(),
    );
    let _operator = Operator::start(&tenant, &[]);
    let segment = tenant.wait_for_segment("events", Duration::from_secs(300), |s| {
        is_true(s, "Ready") || s["status"]["versions"].as_array().is_some_and(|v| v.iter().any(|v| v["state"] == "Failed"))
    });
    assert!(is_true(&segment, "Ready"), "{:#}", segment["status"]);
    let expected: BTreeSet<String> = lakegen::rows(&spec)
        .flat_map(|r| r.events.into_iter().map(|e| format!("{}/{}/{}", e.user_id, e.event, lakegen::timestamp_text(&e.ts))))
        .collect();
    assert_eq!(segment["status"]["members"].as_u64(), Some(expected.len() as u64));
    let logs = tenant.kubectl(&["logs", "job/events-v1-compute"]);
    let report: Value = logs.stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).expect("the worker's report");
    assert!(report["spilledBytes"].as_u64().is_some_and(|b| b > 0), "{report}");
    cluster.kubectl_ok(&["delete", "computeclass", &class]);
}
