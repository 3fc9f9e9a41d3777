"""An empty or missing upstream is a clear failure, never an untrained champion.

On an empty lake sessionize publishes empty partitions; training then ran 0 steps and wrote a model,
evaluation failed obscurely and promotion made the untrained model champion (the first version had no
floor). Here: the same empty partitions (the contract's schemas, zero rows), a missing day, and a tiny
real model registered in a real MLflow registry on SQLite, judged by the first-version gate against the
popularity figure of the day's ``evaluation.json``.
"""
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest

from jobs import cli
from jobs import evaluate as evaluate_job
from jobs import promote as promote_job
from jobs import stages
from jobs import train as train_job
from schemas import sequences as S
from synergen_core import checkpoint, lake, registry
from synergen_core import train as train_mod
from synergen_core.config import Config
from synergen_core.errors import PipelineError
from synthetic_training import synthetic_config, synthetic_features, synthetic_split

DS = "2026-03-02"
METRIC = "rec.rank_auc"
TABLES = ("item_vocab", "query_vocab", "split_temporal_train", "split_temporal_eval")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def lake_config(root: Path) -> Config:
    cfg = Config()
    cfg.lake.root = root / "lake"
    cfg.train = cfg.train.model_copy(update={"protocols": ["temporal"], "variants": ["synergen"], "progress": False})
    cfg.evaluate = cfg.evaluate.model_copy(update={"baselines": ["popularity"]})
    cfg.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    cfg.mlflow.artifact_root = root / "mlartifacts"
    cfg.registry = cfg.registry.model_copy(update={"metric": METRIC, "protocol": "temporal",
                                                   "cache_dir": root / "cache"})
    return cfg


def publish_empty(cfg: Config, ds: str = DS) -> None:
    """What sessionize publishes for a day without events: every table, its schema, zero rows."""
    for table in TABLES:
        lake.write_partition(S.TABLES[table].empty_table(),
                             lake.partition(cfg.lake.root, f"{cfg.sessionize.output}/{table}", ds))


def put_model(cfg: Config, ds: str = DS) -> Path:
    """A tiny real model (two epochs on synthetic_training's split) as the day's synergen model.pt."""
    d = cfg.layout.model_dir(ds, "temporal", "synergen")
    train_mod.train(synthetic_config(), synthetic_split(), synthetic_features(), d)
    return d


def test_training_on_a_missing_or_empty_split_fails_naming_it(tmp_path):
    cfg = lake_config(tmp_path)
    with pytest.raises(PipelineError, match=rf"item_vocab/ds={DS}: no published partition .*synergen sessionize --ds {DS}"):
        train_job.run(cfg, DS)
    publish_empty(cfg)
    for run in (train_job.run, train_job.prepare):  # the train task and build_training_data
        with pytest.raises(PipelineError, match=rf"split_temporal_train/ds={DS}: the temporal training split of "
                                                rf"ds={DS} has no training windows"):
            run(cfg, DS)
    assert not list(Path(cfg.lake.root).glob(f"**/{checkpoint.MODEL}"))  # no untrained model left behind
    data = synthetic_split()  # the loop itself refuses 0 steps too
    data.windows = data.windows.select(np.arange(0))
    with pytest.raises(PipelineError, match="has no windows"):
        train_mod.train(synthetic_config(), data, synthetic_features(), tmp_path / "none")
    assert not (tmp_path / "none" / checkpoint.MODEL).exists()


def test_a_split_the_daily_job_does_not_write_names_the_setting_that_adds_it(tmp_path):
    cfg = lake_config(tmp_path)
    publish_empty(cfg)
    cfg.train.protocols = ["loo"]  # sessionize.splits is [temporal] by default: loo is written on request
    with pytest.raises(PipelineError, match=rf"split_loo_train/ds={DS}: no published partition .*add loo to "
                                            rf"sessionize.splits, then `synergen sessionize --ds {DS}`"):
        train_job.run(cfg, DS)
    cfg.sessionize.splits = ["loo", "temporal"]
    with pytest.raises(PipelineError, match=rf"split_loo_train/ds={DS}: no published partition .*\(`synergen "
                                            rf"sessionize --ds {DS}` writes it\)"):
        train_job.run(cfg, DS)


def test_evaluation_of_a_missing_or_empty_day_fails_naming_the_input(tmp_path):
    cfg = lake_config(tmp_path)
    with pytest.raises(PipelineError, match=rf"no published partition of item_vocab for ds={DS}"):
        evaluate_job.run(cfg, DS)
    publish_empty(cfg)
    with pytest.raises(PipelineError, match=rf"ds={DS}/temporal: no trained model .*synergen train --ds {DS}"):
        evaluate_job.run(cfg, DS)
    put_model(cfg)
    with pytest.raises(PipelineError, match=rf"split_temporal_eval/ds={DS}: the temporal split of ds={DS} has no "
                                            "test targets"):
        evaluate_job.run(cfg, DS)
    assert not (Path(cfg.lake.root) / cfg.train.output / f"ds={DS}" / evaluate_job.RESULT).exists()


def _evaluation(cfg: Config, model: float, popularity: float | None) -> None:
    """The day's evaluation.json as `synergen evaluate` writes it, with the figures of the gate metric."""
    scorers = {"synergen": {"catalog": {}, "ranking": {"rec": {"auc": model}}}}
    if popularity is not None:
        scorers["popularity"] = {"catalog": {}, "ranking": {"rec": {"auc": popularity}}}
    checkpoint.save_json({"ds": DS, "temporal": {"scorers": scorers}},
                         Path(cfg.lake.root) / cfg.train.output / f"ds={DS}" / evaluate_job.RESULT)


def test_first_version_must_beat_the_popularity_baseline(tmp_path):
    cfg = lake_config(tmp_path)
    publish_empty(cfg)
    put_model(cfg)
    c = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    _evaluation(cfg, 0.55, popularity=None)  # no baseline figure to beat: not promoted
    version = stages.register(cfg, DS)["version"]
    out = stages.promote(cfg, DS, version=version, validations_passed=True)
    assert out["decision"] == "challenger" and "no popularity baseline" in out["why"] and "evaluation.json" in out["why"]
    _evaluation(cfg, 0.55, popularity=0.61)  # worse than popularity: not promoted
    out = stages.promote(cfg, DS, version=version, validations_passed=True)
    assert out["decision"] == "challenger" and out["champion_before"] is None
    assert "does not beat the popularity baseline's 0.61" in out["why"] and out["new_value"] == 0.55
    assert str(c.get_model_version_by_alias("synergen", "challenger").version) == version
    with pytest.raises(Exception):
        c.get_model_version_by_alias("synergen", "champion")
    _evaluation(cfg, 0.7, popularity=0.61)  # better: the first champion
    out = stages.promote(cfg, DS, version=version, validations_passed=True)
    assert out["decision"] == "champion" and "beats the popularity baseline" in out["why"]
    assert str(c.get_model_version_by_alias("synergen", "champion").version) == version

    # a bad version to roll back to, promote or download: one line naming it and the versions there are
    for bad in ("999", "abc"):
        with pytest.raises(PipelineError, match=rf"^cannot roll back to synergen version '{bad}': no such version "
                                                rf"\(registered versions: {version}\)$"):
            registry.rollback(cfg, bad)
        with pytest.raises(PipelineError, match=rf"cannot roll back to synergen version '{bad}'"):
            cli.registry_report(cfg, bad)
    with pytest.raises(PipelineError, match="cannot promote synergen version '7': no such version"):
        stages.promote(cfg, DS, version=7)
    with pytest.raises(PipelineError, match="cannot download synergen version '7'"):
        registry.download_model(cfg, "models:/synergen/7")


def test_rollback_before_anything_is_registered_says_so(tmp_path):
    cfg = lake_config(tmp_path)
    with pytest.raises(PipelineError, match="no version of synergen is registered yet"):
        registry.rollback(cfg, "1")


def test_validations_fail_when_nothing_was_validated_for_the_day(tmp_path):
    cfg = lake_config(tmp_path)
    ok, problems = promote_job.validations_status(cfg, DS)  # no raw, no validated partition at all
    assert not ok and problems[0].startswith(f"nothing validated for ds={DS}") and "synergen validate" in problems[0]
    for table in promote_job.EVENT_TABLES:  # validated, but empty
        lake.write_partition(pa.table({"user_id": pa.array([], pa.string())}),
                             lake.partition(cfg.lake.root, f"{cfg.sessionize.source}/{table}", DS))
    ok, problems = promote_job.validations_status(cfg, DS)
    assert not ok and "nothing validated" in problems[0]
    lake.write_partition(pa.table({"user_id": ["u1"]}),
                         lake.partition(cfg.lake.root, f"{cfg.sessionize.source}/browse_events", DS))
    assert promote_job.validations_status(cfg, DS) == (True, [])


def test_scoring_a_day_without_sessionized_partitions_names_the_missing_one(tmp_path):
    from jobs import score

    cfg = lake_config(tmp_path)
    model = put_model(cfg)
    with pytest.raises(PipelineError, match=rf"sequences/ds={DS}: no published partition .*synergen sessionize --ds {DS}"):
        score.run(None, cfg, DS, model_dir=model)  # fails before Spark is needed
    with pytest.raises(PipelineError, match=r"has no version with alias 'champion' .*synergen promote"):
        score.resolve_model(cfg)  # score.model is the champion, and none was promoted
