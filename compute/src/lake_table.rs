//! What the readers of lake tables kept by a table format ([`crate::delta`],
//! [`crate::iceberg`]) share: why a table cannot be read as of the
//! snapshot time, with the reason the operator acts on.

use segment_core::reasons::FailureReason;

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
