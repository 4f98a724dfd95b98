//! A real Kubernetes control plane for tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler built from their Go modules,
//! and the node agent that plays the kubelet, started by
//! `e2e/local-cluster` (docs/testing.md says what is real and what is
//! simulated).
//!
//! Starting one takes seconds, so a test binary shares one cluster
//! ([`LocalCluster::shared`]) and each test works in a namespace of its
//! own ([`LocalCluster::namespace`]); a test that stops a component starts
//! a cluster of its own ([`LocalCluster::start`]). The cluster stops when
//! its handle is dropped, and also when the test process exits without
//! dropping it (the shared one): `up --parent-pid` watches the process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The project's CRDs, by name (`crds/segmentation.dev.yaml`).
pub const PROJECT_CRDS: [&str; 3] =
    ["segments.segmentation.dev", "segmentsources.segmentation.dev", "computeclasses.segmentation.dev"];

/// The image references the node agent runs as the workspace's binaries.
/// They are the defaults of the operator and the chart.
pub const WORKER_IMAGE: &str = concat!("segment-operator/segment-worker:", env!("CARGO_PKG_VERSION"));
pub const OPERATOR_IMAGE: &str = concat!("segment-operator/segment-operator:", env!("CARGO_PKG_VERSION"));
pub const SERVING_IMAGE: &str = concat!("segment-operator/segment-serving:", env!("CARGO_PKG_VERSION"));

/// The repository's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A binary of the workspace, built by `cargo test --workspace` next to
/// the running test binary (target/<profile>/NAME), or next to a running
/// benchmark binary of the same profile.
pub fn workspace_binary(name: &str) -> PathBuf {
    let running = std::env::current_exe().expect("the running binary's path");
    // target/<profile>/deps/<test>-<hash> or target/<profile>/<bench>
    let mut profile_dir = running.parent().expect("a target directory");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("a target profile directory");
    }
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test --workspace` (or `cargo build -p {}` first)",
        path.display(),
        name.trim_start_matches("kubectl-")
    );
    path
}

/// A command's exit code (-1 when killed by a signal), stdout and stderr.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Ports and paths of a running cluster (`DIR/cluster.json`).
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub server: String,
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    pub api_port: u16,
    pub audit_log: PathBuf,
}

/// A running local control plane.
pub struct LocalCluster {
    pub info: ClusterInfo,
    dir: PathBuf,
    // Keeps the directory for the cluster's lifetime.
    _temp: Option<TempDir>,
}

fn script() -> PathBuf {
    workspace_root().join("e2e/local-cluster")
}

impl LocalCluster {
    /// Starts a cluster of its own in a new temporary directory, whose node
    /// runs the workspace's worker, operator and serving binaries for their
    /// default images.
    pub fn start() -> LocalCluster {
        let images = [(WORKER_IMAGE, "segment-worker"), (OPERATOR_IMAGE, "segment-operator"), (SERVING_IMAGE, "segment-serving")]
            .map(|(image, binary)| (image, workspace_binary(binary)));
        LocalCluster::start_in_temp(&images)
    }

    /// Starts a cluster of its own whose node knows no image: for a
    /// benchmark that completes the Jobs itself and runs no pod.
    pub fn start_without_images() -> LocalCluster {
        LocalCluster::start_in_temp(&[])
    }

    fn start_in_temp(images: &[(&str, PathBuf)]) -> LocalCluster {
        let temp = tempfile::Builder::new().prefix("local-cluster-").tempdir().expect("a temp dir");
        let dir = temp.path().to_path_buf();
        let mut cluster = LocalCluster::start_with(&dir, images);
        cluster._temp = Some(temp);
        cluster
    }

    /// Starts a cluster in `dir` (kept after the cluster stops) whose node
    /// runs `images` (reference, program) as local processes.
    fn start_with(dir: &Path, images: &[(&str, PathBuf)]) -> LocalCluster {
        assert!(
            Command::new("go").arg("version").output().is_ok_and(|o| o.status.success()),
            "`go` is not installed: the local control plane is built from Go modules (.ci/run installs Go)"
        );
        let mut command = Command::new(script());
        command.arg("up").arg("--parent-pid").arg(std::process::id().to_string());
        for (image, path) in images {
            command.arg("--image").arg(format!("{image}={}", path.display()));
        }
        // Room for the Jobs of tests running side by side; a test of an
        // unschedulable pod asks for more than this.
        command.args(["--node-cpu", "64", "--node-memory", "256Gi"]);
        command.arg(dir);
        let output = run(&mut command);
        assert!(output.success(), "local-cluster up failed:\n{}\n{}", output.stdout, output.stderr);
        let info: Value = serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).expect("cluster.json"))
            .expect("cluster.json is JSON");
        let text = |key: &str| info[key].as_str().unwrap_or_default().to_string();
        LocalCluster {
            info: ClusterInfo {
                server: text("server"),
                kubeconfig: text("kubeconfig").into(),
                bin: text("bin").into(),
                api_port: info["apiPort"].as_u64().unwrap_or_default() as u16,
                audit_log: text("auditLog").into(),
            },
            dir: dir.to_path_buf(),
            _temp: None,
        }
    }

    /// One cluster for the whole test binary.
    pub fn shared() -> &'static LocalCluster {
        static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
        CLUSTER.get_or_init(LocalCluster::start)
    }

    /// A tool of the cluster's bin/ (kubectl, helm, kstatus) with the
    /// admin's kubeconfig and bin/ first on PATH (so `kubectl segment`
    /// finds plugins put there).
    pub fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.info.bin.join(name));
        command.env("KUBECONFIG", &self.info.kubeconfig).env("PATH", self.path_with_bin());
        command
    }

    /// PATH with the cluster's bin/ in front.
    pub fn path_with_bin(&self) -> String {
        format!("{}:{}", self.info.bin.display(), std::env::var("PATH").unwrap_or_default())
    }

    /// Runs kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        run(self.tool("kubectl").args(args))
    }

    /// Runs kubectl as the admin and returns its stdout; panics on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(output.success(), "kubectl {}: {}{}", args.join(" "), output.stdout, output.stderr);
        output.stdout
    }

    /// `kubectl apply --server-side` of a manifest given as text.
    pub fn apply(&self, namespace: &str, manifest: &str) -> Output {
        run_with_stdin(self.tool("kubectl").args(["apply", "--server-side", "-n", namespace, "-f", "-"]), manifest)
    }

    /// The object as JSON (`kubectl get -o json`), `None` when absent.
    pub fn get_json(&self, namespace: &str, resource: &str, name: &str) -> Option<Value> {
        let output = self.kubectl(&["get", "-n", namespace, resource, name, "-o", "json"]);
        if !output.success() {
            assert!(output.stderr.contains("NotFound"), "kubectl get {resource} {name}: {}", output.stderr);
            return None;
        }
        Some(serde_json::from_str(&output.stdout).expect("kubectl prints JSON"))
    }

    /// Creates a namespace with a name of its own that starts with `prefix`.
    pub fn namespace(&self, prefix: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        self.kubectl_ok(&["create", "namespace", &name]);
        // Pods need the namespace's default ServiceAccount, which the
        // controller manager creates a moment later.
        self.wait_until(&format!("ServiceAccount {name}/default"), Duration::from_secs(30), || {
            self.kubectl(&["get", "serviceaccount", "default", "-n", &name]).success()
        });
        name
    }

    /// Waits for `ready`, polling; panics with `what` after `timeout`.
    /// Applies CRDs (the project's, or a variant of them) and waits until
    /// each of [`PROJECT_CRDS`] is Established and their OpenAPI is
    /// published.
    pub fn install_crds(&self, crds: &str) {
        let output = self.apply("default", crds);
        assert!(output.success(), "applying the CRDs: {}", output.stderr);
        // Polled rather than `kubectl wait`, which fails on a CRD whose
        // status has no conditions yet (just created).
        for crd in PROJECT_CRDS {
            self.wait_until(&format!("{crd} to be Established"), Duration::from_secs(60), || {
                let output = self.kubectl(&["get", "crd", crd, "-o", "json"]);
                serde_json::from_str::<Value>(&output.stdout).is_ok_and(|crd| {
                    crd["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Established" && c["status"] == "True"))
                })
            });
        }
        // The API server publishes a new CRD's OpenAPI (what `kubectl
        // explain` and client-side tools read) a moment after Established.
        self.wait_until("the CRDs' OpenAPI to be published", Duration::from_secs(60), || {
            self.kubectl(&["get", "--raw", "/openapi/v3/apis/segmentation.dev/v1alpha1"]).success()
        });
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops one component (`kube-apiserver`, `node-agent`, ...).
    pub fn stop_component(&self, name: &str) {
        let output = run(Command::new(script()).arg("stop").arg(&self.dir).arg(name));
        assert!(output.success(), "local-cluster stop {name}: {}", output.stderr);
    }

    /// Starts a stopped component again with its first arguments.
    pub fn start_component(&self, name: &str) {
        let output = run(Command::new(script()).arg("start").arg(&self.dir).arg(name));
        assert!(output.success(), "local-cluster start {name}: {}", output.stderr);
    }

    /// A kube client acting as the cluster's admin.
    pub async fn client(&self) -> kube::Client {
        client_from_kubeconfig(&self.info.kubeconfig).await
    }

    /// Writes a kubeconfig that authenticates with `token` (a
    /// ServiceAccount's), so a process acts with exactly that account's
    /// RBAC, as it would in a pod.
    pub fn token_kubeconfig(&self, path: &Path, token: &str, namespace: &str) {
        let ca = self.dir.join("pki/ca.crt");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.info.server, "certificate-authority": ca}}],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "token", "namespace": namespace}}],
            "current-context": "local",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config).expect("JSON")).expect("a kubeconfig written");
    }

    /// A token of `namespace/service_account`, from the TokenRequest API.
    pub fn service_account_token(&self, namespace: &str, service_account: &str) -> String {
        let token = self.kubectl_ok(&["create", "token", service_account, "-n", namespace, "--duration", "2h"]);
        token.trim().to_string()
    }

    /// The lines of the API server's audit log (JSON events of writes).
    pub fn audit_events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.info.audit_log).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl LocalCluster {
    /// Stops every component (also done on drop).
    pub fn stop(&self) {
        let _ = Command::new(script()).arg("down").arg(&self.dir).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a client config");
    kube::Client::try_from(config).expect("a kube client")
}

/// Runs a command to completion and collects its output.
pub fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?} runs: {e}"));
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a command with `input` on its stdin.
pub fn run_with_stdin(command: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?} runs: {e}"));
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("stdin written");
    let output = child.wait_with_output().expect("the command ends");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
