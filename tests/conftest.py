"""Shared fixtures. One Spark session (local[2]) serves the whole test session: a JVM start costs
5-13 s, so no test starts its own (tests needing another master run the CLI in a subprocess)."""
import logging
from contextlib import contextmanager

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
