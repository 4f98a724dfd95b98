//! `kubectl segment preview` on the example Segments over a lake generated
//! in a temp dir: members equal the independent evaluation of
//! `segment_tests::examples`, `--lake` and `file://./` locations resolve
//! where they should, rules print the SQL they compile to, referenced
//! segments are computed first, and broken definitions are reported with
//! the operator's own messages, naming the field.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use clap::Parser;
use kubectl_segment::cli::{Cli, Command, PreviewArgs};
use kubectl_segment::preview::{self, Preview};
use segment_compute::lakegen::{self, LakeSpec};
use segment_core::api::SegmentSourceSpec;
use segment_core::manifests;
use segment_core::reasons::FailureReason;
use segment_core::rules_sql;
use segment_core::validation::check_spec;
use segment_tests::examples::{expected_members, SEGMENTS};
use segment_tests::table_history::{between, iceberg_example};
use tempfile::TempDir;

const USERS: u64 = 1500;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A temp dir holding a generated lake in `lake/`.
struct Lake {
    dir: TempDir,
    spec: LakeSpec,
}

impl Lake {
    fn generate() -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let spec = LakeSpec::new(USERS, 7);
        lakegen::generate(&dir.path().join("lake"), &spec).unwrap();
        Lake { dir, spec }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("lake").canonicalize().unwrap()
    }

    fn snapshot(&self) -> String {
        self.spec.now.to_rfc3339()
    }

    /// The example sources as they read this lake.
    fn sources(&self) -> Vec<SegmentSourceSpec> {
        let mut loaded = manifests::load(&[examples().join("sources.yaml")]).unwrap();
        for source in &mut loaded.sources {
            source.spec.uri = source.spec.uri.replace("file://./lake", &format!("file://{}", self.path().display()));
        }
        loaded.sources_in("default")
    }
}

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("kubectl-segment").chain(args.iter().copied())).unwrap()
}

fn preview_args(args: &[&str]) -> PreviewArgs {
    match cli(args).command {
        Command::Preview(args) => args,
        other => panic!("not a preview: {other:?}"),
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_over_a_lake_match_the_independent_evaluation() {
    let lake = Lake::generate();
    let lake_dir = lake.path();
    let file = examples().join("segments.yaml");
    let args = preview_args(&[
        "preview",
        "-f",
        file.to_str().unwrap(),
        "--lake",
        lake_dir.to_str().unwrap(),
        "--limit",
        "1000000",
        "--snapshot-time",
        &lake.snapshot(),
    ]);
    let previews = preview::preview(&args, now()).await.unwrap();
    let want = expected_members(&lake.spec, |_| lake.spec.now);

    let names: Vec<&str> = previews.iter().map(|(key, _)| key.name.as_str()).collect();
    assert_eq!(names, SEGMENTS, "every Segment of the file, in file order");
    let mut by_name = std::collections::BTreeMap::new();
    for (key, result) in &previews {
        let preview: &Preview = result.as_ref().unwrap_or_else(|e| panic!("{key}: {e}"));
        let expected: Vec<String> = want[&key.name].iter().cloned().collect();
        assert!(!expected.is_empty(), "{key}: the example has members over this lake");
        assert_eq!(preview.members, expected.len() as u64, "{key}: member count");
        assert_eq!(preview.sample, expected, "{key}: members differ from the independent evaluation");
        assert_eq!(preview.snapshot_time, lake.spec.now);
        by_name.insert(key.name.clone(), preview.clone());
    }

    // `--lake` replaced `file://./lake` in the sources and the static list.
    let at = |rest: &str| format!("file://{}/{rest}", lake_dir.display());
    assert_eq!(
        by_name["southern-europe-buyers"].reads,
        vec![format!("table orders ({})", at("orders/")), format!("table users ({})", at("users-delta/"))]
    );
    assert_eq!(by_name["vip-list"].reads, vec![format!("static list {}", at("lists/vip.csv"))]);

    // Rules print the SQL they compile to; SQL and static definitions do not.
    let rules = manifests::load(std::slice::from_ref(&file)).unwrap().segments;
    let southern = rules.iter().find(|s| s.metadata.name.as_deref() == Some("southern-europe-buyers")).unwrap();
    let compiled = rules_sql::compile(southern.spec.definition.rules.as_ref().unwrap(), &lake.sources()).unwrap();
    assert_eq!(by_name["southern-europe-buyers"].compiled_sql.as_deref(), Some(compiled.as_str()));
    assert!(by_name["lapsed-high-value"].compiled_sql.is_none() && by_name["vip-list"].compiled_sql.is_none());

    // win-back reads three segments (named in order): each computed first, at
    // the same snapshot time.
    let count = |name: &str| want[name].len() as u64;
    assert_eq!(
        by_name["win-back"].referenced,
        vec![
            ("churn-risk".to_string(), count("churn-risk")),
            ("lapsed-high-value".to_string(), count("lapsed-high-value")),
            ("vip-list".to_string(), count("vip-list")),
        ]
    );

    let output = preview::render(&previews);
    assert!(output.success && output.stderr.is_empty(), "{}", output.stderr);
    assert!(output.stdout.contains(&format!("compiled SQL:\n  {compiled}\n")), "{}", output.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_segment_with_the_default_sample_next_to_its_manifests() {
    // The examples copied next to a generated lake: `file://./lake/` and the
    // SegmentSources are found next to the -f file, as in standalone mode.
    let lake = Lake::generate();
    for file in ["sources.yaml", "segments.yaml"] {
        std::fs::copy(examples().join(file), lake.dir.path().join(file)).unwrap();
    }
    let file = lake.dir.path().join("segments.yaml");
    let command = cli(&["preview", "-f", file.to_str().unwrap(), "southern-europe-buyers", "--snapshot-time", &lake.snapshot()]);
    let output = kubectl_segment::execute(command, now()).await.unwrap();
    assert!(output.success, "{}", output.stderr);

    let want: Vec<String> = expected_members(&lake.spec, |_| lake.spec.now)["southern-europe-buyers"].iter().cloned().collect();
    let lines: Vec<&str> = output.stdout.lines().collect();
    assert_eq!(lines[0], "segment default/southern-europe-buyers: rules, snapshot time 2025-06-01T00:00:00Z");
    let orders = format!("file://{}/orders/", lake.path().display());
    assert!(lines[1].starts_with("reads table orders (") && lines[1].contains(&orders), "{}", lines[1]);
    assert_eq!(lines[2], "compiled SQL:");
    assert!(lines[3].starts_with("  SELECT DISTINCT user_id FROM ("), "{}", lines[3]);
    assert_eq!(lines[4], format!("members: {}", want.len()));
    assert_eq!(lines[5], "first 10:");
    let sample: Vec<String> = lines[6..].iter().map(|l| l.trim().to_string()).collect();
    assert_eq!(sample, want[..10].to_vec(), "the first ten members, in order");
}

/// Segments with one problem each, and one that is fine.
const BROKEN: &str = r#"
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: broken-sql}
spec: {definition: {sql: "SELECT user_id FROM orders WHERE"}}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: bad-cron}
spec:
  definition: {sql: "SELECT user_id FROM orders"}
  schedule: {cron: "*/5 * * *"}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: undeclared-table}
spec: {definition: {sql: "SELECT user_id FROM refunds"}}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: bad-window}
spec:
  definition:
    rules:
      event: {table: users, within: 30d}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: unknown-column}
spec: {definition: {sql: "SELECT customer FROM orders"}}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: refers-to-broken}
spec:
  definition:
    rules:
      any: [{segment: {name: broken-sql}}, {segment: {name: fine}}]
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: fine}
spec: {definition: {sql: "SELECT user_id FROM users WHERE country = 'PT'"}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_definitions_are_reported_as_the_operator_reports_them() {
    let lake = Lake::generate();
    std::fs::copy(examples().join("sources.yaml"), lake.dir.path().join("sources.yaml")).unwrap();
    let file = lake.dir.path().join("broken.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let command = cli(&["preview", "-f", file.to_str().unwrap(), "--snapshot-time", &lake.snapshot()]);
    let output = kubectl_segment::execute(command, now()).await.unwrap();
    assert!(!output.success);

    // The operator's own check gives the same text (its Ready message).
    let tables = vec!["orders".to_string(), "users".to_string(), "app_events".to_string()];
    let segments = manifests::load(std::slice::from_ref(&file)).unwrap().segments;
    let operator_says = |name: &str| {
        let segment = segments.iter().find(|s| s.metadata.name.as_deref() == Some(name)).unwrap();
        let invalid = check_spec(&segment.spec, Some(&tables)).unwrap_err();
        format!("error: default/{name}: {}: {invalid}", invalid.reason)
    };
    let errors: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(errors.len(), 6, "{}", output.stderr);
    assert_eq!(errors[0], operator_says("broken-sql"));
    assert!(errors[0].starts_with("error: default/broken-sql: InvalidDefinition: spec.definition.sql: does not parse"));
    assert_eq!(errors[1], operator_says("bad-cron"));
    assert!(errors[1].starts_with("error: default/bad-cron: InvalidSchedule: spec.schedule.cron: `*/5 * * *` has 4 fields"));
    assert_eq!(errors[2], operator_says("undeclared-table"));
    assert!(errors[2].contains("spec.definition.sql: unknown table `refunds`"), "{}", errors[2]);
    assert_eq!(
        errors[3],
        "error: default/bad-window: InvalidDefinition: spec.definition.rules.event.within: table `users` has no \
         timestampColumn in its SegmentSource, so `within` cannot apply"
    );
    // Found by the compute, with the reason a compute Job reports.
    assert!(errors[4].starts_with("error: default/unknown-column: UnknownColumn: unknown column `customer`"), "{}", errors[4]);
    assert!(
        errors[5].starts_with(
            "error: default/refers-to-broken: segment \"refers-to-broken\" refers to segment \"broken-sql\", which \
             failed: InvalidDefinition: spec.definition.sql: does not parse"
        ),
        "{}",
        errors[5]
    );

    // The good one is still previewed.
    assert!(output.stdout.starts_with("segment default/fine: sql, snapshot time 2025-06-01T00:00:00Z\n"), "{}", output.stdout);
    let portuguese = lakegen::rows(&lake.spec).filter(|r| r.user.country == "PT").count();
    assert!(output.stdout.contains(&format!("\nmembers: {portuguese}\n")), "{}", output.stdout);
}

#[tokio::test]
async fn referenced_segments_must_be_found_and_must_not_loop() {
    let dir = tempfile::tempdir().unwrap();
    let sources = dir.path().join("sources");
    std::fs::create_dir(&sources).unwrap();
    std::fs::copy(examples().join("sources.yaml"), sources.join("sources.yaml")).unwrap();
    let file = dir.path().join("segments.yaml");
    std::fs::write(
        &file,
        "apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: win-back}\n\
         spec: {definition: {rules: {all: [{segment: {name: churn-risk}}]}}}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: a}\n\
         spec: {definition: {rules: {segment: {name: b}}}}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: b}\n\
         spec: {definition: {rules: {not: {segment: {name: a}}}}}\n",
    )
    .unwrap();
    let args = preview_args(&["preview", "-f", file.to_str().unwrap(), "--sources", sources.to_str().unwrap()]);
    let previews = preview::preview(&args, now()).await.unwrap();
    let error = |i: usize| previews[i].1.as_ref().unwrap_err().to_string();
    assert_eq!(
        error(0),
        format!(
            "segment \"win-back\" refers to segment \"churn-risk\", which is not among the Segment manifests in {} and {} \
             (namespace default); preview computes referenced segments from their manifests",
            file.display(),
            sources.display()
        )
    );
    assert_eq!(error(1), "segments refer to each other in a cycle: a → b → a");
    assert_eq!(error(2), "segments refer to each other in a cycle: b → a → b");

    // Naming a Segment the file does not have lists the ones it has.
    let args = preview_args(&["preview", "-f", file.to_str().unwrap(), "churn-risk"]);
    let err = preview::preview(&args, now()).await.unwrap_err().to_string();
    assert_eq!(err, format!("{} has no Segment named \"churn-risk\" (it has: win-back, a, b)", file.display()));
}

/// An Iceberg source previews as in the cluster: the catalog comes from
/// the ComputeClass the files give the Segment's namespace, the table is
/// read as of `--snapshot-time`, and a namespace without the class has no
/// catalog to read it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_source_is_previewed_as_of_the_snapshot_time() {
    let dir = tempfile::tempdir().unwrap();
    let history = iceberg_example(dir.path());
    let file = dir.path().join("iceberg.yaml");
    for (i, commit) in history.iter().enumerate() {
        let at = between(&history, i).to_rfc3339();
        // `--lake` moves file sources, not a table its catalog places.
        let lake = dir.path().join("elsewhere");
        std::fs::create_dir_all(&lake).unwrap();
        let args = preview_args(&[
            "preview",
            "-f",
            file.to_str().unwrap(),
            "--snapshot-time",
            &at,
            "--limit",
            "1000",
            "--lake",
            lake.to_str().unwrap(),
        ]);
        let previews = preview::preview(&args, now()).await.unwrap();
        let [(key, result)] = previews.as_slice() else { panic!("one Segment: {previews:?}") };
        assert_eq!(key.to_string(), "growth/big-abroad");
        let preview = result.as_ref().unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
        assert_eq!(preview.reads, vec!["table orders (iceberg://lake/sales/orders)".to_string()]);
        let members: BTreeSet<String> = preview.sample.iter().cloned().collect();
        assert_eq!((preview.members as usize, &members), (commit.members.len(), &commit.members), "as of {at}");
    }

    // The same Segment where the namespace has no class: no catalogs.
    let yaml = std::fs::read_to_string(&file).unwrap().replace("segmentation.dev/compute-class: lake-readers", "team: growth");
    std::fs::write(&file, yaml).unwrap();
    let args = preview_args(&["preview", "-f", file.to_str().unwrap()]);
    let previews = preview::preview(&args, now()).await.unwrap();
    let Err(preview::PreviewError::Compute(error)) = &previews[0].1 else { panic!("{previews:?}") };
    assert_eq!(error.reason, FailureReason::UnsupportedSource, "{error}");
    assert!(error.message.contains("catalog `lake`"), "{error}");
}

/// A Spark Segment's rules print as the Spark SQL its run executes: the
/// snapshot time written in, identifiers in backticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spark_rules_print_the_spark_sql_they_compile_to() {
    let lake = Lake::generate();
    std::fs::copy(examples().join("sources.yaml"), lake.dir.path().join("sources.yaml")).unwrap();
    let file = lake.dir.path().join("spark.yaml");
    let segment = r#"
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: recent-buyers}
spec:
  compute: {engine: spark}
  definition:
    rules:
      event: {table: orders, within: 30d}
"#;
    std::fs::write(&file, segment).unwrap();
    let manifest = manifests::load(std::slice::from_ref(&file)).unwrap();
    let rule = manifest.segments[0].spec.definition.rules.clone().unwrap();
    let snapshot = lake.spec.now;
    let spark = rules_sql::compile_for(&rule, &lake.sources(), rules_sql::Dialect::Spark { snapshot_time: snapshot }).unwrap();
    assert_ne!(spark, rules_sql::compile(&rule, &lake.sources()).unwrap(), "the dialects differ");

    let run = |path: &Path| {
        let command = cli(&["preview", "-f", path.to_str().unwrap(), "--snapshot-time", &lake.snapshot()]);
        async move { kubectl_segment::execute(command, now()).await.unwrap() }
    };
    let output = run(&file).await;
    assert!(output.success, "{}", output.stderr);
    let lines: Vec<&str> = output.stdout.lines().collect();
    let at = lines.iter().position(|l| *l == "compiled SQL:").expect("the compiled SQL");
    assert_eq!(lines[at + 1].trim(), spark);
    assert!(spark.contains("`orders`") && spark.contains("2025-06-01"), "{spark}");

    // Spark runs it to the members DataFusion gives.
    let datafusion = lake.dir.path().join("datafusion.yaml");
    std::fs::write(&datafusion, segment.replace("compute: {engine: spark}", "compute: {engine: datafusion}")).unwrap();
    let expected = run(&datafusion).await;
    let members = |stdout: &str| stdout.lines().find(|l| l.starts_with("members: ")).map(str::to_string);
    assert!(members(&expected.stdout).is_some_and(|m| m != "members: 0"), "{}", expected.stdout);
    assert_eq!(members(&output.stdout), members(&expected.stdout));
}
