"""Each attention-mask rule of the sequence layout."""
import torch

from synergen_core.model.masks import attention_mask, last_valid_index


def _mask(valid, cand_valid=None):
    valid = torch.tensor(valid, dtype=torch.bool)
    cand = None if cand_valid is None else torch.tensor(cand_valid, dtype=torch.bool)
    return attention_mask(valid, cand)[:, 0]  # [B, T, T]


def test_history_is_causal():
    m = _mask([[1, 1, 1, 1]])[0]
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril())


def test_query_position_sees_its_query_and_the_past_not_its_item():
    # history: item, query, item retrieved by that query
    m = _mask([[1, 1, 1]])[0]
    assert m[1, 0] and m[1, 1] and not m[1, 2]  # search prediction at the query token
    assert m[2, 1]  # the retrieved item's token (next rec prediction) has seen the query


def test_no_token_attends_to_padding_and_padding_sees_only_itself():
    for valid in ([[0, 0, 1, 1, 1]], [[1, 1, 1, 0, 0]]):  # left and right padding
        v = torch.tensor(valid[0], dtype=torch.bool)
        m = _mask(valid)[0]
        for i in range(5):
            for j in range(5):
                if i != j and not v[j]:
                    assert not m[i, j]
            if not v[i]:
                assert m[i].sum() == 1 and m[i, i]
    # every row can attend somewhere, so SDPA never produces NaN
    assert _mask([[0, 0, 0]], [[0, 0]]).any(-1).all()


def test_left_and_right_padding_give_the_same_mask_on_valid_tokens():
    left = _mask([[0, 0, 1, 1, 1]], [[1, 1]])[0]
    right = _mask([[1, 1, 1, 0, 0]], [[1, 1]])[0]
    keep_l, keep_r = [2, 3, 4, 5, 6], [0, 1, 2, 5, 6]
    assert torch.equal(left[keep_l][:, keep_l], right[keep_r][:, keep_r])


def test_candidates_see_history_and_themselves_not_each_other():
    m = _mask([[0, 1, 1, 1]], [[1, 1, 1]])[0]  # T = 7, candidates at 4, 5, 6
    L = 4
    for c in range(L, 7):
        assert torch.equal(m[c, :L], torch.tensor([False, True, True, True]))
        assert torch.equal(m[c, L:], torch.arange(L, 7) == c)


def test_candidates_of_a_search_request_see_its_query():
    # the request's query token is the last history token
    m = _mask([[1, 1, 1]], [[1, 1]])[0]
    assert m[3, 2] and m[4, 2]


def test_history_never_sees_candidates():
    m = _mask([[1, 1, 1]], [[1, 1]])[0]
    assert not m[:3, 3:].any()


def test_padded_candidates_see_only_themselves():
    m = _mask([[1, 1]], [[1, 0]])[0]
    assert m[3].sum() == 1 and m[3, 3]
    assert not m[2, 3]  # the valid candidate does not see the padded one


def test_shape_broadcasts_over_heads():
    assert attention_mask(torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)).shape == (3, 1, 7, 7)


def test_last_valid_index_either_padding_side():
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert last_valid_index(valid).tolist() == [3, 2, 0]
