"""SynerGen wiring: shapes, candidate isolation, padding, ablations, a tiny overfit run."""
import math

import pytest
import torch
import torch.nn.functional as F

from synergen_core.model import RECOMMEND, SEARCH, next_item_targets, prediction_task
from tiny_synergen import D_TEXT, K, LEVELS, N_ACTIONS, N_ITEMS, N_QUERIES, N_SURFACES, tiny_batch, tiny_model

L = 6


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_forward_shapes_and_heads():
    model = tiny_model().eval()
    batch = tiny_batch()
    hidden = model(batch)
    assert hidden.shape == (3, L + 4, 32) and torch.isfinite(hidden).all()
    assert model.ranking_scores(batch, hidden).shape == (3, 4)
    items = model.item_vectors()
    assert items.shape == (N_ITEMS, 32)
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(N_ITEMS))
    logits = model.retrieval_logits(model.last_hidden(batch, hidden))
    assert logits.shape == (3, N_ITEMS) and torch.isinf(logits[:, 0]).all()
    assert model.semantic_logits(hidden[:, 0], torch.zeros(3, LEVELS, dtype=torch.long)).shape == (3, LEVELS, K)
    for view in ("rec", "search"):
        out = model.generate(model.last_hidden(batch, hidden), beam=5, view=view)
        assert model.tries[view].contains(out.codes).all() and (out.items > 0).all()
        assert torch.equal(model.embed.codes(view)[out.items], out.codes)


def test_item_vectors_use_the_same_parts_as_item_tokens():
    model = tiny_model().eval()
    idx = torch.tensor([3, 7])
    torch.testing.assert_close(model.item_vectors(idx), model.retrieval.item(model.embed.item_content(idx)))
    torch.testing.assert_close(model.item_vectors()[idx], model.item_vectors(idx))


def test_candidates_affect_neither_history_nor_each_other():
    model = tiny_model().eval()
    batch = tiny_batch()
    hidden = model(batch)
    scores = model.ranking_scores(batch, hidden)
    changed = dict(batch, candidates=batch["candidates"].clone())
    changed["candidates"][0, 1] = 29
    hidden2 = model(changed)
    scores2 = model.ranking_scores(changed, hidden2)
    torch.testing.assert_close(hidden2[:, :L], hidden[:, :L], rtol=0, atol=1e-6)
    others = [0, 2, 3]
    torch.testing.assert_close(scores2[0, others], scores[0, others], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores2[1:], scores[1:], rtol=0, atol=1e-6)
    assert (scores2[0, 1] - scores[0, 1]).abs() > 1e-6
    no_cands = {k: v for k, v in batch.items() if k not in ("candidates", "labels")}
    torch.testing.assert_close(model(no_cands), hidden[:, :L], rtol=0, atol=1e-6)


def test_candidate_order_does_not_matter():
    model = tiny_model().eval()
    batch = tiny_batch()
    scores = model.ranking_scores(batch, model(batch))
    perm = torch.tensor([2, 0, 1, 3])
    swapped = dict(batch, candidates=batch["candidates"][:, perm])
    torch.testing.assert_close(model.ranking_scores(swapped, model(swapped)), scores[:, perm], atol=1e-6, rtol=0)



@pytest.mark.parametrize("task_towers", [False, True])
def test_ranking_prior_is_the_requests_own_retrieval_logit(task_towers):
    """With its own part silenced, the on_retrieval ranking head returns prior_scale x each candidate's
    retrieval logit for the same request (its task's tower with task towers: row 0 is a search request)."""
    model = tiny_model(task_towers=task_towers, ranking="on_retrieval").eval()
    with torch.no_grad():
        model.ranking.out.weight.zero_()
        model.ranking.out.bias.zero_()
        model.ranking.prior_scale.fill_(0.5)
        batch = tiny_batch()
        hidden = model(batch)
        scores = model.ranking_scores(batch, hidden)
        retrieval = model.request_logits(batch, hidden[:, :L]).gather(1, batch["candidates"])
    valid = batch["candidates"] > 0
    torch.testing.assert_close(scores[valid], 0.5 * retrieval[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranking", ["joint", "on_retrieval"])
def test_which_parameters_the_ranking_loss_trains(ranking):
    """joint: the ranking loss trains the shared backbone too; on_retrieval: only the ranking head (its
    inputs enter without gradient). The retrieval projections get no gradient from it either way."""
    model = tiny_model(task_towers=True, ranking=ranking)
    batch = tiny_batch()
    model.ranking_loss(batch, model(batch)).backward()
    assert all(p.grad is not None for p in model.ranking.parameters())
    for proj in (model.retrieval.query_proj, model.retrieval.search_query_proj, model.retrieval.item_proj):
        assert proj.weight.grad is None
    trunk = [p.grad for p in [*model.backbone.parameters(), *model.embed.parameters()] if p.requires_grad]
    if ranking == "joint":
        assert any(g is not None and bool(g.abs().sum() > 0) for g in trunk)
    else:
        assert all(g is None for g in trunk)


def test_model_saved_before_the_ranking_option_loads_as_joint():
    from synergen_core import checkpoint

    old = tiny_model()
    record = checkpoint.model_record(old, {"n_items": N_ITEMS, "n_queries": N_QUERIES, "n_actions": N_ACTIONS,
                                           "n_surfaces": N_SURFACES, "codebook_size": K})
    del record["model_config"]["ranking"]  # as written before the option existed
    loaded = checkpoint.build_from_record(record)
    assert loaded.ranking.prior_scale is None
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.ranking_scores(batch, loaded(batch)), old.eval().ranking_scores(batch, old(batch)))

@pytest.mark.parametrize("rope", ["time", "position"])
@pytest.mark.parametrize("request_ts", [False, True])
@pytest.mark.parametrize("ranking", ["joint", "on_retrieval"])
def test_cached_ranking_equals_the_masked_pass(rope, request_ts, ranking):
    """Inference ranks candidates against the history's cached keys and values (one history pass): the
    same history states and candidate scores as the masked pass over [history | candidates]."""
    model = tiny_model(rope=rope, ranking=ranking).eval()
    batch = tiny_batch()
    if request_ts:
        batch["request_ts"] = batch["ts"].amax(1) + 3600.0
    with torch.no_grad():
        hidden = model(batch)
        dense = model.ranking_scores(batch, hidden)
    history, cache = model.encode({k: v for k, v in batch.items() if k != "candidates"})
    torch.testing.assert_close(history, hidden[:, :L], rtol=0, atol=1e-5)
    valid = batch["candidates"] > 0
    cached = model.rank_cached(cache, batch["candidates"])
    torch.testing.assert_close(cached[valid], dense[valid], rtol=0, atol=1e-5)


def test_left_and_right_padding_agree():
    model = tiny_model().eval()
    batch = tiny_batch()
    right = {k: v[1:2] for k, v in batch.items()}  # row 1 is right-padded: 4 valid tokens
    left = {k: v.clone() for k, v in right.items()}
    for k in ("token_type", "item_idx", "query_idx", "action", "surface", "ts", "position"):
        left[k] = torch.roll(right[k], shifts=2, dims=1)
    h_r, h_l = model(right), model(left)
    torch.testing.assert_close(h_l[:, 2:L], h_r[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_l[:, L:], h_r[:, L:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.last_hidden(left, h_l), model.last_hidden(right, h_r), atol=1e-5, rtol=1e-5)


def test_shifting_all_times_and_positions_changes_nothing():
    model = tiny_model().eval()
    batch = tiny_batch()
    shifted = dict(batch, ts=batch["ts"] + 86_400.0 * 400, position=batch["position"] + 1000)
    torch.testing.assert_close(model(shifted), model(batch), atol=1e-4, rtol=1e-4)
    regapped = dict(batch, ts=batch["ts"].clone())
    regapped["ts"][:, -1] += 86_400.0 * 30
    assert not torch.allclose(model(regapped)[:, L - 1], model(batch)[:, L - 1], atol=1e-4)


def test_next_item_targets_and_tasks():
    batch = tiny_batch()
    target = next_item_targets(batch)
    # row 0: I3 Q4 I7 I8 I2 Q2 -> next items 0 after I3 (a query follows), 7 at the query, ...
    assert target[0].tolist() == [0, 7, 8, 2, 0, 0]
    assert target[1].tolist() == [6, 0, 0, 0, 0, 0]  # right-padded: I5 I6 Q1 I9; Q1 engaged nothing
    assert target[2].tolist() == [0, 0, 0, 13, 14, 0]  # left-padded: I12 Q5 I13 I14
    task = prediction_task(batch)
    assert task[0].tolist() == [RECOMMEND, SEARCH, RECOMMEND, RECOMMEND, RECOMMEND, SEARCH]
    assert task[2, :2].tolist() == [0, 0]
    explicit = dict(batch, target=torch.zeros_like(target))
    assert (next_item_targets(explicit) == 0).all()


def test_semantic_head_teacher_forcing_matches_step_by_step():
    model = tiny_model().eval()
    h = torch.randn(4, 32)
    codes = torch.randint(0, K, (4, LEVELS))
    full = model.semantic_logits(h, codes)
    for lvl in range(LEVELS):
        torch.testing.assert_close(full[:, lvl], model.semantic["rec"].level_logits(h, codes[:, :lvl]))


def test_search_positions_learn_search_view_ids():
    model = tiny_model().eval()
    batch = tiny_batch(with_candidates=False)
    hidden = model(batch)
    assert model.view_of("search") == "search" and model.view_of("rec") == "rec"
    # the search positions (Q4 -> I7, Q5 -> I13) are scored by the search-view head
    base = model.semantic_loss(batch, hidden).item()
    with torch.no_grad():
        model.semantic["search"].out[0].bias.add_(torch.arange(K, dtype=torch.float32) * 5)
    changed = model.semantic_loss(batch, hidden).item()
    assert changed > base
    only_rec = tiny_model(views=("rec",)).eval()
    assert only_rec.view_of("search") == "rec"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_text_emb=False, use_semantic_ids=False),  # ID-only
        dict(use_text_emb=False),
        dict(use_semantic_ids=False, semantic_head=False),
        dict(use_semantic_ids=False, semantic_head=False, views=()),  # no RQ-VAE codes at all
        dict(use_id_emb=False, use_action_surface=False),
        dict(rope="position", norm="layernorm", mlp="gelu", learn_temperature=False),
    ],
)
def test_ablations_run(overrides):
    model = tiny_model(**overrides)
    losses = model.losses(tiny_batch(), neg_idx=torch.tensor([17, 18, 19]), log_q=torch.full((N_ITEMS,), -3.0))
    assert torch.isfinite(losses["total"])
    losses["total"].backward()


def test_all_parts_off_is_an_error():
    with pytest.raises(ValueError):
        tiny_model(use_id_emb=False, use_text_emb=False, use_semantic_ids=False)


def test_query_text_in_the_batch_overrides_the_buffer():
    model = tiny_model().eval()
    batch = tiny_batch(with_candidates=False)
    same = dict(batch, query_text=model.embed.query_text[batch["query_idx"]])
    torch.testing.assert_close(model(same), model(batch))
    other = dict(batch, query_text=torch.randn(3, L, D_TEXT))
    assert not torch.allclose(model(other)[0, 1], model(batch)[0, 1])


def test_tiny_overfit():
    model = tiny_model(seed=1)
    batch = tiny_batch()
    neg = torch.tensor([17, 18, 19, 26, 27])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(50):
        losses = model.losses(batch, neg_idx=neg)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        first = first if first is not None else {k: v.item() for k, v in losses.items()}
    last = {k: v.item() for k, v in model.losses(batch, neg_idx=neg).items()}
    assert last["total"] < 0.5 * first["total"]
    for k in ("retrieval", "ranking", "semantic"):
        assert last[k] < first[k]


def test_task_towers_give_search_requests_their_own_query_and_temperature():
    """With task towers a search request is scored through search's query Linear and temperature, a
    recommendation request through the shared ones; the item side is the same for both."""
    model = tiny_model(task_towers=True).eval()
    batch = tiny_batch(with_candidates=False)
    search = model.request_is_search(batch)
    assert search.tolist() == [True, False, False]  # row 0 ends with a query token; rows 1, 2 with items
    with torch.no_grad():
        model.log_temp_search.fill_(math.log(0.2))
        hidden = model(batch)
        last = model.last_hidden(batch, hidden)
        logits = model.request_logits(batch, hidden)
        items = model.item_vectors()
        by_search = F.normalize(model.retrieval.search_query_proj(last), dim=-1) @ items.T / 0.2
        by_rec = F.normalize(model.retrieval.query_proj(last), dim=-1) @ items.T / model.log_temp.exp()
    torch.testing.assert_close(logits[0, 1:], by_search[0, 1:])
    torch.testing.assert_close(logits[1:, 1:], by_rec[1:, 1:])
    assert not torch.allclose(by_search[0, 1:], by_rec[0, 1:])
    # the training loss reaches the search tower only through search positions
    losses = model.train().losses(batch)
    losses["retrieval"].backward()
    assert model.retrieval.search_query_proj.weight.grad.abs().sum() > 0
    assert model.log_temp_search.grad is not None and model.log_temp_search.grad != 0


def test_without_task_towers_every_request_shares_one_query_tower():
    model = tiny_model().eval()
    assert model.retrieval.search_query_proj is None and model.log_temp_search is None
    batch = tiny_batch(with_candidates=False)
    with torch.no_grad():
        hidden = model(batch)
        torch.testing.assert_close(model.request_logits(batch, hidden),
                                   model.retrieval_logits(model.last_hidden(batch, hidden)))
