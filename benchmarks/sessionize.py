"""Sessionize throughput (events/s) on generated logs: Spark against DuckDB and Polars on the same files.

For each size the generator writes ``--days`` days of raw logs (no malformed rows, so raw = what
validation would pass; late sessions and exact duplicates included) and then, on those files:

* ``spark``: the job's own sessionize core (``jobs.sessionize``: unify -> dedup -> sessionize with
  window functions) from the Parquet files to a Parquet file of sessionized events;
* ``duckdb`` and ``polars``: the same computation (same dedup rule, order and tie-break, late-event
  clamp, gap rule and output columns) in SQL and in Polars' lazy API, to a Parquet file;
* ``spark_job``: the whole bulk stage (``jobs.sessionize.run`` without splits: also vocabularies,
  token sequences and one events partition per day), for scale.

All three engines get 2 threads (``local[2]``, DuckDB ``threads=2``, ``POLARS_MAX_THREADS=2``). The
Spark session is started, and warmed with one untimed run on the smallest size, before any timing:
the figures exclude JVM start. Outputs are cross-checked (event -> position, session, gap) between
engines at every size. The reference is the faster of DuckDB and Polars.

Run: ``.venv/bin/python -m benchmarks.sessionize`` (default sizes 1M, 5M, 20M; ``--sizes 100000
300000`` for a quick check). Generated logs stay under ``--work`` (default ``benchmarks/work/sessionize``).
"""
from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "2")  # read once, when polars is first imported

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import duckdb  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.common import ROOT, write_result  # noqa: E402
from jobs import generate, sessionize  # noqa: E402
from jobs.spark import get_spark, read_days, spark_schema  # noqa: E402
from schemas import BROWSE_EVENTS, SEARCH_EVENTS, C  # noqa: E402
from schemas import sequences as S  # noqa: E402
from synergen_core import lake  # noqa: E402
from synergen_core.config import Config  # noqa: E402

START_DS = "2026-01-01"
GAP_S = 30 * 60.0
OUT_COLUMNS = [C.EVENT_ID, C.USER_ID, C.TS, C.KIND, C.QUERY, C.ITEM_ID, C.ACTION, C.VALUE, C.DS,
               C.GAP_S, C.CLAMPED, C.LATE, C.EVENT_POS, C.POS, C.SESSION]


def config(root: Path, n_events: int, n_days: int) -> Config:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.master, cfg.spark.shuffle_partitions = "local[2]", 8
    cfg.spark.conf = {"spark.ui.enabled": "false"}
    g = cfg.generate
    g.events, g.days, g.malformed_share = n_events, n_days, 0.0
    g.users, g.items = max(2_000, n_events // 100), max(3_000, n_events // 200)
    cfg.sessionize.source, cfg.sessionize.output, cfg.sessionize.splits = "raw", "sessionized", []
    return cfg


def ensure_logs(cfg: Config) -> dict:
    """Generate once per (size, days): later runs reuse the files (the generator is seeded)."""
    marker = Path(cfg.lake.root) / "_generated.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(cfg.lake.root, ignore_errors=True)
    t0 = time.perf_counter()
    out = generate.run(cfg, START_DS)
    info = {"events": out["events"], "items": out["items"], "days": out["days"],
            "generate_seconds": round(time.perf_counter() - t0, 2)}
    marker.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------
# the three engines


def run_spark(spark, root: Path, out: Path) -> None:
    raw = lake.Layout(root).raw
    search = read_days(spark, root, raw("search_events"), SEARCH_EVENTS)
    browse = read_days(spark, root, raw("browse_events"), BROWSE_EVENTS)
    empty_state = spark.createDataFrame([], spark_schema(S.SEQUENCES, with_ds=False))
    events = sessionize.sessionize(sessionize.dedup(sessionize.unify(search, browse)), empty_state, GAP_S / 60)
    events.select(*OUT_COLUMNS).write.mode("overwrite").parquet(str(out))


DUCKDB_SQL = """
COPY (
  WITH raw AS (
    SELECT event_id, user_id, ts, 'search' AS kind, query, item_id, action, CAST(NULL AS DOUBLE) AS value, ds
    FROM read_parquet('{root}/raw/search_events/*/*.parquet', hive_partitioning = true, hive_types = {{'ds': VARCHAR}})
    UNION ALL
    SELECT event_id, user_id, ts, 'browse', CAST(NULL AS VARCHAR), item_id, action, value, ds
    FROM read_parquet('{root}/raw/browse_events/*/*.parquet', hive_partitioning = true, hive_types = {{'ds': VARCHAR}})
  ), dedup AS (
    SELECT event_id, user_id, ts, kind, query, item_id, action, value, min(ds) AS ds,
      CASE WHEN kind = 'search' AND item_id IS NOT NULL THEN 2 ELSE 1 END AS ntok
    FROM raw GROUP BY ALL
  ), ordered AS (
    SELECT *,
      max(ts) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev,
      row_number() OVER w - 1 AS event_pos,
      CAST(sum(ntok) OVER w - ntok AS INTEGER) AS pos
    FROM dedup WINDOW w AS (PARTITION BY user_id ORDER BY {order})
  ), gaps AS (
    SELECT *, CASE WHEN prev IS NULL THEN NULL ELSE (epoch_us(greatest(ts, prev)) - epoch_us(prev)) / 1e6 END AS gap_s
    FROM ordered
  )
  SELECT event_id, user_id, ts, kind, query, item_id, action, value, ds, gap_s,
    coalesce(ts < prev, false) AS clamped,
    epoch_us(ts) < epoch(CAST(ds AS DATE)) * 1000000 AS late,
    event_pos, pos,
    CAST(sum(CASE WHEN gap_s > {gap} THEN 1 ELSE 0 END) OVER (PARTITION BY user_id ORDER BY {order}
                                                              ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
         AS INTEGER) AS session
  FROM gaps
) TO '{out}' (FORMAT parquet)
"""


def run_duckdb(root: Path, out: Path) -> None:
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute(f"SET temp_directory = '{out.parent / 'duckdb.tmp'}'")
    order = ", ".join(f"{c} NULLS FIRST" for c in sessionize.ORDER)  # Spark sorts nulls first too
    con.execute(DUCKDB_SQL.format(root=root, out=out, gap=GAP_S, order=order))
    con.close()


def run_polars(root: Path, out: Path) -> None:
    scan = lambda t: pl.scan_parquet(f"{root}/raw/{t}/*/*.parquet", hive_partitioning=True,  # noqa: E731
                                     hive_schema={C.DS: pl.String})
    search = scan("search_events").select(C.EVENT_ID, C.USER_ID, C.TS, pl.lit(S.KIND_SEARCH).alias(C.KIND),
                                          C.QUERY, C.ITEM_ID, C.ACTION, pl.lit(None, pl.Float64).alias(C.VALUE), C.DS)
    browse = scan("browse_events").select(C.EVENT_ID, C.USER_ID, C.TS, pl.lit(S.KIND_BROWSE).alias(C.KIND),
                                          pl.lit(None, pl.String).alias(C.QUERY), C.ITEM_ID, C.ACTION, C.VALUE, C.DS)
    ntok = pl.when((pl.col(C.KIND) == S.KIND_SEARCH) & pl.col(C.ITEM_ID).is_not_null()).then(2).otherwise(1)
    prev = pl.col(C.TS).cum_max().shift(1).over(C.USER_ID)
    gap = pl.when(pl.col("prev").is_null()).then(None).otherwise(
        (pl.max_horizontal(C.TS, "prev") - pl.col("prev")).dt.total_microseconds() / 1e6)
    day_start = pl.col(C.DS).str.to_datetime("%Y-%m-%d", time_zone="UTC", time_unit="us")
    (pl.concat([search, browse])
     .group_by(sessionize.DEDUP_KEY).agg(pl.col(C.DS).min())
     .sort([C.USER_ID, *sessionize.ORDER], nulls_last=False)
     .with_columns(ntok.alias("ntok"), prev.alias("prev"), pl.int_range(pl.len()).over(C.USER_ID).alias(C.EVENT_POS))
     .with_columns(gap.alias(C.GAP_S), (pl.col(C.TS) < pl.col("prev")).fill_null(False).alias(C.CLAMPED),
                   (pl.col(C.TS) < day_start).alias(C.LATE),
                   (pl.col("ntok").cum_sum() - pl.col("ntok")).over(C.USER_ID).alias(C.POS))
     .with_columns((pl.col(C.GAP_S) > GAP_S).fill_null(False).cast(pl.Int32).cum_sum().over(C.USER_ID).alias(C.SESSION))
     .select(OUT_COLUMNS)
     .collect()
     .write_parquet(out))


def run_spark_job(spark, cfg: Config, info: dict) -> dict:
    return sessionize.run(spark, cfg, info["days"][-1], from_ds=info["days"][0])


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def disagreements(outs: dict[str, Path]) -> dict[str, int]:
    """Events whose (event_pos, pos, session, gap, clamped, late) differ from Spark's, per engine."""
    con = duckdb.connect()
    cols = [C.EVENT_POS, C.POS, C.SESSION, C.CLAMPED, C.LATE]
    read = lambda p: f"read_parquet('{p}/*.parquet' )" if p.is_dir() else f"read_parquet('{p}')"  # noqa: E731
    found = {}
    for name, path in outs.items():
        if name == "spark":
            continue
        differ = " OR ".join([f"a.{c} IS DISTINCT FROM b.{c}" for c in cols]
                             + [f"abs(a.{C.GAP_S} - b.{C.GAP_S}) > 1e-6", f"(a.{C.GAP_S} IS NULL) <> (b.{C.GAP_S} IS NULL)"])
        q = (f"SELECT count(*) FROM {read(outs['spark'])} a FULL JOIN {read(path)} b "
             f"USING ({C.USER_ID}, {C.EVENT_ID}) WHERE a.{C.USER_ID} IS NULL OR b.{C.USER_ID} IS NULL OR {differ}")
        found[name] = con.execute(q).fetchone()[0]
    con.close()
    return found


# ---------------------------------------------------------------------------------------------


def measure(spark, n: int, work: Path, n_days: int, engines: list[str]) -> dict:
    cfg = config(work / f"events-{n}", n, n_days)
    info = ensure_logs(cfg)
    root, out = Path(cfg.lake.root), Path(cfg.lake.root) / "bench-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    events = sum(count_rows(root, cfg.layout.raw(t)) for t in ("search_events", "browse_events"))
    row = {"events": events, "days": n_days, "users": cfg.generate.users, "items": info["items"]}
    paths = {"spark": out / "spark", "duckdb": out / "duckdb.parquet", "polars": out / "polars.parquet"}
    runners = {"spark": lambda: run_spark(spark, root, paths["spark"]),
               "duckdb": lambda: run_duckdb(root, paths["duckdb"]),
               "polars": lambda: run_polars(root, paths["polars"])}
    for name in engines:
        seconds, _ = timed(runners[name])
        row[name] = {"seconds": round(seconds, 2), "events_per_s": round(events / seconds)}
        print(n, name, row[name], flush=True)
    seconds, stats = timed(run_spark_job, spark, cfg, info)
    row["spark_job"] = {"seconds": round(seconds, 2), "events_per_s": round(events / seconds),
                        "duplicates_dropped": stats["duplicates_dropped"], "late_events": stats["late_events"],
                        "clamped_events": stats["clamped_events"], "sessionized_events": stats["events"]}
    print(n, "spark_job", row["spark_job"], flush=True)
    row["disagreements_with_spark"] = disagreements({k: v for k, v in paths.items() if k in engines})
    refs = [e for e in ("duckdb", "polars") if e in engines]
    if refs and "spark" in engines:
        best = min(refs, key=lambda e: row[e]["seconds"])
        row["reference"] = best
        row["spark_vs_reference_throughput"] = round(row[best]["seconds"] / row["spark"]["seconds"], 3)
    shutil.rmtree(out, ignore_errors=True)
    return row


def count_rows(root: Path, table: str) -> int:
    from jobs.spark import count_rows as per_day

    return sum(per_day(root, table).values())


def summary(rows: list[dict], engines: list[str]) -> str:
    head = "| events | " + " | ".join(f"{e} s (events/s)" for e in engines) + " | spark job s | Spark ÷ ref. |\n"
    head += "|---" * (len(engines) + 3) + "|\n"
    body = "".join(
        f"| {r['events']:,} | " + " | ".join(f"{r[e]['seconds']} ({r[e]['events_per_s']:,})" for e in engines)
        + f" | {r['spark_job']['seconds']} | {r.get('spark_vs_reference_throughput', '')} ({r.get('reference', '')}) |\n"
        for r in rows)
    notes = ["", "Spark = the job's sessionize core (unify, dedup, windows) Parquet to Parquet; spark job = the "
             "whole bulk stage without splits (vocabularies, sequences, one events partition per day). "
             "2 threads per engine, JVM start excluded. Spark ÷ ref. = Spark's throughput over the faster "
             "single-machine engine's."]
    if len(rows) > 1 and "spark" in engines:
        a, b = rows[0], rows[-1]
        notes.append(f"Scaling {a['events']:,} → {b['events']:,} events (×{b['events'] / a['events']:.0f}): Spark "
                     f"core time ×{b['spark']['seconds'] / a['spark']['seconds']:.1f}, spark job time "
                     f"×{b['spark_job']['seconds'] / a['spark_job']['seconds']:.1f}.")
    mismatches = {e: sum(r["disagreements_with_spark"].get(e, 0) for r in rows) for e in engines if e != "spark"}
    notes.append(f"Events whose position, session or gap differ from Spark's: {mismatches}.")
    return head + body + "\n".join(notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "sessionize")
    ap.add_argument("--engines", nargs="+", default=["spark", "duckdb", "polars"], choices=["spark", "duckdb", "polars"])
    args = ap.parse_args()
    sizes = sorted(args.sizes)
    cfg = config(args.work / f"events-{sizes[0]}", sizes[0], args.days)
    spark = get_spark(cfg)
    try:
        ensure_logs(cfg)
        warm = Path(cfg.lake.root) / "bench-warmup"
        run_spark(spark, Path(cfg.lake.root), warm)  # JIT and class loading, untimed
        shutil.rmtree(warm, ignore_errors=True)
        rows = [measure(spark, n, args.work, args.days, args.engines) for n in sizes]
    finally:
        spark.stop()
    for r in rows:
        print(json.dumps(r))
    write_result("sessionize", {"runs": rows, "threads": 2, "gap_s": GAP_S}, summary(rows, args.engines))


if __name__ == "__main__":
    main()
