//! `/metrics`, `/healthz` and `/readyz` over anything that can encode its
//! metrics and say whether it is ready.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// What the probes ask of a binary.
pub trait Probe: Send + Sync + 'static {
    /// The metrics in the OpenMetrics text format.
    fn metrics(&self) -> String;
    /// `Ok` when ready for traffic (or, for a controller, to lead); else
    /// why not, for the probe's body.
    fn readiness(&self) -> Result<(), &'static str>;
}

pub fn router(probe: Arc<dyn Probe>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(probe)
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], probe.metrics())
}

async fn readyz(State(probe): State<Arc<dyn Probe>>) -> impl IntoResponse {
    match probe.readiness() {
        Ok(()) => (StatusCode::OK, "ready".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
    }
}

/// Serves the probes on a listener bound by the caller (so a taken port
/// fails at start) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn Probe>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(probe)).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    struct Fixed(AtomicBool);

    impl Probe for Fixed {
        fn metrics(&self) -> String {
            "up 1\n# EOF\n".into()
        }
        fn readiness(&self) -> Result<(), &'static str> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("still starting")
            }
        }
    }

    async fn get(probe: &Arc<Fixed>, path: &str) -> (StatusCode, String) {
        let router = router(probe.clone());
        let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn probes_answer_from_the_binary() {
        let probe = Arc::new(Fixed(AtomicBool::new(false)));
        assert_eq!(get(&probe, "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(&probe, "/readyz").await, (StatusCode::SERVICE_UNAVAILABLE, "not ready: still starting".into()));
        probe.0.store(true, Ordering::Relaxed);
        assert_eq!(get(&probe, "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(&probe, "/metrics").await, (StatusCode::OK, "up 1\n# EOF\n".into()));
    }
}
