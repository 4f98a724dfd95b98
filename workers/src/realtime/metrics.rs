//! The realtime worker's counters, and what its `/metrics`, `/healthz`
//! and `/readyz` endpoints ([`segment_runtime::probes`]) answer.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// One label, `name="value"`: every family here is split by a single
/// fixed set of values.
type Label = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    messages: Family<Label, Counter>,
    dead_letters: Family<Label, Counter>,
    store_errors: Counter,
    kafka_errors: Family<Label, Counter>,
    change_events: Family<Label, Counter>,
    announcements: Family<Label, Counter>,
    /// Set once the consumer is subscribed and the store answered.
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segment_realtime");
        let messages = Family::default();
        registry.register(
            "messages",
            "Membership messages handled, by outcome (applied, unchanged, dead_lettered)",
            messages.clone(),
        );
        let dead_letters = Family::default();
        registry.register("dead_letters", "Messages sent to the dead-letter topic, by reason", dead_letters.clone());
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Store calls that failed (retried, or given up on after a permanent error)",
            store_errors.clone(),
        );
        let kafka_errors = Family::default();
        registry.register("kafka_errors", "Kafka errors, by where (consume, dead_letter, changes, commit)", kafka_errors.clone());
        let change_events = Family::default();
        registry.register("change_events", "Entered/exited events published", change_events.clone());
        let announcements = Family::default();
        registry.register("announcements", "Versions whose changes were handled, by result", announcements.clone());
        Metrics {
            registry,
            messages,
            dead_letters,
            store_errors,
            kafka_errors,
            change_events,
            announcements,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn message(&self, outcome: &'static str) {
        self.messages.get_or_create(&[("outcome", outcome)]).inc();
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    pub fn kafka_error(&self, place: &'static str) {
        self.kafka_errors.get_or_create(&[("place", place)]).inc();
    }

    pub fn change_events(&self, entered: u64, exited: u64) {
        self.change_events.get_or_create(&[("change", "entered")]).inc_by(entered);
        self.change_events.get_or_create(&[("change", "exited")]).inc_by(exited);
    }

    pub fn announcement(&self, result: &'static str) {
        self.announcements.get_or_create(&[("result", result)]).inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl segment_runtime::probes::Probe for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn readiness(&self) -> Result<(), &'static str> {
        match self.ready.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err("not subscribed yet, or the store has not answered"),
        }
    }
}
