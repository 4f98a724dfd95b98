//! The `kubectl-segment` binary itself: its help, and how it fails (exit
//! code and message on stderr).

use std::process::Command;

fn kubectl_segment(args: &[&str]) -> (i32, String, String) {
    segment_tests::run_command(
        Command::new(env!("CARGO_BIN_EXE_kubectl-segment"))
            .args(args)
            // No kube context from the machine running the tests.
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST"),
    )
}

#[test]
fn help_lists_the_commands_and_kubectl_flags() {
    let (code, stdout, _) = kubectl_segment(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Usage: kubectl segment [OPTIONS] <COMMAND>"), "{stdout}");
    for command in ["preview", "run", "approve", "rollback", "status"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(command)), "{command} is listed:\n{stdout}");
    }
    for flag in ["--kubeconfig <FILE>", "--context <NAME>", "-n, --namespace <NAMESPACE>"] {
        assert!(stdout.contains(flag), "{flag}:\n{stdout}");
    }
    let (code, stdout, _) = kubectl_segment(&["preview", "--help"]);
    assert_eq!(code, 0);
    for flag in ["-f, --filename <FILE>", "--lake <DIR_OR_URI>", "--sources <FILE_OR_DIR>", "--limit <N>", "[default: 10]"] {
        assert!(stdout.contains(flag), "{flag}:\n{stdout}");
    }
}

#[test]
fn a_broken_definition_fails_with_the_operators_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("segment.yaml");
    std::fs::write(
        &file,
        "apiVersion: segmentation.dev/v1alpha1\nkind: SegmentSource\nmetadata: {name: orders}\n\
         spec: {table: orders, uri: 'file://./lake/orders/', format: parquet}\n---\n\
         apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata: {name: bad-sql, namespace: shop}\n\
         spec: {definition: {sql: 'SELECT user_id FROM orders WHERE'}}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = kubectl_segment(&["preview", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.starts_with("error: shop/bad-sql: InvalidDefinition: spec.definition.sql: does not parse: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn cluster_commands_fail_clearly_without_a_kube_config() {
    let (code, stdout, stderr) = kubectl_segment(&["status", "vip", "--kubeconfig", "/nonexistent/config"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.starts_with("error: kube config: ") && stderr.contains("/nonexistent/config"), "{stderr}");

    let (code, _, stderr) = kubectl_segment(&["rollback", "vip"]);
    assert_eq!(code, 2, "a usage error, as clap reports it");
    assert!(stderr.contains("--to-version <N>") && stderr.contains("Usage: kubectl segment rollback"), "{stderr}");
}
