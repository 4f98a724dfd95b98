//! `segment-serving`: the serving API. It answers from the active versions'
//! index files (under `--results-uri`) held in memory; Redis holds only
//! aliases, version metadata, overrides, notices and load reports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use segment_core::store::StoreError;
use std::sync::Arc;

use segment_serving::{
    connect_redis, ConnectionLimits, IndexOptions, ResultFiles, Server, ServerOptions, ServingConfig, Shard, Tokens,
};
use tracing::{error, info, warn};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "segment-serving", version, about = "Serves segment membership over HTTP/JSON from index files held in memory.")]
struct Args {
    /// Address of the API (and /healthz, /readyz, /openapi.json).
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of /metrics, apart from the API so a network policy can tell scrapers from API clients.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    /// Most API connections open at once; past it new ones wait in the listen backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// How long a request's headers may take to arrive, from their first byte.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// How long a connection may wait for its next request before it is closed (keep it above the load balancer's).
    #[arg(long, env = "IDLE_TIMEOUT_MS", default_value_t = 75_000)]
    idle_timeout_ms: u64,
    /// The store: redis://host:port[/db] or redis+cluster://host:port,host:port.
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// How long version listings are served from cache (notices drop them sooner).
    #[arg(long, env = "CACHE_TTL_MS", default_value_t = 2000)]
    cache_ttl_ms: u64,
    /// Version listings cached.
    #[arg(long, env = "CACHE_CAPACITY", default_value_t = 10_000)]
    cache_capacity: u64,
    /// Deadline of each store call; past it a request that needs the store (version listings) gets 503.
    #[arg(long, env = "STORE_TIMEOUT_MS", default_value_t = 250)]
    store_timeout_ms: u64,
    /// How often the alias map is re-read even without rollover notices.
    #[arg(long, env = "REFRESH_INTERVAL_MS", default_value_t = 5000)]
    refresh_interval_ms: u64,
    /// Most checks per POST /v1/membership:check.
    #[arg(long, env = "MAX_CHECKS", default_value_t = 1000)]
    max_checks: usize,
    /// YAML or JSON map of bearer token to the namespaces it may read (`*`: all). Without it, auth is off.
    #[arg(long, env = "TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Base URI of the result files (the operator's `--results-uri`): the
    /// active versions' index files are read there (read access suffices).
    #[arg(long, env = "RESULTS_URI")]
    results_uri: String,
    /// This replica's name in load reports, unique among replicas (the pod
    /// name); each process adds a suffix of its own.
    #[arg(long, env = "POD_NAME", default_value = "segment-serving")]
    pod_name: String,
    /// The part of the users this replica holds: `I/N` for shard I of N
    /// (by FNV-1a 64 of the user id modulo N); `0/1` holds everyone.
    #[arg(long, env = "SHARD", default_value = "0/1")]
    shard: Shard,
    /// How long one liveness report lasts; renewed on every alias refresh.
    #[arg(long, env = "REPLICA_LIVENESS_MS", default_value_t = 20_000)]
    replica_liveness_ms: u64,
    /// Serving threads, each with its own store connection; 0: one per CPU
    /// the process may use (its cgroup's CPU limit included).
    #[arg(long, env = "THREADS", default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    log: segment_runtime::LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    segment_runtime::init_tracing(args.log.log_json, "info");
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "stopping");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let tokens = match &args.tokens_file {
        Some(path) => Some(Tokens::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    // The name in the load reports: the pod's, plus one of this process's
    // own, so a restarted container never inherits the reports of the
    // process before it (which held what this one has not loaded yet).
    let replica = format!("{}/{}", args.pod_name, &segment_core::store::new_incarnation()[..8]);
    let index = IndexOptions {
        liveness: Duration::from_millis(args.replica_liveness_ms.max(args.refresh_interval_ms.max(100) * 3)),
        shard: args.shard,
        ..IndexOptions::new(Arc::new(ResultFiles::new(args.results_uri.clone())), replica.clone())
    };
    let config = ServingConfig {
        cache_ttl: Duration::from_millis(args.cache_ttl_ms),
        cache_capacity: args.cache_capacity,
        store_timeout: Duration::from_millis(args.store_timeout_ms.max(1)),
        refresh_interval: Duration::from_millis(args.refresh_interval_ms.max(100)),
        max_checks: args.max_checks,
        tokens,
        ..ServingConfig::new(index)
    };
    let url = args.redis_url.clone();
    let connect = move || {
        let url = url.clone();
        async move { connect_redis(&url).await }
    };
    let options = ServerOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        threads: args.threads,
        limits: ConnectionLimits {
            max_connections: args.max_connections.max(1),
            header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(args.idle_timeout_ms.max(1)),
        },
    };
    let mut server = Server::start(options, config, connect).map_err(|e| e.to_string())?;
    info!(
        listen = %server.address(),
        metrics = %server.metrics_address(),
        threads = server.threads(),
        auth = args.tokens_file.is_some(),
        results = %args.results_uri,
        shard = %args.shard,
        "serving"
    );
    // The serving threads run their own runtimes; this one only waits.
    let waiting = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("a runtime: {e}"))?;
    waiting.block_on(async {
        tokio::select! {
            _ = segment_runtime::shutdown_signal() => {}
            _ = server.stopped() => warn!("a serving thread stopped; shutting down"),
        }
        {
            // Withdrawn from the load reports at once, so a switch in the
            // next seconds does not wait for a replica that is going away.
            let gone = async { connect_redis(&args.redis_url).await?.replica_gone(&replica).await };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), gone)
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("timed out".into())))
            {
                warn!(error = %e, "withdrawing from the load reports failed; its liveness runs out instead");
            }
        }
    });
    server.shutdown().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_follows_the_naming_rule() {
        segment_runtime::config::assert_follows_naming_rule(&Args::command(), &[]);
    }
}
