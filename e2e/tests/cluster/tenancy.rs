//! A Segment author is a tenant: bound to Kubernetes' `edit` role in one
//! namespace (the chart's aggregated roles add Segments and
//! SegmentSources to it), with the admin's ComputeClass on that
//! namespace. Each attack is refused, by the API server or by the operator
//! with `Stalled` (`NotAllowed`), and nothing is launched for it; the
//! tenant's own Segment still computes.

use std::path::{Path, PathBuf};
use std::process::Command;

use segment_tests::cluster::{run, run_with_stdin, LocalCluster, Output};
use segment_tests::redis_call;
use serde_json::{json, Value};

use crate::lifecycle::{active_version, list, RUN};
use crate::{cluster, condition, helm_template, list_objects, put_object, Operator, Tenant};

/// kubectl as the tenant (its own kubeconfig, its ServiceAccount's token).
fn as_tenant(kubeconfig: &Path, args: &[&str]) -> Output {
    run(cluster().tool("kubectl").env("KUBECONFIG", kubeconfig).args(args))
}

fn apply_as_tenant(kubeconfig: &Path, namespace: &str, object: &Value) -> Output {
    let mut command: Command = cluster().tool("kubectl");
    command.env("KUBECONFIG", kubeconfig).args(["apply", "--server-side", "-n", namespace, "-f", "-"]);
    run_with_stdin(&mut command, &object.to_string())
}

fn segment(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": name}, "spec": spec})
}

/// A user bound to Kubernetes' `edit` role in `namespace` (a
/// ServiceAccount's token in a kubeconfig of its own under `dir`), once
/// the chart's tenant roles have been aggregated into `edit`.
fn edit_user(cluster: &LocalCluster, namespace: &str, user: &str, dir: &Path) -> PathBuf {
    cluster.kubectl_ok(&["create", "serviceaccount", user, "-n", namespace]);
    let binding = format!("{user}-edit");
    let subject = format!("{namespace}:{user}");
    cluster.kubectl_ok(&["create", "rolebinding", &binding, "--clusterrole=edit", "--serviceaccount", &subject, "-n", namespace]);
    let kubeconfig = dir.join(user);
    cluster.token_kubeconfig(&kubeconfig, &cluster.service_account_token(namespace, user), namespace);
    cluster.wait_until("the edit role to include Segments", RUN, || {
        as_tenant(&kubeconfig, &["auth", "can-i", "create", "segments.segmentation.dev", "-n", namespace]).stdout.trim() == "yes"
    });
    kubeconfig
}

#[test]
fn a_tenant_with_the_edit_role_gets_its_segments_and_nothing_else() {
    let cluster = cluster();
    let tenant = Tenant::new("tenancy");
    let namespace = tenant.namespace.clone();
    let lake = tenant.lake_bucket.clone();

    // The admin: the chart's tenant roles, a ComputeClass for this
    // namespace, and a tenant bound to `edit` here.
    let roles = helm_template(&namespace, &namespace, &["--show-only", "templates/tenant-rbac.yaml"]);
    let output = cluster.apply("default", &roles);
    assert!(output.success(), "the tenant roles: {}", output.stderr);
    let class = format!("{namespace}-tenants");
    let class_object = json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "ComputeClass", "metadata": {"name": class},
        "spec": {"allowedSourcePrefixes": [format!("s3://{lake}/tenants/{{namespace}}/")],
                 "maxResources": {"cpu": "100m", "memory": "256Mi"}}});
    let output = cluster.apply("default", &class_object.to_string());
    assert!(output.success(), "the ComputeClass: {}", output.stderr);
    cluster.kubectl_ok(&["label", "namespace", &namespace, &format!("segmentation.dev/compute-class={class}")]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = edit_user(cluster, &namespace, "alice", dir.path());

    put_object(&lake, &format!("tenants/{namespace}/lists/mine.csv"), &list(1..=3));
    put_object(&lake, "tenants/finance/lists/vip.csv", &list(100..=105));
    let own_list = json!({"static": {"uri": format!("s3://{lake}/tenants/{namespace}/lists/mine.csv")}});
    let _operator = Operator::start(&tenant, &[]);

    // The API server refuses every pod setting in a tenant's Segment.
    for (field, value) in [
        ("image", json!("attacker/worker:1")),
        ("serviceAccountName", json!("default")),
        ("env", json!([{"name": "REDIS_URL", "value": "redis://attacker:6379"}])),
        ("nodeSelector", json!({"node-role.kubernetes.io/control-plane": ""})),
        ("tolerations", json!([{"operator": "Exists"}])),
    ] {
        let object =
            segment(&format!("pod-{}", field.to_lowercase()), json!({"definition": own_list, "compute": {field: value}}));
        let output = apply_as_tenant(&kubeconfig, &namespace, &object);
        assert!(!output.success(), "spec.compute.{field} was accepted");
        // Strict field validation: "field not declared in schema" for a
        // server-side apply, "unknown field" for others.
        assert!(output.stderr.contains(&format!("spec.compute.{field}")), "{field}: {}", output.stderr);
    }
    // Nor may the tenant write a ComputeClass or choose another.
    let output = apply_as_tenant(
        &kubeconfig,
        &namespace,
        &json!({"apiVersion": "segmentation.dev/v1alpha1",
        "kind": "ComputeClass", "metadata": {"name": format!("{namespace}-mine")}, "spec": {"allowLocalFiles": true}}),
    );
    assert!(!output.success() && output.stderr.contains("forbidden"), "{}", output.stderr);
    let output =
        as_tenant(&kubeconfig, &["label", "--overwrite", "namespace", &namespace, "segmentation.dev/compute-class=other"]);
    assert!(!output.success() && output.stderr.contains("forbidden"), "{}", output.stderr);

    // What the operator refuses: another namespace's files, the worker's
    // own files, more resources than the class allows.
    let token_source = json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "SegmentSource", "metadata": {"name": "token"},
        "spec": {"table": "token", "uri": "file:///var/run/secrets/kubernetes.io/serviceaccount/token", "format": "csv"}});
    let output = apply_as_tenant(&kubeconfig, &namespace, &token_source);
    assert!(output.success(), "{}", output.stderr);
    let refused = [
        (
            "steal",
            json!({"definition": {"static": {"uri": format!("s3://{lake}/tenants/finance/lists/vip.csv")}}}),
            "spec.definition.static.uri",
        ),
        (
            "climb",
            json!({"definition": {"static": {"uri": format!("s3://{lake}/tenants/{namespace}/../finance/lists/vip.csv")}}}),
            "spec.definition.static.uri",
        ),
        ("token", json!({"definition": {"sql": "SELECT user_id FROM token"}}), "SegmentSource of table `token`: spec.uri"),
        (
            "greedy",
            json!({"definition": own_list, "compute": {"resources": {"limits": {"memory": "64Gi"}}}}),
            "spec.compute.resources.limits.memory",
        ),
    ];
    for (name, spec, _) in &refused {
        let output = apply_as_tenant(&kubeconfig, &namespace, &segment(name, spec.clone()));
        assert!(output.success(), "{name}: {}", output.stderr);
    }
    // The tenant's own Segment, within the class, is computed and served.
    let output = apply_as_tenant(&kubeconfig, &namespace, &segment("mine", json!({"definition": own_list})));
    assert!(output.success(), "{}", output.stderr);
    let mine = tenant.wait_for_segment("mine", RUN, |s| active_version(s) == Some(1));
    assert_eq!(mine["status"]["members"], 3);

    for (name, _, field) in &refused {
        let stalled = tenant.wait_for_segment(name, RUN, |s| condition(s, "Stalled").is_some_and(|c| c["status"] == "True"));
        let stalled_condition = condition(&stalled, "Stalled").unwrap();
        assert_eq!(stalled_condition["reason"], "NotAllowed", "{name}: {stalled_condition}");
        assert!(stalled_condition["message"].as_str().unwrap().contains(field), "{name}: {stalled_condition}");
        assert!(stalled["status"]["versions"].as_array().is_none_or(|v| v.is_empty()), "{name}: {stalled}");
    }
    // Nothing was launched for them, and the one Job that ran had the
    // class's settings and no API token.
    let jobs: Value = serde_json::from_str(&tenant.kubectl(&["get", "jobs", "-o", "json"]).stdout).unwrap();
    let of: Vec<&str> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["metadata"]["labels"]["segmentation.dev/segment"].as_str().unwrap())
        .collect();
    assert_eq!(of, ["mine", "mine"], "mine's compute and ingest Jobs only");
    for job in jobs["items"].as_array().unwrap() {
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false, "{pod}");
        assert_eq!(pod["serviceAccountName"], "segment-worker", "{pod}");
    }

    // The admin's changes are acted on without touching the Segments: a
    // class that allows more memory re-checks `greedy`, and a namespace
    // whose label is removed falls back to the operator's own settings
    // (any s3:// location), which lets `steal` run.
    let raised = json!({"spec": {"maxResources": {"cpu": "100m", "memory": "128Gi"}}}).to_string();
    cluster.kubectl_ok(&["patch", "computeclass", &class, "--type", "merge", "-p", &raised]);
    tenant.wait_for_segment("greedy", RUN, |s| condition(s, "Stalled").is_none_or(|c| c["reason"] != "NotAllowed"));
    cluster.kubectl_ok(&["label", "namespace", &namespace, "segmentation.dev/compute-class-"]);
    tenant.wait_for_segment("steal", RUN, |s| active_version(s) == Some(1));
    cluster.kubectl_ok(&["delete", "computeclass", &class]);
}

/// A tenant bound to `edit` reads its namespace's Secrets, so no Secret of
/// a tenant's namespace may hold the store's credentials: with
/// `--ingest-namespace`, ingest Jobs run in the admin's namespace with its
/// Secret, and the tenants' Secrets hold S3 credentials only. Two tenants'
/// Segments of the same name are computed in their namespaces, ingested
/// side by side in the ingest namespace, each into its own keys; deleting one
/// deletes its ingest Job there and leaves the other's. On a cluster of
/// its own: the operator watches every namespace. A growth user with
/// `edit` who tries to read finance's results, the admin's credentials or
/// finance's Segment is refused, and finance's state is unchanged.
#[test]
fn ingest_runs_in_the_admins_namespace_and_no_tenant_holds_the_store_credentials() {
    let cluster = crate::own_cluster();
    let (growth, finance) = (Tenant::new_on(cluster, "growth"), Tenant::new_on(cluster, "finance"));
    let s3_only: Vec<String> = segment_tests::shared_s3().env().iter().map(|(k, v)| format!("--from-literal={k}={v}")).collect();
    for tenant in [&growth, &finance] {
        cluster.kubectl_ok(&["delete", "secret", "segment-credentials", "-n", &tenant.namespace]);
        let mut secret = vec!["create", "secret", "generic", "segment-credentials", "-n", &tenant.namespace];
        secret.extend(s3_only.iter().map(String::as_str));
        cluster.kubectl_ok(&secret);
    }
    // The admin's namespace: the ingest Secret, with S3 credentials only
    // (ingest touches no store: the operator seals from its verdict), and
    // the worker's ServiceAccount the ingest pods run as.
    let system = cluster.namespace("system");
    let mut secret = vec!["create", "secret", "generic", "segment-ingest", "-n", &system];
    secret.extend(s3_only.iter().map(String::as_str));
    cluster.kubectl_ok(&secret);
    cluster.kubectl_ok(&["create", "serviceaccount", "segment-worker", "-n", &system]);

    for (tenant, users) in [(&growth, 1..=3), (&finance, 10..=13)] {
        put_object(&growth.lake_bucket, &format!("lists/{}.csv", tenant.namespace), &list(users));
        let uri = format!("s3://{}/lists/{}.csv", growth.lake_bucket, tenant.namespace);
        tenant.apply(&segment("vip", json!({"definition": {"static": {"uri": uri}}})).to_string());
    }
    let _operator =
        Operator::start_with(&growth, false, &["--ingest-namespace", &system, "--ingest-env-secret", "segment-ingest"]);
    for (tenant, members) in [(&growth, 3), (&finance, 4)] {
        let vip = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
        assert_eq!(vip["status"]["members"], members, "{}", tenant.namespace);
    }

    // Compute ran in each tenant's namespace, ingest in the admin's only.
    let jobs = |namespace: &str| -> Vec<Value> {
        let listed = cluster.kubectl_ok(&["get", "jobs", "-n", namespace, "-o", "json"]);
        serde_json::from_str::<Value>(&listed).unwrap()["items"].as_array().unwrap().clone()
    };
    let kind = |job: &Value| job["metadata"]["labels"]["segmentation.dev/job-kind"].as_str().unwrap().to_string();
    for tenant in [&growth, &finance] {
        let kinds: Vec<String> = jobs(&tenant.namespace).iter().map(kind).collect();
        assert_eq!(kinds, ["compute"], "{}", tenant.namespace);
    }
    let ingest = jobs(&system);
    let mut of: Vec<&str> =
        ingest.iter().map(|j| j["metadata"]["labels"]["segmentation.dev/segment-namespace"].as_str().unwrap()).collect();
    of.sort();
    let mut expected = [growth.namespace.as_str(), finance.namespace.as_str()];
    expected.sort();
    assert_eq!(of, expected);
    for job in &ingest {
        assert_eq!(kind(job), "ingest");
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["envFrom"][0]["secretRef"]["name"], "segment-ingest", "{container}");
    }

    // A growth user with `edit` tries finance's data: its results through
    // a static list, the admin's store credentials, finance's Segment.
    // Each is refused, and finance's status, alias, keys and result files
    // are the same after as before.
    let roles = helm_template(&system, &system, &["--show-only", "templates/tenant-rbac.yaml"]);
    let output = cluster.apply("default", &roles);
    assert!(output.success(), "the tenant roles: {}", output.stderr);
    let dir = tempfile::tempdir().unwrap();
    let mallory = edit_user(cluster, &growth.namespace, "mallory", dir.path());
    let results_bucket = growth.results_uri.trim_start_matches("s3://").to_string();
    let finance_of = |s: &str| s.contains(finance.namespace.as_str());
    let finance_state = || {
        let vip = finance.segment("vip");
        let status = json!([vip["status"]["activeVersion"], vip["status"]["versions"], vip["status"]["members"]]);
        let all_aliases = redis_call(growth.redis.port, &["HGETALL", "sg:aliases"]).expect("Redis answers").texts();
        let aliases: Vec<String> = all_aliases.chunks(2).filter(|pair| finance_of(&pair[0])).map(|pair| pair.join("=")).collect();
        let mut keys = redis_call(growth.redis.port, &["KEYS", "*"]).expect("Redis answers").texts();
        keys.retain(|k| finance_of(k));
        keys.sort();
        let files = list_objects(&results_bucket, &finance.namespace);
        (status, aliases, keys, files)
    };
    let before = finance_state();
    assert_eq!(before.1, [format!("{}/vip=1", finance.namespace)], "finance's alias is in the store");
    assert!(!before.3.is_empty(), "finance's result files");

    let finance_file = format!("s3://{results_bucket}/{}", before.3[0]);
    let peek = segment("peek", json!({"definition": {"static": {"uri": finance_file}}}));
    let output = apply_as_tenant(&mallory, &growth.namespace, &peek);
    assert!(output.success(), "{}", output.stderr);
    let stalled = growth.wait_for_segment("peek", RUN, |s| condition(s, "Stalled").is_some_and(|c| c["status"] == "True"));
    let stalled_condition = condition(&stalled, "Stalled").unwrap();
    assert_eq!(stalled_condition["reason"], "NotAllowed", "{stalled_condition}");
    assert!(stalled_condition["message"].as_str().unwrap().contains("another namespace's results"), "{stalled_condition}");
    assert!(stalled["status"]["versions"].as_array().is_none_or(|v| v.is_empty()), "{stalled}");

    for args in [
        vec!["get", "secret", "segment-ingest", "-n", system.as_str()],
        vec!["get", "segment", "vip", "-n", finance.namespace.as_str()],
        vec!["delete", "segment", "vip", "-n", finance.namespace.as_str()],
        vec!["get", "jobs", "-n", system.as_str()],
    ] {
        let output = as_tenant(&mallory, &args);
        assert!(!output.success() && output.stderr.contains("forbidden"), "{args:?}: {}", output.stderr);
    }
    let output = apply_as_tenant(&mallory, &finance.namespace, &segment("vip", json!({"definition": {"sql": "SELECT 1"}})));
    assert!(!output.success() && output.stderr.contains("forbidden"), "{}", output.stderr);
    // A Job mallory may create in growth's namespace, labelled as finance's
    // ingest Job: the segment-namespace label counts only in the ingest
    // namespace, so it is not finance's (had it been, finance's reconcile
    // would look for it in finance's and the ingest namespace and never
    // delete it). Suspended: it never starts a pod.
    let forged = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "forged-vip-ingest", "labels": {
            "segmentation.dev/segment": "vip", "segmentation.dev/segment-namespace": finance.namespace,
            "segmentation.dev/job-kind": "ingest", "segmentation.dev/version": "2"}},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "worker", "image": "attacker/worker:1"}]}}}});
    let output = apply_as_tenant(&mallory, &growth.namespace, &forged);
    assert!(output.success(), "{}", output.stderr);
    // What mallory can read in growth's namespace holds no store address.
    let secret = as_tenant(&mallory, &["get", "secret", "segment-credentials", "-o", "json"]);
    assert!(secret.success(), "{}", secret.stderr);
    let data = &serde_json::from_str::<Value>(&secret.stdout).unwrap()["data"];
    assert!(data.get("REDIS_URL").is_none() && data.get("AWS_ACCESS_KEY_ID").is_some(), "{data}");

    // The operator counts the forged Job as growth's own vip's, a Job for
    // a version no run has, and deletes it from growth's namespace.
    cluster.wait_until("the forged Job to be deleted as growth's stray Job", RUN, || {
        !growth.kubectl(&["get", "job", "forged-vip-ingest"]).success()
    });
    assert_eq!(finance_state(), before, "finance's status, alias, keys and results are untouched");

    // Deleting finance's Segment deletes its ingest Job in the admin's
    // namespace; growth's stays.
    finance.kubectl(&["delete", "segment", "vip", "--wait=true", "--timeout=120s"]);
    cluster.wait_until("finance's ingest Job to be deleted", RUN, || {
        jobs(&system).iter().all(|j| j["metadata"]["labels"]["segmentation.dev/segment-namespace"] != finance.namespace.as_str())
    });
    assert_eq!(jobs(&system).len(), 1, "growth's ingest Job stays");
    drop(_operator);
    cluster.stop();
}
