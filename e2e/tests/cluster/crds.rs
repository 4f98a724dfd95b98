//! The CRDs on the real API server: they are Established, the fixtures are
//! admitted or rejected by the server's own validation (OpenAPI schema and
//! CEL rules) with the expected message, the printer columns show the
//! status, and `kubectl explain` documents every field of spec and status.

use std::path::Path;

use segment_tests::cluster::workspace_root;
use serde_json::Value;

use crate::cluster;

/// A fixture as JSON without its namespace (each test applies it in a
/// namespace of its own), and the error it expects (`# expect-error:`).
fn fixture(path: &Path) -> (String, Option<String>) {
    let text = std::fs::read_to_string(path).expect("a fixture");
    let expected = text.lines().find_map(|l| l.strip_prefix("# expect-error: ")).map(str::to_string);
    let mut object: Value = serde_yaml::from_str(&text).expect("a YAML fixture");
    object["metadata"].as_object_mut().expect("metadata").remove("namespace");
    (object.to_string(), expected)
}

fn fixtures(kind: &str) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(workspace_root().join("tests/fixtures").join(kind))
        .expect("the fixtures directory")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no {kind} fixtures");
    paths
}

#[test]
fn crds_are_established_and_apply_again_without_conflict() {
    let cluster = cluster();
    for crd in segment_tests::cluster::PROJECT_CRDS {
        let object: Value =
            serde_json::from_str(&cluster.kubectl_ok(&["get", "crd", crd, "-o", "json"])).expect("the CRD as JSON");
        for condition in ["Established", "NamesAccepted"] {
            let found = object["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == condition));
            assert_eq!(found.map(|c| c["status"].clone()), Some("True".into()), "{crd}: {condition}");
        }
    }
    // Server-side apply of the same files is a no-op, not a conflict.
    let crds = workspace_root().join("crds");
    let again = cluster.kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
    assert!(again.contains("serverside-applied"), "{again}");
}

#[test]
fn the_api_server_admits_valid_fixtures_and_rejects_invalid_ones_with_their_message() {
    let cluster = cluster();
    let namespace = cluster.namespace("fixtures");
    for path in fixtures("valid") {
        let (object, expected) = fixture(&path);
        assert!(expected.is_none(), "{}: a valid fixture expects no error", path.display());
        let output = cluster.apply(&namespace, &object);
        assert!(output.success(), "{} was rejected: {}", path.display(), output.stderr);
        // A schema the server does not fully understand (an unknown
        // `format`) shows as a warning on every write.
        assert!(!output.stderr.contains("Warning"), "{}: {}", path.display(), output.stderr);
    }
    for path in fixtures("invalid") {
        let (object, expected) = fixture(&path);
        let expected = expected.unwrap_or_else(|| panic!("{} has no `# expect-error:` line", path.display()));
        let output = cluster.apply(&namespace, &object);
        assert!(!output.success(), "{} was admitted", path.display());
        assert!(
            output.stderr.contains(&expected),
            "{}: expected {expected:?}, the server said: {}",
            path.display(),
            output.stderr
        );
    }
}

#[test]
fn printer_columns_show_the_status() {
    let cluster = cluster();
    let namespace = cluster.namespace("columns");
    let (object, _) = fixture(&workspace_root().join("tests/fixtures/valid/segment-static.yaml"));
    let name = serde_json::from_str::<Value>(&object).unwrap()["metadata"]["name"].as_str().unwrap().to_string();
    assert!(cluster.apply(&namespace, &object).success());
    let status = serde_json::json!({"status": {
        "activeVersion": 7, "members": 1234, "lastSuccessfulTime": "2026-01-01T00:00:00Z",
        "nextScheduleTime": "2030-01-01T00:00:00Z",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    cluster.kubectl_ok(&[
        "patch",
        "segment",
        &name,
        "-n",
        &namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let table = cluster.kubectl_ok(&["get", "segments", "-n", &namespace]);
    let header: Vec<&str> = table.lines().next().unwrap().split("  ").map(str::trim).filter(|s| !s.is_empty()).collect();
    assert_eq!(header, ["NAME", "READY", "ACTIVE", "MEMBERS", "LAST RUN", "NEXT RUN", "AGE"], "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], [name.as_str(), "True", "7", "1234"], "{table}");
    assert_eq!(row[5], "2030-01-01T00:00:00Z", "{table}");
}

/// Every property of `schema`, with its path, that has no description.
fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let at = format!("{path}.{name}");
            if property["description"].as_str().is_none_or(|d| d.trim().is_empty()) {
                out.push(at.clone());
            }
            undocumented(property, &at, out);
        }
    }
    undocumented_in(&schema["items"], &format!("{path}[]"), out);
    undocumented_in(&schema["additionalProperties"], &format!("{path}{{}}"), out);
}

fn undocumented_in(schema: &Value, path: &str, out: &mut Vec<String>) {
    if schema.is_object() {
        undocumented(schema, path, out);
    }
}

#[test]
fn kubectl_explain_documents_every_field_of_spec_and_status() {
    let cluster = cluster();
    for (kind, resource) in [("Segment", "segment"), ("SegmentSource", "segmentsource")] {
        // What `kubectl explain` shows is the server's published OpenAPI.
        let openapi: Value =
            serde_json::from_str(&cluster.kubectl_ok(&["get", "--raw", "/openapi/v3/apis/segmentation.dev/v1alpha1"]))
                .expect("OpenAPI v3 as JSON");
        let schema = &openapi["components"]["schemas"][format!("dev.segmentation.v1alpha1.{kind}")];
        assert!(schema.is_object(), "{kind} is not in the published OpenAPI");
        let mut missing = Vec::new();
        undocumented(&schema["properties"]["spec"], "spec", &mut missing);
        undocumented(&schema["properties"]["status"], "status", &mut missing);
        assert!(missing.is_empty(), "{kind} fields without a description (kubectl explain shows nothing): {missing:#?}");

        let explained = cluster.kubectl_ok(&["explain", &format!("{resource}.spec")]);
        for (name, property) in schema["properties"]["spec"]["properties"].as_object().expect("spec has properties") {
            assert!(explained.contains(name.as_str()), "kubectl explain {resource}.spec does not list {name}");
            let first_words: String =
                property["description"].as_str().unwrap().split_whitespace().take(4).collect::<Vec<_>>().join(" ");
            let flat = explained.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(flat.contains(&first_words), "kubectl explain {resource}.spec: {name}'s description ({first_words}...)");
        }
    }
}

#[test]
fn out_of_range_integers_are_rejected_by_the_server_not_stored() {
    let cluster = cluster();
    let namespace = cluster.namespace("ranges");
    // Without a maximum the server would store these, and the operator's
    // list of Segments would then fail to decode for every namespace.
    for (field, patch) in [
        ("spec.retention.keepVersions", serde_json::json!({"retention": {"keepVersions": 5_000_000_000u64}})),
        ("spec.ingest.maxFailedParts", serde_json::json!({"ingest": {"maxFailedParts": 5_000_000_000u64}})),
    ] {
        let mut spec = serde_json::json!({"definition": {"static": {"uri": "s3://uploads/list.csv"}}});
        for (key, value) in patch.as_object().unwrap() {
            spec[key] = value.clone();
        }
        let object = serde_json::json!({
            "apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment",
            "metadata": {"name": "too-large"}, "spec": spec,
        });
        let output = cluster.apply(&namespace, &object.to_string());
        assert!(!output.success(), "{field} = 5000000000 was admitted");
        assert!(
            output.stderr.contains(field) && output.stderr.contains("less than or equal to 4294967295"),
            "{field}: {}",
            output.stderr
        );
    }
}
