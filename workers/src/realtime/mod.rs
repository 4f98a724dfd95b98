//! `segment-worker realtime`: applies include/exclude events from Kafka to
//! the active versions and announces entered/exited changes on rollover
//! (docs/realtime.md).
//!
//! - [`message`]: the membership topic's message format, parsed strictly;
//! - [`apply`]: one message's effect on the store (plain Rust, no Kafka);
//! - [`changes`]: publishing each version's diff exactly once;
//! - [`kafka`]: the consumer, the dead-letter and changes producers, and
//!   the loops that tie them to the store;
//! - [`metrics`]: counters and the `/metrics`, `/healthz`, `/readyz` server.

pub mod changes;
pub mod kafka;
pub mod message;
pub mod metrics;

use segment_core::store::{SegmentStore, StoreError};

use message::{RejectReason, Rejection};

/// What one membership message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The override was recorded and applied.
    Applied,
    /// A redelivery, or older than the user's recorded override: nothing changed.
    Unchanged,
    /// Goes to the dead-letter topic.
    Rejected(Rejection),
}

/// Applies one message. A store error is returned, not turned into a
/// rejection: the caller retries the message until the store answers, so
/// an outage never sends good events to the dead-letter topic.
pub async fn apply(store: &dyn SegmentStore, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Outcome, StoreError> {
    let event = match message::parse(key, payload) {
        Ok(event) => event,
        Err(rejection) => return Ok(Outcome::Rejected(rejection)),
    };
    // Overrides of a segment that was never served (a typo, a deleted
    // segment) would be kept forever and reach nobody.
    Ok(match store.record_override_if_active(&event.segment, &event.change).await? {
        Some(true) => Outcome::Applied,
        Some(false) => Outcome::Unchanged,
        None => Outcome::Rejected(Rejection::new(
            RejectReason::UnknownSegment,
            format!("segment: {} has no active version", event.segment),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use segment_core::api::SegmentKey;
    use segment_core::store::MemoryStore;

    fn payload(user: &str, op: &str, ts: &str, id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"segment": "growth/vip", "user": user, "op": op, "ts": ts, "id": id})).unwrap()
    }

    #[tokio::test]
    async fn applies_once_and_the_newest_wins() {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, ["a".to_string()], None, None);
        store.activate(&segment, 1).await.unwrap();

        let include = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        assert_eq!(apply(&store, Some(b"b"), Some(&include)).await.unwrap(), Outcome::Applied);
        assert_eq!(apply(&store, Some(b"b"), Some(&include)).await.unwrap(), Outcome::Unchanged, "redelivery");
        assert!(store.active_members(&segment).unwrap().contains("b"));

        let exclude = payload("b", "exclude", "2026-11-01T11:00:00Z", "e2");
        assert_eq!(apply(&store, Some(b"b"), Some(&exclude)).await.unwrap(), Outcome::Applied);
        let late = payload("b", "include", "2026-11-01T10:30:00Z", "e3");
        assert_eq!(apply(&store, Some(b"b"), Some(&late)).await.unwrap(), Outcome::Unchanged, "older than the exclude");
        assert!(!store.active_members(&segment).unwrap().contains("b"));
    }

    #[tokio::test]
    async fn unknown_segments_and_bad_messages_are_rejected_and_outages_are_errors() {
        let store = MemoryStore::new();
        let unknown = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        match apply(&store, Some(b"b"), Some(&unknown)).await.unwrap() {
            Outcome::Rejected(r) => assert_eq!(
                (r.reason, r.message.as_str()),
                (RejectReason::UnknownSegment, "segment: growth/vip has no active version")
            ),
            other => panic!("{other:?}"),
        }
        match apply(&store, Some(b"b"), Some(b"{")).await.unwrap() {
            Outcome::Rejected(r) => assert_eq!(r.reason, RejectReason::MalformedJson),
            other => panic!("{other:?}"),
        }
        store.set_unavailable(true);
        assert!(matches!(apply(&store, Some(b"b"), Some(&unknown)).await, Err(StoreError::Unavailable(_))));
    }
}
