//! `segment-worker compute`: evaluates a definition over the lake with
//! DataFusion and writes the result (`segment_core::manifest`).
//!
//! - Lake tables are read where they are (`s3://` or `file://`, Parquet,
//!   CSV with a header, NDJSON) as listing tables, so files stream through
//!   the engine rather than being loaded. A Delta table is read as of the
//!   snapshot time ([`crate::delta`]): exactly the live Parquet files of
//!   the newest version committed at or before it, with partition values
//!   as columns; the manifest records each table read and the version.
//!   An Iceberg table likewise ([`crate::iceberg`]): the live Parquet
//!   files of the snapshot current at the snapshot time, whose id the
//!   manifest records.
//! - `now()` (and `current_timestamp`, `current_date`, `current_time`) is
//!   the task's snapshot time, so a version recomputed later has the same
//!   members.
//! - Members are distinct, non-empty ids, sorted, so a retried run writes
//!   byte-identical parts. Parts are written as the result streams out;
//!   the manifest is written last, and an earlier manifest of the same
//!   version is removed first: no manifest, no result.
//! - The engine's memory is capped; sorts and aggregations spill to disk.
//!
//! [`ComputeOptions`] say how the engine runs; `segment-worker compute`
//! takes them as flags (`--compute-memory-mb`, ...), standalone mode and
//! `kubectl segment preview` use the defaults.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{AsArray, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, SchemaError, TableReference};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    cast, col, lit, ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{execute_stream, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use segment_core::api::{SegmentSourceSpec, SourceFormat, StaticList};
use segment_core::definition::DefinitionError;
use segment_core::index::IdSetWriter;
use segment_core::manifest::{self, Manifest, Part, SourceRead};
use segment_core::reasons::FailureReason;
use segment_core::rules_sql::{self, segment_table};
use segment_core::task::{ComputeTask, SegmentInput};
use segment_store::objects::{child, locate};
use segment_store::results::ResultDir;
use serde::Serialize;
use tracing::info;

use crate::failure::WorkerError;
use crate::lake_table::{delta_table_at, iceberg_table_at, source_error};

/// Ids per result part unless configured.
pub const DEFAULT_PART_SIZE: usize = 1_000_000;
/// The engine's memory pool when neither the flag nor the container's
/// limit says otherwise.
pub const DEFAULT_MEMORY_MB: usize = 1024;
/// The part of a container's memory limit given to the pool (numerator,
/// denominator): the rest holds what the pool does not count (Parquet
/// pages being decoded, result files being written, the allocator's own).
const POOL_SHARE_OF_CONTAINER: (u64, u64) = (2, 3);

/// The memory pool for a process whose container is limited to
/// `container_limit` bytes: two thirds of it, or [`DEFAULT_MEMORY_MB`]
/// without a limit. A compute Job's pool then grows with the memory its
/// class gives it instead of leaving most of it unused.
pub fn memory_pool_for(container_limit: Option<u64>) -> usize {
    let (share, of) = POOL_SHARE_OF_CONTAINER;
    match container_limit {
        Some(limit) => usize::try_from(limit / of * share).unwrap_or(usize::MAX),
        None => DEFAULT_MEMORY_MB * 1024 * 1024,
    }
}

/// The memory limit of the container this process runs in, from its
/// cgroup (v2's `memory.max`, else v1's `memory.limit_in_bytes`); `None`
/// when there is none or it cannot be read.
pub fn container_memory_limit() -> Option<u64> {
    ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| cgroup_memory_limit(&text))
}

/// A cgroup memory limit file's bytes; `None` for v2's `max` and for v1's
/// "unlimited", a page-rounded `i64::MAX`.
fn cgroup_memory_limit(text: &str) -> Option<u64> {
    const UNLIMITED_ABOVE: u64 = 1 << 62;
    text.trim().parse::<u64>().ok().filter(|bytes| *bytes < UNLIMITED_ABOVE)
}

/// DataFusion settings the worker changes from DataFusion's defaults, each
/// measured with `segment-bench compute` (docs/benchmarks.md). Unlike the
/// settings of the worker's contract (`Engine::new`), the admin's
/// `DATAFUSION_*` variable for one of these wins.
///
/// - Partial aggregation is skipped once a partition's first 100,000 rows
///   average fewer than about three rows a group (DataFusion's default:
///   fewer than 1.25). Below that, aggregating each partition's rows and
///   then the partitions' groups again costs more than sending the rows to
///   the one partition that aggregates them: on 2.4M orders of 822,000
///   users, 298 ms of CPU against 181 ms.
const TUNED_DEFAULTS: &[(&str, &str)] = &[("datafusion.execution.skip_partial_aggregation_probe_ratio_threshold", "0.3")];

/// Sets [`TUNED_DEFAULTS`] but those `is_set` says the environment sets.
fn set_tuned_defaults(
    options: &mut datafusion::config::ConfigOptions,
    is_set: impl Fn(&str) -> bool,
) -> datafusion::common::Result<()> {
    for (key, value) in TUNED_DEFAULTS {
        if !is_set(&key.to_uppercase().replace('.', "_")) {
            options.set(key, value)?;
        }
    }
    Ok(())
}

/// The one column of a segment's members.
pub(crate) const USER_ID: &str = "user_id";
/// The table a static list is read as.
pub(crate) const STATIC_TABLE: &str = "static_list";
/// Bytes read from a static list to tell a CSV from a plain list of ids.
const SNIFF_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeReport {
    pub version: u64,
    pub members: u64,
    pub parts: usize,
    /// Bytes sorts and aggregations wrote to disk for want of memory; a
    /// run that spills a lot runs faster with more memory.
    pub spilled_bytes: u64,
}

/// How the engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeOptions {
    /// Bytes the engine may hold before sorts and aggregations spill.
    pub memory_limit: usize,
    /// Directory for spill files; the OS temp dir when unset.
    pub spill_dir: Option<PathBuf>,
    /// Ids per result part.
    pub part_size: usize,
    /// Parallel partitions; the CPUs when unset.
    pub partitions: Option<usize>,
}

impl Default for ComputeOptions {
    fn default() -> Self {
        ComputeOptions {
            memory_limit: DEFAULT_MEMORY_MB * 1024 * 1024,
            spill_dir: None,
            part_size: DEFAULT_PART_SIZE,
            partitions: None,
        }
    }
}

/// Runs `task` with the default options.
pub async fn run(task: &ComputeTask) -> Result<ComputeReport, WorkerError> {
    run_with(task, &ComputeOptions::default()).await
}

/// Runs `task` on its engine: DataFusion in this process, or Spark
/// (`engine: spark`) through `spark-submit --master local[*]`
/// ([`crate::spark::run_local`]).
pub async fn run_with(task: &ComputeTask, options: &ComputeOptions) -> Result<ComputeReport, WorkerError> {
    if crate::spark::runs_on_spark(task) {
        return crate::spark::run_local(task, options).await;
    }
    let started = Instant::now();
    // Removes a manifest left by an earlier run of this version first.
    let mut writer = ResultWriter::start(task, options.part_size).await?;
    let (spilled_bytes, sources) = evaluate(task, options, &mut writer)
        .await
        .map_err(|e| WorkerError { message: without_data(&one_line(&e.message), &tenant_text(task)), ..e })?;
    let report = writer.finish(sources, spilled_bytes).await?;
    info!(
        segment = %task.segment,
        version = task.version,
        members = report.members,
        parts = report.parts,
        spilled_bytes,
        seconds = started.elapsed().as_secs_f64(),
        "computed"
    );
    Ok(report)
}

/// Runs `task`'s definition on DataFusion to the end without writing a
/// result, and gives its physical plan with each operator's metrics (rows,
/// time, spills: what `EXPLAIN ANALYZE` prints), to see where a
/// definition's time goes (`segment-bench compute --explain`).
pub async fn explain_analyze(task: &ComputeTask, options: &ComputeOptions) -> Result<String, WorkerError> {
    let engine = Engine::new(task, options)?;
    let members = engine.members().await?;
    let task_ctx = Arc::new(members.task_ctx());
    let plan = members.create_physical_plan().await.map_err(|e| engine.classify(e))?;
    datafusion::physical_plan::collect(plan.clone(), task_ctx).await.map_err(|e| engine.classify(e))?;
    let text = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true).to_string();
    Ok(text)
}

/// Evaluates the definition into `writer`: the bytes spilled on the way
/// and the lake tables read.
async fn evaluate(
    task: &ComputeTask,
    options: &ComputeOptions,
    writer: &mut ResultWriter,
) -> Result<(u64, Vec<SourceRead>), WorkerError> {
    let engine = Engine::new(task, options)?;
    let members = engine.members().await?;
    let task_ctx = Arc::new(members.task_ctx());
    let plan = members.create_physical_plan().await.map_err(|e| engine.classify(e))?;
    let stream = execute_stream(plan.clone(), task_ctx).map_err(|e| engine.classify(e))?;
    write_ids(writer, stream, &engine).await?;
    let mut sources = engine.read.lock().map(|read| read.clone()).unwrap_or_default();
    sources.sort_by(|a, b| a.table.cmp(&b.table));
    Ok((spilled_bytes(plan.as_ref()), sources))
}

fn spilled_bytes(plan: &dyn ExecutionPlan) -> u64 {
    let own = plan.metrics().and_then(|m| m.spilled_bytes()).unwrap_or(0) as u64;
    own + plan.children().into_iter().map(|child| spilled_bytes(child.as_ref())).sum::<u64>()
}

pub(crate) async fn retract_manifest(results_uri: &str) -> Result<(), WorkerError> {
    let failed = |e: String| WorkerError::new(FailureReason::WriteFailed, format!("{results_uri}: {e}"));
    let location = locate(results_uri).map_err(|e| failed(e.to_string()))?;
    let path = child(&location.path, manifest::MANIFEST_FILE);
    match location.store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(failed(format!("removing the previous {}: {e}", manifest::MANIFEST_FILE))),
    }
}

/// Streams the query's ids into `writer`.
async fn write_ids(
    writer: &mut ResultWriter,
    mut stream: SendableRecordBatchStream,
    engine: &Engine<'_>,
) -> Result<(), WorkerError> {
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| engine.classify(e))?;
        let ids = utf8_column(&batch).map_err(|e| WorkerError::new(FailureReason::QueryError, e))?;
        for id in ids.iter().flatten() {
            // The plan sorts the ids bytewise and de-duplicates them; the
            // writer refuses anything else rather than write a wrong index,
            // and ids that would break the one-id-a-line parts.
            writer.push(id).await.map_err(|e| match e {
                IdRefused::Write(error) => error,
                refused => WorkerError::new(FailureReason::QueryError, format!("the result's ids: {refused}")),
            })?;
        }
    }
    Ok(())
}

/// Writes a version's result from ids that come sorted bytewise and
/// distinct, for both engines: parts of `part_size` ids as they come, the
/// index file, and the manifest last, so a run that stops half-way leaves
/// no result. Starting removes a manifest an earlier run of the version
/// left, which would vouch for parts about to be overwritten.
pub struct ResultWriter {
    dir: ResultDir,
    task: ComputeTask,
    part_size: usize,
    parts: Vec<Part>,
    index: IdSetWriter,
    buffer: String,
    in_buffer: usize,
    total: u64,
}

/// An id [`ResultWriter::push`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdRefused {
    #[error("an empty id, or one with a line break")]
    Invalid,
    #[error("an id not after the one before it: ids must be sorted bytewise and distinct")]
    Unsorted,
    /// The part could not be written.
    #[error("{0}")]
    Write(WorkerError),
}

impl ResultWriter {
    pub async fn start(task: &ComputeTask, part_size: usize) -> Result<ResultWriter, WorkerError> {
        let dir = ResultDir::open(&task.results_uri).map_err(|e| WorkerError::new(FailureReason::WriteFailed, e.to_string()))?;
        retract_manifest(&task.results_uri).await?;
        Ok(ResultWriter {
            dir,
            task: task.clone(),
            part_size: part_size.max(1),
            parts: Vec::new(),
            index: IdSetWriter::new(),
            buffer: String::new(),
            in_buffer: 0,
            total: 0,
        })
    }

    /// Appends the next id; a part is written each `part_size` ids.
    pub async fn push(&mut self, id: &str) -> Result<(), IdRefused> {
        if id.contains(['\n', '\r']) {
            return Err(IdRefused::Invalid);
        }
        self.index.push(id).map_err(|e| match e {
            segment_core::index::IndexError::Unsorted { .. } => IdRefused::Unsorted,
            _ => IdRefused::Invalid,
        })?;
        self.buffer.push_str(id);
        self.buffer.push('\n');
        self.in_buffer += 1;
        self.total += 1;
        if self.in_buffer == self.part_size {
            self.flush().await.map_err(IdRefused::Write)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), WorkerError> {
        let text = std::mem::take(&mut self.buffer);
        self.in_buffer = 0;
        let part =
            self.dir.write_part(self.parts.len(), text.split_terminator('\n')).await.map_err(|e| {
                WorkerError::new(FailureReason::WriteFailed, one_line(&format!("{}: {e}", self.task.results_uri)))
            })?;
        self.parts.push(part);
        Ok(())
    }

    /// Writes the last part, the index and the manifest, which records
    /// `sources` (the lake tables read) and makes the result whole.
    pub async fn finish(mut self, sources: Vec<SourceRead>, spilled_bytes: u64) -> Result<ComputeReport, WorkerError> {
        let uri = self.task.results_uri.clone();
        let failed = |e: String| WorkerError::new(FailureReason::WriteFailed, one_line(&format!("{uri}: {e}")));
        if self.in_buffer > 0 {
            self.flush().await?;
        }
        let index = std::mem::replace(&mut self.index, IdSetWriter::new());
        let index = self.dir.write_index(index.finish(), self.total).await.map_err(|e| failed(e.to_string()))?;
        let task = &self.task;
        let manifest = Manifest {
            format: manifest::FORMAT.to_string(),
            segment: task.segment.clone(),
            version: task.version,
            generation: task.generation,
            definition_hash: task.definition_hash.clone(),
            snapshot_time: task.snapshot_time,
            computed_at: Utc::now(),
            members: self.total,
            parts: self.parts,
            index: Some(index),
            sources,
        };
        self.dir.write_manifest(&manifest).await.map_err(|e| failed(e.to_string()))?;
        Ok(ComputeReport { version: task.version, members: self.total, parts: manifest.parts.len(), spilled_bytes })
    }
}

fn utf8_column(batch: &RecordBatch) -> Result<StringArray, String> {
    let column = batch.column(0);
    if let Some(strings) = column.as_string_opt::<i32>() {
        return Ok(strings.clone());
    }
    let cast = datafusion::arrow::compute::cast(column, &DataType::Utf8).map_err(|e| e.to_string())?;
    Ok(cast.as_string::<i32>().clone())
}

/// One run's DataFusion session and the tables registered in it.
struct Engine<'a> {
    task: &'a ComputeTask,
    ctx: SessionContext,
    /// Registered tables and where they are read from, for messages.
    tables: std::sync::Mutex<BTreeMap<String, String>>,
    /// The lake tables registered, and the version of each Delta table.
    read: std::sync::Mutex<Vec<SourceRead>>,
}

impl<'a> Engine<'a> {
    fn new(task: &'a ComputeTask, options: &ComputeOptions) -> Result<Engine<'a>, WorkerError> {
        let engine_error = |e: DataFusionError| WorkerError::new(FailureReason::QueryError, format!("starting the engine: {e}"));
        let pool = TrackConsumersPool::new(FairSpillPool::new(options.memory_limit), NonZeroUsize::MIN.saturating_add(4));
        let mut runtime = RuntimeEnvBuilder::new().with_memory_pool(Arc::new(pool));
        if let Some(dir) = &options.spill_dir {
            runtime = runtime.with_temp_file_path(dir);
        }
        let runtime = runtime.build_arc().map_err(engine_error)?;
        // DataFusion's own options may be tuned with its `DATAFUSION_*`
        // variables (`DATAFUSION_EXECUTION_BATCH_SIZE=16384`): the worker's
        // environment is the admin's (the ComputeClass's `env`). The
        // settings below are the worker's contract and win.
        let mut config = SessionConfig::from_env().map_err(engine_error)?.with_information_schema(false);
        set_tuned_defaults(config.options_mut(), |name| std::env::var_os(name).is_some()).map_err(engine_error)?;
        if let Some(partitions) = options.partitions {
            config = config.with_target_partitions(partitions);
        }
        // Zoned timestamps come out in UTC, like the snapshot time.
        config.options_mut().execution.time_zone = Some(UTC_OFFSET.to_string());
        // One global sort instead of a sort per partition merged at the end:
        // that final merge cannot spill and, while other partitions still
        // aggregate and sort, finds the pool taken and fails the run. The
        // scan and the de-duplication stay parallel; the sort starts
        // merging only once they are done, with the whole pool to itself.
        config.options_mut().optimizer.repartition_sorts = false;
        // The sort sets this much aside to merge its spills; the default
        // (10 MB) alone exceeds a small pool.
        let execution = &mut config.options_mut().execution;
        execution.sort_spill_reservation_bytes = execution.sort_spill_reservation_bytes.min(options.memory_limit / 4);
        // A sort whose rows are charged less than this concatenates them and
        // sorts once, instead of sorting every 8,192-row batch and merging
        // them all (the default, 1 MB, merges almost always); a spilling
        // sort sorts each run it spills the same way. The concatenated copy
        // fits in what the sort has reserved (twice its rows). Measured on
        // the 1M-user lake: 822,000 sums 78 ms to 11 ms, 3M orders by user
        // and time 393 ms to 118 ms (docs/benchmarks.md).
        execution.sort_in_place_threshold_bytes = execution.sort_in_place_threshold_bytes.max(options.memory_limit / 8);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(crate::sorted_window::SortedWindowRule))
            .with_physical_optimizer_rule(Arc::new(crate::sort_input::CompactSortInputRule))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_udf(ScalarUDF::from(SnapshotNow::new(task.snapshot_time)));
        Ok(Engine { task, ctx, tables: Default::default(), read: Default::default() })
    }

    /// The definition's members: one `user_id` column of distinct,
    /// non-empty ids in ascending order.
    async fn members(&self) -> Result<DataFrame, WorkerError> {
        let definition = &self.task.definition;
        let frame = match (&definition.sql, &definition.rules, &definition.static_list) {
            (Some(sql), None, None) => self.query(sql).await?,
            (None, Some(rule), None) => {
                for name in rule.segment_refs() {
                    if !self.task.segment_inputs.iter().any(|input| input.name == name) {
                        return Err(WorkerError::new(
                            FailureReason::SegmentNotReady,
                            format!("segment `{name}` has no active version to read yet"),
                        ));
                    }
                }
                let sql = rules_sql::compile(rule, &self.task.sources).map_err(rules_error)?;
                self.query(&sql).await?
            }
            (None, None, Some(list)) => self.static_list(list).await?,
            _ => {
                return Err(WorkerError::new(
                    FailureReason::InvalidDefinition,
                    "spec.definition: set exactly one of sql, rules or static",
                ))
            }
        };
        self.distinct_ids(frame)
    }

    fn distinct_ids(&self, frame: DataFrame) -> Result<DataFrame, WorkerError> {
        let schema = frame.schema().clone();
        if schema.fields().len() != 1 {
            // Only names the author wrote: `SELECT *` over a CSV would
            // otherwise print its header line, which is the file's data.
            let written = tenant_text(self.task);
            let names: Vec<&str> = schema
                .fields()
                .iter()
                .map(|f| if written.contains(f.name().as_str()) { f.name().as_str() } else { "…" })
                .collect();
            return Err(WorkerError::new(
                FailureReason::NotOneColumn,
                format!(
                    "the definition returns {} columns ({}); it must return one column of user ids",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
        let (qualifier, field) = schema.qualified_field(0);
        if !is_id_type(field.data_type()) {
            return Err(WorkerError::new(
                FailureReason::QueryError,
                format!("the definition returns `{}` of type {}; user ids are text or integers", field.name(), field.data_type()),
            ));
        }
        let id = cast(Expr::Column(Column::from((qualifier, field))), DataType::Utf8).alias(USER_ID);
        let present = col(USER_ID).is_not_null().and(col(USER_ID).not_eq(lit("")));
        frame
            .select(vec![id])
            .and_then(|f| f.filter(present))
            .and_then(|f| f.distinct())
            .and_then(|f| f.sort(vec![col(USER_ID).sort(true, false)]))
            .map_err(|e| self.classify(e))
    }

    /// Plans `sql` at the snapshot time, registering the tables it reads.
    async fn query(&self, sql: &str) -> Result<DataFrame, WorkerError> {
        let parsing = self.ctx.state();
        let dialect = parsing.config().options().sql_parser.dialect;
        let statement = parsing.sql_to_statement(sql, &dialect).map_err(|e| self.classify(e))?;
        let references = parsing.resolve_table_references(&statement).map_err(|e| self.classify(e))?;
        let mut undeclared = Vec::new();
        for reference in references {
            let name = reference.table().to_string();
            if self.tables.lock().map(|t| t.contains_key(&name)).unwrap_or(false) {
                continue;
            }
            if let Some(source) = self.task.sources.iter().find(|s| s.table == name) {
                self.register_source(source).await?;
            } else if let Some(input) = self.task.segment_inputs.iter().find(|i| segment_table(&i.name) == name) {
                self.register_segment_input(input).await?;
            } else {
                // Maybe a table function; the planner decides.
                undeclared.push(name);
            }
        }
        let mut state = self.ctx.state();
        state.execution_props_mut().query_execution_start_time = Some(self.task.snapshot_time);
        let plan = match state.statement_to_plan(statement).await {
            Ok(plan) => plan,
            Err(e) => {
                if let Some(name) = undeclared.first() {
                    let declared: Vec<&str> = self.task.sources.iter().map(|s| s.table.as_str()).collect();
                    return Err(WorkerError::new(
                        FailureReason::UnknownTable,
                        format!(
                            "table `{name}` is not declared by any SegmentSource (declared: {})",
                            if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
                        ),
                    ));
                }
                return Err(self.classify(e));
            }
        };
        // Definitions read; they do not create tables, write files or change settings.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| self.classify(e))?;
        Ok(DataFrame::new(state, plan))
    }

    async fn register_source(&self, source: &SegmentSourceSpec) -> Result<(), WorkerError> {
        if source.format == SourceFormat::Delta {
            return self.register_delta(source).await;
        }
        if source.format == SourceFormat::Iceberg {
            return self.register_iceberg(source).await;
        }
        let unreadable = |detail: String| {
            WorkerError::new(FailureReason::UnreadableSource, format!("table `{}` ({}): {detail}", source.table, source.uri))
        };
        let location = locate(&source.uri).map_err(|e| unreadable(e.to_string()))?;
        self.ctx.register_object_store(&location.root, location.store);
        let url = listing_url(&source.uri).map_err(unreadable)?;
        let extension = data_file_extension(&self.ctx, &url, source.format).await.map_err(unreadable)?;
        let format: Arc<dyn FileFormat> = match source.format {
            SourceFormat::Parquet => Arc::new(ParquetFormat::default()),
            SourceFormat::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
            SourceFormat::Ndjson => Arc::new(JsonFormat::default()),
            SourceFormat::Delta | SourceFormat::Iceberg => unreachable!("read by register_delta, register_iceberg"),
        };
        let options = ListingOptions::new(format).with_file_extension(extension);
        let state = self.ctx.state();
        let mut schema = options.infer_schema(&state, &url).await.map_err(|e| unreadable(one_line(&e.to_string())))?;
        if source.format == SourceFormat::Csv {
            schema = ids_as_text(&schema, &source.user_id_column);
        }
        let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(schema);
        let table = ListingTable::try_new(config).map_err(|e| unreadable(one_line(&e.to_string())))?;
        self.register(&source.table, &source.uri, Arc::new(table))?;
        self.record_read(SourceRead { table: source.table.clone(), format: source.format, version: None });
        Ok(())
    }

    /// A Delta table as of the snapshot time: the live Parquet files of
    /// that version, one listing table per set of partition values, the
    /// partition values as literal columns, all as one view.
    async fn register_delta(&self, source: &SegmentSourceSpec) -> Result<(), WorkerError> {
        let unreadable = |detail: String| source_error(source, FailureReason::UnreadableSource, detail);
        let (snapshot, location) = delta_table_at(source, self.task).await?;
        self.ctx.register_object_store(&location.root, location.store.clone());
        let partitioned = |name: &str| snapshot.partition_columns.iter().position(|c| c == name);
        let data_fields: Vec<Field> =
            snapshot.schema.fields().iter().filter(|f| partitioned(f.name()).is_none()).map(|f| f.as_ref().clone()).collect();
        let file_schema = Arc::new(Schema::new(data_fields));
        let mut groups: BTreeMap<Vec<Option<String>>, Vec<ListingTableUrl>> = BTreeMap::new();
        for file in &snapshot.files {
            let url = ListingTableUrl::parse(format!("{}{}", location.root, file.path))
                .map_err(|e| unreadable(one_line(&e.to_string())))?;
            let values = snapshot.partition_columns.iter().map(|c| file.partition_values.get(c).cloned().flatten()).collect();
            groups.entry(values).or_default().push(url);
        }
        let mut frames = Vec::with_capacity(groups.len());
        for (values, urls) in groups {
            let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
            let config =
                ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(file_schema.clone());
            let listing = ListingTable::try_new(config).map_err(|e| unreadable(one_line(&e.to_string())))?;
            let frame = self.ctx.read_table(Arc::new(listing)).map_err(|e| self.classify(e))?;
            let columns: Vec<Expr> = snapshot
                .schema
                .fields()
                .iter()
                .map(|f| match partitioned(f.name()) {
                    Some(i) => cast(lit(ScalarValue::Utf8(values[i].clone())), f.data_type().clone()).alias(f.name()),
                    None => Expr::Column(Column::new_unqualified(f.name())),
                })
                .collect();
            frames.push(frame.select(columns).map_err(|e| self.classify(e))?);
        }
        let mut frames = frames.into_iter();
        let table: Arc<dyn TableProvider> = match frames.next() {
            Some(first) => {
                let mut all = first;
                for frame in frames {
                    all = all.union(frame).map_err(|e| self.classify(e))?;
                }
                all.into_view()
            }
            None => Arc::new(MemTable::try_new(snapshot.schema.clone(), vec![vec![]]).map_err(|e| unreadable(e.to_string()))?),
        };
        self.register(&source.table, &source.uri, table)?;
        info!(table = %source.table, version = snapshot.version, files = snapshot.files.len(), "delta table");
        self.record_read(SourceRead {
            table: source.table.clone(),
            format: SourceFormat::Delta,
            version: Some(snapshot.version),
        });
        Ok(())
    }

    /// An Iceberg table as of the snapshot time ([`crate::iceberg`]):
    /// exactly the live Parquet files of the snapshot current then, read
    /// with the snapshot's schema.
    async fn register_iceberg(&self, source: &SegmentSourceSpec) -> Result<(), WorkerError> {
        let snapshot = iceberg_table_at(source, self.task).await?;
        let location = locate(&snapshot.table_location).map_err(|e| source_error(source, FailureReason::UnreadableSource, e))?;
        self.ctx.register_object_store(&location.root, location.store);
        let table: Arc<dyn TableProvider> = if snapshot.files.is_empty() {
            Arc::new(MemTable::try_new(snapshot.schema.clone(), vec![vec![]]).map_err(|e| self.classify(e))?)
        } else {
            let urls =
                snapshot.files.iter().map(ListingTableUrl::parse).collect::<Result<Vec<_>, _>>().map_err(|e| self.classify(e))?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
            let config =
                ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(snapshot.schema.clone());
            Arc::new(ListingTable::try_new(config).map_err(|e| self.classify(e))?)
        };
        self.register(&source.table, &source.uri, table)?;
        info!(table = %source.table, snapshot = snapshot.snapshot_id, files = snapshot.files.len(), "iceberg table");
        self.record_read(SourceRead {
            table: source.table.clone(),
            format: SourceFormat::Iceberg,
            version: Some(snapshot.snapshot_id),
        });
        Ok(())
    }

    fn record_read(&self, read: SourceRead) {
        if let Ok(mut all) = self.read.lock() {
            all.push(read);
        }
    }

    /// Another segment's members, streamed from its result parts; every
    /// part is checked against the manifest as it is read.
    async fn register_segment_input(&self, input: &SegmentInput) -> Result<(), WorkerError> {
        let unreadable = |detail: String| {
            WorkerError::new(
                FailureReason::UnreadableSource,
                format!("segment `{}` v{} ({}): {detail}", input.name, input.version, input.results_uri),
            )
        };
        let dir = ResultDir::open(&input.results_uri).map_err(|e| unreadable(e.to_string()))?;
        let manifest = dir.read_manifest().await.map_err(|e| unreadable(e.to_string()))?.ok_or_else(|| {
            WorkerError::new(
                FailureReason::SegmentNotReady,
                format!(
                    "segment `{}` v{} has no result at {} (no {})",
                    input.name,
                    input.version,
                    input.results_uri,
                    manifest::MANIFEST_FILE
                ),
            )
        })?;
        if manifest.version != input.version {
            return Err(unreadable(format!("the manifest there is for v{}", manifest.version)));
        }
        let schema = Arc::new(Schema::new(vec![Field::new(USER_ID, DataType::Utf8, false)]));
        let table: Arc<dyn TableProvider> = if manifest.parts.is_empty() {
            Arc::new(MemTable::try_new(schema, vec![vec![]]).map_err(|e| unreadable(e.to_string()))?)
        } else {
            let partitions: Vec<Arc<dyn PartitionStream>> = manifest
                .parts
                .iter()
                .map(|part| {
                    Arc::new(ResultPartStream {
                        schema: schema.clone(),
                        dir: dir.clone(),
                        part: part.clone(),
                        segment: input.name.clone(),
                        uri: input.results_uri.clone(),
                    }) as Arc<dyn PartitionStream>
                })
                .collect();
            Arc::new(StreamingTable::try_new(schema, partitions).map_err(|e| unreadable(e.to_string()))?)
        };
        self.register(&segment_table(&input.name), &input.results_uri, table)
    }

    /// A static list: a CSV with a `user_id` column, or one id a line.
    async fn static_list(&self, list: &StaticList) -> Result<DataFrame, WorkerError> {
        let unreadable =
            |detail: String| WorkerError::new(FailureReason::UnreadableSource, format!("static list {}: {detail}", list.uri));
        let location = locate(&list.uri).map_err(|e| unreadable(e.to_string()))?;
        let header = static_list_header(&location).await.map_err(unreadable)?;
        self.ctx.register_object_store(&location.root, location.store);
        let (format, columns) = match header {
            StaticHeader::Csv(header) => (CsvFormat::default().with_has_header(true), unique_names(header)),
            StaticHeader::CsvWithoutUserId => {
                return Err(WorkerError::new(
                    FailureReason::UnknownColumn,
                    format!("static list {}: the CSV header has no `{USER_ID}` column", list.uri),
                ))
            }
            // One id a line: separators that never occur in ids keep
            // commas and quotes inside an id intact.
            StaticHeader::Ids => {
                (CsvFormat::default().with_has_header(false).with_delimiter(0x1f).with_quote(0x1e), vec![USER_ID.to_string()])
            }
        };
        let schema = Arc::new(Schema::new(columns.iter().map(|c| Field::new(c, DataType::Utf8, true)).collect::<Vec<_>>()));
        let url = listing_url(&list.uri).map_err(unreadable)?;
        let options = ListingOptions::new(Arc::new(format)).with_file_extension("");
        let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(schema);
        let table = ListingTable::try_new(config).map_err(|e| unreadable(one_line(&e.to_string())))?;
        self.register(STATIC_TABLE, &list.uri, Arc::new(table))?;
        // Uploaded lists carry stray spaces and CRs.
        self.query(&format!("SELECT trim(\"{USER_ID}\") AS {USER_ID} FROM {STATIC_TABLE}")).await
    }

    fn register(&self, name: &str, uri: &str, table: Arc<dyn TableProvider>) -> Result<(), WorkerError> {
        self.ctx.register_table(TableReference::bare(name), table).map_err(|e| {
            WorkerError::new(FailureReason::QueryError, format!("registering table `{name}`: {}", one_line(&e.to_string())))
        })?;
        if let Ok(mut tables) = self.tables.lock() {
            tables.insert(name.to_string(), uri.to_string());
        }
        Ok(())
    }

    /// Turns an engine error into the reason the operator acts on.
    fn classify(&self, error: DataFusionError) -> WorkerError {
        match cause(&error) {
            Cause::Worker(e) => e,
            Cause::Source(detail) => self.unreadable(&detail),
            Cause::UnknownColumn(message) => WorkerError::new(FailureReason::UnknownColumn, message),
            Cause::Resources(detail) => WorkerError::new(
                FailureReason::ResourcesExhausted,
                format!("{detail} (raise --compute-memory-mb, COMPUTE_MEMORY_MB, or the memory of the compute Job)"),
            ),
            Cause::Query(detail) => WorkerError::new(FailureReason::QueryError, detail),
        }
    }

    /// Names the tables a read error may come from: the engine's message
    /// names a file at best.
    fn unreadable(&self, detail: &str) -> WorkerError {
        let tables = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        let mentioned: Vec<_> = tables.iter().filter(|(_, uri)| mentions(detail, uri)).collect();
        let named = if mentioned.is_empty() { tables.iter().collect() } else { mentioned };
        let list: Vec<String> = named.iter().map(|(name, uri)| format!("`{name}` ({uri})")).collect();
        let what = if list.len() == 1 { format!("table {}", list[0]) } else { format!("tables {}", list.join(", ")) };
        WorkerError::new(FailureReason::UnreadableSource, format!("reading {what}: {detail}"))
    }
}

/// The extension of the data files under `url`: a directory may hold
/// markers (`_SUCCESS`) and other files next to the data.
pub(crate) async fn data_file_extension(
    ctx: &SessionContext,
    url: &ListingTableUrl,
    format: SourceFormat,
) -> Result<String, String> {
    let state = ctx.state();
    let store = state.runtime_env().object_store(url).map_err(|e| e.to_string())?;
    let files: Vec<_> = url
        .list_all_files(&state, store.as_ref(), "")
        .await
        .map_err(|e| one_line(&e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| one_line(&e.to_string()))?;
    let names: Vec<&str> = files
        .iter()
        .filter_map(|meta| meta.location.filename())
        .filter(|name| !name.starts_with('_') && !name.starts_with('.'))
        .collect();
    if names.is_empty() {
        return Err("no data files there".to_string());
    }
    if !url.is_collection() && files.len() == 1 {
        return Ok(String::new());
    }
    let known: &[&str] = match format {
        SourceFormat::Parquet | SourceFormat::Delta | SourceFormat::Iceberg => &[".parquet", ".parq"],
        SourceFormat::Csv => &[".csv"],
        SourceFormat::Ndjson => &[".ndjson", ".jsonl", ".json"],
    };
    Ok(known.iter().find(|ext| names.iter().any(|n| n.ends_with(*ext))).map(|ext| ext.to_string()).unwrap_or_default())
}

/// What the first line of a static list says it is.
pub(crate) enum StaticHeader {
    /// A CSV header naming `user_id`: its column names.
    Csv(Vec<String>),
    /// A CSV header (it has a comma) without `user_id`.
    CsvWithoutUserId,
    /// No header: one id a line.
    Ids,
}

/// Reads the head of a static list to tell a CSV from a plain list of ids.
pub(crate) async fn static_list_header(location: &segment_store::objects::Location) -> Result<StaticHeader, String> {
    let meta = location.store.head(&location.path).await.map_err(|e| one_line(&e.to_string()))?;
    let head =
        location.store.get_range(&location.path, 0..meta.size.min(SNIFF_BYTES)).await.map_err(|e| one_line(&e.to_string()))?;
    let text = String::from_utf8_lossy(&head);
    let first = text.trim_start_matches('\u{feff}').lines().next().unwrap_or("").trim();
    let header: Vec<String> = first.split(',').map(|f| f.trim().trim_matches('"').trim().to_string()).collect();
    Ok(if header.iter().any(|c| c == USER_ID) {
        StaticHeader::Csv(header)
    } else if first.contains(',') {
        StaticHeader::CsvWithoutUserId
    } else {
        StaticHeader::Ids
    })
}

/// Whether an error message names a file under `uri`.
fn mentions(detail: &str, uri: &str) -> bool {
    let path = uri.split_once("://").map(|(_, rest)| rest).unwrap_or(uri);
    let path = path.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
    !path.is_empty() && detail.contains(path)
}

pub(crate) fn rules_error(e: DefinitionError) -> WorkerError {
    if e.field.ends_with(".table") && e.message.starts_with("unknown table") {
        WorkerError::new(FailureReason::UnknownTable, e.to_string())
    } else {
        WorkerError::new(FailureReason::InvalidDefinition, e.to_string())
    }
}

fn is_id_type(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, value) => is_id_type(value),
        t => t.is_integer(),
    }
}

/// CSV inference reads `00123` as the number 123; ids are text.
fn ids_as_text(schema: &SchemaRef, user_id_column: &str) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| if f.name() == user_id_column { Field::new(f.name(), DataType::Utf8, true) } else { f.as_ref().clone() })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

fn unique_names(names: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let name = if name.is_empty() { format!("column_{}", i + 1) } else { name };
            if seen.insert(name.clone()) {
                name
            } else {
                format!("{name}_{}", i + 1)
            }
        })
        .collect()
}

/// The listing URL of a source: a directory (`…/`), a single file, or a
/// glob in the last segments (`s3://lake/orders/*.parquet`).
pub(crate) fn listing_url(uri: &str) -> Result<ListingTableUrl, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        // `file:///abs` or `file://./rel`: local paths, globs included, are
        // resolved against the working directory like `locate` does.
        return ListingTableUrl::parse(path).map_err(|e| one_line(&e.to_string()));
    }
    let Some(glob_at) = uri.find(['*', '?', '[']) else {
        return ListingTableUrl::parse(uri).map_err(|e| one_line(&e.to_string()));
    };
    let base_end = uri[..glob_at].rfind('/').map(|i| i + 1).unwrap_or(0);
    let (base, glob) = uri.split_at(base_end);
    ListingTableUrl::parse(base).and_then(|url| url.with_glob(glob)).map_err(|e| one_line(&e.to_string()))
}

/// What the Segment's author wrote: the definition and the sources. A
/// name or literal from it may appear in a message; anything else an
/// engine or a parser quotes was read from the files.
pub(crate) fn tenant_text(task: &ComputeTask) -> String {
    let written = serde_json::to_string(&(&task.definition, &task.sources, &task.segment)).unwrap_or_default();
    // The column a static list must have is the project's word, not data.
    format!("{written} {USER_ID}")
}

/// A message with every quoted fragment (`'…'`, `"…"`, `` `…` ``) that
/// the author did not write replaced by `…`. Messages reach the Segment's
/// status, its Events and the pod's log, which the author reads: a value
/// or a header line quoted by a CSV, JSON or cast error would hand them
/// the content of a file they named as a source (a token, another
/// tenant's results) without the right to read it.
pub(crate) fn without_data(message: &str, written_by_author: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['\'', '"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        let after = &rest[open + 1..];
        let Some(close) = after.find(quote) else { break };
        let fragment = &after[..close];
        out.push_str(&rest[..=open]);
        if fragment.is_empty() || written_by_author.contains(fragment) {
            out.push_str(fragment);
        } else {
            out.push('…');
        }
        out.push(quote);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Messages end up in a termination log and a status field: one line, bounded.
pub(crate) fn one_line(text: &str) -> String {
    const MAX: usize = 1500;
    let joined = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    // Wrapped errors repeat their prefix ("Parquet error: Parquet error: …").
    let mut segments: Vec<&str> = joined.split(": ").collect();
    segments.dedup();
    let joined = segments.join(": ");
    match joined.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &joined[..cut]),
        None => joined,
    }
}

/// What went wrong, as far as the operator cares.
enum Cause {
    /// A failure this module raised inside the engine.
    Worker(WorkerError),
    /// Files could not be listed, fetched or decoded.
    Source(String),
    UnknownColumn(String),
    Resources(String),
    Query(String),
}

fn cause(error: &DataFusionError) -> Cause {
    let mut current = error;
    loop {
        current = match current {
            DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => inner,
            DataFusionError::Shared(inner) => inner.as_ref(),
            DataFusionError::Collection(errors) if !errors.is_empty() => &errors[0],
            DataFusionError::External(inner) => {
                return cause_of_dyn(inner.as_ref()).unwrap_or_else(|| Cause::Query(one_line(&inner.to_string())))
            }
            DataFusionError::ArrowError(inner, _) => return cause_of_arrow(inner),
            DataFusionError::ParquetError(inner) => return Cause::Source(one_line(&inner.to_string())),
            DataFusionError::ObjectStore(inner) => return Cause::Source(one_line(&inner.to_string())),
            DataFusionError::IoError(inner) => return Cause::Source(one_line(&inner.to_string())),
            DataFusionError::SchemaError(inner, _) => {
                return match inner.as_ref() {
                    SchemaError::FieldNotFound { field, valid_fields } => {
                        Cause::UnknownColumn(unknown_column(&field.flat_name(), valid_fields))
                    }
                    // Names from the files, unquoted in the engine's words.
                    SchemaError::DuplicateQualifiedField { .. } | SchemaError::DuplicateUnqualifiedField { .. } => {
                        Cause::Query("two columns of one name in a table or in the query".to_string())
                    }
                    other => Cause::Query(one_line(&other.to_string())),
                };
            }
            DataFusionError::ResourcesExhausted(detail) => return Cause::Resources(one_line(detail)),
            DataFusionError::SQL(inner, _) => return Cause::Query(format!("SQL syntax: {}", one_line(&inner.to_string()))),
            other => return Cause::Query(one_line(&other.message())),
        };
    }
}

fn cause_of_dyn(error: &(dyn StdError + Send + Sync + 'static)) -> Option<Cause> {
    if let Some(e) = error.downcast_ref::<DataFusionError>() {
        return Some(cause(e));
    }
    if let Some(e) = error.downcast_ref::<WorkerError>() {
        return Some(Cause::Worker(e.clone()));
    }
    if let Some(e) = error.downcast_ref::<ArrowError>() {
        return Some(cause_of_arrow(e));
    }
    if error.is::<datafusion::parquet::errors::ParquetError>()
        || error.is::<object_store::Error>()
        || error.is::<std::io::Error>()
    {
        return Some(Cause::Source(one_line(&error.to_string())));
    }
    None
}

fn cause_of_arrow(error: &ArrowError) -> Cause {
    match error {
        ArrowError::ExternalError(inner) => {
            cause_of_dyn(inner.as_ref()).unwrap_or_else(|| Cause::Source(one_line(&inner.to_string())))
        }
        ArrowError::CsvError(_) | ArrowError::JsonError(_) | ArrowError::ParquetError(_) | ArrowError::IoError(..) => {
            Cause::Source(one_line(&error.to_string()))
        }
        // The CSV reader's message for a value that does not fit the
        // inferred type; casts in a query say "Cannot cast".
        ArrowError::ParseError(message) if message.contains(" at line ") => Cause::Source(one_line(&error.to_string())),
        other => Cause::Query(one_line(&other.to_string())),
    }
}

/// Names the column and the tables searched, not the tables' columns:
/// those come from the files (a CSV's header line), and a source may be a
/// file its author cannot read otherwise.
fn unknown_column(name: &str, valid: &[Column]) -> String {
    let tables: BTreeSet<String> = valid.iter().filter_map(|c| c.relation.as_ref().map(|r| r.to_string())).collect();
    let place = if tables.is_empty() {
        String::new()
    } else {
        format!(" in {}", tables.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", "))
    };
    format!("unknown column `{name}`{place} (the tables' columns are not listed: they are read from the files)")
}

/// The offset the snapshot time is given in; DataFusion treats it like `UTC`.
const UTC_OFFSET: &str = "+00:00";

/// `now()` and `current_timestamp` fixed at the snapshot time.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SnapshotNow {
    signature: Signature,
    aliases: Vec<String>,
    nanos: Option<i64>,
}

impl SnapshotNow {
    fn new(snapshot: DateTime<Utc>) -> SnapshotNow {
        SnapshotNow {
            signature: Signature::nullary(Volatility::Immutable),
            aliases: vec!["current_timestamp".to_string()],
            nanos: snapshot.timestamp_nanos_opt(),
        }
    }

    fn value(&self) -> ScalarValue {
        ScalarValue::TimestampNanosecond(self.nanos, Some(Arc::from(UTC_OFFSET)))
    }
}

impl ScalarUDFImpl for SnapshotNow {
    fn name(&self) -> &str {
        "now"
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Timestamp(TimeUnit::Nanosecond, Some(Arc::from(UTC_OFFSET))))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value()))
    }

    fn simplify(&self, _args: Vec<Expr>, _info: &SimplifyContext) -> datafusion::error::Result<ExprSimplifyResult> {
        Ok(ExprSimplifyResult::Simplified(lit(self.value())))
    }
}

/// One result part of another segment, read and verified when scanned.
#[derive(Debug)]
struct ResultPartStream {
    schema: SchemaRef,
    dir: ResultDir,
    part: Part,
    segment: String,
    uri: String,
}

impl PartitionStream for ResultPartStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (dir, part, schema) = (self.dir.clone(), self.part.clone(), self.schema.clone());
        let (segment, uri) = (self.segment.clone(), self.uri.clone());
        let batch_size = ctx.session_config().batch_size().max(1);
        let batches = futures::stream::once(async move {
            let failed = |detail: String| {
                DataFusionError::External(Box::new(WorkerError::new(
                    FailureReason::UnreadableSource,
                    format!("segment `{segment}` ({uri}): {}: {detail}", part.file),
                )))
            };
            let bytes = dir.read_part(&part).await.map_err(|e| failed(e.to_string()))?;
            let ids = part.decode(&bytes).map_err(|e| failed(e.to_string()))?;
            let batches = ids
                .chunks(batch_size)
                .map(|chunk| {
                    RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from_iter_values(chunk.iter().copied()))])
                        .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
                })
                .collect::<Vec<_>>();
            Ok::<_, DataFusionError>(futures::stream::iter(batches))
        })
        .try_flatten();
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), batches))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_urls_keep_directories_files_and_globs() {
        let dir = listing_url("s3://lake/orders/").unwrap();
        assert!(dir.is_collection());
        assert_eq!(dir.prefix().as_ref(), "orders");
        let file = listing_url("s3://lake/users/users.csv").unwrap();
        assert!(!file.is_collection());
        let glob = listing_url("s3://lake/events/2025-*/part-*.ndjson").unwrap();
        assert_eq!(glob.prefix().as_ref(), "events");
        assert!(glob.get_glob().is_some());
        let relative = listing_url("file://./lake/orders/").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert!(relative.as_str().contains(cwd.to_str().unwrap()), "{}", relative.as_str());
        assert!(relative.is_collection());
    }

    /// The override itself, not only the planner's start time: a plan made
    /// the ordinary way (`SessionContext::sql` marks a fresh start time)
    /// still sees the snapshot.
    #[tokio::test]
    async fn now_is_the_snapshot_time() {
        let snapshot = DateTime::parse_from_rfc3339("2001-02-03T04:05:06.789Z").unwrap().with_timezone(&Utc);
        let task: ComputeTask = serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": snapshot, "definition": {"sql": "SELECT 1"}, "sources": [], "resultsUri": "file:///tmp/x/"
        }))
        .unwrap();
        let engine = Engine::new(&task, &ComputeOptions::default()).unwrap();
        let frame = engine.ctx.sql("SELECT now() AS a, current_timestamp AS b").await.unwrap();
        let zoned = DataType::Timestamp(TimeUnit::Nanosecond, Some(Arc::from(UTC_OFFSET)));
        assert!(frame.schema().fields().iter().all(|f| f.data_type() == &zoned), "{:?}", frame.schema());
        let batches = frame.collect().await.unwrap();
        for column in batches[0].columns() {
            let value = ScalarValue::try_from_array(column, 0).unwrap();
            assert_eq!(value, ScalarValue::TimestampNanosecond(snapshot.timestamp_nanos_opt(), Some(Arc::from(UTC_OFFSET))));
        }
    }

    /// `DATAFUSION_*` variables tune the engine; the worker's own settings
    /// stay.
    #[tokio::test]
    async fn datafusion_options_come_from_its_environment_variables() {
        let task: ComputeTask = serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": Utc::now(), "definition": {"sql": "SELECT 'u1' AS user_id"}, "sources": [],
            "resultsUri": "file:///tmp/unused/"
        }))
        .unwrap();
        std::env::set_var("DATAFUSION_EXECUTION_BATCH_SIZE", "4321");
        std::env::set_var("DATAFUSION_OPTIMIZER_REPARTITION_SORTS", "true");
        std::env::set_var("DATAFUSION_EXECUTION_SORT_IN_PLACE_THRESHOLD_BYTES", "1");
        let engine = Engine::new(&task, &ComputeOptions::default());
        std::env::remove_var("DATAFUSION_EXECUTION_BATCH_SIZE");
        std::env::remove_var("DATAFUSION_OPTIMIZER_REPARTITION_SORTS");
        std::env::remove_var("DATAFUSION_EXECUTION_SORT_IN_PLACE_THRESHOLD_BYTES");
        let state = engine.unwrap().ctx.state();
        let options = state.config().options();
        assert_eq!(state.config().batch_size(), 4321);
        assert!(!options.optimizer.repartition_sorts, "the worker's own setting wins");
        assert_eq!(
            options.execution.sort_in_place_threshold_bytes,
            ComputeOptions::default().memory_limit / 8,
            "sorts under an eighth of the pool sort in place, whatever the environment says"
        );
    }

    /// The tuned defaults apply unless the admin's environment sets them;
    /// partial aggregation is then skipped for groups of two rows, which
    /// DataFusion's default keeps aggregating twice. The members are the
    /// same.
    #[tokio::test]
    async fn partial_aggregation_is_skipped_when_it_barely_reduces_the_rows() {
        let mut options = datafusion::config::ConfigOptions::new();
        set_tuned_defaults(&mut options, |_| true).unwrap();
        assert_eq!(options.execution.skip_partial_aggregation_probe_ratio_threshold, 0.8, "DataFusion's, the admin's");
        set_tuned_defaults(&mut options, |name| name != "DATAFUSION_EXECUTION_SKIP_PARTIAL_AGGREGATION_PROBE_RATIO_THRESHOLD")
            .unwrap();
        assert_eq!(options.execution.skip_partial_aggregation_probe_ratio_threshold, 0.3);

        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders.csv");
        let mut text = String::from("user_id,amount\n");
        for row in 0..400_000u32 {
            text.push_str(&format!("u{:06},{}\n", row / 2, row % 7));
        }
        std::fs::write(&orders, text).unwrap();
        let task: ComputeTask = serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": Utc::now(),
            "definition": {"sql": "SELECT user_id FROM orders GROUP BY user_id HAVING sum(amount) >= 11"},
            "sources": [{"table": "orders", "uri": format!("file://{}", orders.display()), "format": "csv"}],
            "resultsUri": format!("file://{}/results/", dir.path().display())
        }))
        .unwrap();
        let options = ComputeOptions { partitions: Some(2), ..ComputeOptions::default() };
        let plan = explain_analyze(&task, &options).await.unwrap();
        let skipped: Vec<&str> = plan
            .split("skipped_aggregation_rows=")
            .skip(1)
            .map(|rest| rest.split([',', ']']).next().unwrap_or_default())
            .collect();
        assert!(skipped.iter().any(|rows| *rows != "0"), "{skipped:?} in\n{plan}");
        // User u's two rows have the amounts 2u mod 7 and (2u + 1) mod 7.
        let expected = (0..200_000u32).filter(|user| (2 * user) % 7 + (2 * user + 1) % 7 >= 11).count() as u64;
        assert_eq!(run_with(&task, &options).await.unwrap().members, expected);
    }

    /// The members are sorted once, globally: a per-partition sort needs a
    /// final merge that cannot spill and fails under a small memory limit
    /// while other partitions are still running.
    #[tokio::test]
    async fn members_are_sorted_once_whatever_the_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("ids.csv");
        std::fs::write(&ids, "user_id\nu2\nu1\nu2\n").unwrap();
        let task: ComputeTask = serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": Utc::now(), "definition": {"sql": "SELECT user_id FROM ids"},
            "sources": [{"table": "ids", "uri": format!("file://{}", ids.display()), "format": "csv"}],
            "resultsUri": format!("file://{}/results/", dir.path().display())
        }))
        .unwrap();
        let options = ComputeOptions { partitions: Some(4), ..ComputeOptions::default() };
        let engine = Engine::new(&task, &options).unwrap();
        let plan = engine.members().await.unwrap().create_physical_plan().await.unwrap();
        let text = datafusion::physical_plan::displayable(plan.as_ref()).indent(false).to_string();
        assert!(!text.contains("SortPreservingMergeExec"), "{text}");
        assert_eq!(text.matches("SortExec").count(), 1, "{text}");
        assert!(text.contains("AggregateExec: mode=FinalPartitioned"), "the de-duplication stays parallel:\n{text}");
    }

    #[test]
    fn options_come_from_the_environment_names() {
        let defaults = ComputeOptions::default();
        assert_eq!(defaults.memory_limit, 1024 * 1024 * 1024);
        assert_eq!(defaults.part_size, 1_000_000);
        assert!(mentions("Object at location tmp/x/lake/orders/part-0.parquet not found", "file:///tmp/x/lake/orders/"));
        assert!(!mentions("something else", "s3://lake/orders/"));
        assert_eq!(one_line("Parquet error: Parquet error: bad\n  footer\n"), "Parquet error: bad footer");
        assert_eq!(one_line(&"x".repeat(2000)).chars().count(), 1501);
        assert_eq!(unique_names(vec!["user_id".into(), "".into(), "user_id".into()]), vec!["user_id", "column_2", "user_id_3"]);
    }

    /// The pool is two thirds of the container's limit, read from either
    /// cgroup version; an unlimited container gets the default.
    #[test]
    fn the_memory_pool_follows_the_containers_limit() {
        assert_eq!(cgroup_memory_limit("4294967296\n"), Some(4 << 30));
        assert_eq!(cgroup_memory_limit("max\n"), None, "cgroup v2 without a limit");
        assert_eq!(cgroup_memory_limit("9223372036854771712\n"), None, "cgroup v1 without a limit");
        assert_eq!(cgroup_memory_limit(""), None);
        assert_eq!(memory_pool_for(Some(4 << 30)), 2_863_311_530);
        assert_eq!(memory_pool_for(Some(3 << 20)), 2 << 20);
        assert_eq!(memory_pool_for(None), DEFAULT_MEMORY_MB * 1024 * 1024);
    }
}
