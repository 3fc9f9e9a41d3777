"""Stage 3c: semantic IDs (jobs.semantic_ids): Spark assignment, uniqueness and coverage, day-2 stability
(reuse and warm retrain), the Great Expectations suite, MLflow metrics.

Day 1 trains cold; day 2 runs through the tracked stage with the default drift threshold (the model is
reused); a copy of the lake reruns day 2 with threshold 0 (warm retrain).
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from stage3_lake import D1, D2, copy_lake, sessionized_lake, stage3_config

from jobs import semantic_ids, stages
from jobs import semantic_ids_spark as sids
from schemas import C
from schemas import semantic_ids as sid_schema
from schemas import sequences as S
from synergen_core import lake
from synergen_core.rqvae import assign_with_candidates, build_rqvae
from synergen_core.rqvae_capacity import capacity_size
from synergen_core.vectors import list_array, vectors_matrix


def read(root, table, ds) -> pa.Table:
    files = lake.data_files(lake.partition(root, table, ds))
    return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks().sort_by(C.ITEM_INDEX)


def codes(t: pa.Table, col: str) -> np.ndarray:
    return sids.codes_matrix(t[col])


def load_model(cfg, ds):
    part = lake.partition(cfg.lake.root, lake.Layout.semantic_ids_model, ds)
    meta = json.loads((part / semantic_ids.MODEL_META).read_text())
    state = torch.load(part / semantic_ids.MODEL_FILE, weights_only=True)
    return build_rqvae(meta["text_dim"], meta["collab_dim"], cfg.semantic_ids, state).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread_module):
    yield


@pytest.fixture(scope="module")
def sid(spark, tmp_path_factory):
    root = sessionized_lake(spark, tmp_path_factory, "sid")
    cfg = stage3_config(root)
    cfg.mlflow.tracking_uri = f"sqlite:///{root.parent}/mlflow.db"
    cfg.mlflow.artifact_root = root.parent / "art"
    for ds in (D1, D2):
        stages.item_vectors(spark, cfg, ds)
    out = {D1: semantic_ids.run(spark, cfg, D1), D2: stages.semantic_ids(cfg, D2, group="test-run")}
    warm = stage3_config(copy_lake(root, tmp_path_factory.mktemp("sid_warm") / "lake"))
    warm.semantic_ids.retrain_drift_threshold = 0.0
    out["warm"] = semantic_ids.run(spark, warm, D2)
    return {"root": root, "cfg": cfg, "warm_cfg": warm, "out": out}


def test_spark_assignment_equals_driver_assign(sid, spark):
    cfg = sid["cfg"]
    model = load_model(cfg, D1)
    for ds, prev_ds in ((D1, None), (D2, D1)):
        text = vectors_matrix(read(cfg.lake.root, "embeddings/items", ds)[C.VECTOR])
        collab = vectors_matrix(read(cfg.lake.root, "embeddings/collab", ds)[C.VECTOR])
        rows = sids.with_previous(spark, cfg, sids.item_vectors(spark, cfg, ds), prev_ds)
        assigned, payload = sids.assign(rows, model, hysteresis=prev_ds is not None)
        got = assigned.toArrow().sort_by(C.ITEM_INDEX)  # the test's small catalog only
        payload.destroy()
        index = got[C.ITEM_INDEX].to_numpy()
        assert index.tolist() == read(cfg.lake.root, "embeddings/items", ds)[C.ITEM_INDEX].to_pylist()
        raw = codes(got, "raw")
        cands = np.stack([codes(got, "cand_text"), codes(got, "cand_collab")], 1)
        dists = np.stack([vectors_matrix(got["dist_text"]), vectors_matrix(got["dist_collab"])], 1)
        previous = None
        if prev_ds:  # yesterday's raw codes aligned to today's items, -1 rows for new items
            prev = read(cfg.lake.root, lake.Layout.semantic_ids, prev_ds)
            previous = np.full((len(index), raw.shape[1]), -1, np.int64)
            previous[np.searchsorted(index, prev[C.ITEM_INDEX].to_numpy())] = codes(prev, C.RAW_CODES)
        want = assign_with_candidates(model, text, collab, previous)
        assert np.array_equal(raw, want[0]) and np.array_equal(cands, want[1])
        assert np.allclose(dists, want[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ds", [D1, D2, "warm"])
def test_ids_unique_in_range_and_cover_the_catalog(sid, ds):
    cfg = sid["warm_cfg"] if ds == "warm" else sid["cfg"]
    ds = D2 if ds == "warm" else ds
    root, s = cfg.lake.root, cfg.semantic_ids
    t = read(root, lake.Layout.semantic_ids, ds)
    assert S.conforms(t.schema.remove_metadata(), sid_schema.SEMANTIC_IDS)
    vocab = read(root, "sessionized/item_vocab", ds)
    assert t[C.ITEM_INDEX].to_pylist() == vocab[C.ITEM_INDEX].to_pylist()
    assert t[C.ITEM_ID].to_pylist() == vocab[C.ITEM_ID].to_pylist()
    L = s.shared_levels + s.specific_levels
    for col, width in ((C.SEARCH_CODES, L), (C.REC_CODES, L), (C.RAW_CODES, L + s.specific_levels)):
        c = codes(t, col)
        assert c.shape == (len(t), width) and c.min() >= 0 and c.max() < s.codebook_size
        if col != C.RAW_CODES:
            assert len(np.unique(c, axis=0)) == len(t)
    # views share the prefix: the shared codes are the same in both IDs
    assert np.array_equal(codes(t, C.SEARCH_CODES)[:, :s.shared_levels], codes(t, C.REC_CODES)[:, :s.shared_levels])
    part = lake.partition(root, lake.Layout.semantic_ids, ds)
    assert json.loads((part / semantic_ids.VALIDATION_FILE).read_text())["success"]
    assert (lake.partition(root, lake.Layout.semantic_ids_model, ds) / semantic_ids.MODEL_FILE).is_file()


def test_day1_trains_cold_with_sane_quality(sid):
    out = sid["out"][D1]
    assert out["mode"] == "cold" and out["retrained"] == 1 and out["new_items"] == out["items"]
    assert out["levels"]["shared_0"]["utilization"] > 0.5
    for view in ("search", "rec"):
        assert out[view]["collision_rate_after"] == 0 and out[view]["unique_id_share"] == 1
        sim = out[view]["prefix_similarity"]
        for vectors in ("text", "collab"):
            assert sim[vectors]["same_prefix"] > sim[vectors]["random"]


def test_day2_reuses_the_model_keeps_ids_and_codes_new_items(sid):
    root, out = sid["root"], sid["out"][D2]
    assert out["mode"] == "reuse" and out["retrained"] == 0 and out["trained_ds"] == D1
    assert 0 < out["drift"]["new_item_share"] <= sid["cfg"].semantic_ids.retrain_drift_threshold
    t1, t2 = read(root, lake.Layout.semantic_ids, D1), read(root, lake.Layout.semantic_ids, D2)
    n1 = len(t1)
    assert t2[C.ITEM_INDEX].to_pylist()[:n1] == t1[C.ITEM_INDEX].to_pylist()  # indices only grow
    assert out["new_items"] == len(t2) - n1 > 0
    # every old item keeps its raw codes and both IDs exactly, those whose text or collaborative vector
    # changed since yesterday included (the model is kept: IDs move only on a day that retrains)
    items, col = read(root, "embeddings/items", D2), read(root, "embeddings/collab", D2)
    same_input = (pc.equal(items[C.EMBEDDED_DS], D1).to_numpy(zero_copy_only=False)
                  & pc.equal(col[C.COMPUTED_DS], D1).to_numpy(zero_copy_only=False))[:n1]
    assert 0.9 < same_input.mean() < 1  # some old items' vectors did change
    for view in (C.SEARCH_CODES, C.REC_CODES, C.RAW_CODES):
        assert np.array_equal(codes(t2, view)[:n1], codes(t1, view))
    assert set(t2[C.ID_DS].to_numpy(zero_copy_only=False)[:n1]) == {D1}
    assert set(t2[C.ID_DS].to_numpy(zero_copy_only=False)[n1:]) == {D2}
    assert out["existing_id_change_share"] == 0 and out["raw_codes_changed_share"] == 0
    for view in (C.SEARCH_CODES, C.REC_CODES):  # the new items took free IDs
        assert len(np.unique(codes(t2, view), axis=0)) == len(t2)
    meta = json.loads((lake.partition(root, lake.Layout.semantic_ids_model, D2) / semantic_ids.MODEL_META).read_text())
    assert meta["mode"] == "reuse" and meta["trained_ds"] == D1


def test_day2_warm_retrain_keeps_most_ids(sid):
    out, cfg = sid["out"]["warm"], sid["warm_cfg"]
    assert out["mode"] == "warm" and out["retrained"] == 1 and out["train"]["epochs"] == cfg.semantic_ids.warm_epochs
    assert any("new_item_share" in r for r in out["reasons"])
    assert out["existing_id_change_share"] < 0.2
    assert out["search"]["old_items"] == out["items"] - out["new_items"]
    part = lake.partition(cfg.lake.root, lake.Layout.semantic_ids_model, D2)
    meta = json.loads((part / semantic_ids.MODEL_META).read_text())
    assert meta["trained_ds"] == D2 and meta["trained_items"] == out["items"]


def test_a_new_collab_basis_retrains_only_when_not_rotated_onto_yesterdays(sid, spark, tmp_path_factory):
    """A new champion's vectors rotated onto yesterday's space keep the model (the reconstruction drift
    decides); a basis the item-embedding stage could not align retrains."""
    cfg = stage3_config(copy_lake(sid["root"], tmp_path_factory.mktemp("sid_basis") / "lake"))
    meta_file = lake.partition(cfg.lake.root, "embeddings/collab", D2) / "_collab.json"
    prev = semantic_ids.load_previous(cfg, D2)
    for aligned, mode in ((True, "reuse"), (False, "warm")):
        meta = json.loads(meta_file.read_text())
        meta.update(basis="champion:synergen/7", aligned=aligned)
        meta_file.write_text(json.dumps(meta))
        got, reasons, _ = semantic_ids.decide(cfg, semantic_ids.load_inputs(spark, cfg, D2), prev)
        assert got == mode, reasons
        moved = [r for r in reasons if r.startswith(f"collaborative vectors moved: als:{D1} -> champion:synergen/7")]
        assert moved and moved[0].endswith("rotated onto yesterday's" if aligned else "not aligned")


def test_settings_change_forces_a_cold_start(sid, spark):
    cfg = sid["cfg"].model_copy(deep=True)
    inputs = semantic_ids.load_inputs(spark, cfg, D2)
    prev = semantic_ids.load_previous(cfg, D2)
    assert semantic_ids.decide(cfg, inputs, prev)[0] == "reuse"
    cfg.semantic_ids.codebook_size = 64
    mode, reasons, _ = semantic_ids.decide(cfg, inputs, prev)
    assert mode == "cold" and "settings changed" in reasons[0]


def test_a_capacity_change_forces_a_cold_start_with_its_reason(sid, spark):
    cfg = sid["cfg"].model_copy(deep=True)
    inputs = semantic_ids.load_inputs(spark, cfg, D2)
    prev = semantic_ids.load_previous(cfg, D2)
    cfg.semantic_ids.capacity_load = 0.001  # ~0.3 items per prefix need 512 last codes at this load
    mode, reasons, _ = semantic_ids.decide(cfg, inputs, prev)
    assert mode == "cold" and reasons == [
        f"ID capacity changed: last codebook 32 -> 512 codes for {inputs.n} items (capacity_load 0.001)"]


def test_a_grown_capacity_and_a_training_sample_work_end_to_end(sid, spark, tmp_path_factory):
    cfg = stage3_config(copy_lake(sid["root"], tmp_path_factory.mktemp("sid_grown") / "lake"))
    cfg.semantic_ids.capacity_load, cfg.semantic_ids.train_sample = 0.004, 200
    out = semantic_ids.run(spark, cfg, D1)
    size = capacity_size(cfg.semantic_ids, out["items"])
    assert size > 32 and out["last_codebook_size"] == size and out["train"]["rows"] == 200
    assert out["search"]["collision_rate_after"] == out["rec"]["collision_rate_after"] == 0
    t = read(cfg.lake.root, lake.Layout.semantic_ids, D1)
    raw = codes(t, C.RAW_CODES)
    assert raw[:, :2].max() < 32 and 32 <= raw[:, 2:].max() < size  # the larger last level is used
    for col in (C.SEARCH_CODES, C.REC_CODES):
        assert len(np.unique(codes(t, col), axis=0)) == len(t)
    part = lake.partition(cfg.lake.root, lake.Layout.semantic_ids_model, D1)
    assert json.loads((part / semantic_ids.MODEL_META).read_text())["arch"]["last_codebook_size"] == size
    assert json.loads((lake.partition(cfg.lake.root, lake.Layout.semantic_ids, D1)
                       / semantic_ids.VALIDATION_FILE).read_text())["success"]
    cfg.semantic_ids.capacity_load, cfg.semantic_ids.train_sample = 0.125, 200_000  # the defaults: 32 codes
    out = semantic_ids.run(spark, cfg, D2)
    assert out["mode"] == "cold" and out["reasons"][0].startswith(f"ID capacity changed: last codebook {size} -> 32")
    assert out["last_codebook_size"] == 32 and out["train"]["rows"] == out["items"]


def _break(t: pa.Table, how: str) -> pa.Table:
    if how == "missing item":
        return t.slice(1)
    col = C.SEARCH_CODES if how == "duplicate ID" else C.REC_CODES
    c = codes(t, col)
    if how == "duplicate ID":
        c[1] = c[0]
    else:
        c[3, -1] = 32  # = codebook_size
    return t.set_column(t.schema.get_field_index(col), col, list_array(c, pa.int32()))


def _validate(spark, t: pa.Table, vocab: pa.Table, cfg):
    return semantic_ids.validate_ids(spark.createDataFrame(t), spark.createDataFrame(vocab), cfg)


@pytest.mark.parametrize("how, check", [("duplicate ID", "unique_search_id"), ("code out of range", "code_in_range"),
                                        ("missing item", "item_covered")])
def test_validation_catches_a_broken_table(sid, spark, how, check):
    cfg = sid["cfg"]
    t = read(cfg.lake.root, lake.Layout.semantic_ids, D1)
    vocab = read(cfg.lake.root, "sessionized/item_vocab", D1).select([C.ITEM_INDEX])
    assert _validate(spark, t, vocab, cfg.semantic_ids)["success"]
    with pytest.raises(semantic_ids.SemanticIdsInvalid) as e:
        _validate(spark, _break(t, how), vocab, cfg.semantic_ids)
    assert [f["check"] for f in e.value.summary["failed"]] == [check]
    assert e.value.summary["failed"][0]["unexpected_count"] >= 1


def test_validation_catches_an_item_outside_the_vocabulary(sid, spark):
    cfg = sid["cfg"]
    t = read(cfg.lake.root, lake.Layout.semantic_ids, D1)
    vocab = read(cfg.lake.root, "sessionized/item_vocab", D1).select([C.ITEM_INDEX])
    with pytest.raises(semantic_ids.SemanticIdsInvalid) as e:
        _validate(spark, t, vocab.slice(1), cfg.semantic_ids)
    assert [f["check"] for f in e.value.summary["failed"]] == ["item_known"]


def test_validation_checks_each_code_against_its_own_level(sid, spark):
    """With a grown last level (64 codes), a shared-level code of 40 is out of range (its level has 32)."""
    cfg = sid["cfg"].semantic_ids.model_copy(update={"last_codebook_size": 64})
    t = read(sid["cfg"].lake.root, lake.Layout.semantic_ids, D1)
    vocab = read(sid["cfg"].lake.root, "sessionized/item_vocab", D1).select([C.ITEM_INDEX])
    assert _validate(spark, t, vocab, cfg)["success"]
    c = codes(t, C.RAW_CODES)
    c[0, 0] = 40  # < 64, the largest level, but not < 32
    broken = t.set_column(t.schema.get_field_index(C.RAW_CODES), C.RAW_CODES, list_array(c, pa.int32()))
    with pytest.raises(semantic_ids.SemanticIdsInvalid) as e:
        _validate(spark, broken, vocab, cfg)
    assert [(f["check"], f["columns"]) for f in e.value.summary["failed"]] == [("code_in_range", ["raw_0"])]
    c[0, 0], c[0, 2] = 0, 40  # the last text-specific level has 64 codes: in range
    ok = t.set_column(t.schema.get_field_index(C.RAW_CODES), C.RAW_CODES, list_array(c, pa.int32()))
    assert _validate(spark, ok, vocab, cfg)["success"]


def test_tracked_stage_logs_quality_metrics(sid):
    cfg, out = sid["cfg"], sid["out"][D2]
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment],
                              filter_string="tags.`synergen.stage` = 'semantic_ids'", output_format="list")
    assert len(runs) == 1
    m = runs[0].data.metrics
    for name in ("recon_text", "recon_collab", "levels.shared_0.utilization", "levels.shared_0.perplexity",
                 "levels.collab_0.perplexity", "search.collision_rate_before", "search.collision_rate_after",
                 "rec.unique_id_share", "search.id_change_share", "either_id_change_share",
                 "search.prefix_similarity.text.same_prefix", "rec.prefix_similarity.collab.random",
                 "drift.new_item_share", "new_items", "retrained", "duration_s"):
        assert name in m, name
    assert m["either_id_change_share"] == pytest.approx(out["either_id_change_share"])
    assert runs[0].data.tags["synergen.semantic_ids.mode"] == "reuse"
