//! `segment-runtime`: what every binary of the project does the same way.
//!
//! - [`LogArgs`] and [`init_tracing`]: `--log-json`, `RUST_LOG`, one
//!   subscriber setup;
//! - [`shutdown_signal`]: SIGTERM (Kubernetes stopping the pod) or Ctrl-C;
//! - [`probes`]: `/metrics`, `/healthz` and `/readyz` for the binaries
//!   whose only HTTP surface they are (the operator, the realtime worker);
//! - [`config`]: the one naming rule of settings (every setting a flag,
//!   its environment fallback the flag's name in upper snake case), which
//!   each binary's tests check with [`config::env_name_violations`].

pub mod config;
pub mod probes;

use tracing::{info, warn};

/// The logging flag every long-running binary takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log as JSON lines (production) instead of text. `RUST_LOG` sets
    /// the filter.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// Installs the process's log subscriber: `RUST_LOG` when set, else
/// `default_filter`; JSON lines or text, on stderr (stdout is for what a
/// command prints: a worker's report, standalone mode's story).
pub fn init_tracing(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second call (tests, a binary that initialises twice) keeps the
    // first subscriber rather than panicking.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C),
/// saying which.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => info!("SIGINT: shutting down"),
        _ = terminate => info!("SIGTERM: shutting down"),
    }
}
