//! Shared bits of the benchmarks: running external reference tools and
//! printing figures in one format.
//!
//! - `load`: an HTTP/1.1 load generator, open loop at a rate for latency
//!   and closed loop for the maximum (the serving benchmark).
//! - `cpu`: a process's or its threads' CPU time, user and kernel (how
//!   much of a request the kernel's TCP work costs, in the serving
//!   benchmark).

pub mod cpu;
pub mod load;

use std::process::Command;
use std::time::Instant;

/// Runs `f` and returns its result with the seconds it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

/// `redis-benchmark` requests per second for `command` at pipeline depth
/// `pipeline` against the server on `port`.
pub fn redis_benchmark(port: u16, requests: u64, pipeline: u32, command: &[&str]) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-n", &requests.to_string(), "-P", &pipeline.to_string()])
        .args(["-r", "10000000", "-c", "16", "--csv"])
        .args(command)
        .output()
        .expect("redis-benchmark runs (apt-get install redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: a header line, then "name","rps",...
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next()
        .unwrap_or_else(|| panic!("no figure in redis-benchmark output: {text}"))
}

/// Bytes Redis reports in use (`INFO memory` `used_memory`).
pub fn redis_used_memory(port: u16) -> u64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "INFO", "memory"]).output().expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    process_rss_bytes("self")
}

/// Resident memory of the process `pid` (a number, or `self`), in bytes;
/// 0 once it has exited.
pub fn process_rss_bytes(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0)
        * 1024
}

pub fn row(name: &str, value: f64, unit: &str) {
    println!("{name:<48} {value:>14.1} {unit}");
}
