"""The synthetic log generator: determinism, contracts, realism and exact ground truth of planted defects."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs import cli, generate
from schemas import C, RAW_TABLES, reasons
from schemas.raw import BROWSE_ACTIONS, SEARCH_ACTIONS
from synergen_core import lake
from synergen_core.config import Config

EVENT_TABLES = ("search_events", "browse_events")
DAY_US = 86_400_000_000
VALUE_NULL = "_value_is_null"


def small_config(**generate_overrides) -> Config:
    cfg = Config()
    for key, value in {"events": 30_000, "days": 3, "users": 500, "items": 1_000, "categories": 20,
                       "impressions": 6, "malformed_share": 0.05, "new_item_share_per_day": 0.02,
                       **generate_overrides}.items():
        setattr(cfg.generate, key, value)
    return cfg


def read_day(root: Path, table: str, ds: str) -> pd.DataFrame:
    files = lake.data_files(lake.partition(root, f"raw/{table}", ds))
    assert len(files) == 1
    t = pq.read_table(files[0])
    df = t.to_pandas()
    if C.VALUE in t.column_names:  # pandas turns null into NaN; a NaN value is a defect, a null is not
        df[VALUE_NULL] = t.column(C.VALUE).is_null().to_numpy(zero_copy_only=False)
    return df


def day_start_us(ds: str) -> int:
    d = dt.date.fromisoformat(ds)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp()) * 1_000_000


def ts_us(df: pd.DataFrame) -> np.ndarray:
    """Event times in microseconds, NaN where null."""
    ts = df[C.TS]
    out = np.full(len(df), np.nan)
    ok = ts.notna().to_numpy()
    out[ok] = ts[ok].dt.as_unit("us").astype("int64").to_numpy()
    return out


@pytest.fixture(scope="module")
def lake_run(tmp_path_factory):
    cfg = small_config()
    root = tmp_path_factory.mktemp("lake")
    result = generate.run(cfg, cfg.generate.start_ds, out_root=root)
    data = {t: {ds: read_day(root, t, ds) for ds in result["days"]} for t in RAW_TABLES}
    return cfg, root, result, data


def catalog_first_day(data) -> pd.Series:
    """item_id -> first day it has a row with a title (what validation keeps)."""
    rows = pd.concat(df.assign(ds=ds) for ds, df in data["catalog"].items())
    rows = rows[rows[C.TITLE].notna()].drop_duplicates(C.ITEM_ID)
    return pd.Series(rows["ds"].to_numpy(), index=rows[C.ITEM_ID].to_numpy())


def valid_events(cfg, data, table: str) -> pd.DataFrame:
    """The rows of a table that the reference checker finds no defect in, with their partition day."""
    frames = []
    for ds, df in data[table].items():
        flags = defects(cfg, data, table, ds, df)
        frames.append(df[flags.sum(axis=1) == 0].assign(ds=ds))
    return pd.concat(frames, ignore_index=True)


def defects(cfg, data, table: str, ds: str, df: pd.DataFrame) -> pd.DataFrame:
    """A reference validator: one boolean column per reason code, written independently of the generator."""
    first = catalog_first_day(data)
    start = day_start_us(ds)
    t = ts_us(df)
    known = df[C.ITEM_ID].map(first)
    flags = {
        reasons.null(C.EVENT_ID): df[C.EVENT_ID].isna(),
        reasons.null(C.USER_ID): df[C.USER_ID].isna(),
        reasons.null(C.TS): df[C.TS].isna(),
        reasons.TS_OUTSIDE_DAY: pd.Series((t < start - cfg.validation.late_days * DAY_US) | (t >= start + DAY_US)),
        reasons.UNKNOWN_ACTION: ~df[C.ACTION].isin(SEARCH_ACTIONS if table == "search_events" else BROWSE_ACTIONS),
        reasons.UNKNOWN_ITEM: df[C.ITEM_ID].notna() & (known.isna() | (known.fillna("9999") > ds)),
    }
    if table == "search_events":
        flags[reasons.null(C.QUERY)] = df[C.QUERY].isna()
        flags[reasons.EMPTY_QUERY] = df[C.QUERY].notna() & df[C.QUERY].fillna("x").str.strip().eq("")
    else:
        flags[reasons.null(C.ITEM_ID)] = df[C.ITEM_ID].isna()
        v = df[C.VALUE].to_numpy(dtype=float)
        bad = ~df[VALUE_NULL].to_numpy() & ~(np.isfinite(v) & (v >= 0) & (v <= cfg.validation.max_value))
        flags[reasons.BAD_VALUE] = pd.Series(bad)
    return pd.DataFrame({k: np.asarray(v, dtype=bool) for k, v in flags.items()})


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    def files(seed: int, name: str) -> dict[str, bytes]:
        cfg = small_config(events=3_000, days=2, seed=seed)
        root = tmp_path / name
        generate.run(cfg, "2026-03-01", out_root=root)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}

    first, again, other = files(1, "a"), files(1, "b"), files(2, "c")
    assert len(first) == 6
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_exact_event_count_and_ground_truth_rows(lake_run):
    cfg, _, result, data = lake_run
    total = sum(len(data[t][ds]) for t in EVENT_TABLES for ds in result["days"])
    assert total == result["events"] == cfg.generate.events
    for table, days in result["tables"].items():
        for ds, truth in days.items():
            assert truth["rows"] == len(data[table][ds])


def test_partitions_per_day_and_contracts(lake_run):
    cfg, root, result, _ = lake_run
    assert result["days"] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    for table, contract in RAW_TABLES.items():
        assert lake.partitions(root, f"raw/{table}") == result["days"]
        for ds in result["days"]:
            part = lake.partition(root, f"raw/{table}", ds)
            assert (part / lake.SUCCESS).exists()
            assert pq.read_schema(lake.data_files(part)[0]).remove_metadata() == contract


def test_popularity_is_skewed(lake_run):
    cfg, _, _, data = lake_run
    engaged = pd.concat([valid_events(cfg, data, t)[C.ITEM_ID].dropna() for t in EVENT_TABLES])
    counts = engaged.value_counts().to_numpy()
    n_items = len(catalog_first_day(data))
    top = counts[: n_items // 10].sum() / counts.sum()
    assert top > 0.3
    # heavy users exist, but nobody dominates the log
    users = valid_events(cfg, data, "browse_events")[C.USER_ID].value_counts(normalize=True)
    assert users.iloc[0] > 5 / cfg.generate.users
    assert users.iloc[0] < 0.05


def test_sessions_short_gaps_within_long_gaps_between(lake_run):
    cfg, _, _, data = lake_run
    ev = pd.concat([valid_events(cfg, data, t)[[C.USER_ID, C.TS]] for t in EVENT_TABLES])
    ev = ev.sort_values([C.USER_ID, C.TS])
    same_user = ev[C.USER_ID].eq(ev[C.USER_ID].shift())
    gaps = ev[C.TS].diff()[same_user].dt.total_seconds()
    assert (gaps < 1800).mean() > 0.6
    assert (gaps > 1800).mean() > 0.1
    assert (gaps[gaps < 1800] > 0).mean() > 0.9  # seconds to minutes, not a burst of identical times


def test_queries_are_words_of_the_engaged_items_text(lake_run):
    cfg, _, _, data = lake_run
    text = {}
    for df in data["catalog"].values():
        for row in df[df[C.TITLE].notna() & ~df[C.ITEM_ID].duplicated()].itertuples(index=False):
            words = " ".join([getattr(row, C.TITLE), getattr(row, C.BRAND), *getattr(row, C.CATEGORIES)])
            text[getattr(row, C.ITEM_ID)] = set(words.lower().split())
    search = valid_events(cfg, data, "search_events")
    engaged = search[search[C.ITEM_ID].notna()]
    assert len(engaged) > 1000
    for query, item in zip(engaged[C.QUERY], engaged[C.ITEM_ID]):
        assert set(query.split()) <= text[item], (query, item)
    no_engagement = search[C.ACTION].eq("none")
    assert 0 < no_engagement.mean() < 0.2
    assert search.loc[no_engagement, C.ITEM_ID].isna().all()
    assert search[C.QUERY].nunique() > 100


def test_impressions_hold_the_engaged_item_among_its_category(lake_run):
    cfg, _, _, data = lake_run
    category = {}
    for df in data["catalog"].values():
        category.update(zip(df[C.ITEM_ID], df[C.CATEGORIES].map(lambda c: c[-1])))
    same_category = []
    for table in EVENT_TABLES:
        ev = valid_events(cfg, data, table)
        assert ev[C.IMPRESSIONS].map(len).eq(cfg.generate.impressions).all()
        assert ev[C.IMPRESSIONS].map(lambda shown: len(set(shown)) == len(shown)).all()
        engaged = ev[ev[C.ITEM_ID].notna()]
        assert all(item in shown for item, shown in zip(engaged[C.ITEM_ID], engaged[C.IMPRESSIONS]))
        for item, shown in zip(engaged[C.ITEM_ID].head(2000), engaged[C.IMPRESSIONS].head(2000)):
            same_category.extend(category[s] == category[item] for s in shown)
    assert np.mean(same_category) > 0.8


def test_browse_values_and_surfaces(lake_run):
    cfg, _, _, data = lake_run
    ev = valid_events(cfg, data, "browse_events")
    rated = ev[C.ACTION].eq("rate")
    assert ev.loc[rated, C.VALUE].between(1, 5).all()
    assert ev.loc[~rated, VALUE_NULL].all()
    assert set(ev[C.SURFACE]) >= {"home", "detail"}
    assert set(ev[C.ACTION]) == set(BROWSE_ACTIONS)


def test_late_events_stay_within_the_window(lake_run):
    cfg, _, result, data = lake_run
    late_days = cfg.validation.late_days
    for table in EVENT_TABLES:
        for i, ds in enumerate(result["days"]):
            truth = result["tables"][table][ds]
            t = ts_us(data[table][ds])
            start = day_start_us(ds)
            late = (t >= start - late_days * DAY_US) & (t < start)
            outside = (t < start - late_days * DAY_US) | (t >= start + DAY_US)
            assert late.sum() == truth["late"]
            assert outside.sum() == truth["malformed"][reasons.TS_OUTSIDE_DAY]
            assert (truth["late"] > 0) == (i > 0)


def test_duplicates_are_exact_copies(lake_run):
    _, _, result, data = lake_run
    for table in EVENT_TABLES:
        for ds in result["days"]:
            df = data[table][ds]
            ids = df[df[C.EVENT_ID].notna()]
            repeated = ids[ids[C.EVENT_ID].duplicated(keep=False)]
            assert ids[C.EVENT_ID].duplicated().sum() == result["tables"][table][ds]["duplicates"]
            key = repeated.astype(str)  # lists and NaN compare equal as text
            assert (key.groupby(C.EVENT_ID).nunique() == 1).all().all()
    assert sum(result["tables"][t][ds]["duplicates"] for t in EVENT_TABLES for ds in result["days"]) > 0


def test_malformed_rows_match_ground_truth_exactly(lake_run):
    cfg, _, result, data = lake_run
    totals: Counter = Counter()
    for table, codes in (("search_events", generate.SEARCH_REASONS), ("browse_events", generate.BROWSE_REASONS)):
        for ds in result["days"]:
            flags = defects(cfg, data, table, ds, data[table][ds])
            assert flags.sum(axis=1).max() <= 1, "a planted row has more than one defect"
            truth = result["tables"][table][ds]["malformed"]
            assert set(truth) == set(codes)
            assert {c: int(flags[c].sum()) for c in codes} == truth
            totals.update({(table, c): n for c, n in truth.items()})
    for key, n in totals.items():
        assert n >= 20, key
    share = sum(totals.values()) / cfg.generate.events
    assert share == pytest.approx(cfg.generate.malformed_share, rel=0.02)


def test_catalog_defects_and_referenced_items_intact(lake_run):
    cfg, _, result, data = lake_run
    for ds, df in data["catalog"].items():
        truth = result["tables"]["catalog"][ds]["malformed"]
        assert df[C.ITEM_ID].duplicated().sum() == truth[reasons.DUPLICATE_ITEM_ID]
        assert df[C.TITLE].isna().sum() == truth[reasons.null(C.TITLE)]
        first_rows = df[~df[C.ITEM_ID].duplicated()]
        assert first_rows[C.TITLE].notna().sum() == len(first_rows) - truth[reasons.null(C.TITLE)]
        dup_ids = df.loc[df[C.ITEM_ID].duplicated(), C.ITEM_ID]
        titles = df[df[C.ITEM_ID].isin(dup_ids)].groupby(C.ITEM_ID)[C.TITLE].nunique()
        assert (titles == 2).all()  # the second row disagrees with the first
        assert df[C.CATEGORIES].map(len).eq(2).all()
        assert df[C.BRAND].notna().all() and df[C.DESCRIPTION].notna().all()
    first = catalog_first_day(data)
    null_title_ids = set().union(*(set(df.loc[df[C.TITLE].isna(), C.ITEM_ID]) for df in data["catalog"].values()))
    assert null_title_ids and not null_title_ids & set(first.index)
    for table in EVENT_TABLES:
        ev = valid_events(cfg, data, table)
        referenced = set(ev[C.ITEM_ID].dropna()) | set(np.concatenate(ev[C.IMPRESSIONS].to_numpy()))
        assert not referenced & null_title_ids
        assert referenced <= set(first.index)
    totals = Counter()
    for day in result["tables"]["catalog"].values():
        totals.update(day["malformed"])
    assert all(n >= 10 for n in totals.values())


def test_new_items_appear_and_get_engaged(lake_run):
    cfg, _, result, data = lake_run
    first = catalog_first_day(data)
    days = result["days"]
    assert (first == days[0]).sum() == cfg.generate.items
    for ds in days[1:]:
        new = set(first.index[first == ds])
        assert len(new) == round(cfg.generate.items * cfg.generate.new_item_share_per_day)
        assert result["tables"]["catalog"][ds]["changed_items"] > 0
        assert set(data["browse_events"][ds][C.ITEM_ID].dropna()) & new
    # a late event only shows items that existed on the day it happened
    for table in EVENT_TABLES:
        ev = valid_events(cfg, data, table)
        happened = ev[C.TS].dt.strftime("%Y-%m-%d")
        late = ev[happened < ev["ds"]]
        assert len(late) > 0
        engaged = late[C.ITEM_ID].dropna()
        assert (engaged.map(first) <= happened[engaged.index]).all()
        shown = late[C.IMPRESSIONS].explode()
        assert (shown.map(first).to_numpy() <= happened[shown.index].to_numpy()).all()


def test_user_interest_drifts(tmp_path):
    def top_category_overlap(drift: float) -> float:
        cfg = small_config(events=20_000, days=2, interest_drift_per_day=drift, malformed_share=0.0)
        result = generate.run(cfg, cfg.generate.start_ds, out_root=tmp_path / str(drift))
        cats = pd.concat(read_day(tmp_path / str(drift), "catalog", ds) for ds in result["days"])
        cat = dict(zip(cats[C.ITEM_ID], cats[C.CATEGORIES].map(lambda c: c[-1])))
        tops = []
        for ds in result["days"]:
            ev = read_day(tmp_path / str(drift), "browse_events", ds)
            ev = ev.assign(cat=ev[C.ITEM_ID].map(cat))
            tops.append(ev.groupby(C.USER_ID)["cat"].agg(lambda s: s.mode().iloc[0]))
        both = pd.concat(tops, axis=1, join="inner")
        return float((both.iloc[:, 0] == both.iloc[:, 1]).mean())

    assert top_category_overlap(1.0) < top_category_overlap(0.0) - 0.2


def test_no_impressions_and_tiny_catalog(tmp_path):
    cfg = small_config(events=2_000, days=2, impressions=0, items=50, categories=40, users=10)
    result = generate.run(cfg, "2026-02-27", out_root=tmp_path)
    assert result["days"] == ["2026-02-27", "2026-02-28"]
    for table in EVENT_TABLES:
        for ds in result["days"]:
            assert read_day(tmp_path, table, ds)[C.IMPRESSIONS].isna().all()
    assert result["events"] == 2_000


def test_cli_generate(tmp_path, capsys, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SYNERGEN__")]:
        monkeypatch.delenv(key)
    assert cli.main(["generate", "--events", "5000", "--days", "2", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"] == 5000
    assert out["days"] == ["2026-01-01", "2026-01-02"]
    for table in RAW_TABLES:
        assert lake.partitions(tmp_path, f"raw/{table}") == out["days"]
    assert re.fullmatch(r"i\d+", read_day(tmp_path, "catalog", out["days"][0])[C.ITEM_ID].iloc[0])
