//! The serving API end to end: routes over versions written as result
//! files and sealed through the store traits, on the embedded store and on
//! a real `redis-server` (started by the harness), rollovers through
//! notices, failure and recovery, bad input, auth and metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use segment_core::api::SegmentKey;
use segment_core::store::{MemoryStore, Seal, SegmentStore};
use segment_serving::{
    connect_redis, metrics_router, router, AppState, ConnectionLimits, IndexOptions, ResultFiles, Server, ServerOptions,
    ServingConfig, ServingStore, Tokens,
};
use segment_store::redis::RedisStore;
use segment_tests::RedisServer;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Result files in a directory of the test's own: the versions' index
/// files the replica serves from.
struct Results {
    _dir: tempfile::TempDir,
    base: String,
}

impl Results {
    fn new() -> Results {
        let dir = tempfile::tempdir().unwrap();
        let base = format!("file://{}/", dir.path().display());
        Results { _dir: dir, base }
    }

    /// Long enough that only a notice (never the TTL or the periodic
    /// refresh) can make a rollover visible within a test.
    fn config(&self) -> ServingConfig {
        let index = IndexOptions::new(Arc::new(ResultFiles::new(self.base.clone())), "serving-test");
        ServingConfig {
            cache_ttl: Duration::from_secs(600),
            refresh_interval: Duration::from_secs(600),
            store_timeout: Duration::from_millis(500),
            ..ServingConfig::new(index)
        }
    }

    /// Writes the version's result files (and index) and seals it.
    async fn load(&self, store: &dyn ServingStore, segment: &SegmentKey, version: u64, members: &[&str]) {
        let mut ids = users(members);
        ids.sort();
        let uri = segment_core::naming::results_uri(&self.base, segment, version);
        segment_tests::write_result(&uri, segment, version, chrono::Utc::now(), &[ids.clone()]).await;
        let seal = Seal { members: ids.len() as u64, definition_hash: Some("hash".into()), ..Seal::default() };
        store.seal_with(segment, version, &seal).await.unwrap();
    }
}

/// `threads` serving threads on ports the system picks, with the default
/// connection limits.
fn options(threads: usize) -> ServerOptions {
    let any = "127.0.0.1:0".parse().unwrap();
    ServerOptions { listen: any, metrics_listen: any, threads, limits: ConnectionLimits::default() }
}

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn lapsed() -> SegmentKey {
    SegmentKey::new("growth", "lapsed")
}

fn vip() -> SegmentKey {
    SegmentKey::new("crm", "vip")
}

/// growth/lapsed: v1 {u1, u2} active, v2 {u2, u3} sealed; crm/vip: v1 {u1} active.
async fn fixture(store: &dyn ServingStore) -> Results {
    let results = Results::new();
    results.load(store, &lapsed(), 1, &["u1", "u2"]).await;
    results.load(store, &lapsed(), 2, &["u2", "u3"]).await;
    results.load(store, &vip(), 1, &["u1"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    store.activate(&vip(), 1).await.unwrap();
    results
}

struct Api {
    router: Router,
    state: AppState,
}

impl Api {
    async fn start(store: Arc<dyn ServingStore>, config: ServingConfig) -> Api {
        let state = AppState::new(store, config);
        let api = Api { router: router(state.clone()), state };
        api.wait_ready().await;
        api
    }

    async fn wait_ready(&self) {
        let start = Instant::now();
        while !self.state.is_ready() {
            assert!(start.elapsed() < Duration::from_secs(10), "serving never loaded the alias map");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        // Bounded, so a hanging request fails the test instead of stalling it.
        let response = tokio::time::timeout(Duration::from_secs(10), self.router.clone().oneshot(request))
            .await
            .expect("the request returns")
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Request::get(path).body(Body::empty()).unwrap()).await
    }

    /// `/metrics`, from the metrics port's router.
    async fn metrics(&self) -> String {
        let request = Request::get("/metrics").body(Body::empty()).unwrap();
        let response = metrics_router(self.state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        String::from_utf8(axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap().to_vec()).unwrap()
    }

    async fn get_as(&self, token: &str, path: &str) -> (StatusCode, Value) {
        self.send(Request::get(path).header("authorization", format!("Bearer {token}")).body(Body::empty()).unwrap()).await
    }

    async fn post(&self, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        self.send(Request::post(path).header("content-type", "application/json").body(body.into()).unwrap()).await
    }

    async fn check(&self, checks: Value) -> (StatusCode, Value) {
        self.post("/v1/membership:check", json!({ "checks": checks }).to_string()).await
    }

    async fn member(&self, segment: &SegmentKey, user: &str) -> (StatusCode, Value) {
        self.get(&format!("/v1/namespaces/{}/segments/{}/members/{user}", segment.namespace, segment.name)).await
    }

    /// Polls until `path` answers `expected`: rollovers arrive by notice,
    /// asynchronously, but within a bounded wait.
    async fn eventually(&self, path: &str, expected: Value) {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(path).await;
            if status == StatusCode::OK && body == expected {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{path}: still {status} {body}, expected {expected}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn segments(user: &str, list: &[(&str, &str, u64)]) -> Value {
    let segments: Vec<Value> = list.iter().map(|(ns, name, v)| json!({"namespace": ns, "name": name, "version": v})).collect();
    json!({ "user": user, "segments": segments })
}

/// Every route over the fixture, then a rollover and a rollback seen
/// through notices.
async fn routes_and_rollovers(store: Arc<dyn ServingStore>) {
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store.clone(), results.config()).await;

    let (status, body) = api.get("/v1/users/u1/segments").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, segments("u1", &[("crm", "vip", 1), ("growth", "lapsed", 1)]));
    assert_eq!(api.get("/v1/users/u1/segments?namespace=growth").await.1, segments("u1", &[("growth", "lapsed", 1)]));
    assert_eq!(api.get("/v1/users/u3/segments").await.1, segments("u3", &[]), "v2 is sealed but not active");
    assert_eq!(api.get("/v1/users/nobody/segments").await, (StatusCode::OK, segments("nobody", &[])));

    assert_eq!(api.member(&lapsed(), "u1").await, (StatusCode::OK, json!({"member": true, "version": 1})));
    assert_eq!(api.member(&lapsed(), "u3").await, (StatusCode::OK, json!({"member": false, "version": 1})));
    let (status, body) = api.member(&SegmentKey::new("growth", "nope"), "u1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("growth/nope"), "{body}");

    let (status, body) = api
        .check(json!([
            {"namespace": "growth", "segment": "lapsed", "user": "u1"},
            {"namespace": "growth", "segment": "lapsed", "user": "u3"},
            {"namespace": "crm", "segment": "vip", "user": "u2"},
            {"namespace": "crm", "segment": "vip", "user": "u1"},
        ]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let members: Vec<(bool, u64)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["member"].as_bool().unwrap(), r["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(members, [(true, 1), (false, 1), (false, 1), (true, 1)]);
    assert_eq!(body["results"][2], json!({"namespace": "crm", "segment": "vip", "user": "u2", "member": false, "version": 1}));

    let (status, body) = api.get("/v1/namespaces/growth/segments/lapsed").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["activeVersion"], 1);
    let versions: Vec<(u64, u64, bool)> = body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["members"].as_u64().unwrap(), v["active"].as_bool().unwrap()))
        .collect();
    assert_eq!(versions, [(1, 2, true), (2, 2, false)]);
    assert_eq!(body["versions"][0]["definitionHash"], "hash");
    let (status, body) = api.get("/v1/namespaces/growth/segments").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["namespace"], "growth");
    assert_eq!(body["segments"].as_array().unwrap().len(), 1);
    assert_eq!(body["segments"][0]["name"], "lapsed");
    assert_eq!(api.get("/v1/namespaces/empty/segments").await, (StatusCode::OK, json!({"namespace": "empty", "segments": []})));
    assert_eq!(api.get("/v1/namespaces/growth/segments/nope").await.0, StatusCode::NOT_FOUND);

    // Rollover to v2: the cached answers above must not outlive the notice
    // (the TTL and the periodic refresh are both ten minutes here).
    store.activate(&lapsed(), 2).await.unwrap();
    api.eventually("/v1/namespaces/growth/segments/lapsed/members/u3", json!({"member": true, "version": 2})).await;
    api.eventually("/v1/users/u3/segments", segments("u3", &[("growth", "lapsed", 2)])).await;
    api.eventually("/v1/users/u1/segments", segments("u1", &[("crm", "vip", 1)])).await;
    assert_eq!(api.get("/v1/users/u2/segments").await.1, segments("u2", &[("growth", "lapsed", 2)]));
    assert_eq!(api.member(&lapsed(), "u1").await.1, json!({"member": false, "version": 2}));
    assert_eq!(api.get("/v1/namespaces/growth/segments/lapsed").await.1["activeVersion"], 2);

    // Pinning back to v1 follows the alias, including for u2 (in both).
    store.activate(&lapsed(), 1).await.unwrap();
    api.eventually("/v1/users/u3/segments", segments("u3", &[])).await;
    api.eventually("/v1/users/u2/segments", segments("u2", &[("growth", "lapsed", 1)])).await;
    assert_eq!(api.get("/v1/users/u1/segments").await.1, segments("u1", &[("crm", "vip", 1), ("growth", "lapsed", 1)]));
    assert_eq!(api.member(&lapsed(), "u3").await.1, json!({"member": false, "version": 1}));

    // A user whose (empty) answer was cached before the new version was
    // even loaded: only the notice can make the new membership visible.
    assert_eq!(api.get("/v1/users/u4/segments").await.1, segments("u4", &[]));
    results.load(store.as_ref(), &lapsed(), 3, &["u4"]).await;
    assert_eq!(api.get("/v1/users/u4/segments").await.1, segments("u4", &[]), "cached, and v3 is not active");
    store.activate(&lapsed(), 3).await.unwrap();
    api.eventually("/v1/users/u4/segments", segments("u4", &[("growth", "lapsed", 3)])).await;
    store.activate(&lapsed(), 1).await.unwrap();
    api.eventually("/v1/users/u4/segments", segments("u4", &[])).await;

    // Deleting the segment clears its alias: readers get a 404.
    store.delete_segment(&vip()).await.unwrap();
    let start = Instant::now();
    while api.member(&vip(), "u1").await.0 != StatusCode::NOT_FOUND {
        assert!(start.elapsed() < Duration::from_secs(10), "the deleted segment is still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(api.get("/v1/users/u1/segments").await.1, segments("u1", &[("growth", "lapsed", 1)]));
}

#[tokio::test]
async fn routes_and_rollovers_on_the_embedded_store() {
    routes_and_rollovers(Arc::new(MemoryStore::new())).await;
}

/// Many segments, activated out of order: the users answer and the listing
/// come sorted by namespace and name whatever order the alias map holds.
#[tokio::test]
async fn answers_are_sorted_by_namespace_and_name() {
    let store: Arc<dyn ServingStore> = Arc::new(MemoryStore::new());
    let results = Results::new();
    let names = ["m", "c", "x", "a", "q", "f", "z", "b", "k", "t", "d", "s"];
    for (i, name) in names.iter().enumerate() {
        let segment = SegmentKey::new(if i % 2 == 0 { "ns-b" } else { "ns-a" }, *name);
        results.load(store.as_ref(), &segment, 1, &["u1"]).await;
        store.activate(&segment, 1).await.unwrap();
    }
    let api = Api::start(store, results.config()).await;
    let mut expected: Vec<(&str, &str, u64)> =
        names.iter().enumerate().map(|(i, name)| (if i % 2 == 0 { "ns-b" } else { "ns-a" }, *name, 1)).collect();
    expected.sort();
    assert_eq!(api.get("/v1/users/u1/segments").await.1, segments("u1", &expected));
    let listed = api.get("/v1/namespaces/ns-a/segments").await.1;
    let listed: Vec<&str> = listed["segments"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    let in_ns_a: Vec<&str> = expected.iter().filter(|(ns, _, _)| *ns == "ns-a").map(|(_, name, _)| *name).collect();
    assert_eq!(listed, in_ns_a);
}

#[tokio::test]
async fn routes_and_rollovers_on_redis() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    routes_and_rollovers(Arc::new(store)).await;
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let results = Results::new();
    let api = Api::start(Arc::new(MemoryStore::new()), results.config()).await;
    let (status, document) = api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let paths = document["paths"].as_object().unwrap();
    let expected = [
        ("/v1/users/{user}/segments", "get"),
        ("/v1/namespaces/{namespace}/segments/{name}/members/{user}", "get"),
        ("/v1/membership:check", "post"),
        ("/v1/namespaces/{namespace}/segments", "get"),
        ("/v1/namespaces/{namespace}/segments/{name}", "get"),
        ("/openapi.json", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ];
    for (path, method) in expected {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing from {:?}", paths.keys());
    }
    assert_eq!(paths.len(), expected.len(), "undocumented extras: {:?}", paths.keys());
    for schema in ["UserSegments", "Membership", "CheckRequest", "CheckResponse", "SegmentInfo", "SegmentList", "ErrorBody"] {
        assert!(document["components"]["schemas"].get(schema).is_some(), "schema {schema} missing");
    }
    assert_eq!(document, serde_json::to_value(segment_serving::openapi()).unwrap(), "served as generated");
}

/// Answers come from the versions held in memory: with Redis gone they
/// keep coming; only what needs the store (a segment's version listing
/// not cached) gets a 503.
#[tokio::test]
async fn redis_down_answers_from_memory_and_503s_version_listings() {
    let redis = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store, results.config()).await;
    assert_eq!(api.member(&lapsed(), "u1").await, (StatusCode::OK, json!({"member": true, "version": 1})));

    drop(redis);

    assert_eq!(api.member(&lapsed(), "u2").await, (StatusCode::OK, json!({"member": true, "version": 1})), "never asked before");
    assert_eq!(api.get("/v1/users/u1/segments").await.1, segments("u1", &[("crm", "vip", 1), ("growth", "lapsed", 1)]));
    let (status, body) = api.check(json!([{"namespace": "growth", "segment": "lapsed", "user": "u9"}])).await;
    assert_eq!((status, &body["results"][0]["member"]), (StatusCode::OK, &json!(false)), "{body}");
    let (status, body) = api.get("/v1/namespaces/growth/segments/lapsed").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "StoreUnavailable");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    // Still alive, and still ready: the versions held are intact.
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
    let metrics = api.metrics().await;
    assert!(metrics.contains("segment_serving_store_errors_total{operation=\"versions\",kind=\"unavailable\"}"), "{metrics}");
}

/// A Redis that lost its state (flushed, or replaced by an empty one) is
/// not read as "nobody is in any segment": every read answers 503 until
/// the state is back (here: rebuilt, which starts a new epoch).
#[tokio::test]
async fn a_redis_that_lost_its_state_gets_503s_until_it_is_rebuilt() {
    let redis = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store.clone(), results.config()).await;
    assert_eq!(api.member(&lapsed(), "u1").await, (StatusCode::OK, json!({"member": true, "version": 1})));

    let flushed = segment_tests::redis_call(redis.port, &["FLUSHALL"]).and_then(|r| r.text());
    assert_eq!(flushed.as_deref(), Some("OK"));
    api.state.refresh_aliases().await.unwrap();
    for (path, what) in [
        ("/v1/namespaces/growth/segments/lapsed/members/u9", "is-member"),
        ("/v1/users/u9/segments", "a user's segments"),
        ("/v1/namespaces/growth/segments/lapsed", "a segment's versions"),
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("lost its state")), "{what}: {body}");
    }
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK, "still ready: the other replicas are in the same state");

    // Rebuilt with other members under the same version number: nothing
    // cached from before the loss is served.
    results.load(store.as_ref(), &lapsed(), 1, &["u2", "u9"]).await;
    store.activate(&lapsed(), 1).await.unwrap();
    api.state.refresh_aliases().await.unwrap();
    assert_eq!(api.member(&lapsed(), "u1").await, (StatusCode::OK, json!({"member": false, "version": 1})));
    assert_eq!(api.member(&lapsed(), "u9").await, (StatusCode::OK, json!({"member": true, "version": 1})));
}

#[tokio::test]
async fn recovers_when_the_store_comes_back() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store.clone(), results.config()).await;
    assert_eq!(api.member(&lapsed(), "u1").await.0, StatusCode::OK);

    store.set_unavailable(true);
    assert_eq!(api.member(&lapsed(), "u2").await, (StatusCode::OK, json!({"member": true, "version": 1})), "from memory");
    let (status, body) = api.get("/v1/namespaces/crm/segments/vip").await;
    assert_eq!((status, &body["reason"]), (StatusCode::SERVICE_UNAVAILABLE, &json!("StoreUnavailable")));

    store.set_unavailable(false);
    assert_eq!(api.get("/v1/namespaces/crm/segments/vip").await.0, StatusCode::OK);
    // The feed was lost with the store: notices flow again once serving
    // has re-subscribed on its own.
    store.activate(&lapsed(), 2).await.unwrap();
    api.eventually("/v1/namespaces/growth/segments/lapsed/members/u3", json!({"member": true, "version": 2})).await;
}

#[tokio::test]
async fn ready_only_once_the_alias_map_was_loaded() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    store.set_unavailable(true);
    let state = AppState::new(store.clone(), results.config());
    let api = Api { router: router(state.clone()), state };
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    store.set_unavailable(false);
    api.wait_ready().await;
    assert_eq!(api.get("/readyz").await.0, StatusCode::OK);
    assert_eq!(api.member(&lapsed(), "u1").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_gets_4xx_naming_the_field() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store, ServingConfig { max_checks: 3, ..results.config() }).await;
    let field = |(status, body): (StatusCode, Value)| (status, body["field"].as_str().unwrap_or_default().to_string());
    let bad = |f: &str| (StatusCode::BAD_REQUEST, f.to_string());

    let long = "x".repeat(257);
    assert_eq!(field(api.get(&format!("/v1/users/{long}/segments")).await), bad("user"));
    assert_eq!(field(api.member(&lapsed(), &long).await), bad("user"));
    assert_eq!(api.get(&format!("/v1/users/{}/segments", "x".repeat(256))).await.0, StatusCode::OK, "256 bytes is fine");
    assert_eq!(field(api.get("/v1/users/u1/segments?namespace=").await), bad("namespace"));
    assert!(api.get("/v1/users//segments").await.0.is_client_error());

    let one = |user: &str| json!({"namespace": "growth", "segment": "lapsed", "user": user});
    assert_eq!(field(api.check(json!([one("u1"), one("")])).await), bad("checks[1].user"));
    assert_eq!(field(api.check(json!([one(&long)])).await), bad("checks[0].user"));
    assert_eq!(field(api.check(json!([one("a"), one("b"), one("c"), one("d")])).await), bad("checks"));
    let unknown = json!([{"namespace": "growth", "segment": "nope", "user": "u1"}]);
    let (status, body) = api.check(unknown).await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::NOT_FOUND, Some("checks[0].segment")));
    assert!(body["error"].as_str().unwrap().contains("growth/nope"), "{body}");

    let (status, body) = api.post("/v1/membership:check", "{not json").await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("body")), "{body}");
    let (status, body) = api.post("/v1/membership:check", r#"{"checks": [{"namespace": "growth", "user": "u1"}]}"#).await;
    assert_eq!(status.as_u16() / 100, 4);
    assert!(body["error"].as_str().unwrap().contains("segment"), "names the missing field: {body}");
    let (status, body) = api.send(Request::post("/v1/membership:check").body(Body::from("{}")).unwrap()).await;
    assert!(status.is_client_error(), "no content type: {status} {body}");
    assert_eq!(body["field"], "body");
    assert_eq!(api.check(json!([])).await, (StatusCode::OK, json!({"results": []})));

    // A body longer than the most checks allowed can take is refused
    // before it is read whole; one just under the limit is read.
    let limit = segment_serving::max_body_bytes(3);
    // JSON whitespace pads the body to a length.
    let padded = |len: usize| format!(r#"{{"checks": []{}}}"#, " ".repeat(len - 14));
    assert_eq!(padded(limit).len(), limit);
    let (status, body) = api.post("/v1/membership:check", padded(limit + 1)).await;
    assert_eq!(
        (status, body["reason"].as_str(), body["field"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("PayloadTooLarge"), Some("body"))
    );
    assert!(body["error"].as_str().unwrap().contains(&limit.to_string()), "names the limit: {body}");
    let (status, body) = api.post("/v1/membership:check", padded(limit)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn bearer_tokens_scope_namespaces() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let growth_only: &[&str] = &["growth"];
    let everything: &[&str] = &["*"];
    let tokens = Tokens::from_entries([("admin-token", everything), ("growth-token", growth_only)]);
    let api = Api::start(store, ServingConfig { tokens: Some(tokens), ..results.config() }).await;

    let (status, body) = api.get("/v1/users/u1/segments").await;
    assert_eq!((status, &body["reason"]), (StatusCode::UNAUTHORIZED, &json!("Unauthorized")));
    assert_eq!(api.get_as("wrong", "/v1/users/u1/segments").await.0, StatusCode::UNAUTHORIZED);

    let all = segments("u1", &[("crm", "vip", 1), ("growth", "lapsed", 1)]);
    assert_eq!(api.get_as("admin-token", "/v1/users/u1/segments").await, (StatusCode::OK, all));
    assert_eq!(
        api.get_as("growth-token", "/v1/users/u1/segments").await,
        (StatusCode::OK, segments("u1", &[("growth", "lapsed", 1)])),
        "filtered to allowed namespaces"
    );
    let (status, body) = api.get_as("growth-token", "/v1/users/u1/segments?namespace=crm").await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::FORBIDDEN, Some("namespace")));
    assert_eq!(api.get_as("growth-token", "/v1/namespaces/crm/segments/vip/members/u1").await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get_as("growth-token", "/v1/namespaces/crm/segments/nope/members/u1").await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get_as("growth-token", "/v1/namespaces/crm/segments").await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get_as("growth-token", "/v1/namespaces/growth/segments/lapsed/members/u1").await.0, StatusCode::OK);
    let checks = json!({"checks": [
        {"namespace": "growth", "segment": "lapsed", "user": "u1"},
        {"namespace": "crm", "segment": "vip", "user": "u1"},
    ]});
    let request = Request::post("/v1/membership:check")
        .header("authorization", "Bearer growth-token")
        .header("content-type", "application/json")
        .body(Body::from(checks.to_string()))
        .unwrap();
    let (status, body) = api.send(request).await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::FORBIDDEN, Some("checks[1].namespace")));

    // Probes and the document stay open; the metrics are on their own port.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(api.get(path).await.0, StatusCode::OK, "{path}");
    }
    assert_eq!(api.get("/metrics").await.0, StatusCode::NOT_FOUND, "not on the API port");
}

#[tokio::test]
async fn tokens_file_in_yaml_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("tokens.yaml");
    std::fs::write(&yaml, "t-admin: ['*']\nt-growth:\n  - growth\n").unwrap();
    let json = dir.path().join("tokens.json");
    std::fs::write(&json, r#"{"t-admin": ["*"], "t-growth": ["growth"]}"#).unwrap();
    assert_eq!(Tokens::load(&yaml).unwrap(), Tokens::load(&json).unwrap());
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "t-admin: '*'\n").unwrap();
    let error = Tokens::load(&broken).unwrap_err().to_string();
    assert!(error.contains("broken.yaml"), "{error}");
    assert!(Tokens::load(&dir.path().join("missing")).is_err());
}

#[tokio::test]
async fn metrics_count_requests_and_what_is_held() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let api = Api::start(store, results.config()).await;
    for _ in 0..3 {
        assert_eq!(api.member(&lapsed(), "u1").await.0, StatusCode::OK);
    }
    assert_eq!(api.member(&lapsed(), &"x".repeat(300)).await.0, StatusCode::BAD_REQUEST);
    api.get("/v1/users/u1/segments").await;
    api.get("/v1/users/u1/segments").await;
    let text = api.metrics().await;
    let route = "/v1/namespaces/{namespace}/segments/{name}/members/{user}";
    for line in [
        format!("segment_serving_http_requests_total{{route=\"{route}\",method=\"GET\",code=\"200\"}} 3"),
        format!("segment_serving_http_requests_total{{route=\"{route}\",method=\"GET\",code=\"400\"}} 1"),
        format!("segment_serving_http_request_duration_seconds_count{{route=\"{route}\"}} 4"),
        // lapsed v1 {u1, u2} and vip v1 {u1}; lapsed v2 is not held.
        "segment_serving_index_memberships 3".to_string(),
        "segment_serving_index_load_seconds_count 2".to_string(),
    ] {
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
}

/// One request over a fresh TCP connection (`connection: close`, so
/// consecutive requests may land on different serving threads):
/// (status code, body).
async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response =
        tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("answered in time").expect("an HTTP exchange");
    let status = response.get(9..12).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (status, body)
}

async fn eventually_over_tcp(address: std::net::SocketAddr, path: &str, expected: &Value) {
    let start = Instant::now();
    loop {
        let (status, body) = http_get(address, path).await;
        if status == 200 && serde_json::from_str::<Value>(&body).ok().as_ref() == Some(expected) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{path}: still {status} {body}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn redis_clients(port: u16) -> usize {
    let out = std::process::Command::new("redis-cli").args(["-p", &port.to_string(), "CLIENT", "LIST"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" cmd=") && !l.contains("cmd=client")).count()
}

/// The binary's way of serving: threads with a Redis connection each,
/// sharing the alias map and caches, so a rollover reaches every thread.
#[tokio::test]
async fn server_threads_read_through_their_own_connections_and_share_rollovers() {
    let redis = RedisServer::start();
    let admin = RedisStore::connect(&redis.url()).await.unwrap();
    let results = fixture(&admin).await;
    let url = redis.url();
    let connect = move || {
        let url = url.clone();
        async move { connect_redis(&url).await }
    };
    let before = redis_clients(redis.port);
    let server = Server::start(options(3), results.config(), connect).unwrap();
    let address = server.address();
    let u2 = |version| segments("u2", &[("growth", "lapsed", version)]);
    // Many connections, so every thread answers some of them.
    for _ in 0..30 {
        eventually_over_tcp(address, "/v1/users/u2/segments", &u2(1)).await;
    }
    // Three command connections (one per thread) and the notice feed.
    let start = Instant::now();
    while redis_clients(redis.port) - before != 4 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} new Redis clients, expected 3 threads and the feed",
            redis_clients(redis.port) - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.activate(&lapsed(), 2).await.unwrap();
    for _ in 0..30 {
        eventually_over_tcp(address, "/v1/users/u2/segments", &u2(2)).await;
        eventually_over_tcp(address, "/v1/users/u1/segments", &segments("u1", &[("crm", "vip", 1)])).await;
    }
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().expect("a clean shutdown");
    assert!(tokio::net::TcpStream::connect(address).await.is_err(), "nothing listens after shutdown");
}

/// A pod may start before its Redis: the server keeps connecting with
/// backoff, serves once connected, and stops on request either way.
#[tokio::test]
async fn server_retries_the_store_until_it_answers_and_stops_on_request() {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counted, shared) = (attempts.clone(), store.clone());
    let connect = move || {
        let (attempt, store) = (counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst), shared.clone());
        async move {
            if attempt < 2 {
                Err(segment_core::store::StoreError::Unavailable("not yet".into()))
            } else {
                Ok(store as Arc<dyn ServingStore>)
            }
        }
    };
    let server = Server::start(options(1), results.config(), connect).unwrap();
    eventually_over_tcp(
        server.address(),
        "/v1/namespaces/growth/segments/lapsed/members/u1",
        &json!({"member": true, "version": 1}),
    )
    .await;
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3, "two failures, then connected");
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().expect("a clean shutdown");

    // Never connected, a connection attempt that hangs (an unreachable
    // host): shutting down interrupts it instead of waiting for it.
    let hanging = || std::future::pending::<Result<Arc<dyn ServingStore>, segment_core::store::StoreError>>();
    let server = Server::start(options(2), results.config(), hanging).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // On a thread of its own, so a shutdown that hangs fails the test
    // instead of stalling it.
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(server.shutdown()));
    stopped.recv_timeout(Duration::from_secs(10)).expect("shutdown does not wait for the store").expect("a clean shutdown");
}

/// A Redis that stops answering (here `CLIENT PAUSE`) gets a 503 within
/// serving's store timeout, which is the only deadline on the binary's
/// reads (`connect_redis` gives the store none of its own).
#[tokio::test]
async fn a_stalled_redis_gets_a_503_within_the_store_timeout() {
    let redis = RedisServer::start();
    let store = connect_redis(&redis.url()).await.unwrap();
    let results = fixture(store.as_ref()).await;
    let config = ServingConfig { store_timeout: Duration::from_millis(300), ..results.config() };
    let api = Api::start(store, config).await;
    assert_eq!(api.get("/v1/namespaces/crm/segments/vip").await.0, StatusCode::OK);
    let paused = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "CLIENT", "PAUSE", "3000", "ALL"])
        .output()
        .unwrap();
    assert!(paused.status.success(), "{paused:?}");
    let (status, body) = api.get("/v1/namespaces/growth/segments/lapsed").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("within 300ms")), "serving's own deadline: {body}");
    assert_eq!(api.member(&lapsed(), "u2").await.0, StatusCode::OK, "memberships need no store");
}

/// Two servers cannot take one port (no SO_REUSEPORT sharing by surprise).
#[tokio::test]
async fn server_refuses_a_port_in_use() {
    let results = Results::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let never = || async { Err::<Arc<dyn ServingStore>, _>(segment_core::store::StoreError::Unavailable("down".into())) };
    let error = Server::start(ServerOptions { listen: taken.local_addr().unwrap(), ..options(1) }, results.config(), never)
        .err()
        .expect("the port is taken");
    assert!(error.to_string().starts_with("listening on 127.0.0.1:"), "{error}");
}

/// A server of `threads` threads with these limits over the fixture, once
/// it answers.
async fn limited_server(threads: usize, limits: ConnectionLimits) -> (Server, Results) {
    let store = Arc::new(MemoryStore::new());
    let results = fixture(store.as_ref()).await;
    let connect = move || {
        let store = store.clone();
        async move { Ok(store as Arc<dyn ServingStore>) }
    };
    let server = Server::start(ServerOptions { limits, ..options(threads) }, results.config(), connect).unwrap();
    let member = json!({"member": true, "version": 1});
    eventually_over_tcp(server.address(), "/v1/namespaces/growth/segments/lapsed/members/u1", &member).await;
    (server, results)
}

/// One request on a kept-alive connection: its status code, once the
/// whole answer (`content-length` bytes of body) is read.
async fn exchange(stream: &mut tokio::net::TcpStream, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        response.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&response).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(head.get(9..12).and_then(|code| code.parse().ok()).unwrap_or(0));
            }
        }
    }
}

/// Whether the server closed `stream` (a read ends or fails) within `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(limit, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

/// A gauge or counter of serving's `/metrics`, read over its own port.
async fn metric(server: &Server, name: &str) -> f64 {
    let (status, text) = http_get(server.metrics_address(), "/metrics").await;
    assert_eq!(status, 200);
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `/metrics` answers on the metrics port only, and the API only on its
/// own: a network policy can then admit scrapers and API clients apart.
#[tokio::test]
async fn the_metrics_have_a_port_of_their_own() {
    let (server, _results) = limited_server(2, ConnectionLimits::default()).await;
    let (status, text) = http_get(server.metrics_address(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("segment_serving_http_requests_total{route=\"/v1/namespaces/{namespace}/segments/{name}/members/{user}\""),
        "{text}"
    );
    assert_eq!(http_get(server.address(), "/metrics").await.0, 404, "no metrics on the API port");
    assert_eq!(http_get(server.metrics_address(), "/v1/users/u1/segments").await.0, 404, "no API on the metrics port");
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().unwrap();
}

/// The header-read timeout counts from a request's first byte: a client
/// trickling its headers is cut off, while one that is quiet for longer
/// than that and then sends its request whole is answered.
#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let (server, _results) = limited_server(1, limits).await;

    let mut quiet = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(exchange(&mut quiet, "/healthz").await.unwrap(), 200, "a quiet client's whole request is answered");

    let mut trickling = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut cut_off = false;
    for header in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if trickling.write_all(format!("x-{header}: 1\r\n").as_bytes()).await.is_err()
            || closed_within(&mut trickling, Duration::from_millis(1)).await
        {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "ten seconds of trickled headers were still read");
    assert_eq!(metric(&server, "segment_serving_connection_timeouts_total").await, 1.0);
    assert_eq!(exchange(&mut quiet, "/healthz").await.unwrap(), 200, "the quiet client's connection is still served");
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().unwrap();
}

/// A kept-alive connection that sends nothing for the idle timeout is
/// closed; one that keeps sending requests is kept across many times it.
#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let limits = ConnectionLimits {
        idle_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let (server, _results) = limited_server(1, limits).await;

    let mut idle = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    assert_eq!(exchange(&mut idle, "/healthz").await.unwrap(), 200);
    let mut busy = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        assert_eq!(exchange(&mut busy, "/healthz").await.expect("a busy connection stays open"), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed_within(&mut idle, Duration::from_secs(10)).await, "the idle connection is closed");
    assert_eq!(metric(&server, "segment_serving_connection_timeouts_total").await, 1.0);
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().unwrap();
}

/// Past `max_connections` (over every thread) a new connection waits in
/// the listen backlog, unanswered, until one of the open ones closes.
#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_one() {
    let limits = ConnectionLimits { max_connections: 2, ..Default::default() };
    let (server, _results) = limited_server(2, limits).await;
    let mut first = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    assert_eq!(exchange(&mut first, "/healthz").await.unwrap(), 200);
    let mut second = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    assert_eq!(exchange(&mut second, "/healthz").await.unwrap(), 200);
    assert_eq!(metric(&server, "segment_serving_open_connections").await, 2.0);

    let mut third = tokio::net::TcpStream::connect(server.address()).await.expect("the backlog takes it");
    let waiting = tokio::time::timeout(Duration::from_millis(500), exchange(&mut third, "/healthz")).await;
    assert!(waiting.is_err(), "answered past the limit: {waiting:?}");
    drop(first);
    let answered = tokio::time::timeout(Duration::from_secs(10), exchange(&mut third, "/healthz")).await;
    assert_eq!(answered.expect("answered once a connection closed").unwrap(), 200);
    assert_eq!(exchange(&mut second, "/healthz").await.unwrap(), 200);
    assert_eq!(metric(&server, "segment_serving_open_connections").await, 2.0);
    tokio::task::spawn_blocking(move || server.shutdown()).await.unwrap().unwrap();
}
