//! The serving API over a real Redis, with an open-loop load generator
//! (`oha -q`, from crates.io) at fixed rates, cache hits and misses, and
//! its maximum throughput (`oha`, and `wrk`, a C load generator as light as
//! `redis-benchmark`) next to `redis-benchmark` GET on the same Redis.
//!
//! cargo install oha; apt-get install wrk
//! cargo run --release -p segment-bench --bin serving -- [seconds per rate]

use std::process::Command;
use std::sync::Arc;

use segment_bench::{redis_benchmark, row};
use segment_core::api::SegmentKey;
use segment_core::store::SegmentStore;
use segment_serving::{router, AppState, ServingConfig};
use segment_store::redis::RedisStore;
use segment_tests::RedisServer;

/// The allocator of the `segment-serving` binary, so the router measured
/// here in process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u64 = 200_000;
const SEGMENTS: u64 = 10;

/// Runs oha and returns (requests/s, p50, p99, p99.9 in ms, success ratio).
fn oha(args: &[String]) -> (f64, f64, f64, f64, f64) {
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json"])
        .args(args)
        .output()
        .expect("oha runs (cargo install oha)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let ms = |key: &str| report["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let rps = report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0);
    let ok = report["summary"]["successRate"].as_f64().unwrap_or(0.0);
    (rps, ms("p50"), ms("p99"), ms("p99.9"), ok)
}

/// Runs wrk (closed loop, one thread, 64 connections) on random users and
/// returns (requests/s, p50, p99 in ms, failed requests).
fn wrk(base: &str, seconds: u64) -> (f64, f64, f64, u64) {
    let script = tempfile::Builder::new().suffix(".lua").tempfile().expect("a temp file");
    std::fs::write(
        script.path(),
        format!(
            "math.randomseed(7)\nrequest = function()\n  return wrk.format(\"GET\", string.format(\"/v1/users/u%07d/segments\", math.random(0, {})))\nend\n",
            USERS - 1
        ),
    )
    .expect("the wrk script");
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
    (rps, ms(field("50%")), ms(field("99%")), failed)
}

/// Serving runs in this process on `SERVING_WORKER_THREADS` Tokio worker
/// threads (default 2, the machine's cores, as `segment-serving` uses), to
/// see whether fewer threads than cores help when the load generator and
/// Redis share them.
fn main() {
    let workers = std::env::var("SERVING_WORKER_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    println!("serving on {workers} Tokio worker thread(s)");
    tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().expect("a runtime").block_on(run());
}

async fn run() {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.expect("redis");
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
    let state = AppState::new(Arc::new(store), ServingConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let base = format!("http://{}", listener.local_addr().expect("an address"));
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let ready = format!("{base}/readyz");
    for _ in 0..100 {
        if Command::new("curl").args(["-sf", "-o", "/dev/null", &ready]).status().is_ok_and(|s| s.success()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let duration = format!("{seconds}s");
    let hit = format!("{base}/v1/users/u0000042/segments");
    let miss = format!("{base}/v1/users/u0[0-1][0-9]{{5}}/segments");
    println!("serving benchmark: {SEGMENTS} segments x {USERS} users in Redis, {seconds}s per run, oha -q (open loop, latency corrected)");
    println!(
        "{:<28} {:>10} {:>12} {:>9} {:>9} {:>9} {:>8}",
        "run", "offered", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "ok"
    );
    let port = redis.port;
    let report = tokio::task::spawn_blocking(move || {
        for (name, url, regex) in [("users route, cache hit", &hit, false), ("users route, cache miss", &miss, true)] {
            for rate in [5_000u32, 10_000, 20_000] {
                let mut args = vec!["-z".to_string(), duration.clone(), "-q".into(), rate.to_string(), "-c".into(), "64".into()];
                args.push("--latency-correction".into());
                if regex {
                    args.push("--rand-regex-url".into());
                }
                args.push(url.clone());
                let (rps, p50, p99, p999, ok) = oha(&args);
                println!("{name:<28} {rate:>10} {rps:>12.0} {p50:>9.3} {p99:>9.3} {p999:>9.3} {ok:>8.3}");
            }
        }
        let (max_rps, p50, p99, p999, ok) =
            oha(&["-z".into(), duration.clone(), "-c".into(), "64".into(), "--rand-regex-url".into(), miss.clone()]);
        println!("{:<28} {:>10} {max_rps:>12.0} {p50:>9.3} {p99:>9.3} {p999:>9.3} {ok:>8.3}", "max throughput, cache miss", "-");
        let (wrk_rps, p50, p99, failed) = wrk(&base, seconds);
        let ok = if failed == 0 { "all".to_string() } else { format!("{failed} failed") };
        println!("{:<28} {:>10} {wrk_rps:>12.0} {p50:>9.3} {p99:>9.3} {:>9} {ok:>8}", "max, cache miss (wrk)", "-", "-");
        let get = redis_benchmark(port, 1_000_000, 1, &["GET", "key:__rand_int__"]);
        (max_rps, wrk_rps, get)
    })
    .await
    .expect("the load runs");
    let (oha_max, wrk_max, ceiling) = report;
    row("redis-benchmark GET, -c 16 (ceiling)", ceiling, "requests/s");
    row("serving max (oha) / ceiling", 100.0 * oha_max / ceiling, "%");
    row("serving max (wrk) / ceiling", 100.0 * wrk_max / ceiling, "%");
}
