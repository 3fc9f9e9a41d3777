"""Losses against hand-computed values on tiny cases."""
import math

import pytest
import torch

from synergen_core.model.losses import hybrid_ranking_loss, info_nce, semantic_id_loss

E = math.e
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _sp(x):  # softplus
    return math.log1p(math.exp(x))


def _ce(logits, target):  # -log softmax(logits)[target]
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_info_nce_in_batch():
    loss = info_nce(Q, Q.clone(), torch.tensor([1, 2]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 1 / E), rel=1e-6)


def test_info_nce_temperature_scales_logits():
    loss = info_nce(Q, Q.clone(), torch.tensor([1, 2]), temperature=0.5)
    assert loss.item() == pytest.approx(_ce([2.0, 0.0], 0), rel=1e-6)


def test_info_nce_with_sampled_negatives():
    neg = torch.tensor([[0.0, 1.0]])
    loss = info_nce(Q, Q.clone(), torch.tensor([1, 2]), neg, torch.tensor([3]), temperature=1.0)
    expected = (-math.log(E / (E + 2)) - math.log(E / (2 * E + 1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_log_q_correction_subtracts_log_sampling_probability():
    neg = torch.tensor([[0.0, 1.0]])
    pq, nq = [0.5, 0.25], [0.125]
    loss = info_nce(
        Q, Q.clone(), torch.tensor([1, 2]), neg, torch.tensor([3]), temperature=1.0,
        pos_log_q=torch.tensor(pq).log(), neg_log_q=torch.tensor(nq).log(),
    )
    lq = [math.log(p) for p in pq + nq]
    row0 = [1 - lq[0], 0 - lq[1], 0 - lq[2]]
    row1 = [0 - lq[0], 1 - lq[1], 1 - lq[2]]
    assert loss.item() == pytest.approx((_ce(row0, 0) + _ce(row1, 1)) / 2, rel=1e-6)


def test_info_nce_log_q_in_batch_only():
    loss = info_nce(Q, Q.clone(), torch.tensor([1, 2]), temperature=1.0, pos_log_q=torch.tensor([0.5, 0.25]).log())
    row0 = [1 - math.log(0.5), -math.log(0.25)]
    row1 = [-math.log(0.5), 1 - math.log(0.25)]
    assert loss.item() == pytest.approx((_ce(row0, 0) + _ce(row1, 1)) / 2, rel=1e-6)


def test_info_nce_masks_a_sampled_negative_equal_to_the_positive():
    neg = torch.tensor([[1.0, 0.0]])  # item 1 sampled as a negative: row 0's positive
    loss = info_nce(Q, Q.clone(), torch.tensor([1, 2]), neg, torch.tensor([1]), temperature=1.0)
    row0 = _ce([1.0, 0.0], 0)  # the accidental hit column is gone
    row1 = _ce([0.0, 1.0, 0.0], 1)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_info_nce_masks_duplicate_in_batch_positives():
    pos = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = info_nce(Q, pos, torch.tensor([5, 5]), torch.tensor([[0.0, 1.0]]), torch.tensor([6]), temperature=1.0)
    row0 = _ce([1.0, 0.0], 0)  # own positive vs the negative
    row1 = _ce([0.0, 1.0], 0)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_info_nce_needs_log_q_for_every_group():
    with pytest.raises(ValueError):
        info_nce(Q, Q, torch.tensor([1, 2]), Q, torch.tensor([3, 4]), temperature=1.0, pos_log_q=torch.zeros(2))


def test_hybrid_ranking_loss_hand_computed():
    scores = torch.tensor([[2.0, 0.5, -1.0], [1.0, 0.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    bce = [_sp(-2.0), _sp(0.5), _sp(-1.0), _sp(-1.0), _sp(0.0)]
    point = sum(bce) / 5
    pair = (_sp(0.5 - 2.0) + _sp(-1.0 - 2.0)) / 2  # request 1 has no valid negative: no pairs
    assert hybrid_ranking_loss(scores, labels, valid, 1.0, 0.0).item() == pytest.approx(point, rel=1e-6)
    assert hybrid_ranking_loss(scores, labels, valid, 0.0, 1.0).item() == pytest.approx(pair, rel=1e-6)
    got = hybrid_ranking_loss(scores, labels, valid, 0.3, 2.0).item()
    assert got == pytest.approx(0.3 * point + 2.0 * pair, rel=1e-6)


def test_pairwise_averages_over_each_positives_negatives_then_over_positives():
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    p0 = (_sp(0.0 - 1.0) + _sp(-1.0 - 1.0)) / 2
    p1 = (_sp(0.0 - 2.0) + _sp(-1.0 - 2.0)) / 2
    assert hybrid_ranking_loss(scores, labels, valid, 0.0, 1.0).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)


def test_pairwise_with_graded_labels():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    labels = torch.tensor([[0.5, 1.0, 0.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    p_half = _sp(2.0 - 0.0)  # 0.5 beats only the 0
    p_one = (_sp(0.0 - 1.0) + _sp(2.0 - 1.0)) / 2  # 1.0 beats 0.5 and 0
    assert hybrid_ranking_loss(scores, labels, valid, 0.0, 1.0).item() == pytest.approx((p_half + p_one) / 2, rel=1e-6)


def test_ranking_loss_without_pairs_is_finite_and_differentiable():
    scores = torch.tensor([[0.3, -0.2]], requires_grad=True)
    loss = hybrid_ranking_loss(scores, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and scores.grad is not None


def test_semantic_id_loss_per_level():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]]])
    codes = torch.tensor([[0, 1], [2, 0]])
    got = semantic_id_loss(logits, codes)
    lvl0 = (_ce([2.0, 0.0, 0.0], 0) + _ce([0.0, 0.0, 0.0], 2)) / 2
    lvl1 = (_ce([0.0, 1.0, 0.0], 1) + _ce([1.0, 1.0, 3.0], 0)) / 2
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([lvl0, lvl1], rel=1e-6)
