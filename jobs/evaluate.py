"""Stage: evaluate the models trained for day ``ds`` and the untrained baselines on the test targets.

For every protocol in ``train.protocols``: the ``test`` rows of ``split_<protocol>_eval`` (rows without
any context are counted and left out: no sequence model can score them; beyond ``evaluate.max_test_targets``
a seeded sample stratified by user activity, ``synergen_core.data.sample_test``), the same popularity-sampled
candidate lists for every scorer, then ``synergen_core.evaluate.evaluate_scorer`` for every trained
variant found under ``<lake>/<train.output>/ds=D/<protocol>/`` and every baseline in
``evaluate.baselines``. A trained model's candidate lists are ordered both by its ranking head (``ranking``)
and by its retrieval scores (``ranking_retrieval``); ``served_order`` says which order the scoring stage
serves per task (``score.order``, by default the choice recorded on validation: ``synergen_core.list_order``,
whose figures are ``valid_order``). Full-catalog figures of the tasks in ``evaluate.exclude_consumed`` (default:
recommendation) rank the catalog without the items the user already engaged with, as the served lists
do; the result records which tasks those were. The result is returned and written to ``<lake>/<train.output>/ds=D/evaluation.json``.

``run(..., champion=True)`` (the DAG's evaluate stage) also scores the registry's current ``champion`` of the
protocol on the same set in the same pass (``<protocol>.champion``: its version and figures), and the
promotion gate (``jobs.promote``) reads them rather than evaluating it again; ``evaluation_set`` (the test
targets and candidate lists) is what the gate evaluates on when they are missing (another champion since);
``flat_metrics`` names one scorer's figures as the registry and the gate read them. The MLflow stage run
(headline figures, the result, Recall@K plots) is ``jobs.stages``'.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.train import require_tables
from schemas import C
from synergen_core import checkpoint, list_order
from synergen_core.baselines import BM25, VARIANTS, Popularity
from synergen_core.config import Config, parse_ds
from synergen_core.data import Requests, item_counts, read_table, sample_test, tokens_from_arrow, vocab_size
from synergen_core.errors import PipelineError
from synergen_core.evaluate import ModelScorer, evaluate_scorer, ranking_lists
from synergen_core.features import catalog_texts
from synergen_core.list_order import served_orders
from synergen_core.model import SEARCH
from synergen_core.train import pick_device

log = logging.getLogger(__name__)
RESULT = "evaluation.json"


def _texts(cfg: Config, ds: str) -> tuple[list[str], list[str]]:
    """Catalog text per item index and query text per query index ("" where none)."""
    layout = cfg.layout
    items = read_table(layout.part(layout.sessions("item_vocab"), ds))
    queries = read_table(layout.part(layout.sessions("query_vocab"), ds))
    item_texts = [""] * vocab_size(items, C.ITEM_INDEX)
    texts = catalog_texts(layout, ds, items[C.ITEM_ID].to_pylist(), cfg.text_encoder.max_description_chars)
    for i, t in zip(items[C.ITEM_INDEX].to_pylist(), texts):
        item_texts[i] = t
    query_texts = [""] * vocab_size(queries, C.QUERY_INDEX)
    for i, q in zip(queries[C.QUERY_INDEX].to_pylist(), queries[C.QUERY].to_pylist()):
        query_texts[i] = q or ""
    return item_texts, query_texts


@dataclass(frozen=True)
class EvaluationSet:
    """What every scorer of one day and protocol is measured on. The candidate lists are drawn once, so
    every scorer (and the gate's champion) ranks the very same lists."""

    test: Requests  # the test targets with context (a sample of them beyond ``evaluate.max_test_targets``)
    no_context: int  # test targets left out: no sequence model can score them
    with_context: int  # test targets with context, sampled or not
    item_counts: np.ndarray  # [n_items] item tokens per item in the protocol's training split (popularity)
    n_items: int  # the day's item vocabulary size
    candidates: np.ndarray  # [len(test), 1 + negatives] target first, popularity-sampled negatives


def evaluation_set(cfg: Config, ds: str, protocol: str) -> EvaluationSet:
    layout = cfg.layout
    e = cfg.evaluate
    test, no_context, with_context = sample_test(layout.part(layout.split(protocol, "eval"), ds), cfg.model.max_seq_len,
                                                 e.max_test_targets, e.seed)
    train_tokens = tokens_from_arrow(read_table(layout.part(layout.split(protocol, "train"), ds))[C.TOKENS])
    n_items = vocab_size(read_table(layout.part(layout.sessions("item_vocab"), ds)), C.ITEM_INDEX)
    counts = item_counts(train_tokens, n_items)
    return EvaluationSet(test, no_context, with_context, counts, n_items, ranking_lists(test, counts, e))


def registered_figures(cfg: Config, data: EvaluationSet, model_dir: Path) -> dict:
    """A registered model's ``evaluate_scorer`` figures on ``data``. It may predate the day's new items and
    queries: ``OlderVocabScorer`` reads what its tables do not hold as unknown."""
    from synergen_core.evaluate import OlderVocabScorer

    device = pick_device(cfg.train)
    model = checkpoint.load_model(model_dir, device)
    scorer = OlderVocabScorer(model, data.n_items, device=device, use_ranking_head=model.cfg.w_ranking > 0)
    return evaluate_scorer(scorer, data.test, data.candidates, cfg.evaluate)


def champion_figures(cfg: Config, data: EvaluationSet, protocol: str) -> dict | None:
    """The registry champion's figures on ``data`` ({"version", "figures", "seconds"}), None without a
    champion trained on ``protocol``."""
    from synergen_core import registry

    c = registry.client(cfg)
    mv = registry.alias_version(c, registry.model_name(cfg), registry.CHAMPION)
    if mv is None or mv.tags.get("synergen.protocol", protocol) != protocol:
        return None
    t0 = time.perf_counter()
    figures = registered_figures(cfg, data, registry.download_model(cfg, f"models:/{mv.name}/{mv.version}")[0])
    return {"version": str(mv.version), "figures": figures, "seconds": round(time.perf_counter() - t0, 2)}


def result_path(cfg: Config, ds: str) -> Path:
    return cfg.layout.model_dir(ds) / RESULT


def read_result(cfg: Config, ds: str) -> dict | None:
    """The day's saved ``run`` result, None when the day was not evaluated."""
    path = result_path(cfg, ds)
    return json.loads(path.read_text()) if path.is_file() else None


def flat_metrics(scorer_result: dict) -> dict[str, float]:
    """One scorer's ``evaluate_scorer`` output -> {"<task>.<name>": value}: catalog metrics as they are
    (recall@K, ndcg@K, mrr, n), candidate-list ones as rank_auc, rank_ndcg@K, rank_lists."""
    out: dict[str, float] = {}
    for task, m in scorer_result.get("catalog", {}).items():
        out.update({f"{task}.{k}": float(v) for k, v in m.items()})
    for task, m in scorer_result.get("ranking", {}).items():
        for k, v in m.items():
            out[f"{task}.rank_{'auc' if k == 'auc' else k}"] = float(v)
    return {**out, **_both_tasks(out)}


def _both_tasks(per_task: dict[str, float]) -> dict[str, float]:
    """``all.<name>``: the geometric mean of ``<task>.<name>`` over the tasks that have it (one model
    serves both surfaces, so the gate's default weighs both, as training's ``valid_metric`` does)."""
    names = {key.split(".", 1)[1] for key in per_task if key.startswith(("rec.", "search."))}
    out = {}
    for name in names - {"n", "rank_lists"}:
        values = [per_task[f"{t}.{name}"] for t in ("rec", "search") if f"{t}.{name}" in per_task]
        out[f"all.{name}"] = float(np.prod(values) ** (1 / len(values))) if min(values) >= 0 else float("nan")
    return out


def run(cfg: Config, ds: str, variants: list[str] | None = None, protocols: list[str] | None = None,
        champion: bool = False) -> dict:
    """{protocol: {"test_targets", "no_context", "scorers": {name: metrics}[, "champion"]}}; see the
    module doc. ``champion``: score the registry's champion too (needs the MLflow registry)."""
    ds = parse_ds(ds).isoformat()
    device = pick_device(cfg.train)
    root = cfg.layout.model_dir(ds)
    out: dict = {"ds": ds}
    texts = None
    for protocol in protocols or cfg.train.protocols:
        require_tables(cfg, ds, ["item_vocab", f"split_{protocol}_train", f"split_{protocol}_eval"])
        names = [v for v in (variants or VARIANTS) if (root / protocol / v / checkpoint.MODEL).is_file()]
        if not names:
            raise PipelineError(f"{root / protocol}: no trained model ({'/'.join(variants or VARIANTS)}/"
                                f"{checkpoint.MODEL}) for ds={ds} (`synergen train --ds {ds}` writes them)")
        data = evaluation_set(cfg, ds, protocol)
        test, no_context, counts, cand = data.test, data.no_context, data.item_counts, data.candidates
        if len(test) == 0:  # no figure at all, rather than figures of nothing for the promotion gate to read
            part = cfg.layout.part(cfg.layout.split(protocol, "eval"), ds)
            raise PipelineError(f"{part}: the {protocol} split of ds={ds} has no test targets with context "
                                f"({no_context} without): nothing to evaluate; check that the day's logs "
                                "reached validation and sessionize")
        res = {"test_targets": {"search": int((test.task == SEARCH).sum()), "rec": int((test.task != SEARCH).sum())},
               "no_context": no_context, "with_context": data.with_context, "sampled": len(test) < data.with_context,
               "candidates_per_list": int(cand.shape[1]),
               "exclude_consumed": list(cfg.evaluate.exclude_consumed), "scorers": {}}
        for v in names:
            t0 = time.perf_counter()
            record = checkpoint.load(root / protocol / v / checkpoint.MODEL)
            model = checkpoint.build_from_record(record, device)
            scorer = ModelScorer(model, v, device, use_ranking_head=model.cfg.w_ranking > 0)
            res["scorers"][v] = {**evaluate_scorer(scorer, test, cand, cfg.evaluate),
                                 "served_order": served_orders(record, cfg.score.order),
                                 "valid_order": record.get(list_order.RECORD_KEY),
                                 "seconds": round(time.perf_counter() - t0, 2)}
        for b in cfg.evaluate.baselines:
            if b == "bm25" and not (test.task == SEARCH).any():
                continue
            t0 = time.perf_counter()
            if b == "popularity":
                scorer = Popularity(counts)
            else:
                texts = texts or _texts(cfg, ds)
                scorer = BM25(*texts)
            res["scorers"][b] = {**evaluate_scorer(scorer, test, cand, cfg.evaluate),
                                 "seconds": round(time.perf_counter() - t0, 2)}
        if champion:
            res["champion"] = champion_figures(cfg, data, protocol)
        out[protocol] = res
        log.info("evaluate %s %s: %s", ds, protocol, sorted(res["scorers"]))
    checkpoint.save_json(out, result_path(cfg, ds))
    return out


def headline(result: dict, k: int = 10) -> dict[str, float]:
    """Flat ``<protocol>.<scorer>.<task>.<metric>`` figures (the registry's champion as scorer ``champion``
    when it was evaluated): Recall/NDCG@k (catalog), the candidate lists' AUC
    and NDCG@k (``rank_auc``, ``rank_ndcg@k``), and for a model with a ranking head the same lists in its
    retrieval order (``retrieval_rank_auc``, ``retrieval_rank_ndcg@k``)."""
    flat = {}
    for protocol, res in result.items():
        if not isinstance(res, dict) or "scorers" not in res:
            continue
        champion = {"champion": res["champion"]["figures"]} if res.get("champion") else {}
        for name, m in {**res["scorers"], **champion}.items():
            for task, cm in m["catalog"].items():
                for key in (f"recall@{k}", f"ndcg@{k}"):
                    if key in cm:
                        flat[f"{protocol}.{name}.{task}.{key}"] = cm[key]
            for prefix, lists in (("", m["ranking"]), ("retrieval_", m.get("ranking_retrieval", {}))):
                for task, lm in lists.items():  # the ranking head's order, then the same lists by retrieval
                    for key in ("auc", f"ndcg@{k}"):
                        if key in lm:
                            flat[f"{protocol}.{name}.{task}.{prefix}rank_{key}"] = lm[key]
    return flat
