//! The commits of a lake table as its own writer read them back
//! (tests/delta_table.py with deltalake, tests/iceberg_table.py with
//! pyiceberg): what the time-travel tests compare the compute with.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

/// One commit: the table version (Delta) or snapshot id (Iceberg), when it
/// was committed, and the members the reference query gives on it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub id: u64,
    pub committed: DateTime<Utc>,
    pub members: BTreeSet<String>,
}

/// A JSON array of ids as a set.
pub fn members_of(value: &Value) -> BTreeSet<String> {
    value.as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

/// A moment between commit `i` and the next one (half a second after the
/// last).
pub fn between(commits: &[Commit], i: usize) -> DateTime<Utc> {
    match commits.get(i + 1) {
        Some(next) => commits[i].committed + (next.committed - commits[i].committed) / 2,
        None => commits[i].committed + Duration::milliseconds(500),
    }
}
