//! What the readers of lake tables kept by a table format ([`crate::delta`],
//! [`crate::iceberg`]) share: why a table cannot be read as of the
//! snapshot time, with the reason the operator acts on, and the one way
//! both engines (DataFusion here, Spark's plan) open such a table.

use segment_core::api::SegmentSourceSpec;
use segment_core::reasons::FailureReason;
use segment_core::task::ComputeTask;
use segment_core::validation::check_source;
use segment_store::objects::{locate, Location};

use crate::compute::one_line;
use crate::delta::{self, DeltaSnapshot};
use crate::failure::WorkerError;
use crate::iceberg::{self, IcebergSnapshot};

/// Why a table cannot be read as of the snapshot time. The message names
/// files, versions and features, never what a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    pub reason: FailureReason,
    pub message: String,
}

impl TableError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> TableError {
        TableError { reason, message: message.into() }
    }
}

/// The table or a file of it cannot be read now (transient).
pub fn unreadable(message: impl Into<String>) -> TableError {
    TableError::new(FailureReason::UnreadableSource, message)
}

/// The table needs what the reader does not do; reading it again will not help.
pub fn unsupported(message: impl Into<String>) -> TableError {
    TableError::new(FailureReason::UnsupportedSource, message)
}

/// No table version at or before the snapshot time can be read.
pub fn before_history(message: impl Into<String>) -> TableError {
    TableError::new(FailureReason::SnapshotBeforeHistory, message)
}

/// A failure reading `source`, naming the table and its `uri`.
pub fn source_error(source: &SegmentSourceSpec, reason: FailureReason, detail: impl std::fmt::Display) -> WorkerError {
    WorkerError::new(reason, format!("table `{}` ({}): {detail}", source.table, source.uri))
}

/// The Delta table `source` names, as of `task`'s snapshot time, and the
/// store its files are in: what either engine reads of it.
pub async fn delta_table_at(source: &SegmentSourceSpec, task: &ComputeTask) -> Result<(DeltaSnapshot, Location), WorkerError> {
    check_source(source)
        .map_err(|e| source_error(source, FailureReason::UnsupportedSource, format!("{}: {}", e.field, e.message)))?;
    let location = locate(&source.uri).map_err(|e| source_error(source, FailureReason::UnreadableSource, e))?;
    let snapshot = delta::snapshot_at(location.store.as_ref(), &location.path, task.snapshot_time)
        .await
        .map_err(|e| source_error(source, e.reason, one_line(&e.message)))?;
    Ok((snapshot, location))
}

/// The Iceberg table `source` names, as of `task`'s snapshot time, through
/// the catalogs the task carries: what either engine reads of it.
pub async fn iceberg_table_at(source: &SegmentSourceSpec, task: &ComputeTask) -> Result<IcebergSnapshot, WorkerError> {
    let access = task.iceberg.as_ref().ok_or_else(|| {
        source_error(
            source,
            FailureReason::UnsupportedSource,
            "the task names no Iceberg catalog (the ComputeClass's icebergCatalogs)",
        )
    })?;
    iceberg::snapshot_at(&source.uri, access, task.snapshot_time)
        .await
        .map_err(|e| source_error(source, e.reason, one_line(&e.message)))
}
