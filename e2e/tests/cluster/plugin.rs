//! The kubectl plugin as users run it: `kubectl segment ...`, found by
//! kubectl on PATH, against the real API server with the operator doing the
//! rest: status, run, approve (refused for a version that is not held),
//! rollback and its clearing; and through an HTTPS proxy, as kubectl does.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use segment_tests::cluster::{run, workspace_binary, Output};
use serde_json::{json, Value};

use crate::{cluster, is_true, put_object, Operator, Tenant};

const RUN: Duration = Duration::from_secs(180);

/// A directory holding `kubectl-segment`, the way users install plugins.
fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::os::unix::fs::symlink(workspace_binary("kubectl-segment"), dir.path().join("kubectl-segment")).expect("a link");
    dir
}

fn kubectl_segment(plugins: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let cluster = cluster();
    let mut command = cluster.tool("kubectl");
    command.env("PATH", format!("{}:{}", plugins.display(), cluster.path_with_bin()));
    for (key, value) in env {
        command.env(key, value);
    }
    run(command.arg("segment").args(args))
}

fn active_version(segment: &Value) -> Option<u64> {
    segment["status"]["activeVersion"].as_u64()
}

#[test]
fn kubectl_segment_run_approve_rollback_and_status() {
    let tenant = Tenant::new("plugin");
    let ns = tenant.namespace.as_str();
    let plugins = plugin_dir();
    let segment = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-n", ns]);
        kubectl_segment(plugins.path(), &[], &all)
    };
    let list = |range: std::ops::RangeInclusive<u32>| {
        std::iter::once("user_id".to_string()).chain(range.map(|u| format!("u{u:07}"))).collect::<Vec<_>>().join("\n")
    };
    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(1..=10));
    tenant.apply(
        &json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "vip"},
                "spec": {"definition": {"static": {"uri": format!("s3://{}/lists/vip.csv", tenant.lake_bucket)}},
                         "rollover": {"maxChangeRatio": 0.2}}})
        .to_string(),
    );
    let _operator = Operator::start(&tenant, &[]);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));

    let status = segment(&["status", "vip"]);
    assert!(status.success(), "{}", status.stderr);
    assert!(status.stdout.contains("Ready:         True (VersionActive)"), "{}", status.stdout);
    assert!(status.stdout.contains("Active:        v1, 10 members"), "{}", status.stdout);

    put_object(&tenant.lake_bucket, "lists/vip.csv", &list(11..=20));
    let requested = segment(&["run", "vip"]);
    assert!(requested.success() && requested.stdout.contains("run requested"), "{}{}", requested.stdout, requested.stderr);
    tenant.wait_for_segment("vip", RUN, |s| is_true(s, "RolloverHeld"));

    let refused = segment(&["approve", "vip", "--version", "1"]);
    assert!(!refused.success(), "approving a version that is not held is refused");
    assert!(refused.stderr.contains("is not waiting for approval: held: v2"), "{}", refused.stderr);
    let approved = segment(&["approve", "vip", "--version", "2"]);
    assert!(approved.success(), "{}", approved.stderr);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));

    let pinned = segment(&["rollback", "vip", "--to-version", "1"]);
    assert!(pinned.success(), "{}", pinned.stderr);
    tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(1));
    let status = segment(&["status", "vip"]).stdout;
    assert!(status.contains("Pinned:        v1 (spec.pinVersion)"), "{status}");
    let cleared = segment(&["rollback", "vip", "--clear"]);
    assert!(cleared.success(), "{}", cleared.stderr);
    let unpinned = tenant.wait_for_segment("vip", RUN, |s| active_version(s) == Some(2));
    assert!(unpinned["spec"]["pinVersion"].is_null());
}

/// A minimal HTTP CONNECT proxy on loopback that records the targets it
/// was asked for and tunnels every one of them to 127.0.0.1.
fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets = Arc::new(Mutex::new(Vec::new()));
    let seen = targets.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap_or_default();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let Some(target) = request.strip_prefix("CONNECT ").and_then(|r| r.split_whitespace().next()) else { return };
                seen.lock().unwrap().push(target.to_string());
                let port = target.rsplit(':').next().unwrap_or("443");
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap_or(443))) else { return };
                let mut client = client;
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
                let (mut up_read, mut up_write) = (upstream.try_clone().unwrap(), upstream);
                let mut client_write = client.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut reader, &mut up_write);
                });
                let _ = std::io::copy(&mut up_read, &mut client_write);
            });
        }
    });
    (port, targets)
}

#[test]
fn kubectl_segment_goes_through_the_https_proxy_like_kubectl() {
    let cluster = cluster();
    let tenant = Tenant::new("proxy");
    tenant.apply(
        &json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "vip"},
                "spec": {"definition": {"static": {"uri": "s3://nowhere/list.csv"}}}})
        .to_string(),
    );
    // The API server by a name only the proxy can reach (its certificate
    // holds the name; no resolver on this machine knows it).
    let kubeconfig = std::fs::read_to_string(&cluster.info.kubeconfig).unwrap();
    let server = format!("https://kubernetes.default.svc:{}", cluster.info.api_port);
    let dir = tempfile::tempdir().unwrap();
    let behind_proxy = dir.path().join("kubeconfig");
    std::fs::write(&behind_proxy, kubeconfig.replace(&cluster.info.server, &server)).unwrap();
    let plugins = plugin_dir();
    let (proxy_port, targets) = connect_proxy();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let kubeconfig = behind_proxy.to_str().unwrap();

    let direct = kubectl_segment(plugins.path(), &[("KUBECONFIG", kubeconfig)], &["status", "vip", "-n", &tenant.namespace]);
    assert!(!direct.success(), "without the proxy the server's name does not resolve");

    let proxied = kubectl_segment(
        plugins.path(),
        &[("KUBECONFIG", kubeconfig), ("HTTPS_PROXY", &proxy)],
        &["status", "vip", "-n", &tenant.namespace],
    );
    assert!(proxied.success(), "{}{}", proxied.stdout, proxied.stderr);
    assert!(proxied.stdout.contains("Name:          vip"), "{}", proxied.stdout);
    let target = format!("kubernetes.default.svc:{}", cluster.info.api_port);
    assert!(targets.lock().unwrap().contains(&target), "the proxy tunnelled {:?}", targets.lock().unwrap());

    // NO_PROXY naming the server sends it direct again (and fails here).
    let bypassed = kubectl_segment(
        plugins.path(),
        &[("KUBECONFIG", kubeconfig), ("HTTPS_PROXY", &proxy), ("NO_PROXY", ".svc")],
        &["status", "vip", "-n", &tenant.namespace],
    );
    assert!(!bypassed.success(), "NO_PROXY bypasses the proxy");
}

/// The namespace comes from `-n`, else from the chosen context (current
/// or `--context`), as kubectl chooses it.
#[test]
fn kubectl_segment_chooses_the_context_and_namespace_as_kubectl_does() {
    let cluster = cluster();
    let (first, second) = (Tenant::new("context-a"), Tenant::new("context-b"));
    for tenant in [&first, &second] {
        tenant.apply(
            &json!({"apiVersion": "segmentation.dev/v1alpha1", "kind": "Segment", "metadata": {"name": "vip"},
                    "spec": {"description": format!("the one in {}", tenant.namespace),
                             "definition": {"static": {"uri": "s3://nowhere/list.csv"}}}})
            .to_string(),
        );
    }
    // The admin's kubeconfig with a second context in the other namespace.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(&cluster.info.kubeconfig, &kubeconfig).unwrap();
    let kubectl = |args: &[&str]| {
        let output = run(cluster.tool("kubectl").env("KUBECONFIG", &kubeconfig).args(args));
        assert!(output.success(), "kubectl {args:?}: {}", output.stderr);
    };
    kubectl(&["config", "set-context", "local", "--namespace", &first.namespace]);
    let user = "kubernetes-admin";
    kubectl(&["config", "set-context", "other", "--cluster", "local", "--user", user, "--namespace", &second.namespace]);

    let plugins = plugin_dir();
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let described = |args: &[&str]| {
        let output = kubectl_segment(plugins.path(), &env, args);
        assert!(output.success(), "{}", output.stderr);
        output.stdout.lines().find(|l| l.starts_with("Description:")).unwrap_or_default().to_string()
    };
    assert!(described(&["status", "vip"]).ends_with(&format!("the one in {}", first.namespace)));
    assert!(described(&["status", "vip", "--context", "other"]).ends_with(&format!("the one in {}", second.namespace)));
    assert!(described(&["status", "vip", "-n", &second.namespace]).ends_with(&format!("the one in {}", second.namespace)));
}
