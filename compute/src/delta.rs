//! Delta Lake tables read from their own transaction log, as of a point in
//! time, with what the workspace already has (object_store, serde_json,
//! the parquet reader of DataFusion) instead of the `deltalake` crate.
//!
//! [`snapshot_at`] lists `_delta_log/`, picks the table version the run
//! reads, the newest commit whose timestamp is at or before the snapshot
//! time, and replays the log up to it: the newest complete checkpoint at or
//! before that version (single- or multi-part `*.checkpoint*.parquet`),
//! then the JSON commits after it (`add`, `remove`, `metaData`,
//! `protocol`). The result is the version, the table's schema and
//! partition columns, and exactly its live data files.
//!
//! A commit's timestamp is the one Delta's `TIMESTAMP AS OF` uses:
//! `commitInfo.inCommitTimestamp` for commits written with in-commit
//! timestamps on (the protocol's "In-Commit Timestamps"; once on, every
//! commit carries it first, and the commit that turned it on is later than
//! the file time of the one before), else the commit file's modification
//! time, made strictly increasing as Spark and delta-rs do (a commit not
//! later than the one before it counts as one millisecond after it).
//!
//! Refused with [`FailureReason::UnsupportedSource`]: reader protocol
//! versions above 3, reader features other than `timestampNtz`,
//! `vacuumProtocolCheck`, and `deletionVectors`/`columnMapping` while
//! unused (a live file with a deletion vector, a column mapping mode other
//! than `none`), and data files outside the table root (absolute paths of
//! shallow clones, `..`), which would escape the location checks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ProjectionMask;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use segment_core::reasons::FailureReason;
use serde_json::Value;

/// Why a Delta table cannot be read as of the snapshot time.
pub use crate::lake_table::TableError as DeltaError;
use crate::lake_table::{unreadable, unsupported};

/// The table as of one version.
#[derive(Debug, Clone)]
pub struct DeltaSnapshot {
    pub version: u64,
    /// The commit's timestamp, as time travel reads it.
    pub committed_at: DateTime<Utc>,
    /// Every column, partition columns included, in the table's order.
    pub schema: SchemaRef,
    pub partition_columns: Vec<String>,
    /// The live data files.
    pub files: Vec<DataFile>,
}

/// A live data file: its location in the store and its partition values
/// (`None` is null), as the log's `add` action gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    pub path: Path,
    pub partition_values: BTreeMap<String, Option<String>>,
}

/// The reader features read here.
const SUPPORTED_READER_FEATURES: &[&str] = &["timestampNtz", "vacuumProtocolCheck", "deletionVectors", "columnMapping"];

/// The table under `root` in `store` as of `at`.
pub async fn snapshot_at(store: &dyn ObjectStore, root: &Path, at: DateTime<Utc>) -> Result<DeltaSnapshot, DeltaError> {
    let log = Log::list(store, root).await?;
    let (version, committed_at) = log.version_at(store, at).await?;
    let mut state = log.replay(store, version).await?;
    let snapshot = state.finish(root, version, committed_at)?;
    Ok(snapshot)
}

/// The files of `_delta_log/`.
struct Log {
    dir: Path,
    commits: BTreeMap<u64, ObjectMeta>,
    /// Complete checkpoints: version and their parts in order.
    checkpoints: BTreeMap<u64, Vec<Path>>,
    /// The oldest version that can be rebuilt and has a commit file.
    earliest: u64,
    latest: u64,
    /// The first commit of the newest run of consecutive commit files.
    first_contiguous: u64,
}

enum LogFile {
    Commit(u64),
    Checkpoint { version: u64, part: u32, parts: u32 },
}

fn parse_log_file(name: &str) -> Option<LogFile> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let (version, rest) = name.split_at_checked(20)?;
    if !digits(version, 20) {
        return None;
    }
    let version: u64 = version.parse().ok()?;
    if rest == ".json" {
        return Some(LogFile::Commit(version));
    }
    if rest == ".checkpoint.parquet" {
        return Some(LogFile::Checkpoint { version, part: 1, parts: 1 });
    }
    // `.checkpoint.0000000001.0000000003.parquet`
    let multi = rest.strip_prefix(".checkpoint.")?.strip_suffix(".parquet")?;
    let (part, parts) = multi.split_once('.')?;
    if digits(part, 10) && digits(parts, 10) {
        return Some(LogFile::Checkpoint { version, part: part.parse().ok()?, parts: parts.parse().ok()? });
    }
    None
}

impl Log {
    async fn list(store: &dyn ObjectStore, root: &Path) -> Result<Log, DeltaError> {
        let dir = root.clone().join("_delta_log");
        let files: Vec<ObjectMeta> =
            store.list(Some(&dir)).try_collect().await.map_err(|e| unreadable(format!("listing _delta_log/: {e}")))?;
        let mut commits = BTreeMap::new();
        let mut parts: BTreeMap<(u64, u32), BTreeMap<u32, Path>> = BTreeMap::new();
        for meta in files {
            // Only the log's own files, not those of a subdirectory.
            if meta.location.prefix_match(&dir).map(|rest| rest.count()) != Some(1) {
                continue;
            }
            let Some(name) = meta.location.filename() else { continue };
            match parse_log_file(name) {
                Some(LogFile::Commit(version)) => {
                    commits.insert(version, meta);
                }
                Some(LogFile::Checkpoint { version, part, parts: total }) => {
                    parts.entry((version, total)).or_default().insert(part, meta.location.clone());
                }
                None => {}
            }
        }
        let mut checkpoints = BTreeMap::new();
        for ((version, total), found) in parts {
            if found.len() as u32 == total && found.keys().copied().eq(1..=total) {
                checkpoints.entry(version).or_insert_with(|| found.into_values().collect());
            }
        }
        let Some(&latest) = commits.keys().next_back() else {
            return Err(unreadable("not a Delta table: no commits in _delta_log/"));
        };
        let mut first_contiguous = latest;
        while first_contiguous > 0 && commits.contains_key(&(first_contiguous - 1)) {
            first_contiguous -= 1;
        }
        // A version after a gap in the log can be rebuilt only from a
        // checkpoint at or after the commit before the run.
        let earliest = if first_contiguous == 0 {
            0
        } else {
            match checkpoints.range(first_contiguous - 1..=latest).next() {
                Some((&checkpoint, _)) => checkpoint.max(first_contiguous),
                None => {
                    return Err(unreadable(format!(
                    "the log is incomplete: commits before version {first_contiguous} are gone and no checkpoint replaces them"
                )))
                }
            }
        };
        Ok(Log { dir, commits, checkpoints, earliest, latest, first_contiguous })
    }

    /// The version to read as of `at`, and its commit timestamp.
    async fn version_at(&self, store: &dyn ObjectStore, at: DateTime<Utc>) -> Result<(u64, DateTime<Utc>), DeltaError> {
        // In-commit timestamps, when the newest commit has one: walk back
        // from it until a commit at or before `at`; commits from before the
        // feature was turned on fall back to their file times.
        let mut version = self.latest;
        let mut file_times_up_to = Some(self.latest);
        loop {
            let Some(ict) = self.in_commit_timestamp(store, version).await? else { break };
            if ict <= at {
                return Ok((version, ict));
            }
            if version == self.earliest {
                file_times_up_to = None;
                break;
            }
            version -= 1;
            file_times_up_to = Some(version);
        }
        if let Some(last) = file_times_up_to {
            // File times, strictly increasing, over the consecutive commits.
            let mut previous: Option<DateTime<Utc>> = None;
            let mut chosen = None;
            for v in self.first_contiguous..=last {
                let mut time = self.commits[&v].last_modified;
                if let Some(p) = previous {
                    if time <= p {
                        time = p + Duration::milliseconds(1);
                    }
                }
                previous = Some(time);
                if v >= self.earliest && time <= at {
                    chosen = Some((v, time));
                }
            }
            if let Some(found) = chosen {
                return Ok(found);
            }
        }
        let oldest = self.commit_time(store, self.earliest).await?;
        let history = if self.earliest > 0 {
            format!(" (versions before {} were removed from the log)", self.earliest)
        } else {
            String::new()
        };
        Err(DeltaError::new(
            FailureReason::SnapshotBeforeHistory,
            format!(
                "the snapshot time {} is before the oldest version that can be read, {} committed at {}{history}",
                at.to_rfc3339(),
                self.earliest,
                oldest.to_rfc3339()
            ),
        ))
    }

    /// The commit timestamp of `version` for messages: its in-commit
    /// timestamp or its file time.
    async fn commit_time(&self, store: &dyn ObjectStore, version: u64) -> Result<DateTime<Utc>, DeltaError> {
        Ok(match self.in_commit_timestamp(store, version).await? {
            Some(time) => time,
            None => self.commits[&version].last_modified,
        })
    }

    async fn in_commit_timestamp(&self, store: &dyn ObjectStore, version: u64) -> Result<Option<DateTime<Utc>>, DeltaError> {
        let actions = self.read_commit(store, version).await?;
        // Written first when the feature is on.
        let millis = actions.first().and_then(|a| a.get("commitInfo")).and_then(|c| c.get("inCommitTimestamp"));
        Ok(millis.and_then(Value::as_i64).and_then(|ms| Utc.timestamp_millis_opt(ms).single()))
    }

    async fn read_commit(&self, store: &dyn ObjectStore, version: u64) -> Result<Vec<Value>, DeltaError> {
        let meta = &self.commits[&version];
        let name = meta.location.filename().unwrap_or_default().to_string();
        let bytes = read(store, &meta.location).await?;
        let text = std::str::from_utf8(&bytes).map_err(|_| unreadable(format!("_delta_log/{name}: not UTF-8 text")))?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).map_err(|e| unreadable(format!("_delta_log/{name}: {e}"))))
            .collect()
    }

    /// The table's state at `version`: the newest checkpoint at or before
    /// it, then the commits after it.
    async fn replay(&self, store: &dyn ObjectStore, version: u64) -> Result<State, DeltaError> {
        let mut state = State::default();
        let start = self.first_contiguous.saturating_sub(1);
        let checkpoint = self.checkpoints.range(start..=version).next_back().map(|(v, parts)| (*v, parts));
        let from = match checkpoint {
            Some((at, parts)) => {
                for part in parts {
                    for action in read_checkpoint(store, part).await? {
                        state.apply(action, true);
                    }
                }
                at + 1
            }
            None => 0,
        };
        for v in from..=version {
            if !self.commits.contains_key(&v) {
                return Err(unreadable(format!("_delta_log/ has no commit {v:020}.json (under {})", self.dir)));
            }
            for action in self.read_commit(store, v).await? {
                state.apply(action, false);
            }
        }
        Ok(state)
    }
}

async fn read(store: &dyn ObjectStore, path: &Path) -> Result<bytes::Bytes, DeltaError> {
    let name = path.filename().unwrap_or_default().to_string();
    let got = store.get(path).await.map_err(|e| unreadable(format!("_delta_log/{name}: {e}")))?;
    got.bytes().await.map_err(|e| unreadable(format!("_delta_log/{name}: {e}")))
}

/// The actions of a checkpoint file that replay needs, as the JSON a
/// commit holds: one `{"add": …}`, `{"metaData": …}` or `{"protocol": …}`
/// a row.
async fn read_checkpoint(store: &dyn ObjectStore, path: &Path) -> Result<Vec<Value>, DeltaError> {
    let name = path.filename().unwrap_or_default().to_string();
    let bad = |e: String| unreadable(format!("_delta_log/{name}: {e}"));
    let bytes = read(store, path).await?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(e.to_string()))?;
    let wanted = |parts: &[String]| match parts {
        [action, ..] if action == "metaData" || action == "protocol" => true,
        [action, field, ..] if action == "add" => ["path", "partitionValues", "deletionVector"].contains(&field.as_str()),
        _ => false,
    };
    let descriptor = builder.parquet_schema();
    let leaves: Vec<usize> = (0..descriptor.num_columns()).filter(|&i| wanted(descriptor.column(i).path().parts())).collect();
    let mask = ProjectionMask::leaves(descriptor, leaves);
    let reader = builder.with_projection(mask).build().map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| bad(e.to_string()))?;
        writer.finish().map_err(|e| bad(e.to_string()))?;
        let text = writer.into_inner();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let row: Value = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
            if row.as_object().is_some_and(|o| !o.is_empty()) {
                out.push(row);
            }
        }
    }
    Ok(out)
}

/// Replay's state.
#[derive(Default)]
struct State {
    /// Live files by their path in the log.
    adds: HashMap<String, Value>,
    metadata: Option<Value>,
    protocol: Option<Value>,
}

impl State {
    fn apply(&mut self, action: Value, from_checkpoint: bool) {
        let Value::Object(mut action) = action else { return };
        if let Some(add) = action.remove("add") {
            if let Some(path) = add.get("path").and_then(Value::as_str) {
                self.adds.insert(path.to_string(), add);
            }
        } else if let Some(remove) = action.remove("remove") {
            // Tombstones of a checkpoint are for vacuum, not for readers.
            if !from_checkpoint {
                if let Some(path) = remove.get("path").and_then(Value::as_str) {
                    self.adds.remove(path);
                }
            }
        } else if let Some(metadata) = action.remove("metaData") {
            self.metadata = Some(metadata);
        } else if let Some(protocol) = action.remove("protocol") {
            self.protocol = Some(protocol);
        }
    }

    fn finish(&mut self, root: &Path, version: u64, committed_at: DateTime<Utc>) -> Result<DeltaSnapshot, DeltaError> {
        let metadata = self.metadata.take().ok_or_else(|| unreadable(format!("version {version} has no metaData")))?;
        let protocol = self.protocol.take().ok_or_else(|| unreadable(format!("version {version} has no protocol")))?;
        let column_mapping =
            metadata.pointer("/configuration/delta.columnMapping.mode").and_then(Value::as_str).unwrap_or("none").to_string();
        let with_deletion_vectors = self.adds.values().any(|a| a.get("deletionVector").is_some_and(|d| !d.is_null()));
        check_protocol(&protocol, &column_mapping, with_deletion_vectors)?;

        let schema_string = metadata
            .get("schemaString")
            .and_then(Value::as_str)
            .ok_or_else(|| unreadable(format!("version {version}: metaData has no schemaString")))?;
        let schema_json: Value =
            serde_json::from_str(schema_string).map_err(|e| unreadable(format!("version {version}: the schema: {e}")))?;
        let schema = Arc::new(struct_fields(&schema_json).map(Schema::new).map_err(unsupported)?);
        let partition_columns: Vec<String> = metadata
            .get("partitionColumns")
            .and_then(Value::as_array)
            .map(|columns| columns.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        for column in &partition_columns {
            if schema.field_with_name(column).is_err() {
                return Err(unreadable(format!("partition column `{column}` is not in the table's schema")));
            }
        }

        let mut files = Vec::with_capacity(self.adds.len());
        let mut adds: Vec<(&String, &Value)> = self.adds.iter().collect();
        adds.sort_by(|a, b| a.0.cmp(b.0));
        for (path, add) in adds {
            let relative = inside_root(path)?;
            let mut location = root.clone();
            for segment in relative.split('/') {
                location = location.join(segment);
            }
            let values = add.get("partitionValues").and_then(Value::as_object);
            let partition_values = partition_columns
                .iter()
                .map(|column| {
                    let value = values.and_then(|v| v.get(column)).and_then(Value::as_str).map(str::to_string);
                    (column.clone(), value)
                })
                .collect();
            files.push(DataFile { path: location, partition_values });
        }
        Ok(DeltaSnapshot { version, committed_at, schema, partition_columns, files })
    }
}

fn check_protocol(protocol: &Value, column_mapping: &str, with_deletion_vectors: bool) -> Result<(), DeltaError> {
    let reader_version = protocol.get("minReaderVersion").and_then(Value::as_u64).unwrap_or(1);
    if reader_version > 3 {
        return Err(unsupported(format!("the table needs Delta reader version {reader_version}; 1 to 3 are supported")));
    }
    if reader_version >= 2 && column_mapping != "none" {
        return Err(unsupported(format!("column mapping (mode `{column_mapping}`) is not supported")));
    }
    if reader_version == 3 {
        let features = protocol.get("readerFeatures").and_then(Value::as_array).cloned().unwrap_or_default();
        for feature in features.iter().filter_map(Value::as_str) {
            if !SUPPORTED_READER_FEATURES.contains(&feature) {
                return Err(unsupported(format!("the table needs the reader feature `{feature}`, which is not supported")));
            }
        }
    }
    if with_deletion_vectors {
        return Err(unsupported("deletion vectors (reader feature `deletionVectors`) are not supported: a live file has one"));
    }
    Ok(())
}

/// A data file's path relative to the table root, percent escapes
/// decoded; never an absolute location (a shallow clone's) or `..`, which
/// would read outside the root the location checks allowed.
fn inside_root(path: &str) -> Result<String, DeltaError> {
    let decoded =
        segment_core::policy::percent_decoded(path).ok_or_else(|| unreadable("a data file path has a bad percent escape"))?;
    if decoded.contains("://") || decoded.starts_with('/') {
        return Err(unsupported("a data file outside the table root (an absolute path, as shallow clones write) is not read"));
    }
    if decoded.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(unsupported("a data file path with `.`, `..` or an empty segment is not read"));
    }
    Ok(decoded)
}

/// The fields of a Delta `struct` type.
fn struct_fields(schema: &Value) -> Result<Fields, String> {
    let fields = schema.get("fields").and_then(Value::as_array).ok_or("a struct type without fields")?;
    fields
        .iter()
        .map(|field| {
            let name = field.get("name").and_then(Value::as_str).ok_or("a field without a name")?;
            let nullable = field.get("nullable").and_then(Value::as_bool).unwrap_or(true);
            let data_type = data_type(field.get("type").ok_or_else(|| format!("field `{name}` has no type"))?)
                .map_err(|e| format!("column `{name}`: {e}"))?;
            Ok(Field::new(name, data_type, nullable))
        })
        .collect::<Result<Vec<Field>, String>>()
        .map(Fields::from)
}

/// The Arrow type of a Delta type, as delta-rs and Spark write it to
/// Parquet (timestamps in microseconds).
fn data_type(delta: &Value) -> Result<DataType, String> {
    if let Some(name) = delta.as_str() {
        return Ok(match name {
            "string" => DataType::Utf8,
            "long" => DataType::Int64,
            "integer" => DataType::Int32,
            "short" => DataType::Int16,
            "byte" => DataType::Int8,
            "float" => DataType::Float32,
            "double" => DataType::Float64,
            "boolean" => DataType::Boolean,
            "binary" => DataType::Binary,
            "date" => DataType::Date32,
            "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC"))),
            "timestamp_ntz" => DataType::Timestamp(TimeUnit::Microsecond, None),
            decimal if decimal.starts_with("decimal(") => {
                let inner = decimal.trim_start_matches("decimal(").trim_end_matches(')');
                let (precision, scale) = inner.split_once(',').ok_or_else(|| format!("type `{decimal}`"))?;
                let precision: u8 = precision.trim().parse().map_err(|_| format!("type `{decimal}`"))?;
                let scale: i8 = scale.trim().parse().map_err(|_| format!("type `{decimal}`"))?;
                DataType::Decimal128(precision, scale)
            }
            other => return Err(format!("type `{other}` is not supported")),
        });
    }
    match delta.get("type").and_then(Value::as_str) {
        Some("struct") => Ok(DataType::Struct(struct_fields(delta)?)),
        Some("array") => {
            let element = data_type(delta.get("elementType").ok_or("an array without elementType")?)?;
            let nullable = delta.get("containsNull").and_then(Value::as_bool).unwrap_or(true);
            Ok(DataType::List(Arc::new(Field::new("element", element, nullable))))
        }
        Some("map") => {
            let key = data_type(delta.get("keyType").ok_or("a map without keyType")?)?;
            let value = data_type(delta.get("valueType").ok_or("a map without valueType")?)?;
            let nullable = delta.get("valueContainsNull").and_then(Value::as_bool).unwrap_or(true);
            let entries = Field::new(
                "key_value",
                DataType::Struct(Fields::from(vec![Field::new("key", key, false), Field::new("value", value, nullable)])),
                false,
            );
            Ok(DataType::Map(Arc::new(entries), false))
        }
        _ => Err("a type that is not understood".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_names() {
        assert!(matches!(parse_log_file("00000000000000000003.json"), Some(LogFile::Commit(3))));
        assert!(matches!(
            parse_log_file("00000000000000000010.checkpoint.parquet"),
            Some(LogFile::Checkpoint { version: 10, part: 1, parts: 1 })
        ));
        assert!(matches!(
            parse_log_file("00000000000000000010.checkpoint.0000000002.0000000003.parquet"),
            Some(LogFile::Checkpoint { version: 10, part: 2, parts: 3 })
        ));
        assert!(parse_log_file("_last_checkpoint").is_none());
        assert!(parse_log_file("00000000000000000003.crc").is_none());
        assert!(parse_log_file("00000000000000000003.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.json").is_none());
    }

    #[test]
    fn data_files_stay_inside_the_root() {
        assert_eq!(inside_root("country=ES/part-0.parquet").unwrap(), "country=ES/part-0.parquet");
        assert_eq!(inside_root("a%20b/part-0.parquet").unwrap(), "a b/part-0.parquet");
        for path in ["s3://other/part-0.parquet", "/etc/passwd", "../other/part-0.parquet", "x/%2E%2E/y.parquet", "a//b"] {
            assert_eq!(inside_root(path).unwrap_err().reason, FailureReason::UnsupportedSource, "{path}");
        }
    }

    #[test]
    fn unsupported_reader_features_are_refused_by_name() {
        let protocol = |v: Value| v;
        assert!(check_protocol(&protocol(serde_json::json!({"minReaderVersion": 1})), "none", false).is_ok());
        let dv = serde_json::json!({"minReaderVersion": 3, "readerFeatures": ["deletionVectors"]});
        assert!(check_protocol(&dv, "none", false).is_ok());
        assert!(check_protocol(&dv, "none", true).unwrap_err().message.contains("deletion vectors"));
        let mapped = serde_json::json!({"minReaderVersion": 2});
        assert!(check_protocol(&mapped, "name", false).unwrap_err().message.contains("column mapping"));
        let v2 = serde_json::json!({"minReaderVersion": 3, "readerFeatures": ["v2Checkpoint"]});
        assert!(check_protocol(&v2, "none", false).unwrap_err().message.contains("`v2Checkpoint`"));
    }

    #[test]
    fn delta_types_map_to_arrow() {
        let schema = serde_json::json!({"type": "struct", "fields": [
            {"name": "user_id", "type": "string", "nullable": true, "metadata": {}},
            {"name": "amount", "type": "decimal(10,2)", "nullable": true, "metadata": {}},
            {"name": "at", "type": "timestamp", "nullable": true, "metadata": {}},
            {"name": "tags", "type": {"type": "array", "elementType": "string", "containsNull": true}, "nullable": true, "metadata": {}}
        ]});
        let fields = struct_fields(&schema).unwrap();
        assert_eq!(fields[1].data_type(), &DataType::Decimal128(10, 2));
        assert!(matches!(fields[2].data_type(), DataType::Timestamp(TimeUnit::Microsecond, Some(_))));
        assert!(matches!(fields[3].data_type(), DataType::List(_)));
    }
}
