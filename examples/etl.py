"""A small ETL chain for the README's "Jobs that wait for other jobs": three steps queued
together, each `after` the one before, working on files next to `base`.

    extract(base)    reads base + ".csv" (city,celsius lines), writes base + ".raw.json"
    transform(base)  converts to Fahrenheit, writes base + ".clean.json"
    load(base)       puts the rows into the SQLite database base + ".db"; returns the count

Each step raises if its input is missing, so a failed step leaves the next ones cancelled
("parent N failed"), and `jobctl retry N` puts them back once the input is fixed.
"""
import csv
import json
import os
import sqlite3


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def extract(base):
    with open(base + ".csv", newline="") as f:
        rows = [{"city": city, "celsius": float(c)} for city, c in csv.reader(f)]
    _write_json(base + ".raw.json", rows)
    print("extracted %d rows" % len(rows))
    return len(rows)


def transform(base):
    with open(base + ".raw.json") as f:
        rows = json.load(f)
    for row in rows:
        row["fahrenheit"] = round(row["celsius"] * 9 / 5 + 32, 1)
    _write_json(base + ".clean.json", rows)
    return len(rows)


def load(base):
    with open(base + ".clean.json") as f:
        rows = json.load(f)
    with sqlite3.connect(base + ".db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS temps (city TEXT PRIMARY KEY, celsius REAL,"
                   " fahrenheit REAL)")
        db.executemany("INSERT OR REPLACE INTO temps VALUES (:city, :celsius, :fahrenheit)",
                       rows)
    return len(rows)
