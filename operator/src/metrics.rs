//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use segment_core::planner::{Action, Plan};
use segment_core::reasons::EventReason;

use crate::reconcile;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub namespace: String,
    pub segment: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    /// Failed reconciles by kind (`reconcile::Error::metric_label`).
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconcile_seconds: Histogram,
    /// Runs by outcome: started, succeeded, failed, held, cancelled.
    pub runs: Family<ResultLabel, Counter>,
    pub members: Family<SegmentLabels, Gauge>,
    pub jobs_created: Counter,
    /// Reconciles running now.
    pub reconciles_in_flight: Gauge,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Terms that ended because the lease could not be renewed in time.
    pub leadership_lost: Counter,
    /// Requests this process sent to the API server, by verb and resource.
    pub kube_requests: crate::api_requests::RequestCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segment_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let runs = Family::<ResultLabel, Counter>::default();
        let members = Family::<SegmentLabels, Gauge>::default();
        let jobs_created = Counter::default();
        let leader = Gauge::default();
        let reconciles_in_flight = Gauge::default();
        let leadership_lost = Counter::default();
        let kube_requests = crate::api_requests::RequestCounter::default();
        registry.register("reconciles", "Reconciles by result (ok, conflict, error)", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles by kind of error", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_seconds.clone());
        registry.register("runs", "Segment runs by result", runs.clone());
        registry.register("segment_members", "Members of the active version", members.clone());
        registry.register("jobs_created", "Compute and ingest Jobs created", jobs_created.clone());
        registry.register("reconciles_in_flight", "Reconciles running now", reconciles_in_flight.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        registry.register(
            "leadership_lost",
            "Terms as leader that ended because the lease was not renewed in time",
            leadership_lost.clone(),
        );
        registry.register(
            "kube_requests",
            "Requests sent to the Kubernetes API server, by verb and resource",
            kube_requests.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            runs,
            members,
            jobs_created,
            reconciles_in_flight,
            leader,
            leadership_lost,
            kube_requests,
        }
    }
}

impl Metrics {
    /// Counts a reconcile as running until the returned guard drops (when
    /// it finishes, or is abandoned with a lost term).
    pub fn reconcile_started(&self) -> impl Drop + '_ {
        struct InFlight<'a>(&'a Gauge);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.reconciles_in_flight.inc();
        InFlight(&self.reconciles_in_flight)
    }

    /// Counts a reconcile by outcome, and failures by kind. A status-write
    /// conflict is routine (planned again at once on fresh data), and so
    /// is a rollover waiting for serving replicas to load its version
    /// (looked at again every second, for up to the load timeout): both
    /// are counted apart from errors, so an alert on the error rate does
    /// not fire on every rollover.
    pub fn reconciled(&self, outcome: Result<(), &reconcile::Error>, seconds: f64) {
        let result = match outcome {
            Ok(()) => "ok",
            Err(error @ (reconcile::Error::Conflict | reconcile::Error::WaitingForReplicas { .. })) => error.metric_label(),
            Err(error) => {
                self.reconcile_errors.get_or_create(&ErrorLabel { error: error.metric_label() }).inc();
                "error"
            }
        };
        self.reconciles.get_or_create(&ResultLabel { result: result.to_string() }).inc();
        self.reconcile_seconds.observe(seconds);
    }

    /// Counts the run outcomes a plan reports through its events.
    pub fn record_plan(&self, namespace: &str, segment: &str, plan: &Plan) {
        for action in &plan.actions {
            let Action::Event(event) = action else { continue };
            let Some(result) = run_outcome(event.reason) else { continue };
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

/// The `runs` outcome an Event reports, if it reports one.
fn run_outcome(reason: EventReason) -> Option<&'static str> {
    match reason {
        EventReason::RunStarted => Some("started"),
        EventReason::VersionReady => Some("succeeded"),
        EventReason::RunFailed => Some("failed"),
        EventReason::RolloverHeld => Some("held"),
        EventReason::RunCancelled => Some("cancelled"),
        EventReason::MissedSchedule
        | EventReason::VersionLost
        | EventReason::VersionDeleted
        | EventReason::VersionDiscarded
        | EventReason::RolledOver
        | EventReason::RolledBack
        | EventReason::WaitingForReplicas
        | EventReason::ReplicaLoadTimedOut
        | EventReason::InvalidDefinition
        | EventReason::InvalidSchedule
        | EventReason::InvalidSpec
        | EventReason::NotAllowed => None,
    }
}
