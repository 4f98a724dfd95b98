//! Ingest's verdict on a version, and how the operator reads it back.
//!
//! `segment-worker ingest` verifies a version's result files (the manifest
//! is the task's, the index file matches its manifest entry, every part its
//! checksum and count), counts the change from the version active at
//! launch by merging the two index files, and writes what is to be
//! recorded with the version, a [`Seal`], as [`SEAL_FILE`] next to the
//! manifest, last:
//!
//! ```text
//! <resultsUri>/<namespace>/<segment>/v<version>/_seal.json
//! ```
//!
//! Ingest touches no store. Once its Job succeeded, the operator reads the
//! file ([`crate::store::ResultStore::seal_file`]), judges it against the
//! run in flight ([`judge`]) and, when it is sound, seals the version in
//! the store with it ([`crate::planner::Action::Seal`]). A missing or
//! unsound file fails the run (`IngestIncomplete`); nothing is sealed.

use serde::{Deserialize, Serialize};

use crate::api::{RunStatus, SegmentKey};
use crate::store::Seal;

/// The file name of the verdict, next to `_manifest.json`.
pub const SEAL_FILE: &str = "_seal.json";
/// Version of the seal file's format.
pub const SEAL_FORMAT: &str = "segment-seal/v1";

/// The seal file: which version it judges, and the [`Seal`] to record
/// with it (its fields inline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealFile {
    pub format: String,
    pub segment: SegmentKey,
    pub version: u64,
    #[serde(flatten)]
    pub seal: Seal,
}

impl SealFile {
    pub fn new(segment: SegmentKey, version: u64, seal: Seal) -> SealFile {
        SealFile { format: SEAL_FORMAT.to_string(), segment, version, seal }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a seal file serializes")
    }
}

/// What the operator found of ingest's verdict on the run in flight, once
/// its ingest Job succeeded and the store does not list the version yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A sound seal file of this run: the version is sealed with it.
    Sealable(Seal),
    /// No seal file: ingest did not finish its work (or is an older worker
    /// that wrote to the store).
    Missing,
    /// A file that is not this run's verdict; the reason says why.
    Invalid(String),
}

/// Judges the seal file's `bytes` (`None`: there is none) as the verdict
/// on `run`, a run of `segment`: it must parse, be of this format, name
/// this segment and version, and record the run's snapshot time and
/// definition hash (a file left by something else, or damaged, never
/// seals the version).
pub fn judge(bytes: Option<&[u8]>, segment: &SegmentKey, run: &RunStatus) -> Verdict {
    let Some(bytes) = bytes else { return Verdict::Missing };
    let file: SealFile = match serde_json::from_slice(bytes) {
        Ok(file) => file,
        Err(e) => return Verdict::Invalid(format!("{SEAL_FILE} does not parse: {e}")),
    };
    let seal = &file.seal;
    let problem = if file.format != SEAL_FORMAT {
        Some(format!("format `{}`, this operator reads `{SEAL_FORMAT}`", file.format))
    } else if file.segment != *segment || file.version != run.version {
        Some(format!("it is the verdict on {} v{}, not on {segment} v{}", file.segment, file.version, run.version))
    } else if seal.snapshot_time != Some(run.snapshot_time) {
        let recorded = seal.snapshot_time.map_or("none".to_string(), |t| t.to_rfc3339());
        Some(format!("snapshot time {recorded}, the run's is {}", run.snapshot_time.to_rfc3339()))
    } else if seal.definition_hash.as_deref() != Some(run.definition_hash.as_str()) {
        let recorded = seal.definition_hash.as_deref().unwrap_or("none");
        Some(format!("definition hash {recorded}, the run's is {}", run.definition_hash))
    } else if seal.change.is_some_and(|c| c.from == run.version) {
        Some(format!("a change counted from v{} itself", run.version))
    } else {
        None
    };
    match problem {
        Some(problem) => Verdict::Invalid(format!("{SEAL_FILE}: {problem}")),
        None => Verdict::Sealable(file.seal),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::api::{RunPhase, RunTrigger};
    use crate::store::CountedChange;

    fn run() -> RunStatus {
        let at = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        RunStatus {
            version: 3,
            phase: RunPhase::Ingesting,
            job: None,
            snapshot_time: at,
            started_at: at,
            trigger: RunTrigger::Manual,
            definition_hash: "9f2c".into(),
            generation: 1,
            computed_at: None,
            ingested_at: None,
            reason: None,
            message: None,
        }
    }

    fn seal() -> Seal {
        Seal {
            members: 120,
            snapshot_time: Some(run().snapshot_time),
            definition_hash: Some("9f2c".into()),
            change: Some(CountedChange { from: 2, changed: 7 }),
            overrides_from: Some(run().snapshot_time - chrono::Duration::hours(1)),
            table_versions: Vec::new(),
        }
    }

    #[test]
    fn a_seal_file_of_the_run_is_sealable_and_round_trips() {
        let key = SegmentKey::new("growth", "vip");
        let bytes = SealFile::new(key.clone(), 3, seal()).to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["format"], SEAL_FORMAT);
        assert_eq!((json["version"].as_u64(), json["members"].as_u64()), (Some(3), Some(120)));
        assert_eq!(json["change"], serde_json::json!({"from": 2, "changed": 7}));
        assert_eq!(judge(Some(&bytes), &key, &run()), Verdict::Sealable(seal()));
        assert_eq!(judge(None, &key, &run()), Verdict::Missing);
    }

    #[test]
    fn a_file_that_is_not_the_runs_verdict_is_invalid() {
        let key = SegmentKey::new("growth", "vip");
        let invalid = |bytes: &[u8]| match judge(Some(bytes), &key, &run()) {
            Verdict::Invalid(why) => why,
            other => panic!("{other:?} for {}", String::from_utf8_lossy(bytes)),
        };
        assert!(invalid(b"{\"members\": 5").contains("does not parse"));
        assert!(invalid(b"{}").contains("does not parse"), "no format, segment, version or members");
        let file = |edit: &dyn Fn(&mut SealFile)| {
            let mut file = SealFile::new(key.clone(), 3, seal());
            edit(&mut file);
            file.to_bytes()
        };
        assert!(invalid(&file(&|f| f.format = "segment-seal/v9".into())).contains("segment-seal/v9"));
        assert!(invalid(&file(&|f| f.version = 4)).contains("v4, not on growth/vip v3"));
        assert!(invalid(&file(&|f| f.segment = SegmentKey::new("crm", "vip"))).contains("crm/vip v3"));
        assert!(invalid(&file(&|f| f.seal.snapshot_time = None)).contains("snapshot time none"));
        assert!(invalid(&file(&|f| f.seal.definition_hash = Some("0000".into()))).contains("definition hash 0000"));
        assert!(invalid(&file(&|f| f.seal.change = Some(CountedChange { from: 3, changed: 0 }))).contains("v3 itself"));
        let without_members = String::from_utf8(file(&|_| ())).unwrap().replace("\"members\": 120,", "");
        assert!(invalid(without_members.as_bytes()).contains("members"), "the count is required");
    }
}
