import numpy as np
import pytest
import torch
from rqvae_catalog import catalog

from synergen_core.config import ConfigError, SemanticIdConfig, load_config
from synergen_core.rqvae import (
    RQVAE, SemanticIds, _reset_dead_codes, assign, assign_with_candidates, build_rqvae, id_metrics,
    resolve_collisions, semantic_ids, train_rqvae,
)
from synergen_core.rqvae_capacity import capacity_size, level_sizes, train_rows

CFG = SemanticIdConfig(
    latent_dim=8, hidden_dims=[32], shared_levels=2, specific_levels=1, codebook_size=32, epochs=25,
    batch_size=128, dead_code_interval=10, warm_epochs=3, seed=0,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread_module):
    yield


@pytest.fixture(scope="module")
def data():
    return catalog(600)


@pytest.fixture(scope="module")
def trained(data):
    return train_rqvae(*data, CFG)


def test_training_lowers_reconstruction_and_uses_level_one(data, trained):
    model, history = trained
    assert history[-1]["recon_t"] < 0.5 * history[0]["recon_t"]
    assert history[-1]["recon_c"] < 0.5 * history[0]["recon_c"]
    ids = semantic_ids(model, *data)
    m = id_metrics(model, *data, ids)
    assert m["levels"]["shared_0"]["utilization"] >= 0.8
    assert m["recon_text"] < history[0]["recon_t"]


def test_codes_in_range_and_views_share_their_prefix(data, trained):
    model, _ = trained
    ids = semantic_ids(model, *data)
    assert ids.raw.shape == (600, 4) and ids.raw.dtype == np.int64
    assert ids.raw.min() >= 0 and ids.raw.max() < CFG.codebook_size
    assert ids.search.shape == ids.rec.shape == (600, 3)
    np.testing.assert_array_equal(ids.search[:, :2], ids.rec[:, :2])  # shared codes
    np.testing.assert_array_equal(ids.search[:, :2], ids.raw[:, :2])
    assert ids.search.max() < CFG.codebook_size and ids.rec.max() < CFG.codebook_size


def test_reassign_gives_unique_ids_from_the_trained_model(data, trained):
    model, _ = trained
    ids = semantic_ids(model, *data)
    m = id_metrics(model, *data, ids)
    for view, final in (("search", ids.search), ("rec", ids.rec)):
        assert m[view]["collision_rate_before"] > 0.05  # 32-code books force collisions
        assert m[view]["collision_rate_after"] == 0.0 and m[view]["unique_id_share"] == 1.0
        assert len(np.unique(final, axis=0)) == len(final)


def test_reassign_with_frequent_forced_collisions_moves_only_the_last_code():
    cfg = SemanticIdConfig(shared_levels=1, specific_levels=1, codebook_size=8, candidates=8)
    rng = np.random.default_rng(0)
    n = 8 * 7  # 7 items under each of the 8 shared codes: at most 7 of 8 last codes taken
    raw = np.stack([np.repeat(np.arange(8), 7), rng.integers(0, 3, n), rng.integers(0, 3, n)], 1)
    cands = np.stack([np.stack([np.r_[r, [c for c in rng.permutation(8) if c != r]] for r in raw[:, v + 1]])
                      for v in range(2)], 1)  # [n, 2, 8], the raw code first
    dists = np.sort(rng.random((n, 2, 8)), axis=2)
    ids = resolve_collisions(raw, cands, dists, cfg)
    for v, final in enumerate((ids.search, ids.rec)):
        assert len(np.unique(final, axis=0)) == n
        np.testing.assert_array_equal(final[:, 0], raw[:, 0])
        assert final.max() < 8
        kept = final[:, 1] == raw[:, v + 1]
        assert kept.sum() == len(np.unique(raw[:, [0, v + 1]], axis=0))  # one holder per raw ID stays


def test_reassign_is_stable_for_unchanged_raw_codes_even_past_the_candidates():
    cfg = SemanticIdConfig(shared_levels=1, specific_levels=1, codebook_size=8, candidates=2)
    rng = np.random.default_rng(1)
    raw = np.stack([np.repeat(np.arange(4), 6), rng.integers(0, 2, 24), rng.integers(0, 2, 24)], 1)
    cands = np.stack([np.stack([raw[:, v + 1], 1 - raw[:, v + 1]], 1) for v in range(2)], 1)  # [24, 2, 2]
    dists = np.sort(rng.random((24, 2, 2)), axis=2)
    first = resolve_collisions(raw, cands, dists, cfg)
    assert (first.search[:, 1] >= 2).any()  # some items had to go beyond their two candidates
    again = resolve_collisions(raw, cands, dists[::-1].copy(), cfg, previous=first)  # other priorities
    np.testing.assert_array_equal(again.search, first.search)
    np.testing.assert_array_equal(again.rec, first.rec)


def test_reassign_overflow_says_what_to_do():
    cfg = SemanticIdConfig(shared_levels=1, specific_levels=1, codebook_size=4, candidates=4)
    raw = np.zeros((5, 3), np.int64)  # 5 items under one prefix, only 4 last codes
    cands = np.tile(np.arange(4), (5, 2, 1))
    with pytest.raises(ValueError, match="extra_code"):
        resolve_collisions(raw, cands, np.zeros((5, 2, 4)), cfg)


def test_extra_code_makes_ids_unique_even_with_tiny_codebooks(data):
    cfg = CFG.model_copy(update={"codebook_size": 4, "collision": "extra_code", "epochs": 5})
    model, _ = train_rqvae(*data, cfg)
    ids = semantic_ids(model, *data)
    m = id_metrics(model, *data, ids)
    assert m["search"]["collision_rate_before"] > 0.5 and m["rec"]["collision_rate_before"] > 0.5
    for final in (ids.search, ids.rec):
        assert final.shape == (600, 4) and final.min() >= 0
        assert len(np.unique(final, axis=0)) == 600
    np.testing.assert_array_equal(ids.search[:, :3], ids.raw[:, :3])
    assert m["search"]["max_extra_code"] == ids.search[:, -1].max() > 0


def test_extra_code_keeps_previous_holders():
    cfg = SemanticIdConfig(shared_levels=1, specific_levels=1, codebook_size=4, collision="extra_code", candidates=4)
    raw = np.zeros((3, 3), np.int64)
    cands, dists = np.tile(np.arange(4), (3, 2, 1)), np.tile(np.arange(4.0), (3, 2, 1))
    prev = np.array([[0, 0, 1], [-1, -1, -1], [0, 0, 0]])  # item 1 is new
    ids = resolve_collisions(raw, cands, dists, cfg, SemanticIds(raw=np.full((3, 3), -1), search=prev, rec=prev))
    np.testing.assert_array_equal(ids.search[:, -1], [1, 2, 0])


def test_assign_is_pure_batched_and_deterministic(data, trained):
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = assign(model, *data)
    np.testing.assert_array_equal(full, assign(model, *data, batch_size=7))
    np.testing.assert_array_equal(full[10:20], assign(model, data[0][10:20], data[1][10:20]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert assign(model, data[0][:0], data[1][:0]).shape == (0, 4)
    codes, cands, dists = assign_with_candidates(model, *data)
    np.testing.assert_array_equal(cands[:, 0, 0], codes[:, 2])  # nearest candidate = the raw code
    np.testing.assert_array_equal(cands[:, 1, 0], codes[:, 3])
    assert (np.diff(dists, axis=2) >= 0).all()


def test_warm_start_reproduces_ids_and_fine_tuning_keeps_them(data, trained):
    model, _ = trained
    ids = semantic_ids(model, *data)
    reloaded = build_rqvae(32, 16, CFG, state=model.state_dict())
    again = semantic_ids(reloaded, *data)
    for a, b in ((ids.raw, again.raw), (ids.search, again.search), (ids.rec, again.rec)):
        np.testing.assert_array_equal(a, b)
    tuned, _ = train_rqvae(*data, CFG, state=model.state_dict())
    m = id_metrics(tuned, *data, semantic_ids(tuned, *data, previous=ids), previous=ids)
    assert m["either_id_change_share"] < 0.05
    assert m["search"]["collision_rate_after"] == m["rec"]["collision_rate_after"] == 0.0


def test_same_seed_same_model(data, trained):
    again, _ = train_rqvae(*data, CFG)
    np.testing.assert_array_equal(assign(trained[0], *data), assign(again, *data))


def test_cold_start_items_get_ids_without_moving_old_ones(data, trained):
    model, _ = trained
    old = semantic_ids(model, *data)
    t_new, c_new = catalog(60, seed=1)
    t_all, c_all = np.concatenate([data[0], t_new]), np.concatenate([data[1], c_new])
    pad = lambda a: np.concatenate([a, np.full((60, a.shape[1]), -1)])  # noqa: E731
    prev = SemanticIds(raw=pad(old.raw), search=pad(old.search), rec=pad(old.rec))
    ids = semantic_ids(model, t_all, c_all, previous=prev)
    np.testing.assert_array_equal(ids.search[:600], old.search)
    np.testing.assert_array_equal(ids.rec[:600], old.rec)
    assert len(np.unique(ids.search, axis=0)) == len(np.unique(ids.rec, axis=0)) == 660
    m = id_metrics(model, t_all, c_all, ids, previous=prev)
    assert m["search"]["old_items"] == 600 and m["either_id_change_share"] == 0.0


def test_metrics_are_sane(data, trained):
    model, _ = trained
    ids = semantic_ids(model, *data)
    m = id_metrics(model, *data, ids, previous=ids)
    assert m["n_items"] == 600 and m["either_id_change_share"] == 0.0
    assert set(m["levels"]) == {"shared_0", "shared_1", "text_0", "collab_0"}
    for lv in m["levels"].values():
        assert 0 < lv["utilization"] <= 1 and 1 <= lv["perplexity"] <= CFG.codebook_size
    for view, vec in (("search", "text"), ("rec", "collab")):
        v = m[view]
        assert 0 <= v["collision_rate_after"] <= v["collision_rate_before"] <= 1
        assert v["id_change_share"] == 0.0 and v["max_extra_code"] is None
        assert 1 <= v["max_prefix_group"] <= 600
        sim = v["prefix_similarity"][vec]
        assert sim["same_prefix"] > sim["random"] + 0.1  # a shared first code means similar items


def test_dead_codes_are_reseeded_from_residuals():
    model = build_rqvae(4, 4, CFG)
    residuals = [torch.randn(50, cb.shape[1]) for cb in model.codebooks()]
    usage = [torch.ones(cb.shape[0], dtype=torch.long) for cb in model.codebooks()]
    usage[0][3] = 0
    before = model.shared[0].detach().clone()
    _reset_dead_codes(model, usage, residuals, torch.Generator().manual_seed(0))
    row = model.shared[0][3].detach()
    assert torch.cdist(row[None], residuals[0]).min() < 1e-2  # sits on a live residual now
    changed = (model.shared[0].detach() != before).any(1)
    assert changed.tolist() == [i == 3 for i in range(CFG.codebook_size)]


def test_kmeans_init_needs_a_first_batch_of_codebook_size(data):
    with pytest.raises(ValueError, match="codebook_size=32"):
        train_rqvae(data[0][:10], data[1][:10], CFG)


def test_config_sections_load_and_reject_bad_values():
    cfg = load_config(environ={"SYNERGEN__SEMANTIC_IDS__CODEBOOK_SIZE": "64",
                               "SYNERGEN__TEXT_ENCODER__KIND": "sentence_transformers"})
    assert cfg.semantic_ids.codebook_size == 64 and cfg.text_encoder.kind == "sentence_transformers"
    assert cfg.semantic_ids.shared_levels == 2 and cfg.semantic_ids.specific_levels == 1
    with pytest.raises(ConfigError, match="semantic_ids.collision"):
        load_config(environ={"SYNERGEN__SEMANTIC_IDS__COLLISION": "hash"})


def test_capacity_rule_keeps_todays_size_until_the_catalog_needs_more():
    d = SemanticIdConfig()  # 2 shared + 1 specific levels of 256, capacity_load 0.125: 2**21 items fit
    assert [capacity_size(d, n) for n in (1, 12_101, 2**21)] == [256, 256, 256]  # Beauty: 12,101 items
    assert [capacity_size(d, n) for n in (2**21 + 1, 2**22, 10_000_000)] == [512, 512, 2048]
    assert capacity_size(d.model_copy(update={"last_codebook_size": 300}), 10) == 300
    assert level_sizes(d.model_copy(update={"last_codebook_size": 512})) == [256, 256, 512, 512]
    two = d.model_copy(update={"specific_levels": 2, "last_codebook_size": 512})
    assert level_sizes(two) == [256, 256, 256, 512, 256, 512]


def test_a_catalog_that_overflows_todays_capacity_gets_a_larger_last_level(data):
    # 4 codes a level: 16 prefixes of 4 last codes hold 64 items, 600 items overflow them ("reassign" raised)
    cfg = CFG.model_copy(update={"codebook_size": 4, "epochs": 5})
    model, _ = train_rqvae(*data, cfg)
    # 600 / 4**2 = 37.5 items per prefix <= 0.125 * 512
    assert model.cfg.last_codebook_size == 512
    assert [cb.shape[0] for cb in model.codebooks()] == [4, 4, 512, 512]
    ids = semantic_ids(model, *data)
    m = id_metrics(model, *data, ids)
    for view, final in (("search", ids.search), ("rec", ids.rec)):
        assert m[view]["max_prefix_group"] > 4  # more than the old last level had codes
        assert m[view]["collision_rate_after"] == 0.0 and len(np.unique(final, axis=0)) == 600
        assert final.shape == (600, 3) and final[:, :2].max() < 4 and final[:, 2].max() < 512
    # a warm start keeps the stored size, with or without it in the config
    again = build_rqvae(32, 16, cfg, state=model.state_dict())
    assert again.cfg.last_codebook_size == 512
    np.testing.assert_array_equal(semantic_ids(again, *data).search, ids.search)
    tuned, _ = train_rqvae(*data, cfg, state=model.state_dict())
    assert tuned.cfg.last_codebook_size == 512


def test_training_sees_at_most_train_sample_rows(data, trained, monkeypatch):
    seen: list[int] = []
    forward = RQVAE.forward

    def counting(self, xt, xc, init=False):
        if not init:
            seen.append(xt.shape[0])
        return forward(self, xt, xc, init)

    monkeypatch.setattr(RQVAE, "forward", counting)
    cfg = CFG.model_copy(update={"train_sample": 200, "epochs": 2})
    model, history = train_rqvae(*data, cfg)
    assert len(history) == 2 and sum(seen) == 2 * 200  # each epoch sees the sample, not the 600 items
    assert len(train_rows(600, cfg)) == 200 and len(np.unique(train_rows(600, cfg))) == 200
    again, _ = train_rqvae(*data, cfg)  # seeded: the same sample, the same model
    np.testing.assert_array_equal(assign(model, *data), assign(again, *data))
    assert assign(model, *data).shape == (600, 4)  # every item is still coded
    seen.clear()
    # up to train_sample items: every row, as before the sample existed (the default is 200,000)
    whole, _ = train_rqvae(*data, CFG.model_copy(update={"train_sample": 600}))
    assert train_rows(600, CFG) is None and sum(seen) == CFG.epochs * 600
    np.testing.assert_array_equal(assign(whole, *data), assign(trained[0], *data))
    assert all(torch.equal(v, trained[0].state_dict()[k]) for k, v in whole.state_dict().items())


def test_a_sample_of_the_catalog_trains_with_the_catalogs_capacity(data):
    # the daily stage passes only its sample: the last level is sized for the catalog (n_items), not the sample
    cfg = CFG.model_copy(update={"capacity_load": 0.004, "epochs": 1})
    sample = (data[0][:300], data[1][:300])
    assert capacity_size(cfg, 300) == 128 and capacity_size(cfg, 600) == 256
    assert train_rqvae(*sample, cfg)[0].cfg.last_codebook_size == 128
    model, _ = train_rqvae(*sample, cfg, n_items=600)
    assert model.cfg.last_codebook_size == 256 and model.codebooks()[-1].shape[0] == 256
