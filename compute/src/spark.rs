//! The Spark engine (`engine: spark`): the Rust half of the PySpark driver
//! `workers/spark/segment_spark.py`, embedded here as [`DRIVER`].
//!
//! The driver does only what needs Spark: it registers the tables and runs
//! one query. Everything else stays here, shared with the DataFusion
//! compute, so both engines agree on what a definition reads and on the
//! result's bytes:
//!
//! - [`prepare`] (`segment-worker spark-plan`): removes a manifest left by
//!   an earlier run of the version (a failed rerun leaves no result, as in
//!   the compute Job), and returns the [`SparkPlan`]: the Spark SQL, the
//!   clock pinned at the snapshot time (rules through
//!   [`rules_sql::compile_for`], SQL through [`rules_sql::pin_clock`]), and
//!   for each table it reads the exact files: the data files the compute
//!   would list, a Delta table's live files as of the snapshot time
//!   ([`crate::delta`]), another segment's verified result parts.
//! - [`write_result`] (`segment-worker write-result`): writes the ids the
//!   driver streams, sorted and distinct, one a line, then an empty line,
//!   with the compute's own [`ResultWriter`]: parts, index, manifest last.
//! - [`run_local`]: the local engine of `segment-worker compute`,
//!   standalone mode and `kubectl segment preview`: `spark-submit --master
//!   local[N]` on the embedded driver.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::prelude::SessionContext;
use segment_core::api::{ComputeEngine, SegmentSourceSpec, SourceFormat, StaticList};
use segment_core::definition::{self, DefinitionError};
use segment_core::manifest::{self, SourceRead};
use segment_core::reasons::FailureReason;
use segment_core::rules_sql::{self, segment_table, Dialect};
use segment_core::task::{ComputeTask, Failure, SegmentInput};
use segment_store::objects::locate;
use segment_store::results::ResultDir;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tracing::{debug, info, warn};

use crate::compute::{
    self, data_file_extension, listing_url, one_line, retract_manifest, rules_error, tenant_text, without_data, ComputeOptions,
    ComputeReport, IdRefused, ResultWriter, STATIC_TABLE, USER_ID,
};
use crate::failure::WorkerError;
use crate::lake_table::{delta_table_at, iceberg_table_at, source_error};

/// The PySpark driver program. `segment-worker spark-driver` prints it; the
/// worker image carries it at [`DRIVER_PATH`].
pub const DRIVER: &str = include_str!("../../workers/spark/segment_spark.py");
/// Where the worker and Spark images install [`DRIVER`]: a SparkApplication's
/// `mainApplicationFile` is `local://` this path.
pub const DRIVER_PATH: &str = "/opt/segment-operator/spark/segment_spark.py";

/// The driver's environment: the `segment-worker` it runs (`spark-plan`,
/// `write-result`), `segment-worker` on `PATH` when unset.
pub const WORKER_BIN_ENV: &str = "SEGMENT_WORKER_BIN";
/// The driver's environment: where its one-line `Reason: message` goes
/// (`/dev/termination-log` when unset and writable).
pub const TERMINATION_LOG_ENV: &str = "SEGMENT_TERMINATION_LOG";
/// The local engine's `spark-submit`; `spark-submit` on `PATH` when unset.
pub const SPARK_SUBMIT_ENV: &str = "SPARK_SUBMIT";
/// The local engine's Ivy cache for the S3A jars; `$HOME/.cache/segment-operator/ivy`
/// when unset.
pub const IVY_DIR_ENV: &str = "SEGMENT_SPARK_IVY_DIR";

/// What Spark needs to read `s3://` lakes through Hadoop S3A, from Maven
/// Central: hadoop-aws of the Hadoop client Spark bundles (pyspark 4.3.0:
/// 3.5.0), and the AWS SDK v2 modules S3A uses at the version hadoop-aws
/// 3.5.0 is built against, instead of the SDK's ~600 MB `bundle` (about
/// 19 MB in all; docs/compute.md#engines).
pub const S3A_PACKAGES: &[&str] = &[
    "org.apache.hadoop:hadoop-aws:3.5.0",
    "software.amazon.awssdk:s3:2.35.4",
    "software.amazon.awssdk:s3-transfer-manager:2.35.4",
    "software.amazon.awssdk:sts:2.35.4",
];
/// The SDK bundle hadoop-aws depends on, replaced by [`S3A_PACKAGES`].
pub const S3A_EXCLUDED: &str = "software.amazon.awssdk:bundle";
/// The Ivy settings the packages are resolved with: Maven Central only.
/// Spark's default settings also look in `~/.m2`, where a Maven build that
/// fetched a pom without its jar (slf4j-api's, say) makes the download fail
/// ("download failed: org.slf4j#slf4j-api;1.7.36!slf4j-api.jar").
pub const IVY_SETTINGS: &str = r#"<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers>
    <ibiblio name="central" m2compatible="true" root="https://repo1.maven.org/maven2/"/>
  </resolvers>
</ivysettings>
"#;

/// What the driver runs for one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SparkPlan {
    /// One Spark SQL query returning the members (one column), the clock
    /// functions replaced by the snapshot time.
    pub sql: String,
    /// The tables the query reads, each to register as a temp view.
    pub tables: Vec<SparkTable>,
    /// The lake tables read, for the manifest (`write-result --sources-read`).
    pub sources_read: Vec<SourceRead>,
    /// What the Segment's author wrote (definition, sources, names): a
    /// quoted fragment of an engine message may be shown only if it is in
    /// here; anything else may come from a file (docs/compute.md#failures).
    pub author_text: String,
}

/// A table to register, and the files it is read from. Paths are what
/// Spark opens: `file:///abs/path` or `s3a://bucket/key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SparkTable {
    pub name: String,
    /// The table as messages name it: "table `orders` (s3://lake/orders/)".
    pub about: String,
    pub read: TableRead,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "camelCase")]
pub enum TableRead {
    Parquet {
        files: Vec<String>,
    },
    /// A header row; types inferred, `userIdColumn` always text (`007`
    /// stays `007`), `""` escapes a quote inside quotes.
    #[serde(rename_all = "camelCase")]
    Csv {
        files: Vec<String>,
        user_id_column: String,
    },
    /// Newline-delimited JSON.
    Ndjson {
        files: Vec<String>,
    },
    /// A Delta table as of the snapshot time: its live Parquet files,
    /// grouped by partition values, and its columns in order.
    #[serde(rename_all = "camelCase")]
    Delta {
        columns: Vec<SparkColumn>,
        groups: Vec<DeltaGroup>,
    },
    /// An Iceberg table as of the snapshot time: its live Parquet files
    /// (every column is in the files; renamed columns are refused) and its
    /// columns in order.
    Iceberg {
        columns: Vec<SparkColumn>,
        files: Vec<String>,
    },
    /// One id a line, column `user_id`: another segment's verified result
    /// parts, or a static list without a header.
    Ids {
        files: Vec<String>,
    },
    /// A static list's CSV with a `user_id` column, every column text.
    StaticCsv {
        files: Vec<String>,
    },
}

/// A column of a Delta table: its Spark type, and whether its values come
/// from the log's partition values rather than the files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SparkColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub spark_type: String,
    pub partition: bool,
}

/// Files of one set of partition values (`None` is null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaGroup {
    pub files: Vec<String>,
    pub partition_values: BTreeMap<String, Option<String>>,
}

/// `segment-worker spark-plan`: removes a manifest an earlier run of the
/// version left (a failed rerun must leave no result, and the driver may
/// fail before it writes anything), then plans the task.
pub async fn prepare(task: &ComputeTask) -> Result<SparkPlan, WorkerError> {
    ResultDir::open(&task.results_uri).map_err(|e| WorkerError::new(FailureReason::WriteFailed, e.to_string()))?;
    retract_manifest(&task.results_uri).await?;
    plan(task).await
}

/// The plan of `task`, with no side effect.
pub async fn plan(task: &ComputeTask) -> Result<SparkPlan, WorkerError> {
    let author_text = tenant_text(task);
    let scrub = |e: WorkerError| WorkerError { message: without_data(&one_line(&e.message), &author_text), ..e };
    let mut planner = Planner { task, ctx: SessionContext::new(), tables: Vec::new(), read: Vec::new() };
    let sql = planner.sql().await.map_err(scrub)?;
    planner.read.sort_by(|a, b| a.table.cmp(&b.table));
    Ok(SparkPlan { sql, tables: planner.tables, sources_read: planner.read, author_text })
}

struct Planner<'a> {
    task: &'a ComputeTask,
    /// Lists files the way the compute's listing tables do.
    ctx: SessionContext,
    tables: Vec<SparkTable>,
    read: Vec<SourceRead>,
}

impl Planner<'_> {
    async fn sql(&mut self) -> Result<String, WorkerError> {
        let task = self.task;
        let spark = Dialect::of(ComputeEngine::Spark, task.snapshot_time);
        let definition = &task.definition;
        match (&definition.sql, &definition.rules, &definition.static_list) {
            (Some(sql), None, None) => {
                rules_sql::refuse_code_execution(sql).map_err(sql_error)?;
                let tables = query_tables(sql)?;
                self.register_all(&tables).await?;
                rules_sql::pin_clock(sql, task.snapshot_time).map_err(sql_error)
            }
            (None, Some(rule), None) => {
                for name in rule.segment_refs() {
                    if !task.segment_inputs.iter().any(|input| input.name == name) {
                        return Err(WorkerError::new(
                            FailureReason::SegmentNotReady,
                            format!("segment `{name}` has no active version to read yet"),
                        ));
                    }
                }
                // The tables read are those of the DataFusion text, which
                // the SQL checks parse; the Spark text reads the same.
                let tables = query_tables(&rules_sql::compile(rule, &task.sources).map_err(rules_error)?)?;
                let sql = rules_sql::compile_for(rule, &task.sources, spark).map_err(rules_error)?;
                self.register_all(&tables).await?;
                Ok(sql)
            }
            (None, None, Some(list)) => {
                self.static_list(list).await?;
                // Uploaded lists carry stray spaces.
                Ok(format!("SELECT trim(`{USER_ID}`) AS {USER_ID} FROM `{STATIC_TABLE}`"))
            }
            _ => Err(WorkerError::new(
                FailureReason::InvalidDefinition,
                "spec.definition: set exactly one of sql, rules or static",
            )),
        }
    }

    async fn register_all(&mut self, tables: &[String]) -> Result<(), WorkerError> {
        let task = self.task;
        for name in tables {
            if let Some(source) = task.sources.iter().find(|s| s.table.eq_ignore_ascii_case(name)) {
                self.source(source).await?;
            } else if let Some(input) = task.segment_inputs.iter().find(|i| segment_table(&i.name).eq_ignore_ascii_case(name)) {
                self.segment_input(input).await?;
            } else {
                let declared: Vec<&str> = task.sources.iter().map(|s| s.table.as_str()).collect();
                return Err(WorkerError::new(
                    FailureReason::UnknownTable,
                    format!(
                        "table `{name}` is not declared by any SegmentSource (declared: {})",
                        if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn source(&mut self, source: &SegmentSourceSpec) -> Result<(), WorkerError> {
        let about = format!("table `{}` ({})", source.table, source.uri);
        let unreadable = |detail: String| WorkerError::new(FailureReason::UnreadableSource, format!("{about}: {detail}"));
        let (read, version) = match source.format {
            SourceFormat::Parquet => (TableRead::Parquet { files: self.data_files(source).await.map_err(unreadable)? }, None),
            SourceFormat::Csv => (
                TableRead::Csv {
                    files: self.data_files(source).await.map_err(unreadable)?,
                    user_id_column: source.user_id_column.clone(),
                },
                None,
            ),
            SourceFormat::Ndjson => (TableRead::Ndjson { files: self.data_files(source).await.map_err(unreadable)? }, None),
            SourceFormat::Delta => {
                let (read, version) = delta_table(source, self.task).await?;
                (read, Some(version))
            }
            SourceFormat::Iceberg => {
                let (read, snapshot_id) = iceberg_table(source, self.task).await?;
                (read, Some(snapshot_id))
            }
        };
        self.read.push(SourceRead { table: source.table.clone(), format: source.format, version });
        self.tables.push(SparkTable { name: source.table.clone(), about, read });
        Ok(())
    }

    /// The files the compute's listing table reads: [`data_file_extension`]
    /// and the listing's own rules (no subdirectories but `key=value` ones).
    async fn data_files(&self, source: &SegmentSourceSpec) -> Result<Vec<String>, String> {
        let location = locate(&source.uri).map_err(|e| e.to_string())?;
        self.ctx.register_object_store(&location.root, location.store.clone());
        let url = listing_url(&source.uri)?;
        let extension = data_file_extension(&self.ctx, &url, source.format).await?;
        let state = self.ctx.state();
        let files = list(&state, &url, &extension).await?;
        let root = spark_root(location.root.as_str());
        Ok(files.into_iter().map(|path| format!("{root}{path}")).collect())
    }

    /// Another segment's members: its parts, each verified against the
    /// manifest (checksum, count) here, as the compute verifies them while
    /// it streams them.
    async fn segment_input(&mut self, input: &SegmentInput) -> Result<(), WorkerError> {
        let about = format!("segment `{}` v{} ({})", input.name, input.version, input.results_uri);
        let unreadable = |detail: String| WorkerError::new(FailureReason::UnreadableSource, format!("{about}: {detail}"));
        let dir = ResultDir::open(&input.results_uri).map_err(|e| unreadable(e.to_string()))?;
        let manifest = dir.read_manifest().await.map_err(|e| unreadable(e.to_string()))?.ok_or_else(|| {
            WorkerError::new(FailureReason::SegmentNotReady, format!("{about}: no result there (no {})", manifest::MANIFEST_FILE))
        })?;
        if manifest.version != input.version {
            return Err(unreadable(format!("the manifest there is for v{}", manifest.version)));
        }
        let base = spark_uri(&input.results_uri).map_err(&unreadable)?;
        let mut files = Vec::with_capacity(manifest.parts.len());
        for part in &manifest.parts {
            let bytes = dir.read_part(part).await.map_err(|e| unreadable(format!("{}: {e}", part.file)))?;
            part.decode(&bytes).map_err(|e| unreadable(format!("{}: {e}", part.file)))?;
            files.push(format!("{}/{}", base.trim_end_matches('/'), part.file));
        }
        self.tables.push(SparkTable { name: segment_table(&input.name), about, read: TableRead::Ids { files } });
        Ok(())
    }

    /// A static list: a CSV with a `user_id` column, or one id a line,
    /// told apart as the compute does.
    async fn static_list(&mut self, list: &StaticList) -> Result<(), WorkerError> {
        let about = format!("static list {}", list.uri);
        let unreadable = |detail: String| WorkerError::new(FailureReason::UnreadableSource, format!("{about}: {detail}"));
        let location = locate(&list.uri).map_err(|e| unreadable(e.to_string()))?;
        let header = compute::static_list_header(&location).await.map_err(&unreadable)?;
        let files = vec![spark_uri(&list.uri).map_err(&unreadable)?];
        let read = match header {
            compute::StaticHeader::Csv(_) => TableRead::StaticCsv { files },
            compute::StaticHeader::Ids => TableRead::Ids { files },
            compute::StaticHeader::CsvWithoutUserId => {
                return Err(WorkerError::new(
                    FailureReason::UnknownColumn,
                    format!("{about}: the CSV header has no `{USER_ID}` column"),
                ))
            }
        };
        self.tables.push(SparkTable { name: STATIC_TABLE.to_string(), about, read });
        Ok(())
    }
}

/// The tables a query names (not its CTEs); SQL that is not one query is
/// refused as the compute refuses it.
fn query_tables(sql: &str) -> Result<Vec<String>, WorkerError> {
    let definition = segment_core::api::Definition { sql: Some(sql.to_string()), rules: None, static_list: None };
    definition::validate(&definition, None).map(|refs| refs.tables.into_iter().collect()).map_err(sql_error)
}

fn sql_error(e: DefinitionError) -> WorkerError {
    let message = e.message.replace("does not parse: ", "SQL syntax: ");
    let message = if message.contains("not another kind of statement") {
        format!("{message}: DDL, DML and settings are refused")
    } else {
        message
    };
    WorkerError::new(FailureReason::QueryError, message)
}

async fn list(
    state: &datafusion::execution::SessionState,
    url: &ListingTableUrl,
    extension: &str,
) -> Result<Vec<String>, String> {
    use futures::TryStreamExt;
    let store = state.runtime_env().object_store(url).map_err(|e| e.to_string())?;
    let metas: Vec<_> = url
        .list_all_files(state, store.as_ref(), extension)
        .await
        .map_err(|e| one_line(&e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| one_line(&e.to_string()))?;
    let mut files: Vec<String> = metas
        .into_iter()
        // Markers (`_SUCCESS`) and hidden files are never data.
        .filter(|meta| meta.location.filename().is_some_and(|n| !n.starts_with('_') && !n.starts_with('.')))
        .map(|meta| meta.location.to_string())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err("no data files there".to_string());
    }
    Ok(files)
}

/// A Delta table as of the snapshot time, and its version.
async fn delta_table(source: &SegmentSourceSpec, task: &ComputeTask) -> Result<(TableRead, u64), WorkerError> {
    let (snapshot, location) = delta_table_at(source, task).await?;
    let columns = spark_columns(&snapshot.schema, &snapshot.partition_columns)
        .map_err(|e| source_error(source, FailureReason::UnsupportedSource, e))?;
    let root = spark_root(location.root.as_str());
    let mut groups: BTreeMap<Vec<Option<String>>, DeltaGroup> = BTreeMap::new();
    for file in &snapshot.files {
        let values: BTreeMap<String, Option<String>> =
            snapshot.partition_columns.iter().map(|c| (c.clone(), file.partition_values.get(c).cloned().flatten())).collect();
        let group = groups
            .entry(values.values().cloned().collect())
            .or_insert_with(|| DeltaGroup { files: Vec::new(), partition_values: values });
        group.files.push(format!("{root}{}", file.path));
    }
    info!(table = %source.table, version = snapshot.version, files = snapshot.files.len(), "delta table for spark");
    Ok((TableRead::Delta { columns, groups: groups.into_values().collect() }, snapshot.version))
}

/// An Iceberg table as of the snapshot time, read through the catalog the
/// task carries (the same reader, files and checks as the DataFusion
/// compute), and the snapshot id.
async fn iceberg_table(source: &SegmentSourceSpec, task: &ComputeTask) -> Result<(TableRead, u64), WorkerError> {
    let snapshot = iceberg_table_at(source, task).await?;
    let columns = spark_columns(&snapshot.schema, &[]).map_err(|e| source_error(source, FailureReason::UnsupportedSource, e))?;
    let files = snapshot.files.iter().map(|file| spark_root(file)).collect::<Vec<_>>();
    info!(table = %source.table, snapshot = snapshot.snapshot_id, files = files.len(), "iceberg table for spark");
    Ok((TableRead::Iceberg { columns, files }, snapshot.snapshot_id))
}

/// The Spark columns of a lake table's Arrow schema, in order; those named
/// in `partition_columns` come from the log rather than the files.
fn spark_columns(schema: &Schema, partition_columns: &[String]) -> Result<Vec<SparkColumn>, String> {
    schema
        .fields()
        .iter()
        .map(|field| {
            let spark_type = spark_type(field.data_type())
                .ok_or_else(|| format!("column `{}`: type {} on the Spark engine", field.name(), field.data_type()))?;
            Ok(SparkColumn { name: field.name().clone(), spark_type, partition: partition_columns.contains(field.name()) })
        })
        .collect()
}

/// The Spark SQL type of an Arrow type a Delta or Iceberg table's schema uses.
fn spark_type(data_type: &DataType) -> Option<String> {
    Some(match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Date32 => "DATE".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP_NTZ".into(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        DataType::Binary | DataType::LargeBinary => "BINARY".into(),
        _ => return None,
    })
}

/// `s3://bucket/` is read through Hadoop S3A.
fn spark_root(root: &str) -> String {
    match root.strip_prefix("s3://") {
        Some(rest) => format!("s3a://{rest}"),
        None => root.to_string(),
    }
}

/// The URI Spark opens for an `s3://` or `file://` URI (`file://./rel`
/// resolved against the working directory).
pub fn spark_uri(uri: &str) -> Result<String, String> {
    let location = locate(uri).map_err(|e| e.to_string())?;
    let trailing = if uri.ends_with('/') { "/" } else { "" };
    Ok(format!("{}{}{trailing}", spark_root(location.root.as_str()), location.path))
}

/// `segment-worker write-result`: the ids the driver streams on `input`,
/// sorted bytewise and distinct, one a line, ended by an empty line,
/// written as the compute writes its result (parts, index, manifest
/// last). A stream that ends without the empty line was cut short: no
/// manifest is written, so there is no result.
pub async fn write_result(
    task: &ComputeTask,
    part_size: usize,
    sources_read: Vec<SourceRead>,
    mut input: impl AsyncBufRead + Unpin,
) -> Result<ComputeReport, WorkerError> {
    let bad_stream = |message: String| WorkerError::new(FailureReason::QueryError, format!("the ids on stdin: {message}"));
    let mut writer = ResultWriter::start(task, part_size).await?;
    let mut line = Vec::new();
    let mut ended = false;
    let mut number = 0u64;
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| WorkerError::new(FailureReason::WriteFailed, format!("reading the ids on stdin: {e}")))?;
        if read == 0 {
            break;
        }
        number += 1;
        if ended {
            return Err(bad_stream(format!("line {number} follows the end mark (the empty line after the last id)")));
        }
        if line.last() != Some(&b'\n') {
            return Err(bad_stream(format!("line {number} has no line end: the stream was cut short")));
        }
        line.pop();
        if line.is_empty() {
            ended = true;
            continue;
        }
        let id = std::str::from_utf8(&line).map_err(|_| bad_stream(format!("line {number} is not UTF-8")))?;
        // Not quoted: an id is data, and this message reaches the status.
        writer.push(id).await.map_err(|e| match e {
            IdRefused::Write(error) => error,
            refused => bad_stream(format!("line {number}: {refused}")),
        })?;
    }
    if !ended {
        return Err(bad_stream(format!(
            "the stream ended after {number} lines without its end mark (an empty line): the driver stopped early; no result written"
        )));
    }
    writer.finish(sources_read, 0).await
}

/// Runs `task` on the local engine: `spark-submit --master local[N]` on
/// the embedded driver ([`run_local_all`] with one task).
pub async fn run_local(task: &ComputeTask, options: &ComputeOptions) -> Result<ComputeReport, WorkerError> {
    let mut reports = run_local_all(std::slice::from_ref(task), options).await?;
    reports.pop().ok_or_else(|| WorkerError::new(FailureReason::WorkerFailed, "the Spark driver reported no run"))
}

/// Runs `tasks` one after the other in one Spark session: the same driver
/// program as one task a session (it takes `--task-file` repeatedly), so
/// tests of many definitions pay for one JVM. Stops at the first failure,
/// which is returned.
pub async fn run_local_all(tasks: &[ComputeTask], options: &ComputeOptions) -> Result<Vec<ComputeReport>, WorkerError> {
    let started = Instant::now();
    let failed = |message: String| WorkerError::new(FailureReason::WorkerFailed, message);
    let worker = worker_bin()?;
    let scratch = tempfile::tempdir().map_err(|e| failed(format!("a temp dir for the Spark driver: {e}")))?;
    let mut command = local_command(tasks, options, scratch.path(), &worker)?;
    let log_file = scratch.path().join("spark-submit.log");
    let log = std::fs::File::create(&log_file).map_err(|e| failed(format!("{}: {e}", log_file.display())))?;
    let log_err = log.try_clone().map_err(|e| failed(e.to_string()))?;
    command.stdin(Stdio::null()).stdout(log).stderr(log_err).kill_on_drop(true);
    let status = command.status().await.map_err(|e| {
        let program = command.as_std().get_program().to_string_lossy().into_owned();
        failed(format!("{program}: {e} (install Spark or set {SPARK_SUBMIT_ENV})"))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let line = std::fs::read_to_string(scratch.path().join(TERMINATION_LOG_FILE)).unwrap_or_default();
        warn!(status = %status, seconds, "spark-submit failed");
        // Spark's own log may quote what the files hold (a value in a
        // cast error): only at debug level, never in the failure.
        debug!(log = %log_tail(&log_file), "spark-submit's log");
        return Err(match Failure::from_termination_message(&line) {
            Some(failure) => WorkerError::new(failure.reason, failure.message),
            None => failed(format!("spark-submit exited with {status} and gave no reason")),
        });
    }
    let mut reports = Vec::with_capacity(tasks.len());
    for task in tasks {
        reports.push(report_of(task).await?);
    }
    info!(tasks = tasks.len(), seconds, "spark-submit ran");
    Ok(reports)
}

/// The driver's termination log in the local engine's scratch directory.
const TERMINATION_LOG_FILE: &str = "termination-log";

/// The local engine's `spark-submit` of `tasks`, its files (the driver,
/// the tasks, the Ivy settings) written to `scratch`: `--compute-partitions`
/// is `local[N]`, `--compute-memory-mb` the driver's memory (the whole
/// JVM in local mode), `--compute-spill-dir` Spark's `spark.local.dir`,
/// and `--compute-part-size` reaches `write-result` as `COMPUTE_PART_SIZE`.
fn local_command(
    tasks: &[ComputeTask],
    options: &ComputeOptions,
    scratch: &Path,
    worker: &Path,
) -> Result<tokio::process::Command, WorkerError> {
    let failed = |message: String| WorkerError::new(FailureReason::WorkerFailed, message);
    let write = |name: &str, bytes: &[u8]| {
        let path = scratch.join(name);
        std::fs::write(&path, bytes).map(|()| path.clone()).map_err(|e| failed(format!("{}: {e}", path.display())))
    };
    let spark_submit = std::env::var_os(SPARK_SUBMIT_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("spark-submit"));
    let mut command = tokio::process::Command::new(&spark_submit);
    let cores = options.partitions.map(|n| n.to_string()).unwrap_or_else(|| "*".to_string());
    command
        .arg("--master")
        .arg(format!("local[{cores}]"))
        .arg("--driver-memory")
        .arg(format!("{}m", (options.memory_limit / (1024 * 1024)).max(512)))
        .args(["--conf", "spark.sql.session.timeZone=UTC"])
        .args(["--conf", "spark.ui.enabled=false"])
        .args(["--conf", "spark.log.level=WARN"]);
    if let Some(dir) = &options.spill_dir {
        command.arg("--conf").arg(format!("spark.local.dir={}", dir.display()));
    }
    if tasks.iter().any(reads_s3) {
        let settings = write("ivysettings.xml", IVY_SETTINGS.as_bytes())?;
        command
            .arg("--conf")
            .arg(format!("spark.jars.ivy={}", ivy_dir().display()))
            .arg("--conf")
            .arg(format!("spark.jars.ivySettings={}", settings.display()))
            .arg("--packages")
            .arg(S3A_PACKAGES.join(","))
            .arg("--exclude-packages")
            .arg(S3A_EXCLUDED);
    }
    command.arg(write("segment_spark.py", DRIVER.as_bytes())?);
    for (i, task) in tasks.iter().enumerate() {
        let json = serde_json::to_vec(task).map_err(|e| failed(format!("the task as JSON: {e}")))?;
        command.arg("--task-file").arg(write(&format!("task-{i}.json"), &json)?);
    }
    command
        .env(WORKER_BIN_ENV, worker)
        .env(TERMINATION_LOG_ENV, scratch.join(TERMINATION_LOG_FILE))
        .env("COMPUTE_PART_SIZE", options.part_size.max(1).to_string());
    Ok(command)
}

/// The run's report, from the manifest the driver's `write-result` wrote.
async fn report_of(task: &ComputeTask) -> Result<ComputeReport, WorkerError> {
    let unreadable = |e: String| WorkerError::new(FailureReason::WorkerFailed, format!("{}: {e}", task.results_uri));
    let dir = ResultDir::open(&task.results_uri).map_err(|e| unreadable(e.to_string()))?;
    let manifest = dir
        .read_manifest()
        .await
        .map_err(|e| unreadable(e.to_string()))?
        .ok_or_else(|| unreadable("the Spark driver succeeded but wrote no manifest".to_string()))?;
    Ok(ComputeReport { version: manifest.version, members: manifest.members, parts: manifest.parts.len(), spilled_bytes: 0 })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn reads_s3(task: &ComputeTask) -> bool {
    // Where an Iceberg table is, only its catalog says, once the driver
    // plans: it may be on S3 unless the class allows local files alone.
    let iceberg_may_be_on_s3 = task.sources.iter().any(|s| s.format == SourceFormat::Iceberg)
        && task.iceberg.as_ref().is_none_or(|access| {
            access.allowed_prefixes.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| !p.starts_with("file://")))
        });
    iceberg_may_be_on_s3
        || task.sources.iter().any(|s| s.uri.starts_with("s3://"))
        || task.segment_inputs.iter().any(|i| i.results_uri.starts_with("s3://"))
        || task.definition.static_list.as_ref().is_some_and(|l| l.uri.starts_with("s3://"))
}

fn ivy_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(IVY_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/segment-operator/ivy")
}

/// The `segment-worker` the driver runs: `SEGMENT_WORKER_BIN` when set;
/// this process when it is `segment-worker` (`segment-worker compute`);
/// else (standalone mode, `kubectl segment preview`, tests) the
/// `segment-worker` next to this executable, or in the directory above it
/// (cargo puts test binaries in `target/<profile>/deps/`), or on `PATH`.
pub fn worker_bin() -> Result<PathBuf, WorkerError> {
    const NAME: &str = "segment-worker";
    if let Some(bin) = std::env::var_os(WORKER_BIN_ENV).filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let current = std::env::current_exe().ok();
    if let Some(exe) = &current {
        if exe.file_stem().is_some_and(|stem| stem == NAME) {
            return Ok(exe.clone());
        }
        let dir = exe.parent();
        for candidate in [dir.map(|d| d.join(NAME)), dir.and_then(Path::parent).map(|d| d.join(NAME))].into_iter().flatten() {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join(NAME)).find(|p| p.is_file()))
        .unwrap_or_default();
    on_path.ok_or_else(|| {
        WorkerError::new(
            FailureReason::WorkerFailed,
            format!(
                "the Spark engine runs `{NAME}` (spark-plan, write-result) and found none next to {} nor on PATH: \
                 build it (cargo build -p segment-worker) or set {WORKER_BIN_ENV}",
                current.map(|c| c.display().to_string()).unwrap_or_else(|| "this program".into())
            ),
        )
    })
}

/// Whether `compute::run_with` hands `task` to the local Spark engine.
pub fn runs_on_spark(task: &ComputeTask) -> bool {
    task.engine == ComputeEngine::Spark
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spark_opens_s3_through_s3a_and_local_paths_absolute() {
        assert_eq!(spark_uri("s3://lake/orders/").unwrap(), "s3a://lake/orders/");
        assert_eq!(spark_uri("s3://lake/users/users.csv").unwrap(), "s3a://lake/users/users.csv");
        assert_eq!(spark_uri("file:///lake/vip.csv").unwrap(), "file:///lake/vip.csv");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(spark_uri("file://./lists/vip.csv").unwrap(), format!("file://{}/lists/vip.csv", cwd.display()));
    }

    /// tests/setup prefetches the jars the local engine asks for.
    #[test]
    fn the_test_setup_prefetches_the_s3a_packages() {
        let setup = include_str!("../../tests/setup");
        let line = setup.lines().find(|l| l.starts_with("s3a_packages=")).expect("tests/setup lists the S3A packages");
        assert_eq!(line, format!("s3a_packages={}", S3A_PACKAGES.join(",")));
        assert!(setup.contains(&format!("--exclude-packages {S3A_EXCLUDED}")));
        assert!(setup.contains(IVY_SETTINGS), "tests/setup resolves them with the same Ivy settings");
    }

    #[test]
    fn the_local_engine_passes_the_compute_options_to_spark() {
        let scratch = tempfile::tempdir().unwrap();
        let mut local = task(serde_json::json!({"sql": "SELECT 1"}), serde_json::json!([]));
        let options = ComputeOptions {
            memory_limit: 2048 * 1024 * 1024,
            spill_dir: Some(PathBuf::from("/scratch/spill")),
            part_size: 250,
            partitions: Some(3),
        };
        let worker = Path::new("/opt/bin/segment-worker");
        let command = local_command(std::slice::from_ref(&local), &options, scratch.path(), worker).unwrap();
        let args: Vec<String> = command.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = args.join(" ");
        for expected in [
            "--master local[3]",
            "--driver-memory 2048m",
            "--conf spark.sql.session.timeZone=UTC",
            "--conf spark.local.dir=/scratch/spill",
        ] {
            assert!(line.contains(expected), "{expected} in {line}");
        }
        assert!(!line.contains("--packages"), "no S3A jars for local files: {line}");
        let driver = scratch.path().join("segment_spark.py");
        assert_eq!(std::fs::read_to_string(&driver).unwrap(), DRIVER);
        assert_eq!(
            &args[args.len() - 3..],
            [driver.display().to_string(), "--task-file".into(), scratch.path().join("task-0.json").display().to_string()]
        );
        let env: BTreeMap<String, String> = command
            .as_std()
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
            .collect();
        assert_eq!(env[WORKER_BIN_ENV], "/opt/bin/segment-worker");
        assert_eq!(env["COMPUTE_PART_SIZE"], "250");
        assert_eq!(env[TERMINATION_LOG_ENV], scratch.path().join(TERMINATION_LOG_FILE).display().to_string());

        local.sources =
            serde_json::from_value(serde_json::json!([{"table": "t", "uri": "s3://lake/t/", "format": "parquet"}])).unwrap();
        let command = local_command(&[local], &ComputeOptions::default(), scratch.path(), worker).unwrap();
        let line: Vec<String> = command.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = line.join(" ");
        assert!(line.contains("--master local[*]"), "{line}");
        assert!(line.contains(&format!("--packages {} --exclude-packages {S3A_EXCLUDED}", S3A_PACKAGES.join(","))), "{line}");
        assert_eq!(std::fs::read_to_string(scratch.path().join("ivysettings.xml")).unwrap(), IVY_SETTINGS);
    }

    /// An Iceberg table is wherever its catalog says: the S3A jars come
    /// along unless the class allows local files alone.
    #[test]
    fn an_iceberg_table_may_be_on_s3_unless_only_local_files_are_allowed() {
        let mut iceberg = task(serde_json::json!({"sql": "SELECT user_id FROM t"}), serde_json::json!([]));
        iceberg.sources =
            serde_json::from_value(serde_json::json!([{"table": "t", "uri": "iceberg://lake/sales/t", "format": "iceberg"}]))
                .unwrap();
        let access = |prefixes: Option<Vec<&str>>| segment_core::iceberg::IcebergAccess {
            catalogs: Vec::new(),
            namespace: "growth".into(),
            results_base: "s3://results".into(),
            allowed_prefixes: prefixes.map(|p| p.into_iter().map(str::to_string).collect()),
            allow_local_files: true,
        };
        for (prefixes, on_s3) in [
            (None, true),
            (Some(vec!["s3://lake/growth/"]), true),
            (Some(vec!["file:///lake/", "s3://lake/growth/"]), true),
            (Some(vec!["file:///lake/"]), false),
        ] {
            iceberg.iceberg = Some(access(prefixes.clone()));
            assert_eq!(reads_s3(&iceberg), on_s3, "{prefixes:?}");
        }
    }

    #[test]
    fn the_driver_is_embedded() {
        assert!(DRIVER.contains("--task-file") && DRIVER.contains(WORKER_BIN_ENV) && DRIVER.contains(TERMINATION_LOG_ENV));
    }

    fn task(definition: serde_json::Value, sources: serde_json::Value) -> ComputeTask {
        serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": "2025-01-01T00:00:00Z", "definition": definition, "sources": sources,
            "resultsUri": "file:///nonexistent/results/", "engine": "spark"
        }))
        .unwrap()
    }

    /// What the compute refuses before it reads anything, the plan refuses
    /// with the same reason.
    #[tokio::test]
    async fn the_plan_refuses_what_the_compute_refuses() {
        let iceberg = serde_json::json!([{"table": "orders", "uri": "iceberg://lake/shop/orders", "format": "iceberg"}]);
        let cases = [
            (
                serde_json::json!({"sql": "SELECT user_id FROM refunds"}),
                serde_json::json!([]),
                FailureReason::UnknownTable,
                "refunds",
            ),
            (serde_json::json!({"sql": "DROP TABLE orders"}), serde_json::json!([]), FailureReason::QueryError, "DDL"),
            (serde_json::json!({"sql": "SELEC user_id"}), serde_json::json!([]), FailureReason::QueryError, "SQL syntax"),
            (
                serde_json::json!({"sql": "SELECT reflect('java.lang.System', 'getenv', 'AWS_SECRET_ACCESS_KEY') FROM refunds"}),
                serde_json::json!([]),
                FailureReason::QueryError,
                "calls Java methods",
            ),
            (
                serde_json::json!({"rules": {"segment": {"name": "vip"}}}),
                serde_json::json!([]),
                FailureReason::SegmentNotReady,
                "vip",
            ),
            (serde_json::json!({"sql": "SELECT user_id FROM orders"}), iceberg, FailureReason::UnsupportedSource, "iceberg"),
        ];
        for (definition, sources, reason, says) in cases {
            let error = plan(&task(definition.clone(), sources)).await.unwrap_err();
            assert_eq!(error.reason, reason, "{definition}: {error}");
            assert!(error.message.contains(says), "{definition}: {error}");
        }
    }

    #[tokio::test]
    async fn a_stream_without_its_end_mark_writes_no_result() {
        let dir = tempfile::tempdir().unwrap();
        let task: ComputeTask = serde_json::from_value(serde_json::json!({
            "segment": {"namespace": "n", "name": "s"}, "version": 1, "generation": 1, "definitionHash": "h",
            "snapshotTime": "2025-01-01T00:00:00Z", "definition": {"sql": "SELECT 1"}, "sources": [],
            "resultsUri": format!("file://{}/r/", dir.path().display()), "engine": "spark"
        }))
        .unwrap();
        let report = write_result(&task, 2, vec![], &b"a\nb\nc\n\n"[..]).await.unwrap();
        assert_eq!((report.members, report.parts), (3, 2));
        for (input, expected) in [
            (&b"a\nb\n"[..], "without its end mark"),
            (&b"b\na\n\n"[..], "line 2"),
            (&b"a\na\n\n"[..], "line 2"),
            (&b"a\n\nb\n"[..], "follows the end mark"),
            (&b"a\nb"[..], "cut short"),
        ] {
            let error = write_result(&task, 2, vec![], input).await.unwrap_err();
            assert_eq!(error.reason, FailureReason::QueryError, "{error}");
            assert!(error.message.contains(expected), "{error}");
            assert!(!dir.path().join("r").join(manifest::MANIFEST_FILE).exists(), "no manifest after {error}");
        }
    }
}
