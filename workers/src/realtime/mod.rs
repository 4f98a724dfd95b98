//! `segment-worker realtime`: applies include/exclude events from Kafka to
//! the active versions and announces entered/exited changes on rollover
//! (docs/realtime.md).
//!
//! - [`message`]: the membership topic's message format, parsed strictly;
//! - [`apply`]: one message's effect on the store (plain Rust, no Kafka),
//!   and [`apply_with_retry`], which retries it as [`Failures`] decides;
//! - [`changes`]: publishing each version's diff exactly once;
//! - [`kafka`]: the consumer (a task per partition), the dead-letter and
//!   changes producers, and the loops that tie them to the store;
//! - [`metrics`]: counters and the `/metrics`, `/healthz`, `/readyz` server.

pub mod changes;
pub mod kafka;
pub mod message;
pub mod metrics;

use std::future::Future;

use chrono::{DateTime, Utc};
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

/// One membership message as read from its partition.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Its offset: of one user's events with the same `ts`, the later
    /// offset wins ([`segment_core::store::Override::supersedes`]).
    pub offset: u64,
}

/// Applies one message. `latest` is the newest `ts` accepted: the worker's
/// clock plus the allowed skew. A store error is returned, not turned into
/// a rejection: the caller decides whether to retry ([`Failures`]), so an
/// outage never sends good events to the dead-letter topic.
pub async fn apply(store: &dyn SegmentStore, message: &Received<'_>, latest: DateTime<Utc>) -> Result<Outcome, StoreError> {
    let mut event = match message::parse(message.key, message.payload) {
        Ok(event) => event,
        Err(rejection) => return Ok(Outcome::Rejected(rejection)),
    };
    // Newest wins, so an event stamped in the future would override every
    // real event of the user until that time comes.
    if event.change.ts > latest {
        return Ok(Outcome::Rejected(Rejection::new(
            RejectReason::FutureTimestamp,
            format!(
                "ts: {} is later than {}, this worker's clock plus the allowed skew (--max-clock-skew-seconds)",
                event.change.ts.to_rfc3339(),
                latest.to_rfc3339()
            ),
        )));
    }
    event.change.offset = Some(message.offset);
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

/// Attempts at a message whose store call fails with a permanent error
/// before it is dead-lettered: the same write fails the same way every
/// time, and retrying it for ever would stop its partition for good.
pub const PERMANENT_ATTEMPTS: u32 = 3;

/// What to do with a message whose store call just failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Wait, then try again.
    Retry,
    /// Give up and dead-letter it with this rejection.
    DeadLetter(Rejection),
}

/// One message's failed store calls so far.
#[derive(Debug, Default)]
pub struct Failures {
    permanent: u32,
}

impl Failures {
    /// Decides after one more failed call. An unavailable store is waited
    /// for however long it takes (nothing is skipped during an outage);
    /// any other error counts, and the [`PERMANENT_ATTEMPTS`]th gives up.
    pub fn after(&mut self, error: &StoreError) -> AfterFailure {
        if error.is_transient() {
            return AfterFailure::Retry;
        }
        self.permanent += 1;
        if self.permanent < PERMANENT_ATTEMPTS {
            return AfterFailure::Retry;
        }
        // The store's error can quote the message (a segment name, a
        // stored value); the header must not, so it only points at the
        // worker's log, which has the error next to the message's source.
        AfterFailure::DeadLetter(Rejection::new(
            RejectReason::StoreError,
            format!(
                "store: the write failed {PERMANENT_ATTEMPTS} times with an error retrying does not fix; the worker's log has it"
            ),
        ))
    }
}

/// Applies the message, retrying failed store calls as [`Failures`]
/// decides. `on_failure` sees every failure with the decision and returns
/// whether to go on (it waits before a retry); `None` when it said stop
/// before the message settled, which then stays uncommitted.
pub async fn apply_with_retry<F, W>(
    store: &dyn SegmentStore,
    message: &Received<'_>,
    latest: DateTime<Utc>,
    mut on_failure: F,
) -> Option<Outcome>
where
    F: FnMut(&StoreError, &AfterFailure) -> W,
    W: Future<Output = bool>,
{
    let mut failures = Failures::default();
    loop {
        let error = match apply(store, message, latest).await {
            Ok(outcome) => return Some(outcome),
            Err(error) => error,
        };
        let next = failures.after(&error);
        let go_on = on_failure(&error, &next).await;
        match next {
            AfterFailure::DeadLetter(rejection) => return Some(Outcome::Rejected(rejection)),
            AfterFailure::Retry if go_on => {}
            AfterFailure::Retry => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segment_core::api::SegmentKey;
    use segment_core::store::{MemoryStore, OverrideOp};

    fn payload(user: &str, op: &str, ts: &str, id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"segment": "growth/vip", "user": user, "op": op, "ts": ts, "id": id})).unwrap()
    }

    fn received<'a>(key: &'a [u8], payload: &'a [u8], offset: u64) -> Received<'a> {
        Received { key: Some(key), payload: Some(payload), offset }
    }

    fn at(ts: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(ts).unwrap().with_timezone(&Utc)
    }

    /// Far after every event of these tests.
    fn latest() -> DateTime<Utc> {
        at("2030-01-01T00:00:00Z")
    }

    async fn served() -> (MemoryStore, SegmentKey) {
        let store = MemoryStore::new();
        let segment = SegmentKey::new("growth", "vip");
        store.load_version(&segment, 1, 1, None, None);
        store.activate(&segment, 1).await.unwrap();
        (store, segment)
    }

    /// What the override recorded for `user` does, if one is: what serving
    /// lays over the index files.
    async fn recorded(store: &MemoryStore, segment: &SegmentKey, user: &str) -> Option<OverrideOp> {
        let all = store.overrides_since(segment, at("2000-01-01T00:00:00Z")).await.unwrap();
        all.into_iter().find(|o| o.user == user).map(|o| o.op)
    }

    #[tokio::test]
    async fn applies_once_and_the_newest_wins() {
        let (store, segment) = served().await;
        let include = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        assert_eq!(apply(&store, &received(b"b", &include, 1), latest()).await.unwrap(), Outcome::Applied);
        assert_eq!(apply(&store, &received(b"b", &include, 1), latest()).await.unwrap(), Outcome::Unchanged, "redelivery");
        assert_eq!(recorded(&store, &segment, "b").await, Some(OverrideOp::Include));

        let exclude = payload("b", "exclude", "2026-11-01T11:00:00Z", "e2");
        assert_eq!(apply(&store, &received(b"b", &exclude, 2), latest()).await.unwrap(), Outcome::Applied);
        let late = payload("b", "include", "2026-11-01T10:30:00Z", "e3");
        assert_eq!(
            apply(&store, &received(b"b", &late, 3), latest()).await.unwrap(),
            Outcome::Unchanged,
            "older than the exclude"
        );
        assert_eq!(recorded(&store, &segment, "b").await, Some(OverrideOp::Exclude));
    }

    #[tokio::test]
    async fn of_two_events_at_the_same_time_the_later_offset_wins() {
        let (store, segment) = served().await;
        let ts = "2026-11-01T10:00:00Z";
        // The producer's ids order the other way: they must not decide.
        let include = payload("b", "include", ts, "z-first");
        let exclude = payload("b", "exclude", ts, "a-second");
        assert_eq!(apply(&store, &received(b"b", &include, 10), latest()).await.unwrap(), Outcome::Applied);
        assert_eq!(apply(&store, &received(b"b", &exclude, 11), latest()).await.unwrap(), Outcome::Applied);
        assert_eq!(recorded(&store, &segment, "b").await, Some(OverrideOp::Exclude), "the exclude came later in the partition");
        // Redelivered after a crash, in order: each is the same offset again.
        assert_eq!(apply(&store, &received(b"b", &include, 10), latest()).await.unwrap(), Outcome::Unchanged);
        assert_eq!(apply(&store, &received(b"b", &exclude, 11), latest()).await.unwrap(), Outcome::Unchanged);
        assert_eq!(recorded(&store, &segment, "b").await, Some(OverrideOp::Exclude));
        let recorded = store.overrides_since(&segment, at("2026-01-01T00:00:00Z")).await.unwrap();
        assert_eq!(recorded.iter().map(|o| (o.id.as_str(), o.offset)).collect::<Vec<_>>(), [("a-second", Some(11))]);
    }

    #[tokio::test]
    async fn an_event_stamped_past_the_allowed_skew_is_rejected_and_changes_nothing() {
        let (store, segment) = served().await;
        let latest = at("2026-11-01T10:05:00Z");
        let ahead = payload("b", "include", "2026-11-01T10:05:01Z", "e1");
        match apply(&store, &received(b"b", &ahead, 1), latest).await.unwrap() {
            Outcome::Rejected(r) => {
                assert_eq!(r.reason, RejectReason::FutureTimestamp);
                assert!(
                    r.message.starts_with("ts: 2026-11-01T10:05:01+00:00 is later than 2026-11-01T10:05:00+00:00"),
                    "{}",
                    r.message
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(store.overrides_since(&segment, at("2026-01-01T00:00:00Z")).await.unwrap().is_empty(), "nothing recorded");
        let on_the_limit = payload("b", "include", "2026-11-01T10:05:00Z", "e2");
        assert_eq!(apply(&store, &received(b"b", &on_the_limit, 2), latest).await.unwrap(), Outcome::Applied);
    }

    #[tokio::test]
    async fn unknown_segments_and_bad_messages_are_rejected_and_outages_are_errors() {
        let store = MemoryStore::new();
        let unknown = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        match apply(&store, &received(b"b", &unknown, 1), latest()).await.unwrap() {
            Outcome::Rejected(r) => assert_eq!(
                (r.reason, r.message.as_str()),
                (RejectReason::UnknownSegment, "segment: growth/vip has no active version")
            ),
            other => panic!("{other:?}"),
        }
        match apply(&store, &received(b"b", b"{", 2), latest()).await.unwrap() {
            Outcome::Rejected(r) => assert_eq!(r.reason, RejectReason::MalformedJson),
            other => panic!("{other:?}"),
        }
        store.set_unavailable(true);
        assert!(matches!(apply(&store, &received(b"b", &unknown, 1), latest()).await, Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn an_outage_is_waited_out_and_a_permanent_error_gives_up_on_the_third_attempt() {
        let down = StoreError::Unavailable("connection refused".into());
        let broken = StoreError::Other("user b: WRONGTYPE Operation against a key holding the wrong kind of value".into());
        let missing = StoreError::MissingVersion { segment: "growth/vip".into(), version: 7 };
        let decide = |results: &[&StoreError]| -> Vec<AfterFailure> {
            let mut failures = Failures::default();
            results.iter().map(|error| failures.after(error)).collect()
        };
        assert!(decide(&[&down; 1000]).iter().all(|d| *d == AfterFailure::Retry), "an outage is retried for ever");

        // Permanent errors count, whatever they are; outages in between do not.
        let decisions = decide(&[&broken, &down, &missing, &down, &broken]);
        assert_eq!(decisions[..4], [AfterFailure::Retry, AfterFailure::Retry, AfterFailure::Retry, AfterFailure::Retry]);
        let AfterFailure::DeadLetter(rejection) = &decisions[4] else { panic!("{decisions:?}") };
        assert_eq!(rejection.reason, RejectReason::StoreError);
        assert_eq!(rejection.reason.label(), "store_error");
        for quoted in ["b", "growth/vip", "WRONGTYPE"] {
            assert!(!rejection.message.contains(quoted), "{quoted:?} in {:?}", rejection.message);
        }
    }

    #[tokio::test]
    async fn a_permanent_store_error_dead_letters_the_message_and_the_next_one_applies() {
        let (store, segment) = served().await;
        let first = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        store.fail_with(Some(StoreError::Other("a script error".into())));
        let mut seen = Vec::new();
        let outcome = apply_with_retry(&store, &received(b"b", &first, 1), latest(), |error, next| {
            seen.push((error.clone(), next.clone()));
            async { true }
        })
        .await;
        match outcome {
            Some(Outcome::Rejected(r)) => assert_eq!(r.reason, RejectReason::StoreError),
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.len(), PERMANENT_ATTEMPTS as usize, "{seen:?}");
        assert!(seen[..2].iter().all(|(_, next)| *next == AfterFailure::Retry));

        store.fail_with(None);
        let second = payload("c", "include", "2026-11-01T10:00:01Z", "e2");
        let outcome = apply_with_retry(&store, &received(b"c", &second, 2), latest(), |_, _| async { true }).await;
        assert_eq!(outcome, Some(Outcome::Applied));
        assert_eq!(recorded(&store, &segment, "c").await, Some(OverrideOp::Include));
    }

    #[tokio::test]
    async fn an_unavailable_store_is_retried_until_the_caller_stops() {
        let (store, segment) = served().await;
        let include = payload("b", "include", "2026-11-01T10:00:00Z", "e1");
        store.set_unavailable(true);
        let mut failures = 0;
        let outcome = apply_with_retry(&store, &received(b"b", &include, 1), latest(), |error, next| {
            assert!(error.is_transient() && *next == AfterFailure::Retry);
            failures += 1;
            let go_on = failures < 50;
            async move { go_on }
        })
        .await;
        assert_eq!((outcome, failures), (None, 50), "never given up on, never dead-lettered");
        store.set_unavailable(false);
        let outcome = apply_with_retry(&store, &received(b"b", &include, 1), latest(), |_, _| async { true }).await;
        assert_eq!(outcome, Some(Outcome::Applied));
        assert_eq!(recorded(&store, &segment, "b").await, Some(OverrideOp::Include));
    }
}
