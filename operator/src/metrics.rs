//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use segment_core::planner::{Action, Plan};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub namespace: String,
    pub segment: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    /// Runs by outcome: started, succeeded, failed, held, cancelled.
    pub runs: Family<ResultLabel, Counter>,
    pub members: Family<SegmentLabels, Gauge>,
    pub jobs_created: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segment_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let runs = Family::<ResultLabel, Counter>::default();
        let members = Family::<SegmentLabels, Gauge>::default();
        let jobs_created = Counter::default();
        registry.register("reconciles", "Reconciles by result (ok, error)", reconciles.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_seconds.clone());
        registry.register("runs", "Segment runs by result", runs.clone());
        registry.register("segment_members", "Members of the active version", members.clone());
        registry.register("jobs_created", "Compute and ingest Jobs created", jobs_created.clone());
        Metrics { registry, reconciles, reconcile_seconds, runs, members, jobs_created }
    }
}

impl Metrics {
    pub fn reconciled(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ResultLabel { result: result.to_string() }).inc();
        self.reconcile_seconds.observe(seconds);
    }

    /// Counts the run outcomes a plan reports through its events.
    pub fn record_plan(&self, namespace: &str, segment: &str, plan: &Plan) {
        for action in &plan.actions {
            let Action::Event(event) = action else { continue };
            let result = match event.reason.as_str() {
                "RunStarted" => "started",
                "VersionReady" => "succeeded",
                "RunFailed" => "failed",
                "RolloverHeld" => "held",
                "RunCancelled" => "cancelled",
                _ => continue,
            };
            self.runs.get_or_create(&ResultLabel { result: result.to_string() }).inc();
        }
        let labels = SegmentLabels { namespace: namespace.to_string(), segment: segment.to_string() };
        match plan.status.members {
            Some(members) => {
                self.members.get_or_create(&labels).set(members as i64);
            }
            None => {
                self.members.remove(&labels);
            }
        }
    }

    pub fn forget(&self, namespace: &str, segment: &str) {
        self.members.remove(&SegmentLabels { namespace: namespace.to_string(), segment: segment.to_string() });
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
