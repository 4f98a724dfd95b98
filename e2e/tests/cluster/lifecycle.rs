//! A Segment's lifecycle on the real API server, through real Jobs: a run
//! requested by hand, `pinVersion` rollback, a held version approved, the
//! schedule, a definition change during a run, a Job deleted by hand, pods
//! that never start (an unknown image, more CPU than the node has), a
//! failed definition, deletion with `deletionPolicy` Delete and Retain,
//! and the former Redis layout's keys removed by the operator.
//!
//! Static lists and a small CSV table keep each run short; every test has
//! its own namespace, Redis, buckets and operator.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{cluster, condition, is_true, list_objects, put_object, Operator, Serving, Tenant};

pub const RUN: Duration = Duration::from_secs(180);

pub fn list(users: impl IntoIterator<Item = u32>) -> String {
    let mut csv = "user_id\n".to_string();
    for user in users {
        csv.push_str(&format!("u{user:07}\n"));
    }
    csv
}

/// A static-list Segment reading `lists/<name>.csv` of the tenant's lake.
pub fn static_segment(tenant: &Tenant, name: &str, extra_spec: Value) -> String {
    let mut spec = json!({"definition": {"static": {"uri": format!("s3://{}/lists/{name}.csv", tenant.lake_bucket)}}});
    for (key, value) in extra_spec.as_object().unwrap() {
        spec[key] = value.clone();
    }
    json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": name}, "spec": spec}).to_string()
}

/// CPU no node has: the real scheduler leaves such a pod Pending.
const UNSCHEDULABLE: &str = "1000";
/// CPU that fits next to the other tests' pods.
const FITS: &str = "10m";

/// `spec.compute` asking for `cpu` (and a little memory).
fn compute(cpu: &str) -> Value {
    json!({"compute": {"resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}})
}

pub fn active_version(segment: &Value) -> Option<u64> {
    segment["status"]["activeVersion"].as_u64()
}

fn version_state(segment: &Value, version: u64) -> Option<String> {
    let versions = segment["status"]["versions"].as_array()?;
    let found = versions.iter().find(|v| v["version"].as_u64() == Some(version))?;
    found["state"].as_str().map(str::to_string)
}

fn member(serving: &Serving, namespace: &str, segment: &str, user: u32) -> (bool, Option<u64>) {
    let (status, body) = serving.get(&format!("/v1/namespaces/{namespace}/segments/{segment}/members/u{user:07}"));
    assert_eq!(status, 200, "{body}");
    (body["member"] == true, body["version"].as_u64())
}

pub fn annotate(tenant: &Tenant, name: &str, annotation: &str) {
    let output = tenant.kubectl(&["annotate", "segment", name, annotation, "--overwrite"]);
    assert!(output.success(), "{}", output.stderr);
}

fn patch_spec(tenant: &Tenant, name: &str, spec: Value) {
    let patch = json!({"spec": spec}).to_string();
    let output = tenant.kubectl(&["patch", "segment", name, "--type=merge", "-p", &patch]);
    assert!(output.success(), "{}", output.stderr);
}

/// Job creations in the tenant's namespace the API server answered with a
/// code `code` accepts, from its audit log.
fn job_creates(tenant: &Tenant, code: impl Fn(u64) -> bool) -> usize {
    let in_namespace = |e: &Value| e["objectRef"]["namespace"] == tenant.namespace.as_str();
    tenant
        .cluster
        .audit_events()
        .into_iter()
        .filter(|e| e["verb"] == "create" && e["objectRef"]["resource"] == "jobs" && in_namespace(e))
        .filter(|e| e["responseStatus"]["code"].as_u64().is_some_and(&code))
        .count()
}

fn events_with_reason(tenant: &Tenant, reason: &str) -> Vec<Value> {
    let events: Value = serde_json::from_str(&tenant.kubectl(&["get", "events", "-o", "json"]).stdout).unwrap();
    events["items"].as_array().unwrap().iter().filter(|e| e["reason"] == reason).cloned().collect()
}

/// An upgrade from the former per-membership Redis layout: its member
/// sets and per-user hashes, left in the store, are removed by the
/// operator once it leads; today's keys stay.
#[test]
fn the_operator_removes_the_former_redis_layout_when_it_leads() {
    let tenant = Tenant::new("former-layout");
    let call = |args: &[&str]| segment_tests::redis_call(tenant.redis.port, args).expect("Redis answers");
    call(&["SADD", &format!("sg:{{{}/old}}:v1", tenant.namespace), "user-1", "user-2"]);
    call(&["HSET", "sg:u:user-1", &format!("{}/old", tenant.namespace), "1"]);
    call(&["HSET", "sg:aliases", "other/kept", "4"]);
    let former = || {
        let mut keys = call(&["KEYS", "sg:u:*"]).texts();
        keys.extend(call(&["KEYS", "sg:{*}:v*"]).texts());
        keys
    };
    assert_eq!(former().len(), 2);

    let _operator = Operator::start(&tenant, &[]);
    let start = std::time::Instant::now();
    while !former().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "still there after 60 s: {:?}", former());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(call(&["HGET", "sg:aliases", "other/kept"]).text().as_deref(), Some("4"), "today's keys stay");
}

#[test]
fn a_run_request_makes_a_new_version_and_pin_version_rolls_back() {
    let tenant = Tenant::new("rollback");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=5));
    tenant.apply(&static_segment(&tenant, "vip", json!({})));
    let _operator = Operator::start(&tenant, &[]);
    let serving = Serving::start(&tenant);

    let v1 = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    assert_eq!(v1["status"]["members"], 5);

    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(6..=8));
    annotate(&tenant, "vip", "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
    let v2 = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    assert_eq!(v2["status"]["members"], 3);
    assert_eq!(v2["status"]["handledRunRequest"], "2030-01-01T00:00:00Z");
    cluster()
        .wait_until("serving v2", Duration::from_secs(30), || member(&serving, &tenant.namespace, "vip", 6) == (true, Some(2)));
    assert_eq!(member(&serving, &tenant.namespace, "vip", 1), (false, Some(2)));

    patch_spec(&tenant, "vip", json!({"pinVersion": 1}));
    let pinned = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    assert_eq!(version_state(&pinned, 2).as_deref(), Some("Retained"));
    cluster().wait_until("serving v1 again", Duration::from_secs(30), || {
        member(&serving, &tenant.namespace, "vip", 1) == (true, Some(1))
    });
    assert!(!events_with_reason(&tenant, "RolledBack").is_empty(), "a RolledBack event");
}

#[test]
fn a_held_version_is_served_only_once_approved() {
    let tenant = Tenant::new("approval");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=10));
    tenant.apply(&static_segment(&tenant, "vip", json!({"rollover": {"maxChangeRatio": 0.2}})));
    let _operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));

    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(11..=20));
    annotate(&tenant, "vip", "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
    let held = tenant.wait_for_segment("vip", RUN, |s| is_true(s, "RolloverHeld"));
    assert_eq!(active_version(&held), Some(1), "the held version is not served");
    assert_eq!(held["status"]["currentRun"]["phase"], "AwaitingApproval", "{:#}", held["status"]);
    let message = condition(&held, "RolloverHeld").unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.contains("v2 changes 20 members"), "{message}");
    // Counted by the ingest Job from the two versions' index files, written
    // in its verdict next to v2's results, and recorded with v2 when the
    // operator sealed it from there: not by a set operation in Redis.
    let meta_key = format!("sg:{{{}/vip}}:meta", tenant.namespace);
    let meta = segment_tests::redis_call(tenant.redis.port, &["HGET", &meta_key, "2"]).and_then(|r| r.text());
    let meta: Value = serde_json::from_str(&meta.expect("v2's metadata")).unwrap();
    assert_eq!((meta["change"].clone(), meta["members"].clone()), (json!({"from": 1, "changed": 20}), json!(10)), "{meta}");
    let results_bucket = tenant.results_uri.trim_start_matches("s3://");
    let files = list_objects(results_bucket, &format!("{}/vip/v2", tenant.namespace));
    assert!(files.iter().any(|f| f.ends_with("/v2/_seal.json")), "the ingest Job's verdict: {files:?}");
    // Redis holds no member of any version: the segment's keys are its
    // small state only (docs/storage.md), and there is no per-user key.
    let prefix = format!("sg:{{{}/vip}}:", tenant.namespace);
    let mut kinds: Vec<String> =
        tenant.redis.keys(&format!("{prefix}*")).iter().map(|k| k.trim_start_matches(&prefix).to_string()).collect();
    kinds.sort();
    let small = ["changes", "fenced", "loaded", "meta", "ov", "promoted", "replicas"];
    assert!(kinds.iter().all(|k| small.contains(&k.as_str())), "keys outside the small-state layout: {kinds:?}");
    assert!(tenant.redis.keys("sg:u:*").is_empty(), "no per-user key");

    annotate(&tenant, "vip", "segmentation.dev/approve-version=2");
    let approved = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    assert!(!is_true(&approved, "RolloverHeld"));
}

#[test]
fn the_schedule_starts_runs() {
    let tenant = Tenant::new("schedule");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({"schedule": {"cron": "* * * * *"}})));
    let _operator = Operator::start(&tenant, &[]);
    let first = tenant.wait_for_segment("vip", RUN, |s| active_version(s).is_some());
    // The schedule's first run after the Segment's first version; when the
    // first version took past a minute boundary, that run has already
    // started (lastScheduleTime) by the time version 1 is seen active.
    let next = first["status"]["lastScheduleTime"]
        .as_str()
        .or(first["status"]["nextScheduleTime"].as_str())
        .expect("nextScheduleTime")
        .to_string();
    // The next minute's run makes a new version whose snapshot time is the
    // scheduled time.
    let scheduled = tenant.wait_for_segment("vip", RUN, |s| active_version(s) > active_version(&first));
    assert!(scheduled["status"]["lastScheduleTime"].as_str().is_some_and(|t| t >= next.as_str()), "{:#}", scheduled["status"]);
    let active = active_version(&scheduled).unwrap();
    let version = scheduled["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == active).unwrap();
    let snapshot = version["snapshotTime"].as_str().unwrap();
    assert!(snapshot >= next.as_str() && snapshot.get(16..19) == Some(":00"), "a minute boundary at or after {next}: {version}");
}

#[test]
fn a_job_deleted_by_hand_is_recreated_and_a_definition_change_supersedes_a_run_that_cannot_start() {
    let cluster = cluster();
    let tenant = Tenant::new("unschedulable");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    put_object(&tenant.lake_bucket, "lists/vip-2.csv", &list(1..=4));
    // More CPU than the node has: the real scheduler leaves the pod Pending.
    let resources = compute(UNSCHEDULABLE);
    tenant.apply(&static_segment(&tenant, "vip", resources));
    let _operator = Operator::start(&tenant, &[]);

    let job = "vip-v1-compute";
    let pod_is_unschedulable = || {
        let pods: Value =
            serde_json::from_str(&tenant.kubectl(&["get", "pods", "-l", &format!("job-name={job}"), "-o", "json"]).stdout)
                .unwrap_or_default();
        pods["items"].as_array().into_iter().flatten().any(|pod| {
            condition(pod, "PodScheduled").is_some_and(|c| {
                c["reason"] == "Unschedulable" && c["message"].as_str().unwrap_or("").contains("Insufficient cpu")
            })
        })
    };
    cluster.wait_until("the compute pod to be reported unschedulable", RUN, pod_is_unschedulable);
    let uid = |tenant: &Tenant| {
        cluster.get_json(&tenant.namespace, "job", job).and_then(|j| j["metadata"]["uid"].as_str().map(str::to_string))
    };
    let first_uid = uid(&tenant).expect("the compute Job");
    let output = tenant.kubectl(&["delete", "job", job, "--wait=true"]);
    assert!(output.success(), "{}", output.stderr);
    cluster.wait_until("the operator to create the Job again", RUN, || uid(&tenant).is_some_and(|u| u != first_uid));
    let segment = tenant.segment("vip");
    assert_eq!(segment["status"]["currentRun"]["version"], 1, "the same run goes on");

    // A new definition (and CPU that fits) cancels the stuck run.
    patch_spec(
        &tenant,
        "vip",
        json!({"definition": {"static": {"uri": format!("s3://{}/lists/vip-2.csv", tenant.lake_bucket)}},
               "compute": compute(FITS)["compute"]}),
    );
    let done = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    assert_eq!(done["status"]["members"], 4);
    let v1 = done["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == 1).cloned();
    assert_eq!(v1.map(|v| (v["state"].clone(), v["reason"].clone())), Some((json!("Failed"), json!("Superseded"))));
    cluster.wait_until("the stuck Job to be deleted", RUN, || uid(&tenant).is_none());
}

/// Pods that cannot start fail their runs at `--pod-start-timeout-seconds`
/// (not at the Job's hour-long deadline), each with the reason the cluster
/// gives: an image that cannot be pulled (the kubelet's waiting reason),
/// more CPU than any node has (the scheduler's message), a ServiceAccount
/// that does not exist (the Job controller's FailedCreate). The old
/// version keeps serving and the stuck Jobs are deleted, which frees
/// their compute slots.
#[test]
fn pods_that_cannot_start_fail_their_runs_with_the_reason_and_the_old_version_keeps_serving() {
    let cluster = cluster();
    let tenant = Tenant::new("nostart");
    // The image and the ServiceAccount are the admin's: they come from the
    // namespace's ComputeClass, changed between the runs below.
    let class = format!("{}-broken", tenant.namespace);
    let cases = [
        ("cpu", Some(compute(UNSCHEDULABLE)["compute"].clone()), None, "Unschedulable", "Insufficient cpu"),
        ("image", None, Some(json!({"image": "registry.invalid/segment-worker:none"})), "ImagePullFailed", "could not be pulled"),
        ("account", None, Some(json!({"serviceAccountName": "no-such-account"})), "PodNotCreated", "no-such-account"),
    ];
    for (name, _, _, _, _) in &cases {
        put_object(&tenant.lake_bucket, &format!("lists/{name}.csv"), &list(1..=3));
        tenant.apply(&static_segment(&tenant, name, json!({})));
    }
    let _operator = Operator::start(&tenant, &["--pod-start-timeout-seconds", "10"]);
    for (name, _, _, _, _) in &cases {
        tenant.wait_for_segment(name, RUN, |s| active_version(s) == Some(1));
    }
    for (name, compute, class_spec, _, _) in &cases {
        if let Some(compute) = compute {
            patch_spec(&tenant, name, json!({"compute": compute}));
        }
        if let Some(class_spec) = class_spec {
            let object = json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "ComputeClass",
                "metadata": {"name": class}, "spec": class_spec});
            let output = cluster.apply("default", &object.to_string());
            assert!(output.success(), "the ComputeClass: {}", output.stderr);
            // The class exists before the label names it; each run's Job
            // is created before the class changes again.
            let label = format!("segmentation.dev/compute-class={class}");
            cluster.kubectl_ok(&["label", "--overwrite", "namespace", &tenant.namespace, &label]);
        }
        annotate(&tenant, name, "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
        let job = format!("{name}-v2-compute");
        cluster.wait_until(&format!("{job} to be created"), RUN, || cluster.get_json(&tenant.namespace, "job", &job).is_some());
    }
    for (name, _, _, reason, detail) in &cases {
        let failed = tenant.wait_for_segment(name, RUN, |s| version_state(s, 2).as_deref() == Some("Failed"));
        let v2 = failed["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == 2).unwrap().clone();
        assert_eq!(v2["reason"], *reason, "{name}: {v2}");
        assert!(v2["message"].as_str().unwrap().contains(detail), "{name}: {v2}");
        assert_eq!(active_version(&failed), Some(1), "{name}: the old version keeps serving");
        let ready = condition(&failed, "Ready").unwrap();
        assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("True"), Some("LastRunFailed")), "{ready}");
        let job = format!("{name}-v2-compute");
        cluster.wait_until(&format!("{job} to be deleted"), RUN, || cluster.get_json(&tenant.namespace, "job", &job).is_none());
    }
    cluster.kubectl_ok(&["delete", "computeclass", &class]);
}

/// A Job the API server refuses (a CPU quantity that does not parse) fails
/// its run once as `JobRejected` with the server's message: the Segment
/// is Stalled, one Warning Event says why, the old version keeps serving,
/// and the operator does not send the Job again every few seconds.
#[test]
fn a_job_the_api_server_refuses_stalls_the_segment_once_instead_of_retrying() {
    let tenant = Tenant::new("rejected");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({})));
    let operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));

    patch_spec(&tenant, "vip", json!({"compute": {"resources": {"requests": {"cpu": "lots"}}}}));
    annotate(&tenant, "vip", "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
    let stalled = tenant.wait_for_segment("vip", RUN, |s| is_true(s, "Stalled"));
    let condition = condition(&stalled, "Stalled").unwrap().clone();
    assert_eq!(condition["reason"], "JobRejected", "{condition}");
    assert!(condition["message"].as_str().unwrap().contains("quantities must match"), "the server's message: {condition}");
    assert_eq!(active_version(&stalled), Some(1));
    assert_eq!(version_state(&stalled, 2).as_deref(), Some("Failed"));

    let reconciles = operator.reconciles();
    std::thread::sleep(Duration::from_secs(20));
    let attempts = job_creates(&tenant, |code| code == 400 || code == 422);
    assert_eq!(attempts, 1, "the refused Job was sent once");
    let failed = events_with_reason(&tenant, "RunFailed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["note"].as_str().or(failed[0]["message"].as_str()).unwrap_or_default().contains("JobRejected"),
        "{failed:?}"
    );
    assert!(operator.reconciles() - reconciles <= 2, "no reconcile loop while stalled");
}

#[test]
fn a_failed_definition_is_stalled_and_the_old_version_keeps_serving() {
    let tenant = Tenant::new("baddef");
    put_object(&tenant.lake_bucket, "orders/orders.csv", "user_id,amount\nu0000001,10\nu0000002,250\nu0000003,300\n");
    tenant.apply(&format!(
        r#"{{"apiVersion": "segmentation.dev/v1alpha1", "kind": "SegmentSource", "metadata": {{"name": "orders"}},
            "spec": {{"table": "orders", "uri": "s3://{}/orders/", "format": "csv", "userIdColumn": "user_id"}}}}"#,
        tenant.lake_bucket
    ));
    let sql = |condition: &str| {
        json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "big-spenders"},
               "spec": {"definition": {"sql": format!("SELECT user_id FROM orders WHERE {condition}")}}})
        .to_string()
    };
    tenant.apply(&sql("amount > 100"));
    let _operator = Operator::start(&tenant, &[]);
    let serving = Serving::start(&tenant);
    let v1 = tenant.wait_for_segment("big-spenders", RUN, |s| active_version(s) == Some(1));
    assert_eq!(v1["status"]["members"], 2);

    // Parses, reads a declared table, and fails in the engine.
    tenant.apply(&sql("no_such_column > 100"));
    let stalled = tenant.wait_for_segment("big-spenders", RUN, |s| is_true(s, "Stalled"));
    let stalled_condition = condition(&stalled, "Stalled").unwrap();
    assert_eq!(stalled_condition["reason"], "RunFailed", "{:#}", stalled["status"]);
    assert!(stalled_condition["message"].as_str().unwrap().contains("v2 failed: UnknownColumn"), "{stalled_condition}");
    let v2 = stalled["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == 2).unwrap().clone();
    assert_eq!((v2["state"].as_str(), v2["reason"].as_str()), (Some("Failed"), Some("UnknownColumn")), "{v2}");
    assert_eq!(active_version(&stalled), Some(1));
    assert_eq!(member(&serving, &tenant.namespace, "big-spenders", 2), (true, Some(1)));
    assert!(!events_with_reason(&tenant, "RunFailed").is_empty(), "a RunFailed event");
}

#[test]
fn deletion_removes_the_data_with_delete_and_keeps_it_with_retain() {
    let cluster = cluster();
    let tenant = Tenant::new("deletion");
    put_object(&tenant.lake_bucket, "lists/gone.csv", &list(1..=3));
    put_object(&tenant.lake_bucket, "lists/kept.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "gone", json!({"deletionPolicy": "Delete"})));
    tenant.apply(&static_segment(&tenant, "kept", json!({"deletionPolicy": "Retain"})));
    let _operator = Operator::start(&tenant, &[]);
    for name in ["gone", "kept"] {
        tenant.wait_for_segment(name, RUN, |s| active_version(s) == Some(1));
    }
    let keys = |name: &str| tenant.redis.keys(&format!("*{}/{name}*", tenant.namespace));
    assert!(!keys("gone").is_empty() && !keys("kept").is_empty(), "both are in the store");

    for name in ["gone", "kept"] {
        let output = tenant.kubectl(&["delete", "segment", name, "--wait=true", "--timeout=120s"]);
        assert!(output.success(), "deleting {name}: {}", output.stderr);
    }
    assert!(keys("gone").is_empty(), "Delete removes the store data: {:?}", keys("gone"));
    assert!(!keys("kept").is_empty(), "Retain keeps it");
    // ... but a deleted Segment is not served: its alias is gone.
    let alias = |name: &str| {
        segment_tests::redis_call(tenant.redis.port, &["HGET", "sg:aliases", &format!("{}/{name}", tenant.namespace)])
            .and_then(|r| r.text())
    };
    assert_eq!(alias("kept"), None, "Retain withdraws the segment from readers");
    // The Jobs go with their Segment (owner references, garbage collector).
    cluster
        .wait_until("the Jobs to be collected", RUN, || tenant.kubectl(&["get", "jobs", "-o", "name"]).stdout.trim().is_empty());
}

#[test]
fn retention_deletes_old_versions_and_each_deletion_is_its_own_event() {
    let tenant = Tenant::new("retention");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({"retention": {"keepVersions": 3}})));
    // Versions readers left are kept this long beyond keepVersions.
    let _operator = Operator::start(&tenant, &["--reader-grace-seconds", "2"]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    for version in 2..=3u64 {
        put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=(3 + version as u32)));
        annotate(&tenant, "vip", &format!("segmentation.dev/run-requested-at=2030-01-0{version}T00:00:00Z"));
        tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(version));
    }
    // A version is in the store while its metadata is (sealed from the
    // ingest's verdict: it has no member set).
    let meta_key = format!("sg:{{{}/vip}}:meta", tenant.namespace);
    let loaded = |version: u64| {
        let field = version.to_string();
        matches!(segment_tests::redis_call(tenant.redis.port, &["HEXISTS", &meta_key, &field]), Some(segment_tests::Resp::Int(1)))
    };
    assert!(loaded(1) && loaded(2) && loaded(3), "three versions kept: {:?}", tenant.redis.keys("*"));

    // Keeping one version deletes two in one reconcile: two Events, each
    // with its own note (not one Event counted twice with the first note).
    patch_spec(&tenant, "vip", json!({"retention": {"keepVersions": 1}}));
    let kept = tenant.wait_for_segment("vip", RUN, |s| {
        s["status"]["versions"].as_array().is_some_and(|vs| vs.iter().filter(|v| v["state"] != "Failed").count() == 1)
    });
    assert_eq!(active_version(&kept), Some(3));
    cluster().wait_until("v1 and v2 to leave the store", RUN, || !loaded(1) && !loaded(2));
    assert!(loaded(3));
    let notes: Vec<String> =
        events_with_reason(&tenant, "VersionDeleted").iter().map(|e| e["message"].as_str().unwrap_or("").to_string()).collect();
    for version in ["v1", "v2"] {
        assert!(notes.iter().any(|n| n.starts_with(&format!("{version} deleted"))), "no VersionDeleted for {version}: {notes:?}");
    }
}

/// A namespace that declares hundreds of tables: the Job's task names only
/// the tables the definition reads and reaches the worker as a file, not
/// as one environment variable (at most 128 KiB; every source in it made
/// the container fail to start).
#[test]
fn a_segment_runs_in_a_namespace_with_hundreds_of_sources() {
    let tenant = Tenant::new("sources");
    put_object(&tenant.lake_bucket, "orders/orders.csv", "user_id,amount\nu0000001,10\nu0000002,250\n");
    let padding = "p".repeat(300);
    let sources: Vec<Value> = (0..500)
        .map(|i| {
            json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "SegmentSource", "metadata": {"name": format!("table-{i}")},
                   "spec": {"table": format!("table_{i}"), "uri": format!("s3://{}/unused/{padding}/{i}/", tenant.lake_bucket),
                            "format": "parquet"}})
        })
        .chain(std::iter::once(json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "SegmentSource",
            "metadata": {"name": "orders"},
            "spec": {"table": "orders", "uri": format!("s3://{}/orders/", tenant.lake_bucket), "format": "csv"}})))
        .collect();
    tenant.apply(&json!({"apiVersion": "v1", "kind": "List", "items": sources}).to_string());
    tenant.apply(
        &json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "big-spenders"},
                "spec": {"definition": {"sql": "SELECT user_id FROM orders WHERE amount > 100"}}})
        .to_string(),
    );
    let _operator = Operator::start(&tenant, &[]);
    let segment = tenant.wait_for_segment("big-spenders", RUN, |s| {
        active_version(s) == Some(1)
            || s["status"]["versions"].as_array().is_some_and(|v| v.iter().any(|v| v["state"] == "Failed"))
    });
    assert_eq!(active_version(&segment), Some(1), "{:#}", segment["status"]);
    assert_eq!(segment["status"]["members"], 1);
}

/// A Segment stored under an older, looser schema that no longer decodes
/// (here `keepVersions` beyond a u32) is left out with a warning; the
/// operator goes on with every other Segment, in every namespace. On a
/// cluster of its own: the test loosens the CRD for a moment.
#[test]
fn a_segment_that_does_not_decode_does_not_stop_the_others() {
    let cluster = crate::own_cluster();
    let crds = std::fs::read_to_string(crate::crds_file()).unwrap();
    let loose: String =
        crds.lines().filter(|l| !l.trim_start().starts_with("maximum: 4294967295")).collect::<Vec<_>>().join("\n");
    assert_ne!(loose, crds, "the CRDs bound unsigned integers");
    cluster.install_crds(&loose);
    let broken = Tenant::new_on(cluster, "broken");
    broken.apply(&static_segment(&broken, "huge", json!({"retention": {"keepVersions": 5_000_000_000u64}})));
    cluster.install_crds(&crds);

    let tenant = Tenant::new_on(cluster, "healthy");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({})));
    let operator = Operator::start_with(&tenant, false, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    let log = operator.log();
    assert!(log.contains("Segment does not decode; left out") && log.contains("huge"), "{log}");
    drop(operator);
    cluster.stop();
}

/// What the operator checks before launching anything, on the real
/// server: a definition that does not parse, a table no SegmentSource
/// declares and a cron that never fires are reported, and no Job is made.
#[test]
fn invalid_specs_are_reported_and_nothing_is_launched() {
    let tenant = Tenant::new("invalid");
    let segment = |name: &str, spec: Value| {
        json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": name}, "spec": spec})
            .to_string()
    };
    tenant.apply(&segment("unparsable", json!({"definition": {"sql": "SELECT user_id FROM"}})));
    tenant.apply(&segment("undeclared", json!({"definition": {"sql": "SELECT user_id FROM refunds"}})));
    tenant.apply(&segment(
        "never",
        json!({"definition": {"static": {"uri": "s3://x/list.csv"}}, "schedule": {"cron": "0 0 30 2 *"}}),
    ));
    let _operator = Operator::start(&tenant, &[]);
    for (name, reason, words) in [
        ("unparsable", "InvalidDefinition", "spec.definition.sql"),
        ("undeclared", "InvalidDefinition", "refunds"),
        ("never", "InvalidSchedule", "spec.schedule.cron"),
    ] {
        let reported = tenant.wait_for_segment(name, RUN, |s| condition(s, "Ready").is_some_and(|c| c["reason"] == reason));
        let message = condition(&reported, "Ready").unwrap()["message"].as_str().unwrap().to_string();
        assert!(message.contains(words), "{name}: {message}");
        assert!(is_true(&reported, "Stalled"), "{name} is Stalled");
        assert!(!events_with_reason(&tenant, reason).is_empty(), "a {reason} event");
    }
    assert_eq!(tenant.kubectl(&["get", "jobs", "-o", "name"]).stdout.trim(), "", "no Job was created");
}

/// `--max-concurrent-computes 1`: a second Segment's run waits in phase
/// Pending while the first one's compute Job runs, and starts after it.
#[test]
fn the_compute_limit_queues_runs() {
    let cluster = cluster();
    let tenant = Tenant::new("limit");
    put_object(&tenant.lake_bucket, "lists/a.csv", &list(1..=3));
    put_object(&tenant.lake_bucket, "lists/b.csv", &list(1..=4));
    // `a` cannot be scheduled, so its compute Job holds the one slot.
    let stuck = compute(UNSCHEDULABLE);
    tenant.apply(&static_segment(&tenant, "a", stuck));
    let _operator = Operator::start(&tenant, &["--max-concurrent-computes", "1"]);
    cluster.wait_until("a's compute Job", RUN, || cluster.get_json(&tenant.namespace, "job", "a-v1-compute").is_some());
    tenant.apply(&static_segment(&tenant, "b", json!({})));
    let waiting = tenant.wait_for_segment("b", RUN, |s| s["status"]["currentRun"]["phase"] == "Pending");
    assert_eq!(active_version(&waiting), None);
    assert!(cluster.get_json(&tenant.namespace, "job", "b-v1-compute").is_none(), "b waits for the slot");

    // a's definition changes to one that fits: its stuck run is cancelled,
    // the slot frees, and both complete.
    patch_spec(
        &tenant,
        "a",
        json!({"definition": {"static": {"uri": format!("s3://{}/lists/b.csv", tenant.lake_bucket)}},
               "compute": compute(FITS)["compute"]}),
    );
    for name in ["a", "b"] {
        tenant.wait_for_segment(name, RUN, |s| active_version(s).is_some());
    }
}

/// An operator stopped in the middle of a run and started again carries the
/// run on with the Job the first one created: one Job per run, never two.
#[test]
fn a_restarted_operator_resumes_the_run_without_a_second_job() {
    let cluster = cluster();
    let tenant = Tenant::new("restart");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    put_object(&tenant.lake_bucket, "lists/vip-2.csv", &list(1..=5));
    tenant.apply(&static_segment(&tenant, "vip", compute(UNSCHEDULABLE)));
    let first = Operator::start(&tenant, &[]);
    cluster.wait_until("the compute Job", RUN, || cluster.get_json(&tenant.namespace, "job", "vip-v1-compute").is_some());
    let uid = |t: &Tenant| cluster.get_json(&t.namespace, "job", "vip-v1-compute").map(|j| j["metadata"]["uid"].clone());
    let job = uid(&tenant);
    drop(first);

    let second = Operator::start(&tenant, &[]);
    // Once the new operator has reconciled the Segment, the run and its
    // Job are still the same.
    cluster.wait_until("the new operator to reconcile", RUN, || second.reconciles() > 0);
    assert_eq!(uid(&tenant), job, "the same Job");
    assert_eq!(tenant.segment("vip")["status"]["currentRun"]["version"], 1);
    let creates = job_creates(&tenant, |code| code < 300);
    assert_eq!(creates, 1, "one Job created for the run");
}

/// A name longer than a label value (63 characters) still runs: the API
/// server refused its Jobs while the name itself was the label's value.
#[test]
fn a_segment_with_a_long_name_runs() {
    let tenant = Tenant::new("longname");
    let name = format!("customers-who-ordered-three-times-in-ninety-days-but-not-in-the-last-thirty-{}", "x".repeat(10));
    assert!(name.len() > 63);
    put_object(&tenant.lake_bucket, &format!("lists/{name}.csv"), &list(1..=2));
    tenant.apply(&static_segment(&tenant, &name, json!({})));
    let _operator = Operator::start(&tenant, &[]);
    let segment = tenant.wait_for_segment(&name, RUN, |s| active_version(s) == Some(1));
    assert_eq!(segment["status"]["members"], 2);
}

/// `concurrencyPolicy: Replace`: a run requested while another is in
/// flight cancels it (its Job is deleted, the version recorded as
/// `Replaced`) and runs instead.
#[test]
fn replace_cancels_the_run_in_flight_and_deletes_its_job() {
    let cluster = cluster();
    let tenant = Tenant::new("replace");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    let spec = json!({"schedule": {"cron": "0 0 1 1 *", "concurrencyPolicy": "Replace"},
                      "compute": compute(UNSCHEDULABLE)["compute"]});
    tenant.apply(&static_segment(&tenant, "vip", spec));
    let _operator = Operator::start(&tenant, &[]);
    cluster.wait_until("v1's compute Job", RUN, || cluster.get_json(&tenant.namespace, "job", "vip-v1-compute").is_some());

    // Resources that fit are no definition change: the stuck run stays
    // until a requested run replaces it.
    patch_spec(&tenant, "vip", compute(FITS));
    annotate(&tenant, "vip", "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
    let replaced = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    let v1 = replaced["status"]["versions"].as_array().unwrap().iter().find(|v| v["version"] == 1).cloned();
    assert_eq!(v1.map(|v| (v["state"].clone(), v["reason"].clone())), Some((json!("Failed"), json!("Replaced"))));
    cluster.wait_until("v1's Job to be deleted", RUN, || cluster.get_json(&tenant.namespace, "job", "vip-v1-compute").is_none());
}

/// Deleting a Segment while the store is down: the finalizer stays (the
/// data cannot be removed yet) and the reconcile fails; once the store is
/// back, the deletion completes.
#[test]
fn a_store_outage_holds_the_finalizer_until_the_store_is_back() {
    let cluster = cluster();
    let mut tenant = Tenant::new("outage");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({})));
    let operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));

    tenant.redis.stop();
    let errors_before = operator.reconciles_with("error");
    let output = tenant.kubectl(&["delete", "segment", "vip", "--wait=false"]);
    assert!(output.success(), "{}", output.stderr);
    cluster.wait_until("a failed cleanup", RUN, || operator.reconciles_with("error") > errors_before);
    let held = tenant.segment("vip");
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(held["metadata"]["finalizers"], json!(["segmentation.dev/cleanup"]));

    tenant.redis.restart();
    cluster.wait_until("the deletion to complete", RUN, || cluster.get_json(&tenant.namespace, "segment", "vip").is_none());
}

/// Result files older than `keepResultsFor` are deleted when the periodic
/// collection comes due, except the active version's. The test makes it
/// due at once by dating the last collection back.
#[test]
fn expired_results_are_collected_and_the_active_versions_are_kept() {
    let tenant = Tenant::new("results");
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=3));
    tenant.apply(&static_segment(&tenant, "vip", json!({"retention": {"keepVersions": 3, "keepResultsFor": "1s"}})));
    let _operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=4));
    annotate(&tenant, "vip", "segmentation.dev/run-requested-at=2030-01-01T00:00:00Z");
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    let bucket = tenant.results_uri.trim_start_matches("s3://");
    let files = |version: u32| crate::list_objects(bucket, &format!("{}/vip/v{version}", tenant.namespace));
    assert!(!files(1).is_empty() && !files(2).is_empty());

    let patch = json!({"status": {"resultsCollectedAt": "2020-01-01T00:00:00Z"}}).to_string();
    let output = tenant.kubectl(&["patch", "segment", "vip", "--subresource=status", "--type=merge", "-p", &patch]);
    assert!(output.success(), "{}", output.stderr);
    cluster().wait_until("v1's results to be collected", RUN, || files(1).is_empty());
    assert!(!files(2).is_empty(), "the active version's results are kept");
}
