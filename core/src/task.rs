//! What the operator hands a compute or ingest Job: one JSON document, in
//! a file the Job mounts from its pod's annotation (`--task-file`), or
//! given inline (`--task`, `TASK`) to an in-process or hand-run worker.
//! Sources are resolved by the operator when it launches the Job, so
//! workers need no Kubernetes access.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::{ComputeClassSpec, ComputeEngine, Definition, Segment, SegmentKey, SegmentSourceSpec};
use crate::iceberg::IcebergAccess;
use crate::naming::results_uri;
use crate::planner::Launch;
use crate::reasons::FailureReason;

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
    /// The engine that runs the definition (`"engine": "spark"`); absent
    /// means DataFusion.
    #[serde(default, skip_serializing_if = "ComputeEngine::is_default")]
    pub engine: ComputeEngine,
    /// The catalogs the Iceberg sources name and where their tables may
    /// be, from the namespace's ComputeClass; absent when no source is an
    /// Iceberg table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iceberg: Option<IcebergAccess>,
}

impl ComputeTask {
    /// The task with what its Iceberg sources need of `class`, the
    /// namespace's ComputeClass (the operator's defaults: none).
    pub fn with_iceberg_access(mut self, class: &ComputeClassSpec, results_base: &str) -> ComputeTask {
        self.iceberg = IcebergAccess::resolve(&self.sources, class, &self.segment.namespace, results_base);
        self
    }
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
    /// Parts that may fail ingest's check before the run fails
    /// (`spec.ingest.maxFailedParts`); the index file may not.
    #[serde(default)]
    pub max_failed_parts: u32,
    /// The version active when the run was launched: ingest counts how
    /// this version differs from it, from the two index files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_with: Option<VersionFiles>,
    /// Realtime overrides from this time on are laid over the version (it
    /// is recorded in the verdict, and the version sealed with it): the
    /// snapshot time minus the lake's lag grace, since the lake may not
    /// hold the events of the last moments before the snapshot yet.
    /// Absent: the snapshot time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides_from: Option<DateTime<Utc>>,
}

/// One version of the same segment and where its results are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionFiles {
    pub version: u64,
    pub results_uri: String,
}

/// The sources a compute of `definition` reads, of those its namespace
/// declares. SQL reads only the tables it names, and a namespace may
/// declare hundreds: the task (a pod annotation) carries those alone.
/// Rules read every table (`not` is relative to the users of all of
/// them), a static list none.
pub fn sources_read<'a>(
    definition: &Definition,
    declared: impl IntoIterator<Item = &'a SegmentSourceSpec>,
) -> Vec<&'a SegmentSourceSpec> {
    if definition.static_list.is_some() {
        return Vec::new();
    }
    let read = match &definition.sql {
        Some(_) => crate::definition::validate(definition, None).map(|refs| refs.tables).ok(),
        None => None,
    };
    declared.into_iter().filter(|s| read.as_ref().is_none_or(|tables| tables.contains(&s.table))).collect()
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
        engine: segment.spec.compute.as_ref().map(|c| c.engine).unwrap_or_default(),
        iceberg: None,
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
/// `lake_lag` is the grace before the snapshot time that realtime
/// overrides still count in ([`IngestTask::overrides_from`]).
pub fn ingest_task(segment: &Segment, launch: &Launch, results_base: &str, lake_lag: chrono::Duration) -> IngestTask {
    let key = segment.key();
    let active = segment.status.as_ref().and_then(|status| status.active_version).filter(|v| *v != launch.version);
    IngestTask {
        results_uri: results_uri(results_base, &key, launch.version),
        compare_with: active.map(|version| VersionFiles { version, results_uri: results_uri(results_base, &key, version) }),
        segment: key,
        version: launch.version,
        snapshot_time: launch.snapshot_time,
        max_failed_parts: segment.spec.ingest.max_failed_parts,
        overrides_from: Some(launch.snapshot_time - lake_lag),
    }
}

/// Why a run failed, read from the worker's termination message
/// (`Reason: message`) or, without one, from the Job's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Failure {
        Failure { reason, message: message.into() }
    }

    /// Parses a termination message of the form `Reason: message`. A line
    /// without a known reason is `WorkerFailed` with the whole line as its
    /// message (a panic, a worker of another version).
    pub fn from_termination_message(text: &str) -> Option<Failure> {
        let line = text.lines().find(|l| !l.trim().is_empty())?.trim();
        let known = line.split_once(": ").and_then(|(reason, message)| Some((reason.parse().ok()?, message)));
        Some(match known {
            Some((reason, message)) => Failure::new(reason, message),
            None => Failure::new(FailureReason::WorkerFailed, line),
        })
    }

    /// A failure the Job controller reported (`reason` of the Job's
    /// `Failed` condition) when the worker left no termination message.
    pub fn from_job_condition(reason: Option<&str>, message: Option<&str>) -> Failure {
        let message = message.unwrap_or_default();
        match reason.map(str::parse) {
            Some(Ok(reason @ (FailureReason::DeadlineExceeded | FailureReason::BackoffLimitExceeded))) => {
                Failure::new(reason, message)
            }
            Some(_) => Failure::new(FailureReason::JobFailed, format!("{}: {message}", reason.unwrap_or_default())),
            None => Failure::new(FailureReason::JobFailed, message),
        }
    }

    pub fn is_transient(&self) -> bool {
        self.reason.is_transient()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ingest_compares_with_the_version_active_at_launch() {
        use crate::api::SegmentStatus;
        let mut segment: Segment = serde_json::from_value(serde_json::json!({
            "apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment",
            "metadata": {"name": "vip", "namespace": "growth"},
            "spec": {"definition": {"sql": "SELECT user_id FROM users"}}
        }))
        .unwrap();
        let launch = Launch {
            kind: crate::naming::JobKind::Ingest,
            version: 3,
            job_name: "vip-v3-ingest".into(),
            snapshot_time: Utc::now(),
            definition_hash: "h".into(),
            generation: 1,
        };
        assert_eq!(
            ingest_task(&segment, &launch, "s3://results", chrono::Duration::zero()).compare_with,
            None,
            "nothing is active"
        );
        segment.status = Some(SegmentStatus { active_version: Some(2), ..Default::default() });
        let expected = VersionFiles { version: 2, results_uri: results_uri("s3://results", &segment.key(), 2) };
        assert_eq!(ingest_task(&segment, &launch, "s3://results", chrono::Duration::zero()).compare_with, Some(expected));
        segment.status = Some(SegmentStatus { active_version: Some(3), ..Default::default() });
        assert_eq!(
            ingest_task(&segment, &launch, "s3://results", chrono::Duration::zero()).compare_with,
            None,
            "the version itself"
        );
        let lagged = ingest_task(&segment, &launch, "s3://results", chrono::Duration::hours(1));
        assert_eq!(lagged.overrides_from, Some(launch.snapshot_time - chrono::Duration::hours(1)), "the lake's lag before it");
    }

    #[test]
    fn termination_messages_are_classified() {
        let f = Failure::from_termination_message("UnknownTable: table `x` is not declared\n").unwrap();
        assert_eq!((f.reason, f.message.as_str()), (FailureReason::UnknownTable, "table `x` is not declared"));
        assert!(!f.is_transient());
        let f = Failure::from_termination_message("UnreadableSource: s3://lake/orders/: access denied").unwrap();
        assert!(f.is_transient());
        let f = Failure::from_termination_message("panicked at main.rs").unwrap();
        assert_eq!(f.reason, FailureReason::WorkerFailed);
        let f = Failure::from_termination_message("NoSuchReason: something").unwrap();
        assert_eq!((f.reason, f.message.as_str()), (FailureReason::WorkerFailed, "NoSuchReason: something"));
        assert!(Failure::from_termination_message("  \n").is_none());
    }

    #[test]
    fn job_conditions_are_classified() {
        let f = Failure::from_job_condition(Some("DeadlineExceeded"), Some("Job was active longer than specified deadline"));
        assert_eq!(f.reason, FailureReason::DeadlineExceeded);
        let f = Failure::from_job_condition(Some("PodFailurePolicy"), Some("matched a rule"));
        assert_eq!((f.reason, f.message.as_str()), (FailureReason::JobFailed, "PodFailurePolicy: matched a rule"));
        // A worker reason in a Job condition is not the worker's word.
        assert_eq!(Failure::from_job_condition(Some("QueryError"), None).reason, FailureReason::JobFailed);
    }
}
