use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use segment_compute::compute::{container_memory_limit, memory_pool_for, ComputeOptions, DEFAULT_PART_SIZE};
use segment_compute::failure::WorkerError;
use segment_compute::{compute, ingest, lakegen, spark};
use segment_core::reasons::FailureReason;
use segment_core::task::{ComputeTask, IngestTask, TERMINATION_LOG};
use segment_runtime::LogArgs;

#[derive(Parser)]
#[command(name = "segment-worker", version, about = "The compute and ingest Jobs of segment-operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a Segment definition over the lake and write the result files.
    Compute(ComputeArgs),
    /// Verify a result and write its verdict (`_seal.json`) next to it, from
    /// which the operator seals the version in the store. Needs read access
    /// to the results and write access to the verdict, no store.
    Ingest {
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Apply include/exclude events from Kafka to the active versions and
    /// publish entered/exited events on every rollover (a Deployment).
    Realtime(Box<RealtimeArgs>),
    /// The Spark engine: print the plan of a task (Spark SQL, the files of
    /// each table) as JSON, after removing a manifest an earlier run of
    /// the version left. Run by the Spark driver.
    SparkPlan {
        #[command(flatten)]
        task: TaskArgs,
    },
    /// The Spark engine: write the result of a task from the ids on stdin
    /// (sorted bytewise, distinct, one a line, then an empty line) exactly
    /// as `compute` writes it: parts, index, manifest last. Run by the
    /// Spark driver.
    WriteResult(WriteResultArgs),
    /// Print the Spark driver program (PySpark), as installed at
    /// /opt/segment-operator/spark/segment_spark.py in the images.
    SparkDriver,
    /// Write a deterministic example lake (orders, users, app events).
    GenerateLake {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2_000)]
        users: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The lake's reference time (RFC 3339): activity falls in the 180
        /// days before it. Defaults to today's midnight (UTC), so `within`
        /// windows evaluated now find recent activity; pass it to get the
        /// same files on every run.
        #[arg(long)]
        now: Option<chrono::DateTime<chrono::Utc>>,
        /// Mean orders per user.
        #[arg(long, default_value_t = 3)]
        orders_per_user: u32,
        /// Mean app events per user.
        #[arg(long, default_value_t = 10)]
        events_per_user: u32,
    },
}

#[derive(Args)]
struct RealtimeArgs {
    /// `redis://host:port` or `redis+cluster://host:port,host:port`.
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// Base URI of the result files (the operator's `--results-uri`,
    /// `s3://bucket/prefix` or `file:///path`): change events are the diff
    /// of two versions' index files there, read only. S3 credentials come
    /// from the `AWS_*` environment.
    #[arg(long, env = "RESULTS_URI")]
    results_uri: String,
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "KAFKA_BROKERS", alias = "brokers")]
    kafka_brokers: String,
    /// Topic of include/exclude events (key = user id).
    #[arg(long, env = "MEMBERSHIP_TOPIC", default_value = "segment-membership")]
    membership_topic: String,
    /// Where messages that cannot be applied go, with the reason in headers.
    #[arg(long, env = "DLQ_TOPIC", default_value = "segment-membership-dlq")]
    dlq_topic: String,
    /// Topic of entered/exited events (key = user id).
    #[arg(long, env = "CHANGES_TOPIC", default_value = "segment-changes")]
    changes_topic: String,
    /// Consumer group; replicas share the partitions.
    #[arg(long, env = "KAFKA_GROUP_ID", alias = "group-id", default_value = "segment-realtime")]
    kafka_group_id: String,
    /// A librdkafka setting, `KEY=VALUE` (repeatable; in the environment,
    /// comma-separated), e.g. `security.protocol=SASL_SSL`.
    #[arg(long = "kafka-option", env = "KAFKA_OPTION", value_delimiter = ',', value_parser = parse_kafka_option)]
    kafka_options: Vec<(String, String)>,
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    kafka_sasl_username: Option<String>,
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true)]
    kafka_sasl_password: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: std::net::SocketAddr,
    #[command(flatten)]
    log: LogArgs,
    /// This replica's name in its claims on change events (with the pid):
    /// the pod name in a cluster.
    #[arg(long, env = "HOSTNAME", default_value = "segment-worker")]
    hostname: String,
    /// Seconds between checks of every segment for a rollover whose
    /// changes were not published (missed notice, failed publish).
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// How many seconds past this worker's clock an event's `ts` may be;
    /// a later one is dead-lettered (`future_timestamp`), since the newest
    /// event of a user wins.
    #[arg(long, env = "MAX_CLOCK_SKEW_SECONDS", default_value_t = segment_worker::realtime::kafka::DEFAULT_MAX_CLOCK_SKEW.as_secs())]
    max_clock_skew_seconds: u64,
}

fn parse_kafka_option(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, v)) if !key.trim().is_empty() => Ok((key.trim().to_string(), v.to_string())),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}

#[derive(Args)]
struct TaskArgs {
    /// The task JSON (in-process and hand-run workers).
    #[arg(long = "task", env = "TASK", required_unless_present = "task_file", conflicts_with = "task_file")]
    task: Option<String>,
    /// A file holding the task JSON: how the operator's Jobs pass it (a
    /// downward API volume of the pod's annotation), free of the 128 KiB
    /// limit of one environment variable.
    #[arg(long = "task-file", env = "TASK_FILE")]
    task_file: Option<PathBuf>,
    /// Where the one-line failure reason goes.
    #[arg(long, env = "TERMINATION_LOG", default_value = TERMINATION_LOG)]
    termination_log: PathBuf,
}

/// `write-result`: the task and how its result is written.
#[derive(Args)]
struct WriteResultArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// User ids per result part.
    #[arg(long, env = "COMPUTE_PART_SIZE", default_value_t = DEFAULT_PART_SIZE, value_parser = positive)]
    compute_part_size: usize,
    /// The lake tables the run read (the plan's `sourcesRead`, JSON), for
    /// the manifest.
    #[arg(long, env = "SOURCES_READ", default_value = "[]")]
    sources_read: String,
}

/// `compute`: the task and how the engine runs.
#[derive(Args)]
struct ComputeArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// The engine's memory pool in MiB; sorts and aggregations spill to
    /// disk beyond it. Leave headroom below the container's limit for
    /// buffers outside the pool (about a third). Unset: two thirds of the
    /// container's memory limit, or 1024 without one.
    #[arg(long, env = "COMPUTE_MEMORY_MB", value_parser = positive)]
    compute_memory_mb: Option<usize>,
    /// Where spill files go; the OS temp dir (the Jobs' scratch volume at
    /// /tmp) when unset.
    #[arg(long, env = "COMPUTE_SPILL_DIR")]
    compute_spill_dir: Option<PathBuf>,
    /// User ids per result part.
    #[arg(long, env = "COMPUTE_PART_SIZE", default_value_t = DEFAULT_PART_SIZE, value_parser = positive)]
    compute_part_size: usize,
    /// Parallel partitions; the CPUs when unset.
    #[arg(long, env = "COMPUTE_PARTITIONS", value_parser = positive)]
    compute_partitions: Option<usize>,
}

impl ComputeArgs {
    fn options(&self) -> ComputeOptions {
        ComputeOptions {
            memory_limit: match self.compute_memory_mb {
                Some(mb) => mb * 1024 * 1024,
                None => memory_pool_for(container_memory_limit()),
            },
            spill_dir: self.compute_spill_dir.clone().filter(|d| !d.as_os_str().is_empty()),
            part_size: self.compute_part_size,
            partitions: self.compute_partitions,
        }
    }
}

fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{text}` is not a positive whole number")),
    }
}

fn parse<T: serde::de::DeserializeOwned>(args: &TaskArgs) -> Result<T, WorkerError> {
    let (text, from) = match (&args.task, &args.task_file) {
        (Some(text), _) => (text.clone(), "--task (TASK)".to_string()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| WorkerError::new(FailureReason::BadTask, format!("--task-file {}: {e}", path.display())))?;
            (text, format!("--task-file {}", path.display()))
        }
        (None, None) => {
            return Err(WorkerError::new(FailureReason::BadTask, "no task: set --task-file (TASK_FILE) or --task (TASK)"))
        }
    };
    serde_json::from_str(&text).map_err(|e| WorkerError::new(FailureReason::BadTask, format!("{from}: {e}")))
}

fn finish<T: serde::Serialize>(result: Result<T, WorkerError>, termination_log: &std::path::Path) -> ExitCode {
    match result {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("segment-worker: {error}");
            error.write_termination_log(termination_log);
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return refuse(error),
    };
    let json_logs = matches!(&cli.command, Command::Realtime(args) if args.log.log_json);
    segment_runtime::init_tracing(json_logs, "info");
    match cli.command {
        Command::Realtime(args) => realtime(*args).await,
        Command::Compute(args) => {
            let result = async { compute::run_with(&parse::<ComputeTask>(&args.task)?, &args.options()).await }.await;
            finish(result, &args.task.termination_log)
        }
        Command::SparkPlan { task: args } => {
            let result = async { spark::prepare(&parse::<ComputeTask>(&args)?).await }.await;
            finish(result, &args.termination_log)
        }
        Command::WriteResult(args) => {
            let result = async {
                let task = parse::<ComputeTask>(&args.task)?;
                let sources = serde_json::from_str(&args.sources_read)
                    .map_err(|e| WorkerError::new(FailureReason::BadTask, format!("--sources-read: {e}")))?;
                let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                spark::write_result(&task, args.compute_part_size, sources, stdin).await
            }
            .await;
            finish(result, &args.task.termination_log)
        }
        Command::SparkDriver => {
            print!("{}", spark::DRIVER);
            ExitCode::SUCCESS
        }
        Command::Ingest { task: args } => {
            let result = async { ingest::verify(&parse::<IngestTask>(&args)?).await }.await;
            finish(result, &args.termination_log)
        }
        Command::GenerateLake { out, users, seed, now, orders_per_user, events_per_user } => {
            let now = now.unwrap_or_else(|| {
                let today = chrono::Utc::now().date_naive().and_time(chrono::NaiveTime::MIN);
                chrono::DateTime::from_naive_utc_and_offset(today, chrono::Utc)
            });
            let spec = lakegen::LakeSpec { users, seed, now, orders_per_user, events_per_user };
            generate_lake(&out, &spec)
        }
    }
}

async fn realtime(args: RealtimeArgs) -> ExitCode {
    use segment_worker::realtime::{kafka, metrics::Metrics};
    use std::sync::Arc;
    // A URI that cannot name a store is refused now, not at the first rollover.
    if let Err(e) = segment_store::results::ResultDir::open(&args.results_uri) {
        eprintln!("segment-worker: --results-uri: {e}");
        return ExitCode::FAILURE;
    }
    let index = Arc::new(segment_store::results::ResultFiles::new(args.results_uri.clone()));
    let store = match segment_store::redis::RedisStore::connect(&args.redis_url).await {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!("segment-worker: --redis-url: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("segment-worker: --metrics-addr {}: {e}", args.metrics_addr);
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut http_shutdown = shutdown.clone();
    let server = segment_runtime::probes::serve(listener, metrics.clone(), async move {
        let _ = http_shutdown.wait_for(|stop| *stop).await;
    });
    let server = tokio::spawn(server);
    tokio::spawn(async move {
        segment_runtime::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let config = kafka::RealtimeConfig {
        kafka: kafka::KafkaSettings {
            brokers: args.kafka_brokers,
            options: args.kafka_options,
            sasl_username: args.kafka_sasl_username,
            sasl_password: args.kafka_sasl_password,
        },
        membership_topic: args.membership_topic,
        dead_letter_topic: args.dlq_topic,
        changes_topic: args.changes_topic,
        group_id: args.kafka_group_id,
        holder: format!("{}-{}", args.hostname, std::process::id()),
        claim_lease: std::time::Duration::from_secs(60),
        resync_interval: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        max_clock_skew: std::time::Duration::from_secs(args.max_clock_skew_seconds),
    };
    let result = kafka::run(config, store, index, metrics, shutdown).await;
    if let Ok(Err(e)) = server.await {
        eprintln!("segment-worker: metrics server: {e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segment-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A command line clap refuses. `--help` and `--version` print and
/// succeed; anything else is a bad task: a compute or ingest Job says so
/// in its termination log like any other failure, so the run's status
/// names the setting instead of a bare exit code.
fn refuse(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let _ = error.print();
    let message = error.to_string();
    let first_line = message.lines().next().unwrap_or_default().trim_start_matches("error: ");
    // clap could not read --termination-log, so its environment fallback
    // is read here, under the rule's name.
    let log = std::env::var_os("TERMINATION_LOG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(TERMINATION_LOG));
    WorkerError::new(FailureReason::BadTask, first_line).write_termination_log(&log);
    ExitCode::from(2)
}

fn generate_lake(out: &std::path::Path, spec: &lakegen::LakeSpec) -> ExitCode {
    match lakegen::generate(out, spec) {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("segment-worker: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_follows_the_naming_rule() {
        segment_runtime::config::assert_follows_naming_rule(&Cli::command(), &["generate-lake"]);
    }
}
