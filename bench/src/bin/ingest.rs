//! `segment-worker ingest`'s work, `segment_compute::ingest::verify`, on a
//! result written to a local S3 server (moto): the index file checked
//! (checksum, structure, the manifest's count), the change from the
//! previous version counted by merging the two index files, and every
//! part's checksum and count; then the verdict (`_seal.json`) written.
//! Ingest touches no store, so no Redis runs.
//!
//! The ceiling is the same objects read from the same server with no
//! check at all: the new version's parts and index and the previous
//! version's index, one `GET` after another as `verify` reads the index
//! files, and the parts 4 at a time as it does.
//!
//! bash tests/setup (moto)
//! cargo run --release -p segment-bench --bin ingest -- [memberships]

use chrono::Utc;
use futures::StreamExt;
use segment_bench::row;
use segment_core::api::SegmentKey;
use segment_core::naming::results_uri;
use segment_core::task::{IngestTask, VersionFiles};
use segment_store::results::ResultDir;
use segment_tests::S3Server;

/// Members per part, as compute writes them.
const PART: usize = 500_000;
/// Rounds of (ceiling, verify): the best of each is reported.
const ROUNDS: usize = 3;

#[tokio::main]
async fn main() {
    let members: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let s3 = S3Server::start(&["results"]);
    for (key, value) in s3.env() {
        // Before any S3 client of this process reads it.
        std::env::set_var(key, value);
    }
    let base = "s3://results/bench";
    let segment = SegmentKey::new("bench", "ingest");
    let snapshot = Utc::now();
    // v2 shares 90 % of v1's members: a tenth exited, a tenth entered.
    let shift = members / 10;
    let ids = |from: usize| -> Vec<Vec<String>> {
        let all: Vec<String> = (from..from + members).map(|i| format!("user-{i:09}")).collect();
        all.chunks(PART).map(<[String]>::to_vec).collect()
    };
    let (v1, v2) = (results_uri(base, &segment, 1), results_uri(base, &segment, 2));
    let start = std::time::Instant::now();
    segment_tests::write_result(&v1, &segment, 1, snapshot, &ids(0)).await;
    let manifest = segment_tests::write_result(&v2, &segment, 2, snapshot, &ids(shift)).await;
    let written = start.elapsed().as_secs_f64();

    let task = IngestTask {
        segment: segment.clone(),
        version: 2,
        snapshot_time: snapshot,
        results_uri: v2.clone(),
        max_failed_parts: 0,
        compare_with: Some(VersionFiles { version: 1, results_uri: v1.clone() }),
        overrides_from: None,
    };
    let (mut ceiling, mut verify) = (f64::MAX, f64::MAX);
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let start = std::time::Instant::now();
        bytes = read_everything(&v1, &v2).await;
        ceiling = ceiling.min(start.elapsed().as_secs_f64());

        let start = std::time::Instant::now();
        let report = segment_compute::ingest::verify(&task).await.expect("ingest verifies the result");
        verify = verify.min(start.elapsed().as_secs_f64());
        assert_eq!(report.members as usize, members);
        assert_eq!(report.change.map(|c| c.changed), Some(2 * shift as u64), "entered plus exited");
        assert!(report.failed_parts.is_empty());
    }

    println!(
        "ingest benchmark: {members} memberships in {} parts and an index file on a local S3 server (moto), \
         compared with a previous version of as many ({shift} entered, {shift} exited); best of {ROUNDS}",
        manifest.parts.len()
    );
    row("result files written (both versions)", written, "s");
    row("ceiling: the same objects read, unchecked", members as f64 / ceiling, "memberships/s");
    row("ceiling: read throughput", bytes as f64 / ceiling / 1e6, "MB/s");
    row("ingest::verify (index, change, parts, verdict)", members as f64 / verify, "memberships/s");
    row("ingest::verify wall time", verify, "s");
    row("verify / ceiling", 100.0 * ceiling / verify, "%");
}

/// Reads what `verify` reads, as it reads it, checking nothing: the
/// manifest and index of `v2`, the index of `v1`, then `v2`'s parts 4 at
/// a time. Returns the bytes read.
async fn read_everything(v1: &str, v2: &str) -> usize {
    let (old, new) = (ResultDir::open(v1).expect("v1"), ResultDir::open(v2).expect("v2"));
    let manifest = new.read_manifest().await.expect("a manifest read").expect("a manifest");
    let old_manifest = old.read_manifest().await.expect("a manifest read").expect("a manifest");
    let mut bytes = new.read_index(manifest.index.as_ref().expect("an index")).await.expect("v2's index").len();
    bytes += old.read_index(old_manifest.index.as_ref().expect("an index")).await.expect("v1's index").len();
    let parts = futures::stream::iter(&manifest.parts)
        .map(|part| async { new.read_part(part).await.expect("a part read").len() })
        .buffer_unordered(segment_compute::ingest::IN_FLIGHT)
        .collect::<Vec<usize>>()
        .await;
    bytes + parts.iter().sum::<usize>()
}
