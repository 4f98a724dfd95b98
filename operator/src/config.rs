//! Command line of `segment-operator`. Every setting is a flag whose
//! environment fallback follows the project's one naming rule
//! (`segment_runtime::config`), so the Helm chart can set it either way.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "segment-operator",
    version,
    about = "Runs the lifecycle of Segment resources: compute, ingest, rollover, retention"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions (the content of crds/).
    Crd,
    /// Check Segment manifests (files or directories) the way the operator
    /// does before launching anything: SQL, rules, cron, time zone, tables.
    Check {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Run the operator against the current Kubernetes context or in-cluster config.
    Run(Box<RunArgs>),
    /// Run the whole lifecycle on this machine from a directory of
    /// manifests: compute and ingest in-process, serving on --listen.
    #[cfg(feature = "standalone")]
    Standalone(StandaloneArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch Segments in this namespace only; all namespaces when unset.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub log: segment_runtime::LogArgs,

    /// Segments reconciled at once; one Segment is never reconciled twice
    /// at the same time.
    #[arg(long, env = "RECONCILE_CONCURRENCY", default_value_t = 16)]
    pub reconcile_concurrency: u16,

    #[command(flatten)]
    pub jobs: JobArgs,

    #[command(flatten)]
    pub leader: LeaderArgs,

    /// Run Segments with `spec.compute.engine: spark` as SparkApplications
    /// of the Kubeflow Spark operator (`sparkoperator.k8s.io/v1beta2`),
    /// which must be installed: the operator then watches them. Off, such
    /// Segments are refused and a cluster without the Spark operator's CRD
    /// is not touched.
    #[arg(long, env = "SPARK_APPLICATIONS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub spark_applications: bool,

    /// At most this many compute Jobs run at once across the cluster; runs
    /// beyond it wait in phase Pending. 0 means no limit.
    #[arg(long, env = "MAX_CONCURRENT_COMPUTES", default_value_t = 0)]
    pub max_concurrent_computes: usize,

    /// The store: `redis://host:port` or `redis+cluster://host:port,host:port`.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,

    /// Base URI of result files (`s3://bucket/prefix` or `file:///path`).
    #[arg(long, env = "RESULTS_URI", default_value = "s3://segment-results")]
    pub results_uri: String,

    /// Longest wait for one store round trip (bulk deletes excepted); a
    /// reconcile whose store does not answer in time fails and is retried.
    #[arg(long, env = "STORE_TIMEOUT_MS", default_value_t = 5000)]
    pub store_timeout_ms: u64,

    /// How long a version readers were switched away from is kept even
    /// beyond `keepVersions`: longer than a serving replica that missed
    /// the rollover notice takes to re-read the aliases and expire its
    /// cache (5 s + 2 s by default).
    #[arg(long, env = "READER_GRACE_SECONDS", default_value_t = 60)]
    pub reader_grace_seconds: i64,

    /// Readers are switched to a version once every live serving replica
    /// has loaded it; after this long the replicas still missing are not
    /// waited for (a Warning event counts them; they switch once they have
    /// it). 0 switches at once.
    #[arg(long, env = "REPLICA_LOAD_TIMEOUT_SECONDS", default_value_t = 300)]
    pub replica_load_timeout_seconds: u32,

    /// After SIGTERM, how long reconciles in flight may take to finish
    /// before the operator exits anyway; below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,

    /// Longest wait for an answer to one Kubernetes API request (watches
    /// excepted: they end on the server's own timeout).
    #[arg(long, env = "KUBE_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub kube_request_timeout_seconds: u64,
}

#[cfg(feature = "standalone")]
#[derive(Args, Debug, Clone)]
pub struct StandaloneArgs {
    /// Directory of SegmentSource and Segment manifests (reloaded on change).
    pub dir: std::path::PathBuf,

    /// Address of the serving API.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Use this Redis as the store; the embedded store when unset.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Where result files go; `<dir>/.results` when unset.
    #[arg(long, env = "RESULTS_URI")]
    pub results_uri: Option<String>,
}

/// Defaults for the Jobs the operator creates; `spec.compute` overrides them.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Image of `segment-worker`.
    #[arg(long, env = "WORKER_IMAGE", default_value = concat!("segment-operator/segment-worker:", env!("CARGO_PKG_VERSION")))]
    pub worker_image: String,

    /// ServiceAccount the worker pods run as.
    #[arg(long, env = "WORKER_SERVICE_ACCOUNT", default_value = "segment-worker")]
    pub worker_service_account: String,

    /// Secret whose keys become the workers' environment (AWS_*; workers
    /// need no store credentials).
    #[arg(long, env = "WORKER_ENV_SECRET")]
    pub worker_env_secret: Option<String>,

    /// The ComputeClass of namespaces without a
    /// `segmentation.dev/compute-class` label; without one, those
    /// namespaces' workers get this operator's `--worker-*` settings, no
    /// placement, no extra environment and no local files.
    #[arg(long, env = "DEFAULT_COMPUTE_CLASS")]
    pub default_compute_class: Option<String>,

    /// Namespace where ingest Jobs run, apart from the tenants': ingest
    /// judges the tenants' results (it writes the verdict the operator
    /// seals a version from), so neither its Job nor its credentials
    /// (`--ingest-env-secret`, a Secret of this namespace) are a tenant's
    /// to reach. Unset: ingest Jobs run in the Segment's namespace with the
    /// worker's Secret. Needs the operator to watch every namespace (or
    /// this one), to see the Jobs.
    #[arg(long, env = "INGEST_NAMESPACE")]
    pub ingest_namespace: Option<String>,

    /// Secret of the ingest namespace whose keys become the ingest Jobs'
    /// environment: AWS_* that read the results and write the verdicts
    /// (`_seal.json`); ingest needs no store credentials.
    #[arg(long, env = "INGEST_ENV_SECRET")]
    pub ingest_env_secret: Option<String>,

    /// Finished Jobs are removed this many seconds after they end.
    #[arg(long, env = "JOB_TTL_SECONDS", default_value_t = 3600)]
    pub job_ttl_seconds: i32,

    /// Pod retries inside one Job before the run fails.
    #[arg(long, env = "JOB_BACKOFF_LIMIT", default_value_t = 2)]
    pub job_backoff_limit: i32,

    /// Default `activeDeadlineSeconds` of compute and ingest Jobs: a run
    /// whose pod never starts (unknown image, unschedulable, a missing
    /// Secret) or hangs fails with `DeadlineExceeded` instead of holding
    /// its compute slot forever.
    #[arg(long, env = "JOB_DEADLINE_SECONDS", default_value_t = 3600)]
    pub job_deadline_seconds: i64,

    /// A Job whose pod is not running this long after the Job was created
    /// fails its run with the reason the pod shows (an image that cannot
    /// be pulled, no node for it, a missing Secret or ServiceAccount), so
    /// it does not hold its compute slot until the deadline.
    #[arg(long, env = "POD_START_TIMEOUT_SECONDS", default_value_t = 300)]
    pub pod_start_timeout_seconds: i64,

    /// How long the lake may take to hold an event: a version computed at
    /// snapshot time T is taken to reflect only events before T minus
    /// this, and the realtime overrides from then on are applied to it.
    #[arg(long, env = "LAKE_LAG_SECONDS", default_value_t = 3600)]
    pub lake_lag_seconds: i64,

    /// The most a Segment's `spec.compute.activeDeadlineSeconds` may ask
    /// for; larger values are lowered to it.
    #[arg(long, env = "MAX_JOB_DEADLINE_SECONDS", default_value_t = 86_400)]
    pub max_job_deadline_seconds: i64,

    #[arg(long, env = "WORKER_CPU_REQUEST", default_value = "500m")]
    pub worker_cpu_request: String,

    #[arg(long, env = "WORKER_MEMORY_REQUEST", default_value = "1Gi")]
    pub worker_memory_request: String,

    #[arg(long, env = "WORKER_MEMORY_LIMIT", default_value = "4Gi")]
    pub worker_memory_limit: String,

    /// Size limit of the worker's scratch emptyDir (its /tmp, where
    /// compute spills when a sort outgrows memory; the root filesystem is
    /// read-only).
    #[arg(long, env = "WORKER_SCRATCH_SIZE_LIMIT", default_value = "20Gi")]
    pub worker_scratch_size_limit: String,
}

impl RunArgs {
    /// Settings that cannot work together, said before anything starts.
    pub fn check(&self) -> Result<(), String> {
        if let (Some(watched), Some(ingest)) = (&self.namespace, &self.jobs.ingest_namespace) {
            if watched != ingest {
                return Err(format!(
                    "--ingest-namespace {ingest}: the operator watches Jobs in --namespace {watched} only, and would not see \
                     the ingest Jobs; leave --namespace unset or make them the same"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct LeaderArgs {
    /// Elect one active replica through a coordination.k8s.io Lease.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    #[arg(long, env = "LEASE_NAME", default_value = "segment-operator")]
    pub lease_name: String,

    /// Namespace of the Lease; the pod's namespace in a cluster.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// This replica's identity in the Lease (the pod's name in a cluster);
    /// the host name and a random suffix when unset, so two processes
    /// never share one.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a candidate waits, after it last saw the Lease change,
    /// before it takes the lease of a leader that stopped renewing.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u32,

    /// How long the leader keeps acting without a successful renew; less
    /// than the lease duration.
    #[arg(long, env = "RENEW_DEADLINE_SECONDS", default_value_t = 10)]
    pub renew_deadline_seconds: u32,

    /// How often the leader renews the Lease and a candidate tries to take
    /// it; less than the renew deadline.
    #[arg(long, env = "RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub retry_period_seconds: u32,
}

impl LeaderArgs {
    pub fn timing(&self) -> Result<crate::leader::Timing, crate::leader::TimingError> {
        let seconds = |s: u32| std::time::Duration::from_secs(s.into());
        crate::leader::Timing::new(
            seconds(self.lease_duration_seconds),
            seconds(self.renew_deadline_seconds),
            seconds(self.retry_period_seconds),
        )
    }

    /// The identity given, or a unique one of this process.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(crate::leader::default_identity)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_follows_the_naming_rule() {
        segment_runtime::config::assert_follows_naming_rule(&Cli::command(), &["check"]);
    }

    /// An ingest namespace the operator would not watch Jobs in is refused
    /// at start, naming both flags.
    #[test]
    fn an_ingest_namespace_outside_the_watched_one_is_refused() {
        let run = |flags: &[&str]| {
            let mut argv = vec!["segment-operator", "run", "--redis-url", "redis://x"];
            argv.extend_from_slice(flags);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Run(args) => args.check(),
                _ => unreachable!("the run subcommand"),
            }
        };
        assert_eq!(run(&["--ingest-namespace", "segment-system"]), Ok(()));
        assert_eq!(run(&["--namespace", "growth", "--ingest-namespace", "growth"]), Ok(()));
        assert_eq!(run(&["--namespace", "growth"]), Ok(()));
        let error = run(&["--namespace", "growth", "--ingest-namespace", "segment-system"]).unwrap_err();
        assert!(error.contains("--ingest-namespace segment-system") && error.contains("--namespace growth"), "{error}");
    }
}
