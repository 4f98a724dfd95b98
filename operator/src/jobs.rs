//! The compute and ingest Jobs: how they are built from a plan's
//! [`Launch`], and how a Job read back from the cluster becomes an
//! [`ObservedJob`] for the planner.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvFromSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecretEnvSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use segment_core::api::{
    ComputeClassSpec, CpuMemory, Segment, SegmentSource, WorkerResources, JOB_KIND_LABEL, SEGMENT_LABEL, SEGMENT_NAMESPACE_LABEL,
    VERSION_LABEL,
};
use segment_core::naming::JobKind;
use segment_core::planner::{JobState, Launch, ObservedJob};
use segment_core::reasons::FailureReason;
use segment_core::task::{
    compute_task, ingest_task, sources_read, Failure, SegmentInput, TASK_ANNOTATION, TASK_DIR, TASK_FILE, TERMINATION_LOG,
};

use crate::config::JobArgs;
use crate::time::to_chrono;

pub const CONTAINER: &str = "worker";
/// The worker's root filesystem is read-only; sorts and aggregations that
/// outgrow memory spill to the OS temp dir, an emptyDir mounted there.
pub const SCRATCH_VOLUME: &str = "scratch";
pub const SCRATCH_PATH: &str = "/tmp";
/// The downward API volume that shows the pod's task annotation as a file.
pub const TASK_VOLUME: &str = "task";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "segment-operator");

/// Labels on every Job (and its pods) of one run.
pub fn labels(segment: &str, version: u64, kind: JobKind) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SEGMENT_LABEL.to_string(), segment_core::naming::segment_label_value(segment)),
        (VERSION_LABEL.to_string(), version.to_string()),
        (JOB_KIND_LABEL.to_string(), kind.as_str().to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
    ])
}

/// The task of `launch` as JSON: the value of the pod annotation
/// [`TASK_ANNOTATION`] of a compute or ingest Job, or of a Spark run's
/// driver (`crate::spark`). Sources are resolved now, so the worker needs
/// no access to the Kubernetes API.
pub fn task_json(
    segment: &Segment,
    launch: &Launch,
    sources: &[SegmentSource],
    segment_inputs: &[SegmentInput],
    class: &ComputeClassSpec,
    defaults: &JobArgs,
    results_base: &str,
) -> Result<String, serde_json::Error> {
    match launch.kind {
        JobKind::Compute => {
            let sources = sources_read(&segment.spec.definition, sources.iter().map(|s| &s.spec)).into_iter().cloned().collect();
            let task = compute_task(segment, launch, sources, segment_inputs.to_vec(), results_base);
            // The catalogs of Iceberg sources are the class's, resolved now.
            serde_json::to_string(&task.with_iceberg_access(class, results_base))
        }
        JobKind::Ingest => {
            let lake_lag = chrono::Duration::seconds(defaults.lake_lag_seconds);
            serde_json::to_string(&ingest_task(segment, launch, results_base, lake_lag))
        }
    }
}

/// The downward API volume that shows the pod's [`TASK_ANNOTATION`] as
/// the file [`TASK_FILE`], and its read-only mount at [`TASK_DIR`].
pub fn task_volume() -> (Volume, VolumeMount) {
    let volume = Volume {
        name: TASK_VOLUME.to_string(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: TASK_FILE.rsplit('/').next().unwrap_or("task.json").to_string(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{TASK_ANNOTATION}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: TASK_VOLUME.to_string(),
        mount_path: TASK_DIR.to_string(),
        read_only: Some(true),
        ..Default::default()
    };
    (volume, mount)
}

/// The worker's scratch emptyDir at [`SCRATCH_PATH`] (`--worker-scratch-size-limit`),
/// the one place it writes under its read-only root, and its mount.
pub fn scratch_volume(defaults: &JobArgs) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: SCRATCH_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(defaults.worker_scratch_size_limit.clone())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = VolumeMount { name: SCRATCH_VOLUME.to_string(), mount_path: SCRATCH_PATH.to_string(), ..Default::default() };
    (volume, mount)
}

/// The container security every worker (compute, ingest, Spark driver and
/// executors) gets, whatever its class says: non-root, a read-only root,
/// no capabilities, no privilege escalation (docs/security.md).
pub fn worker_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), ..Default::default() }),
        ..Default::default()
    }
}

/// The pod security every worker gets: non-root (as `run_as_user` when
/// the class names one), the runtime's seccomp profile.
pub fn worker_pod_security_context(run_as_user: Option<i64>) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user,
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_string(), ..Default::default() }),
        ..Default::default()
    }
}

/// The environment a worker gets from a Secret (its S3 credentials).
pub fn env_from_secret(name: &str) -> EnvFromSource {
    EnvFromSource { secret_ref: Some(SecretEnvSource { name: name.to_string(), optional: Some(false) }), ..Default::default() }
}

/// Builds the Job for `launch`. Sources are resolved now so the worker
/// needs no access to the Kubernetes API.
pub fn build_job(
    segment: &Segment,
    launch: &Launch,
    sources: &[SegmentSource],
    segment_inputs: &[SegmentInput],
    class: &ComputeClassSpec,
    defaults: &JobArgs,
    results_base: &str,
) -> Result<Job, serde_json::Error> {
    let key = segment.key();
    let task = task_json(segment, launch, sources, segment_inputs, class, defaults, results_base)?;
    let mut overrides = segment.spec.compute.clone().unwrap_or_default();
    let mut labels = labels(&key.name, launch.version, launch.kind);
    // An ingest Job in the ingest namespace is the admin's alone: this
    // operator's flags and the ingest Secret, none of the tenant's class,
    // resources or Secret (docs/security.md, "Credentials per namespace").
    let ingest_namespace = defaults.ingest_namespace.as_ref().filter(|_| launch.kind == JobKind::Ingest);
    let no_class = ComputeClassSpec::default();
    let (class, env_secret) = match ingest_namespace {
        Some(_) => {
            labels.insert(SEGMENT_NAMESPACE_LABEL.to_string(), key.namespace.clone());
            overrides.resources = None;
            (&no_class, defaults.ingest_env_secret.as_ref())
        }
        None => (class, class.env_from_secret.as_ref().or(defaults.worker_env_secret.as_ref())),
    };

    // Everything of the pod but the resources and the deadline is the
    // admin's: the namespace's ComputeClass, else this operator's flags.
    let env = class.env.clone().unwrap_or_default();
    let env_from = env_secret.map(|name| vec![env_from_secret(name)]);
    let chosen = overrides.resources.as_ref().or(class.default_resources.as_ref());
    let resources = match chosen {
        Some(WorkerResources { requests, limits }) => ResourceRequirements {
            requests: requests.as_ref().map(CpuMemory::by_name),
            limits: limits.as_ref().map(CpuMemory::by_name),
            ..Default::default()
        },
        None => ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(defaults.worker_cpu_request.clone())),
                ("memory".to_string(), Quantity(defaults.worker_memory_request.clone())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity(defaults.worker_memory_limit.clone()))])),
            ..Default::default()
        },
    };
    let deadline = overrides
        .active_deadline_seconds
        .or(class.deadline_seconds)
        .unwrap_or(defaults.job_deadline_seconds)
        .min(class.max_deadline_seconds.unwrap_or(defaults.max_job_deadline_seconds));

    let (task_files, task_mount) = task_volume();
    let (scratch, scratch_mount) = scratch_volume(defaults);
    let container = Container {
        name: CONTAINER.to_string(),
        image: Some(class.image.clone().unwrap_or_else(|| defaults.worker_image.clone())),
        args: Some(vec![launch.kind.as_str().to_string(), "--task-file".to_string(), TASK_FILE.to_string()]),
        env: Some(env),
        env_from,
        resources: Some(resources),
        volume_mounts: Some(vec![scratch_mount, task_mount]),
        termination_message_path: Some(TERMINATION_LOG.to_string()),
        // The worker writes `Reason: message` there; when it crashes before
        // that, the log tail is the next best explanation.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(worker_security_context()),
        ..Default::default()
    };

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(launch.job_name.clone()),
            namespace: Some(ingest_namespace.unwrap_or(&key.namespace).clone()),
            labels: Some(labels.clone()),
            // An owner must be in the Job's namespace: an ingest Job in the
            // ingest namespace has none, and the Segment's cleanup deletes it.
            owner_references: match ingest_namespace {
                Some(_) => None,
                None => segment.controller_owner_ref(&()).map(|r| vec![r]),
            },
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(defaults.job_backoff_limit),
            ttl_seconds_after_finished: Some(defaults.job_ttl_seconds),
            active_deadline_seconds: Some(deadline),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(TASK_ANNOTATION.to_string(), task)])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_string()),
                    service_account_name: Some(
                        class.service_account_name.clone().unwrap_or_else(|| defaults.worker_service_account.clone()),
                    ),
                    // The worker never calls the Kubernetes API.
                    automount_service_account_token: Some(class.automount_service_account_token),
                    node_selector: class.node_selector.clone(),
                    tolerations: class.tolerations.clone(),
                    security_context: Some(worker_pod_security_context(None)),
                    containers: vec![container],
                    volumes: Some(vec![scratch, task_files]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The namespace of the Segment a Job runs for: the Job's own, except in
/// the ingest namespace, where its label says. The label is trusted there
/// only: a tenant can create Jobs with any labels in its own namespace, and
/// must not pass one off as another namespace's.
pub fn segment_namespace<'a>(job: &'a Job, ingest_namespace: Option<&str>) -> Option<&'a str> {
    let namespace = job.metadata.namespace.as_deref();
    match ingest_namespace {
        Some(ingest) if namespace == Some(ingest) => job.labels().get(SEGMENT_NAMESPACE_LABEL).map(String::as_str),
        _ => namespace,
    }
}

/// Reads a Job of a segment back; Jobs without our labels are ignored. A
/// failure is the Job controller's; the adapter replaces it with what the
/// pods say ([`pod_failure`]) for the run in flight.
pub fn observe_job(job: &Job) -> Option<ObservedJob> {
    let labels = job.metadata.labels.as_ref()?;
    let version = labels.get(VERSION_LABEL)?.parse().ok()?;
    let kind = JobKind::parse(labels.get(JOB_KIND_LABEL)?)?;
    let status = job.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let condition = |type_: &str| conditions.iter().find(|c| c.type_ == type_ && c.status == "True");
    let state = if let Some(done) = condition("Complete") {
        let at = status.completion_time.as_ref().or(done.last_transition_time.as_ref());
        JobState::Succeeded { finished_at: at.map(to_chrono).unwrap_or_default() }
    } else if let Some(failed) = condition("Failed") {
        let failure = Failure::from_job_condition(failed.reason.as_deref(), failed.message.as_deref());
        JobState::Failed { finished_at: failed.last_transition_time.as_ref().map(to_chrono).unwrap_or_default(), failure }
    } else {
        JobState::Running
    };
    let mut observed = ObservedJob::new(job.name_any(), version, kind, state);
    observed.created_at = job.metadata.creation_timestamp.as_ref().map(to_chrono);
    observed.deadline = job.spec.as_ref().and_then(|s| s.active_deadline_seconds).map(chrono::Duration::seconds);
    Some(observed)
}

/// Keeps of a watched Job what a reconcile reads (labels, owner, deadline,
/// status) and drops the rest before it enters the watch cache: the pod
/// template, whose task annotation holds the whole definition, is most of
/// a Job's size, and the cache holds every Job for its TTL.
pub fn trim_for_cache(job: &mut Job) {
    job.metadata.managed_fields = None;
    job.metadata.annotations = None;
    if let Some(spec) = job.spec.as_mut() {
        spec.template = Default::default();
        spec.selector = None;
    }
}

/// Whether a running Job has a pod running (or done): before that, its
/// pods are worth a look to say why it has not started.
pub fn has_started(job: &Job) -> bool {
    let status = job.status.as_ref();
    let count = |n: Option<i32>| n.unwrap_or(0) > 0;
    status.is_some_and(|s| count(s.ready) || count(s.succeeded) || count(s.failed))
}

/// Why the pods of a failed Job failed, from what the kubelet recorded:
/// its own reasons (out of memory, eviction) win over the termination
/// message, which for those holds only a log tail.
pub fn pod_failure(pods: &[Pod]) -> Option<Failure> {
    let mut message = None;
    for pod in pods {
        let status = pod.status.as_ref();
        if let Some(reason) = status.and_then(|s| s.reason.as_deref()).filter(|r| !r.is_empty()) {
            return Some(Failure::new(FailureReason::PodFailed, format!("the pod was ended by the kubelet: {reason}")));
        }
        let containers = status.and_then(|s| s.container_statuses.as_ref()).into_iter().flatten();
        for terminated in containers.filter(|c| c.name == CONTAINER).filter_map(|c| c.state.as_ref()?.terminated.as_ref()) {
            match terminated.reason.as_deref() {
                Some("OOMKilled") => {
                    return Some(Failure::new(
                        FailureReason::OutOfMemory,
                        "the worker was killed for going over its memory limit; raise spec.compute.resources.limits.memory",
                    ))
                }
                Some("Error" | "Completed") | None => {
                    message = message.or_else(|| terminated.message.clone().filter(|m| !m.trim().is_empty()));
                }
                Some(other) => {
                    return Some(Failure::new(
                        FailureReason::PodFailed,
                        format!("the kubelet ended the worker: {other} (exit code {})", terminated.exit_code),
                    ))
                }
            }
        }
    }
    message.as_deref().and_then(Failure::from_termination_message)
}

/// Why a Job's pod has not started: the container waits on its image or
/// its configuration, or the scheduler found no node. `None` when the
/// pods show no reason (or there are none: see [`not_created`]).
pub fn start_problem(pods: &[Pod]) -> Option<Failure> {
    for pod in pods {
        let status = pod.status.as_ref();
        let waiting = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c.image.clone(), c.state.as_ref()?.waiting.clone()?)));
        for (image, waiting) in waiting {
            let detail = waiting.message.unwrap_or_default();
            match waiting.reason.as_deref() {
                Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull") => {
                    return Some(Failure::new(
                        FailureReason::ImagePullFailed,
                        format!("image {image} could not be pulled: {detail}"),
                    ))
                }
                Some("CreateContainerConfigError" | "CreateContainerError") => {
                    return Some(Failure::new(FailureReason::ContainerConfigError, detail))
                }
                _ => {}
            }
        }
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
        if let Some(condition) = unschedulable {
            return Some(Failure::new(FailureReason::Unschedulable, condition.message.clone().unwrap_or_default()));
        }
    }
    None
}

/// A Job that has no pod at all: the Job controller's `FailedCreate`
/// message (a missing ServiceAccount, a quota) says why.
pub fn not_created(failed_create: Option<String>) -> Failure {
    Failure::new(
        FailureReason::PodNotCreated,
        failed_create.unwrap_or_else(|| "the Job controller created no pod for the Job".to_string()),
    )
}

/// Whether a Job has neither completed nor failed (it holds a compute slot).
pub fn is_active(job: &Job) -> bool {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    !conditions.is_some_and(|cs| cs.iter().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The operator's flags at their defaults, with no worker Secret.
    pub(crate) fn defaults() -> JobArgs {
        JobArgs {
            worker_image: "worker:1".into(),
            worker_service_account: "segment-worker".into(),
            worker_env_secret: None,
            default_compute_class: None,
            ingest_namespace: None,
            ingest_env_secret: None,
            job_ttl_seconds: 600,
            job_backoff_limit: 1,
            job_deadline_seconds: 3600,
            pod_start_timeout_seconds: 300,
            lake_lag_seconds: 3600,
            max_job_deadline_seconds: 7200,
            worker_cpu_request: "250m".into(),
            worker_memory_request: "512Mi".into(),
            worker_memory_limit: "2Gi".into(),
            worker_scratch_size_limit: "10Gi".into(),
        }
    }

    fn launch(name: &str) -> Launch {
        Launch {
            kind: JobKind::Compute,
            version: 4,
            job_name: segment_core::naming::job_name(name, 4, JobKind::Compute),
            snapshot_time: chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            definition_hash: "abc".into(),
            generation: 2,
        }
    }

    #[test]
    fn the_pod_is_the_compute_classs_and_the_segment_chooses_only_resources_and_deadline() {
        // What a tenant may still write about its Jobs, and fields it no
        // longer may (the API server prunes them; here they are ignored).
        let segment: Segment = serde_yaml::from_str(
            r#"
metadata: {name: vip, namespace: growth, uid: u1}
spec:
  definition: {sql: SELECT user_id FROM orders}
  compute:
    image: attacker:1
    serviceAccountName: admin
    env: [{name: TASK, value: '{}'}]
    nodeSelector: {pool: gpu}
    resources: {requests: {cpu: "2"}, limits: {memory: 8Gi}}
    activeDeadlineSeconds: 9000
"#,
        )
        .unwrap();
        let class: ComputeClassSpec = serde_yaml::from_str(
            r#"
image: worker:class
serviceAccountName: lake-reader
env: [{name: RUST_LOG, value: debug}]
envFromSecret: growth-lake
nodeSelector: {pool: batch}
tolerations: [{key: batch, operator: Exists, effect: NoSchedule}]
maxDeadlineSeconds: 5400
"#,
        )
        .unwrap();
        let job = build_job(&segment, &launch("vip"), &[], &[], &class, &defaults(), "s3://r").unwrap();
        let spec = job.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(5400), "capped by the class");
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("lake-reader"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.node_selector.unwrap()["pool"], "batch");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("batch"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("worker:class"));
        assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0, "2");
        let env: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(env, vec!["RUST_LOG"]);
        let secret = c.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap();
        assert_eq!(secret.name, "growth-lake");
    }

    /// With an ingest namespace, the ingest Job runs there with the
    /// ingest Secret and nothing of the tenant's: a tenant reading its own
    /// namespace's Secrets never sees the store's credentials.
    #[test]
    fn an_ingest_job_in_the_ingest_namespace_is_the_admins_alone() {
        let segment: Segment = serde_yaml::from_str(
            r#"
metadata: {name: vip, namespace: growth, uid: u1}
spec:
  definition: {sql: SELECT user_id FROM orders}
  compute: {resources: {requests: {cpu: "2"}}}
"#,
        )
        .unwrap();
        let class: ComputeClassSpec =
            serde_yaml::from_str("{image: 'worker:class', envFromSecret: growth-lake, env: [{name: RUST_LOG, value: debug}], nodeSelector: {pool: batch}}")
                .unwrap();
        let defaults = JobArgs {
            ingest_namespace: Some("segment-system".into()),
            ingest_env_secret: Some("segment-ingest".into()),
            worker_env_secret: Some("segment-credentials".into()),
            ..defaults()
        };
        let key = segment.key();
        let ingest = Launch {
            kind: JobKind::Ingest,
            job_name: segment_core::naming::run_job_name(&key, 4, JobKind::Ingest),
            ..launch("vip")
        };
        let job = build_job(&segment, &ingest, &[], &[], &class, &defaults, "s3://r").unwrap();
        assert_eq!(job.metadata.namespace.as_deref(), Some("segment-system"));
        assert_eq!(job.metadata.owner_references, None, "an owner must share the Job's namespace");
        assert_eq!(segment_namespace(&job, Some("segment-system")), Some("growth"));
        // The same label on a Job a tenant made in its own namespace names
        // that namespace, whatever it says.
        let mut forged = job.clone();
        forged.metadata.namespace = Some("finance".into());
        assert_eq!(segment_namespace(&forged, Some("segment-system")), Some("finance"));
        assert_eq!(segment_namespace(&job, None), Some("segment-system"), "no ingest namespace: no label is trusted");
        assert_eq!(job.labels()[SEGMENT_LABEL], "vip");
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector, None, "none of the tenant's class");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("worker:1"));
        assert_eq!(c.env.as_deref(), Some(&[][..]));
        assert_eq!(c.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "segment-ingest");
        assert_eq!(
            c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
            "250m",
            "the operator's, not the Segment's"
        );

        // The compute Job stays in the Segment's namespace with its class.
        let compute = build_job(&segment, &launch("vip"), &[], &[], &class, &defaults, "s3://r").unwrap();
        assert_eq!(compute.metadata.namespace.as_deref(), Some("growth"));
        assert!(compute.metadata.owner_references.is_some());
        assert!(!compute.labels().contains_key(SEGMENT_NAMESPACE_LABEL));
        let container = &compute.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(container.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "growth-lake");
    }

    #[test]
    fn without_a_class_the_pod_is_the_operators_defaults_with_no_token() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: vip, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n",
        )
        .unwrap();
        let job = build_job(&segment, &launch("vip"), &[], &[], &ComputeClassSpec::default(), &defaults(), "s3://r").unwrap();
        let spec = job.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("segment-worker"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("worker:1"));
        assert_eq!(c.env.as_deref(), Some(&[][..]));
        assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0, "250m");
        // Whatever the class: non-root, read-only root, no capabilities,
        // no privilege escalation, the runtime's seccomp profile.
        let pod_context = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_context.run_as_non_root, Some(true));
        assert_eq!(pod_context.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
        let context = c.security_context.as_ref().unwrap();
        assert_eq!((context.run_as_non_root, context.read_only_root_filesystem), (Some(true), Some(true)));
        assert_eq!(context.allow_privilege_escalation, Some(false));
        assert_eq!(context.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
    }

    #[test]
    fn the_task_names_only_the_tables_the_definition_reads_and_travels_in_a_file() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: vip, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n",
        )
        .unwrap();
        let sources: Vec<SegmentSource> = ["orders", "users", "app_events"]
            .iter()
            .map(|table| {
                serde_yaml::from_str(&format!(
                    "metadata: {{name: {table}, namespace: growth}}\nspec: {{table: {table}, uri: 's3://lake/{table}/', format: parquet}}\n"
                ))
                .unwrap()
            })
            .collect();
        let job =
            build_job(&segment, &launch("vip"), &sources, &[], &ComputeClassSpec::default(), &defaults(), "s3://r").unwrap();
        let template = job.spec.unwrap().template;
        let task: serde_json::Value =
            serde_json::from_str(&template.metadata.unwrap().annotations.unwrap()[TASK_ANNOTATION]).unwrap();
        let tables: Vec<&str> = task["sources"].as_array().unwrap().iter().map(|s| s["table"].as_str().unwrap()).collect();
        assert_eq!(tables, ["orders"]);
        let pod = template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(args, ["compute", "--task-file", TASK_FILE]);
        let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == TASK_VOLUME).unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (TASK_DIR, Some(true)));
    }

    /// An Iceberg source's catalog is resolved from the class into the
    /// task, with the namespace's prefixes: the worker reads the catalog
    /// the admin declared, never an address from the Segment's side.
    #[test]
    fn the_task_of_an_iceberg_source_carries_the_classs_catalog_and_prefixes() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: vip, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n",
        )
        .unwrap();
        let sources: Vec<SegmentSource> = vec![serde_yaml::from_str(
            "metadata: {name: orders, namespace: growth}\nspec: {table: orders, uri: 'iceberg://lake/sales/orders', format: iceberg}\n",
        )
        .unwrap()];
        let class: ComputeClassSpec = serde_yaml::from_str(
            "allowedSourcePrefixes: ['s3://lake/{namespace}/']\nicebergCatalogs:\n- {name: lake, type: rest, uri: 'https://catalog.internal/', tokenEnv: LAKE_TOKEN}\n- {name: unused, type: sql, uri: 'sqlite:///c.db'}",
        )
        .unwrap();
        let task: serde_json::Value =
            serde_json::from_str(&task_json(&segment, &launch("vip"), &sources, &[], &class, &defaults(), "s3://r").unwrap())
                .unwrap();
        assert_eq!(
            task["iceberg"],
            serde_json::json!({
                "catalogs": [{"name": "lake", "type": "rest", "uri": "https://catalog.internal/", "tokenEnv": "LAKE_TOKEN"}],
                "namespace": "growth", "resultsBase": "s3://r", "allowedPrefixes": ["s3://lake/growth/"], "allowLocalFiles": false
            })
        );
    }

    #[test]
    fn a_job_trimmed_for_the_cache_reads_back_the_same_and_is_a_fraction_of_its_size() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: vip, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n",
        )
        .unwrap();
        let mut job = build_job(&segment, &launch("vip"), &[], &[], &ComputeClassSpec::default(), &defaults(), "s3://r").unwrap();
        job.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
        job.status = Some(serde_json::from_value(serde_json::json!({"ready": 1, "active": 1})).unwrap());
        let mut trimmed = job.clone();
        trim_for_cache(&mut trimmed);
        assert_eq!(observe_job(&trimmed), observe_job(&job));
        assert!(observe_job(&job).unwrap().deadline.is_some());
        assert_eq!((has_started(&trimmed), is_active(&trimmed)), (true, true));
        assert_eq!(trimmed.metadata.owner_references, job.metadata.owner_references, "the controller maps Jobs to owners");
        assert_eq!(trimmed.labels(), job.labels());
        let size = |job: &Job| serde_json::to_vec(job).unwrap().len();
        assert!(size(&trimmed) * 3 < size(&job), "{} of {} bytes", size(&trimmed), size(&job));
    }

    #[test]
    fn a_segment_cannot_ask_for_a_deadline_beyond_the_operators_cap() {
        let segment: Segment = serde_yaml::from_str(
            "metadata: {name: slow, namespace: growth, uid: u1}\nspec:\n  definition: {sql: SELECT user_id FROM orders}\n  compute: {activeDeadlineSeconds: 999999}\n",
        )
        .unwrap();
        let job = build_job(&segment, &launch("slow"), &[], &[], &ComputeClassSpec::default(), &defaults(), "s3://r").unwrap();
        assert_eq!(job.spec.unwrap().active_deadline_seconds, Some(7200));
    }

    #[test]
    fn long_segment_names_give_valid_job_names_and_labels() {
        let name = "a".repeat(70);
        let segment: Segment = serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: growth, uid: u1}}\nspec: {{definition: {{sql: SELECT user_id FROM orders}}}}\n"
        ))
        .unwrap();
        let job = build_job(&segment, &launch(&name), &[], &[], &ComputeClassSpec::default(), &defaults(), "s3://r").unwrap();
        // No deadline asked for: the operator's default applies.
        assert_eq!(job.spec.as_ref().unwrap().active_deadline_seconds, Some(3600));
        let job_name = job.metadata.name.clone().unwrap();
        assert!(job_name.len() <= 63, "{job_name}");
        let segment_label = &job.metadata.labels.as_ref().unwrap()[SEGMENT_LABEL];
        assert!(segment_label.len() <= 63, "{segment_label}");
        let observed = observe_job(&job).unwrap();
        assert_eq!((observed.version, observed.kind, observed.state), (4, JobKind::Compute, JobState::Running));
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn the_kubelets_reasons_win_over_a_log_tail() {
        // FallbackToLogsOnError puts the log tail in the message of an
        // OOM-killed worker: it must not become the reason.
        let oom = pod(serde_json::json!({"containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "user u0000042 row ..."}}}]}));
        let failure = pod_failure(&[oom]).unwrap();
        assert_eq!(failure.reason, FailureReason::OutOfMemory);
        assert!(!failure.message.contains("u0000042"), "{}", failure.message);

        let evicted = pod(serde_json::json!({"reason": "Evicted", "message": "low on ephemeral storage"}));
        assert_eq!(pod_failure(&[evicted]).unwrap().reason, FailureReason::PodFailed);

        let worker = pod(
            serde_json::json!({"containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "UnknownTable: table `x` is not declared"}}}]}),
        );
        assert_eq!(pod_failure(&[worker]).unwrap().reason, FailureReason::UnknownTable);
        assert_eq!(pod_failure(&[]), None);
    }

    #[test]
    fn a_pod_that_has_not_started_says_why() {
        let waiting = |reason: &str| {
            pod(serde_json::json!({"containerStatuses": [{"name": "worker", "image": "registry.invalid/w:1", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": "detail"}}}]}))
        };
        assert_eq!(start_problem(&[waiting("ImagePullBackOff")]).unwrap().reason, FailureReason::ImagePullFailed);
        assert!(start_problem(&[waiting("ErrImagePull")]).unwrap().message.contains("registry.invalid/w:1"));
        assert_eq!(start_problem(&[waiting("CreateContainerConfigError")]).unwrap().reason, FailureReason::ContainerConfigError);
        assert_eq!(start_problem(&[waiting("ContainerCreating")]), None, "still starting: no reason yet");
        let pending =
            pod(serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu."}]}));
        let failure = start_problem(&[pending]).unwrap();
        assert_eq!(
            (failure.reason, failure.message.as_str()),
            (FailureReason::Unschedulable, "0/1 nodes are available: 1 Insufficient cpu.")
        );
        assert_eq!(not_created(None).reason, FailureReason::PodNotCreated);
    }
}
