//! How a worker fails: a reason the operator understands
//! ([`FailureReason`], read back by `segment_core::task::Failure`) and a
//! message for people, written as one line to the termination log so it
//! lands in the Segment's status.

use std::path::Path;

use segment_core::reasons::FailureReason;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct WorkerError {
    pub reason: FailureReason,
    pub message: String,
}

impl WorkerError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> WorkerError {
        WorkerError { reason, message: message.into() }
    }

    /// Writes `Reason: message` (one line) to `path`; a worker that cannot
    /// write it still exits non-zero, so this never fails.
    pub fn write_termination_log(&self, path: &Path) {
        let line = format!("{self}").replace('\n', " ");
        let _ = std::fs::write(path, format!("{line}\n"));
    }
}
