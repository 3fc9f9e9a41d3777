"""Which order a served candidate list is in: the ranking head's, or the model's retrieval scores.

The ranking stage re-scores the retrieved candidates with the ranking head, and it has to earn that place.
After training, the model's best weights order the validation requests' candidate lists (the evaluation's
``ranking_lists``: each target and ``evaluate.rank_negatives`` items drawn by the training counts) both
ways, and the rule chooses per task (search, rec), on validation figures only:

* ``"ranking"`` when the head's NDCG@10 on those lists is >= the retrieval order's (a tie keeps the head,
  the stage as designed);
* ``"retrieval"`` when it is lower; also when the task has no validation list with its target (no evidence
  that the head helps) and for a model without a ranking head (``model.w_ranking`` 0).

The choice and its four figures (rank AUC and NDCG@10 of each order, None where not measured) go into the
model file (``model.pt``, key ``list_order``: plain values, read back with ``weights_only``) and the run's
``train.json``, so scoring and the registry's copy read them without any data. ``score.order`` decides
what is served (``served_orders``): ``auto``, the recorded choice (a model file without a record is served
as before the rule: by the head where the model has one); ``ranking`` or ``retrieval`` for every task.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from synergen_core import checkpoint
from synergen_core.config import Config, EvaluateConfig
from synergen_core.data import Requests
from synergen_core.evaluate import ModelScorer, evaluate_lists, ranking_lists, retrieval_order, validation_requests

RECORD_KEY = "list_order"  # in the model record and the training summary
ORDERS = ("ranking", "retrieval")
TASKS = ("search", "rec")
K = 10  # the choice compares NDCG@K
NDCG = f"ndcg@{K}"


def choose(head: dict, retrieval: dict) -> str:
    """One task's order from the list metrics of the ranking head and of the retrieval scores (``list_metrics``
    output on the same lists): "ranking" when the head's NDCG@10 >= retrieval's, else "retrieval" (also when
    either figure is missing: the task had no validation list)."""
    h, r = head.get(NDCG), retrieval.get(NDCG)
    if h is None or r is None or not (math.isfinite(h) and math.isfinite(r)):
        return "retrieval"
    return "ranking" if h >= r else "retrieval"


def _figures(metrics: dict) -> dict:
    return {"auc": metrics.get("auc"), NDCG: metrics.get(NDCG)}


def choice_record(head: dict[str, dict], retrieval: dict[str, dict]) -> dict[str, dict]:
    """Per-task list metrics of both orders -> {task: {"order", "lists", "ranking": {auc, ndcg@10},
    "retrieval": {auc, ndcg@10}}} for every task, measured or not."""
    out = {}
    for task in TASKS:
        h, r = head.get(task, {}), retrieval.get(task, {})
        out[task] = {"order": choose(h, r), "lists": int(h.get("lists", 0)), "ranking": _figures(h),
                     "retrieval": _figures(r)}
    return out


def measure(model, req: Requests, counts: np.ndarray, ecfg: EvaluateConfig, device=None) -> dict[str, dict]:
    """``choice_record`` of ``model`` on the candidate lists of requests ``req`` (validation), the lists drawn
    from training item ``counts`` as the evaluation draws them."""
    if model.cfg.w_ranking == 0:  # nothing to choose: the lists can only be in retrieval order
        return choice_record({}, {})
    scorer = ModelScorer(model, device=device)
    cand = ranking_lists(req, counts, ecfg)
    head = evaluate_lists(scorer.candidates, scorer, req, cand, [K], ecfg.batch_size)
    retrieval = evaluate_lists(retrieval_order(scorer), scorer, req, cand, [K], ecfg.batch_size)
    return choice_record(head, retrieval)


def record_choice(cfg: Config, data, out_dir: Path, summary: dict, device=None) -> dict[str, dict]:
    """After training into ``out_dir``: the choice of its best model (``model.pt``) on the validation requests
    of ``data`` (a ``SplitData``; the same sample as the validation metric), written into ``model.pt`` and
    into ``summary`` and ``train.json``. A model file that already holds one (a finished run asked again)
    keeps it: the same weights on the same split choose the same."""
    path = Path(out_dir) / checkpoint.MODEL
    record = checkpoint.load(path)
    if RECORD_KEY not in record:
        model = checkpoint.build_from_record(record, device or "cpu")
        req = validation_requests(data.valid, cfg.train.valid_max_rows, cfg.train.seed)
        record[RECORD_KEY] = measure(model, req, data.counts, cfg.evaluate, device)
        checkpoint.save(record, path)
    summary[RECORD_KEY] = record[RECORD_KEY]
    checkpoint.save_json(summary, Path(out_dir) / checkpoint.SUMMARY)
    return record[RECORD_KEY]


def served_orders(record: dict, setting: str = "auto") -> dict[str, str]:
    """{task: "ranking" | "retrieval"}: the order the lists of a model (its file's record) are served in
    under ``score.order`` = ``setting``; a model without a ranking head serves retrieval order whatever it says."""
    if not record["model_config"].get("w_ranking", 0) > 0:
        return dict.fromkeys(TASKS, "retrieval")
    if setting != "auto":
        return dict.fromkeys(TASKS, setting)
    recorded = record.get(RECORD_KEY) or {}
    return {t: recorded[t]["order"] if t in recorded else "ranking" for t in TASKS}


def log_choice(run, prefix: str, chosen: dict[str, dict] | None) -> None:
    """A training run's recorded choice on its MLflow stage run (``synergen_core.tracking.StageRun``): tags
    ``synergen.<prefix>.order.<task>``, metrics ``<prefix>.valid_order.<task>.<ranking|retrieval>.<auc|ndcg_at_10>``."""
    chosen = chosen or {}
    run.tags({f"synergen.{prefix}.order.{task}": c["order"] for task, c in chosen.items()})
    run.metrics({f"{prefix}.valid_order.{task}.{order}.{name.replace('@', '_at_')}": v
                 for task, c in chosen.items() for order in ORDERS for name, v in c[order].items()
                 if v is not None and math.isfinite(v)})


def log_served(run, protocol: str, scorers: dict[str, dict]) -> None:
    """The evaluation's served orders (``jobs.evaluate``'s ``served_order``) as tags of its stage run:
    ``synergen.<protocol>.<model>.served_order.<task>``; the test figures of both orders are its metrics."""
    run.tags({f"synergen.{protocol}.{name}.served_order.{task}": order for name, m in scorers.items()
              for task, order in (m.get("served_order") or {}).items()})
