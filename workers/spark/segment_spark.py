"""segment-operator's Spark driver: computes a Segment's members with Spark.

    spark-submit [--master ...] [--conf ...] segment_spark.py --task-file PATH [--task-file PATH ...]

PATH holds a ComputeTask (JSON), the same as the compute Job's
(/etc/segment-task/task.json in a cluster). This program does only what
needs Spark; `segment-worker` (env SEGMENT_WORKER_BIN, else on PATH) does
the rest, so both engines read the same files and write the same bytes:

1. `segment-worker spark-plan --task-file PATH` removes a manifest an
   earlier run of the version left and prints the plan: one Spark SQL
   query, the clock functions already replaced by the snapshot time, and
   for each table it reads the exact files and how to read them.
2. Each table is registered as a temp view; the query runs in a session
   whose time zone is UTC.
3. The distinct, non-empty ids, sorted bytewise, stream to
   `segment-worker write-result --task-file PATH` (stdin, one a line, then
   an empty line: a stream cut short writes no result), which writes the
   parts, the index and the manifest last.

Several --task-file run one after the other in one session, stopping at
the first failure. A failure writes one line `Reason: message` (a
FailureReason; the message never quotes what a file holds) to the
termination log (env SEGMENT_TERMINATION_LOG, else /dev/termination-log
when writable) and to stderr, and exits 1.

S3: `s3://` is read through Hadoop S3A (the plan says `s3a://`), from the
AWS_* environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (S3A's
default credential chain), AWS_REGION, AWS_ENDPOINT_URL (path-style
access, plain HTTP for an http:// endpoint).
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import traceback

# Ids handed to write-result per write call.
CHUNK = 10_000

INTEGRAL_TYPES = ("ByteType", "ShortType", "IntegerType", "LongType")
TEXT_TYPES = ("StringType", "VarcharType", "CharType")

# Conditions and Java classes that mean a file could not be read.
UNREADABLE_CONDITIONS = (
    "FAILED_READ_FILE",
    "CANNOT_READ_FILE_FOOTER",
    "PATH_NOT_FOUND",
    "UNABLE_TO_INFER_SCHEMA",
    "MALFORMED_RECORD_IN_PARSING",
    "FILE_NOT_EXIST",
    "CANNOT_READ",
    "INVALID_PARQUET",
)
UNREADABLE_CLASSES = (
    "FileNotFoundException",
    "IOException",
    "ParquetDecodingException",
    "SdkClientException",
    "AwsServiceException",
    "S3Exception",
    "AWSClientIOException",
    "AWSBadRequestException",
    "UnknownStoreException",
    "AccessDeniedException",
    "EOFException",
    "RuntimeIOException",
)


class Failure(Exception):
    """A run's failure: a FailureReason name and a message without data."""

    def __init__(self, reason, message):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def line(self):
        return f"{self.reason}: {' '.join(self.message.split())}"


def main(argv):
    parser = argparse.ArgumentParser(prog="segment_spark.py", description=__doc__.splitlines()[0])
    parser.add_argument("--task-file", action="append", required=True, help="a ComputeTask JSON file (repeatable)")
    args = parser.parse_args(argv)
    worker = os.environ.get("SEGMENT_WORKER_BIN") or "segment-worker"
    spark = None
    try:
        for task_file in args.task_file:
            plan = run_worker(worker, ["spark-plan", "--task-file", task_file])
            plan = json.loads(plan)
            if spark is None:
                spark = session()
            run(spark, worker, task_file, plan)
    except Failure as failure:
        return fail(failure)
    except Exception as error:  # noqa: BLE001 - every failure needs its reason
        traceback.print_exc()
        return fail(Failure("WorkerFailed", f"the Spark driver failed: {type(error).__name__}"))
    finally:
        if spark is not None:
            spark.stop()
    return 0


def fail(failure):
    line = failure.line()
    print(f"segment_spark: {line}", file=sys.stderr)
    path = termination_log()
    if path:
        try:
            with open(path, "w", encoding="utf-8") as log:
                log.write(line + "\n")
        except OSError:
            pass
    return 1


def termination_log():
    path = os.environ.get("SEGMENT_TERMINATION_LOG")
    if path:
        return path
    default = "/dev/termination-log"
    if os.path.exists(default) and os.access(default, os.W_OK):
        return default
    return None


def run_worker(worker, args, stdin=None):
    """Runs `segment-worker ARGS` and returns its stdout; its failure, read
    from the termination log it was given, is this run's."""
    with tempfile.TemporaryDirectory(prefix="segment-spark-") as scratch:
        log = os.path.join(scratch, "termination-log")
        try:
            done = subprocess.run([worker, *args, "--termination-log", log], input=stdin, stdout=subprocess.PIPE, check=False)
        except OSError as error:
            raise Failure(
                "WorkerFailed", f"cannot run {worker} ({error.strerror}): install segment-worker or set SEGMENT_WORKER_BIN"
            ) from None
        if done.returncode != 0:
            raise worker_failure(log, args[0], done.returncode)
        return done.stdout


def worker_failure(log, command, code):
    try:
        with open(log, encoding="utf-8") as text:
            line = text.read().strip()
    except OSError:
        line = ""
    reason, _, message = line.partition(": ")
    if reason and message and re.fullmatch(r"[A-Za-z]+", reason):
        return Failure(reason, message)
    return Failure("WorkerFailed", f"segment-worker {command} exited with {code} and gave no reason")


def session():
    from pyspark.sql import SparkSession

    # PySpark logs a failing query's error with Spark's suggestions, the
    # columns of the tables read, which come from the files; the failure
    # this driver reports names what went wrong without them.
    logging.getLogger("SQLQueryContextLogger").setLevel(logging.CRITICAL + 1)

    builder = (
        SparkSession.builder.appName("segment-operator")
        .config("spark.sql.session.timeZone", "UTC")
        # A tenant's SQL reads the tables of its plan and nothing else:
        # Spark's `parquet.`s3a://...`` form would read any path the
        # credentials reach. The plan's table check refuses it first; this
        # is the engine's own lock.
        .config("spark.sql.runSQLOnFiles", "false")
    )
    for key, value in s3a_settings(os.environ).items():
        builder = builder.config(f"spark.hadoop.{key}", value)
    return builder.getOrCreate()


def s3a_settings(env):
    """Hadoop S3A settings from the AWS_* environment the worker reads too.
    Credentials stay in the environment: S3A's default chain reads them."""
    settings = {}
    endpoint = env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT")
    if endpoint:
        settings["fs.s3a.endpoint"] = endpoint
        # S3-compatible servers (MinIO, moto) answer path-style requests.
        settings["fs.s3a.path.style.access"] = "true"
        settings["fs.s3a.connection.ssl.enabled"] = "true" if endpoint.startswith("https://") else "false"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        settings["fs.s3a.endpoint.region"] = region
    return settings


def run(spark, worker, task_file, plan):
    for table in plan["tables"]:
        register(spark, table, plan)
    try:
        frame = spark.sql(plan["sql"])
        ids = member_ids(frame, plan)
        stream(ids, worker, task_file, plan)
    except Failure:
        raise
    except Exception as error:  # noqa: BLE001
        raise classify(error, plan) from None
    finally:
        for table in plan["tables"]:
            spark.catalog.dropTempView(table["name"])


def register(spark, table, plan):
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    read = table["read"]
    kind = read["format"]
    try:
        if kind == "parquet":
            frame = spark.read.parquet(*read["files"])
        elif kind == "csv":
            reader = spark.read.options(header=True, escape='"', mode="FAILFAST")
            inferred = reader.option("inferSchema", True).csv(read["files"]).schema
            # Ids are text: inference would read `007` as the number 7.
            fields = [
                StructField(f.name, StringType(), True) if f.name == read["userIdColumn"] else f for f in inferred.fields
            ]
            frame = reader.schema(StructType(fields)).csv(read["files"])
        elif kind == "ndjson":
            frame = spark.read.option("mode", "FAILFAST").json(read["files"])
        elif kind == "ids":
            if read["files"]:
                frame = spark.read.text(read["files"]).withColumnRenamed("value", "user_id")
            else:
                frame = spark.createDataFrame([], "user_id STRING")
        elif kind == "staticCsv":
            frame = spark.read.options(header=True, escape='"').csv(read["files"])
        elif kind == "delta":
            frame = lake_table_frame(spark, read["columns"], read["groups"], F)
        elif kind == "iceberg":
            # Iceberg files hold every column: one group, no partition values.
            groups = [{"files": read["files"], "partitionValues": {}}] if read["files"] else []
            frame = lake_table_frame(spark, read["columns"], groups, F)
        else:
            raise Failure("BadTask", f"{table['about']}: the plan reads format `{kind}`, which this driver does not know")
        frame.createOrReplaceTempView(table["name"])
    except Failure:
        raise
    except Exception as error:  # noqa: BLE001
        failure = classify(error, plan)
        if failure.reason == "UnreadableSource":
            raise failure from None
        raise Failure("UnreadableSource", f"reading {table['about']}: {failure.message}") from None


def lake_table_frame(spark, columns, groups, F):
    """A Delta or Iceberg table's live files, each group with its partition
    values as typed literal columns, in the table's column order."""
    ddl = ", ".join(f"`{c['name']}` {c['type']}" for c in columns)
    if not groups:
        return spark.createDataFrame([], ddl)
    frames = []
    for group in groups:
        files = spark.read.parquet(*group["files"])
        selected = [
            F.lit(group["partitionValues"].get(c["name"])).cast(c["type"]).alias(c["name"])
            if c["partition"]
            else F.col(quoted(c["name"])).cast(c["type"]).alias(c["name"])
            for c in columns
        ]
        frames.append(files.select(*selected))
    frame = frames[0]
    for other in frames[1:]:
        frame = frame.unionAll(other)
    return frame


def quoted(name):
    return "`" + name.replace("`", "``") + "`"


def member_ids(frame, plan):
    """The query's one column as distinct, non-empty text, sorted."""
    from pyspark.sql import functions as F

    fields = frame.schema.fields
    if len(fields) != 1:
        # Only names the author wrote: `SELECT *` over a CSV would
        # otherwise print its header line, which is the file's data.
        author = plan.get("authorText", "")
        names = ", ".join(f.name if f.name in author else "…" for f in fields)
        raise Failure(
            "NotOneColumn",
            f"the definition returns {len(fields)} columns ({names}); it must return one column of user ids",
        )
    field = fields[0]
    type_name = type(field.dataType).__name__
    if type_name not in TEXT_TYPES + INTEGRAL_TYPES:
        raise Failure(
            "QueryError",
            f"the definition returns `{field.name}` of type {field.dataType.simpleString()}; user ids are text or integers",
        )
    ids = frame.toDF("user_id").select(F.col("user_id").cast("string").alias("user_id"))
    # Spark orders strings by their UTF-8 bytes, as the result format does.
    return ids.where("user_id IS NOT NULL AND user_id <> ''").distinct().orderBy("user_id")


def stream(ids, worker, task_file, plan):
    with tempfile.TemporaryDirectory(prefix="segment-spark-") as scratch:
        log = os.path.join(scratch, "termination-log")
        command = [
            worker,
            "write-result",
            "--task-file",
            task_file,
            "--termination-log",
            log,
            "--sources-read",
            json.dumps(plan["sourcesRead"]),
        ]
        try:
            writer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        except OSError as error:
            raise Failure(
                "WorkerFailed", f"cannot run {worker} ({error.strerror}): install segment-worker or set SEGMENT_WORKER_BIN"
            ) from None
        completed = False
        try:
            chunk = []
            for row in ids.toLocalIterator(prefetchPartitions=True):
                user = row[0]
                if "\n" in user or "\r" in user:
                    raise Failure("QueryError", "a user id contains a line break")
                chunk.append(user)
                if len(chunk) >= CHUNK:
                    writer.stdin.write(("\n".join(chunk) + "\n").encode("utf-8"))
                    chunk = []
            if chunk:
                writer.stdin.write(("\n".join(chunk) + "\n").encode("utf-8"))
            # The end mark: without it write-result writes no manifest.
            writer.stdin.write(b"\n")
            writer.stdin.close()
            completed = True
        except BrokenPipeError:
            completed = True  # write-result stopped; its log says why
        finally:
            if not completed:
                writer.kill()
            code = writer.wait()
        if code != 0:
            raise worker_failure(log, "write-result", code)


def classify(error, plan):
    """The FailureReason of a Spark error, with a message built from what
    the definition's author wrote, never from what a file holds."""
    if isinstance(error, Failure):
        return error
    chain = java_chain(error)
    conditions = [c for _, c, _ in chain if c]
    own = condition_of(error)
    if own:
        conditions.insert(0, own)
    params = {}
    for _, _, p in chain:
        for key, value in p.items():
            params.setdefault(key, value)
    for key, value in params_of(error).items():
        params[key] = value
    classes = [name for name, _, _ in chain]
    author = plan.get("authorText", "")
    first = conditions[0] if conditions else (classes[0].rsplit(".", 1)[-1] if classes else type(error).__name__)

    def has(*prefixes):
        return any(c.startswith(prefixes) for c in conditions)

    def name_param(key):
        return without_data(params.get(key, "").strip("`\"'"), author)

    tables = ", ".join(f"`{t['name']}`" for t in plan["tables"] if not t["name"].startswith("segment__")) or "none"
    if has("PARSE_SYNTAX_ERROR", "PARSE_"):
        near = params.get("error", "")
        return Failure("QueryError", f"SQL syntax: {first} at or near {without_data(near, author)}")
    if has("TABLE_OR_VIEW_NOT_FOUND"):
        return Failure("UnknownTable", f"table `{name_param('relationName')}` is not declared by any SegmentSource")
    if has("UNRESOLVED_COLUMN", "UNRESOLVED_FIELD", "UNRESOLVED_MAP_KEY"):
        return Failure(
            "UnknownColumn",
            f"unknown column `{name_param('objectName')}` in {tables} "
            "(the tables' columns are not listed: they are read from the files)",
        )
    if has("UNRESOLVED_ROUTINE"):
        return Failure("QueryError", f"unknown function `{name_param('routineName')}`")
    if has("CAST_INVALID_INPUT", "CAST_OVERFLOW", "INVALID_CAST"):
        source = params.get("sourceType", "").strip('"')
        target = params.get("targetType", "").strip('"')
        return Failure("QueryError", f"{first}: a value of type {source} does not cast to {target} (the value is not shown)")
    if has("UNABLE_TO_ACQUIRE_MEMORY") or any(c.endswith("OutOfMemoryError") for c in classes):
        return Failure("ResourcesExhausted", f"{first}: the Spark driver or executors ran out of memory")
    if has(*UNREADABLE_CONDITIONS) or any(c.rsplit(".", 1)[-1] in UNREADABLE_CLASSES for c in classes):
        return Failure("UnreadableSource", f"reading {files_named(error, plan)}: {first}")
    message = str(getattr(error, "getMessage", lambda: "")() or error).strip().splitlines()
    detail = without_data(message[0], author) if message else ""
    return Failure("QueryError", f"{first}: {detail}" if detail and first not in detail else detail or first)


def files_named(error, plan):
    """The tables whose files the error names; every table read if none."""
    text = "\n".join(java_messages(error)) + "\n" + str(error)
    named = []
    for table in plan["tables"]:
        read = table["read"]
        files = read.get("files", []) + [f for g in read.get("groups", []) for f in g["files"]]
        if any(f.split("://", 1)[-1] in text for f in files):
            named.append(table["about"])
    if not named:
        named = [t["about"] for t in plan["tables"]]
    return ("tables " if len(named) > 1 else "") + ", ".join(named)


def condition_of(error):
    for method in ("getCondition", "getErrorClass"):
        try:
            value = getattr(error, method)()
            if value:
                return str(value)
        except Exception:  # noqa: BLE001
            pass
    return None


def params_of(error):
    try:
        return {str(k): str(v) for k, v in (error.getMessageParameters() or {}).items()}
    except Exception:  # noqa: BLE001
        return {}


def java_throwable(error):
    return getattr(error, "_origin", None) or getattr(error, "java_exception", None)


def java_chain(error):
    """(class name, condition, parameters) of the Java exception behind
    `error` and of its causes."""
    chain = []
    throwable = java_throwable(error)
    seen = 0
    while throwable is not None and seen < 20:
        seen += 1
        try:
            name = throwable.getClass().getName()
        except Exception:  # noqa: BLE001
            break
        condition, params = None, {}
        try:
            condition = throwable.getCondition()
            params = {str(k): str(v) for k, v in dict(throwable.getMessageParameters()).items()}
        except Exception:  # noqa: BLE001
            pass
        chain.append((name, str(condition) if condition else None, params))
        try:
            throwable = throwable.getCause()
        except Exception:  # noqa: BLE001
            break
    return chain


def java_messages(error):
    messages = []
    throwable = java_throwable(error)
    for _ in range(20):
        if throwable is None:
            break
        try:
            messages.append(str(throwable.getMessage()))
            throwable = throwable.getCause()
        except Exception:  # noqa: BLE001
            break
    return messages


def without_data(message, author_text):
    """`message` with every quoted fragment the author did not write
    replaced by `…` (compute.rs's without_data): an engine quotes values
    and header lines of the files it reads."""
    out = []
    rest = message
    while True:
        match = re.search(r"['\"`]", rest)
        if not match:
            break
        quote = match.group(0)
        start = match.start()
        close = rest.find(quote, start + 1)
        if close < 0:
            break
        fragment = rest[start + 1 : close]
        out.append(rest[: start + 1])
        out.append(fragment if not fragment or fragment in author_text else "…")
        out.append(quote)
        rest = rest[close + 1 :]
    out.append(rest)
    return "".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
