//! The Kubernetes adapter, one Segment at a time: [`observe`] its Jobs,
//! sources and store, [`plan_with_slot`] asks the planner what to do, and
//! [`execute`] carries the plan out through [`segment_core::executor`]
//! with the cluster as its [`Effects`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, ObjectReference, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use segment_core::api::{
    ComputeClass, ComputeClassSpec, DeletionPolicy, Segment, SegmentKey, SegmentSource, SegmentStatus, COMPUTE_CLASS_LABEL,
    FINALIZER, JOB_KIND_LABEL, SEGMENT_LABEL, SEGMENT_NAMESPACE_LABEL, VERSION_LABEL,
};
use segment_core::executor::{self, Effects};
use segment_core::naming::JobKind;
use segment_core::planner::{self, Action, Event, JobState, Launch, Observation, ObservedJob, Plan, PlannerConfig, StoreView};
use segment_core::policy;
use segment_core::reasons::{ConditionType, EventReason, FailureReason, SpecProblem};
use segment_core::store::{replicas_ready, ReplicaRegistry, ReplicasReady, ResultStore, Seal, SegmentStore, StoreError};
use segment_core::task::{sources_read, Failure, SegmentInput};
use segment_core::validation::Invalid;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::config::JobArgs;
use crate::events::{EventNote, EventPublisher};
use crate::jobs;
use crate::leader::{Leadership, NotLeader};
use crate::metrics::Metrics;
use crate::spark::{self, SparkApplication};

pub const FIELD_MANAGER: &str = "segment-operator";

/// Everything a reconcile needs; shared by all reconciles of one term as
/// leader.
pub struct Context {
    pub client: Client,
    /// What the controller's watches have seen: a reconcile reads Jobs,
    /// SegmentSources and referenced Segments from here, never with a list
    /// call of its own.
    pub cache: ClusterCache,
    pub store: Arc<dyn SegmentStore>,
    /// The same store, as the registry of serving replicas: a version is
    /// activated once every live replica has loaded it.
    pub replicas: Arc<dyn ReplicaRegistry>,
    /// How long an activation waits for the replicas still missing before
    /// readers are switched anyway (`--replica-load-timeout-seconds`).
    pub replica_load_timeout: chrono::Duration,
    /// When each waiting activation first asked the replicas to load.
    pub replica_waits: ReplicaWaits,
    pub results: Arc<dyn ResultStore>,
    pub planner: PlannerConfig,
    pub jobs: JobArgs,
    pub results_base: String,
    pub slots: ComputeSlots,
    pub events: Arc<EventPublisher>,
    pub metrics: Arc<Metrics>,
    /// The time source; tests fix it.
    pub clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    /// Whether this replica may write; checked before every write.
    pub leadership: Leadership,
    /// Jobs the API server refused, by Segment and run version, until the
    /// next reconcile of that Segment observes them as failed.
    pub rejected_jobs: std::sync::Mutex<std::collections::HashMap<(SegmentKey, u64), RejectedJob>>,
}

/// Why a reconcile failed. Each variant says what was being done and keeps
/// its cause; [`Error::metric_label`] is the `error` label of the
/// `reconcile_errors` metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Kube {
        /// What the call was doing: `listing Jobs`, `writing status`, ...
        op: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The status write was refused because the Segment changed since it
    /// was read (the watch cache lags writes). Expected and routine: the
    /// reconcile runs again at once on the newer copy.
    #[error("writing status: the Segment changed since it was read")]
    Conflict,
    #[error("{op}: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("building a Job: {0}")]
    BuildJob(#[source] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("Segment has no namespace")]
    NoNamespace,
    /// The watches have not listed everything yet (or have ended with
    /// the term): planned again shortly.
    #[error("the watch caches are not filled yet")]
    CacheNotReady,
    /// The leader lease lapsed (not renewed within its deadline): this
    /// replica writes nothing until it holds the lease again.
    #[error("{0}")]
    NotLeader(#[from] NotLeader),
    /// A deleted Segment's Jobs are still stopping: its data and its
    /// finalizer stay until they are gone (the finalizer helper removes
    /// the finalizer on any successful cleanup, so waiting is an error).
    #[error("{0} Jobs of the deleted Segment are still stopping")]
    JobsStopping(usize),
    /// Readers are switched to `version` once every live serving replica
    /// has loaded it; `missing` of the `live` ones have not yet. Routine:
    /// looked at again shortly, up to `--replica-load-timeout-seconds`.
    #[error(
        "version {version} is loaded by {} of {live} serving replicas; readers switch once all have it",
        .live - .missing
    )]
    WaitingForReplicas { version: u64, missing: usize, live: usize },
}

impl Error {
    /// One label per kind of failure, for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Conflict => "conflict",
            Error::Store { .. } => "store",
            Error::BuildJob(_) => "build_job",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace => "no_namespace",
            Error::CacheNotReady => "cache_not_ready",
            Error::JobsStopping(_) => "jobs_stopping",
            Error::WaitingForReplicas { .. } => "waiting_for_replicas",
            Error::NotLeader(_) => "not_leader",
        }
    }
}

/// Wraps a Kubernetes API error with what the call was doing.
fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { op, source }
}

/// Wraps a store error with what the call was doing.
fn store(op: &'static str) -> impl FnOnce(StoreError) -> Error {
    move |source| Error::Store { op, source }
}

/// A Job the API server refused: its kind, name and the failure to report.
pub type RejectedJob = (JobKind, String, Failure);

/// The watch caches a reconcile reads (kube-runtime reflector stores,
/// filled by the controller's own watches).
#[derive(Clone)]
pub struct ClusterCache {
    pub jobs: Store<Job>,
    pub sources: Store<SegmentSource>,
    pub segments: Store<Segment>,
    /// Namespaces, for their `segmentation.dev/compute-class` label.
    pub namespaces: Store<Namespace>,
    pub compute_classes: Store<ComputeClass>,
    /// SparkApplications, when this operator runs Spark
    /// (`--spark-applications`); `None` refuses Segments that ask for it.
    pub spark_applications: Option<Store<SparkApplication>>,
    /// Jobs created in this term that the Jobs watch has not shown yet.
    pub unwatched_jobs: UnwatchedJobs,
}

/// Jobs this operator created that its watch has not delivered yet. A
/// reconcile set off by its own status write can run before the Job's
/// watch event arrives; reading these too, it sees the Job it just created
/// instead of creating it again (a request the API server refuses with
/// 409). An entry leaves once the watch shows the Job, when the Job is
/// deleted, or after [`UNWATCHED_JOB_TTL`] (a Job deleted by someone else
/// before the watch saw it).
#[derive(Clone, Default)]
pub struct UnwatchedJobs(Arc<std::sync::Mutex<std::collections::HashMap<ObjectRef<Job>, UnwatchedJob>>>);

/// When a Job was created, and the Job as the API server returned it.
type UnwatchedJob = (Instant, Arc<Job>);

const UNWATCHED_JOB_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl UnwatchedJobs {
    fn created(&self, job: Job) {
        let mut job = job;
        jobs::trim_for_cache(&mut job);
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(ObjectRef::from(&job), (Instant::now(), Arc::new(job)));
    }

    fn deleted(&self, job: &ObjectRef<Job>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(job);
    }

    /// The entries matching `wanted` that `watched` does not hold yet;
    /// the others are dropped.
    fn not_in(&self, watched: &Store<Job>, wanted: impl Fn(&Job) -> bool) -> Vec<Arc<Job>> {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|job, (at, _)| at.elapsed() < UNWATCHED_JOB_TTL && watched.get(job).is_none());
        entries.values().filter(|(_, job)| wanted(job)).map(|(_, job)| job.clone()).collect()
    }
}

impl ClusterCache {
    /// Waits until every watch has listed once, so a reconcile never plans
    /// from a cache that has not seen the cluster yet (a SegmentSource not
    /// listed yet would read as an unknown table). The wait is bounded: the
    /// controller may not poll the watches while its first reconciles wait,
    /// so a reconcile that finds the caches cold gives way and is retried.
    async fn ready(&self) -> Result<(), Error> {
        let ready = async {
            self.jobs.wait_until_ready().await.is_ok()
                && self.sources.wait_until_ready().await.is_ok()
                && self.segments.wait_until_ready().await.is_ok()
                && self.namespaces.wait_until_ready().await.is_ok()
                && self.compute_classes.wait_until_ready().await.is_ok()
                && match &self.spark_applications {
                    Some(applications) => applications.wait_until_ready().await.is_ok(),
                    None => true,
                }
        };
        match tokio::time::timeout(CACHE_SYNC_WAIT, ready).await {
            Ok(true) => Ok(()),
            _ => Err(Error::CacheNotReady),
        }
    }

    /// The ComputeClass of `namespace`: the one its label names, else
    /// `default` (the operator's `--default-compute-class`), else the
    /// operator's own flags (an empty class). A class named but missing is
    /// not allowed: running without the admin's settings could be looser.
    pub fn compute_class(&self, namespace: &str, default: Option<&str>) -> Result<ComputeClassSpec, Invalid> {
        let Some((name, labelled)) = self.compute_class_name(namespace, default) else {
            return Ok(ComputeClassSpec::default());
        };
        let chosen_by = match labelled {
            true => format!("the namespace's label {COMPUTE_CLASS_LABEL}"),
            false => "the operator's --default-compute-class".to_string(),
        };
        match self.compute_classes.get(&ObjectRef::new(&name)) {
            Some(class) => Ok(class.spec.clone()),
            None => Err(Invalid {
                reason: SpecProblem::NotAllowed,
                field: "metadata.namespace".to_string(),
                message: format!("ComputeClass `{name}` ({chosen_by}) does not exist"),
            }),
        }
    }

    /// The name of `namespace`'s ComputeClass, and whether its label
    /// chose it (else `default` did).
    pub fn compute_class_name(&self, namespace: &str, default: Option<&str>) -> Option<(String, bool)> {
        let labelled =
            self.namespaces.get(&ObjectRef::new(namespace)).and_then(|ns| ns.labels().get(COMPUTE_CLASS_LABEL).cloned());
        match labelled {
            Some(name) => Some((name, true)),
            None => default.map(|name| (name.to_string(), false)),
        }
    }

    /// The Segments of one namespace, as the controller queues them.
    pub fn segments_in(&self, namespace: &str) -> Vec<ObjectRef<Segment>> {
        self.segments
            .state_filter(|segment| segment.metadata.namespace.as_deref() == Some(namespace))
            .iter()
            .map(|segment| ObjectRef::from(segment.as_ref()))
            .collect()
    }

    /// The Segment a Job runs for: its owner, or for an ingest Job in the
    /// ingest namespace (which has none) the Segment its labels name.
    pub fn segment_of(&self, job: &Job, ingest_namespace: Option<&str>) -> Option<ObjectRef<Segment>> {
        let namespace = jobs::segment_namespace(job, ingest_namespace)?;
        let owner = job.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "Segment");
        if let Some(owner) = owner {
            return Some(ObjectRef::new(&owner.name).within(namespace));
        }
        let label = job.labels().get(SEGMENT_LABEL)?;
        let named = |segment: &Segment| {
            segment.metadata.namespace.as_deref() == Some(namespace)
                && segment_core::naming::segment_label_value(&segment.name_any()) == *label
        };
        self.segments.state_filter(named).first().map(|segment| ObjectRef::from(segment.as_ref()))
    }

    /// The SparkApplications of one Segment (in its namespace).
    fn spark_applications_of(&self, namespace: &str, segment: &str) -> Vec<Arc<SparkApplication>> {
        let Some(applications) = &self.spark_applications else { return Vec::new() };
        let label = segment_core::naming::segment_label_value(segment);
        applications.state_filter(|app| {
            app.metadata.namespace.as_deref() == Some(namespace) && app.labels().get(SEGMENT_LABEL) == Some(&label)
        })
    }

    /// Refuses a Segment that asks for Spark from an operator that runs
    /// none: without the Spark operator's CRD its applications could not
    /// even be created.
    fn spark_not_running(&self, segment: &Segment) -> Option<Invalid> {
        (spark::runs_on_spark(segment) && self.spark_applications.is_none()).then(|| Invalid {
            reason: SpecProblem::NotAllowed,
            field: "spec.compute.engine".to_string(),
            message: "spark: this operator runs no Spark applications (it was started without --spark-applications, \
                      the chart's spark.enabled); use engine: datafusion, or ask the cluster admin to enable Spark"
                .to_string(),
        })
    }

    /// The Jobs of one Segment, in its namespace or the ingest namespace.
    fn jobs_of(&self, namespace: &str, segment: &str, ingest_namespace: Option<&str>) -> Vec<Arc<Job>> {
        let label = segment_core::naming::segment_label_value(segment);
        let of_segment = |job: &Job| {
            jobs::segment_namespace(job, ingest_namespace) == Some(namespace) && job.labels().get(SEGMENT_LABEL) == Some(&label)
        };
        let mut jobs = self.jobs.state_filter(of_segment);
        jobs.extend(self.unwatched_jobs.not_in(&self.jobs, of_segment));
        jobs
    }
}

/// The limit on concurrent compute Jobs of this operator (cluster-wide, or
/// in its one watched namespace: the Jobs cache holds only what it
/// watches). Active compute Jobs are counted from the cache, plus the Jobs
/// reserved by reconciles that are creating them and not yet seen by the
/// watch; counting and reserving happen under one lock, which is never
/// held across an API call.
pub struct ComputeSlots {
    limit: Option<usize>,
    /// (namespace, Job name) of compute Jobs being created.
    reserved: std::sync::Mutex<BTreeSet<(String, String)>>,
}

/// A compute slot taken for one Job: released on drop unless kept (the
/// Job was created; the cache counts it from then on).
pub struct SlotReservation<'a> {
    slots: &'a ComputeSlots,
    job: (String, String),
    kept: bool,
}

impl SlotReservation<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for SlotReservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.slots.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.job);
        }
    }
}

impl ComputeSlots {
    pub fn new(limit: usize) -> Self {
        ComputeSlots { limit: (limit > 0).then_some(limit), reserved: Default::default() }
    }

    /// Takes a slot for `job` (a compute Job's or SparkApplication's
    /// name) if one is free. Both kinds of compute count.
    fn try_reserve(
        &self,
        jobs: &Store<Job>,
        applications: Option<&Store<SparkApplication>>,
        job: (String, String),
    ) -> Option<SlotReservation<'_>> {
        let compute = |labels: &std::collections::BTreeMap<String, String>| {
            labels.get(JOB_KIND_LABEL).map(String::as_str) == Some("compute")
        };
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        // A reserved run the watch has delivered is counted from the cache.
        reserved.retain(|(ns, name)| {
            let watched_app = applications.is_some_and(|apps| apps.get(&ObjectRef::new(name).within(ns)).is_some());
            jobs.get(&ObjectRef::new(name).within(ns)).is_none() && !watched_app
        });
        if let Some(limit) = self.limit {
            let active_apps = applications
                .map(|apps| apps.state_filter(|app| compute(app.labels()) && spark::is_active(app)).len())
                .unwrap_or(0);
            let active = jobs.state_filter(|j| compute(j.labels()) && jobs::is_active(j)).len() + active_apps;
            if active + reserved.len() >= limit && !reserved.contains(&job) {
                return None;
            }
        }
        reserved.insert(job.clone());
        Some(SlotReservation { slots: self, job, kept: false })
    }
}

pub async fn reconcile(segment: Arc<Segment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let _in_flight = ctx.metrics.reconcile_started();
    ctx.cache.ready().await?;
    // Adding the finalizer is a write too.
    ctx.leadership.check()?;
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
        kube::runtime::finalizer::Error::AddFinalizer(source) => Error::Kube { op: "adding the finalizer", source },
        kube::runtime::finalizer::Error::RemoveFinalizer(source) => Error::Kube { op: "removing the finalizer", source },
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(result.as_ref().map(|_| ()), started.elapsed().as_secs_f64());
    result
}

/// How long a reconcile waits for the watch caches to fill.
const CACHE_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long after a status-write conflict to plan again: enough for the
/// watch to deliver the newer copy, short enough to count as at once.
const CONFLICT_REQUEUE: std::time::Duration = std::time::Duration::from_millis(100);

/// Retries a failed reconcile after a short pause; the previous version
/// keeps serving meanwhile. The one place a reconcile failure is logged.
pub fn error_policy(segment: Arc<Segment>, error: &Error, _ctx: Arc<Context>) -> Requeue {
    let key = segment.key();
    match error {
        Error::Conflict => {
            debug!(segment = %key, %error, "planning again on fresh data");
            Requeue::requeue(CONFLICT_REQUEUE)
        }
        Error::CacheNotReady => {
            debug!(segment = %key, %error, "planning again once the caches are filled");
            Requeue::requeue(std::time::Duration::from_secs(1))
        }
        Error::JobsStopping(_) => {
            info!(segment = %key, %error, "removing its data once they are gone");
            Requeue::requeue(JOBS_STOPPING_RECHECK)
        }
        // At debug: a wait is logged once at info when it starts, and this
        // repeats every second until the replicas have the version.
        Error::WaitingForReplicas { .. } => {
            debug!(segment = %key, %error, "activating once the serving replicas have loaded it");
            Requeue::requeue(REPLICA_LOAD_RECHECK)
        }
        // The term is ending; the next leader reconciles this Segment.
        Error::NotLeader(_) => {
            debug!(segment = %key, %error, "not reconciled");
            Requeue::requeue(std::time::Duration::from_secs(15))
        }
        _ => {
            // Every variant's message already ends with its cause's.
            warn!(segment = %key, %error, kind = error.metric_label(), "reconcile failed");
            Requeue::requeue(std::time::Duration::from_secs(15))
        }
    }
}

/// What the operator saw of one Segment's world, read before planning.
struct Observed {
    jobs: Vec<ObservedJob>,
    sources: Vec<SegmentSource>,
    tables: Vec<String>,
    store: StoreView,
    now: DateTime<Utc>,
    /// The namespace's ComputeClass, and what of the spec it does not allow.
    class: ComputeClassSpec,
    not_allowed: Option<Invalid>,
}

#[instrument(skip_all, fields(segment = %segment.key()))]
async fn apply(segment: &Segment, ctx: &Context) -> Result<Requeue, Error> {
    let observed = observe(segment, ctx).await?;
    let (plan, slot) = plan_with_slot(segment, &observed, ctx);
    execute(segment, &plan, &observed, ctx).await?;
    if let Some(slot) = slot {
        slot.keep();
    }
    let key = segment.key();
    ctx.metrics.record_plan(&key.namespace, &key.name, &plan);
    debug!(actions = plan.actions.len(), requeue_at = ?plan.requeue_at, "planned and carried out");
    Ok(match plan.requeue_at {
        Some(at) => Requeue::requeue((at - observed.now).to_std().unwrap_or_default().max(std::time::Duration::from_secs(1))),
        None => Requeue::await_change(),
    })
}

/// Reads the Segment's Jobs (with the worker's reason for a failed Job of
/// the run in flight), the namespace's SegmentSources and the store.
async fn observe(segment: &Segment, ctx: &Context) -> Result<Observed, Error> {
    let namespace = segment.namespace().ok_or(Error::NoNamespace)?;
    let job_list = ctx.cache.jobs_of(&namespace, &segment.name_any(), ctx.jobs.ingest_namespace.as_deref());
    let current_run = segment.status.as_ref().and_then(|s| s.current_run.as_ref());
    let now = (ctx.clock)();
    let mut jobs = Vec::new();
    for job in &job_list {
        let Some(mut observed) = jobs::observe_job(job) else { continue };
        // Its pods and events are in the Job's namespace, which for an
        // ingest Job may be the ingest namespace.
        let namespace = job.namespace().unwrap_or_else(|| namespace.clone());
        // Only the run in flight needs to know why its Job failed or has
        // not started: a look at its pods, on failure or once the Job is
        // older than the pod start timeout.
        if current_run.is_some_and(|r| r.version == observed.version) {
            match &mut observed.state {
                JobState::Failed { failure, .. } => {
                    if let Some(found) = jobs::pod_failure(&job_pods(ctx, &namespace, &observed.name).await?) {
                        *failure = found;
                    }
                }
                JobState::Running => {
                    let old = observed.created_at.is_some_and(|at| now - at >= ctx.planner.pod_start_timeout);
                    if old && !jobs::has_started(job) {
                        let pods = job_pods(ctx, &namespace, &observed.name).await?;
                        observed.not_started = if pods.is_empty() {
                            Some(jobs::not_created(failed_create(ctx, &namespace, &observed.name).await?))
                        } else {
                            jobs::start_problem(&pods)
                        };
                    }
                }
                JobState::Succeeded { .. } => {}
            }
        }
        jobs.push(observed);
    }
    // A Spark run's application stands for its compute Job.
    for app in ctx.cache.spark_applications_of(&namespace, &segment.name_any()) {
        let Some(mut observed) = spark::observe_application(&app) else { continue };
        if current_run.is_some_and(|r| r.version == observed.version) {
            match &mut observed.state {
                JobState::Failed { failure, .. } => {
                    let driver = driver_pod(ctx, &namespace, &spark::driver_pod_name(&app)).await?;
                    if let Some(found) = driver.as_ref().and_then(spark::driver_failure) {
                        *failure = found;
                    }
                }
                JobState::Running if observed.created_at.is_some_and(|at| now - at >= ctx.planner.pod_start_timeout) => {
                    let driver = driver_pod(ctx, &namespace, &spark::driver_pod_name(&app)).await?;
                    observed.not_started = spark::start_problem(&app, driver.as_ref());
                }
                _ => {}
            }
        }
        jobs.push(observed);
    }
    // A Job the API server refused has no object to observe: the refusal
    // stands in for it, so the run fails once instead of retrying.
    if let Some(run) = current_run {
        let refused = ctx.rejected_jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&(segment.key(), run.version));
        if let Some((kind, name, failure)) = refused.filter(|(_, name, _)| !jobs.iter().any(|j| &j.name == name)) {
            jobs.push(ObservedJob::new(name, run.version, kind, JobState::Failed { finished_at: now, failure }));
        }
    }

    let sources: Vec<SegmentSource> = ctx
        .cache
        .sources
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .iter()
        .map(|s| s.as_ref().clone())
        .collect();
    let tables = sources.iter().map(|s| s.spec.table.clone()).collect();
    let mut view = planner::observe_store(ctx.store.as_ref(), &segment.key(), segment.status.as_ref())
        .await
        .map_err(store("reading the store"))?;
    // Once the ingest Job of the run in flight succeeded: its verdict, from
    // which the plan seals the version.
    planner::observe_seal(ctx.results.as_ref(), &segment.key(), segment.status.as_ref(), &jobs, &mut view)
        .await
        .map_err(store("reading the ingest's verdict"))?;
    let (class, not_allowed) = match ctx.cache.compute_class(&namespace, ctx.jobs.default_compute_class.as_deref()) {
        Ok(class) => {
            let read = sources_read(&segment.spec.definition, sources.iter().map(|s| &s.spec));
            let tenant = policy::Tenant { namespace: &namespace, results_base: &ctx.results_base };
            let not_allowed = policy::check_allowed(&segment.spec, &read, &class, tenant)
                .err()
                .or_else(|| ctx.cache.spark_not_running(segment));
            (class, not_allowed)
        }
        Err(missing) => (ComputeClassSpec::default(), Some(missing)),
    };
    Ok(Observed { jobs, sources, tables, store: view, now, class, not_allowed })
}

/// Plans; when the plan launches a compute Job under a compute limit,
/// reserves a slot for it (kept once the Job is created) and plans again
/// without a slot if none is free.
fn plan_with_slot<'c>(segment: &Segment, observed: &Observed, ctx: &'c Context) -> (Plan, Option<SlotReservation<'c>>) {
    let observation = |slot_free: bool| Observation {
        segment,
        jobs: &observed.jobs,
        store: &observed.store,
        source_tables: Some(&observed.tables),
        compute_slot_free: slot_free,
        now: observed.now,
        not_allowed: observed.not_allowed.as_ref(),
    };
    let plan = planner::plan(&observation(true), &ctx.planner);
    let compute_job = plan.actions.iter().find_map(|a| match a {
        Action::Launch(Launch { kind: JobKind::Compute, job_name, .. }) => Some(job_name.clone()),
        _ => None,
    });
    let Some(job_name) = compute_job.filter(|_| ctx.slots.limit.is_some()) else { return (plan, None) };
    let namespace = segment.namespace().unwrap_or_default();
    match ctx.slots.try_reserve(&ctx.cache.jobs, ctx.cache.spark_applications.as_ref(), (namespace, job_name)) {
        Some(slot) => (plan, Some(slot)),
        None => (planner::plan(&observation(false), &ctx.planner), None),
    }
}

/// Carries out a plan through the one executor, with the cluster as its
/// effects.
async fn execute(segment: &Segment, plan: &Plan, observed: &Observed, ctx: &Context) -> Result<(), Error> {
    let mut effects = ClusterEffects { segment, key: segment.key(), sources: &observed.sources, class: &observed.class, ctx };
    executor::carry_out(plan, segment.status.as_ref(), &mut effects).await
}

/// A plan's effects on the cluster: the store, the Segment's status, its
/// Jobs and Events.
struct ClusterEffects<'a> {
    segment: &'a Segment,
    key: SegmentKey,
    sources: &'a [SegmentSource],
    class: &'a ComputeClassSpec,
    ctx: &'a Context,
}

impl ClusterEffects<'_> {
    fn jobs_api(&self, namespace: &str) -> Api<Job> {
        Api::namespaced(self.ctx.client.clone(), namespace)
    }

    /// Remembers a Job or SparkApplication the API server refused for what
    /// it is: the same one would be refused again, so the run fails with
    /// the server's message on the next look instead of retrying.
    fn refused(&self, launch: &Launch, message: &str) {
        let failure = Failure::new(FailureReason::JobRejected, truncate(message, 1024));
        warn!(segment = %self.key, job = %launch.job_name, %message, "the API server refused a Job");
        let key = (self.key.clone(), launch.version);
        self.ctx
            .rejected_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (launch.kind, launch.job_name.clone(), failure));
    }

    /// Creates the SparkApplication of a Spark run's compute, in place of
    /// its compute Job. The planner refuses a Spark Segment whose class
    /// does not enable Spark, or when this operator runs none, so neither
    /// is missing here unless the class changed since: then nothing is
    /// created and the next reconcile reports it.
    async fn launch_spark(&mut self, launch: &Launch, inputs: &[SegmentInput]) -> Result<(), Error> {
        let ctx = self.ctx;
        let Some(spark) = self.class.spark.as_ref().filter(|_| ctx.cache.spark_applications.is_some()) else {
            warn!(segment = %self.key, "a Spark run without Spark settings or --spark-applications; nothing launched");
            return Ok(());
        };
        let app =
            spark::build_application(self.segment, launch, self.sources, inputs, self.class, spark, &ctx.jobs, &ctx.results_base)
                .map_err(Error::BuildJob)?;
        let api: Api<SparkApplication> = Api::namespaced(ctx.client.clone(), &self.key.namespace);
        match api.create(&PostParams::default(), &app).await {
            Ok(_) => {
                ctx.metrics.jobs_created.inc();
            }
            // Created before (a restart, or a watch that has not shown it
            // yet): the run continues with it.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => self.refused(launch, &s.message),
            Err(source) => return Err(Error::Kube { op: "creating a SparkApplication", source }),
        }
        Ok(())
    }

    /// Holds the switch to `version` until every live serving replica has
    /// loaded it (push, replicas report, then swap, as LinkedIn's Venice
    /// does): a replica answering from the index files it holds in memory
    /// could not answer for a version it has not loaded. The hold is an
    /// error, so the executor stops before the plan's status is written:
    /// the status never claims a switch that has not happened (nor starts
    /// the reader grace of the version left), and the next reconcile plans
    /// the same activation and looks again. The planner knows nothing of
    /// replicas. After `replica_load_timeout` readers are switched anyway;
    /// the returned warning, published once they are, says how many
    /// replicas lacked the version (they load it on the rollover notice
    /// and switch when they have it).
    async fn await_replicas(&mut self, version: u64) -> Result<Option<Event>, Error> {
        let ready = replicas_ready(self.ctx.replicas.as_ref(), &self.key, version)
            .await
            .map_err(store("asking the serving replicas to load a version"))?;
        let ReplicasReady::Waiting { live, missing } = ready else { return Ok(None) };
        let now = (self.ctx.clock)();
        let (since, began) = self.ctx.replica_waits.since(&self.key, version, now);
        let waited = now - since;
        if waited < self.ctx.replica_load_timeout {
            let waiting = Error::WaitingForReplicas { version, missing: missing.len(), live };
            if began {
                info!(segment = %self.key, version, ?missing, "waiting for the serving replicas to load the version");
                self.event(&Event { reason: EventReason::WaitingForReplicas, message: waiting.to_string() }).await;
            }
            self.show_wait(&waiting).await;
            return Err(waiting);
        }
        let waited_seconds = waited.num_seconds();
        warn!(segment = %self.key, version, ?missing, waited_seconds, "switching readers before every serving replica has it");
        let mut names = missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if missing.len() > 5 {
            names.push_str(&format!(" and {} more", missing.len() - 5));
        }
        let message = format!(
            "readers switched to v{version} after waiting {waited_seconds}s for the serving replicas: {} of {live} had not \
             loaded it ({names}); they switch once they have",
            missing.len(),
        );
        Ok(Some(Event { reason: EventReason::ReplicaLoadTimedOut, message }))
    }

    /// Shows a held switch in the `Ready` condition, on the status the
    /// Segment has: the plan's own status waits with the switch. The
    /// next plan, once readers are switched, writes its conditions over it.
    async fn show_wait(&self, waiting: &Error) {
        let Some(previous) = self.segment.status.as_ref() else { return };
        let status = waiting_status(previous, &waiting.to_string());
        if status == *previous {
            return;
        }
        // Only the display is lost: the wait goes on, and the next look
        // writes it again (on fresh data, after a conflict).
        match write_status(self.ctx, self.segment, &status).await {
            Ok(()) | Err(Error::Conflict) => {}
            Err(error) => warn!(segment = %self.key, %error, "could not show the wait for serving replicas in the status"),
        }
    }
}

/// `previous` with its `Ready` condition saying what readers wait for
/// (reason `WaitingForReplicas`). `Ready` keeps its status, and so its
/// transition time: a version that serves still serves meanwhile.
fn waiting_status(previous: &SegmentStatus, wait: &str) -> SegmentStatus {
    let mut status = previous.clone();
    let message = match status.active_version {
        Some(active) => format!("v{active} serves {} members; {wait}", status.members.unwrap_or(0)),
        None => wait.to_string(),
    };
    if let Some(ready) = status.conditions.iter_mut().find(|c| c.type_ == ConditionType::Ready.as_str()) {
        ready.reason = EventReason::WaitingForReplicas.as_str().to_string();
        ready.message = message;
    }
    status
}

/// How often a switch waiting for serving replicas looks again: a replica
/// loads an index in about that time, and readers should not wait longer
/// than they must.
const REPLICA_LOAD_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// When this term first asked the serving replicas to load the version
/// each waiting segment is to be switched to: the load timeout counts from
/// there. Kept in memory rather than in the store: a new term (or a
/// restarted operator) counts from zero again, which only makes that wait
/// longer and never skips it, and neither store has to keep operator
/// bookkeeping. One entry per segment (its version in the entry), since
/// only the activation planned now matters: a wait for another version (a
/// rollback planned while a rollover waited) starts over, and the entry
/// goes once the segment is switched or deleted.
#[derive(Clone, Default)]
pub struct ReplicaWaits(Arc<std::sync::Mutex<std::collections::HashMap<SegmentKey, ReplicaWait>>>);

/// The version a segment's switch waits for, and when its load was first
/// requested.
type ReplicaWait = (u64, DateTime<Utc>);

impl ReplicaWaits {
    /// When the wait for `version` began, beginning it at `now` if it had
    /// not; and whether it just began.
    fn since(&self, segment: &SegmentKey, version: u64, now: DateTime<Utc>) -> (DateTime<Utc>, bool) {
        let mut waits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match waits.get(segment) {
            Some((waiting_for, since)) if *waiting_for == version => (*since, false),
            _ => {
                waits.insert(segment.clone(), (version, now));
                (now, true)
            }
        }
    }

    fn end(&self, segment: &SegmentKey) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(segment);
    }
}

/// Where a Segment's Jobs may be, each with the label selector that finds
/// them: its own namespace, and the ingest namespace, where only the
/// segment-namespace label tells its Jobs from another namespace's
/// Segment of the same name.
fn job_places(key: &SegmentKey, jobs: &crate::config::JobArgs) -> Vec<(String, String)> {
    let label = segment_core::naming::segment_label_value(&key.name);
    let mut places = vec![(key.namespace.clone(), format!("{SEGMENT_LABEL}={label}"))];
    if let Some(ingest) = jobs.ingest_namespace.as_ref().filter(|ingest| **ingest != key.namespace) {
        places.push((ingest.clone(), format!("{SEGMENT_LABEL}={label},{SEGMENT_NAMESPACE_LABEL}={}", key.namespace)));
    }
    places
}

/// How often a deletion waiting for its Jobs to stop looks again.
const JOBS_STOPPING_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Deletes the Jobs `selector` finds in `namespace` in the foreground (a
/// Job stays listed until its pods are gone) and returns how many are
/// still there.
async fn stop_jobs(ctx: &Context, namespace: &str, selector: &str) -> Result<usize, Error> {
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let jobs = jobs_api.list(&ListParams::default().labels(selector)).await.map_err(kube("listing Jobs to stop"))?;
    let mut remaining = 0;
    for job in jobs.items {
        ctx.cache.unwatched_jobs.deleted(&ObjectRef::from(&job));
        match jobs_api.delete(&job.name_any(), &DeleteParams::foreground()).await {
            // The object came back: its deletion waits for its pods.
            Ok(deleting) if deleting.is_left() => remaining += 1,
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(Error::Kube { op: "deleting a Job", source }),
        }
    }
    Ok(remaining)
}

/// Deletes the SparkApplications `selector` finds in `namespace` and
/// returns how many are still there (a foreground deletion waits for the
/// driver pod, which the application owns).
async fn stop_spark_applications(ctx: &Context, namespace: &str, selector: &str, how: DeleteParams) -> Result<usize, Error> {
    let api: Api<SparkApplication> = Api::namespaced(ctx.client.clone(), namespace);
    let apps = api.list(&ListParams::default().labels(selector)).await.map_err(kube("listing SparkApplications to stop"))?;
    let mut remaining = 0;
    for app in apps.items {
        match api.delete(&app.name_any(), &how).await {
            Ok(deleting) if deleting.is_left() && how.propagation_policy == Some(kube::api::PropagationPolicy::Foreground) => {
                remaining += 1
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(Error::Kube { op: "deleting a SparkApplication", source }),
        }
    }
    Ok(remaining)
}

/// The driver pod of a Spark run, if it exists: listed by name, as the
/// operator only lists pods (its RBAC).
async fn driver_pod(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
    let list = pods.list(&by_name).await.map_err(kube("listing the driver pod of a SparkApplication"))?;
    Ok(list.items.into_iter().next())
}

/// Deletes the Jobs `selector` finds in `namespace` (in the background:
/// their pods go with them), forgetting them as created-but-unwatched.
async fn delete_jobs(ctx: &Context, namespace: &str, selector: &str) -> Result<(), Error> {
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let jobs = jobs_api.list(&ListParams::default().labels(selector)).await.map_err(kube("listing Jobs to delete"))?;
    for job in jobs.items {
        ctx.cache.unwatched_jobs.deleted(&ObjectRef::from(&job));
        match jobs_api.delete(&job.name_any(), &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(Error::Kube { op: "deleting a Job", source }),
        }
    }
    Ok(())
}

#[async_trait]
impl Effects for ClusterEffects<'_> {
    type Error = Error;

    /// Refused for a fenced version: the reconcile fails, and the next
    /// one observes the fence and fails the run.
    async fn seal(&mut self, version: u64, seal: &Seal) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        let sealed = self.ctx.store.seal_with(&self.key, version, seal).await.map_err(store("sealing a version"))?;
        info!(segment = %self.key, version, members = sealed.members, "sealed from the ingest's verdict");
        Ok(())
    }

    async fn activate(&mut self, version: u64) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        let late = self.await_replicas(version).await?;
        self.ctx.store.activate(&self.key, version).await.map_err(store("activating a version"))?;
        self.ctx.replica_waits.end(&self.key);
        if let Some(warning) = late {
            self.event(&warning).await;
        }
        Ok(())
    }

    async fn prune_overrides(&mut self, older_than: DateTime<Utc>) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        self.ctx.store.prune_overrides(&self.key, older_than).await.map(drop).map_err(store("pruning realtime overrides"))
    }

    async fn delete_version(&mut self, version: u64) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        self.ctx.store.delete_version(&self.key, version).await.map_err(store("deleting a version"))
    }

    async fn collect_results(&mut self, older_than: DateTime<Utc>, keep: &[u64]) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        let removed = self.ctx.results.collect(&self.key, older_than, keep).await.map_err(store("collecting result files"))?;
        if removed > 0 {
            info!(segment = %self.key, removed, "collected expired result files");
        }
        Ok(())
    }

    async fn write_status(&mut self, status: &SegmentStatus) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        write_status(self.ctx, self.segment, status).await
    }

    async fn cancel_jobs(&mut self, version: u64) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        for (namespace, selector) in job_places(&self.key, &self.ctx.jobs) {
            delete_jobs(self.ctx, &namespace, &format!("{selector},{VERSION_LABEL}={version}")).await?;
        }
        if self.ctx.cache.spark_applications.is_some() {
            let selector = format!(
                "{SEGMENT_LABEL}={},{VERSION_LABEL}={version}",
                segment_core::naming::segment_label_value(&self.key.name)
            );
            stop_spark_applications(self.ctx, &self.key.namespace, &selector, DeleteParams::background()).await?;
        }
        Ok(())
    }

    async fn launch(&mut self, launch: &Launch) -> Result<(), Error> {
        self.ctx.leadership.check()?;
        let inputs = match launch.kind {
            JobKind::Compute => segment_inputs(self.ctx, self.segment).await?,
            JobKind::Ingest => Vec::new(),
        };
        let ctx = self.ctx;
        if launch.kind == JobKind::Compute && spark::runs_on_spark(self.segment) {
            return self.launch_spark(launch, &inputs).await;
        }
        let job = jobs::build_job(self.segment, launch, self.sources, &inputs, self.class, &ctx.jobs, &ctx.results_base)
            .map_err(Error::BuildJob)?;
        let namespace = job.namespace().unwrap_or_else(|| self.key.namespace.clone());
        match self.jobs_api(&namespace).create(&PostParams::default(), &job).await {
            Ok(created) => {
                ctx.metrics.jobs_created.inc();
                ctx.cache.unwatched_jobs.created(created);
            }
            // Created before a restart: the run continues with it.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            // Refused for what it is: 400 when it does not even decode (a
            // quantity that does not parse), 422 when it fails validation.
            // The same Job would be refused again, so the run fails with
            // the server's message on the next look instead of retrying.
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => self.refused(launch, &s.message),
            Err(source) => return Err(Error::Kube { op: "creating a Job", source }),
        }
        Ok(())
    }

    async fn event(&mut self, event: &Event) {
        if !self.ctx.leadership.is_held() {
            return;
        }
        // Without the resourceVersion, the same event of later reconciles
        // counts up one series instead of starting a new Event each time.
        let reference = ObjectReference { resource_version: None, ..self.segment.object_ref(&()) };
        let note = truncate(&event.message, 1024);
        let kube_event = EventNote {
            warning: event.is_warning(),
            reason: event.reason.as_str().to_string(),
            // The publisher counts an event into an earlier one's series
            // when type, reason, action and object match, keeping the
            // first note: the note's digest in the action keeps two
            // different notes (v1 and v2 deleted) apart, while the same
            // note again is counted.
            action: format!("{}-{}", event.reason, short_digest(&note)),
            note,
        };
        // An Event that cannot be written must not undo a reconcile whose
        // effects already happened.
        if let Err(error) = self.ctx.events.publish(&kube_event, &reference).await {
            warn!(segment = %self.key, %error, reason = %event.reason, "could not publish event");
        }
    }
}

/// The active versions of the segments a rule refers to, read from their
/// Segments' status.
async fn segment_inputs(ctx: &Context, segment: &Segment) -> Result<Vec<SegmentInput>, Error> {
    let Some(rules) = &segment.spec.definition.rules else { return Ok(Vec::new()) };
    let namespace = segment.namespace().ok_or(Error::NoNamespace)?;
    let mut active = std::collections::HashMap::new();
    for name in rules.segment_refs() {
        let referenced = ctx.cache.segments.get(&ObjectRef::new(name).within(&namespace));
        if let Some(version) = referenced.and_then(|s| s.status.as_ref().and_then(|s| s.active_version)) {
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
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch_status(&segment.name_any(), &params, &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict),
        Err(source) => Err(Error::Kube { op: "writing status", source }),
    }
}

/// The pods of a Job.
async fn job_pods(ctx: &Context, namespace: &str, job: &str) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = ListParams::default().labels(&format!("job-name={job}"));
    Ok(pods.list(&selector).await.map_err(kube("listing the pods of a Job"))?.items)
}

/// The Job controller's newest `FailedCreate` message for a Job.
async fn failed_create(ctx: &Context, namespace: &str, job: &str) -> Result<Option<String>, Error> {
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), namespace);
    let selector =
        ListParams::default().fields(&format!("involvedObject.kind=Job,involvedObject.name={job},reason=FailedCreate"));
    let list = events.list(&selector).await.map_err(kube("listing the events of a Job"))?;
    Ok(list.items.into_iter().max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0)).and_then(|e| e.message))
}

/// Runs before the Segment goes away: stops its Jobs, then removes its
/// store data and result files, or with `deletionPolicy: Retain` only
/// stops serving it. Every Job of the segment (compute Jobs in its
/// namespace, ingest Jobs in the ingest namespace) must be gone, pods
/// included, before the data goes: a compute Job still running would
/// write result files after they were deleted, an ingest Job would load a
/// version again. Until then the finalizer stays and this looks again.
#[instrument(skip_all, fields(segment = %segment.key()))]
async fn cleanup(segment: &Segment, ctx: &Context) -> Result<Requeue, Error> {
    ctx.leadership.check()?;
    let key = segment.key();
    let mut stopping = 0;
    for (namespace, selector) in job_places(&key, &ctx.jobs) {
        stopping += stop_jobs(ctx, &namespace, &selector).await?;
    }
    if ctx.cache.spark_applications.is_some() {
        let selector = format!("{SEGMENT_LABEL}={}", segment_core::naming::segment_label_value(&key.name));
        stopping += stop_spark_applications(ctx, &key.namespace, &selector, DeleteParams::foreground()).await?;
    }
    if stopping > 0 {
        return Err(Error::JobsStopping(stopping));
    }
    if segment.spec.deletion_policy == DeletionPolicy::Delete {
        ctx.store.delete_segment(&key).await.map_err(store("deleting the store data"))?;
        ctx.results.delete_segment(&key).await.map_err(store("deleting the result files"))?;
        info!(segment = %key, "deleted store data and result files");
    } else {
        // Kept for a Segment created again under the same name, which
        // adopts them; but nobody reads a deleted Segment.
        ctx.store.withdraw(&key).await.map_err(store("withdrawing the segment from readers"))?;
        info!(segment = %key, "deletionPolicy Retain: no longer served; store data and result files kept");
    }
    ctx.metrics.forget(&key.namespace, &key.name);
    ctx.replica_waits.end(&key);
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn compute_job(name: &str, done: bool) -> Job {
        let condition = done.then(|| serde_json::json!([{"type": "Complete", "status": "True"}]));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "growth", "labels": {JOB_KIND_LABEL: "compute"}},
            "status": {"conditions": condition},
        }))
        .unwrap()
    }

    #[test]
    fn a_reserved_slot_counts_until_the_watch_shows_its_job() {
        let slots = ComputeSlots::new(1);
        let (cache, mut writer) = reflector::store::<Job>();
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let job = |name: &str| ("growth".to_string(), name.to_string());
        slots.try_reserve(&cache, None, job("a")).expect("a free slot").keep();
        assert!(slots.try_reserve(&cache, None, job("b")).is_none(), "a's Job is being created");
        writer.apply_watcher_event(&watcher::Event::Apply(compute_job("a", false)));
        assert!(slots.try_reserve(&cache, None, job("b")).is_none(), "a's Job runs");
        writer.apply_watcher_event(&watcher::Event::Apply(compute_job("a", true)));
        let b = slots.try_reserve(&cache, None, job("b")).expect("a's Job is done");
        drop(b);
        assert!(slots.try_reserve(&cache, None, job("c")).is_some(), "b's reservation was released: its Job was never created");
    }
}
