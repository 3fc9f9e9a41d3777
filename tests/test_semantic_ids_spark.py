"""The semantic-IDs stage on Spark (jobs.semantic_ids, jobs.semantic_ids_spark) gives the IDs of the
in-process path it replaced (rqvae.train_rqvae, assign_with_candidates, resolve_collisions on the whole
catalog): a cold day, then a warm rerun with 1% new items, on a hand-made lake of 600 generated items
whose 32-code books force collisions; plus the hash-chosen training sample and the overflow error.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rqvae_catalog import catalog

from jobs import semantic_ids
from jobs import semantic_ids_spark as sids
from schemas import C
from schemas import semantic_ids as sid_schema
from schemas import sequences as seq_schema
from synergen_core import lake
from synergen_core.config import Config
from synergen_core.rqvae import SemanticIds, assign_with_candidates, resolve_collisions, semantic_ids as ids_of
from synergen_core.rqvae import train_rqvae
from synergen_core.vectors import vectors_array

D1, D2 = "2026-03-01", "2026-03-02"
N1, NEW = 600, 6  # day 2: 1% new items


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread_module):
    yield


def config(root, collision: str = "reassign") -> Config:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.shuffle_partitions = 2
    s = cfg.semantic_ids
    s.latent_dim, s.hidden_dims, s.codebook_size, s.candidates, s.collision = 8, [32], 32, 16, collision
    s.epochs, s.batch_size, s.warm_epochs, s.dead_code_interval, s.seed = 25, 128, 3, 10, 0
    s.retrain_drift_threshold = 0.0  # day 2 fine-tunes
    return cfg


def write_day(root, ds: str, text: np.ndarray, collab: np.ndarray) -> None:
    n = len(text)
    index = pa.array(np.arange(1, n + 1), pa.int32())
    ids = pa.array([f"item{i}" for i in range(1, n + 1)])
    day = pa.array([ds] * n)
    tables = {
        "embeddings/items": pa.table([index, ids, pa.array(["h"] * n), vectors_array(text), day],
                                     schema=sid_schema.ITEM_EMBEDDINGS),
        "embeddings/collab": pa.table([index, ids, vectors_array(collab), pa.array(["als"] * n), day],
                                      schema=sid_schema.COLLAB_EMBEDDINGS),
        "sessionized/item_vocab": pa.table([index, ids, day, pa.array(np.ones(n, np.int64))],
                                           schema=seq_schema.ITEM_VOCAB),
    }
    for name, t in tables.items():
        lake.write_partition(t, lake.partition(root, name, ds))


def read_ids(root, ds: str) -> pa.Table:
    files = lake.data_files(lake.partition(root, lake.Layout.semantic_ids, ds))
    return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks().sort_by(C.ITEM_INDEX)


def ids(t: pa.Table) -> SemanticIds:
    return SemanticIds(*(sids.codes_matrix(t[c]) for c in (C.RAW_CODES, C.SEARCH_CODES, C.REC_CODES)))


def stored_state(root, ds: str) -> dict:
    part = lake.partition(root, lake.Layout.semantic_ids_model, ds)
    return torch.load(part / semantic_ids.MODEL_FILE, weights_only=True)


@pytest.mark.parametrize("collision", ["reassign", "extra_code"])
def test_ids_are_the_in_process_ones_cold_and_warm_with_1pct_new_items(spark, tmp_path, collision):
    root = tmp_path / "lake"
    cfg = config(root, collision)
    t_all, c_all = catalog(N1 + NEW, seed=3)
    write_day(root, D1, t_all[:N1], c_all[:N1])
    write_day(root, D2, t_all, c_all)

    out1 = semantic_ids.run(spark, cfg, D1)
    model1, _ = train_rqvae(t_all[:N1], c_all[:N1], cfg.semantic_ids)
    state1 = stored_state(root, D1)
    assert all(torch.equal(state1[k], v) for k, v in model1.state_dict().items())
    want1, got1 = ids_of(model1, t_all[:N1], c_all[:N1]), ids(read_ids(root, D1))
    for name in ("raw", "search", "rec"):
        np.testing.assert_array_equal(getattr(got1, name), getattr(want1, name))
    assert out1["search"]["collision_rate_before"] > 0.05 and out1["search"]["collision_rate_after"] == 0

    out2 = semantic_ids.run(spark, cfg, D2)
    assert out2["mode"] == "warm" and out2["new_items"] == NEW
    model2, _ = train_rqvae(t_all, c_all, cfg.semantic_ids, state=model1.state_dict())
    pad = lambda a: np.concatenate([a, np.full((NEW, a.shape[1]), -1, np.int64)])  # noqa: E731
    prev = SemanticIds(pad(want1.raw), pad(want1.search), pad(want1.rec))
    raw, cands, dists = assign_with_candidates(model2, t_all, c_all, prev.raw)
    want2 = resolve_collisions(raw, cands, dists, model2.cfg, previous=prev)
    t2 = read_ids(root, D2)
    got2 = ids(t2)
    for name in ("raw", "search", "rec"):
        np.testing.assert_array_equal(getattr(got2, name), getattr(want2, name))
    kept = (want2.search[:N1] == want1.search).all(1) & (want2.rec[:N1] == want1.rec).all(1)
    assert t2[C.ID_DS].to_pylist() == [D1 if k else D2 for k in kept] + [D2] * NEW
    assert out2["either_id_change_share"] == pytest.approx(1 - kept.mean())
    assert out2["raw_codes_changed_share"] == pytest.approx((want2.raw[:N1] != want1.raw).any(1).mean())


def test_training_sample_is_bounded_and_stable_from_day_to_day(spark, tmp_path):
    root = tmp_path / "lake"
    cfg = config(root)
    t_all, c_all = catalog(N1 + NEW, seed=4)
    write_day(root, D1, t_all[:N1], c_all[:N1])
    write_day(root, D2, t_all, c_all)
    sid = cfg.semantic_ids.model_copy(update={"train_sample": 200})
    samples = {}
    for ds, n in ((D1, N1), (D2, N1 + NEW)):
        vectors = sids.item_vectors(spark, cfg, ds)
        s = sids.collect_sample(vectors, n, sid, t_all.shape[1], c_all.shape[1])
        assert len(s.index) == 200 and np.all(np.diff(s.index) > 0)
        np.testing.assert_array_equal(s.text, t_all[s.index - 1])
        np.testing.assert_array_equal(s.collab, c_all[s.index - 1])
        samples[ds] = set(s.index.tolist())
    assert len(samples[D1] & samples[D2]) >= 200 - 2 * NEW  # a new item takes at most one old one's place
    whole = sids.collect_sample(sids.item_vectors(spark, cfg, D1), N1, cfg.semantic_ids, 32, 16)
    assert whole.index.tolist() == list(range(1, N1 + 1))  # below train_sample: every item, in order


def test_a_prefix_over_capacity_fails_with_the_in_process_error_and_publishes_nothing(spark, tmp_path):
    root = tmp_path / "lake"
    cfg = config(root)
    cfg.semantic_ids.last_codebook_size = 2
    t_all, c_all = catalog(N1, seed=5)
    write_day(root, D1, t_all, c_all)
    with pytest.raises(ValueError, match=r"holds more than the last level's 2 codes: use semantic_ids.collision"):
        semantic_ids.run(spark, cfg, D1)
    assert not lake.partition(root, lake.Layout.semantic_ids, D1).exists()
    assert not lake.partition(root, lake.Layout.semantic_ids_model, D1).exists()
    staged = root / lake.Layout.semantic_ids
    assert not staged.exists() or not [p for p in staged.iterdir() if p.name.startswith(".run")]
