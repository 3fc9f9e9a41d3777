"""The input of the stage-3 tests (embeddings, collaborative vectors, semantic IDs): two generated days
(jobs.generate: a few thousand events, 300 items + 15 new and 2 changed on day 2) through validate and
sessionize. Built once per test session (sessionizing dominates the time) and copied per test module."""
from __future__ import annotations

import shutil
from pathlib import Path

from jobs import generate, sessionize, validate
from synergen_core.config import Config

D1, D2 = "2026-01-01", "2026-01-02"
_BUILT: dict[str, Path] = {}


def stage3_config(root: Path) -> Config:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.shuffle_partitions = 2
    cfg.sessionize.splits = []  # the splits are not read by stage 3
    g = cfg.generate
    g.start_ds, g.days, g.events, g.users, g.items, g.categories = D1, 2, 3000, 150, 300, 8
    g.new_item_share_per_day = 0.05
    e = cfg.embeddings
    e.als_rank, e.als_max_iter, e.fallback_neighbours = 8, 5, 5
    s = cfg.semantic_ids
    s.latent_dim, s.hidden_dims, s.codebook_size, s.candidates = 8, [32], 32, 16
    s.epochs, s.batch_size, s.warm_epochs, s.dead_code_interval, s.seed = 30, 128, 3, 10, 0
    return cfg


def sessionized_lake(spark, tmp_path_factory, name: str) -> Path:
    """A private copy of the generated, validated and sessionized two-day lake."""
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("stage3_source") / "lake"
        cfg = stage3_config(root)
        days = generate.run(cfg, D1)["days"]
        validate.run_range(cfg, days[0], days[-1])
        for ds in days:
            sessionize.run(spark, cfg, ds)
        _BUILT["root"] = root
    return copy_lake(_BUILT["root"], tmp_path_factory.mktemp(name) / "lake")


def copy_lake(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
