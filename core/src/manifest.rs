//! The result of a compute run in object storage:
//!
//! ```text
//! <resultsUri>/<namespace>/<segment>/v<version>/part-00000.txt ...
//! <resultsUri>/<namespace>/<segment>/v<version>/_manifest.json
//! ```
//!
//! A part holds user ids, one per line (UTF-8, `\n`-terminated, no
//! duplicates across parts). Next to them, `members.sgix` holds the same
//! ids as one sorted index file ([`crate::index`]), listed in the manifest
//! as `index` (results written before the index existed have none). The
//! manifest is written last: no manifest means no result. Ingest checks
//! every part's count and checksum.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{SegmentKey, SourceFormat};

pub const MANIFEST_FILE: &str = "_manifest.json";
/// Version of the manifest and part format.
pub const FORMAT: &str = "segment-ids/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub segment: SegmentKey,
    pub version: u64,
    pub generation: i64,
    pub definition_hash: String,
    pub snapshot_time: DateTime<Utc>,
    pub computed_at: DateTime<Utc>,
    /// Sum of the parts' members.
    pub members: u64,
    pub parts: Vec<Part>,
    /// The members as one index file; `None` in results from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Part>,
    /// The lake tables the run read, with the version of each Delta
    /// table; empty in results from before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceRead>,
}

/// A lake table a run read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceRead {
    /// The SQL table name (the SegmentSource's `table`).
    pub table: String,
    /// The SegmentSource's format.
    pub format: SourceFormat,
    /// The table version read: the newest commit at or before the
    /// snapshot time (Delta), or the id of the newest snapshot committed
    /// at or before it (Iceberg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    /// File name inside the version's directory.
    pub file: String,
    pub members: u64,
    /// `sha256:<hex>` of the file's bytes.
    pub checksum: String,
}

/// File name of part `index`.
pub fn part_file(index: usize) -> String {
    format!("part-{index:05}.txt")
}

/// The checksum recorded for a part.
pub fn checksum(bytes: &[u8]) -> String {
    digest_text(&Sha256::digest(bytes))
}

/// The checksum recorded for an index file: the digest of its contents
/// that it carries in its trailer ([`crate::index::recorded_digest`]), so
/// that opening it hashes it once. `None` if it is not an index file.
pub fn index_checksum(bytes: &[u8]) -> Option<String> {
    crate::index::recorded_digest(bytes).map(digest_text)
}

fn digest_text(digest: &[u8]) -> String {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Encodes user ids as a part.
pub fn encode_part<'a>(users: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for user in users {
        out.extend_from_slice(user.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Why a part or manifest cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    #[error("{file}: checksum {actual} does not match the manifest's {expected}")]
    Checksum { file: String, expected: String, actual: String },
    #[error("{file}: {actual} members, the manifest says {expected}")]
    Count { file: String, expected: u64, actual: u64 },
    #[error("{file}: not UTF-8 text")]
    Encoding { file: String },
    #[error("manifest: {0}")]
    Manifest(String),
}

impl Manifest {
    /// Checks the manifest itself: format, and that the parts add up.
    pub fn validate(&self) -> Result<(), ResultError> {
        if self.format != FORMAT {
            return Err(ResultError::Manifest(format!("format `{}`, this version reads `{FORMAT}`", self.format)));
        }
        let sum: u64 = self.parts.iter().map(|p| p.members).sum();
        if sum != self.members {
            return Err(ResultError::Manifest(format!("parts hold {sum} members, the manifest says {}", self.members)));
        }
        if let Some(index) = &self.index {
            if index.members != self.members {
                return Err(ResultError::Manifest(format!(
                    "the index holds {} members, the manifest says {}",
                    index.members, self.members
                )));
            }
        }
        Ok(())
    }
}

impl Part {
    /// Verifies an index file's bytes against the manifest and opens it:
    /// the digest it records must be the manifest's, and
    /// [`IdSet::open`](crate::index::IdSet::open) checks the contents
    /// against that digest.
    pub fn open_index(&self, bytes: Vec<u8>) -> Result<crate::index::IdSet, ResultError> {
        let actual = index_checksum(&bytes).unwrap_or_else(|| "none (not an index file)".to_string());
        if actual != self.checksum {
            return Err(ResultError::Checksum { file: self.file.clone(), expected: self.checksum.clone(), actual });
        }
        let set = crate::index::IdSet::open(bytes)
            .map_err(|e| ResultError::Manifest(format!("{}: not a valid index: {e}", self.file)))?;
        if set.len() != self.members {
            return Err(ResultError::Count { file: self.file.clone(), expected: self.members, actual: set.len() });
        }
        Ok(set)
    }

    /// Verifies a part's bytes against the manifest and returns its ids.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Vec<&'a str>, ResultError> {
        let actual = checksum(bytes);
        if actual != self.checksum {
            return Err(ResultError::Checksum { file: self.file.clone(), expected: self.checksum.clone(), actual });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ResultError::Encoding { file: self.file.clone() })?;
        let users: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        if users.len() as u64 != self.members {
            return Err(ResultError::Count { file: self.file.clone(), expected: self.members, actual: users.len() as u64 });
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_round_trips_and_corruption_is_caught() {
        let bytes = encode_part(["u1", "u2", "u3"]);
        let part = Part { file: part_file(0), members: 3, checksum: checksum(&bytes) };
        assert_eq!(part.decode(&bytes).unwrap(), vec!["u1", "u2", "u3"]);
        let mut corrupted = bytes.clone();
        corrupted[0] = b'x';
        assert!(matches!(part.decode(&corrupted), Err(ResultError::Checksum { .. })));
        let wrong_count = Part { members: 4, ..part.clone() };
        assert!(matches!(wrong_count.decode(&bytes), Err(ResultError::Count { expected: 4, actual: 3, .. })));
        assert_eq!(part_file(12), "part-00012.txt");
    }

    #[test]
    fn an_index_is_checked_against_its_manifest_entry() {
        let bytes = crate::index::build(["u1", "u2", "u3"]).unwrap();
        let entry = Part { file: crate::index::INDEX_FILE.into(), members: 3, checksum: index_checksum(&bytes).unwrap() };
        assert!(entry.open_index(bytes.clone()).unwrap().contains("u2"));
        let other = crate::index::build(["u1", "u2", "u4"]).unwrap();
        assert!(matches!(entry.open_index(other), Err(ResultError::Checksum { .. })));
        // The trailer matches the manifest, the contents do not.
        let mut flipped = bytes.clone();
        flipped[40] ^= 0x01;
        assert!(matches!(entry.open_index(flipped), Err(ResultError::Manifest(m)) if m.contains("checksum")));
        assert!(matches!(entry.open_index(b"u1\nu2\nu3\n".to_vec()), Err(ResultError::Checksum { .. })));
        let wrong_count = Part { members: 2, ..entry.clone() };
        assert!(matches!(wrong_count.open_index(bytes), Err(ResultError::Count { expected: 2, actual: 3, .. })));

        let manifest = Manifest {
            format: FORMAT.into(),
            segment: SegmentKey::new("n", "s"),
            version: 1,
            generation: 1,
            definition_hash: "h".into(),
            snapshot_time: Utc::now(),
            computed_at: Utc::now(),
            members: 3,
            parts: vec![Part { file: part_file(0), members: 3, checksum: "sha256:0".into() }],
            index: Some(wrong_count),
            sources: Vec::new(),
        };
        let error = manifest.validate().unwrap_err();
        assert!(error.to_string().contains("the index holds 2 members"), "{error}");
        assert!(Manifest { index: Some(entry), ..manifest.clone() }.validate().is_ok());
        // Results written before the index existed stay readable.
        let old: Manifest = serde_json::from_value(serde_json::to_value(Manifest { index: None, ..manifest }).unwrap()).unwrap();
        assert!(old.index.is_none() && old.validate().is_ok());
    }

    #[test]
    fn manifests_without_sources_still_parse_and_delta_versions_round_trip() {
        let old = serde_json::json!({
            "format": FORMAT, "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1,
            "definitionHash": "h", "snapshotTime": "2026-01-01T00:00:00Z", "computedAt": "2026-01-01T00:01:00Z",
            "members": 0, "parts": []
        });
        let manifest: Manifest = serde_json::from_value(old).unwrap();
        assert!(manifest.sources.is_empty());
        let read = SourceRead { table: "orders".into(), format: SourceFormat::Delta, version: Some(7) };
        let with = Manifest { sources: vec![read.clone()], ..manifest };
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["sources"], serde_json::json!([{"table": "orders", "format": "delta", "version": 7}]));
        assert_eq!(serde_json::from_value::<Manifest>(json).unwrap().sources, vec![read]);
    }
}
