//! The operator's reconcile work for many Segments: plans for 10,000
//! Segments with retained versions, time per plan, and the memory the
//! Segments and their status take. The Kubernetes API round trips are not
//! included (they are the API server's cost); the status JSON size is.
//!
//! cargo run --release -p segment-bench --bin operator -- [segments]

use chrono::{Duration, TimeZone, Utc};
use segment_bench::{row, rss_bytes};
use segment_core::api::Segment;
use segment_core::planner::{observe_store, plan, Observation, PlannerConfig};
use segment_core::store::{MemoryStore, SegmentStore};

#[tokio::main]
async fn main() {
    let count: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rss_start = rss_bytes();
    let store = MemoryStore::new();
    let tables = vec!["orders".to_string(), "users".to_string()];
    let cfg = PlannerConfig { results_base: Some("s3://segment-results".into()), ..Default::default() };
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();

    let mut segments: Vec<Segment> = (0..count)
        .map(|i| {
            serde_yaml::from_str(&format!(
                "metadata: {{name: seg-{i}, namespace: ns-{}, generation: 1, creationTimestamp: '2026-11-01T00:00:00Z'}}\n\
                 spec:\n  definition: {{sql: 'SELECT user_id FROM orders WHERE amount > {i} GROUP BY user_id HAVING count(*) >= 3'}}\n  \
                 schedule: {{cron: '*/30 * * * *', timeZone: Europe/Madrid}}\n  retention: {{keepVersions: 3}}\n",
                i % 50
            ))
            .expect("a Segment")
        })
        .collect();

    // Drive every Segment through three versions so each holds a
    // realistic status (versions, conditions, schedule times).
    let mut plans = 0u64;
    let mut planning = 0f64;
    let mut now = t0;
    for round in 1..=3u64 {
        for segment in segments.iter_mut() {
            let key = segment.key();
            for step in 0..3 {
                let view = observe_store(&store, &key, segment.status.as_ref()).await.expect("store");
                let jobs = jobs_for(segment, step, now);
                let obs = Observation {
                    segment,
                    jobs: &jobs,
                    store: &view,
                    source_tables: Some(&tables),
                    compute_slot_free: true,
                    now,
                    not_allowed: None,
                };
                let start = std::time::Instant::now();
                let p = plan(&obs, &cfg);
                planning += start.elapsed().as_secs_f64();
                plans += 1;
                for action in &p.actions {
                    if let segment_core::planner::Action::Activate { version, .. } = action {
                        store.activate(&key, *version).await.expect("activate");
                    }
                }
                if step == 1 {
                    store.load_version(&key, round, 100, Some(now), None);
                }
                segment.status = Some(p.status);
            }
        }
        now += Duration::minutes(30);
    }
    let status_bytes: usize = segments.iter().map(|s| serde_json::to_vec(&s.status).map(|v| v.len()).unwrap_or(0)).sum();
    let rss = rss_bytes().saturating_sub(rss_start);
    println!("operator benchmark: {count} Segments, {plans} plans (3 versions each)");
    row("time per plan", planning / plans as f64 * 1e6, "µs");
    row("plans per second (one core)", plans as f64 / planning, "plans/s");
    row("status JSON per Segment", status_bytes as f64 / count as f64, "bytes");
    row("process memory per Segment (objects + store)", rss as f64 / count as f64, "bytes");
}

/// The Jobs a run shows at each step: compute done, then ingest done.
fn jobs_for(segment: &Segment, step: usize, now: chrono::DateTime<Utc>) -> Vec<segment_core::planner::ObservedJob> {
    use segment_core::naming::{job_name, JobKind};
    use segment_core::planner::{JobState, ObservedJob};
    let Some(run) = segment.status.as_ref().and_then(|s| s.current_run.as_ref()) else { return Vec::new() };
    let name = segment.metadata.name.clone().unwrap_or_default();
    let done = JobState::Succeeded { finished_at: now };
    let mut jobs =
        vec![ObservedJob::new(job_name(&name, run.version, JobKind::Compute), run.version, JobKind::Compute, done.clone())];
    if step >= 2 {
        jobs.push(ObservedJob::new(job_name(&name, run.version, JobKind::Ingest), run.version, JobKind::Ingest, done));
    }
    jobs
}
