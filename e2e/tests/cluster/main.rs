//! The operator, its CRDs, the chart and the kubectl plugin on a real
//! Kubernetes control plane (`e2e/local-cluster`: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler built from their Go modules,
//! and the node agent that runs pods as local processes; docs/testing.md).
//!
//! One cluster serves the whole binary; each test works in namespaces of
//! its own, with its own operator process, Redis and S3 bucket, so tests
//! run side by side.

mod crds;
mod events;
mod examples;
mod failover;
mod helm;
mod lifecycle;
mod plugin;
mod spark;
mod tenancy;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use segment_tests::cluster::{self, LocalCluster, Output};
pub use segment_tests::http_get;
use segment_tests::{free_port, shared_s3, RedisServer, S3Server, Signal};
use serde_json::Value;

/// The shared cluster, with the project's CRDs installed and Established.
pub fn cluster() -> &'static LocalCluster {
    static CRDS: std::sync::Once = std::sync::Once::new();
    let cluster = LocalCluster::shared();
    CRDS.call_once(|| cluster.install_crds(&std::fs::read_to_string(crds_file()).expect("the CRDs")));
    cluster
}

pub fn crds_file() -> PathBuf {
    cluster::workspace_root().join("crds/segmentation.dev.yaml")
}

/// A cluster of the test's own (for tests that change what every other
/// test relies on), with the CRDs installed; stop it with `stop()`.
pub fn own_cluster() -> &'static LocalCluster {
    let cluster: &'static LocalCluster = Box::leak(Box::new(LocalCluster::start()));
    cluster.install_crds(&std::fs::read_to_string(crds_file()).expect("the CRDs"));
    cluster
}

/// A tenant's namespace with what the operator needs there: a Redis, an S3
/// bucket for results and one for the lake, the worker's ServiceAccount
/// and the Secret its Jobs read their environment from.
pub struct Tenant {
    pub cluster: &'static LocalCluster,
    pub namespace: String,
    pub redis: RedisServer,
    pub results_uri: String,
    pub lake_bucket: String,
}

impl Tenant {
    pub fn new(prefix: &str) -> Tenant {
        Tenant::new_on(cluster(), prefix)
    }

    pub fn new_on(cluster: &'static LocalCluster, prefix: &str) -> Tenant {
        let namespace = cluster.namespace(prefix);
        let redis = RedisServer::start();
        let s3 = shared_s3();
        let results_bucket = format!("results-{namespace}");
        let lake_bucket = format!("lake-{namespace}");
        s3.create_bucket(&results_bucket);
        s3.create_bucket(&lake_bucket);
        let mut secret = vec!["create", "secret", "generic", "segment-credentials", "-n", &namespace];
        // S3 credentials only: compute and ingest Jobs touch no store.
        let literals: Vec<String> = s3.env().into_iter().map(|(key, value)| format!("--from-literal={key}={value}")).collect();
        secret.extend(literals.iter().map(String::as_str));
        cluster.kubectl_ok(&secret);
        cluster.kubectl_ok(&["create", "serviceaccount", "segment-worker", "-n", &namespace]);
        Tenant { cluster, namespace, redis, results_uri: format!("s3://{results_bucket}"), lake_bucket }
    }

    /// `kubectl apply --server-side` in this namespace; panics on failure.
    pub fn apply(&self, manifest: &str) {
        let output = self.cluster.apply(&self.namespace, manifest);
        assert!(output.success(), "kubectl apply: {}{}", output.stdout, output.stderr);
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        self.cluster.kubectl(&all)
    }

    pub fn segment(&self, name: &str) -> Value {
        self.cluster.get_json(&self.namespace, "segment", name).unwrap_or_else(|| panic!("segment {name} exists"))
    }

    /// Waits until the Segment's status satisfies `done`; on timeout the
    /// panic shows the last status.
    pub fn wait_for_segment(&self, name: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = std::time::Instant::now();
        loop {
            let segment = self.cluster.get_json(&self.namespace, "segment", name);
            if let Some(segment) = segment.as_ref().filter(|s| done(s)) {
                return segment.clone();
            }
            if start.elapsed() > timeout {
                let status = segment.map(|s| s["status"].clone()).unwrap_or_default();
                let jobs = self.kubectl(&["get", "jobs,pods", "-o", "wide"]).stdout;
                panic!("segment {}/{name}: not done within {timeout:?}; status:\n{status:#}\n{jobs}", self.namespace);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The status condition `type_` of an object, if any.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

pub fn is_true(object: &Value, type_: &str) -> bool {
    condition(object, type_).is_some_and(|c| c["status"] == "True")
}

/// `segment-operator run` as a process, acting with the ServiceAccount
/// token and RBAC that the chart renders for it (not the admin's).
pub struct Operator {
    child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Renders the chart's operator RBAC for a release watching
    /// `tenant.namespace`, applies it, and starts the operator with a token
    /// of the chart's operator ServiceAccount.
    pub fn start(tenant: &Tenant, extra_args: &[&str]) -> Operator {
        Operator::start_with(tenant, true, extra_args)
    }

    /// With `namespaced`, the operator watches the tenant's namespace only
    /// (a RoleBinding); otherwise every namespace (a ClusterRoleBinding).
    pub fn start_with(tenant: &Tenant, namespaced: bool, extra_args: &[&str]) -> Operator {
        Operator::spawn(tenant, namespaced, &format!("operator-{}", tenant.namespace), &[], extra_args)
    }

    /// A namespaced operator whose RBAC is rendered with chart `values`
    /// (`--set` arguments, e.g. `spark.enabled=true`).
    pub fn start_with_values(tenant: &Tenant, values: &[&str], extra_args: &[&str]) -> Operator {
        Operator::spawn(tenant, true, &format!("operator-{}", tenant.namespace), values, extra_args)
    }

    /// One of several replicas of a namespaced operator, with its own
    /// identity in the Lease (and in its User-Agent, which the API server's
    /// audit log records).
    pub fn replica(tenant: &Tenant, identity: &str, extra_args: &[&str]) -> Operator {
        Operator::spawn(tenant, true, identity, &[], extra_args)
    }

    fn spawn(tenant: &Tenant, namespaced: bool, identity: &str, values: &[&str], extra_args: &[&str]) -> Operator {
        let cluster = tenant.cluster;
        let namespace = &tenant.namespace;
        let watch = if namespaced { format!("operator.watchNamespace={namespace}") } else { "operator.watchNamespace=".into() };
        let mut helm_args =
            vec!["--set", &watch, "--show-only", "templates/operator-rbac.yaml", "--show-only", "templates/serviceaccounts.yaml"];
        for value in values {
            helm_args.extend(["--set", value]);
        }
        let rbac = helm_template(namespace, namespace, &helm_args);
        tenant.apply(&rbac);
        let service_account = format!("{namespace}-segment-operator");
        let token = cluster.service_account_token(namespace, &service_account);
        let dir = tempfile::tempdir().expect("a temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        cluster.token_kubeconfig(&kubeconfig, &token, namespace);
        let metrics_port = free_port();
        let log = dir.path().join("operator.log");
        let log_file = std::fs::File::create(&log).expect("a log file");
        let s3 = shared_s3();
        let child = Command::new(cluster::workspace_binary("segment-operator"))
            .arg("run")
            .args(if namespaced { vec!["--namespace", namespace.as_str()] } else { vec![] })
            .args(["--lease-namespace", namespace])
            .args(["--lease-name", &format!("{namespace}-segment-operator")])
            .args(["--redis-url", &tenant.redis.url(), "--results-uri", &tenant.results_uri])
            .args(["--worker-env-secret", "segment-credentials"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            // The worker asks for little so tests side by side fit the node.
            .args(["--worker-cpu-request", "10m", "--worker-memory-request", "64Mi"])
            .args(extra_args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .env("POD_NAME", identity)
            .envs(s3.env())
            .stdout(log_file.try_clone().expect("a log handle"))
            .stderr(log_file)
            .spawn()
            .expect("segment-operator starts");
        Operator { child, metrics_port, log, _dir: dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        segment_tests::signal(self.child.id(), signal);
    }

    /// Waits up to `timeout` for the process to exit; its exit code, or
    /// `None` if it still runs (or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("the operator's status") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("the operator's status").is_none()
    }

    /// A gauge or counter of the operator's /metrics (summed over labels);
    /// `None` when the endpoint does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (status, metrics) = http_get(self.metrics_port, "/metrics");
        (status == 200).then(|| {
            metrics
                .lines()
                .filter(|l| l.split([' ', '{']).next() == Some(name))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        })
    }

    /// Successful reconciles so far, from the operator's /metrics.
    pub fn reconciles(&self) -> u64 {
        self.reconciles_with("ok")
    }

    /// Reconciles that ended with `result` (ok, error) so far.
    pub fn reconciles_with(&self, result: &str) -> u64 {
        let (_, metrics) = http_get(self.metrics_port, "/metrics");
        let label = format!("result=\"{result}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with("segment_operator_reconciles_total") && l.contains(&label))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // A failing test shows what the operator said.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- operator log (last {} lines) ---", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `helm template` of the chart, as the release `release` in `namespace`.
pub fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let chart = cluster::workspace_root().join("charts/segment-operator");
    // The serving Deployment is rendered too (then left out by
    // --show-only): without a tokens Secret here, its auth is turned off.
    let output = cluster::run(
        cluster()
            .tool("helm")
            .arg("template")
            .arg(release)
            .arg(&chart)
            .args(["--namespace", namespace, "--set", "serving.auth.enabled=false"])
            .args(args),
    );
    assert!(output.success(), "helm template: {}", output.stderr);
    output.stdout
}

/// Copies the example lake (generated once per test binary, seed 42) into
/// the tenant's lake bucket, and returns the example manifests with their
/// `file://./lake/` sources pointed there.
pub fn example_manifests(tenant: &Tenant) -> (String, String) {
    let lake = examples::example_lake();
    examples::upload_dir(&lake, &tenant.lake_bucket, "");
    let root = cluster::workspace_root();
    let read = |file: &str| std::fs::read_to_string(root.join("examples").join(file)).expect("an example manifest");
    let to_s3 = |text: String| text.replace("file://./lake/", &format!("s3://{}/", tenant.lake_bucket));
    (to_s3(read("sources.yaml")), to_s3(read("segments.yaml")))
}

/// The serving API over a tenant's Redis, as a local process.
pub struct Serving {
    child: Child,
    pub port: u16,
}

impl Serving {
    /// A replica serving the tenant's segments from their index files,
    /// reading the results the operator writes.
    pub fn start(tenant: &Tenant) -> Serving {
        let (port, metrics_port) = (free_port(), free_port());
        let child = Command::new(cluster::workspace_binary("segment-serving"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis-url", &tenant.redis.url(), "--threads", "1"])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--results-uri", &tenant.results_uri, "--pod-name", &format!("serving-{port}")])
            .envs(shared_s3().env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("segment-serving starts");
        Serving { child, port }
    }

    /// GET a path; (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = http_get(self.port, path);
        (status, json_of(&body))
    }
}

/// The JSON object in an HTTP body, chunked or not (the part between the
/// first `{` and the last `}`); null when there is none.
pub fn json_of(body: &str) -> Value {
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => &body[a..=b],
        _ => "null",
    };
    serde_json::from_str(json).unwrap_or(Value::Null)
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The S3 server all tenants' buckets live on.
pub fn s3() -> &'static S3Server {
    shared_s3()
}

/// Writes one object to a bucket of the shared S3 server.
pub fn put_object(bucket: &str, key: &str, body: &str) {
    use object_store::{ObjectStoreExt, PutPayload};
    s3();
    let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().expect("an S3 client");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(store.put(&key.into(), PutPayload::from(body.as_bytes().to_vec()))).expect("an upload");
}

/// The keys under `prefix` in a bucket of the shared S3 server.
pub fn list_objects(bucket: &str, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    s3();
    let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().expect("an S3 client");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let prefix = object_store::path::Path::from(prefix);
    runtime
        .block_on(store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .expect("a listing")
        .into_iter()
        .map(|meta| meta.location.to_string())
        .collect()
}
