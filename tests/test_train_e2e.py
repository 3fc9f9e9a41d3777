"""End to end on real data: a MovieLens slice through ingest -> validate -> sessionize -> train -> evaluate.

The slice, its lake and the trained models are conftest's (``movielens_lake``, ``movielens_models``),
shared with tests/test_score.py so that the session trains them once.
"""
import json
from pathlib import Path

import pytest

from jobs import cli
from synergen_core import checkpoint


def test_train_and_evaluate_on_a_movielens_slice(movielens_models):
    from jobs import evaluate, train

    cfg, ds, trained = movielens_models
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
        assert not res["sampled"] and res["with_context"] == sum(res["test_targets"].values())
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
    # beyond evaluate.max_test_targets, a sample of that many (stratified: synergen_core.data.sample_test)
    small = cfg.model_copy(deep=True)
    small.evaluate.max_test_targets = result["loo"]["with_context"] // 2
    sampled = evaluate.evaluation_set(small, ds, "loo")
    assert len(sampled.test) == len(sampled.candidates) == small.evaluate.max_test_targets
    assert (sampled.with_context, sampled.no_context) == (result["loo"]["with_context"], result["loo"]["no_context"])
    flat = evaluate.headline(result)
    assert "loo.synergen.search.recall@10" in flat and "temporal.bm25.search.ndcg@10" in flat

    # a rerun resumes the finished models instead of training them again
    again = train.run(cfg, ds, variants=["sasrec"], protocols=["loo"])
    assert again["loo"]["models"]["sasrec"]["resumed"]


def test_train_stage_runs_data_parallel_under_torchrun(movielens_lake, tmp_path):
    """train.processes = 2: the stage starts itself under torchrun (2 gloo processes, one model)."""
    from jobs import stages

    cfg, ds = movielens_lake
    cfg = cfg.model_copy(deep=True)
    cfg.train = cfg.train.model_copy(update={"processes": 2, "output": "models-ddp", "epochs": 1,
                                             "variants": ["synergen"], "protocols": ["temporal"]})
    cfg.mlflow = cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                               "artifact_root": tmp_path / "mlartifacts"})
    assert stages.train(cfg, ds) == {"ds": ds, "processes": 2, "nodes": 1}
    out = Path(cfg.lake.root) / "models-ddp" / f"ds={ds}" / "temporal" / "synergen"
    summary = json.loads((out / checkpoint.SUMMARY).read_text())
    assert summary["epochs_run"] == 1 and (out / checkpoint.MODEL).is_file()


def test_cli_train_and_evaluate_dispatch(monkeypatch, capsys):
    from jobs import stages

    calls = []
    monkeypatch.setattr(stages, "run_stage", lambda name, cfg, ds, group=None, **kw: calls.append(
        (name, ds, kw) + ((cfg.train.resume,) if name == "train" else ())) or {})
    assert cli.main(["train", "--ds", "2018-09-16", "--variant", "sasrec", "--protocol", "loo", "--fresh"]) == 0
    assert cli.main(["evaluate", "--ds", "2018-09-16"]) == 0
    assert calls == [
        ("train", "2018-09-16", {"variants": ["sasrec"], "protocols": ["loo"]}, False),
        ("evaluate", "2018-09-16", {"variants": None, "protocols": None}),
    ]
