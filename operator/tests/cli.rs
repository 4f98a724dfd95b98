//! The `segment-operator` binary's commands that need no cluster.

use std::process::Command;

fn operator(args: &[&str]) -> (i32, String, String) {
    segment_tests::run_command(
        Command::new(env!("CARGO_BIN_EXE_segment-operator")).args(args).current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")),
    )
}

#[test]
fn crd_prints_the_checked_in_crds() {
    let (code, stdout, _) = operator(&["crd"]);
    assert_eq!(code, 0);
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/segmentation.dev.yaml")).unwrap();
    assert!(stdout == checked_in, "crds/ is stale: run `cargo run -p segment-operator -- crd > crds/segmentation.dev.yaml`");
    assert!(stdout.contains("name: segments.segmentation.dev") && stdout.contains("name: segmentsources.segmentation.dev"));
}

#[test]
fn check_accepts_the_examples() {
    let (code, stdout, stderr) = operator(&["check", "examples/"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 5, "{stdout}");
}

#[test]
fn check_reports_each_bad_segment_with_its_reason_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("segment-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: segmentation.dev/v1alpha1\nkind: SegmentSource\nmetadata: {name: orders}\n\
         spec: {table: orders, uri: 's3://lake/orders/', format: parquet}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: bad-sql}\n\
         spec: {definition: {sql: 'SELECT user_id FROM orders WHERE'}}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: bad-cron}\n\
         spec: {definition: {sql: 'SELECT user_id FROM orders'}, schedule: {cron: '*/5 * * *'}}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: unknown-table}\n\
         spec: {definition: {sql: 'SELECT user_id FROM refunds'}}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: fine, namespace: shop}\n\
         spec: {definition: {static: {uri: 's3://uploads/vip.csv'}}}\n",
    )
    .unwrap();
    let (code, stdout, _) = operator(&["check", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("INVALID  default/bad-sql: InvalidDefinition: spec.definition.sql: does not parse"), "{stdout}");
    assert!(
        stdout.contains("INVALID  default/bad-cron: InvalidSchedule: spec.schedule.cron: `*/5 * * *` has 4 fields"),
        "{stdout}"
    );
    assert!(
        stdout.contains("INVALID  default/unknown-table: InvalidDefinition: spec.definition.sql: unknown table `refunds`"),
        "{stdout}"
    );
    assert!(stdout.contains("ok       shop/fine: static"), "{stdout}");
}

#[test]
fn a_manifest_that_does_not_parse_names_the_file_and_document() {
    let dir = std::env::temp_dir().join(format!("segment-check-parse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("two.yaml");
    std::fs::write(
        &file,
        "kind: ConfigMap\n---\nkind: Segment\nmetadata: {name: x}\nspec: {definition: {sql: 42, rules: nope}}\n",
    )
    .unwrap();
    let (code, _, stderr) = operator(&["check", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 2);
    assert!(stderr.contains("two.yaml: document 2:"), "{stderr}");
}
