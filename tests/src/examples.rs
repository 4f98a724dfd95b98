//! The example Segments of `examples/segments.yaml`, evaluated in plain
//! Rust over the rows the lake was generated from: the independent
//! evaluation that tests check computed members against. It shares no
//! code with the compute path (no SQL, no rule compiler).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use segment_compute::lakegen;

/// The names of the example Segments.
pub const SEGMENTS: [&str; 5] = ["lapsed-high-value", "southern-europe-buyers", "vip-list", "churn-risk", "win-back"];

/// Members of every example Segment over the lake `spec` generates, each
/// evaluated at its snapshot time `snapshot(name)`. Every name of
/// [`SEGMENTS`] has an entry, empty or not.
pub fn expected_members(
    spec: &lakegen::LakeSpec,
    snapshot: impl Fn(&str) -> DateTime<Utc>,
) -> BTreeMap<String, BTreeSet<String>> {
    let days = Duration::days;
    let mut out: BTreeMap<String, BTreeSet<String>> = SEGMENTS.iter().map(|s| (s.to_string(), BTreeSet::new())).collect();
    let mut add = |name: &str, id: &str| {
        out.entry(name.to_string()).or_default().insert(id.to_string());
    };
    for rows in lakegen::rows(spec) {
        let id = rows.user.user_id.as_str();
        // SQL: `>=` the window start, `max(...) <` the recent cut-off.
        let t = snapshot("lapsed-high-value");
        let recent: Vec<_> = rows.orders.iter().filter(|o| o.created_at >= t - days(90)).collect();
        if recent.len() >= 3 && recent.iter().map(|o| o.created_at).max().is_some_and(|m| m < t - days(30)) {
            add("lapsed-high-value", id);
        }
        // Rules: `within` windows are `(t - d, t]`.
        let t = snapshot("southern-europe-buyers");
        let delivered = rows.orders.iter().any(|o| o.status == "delivered" && o.created_at > t - days(90) && o.created_at <= t);
        if ["ES", "IT"].contains(&rows.user.country) && delivered {
            add("southern-europe-buyers", id);
        }
        let t = snapshot("churn-risk");
        let active = rows.events.iter().any(|e| e.ts >= t - days(60));
        let recently = rows.events.iter().any(|e| e.ts >= t - days(14));
        if active && !recently {
            add("churn-risk", id);
        }
    }
    out.insert("vip-list".into(), lakegen::vip_list(spec).into_iter().map(|(u, _)| u).collect());
    let win_back =
        out["lapsed-high-value"].intersection(&out["churn-risk"]).filter(|u| !out["vip-list"].contains(*u)).cloned().collect();
    out.insert("win-back".into(), win_back);
    out
}
