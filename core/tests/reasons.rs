//! The docs' reason tables are the enums: a reason added, renamed or
//! reclassified in code without the docs (or the other way round) fails
//! here.

use std::path::Path;

use segment_core::reasons::{EventReason, FailureReason, HoldReason};

/// The rows of the first Markdown table after `heading` in `doc`: each row's
/// cells, the backquotes of the first cell removed.
fn table_after(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let section = text.split_once(heading).unwrap_or_else(|| panic!("{doc} has no `{heading}`")).1;
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            let cells: Vec<String> = row.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect();
            let mut cells = cells;
            cells[0] = cells[0].trim_matches('`').to_string();
            cells
        })
        .collect()
}

#[test]
fn the_failure_table_of_compute_md_lists_every_failure_reason_and_whether_it_is_retried() {
    let documented: Vec<(String, bool)> = table_after("compute.md", "## Failures")
        .into_iter()
        .map(|cells| {
            let retried = match cells.last().map(String::as_str) {
                Some("yes") => true,
                Some("no") => false,
                other => panic!("`{}`: the retried column says {other:?}, not yes or no", cells[0]),
            };
            (cells[0].clone(), retried)
        })
        .collect();
    let in_code: Vec<(String, bool)> = FailureReason::ALL.iter().map(|r| (r.as_str().to_string(), r.is_transient())).collect();
    assert_eq!(documented, in_code, "docs/compute.md#failures against FailureReason (same order)");
}

#[test]
fn the_event_table_of_lifecycle_md_lists_every_event_reason_and_its_type() {
    let documented: Vec<(String, String)> =
        table_after("lifecycle.md", "## Events").into_iter().map(|cells| (cells[0].clone(), cells[1].clone())).collect();
    let in_code: Vec<(String, String)> = EventReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), if r.is_warning() { "Warning" } else { "Normal" }.to_string()))
        .collect();
    assert_eq!(documented, in_code, "docs/lifecycle.md#events against EventReason (same order)");
}

#[test]
fn the_hold_table_of_lifecycle_md_lists_every_hold_reason() {
    let documented: Vec<String> =
        table_after("lifecycle.md", "The reasons a version is held").into_iter().map(|cells| cells[0].clone()).collect();
    let in_code: Vec<String> = HoldReason::ALL.iter().map(|r| r.as_str().to_string()).collect();
    assert_eq!(documented, in_code, "docs/lifecycle.md#rollover-and-the-guard against HoldReason (same order)");
}
