"""Offline quality of SynerGen against its baselines, one table per dataset, mean ± std over seeds.

* Amazon Beauty (P5 / S3-Rec / TIGER split): leave-one-out, full-catalog ranking, recommendation only
  (the data has no queries). The published figures of ``../shared/data/README.md`` are shown beside ours.
* MovieLens (ml-latest-small), tags as search queries (HyperSaR): leave-one-out per task, both tasks.
* movielens_search: the same data with each tagging user's last 20 tags as search test targets (hundreds
  instead of 43), for the paired comparison of joint training with search-only.

Every dataset goes through the real pipeline once (ingest -> validate -> sessionize, cached under
``--work``), then for every seed every variant is trained (``jobs.train.run``) and everything is scored
by ``jobs.evaluate.run``: the trained variants and the untrained baselines, on the same test targets.
Training time per run is the wall time of the optimizer steps (``train_seconds``) plus the side inputs
(text vectors, RQ-VAE) of the full model's run.

    .venv/bin/python -m benchmarks.quality                       # 3 seeds, 20 epochs, both datasets
    .venv/bin/python -m benchmarks.quality --seeds 1 --epochs 2  # a quick check
    .venv/bin/python -m benchmarks.quality --set model.dropout=0.5   # any setting, kept in the recorded command

A run replaces only the tables of the datasets it ran: each dataset keeps the command, date and revision
that produced its table, so datasets tuned with different settings can be rerun one at a time. With
``--add`` it adds its variants to the dataset's table instead (the same seeds, epochs and overrides),
so a table too long for one sitting is run in parts, each part's command listed under the table's:

    .venv/bin/python -m benchmarks.quality --datasets beauty --variants no_time_rope --add --set ...
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, ROOT, SHARED_DATA, command, git_revision, write_result, write_summary
from synergen_core.config import Config, with_overrides

DATASETS = {
    "beauty": {"format": "amazon-seq", "path": SHARED_DATA / "amazon-beauty", "tasks": ["rec"],
               "about": "Recommendation only (the data has no queries): each user's last item against the whole "
                        "catalog. Published rows: `../shared/data/README.md`; RecBole's SASRec ranks consumed items (compare it "
                        "with the \"consumed items ranked too\" rows), the README does not say how the others did.",
               "variants": ["synergen", "sasrec", "no_time_rope", "no_text", "no_semantic_ids"]},
    "movielens": {"format": "movielens", "path": SHARED_DATA / "movielens-small", "tasks": ["search", "rec"],
                  "about": "search = the movie a user tagged, with the tag as the query (test: the last tag of each "
                           "user with at least 3); rec = the next rated movie. Tags are 3.5% of the events.",
                  "variants": ["synergen", "sasrec", "rec_only", "search_only", "no_time_rope", "no_text",
                               "no_semantic_ids"]},
    # MovieLens has 43 users with 3 tags or more, so its leave-one-out search test set is 43 targets; here
    # each of them leaves out their last 20 tags (at most all but two): hundreds of search targets, a test set
    # whose paired intervals can tell joint training from search-only. Rec is the same as movielens'.
    "movielens_search": {"format": "movielens", "path": SHARED_DATA / "movielens-small", "tasks": ["search", "rec"],
                         "sessionize": {"loo_search_tests": 20}, "protocol": "leave-N-out for search",
                         "about": "MovieLens as above, but each user with at least 3 tags leaves out their last 20 "
                                  "tags (`sessionize.loo_search_tests=20`, at most all but two: one is the "
                                  "validation target, one stays for training) as search test targets; rec = the "
                                  "next rated movie, as in the movielens table.",
                         "variants": ["synergen", "rec_only", "search_only"]},
}
PUBLISHED_BEAUTY = {  # ../shared/data/README.md: R@5, N@5, R@10, N@10
    "SASRec (TIGER paper)": (0.0387, 0.0249, 0.0605, 0.0318),
    "TIGER": (0.0454, 0.0321, 0.0648, 0.0384),
    "HSTU (target)": (0.0486, 0.0340, 0.0708, 0.0412),
    "LC-Rec": (0.0525, 0.0352, 0.0791, 0.0438),
    "SASRec full CE, public re-run (aim)": (0.0601, 0.0420, 0.0859, 0.0503),
    "SASRec full CE, RecBole 1.2.1": (0.0567, 0.0328, 0.0844, 0.0417),
}
KS = (5, 10, 20, 50)
# Paired comparisons on the same test targets: (model, against, task). Each target's NDCG@10 is averaged
# over the seeds, then the mean difference gets a bootstrap interval over the targets, so the table says
# whether a gap is larger than which targets happened to be drawn (MovieLens has 43 search targets;
# movielens_search has hundreds).
PAIRS = (("synergen", "rec_only", "rec"), ("synergen", "search_only", "search"), ("synergen", "sasrec", "rec"))
PAIRED_K = 10
BOOTSTRAP = 10_000


def prepare(name: str, work: Path) -> tuple[Config, str]:
    """The dataset's lake (ingested, validated, sessionized), built on first use; (config, ds)."""
    from jobs import ingest, sessionize, validate

    spec = DATASETS[name]
    cfg = Config()
    cfg.lake.root = work / name / "lake"
    cfg.sessionize.splits = ["loo"]
    for key, value in spec.get("sessionize", {}).items():
        setattr(cfg.sessionize, key, value)
    marker = work / name / "prepared.json"
    if marker.is_file():
        return cfg, json.loads(marker.read_text())["ds"]
    t0 = time.perf_counter()
    ingest.run(cfg, spec["format"], spec["path"])
    days = sorted(set(cfg.layout.days(cfg.layout.raw("browse_events"))) | set(cfg.layout.days(cfg.layout.raw("search_events"))))
    validate.run_range(cfg, days[0], days[-1])
    sessionize.stage(cfg, days[-1], from_ds=days[0])
    marker.write_text(json.dumps({"ds": days[-1], "seconds": round(time.perf_counter() - t0, 1)}))
    return cfg, days[-1]


def run_seed(cfg: Config, ds: str, variants: list[str], seed: int) -> dict:
    """Train every variant with ``seed`` and evaluate them with the baselines: {scorer: metrics}."""
    from jobs import evaluate, train

    cfg = cfg.model_copy(deep=True)
    cfg.train.seed = cfg.semantic_ids.seed = seed
    cfg.train.output = f"{cfg.train.output}-seed{seed}"  # --set train.output=... keeps tuning runs apart
    t0 = time.perf_counter()
    trained = train.run(cfg, ds, variants=variants, protocols=["loo"])
    prepare_s = trained["loo"]["prepare_seconds"]
    kept = {}
    if cfg.evaluate.exclude_consumed:  # the same models ranking the consumed items too, for comparison
        plain = cfg.model_copy(deep=True)
        plain.evaluate.exclude_consumed = []
        kept = evaluate.run(plain, ds, variants=variants, protocols=["loo"])["loo"]["scorers"]
    result = evaluate.run(cfg, ds, variants=variants, protocols=["loo"])["loo"]  # last: its files stay
    paired = per_target_ndcg(cfg, ds, [v for v in variants if any(v in pair[:2] for pair in PAIRS)])
    out = {}
    for name, metrics in result["scorers"].items():
        summary = trained["loo"]["models"].get(name)
        out[name] = {
            "catalog": metrics["catalog"], "ranking": metrics["ranking"],
            "ranking_retrieval": metrics.get("ranking_retrieval"),  # the same lists by retrieval scores
            "catalog_consumed_kept": kept[name]["catalog"] if name in kept else None,
            "train_seconds": None if summary is None else summary["train_seconds"] + (prepare_s if name == "synergen" else 0),
            "epochs_run": None if summary is None else summary["epochs_run"],
            "best_valid": None if summary is None else summary.get("best_valid"),  # what defaults are tuned on
            **({f"per_target_ndcg@{PAIRED_K}": paired[name]} if name in paired else {}),
        }
    return {"scorers": out, "test_targets": result["test_targets"], "seconds": round(time.perf_counter() - t0, 1),
            "features": trained["loo"]["features"]}


def per_target_ndcg(cfg: Config, ds: str, variants: list[str]) -> dict:
    """{variant: {task: {"n": targets, "hits": [[target row, NDCG@PAIRED_K], ...] where it is not 0}}} for
    the trained ``variants``, ranked as ``jobs.evaluate`` ranks them (sparse: most targets score 0)."""
    from synergen_core import checkpoint
    from synergen_core.data import load_test
    from synergen_core.evaluate import ModelScorer, catalog_ranks
    from synergen_core.metrics import ndcg_at_k
    from synergen_core.train import pick_device

    test, _ = load_test(cfg.layout, ds, "loo", cfg.model.max_seq_len)
    device, root = pick_device(cfg.train), cfg.layout.model_dir(ds, "loo")
    out = {}
    for v in variants:
        scorer = ModelScorer(checkpoint.load_model(root / v, device), v, device)
        ranks = catalog_ranks(scorer, test, cfg.evaluate.batch_size, tuple(cfg.evaluate.exclude_consumed))
        out[v] = {}
        for task, (greater, ties) in ranks.items():
            ndcg = ndcg_at_k(greater, ties, PAIRED_K)
            out[v][task] = {"n": len(ndcg), "hits": [[int(i), round(float(ndcg[i]), 6)] for i in np.nonzero(ndcg)[0]]}
    return out


def _dense(sparse: dict) -> np.ndarray:
    x = np.zeros(sparse["n"])
    for i, v in sparse["hits"]:
        x[i] = v
    return x


def paired(runs: list[dict]) -> list[dict]:
    """For each of ``PAIRS`` whose two models have per-target figures in every run: the mean over test
    targets of (model - against) NDCG@PAIRED_K, each target first averaged over the seeds, with a 95%
    bootstrap interval over the targets and the targets where the model is better / worse."""
    key, out = f"per_target_ndcg@{PAIRED_K}", []
    for model, against, task in PAIRS:
        per_seed = []
        for r in runs:
            a, b = r["scorers"].get(model, {}).get(key, {}), r["scorers"].get(against, {}).get(key, {})
            if task not in a or task not in b:
                break
            per_seed.append(_dense(a[task]) - _dense(b[task]))
        else:
            if not per_seed:
                continue
            diff = np.mean(per_seed, axis=0)  # [targets]
            idx = np.random.default_rng(0).integers(0, len(diff), (BOOTSTRAP, len(diff)))
            lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
            out.append({"model": model, "against": against, "task": task, "targets": len(diff),
                        "mean_diff": float(diff.mean()), "ci95": [float(lo), float(hi)],
                        "better": int((diff > 0).sum()), "worse": int((diff < 0).sum())})
    return out


def paired_table(comparisons: list[dict], n_seeds: int) -> str:
    if not comparisons:
        return ""
    lines = [f"Paired on the same test targets: each target's NDCG@{PAIRED_K} averaged over the {n_seeds} seeds, "
             "the mean difference with a 95% bootstrap interval over the targets (an interval that holds 0: the "
             "gap is within what the draw of test targets alone would give).", "",
             f"| model − against | task | targets | mean N@{PAIRED_K} difference | 95% interval | targets better / worse |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['model']} − {c['against']} | {c['task']} | {c['targets']:,} | {c['mean_diff']:+.4f} | "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['better']} / {c['worse']} |")
    return "\n".join(lines)


def aggregate(runs: list[dict]) -> dict:
    """Per scorer and figure: mean and std over seeds."""
    out: dict = {}
    for name in runs[0]["scorers"]:
        rows = [r["scorers"][name] for r in runs]
        agg: dict = {}
        for task in rows[0]["catalog"]:
            for key in rows[0]["catalog"][task]:
                vals = [r["catalog"][task][key] for r in rows]
                agg[f"{task}.{key}"] = (float(np.mean(vals)), float(np.std(vals)))
            if all(r.get("catalog_consumed_kept") for r in rows):
                for key in rows[0]["catalog_consumed_kept"][task]:
                    vals = [r["catalog_consumed_kept"][task][key] for r in rows]
                    agg[f"kept.{task}.{key}"] = (float(np.mean(vals)), float(np.std(vals)))
            if "auc" in rows[0]["ranking"].get(task, {}):
                vals = [r["ranking"][task]["auc"] for r in rows]
                agg[f"{task}.rank_auc"] = (float(np.mean(vals)), float(np.std(vals)))
            if all(task in (r.get("ranking_retrieval") or {}) for r in rows):  # runs before it was recorded lack it
                vals = [r["ranking_retrieval"][task]["auc"] for r in rows]
                agg[f"{task}.retrieval_auc"] = (float(np.mean(vals)), float(np.std(vals)))
        if all(r.get("best_valid") is not None for r in rows):  # tables before it was recorded lack it
            vals = [r["best_valid"] for r in rows]
            agg["valid"] = (float(np.mean(vals)), float(np.std(vals)))
        if rows[0]["train_seconds"] is not None:
            vals = [r["train_seconds"] for r in rows]
            agg["train_seconds"] = (float(np.mean(vals)), float(np.std(vals)))
        out[name] = agg
    return out


def added(old: dict | None, new: dict, name: str) -> dict:
    """``old``'s table with ``new``'s trained variants added (or replaced), seed by seed.

    Only runs of the same settings mix: the same seeds, epochs, test targets, exclusion and overrides
    (``train.output`` aside, it only names where the models go). Each addition keeps its command, date
    and revision, which the table lists under its own.
    """
    refuse_addition(old, new, name)
    variants = [*old["variants"], *[v for v in new["variants"] if v not in old["variants"]]]
    runs = []
    for o, n in zip(old["runs"], new["runs"]):
        scorers = {**o["scorers"], **n["scorers"]}  # the untrained baselines are the same in both
        order = [*variants, *[k for k in scorers if k not in variants]]  # trained first, as in one run
        runs.append({**o, "scorers": {k: scorers[k] for k in order}, "seconds": o["seconds"] + n["seconds"]})
    addition = {k: new[k] for k in ("command", "date", "git_revision", "variants")}
    return {**old, "variants": variants, "runs": runs, "mean_std": aggregate(runs),
            "additions": [*old.get("additions", []), addition], "seconds": old["seconds"] + new["seconds"]}


def refuse_addition(old: dict | None, new: dict, name: str) -> None:
    """Stop unless ``new`` (a run, or the settings of one about to start) may be added to ``old``."""
    if old is None:
        raise SystemExit(f"--add: there is no recorded {name} table to add to")

    def settings(fig: dict) -> dict:
        return {"seeds": fig["seeds"], "epochs": fig["epochs"], "exclude_consumed": fig.get("exclude_consumed", []),
                "overrides": sorted(o for o in fig["overrides"] if not o.startswith("train.output=")),
                **({"test_targets": fig["test_targets"]} if "test_targets" in new else {})}

    if settings(old) != settings(new):
        raise SystemExit(f"--add: the recorded {name} table was made with {settings(old)}, this run with "
                         f"{settings(new)}; rerun with the same settings or without --add")


def _cell(agg: dict, key: str, digits: int = 4) -> str:
    if key not in agg:
        return "—"
    m, s = agg[key]
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(name: str, fig: dict) -> str:
    """The dataset's markdown table, headed by the command that produced it."""
    agg, tasks, n_seeds = fig["mean_std"], DATASETS[name]["tasks"], len(fig["seeds"])
    cols = [f"{t}.{m}@{k}" for t in tasks for k in KS for m in ("recall", "ndcg")]
    head = ["model", *[c.replace("recall@", "R@").replace("ndcg@", "N@") for c in cols], f"rank AUC ({' / '.join(tasks)})",
            f"retrieval-score AUC ({' / '.join(tasks)})", "valid", "train s"]
    protocol = DATASETS[name].get("protocol", "leave-one-out")
    lines = [f"### {name} ({protocol}, full catalog, {n_seeds} seed{'s' * (n_seeds > 1)})", "",
             f"`{fig['command']}` — {fig['date']}, revision {fig['git_revision']}", "",
             *[f"Added with `--add` ({', '.join(a['variants'])}): `{a['command']}` — {a['date']}, revision "
               f"{a['git_revision']}\n" for a in fig.get("additions", [])],
             DATASETS[name]["about"] + " Test targets: "
             + ", ".join(f"{t} {fig['test_targets'][t]:,}" for t in tasks) + ". rank AUC: the ranking head on 1 engaged + "
             "99 popularity-sampled items per request; retrieval-score AUC: the same lists ordered by the "
             "model's retrieval scores, so the two columns show what the ranking stage adds. train s: optimizer steps, plus text vectors and RQ-VAE "
             "for synergen's run. valid: the validation figure early stopping kept (`train.valid_metric` on the "
             "validation targets, geometric mean over the trained tasks), the only figure settings are chosen on."
             + _exclusion_note(fig, tasks), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scorer, a in agg.items():
        auc = " / ".join(_cell(a, f"{t}.rank_auc", 3) for t in tasks if f"{t}.rank_auc" in a) or "—"
        by_retrieval = " / ".join(_cell(a, f"{t}.retrieval_auc", 3) for t in tasks if f"{t}.retrieval_auc" in a) or "—"
        lines.append("| " + " | ".join([scorer, *[_cell(a, c) for c in cols], auc, by_retrieval,
                                        _cell(a, "valid"), _cell(a, "train_seconds", 0)]) + " |")
    for scorer, a in agg.items():
        if any(k.startswith("kept.") for k in a) and scorer != "popularity":
            lines.append("| " + " | ".join([f"{scorer}, consumed items ranked too", *[_cell(a, f"kept.{c}") for c in cols],
                                            "—", "—", "—", "—"]) + " |")
    if name == "beauty":
        for ref, (r5, n5, r10, n10) in PUBLISHED_BEAUTY.items():
            vals = {"rec.recall@5": r5, "rec.ndcg@5": n5, "rec.recall@10": r10, "rec.ndcg@10": n10}
            lines.append("| " + " | ".join([f"{ref} (published)", *[f"{vals[c]:.4f}" if c in vals else "—" for c in cols],
                                            "—", "—", "—", "—"]) + " |")
    pairs = paired_table(paired(fig["runs"]), n_seeds)
    return "\n".join(lines) + (f"\n\n{pairs}" if pairs else "")


def _exclusion_note(fig: dict, tasks: list[str]) -> str:
    excluded = [t for t in tasks if t in fig.get("exclude_consumed", [])]
    if not excluded:
        return " Consumed items are ranked like any other item."
    return (f" {' and '.join(excluded)}: the items a user engaged with before the request are left out of the "
            "ranking, as the served lists leave them out (`evaluate.exclude_consumed`, the default; S3-Rec's "
            "evaluation code masks them too, RecBole's does not for sequential models); the rows \"consumed items ranked too\" score the same models without that.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["beauty", "movielens"])
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (42, 43, ...)")
    ap.add_argument("--epochs", type=int, default=20,
                    help="train.epochs (early stopping on validation NDCG@10 usually ends sooner)")
    ap.add_argument("--variants", nargs="+", help="override the trained variants of every dataset")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "quality", help="lakes and models")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                    help="configuration overrides for training and evaluation (e.g. model.dropout=0.5)")
    ap.add_argument("--add", action="store_true",
                    help="add this run's trained variants to the dataset's recorded table instead of replacing "
                         "it (same seeds, epochs and overrides, train.output aside): a long table in parts")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite BENCHMARKS.md's tables from benchmarks/results/quality.json (no training)")
    args = ap.parse_args()
    if args.render:
        meta = json.loads((RESULTS / "quality.json").read_text())
        figures = previous_figures()
        write_summary(meta, "\n\n".join(table(name, fig) for name, fig in figures.items()))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    revision = git_revision()  # the code that runs: taken before a run that can outlast a commit
    figures = {}
    for name in args.datasets:
        t0 = time.perf_counter()
        cfg, ds = prepare(name, args.work)
        cfg = with_overrides(cfg, args.set)
        cfg.train.progress = False
        cfg.train.threads = args.threads
        cfg.train.epochs = args.epochs
        variants = args.variants or DATASETS[name]["variants"]
        if args.add:  # before hours of training, not after
            refuse_addition(previous_figures().get(name), {
                "seeds": list(range(42, 42 + args.seeds)), "epochs": cfg.train.epochs, "overrides": args.set,
                "exclude_consumed": list(cfg.evaluate.exclude_consumed)}, name)
        runs = []
        for seed in range(42, 42 + args.seeds):
            runs.append(run_seed(cfg, ds, variants, seed))
            print(f"{name} seed {seed}: {runs[-1]['seconds']} s", flush=True)
        agg = aggregate(runs)
        figures[name] = {"command": command(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         "git_revision": revision, "ds": ds, "seeds": list(range(42, 42 + args.seeds)), "epochs": cfg.train.epochs,
                         "variants": variants, "overrides": args.set, "test_targets": runs[0]["test_targets"],
                         "exclude_consumed": list(cfg.evaluate.exclude_consumed),
                         "features": runs[0]["features"], "mean_std": agg, "runs": runs,
                         "seconds": round(time.perf_counter() - t0, 1)}
        if args.add:
            figures[name] = added(previous_figures().get(name), figures[name], name)
        print(table(name, figures[name]) + "\n", flush=True)
    figures = {**previous_figures(), **figures}
    figures = {name: figures[name] for name in DATASETS if name in figures}
    write_result("quality", figures, "\n\n".join(table(name, fig) for name, fig in figures.items()))


def previous_figures() -> dict:
    """The datasets of the last recorded run, each with the command that produced it."""
    path = RESULTS / "quality.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    for fig in old["figures"].values():  # results written before each dataset kept its own command
        for key in ("command", "date", "git_revision"):
            fig.setdefault(key, old[key])
    return old["figures"]


if __name__ == "__main__":
    main()
