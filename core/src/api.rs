//! The `segmentation.dev/v1alpha1` API: `Segment`, `SegmentSource` and
//! the admin's `ComputeClass`.
//!
//! These types are the single source of the CRD YAML in `crds/` (generated
//! by `segment-operator crd`). Validation the API server can do lives here as
//! OpenAPI constraints and CEL rules, so a malformed object is rejected at
//! `kubectl apply`; what needs a parser (SQL, cron, time zones) is checked by
//! [`crate::definition`] and [`crate::schedule`] and reported in status.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{EnvVar, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "segmentation.dev";
pub const VERSION: &str = "v1alpha1";

/// Annotation that requests a manual run; its value (an RFC 3339 time) is
/// remembered in status so one request starts exactly one run.
pub const RUN_REQUESTED_ANNOTATION: &str = "segmentation.dev/run-requested-at";
/// Annotation that approves a version held by the rollover guard.
pub const APPROVE_VERSION_ANNOTATION: &str = "segmentation.dev/approve-version";
/// Finalizer that removes store data and results before a Segment goes away.
pub const FINALIZER: &str = "segmentation.dev/cleanup";
/// Labels put on every Job the operator creates.
pub const SEGMENT_LABEL: &str = "segmentation.dev/segment";
pub const VERSION_LABEL: &str = "segmentation.dev/version";
pub const JOB_KIND_LABEL: &str = "segmentation.dev/job-kind";
/// The Segment's namespace, on the Jobs that run outside it: the ingest
/// Jobs in the operator's ingest namespace (docs/security.md).
pub const SEGMENT_NAMESPACE_LABEL: &str = "segmentation.dev/segment-namespace";
/// Namespace label naming the namespace's [`ComputeClass`]; set by the
/// admin (a namespace's `edit` role cannot label it).
pub const COMPUTE_CLASS_LABEL: &str = "segmentation.dev/compute-class";

/// A customer segment: a definition evaluated over the lake on a schedule,
/// loaded as numbered versions into the store, one of which is served.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "segmentation.dev",
    version = "v1alpha1",
    kind = "Segment",
    namespaced,
    status = "SegmentStatus",
    shortname = "seg",
    category = "segmentation",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeVersion"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.members"}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastSuccessfulTime"}"#,
    printcolumn = r#"{"name":"Next Run","type":"string","format":"date-time","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SegmentSpec {
    /// What the segment means, for people reading `kubectl get -o yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How members are found: exactly one of `sql`, `rules` or `static`.
    pub definition: Definition,
    /// When to recompute. Without a schedule the segment is computed when it
    /// is created, when its definition changes and on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// How many versions stay loaded, and how long result files are kept.
    #[serde(default)]
    pub retention: Retention,
    /// The guard a new version passes before readers switch to it.
    #[serde(default)]
    pub rollover: RolloverPolicy,
    /// How a version is loaded into the store.
    #[serde(default)]
    pub ingest: IngestPolicy,
    /// Serve this retained version instead of the newest one (rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pin_version: Option<u64>,
    /// Overrides for the compute and ingest Jobs of this segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeOverrides>,
    /// What happens to store data and result files when the Segment is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Exactly one of `sql`, `rules` or `static`.
// No `fieldPath`: the error is about this object itself, and the API server
// rejects a CRD whose fieldPath is "." ("unexpected end of JSON path").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.sql) ? 1 : 0) + (has(self.rules) ? 1 : 0) + (has(self.static) ? 1 : 0) == 1",
    "message": "definition must set exactly one of sql, rules or static",
    "reason": "FieldValueInvalid"
}]))]
pub struct Definition {
    /// A query returning one column of user ids. `now()` is the run's
    /// snapshot time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub sql: Option<String>,
    /// A structured rule (all/any/not, property, event, segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::rules::rule_schema")]
    pub rules: Option<crate::rules::Rule>,
    /// An uploaded list of user ids (CSV with a `user_id` column, or one id a line).
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_list: Option<StaticList>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticList {
    /// `s3://bucket/key` or `file:///path`.
    #[schemars(regex(pattern = r"^(s3|file)://.+"))]
    pub uri: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Five-field cron (`*/30 * * * *`) or a macro (`@hourly`, `@daily`, ...).
    #[schemars(length(min = 1, max = 128))]
    pub cron: String,
    /// IANA time zone the cron is read in; UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Stop scheduled runs; manual requests still run.
    #[serde(default)]
    pub suspend: bool,
    /// What a run that comes due while another is in flight does:
    /// `Forbid` (wait for it, the default) or `Replace` (cancel it).
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A scheduled run that could not start within this many seconds of its
    /// time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// A run due while another is in flight waits for it to finish.
    #[default]
    Forbid,
    /// A run due while another is in flight cancels it.
    Replace,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.keepVersions >= 1",
    "message": "keepVersions must be at least 1",
    "fieldPath": ".keepVersions",
    "reason": "FieldValueInvalid"
}]))]
pub struct Retention {
    /// Versions kept in the store (the active and the pinned one are always kept).
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
    /// How long result files stay in object storage (`30m`, `12h`, `7d`, `2w`).
    #[serde(default = "default_keep_results_for")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h|d|w)$"))]
    pub keep_results_for: String,
}

fn default_keep_versions() -> u32 {
    3
}
fn default_keep_results_for() -> String {
    "7d".to_string()
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_versions: default_keep_versions(), keep_results_for: default_keep_results_for() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.maxChangeRatio) || (self.maxChangeRatio >= 0.0 && self.maxChangeRatio <= 1.0)",
    "message": "maxChangeRatio must be between 0 and 1",
    "fieldPath": ".maxChangeRatio",
    "reason": "FieldValueInvalid"
}]))]
pub struct RolloverPolicy {
    /// Hold a version whose membership differs from the active one by more
    /// than this share of the active members, until approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_change_ratio: Option<f64>,
    /// Hold a version with fewer members than this, until approved.
    #[serde(default)]
    pub min_members: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestPolicy {
    /// Result parts that may fail ingest's check (damaged, unreadable after
    /// retries) before the whole run fails. Parts are what other segments'
    /// rules and previews read; readers are served from the version's index
    /// file, which must be whole whatever this allows. The default 0
    /// accepts a version only when every part checks.
    #[serde(default)]
    pub max_failed_parts: u32,
}

/// What a Segment's author may choose of its Jobs. Everything else of the
/// worker pods (image, ServiceAccount, environment, node placement, the
/// largest resources and deadline) is the admin's, in the namespace's
/// [`ComputeClass`]: a Segment author is a tenant, and the pods read the
/// lake with the operator's credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeOverrides {
    /// CPU and memory of the worker container, instead of the class's
    /// defaults; at most the class's `maxResources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// Seconds a compute or ingest Job may run before it is failed; the
    /// class's (or the operator's `--job-deadline-seconds`) when unset, at
    /// most the class's `maxDeadlineSeconds` (or `--max-job-deadline-seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// The engine that computes the members: `datafusion` (one pod, the
    /// default) or `spark` (a Spark application, for lakes that outgrow one
    /// pod; the namespace's ComputeClass must enable it).
    #[serde(default, skip_serializing_if = "ComputeEngine::is_default")]
    pub engine: ComputeEngine,
}

/// Which engine runs a compute. Both read the same sources and write the
/// same result files, so ingest, serving and rollback do not know which ran.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeEngine {
    /// Apache DataFusion, in the worker process.
    #[default]
    Datafusion,
    /// Apache Spark: a `SparkApplication` in a cluster, a local
    /// `spark-submit` for a hand-run or standalone worker.
    Spark,
}

impl ComputeEngine {
    pub fn is_default(&self) -> bool {
        *self == ComputeEngine::Datafusion
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ComputeEngine::Datafusion => "datafusion",
            ComputeEngine::Spark => "spark",
        }
    }
}

/// CPU and memory requests and limits of the worker container (no other
/// resources: devices and claims are placement, the admin's choice).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// What the scheduler reserves for the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<CpuMemory>,
    /// The most the worker may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CpuMemory>,
}

/// An amount of CPU and of memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuMemory {
    /// Cores: `500m`, `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Bytes: `512Mi`, `4Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

impl CpuMemory {
    /// The quantities set, by resource name, as a pod spec holds them.
    pub fn by_name(&self) -> BTreeMap<String, Quantity> {
        [("cpu", &self.cpu), ("memory", &self.memory)]
            .into_iter()
            .filter_map(|(name, quantity)| quantity.clone().map(|q| (name.to_string(), q)))
            .collect()
    }
}

/// Environment variables of the worker the operator sets itself; a
/// ComputeClass may not set them.
pub const RESERVED_WORKER_ENV: &[&str] = &["TASK", "TASK_FILE", "TERMINATION_LOG"];

/// The admin's settings of the worker pods of every Segment in the
/// namespaces that use it: a namespace labelled
/// `segmentation.dev/compute-class: <name>` uses that class, any other the
/// operator's `--default-compute-class`, and without one the operator's
/// own flags (`--worker-image`, `--worker-service-account`, ...) with no
/// placement, no environment and no local files. Cluster-scoped: a tenant
/// with a namespace's `edit` role can neither write nor choose one.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "segmentation.dev",
    version = "v1alpha1",
    kind = "ComputeClass",
    category = "segmentation",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"ServiceAccount","type":"string","jsonPath":".spec.serviceAccountName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeClassSpec {
    /// Image of the worker container; the operator's `--worker-image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// ServiceAccount the worker pods run as, in the Segment's namespace;
    /// the operator's `--worker-service-account` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub service_account_name: Option<String>,
    /// Mount the ServiceAccount's API token into worker pods. The worker
    /// never calls the Kubernetes API, so the default is no token.
    #[serde(default)]
    pub automount_service_account_token: bool,
    /// Extra environment of the worker container (credentials of this
    /// class's namespaces, engine settings such as `COMPUTE_MEMORY_MB`).
    /// `TASK`, `TASK_FILE` and `TERMINATION_LOG` are the operator's: a
    /// class that sets them is not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// A Secret in the Segment's namespace whose keys become the worker's
    /// environment, instead of the operator's `--worker-env-secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub env_from_secret: Option<String>,
    /// Node labels the worker pods must be scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the worker pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Resources of a worker whose Segment sets none; the operator's
    /// `--worker-*` flags when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_resources: Option<WorkerResources>,
    /// The most a Segment may request or limit; a Segment asking for more
    /// is `Stalled` (`NotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_resources: Option<CpuMemory>,
    /// `activeDeadlineSeconds` of a Job whose Segment sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub deadline_seconds: Option<i64>,
    /// The longest `activeDeadlineSeconds` a Segment gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_deadline_seconds: Option<i64>,
    /// Where sources and static lists may be read: URI prefixes, each
    /// ending in `/`, `{namespace}` standing for the Segment's namespace
    /// (`s3://lake/tenants/{namespace}/`). Unset: any `s3://` location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_prefixes: Option<Vec<String>>,
    /// Allow `file://` sources (the worker's own file system: its
    /// ServiceAccount token, the node's files). Off unless a cluster keeps
    /// its lake on a volume it mounts for this class alone.
    #[serde(default)]
    pub allow_local_files: bool,
    /// Spark for this class's namespaces: a Segment with
    /// `spec.compute.engine: spark` runs as a `SparkApplication` of the
    /// Kubeflow Spark operator with these settings, none of them the
    /// Segment's. Unset: such a Segment is not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spark: Option<SparkSettings>,
    /// The Apache Iceberg catalogs this class's Segments may read tables
    /// of (`format: iceberg`, `uri: iceberg://<catalog>/...`). Their
    /// addresses and credentials are the admin's: a SegmentSource names a
    /// catalog, never a host. Tables' metadata and data must still be
    /// under `allowedSourcePrefixes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iceberg_catalogs: Vec<IcebergCatalog>,
}

/// An Apache Iceberg catalog of a [`ComputeClass`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcebergCatalog {
    /// What SegmentSources call it: `iceberg://<name>/...`.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// `rest` (the Iceberg REST catalog protocol) or `sql` (the JDBC /
    /// SQLAlchemy catalog's `iceberg_tables` table, in SQLite).
    #[serde(rename = "type")]
    pub type_: IcebergCatalogType,
    /// `rest`: the catalog's base URL (`https://catalog.example/api/`, the
    /// one before `v1/`). `sql`: `sqlite:///abs/path/catalog.db`, a file
    /// the worker's pod mounts.
    #[schemars(regex(pattern = r"^(https?://|sqlite:///).+"))]
    pub uri: String,
    /// `rest`: the warehouse asked of the catalog's `/v1/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub warehouse: Option<String>,
    /// `sql`: the `catalog_name` of its rows; `name` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub catalog_name: Option<String>,
    /// `rest`: the worker environment variable (from the class's
    /// `envFromSecret`, so the namespace's Secret) that holds the bearer
    /// token sent to the catalog, and only to it. Not with `credentialEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub token_env: Option<String>,
    /// `rest`: the worker environment variable (from the class's
    /// `envFromSecret`, so the namespace's Secret) that holds OAuth2 client
    /// credentials, `client_id:client_secret` (Iceberg's `credential`
    /// property). Before it asks the catalog anything, the worker trades
    /// them at `oauth2ServerUri` for an access token (the client credentials
    /// grant), which it sends as the bearer token to the catalog's `uri`
    /// alone; the secret goes to the token endpoint alone. Not with
    /// `tokenEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub credential_env: Option<String>,
    /// `rest` with `credentialEnv`: the scope asked of the token endpoint;
    /// `catalog` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub scope: Option<String>,
    /// `rest` with `credentialEnv`: the OAuth2 token endpoint;
    /// `<uri>/v1/oauth/tokens` (the catalog's own) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub oauth2_server_uri: Option<String>,
}

impl IcebergCatalog {
    /// A catalog with no warehouse, catalog name or credentials.
    pub fn new(name: &str, type_: IcebergCatalogType, uri: impl Into<String>) -> IcebergCatalog {
        IcebergCatalog {
            name: name.to_string(),
            type_,
            uri: uri.into(),
            warehouse: None,
            catalog_name: None,
            token_env: None,
            credential_env: None,
            scope: None,
            oauth2_server_uri: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IcebergCatalogType {
    Rest,
    Sql,
}

/// The admin's settings of the `SparkApplication`s of a [`ComputeClass`]
/// (docs/spark.md). The pods also get the class's `envFromSecret` (or the
/// operator's `--worker-env-secret`), `env`, `nodeSelector` and
/// `tolerations`, as compute Jobs do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SparkSettings {
    /// Image of the driver and executors: Spark, Python, `segment-worker`
    /// and the driver program at
    /// `/opt/segment-operator/spark/segment_spark.py` (the project's
    /// Dockerfile builds one).
    #[schemars(length(min = 1))]
    pub image: String,
    /// `imagePullPolicy` of the driver and executors; the cluster's default
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// The Spark version of the image (`4.0.1`), as the Spark operator wants it.
    #[schemars(length(min = 1))]
    pub spark_version: String,
    /// ServiceAccount of the driver, in the Segment's namespace. The driver
    /// creates its executors, so this account needs to create, watch and
    /// delete pods, services and configmaps there.
    #[schemars(length(min = 1))]
    pub service_account_name: String,
    /// User the driver and executor containers run as (the image's own
    /// when unset; 185 in the Apache Spark images). They always run as
    /// non-root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,
    /// The driver's cores and memory.
    #[serde(default)]
    pub driver: SparkDriver,
    /// How many executors, and each one's cores and memory.
    #[serde(default)]
    pub executor: SparkExecutors,
    /// Spark properties, as `--conf` gives them (`spark.sql.shuffle.partitions`).
    /// The image, the driver's ServiceAccount and pod templates are set by
    /// the fields above and the operator, not here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spark_conf: BTreeMap<String, String>,
    /// Hadoop properties (the S3A settings), without their `spark.hadoop.` prefix.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hadoop_conf: BTreeMap<String, String>,
}

/// Cores and memory of the Spark driver, in Spark's units.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SparkDriver {
    /// `spark.driver.cores`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cores: Option<i32>,
    /// Hard CPU limit of the pod (`1500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_limit: Option<String>,
    /// JVM heap, in Spark's units (`512m`, `4g`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[kmgtKMGT]?$"))]
    pub memory: Option<String>,
    /// Memory beyond the heap (Python workers, buffers), in Spark's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[kmgtKMGT]?$"))]
    pub memory_overhead: Option<String>,
}

/// The executors of a Spark run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SparkExecutors {
    /// How many executors run (`spark.executor.instances`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub instances: Option<i32>,
    /// `spark.executor.cores`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cores: Option<i32>,
    /// Hard CPU limit of each executor pod (`1500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_limit: Option<String>,
    /// Each executor's JVM heap, in Spark's units (`512m`, `4g`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[kmgtKMGT]?$"))]
    pub memory: Option<String>,
    /// Each executor's memory beyond the heap, in Spark's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[kmgtKMGT]?$"))]
    pub memory_overhead: Option<String>,
}

/// A Kubernetes resource quantity (`500m`, `2`, `1Gi`), as in a pod spec.
pub type Quantity = k8s_openapi::apimachinery::pkg::api::resource::Quantity;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Remove store data and result files with the Segment.
    #[default]
    Delete,
    /// Leave store data and result files in place.
    Retain,
}

/// Observed state, rebuilt by every reconcile from the Jobs and the store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentStatus {
    /// The `metadata.generation` the operator last planned for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` and `RolloverHeld`, in the shape
    /// kstatus, Flux and Argo CD read.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The version readers are served now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<u64>,
    /// Members of the active version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// The highest version number ever allocated; numbers are never reused.
    #[serde(default)]
    pub latest_version: u64,
    /// The scheduled time of the last run the schedule started (or skipped
    /// past its starting deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<DateTime<Utc>>,
    /// When the schedule starts the next run; unset when suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<DateTime<Utc>>,
    /// When a run last produced a servable version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<DateTime<Utc>>,
    /// The run in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_run: Option<RunStatus>,
    /// Retained versions, newest first, then a short history of failed runs.
    #[serde(default)]
    pub versions: Vec<VersionStatus>,
    /// The last `run-requested-at` annotation value that started a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_run_request: Option<String>,
    /// Failed runs since the last success or the last new trigger; drives
    /// the retry backoff and its budget.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// When a run that failed for a transient reason is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// When expired result files were last collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_collected_at: Option<DateTime<Utc>>,
}

/// A condition in the shape of `metav1.Condition`, so kstatus, Flux and
/// Argo CD read it without configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Reconciling`, `Stalled` or `RolloverHeld`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why (`VersionActive`, `RunFailed`, ...).
    pub reason: String,
    /// The details, for people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    /// The version this run computes.
    pub version: u64,
    /// `Pending`, `Computing`, `Ingesting` or `AwaitingApproval`.
    pub phase: RunPhase,
    /// The Job of the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// `now()` and `within` windows are evaluated at this time.
    pub snapshot_time: DateTime<Utc>,
    /// When the run was recorded.
    pub started_at: DateTime<Utc>,
    /// What started it: `Initial`, `Definition`, `Schedule`, `Manual` or `Retry`.
    pub trigger: RunTrigger,
    /// A hash of the definition the run computes.
    pub definition_hash: String,
    /// The Segment generation the run was started for.
    pub generation: i64,
    /// When the compute Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_at: Option<DateTime<Utc>>,
    /// When the ingest Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingested_at: Option<DateTime<Utc>>,
    /// Why the run waits (`ChangeRatioExceeded`, `BelowMinMembers`,
    /// `ChangeNotCounted`, `WaitingForComputeSlot`), and the details for
    /// people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the run waits, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunPhase {
    /// Waiting for a free compute slot (cluster-wide limit).
    Pending,
    Computing,
    Ingesting,
    /// Loaded, held by the rollover guard until approved.
    AwaitingApproval,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunTrigger {
    /// The segment has no version to serve yet (new, or its store data was lost).
    Initial,
    /// The definition changed.
    Definition,
    Schedule,
    /// The `run-requested-at` annotation.
    Manual,
    /// A run that failed for a transient reason, retried with backoff.
    Retry,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    /// The version number; numbers are never reused.
    pub version: u64,
    /// `Active`, `Retained`, `AwaitingApproval` or `Failed`.
    pub state: VersionState,
    /// Members loaded into the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// The time the definition was evaluated at.
    pub snapshot_time: DateTime<Utc>,
    /// When the compute Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_at: Option<DateTime<Utc>>,
    /// When the ingest Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingested_at: Option<DateTime<Utc>>,
    /// Where the version's result files are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_uri: Option<String>,
    /// A hash of the definition the version was computed from.
    pub definition_hash: String,
    /// Why a run failed (the worker's one-line reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why a run failed, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The Segment generation the run was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// When readers were switched away from this version. Retention keeps
    /// it for the operator's reader grace after that, whatever
    /// `keepVersions` says: a serving replica may answer from it until it
    /// learns of the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<DateTime<Utc>>,
    /// The lake tables read at a table version (Delta; Iceberg, whose
    /// version is the snapshot id), with the version:
    /// recomputing at the same snapshot time reads the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub table_versions: Vec<crate::manifest::SourceRead>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VersionState {
    /// Served to readers now.
    Active,
    /// Loaded and promoted once; kept for rollback.
    Retained,
    /// Loaded, held by the rollover guard.
    AwaitingApproval,
    /// The run failed; nothing of it is served.
    Failed,
}

/// A lake table that definitions refer to by `table`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "segmentation.dev",
    version = "v1alpha1",
    kind = "SegmentSource",
    namespaced,
    shortname = "segsrc",
    category = "segmentation",
    printcolumn = r#"{"name":"Table","type":"string","jsonPath":".spec.table"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".spec.format"}"#,
    printcolumn = r#"{"name":"URI","type":"string","jsonPath":".spec.uri"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.format != 'delta' || !self.uri.matches('[*?\\\\[]')",
    "message": "uri of a delta table is the table's root directory, not a glob",
    "fieldPath": ".uri",
    "reason": "FieldValueInvalid"
}, {
    "rule": "(self.format == 'iceberg') == self.uri.startsWith('iceberg://')",
    "message": "an iceberg table is named as iceberg://<catalog>/<namespace>/<table>, and only an iceberg table is",
    "fieldPath": ".uri",
    "reason": "FieldValueInvalid"
}]))]
pub struct SegmentSourceSpec {
    /// The name SQL and rules use for this table.
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub table: String,
    /// `s3://bucket/prefix/`, a glob, or `file:///path`; with `format:
    /// delta`, the table's root directory (the one holding `_delta_log/`);
    /// with `format: iceberg`, `iceberg://<catalog>/<namespace>/<table>`,
    /// `<catalog>` one of the namespace's ComputeClass `icebergCatalogs`
    /// (a nested namespace is one path segment a level).
    #[schemars(regex(pattern = r"^(s3|file|iceberg)://.+"))]
    pub uri: String,
    /// The files' format: `parquet`, `csv` (with a header row), `ndjson`,
    /// `delta` (a Delta Lake table) or `iceberg` (an Apache Iceberg table
    /// in a catalog), the last two read as of the run's snapshot time.
    pub format: SourceFormat,
    /// The column holding the user id; `user_id` when unset.
    #[serde(default = "default_user_id_column")]
    #[schemars(length(min = 1))]
    pub user_id_column: String,
    /// Needed by rules with `within` windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_column: Option<String>,
}

fn default_user_id_column() -> String {
    "user_id".to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Parquet,
    Csv,
    Ndjson,
    /// A Delta Lake table: `uri` is its root; the version read is the
    /// newest commit at or before the run's snapshot time.
    Delta,
    /// An Apache Iceberg table in a catalog of the namespace's
    /// ComputeClass: `uri` is `iceberg://<catalog>/<namespace>/<table>`;
    /// the snapshot read is the newest one committed at or before the
    /// run's snapshot time.
    Iceberg,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Parquet => "parquet",
            SourceFormat::Csv => "csv",
            SourceFormat::Ndjson => "ndjson",
            SourceFormat::Delta => "delta",
            SourceFormat::Iceberg => "iceberg",
        }
    }
}

impl Segment {
    /// `namespace/name`, the key used by the store, results and events.
    pub fn key(&self) -> SegmentKey {
        SegmentKey {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Identifies a segment across the store, results and Kafka messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentKey {
    pub namespace: String,
    pub name: String,
}

impl SegmentKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        SegmentKey { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for SegmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The CRD of `K` as the API server gets it: the derived schema with the
/// unsigned integer formats schemars writes (`uint32`, `uint64`), which the
/// API server does not know (it warns on every write and checks nothing),
/// replaced by the bounds they stand for. Without `maximum`, a value that
/// does not fit a u32 would be stored, and every list of Segments would
/// then fail to decode.
pub fn served_crd<K: kube::CustomResourceExt>(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = serde_json::to_value(K::crd()).expect("a CRD serializes to JSON");
    replace_unsigned_formats(&mut crd);
    serde_json::from_value(crd).expect("the CRD with bounds for unsigned formats")
}

fn replace_unsigned_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let maximum = match map.get("format").and_then(|f| f.as_str()) {
                Some("uint8") => Some(Some(u8::MAX as u32)),
                Some("uint16") => Some(Some(u16::MAX as u32)),
                Some("uint32") => Some(Some(u32::MAX)),
                // The API server keeps integers as int64: its own bound.
                Some("uint64" | "uint") => Some(None),
                _ => None,
            };
            if let Some(maximum) = maximum {
                map.remove("format");
                if let Some(maximum) = maximum {
                    map.entry("maximum").or_insert(serde_json::json!(maximum));
                }
                map.entry("minimum").or_insert(serde_json::json!(0));
            }
            map.values_mut().for_each(replace_unsigned_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(replace_unsigned_formats),
        _ => {}
    }
}

/// The CRDs as one YAML stream, as checked in under `crds/`.
pub fn crds_yaml() -> String {
    [served_crd::<Segment>(), served_crd::<SegmentSource>(), served_crd::<ComputeClass>()]
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD serializes to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Path of the checked-in CRDs, relative to the workspace root.
pub const CRDS_FILE: &str = "crds/segmentation.dev.yaml";
