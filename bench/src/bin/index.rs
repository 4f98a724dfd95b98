//! Version index files (`segment_core::index`): size per membership,
//! build, open and probe rates, each next to a ceiling measured in the
//! same run on the same ids:
//! - size: the part files' text for the same members;
//! - build: writing the same ids as part text with its checksum (what a
//!   compute run does today);
//! - open (checksum and full check of every id): SHA-256 over the same bytes;
//! - is-member: a `HashSet<&str>` of the same ids in memory.
//!
//! and the same lookups as serving holds a version
//! (`segment_serving::LoadedVersion`: the index plus a prefilter and a
//! directory over its blocks, built at load): their bytes, build rate,
//! false positives and a user's segments.
//!
//! cargo run --release -p segment-bench --bin index -- [memberships] [segments] [users]
//!
//! Two id shapes: sequential (`user-000001234`) and random (32 hex
//! digits, a UUID's entropy without its dashes).

use std::collections::HashSet;
use std::time::Instant;

use segment_bench::{row, timed};
use segment_core::index::{self, IdSet, IdSetWriter};
use segment_core::manifest::{checksum, encode_part};
use segment_serving::{holding, LoadedVersion};
use segment_tests::SplitMix64;

/// How a user's segments are looked up over every version.
#[derive(Clone, Copy)]
enum Lookup {
    /// As the users route does ([`holding`]): the user hashed once, each
    /// step of the lookup taken in every version before the next, its
    /// memory prefetched.
    Served,
    /// Hashed once, every version's prefilter line prefetched, then each
    /// probed in turn (the users route before the staged lookup).
    PrefiltersPrefetched,
    /// Hashed once, each version probed in turn.
    HashedOnce,
    /// Hashed again for each version.
    PerSegment,
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let memberships = args.first().copied().unwrap_or(10_000_000);
    let segments = args.get(1).copied().unwrap_or(20);
    let users = args.get(2).copied().unwrap_or(2_000_000);
    let per_segment = memberships / segments;
    println!("{memberships} memberships over {segments} segments of {per_segment} members, from {users} users");
    for (shape, id_of) in [
        ("sequential", (|i: u64| format!("user-{i:09}")) as fn(u64) -> String),
        ("random", |i: u64| format!("{:016x}{:016x}", SplitMix64(i).next_u64(), SplitMix64(i ^ 0xfeed).next_u64())),
    ] {
        println!("\n== {shape} ids ({})", id_of(7));
        let all: Vec<String> = (0..users as u64).map(id_of).collect();
        let mut random = SplitMix64(7);
        let members: Vec<Vec<&str>> = (0..segments)
            .map(|_| {
                let mut ids: Vec<&str> =
                    (0..per_segment).map(|_| all[(random.next_u64() % users as u64) as usize].as_str()).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .collect();
        // Members are drawn with replacement, so a segment holds fewer
        // than `per_segment` distinct users: every rate uses this count.
        let total: usize = members.iter().map(Vec::len).sum();
        println!("{total} distinct memberships");

        let (files, build_s) = timed(|| {
            members
                .iter()
                .map(|ids| {
                    let mut writer = IdSetWriter::new();
                    for id in ids {
                        writer.push(id).expect("sorted, unique ids");
                    }
                    writer.finish()
                })
                .collect::<Vec<Vec<u8>>>()
        });
        let (texts, text_s) = timed(|| {
            members
                .iter()
                .map(|ids| {
                    let text = encode_part(ids.iter().copied());
                    let sum = checksum(&text);
                    (text, sum)
                })
                .collect::<Vec<_>>()
        });
        let index_bytes: usize = files.iter().map(Vec::len).sum();
        let text_bytes: usize = texts.iter().map(|(t, _)| t.len()).sum();
        row("index bytes per membership", index_bytes as f64 / total as f64, "B");
        row("  ceiling: part text bytes per membership", text_bytes as f64 / total as f64, "B");
        row("build, memberships/s (sorted ids to index file)", total as f64 / build_s, "/s");
        row("  ceiling: part text and checksum, memberships/s", total as f64 / text_s, "/s");

        let (sets, open_s) =
            timed(|| files.iter().map(|bytes| IdSet::open(bytes.clone()).expect("a valid index")).collect::<Vec<IdSet>>());
        let (_, sum_s) = timed(|| files.iter().map(|bytes| checksum(bytes)).collect::<Vec<_>>());
        row("open (checksum, every id checked), memberships/s", total as f64 / open_s, "/s");
        row("  ceiling: SHA-256 of the same bytes, memberships/s", total as f64 / sum_s, "/s");

        let probes: Vec<&str> = (0..1_000_000).map(|_| all[(random.next_u64() % users as u64) as usize].as_str()).collect();
        let (found, probe_s) = timed(|| probes.iter().filter(|id| sets[0].contains(id)).count());
        let hashed: HashSet<&str> = members[0].iter().copied().collect();
        let (hash_found, hash_s) = timed(|| probes.iter().filter(|id| hashed.contains(*id)).count());
        assert_eq!(found, hash_found, "the index and the hash set agree");
        row("is-member probes/s (one segment)", probes.len() as f64 / probe_s, "/s");
        row("  ceiling: HashSet<&str> probes/s", probes.len() as f64 / hash_s, "/s");

        // A user's segments: one probe per segment, per request.
        let mut latencies: Vec<f64> = probes[..100_000]
            .iter()
            .map(|id| {
                let start = Instant::now();
                let count = sets.iter().filter(|set| set.contains(id)).count();
                std::hint::black_box(count);
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        let quantile = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        row(&format!("a user's segments ({segments} probes), p50"), quantile(0.5), "us");
        row(&format!("a user's segments ({segments} probes), p99"), quantile(0.99), "us");

        // As serving holds them: the prefilter and block directory built
        // when a version is loaded.
        let (loaded, load_s) = timed(|| sets.iter().map(|set| LoadedVersion::new(1, set.clone(), None)).collect::<Vec<_>>());
        let extra: usize = loaded.iter().zip(&sets).map(|(l, s)| l.bytes() - s.file_len()).sum();
        row("served: prefilter and directory bytes per membership", extra as f64 / total as f64, "B");
        row("served: build (prefilter, directory), memberships/s", total as f64 / load_s, "/s");
        let (served_found, served_s) = timed(|| probes.iter().filter(|id| loaded[0].has(id, None)).count());
        assert_eq!(served_found, found, "the served answer is the index's");
        row("served: is-member probes/s (one segment)", probes.len() as f64 / served_s, "/s");
        let member_of: Vec<HashSet<&str>> = members.iter().map(|ids| ids.iter().copied().collect()).collect();
        let (mut negatives, mut passed) = (0u64, 0u64);
        for id in &probes[..100_000] {
            for (set, version) in member_of.iter().zip(&loaded) {
                if !set.contains(id) {
                    negatives += 1;
                    passed += u64::from(version.prefilter_passes(LoadedVersion::hash(id)));
                }
            }
        }
        row("served: non-members past the prefilter", 100.0 * passed as f64 / negatives as f64, "%");
        for (label, lookup) in [
            ("as served", Lookup::Served),
            ("prefilters prefetched", Lookup::PrefiltersPrefetched),
            ("not prefetched", Lookup::HashedOnce),
            ("hashed per segment", Lookup::PerSegment),
        ] {
            let mut latencies: Vec<f64> = probes[100_000..200_000]
                .iter()
                .map(|id| {
                    let start = Instant::now();
                    let count = match lookup {
                        Lookup::Served => holding(id, loaded.iter().map(|version| ((), version, None))).len(),
                        Lookup::PrefiltersPrefetched => {
                            let hash = LoadedVersion::hash(id);
                            loaded.iter().for_each(|version| version.prefetch(hash));
                            loaded.iter().filter(|version| version.has_hashed(id, hash, None)).count()
                        }
                        Lookup::HashedOnce => {
                            let hash = LoadedVersion::hash(id);
                            loaded.iter().filter(|version| version.has_hashed(id, hash, None)).count()
                        }
                        Lookup::PerSegment => loaded.iter().filter(|version| version.has(id, None)).count(),
                    };
                    std::hint::black_box(count);
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            latencies.sort_by(f64::total_cmp);
            let quantile = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
            row(&format!("served: a user's segments ({label}), p50"), quantile(0.5), "us");
            row(&format!("served: a user's segments ({label}), p99"), quantile(0.99), "us");
        }
        let expected: usize = probes[..10_000].iter().map(|id| sets.iter().filter(|set| set.contains(id)).count()).sum();
        let served: usize = probes[..10_000].iter().map(|id| loaded.iter().filter(|v| v.has(id, None)).count()).sum();
        assert_eq!(served, expected, "a user's segments, served, are the index's");
        drop(loaded);
        if shape == "sequential" {
            // One version as large as all the memberships: its prefilter
            // no longer fits in the caches the segments' above do.
            let mut writer = IdSetWriter::new();
            (0..memberships as u64).for_each(|i| writer.push(&id_of(i * 10)).expect("sorted, unique ids"));
            let big = IdSet::open(writer.finish()).expect("a valid index");
            let (version, big_s) = timed(|| LoadedVersion::new(1, big, None));
            row(&format!("served: build, one {memberships}-member version, memberships/s"), memberships as f64 / big_s, "/s");
            drop(version);
        }
        let changes = index::changes(&sets[0], &sets[1]);
        let (_, merge_s) = timed(|| index::changes(&sets[0], &sets[1]));
        row("entered/exited by merge, memberships/s", (sets[0].len() + sets[1].len()) as f64 / merge_s, "/s");
        println!("  ({} entered, {} exited, {} kept)", changes.entered, changes.exited, changes.kept);
    }
}
