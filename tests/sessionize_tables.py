"""Shared by the sessionize tests: reading a layer's tables back, comparing two layers, writing input days."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config

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



def assert_no_leakage(train_tokens: pl.DataFrame, evals: pl.DataFrame) -> None:
    """Every training token precedes every evaluation token (query + item) of its user."""
    first_eval = evals.with_columns(
        (pl.col(C.TARGET_POS) - pl.col(C.QUERY_INDEX).is_not_null().cast(pl.Int32)).alias("first")
    ).group_by(C.USER_ID).agg(pl.col("first").min())
    last_train = train_tokens.group_by(C.USER_ID).agg(pl.col(C.POS).max().alias("last"))
    both = last_train.join(first_eval, on=C.USER_ID)
    assert (both["last"] < both["first"]).all(), both.filter(pl.col("last") >= pl.col("first"))

