//! The Kubernetes adapter: observes a Segment's Jobs, sources and store,
//! asks the planner what to do, and carries the plan out in the order the
//! planner documents (store, status, Jobs, Events).

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Client, Resource, ResourceExt};
use segment_core::api::{
    DeletionPolicy, Segment, SegmentSource, SegmentStatus, FINALIZER, JOB_KIND_LABEL, SEGMENT_LABEL, VERSION_LABEL,
};
use segment_core::naming::JobKind;
use segment_core::planner::{self, Action, Launch, Observation, Plan, PlannerConfig};
use segment_core::store::{ResultStore, SegmentStore, StoreError};
use segment_core::task::SegmentInput;
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::JobArgs;
use crate::jobs;
use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "segment-operator";

/// Everything a reconcile needs; shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub store: Arc<dyn SegmentStore>,
    pub results: Arc<dyn ResultStore>,
    pub planner: PlannerConfig,
    pub jobs: JobArgs,
    pub results_base: String,
    pub slots: ComputeSlots,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The time source; tests fix it.
    pub clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("building a Job: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("Segment has no namespace")]
    NoNamespace,
}

/// The limit on concurrent compute Jobs of this operator (cluster-wide, or
/// in its one watched namespace). Counting and creating happen under one
/// lock so two reconciles cannot both take the last slot; the count comes
/// from the API server, so a restarted operator sees the Jobs its
/// predecessor started.
pub struct ComputeSlots {
    limit: Option<usize>,
    /// The watched namespace: the operator creates Jobs nowhere else, so
    /// it counts (and needs permission to list) only there.
    namespace: Option<String>,
    lock: Mutex<()>,
}

impl ComputeSlots {
    pub fn new(limit: usize, namespace: Option<String>) -> Self {
        ComputeSlots { limit: (limit > 0).then_some(limit), namespace, lock: Mutex::new(()) }
    }

    async fn active_computes(&self, client: &Client) -> Result<usize, kube::Error> {
        let jobs: Api<Job> = match &self.namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        };
        let list = jobs.list(&ListParams::default().labels(&format!("{JOB_KIND_LABEL}=compute"))).await?;
        Ok(list.items.iter().filter(|j| jobs::is_active(j)).count())
    }
}

pub async fn reconcile(segment: Arc<Segment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let namespace = segment.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Segment> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, segment, |event| async {
        match event {
            Finalizer::Apply(segment) => apply(&segment, &ctx).await,
            Finalizer::Cleanup(segment) => cleanup(&segment, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e) | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics.reconciled(result.is_ok(), started.elapsed().as_secs_f64());
    result
}

/// Retries a failed reconcile after a short pause; the previous version
/// keeps serving meanwhile.
pub fn error_policy(segment: Arc<Segment>, error: &Error, _ctx: Arc<Context>) -> Requeue {
    warn!(segment = %segment.name_any(), namespace = ?segment.namespace(), %error, "reconcile failed");
    Requeue::requeue(std::time::Duration::from_secs(15))
}

async fn apply(segment: &Segment, ctx: &Context) -> Result<Requeue, Error> {
    let namespace = segment.namespace().ok_or(Error::NoNamespace)?;
    let name = segment.name_any();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);

    let label = segment_core::naming::segment_label_value(&name);
    let job_list = jobs_api.list(&ListParams::default().labels(&format!("{SEGMENT_LABEL}={label}"))).await?;
    let current_version = segment.status.as_ref().and_then(|s| s.current_run.as_ref()).map(|r| r.version);
    let mut observed = Vec::new();
    for job in &job_list.items {
        // Only a failed Job of the run in flight needs the worker's reason.
        let detail = match (jobs::has_failed(job), jobs::observe_job(job, None)) {
            (true, Some(o)) if Some(o.version) == current_version => {
                termination_message(ctx, &namespace, &job.name_any()).await?
            }
            _ => None,
        };
        observed.extend(jobs::observe_job(job, detail.as_deref()));
    }

    let sources: Vec<SegmentSource> = Api::namespaced(ctx.client.clone(), &namespace).list(&ListParams::default()).await?.items;
    let tables: Vec<String> = sources.iter().map(|s| s.spec.table.clone()).collect();
    let key = segment.key();
    let store_view = planner::observe_store(ctx.store.as_ref(), &key, segment.status.as_ref()).await?;
    let now = (ctx.clock)();
    let observe = |slot_free: bool| Observation {
        segment,
        jobs: &observed,
        store: &store_view,
        source_tables: Some(&tables),
        compute_slot_free: slot_free,
        now,
    };

    let mut plan = planner::plan(&observe(true), &ctx.planner);
    let launches_compute = plan.actions.iter().any(|a| matches!(a, Action::Launch(Launch { kind: JobKind::Compute, .. })));
    // Hold the slot lock through the Job's creation when the limit applies.
    let _slot = match ctx.slots.limit {
        Some(limit) if launches_compute => {
            let guard = ctx.slots.lock.lock().await;
            if ctx.slots.active_computes(&ctx.client).await? >= limit {
                plan = planner::plan(&observe(false), &ctx.planner);
            }
            Some(guard)
        }
        _ => None,
    };

    execute(segment, &plan, &sources, ctx).await?;
    ctx.metrics.record_plan(&namespace, &name, &plan);
    Ok(match plan.requeue_at {
        Some(at) => Requeue::requeue((at - now).to_std().unwrap_or_default().max(std::time::Duration::from_secs(1))),
        None => Requeue::await_change(),
    })
}

/// Carries out a plan: store actions, then the status (which records a new
/// run before its Job exists), then Jobs, then Events.
async fn execute(segment: &Segment, plan: &Plan, sources: &[SegmentSource], ctx: &Context) -> Result<(), Error> {
    let key = segment.key();
    for action in plan.actions.iter().filter(|a| a.is_store_action()) {
        match action {
            Action::Activate { version, .. } => ctx.store.activate(&key, *version).await?,
            Action::DeleteVersion { version } => ctx.store.delete_version(&key, *version).await?,
            Action::CollectResults { older_than, keep } => {
                let removed = ctx.results.collect(&key, *older_than, keep).await?;
                if removed > 0 {
                    info!(segment = %key, removed, "collected expired result files");
                }
            }
            _ => {}
        }
    }

    if segment.status.as_ref() != Some(&plan.status) {
        write_status(ctx, segment, &plan.status).await?;
    }

    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &key.namespace);
    for action in &plan.actions {
        match action {
            Action::CancelJobs { version } => {
                let selector =
                    format!("{SEGMENT_LABEL}={},{VERSION_LABEL}={version}", segment_core::naming::segment_label_value(&key.name));
                for job in jobs_api.list(&ListParams::default().labels(&selector)).await?.items {
                    match jobs_api.delete(&job.name_any(), &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Action::Launch(launch) => {
                let inputs = match launch.kind {
                    JobKind::Compute => segment_inputs(ctx, segment).await?,
                    JobKind::Ingest => Vec::new(),
                };
                let job = jobs::build_job(segment, launch, sources, &inputs, &ctx.jobs, &ctx.results_base)?;
                match jobs_api.create(&PostParams::default(), &job).await {
                    Ok(_) => {
                        ctx.metrics.jobs_created.inc();
                    }
                    // Created before a restart: the run continues with it.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(e.into()),
                };
            }
            _ => {}
        }
    }

    // Without the resourceVersion, the same event of later reconciles
    // counts up one series instead of starting a new Event each time.
    let reference = ObjectReference { resource_version: None, ..segment.object_ref(&()) };
    for action in &plan.actions {
        if let Action::Event(event) = action {
            let note = truncate(&event.message, 1024);
            let kube_event = KubeEvent {
                type_: if event.warning { EventType::Warning } else { EventType::Normal },
                reason: event.reason.clone(),
                // The recorder counts an event into an earlier one's series
                // when type, reason, action and object match, keeping the
                // first note: the note's digest in the action keeps two
                // different notes (v1 and v2 deleted) apart, while the same
                // note again is counted.
                action: format!("{}-{}", event.reason, short_digest(&note)),
                note: Some(note),
                secondary: None,
            };
            // An Event that cannot be written must not undo a reconcile
            // whose effects already happened.
            if let Err(error) = ctx.recorder.publish(&kube_event, &reference).await {
                warn!(segment = %key, %error, reason = %event.reason, "could not publish event");
            }
        }
    }
    Ok(())
}

/// The active versions of the segments a rule refers to, read from their
/// Segments' status.
async fn segment_inputs(ctx: &Context, segment: &Segment) -> Result<Vec<SegmentInput>, Error> {
    let Some(rules) = &segment.spec.definition.rules else { return Ok(Vec::new()) };
    let api: Api<Segment> = Api::namespaced(ctx.client.clone(), &segment.namespace().ok_or(Error::NoNamespace)?);
    let mut active = std::collections::HashMap::new();
    for name in rules.segment_refs() {
        if let Some(version) = api.get_opt(name).await?.and_then(|s| s.status).and_then(|s| s.active_version) {
            active.insert(name.to_string(), version);
        }
    }
    Ok(segment_core::task::segment_inputs(segment, &ctx.results_base, |name| active.get(name).copied()))
}

/// Writes the whole status by server-side apply: fields the planner dropped
/// (a finished `currentRun`) disappear, which a merge patch would not do.
async fn write_status(ctx: &Context, segment: &Segment, status: &SegmentStatus) -> Result<(), Error> {
    let api: Api<Segment> = Api::namespaced(ctx.client.clone(), &segment.namespace().ok_or(Error::NoNamespace)?);
    // The resourceVersion makes the write conditional: a plan made from a
    // stale copy of the Segment (the watch cache lags a write) is refused
    // with 409 instead of overwriting newer status, and the reconcile is
    // retried on fresh data.
    let body = json!({
        "apiVersion": Segment::api_version(&()),
        "kind": Segment::kind(&()),
        "metadata": {"resourceVersion": segment.resource_version()},
        "status": status,
    });
    api.patch_status(&segment.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// The worker's `Reason: message` from the pods of a failed Job.
async fn termination_message(ctx: &Context, namespace: &str, job: &str) -> Result<Option<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await?;
    let message = list
        .items
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .filter(|c| c.name == jobs::CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .find(|m| !m.trim().is_empty());
    Ok(message)
}

/// Runs before the Segment goes away: removes its store data and result
/// files unless `deletionPolicy: Retain`. Jobs go with their owner.
async fn cleanup(segment: &Segment, ctx: &Context) -> Result<Requeue, Error> {
    let key = segment.key();
    if segment.spec.deletion_policy == DeletionPolicy::Delete {
        ctx.store.delete_segment(&key).await?;
        ctx.results.delete_segment(&key).await?;
        info!(segment = %key, "deleted store data and result files");
    } else {
        info!(segment = %key, "deletionPolicy Retain: store data and result files kept");
    }
    ctx.metrics.forget(&key.namespace, &key.name);
    Ok(Requeue::await_change())
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Eight hex digits of a SHA-256, enough to tell notes of one object apart.
fn short_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect()
}
