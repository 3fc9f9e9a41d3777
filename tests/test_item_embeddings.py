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


def _exact_fallback_as_before(anchor_text, anchor_vecs, text, k):
    """The fallback as it ran in one process before it ran in Spark: an exact faiss search of every anchor."""
    import faiss

    index = faiss.IndexFlatIP(anchor_text.shape[1])
    index.add(unit_rows(anchor_text))
    k = min(k, len(anchor_text))
    sims, nn = index.search(unit_rows(text), k)
    w = np.clip(sims, 0.0, None)
    v = (w[..., None] * anchor_vecs[nn]).sum(1)
    v[w.sum(1) <= 1e-6] = anchor_vecs.mean(0)
    return unit_rows(v)


def _fallback_rows(c: pa.Table, text_by_id: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor mask, text [n, d], collab [n, d]) of a collab table, text aligned to its rows."""
    anchor = np.array([s != sid_schema.SOURCE_TEXT for s in c[C.VECTOR_SOURCE].to_pylist()])
    return anchor, np.stack([text_by_id[i] for i in c[C.ITEM_ID].to_pylist()]), vecs(c)


def test_distributed_fallback_equals_the_exact_one_and_ivf_probing_every_list(emb, spark, tmp_path):
    root, cfg = emb["root"], emb["cfg"]
    t1 = read(root, "embeddings/items", D1)
    text_by_id = dict(zip(t1[C.ITEM_ID].to_pylist(), vecs(t1)))
    c1 = read(root, "embeddings/collab", D1)
    anchor, text, v = _fallback_rows(c1, text_by_id)
    k = cfg.embeddings.fallback_neighbours
    assert emb["out"][D1]["collab"]["fallback"] == {"anchors": int(anchor.sum()), "items_with_vector": int(anchor.sum()),
                                                    "index": "exact"}
    assert np.allclose(v[~anchor], _exact_fallback_as_before(text[anchor], v[anchor], text[~anchor], k), atol=1e-5)

    # an IVF index of the anchors probing every list finds the exact neighbours: the same table
    ivf = stage3_config(copy_lake(root, tmp_path / "lake"))
    ivf.embeddings.fallback_exact_max_anchors, ivf.embeddings.fallback_nprobe = 10, 10_000
    out = collab.run(spark, ivf, D1)
    assert out["fallback"]["index"] == "ivf" and out["fallback"]["nprobe"] == out["fallback"]["nlist"] > 1
    again = read(ivf.lake.root, "embeddings/collab", D1)
    assert again[C.ITEM_ID].to_pylist() == c1[C.ITEM_ID].to_pylist()
    assert again[C.VECTOR_SOURCE].to_pylist() == c1[C.VECTOR_SOURCE].to_pylist()
    assert again[C.COMPUTED_DS].to_pylist() == c1[C.COMPUTED_DS].to_pylist()
    assert np.allclose(vecs(again), v, atol=1e-5)


def test_anchors_bounded_by_config_are_the_most_engaged(emb, spark, tmp_path):
    root = emb["root"]
    capped = stage3_config(copy_lake(root, tmp_path / "lake"))
    capped.embeddings.fallback_max_anchors = 40
    out = collab.run(spark, capped, D2)  # carried from D1, then the fallback over the 40 most engaged
    assert out["fallback"]["anchors"] == 40 < out["fallback"]["items_with_vector"]
    c2 = read(capped.lake.root, "embeddings/collab", D2)
    t2 = read(root, "embeddings/items", D2)
    anchor, text, v = _fallback_rows(c2, dict(zip(t2[C.ITEM_ID].to_pylist(), vecs(t2))))
    vocab = read(root, "sessionized/item_vocab", D2)
    count = dict(zip(vocab[C.ITEM_INDEX].to_pylist(), vocab[C.COUNT].to_pylist()))
    index = np.asarray(c2[C.ITEM_INDEX].to_pylist())
    ranked = sorted(index[anchor], key=lambda i: (-count[i], i))[:40]
    top = np.isin(index, ranked)
    want = _exact_fallback_as_before(text[top], v[top], text[~anchor], capped.embeddings.fallback_neighbours)
    assert np.allclose(v[~anchor], want, atol=1e-5)
    # the carried vectors are untouched by the cap
    assert np.array_equal(v[anchor], vecs(read(root, "embeddings/collab", D2))[anchor])


def test_als_factors_are_the_string_indexer_ones(emb, spark):
    """The users are numbered by a distributed sort instead of StringIndexer (which holds every user on the
    driver); the numbering, hence the factors, are the same."""
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    from jobs.spark import read_days
    from schemas.sequences import EVENTS

    root, cfg = emb["root"], emb["cfg"]
    e = cfg.embeddings
    events = read_days(spark, root, cfg.layout.sessions("events"), EVENTS, upto=D1)
    eng = (events.where(F.col(C.ITEM_INDEX).isNotNull())
           .groupBy(C.USER_ID, C.ITEM_INDEX).agg(F.count("*").cast("float").alias("_weight")))
    users = StringIndexer(inputCol=C.USER_ID, outputCol="_user", stringOrderType="alphabetAsc").fit(eng)
    ratings = users.transform(eng).select(F.col("_user").cast("int").alias("_user"), C.ITEM_INDEX, "_weight")
    als = ALS(rank=e.als_rank, maxIter=e.als_max_iter, regParam=e.als_reg, alpha=e.als_alpha, implicitPrefs=True,
              userCol="_user", itemCol=C.ITEM_INDEX, ratingCol="_weight", seed=cfg.semantic_ids.seed,
              numUserBlocks=collab.als_blocks(spark, cfg), numItemBlocks=collab.als_blocks(spark, cfg))
    f = als.fit(ratings).itemFactors.toArrow()
    want = dict(zip(f["id"].to_pylist(), unit_rows(vectors_matrix(f["features"]))))
    c1 = read(root, "embeddings/collab", D1)
    got = {i: v for i, v, s in zip(c1[C.ITEM_INDEX].to_pylist(), vecs(c1), c1[C.VECTOR_SOURCE].to_pylist())
           if s == sid_schema.SOURCE_ALS}
    assert set(got) == set(want)
    assert max(np.abs(got[i] - want[i]).max() for i in got) < 1e-4
