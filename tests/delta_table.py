#!/usr/bin/env python3
"""Writes and reads a Delta Lake table with deltalake (delta-rs), the
independent writer and reader of tests/tests/delta.rs.

    delta_table.py write DIR     versions 0-2: an append, a delete, an overwrite
                                 (a checkpoint after version 1)
    delta_table.py more DIR      one more commit (an append)
    delta_table.py at DIR TIME   the version deltalake's own time travel reads
                                 as of TIME (RFC 3339), and its members
    delta_table.py read DIR      a table another writer wrote (the example
                                 lake's): its version, columns and rows

Each command prints one JSON object. `write` and `more` list every version
with its commit file's modification time in nanoseconds and its members,
read back with DeltaTable(DIR, version=N). The members of a version are the
users the test's segment selects: amount >= 50 outside the US.
"""

import datetime
import json
import os
import sys
import time

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("amount", pa.int64()),
        ("country", pa.string()),
    ]
)


def rows(users):
    return pa.Table.from_pylist(
        [{"user_id": u, "amount": a, "country": c} for (u, a, c) in users], schema=SCHEMA
    )


def members(table):
    return sorted(
        {r["user_id"] for r in table.to_pylist() if r["amount"] >= 50 and r["country"] != "US"}
    )


def versions(path):
    latest = DeltaTable(path).version()
    out = []
    for version in range(latest + 1):
        commit = os.path.join(path, "_delta_log", f"{version:020}.json")
        table = DeltaTable(path, version=version).to_pyarrow_table()
        out.append(
            {
                "version": version,
                "mtimeNanos": os.stat(commit).st_mtime_ns,
                "rows": table.num_rows,
                "members": members(table),
            }
        )
    return {"versions": out}


def pause():
    # Commit file times a clear second apart.
    time.sleep(1.2)


def write(path):
    first = [(f"u{i:03}", (i * 17) % 100, ["ES", "FR", "US"][i % 3]) for i in range(1, 31)]
    write_deltalake(path, rows(first), partition_by=["country"], mode="append")
    pause()
    DeltaTable(path).delete("amount < 60")
    DeltaTable(path).create_checkpoint()
    pause()
    second = [(f"w{i:03}", (i * 29) % 100, ["ES", "IT", "US"][i % 3]) for i in range(1, 21)]
    write_deltalake(path, rows(second), partition_by=["country"], mode="overwrite")


def more(path):
    pause()
    third = [(f"x{i:03}", 90 + i, "PT") for i in range(1, 6)]
    write_deltalake(path, rows(third), partition_by=["country"], mode="append")


def at(path, when):
    moment = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    table = DeltaTable(path)
    table.load_as_version(moment)
    data = table.to_pyarrow_table()
    # Members only of tables with the test's columns (not the example lake's).
    chosen = members(data) if "amount" in data.column_names else None
    return {"version": table.version(), "members": chosen}


def main(argv):
    command, path = argv[1], argv[2]
    if command == "write":
        write(path)
        print(json.dumps(versions(path)))
    elif command == "more":
        more(path)
        print(json.dumps(versions(path)))
    elif command == "at":
        print(json.dumps(at(path, argv[3])))
    elif command == "read":
        table = DeltaTable(path)
        data = table.to_pyarrow_table()
        rows = [{k: str(v) for k, v in r.items()} for r in data.to_pylist()]
        print(json.dumps({"version": table.version(), "columns": data.column_names, "rows": rows}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
    # deltalake's native threads now and then abort the interpreter's
    # teardown ("terminate called without an active exception"): the work
    # is done and printed, so leave without it.
    sys.stdout.flush()
    os._exit(0)
