"""Daily warm start: today's model begins from the champion's weights and trains on what is new since.

The DAG retrains every day. A full retrain (a fresh seed, ``train.epochs`` with early stopping over every
window) costs as much on day 300 as on day 1. A warm start copies the champion's weights into today's
model (built as usual: today's catalog, text vectors and semantic IDs) and trains ``train.warm_epochs``
passes over the windows whose request falls on or after the champion's training day, at
``train.warm_lr``. What is copied:

* every parameter whose shape is the champion's;
* the ID tables of items and queries (``embed.id_emb``, ``embed.query_id_emb``) row by row: vocabulary
  indices are stable (sessionize appends new items and queries), so row i is the same item on both days,
  and the rows past the champion's table (items and queries new since) keep today's fresh initialization;
* not the side-input buffers (text vectors, semantic-ID codes): those are today's.

``plan`` chooses, and says why. A full retrain when there is no champion (or ``train.warm_start`` is off);
when a weight other than the ID tables changed shape (another architecture); when
``train.full_retrain_days`` days have passed since the champion's lineage last trained in full; when the
items new since the champion are more than ``train.max_new_item_share`` of today's catalog; when the
semantic IDs of more than ``train.max_sid_change_share`` of the champion's items changed (its code
embeddings would read other codes); or when no window is newer than the champion's day.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

GROWN = ("embed.id_emb.weight", "embed.query_id_emb.weight")  # [vocabulary, d]: rows follow stable indices
TODAYS = ("embed.item_text", "embed.query_text", "embed.codes_rec", "embed.codes_search")  # side inputs
FULL, WARM = "full", "warm"


@dataclass
class Champion:
    """What a warm start needs of the registry's champion: its weights and days."""

    version: str  # registry version (or any label naming the model)
    ds: str  # the day it was trained for: it saw the engagements before that day
    full_retrain_ds: str  # the last day its lineage trained in full (its own ds when it did)
    state_dict: dict[str, torch.Tensor]


@dataclass
class Plan:
    mode: str  # "warm" or "full"
    reason: str
    champion: Champion | None = None
    since_ts: float | None = None  # warm: windows whose request time is at or after this (UTC seconds)
    full_retrain_ds: str = ""  # what today's model records as its lineage's last full retrain
    figures: dict = field(default_factory=dict)

    def note(self) -> dict:
        """The plan as ``train.json`` and the MLflow run keep it."""
        return {"mode": self.mode, "reason": self.reason, "full_retrain_ds": self.full_retrain_ds,
                "champion_version": self.champion.version if self.champion else None,
                "champion_ds": self.champion.ds if self.champion else None, **self.figures}


def shape_mismatch(model: nn.Module, champion: dict[str, torch.Tensor]) -> str | None:
    """Why ``champion``'s weights cannot start ``model`` (a missing weight, another shape), or None."""
    for name, mine in model.state_dict().items():
        if name in TODAYS or mine is None:
            continue
        theirs = champion.get(name)
        if theirs is None:
            return f"the champion has no {name}"
        if theirs.shape == mine.shape:
            continue
        grows = name in GROWN and theirs.shape[1:] == mine.shape[1:] and theirs.shape[0] <= mine.shape[0]
        if not grows:
            return f"{name} is {tuple(mine.shape)} today, {tuple(theirs.shape)} in the champion"
    return None


@torch.no_grad()
def transfer(model: nn.Module, champion: dict[str, torch.Tensor]) -> None:
    """Copy ``champion``'s weights into ``model`` (see the module doc); ``shape_mismatch`` must be None."""
    for name, mine in model.state_dict().items():  # state_dict tensors share storage with the model's
        if name in TODAYS or mine is None:
            continue
        theirs = champion[name].to(mine.device, mine.dtype)
        (mine[: theirs.shape[0]] if mine.dim() else mine).copy_(theirs)  # grown tables: the champion's rows


def changed_code_share(today: torch.Tensor | None, champion: torch.Tensor | None) -> float:
    """Share of the champion's items (padding row 0 left out) whose semantic-ID codes differ today."""
    if today is None or champion is None:
        return 0.0 if today is None and champion is None else 1.0
    n = champion.shape[0]
    if n <= 1:
        return 0.0
    if today.shape[1] != champion.shape[1] or today.shape[0] < n:
        return 1.0
    return float((today[1:n].cpu() != champion[1:n].cpu()).any(1).float().mean())


def day_start(ds: str) -> float:
    return dt.datetime.fromisoformat(ds).replace(tzinfo=dt.timezone.utc).timestamp()


def plan(tcfg, ds: str, model: nn.Module, next_ts: np.ndarray, champion: Champion | None) -> Plan:
    """Warm start from ``champion`` or train in full, for today's freshly built ``model`` whose training
    windows have request times ``next_ts`` (see the module doc for the rules)."""
    if not tcfg.warm_start:
        return Plan(FULL, "train.warm_start is off", full_retrain_ds=ds)
    if champion is None:
        return Plan(FULL, "no champion to start from", full_retrain_ds=ds)
    full = lambda why, **figs: Plan(FULL, why, champion, full_retrain_ds=ds, figures=figs)  # noqa: E731
    why = shape_mismatch(model, champion.state_dict)
    if why is not None:
        return full(f"the champion's weights do not fit today's model: {why}")
    age = (dt.date.fromisoformat(ds) - dt.date.fromisoformat(champion.full_retrain_ds)).days
    if age >= tcfg.full_retrain_days:
        return full(f"{age} days since the last full retrain ({champion.full_retrain_ds}): "
                    f"train.full_retrain_days is {tcfg.full_retrain_days}", days_since_full=age)
    sd, n_now = champion.state_dict, model.embed.n_items
    n_then = next((sd[k].shape[0] for k in ("embed.id_emb.weight", "embed.codes_rec", "embed.item_text",
                                            "embed.item_table") if k in sd),
                  n_now)
    new_share = (n_now - n_then) / max(n_now - 1, 1)
    figs = {"days_since_full": age, "new_item_share": round(new_share, 6)}
    if new_share > tcfg.max_new_item_share:
        return full(f"{new_share:.1%} of today's items are new since the champion: train.max_new_item_share "
                    f"is {tcfg.max_new_item_share:.1%}", **figs)
    changed = max(changed_code_share(getattr(model.embed, f"codes_{v}", None), sd.get(f"embed.codes_{v}"))
                  for v in ("rec", "search"))
    figs["sid_change_share"] = round(changed, 6)
    if changed > tcfg.max_sid_change_share:
        return full(f"the semantic IDs of {changed:.1%} of the champion's items changed: "
                    f"train.max_sid_change_share is {tcfg.max_sid_change_share:.1%}", **figs)
    since = day_start(champion.ds)
    figs["windows"] = int((next_ts >= since).sum())
    if figs["windows"] == 0:
        return full(f"no training window is newer than the champion's day {champion.ds}", **figs)
    return Plan(WARM, f"from champion {champion.version} ({champion.ds}): {figs['windows']} windows since its day",
                champion, since, champion.full_retrain_ds, figs)
