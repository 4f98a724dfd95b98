//! `format: iceberg` sources: Apache Iceberg tables written by a real
//! writer (pyiceberg, via `tests/iceberg_table.py`) into real catalogs — a
//! SQL catalog on SQLite, and Apache Iceberg's REST catalog server (its
//! test fixture from Maven Central, which tests/setup caches) — and read
//! by the compute worker as of the run's snapshot time. Every expected set
//! of members comes from pyiceberg's own scan of a snapshot, and its own
//! timestamp time travel must agree on the snapshot.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use segment_compute::compute::{self, ComputeOptions};
use segment_compute::spark;
use segment_core::api::{
    ComputeClassSpec, ComputeEngine, Definition, IcebergCatalog, IcebergCatalogType, SegmentKey, SegmentSourceSpec, SegmentSpec,
    SourceFormat,
};
use segment_core::iceberg::IcebergAccess;
use segment_core::policy::{check_allowed, Tenant};
use segment_core::reasons::{FailureReason, SpecProblem};
use segment_core::task::ComputeTask;
use segment_store::results::ResultDir;
use segment_tests::table_history::{
    between, iceberg_history, ingested_and_sealed, members_of, pyiceberg, pyiceberg_sql_catalog, Commit, TABLE_SEGMENT_SQL,
};
use segment_tests::S3Server;
use serde_json::{json, Value};

/// The segment the helper's `members` evaluates: amount >= 50 outside the US.
const SQL: &str = TABLE_SEGMENT_SQL;
const URI: &str = "iceberg://lake/sales/orders";

/// A catalog pyiceberg writes through and the worker reads.
struct Catalog {
    /// pyiceberg's properties, with the catalog's name.
    pyiceberg: Value,
    /// The same catalog as a ComputeClass names it.
    class: IcebergCatalog,
    /// Where its tables are: the prefix the class allows.
    warehouse: String,
}

impl Catalog {
    fn sql(dir: &Path) -> Catalog {
        let warehouse = dir.join("warehouse");
        std::fs::create_dir_all(&warehouse).unwrap();
        let db = dir.join("catalog.db");
        Catalog {
            pyiceberg: pyiceberg_sql_catalog(&db, &format!("file://{}", warehouse.display())),
            class: IcebergCatalog::new("lake", IcebergCatalogType::Sql, format!("sqlite://{}", db.display())),
            warehouse: format!("file://{}/", warehouse.display()),
        }
    }

    /// A SQL catalog (SQLite) whose warehouse is a bucket of `s3`: pyiceberg
    /// writes there through s3fs, the worker reads through its `AWS_*`.
    fn sql_on_s3(dir: &Path, s3: &S3Server) -> Catalog {
        let db = dir.join("catalog.db");
        let mut pyiceberg = pyiceberg_sql_catalog(&db, "s3://lake/warehouse");
        let io = json!({"py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO", "s3.endpoint": s3.endpoint(), "s3.region": "us-east-1",
                        "s3.access-key-id": "test", "s3.secret-access-key": "test"});
        pyiceberg.as_object_mut().unwrap().extend(io.as_object().unwrap().clone());
        Catalog {
            pyiceberg,
            class: IcebergCatalog::new("lake", IcebergCatalogType::Sql, format!("sqlite://{}", db.display())),
            warehouse: "s3://lake/warehouse/".into(),
        }
    }

    fn rest(server: &RestCatalogServer) -> Catalog {
        Catalog {
            pyiceberg: json!({"name": "lake", "type": "rest", "uri": server.url()}),
            class: IcebergCatalog::new("lake", IcebergCatalogType::Rest, server.url()),
            warehouse: format!("file://{}/", server.warehouse.display()),
        }
    }

    /// Runs the helper against this catalog; its one line of JSON.
    fn helper(&self, args: &[&str]) -> Value {
        pyiceberg(&self.pyiceberg, args)
    }

    /// The access a namespace whose class allows the warehouse gets.
    fn access(&self) -> IcebergAccess {
        IcebergAccess {
            catalogs: vec![self.class.clone()],
            namespace: "growth".into(),
            results_base: "s3://results".into(),
            allowed_prefixes: Some(vec![self.warehouse.clone()]),
            allow_local_files: true,
        }
    }
}

fn history(printed: &Value) -> Vec<Commit> {
    iceberg_history(printed)
}

fn iceberg_source() -> SegmentSourceSpec {
    SegmentSourceSpec {
        table: "orders".into(),
        uri: URI.into(),
        format: SourceFormat::Iceberg,
        user_id_column: "user_id".into(),
        timestamp_column: None,
    }
}

fn task(name: &str, access: &IcebergAccess, results: &Path, snapshot: DateTime<Utc>) -> ComputeTask {
    ComputeTask {
        segment: SegmentKey::new("growth", name),
        version: 1,
        generation: 1,
        definition_hash: format!("sha256:{name}"),
        snapshot_time: snapshot,
        definition: Definition { sql: Some(SQL.into()), rules: None, static_list: None },
        sources: vec![iceberg_source()],
        segment_inputs: Vec::new(),
        results_uri: format!("file://{}/{name}/", results.display()),
        engine: Default::default(),
        iceberg: Some(access.clone()),
    }
}

/// Computes `task`; its members and the snapshot id its manifest records.
async fn compute_members(task: &ComputeTask) -> (BTreeSet<String>, u64) {
    let report = compute::run(task).await.unwrap_or_else(|e| panic!("{}: {e}", task.segment));
    let (ids, read) = result_members(task).await;
    assert_eq!(report.members as usize, ids.len());
    (ids, read)
}

/// The members a run of `task` wrote, and the snapshot id its manifest records.
async fn result_members(task: &ComputeTask) -> (BTreeSet<String>, u64) {
    let dir = ResultDir::open(&task.results_uri).unwrap();
    let manifest = dir.read_manifest().await.unwrap().expect("a manifest");
    let mut ids = BTreeSet::new();
    for part in &manifest.parts {
        let bytes = dir.read_part(part).await.unwrap();
        ids.extend(part.decode(&bytes).unwrap().into_iter().map(str::to_string));
    }
    let [read] = manifest.sources.as_slice() else { panic!("one source in {:?}", manifest.sources) };
    assert_eq!((read.table.as_str(), read.format), ("orders", SourceFormat::Iceberg));
    (ids, read.version.expect("an Iceberg source's snapshot id"))
}

/// The whole time-travel check against one catalog: every snapshot of the
/// history (two appends, a delete, an overwrite, each as pyiceberg commits
/// them) read at a time between it and the next, exactly at its own time,
/// and again after one more commit. Returns the helper's account of the
/// table after that commit.
async fn check_time_travel(catalog: &Catalog, results: &Path) -> Value {
    let written = history(&catalog.helper(&["write"]));
    assert!(written.len() >= 4, "two appends, a delete and an overwrite: {written:?}");
    let access = catalog.access();

    let mut first_reads = Vec::new();
    for (s, snapshot) in written.iter().enumerate() {
        for (label, at) in [("between", between(&written, s)), ("at", snapshot.committed)] {
            // pyiceberg's own timestamp time travel agrees on the snapshot.
            let theirs = catalog.helper(&["at", &at.timestamp_millis().to_string()]);
            assert_eq!(theirs["snapshotId"].as_u64(), Some(snapshot.id), "pyiceberg as of {at}");
            assert_eq!(members_of(&theirs["members"]), snapshot.members);

            let name = format!("s{s}-{label}");
            let (members, read) = compute_members(&task(&name, &access, results, at)).await;
            assert_eq!(read, snapshot.id, "the snapshot read as of {at}");
            assert_eq!(members, snapshot.members, "the members of snapshot {s} ({label})");
            first_reads.push((name, at, read, members));
        }
    }
    let distinct: BTreeSet<_> = written.iter().map(|s| s.members.clone()).collect();
    assert!(distinct.len() >= 4, "the commits change the members");

    // More commits later: the same snapshot times give the same members.
    let printed = catalog.helper(&["more"]);
    let later = history(&printed);
    assert_eq!(later.len(), written.len() + 1);
    for (name, at, read, members) in &first_reads {
        let again = compute_members(&task(&format!("again-{name}"), &access, results, *at)).await;
        assert_eq!((&again.1, &again.0), (read, members), "recomputed as of {at}");
    }
    let newest = later.last().unwrap();
    let (members, read) = compute_members(&task("newest", &access, results, between(&later, later.len() - 1))).await;
    assert_eq!((read, &members), (newest.id, &newest.members));

    // Before the first snapshot: no table state to read.
    let before = written[0].committed - Duration::milliseconds(1);
    let error = compute::run(&task("before", &access, results, before)).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory, "{error}");
    assert!(!error.reason.is_transient());
    assert!(error.message.contains("table `orders`"), "{error}");
    assert!(error.message.contains(&format!("before the oldest snapshot that can be read, {}", written[0].id)), "{error}");
    assert!(!results.join("before/_manifest.json").exists());
    printed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_table_in_a_sql_catalog_is_read_as_of_the_snapshot_time() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    check_time_travel(&catalog, &dir.path().join("results")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_table_in_a_rest_catalog_is_read_as_of_the_snapshot_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = RestCatalogServer::start(dir.path());
    let catalog = Catalog::rest(&server);
    check_time_travel(&catalog, &dir.path().join("results")).await;
}

/// The same on S3 (moto): the catalog's metadata, manifests and data files
/// are objects, and the worker lists and reads them through its `AWS_*`.
/// The Spark engine reads each snapshot's files there through S3A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_table_on_s3_is_read_as_of_the_snapshot_time() {
    let s3 = S3Server::start(&["lake"]);
    for (key, value) in s3.env() {
        std::env::set_var(key, value);
    }
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql_on_s3(dir.path(), &s3);
    let results = dir.path().join("results");
    let printed = check_time_travel(&catalog, &results).await;
    assert!(printed["location"].as_str().unwrap().starts_with("s3://lake/warehouse/"), "{printed}");
    let written = history(&printed);
    spark_reads_each_snapshot(&catalog, &written, &results).await;
}

/// The Spark engine reads the same snapshot, through the same reader, as
/// DataFusion: at a time between each commit and the next, the members are
/// that snapshot's (pyiceberg's scan) and the manifest records its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spark_engine_reads_each_snapshot_as_datafusion_does() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    let written = history(&catalog.helper(&["write"]));
    spark_reads_each_snapshot(&catalog, &written, &dir.path().join("results")).await;
}

/// One Spark session computes every snapshot of `written` (at a time
/// between it and the next): each gives that snapshot's members, and the
/// manifest its id.
async fn spark_reads_each_snapshot(catalog: &Catalog, written: &[Commit], results: &Path) {
    let tasks: Vec<ComputeTask> = (0..written.len())
        .map(|s| ComputeTask {
            engine: ComputeEngine::Spark,
            ..task(&format!("spark-s{s}"), &catalog.access(), results, between(written, s))
        })
        .collect();
    spark::run_local_all(&tasks, &ComputeOptions::default()).await.unwrap_or_else(|e| panic!("spark: {e}"));
    for (s, task) in tasks.iter().enumerate() {
        let (members, read) = result_members(task).await;
        assert_eq!((read, &members), (written[s].id, &written[s].members), "snapshot {s} on Spark");
    }
}

/// Rules read an Iceberg table like any other: the same members as the SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_work_on_an_iceberg_table() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    let written = history(&catalog.helper(&["write"]));
    let s = written.len() - 1;
    let mut rules = task("rules", &catalog.access(), &dir.path().join("results"), between(&written, s));
    rules.definition = Definition {
        sql: None,
        rules: Some(
            serde_json::from_value(json!({"all": [
                {"property": {"table": "orders", "column": "amount", "op": "gte", "value": 50}},
                {"property": {"table": "orders", "column": "country", "op": "ne", "value": "US"}}
            ]}))
            .unwrap(),
        ),
        static_list: None,
    };
    let (members, read) = compute_members(&rules).await;
    assert_eq!((read, members), (written[s].id, written[s].members.clone()));
}

/// A tenant names a catalog, never a host: the operator refuses a catalog
/// the namespace's class does not declare before launching anything, and
/// the worker refuses a table whose metadata or data are outside the
/// class's locations, or a catalog its task does not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_catalog_or_a_table_outside_the_allowed_prefixes_is_refused() {
    let spec: SegmentSpec = serde_json::from_value(json!({"definition": {"sql": SQL}})).unwrap();
    let tenant = Tenant { namespace: "growth", results_base: "s3://results" };
    let class: ComputeClassSpec = serde_json::from_value(json!({
        "allowedSourcePrefixes": ["s3://lake/{namespace}/"],
        "icebergCatalogs": [{"name": "lake", "type": "rest", "uri": "https://catalog.internal/", "tokenEnv": "LAKE_TOKEN"}]
    }))
    .unwrap();
    assert_eq!(check_allowed(&spec, &[&iceberg_source()], &class, tenant), Ok(()));
    let elsewhere = SegmentSourceSpec { uri: "iceberg://attacker/sales/orders".into(), ..iceberg_source() };
    let error = check_allowed(&spec, &[&elsewhere], &class, tenant).unwrap_err();
    assert_eq!((error.reason, error.field.as_str()), (SpecProblem::NotAllowed, "SegmentSource of table `orders`: spec.uri"));
    assert!(error.message.contains("`attacker` is not one of the ComputeClass's icebergCatalogs"), "{error}");
    // The task carries the class's catalog, with its address: not the tenant's.
    let launched = task("t", &empty_access(), Path::new("/r"), Utc::now()).with_iceberg_access(&class, "s3://results");
    let task_json = serde_json::to_value(launched).unwrap();
    assert_eq!(task_json["iceberg"]["catalogs"][0]["uri"], "https://catalog.internal/");
    assert_eq!(task_json["iceberg"]["allowedPrefixes"], json!(["s3://lake/growth/"]));

    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    let written = history(&catalog.helper(&["write"]));
    let at = between(&written, written.len() - 1);
    let results = dir.path().join("results");
    let refused = |access: IcebergAccess, name: &'static str| {
        let task = task(name, &access, &results, at);
        async move { compute::run(&task).await.expect_err("refused") }
    };
    // The warehouse is not under the class's prefixes.
    let mut outside = catalog.access();
    outside.allowed_prefixes = Some(vec!["file:///somewhere/else/".into()]);
    let error = refused(outside, "outside").await;
    assert_eq!(error.reason, FailureReason::UnsupportedSource, "{error}");
    assert!(error.message.contains("outside the locations the ComputeClass allows"), "{error}");
    // Local files not allowed.
    let mut no_local = catalog.access();
    no_local.allow_local_files = false;
    let error = refused(no_local, "no-local").await;
    assert!(error.message.contains("does not allow local files"), "{error}");
    // A catalog the task does not carry.
    let mut undeclared = catalog.access();
    undeclared.catalogs.clear();
    let error = refused(undeclared, "undeclared").await;
    assert_eq!(error.reason, FailureReason::UnsupportedSource, "{error}");
    assert!(error.message.contains("not one of the namespace's ComputeClass icebergCatalogs"), "{error}");
    assert!(!results.join("outside/_manifest.json").exists());
}

fn empty_access() -> IcebergAccess {
    IcebergAccess {
        catalogs: vec![],
        namespace: "growth".into(),
        results_base: "s3://results".into(),
        allowed_prefixes: None,
        allow_local_files: false,
    }
}

/// Apache Iceberg's REST catalog fixture (`RESTCatalogServer`, a JDBC
/// catalog on SQLite behind the REST protocol) on a free port, its
/// warehouse a local directory. The jars are the ones tests/setup copies
/// from Maven Central into the cache (`tests/iceberg-rest/pom.xml`).
struct RestCatalogServer {
    child: Child,
    port: u16,
    warehouse: PathBuf,
}

/// Where tests/setup puts the fixture's jars.
fn rest_fixture_jars() -> PathBuf {
    if let Ok(dir) = std::env::var("ICEBERG_REST_FIXTURE_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    cache.join("segment-operator/iceberg-rest-1.10.0")
}

impl RestCatalogServer {
    fn start(dir: &Path) -> RestCatalogServer {
        let jars = rest_fixture_jars();
        assert!(
            jars.join("iceberg-open-api-1.10.0-test-fixtures.jar").exists(),
            "no Iceberg REST catalog fixture in {} (tests/setup installs it)",
            jars.display()
        );
        let warehouse = dir.join("rest-warehouse");
        std::fs::create_dir_all(&warehouse).unwrap();
        let port = segment_tests::free_port();
        let log = std::fs::File::create(dir.join("rest-catalog.log")).unwrap();
        // The server dies with this test's thread, even when the run is killed.
        let child = segment_tests::die_with_parent(&mut Command::new("java"))
            .arg("-cp")
            .arg(format!("{}/*", jars.display()))
            .arg("org.apache.iceberg.rest.RESTCatalogServer")
            .env("CATALOG_WAREHOUSE", format!("file://{}", warehouse.display()))
            .env("CATALOG_REST_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("java runs");
        let server = RestCatalogServer { child, port, warehouse };
        let deadline = Instant::now() + StdDuration::from_secs(60);
        while segment_tests::http_get(port, "/v1/config").0 != 200 {
            assert!(Instant::now() < deadline, "the REST catalog did not start: {}", dir.join("rest-catalog.log").display());
            std::thread::sleep(StdDuration::from_millis(200));
        }
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for RestCatalogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The catalog's token goes to the class's catalog URL and nowhere else:
/// not to a `uri` the catalog's configuration names, not along a redirect.
/// A catalog here answers `v1/config` with another host and redirects the
/// table to it; the other host hears nothing, the run fails, and the
/// message holds neither the token nor the catalog's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_token_goes_to_the_classs_catalog_alone() {
    let elsewhere = FakeHttp::start(|_| "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_string());
    let other = format!("http://127.0.0.1:{}", elsewhere.port);
    let answer_other = other.clone();
    let catalog = FakeHttp::start(move |line| {
        if line.starts_with("GET /v1/config") {
            let body = json!({"defaults": {}, "overrides": {"uri": answer_other, "prefix": "p"}}).to_string();
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        } else {
            format!("HTTP/1.1 302 Found\r\nLocation: {answer_other}/steal\r\nContent-Length: 0\r\n\r\n")
        }
    });
    const TOKEN_ENV: &str = "ICEBERG_TEST_LAKE_TOKEN";
    std::env::set_var(TOKEN_ENV, "s3cr3t-token");
    let mut access = empty_access();
    access.catalogs = vec![IcebergCatalog {
        warehouse: Some("tenants".into()),
        token_env: Some(TOKEN_ENV.into()),
        ..IcebergCatalog::new("lake", IcebergCatalogType::Rest, format!("http://127.0.0.1:{}/", catalog.port))
    }];
    let dir = tempfile::tempdir().unwrap();
    let error = compute::run(&task("token", &access, dir.path(), Utc::now())).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("HTTP 302"), "{error}");
    assert!(!error.message.contains("s3cr3t") && !error.message.contains("steal"), "{error}");

    let heard = catalog.requests();
    assert_eq!(heard.len(), 2, "{heard:#?}");
    assert!(heard[0].starts_with("GET /v1/config?warehouse=tenants "), "{heard:#?}");
    assert!(heard[1].starts_with("GET /v1/p/namespaces/sales/tables/orders "), "{heard:#?}");
    assert!(heard.iter().all(|r| r.contains("authorization: Bearer s3cr3t-token")), "{heard:#?}");
    assert!(elsewhere.requests().is_empty(), "the other host heard {:#?}", elsewhere.requests());

    // Without the variable in the worker's environment: named, not guessed.
    std::env::remove_var(TOKEN_ENV);
    let error = compute::run(&task("no-token", &access, dir.path(), Utc::now())).await.expect_err("fails");
    assert!(error.message.contains(&format!("{TOKEN_ENV} holding its token is not set")), "{error}");
    assert_eq!(catalog.requests().len(), 2, "nothing is sent without the token");
}

/// A loopback HTTP server answering each request with `answer(request
/// line)`, remembering each request line with its lowercased headers and,
/// after an empty line, its body.
struct FakeHttp {
    port: u16,
    heard: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeHttp {
    fn start(answer: impl Fn(&str) -> String + Send + 'static) -> FakeHttp {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = heard.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim() != "" {
                    let lowered = match line.split_once(':') {
                        Some((name, value)) if !request.is_empty() => format!("{}:{value}", name.to_lowercase()),
                        _ => line.clone(),
                    };
                    request.push_str(lowered.trim_end());
                    request.push('\n');
                    line.clear();
                }
                // The body (a form), read whole: one left unread could reset
                // the connection before the client reads the answer.
                let length = request.lines().find_map(|h| h.strip_prefix("content-length:")?.trim().parse().ok());
                let mut body = vec![0; length.unwrap_or(0)];
                if std::io::Read::read_exact(&mut reader, &mut body).is_ok() && !body.is_empty() {
                    request.push('\n');
                    request.push_str(&String::from_utf8_lossy(&body));
                }
                let first = request.lines().next().unwrap_or_default().to_string();
                log.lock().unwrap().push(request);
                // One request a connection: the client must not reuse it.
                let reply = answer(&first).replacen("\r\n", "\r\nConnection: close\r\n", 1);
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        FakeHttp { port, heard }
    }

    fn requests(&self) -> Vec<String> {
        self.heard.lock().unwrap().clone()
    }
}

/// An HTTP answer with a JSON body, for a [`FakeHttp`].
fn json_reply(status: &str, body: Value) -> String {
    let body = body.to_string();
    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// A catalog of [`FakeHttp`]s for `credentialEnv`: config (prefix `p`),
/// and a table it does not have, so a run fails after the table request.
fn oauth2_catalog(token_endpoint: bool) -> FakeHttp {
    FakeHttp::start(move |line| {
        if token_endpoint && line.starts_with("POST /v1/oauth/tokens ") {
            json_reply("200 OK", json!({"access_token": "issued-t0ken", "token_type": "bearer", "expires_in": 3600}))
        } else if line.starts_with("GET /v1/config") {
            json_reply("200 OK", json!({"defaults": {}, "overrides": {"prefix": "p"}}))
        } else {
            json_reply("404 Not Found", json!({"error": {"message": "no", "type": "NoSuchTableException", "code": 404}}))
        }
    })
}

/// The class's REST catalog at `catalog`, authenticating with the OAuth2
/// client credentials the worker variable `credential_env` holds.
fn oauth2_access(catalog: &FakeHttp, credential_env: &str, scope: Option<&str>, token_uri: Option<String>) -> IcebergAccess {
    let mut access = empty_access();
    access.catalogs = vec![IcebergCatalog {
        warehouse: Some("tenants".into()),
        credential_env: Some(credential_env.into()),
        scope: scope.map(str::to_string),
        oauth2_server_uri: token_uri,
        ..IcebergCatalog::new("lake", IcebergCatalogType::Rest, format!("http://127.0.0.1:{}/", catalog.port))
    }];
    access
}

/// `credentialEnv`: before `v1/config` the worker POSTs the client
/// credentials grant (client id, secret, scope) to the catalog's
/// `v1/oauth/tokens`, and the issued token, not the secret, goes with the
/// config and table requests as the bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_client_credentials_are_traded_for_the_token_the_catalog_hears() {
    const CREDENTIAL_ENV: &str = "ICEBERG_TEST_OAUTH2_CATALOG_CREDENTIAL";
    std::env::set_var(CREDENTIAL_ENV, "lake-client:s3cr3t-secret");
    let catalog = oauth2_catalog(true);
    let access = oauth2_access(&catalog, CREDENTIAL_ENV, Some("PRINCIPAL_ROLE:ALL"), None);
    let dir = tempfile::tempdir().unwrap();
    let error = compute::run(&task("oauth2", &access, dir.path(), Utc::now())).await.expect_err("no such table");
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("HTTP 404 Not Found NoSuchTableException"), "{error}");
    assert!(!error.message.contains("s3cr3t") && !error.message.contains("issued-t0ken"), "{error}");

    let heard = catalog.requests();
    assert_eq!(heard.len(), 3, "{heard:#?}");
    let token_request = &heard[0];
    assert!(token_request.starts_with("POST /v1/oauth/tokens "), "{heard:#?}");
    assert!(token_request.contains("content-type: application/x-www-form-urlencoded"), "{heard:#?}");
    assert!(
        token_request.ends_with(
            "\n\ngrant_type=client_credentials&client_id=lake-client&client_secret=s3cr3t-secret&scope=PRINCIPAL_ROLE%3AALL"
        ),
        "{heard:#?}"
    );
    assert!(!token_request.contains("authorization:"), "{heard:#?}");
    assert!(heard[1].starts_with("GET /v1/config?warehouse=tenants "), "{heard:#?}");
    assert!(heard[2].starts_with("GET /v1/p/namespaces/sales/tables/orders "), "{heard:#?}");
    for request in &heard[1..] {
        assert!(request.contains("authorization: Bearer issued-t0ken"), "{heard:#?}");
        assert!(!request.contains("s3cr3t") && !request.contains("lake-client"), "{heard:#?}");
    }
    std::env::remove_var(CREDENTIAL_ENV);
}

/// `oauth2ServerUri` elsewhere: the secret goes there and only there (the
/// scope `catalog` unless the class says otherwise), the token to the
/// catalog and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_oauth2_server_uri_the_secret_goes_to_it_alone() {
    const CREDENTIAL_ENV: &str = "ICEBERG_TEST_OAUTH2_SERVER_CREDENTIAL";
    std::env::set_var(CREDENTIAL_ENV, "lake-client:s3cr3t-secret");
    let idp = FakeHttp::start(|_| json_reply("200 OK", json!({"access_token": "issued-t0ken", "token_type": "Bearer"})));
    let catalog = oauth2_catalog(false);
    let token_uri = format!("http://127.0.0.1:{}/realms/lake/token", idp.port);
    let access = oauth2_access(&catalog, CREDENTIAL_ENV, None, Some(token_uri));
    let dir = tempfile::tempdir().unwrap();
    let error = compute::run(&task("oauth2-server", &access, dir.path(), Utc::now())).await.expect_err("no such table");
    assert!(error.message.contains("HTTP 404 Not Found NoSuchTableException"), "{error}");

    let issued = idp.requests();
    assert_eq!(issued.len(), 1, "{issued:#?}");
    assert!(issued[0].starts_with("POST /realms/lake/token "), "{issued:#?}");
    assert!(
        issued[0].ends_with("\n\ngrant_type=client_credentials&client_id=lake-client&client_secret=s3cr3t-secret&scope=catalog"),
        "{issued:#?}"
    );
    let heard = catalog.requests();
    assert_eq!(heard.len(), 2, "{heard:#?}");
    assert!(heard[0].starts_with("GET /v1/config?warehouse=tenants "), "{heard:#?}");
    assert!(heard.iter().all(|r| r.contains("authorization: Bearer issued-t0ken") && !r.contains("s3cr3t")), "{heard:#?}");
    std::env::remove_var(CREDENTIAL_ENV);
}

/// Refused credentials fail the run (`UnreadableSource`) with the status
/// and the OAuth2 error code, not the secret nor the answer's text, and
/// nothing goes to the catalog; neither does anything when the variable is
/// unset or holds no `client_id:client_secret`, said without its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_or_missing_oauth2_credentials_fail_the_run_without_echoing_them() {
    const CREDENTIAL_ENV: &str = "ICEBERG_TEST_OAUTH2_REFUSED_CREDENTIAL";
    std::env::set_var(CREDENTIAL_ENV, "lake-client:s3cr3t-secret");
    let catalog = FakeHttp::start(|_| {
        json_reply(
            "401 Unauthorized",
            json!({"error": "invalid_client", "error_description": "no client lake-client with secret s3cr3t-secret"}),
        )
    });
    let access = oauth2_access(&catalog, CREDENTIAL_ENV, None, None);
    let dir = tempfile::tempdir().unwrap();
    let error = compute::run(&task("refused", &access, dir.path(), Utc::now())).await.expect_err("refused");
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains("catalog `lake`: the OAuth2 token request: HTTP 401 Unauthorized invalid_client"), "{error}");
    assert!(!error.message.contains("s3cr3t") && !error.message.contains("no client"), "{error}");
    let heard = catalog.requests();
    assert_eq!(heard.len(), 1, "only the token request: {heard:#?}");
    assert!(heard[0].starts_with("POST /v1/oauth/tokens "), "{heard:#?}");

    std::env::set_var(CREDENTIAL_ENV, "s3cr3t-without-an-id");
    let error = compute::run(&task("no-colon", &access, dir.path(), Utc::now())).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::UnreadableSource, "{error}");
    assert!(error.message.contains(&format!("{CREDENTIAL_ENV} does not hold client credentials as client_id:client_secret")));
    assert!(!error.message.contains("s3cr3t"), "{error}");
    std::env::remove_var(CREDENTIAL_ENV);
    let error = compute::run(&task("unset", &access, dir.path(), Utc::now())).await.expect_err("fails");
    assert!(error.message.contains(&format!("{CREDENTIAL_ENV} holding its client credentials is not set")), "{error}");
    assert_eq!(catalog.requests().len(), 1, "nothing is sent without the credentials");
}

/// Apache Iceberg's REST catalog fixture issues a token for the client
/// credentials grant at its `v1/oauth/tokens` and refuses any other
/// request there (a form it cannot parse, another grant type): a table
/// pyiceberg wrote is read with `credentialEnv` set, at two snapshots.
/// The fixture accepts any client and does not check the bearer token;
/// the tests against `FakeHttp` above check where each goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_table_in_a_rest_catalog_is_read_with_oauth2_client_credentials() {
    const CREDENTIAL_ENV: &str = "ICEBERG_TEST_OAUTH2_REST_FIXTURE_CREDENTIAL";
    std::env::set_var(CREDENTIAL_ENV, "segment-worker:s3cr3t-secret");
    let dir = tempfile::tempdir().unwrap();
    let server = RestCatalogServer::start(dir.path());
    let catalog = Catalog::rest(&server);
    let written = history(&catalog.helper(&["write"]));
    let mut access = catalog.access();
    access.catalogs = vec![IcebergCatalog { credential_env: Some(CREDENTIAL_ENV.into()), ..catalog.class.clone() }];
    let results = dir.path().join("results");
    for s in [1, written.len() - 1] {
        let (members, read) = compute_members(&task(&format!("oauth2-s{s}"), &access, &results, between(&written, s))).await;
        assert_eq!((read, &members), (written[s].id, &written[s].members), "snapshot {s}");
    }
    std::env::remove_var(CREDENTIAL_ENV);
}

/// Ingest records the snapshot id the compute read (from the manifest) in
/// its verdict; the operator seals the version with it, and it reaches the
/// version's `tableVersions` in the status as for Delta tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_records_the_snapshot_read_with_the_version() {
    use segment_core::manifest::SourceRead;
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    let written = history(&catalog.helper(&["write"]));
    let snapshot = between(&written, 1);
    let compute_task = task("ingested", &catalog.access(), &dir.path().join("results"), snapshot);
    let (members, read) = compute_members(&compute_task).await;
    assert_eq!(read, written[1].id);

    let stored = ingested_and_sealed(&compute_task).await;
    assert_eq!(stored.members, members.len() as u64);
    let recorded = SourceRead { table: "orders".into(), format: SourceFormat::Iceberg, version: Some(written[1].id) };
    assert_eq!(stored.table_versions, vec![recorded]);
}

/// History removed by the writer (pyiceberg's `expire_snapshots`, which
/// drops the snapshot and trims the log): a time it covered fails with
/// `SnapshotBeforeHistory` naming the oldest snapshot still readable,
/// and later times read as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_snapshot_fails_with_snapshot_before_history() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::sql(dir.path());
    let written = history(&catalog.helper(&["write"]));
    let left = history(&catalog.helper(&["expire", &written[0].id.to_string()]));
    assert_eq!(left.first().map(|s| s.id), Some(written[1].id), "the log is trimmed");
    let (access, results) = (catalog.access(), dir.path().join("results"));

    let error = compute::run(&task("expired", &access, &results, between(&written, 0))).await.expect_err("fails");
    assert_eq!(error.reason, FailureReason::SnapshotBeforeHistory, "{error}");
    assert!(error.message.contains(&format!("before the oldest snapshot that can be read, {}", written[1].id)), "{error}");
    let (members, read) = compute_members(&task("kept", &access, &results, between(&written, 1))).await;
    assert_eq!((read, members), (written[1].id, written[1].members.clone()));
}
