"""Ingest + validation throughput (rows/s) on generated logs at 1M and 10M events.

"Ingest" is the generator writing the raw contract (what a user's log shipper would do), timed apart
from validation so each figure stands alone. Run: ``.venv/bin/python -m benchmarks.ingest_validate``
(``--sizes 1000000`` for a quick run).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from jobs import generate, validate
from jobs.pipeline import days
from synergen_core.config import Config


def measure(n_events: int, work: Path, n_days: int) -> dict:
    cfg = Config()
    cfg.lake.root = work / f"lake-{n_events}"
    shutil.rmtree(cfg.lake.root, ignore_errors=True)
    g = cfg.generate
    g.events, g.days = n_events, n_days
    g.users, g.items = max(1_000, n_events // 50), max(1_000, n_events // 200)
    t0 = time.perf_counter()
    generate.run(cfg, g.start_ds)
    t_ingest = time.perf_counter() - t0
    ds = days(cfg)
    t0 = time.perf_counter()
    out = validate.run_range(cfg, ds[0], ds[-1])
    t_validate = time.perf_counter() - t0
    rows = sum(out[t]["rows_in"] for t in validate.EVENT_TABLES)
    shutil.rmtree(cfg.lake.root, ignore_errors=True)
    return {
        "events": n_events, "days": n_days, "event_rows_validated": rows,
        "catalog_rows": out["catalog"]["rows_in"],
        "rows_quarantined": sum(out[t]["rows_quarantined"] for t in validate.TABLES),
        "ingest_seconds": round(t_ingest, 2), "validate_seconds": round(t_validate, 2),
        "ingest_rows_per_s": round(rows / t_ingest), "validate_rows_per_s": round(rows / t_validate),
        "end_to_end_rows_per_s": round(rows / (t_ingest + t_validate)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="synergen-bench-"))
    rows = [measure(n, work, args.days) for n in args.sizes]
    for r in rows:
        print(r)
    table = "| events | days | ingest rows/s | validate rows/s | end-to-end rows/s | quarantined |\n|---|---|---|---|---|---|\n"
    table += "".join(
        f"| {r['events']:,} | {r['days']} | {r['ingest_rows_per_s']:,} | {r['validate_rows_per_s']:,} | "
        f"{r['end_to_end_rows_per_s']:,} | {r['rows_quarantined']:,} |\n" for r in rows
    )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        table += (f"\nScaling {a['events']:,} → {b['events']:,} events: validation time ×"
                  f"{b['validate_seconds'] / a['validate_seconds']:.1f} for ×{b['events'] / a['events']:.0f} rows.\n")
    write_result("ingest_validate", {"runs": rows}, table)


if __name__ == "__main__":
    main()
