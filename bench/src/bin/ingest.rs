//! Ingest throughput into a real Redis, next to `redis-benchmark -P 64`
//! for the same commands on the same server, and Redis memory per
//! membership.
//!
//! cargo run --release -p segment-bench --bin ingest -- [memberships]

use chrono::Utc;
use segment_bench::{redis_benchmark, redis_used_memory, row};
use segment_core::api::SegmentKey;
use segment_core::manifest::{Manifest, FORMAT};
use segment_core::task::IngestTask;
use segment_store::redis::RedisStore;
use segment_store::results::ResultDir;
use segment_tests::RedisServer;

const PART: usize = 500_000;

#[tokio::main]
async fn main() {
    let members: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let segment = SegmentKey::new("bench", "ingest");
    let uri = format!("file://{}/v1/", dir.path().display());
    let results = ResultDir::open(&uri).expect("results dir");
    let ids: Vec<String> = (0..members).map(|i| format!("user-{i:09}")).collect();
    let mut parts = Vec::new();
    for (i, chunk) in ids.chunks(PART).enumerate() {
        parts.push(results.write_part(i, chunk.iter().map(String::as_str)).await.expect("part written"));
    }
    let now = Utc::now();
    let manifest = Manifest {
        format: FORMAT.into(),
        segment: segment.clone(),
        version: 1,
        generation: 1,
        definition_hash: "bench".into(),
        snapshot_time: now,
        computed_at: now,
        members: members as u64,
        parts,
        index: None,
        sources: Vec::new(),
    };
    results.write_manifest(&manifest).await.expect("manifest written");
    drop(ids);

    let store = RedisStore::connect(&redis.url()).await.expect("redis");
    let before = redis_used_memory(redis.port);
    let task = IngestTask {
        segment,
        version: 1,
        snapshot_time: now,
        results_uri: uri,
        max_failed_parts: 0,
        compare_with: None,
        overrides_from: None,
    };
    let start = std::time::Instant::now();
    let report = segment_compute::ingest::run(&task, &store).await.expect("ingest");
    let seconds = start.elapsed().as_secs_f64();
    let after = redis_used_memory(redis.port);
    assert_eq!(report.members as usize, members);

    let rate = members as f64 / seconds;
    let requests = (members as u64).max(1_000_000);
    let hset = redis_benchmark(redis.port, requests, 64, &["HSET", "sg:u:{__rand_int__}", "bench/ceiling#1", "1"]);
    let sadd = redis_benchmark(redis.port, requests, 64, &["SADD", "sg:{bench/ceiling}:v1", "__rand_int__"]);
    // Each membership is one HSET on the user's key plus one element of a
    // variadic SADD: the pipelined HSET rate is the ceiling.
    println!("ingest benchmark: {members} memberships, one redis-server on loopback");
    row("segment-worker ingest", rate, "memberships/s");
    row("redis-benchmark -P 64 HSET (ceiling)", hset, "requests/s");
    row("redis-benchmark -P 64 SADD", sadd, "requests/s");
    row("ingest / ceiling", 100.0 * rate / hset, "%");
    row("ingest wall time", seconds, "s");
    row("redis memory per membership", (after.saturating_sub(before)) as f64 / members as f64, "bytes");
}
