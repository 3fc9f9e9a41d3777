"""PNG figures for MLflow: training curves, Recall@K per task against the baselines, codebook utilization.

Each function takes a stage's own result dict and returns a matplotlib Figure (headless Agg backend), which
the stage logs with ``mlflow.log_figure``. They only draw what the results hold: no recomputation.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curves(history: list[dict], valid_metric: str, title: str) -> Figure:
    """Training loss and the validation metric per epoch (``train.json`` history)."""
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h.get("loss") for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=title)
    ax_valid.plot(epochs, [h.get(valid_metric) for h in history], marker="o", color="tab:green")
    ax_valid.set(xlabel="epoch", ylabel=f"validation {valid_metric}")
    fig.tight_layout()
    return fig


def recall_at_k(scorers: dict[str, dict], ks: list[int], title: str) -> Figure:
    """Recall@K over the full catalog per task, one line per scorer (model variants and baselines)."""
    tasks = sorted({t for m in scorers.values() for t in m.get("catalog", {})})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, m in sorted(scorers.items()):
            cat = m.get("catalog", {}).get(task)
            if cat:
                ax.plot(ks, [cat.get(f"recall@{k}") for k in ks], marker="o", label=name)
        ax.set(xlabel="K", ylabel="Recall@K", title=f"{title}: {task}", xscale="log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def codebook_utilization(levels: dict[str, dict], title: str) -> Figure:
    """Share of codes in use per RQ-VAE level (shared levels, then each view's own)."""
    names = list(levels)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names)), 3.2))
    ax.bar(names, [levels[n].get("utilization", 0.0) for n in names])
    ax.axhline(0.8, color="tab:red", linestyle="--", linewidth=1, label="TIGER target 0.8")
    ax.set(ylim=(0, 1.05), ylabel="codes in use", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
