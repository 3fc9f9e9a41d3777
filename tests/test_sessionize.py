"""Sessionize + tokenize + vocabularies + splits (jobs.sessionize, jobs.splits) on hand-written days.

``synth``: four hand-written validated days whose every session, position, duplicate and late event is
known in advance; run day by day, in bulk, and rerun; built once per module and shared. The same days
on a standalone cluster are ``slow``. Real data (MovieLens, Beauty) is in test_sessionize_real.py, a
module of its own so that the two pytest workers run them side by side.
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from sessionize_tables import (SNAPSHOTS, assert_no_leakage, assert_same_tables, canonical, make_cfg,
                               read, tokens_of, write_input)

from jobs import sessionize
from schemas import BROWSE_EVENTS, CATALOG, SEARCH_EVENTS, C
from schemas import sequences as S
from synergen_core import lake

D1, D2, D3, D4 = "2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the hand-written input


def at(day: str, hh: int, mm: int = 0) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hh, minute=mm, tzinfo=dt.timezone.utc)


def search(eid, user, ts, query, item, action="click", shown=None):
    return {C.EVENT_ID: eid, C.USER_ID: user, C.TS: ts, C.QUERY: query, C.ITEM_ID: item, C.ACTION: action,
            C.IMPRESSIONS: shown}


def browse(eid, user, ts, item, action="view", shown=None):
    return {C.EVENT_ID: eid, C.USER_ID: user, C.TS: ts, C.ITEM_ID: item, C.ACTION: action, C.SURFACE: "home",
            C.IMPRESSIONS: shown}


SYNTH_SEARCH = {
    D1: [search("u1-s1", "u1", at(D1, 10), "Red Lipstick", "i1")],
    D2: [search("u1-s2", "u1", at(D2, 9), "mascara", None, "none", shown=["i5", "i2"])],
    D3: [search("u1-s3", "u1", at(D3, 10), "  red   LIPSTICK ", "i7")],
    D4: [search("u2-s1", "u2", at(D4, 9), "eyeliner", "i4", shown=["i3", "i4", "i9"]),  # i9: listed nowhere
         search("u2-s2", "u2", at(D4, 9, 10), "eyeliner", "i5", "purchase"),
         search("u2-s3", "u2", at(D4, 9, 20), "Eyeliner", "i6")],
}
SYNTH_BROWSE = {
    D1: [browse("u1-b1", "u1", at(D1, 10, 10), "i2"),
         browse("u1-b1", "u1", at(D1, 10, 10), "i2"),  # exact duplicate in the same day
         browse("u1-b2", "u1", at(D1, 10, 40), "i3"),  # gap of exactly 30 minutes: same session
         browse("u1-b3", "u1", at(D1, 11, 11), "i4"),  # 31 minutes: new session
         browse("u1-b4b", "u1", at(D1, 12), "i5"),  # same ts as u1-b4a: the id orders them
         browse("u1-b4a", "u1", at(D1, 12), "i6"),
         browse("u2-b1", "u2", at(D1, 20), "i1", shown=[])],
    D2: [browse("u1-b5", "u1", at(D2, 9, 5), "i2")],
    D3: [browse("u1-late", "u1", at(D2, 8), "i3"),  # late, older than u1's latest event: clamped
         browse("u1-b5", "u1", at(D2, 9, 5), "i2"),  # exact copy of a D2 event, resent a day later
         browse("u2-late", "u2", at(D2, 23), "i2"),  # late, but newer than all u2 had: in time order
         browse("u2-b2", "u2", at(D3, 8), "i3")],
    D4: [browse("u1-b6", "u1", at(D4, 10), "i1"),
         browse("u3-b1", "u3", at(D4, 12), "i6", shown=["i6", "i1", "i2"]),
         browse("u3-b2", "u3", at(D4, 12, 20), "i6"),
         browse("u3-b3", "u3", at(D4, 13), "i1")],
}
SYNTH_CATALOG = {D1: [f"i{k}" for k in range(1, 7)], D3: ["i7"]}

# event -> (event_pos, pos, session, late, clamped); gaps are checked separately
EXPECTED = {
    "u1-s1": (0, 0, 0, False, False), "u1-b1": (1, 2, 0, False, False), "u1-b2": (2, 3, 0, False, False),
    "u1-b3": (3, 4, 1, False, False), "u1-b4a": (4, 5, 2, False, False), "u1-b4b": (5, 6, 2, False, False),
    "u1-s2": (6, 7, 3, False, False), "u1-b5": (7, 8, 3, False, False), "u1-late": (8, 9, 3, True, True),
    "u1-s3": (9, 10, 4, False, False), "u1-b6": (10, 12, 5, False, False),
    "u2-b1": (0, 0, 0, False, False), "u2-late": (1, 1, 1, True, False), "u2-b2": (2, 2, 2, False, False),
    "u2-s1": (3, 3, 3, False, False), "u2-s2": (4, 5, 3, False, False), "u2-s3": (5, 7, 3, False, False),
    "u3-b1": (0, 0, 0, False, False), "u3-b2": (1, 1, 0, False, False), "u3-b3": (2, 2, 1, False, False),
}
MAX_LEN = 8


@pytest.fixture(scope="module")
def synth(spark, tmp_path_factory):
    """Outputs of the hand-written days: ``daily`` (D1..D4 one by one, D4 rerun) and ``bulk`` (one run)."""
    root = tmp_path_factory.mktemp("synth") / "lake"
    for ds, items in SYNTH_CATALOG.items():
        write_input(root, "validated", "catalog", ds, [{C.ITEM_ID: i, C.TITLE: i} for i in items], CATALOG)
    for ds in (D1, D2, D3, D4):
        write_input(root, "validated", "search_events", ds, SYNTH_SEARCH[ds], SEARCH_EVENTS)
        write_input(root, "validated", "browse_events", ds, SYNTH_BROWSE[ds], BROWSE_EVENTS)
        lake.mark_day_complete(root, "validated", ds)  # as validation does once a day's tables are all in
    daily = make_cfg(root, "daily", max_seq_len=MAX_LEN, splits=[])  # only D4's splits are checked
    stats = {ds: sessionize.run(spark, daily, ds) for ds in (D1, D2, D3)}
    daily.sessionize.splits = ["loo", "temporal"]
    stats[D4] = sessionize.run(spark, daily, D4)
    first = {t: canonical(root, "daily", t, D4) for t in SNAPSHOTS}
    rerun = sessionize.run(spark, daily, D4)
    bulk = sessionize.run(spark, make_cfg(root, "bulk", max_seq_len=MAX_LEN, splits=["loo", "temporal"]), D4,
                          from_ds=D1)
    return {"root": root, "stats": stats, "first_d4": first, "rerun": rerun, "bulk": bulk}


# ---------------------------------------------------------------------------------------------
# hand-written days: exact expectations


def test_outputs_follow_their_contracts(synth):
    for table, contract in S.TABLES.items():
        part = lake.partition(synth["root"], f"daily/{table}", D4)
        assert (part / lake.SUCCESS).is_file()
        for f in lake.data_files(part):
            assert S.conforms(pq.read_schema(f).remove_metadata(), contract), f"{f}: {pq.read_schema(f)}"


def test_sessions_positions_and_late_rule(synth):
    ev = read(synth["root"], "daily", "events")
    got = {r[C.EVENT_ID]: (r[C.EVENT_POS], r[C.POS], r[C.SESSION], r[C.LATE], r[C.CLAMPED])
           for r in ev.iter_rows(named=True)}
    assert got == EXPECTED
    gaps = dict(zip(ev[C.EVENT_ID], ev[C.GAP_S]))
    assert gaps["u1-s1"] is None and gaps["u1-b2"] == 1800 and gaps["u1-b3"] == 1860
    assert gaps["u1-late"] == 0  # clamped: measured from u1's latest time, D2 09:05
    assert gaps["u1-s3"] == (at(D3, 10) - at(D2, 9, 5)).total_seconds()  # not from the late event's time
    assert gaps["u2-late"] == 27 * 3600
    # late events stay in the partition they arrived in, with their own ts
    late = ev.filter(pl.col(C.LATE))
    assert late[C.DS].to_list() == [D3, D3] and late[C.TS].dt.date().cast(str).to_list() == [D2, D2]


def test_duplicates_dropped_and_counted(synth):
    s = synth["stats"]
    assert [s[d]["duplicates_dropped"] for d in (D1, D2, D3, D4)] == [1, 0, 1, 0]
    assert s[D3]["late_events"] == 2 and s[D3]["clamped_events"] == 1
    assert synth["bulk"]["duplicates_dropped"] == 2 and synth["bulk"]["late_events"] == 2
    ev = read(synth["root"], "daily", "events")
    assert ev[C.EVENT_ID].is_unique().all()
    assert ev.filter(pl.col(C.EVENT_ID) == "u1-b5")[C.DS].to_list() == [D2]  # the first arrival is kept


def test_tokens_query_then_item_and_truncation(synth):
    seqs = read(synth["root"], "daily", "sequences", D4).sort(C.USER_ID)
    assert seqs[C.N_TOKENS].to_list() == [13, 9, 3] and seqs[C.N_EVENTS].to_list() == [11, 6, 3]
    toks = tokens_of(seqs)
    u1 = toks.filter(pl.col(C.USER_ID) == "u1")
    assert u1[C.POS].to_list() == list(range(13 - MAX_LEN, 13))  # the latest max_seq_len tokens
    assert u1[C.TOKEN_TYPE].to_list() == ["item"] * 2 + ["query", "item", "item", "query", "item", "item"]
    # u1-s2 engaged nothing: its query token stands alone; u1-s3 is a query followed by its item
    q = u1.filter(pl.col(C.TOKEN_TYPE) == "query")
    assert q[C.ACTION].to_list() == ["none", "click"]
    u2 = toks.filter(pl.col(C.USER_ID) == "u2")
    assert u2[C.TOKEN_TYPE].to_list() == ["item"] * 2 + ["query", "item"] * 3
    assert set(u2.filter(pl.col(C.TOKEN_TYPE) == "query")[C.SURFACE]) == {S.SURFACE_SEARCH}
    pairs = u2.with_columns(pl.col(C.TS).shift(-1).alias("next_ts"), pl.col(C.TOKEN_TYPE).shift(-1).alias("next"))
    for r in pairs.filter(pl.col(C.TOKEN_TYPE) == "query").iter_rows(named=True):
        assert r["next"] == "item" and r["next_ts"] == r[C.TS]
        assert r[C.ITEM_INDEX] is None and r[C.QUERY_INDEX] is not None


def test_impressions_become_item_indices_on_item_tokens(synth):
    ev = read(synth["root"], "daily", "events")
    shown = dict(zip(ev[C.EVENT_ID], ev[C.SHOWN_ITEMS].to_list()))
    # display order kept, the engaged item and ids no vocabulary holds left out; null = not logged
    assert shown["u2-s1"] == [3] and shown["u3-b1"] == [1, 2] and shown["u1-s2"] == [5, 2]
    assert shown["u2-b1"] == [] and shown["u1-b2"] is None
    toks = tokens_of(read(synth["root"], "daily", "sequences", D4))
    at_pos = {(r[C.USER_ID], r[C.POS]): r[C.SHOWN_ITEMS] for r in toks.iter_rows(named=True)}
    assert at_pos[("u2", 4)] == [3] and at_pos[("u2", 3)] is None  # the item token, not the query token
    assert at_pos[("u3", 0)] == [1, 2]
    # the split tables carry them too: u2-s1's item is in u2's context of the loo test target
    ctx = tokens_of(read(synth["root"], "daily", "split_loo_eval", D4), C.CONTEXT)
    assert [3] in ctx.filter(pl.col(C.USER_ID) == "u2")[C.SHOWN_ITEMS].to_list()


def test_consumed_items_per_user(synth):
    """The consumed snapshot: every item of each user's events so far, once, ascending; a user whose
    events engaged nothing (a search without an item) has no row until one does."""
    root = synth["root"]
    ev = read(root, "daily", "events")
    for d in (D1, D2, D3, D4):
        got = {u: list(c) for u, c in read(root, "daily", "consumed", d).iter_rows()}
        upto = ev.filter((pl.col(C.DS) <= d) & pl.col(C.ITEM_INDEX).is_not_null())
        want = {u: sorted(set(g[C.ITEM_INDEX])) for (u,), g in upto.group_by(C.USER_ID)}
        assert got == want and got, d
    assert canonical(root, "daily", "consumed", D4).equals(canonical(root, "bulk", "consumed", D4))


def test_vocabularies_stable_and_appended(synth):
    root = synth["root"]
    items = {d: read(root, "daily", "item_vocab", d) for d in (D1, D2, D3, D4)}
    queries = {d: read(root, "daily", "query_vocab", d) for d in (D1, D2, D3, D4)}
    assert dict(zip(items[D4][C.ITEM_ID], items[D4][C.ITEM_INDEX])) == {f"i{k}": k for k in range(1, 8)}
    assert items[D4].filter(pl.col(C.ITEM_ID) == "i7")[C.FIRST_DS].item() == D3
    assert dict(zip(queries[D4][C.QUERY], queries[D4][C.QUERY_INDEX])) == {
        "red lipstick": 1, "mascara": 2, "eyeliner": 3}
    assert dict(zip(queries[D4][C.QUERY], queries[D4][C.COUNT])) == {"red lipstick": 2, "mascara": 1, "eyeliner": 3}
    assert items[D4].filter(pl.col(C.ITEM_ID) == "i1")[C.COUNT].item() == 4
    for before, after in ((D1, D2), (D2, D3), (D3, D4)):
        for vocab, key, index in ((items, C.ITEM_ID, C.ITEM_INDEX), (queries, C.QUERY, C.QUERY_INDEX)):
            kept = vocab[before].select(key, index).join(vocab[after].select(key, index), on=key, suffix="_after")
            assert kept.height == vocab[before].height and (kept[index] == kept[f"{index}_after"]).all()


def test_rerun_is_idempotent(synth):
    root = synth["root"]
    for table in SNAPSHOTS:
        assert canonical(root, "daily", table, D4).equals(synth["first_d4"][table]), table
    assert synth["rerun"]["state_ds"] == D3
    leftovers = [p for p in (root / "daily").rglob(".*") if p.name.startswith((".run-", ".ds="))]
    assert leftovers == []


def test_refuses_input_whose_validation_did_not_complete(spark, tmp_path):
    """From ``validated``, a day with input but no validation marker (validation failed or was killed
    halfway, or never ran over a raw day) is refused with the day and the command to run; ``raw``
    input needs no marker."""
    from synergen_core.errors import PipelineError

    root = tmp_path / "lake"
    write_input(root, "validated", "search_events", D1, SYNTH_SEARCH[D1], SEARCH_EVENTS)  # browse missing
    with pytest.raises(PipelineError, match=f"day {D1} .*validation did not complete.*synergen validate --ds {D1}"):
        sessionize.run(spark, make_cfg(root, "out"), D1)
    write_input(root, "validated", "browse_events", D1, SYNTH_BROWSE[D1], BROWSE_EVENTS)
    lake.mark_day_complete(root, "validated", D1)
    write_input(root, "raw", "browse_events", D2, SYNTH_BROWSE[D2], BROWSE_EVENTS)  # never validated
    with pytest.raises(PipelineError, match=f"day {D2} .*synergen validate --ds {D2}"):
        sessionize.run(spark, make_cfg(root, "out"), D2)
    assert not (root / "out").exists()  # nothing published, not even empty partitions
    assert sessionize.run(spark, make_cfg(root, "out", source="raw", splits=[]), D2)["events"] == 1


def test_refuses_a_run_without_input_events(spark, tmp_path):
    """An empty (or wrong) lake is an error naming the layer and day, not empty partitions marked done."""
    from synergen_core.errors import PipelineError

    root = tmp_path / "lake"
    with pytest.raises(PipelineError, match=f"no input events in validated/search_events .*ds={D1}"):
        sessionize.run(spark, make_cfg(root, "out"), D1)
    write_input(root, "validated", "catalog", D1, [{C.ITEM_ID: "i1", C.TITLE: "i1"}], CATALOG)  # no events
    lake.mark_day_complete(root, "validated", D1)
    with pytest.raises(PipelineError, match="no input events"):
        sessionize.run(spark, make_cfg(root, "out"), D1)
    assert not (root / "out").exists()


def test_bulk_equals_daily(synth):
    assert synth["bulk"]["state_ds"] is None and synth["bulk"]["input_days"] == 4
    assert_same_tables(synth["root"], "daily", "bulk", D4)


def test_loo_split(synth):
    root = synth["root"]
    ev = read(root, "daily", "split_loo_eval", D4)
    got = {(r[C.USER_ID], r[C.TASK], r[C.SPLIT]): r[C.TARGET_POS] for r in ev.iter_rows(named=True)}
    assert got == {
        ("u1", S.TASK_REC, S.SPLIT_TEST): 12, ("u1", S.TASK_REC, S.SPLIT_VALID): 9,
        ("u2", S.TASK_REC, S.SPLIT_TEST): 2, ("u2", S.TASK_REC, S.SPLIT_VALID): 1,
        ("u2", S.TASK_SEARCH, S.SPLIT_TEST): 8, ("u2", S.TASK_SEARCH, S.SPLIT_VALID): 6,
        ("u3", S.TASK_REC, S.SPLIT_TEST): 2, ("u3", S.TASK_REC, S.SPLIT_VALID): 1,
    }  # u1's two search engagements are fewer than three: training only
    search_test = ev.filter((pl.col(C.USER_ID) == "u2") & (pl.col(C.TASK) == S.TASK_SEARCH)
                            & (pl.col(C.SPLIT) == S.SPLIT_TEST)).row(0, named=True)
    assert search_test[C.QUERY_INDEX] == 3 and search_test[C.CONTEXT][-1][C.TOKEN_TYPE] == "query"
    assert [t[C.POS] for t in search_test[C.CONTEXT]] == list(range(0, 8))
    train = tokens_of(read(root, "daily", "split_loo_train", D4))
    # training stops before each user's first evaluation token (u2: the valid rec target at 1)
    assert train.group_by(C.USER_ID).agg(pl.col(C.POS).max()).sort(C.USER_ID).rows() == [
        ("u1", 8), ("u2", 0), ("u3", 0)]
    assert_no_leakage(train, ev)


def test_loo_search_tests_takes_the_last_searches_and_leaves_two(spark):
    """``sessionize.loo_search_tests``: up to N last search engagements are test targets, never more than
    all but two (one for training, one for validation); rec keeps one; N = 1 is the usual protocol."""
    from jobs import splits

    rows = ([("a", S.TASK_SEARCH, p) for p in range(6)] + [("a", S.TASK_REC, p) for p in range(10, 14)]
            + [("b", S.TASK_SEARCH, p) for p in range(3)] + [("c", S.TASK_SEARCH, p) for p in range(2)])
    engaged = spark.createDataFrame(rows, [C.USER_ID, C.TASK, C.EVENT_POS])

    def picked(n: int) -> dict:
        got = splits.loo_targets(engaged, n).select(C.USER_ID, C.TASK, C.EVENT_POS, C.SPLIT).collect()
        return {(r[0], r[1], r[2]): r[3] for r in got}

    t, v = S.SPLIT_TEST, S.SPLIT_VALID
    assert picked(3) == {("a", S.TASK_SEARCH, 5): t, ("a", S.TASK_SEARCH, 4): t, ("a", S.TASK_SEARCH, 3): t,
                         ("a", S.TASK_SEARCH, 2): v, ("a", S.TASK_REC, 13): t, ("a", S.TASK_REC, 12): v,
                         ("b", S.TASK_SEARCH, 2): t, ("b", S.TASK_SEARCH, 1): v}  # c: two, training only
    assert picked(1) == {("a", S.TASK_SEARCH, 5): t, ("a", S.TASK_SEARCH, 4): v, ("a", S.TASK_REC, 13): t,
                         ("a", S.TASK_REC, 12): v, ("b", S.TASK_SEARCH, 2): t, ("b", S.TASK_SEARCH, 1): v}
    assert picked(10)[("a", S.TASK_SEARCH, 2)] == t and picked(10)[("a", S.TASK_SEARCH, 1)] == v


def test_temporal_split(synth):
    root = synth["root"]
    ev = read(root, "daily", "split_temporal_eval", D4)
    assert sorted(zip(ev[C.USER_ID], ev[C.TARGET_POS], ev[C.TASK])) == [
        ("u1", 12, S.TASK_REC), ("u2", 4, S.TASK_SEARCH), ("u2", 6, S.TASK_SEARCH), ("u2", 8, S.TASK_SEARCH),
        ("u3", 0, S.TASK_REC), ("u3", 1, S.TASK_REC), ("u3", 2, S.TASK_REC)]
    train = read(root, "daily", "split_temporal_train", D4)
    # training input = the state after D3 = the sequences snapshot of D3
    assert train.sort(C.USER_ID).equals(read(root, "daily", "sequences", D3).sort(C.USER_ID).select(train.columns))
    assert_no_leakage(tokens_of(train), ev)
    u3_first = ev.filter((pl.col(C.USER_ID) == "u3") & (pl.col(C.TARGET_POS) == 0))[C.CONTEXT].item()
    assert len(u3_first) == 0  # a new user's first engagement has no history



# ---------------------------------------------------------------------------------------------
# slow: a real standalone cluster, and all of MovieLens in one bulk run


def run_cli(config: Path, master: str, *args: str) -> None:
    env = {**os.environ, "SYNERGEN__SPARK__MASTER": master}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "sessionize", "--config", str(config), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.cluster  # make test-cluster: the whole DAG on the same loopback cluster covers it in CI's stead
def test_same_job_on_standalone_cluster_and_local(synth, tmp_path):
    """The CLI, unchanged, on a master + worker on 127.0.0.1: the tables of the same days' one local run
    (``synth``'s ``bulk``, on the test session's local Spark)."""
    from cluster import standalone_cluster

    root = synth["root"]
    settings = {"lake": {"root": str(root)},
                # the CLI runs the tracked stage: keep its MLflow store in this test's folder
                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "mlruns")},
                "spark": {"shuffle_partitions": 2, "driver_memory": "1g", "conf": {"spark.ui.enabled": "false"}},
                "sessionize": {"max_seq_len": MAX_LEN, "splits": ["loo", "temporal"]}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({**settings, "sessionize": {
        **settings["sessionize"], "output": "cluster"}}))
    with standalone_cluster(tmp_path / "spark") as c:
        run_cli(tmp_path / "cluster.yaml", c.master_url, "--ds", D4, "--from-ds", D1)
        apps = c.status().get("completedapps", []) + c.status().get("activeapps", [])
        assert apps, "the job did not run on the cluster"
    assert_same_tables(root, "bulk", "cluster", D4)

