//! The Helm chart installed into the real cluster with `helm install`: the
//! operator and serving Deployments become available (their pods run on
//! the node agent as the workspace's binaries, with in-cluster config and
//! the chart's ServiceAccount and RBAC), a Segment is computed by the
//! installed operator (with the chart's ComputeClass as its default) and
//! answered by the installed serving, whose metrics are on their own port;
//! `helm upgrade` with changed values rolls the Deployments; `helm
//! uninstall` removes what the chart created.
//!
//! Pods on the node agent share the host's network, so the test gives
//! the operator and serving free ports instead of the chart's defaults.

use std::time::Duration;

use segment_tests::cluster::{run, run_with_stdin, workspace_root};
use segment_tests::free_port;
use serde_json::{json, Value};

use crate::{cluster, http_get, is_true, json_of, put_object, s3, Tenant};

fn helm(args: &[&str]) -> segment_tests::cluster::Output {
    run(cluster().tool("helm").args(args))
}

/// kstatus' verdict on the release's Deployments.
fn deployments_current(tenant: &Tenant) -> bool {
    let deployments = tenant.kubectl(&["get", "deployments", "-o", "json"]);
    deployments.success() && run_with_stdin(cluster().tool("kstatus").arg("-"), &deployments.stdout).success()
}

fn get(port: u16, path: &str) -> (u16, Value) {
    let (status, body) = http_get(port, path);
    (status, json_of(&body))
}

#[test]
fn helm_install_upgrade_and_uninstall() {
    let cluster = cluster();
    let tenant = Tenant::new("helm");
    let namespace = tenant.namespace.clone();
    let release = "segments";
    let chart = workspace_root().join("charts/segment-operator");
    let chart = chart.to_str().unwrap();
    // The operator's S3 credentials, by reference as the chart asks.
    let s3_env = s3().env();
    let value = |key: &str| s3_env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap();
    cluster.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "-n",
        &namespace,
        &format!("--from-literal=AWS_ACCESS_KEY_ID={}", value("AWS_ACCESS_KEY_ID")),
        &format!("--from-literal=AWS_SECRET_ACCESS_KEY={}", value("AWS_SECRET_ACCESS_KEY")),
    ]);
    let (operator_port, serving_port, serving_metrics_port) = (free_port(), free_port(), free_port());
    let values = [
        format!("redis.url={}", tenant.redis.url()),
        format!("s3.endpoint={}", value("AWS_ENDPOINT_URL")),
        "s3.region=us-east-1".to_string(),
        "s3.existingSecret=s3-credentials".to_string(),
        format!("operator.resultsUri={}", tenant.results_uri),
        format!("operator.watchNamespace={namespace}"),
        format!("operator.metricsPort={operator_port}"),
        "operator.logJson=false".to_string(),
        "worker.envSecret=segment-credentials".to_string(),
        // Tenant::new made the worker ServiceAccount already.
        "worker.serviceAccount.create=false".to_string(),
        "worker.resources.cpuRequest=10m".to_string(),
        "worker.resources.memoryRequest=64Mi".to_string(),
        format!("serving.port={serving_port}"),
        format!("serving.metricsPort={serving_metrics_port}"),
        "serving.replicas=1".to_string(),
        "serving.autoscaling.enabled=false".to_string(),
        // Auth is on by default; this test calls the API without tokens.
        "serving.auth.enabled=false".to_string(),
    ];
    // A ComputeClass from the chart, made the default: its environment
    // reaches the installed operator's Jobs.
    let class = format!("{namespace}-class");
    let classes = json!({ &class: {"env": [{"name": "SEGMENT_CLASS_MARK", "value": "from-the-chart"}]} });
    let classes = format!("computeClasses={classes}");
    let default_class = format!("operator.defaultComputeClass={class}");
    let mut install = vec!["install", release, chart, "-n", &namespace, "--wait", "--timeout", "180s"];
    for value in &values {
        install.extend(["--set", value.as_str()]);
    }
    install.extend(["--set-json", &classes, "--set", &default_class]);
    let output = helm(&install);
    assert!(output.success(), "helm install: {}{}", output.stdout, output.stderr);
    cluster.wait_until("the Deployments to be Current", Duration::from_secs(120), || deployments_current(&tenant));

    // The installed operator computes a Segment; the installed serving answers.
    put_object(&tenant.lake_bucket, "lists/vip.csv", "user_id\nu0000001\nu0000002\n");
    tenant.apply(
        &json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "vip"},
                "spec": {"definition": {"static": {"uri": format!("s3://{}/lists/vip.csv", tenant.lake_bucket)}}}})
        .to_string(),
    );
    tenant.wait_for_segment("vip", Duration::from_secs(180), |s| is_true(s, "Ready"));
    cluster.wait_until("serving answers the member", Duration::from_secs(60), || {
        get(serving_port, &format!("/v1/namespaces/{namespace}/segments/vip/members/u0000002")).1["member"] == true
    });
    assert_eq!(get(operator_port, "/healthz").0, 200, "the operator's probe port is the one the values chose");
    let jobs = tenant.kubectl(&["get", "jobs", "-o", "json"]);
    let jobs: Value = serde_json::from_str(&jobs.stdout).expect("jobs as JSON");
    let env = &jobs["items"][0]["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array().is_some_and(|env| env.iter().any(|e| e["name"] == "SEGMENT_CLASS_MARK" && e["value"] == "from-the-chart")),
        "the default ComputeClass's environment is in the Job: {env}"
    );
    let (status, metrics) = http_get(serving_metrics_port, "/metrics");
    assert!(status == 200 && metrics.contains("segment_serving_open_connections"), "serving's metrics port: {status} {metrics}");
    assert_eq!(http_get(serving_port, "/metrics").0, 404, "serving's API port has no metrics");

    // An upgrade with a changed value rolls the serving Deployment.
    let generation = |name: &str| {
        cluster.get_json(&namespace, "deployment", name).and_then(|d| d["metadata"]["generation"].as_i64()).unwrap_or(0)
    };
    let serving_deployment = format!("{release}-segment-operator-serving");
    let before = generation(&serving_deployment);
    let mut upgrade = vec!["upgrade", release, chart, "-n", &namespace, "--wait", "--timeout", "180s"];
    for value in &values {
        upgrade.extend(["--set", value.as_str()]);
    }
    upgrade.extend(["--set-json", &classes, "--set", &default_class, "--set", "serving.cacheTtlMs=500"]);
    let output = helm(&upgrade);
    assert!(output.success(), "helm upgrade: {}{}", output.stdout, output.stderr);
    assert!(generation(&serving_deployment) > before, "the upgrade changed the serving Deployment");
    let deployment = cluster.get_json(&namespace, "deployment", &serving_deployment).unwrap();
    assert!(deployment.to_string().contains("500"), "the new cache TTL is in the Deployment");
    cluster.wait_until("the upgraded Deployments to be Current", Duration::from_secs(120), || deployments_current(&tenant));
    let status = helm(&["status", release, "-n", &namespace, "-o", "json"]);
    let status: Value = serde_json::from_str(&status.stdout).expect("helm status as JSON");
    assert_eq!((status["version"].as_i64(), status["info"]["status"].as_str()), (Some(2), Some("deployed")));

    let output = helm(&["uninstall", release, "-n", &namespace, "--wait", "--timeout", "120s"]);
    assert!(output.success(), "helm uninstall: {}{}", output.stdout, output.stderr);
    let left = tenant.kubectl(&["get", "deployments,services,serviceaccounts,roles,rolebindings", "-o", "name"]).stdout;
    assert!(!left.contains(release), "left after uninstall: {left}");
    let cluster_role = cluster.kubectl(&["get", "clusterrole", &format!("{release}-segment-operator")]);
    assert!(!cluster_role.success(), "the ClusterRole is removed");
    assert!(!cluster.kubectl(&["get", "computeclass", &class]).success(), "the chart's ComputeClass is removed");
    // CRDs in the chart's crds/ stay (Helm never deletes them), so the
    // Segments and their data survive an uninstall.
    assert!(cluster.kubectl(&["get", "crd", "segments.segmentation.dev"]).success());
}
