#!/usr/bin/env python3
"""Checks the Spark driver's failure reasons against real Spark errors.

    classify_check.py

Starts one local Spark session (pyspark, as the local engine runs it),
reads a small table whose values stand for what a tenant's files hold,
and runs, one after the other, definitions that fail in each way the
driver tells apart (`segment_spark.classify`, `member_ids`), two of them
over Parquet files that cannot be read (removed after planning, not
Parquet). For each it
checks the reason and that the message holds no value of the table.
Prints one JSON object: the cases checked and, for each, the reason and
message. Exits non-zero on the first case that is wrong.

Run by tests/tests/compute.rs (`spark_failures_have_their_reasons_and_never_the_files_data`).
"""

import glob
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import segment_spark  # noqa: E402

# Values only the table holds: no message may carry them.
SECRETS = ("user-SECRET", "CODE-SECRET", "country-SECRET")

CASES = [
    # (definition, reason, a fragment the message must hold)
    ("SELECT user_id FROM orders WHERE amount >", "QueryError", "SQL syntax"),
    ("SELECT no_such_function(user_id) FROM orders", "QueryError", "unknown function `no_such_function`"),
    ("SELECT user_id FROM orders WHERE CAST(code AS INT) > 1", "QueryError", "does not cast to"),
    ("SELECT user_id FROM orders WHERE 1 / (amount - amount) > 0", "QueryError", "DIVIDE_BY_ZERO"),
    ("SELECT user_id, amount FROM orders", "NotOneColumn", "returns 2 columns (user_id, amount)"),
    # The table's column names are the file's (a CSV's header line): only
    # the ones the author wrote are named.
    ("SELECT * FROM orders", "NotOneColumn", "returns 4 columns (…, …, …, …)"),
    ("SELECT amount FROM orders", "QueryError", "user ids are text or integers"),
    ("SELECT user_id FROM refunds", "UnknownTable", "table `refunds` is not declared"),
    ("SELECT user_id FROM orders WHERE countyr = 'ES'", "UnknownColumn", "unknown column `countyr`"),
    # Spark's own message quotes the value it could not parse.
    ("SELECT user_id FROM orders WHERE to_date(code, 'yyyy-MM-dd') > DATE'2020-01-01'", "QueryError", ""),
    # Parquet files removed after the table was planned (a compaction
    # between listing and reading).
    ("SELECT user_id FROM vanished", "UnreadableSource", "reading table `vanished`"),
    # A file that is not Parquet, holding the tenant's text.
    ("SELECT user_id FROM garbled", "UnreadableSource", "reading table `garbled`"),
]


def main():
    spark = segment_spark.session()
    spark.sparkContext.setLogLevel("OFF")
    rows = [(f"user-SECRET-{i}", float(i), "CODE-SECRET", "country-SECRET") for i in range(5)]
    frame = spark.createDataFrame(rows, "user_id string, amount double, code string, country string")
    frame.createOrReplaceTempView("orders")
    files = tempfile.mkdtemp(prefix="classify-check-")
    vanished = os.path.join(files, "vanished")
    frame.write.parquet(vanished)
    spark.read.parquet(vanished).createOrReplaceTempView("vanished")
    for part in glob.glob(os.path.join(vanished, "*.parquet")):
        os.remove(part)
    garbled = os.path.join(files, "garbled")
    os.makedirs(garbled)
    with open(os.path.join(garbled, "part-0.parquet"), "w") as out:
        out.write("user_id\n" + "\n".join(r[0] for r in rows) + "\nPAR1")
    spark.read.schema("user_id string").parquet(garbled).createOrReplaceTempView("garbled")
    tables = {
        name: {"name": name, "about": f"table `{name}`", "read": {"format": "parquet", "files": []}}
        for name in ("orders", "vanished", "garbled")
    }
    checked = []
    for sql, reason, fragment in CASES:
        table = "vanished" if "vanished" in sql else "garbled" if "garbled" in sql else "orders"
        plan = {"authorText": sql, "tables": [tables[table]]}
        try:
            segment_spark.member_ids(spark.sql(sql), plan).collect()
            failure = None
        except Exception as error:  # noqa: BLE001 - every error is classified
            failure = segment_spark.classify(error, plan)
        if failure is None:
            sys.exit(f"{sql}: did not fail")
        line = failure.line()
        checked.append({"sql": sql, "reason": failure.reason, "message": failure.message})
        if failure.reason != reason or fragment not in failure.message:
            sys.exit(f"{sql}: {line} (expected {reason} with {fragment!r})")
        leaked = [s for s in SECRETS if s in line and s not in sql]
        if leaked:
            sys.exit(f"{sql}: the message holds the table's {leaked}: {line}")
    print(json.dumps({"cases": len(checked), "checked": checked}))
    spark.stop()
    shutil.rmtree(files, ignore_errors=True)


if __name__ == "__main__":
    main()
