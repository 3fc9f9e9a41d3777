"""RecBole 1.2.1's SASRec on Amazon Beauty, timed per training epoch.

Run by ``benchmarks.epoch_speed`` under the interpreter of ``.venv-recbole`` (``make recbole-venv``):
RecBole's pins (numpy 1, an old colorlog) cannot share the project's environment, so this file imports
nothing from the project and talks to it through its arguments and one JSON file.

The data is ``sequential_data.txt`` written as RecBole's atomic ``.inter`` file (the position in the user's
sequence as its timestamp), split leave-one-out and ranked against the full catalog: the protocol of the
published rows in ``../shared/data/README.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def write_inter(sequences: Path, dataset_dir: Path) -> int:
    """``user item item ...`` lines -> ``<dataset_dir>/<name>.inter``; returns the interaction count."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with sequences.open() as src, (dataset_dir / f"{dataset_dir.name}.inter").open("w") as dst:
        dst.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in src:
            user, *items = line.split()
            for t, item in enumerate(items):
                dst.write(f"{user}\t{item}\t{t}\n")
            n += len(items)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=Path, required=True, help="sequential_data.txt")
    ap.add_argument("--work", type=Path, required=True, help="RecBole's dataset copy and checkpoints")
    ap.add_argument("--out", type=Path, required=True, help="JSON written here")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config also reads --key=value from the command line

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(args.threads)
    interactions = write_inter(args.sequences, args.work / "beauty")
    config = Config(model="SASRec", dataset="beauty", config_dict={
        "data_path": str(args.work), "checkpoint_dir": str(args.work / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        # the README's reference run: hidden 64, 2 layers, max length 50, batch 256, full cross-entropy
        "hidden_size": 64, "n_layers": 2, "MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": args.batch_size,
        "loss_type": "CE", "train_neg_sample_args": None, "learning_rate": 1e-3, "epochs": args.epochs,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 2048,
        "use_gpu": False, "seed": args.seed, "reproducibility": True, "show_progress": False, "worker": 0,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        epochs.append({"epoch": epoch, "train_seconds": round(train_s, 2), "loss": float(loss),
                       "valid_seconds": round(time.perf_counter() - t0, 2),
                       "valid": {k: float(v) for k, v in valid.items()}})
        print(json.dumps(epochs[-1]), flush=True)
    args.out.write_text(json.dumps({
        "recbole": __import__("recbole").__version__, "torch": torch.__version__, "threads": args.threads,
        "interactions": interactions, "training_samples": len(train_data.dataset),
        "steps_per_epoch": len(train_data), "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: config[k] for k in ("hidden_size", "inner_size", "n_layers", "n_heads", "MAX_ITEM_LIST_LENGTH",
                                          "train_batch_size", "hidden_dropout_prob", "loss_type", "learning_rate")},
        "epochs": epochs,
    }, indent=2))


if __name__ == "__main__":
    main()
