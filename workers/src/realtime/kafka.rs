//! The Kafka side of the realtime worker: the membership consumer (with its
//! dead-letter producer) and the announcer that publishes change events
//! (computed from the versions' index files, read from an [`IndexSource`]).
//!
//! Every assigned partition of the membership topic gets a queue of its own
//! (`split_partition_queue`) and a task that handles its messages one after
//! the other, so a message whose store call keeps failing holds back only
//! its partition. Partitions follow the key (the user id), so one user's
//! events still apply in order.
//!
//! Delivery is at least once: a partition's task stores a message's offset
//! for the auto-commit only after its write reached the store or its dead
//! letter was acknowledged, so a worker killed at any point re-reads what
//! it had not finished, and re-applying it changes nothing (writes are
//! idempotent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;
use segment_core::api::SegmentKey;
use segment_core::store::{IndexSource, MembershipReader, RolloverFeed, SegmentStore};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::changes::{announce, Announcement, ChangeEvent, ChangeSink};
use super::message::Rejection;
use super::metrics::Metrics;
use super::{apply_with_retry, AfterFailure, Outcome, Received};

/// Headers of a dead letter, next to the original key and value.
pub const REASON_HEADER: &str = "segment-dlq-reason";
pub const ERROR_HEADER: &str = "segment-dlq-error";
pub const SOURCE_HEADER: &str = "segment-dlq-source";

/// Connection settings shared by the consumer and the producers.
#[derive(Debug, Clone, Default)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka settings (`security.protocol`, `sasl.mechanism`, ...).
    pub options: Vec<(String, String)>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
}

impl KafkaSettings {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.options {
            config.set(key, value);
        }
        if let Some(user) = &self.sasl_username {
            config.set("sasl.username", user);
        }
        if let Some(password) = &self.sasl_password {
            config.set("sasl.password", password);
        }
        config
    }

    /// An idempotent producer: the broker drops the duplicates its own
    /// retries would otherwise create.
    pub fn producer(&self) -> Result<FutureProducer, KafkaError> {
        let mut config = self.client_config();
        config.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5");
        config.create()
    }
}

/// How far past the worker's clock an event's `ts` may be by default.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    pub kafka: KafkaSettings,
    pub membership_topic: String,
    pub dead_letter_topic: String,
    pub changes_topic: String,
    pub group_id: String,
    /// Names this worker in change claims (the pod name in a cluster).
    pub holder: String,
    /// How long a change claim lasts without renewal.
    pub claim_lease: Duration,
    /// How often every segment is checked for a version not yet announced
    /// (missed notices, failed publishes).
    pub resync_interval: Duration,
    /// How far past this worker's clock an event's `ts` may be; a later one
    /// is dead-lettered (`future_timestamp`).
    pub max_clock_skew: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Prefetched messages each partition's queue may hold, in KiB, unless a
/// `--kafka-option` says otherwise. Once queues are split, librdkafka's
/// 64 MiB default applies per partition, not per consumer: held-up
/// partitions (a Redis outage holds up all) would fill 64 MiB each.
const PARTITION_QUEUE_KBYTES: &str = "4096";

/// Backoff between retries of a failed store or broker call.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long one produce may take before it is retried.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

type MembershipConsumer = StreamConsumer<PartitionQueues>;
type PartitionQueue = StreamPartitionQueue<PartitionQueues>;

/// The consumer's context: gives every partition assigned to this worker a
/// queue of its own, split off in the rebalance callback before the
/// assignment takes effect. librdkafka then never forwards that
/// partition's messages to the consumer's main queue (an application's
/// forwarding outlives later assignments), so none of them can be handled
/// out of order by the main loop and the partition's task at once.
struct PartitionQueues {
    topic: String,
    /// Set right after the consumer is created; the queues need it.
    consumer: OnceLock<Weak<MembershipConsumer>>,
    rebalances: mpsc::UnboundedSender<Rebalanced>,
}

/// What the rebalance callback hands the main loop.
enum Rebalanced {
    Assigned(Vec<(i32, PartitionQueue)>),
    Revoked(Vec<i32>),
}

impl PartitionQueues {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.topic).iter().map(|p| p.partition()).collect()
    }
}

impl ClientContext for PartitionQueues {}

impl ConsumerContext for PartitionQueues {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(list) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else { return };
                let queues = self
                    .partitions(list)
                    .into_iter()
                    .filter_map(|partition| {
                        let queue = consumer.split_partition_queue(&self.topic, partition);
                        if queue.is_none() {
                            // Its messages then come through the main queue,
                            // which handles them in order, one at a time.
                            error!(topic = %self.topic, partition, "no queue of its own for an assigned partition");
                        }
                        queue.map(|queue| (partition, queue))
                    })
                    .collect();
                Rebalanced::Assigned(queues)
            }
            Rebalance::Revoke(list) => Rebalanced::Revoked(self.partitions(list)),
            Rebalance::Error(_) => return,
        };
        // The main loop is gone only at shutdown, when nothing is handled.
        let _ = self.rebalances.send(event);
    }
}

/// The membership consumer's settings: offsets stored by hand (after the
/// write) and committed periodically, and a bound on each partition's queue.
fn consumer_config(config: &RealtimeConfig) -> ClientConfig {
    let mut consumer = config.kafka.client_config();
    if consumer.get("queued.max.messages.kbytes").is_none() {
        consumer.set("queued.max.messages.kbytes", PARTITION_QUEUE_KBYTES);
    }
    consumer
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    consumer
}

/// What every partition's task shares.
struct Shared {
    config: RealtimeConfig,
    store: Arc<dyn SegmentStore>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    consumer: Arc<MembershipConsumer>,
    /// Partitions whose message waits for an unavailable store: the
    /// worker is not ready while there is one.
    stalled: Mutex<usize>,
}

impl Shared {
    /// Counts a partition in (`1`) or out (`-1`) of [`Shared::stalled`],
    /// and publishes the readiness that follows. Under one lock, so two
    /// partitions changing at once cannot leave the wrong one behind.
    fn stalled(&self, change: isize) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        *stalled = stalled.saturating_add_signed(change);
        self.metrics.set_ready(*stalled == 0);
    }
}

/// Runs the consumer and the announcer until `shutdown` turns true. The
/// announcer diffs the versions' index files from `index`.
pub async fn run<S>(
    config: RealtimeConfig,
    store: Arc<S>,
    index: Arc<dyn IndexSource>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RealtimeError>
where
    S: SegmentStore + MembershipReader + RolloverFeed + 'static,
{
    let (rebalances, rebalanced) = mpsc::unbounded_channel();
    let context = PartitionQueues { topic: config.membership_topic.clone(), consumer: OnceLock::new(), rebalances };
    let consumer: Arc<MembershipConsumer> = Arc::new(consumer_config(&config).create_with_context(context)?);
    // Weak: the context lives inside the consumer.
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[&config.membership_topic])?;
    let producer = config.kafka.producer()?;
    let sink = KafkaChangeSink { producer: producer.clone(), topic: config.changes_topic.clone() };
    let announcer =
        tokio::spawn(announce_rollovers(config.clone(), store.clone(), index, sink, metrics.clone(), shutdown.clone()));
    info!(topic = %config.membership_topic, group = %config.group_id, "consuming membership events");
    let shared = Arc::new(Shared {
        config,
        store,
        producer,
        metrics: metrics.clone(),
        consumer: consumer.clone(),
        stalled: Mutex::new(0),
    });
    consume(shared, rebalanced, shutdown).await;
    metrics.set_ready(false);
    // Every partition's task has ended: this commits what they finished;
    // a failure only means re-reading it.
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(error = %e, "final offset commit failed; the uncommitted messages will be re-read");
    }
    let _ = announcer.await;
    Ok(())
}

/// One assigned partition's task.
struct PartitionTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl PartitionTask {
    fn spawn(shared: Arc<Shared>, partition: i32, queue: PartitionQueue) -> PartitionTask {
        let (stop, stopped) = watch::channel(false);
        let handle = tokio::spawn(consume_partition(shared, partition, queue, stopped));
        PartitionTask { stop, handle }
    }

    /// Stops it at the next message, or in the middle of one that waits
    /// for the store or the broker (it stays uncommitted).
    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    async fn finish(self) {
        self.stop();
        if let Err(e) = self.handle.await {
            error!(error = %e, "a partition's task failed");
        }
    }
}

/// The main loop: serves the consumer's events (rebalances among them),
/// starts and stops the partitions' tasks, and checks the store for
/// readiness until it answers once.
async fn consume(shared: Arc<Shared>, mut rebalanced: mpsc::UnboundedReceiver<Rebalanced>, mut shutdown: watch::Receiver<bool>) {
    let mut tasks: HashMap<i32, PartitionTask> = HashMap::new();
    let mut store_checked = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !store_checked {
            // Ready once the store answers; the consumer is subscribed.
            store_checked = shared.store.active_version(&SegmentKey::new("readiness", "probe")).await.is_ok();
            match store_checked {
                // Unless a partition waits for the store meanwhile.
                true => shared.stalled(0),
                false => shared.metrics.set_ready(false),
            }
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            // Messages go to the partitions' tasks, so nothing else may
            // wake this loop to check again.
            _ = tokio::time::sleep(RETRY_DELAY), if !store_checked => {}
            Some(event) = rebalanced.recv() => match event {
                Rebalanced::Assigned(queues) => {
                    for (partition, queue) in queues {
                        // The task of an earlier assignment ends first: two
                        // tasks on one partition would break its order.
                        if let Some(earlier) = tasks.remove(&partition) {
                            earlier.finish().await;
                        }
                        info!(partition, "consuming a partition");
                        tasks.insert(partition, PartitionTask::spawn(shared.clone(), partition, queue));
                    }
                }
                // Kept until they end, for the next assignment to wait for.
                Rebalanced::Revoked(partitions) => {
                    for partition in partitions {
                        if let Some(task) = tasks.get(&partition) {
                            info!(partition, "a partition was revoked");
                            task.stop();
                        }
                    }
                }
            },
            // The main queue carries the consumer's events, and messages
            // only of a partition that got no queue of its own.
            received = shared.consumer.recv() => match received {
                Ok(message) => {
                    if !handle(&shared, &message, &mut shutdown).await {
                        break;
                    }
                }
                Err(e) => {
                    shared.metrics.kafka_error("consume");
                    warn!(error = %e, "consuming failed; retrying");
                    if pause(&mut shutdown).await {
                        break;
                    }
                }
            },
        }
    }
    for (_, task) in tasks.drain() {
        task.finish().await;
    }
}

/// Handles one partition's messages in order until stopped.
async fn consume_partition(shared: Arc<Shared>, partition: i32, queue: PartitionQueue, mut stop: watch::Receiver<bool>) {
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.changed() => return,
            received = queue.recv() => received,
        };
        match received {
            Ok(message) => {
                if !handle(&shared, &message, &mut stop).await {
                    return;
                }
            }
            Err(e) => {
                shared.metrics.kafka_error("consume");
                warn!(partition, error = %e, "consuming failed; retrying");
                if pause(&mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps before a retry; true when `stop` came first.
async fn pause(stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(RETRY_DELAY) => *stop.borrow(),
    }
}

/// Applies one message (retrying the store as [`apply_with_retry`]
/// decides) or dead-letters it, then stores its offset for the
/// auto-commit; false when `stop` came first, leaving it uncommitted.
async fn handle(shared: &Shared, message: &BorrowedMessage<'_>, stop: &mut watch::Receiver<bool>) -> bool {
    let Shared { config, store, metrics, .. } = shared;
    let received = Received {
        key: message.key(),
        payload: message.payload(),
        // librdkafka hands out only messages at real offsets, never negative.
        offset: u64::try_from(message.offset()).unwrap_or_default(),
    };
    let latest = Utc::now() + config.max_clock_skew;
    let (partition, offset) = (message.partition(), message.offset());
    let mut stalled = false;
    let outcome = apply_with_retry(store.as_ref(), &received, latest, |error, next| {
        metrics.store_error();
        let retry = *next == AfterFailure::Retry;
        if error.is_transient() && !stalled {
            stalled = true;
            shared.stalled(1);
        }
        // The one place the store's error is logged in full: the dead
        // letter's header leaves it out, as it may quote the message.
        warn!(error = %error, partition, offset, retry, "store call failed");
        let mut stop = stop.clone();
        async move { !retry || !pause(&mut stop).await }
    })
    .await;
    if stalled {
        shared.stalled(-1);
    }
    let Some(outcome) = outcome else { return false };
    match outcome {
        Outcome::Applied | Outcome::Unchanged => {
            metrics.message(if outcome == Outcome::Applied { "applied" } else { "unchanged" })
        }
        Outcome::Rejected(rejection) => {
            if !dead_letter(config, &shared.producer, message, &rejection, metrics, stop).await {
                return false;
            }
            metrics.message("dead_lettered");
            metrics.dead_letter(rejection.reason.label());
        }
    }
    if let Err(e) = shared.consumer.store_offset_from_message(message) {
        // The partition was revoked meanwhile: its new owner re-reads the
        // message, which the idempotent write makes harmless.
        metrics.kafka_error("commit");
        warn!(error = %e, "storing the offset failed");
    }
    true
}

/// Sends the message to the dead-letter topic with the reason, retrying
/// until the broker acknowledges; false when `stop` came first.
async fn dead_letter(
    config: &RealtimeConfig,
    producer: &FutureProducer,
    message: &BorrowedMessage<'_>,
    rejection: &Rejection,
    metrics: &Metrics,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let source = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
    warn!(%source, reason = rejection.reason.label(), error = %rejection.message, "dead-lettering a membership message");
    loop {
        let headers = OwnedHeaders::new()
            .insert(Header { key: REASON_HEADER, value: Some(rejection.reason.label()) })
            .insert(Header { key: ERROR_HEADER, value: Some(rejection.message.as_str()) })
            .insert(Header { key: SOURCE_HEADER, value: Some(source.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&config.dead_letter_topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        match producer.send(record, Timeout::After(PRODUCE_TIMEOUT)).await {
            Ok(_) => return true,
            Err((e, _)) => {
                metrics.kafka_error("dead_letter");
                warn!(error = %e, topic = %config.dead_letter_topic, "dead-letter produce failed; retrying");
                if pause(stop).await {
                    return false;
                }
            }
        }
    }
}

/// Publishes change events to the changes topic, keyed by user.
pub struct KafkaChangeSink {
    pub producer: FutureProducer,
    pub topic: String,
}

#[async_trait]
impl ChangeSink for KafkaChangeSink {
    async fn publish(&self, events: &[ChangeEvent]) -> Result<(), String> {
        let payloads: Vec<String> =
            events.iter().map(serde_json::to_string).collect::<Result<_, _>>().map_err(|e| format!("encoding an event: {e}"))?;
        let sends = events.iter().zip(&payloads).map(|(event, payload)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(event.user.as_str()).payload(payload.as_str()),
                Timeout::After(PRODUCE_TIMEOUT),
            )
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| format!("{}: {e}", self.topic))?;
        }
        Ok(())
    }
}

/// Announces every rollover: from notices as they come, and by checking
/// every segment at start, after a lost subscription and periodically.
async fn announce_rollovers<S>(
    config: RealtimeConfig,
    store: Arc<S>,
    index: Arc<dyn IndexSource>,
    sink: KafkaChangeSink,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: SegmentStore + MembershipReader + RolloverFeed + 'static,
{
    let announce_active = |segment: SegmentKey| {
        let (store, index, sink, metrics, config) = (store.clone(), index.as_ref(), &sink, metrics.clone(), &config);
        async move {
            match store.active_version(&segment).await {
                Ok(Some(version)) => announce_one(store.as_ref(), index, sink, &metrics, config, &segment, version).await,
                Ok(None) => {}
                Err(e) => {
                    metrics.store_error();
                    warn!(%segment, error = %e, "reading the active version failed; the next resync retries");
                }
            }
        }
    };
    loop {
        // Subscribe first, then sweep, so a rollover in between is not missed.
        let mut notices = match store.rollovers().await {
            Ok(notices) => notices,
            Err(e) => {
                metrics.store_error();
                warn!(error = %e, "subscribing to rollover notices failed; retrying");
                if pause(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut resync = tokio::time::interval(config.resync_interval);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = resync.tick() => match store.aliases().await {
                    // The alias map is the active versions already: no
                    // second read per segment.
                    Ok(aliases) => {
                        for (segment, version) in aliases {
                            announce_one(store.as_ref(), index.as_ref(), &sink, &metrics, &config, &segment, version).await;
                        }
                    }
                    Err(e) => {
                        metrics.store_error();
                        warn!(error = %e, "listing segments failed; the next resync retries");
                    }
                },
                notice = notices.next() => match notice {
                    Some(notice) => announce_active(notice.segment).await,
                    // Notices may have been missed: subscribe and sweep again.
                    None => break,
                },
            }
        }
    }
}

async fn announce_one(
    store: &dyn SegmentStore,
    index: &dyn IndexSource,
    sink: &dyn ChangeSink,
    metrics: &Metrics,
    config: &RealtimeConfig,
    segment: &SegmentKey,
    version: u64,
) {
    match announce(store, index, sink, segment, version, &config.holder, config.claim_lease).await {
        Ok(Announcement::Published { from, entered, exited }) => {
            metrics.announcement("published");
            metrics.change_events(entered, exited);
            info!(%segment, from, version, entered, exited, "published change events");
        }
        Ok(Announcement::Baseline) => metrics.announcement("baseline"),
        Ok(Announcement::AlreadyPublished) => {}
        Ok(Announcement::HeldElsewhere) => metrics.announcement("held_elsewhere"),
        Ok(Announcement::BaseGone { from }) => {
            metrics.announcement("base_gone");
            warn!(%segment, from, version, "the previous version was deleted before its successor was announced; no events for this rollover");
        }
        Ok(Announcement::IndexUnreadable { from, version: unreadable, error }) => {
            metrics.announcement("index_unreadable");
            warn!(%segment, from, version, unreadable, %error, "a version's index file cannot be read (computed before index files, or damaged); no events for this rollover");
        }
        Err(e) => {
            metrics.announcement("failed");
            if matches!(e, super::changes::AnnounceError::Sink(_)) {
                metrics.kafka_error("changes");
            }
            warn!(%segment, version, error = %e, "announcing changes failed; the next resync retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(options: &[(&str, &str)]) -> RealtimeConfig {
        let options = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RealtimeConfig {
            kafka: KafkaSettings { brokers: "127.0.0.1:9092".into(), options, ..Default::default() },
            membership_topic: "m".into(),
            dead_letter_topic: "d".into(),
            changes_topic: "c".into(),
            group_id: "g".into(),
            holder: "w".into(),
            claim_lease: Duration::from_secs(60),
            resync_interval: Duration::from_secs(30),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }

    #[test]
    fn each_partition_queue_is_bounded_unless_an_option_says_otherwise() {
        let consumer = consumer_config(&config(&[]));
        assert_eq!(consumer.get("queued.max.messages.kbytes"), Some(PARTITION_QUEUE_KBYTES));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"), "offsets are stored after the write");
        let consumer = consumer_config(&config(&[("queued.max.messages.kbytes", "65536")]));
        assert_eq!(consumer.get("queued.max.messages.kbytes"), Some("65536"));
    }
}
