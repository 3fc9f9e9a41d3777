"""Metric functions on hand-computed cases, ties included, and against brute-force expectations."""
import itertools
import math

import numpy as np
import pytest
import torch

from synergen_core.metrics import (
    auc, catalog_metrics, list_metrics, list_ndcg, mrr, ndcg_at_k, rank_stats, recall_at_k,
)

INF = float("-inf")


def test_rank_stats_counts_greater_and_other_ties_ignoring_padding():
    scores = torch.tensor([[INF, 0.9, 0.5, 0.5, 0.1], [INF, 0.2, 0.2, 0.2, 0.2]])
    greater, ties = rank_stats(scores, torch.tensor([2, 4]))
    assert greater.tolist() == [1, 0]
    assert ties.tolist() == [1, 3]


def test_recall_and_ndcg_with_a_tie_hand_computed():
    # one item above the target, one tied with it: the target's rank is 1 or 2 (0-based), each half the time
    g, t = np.array([1]), np.array([1])
    assert recall_at_k(g, t, 1)[0] == 0.0
    assert recall_at_k(g, t, 2)[0] == 0.5
    assert recall_at_k(g, t, 3)[0] == 1.0
    assert ndcg_at_k(g, t, 1)[0] == 0.0
    assert ndcg_at_k(g, t, 2)[0] == pytest.approx(0.5 / math.log2(3))
    assert ndcg_at_k(g, t, 3)[0] == pytest.approx(0.5 * (1 / math.log2(3) + 1 / math.log2(4)))
    assert mrr(g, t)[0] == pytest.approx(0.5 * (1 / 2 + 1 / 3))


def test_no_ties_top_and_miss():
    g, t = np.array([0, 4, 60]), np.array([0, 0, 0])
    assert recall_at_k(g, t, 5).tolist() == [1.0, 1.0, 0.0]
    assert ndcg_at_k(g, t, 5) == pytest.approx([1.0, 1 / math.log2(6), 0.0])
    assert mrr(g, t) == pytest.approx([1.0, 0.2, 1 / 61])


def test_constant_scorer_gets_random_ranking_not_a_perfect_one():
    M = 100  # items tied with the target: the target plus 99 others
    g, t = np.array([0]), np.array([M - 1])
    assert recall_at_k(g, t, 10)[0] == pytest.approx(10 / M)
    expected = sum(1 / math.log2(r + 2) for r in range(10)) / M
    assert ndcg_at_k(g, t, 10)[0] == pytest.approx(expected)


def test_catalog_metrics_match_brute_force_tie_breaks():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(30, 9)).astype(np.float32)  # many ties
    target = rng.integers(0, 9, size=30)
    g, t = rank_stats(torch.from_numpy(scores), torch.from_numpy(target))
    got = catalog_metrics(g.numpy(), t.numpy(), [1, 3])
    rec, nd, rr = {1: [], 3: []}, {1: [], 3: []}, []
    for s, y in zip(scores, target):
        tied = [j for j in range(9) if s[j] == s[y]]
        above = int((s > s[y]).sum())
        ranks = []
        for perm in itertools.permutations(range(len(tied))):  # every order of the tie group
            ranks.append(above + perm[tied.index(y)])
        for k in (1, 3):
            rec[k].append(np.mean([r < k for r in ranks]))
            nd[k].append(np.mean([1 / math.log2(r + 2) if r < k else 0.0 for r in ranks]))
        rr.append(np.mean([1 / (r + 1) for r in ranks]))
    assert got["n"] == 30
    for k in (1, 3):
        assert got[f"recall@{k}"] == pytest.approx(np.mean(rec[k]))
        assert got[f"ndcg@{k}"] == pytest.approx(np.mean(nd[k]))
    assert got["mrr"] == pytest.approx(np.mean(rr))


def test_auc_counts_tied_pairs_as_half_and_skips_one_class_lists():
    scores = np.array([[0.9, 0.3, 0.5, 0.3], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.9, 0.0]])
    labels = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    valid = np.array([[True] * 4, [True] * 4, [True, True, False, True]])  # 0.9 of row 2 is padding
    out = auc(scores, labels, valid)
    assert out[0] == pytest.approx(2.5 / 4)  # (0.9>0.3) + (0.9>0.5) + (0.3=0.3)/2 + (0.3<0.5)
    assert np.isnan(out[1])
    assert out[2] == 1.0


def test_auc_counts_two_minus_infinite_scores_as_a_tie(recwarn):
    # -inf is what padding gets (e.g. Popularity's item 0); a scorer may give it to real items too
    scores = np.array([[INF, INF, 0.0, INF]])
    labels = np.array([[1, 0, 0, 0]])
    valid = np.array([[True, True, True, False]])  # the last -inf is padding
    assert auc(scores, labels, valid)[0] == pytest.approx(0.5 / 2)  # tie with item 1, loss to item 2
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_list_ndcg_averages_discounts_over_a_tie_group():
    scores = np.array([[3.0, 2.0, 2.0, 1.0]])
    labels = np.array([[0.0, 1.0, 0.0, 1.0]])
    valid = np.ones((1, 4), bool)
    # the tied pair covers ranks 1 and 2: expected DCG = mean of both orders
    dcg = 0.5 * (1 / math.log2(3) + 1 / math.log2(4)) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert list_ndcg(scores, labels, valid, 4)[0] == pytest.approx(dcg / idcg)
    # at k = 2 only rank 1 of the pair counts, and only the tied item can be there
    assert list_ndcg(scores, labels, valid, 2)[0] == pytest.approx(0.5 / math.log2(3) / idcg)


def test_list_ndcg_matches_brute_force_and_ignores_padding():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 3, size=(1, 5)).astype(float)
        labels = rng.integers(0, 3, size=(1, 5)).astype(float)
        valid = rng.random((1, 5)) < 0.8
        if not (labels * valid).any():
            continue
        idx = np.nonzero(valid[0])[0]
        vals = []
        for perm in itertools.permutations(idx):  # a random tie-break = a uniformly random consistent order
            order = sorted(perm, key=lambda j: -scores[0, j])  # stable: keeps perm order within ties
            vals.append(sum(labels[0, j] / math.log2(r + 2) for r, j in enumerate(order[:3])))
        ideal = sorted(labels[0, idx], reverse=True)[:3]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        assert list_ndcg(scores, labels, valid, 3)[0] == pytest.approx(np.mean(vals) / idcg)


def test_list_metrics_summary():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2], [0.5, 0.5, 0.5]])
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    out = list_metrics(scores, labels, np.ones((3, 3), bool), [1, 3])
    assert out["lists"] == 2  # the list without a positive is left out
    assert out["auc"] == pytest.approx(0.5)
    assert out["ndcg@1"] == pytest.approx(0.5)
    assert out["ndcg@3"] == pytest.approx(0.5 * (1 + 1 / math.log2(4)))
