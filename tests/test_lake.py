"""Lake publication: day markers, a publish killed between its two renames, stale staging folders."""
from synergen_core import lake


def test_day_marker_round_trip(tmp_path):
    assert lake.completed_days(tmp_path, "validated") == []
    m = lake.mark_day_complete(tmp_path, "validated", "2026-01-02", {"_validation.json": '{"ok": true}'})
    assert m == tmp_path / "validated" / "_days" / "ds=2026-01-02"
    assert (m / lake.SUCCESS).is_file() and (m / "_validation.json").read_text() == '{"ok": true}'
    lake.mark_day_complete(tmp_path, "validated", "2026-01-01", {})
    assert lake.completed_days(tmp_path, "validated") == ["2026-01-01", "2026-01-02"]
    lake.unmark_day(tmp_path, "validated", "2026-01-02")
    lake.unmark_day(tmp_path, "validated", "2026-01-05")  # no marker: nothing to do
    assert lake.completed_days(tmp_path, "validated") == ["2026-01-01"]
    assert sorted(p.name for p in (tmp_path / "validated" / "_days").iterdir()) == ["ds=2026-01-01"]


def _publish_day(final, text: str) -> None:
    tmp = lake.staging_dir(final)
    (tmp / "part-00000.parquet").write_text(text)  # content only: these tests never parse it
    lake.publish(tmp, final)


KILLED_PUBLISH = """
import os, pathlib, signal, sys
from synergen_core import lake

renames, rename = [], pathlib.Path.rename
def rename_then_die(self, target):
    renames.append(self)
    if len(renames) == 2:  # the old partition is aside, the new one not yet in: killed right here
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
pathlib.Path.rename = rename_then_die
final = pathlib.Path(sys.argv[1])
tmp = lake.staging_dir(final)
(tmp / "part-00000.parquet").write_text("new")
lake.publish(tmp, final)
"""


def test_publish_killed_between_its_renames_loses_no_day(tmp_path):
    """A process SIGKILLed after moving ``ds=D`` aside and before moving the new one in: readers still
    list the day, with its old content, and the next publish replaces it and leaves nothing behind."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "lake"
    final = lake.partition(root, "sessionized/events", "2026-01-02")
    _publish_day(final, "old")
    done = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(final)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert not final.exists() and list(final.parent.glob(".ds=2026-01-02.old-*"))  # killed in the window

    assert lake.partitions(root, "sessionized/events") == ["2026-01-02"]  # a reader recovers it
    assert (final / "part-00000.parquet").read_text() == "old"
    _publish_day(final, "new")
    assert (final / "part-00000.parquet").read_text() == "new"
    assert lake.remove_stale(root, "sessionized/events")  # the killed run's staging folder
    assert sorted(p.name for p in final.parent.iterdir()) == ["ds=2026-01-02"]


def test_next_publish_recovers_a_day_left_aside(tmp_path):
    """The same kill, replayed by hand (the first rename only): ``publish`` itself puts the day back
    before replacing it, so the replaced folder is never the only copy and no ``.old-`` is left."""
    final = lake.partition(tmp_path, "sessionized/sequences", "2026-01-03")
    _publish_day(final, "old")
    final.rename(lake.set_aside(final))
    tmp = lake.staging_dir(final)
    (tmp / "part-00000.parquet").write_text("new")
    lake.publish(tmp, final)
    assert (final / "part-00000.parquet").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["ds=2026-01-03"]


def test_remove_stale_keeps_data_and_removes_leftovers(tmp_path):
    table = "sessionized/events"
    base = tmp_path / table
    _publish_day(lake.partition(tmp_path, table, "2026-01-01"), "day 1")
    _publish_day(lake.partition(tmp_path, table, "2026-01-02"), "day 2")
    # a killed Spark run's folder, a half-written partition, a replaced one whose successor is in place
    (base / ".run-0badc0de" / "ds=2026-01-03").mkdir(parents=True)
    (base / ".run-0badc0de" / "ds=2026-01-03" / "part-0.parquet").write_text("half")
    (base / ".ds=2026-01-03.tmp-0badc0de").mkdir()
    (base / ".ds=2026-01-01.old-0badc0de").mkdir()
    # a day left aside by a publish killed between its renames: data, not a leftover
    (base / "ds=2026-01-02").rename(base / ".ds=2026-01-02.old-0badc0de")

    removed = lake.remove_stale(tmp_path, table)
    assert sorted(p.name for p in removed) == [".ds=2026-01-01.old-0badc0de", ".ds=2026-01-03.tmp-0badc0de",
                                              ".run-0badc0de"]
    assert sorted(p.name for p in base.iterdir()) == ["ds=2026-01-01", "ds=2026-01-02"]
    assert (base / "ds=2026-01-02" / "part-00000.parquet").read_text() == "day 2"
    assert lake.remove_stale(tmp_path, "sessionized/nothing_here") == []


def test_a_spark_stage_removes_what_its_killed_run_left(spark, tmp_path):
    """Any stage writing through ``jobs.spark.Staging`` clears a killed run's ``.run-*`` and
    ``.ds=D.tmp-*`` folders of the tables it writes, before staging its own."""
    from jobs.spark import Staging

    base = tmp_path / "embeddings" / "items"
    (base / ".run-0badc0de" / "ds=2026-01-01").mkdir(parents=True)
    (base / ".ds=2026-01-01.tmp-0badc0de").mkdir()
    staging = Staging(spark, tmp_path)
    staging.write_day(spark.range(3), "embeddings/items", "2026-01-01")
    staging.publish()
    assert sorted(p.name for p in base.iterdir()) == ["ds=2026-01-01"]
    assert lake.partitions(tmp_path, "embeddings/items") == ["2026-01-01"]


def test_a_missing_partition_folder_has_no_data_files(tmp_path):
    """As before data files matched .parq too: readers ask for a day that may not exist yet."""
    assert lake.data_files(tmp_path / "nope" / "ds=2026-01-01") == []
    assert lake.other_files(tmp_path / "nope" / "ds=2026-01-01") == []


def test_readers_see_only_published_partitions_except_under_raw(tmp_path):
    """A folder without ``_SUCCESS`` (half-written, never validated, copied by hand) is no partition of a
    pipeline table; raw/ is the users' input, where every ``ds=`` folder counts."""
    for table in ("validated/browse_events", "raw/browse_events"):
        (tmp_path / table / "ds=2026-01-01").mkdir(parents=True)
        done = tmp_path / table / "ds=2026-01-02"
        done.mkdir()
        (done / lake.SUCCESS).touch()
    assert lake.partitions(tmp_path, "validated/browse_events") == ["2026-01-02"]
    assert lake.partitions(tmp_path, "raw/browse_events") == ["2026-01-01", "2026-01-02"]


def test_scoring_removes_what_its_killed_run_left(spark, tmp_path):
    """The candidate lists' staging (``jobs.candidates.write_staged``) clears a killed run's half-written
    day before staging its own."""
    from jobs import candidates
    from jobs.spark import spark_schema
    from schemas import C
    from schemas import candidates as candidates_schema
    from synergen_core.config import Config

    cfg = Config()
    cfg.lake.root = tmp_path
    staging = tmp_path / cfg.score.output / lake.STAGING
    (staging / ".ds=2026-01-01.tmp-0badc0de" / "surface=rec").mkdir(parents=True)
    schema = spark_schema(candidates_schema.CANDIDATES, with_ds=False).add(C.SURFACE, "string")
    lists = spark.createDataFrame([("u1", None, 1, "i1", 1.0, 1.0, "synergen", "1", "rec")], schema)
    candidates.write_staged(cfg, "2026-01-01", lists, lambda counts: counts)
    assert sorted(p.name for p in staging.iterdir()) == ["ds=2026-01-01"]
