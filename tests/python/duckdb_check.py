"""Runs SQL with DuckDB over Parquet files exported by meshnode; prints JSON rows.

  duckdb_check.py DIR SQL   -> {"rows": [[...], ...]} with every table of DIR as a view
"""
import json
import os
import sys

import duckdb


def main():
    directory, sql = sys.argv[1], sys.argv[2]
    con = duckdb.connect()
    for name in os.listdir(directory):
        if name.endswith(".parquet"):
            table = name[: -len(".parquet")]
            path = os.path.join(directory, name).replace("'", "''")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
    rows = con.execute(sql).fetchall()
    print(json.dumps({"rows": [list(r) for r in rows]}, default=str))


if __name__ == "__main__":
    main()
