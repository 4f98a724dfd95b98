//! The operator on the local control plane (`e2e/local-cluster`) with
//! many Segments: 10,000 Segments in 100 namespaces, their schedules
//! spread over the minutes of an hour, and the operator (the release
//! build, as a process with the admin's kubeconfig) taking every one from
//! nothing to an active version, then at rest, then after a restart.
//!
//! No pod runs. The controller manager is stopped (so no Job controller
//! creates pods) and the benchmark plays the Jobs' part: it marks each
//! compute Job complete, and for each ingest Job writes the verdict
//! (`_seal.json`) to the local S3 server as `segment-worker ingest` would
//! (the operator seals the version in Redis from it), then marks that Job
//! complete. What is measured is the operator and the API server, not the
//! pods.
//!
//! The ceiling is the API server's own: Jobs per second it creates for
//! one client sending 16 at a time, measured before the operator starts.
//! The operator's requests are its own count
//! (`segment_operator_kube_requests_total`).
//!
//! cargo build --release -p segment-operator --no-default-features
//! cargo run --release -p segment-bench --bin cluster -- [segments] [namespaces] [rest-seconds]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use segment_bench::{process_rss_bytes, row};
use segment_core::api::{Segment, SegmentKey, JOB_KIND_LABEL};
use segment_core::seal::SealFile;
use segment_core::store::Seal;
use segment_core::task::{ComputeTask, IngestTask, TASK_ANNOTATION};
use segment_store::results::ResultDir;
use segment_tests::cluster::{workspace_binary, workspace_root, LocalCluster};
use segment_tests::{free_port, http_get, signal, RedisServer, S3Server, Signal};
use serde_json::json;

/// Jobs the benchmark completes at once, and Segments it creates at once.
const IN_FLIGHT: usize = 16;
/// Members of each version the benchmark loads.
const MEMBERS: usize = 20;

#[tokio::main]
async fn main() {
    let arg = |i: usize, default: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (segments, namespaces, rest_seconds) = (arg(1, 10_000), arg(2, 100), arg(3, 120));
    let operator_binary = workspace_binary("segment-operator");

    println!("cluster benchmark: {segments} Segments in {namespaces} namespaces, the operator a release process");
    let cluster = LocalCluster::start_without_images();
    // No Job controller: the benchmark completes the Jobs (see above).
    cluster.stop_component("kube-controller-manager");
    cluster.install_crds(&std::fs::read_to_string(workspace_root().join("crds/segmentation.dev.yaml")).expect("the CRDs"));
    let redis = RedisServer::start();
    let s3 = S3Server::start(&["bench-results"]);
    for (key, value) in s3.env() {
        // Before any S3 client of this process reads it (the Completer's).
        std::env::set_var(key, value);
    }
    let client = cluster.client().await;

    let ceiling = job_create_ceiling(&client, 1_000).await;
    row("ceiling: Jobs created per second (1 client, 16 at once)", ceiling, "Jobs/s");

    let start = Instant::now();
    create_segments(&client, segments, namespaces).await;
    row("Segments created (16 at once)", segments as f64 / start.elapsed().as_secs_f64(), "Segments/s");

    let completer = Completer::start(client.clone());
    let active = ActiveCount::start(client.clone());

    // From nothing to an active version for every Segment.
    let mut operator = OperatorProcess::start(&operator_binary, &cluster, &redis, &s3);
    let start = Instant::now();
    let mut peak_rss = 0;
    while active.count() < segments as usize {
        peak_rss = peak_rss.max(operator.rss());
        assert!(start.elapsed() < Duration::from_secs(3600), "not every Segment active within an hour: {}", active.count());
        assert!(operator.is_running(), "the operator exited:\n{}", operator.log_tail());
        assert!(!completer.stopped(), "the benchmark stopped completing Jobs");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let to_active = start.elapsed().as_secs_f64();
    let jobs = completer.jobs();
    let requests = operator.requests();
    println!("\nfrom no version to every Segment active");
    row("time until every Segment has an active version", to_active, "s");
    row("Jobs launched per second (compute + ingest)", jobs as f64 / to_active, "Jobs/s");
    row("operator RSS, peak", peak_rss as f64 / 1e6, "MB");
    row("operator API requests per run", total(&requests) / segments as f64, "requests");
    print_requests(&requests, 1.0);

    // At rest: only the schedules' own runs.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let at_rest = Window::measure(&operator, &completer, rest_seconds).await;
    println!("\nat rest ({rest_seconds} s)");
    at_rest.print(segments);

    // A restart with every Segment present.
    operator.stop();
    let runs_before = completer.compute_jobs();
    let mut operator = OperatorProcess::start(&operator_binary, &cluster, &redis, &s3);
    let start = Instant::now();
    let mut peak_rss = 0;
    while !operator.reconciled_all(segments) {
        peak_rss = peak_rss.max(operator.rss());
        assert!(start.elapsed() < Duration::from_secs(1800), "not steady within 30 minutes after a restart");
        assert!(operator.is_running(), "the operator exited:\n{}", operator.log_tail());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let to_steady = start.elapsed().as_secs_f64();
    let requests = operator.requests();
    println!("\nafter a restart, until every Segment is reconciled once and none is in flight");
    row("time until steady", to_steady, "s");
    row("operator RSS, peak", peak_rss as f64 / 1e6, "MB");
    row("operator API requests until steady", total(&requests), "requests");
    // Runs that came due meanwhile (a minute's schedules, if the restart
    // spans the start of a minute) are the schedules' work, not the
    // restart's: about 8.4 of these requests each.
    row("  runs started by schedules meanwhile", (completer.compute_jobs() - runs_before) as f64, "runs");
    print_requests(&requests, 1.0);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let at_rest = Window::measure(&operator, &completer, rest_seconds).await;
    println!("\nat rest after the restart ({rest_seconds} s)");
    at_rest.print(segments);
    assert_eq!(active.count(), segments as usize, "every Segment still has an active version");
    operator.stop();
}

/// The operator's requests per minute, the runs its schedules started and
/// its memory, over one window at rest.
struct Window {
    requests: BTreeMap<(String, String), f64>,
    minutes: f64,
    runs: u64,
    rss: u64,
}

impl Window {
    async fn measure(operator: &OperatorProcess, completer: &Completer, seconds: u64) -> Window {
        let (requests, runs) = (operator.requests(), completer.compute_jobs());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let mut after = operator.requests();
        for (key, count) in requests {
            *after.entry(key).or_default() -= count;
        }
        after.retain(|_, count| *count > 0.0);
        let runs = completer.compute_jobs() - runs;
        Window { requests: after, minutes: seconds as f64 / 60.0, runs, rss: operator.rss() }
    }

    fn print(&self, segments: u64) {
        let per_minute = total(&self.requests) / self.minutes;
        row("operator RSS", self.rss as f64 / 1e6, "MB");
        row("operator API requests per minute", per_minute, "requests/min");
        row("runs started by schedules per minute", self.runs as f64 / self.minutes, "runs/min");
        row("requests per Segment per minute", per_minute / segments as f64, "requests");
        let runs = self.runs.max(1) as f64;
        row("requests per scheduled run", total(&self.requests) / runs, "requests");
        print_requests(&self.requests, self.minutes);
    }
}

fn total(requests: &BTreeMap<(String, String), f64>) -> f64 {
    requests.values().sum()
}

fn print_requests(requests: &BTreeMap<(String, String), f64>, minutes: f64) {
    let unit = if minutes == 1.0 { "requests" } else { "requests/min" };
    for ((verb, resource), count) in requests {
        row(&format!("  {verb} {resource}"), count / minutes, unit);
    }
}

/// Jobs per second the API server creates for one client with 16
/// requests in flight, in a namespace of their own (none of them is the
/// operator's).
async fn job_create_ceiling(client: &kube::Client, count: usize) -> f64 {
    create_namespace(client, "bench-ceiling").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "bench-ceiling");
    let start = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                let job: Job = serde_json::from_value(json!({
                    "metadata": {"name": format!("ceiling-{i}")},
                    "spec": {"template": {"spec": {"restartPolicy": "Never",
                        "containers": [{"name": "worker", "image": "segment-operator/segment-worker", "args": ["compute"]}]}}}
                }))
                .expect("a Job");
                jobs.create(&PostParams::default(), &job).await.expect("a Job created");
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    count as f64 / start.elapsed().as_secs_f64()
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("a Namespace");
    namespaces.create(&PostParams::default(), &namespace).await.expect("a Namespace created");
}

/// `segments` static Segments over `namespaces` namespaces, each on an
/// hourly schedule at minute `i % 60`.
async fn create_segments(client: &kube::Client, segments: u64, namespaces: u64) {
    for n in 0..namespaces {
        create_namespace(client, &format!("bench-{n:03}")).await;
    }
    futures::stream::iter(0..segments)
        .map(|i| {
            let api: Api<Segment> = Api::namespaced(client.clone(), &format!("bench-{:03}", i % namespaces));
            async move {
                let segment: Segment = serde_json::from_value(json!({
                    "apiVersion": "segmentation.dev/v1alpha1",
                    "kind": "Segment",
                    "metadata": {"name": format!("segment-{i}")},
                    "spec": {
                        "definition": {"static": {"uri": format!("s3://bench-lists/list-{i}.csv")}},
                        "schedule": {"cron": format!("{} * * * *", i % 60)},
                        "retention": {"keepVersions": 2},
                    }
                }))
                .expect("a Segment");
                api.create(&PostParams::default(), &segment).await.expect("a Segment created");
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
}

/// Plays the pods of the operator's Jobs: a compute Job is marked
/// complete; an ingest Job's verdict is written next to its (absent)
/// result files (member count, snapshot time and definition hash, as the
/// worker writes them), then the Job is marked complete.
struct Completer {
    compute_jobs: Arc<AtomicU64>,
    ingest_jobs: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Completer {
    fn start(client: kube::Client) -> Completer {
        let compute_jobs = Arc::new(AtomicU64::new(0));
        let ingest_jobs = Arc::new(AtomicU64::new(0));
        let (computes, ingests) = (compute_jobs.clone(), ingest_jobs.clone());
        // (segment, version) -> definition hash, from the compute task.
        let hashes: Arc<Mutex<HashMap<(SegmentKey, u64), String>>> = Default::default();
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            let jobs = watcher(Api::<Job>::all(client.clone()), watcher::Config::default().labels(JOB_KIND_LABEL))
                .default_backoff()
                .applied_objects()
                .try_filter(|job| std::future::ready(!is_finished(job)))
                .filter_map(|job| std::future::ready(job.ok()))
                .filter(move |job| std::future::ready(seen.insert(job.uid().unwrap_or_default())));
            jobs.for_each_concurrent(IN_FLIGHT, |job| {
                let (client, hashes) = (client.clone(), hashes.clone());
                let (computes, ingests) = (computes.clone(), ingests.clone());
                async move {
                    let task = task_of(&job);
                    if job.labels().get(JOB_KIND_LABEL).map(String::as_str) == Some("compute") {
                        let task: ComputeTask = serde_json::from_str(&task).expect("a compute task");
                        hashes.lock().unwrap().insert((task.segment, task.version), task.definition_hash);
                        computes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let task: IngestTask = serde_json::from_str(&task).expect("an ingest task");
                        let hash = hashes.lock().unwrap().remove(&(task.segment.clone(), task.version));
                        let seal = Seal {
                            members: MEMBERS as u64,
                            snapshot_time: Some(task.snapshot_time),
                            definition_hash: hash,
                            overrides_from: Some(task.overrides_from.unwrap_or(task.snapshot_time)),
                            ..Seal::default()
                        };
                        let verdict = SealFile::new(task.segment.clone(), task.version, seal);
                        let dir = ResultDir::open(&task.results_uri).expect("a result location");
                        dir.write_seal(&verdict).await.expect("the verdict written");
                        ingests.fetch_add(1, Ordering::Relaxed);
                    }
                    complete(&client, &job).await;
                }
            })
            .await;
        });
        Completer { compute_jobs, ingest_jobs, task }
    }

    /// Whether it stopped (a Job it could not complete: the panic says why).
    fn stopped(&self) -> bool {
        self.task.is_finished()
    }

    fn compute_jobs(&self) -> u64 {
        self.compute_jobs.load(Ordering::Relaxed)
    }

    fn jobs(&self) -> u64 {
        self.compute_jobs() + self.ingest_jobs.load(Ordering::Relaxed)
    }
}

fn is_finished(job: &Job) -> bool {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
}

fn task_of(job: &Job) -> String {
    let template = job.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
    template.and_then(|m| m.annotations.as_ref()).and_then(|a| a.get(TASK_ANNOTATION)).cloned().expect("a task annotation")
}

/// The status the Job controller writes for a Job whose one pod succeeded.
async fn complete(client: &kube::Client, job: &Job) {
    let api: Api<Job> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let condition = |type_: &str| {
        json!({"type": type_, "status": "True", "lastProbeTime": now, "lastTransitionTime": now,
               "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"})
    };
    let status = json!({"status": {
        "startTime": now, "completionTime": now, "succeeded": 1, "active": 0, "ready": 0, "terminating": 0,
        "uncountedTerminatedPods": {},
        "conditions": [condition("SuccessCriteriaMet"), condition("Complete")],
    }});
    let result = api.patch_status(&job.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await;
    match result {
        Ok(_) => {}
        // The run was cancelled and its Job deleted meanwhile.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("completing Job {}: {e}", job.name_any()),
    }
}

/// How many Segments have an active version, from a watch of them all.
struct ActiveCount {
    store: reflector::Store<Segment>,
}

impl ActiveCount {
    fn start(client: kube::Client) -> ActiveCount {
        let (store, writer) = reflector::store();
        let stream = watcher(Api::<Segment>::all(client), watcher::Config::default()).default_backoff().reflect(writer);
        tokio::spawn(stream.applied_objects().for_each(|_| std::future::ready(())));
        ActiveCount { store }
    }

    fn count(&self) -> usize {
        self.store.state().iter().filter(|s| s.status.as_ref().is_some_and(|s| s.active_version.is_some())).count()
    }
}

/// `segment-operator run` watching every namespace, with the admin's
/// kubeconfig.
struct OperatorProcess {
    child: Child,
    metrics_port: u16,
    log: tempfile::NamedTempFile,
}

impl OperatorProcess {
    fn start(binary: &Path, cluster: &LocalCluster, redis: &RedisServer, s3: &S3Server) -> OperatorProcess {
        let metrics_port = free_port();
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(binary)
            .arg("run")
            .args(["--redis-url", &redis.url(), "--results-uri", "s3://bench-results"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", &cluster.info.kubeconfig)
            .env("RUST_LOG", "warn")
            .envs(s3.env())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("a log handle"))
            .spawn()
            .expect("segment-operator starts");
        OperatorProcess { child, metrics_port, log }
    }

    fn rss(&self) -> u64 {
        process_rss_bytes(&self.child.id().to_string())
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("the operator's status").is_none()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The values of one metric by label set (the text after the name).
    fn metric(&self, name: &str) -> BTreeMap<String, f64> {
        let (_, text) = http_get(self.metrics_port, "/metrics");
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series[name.len()..].to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// Requests sent so far by (verb, resource).
    fn requests(&self) -> BTreeMap<(String, String), f64> {
        let label = |series: &str, key: &str| {
            let start = series.find(&format!("{key}=\""))? + key.len() + 2;
            Some(series[start..].split('"').next()?.to_string())
        };
        self.metric("segment_operator_kube_requests_total")
            .into_iter()
            .filter_map(|(series, count)| Some(((label(&series, "verb")?, label(&series, "resource")?), count)))
            .collect()
    }

    /// Every Segment reconciled at least once and no reconcile running.
    fn reconciled_all(&self, segments: u64) -> bool {
        let reconciles: f64 = self.metric("segment_operator_reconciles_total").values().sum();
        let in_flight: f64 = self.metric("segment_operator_reconciles_in_flight").values().sum();
        reconciles >= segments as f64 && in_flight == 0.0
    }

    /// SIGTERM, and the wait for a clean exit.
    fn stop(&mut self) {
        signal(self.child.id(), Signal::Terminate);
        let status = self.child.wait().expect("the operator exits");
        assert!(status.success(), "the operator exited with {status}:\n{}", self.log_tail());
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
