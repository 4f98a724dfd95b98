//! What the operator hands a compute or ingest Job: one JSON document in
//! the `SEGMENT_TASK` environment variable. Sources are resolved by the
//! operator when it launches the Job, so workers need no Kubernetes access.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::{Definition, Segment, SegmentKey, SegmentSourceSpec};
use crate::naming::results_uri;
use crate::planner::Launch;

/// Environment variable that carries the task JSON (in-process and
/// hand-run workers).
pub const TASK_ENV: &str = "SEGMENT_TASK";
/// Environment variable naming a file with the task JSON.
pub const TASK_FILE_ENV: &str = "SEGMENT_TASK_FILE";
/// The pod annotation of a Job that holds its task JSON; a downward API
/// volume shows it to the worker as [`TASK_FILE`]. An annotation holds up
/// to 256 KiB (one environment variable only 128 KiB).
pub const TASK_ANNOTATION: &str = "segmentation.dev/task";
/// Where the operator's Jobs mount the task.
pub const TASK_DIR: &str = "/etc/segment-task";
pub const TASK_FILE: &str = "/etc/segment-task/task.json";
/// Where a failing worker writes its one-line `Reason: message`.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComputeTask {
    pub segment: SegmentKey,
    pub version: u64,
    pub generation: i64,
    pub definition_hash: String,
    /// `now()` and `within` windows are evaluated at this time.
    pub snapshot_time: DateTime<Utc>,
    pub definition: Definition,
    pub sources: Vec<SegmentSourceSpec>,
    /// Active versions of the segments a rule refers to, by name.
    #[serde(default)]
    pub segment_inputs: Vec<SegmentInput>,
    /// Where the result parts and `_manifest.json` go.
    pub results_uri: String,
}

/// Members of another segment's active version, read from its results.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SegmentInput {
    pub name: String,
    pub version: u64,
    pub results_uri: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngestTask {
    pub segment: SegmentKey,
    pub version: u64,
    pub snapshot_time: DateTime<Utc>,
    pub results_uri: String,
    /// Parts that may fail to load before the run fails (`spec.ingest.maxFailedParts`).
    #[serde(default)]
    pub max_failed_parts: u32,
}

/// The task of a compute Job (or of an in-process compute in standalone mode).
pub fn compute_task(
    segment: &Segment,
    launch: &Launch,
    sources: Vec<SegmentSourceSpec>,
    segment_inputs: Vec<SegmentInput>,
    results_base: &str,
) -> ComputeTask {
    let key = segment.key();
    ComputeTask {
        results_uri: results_uri(results_base, &key, launch.version),
        segment: key,
        version: launch.version,
        generation: launch.generation,
        definition_hash: launch.definition_hash.clone(),
        snapshot_time: launch.snapshot_time,
        definition: segment.spec.definition.clone(),
        sources,
        segment_inputs,
    }
}

/// Inputs of a rules definition that refers to other segments: each
/// referenced segment's active version (`active_of`), read from its results.
/// A segment without an active version is left out; the compute then fails
/// with `SegmentNotReady` (transient) and is retried.
pub fn segment_inputs(segment: &Segment, results_base: &str, active_of: impl Fn(&str) -> Option<u64>) -> Vec<SegmentInput> {
    let Some(rules) = &segment.spec.definition.rules else { return Vec::new() };
    let namespace = segment.key().namespace;
    rules
        .segment_refs()
        .into_iter()
        .filter_map(|name| {
            let version = active_of(name)?;
            let results_uri = results_uri(results_base, &SegmentKey::new(&namespace, name), version);
            Some(SegmentInput { name: name.to_string(), version, results_uri })
        })
        .collect()
}

/// The task of an ingest Job.
pub fn ingest_task(segment: &Segment, launch: &Launch, results_base: &str) -> IngestTask {
    let key = segment.key();
    IngestTask {
        results_uri: results_uri(results_base, &key, launch.version),
        segment: key,
        version: launch.version,
        snapshot_time: launch.snapshot_time,
        max_failed_parts: segment.spec.ingest.max_failed_parts,
    }
}

/// Why a run failed, read from the worker's termination message
/// (`Reason: message`) or, without one, from the Job's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

impl Failure {
    /// Reasons that a retry cannot fix: the definition itself is wrong.
    pub const PERMANENT: [&'static str; 5] = ["InvalidDefinition", "UnknownTable", "UnknownColumn", "QueryError", "NotOneColumn"];

    /// Parses a termination message of the form `Reason: message`.
    pub fn from_termination_message(text: &str) -> Option<Failure> {
        let line = text.lines().find(|l| !l.trim().is_empty())?.trim();
        match line.split_once(": ") {
            Some((reason, message)) if !reason.is_empty() && reason.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Some(Failure { reason: reason.to_string(), message: message.to_string() })
            }
            _ => Some(Failure { reason: "WorkerFailed".into(), message: line.to_string() }),
        }
    }

    pub fn is_transient(&self) -> bool {
        !Self::PERMANENT.contains(&self.reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_messages_are_classified() {
        let f = Failure::from_termination_message("UnknownTable: table `x` is not declared\n").unwrap();
        assert_eq!((f.reason.as_str(), f.message.as_str()), ("UnknownTable", "table `x` is not declared"));
        assert!(!f.is_transient());
        let f = Failure::from_termination_message("UnreadableSource: s3://lake/orders/: access denied").unwrap();
        assert!(f.is_transient());
        let f = Failure::from_termination_message("panicked at main.rs").unwrap();
        assert_eq!(f.reason, "WorkerFailed");
        assert!(Failure::from_termination_message("  \n").is_none());
    }
}
