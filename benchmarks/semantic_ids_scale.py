"""Semantic IDs (stage 3c, ``jobs.semantic_ids``) on a generated catalog: time, driver memory and ID quality.

A hand-made lake holds ``--items`` generated items (text and collaborative vectors on a low-dimensional
manifold around topics, as ``tests/rqvae_catalog.py``, at ``--text-dim`` / ``--collab-dim``) on day 1 and
1% more on day 2. Day 1 trains cold; day 2 fine-tunes (``retrain_drift_threshold`` 0: the stress case for
ID stability). Per day it prints the stage's wall time, the driver's peak RSS (this Python process,
``VmHWM``; the local Spark JVM is a child and is not counted), the collision rates after resolution,
level-1 utilization and the share of old items whose IDs changed.

Run: ``nice -n 19 .venv/bin/python -m benchmarks.semantic_ids_scale --items 250000`` (``--epochs`` and
``--warm-epochs`` keep training short; the default RQ-VAE settings otherwise). The issue's target is
4M items: zero collisions, level-1 utilization >= 80%, driver peak under 3 GB, < 5% of old IDs changed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import peak_rss_kb
from schemas import semantic_ids as sid_schema
from schemas import sequences as seq_schema
from synergen_core import lake
from synergen_core.config import Config
from synergen_core.vectors import unit_rows, vectors_array

D1, D2 = "2026-05-01", "2026-05-02"


def generate(n: int, text_dim: int, collab_dim: int, seed: int = 0, chunk: int = 100_000):
    """[n, text_dim], [n, collab_dim] float32 unit rows, built in chunks (row i depends on i only)."""
    topics = 2 * np.random.default_rng(100).normal(size=(64, 8))
    to_text = np.random.default_rng(101).normal(size=(8, text_dim))
    to_collab = np.random.default_rng(102).normal(size=(8, collab_dim))
    text, collab = np.empty((n, text_dim), np.float32), np.empty((n, collab_dim), np.float32)
    for i in range(0, n, chunk):
        rng = np.random.default_rng([seed, i])
        m = min(chunk, n - i)
        z = topics[rng.integers(0, len(topics), m)] + rng.normal(size=(m, 8))
        text[i:i + m] = unit_rows(np.tanh(z @ to_text / 3) + 0.05 * rng.normal(size=(m, text_dim)))
        collab[i:i + m] = unit_rows(z @ to_collab + 0.05 * rng.normal(size=(m, collab_dim)))
    return text, collab


def write_day(root: Path, ds: str, text: np.ndarray, collab: np.ndarray, chunk: int = 250_000) -> None:
    for name in ("embeddings/items", "embeddings/collab", "sessionized/item_vocab"):
        part = lake.partition(root, name, ds)
        part.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    for j, i in enumerate(range(0, len(text), chunk)):
        m = min(chunk, len(text) - i)
        index = pa.array(np.arange(i + 1, i + m + 1), pa.int32())
        ids = pa.array([f"item{k}" for k in range(i + 1, i + m + 1)])
        day = pa.array([ds] * m)
        tables = {
            "embeddings/items": pa.table([index, ids, pa.array(["h"] * m), vectors_array(text[i:i + m]), day],
                                         schema=sid_schema.ITEM_EMBEDDINGS),
            "embeddings/collab": pa.table([index, ids, vectors_array(collab[i:i + m]), pa.array(["als"] * m), day],
                                          schema=sid_schema.COLLAB_EMBEDDINGS),
            "sessionized/item_vocab": pa.table([index, ids, day, pa.array(np.ones(m, np.int64))],
                                               schema=seq_schema.ITEM_VOCAB),
        }
        for name, t in tables.items():
            pq.write_table(t, lake.partition(root, name, ds) / f"part-{j:05d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=250_000)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--collab-dim", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warm-epochs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args()

    from jobs import semantic_ids
    from jobs.spark import get_spark

    root = (args.work or Path(tempfile.mkdtemp(prefix="sid_scale_"))) / "lake"
    n2 = args.items + args.items // 100
    text, collab = generate(n2, args.text_dim, args.collab_dim)
    write_day(root, D1, text[:args.items], collab[:args.items])
    write_day(root, D2, text, collab)
    del text, collab
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.master, cfg.spark.driver_memory = args.master, "2g"
    cfg.spark.conf = {**cfg.spark.conf, "spark.ui.enabled": "false"}
    cfg.semantic_ids.epochs, cfg.semantic_ids.warm_epochs = args.epochs, args.warm_epochs
    cfg.semantic_ids.retrain_drift_threshold = 0.0
    spark = get_spark(cfg)
    results = {"items": args.items, "rss_before_mb": round(peak_rss_kb() / 1024)}
    for ds in (D1, D2):
        t0 = time.perf_counter()
        out = semantic_ids.run(spark, cfg, ds)
        results[ds] = {
            "seconds": round(time.perf_counter() - t0, 1), "driver_python_peak_mb": round(peak_rss_kb() / 1024),
            "mode": out["mode"], "items": out["items"], "new_items": out["new_items"],
            "train_rows": out["train"].get("rows"), "train_seconds": out["train"].get("seconds"),
            "assign_seconds": out["assign_seconds"], "last_codebook_size": out["last_codebook_size"],
            "collision_rate_after": [out[v]["collision_rate_after"] for v in ("search", "rec")],
            "level1_utilization": out["levels"]["shared_0"]["utilization"],
            "max_prefix_group": [out[v]["max_prefix_group"] for v in ("search", "rec")],
            "existing_id_change_share": out.get("existing_id_change_share"),
        }
        print(json.dumps({ds: results[ds]}), flush=True)
    spark.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
