//! `segment-worker ingest`: loads one version's result files into the
//! store, invisibly to readers, and seals it. It never activates it: the
//! operator rolls over after its guard.
//!
//! Every part is checked against the manifest (checksum and count) and
//! loaded in batches; a part that fails is retried, and up to
//! `max_failed_parts` parts may fail before the whole run does. Realtime
//! overrides the lake data may not reflect yet (from the snapshot time
//! minus the lake's lag grace) are applied last, so they survive the
//! rollover. Loading is idempotent: a retried Job loads the same sets.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};

use segment_core::index::{changes, IdSet};
use segment_core::manifest::{Manifest, Part};
use segment_core::reasons::FailureReason;
use segment_core::store::{CountedChange, Seal, SegmentStore, StoreError};
use segment_core::task::{IngestTask, VersionFiles};
use segment_store::results::ResultDir;
use serde::Serialize;
use tracing::{info, warn};

use crate::failure::WorkerError;

/// Users per store batch.
pub const BATCH: usize = 5_000;
/// Batches sent to the store at once.
pub const IN_FLIGHT: usize = 4;
/// Attempts per part before it counts as failed.
pub const ATTEMPTS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestReport {
    pub version: u64,
    pub members: u64,
    pub parts: usize,
    pub failed_parts: Vec<String>,
    pub overrides_applied: usize,
}

pub async fn run(task: &IngestTask, store: &dyn SegmentStore) -> Result<IngestReport, WorkerError> {
    let dir = ResultDir::open(&task.results_uri).map_err(|e| WorkerError::new(FailureReason::BadTask, e.to_string()))?;
    let manifest = dir
        .read_manifest()
        .await
        .map_err(|e| WorkerError::new(FailureReason::CorruptResult, e.to_string()))?
        .ok_or_else(|| WorkerError::new(FailureReason::NoResult, format!("no _manifest.json under {}", task.results_uri)))?;
    check_manifest_matches(task, &manifest)?;
    let index = check_index(&dir, &manifest).await?;
    let change = match (&index, &task.compare_with) {
        (Some(index), Some(previous)) => count_change(index, previous).await,
        _ => None,
    };

    let mut failed = Vec::new();
    for part in &manifest.parts {
        match load_part_with_retries(&dir, part, task, store).await {
            Ok(_) => {}
            Err(PartError::Store(e)) => return Err(WorkerError::new(FailureReason::StoreUnavailable, e.to_string())),
            Err(PartError::Part(reason)) => {
                warn!(part = %part.file, %reason, "part failed");
                failed.push(format!("{}: {reason}", part.file));
                if failed.len() > task.max_failed_parts as usize {
                    // Nothing is sealed, so the partial version is invisible;
                    // the operator deletes it.
                    return Err(WorkerError::new(
                        FailureReason::CorruptResult,
                        format!(
                            "{} of {} parts failed (tolerated: {}): {}",
                            failed.len(),
                            manifest.parts.len(),
                            task.max_failed_parts,
                            failed.join("; ")
                        ),
                    ));
                }
            }
        }
    }

    let overrides_from = task.overrides_from.unwrap_or(task.snapshot_time);
    let overrides = store
        .overrides_since(&task.segment, overrides_from)
        .await
        .map_err(|e| WorkerError::new(FailureReason::StoreUnavailable, e.to_string()))?;
    store
        .apply_overrides(&task.segment, task.version, &overrides)
        .await
        .map_err(|e| WorkerError::new(FailureReason::StoreUnavailable, e.to_string()))?;

    // The store counts the members itself: overrides may have changed
    // the files' count.
    let seal = Seal {
        snapshot_time: Some(task.snapshot_time),
        definition_hash: Some(manifest.definition_hash.clone()),
        change,
        overrides_from: Some(overrides_from),
        table_versions: manifest.sources.iter().filter(|read| read.version.is_some()).cloned().collect(),
    };
    let meta = store
        .seal_with(&task.segment, task.version, &seal)
        .await
        .map_err(|e| WorkerError::new(FailureReason::StoreUnavailable, e.to_string()))?;
    let members = meta.members;
    let report = IngestReport {
        version: task.version,
        members,
        parts: manifest.parts.len(),
        failed_parts: failed,
        overrides_applied: overrides.len(),
    };
    info!(segment = %task.segment, version = task.version, members, "ingested");
    Ok(report)
}

fn check_manifest_matches(task: &IngestTask, manifest: &Manifest) -> Result<(), WorkerError> {
    if manifest.segment != task.segment || manifest.version != task.version {
        return Err(WorkerError::new(
            FailureReason::CorruptResult,
            format!(
                "the manifest is for {} v{}, the task for {} v{}",
                manifest.segment, manifest.version, task.segment, task.version
            ),
        ));
    }
    Ok(())
}

/// The version's index file, when the manifest lists one, must be the one
/// compute wrote (checksum) and hold the manifest's count: one file for the
/// whole version, so no tolerance of failed parts applies to it.
async fn check_index(dir: &ResultDir, manifest: &Manifest) -> Result<Option<IdSet>, WorkerError> {
    let Some(index) = &manifest.index else {
        return Ok(None);
    };
    let corrupt = |message: String| WorkerError::new(FailureReason::CorruptResult, message);
    let bytes = dir.read_index(index).await.map_err(|e| corrupt(e.to_string()))?;
    index.open_index(bytes).map(Some).map_err(|e| corrupt(e.to_string()))
}

/// How this version differs from `previous`, by one merge of the two index
/// files. `None` when the previous version's index cannot be had (written
/// before index files, or gone): the store then counts the change itself.
async fn count_change(index: &IdSet, previous: &VersionFiles) -> Option<CountedChange> {
    let read = async {
        let dir = ResultDir::open(&previous.results_uri).map_err(|e| e.to_string())?;
        let manifest = dir.read_manifest().await.map_err(|e| e.to_string())?.ok_or("no manifest")?;
        let entry = manifest.index.as_ref().ok_or("no index file")?;
        let bytes = dir.read_index(entry).await.map_err(|e| e.to_string())?;
        entry.open_index(bytes).map_err(|e| e.to_string())
    };
    match read.await {
        Ok(before) => Some(CountedChange { from: previous.version, changed: changes(&before, index).changed() }),
        Err(reason) => {
            warn!(version = previous.version, %reason, "the change is left to the store to count");
            None
        }
    }
}

enum PartError {
    /// The part itself is bad or unreadable.
    Part(String),
    /// The store failed: the whole run fails (and is retried later).
    Store(StoreError),
}

async fn load_part_with_retries(
    dir: &ResultDir,
    part: &Part,
    task: &IngestTask,
    store: &dyn SegmentStore,
) -> Result<u64, PartError> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let bytes = match dir.read_part(part).await {
            Ok(bytes) => bytes,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        // A checksum or count mismatch will not fix itself: no retry.
        let users = part.decode(&bytes).map_err(|e| PartError::Part(e.to_string()))?;
        // Several batches in flight keep the store busy while the next
        // one is encoded; loads are idempotent, so their order is free.
        let batches: Vec<Vec<String>> = users.chunks(BATCH).map(owned_batch).collect();
        futures::stream::iter(batches)
            .map(|owned| async move { store.load_members(&task.segment, task.version, &owned).await })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
            .map_err(PartError::Store)?;
        return Ok(users.len() as u64);
    }
    Err(PartError::Part(format!("unreadable after {ATTEMPTS} attempts: {last}")))
}

// A named function (not a closure) so the future stays `Send` for every
// lifetime of the borrowed ids.
fn owned_batch(batch: &[&str]) -> Vec<String> {
    batch.iter().map(|u| u.to_string()).collect()
}
