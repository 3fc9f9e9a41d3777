"""Sessionize + tokenize + vocabularies + splits (jobs.sessionize, jobs.splits).

Three inputs, each built once per module and shared:

* ``synth``: four hand-written validated days whose every session, position, duplicate and late
  event is known in advance; run day by day, in bulk, and rerun.
* ``ml``: MovieLens through ingest + validate (catalog day + 2018-01-01..2018-05-06: validating all
  4,000 days takes minutes), bulk to 05-04 then 05-05 and 05-06 one by one (both days have tags, so
  new queries), against one bulk run over the whole window; 05-06 rerun.
* ``beauty``: Amazon Beauty (P5 split) through ingest, read from ``raw`` (its derived times are
  clean by construction and it has no search table, which validation requires), one bulk run.

The standalone-cluster run and a bulk over all of MovieLens are ``slow``.
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import shared_data
from jobs import ingest, sessionize, validate
from schemas import BROWSE_EVENTS, CATALOG, SEARCH_EVENTS, C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
D1, D2, D3, D4 = "2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"
TABLES = list(S.TABLES)
SNAPSHOTS = [t for t in TABLES if t != "events"]


# ---------------------------------------------------------------------------------------------
# helpers


def make_cfg(root: Path, output: str, **sessionize_overrides) -> Config:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.shuffle_partitions = 2
    cfg.sessionize.output = output
    for k, v in sessionize_overrides.items():
        setattr(cfg.sessionize, k, v)
    return cfg


def read(root: Path, layer: str, table: str, ds: str | None = None) -> pl.DataFrame:
    """One partition, or every partition with a ``ds`` column, of an output table."""
    days = [ds] if ds else lake.partitions(root, f"{layer}/{table}")
    frames = []
    for d in days:
        files = lake.data_files(lake.partition(root, f"{layer}/{table}", d))
        t = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
        frame = pl.from_arrow(t) if t is not None and t.num_rows else pl.DataFrame(schema=pl.from_arrow(
            S.TABLES[table].empty_table()).schema)
        frames.append(frame if ds else frame.with_columns(pl.lit(d).alias(C.DS)))
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


SORT_KEYS = {"events": [C.DS, C.USER_ID, C.EVENT_POS], "sequences": [C.USER_ID], "consumed": [C.USER_ID],
             "item_vocab": [C.ITEM_INDEX],
             "query_vocab": [C.QUERY_INDEX], "split_loo_train": [C.USER_ID], "split_temporal_train": [C.USER_ID],
             "split_loo_eval": [C.USER_ID, C.TARGET_POS], "split_temporal_eval": [C.USER_ID, C.TARGET_POS]}


def canonical(root: Path, layer: str, table: str, ds: str | None = None) -> pl.DataFrame:
    return read(root, layer, table, ds).sort(SORT_KEYS[table])


def assert_same_tables(root: Path, a: str, b: str, ds: str) -> None:
    for table in SNAPSHOTS:
        left, right = canonical(root, a, table, ds), canonical(root, b, table, ds)
        assert left.height > 0 or table.endswith("_eval"), f"{a}/{table} is empty"
        assert left.equals(right), f"{table} of {ds} differs between {a} and {b}"
    assert canonical(root, a, "events").equals(canonical(root, b, "events")), f"events differ: {a} vs {b}"


def tokens_of(seqs: pl.DataFrame, column: str = C.TOKENS) -> pl.DataFrame:
    """One row per token (user_id + the token's fields) from a list-of-token column."""
    return seqs.select(C.USER_ID, column).explode(column).drop_nulls(column).unnest(column)


def write_input(root: Path, layer: str, table: str, ds: str, rows: list[dict], schema: pa.Schema) -> None:
    part = lake.partition(root, f"{layer}/{table}", ds)
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / "part-00000.parquet")
    (part / lake.SUCCESS).touch()


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


def assert_no_leakage(train_tokens: pl.DataFrame, evals: pl.DataFrame) -> None:
    """Every training token precedes every evaluation token (query + item) of its user."""
    first_eval = evals.with_columns(
        (pl.col(C.TARGET_POS) - pl.col(C.QUERY_INDEX).is_not_null().cast(pl.Int32)).alias("first")
    ).group_by(C.USER_ID).agg(pl.col("first").min())
    last_train = train_tokens.group_by(C.USER_ID).agg(pl.col(C.POS).max().alias("last"))
    both = last_train.join(first_eval, on=C.USER_ID)
    assert (both["last"] < both["first"]).all(), both.filter(pl.col("last") >= pl.col("first"))


# ---------------------------------------------------------------------------------------------
# MovieLens: real timestamps, tags as queries

ML_FIRST, ML_X, ML_D1, ML_D2 = "2018-01-01", "2018-05-04", "2018-05-05", "2018-05-06"


@pytest.fixture(scope="module")
def ml(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("movielens") / "lake"
    cfg = make_cfg(root, "daily", splits=[])
    got = ingest.run(cfg, "movielens", shared_data(DATA / "movielens-small"))
    # the catalog's day in full (not its catalog alone): sessionize takes a validated day only once
    # validation marked it complete, which needs every table of the day
    validate.run_range(cfg, got["catalog_ds"], got["catalog_ds"])
    validate.run_range(cfg, ML_FIRST, ML_D2)
    stats = {ML_X: sessionize.run(spark, cfg, ML_X, from_ds=ML_FIRST), ML_D1: sessionize.run(spark, cfg, ML_D1)}
    cfg.sessionize.splits = ["loo", "temporal"]
    stats[ML_D2] = sessionize.run(spark, cfg, ML_D2)
    first = {t: canonical(root, "daily", t, ML_D2) for t in SNAPSHOTS}
    stats["rerun"] = sessionize.run(spark, cfg, ML_D2)
    stats["bulk"] = sessionize.run(spark, make_cfg(root, "bulk", splits=["loo", "temporal"]), ML_D2, from_ds=ML_FIRST)
    return {"root": root, "stats": stats, "first_d2": first, "catalog_ds": got["catalog_ds"]}


def reference_sessions(root: Path, layer: str, gap_s: float = 1800.0) -> pl.DataFrame:
    """Sessions computed independently (polars) from input partitions: (ts, event_id) order per user."""
    frames = []
    for table, kind in (("search_events", S.KIND_SEARCH), ("browse_events", S.KIND_BROWSE)):
        for d in lake.partitions(root, f"{layer}/{table}"):
            for f in lake.data_files(lake.partition(root, f"{layer}/{table}", d)):
                t = pl.from_arrow(pq.read_table(f, columns=[C.EVENT_ID, C.USER_ID, C.TS, C.ITEM_ID]))
                frames.append(t.with_columns(pl.lit(kind).alias(C.KIND)))
    ev = pl.concat(frames).sort([C.USER_ID, C.TS, C.EVENT_ID])
    ntok = pl.when((pl.col(C.KIND) == S.KIND_SEARCH) & pl.col(C.ITEM_ID).is_not_null()).then(2).otherwise(1)
    gap = (pl.col(C.TS).diff().dt.total_microseconds() / 1e6).over(C.USER_ID)
    return ev.with_columns(
        (pl.int_range(pl.len()).over(C.USER_ID)).alias(C.EVENT_POS),
        ((ntok.cum_sum() - ntok).over(C.USER_ID)).alias(C.POS),
        ((gap > gap_s).fill_null(False).cast(pl.Int32).cum_sum().over(C.USER_ID)).alias(C.SESSION),
    ).select(C.EVENT_ID, C.USER_ID, C.EVENT_POS, C.POS, C.SESSION)


def test_ml_session_boundaries_match_reference(ml):
    ref = reference_sessions(ml["root"], "validated")
    for layer in ("daily", "bulk"):
        got = read(ml["root"], layer, "events").select(ref.columns)
        assert got.height == ref.height == ml["stats"]["bulk"]["events"]
        joined = ref.join(got, on=[C.EVENT_ID, C.USER_ID], suffix="_got")
        for col in (C.EVENT_POS, C.POS, C.SESSION):
            assert (joined[col] == joined[f"{col}_got"]).all(), (layer, col)
    assert ml["stats"]["bulk"]["late_events"] == 0 and ml["stats"]["bulk"]["duplicates_dropped"] == 0
    assert ref[C.SESSION].max() > 10  # the window really has multi-session users


def test_ml_token_order_and_query_item_pairs(ml):
    seqs = read(ml["root"], "daily", "sequences", ML_D2)
    toks = tokens_of(seqs).sort([C.USER_ID, C.POS])
    steps = toks.group_by(C.USER_ID, maintain_order=True).agg(
        pl.col(C.POS).diff().drop_nulls().alias("dpos"), pl.col(C.TS).diff().drop_nulls().alias("dts"))
    assert all(set(d) <= {1} for d in steps["dpos"]) and all(min(d, default=dt.timedelta(0)) >= dt.timedelta(0)
                                                             for d in steps["dts"])
    nxt = toks.with_columns(*[pl.col(c).shift(-1).over(C.USER_ID).alias(f"next_{c}")
                              for c in (C.TOKEN_TYPE, C.TS, C.SESSION, C.POS)])
    queries = nxt.filter(pl.col(C.TOKEN_TYPE) == S.TOKEN_QUERY)
    assert queries.height >= 100  # tags of 05-02, 05-05 and 05-06 are among users' latest tokens
    # every tag engaged its movie: its query token is followed at once by the item token, same time
    complete = queries.filter(pl.col("next_pos").is_not_null())
    assert (complete["next_type"] == S.TOKEN_ITEM).all() and (complete["next_ts"] == complete[C.TS]).all()
    assert (complete["next_session"] == complete[C.SESSION]).all()
    assert (queries[C.SURFACE] == S.SURFACE_SEARCH).all() and queries[C.ITEM_INDEX].is_null().all()
    # the kept tokens are exactly the events' tokens at those positions
    ev = read(ml["root"], "daily", "events").filter(pl.col(C.KIND) == S.KIND_SEARCH)
    q_pos = set(zip(ev[C.USER_ID], ev[C.POS]))
    assert set(zip(queries[C.USER_ID], queries[C.POS])) <= q_pos


def test_ml_indices_stable_across_consecutive_days(ml):
    root = ml["root"]
    for name, key, index in (("item_vocab", C.ITEM_ID, C.ITEM_INDEX), ("query_vocab", C.QUERY, C.QUERY_INDEX)):
        days = [ML_X, ML_D1, ML_D2]
        vocabs = [read(root, "daily", name, d) for d in days]
        for before, after, day in zip(vocabs, vocabs[1:], days[1:]):
            kept = before.join(after, on=key, suffix="_after")
            assert kept.height == before.height
            assert (kept[index] == kept[f"{index}_after"]).all() and (kept[C.FIRST_DS] == kept[f"{C.FIRST_DS}_after"]).all()
            new = after.join(before, on=key, how="anti")
            assert (new[index] > before[index].max()).all() and (new[C.FIRST_DS] == day).all()
            assert sorted(after[index]) == list(range(1, after.height + 1))
            if name == "query_vocab":
                assert new.height > 0, f"{day} should bring new tags"
    assert ml["stats"][ML_D1]["new_queries"] > 0 and ml["stats"][ML_D2]["new_queries"] > 0
    # every catalog movie has an index from the catalog's day, engaged or not
    items = read(root, "daily", "item_vocab", ML_D2)
    assert items.height == 9742 and items.filter(pl.col(C.FIRST_DS) == ml["catalog_ds"]).height == 9742


def test_ml_rerun_is_idempotent(ml):
    assert ml["stats"]["rerun"]["state_ds"] == ML_D1
    for table in SNAPSHOTS:
        assert canonical(ml["root"], "daily", table, ML_D2).equals(ml["first_d2"][table]), table


def test_ml_bulk_equals_daily(ml):
    assert ml["stats"][ML_D2]["state_ds"] == ML_D1 and ml["stats"]["bulk"]["state_ds"] is None
    assert_same_tables(ml["root"], "daily", "bulk", ML_D2)


def test_ml_splits_do_not_leak(ml):
    root = ml["root"]
    loo = read(root, "daily", "split_loo_eval", ML_D2)
    assert_no_leakage(tokens_of(read(root, "daily", "split_loo_train", ML_D2)), loo)
    assert set(loo[C.TASK]) == {S.TASK_REC, S.TASK_SEARCH}
    # leave-one-out targets are each user's last and second-to-last engagement of the task
    ev = read(root, "daily", "events").filter(pl.col(C.ITEM_ID).is_not_null())
    last2 = (ev.sort(C.EVENT_POS, descending=True).group_by(C.USER_ID, C.SURFACE)
             .agg(pl.col(C.EVENT_POS).head(2).alias("top"), pl.len().alias("n")).filter(pl.col("n") >= 3))
    expected = {(r[C.USER_ID], r[C.SURFACE], split): pos for r in last2.iter_rows(named=True)
                for split, pos in zip((S.SPLIT_TEST, S.SPLIT_VALID), r["top"])}
    pos_of = dict(zip(zip(ev[C.USER_ID], ev[C.EVENT_POS]), ev[C.POS] + (ev[C.KIND] == S.KIND_SEARCH).cast(pl.Int32)))
    assert {(u, t, s): p for u, t, s, p in loo.select(C.USER_ID, C.TASK, C.SPLIT, C.TARGET_POS).iter_rows()} == {
        k: pos_of[(k[0], v)] for k, v in expected.items()}
    temporal = read(root, "daily", "split_temporal_eval", ML_D2)
    assert temporal.height == 61  # 10 ratings + 51 tags arrived on 05-06
    train = read(root, "daily", "split_temporal_train", ML_D2)
    assert_no_leakage(tokens_of(train), temporal)
    assert train.sort(C.USER_ID).equals(read(root, "daily", "sequences", ML_D1).sort(C.USER_ID).select(train.columns))


# ---------------------------------------------------------------------------------------------
# Amazon Beauty: the leave-one-out benchmark split


@pytest.fixture(scope="module")
def beauty(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("beauty") / "lake"
    cfg = make_cfg(root, "sessionized", source="raw", max_seq_len=50, splits=["loo"])
    ingest.run(cfg, "amazon-seq", shared_data(DATA / "amazon-beauty"))
    days = lake.partitions(root, "raw/browse_events")
    stats = sessionize.run(spark, cfg, days[-1], from_ds=days[0])
    return {"root": root, "stats": stats, "ds": days[-1]}


def beauty_sequences() -> dict[str, list[str]]:
    lines = (DATA / "amazon-beauty" / "sequential_data.txt").read_text().split("\n")
    return {parts[0]: parts[1:] for parts in (line.split() for line in lines) if parts}


def test_beauty_leave_one_out_is_the_benchmark_split(beauty):
    root, ds = beauty["root"], beauty["ds"]
    item_of = dict(zip(*read(root, "sessionized", "item_vocab", ds).select(C.ITEM_INDEX, C.ITEM_ID).to_dict().values()))
    seqs = beauty_sequences()
    ev = read(root, "sessionized", "split_loo_eval", ds)
    assert ev.height == 2 * len(seqs) == 2 * 22363
    got = {(u, s): item_of[i] for u, s, i in ev.select(C.USER_ID, C.SPLIT, C.ITEM_INDEX).iter_rows()}
    assert got == {**{(u, S.SPLIT_TEST): items[-1] for u, items in seqs.items()},
                   **{(u, S.SPLIT_VALID): items[-2] for u, items in seqs.items()}}
    train = read(root, "sessionized", "split_loo_train", ds)
    train_items = {u: [item_of[t[C.ITEM_INDEX]] for t in toks] for u, toks in train.iter_rows()}
    assert train_items == {u: items[:-2][-50:] for u, items in seqs.items()}
    test_ctx = ev.filter(pl.col(C.SPLIT) == S.SPLIT_TEST)
    ctx_items = {u: [item_of[t[C.ITEM_INDEX]] for t in c] for u, c in test_ctx.select(C.USER_ID, C.CONTEXT).iter_rows()}
    assert ctx_items == {u: items[:-1][-50:] for u, items in seqs.items()}  # test input = train + valid
    assert_no_leakage(tokens_of(train), ev)


def test_beauty_sessions_and_counts(beauty):
    s = beauty["stats"]
    assert s["events"] == s["rows_in"][S.KIND_BROWSE] == 198502 and s["duplicates_dropped"] == 0
    assert s["users_with_events"] == 22363 and s["new_items"] == 12101
    ev = read(beauty["root"], "sessionized", "events")
    # derived times are a day apart: every event is its own session
    assert (ev[C.SESSION] == ev[C.EVENT_POS]).all() and ev[C.LATE].sum() == 0


# ---------------------------------------------------------------------------------------------
# slow: a real standalone cluster, and all of MovieLens in one bulk run


def run_cli(config: Path, master: str, *args: str) -> None:
    env = {**os.environ, "SYNERGEN__SPARK__MASTER": master}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "sessionize", "--config", str(config), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
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


@pytest.mark.slow
def test_ml_full_history_in_one_bulk_run(spark, ml):
    """All 4,000+ days of MovieLens (raw, as ingested) in one run: sessions as the reference, no leaks."""
    root = ml["root"]
    cfg = make_cfg(root, "full", source="raw", splits=["loo"])
    days = lake.partitions(root, "raw/browse_events")
    stats = sessionize.run(spark, cfg, days[-1], from_ds=days[0])
    assert stats["input_days"] >= len(days) and stats["events"] == 100836 + 3683
    ref = reference_sessions(root, "raw")
    got = read(root, "full", "events").select(ref.columns)
    joined = ref.join(got, on=[C.EVENT_ID, C.USER_ID], suffix="_got")
    assert joined.height == ref.height
    for col in (C.EVENT_POS, C.POS, C.SESSION):
        assert (joined[col] == joined[f"{col}_got"]).all(), col
    assert_no_leakage(tokens_of(read(root, "full", "split_loo_train", days[-1])),
                      read(root, "full", "split_loo_eval", days[-1]))
