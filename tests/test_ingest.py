"""Ingest adapters: real MovieLens and Amazon Beauty data, and a tiny Amazon 2014 fixture."""
import datetime as dt
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from jobs import cli, ingest
from schemas import C
from schemas.raw import RAW_TABLES, TS_DERIVED_KEY
from synergen_core.config import Config
from conftest import BEAUTY, MOVIELENS, requires_shared_data

AMAZON2014 = Path(__file__).parent / "fixtures" / "amazon2014"
TABLES = ("catalog", "search_events", "browse_events")

needs_movielens = requires_shared_data(MOVIELENS)
needs_beauty = requires_shared_data(BEAUTY)


def _cfg(root: Path) -> Config:
    cfg = Config()
    cfg.lake.root = root
    return cfg


def _files(root: Path, table: str) -> list[Path]:
    return sorted((root / "raw" / table).glob("ds=*/*.parquet"))


def _read(root: Path, table: str) -> pa.Table:
    """A raw table with its partition day as a string column ``ds``."""
    part = pds.partitioning(pa.schema([(C.DS, pa.string())]), flavor="hive")
    return pds.dataset(root / "raw" / table, format="parquet", partitioning=part).to_table()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_contract(root: Path, derived: bool, tables=TABLES) -> None:
    for table in tables:
        files = _files(root, table)
        assert files, table
        for f in files:
            schema = pq.read_schema(f)
            assert schema.remove_metadata().equals(RAW_TABLES[table]), f
            flagged = (schema.metadata or {}).get(TS_DERIVED_KEY) == b"true"
            assert flagged == (derived and table != "catalog"), f
            assert (f.parent / "_SUCCESS").is_file()


def _assert_partitioned_by_utc_day(t: pa.Table) -> None:
    assert pc.all(pc.equal(pc.strftime(t[C.TS], "%Y-%m-%d"), t[C.DS])).as_py()


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_lake")
    return root, ingest.run(_cfg(root), "movielens", MOVIELENS)


@pytest.fixture(scope="module")
def ml_tables(movielens):
    """The written MovieLens tables, read once (thousands of small files)."""
    return {t: _read(movielens[0], t) for t in TABLES}


@pytest.fixture(scope="module")
def beauty(tmp_path_factory):
    root = tmp_path_factory.mktemp("beauty_lake")
    return root, ingest.run(_cfg(root), "amazon-seq", BEAUTY)


# --- movielens ---------------------------------------------------------------------------------


@needs_movielens
def test_movielens_counts_and_contract(movielens, ml_tables):
    root, res = movielens
    assert res["source_rows"] == {"ratings.csv": 100_836, "tags.csv": 3_683, "movies.csv": 9_742}
    assert res["rows_written"] == {"catalog": 9_742, "search_events": 3_683, "browse_events": 100_836}
    assert res["rows_converted"] == res["rows_written"]
    assert res["rows_written"]["search_events"] + res["rows_written"]["browse_events"] == 104_519
    assert res["ts_derived"] is False
    _assert_contract(root, derived=False)
    browse, search, catalog = (ml_tables[t] for t in ("browse_events", "search_events", "catalog"))
    assert (browse.num_rows, search.num_rows, catalog.num_rows) == (100_836, 3_683, 9_742)
    ids = pc.unique(pa.chunked_array(browse[C.EVENT_ID].chunks + search[C.EVENT_ID].chunks))
    assert len(ids) == 104_519


@needs_movielens
def test_movielens_partitions_by_utc_day_and_catalog_at_first_day(movielens, ml_tables):
    root, res = movielens
    for table in ("search_events", "browse_events"):
        _assert_partitioned_by_utc_day(ml_tables[table])
    assert res["days_written"] == {"catalog": 1, "search_events": 174, "browse_events": 4_110}
    first_event_day = min(pc.min(ml_tables[t][C.DS]).as_py() for t in ("search_events", "browse_events"))
    assert res["catalog_ds"] == first_event_day == "1996-03-29"
    assert [p.parent.name for p in _files(root, "catalog")] == ["ds=1996-03-29"]


def _row(table: pa.Table, event_id: str) -> dict:
    (row,) = table.filter(pc.equal(table[C.EVENT_ID], event_id)).to_pylist()
    return row


@needs_movielens
def test_movielens_rows_map_from_source(ml_tables):
    first = _row(ml_tables["browse_events"], "ml-rating-1")  # 1,1,4.0,964982703
    assert (first[C.USER_ID], first[C.ITEM_ID], first[C.VALUE], first[C.ACTION], first[C.SURFACE]) == (
        "1", "1", 4.0, "rate", "rating")
    assert first[C.TS] == dt.datetime.fromtimestamp(964982703, dt.timezone.utc)
    tag = _row(ml_tables["search_events"], "ml-tag-2")  # 2,60756,Highly quotable,1445714996
    assert (tag[C.USER_ID], tag[C.ITEM_ID], tag[C.QUERY], tag[C.ACTION]) == (
        "2", "60756", "Highly quotable", "tag")
    catalog = {r[C.ITEM_ID]: r for r in ml_tables["catalog"].to_pylist()}
    assert catalog["1"][C.TITLE] == "Toy Story (1995)"
    assert catalog["1"][C.CATEGORIES] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    no_genres = [r for r in catalog.values() if r[C.CATEGORIES] == []]
    assert no_genres and all(r[C.DESCRIPTION] is None and r[C.BRAND] is None for r in catalog.values())
    assert not any(ingest.NO_GENRES in r[C.CATEGORIES] for r in catalog.values())


@needs_movielens
def test_movielens_rerun_is_identical(movielens):
    root, _ = movielens
    before = _digests(root)
    ingest.run(_cfg(root), "movielens", MOVIELENS)
    assert _digests(root) == before
    hidden = list((root / "raw").rglob(".*"))
    assert hidden == []  # staging and replaced partitions are cleaned up


@needs_movielens
def test_ds_restricts_to_one_day(movielens, tmp_path):
    full_root, _ = movielens
    res = ingest.run(_cfg(tmp_path / "a"), "movielens", MOVIELENS, ds="2015-10-24")
    assert res["rows_written"] == {"catalog": 0, "search_events": 9, "browse_events": 34}
    assert res["days_written"] == {"catalog": 0, "search_events": 1, "browse_events": 1}
    for table in ("search_events", "browse_events"):
        (f,) = _files(tmp_path / "a", table)
        assert f.parent.name == "ds=2015-10-24"
        full = full_root / "raw" / table / "ds=2015-10-24" / f.name
        assert f.read_bytes() == full.read_bytes()  # a day alone is written exactly as in a full run
    assert _files(tmp_path / "a", "catalog") == []

    res = ingest.run(_cfg(tmp_path / "b"), "movielens", MOVIELENS, ds="1996-03-29")
    assert res["days_written"] == {"catalog": 1, "search_events": 0, "browse_events": 1}
    assert res["rows_written"]["catalog"] == 9_742


@needs_movielens
def test_cli_ingest(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNERGEN__LAKE__ROOT", str(tmp_path))
    assert cli.main(["ingest", "movielens", "--path", str(MOVIELENS)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_written"] == {"catalog": 9_742, "search_events": 3_683, "browse_events": 100_836}
    assert len(_files(tmp_path, "browse_events")) == 4_110


# --- amazon-seq --------------------------------------------------------------------------------


@needs_beauty
def test_amazon_seq_counts_contract_and_flag(beauty):
    root, res = beauty
    assert res["source_rows"]["sequential_data.txt"] == 198_502
    assert res["rows_written"] == {"catalog": 12_101, "search_events": 0, "browse_events": 198_502}
    assert res["users"] == 22_363
    assert res["titles_from_asin"] == 7
    assert res["ts_derived"] is True
    _assert_contract(root, derived=True, tables=("catalog", "browse_events"))
    assert _files(root, "search_events") == []
    _assert_partitioned_by_utc_day(_read(root, "browse_events"))
    assert res["catalog_ds"] == ingest.SEQ_BASE_DAY.isoformat()
    catalog = {r[C.ITEM_ID]: r for r in _read(root, "catalog").to_pylist()}
    assert len(catalog) == 12_101
    assert catalog["495"][C.TITLE] == "B001DJ2USM"  # empty title in the tsv -> ASIN
    assert catalog["1"][C.TITLE] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce"
    assert all(r[C.TITLE] and r[C.CATEGORIES] == [] for r in catalog.values())


@needs_beauty
def test_amazon_seq_keeps_order_per_user(beauty):
    root, _ = beauty
    t = _read(root, "browse_events").sort_by([(C.USER_ID, "ascending"), (C.TS, "ascending")])
    got: dict[str, list[str]] = {}
    base = dt.datetime.combine(ingest.SEQ_BASE_DAY, dt.time(), dt.timezone.utc)
    for user, item, ts, event_id, action, value in zip(
        *(t[c].to_pylist() for c in (C.USER_ID, C.ITEM_ID, C.TS, C.EVENT_ID, C.ACTION, C.VALUE))
    ):
        seq = got.setdefault(user, [])
        assert ts == base + dt.timedelta(days=len(seq))
        assert event_id == f"az-seq-{user}-{len(seq)}"
        assert (action, value) == ("review", None)
        seq.append(item)
    expected = {}
    for line in (BEAUTY / "sequential_data.txt").read_text().splitlines():
        user, *items = line.split()
        expected[user] = items
    assert got == expected


# --- amazon-json (Amazon 2014 format, tiny synthetic fixture) -----------------------------------


def test_category_query():
    assert ingest.category_query(["Beauty", "Hair Care", "Styling Products",
                                  "Creams, Gels & Lotions for the Hair"]) == (
        "beauty hair care styling products creams gels lotions")
    assert ingest.category_query(["Beauty", "Skin Care", "Face", "Face Care"]) == "beauty skin care face"


def test_amazon_json_fixture(tmp_path):
    res = ingest.run(_cfg(tmp_path), "amazon-json", AMAZON2014)
    assert res["source_rows"] == {"reviews_Tiny_5.json.gz": 8, "meta_Tiny.json.gz": 4}
    assert res["rows_written"] == {"catalog": 4, "search_events": 8, "browse_events": 8}
    assert res["days_written"] == {"catalog": 1, "search_events": 4, "browse_events": 4}
    assert res["catalog_ds"] == "2014-01-01"
    assert (res["titles_from_asin"], res["reviews_without_meta"], res["empty_queries_skipped"]) == (1, 0, 0)
    _assert_contract(tmp_path, derived=False)
    for table in ("search_events", "browse_events"):
        _assert_partitioned_by_utc_day(_read(tmp_path, table))

    search = _read(tmp_path, "search_events").sort_by(C.EVENT_ID).to_pylist()
    got = [(r[C.EVENT_ID], r[C.USER_ID], r[C.DS], r[C.QUERY], r[C.ITEM_ID], r[C.ACTION]) for r in search]
    face, hands = "beauty skin care face", "beauty skin care hands nails hand creams"
    bags, hair = "beauty tools accessories bags cases", "beauty hair care styling products creams gels lotions"
    assert got == [
        ("az-query-Tiny_5-1-1", "U1", "2014-01-01", face, "B00TINY001", "purchase"),
        ("az-query-Tiny_5-1-2", "U1", "2014-01-01", hands, "B00TINY001", "purchase"),
        ("az-query-Tiny_5-2-1", "U2", "2014-01-01", bags, "B00TINY002", "purchase"),
        ("az-query-Tiny_5-4-1", "U3", "2014-01-02", hair, "B00TINY004", "purchase"),
        ("az-query-Tiny_5-5-1", "U2", "2014-01-03", face, "B00TINY001", "purchase"),
        ("az-query-Tiny_5-5-2", "U2", "2014-01-03", hands, "B00TINY001", "purchase"),
        ("az-query-Tiny_5-6-1", "U3", "2014-01-03", bags, "B00TINY002", "purchase"),
        ("az-query-Tiny_5-7-1", "U1", "2014-01-04", hair, "B00TINY004", "purchase"),
    ]
    browse = _read(tmp_path, "browse_events").sort_by(C.EVENT_ID).to_pylist()
    assert [(r[C.USER_ID], r[C.ITEM_ID], r[C.VALUE], r[C.ACTION]) for r in browse] == [
        ("U1", "B00TINY001", 5.0, "review"), ("U2", "B00TINY002", 4.0, "review"),
        ("U1", "B00TINY003", 3.0, "review"), ("U3", "B00TINY004", 5.0, "review"),
        ("U2", "B00TINY001", 2.0, "review"), ("U3", "B00TINY002", 1.0, "review"),
        ("U1", "B00TINY004", 4.0, "review"), ("U3", "B00TINY003", 5.0, "review"),
    ]
    catalog = {r[C.ITEM_ID]: r for r in _read(tmp_path, "catalog").to_pylist()}
    assert catalog["B00TINY001"] == {
        C.ITEM_ID: "B00TINY001", C.TITLE: "Rose Hand Cream",
        C.DESCRIPTION: "A rich cream for dry hands, it's unscented.",
        C.CATEGORIES: ["Beauty", "Skin Care", "Face", "Face Care"], C.BRAND: "Acme", C.DS: "2014-01-01"}
    assert (catalog["B00TINY002"][C.TITLE], catalog["B00TINY002"][C.BRAND]) == ("B00TINY002", None)
    assert catalog["B00TINY003"][C.CATEGORIES] == ["Beauty"]


def test_amazon_json_rerun_is_identical(tmp_path):
    ingest.run(_cfg(tmp_path), "amazon-json", AMAZON2014)
    before = _digests(tmp_path)
    ingest.run(_cfg(tmp_path), "amazon-json", AMAZON2014)
    assert _digests(tmp_path) == before


def test_bad_format_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown ingest format"):
        ingest.run(_cfg(tmp_path), "csv", AMAZON2014)
    with pytest.raises(FileNotFoundError, match="expected a folder"):
        ingest.run(_cfg(tmp_path), "movielens", tmp_path / "nope")
