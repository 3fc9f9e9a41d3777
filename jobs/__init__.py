"""Stage entry points: each stage is a function of ``(cfg, ds)``; Spark jobs are ``run(spark, cfg, ds)``."""
