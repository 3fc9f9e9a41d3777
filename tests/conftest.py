"""Shared fixtures. One Spark session (local[2]) serves the whole test session: a JVM start costs
5-13 s, so no test starts its own (tests needing another master run the CLI in a subprocess).

Real data comes from ``../shared/data`` (beside the checkout, not in it): ``requires_shared_data`` and
``shared_data`` skip a test when a folder is missing, and fail it under ``CI=true``. One MovieLens slice
(``movielens_slice_dir``), one lake built from it (``movielens_lake``) and one set of small trained models
(``movielens_models``) serve every module that needs them: each costs tens of seconds to a minute.
"""
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

# py4j logs a traceback at interpreter exit (after pytest's summary) when left at DEBUG.
logging.getLogger("py4j").setLevel(logging.WARNING)


def spark_test_config(cfg):
    """``cfg`` with the Spark settings tests use: 2 local cores, few shuffle partitions, no UI."""
    cfg.spark.master = "local[2]"
    cfg.spark.shuffle_partitions = 2
    cfg.spark.driver_memory = "2g"
    cfg.spark.conf = {**cfg.spark.conf, "spark.ui.enabled": "false"}
    return cfg


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny matrices gain nothing from threads, and on a shared 2-core
    CI box their start-up and contention cost far more than they save."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """``one_torch_thread`` for a whole module (its module-scoped fixtures train models too)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def spark():
    from jobs.spark import get_spark
    from synergen_core.config import Config

    session = get_spark(spark_test_config(Config()))
    yield session
    session.stop()


# ---- real data: ../shared/data ------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOVIELENS = SHARED_DATA / "movielens-small"
BEAUTY = SHARED_DATA / "amazon-beauty"


def shared_data(path: Path) -> Path:
    """``path`` when the folder exists. Else the test is skipped, or under ``CI=true`` failed: CI has the
    data, and a run there that skips the real-data tests must not pass as green."""
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} not found: the shared data folder is required under CI=true", pytrace=False)
        pytest.skip(f"{path} not found")
    return path


def requires_shared_data(path: Path) -> pytest.MarkDecorator:
    """Mark for a test or module that reads ``path`` directly: ``shared_data(path)`` before its fixtures."""
    return pytest.mark.shared_data(path)


# Modules of minutes, longest first (durations of a two-worker run). pytest-xdist's ``--dist loadfile``
# hands modules out in collection order: started last, one of them would leave the other worker idle
# for minutes at the end of the run. Started first, the short modules fill in around them.
LONG_MODULES = ["test_dag_run.py", "test_sessionize_real.py", "test_rerun.py", "test_semantic_ids_stage.py",
                "test_sessionize.py", "test_score.py", "test_validate_inputs.py", "test_registry.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module stays


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before any fixture of the test: a module-scoped fixture must not start on data that is not there
    for mark in item.iter_markers("shared_data"):
        shared_data(Path(mark.args[0]))


# ---- one MovieLens slice, one lake, one set of small trained models ------------------------------


def movielens_slice(out: Path, source: Path = MOVIELENS) -> None:
    """The users who typed tags (search events, the HyperSaR protocol) and whose ratings and tags fall on
    at most two days, so the lake holds few day partitions (19 users, ~2.4k events, ~1.2k movies)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    co = pacsv.ConvertOptions(column_types={"tag": pa.string(), "title": pa.string(), "genres": pa.string()})
    tags, ratings, movies = (pacsv.read_csv(source / f, convert_options=co)
                             for f in ("tags.csv", "ratings.csv", "movies.csv"))
    users = np.concatenate([tags["userId"].to_numpy(), ratings["userId"].to_numpy()])
    days = np.concatenate([tags["timestamp"].to_numpy(), ratings["timestamp"].to_numpy()]) // 86_400
    pairs = np.unique(np.stack([users, days], 1), axis=0)
    uniq, n_days = np.unique(pairs[:, 0], return_counts=True)
    keep = pa.array(np.intersect1d(uniq[n_days <= 2], tags["userId"].to_numpy()))
    r = ratings.filter(pc.is_in(ratings["userId"], keep))
    t = tags.filter(pc.is_in(tags["userId"], keep))
    movie_ids = pa.array(np.union1d(r["movieId"].to_numpy(), t["movieId"].to_numpy()))
    m = movies.filter(pc.is_in(movies["movieId"], movie_ids))
    out.mkdir(parents=True)
    for name, table in (("ratings.csv", r), ("tags.csv", t), ("movies.csv", m)):
        pacsv.write_csv(table, out / name)


@pytest.fixture(scope="session")
def movielens_slice_dir(tmp_path_factory) -> Path:
    """The slice's CSV files, written once: ingest it into a lake of your own with ``ingested_slice``."""
    out = tmp_path_factory.mktemp("movielens-slice") / "src"
    movielens_slice(out, shared_data(MOVIELENS))
    return out


def ingested_slice(cfg, src: Path) -> list[str]:
    """The slice in ``src`` ingested into ``cfg``'s lake: its days with events, in order."""
    from jobs import ingest
    from synergen_core import lake

    ingest.run(cfg, "movielens", src)
    return sorted(set(lake.partitions(cfg.lake.root, "raw/browse_events"))
                  | set(lake.partitions(cfg.lake.root, "raw/search_events")))


def small_config(root: Path):
    """Small enough for a 2-core box: d_model 32, 2 epochs, small RQ-VAE; MLflow in ``root``."""
    from synergen_core.config import Config

    cfg = spark_test_config(Config())
    cfg.lake.root = root / "lake"
    cfg.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    cfg.mlflow.artifact_root = root / "mlartifacts"
    cfg.model = cfg.model.model_copy(update={"d_model": 32, "max_seq_len": 20})
    cfg.sessionize = cfg.sessionize.model_copy(update={"splits": ["loo", "temporal"]})  # trains on both
    cfg.train = cfg.train.model_copy(update={"epochs": 2, "batch_size": 32, "progress": False, "threads": 1,
                                             "variants": ["synergen", "sasrec"], "protocols": ["loo", "temporal"]})
    cfg.semantic_ids = cfg.semantic_ids.model_copy(update={
        "epochs": 3, "codebook_size": 32, "hidden_dims": [64], "batch_size": 512, "kmeans_iters": 5})
    cfg.evaluate = cfg.evaluate.model_copy(update={"rank_negatives": 19})
    return cfg


@pytest.fixture(scope="session")
def movielens_lake(tmp_path_factory, spark, movielens_slice_dir):
    """The slice ingested, validated and sessionized (on the test session's Spark) with ``small_config``:
    (config, ds of the last day). Tests that write to it use output names of their own."""
    from jobs import sessionize, validate

    root = tmp_path_factory.mktemp("movielens-lake")
    cfg = small_config(root)
    days = ingested_slice(cfg, movielens_slice_dir)
    validate.run_range(cfg, days[0], days[-1])
    sessionize.run(spark, cfg, days[-1], from_ds=days[0])
    return cfg, days[-1]


@pytest.fixture(scope="session")
def movielens_models(movielens_lake):
    """``train.run`` of ``small_config`` on the lake (synergen and sasrec, loo and temporal, 2 epochs):
    (config, ds, its result). The config is the lake's own: copy it before changing it."""
    from jobs import train

    cfg, ds = movielens_lake
    with torch_threads(1):
        return cfg, ds, train.run(cfg, ds)
