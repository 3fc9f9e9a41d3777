"""Sessionize on real data (jobs.sessionize, jobs.splits), each input built once per module and shared:

* ``ml``: MovieLens through ingest + validate (catalog day + 2018-04-01..2018-05-06: validating all
  4,000 days takes minutes), bulk to 05-04 then 05-05 and 05-06 one by one (both days have tags, so
  new queries), against one bulk run over the whole window; 05-06 rerun.
* ``beauty``: Amazon Beauty (P5 split) through ingest, read from ``raw`` (its derived times are
  clean by construction and it has no search table, which validation requires), one bulk run.

A bulk over all of MovieLens is ``heavy`` (``make test-heavy``, not in CI's budget).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from sessionize_tables import (SNAPSHOTS, assert_no_leakage, assert_same_tables, canonical, make_cfg,
                               read, tokens_of)

from conftest import shared_data
from jobs import ingest, sessionize, validate
from schemas import C
from schemas import sequences as S
from synergen_core import lake

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# MovieLens: real timestamps, tags as queries

ML_FIRST, ML_X, ML_D1, ML_D2 = "2018-04-01", "2018-05-04", "2018-05-05", "2018-05-06"


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
    assert queries.height >= 50  # tags of 05-02, 05-05 and 05-06 are among users' latest tokens (94 in the window)
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
# heavy: all of MovieLens in one bulk run


@pytest.mark.heavy  # 70-130 s: make test-heavy, not CI
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
