use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use segment_core::task::{ComputeTask, IngestTask, TASK_ENV, TERMINATION_LOG};
use segment_worker::failure::WorkerError;
use segment_worker::{compute, ingest, lakegen};

#[derive(Parser)]
#[command(name = "segment-worker", version, about = "The compute and ingest Jobs of segment-operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a Segment definition over the lake and write the result files.
    Compute(TaskArgs),
    /// Load a result into the store as a new version (never activates it).
    Ingest {
        #[command(flatten)]
        task: TaskArgs,
        /// `redis://host:port` or `redis+cluster://host:port,host:port`.
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
    },
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
struct TaskArgs {
    /// The task JSON; the operator passes it in this variable.
    #[arg(long = "task", env = TASK_ENV)]
    task: String,
    /// Where the one-line failure reason goes.
    #[arg(long, env = "TERMINATION_LOG", default_value = TERMINATION_LOG)]
    termination_log: PathBuf,
}

fn parse<T: serde::de::DeserializeOwned>(args: &TaskArgs) -> Result<T, WorkerError> {
    serde_json::from_str(&args.task).map_err(|e| WorkerError::new("BadTask", format!("{TASK_ENV}: {e}")))
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Compute(args) => {
            let result = async { compute::run(&parse::<ComputeTask>(&args)?).await }.await;
            finish(result, &args.termination_log)
        }
        Command::Ingest { task: args, redis_url } => {
            let result = async {
                let task: IngestTask = parse(&args)?;
                let store = segment_store::redis::RedisStore::connect(&redis_url)
                    .await
                    .map_err(|e| WorkerError::new("StoreUnavailable", e.to_string()))?;
                ingest::run(&task, &store).await
            }
            .await;
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
