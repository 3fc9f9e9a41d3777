"""The order served lists are in (issue 27, ``synergen_core.list_order``): the rule on hand-made scores, the
choice measured on validation and recorded with the model, and scoring (the ``Scorer`` and the pyfunc)
ordering each task's lists as the record or ``score.order`` says. Real components on the tiny model."""
from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from synergen_core import checkpoint, list_order, serving
from synergen_core import index as cindex
from synergen_core.config import Config
from synergen_core.data import Requests
from synergen_core.evaluate import ModelScorer, evaluate_lists, ranking_lists, retrieval_order
from synergen_core.metrics import list_metrics
from synergen_core.model import RECOMMEND, SEARCH

# four lists of five candidates, the target first
LABELS = np.zeros((4, 5), np.float32)
LABELS[:, 0] = 1.0
VALID = np.ones((4, 5), bool)
GOOD = np.array([[5, 1, 2, 3, 4]] * 4, np.float32)  # the target on top of every list
BAD = np.array([[1, 5, 4, 3, 2]] * 4, np.float32)  # the target last


def figures(scores: np.ndarray) -> dict:
    return list_metrics(scores, LABELS, VALID, [list_order.K])


def test_the_rule_on_hand_made_scores():
    good, bad = figures(GOOD), figures(BAD)
    assert good["ndcg@10"] > bad["ndcg@10"]
    assert list_order.choose(bad, good) == "retrieval"  # the head worse: retrieval order
    assert list_order.choose(good, bad) == "ranking"  # the head better: the head's order
    assert list_order.choose(good, figures(GOOD.copy())) == "ranking"  # a tie keeps the head
    assert list_order.choose({}, good) == "retrieval"  # no validation list: no evidence for the head
    assert list_order.choose({"lists": 0}, {"lists": 0}) == "retrieval"
    record = list_order.choice_record({"search": good, "rec": bad}, {"search": bad, "rec": good})
    assert {t: c["order"] for t, c in record.items()} == {"search": "ranking", "rec": "retrieval"}
    assert record["rec"]["ranking"] == {"auc": bad["auc"], "ndcg@10": bad["ndcg@10"]}
    assert record["rec"]["retrieval"] == {"auc": good["auc"], "ndcg@10": good["ndcg@10"]}
    assert list_order.choice_record({}, {})["search"] == {
        "order": "retrieval", "lists": 0, "ranking": {"auc": None, "ndcg@10": None},
        "retrieval": {"auc": None, "ndcg@10": None}}


def test_served_orders_follow_the_record_unless_score_order_says_otherwise():
    from tiny_synergen import tiny_model

    record = _record(tiny_model(), {"search": "ranking", "rec": "retrieval"})
    assert list_order.served_orders(record) == {"search": "ranking", "rec": "retrieval"}
    assert list_order.served_orders(record, "ranking") == {"search": "ranking", "rec": "ranking"}
    assert list_order.served_orders(record, "retrieval") == {"search": "retrieval", "rec": "retrieval"}
    del record[list_order.RECORD_KEY]  # a model file from before the rule: served as before, by the head
    assert list_order.served_orders(record) == {"search": "ranking", "rec": "ranking"}
    headless = _record(tiny_model(w_ranking=0.0), {"search": "ranking", "rec": "ranking"})
    assert list_order.served_orders(headless, "ranking") == {"search": "retrieval", "rec": "retrieval"}
    assert Config().score.order == "auto"


def _record(model, orders: dict[str, str]) -> dict:
    record = checkpoint.model_record(model, {"n_items": model.n_items, "n_queries": 10, "n_actions": 5,
                                             "n_surfaces": 4, "codebook_size": 8})
    record[list_order.RECORD_KEY] = {t: {"order": o} for t, o in orders.items()}
    return record


def _requests() -> Requests:
    """A search request and a recommendation (tiny_batch's left-padded rows), the targets items 7 and 13."""
    from tiny_synergen import tiny_batch

    batch = {k: v[[0, 2]].numpy() for k, v in tiny_batch(with_candidates=False).items()}
    return Requests(batch, np.array([7, 13]), np.array([SEARCH, RECOMMEND]), np.zeros(2, np.int64),
                    np.full(2, 1.7e9 + 3000.0), np.array([6, 4]))


def _scorer(model, orders: dict[str, str] | None) -> serving.Scorer:
    with torch.no_grad():
        vectors = model.item_vectors()[1:].numpy()
    index = cindex.CandidateIndex(cindex.exact_index(vectors), np.arange(1, len(vectors) + 1), cindex.EXACT)
    settings = serving.Settings(top_k=6, retrieve_n=12, retriever="dense", batch_size=2, request_ts=1.7e9 + 3000.0,
                                n_queries=model.embed.query_text.shape[0], threads=1, progress=False,
                                list_order=orders)
    return serving.Scorer(model, index, settings)


def _score(scorer: serving.Scorer):
    with torch.no_grad():
        _, items, retr, ranking, valid = scorer._score_chunk(_requests(), np.arange(2),
                                                             pa.array([[], []], pa.list_(pa.int64())))
    assert valid.all()
    return items, retr, ranking


def test_scorer_orders_each_task_by_the_recorded_choice_and_score_order_overrides_it():
    from tiny_synergen import tiny_model

    model = tiny_model().eval()
    record = _record(model, {"search": "ranking", "rec": "retrieval"})
    items, retr, ranking = _score(_scorer(model, list_order.served_orders(record)))
    # rec (row 1): retrieval order, its ranking_score the retrieval score
    np.testing.assert_array_equal(ranking[1], retr[1])
    assert np.all(np.diff(retr[1]) <= 0)
    # search (row 0): the head's order, as a scorer with the head for every task (the default) orders it
    head_items, head_retr, head_ranking = _score(_scorer(model, None))
    np.testing.assert_array_equal(items[0], head_items[0])
    np.testing.assert_allclose(ranking[0], head_ranking[0], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(ranking[0]) <= 0) and not np.allclose(ranking[0], retr[0])
    assert not np.array_equal(head_items[1], items[1])  # the head would have ordered rec differently
    # score.order = ranking overrides the record: both tasks by the head
    forced = _score(_scorer(model, list_order.served_orders(record, "ranking")))
    for a, b in zip(forced, (head_items, head_retr, head_ranking)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # score.order = retrieval: both by retrieval
    items_r, retr_r, ranking_r = _score(_scorer(model, list_order.served_orders(record, "retrieval")))
    np.testing.assert_array_equal(ranking_r, retr_r)


def test_the_choice_is_measured_on_validation_and_recorded_with_the_model(tmp_path):
    from tiny_synergen import N_ITEMS, tiny_model

    model = tiny_model().eval()
    out_dir = tmp_path / "synergen"
    checkpoint.save(checkpoint.model_record(model, {"n_items": N_ITEMS, "n_queries": 10, "n_actions": 5,
                                                    "n_surfaces": 4, "codebook_size": 8}),
                    out_dir / checkpoint.MODEL)
    counts = np.arange(N_ITEMS, dtype=np.int64)  # item 0 (padding) has none
    data = types.SimpleNamespace(valid=_requests(), counts=counts)
    cfg = Config()
    cfg.evaluate.rank_negatives = 9
    summary = {"best_epoch": 0}

    chosen = list_order.record_choice(cfg, data, out_dir, summary)

    # the figures are the evaluation's own, on the validation lists, ordered both ways
    scorer = ModelScorer(model)
    cand = ranking_lists(data.valid, counts, cfg.evaluate)
    head = evaluate_lists(scorer.candidates, scorer, data.valid, cand, [10])
    retrieval = evaluate_lists(retrieval_order(scorer), scorer, data.valid, cand, [10])
    assert chosen == list_order.choice_record(head, retrieval)
    for task in ("search", "rec"):
        assert chosen[task]["order"] == list_order.choose(head[task], retrieval[task])
        assert chosen[task]["lists"] == 1 and chosen[task]["ranking"]["auc"] == pytest.approx(head[task]["auc"])
    # with the model (a weights-only file) and in the summary, both on disk
    assert checkpoint.load(out_dir / checkpoint.MODEL)[list_order.RECORD_KEY] == chosen
    assert json.loads((out_dir / checkpoint.SUMMARY).read_text())[list_order.RECORD_KEY] == chosen
    assert summary[list_order.RECORD_KEY] == chosen
    # a model without the ranking head has nothing to choose
    headless = list_order.measure(tiny_model(w_ranking=0.0), data.valid, counts, cfg.evaluate)
    assert {c["order"] for c in headless.values()} == {"retrieval"}


def test_pyfunc_serves_each_task_in_the_recorded_order(tmp_path):
    from tiny_synergen import tiny_model

    model = tiny_model().eval()
    frame = pd.DataFrame({"item_idx": [[3, 7, 8, 2], [11, 12, 13, 14]], "ts": [[1.0, 2.0, 3.0, 4.0]] * 2})

    def predict(orders: dict[str, str]) -> pd.DataFrame:
        path = tmp_path / f"{orders['rec']}.pt"
        checkpoint.save(_record(model, orders), path)
        pyfunc = serving.SynerGenPyfunc()
        pyfunc.load_context(types.SimpleNamespace(artifacts={serving.ARTIFACT: str(path)}))
        return pyfunc.predict(None, frame, params={"k": 6})

    by_retrieval, by_head = predict({"search": "retrieval", "rec": "retrieval"}), predict({"search": "ranking",
                                                                                          "rec": "ranking"})
    for r in range(2):  # the same six items, re-ordered by the head, its logits non-increasing
        assert sorted(by_retrieval["items"][r]) == sorted(by_head["items"][r])
        assert by_retrieval["items"][r] != by_head["items"][r]
        assert np.all(np.diff(by_head["scores"][r]) <= 0) and np.all(np.diff(by_retrieval["scores"][r]) <= 0)
