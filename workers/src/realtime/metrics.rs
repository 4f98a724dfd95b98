//! The realtime worker's counters and its `/metrics`, `/healthz` and
//! `/readyz` endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
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
        registry.register("store_errors", "Store calls that failed and were retried", store_errors.clone());
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

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(encode))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn encode(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: not subscribed yet, or the store has not answered")
    }
}

/// Serves on a listener bound by the caller, so a taken port fails at start.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).with_graceful_shutdown(shutdown).await
}
