"""Stage 3a/3b: text vectors of items and queries (jobs.text_vectors) and collaborative vectors (jobs.collab).

Day 1 runs the job directly, day 2 through the tracked stage (MLflow on SQLite). Variants that rewrite a
day (another encoder, a champion model) run in copies of the lake.
"""
from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stage3_lake import D1, D2, copy_lake, sessionized_lake, stage3_config

from jobs import collab, stages, text_vectors
from schemas import C
from schemas import semantic_ids as sid_schema
from schemas import sequences as S
from synergen_core import lake
from synergen_core.text_encoder import item_text, load_text_encoder
from synergen_core.vectors import unit_rows, vectors_array, vectors_matrix


def read(root, table, ds) -> pa.Table:
    files = lake.data_files(lake.partition(root, table, ds))
    return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()


def vecs(t: pa.Table) -> np.ndarray:
    return vectors_matrix(t[C.VECTOR])


def catalog_texts(root, upto: str, max_chars: int) -> dict[str, str]:
    """item_id -> text of its latest validated catalog row up to ``upto`` (computed here, not by the job)."""
    rows: dict[str, dict] = {}
    for d in lake.partitions(root, "validated/catalog"):
        if d <= upto:
            for r in read(root, "validated/catalog", d).to_pylist():
                rows[r[C.ITEM_ID]] = r
    return {i: item_text(r[C.TITLE], r[C.CATEGORIES], r[C.DESCRIPTION], r[C.BRAND], max_chars)
            for i, r in rows.items()}


@pytest.fixture(scope="module")
def emb(spark, tmp_path_factory):
    root = sessionized_lake(spark, tmp_path_factory, "emb")
    cfg = stage3_config(root)
    cfg.mlflow.tracking_uri = f"sqlite:///{root.parent}/mlflow.db"
    cfg.mlflow.artifact_root = root.parent / "art"
    out = {D1: stages.item_vectors(spark, cfg, D1), D2: stages.item_embeddings(cfg, D2, group="test-run")}
    return {"root": root, "cfg": cfg, "out": out}


def test_one_vector_per_item_and_query(emb):
    root = emb["root"]
    for ds in (D1, D2):
        for name, vocab, key in (("items", "item_vocab", C.ITEM_INDEX), ("queries", "query_vocab", C.QUERY_INDEX)):
            got, voc = read(root, f"embeddings/{name}", ds), read(root, f"sessionized/{vocab}", ds)
            assert S.conforms(got.schema.remove_metadata(), sid_schema.TABLES[name])
            assert sorted(got[key].to_pylist()) == sorted(voc[key].to_pylist())  # one row each, no duplicates
            v = vecs(got)
            assert v.shape == (len(voc), 256)
            assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
            assert emb["out"][ds][name]["rows"] == len(voc)


def test_day2_embeds_only_new_and_changed_texts(emb):
    root, cfg, out = emb["root"], emb["cfg"], emb["out"]
    mx = cfg.text_encoder.max_description_chars
    t1, t2 = catalog_texts(root, D1, mx), catalog_texts(root, D2, mx)
    expected = {i for i, t in t2.items() if t1.get(i) != t}
    assert len(expected) > len(set(t2) - set(t1)) > 0  # new items and changed descriptions both occur
    d1, d2 = read(root, "embeddings/items", D1), read(root, "embeddings/items", D2)
    embedded = {i for i, d in zip(d2[C.ITEM_ID].to_pylist(), d2[C.EMBEDDED_DS].to_pylist()) if d == D2}
    assert embedded == expected
    s = out[D2]["items"]
    assert (s["embedded"], s["carried"], s["new"]) == (len(expected), s["rows"] - len(expected), len(set(t2) - set(t1)))
    assert s["mode"] == "incremental" and out[D1]["items"]["embedded"] == out[D1]["items"]["rows"]
    # the hash is of the item's current text; carried rows are yesterday's, bit for bit
    fp = text_vectors.encoder_fingerprint(cfg.text_encoder)
    assert d2[C.TEXT_HASH].to_pylist() == [text_vectors.text_hash(fp, t2[i]) for i in d2[C.ITEM_ID].to_pylist()]
    old = {i: k for k, i in enumerate(d1[C.ITEM_ID].to_pylist())}
    v1, v2 = vecs(d1), vecs(d2)
    for k, i in enumerate(d2[C.ITEM_ID].to_pylist()):
        if i not in expected:
            assert np.array_equal(v2[k], v1[old[i]])
    # queries: an index never changes its text, so exactly the new queries are embedded
    q1, q2 = read(root, "embeddings/queries", D1), read(root, "embeddings/queries", D2)
    new_q = set(q2[C.QUERY_INDEX].to_pylist()) - set(q1[C.QUERY_INDEX].to_pylist())
    assert new_q and {i for i, d in zip(q2[C.QUERY_INDEX].to_pylist(), q2[C.EMBEDDED_DS].to_pylist())
                      if d == D2} == new_q
    assert out[D2]["queries"]["embedded"] == len(new_q)


def test_vectors_are_the_encoders(emb):
    root, cfg = emb["root"], emb["cfg"]
    enc = load_text_encoder(cfg.text_encoder)
    texts = catalog_texts(root, D2, cfg.text_encoder.max_description_chars)
    items = read(root, "embeddings/items", D2).slice(0, 20)
    want = enc.encode([texts[i] for i in items[C.ITEM_ID].to_pylist()])
    assert np.allclose(vecs(items), want, atol=1e-5)
    queries = read(root, "embeddings/queries", D2).slice(0, 20)
    assert np.allclose(vecs(queries), enc.encode(queries[C.QUERY].to_pylist()), atol=1e-5)


def test_encoder_change_embeds_everything_again(emb, spark, tmp_path, monkeypatch):
    cfg = stage3_config(copy_lake(emb["root"], tmp_path / "lake"))
    monkeypatch.setattr(text_vectors, "encoder_fingerprint", lambda enc: "another-encoder")
    out = text_vectors.embed_texts(spark, cfg, D2)
    for name in ("items", "queries"):
        assert out[name]["mode"].startswith("encoder changed") and out[name]["embedded"] == out[name]["rows"]
    meta = lake.read_meta(cfg.lake.root, cfg.layout.vectors("items"), D2, text_vectors.META_FILE)
    assert meta["fingerprint"] == "another-encoder"


def test_als_bootstrap_and_text_fallback(emb):
    root, cfg = emb["root"], emb["cfg"]
    c1 = read(root, "embeddings/collab", D1)
    assert S.conforms(c1.schema.remove_metadata(), sid_schema.COLLAB_EMBEDDINGS)
    events = pl.from_arrow(read(root, "sessionized/events", D1))
    engaged = set(events.filter(pl.col(C.ITEM_INDEX).is_not_null())[C.ITEM_INDEX].to_list())
    src = dict(zip(c1[C.ITEM_INDEX].to_pylist(), c1[C.VECTOR_SOURCE].to_pylist()))
    assert {i for i, s in src.items() if s == sid_schema.SOURCE_ALS} == engaged
    assert {i for i, s in src.items() if s == sid_schema.SOURCE_TEXT} == set(src) - engaged != set()
    v = vecs(c1)
    assert v.shape[1] == cfg.embeddings.als_rank and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    # the fallback is the similarity-weighted mean of the k text-nearest engaged items' ALS vectors
    text = vecs(read(root, "embeddings/items", D1).sort_by(C.ITEM_INDEX))  # the collab table is sorted
    anchor = np.array([s == sid_schema.SOURCE_ALS for s in c1[C.VECTOR_SOURCE].to_pylist()])
    want = collab.text_neighbour_vectors(text[anchor], v[anchor], text[~anchor], cfg.embeddings.fallback_neighbours)
    assert np.allclose(v[~anchor], want, atol=1e-5)
    # and it lands nearer its nearest engaged item than a random engaged item does
    nearest = (unit_rows(text[~anchor]) @ unit_rows(text[anchor]).T).argmax(1)
    assert (v[~anchor] * v[anchor][nearest]).sum(1).mean() > (v[~anchor] @ v[anchor].T).mean() + 0.2
    assert emb["out"][D1]["collab"]["mode"] == "als"


def test_day2_carries_collab_vectors_and_new_items_fall_back(emb):
    root = emb["root"]
    c1, c2 = read(root, "embeddings/collab", D1), read(root, "embeddings/collab", D2)
    v1 = dict(zip(c1[C.ITEM_ID].to_pylist(), vecs(c1)))
    src2 = c2[C.VECTOR_SOURCE].to_pylist()
    for i, s, v, d in zip(c2[C.ITEM_ID].to_pylist(), src2, vecs(c2), c2[C.COMPUTED_DS].to_pylist()):
        if s == sid_schema.SOURCE_ALS:
            assert np.array_equal(v, v1[i]) and d == D1  # the ALS space is kept, not refitted
        if i not in v1:
            assert s == sid_schema.SOURCE_TEXT and d == D2
    out = emb["out"][D2]["collab"]
    assert out["mode"] == "carried" and out["basis"] == f"als:{D1}"


def test_champion_vectors_replace_als_rotated_onto_yesterday(emb, spark, tmp_path):
    cfg = stage3_config(copy_lake(emb["root"], tmp_path / "lake"))
    c1 = read(cfg.lake.root, "embeddings/collab", D1)
    als = np.array([s == sid_schema.SOURCE_ALS for s in c1[C.VECTOR_SOURCE].to_pylist()])
    ids = np.asarray(c1[C.ITEM_ID].to_pylist(), object)[als]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))  # the champion's own basis
    rotated = (vecs(c1)[als] @ q).astype(np.float32)

    out = collab.run(spark, cfg, D2, champion=lambda cfg, ds: collab.ChampionVectors("v7", ids.tolist(), rotated))
    assert out["mode"] == "champion" and out["basis"] == "champion:v7" and out["aligned"]
    assert out["alignment_cosine_after"] > 0.999 > out["alignment_cosine_before"]
    c2 = read(cfg.lake.root, "embeddings/collab", D2)
    by_id = dict(zip(c2[C.ITEM_ID].to_pylist(), zip(vecs(c2), c2[C.VECTOR_SOURCE].to_pylist())))
    for i, v in zip(ids, vecs(c1)[als]):
        assert by_id[i][1] == sid_schema.SOURCE_CHAMPION and np.allclose(by_id[i][0], v, atol=1e-4)
    assert out["sources"] == {"als": 0, "champion": len(ids), "text_neighbours": len(c2) - len(ids)}

    # the config form of the hook: a Parquet file of (item_id, vector)
    path = tmp_path / "champion.parquet"
    pq.write_table(pa.table({C.ITEM_ID: ids.tolist(), C.VECTOR: vectors_array(rotated)}), path)
    cfg.embeddings.champion_vectors = path
    again = collab.run(spark, cfg, D2)
    assert again["basis"].startswith("champion:sha256:") and again["sources"] == out["sources"]


def test_tracked_stage_logs_counts_to_mlflow(emb):
    cfg, out = emb["cfg"], emb["out"][D2]
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment],
                              filter_string="tags.`synergen.stage` = 'item_embeddings'", output_format="list")
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert m["items.embedded"] == out["items"]["embedded"] and m["items.carried"] == out["items"]["carried"]
    assert m["queries.embedded"] == out["queries"]["embedded"]
    assert m["collab.sources.als"] == out["collab"]["sources"]["als"] > 0
    assert runs[0].data.tags["synergen.collab.mode"] == "carried"


def test_python_stages_run_on_this_interpreter(spark):
    """Arrow stages import pyarrow, torch and the project on the workers: they must run the driver's
    interpreter (the venv), not whichever ``python3`` is first on the PATH."""
    import sys

    import pandas as pd

    def executable(batches):
        for _ in batches:
            yield pd.DataFrame({"python": [sys.executable]})

    seen = {r.python for r in spark.range(2).mapInPandas(executable, "python string").collect()}
    assert seen == {sys.executable}
