//! `segment-worker realtime` against a real Kafka-protocol broker (tansu)
//! and a real Redis, both started by the harness: include/exclude reach the
//! store and survive the next rollover, bad messages go to the dead-letter
//! topic while the worker keeps going, a partition held up by its store
//! calls does not hold up the others, each rollover's changes are
//! published once, computed from the versions' index files (the store
//! holds no member of those versions), an index file unreadable for now is
//! retried and one that can never be read gives up on its rollovers, and a
//! worker killed mid-stream loses and duplicates nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::AsyncFnMut;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use segment_core::api::SegmentKey;
use segment_core::index::INDEX_FILE;
use segment_core::naming::results_uri;
use segment_core::store::{
    IndexSource, MembershipReader, MemoryStore, Override, OverrideOp, RolloverFeed, Seal, SegmentStore, StoreError,
};
use segment_runtime::probes::Probe;
use segment_store::redis::RedisStore;
use segment_store::results::ResultFiles;
use segment_tests::{as_before_index_files, KafkaBroker, RedisServer};
use segment_worker::realtime::changes::ChangeEvent;
use segment_worker::realtime::kafka::{self, KafkaSettings, RealtimeConfig, DEFAULT_MAX_CLOCK_SKEW, ERROR_HEADER, REASON_HEADER};
use segment_worker::realtime::metrics::Metrics;
use serde_json::json;
use tokio::sync::watch;

const MEMBERSHIP: &str = "segment-membership";
const DEAD_LETTERS: &str = "segment-membership-dlq";
const CHANGES: &str = "segment-changes";
/// How long anything asynchronous may take before a test gives up.
const PATIENCE: Duration = Duration::from_secs(60);

fn users(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:05}")).collect()
}

struct Setup {
    broker: KafkaBroker,
    redis: RedisServer,
    store: Arc<RedisStore>,
    segment: SegmentKey,
    results: tempfile::TempDir,
}

/// A broker with the three topics (the membership topic in 3 partitions).
async fn start_broker() -> KafkaBroker {
    let broker = KafkaBroker::start();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.brokers()).create().expect("an admin client");
    let topics = [(MEMBERSHIP, 3), (DEAD_LETTERS, 1), (CHANGES, 3)]
        .map(|(name, partitions)| NewTopic::new(name, partitions, TopicReplication::Fixed(1)));
    for result in admin.create_topics(&topics, &AdminOptions::new()).await.expect("topics created") {
        result.expect("topic created");
    }
    broker
}

fn worker_config(broker: &KafkaBroker, holder: &str) -> RealtimeConfig {
    RealtimeConfig {
        kafka: KafkaSettings { brokers: broker.brokers(), ..Default::default() },
        membership_topic: MEMBERSHIP.into(),
        dead_letter_topic: DEAD_LETTERS.into(),
        changes_topic: CHANGES.into(),
        group_id: "segment-realtime".into(),
        holder: holder.into(),
        claim_lease: Duration::from_secs(30),
        resync_interval: Duration::from_millis(200),
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
    }
}

/// Runs a worker on `store` in this process, reading index files from
/// `index`, until the returned sender says stop.
fn spawn_worker<S>(
    config: RealtimeConfig,
    store: Arc<S>,
    index: Arc<dyn IndexSource>,
) -> (watch::Sender<bool>, Arc<Metrics>, tokio::task::JoinHandle<()>)
where
    S: SegmentStore + MembershipReader + RolloverFeed + 'static,
{
    let (stop, shutdown) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(kafka::run(config, store, index, metrics.clone(), shutdown));
    let handle = tokio::spawn(async move { task.await.unwrap().expect("the worker runs") });
    (stop, metrics, handle)
}

/// The value of a counter without labels.
fn counter(metrics: &Metrics, name: &str) -> u64 {
    let text = metrics.encode();
    let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
    value.unwrap_or_else(|| panic!("no counter {name}: {text}"))
}

/// Waits until `done` holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < PATIENCE, "waited in vain for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Setup {
    /// A broker with the three topics, and `members` served as v1,
    /// computed two hours ago.
    async fn start(members: Vec<String>) -> Setup {
        Setup::start_at(members, Utc::now() - chrono::Duration::hours(2)).await
    }

    /// [`Setup::start`] with v1 computed at `snapshot`.
    async fn start_at(members: Vec<String>, snapshot: DateTime<Utc>) -> Setup {
        let setup = Setup::empty().await;
        setup.computed(1, snapshot, members).await;
        setup.store.activate(&setup.segment, 1).await.unwrap();
        setup
    }

    /// A broker with the three topics and an empty Redis.
    async fn empty() -> Setup {
        let broker = start_broker().await;
        let redis = RedisServer::start();
        let store = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
        Setup { broker, redis, store, segment: SegmentKey::new("growth", "vip"), results: tempfile::tempdir().unwrap() }
    }

    /// The results base (the operator's `--results-uri`) the versions'
    /// files are written under.
    fn results_base(&self) -> String {
        format!("file://{}", self.results.path().display())
    }

    /// Where the worker reads the versions' index files.
    fn index(&self) -> Arc<dyn IndexSource> {
        Arc::new(ResultFiles::new(self.results_base()))
    }

    /// Writes a version's result files (its index file among them) where
    /// compute does.
    async fn write_result(&self, version: u64, snapshot: DateTime<Utc>, members: Vec<String>) -> String {
        let uri = results_uri(&self.results_base(), &self.segment, version);
        segment_tests::write_result(&uri, &self.segment, version, snapshot, &[members]).await;
        uri
    }

    /// A computed version: its result files are written and it is sealed
    /// in the store with no member loaded there, so only its index file
    /// says who its members are. Not activated.
    async fn computed(&self, version: u64, snapshot: DateTime<Utc>, members: Vec<String>) {
        self.write_result(version, snapshot, members).await;
        let seal = Seal { snapshot_time: Some(snapshot), overrides_from: Some(snapshot), ..Seal::default() };
        self.store.seal_with(&self.segment, version, &seal).await.expect("sealed");
    }

    /// Runs a worker in this process until the returned sender says stop.
    fn run_worker(&self, holder: &str) -> (watch::Sender<bool>, Arc<Metrics>, tokio::task::JoinHandle<()>) {
        spawn_worker(worker_config(&self.broker, holder), self.store.clone(), self.index())
    }

    fn producer(&self) -> FutureProducer {
        KafkaSettings { brokers: self.broker.brokers(), ..Default::default() }.producer().unwrap()
    }

    /// The members among `candidates` as serving answers: the active
    /// version's index file, with the overrides recorded after its lake
    /// data (`overridesFrom`) on top.
    async fn served(&self, candidates: &[String]) -> BTreeSet<String> {
        let version = self.store.active_version(&self.segment).await.unwrap().expect("an active version");
        let versions = self.store.versions(&self.segment).await.unwrap();
        let since = versions[&version].reflects_events_until().unwrap_or(DateTime::UNIX_EPOCH);
        let ids = self.index().fetch(&self.segment, version).await.unwrap();
        let overrides: BTreeMap<String, Override> =
            self.store.overrides_since(&self.segment, since).await.unwrap().into_iter().map(|o| (o.user.clone(), o)).collect();
        let member = |user: &String| match overrides.get(user) {
            Some(change) => change.op == OverrideOp::Include,
            None => ids.contains(user),
        };
        candidates.iter().filter(|user| member(user)).cloned().collect()
    }

    /// Waits until the served members among `candidates` are `expected`.
    async fn wait_served(&self, candidates: &[String], expected: &BTreeSet<String>) {
        let start = Instant::now();
        loop {
            let served = self.served(candidates).await;
            if &served == expected {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "served {served:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn event(user: &str, op: &str, ts: DateTime<Utc>, id: &str) -> String {
    json!({"segment": "growth/vip", "user": user, "op": op, "ts": ts.to_rfc3339(), "id": id}).to_string()
}

async fn send(producer: &FutureProducer, topic: &str, key: Option<&str>, payload: &str) {
    let mut record = FutureRecord::<str, str>::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer.send(record, Timeout::After(Duration::from_secs(30))).await.map_err(|(e, _)| e).expect("produced");
}

/// Produces an event of `user` (the key) to one partition of the membership topic.
async fn send_to(producer: &FutureProducer, partition: i32, user: &str, payload: &str) {
    let record = FutureRecord::<str, str>::to(MEMBERSHIP).partition(partition).key(user).payload(payload);
    producer.send(record, Timeout::After(Duration::from_secs(30))).await.map_err(|(e, _)| e).expect("produced");
}

/// Reads `topic` from the start until `count` messages arrived, then a
/// little longer so that extra (duplicate) messages would show too.
async fn read_topic(brokers: &str, topic: &str, count: usize) -> Vec<(Option<String>, String, BTreeMap<String, String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    let mut done_at: Option<Instant> = None;
    loop {
        let limit = match done_at {
            Some(at) if at.elapsed() > Duration::from_secs(2) => return out,
            Some(_) => Duration::from_millis(500),
            None => PATIENCE.saturating_sub(start.elapsed()),
        };
        match tokio::time::timeout(limit, consumer.recv()).await {
            Ok(Ok(message)) => {
                let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((key, value, headers));
                if out.len() >= count && done_at.is_none() {
                    done_at = Some(Instant::now());
                }
            }
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) if done_at.is_some() => {}
            Err(_) => panic!("only {} of {count} messages arrived on {topic}: {out:?}", out.len()),
        }
    }
}

fn rand_suffix() -> u64 {
    Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_and_exclude_reach_the_store_and_survive_the_rollover() {
    let setup = Setup::start(users("u", 0..10)).await;
    let (stop, metrics, worker) = setup.run_worker("w1");
    let producer = setup.producer();
    let now = Utc::now();
    send(&producer, MEMBERSHIP, Some("new-1"), &event("new-1", "include", now, "e1")).await;
    send(&producer, MEMBERSHIP, Some("u-00003"), &event("u-00003", "exclude", now, "e2")).await;
    // Redelivered: changes nothing.
    send(&producer, MEMBERSHIP, Some("new-1"), &event("new-1", "include", now, "e1")).await;

    let mut candidates = users("u", 0..10);
    candidates.push("new-1".into());
    let mut expected: BTreeSet<String> = users("u", 0..10).into_iter().collect();
    expected.insert("new-1".into());
    expected.remove("u-00003");
    setup.wait_served(&candidates, &expected).await;

    // The next version was computed before the events (snapshot an hour
    // ago) and knows neither: both were recorded after its lake data, so
    // both count for it too.
    setup.computed(2, now - chrono::Duration::hours(1), users("u", 0..10)).await;
    setup.store.activate(&setup.segment, 2).await.unwrap();
    assert_eq!(setup.served(&candidates).await, expected, "overrides survive the rollover");

    stop.send(true).unwrap();
    worker.await.unwrap();
    let text = metrics.encode();
    assert!(text.contains("segment_realtime_messages_total{outcome=\"applied\"} 2"), "{text}");
    assert!(text.contains("segment_realtime_messages_total{outcome=\"unchanged\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_go_to_the_dead_letter_topic_and_the_worker_keeps_going() {
    let setup = Setup::start(users("u", 0..3)).await;
    // A stored override Redis cannot decode: every write of this user's
    // overrides fails with a script error, which no retry fixes.
    let corrupt = segment_tests::redis_call(setup.redis.port, &["HSET", "sg:{growth/vip}:ov", "poison", "not an override"]);
    assert!(matches!(corrupt, Some(segment_tests::Resp::Int(1))), "the override is corrupted: {corrupt:?}");
    let (stop, metrics, worker) = setup.run_worker("w1");
    let producer = setup.producer();
    let now = Utc::now();
    let bad = [
        (Some("u-1"), "{\"segment\": ".to_string(), "malformed_json"),
        (Some("u-1"), json!({"segment": "growth/vip", "user": "u-1", "op": "include", "id": "x"}).to_string(), "missing_field"),
        (Some("u-1"), event("u-1", "toggle", now, "x"), "invalid_field"),
        (Some("u-1"), event("u-1", "include", now, "x").replace("growth/vip", "growth/nope"), "unknown_segment"),
        (Some("someone-else"), event("u-1", "include", now, "x"), "key_mismatch"),
        (Some("u-1"), event("u-1", "include", now + chrono::Duration::days(1), "x"), "future_timestamp"),
        (Some("poison"), event("poison", "include", now, "x"), "store_error"),
    ];
    for (key, payload, _) in &bad {
        send(&producer, MEMBERSHIP, *key, payload).await;
    }
    send(&producer, MEMBERSHIP, Some("late"), &event("late", "include", now, "ok")).await;

    let letters = read_topic(&setup.broker.brokers(), DEAD_LETTERS, bad.len()).await;
    assert_eq!(letters.len(), bad.len(), "each bad message once: {letters:?}");
    let by_payload: BTreeMap<&str, &BTreeMap<String, String>> = letters.iter().map(|(_, v, h)| (v.as_str(), h)).collect();
    for (key, payload, reason) in &bad {
        let headers = by_payload.get(payload.as_str()).unwrap_or_else(|| panic!("{payload} not dead-lettered: {letters:?}"));
        assert_eq!(headers.get(REASON_HEADER).map(String::as_str), Some(*reason), "{payload}: {headers:?}");
        let error = headers.get(ERROR_HEADER).map(String::as_str).unwrap_or_default();
        assert!(!error.is_empty(), "{headers:?}");
        if *reason == "store_error" {
            assert!(!error.contains("poison") && !error.contains("growth/vip"), "the payload is not echoed: {error}");
        }
        assert!(headers.get("segment-dlq-source").is_some_and(|s| s.starts_with(MEMBERSHIP)), "{headers:?}");
        let original_key = letters.iter().find(|(_, v, _)| v == payload).and_then(|(k, _, _)| k.clone());
        assert_eq!(original_key.as_deref(), *key, "the original key is kept");
    }
    // The good message after the bad ones was applied.
    let mut expected: BTreeSet<String> = users("u", 0..3).into_iter().collect();
    expected.insert("late".into());
    let mut candidates = users("u", 0..3);
    candidates.push("late".into());
    setup.wait_served(&candidates, &expected).await;

    stop.send(true).unwrap();
    worker.await.unwrap();
    let text = metrics.encode();
    for (_, _, reason) in &bad {
        assert!(text.contains(&format!("segment_realtime_dead_letters_total{{reason=\"{reason}\"}} 1")), "{reason}: {text}");
    }
    assert!(text.contains("segment_realtime_messages_total{outcome=\"dead_lettered\"} 7"), "{text}");
    // The poison message was tried three times, then given up on.
    assert!(text.contains("segment_realtime_store_errors_total 3"), "{text}");
}

/// One user's writes fail as if the store were down (and keep failing):
/// their partition waits, in order, and the other partitions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_held_up_by_its_store_calls_does_not_hold_up_the_others() {
    let broker = start_broker().await;
    let store = Arc::new(MemoryStore::new());
    let segment = SegmentKey::new("growth", "vip");
    store.load_version(&segment, 1, 3, None, None);
    store.activate(&segment, 1).await.unwrap();
    store.fail_overrides_of("stuck", Some(StoreError::Unavailable("this user's shard is down".into())));
    let results = tempfile::tempdir().unwrap();
    let index = Arc::new(ResultFiles::new(format!("file://{}", results.path().display())));
    let (stop, metrics, worker) = spawn_worker(worker_config(&broker, "w1"), store.clone(), index);
    let producer = KafkaSettings { brokers: broker.brokers(), ..Default::default() }.producer().unwrap();
    let now = Utc::now();

    send_to(&producer, 0, "stuck", &event("stuck", "include", now, "e1")).await;
    // The worker is retrying it before anything else is produced.
    eventually("the stuck message to be tried", async || counter(&metrics, "segment_realtime_store_errors_total") > 0).await;
    send_to(&producer, 0, "behind", &event("behind", "include", now, "e2")).await;
    send_to(&producer, 1, "other-1", &event("other-1", "include", now, "e3")).await;
    send_to(&producer, 2, "other-2", &event("other-2", "include", now, "e4")).await;

    // The users whose include was recorded (what serving lays over the index).
    let since = now - chrono::Duration::hours(1);
    let included = async || -> BTreeSet<String> {
        let recorded = store.overrides_since(&segment, since).await.unwrap();
        recorded.into_iter().filter(|o| o.op == OverrideOp::Include).map(|o| o.user).collect()
    };
    eventually("the other partitions' events", async || {
        let included = included().await;
        included.contains("other-1") && included.contains("other-2")
    })
    .await;
    let recorded = included().await;
    assert!(!recorded.contains("stuck") && !recorded.contains("behind"), "partition 0 keeps its order: {recorded:?}");
    assert!(metrics.readiness().is_err(), "not ready while a partition waits for the store");

    store.fail_overrides_of("stuck", None);
    eventually("partition 0 to go on", async || {
        let included = included().await;
        included.contains("stuck") && included.contains("behind")
    })
    .await;
    assert!(metrics.readiness().is_ok(), "ready again once it went through");
    stop.send(true).unwrap();
    worker.await.unwrap();
    let text = metrics.encode();
    assert!(text.contains("segment_realtime_messages_total{outcome=\"applied\"} 4"), "{text}");
    assert!(!text.contains("outcome=\"dead_lettered\""), "an outage dead-letters nothing: {text}");
}

/// Waits until the announcements of `result` counted by `metrics` reach `count`.
async fn announcements(metrics: &[&Metrics], result: &str, count: u64) {
    let series = format!("segment_realtime_announcements_total{{result=\"{result}\"}}");
    let seen = || metrics.iter().map(|m| counter_or_zero(m, &series)).sum::<u64>();
    eventually(&format!("{count} announcements {result}"), async || seen() >= count).await;
}

/// A counter's value, 0 before it was first counted.
fn counter_or_zero(metrics: &Metrics, series: &str) -> u64 {
    let text = metrics.encode();
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

fn parse_events(messages: &[(Option<String>, String, BTreeMap<String, String>)]) -> Vec<ChangeEvent> {
    let events: Vec<ChangeEvent> = messages.iter().map(|(_, v, _)| serde_json::from_str(v).expect("a change event")).collect();
    for ((key, _, _), event) in messages.iter().zip(&events) {
        assert_eq!(key.as_deref(), Some(event.user.as_str()), "keyed by user");
    }
    events
}

/// The versions are sealed in the store with no member loaded there: the
/// events can only come from their index files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rollover_publishes_its_changes_once() {
    let setup = Setup::empty().await;
    let snapshot = Utc::now() - chrono::Duration::hours(1);
    setup.computed(1, snapshot, users("u", 0..300)).await;
    setup.store.activate(&setup.segment, 1).await.unwrap();
    // Two replicas see every rollover notice.
    let (stop_1, metrics_1, worker_1) = setup.run_worker("w1");
    let (stop_2, metrics_2, worker_2) = setup.run_worker("w2");

    // Wait until v1 is the baseline (a worker swept it), so v2 has a base.
    announcements(&[&metrics_1, &metrics_2], "baseline", 1).await;
    setup.computed(2, snapshot, users("u", 100..450)).await;
    setup.store.activate(&setup.segment, 2).await.unwrap();
    // v2's events: 150 entered (300..450), 100 exited (0..100).
    let published = read_topic(&setup.broker.brokers(), CHANGES, 250).await;

    // A restarted worker sweeps every segment at start: v2 is not published again.
    stop_1.send(true).unwrap();
    worker_1.await.unwrap();
    let (stop_3, _metrics_3, worker_3) = setup.run_worker("w3");
    // v3 rolls back to v1's members: 100 entered, 150 exited.
    setup.computed(3, snapshot, users("u", 0..300)).await;
    setup.store.activate(&setup.segment, 3).await.unwrap();
    let all = read_topic(&setup.broker.brokers(), CHANGES, 500).await;
    for stop in [stop_2, stop_3] {
        stop.send(true).unwrap();
    }
    worker_2.await.unwrap();
    worker_3.await.unwrap();

    let events = parse_events(&all);
    assert_eq!(events.len(), 500, "every change exactly once");
    let of = |version: u64, change: &str| -> BTreeSet<String> {
        events.iter().filter(|e| e.version == version && e.change == change).map(|e| e.user.clone()).collect()
    };
    assert_eq!(of(2, "entered"), users("u", 300..450).into_iter().collect());
    assert_eq!(of(2, "exited"), users("u", 0..100).into_iter().collect());
    assert_eq!(of(3, "entered"), users("u", 0..100).into_iter().collect());
    assert_eq!(of(3, "exited"), users("u", 300..450).into_iter().collect());
    assert!(events.iter().all(|e| e.previous_version + 1 == e.version && e.segment == "growth/vip"));
    let ids: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 500);
    assert_eq!(published.len(), 250, "v2's events, and nothing else, before v3");
    // The store was never asked for members: it holds none of these versions'.
    let versions = setup.store.versions(&setup.segment).await.unwrap();
    assert!(versions.values().all(|v| v.members == 0), "{versions:?}");
}

/// An index file that cannot be read for now (here: listed by the manifest,
/// missing from object storage, as a read that fails) is retried on every
/// resync until it reads; a version whose result has no index file
/// (computed before index files) is diffed from its parts; one whose index
/// file fails its checksum gives up on the rollovers into and out of it,
/// and the next rollover between two readable versions publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_index_file_is_retried_a_damaged_one_gives_up_and_a_missing_one_is_built_from_the_parts() {
    let setup = Setup::empty().await;
    let snapshot = Utc::now() - chrono::Duration::hours(1);
    setup.computed(1, snapshot, users("u", 0..30)).await;
    setup.store.activate(&setup.segment, 1).await.unwrap();
    let (stop, metrics, worker) = setup.run_worker("w1");
    announcements(&[&metrics], "baseline", 1).await;

    // v2's index file cannot be read: the announcement fails and is retried.
    setup.computed(2, snapshot, users("u", 10..40)).await;
    let index_file = setup.results.path().join("growth/vip/v2").join(INDEX_FILE);
    let saved = std::fs::read(&index_file).unwrap();
    std::fs::remove_file(&index_file).unwrap();
    setup.store.activate(&setup.segment, 2).await.unwrap();
    announcements(&[&metrics], "failed", 3).await;
    assert_eq!(counter_or_zero(&metrics, "segment_realtime_announcements_total{result=\"published\"}"), 0);
    std::fs::write(&index_file, saved).unwrap();
    // 10 entered (30..40), 10 exited (0..10).
    announcements(&[&metrics], "published", 1).await;

    // v3 was computed before index files: its manifest lists none. 20
    // entered (0..10, 40..50), from its parts.
    setup.computed(3, snapshot, users("u", 0..50)).await;
    as_before_index_files(&results_uri(&setup.results_base(), &setup.segment, 3)).await;
    setup.store.activate(&setup.segment, 3).await.unwrap();
    announcements(&[&metrics], "published", 2).await;

    // v4's index file fails its checksum: given up on.
    setup.computed(4, snapshot, users("u", 0..5)).await;
    let index_file = setup.results.path().join("growth/vip/v4").join(INDEX_FILE);
    let mut bytes = std::fs::read(&index_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&index_file, bytes).unwrap();
    setup.store.activate(&setup.segment, 4).await.unwrap();
    announcements(&[&metrics], "index_unreadable", 1).await;
    // Out of it, too.
    setup.computed(5, snapshot, users("u", 0..10)).await;
    setup.store.activate(&setup.segment, 5).await.unwrap();
    announcements(&[&metrics], "index_unreadable", 2).await;
    // v5 is the base of the next diff: 5 entered (10..15).
    setup.computed(6, snapshot, users("u", 0..15)).await;
    setup.store.activate(&setup.segment, 6).await.unwrap();
    announcements(&[&metrics], "published", 3).await;

    let events = parse_events(&read_topic(&setup.broker.brokers(), CHANGES, 45).await);
    stop.send(true).unwrap();
    worker.await.unwrap();
    let of = |version: u64, change: &str| -> BTreeSet<String> {
        events.iter().filter(|e| e.version == version && e.change == change).map(|e| e.user.clone()).collect()
    };
    assert_eq!(events.len(), 45, "v2's, v3's and v6's events once, and none of v4 or v5: {events:?}");
    assert_eq!(of(2, "entered"), users("u", 30..40).into_iter().collect());
    assert_eq!(of(2, "exited"), users("u", 0..10).into_iter().collect());
    assert_eq!(of(3, "entered"), users("u", 0..10).into_iter().chain(users("u", 40..50)).collect());
    assert!(of(3, "exited").is_empty());
    assert_eq!(of(6, "entered"), users("u", 10..15).into_iter().collect());
    assert!(events.iter().filter(|e| e.version == 6).all(|e| e.previous_version == 5));
}

/// The binary, killed with SIGKILL while it works through a stream and
/// started again: every user ends with the effect of their newest event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_and_duplicates_nothing() {
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    // v1's lake data is older than every event, so every override counts.
    let setup = Setup::start_at(users("u", 0..50), start - chrono::Duration::days(1)).await;
    let producer = setup.producer();
    let people = users("p", 0..400);
    let rounds = 25u32;
    // Round r flips every user: include on even rounds, exclude on odd;
    // the last round (24) includes the even users and excludes the odd ones.
    let mut last_id = BTreeMap::new();
    let mut payloads = Vec::new();
    for round in 0..rounds {
        for (i, user) in people.iter().enumerate() {
            let include = if round == rounds - 1 { i % 2 == 0 } else { round % 2 == 0 };
            let id = format!("{user}-r{round}");
            let ts = start + chrono::Duration::seconds(round as i64);
            payloads.push((user.clone(), event(user, if include { "include" } else { "exclude" }, ts, &id)));
            last_id.insert(user.clone(), id);
        }
    }
    let sends = payloads.iter().map(|(user, payload)| {
        producer.send(
            FutureRecord::to(MEMBERSHIP).key(user.as_str()).payload(payload.as_str()),
            Timeout::After(Duration::from_secs(30)),
        )
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| e).expect("produced");
    }

    let spawn = || -> Child {
        Command::new(env!("CARGO_BIN_EXE_segment-worker"))
            .arg("realtime")
            .args(["--redis-url", &setup.redis.url(), "--kafka-brokers", &setup.broker.brokers()])
            .args(["--results-uri", &setup.results_base()])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", segment_tests::free_port())])
            // The killed member's partitions move to the new one after its
            // session times out; the default 45 s would only slow the test.
            .args(["--kafka-option", "session.timeout.ms=6000", "--kafka-option", "heartbeat.interval.ms=1000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("segment-worker starts")
    };
    let recorded = || async { setup.store.overrides_since(&setup.segment, start - chrono::Duration::days(1)).await.unwrap() };

    let mut first = spawn();
    let begun = Instant::now();
    loop {
        let seen = recorded().await;
        if seen.iter().any(|o| o.id.contains("-r2")) {
            // Mid-stream: the last round has not been reached.
            assert!(!seen.iter().any(|o| o.id.ends_with(&format!("-r{}", rounds - 1))), "killed too late to test anything");
            break;
        }
        assert!(begun.elapsed() < PATIENCE, "the worker made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();

    let mut second = spawn();
    let begun = Instant::now();
    loop {
        let seen: BTreeMap<String, String> = recorded().await.into_iter().map(|o| (o.user, o.id)).collect();
        if seen == last_id {
            break;
        }
        assert!(
            begun.elapsed() < PATIENCE,
            "after the restart {} of {} users reached their last event",
            seen.iter().filter(|(u, id)| last_id.get(*u) == Some(id)).count(),
            last_id.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();

    let even: BTreeSet<String> = people.iter().enumerate().filter(|(i, _)| i % 2 == 0).map(|(_, u)| u.clone()).collect();
    let mut candidates = people.clone();
    candidates.extend(users("u", 0..50));
    let mut expected = even;
    expected.extend(users("u", 0..50));
    assert_eq!(setup.served(&candidates).await, expected);
    // One override per user: nothing was recorded twice.
    assert_eq!(recorded().await.len(), people.len());
}
