//! Standalone mode on the bundled examples, end to end, checked only
//! through the serving API (and the status files standalone writes):
//! every segment's members equal an independent evaluation over the
//! generated lake; a new version becomes visible atomically; `pinVersion`
//! rolls back; a broken definition is reported while the old version keeps
//! serving. Run with the embedded store and with a real Redis. Ingest
//! writes each version's verdict next to its results and the engine seals
//! the version from it: the store records the verdict's count and holds no
//! member of any version.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use segment_compute::lakegen;
use segment_core::seal::{SealFile, SEAL_FILE};
use segment_operator::config::StandaloneArgs;
use segment_operator::standalone;
use segment_tests::examples::{expected_members, SEGMENTS};
use segment_tests::table_history::iceberg_example;
use segment_tests::{free_port, redis_call, RedisServer};
use serde_json::{json, Value};

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    // Not listening yet (standalone generates the lake first): status 0.
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return (0, Value::Null) };
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let payload = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Bodies may come chunked; the JSON is the part between the first '{' and the last '}'.
    let json_text = match (payload.find('{'), payload.rfind('}')) {
        (Some(a), Some(b)) => &payload[a..=b],
        _ => "null",
    };
    (status, serde_json::from_str(json_text).unwrap_or(Value::Null))
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Active version and its snapshot time of every segment, from the listing.
fn active_versions(port: u16) -> BTreeMap<String, (u64, DateTime<Utc>)> {
    let (_, listing) = http(port, "GET", "/v1/namespaces/default/segments", None);
    let mut out = BTreeMap::new();
    for segment in listing["segments"].as_array().into_iter().flatten() {
        let Some(active) = segment["activeVersion"].as_u64() else { continue };
        let snapshot = segment["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["version"].as_u64() == Some(active))
            .and_then(|v| v["snapshotTime"].as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if let (Some(name), Some(snapshot)) = (segment["name"].as_str(), snapshot) {
            out.insert(name.to_string(), (active, snapshot));
        }
    }
    out
}

/// Members of every segment as readers see them, asked user by user.
fn served(port: u16, users: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = SEGMENTS.iter().map(|s| (s.to_string(), BTreeSet::new())).collect();
    for user in users {
        let (status, body) = http(port, "GET", &format!("/v1/users/{user}/segments"), None);
        assert_eq!(status, 200, "{body}");
        for segment in body["segments"].as_array().into_iter().flatten() {
            out.entry(segment["name"].as_str().unwrap_or("").to_string()).or_default().insert(user.clone());
        }
    }
    out
}

fn edit_segment(dir: &Path, name: &str, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("segments.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut docs: Vec<Value> = text.split("\n---\n").map(|d| serde_yaml::from_str(d).unwrap()).collect();
    let doc = docs.iter_mut().find(|d| d["metadata"]["name"] == json!(name)).expect("the segment is in the examples");
    edit(doc);
    let text = docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n");
    std::fs::write(&path, text).unwrap();
}

fn status_of(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(".status/default").join(format!("{name}.yaml"))).unwrap_or_default();
    serde_yaml::from_str(&text).unwrap_or(Value::Null)
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    let found = status["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == json!(type_));
    found
        .map(|c| (c["reason"].as_str().unwrap_or("").to_string(), c["message"].as_str().unwrap_or("").to_string()))
        .unwrap_or_default()
}

/// Every active version's verdict (`_seal.json`, written by the in-process
/// ingest) is in its results, and the count the store serves is the
/// verdict's.
fn verdicts_match_the_served_counts(port: u16, results: &Path) {
    let (_, listing) = http(port, "GET", "/v1/namespaces/default/segments", None);
    let segments = listing["segments"].as_array().expect("a listing");
    assert_eq!(segments.len(), SEGMENTS.len(), "{listing}");
    for segment in segments {
        let name = segment["name"].as_str().unwrap();
        let active = segment["activeVersion"].as_u64().expect("an active version");
        let file = results.join("default").join(name).join(format!("v{active}")).join(SEAL_FILE);
        let text = std::fs::read(&file).unwrap_or_else(|e| panic!("{name}: no verdict at {}: {e}", file.display()));
        let verdict: SealFile = serde_json::from_slice(&text).unwrap();
        assert_eq!((verdict.segment.name.as_str(), verdict.version), (name, active));
        let listed = segment["versions"].as_array().unwrap().iter().find(|v| v["version"].as_u64() == Some(active)).unwrap();
        assert_eq!(listed["members"].as_u64(), Some(verdict.seal.members), "{name}: the store records the verdict's count");
    }
}

async fn the_examples_end_to_end(redis_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    for file in ["sources.yaml", "segments.yaml"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(file), dir.path().join(file)).unwrap();
    }
    let port = free_port();
    let args = StandaloneArgs {
        dir: dir.path().to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        redis_url,
        results_uri: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(standalone::run_until(args, async move {
        let _ = stopped.await;
    }));
    let spec = standalone::example_lake_spec();
    let users: Vec<String> = (0..spec.users).map(lakegen::user_id).collect();
    let dir = dir.path().to_path_buf();

    let checks = tokio::task::spawn_blocking(move || {
        // 1. Every segment gets a version, and its members are right.
        let snapshots = wait_for("every example segment to be active", Duration::from_secs(180), || {
            let active = active_versions(port);
            (active.len() == SEGMENTS.len()).then_some(active)
        });
        let want = expected_members(&spec, |name| snapshots[name].1);
        let got = served(port, &users);
        for name in SEGMENTS {
            assert_eq!(got[name], want[name], "{name}: served members differ from the independent evaluation");
        }
        assert!(SEGMENTS.iter().all(|s| !want[*s].is_empty()), "every example segment has members: {want:?}");
        verdicts_match_the_served_counts(port, &dir.join(".results"));

        // 2. New data and a run request: the new version appears atomically.
        let old: BTreeSet<String> = want["vip-list"].clone();
        let new: BTreeSet<String> = users.iter().rev().take(50).cloned().collect();
        let mut csv = "user_id\n".to_string();
        new.iter().for_each(|u| csv.push_str(&format!("{u}\n")));
        std::fs::write(dir.join("lake/lists/vip.csv"), csv).unwrap();
        edit_segment(&dir, "vip-list", |d| {
            d["metadata"]["annotations"] = json!({"segmentation.dev/run-requested-at": "2030-01-01T00:00:00Z"})
        });
        let candidates: Vec<String> = old.union(&new).cloned().collect();
        let checks: Vec<Value> =
            candidates.iter().map(|u| json!({"namespace": "default", "segment": "vip-list", "user": u})).collect();
        let body = json!({"checks": checks});
        let mut saw_new = false;
        let start = Instant::now();
        while !saw_new {
            assert!(start.elapsed() < Duration::from_secs(120), "v2 of vip-list never became visible");
            let (status, reply) = http(port, "POST", "/v1/membership:check", Some(&body));
            assert_eq!(status, 200, "{reply}");
            let results = reply["results"].as_array().unwrap();
            let versions: BTreeSet<u64> = results.iter().filter_map(|r| r["version"].as_u64()).collect();
            assert_eq!(versions.len(), 1, "one answer mixes versions: {versions:?}");
            let members: BTreeSet<String> =
                results.iter().filter(|r| r["member"] == json!(true)).map(|r| r["user"].as_str().unwrap().to_string()).collect();
            assert!(members == old || members == new, "readers saw a mix of two versions");
            saw_new = members == new && members != old;
        }

        // 3. Roll back with pinVersion: the old members are served again.
        edit_segment(&dir, "vip-list", |d| d["spec"]["pinVersion"] = json!(1));
        wait_for("the rollback to v1", Duration::from_secs(30), || {
            let (_, reply) = http(port, "POST", "/v1/membership:check", Some(&body));
            let members: BTreeSet<String> = reply["results"]
                .as_array()?
                .iter()
                .filter(|r| r["member"] == json!(true))
                .map(|r| r["user"].as_str().unwrap_or("").to_string())
                .collect();
            (members == old).then_some(())
        });

        // 4. A broken definition is reported; the old version keeps serving.
        let before = served(port, &users)["lapsed-high-value"].clone();
        edit_segment(&dir, "lapsed-high-value", |d| d["spec"]["definition"]["sql"] = json!("SELECT user_id FROM orders WHERE"));
        let (reason, message) = wait_for("the invalid definition to be reported", Duration::from_secs(30), || {
            let c = condition(&status_of(&dir, "lapsed-high-value"), "Ready");
            (c.0 == "InvalidDefinition").then_some(c)
        });
        assert!(message.contains("spec.definition.sql: does not parse"), "{reason}: {message}");
        assert_eq!(served(port, &users)["lapsed-high-value"], before, "the old version keeps serving");
    })
    .await;
    let _ = stop.send(());
    let _ = running.await;
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_with_the_embedded_store() {
    the_examples_end_to_end(None).await;
}

/// With Redis, the store holds the small mutable state only: the global
/// hashes (aliases, replicas, load requests) and, per segment, version
/// metadata, overrides and the bookkeeping sets and hashes. Every key is
/// one of those: no member set, no per-user key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_with_redis() {
    let redis = RedisServer::start();
    the_examples_end_to_end(Some(redis.url())).await;
    let keys = redis_call(redis.port, &["KEYS", "*"]).expect("Redis answers").texts();
    assert!(keys.iter().any(|k| k == "sg:aliases"), "{keys:?}");
    const SEGMENT_KEYS: [&str; 7] = ["meta", "promoted", "fenced", "loaded", "ov", "changes", "replicas"];
    let small = |key: &str| {
        ["sg:aliases", "sg:replicas", "sg:load"].contains(&key)
            || key.starts_with("sg:{") && key.rsplit_once("}:").is_some_and(|(_, kind)| SEGMENT_KEYS.contains(&kind))
    };
    let other: Vec<&String> = keys.iter().filter(|k| !small(k)).collect();
    assert!(other.is_empty(), "keys outside the small-state layout (docs/storage.md): {other:?}");
}

/// Standalone mode on an Iceberg table (pyiceberg, a SQL catalog next to
/// the manifests): the catalog comes from the ComputeClass the files give
/// the namespace, the version serves the members of the snapshot current
/// at its snapshot time, and its status records that snapshot's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_source_in_standalone_mode() {
    let dir = tempfile::tempdir().unwrap();
    let history = iceberg_example(dir.path());
    let port = free_port();
    let args = StandaloneArgs {
        dir: dir.path().to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        redis_url: None,
        results_uri: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(standalone::run_until(args, async move {
        let _ = stopped.await;
    }));
    let dir = dir.path().to_path_buf();
    let checks = tokio::task::spawn_blocking(move || {
        let status_file = dir.join(".status/growth/big-abroad.yaml");
        let status = wait_for("big-abroad to be active", Duration::from_secs(120), || {
            let text = std::fs::read_to_string(&status_file).ok()?;
            let status: Value = serde_yaml::from_str(&text).ok()?;
            status["activeVersion"].as_u64().map(|_| status)
        });
        // The newest snapshot is the one current at the version's snapshot time.
        let newest = history.last().unwrap();
        let version = &status["versions"].as_array().unwrap()[0];
        let read = &version["tableVersions"][0];
        assert_eq!((read["table"].as_str(), read["format"].as_str()), (Some("orders"), Some("iceberg")), "{status:?}");
        assert_eq!(read["version"].as_u64(), Some(newest.id), "{status:?}");

        let everyone: BTreeSet<String> = history.iter().flat_map(|c| c.members.iter().cloned()).collect();
        assert!(everyone.len() > newest.members.len(), "earlier snapshots had other members");
        let checks: Vec<Value> =
            everyone.iter().map(|u| json!({"namespace": "growth", "segment": "big-abroad", "user": u})).collect();
        let (code, reply) = http(port, "POST", "/v1/membership:check", Some(&json!({"checks": checks})));
        assert_eq!(code, 200, "{reply}");
        let served: BTreeSet<String> = reply["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["member"] == json!(true))
            .map(|r| r["user"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(served, newest.members);
    })
    .await;
    let _ = stop.send(());
    let _ = running.await;
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic.into_panic());
    }
}
