"""Training speed per epoch on Amazon Beauty: RecBole 1.2.1's SASRec against the in-project models of the
same size, in one run on the same machine and threads.

``../shared/data/README.md`` gives the reference: RecBole's SASRec with full cross-entropy (hidden size 64,
2 layers, max length 50, batch 256) takes about 190 s per training epoch on 2 CPU cores, and an in-project
model of the same size should train an epoch at least twice as fast. Both sides here use that size (2 heads
and an MLP of 4 x 64 as RecBole's defaults, dropout 0.5) and are scored after every epoch on the validation
items with consumed items ranked too (RecBole's protocol), so a faster epoch is seen not to learn less.

What an epoch is differs, and is the reason for the gap: RecBole trains on every prefix of every sequence
as its own sample (one target each); the in-project models train on each user's window once with a target
at every position (about one window per user here), the same targets in fewer, longer forward passes.

RecBole runs in its own environment (``make recbole-venv``: its pins need numpy 1) through
``benchmarks/recbole_sasrec.py``, which imports nothing from the project.

    make recbole-venv && .venv/bin/python -m benchmarks.epoch_speed   # RecBole 3 epochs, ours 10: ~30 min
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path

import torch

from benchmarks.common import ROOT, SHARED_DATA, write_result
from benchmarks.quality import prepare
from synergen_core import checkpoint
from synergen_core.config import with_overrides

SAME_SIZE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=50", "model.mlp=gelu",
             "model.mlp_ratio=4", "model.norm=layernorm", "model.dropout=0.5", "train.batch_size=256",
             "train.lr=1e-3", "train.clip_grad=null", "evaluate.exclude_consumed=[]"]
VARIANTS = ["sasrec", "synergen"]


def recbole_run(python: Path, work: Path, epochs: int, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "recbole.json"
    subprocess.run([str(python), str(ROOT / "benchmarks" / "recbole_sasrec.py"),
                    "--sequences", str(SHARED_DATA / "amazon-beauty" / "sequential_data.txt"),
                    "--work", str(work / "recbole"), "--out", str(out), "--epochs", str(epochs),
                    "--threads", str(threads)], check=True, cwd=work)  # RecBole logs into its working folder
    res = json.loads(out.read_text())
    res["per_epoch_seconds"] = [e["train_seconds"] for e in res["epochs"]]
    res["valid"] = [{k: e["valid"][k] for k in ("recall@10", "ndcg@10")} for e in res["epochs"]]
    return res


def project_runs(work: Path, epochs: int, threads: int) -> dict:
    from jobs import train

    cfg, ds = prepare("beauty", work)
    cfg = with_overrides(cfg, SAME_SIZE + [f"train.epochs={epochs}", f"train.patience={epochs + 1}",
                                           "train.output=models-epoch-speed", "train.resume=false"])
    cfg.train.threads, cfg.train.progress = threads, False
    trained = train.run(cfg, ds, variants=VARIANTS, protocols=["loo"])["loo"]
    out = {}
    for name, s in trained["models"].items():
        elapsed = [0.0] + [h["train_seconds"] for h in s["history"]]
        record = checkpoint.load(Path(s["out_dir"]) / checkpoint.MODEL)
        model = checkpoint.build_from_record(record)
        out[name] = {"per_epoch_seconds": [round(b - a, 2) for a, b in zip(elapsed, elapsed[1:])],
                     "steps_per_epoch": s["steps"] // max(s["epochs_run"], 1), "windows": trained["windows"],
                     "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "valid": [{k: h["valid"]["rec"][k] for k in ("recall@10", "ndcg@10")} for h in s["history"]]}
    out["synergen"]["side_inputs_seconds"] = trained["prepare_seconds"]  # text vectors + RQ-VAE, once per run
    return out


def seconds_to_reach(run: dict, recall: float) -> float | None:
    """Training seconds until validation Recall@10 first reaches ``recall`` (None: not within the run)."""
    elapsed = 0.0
    for seconds, valid in zip(run["per_epoch_seconds"], run["valid"]):
        elapsed += seconds
        if valid["recall@10"] >= recall:
            return round(elapsed, 1)
    return None


def summary(fig: dict) -> str:
    target = fig["recbole_sasrec"]["valid"][-1]["recall@10"]
    lines = ["| model | parameters | samples per epoch | steps per epoch | epochs | train s per epoch | speed-up per "
             f"epoch | train s to valid R@10 {target:.4f} | valid R@10 after each epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in ["recbole_sasrec", *VARIANTS]:
        r, reached = fig[key], fig["seconds_to_recbole_valid_recall"][key]
        name = "RecBole 1.2.1 SASRec" if key == "recbole_sasrec" else f"in-project {key}"
        samples = r.get("training_samples", r.get("windows"))
        curve = ", ".join(f"{v['recall@10']:.4f}" for v in r["valid"])
        lines.append(f"| {name} | {r['parameters']:,} | {samples:,} | {r['steps_per_epoch']} | {len(r['valid'])} | "
                     f"{_mean(r['per_epoch_seconds']):.1f} | {fig['speed_up_per_epoch'].get(key, 1.0):.1f}x | "
                     f"{'not reached' if reached is None else f'{reached:.0f}'} | {curve} |")
    return ("Amazon Beauty, leave-one-out; every model at RecBole's SASRec size (hidden 64, 2 layers, 2 heads, MLP "
            "256, max length 50, dropout 0.5, batch 256, lr 1e-3, full cross-entropy), 2 threads, one after "
            "another. train s: the optimizer steps (validation not included). Validation ranks the whole catalog "
            "with consumed items ranked too (RecBole's protocol). \"train s to valid R@10\": training time until "
            "validation Recall@10 first reaches RecBole's after its last epoch, as an epoch is not the same work "
            "on both sides (module docstring). The in-project synergen row is the full model (text, semantic IDs, "
            f"ranking head); its side inputs took {fig['synergen']['side_inputs_seconds']:.0f} s once before "
            "training. Reference: `../shared/data/README.md` (~190 s per RecBole epoch; an in-project model of "
            "the same size at least twice as fast).\n\n" + "\n".join(lines))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="RecBole's timed training epochs")
    ap.add_argument("--project-epochs", type=int, default=10,
                    help="the in-project models' epochs (cheaper: enough to pass RecBole's validation score)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "quality", help="lakes and models")
    ap.add_argument("--recbole-python", type=Path, default=ROOT / ".venv-recbole" / "bin" / "python",
                    help="an interpreter with recbole==1.2.1 (make recbole-venv)")
    args = ap.parse_args()
    if not args.recbole_python.is_file():
        raise SystemExit(f"{args.recbole_python} not found: run `make recbole-venv` first")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    fig = {"threads": args.threads, "same_size_overrides": SAME_SIZE,
           **project_runs(args.work, args.project_epochs, args.threads),
           "recbole_sasrec": recbole_run(args.recbole_python, args.work / "epoch_speed", args.epochs, args.threads)}
    rb = fig["recbole_sasrec"]
    fig["speed_up_per_epoch"] = {n: round(_mean(rb["per_epoch_seconds"]) / _mean(fig[n]["per_epoch_seconds"]), 2)
                                 for n in VARIANTS}
    fig["seconds_to_recbole_valid_recall"] = {
        n: seconds_to_reach(run, rb["valid"][-1]["recall@10"]) for n, run in
        [("recbole_sasrec", rb)] + [(n, fig[n]) for n in VARIANTS]}
    text = summary(fig)
    print(text)
    write_result("epoch_speed", fig, text)


if __name__ == "__main__":
    main()
