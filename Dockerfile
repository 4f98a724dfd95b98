# syntax=docker/dockerfile:1
# The three images, one target each, built from the repository root:
#
#   docker build --target operator -t segment-operator/segment-operator:0.1.0 .
#   docker build --target serving  -t segment-operator/segment-serving:0.1.0 .
#   docker build --target worker   -t segment-operator/segment-worker:0.1.0 .
#
# and, for Segments with `spec.compute.engine: spark`, the Spark image of
# their SparkApplications: the admin's Spark image plus segment-worker and
# the driver (the `spark` target below).
#
# The names and tags are the chart's defaults (charts/segment-operator/
# values.yaml: repository, tag = the chart's appVersion = the crates'
# version) and the operator's default --worker-image. Each image's
# entrypoint is its binary, and the last path segment of its name is that
# binary's name: the chart and the operator's Jobs pass arguments only
# (`run`, `compute`, `ingest`, `realtime`), and e2e/tests/chart.rs checks
# the chart's arguments against the binary named by each image.

ARG RUST_VERSION=1.95
# The base of the `spark` target: a Spark 4 image with Python (PySpark) and
# a glibc at least Debian 12's (2.36), which segment-worker is built
# against; the S3A jars (hadoop-aws, AWS SDK v2) are the admin's to add
# (docs/compute.md#engines).
ARG SPARK_IMAGE=apache/spark:4.0.1-python3

FROM rust:${RUST_VERSION}-bookworm AS source
WORKDIR /src
COPY . .

# One build stage per binary, so a target compiles only its package; the
# cache mounts (shared, locked) keep the dependencies compiled once across
# targets and builds. The binary is copied out of the cached target dir in
# the same step, since cache mounts are not part of the image.
# The operator is built without its `standalone` feature: the cluster
# operator never runs the in-process data plane, so it compiles neither
# DataFusion nor the serving API (e2e/tests/binaries.rs checks this).
FROM source AS build-operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p segment-operator --no-default-features \
    && install -D -m 0755 target/release/segment-operator /out/segment-operator

FROM source AS build-serving
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p segment-serving \
    && install -D -m 0755 target/release/segment-serving /out/segment-serving

FROM source AS build-worker
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p segment-worker \
    && install -D -m 0755 target/release/segment-worker /out/segment-worker

# Runtime bases. operator and serving link only glibc and libgcc
# (`ldd`): distroless/cc, whose "nonroot" variant runs as uid 65532. The
# worker also links zlib and OpenSSL (the bundled librdkafka of
# `segment-worker realtime`), which distroless/cc does not fully carry:
# Debian slim with those libraries and the same uid. USER is numeric in
# both, so the pods' runAsNonRoot holds without a runAsUser (the operator's
# Jobs set none). Both carry CA certificates, for S3 and Kafka over TLS.
FROM gcr.io/distroless/cc-debian12:nonroot AS distroless
USER 65532:65532

FROM debian:bookworm-slim AS slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
USER 65532:65532

FROM distroless AS operator
COPY --from=build-operator /out/segment-operator /usr/local/bin/segment-operator
ENTRYPOINT ["/usr/local/bin/segment-operator"]

FROM distroless AS serving
COPY --from=build-serving /out/segment-serving /usr/local/bin/segment-serving
ENTRYPOINT ["/usr/local/bin/segment-serving"]

# The Spark image of SparkApplications:
#
#   docker build --target spark --build-arg SPARK_IMAGE=<the admin's Spark image> \
#     -t segment-operator/segment-spark:0.1.0 .
#
# The driver runs `segment-worker spark-plan` and `write-result`
# (SEGMENT_WORKER_BIN); a SparkApplication's mainApplicationFile is
# local:///opt/segment-operator/spark/segment_spark.py. The base keeps its
# entrypoint and user.
FROM ${SPARK_IMAGE} AS spark
COPY --from=build-worker /out/segment-worker /usr/local/bin/segment-worker
COPY workers/spark/segment_spark.py /opt/segment-operator/spark/segment_spark.py
ENV SEGMENT_WORKER_BIN=/usr/local/bin/segment-worker

# A plain `docker build .` builds the last target: the worker. It carries
# the Spark driver too (`segment-worker spark-driver` prints the same file).
FROM slim AS worker
COPY --from=build-worker /out/segment-worker /usr/local/bin/segment-worker
COPY workers/spark/segment_spark.py /opt/segment-operator/spark/segment_spark.py
ENTRYPOINT ["/usr/local/bin/segment-worker"]
