//! A version's members as one immutable index file (`segment-index/v1`):
//! the ids sorted bytewise, front-coded in blocks, checksummed. Ingest
//! writes it next to the version's parts; a reader answers is-member with a
//! binary search over the blocks' first ids and a scan of one block, and
//! two versions' entered/exited counts ([`changes`]) and the users who
//! entered or exited, page by page ([`diff_page`]), come from merging their
//! sorted ids, with no server-side set operation.
//!
//! ```text
//! header   "SGIX" | format u32 | ids u64 | block_len u32 | blocks u32 | entries_len u64
//! offsets  blocks × u32: where each block starts in `entries`
//! entries  per block: the first id whole (varint len, bytes), then each
//!          next id as (varint shared prefix, varint suffix len, suffix)
//! trailer  SHA-256 of everything before it
//! ```
//!
//! All integers are little-endian. Ids sharing long prefixes (`user-000123`)
//! cost a few bytes each; the block length bounds the scan per lookup.
//! [`IdSet::open`] checks the whole file (checksum, structure, strict
//! order, UTF-8) before answering anything, so a damaged or forged file is
//! refused, never half-read.

use std::cmp::Ordering;

use sha2::{Digest, Sha256};

use crate::store::Change;

pub const MAGIC: &[u8; 4] = b"SGIX";
/// The format number in the header; readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the index file in a version's directory.
pub const INDEX_FILE: &str = "members.sgix";
/// Ids per block: a lookup decodes at most this many.
pub const BLOCK_LEN: u32 = 16;

const HEADER_LEN: usize = 4 + 4 + 8 + 4 + 4 + 8;
const CHECKSUM_LEN: usize = 32;

/// Why ids cannot be written as an index, or a file cannot be read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("id {position} is not after the one before it (ids must be unique and sorted)")]
    Unsorted { position: u64 },
    #[error("an id is empty or contains a newline")]
    BadId,
    #[error("not an index file: {0}")]
    Corrupt(&'static str),
    #[error("index format {found}, this version reads {FORMAT_VERSION}")]
    Format { found: u32 },
    #[error("checksum does not match the file's contents")]
    Checksum,
}

/// Writes ids, given in strictly increasing byte order, as an index file.
#[derive(Debug)]
pub struct IdSetWriter {
    entries: Vec<u8>,
    offsets: Vec<u32>,
    previous: Vec<u8>,
    ids: u64,
}

impl Default for IdSetWriter {
    fn default() -> Self {
        IdSetWriter::new()
    }
}

impl IdSetWriter {
    pub fn new() -> IdSetWriter {
        IdSetWriter { entries: Vec::new(), offsets: Vec::new(), previous: Vec::new(), ids: 0 }
    }

    /// Appends the next id; it must sort after the previous one.
    pub fn push(&mut self, id: &str) -> Result<(), IndexError> {
        let id = id.as_bytes();
        if id.is_empty() || id.contains(&b'\n') {
            return Err(IndexError::BadId);
        }
        if self.ids > 0 && id <= self.previous.as_slice() {
            return Err(IndexError::Unsorted { position: self.ids });
        }
        if self.ids.is_multiple_of(u64::from(BLOCK_LEN)) {
            let offset = u32::try_from(self.entries.len()).map_err(|_| IndexError::Corrupt("over 4 GiB of ids"))?;
            self.offsets.push(offset);
            put_varint(&mut self.entries, id.len() as u64);
            self.entries.extend_from_slice(id);
        } else {
            let shared = common_prefix(&self.previous, id);
            put_varint(&mut self.entries, shared as u64);
            put_varint(&mut self.entries, (id.len() - shared) as u64);
            self.entries.extend_from_slice(&id[shared..]);
        }
        self.previous.clear();
        self.previous.extend_from_slice(id);
        self.ids += 1;
        Ok(())
    }

    /// The file's bytes.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.offsets.len() * 4 + self.entries.len() + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.ids.to_le_bytes());
        out.extend_from_slice(&BLOCK_LEN.to_le_bytes());
        out.extend_from_slice(&(self.offsets.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for offset in &self.offsets {
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out.extend_from_slice(&self.entries);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }
}

/// The SHA-256 digest a file records of its contents (its trailer),
/// unchecked; `None` if it is not an index file. A manifest lists it as the
/// file's checksum, so [`IdSet::open`]'s one SHA-256 pass checks the file
/// against both its trailer and the manifest.
pub fn recorded_digest(bytes: &[u8]) -> Option<&[u8]> {
    (bytes.len() >= HEADER_LEN + CHECKSUM_LEN && &bytes[..4] == MAGIC).then(|| &bytes[bytes.len() - CHECKSUM_LEN..])
}

/// Sorts ids (unique, as a result's parts are) and writes them as an index.
pub fn build<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<u8>, IndexError> {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    let mut writer = IdSetWriter::new();
    for id in ids {
        writer.push(id)?;
    }
    Ok(writer.finish())
}

/// A checked index file, read in place.
#[derive(Debug, Clone)]
pub struct IdSet {
    bytes: Vec<u8>,
    ids: u64,
    block_len: u32,
    blocks: usize,
    entries_start: usize,
    entries_end: usize,
}

impl IdSet {
    /// Checks `bytes` as an index file: checksum first, then the header,
    /// every block's entries, and that every id sorts after the one before.
    pub fn open(bytes: Vec<u8>) -> Result<IdSet, IndexError> {
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN || &bytes[..4] != MAGIC {
            return Err(IndexError::Corrupt("no index header"));
        }
        let (content, digest) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(content).as_slice() != digest {
            return Err(IndexError::Checksum);
        }
        let format = u32_at(&bytes, 4);
        if format != FORMAT_VERSION {
            return Err(IndexError::Format { found: format });
        }
        let ids = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let block_len = u32_at(&bytes, 16);
        let blocks = u32_at(&bytes, 20) as usize;
        let entries_len = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        let entries_start = HEADER_LEN + blocks * 4;
        let entries_end = usize::try_from(entries_len)
            .ok()
            .and_then(|len| entries_start.checked_add(len))
            .ok_or(IndexError::Corrupt("entries length"))?;
        if block_len == 0 || entries_end != content.len() {
            return Err(IndexError::Corrupt("section lengths"));
        }
        if ids.div_ceil(u64::from(block_len)) != blocks as u64 {
            return Err(IndexError::Corrupt("block count"));
        }
        let set = IdSet { bytes, ids, block_len, blocks, entries_start, entries_end };
        set.check_entries()?;
        Ok(set)
    }

    /// Walks every id once: offsets in order and in range, entries that
    /// decode, ids strictly increasing and UTF-8.
    fn check_entries(&self) -> Result<(), IndexError> {
        let mut previous: Vec<u8> = Vec::new();
        let mut seen = 0u64;
        for block in 0..self.blocks {
            let start = self.block_start(block)?;
            let end = if block + 1 < self.blocks { self.block_start(block + 1)? } else { self.entries_end };
            if start > end {
                return Err(IndexError::Corrupt("block offsets out of order"));
            }
            let in_block = self.block_ids(block);
            let mut reader = BlockReader::new(&self.bytes[start..end], in_block);
            while let Some(id) = reader.next_id()? {
                if seen > 0 && id <= previous.as_slice() {
                    return Err(IndexError::Corrupt("ids out of order"));
                }
                std::str::from_utf8(id).map_err(|_| IndexError::Corrupt("an id is not UTF-8"))?;
                previous.clear();
                previous.extend_from_slice(id);
                seen += 1;
            }
            if !reader.at_end() {
                return Err(IndexError::Corrupt("bytes after a block's last id"));
            }
        }
        debug_assert_eq!(seen, self.ids, "block_ids adds up to the header's count");
        Ok(())
    }

    fn block_start(&self, block: usize) -> Result<usize, IndexError> {
        let offset = u32_at(&self.bytes, HEADER_LEN + block * 4) as usize;
        let start = self.entries_start + offset;
        if start > self.entries_end {
            return Err(IndexError::Corrupt("block offset out of range"));
        }
        Ok(start)
    }

    /// Ids in `block`: a full block, or what is left in the last one.
    fn block_ids(&self, block: usize) -> usize {
        let before = block as u64 * u64::from(self.block_len);
        (self.ids - before).min(u64::from(self.block_len)) as usize
    }

    /// The entries of a block (checked by `open`).
    fn block(&self, block: usize) -> BlockReader<'_> {
        let start = self.block_start(block).expect("checked by open");
        let end = if block + 1 < self.blocks { self.block_start(block + 1).expect("checked by open") } else { self.entries_end };
        BlockReader::new(&self.bytes[start..end], self.block_ids(block))
    }

    /// A block's first id, stored whole.
    fn first_id(&self, block: usize) -> &[u8] {
        let start = self.block_start(block).expect("checked by open");
        let (len, used) = get_varint(&self.bytes[start..self.entries_end]).expect("checked by open");
        &self.bytes[start + used..start + used + len as usize]
    }

    pub fn len(&self) -> u64 {
        self.ids
    }

    pub fn is_empty(&self) -> bool {
        self.ids == 0
    }

    /// Size of the file, checksum included.
    pub fn file_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether `id` is in the set: exact, never true for an id not written.
    pub fn contains(&self, id: &str) -> bool {
        self.contains_within(id, 0..self.blocks)
    }

    /// The last block whose first id is at most `id` (0 when none is):
    /// every id after `id` is in it or in a later block.
    fn block_of(&self, id: &[u8]) -> usize {
        let (mut low, mut high) = (0usize, self.blocks);
        while low < high {
            let middle = low + (high - low) / 2;
            match self.first_id(middle) <= id {
                true => low = middle + 1,
                false => high = middle,
            }
        }
        low.saturating_sub(1)
    }

    /// Blocks in the file: [`len`](Self::len) over the block length,
    /// rounded up. A reader may build its own directory over them
    /// ([`block_first_id`](Self::block_first_id)) and narrow lookups with
    /// [`contains_within`](Self::contains_within).
    pub fn block_count(&self) -> usize {
        self.blocks
    }

    /// The first id of `block` (below [`block_count`](Self::block_count)),
    /// stored whole: what the binary search of `contains` compares against.
    pub fn block_first_id(&self, block: usize) -> &[u8] {
        self.first_id(block)
    }

    /// The blocks [`contains_within`](Self::contains_within) may read for
    /// `blocks`: those of the range, and the one before it, whose ids it
    /// scans when the range is empty (the usual case with a directory).
    pub fn blocks_read_within(&self, blocks: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let end = blocks.end.min(self.blocks);
        blocks.start.saturating_sub(1).min(end)..end
    }

    /// The bytes of the block offsets of `blocks`, where a lookup finds the
    /// blocks' entries: a reader that looks up one id in many sets can ask
    /// the CPU for these (and then [`block_entries`](Self::block_entries))
    /// in every set before reading any, so the cache misses overlap.
    pub fn block_offsets(&self, blocks: std::ops::Range<usize>) -> &[u8] {
        // Clamped, so that no range (an empty or reversed one included)
        // reaches past the offsets.
        let end = blocks.end.min(self.blocks);
        let start = blocks.start.min(end);
        &self.bytes[HEADER_LEN + start * 4..HEADER_LEN + end * 4]
    }

    /// The bytes of `block`'s entries (empty past the last block).
    pub fn block_entries(&self, block: usize) -> &[u8] {
        if block >= self.blocks {
            return &[];
        }
        let start = self.block_start(block).unwrap_or(self.entries_end);
        let end = match block + 1 < self.blocks {
            true => self.block_start(block + 1).unwrap_or(start),
            false => self.entries_end,
        };
        &self.bytes[start..end.max(start)]
    }

    /// [`contains`](Self::contains) with its binary search over the blocks
    /// narrowed to `blocks`: the caller knows that every block before
    /// `blocks.start` begins with an id before `id`, and every block from
    /// `blocks.end` on with an id after it. With such a range the answer is
    /// `contains`'s; an empty range costs no comparison of first ids, only
    /// the scan of the block before it. With a wrong range it may miss a
    /// member, but never answers true for an id not written: an id is only
    /// ever found by comparing it whole.
    pub fn contains_within(&self, id: &str, blocks: std::ops::Range<usize>) -> bool {
        let id = id.as_bytes();
        let (mut low, mut high) = (blocks.start.min(self.blocks), blocks.end.min(self.blocks));
        while low < high {
            let middle = low + (high - low) / 2;
            match self.first_id(middle).cmp(id) {
                Ordering::Less => low = middle + 1,
                Ordering::Equal => return true,
                Ordering::Greater => high = middle,
            }
        }
        low > 0 && self.block_holds(low - 1, id)
    }

    /// Whether `block` holds `id`, walking its front-coded entries without
    /// decoding them into a buffer. `matched` is how many leading bytes `id`
    /// shares with the entry just passed, which sorts before `id`: an entry
    /// sharing more than that with the one before it has the same byte
    /// where that one is below `id`, so it sorts before `id` too; any other
    /// entry equals `id` up to what it shares, and is compared from there.
    fn block_holds(&self, block: usize, id: &[u8]) -> bool {
        // A block whose offset is out of range has no entries: no id is in it.
        let entries = self.block_entries(block);
        let (mut position, mut matched) = (0usize, 0usize);
        let varint = |position: &mut usize| {
            let (value, used) = get_varint(entries.get(*position..)?)?;
            *position += used;
            usize::try_from(value).ok()
        };
        for index in 0..self.block_ids(block) {
            let shared = if index == 0 { Some(0) } else { varint(&mut position) };
            let (Some(shared), Some(suffix_len)) = (shared, varint(&mut position)) else { return false };
            let Some(suffix) = position.checked_add(suffix_len).and_then(|end| entries.get(position..end)) else {
                return false;
            };
            position += suffix_len;
            if shared > matched {
                continue;
            }
            let rest = &id[shared..];
            let common = common_prefix(suffix, rest);
            match (suffix.get(common), rest.get(common)) {
                (None, None) => return true,
                (Some(_), None) => return false,
                (Some(entry), Some(wanted)) if entry > wanted => return false,
                _ => matched = shared + common,
            }
        }
        false
    }

    /// Every id, in order.
    pub fn iter(&self) -> Ids<'_> {
        Ids { set: self, block: 0, reader: None }
    }
}

/// The ids of an [`IdSet`] in order; each borrowed until the next.
pub struct Ids<'a> {
    set: &'a IdSet,
    block: usize,
    reader: Option<BlockReader<'a>>,
}

impl Ids<'_> {
    /// The next id (a lending iterator: the slice lives until the next call).
    pub fn next_id(&mut self) -> Option<&str> {
        while self.reader.as_ref().is_none_or(|reader| reader.remaining == 0) {
            if self.block >= self.set.blocks {
                return None;
            }
            self.reader = Some(self.set.block(self.block));
            self.block += 1;
        }
        let reader = self.reader.as_mut().expect("set above");
        let id = reader.next_id().ok().flatten().expect("checked by open");
        Some(std::str::from_utf8(id).expect("checked by open"))
    }
}

/// How the members changed from one version to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changes {
    pub entered: u64,
    pub exited: u64,
    pub kept: u64,
}

impl Changes {
    /// Members that entered or exited.
    pub fn changed(&self) -> u64 {
        self.entered + self.exited
    }
}

/// Entered, exited and kept members from `old` to `new`, by one merge of
/// the two sorted id lists.
pub fn changes(old: &IdSet, new: &IdSet) -> Changes {
    let mut merge = Merge::new(Cursor::new(old), Cursor::new(new));
    let mut counts = Changes::default();
    while let Some(side) = merge.next() {
        match side {
            Side::Exited => counts.exited += 1,
            Side::Entered => counts.entered += 1,
            Side::Kept => counts.kept += 1,
        }
    }
    counts
}

/// One page of the users in exactly one of `old` and `new`, in id order:
/// entered (in `new` only) and exited (in `old` only) as they come.
/// `after` is the cursor: the page holds the changes of users after it,
/// at most `limit` of them (at least one, so a caller always advances).
/// Returns the page and the next cursor, the last user of the page, or
/// `None` once no change is left.
///
/// Ids are sorted, so resuming after a cursor is a seek: a binary search
/// over each set's blocks and a scan of one block, whatever the page's
/// depth, then one merge of the two sets from there. The cursor need not
/// be in either set.
pub fn diff_page(old: &IdSet, new: &IdSet, after: Option<&str>, limit: usize) -> (Vec<Change>, Option<String>) {
    let limit = limit.max(1);
    let cursor = |set| match after {
        Some(after) => Cursor::after(set, after.as_bytes()),
        None => Cursor::new(set),
    };
    let mut merge = Merge::new(cursor(old), cursor(new));
    let mut page: Vec<Change> = Vec::with_capacity(limit.min(1024));
    loop {
        let entered = match merge.next() {
            None => return (page, None),
            Some(Side::Kept) => continue,
            Some(side) => side == Side::Entered,
        };
        // One change beyond the page is looked for before answering, so
        // the last page says it is the last.
        if page.len() == limit {
            let next = page.last().map(|change| change.user.clone());
            return (page, next);
        }
        page.push(Change { user: merge.id().to_string(), entered });
    }
}

/// Which of two sets an id is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The old one only.
    Exited,
    /// The new one only.
    Entered,
    Kept,
}

/// The merge of two sets' sorted ids: each id once, with the side it is on.
struct Merge<'a> {
    old: Cursor<'a>,
    new: Cursor<'a>,
    /// The id [`Merge::next`] returned last.
    id: Vec<u8>,
}

impl<'a> Merge<'a> {
    fn new(old: Cursor<'a>, new: Cursor<'a>) -> Merge<'a> {
        Merge { old, new, id: Vec::new() }
    }

    /// The next id of either set (read it with [`Merge::id`]).
    fn next(&mut self) -> Option<Side> {
        let side = match (self.old.current(), self.new.current()) {
            (None, None) => return None,
            (Some(_), None) => Side::Exited,
            (None, Some(_)) => Side::Entered,
            (Some(a), Some(b)) => match a.cmp(b) {
                Ordering::Less => Side::Exited,
                Ordering::Greater => Side::Entered,
                Ordering::Equal => Side::Kept,
            },
        };
        match side {
            Side::Exited => self.old.take(&mut self.id),
            Side::Entered => self.new.take(&mut self.id),
            Side::Kept => {
                self.old.take(&mut self.id);
                self.new.advance();
            }
        }
        Some(side)
    }

    fn id(&self) -> &str {
        std::str::from_utf8(&self.id).expect("checked by open")
    }
}

/// The current id of an [`Ids`], copied into a buffer that is reused, so a
/// merge can hold two sets' ids at once.
struct Cursor<'a> {
    ids: Ids<'a>,
    id: Vec<u8>,
    done: bool,
}

impl<'a> Cursor<'a> {
    fn new(set: &'a IdSet) -> Cursor<'a> {
        let mut cursor = Cursor { ids: set.iter(), id: Vec::new(), done: false };
        cursor.advance();
        cursor
    }

    /// At the first id after `after`: starts in the block [`IdSet::block_of`]
    /// finds and skips at most that block's ids.
    fn after(set: &'a IdSet, after: &[u8]) -> Cursor<'a> {
        let ids = Ids { set, block: set.block_of(after), reader: None };
        let mut cursor = Cursor { ids, id: Vec::new(), done: false };
        cursor.advance();
        while cursor.current().is_some_and(|id| id <= after) {
            cursor.advance();
        }
        cursor
    }

    fn current(&self) -> Option<&[u8]> {
        (!self.done).then_some(self.id.as_slice())
    }

    /// Moves the current id into `out` (whose buffer it takes in
    /// exchange, no copy) and advances.
    fn take(&mut self, out: &mut Vec<u8>) {
        std::mem::swap(out, &mut self.id);
        self.advance();
    }

    fn advance(&mut self) {
        match self.ids.next_id() {
            Some(id) => {
                self.id.clear();
                self.id.extend_from_slice(id.as_bytes());
            }
            None => self.done = true,
        }
    }
}

/// Decodes one block's entries.
struct BlockReader<'a> {
    bytes: &'a [u8],
    position: usize,
    remaining: usize,
    first: bool,
    current: Vec<u8>,
}

impl<'a> BlockReader<'a> {
    fn new(bytes: &'a [u8], ids: usize) -> BlockReader<'a> {
        BlockReader { bytes, position: 0, remaining: ids, first: true, current: Vec::new() }
    }

    fn varint(&mut self) -> Result<usize, IndexError> {
        let (value, used) = get_varint(&self.bytes[self.position..]).ok_or(IndexError::Corrupt("a truncated length"))?;
        self.position += used;
        usize::try_from(value).map_err(|_| IndexError::Corrupt("a length"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], IndexError> {
        let end = self.position.checked_add(len).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(IndexError::Corrupt("an id runs past its block"))?;
        let taken = &self.bytes[self.position..end];
        self.position = end;
        Ok(taken)
    }

    fn next_id(&mut self) -> Result<Option<&[u8]>, IndexError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        if self.first {
            let len = self.varint()?;
            let id = self.take(len)?;
            self.current.clear();
            self.current.extend_from_slice(id);
            self.first = false;
        } else {
            let shared = self.varint()?;
            let suffix_len = self.varint()?;
            if shared > self.current.len() {
                return Err(IndexError::Corrupt("a shared prefix longer than the id before"));
            }
            let suffix = self.take(suffix_len)?;
            self.current.truncate(shared);
            self.current.extend_from_slice(suffix);
        }
        self.remaining -= 1;
        Ok(Some(&self.current))
    }

    fn at_end(&self) -> bool {
        self.position == self.bytes.len()
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The value and the bytes it took; `None` if truncated or over 64 bits.
fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("user-{i:07}")).collect()
    }

    fn open(ids: &[String]) -> IdSet {
        IdSet::open(build(ids.iter().map(String::as_str)).unwrap()).unwrap()
    }

    #[test]
    fn members_are_found_and_others_are_not() {
        let members: Vec<String> = ids(0..1000).into_iter().step_by(3).collect();
        let set = open(&members);
        assert_eq!(set.len(), members.len() as u64);
        for i in 0..1000u32 {
            let id = format!("user-{i:07}");
            assert_eq!(set.contains(&id), i % 3 == 0, "{id}");
        }
        for outside in ["", "a", "user-", "user-0000000x", "zzz", "user-0000998", "user-0001000"] {
            assert!(!set.contains(outside), "{outside}");
        }
    }

    #[test]
    fn sequential_ids_cost_a_few_bytes_each() {
        let set = open(&ids(0..100_000));
        let per_id = set.file_len() as f64 / 100_000.0;
        // `user-0001234` is 12 bytes; front coding keeps the suffix only.
        assert!(per_id < 5.0, "{per_id} bytes per id");
    }

    #[test]
    fn an_empty_set_is_a_valid_file() {
        let set = open(&[]);
        assert!(set.is_empty());
        assert!(!set.contains("user-1"));
        assert!(set.iter().next_id().is_none());
    }

    #[test]
    fn unsorted_duplicate_or_bad_ids_are_refused_by_the_writer() {
        let mut writer = IdSetWriter::new();
        writer.push("b").unwrap();
        assert_eq!(writer.push("a"), Err(IndexError::Unsorted { position: 1 }));
        assert_eq!(writer.push("b"), Err(IndexError::Unsorted { position: 1 }));
        assert_eq!(writer.push(""), Err(IndexError::BadId));
        assert_eq!(writer.push("c\nd"), Err(IndexError::BadId));
        assert_eq!(build(["x", "x"]), Err(IndexError::Unsorted { position: 1 }));
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let bytes = build(ids(0..100).iter().map(String::as_str)).unwrap();
        // Any flipped byte: the checksum catches it.
        for at in [0, 5, 30, bytes.len() / 2, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(IdSet::open(damaged).is_err(), "byte {at}");
        }
        let mut truncated = bytes.clone();
        truncated.truncate(bytes.len() - 40);
        assert!(IdSet::open(truncated).is_err());
        assert!(IdSet::open(Vec::new()).is_err());
    }

    /// A file whose checksum is right but whose contents lie (ids out of
    /// order, a count that does not add up) is refused too.
    #[test]
    fn a_forged_file_with_a_valid_checksum_is_refused() {
        let reseal = |mut bytes: Vec<u8>| {
            bytes.truncate(bytes.len() - CHECKSUM_LEN);
            let digest = Sha256::digest(&bytes);
            bytes.extend_from_slice(&digest);
            bytes
        };
        let bytes = build(["a", "b", "c"]).unwrap();
        let mut count = bytes.clone();
        count[8] = 2;
        assert_eq!(IdSet::open(reseal(count)).unwrap_err(), IndexError::Corrupt("bytes after a block's last id"));
        // "a", then "c" becomes "a" again: shared 0, suffix "a".
        let mut order = bytes.clone();
        let last = order.len() - CHECKSUM_LEN - 1;
        order[last] = b'a';
        assert_eq!(IdSet::open(reseal(order)).unwrap_err(), IndexError::Corrupt("ids out of order"));
        let mut format = bytes;
        format[4] = 2;
        assert_eq!(IdSet::open(reseal(format)).unwrap_err(), IndexError::Format { found: 2 });
    }

    #[test]
    fn changes_count_entered_exited_and_kept() {
        let old = open(&ids(0..100));
        let new = open(&ids(50..180));
        assert_eq!(changes(&old, &new), Changes { entered: 80, exited: 50, kept: 50 });
        assert_eq!(changes(&new, &new), Changes { entered: 0, exited: 0, kept: 130 });
        assert_eq!(changes(&open(&[]), &new).entered, 130);
    }

    /// Every page of the diff, from the start, with `limit` changes a page:
    /// the pages, and the cursors they returned.
    fn pages(old: &IdSet, new: &IdSet, limit: usize) -> Vec<(Vec<Change>, Option<String>)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = diff_page(old, new, after.as_deref(), limit);
            out.push((page, next.clone()));
            match next {
                Some(next) => after = Some(next),
                None => return out,
            }
            assert!(out.len() < 100_000, "the pages do not end");
        }
    }

    fn entered(users: &[String]) -> Vec<Change> {
        users.iter().map(|user| Change { user: user.clone(), entered: true }).collect()
    }

    fn exited(users: &[String]) -> Vec<Change> {
        users.iter().map(|user| Change { user: user.clone(), entered: false }).collect()
    }

    #[test]
    fn the_diff_lists_entered_and_exited_users_in_id_order() {
        let old = open(&ids(0..100));
        let new = open(&ids(50..180));
        let (page, next) = diff_page(&old, &new, None, 1000);
        assert_eq!(next, None);
        let mut expected = exited(&ids(0..50));
        expected.extend(entered(&ids(100..180)));
        assert_eq!(page, expected);
        // A page ends at the limit, and its last user is the next cursor.
        let (first, next) = diff_page(&old, &new, None, 30);
        assert_eq!((first.as_slice(), next.as_deref()), (&expected[..30], Some("user-0000029")));
        let (second, next) = diff_page(&old, &new, next.as_deref(), 30);
        assert_eq!((second.as_slice(), next.as_deref()), (&expected[30..60], Some("user-0000109")));
    }

    /// Blocks hold 16 ids: pages of 16 changes end on a block's last id,
    /// pages of 17 on the next block's first, and every other length in
    /// between; each cursor is resumed from by a seek into the right block.
    #[test]
    fn pages_that_split_at_block_boundaries_resume_at_the_next_id() {
        let block = BLOCK_LEN as usize;
        let all = ids(0..(block as u32 * 8));
        let (old, new) = (open(&[]), open(&all));
        for limit in 1..=(3 * block + 1) {
            let listed = pages(&old, &new, limit);
            let flat: Vec<Change> = listed.iter().flat_map(|(page, _)| page.clone()).collect();
            assert_eq!(flat, entered(&all), "limit {limit}");
            assert_eq!(listed.len(), all.len().div_ceil(limit), "limit {limit}: no empty page at the end");
            for (page, next) in &listed[..listed.len() - 1] {
                assert_eq!(page.len(), limit);
                assert_eq!(next.as_deref(), page.last().map(|c| c.user.as_str()));
            }
        }
        // Cursors on a block's last and first id, in both sets at once.
        let (old, new) = (open(&all), open(&all[..all.len() - block]));
        for b in 1..7 {
            let last_of_previous = &all[b * block - 1];
            let first = &all[b * block];
            assert_eq!(diff_page(&old, &new, Some(last_of_previous), 1).0, exited(&all[all.len() - block..][..1]));
            assert_eq!(diff_page(&open(&[]), &new, Some(last_of_previous), 1).0, entered(std::slice::from_ref(first)));
            assert_eq!(diff_page(&open(&[]), &new, Some(first), 1).0, entered(&all[b * block + 1..][..1]));
        }
    }

    #[test]
    fn a_cursor_outside_the_ids_seeks_to_the_next_one() {
        let new = open(&ids(0..40).into_iter().step_by(2).collect::<Vec<_>>());
        let empty = open(&[]);
        // Between two ids, before the first, after the last.
        let (page, next) = diff_page(&empty, &new, Some("user-0000017"), 2);
        assert_eq!((page, next.as_deref()), (entered(&[ids(18..19), ids(20..21)].concat()), Some("user-0000020")));
        assert_eq!(diff_page(&empty, &new, Some(""), 1).0, entered(&ids(0..1)));
        assert_eq!(diff_page(&empty, &new, Some("a"), 1).0, entered(&ids(0..1)));
        assert_eq!(diff_page(&empty, &new, Some("user-0000038"), 10), (Vec::new(), None));
        assert_eq!(diff_page(&empty, &new, Some("zzz"), 10), (Vec::new(), None));
        assert_eq!(diff_page(&new, &empty, Some("\u{10ffff}"), 10), (Vec::new(), None));
    }

    #[test]
    fn empty_and_identical_sets_have_empty_diffs() {
        let (empty, some) = (open(&[]), open(&ids(0..100)));
        assert_eq!(diff_page(&empty, &empty, None, 10), (Vec::new(), None));
        assert_eq!(diff_page(&some, &some, None, 10), (Vec::new(), None));
        assert_eq!(diff_page(&some, &some, Some("user-0000050"), 10), (Vec::new(), None));
        let flat = |old: &IdSet, new: &IdSet| pages(old, new, 7).into_iter().flat_map(|(page, _)| page).collect::<Vec<_>>();
        assert_eq!(flat(&empty, &some), entered(&ids(0..100)));
        assert_eq!(flat(&some, &empty), exited(&ids(0..100)));
        // A limit of 0 still advances: one change a page.
        assert_eq!(diff_page(&empty, &some, None, 0), (entered(&ids(0..1)), Some("user-0000000".to_string())));
    }

    proptest! {
        /// Any set of ids, including non-ASCII and shared prefixes longer
        /// than a block: the file holds exactly them, in order, and the
        /// change counts agree with set arithmetic.
        #[test]
        fn the_index_holds_exactly_its_ids(
            old in proptest::collection::btree_set("[a-c\u{e9}]{1,6}", 0..200),
            new in proptest::collection::btree_set("[a-c\u{e9}]{1,6}", 0..200),
            probes in proptest::collection::vec("[a-c\u{e9}]{0,7}", 0..50),
        ) {
            let old_set = IdSet::open(build(old.iter().map(String::as_str)).unwrap()).unwrap();
            let new_set = IdSet::open(build(new.iter().map(String::as_str)).unwrap()).unwrap();
            let mut listed = Vec::new();
            let mut all = new_set.iter();
            while let Some(id) = all.next_id() {
                listed.push(id.to_string());
            }
            prop_assert_eq!(&listed, &new.iter().cloned().collect::<Vec<_>>());
            for probe in probes.iter().chain(old.iter()) {
                prop_assert_eq!(new_set.contains(probe), new.contains(probe), "{}", probe);
            }
            let kept = old.intersection(&new).count() as u64;
            let expected = Changes {
                entered: new.difference(&old).count() as u64,
                exited: old.difference(&new).count() as u64,
                kept,
            };
            prop_assert_eq!(changes(&old_set, &new_set), expected);
        }

        /// Paged through with any limit, or resumed after any cursor, the
        /// diff is the symmetric difference of the two sets, in order:
        /// `entered` for the new set's ids, each page full but the last.
        #[test]
        fn the_paged_diff_is_the_symmetric_difference(
            old in proptest::collection::btree_set("[a-c\u{e9}]{1,5}", 0..300),
            new in proptest::collection::btree_set("[a-c\u{e9}]{1,5}", 0..300),
            limit in 1usize..40,
            after in "[a-c\u{e9}]{0,6}",
        ) {
            let old_set = IdSet::open(build(old.iter().map(String::as_str)).unwrap()).unwrap();
            let new_set = IdSet::open(build(new.iter().map(String::as_str)).unwrap()).unwrap();
            let expected: Vec<Change> = old
                .symmetric_difference(&new)
                .map(|user| Change { user: user.clone(), entered: new.contains(user) })
                .collect();
            let listed = pages(&old_set, &new_set, limit);
            prop_assert_eq!(listed.len(), expected.len().div_ceil(limit).max(1));
            for (page, next) in &listed[..listed.len() - 1] {
                prop_assert_eq!(page.len(), limit);
                prop_assert_eq!(next.as_deref(), page.last().map(|c| c.user.as_str()));
            }
            let flat: Vec<Change> = listed.into_iter().flat_map(|(page, _)| page).collect();
            prop_assert_eq!(&flat, &expected);

            let rest: Vec<Change> = expected.iter().filter(|c| c.user.as_str() > after.as_str()).cloned().collect();
            let (page, next) = diff_page(&old_set, &new_set, Some(&after), limit);
            prop_assert_eq!(&page[..], &rest[..rest.len().min(limit)]);
            prop_assert_eq!(next.is_some(), rest.len() > limit);
        }
    }

    #[test]
    fn the_blocks_a_lookup_reads_are_within_the_set_whatever_the_range() {
        let ids: Vec<String> = (0..40).map(|n| format!("id-{n:03}")).collect();
        let set = IdSet::open(build(ids.iter().map(String::as_str)).unwrap()).unwrap();
        assert_eq!(set.block_count(), 3);
        assert_eq!(set.blocks_read_within(2..2), 1..2, "an empty range reads the block before it");
        assert_eq!(set.blocks_read_within(0..0), 0..0);
        assert_eq!(set.blocks_read_within(1..3), 0..3);
        assert_eq!(set.blocks_read_within(5..9), 3..3);
        let reversed = || std::ops::Range { start: 3, end: 1 };
        assert_eq!(set.blocks_read_within(reversed()), 1..1);
        assert_eq!(set.block_offsets(0..3).len(), 12);
        assert!(set.block_offsets(reversed()).is_empty() && set.block_offsets(7..9).is_empty());
        // Each block's entries begin with its first id whole (length, bytes).
        assert_eq!(&set.block_entries(1)[..7], b"\x06id-016");
        assert_eq!(&set.block_entries(2)[..7], b"\x06id-032");
        assert!(set.block_entries(3).is_empty());
        let whole: usize = (0..3).map(|block| set.block_entries(block).len()).sum();
        assert_eq!(whole, set.entries_end - set.entries_start);
    }

    proptest! {
        /// `contains_within` given the blocks a reader's directory would
        /// narrow the search to (from a block's first id on the exact
        /// answer's side, each range as wide as any directory could leave
        /// it) answers as `contains`; over every block, too.
        #[test]
        fn a_search_narrowed_to_the_right_blocks_answers_as_contains(
            ids in proptest::collection::btree_set("[a-c\u{e9}\0]{1,6}", 0..300),
            probes in proptest::collection::vec("[a-c\u{e9}\0]{0,7}", 0..60),
            slack in 0usize..4,
        ) {
            let set = IdSet::open(build(ids.iter().map(String::as_str)).unwrap()).unwrap();
            let blocks = set.block_count();
            for probe in probes.iter().chain(ids.iter()) {
                let expected = ids.contains(probe);
                prop_assert_eq!(set.contains(probe), expected);
                prop_assert_eq!(set.contains_within(probe, 0..blocks), expected, "{:?}", probe);
                let before = (0..blocks).filter(|&b| set.block_first_id(b) < probe.as_bytes()).count();
                let not_after = (0..blocks).filter(|&b| set.block_first_id(b) <= probe.as_bytes()).count();
                let narrowed = before.saturating_sub(slack)..(not_after + slack).min(blocks);
                prop_assert_eq!(set.contains_within(probe, before..not_after), expected, "{:?}", probe);
                prop_assert_eq!(set.contains_within(probe, narrowed), expected, "{:?}", probe);
            }
        }
    }
}
