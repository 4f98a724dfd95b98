//! `run`, `approve`, `rollback` and `status` on a Segment in the cluster.
//!
//! Every command reads the Segment first, so a missing Segment or a
//! version the status does not list is reported before anything is
//! written. Writes are JSON merge patches of the annotations the operator
//! reads (`run-requested-at`, `approve-version`) or of `spec.pinVersion`,
//! with the field manager `kubectl-segment`: the operator does the rest at
//! its next reconcile.

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use segment_core::api::{
    ConcurrencyPolicy, RunPhase, Segment, SegmentStatus, VersionState, APPROVE_VERSION_ANNOTATION, RUN_REQUESTED_ANNOTATION,
};
use segment_core::reasons::ConditionType;
use serde_json::{json, Value};

use crate::table::{age, table, time};
use crate::PluginError;

/// The field manager recorded for the plugin's writes.
pub const FIELD_MANAGER: &str = "kubectl-segment";

/// What `rollback` does to `spec.pinVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// Serve this retained version.
    To(u64),
    /// Remove the pin: serve the newest version again.
    Clear,
}

/// The Segments of one namespace.
pub struct Segments {
    api: Api<Segment>,
    namespace: String,
}

impl Segments {
    pub fn new(client: Client, namespace: &str) -> Segments {
        Segments { api: Api::namespaced(client, namespace), namespace: namespace.to_string() }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub async fn get(&self, name: &str) -> Result<Segment, PluginError> {
        self.api.get_opt(name).await?.ok_or_else(|| self.not_found(name))
    }

    fn not_found(&self, name: &str) -> PluginError {
        PluginError::NotFound { name: name.to_string(), namespace: self.namespace.clone() }
    }

    async fn merge_patch(&self, name: &str, patch: Value) -> Result<Segment, PluginError> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
        match self.api.patch(name, &params, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(status)) if status.is_not_found() => Err(self.not_found(name)),
            other => Ok(other?),
        }
    }

    /// Sets `run-requested-at` to `now`: the operator starts one run for it.
    pub async fn request_run(&self, name: &str, now: DateTime<Utc>) -> Result<String, PluginError> {
        let segment = self.get(name).await?;
        let mut value = time(now);
        // The operator runs once per distinct value: a second request within
        // the same second must still differ from the first.
        if annotation(&segment, RUN_REQUESTED_ANNOTATION) == Some(value.as_str()) {
            value = now.to_rfc3339_opts(SecondsFormat::Nanos, true);
        }
        self.merge_patch(name, json!({"metadata": {"annotations": {RUN_REQUESTED_ANNOTATION: value}}})).await?;
        let mut out = format!("segment.segmentation.dev/{name} run requested ({RUN_REQUESTED_ANNOTATION}={value})\n");
        if let Some(run) = segment.status.as_ref().and_then(|s| s.current_run.as_ref()) {
            let policy = segment.spec.schedule.as_ref().map(|s| s.concurrency_policy).unwrap_or_default();
            let after = match policy {
                ConcurrencyPolicy::Forbid => "the requested run starts when it ends (concurrencyPolicy Forbid)",
                ConcurrencyPolicy::Replace => "the requested run replaces it (concurrencyPolicy Replace)",
            };
            out.push_str(&format!("v{} is {}; {after}\n", run.version, phase(run.phase)));
        }
        out.push_str(&format!("follow it with: kubectl segment status {name} -n {}\n", self.namespace));
        Ok(out)
    }

    /// Sets `approve-version` to a version the rollover guard holds.
    pub async fn approve(&self, name: &str, version: u64) -> Result<String, PluginError> {
        let segment = self.get(name).await?;
        let status = segment.status.unwrap_or_default();
        let held = held_versions(&status);
        if !held.contains(&version) {
            let detail = if held.is_empty() {
                format!("no version is held ({})", describe_versions(&status))
            } else {
                format!("held: {}", list(&held))
            };
            return Err(PluginError::Version(format!(
                "version {version} of segment \"{name}\" is not waiting for approval: {detail}"
            )));
        }
        let value = version.to_string();
        self.merge_patch(name, json!({"metadata": {"annotations": {APPROVE_VERSION_ANNOTATION: value}}})).await?;
        let serving = match status.active_version {
            Some(active) => format!("readers switch from v{active} to v{version}"),
            None => format!("readers get v{version}"),
        };
        Ok(format!(
            "segment.segmentation.dev/{name} v{version} approved ({APPROVE_VERSION_ANNOTATION}=\"{version}\"); \
             {serving} at the operator's next reconcile\n"
        ))
    }

    /// Sets or removes `spec.pinVersion`.
    pub async fn rollback(&self, name: &str, target: Rollback) -> Result<String, PluginError> {
        let segment = self.get(name).await?;
        let pinned = segment.spec.pin_version;
        let status = segment.status.unwrap_or_default();
        let active = status.active_version.map(|v| format!("v{v}")).unwrap_or_else(|| "no version".to_string());
        match target {
            Rollback::To(version) => {
                let retained = retained_versions(&status);
                if !retained.contains(&version) {
                    let retained = if retained.is_empty() { "none".to_string() } else { list(&retained) };
                    return Err(PluginError::Version(format!(
                        "version {version} of segment \"{name}\" is not a retained version (retained: {retained})"
                    )));
                }
                if pinned == Some(version) {
                    return Ok(format!("segment.segmentation.dev/{name} is already pinned to v{version}; nothing changed\n"));
                }
                self.merge_patch(name, json!({"spec": {"pinVersion": version}})).await?;
                Ok(format!(
                    "segment.segmentation.dev/{name} pinned to v{version} (spec.pinVersion); readers switch from {active} \
                     to v{version} at the operator's next reconcile\n"
                ))
            }
            Rollback::Clear => {
                let Some(pin) = pinned else {
                    return Ok(format!(
                        "segment.segmentation.dev/{name} has no spec.pinVersion; it already serves the newest version \
                         ({active}); nothing changed\n"
                    ));
                };
                self.merge_patch(name, json!({"spec": {"pinVersion": null}})).await?;
                let newest = retained_versions(&status).last().map(|v| format!("v{v}")).unwrap_or_else(|| "none".into());
                Ok(format!(
                    "segment.segmentation.dev/{name} unpinned (spec.pinVersion {pin} removed); readers switch to the \
                     newest version ({newest}) at the operator's next reconcile\n"
                ))
            }
        }
    }

    /// The Segment's phase, versions and conditions.
    pub async fn status(&self, name: &str, now: DateTime<Utc>) -> Result<String, PluginError> {
        let segment = self.get(name).await?;
        Ok(render_status(&segment, now))
    }
}

fn annotation<'a>(segment: &'a Segment, key: &str) -> Option<&'a str> {
    segment.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// Versions the rollover guard holds: loaded, waiting for approval.
pub fn held_versions(status: &SegmentStatus) -> Vec<u64> {
    let run = status.current_run.iter().filter(|r| r.phase == RunPhase::AwaitingApproval).map(|r| r.version);
    let listed = status.versions.iter().filter(|v| v.state == VersionState::AwaitingApproval).map(|v| v.version);
    let mut held: Vec<u64> = run.chain(listed).collect();
    held.sort_unstable();
    held.dedup();
    held
}

/// Versions `pinVersion` may name: loaded and promoted once (the active one included).
pub fn retained_versions(status: &SegmentStatus) -> Vec<u64> {
    let mut retained: Vec<u64> = status
        .versions
        .iter()
        .filter(|v| matches!(v.state, VersionState::Active | VersionState::Retained))
        .map(|v| v.version)
        .collect();
    retained.sort_unstable();
    retained
}

fn list(versions: &[u64]) -> String {
    versions.iter().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", ")
}

/// `versions: v3 Active, v2 Retained`, for messages naming what exists.
fn describe_versions(status: &SegmentStatus) -> String {
    if status.versions.is_empty() {
        return "the status lists no versions yet".to_string();
    }
    let mut versions: Vec<_> = status.versions.iter().collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    let named: Vec<String> = versions.iter().map(|v| format!("v{} {}", v.version, state(v.state))).collect();
    format!("versions: {}", named.join(", "))
}

fn state(state: VersionState) -> &'static str {
    match state {
        VersionState::Active => "Active",
        VersionState::Retained => "Retained",
        VersionState::AwaitingApproval => "AwaitingApproval",
        VersionState::Failed => "Failed",
    }
}

fn phase(phase: RunPhase) -> &'static str {
    match phase {
        RunPhase::Pending => "Pending",
        RunPhase::Computing => "Computing",
        RunPhase::Ingesting => "Ingesting",
        RunPhase::AwaitingApproval => "AwaitingApproval",
    }
}

fn or_dash(value: Option<String>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or_else(|| "-".to_string())
}

fn reason_and_message(reason: Option<&str>, message: Option<&str>) -> Option<String> {
    match (reason, message) {
        (Some(r), Some(m)) if !m.is_empty() => Some(format!("{r}: {m}")),
        (Some(r), _) => Some(r.to_string()),
        (None, Some(m)) => Some(m.to_string()),
        (None, None) => None,
    }
}

/// `kubectl segment status`: a summary, the versions (the run in flight
/// first, then newest first) and the conditions.
pub fn render_status(segment: &Segment, now: DateTime<Utc>) -> String {
    let status = segment.status.clone().unwrap_or_default();
    let pin = segment.spec.pin_version;
    let mut summary: Vec<(&str, String)> = vec![
        ("Name", segment.metadata.name.clone().unwrap_or_default()),
        ("Namespace", segment.metadata.namespace.clone().unwrap_or_default()),
    ];
    if let Some(description) = &segment.spec.description {
        summary.push(("Description", description.clone()));
    }
    let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready.as_str());
    summary.push((
        "Ready",
        ready.map(|c| format!("{} ({}) {}", c.status, c.reason, c.message).trim_end().to_string()).unwrap_or_else(|| "-".into()),
    ));
    summary.push((
        "Active",
        match status.active_version {
            Some(v) => format!("v{v}, {} members", status.members.map(|m| m.to_string()).unwrap_or_else(|| "?".into())),
            None => "none".to_string(),
        },
    ));
    if let Some(pin) = pin {
        summary.push(("Pinned", format!("v{pin} (spec.pinVersion)")));
    }
    summary.push((
        "Current run",
        match &status.current_run {
            Some(run) => format!("v{} {} ({:?}), started {}", run.version, phase(run.phase), run.trigger, time(run.started_at)),
            None => "none".to_string(),
        },
    ));
    if let Some(schedule) = &segment.spec.schedule {
        let zone = schedule.time_zone.as_deref().unwrap_or("UTC");
        let suspended = if schedule.suspend { ", suspended" } else { "" };
        summary.push(("Schedule", format!("{} ({zone}{suspended})", schedule.cron)));
    }
    summary.push(("Last success", or_dash(status.last_successful_time.map(|t| format!("{} ({} ago)", time(t), age(t, now))))));
    summary.push(("Next run", or_dash(status.next_schedule_time.map(time))));

    let width = summary.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3;
    let mut out = String::new();
    for (key, value) in &summary {
        out.push_str(&format!("{:<width$}{value}\n", format!("{key}:")));
    }

    let mut rows = Vec::new();
    if let Some(run) = &status.current_run {
        rows.push(vec![
            run.version.to_string(),
            phase(run.phase).to_string(),
            "-".to_string(),
            time(run.snapshot_time),
            or_dash(run.computed_at.map(time)),
            or_dash(run.ingested_at.map(time)),
            or_dash(reason_and_message(run.reason.as_deref(), run.message.as_deref())),
        ]);
    }
    let mut versions: Vec<_> = status.versions.iter().collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    for v in versions {
        let mut label = state(v.state).to_string();
        if pin == Some(v.version) {
            label.push_str(",Pinned");
        }
        rows.push(vec![
            v.version.to_string(),
            label,
            or_dash(v.members.map(|m| m.to_string())),
            time(v.snapshot_time),
            or_dash(v.computed_at.map(time)),
            or_dash(v.ingested_at.map(time)),
            or_dash(reason_and_message(v.reason.as_deref(), v.message.as_deref())),
        ]);
    }
    // Which table version each version read, for Segments over Delta
    // tables: `users@12`, next to the message.
    let read_at = |version: u64| -> Option<String> {
        let found = status.versions.iter().find(|v| v.version == version)?;
        let tables: Vec<String> =
            found.table_versions.iter().filter_map(|t| t.version.map(|at| format!("{}@{at}", t.table))).collect();
        (!tables.is_empty()).then(|| tables.join(","))
    };
    let mut headers = vec!["VERSION", "STATE", "MEMBERS", "SNAPSHOT", "COMPUTED", "INGESTED", "MESSAGE"];
    if status.versions.iter().any(|v| !v.table_versions.is_empty()) {
        headers.insert(6, "TABLES");
        for row in &mut rows {
            let tables = row[0].parse().ok().and_then(read_at);
            row.insert(6, or_dash(tables));
        }
    }
    out.push('\n');
    if rows.is_empty() {
        out.push_str("No versions yet.\n");
    } else {
        out.push_str(&table(&headers, &rows));
    }

    out.push('\n');
    if status.conditions.is_empty() {
        out.push_str("No conditions yet.\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|c| {
                vec![c.type_.clone(), c.status.clone(), c.reason.clone(), age(c.last_transition_time, now), c.message.clone()]
            })
            .collect();
        out.push_str(&table(&["CONDITION", "STATUS", "REASON", "AGE", "MESSAGE"], &rows));
    }
    out
}
