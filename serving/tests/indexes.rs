//! Serving from index files: a replica answers from the result files'
//! `members.sgix` held in memory (the store holds no members at all here),
//! switches a segment only once it holds the new version, reports what it
//! holds, and lays realtime overrides on top. On the embedded store and on
//! a real `redis-server`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use chrono::{DateTime, TimeDelta, Utc};
use http::{Request, StatusCode};
use segment_core::api::SegmentKey;
use segment_core::index::IdSet;
use segment_core::naming::results_uri;
use segment_core::store::{MemoryStore, Override, OverrideOp, Seal, StoreError};
use segment_serving::{router, AppState, IndexOptions, IndexSource, ResultFiles, ServingConfig, ServingStore, Shard};
use segment_store::redis::RedisStore;
use segment_tests::{as_before_index_files, write_result, RedisServer};
use serde_json::Value;
use tower::ServiceExt;

const REPLICA: &str = "serving-0";

fn snapshot() -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000, 0).unwrap()
}

fn lapsed() -> SegmentKey {
    SegmentKey::new("growth", "lapsed")
}

fn vip() -> SegmentKey {
    SegmentKey::new("crm", "vip")
}

/// An index source that can be held back or made to fail, in front of the
/// real result files.
struct Gate {
    files: ResultFiles,
    open: AtomicBool,
    broken: AtomicBool,
}

impl Gate {
    fn new(base: &str) -> Arc<Gate> {
        Arc::new(Gate { files: ResultFiles::new(base), open: AtomicBool::new(true), broken: AtomicBool::new(false) })
    }
}

#[async_trait]
impl IndexSource for Gate {
    async fn fetch(&self, segment: &SegmentKey, version: u64) -> Result<IdSet, StoreError> {
        while !self.open.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the object store is down".into()));
        }
        self.files.fetch(segment, version).await
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    base: String,
    store: Arc<dyn ServingStore>,
}

impl Fixture {
    fn new(store: Arc<dyn ServingStore>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = format!("file://{}/", dir.path().display());
        Fixture { _dir: dir, base, store }
    }

    /// Writes the version's result files and seals it in the store with
    /// no members there: every answer must come from the files.
    async fn version(&self, segment: &SegmentKey, version: u64, members: &[&str]) {
        let mut ids: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        ids.sort();
        write_result(&results_uri(&self.base, segment, version), segment, version, snapshot(), &[ids]).await;
        let seal = Seal { snapshot_time: Some(snapshot()), overrides_from: Some(snapshot()), ..Seal::default() };
        self.store.seal_with(segment, version, &seal).await.unwrap();
    }

    fn config(&self, source: Arc<dyn IndexSource>, refresh: Duration) -> ServingConfig {
        ServingConfig {
            refresh_interval: refresh,
            store_timeout: Duration::from_millis(500),
            ..ServingConfig::new(IndexOptions::new(source, REPLICA))
        }
    }
}

struct Api {
    router: axum::Router,
    state: AppState,
}

impl Api {
    fn start(store: Arc<dyn ServingStore>, config: ServingConfig) -> Api {
        let state = AppState::new(store, config);
        Api { router: router(state.clone()), state }
    }

    async fn wait_ready(&self) {
        let start = Instant::now();
        while !self.state.is_ready() {
            assert!(start.elapsed() < Duration::from_secs(10), "the replica never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response =
            tokio::time::timeout(Duration::from_secs(10), self.router.clone().oneshot(request)).await.unwrap().unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// The user's segments as `ns/name@version`.
    async fn segments_of(&self, user: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/v1/users/{user}/segments")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}/{}@{}", s["namespace"].as_str().unwrap(), s["name"].as_str().unwrap(), s["version"]))
            .collect()
    }

    async fn is_member(&self, segment: &SegmentKey, user: &str) -> bool {
        let (status, body) =
            self.get(&format!("/v1/namespaces/{}/segments/{}/members/{user}", segment.namespace, segment.name)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["member"].as_bool().unwrap()
    }

    async fn eventually_segments(&self, user: &str, expected: &[&str]) {
        let start = Instant::now();
        loop {
            let got = self.segments_of(user).await;
            if got == expected {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{user}: still {got:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn eventually_holding(store: &dyn ServingStore, segment: &SegmentKey, version: u64, holding: bool) {
    let start = Instant::now();
    loop {
        let status = store.load_status(segment, version).await.unwrap();
        if status.holding.contains(REPLICA) == holding {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{segment} v{version}: {status:?}, expected holding={holding}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Answers, rollover after the version is held, load requests reported
/// before the switch, eviction of the version left.
async fn answers_and_rollovers(store: Arc<dyn ServingStore>) {
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1", "u2"]).await;
    fixture.version(&lapsed(), 2, &["u2", "u3"]).await;
    fixture.version(&vip(), 1, &["u1"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    store.activate(&vip(), 1).await.unwrap();
    let gate = Gate::new(&fixture.base);
    let api = Api::start(store.clone(), fixture.config(gate.clone(), Duration::from_secs(600)));
    api.wait_ready().await;

    assert_eq!(api.segments_of("u1").await, ["crm/vip@1", "growth/lapsed@1"]);
    assert_eq!(api.segments_of("u2").await, ["growth/lapsed@1"]);
    assert!(api.segments_of("u3").await.is_empty());
    assert!(api.is_member(&lapsed(), "u2").await && !api.is_member(&lapsed(), "u3").await);
    let status = store.load_status(&lapsed(), 1).await.unwrap();
    assert!(status.live.contains(REPLICA) && status.holding.contains(REPLICA), "ready, live and holding: {status:?}");

    // A load request: the replica fetches v2 and reports it while readers
    // stay on v1.
    store.request_load(&lapsed(), 2).await.unwrap();
    eventually_holding(store.as_ref(), &lapsed(), 2, true).await;
    assert_eq!(api.segments_of("u2").await, ["growth/lapsed@1"], "no switch before the rollover");

    // The switch, then the version left is dropped and reported gone.
    store.activate(&lapsed(), 2).await.unwrap();
    api.eventually_segments("u3", &["growth/lapsed@2"]).await;
    assert_eq!(api.segments_of("u1").await, ["crm/vip@1"]);
    eventually_holding(store.as_ref(), &lapsed(), 1, false).await;

    // A rollback to a version no longer held: the replica answers from v2
    // until it holds v1 again, then switches.
    gate.open.store(false, Ordering::Release);
    store.activate(&lapsed(), 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.segments_of("u3").await, ["growth/lapsed@2"], "still on the version it holds");
    gate.open.store(true, Ordering::Release);
    api.eventually_segments("u3", &[]).await;
    assert_eq!(api.segments_of("u1").await, ["crm/vip@1", "growth/lapsed@1"]);

    // Withdrawn: the segment is answered no more.
    store.withdraw(&vip()).await.unwrap();
    api.eventually_segments("u1", &["growth/lapsed@1"]).await;
    eventually_holding(store.as_ref(), &vip(), 1, false).await;
}

#[tokio::test]
async fn answers_come_from_the_index_files_on_the_embedded_store() {
    answers_and_rollovers(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn answers_come_from_the_index_files_on_redis() {
    let redis = RedisServer::start();
    answers_and_rollovers(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

fn change(user: &str, op: OverrideOp, ts: DateTime<Utc>) -> Override {
    Override { user: user.into(), op, ts, id: format!("{user}-{}", ts.timestamp()), offset: None }
}

/// Overrides recorded before the replica started and after, on top of the
/// index; one the version's lake data reflects already does not count.
async fn overrides_on_top(store: Arc<dyn ServingStore>) {
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1", "u2"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    store.record_override(&lapsed(), &change("u2", OverrideOp::Exclude, snapshot() + TimeDelta::minutes(1))).await.unwrap();
    store.record_override(&lapsed(), &change("u1", OverrideOp::Exclude, snapshot() - TimeDelta::minutes(1))).await.unwrap();
    let api = Api::start(store.clone(), fixture.config(Gate::new(&fixture.base), Duration::from_secs(600)));
    api.wait_ready().await;
    assert!(api.segments_of("u2").await.is_empty(), "an override after the version's lake data, read at load");
    assert_eq!(api.segments_of("u1").await, ["growth/lapsed@1"], "an override the lake data reflects does not count");

    store.record_override(&lapsed(), &change("u9", OverrideOp::Include, snapshot() + TimeDelta::minutes(2))).await.unwrap();
    api.eventually_segments("u9", &["growth/lapsed@1"]).await;
    assert!(api.is_member(&lapsed(), "u9").await);
}

#[tokio::test]
async fn overrides_go_on_top_of_the_index_on_the_embedded_store() {
    overrides_on_top(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn overrides_go_on_top_of_the_index_on_redis() {
    let redis = RedisServer::start();
    overrides_on_top(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

#[tokio::test]
async fn a_replica_is_ready_and_live_only_once_it_holds_every_active_version() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1"]).await;
    fixture.version(&vip(), 1, &["u1"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    store.activate(&vip(), 1).await.unwrap();
    let gate = Gate::new(&fixture.base);
    gate.broken.store(true, Ordering::Release);
    let api = Api::start(store.clone(), fixture.config(gate.clone(), Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!api.state.is_ready(), "nothing held yet");
    assert_eq!(api.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(store.load_status(&lapsed(), 1).await.unwrap().live.is_empty(), "not reported live before it is ready");

    gate.broken.store(false, Ordering::Release);
    api.wait_ready().await;
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
    assert_eq!(api.segments_of("u1").await, ["crm/vip@1", "growth/lapsed@1"]);
    assert!(store.load_status(&lapsed(), 1).await.unwrap().live.contains(REPLICA));
}

#[tokio::test]
async fn a_damaged_index_file_is_never_served() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1", "u2"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    let path = results_uri(&fixture.base, &lapsed(), 1).trim_start_matches("file://").to_string() + "members.sgix";
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let api = Api::start(store.clone(), fixture.config(Gate::new(&fixture.base), Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!api.state.is_ready(), "a file that fails its checksum is not held");
    assert_eq!(api.get("/v1/users/u1/segments").await.0, StatusCode::SERVICE_UNAVAILABLE);
    bytes[middle] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    api.wait_ready().await;
    assert_eq!(api.segments_of("u1").await, ["growth/lapsed@1"]);
}

/// A version computed before index files (its manifest lists none) is
/// served from an index built from its parts, so a replica is ready after
/// an upgrade without the version being computed again; parts that fail
/// their checksum are never served.
#[tokio::test]
async fn a_version_from_before_index_files_is_served_from_its_parts() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let fixture = Fixture::new(store.clone());
    let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<String>>();
    // Parts in order (read one at a time) and out of order (sorted whole).
    for (segment, parts) in [(vip(), vec![ids(&["u1", "u2"]), ids(&["u3"])]), (lapsed(), vec![ids(&["u3", "u5"]), ids(&["u1"])])]
    {
        let uri = results_uri(&fixture.base, &segment, 1);
        write_result(&uri, &segment, 1, snapshot(), &parts).await;
        as_before_index_files(&uri).await;
        let seal = Seal { snapshot_time: Some(snapshot()), overrides_from: Some(snapshot()), ..Seal::default() };
        store.seal_with(&segment, 1, &seal).await.unwrap();
        store.activate(&segment, 1).await.unwrap();
    }
    let part = results_uri(&fixture.base, &lapsed(), 1).trim_start_matches("file://").to_string() + "part-00001.txt";
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&part, &bytes).unwrap();

    let api = Api::start(store.clone(), fixture.config(Gate::new(&fixture.base), Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!api.state.is_ready(), "a part that fails its checksum is not held");
    bytes[0] ^= 0x20;
    std::fs::write(&part, &bytes).unwrap();
    api.wait_ready().await;
    assert_eq!(api.segments_of("u1").await, ["crm/vip@1", "growth/lapsed@1"]);
    assert_eq!(api.segments_of("u2").await, ["crm/vip@1"]);
    assert_eq!(api.segments_of("u5").await, ["growth/lapsed@1"]);
    assert!(api.segments_of("u4").await.is_empty());
    assert!(api.is_member(&lapsed(), "u3").await && !api.is_member(&lapsed(), "u2").await);
}

#[tokio::test]
async fn the_binary_withdraws_its_liveness_when_stopped() {
    let redis = RedisServer::start();
    let store: Arc<dyn ServingStore> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    let port = segment_tests::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_segment-serving"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--redis-url", &redis.url(), "--results-uri", &fixture.base, "--pod-name", REPLICA])
        // Far longer than the test: only the withdrawal can end it.
        .args(["--replica-liveness-ms", "600000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ours = |names: &std::collections::BTreeSet<String>| names.iter().any(|n| n.starts_with(&format!("{REPLICA}/")));
    while !ours(&store.load_status(&lapsed(), 1).await.unwrap().holding) {
        assert!(start.elapsed() < Duration::from_secs(20), "the binary never reported itself live and holding v1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    segment_tests::signal(child.id(), segment_tests::Signal::Terminate);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    let after = store.load_status(&lapsed(), 1).await.unwrap();
    assert!(!ours(&after.live), "withdrawn on SIGTERM, long before its liveness ran out: {after:?}");
}

/// Two shards at small scale: each replica holds its part of every
/// version, answers for its users and refuses the others with a 421 naming
/// the right shard; together they answer what one replica would.
#[tokio::test]
async fn two_shards_split_the_users_and_together_answer_like_one() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let fixture = Fixture::new(store.clone());
    let users: Vec<String> = (0..200).map(|i| format!("user-{i:03}")).collect();
    let even: Vec<&str> = users.iter().step_by(2).map(String::as_str).collect();
    let thirds: Vec<&str> = users.iter().step_by(3).map(String::as_str).collect();
    fixture.version(&lapsed(), 1, &even).await;
    fixture.version(&vip(), 1, &thirds).await;
    store.activate(&lapsed(), 1).await.unwrap();
    store.activate(&vip(), 1).await.unwrap();
    let start = |shard: &str| {
        let mut config = fixture.config(Gate::new(&fixture.base), Duration::from_secs(600));
        config.index.shard = shard.parse().unwrap();
        config.index.replica = format!("serving-{shard}");
        Api::start(store.clone(), config)
    };
    let (whole, shards) = (start("0/1"), [start("0/2"), start("1/2")]);
    whole.wait_ready().await;
    for shard in &shards {
        shard.wait_ready().await;
    }
    let mut answered = [0, 0];
    for user in &users {
        let owner = Shard::of(user, 2) as usize;
        answered[owner] += 1;
        assert_eq!(shards[owner].segments_of(user).await, whole.segments_of(user).await, "{user}");
        let (status, body) = shards[1 - owner].get(&format!("/v1/users/{user}/segments")).await;
        assert_eq!((status, body["reason"].as_str()), (StatusCode::MISDIRECTED_REQUEST, Some("WrongShard")), "{user}");
        assert!(body["error"].as_str().unwrap().contains(&format!("shard {owner} of 2")), "{body}");
        assert!(!body["error"].as_str().unwrap().contains(user.as_str()), "errors never echo the user: {body}");
        let (status, _) = shards[1 - owner].get(&format!("/v1/namespaces/growth/segments/lapsed/members/{user}")).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    }
    assert!(answered[0] > 60 && answered[1] > 60, "both shards hold a fair part: {answered:?}");
    // Each holds about half: the memberships held add up to the whole's.
    let held = |api: &Api| {
        let metrics = api.state.metrics().encode();
        let line = metrics.lines().find_map(|l| l.strip_prefix("segment_serving_index_memberships ")).unwrap().to_string();
        line.parse::<u64>().unwrap()
    };
    assert_eq!(held(&shards[0]) + held(&shards[1]), held(&whole));
    assert_eq!(held(&whole), (even.len() + thirds.len()) as u64);
    assert!(held(&shards[0]) < held(&whole) && held(&shards[1]) < held(&whole));
    // Both shards' replicas report holding the version: the operator's
    // switch waits for every shard.
    let status = store.load_status(&lapsed(), 1).await.unwrap();
    assert!(["serving-0/2", "serving-1/2"].iter().all(|r| status.holding.contains(*r)), "{status:?}");
}

/// A rollback to an older version: the overrides recorded while it was
/// retained (after its lake data) count for it as soon as it serves again.
#[tokio::test]
async fn a_rollback_serves_the_overrides_recorded_while_the_version_was_retained() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1", "u2"]).await;
    fixture.version(&lapsed(), 2, &["u1", "u2", "u3"]).await;
    store.activate(&lapsed(), 2).await.unwrap();
    let api = Api::start(store.clone(), fixture.config(Gate::new(&fixture.base), Duration::from_secs(600)));
    api.wait_ready().await;
    store.record_override(&lapsed(), &change("u1", OverrideOp::Exclude, snapshot() + TimeDelta::minutes(5))).await.unwrap();
    store.record_override(&lapsed(), &change("u9", OverrideOp::Include, snapshot() + TimeDelta::minutes(5))).await.unwrap();
    api.eventually_segments("u1", &[]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    api.eventually_segments("u2", &["growth/lapsed@1"]).await;
    assert!(api.segments_of("u1").await.is_empty(), "excluded while v1 was retained");
    assert_eq!(api.segments_of("u9").await, ["growth/lapsed@1"], "included while v1 was retained");
    assert!(api.segments_of("u3").await.is_empty());
}

/// A switch whose notice never reached the replica (here the alias is
/// written straight into Redis, with no notice) is picked up by the
/// periodic refresh: the bound on how long a replica that missed a notice
/// answers the old version is one refresh interval.
#[tokio::test]
async fn a_missed_notice_is_made_up_by_the_next_refresh() {
    let redis = RedisServer::start();
    let store: Arc<dyn ServingStore> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let fixture = Fixture::new(store.clone());
    fixture.version(&lapsed(), 1, &["u1"]).await;
    fixture.version(&lapsed(), 2, &["u2"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    let api = Api::start(store.clone(), fixture.config(Gate::new(&fixture.base), Duration::from_millis(300)));
    api.wait_ready().await;
    assert_eq!(api.segments_of("u1").await, ["growth/lapsed@1"]);
    let written = segment_tests::redis_call(redis.port, &["HSET", "sg:aliases", "growth/lapsed", "2"]);
    assert!(written.is_some(), "the alias is written without a notice");
    api.eventually_segments("u2", &["growth/lapsed@2"]).await;
    assert!(api.segments_of("u1").await.is_empty());
}
