//! The serving API, measured against the goals of serving from index files
//! (docs/benchmarks.md, "Serving from index files"):
//!
//! - 10M memberships over 20 segments of varied sizes, from a universe of
//!   2M users `user-<7 digits>`, written as result files (parts, index,
//!   manifest, by `segment_tests::write_result`, compute's layout) to a
//!   local S3 server (moto) and sealed in a real Redis with no members
//!   there; Redis holds only the small state (aliases, notices, reports).
//! - replica ready: [`Server`] started in index mode, as `segment-serving
//!   --results-uri` runs it, until `/readyz` answers 200;
//! - bytes per membership: the replica's own `index_bytes / index_memberships`
//!   (the index files and the prefilter and block directory built over
//!   each when loaded; the index files alone as the writer measured them)
//!   and this process's resident memory grown while the replica loaded, per
//!   membership (the data is written by a child process, so none of it is
//!   in this one); the same members as random 32-hex ids, index bytes only;
//! - the users route on random users (serving keeps no response cache):
//!   latency at fixed rates from `oha -q` and from [`segment_bench::load`]
//!   (open loop, light enough to measure under a millisecond: the goal
//!   lines take its figures), the maximum from `wrk` and from `load` in
//!   closed loop (the higher counts), each round next to
//!   `redis-benchmark` GET on the same Redis;
//! - the is-member route on random (segment, user) pairs, the same way;
//! - floors, measured the same way: a fixed-answer HTTP responder built as
//!   serving is (what any server of this design could reach, lookups and
//!   HTTP parsing free) and serving's own `/healthz` (its HTTP stack
//!   without a lookup);
//! - files to served: a 10M-member version, sealed and its files written,
//!   until the running replica answers from it (load request, held,
//!   activated, answered), next to one GET of its index file from the same
//!   server.
//!
//! cargo install oha; apt-get install wrk; bash tests/setup (moto, redis)
//! cargo run --release -p segment-bench --bin serving -- [seconds per run]
//!
//! `RESULTS=file` writes the result files to a local directory (`file://`)
//! instead of moto; `MEMBERSHIPS` scales the data down for a quick check.
//! Serving runs on `SERVING_THREADS` threads (default 1;
//! 0 is one per CPU, the binary's default); the load generator, serving,
//! Redis and moto share the machine.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use segment_bench::load::{self, Pace};
use segment_bench::{cpu, redis_benchmark, row, rss_bytes};
use segment_core::api::SegmentKey;
use segment_core::index::IdSetWriter;
use segment_core::naming::results_uri;
use segment_core::store::{ReplicaRegistry, Seal, SegmentStore};
use segment_serving::{
    connect_redis, ConnectionLimits, IndexOptions, IndexSource, ResultFiles, Server, ServerOptions, ServingConfig,
    THREAD_NAME_PREFIX,
};
use segment_store::redis::RedisStore;
use segment_store::results::ResultDir;
use segment_tests::{http_get, write_result, RedisServer, S3Server, SplitMix64};
use serde_json::{json, Value};

/// The allocator of the `segment-serving` binary, so the server measured
/// here in process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The answer of [`start_fixed_responder`]: the size and headers of
/// serving's is-member answer (hyper adds a `date` header too).
const FIXED_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\
date: Sat, 05 Dec 2026 07:00:00 GMT\r\n\r\n{\"member\":true,\"version\":1}";

/// Rounds of (ceiling, maxima): the ratio is taken within each round.
const ROUNDS: usize = 3;
/// GETs in each round's `redis-benchmark` run (the ceiling).
const GET_REQUESTS: u64 = 500_000;
/// Load generator connections, for oha and wrk alike.
const CONNECTIONS: &str = "64";

/// The first argument of the child process that writes the result files.
const WRITE_RESULTS: &str = "--write-results";
const NAMESPACE: &str = "bench";
/// Users `user-0000000` to `user-1999999`; the load generators' patterns
/// (`user-[0-1][0-9]{6}`) draw from exactly these.
const UNIVERSE: u64 = 2_000_000;
const SEGMENTS: usize = 20;
/// Each segment is this share of the one before it: from 18 % of the
/// memberships down to under 0.5 %.
const SIZE_RATIO: f64 = 0.82;
/// The 10M-member version switched to while serving: ids `user-<8 digits>`
/// drawn from this many.
const BIG: &str = "big";
const BIG_SPACE: u64 = 100_000_000;
/// Ids per part file, compute's default.
const PART_SIZE: usize = 1_000_000;
const REPLICA: &str = "bench-replica";

/// Exactly `k` of `0..n`, each set as likely, in increasing order
/// (selection sampling, Knuth's Algorithm S).
fn choose(random: &mut SplitMix64, n: u64, k: u64, mut pick: impl FnMut(u64)) {
    let mut left = k.min(n);
    for i in 0..n {
        if left == 0 {
            return;
        }
        if random.next_u64() % (n - i) < left {
            pick(i);
            left -= 1;
        }
    }
}

fn memberships() -> u64 {
    std::env::var("MEMBERSHIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000)
}

/// Segment sizes falling geometrically, summing to `total`.
fn segment_sizes(total: u64) -> Vec<u64> {
    let weights: Vec<f64> = (0..SEGMENTS).map(|i| SIZE_RATIO.powi(i as i32)).collect();
    let sum: f64 = weights.iter().sum();
    let mut sizes: Vec<u64> = weights.iter().map(|w| (total as f64 * w / sum).round() as u64).collect();
    let assigned: u64 = sizes.iter().sum();
    sizes[0] = (sizes[0] + total).saturating_sub(assigned);
    assert!(sizes[0] <= UNIVERSE, "the largest segment ({}) exceeds the {UNIVERSE} users", sizes[0]);
    sizes
}

fn segment(i: usize) -> SegmentKey {
    SegmentKey::new(NAMESPACE, format!("segment-{i}"))
}

fn big() -> SegmentKey {
    SegmentKey::new(NAMESPACE, BIG)
}

fn user_id(n: u64) -> String {
    format!("user-{n:07}")
}

fn snapshot() -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000, 0).expect("a time")
}

/// Sorted ids as parts of [`PART_SIZE`].
fn into_parts(ids: impl Iterator<Item = String>) -> Vec<Vec<String>> {
    let mut parts: Vec<Vec<String>> = Vec::new();
    for id in ids {
        match parts.last_mut() {
            Some(part) if part.len() < PART_SIZE => part.push(id),
            _ => parts.push(vec![id]),
        }
    }
    parts
}

/// The child process: writes every version's result files under `base`
/// and prints what it wrote as one JSON line. A child, so that none of the
/// generated ids stay in the measuring process's memory.
fn write_results(base: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let sizes = segment_sizes(memberships());
    let probe = user_id(1_234_567 % UNIVERSE);
    let (mut written_s, mut text_bytes, mut index_file_bytes) = (0.0, 0u64, 0u64);
    let mut probe_segments = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let mut ids = Vec::with_capacity(*size as usize);
        choose(&mut SplitMix64(1_000 + i as u64), UNIVERSE, *size, |n| ids.push(user_id(n)));
        if ids.binary_search(&probe).is_ok() {
            probe_segments.push(segment(i).name);
        }
        text_bytes += ids.iter().map(|id| id.len() as u64 + 1).sum::<u64>();
        let mut writer = IdSetWriter::new();
        ids.iter().for_each(|id| writer.push(id).expect("sorted, unique ids"));
        index_file_bytes += writer.finish().len() as u64;
        let parts = into_parts(ids.into_iter());
        let started = Instant::now();
        runtime.block_on(write_result(&results_uri(base, &segment(i), 1), &segment(i), 1, snapshot(), &parts));
        written_s += started.elapsed().as_secs_f64();
    }

    let big_members = memberships();
    let mut ids = Vec::with_capacity(big_members as usize);
    choose(&mut SplitMix64(7), BIG_SPACE, big_members, |n| ids.push(format!("user-{n:08}")));
    let big_probe = ids[ids.len() / 2].clone();
    let big_text: u64 = ids.iter().map(|id| id.len() as u64 + 1).sum();
    let parts = into_parts(ids.into_iter());
    let started = Instant::now();
    runtime.block_on(write_result(&results_uri(base, &big(), 1), &big(), 1, snapshot(), &parts));
    let big_written_s = started.elapsed().as_secs_f64();
    drop(parts);

    // The same segment sizes over 2M random 32-hex ids: index bytes only.
    let mut random = SplitMix64(11);
    let mut hex: Vec<String> = (0..UNIVERSE).map(|_| format!("{:016x}{:016x}", random.next_u64(), random.next_u64())).collect();
    hex.sort_unstable();
    hex.dedup();
    let mut hex_bytes = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        let mut writer = IdSetWriter::new();
        choose(&mut SplitMix64(1_000 + i as u64), hex.len() as u64, *size, |n| {
            writer.push(&hex[n as usize]).expect("sorted, unique ids");
        });
        hex_bytes += writer.finish().len() as u64;
    }

    let report = json!({
        "sizes": sizes,
        "written_s": written_s,
        "text_bytes": text_bytes,
        "index_file_bytes": index_file_bytes,
        "probe": probe,
        "probe_segments": probe_segments,
        "big_members": big_members,
        "big_probe": big_probe,
        "big_text_bytes": big_text,
        "big_written_s": big_written_s,
        "hex_example": hex[7],
        "hex_index_bytes": hex_bytes,
    });
    println!("{report}");
}

/// What one load run measured.
#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// Requests that did not get a 2xx.
    failed: u64,
}

impl From<load::LoadFigures> for Figures {
    fn from(figures: load::LoadFigures) -> Figures {
        let load::LoadFigures { rps, p50, p99, p999, failed } = figures;
        Figures { rps, p50, p99, p999, failed }
    }
}

/// Runs oha and returns its figures (latencies in ms).
fn oha(args: &[String]) -> Figures {
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json"])
        .args(args)
        .output()
        .expect("oha runs (cargo install oha)");
    let report: Value = serde_json::from_slice(&out.stdout)
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

/// oha in open loop at `rate` requests/s for `seconds` on `url`, a
/// `--rand-regex-url` pattern when `random`.
fn oha_at(url: &str, rate: u32, seconds: u64, random: bool) -> Figures {
    let duration = format!("{seconds}s");
    let mut args: Vec<String> =
        ["-z", &duration, "-q", &rate.to_string(), "-c", CONNECTIONS, "--worker-threads", "1"].map(String::from).into();
    // -w: requests still in flight at the end are awaited, not counted as
    // failed.
    args.extend(["--latency-correction".into(), "-w".into()]);
    if random {
        args.push("--rand-regex-url".into());
    }
    args.push(url.to_string());
    oha(&args)
}

/// A wrk script asking for `format` (Lua `string.format`) with each
/// `%d`-like field drawn uniformly from its range in `ranges`.
fn lua_random(format: &str, ranges: &[(u64, u64)]) -> String {
    let draws: Vec<String> = ranges.iter().map(|(low, high)| format!("math.random({low}, {high})")).collect();
    format!(
        "math.randomseed(7)\nrequest = function()\n  return wrk.format(\"GET\", string.format(\"{format}\", {}))\nend\n",
        draws.join(", ")
    )
}

/// Runs wrk (closed loop, one thread, 64 connections) with `lua` and
/// returns its figures (wrk prints no p99.9).
fn wrk(base: &str, lua: &str, seconds: u64) -> Figures {
    let script = tempfile::Builder::new().suffix(".lua").tempfile().expect("a temp file");
    std::fs::write(script.path(), lua).expect("the wrk script");
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{CONNECTIONS}"), "--latency", &format!("-d{seconds}s"), "-s"])
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

fn table_header(last: &str) {
    println!(
        "{:<34} {:>8} {:>11} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "run", "offered", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", last, "failed"
    );
}

/// One round: latency at 20K requests/s, then the maxima, each a
/// percentage of the round's ceiling (the higher of wrk's and [`load`]'s
/// where both were run).
struct Round {
    /// Latency at 20K requests/s ([`load`], open loop).
    users_20k: Figures,
    member_20k: Figures,
    floor_20k: Figures,
    /// `redis-benchmark` GET, requests/s.
    ceiling: f64,
    /// CPU per request, (user, kernel) µs: serving's threads at the users
    /// route's maximum (wrk), and redis-server's for the ceiling's GETs.
    users_cpu: (f64, f64),
    redis_cpu: (f64, f64),
    users: f64,
    member: f64,
    healthz: f64,
    floor: f64,
    failed: u64,
}

fn table_row(name: &str, offered: &str, figures: Figures, extra: &str) -> Figures {
    let Figures { rps, p50, p99, p999, failed } = figures;
    println!("{name:<34} {offered:>8} {rps:>11.0} {p50:>8.3} {p99:>8.3} {p999:>9.3} {extra:>7} {failed:>7}");
    figures
}

/// A floor for any HTTP/1.1 server built as serving is (`threads`
/// threads, each a current-thread tokio runtime, a task per connection): it answers each
/// request with [`FIXED_ANSWER`], parsing nothing but the blank line
/// that ends it, and does nothing else. What it reaches on this machine
/// is the most serving's design could reach, lookups and HTTP parsing
/// free.
fn start_fixed_responder(threads: usize) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    listener.set_nonblocking(true).expect("a non-blocking socket");
    let address = listener.local_addr().expect("an address");
    for thread in 0..threads {
        let listener = listener.try_clone().expect("the listener for each thread");
        std::thread::Builder::new()
            .name(format!("fixed-responder-{thread}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(answer_fixed(stream));
                    }
                });
            })
            .expect("the responder's thread");
    }
    address
}

/// Answers every request that `stream` sends with [`FIXED_ANSWER`], in one
/// write per read, until the client closes.
async fn answer_fixed(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut buffer, mut filled, mut answers) = (vec![0u8; 16 * 1024], 0, Vec::new());
    loop {
        match stream.read(&mut buffer[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        let mut start = 0;
        while let Some(end) = buffer[start..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            answers.extend_from_slice(FIXED_ANSWER);
            start += end + 4;
        }
        buffer.copy_within(start..filled, 0);
        filled -= start;
        if filled == buffer.len() || (!answers.is_empty() && stream.write_all(&answers).await.is_err()) {
            return;
        }
        answers.clear();
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Bytes of this process's resident memory the allocator has freed with
/// `MADV_FREE`: still counted in RSS until the kernel needs the pages.
fn lazy_free_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("LazyFree:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// serving's `/metrics` value of `name` (`metrics_port`: its port).
fn metric(metrics_port: u16, name: &str) -> f64 {
    let (_, text) = http_get(metrics_port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("segment_serving_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds_at = |i: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(10);
    match args.first().map(String::as_str) {
        Some(WRITE_RESULTS) => write_results(args.get(1).expect("a results base")),
        _ => index_files(seconds_at(0)),
    }
}

/// Serving from index files, against the goals.
fn index_files(seconds: u64) {
    let threads: usize = std::env::var("SERVING_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let redis = RedisServer::start();
    let url = redis.url();
    let on_s3 = std::env::var("RESULTS").map_or(true, |v| v != "file");
    let (_s3, _dir, base) = if on_s3 {
        let s3 = S3Server::start(&["results"]);
        for (key, value) in s3.env() {
            // Before any S3 client of this process (or the child) reads it.
            std::env::set_var(key, value);
        }
        (Some(s3), None, "s3://results/bench".to_string())
    } else {
        let dir = tempfile::tempdir().expect("a temp dir");
        let base = format!("file://{}/", dir.path().display());
        (None, Some(dir), base)
    };
    let where_from = if on_s3 { "a local S3 server (moto)" } else { "a local directory (file://)" };

    // The result files, written by a child process.
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .args([WRITE_RESULTS, &base])
        .output()
        .expect("the writer runs");
    assert!(out.status.success(), "writing the result files failed: {}", String::from_utf8_lossy(&out.stderr));
    let written: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("the writer's report");
    let sizes: Vec<u64> = written["sizes"].as_array().expect("sizes").iter().map(|v| v.as_u64().expect("a size")).collect();
    let total: u64 = sizes.iter().sum();
    let big_members = written["big_members"].as_u64().expect("big_members");
    let mb = |key: &str| written[key].as_f64().unwrap_or(0.0) / 1e6;
    let secs = |key: &str| written[key].as_f64().unwrap_or(0.0);
    println!(
        "serving from index files: {total} memberships over {SEGMENTS} segments ({} .. {} members) from {UNIVERSE} users ({}), \
         result files on {where_from}; serving on {threads} thread(s), {seconds}s per run",
        sizes.last().unwrap_or(&0),
        sizes.first().unwrap_or(&0),
        user_id(42)
    );
    println!(
        "written in {:.1}s: {SEGMENTS} versions' parts ({:.0} MB of ids) and index files in {:.1}s; \
         the {big_members}-member version ({:.0} MB of ids) in {:.1}s",
        started.elapsed().as_secs_f64(),
        mb("text_bytes"),
        secs("written_s"),
        mb("big_text_bytes"),
        secs("big_written_s")
    );

    // Sealed with no members in the store, then active: every answer comes
    // from the files.
    let control = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let store = control.block_on(RedisStore::connect(&url)).expect("redis");
    let seal = Seal { snapshot_time: Some(snapshot()), overrides_from: Some(snapshot()), ..Seal::default() };
    control.block_on(async {
        for i in 0..SEGMENTS {
            store.seal_with(&segment(i), 1, &seal).await.expect("seal");
            store.activate(&segment(i), 1).await.expect("activate");
        }
        store.seal_with(&big(), 1, &seal).await.expect("seal");
    });

    // A new replica: started, until ready.
    let config = ServingConfig::new(IndexOptions::new(Arc::new(ResultFiles::new(base.clone())), REPLICA));
    let connect = {
        let url = url.clone();
        move || {
            let url = url.clone();
            async move { connect_redis(&url).await }
        }
    };
    let any = "127.0.0.1:0".parse().expect("an address");
    let options = ServerOptions { listen: any, metrics_listen: any, threads, limits: ConnectionLimits::default() };
    let (rss_before, lazy_before) = (rss_bytes(), lazy_free_bytes());
    let started = Instant::now();
    let server = Server::start(options, config, connect).expect("serving starts");
    let port = server.address().port();
    let metrics_port = server.metrics_address().port();
    while http_get(port, "/readyz").0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(600), "the replica was not ready within 10 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready_s = started.elapsed().as_secs_f64();
    let rss_ready = rss_bytes();
    std::thread::sleep(Duration::from_secs(2));
    let (rss_settled, lazy_settled) = (rss_bytes(), lazy_free_bytes());
    let index_bytes = metric(metrics_port, "index_bytes");
    let index_memberships = metric(metrics_port, "index_memberships");
    assert_eq!(index_memberships as u64, total, "the replica holds every membership");
    let per_membership = |bytes: f64| bytes / total as f64;
    let held_pm = per_membership(index_bytes);
    let files_pm = per_membership(written["index_file_bytes"].as_f64().unwrap_or(f64::NAN));
    let rss_ready_pm = per_membership(rss_ready.saturating_sub(rss_before) as f64);
    let rss_settled_pm = per_membership(rss_settled.saturating_sub(rss_before) as f64);
    let in_use_pm = per_membership((rss_settled - lazy_settled) as f64 - (rss_before - lazy_before) as f64);
    let hex_pm = written["hex_index_bytes"].as_f64().unwrap_or(f64::NAN) / total as f64;

    // The answers are the files' (one user checked against the generator).
    let probe = written["probe"].as_str().expect("probe");
    let (status, body) = http_get(port, &format!("/v1/users/{probe}/segments"));
    let served: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut got: Vec<&str> =
        served["segments"].as_array().map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect()).unwrap_or_default();
    let mut expected: Vec<&str> =
        written["probe_segments"].as_array().expect("probe_segments").iter().filter_map(Value::as_str).collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert!(status == 200 && got == expected, "{probe}: served {status} {body}, expected {expected:?}");

    println!();
    row("replica ready (started to /readyz 200)", ready_s, "s");
    row("bytes held / memberships (index_bytes)", held_pm, "B");
    row("  of it the index files", files_pm, "B");
    row("  of it the prefilters and block directories", held_pm - files_pm, "B");
    row("RSS grown / memberships, at ready", rss_ready_pm, "B");
    row("RSS grown / memberships, 2 s later", rss_settled_pm, "B");
    row("  of it not freed lazily (RSS - LazyFree)", in_use_pm, "B");
    row("  the same members as 32-hex ids: index bytes", hex_pm, "B");
    println!(
        "  ({} B held in index files, prefilters and directories; RSS {:.1} MB before, {:.1} MB at ready, {:.1} MB 2 s later, of which LazyFree {:.1} MB; \
         32-hex ids like {})",
        index_bytes,
        rss_before as f64 / 1e6,
        rss_ready as f64 / 1e6,
        rss_settled as f64 / 1e6,
        lazy_settled as f64 / 1e6,
        written["hex_example"].as_str().unwrap_or("")
    );

    // Fixed rates and maxima on random users and random (segment, user).
    let base_url = format!("http://{}", server.address());
    let users = format!("{base_url}/v1/users/user-[0-1][0-9]{{6}}/segments");
    let member = format!("{base_url}/v1/namespaces/{NAMESPACE}/segments/segment-([0-9]|1[0-9])/members/user-[0-1][0-9]{{6}}");
    assert_eq!((UNIVERSE, SEGMENTS), (2_000_000, 20), "the patterns above draw from these");
    println!();
    println!("fixed rates: oha -q (open loop, latency corrected, {CONNECTIONS} connections, 1 worker thread); maximum: wrk (1 thread, {CONNECTIONS} connections)");
    table_header("");
    table_row("users, random", "10000", oha_at(&users, 10_000, seconds, true), "");
    let users_20k_oha = table_row("users, random", "20000", oha_at(&users, 20_000, seconds, true), "");
    let member_20k_oha = table_row("is-member, random", "20000", oha_at(&member, 20_000, seconds, true), "");
    // The floors: the same load on a responder that does nothing, and on
    // serving's own route that does nothing (`/healthz`, maxima below).
    let floor_address = start_fixed_responder(server.threads());
    let floor_url = format!("http://{floor_address}");
    let floor_20k_oha = table_row(
        "floor: fixed answer",
        "20000",
        oha_at(&format!("{floor_url}/v1/users/user-[0-1][0-9]{{6}}/segments"), 20_000, seconds, true),
        "",
    );
    // The same rates from a generator light enough to measure under a
    // millisecond: oha's own floor (the fixed answer above) is about one.
    println!();
    println!("fixed rates: load (segment_bench::load, open loop: one thread polling without sleeping but yielding its core, latency from when each request was due, {CONNECTIONS} connections)");
    table_header("");
    let connections: usize = CONNECTIONS.parse().expect("a number");
    let run_load = |address, pace, path: &mut dyn FnMut() -> String| {
        Figures::from(load::run(address, pace, connections, Duration::from_secs(seconds), path))
    };
    let load_at = |address, rate, path: &mut dyn FnMut() -> String| run_load(address, Pace::Rate(rate), path);
    let mut draw = SplitMix64(3);
    let mut random_user = move || user_id(draw.next_u64() % UNIVERSE);
    let mut users_path = || format!("/v1/users/{}/segments", random_user());
    table_row("users, random", "10000", load_at(server.address(), 10_000, &mut users_path), "");
    let mut draw = SplitMix64(5);
    let mut member_path = || {
        let (segment, user) = (draw.next_u64() % SEGMENTS as u64, draw.next_u64() % UNIVERSE);
        format!("/v1/namespaces/{NAMESPACE}/segments/segment-{segment}/members/{}", user_id(user))
    };
    let users_lua = lua_random("/v1/users/user-%07d/segments", &[(0, UNIVERSE - 1)]);
    // The same draw as the users route's, so wrk does the same work.
    let healthz_lua = lua_random("/healthz?user=user-%07d", &[(0, UNIVERSE - 1)]);
    let member_lua = lua_random(
        &format!("/v1/namespaces/{NAMESPACE}/segments/segment-%d/members/user-%07d"),
        &[(0, SEGMENTS as u64 - 1), (0, UNIVERSE - 1)],
    );
    // The machine's speed drifts between runs (a shared VM): each round
    // measures the ceiling next to serving's maxima, the ratio is per
    // round, and the median round is reported; so is the median of the
    // rounds' p99 at 20K/s (one stall of a few milliseconds in a run is
    // enough to move its p99).
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let at_20k = |name: &str, address, path: &mut dyn FnMut() -> String| {
            table_row(&format!("{name} (load) #{round}"), "20000", load_at(address, 20_000, path), "")
        };
        let latencies = [
            at_20k("users, random", server.address(), &mut users_path),
            at_20k("is-member, random", server.address(), &mut member_path),
            at_20k("floor: fixed answer", floor_address, &mut users_path),
        ];
        let redis_pid = redis.pid().to_string();
        let redis_before = cpu::process(&redis_pid);
        let ceiling = redis_benchmark(redis.port, GET_REQUESTS, 1, &["GET", "key:__rand_int__"]);
        let redis_cpu = (cpu::process(&redis_pid) - redis_before).per_request_us(GET_REQUESTS as f64);
        row(&format!("redis-benchmark GET, -c 16 (ceiling) #{round}"), ceiling, "requests/s");
        let wrk_max =
            |name: &str, url: &str, lua: &str| table_row(&format!("max, {name} (wrk) #{round}"), "-", wrk(url, lua, seconds), "");
        let load_max = |name: &str, address, path: &mut dyn FnMut() -> String| {
            table_row(&format!("max, {name} (load) #{round}"), "-", run_load(address, Pace::Closed, path), "")
        };
        let serving_before = cpu::threads(THREAD_NAME_PREFIX);
        let users_wrk = wrk_max("users, random", &base_url, &users_lua);
        let users_cpu = (cpu::threads(THREAD_NAME_PREFIX) - serving_before).per_request_us(users_wrk.rps * seconds as f64);
        let maxima = [
            users_wrk,
            load_max("users, random", server.address(), &mut users_path),
            wrk_max("is-member, random", &base_url, &member_lua),
            load_max("is-member, random", server.address(), &mut member_path),
            wrk_max("serving's /healthz", &base_url, &healthz_lua),
            wrk_max("floor: fixed answer", &floor_url, &users_lua),
            load_max("floor: fixed answer", floor_address, &mut users_path),
        ];
        let (user, kernel) = users_cpu;
        let (redis_user, redis_kernel) = redis_cpu;
        println!(
            "CPU per request #{round}: serving's threads at the users maximum (wrk) {user:.2} us user + {kernel:.2} us kernel; \
             redis-server per GET {redis_user:.2} + {redis_kernel:.2}"
        );
        let percent = |i: usize| 100.0 * maxima[i].rps / ceiling;
        rounds.push(Round {
            users_20k: latencies[0],
            member_20k: latencies[1],
            floor_20k: latencies[2],
            ceiling,
            users_cpu,
            redis_cpu,
            users: percent(0).max(percent(1)),
            member: percent(2).max(percent(3)),
            healthz: percent(4),
            floor: percent(5).max(percent(6)),
            failed: maxima.iter().chain(&latencies).map(|m| m.failed).sum(),
        });
    }
    let median_of = |figure: fn(&Round) -> f64| median(rounds.iter().map(figure).collect());
    let ceiling = median_of(|r| r.ceiling);
    let users_ratio = median_of(|r| r.users);
    let floor_ratio = median_of(|r| r.floor);
    let (users_20k, member_20k, floor_20k) =
        (median_of(|r| r.users_20k.p99), median_of(|r| r.member_20k.p99), median_of(|r| r.floor_20k.p99));
    let users_20k_rps = median_of(|r| r.users_20k.rps);
    let member_20k_rps = median_of(|r| r.member_20k.rps);
    let failed = [users_20k_oha, member_20k_oha, floor_20k_oha].iter().map(|f| f.failed).sum::<u64>()
        + rounds.iter().map(|r| r.failed).sum::<u64>();
    row("redis-benchmark GET, median of rounds", ceiling, "requests/s");
    println!("maxima: the higher of wrk's and load's in each round, over that round's ceiling, median of rounds");
    row("max users / ceiling", users_ratio, "%");
    row("max is-member / ceiling", median_of(|r| r.member), "%");
    row("max /healthz / ceiling (wrk)", median_of(|r| r.healthz), "%");
    row("max fixed answer (floor) / ceiling", floor_ratio, "%");
    // Where a request's time goes on serving's threads: the kernel's part
    // (TCP on loopback, a read and a write per request) is what no HTTP
    // stack or index can remove, next to what the throughput goal leaves.
    let users_cpu = (median_of(|r| r.users_cpu.0), median_of(|r| r.users_cpu.1));
    let redis_cpu = (median_of(|r| r.redis_cpu.0), median_of(|r| r.redis_cpu.1));
    let budget = server.threads() as f64 * 1e6 / (1.5 * ceiling);
    println!("CPU per request (user + kernel, from /proc), median of rounds:");
    println!("  {:<46} {:>6.2} + {:.2} us", "serving's threads, users route at its maximum", users_cpu.0, users_cpu.1);
    println!("  {:<46} {:>6.2} + {:.2} us", "redis-server, GET at the ceiling", redis_cpu.0, redis_cpu.1);
    println!("  {:<46} {:>6.2} us", format!("150 % of the ceiling leaves, {} thread(s)", server.threads()), budget);
    println!("p99 at 20K/s (load), median of rounds:");
    for (name, p99) in [("users, random", users_20k), ("is-member, random", member_20k), ("floor: fixed answer", floor_20k)] {
        println!("  {name:<46} {p99:>14.3} ms");
    }

    // A 10M-member version, sealed with its files written, to served: the
    // operator's steps (load request, every replica holding, activate)
    // with the waits polled tightly.
    let probe = written["big_probe"].as_str().expect("big_probe").to_string();
    let member_path = format!("/v1/namespaces/{NAMESPACE}/segments/{BIG}/members/{probe}");
    let started = Instant::now();
    control.block_on(store.request_load(&big(), 1)).expect("request_load");
    while !control.block_on(store.load_status(&big(), 1)).expect("load_status").holding.contains(REPLICA) {
        assert!(started.elapsed() < Duration::from_secs(300), "the replica never held the version");
        std::thread::sleep(Duration::from_millis(2));
    }
    let held_s = started.elapsed().as_secs_f64();
    control.block_on(store.activate(&big(), 1)).expect("activate");
    loop {
        let (status, body) = http_get(port, &member_path);
        if status == 200 && body.contains("\"member\":true") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the replica never answered from the version: {status} {body}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let served_s = started.elapsed().as_secs_f64();
    let files_to_served = big_members as f64 / served_s;
    // The ceiling: the same index file's bytes from the same server, one
    // GET (best of three), and a GET with the replica's verification.
    let dir = ResultDir::open(&results_uri(&base, &big(), 1)).expect("a result location");
    let manifest = control.block_on(dir.read_manifest()).expect("the manifest").expect("a manifest");
    let entry = manifest.index.expect("an index file");
    let gets: Vec<(usize, f64)> = (0..3)
        .map(|_| {
            let started = Instant::now();
            let bytes = control.block_on(dir.read_part(&entry)).expect("the index file");
            (bytes.len(), started.elapsed().as_secs_f64())
        })
        .collect();
    let get_s = gets.iter().map(|g| g.1).fold(f64::INFINITY, f64::min);
    let file_len = gets[0].0;
    let started = Instant::now();
    let verified = control.block_on(ResultFiles::new(base.clone()).fetch(&big(), 1)).expect("the index verified");
    let fetch_s = started.elapsed().as_secs_f64();
    assert_eq!(verified.len(), big_members);
    drop(verified);
    println!();
    row(&format!("{big_members}-member version: load request to held"), held_s, "s");
    row("  to answered after activate", served_s, "s");
    row("memberships/s from files to served", files_to_served, "/s");
    row(
        &format!("  ceiling: one GET of its index ({:.1} MB), best of 3", file_len as f64 / 1e6),
        big_members as f64 / get_s,
        "/s",
    );
    row("  GET and verify (ResultFiles::fetch), memberships/s", big_members as f64 / fetch_s, "/s");
    println!("  (GETs took {} s)", gets.iter().map(|g| format!("{:.3}", g.1)).collect::<Vec<_>>().join(", "));
    println!("requests that failed in the runs above: {failed}");

    let bytes_pm = held_pm.max(rss_settled_pm);
    println!();
    println!(
        "goal: <= 8 bytes per membership at 10M memberships over 20 segments: {} (held {held_pm:.2}, of it index files {files_pm:.2}, RSS grown {rss_settled_pm:.2} settled / {rss_ready_pm:.2} at ready, {in_use_pm:.2} without LazyFree; 32-hex ids: {hex_pm:.2} index bytes)",
        met(bytes_pm <= 8.0)
    );
    println!("bytes per membership: {bytes_pm:.2}");
    println!(
        "goal: >= 5M memberships/s from result files to served, {big_members}-member version: {} (ceiling: one GET of the index, {:.0}/s)",
        met(files_to_served >= 5e6),
        big_members as f64 / get_s
    );
    println!("memberships/s from files to served: {files_to_served:.0}");
    println!(
        "goal: users route, random users, no response cache: max >= 150 % of redis-benchmark GET in the same run: {} (median of {ROUNDS} rounds, ceiling {ceiling:.0}/s)",
        met(users_ratio >= 150.0)
    );
    println!("uncached max / redis-benchmark GET: {users_ratio:.1} %");
    println!("fixed answer max / redis-benchmark GET: {floor_ratio:.1} % (the floor: what any server built as serving reaches)");
    println!(
        "  (per users request on serving's threads: {:.2} us in the kernel alone, {:.2} us in all; 150 % leaves {budget:.2} us)",
        users_cpu.1,
        users_cpu.0 + users_cpu.1
    );
    println!(
        "goal: users route p99 <= 1 ms at 20K requests/s, random users: {} (achieved {:.0}/s)",
        met(users_20k <= 1.0),
        users_20k_rps
    );
    println!("p99 at 20K/s uncached: {users_20k:.3} ms");
    println!(
        "  (load, median of {ROUNDS} rounds; oha: {:.3} ms; the floor, a fixed answer: {floor_20k:.3} ms load, {:.3} ms oha)",
        users_20k_oha.p99, floor_20k_oha.p99
    );
    println!(
        "goal: is-member p99 <= 0.5 ms (at 20K requests/s, random segment and user): {} (achieved {:.0}/s)",
        met(member_20k <= 0.5),
        member_20k_rps
    );
    println!("is-member p99 at 20K/s: {member_20k:.3} ms");
    println!("  (load, median of {ROUNDS} rounds; oha: {:.3} ms)", member_20k_oha.p99);
    println!(
        "goal: a new replica holding 10M memberships ready in <= 10 s from a local S3 server: {} (from {where_from})",
        met(ready_s <= 10.0)
    );
    println!("replica ready: {ready_s:.2} s");
    server.shutdown().expect("serving stops cleanly");
}
