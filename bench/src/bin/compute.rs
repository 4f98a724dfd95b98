//! Compute time for reference segments over a generated lake, next to
//! DuckDB (the reference engine, from PyPI) running the same SQL on the
//! same files in the same run: shapes a CRM team writes (windows, anti-
//! joins, three-table joins, distinct counts, time windows with HAVING,
//! IN lists, string predicates) over Parquet, CSV and NDJSON, with each
//! segment's ratio and the total's. Then the orders segments again with
//! `orders` read as a Delta Lake table (a log over the same Parquet files),
//! next to the same segments over the plain Parquet prefix, and read as an
//! Apache Iceberg table (the same files, registered by pyiceberg).
//!
//! cargo run --release -p segment-bench --bin compute -- [users] [--explain NAME] [--spark]
//! (1,000,000 users give ~3M orders and ~10M app events). `--explain NAME`
//! prints, for each segment whose name contains NAME, the physical plan
//! with every operator's metrics after a run, and measures nothing;
//! `--spark` adds the segments on the local Spark engine (it needs
//! `target/release/segment-worker`).

use std::process::Command;

use chrono::{DateTime, Duration, Utc};
use segment_bench::row;
use segment_compute::compute::{self, ComputeOptions};
use segment_compute::lakegen::{generate, write_delta_commit, LakeSpec};
use segment_compute::spark;
use segment_core::api::{
    ComputeEngine, Definition, IcebergCatalog, IcebergCatalogType, SegmentKey, SegmentSourceSpec, SourceFormat,
};
use segment_core::iceberg::IcebergAccess;
use segment_core::rules::Rule;
use segment_core::rules_sql;
use segment_core::task::ComputeTask;
use segment_tests::table_history::pyiceberg;

fn sources(lake: &std::path::Path) -> Vec<SegmentSourceSpec> {
    let source = |table: &str, format, ts: Option<&str>| SegmentSourceSpec {
        table: table.into(),
        uri: format!("file://{}/{table}/", lake.display()),
        format,
        user_id_column: "user_id".into(),
        timestamp_column: ts.map(str::to_string),
    };
    vec![
        source("orders", SourceFormat::Parquet, Some("created_at")),
        source("users", SourceFormat::Csv, None),
        source("app_events", SourceFormat::Ndjson, Some("ts")),
    ]
}

/// (name, definition as our engine runs it, the same as SQL for DuckDB).
fn reference_segments(sources: &[SegmentSourceSpec]) -> Vec<(&'static str, Definition, String)> {
    let sql = |name: &'static str, text: &str| {
        (name, Definition { sql: Some(text.into()), rules: None, static_list: None }, text.to_string())
    };
    let rules = |name: &'static str, yaml: &str| {
        let rule: Rule = serde_yaml::from_str(yaml).expect("a rule");
        let compiled = rules_sql::compile(&rule, sources).expect("rules compile");
        (name, Definition { sql: None, rules: Some(rule), static_list: None }, compiled)
    };
    vec![
        sql(
            "lapsed-high-value (sql)",
            "SELECT user_id FROM orders WHERE created_at >= now() - INTERVAL '90 days' GROUP BY user_id \
             HAVING count(*) >= 3 AND max(created_at) < now() - INTERVAL '30 days'",
        ),
        rules(
            "southern-europe-buyers (rules)",
            "all:\n- property: {table: users, column: country, op: in, values: [ES, IT]}\n\
             - event: {table: orders, within: 90d, where: [{column: status, op: eq, value: delivered}]}\n",
        ),
        sql(
            "churn-risk (sql, NOT EXISTS)",
            "SELECT DISTINCT e.user_id FROM app_events e WHERE e.ts >= now() - INTERVAL '60 days' AND NOT EXISTS \
             (SELECT 1 FROM app_events r WHERE r.user_id = e.user_id AND r.ts >= now() - INTERVAL '14 days')",
        ),
        sql(
            "top-decile-spenders (sql, window)",
            "SELECT user_id FROM (SELECT user_id, ntile(10) OVER (ORDER BY sum(amount) DESC) AS decile \
             FROM orders WHERE status = 'delivered' GROUP BY user_id) AS ranked WHERE decile = 1",
        ),
        rules(
            "engaged-not-buying (rules)",
            "all:\n- event: {table: app_events, count: {gte: 5}, within: 30d}\n- not: {event: {table: orders, within: 30d}}\n",
        ),
        sql(
            "quick-rebuyers (sql, lag)",
            "SELECT DISTINCT user_id FROM (SELECT user_id, created_at, lag(created_at) OVER \
             (PARTITION BY user_id ORDER BY created_at, order_id) AS previous FROM orders WHERE status = 'delivered') AS o \
             WHERE previous IS NOT NULL AND created_at <= previous + INTERVAL '7 days'",
        ),
        sql(
            "returned-after-delivery (sql, lead)",
            "SELECT DISTINCT user_id FROM (SELECT user_id, status, lead(status) OVER \
             (PARTITION BY user_id ORDER BY created_at, order_id) AS next_status FROM orders) AS o \
             WHERE status = 'delivered' AND next_status = 'returned'",
        ),
        sql(
            "new-customers (sql, row_number)",
            "SELECT user_id FROM (SELECT user_id, created_at, row_number() OVER \
             (PARTITION BY user_id ORDER BY created_at, order_id) AS n FROM orders) AS o \
             WHERE n = 1 AND created_at >= now() - INTERVAL '30 days'",
        ),
        sql("never-ordered (sql, NOT IN, csv)", "SELECT user_id FROM users WHERE user_id NOT IN (SELECT user_id FROM orders)"),
        sql(
            "quiet-month (sql, LEFT JOIN IS NULL)",
            "SELECT u.user_id FROM users u LEFT JOIN app_events e ON e.user_id = u.user_id \
             AND e.ts >= now() - INTERVAL '30 days' WHERE e.user_id IS NULL",
        ),
        sql(
            "pro-returners-at-checkout (sql, 3 tables)",
            "SELECT DISTINCT u.user_id FROM users u JOIN orders o ON o.user_id = u.user_id \
             JOIN app_events e ON e.user_id = u.user_id WHERE u.plan = 'pro' AND o.status = 'returned' \
             AND e.event = 'checkout' AND e.ts >= now() - INTERVAL '30 days'",
        ),
        sql(
            "broad-browsers (sql, COUNT DISTINCT)",
            "SELECT user_id FROM app_events WHERE ts >= now() - INTERVAL '30 days' GROUP BY user_id \
             HAVING count(DISTINCT event) >= 5",
        ),
        sql(
            "big-spenders-90d (sql, HAVING sum)",
            "SELECT user_id FROM orders WHERE status = 'delivered' AND created_at >= now() - INTERVAL '90 days' \
             GROUP BY user_id HAVING sum(amount) > 300",
        ),
        sql(
            "iberian-paying (sql, IN lists, csv)",
            "SELECT user_id FROM users WHERE country IN ('ES', 'PT') AND plan IN ('plus', 'pro')",
        ),
        sql(
            "carts-this-week (sql, LIKE, ndjson)",
            "SELECT DISTINCT user_id FROM app_events WHERE event LIKE 'add%cart' AND ts >= now() - INTERVAL '7 days'",
        ),
    ]
}

/// The compute task of one benchmark segment, its results under `work`.
fn bench_task(
    name: &str,
    definition: Definition,
    sources: &[SegmentSourceSpec],
    snapshot: DateTime<Utc>,
    work: &std::path::Path,
) -> ComputeTask {
    ComputeTask {
        segment: SegmentKey::new("bench", name),
        version: 1,
        generation: 1,
        definition_hash: "bench".into(),
        snapshot_time: snapshot,
        definition,
        sources: sources.to_vec(),
        segment_inputs: Vec::new(),
        results_uri: format!("file://{}/results/{name}/v1/", work.display()),
        engine: Default::default(),
        iceberg: None,
    }
}

/// Each segment runs this many times on each engine, one after the other,
/// and the fastest counts: a lone run of a 0.1 s segment varies by tens of
/// percent with whatever else the host does.
const RUNS: usize = 3;

/// The memory both engines get: the pool of a compute Job of the chart's
/// default size (`worker.memoryLimit: 4Gi`, two thirds of it), DataFusion
/// through its pool and DuckDB through its `memory_limit`.
fn pool_bytes() -> usize {
    compute::memory_pool_for(Some(4 << 30))
}

/// How the benchmark runs DataFusion: with [`pool_bytes`].
fn bench_options() -> ComputeOptions {
    ComputeOptions { memory_limit: pool_bytes(), ..ComputeOptions::default() }
}

/// `--spark`: the fifteen segments on the local Spark engine (`spark-submit
/// --master local[*]`, one session for all of them, so the JVM starts once;
/// a 4 GiB driver), their total next to DataFusion's, and the members
/// checked against DataFusion's. The same 2 cores: what a Spark run costs
/// on one node, not what a cluster of executors would do.
async fn spark_on_the_same_lake(
    sources: &[SegmentSourceSpec],
    snapshot: DateTime<Utc>,
    work: &std::path::Path,
    datafusion: &[(&str, f64, u64)],
) {
    let tasks: Vec<ComputeTask> = reference_segments(sources)
        .into_iter()
        .enumerate()
        .map(|(i, (_, definition, _))| ComputeTask {
            engine: ComputeEngine::Spark,
            ..bench_task(&format!("spark{i}"), definition, sources, snapshot, work)
        })
        .collect();
    let options = ComputeOptions { memory_limit: 4 << 30, ..ComputeOptions::default() };
    let start = std::time::Instant::now();
    let reports = spark::run_local_all(&tasks, &options).await.unwrap_or_else(|e| panic!("spark: {e}"));
    let seconds = start.elapsed().as_secs_f64();
    for ((name, _, members), report) in datafusion.iter().zip(&reports) {
        assert_eq!(*members, report.members, "{name}: Spark and DataFusion disagree on the members");
    }
    let total: f64 = datafusion.iter().map(|(_, seconds, _)| seconds).sum();
    println!();
    row("the fifteen segments on local Spark, one session", seconds, "s");
    row("the same on DataFusion (sum of the best runs)", total, "s");
    println!("{:<48} {:>14.2} x", "Spark / DataFusion", seconds / total);
}

/// The fastest of [`RUNS`] runs of `task`, and its members.
async fn best_of(task: &ComputeTask, name: &str) -> (f64, u64) {
    let mut best = f64::INFINITY;
    let mut members = 0;
    for _ in 0..RUNS {
        let start = std::time::Instant::now();
        let report = compute::run_with(task, &bench_options()).await.unwrap_or_else(|e| panic!("{name} ({}): {e}", task.segment));
        best = best.min(start.elapsed().as_secs_f64());
        members = report.members;
    }
    (best, members)
}

fn duckdb_sql(sql: &str, snapshot: DateTime<Utc>) -> String {
    sql.replace("now()", &format!("TIMESTAMPTZ '{}'", snapshot.format("%Y-%m-%d %H:%M:%S+00")))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let users: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let explain = args.iter().position(|a| a == "--explain").map(|i| args.get(i + 1).cloned().unwrap_or_default());
    let work = tempfile::tempdir().expect("a temp dir");
    let lake = work.path().join("lake");
    let spec = LakeSpec::new(users, 7);
    let (summary, gen_seconds) = segment_bench::timed(|| generate(&lake, &spec).expect("lake generated"));
    let snapshot = spec.now - Duration::hours(1);
    let sources = sources(&lake);
    println!(
        "compute benchmark: {} users, {} orders, {} app events (lake generated in {gen_seconds:.1}s)",
        summary.users, summary.orders, summary.events
    );

    if let Some(wanted) = explain {
        for (i, (name, definition, _)) in reference_segments(&sources).into_iter().enumerate() {
            if name.contains(&wanted) {
                let task = bench_task(&format!("s{i}"), definition, &sources, snapshot, work.path());
                let plan = compute::explain_analyze(&task, &bench_options()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
                println!("{name}\n{plan}");
            }
        }
        return;
    }

    let mut queries = Vec::new();
    let mut ours = Vec::new();
    for (i, (name, definition, sql)) in reference_segments(&sources).into_iter().enumerate() {
        let task = bench_task(&format!("s{i}"), definition, &sources, snapshot, work.path());
        let (best, members) = best_of(&task, name).await;
        ours.push((name, best, members));
        queries.push(serde_json::json!({"name": name, "sql": duckdb_sql(&sql, snapshot)}));
    }

    let queries_path = work.path().join("queries.json");
    std::fs::write(&queries_path, serde_json::to_vec(&queries).expect("json")).expect("queries written");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/duckdb_reference.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&lake)
        .arg(&queries_path)
        .arg(RUNS.to_string())
        .arg((pool_bytes() >> 20).to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "duckdb reference failed (python3 -m pip install duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("duckdb figures");

    println!("{:<42} {:>10} {:>11} {:>8} {:>10} {:>11}", "segment", "ours (s)", "duckdb (s)", "ratio", "members", "duckdb rows");
    let (mut total_ours, mut total_ref, mut worst) = (0.0, 0.0, (0.0, ""));
    for ((name, seconds, members), reference) in ours.iter().zip(&reference) {
        let ref_seconds = reference["seconds"].as_f64().unwrap_or(f64::NAN);
        let ref_rows = reference["rows"].as_u64().unwrap_or(0);
        let ratio = seconds / ref_seconds;
        println!("{name:<42} {seconds:>10.2} {ref_seconds:>11.2} {ratio:>7.2}x {members:>10} {ref_rows:>11}");
        assert_eq!(*members, ref_rows, "{name}: the engines disagree on the members");
        total_ours += seconds;
        total_ref += ref_seconds;
        if ratio > worst.0 {
            worst = (ratio, name);
        }
    }
    row("total, ours (includes writing result files)", total_ours, "s");
    row("total, duckdb (query + fetch)", total_ref, "s");
    println!("{:<48} {:>14.2} x", "total ratio, ours / duckdb", total_ours / total_ref);
    println!("{:<48} {:>14.2} x ({})", "worst segment ratio", worst.0, worst.1);
    if args.iter().any(|a| a == "--spark") {
        spark_on_the_same_lake(&sources, snapshot, work.path(), &ours).await;
    }

    // The same orders as a Delta table: a log over the same Parquet files,
    // committed before the snapshot. The segments that read orders only.
    let orders_dir = lake.join("orders");
    let parts: Vec<std::path::PathBuf> = summary
        .files
        .iter()
        .filter(|f| f.starts_with(&orders_dir) && f.extension().is_some_and(|e| e == "parquet"))
        .cloned()
        .collect();
    let columns =
        [("order_id", "long"), ("user_id", "string"), ("amount", "double"), ("status", "string"), ("created_at", "timestamp")];
    write_delta_commit(&orders_dir, "orders", &parts, &columns, snapshot - Duration::hours(1)).expect("a Delta log");
    let delta_sources: Vec<SegmentSourceSpec> = sources
        .iter()
        .map(|s| if s.table == "orders" { SegmentSourceSpec { format: SourceFormat::Delta, ..s.clone() } } else { s.clone() })
        .collect();
    println!();
    println!("{:<42} {:>10} {:>11} {:>8} {:>10}", "orders as a Delta table", "delta (s)", "parquet (s)", "ratio", "members");
    for (i, (name, definition, _)) in reference_segments(&sources)
        .into_iter()
        .enumerate()
        .filter(|(_, (_, _, sql))| sql.contains("orders") && !sql.contains("app_events"))
    {
        let task = bench_task(&format!("delta{i}"), definition, &delta_sources, snapshot, work.path());
        let (seconds, members) = best_of(&task, name).await;
        let (_, parquet_seconds, parquet_members) = ours[i];
        assert_eq!(members, parquet_members, "{name}: Delta and Parquet disagree on the members");
        let ratio = seconds / parquet_seconds;
        println!("{name:<42} {seconds:>10.2} {parquet_seconds:>11.2} {ratio:>7.2}x {members:>10}");
    }

    iceberg_orders(&lake, &parts, &sources, work.path()).await;
}

/// The same orders as an Iceberg table: pyiceberg registers the same
/// Parquet files (`add_files`) in a SQL catalog, one snapshot. It commits
/// now, after the lake's snapshot time, so both sides run at a snapshot
/// time after the commit (windowed segments may then find fewer members,
/// or none: both sides still scan the same files).
async fn iceberg_orders(
    lake: &std::path::Path,
    parts: &[std::path::PathBuf],
    sources: &[SegmentSourceSpec],
    work: &std::path::Path,
) {
    let db = work.join("iceberg-catalog.db");
    let catalog = serde_json::json!({"name": "bench", "type": "sql", "uri": format!("sqlite:///{}", db.display()),
                                     "warehouse": format!("file://{}/iceberg-warehouse", work.display())});
    let location = format!("file://{}/orders", lake.display());
    let parts: Vec<String> = parts.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["register", location.as_str()];
    args.extend(parts.iter().map(String::as_str));
    pyiceberg(&catalog, &args);
    let at = Utc::now();
    let access = IcebergAccess {
        catalogs: vec![IcebergCatalog::new("bench", IcebergCatalogType::Sql, format!("sqlite://{}", db.display()))],
        namespace: "bench".into(),
        results_base: format!("file://{}/results", work.display()),
        allowed_prefixes: None,
        allow_local_files: true,
    };
    let iceberg_sources: Vec<SegmentSourceSpec> = sources
        .iter()
        .map(|s| match s.table.as_str() {
            "orders" => {
                SegmentSourceSpec { format: SourceFormat::Iceberg, uri: "iceberg://bench/bench/orders".into(), ..s.clone() }
            }
            _ => s.clone(),
        })
        .collect();
    println!();
    println!("{:<42} {:>10} {:>11} {:>8} {:>10}", "orders as an Iceberg table", "iceberg (s)", "parquet (s)", "ratio", "members");
    for (i, (name, definition, _)) in reference_segments(sources)
        .into_iter()
        .enumerate()
        .filter(|(_, (_, _, sql))| sql.contains("orders") && !sql.contains("app_events"))
    {
        let parquet = bench_task(&format!("parquet-now{i}"), definition.clone(), sources, at, work);
        let (parquet_seconds, parquet_members) = best_of(&parquet, name).await;
        let mut task = bench_task(&format!("iceberg{i}"), definition, &iceberg_sources, at, work);
        task.iceberg = Some(access.clone());
        let (seconds, members) = best_of(&task, name).await;
        assert_eq!(members, parquet_members, "{name}: Iceberg and Parquet disagree on the members");
        let ratio = seconds / parquet_seconds;
        println!("{name:<42} {seconds:>10.2} {parquet_seconds:>11.2} {ratio:>7.2}x {members:>10}");
    }
}
