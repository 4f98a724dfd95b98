//! Standalone mode: the whole lifecycle on one machine without
//! Kubernetes. Manifests come from a directory (and are reloaded when the
//! files change), compute and ingest run in-process where the operator
//! would launch Jobs, and the store is Redis when `REDIS_URL` is set and
//! the embedded one otherwise. The planner is the same as in a cluster:
//! only where Jobs run and where status lives differ. Ingest writes its
//! verdict next to the results and the engine seals the version from it,
//! as the cluster's operator does (`planner::observe_seal`, `Action::Seal`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use segment_compute::failure::WorkerError;
use segment_compute::{compute, ingest};
use segment_core::api::{DeletionPolicy, Segment, SegmentKey, SegmentSource, SegmentStatus};
use segment_core::executor::{self, Effects};
use segment_core::naming::JobKind;
use segment_core::planner::{self, Event, JobState, Launch, Observation, ObservedJob, PlannerConfig};
use segment_core::reasons::{ConditionType, FailureReason};
use segment_core::store::{ResultStore, Seal, SegmentStore};
use segment_core::task::{compute_task, ingest_task, segment_inputs, Failure};
use segment_store::results::ObjectResults;
use tokio::sync::Notify;

use segment_serving::{AppState, IndexOptions, ResultFiles, ServingConfig, ServingStore};

use crate::manifests::{self, Manifests};

/// A Job of standalone mode: an in-process task and what it ended with.
struct LocalJob {
    segment: SegmentKey,
    observed: ObservedJob,
    handle: tokio::task::AbortHandle,
}

/// Runs the lifecycle of every Segment found in `dir`.
pub struct Engine {
    dir: PathBuf,
    store: Arc<dyn SegmentStore>,
    results: ObjectResults,
    results_base: String,
    planner: PlannerConfig,
    segments: BTreeMap<SegmentKey, Segment>,
    sources: Vec<SegmentSource>,
    /// The ComputeClasses and labelled Namespaces of the files: where a
    /// namespace's Iceberg catalogs come from.
    classes: Manifests,
    files: Vec<(PathBuf, SystemTime, u64)>,
    jobs: Arc<Mutex<HashMap<(String, String), LocalJob>>>,
    /// Wakes the loop when a job ends.
    pub wake: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] segment_core::store::StoreError),
}

/// The lake lag standalone mode assumes (the cluster's `--lake-lag-seconds`
/// default).
const STANDALONE_LAKE_LAG: chrono::Duration = chrono::Duration::hours(1);

impl Engine {
    /// `results_base` defaults to `<dir>/.results`.
    pub fn new(dir: &Path, store: Arc<dyn SegmentStore>, results_base: Option<String>) -> Result<Engine, StandaloneError> {
        let dir = dir.canonicalize()?;
        let results_base = results_base.unwrap_or_else(|| format!("file://{}/.results", dir.display()));
        Ok(Engine {
            results: ObjectResults::new(results_base.clone()),
            // Shorter retries than in a cluster: a segment that reads
            // another waits for it on one machine, and people are watching.
            planner: PlannerConfig {
                results_base: Some(results_base.clone()),
                poll_interval: chrono::Duration::seconds(2),
                retry_base: chrono::Duration::seconds(3),
                retry_max: chrono::Duration::seconds(60),
                // The in-process API learns of a switch at once; its cache
                // lives 2 s.
                reader_grace: chrono::Duration::seconds(5),
                ..Default::default()
            },
            results_base,
            dir,
            store,
            segments: BTreeMap::new(),
            sources: Vec::new(),
            classes: Manifests::default(),
            files: Vec::new(),
            jobs: Arc::default(),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Reads the manifests again when a file changed. A changed spec
    /// counts as a new generation, as the API server would count it.
    pub async fn reload_if_changed(&mut self) -> Result<bool, StandaloneError> {
        let files = manifest_files(&self.dir)?;
        if files == self.files {
            return Ok(false);
        }
        let loaded = manifests::load(std::slice::from_ref(&self.dir))?;
        self.files = files;
        self.apply_manifests(loaded).await?;
        Ok(true)
    }

    async fn apply_manifests(&mut self, mut loaded: Manifests) -> Result<(), StandaloneError> {
        loaded.resolve_relative_uris(&self.dir);
        self.sources = loaded.sources;
        self.classes = Manifests {
            classes: std::mem::take(&mut loaded.classes),
            namespace_classes: std::mem::take(&mut loaded.namespace_classes),
            ..Default::default()
        };
        let mut seen = Vec::new();
        for mut segment in loaded.segments {
            let key = segment.key();
            seen.push(key.clone());
            match self.segments.get(&key) {
                Some(current) => {
                    let generation = current.metadata.generation.unwrap_or(1);
                    segment.metadata.generation = Some(if current.spec == segment.spec { generation } else { generation + 1 });
                    segment.status = current.status.clone();
                }
                None => segment.metadata.generation = Some(1),
            }
            self.segments.insert(key, segment);
        }
        let removed: Vec<SegmentKey> = self.segments.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for key in removed {
            let segment = self.segments.remove(&key).expect("listed");
            self.cancel_jobs(&key, None);
            match segment.spec.deletion_policy {
                DeletionPolicy::Delete => {
                    self.store.delete_segment(&key).await?;
                    self.results.delete_segment(&key).await?;
                }
                DeletionPolicy::Retain => self.store.withdraw(&key).await?,
            }
            println!(
                "[{key}] removed from {}; store data and results {}",
                self.dir.display(),
                match segment.spec.deletion_policy {
                    DeletionPolicy::Delete => "deleted",
                    DeletionPolicy::Retain => "kept (no longer served)",
                }
            );
        }
        Ok(())
    }

    /// Plans every Segment once and carries the plans out. Returns when to
    /// look again at the latest.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, StandaloneError> {
        let mut wake_at: Option<DateTime<Utc>> = None;
        let keys: Vec<SegmentKey> = self.segments.keys().cloned().collect();
        for key in keys {
            let segment = self.segments[&key].clone();
            let observed: Vec<ObservedJob> = {
                let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
                jobs.values().filter(|j| j.segment == key).map(|j| j.observed.clone()).collect()
            };
            let tables: Vec<String> = self
                .sources
                .iter()
                .filter(|s| s.metadata.namespace == segment.metadata.namespace)
                .map(|s| s.spec.table.clone())
                .collect();
            let observed_store = async {
                let mut view = planner::observe_store(self.store.as_ref(), &key, segment.status.as_ref()).await?;
                planner::observe_seal(&self.results, &key, segment.status.as_ref(), &observed, &mut view).await?;
                Ok::<_, segment_core::store::StoreError>(view)
            };
            let view = match observed_store.await {
                Ok(view) => view,
                Err(e) => {
                    eprintln!("[{key}] store: {e}; retrying");
                    continue;
                }
            };
            let obs = Observation {
                segment: &segment,
                jobs: &observed,
                store: &view,
                source_tables: Some(&tables),
                compute_slot_free: true,
                now,
                not_allowed: None,
            };
            let plan = planner::plan(&obs, &self.planner);
            let mut effects = LocalEffects { engine: self, segment: &segment, key: key.clone() };
            if let Err(e) = executor::carry_out(&plan, segment.status.as_ref(), &mut effects).await {
                eprintln!("[{key}] {e}; retrying");
                continue;
            }
            if let Some(stored) = self.segments.get_mut(&key) {
                stored.status = Some(plan.status.clone());
            }
            wake_at = [wake_at, plan.requeue_at].into_iter().flatten().min();
        }
        Ok(wake_at)
    }

    fn cancel_jobs(&self, key: &SegmentKey, version: Option<u64>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.retain(|_, job| {
            let cancel = job.segment == *key && version.is_none_or(|v| job.observed.version == v);
            if cancel {
                job.handle.abort();
            }
            !cancel
        });
    }

    /// Runs what a Job would run, in this process.
    fn launch(&self, segment: &Segment, launch: &Launch) {
        let key = segment.key();
        let job_key = (key.namespace.clone(), launch.job_name.clone());
        if self.jobs.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&job_key) {
            return;
        }
        let jobs = self.jobs.clone();
        let wake = self.wake.clone();
        let name = job_key.clone();
        let work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), WorkerError>> + Send>> = match launch.kind {
            JobKind::Compute => {
                let sources = self
                    .sources
                    .iter()
                    .filter(|s| s.metadata.namespace.as_deref() == Some(&key.namespace))
                    .map(|s| s.spec.clone())
                    .collect();
                let active_of = |name: &str| {
                    self.segments
                        .get(&SegmentKey::new(&key.namespace, name))
                        .and_then(|s| s.status.as_ref())
                        .and_then(|s| s.active_version)
                };
                let inputs = segment_inputs(segment, &self.results_base, active_of);
                let task = compute_task(segment, launch, sources, inputs, &self.results_base);
                match self.classes.with_iceberg_access(task, &self.results_base) {
                    Ok(task) => Box::pin(async move { compute::run(&task).await.map(|_| ()) }),
                    Err(invalid) => {
                        let failure = WorkerError::new(FailureReason::UnsupportedSource, invalid.to_string());
                        Box::pin(async move { Err(failure) })
                    }
                }
            }
            JobKind::Ingest => {
                let task = ingest_task(segment, launch, &self.results_base, STANDALONE_LAKE_LAG);
                Box::pin(async move { ingest::verify(&task).await.map(|_| ()) })
            }
        };
        let observed = ObservedJob::new(launch.job_name.clone(), launch.version, launch.kind, JobState::Running);
        // The record goes in before the task can finish and update it.
        let mut guard = jobs.lock().unwrap_or_else(|e| e.into_inner());
        let task_jobs = jobs.clone();
        let handle = tokio::spawn(async move {
            let result = work.await;
            let finished_at = Utc::now();
            let state = match result {
                Ok(()) => JobState::Succeeded { finished_at },
                Err(e) => JobState::Failed { finished_at, failure: Failure::new(e.reason, e.message) },
            };
            if let Some(job) = task_jobs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&name) {
                job.observed.state = state;
            }
            wake.notify_one();
        })
        .abort_handle();
        guard.insert(job_key, LocalJob { segment: key, observed, handle });
    }
}

impl Engine {
    /// `<dir>/.status/<namespace>/<name>.yaml`: what `kubectl get -o yaml`
    /// would show as status, for people and scripts.
    fn write_status(&self, key: &SegmentKey, status: &segment_core::api::SegmentStatus) {
        let dir = self.dir.join(".status").join(&key.namespace);
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let text = serde_yaml::to_string(status).map_err(std::io::Error::other)?;
            let path = dir.join(format!("{}.yaml", key.name));
            let tmp = dir.join(format!(".{}.yaml.tmp", key.name));
            std::fs::write(&tmp, text)?;
            std::fs::rename(tmp, path)
        });
        if let Err(e) = written {
            eprintln!("[{key}] writing status: {e}");
        }
    }
}

/// A plan's effects on one machine: the store, the status file, in-process
/// Jobs and Events printed for the person watching.
struct LocalEffects<'e> {
    engine: &'e Engine,
    segment: &'e Segment,
    key: SegmentKey,
}

#[async_trait]
impl Effects for LocalEffects<'_> {
    type Error = StandaloneError;

    /// Switches at once, without the cluster's wait for serving replicas
    /// to load the version (`segment_core::store::replicas_ready`): the
    /// serving API here is in this process and switches on the notice once
    /// it holds the version's index, so there is no replica to wait for.
    async fn activate(&mut self, version: u64) -> Result<(), StandaloneError> {
        Ok(self.engine.store.activate(&self.key, version).await?)
    }

    /// Seals the version from the verdict the in-process ingest wrote.
    async fn seal(&mut self, version: u64, seal: &Seal) -> Result<(), StandaloneError> {
        self.engine.store.seal_with(&self.key, version, seal).await?;
        Ok(())
    }

    async fn prune_overrides(&mut self, older_than: DateTime<Utc>) -> Result<(), StandaloneError> {
        self.engine.store.prune_overrides(&self.key, older_than).await?;
        Ok(())
    }

    async fn delete_version(&mut self, version: u64) -> Result<(), StandaloneError> {
        Ok(self.engine.store.delete_version(&self.key, version).await?)
    }

    async fn collect_results(&mut self, older_than: DateTime<Utc>, keep: &[u64]) -> Result<(), StandaloneError> {
        self.engine.results.collect(&self.key, older_than, keep).await?;
        Ok(())
    }

    async fn write_status(&mut self, status: &SegmentStatus) -> Result<(), StandaloneError> {
        print_status(&self.key, status);
        self.engine.write_status(&self.key, status);
        Ok(())
    }

    async fn cancel_jobs(&mut self, version: u64) -> Result<(), StandaloneError> {
        self.engine.cancel_jobs(&self.key, Some(version));
        Ok(())
    }

    async fn launch(&mut self, launch: &Launch) -> Result<(), StandaloneError> {
        self.engine.launch(self.segment, launch);
        Ok(())
    }

    async fn event(&mut self, event: &Event) {
        let kind = if event.is_warning() { "Warning" } else { "Normal" };
        println!("[{}] {kind} {}: {}", self.key, event.reason, event.message);
    }
}

fn print_status(key: &SegmentKey, status: &segment_core::api::SegmentStatus) {
    let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready.as_str());
    let (state, reason, message) =
        ready.map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str())).unwrap_or(("Unknown", "", ""));
    let run = status.current_run.as_ref().map(|r| format!("; v{} {:?}", r.version, r.phase)).unwrap_or_default();
    println!("[{key}] Ready={state} {reason}: {message}{run}");
}

/// The manifest files and their change stamps, sorted.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, SystemTime, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let meta = std::fs::metadata(&path)?;
            out.push((path, meta.modified()?, meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Generates the example lake next to manifests that read `file://./lake/`
/// when it is not there yet, so the bundled example runs in one command.
pub fn ensure_example_lake(dir: &Path, sources: &[SegmentSource]) -> std::io::Result<Option<PathBuf>> {
    let wants_lake = sources.iter().any(|s| s.spec.uri.starts_with("file://./lake/"));
    let lake = dir.join("lake");
    // A lake generated before it held a Delta table is generated again.
    if !wants_lake || lake.join("users-delta/_delta_log").exists() {
        return Ok(None);
    }
    segment_compute::lakegen::generate(&lake, &example_lake_spec())?;
    Ok(Some(lake))
}

/// The example lake: 2,000 users, seed 42, activity up to today.
pub fn example_lake_spec() -> segment_compute::lakegen::LakeSpec {
    segment_compute::lakegen::LakeSpec { now: today(), ..segment_compute::lakegen::LakeSpec::new(2_000, 42) }
}

/// Midnight UTC today: the generated activity ends now, so windows like
/// "in the last 30 days" find members.
fn today() -> DateTime<Utc> {
    let now = Utc::now();
    now.date_naive().and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or(now)
}

/// Runs until Ctrl-C: reload, plan, act, sleep until the next wake.
pub async fn run_loop(mut engine: Engine, shutdown: impl std::future::Future<Output = ()>) -> Result<(), StandaloneError> {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        engine.reload_if_changed().await?;
        let now = Utc::now();
        let wake_at = engine.tick(now).await?;
        // Files are polled every second; a finished job wakes the loop at once.
        let until =
            wake_at.map(|t| (t - now).to_std().unwrap_or_default()).unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(until) => {}
            _ = engine.wake.notified() => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// `segment-operator standalone DIR`: until Ctrl-C.
pub async fn run(args: crate::config::StandaloneArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    run_until(args, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Standalone mode until `shutdown` resolves: the lifecycle loop and the
/// serving API on `args.listen`, sharing one store.
pub async fn run_until(
    args: crate::config::StandaloneArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let loaded = manifests::load(std::slice::from_ref(&args.dir))?;
    if let Some(lake) = ensure_example_lake(&args.dir, &loaded.sources)? {
        println!("generated the example lake in {} (seed 42)", lake.display());
    }
    let store: Arc<dyn ServingStore> = match &args.redis_url {
        Some(url) => {
            println!("store: Redis at {url}");
            Arc::new(segment_store::redis::RedisStore::connect(url).await?)
        }
        None => {
            println!("store: embedded (set REDIS_URL to use Redis)");
            Arc::new(segment_core::store::MemoryStore::new())
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let listen = listener.local_addr()?;
    let engine = Engine::new(&args.dir, store.clone(), args.results_uri.clone())?;
    println!("watching {} for SegmentSources and Segments", engine.dir.display());
    println!("serving on http://{listen}; try:");
    println!("  curl http://{listen}/v1/namespaces/default/segments");
    println!("  curl http://{listen}/v1/users/u0000003/segments");
    println!("  curl http://{listen}/v1/namespaces/default/segments/churn-risk/members/u0000003");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Serving answers from the versions' index files, as in a cluster; it
    // is in process, so the engine does not wait for its load reports: it
    // switches a segment on the notice, once it holds the new version.
    let index = IndexOptions::new(Arc::new(ResultFiles::new(engine.results_base.clone())), "standalone");
    let app = segment_serving::router(AppState::new(store, ServingConfig::new(index)));
    let mut serving_stop = stop_rx.clone();
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = serving_stop.changed().await;
            })
            .await
    });
    let mut loop_stop = stop_rx;
    let result = run_loop(engine, async move {
        let _ = loop_stop.changed().await;
    });
    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let outcome = result.await;
    signal.abort();
    serving.abort();
    outcome?;
    Ok(())
}
