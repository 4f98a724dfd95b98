//! Prometheus metrics of the serving API, served on `/metrics` of the
//! metrics port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `users`, `members` or `versions`.
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    pub operation: &'static str,
    /// `unavailable` (down, slow, timed out) or `other`.
    pub kind: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    store_errors: Family<StoreErrorLabels, Counter>,
    rollover_notices: Counter,
    feed_reconnects: Counter,
    open_connections: Gauge,
    connection_timeouts: Counter,
    index_load_seconds: Histogram,
    index_bytes: Gauge,
    index_memberships: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s: the 2 ms p99 goal sits in the fine buckets, a store
    // timeout in the coarse ones.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segment_serving");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        let cache_hits = Family::<CacheLabels, Counter>::default();
        let cache_misses = Family::<CacheLabels, Counter>::default();
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        let rollover_notices = Counter::default();
        let feed_reconnects = Counter::default();
        let open_connections = Gauge::default();
        let connection_timeouts = Counter::default();
        // 10 ms .. ~80 s: from a small segment's index to a large one's over a slow link.
        let index_load_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let index_bytes = Gauge::default();
        let index_memberships = Gauge::default();
        registry.register("http_requests", "HTTP requests by route, method and status code", requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer a request, by route", request_seconds.clone());
        registry.register("cache_hits", "Answers found in the in-process cache", cache_hits.clone());
        registry.register("cache_misses", "Answers the store had to give", cache_misses.clone());
        registry.register("store_errors", "Failed or timed-out store calls", store_errors.clone());
        registry.register("rollover_notices", "Rollover notices received", rollover_notices.clone());
        registry.register("rollover_feed_reconnects", "Times the rollover feed was (re)subscribed", feed_reconnects.clone());
        registry.register("open_connections", "Client connections open now, over every serving thread", open_connections.clone());
        registry.register(
            "connection_timeouts",
            "Client connections closed because their request headers or their next request did not come in time",
            connection_timeouts.clone(),
        );
        registry.register("index_load_seconds", "Time to fetch and verify one version's index file", index_load_seconds.clone());
        registry.register(
            "index_bytes",
            "Bytes held in memory for the versions: index files, with their prefilters and block directories",
            index_bytes.clone(),
        );
        registry.register("index_memberships", "Memberships in the index files held in memory", index_memberships.clone());
        Metrics {
            registry,
            index_load_seconds,
            index_bytes,
            index_memberships,
            requests,
            request_seconds,
            cache_hits,
            cache_misses,
            store_errors,
            rollover_notices,
            feed_reconnects,
            open_connections,
            connection_timeouts,
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, method: &'static str, code: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route, method, code }).inc();
        self.request_seconds.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    pub fn cache(&self, cache: &'static str, hits: u64, misses: u64) {
        let labels = CacheLabels { cache };
        if hits > 0 {
            self.cache_hits.get_or_create(&labels).inc_by(hits);
        }
        if misses > 0 {
            self.cache_misses.get_or_create(&labels).inc_by(misses);
        }
    }

    pub fn store_error(&self, operation: &'static str, unavailable: bool) {
        let kind = if unavailable { "unavailable" } else { "other" };
        self.store_errors.get_or_create(&StoreErrorLabels { operation, kind }).inc();
    }

    pub fn rollover_notice(&self) {
        self.rollover_notices.inc();
    }

    pub fn feed_reconnect(&self) {
        self.feed_reconnects.inc();
    }

    /// A connection opened (`true`) or closed.
    pub fn connection(&self, opened: bool) {
        if opened {
            self.open_connections.inc();
        } else {
            self.open_connections.dec();
        }
    }

    pub fn index_loaded(&self, seconds: f64) {
        self.index_load_seconds.observe(seconds);
    }

    /// What the index files held now take, and hold.
    pub fn index_held(&self, bytes: u64, memberships: u64) {
        self.index_bytes.set(bytes as i64);
        self.index_memberships.set(memberships as i64);
    }

    pub fn connection_timeout(&self) {
        self.connection_timeouts.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
