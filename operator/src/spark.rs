//! Spark runs: the compute of a Segment with `spec.compute.engine: spark`
//! is a `SparkApplication` of the Kubeflow Spark operator
//! (`sparkoperator.k8s.io/v1beta2`) instead of a compute Job. It is named,
//! labelled, owned, timed and deleted like the Job it stands for, so the
//! planner sees one more [`ObservedJob`] and nothing else changes: how it
//! is built from a plan's [`Launch`] and the namespace's ComputeClass
//! ([`build_application`]), and how it reads back ([`observe_application`],
//! [`driver_failure`]). docs/spark.md.
//!
//! The types below hold only the fields the operator sets or reads; serde
//! ignores the rest of what the Spark operator stores.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvFromSource, EnvVar, Pod, PodSecurityContext, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{CustomResource, Resource, ResourceExt};
use segment_core::api::{ComputeClassSpec, ComputeEngine, Segment, SegmentSource, SparkSettings, JOB_KIND_LABEL, VERSION_LABEL};
use segment_core::naming::JobKind;
use segment_core::planner::{JobState, Launch, ObservedJob};
use segment_core::reasons::FailureReason;
use segment_core::task::{Failure, SegmentInput, TASK_ANNOTATION, TASK_FILE, TERMINATION_LOG};
use serde::{Deserialize, Serialize};

use crate::config::JobArgs;
use crate::jobs;
use crate::time::to_chrono;

/// Where the image holds the driver program (the Dockerfile puts it there;
/// `segment-worker spark-driver` prints it).
pub const DRIVER_PROGRAM: &str = "local:///opt/segment-operator/spark/segment_spark.py";
/// The container of the driver pod, as Spark names it.
pub const DRIVER_CONTAINER: &str = "spark-kubernetes-driver";
/// The `activeDeadlineSeconds` a SparkApplication stands under. The Spark
/// operator knows no deadline, so the operator keeps it here and the
/// planner enforces it (it cancels a run past its deadline).
pub const DEADLINE_ANNOTATION: &str = "segmentation.dev/deadline-seconds";

/// A Spark application of the Kubeflow Spark operator.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "sparkoperator.k8s.io",
    version = "v1beta2",
    kind = "SparkApplication",
    namespaced,
    status = "SparkApplicationStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SparkApplicationSpec {
    /// `Python`: the driver program is a Python file.
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub spark_version: String,
    /// `cluster`: spark-submit starts the driver as a pod of its own.
    #[serde(default)]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub main_application_file: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arguments: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spark_conf: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hadoop_conf: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub driver: SparkPodSpec,
    #[serde(default)]
    pub executor: SparkPodSpec,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// The Spark operator deletes the application this long after it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_live_seconds: Option<i64>,
}

/// The driver's or an executor's pod (`SparkPodSpec` with the driver's
/// and executor's own fields this operator uses).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SparkPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overhead: Option<String>,
    /// Executors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RestartPolicy {
    /// `Never`: a failed run is the planner's to retry, as a new version.
    #[serde(rename = "type", default)]
    pub type_: String,
}

/// What the Spark operator reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SparkApplicationStatus {
    #[serde(default)]
    pub application_state: ApplicationState,
    #[serde(default)]
    pub driver_info: DriverInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationState {
    /// `""` (new), `SUBMITTED`, `RUNNING`, `COMPLETED`, `FAILED`,
    /// `SUBMISSION_FAILED`, ... (the Spark operator's `ApplicationStateType`).
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriverInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// Where a SparkApplication is in its life, as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparkState {
    /// The Spark operator has not submitted it yet (no state).
    New,
    /// Submitted or running (or between attempts: the operator's own
    /// states on the way to an end).
    Running,
    Completed,
    Failed,
    /// spark-submit could not start the driver.
    SubmissionFailed,
}

impl SparkState {
    pub fn of(state: &str) -> SparkState {
        match state {
            "" => SparkState::New,
            "COMPLETED" => SparkState::Completed,
            "FAILED" => SparkState::Failed,
            "SUBMISSION_FAILED" => SparkState::SubmissionFailed,
            // SUBMITTED, RUNNING, SUCCEEDING, FAILING, PENDING_RERUN,
            // INVALIDATING, UNKNOWN: not ended yet.
            _ => SparkState::Running,
        }
    }

    pub fn has_ended(self) -> bool {
        matches!(self, SparkState::Completed | SparkState::Failed | SparkState::SubmissionFailed)
    }
}

/// Whether a Segment's compute runs on Spark.
pub fn runs_on_spark(segment: &Segment) -> bool {
    segment.spec.compute.as_ref().is_some_and(|c| c.engine == ComputeEngine::Spark)
}

/// Builds the SparkApplication for the compute `launch` of a Segment whose
/// namespace's class enables Spark (`spark`). Everything but the task and
/// the deadline is the admin's: the class's Spark settings, its Secret,
/// environment and placement, else this operator's flags; nothing of the
/// pods comes from the Segment.
#[allow(clippy::too_many_arguments)]
pub fn build_application(
    segment: &Segment,
    launch: &Launch,
    sources: &[SegmentSource],
    segment_inputs: &[SegmentInput],
    class: &ComputeClassSpec,
    spark: &SparkSettings,
    defaults: &JobArgs,
    results_base: &str,
) -> Result<SparkApplication, serde_json::Error> {
    let key = segment.key();
    let task = jobs::task_json(segment, launch, sources, segment_inputs, class, defaults, results_base)?;
    let labels = jobs::labels(&key.name, launch.version, launch.kind);
    let overrides = segment.spec.compute.clone().unwrap_or_default();
    let deadline = overrides
        .active_deadline_seconds
        .or(class.deadline_seconds)
        .unwrap_or(defaults.job_deadline_seconds)
        .min(class.max_deadline_seconds.unwrap_or(defaults.max_job_deadline_seconds));
    let env_secret = class.env_from_secret.as_ref().or(defaults.worker_env_secret.as_ref());
    let (task_volume, task_mount) = jobs::task_volume();
    let (scratch_volume, scratch_mount) = jobs::scratch_volume(defaults);
    // What driver and executors share: the class's environment (plus the
    // driver's termination log), its Secret, placement and the security
    // every worker pod gets, whatever the class says.
    let pod = SparkPodSpec {
        labels: labels.clone(),
        env: class.env.clone().unwrap_or_default(),
        env_from: env_secret.map(|name| jobs::env_from_secret(name)).into_iter().collect(),
        volume_mounts: vec![scratch_mount],
        node_selector: class.node_selector.clone(),
        tolerations: class.tolerations.clone().unwrap_or_default(),
        pod_security_context: Some(jobs::worker_pod_security_context(spark.run_as_user)),
        security_context: Some(jobs::worker_security_context()),
        ..Default::default()
    };
    let mut driver = SparkPodSpec {
        cores: spark.driver.cores,
        core_limit: spark.driver.core_limit.clone(),
        memory: spark.driver.memory.clone(),
        memory_overhead: spark.driver.memory_overhead.clone(),
        service_account: Some(spark.service_account_name.clone()),
        // The task travels as the driver pod's annotation, shown to it as
        // a file by the downward API, as a compute Job's does.
        annotations: BTreeMap::from([(TASK_ANNOTATION.to_string(), task)]),
        ..pod.clone()
    };
    driver.volume_mounts.push(task_mount);
    // The driver writes its one-line `Reason: message` there.
    driver.env.push(EnvVar {
        name: "SEGMENT_TERMINATION_LOG".to_string(),
        value: Some(TERMINATION_LOG.to_string()),
        ..Default::default()
    });
    let executor = SparkPodSpec {
        instances: spark.executor.instances,
        cores: spark.executor.cores,
        core_limit: spark.executor.core_limit.clone(),
        memory: spark.executor.memory.clone(),
        memory_overhead: spark.executor.memory_overhead.clone(),
        // Executors are started by the driver under its account; they
        // call no API themselves.
        ..pod
    };
    Ok(SparkApplication {
        metadata: ObjectMeta {
            name: Some(launch.job_name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(DEADLINE_ANNOTATION.to_string(), deadline.to_string())])),
            owner_references: segment.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: SparkApplicationSpec {
            type_: "Python".to_string(),
            spark_version: spark.spark_version.clone(),
            mode: "cluster".to_string(),
            image: Some(spark.image.clone()),
            image_pull_policy: spark.image_pull_policy.clone(),
            main_application_file: DRIVER_PROGRAM.to_string(),
            arguments: vec!["--task-file".to_string(), TASK_FILE.to_string()],
            spark_conf: spark.spark_conf.clone(),
            hadoop_conf: spark.hadoop_conf.clone(),
            volumes: vec![scratch_volume, task_volume],
            driver,
            executor,
            restart_policy: RestartPolicy { type_: "Never".to_string() },
            time_to_live_seconds: Some(defaults.job_ttl_seconds.into()),
        },
        status: None,
    })
}

/// Reads a SparkApplication back as the compute Job it stands for; one
/// without our labels is ignored. A failure is the Spark operator's
/// `errorMessage`; the adapter replaces it with what the driver pod says
/// ([`driver_failure`]) for the run in flight.
pub fn observe_application(app: &SparkApplication) -> Option<ObservedJob> {
    let labels = app.metadata.labels.as_ref()?;
    let version = labels.get(VERSION_LABEL)?.parse().ok()?;
    let kind = JobKind::parse(labels.get(JOB_KIND_LABEL)?)?;
    let status = app.status.clone().unwrap_or_default();
    let finished_at = status.termination_time.as_ref().map(to_chrono).unwrap_or_default();
    let error = status.application_state.error_message.clone().unwrap_or_default();
    let state = match SparkState::of(&status.application_state.state) {
        SparkState::New | SparkState::Running => JobState::Running,
        SparkState::Completed => JobState::Succeeded { finished_at },
        SparkState::Failed => JobState::Failed { finished_at, failure: spark_failure(&error, false) },
        SparkState::SubmissionFailed => JobState::Failed { finished_at, failure: spark_failure(&error, true) },
    };
    let mut observed = ObservedJob::new(app.name_any(), version, kind, state);
    observed.created_at = app.metadata.creation_timestamp.as_ref().map(to_chrono);
    observed.deadline = app.annotations().get(DEADLINE_ANNOTATION).and_then(|s| s.parse().ok()).map(chrono::Duration::seconds);
    Some(observed)
}

/// The Spark operator's `errorMessage` as a typed failure: a
/// `Reason: message` of the driver's when it is one, else the message
/// under the reason a Job would have failed with.
fn spark_failure(error: &str, at_submission: bool) -> Failure {
    let known = Failure::from_termination_message(error).filter(|f| f.reason != FailureReason::WorkerFailed);
    known.unwrap_or_else(|| match at_submission {
        true => Failure::new(FailureReason::PodNotCreated, format!("spark-submit could not start the driver: {error}")),
        false => Failure::new(FailureReason::JobFailed, format!("the Spark application failed: {error}")),
    })
}

/// The name of the application's driver pod: the Spark operator's report,
/// else the name it gives drivers.
pub fn driver_pod_name(app: &SparkApplication) -> String {
    let reported = app.status.as_ref().and_then(|s| s.driver_info.pod_name.clone());
    reported.unwrap_or_else(|| format!("{}-driver", app.name_any()))
}

/// Why the driver pod failed, from what the kubelet recorded: its own
/// reasons (out of memory, eviction) win over the termination message,
/// which the driver writes as `Reason: message`.
pub fn driver_failure(pod: &Pod) -> Option<Failure> {
    let status = pod.status.as_ref()?;
    if let Some(reason) = status.reason.as_deref().filter(|r| !r.is_empty()) {
        return Some(Failure::new(FailureReason::PodFailed, format!("the Spark driver was ended by the kubelet: {reason}")));
    }
    let containers = status.container_statuses.iter().flatten().filter(|c| c.name == DRIVER_CONTAINER);
    let terminated = containers.filter_map(|c| c.state.as_ref()?.terminated.as_ref()).next()?;
    match terminated.reason.as_deref() {
        Some("OOMKilled") => Some(Failure::new(
            FailureReason::OutOfMemory,
            "the Spark driver was killed for going over its memory; the ComputeClass's spark.driver.memory and \
             memoryOverhead set it",
        )),
        _ => terminated.message.as_deref().filter(|m| !m.trim().is_empty()).and_then(Failure::from_termination_message),
    }
}

/// Why an application older than the pod start timeout has not started:
/// the Spark operator never took it up, or its driver pod waits.
pub fn start_problem(app: &SparkApplication, driver: Option<&Pod>) -> Option<Failure> {
    let state = SparkState::of(&app.status.as_ref().map(|s| s.application_state.state.clone()).unwrap_or_default());
    match (state, driver) {
        (SparkState::New, _) => Some(Failure::new(
            FailureReason::PodNotCreated,
            "the Spark operator has not submitted the SparkApplication: is it installed, running and watching this namespace?",
        )),
        (SparkState::Running, Some(pod)) if !is_running(pod) => jobs::start_problem(std::slice::from_ref(pod)),
        (SparkState::Running, None) => {
            Some(Failure::new(FailureReason::PodNotCreated, "spark-submit has not created the driver pod"))
        }
        _ => None,
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|phase| phase != "Pending")
}

/// Whether a compute application still holds its compute slot.
pub fn is_active(app: &SparkApplication) -> bool {
    !SparkState::of(&app.status.as_ref().map(|s| s.application_state.state.clone()).unwrap_or_default()).has_ended()
}

/// Keeps of a watched application what a reconcile reads (labels, owner,
/// deadline, status), and drops the spec, whose task annotation holds
/// the whole definition.
pub fn trim_for_cache(app: &mut SparkApplication) {
    app.metadata.managed_fields = None;
    app.spec = Default::default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn defaults() -> JobArgs {
        JobArgs { worker_env_secret: Some("segment-credentials".into()), ..crate::jobs::tests::defaults() }
    }

    fn launch() -> Launch {
        Launch {
            kind: JobKind::Compute,
            version: 4,
            job_name: segment_core::naming::job_name("vip", 4, JobKind::Compute),
            snapshot_time: chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            definition_hash: "abc".into(),
            generation: 2,
        }
    }

    fn class() -> ComputeClassSpec {
        serde_yaml::from_str(
            r#"
image: worker:class
envFromSecret: growth-lake
env: [{name: RUST_LOG, value: debug}]
nodeSelector: {pool: batch}
maxDeadlineSeconds: 5400
spark:
  image: spark:class
  sparkVersion: 4.0.1
  serviceAccountName: spark-driver
  runAsUser: 185
  driver: {cores: 1, memory: 1g}
  executor: {instances: 3, cores: 2, memory: 4g, memoryOverhead: 1g}
  sparkConf: {spark.sql.shuffle.partitions: "64"}
  hadoopConf: {fs.s3a.path.style.access: "true"}
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_application_is_the_classs_and_the_segment_chooses_only_the_deadline() {
        // A tenant's Segment: fields it may no longer write are pruned by
        // the API server; here they are ignored.
        let segment: Segment = serde_yaml::from_str(
            r#"
metadata: {name: vip, namespace: growth, uid: u1}
spec:
  definition: {sql: SELECT user_id FROM orders}
  compute:
    engine: spark
    image: attacker:1
    sparkConf: {spark.kubernetes.container.image: attacker:1}
    serviceAccountName: admin
    resources: {requests: {cpu: "64"}}
    activeDeadlineSeconds: 9000
"#,
        )
        .unwrap();
        assert!(runs_on_spark(&segment));
        let class = class();
        let app = build_application(&segment, &launch(), &[], &[], &class, class.spark.as_ref().unwrap(), &defaults(), "s3://r")
            .unwrap();
        assert_eq!(app.metadata.name.as_deref(), Some("vip-v4-compute"), "the compute Job's name");
        assert_eq!(app.metadata.namespace.as_deref(), Some("growth"));
        assert_eq!(app.metadata.owner_references.as_ref().unwrap()[0].kind, "Segment");
        assert_eq!(app.labels(), &jobs::labels("vip", 4, JobKind::Compute));
        assert_eq!(app.annotations()[DEADLINE_ANNOTATION], "5400", "capped by the class");
        let spec = &app.spec;
        assert_eq!((spec.type_.as_str(), spec.mode.as_str()), ("Python", "cluster"));
        assert_eq!(spec.image.as_deref(), Some("spark:class"));
        assert_eq!(spec.spark_version, "4.0.1");
        assert_eq!(spec.main_application_file, DRIVER_PROGRAM);
        assert_eq!(spec.arguments, ["--task-file", TASK_FILE]);
        assert_eq!(spec.spark_conf, BTreeMap::from([("spark.sql.shuffle.partitions".into(), "64".into())]));
        assert_eq!(spec.restart_policy.type_, "Never");
        assert_eq!(spec.time_to_live_seconds, Some(600));
        let (driver, executor) = (&spec.driver, &spec.executor);
        assert_eq!(driver.service_account.as_deref(), Some("spark-driver"));
        assert_eq!((driver.cores, driver.memory.as_deref()), (Some(1), Some("1g")));
        assert_eq!((executor.instances, executor.cores, executor.memory.as_deref()), (Some(3), Some(2), Some("4g")));
        assert_eq!(executor.memory_overhead.as_deref(), Some("1g"));
        for pod in [driver, executor] {
            assert_eq!(pod.env_from[0].secret_ref.as_ref().unwrap().name, "growth-lake", "the class's Secret");
            assert_eq!(pod.env[0].name, "RUST_LOG");
            assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "batch");
            let pod_context = pod.pod_security_context.as_ref().unwrap();
            assert_eq!((pod_context.run_as_non_root, pod_context.run_as_user), (Some(true), Some(185)));
            let context = pod.security_context.as_ref().unwrap();
            assert_eq!((context.read_only_root_filesystem, context.allow_privilege_escalation), (Some(true), Some(false)));
        }
        // The task: an annotation of the driver, shown as a file.
        let task: serde_json::Value = serde_json::from_str(&driver.annotations[TASK_ANNOTATION]).unwrap();
        assert_eq!((task["engine"].as_str(), task["version"].as_u64()), (Some("spark"), Some(4)));
        let mount = driver.volume_mounts.iter().find(|m| m.name == jobs::TASK_VOLUME).unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (segment_core::task::TASK_DIR, Some(true)));
        assert!(spec.volumes.iter().any(|v| v.name == jobs::TASK_VOLUME && v.downward_api.is_some()));
        assert!(executor.annotations.is_empty() && executor.service_account.is_none(), "executors need neither");
        // Nothing of what the tenant wrote.
        let text = serde_json::to_string(&app).unwrap();
        assert!(!text.contains("attacker") && !text.contains("\"admin\""), "{text}");
    }

    #[test]
    fn without_a_class_secret_the_pods_get_the_operators() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: vip, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n  compute: {engine: spark}\n",
        )
        .unwrap();
        let class = ComputeClassSpec { env_from_secret: None, ..class() };
        let app = build_application(&segment, &launch(), &[], &[], &class, class.spark.as_ref().unwrap(), &defaults(), "s3://r")
            .unwrap();
        assert_eq!(app.spec.driver.env_from[0].secret_ref.as_ref().unwrap().name, "segment-credentials");
        assert_eq!(app.annotations()[DEADLINE_ANNOTATION], "3600");
    }

    fn app(status: serde_json::Value) -> SparkApplication {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
            "metadata": {"name": "vip-v4-compute", "namespace": "growth", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": jobs::labels("vip", 4, JobKind::Compute), "annotations": {DEADLINE_ANNOTATION: "900"}},
            "spec": {"type": "Python", "sparkVersion": "4.0.1", "mainApplicationFile": DRIVER_PROGRAM,
                "driver": {}, "executor": {}, "someFieldOfTheSparkOperator": {"kept": "by the server"}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn the_application_state_reads_back_as_a_job_state() {
        let ended = chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 5, 0).unwrap();
        let running = observe_application(&app(serde_json::json!({"applicationState": {"state": "RUNNING"}}))).unwrap();
        assert_eq!((running.version, running.kind, running.state), (4, JobKind::Compute, JobState::Running));
        assert_eq!(running.deadline, Some(chrono::Duration::seconds(900)), "the planner enforces the deadline");
        assert!(running.created_at.is_some());
        let new = observe_application(&app(serde_json::json!({"driverInfo": {}}))).unwrap();
        assert_eq!(new.state, JobState::Running);
        let done = observe_application(&app(serde_json::json!({"applicationState": {"state": "COMPLETED"},
            "terminationTime": "2026-01-01T00:05:00Z"})))
        .unwrap();
        assert_eq!(done.state, JobState::Succeeded { finished_at: ended });
        let failed = observe_application(&app(serde_json::json!({"applicationState": {"state": "FAILED",
            "errorMessage": "driver container failed with ExitCode: 1, Reason: Error"}, "terminationTime": "2026-01-01T00:05:00Z"})))
        .unwrap();
        let JobState::Failed { failure, finished_at } = failed.state else { panic!("{:?}", failed.state) };
        assert_eq!((failure.reason, finished_at), (FailureReason::JobFailed, ended));
        assert!(failure.message.contains("ExitCode: 1"), "{}", failure.message);
        let submission = observe_application(&app(serde_json::json!({"applicationState": {"state": "SUBMISSION_FAILED",
            "errorMessage": "serviceaccounts \"spark\" not found"}})))
        .unwrap();
        let JobState::Failed { failure, .. } = submission.state else { panic!() };
        assert_eq!(failure.reason, FailureReason::PodNotCreated);
        // The driver's own reason, when the error message is one.
        let typed = observe_application(&app(
            serde_json::json!({"applicationState": {"state": "FAILED", "errorMessage": "UnknownColumn: column `x` of `orders`"}}),
        ))
        .unwrap();
        let JobState::Failed { failure, .. } = typed.state else { panic!() };
        assert_eq!(failure, Failure::new(FailureReason::UnknownColumn, "column `x` of `orders`"));
        // Trimmed for the cache, it reads back the same.
        let mut trimmed = app(serde_json::json!({"applicationState": {"state": "RUNNING"}}));
        trimmed.spec.driver.annotations.insert(TASK_ANNOTATION.into(), "{}".into());
        let before = observe_application(&trimmed);
        trim_for_cache(&mut trimmed);
        assert_eq!(observe_application(&trimmed), before);
        assert!(trimmed.spec.driver.annotations.is_empty());
    }

    fn driver(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "vip-v4-compute-driver"}, "status": status})).unwrap()
    }

    #[test]
    fn the_drivers_termination_message_is_the_failure() {
        let terminated = |reason: &str, message: &str| {
            driver(serde_json::json!({"phase": "Failed", "containerStatuses": [{"name": DRIVER_CONTAINER, "image": "spark",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": reason, "message": message}}}]}))
        };
        let failure = driver_failure(&terminated("Error", "UnknownColumn: column `nope` is not in table `users`\n")).unwrap();
        assert_eq!(failure, Failure::new(FailureReason::UnknownColumn, "column `nope` is not in table `users`"));
        assert_eq!(driver_failure(&terminated("OOMKilled", "row u42 ...")).unwrap().reason, FailureReason::OutOfMemory);
        assert_eq!(driver_failure(&terminated("Error", "")), None, "the Spark operator's message stands");
        let evicted = driver(serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "low on disk"}));
        assert_eq!(driver_failure(&evicted).unwrap().reason, FailureReason::PodFailed);
    }

    #[test]
    fn an_application_that_has_not_started_says_why() {
        let new = app(serde_json::json!({}));
        assert_eq!(start_problem(&new, None).unwrap().reason, FailureReason::PodNotCreated);
        assert!(is_active(&new));
        let submitted = app(serde_json::json!({"applicationState": {"state": "SUBMITTED"}}));
        assert_eq!(start_problem(&submitted, None).unwrap().reason, FailureReason::PodNotCreated);
        let pulling = driver(serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": DRIVER_CONTAINER,
            "image": "spark:class", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}));
        assert_eq!(start_problem(&submitted, Some(&pulling)).unwrap().reason, FailureReason::ImagePullFailed);
        let running = driver(serde_json::json!({"phase": "Running"}));
        assert_eq!(start_problem(&submitted, Some(&running)), None);
        let completed = app(serde_json::json!({"applicationState": {"state": "COMPLETED"}}));
        assert!(!is_active(&completed));
        assert_eq!(driver_pod_name(&completed), "vip-v4-compute-driver");
    }
}
