//! The Kafka side of the realtime worker: the membership consumer (with its
//! dead-letter producer) and the announcer that publishes change events.
//!
//! Delivery is at least once: a message's offset is stored for the
//! auto-commit only after its write reached the store or its dead letter
//! was acknowledged, so a worker killed at any point re-reads what it had
//! not finished, and re-applying it changes nothing (writes are
//! idempotent). Partitions follow the key (the user id), and one partition
//! is handled in order, so one user's events apply in order.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use segment_core::api::SegmentKey;
use segment_core::store::{MembershipReader, RolloverFeed, SegmentStore};
use tokio::sync::watch;
use tracing::{info, warn};

use super::changes::{announce, Announcement, ChangeEvent, ChangeSink};
use super::message::Rejection;
use super::metrics::Metrics;
use super::{apply, Outcome};

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
}

#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Backoff between retries of a failed store or broker call.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long one produce may take before it is retried.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the consumer and the announcer until `shutdown` turns true.
pub async fn run<S>(
    config: RealtimeConfig,
    store: Arc<S>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RealtimeError>
where
    S: SegmentStore + MembershipReader + RolloverFeed + 'static,
{
    let consumer: StreamConsumer = config
        .kafka
        .client_config()
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&config.membership_topic])?;
    let producer = config.kafka.producer()?;
    let sink = KafkaChangeSink { producer: producer.clone(), topic: config.changes_topic.clone() };
    let announcer = tokio::spawn(announce_rollovers(config.clone(), store.clone(), sink, metrics.clone(), shutdown.clone()));
    info!(topic = %config.membership_topic, group = %config.group_id, "consuming membership events");
    consume(&config, &consumer, &producer, store.as_ref(), &metrics, shutdown).await;
    metrics.set_ready(false);
    // Commits what was finished; a failure only means re-reading it.
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(error = %e, "final offset commit failed; the uncommitted messages will be re-read");
    }
    let _ = announcer.await;
    Ok(())
}

async fn consume(
    config: &RealtimeConfig,
    consumer: &StreamConsumer,
    producer: &FutureProducer,
    store: &dyn SegmentStore,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut store_checked = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !store_checked {
            // Ready once the store answers; the consumer is subscribed.
            store_checked = store.active_version(&SegmentKey::new("readiness", "probe")).await.is_ok();
            metrics.set_ready(store_checked);
        }
        let received = tokio::select! {
            _ = shutdown.changed() => return,
            received = consumer.recv() => received,
        };
        let message = match received {
            Ok(message) => message,
            Err(e) => {
                metrics.kafka_error("consume");
                warn!(error = %e, "consuming failed; retrying");
                if pause(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let Some(outcome) = apply_with_retry(store, &message, metrics, &mut shutdown).await else { return };
        match outcome {
            Outcome::Applied => metrics.message("applied"),
            Outcome::Unchanged => metrics.message("unchanged"),
            Outcome::Rejected(rejection) => {
                if !dead_letter(config, producer, &message, &rejection, metrics, &mut shutdown).await {
                    return;
                }
                metrics.message("dead_lettered");
                metrics.dead_letter(rejection.reason.label());
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&message) {
            // The partition was revoked meanwhile: its new owner re-reads
            // the message, which the idempotent write makes harmless.
            metrics.kafka_error("commit");
            warn!(error = %e, "storing the offset failed");
        }
    }
}

/// Sleeps before a retry; true when shutdown came first.
async fn pause(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(RETRY_DELAY) => *shutdown.borrow(),
    }
}

/// Applies the message, retrying while the store is unreachable; `None`
/// when shutdown came first (the message stays uncommitted).
async fn apply_with_retry(
    store: &dyn SegmentStore,
    message: &BorrowedMessage<'_>,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    loop {
        match apply(store, message.key(), message.payload()).await {
            Ok(outcome) => return Some(outcome),
            Err(e) => {
                metrics.store_error();
                metrics.set_ready(false);
                warn!(error = %e, partition = message.partition(), offset = message.offset(), "store call failed; retrying");
                if pause(shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Sends the message to the dead-letter topic with the reason, retrying
/// until the broker acknowledges; false when shutdown came first.
async fn dead_letter(
    config: &RealtimeConfig,
    producer: &FutureProducer,
    message: &BorrowedMessage<'_>,
    rejection: &Rejection,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
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
                if pause(shutdown).await {
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
    sink: KafkaChangeSink,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: SegmentStore + MembershipReader + RolloverFeed + 'static,
{
    let announce_active = |segment: SegmentKey| {
        let (store, sink, metrics, config) = (store.clone(), &sink, metrics.clone(), &config);
        async move {
            match store.active_version(&segment).await {
                Ok(Some(version)) => announce_one(store.as_ref(), sink, &metrics, config, &segment, version).await,
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
                            announce_one(store.as_ref(), &sink, &metrics, &config, &segment, version).await;
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
    sink: &dyn ChangeSink,
    metrics: &Metrics,
    config: &RealtimeConfig,
    segment: &SegmentKey,
    version: u64,
) {
    match announce(store, sink, segment, version, &config.holder, config.claim_lease).await {
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
        Err(e) => {
            metrics.announcement("failed");
            if matches!(e, super::changes::AnnounceError::Sink(_)) {
                metrics.kafka_error("changes");
            }
            warn!(%segment, version, error = %e, "announcing changes failed; the next resync retries");
        }
    }
}
