"""Semantic-ID quality on Amazon Beauty: collisions, codebook utilization, prefix quality, daily stability.

Text view: wordllama (the frozen default encoder) over the item titles. Collaborative view: a STAND-IN until
the Spark ALS stage exists: a rank-64 truncated SVD (torch.svd_lowrank) of the user-item matrix built from the
training part of sequential_data.txt only (each user's last two items, the validation/test targets, left out
so IDs carry no test signal), rows weighted 1/sqrt(history length), item factors V * sqrt(S), L2-normalized.

Stability protocol: run 1 trains from scratch on 99% of the items (1% held out as "tomorrow's new items");
run 2 warm-starts from run 1 on 100% and the share of old items whose ID changed is reported. Both collision
methods (reassign, extra_code) are resolved from the same trained models. A cold retrain (new seed, no warm
start) is the reference that shows what the warm start buys.

    .venv/bin/python benchmarks/semantic_ids_beauty.py [--data-dir ../shared/data/amazon-beauty]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from synergen_core.config import SemanticIdConfig, TextEncoderConfig  # noqa: E402
from synergen_core.rqvae import (  # noqa: E402
    SemanticIds, assign, assign_with_candidates, id_metrics, resolve_collisions, train_rqvae,
)
from synergen_core.text_encoder import item_text, load_text_encoder  # noqa: E402
from synergen_core.vectors import unit_rows  # noqa: E402


def load_sequences(path: Path) -> list[list[int]]:
    return [[int(x) for x in line.split()[1:]] for line in path.read_text().splitlines() if line.strip()]


def load_titles(path: Path, n_items: int) -> list[str]:
    titles = [""] * (n_items + 1)  # index = p5 item id, 1-based
    with path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            titles[int(row["p5_item_id"])] = row["title"] or ""
    return titles[1:]


def collab_vectors(seqs: list[list[int]], n_items: int, rank: int, seed: int) -> np.ndarray:
    rows, cols, vals = [], [], []
    for u, s in enumerate(seqs):
        train = s[:-2]  # leave-one-out protocol: the last two are validation and test targets
        for i in train:
            rows.append(u)
            cols.append(i - 1)
            vals.append(1.0 / np.sqrt(len(train)))
    a = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals, dtype=torch.float32),
                                (len(seqs), n_items), check_invariants=True).coalesce()  # [users, items]
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(a, q=rank, niter=4)  # v [items, rank]
    x = (v * s.sqrt()).numpy()
    return unit_rows(x)


def align(prev: SemanticIds, prev_rows: np.ndarray, n: int) -> SemanticIds:
    # previous IDs scattered onto today's rows; -1 rows for items that had none
    out = [np.full((n, a.shape[1]), -1, np.int64) for a in (prev.raw, prev.search, prev.rec)]
    for o, a in zip(out, (prev.raw, prev.search, prev.rec)):
        o[prev_rows] = a
    return SemanticIds(*out)


METHODS = ("reassign", "extra_code")


def ids_for(model, t, c, method: str, previous: SemanticIds | None = None) -> SemanticIds:
    raw, cands, dists = assign_with_candidates(model, t, c, None if previous is None else previous.raw)
    return resolve_collisions(raw, cands, dists, model.cfg.model_copy(update={"collision": method}), previous)


def summary(metrics: dict) -> dict:
    keys = ("recon_text", "recon_collab", "search", "rec", "either_id_change_share")
    return {k: metrics[k] for k in keys if k in metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/amazon-beauty")
    ap.add_argument("--epochs", type=int, default=None, help="override semantic_ids.epochs")
    ap.add_argument("--holdout", type=float, default=0.01, help="share of items new on day 2")
    ap.add_argument("--rank", type=int, default=64, help="collaborative stand-in dimension")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-cold-reference", action="store_true", help="skip the from-scratch retrain (1/3 of the time)")
    # one thread by default: on 2 cores shared with other jobs, 2 torch threads ran 10-20x slower (spin-waiting)
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cfg = SemanticIdConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    timings, t_start = {}, time.time()
    load_start = os.getloadavg()[0]

    t0 = time.time()
    seqs = load_sequences(args.data_dir / "sequential_data.txt")
    n_items = max(max(s) for s in seqs)
    titles = load_titles(args.data_dir / "items_with_titles.tsv", n_items)
    text_cfg = TextEncoderConfig()
    enc = load_text_encoder(text_cfg)
    text = enc.encode([item_text(title=x, max_description_chars=text_cfg.max_description_chars) for x in titles])
    timings["embed_text_s"] = time.time() - t0
    t0 = time.time()
    collab = collab_vectors(seqs, n_items, args.rank, args.seed)
    timings["collab_svd_s"] = time.time() - t0

    rng = np.random.default_rng(args.seed)
    new = np.zeros(n_items, bool)
    new[rng.choice(n_items, int(round(args.holdout * n_items)), replace=False)] = True
    old_rows = np.nonzero(~new)[0]

    # day 1: cold training on the old items
    t0 = time.time()
    m1, h1 = train_rqvae(text[old_rows], collab[old_rows], cfg)
    timings["train_day1_s"] = time.time() - t0
    day1 = {k: ids_for(m1, text[old_rows], collab[old_rows], k) for k in METHODS}
    day1_metrics = {k: id_metrics(m1, text[old_rows], collab[old_rows], v) for k, v in day1.items()}

    # day 2 without retraining: new items only get IDs, old ones must not move
    coldstart = {}
    for k, prev in day1.items():
        p = align(prev, old_rows, n_items)
        ids = ids_for(m1, text, collab, k, p)
        coldstart[k] = id_metrics(m1, text, collab, ids, previous=p)

    # day 2 warm start: fine-tune yesterday's model on all items
    t0 = time.time()
    m2, h2 = train_rqvae(text, collab, cfg, state=m1.state_dict())
    timings["train_day2_warm_s"] = time.time() - t0
    warm, warm_no_hyst, raw_change = {}, {}, {}
    for k, prev in day1.items():
        p = align(prev, old_rows, n_items)
        warm[k] = id_metrics(m2, text, collab, ids_for(m2, text, collab, k, p), previous=p)
    m2.cfg = cfg.model_copy(update={"hysteresis": 0.0})  # ablation: the warm start alone
    for k, prev in day1.items():
        p = align(prev, old_rows, n_items)
        warm_no_hyst[k] = id_metrics(m2, text, collab, ids_for(m2, text, collab, k, p), previous=p)
    for name, h in (("no_hysteresis", 0.0), ("hysteresis", cfg.hysteresis)):
        m2.cfg = cfg.model_copy(update={"hysteresis": h})
        p = align(day1["reassign"], old_rows, n_items).raw
        raw_change[name] = float((p[old_rows] != assign(m2, text, collab, p)[old_rows]).any(1).mean())
    m2.cfg = cfg

    # reference: a cold retrain with another seed, as if no state were kept between days
    cold = {}
    if not args.skip_cold_reference:
        t0 = time.time()
        m3, _ = train_rqvae(text, collab, cfg.model_copy(update={"seed": args.seed + 1}))
        timings["train_day2_cold_s"] = time.time() - t0
        for k, prev in day1.items():
            p = align(prev, old_rows, n_items)
            cold[k] = id_metrics(m3, text, collab, ids_for(m3, text, collab, k, p), previous=p)
    timings["total_s"] = time.time() - t_start

    chosen = cfg.collision
    d1 = day1_metrics[chosen]
    result = {
        "benchmark": "semantic_ids_beauty",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    # other jobs share these 2 cores: the timings are only comparable at a similar load
                    "load_average_1m_start_end": [load_start, os.getloadavg()[0]]},
        "data": {"items": n_items, "items_with_title": int(sum(bool(x) for x in titles)),
                 "users": len(seqs), "new_items_day2": int(new.sum()),
                 "text_encoder": f"wordllama ({enc.dim}-d, titles)",
                 "collab_view": f"stand-in: rank-{args.rank} SVD of the training user-item matrix (ALS later)"},
        "config": cfg.model_dump(mode="json"),
        "timings_s": timings,
        "loss_day1": {"first_epoch": h1[0], "last_epoch": h1[-1]},
        "targets": {"collisions_after": 0, "level1_utilization_min": 0.8, "old_id_change_max": 0.05},
        "headline": {
            "collision_method": chosen,
            "collision_rate_after": max(warm[chosen]["search"]["collision_rate_after"],
                                        warm[chosen]["rec"]["collision_rate_after"]),
            "level1_utilization": d1["levels"][next(iter(d1["levels"]))]["utilization"],
            "old_id_change_share_warm": warm[chosen]["either_id_change_share"],
        },
        "raw_code_change_share_warm": raw_change,
        "day2_warm_start_no_hysteresis": {k: summary(v) for k, v in warm_no_hyst.items()},
        "day1": {k: {"levels": v["levels"], **summary(v)} for k, v in day1_metrics.items()},
        "day2_assign_only": {k: summary(v) for k, v in coldstart.items()},
        "day2_warm_start": {k: summary(v) for k, v in warm.items()},
        "day2_cold_retrain": {k: summary(v) for k, v in cold.items()},
    }
    head, w = result["headline"], warm
    md = (
        f"Amazon Beauty, {n_items:,} items ({int(new.sum())} new on day 2); text: wordllama titles; collaborative "
        f"view: {result['data']['collab_view']}. {torch.get_num_threads()} torch thread(s); "
        f"{timings['total_s']:.0f} s in all, day-1 training {timings['train_day1_s']:.0f} s.\n\n"
        "| collision handling | collisions before (search / rec) | after | ID length | old IDs changed, warm retrain |\n"
        "|---|---|---|---|---|\n"
        + "".join(
            f"| {k}{' (default)' if k == chosen else ''} | {day1_metrics[k]['search']['collision_rate_before']:.1%} / "
            f"{day1_metrics[k]['rec']['collision_rate_before']:.1%} | "
            f"{max(w[k]['search']['collision_rate_after'], w[k]['rec']['collision_rate_after']):.1%} | "
            f"{3 if k == 'reassign' else 4} | {w[k]['either_id_change_share']:.2%} |\n"
            for k in ("reassign", "extra_code") if k in w
        )
        + f"\nTargets: zero collisions after resolution (got {head['collision_rate_after']:.1%}), first-level "
        f"utilization ≥ 80% (got {head['level1_utilization']:.0%}), under 5% of old IDs changed by a warm-started "
        f"rerun with 1% new items (got {head['old_id_change_share_warm']:.2%}).\n"
    )
    write_result("semantic_ids_beauty", result, md)

    print(f"Beauty semantic IDs ({n_items} items, {int(new.sum())} new on day 2), total {timings['total_s']:.0f} s")
    print(f"level-1 utilization {result['headline']['level1_utilization']:.1%}, per level:",
          ", ".join(f"{k} {v['utilization']:.0%}/ppl {v['perplexity']:.0f}" for k, v in d1["levels"].items()))
    for k in ("reassign", "extra_code"):
        d, w, c, a = day1_metrics[k], warm[k], cold.get(k), coldstart[k]
        print(f"[{k}] collisions before {d['search']['collision_rate_before']:.1%} (search) / "
              f"{d['rec']['collision_rate_before']:.1%} (rec), after {d['search']['collision_rate_after']:.1%} / "
              f"{d['rec']['collision_rate_after']:.1%}; old IDs changed: assign-only "
              f"{a['either_id_change_share']:.2%}, warm {w['either_id_change_share']:.2%} "
              f"(without hysteresis {warm_no_hyst[k]['either_id_change_share']:.2%})"
              + (f", cold retrain {c['either_id_change_share']:.2%}" if c else ""))
    for v, vec in (("search", "text"), ("rec", "collab")):
        ps = d1[v]["prefix_similarity"][vec]
        print(f"{v} ID first code: {vec} cosine same-prefix {ps['same_prefix']:.3f} vs random {ps['random']:.3f}")
    print(f"raw codes changed by warm start: {raw_change['hysteresis']:.2%} "
          f"(without hysteresis {raw_change['no_hysteresis']:.2%})")


if __name__ == "__main__":
    main()
