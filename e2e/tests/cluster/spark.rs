//! Spark runs on the local control plane: a Segment with `engine: spark`
//! is computed by a `SparkApplication` of the Kubeflow Spark operator,
//! whose CRD comes from the Spark operator's Go module at the version
//! e2e/spark-operator/go.mod pins (`e2e/local-cluster
//! install-spark-operator-crd`). The Spark operator itself cannot run here
//! (no container runtime, no images): [`SparkOperatorSimulation`] plays it
//! as docs/testing.md describes, and the node agent runs the driver pod it
//! creates, whose image is a host script around the real `spark-submit`
//! ([`spark_image`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use segment_operator::spark::{SparkApplication, DRIVER_CONTAINER, DRIVER_PROGRAM};
use segment_tests::cluster::{client_from_kubeconfig, run, workspace_binary, workspace_root, LocalCluster};
use serde_json::{json, Value};

use crate::lifecycle::{active_version, RUN};
use crate::{cluster, condition, is_true, put_object, Operator, Serving, Tenant};

/// The image the tests' ComputeClasses name for Spark; the node agent runs
/// it as [`spark_image`]'s script.
const SPARK_IMAGE: &str = "segment-operator/segment-spark:e2e";

/// The driver's user. Hadoop's login needs the process's user in the
/// passwd file (a Spark image's user 185 is in the image's); on this host
/// that is `nobody`.
const SPARK_USER: i64 = 65534;

/// The shared cluster with the SparkApplication CRD installed and
/// Established, and the node agent knowing the Spark image.
fn spark_cluster() -> &'static LocalCluster {
    static READY: OnceLock<()> = OnceLock::new();
    let cluster = cluster();
    READY.get_or_init(|| {
        let dir = cluster.info.kubeconfig.parent().expect("the cluster's directory").to_path_buf();
        let output = run(Command::new(workspace_root().join("e2e/local-cluster")).arg("install-spark-operator-crd").arg(&dir));
        assert!(output.success(), "installing the SparkApplication CRD: {}{}", output.stdout, output.stderr);
        cluster.wait_until("the SparkApplication CRD to be Established", Duration::from_secs(60), || {
            let crd = cluster.kubectl(&["get", "crd", "sparkapplications.sparkoperator.k8s.io", "-o", "json"]);
            serde_json::from_str::<Value>(&crd.stdout).is_ok_and(|crd| {
                crd["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Established" && c["status"] == "True"))
            })
        });
        add_image(&dir.join("images.json"), SPARK_IMAGE, spark_image());
    });
    cluster
}

/// Adds `reference` to the node agent's image map (it reads the file
/// again when it changes), written whole and renamed into place so the
/// agent never reads half a file.
fn add_image(images: &Path, reference: &str, program: &Path) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut map: Value = serde_json::from_slice(&std::fs::read(images).expect("the image map")).expect("JSON");
    map["images"][reference] = json!({"entrypoint": [program]});
    let temporary = images.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(&map).expect("JSON")).expect("the image map written");
    std::fs::rename(&temporary, images).expect("the image map replaced");
}

/// The Spark image as the node agent runs it: a script that every user
/// can run, around a Spark installation every user can read. It is the
/// pip-installed pyspark's (hard-linked into target/, since the Python
/// that installed it may live under a home only root may enter), with the
/// S3A jars a Spark image bundles (resolved from Maven Central once, the
/// packages the local engine uses, given to spark-submit as `--jars`), the driver program of `segment-worker
/// spark-driver` at the path the image would have it, and the workspace's
/// `segment-worker` as SEGMENT_WORKER_BIN. It runs `spark-submit --master
/// local[2]` on what the driver pod's arguments say.
fn spark_image() -> &'static Path {
    static SCRIPT: OnceLock<PathBuf> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        let dir = workspace_root().join("target/e2e-spark-image");
        std::fs::create_dir_all(&dir).expect("the image directory");
        let home = dir.join("spark-home");
        if !home.join("bin/spark-submit").exists() {
            let pyspark =
                run(Command::new("python3").args(["-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"]));
            assert!(pyspark.success(), "pyspark is not installed (tests/setup installs it): {}", pyspark.stderr);
            let source = pyspark.stdout.trim().to_string();
            let staging = dir.join("spark-home.tmp");
            let _ = std::fs::remove_dir_all(&staging);
            // Hard links on one file system, a copy across two.
            let linked = run(Command::new("cp").arg("-al").arg(&source).arg(&staging));
            if !linked.success() {
                let _ = std::fs::remove_dir_all(&staging);
                let copied = run(Command::new("cp").arg("-a").arg(&source).arg(&staging));
                assert!(copied.success(), "copying {source}: {}", copied.stderr);
            }
            std::fs::rename(&staging, &home).expect("the Spark home in place");
        }
        let jars = dir.join("ivy/jars");
        if !jars.join("org.apache.hadoop_hadoop-aws-3.5.0.jar").exists() {
            let noop = dir.join("noop.py");
            std::fs::write(&noop, "pass\n").expect("a Python file");
            // Maven Central alone (an m2-compatible ibiblio resolver's
            // default root): Ivy's default chain tries ~/.m2 first, and
            // fails on a pom there whose jar is not.
            let settings = dir.join("ivysettings.xml");
            std::fs::write(
                &settings,
                "<ivysettings>\n  <settings defaultResolver=\"central\"/>\n  <resolvers>\n    \
                 <ibiblio name=\"central\" m2compatible=\"true\"/>\n  \
                 </resolvers>\n</ivysettings>\n",
            )
            .expect("the Ivy settings");
            let resolved = run(Command::new(home.join("bin/spark-submit"))
                .args(["--master", "local[1]", "--conf"])
                .arg(format!("spark.jars.ivy={}", dir.join("ivy").display()))
                .arg("--conf")
                .arg(format!("spark.jars.ivySettings={}", settings.display()))
                .args(["--packages", &segment_compute::spark::S3A_PACKAGES.join(",")])
                .args(["--exclude-packages", segment_compute::spark::S3A_EXCLUDED])
                .arg(&noop)
                .env("SPARK_HOME", &home));
            assert!(resolved.success(), "resolving the S3A jars: {}{}", resolved.stdout, resolved.stderr);
        }
        // On the application's class path, as --packages puts them (in
        // Spark's own jars/ they would stand beside other versions of
        // their dependencies).
        let mut jar_list: Vec<String> = std::fs::read_dir(&jars)
            .expect("the resolved jars")
            .map(|jar| jar.expect("a jar").path().display().to_string())
            .collect();
        jar_list.sort();
        let worker = workspace_binary("segment-worker");
        let driver = run(Command::new(&worker).arg("spark-driver"));
        assert!(driver.success(), "segment-worker spark-driver: {}", driver.stderr);
        let driver_file = dir.join("segment_spark.py");
        std::fs::write(&driver_file, driver.stdout).expect("the driver program");
        let image_path = DRIVER_PROGRAM.strip_prefix("local://").expect("a local:// file");
        let script = dir.join("spark-image");
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/bash
# The Spark image of the e2e tests (e2e/tests/cluster/spark.rs): the driver
# pod's arguments are spark-submit's, run in local mode.
set -euo pipefail
export SPARK_HOME={home}
export PATH=/usr/local/bin:/usr/bin:/bin
export PYSPARK_PYTHON=/usr/bin/python3
export SEGMENT_WORKER_BIN={worker}
export HOME=/tmp
export SPARK_SUBMIT_OPTS=-Duser.home=/tmp
cd /tmp
args=()
for arg in "$@"; do
    case "$arg" in
        local://{image_path}) args+=({driver_file}) ;;
        *) args+=("$arg") ;;
    esac
done
exec "$SPARK_HOME/bin/spark-submit" --master 'local[2]' --jars {jars} "${{args[@]}}"
"#,
                jars = jar_list.join(","),
                home = home.display(),
                worker = worker.display(),
                driver_file = driver_file.display(),
            ),
        )
        .expect("the image script");
        // Readable and runnable by the driver's user: the directories
        // (the files are pyspark's own, hard-linked, and already are) and
        // the files written here.
        let chmod = run(Command::new("find").arg(&dir).args(["-type", "d", "-exec", "chmod", "a+rx", "{}", "+"]));
        assert!(chmod.success(), "{}", chmod.stderr);
        let chmod = run(Command::new("chmod").arg("a+r").arg(&driver_file).arg(&script));
        assert!(chmod.success(), "{}", chmod.stderr);
        let chmod = run(Command::new("chmod").arg("a+x").arg(&script));
        assert!(chmod.success(), "{}", chmod.stderr);
        script
    })
}

/// Plays the Kubeflow Spark operator for the SparkApplications of one
/// namespace, until dropped: for a new application it creates the driver
/// pod `<name>-driver` as spark-submit and the Spark operator's webhook
/// would (the application's image, driver labels, annotations, volumes,
/// mounts, environment, ServiceAccount, security and placement; its
/// arguments spark-submit's: `--conf` of sparkConf and hadoopConf, the main
/// file, the application's arguments), owned by the application; then it
/// reports `status.applicationState` from the driver pod's phase
/// (SUBMITTED, RUNNING, COMPLETED, FAILED with the Spark operator's
/// `driver container failed with ExitCode: N, Reason: R`),
/// `status.driverInfo.podName` and `status.terminationTime`. It starts no
/// executors: the driver runs Spark in local mode.
pub struct SparkOperatorSimulation {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SparkOperatorSimulation {
    pub fn start(namespace: &str) -> SparkOperatorSimulation {
        let stop = Arc::new(AtomicBool::new(false));
        let kubeconfig = spark_cluster().info.kubeconfig.clone();
        let (namespace, stopped) = (namespace.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let client = client_from_kubeconfig(&kubeconfig).await;
                let apps: Api<SparkApplication> = Api::namespaced(client.clone(), &namespace);
                let pods: Api<Pod> = Api::namespaced(client, &namespace);
                while !stopped.load(Ordering::Relaxed) {
                    if let Ok(list) = apps.list(&Default::default()).await {
                        for app in list.items {
                            if let Err(error) = step(&apps, &pods, &app).await {
                                eprintln!("spark operator simulation: {}: {error}", app.name_any());
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
        });
        SparkOperatorSimulation { stop, thread: Some(thread) }
    }
}

impl Drop for SparkOperatorSimulation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One look at one application, as the Spark operator's reconcile.
async fn step(apps: &Api<SparkApplication>, pods: &Api<Pod>, app: &SparkApplication) -> Result<(), kube::Error> {
    let name = app.name_any();
    let driver = format!("{name}-driver");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let state = app.status.as_ref().map(|s| s.application_state.state.clone()).unwrap_or_default();
    let status = match state.as_str() {
        "" => {
            let submitted = json!({"applicationState": {"state": "SUBMITTED"}, "driverInfo": {"podName": driver},
                "submissionAttempts": 1, "lastSubmissionAttemptTime": now});
            match pods.create(&PostParams::default(), &driver_pod(app)).await {
                Ok(_) => submitted,
                Err(kube::Error::Api(e)) if e.code == 409 => submitted,
                // spark-submit's failure to create the driver pod.
                Err(kube::Error::Api(e)) => json!({"applicationState": {"state": "SUBMISSION_FAILED",
                    "errorMessage": format!("failed to run spark-submit: {}", e.message)}, "terminationTime": now}),
                Err(other) => return Err(other),
            }
        }
        "SUBMITTED" | "RUNNING" => {
            let Some(pod) = pods.get_opt(&driver).await? else {
                let failed = json!({"applicationState": {"state": "FAILED", "errorMessage": "driver pod not found"},
                    "terminationTime": now});
                return patch_status(apps, &name, failed).await;
            };
            let pod_status = pod.status.unwrap_or_default();
            match pod_status.phase.as_deref() {
                Some("Running") if state == "SUBMITTED" => json!({"applicationState": {"state": "RUNNING"}}),
                Some("Succeeded") => json!({"applicationState": {"state": "COMPLETED"}, "terminationTime": now}),
                Some("Failed") => {
                    let terminated = pod_status
                        .container_statuses
                        .iter()
                        .flatten()
                        .find(|c| c.name == DRIVER_CONTAINER)
                        .and_then(|c| c.state.as_ref()?.terminated.clone());
                    // For whoever reads a failed test: the driver's last words.
                    let tail = kube::api::LogParams { tail_lines: Some(40), ..Default::default() };
                    if let Ok(log) = pods.logs(&driver, &tail).await {
                        eprintln!("--- spark driver {driver} failed; its log ends ---\n{log}");
                    }
                    let agent_log = spark_cluster().info.kubeconfig.with_file_name("logs").join("node-agent.log");
                    let agent = std::fs::read_to_string(agent_log).unwrap_or_default();
                    let about: Vec<&str> = agent.lines().filter(|l| l.contains(driver.as_str())).collect();
                    eprintln!("--- what the node agent says of {driver} ---\n{}", about.join("\n"));
                    let message = match terminated {
                        Some(t) => format!(
                            "driver container failed with ExitCode: {}, Reason: {}",
                            t.exit_code,
                            t.reason.unwrap_or_default()
                        ),
                        None => "driver container status missing".to_string(),
                    };
                    json!({"applicationState": {"state": "FAILED", "errorMessage": message}, "terminationTime": now})
                }
                _ => return Ok(()),
            }
        }
        _ => return Ok(()),
    };
    patch_status(apps, &name, status).await
}

async fn patch_status(apps: &Api<SparkApplication>, name: &str, status: Value) -> Result<(), kube::Error> {
    apps.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await.map(drop)
}

/// Spark's memory (`1g`, `512m`) in MiB.
fn mebibytes(spark_memory: &str) -> u64 {
    let (digits, unit) = spark_memory.split_at(spark_memory.find(|c: char| !c.is_ascii_digit()).unwrap_or(spark_memory.len()));
    let n: u64 = digits.parse().unwrap_or(0);
    match unit.to_ascii_lowercase().as_str() {
        "k" => n / 1024,
        "g" => n * 1024,
        "t" => n * 1024 * 1024,
        _ => n,
    }
}

/// The driver pod spark-submit creates for `app` in cluster mode, with
/// what the Spark operator's webhook adds (volumes, mounts, environment,
/// security), its memory the heap and the overhead (Spark's default for
/// Python: 40 %, at least 384 MiB).
fn driver_pod(app: &SparkApplication) -> Pod {
    let name = app.name_any();
    let spec = &app.spec;
    let driver = &spec.driver;
    let mounted: Vec<&str> = driver.volume_mounts.iter().map(|m| m.name.as_str()).collect();
    let volumes: Vec<_> = spec.volumes.iter().filter(|v| mounted.contains(&v.name.as_str())).collect();
    let mut args = Vec::new();
    for (key, value) in &spec.spark_conf {
        args.extend(["--conf".to_string(), format!("{key}={value}")]);
    }
    for (key, value) in &spec.hadoop_conf {
        args.extend(["--conf".to_string(), format!("spark.hadoop.{key}={value}")]);
    }
    args.push(spec.main_application_file.clone());
    args.extend(spec.arguments.iter().cloned());
    let mut labels = driver.labels.clone();
    labels.extend(BTreeMap::from([
        ("spark-role".to_string(), "driver".to_string()),
        ("spark-app-name".to_string(), name.clone()),
        ("sparkoperator.k8s.io/app-name".to_string(), name.clone()),
        ("sparkoperator.k8s.io/launched-by-spark-operator".to_string(), "true".to_string()),
    ]));
    let heap = mebibytes(driver.memory.as_deref().unwrap_or("1g"));
    let overhead = driver.memory_overhead.as_deref().map(mebibytes).unwrap_or((heap * 2 / 5).max(384));
    let memory = format!("{}Mi", heap + overhead);
    let mut limits = json!({"memory": memory});
    if let Some(cpu) = &driver.core_limit {
        limits["cpu"] = json!(cpu);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-driver"), "namespace": app.namespace(), "labels": labels,
            "annotations": driver.annotations,
            "ownerReferences": [{"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication", "name": name,
                "uid": app.uid(), "controller": true, "blockOwnerDeletion": true}]},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": driver.service_account,
            "nodeSelector": driver.node_selector,
            "tolerations": driver.tolerations,
            "securityContext": driver.pod_security_context,
            "volumes": volumes,
            "containers": [{
                "name": DRIVER_CONTAINER,
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "args": args,
                "env": driver.env,
                "envFrom": driver.env_from,
                "volumeMounts": driver.volume_mounts,
                "securityContext": driver.security_context,
                "resources": {"requests": {"cpu": driver.cores.unwrap_or(1).to_string(), "memory": memory}, "limits": limits},
            }],
        },
    }))
    .expect("a driver pod")
}

fn object(kind: &str, name: &str, spec: Value) -> String {
    json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}).to_string()
}

fn sql_segment(name: &str, sql: &str, engine: &str) -> String {
    object("Segment", name, json!({"definition": {"sql": sql}, "compute": {"engine": engine}}))
}

/// A ComputeClass for `tenant` whose Spark settings are `spark` (none:
/// Spark not enabled), and the namespace labelled with it.
fn class_for(tenant: &Tenant, spark: Option<Value>) -> String {
    let name = format!("{}-class", tenant.namespace);
    let mut spec = json!({"allowedSourcePrefixes": [format!("s3://{}/", tenant.lake_bucket)]});
    if let Some(spark) = spark {
        spec["spark"] = spark;
    }
    let output = tenant.cluster.apply("default", &object("ComputeClass", &name, spec));
    assert!(output.success(), "the ComputeClass: {}", output.stderr);
    tenant.cluster.kubectl_ok(&[
        "label",
        "--overwrite",
        "namespace",
        &tenant.namespace,
        &format!("segmentation.dev/compute-class={name}"),
    ]);
    name
}

fn spark_settings() -> Value {
    json!({"image": SPARK_IMAGE, "sparkVersion": "4.0.1", "serviceAccountName": "spark-driver", "runAsUser": SPARK_USER,
        "driver": {"cores": 1, "memory": "1g", "memoryOverhead": "1g"},
        "executor": {"instances": 2, "cores": 1, "memory": "1g"},
        "sparkConf": {"spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"}})
}

fn member(serving: &Serving, namespace: &str, segment: &str, user: u32) -> bool {
    let (status, body) = serving.get(&format!("/v1/namespaces/{namespace}/segments/{segment}/members/u{user:07}"));
    assert_eq!(status, 200, "{body}");
    body["member"] == true
}

fn stalled(tenant: &Tenant, name: &str) -> Value {
    let segment = tenant.wait_for_segment(name, RUN, |s| is_true(s, "Stalled"));
    condition(&segment, "Stalled").expect("a Stalled condition").clone()
}

const ORDERS: &str = "user_id,amount\nu0000001,10\nu0000002,250\nu0000003,300\nu0000004,99\nu0000005,101\n";

/// [`ORDERS`] in the tenant's lake, declared as its `orders` table.
fn orders_in_the_lake(tenant: &Tenant) {
    put_object(&tenant.lake_bucket, "orders/orders.csv", ORDERS);
    let lake = &tenant.lake_bucket;
    tenant.apply(&object(
        "SegmentSource",
        "orders",
        json!({"table": "orders", "uri": format!("s3://{lake}/orders/"), "format": "csv"}),
    ));
}

#[test]
fn a_spark_segment_runs_as_a_spark_application_with_the_classs_settings() {
    let cluster = spark_cluster();
    let tenant = Tenant::new("spark");
    let namespace = tenant.namespace.clone();
    cluster.kubectl_ok(&["create", "serviceaccount", "spark-driver", "-n", &namespace]);
    class_for(&tenant, Some(spark_settings()));
    orders_in_the_lake(&tenant);
    let big = "SELECT user_id FROM orders WHERE amount > 100";
    tenant.apply(&sql_segment("spark-spenders", big, "spark"));
    tenant.apply(&sql_segment("datafusion-spenders", big, "datafusion"));
    tenant.apply(&sql_segment("spark-typo", "SELECT user_id FROM orders WHERE no_such_column > 100", "spark"));
    let _spark_operator = SparkOperatorSimulation::start(&namespace);
    let _operator = Operator::start_with_values(&tenant, &["spark.enabled=true"], &["--spark-applications"]);
    let serving = Serving::start(&tenant);

    // The compute is a SparkApplication named as its Job would be, owned
    // by the Segment, with the class's image, account, resources and conf.
    cluster.wait_until("the SparkApplication", RUN, || {
        tenant.kubectl(&["get", "sparkapplication", "spark-spenders-v1-compute"]).success()
    });
    let app = cluster.get_json(&namespace, "sparkapplication", "spark-spenders-v1-compute").expect("the SparkApplication");
    let owner = &app["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("Segment"), Some("spark-spenders")), "{owner}");
    assert_eq!(owner["controller"], true);
    let labels = &app["metadata"]["labels"];
    assert_eq!(
        (labels["segmentation.dev/version"].as_str(), labels["segmentation.dev/job-kind"].as_str()),
        (Some("1"), Some("compute"))
    );
    let spec = &app["spec"];
    assert_eq!((spec["type"].as_str(), spec["mode"].as_str()), (Some("Python"), Some("cluster")));
    assert_eq!(spec["image"], SPARK_IMAGE);
    assert_eq!(spec["mainApplicationFile"], DRIVER_PROGRAM);
    assert_eq!(spec["arguments"], json!(["--task-file", "/etc/segment-task/task.json"]));
    assert_eq!(spec["sparkConf"], spark_settings()["sparkConf"]);
    assert_eq!(spec["driver"]["serviceAccount"], "spark-driver");
    assert_eq!((spec["driver"]["cores"].as_i64(), spec["driver"]["memory"].as_str()), (Some(1), Some("1g")));
    assert_eq!((spec["executor"]["instances"].as_i64(), spec["executor"]["memory"].as_str()), (Some(2), Some("1g")));
    assert_eq!(spec["driver"]["envFrom"][0]["secretRef"]["name"], "segment-credentials");
    assert_eq!(spec["driver"]["podSecurityContext"]["runAsUser"], SPARK_USER);
    assert_eq!(spec["driver"]["securityContext"]["readOnlyRootFilesystem"], true);
    let task: Value = serde_json::from_str(spec["driver"]["annotations"]["segmentation.dev/task"].as_str().expect("the task"))
        .expect("the task is JSON");
    assert_eq!((task["engine"].as_str(), task["version"].as_u64()), (Some("spark"), Some(1)), "{task}");
    let mounts = spec["driver"]["volumeMounts"].as_array().expect("mounts");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/etc/segment-task" && m["readOnly"] == true), "{mounts:?}");
    // No compute Job for a Spark Segment.
    assert!(!tenant.kubectl(&["get", "job", "spark-spenders-v1-compute"]).success());

    // The run completes, and the version holds what DataFusion finds.
    let spark = tenant.wait_for_segment("spark-spenders", RUN, |s| active_version(s) == Some(1));
    let datafusion = tenant.wait_for_segment("datafusion-spenders", RUN, |s| active_version(s) == Some(1));
    assert_eq!(spark["status"]["members"], 3, "{:#}", spark["status"]);
    assert_eq!(spark["status"]["members"], datafusion["status"]["members"]);
    for user in 1..=5 {
        let expected = [2, 3, 5].contains(&user);
        assert_eq!(member(&serving, &namespace, "spark-spenders", user), expected, "u{user}");
        assert_eq!(member(&serving, &namespace, "datafusion-spenders", user), expected, "u{user}");
    }
    let app = cluster.get_json(&namespace, "sparkapplication", "spark-spenders-v1-compute").expect("the SparkApplication");
    assert_eq!(app["status"]["applicationState"]["state"], "COMPLETED");

    // A definition Spark cannot run fails its version with the driver's
    // reason (its termination message), not the Spark operator's.
    let typo = stalled(&tenant, "spark-typo");
    assert_eq!(typo["reason"], "RunFailed", "{typo}");
    let segment = tenant.segment("spark-typo");
    let versions = segment["status"]["versions"].as_array().unwrap();
    let failed = versions.iter().find(|v| v["reason"] == "UnknownColumn").unwrap_or_else(|| panic!("{versions:#?}"));
    assert_eq!(failed["state"], "Failed", "{failed}");
    assert!(failed["message"].as_str().unwrap_or_default().contains("no_such_column"), "{failed}");

    // Deleting the Segment deletes its SparkApplications (and with them,
    // their driver pods).
    let output = tenant.kubectl(&["delete", "segment", "spark-spenders", "--wait=true", "--timeout=120s"]);
    assert!(output.success(), "{}", output.stderr);
    let left = tenant.kubectl(&["get", "sparkapplications", "-l", "segmentation.dev/segment=spark-spenders", "-o", "name"]);
    assert_eq!(left.stdout.trim(), "", "the Segment's SparkApplications are gone");
}

#[test]
fn spark_is_refused_where_the_class_does_not_enable_it_or_the_operator_runs_none() {
    let cluster = spark_cluster();
    let tenant = Tenant::new("nospark");
    let namespace = tenant.namespace.clone();
    class_for(&tenant, None);
    orders_in_the_lake(&tenant);
    tenant.apply(&sql_segment("wants-spark", "SELECT user_id FROM orders", "spark"));
    tenant.apply(&sql_segment("plain", "SELECT user_id FROM orders", "datafusion"));

    // The class does not enable Spark: refused, naming the field.
    let operator = Operator::start_with_values(&tenant, &["spark.enabled=true"], &["--spark-applications"]);
    let refused = stalled(&tenant, "wants-spark");
    assert_eq!(refused["reason"], "NotAllowed", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.compute.engine") && message.contains("does not enable Spark"), "{message}");
    // The DataFusion Segment of the same class runs.
    tenant.wait_for_segment("plain", RUN, |s| active_version(s) == Some(1));
    drop(operator);

    // Spark settings in the class, but an operator that runs no Spark.
    class_for(&tenant, Some(spark_settings()));
    let _operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("wants-spark", RUN, |s| {
        condition(s, "Stalled").is_some_and(|c| c["message"].as_str().unwrap_or_default().contains("--spark-applications"))
    });
    let refused = condition(&tenant.segment("wants-spark"), "Stalled").unwrap().clone();
    assert_eq!(refused["reason"], "NotAllowed", "{refused}");
    assert!(refused["message"].as_str().unwrap_or_default().contains("spec.compute.engine"), "{refused}");
    // Nothing was launched for it.
    let apps = tenant.kubectl(&["get", "sparkapplications", "-o", "name"]);
    assert_eq!(apps.stdout.trim(), "", "{}", apps.stderr);
    let jobs = tenant.kubectl(&["get", "jobs", "-l", "segmentation.dev/segment=wants-spark", "-o", "name"]);
    assert_eq!(jobs.stdout.trim(), "");
    cluster.kubectl_ok(&["delete", "computeclass", &format!("{namespace}-class")]);
}
