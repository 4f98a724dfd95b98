//! The Helm chart (`charts/segment-operator`) held to the code it deploys:
//! its CRDs are the generated ones, every flag and environment variable it
//! gives a binary is one that binary accepts (and the required ones are
//! there), its images are the Dockerfile's targets, and its RBAC covers
//! exactly the API resources the operator calls.
//!
//! Helm renders the chart through `python3 tests/lint_chart.py render`
//! (helm-python-sdk, which `.ci/run` installs). The binaries are the ones
//! `cargo test --workspace` builds into the target directory above this
//! test's executable (cargo builds the binaries of every package that has
//! integration tests); after changing a binary's flags alone, run the
//! workspace's tests, or `cargo build --bins` first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The values files the chart is checked with: its defaults, and every
/// optional feature on.
/// The defaults (with the one value an install must give) and every feature on.
const VALUES: [Option<&str>; 2] = [Some("ci/minimal-values.yaml"), Some("ci/all-features-values.yaml")];

/// Environment variables the chart may set that are not flags: read by the
/// object_store crate (S3, in the operator) and by tracing's EnvFilter.
const NON_FLAG_ENV: [&str; 5] = ["AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RUST_LOG"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ is inside the workspace").to_path_buf()
}

fn chart_dir() -> PathBuf {
    root().join("charts/segment-operator")
}

/// The objects Helm renders from the chart with a values file over its
/// defaults.
fn render(values: Option<&str>) -> Vec<Value> {
    let mut command = Command::new("python3");
    command.arg(root().join("tests/lint_chart.py")).arg("render");
    if let Some(values) = values {
        command.arg("--values").arg(chart_dir().join(values));
    }
    let out = command.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "rendering the chart with {values:?} failed (is helm-python-sdk installed? .ci/run installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items: Vec<Value> = serde_json::from_slice(&out.stdout).expect("render prints JSON");
    items.into_iter().map(|item| item["object"].clone()).collect()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

struct Container {
    /// `Deployment/name/container`, for messages.
    at: String,
    image: String,
    args: Vec<String>,
    env: Vec<String>,
}

fn containers(objects: &[Value]) -> Vec<Container> {
    let mut found = Vec::new();
    for obj in objects.iter().filter(|o| o["kind"] == "Deployment") {
        for c in obj["spec"]["template"]["spec"]["containers"].as_array().expect("a Deployment has containers") {
            found.push(Container {
                at: format!(
                    "Deployment/{}/{}",
                    obj["metadata"]["name"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("?")
                ),
                image: c["image"].as_str().expect("a container has an image").to_string(),
                args: strings(&c["args"]),
                env: c["env"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str().map(str::to_string)).collect(),
            });
        }
    }
    found
}

/// The binary an image runs: the last segment of its name, without the tag
/// (the Dockerfile's convention, checked below).
fn binary_of(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split([':', '@']).next().unwrap_or(name)
}

/// A workspace binary next to this test's executable (target/<profile>/).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its executable");
    let dir = exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is not built: run `cargo test --workspace` (which builds every package's binaries) or `cargo build --bins`",
        path.display()
    );
    path
}

/// What a command's `--help` says about its options.
struct Help {
    /// Long flag → its environment variable, if it has one.
    flags: BTreeMap<String, Option<String>>,
    /// Flags the usage line requires.
    required: BTreeSet<String>,
}

fn flag_name(token: &str) -> Option<String> {
    let rest = token.strip_prefix("--")?;
    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    (!name.is_empty()).then_some(name)
}

/// Parses clap's `--help`: an option's block starts with a line whose first
/// non-blank character is `-`, and holds its `[env: NAME=...]` (`[env:
/// NAME]` when the value is hidden).
fn parse_help(text: &str) -> Help {
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') && line.starts_with(' ') {
            current = trimmed.split([' ', ',']).find_map(flag_name);
            if let Some(flag) = &current {
                flags.insert(flag.clone(), None);
            }
        }
        // The env note ends the option's first line or one below it.
        if let (Some(flag), Some(at)) = (&current, trimmed.find("[env: ")) {
            let name: String =
                trimmed[at + 6..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            flags.insert(flag.clone(), Some(name));
        }
    }
    let usage = text.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default();
    // Optional flags are inside [OPTIONS] or brackets; the rest are required.
    let mut required = BTreeSet::new();
    let mut depth = 0i32;
    for token in usage.split_whitespace() {
        if depth == 0 {
            if let Some(flag) = flag_name(token.trim_start_matches('[')).filter(|_| !token.starts_with('[')) {
                required.insert(flag);
            }
        }
        depth += token.matches('[').count() as i32 - token.matches(']').count() as i32;
    }
    Help { flags, required }
}

/// `--help` of `binary subcommands...`, with an empty environment so no
/// variable of this process shows up as a value or satisfies a flag.
fn help(binary: &Path, subcommands: &[String]) -> Help {
    let out = Command::new(binary).args(subcommands).arg("--help").env_clear().output().expect("the binary runs");
    assert!(
        out.status.success(),
        "`{} {} --help` failed: {}",
        binary.display(),
        subcommands.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_help(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn the_chart_crds_are_the_generated_crds() {
    let listing = |dir: PathBuf| -> BTreeMap<String, String> {
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
            .collect()
    };
    let generated = listing(root().join("crds"));
    let in_chart = listing(chart_dir().join("crds"));
    assert!(!generated.is_empty(), "crds/ holds no CRD");
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        in_chart.keys().collect::<Vec<_>>(),
        "charts/segment-operator/crds/ must hold the files of crds/: cp crds/*.yaml charts/segment-operator/crds/"
    );
    for (file, text) in &generated {
        assert!(
            in_chart[file] == *text,
            "charts/segment-operator/crds/{file} differs from crds/{file}: cp crds/*.yaml charts/segment-operator/crds/"
        );
    }
}

#[test]
fn the_chart_installs_the_crates_version() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion (the default image tag) must be the workspace version"
    );
    // The operator's built-in worker image and the chart's agree, so an
    // operator run outside the chart launches the same workers.
    let out = Command::new(binary("segment-operator")).args(["run", "--help"]).env_clear().output().unwrap();
    let expected = format!("[default: segment-operator/segment-worker:{}]", env!("CARGO_PKG_VERSION"));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&expected), "segment-operator run --help lacks {expected}");
    let worker_image = containers(&render(VALUES[0]))
        .into_iter()
        .flat_map(|c| c.args)
        .find_map(|a| a.strip_prefix("--worker-image=").map(str::to_string));
    assert_eq!(worker_image, Some(format!("segment-operator/segment-worker:{}", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn every_flag_and_variable_the_chart_sets_is_accepted_by_its_binary() {
    let mut checked = BTreeSet::new();
    for values in VALUES {
        for container in containers(&render(values)) {
            let at = format!("{} ({})", container.at, values.unwrap_or("default values"));
            let binary = binary(binary_of(&container.image));
            let subcommands: Vec<String> = container.args.iter().take_while(|a| !a.starts_with('-')).cloned().collect();
            let options = &container.args[subcommands.len()..];
            let help = help(&binary, &subcommands);
            let command = format!("{} {}", binary_of(&container.image), subcommands.join(" "));

            for arg in options {
                let flag = flag_name(arg).unwrap_or_else(|| panic!("{at}: argument {arg:?} is not a --flag[=value]"));
                assert!(help.flags.contains_key(&flag), "{at}: `{command}` has no flag --{flag} (from {arg:?})");
            }
            // Every variable is a flag's, or one a library reads.
            let by_env: BTreeMap<&str, &str> =
                help.flags.iter().filter_map(|(flag, env)| env.as_deref().map(|e| (e, flag.as_str()))).collect();
            for name in &container.env {
                assert!(
                    by_env.contains_key(name.as_str()) || NON_FLAG_ENV.contains(&name.as_str()),
                    "{at}: sets {name}, which is neither a flag's variable of `{command}` ({:?}) nor one of {NON_FLAG_ENV:?}",
                    by_env.keys().collect::<Vec<_>>()
                );
            }
            // What the binary cannot start without is given one way or the other.
            let given: BTreeSet<String> = options.iter().filter_map(|a| flag_name(a)).collect();
            for flag in &help.required {
                let env = help.flags.get(flag).cloned().flatten();
                assert!(
                    given.contains(flag) || env.as_ref().is_some_and(|e| container.env.contains(e)),
                    "{at}: `{command}` requires --{flag} (or {env:?}); the chart sets neither"
                );
            }
            // And clap accepts the arguments as given, values included: it
            // parses them all before acting on the trailing --help.
            let out = Command::new(&binary).args(&container.args).arg("--help").env_clear().output().unwrap();
            assert!(
                out.status.success(),
                "{at}: `{command}` rejects the chart's arguments {:?}: {}",
                container.args,
                String::from_utf8_lossy(&out.stderr)
            );
            checked.insert(command.trim().to_string());
        }
    }
    // The all-features values reach every binary the chart runs.
    let expected: BTreeSet<String> =
        ["segment-operator run", "segment-serving", "segment-worker realtime"].map(String::from).into();
    assert_eq!(checked, expected);
}

#[test]
fn the_chart_images_are_the_dockerfile_targets() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("a Dockerfile at the root");
    let mut entrypoints = BTreeMap::new();
    let mut target = String::new();
    for line in dockerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"FROM") {
            target =
                words.iter().position(|w| w.eq_ignore_ascii_case("AS")).map(|i| words[i + 1].to_string()).unwrap_or_default();
        } else if let Some(json) = line.strip_prefix("ENTRYPOINT ") {
            let argv: Vec<String> = serde_json::from_str(json).expect("ENTRYPOINT in exec form");
            let program = Path::new(&argv[0]).file_name().unwrap().to_string_lossy().into_owned();
            entrypoints.insert(target.clone(), program);
        }
    }
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap()).unwrap();
    for (target, component) in [("operator", "operator"), ("serving", "serving"), ("worker", "worker")] {
        let repository = values[component]["image"]["repository"].as_str().expect("an image repository");
        let program = entrypoints.get(target).unwrap_or_else(|| panic!("Dockerfile has no target {target} with an ENTRYPOINT"));
        assert_eq!(
            binary_of(repository),
            program,
            "the chart's {component} image must run the Dockerfile target {target}'s binary"
        );
        // A binary of the workspace.
        binary(program);
    }
}

#[test]
fn the_operator_rbac_grants_what_the_operator_calls_and_nothing_else() {
    // The resources the operator's code reaches, from the Api<K> types it
    // builds and the calls that go to subresources or other APIs.
    let mut used = BTreeSet::new();
    let dir = root().join("operator/src");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let code = std::fs::read_to_string(&path).unwrap();
        // `Api<K>` types, and `api::<K>(...)`, the helper of controller.rs.
        for piece in code.split("Api<").skip(1).chain(code.split("api::<").skip(1)) {
            let kind: String = piece.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let resource = match kind.as_str() {
                "K" => continue, // the generic helper in controller.rs
                "Segment" => ("segmentation.dev", "segments"),
                "SegmentSource" => ("segmentation.dev", "segmentsources"),
                "Job" => ("batch", "jobs"),
                "Pod" => ("", "pods"),
                // A Job's FailedCreate Events (core/v1), read when it has no pod.
                "CoreEvent" => ("", "events"),
                "Lease" => ("coordination.k8s.io", "leases"),
                "ComputeClass" => ("segmentation.dev", "computeclasses"),
                "Namespace" => ("", "namespaces"),
                // The operator's Event publisher (events.rs).
                "KubeEvent" => ("events.k8s.io", "events"),
                // Spark runs (spark.rs), with --spark-applications only.
                "SparkApplication" => ("sparkoperator.k8s.io", "sparkapplications"),
                // An untyped watch (each Segment decoded on its own): the
                // type it erases says what it reaches.
                "DynamicObject" => {
                    let erased = code
                        .split("ApiResource::erase::<")
                        .nth(1)
                        .map(|p| p.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>());
                    match erased.as_deref() {
                        Some("Segment") => ("segmentation.dev", "segments"),
                        other => panic!("{} erases {other:?} for an Api<DynamicObject>: add it here", path.display()),
                    }
                }
                other => panic!(
                    "{} uses Api<{other}>: grant what it needs in charts/segment-operator/templates/operator-rbac.yaml \
                     (with a comment on why) and add it here",
                    path.display()
                ),
            };
            used.insert(resource);
        }
        if code.contains(".patch_status(") {
            used.insert(("segmentation.dev", "segments/status"));
        }
    }

    for values in VALUES {
        let objects = render(values);
        let operator = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["spec"]["template"]["spec"]["containers"][0]["name"] == "operator")
            .expect("the operator Deployment");
        let account = operator["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
        let args = strings(&operator["spec"]["template"]["spec"]["containers"][0]["args"]);
        let lease = args.iter().find_map(|a| a.strip_prefix("--lease-name=")).expect("--lease-name");

        let mut granted = BTreeSet::new();
        for role in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
            for rule in role["rules"].as_array().unwrap() {
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        granted.insert((group.clone(), resource));
                    }
                }
                if strings(&rule["resources"]) == ["leases"] && !strings(&rule["resourceNames"]).is_empty() {
                    assert_eq!(strings(&rule["resourceNames"]), [lease], "the Lease rule must name the operator's --lease-name");
                }
            }
        }
        // SparkApplications are reached only when the chart turns Spark on.
        let spark = args.iter().any(|a| a == "--spark-applications");
        let used: BTreeSet<(String, String)> = used
            .iter()
            .filter(|(group, _)| spark || *group != "sparkoperator.k8s.io")
            .map(|(g, r)| (g.to_string(), r.to_string()))
            .collect();
        assert_eq!(granted, used, "RBAC ({values:?}) must grant the resources operator/src uses, no more and no fewer");

        for binding in objects.iter().filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding") {
            for subject in binding["subjects"].as_array().unwrap() {
                assert_eq!(subject["name"], account, "{} binds someone other than the operator", binding["metadata"]["name"]);
            }
        }
    }
}

/// The pod's grace period leaves the operator its whole
/// `--shutdown-grace-seconds` to finish reconciles and release the Lease.
#[test]
fn the_pods_grace_period_outlasts_the_operators_shutdown_grace() {
    for values in VALUES {
        let objects = render(values);
        let operator = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["spec"]["template"]["spec"]["containers"][0]["name"] == "operator")
            .expect("the operator Deployment");
        let args = strings(&operator["spec"]["template"]["spec"]["containers"][0]["args"]);
        let grace: u64 =
            args.iter().find_map(|a| a.strip_prefix("--shutdown-grace-seconds=")).expect("the flag").parse().unwrap();
        let pod_grace = operator["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().expect("set");
        assert_eq!(pod_grace, grace + 10, "{values:?}");
    }
}
