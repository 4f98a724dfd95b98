//! What `/metrics`, `/healthz` and `/readyz` ([`segment_runtime::probes`])
//! answer for the operator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use segment_runtime::probes::Probe;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Set once the API server answered; a standby replica is ready too.
    pub ready: Arc<AtomicBool>,
}

impl Probe for Health {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn readiness(&self) -> Result<(), &'static str> {
        match self.ready.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err("the Kubernetes API has not answered yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_from_the_metrics_and_the_api_servers_answer() {
        let health = Health { metrics: Arc::new(Metrics::default()), ready: Default::default() };
        assert_eq!(health.readiness(), Err("the Kubernetes API has not answered yet"));
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), Ok(()));
        health.metrics.reconciled(Ok(()), 0.01);
        let text = Probe::metrics(&health);
        assert!(text.contains("segment_operator_reconciles_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("segment_operator_reconcile_duration_seconds_count 1"), "{text}");
    }
}
