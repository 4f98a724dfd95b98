//! What each shipped binary links: the cluster operator (as its image
//! builds it) compiles no DataFusion, no librdkafka and no serving code,
//! and the kubectl plugin no librdkafka. A dependency added in the wrong
//! crate fails here rather than silently growing the images.

use std::path::Path;
use std::process::Command;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root")
}

/// The packages `package` links in a normal build with `args`, one name each.
fn linked_packages(package: &str, args: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace())
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let mut names: Vec<String> = text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    names.sort();
    names.dedup();
    names
}

/// The arguments of the Dockerfile's `cargo build` for `stage`.
fn dockerfile_build_args(stage: &str) -> String {
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).expect("the Dockerfile");
    let from = dockerfile.find(&format!("AS {stage}")).unwrap_or_else(|| panic!("no stage {stage}"));
    let build = dockerfile[from..].find("cargo build").map(|i| from + i).expect("a cargo build in the stage");
    dockerfile[build..].lines().next().unwrap_or_default().trim_end_matches('\\').trim().to_string()
}

#[test]
fn the_operator_image_links_no_data_plane() {
    let build = dockerfile_build_args("build-operator");
    assert!(build.contains("-p segment-operator --no-default-features"), "{build}");
    let linked = linked_packages("segment-operator", &["--no-default-features"]);
    for heavy in ["datafusion", "rdkafka", "segment-compute", "segment-serving"] {
        assert!(!linked.iter().any(|p| p == heavy), "the operator image links {heavy}");
    }
    // The check sees what it should: standalone mode does link them.
    let with_standalone = linked_packages("segment-operator", &[]);
    assert!(with_standalone.iter().any(|p| p == "datafusion"), "{with_standalone:?}");
}

#[test]
fn the_kubectl_plugin_links_no_kafka_client() {
    let linked = linked_packages("kubectl-segment", &[]);
    assert!(linked.iter().any(|p| p == "segment-compute"), "preview runs the compute library: {linked:?}");
    assert!(!linked.iter().any(|p| p == "rdkafka" || p == "segment-worker"), "{linked:?}");
}
