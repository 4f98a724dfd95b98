//! The Kubernetes adapter driven through kube's mock service: each test
//! reconciles a Segment against the fake API server and asserts the exact
//! requests sent, what the store holds, and the status written.

use crate::fake_api;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};
use fake_api::{SharedWorld, World};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use segment_core::api::{
    ComputeClass, ComputeClassSpec, RunPhase, Segment, SegmentKey, SegmentSource, VersionState, APPROVE_VERSION_ANNOTATION,
    FINALIZER, JOB_KIND_LABEL, SEGMENT_LABEL, VERSION_LABEL,
};
use segment_core::planner::PlannerConfig;
use segment_core::seal::SealFile;
use segment_core::store::{
    CountedChange, MembershipReader, MemoryResults, MemoryStore, ReplicaRegistry, ResultStore, Seal, SegmentStore, StoreError,
};
use segment_core::task::{ComputeTask, IngestTask, TASK_ANNOTATION, TASK_FILE};
use segment_operator::config::JobArgs;
use segment_operator::events::EventPublisher;
use segment_operator::metrics::Metrics;
use segment_operator::reconcile::{error_policy, reconcile, ClusterCache, ComputeSlots, Context, Error, ReplicaWaits};
use segment_operator::spark::{SparkApplication, DRIVER_CONTAINER};

const NS: &str = "growth";
const SEGMENTS: &str = "/apis/segmentation.dev/v1alpha1/namespaces/growth/segments/vip";
const STATUS: &str = "/apis/segmentation.dev/v1alpha1/namespaces/growth/segments/vip/status";
const JOBS: &str = "/apis/batch/v1/namespaces/growth/jobs";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/growth/events";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

fn segment(extra_spec: &str) -> Segment {
    let yaml = format!(
        r#"
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata:
  name: vip
  namespace: growth
  uid: 9a1c-uid
  generation: 1
  creationTimestamp: "2026-03-02T09:00:00Z"
  finalizers: ["{FINALIZER}"]
spec:
  definition:
    sql: SELECT user_id FROM orders GROUP BY user_id HAVING count(*) >= 3
{extra_spec}"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn source(table: &str) -> SegmentSource {
    serde_yaml::from_str(&format!(
        "apiVersion: segmentation.dev/v1alpha1\nkind: SegmentSource\nmetadata: {{name: {table}, namespace: growth}}\n\
         spec: {{table: {table}, uri: 's3://lake/{table}/', format: parquet}}\n"
    ))
    .unwrap()
}

fn job_args() -> JobArgs {
    JobArgs {
        worker_image: "segment-worker:test".into(),
        worker_service_account: "segment-worker".into(),
        worker_env_secret: Some("segment-credentials".into()),
        default_compute_class: None,
        ingest_namespace: None,
        ingest_env_secret: None,
        job_ttl_seconds: 3600,
        job_backoff_limit: 2,
        job_deadline_seconds: 3600,
        pod_start_timeout_seconds: 300,
        lake_lag_seconds: 3600,
        max_job_deadline_seconds: 86_400,
        worker_cpu_request: "500m".into(),
        worker_memory_request: "1Gi".into(),
        worker_memory_limit: "4Gi".into(),
        worker_scratch_size_limit: "20Gi".into(),
    }
}

/// One operator process: its store handles, fake cluster and clock.
struct Harness {
    world: SharedWorld,
    store: Arc<MemoryStore>,
    results: Arc<MemoryResults>,
    now: Arc<Mutex<DateTime<Utc>>>,
    metrics: Arc<Metrics>,
    compute_limit: usize,
    /// The operator's watched namespace (`--namespace`), if any.
    watch_namespace: Option<String>,
    /// `--replica-load-timeout-seconds`.
    replica_load_timeout: Duration,
    /// The waits for serving replicas this operator's term remembers: the
    /// one thing every context of the harness shares, so that the load
    /// timeout runs across reconciles (replace it to start a new term).
    replica_waits: ReplicaWaits,
    /// Spark runs: the operator's `--spark-applications`, with this class
    /// (`sparky`) as the default ComputeClass.
    spark_class: Option<ComputeClassSpec>,
}

impl Harness {
    fn new(segment: Segment) -> Harness {
        let world = World { segment: Some(segment), sources: vec![source("orders")], ..Default::default() };
        Harness {
            world: Arc::new(Mutex::new(world)),
            store: Arc::new(MemoryStore::new()),
            results: Arc::new(MemoryResults::default()),
            now: Arc::new(Mutex::new(t0())),
            metrics: Arc::new(Metrics::default()),
            compute_limit: 0,
            watch_namespace: None,
            replica_load_timeout: Duration::seconds(300),
            replica_waits: ReplicaWaits::default(),
            spark_class: None,
        }
    }

    /// An operator that runs Spark, whose default class enables it.
    fn with_spark(segment: Segment) -> Harness {
        let class = serde_yaml::from_str("spark: {image: 'spark:1', sparkVersion: 4.0.1, serviceAccountName: spark-driver}");
        Harness { spark_class: Some(class.unwrap()), ..Harness::new(segment) }
    }

    /// The watch caches of an operator that has just listed the world:
    /// Jobs (of the watched namespace only, when it watches one), sources
    /// and the Segment.
    fn cache(&self) -> ClusterCache {
        let world = self.world.lock().unwrap();
        let watched = |job: &&Job| self.watch_namespace.as_ref().is_none_or(|ns| job.metadata.namespace.as_ref() == Some(ns));
        ClusterCache {
            jobs: listed(world.jobs.iter().filter(watched).cloned()),
            sources: listed(world.sources.iter().cloned()),
            segments: listed(world.segment.iter().cloned()),
            namespaces: listed(std::iter::empty()),
            compute_classes: listed(self.spark_class.iter().map(|spec| ComputeClass::new("sparky", spec.clone()))),
            spark_applications: self.spark_class.as_ref().map(|_| listed(world.spark_applications.iter().cloned())),
            unwatched_jobs: Default::default(),
        }
    }

    fn context(&self) -> Arc<Context> {
        self.context_with(self.cache())
    }

    fn context_with(&self, cache: ClusterCache) -> Arc<Context> {
        let client = fake_api::client(self.world.clone());
        let now = self.now.clone();
        Arc::new(Context {
            client: client.clone(),
            cache,
            store: self.store.clone(),
            replicas: self.store.clone(),
            replica_load_timeout: self.replica_load_timeout,
            replica_waits: self.replica_waits.clone(),
            results: self.results.clone(),
            planner: PlannerConfig { results_base: Some("s3://results".into()), ..Default::default() },
            jobs: JobArgs { default_compute_class: self.spark_class.as_ref().map(|_| "sparky".to_string()), ..job_args() },
            results_base: "s3://results".into(),
            slots: ComputeSlots::new(self.compute_limit),
            events: Arc::new(EventPublisher::new(client, "segment-operator", "test")),
            metrics: self.metrics.clone(),
            clock: Arc::new(move || *now.lock().unwrap()),
            leadership: segment_operator::leader::Leadership::always(),
            rejected_jobs: Default::default(),
        })
    }

    /// Reconciles the world's Segment once with a fresh context (as a
    /// restarted operator would) and returns the write requests it sent.
    async fn reconcile(&self) -> Vec<String> {
        self.try_reconcile().await.expect("reconcile succeeds")
    }

    async fn try_reconcile(&self) -> Result<Vec<String>, String> {
        let segment = self.segment();
        let before = self.world.lock().unwrap().log.len();
        let result = reconcile(Arc::new(segment), self.context()).await;
        let world = self.world.lock().unwrap();
        let writes = world.log[before..].iter().filter(|l| l.method != "GET").map(|l| l.line()).collect();
        result.map(|_| writes).map_err(|e| e.to_string())
    }

    fn segment(&self) -> Segment {
        self.world.lock().unwrap().segment.clone().unwrap()
    }

    fn edit(&self, f: impl FnOnce(&mut Segment)) {
        f(self.world.lock().unwrap().segment.as_mut().unwrap())
    }

    fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }

    fn job(&self, name: &str) -> Job {
        let world = self.world.lock().unwrap();
        world.jobs.iter().find(|j| j.metadata.name.as_deref() == Some(name)).cloned().unwrap_or_else(|| panic!("no job {name}"))
    }

    fn finish_job(&self, name: &str, condition: &str, reason: Option<&str>) {
        let at = Time(k8s_openapi::jiff::Timestamp::from_second(self.now.lock().unwrap().timestamp()).unwrap());
        let mut world = self.world.lock().unwrap();
        let job = world.jobs.iter_mut().find(|j| j.metadata.name.as_deref() == Some(name)).unwrap();
        job.status = Some(JobStatus {
            conditions: Some(vec![JobCondition {
                type_: condition.into(),
                status: "True".into(),
                reason: reason.map(str::to_string),
                last_transition_time: Some(at.clone()),
                ..Default::default()
            }]),
            completion_time: (condition == "Complete").then_some(at),
            ..Default::default()
        });
    }

    fn key(&self) -> SegmentKey {
        SegmentKey::new(NS, "vip")
    }

    /// The name of vip's ingest Job of `version` (namespace-qualified).
    fn ingest_job(&self, version: u64) -> String {
        segment_core::naming::run_job_name(&self.key(), version, segment_core::naming::JobKind::Ingest)
    }

    /// Drives a fresh Segment to version `version` being active, with the
    /// given members loaded by the (simulated) ingest.
    async fn run_to_active(&self, version: u64, members: &[&str]) {
        self.run_to_loaded(version, members).await;
        self.reconcile().await;
        assert_eq!(self.store.active_version(&self.key()).await.unwrap(), Some(version));
    }

    /// Drives a run of `version` until its ingest Job has finished, with
    /// its verdict written: the next reconcile seals, promotes and
    /// activates it.
    async fn run_to_loaded(&self, version: u64, members: &[&str]) {
        self.run_to_ingesting(version).await;
        self.write_verdict(version, members.len() as u64, None);
        self.finish_job(&self.ingest_job(version), "Complete", None);
    }

    /// Drives a run of `version` until its ingest Job runs.
    async fn run_to_ingesting(&self, version: u64) {
        self.reconcile().await;
        let compute = format!("vip-v{version}-compute");
        self.finish_job(&compute, "Complete", None);
        self.reconcile().await;
        let run = self.segment().status.unwrap().current_run.unwrap();
        assert_eq!((run.version, run.phase), (version, RunPhase::Ingesting));
    }

    /// The verdict ingest writes on the run in flight (`version`), as
    /// `segment-worker ingest` does: its count, the run's snapshot time and
    /// definition hash, and the change it counted.
    fn verdict(&self, version: u64, members: u64, change: Option<CountedChange>) -> SealFile {
        let run = self.segment().status.unwrap().current_run.unwrap();
        assert_eq!(run.version, version);
        let seal = Seal {
            members,
            snapshot_time: Some(run.snapshot_time),
            definition_hash: Some(run.definition_hash.clone()),
            change,
            overrides_from: Some(run.snapshot_time - Duration::hours(1)),
            table_versions: Vec::new(),
        };
        SealFile::new(self.key(), version, seal)
    }

    /// The seal in the verdict written on `version`.
    fn verdict_of(&self, version: u64) -> Seal {
        let bytes = futures::executor::block_on(self.results.seal_file(&self.key(), version)).unwrap().expect("a verdict");
        serde_json::from_slice::<SealFile>(&bytes).unwrap().seal
    }

    fn write_verdict(&self, version: u64, members: u64, change: Option<CountedChange>) {
        self.results.put_seal_file(&self.key(), version, self.verdict(version, members, change).to_bytes());
    }

    /// A reconcile that fails, with its error as the operator sees it.
    async fn reconcile_error(&self) -> Error {
        reconcile(Arc::new(self.segment()), self.context()).await.expect_err("the reconcile fails")
    }

    /// A serving replica that is live (for an hour of real time: the
    /// store's liveness runs on the wall clock) and holds `versions` of vip.
    async fn serving_replica(&self, replica: &str, versions: &[u64]) {
        self.store.replica_alive(replica, Utc::now() + Duration::hours(1)).await.unwrap();
        self.store.report_loaded(replica, &self.key(), versions).await.unwrap();
    }

    fn ready(&self) -> segment_core::api::Condition {
        self.segment().status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap()
    }

    /// Requests the next run of vip at `at` (`HH:MM`, on t0's day).
    fn request_run(&self, at: &str) {
        self.edit(|s| {
            s.metadata.annotations =
                Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), format!("2026-03-02T{at}:00Z"))]))
        });
    }
}

/// A reflector store that has listed `objects`.
fn listed<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn job_task(job: &Job) -> String {
    let container = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let pod = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
    assert_eq!(container.args.as_ref().unwrap()[1..], ["--task-file".to_string(), TASK_FILE.to_string()]);
    pod.annotations.as_ref().unwrap()[TASK_ANNOTATION].clone()
}

fn event_reasons(world: &SharedWorld) -> Vec<String> {
    world
        .lock()
        .unwrap()
        .requests("POST", "/events")
        .iter()
        .map(|l| l.body["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn a_new_segment_gets_the_finalizer_before_anything_else() {
    let mut seg = segment("");
    seg.metadata.finalizers = None;
    let h = Harness::new(seg);
    assert_eq!(h.reconcile().await, vec![format!("PATCH {SEGMENTS}")]);
    assert_eq!(h.segment().metadata.finalizers, Some(vec![FINALIZER.to_string()]));
    assert!(h.world.lock().unwrap().jobs.is_empty(), "no Job before the finalizer is in place");
}

#[tokio::test]
async fn first_reconcile_records_the_run_then_creates_the_compute_job() {
    let h = Harness::new(segment(""));
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {JOBS}"), format!("POST {EVENTS}")]);

    let status = h.segment().status.unwrap();
    let run = status.current_run.unwrap();
    assert_eq!((run.version, run.phase, run.job.as_deref()), (1, RunPhase::Computing, Some("vip-v1-compute")));
    assert_eq!(run.snapshot_time, t0());

    let job = h.job("vip-v1-compute");
    let labels = job.metadata.labels.clone().unwrap();
    assert_eq!(labels[SEGMENT_LABEL], "vip");
    assert_eq!(labels[VERSION_LABEL], "1");
    assert_eq!(labels[JOB_KIND_LABEL], "compute");
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Segment", "vip", "9a1c-uid"));
    assert_eq!(owner.controller, Some(true));
    let spec = job.spec.as_ref().unwrap();
    assert_eq!((spec.ttl_seconds_after_finished, spec.backoff_limit), (Some(3600), Some(2)));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.service_account_name.as_deref(), Some("segment-worker"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("segment-worker:test"));
    assert_eq!(container.args.as_ref().unwrap()[0], "compute");
    assert_eq!(container.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "segment-credentials");
    let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "500m");

    let task: ComputeTask = serde_json::from_str(&job_task(&job)).unwrap();
    assert_eq!(task.version, 1);
    assert_eq!(task.snapshot_time, t0());
    assert_eq!(task.results_uri, "s3://results/growth/vip/v1/");
    assert_eq!(task.sources.len(), 1);
    assert_eq!(task.sources[0].table, "orders");
    assert_eq!(event_reasons(&h.world), vec!["RunStarted"]);
}

#[tokio::test]
async fn a_restarted_operator_resumes_the_run_without_a_second_job() {
    let h = Harness::new(segment(""));
    h.reconcile().await;
    h.advance(Duration::seconds(30));
    // A new context is a new operator process: nothing in memory.
    let writes = h.reconcile().await;
    assert!(writes.is_empty(), "nothing to write while the Job runs: {writes:?}");
    assert_eq!(h.world.lock().unwrap().jobs.len(), 1);

    // The status was written but the Job creation was lost (crash between
    // the two): the same Job is created again, once.
    h.world.lock().unwrap().jobs.clear();
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("POST {JOBS}")]);
    assert_eq!(h.job("vip-v1-compute").metadata.name.as_deref(), Some("vip-v1-compute"));
}

#[tokio::test]
async fn a_plan_made_from_a_stale_copy_is_refused_and_launches_nothing() {
    let h = Harness::new(segment(""));
    h.edit(|s| s.metadata.resource_version = Some("41".into()));
    let stale = h.segment();
    h.reconcile().await; // v1 starts; the Segment is now at a newer resourceVersion
    let jobs_before = h.world.lock().unwrap().jobs.len();
    h.edit(|s| {
        s.metadata.annotations =
            Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), "2026-03-02T10:01:00Z".into())]))
    });
    // A reconcile working from the copy read before v1 was recorded.
    let error = reconcile(Arc::new(stale), h.context()).await.unwrap_err();
    assert!(matches!(error, Error::Conflict), "{error:?}");
    // Routine, not an error: counted as a conflict and planned again at once.
    let metrics = h.metrics.encode();
    assert!(metrics.contains(r#"segment_operator_reconciles_total{result="conflict"} 1"#), "{metrics}");
    assert!(!metrics.contains("segment_operator_reconcile_errors_total{"), "{metrics}");
    let requeue = error_policy(Arc::new(h.segment()), &error, h.context());
    assert_eq!(requeue, Requeue::requeue(std::time::Duration::from_millis(100)));
    assert_eq!(h.world.lock().unwrap().jobs.len(), jobs_before, "no second run from stale data");
    assert_eq!(h.segment().status.unwrap().current_run.unwrap().version, 1);
}

#[tokio::test]
async fn a_finished_compute_job_starts_the_ingest_job() {
    let h = Harness::new(segment(""));
    h.reconcile().await;
    h.finish_job("vip-v1-compute", "Complete", None);
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {JOBS}")]);
    let run = h.segment().status.unwrap().current_run.unwrap();
    assert_eq!((run.phase, run.job.clone()), (RunPhase::Ingesting, Some(h.ingest_job(1))));
    let ingest = h.job(&h.ingest_job(1));
    let task: IngestTask = serde_json::from_str(&job_task(&ingest)).unwrap();
    assert_eq!((task.version, task.results_uri.as_str()), (1, "s3://results/growth/vip/v1/"));
    assert_eq!(ingest.spec.unwrap().template.spec.unwrap().containers[0].args.as_ref().unwrap()[0], "ingest");
}

#[tokio::test]
async fn a_finished_ingest_rolls_readers_over() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1", "u2", "u3"]).await;
    let status = h.segment().status.unwrap();
    assert_eq!((status.active_version, status.members), (Some(1), Some(3)));
    assert!(status.current_run.is_none());
    assert_eq!(status.versions[0].state, VersionState::Active);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "VersionActive"));
    assert_eq!(event_reasons(&h.world), vec!["RunStarted", "VersionReady", "RolledOver"]);
    assert!(h.metrics.encode().contains("segment_operator_runs_total{result=\"succeeded\"} 1"), "{}", h.metrics.encode());
    assert!(h.metrics.encode().contains("segment_operator_segment_members{namespace=\"growth\",segment=\"vip\"} 3"));
}

/// The ingest Job touches no store: it writes its verdict, and the
/// reconcile after the Job succeeded seals the version from it (the
/// verdict's count and change, as given), then promotes it.
#[tokio::test]
async fn the_operator_seals_the_version_from_the_ingests_verdict() {
    let h = Harness::new(segment(""));
    h.run_to_ingesting(1).await;
    let verdict = h.verdict(1, 1234, None);
    h.results.put_seal_file(&h.key(), 1, verdict.to_bytes());
    h.finish_job(&h.ingest_job(1), "Complete", None);
    assert!(h.store.versions(&h.key()).await.unwrap().is_empty(), "nothing sealed by the Job");

    h.reconcile().await;
    let stored = h.store.versions(&h.key()).await.unwrap()[&1].clone();
    assert_eq!(stored, verdict.seal.stored(true), "sealed as the verdict says, then promoted");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    let status = h.segment().status.unwrap();
    assert_eq!((status.active_version, status.members, status.current_run), (Some(1), Some(1234), None));
    assert_eq!(event_reasons(&h.world), vec!["RunStarted", "VersionReady", "RolledOver"]);
}

/// A successful ingest Job that left no verdict, or one that is not the
/// run's (damaged, forged, another version's), fails the run once with
/// `IngestIncomplete` and the reason; nothing is sealed, the previous
/// version keeps serving, and the next reconcile does not try again.
#[tokio::test]
async fn a_missing_or_unsound_verdict_fails_the_run_and_seals_nothing() {
    for (case, bytes) in [
        ("missing", None),
        ("damaged", Some(b"{\"format\": \"segment-seal/v1\", \"members\": 10".to_vec())),
        ("another version's", Some(b"v3".to_vec())),
    ] {
        let h = Harness::new(segment(""));
        h.run_to_active(1, &["u1"]).await;
        h.request_run("11:00");
        h.run_to_ingesting(2).await;
        let bytes = match (case, bytes) {
            ("another version's", _) => Some(SealFile { version: 3, ..h.verdict(2, 10, None) }.to_bytes()),
            (_, bytes) => bytes,
        };
        if let Some(bytes) = bytes {
            h.results.put_seal_file(&h.key(), 2, bytes);
        }
        h.finish_job(&h.ingest_job(2), "Complete", None);

        let writes = h.reconcile().await;
        assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {EVENTS}")], "{case}");
        assert_eq!(h.store.versions(&h.key()).await.unwrap().keys().copied().collect::<Vec<_>>(), [1], "{case}");
        assert!(!h.store.is_fenced(&h.key(), 1).await.unwrap());
        let status = h.segment().status.unwrap();
        let failed = status.versions.iter().find(|v| v.version == 2).unwrap();
        assert_eq!((failed.state, failed.reason.as_deref()), (VersionState::Failed, Some("IngestIncomplete")), "{case}");
        let message = failed.message.clone().unwrap();
        let expected = match case {
            "missing" => "left no verdict (_seal.json)",
            "damaged" => "_seal.json does not parse",
            _ => "the verdict on growth/vip v3, not on growth/vip v2",
        };
        assert!(message.contains(expected), "{case}: {message}");
        assert_eq!((status.active_version, status.current_run.is_none()), (Some(1), true), "{case}");
        assert!(status.retry_at.is_some(), "{case}: retried as a new run");
        let warning = h.world.lock().unwrap().requests("POST", "/events").pop().unwrap();
        assert_eq!(warning.body["reason"], "RunFailed", "{case}");
        assert!(h.reconcile().await.is_empty(), "{case}: failed once, not again");
    }
}

/// A version deleted while it was ingested (fenced: its run ended, but
/// that status write was lost) is never sealed from its verdict: the run
/// fails instead of trying on every look. The store refuses the seal too.
#[tokio::test]
async fn a_fenced_version_is_not_sealed_from_its_verdict() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    h.request_run("11:00");
    h.run_to_ingesting(2).await;
    h.store.delete_version(&h.key(), 2).await.unwrap();
    h.write_verdict(2, 10, Some(CountedChange { from: 1, changed: 9 }));
    h.finish_job(&h.ingest_job(2), "Complete", None);

    h.reconcile().await;
    assert_eq!(h.store.versions(&h.key()).await.unwrap().keys().copied().collect::<Vec<_>>(), [1]);
    let status = h.segment().status.unwrap();
    let failed = status.versions.iter().find(|v| v.version == 2).unwrap();
    assert_eq!(failed.reason.as_deref(), Some("IngestIncomplete"));
    assert_eq!(failed.message.as_deref(), Some("v2 was deleted while it was ingested and cannot be sealed"));
    assert_eq!(status.active_version, Some(1));
    assert!(h.reconcile().await.is_empty(), "no second attempt");
    let seal = h.verdict_of(2);
    assert!(matches!(h.store.seal_with(&h.key(), 2, &seal).await, Err(StoreError::Fenced { version: 2, .. })));
}

/// With `maxChangeRatio` set, a version whose change from the active one
/// ingest could not count (the active version has no index file) is held
/// for approval with reason `ChangeNotCounted`: the store holds no member
/// sets to count it instead. Approving it rolls over.
#[tokio::test]
async fn a_version_whose_change_was_not_counted_is_held_for_approval() {
    let h = Harness::new(segment("  rollover: {maxChangeRatio: 0.2}\n"));
    h.run_to_active(1, &["u1", "u2", "u3"]).await;
    h.request_run("11:00");
    h.run_to_loaded(2, &["u1", "u2", "u3"]).await;

    h.reconcile().await;
    let status = h.segment().status.unwrap();
    let run = status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.reason.as_deref()), (RunPhase::AwaitingApproval, Some("ChangeNotCounted")));
    let held = status.conditions.iter().find(|c| c.type_ == "RolloverHeld").unwrap();
    assert_eq!((held.status.as_str(), held.reason.as_str()), ("True", "ChangeNotCounted"));
    assert!(held.message.contains("the change of v2 from v1 could not be counted"), "{}", held.message);
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1), "v1 keeps serving");
    assert!(event_reasons(&h.world).contains(&"RolloverHeld".to_string()));

    h.edit(|s| {
        s.metadata.annotations.as_mut().unwrap().insert(APPROVE_VERSION_ANNOTATION.into(), "2".into());
    });
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2));
}

#[tokio::test]
async fn a_failed_job_reports_the_workers_reason_and_the_previous_version_keeps_serving() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1", "u2"]).await;
    h.edit(|s| {
        s.metadata.annotations =
            Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), "2026-03-02T10:05:00Z".into())]))
    });
    h.reconcile().await;
    h.finish_job("vip-v2-compute", "Failed", Some("BackoffLimitExceeded"));
    h.world.lock().unwrap().pods.push(Pod {
        metadata: ObjectMeta {
            name: Some("vip-v2-compute-x1".into()),
            labels: Some(BTreeMap::from([("job-name".into(), "vip-v2-compute".into())])),
            ..Default::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "worker".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 2,
                        message: Some("UnknownColumn: column `amount` is not in table orders".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        spec: None,
    });
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {EVENTS}")]);
    let pod_reads = h.world.lock().unwrap().requests("GET", "/pods");
    assert_eq!(pod_reads.len(), 1);
    assert!(pod_reads[0].query.contains("labelSelector=job-name=vip-v2-compute"), "{}", pod_reads[0].query);

    let status = h.segment().status.unwrap();
    let failed = status.versions.iter().find(|v| v.version == 2).unwrap();
    assert_eq!((failed.state, failed.reason.as_deref()), (VersionState::Failed, Some("UnknownColumn")));
    assert_eq!(status.active_version, Some(1));
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "LastRunFailed"));
    assert!(ready.message.contains("column `amount`"), "{}", ready.message);
    assert_eq!(status.retry_at, None, "a definition error is not retried");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    let warning = h.world.lock().unwrap().requests("POST", "/events").pop().unwrap();
    assert_eq!((warning.body["type"].as_str(), warning.body["reason"].as_str()), (Some("Warning"), Some("RunFailed")));
}

#[tokio::test]
async fn a_held_rollover_waits_for_the_approval_annotation() {
    let h = Harness::new(segment("  rollover: {maxChangeRatio: 0.2}\n"));
    h.run_to_active(1, &["u1", "u2", "u3", "u4", "u5"]).await;
    h.edit(|s| {
        s.metadata.annotations =
            Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), "2026-03-02T11:00:00Z".into())]))
    });
    h.run_to_ingesting(2).await;
    // v2 is {u1, x1..x4}: 4 left v1 and 4 entered, as ingest counted from
    // the index files.
    h.write_verdict(2, 5, Some(CountedChange { from: 1, changed: 8 }));
    h.finish_job(&h.ingest_job(2), "Complete", None);

    // The verdict seals the version, the guard holds it.
    h.reconcile().await;
    assert_eq!(h.store.versions(&h.key()).await.unwrap()[&2].change, Some(CountedChange { from: 1, changed: 8 }));
    let status = h.segment().status.unwrap();
    assert_eq!(status.current_run.as_ref().map(|r| r.phase), Some(RunPhase::AwaitingApproval));
    let held = status.conditions.iter().find(|c| c.type_ == "RolloverHeld").unwrap();
    assert_eq!((held.status.as_str(), held.reason.as_str()), ("True", "ChangeRatioExceeded"));
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1), "the held version is not served");
    assert!(event_reasons(&h.world).contains(&"RolloverHeld".to_string()));

    // Looking again changes nothing.
    assert!(h.reconcile().await.is_empty());

    h.edit(|s| {
        s.metadata.annotations.as_mut().unwrap().insert(APPROVE_VERSION_ANNOTATION.into(), "2".into());
    });
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2));
    let status = h.segment().status.unwrap();
    assert_eq!(status.active_version, Some(2));
    assert_eq!(status.conditions.iter().find(|c| c.type_ == "RolloverHeld").unwrap().status, "False");
}

#[tokio::test]
async fn retention_removes_versions_beyond_keep_versions_from_the_store() {
    let h = Harness::new(segment("  retention: {keepVersions: 1}\n"));
    h.run_to_active(1, &["u1"]).await;
    h.edit(|s| {
        s.metadata.annotations =
            Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), "2026-03-02T11:00:00Z".into())]))
    });
    h.run_to_active(2, &["u1", "u2"]).await;
    let stored = || async { h.store.versions(&h.key()).await.unwrap().keys().copied().collect::<Vec<_>>() };
    assert_eq!(stored().await, vec![1, 2], "v1 is kept for the reader grace");
    h.advance(PlannerConfig::default().reader_grace);
    h.reconcile().await;
    assert_eq!(stored().await, vec![2], "v1 is deleted, v2 kept");
    let status = h.segment().status.unwrap();
    assert_eq!(status.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2]);
    assert!(event_reasons(&h.world).contains(&"VersionDeleted".to_string()));
}

#[tokio::test]
async fn pin_version_rolls_back_and_clearing_it_rolls_forward() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    h.edit(|s| {
        s.metadata.annotations =
            Some(BTreeMap::from([("segmentation.dev/run-requested-at".into(), "2026-03-02T11:00:00Z".into())]))
    });
    h.run_to_active(2, &["u1", "u2"]).await;
    h.edit(|s| s.spec.pin_version = Some(1));
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    assert_eq!(h.segment().status.unwrap().members, Some(1), "v1's count, as sealed");
    assert!(event_reasons(&h.world).contains(&"RolledBack".to_string()));
    h.edit(|s| s.spec.pin_version = None);
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2));
}

#[tokio::test]
async fn deleting_removes_store_data_and_results_then_the_finalizer() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    h.results.record(&h.key(), 1, t0());
    h.edit(|s| s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(t0().timestamp()).unwrap())));
    let writes = h.reconcile().await;
    // The segment's Jobs go first, then the data, then the finalizer.
    assert_eq!(
        writes,
        vec![format!("DELETE {JOBS}/vip-v1-compute"), format!("DELETE {JOBS}/{}", h.ingest_job(1)), format!("PATCH {SEGMENTS}")]
    );
    assert!(h.world.lock().unwrap().jobs.is_empty());
    assert!(h.store.versions(&h.key()).await.unwrap().is_empty());
    assert!(h.results.versions(&h.key()).is_empty());
    assert_eq!(h.segment().metadata.finalizers, Some(vec![]));
}

/// A Job whose pods are still stopping holds the deletion: a compute Job
/// could still write result files, an ingest Job could still load.
#[tokio::test]
async fn deleting_waits_for_the_segments_jobs_to_stop_before_removing_data() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    h.results.record(&h.key(), 1, t0());
    h.world.lock().unwrap().jobs_linger_on_delete = true;
    h.edit(|s| s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(t0().timestamp()).unwrap())));
    let waiting = h.try_reconcile().await.unwrap_err();
    assert_eq!(waiting, "2 Jobs of the deleted Segment are still stopping");
    assert_eq!(h.store.versions(&h.key()).await.unwrap().len(), 1, "the data waits for the Jobs");
    assert_eq!(h.results.versions(&h.key()), vec![1]);
    assert_eq!(h.segment().metadata.finalizers, Some(vec![FINALIZER.to_string()]));

    // The pods stopped; the Jobs are gone.
    h.world.lock().unwrap().jobs.clear();
    h.reconcile().await;
    assert!(h.store.versions(&h.key()).await.unwrap().is_empty());
    assert!(h.results.versions(&h.key()).is_empty());
    assert_eq!(h.segment().metadata.finalizers, Some(vec![]));
}

/// Retain keeps the data for a Segment created again under the name, but
/// a deleted Segment is no longer served.
#[tokio::test]
async fn deletion_policy_retain_keeps_store_data_and_results_and_stops_serving() {
    let h = Harness::new(segment("  deletionPolicy: Retain\n"));
    h.run_to_active(1, &["u1"]).await;
    h.results.record(&h.key(), 1, t0());
    h.edit(|s| s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(t0().timestamp()).unwrap())));
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), None, "not served");
    assert!(!h.store.aliases().await.unwrap().contains_key(&h.key()));
    assert_eq!(h.store.versions(&h.key()).await.unwrap().len(), 1);
    assert_eq!(h.results.versions(&h.key()), vec![1]);
    assert_eq!(h.segment().metadata.finalizers, Some(vec![]));
}

#[tokio::test]
async fn a_store_outage_keeps_the_finalizer_and_fails_the_reconcile() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    h.edit(|s| s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(t0().timestamp()).unwrap())));
    h.store.set_unavailable(true);
    let error = h.try_reconcile().await.unwrap_err();
    // The error says what failed, and keeps its cause.
    assert!(error.starts_with("deleting the store data: ") && error.contains("store unavailable"), "{error}");
    let metrics = h.metrics.encode();
    assert!(metrics.contains(r#"segment_operator_reconcile_errors_total{error="store"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"segment_operator_reconciles_total{result="error"} 1"#), "{metrics}");
    assert_eq!(h.segment().metadata.finalizers, Some(vec![FINALIZER.to_string()]));
}

#[tokio::test]
async fn an_invalid_definition_is_reported_and_nothing_is_launched() {
    let h = Harness::new(segment(""));
    h.edit(|s| s.spec.definition.sql = Some("SELEC user_id FROM orders".into()));
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {EVENTS}")]);
    assert!(h.world.lock().unwrap().jobs.is_empty());
    let status = h.segment().status.unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidDefinition"));
    assert!(ready.message.starts_with("spec.definition.sql: does not parse:"), "{}", ready.message);
    // The same state again: no second status write, no second Event.
    assert!(h.reconcile().await.is_empty());
}

#[tokio::test]
async fn a_table_without_a_segment_source_is_an_invalid_definition() {
    let h = Harness::new(segment(""));
    h.edit(|s| s.spec.definition.sql = Some("SELECT user_id FROM refunds".into()));
    h.reconcile().await;
    let ready = h.segment().status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidDefinition");
    assert!(ready.message.contains("unknown table `refunds`"), "{}", ready.message);
    assert!(h.world.lock().unwrap().jobs.is_empty());
}

#[tokio::test]
async fn an_invalid_schedule_is_reported_and_nothing_is_launched() {
    let h = Harness::new(segment("  schedule: {cron: '0 */5 * * * *'}\n"));
    h.reconcile().await;
    let ready = h.segment().status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSchedule"));
    assert!(ready.message.contains("6 fields"), "{}", ready.message);
    assert!(h.world.lock().unwrap().jobs.is_empty());
}

#[tokio::test]
async fn the_cluster_wide_compute_limit_queues_runs() {
    let mut h = Harness::new(segment(""));
    h.compute_limit = 1;
    // Another segment's compute Job holds the only slot.
    h.world.lock().unwrap().jobs.push(Job {
        metadata: ObjectMeta {
            name: Some("other-v7-compute".into()),
            namespace: Some("marketing".into()),
            labels: Some(BTreeMap::from([(JOB_KIND_LABEL.into(), "compute".into()), (SEGMENT_LABEL.into(), "other".into())])),
            ..Default::default()
        },
        ..Default::default()
    });
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {EVENTS}")], "the run is recorded, no Job");
    let run = h.segment().status.unwrap().current_run.unwrap();
    assert_eq!((run.phase, run.reason.as_deref()), (RunPhase::Pending, Some("WaitingForComputeSlot")));

    h.finish_job("other-v7-compute", "Complete", None);
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {JOBS}")]);
    assert_eq!(h.segment().status.unwrap().current_run.unwrap().phase, RunPhase::Computing);
}

/// An operator watching one namespace counts compute Jobs there only (its
/// Jobs cache holds no other).
#[tokio::test]
async fn a_namespaced_operator_counts_only_its_namespace() {
    let mut h = Harness::new(segment(""));
    h.compute_limit = 1;
    h.watch_namespace = h.segment().metadata.namespace.clone();
    let compute_job = |name: &str, ns: &str| Job {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(JOB_KIND_LABEL.into(), "compute".into()), (SEGMENT_LABEL.into(), "other".into())])),
            ..Default::default()
        },
        ..Default::default()
    };
    h.world.lock().unwrap().jobs.push(compute_job("elsewhere-v1-compute", "not-watched"));
    let writes = h.reconcile().await;
    assert_eq!(
        writes,
        vec![format!("PATCH {STATUS}"), format!("POST {JOBS}"), format!("POST {EVENTS}")],
        "the other namespace's Job takes no slot"
    );
}

#[tokio::test]
async fn replace_policy_deletes_the_jobs_of_the_run_it_replaces() {
    let h = Harness::new(segment("  schedule: {cron: '*/10 * * * *', concurrencyPolicy: Replace}\n"));
    h.reconcile().await; // v1 starts (no version yet)
    h.advance(Duration::minutes(10)); // the 10:10 run is due while v1 computes
    let writes = h.reconcile().await;
    assert_eq!(
        writes,
        vec![
            format!("PATCH {STATUS}"),
            format!("DELETE {JOBS}/vip-v1-compute"),
            format!("POST {JOBS}"),
            format!("POST {EVENTS}"),
            format!("POST {EVENTS}")
        ]
    );
    let status = h.segment().status.unwrap();
    assert_eq!(status.current_run.as_ref().map(|r| r.version), Some(2));
    assert_eq!(status.versions.iter().find(|v| v.version == 1).and_then(|v| v.reason.as_deref()), Some("Replaced"));
}

#[tokio::test]
async fn expired_results_are_collected_but_the_active_versions_are_kept() {
    let h = Harness::new(segment("  retention: {keepVersions: 3, keepResultsFor: 1d}\n"));
    h.results.record(&h.key(), 1, t0() - Duration::days(3));
    h.run_to_active(1, &["u1"]).await;
    h.results.record(&h.key(), 5, t0() - Duration::days(3));
    h.results.record(&h.key(), 6, t0());
    h.advance(Duration::hours(2));
    h.reconcile().await;
    assert_eq!(h.results.versions(&h.key()), vec![1, 6], "v5 expired; v1 is active; v6 is recent");
    let collected = h.results.collect(&h.key(), t0() + Duration::days(30), &[]).await.unwrap();
    assert_eq!(collected, 2);
}

/// A whole run, from the first reconcile to an active version, reads Jobs,
/// SegmentSources and Segments from the watch caches: no list or get of
/// its own (only a failed or stuck Job's pods are listed).
#[tokio::test]
async fn a_reconcile_before_the_watch_shows_its_job_does_not_create_it_again() {
    let h = Harness::new(segment(""));
    // One context throughout: its Jobs cache listed the world before the
    // Job existed, as when the status write's event comes first.
    let ctx = h.context();
    let creates =
        |h: &Harness| h.world.lock().unwrap().log.iter().filter(|l| l.method == "POST" && l.line().contains("/jobs")).count();
    reconcile(Arc::new(h.segment()), ctx.clone()).await.unwrap();
    assert_eq!(creates(&h), 1);
    reconcile(Arc::new(h.segment()), ctx.clone()).await.unwrap();
    assert_eq!(creates(&h), 1, "the Job just created counts as running until the watch shows it");
    // Once the watch shows the Job (a fresh cache), the record gives way.
    h.finish_job("vip-v1-compute", "Complete", None);
    let fresh = h.context_with(ClusterCache { unwatched_jobs: ctx.cache.unwatched_jobs.clone(), ..h.cache() });
    reconcile(Arc::new(h.segment()), fresh).await.unwrap();
    let ingest = h.ingest_job(1);
    assert!(h.world.lock().unwrap().jobs.iter().any(|j| j.metadata.name.as_deref() == Some(ingest.as_str())));
}

#[tokio::test]
async fn a_reconcile_reads_the_watch_caches_and_lists_nothing() {
    let h = Harness::new(segment(""));
    h.run_to_active(1, &["u1"]).await;
    let reads: Vec<String> = h.world.lock().unwrap().log.iter().filter(|l| l.method == "GET").map(|l| l.line()).collect();
    assert_eq!(reads, Vec::<String>::new());
}

/// A namespace's ComputeClass: the one its label names, else the
/// operator's default, else none (the operator's flags); a class named but
/// missing is not allowed rather than silently replaced by the flags.
#[test]
fn the_namespace_label_then_the_default_choose_the_compute_class_and_a_missing_one_is_not_allowed() {
    use k8s_openapi::api::core::v1::Namespace;
    use segment_core::api::{ComputeClass, ComputeClassSpec};
    use segment_core::reasons::SpecProblem;

    let namespace = |name: &str, class: Option<&str>| Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: class.map(|c| BTreeMap::from([("segmentation.dev/compute-class".to_string(), c.to_string())])),
            ..Default::default()
        },
        ..Default::default()
    };
    let class =
        |name: &str, image: &str| ComputeClass::new(name, ComputeClassSpec { image: Some(image.into()), ..Default::default() });
    let cache = ClusterCache {
        jobs: listed(std::iter::empty()),
        sources: listed(std::iter::empty()),
        segments: listed(std::iter::empty()),
        namespaces: listed([namespace("growth", Some("gold")), namespace("finance", None), namespace("lab", Some("gone"))]),
        compute_classes: listed([class("gold", "worker:gold"), class("standard", "worker:standard")]),
        spark_applications: None,
        unwatched_jobs: Default::default(),
    };
    let image = |ns: &str, default: Option<&str>| cache.compute_class(ns, default).map(|c| c.image);
    assert_eq!(image("growth", Some("standard")), Ok(Some("worker:gold".into())), "the label wins");
    assert_eq!(image("finance", Some("standard")), Ok(Some("worker:standard".into())), "then the default");
    assert_eq!(image("finance", None), Ok(None), "then the operator's flags");
    let missing = cache.compute_class("lab", Some("standard")).unwrap_err();
    assert_eq!(missing.reason, SpecProblem::NotAllowed);
    assert!(missing.message.contains("`gone`") && missing.message.contains("label"), "{missing}");
    let missing_default = cache.compute_class("finance", Some("nope")).unwrap_err();
    assert!(missing_default.message.contains("--default-compute-class"), "{missing_default}");
}

/// Readers are switched to a version only once every live serving replica
/// has loaded it: the switch is held (the store's active version does not
/// move, the plan's status is not written) while one has not, and the
/// next reconcile after it reports the version switches.
#[tokio::test]
async fn a_rollover_waits_until_every_live_serving_replica_has_loaded_the_version() {
    let h = Harness::new(segment(""));
    h.serving_replica("serving-a", &[1]).await;
    h.serving_replica("serving-b", &[1]).await;
    h.run_to_active(1, &["u1"]).await;
    h.request_run("11:00");
    h.run_to_loaded(2, &["u1", "u2"]).await;
    h.store.report_loaded("serving-a", &h.key(), &[1, 2]).await.unwrap();
    let events_before = event_reasons(&h.world).len();

    let error = h.reconcile_error().await;
    assert!(matches!(error, Error::WaitingForReplicas { version: 2, missing: 1, live: 2 }), "{error:?}");
    assert_eq!(error.to_string(), "version 2 is loaded by 1 of 2 serving replicas; readers switch once all have it");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1), "readers stay on v1");
    assert_eq!(h.store.load_requests().await.unwrap().get(&h.key()), Some(&2), "the replicas were asked to load v2");
    let status = h.segment().status.unwrap();
    assert_eq!(status.active_version, Some(1), "the status does not claim the switch");
    assert_eq!(status.current_run.as_ref().map(|r| (r.version, r.phase)), Some((2, RunPhase::Ingesting)));
    let ready = h.ready();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "WaitingForReplicas"));
    assert_eq!(
        ready.message,
        "v1 serves 1 members; version 2 is loaded by 1 of 2 serving replicas; readers switch once all have it"
    );
    assert_eq!(event_reasons(&h.world)[events_before..], ["WaitingForReplicas"], "said once, and no RolledOver yet");
    // Routine: looked at again in a second, not counted as a failure.
    assert_eq!(error_policy(Arc::new(h.segment()), &error, h.context()), Requeue::requeue(std::time::Duration::from_secs(1)));
    let metrics = h.metrics.encode();
    assert!(metrics.contains(r#"segment_operator_reconciles_total{result="waiting_for_replicas"} 1"#), "{metrics}");
    assert!(!metrics.contains("segment_operator_reconcile_errors_total{"), "{metrics}");

    // Still waiting: nothing new is written or said.
    let before = h.world.lock().unwrap().log.len();
    assert!(matches!(h.reconcile_error().await, Error::WaitingForReplicas { .. }));
    let writes: Vec<String> =
        h.world.lock().unwrap().log[before..].iter().filter(|l| l.method != "GET").map(|l| l.line()).collect();
    assert_eq!(writes, Vec::<String>::new());
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));

    h.store.report_loaded("serving-b", &h.key(), &[1, 2]).await.unwrap();
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2));
    let status = h.segment().status.unwrap();
    assert_eq!((status.active_version, status.current_run), (Some(2), None));
    let ready = h.ready();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "VersionActive"));
    let reasons = event_reasons(&h.world);
    assert!(reasons.contains(&"RolledOver".to_string()) && !reasons.contains(&"ReplicaLoadTimedOut".to_string()), "{reasons:?}");
}

/// A replica whose liveness ran out (it died without saying so) does not
/// hold the switch; while it was live, it did. The first activation waits
/// like any other, with `Ready` still `False`.
#[tokio::test]
async fn a_serving_replica_whose_liveness_ran_out_does_not_hold_the_switch() {
    let h = Harness::new(segment(""));
    h.serving_replica("serving-a", &[]).await;
    h.run_to_loaded(1, &["u1"]).await;
    let error = h.reconcile_error().await;
    assert!(matches!(error, Error::WaitingForReplicas { version: 1, missing: 1, live: 1 }), "{error:?}");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), None);
    let ready = h.ready();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "WaitingForReplicas"));
    assert_eq!(ready.message, "version 1 is loaded by 0 of 1 serving replicas; readers switch once all have it");

    h.store.replica_alive("serving-a", Utc::now() - Duration::seconds(1)).await.unwrap();
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    assert_eq!(h.ready().reason, "VersionActive");
}

/// Without index-serving replicas (none deployed) there is nobody to wait
/// for: the version is switched to in the same reconcile, right after the
/// load was asked for.
#[tokio::test]
async fn without_live_serving_replicas_a_version_is_switched_to_at_once() {
    use futures::{FutureExt, StreamExt};
    use segment_core::store::{Notice, Rollover, RolloverFeed};

    let h = Harness::new(segment(""));
    h.run_to_loaded(1, &["u1"]).await;
    let mut notices = h.store.notices().await.unwrap();
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    let mut seen = Vec::new();
    while let Some(Some(notice)) = notices.next().now_or_never() {
        seen.push(notice);
    }
    let load = Notice::Load { segment: h.key(), version: 1 };
    assert_eq!(seen, vec![load, Notice::Rollover(Rollover { segment: h.key(), version: Some(1) })]);
    let reasons = event_reasons(&h.world);
    assert!(!reasons.contains(&"WaitingForReplicas".to_string()), "{reasons:?}");
}

/// The wait is bounded: from the load request's first issue in this term,
/// after `--replica-load-timeout-seconds` readers are switched anyway and
/// a Warning names the replicas that had not loaded the version. A new
/// term counts from zero.
#[tokio::test]
async fn after_the_load_timeout_readers_are_switched_with_a_warning() {
    let mut h = Harness::new(segment(""));
    h.serving_replica("serving-a", &[1]).await;
    h.serving_replica("serving-b", &[1]).await;
    h.run_to_active(1, &["u1"]).await;
    h.request_run("11:00");
    h.run_to_loaded(2, &["u1", "u2"]).await;
    h.store.report_loaded("serving-a", &h.key(), &[1, 2]).await.unwrap();

    assert!(matches!(h.reconcile_error().await, Error::WaitingForReplicas { version: 2, .. }));
    h.advance(Duration::seconds(299));
    assert!(matches!(h.reconcile_error().await, Error::WaitingForReplicas { version: 2, .. }), "not yet");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));

    // A new term (a failover, a restart) forgets the wait and starts it over.
    h.replica_waits = ReplicaWaits::default();
    h.advance(Duration::seconds(1));
    assert!(matches!(h.reconcile_error().await, Error::WaitingForReplicas { version: 2, .. }), "counted from zero again");
    h.advance(Duration::seconds(299));
    assert!(matches!(h.reconcile_error().await, Error::WaitingForReplicas { version: 2, .. }));

    h.advance(Duration::seconds(1));
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2), "switched without serving-b");
    let warning =
        h.world.lock().unwrap().requests("POST", "/events").into_iter().find(|e| e.body["reason"] == "ReplicaLoadTimedOut");
    let warning = warning.expect("a warning");
    assert_eq!(warning.body["type"], "Warning");
    assert_eq!(
        warning.body["note"],
        "readers switched to v2 after waiting 300s for the serving replicas: 1 of 2 had not loaded it (serving-b); they switch \
         once they have"
    );
    assert_eq!(h.ready().reason, "VersionActive");
}

/// A rollback (`pinVersion`) switches readers too, and waits the same way
/// for a replica that no longer holds the older version.
#[tokio::test]
async fn a_rollback_waits_for_the_serving_replicas_too() {
    let h = Harness::new(segment(""));
    h.serving_replica("serving-a", &[1]).await;
    h.run_to_active(1, &["u1"]).await;
    h.request_run("11:00");
    h.run_to_loaded(2, &["u1", "u2"]).await;
    h.store.report_loaded("serving-a", &h.key(), &[2]).await.unwrap();
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2));

    h.edit(|s| s.spec.pin_version = Some(1));
    let error = h.reconcile_error().await;
    assert!(matches!(error, Error::WaitingForReplicas { version: 1, missing: 1, live: 1 }), "{error:?}");
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(2), "readers stay on v2");
    assert_eq!(h.store.load_requests().await.unwrap().get(&h.key()), Some(&1));
    assert!(!event_reasons(&h.world).contains(&"RolledBack".to_string()));

    h.store.report_loaded("serving-a", &h.key(), &[1, 2]).await.unwrap();
    h.reconcile().await;
    assert_eq!(h.store.active_version(&h.key()).await.unwrap(), Some(1));
    assert!(event_reasons(&h.world).contains(&"RolledBack".to_string()));
}

const SPARK_APPS: &str = "/apis/sparkoperator.k8s.io/v1beta2/namespaces/growth/sparkapplications";

impl Harness {
    fn spark_application(&self, name: &str) -> SparkApplication {
        let world = self.world.lock().unwrap();
        let found = world.spark_applications.iter().find(|a| a.metadata.name.as_deref() == Some(name)).cloned();
        found.unwrap_or_else(|| panic!("no SparkApplication {name}"))
    }

    /// What the Spark operator reports on an application.
    fn report_spark(&self, name: &str, status: serde_json::Value) {
        let mut world = self.world.lock().unwrap();
        let app = world.spark_applications.iter_mut().find(|a| a.metadata.name.as_deref() == Some(name)).unwrap();
        app.status = Some(serde_json::from_value(status).unwrap());
    }
}

#[tokio::test]
async fn a_spark_segments_compute_is_a_spark_application_and_its_driver_says_why_it_failed() {
    let h = Harness::with_spark(segment("  compute: {engine: spark}\n"));
    let writes = h.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {STATUS}"), format!("POST {SPARK_APPS}"), format!("POST {EVENTS}")]);
    assert!(h.world.lock().unwrap().jobs.is_empty(), "no compute Job for a Spark run");
    let run = h.segment().status.unwrap().current_run.unwrap();
    assert_eq!((run.phase, run.job.as_deref()), (RunPhase::Computing, Some("vip-v1-compute")));
    let app = h.spark_application("vip-v1-compute");
    assert_eq!(app.spec.image.as_deref(), Some("spark:1"));
    let task: ComputeTask = serde_json::from_str(&app.spec.driver.annotations[TASK_ANNOTATION]).unwrap();
    assert_eq!((task.version, task.engine), (1, segment_core::api::ComputeEngine::Spark));

    // Running: nothing to do; a second reconcile creates nothing again.
    h.report_spark("vip-v1-compute", serde_json::json!({"applicationState": {"state": "RUNNING"}}));
    h.advance(Duration::seconds(30));
    assert!(h.reconcile().await.is_empty());

    // The driver failed: its termination message is the run's reason,
    // not the Spark operator's message.
    h.report_spark(
        "vip-v1-compute",
        serde_json::json!({"applicationState": {"state": "FAILED", "errorMessage": "driver container failed with ExitCode: 1, Reason: Error"},
            "driverInfo": {"podName": "vip-v1-compute-driver"}, "terminationTime": "2026-03-02T10:01:00Z"}),
    );
    let driver = Pod {
        metadata: ObjectMeta { name: Some("vip-v1-compute-driver".into()), namespace: Some(NS.into()), ..Default::default() },
        status: Some(PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: DRIVER_CONTAINER.into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 1,
                        reason: Some("Error".into()),
                        message: Some("UnknownColumn: column `nope` is not in table `orders`".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    h.world.lock().unwrap().pods.push(driver);
    h.reconcile().await;
    let status = h.segment().status.unwrap();
    let v1 = status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!((v1.state, v1.reason.as_deref()), (VersionState::Failed, Some("UnknownColumn")), "{v1:?}");
    assert!(status.current_run.is_none());
}

#[tokio::test]
async fn a_completed_spark_application_is_ingested_and_deleting_the_segment_deletes_it() {
    let h = Harness::with_spark(segment("  compute: {engine: spark}\n"));
    h.reconcile().await;
    h.report_spark(
        "vip-v1-compute",
        serde_json::json!({"applicationState": {"state": "COMPLETED"}, "terminationTime": "2026-03-02T10:01:00Z"}),
    );
    h.advance(Duration::seconds(60));
    let writes = h.reconcile().await;
    assert!(writes.contains(&format!("POST {JOBS}")), "the ingest Job: {writes:?}");
    let run = h.segment().status.unwrap().current_run.unwrap();
    assert_eq!(run.phase, RunPhase::Ingesting);
    assert_eq!(run.computed_at, Some(Utc.with_ymd_and_hms(2026, 3, 2, 10, 1, 0).unwrap()), "the application's end");

    // Deleted: the application goes with the Jobs before the data does.
    h.edit(|s| s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now())));
    h.reconcile().await;
    assert!(h.world.lock().unwrap().spark_applications.is_empty());
    let deletes = h.world.lock().unwrap().requests("DELETE", "sparkapplications");
    assert_eq!(deletes.len(), 1, "{deletes:?}");
}

#[tokio::test]
async fn a_spark_segment_is_not_allowed_when_the_operator_runs_no_spark() {
    let h = Harness::new(segment("  compute: {engine: spark}\n"));
    let writes = h.reconcile().await;
    assert!(!writes.iter().any(|w| w.contains("sparkapplications") || w.contains(JOBS)), "nothing launched: {writes:?}");
    let status = h.segment().status.unwrap();
    let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "NotAllowed"));
    assert!(stalled.message.contains("spec.compute.engine"), "{}", stalled.message);
}

#[tokio::test]
async fn a_spark_application_past_its_deadline_is_deleted_and_its_run_fails() {
    // The Spark operator knows no deadline: the operator keeps it on the
    // application and the planner enforces it, as for a Job the Job
    // controller did not stop.
    let h = Harness::with_spark(segment("  compute: {engine: spark, activeDeadlineSeconds: 600}\n"));
    h.reconcile().await;
    {
        let mut world = h.world.lock().unwrap();
        let app = world.spark_applications.iter_mut().next().unwrap();
        assert_eq!(app.metadata.annotations.as_ref().unwrap()[segment_operator::spark::DEADLINE_ANNOTATION], "600");
        app.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(t0().timestamp()).unwrap()));
    }
    h.report_spark("vip-v1-compute", serde_json::json!({"applicationState": {"state": "RUNNING"}}));
    // Its driver runs (else the pod start timeout would end it first).
    h.world.lock().unwrap().pods.push(Pod {
        metadata: ObjectMeta { name: Some("vip-v1-compute-driver".into()), namespace: Some(NS.into()), ..Default::default() },
        status: Some(PodStatus { phase: Some("Running".into()), ..Default::default() }),
        ..Default::default()
    });
    h.advance(Duration::seconds(600 + PlannerConfig::default().deadline_grace.num_seconds() + 1));
    let writes = h.reconcile().await;
    assert!(writes.contains(&format!("DELETE {SPARK_APPS}/vip-v1-compute")), "{writes:?}");
    assert!(h.world.lock().unwrap().spark_applications.is_empty());
    let status = h.segment().status.unwrap();
    let v1 = status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!((v1.state, v1.reason.as_deref()), (VersionState::Failed, Some("DeadlineExceeded")), "{v1:?}");
}
