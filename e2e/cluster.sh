#!/usr/bin/env bash
# Runs segment-operator against the current kube context (a kind or k3d
# cluster) on the bundled examples. It needs kubectl, a Redis this machine
# can reach (REDIS_URL: the operator runs here; the Jobs need none) and an
# S3 bucket for lake and results (RESULTS_URI, with AWS_* credentials in the
# Secret below); it cannot run in CI, where no cluster exists.
#
#   REDIS_URL=redis://redis.default:6379 RESULTS_URI=s3://segment-results \
#   WORKER_IMAGE=segment-operator/segment-worker:0.1.0 e2e/cluster.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${REDIS_URL:?set REDIS_URL to a Redis the operator can reach}"
: "${RESULTS_URI:?set RESULTS_URI, e.g. s3://segment-results}"
namespace=${NAMESPACE:-segments-e2e}

kubectl get --raw /version >/dev/null
kubectl apply --server-side -f crds/segmentation.dev.yaml
kubectl wait --for condition=established crd/segments.segmentation.dev crd/segmentsources.segmentation.dev crd/computeclasses.segmentation.dev --timeout=60s
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
# The workers' Secret: S3 credentials only (compute and ingest Jobs touch
# no store; the operator seals each version from the ingest's verdict).
kubectl -n "$namespace" create secret generic segment-credentials \
    --from-literal=AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-}" \
    --from-literal=AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-}" \
    --from-literal=AWS_REGION="${AWS_REGION:-us-east-1}" \
    --from-literal=AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-}" \
    --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$namespace" create serviceaccount segment-worker --dry-run=client -o yaml | kubectl apply -f -

# The examples read file://./lake/; in a cluster the lake lives in S3.
sed "s|file://./lake/|${LAKE_URI:-s3://segment-lake}/|" examples/sources.yaml | kubectl -n "$namespace" apply -f -
sed "s|file://./lake/|${LAKE_URI:-s3://segment-lake}/|" examples/segments.yaml | kubectl -n "$namespace" apply -f -

cargo run --release -p segment-operator -- run \
    --namespace "$namespace" --lease-namespace "$namespace" \
    --redis-url "$REDIS_URL" --results-uri "$RESULTS_URI" \
    --worker-env-secret segment-credentials \
    ${WORKER_IMAGE:+--worker-image "$WORKER_IMAGE"} &
operator=$!
trap 'kill $operator 2>/dev/null || true' EXIT

kubectl -n "$namespace" wait segment --all --for condition=Ready --timeout=15m
kubectl -n "$namespace" get segments
