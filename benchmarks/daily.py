"""Daily retraining on generated logs: warm start from the champion against a full retrain every day.

Two runs of the whole DAG (``synergen run``: generated logs, the first day validated as history, then
``airflow dags test`` for each of the next ``--days`` days, as a scheduler would run them), alike but for
``train.warm_start`` (on: the default; off: every day trains from scratch). Per DAG day, from the files the
stages leave:

* the training plan (``train.json``'s ``start``: warm or full, and why) and the training time of the model
  the DAG registers (``temporal/synergen``);
* its offline test figures (``evaluation.json``: the day's temporal test targets ranked against the catalog,
  consumed items excluded for rec), Recall@10 and NDCG@10 per task;
* what was served (``evaluation.json``'s ``served``: the lists published the day before, scored by the
  champion of that day, against this day's engagements).

The issue's target: each day's quality within 2% (relative) of the full retrain's, at no more than a third of
its training time. Days the plan trains in full in both runs (no champion yet; semantic IDs or items that
changed past ``train.max_*_share``; ``train.full_retrain_days``) compare a full retrain with itself.

    .venv/bin/python -m benchmarks.daily --days 8      # ~50 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from benchmarks.common import ROOT, write_result
from synergen_core.config import Config

MODES = {"warm": True, "full": False}
K = 10


def day_figures(cfg: Config, ds: str) -> dict:
    """The day's plan, training time, offline test and served figures (see the module doc)."""
    train = json.loads((cfg.layout.model_dir(ds, "temporal", "synergen") / "train.json").read_text())
    evaluation = json.loads((cfg.layout.model_dir(ds) / "evaluation.json").read_text())
    catalog = evaluation["temporal"]["scorers"]["synergen"]["catalog"]
    served = evaluation.get("served") or {}
    start = train.get("start") or {}
    return {
        "plan": start.get("mode"), "why": start.get("reason"), "train_seconds": train["train_seconds"],
        "steps": train["steps"],
        "test": {task: {m: catalog[task][f"{m}@{K}"] for m in ("recall", "ndcg")} | {"n": catalog[task]["n"]}
                 for task in catalog},
        "served": ({s: {m: v[f"{m}@{K}"] for m in ("recall", "ndcg")} | {"lists": v["with_engagement"]}
                    for s, v in served["surfaces"].items()} if served.get("available") else None),
    }


def series(work: Path, mode: str, days: int, events_per_day: int, seed: int) -> dict:
    """One DAG series in ``work/<mode>``; -> {ds: day_figures} and the wall time."""
    from jobs import pipeline

    base = work / mode
    shutil.rmtree(base, ignore_errors=True)
    cfg = Config()
    cfg.lake.root = base / "var" / "lake"
    cfg.mlflow.tracking_uri = f"sqlite:///{base / 'var' / 'mlflow.db'}"
    cfg.mlflow.artifact_root = base / "var" / "mlartifacts"
    cfg.generate = cfg.generate.model_copy(update={"days": days + 1, "events": events_per_day * (days + 1),
                                                   "seed": seed})
    cfg.train = cfg.train.model_copy(update={"warm_start": MODES[mode]})
    t0 = time.perf_counter()
    result = pipeline.run_default(cfg, airflow_home=base / "airflow", dag_days=days)
    cfg = pipeline.absolute(cfg)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "days": {ds: day_figures(cfg, ds) for ds in result["dag_run_days"]}}


def compare(runs: dict) -> dict:
    """Per day: warm / full ratios of the test NDCG@10 and Recall@10 per task and of the training time."""
    out = {}
    for ds, w in runs["warm"]["days"].items():
        f = runs["full"]["days"][ds]
        out[ds] = {"plans": f"{w['plan']} / {f['plan']}",
                   "train_time_ratio": w["train_seconds"] / max(f["train_seconds"], 1e-9),
                   **{f"{task}.{m}": w["test"][task][m] / f["test"][task][m] if f["test"][task][m] else None
                      for task in f["test"] for m in ("recall", "ndcg")}}
    return out


def summary(fig: dict) -> str:
    runs, cmp = fig["runs"], fig["compare"]
    lines = [f"Generated logs ({fig['events_per_day']:,} events a day, seed {fig['seed']}), the DAG for {fig['days']} "
             "days after one history day, twice: warm start on (the default) and off (a full retrain every "
             "day). The model the DAG registers (temporal / synergen): its plan, training time and test "
             f"figures at K = {K} (the day's temporal test targets, whole catalog); warm / full ratios.", "",
             "| day | plan warm / full | train s warm / full | rec R@10 warm / full | rec N@10 warm / full | "
             "search N@10 warm / full | N@10 ratio rec, search | time ratio | served rec N@10 warm / full |",
             "|---|---|---|---|---|---|---|---|---|"]
    def served(d: dict) -> str:  # the lists of the day before, scored by that day's champion
        rec = (d["served"] or {}).get("rec")
        return f"{rec['ndcg']:.4f}" if rec else "-"

    for ds, c in cmp.items():
        w, f = runs["warm"]["days"][ds], runs["full"]["days"][ds]
        t = lambda d, task, m: d["test"].get(task, {}).get(m, float("nan"))  # noqa: E731
        lines.append(
            f"| {ds} | {c['plans']} | {w['train_seconds']:.1f} / {f['train_seconds']:.1f} | "
            f"{t(w, 'rec', 'recall'):.4f} / {t(f, 'rec', 'recall'):.4f} | {t(w, 'rec', 'ndcg'):.4f} / "
            f"{t(f, 'rec', 'ndcg'):.4f} | {t(w, 'search', 'ndcg'):.4f} / {t(f, 'search', 'ndcg'):.4f} | "
            f"{c.get('rec.ndcg') or float('nan'):.3f}, {c.get('search.ndcg') or float('nan'):.3f} | "
            f"{c['train_time_ratio']:.2f} | {served(w)} / {served(f)} |")
    warm_days = [ds for ds, c in cmp.items() if c["plans"].startswith("warm")]
    lines += ["", f"Days trained warm: {len(warm_days)} of {len(cmp)}. Why each full day was full (warm run): "
              + "; ".join(f"{ds}: {runs['warm']['days'][ds]['why']}" for ds in cmp if ds not in warm_days) + ".",
              "", f"Whole series: warm {runs['warm']['seconds']:.0f} s, full {runs['full']['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=8, help="DAG days after the history day")
    ap.add_argument("--events-per-day", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "daily")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = {}
    for mode in MODES:
        runs[mode] = series(args.work, mode, args.days, args.events_per_day, args.seed)
        (args.work / f"{mode}.json").write_text(json.dumps(runs[mode], indent=2))
        print(mode, json.dumps(runs[mode])[:2000], flush=True)
    fig = {"days": args.days, "events_per_day": args.events_per_day, "seed": args.seed, "runs": runs,
           "compare": compare(runs)}
    write_result("daily", fig, summary(fig))


if __name__ == "__main__":
    main()
