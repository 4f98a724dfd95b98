//! `segment-operator check`: the checks the operator makes before it
//! launches anything, run on manifest files, for authors and CI pipelines.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use segment_core::definition::definition_hash;
use segment_core::validation::check_spec;

use crate::manifests::Manifests;

/// One line per Segment; returns the report and whether every one passed.
pub fn report(manifests: &Manifests, now: DateTime<Utc>) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    for segment in &manifests.segments {
        let key = segment.key();
        let tables = manifests.tables_in(&key.namespace);
        match check_spec(&segment.spec, Some(&tables)) {
            Ok(checked) => {
                let kind = if segment.spec.definition.sql.is_some() {
                    "sql"
                } else if segment.spec.definition.rules.is_some() {
                    "rules"
                } else {
                    "static"
                };
                let mut reads: Vec<String> = checked.refs.tables.iter().cloned().collect();
                reads.extend(checked.refs.segments.iter().map(|s| format!("segment {s}")));
                let reads = if reads.is_empty() { String::new() } else { format!(" reads {}", reads.join(", ")) };
                let next = match &checked.schedule {
                    Some(schedule) => {
                        let mut times = Vec::new();
                        let mut t = now;
                        for _ in 0..3 {
                            let Some(n) = schedule.next_after(t) else { break };
                            times.push(n.format("%Y-%m-%dT%H:%MZ").to_string());
                            t = n;
                        }
                        format!("; next runs {}", times.join(", "))
                    }
                    None => "; no schedule (runs on creation, definition change and request)".to_string(),
                };
                let _ = writeln!(
                    out,
                    "ok       {key}: {kind}{reads}; definition {}{next}",
                    definition_hash(&segment.spec.definition)
                );
            }
            Err(invalid) => {
                all_ok = false;
                let _ = writeln!(out, "INVALID  {key}: {}: {invalid}", invalid.reason);
            }
        }
    }
    let _ = writeln!(out, "{} segments, {} sources checked", manifests.segments.len(), manifests.sources.len());
    (out, all_ok)
}
