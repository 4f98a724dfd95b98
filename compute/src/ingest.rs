//! `segment-worker ingest`: verifies one version's result files and writes
//! its verdict, the [`Seal`] the operator records the version with, as
//! `_seal.json` next to them (`segment_core::seal`). It touches no store
//! and needs no store credentials: the operator seals the version in the
//! store from the verdict once the Job succeeded, and never activates it
//! before its rollover guard.
//!
//! What is verified:
//! - the manifest is the task's (segment, version, snapshot time);
//! - the index file, which serving answers from and so is the version's
//!   membership: its checksum and structure, and that it holds the
//!   manifest's count. No tolerance applies to it, and a result without
//!   one (written before index files) is refused: no serving replica
//!   could answer from it;
//! - every part's checksum and count. Parts are what other segments'
//!   rules (`segment` conditions) and `kubectl segment preview` read, so a
//!   damaged part is caught here rather than in a later compute. Up to
//!   `spec.ingest.maxFailedParts` of them may fail (damaged, or unreadable
//!   after retries) without failing the run: they no longer change what is
//!   served, only what those readers find.
//!
//! It then counts how the version differs from the one active at launch,
//! by merging the two index files, and writes the verdict last. Verifying
//! is read-only and the verdict the same each time: a retried Job writes
//! it again.

use std::time::Duration;

use futures::StreamExt;

use segment_core::index::{changes, IdSet};
use segment_core::manifest::{Manifest, Part};
use segment_core::reasons::FailureReason;
use segment_core::seal::SealFile;
use segment_core::store::{CountedChange, Seal};
use segment_core::task::{IngestTask, VersionFiles};
use segment_store::results::ResultDir;
use serde::Serialize;
use tracing::{info, warn};

use crate::failure::WorkerError;

/// Parts read and checked at once.
pub const IN_FLIGHT: usize = 4;
/// Attempts to read a part before it counts as failed.
pub const ATTEMPTS: usize = 3;

/// What ingest prints when it succeeds (the verdict it wrote, in short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestReport {
    pub version: u64,
    pub members: u64,
    pub parts: usize,
    /// Parts that failed within `maxFailedParts`, with why.
    pub failed_parts: Vec<String>,
    /// The change from the version active at launch, when it was counted.
    pub change: Option<CountedChange>,
}

/// Verifies the task's result files and writes the verdict
/// (`_seal.json`) next to them.
pub async fn verify(task: &IngestTask) -> Result<IngestReport, WorkerError> {
    let dir = ResultDir::open(&task.results_uri).map_err(|e| WorkerError::new(FailureReason::BadTask, e.to_string()))?;
    let manifest = dir
        .read_manifest()
        .await
        .map_err(|e| WorkerError::new(FailureReason::CorruptResult, e.to_string()))?
        .ok_or_else(|| WorkerError::new(FailureReason::NoResult, format!("no _manifest.json under {}", task.results_uri)))?;
    check_manifest_matches(task, &manifest)?;
    // The index, the parts and the previous version's index are checked at
    // once: each check is mostly a SHA-256 pass over its files, and the
    // spawned ones run on the runtime's other threads (other cores).
    let index = tokio::spawn({
        let (dir, manifest) = (dir.clone(), manifest.clone());
        async move { check_index(&dir, &manifest).await }
    });
    let previous = tokio::spawn(read_previous(task.compare_with.clone()));
    let failed = check_parts(&dir, &manifest, task.max_failed_parts).await?;
    let index = index.await.map_err(stopped)??;
    let change = previous
        .await
        .map_err(stopped)?
        .map(|(from, before)| CountedChange { from, changed: changes(&before, &index).changed() });

    let seal = Seal {
        members: index.len(),
        snapshot_time: Some(task.snapshot_time),
        definition_hash: Some(manifest.definition_hash.clone()),
        change,
        overrides_from: Some(task.overrides_from.unwrap_or(task.snapshot_time)),
        table_versions: manifest.sources.iter().filter(|read| read.version.is_some()).cloned().collect(),
    };
    let verdict = SealFile::new(task.segment.clone(), task.version, seal);
    dir.write_seal(&verdict)
        .await
        .map_err(|e| WorkerError::new(FailureReason::WriteFailed, format!("writing the verdict: {e}")))?;
    let members = verdict.seal.members;
    info!(segment = %task.segment, version = task.version, members, ?change, "verified; verdict written");
    Ok(IngestReport { version: task.version, members, parts: manifest.parts.len(), failed_parts: failed, change })
}

fn check_manifest_matches(task: &IngestTask, manifest: &Manifest) -> Result<(), WorkerError> {
    let corrupt = |message: String| Err(WorkerError::new(FailureReason::CorruptResult, message));
    if manifest.segment != task.segment || manifest.version != task.version {
        return corrupt(format!(
            "the manifest is for {} v{}, the task for {} v{}",
            manifest.segment, manifest.version, task.segment, task.version
        ));
    }
    if manifest.snapshot_time != task.snapshot_time {
        return corrupt(format!(
            "the manifest was computed at snapshot time {}, the task's is {}",
            manifest.snapshot_time.to_rfc3339(),
            task.snapshot_time.to_rfc3339()
        ));
    }
    Ok(())
}

/// The version's index file must be listed, be the one compute wrote
/// (checksum, structure) and hold the manifest's count: it is what serving
/// answers from, so no tolerance of failed parts applies to it.
async fn check_index(dir: &ResultDir, manifest: &Manifest) -> Result<IdSet, WorkerError> {
    let corrupt = |message: String| WorkerError::new(FailureReason::CorruptResult, message);
    let Some(index) = &manifest.index else {
        return Err(corrupt(
            "the result has no index file (written by a compute worker older than index files); serving answers from it, \
             so the version cannot be served: compute it again"
                .to_string(),
        ));
    };
    let bytes = dir.read_index(index).await.map_err(|e| corrupt(e.to_string()))?;
    index.open_index(bytes).map_err(|e| corrupt(e.to_string()))
}

/// Checks every part against the manifest (checksum and count), a few at
/// a time; returns the failures `max_failed` tolerates, and fails with
/// `CorruptResult` beyond them.
async fn check_parts(dir: &ResultDir, manifest: &Manifest, max_failed: u32) -> Result<Vec<String>, WorkerError> {
    // Owned parts and directory handles keep the future `Send` for every
    // caller (a borrowing closure would not be general enough).
    let checked: Vec<(usize, Result<(), String>)> = futures::stream::iter(manifest.parts.clone().into_iter().enumerate())
        .map(|(i, part)| {
            let dir = dir.clone();
            async move { (i, check_part(&dir, &part).await) }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut failed: Vec<(usize, String)> = checked
        .into_iter()
        .filter_map(|(i, checked)| checked.err().map(|reason| (i, format!("{}: {reason}", manifest.parts[i].file))))
        .collect();
    failed.sort();
    let failed: Vec<String> = failed.into_iter().map(|(_, reason)| reason).collect();
    for reason in &failed {
        warn!(%reason, "part failed");
    }
    if failed.len() > max_failed as usize {
        return Err(WorkerError::new(
            FailureReason::CorruptResult,
            format!("{} of {} parts failed (tolerated: {max_failed}): {}", failed.len(), manifest.parts.len(), failed.join("; ")),
        ));
    }
    Ok(failed)
}

/// Reads a part (retrying a read that fails) and checks it.
async fn check_part(dir: &ResultDir, part: &Part) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match dir.read_part(part).await {
            // A checksum or count mismatch will not fix itself: no retry.
            Ok(bytes) => return part.decode(&bytes).map(drop).map_err(|e| e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("unreadable after {ATTEMPTS} attempts: {last}"))
}

/// The previous version's index, to count the change from it by one merge
/// of the two indexes (a version written before index files has one built
/// from its parts). `None` when it cannot be had (its files damaged or
/// gone): the rollover guard then holds the version for approval if it has
/// a change limit.
async fn read_previous(previous: Option<VersionFiles>) -> Option<(u64, IdSet)> {
    let previous = previous?;
    let read = async {
        let dir = ResultDir::open(&previous.results_uri).map_err(|e| e.to_string())?;
        let manifest = dir.read_manifest().await.map_err(|e| e.to_string())?.ok_or("no manifest")?;
        dir.read_members(&manifest).await.map_err(|e| e.to_string())
    };
    match read.await {
        Ok(before) => Some((previous.version, before)),
        Err(reason) => {
            warn!(version = previous.version, %reason, "the change from the previous version cannot be counted");
            None
        }
    }
}

/// A check that panicked or was cancelled fails the run rather than pass.
fn stopped(e: tokio::task::JoinError) -> WorkerError {
    WorkerError::new(FailureReason::WorkerFailed, format!("a check of the result stopped: {e}"))
}
