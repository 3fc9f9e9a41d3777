"""The model registry and its promotion gate on real MLflow (SQLite in tmp_path) and real trained models.

Data: three days of generated logs (jobs.generate: skewed popularity, sessions, queries from item text),
sessionized up to the second-to-last day d1 and then incrementally for the last day d2 (d2 brings new
queries, so the d1 model has a smaller query table). Models: v1 = one optimizer step on d1 (barely
trained), v2 = 5 epochs on d2, v3 = v2 with its retrieval and ranking outputs negated (a model that is
worse by construction; its evaluation is real). The gate's metric here (``registry.metric``) is the
recommendation MRR over the full catalog: the first version must beat the popularity baseline on it, and
there learning shows far above the noise (figures of one run: popularity 0.047 on d1 and 0.046 on d2,
v1 0.010, v2 0.069, v3 0.004). The ranking AUC on lists with uniformly drawn negatives separates the
models as well but not from popularity, which ranks popular targets above uniform negatives (0.83).

Not the MovieLens slice of the other end-to-end tests: two thirds of its last day's engagements go to
movies nobody engaged with before, so every trained model ranks them below seen items (AUC < 0.5), and
which of v2 and its reversal wins depended on the machine's floating-point rounding.
"""
import datetime as dt
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from jobs import cli
from jobs import promote as promote_job
from jobs import stages
from jobs.evaluate import flat_metrics
from synergen_core import checkpoint, registry, serving
from synergen_core.data import TASK_NAMES, load_test
from synergen_core.evaluate import ModelScorer, OlderVocabScorer, model_vocab
from synergen_core.list_order import served_orders
from synergen_core.metrics import rank_stats
from conftest import small_config

METRIC = "rec.mrr"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _variant(cfg, **train):
    out = cfg.model_copy(deep=True)
    out.train = out.train.model_copy(update=train)
    return out


def negated(src: Path, dst: Path) -> None:
    """A copy of a trained model whose retrieval and ranking scores are negated (rankings reversed)."""
    record = checkpoint.load(src / checkpoint.MODEL)
    for k in ("retrieval.query_proj.weight", "retrieval.query_proj.bias", "ranking.out.weight", "ranking.out.bias"):
        record["state_dict"][k] = -record["state_dict"][k]
    checkpoint.save(record, dst / checkpoint.MODEL)
    shutil.copy(src.parent / "features.pt", dst.parent / "features.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    """(cfg, d1, d2, cfg of the worse model): lake sessionized for d1 then d2, three models evaluated."""
    from jobs import evaluate, generate, sessionize, train, validate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    cfg = small_config(root)
    cfg.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    cfg.mlflow.artifact_root = root / "mlartifacts"
    cfg.train = cfg.train.model_copy(update={"protocols": ["temporal"], "variants": ["synergen"], "epochs": 5})
    cfg.sessionize = cfg.sessionize.model_copy(update={"splits": ["temporal"]})
    cfg.evaluate = cfg.evaluate.model_copy(update={"baselines": ["popularity"], "rank_negatives_by": "uniform"})
    cfg.registry = cfg.registry.model_copy(update={"metric": METRIC, "cache_dir": root / "cache"})
    cfg.generate = cfg.generate.model_copy(update={"start_ds": "2026-03-01", "days": 3, "events": 9000,
                                                   "users": 300, "items": 400, "categories": 12})
    days = sorted(generate.run(cfg, cfg.generate.start_ds)["tables"]["catalog"])
    d1, d2 = days[-2], days[-1]
    validate.run_range(cfg, days[0], d2)
    sessionize.stage(cfg, d1, from_ds=days[0])
    sessionize.stage(cfg, d2)

    weak = _variant(cfg, max_steps=1)
    train.run(weak, d1)
    evaluate.run(weak, d1)
    train.run(cfg, d2)
    evaluate.run(cfg, d2)
    worse = _variant(cfg, output="models_worse")
    negated(cfg.layout.model_dir(d2, "temporal", "synergen"),
            worse.layout.model_dir(d2, "temporal", "synergen"))
    evaluate.run(worse, d2)
    return cfg, d1, d2, worse


@pytest.fixture(scope="module")
def gate(trained):
    """The registry story, in order: what each step returned."""
    cfg, d1, d2, worse = trained
    out = {"r1": stages.register(cfg, d1, group="run-d1")}
    out["p1"] = stages.promote(cfg, d1, group="run-d1")
    out["r2"] = stages.register(cfg, d2, group="run-d2")
    out["r2_again"] = stages.register(cfg, d2, group="run-d2")
    out["p2"] = stages.promote(cfg, d2, version=out["r2"]["version"], group="run-d2")
    out["r3"] = stages.register(worse, d2)
    out["p3"] = stages.promote(cfg, d2, version=out["r3"]["version"])
    return out


def test_training_requests_carry_the_logged_impressions(trained):
    """The generator logs impressions; through sessionize they reach training as ranking negatives."""
    from synergen_core.data import load_split

    cfg, _, d2, _ = trained
    win = load_split(cfg.layout, d2, "temporal", cfg.model.max_seq_len, cfg.train.max_windows,
                     cfg.train.rank_impression_negatives).windows
    assert win.shown.shape[1] == cfg.train.rank_impression_negatives
    requests = win.target[:, -1] > 0
    logged = (win.shown > 0).any(1)
    assert logged[requests].mean() > 0.9  # every generated event logs its impressions
    assert not ((win.shown == win.target[:, -1:]) & (win.shown > 0)).any()  # never the engaged item itself


def test_register_tags_versions_and_is_idempotent(trained, gate):
    cfg, d1, d2, _ = trained
    r1, r2 = gate["r1"], gate["r2"]
    assert (r1["version"], r2["version"], gate["r3"]["version"]) == ("1", "2", "3")
    assert gate["r2_again"]["reused"] and gate["r2_again"]["version"] == "2"  # same model file: same version
    assert r1["protocol"] == "temporal" and r2["semantic_ids_ds"] == "none"  # in-process IDs (no stage 3 table)
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    assert len(c.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")) == 3
    tags = c.get_model_version("synergen", "2").tags
    assert tags["synergen.ds"] == d2 and tags["synergen.semantic_ids_ds"] == "none"
    assert tags["synergen.code_version"] and tags["synergen.group"] == "run-d2"
    assert 0.0 <= float(tags["synergen.metric.rec.ndcg_at_10"]) <= 1.0
    assert float(tags["synergen.metric.rec.rank_auc"]) == pytest.approx(r2["metrics"]["rec.rank_auc"])
    assert "search.recall@10" in r2["metrics"]
    reg_runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list",
                                  filter_string="tags.`synergen.stage` = 'register'")
    assert {r.data.tags["synergen.registry.version"] for r in reg_runs} == {"1", "2", "3"}


def test_gate_refuses_a_first_version_below_popularity_promotes_better_rejects_worse(trained, gate):
    cfg, d1, d2, _ = trained
    p1, p2, p3 = gate["p1"], gate["p2"], gate["p3"]
    # no champion yet: the barely trained v1 does not beat the popularity baseline of d1, v2 beats d2's
    assert p1["decision"] == "challenger" and p1["champion_before"] is None, str(p1)
    assert p1["new_value"] < p1["baseline_value"] and "does not beat the popularity baseline" in p1["why"]
    assert p2["decision"] == "champion" and p2["champion_before"] is None and p2["new_source"] == "evaluation.json", str(p2)
    assert p2["new_value"] > p2["baseline_value"] and "beats the popularity baseline" in p2["why"]
    # v3 is worse: challenger, and the reason names the metric, the values and the champion
    assert p3["decision"] == "challenger" and p3["champion_before"] == "2" and p3["new_source"] == "evaluated"
    assert p3["new_value"] < p3["champion_value"] * (1 - cfg.registry.tolerance)
    assert METRIC in p3["why"] and "below champion version 2" in p3["why"]
    # the champion's re-evaluation is real: v2 on d2 scores what `synergen evaluate` measured for it
    assert p3["champion_value"] == pytest.approx(gate["r2"]["metrics"][METRIC], abs=1e-9)
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    assert str(c.get_model_version_by_alias("synergen", "champion").version) == "2"
    assert str(c.get_model_version_by_alias("synergen", "challenger").version) == "3"
    v3 = c.get_model_version("synergen", "3").tags
    assert v3["synergen.gate.decision"] == "challenger" and "below champion" in v3["synergen.gate.reason"]
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list",
                              filter_string="tags.`synergen.stage` = 'promote'")
    by_version = {r.data.tags["synergen.registry.version"]: r for r in runs}
    assert by_version["3"].data.tags["synergen.registry.decision"] == "challenger"
    assert "below champion" in by_version["3"].data.tags["synergen.registry.reason"]
    assert by_version["2"].data.tags["mlflow.parentRunId"]  # nested under the pipeline run of its group
    text = mlflow.artifacts.load_text(f"{by_version['3'].info.artifact_uri}/promotion.txt")
    assert text.startswith("version 3: challenger")


def test_failed_validation_blocks_promotion(trained, gate):
    cfg, d1, d2, _ = trained
    lenient = cfg.model_copy(deep=True)
    lenient.registry = cfg.registry.model_copy(update={"tolerance": 0.99})  # v3's figure would pass
    blocked = stages.promote(lenient, d2, version="3", validations_passed=False)
    assert blocked["decision"] == "challenger" and blocked["why"].startswith("validations did not pass")
    assert stages.promote(cfg, d2, version="2", validations_passed=False)["decision"] == "champion"  # never demoted
    skipped = stages.promote(lenient, d2, version="3", skip=True)  # the DAG's skip_promotion
    assert skipped["decision"] == "challenger" and "skipped" in skipped["why"]
    ok, problems = promote_job.validations_status(cfg, d2)
    assert ok and not problems
    missing = cfg.model_copy(deep=True)
    missing.sessionize = missing.sessionize.model_copy(update={"source": "nowhere"})
    ok, problems = promote_job.validations_status(missing, d2)
    assert not ok and "no validated partition" in problems[0]
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    assert str(c.get_model_version_by_alias("synergen", "champion").version) == "2"
    assert str(c.get_model_version_by_alias("synergen", "challenger").version) == "3"


def test_download_model_by_alias_and_version(trained, gate):
    cfg, *_ = trained
    path, name, version = registry.download_model(cfg, "models:/synergen@challenger")
    assert (name, version) == ("synergen", "3") and (path / checkpoint.MODEL).is_file()
    path2, _, version2 = registry.download_model(cfg, "models:/synergen/2")
    assert version2 == "2" and (path2 / checkpoint.MODEL).is_file() and path2 != path
    src = cfg.layout.model_dir(gate["r2"]["ds"], "temporal", "synergen") / checkpoint.MODEL
    # the registered file: the trained weights, the content tables in place of the text buffers
    trained_sd, registered = checkpoint.load(src)["state_dict"], checkpoint.load(path2 / checkpoint.MODEL)
    sd = registered["state_dict"]
    assert "embed.item_text" in trained_sd and not {"embed.item_text", "embed.query_text"} & set(sd)
    assert all(torch.equal(sd[k], v) for k, v in trained_sd.items() if not k.endswith("_text"))
    assert (path2 / checkpoint.MODEL).stat().st_size < src.stat().st_size
    ids = torch.arange(registered["dims"]["n_items"])
    with torch.no_grad():
        served, own = checkpoint.load_model(path2), checkpoint.load_model(src)
        np.testing.assert_allclose(served.item_vectors(ids), own.item_vectors(ids), atol=1e-6)
    assert registry.download_model(cfg, "models:/synergen/2")[0] == path2  # cached
    with pytest.raises(registry.RegistryError, match="no version with alias"):
        registry.download_model(cfg, "models:/synergen@nobody")
    with pytest.raises(registry.RegistryError, match="bad model reference"):
        registry.download_model(cfg, "synergen/2")


def test_a_warm_start_begins_from_the_latest_champion_trained_before_its_day(trained, gate):
    """The champion is version 2 (d2; version 1 was refused). The day after d2 starts from it; a rerun of
    d2 itself after its own model was promoted does not (nothing older was champion: a full retrain, as its
    first run was)."""
    from jobs.train import FULL_RETRAIN_TAG, champion_before

    cfg, d1, d2, _ = trained
    after = (dt.date.fromisoformat(d2) + dt.timedelta(days=1)).isoformat()
    champ = champion_before(cfg, after)
    assert (champ.version, champ.ds, champ.full_retrain_ds) == ("synergen/2", d2, d2)  # trained in full on d2
    saved = checkpoint.load(cfg.layout.model_dir(d2, "temporal", "synergen") / checkpoint.MODEL)["state_dict"]
    # every trained weight (the registered file has content tables in place of the text buffers, which a warm
    # start takes from the day it trains anyway)
    weights = {k for k in saved if k not in ("embed.item_text", "embed.query_text")}
    assert weights == champ.state_dict.keys() - set(checkpoint.CONTENT_TABLES)
    assert all(torch.equal(saved[k], champ.state_dict[k]) for k in weights)
    assert champion_before(cfg, d2) is None and champion_before(cfg, d1) is None
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    assert c.get_model_version("synergen", "2").tags[FULL_RETRAIN_TAG] == d2
    summary = json.loads((cfg.layout.model_dir(d2, "temporal", "synergen") / checkpoint.SUMMARY).read_text())
    assert summary["start"]["mode"] == "full" and summary["start"]["reason"] == "no champion to start from"


def test_pyfunc_loads_and_predicts_the_models_top_items(trained, gate):
    cfg, d1, d2, _ = trained
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/synergen/2")
    assert pyfunc.metadata.signature is not None
    example = serving.input_example(cfg, d2, "temporal")
    out = pyfunc.predict(example, params={"k": 5})
    assert list(out.columns) == ["items", "scores"] and len(out) == len(example) == 3
    # the same top items as the evaluation code's scorer on the same requests, in the order recorded for
    # their task (issue 27): retrieval's as it is, the ranking head's a re-ordering of the same items
    record = checkpoint.load(registry.download_model(cfg, "models:/synergen/2")[0] / checkpoint.MODEL)
    model, orders = checkpoint.build_from_record(record), served_orders(record)
    req, _ = load_test(cfg.layout, d2, "temporal", cfg.model.max_seq_len)
    top = ModelScorer(model).catalog(req.select(np.arange(3))).topk(5, dim=1)
    for r in range(3):
        if orders[TASK_NAMES[int(req.task[r])]] == "retrieval":
            assert out["items"][r] == top.indices[r].tolist()
            assert np.allclose(out["scores"][r], top.values[r].numpy(), atol=1e-4)
        else:
            assert sorted(out["items"][r]) == sorted(top.indices[r].tolist())
    # only item_idx is required; the default k is 10
    short = pyfunc.predict(example[["item_idx"]])
    assert all(len(x) == 10 for x in short["items"])


def test_older_vocab_scorer_pads_unknown_inputs_and_misses_unknown_targets(trained, gate):
    cfg, d1, d2, _ = trained
    old = checkpoint.load_model(cfg.layout.model_dir(d1, "temporal", "synergen"))
    n_items, n_queries = model_vocab(old)
    req, _ = load_test(cfg.layout, d2, "temporal", cfg.model.max_seq_len)
    new_queries = req.history["query_idx"] >= n_queries
    assert new_queries.any()  # d2's requests really hold queries v1 never saw
    with pytest.raises(IndexError):
        ModelScorer(old).catalog(req)
    plain = OlderVocabScorer(old, n_items)
    sub = req.select(np.arange(4))
    assert torch.equal(plain.catalog(sub), OlderVocabScorer(old, n_items).catalog(sub))
    # today's catalog has 3 more items: target 0 is new, row 1's last history item is new
    scorer = OlderVocabScorer(old, n_items + 3)
    sub.target = sub.target.copy()
    sub.target[0] = n_items + 2
    sub.history = {k: v.copy() for k, v in sub.history.items()}
    sub.history["item_idx"][1, -1] = n_items + 1
    scores = scorer.catalog(sub)
    assert scores.shape == (4, n_items + 3)
    greater, ties = rank_stats(scores, torch.from_numpy(sub.target))
    assert greater[0] == n_items + 2 and ties[0] == 0  # the unknown target ranks last: a miss
    assert torch.isinf(scores[1:, n_items:]).all()  # unknown items are never retrieved
    padded = sub.select(np.array([1]))
    padded.history["item_idx"][0, -1] = 0
    assert torch.allclose(scores[1, :n_items], plain.catalog(padded)[0], atol=1e-4)
    cand = np.array([[sub.target[0], 1, 2], [sub.target[1], n_items + 1, 3],
                     [sub.target[2], 4, 5], [sub.target[3], 6, 7]])
    lists = scorer.candidates(sub, cand)
    assert lists[0, 0] < lists[0, 1:].min()  # unknown target: last in its list
    assert lists[1, 1] < lists[1, [0, 2]].min()  # unknown negative: below every known item


def test_tolerance_boundary_then_rollback_and_status(trained, gate):
    cfg, d1, d2, _ = trained
    p3 = gate["p3"]
    drop = (p3["champion_value"] - p3["new_value"]) / p3["champion_value"]
    just_under = cfg.model_copy(deep=True)
    just_under.registry = cfg.registry.model_copy(update={"tolerance": drop * (1 - 1e-6)})
    assert stages.promote(just_under, d2, version="3")["decision"] == "challenger"
    at = cfg.model_copy(deep=True)
    at.registry = cfg.registry.model_copy(update={"tolerance": drop})
    promoted = stages.promote(at, d2, version="3")
    assert promoted["decision"] == "champion" and promoted["champion_before"] == "2"

    st = registry.status(cfg)
    assert st["champion"]["version"] == "3" and st["challenger"] is None  # the promoted challenger
    assert [h["version"] for h in st["history"]] == ["2", "3"]  # v1 never passed the first-version gate
    assert st["champion"]["ds"] == d2 and st["champion"]["promoted_at"]
    assert METRIC in st["champion"]["metrics"]

    back = registry.rollback(cfg)
    assert (back["previous"], back["champion"]) == ("3", "2")
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(cfg)
    assert registry.rollback(cfg, 1)["champion"] == "1"  # any registered version, by number
    st = registry.status(cfg)
    assert st["champion"]["version"] == "1" and st["champion"]["promoted_by"].startswith("rollback")
    assert [h["version"] for h in st["history"]] == ["2", "1"]
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    assert c.get_model_version("synergen", "3").tags["synergen.rolled_back_at"]
    # v2 against the champion v1 re-evaluated on d2's targets (v1's query table predates d2's new queries)
    p = stages.promote(cfg, d2, version="2")
    assert p["decision"] == "champion" and p["champion_before"] == "1" and p["new_source"] == "evaluation.json", str(p)
    assert p["new_value"] > p["champion_value"] * (1 - cfg.registry.tolerance)
    text = cli.registry_report(cfg)
    assert "champion: version 2" in text and f"ds {d2}" in text and "rec.rank_auc" in text
    assert "champion: version 2 -> 1" in cli.registry_report(cfg, "previous")
    assert "champion: version 1 -> 2" in cli.registry_report(cfg, "2")


def test_the_gate_reads_the_champion_figures_the_evaluation_measured_in_the_same_pass(trained, gate):
    """The evaluate stage scores the registry's champion beside the new models (issue 30); the gate reads its
    figures instead of evaluating it again: the same value it computed itself before."""
    from jobs import evaluate

    cfg, _, d2, _ = trained
    assert gate["p3"]["champion_source"] == "evaluated"  # d2 was evaluated before v2 was champion
    assert registry.status(cfg)["champion"]["version"] == "2"
    saved = evaluate.run(cfg, d2, champion=True)["temporal"]["champion"]
    assert saved["version"] == "2" and saved["figures"]["catalog"]["rec"]["n"] > 0
    p = stages.promote(cfg, d2, version="3")
    assert p["champion_source"] == "evaluation.json" and p["decision"] == "challenger"
    assert p["champion_value"] == pytest.approx(gate["p3"]["champion_value"], abs=1e-9)


def test_gate_figure_all_is_the_geometric_mean_over_the_evaluated_tasks():
    both = flat_metrics({"catalog": {"rec": {"ndcg@10": 0.04, "n": 10}, "search": {"ndcg@10": 0.36, "n": 5}},
                                  "ranking": {"rec": {"auc": 0.81}}})
    assert both["all.ndcg@10"] == pytest.approx(0.12)  # sqrt(0.04 * 0.36)
    assert both["all.rank_auc"] == pytest.approx(0.81)  # only rec has it: the mean over that one task
    assert "all.n" not in both  # counts are not figures to average
    rec_only = flat_metrics({"catalog": {"rec": {"ndcg@10": 0.05}}})
    assert rec_only["all.ndcg@10"] == pytest.approx(0.05)  # a dataset without search (Beauty)
