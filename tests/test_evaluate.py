"""Evaluation: candidate lists, scorers (popularity, BM25, the model) through the shared evaluation code."""
import datetime as dt
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas import C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.baselines import BM25, Popularity
from synergen_core.config import EvaluateConfig, ModelConfig
from synergen_core.data import (HISTORY_KEYS, Requests, activity_stratum, first_requests, requests_from_eval,
                                sample_test)
from synergen_core.model.embeddings import TokenType
from synergen_core.evaluate import (ModelScorer, _distinct_draws, candidate_lists, evaluate_catalog, evaluate_scorer,
                                    ranking_lists, retrieval_order)
from synergen_core.model import RECOMMEND, SEARCH, SynerGen

I, Q = int(TokenType.ITEM), int(TokenType.QUERY)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def requests(targets, tasks=None, queries=None, L=3, n_items=5) -> Requests:
    """One row per target; histories of L tokens: items 1.., the last a query for search rows."""
    N = len(targets)
    tasks = np.array(tasks or [RECOMMEND] * N)
    queries = np.array(queries or [0] * N)
    h = {k: np.zeros((N, L), np.int64) for k in HISTORY_KEYS}
    h["ts"] = np.zeros((N, L), np.float64)
    for r in range(N):
        h["token_type"][r] = I
        h["item_idx"][r] = [1 + (r + j) % (n_items - 1) for j in range(L)]
        if tasks[r] == SEARCH:
            h["token_type"][r, -1], h["item_idx"][r, -1], h["query_idx"][r, -1] = Q, 0, queries[r]
        h["position"][r] = np.arange(L)
        h["ts"][r] = 1.7e9 + 60.0 * np.arange(L)
        h["action"][r], h["surface"][r] = 1, np.where(h["token_type"][r] == Q, 1, 2)
    consumed = np.where(h["token_type"] == I, h["item_idx"], 0)
    return Requests(h, np.array(targets), tasks, queries, np.full(N, 1.7e9 + 600.0), np.full(N, L), consumed)


def test_candidate_lists_target_first_distinct_seeded_and_popularity_weighted():
    counts = np.array([0, 100, 50, 10, 1, 1, 1, 0, 5, 5])
    req = requests([1, 4, 9, 2] * 50, n_items=10)
    cand = candidate_lists(req, counts, n_neg=4, seed=3)
    assert cand.shape == (200, 5)
    assert (cand[:, 0] == req.target).all()
    assert not (cand[:, 1:] == cand[:, :1]).any() and (cand > 0).all()
    assert all(len(set(row)) == 5 for row in cand.tolist())
    assert not (cand[:, 1:] == 7).any()  # an item never seen in training is never a sampled negative
    assert np.array_equal(cand, candidate_lists(req, counts, n_neg=4, seed=3))
    freq = np.bincount(cand[:, 1:].ravel(), minlength=10)
    assert freq[1] > freq[4]  # popular items are drawn more often


def gumbel_top_k(weights: np.ndarray, target: int, k: int, rows: int, seed: int) -> np.ndarray:
    """The reference: weighted sampling without replacement as the top-k of log-weight + Gumbel noise."""
    logw = np.where(weights > 0, np.log(np.maximum(weights, 1e-300)), -np.inf)
    logw[target] = -np.inf
    u = np.random.default_rng(seed).random((rows, len(weights)))
    return np.argsort(-(logw - np.log(-np.log(u))), 1)[:, :k]


@pytest.mark.parametrize("rounds", [32, 0])  # 0: every pick by the exact continuation for rows left short
def test_candidate_lists_sample_without_replacement_as_gumbel_top_k(rounds):
    counts = np.array([0, 100, 50, 10, 1, 1, 1, 0, 5, 5], np.float64)
    rows, k, target = 40_000, 4, 9
    support = np.flatnonzero(counts)
    got = _distinct_draws(support, np.cumsum(counts[support]), counts, np.full(rows, target), k,
                          np.random.default_rng(1), rounds=rounds)
    ref = gumbel_top_k(counts, target, k, rows, seed=2)
    assert all(len(set(row)) == k for row in got[:1000].tolist()) and not np.isin(got, [0, 7, target]).any()
    # inclusion in the list and the first pick: the same probabilities (4 sigma of 40k rows is ~0.01)
    assert np.abs(np.bincount(got.ravel(), minlength=10) - np.bincount(ref.ravel(), minlength=10)).max() / rows < 0.012
    assert np.abs(np.bincount(got[:, 0], minlength=10) - np.bincount(ref[:, 0], minlength=10)).max() / rows < 0.012


def test_candidate_lists_hold_no_rows_by_catalog_matrix():
    counts = 1e6 / np.arange(1, 1_000_001) ** 1.1  # 1M items, a long popularity tail
    peaks = []
    for rows in (16, 1024):
        tracemalloc.start()
        cand = candidate_lists(requests([1] * rows, n_items=10), counts, n_neg=99, seed=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert cand.shape == (rows, 100) and all(len(set(r)) == 100 for r in cand[:50].tolist())
    # 1,024 x 1M draws would be 8 GB; the lists themselves are 0.8 MB
    assert peaks[1] - peaks[0] < 16 * 2**20, peaks


def test_ranking_lists_uniform_draws_every_seen_item_alike():
    counts = np.array([0, 1000, 1, 1, 1, 0, 1])
    req = requests([2] * 2000, n_items=7)
    uniform = ranking_lists(req, counts, EvaluateConfig(rank_negatives=1, rank_negatives_by="uniform", seed=1))
    popular = ranking_lists(req, counts, EvaluateConfig(rank_negatives=1, rank_negatives_by="popularity", seed=1))
    freq = np.bincount(uniform[:, 1], minlength=7)
    assert freq[0] == freq[5] == freq[2] == 0  # padding, an unseen item, the target
    assert all(400 < freq[i] < 600 for i in (1, 3, 4, 6))  # ~500 each of 2000 draws over 4 items
    assert (popular[:, 1] == 1).mean() > 0.95


def test_popularity_full_catalog_metrics_with_ties():
    pop = Popularity(np.array([0, 5, 3, 3, 1]))
    req = requests([1, 2, 4])
    m = evaluate_catalog(pop, req, [1, 2])["rec"]
    # target 1: top; target 2: one above, tied with item 3 (rank 1 or 2); target 4: last of 4
    assert m["n"] == 3
    assert m["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert "search" not in evaluate_catalog(pop, req, [1])


def test_excluding_consumed_items_ranks_the_rest_and_makes_a_consumed_target_a_miss():
    pop = Popularity(np.array([0, 5, 3, 3, 1]))
    req = requests([4, 1, 2], tasks=[RECOMMEND, RECOMMEND, SEARCH])
    req.consumed = np.array([[1, 2, 3], [1, 0, 0], [1, 0, 0]])
    kept = evaluate_catalog(pop, req, [1, 2], exclude_consumed=())
    out = evaluate_catalog(pop, req, [1, 2], exclude_consumed=("rec",))
    assert kept["rec"]["recall@1"] == pytest.approx(0.5)  # target 1 on top; target 4 last of 4
    # target 4: items 1-3 consumed, so it is the only item left; target 1: consumed, so it ranks below
    # the three items left (a miss at every K short of the catalog)
    assert out["rec"]["recall@1"] == out["rec"]["recall@2"] == pytest.approx(0.5)
    assert kept["rec"]["recall@2"] == pytest.approx(0.5)
    # search keeps consumed items unless asked: item 1 stays above target 2
    assert out["search"] == kept["search"] and out["search"]["recall@1"] == 0
    # ... and when asked, item 1 goes: target 2 ties with item 3 for the top (half a hit)
    assert evaluate_catalog(pop, req, [1], exclude_consumed=("rec", "search"))["search"]["recall@1"] == 0.5
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_catalog(pop, req, [1], exclude_consumed=("recommend",))
    req.consumed = None
    with pytest.raises(ValueError, match="consumed items"):
        evaluate_catalog(pop, req, [1], exclude_consumed=("rec",))


def test_bm25_finds_the_item_named_by_the_query_and_serves_search_only():
    items = ["", "red apple pie", "green apple", "blue car", "yellow submarine"]
    queries = ["", "apple pie", "car", "submarine"]
    bm25 = BM25(items, queries)
    req = requests([1, 3, 4], tasks=[SEARCH] * 3, queries=[1, 2, 3])
    scores = bm25.catalog(req)
    assert scores.shape == (3, 5) and torch.isinf(scores[:, 0]).all()
    assert scores[:, 1:].argmax(1).add(1).tolist() == [1, 3, 4]
    m = evaluate_catalog(bm25, req, [1])
    assert m["search"]["recall@1"] == 1.0
    mixed = requests([1, 2], tasks=[SEARCH, RECOMMEND], queries=[1, 0])
    assert set(evaluate_catalog(bm25, mixed, [1])) == {"search"}


def test_model_scorer_is_consistent_with_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, use_text_emb=False,
                      use_semantic_ids=False, semantic_head=False)
    model = SynerGen(cfg, n_items=6, n_queries=4, n_actions=3, n_surfaces=3).eval()
    req = requests([1, 2, 5, 3], tasks=[RECOMMEND, SEARCH, RECOMMEND, SEARCH], queries=[0, 2, 0, 3], n_items=6)
    scorer = ModelScorer(model)
    scores = scorer.catalog(req)
    assert scores.shape == (4, 6) and torch.isinf(scores[:, 0]).all()
    # padding on the left changes nothing: score row 0 alone with a shorter trimmed batch
    assert torch.allclose(scorer.catalog(req.select(np.array([0]))), scores[:1], atol=1e-5)
    # seed: lists on which the figures compared below differ (on some, with 3 negatives, they coincide)
    cand = candidate_lists(req, np.array([0, 4, 3, 2, 2, 1]), n_neg=3, seed=4)
    head = scorer.candidates(req, cand)
    assert head.shape == cand.shape
    out = evaluate_scorer(scorer, req, cand, EvaluateConfig(ks=[1, 3]))
    assert set(out) == {"catalog", "ranking", "ranking_retrieval"}
    assert set(out["catalog"]) == {"search", "rec"} and out["catalog"]["rec"]["n"] == 2
    # the ranking AUC is the ranking head's: per list, the share of its negatives the head scores below the
    # target (a tie half), averaged over the lists of the task's rows only
    def auc_by_hand(list_scores, rows):
        s = np.asarray(list_scores, np.float64)[rows]
        return float(((s[:, 1:] < s[:, :1]) + 0.5 * (s[:, 1:] == s[:, :1])).mean(1).mean())

    search, rec = [1, 3], [0, 2]
    retrieval = np.take_along_axis(scores.numpy(), cand, 1)
    # the retrieval order scores the listed items alone, to the catalog's values
    assert np.allclose(retrieval_order(scorer)(req, cand), retrieval, atol=1e-5)
    assert out["ranking"]["rec"]["auc"] == pytest.approx(auc_by_hand(head, rec))
    assert out["ranking"]["search"]["auc"] == pytest.approx(auc_by_hand(head, search))
    assert out["ranking_retrieval"]["rec"]["auc"] == pytest.approx(auc_by_hand(retrieval, rec))
    # the rec figure tells the wrong computations apart: the retrieval scores, the search rows, the
    # reversed order (1 - AUC) would each give another value
    expected = auc_by_hand(head, rec)
    assert expected not in (auc_by_hand(retrieval, rec), auc_by_hand(head, search), 1 - expected)
    no_head = evaluate_scorer(ModelScorer(model, use_ranking_head=False), req, cand, EvaluateConfig(ks=[1, 3]))
    assert "ranking_retrieval" not in no_head
    assert no_head["ranking"] == out["ranking_retrieval"]  # the retrieval order on the same lists


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def eval_row(i: int, n: int) -> dict:
    """A ``split_*_eval`` row of user i with n context tokens (its target time tells rows apart); every third
    row is a validation row."""
    ctx = [{"pos": p, "ts": T0 + dt.timedelta(seconds=p), "type": "item", "item_index": 1 + (i + p) % 7,
            "query_index": None, "action": "click", "surface": "recommendation", "session": 0,
            "gap_s": 0.0, "shown_items": None} for p in range(n)]
    return {C.USER_ID: f"u{i}", C.TASK: S.TASK_REC,
            C.SPLIT: S.SPLIT_VALID if i % 3 == 0 else S.SPLIT_TEST, C.TARGET_POS: n,
            C.TARGET_TS: T0 + dt.timedelta(hours=1, seconds=i),
            C.ITEM_INDEX: 1 + i % 7, C.QUERY_INDEX: None, C.ACTION: "click", C.CONTEXT: ctx}


def write_eval(tmp_path, rows: list[dict], row_group_size: int):
    part = tmp_path / "split_temporal_eval" / "ds=2026-01-02"
    part.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=S.SPLIT_EVAL)
    pq.write_table(table, part / "part-00000.parquet", row_group_size=row_group_size)
    return part, table


def test_first_requests_are_load_tests_first_and_read_only_as_far_as_needed(tmp_path):
    """The registered model's input example (issue 30): the first few test requests of the day, read batch
    by batch; a file after the ones that held them is never opened (here: not Parquet at all)."""
    part, table = write_eval(tmp_path, [eval_row(i, i % 4) for i in range(40)], 5)  # i % 4 == 0: no context
    want, _ = requests_from_eval(table, 3, S.SPLIT_TEST)
    got = first_requests(part, 3, 4, batch_rows=5)
    assert len(got) == 4
    for key in HISTORY_KEYS:
        assert np.array_equal(got.history[key], want.history[key][:4]), key
    assert np.array_equal(got.target, want.target[:4]) and np.array_equal(got.lengths, want.lengths[:4])
    assert len(first_requests(part, 3, 10_000, batch_rows=5)) == len(want)  # fewer than asked: all there are
    (part / "part-00001.parquet").write_bytes(b"not parquet")  # read only if the first file fell short
    assert len(lake.data_files(part)) == 2
    assert len(first_requests(part, 3, 4, batch_rows=5)) == 4


def test_sample_test_is_stratified_seeded_and_all_below_the_limit(tmp_path):
    """Evaluation on a sample (issue 30): beyond ``max_rows``, each activity stratum in proportion, the
    same rows for the same seed, in the partition's order; up to it, exactly ``load_test``'s requests."""
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(3000) < 0.8, rng.integers(1, 4, 3000), rng.integers(4, 40, 3000))
    lengths[::10] = 0  # no context: counted, never sampled
    part, table = write_eval(tmp_path, [eval_row(i, int(n)) for i, n in enumerate(lengths)], 256)
    everything, no_context = requests_from_eval(table, 50, S.SPLIT_TEST)
    got, got_no_context, total = sample_test(part, 50, 300, seed=1, batch_rows=500)
    assert (got_no_context, total) == (no_context, len(everything)) and len(got) == 300
    population = np.bincount(activity_stratum(everything.lengths), minlength=6)
    sampled = np.bincount(activity_stratum(got.lengths), minlength=6)
    assert np.abs(sampled - population * 300 / total).max() <= 1  # in proportion, to within a row
    again, _, _ = sample_test(part, 50, 300, seed=1, batch_rows=77)  # other batches: the same rows
    other, _, _ = sample_test(part, 50, 300, seed=2, batch_rows=500)
    assert np.array_equal(again.ts, got.ts) and np.array_equal(again.history["item_idx"], got.history["item_idx"])
    assert not np.array_equal(other.ts, got.ts)
    assert np.isin(got.ts, everything.ts).all() and (np.diff(got.ts) > 0).all()  # in the partition's order
    small, _, _ = sample_test(part, 50, total, seed=1)
    for key in HISTORY_KEYS:
        assert np.array_equal(small.history[key], everything.history[key]), key
