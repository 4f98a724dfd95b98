//! The commits of a lake table as its own writer read them back
//! (tests/delta_table.py with deltalake, tests/iceberg_table.py with
//! pyiceberg): what the time-travel tests compare the compute with.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

/// One commit: the table version (Delta) or snapshot id (Iceberg), when it
/// was committed, and the members the reference query gives on it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub id: u64,
    pub committed: DateTime<Utc>,
    pub members: BTreeSet<String>,
}

/// A JSON array of ids as a set.
pub fn members_of(value: &Value) -> BTreeSet<String> {
    value.as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

/// A moment between commit `i` and the next one (half a second after the
/// last).
pub fn between(commits: &[Commit], i: usize) -> DateTime<Utc> {
    match commits.get(i + 1) {
        Some(next) => commits[i].committed + (next.committed - commits[i].committed) / 2,
        None => commits[i].committed + Duration::milliseconds(500),
    }
}

/// Runs `tests/SCRIPT ARGS...`, one of the writers' helpers
/// (`delta_table.py`, `iceberg_table.py`; tests/setup installs deltalake
/// and pyiceberg); the one JSON object it prints.
pub fn run_helper(script: &str, args: &[&str]) -> Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let output = std::process::Command::new("python3").arg(&script).args(args).output().expect("python3 runs");
    assert!(
        output.status.success(),
        "{} {args:?}: {}\n(tests/setup installs deltalake and pyiceberg)",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the helper prints JSON")
}

/// Runs `tests/iceberg_table.py COMMAND CATALOG ARGS...` against `catalog`,
/// pyiceberg's properties with the catalog's `name`.
pub fn pyiceberg(catalog: &Value, args: &[&str]) -> Value {
    let (command, rest) = args.split_first().expect("a command");
    let catalog = catalog.to_string();
    let mut all = vec![*command, catalog.as_str()];
    all.extend_from_slice(rest);
    run_helper("iceberg_table.py", &all)
}

/// pyiceberg's properties of a SQL catalog named `lake` in the SQLite
/// file `db`, its tables under `warehouse` (a `file://` or `s3://` URI).
pub fn pyiceberg_sql_catalog(db: &std::path::Path, warehouse: &str) -> Value {
    serde_json::json!({"name": "lake", "type": "sql", "uri": format!("sqlite:///{}", db.display()), "warehouse": warehouse})
}

/// The snapshot log `tests/iceberg_table.py` prints after a commit.
pub fn iceberg_history(printed: &Value) -> Vec<Commit> {
    printed["history"]
        .as_array()
        .expect("a history")
        .iter()
        .map(|s| Commit {
            id: s["snapshotId"].as_u64().unwrap(),
            committed: DateTime::from_timestamp_millis(s["timestampMs"].as_i64().unwrap()).unwrap(),
            members: members_of(&s["members"]),
        })
        .collect()
}

/// The query the writers' helpers (`tests/delta_table.py`,
/// `tests/iceberg_table.py`) compute a commit's members with: amount >= 50
/// outside the US.
pub const TABLE_SEGMENT_SQL: &str = "SELECT user_id FROM orders WHERE amount >= 50 AND country <> 'US'";

/// An Iceberg table written by pyiceberg in a SQL catalog (SQLite) under
/// `dir` (`catalog.db`, `warehouse/`), and `dir/iceberg.yaml`, the
/// manifests that read it as the files of standalone mode and previews
/// do: the ComputeClass `lake-readers` naming the catalog `lake` (relative
/// to the manifests), the Namespace `growth` labelled with it, the
/// SegmentSource `orders` and the Segment `big-abroad`
/// ([`TABLE_SEGMENT_SQL`]). Returns the table's history.
pub fn iceberg_example(dir: &std::path::Path) -> Vec<Commit> {
    let warehouse = dir.join("warehouse");
    std::fs::create_dir_all(&warehouse).unwrap();
    let catalog = pyiceberg_sql_catalog(&dir.join("catalog.db"), &format!("file://{}", warehouse.display()));
    let history = iceberg_history(&pyiceberg(&catalog, &["write"]));
    let manifests = format!(
        r#"apiVersion: segmentation.dev/v1alpha1
kind: ComputeClass
metadata: {{name: lake-readers}}
spec:
  allowLocalFiles: true
  allowedSourcePrefixes: ["file://./warehouse/"]
  icebergCatalogs:
  - {{name: lake, type: sql, uri: "sqlite://./catalog.db"}}
---
apiVersion: v1
kind: Namespace
metadata:
  name: growth
  labels: {{segmentation.dev/compute-class: lake-readers}}
---
apiVersion: segmentation.dev/v1alpha1
kind: SegmentSource
metadata: {{name: orders, namespace: growth}}
spec: {{table: orders, uri: "iceberg://lake/sales/orders", format: iceberg}}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {{name: big-abroad, namespace: growth}}
spec:
  definition: {{sql: "{TABLE_SEGMENT_SQL}"}}
"#
    );
    std::fs::write(dir.join("iceberg.yaml"), manifests).unwrap();
    history
}

/// The version of `task`'s result as the store records it once ingest has
/// checked it (`ingest::verify`, as its Job does) and the operator has
/// sealed it from the verdict, in an in-memory store.
pub async fn ingested_and_sealed(task: &segment_core::task::ComputeTask) -> segment_core::store::StoredVersion {
    use segment_core::seal::{SealFile, SEAL_FILE};
    use segment_core::store::{MemoryStore, SegmentStore};
    let ingest = segment_core::task::IngestTask {
        segment: task.segment.clone(),
        version: task.version,
        snapshot_time: task.snapshot_time,
        results_uri: task.results_uri.clone(),
        max_failed_parts: 0,
        compare_with: None,
        overrides_from: None,
    };
    segment_compute::ingest::verify(&ingest).await.expect("ingest succeeds");
    let seal = segment_store::results::ResultDir::open(&task.results_uri).unwrap().read_seal().await.unwrap();
    let verdict: SealFile = serde_json::from_slice(&seal.unwrap_or_else(|| panic!("no {SEAL_FILE}"))).unwrap();
    let store = MemoryStore::new();
    store.seal_with(&task.segment, task.version, &verdict.seal).await.unwrap();
    store.versions(&task.segment).await.unwrap().remove(&task.version).expect("the sealed version")
}
