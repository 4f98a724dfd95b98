"""Runs the compute benchmark's queries in DuckDB over the same lake files,
as the reference engine of bench/src/bin/compute.rs.

usage: python3 bench/duckdb_reference.py LAKE_DIR QUERIES_JSON [RUNS [MEMORY_MB]]
QUERIES_JSON: [{"name": ..., "sql": ...}] with now() already replaced by
the snapshot timestamp. Each query runs RUNS times (default 1), one after
the other; the fastest counts. MEMORY_MB is DuckDB's memory_limit, the
pool the benchmark gives our engine (DuckDB's default is 80 % of RAM). Prints one JSON list: [{"name", "seconds",
"rows"}].
"""
import json
import sys
import time

import duckdb

lake, queries_path = sys.argv[1], sys.argv[2]
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
memory_mb = int(sys.argv[4]) if len(sys.argv) > 4 else None
queries = json.load(open(queries_path))
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
if memory_mb is not None:
    con.execute(f"SET memory_limit = '{memory_mb}MB'")
con.execute(f"CREATE VIEW orders AS SELECT * FROM read_parquet('{lake}/orders/*.parquet')")
con.execute(f"CREATE VIEW users AS SELECT * FROM read_csv_auto('{lake}/users/users.csv', types={{'user_id': 'VARCHAR'}})")
con.execute(f"CREATE VIEW app_events AS SELECT * FROM read_json_auto('{lake}/app_events/*.ndjson')")
out = []
for q in queries:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        rows = con.execute(f"SELECT DISTINCT CAST(user_id AS VARCHAR) FROM ({q['sql']}) AS q").fetchall()
        best = min(best, time.perf_counter() - start)
    out.append({"name": q["name"], "seconds": best, "rows": len(rows)})
print(json.dumps(out))
