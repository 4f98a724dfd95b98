#!/usr/bin/env python3
"""Writes and reads an Apache Iceberg table with pyiceberg, the independent
writer and reader of tests/tests/iceberg.rs.

    iceberg_table.py write CATALOG     the table sales.orders: two appends, a
                                       delete, an overwrite
    iceberg_table.py more CATALOG      one more commit (an append)
    iceberg_table.py at CATALOG MS     the snapshot pyiceberg's own time travel
                                       reads as of MS (ms since the epoch), and
                                       its members
    iceberg_table.py expire CATALOG ID  expires snapshot ID (pyiceberg's
                                       expire_snapshots), then the history
    iceberg_table.py register CATALOG LOCATION FILE...
                                       the table bench.orders at LOCATION, its
                                       data the Parquet FILEs as they are
                                       (add_files; the compute benchmark)

CATALOG is the JSON of pyiceberg's catalog properties plus its "name"
(`{"name": "lake", "type": "sql", "uri": "sqlite:///…", "warehouse": "file:///…"}`
or `{"name": "lake", "type": "rest", "uri": "http://…"}`).

Each command prints one JSON object. `write` and `more` list the table's
history (its snapshot log): every snapshot that was the table's current
one, with the time it became so and its members, read back with
pyiceberg's own scan of that snapshot. The members of a snapshot are the
users the test's segment selects: amount >= 50 outside the US.
"""

import json
import os
import sys
import time

import pyarrow as pa
from pyiceberg.catalog import load_catalog
from pyiceberg.expressions import LessThan
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import LongType, NestedField, StringType

TABLE = ("sales", "orders")

SCHEMA = Schema(
    NestedField(1, "user_id", StringType(), required=False),
    NestedField(2, "amount", LongType(), required=False),
    NestedField(3, "country", StringType(), required=False),
)
ARROW = pa.schema([("user_id", pa.string()), ("amount", pa.int64()), ("country", pa.string())])


def catalog(spec):
    properties = dict(json.loads(spec))
    name = properties.pop("name")
    return load_catalog(name, **properties)


def rows(users):
    return pa.Table.from_pylist([{"user_id": u, "amount": a, "country": c} for (u, a, c) in users], schema=ARROW)


def members(table):
    return sorted({r["user_id"] for r in table.to_pylist() if r["amount"] >= 50 and r["country"] != "US"})


def history(table):
    out = []
    for entry in table.history():
        scanned = table.scan(snapshot_id=entry.snapshot_id).to_arrow()
        snapshot = table.snapshot_by_id(entry.snapshot_id)
        out.append(
            {
                "snapshotId": entry.snapshot_id,
                "timestampMs": entry.timestamp_ms,
                "operation": snapshot.summary.operation.value if snapshot and snapshot.summary else None,
                "rows": scanned.num_rows,
                "members": members(scanned),
            }
        )
    return {"metadataLocation": table.metadata_location, "location": table.location(), "history": out}


def pause():
    # Snapshots a clear interval apart: times are in milliseconds.
    time.sleep(0.05)


def write(spec):
    cat = catalog(spec)
    cat.create_namespace_if_not_exists(TABLE[0])
    spec_by_country = PartitionSpec(PartitionField(source_id=3, field_id=1000, transform=IdentityTransform(), name="country"))
    table = cat.create_table(TABLE, schema=SCHEMA, partition_spec=spec_by_country)
    first = [(f"u{i:03}", (i * 17) % 100, ["ES", "FR", "US"][i % 3]) for i in range(1, 31)]
    table.append(rows(first))
    pause()
    second = [(f"v{i:03}", (i * 23) % 100, ["ES", "DE", "US"][i % 3]) for i in range(1, 16)]
    table.append(rows(second))
    pause()
    table.delete(LessThan("amount", 60))
    pause()
    third = [(f"w{i:03}", (i * 29) % 100, ["ES", "IT", "US"][i % 3]) for i in range(1, 21)]
    table.overwrite(rows(third))
    print(json.dumps(history(cat.load_table(TABLE))))


def more(spec):
    cat = catalog(spec)
    table = cat.load_table(TABLE)
    later = [(f"x{i:03}", 90, "PT") for i in range(1, 6)]
    table.append(rows(later))
    print(json.dumps(history(cat.load_table(TABLE))))


def at(spec, millis):
    table = catalog(spec).load_table(TABLE)
    snapshot = table.snapshot_as_of_timestamp(int(millis))
    if snapshot is None:
        print(json.dumps({"snapshotId": None}))
        return
    scanned = table.scan(snapshot_id=snapshot.snapshot_id).to_arrow()
    print(json.dumps({"snapshotId": snapshot.snapshot_id, "members": members(scanned)}))


def expire(spec, snapshot_id):
    cat = catalog(spec)
    cat.load_table(TABLE).maintenance.expire_snapshots().by_id(int(snapshot_id)).commit()
    print(json.dumps(history(cat.load_table(TABLE))))


def register(spec, location, *files):
    import pyarrow.parquet as pq

    cat = catalog(spec)
    cat.create_namespace_if_not_exists("bench")
    table = cat.create_table(("bench", "orders"), schema=pq.read_schema(files[0]), location=location)
    table.add_files(list(files))
    snapshot = cat.load_table(("bench", "orders")).current_snapshot()
    print(json.dumps({"snapshotId": snapshot.snapshot_id, "timestampMs": snapshot.timestamp_ms}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"write": write, "more": more, "at": at, "expire": expire, "register": register}[command](*args)
    sys.stdout.flush()
    sys.stderr.flush()
    # The output is written; leave without the interpreter's teardown. At
    # exit the AWS SDK inside pyarrow (pyiceberg reads s3:// files with it)
    # now and then aborts the process ("terminate called without an active
    # exception") from its static destructors, even after
    # pyarrow.fs.finalize_s3(): os._exit runs none of them.
    os._exit(0)
