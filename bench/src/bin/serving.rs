//! The serving API over a real Redis: `oha -q` (open loop, from crates.io)
//! at fixed rates for cache hits and misses, then the maximum throughput of
//! each with `wrk` (a C event loop as light per request as
//! `redis-benchmark`, so the ratio compares the two servers rather than two
//! clients), next to `redis-benchmark` GET on the same Redis.
//!
//! cargo install oha; apt-get install wrk
//! cargo run --release -p segment-bench --bin serving -- [seconds per run]
//!
//! Serving runs as `segment-serving` does ([`Server`]), on `SERVING_THREADS`
//! threads (default 1; 0 is one per CPU, the binary's default); the load
//! generator, serving and Redis share the machine.

use std::process::Command;

use segment_bench::{redis_benchmark, row};
use segment_core::api::SegmentKey;
use segment_core::store::SegmentStore;
use segment_serving::{connect_redis, ConnectionLimits, Server, ServerOptions, ServingConfig};
use segment_store::redis::RedisStore;
use segment_tests::RedisServer;

/// The allocator of the `segment-serving` binary, so the server measured
/// here in process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u64 = 200_000;
const SEGMENTS: u64 = 10;
/// Far fewer entries than users, so random users miss the cache (the run
/// prints the share that hit).
const CACHE_CAPACITY: u64 = 10_000;
/// Rounds of (ceiling, maximum on hits, maximum on misses).
const ROUNDS: usize = 3;

/// What one load run measured.
struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// Requests that did not get a 2xx.
    failed: u64,
}

/// Runs oha and returns its figures (latencies in ms).
fn oha(args: &[String]) -> Figures {
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json"])
        .args(args)
        .output()
        .expect("oha runs (cargo install oha)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let ms = |key: &str| report["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let statuses = report["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let failed = statuses.iter().filter(|(code, _)| !code.starts_with('2')).map(|(_, n)| n.as_u64().unwrap_or(0)).sum::<u64>()
        + report["errorDistribution"].as_object().map_or(0, |e| e.values().map(|n| n.as_u64().unwrap_or(0)).sum());
    Figures {
        rps: report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50: ms("p50"),
        p99: ms("p99"),
        p999: ms("p99.9"),
        failed,
    }
}

/// Runs wrk (closed loop, one thread, 64 connections) on `path`, or on
/// random users when `path` is `None`, and returns its figures (wrk prints
/// no p99.9).
fn wrk(base: &str, path: Option<&str>, seconds: u64) -> Figures {
    let script = tempfile::Builder::new().suffix(".lua").tempfile().expect("a temp file");
    let lua = match path {
        Some(path) => format!("request = function()\n  return wrk.format(\"GET\", \"{path}\")\nend\n"),
        None => format!(
            "math.randomseed(7)\nrequest = function()\n  return wrk.format(\"GET\", string.format(\"/v1/users/u%07d/segments\", math.random(0, {})))\nend\n",
            USERS - 1
        ),
    };
    std::fs::write(script.path(), lua).expect("the wrk script");
    let out = Command::new("wrk")
        .args(["-t1", "-c64", "--latency", &format!("-d{seconds}s"), "-s"])
        .arg(script.path())
        .arg(base)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()));
    let ms = |value: Option<String>| {
        let value = value.unwrap_or_default();
        let (number, scale) = if let Some(v) = value.strip_suffix("us") {
            (v, 0.001)
        } else if let Some(v) = value.strip_suffix("ms") {
            (v, 1.0)
        } else if let Some(v) = value.strip_suffix('s') {
            (v, 1000.0)
        } else {
            (value.as_str(), f64::NAN)
        };
        number.parse::<f64>().map_or(f64::NAN, |n| n * scale)
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no figure in wrk output: {text}"));
    let failed =
        field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0) + field("Socket errors:").map_or(0, |_| 1);
    Figures { rps, p50: ms(field("50%")), p99: ms(field("99%")), p999: f64::NAN, failed }
}

/// The users cache's (hits, misses) so far, from serving's `/metrics`
/// (`metrics`: the metrics port's base URL).
fn users_cache(metrics: &str) -> (f64, f64) {
    let out = Command::new("curl").args(["-sf", "-m", "5", &format!("{metrics}/metrics")]).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("segment_serving_{name}_total{{cache=\"users\"}} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (value("cache_hits"), value("cache_misses"))
}

/// Runs `load` and prints its figures with the share of requests the users
/// cache answered meanwhile.
fn measured(name: &str, offered: &str, metrics: &str, load: impl FnOnce() -> Figures) -> Figures {
    let (hits_before, misses_before) = users_cache(metrics);
    let figures = load();
    let (hits, misses) = users_cache(metrics);
    let hit_ratio = 100.0 * (hits - hits_before) / ((hits - hits_before) + (misses - misses_before)).max(1.0);
    let Figures { rps, p50, p99, p999, failed } = figures;
    println!("{name:<26} {offered:>8} {rps:>11.0} {p50:>8.3} {p99:>8.3} {p999:>9.3} {hit_ratio:>6.1}% {failed:>7}");
    figures
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    // One thread: on 2 cores shared with Redis and the load generator, a
    // second serving thread costs more in context switches than it adds
    // (docs/benchmarks.md has both). 0 is the binary's default, one per CPU.
    let threads: usize = std::env::var("SERVING_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let redis = RedisServer::start();
    let url = redis.url();
    let loading = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    loading.block_on(async {
        let store = RedisStore::connect(&url).await.expect("redis");
        // Each user is in about half of the segments.
        for s in 0..SEGMENTS {
            let key = SegmentKey::new("bench", format!("segment-{s}"));
            let members: Vec<String> = (0..USERS).filter(|u| (u * 7 + s * 13) % 2 == 0).map(|u| format!("u{u:07}")).collect();
            for chunk in members.chunks(10_000) {
                store.load_members(&key, 1, chunk).await.expect("load");
            }
            store.seal_version(&key, 1, None, None).await.expect("seal");
            store.activate(&key, 1).await.expect("activate");
        }
    });
    drop(loading);

    let config = ServingConfig { cache_capacity: CACHE_CAPACITY, ..ServingConfig::default() };
    let connect = move || {
        let url = url.clone();
        async move { connect_redis(&url).await }
    };
    let any = "127.0.0.1:0".parse().expect("an address");
    let options = ServerOptions { listen: any, metrics_listen: any, threads, limits: ConnectionLimits::default() };
    let server = Server::start(options, config, connect).expect("serving starts");
    let threads = server.threads();
    let base = format!("http://{}", server.address());
    let metrics = format!("http://{}", server.metrics_address());
    let ready = format!("{base}/readyz");
    for _ in 0..100 {
        if Command::new("curl").args(["-sf", "-m", "1", "-o", "/dev/null", &ready]).status().is_ok_and(|s| s.success()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let hit_path = "/v1/users/u0000042/segments";
    let hit = format!("{base}{hit_path}");
    let miss = format!("{base}/v1/users/u0[0-1][0-9]{{5}}/segments");
    println!(
        "serving benchmark: {SEGMENTS} segments x {USERS} users in Redis, serving on {threads} thread(s), cache of {CACHE_CAPACITY} users, {seconds}s per run"
    );
    println!("fixed rates: oha -q (open loop, latency corrected, 64 connections, 1 worker thread); maximum: wrk (1 thread, 64 connections)");
    println!(
        "{:<26} {:>8} {:>11} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "run", "offered", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "hits", "failed"
    );
    let duration = format!("{seconds}s");
    for (name, url, random) in [("users, cache hit", &hit, false), ("users, cache miss", &miss, true)] {
        for rate in [5_000u32, 10_000, 20_000] {
            let mut args: Vec<String> =
                ["-z", &duration, "-q", &rate.to_string(), "-c", "64", "--worker-threads", "1"].map(String::from).into();
            // -w: requests still in flight at the end are awaited, not
            // counted as failed.
            args.extend(["--latency-correction".into(), "-w".into()]);
            if random {
                args.push("--rand-regex-url".into());
            }
            args.push(url.clone());
            measured(name, &rate.to_string(), &metrics, || oha(&args));
        }
    }
    // The machine's speed drifts between runs (a shared VM): each round
    // measures the ceiling next to serving's maxima, the ratio is per
    // round, and the median round is reported.
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let ceiling = redis_benchmark(redis.port, 500_000, 1, &["GET", "key:__rand_int__"]);
        row(&format!("redis-benchmark GET, -c 16 (ceiling) #{round}"), ceiling, "requests/s");
        let hit_max = measured(&format!("max, cache hit (wrk) #{round}"), "-", &metrics, || wrk(&base, Some(hit_path), seconds));
        let miss_max = measured(&format!("max, cache miss (wrk) #{round}"), "-", &metrics, || wrk(&base, None, seconds));
        rounds.push((ceiling, 100.0 * hit_max.rps / ceiling, 100.0 * miss_max.rps / ceiling));
    }
    let median = |pick: fn(&(f64, f64, f64)) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    row("redis-benchmark GET, median of rounds", median(|r| r.0), "requests/s");
    row("serving max, cache hit / ceiling, median", median(|r| r.1), "%");
    row("serving max, cache miss / ceiling, median", median(|r| r.2), "%");
    server.shutdown().expect("serving stops cleanly");
}
