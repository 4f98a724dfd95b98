//! Shards by user hash (docs/serving.md, "Shards"): where one replica
//! cannot hold every active version, each replica of shard `i` of `n`
//! holds, of every version, only the users whose hash is `i` modulo `n`.
//! The hash is 64-bit FNV-1a of the user id's UTF-8 bytes: a few lines in
//! any language, so a client or a proxy routes each request itself.

use segment_core::index::{IdSet, IdSetWriter, IndexError};

/// Which part of every version a replica holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This replica's shard, `0..count`.
    pub index: u32,
    /// How many shards the users are spread over; 1: not sharded.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard::WHOLE
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N`: shard `I` of `N`, `0 <= I < N`.
    fn from_str(text: &str) -> Result<Shard, String> {
        let (index, count) = text.split_once('/').ok_or_else(|| format!("{text:?}: expected I/N, e.g. 0/2"))?;
        let index: u32 = index.trim().parse().map_err(|_| format!("{text:?}: the shard index is not a number"))?;
        let count: u32 = count.trim().parse().map_err(|_| format!("{text:?}: the shard count is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("{text:?}: the shard index must be below the shard count, which must be at least 1"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Every user: no sharding.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The shard of `user` among `count`.
    pub fn of(user: &str, count: u32) -> u32 {
        (fnv1a64(user.as_bytes()) % u64::from(count.max(1))) as u32
    }

    /// Whether this replica answers for `user`.
    pub fn owns(&self, user: &str) -> bool {
        self.count <= 1 || Shard::of(user, self.count) == self.index
    }

    /// This shard's part of a version's ids, as an index of its own.
    pub fn part_of(&self, ids: IdSet) -> Result<IdSet, IndexError> {
        if self.count <= 1 {
            return Ok(ids);
        }
        let mut part = IdSetWriter::new();
        let mut all = ids.iter();
        while let Some(id) = all.next_id() {
            if self.owns(id) {
                part.push(id)?;
            }
        }
        IdSet::open(part.finish())
    }
}

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64_as_published() {
        // The reference values of the FNV test suite: clients must match them.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(Shard::of("foobar", 2), (0x85944171f73967e8u64 % 2) as u32);
    }

    #[test]
    fn shards_parse_and_refuse_what_cannot_be_one() {
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard { index: 1, count: 3 }));
        assert_eq!("0/1".parse::<Shard>(), Ok(Shard::WHOLE));
        for bad in ["3/3", "0/0", "1", "a/2", "1/b", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_user_is_in_exactly_one_shard_and_the_parts_add_up() {
        let users: Vec<String> = (0..2000).map(|i| format!("user-{i:05}")).collect();
        let ids = IdSet::open(segment_core::index::build(users.iter().map(String::as_str)).unwrap()).unwrap();
        let shards = [Shard { index: 0, count: 2 }, Shard { index: 1, count: 2 }];
        let parts: Vec<IdSet> = shards
            .iter()
            .map(|s| {
                s.part_of(IdSet::open(segment_core::index::build(users.iter().map(String::as_str)).unwrap()).unwrap()).unwrap()
            })
            .collect();
        assert_eq!(parts[0].len() + parts[1].len(), ids.len());
        assert!(
            parts[0].len() > 800 && parts[1].len() > 800,
            "both shards get a fair part: {} {}",
            parts[0].len(),
            parts[1].len()
        );
        for user in &users {
            let owners: Vec<usize> = (0..2).filter(|&s| shards[s].owns(user)).collect();
            assert_eq!(owners.len(), 1, "{user}");
            assert!(parts[owners[0]].contains(user) && !parts[1 - owners[0]].contains(user), "{user}");
        }
    }
}
