#!/usr/bin/env python3
"""Runs the Argo CD health check of docs/gitops.md against Segment statuses.

The Lua is taken from the argocd-cm ConfigMap in docs/gitops.md, the very
text users copy, and run with Lua 5.1 (lupa's lua51 module: Argo CD's
gopher-lua implements Lua 5.1) in an environment without io, os, require
and load, which Argo CD's sandbox does not offer either. Each sample is a
status in the shape core/src/api.rs serialises and core/src/planner.rs
(set_conditions) produces, with the health Argo CD must show for it.

Every condition reason the planner can write must appear in some sample,
so a new reason fails here until the health check was considered for it.

    python3 tests/argocd_health.py     (run by .ci/run; needs `pip install lupa`)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "gitops.md"
PLANNER = ROOT / "core" / "src" / "planner.rs"
API = ROOT / "core" / "src" / "api.rs"
VALIDATION = ROOT / "core" / "src" / "validation.rs"
KEY = "resource.customizations.health.segmentation.dev_Segment"
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def health_lua() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    # Every manifest of the page is meant to be copied: each must parse.
    documents = []
    for number, block in enumerate(blocks, 1):
        try:
            documents += list(yaml.safe_load_all(block))
        except yaml.YAMLError as error:
            sys.exit(f"{DOC}: YAML block {number} does not parse: {error}")
    for document in documents:
        if isinstance(document, dict) and KEY in document.get("data", {}):
            if document.get("kind") != "ConfigMap" or document["metadata"].get("name") != "argocd-cm":
                sys.exit(f"{DOC}: {KEY} must be in the argocd-cm ConfigMap")
            return document["data"][KEY]
    sys.exit(f"{DOC}: no argocd-cm block with {KEY}")


def cond(kind: str, status: bool, reason: str, message: str = "") -> dict:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-22T10:00:00Z",
        "observedGeneration": 4,
    }


def segment(status: dict | None, generation: int | None = 4) -> dict:
    obj = {
        "apiVersion": "segmentation.dev/v1alpha1",
        "kind": "Segment",
        "metadata": {"name": "lapsed-high-value", "namespace": "growth"},
        "spec": {"definition": {"sql": "SELECT user_id FROM orders"}},
    }
    if generation is not None:
        obj["metadata"]["generation"] = generation
    if status is not None:
        obj["status"] = status
    return obj


def status(ready, reconciling=None, stalled=None, held=None, **fields) -> dict:
    """A status as the planner writes it: the four conditions, always."""
    return {
        "observedGeneration": 4,
        "conditions": [
            ready,
            reconciling or cond("Reconciling", False, "NotReconciling"),
            stalled or cond("Stalled", False, "NotStalled"),
            held or cond("RolloverHeld", False, "NotHeld"),
        ],
        "latestVersion": 43,
        "consecutiveFailures": 0,
        "versions": [],
        **fields,
    }


SERVES = "v42 serves 123456 members"
# (what, Segment, expected health, a piece of the expected message)
CASES = [
    ("new, no status yet", segment(None), "Progressing", "reconcile"),
    (
        "spec changed, not yet planned",
        segment(status(cond("Ready", True, "VersionActive", SERVES)), generation=5),
        "Progressing",
        "generation 5",
    ),
    (
        "planned but no conditions",
        segment({"observedGeneration": 4, "conditions": []}),
        "Progressing",
        "No Ready condition",
    ),
    (
        "a version is served",
        segment(status(cond("Ready", True, "VersionActive", SERVES), activeVersion=42, members=123456)),
        "Healthy",
        SERVES,
    ),
    (
        "served, but the newest run failed",
        segment(
            status(
                cond("Ready", True, "LastRunFailed", f"{SERVES}; v43 failed: UnreadableSource: no data files"),
                activeVersion=42,
            )
        ),
        "Healthy",
        "v43 failed",
    ),
    (
        "first run computing",
        segment(
            status(
                cond("Ready", False, "Computing", "v1 is Computing"),
                reconciling=cond("Reconciling", True, "RunInProgress", "v1 of the current definition is Computing"),
                currentRun={"version": 1, "phase": "Computing"},
            )
        ),
        "Progressing",
        "v1 of the current definition is Computing",
    ),
    (
        "new definition computing while the old one serves",
        segment(
            status(
                cond("Ready", True, "VersionActive", SERVES),
                reconciling=cond("Reconciling", True, "RunInProgress", "v43 of the current definition is Ingesting"),
            )
        ),
        "Progressing",
        "v43",
    ),
    (
        "first run waits for a compute slot",
        segment(status(cond("Ready", False, "Pending", "v1 is Pending"))),
        "Progressing",
        "v1 is Pending",
    ),
    (
        "first version loaded, not yet active",
        segment(status(cond("Ready", False, "Ingesting", "v1 is Ingesting"))),
        "Progressing",
        "Ingesting",
    ),
    (
        "first version loaded, waiting for the serving replicas to load it",
        segment(
            status(
                cond(
                    "Ready",
                    False,
                    "WaitingForReplicas",
                    "version 1 is loaded by 1 of 2 serving replicas; readers switch once all have it",
                )
            )
        ),
        "Progressing",
        "1 of 2 serving replicas",
    ),
    (
        "a rollover waiting for the serving replicas while the old version serves",
        segment(
            status(
                cond(
                    "Ready",
                    True,
                    "WaitingForReplicas",
                    f"{SERVES}; version 43 is loaded by 1 of 2 serving replicas; readers switch once all have it",
                ),
                activeVersion=42,
            )
        ),
        "Healthy",
        SERVES,
    ),
    (
        "invalid SQL",
        segment(
            status(
                cond("Ready", False, "InvalidDefinition", "spec.definition.sql: does not parse; nothing is launched"),
                stalled=cond("Stalled", True, "InvalidDefinition", "spec.definition.sql: does not parse; nothing is launched"),
            )
        ),
        "Degraded",
        "does not parse",
    ),
    (
        "invalid cron",
        segment(
            status(
                cond("Ready", False, "InvalidSchedule", "spec.schedule.cron: has 4 fields"),
                stalled=cond("Stalled", True, "InvalidSchedule", "spec.schedule.cron: has 4 fields"),
            )
        ),
        "Degraded",
        "4 fields",
    ),
    (
        "invalid retention",
        segment(
            status(
                cond("Ready", False, "InvalidSpec", "spec.retention.keepVersions: must be at least 1"),
                stalled=cond("Stalled", True, "InvalidSpec", "spec.retention.keepVersions: must be at least 1"),
            )
        ),
        "Degraded",
        "keepVersions",
    ),
    (
        "pinned version not retained",
        segment(
            status(
                cond("Ready", False, "PinnedVersionUnavailable", "v7 is not retained; retained: 41, 42"),
                stalled=cond("Stalled", True, "PinnedVersionUnavailable", "v7 is not retained; retained: 41, 42"),
            )
        ),
        "Degraded",
        "v7 is not retained",
    ),
    (
        "first run failed for good",
        segment(
            status(
                cond("Ready", False, "RunFailed", "v1 failed: UnknownTable: table refunds is not declared"),
                stalled=cond("Stalled", True, "RunFailed", "the current definition has no version: v1 failed: UnknownTable"),
            )
        ),
        "Degraded",
        "UnknownTable",
    ),
    (
        "first run failed, retry scheduled",
        segment(
            status(
                cond("Ready", False, "RunFailed", "v1 failed: StoreUnavailable: connection refused"),
                retryAt="2026-11-22T10:01:00Z",
                consecutiveFailures=1,
            )
        ),
        "Progressing",
        "retrying at 2026-11-22T10:01:00Z",
    ),
    (
        "rollover held",
        segment(
            status(
                cond("Ready", True, "VersionActive", SERVES),
                held=cond(
                    "RolloverHeld",
                    True,
                    "ChangeRatioExceeded",
                    "v43 changes 98765 members, 80.0% of v42's 123456 (maxChangeRatio 0.5)",
                ),
                currentRun={"version": 43, "phase": "AwaitingApproval"},
            )
        ),
        "Suspended",
        "approve-version",
    ),
    (
        "first version below minMembers",
        segment(
            status(
                cond("Ready", False, "AwaitingApproval", "v1 is AwaitingApproval"),
                held=cond("RolloverHeld", True, "BelowMinMembers", "v1 has 0 members, fewer than minMembers 100"),
            )
        ),
        "Suspended",
        "BelowMinMembers",
    ),
    (
        "no version, schedule suspended",
        segment(status(cond("Ready", False, "Suspended", "no version yet and the schedule is suspended"))),
        "Suspended",
        "suspended",
    ),
    (
        "no version yet, nothing running",
        segment(status(cond("Ready", False, "NoVersion", "no version has been computed yet"))),
        "Progressing",
        "no version",
    ),
    (
        "a Ready=False reason the check does not know",
        segment(status(cond("Ready", False, "SomethingNew", "something new went wrong"))),
        "Degraded",
        "something new",
    ),
]


def planner_reasons() -> set[str]:
    """Reasons the planner writes into conditions: literal ones, the run
    phases (Ready's reason before the first version) and the invalid-spec
    reasons."""
    planner = PLANNER.read_text()
    reasons = set(re.findall(r'Cond::[ft]\(\s*"(\w+)"', planner))
    # Cond::f(&format!("{:?}", run.phase), ...): the RunPhase variants.
    enum = re.search(r"pub enum RunPhase\s*\{(.*?)\}", API.read_text(), re.S)
    if enum is None:
        sys.exit(f"{API}: enum RunPhase not found")
    reasons |= set(re.findall(r"^\s*(\w+),?\s*$", enum.group(1), re.M))
    # An invalid spec's Ready and Stalled carry the check's reason.
    reasons |= set(re.findall(r'reason: "(\w+)"', VALIDATION.read_text()))
    # A held version's RolloverHeld carries the rollover guard's reason.
    reasons |= set(re.findall(r'hold = Some\(\(\s*"(\w+)"', planner))
    return reasons


def main() -> int:
    from lupa import lua51

    script = health_lua()
    failures = []
    passed = 0
    for what, obj, expected, fragment in CASES:
        lua = lua51.LuaRuntime(unpack_returned_tuples=True)
        g = lua.globals()
        # Argo CD's interpreter has no file, process or module access.
        for name in ("io", "os", "require", "dofile", "loadfile", "load", "loadstring", "package", "debug"):
            g[name] = None
        g.obj = lua.table_from(obj, recursive=True)
        try:
            hs = lua.execute(script)
        except Exception as error:  # a Lua error: the script is broken
            failures.append(f"{what}: the script failed: {error}")
            continue
        got, message = hs["status"], hs["message"]
        if got not in ARGO_HEALTH:
            failures.append(f"{what}: {got!r} is not an Argo CD health status")
        elif got != expected:
            failures.append(f"{what}: expected {expected}, got {got} ({message})")
        elif not isinstance(message, str) or fragment.lower() not in message.lower():
            failures.append(f"{what}: message {message!r} should mention {fragment!r}")
        else:
            passed += 1
            print(f"ok  {what}: {got}: {message}")

    covered = {c["reason"] for _, obj, _, _ in CASES for c in obj.get("status", {}).get("conditions", [])}
    missing = sorted(planner_reasons() - covered)
    if missing:
        failures.append(
            f"condition reasons the planner writes but no sample here has: {missing}; "
            "decide their Argo CD health in docs/gitops.md and add samples"
        )

    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"argocd health: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
