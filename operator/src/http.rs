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
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get(health: &Health, path: &str) -> (StatusCode, String) {
        let router = segment_runtime::probes::router(Arc::new(health.clone()));
        let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let health = Health { metrics: Arc::new(Metrics::default()), ready: Default::default() };
        assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);
        health.metrics.reconciled(Ok(()), 0.01);
        let (status, text) = get(&health, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("segment_operator_reconciles_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("segment_operator_reconcile_duration_seconds_count 1"), "{text}");
    }
}
