//! Serving from index files (docs/serving.md, "Index files"): a replica
//! holds each active version's `members.sgix` in memory and answers every
//! membership question from it, with the realtime overrides the version
//! does not reflect laid on top. The store keeps only small state: aliases,
//! overrides, notices and the replicas' load reports.
//!
//! - [`IndexSource`] (core): where a version's index comes from;
//!   [`ResultFiles`] (store) reads it from the result files compute wrote,
//!   checksum verified.
//! - [`LoadedVersion`]: one version's ids, with a prefilter and a directory
//!   over its blocks built when it is loaded (so that a lookup costs a few
//!   cache lines), and the time up to which its lake data reflects
//!   realtime events.
//! - [`Overlay`]: a segment's realtime overrides, newest per user.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use segment_core::index::IdSet;
pub use segment_core::store::IndexSource;
use segment_core::store::Override;
pub use segment_store::results::ResultFiles;

use crate::shard::Shard;

/// How a replica serves from index files.
#[derive(Clone)]
pub struct IndexOptions {
    pub source: Arc<dyn IndexSource>,
    /// This replica's name in load reports: unique among live replicas
    /// (the pod name).
    pub replica: String,
    /// How long one liveness report lasts; the replica renews it on every
    /// alias refresh, so keep it a few refresh intervals long.
    pub liveness: Duration,
    /// Indexes fetched at once when many are missing (start-up, after a
    /// gap in the notices).
    pub parallel_loads: usize,
    /// The part of every version this replica holds.
    pub shard: Shard,
}

impl std::fmt::Debug for IndexOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexOptions")
            .field("replica", &self.replica)
            .field("liveness", &self.liveness)
            .field("parallel_loads", &self.parallel_loads)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl IndexOptions {
    pub fn new(source: Arc<dyn IndexSource>, replica: impl Into<String>) -> IndexOptions {
        IndexOptions {
            source,
            replica: replica.into(),
            liveness: Duration::from_secs(20),
            parallel_loads: 4,
            shard: Shard::WHOLE,
        }
    }
}

/// One version's members as a replica holds them: the index file, and
/// two small structures built from it when the version is loaded, so that
/// a lookup costs a few cache lines rather than a binary search over the
/// file: a prefilter that turns most non-members away, and a directory
/// over the file's blocks for the exact lookup of the rest.
#[derive(Debug)]
pub struct LoadedVersion {
    pub version: u64,
    ids: IdSet,
    prefilter: Prefilter,
    directory: Directory,
    /// Overrides after this time are not in the version's lake data
    /// ([`StoredVersion::reflects_events_until`](segment_core::store::StoredVersion::reflects_events_until));
    /// `None`: every override counts.
    reflects_until: Option<DateTime<Utc>>,
}

impl LoadedVersion {
    /// Holds `ids`, building its prefilter and block directory (one pass
    /// over the ids).
    pub fn new(version: u64, ids: IdSet, reflects_until: Option<DateTime<Utc>>) -> LoadedVersion {
        let (prefilter, prefix) = Prefilter::build(&ids);
        let directory = Directory::build(&ids, prefix);
        LoadedVersion { version, ids, prefilter, directory, reflects_until }
    }

    /// The hash of `user` that [`has_hashed`](Self::has_hashed) takes:
    /// compute it once per request and pass it to every version probed.
    /// Seeded at random per process, so it means nothing outside it.
    pub fn hash(user: &str) -> u64 {
        LoadedVersion::hash_bytes(user.as_bytes())
    }

    fn hash_bytes(user: &[u8]) -> u64 {
        static HASHER: LazyLock<foldhash::quality::RandomState> = LazyLock::new(Default::default);
        HASHER.hash_one(user)
    }

    /// Starts loading the prefilter line of `hash` into the cache without
    /// waiting for it. The users route calls it on every active version
    /// before probing any, so the lines' cache misses (one per version:
    /// the prefilters outgrow the caches) overlap instead of coming one
    /// after another.
    pub fn prefetch(&self, hash: u64) {
        self.prefilter.prefetch(hash);
    }

    /// Whether `user` is a member: the user's override when the version
    /// does not reflect it, else the index. The same rule as the Redis
    /// layout's ingest: an override recorded after the version's lake data
    /// wins, an older one is in the lake data already.
    pub fn has(&self, user: &str, overlay: Option<&Overlay>) -> bool {
        self.has_hashed(user, LoadedVersion::hash(user), overlay)
    }

    /// [`has`](Self::has) with the user's [`hash`](Self::hash) computed by
    /// the caller (the users route probes every active version with one).
    /// `hash` must be `LoadedVersion::hash(user)`: another value may hide a
    /// member, though it never makes a non-member one.
    pub fn has_hashed(&self, user: &str, hash: u64, overlay: Option<&Overlay>) -> bool {
        if let Some(change) = overlay.and_then(|overlay| overlay.get(user)) {
            if change.counts_for(self.reflects_until) {
                return change.includes();
            }
        }
        self.contains(user, hash)
    }

    /// The index's answer: the prefilter turns most non-members away in
    /// one cache line; the rest are looked up exactly, the directory
    /// narrowing the search to the block that may hold them.
    fn contains(&self, user: &str, hash: u64) -> bool {
        self.prefilter.may_contain(hash)
            && self.directory.blocks(user.as_bytes()).is_some_and(|blocks| self.ids.contains_within(user, blocks))
    }

    /// Whether the prefilter lets a user of this [`hash`](Self::hash)
    /// through to the exact lookup: always for a member, for a few
    /// percent of the others (the benchmarks measure how many).
    pub fn prefilter_passes(&self, hash: u64) -> bool {
        self.prefilter.may_contain(hash)
    }

    pub fn members(&self) -> u64 {
        self.ids.len()
    }

    /// Bytes held for it: the index file, the prefilter and the directory.
    pub fn bytes(&self) -> usize {
        self.ids.file_len() + self.prefilter.bytes() + self.directory.bytes()
    }

    pub fn reflects_until(&self) -> Option<DateTime<Utc>> {
        self.reflects_until
    }
}

/// Bits of prefilter per member: one byte per member, for which about
/// 3 % of non-members get past it to the exact lookup (10 bits would let
/// about 1 % through; the exact lookup of a non-member costs about as much
/// as a member's, a few cache misses).
const PREFILTER_BITS_PER_MEMBER: usize = 8;

/// One cache line of the prefilter.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// A blocked Bloom filter over a version's members (split-block, as in
/// Parquet's, with 512-bit blocks): a member's hash picks one cache line
/// and sets one bit in each of its eight words. A lookup reads that one
/// line: any bit clear, and the user is not a member. No false negatives;
/// false positives go on to the exact lookup, so the answer stays exact.
struct Prefilter {
    lines: Box<[Line]>,
}

impl std::fmt::Debug for Prefilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefilter").field("lines", &self.lines.len()).finish()
    }
}

/// Odd multipliers, one per word, spreading the hash's low half over each
/// word's 64 bits (Parquet's split-block Bloom filter salts).
const SALTS: [u32; 8] = [0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31];

impl Prefilter {
    /// Builds the filter over every id, and returns with it the prefix all
    /// ids share (what the [`Directory`] needs, found in the same pass).
    fn build(ids: &IdSet) -> (Prefilter, Vec<u8>) {
        let members = usize::try_from(ids.len()).unwrap_or(usize::MAX);
        let count = (members.saturating_mul(PREFILTER_BITS_PER_MEMBER)).div_ceil(512);
        let mut lines = vec![Line::default(); count].into_boxed_slice();
        let mut prefix: Option<Vec<u8>> = None;
        // Hashed a batch at a time, then each line of the batch read once
        // before any is set: the reads are independent, so their cache
        // misses overlap instead of each waiting behind the decoding of
        // the next id (a filter larger than the caches was built 4 times
        // slower one id at a time).
        let mut batch = [0u64; 32];
        let mut batched = 0;
        let mut all = ids.iter();
        while let Some(id) = all.next_id() {
            let id = id.as_bytes();
            match &mut prefix {
                None => prefix = Some(id.to_vec()),
                Some(prefix) if !id.starts_with(prefix) => prefix.truncate(common_prefix(prefix, id)),
                Some(_) => {}
            }
            batch[batched] = LoadedVersion::hash_bytes(id);
            batched += 1;
            if batched == batch.len() {
                let touched = batch.iter().fold(0, |seen, &hash| seen ^ lines[Prefilter::line(lines.len(), hash)].0[0]);
                std::hint::black_box(touched);
                batch.iter().for_each(|&hash| Prefilter::insert(&mut lines, hash));
                batched = 0;
            }
        }
        batch[..batched].iter().for_each(|&hash| Prefilter::insert(&mut lines, hash));
        (Prefilter { lines }, prefix.unwrap_or_default())
    }

    /// The line of `hash`, of `lines`: its high half, scaled.
    fn line(lines: usize, hash: u64) -> usize {
        (((hash >> 32) * lines as u64) >> 32) as usize
    }

    /// The line of `hash` and the bit to test in each of its words (from
    /// its low half).
    fn locate(lines: usize, hash: u64) -> (usize, [u64; 8]) {
        let low = hash as u32;
        (Prefilter::line(lines, hash), SALTS.map(|salt| 1u64 << (low.wrapping_mul(salt) >> 26)))
    }

    fn insert(lines: &mut [Line], hash: u64) {
        let (line, masks) = Prefilter::locate(lines.len(), hash);
        for (word, mask) in lines[line].0.iter_mut().zip(masks) {
            *word |= mask;
        }
    }

    fn prefetch(&self, hash: u64) {
        if let Some(line) = self.lines.get(Prefilter::line(self.lines.len(), hash)) {
            // SAFETY: a prefetch is a hint: it reads nothing the program
            // sees and cannot fault, and `line` is a live reference anyway.
            // SSE is part of every x86-64 target.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(std::ptr::from_ref(line).cast());
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = line;
        }
    }

    /// False: not a member. True: perhaps one.
    fn may_contain(&self, hash: u64) -> bool {
        if self.lines.is_empty() {
            return false;
        }
        let (line, masks) = Prefilter::locate(self.lines.len(), hash);
        let words = &self.lines[line].0;
        let mut missing = 0u64;
        for (word, mask) in words.iter().zip(masks) {
            missing |= mask & !word;
        }
        missing == 0
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val::<[Line]>(&self.lines)
    }
}

/// Blocks per group of the [`Directory`]: one cache line of keys.
const GROUP: usize = 16;
/// Groups per top of the [`Directory`]: the heads read after searching the
/// tops, one cache line of them.
const TOP: usize = 8;

/// A group's keys: its blocks' after the first, relative to the first.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct KeyLine {
    shift: u32,
    keys: [u32; GROUP - 1],
}

/// A directory over an index's blocks, so that an exact lookup reads one
/// cache-resident array and one cache line instead of binary searching the
/// file's block heads (an offset, then the id, then a string comparison,
/// each step a cache miss somewhere in the file).
///
/// Every id starts with `prefix`, the part all of them share; a block's
/// *raw key* is the next 8 bytes of its first id as a big-endian number
/// (zero padded). Raw keys never decrease as ids increase, so blocks whose
/// key is below the user's begin before the user, and blocks whose key is
/// above it begin after: the user can only be found in the blocks of equal
/// key or in the one before them ([`IdSet::contains_within`]). Blocks are
/// grouped by 16: `heads` holds each group's first raw key (8 bytes a
/// group), `tops` every 8th head (small enough to stay in cache: a lookup
/// searches it, then reads 8 heads), and a [`KeyLine`] the group's other
/// keys, less the head, shifted right until the group's last fits in 32
/// bits. A shifted key keeps the order but may tie keys that differ: ties
/// only widen the search, so the answer stays exact.
struct Directory {
    prefix: Box<[u8]>,
    blocks: usize,
    tops: Box<[u64]>,
    heads: Box<[u64]>,
    lines: Box<[KeyLine]>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl Directory {
    fn build(ids: &IdSet, prefix: Vec<u8>) -> Directory {
        let blocks = ids.block_count();
        let raw = |block: usize| eight_bytes(&ids.block_first_id(block)[prefix.len()..]);
        let groups = blocks.div_ceil(GROUP);
        let mut heads = Vec::with_capacity(groups);
        let mut lines = Vec::with_capacity(groups);
        for group in 0..groups {
            let first = group * GROUP;
            let last = (first + GROUP).min(blocks) - 1;
            let head = raw(first);
            let shift = (u64::BITS - (raw(last) - head).leading_zeros()).saturating_sub(32);
            let mut line = KeyLine { shift, keys: [u32::MAX; GROUP - 1] };
            for (slot, block) in (0..).zip(first + 1..=last) {
                line.keys[slot] = line.key(head, raw(block));
            }
            heads.push(head);
            lines.push(line);
        }
        let tops = heads.iter().step_by(TOP).copied().collect();
        Directory { prefix: prefix.into_boxed_slice(), blocks, tops, heads: heads.into(), lines: lines.into() }
    }

    /// The blocks to search for `id` ([`IdSet::contains_within`]): those
    /// before begin with an id before it, those after with an id after it.
    /// `None` when no member can be `id` (it lacks the shared prefix, or
    /// sorts before the first block).
    fn blocks(&self, id: &[u8]) -> Option<Range<usize>> {
        let raw = eight_bytes(id.strip_prefix(&*self.prefix)?);
        // Groups whose head is below the user's key (searched in `tops`,
        // then counted in the 8 heads after the last top below), then at
        // most it.
        let below = match self.tops.partition_point(|&top| top < raw) {
            0 => 0,
            tops => {
                let from = (tops - 1) * TOP + 1;
                let heads = &self.heads[from..(from + TOP - 1).min(self.heads.len())];
                from + heads.iter().filter(|&&head| head < raw).count()
            }
        };
        let at_most = match self.heads.get(below) {
            Some(&head) if head == raw => below + self.heads[below..].partition_point(|&head| head <= raw),
            _ => below,
        };
        if at_most == 0 {
            return None;
        }
        // In the last group whose head is below: the head, and the blocks
        // whose shifted key is below the user's (and so is their raw key).
        let start = match below.checked_sub(1) {
            None => 0,
            Some(group) => {
                let line = &self.lines[group];
                let key = line.key(self.heads[group], raw);
                group * GROUP + 1 + line.keys.iter().filter(|&&k| k < key).count()
            }
        };
        // In the last group whose head is at most it: the blocks whose
        // shifted key is at most the user's; the blocks after have a
        // larger raw key.
        let group = at_most - 1;
        let line = &self.lines[group];
        let key = line.key(self.heads[group], raw);
        let end = (group * GROUP + 1 + line.keys.iter().filter(|&&k| k <= key).count()).min(self.blocks);
        Some(start..end)
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val::<[u64]>(&self.tops)
            + std::mem::size_of_val::<[u64]>(&self.heads)
            + std::mem::size_of_val::<[KeyLine]>(&self.lines)
            + self.prefix.len()
    }
}

impl KeyLine {
    /// `raw` (at least `head`) relative to the group's head, shifted;
    /// never decreasing as `raw` grows.
    fn key(&self, head: u64, raw: u64) -> u32 {
        u32::try_from((raw - head) >> self.shift).unwrap_or(u32::MAX)
    }
}

/// The first 8 bytes of `bytes` as a big-endian number, zero padded.
fn eight_bytes(bytes: &[u8]) -> u64 {
    let mut out = [0u8; 8];
    let len = bytes.len().min(8);
    out[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(out)
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A segment's realtime overrides, the newest per user.
pub type Overlay = HashMap<String, Override>;

/// Adds `change` unless the user has a newer override ([`Override::supersedes`]).
pub fn merge_override(overlay: &mut Overlay, change: Override) {
    if change.replaces(overlay.get(&change.user)) {
        overlay.insert(change.user.clone(), change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segment_core::store::OverrideOp;
    use segment_tests::SplitMix64;

    fn change(user: &str, op: OverrideOp, ts: i64) -> Override {
        Override { user: user.into(), op, ts: DateTime::from_timestamp(ts, 0).unwrap(), id: format!("{user}-{ts}"), offset: None }
    }

    #[test]
    fn an_override_counts_only_where_the_version_does_not_reflect_it() {
        let ids = IdSet::open(segment_core::index::build(["a", "b"]).unwrap()).unwrap();
        let version = LoadedVersion::new(3, ids, Some(DateTime::from_timestamp(100, 0).unwrap()));
        let mut overlay = Overlay::new();
        merge_override(&mut overlay, change("a", OverrideOp::Exclude, 150));
        merge_override(&mut overlay, change("c", OverrideOp::Include, 150));
        merge_override(&mut overlay, change("b", OverrideOp::Exclude, 100));
        assert!(!version.has("a", Some(&overlay)), "excluded after the version's lake data");
        assert!(version.has("c", Some(&overlay)), "included after the version's lake data");
        assert!(version.has("b", Some(&overlay)), "an override the lake data reflects already does not count");
        assert!(version.has("a", None) && !version.has("c", None));
        assert!(!version.has("z", Some(&overlay)));
    }

    /// Random ids: `prefix` and 0 to `max_len` characters of `alphabet`.
    fn random_id(random: &mut SplitMix64, prefix: &str, alphabet: &[char], max_len: usize) -> String {
        let len = random.below(max_len as u64 + 1);
        let mut id = prefix.to_string();
        id.extend((0..len).map(|_| alphabet[random.below(alphabet.len() as u64) as usize]));
        id
    }

    fn loaded(ids: &std::collections::BTreeSet<String>) -> (IdSet, LoadedVersion) {
        let bytes = segment_core::index::build(ids.iter().map(String::as_str)).unwrap();
        (IdSet::open(bytes.clone()).unwrap(), LoadedVersion::new(1, IdSet::open(bytes).unwrap(), None))
    }

    /// For random sets of many shapes (short ids over a tiny alphabet with
    /// NUL and non-ASCII, ids sharing prefixes longer than the directory's
    /// 8 bytes, sequential digits; empty to thousands of ids) and random
    /// queries (members, near misses, other ids), the prefiltered answer is
    /// exactly `IdSet::contains`'s: no false positive reaches the caller,
    /// no member is ever missed.
    #[test]
    fn the_prefiltered_answer_is_the_index_answer() {
        let mut random = SplitMix64(42);
        let shapes: [(&str, &[char], usize); 4] = [
            ("", &['a', 'b', '\0', '\u{e9}', 'z'], 6),
            ("tenant-acme/users/", &['0', '1', '2'], 12),
            ("user-", &['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'], 7),
            ("", &['x'], 40),
        ];
        for round in 0..300 {
            let (prefix, alphabet, max_len) = shapes[round % shapes.len()];
            let size = match round / shapes.len() % 6 {
                0 => 0,
                1 => 1,
                2 => 16,
                3 => 17,
                _ => random.below(3000) as usize,
            };
            // The prefix itself may be an id: no empty ids, though.
            let ids: std::collections::BTreeSet<String> =
                (0..size).map(|_| random_id(&mut random, prefix, alphabet, max_len)).filter(|id| !id.is_empty()).collect();
            let (exact, version) = loaded(&ids);
            let mut queries: Vec<String> = ids.iter().cloned().collect();
            for id in ids.iter().take(200) {
                queries.push(format!("{id}a"));
                queries.push(format!("{id}\0"));
                let mut shorter = id.clone();
                shorter.pop();
                queries.push(shorter);
            }
            queries.extend((0..500).map(|_| random_id(&mut random, prefix, alphabet, max_len + 1)));
            queries.extend((0..100).map(|_| random_id(&mut random, "", &['a', 't', 'u', '~'], 4)));
            queries.extend(["".to_string(), "\u{10ffff}".to_string(), prefix.to_string()]);
            for query in &queries {
                let expected = ids.contains(query);
                assert_eq!(exact.contains(query), expected, "round {round}: {query:?}");
                assert_eq!(version.has(query, None), expected, "round {round}: {query:?} in {} ids", ids.len());
                assert_eq!(version.has_hashed(query, LoadedVersion::hash(query), None), expected, "round {round}: {query:?}");
            }
        }
    }

    /// At the benchmark's shape (ids `user-<7 digits>`, a quarter of the
    /// users in the segment) the prefilter turns away all but a few
    /// percent of non-members, costs one byte per member, and the
    /// directory leaves nearly every lookup one block to scan, with no
    /// block head to compare.
    #[test]
    fn the_prefilter_is_small_and_turns_most_non_members_away() {
        let ids: std::collections::BTreeSet<String> =
            (0..400_000).filter(|n| n % 4 == 1).map(|n| format!("user-{n:07}")).collect();
        let (_, version) = loaded(&ids);
        assert_eq!(version.prefilter.bytes(), (ids.len() * PREFILTER_BITS_PER_MEMBER).div_ceil(512) * 64);
        assert!(ids.iter().all(|id| version.prefilter.may_contain(LoadedVersion::hash(id))), "no false negatives");
        let outsiders: Vec<String> = (0..400_000).filter(|n| n % 4 != 1).map(|n| format!("user-{n:07}")).collect();
        let passed = outsiders.iter().filter(|id| version.prefilter.may_contain(LoadedVersion::hash(id))).count();
        let rate = passed as f64 / outsiders.len() as f64;
        assert!(rate < 0.04, "{:.2} % of non-members get past the prefilter", rate * 100.0);
        let widths: usize = outsiders.iter().map(|id| version.directory.blocks(id.as_bytes()).map_or(0, |b| b.len())).sum();
        // Block heads compared for a non-member: almost never any.
        assert!((widths as f64 / outsiders.len() as f64) < 0.01, "{widths} block heads compared for {} ids", outsiders.len());
    }

    #[test]
    fn the_newest_override_of_a_user_is_kept() {
        let mut overlay = Overlay::new();
        merge_override(&mut overlay, change("a", OverrideOp::Exclude, 200));
        merge_override(&mut overlay, change("a", OverrideOp::Include, 150));
        assert_eq!(overlay["a"].op, OverrideOp::Exclude, "an older event does not replace a newer one");
        merge_override(&mut overlay, change("a", OverrideOp::Include, 250));
        assert_eq!(overlay["a"].op, OverrideOp::Include);
    }
}
