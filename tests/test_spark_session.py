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
