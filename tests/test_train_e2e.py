"""End to end on real data: a MovieLens slice through ingest -> validate -> sessionize -> train -> evaluate.

The slice: the users who typed tags (search events, the HyperSaR protocol) and whose ratings and tags
fall on at most two days, so the lake holds few day partitions (19 users, ~2.4k events, ~1.2k movies).
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
import torch

from jobs import cli
from synergen_core import checkpoint, lake
from synergen_core.config import Config
from conftest import spark_test_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-small"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found")


def movielens_slice(out: Path) -> None:
    co = pacsv.ConvertOptions(column_types={"tag": pa.string(), "title": pa.string(), "genres": pa.string()})
    tags, ratings, movies = (pacsv.read_csv(DATA / f, convert_options=co) for f in ("tags.csv", "ratings.csv", "movies.csv"))
    users = np.concatenate([tags["userId"].to_numpy(), ratings["userId"].to_numpy()])
    days = np.concatenate([tags["timestamp"].to_numpy(), ratings["timestamp"].to_numpy()]) // 86_400
    pairs = np.unique(np.stack([users, days], 1), axis=0)
    uniq, n_days = np.unique(pairs[:, 0], return_counts=True)
    keep = pa.array(np.intersect1d(uniq[n_days <= 2], tags["userId"].to_numpy()))
    r = ratings.filter(pc.is_in(ratings["userId"], keep))
    t = tags.filter(pc.is_in(tags["userId"], keep))
    m = movies.filter(pc.is_in(movies["movieId"], pa.array(np.union1d(r["movieId"].to_numpy(), t["movieId"].to_numpy()))))
    out.mkdir(parents=True)
    for name, table in (("ratings.csv", r), ("tags.csv", t), ("movies.csv", m)):
        pacsv.write_csv(table, out / name)


def ingested_slice(cfg: Config, root: Path) -> list[str]:
    """The slice written under ``root/src`` and ingested into ``cfg``'s lake: its days with events."""
    from jobs import ingest

    movielens_slice(root / "src")
    ingest.run(cfg, "movielens", root / "src")
    return sorted(set(lake.partitions(cfg.lake.root, "raw/browse_events"))
                  | set(lake.partitions(cfg.lake.root, "raw/search_events")))


def small_config(root: Path) -> Config:
    cfg = spark_test_config(Config())
    cfg.lake.root = root / "lake"
    cfg.model = cfg.model.model_copy(update={"d_model": 32, "max_seq_len": 20})
    cfg.train = cfg.train.model_copy(update={"epochs": 2, "batch_size": 32, "progress": False, "threads": 1,
                                             "variants": ["synergen", "sasrec"], "protocols": ["loo", "temporal"]})
    cfg.semantic_ids = cfg.semantic_ids.model_copy(update={
        "epochs": 3, "codebook_size": 32, "hidden_dims": [64], "batch_size": 512, "kmeans_iters": 5})
    cfg.evaluate = cfg.evaluate.model_copy(update={"rank_negatives": 19})
    return cfg


@pytest.fixture(scope="module")
def sessionized(tmp_path_factory, spark):
    """The slice ingested, validated and sessionized (on the test session's Spark): (config, ds)."""
    from jobs import sessionize, validate

    root = tmp_path_factory.mktemp("e2e")
    cfg = small_config(root)
    days = ingested_slice(cfg, root)
    validate.run_range(cfg, days[0], days[-1])
    sessionize.stage(cfg, days[-1], from_ds=days[0])
    return cfg, days[-1]


def test_train_and_evaluate_on_a_movielens_slice(sessionized):
    from jobs import evaluate, train

    torch.set_num_threads(2)
    cfg, ds = sessionized
    trained = train.run(cfg, ds)
    for protocol in ("loo", "temporal"):
        res = trained[protocol]
        assert res["n_queries"] > 100 and res["windows"] > 0
        assert "semantic_ids" in res["features"]
        for variant in ("synergen", "sasrec"):
            s = res["models"][variant]
            assert s["epochs_run"] == 2 and s["steps"] > 0 and s["best_valid"] is not None
            assert (Path(s["out_dir"]) / checkpoint.MODEL).is_file()

    result = evaluate.run(cfg, ds)
    saved = json.loads((Path(cfg.lake.root) / "models" / f"ds={ds}" / evaluate.RESULT).read_text())
    assert saved["loo"]["test_targets"] == result["loo"]["test_targets"]
    for protocol in ("loo", "temporal"):
        res = result[protocol]
        assert res["test_targets"]["search"] > 0 and res["test_targets"]["rec"] > 0
        scorers = res["scorers"]
        assert set(scorers) == {"synergen", "sasrec", "popularity", "bm25"}
        for name in ("synergen", "sasrec", "popularity"):
            for task in ("search", "rec"):
                cat = scorers[name]["catalog"][task]
                assert cat["n"] == res["test_targets"][task]
                for k in cfg.evaluate.ks:
                    assert 0.0 <= cat[f"ndcg@{k}"] <= cat[f"recall@{k}"] <= 1.0
                assert 0.0 <= scorers[name]["ranking"][task]["auc"] <= 1.0
        assert set(scorers["bm25"]["catalog"]) == {"search"}  # no user model: search only
        assert "ranking_retrieval" in scorers["synergen"] and "ranking_retrieval" not in scorers["sasrec"]
    # the benchmark's per-target figures (for paired comparisons) average to the evaluation's
    from benchmarks.quality import PAIRED_K, _dense, paired, per_target_ndcg

    per_target = per_target_ndcg(cfg, ds, ["synergen", "sasrec"])
    for name in ("synergen", "sasrec"):
        for task in ("search", "rec"):
            cat = result["loo"]["scorers"][name]["catalog"][task]
            assert per_target[name][task]["n"] == cat["n"]
            assert _dense(per_target[name][task]).mean() == pytest.approx(cat[f"ndcg@{PAIRED_K}"], abs=1e-6)
    run = {"scorers": {n: {f"per_target_ndcg@{PAIRED_K}": v} for n, v in per_target.items()}}
    (cmp,) = paired([run])  # synergen - sasrec on rec: the only pair of PAIRS with both models
    assert (cmp["against"], cmp["targets"]) == ("sasrec", result["loo"]["test_targets"]["rec"])
    flat = evaluate.headline(result)
    assert "loo.synergen.search.recall@10" in flat and "temporal.bm25.search.ndcg@10" in flat

    # a rerun resumes the finished models instead of training them again
    again = train.run(cfg, ds, variants=["sasrec"], protocols=["loo"])
    assert again["loo"]["models"]["sasrec"]["resumed"]


def test_train_stage_runs_data_parallel_under_torchrun(sessionized, tmp_path):
    """train.processes = 2: the stage starts itself under torchrun (2 gloo processes, one model)."""
    from jobs import stages

    cfg, ds = sessionized
    cfg = cfg.model_copy(deep=True)
    cfg.train = cfg.train.model_copy(update={"processes": 2, "output": "models-ddp", "epochs": 1,
                                             "variants": ["synergen"], "protocols": ["temporal"]})
    cfg.mlflow = cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                               "artifact_root": tmp_path / "mlartifacts"})
    assert stages.train(cfg, ds) == {"ds": ds, "processes": 2}
    out = Path(cfg.lake.root) / "models-ddp" / f"ds={ds}" / "temporal" / "synergen"
    summary = json.loads((out / checkpoint.SUMMARY).read_text())
    assert summary["epochs_run"] == 1 and (out / checkpoint.MODEL).is_file()


def test_cli_train_and_evaluate_dispatch(monkeypatch, capsys):
    from jobs import evaluate, train

    calls = []
    monkeypatch.setattr(train, "stage", lambda cfg, ds, group=None, **kw: calls.append(("train", ds, kw, cfg.train.resume)) or {})
    monkeypatch.setattr(evaluate, "stage", lambda cfg, ds, **kw: calls.append(("evaluate", ds, kw)) or {})
    assert cli.main(["train", "--ds", "2018-09-16", "--variant", "sasrec", "--protocol", "loo", "--fresh"]) == 0
    assert cli.main(["evaluate", "--ds", "2018-09-16"]) == 0
    assert calls == [
        ("train", "2018-09-16", {"variants": ["sasrec"], "protocols": ["loo"]}, False),
        ("evaluate", "2018-09-16", {"variants": None, "protocols": None}),
    ]
