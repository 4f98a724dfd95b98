#!/usr/bin/env bash
# Validates the generated CRDs with kubernetes-validate (PyPI), and checks
# what it can of the fixtures under tests/fixtures/.
#
# kubernetes-validate checks a manifest against the JSON schemas of the
# built-in Kubernetes kinds that it bundles, one set per Kubernetes version.
# Our CRDs are apiextensions.k8s.io/v1 CustomResourceDefinition objects, a
# built-in kind, so with --strict it rejects unknown or mistyped fields
# anywhere in them, including inside openAPIV3Schema and
# x-kubernetes-validations. It does not check what the API server checks
# beyond that (structural schema rules, CEL compilation and cost, fieldPath),
# and it has no way to load a CRD: for a Segment or SegmentSource it prints
# "WARN ... Couldn't find schema for kind ..." and exits 0. So the fixtures'
# verdicts (valid ones admitted, invalid ones rejected with the expected
# message) are checked by `cargo test -p segment-core --test crd`, with
# kube-cel and the schema's OpenAPI constraints; this script only confirms
# the tool still cannot check them, and that each fixture is a kind our CRDs
# serve.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

command -v kubernetes-validate >/dev/null 2>&1 ||
    fail "kubernetes-validate is not installed (python3 -m pip install kubernetes-validate)"

# The Kubernetes version k8s-openapi is built for (feature v1_33), and the
# newest one the installed kubernetes-validate knows (its default).
oldest_version=1.33.0

shopt -s nullglob
crds=(crds/*.yaml)
((${#crds[@]} > 0)) || fail "no CRD files under crds/"

echo "kubernetes-validate $(kubernetes-validate --version)"
for crd in "${crds[@]}"; do
    documents=$(grep -c '^kind: CustomResourceDefinition$' "$crd" || true)
    ((documents > 0)) || fail "$crd holds no CustomResourceDefinition"
    for version_args in "-k $oldest_version" ""; do
        # shellcheck disable=SC2086 # version_args is empty or two words
        if ! output=$(kubernetes-validate --strict $version_args "$crd" 2>&1); then
            echo "$output" >&2
            fail "$crd does not validate"
        fi
        echo "$output"
        # A WARN means a document was skipped, not checked.
        if grep -q '^WARN' <<<"$output"; then
            fail "kubernetes-validate skipped part of $crd"
        fi
        passed=$(grep -c '^INFO .* passed for resource customresourcedefinition/' <<<"$output" || true)
        ((passed == documents)) || fail "$crd: $passed of $documents CRDs validated"
    done
done

# The group/version/kind triples the CRDs serve, one per line.
served=$(python3 - "${crds[@]}" <<'EOF'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        for crd in yaml.safe_load_all(f):
            if crd:
                for version in crd["spec"]["versions"]:
                    print(f'{crd["spec"]["group"]}/{version["name"]} {crd["spec"]["names"]["kind"]}')
EOF
)

valid=(tests/fixtures/valid/*.yaml)
invalid=(tests/fixtures/invalid/*.yaml)
((${#valid[@]} > 0)) || fail "no fixtures under tests/fixtures/valid/"
((${#invalid[@]} > 0)) || fail "no fixtures under tests/fixtures/invalid/"

checked_here=0
left_to_rust=0
for fixture in "${valid[@]}" "${invalid[@]}"; do
    kind_line=$(python3 -c '
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(doc.get("apiVersion"), doc.get("kind"))' "$fixture")
    grep -qxF "$kind_line" <<<"$served" || fail "$fixture is a $kind_line, which crds/ does not serve"

    status=0
    output=$(kubernetes-validate --strict "$fixture" 2>&1) || status=$?
    if grep -q "Couldn't find schema for kind" <<<"$output"; then
        left_to_rust=$((left_to_rust + 1))
        continue
    fi
    # A kubernetes-validate that can check custom resources: hold it to the
    # fixtures' verdicts too.
    checked_here=$((checked_here + 1))
    case "$fixture" in
        */valid/*) ((status == 0)) || { echo "$output" >&2; fail "$fixture should pass"; } ;;
        *) ((status != 0)) || { echo "$output" >&2; fail "$fixture should fail"; } ;;
    esac
done

echo "CRDs: ${#crds[@]} file(s) valid against Kubernetes $oldest_version and the latest schemas (strict)"
echo "fixtures: ${#valid[@]} valid, ${#invalid[@]} invalid; $checked_here checked by kubernetes-validate"
if ((left_to_rust > 0)); then
    echo "kubernetes-validate has no schema for $left_to_rust fixture(s) (it bundles only built-in kinds and cannot load a CRD);"
    echo "their verdicts are checked by: cargo test -p segment-core --test crd"
fi
