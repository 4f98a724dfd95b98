#!/usr/bin/env python3
"""Lints, renders and validates the Helm chart charts/segment-operator.

    python3 tests/lint_chart.py            # the CI step (.ci/run)
    python3 tests/lint_chart.py render [--values FILE]
        # prints the rendered objects as JSON, for e2e/tests/chart.rs

Two real Helm v4 libraries do the work, each in its own process (each
embeds a Go runtime, and two Go runtimes in one process are not safe):

- helm-sdkpy runs `helm lint`. Its Lint takes no values
  and its report loses the messages' text, so the chart is copied with the
  values under test written into its values.yaml, and a failure is
  explained by the second library's report of the same lint.
- helm-python-sdk lints with values (strict: warnings fail too) and renders
  the templates offline, like `helm template`; helm-sdkpy can only render
  by installing into a live cluster.

The rendered objects are then validated with kubernetes-validate (strict,
Kubernetes 1.33 and the newest it knows) and held to the chart's promises:
hardened pods, probes, secrets only through secretKeyRef, RBAC without
wildcards. Run for the default values and for ci/all-features-values.yaml.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "segment-operator"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
# The defaults and the one value an install must give (the serving tokens).
MINIMAL = CHART / "ci" / "minimal-values.yaml"
RELEASE = "segments"
NAMESPACE = "segment-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion, and the
# version tests/validate_crds.sh checks the CRDs against).
OLDEST_KUBERNETES = "1.33.0"
# Kinds served by CRDs of other projects: kubernetes-validate has no schema
# for them.
FOREIGN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Kinds of this project's CRDs that the chart creates: checked against the
# CRD's own schema (the copy in the chart's crds/), strictly.
PROJECT_KINDS = {("segmentation.dev/v1alpha1", "ComputeClass")}
# Kinds that live outside any namespace.
CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding", "ComputeClass"}
# Helm lint severities.
WARNING = 2

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL: {message}", file=sys.stderr)


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of a values file over values.yaml: maps merge,
    anything else (lists included) replaces, null removes the key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_overrides(path: Path | None) -> dict:
    if path is None:
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


# ---------------------------------------------------------------- helm-sdkpy


def sdkpy_lint_in_process(chart_dir: str) -> None:
    """Runs in a child process: prints helm-sdkpy's lint report as JSON."""
    import asyncio

    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace=NAMESPACE)
    report = asyncio.run(helm_sdkpy.Lint(config).run(chart_dir))
    print(json.dumps(report))


def sdkpy_lint(values: dict) -> dict:
    """helm-sdkpy's lint of the chart with `values` as its values.yaml."""
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / CHART.name
        shutil.copytree(CHART, copy_dir)
        with open(copy_dir / "values.yaml", "w") as f:
            yaml.safe_dump(values, f, sort_keys=False)
        result = subprocess.run(
            [sys.executable, __file__, "_sdkpy-lint", str(copy_dir)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"helm-sdkpy lint crashed:\n{result.stderr}")
        return json.loads(result.stdout)


# ----------------------------------------------------------- helm-python-sdk


def helm_python_lint(overrides: dict) -> dict:
    import helm_python

    return helm_python.lint(
        str(CHART),
        overrides,
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{OLDEST_KUBERNETES}",
    )


def render(overrides: dict) -> list[dict]:
    """The chart's objects for these values, as `helm template` makes them:
    [{"template": path, "object": {...}}]. Raises on a schema or template
    error (the caller prints it)."""
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    # Rendering alone does not apply values.schema.json; `helm install` does.
    chart.validate_schema(overrides)
    manifests = chart.render(overrides, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for document in yaml.safe_load_all(text):
            if document:
                objects.append({"template": template, "object": document})
    return objects


def render_in_child(overrides_path: Path | None) -> list[dict]:
    args = [sys.executable, __file__, "render"]
    if overrides_path:
        args += ["--values", str(overrides_path)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return json.loads(result.stdout)


def render_with(overrides: dict) -> list[dict]:
    """The chart rendered with `overrides` as its values file."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(overrides, file)
    try:
        return render_in_child(Path(file.name))
    finally:
        os.unlink(file.name)


def render_error_in_child(overrides: dict) -> str:
    """Renders values that must be refused; returns Helm's message ("" when
    they were accepted)."""
    try:
        render_with(overrides)
        return ""
    except RuntimeError as error:
        return str(error)


# ------------------------------------------------------------------ checks


def check_lint(label: str, values_file: Path | None) -> None:
    defaults = yaml.safe_load(open(CHART / "values.yaml"))
    overrides = load_overrides(values_file)

    report = helm_python_lint(overrides)
    for message in report["messages"]:
        print(f"  helm-python-sdk lint [{label}] severity {message['severity']} {message['path']}: {message['error']}")
    problems = [m for m in report["messages"] if m["severity"] >= WARNING] + [
        {"error": e} for e in report["errors"] or []
    ]
    if problems:
        fail(f"helm lint ({label}, helm-python-sdk): {[p['error'] for p in problems]}")

    sdkpy = sdkpy_lint(deep_merge(defaults, overrides))
    severities = [m["Severity"] for m in sdkpy["Messages"] or []]
    print(f"  helm-sdkpy lint [{label}]: {sdkpy['TotalChartsLinted']} chart(s), message severities {severities}")
    if sdkpy["TotalChartsLinted"] != 1:
        fail(f"helm lint ({label}, helm-sdkpy) linted {sdkpy['TotalChartsLinted']} charts, expected 1")
    if any(s >= WARNING for s in severities) or sdkpy["Errors"]:
        fail(f"helm lint ({label}, helm-sdkpy) reported problems (their text is above, from helm-python-sdk)")


def pods(objects: list[dict]):
    for item in objects:
        obj = item["object"]
        if obj["kind"] == "Deployment":
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def project_schema(api_version: str, kind: str) -> dict:
    """The openAPIV3Schema of one of the chart's CRDs, made strict: an
    object with `properties` takes no others (the API server's strict field
    validation refuses unknown fields the same way)."""
    group, version = api_version.split("/")
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
                continue
            for served in crd["spec"]["versions"]:
                if served["name"] == version:
                    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])

                    def strict(node: object) -> None:
                        if isinstance(node, dict):
                            if "properties" in node and "additionalProperties" not in node \
                                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                                node["additionalProperties"] = False
                            for child in node.values():
                                strict(child)
                        elif isinstance(node, list):
                            for child in node:
                                strict(child)

                    strict(schema)
                    # apiVersion, kind and metadata are the API server's.
                    schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                                                metadata={"type": "object"})
                    return schema
    raise LookupError(f"no CRD in {CHART / 'crds'} serves {api_version} {kind}")


def check_objects(label: str, objects: list[dict]) -> None:
    import jsonschema
    import kubernetes_validate

    # Valid Kubernetes objects, strictly (no unknown or mistyped field).
    for item in objects:
        obj = item["object"]
        name = f"{obj['kind']}/{obj['metadata']['name']} ({item['template']})"
        if (obj["apiVersion"], obj["kind"]) in PROJECT_KINDS:
            try:
                jsonschema.validate(obj, project_schema(obj["apiVersion"], obj["kind"]))
            except jsonschema.ValidationError as error:
                at = "/".join(str(p) for p in error.absolute_path)
                fail(f"[{label}] {name} does not match its CRD at /{at}: {error.message}")
            if obj["metadata"].get("namespace") is not None:
                fail(f"[{label}] {name} is cluster-scoped and must have no namespace")
            continue
        for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if (obj["apiVersion"], obj["kind"]) not in FOREIGN_KINDS:
                    fail(f"[{label}] kubernetes-validate {version} has no schema for {name}")
            except kubernetes_validate.ValidationError as error:
                # The error's str() holds the whole schema; the path and
                # message are what says what is wrong.
                at = "/".join(str(p) for p in error.absolute_path)
                fail(f"[{label}] {name} is invalid for Kubernetes {version} at /{at}: {error.message}")
        if obj["metadata"].get("namespace") is None and obj["kind"] not in CLUSTER_KINDS:
            fail(f"[{label}] {name} has no namespace: `helm template | kubectl apply -n` would put it elsewhere")

    # What every pod of the chart promises (README, values.yaml).
    for name, spec in pods(objects):
        context = spec.get("securityContext", {})
        if context.get("runAsNonRoot") is not True or context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(f"[{label}] {name}: pod securityContext must set runAsNonRoot and seccompProfile RuntimeDefault")
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            if not (
                sc.get("runAsNonRoot") is True
                and sc.get("readOnlyRootFilesystem") is True
                and sc.get("allowPrivilegeEscalation") is False
                and sc.get("capabilities", {}).get("drop") == ["ALL"]
                and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
            ):
                fail(f"[{label}] {where}: container securityContext is not hardened: {sc}")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                if container.get(probe, {}).get("httpGet", {}).get("path") != path:
                    fail(f"[{label}] {where}: {probe} must GET {path}")
            if not container.get("resources", {}).get("requests"):
                fail(f"[{label}] {where}: no resource requests")
            for env in container.get("env", []):
                secret_like = any(word in env["name"] for word in ("PASSWORD", "SECRET", "TOKEN", "USERNAME"))
                if secret_like and "value" in env:
                    fail(f"[{label}] {where}: {env['name']} is a literal; secrets come from secretKeyRef")

    # RBAC: never a wildcard.
    for item in objects:
        obj = item["object"]
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in rule.get(field, []):
                    fail(f"[{label}] {obj['kind']}/{obj['metadata']['name']} has a wildcard in {field}: {rule}")


def check_all_features(objects: list[dict]) -> None:
    """The all-features values file must switch every optional object on,
    or the checks above never see them."""
    kinds: dict[str, int] = {}
    for item in objects:
        kinds[item["object"]["kind"]] = kinds.get(item["object"]["kind"], 0) + 1
    expected = {
        "Deployment": 3,  # operator, serving, realtime
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 1,
        "ServiceMonitor": 3,
        "NetworkPolicy": 3,
        "Service": 3,  # operator metrics, serving, realtime metrics
        "ComputeClass": 1,
    }
    for kind, count in expected.items():
        if kinds.get(kind, 0) != count:
            fail(f"[all features] {count} {kind} expected, {kinds.get(kind, 0)} rendered")
    deployments = {i["object"]["metadata"]["name"]: i["object"] for i in objects if i["object"]["kind"] == "Deployment"}
    serving = deployments.get(f"{RELEASE}-segment-operator-serving")
    if serving is None or "replicas" in serving["spec"]:
        fail("[all features] with autoscaling on, the serving Deployment must leave replicas to the HPA")
    # One watched namespace: the operator would not see Jobs elsewhere.
    if any(arg.startswith("--ingest-namespace") for arg in operator_args(objects)):
        fail("[all features] with operator.watchNamespace, ingest must run in the watched namespace")
    volumes = (serving or {}).get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
    if not any(v.get("secret", {}).get("secretName") == "segment-serving-tokens" for v in volumes):
        fail("[all features] the serving tokens file is not mounted from its Secret")
    # Spark on: the operator runs SparkApplications and may reach them.
    if "--spark-applications" not in operator_args(objects):
        fail("[all features] spark.enabled must pass --spark-applications to the operator")
    if not spark_rules(objects):
        fail("[all features] spark.enabled must grant the operator sparkapplications")


def check_default(objects: list[dict]) -> None:
    kinds = sorted({i["object"]["kind"] for i in objects})
    for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"):
        if kind in kinds:
            fail(f"[default] {kind} is optional and must be off by default")
    names = [i["object"]["metadata"]["name"] for i in objects if i["object"]["kind"] == "Deployment"]
    if names != [f"{RELEASE}-segment-operator", f"{RELEASE}-segment-operator-serving"]:
        fail(f"[default] expected the operator and serving Deployments only, got {names}")
    # Watching every namespace, the operator runs ingest Jobs in the release
    # namespace, where the store's credentials are (docs/security.md).
    expected = [f"--ingest-namespace={NAMESPACE}", "--ingest-env-secret=segment-ingest"]
    if not all(flag in operator_args(objects) for flag in expected):
        fail(f"[default] the operator must run ingest in the release namespace: {operator_args(objects)}")
    # Spark is off unless asked for: a cluster without the Spark operator's
    # CRD is not touched, and the operator is granted nothing of it.
    if "--spark-applications" in operator_args(objects) or spark_rules(objects):
        fail("[default] Spark must be off by default: no --spark-applications, no sparkapplications rule")


def spark_rules(objects: list[dict]) -> list[dict]:
    """The RBAC rules that reach the Spark operator's API group."""
    return [
        rule
        for item in objects
        if item["object"]["kind"] in ("Role", "ClusterRole")
        for rule in item["object"].get("rules", [])
        if "sparkoperator.k8s.io" in rule.get("apiGroups", [])
    ]


def operator_args(objects: list[dict]) -> list[str]:
    for name, spec in pods(objects):
        if name == f"{RELEASE}-segment-operator":
            return spec["containers"][0].get("args", [])
    return []


def check_serving_clients_only() -> None:
    """The serving API port admits the listed API clients only and the
    metrics port the listed scrapers only, with or without scrapers."""
    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}]
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for listed_scrapers in ([], scrapers):
        overrides = {
            "networkPolicy": {"enabled": True, "ingress": {"serving": clients, "metrics": listed_scrapers}},
            "serving": {"auth": {"existingSecret": "segment-serving-tokens"}},
        }
        objects = render_with(overrides)
        policies = [i["object"] for i in objects if i["object"]["kind"] == "NetworkPolicy"]
        serving = [p for p in policies if p["metadata"]["name"].endswith("-serving")]
        rules = serving[0]["spec"]["ingress"] if serving else []
        by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in rules}
        expected = {"http": clients, "metrics": listed_scrapers or None}
        if by_port != expected:
            fail(f"[serving clients only] with scrapers {listed_scrapers}: the ports must admit {expected}, not {by_port}")
        else:
            print(f"  serving: API port admits the clients only, metrics port {'the scrapers' if listed_scrapers else 'any peer'}")


def check_shards() -> None:
    """With serving.shards: 2, one Deployment, Service, PDB and HPA per
    shard, each replica told its shard and each Service selecting only its
    shard's pods; the NetworkPolicy still covers every shard."""
    overrides = {
        "serving": {"shards": 2, "auth": {"existingSecret": "segment-serving-tokens"}, "autoscaling": {"enabled": True}},
        "networkPolicy": {"enabled": True},
    }
    objects = render_with(overrides)
    check_objects("shards", objects)
    by_kind: dict[str, dict[str, dict]] = {}
    for item in objects:
        obj = item["object"]
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    base = f"{RELEASE}-segment-operator-serving"
    for shard in (0, 1):
        name = f"{base}-{shard}"
        deployment = by_kind.get("Deployment", {}).get(name)
        if deployment is None:
            fail(f"[shards] no Deployment {name}: {sorted(by_kind.get('Deployment', {}))}")
            continue
        label = deployment["spec"]["selector"]["matchLabels"].get("segmentation.dev/shard")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        if label != str(shard) or f"--shard={shard}/2" not in args:
            fail(f"[shards] {name}: selector shard label {label!r}, args {args}")
        service = by_kind.get("Service", {}).get(name, {})
        if service.get("spec", {}).get("selector", {}).get("segmentation.dev/shard") != str(shard):
            fail(f"[shards] Service {name} must select shard {shard}'s pods only: {service.get('spec', {}).get('selector')}")
        if by_kind.get("PodDisruptionBudget", {}).get(name) is None:
            fail(f"[shards] no PodDisruptionBudget {name}")
        hpa = by_kind.get("HorizontalPodAutoscaler", {}).get(name, {})
        if hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") != name:
            fail(f"[shards] HorizontalPodAutoscaler {name} must scale its own Deployment: {hpa.get('spec')}")
    if base in by_kind.get("Deployment", {}) or base in by_kind.get("Service", {}):
        fail(f"[shards] the unsharded {base} must not be rendered next to the shards")
    policy = by_kind.get("NetworkPolicy", {}).get(base, {})
    if "segmentation.dev/shard" in policy.get("spec", {}).get("podSelector", {}).get("matchLabels", {"x": 1}):
        fail("[shards] the serving NetworkPolicy must select every shard's pods")
    print("  serving: two shards, each with its Deployment (--shard i/2), Service, PDB and HPA")


def check_refusals() -> None:
    """Values the chart must refuse, each with a message that says why."""
    minimal = load_overrides(MINIMAL)
    # Each over the minimal values (so that only the case's own fault is
    # refused), but the last: the defaults alone, whose auth has no tokens.
    cases = [
        (deep_merge(minimal, {"serving": {"replica": 3}}), "replica"),  # a typo: additionalProperties false
        (deep_merge(minimal, {"operator": {"resultsUri": "segment-results"}}), "resultsUri"),  # not a URI
        (deep_merge(minimal, {"realtime": {"enabled": True}}), "realtime.kafka.brokers is required"),
        ({}, "serving.auth.existingSecret"),
    ]
    for values, expected in cases:
        message = render_error_in_child(values)
        if not message:
            fail(f"values {values} were accepted; they must be refused")
        elif expected not in message:
            fail(f"values {values} were refused without naming {expected!r}: {message}")
        else:
            print(f"  refused {values}: ...{expected}...")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    render_parser = sub.add_parser("render", help="print the rendered objects as JSON")
    render_parser.add_argument("--values", type=Path, help="a values file over values.yaml")
    sdkpy_parser = sub.add_parser("_sdkpy-lint")
    sdkpy_parser.add_argument("chart_dir")
    args = parser.parse_args()

    if args.command == "_sdkpy-lint":
        sdkpy_lint_in_process(args.chart_dir)
        return 0
    if args.command == "render":
        try:
            json.dump(render(load_overrides(args.values)), sys.stdout)
        except Exception as error:  # Helm's errors carry the explanation
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
            return 1
        return 0

    for label, values_file in (("default", MINIMAL), ("all features", ALL_FEATURES)):
        print(f"==> {label} values{f' ({values_file.relative_to(ROOT)})' if values_file else ''}")
        check_lint(label, values_file)
        try:
            objects = render_in_child(values_file)
        except RuntimeError as error:
            fail(f"[{label}] rendering failed: {error}")
            continue
        print(f"  rendered {len(objects)} objects: {sorted({o['object']['kind'] for o in objects})}")
        check_objects(label, objects)
        (check_all_features if values_file == ALL_FEATURES else check_default)(objects)
    print("==> network policy: serving clients listed, with and without metrics scrapers")
    check_serving_clients_only()
    print("==> serving split into shards")
    check_shards()
    print("==> values the chart must refuse")
    check_refusals()

    if failures:
        print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
        return 1
    print("\nchart: lint clean (helm-sdkpy and helm-python-sdk), objects valid for Kubernetes "
          f"{OLDEST_KUBERNETES} and {__import__('kubernetes_validate').latest_version()} (strict)")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
