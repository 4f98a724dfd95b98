//! Apache Iceberg tables read as of a point in time, from the table's own
//! metadata, manifest list and manifests (no `iceberg` crate: it needs
//! another Arrow than DataFusion's), so DataFusion is handed exactly the
//! Parquet files of one snapshot.
//!
//! [`snapshot_at`] asks the catalog for the table's current metadata
//! ([`crate::iceberg_catalog`]), picks the snapshot that was the table's
//! current one at the snapshot time (the newest entry of the metadata's
//! `snapshot-log` at or before it: Iceberg's own "as of timestamp", which
//! follows rollbacks and ignores other branches), and lists its live data
//! files: every entry of every data manifest of its manifest list whose
//! status is not DELETED.
//!
//! The table's location and its metadata file must be where the
//! namespace's ComputeClass allows sources to be, and every manifest list,
//! manifest and data file under the table's location: a catalog entry or
//! a metadata file naming files elsewhere (another tenant's table, the
//! worker's own files) is refused, not read.
//!
//! Refused with [`FailureReason::UnsupportedSource`], naming the feature:
//! format versions above 2, delete files (position or equality deletes,
//! merge-on-read), data files other than Parquet, and column renames
//! (DataFusion matches columns by name, Iceberg by field id).

use std::collections::BTreeMap;
use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use chrono::{DateTime, TimeZone, Utc};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use object_store::path::Path;
use object_store::ObjectStore;
use segment_core::iceberg::{IcebergAccess, TableRef};
use serde::Deserialize;
use serde_json::Value;

use crate::iceberg_catalog::{self, CatalogTable};
use crate::lake_table::{before_history, unreadable, unsupported, TableError};

/// The table as of one snapshot: what the compute registers, and what
/// another engine needs to read exactly the same rows.
#[derive(Debug, Clone)]
pub struct IcebergSnapshot {
    pub snapshot_id: u64,
    /// When the snapshot became the table's current one.
    pub committed_at: DateTime<Utc>,
    /// The table's root (`s3://…`, `file:///…`).
    pub table_location: String,
    /// The columns of the snapshot's schema.
    pub schema: SchemaRef,
    /// The live data files, full URIs, sorted.
    pub files: Vec<String>,
}

/// `source` (`iceberg://<catalog>/<namespace>/<table>`) as of `at`, with
/// the catalogs and locations of `access`.
pub async fn snapshot_at(uri: &str, access: &IcebergAccess, at: DateTime<Utc>) -> Result<IcebergSnapshot, TableError> {
    let table = TableRef::parse(uri).map_err(unsupported)?;
    let catalog = access.catalog(&table.catalog).ok_or_else(|| {
        unsupported(format!("catalog `{}` is not one of the namespace's ComputeClass icebergCatalogs", table.catalog))
    })?;
    let CatalogTable { metadata_location, metadata } = iceberg_catalog::load_table(catalog, &table).await?;
    let metadata_location = normalized(&metadata_location);
    allowed(access, "the table's metadata file", &metadata_location)?;
    let metadata = match metadata {
        Some(metadata) => metadata,
        None => read_json(&metadata_location).await?,
    };
    let metadata: TableMetadata =
        serde_json::from_value(metadata).map_err(|e| unreadable(format!("the table's metadata file: {e}")))?;
    let table_location = normalized(metadata.location.trim_end_matches('/'));
    allowed(access, "the table's location", &format!("{table_location}/"))?;
    if metadata.format_version > 2 {
        return Err(unsupported(format!("Iceberg format version {} is not supported (1 and 2 are)", metadata.format_version)));
    }
    let schemas = if metadata.schemas.is_empty() { metadata.schema.iter().cloned().collect() } else { metadata.schemas.clone() };
    check_no_renames(&schemas)?;

    let snapshot = metadata.snapshot_as_of(at)?;
    let snapshot_id = u64::try_from(snapshot.snapshot.snapshot_id)
        .map_err(|_| unsupported(format!("a negative snapshot id ({}) is not supported", snapshot.snapshot.snapshot_id)))?;
    let schema_id = snapshot.snapshot.schema_id.unwrap_or(metadata.current_schema_id);
    let schema = schemas
        .iter()
        .find(|s| s.schema_id == schema_id)
        .ok_or_else(|| unreadable(format!("snapshot {snapshot_id}: schema {schema_id} is not in the metadata")))?;
    let schema = Arc::new(Schema::new(struct_fields(&schema.fields).map_err(unsupported)?));
    let files = live_data_files(&table_location, snapshot.snapshot).await?;
    Ok(IcebergSnapshot { snapshot_id, committed_at: snapshot.at, table_location, schema, files })
}

fn allowed(access: &IcebergAccess, what: &str, location: &str) -> Result<(), TableError> {
    access.check_location(what, location).map_err(|e| unsupported(format!("{what} is not read: {}", e.message)))
}

/// A location as the engine reads it: Java writers spell local paths
/// `file:/x` (Hadoop's) and S3 `s3a://`/`s3n://`; a bare absolute path
/// (pyiceberg's `add_files` of local files keeps it) is a local file.
fn normalized(location: &str) -> String {
    if location.starts_with('/') {
        return format!("file://{location}");
    }
    if let Some(rest) = location.strip_prefix("file:") {
        if !rest.starts_with("//") {
            return format!("file://{rest}");
        }
    }
    for scheme in ["s3a://", "s3n://"] {
        if let Some(rest) = location.strip_prefix(scheme) {
            return format!("s3://{rest}");
        }
    }
    location.to_string()
}

/// `file` as read, when it is under the table's location; an error
/// naming `what` otherwise.
fn inside_table(table_location: &str, file: &str, what: &str) -> Result<String, TableError> {
    let file = normalized(file);
    let decoded =
        segment_core::policy::percent_decoded(&file).ok_or_else(|| unreadable(format!("{what}: a bad percent escape")))?;
    let relative = decoded.strip_prefix(table_location).and_then(|rest| rest.strip_prefix('/'));
    match relative {
        Some(rest) if !rest.split('/').any(|s| s.is_empty() || s == "." || s == "..") => Ok(file),
        _ => Err(unsupported(format!("{what} outside the table's location is not read"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct TableMetadata {
    format_version: u32,
    location: String,
    #[serde(default)]
    current_schema_id: i32,
    #[serde(default)]
    schemas: Vec<IcebergSchema>,
    /// v1 tables may carry one `schema` only.
    #[serde(default)]
    schema: Option<IcebergSchema>,
    #[serde(default)]
    current_snapshot_id: Option<i64>,
    #[serde(default)]
    snapshots: Vec<Snapshot>,
    #[serde(default)]
    snapshot_log: Vec<SnapshotLogEntry>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "kebab-case")]
struct IcebergSchema {
    #[serde(default)]
    schema_id: i32,
    fields: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Snapshot {
    snapshot_id: i64,
    #[serde(default)]
    parent_snapshot_id: Option<i64>,
    timestamp_ms: i64,
    #[serde(default)]
    manifest_list: Option<String>,
    /// v1 tables may list manifests inline instead.
    #[serde(default)]
    manifests: Option<Vec<String>>,
    #[serde(default)]
    schema_id: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SnapshotLogEntry {
    snapshot_id: i64,
    timestamp_ms: i64,
}

struct Chosen<'a> {
    snapshot: &'a Snapshot,
    at: DateTime<Utc>,
}

fn millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl TableMetadata {
    /// The snapshot current at `at`: the newest snapshot-log entry at or
    /// before it (the main branch's history), else, for writers that keep
    /// no log, the newest ancestor of the current snapshot committed at or
    /// before it.
    fn snapshot_as_of(&self, at: DateTime<Utc>) -> Result<Chosen<'_>, TableError> {
        let by_id = |id: i64| self.snapshots.iter().find(|s| s.snapshot_id == id);
        let history: Vec<(i64, i64)> = if self.snapshot_log.is_empty() {
            let mut ancestors = Vec::new();
            let mut next = self.current_snapshot_id.filter(|id| *id != -1);
            while let Some(snapshot) = next.and_then(by_id) {
                ancestors.push((snapshot.snapshot_id, snapshot.timestamp_ms));
                next = snapshot.parent_snapshot_id;
            }
            ancestors.reverse();
            ancestors
        } else {
            self.snapshot_log.iter().map(|e| (e.snapshot_id, e.timestamp_ms)).collect()
        };
        // Expiring snapshots trims the log's older entries; an entry whose
        // snapshot is gone cannot be read either.
        let oldest_readable = history.iter().find(|(id, _)| by_id(*id).is_some());
        let Some(&(oldest_id, oldest_ms)) = oldest_readable else {
            return Err(before_history(format!(
                "the table has no snapshot that can be read at {} (it has no data yet, or every snapshot expired)",
                at.to_rfc3339()
            )));
        };
        let chosen = history.iter().rev().find(|(_, ms)| millis(*ms) <= at);
        match chosen.and_then(|(id, ms)| by_id(*id).map(|s| (s, *ms))) {
            Some((snapshot, ms)) => Ok(Chosen { snapshot, at: millis(ms) }),
            None => Err(before_history(format!(
                "the snapshot time {} is before the oldest snapshot that can be read, {oldest_id} committed at {}{}",
                at.to_rfc3339(),
                millis(oldest_ms).to_rfc3339(),
                if chosen.is_some() { " (the snapshot current then has expired)" } else { "" }
            ))),
        }
    }
}

/// Fields whose id names another column in another schema: DataFusion
/// would read a renamed column as missing.
fn check_no_renames(schemas: &[IcebergSchema]) -> Result<(), TableError> {
    let mut names: BTreeMap<i64, String> = BTreeMap::new();
    let mut walk = vec![];
    for schema in schemas {
        walk.extend(schema.fields.iter().map(|f| (String::new(), f)));
    }
    while let Some((parent, field)) = walk.pop() {
        let (Some(id), Some(name)) = (field.get("id").and_then(Value::as_i64), field.get("name").and_then(Value::as_str)) else {
            continue;
        };
        let path = format!("{parent}{name}");
        if let Some(before) = names.insert(id, path.clone()) {
            if before != path {
                return Err(unsupported(format!("a renamed column (`{before}` became `{path}`) is not supported")));
            }
        }
        if let Some(nested) = field.get("type").and_then(|t| t.get("fields")).and_then(Value::as_array) {
            walk.extend(nested.iter().map(|f| (format!("{path}."), f)));
        }
    }
    Ok(())
}

/// An entry of a manifest list (`manifest_file`).
#[derive(Deserialize)]
struct ManifestFile {
    manifest_path: String,
    /// 0 data, 1 deletes; absent in v1.
    #[serde(default)]
    content: i32,
}

/// An entry of a manifest (`manifest_entry`).
#[derive(Deserialize)]
struct ManifestEntry {
    /// 0 EXISTING, 1 ADDED, 2 DELETED.
    status: i32,
    data_file: DataFileEntry,
}

#[derive(Deserialize)]
struct DataFileEntry {
    /// 0 data, 1 position deletes, 2 equality deletes; absent in v1.
    #[serde(default)]
    content: i32,
    file_path: String,
    file_format: String,
}

const DELETED: i32 = 2;

async fn live_data_files(table_location: &str, snapshot: &Snapshot) -> Result<Vec<String>, TableError> {
    let id = snapshot.snapshot_id;
    let manifests: Vec<ManifestFile> = match (&snapshot.manifest_list, &snapshot.manifests) {
        (Some(list), _) => {
            let list = inside_table(table_location, list, &format!("snapshot {id}: the manifest list"))?;
            read_avro(&list, "the manifest list").await?
        }
        (None, Some(paths)) => paths.iter().map(|p| ManifestFile { manifest_path: p.clone(), content: 0 }).collect(),
        (None, None) => return Err(unreadable(format!("snapshot {id} has neither a manifest list nor manifests"))),
    };
    let mut files = Vec::new();
    for manifest in manifests {
        let path = inside_table(table_location, &manifest.manifest_path, &format!("snapshot {id}: a manifest"))?;
        let entries: Vec<ManifestEntry> = read_avro(&path, "a manifest").await?;
        let live = entries.into_iter().filter(|e| e.status != DELETED);
        for entry in live {
            let file = entry.data_file;
            if manifest.content != 0 || file.content != 0 {
                return Err(unsupported(format!(
                    "snapshot {id} has delete files (position or equality deletes, merge-on-read), which are not supported"
                )));
            }
            if !file.file_format.eq_ignore_ascii_case("parquet") {
                return Err(unsupported(format!("data files in {} are not supported (Parquet is)", file.file_format)));
            }
            files.push(inside_table(table_location, &file.file_path, &format!("snapshot {id}: a data file"))?);
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

async fn read_bytes(uri: &str, what: &str) -> Result<bytes::Bytes, TableError> {
    let location = segment_store::objects::locate(uri).map_err(|e| unreadable(format!("{what} {uri}: {e}")))?;
    let store: &dyn ObjectStore = location.store.as_ref();
    let path: &Path = &location.path;
    let got = object_store::ObjectStoreExt::get(store, path).await.map_err(|e| unreadable(format!("{what} {uri}: {e}")))?;
    got.bytes().await.map_err(|e| unreadable(format!("{what} {uri}: {e}")))
}

async fn read_json(uri: &str) -> Result<Value, TableError> {
    let bytes = read_bytes(uri, "the table's metadata file").await?;
    serde_json::from_slice(&bytes).map_err(|e| unreadable(format!("the table's metadata file {uri}: {e}")))
}

/// The records of an Avro file (a manifest list or a manifest) as `T`.
async fn read_avro<T: for<'de> Deserialize<'de>>(uri: &str, what: &str) -> Result<Vec<T>, TableError> {
    let bytes = read_bytes(uri, what).await?;
    let bad = |e: apache_avro::Error| unreadable(format!("{what} {uri}: {e}"));
    let reader = apache_avro::Reader::new(&bytes[..]).map_err(bad)?;
    let mut out = Vec::new();
    for value in reader {
        let value: AvroValue = value.map_err(bad)?;
        out.push(apache_avro::from_value::<T>(&value).map_err(bad)?);
    }
    Ok(out)
}

/// The Arrow fields of an Iceberg struct's fields.
fn struct_fields(fields: &[Value]) -> Result<Fields, String> {
    fields
        .iter()
        .map(|field| {
            let name = field.get("name").and_then(Value::as_str).ok_or("a field without a name")?;
            let required = field.get("required").and_then(Value::as_bool).unwrap_or(false);
            let data_type = data_type(field.get("type").ok_or_else(|| format!("field `{name}` has no type"))?)
                .map_err(|e| format!("column `{name}`: {e}"))?;
            Ok(Field::new(name, data_type, !required))
        })
        .collect::<Result<Vec<Field>, String>>()
        .map(Fields::from)
}

/// The Arrow type of an Iceberg type, as Iceberg writers store it in
/// Parquet (timestamps in microseconds, or nanoseconds for the `_ns` types).
fn data_type(iceberg: &Value) -> Result<DataType, String> {
    if let Some(name) = iceberg.as_str() {
        return Ok(match name {
            "boolean" => DataType::Boolean,
            "int" => DataType::Int32,
            "long" => DataType::Int64,
            "float" => DataType::Float32,
            "double" => DataType::Float64,
            "date" => DataType::Date32,
            "time" => DataType::Time64(TimeUnit::Microsecond),
            "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
            "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC"))),
            "timestamp_ns" => DataType::Timestamp(TimeUnit::Nanosecond, None),
            "timestamptz_ns" => DataType::Timestamp(TimeUnit::Nanosecond, Some(Arc::from("UTC"))),
            "string" => DataType::Utf8,
            "uuid" => DataType::FixedSizeBinary(16),
            "binary" => DataType::Binary,
            fixed if fixed.starts_with("fixed[") => {
                let length: i32 = fixed[6..].trim_end_matches(']').parse().map_err(|_| format!("type `{fixed}`"))?;
                DataType::FixedSizeBinary(length)
            }
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
    match iceberg.get("type").and_then(Value::as_str) {
        Some("struct") => {
            let fields = iceberg.get("fields").and_then(Value::as_array).ok_or("a struct without fields")?;
            Ok(DataType::Struct(struct_fields(fields)?))
        }
        Some("list") => {
            let element = data_type(iceberg.get("element").ok_or("a list without element")?)?;
            let required = iceberg.get("element-required").and_then(Value::as_bool).unwrap_or(false);
            Ok(DataType::List(Arc::new(Field::new("element", element, !required))))
        }
        Some("map") => {
            let key = data_type(iceberg.get("key").ok_or("a map without key")?)?;
            let value = data_type(iceberg.get("value").ok_or("a map without value")?)?;
            let required = iceberg.get("value-required").and_then(Value::as_bool).unwrap_or(false);
            let entries = Field::new(
                "key_value",
                DataType::Struct(Fields::from(vec![Field::new("key", key, false), Field::new("value", value, !required)])),
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
    use segment_core::reasons::FailureReason;

    fn metadata(log: serde_json::Value, snapshots: serde_json::Value) -> TableMetadata {
        serde_json::from_value(serde_json::json!({
            "format-version": 2, "location": "s3://lake/t", "current-schema-id": 0,
            "schemas": [{"schema-id": 0, "fields": []}],
            "current-snapshot-id": 3, "snapshots": snapshots, "snapshot-log": log
        }))
        .unwrap()
    }

    #[test]
    fn the_snapshot_read_is_the_one_current_at_the_time() {
        let snapshots = serde_json::json!([
            {"snapshot-id": 1, "timestamp-ms": 1000, "manifest-list": "s3://lake/t/metadata/1.avro"},
            {"snapshot-id": 2, "parent-snapshot-id": 1, "timestamp-ms": 2000, "manifest-list": "s3://lake/t/metadata/2.avro"},
            {"snapshot-id": 3, "parent-snapshot-id": 2, "timestamp-ms": 3000, "manifest-list": "s3://lake/t/metadata/3.avro"}
        ]);
        let log = serde_json::json!([
            {"snapshot-id": 1, "timestamp-ms": 1000}, {"snapshot-id": 2, "timestamp-ms": 2000},
            {"snapshot-id": 3, "timestamp-ms": 3000}
        ]);
        let table = metadata(log, snapshots.clone());
        let at = |ms: i64| table.snapshot_as_of(millis(ms)).map(|c| c.snapshot.snapshot_id);
        assert_eq!(at(1000), Ok(1));
        assert_eq!(at(2999), Ok(2));
        assert_eq!(at(9999), Ok(3));
        assert_eq!(at(999).map_err(|e| e.reason), Err(FailureReason::SnapshotBeforeHistory));
        // Without a log, the current snapshot's ancestry.
        let no_log = metadata(serde_json::json!([]), snapshots);
        assert_eq!(no_log.snapshot_as_of(millis(2500)).map(|c| c.snapshot.snapshot_id), Ok(2));
        // An expired snapshot is not read.
        let expired = metadata(
            serde_json::json!([{"snapshot-id": 1, "timestamp-ms": 1000}, {"snapshot-id": 3, "timestamp-ms": 3000}]),
            serde_json::json!([{"snapshot-id": 3, "timestamp-ms": 3000, "manifest-list": "s3://lake/t/m.avro"}]),
        );
        let Err(error) = expired.snapshot_as_of(millis(1500)) else { panic!("an expired snapshot is read") };
        assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory);
        assert!(error.message.contains("expired"), "{}", error.message);
        // No snapshot yet: nothing to read at any time.
        let empty = metadata(serde_json::json!([]), serde_json::json!([]));
        let Err(error) = empty.snapshot_as_of(millis(1500)) else { panic!("a table without snapshots is read") };
        assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory);
    }

    #[test]
    fn files_outside_the_table_location_are_refused() {
        let root = "s3://lake/t";
        assert_eq!(inside_table(root, "s3a://lake/t/data/a.parquet", "f").unwrap(), "s3://lake/t/data/a.parquet");
        assert_eq!(inside_table("file:///w/t", "file:/w/t/data/a.parquet", "f").unwrap(), "file:///w/t/data/a.parquet");
        assert_eq!(inside_table("file:///w/t", "/w/t/a.parquet", "f").unwrap(), "file:///w/t/a.parquet");
        assert!(inside_table(root, "/etc/passwd", "f").is_err());
        for path in [
            "s3://lake/other/a.parquet",
            "s3://lake/t2/a.parquet",
            "s3://lake/t/../x/a.parquet",
            "s3://lake/t/%2E%2E/a",
            "file:///etc/passwd",
        ] {
            assert_eq!(inside_table(root, path, "f").unwrap_err().reason, FailureReason::UnsupportedSource, "{path}");
        }
    }

    #[test]
    fn renamed_columns_are_refused() {
        let schema = |name: &str| IcebergSchema {
            schema_id: 0,
            fields: vec![serde_json::json!({"id": 1, "name": name, "type": "string"})],
        };
        assert!(check_no_renames(&[schema("a"), schema("a")]).is_ok());
        assert!(check_no_renames(&[schema("a"), schema("b")]).unwrap_err().message.contains("renamed"));
    }

    #[test]
    fn iceberg_types_map_to_arrow() {
        let fields = struct_fields(&[
            serde_json::json!({"id": 1, "name": "user_id", "required": true, "type": "string"}),
            serde_json::json!({"id": 2, "name": "amount", "required": false, "type": "decimal(10, 2)"}),
            serde_json::json!({"id": 3, "name": "at", "required": false, "type": "timestamptz"}),
            serde_json::json!({"id": 4, "name": "tags", "required": false, "type": {"type": "list", "element-id": 5, "element": "string", "element-required": false}}),
        ])
        .unwrap();
        assert!(!fields[0].is_nullable());
        assert_eq!(fields[1].data_type(), &DataType::Decimal128(10, 2));
        assert!(matches!(fields[2].data_type(), DataType::Timestamp(TimeUnit::Microsecond, Some(_))));
        assert!(matches!(fields[3].data_type(), DataType::List(_)));
    }
}
