//! `segment-worker compute` over a generated lake, read from local files
//! and from a real S3 server (moto). Every reference segment is written
//! both as SQL and as rules where the rule language can say it, and its
//! members are checked against an evaluation in plain Rust over the rows
//! the lake was generated from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use segment_compute::compute::{self, ComputeOptions, ComputeReport};
use segment_compute::failure::WorkerError;
use segment_compute::lakegen::{self, LakeSpec, Order, UserRows};
use segment_compute::spark;
use segment_core::api::{ComputeEngine, Definition, SegmentKey, SegmentSourceSpec, SourceFormat, StaticList};
use segment_core::index::INDEX_FILE;
use segment_core::manifest::{part_file, Manifest, FORMAT, MANIFEST_FILE};
use segment_core::reasons::FailureReason;
use segment_core::task::{ComputeTask, SegmentInput};
use segment_store::objects::locate;
use segment_store::results::ResultDir;
use segment_tests::S3Server;
use serde_json::{json, Value};
use tempfile::TempDir;

const USERS: u64 = 3000;

/// A generated lake in a temp dir, and the rows it was generated from.
struct Lake {
    dir: TempDir,
    spec: LakeSpec,
    rows: Vec<UserRows>,
}

impl Lake {
    fn generate() -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let spec = LakeSpec::new(USERS, 20250601);
        lakegen::generate(&dir.path().join("lake"), &spec).unwrap();
        let rows = lakegen::rows(&spec).collect();
        Lake { dir, spec, rows }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    fn base_uri(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn sources(&self) -> Vec<SegmentSourceSpec> {
        sources(&self.base_uri())
    }

    /// A fresh results directory for one run.
    fn results(&self, name: &str) -> String {
        format!("file://{}/results/{name}/", self.dir.path().display())
    }

    fn now(&self) -> DateTime<Utc> {
        self.spec.now
    }

    fn orders(&self) -> impl Iterator<Item = &Order> {
        self.rows.iter().flat_map(|r| r.orders.iter())
    }

    fn all_users(&self) -> BTreeSet<String> {
        self.rows.iter().map(|r| r.user.user_id.clone()).collect()
    }

    fn users_where(&self, keep: impl Fn(&UserRows) -> bool) -> BTreeSet<String> {
        self.rows.iter().filter(|r| keep(r)).map(|r| r.user.user_id.clone()).collect()
    }
}

fn source(table: &str, uri: String, format: SourceFormat, timestamp: Option<&str>) -> SegmentSourceSpec {
    SegmentSourceSpec {
        table: table.into(),
        uri,
        format,
        user_id_column: "user_id".into(),
        timestamp_column: timestamp.map(str::to_string),
    }
}

fn sources(base: &str) -> Vec<SegmentSourceSpec> {
    vec![
        source("orders", format!("{base}/orders/"), SourceFormat::Parquet, Some("created_at")),
        source("users", format!("{base}/users/"), SourceFormat::Csv, None),
        source("app_events", format!("{base}/app_events/"), SourceFormat::Ndjson, Some("ts")),
    ]
}

fn sql(query: &str) -> Definition {
    Definition { sql: Some(query.to_string()), rules: None, static_list: None }
}

fn rules(rule: serde_json::Value) -> Definition {
    Definition { sql: None, rules: Some(serde_json::from_value(rule).unwrap()), static_list: None }
}

fn static_list(uri: String) -> Definition {
    Definition { sql: None, rules: None, static_list: Some(StaticList { uri }) }
}

fn task(
    name: &str,
    definition: Definition,
    sources: Vec<SegmentSourceSpec>,
    results_uri: String,
    snapshot: DateTime<Utc>,
) -> ComputeTask {
    ComputeTask {
        segment: SegmentKey::new("growth", name),
        version: 1,
        generation: 3,
        definition_hash: format!("sha256:{name}"),
        snapshot_time: snapshot,
        definition,
        sources,
        segment_inputs: Vec::new(),
        results_uri,
        engine: Default::default(),
        iceberg: None,
    }
}

/// The result as ingest would read it: manifest first, then every part
/// verified against it (checksum, count). Ids are distinct and sorted, and
/// the index file holds exactly them.
async fn read_result(uri: &str) -> (Manifest, Vec<String>) {
    let dir = ResultDir::open(uri).unwrap();
    let manifest = dir.read_manifest().await.unwrap().unwrap_or_else(|| panic!("no manifest at {uri}"));
    let mut ids = Vec::new();
    for (i, part) in manifest.parts.iter().enumerate() {
        assert_eq!(part.file, part_file(i));
        let bytes = dir.read_part(part).await.unwrap();
        ids.extend(part.decode(&bytes).unwrap().into_iter().map(str::to_string));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids are distinct and sorted");
    let index = manifest.index.as_ref().unwrap_or_else(|| panic!("no index in {uri}'s manifest"));
    assert_eq!(index.file, INDEX_FILE);
    let set = index.open_index(dir.read_index(index).await.unwrap()).unwrap();
    let mut indexed = Vec::new();
    let mut all = set.iter();
    while let Some(id) = all.next_id() {
        indexed.push(id.to_string());
    }
    assert_eq!(indexed, ids, "the index holds the parts' ids");
    (manifest, ids)
}

async fn run(task: &ComputeTask) -> Result<BTreeSet<String>, WorkerError> {
    run_with(task, &ComputeOptions::default()).await.map(|(_, members)| members)
}

async fn run_with(task: &ComputeTask, options: &ComputeOptions) -> Result<(ComputeReport, BTreeSet<String>), WorkerError> {
    let report = compute::run_with(task, options).await?;
    let (manifest, ids) = read_result(&task.results_uri).await;
    assert_eq!(manifest.format, FORMAT);
    assert_eq!(
        (manifest.segment.clone(), manifest.version, manifest.generation),
        (task.segment.clone(), task.version, task.generation)
    );
    assert_eq!((&manifest.definition_hash, manifest.snapshot_time), (&task.definition_hash, task.snapshot_time));
    assert_eq!((report.members, report.parts), (manifest.members, manifest.parts.len()));
    assert_eq!(manifest.members as usize, ids.len());
    Ok((report, ids.into_iter().collect()))
}

fn assert_members(what: &str, actual: &BTreeSet<String>, expected: &BTreeSet<String>) {
    if actual != expected {
        let missing: Vec<_> = expected.difference(actual).take(5).collect();
        let extra: Vec<_> = actual.difference(expected).take(5).collect();
        panic!("{what}: {} members, expected {}; missing {missing:?}, unexpected {extra:?}", actual.len(), expected.len());
    }
}

async fn run_expecting_error(task: &ComputeTask) -> WorkerError {
    let error = compute::run_with(task, &ComputeOptions::default()).await.expect_err("the run fails");
    assert!(!error.message.contains('\n'), "one line: {error}");
    assert!(!error.message.is_empty());
    error
}

fn within(t: DateTime<Utc>, now: DateTime<Utc>, window: Duration) -> bool {
    t > now - window && t <= now
}

/// "Ordered 3+ times in 90 days, none in the last 30", as the README's SQL
/// says it (`>=` the window start, `max(...) <` the recent cut-off).
fn lapsed_by_sql(lake: &Lake, now: DateTime<Utc>) -> BTreeSet<String> {
    lake.users_where(|r| {
        let recent: Vec<_> = r.orders.iter().filter(|o| o.created_at >= now - Duration::days(90)).collect();
        recent.len() >= 3 && recent.iter().map(|o| o.created_at).max().is_some_and(|m| m < now - Duration::days(30))
    })
}

/// The same with rule semantics: windows are `(now - d, now]`.
fn lapsed_by_rules(lake: &Lake, now: DateTime<Utc>) -> BTreeSet<String> {
    lake.users_where(|r| {
        r.orders.iter().filter(|o| within(o.created_at, now, Duration::days(90))).count() >= 3
            && !r.orders.iter().any(|o| within(o.created_at, now, Duration::days(30)))
    })
}

const LAPSED_SQL: &str = "SELECT user_id FROM orders
     WHERE created_at >= now() - INTERVAL '90 days'
     GROUP BY user_id
     HAVING count(*) >= 3 AND max(created_at) < now() - INTERVAL '30 days'";

fn lapsed_rules() -> Definition {
    rules(json!({"all": [
        {"event": {"table": "orders", "count": {"gte": 3}, "within": "90d"}},
        {"not": {"event": {"table": "orders", "within": "30d"}}}
    ]}))
}

/// A reference segment: definitions that must all give `expected`.
struct Case {
    name: &'static str,
    definitions: Vec<(&'static str, Definition)>,
    expected: BTreeSet<String>,
}

fn reference_cases(lake: &Lake) -> Vec<Case> {
    let now = lake.now();
    let days = Duration::days;
    vec![
        Case {
            name: "lapsed-high-value",
            definitions: vec![("sql", sql(LAPSED_SQL)), ("rules", lapsed_rules())],
            expected: lapsed_by_sql(lake, now),
        },
        Case {
            name: "southern-europe",
            definitions: vec![
                ("sql", sql("SELECT user_id FROM users WHERE country IN ('ES', 'IT')")),
                (
                    "rules",
                    rules(json!({"property": {"table": "users", "column": "country", "op": "in", "values": ["ES", "IT"]}})),
                ),
            ],
            expected: lake.users_where(|r| ["ES", "IT"].contains(&r.user.country)),
        },
        Case {
            name: "cart-builders",
            definitions: vec![
                (
                    "sql",
                    sql("SELECT user_id FROM app_events
                         WHERE event = 'add_to_cart' AND ts > now() - INTERVAL '60 days' AND ts <= now()
                         GROUP BY user_id HAVING count(*) >= 2"),
                ),
                (
                    "rules",
                    rules(json!({"event": {"table": "app_events", "count": {"gte": 2}, "within": "60d",
                                           "where": [{"column": "event", "op": "eq", "value": "add_to_cart"}]}})),
                ),
            ],
            expected: lake.users_where(|r| {
                r.events.iter().filter(|e| e.event == "add_to_cart" && within(e.ts, now, days(60))).count() >= 2
            }),
        },
        Case {
            name: "paying",
            definitions: vec![
                ("sql", sql("SELECT user_id FROM users EXCEPT SELECT user_id FROM users WHERE plan = 'free'")),
                ("rules", rules(json!({"not": {"property": {"table": "users", "column": "plan", "op": "eq", "value": "free"}}}))),
            ],
            expected: lake.users_where(|r| r.user.plan != "free"),
        },
        Case {
            name: "few-recent-deliveries",
            definitions: vec![
                (
                    "sql",
                    sql("SELECT u.user_id FROM users u
                         LEFT JOIN orders o ON o.user_id = u.user_id AND o.status = 'delivered'
                              AND o.created_at > now() - INTERVAL '60 days' AND o.created_at <= now()
                         GROUP BY u.user_id HAVING count(o.order_id) <= 1"),
                ),
                (
                    "rules",
                    rules(json!({"event": {"table": "orders", "count": {"lte": 1}, "within": "60d",
                                           "where": [{"column": "status", "op": "eq", "value": "delivered"}]}})),
                ),
            ],
            expected: lake.users_where(|r| {
                r.orders.iter().filter(|o| o.status == "delivered" && within(o.created_at, now, days(60))).count() <= 1
            }),
        },
        Case {
            name: "portugal-or-big-spender",
            definitions: vec![
                (
                    "sql",
                    sql("SELECT user_id FROM users WHERE country = 'PT'
                         UNION
                         SELECT user_id FROM orders WHERE amount > 200 AND status NOT IN ('cancelled', 'returned')
                         GROUP BY user_id HAVING count(*) >= 2"),
                ),
                (
                    "rules",
                    rules(json!({"any": [
                        {"property": {"table": "users", "column": "country", "op": "eq", "value": "PT"}},
                        {"event": {"table": "orders", "count": {"gte": 2}, "where": [
                            {"column": "amount", "op": "gt", "value": 200},
                            {"column": "status", "op": "not_in", "values": ["cancelled", "returned"]}
                        ]}}
                    ]})),
                ),
            ],
            expected: lake.users_where(|r| {
                r.user.country == "PT" || r.orders.iter().filter(|o| o.amount > 200.0 && o.status == "delivered").count() >= 2
            }),
        },
        Case {
            name: "never-ordered",
            definitions: vec![
                ("sql", sql("SELECT user_id FROM users WHERE user_id NOT IN (SELECT user_id FROM orders)")),
                ("rules", rules(json!({"event": {"table": "orders", "count": {"eq": 0}}}))),
            ],
            expected: lake.users_where(|r| r.orders.is_empty()),
        },
        Case {
            name: "latest-order-big-delivered-fr-de",
            definitions: vec![(
                "sql",
                sql("SELECT t.user_id FROM (
                       SELECT user_id, status, amount,
                              row_number() OVER (PARTITION BY user_id ORDER BY created_at DESC, order_id DESC) AS rn
                       FROM orders) t
                     JOIN users u ON u.user_id = t.user_id
                     WHERE t.rn = 1 AND t.status = 'delivered' AND t.amount > 100 AND u.country IN ('FR', 'DE')"),
            )],
            expected: lake.users_where(|r| {
                let latest = r.orders.iter().max_by_key(|o| (o.created_at, o.order_id));
                ["FR", "DE"].contains(&r.user.country) && latest.is_some_and(|o| o.status == "delivered" && o.amount > 100.0)
            }),
        },
        Case {
            name: "churn-risk",
            definitions: vec![(
                "sql",
                sql("SELECT DISTINCT e.user_id FROM app_events e
                     WHERE e.ts >= now() - INTERVAL '60 days'
                       AND NOT EXISTS (
                         SELECT 1 FROM app_events r
                         WHERE r.user_id = e.user_id AND r.ts >= now() - INTERVAL '14 days')"),
            )],
            expected: lake.users_where(|r| {
                r.events.iter().any(|e| e.ts >= now - days(60)) && !r.events.iter().any(|e| e.ts >= now - days(14))
            }),
        },
        Case {
            name: "old-accounts",
            definitions: vec![("sql", sql("SELECT user_id FROM users WHERE signup_at < now() - INTERVAL '400 days'"))],
            expected: lake.users_where(|r| r.user.signup_at < now - days(400)),
        },
    ]
}

#[tokio::test]
async fn reference_segments_match_an_independent_evaluation() {
    let lake = Lake::generate();
    for case in reference_cases(&lake) {
        assert!(!case.expected.is_empty() && case.expected.len() < USERS as usize, "{}: a telling case", case.name);
        for (kind, definition) in &case.definitions {
            let name = format!("{}-{kind}", case.name);
            let task = task(&name, definition.clone(), lake.sources(), lake.results(&name), lake.now());
            let members = run(&task).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_members(&name, &members, &case.expected);
        }
    }
    // The README's SQL and the rule differ only at the window edges, which
    // this lake does not hit.
    assert_eq!(lapsed_by_sql(&lake, lake.now()), lapsed_by_rules(&lake, lake.now()));
}

#[tokio::test]
async fn rules_and_sql_read_another_segments_result() {
    let lake = Lake::generate();
    let southern = task(
        "southern",
        rules(json!({"property": {"table": "users", "column": "country", "op": "in", "values": ["ES", "IT"]}})),
        lake.sources(),
        lake.results("southern/v7"),
        lake.now(),
    );
    // Several parts, so the input is read as several partitions.
    let options = ComputeOptions { part_size: 150, ..ComputeOptions::default() };
    let (report, _) = run_with(&southern, &options).await.unwrap();
    assert!(report.parts > 3);
    let input = SegmentInput { name: "southern".into(), version: 1, results_uri: southern.results_uri.clone() };

    let now = lake.now();
    let expected = lake.users_where(|r| {
        ["ES", "IT"].contains(&r.user.country) && r.orders.iter().any(|o| within(o.created_at, now, Duration::days(90)))
    });
    let by_rules = rules(json!({"all": [
        {"segment": {"name": "southern"}},
        {"event": {"table": "orders", "within": "90d"}}
    ]}));
    let by_sql = sql("SELECT s.user_id FROM segment__southern s WHERE EXISTS (
                        SELECT 1 FROM orders o WHERE o.user_id = s.user_id
                          AND o.created_at > now() - INTERVAL '90 days' AND o.created_at <= now())");
    for (kind, definition) in [("rules", by_rules.clone()), ("sql", by_sql)] {
        let mut t = task(&format!("southern-buyers-{kind}"), definition, lake.sources(), lake.results(kind), now);
        t.segment_inputs = vec![input.clone()];
        assert_members(kind, &run(&t).await.unwrap(), &expected);
    }

    // `not` of a segment: everyone else.
    let mut others = task(
        "not-southern",
        rules(json!({"not": {"segment": {"name": "southern"}}})),
        lake.sources(),
        lake.results("not-southern"),
        now,
    );
    others.segment_inputs = vec![input.clone()];
    assert_members("not southern", &run(&others).await.unwrap(), &lake.users_where(|r| !["ES", "IT"].contains(&r.user.country)));

    // Without the input, or with an input that has no result yet.
    let mut missing = task("southern-buyers", by_rules.clone(), lake.sources(), lake.results("missing"), now);
    let error = run_expecting_error(&missing).await;
    assert_eq!(error.reason, FailureReason::SegmentNotReady, "{error}");
    assert!(error.message.contains("southern"), "{error}");
    missing.segment_inputs = vec![SegmentInput { name: "southern".into(), version: 2, results_uri: lake.results("southern/v8") }];
    let error = run_expecting_error(&missing).await;
    assert_eq!(error.reason, FailureReason::SegmentNotReady, "{error}");
    assert!(error.message.contains("southern/v8"), "{error}");

    // A corrupted input part is caught by its checksum.
    let part = lake.dir.path().join("results/southern/v7").join(part_file(1));
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&part, bytes).unwrap();
    let mut corrupted = task("southern-buyers", by_rules, lake.sources(), lake.results("corrupted"), now);
    corrupted.segment_inputs = vec![input];
    let error = run_expecting_error(&corrupted).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("southern") && error.message.contains("checksum"), "{error}");
}

/// Orders written as Parquet without a time zone, CSV and NDJSON: `now()`
/// comparisons and the rules' casts work on each.
#[tokio::test]
async fn timestamps_compare_with_now_in_every_format() {
    let lake = Lake::generate();
    let orders: Vec<Order> = lake.orders().cloned().collect();
    let root = lake.dir.path().join("formats");
    let naive = root.join("parquet-naive");
    std::fs::create_dir_all(&naive).unwrap();
    let (first, second) = orders.split_at(orders.len() / 2);
    lakegen::write_orders_parquet(&naive.join("a.parquet"), first, None).unwrap();
    lakegen::write_orders_parquet(&naive.join("b.parquet"), second, None).unwrap();
    std::fs::write(naive.join("_SUCCESS"), "").unwrap();

    let csv = root.join("csv");
    std::fs::create_dir_all(&csv).unwrap();
    let mut text = String::from("order_id,user_id,amount,status,created_at\n");
    for o in &orders {
        text.push_str(&format!(
            "{},{},{},{},{}\n",
            o.order_id,
            o.user_id,
            o.amount,
            o.status,
            lakegen::timestamp_text(&o.created_at)
        ));
    }
    std::fs::write(csv.join("orders.csv"), text).unwrap();

    let ndjson = root.join("ndjson");
    std::fs::create_dir_all(&ndjson).unwrap();
    let mut text = String::new();
    for o in &orders {
        let row = json!({"order_id": o.order_id, "user_id": o.user_id, "amount": o.amount, "status": o.status,
                         "created_at": lakegen::timestamp_text(&o.created_at)});
        text.push_str(&format!("{row}\n"));
    }
    std::fs::write(ndjson.join("orders.ndjson"), text).unwrap();

    let variants = [
        ("parquet-utc", format!("{}/orders/", lake.base_uri()), SourceFormat::Parquet),
        ("parquet-naive", format!("file://{}/", naive.display()), SourceFormat::Parquet),
        ("csv", format!("file://{}/", csv.display()), SourceFormat::Csv),
        ("csv-file", format!("file://{}", csv.join("orders.csv").display()), SourceFormat::Csv),
        ("ndjson", format!("file://{}/", ndjson.display()), SourceFormat::Ndjson),
    ];
    let now = lake.now();
    for (variant, uri, format) in variants {
        let mut sources = lake.sources();
        sources[0] = source("orders", uri, format, Some("created_at"));
        for (kind, definition, expected) in
            [("sql", sql(LAPSED_SQL), lapsed_by_sql(&lake, now)), ("rules", lapsed_rules(), lapsed_by_rules(&lake, now))]
        {
            let name = format!("{variant}-{kind}");
            let t = task(&name, definition, sources.clone(), lake.results(&name), now);
            let members = run(&t).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_members(&name, &members, &expected);
        }
    }
}

#[tokio::test]
async fn the_snapshot_time_fixes_now() {
    let lake = Lake::generate();
    let now = lake.now();
    let first = task("lapsed", lapsed_rules(), lake.sources(), lake.results("lapsed-a"), now);
    let again = ComputeTask { results_uri: lake.results("lapsed-b"), ..first.clone() };
    run(&first).await.unwrap();
    run(&again).await.unwrap();
    let (a, ids_a) = read_result(&first.results_uri).await;
    let (b, ids_b) = read_result(&again.results_uri).await;
    assert_eq!(ids_a, ids_b);
    assert_eq!((a.members, &a.parts), (b.members, &b.parts), "same parts, byte for byte");
    // Recomputed into the same place: the same result again.
    run(&first).await.unwrap();
    assert_eq!(read_result(&first.results_uri).await.0.parts, a.parts);

    // Twenty days later the windows have moved.
    let later = now + Duration::days(20);
    for (kind, definition, expected) in
        [("rules", lapsed_rules(), lapsed_by_rules(&lake, later)), ("sql", sql(LAPSED_SQL), lapsed_by_sql(&lake, later))]
    {
        let t = task("lapsed", definition, lake.sources(), lake.results(&format!("later-{kind}")), later);
        let members = run(&t).await.unwrap();
        assert_members(kind, &members, &expected);
        assert_ne!(members, ids_a.iter().cloned().collect::<BTreeSet<_>>(), "{kind}: the result moved with the snapshot");
    }
    // Orders after the snapshot do not count for a rule's window.
    let earlier = now - Duration::days(45);
    let t = task("lapsed", lapsed_rules(), lake.sources(), lake.results("earlier"), earlier);
    assert_members("earlier", &run(&t).await.unwrap(), &lapsed_by_rules(&lake, earlier));

    // Every clock function reads the snapshot.
    let clock = sql(&format!(
        "SELECT user_id FROM users WHERE now() = TIMESTAMP '{t}' AND current_timestamp = TIMESTAMP '{t}'
           AND current_date = DATE '{d}' AND current_time = TIME '00:00:00'
           AND CAST(now() AS TIMESTAMP) = TIMESTAMP '{t}'",
        t = lakegen::timestamp_text(&now).trim_end_matches('Z'),
        d = now.date_naive()
    ));
    let t = task("clock", clock, lake.sources(), lake.results("clock"), now);
    assert_eq!(run(&t).await.unwrap(), lake.all_users());
}

#[tokio::test]
async fn results_are_parts_then_a_manifest() {
    let lake = Lake::generate();
    let t =
        task("paying", sql("SELECT user_id FROM users WHERE plan <> 'free'"), lake.sources(), lake.results("paying"), lake.now());
    let options = ComputeOptions { part_size: 250, ..ComputeOptions::default() };
    let (report, members) = run_with(&t, &options).await.unwrap();
    let expected = lake.users_where(|r| r.user.plan != "free");
    assert_members("paying", &members, &expected);
    assert_eq!(report.parts, expected.len().div_ceil(250));

    let (manifest, _) = read_result(&t.results_uri).await;
    assert!(manifest.parts[..manifest.parts.len() - 1].iter().all(|p| p.members == 250));
    assert!(manifest.computed_at >= manifest.snapshot_time);
    let dir = lake.dir.path().join("results/paying");
    let modified = |name: &str| std::fs::metadata(dir.join(name)).unwrap().modified().unwrap();
    let manifest_written = modified(MANIFEST_FILE);
    for part in manifest.parts.iter().chain(&manifest.index) {
        assert!(modified(&part.file) <= manifest_written, "{} was written after the manifest", part.file);
    }

    // A failed rerun of the version takes the old manifest away: no
    // manifest, no result, rather than a manifest over half-new parts.
    let failing = ComputeTask { definition: sql("SELECT user_id FROM users WHERE colour = 'red'"), ..t.clone() };
    run_expecting_error(&failing).await;
    assert!(!dir.join(MANIFEST_FILE).exists());
    assert!(ResultDir::open(&t.results_uri).unwrap().read_manifest().await.unwrap().is_none());

    // An empty segment is a result too: a manifest with no parts.
    let none =
        task("nobody", sql("SELECT user_id FROM users WHERE country = 'XX'"), lake.sources(), lake.results("nobody"), lake.now());
    let (report, members) = run_with(&none, &ComputeOptions::default()).await.unwrap();
    assert_eq!((report.members, report.parts, members.len()), (0, 0, 0));
}

#[tokio::test]
async fn static_lists_from_csv_and_text() {
    let lake = Lake::generate();
    let vip: BTreeSet<String> = lakegen::vip_list(&lake.spec).into_iter().map(|(id, _)| id).collect();
    assert_eq!(vip.len(), lakegen::VIP_USERS as usize);
    let from_csv =
        task("vip", static_list(format!("{}/lists/vip.csv", lake.base_uri())), vec![], lake.results("vip"), lake.now());
    assert_members("vip.csv", &run(&from_csv).await.unwrap(), &vip);

    let lists = lake.dir.path().join("uploads");
    std::fs::create_dir_all(&lists).unwrap();
    // One id a line, with what uploads come with: CRLF, blanks, spaces,
    // repeats, and characters a CSV would split on.
    std::fs::write(lists.join("ids.txt"), "u0000007\r\n  u0000042 \r\n\r\nu0000007\r\nacme,\"eu\"\r\n007\r\n").unwrap();
    let from_text = task(
        "uploaded",
        static_list(format!("file://{}", lists.join("ids.txt").display())),
        vec![],
        lake.results("txt"),
        lake.now(),
    );
    let expected: BTreeSet<String> = ["u0000007", "u0000042", "acme,\"eu\"", "007"].into_iter().map(String::from).collect();
    assert_members("ids.txt", &run(&from_text).await.unwrap(), &expected);

    // `user_id` in any column; numeric-looking ids stay text.
    std::fs::write(lists.join("accounts.csv"), "account,user_id\nacme,007\nglobex,0042\ninitech,\n").unwrap();
    let accounts = task(
        "accounts",
        static_list(format!("file://{}", lists.join("accounts.csv").display())),
        vec![],
        lake.results("acc"),
        lake.now(),
    );
    let expected: BTreeSet<String> = ["007", "0042"].into_iter().map(String::from).collect();
    assert_members("accounts.csv", &run(&accounts).await.unwrap(), &expected);

    std::fs::write(lists.join("no-ids.csv"), "account,email\nacme,a@acme.test\n").unwrap();
    let no_ids = task(
        "no-ids",
        static_list(format!("file://{}", lists.join("no-ids.csv").display())),
        vec![],
        lake.results("bad"),
        lake.now(),
    );
    let error = run_expecting_error(&no_ids).await;
    assert_eq!(error.reason, FailureReason::UnknownColumn, "{error}");
    assert!(error.message.contains("no-ids.csv") && error.message.contains("user_id"), "{error}");
    assert!(!error.message.contains("account") && !error.message.contains("email"), "the header is not echoed: {error}");

    let missing = task(
        "gone",
        static_list(format!("file://{}", lists.join("gone.csv").display())),
        vec![],
        lake.results("gone"),
        lake.now(),
    );
    let error = run_expecting_error(&missing).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("gone.csv"), "{error}");
}

#[tokio::test]
async fn every_error_has_its_reason() {
    let lake = Lake::generate();
    let now = lake.now();
    let check = |name: &'static str, definition: Definition, reason: FailureReason, mentions: &'static [&'static str]| {
        let t = task(name, definition, lake.sources(), lake.results(name), now);
        async move {
            let error = run_expecting_error(&t).await;
            assert_eq!(error.reason, reason, "{name}: {error}");
            for m in mentions {
                assert!(error.message.contains(m), "{name}: `{m}` not in: {error}");
            }
            let no_result = ResultDir::open(&t.results_uri).unwrap().read_manifest().await.unwrap();
            assert!(no_result.is_none(), "{name}: a failed run leaves no manifest");
        }
    };
    check("unknown-table-sql", sql("SELECT user_id FROM refunds"), FailureReason::UnknownTable, &["refunds", "orders"]).await;
    check(
        "unknown-table-join",
        sql("SELECT o.user_id FROM orders o JOIN refunds r ON r.user_id = o.user_id"),
        FailureReason::UnknownTable,
        &["refunds"],
    )
    .await;
    check(
        "unknown-table-rules",
        rules(json!({"property": {"table": "refunds", "column": "x", "op": "exists"}})),
        FailureReason::UnknownTable,
        &["refunds"],
    )
    .await;
    check(
        "unknown-column-sql",
        sql("SELECT user_id FROM orders WHERE amout > 10"),
        FailureReason::UnknownColumn,
        &["amout", "orders"],
    )
    .await;
    check(
        "unknown-column-rules",
        rules(json!({"property": {"table": "users", "column": "colour", "op": "eq", "value": "red"}})),
        FailureReason::UnknownColumn,
        &["colour", "users"],
    )
    .await;
    check("syntax", sql("SELEC user_id FROM orders"), FailureReason::QueryError, &["SELEC"]).await;
    check(
        "no-such-function",
        sql("SELECT user_id FROM orders WHERE frobnicate(amount) > 1"),
        FailureReason::QueryError,
        &["frobnicate"],
    )
    .await;
    check("ddl", sql("CREATE TABLE stolen AS SELECT user_id FROM orders"), FailureReason::QueryError, &["DDL"]).await;
    check("dml", sql("COPY orders TO '/tmp/segment-compute-test-copy.csv'"), FailureReason::QueryError, &["DML"]).await;
    check("bad-cast", sql("SELECT user_id FROM users WHERE CAST(country AS INT) > 1"), FailureReason::QueryError, &["cast"])
        .await;
    check(
        "two-columns",
        sql("SELECT user_id, country FROM users"),
        FailureReason::NotOneColumn,
        &["2 columns", "user_id", "country"],
    )
    .await;
    // A file's column names (a CSV's header line) are its data: only the
    // names the author wrote are printed.
    check("star", sql("SELECT * FROM users"), FailureReason::NotOneColumn, &["columns (user_id, …"]).await;
    check("not-ids", sql("SELECT amount FROM orders"), FailureReason::QueryError, &["amount", "Float64"]).await;
    check(
        "two-kinds",
        Definition { sql: Some("SELECT user_id FROM users".into()), ..static_list("file:///x".into()) },
        FailureReason::InvalidDefinition,
        &["exactly one"],
    )
    .await;
    check(
        "within-without-timestamp",
        rules(json!({"event": {"table": "users", "within": "7d"}})),
        FailureReason::InvalidDefinition,
        &["timestampColumn"],
    )
    .await;
    assert!(!std::path::Path::new("/tmp/segment-compute-test-copy.csv").exists());

    // Sources that cannot be read: no files, not Parquet, a bad URI.
    let read = |name: &'static str, orders: SegmentSourceSpec| {
        let mut sources = lake.sources();
        sources[0] = orders;
        task(name, sql(LAPSED_SQL), sources, lake.results(name), now)
    };
    let missing_dir = format!("file://{}/nowhere/orders/", lake.dir.path().display());
    let error = run_expecting_error(&read("missing", source("orders", missing_dir.clone(), SourceFormat::Parquet, None))).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains(&missing_dir) && error.message.contains("orders"), "{error}");

    let garbage = lake.dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("part-0.parquet"), "this is not parquet at all, just text long enough").unwrap();
    let garbage_uri = format!("file://{}/", garbage.display());
    let error = run_expecting_error(&read("garbage", source("orders", garbage_uri.clone(), SourceFormat::Parquet, None))).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains(&garbage_uri), "{error}");

    let error =
        run_expecting_error(&read("bad-uri", source("orders", "gs://lake/orders/".into(), SourceFormat::Parquet, None))).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("gs://lake/orders/"), "{error}");

    // A CSV whose later rows do not fit the types read from the first ones.
    let drifting = lake.dir.path().join("drifting");
    std::fs::create_dir_all(&drifting).unwrap();
    let mut text = String::from("user_id,country,signup_at,plan\n");
    for i in 0..1500 {
        text.push_str(&format!("u{i},ES,2024-01-01T00:00:00Z,free\n"));
    }
    text.push_str("u9,ES,yesterday,free\n");
    std::fs::write(drifting.join("users.csv"), text).unwrap();
    let mut sources = lake.sources();
    sources[1] = source("users", format!("file://{}/", drifting.display()), SourceFormat::Csv, None);
    let t = task("drifting", sql("SELECT user_id FROM users WHERE signup_at < now()"), sources, lake.results("drifting"), now);
    let error = run_expecting_error(&t).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("users"), "{error}");

    // Results that cannot be written.
    let blocker = lake.dir.path().join("blocker");
    std::fs::write(&blocker, "a file where a directory should be").unwrap();
    let t =
        task("unwritable", sql("SELECT user_id FROM users"), lake.sources(), format!("file://{}/v1/", blocker.display()), now);
    let error = run_expecting_error(&t).await;
    assert_eq!(error.reason, FailureReason::WriteFailed, "{error}");
    assert!(error.message.contains("blocker"), "{error}");
}

/// De-duplicating and sorting more than the memory limit holds spills to
/// disk instead of failing.
#[tokio::test]
async fn a_small_memory_limit_spills() {
    let dir = tempfile::tempdir().unwrap();
    let spec = LakeSpec { users: 30_000, events_per_user: 8, orders_per_user: 1, ..LakeSpec::new(0, 99) };
    lakegen::generate(&dir.path().join("lake"), &spec).unwrap();
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let options =
        ComputeOptions { memory_limit: 16 * 1024 * 1024, spill_dir: Some(spill), part_size: 50_000, partitions: Some(2) };
    let base = format!("file://{}/lake", dir.path().display());
    // Nearly every event is its own id: ~240,000 ids of ~40 bytes.
    let t = task(
        "events",
        sql("SELECT e.user_id || '/' || e.event || '/' || e.ts FROM app_events e"),
        sources(&base),
        format!("file://{}/results/", dir.path().display()),
        spec.now,
    );
    let (report, members) = run_with(&t, &options).await.unwrap_or_else(|e| panic!("{e}"));
    let expected: BTreeSet<String> = lakegen::rows(&spec)
        .flat_map(|r| r.events.into_iter().map(|e| format!("{}/{}/{}", e.user_id, e.event, lakegen::timestamp_text(&e.ts))))
        .collect();
    assert_members("events", &members, &expected);
    assert!(report.spilled_bytes > 0, "{report:?}");
    assert!(report.parts >= 4, "{report:?}");
}

/// The lake and the results on a real S3 server (moto). S3 clients read the
/// `AWS_*` environment, which is process-wide, so this is the one test of
/// this binary that sets it.
#[tokio::test]
async fn s3_sources_and_results() {
    let s3 = S3Server::start(&["lake", "results"]);
    for (key, value) in s3.env() {
        std::env::set_var(key, value);
    }
    let lake = Lake::generate();
    upload(&lake.path(), "s3://lake").await;

    let now = lake.now();
    let s3_sources = sources("s3://lake");
    let lapsed = task("lapsed", sql(LAPSED_SQL), s3_sources.clone(), "s3://results/growth/lapsed/v1/".into(), now);
    assert_members("s3 sql", &run(&lapsed).await.unwrap(), &lapsed_by_sql(&lake, now));
    let objects = list("s3://results/growth/lapsed/v1/").await;
    assert!(objects.contains(&"growth/lapsed/v1/_manifest.json".to_string()), "{objects:?}");

    // Rules over S3 reading another segment's result on S3; results to a file.
    let southern = task(
        "southern",
        rules(json!({"property": {"table": "users", "column": "country", "op": "in", "values": ["ES", "IT"]}})),
        s3_sources.clone(),
        "s3://results/growth/southern/v1/".into(),
        now,
    );
    run(&southern).await.unwrap();
    let mut lapsed_southern = task(
        "lapsed-southern",
        rules(json!({"all": [{"segment": {"name": "southern"}}, {"not": {"event": {"table": "orders", "within": "30d"}}}]})),
        s3_sources.clone(),
        lake.results("lapsed-southern"),
        now,
    );
    lapsed_southern.segment_inputs =
        vec![SegmentInput { name: "southern".into(), version: 1, results_uri: southern.results_uri.clone() }];
    let expected = lake.users_where(|r| {
        ["ES", "IT"].contains(&r.user.country) && !r.orders.iter().any(|o| within(o.created_at, now, Duration::days(30)))
    });
    assert_members("s3 rules", &run(&lapsed_southern).await.unwrap(), &expected);

    // Local sources, results on S3; a glob over S3 keys; a static list on S3.
    let mixed = task("mixed", lapsed_rules(), lake.sources(), "s3://results/growth/mixed/v1".into(), now);
    assert_members("file to s3", &run(&mixed).await.unwrap(), &lapsed_by_rules(&lake, now));
    let mut globbed = s3_sources.clone();
    globbed[0].uri = "s3://lake/orders/part-*.parquet".into();
    let glob = task("glob", sql(LAPSED_SQL), globbed, "s3://results/growth/glob/v1/".into(), now);
    assert_members("glob", &run(&glob).await.unwrap(), &lapsed_by_sql(&lake, now));
    let vip: BTreeSet<String> = lakegen::vip_list(&lake.spec).into_iter().map(|(id, _)| id).collect();
    let listed = task("vip", static_list("s3://lake/lists/vip.csv".into()), vec![], "s3://results/growth/vip/v1/".into(), now);
    assert_members("s3 static", &run(&listed).await.unwrap(), &vip);

    // The Spark engine reads the same lake through Hadoop S3A (the jars
    // tests/setup prefetches) and writes the same results.
    spark_ready();
    spark_matches_datafusion(&lake, s3_sources.clone(), |name| format!("s3://results/growth/{name}/v1/")).await;

    // A bucket that does not exist, for the lake and for the results.
    let mut no_bucket = s3_sources.clone();
    no_bucket[0].uri = "s3://no-such-lake/orders/".into();
    let t = task("no-lake", sql(LAPSED_SQL), no_bucket, "s3://results/growth/no-lake/v1/".into(), now);
    let error = run_expecting_error(&t).await;
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("s3://no-such-lake/orders/"), "{error}");
    let t = task("no-results", sql(LAPSED_SQL), s3_sources, "s3://no-such-results/growth/x/v1/".into(), now);
    let error = run_expecting_error(&t).await;
    assert_eq!(error.reason, FailureReason::WriteFailed, "{error}");
    assert!(error.message.contains("no-such-results") || error.message.contains("growth/x/v1"), "{error}");
}

/// Copies every file under `dir` to `base/<relative path>`.
async fn upload(dir: &Path, base: &str) {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
            let location = locate(&format!("{base}/{relative}")).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            object_store::ObjectStoreExt::put(location.store.as_ref(), &location.path, bytes.into()).await.unwrap();
        }
    }
}

async fn list(uri: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let location = locate(uri).unwrap();
    let metas: Vec<_> = location.store.list(Some(&location.path)).try_collect().await.unwrap();
    let mut names: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
    names.sort();
    names
}

#[test]
fn the_generated_lake_is_deterministic() {
    let spec = LakeSpec::new(500, 3);
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let summary = lakegen::generate(a.path(), &spec).unwrap();
    lakegen::generate(b.path(), &spec).unwrap();
    let read_all = |root: &Path| -> BTreeMap<PathBuf, Vec<u8>> {
        summary
            .files
            .iter()
            .map(|f| {
                (
                    f.strip_prefix(a.path()).unwrap().to_path_buf(),
                    std::fs::read(root.join(f.strip_prefix(a.path()).unwrap())).unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(read_all(a.path()), read_all(b.path()), "same spec, same bytes");
    assert_eq!(summary.users, 500);
    let rows: Vec<UserRows> = lakegen::rows(&spec).collect();
    assert_eq!(summary.orders, rows.iter().map(|r| r.orders.len() as u64).sum::<u64>());
    assert_eq!(summary.events, rows.iter().map(|r| r.events.len() as u64).sum::<u64>());
    for dir in ["users/users.csv", "orders/part-00000.parquet", "app_events/events-00000.ndjson", "lists/vip.csv"] {
        assert!(a.path().join(dir).is_file(), "{dir}");
    }
    // Regenerating smaller leaves no parts of the bigger lake behind.
    let events = std::fs::read_to_string(a.path().join("app_events/events-00000.ndjson")).unwrap();
    assert_eq!(events.lines().count() as u64, summary.events);
    lakegen::generate(a.path(), &LakeSpec::new(10, 3)).unwrap();
    let users = std::fs::read_to_string(a.path().join("users/users.csv")).unwrap();
    assert_eq!(users.lines().count(), 11);
}

/// A Segment's author names a file they cannot read (a projected token,
/// another tenant's list) as a source and writes a query that fails on
/// its content: the error names the source and the reason, never the
/// content (the header as columns, a value in a cast or parse error).
#[tokio::test]
async fn errors_never_echo_what_a_source_file_holds() {
    const SECRET: &str = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl";
    let dir = TempDir::new().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{SECRET}\n")).unwrap();
    let values = dir.path().join("values.csv");
    std::fs::write(&values, format!("user_id,plan\nu1,{SECRET}\n")).unwrap();
    let json_lines = dir.path().join("values.ndjson");
    std::fs::write(&json_lines, format!("{{\"user_id\": \"u1\", \"n\": 1}}\n{{\"user_id\": \"u2\", \"n\": \"{SECRET}\"}}\n"))
        .unwrap();
    let results = dir.path().join("results");
    let file = |path: &Path| format!("file://{}", path.display());

    let attempts = [
        // The token's one line becomes the CSV's only column name.
        (
            "header",
            source("stolen", file(&token), SourceFormat::Csv, None),
            "SELECT user_id FROM stolen",
            FailureReason::UnknownColumn,
        ),
        (
            "header-rules",
            source("stolen", file(&token), SourceFormat::Csv, None),
            "SELECT whatever FROM stolen",
            FailureReason::UnknownColumn,
        ),
        (
            "cast",
            source("plans", file(&values), SourceFormat::Csv, None),
            "SELECT user_id FROM plans WHERE CAST(plan AS INT) > 1",
            FailureReason::QueryError,
        ),
        (
            "ndjson",
            source("events", file(&json_lines), SourceFormat::Ndjson, None),
            "SELECT user_id FROM events WHERE n > 0",
            FailureReason::UnreadableSource,
        ),
    ];
    for (name, table, query, reason) in attempts {
        let table_name = table.table.clone();
        let t = task(name, sql(query), vec![table], format!("file://{}/{name}/", results.display()), Utc::now());
        let error = run_expecting_error(&t).await;
        assert_eq!(error.reason, reason, "{name}: {error}");
        if reason != FailureReason::QueryError {
            assert!(error.message.contains(&table_name), "{name}: the message names the table: {error}");
        }
        for piece in SECRET.split('.') {
            assert!(!error.message.contains(piece), "{name}: the file's content is echoed: {error}");
        }
    }
}

// The Spark engine (`engine: spark`), run by the local engine:
// `spark-submit --master local[*]` on the embedded driver.

/// The Spark tests need `spark-submit` (pyspark, installed by tests/setup)
/// and the `segment-worker` the driver runs (built by `cargo test
/// --workspace`, found next to this test binary's directory).
fn spark_ready() {
    segment_tests::cluster::workspace_binary("segment-worker");
    let found = std::process::Command::new("sh").arg("-c").arg("command -v spark-submit").output();
    assert!(
        found.map(|o| o.status.success()).unwrap_or(false),
        "`spark-submit` is not installed: python3 -m pip install pyspark==4.3.0 (tests/setup installs it)"
    );
}

fn on_spark(task: ComputeTask) -> ComputeTask {
    ComputeTask { engine: ComputeEngine::Spark, ..task }
}

/// Every reference definition run by Spark, all in one Spark session (the
/// driver takes several tasks; each spark-submit costs a JVM): each gives
/// the independent evaluation's members, and the same result files, byte
/// for byte, as DataFusion on the same sources.
async fn spark_matches_datafusion(lake: &Lake, sources: Vec<SegmentSourceSpec>, results: impl Fn(&str) -> String) {
    let mut tasks = Vec::new();
    let mut expected = Vec::new();
    for case in reference_cases(lake) {
        for (kind, definition) in &case.definitions {
            let name = format!("{}-{kind}", case.name);
            tasks.push(on_spark(task(&name, definition.clone(), sources.clone(), results(&format!("spark/{name}")), lake.now())));
            expected.push((name, case.expected.clone()));
        }
    }
    let reports = spark::run_local_all(&tasks, &ComputeOptions::default()).await.unwrap_or_else(|e| panic!("spark: {e}"));
    assert_eq!(reports.len(), tasks.len());
    for ((spark_task, (name, expected)), report) in tasks.iter().zip(expected).zip(reports) {
        let (on_spark, ids) = read_result(&spark_task.results_uri).await;
        assert_eq!((report.members, report.parts), (on_spark.members, on_spark.parts.len()), "{name}");
        assert_members(&format!("{name} on spark"), &ids.into_iter().collect(), &expected);
        let datafusion = ComputeTask {
            engine: ComputeEngine::Datafusion,
            results_uri: results(&format!("datafusion/{name}")),
            ..spark_task.clone()
        };
        compute::run(&datafusion).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let (on_datafusion, _) = read_result(&datafusion.results_uri).await;
        assert_eq!(
            (&on_spark.parts, &on_spark.index, &on_spark.sources),
            (&on_datafusion.parts, &on_datafusion.index, &on_datafusion.sources),
            "{name}: both engines write the same files"
        );
    }
}

#[tokio::test]
async fn spark_gives_every_reference_segment_the_members_datafusion_gives() {
    spark_ready();
    let lake = Lake::generate();
    spark_matches_datafusion(&lake, lake.sources(), |name| lake.results(name)).await;
}

/// A query naming a column the table lacks: the run fails with its reason,
/// the message names the column and the table but none of the table's
/// columns (Spark suggests them: they come from the files), and a manifest
/// an earlier run of the version left is gone.
#[tokio::test]
async fn a_failing_spark_run_has_its_reason_and_never_the_files_columns() {
    spark_ready();
    let lake = Lake::generate();
    let earlier = task("misspelt", sql("SELECT user_id FROM orders"), lake.sources(), lake.results("misspelt"), lake.now());
    compute::run(&earlier).await.unwrap();
    let failing = on_spark(ComputeTask { definition: sql("SELECT user_id FROM orders WHERE amout > 10"), ..earlier.clone() });
    let error = run_expecting_error(&failing).await;
    assert_eq!(error.reason, FailureReason::UnknownColumn, "{error}");
    assert!(error.message.contains("`amout`") && error.message.contains("`orders`"), "{error}");
    for column in ["amount", "status", "created_at", "order_id"] {
        assert!(!error.message.contains(column), "the file's column `{column}` is named: {error}");
    }
    assert!(ResultDir::open(&failing.results_uri).unwrap().read_manifest().await.unwrap().is_none(), "no result is left");
}

/// The Spark driver tells each way a definition fails from real Spark
/// errors (syntax, unknown function, cast, division by zero, unparsable
/// text, two columns, `SELECT *`, not ids, unknown table and column,
/// Parquet files removed after planning or not Parquet), and no message
/// holds a value of the table or a column name the author did not write:
/// `workers/spark/classify_check.py`, one local Spark session.
#[test]
fn spark_failures_have_their_reasons_and_never_the_files_data() {
    spark_ready();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workers/spark/classify_check.py");
    let output = std::process::Command::new("python3").arg(&script).output().expect("python3 runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or(""));
    let report: Value = serde_json::from_slice(&output.stdout).expect("the check prints JSON");
    let reasons: Vec<&str> = report["checked"].as_array().unwrap().iter().map(|c| c["reason"].as_str().unwrap()).collect();
    assert_eq!(report["cases"].as_u64(), Some(12), "{report}");
    for reason in ["QueryError", "NotOneColumn", "UnknownTable", "UnknownColumn", "UnreadableSource"] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
}

/// A tenant's SQL reads declared tables only: Spark's direct file query
/// (`parquet.`path``) would read any path the worker's credentials reach,
/// here another tenant's result files. Both engines refuse it before
/// anything is read, naming the table and not what is at the path.
#[tokio::test]
async fn a_query_of_a_path_instead_of_a_table_is_refused_on_both_engines() {
    spark_ready();
    let lake = Lake::generate();
    let other = task("other-tenant", sql("SELECT user_id FROM users"), lake.sources(), lake.results("other-tenant"), lake.now());
    compute::run(&other).await.unwrap();
    let path = other.results_uri.trim_end_matches('/');
    for engine in [ComputeEngine::Datafusion, ComputeEngine::Spark] {
        let reading = ComputeTask {
            definition: sql(&format!("SELECT user_id FROM parquet.`{path}`")),
            results_uri: lake.results(&format!("path-query-{}", engine.as_str())),
            engine,
            ..other.clone()
        };
        let error = run_expecting_error(&reading).await;
        assert_eq!(error.reason, FailureReason::UnknownTable, "{}: {error}", engine.as_str());
        assert!(!error.message.contains("user-"), "{}: no member is echoed: {error}", engine.as_str());
        assert!(
            ResultDir::open(&reading.results_uri).unwrap().read_manifest().await.unwrap().is_none(),
            "{}: no result is written",
            engine.as_str()
        );
    }
}

/// `segment-worker write-result` writes what the driver streams exactly as
/// the compute writes its result, and refuses a stream that is not a
/// sorted set of ids ended by an empty line, leaving no manifest.
#[tokio::test]
async fn write_result_writes_what_compute_writes_and_refuses_anything_else() {
    let worker = segment_tests::cluster::workspace_binary("segment-worker");
    let lake = Lake::generate();
    let vip = task("vip", static_list(format!("{}/lists/vip.csv", lake.base_uri())), vec![], lake.results("vip"), lake.now());
    compute::run(&vip).await.unwrap();
    let (computed, ids) = read_result(&vip.results_uri).await;

    let written = ComputeTask { results_uri: lake.results("vip-written"), engine: ComputeEngine::Spark, ..vip.clone() };
    let task_file = lake.dir.path().join("write-result-task.json");
    std::fs::write(&task_file, serde_json::to_vec(&written).unwrap()).unwrap();
    let log = lake.dir.path().join("write-result-log");
    let write = |input: Vec<u8>| {
        use std::io::Write;
        let _ = std::fs::remove_file(&log);
        let mut child = std::process::Command::new(&worker)
            .args(["write-result", "--task-file"])
            .arg(&task_file)
            .arg("--termination-log")
            .arg(&log)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let status = child.wait().unwrap();
        (status.success(), std::fs::read_to_string(&log).unwrap_or_default())
    };

    let stream = format!("{}\n\n", ids.join("\n")).into_bytes();
    assert_eq!(write(stream), (true, String::new()));
    let (again, again_ids) = read_result(&written.results_uri).await;
    assert_eq!(again_ids, ids);
    assert_eq!((&again.parts, &again.index), (&computed.parts, &computed.index), "the same bytes as the compute's");

    for (input, says) in [
        ("u2\nu1\n\n", "line 2: an id not after the one before it"),
        ("u1\nu1\n\n", "line 2: an id not after the one before it"),
        ("u1\r\nu2\n\n", "line 1: an empty id, or one with a line break"),
        ("u1\nu2\n", "without its end mark"),
        ("u1\n\nu2\n", "line 3 follows the end mark"),
        ("u1\nu2", "cut short"),
    ] {
        let (ok, line) = write(input.as_bytes().to_vec());
        assert!(!ok, "{input:?} is refused");
        assert!(line.starts_with("QueryError: the ids on stdin: ") && line.contains(says), "{input:?}: {line}");
        assert!(!line.contains("u1") && !line.contains("u2"), "ids are data, not quoted: {line}");
        let manifest = ResultDir::open(&written.results_uri).unwrap().read_manifest().await.unwrap();
        assert!(manifest.is_none(), "{input:?}: the earlier result is retracted and none is written");
    }
}

/// The example Segments (examples/segments.yaml over examples/sources.yaml:
/// Parquet, a Delta table, NDJSON, a static list, and rules reading other
/// segments' results) give the independent evaluation's members on both
/// engines, and the same files.
#[tokio::test]
async fn the_examples_give_the_same_members_on_both_engines() {
    use segment_core::naming::JobKind;
    use segment_core::planner::Launch;
    use segment_core::task;
    use segment_tests::examples::{expected_members, SEGMENTS};

    spark_ready();
    let dir = TempDir::new().unwrap();
    let snapshot = DateTime::parse_from_rfc3339("2025-06-01T00:00:00Z").unwrap().with_timezone(&Utc);
    let spec = LakeSpec { now: snapshot, ..LakeSpec::new(2_000, 42) };
    lakegen::generate(&dir.path().join("lake"), &spec).unwrap();
    let examples = segment_tests::cluster::workspace_root().join("examples");
    let mut manifests = segment_core::manifests::load(&[examples.join("sources.yaml"), examples.join("segments.yaml")]).unwrap();
    manifests.resolve_relative_uris(dir.path());
    let declared = manifests.sources_in("default");
    let expected = expected_members(&spec, |_| snapshot);

    let mut results: BTreeMap<&str, Vec<Manifest>> = BTreeMap::new();
    for engine in [ComputeEngine::Datafusion, ComputeEngine::Spark] {
        let base = format!("file://{}/results-{engine:?}", dir.path().display());
        // In SEGMENTS' order, win-back after the three segments it reads.
        let tasks: Vec<ComputeTask> = SEGMENTS
            .iter()
            .map(|name| {
                let segment = manifests.segments.iter().find(|s| s.metadata.name.as_deref() == Some(name)).unwrap();
                let launch = Launch {
                    kind: JobKind::Compute,
                    version: 1,
                    job_name: format!("{name}-v1"),
                    snapshot_time: snapshot,
                    definition_hash: segment_core::definition::definition_hash(&segment.spec.definition),
                    generation: 1,
                };
                let sources = task::sources_read(&segment.spec.definition, &declared).into_iter().cloned().collect();
                let inputs = task::segment_inputs(segment, &base, |_| Some(1));
                ComputeTask { engine, ..task::compute_task(segment, &launch, sources, inputs, &base) }
            })
            .collect();
        match engine {
            ComputeEngine::Spark => {
                spark::run_local_all(&tasks, &ComputeOptions::default()).await.unwrap_or_else(|e| panic!("spark: {e}"));
            }
            _ => {
                for t in &tasks {
                    compute::run(t).await.unwrap_or_else(|e| panic!("{}: {e}", t.segment));
                }
            }
        }
        for (name, t) in SEGMENTS.iter().zip(&tasks) {
            let (manifest, ids) = read_result(&t.results_uri).await;
            assert!(!expected[*name].is_empty(), "{name}: a telling case");
            assert_members(&format!("{name} on {engine:?}"), &ids.into_iter().collect(), &expected[*name]);
            results.entry(name).or_default().push(manifest);
        }
    }
    for (name, manifests) in results {
        let [datafusion, spark] = manifests.as_slice() else { panic!("{name}: two runs") };
        assert_eq!((&datafusion.parts, &datafusion.index), (&spark.parts, &spark.index), "{name}: the same files");
        assert_eq!(datafusion.sources, spark.sources, "{name}: the same tables and Delta versions read");
    }
}
