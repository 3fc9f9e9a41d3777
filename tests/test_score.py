"""The scoring stage (jobs.score) on a real model: conftest's MovieLens slice, ingested, validated,
sessionized and trained once for the session (``movielens_models``, shared with tests/test_train_e2e.py),
then scored, validated and published.

Covered: the output contract and its publication, the Great Expectations suite (lists broken in each way it
checks, one request per check, each named), exclusion of consumed items, a rerun giving the same lists,
dense vs generative retrieval, search requests from a file (unseen queries, a user without history), the
registry reference, the candidate index (exact, IVF with measured recall, fallback), and (slow) the same
lists on ``local[*]`` and on a standalone cluster on 127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs import candidates, score, stages
from schemas import C
from schemas import candidates as candidate_schema
from schemas.sequences import conforms
from synergen_core import index as cindex
from synergen_core import lake, serving
from synergen_core.config import Config

ROOT = Path(__file__).resolve().parents[1]
TOP_K, RETRIEVE_N = 10, 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread_module):
    yield


@pytest.fixture(scope="module")
def trained(movielens_models):
    """conftest's trained slice, set up for scoring: (config, ds, the loo synergen model's folder).

    The lists are read from their own output layers of the shared lake, so the other users of the lake
    (tests/test_train_e2e.py) see nothing of them. No sessionize/train settings change: those built the
    lake and the models."""
    cfg, ds, result = movielens_models
    cfg = cfg.model_copy(deep=True)
    cfg.score = cfg.score.model_copy(update={"top_k": TOP_K, "retrieve_n": RETRIEVE_N, "lookback_days": None,
                                             "progress": False, "partitions": 2})
    return cfg, ds, Path(result["loo"]["models"]["synergen"]["out_dir"])


def with_score(cfg: Config, **kw) -> Config:
    out = cfg.model_copy(deep=True)
    out.score = out.score.model_copy(update=kw)
    return out


def lists_of(part: Path) -> pd.DataFrame:
    """A day's lists (staged or published) with ``surface``, in request and rank order."""
    t = pds.dataset(part, format="parquet", partitioning="hive").to_table()
    df = t.to_pandas().sort_values([C.SURFACE, C.USER_ID, C.QUERY, C.RANK], na_position="first")
    return df.reset_index(drop=True)


def consumed_by_user(cfg: Config) -> dict[str, set[str]]:
    t = pds.dataset(Path(cfg.lake.root) / "sessionized" / "events", format="parquet", partitioning="hive").to_table(
        columns=[C.USER_ID, C.ITEM_ID])
    df = t.to_pandas().dropna()
    return df.groupby(C.USER_ID)[C.ITEM_ID].agg(set).to_dict()


@pytest.fixture(scope="module")
def published(spark, trained):
    """The default dense run through the three tracked tasks: score -> validate_candidates -> publish."""
    cfg, ds, model_dir = trained
    out = stages.score(cfg, ds, model_dir=model_dir)
    report = stages.validate_candidates(cfg, ds)
    done = stages.publish(cfg, ds)
    return cfg, ds, out, report, done, lists_of(candidates.published_dir(cfg, ds))


# ---------------------------------------------------------------------------------------------
# contract, publication, tracking


def test_contract_publication_and_tracking(published, trained, spark):
    cfg, ds, out, report, done, df = published
    part = candidates.published_dir(cfg, ds)
    assert Path(done["path"]) == part and (part / lake.SUCCESS).is_file()
    assert not candidates.staged_dir(cfg, ds).exists()  # renamed, not copied
    assert sorted(p.name for p in part.glob("surface=*")) == ["surface=rec", "surface=search"]
    for f in pds.dataset(part, format="parquet", partitioning="hive").files:
        assert conforms(pq.read_schema(f), candidate_schema.CANDIDATES), f
    for name in (candidates.SCORE_FILE, candidates.VALIDATION_FILE, candidates.GE_FILE):
        assert (part / name).is_file()
    assert json.loads((part / candidates.VALIDATION_FILE).read_text())["success"] and report["failed"] == []

    # every user of the snapshot (lookback off) gets a rec list; search lists are the queries of ds
    rec, search = df[df[C.SURFACE] == "rec"], df[df[C.SURFACE] == "search"]
    assert rec[C.USER_ID].nunique() == out["surfaces"]["rec"]["lists"] == 19 and rec[C.QUERY].isna().all()
    assert out["surfaces"]["search"]["lists"] == search.groupby([C.USER_ID, C.QUERY]).ngroups > 0
    assert search[C.QUERY].notna().all()
    sizes = df.groupby([C.SURFACE, C.USER_ID, C.QUERY], dropna=False).size()
    assert (sizes == TOP_K).all() and report["rows"] == len(df) == out["surfaces"]["rec"]["rows"] + \
        out["surfaces"]["search"]["rows"]
    assert set(df[C.MODEL_NAME]) == {"synergen"}
    version = f"path:{(trained[2] / 'model.pt').resolve()}"
    assert set(df[C.MODEL_VERSION]) == {version}
    assert out["index"]["kind"] == cindex.EXACT and out["catalog_items"] == 1190
    # executors got the encoder by broadcast and the catalog-sized parts as files; tasks one CPU each
    assert 0 < out["payload"]["broadcast_bytes"] and 0 < out["payload"]["file_bytes"]
    assert set(out["task_cpus"]) == {"1"}

    # the three tasks are tracked MLflow runs with the run's counts and durations
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = {r.data.tags["synergen.stage"]: r for r in mlflow.search_runs(
        experiment_names=[cfg.mlflow.experiment], output_format="list")}
    assert {"score", "validate_candidates", "publish"} <= set(runs)
    m = runs["score"].data.metrics
    assert m["surfaces.rec.lists"] == 19 and m["seconds.total"] > 0 and m["users"] == out["users"]
    assert runs["score"].data.tags["synergen.model.version"] == version
    assert runs["validate_candidates"].data.metrics["failed_checks"] == 0

    # publishing needs a passing validation: a fresh staged day is refused until validated
    other = with_score(cfg, output="unvalidated", surfaces=["rec"])
    score.run(spark, other, ds, model_dir=trained[2])
    with pytest.raises(candidates.CandidatesInvalid, match="not validated"):
        candidates.publish(other, ds)
    assert not candidates.published_dir(other, ds).exists()


def test_consumed_items_are_excluded(published, spark, trained):
    cfg, ds, _, _, _, df = published
    consumed = consumed_by_user(cfg)
    rec = df[df[C.SURFACE] == "rec"]
    assert not any(i in consumed.get(u, ()) for u, i in zip(rec[C.USER_ID], rec[C.ITEM_ID]))
    # user 567 engaged with a third of the 1,190 items (385): the over-fetch still leaves K of the rest
    assert (rec[C.USER_ID] == "567").sum() == TOP_K and len(consumed["567"]) > 300

    keep = with_score(cfg, output="keep_consumed", surfaces=["rec"], exclude_consumed=False)
    score.run(spark, keep, ds, model_dir=trained[2])
    kept = lists_of(candidates.staged_dir(keep, ds))
    assert any(i in consumed.get(u, ()) for u, i in zip(kept[C.USER_ID], kept[C.ITEM_ID]))
    assert candidates.validate_candidates(keep, ds)["success"]  # the not_consumed check is off with exclusion off


def test_rerun_gives_the_same_lists(published, spark, trained):
    cfg, ds, *_, df = published
    again = with_score(cfg, output="rerun", task_cpus=2)  # a local master has no stage-level scheduling
    for _ in range(2):  # the second run replaces the first's staged day
        figures = score.run(spark, again, ds, model_dir=trained[2])
    assert set(figures["task_cpus"]) == {"1"}
    staged = candidates.staged_dir(again, ds)
    assert [p.name for p in staged.parent.iterdir()] == [staged.name]  # no leftovers of the first run
    pd.testing.assert_frame_equal(lists_of(staged), df)
    # a published day is replaced by its rerun as a whole
    candidates.validate_candidates(again, ds)
    candidates.publish(again, ds)
    score.run(spark, with_score(again, surfaces=["search"]), ds, model_dir=trained[2])
    candidates.validate_candidates(again, ds)
    candidates.publish(again, ds)
    layer = Path(again.lake.root) / again.score.output
    assert sorted(p.name for p in layer.iterdir()) == [lake.STAGING, f"ds={ds}"]
    assert sorted(lists_of(candidates.published_dir(again, ds))[C.SURFACE].unique()) == ["search"]


def test_dense_and_generative_retrieval(published, spark, trained):
    cfg, ds, out, _, _, dense = published
    gen_cfg = with_score(cfg, output="generative", retriever="generative")
    gen_out = score.run(spark, gen_cfg, ds, model_dir=trained[2])
    assert gen_out["index"] == {"kind": "generative"}
    assert candidates.validate_candidates(gen_cfg, ds)["success"]
    gen = lists_of(candidates.staged_dir(gen_cfg, ds))
    key = [C.SURFACE, C.USER_ID, C.QUERY]
    assert gen.groupby(key, dropna=False).ngroups == dense.groupby(key, dropna=False).ngroups
    # retrieval scores: semantic-ID log-probabilities vs cosine / temperature
    assert (gen[C.RETRIEVAL_SCORE] <= 0).all()
    temperature = float(torch.load(trained[2] / "model.pt", weights_only=False)["state_dict"]["log_temp"].exp())
    assert (dense[C.RETRIEVAL_SCORE].abs() <= 1 / temperature + 1e-3).all()
    # two retrievers, one ranking head: other lists
    assert len(dense.merge(gen, on=[*key, C.ITEM_ID], how="inner")) < len(dense)


def test_bfloat16_scoring_keeps_the_lists(published, spark, trained):
    cfg, ds, *_, dense = published
    bf_cfg = with_score(cfg, output="bf16", precision="bfloat16")
    score.run(spark, bf_cfg, ds, model_dir=trained[2])
    assert candidates.validate_candidates(bf_cfg, ds)["success"]
    bf = lists_of(candidates.staged_dir(bf_cfg, ds))
    same = dense.merge(bf, on=[C.SURFACE, C.USER_ID, C.QUERY, C.ITEM_ID], how="inner")
    assert len(same) >= 0.9 * len(dense)  # near-ties may swap at the list's cut, little else
    r = np.corrcoef(same[f"{C.RANKING_SCORE}_x"], same[f"{C.RANKING_SCORE}_y"])[0, 1]
    assert r > 0.99


def test_search_requests_from_a_file_and_the_registry(published, spark, trained, tmp_path, monkeypatch):
    cfg, ds, *_ = published
    requests = tmp_path / "requests.parquet"
    pq.write_table(pa.table({C.USER_ID: ["184", "184", "567", "nobody"],
                             C.QUERY: ["Funny", "  a query never typed ", "funny", "sci-fi"]}), requests)
    calls = []

    def download_model(cfg_, ref):
        calls.append(ref)
        return trained[2], "synergen", "3"

    monkeypatch.setitem(sys.modules, "synergen_core.registry",
                        types.SimpleNamespace(download_model=download_model))
    req_cfg = with_score(cfg, output="requests", requests_path=requests, lookback_days=30,
                         model="models:/synergen@champion")
    out = score.run(spark, req_cfg, ds)
    assert calls == ["models:/synergen@champion"]
    assert out["surfaces"]["rec"]["lists"] == 1  # only user 184 had an event in the 30 days up to ds
    assert out["queries_added"] >= 1  # "a query never typed" embedded with the text encoder
    df = lists_of(candidates.staged_dir(req_cfg, ds))
    search = df[df[C.SURFACE] == "search"]
    assert set(search.groupby([C.USER_ID, C.QUERY]).groups) == {
        ("184", "funny"), ("184", "a query never typed"), ("567", "funny"), ("nobody", "sci-fi")}
    assert set(df[C.MODEL_VERSION]) == {"3"}
    assert candidates.validate_candidates(req_cfg, ds)["success"]


# ---------------------------------------------------------------------------------------------
# validation: each way a list can be broken fails its own check


def test_broken_lists_fail_each_check(published, spark):
    cfg, ds, *_, df = published
    consumed = consumed_by_user(cfg)
    lists = [g for _, g in df.groupby([C.SURFACE, C.USER_ID, C.QUERY], dropna=False, sort=True)]
    rec = [g for g in lists if g[C.SURFACE].iloc[0] == "rec"]
    broken, expected = df.copy(), {}

    def rows(g, rank):
        return g.index[g[C.RANK] == rank]

    a, b, c, d, e, f, g_ = rec[0], rec[1], rec[2], rec[3], rec[4], rec[5], rec[6]
    broken = broken.drop(rows(a, TOP_K))  # one row short
    expected["list_length"] = a
    broken.loc[rows(b, 2), C.ITEM_ID] = b.loc[rows(b, 1), C.ITEM_ID].iloc[0]  # an item twice
    expected["unique_items"] = b
    broken.loc[rows(c, TOP_K), C.RANK] = TOP_K + 1  # a gap in the ranks
    expected["ranks"] = c
    s1, s2 = d.loc[rows(d, 1), C.RANKING_SCORE].iloc[0], d.loc[rows(d, 2), C.RANKING_SCORE].iloc[0]
    broken.loc[rows(d, 1), C.RANKING_SCORE], broken.loc[rows(d, 2), C.RANKING_SCORE] = s2 - 1, s1  # out of order
    expected["score_order"] = d
    broken.loc[rows(e, 3), C.ITEM_ID] = "no-such-item"
    expected["in_catalog"] = e
    user = f[C.USER_ID].iloc[0]
    eaten = sorted(consumed[user] - set(f[C.ITEM_ID]))[0]
    broken.loc[rows(f, 4), C.ITEM_ID] = eaten  # an item the user engaged with
    expected["not_consumed"] = f
    broken.loc[g_.index, C.QUERY] = "a query on a rec list"
    expected["query_matches_surface"] = g_

    bad_cfg = with_score(cfg, output="broken")
    part = candidates.staged_dir(bad_cfg, ds)
    for surface, rows_ in broken.groupby(C.SURFACE):
        (part / f"surface={surface}").mkdir(parents=True)
        table = pa.Table.from_pandas(rows_.drop(columns=C.SURFACE), schema=candidate_schema.CANDIDATES, preserve_index=False)
        pq.write_table(table, part / f"surface={surface}" / "part-0.parquet")
    shutil.copy(candidates.published_dir(cfg, ds) / candidates.SCORE_FILE, part / candidates.SCORE_FILE)

    with pytest.raises(candidates.CandidatesInvalid) as err:
        candidates.validate_candidates(bad_cfg, ds)
    report = err.value.report
    assert str(part) in str(err.value) and all(check in str(err.value) for check in expected)
    failed = {f_["check"]: f_ for f_ in report["failed"]}
    assert set(failed) == set(expected)
    for check, g in expected.items():
        users = {r[C.USER_ID] for r in failed[check]["examples"]}
        assert users == {g[C.USER_ID].iloc[0]}, (check, users)
    assert json.loads((part / candidates.VALIDATION_FILE).read_text())["success"] is False
    with pytest.raises(candidates.CandidatesInvalid, match="validation failed"):
        candidates.publish(bad_cfg, ds)


# ---------------------------------------------------------------------------------------------
# the candidate index


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, d))
    x = centers[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_search_requests_use_the_search_tower_and_its_temperature():
    """A model with task towers: the scorer searches the index with each request's own tower and turns
    the inner products into that task's retrieval logits (the model's ``request_logits``)."""
    from synergen_core.data import Requests
    from synergen_core.model import RECOMMEND, SEARCH
    from tiny_synergen import tiny_batch, tiny_model

    model = tiny_model(task_towers=True).eval()
    with torch.no_grad():
        model.log_temp_search.fill_(np.log(0.2))
        batch = {k: v[[0, 2]] for k, v in tiny_batch(with_candidates=False).items()}  # a search, a left-padded rec
        logits = model.request_logits(batch, model(batch))
        vectors = model.item_vectors()[1:].numpy()
    index = cindex.CandidateIndex(cindex.exact_index(vectors), np.arange(1, len(vectors) + 1), cindex.EXACT)
    req = Requests({k: v.numpy() for k, v in batch.items()}, np.zeros(2, np.int64), np.array([SEARCH, RECOMMEND]),
                   np.zeros(2, np.int64), np.zeros(2), np.array([6, 4]))
    settings = serving.Settings(top_k=5, retrieve_n=8, retriever="dense", batch_size=2, request_ts=0.0,
                                n_queries=model.embed.query_text.shape[0], threads=1, progress=False)
    scorer = serving.Scorer(model, index, settings)
    with torch.no_grad():
        _, items, retr, _, valid = scorer._score_chunk(req, np.arange(2), pa.array([[], []], pa.list_(pa.int64())))
    assert valid.all()
    expected = np.take_along_axis(logits.numpy(), items, 1)
    np.testing.assert_allclose(retr, expected, rtol=1e-4, atol=1e-4)
    for row in range(2):  # re-ranked, but retrieved from each request's own top N
        assert set(items[row]) <= set(logits[row].topk(8).indices.tolist())


@pytest.mark.parametrize("overrides", [{}, {"use_text_emb": False, "ranking": "on_retrieval", "task_towers": True}])
def test_workers_score_from_mapped_content_tables_as_the_trained_model_does(tmp_path, overrides):
    from synergen_core import checkpoint
    from synergen_core.data import Requests
    from synergen_core.model import RECOMMEND, SEARCH
    from tiny_synergen import tiny_batch, tiny_model

    model = tiny_model(**overrides).eval()
    record = checkpoint.model_record(model, {"n_items": model.n_items, "n_queries": 10, "n_actions": 5,
                                             "n_surfaces": 4, "codebook_size": 8})
    lean = checkpoint.serving_record(record, semantic_ids=False)
    gone = ("embed.item_text", "embed.query_text", "embed.id_emb.weight", "embed.codes_rec", "embed.query_id_emb.weight")
    assert not set(gone) & set(lean["state_dict"]) and not any(k.startswith("semantic.") for k in lean["state_dict"])
    assert lean["state_dict"]["embed.item_table"].shape == (model.n_items, 32)
    vectors = model.item_vectors()[1:].detach().numpy()
    index = cindex.CandidateIndex(cindex.exact_index(vectors), np.arange(1, len(vectors) + 1), cindex.EXACT)
    settings = serving.Settings(top_k=5, retrieve_n=8, retriever="dense", batch_size=3, request_ts=0.0,
                                n_queries=10, threads=1, progress=False)
    payload = serving.write_payload(lean, index, settings, tmp_path / "payload", "test")
    assert "embed.item_table" not in checkpoint.from_bytes(payload["record"], "test")["state_dict"]
    worker = serving.build_scorer(payload)
    # the worker's table is the file, mapped, not a copy
    assert _mapped_from(worker.model.embed.item_table, tmp_path / "payload" / serving.TABLES_FILE)
    batch = tiny_batch(with_candidates=False)
    req = Requests({k: v.numpy() for k, v in batch.items()}, np.zeros(3, np.int64),
                   np.array([SEARCH, RECOMMEND, RECOMMEND]), np.zeros(3, np.int64), np.zeros(3), np.array([6, 4, 4]))
    none = pa.array([[], [], []], pa.list_(pa.int64()))
    with torch.no_grad():
        want = serving.Scorer(model, index, settings)._score_chunk(req, np.arange(3), none)
        got = worker._score_chunk(req, np.arange(3), none)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # generative retrieval's semantic IDs are mapped from the file too: the broadcast does not grow with the catalog
    semantic = checkpoint.serving_record(record, semantic_ids=True)
    gen = serving.write_payload(semantic, None, settings, tmp_path / "generative", "test")
    assert not any(k.startswith("embed.codes_") for k in checkpoint.from_bytes(gen["record"], "test")["state_dict"])
    assert torch.equal(serving.build_scorer(gen).model.embed.codes("rec"), model.embed.codes("rec"))
    # the exact scores an IVF-PQ search is re-ranked by stay float32 under bfloat16 autocast
    bf16 = serving.Scorer(model, index, dataclasses.replace(settings, precision="bfloat16"))
    cand = got[1]
    queries = worker.request_vectors(req, np.arange(3))
    with bf16.autocast():
        exact = bf16.exact_scores(queries, cand)
    assert exact.dtype == np.float32
    np.testing.assert_allclose(exact, np.einsum("rd,rwd->rw", queries, vectors[cand - 1]), atol=1e-5)


def _mapped_from(t: torch.Tensor, path: Path) -> bool:
    """The tensor's memory lies in a mapping of ``path`` (Linux: /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return True
    return False


def test_index_exact_ivf_and_fallback(tmp_path):
    items, queries = clustered(4000, 16, 0), clustered(200, 16, 1)
    ids = np.arange(1, 4001)
    exact = cindex.build(items, ids, None, 20, exact_max_items=4000, min_recall=0.95)
    assert exact.kind == cindex.EXACT and "exact_max_items" in exact.report["why"]
    ivf = cindex.build(items, ids, queries, 20, exact_max_items=1000, min_recall=0.9, seed=3)
    assert ivf.kind == cindex.IVF and ivf.report["ann_recall"] >= 0.9 and ivf.report["nprobe"] >= 1
    truth = exact.search(queries, 20)[1]
    assert cindex.recall_at_k(ivf.search(queries, 20)[1], truth) == pytest.approx(ivf.report["ann_recall"])
    # the build is deterministic, and the files workers map give the same searches
    again = cindex.CandidateIndex.read(cindex.build(items, ids, queries, 20, 1000, 0.9, seed=3).write(tmp_path / "ivf"))
    np.testing.assert_array_equal(again.search(queries, 20)[1], ivf.search(queries, 20)[1])
    assert again.report == ivf.report and set(np.unique(again.search(queries, 5)[1])) <= set(ids)
    # a request deeper than its probed lists hold is searched in all of them: never a short list
    deep = again.search(queries, 3000)[1]
    assert (deep > 0).all() and deep.shape == (200, 3000)
    # unreachable recall: exact search is kept, and the report says so
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(4000, 16)).astype(np.float32)
    fallback = cindex.build(noise, ids, rng.normal(size=(50, 16)), 20, 1000, min_recall=0.999)
    assert fallback.kind == cindex.EXACT and "fell back to exact" in fallback.report["why"]
    assert fallback.report["ann_recall"] < 0.999


def test_ivf_pq_reranks_exactly_and_is_mapped_from_a_fraction_of_the_bytes(tmp_path):
    items, queries = clustered(4000, 16, 0), clustered(200, 16, 1)
    ids = np.arange(1, 4001)
    exact_scores = cindex.exact_scores(items, ids)
    truth = cindex.build(items, ids, None, 20, exact_max_items=4000, min_recall=0.95).search(queries, 20)
    pq = cindex.build(items, ids, queries, 20, exact_max_items=1000, min_recall=0.9, seed=3, pq_min_items=2000)
    assert pq.kind == cindex.IVFPQ and pq.report["ann_recall"] >= 0.9 and pq.report["pq_refine"] == 2
    with pytest.raises(ValueError, match="exact scores"):
        pq.search(queries, 20)
    scores, found = pq.search(queries, 20, exact_scores)
    assert cindex.recall_at_k(found, truth[1]) == pytest.approx(pq.report["ann_recall"])
    # the scores are the exact inner products, best first, not PQ's approximations
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, items[found - 1]), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    mapped = cindex.CandidateIndex.read(pq.write(tmp_path / "pq"))
    np.testing.assert_array_equal(mapped.search(queries, 20, exact_scores)[1], found)
    ivf = cindex.build(items, ids, queries, 20, exact_max_items=1000, min_recall=0.9, seed=3).write(tmp_path / "ivf")
    size = lambda d: (d / cindex.INDEX_FILE).stat().st_size  # noqa: E731
    assert size(tmp_path / "pq") < 0.6 * size(ivf)  # 8 bytes an item against 64 (plus lists' ids and centroids)


# ---------------------------------------------------------------------------------------------
# slow: the same job on local[*] and on a standalone cluster


def run_scoring(config: Path, master: str, ds: str, model_dir: Path) -> None:
    code = ("import sys; from synergen_core.config import load_config; from jobs import stages; "
            "stages.score(load_config(sys.argv[1]), sys.argv[2], model_dir=sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", code, str(config), ds, str(model_dir)], cwd=ROOT,
                          env={**os.environ, "SYNERGEN__SPARK__MASTER": master}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.cluster  # make test-cluster: the whole DAG on the same loopback cluster covers it in CI's stead
def test_same_lists_on_local_and_standalone_cluster(published, trained, tmp_path):
    """The stage's process, unchanged, on a master + worker on 127.0.0.1 gives the lists the local run
    published (``published``: the same settings on the test session's local Spark)."""
    from cluster import standalone_cluster

    cfg, ds, *_, local = published
    settings = cfg.to_dict()
    settings["spark"] = {**settings["spark"], "driver_memory": "1g"}
    # scoring tasks take both of the worker's cores (stage-level scheduling): one Python worker at a time
    settings["score"] = {**settings["score"], "output": "cluster", "task_cpus": 2}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(settings))
    with standalone_cluster(tmp_path / "spark", cores=2) as c:
        run_scoring(tmp_path / "cluster.yaml", c.master_url, ds, trained[2])
        apps = c.status().get("completedapps", []) + c.status().get("activeapps", [])
        assert apps, "the job did not run on the cluster"
    remote = lists_of(candidates.staged_dir(with_score(cfg, output="cluster"), ds))
    pd.testing.assert_frame_equal(local, remote)
    ran = json.loads((candidates.staged_dir(with_score(cfg, output="cluster"), ds) / candidates.SCORE_FILE).read_text())
    assert set(ran["task_cpus"]) == {"2"}
    assert len(local) > 0
