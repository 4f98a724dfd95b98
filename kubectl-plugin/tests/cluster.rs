//! `run`, `approve`, `rollback` and `status` against a fake API server
//! (kube's mock service, `segment_tests::kube_api`): the exact requests
//! the plugin sends (path, query, content type, body), what it prints, and
//! that a missing Segment or an unknown version is reported with nothing
//! written.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use clap::Parser;
use http::StatusCode;
use kubectl_segment::cli::{Cli, KubeArgs};
use kubectl_segment::cluster::Segments;
use kubectl_segment::{cluster_command, connect, PluginError};
use segment_core::api::Segment;
use segment_tests::kube_api::{self, Logged};
use serde_json::{json, Value};

const NS: &str = "growth";
const VIP: &str = "/apis/segmentation.dev/v1alpha1/namespaces/growth/segments/vip";
const MERGE_PATCH: &str = "application/merge-patch+json";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

/// Segments by (namespace, name) as the API server stores them, and every
/// request it received.
#[derive(Default)]
struct World {
    segments: BTreeMap<(String, String), Value>,
    log: Vec<Logged>,
}

type Shared = Arc<Mutex<World>>;

fn answer(world: &mut World, request: &Logged) -> (StatusCode, Value) {
    let path: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    let ["apis", "segmentation.dev", "v1alpha1", "namespaces", ns, "segments", name] = path.as_slice() else {
        return kube_api::status(404, "NotFound", &format!("the fake API does not serve {}", request.path));
    };
    let key = (ns.to_string(), name.to_string());
    let not_found = || kube_api::status(404, "NotFound", &format!("segments.segmentation.dev \"{name}\" not found"));
    match request.method.as_str() {
        "GET" => match world.segments.get(&key) {
            Some(segment) => (StatusCode::OK, segment.clone()),
            None => not_found(),
        },
        "PATCH" if request.content_type.as_deref() == Some(MERGE_PATCH) => match world.segments.get_mut(&key) {
            Some(segment) => {
                merge(segment, &request.body);
                (StatusCode::OK, segment.clone())
            }
            None => not_found(),
        },
        _ => kube_api::status(415, "UnsupportedMediaType", "the fake API takes merge patches only"),
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn world_with(segment: Value) -> Shared {
    let mut world = World::default();
    let key = (
        segment["metadata"]["namespace"].as_str().unwrap().to_string(),
        segment["metadata"]["name"].as_str().unwrap().to_string(),
    );
    world.segments.insert(key, segment);
    Arc::new(Mutex::new(world))
}

fn segments(world: &Shared) -> Segments {
    let world = world.clone();
    let client = kube_api::client(NS, move |request| {
        let mut world = world.lock().unwrap();
        let reply = answer(&mut world, request);
        world.log.push(request.clone());
        reply
    });
    Segments::new(client, NS)
}

/// `kubectl segment ARGS` against `world`.
async fn kubectl_segment(world: &Shared, args: &[&str]) -> Result<String, PluginError> {
    let cli = Cli::try_parse_from(std::iter::once("kubectl-segment").chain(args.iter().copied())).unwrap();
    cluster_command(&cli.command, &segments(world), now()).await
}

/// The requests received. kube writes the query as `?&fieldManager=…`;
/// the API server reads that as `?fieldManager=…`, and so do the tests.
fn log(world: &Shared) -> Vec<Logged> {
    let log = world.lock().unwrap().log.clone();
    log.into_iter().map(|l| Logged { query: l.query.trim_start_matches('&').to_string(), ..l }).collect()
}

fn stored(world: &Shared) -> Segment {
    serde_json::from_value(world.lock().unwrap().segments[&(NS.to_string(), "vip".to_string())].clone()).unwrap()
}

fn get() -> Logged {
    Logged { method: "GET".into(), path: VIP.into(), query: String::new(), content_type: None, body: Value::Null }
}

fn merge_patch(body: Value) -> Logged {
    Logged {
        method: "PATCH".into(),
        path: VIP.into(),
        query: "fieldManager=kubectl-segment".into(),
        content_type: Some(MERGE_PATCH.into()),
        body,
    }
}

/// A Segment with two retained versions (v2 served, v3 newer), a failed
/// v1, and v4 held by the rollover guard.
fn vip(pin: Option<u64>) -> Value {
    let active = pin.unwrap_or(3);
    let members = if active == 2 { 1175 } else { 1180 };
    let state = |v: u64| if v == active { "Active" } else { "Retained" };
    let mut spec = json!({
        "description": "Accounts the sales team looks after",
        "definition": {"sql": "SELECT user_id FROM orders GROUP BY user_id HAVING count(*) >= 3"},
        "schedule": {"cron": "*/30 * * * *", "timeZone": "Europe/Madrid"},
    });
    if let Some(pin) = pin {
        spec["pinVersion"] = json!(pin);
    }
    json!({
        "apiVersion": "segmentation.dev/v1alpha1",
        "kind": "Segment",
        "metadata": {
            "name": "vip", "namespace": NS, "generation": 2, "resourceVersion": "41",
            "annotations": {"team": "growth"}
        },
        "spec": spec,
        "status": {
            "observedGeneration": 2,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "VersionActive",
                 "message": format!("v{active} serves {members} members"), "lastTransitionTime": "2026-03-02T09:48:00Z"},
                {"type": "RolloverHeld", "status": "True", "reason": "ChangeRatioExceeded",
                 "message": "v4 changes 900 members, 76.3% of v3's 1180 (maxChangeRatio 0.5)",
                 "lastTransitionTime": "2026-03-02T09:31:00Z"}
            ],
            "activeVersion": active,
            "members": members,
            "latestVersion": 4,
            "lastSuccessfulTime": "2026-03-02T09:00:40Z",
            "nextScheduleTime": "2026-03-02T10:30:00Z",
            "currentRun": {
                "version": 4, "phase": "AwaitingApproval", "snapshotTime": "2026-03-02T09:30:00Z",
                "startedAt": "2026-03-02T09:30:01Z", "trigger": "Schedule", "definitionHash": "3e6f1d9f64242507",
                "generation": 2, "computedAt": "2026-03-02T09:30:20Z", "ingestedAt": "2026-03-02T09:30:35Z",
                "reason": "ChangeRatioExceeded", "message": "v4 changes 900 members, 76.3% of v3's 1180 (maxChangeRatio 0.5)"
            },
            "versions": [
                {"version": 3, "state": state(3), "members": 1180, "snapshotTime": "2026-03-02T09:00:00Z",
                 "computedAt": "2026-03-02T09:00:21Z", "ingestedAt": "2026-03-02T09:00:40Z", "definitionHash": "3e6f1d9f64242507"},
                {"version": 2, "state": state(2), "members": 1175, "snapshotTime": "2026-03-02T08:30:00Z",
                 "computedAt": "2026-03-02T08:30:19Z", "ingestedAt": "2026-03-02T08:30:37Z", "definitionHash": "3e6f1d9f64242507"},
                {"version": 1, "state": "Failed", "snapshotTime": "2026-03-02T08:00:00Z", "definitionHash": "0ac6a10d2afb9e45",
                 "reason": "UnknownColumn", "message": "unknown column `amount`"}
            ]
        }
    })
}

/// A Segment that has not run yet: no status at all.
fn new_segment() -> Value {
    json!({
        "apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment",
        "metadata": {"name": "vip", "namespace": NS, "generation": 1},
        "spec": {"definition": {"static": {"uri": "s3://uploads/vip.csv"}}}
    })
}

#[tokio::test]
async fn run_sets_the_run_requested_annotation_with_a_merge_patch() {
    let world = world_with(vip(None));
    let out = kubectl_segment(&world, &["run", "vip"]).await.unwrap();
    let annotation = json!({"metadata": {"annotations": {"segmentation.dev/run-requested-at": "2026-03-02T10:00:00Z"}}});
    assert_eq!(log(&world), vec![get(), merge_patch(annotation)]);
    assert_eq!(
        out,
        "segment.segmentation.dev/vip run requested (segmentation.dev/run-requested-at=2026-03-02T10:00:00Z)\n\
         v4 is AwaitingApproval; the requested run starts when it ends (concurrencyPolicy Forbid)\n\
         follow it with: kubectl segment status vip -n growth\n"
    );
    let annotations = stored(&world).metadata.annotations.unwrap();
    assert_eq!(annotations["segmentation.dev/run-requested-at"], "2026-03-02T10:00:00Z");
    assert_eq!(annotations["team"], "growth", "other annotations are kept");

    // A second request in the same second is still a new value, so the
    // operator starts a second run for it.
    kubectl_segment(&world, &["run", "vip"]).await.unwrap();
    let second = log(&world)[3].body["metadata"]["annotations"]["segmentation.dev/run-requested-at"].clone();
    assert_eq!(second, json!("2026-03-02T10:00:00.000000000Z"));
}

#[tokio::test]
async fn run_on_a_segment_without_a_run_in_flight_says_only_what_it_did() {
    let world = world_with(new_segment());
    let out = kubectl_segment(&world, &["run", "vip"]).await.unwrap();
    assert_eq!(
        out,
        "segment.segmentation.dev/vip run requested (segmentation.dev/run-requested-at=2026-03-02T10:00:00Z)\n\
         follow it with: kubectl segment status vip -n growth\n"
    );
    assert_eq!(log(&world).len(), 2);
}

#[tokio::test]
async fn approve_names_a_held_version() {
    let world = world_with(vip(None));
    let out = kubectl_segment(&world, &["approve", "vip", "--version", "4"]).await.unwrap();
    assert_eq!(
        log(&world),
        vec![get(), merge_patch(json!({"metadata": {"annotations": {"segmentation.dev/approve-version": "4"}}}))]
    );
    assert_eq!(
        out,
        "segment.segmentation.dev/vip v4 approved (segmentation.dev/approve-version=\"4\"); readers switch from v3 to v4 \
         at the operator's next reconcile\n"
    );
    assert_eq!(stored(&world).metadata.annotations.unwrap()["segmentation.dev/approve-version"], "4");
}

#[tokio::test]
async fn approve_refuses_a_version_that_is_not_held_and_writes_nothing() {
    let world = world_with(vip(None));
    let err = kubectl_segment(&world, &["approve", "vip", "--version", "3"]).await.unwrap_err();
    assert_eq!(err.to_string(), "version 3 of segment \"vip\" is not waiting for approval: held: v4");
    assert_eq!(log(&world), vec![get()], "nothing is written");

    let mut settled = vip(None);
    settled["status"].as_object_mut().unwrap().remove("currentRun");
    let world = world_with(settled);
    let err = kubectl_segment(&world, &["approve", "vip", "--version", "4"]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 4 of segment \"vip\" is not waiting for approval: no version is held \
         (versions: v3 Active, v2 Retained, v1 Failed)"
    );
    assert_eq!(log(&world), vec![get()]);

    let world = world_with(new_segment());
    let err = kubectl_segment(&world, &["approve", "vip", "--version", "1"]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 1 of segment \"vip\" is not waiting for approval: no version is held (the status lists no versions yet)"
    );
}

#[tokio::test]
async fn rollback_pins_a_retained_version() {
    let world = world_with(vip(None));
    let out = kubectl_segment(&world, &["rollback", "vip", "--to-version", "2"]).await.unwrap();
    assert_eq!(log(&world), vec![get(), merge_patch(json!({"spec": {"pinVersion": 2}}))]);
    assert_eq!(
        out,
        "segment.segmentation.dev/vip pinned to v2 (spec.pinVersion); readers switch from v3 to v2 at the operator's \
         next reconcile\n"
    );
    assert_eq!(stored(&world).spec.pin_version, Some(2));

    // Pinning the pinned version again changes nothing and sends nothing.
    let out = kubectl_segment(&world, &["rollback", "vip", "--to-version", "2"]).await.unwrap();
    assert_eq!(out, "segment.segmentation.dev/vip is already pinned to v2; nothing changed\n");
    assert_eq!(log(&world).iter().filter(|l| l.method == "PATCH").count(), 1);
}

#[tokio::test]
async fn rollback_refuses_a_version_that_is_not_retained_and_writes_nothing() {
    for (version, why) in [("9", "never existed"), ("1", "failed"), ("4", "held, never promoted")] {
        let world = world_with(vip(None));
        let err = kubectl_segment(&world, &["rollback", "vip", "--to-version", version]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("version {version} of segment \"vip\" is not a retained version (retained: v2, v3)"),
            "{why}"
        );
        assert_eq!(log(&world), vec![get()], "{why}: nothing is written");
    }
    let world = world_with(new_segment());
    let err = kubectl_segment(&world, &["rollback", "vip", "--to-version", "1"]).await.unwrap_err();
    assert_eq!(err.to_string(), "version 1 of segment \"vip\" is not a retained version (retained: none)");
}

#[tokio::test]
async fn rollback_clear_removes_the_pin() {
    let world = world_with(vip(Some(2)));
    let out = kubectl_segment(&world, &["rollback", "vip", "--clear"]).await.unwrap();
    assert_eq!(log(&world), vec![get(), merge_patch(json!({"spec": {"pinVersion": null}}))]);
    assert_eq!(
        out,
        "segment.segmentation.dev/vip unpinned (spec.pinVersion 2 removed); readers switch to the newest version (v3) \
         at the operator's next reconcile\n"
    );
    let segment = stored(&world);
    assert_eq!(segment.spec.pin_version, None);
    assert!(segment.spec.schedule.is_some(), "the rest of the spec is kept");

    // Without a pin there is nothing to clear, and nothing is sent.
    let out = kubectl_segment(&world, &["rollback", "vip", "--clear"]).await.unwrap();
    assert_eq!(
        out,
        "segment.segmentation.dev/vip has no spec.pinVersion; it already serves the newest version (v2); nothing changed\n"
    );
    assert_eq!(log(&world).iter().filter(|l| l.method == "PATCH").count(), 1);
}

#[tokio::test]
async fn status_prints_the_versions_and_conditions_like_kubectl_get() {
    let world = world_with(vip(Some(2)));
    let out = kubectl_segment(&world, &["status", "vip"]).await.unwrap();
    assert_eq!(log(&world), vec![get()], "status only reads");
    let expected = "\
Name:          vip
Namespace:     growth
Description:   Accounts the sales team looks after
Ready:         True (VersionActive) v2 serves 1175 members
Active:        v2, 1175 members
Pinned:        v2 (spec.pinVersion)
Current run:   v4 AwaitingApproval (Schedule), started 2026-03-02T09:30:01Z
Schedule:      */30 * * * * (Europe/Madrid)
Last success:  2026-03-02T09:00:40Z (59m ago)
Next run:      2026-03-02T10:30:00Z

VERSION   STATE              MEMBERS   SNAPSHOT               COMPUTED               INGESTED               MESSAGE
4         AwaitingApproval   -         2026-03-02T09:30:00Z   2026-03-02T09:30:20Z   2026-03-02T09:30:35Z   ChangeRatioExceeded: v4 changes 900 members, 76.3% of v3's 1180 (maxChangeRatio 0.5)
3         Retained           1180      2026-03-02T09:00:00Z   2026-03-02T09:00:21Z   2026-03-02T09:00:40Z   -
2         Active,Pinned      1175      2026-03-02T08:30:00Z   2026-03-02T08:30:19Z   2026-03-02T08:30:37Z   -
1         Failed             -         2026-03-02T08:00:00Z   -                      -                      UnknownColumn: unknown column `amount`

CONDITION      STATUS   REASON                AGE   MESSAGE
Ready          True     VersionActive         12m   v2 serves 1175 members
RolloverHeld   True     ChangeRatioExceeded   29m   v4 changes 900 members, 76.3% of v3's 1180 (maxChangeRatio 0.5)
";
    assert_eq!(out, expected, "got:\n{out}");
}

/// A Segment over Delta tables: each version's row says which table
/// version it read (`table@version`), as its status records them.
#[tokio::test]
async fn status_shows_the_table_versions_each_version_read() {
    let mut segment = vip(Some(2));
    segment["status"]["versions"][0]["tableVersions"] =
        json!([{"table": "orders", "format": "delta", "version": 12}, {"table": "users", "format": "delta", "version": 3}]);
    segment["status"]["versions"][1]["tableVersions"] = json!([{"table": "orders", "format": "delta", "version": 11}]);
    let world = world_with(segment);
    let out = kubectl_segment(&world, &["status", "vip"]).await.unwrap();
    let table: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("VERSION")).take(5).collect();
    let expected = [
        "VERSION   STATE              MEMBERS   SNAPSHOT               COMPUTED               INGESTED               TABLES              MESSAGE",
        "4         AwaitingApproval   -         2026-03-02T09:30:00Z   2026-03-02T09:30:20Z   2026-03-02T09:30:35Z   -                   ChangeRatioExceeded: v4 changes 900 members, 76.3% of v3's 1180 (maxChangeRatio 0.5)",
        "3         Retained           1180      2026-03-02T09:00:00Z   2026-03-02T09:00:21Z   2026-03-02T09:00:40Z   orders@12,users@3   -",
        "2         Active,Pinned      1175      2026-03-02T08:30:00Z   2026-03-02T08:30:19Z   2026-03-02T08:30:37Z   orders@11           -",
        "1         Failed             -         2026-03-02T08:00:00Z   -                      -                      -                   UnknownColumn: unknown column `amount`",
    ];
    assert_eq!(table, expected, "got:\n{out}");
}

/// An Iceberg table's version is the snapshot id read, shown the same way.
#[tokio::test]
async fn status_shows_the_iceberg_snapshot_each_version_read() {
    let mut segment = vip(Some(2));
    segment["status"]["versions"][1]["tableVersions"] = json!([
        {"table": "events", "format": "iceberg", "version": 6258459911819725586u64},
        {"table": "orders", "format": "delta", "version": 12}
    ]);
    let world = world_with(segment);
    let out = kubectl_segment(&world, &["status", "vip"]).await.unwrap();
    let row = out.lines().find(|l| l.starts_with("2 ")).unwrap_or_else(|| panic!("no v2 row:\n{out}"));
    assert!(row.contains(" events@6258459911819725586,orders@12 "), "got:\n{out}");
}

#[tokio::test]
async fn status_of_a_segment_that_has_not_run_yet() {
    let world = world_with(new_segment());
    let out = kubectl_segment(&world, &["status", "vip"]).await.unwrap();
    assert_eq!(
        out,
        "Name:          vip\nNamespace:     growth\nReady:         -\nActive:        none\nCurrent run:   none\n\
         Last success:  -\nNext run:      -\n\nNo versions yet.\n\nNo conditions yet.\n"
    );
}

#[tokio::test]
async fn a_missing_segment_is_named_with_its_namespace_and_nothing_is_written() {
    for args in [
        vec!["run", "nope"],
        vec!["approve", "nope", "--version", "4"],
        vec!["rollback", "nope", "--to-version", "2"],
        vec!["rollback", "nope", "--clear"],
        vec!["status", "nope"],
    ] {
        let world = world_with(vip(None));
        let err = kubectl_segment(&world, &args).await.unwrap_err();
        assert!(matches!(err, PluginError::NotFound { .. }), "{args:?}: {err:?}");
        assert_eq!(err.to_string(), "segment \"nope\" not found in namespace \"growth\"", "{args:?}");
        let requests = log(&world);
        assert_eq!(requests.len(), 1, "{args:?}: one read, no write: {requests:?}");
        assert_eq!(requests[0].line(), "GET /apis/segmentation.dev/v1alpha1/namespaces/growth/segments/nope");
    }
}

/// A kubeconfig with two contexts; `dev` is current and sets a namespace.
fn kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: dev\n\
         clusters:\n- name: dev\n  cluster: {server: 'https://dev.example:6443'}\n\
         - name: prod\n  cluster: {server: 'https://prod.example:6443'}\n\
         users:\n- name: someone\n  user: {token: not-a-secret}\n\
         contexts:\n- name: dev\n  context: {cluster: dev, user: someone, namespace: growth}\n\
         - name: prod\n  context: {cluster: prod, user: someone}\n",
    )
    .unwrap();
    path
}

#[tokio::test]
async fn the_context_and_namespace_are_chosen_as_kubectl_chooses_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = Some(kubeconfig(dir.path()));
    let choose = |context: Option<&str>, namespace: Option<&str>| KubeArgs {
        kubeconfig: file.clone(),
        context: context.map(str::to_string),
        namespace: namespace.map(str::to_string),
    };
    let chosen = |args: KubeArgs| async move {
        let (config, namespace) = connect::config(&args).await.unwrap();
        (config.cluster_url.to_string(), namespace)
    };
    assert_eq!(chosen(choose(None, None)).await, ("https://dev.example:6443/".into(), "growth".into()), "current context");
    assert_eq!(chosen(choose(None, Some("ops"))).await, ("https://dev.example:6443/".into(), "ops".into()), "-n wins");
    assert_eq!(chosen(choose(Some("prod"), None)).await, ("https://prod.example:6443/".into(), "default".into()), "--context");
    let err = connect::config(&choose(Some("staging"), None)).await.unwrap_err().to_string();
    assert!(err.starts_with("kube config: ") && err.contains("staging"), "{err}");
}
