"""Ingest adapters: real public logs into the raw contract (``schemas.raw``) of the lake.

``run(cfg, fmt, path, ds)`` reads a source folder with one adapter, casts its rows to exactly
``CATALOG``, ``SEARCH_EVENTS`` and ``BROWSE_EVENTS``, and writes them under
``<lake.root>/raw/<table>/ds=YYYY-MM-DD/part-00000.parquet``:

* Events are partitioned by the UTC day of ``ts``.
* The catalog is written as ONE partition, at the earliest event day. The contract reads the catalog
  as of a day as the latest row per item over all partitions up to that day, so this single partition
  makes every item known on every event day; the sources carry no item history to spread out.
* With ``ds``, only that day's partitions are written: its events, and the catalog only when ``ds`` is
  the earliest event day (a later day then relies on a catalog already in the lake).
* Every partition is first written into one hidden staging folder, then each is published with
  ``synergen_core.lake.publish`` (catalog first), so a failed run publishes nothing half-written.
* Event ids are derived from positions in the source files, so a rerun writes identical files.
* Every source row becomes an output row; the returned dict counts rows read, converted and written.

Formats (``path`` is a folder):

``movielens``
    ``ratings.csv`` -> browse events (action ``rate``, value = rating, surface ``rating``,
    id ``ml-rating-<n>``); ``tags.csv`` -> search events (query = the tag as typed, item = the movie,
    action ``tag``, id ``ml-tag-<n>``), the HyperSaR protocol; ``movies.csv`` -> catalog (categories =
    genres split on ``|``, ``(no genres listed)`` -> empty list). ``<n>`` is the 1-based data row.
``amazon-seq``
    The P5 split: ``sequential_data.txt`` (``user item1 item2 ...`` in time order) -> browse events
    (action ``review``, value null, surface ``review``, id ``az-seq-<user>-<k>``). It has no times, so
    the k-th event (k from 0) of every user gets midnight UTC of ``SEQ_BASE_DAY + k days``: order per
    user is kept, times are not real, and every event partition carries ``TS_DERIVED_KEY: b"true"``
    in its Parquet schema metadata. Catalog: every item of the sequences and of
    ``items_with_titles.tsv`` (id = P5 item id); a missing title falls back to the item's ASIN
    (``datamaps.json`` ``id2item``, else the tsv's asin column). Source rows of the sequences file
    are interactions (item tokens), not lines.
``amazon-json``
    Amazon 2014 (McAuley et al.) ``reviews_<Cat>[_5].json.gz`` (strict JSON lines) and
    ``meta_<Cat>.json.gz`` (Python dict literals). Each review -> a browse event (action ``review``,
    value = overall, surface ``review``, id ``az-review-<file>-<n>``). Search events follow the product
    search protocol (Van Gysel et al. 2016; Ai et al. 2017): for every category path of the reviewed
    item with more than one level, one query made of the path's words (``category_query``), action
    ``purchase``, ts = unixReviewTime, id ``az-query-<file>-<n>-<path number>``. Catalog from meta:
    title (missing -> asin), description, brand, categories = the first category path.
"""
from __future__ import annotations

import ast
import datetime as dt
import gzip
import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from schemas import C
from schemas.raw import BROWSE_EVENTS, CATALOG, RAW_TABLES, SEARCH_EVENTS, TS_DERIVED_KEY, TS_TYPE
from synergen_core import lake
from synergen_core.config import Config, parse_ds

SEARCH = "search_events"
BROWSE = "browse_events"
CATALOG_TABLE = "catalog"
PUBLISH_ORDER = (CATALOG_TABLE, SEARCH, BROWSE)  # items become known before events refer to them
PART_FILE = "part-00000.parquet"

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
EPOCH = dt.date(1970, 1, 1)
SEQ_BASE_DAY = dt.date(2000, 1, 1)  # amazon-seq: day of every user's first event
NO_GENRES = "(no genres listed)"

# Lucene's classic English stop set: small, and standard in product-search query construction.
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)
_WORD = re.compile(r"[^\W_]+")  # runs of letters or digits, in any script


@dataclass
class Converted:
    """One adapter's output: contract tables plus what was read."""

    tables: dict[str, pa.Table]
    source_rows: dict[str, int]
    ts_derived: bool = False
    notes: dict[str, int] = field(default_factory=dict)  # adapter-specific counts for the result


# ---------------------------------------------------------------------------------------------
# entry point and shared writer


def run(cfg: Config, fmt: str, path: str | Path, ds: str | None = None) -> dict:
    """Convert the source folder ``path`` of format ``fmt`` and write it into ``cfg.lake.root``."""
    if fmt not in ADAPTERS:
        raise ValueError(f"unknown ingest format {fmt!r}: expected one of {sorted(ADAPTERS)}")
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: expected a folder holding the {fmt} source files")
    if ds is not None:
        ds = parse_ds(ds).isoformat()
    conv = ADAPTERS[fmt](src)
    written = write_raw(Path(cfg.lake.root), conv.tables, ts_derived=conv.ts_derived, ds=ds)
    return {
        "format": fmt,
        "path": str(src),
        "ds": ds,
        "source_rows": conv.source_rows,
        "source_rows_total": sum(conv.source_rows.values()),
        "rows_converted": {t: conv.tables[t].num_rows for t in PUBLISH_ORDER},
        **written,
        "ts_derived": conv.ts_derived,
        **conv.notes,
    }


def write_raw(lake_root: Path, tables: dict[str, pa.Table], ts_derived: bool = False,
              ds: str | None = None) -> dict:
    """Partition events by UTC day, put the catalog at the earliest event day, publish atomically."""
    for name, table in tables.items():
        if not table.schema.equals(RAW_TABLES[name]):
            raise ValueError(f"{name}: schema differs from the raw contract:\n{table.schema}")
    days = {t: _event_days(tables[t], t) for t in (SEARCH, BROWSE)}
    firsts = [int(d.min()) for d in days.values() if len(d)]
    if not firsts:
        raise ValueError("the source holds no events: nothing to partition")
    catalog_day = min(firsts)
    parts = {CATALOG_TABLE: [(catalog_day, tables[CATALOG_TABLE])]}
    for t in (SEARCH, BROWSE):
        parts[t] = _split_by_day(tables[t], days[t])
    if ds is not None:
        want = (dt.date.fromisoformat(ds) - EPOCH).days
        parts = {t: [(d, tab) for d, tab in p if d == want] for t, p in parts.items()}
    event_meta = {TS_DERIVED_KEY: b"true"} if ts_derived else None

    layout = lake.Layout(Path(lake_root))
    stage = layout.root / lake.RAW / f".ingest-{uuid.uuid4().hex[:8]}"
    try:
        staged = []
        for t in PUBLISH_ORDER:
            for day, table in parts[t]:
                folder = lake.partition(stage, t, _iso(day))
                folder.mkdir(parents=True)
                if event_meta and t != CATALOG_TABLE:
                    table = table.replace_schema_metadata(event_meta)
                pq.write_table(table, folder / PART_FILE, compression="zstd")
                staged.append((t, day, folder))
        for t, day, folder in staged:
            final = layout.part(layout.raw(t), _iso(day))
            final.parent.mkdir(parents=True, exist_ok=True)
            lake.publish(folder, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {
        "catalog_ds": _iso(catalog_day),
        "rows_written": {t: sum(tab.num_rows for _, tab in parts[t]) for t in PUBLISH_ORDER},
        "days_written": {t: len(parts[t]) for t in PUBLISH_ORDER},
    }


def _event_days(table: pa.Table, name: str) -> np.ndarray:
    ts = table[C.TS]
    if ts.null_count:
        raise ValueError(f"{name}: {ts.null_count} rows without {C.TS} cannot be placed in a day")
    return ts.cast(pa.int64()).to_numpy() // US_PER_DAY


def _split_by_day(table: pa.Table, days: np.ndarray) -> list[tuple[int, pa.Table]]:
    # A stable sort keeps source order within each day, which keeps reruns byte-identical.
    order = np.argsort(days, kind="stable")
    table, days = table.take(order), days[order]
    uniq, starts = np.unique(days, return_index=True)
    ends = np.append(starts[1:], len(days))
    return [(int(d), table.slice(s, e - s)) for d, s, e in zip(uniq, starts, ends)]


def _iso(day: int) -> str:
    return (EPOCH + dt.timedelta(days=day)).isoformat()


def _conform(schema: pa.Schema, n: int, columns: dict[str, object]) -> pa.Table:
    """A table with exactly ``schema``: given columns cast, the others all null."""
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise KeyError(f"columns not in the contract: {sorted(unknown)}")
    arrays = []
    for f in schema:
        v = columns.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v.cast(f.type))
        else:
            arrays.append(pa.array(v, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _ts_from_seconds(seconds) -> pa.Array:
    return pa.array(np.asarray(seconds, dtype=np.int64) * US_PER_SECOND, pa.int64()).cast(TS_TYPE)


def _csv(path: Path, types: dict[str, pa.DataType], delimiter: str = ",", quote: bool = True) -> pa.Table:
    # Explicit string types keep ids and text as typed ("007", "NA" stay strings, never null).
    return pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)),
    )


def _not_null(table: pa.Table, path: Path, columns: Sequence[str]) -> None:
    for col in columns:
        if table[col].null_count:
            raise ValueError(f"{path}: {table[col].null_count} rows with an empty {col!r}")


# ---------------------------------------------------------------------------------------------
# movielens


def read_movielens(folder: Path) -> Converted:
    """MovieLens ``ratings.csv``, ``tags.csv``, ``movies.csv`` -> browse, search, catalog."""
    s, i64, f64 = pa.string(), pa.int64(), pa.float64()
    ratings = _csv(folder / "ratings.csv", {"userId": s, "movieId": s, "rating": f64, "timestamp": i64})
    tags = _csv(folder / "tags.csv", {"userId": s, "movieId": s, "tag": s, "timestamp": i64})
    movies = _csv(folder / "movies.csv", {"movieId": s, "title": s, "genres": s})
    _not_null(ratings, folder / "ratings.csv", ["timestamp"])
    _not_null(tags, folder / "tags.csv", ["timestamp"])

    n = ratings.num_rows
    browse = _conform(BROWSE_EVENTS, n, {
        C.EVENT_ID: [f"ml-rating-{k}" for k in range(1, n + 1)],
        C.USER_ID: ratings["userId"],
        C.TS: _ts_from_seconds(ratings["timestamp"]),
        C.ITEM_ID: ratings["movieId"],
        C.ACTION: pa.repeat("rate", n),
        C.VALUE: ratings["rating"],
        C.SURFACE: pa.repeat("rating", n),
    })
    n = tags.num_rows
    search = _conform(SEARCH_EVENTS, n, {
        C.EVENT_ID: [f"ml-tag-{k}" for k in range(1, n + 1)],
        C.USER_ID: tags["userId"],
        C.TS: _ts_from_seconds(tags["timestamp"]),
        C.QUERY: tags["tag"],
        C.ITEM_ID: tags["movieId"],
        C.ACTION: pa.repeat("tag", n),
    })
    genres = [[] if g in (None, "", NO_GENRES) else g.split("|") for g in movies["genres"].to_pylist()]
    catalog = _conform(CATALOG, movies.num_rows, {
        C.ITEM_ID: movies["movieId"],
        C.TITLE: movies["title"],
        C.CATEGORIES: genres,
    })
    return Converted(
        tables={CATALOG_TABLE: catalog, SEARCH: search, BROWSE: browse},
        source_rows={"ratings.csv": ratings.num_rows, "tags.csv": tags.num_rows,
                     "movies.csv": movies.num_rows},
    )


# ---------------------------------------------------------------------------------------------
# amazon-seq (P5 / S3-Rec / TIGER split)


def read_amazon_seq(folder: Path) -> Converted:
    """P5 ``sequential_data.txt`` + ``items_with_titles.tsv`` (+ ``datamaps.json``) -> browse, catalog."""
    users, items, steps = [], [], []
    n_users = 0
    for line in (folder / "sequential_data.txt").read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if not tokens:
            continue
        user, seq = tokens[0], tokens[1:]
        n_users += 1
        users += [user] * len(seq)
        items += seq
        steps += range(len(seq))
    n = len(items)
    base_us = (SEQ_BASE_DAY - EPOCH).days * US_PER_DAY
    ts = pa.array(base_us + np.asarray(steps, dtype=np.int64) * US_PER_DAY, pa.int64()).cast(TS_TYPE)
    browse = _conform(BROWSE_EVENTS, n, {
        C.EVENT_ID: [f"az-seq-{u}-{k}" for u, k in zip(users, steps)],
        C.USER_ID: users,
        C.TS: ts,
        C.ITEM_ID: items,
        C.ACTION: pa.repeat("review", n),
        C.SURFACE: pa.repeat("review", n),
    })

    tsv_path = folder / "items_with_titles.tsv"
    s = pa.string()
    tsv = _csv(tsv_path, {"p5_item_id": s, "asin": s, "title": s}, delimiter="\t", quote=False)
    tsv_ids = tsv["p5_item_id"].to_pylist()
    title_of = {i: t for i, t in zip(tsv_ids, tsv["title"].to_pylist()) if t and t.strip()}
    # tsv rows first (their order), then items only the sequences know, in order of first use
    item_ids = list(dict.fromkeys(tsv_ids + items))
    missing = [i for i in item_ids if i not in title_of]
    asin_of = _asins(folder, tsv) if missing else {}
    unresolved = [i for i in missing if i not in asin_of]
    if unresolved:
        raise ValueError(f"{folder}: no title and no ASIN for items {unresolved[:10]}")
    catalog = _conform(CATALOG, len(item_ids), {
        C.ITEM_ID: item_ids,
        C.TITLE: [title_of.get(i) or asin_of[i] for i in item_ids],
        C.CATEGORIES: [[] for _ in item_ids],
    })
    return Converted(
        tables={CATALOG_TABLE: catalog, SEARCH: _conform(SEARCH_EVENTS, 0, {}), BROWSE: browse},
        source_rows={"sequential_data.txt": n, "items_with_titles.tsv": tsv.num_rows},
        ts_derived=True,
        notes={"users": n_users, "titles_from_asin": len(missing)},
    )


def _asins(folder: Path, tsv: pa.Table) -> dict[str, str]:
    """P5 item id -> ASIN: ``datamaps.json`` ``id2item``, the tsv's asin column where that lacks one."""
    asin_of = {i: a for i, a in zip(tsv["p5_item_id"].to_pylist(), tsv["asin"].to_pylist()) if a}
    datamaps = folder / "datamaps.json"
    if datamaps.is_file():
        asin_of.update(json.loads(datamaps.read_text(encoding="utf-8"))["id2item"])
    return asin_of


# ---------------------------------------------------------------------------------------------
# amazon-json (raw Amazon 2014 files)

_REVIEW_FIELDS = pa.schema([
    ("reviewerID", pa.string()), ("asin", pa.string()),
    ("overall", pa.float64()), ("unixReviewTime", pa.int64()),
])


def category_query(path: Sequence[str]) -> str:
    """A category path as a query: lower-cased words, stop words and repeats removed, order kept."""
    words = _WORD.findall(" ".join(path).lower())
    return " ".join(dict.fromkeys(w for w in words if w not in STOP_WORDS))


def read_amazon_json(folder: Path) -> Converted:
    """Amazon 2014 ``reviews_*.json.gz`` + ``meta_*.json.gz`` -> browse, search, catalog."""
    review_files = sorted(folder.glob("reviews_*.json.gz"))
    meta_files = sorted(folder.glob("meta_*.json.gz"))
    if not review_files or not meta_files:
        raise FileNotFoundError(f"{folder}: expected reviews_<Cat>_5.json.gz and meta_<Cat>.json.gz files")
    source_rows: dict[str, int] = {}
    metas = []
    for f in meta_files:
        rows = _read_meta(f)
        source_rows[f.name] = len(rows)
        metas += rows
    catalog, titles_from_asin = _meta_catalog(metas)

    paths_of: dict[str, list] = {}
    for m in metas:
        paths_of.setdefault(m["asin"], m.get("categories") or [])
    # Single-level paths (just the department) say nothing about the item: no query.
    queries_of = {
        asin: [(j, category_query(p)) for j, p in enumerate(paths, 1) if len(p) > 1]
        for asin, paths in paths_of.items()
    }

    browse_parts, search_parts = [], []
    without_meta = empty_queries = 0
    for f in review_files:
        reviews = pajson.read_json(f, parse_options=pajson.ParseOptions(
            explicit_schema=_REVIEW_FIELDS, unexpected_field_behavior="ignore"))
        _not_null(reviews, f, ["unixReviewTime"])
        source_rows[f.name] = reviews.num_rows
        tag = f.name[len("reviews_"):-len(".json.gz")]
        browse_parts.append(_review_events(reviews, tag))
        search, empty = _query_events(reviews, tag, queries_of)
        search_parts.append(search)
        empty_queries += empty
        without_meta += sum(a not in paths_of for a in reviews["asin"].to_pylist())
    return Converted(
        tables={CATALOG_TABLE: catalog, SEARCH: pa.concat_tables(search_parts),
                BROWSE: pa.concat_tables(browse_parts)},
        source_rows=source_rows,
        notes={"titles_from_asin": titles_from_asin, "reviews_without_meta": without_meta,
               "empty_queries_skipped": empty_queries},
    )


def _read_meta(path: Path) -> list[dict]:
    # Amazon 2014 meta lines are Python dict literals (single quotes), which json cannot parse.
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [ast.literal_eval(line) for line in fh if line.strip()]


def _meta_catalog(metas: list[dict]) -> tuple[pa.Table, int]:
    ids, titles, descriptions, brands, categories = [], [], [], [], []
    from_asin = 0
    for m in metas:
        asin = str(m["asin"])
        title = m.get("title")
        if not (isinstance(title, str) and title.strip()):
            title, from_asin = asin, from_asin + 1
        paths = m.get("categories") or [[]]
        ids.append(asin)
        titles.append(title)
        descriptions.append(_text(m.get("description")))
        brands.append(_text(m.get("brand")))
        categories.append([str(c) for c in paths[0]])
    table = _conform(CATALOG, len(ids), {
        C.ITEM_ID: ids, C.TITLE: titles, C.DESCRIPTION: descriptions,
        C.BRAND: brands, C.CATEGORIES: categories,
    })
    return table, from_asin


def _text(v) -> str | None:
    return None if v is None else str(v)


def _review_events(reviews: pa.Table, tag: str) -> pa.Table:
    n = reviews.num_rows
    return _conform(BROWSE_EVENTS, n, {
        C.EVENT_ID: [f"az-review-{tag}-{k}" for k in range(1, n + 1)],
        C.USER_ID: reviews["reviewerID"],
        C.TS: _ts_from_seconds(reviews["unixReviewTime"]),
        C.ITEM_ID: reviews["asin"],
        C.ACTION: pa.repeat("review", n),
        C.VALUE: reviews["overall"],
        C.SURFACE: pa.repeat("review", n),
    })


def _query_events(reviews: pa.Table, tag: str,
                  queries_of: dict[str, list[tuple[int, str]]]) -> tuple[pa.Table, int]:
    """Search events of the reviews, and how many paths gave no query (nothing but stop words)."""
    ids, users, seconds, queries, items = [], [], [], [], []
    empty = 0
    rows = zip(reviews["reviewerID"].to_pylist(), reviews["asin"].to_pylist(),
               reviews["unixReviewTime"].to_pylist())
    for k, (user, asin, t) in enumerate(rows, 1):
        for j, q in queries_of.get(asin, ()):
            if not q:
                empty += 1
                continue
            ids.append(f"az-query-{tag}-{k}-{j}")
            users.append(user)
            seconds.append(t)
            queries.append(q)
            items.append(asin)
    n = len(ids)
    table = _conform(SEARCH_EVENTS, n, {
        C.EVENT_ID: ids, C.USER_ID: users, C.TS: _ts_from_seconds(seconds),
        C.QUERY: queries, C.ITEM_ID: items, C.ACTION: pa.repeat("purchase", n),
    })
    return table, empty


ADAPTERS: dict[str, Callable[[Path], Converted]] = {
    "movielens": read_movielens,
    "amazon-seq": read_amazon_seq,
    "amazon-json": read_amazon_json,
}
