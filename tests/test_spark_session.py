"""The session every stage gets (``jobs.spark.get_spark``): settings a small job's speed depends on."""
from pyspark.sql import functions as F

from jobs.spark import get_spark
from synergen_core.config import Config


def test_a_small_persisted_shuffle_is_coalesced_at_the_default_partitions(spark):
    """At Spark's 200 shuffle partitions (the default) a persisted aggregate of a few rows keeps a few
    partitions, so the jobs run on it afterwards (validation runs dozens) do not each start 200 tasks."""
    before = spark.conf.get("spark.sql.shuffle.partitions")
    try:
        session = get_spark(Config())  # the test session, with the stages' settings applied to it
        assert session.conf.get("spark.sql.shuffle.partitions") == "200"
        grouped = session.range(1_000).groupBy((F.col("id") % 7).alias("k")).count().persist()
        assert grouped.count() == 7
        assert grouped.rdd.getNumPartitions() < 10
        grouped.unpersist()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)


def test_a_stage_stops_its_own_session_unless_told_to_keep_it():
    """In a process without a session (a task's), a stage's session ends with it; with
    ``spark.keep_session`` (what `airflow dags test` gets) the next stage finds it running, one JVM."""
    import subprocess
    import sys
    from pathlib import Path

    code = """if True:
        import sys
        sys.path.insert(0, "tests")
        from conftest import spark_test_config
        from jobs.spark import active_session, session
        from synergen_core.config import Config
        cfg = spark_test_config(Config())
        for keep in (False, True):  # one process: the first mode leaves no session behind for the second
            cfg.spark.keep_session = keep
            with session(cfg) as first:
                pass
            kept = active_session()
            print("kept" if kept is not None else "stopped", kept is first)
            if kept is not None:
                with session(cfg) as second:
                    print("reused", second is first)
                kept.stop()
    """
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["stopped", "False", "kept", "True", "reused", "True"]
