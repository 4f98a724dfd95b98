//! `segment-worker compute`.

use segment_core::task::ComputeTask;
use serde::Serialize;

use crate::failure::WorkerError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeReport {
    pub version: u64,
    pub members: u64,
    pub parts: usize,
}

pub async fn run(task: &ComputeTask) -> Result<ComputeReport, WorkerError> {
    Err(WorkerError::new("QueryError", format!("compute of {} is not available in this build", task.segment)))
}
