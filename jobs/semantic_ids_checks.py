"""What stage 3c (``jobs.semantic_ids``) measures and checks on the day's ID table, as Spark aggregates.

* ``id_metrics``: the figures of ``synergen_core.rqvae.id_metrics`` (per-level utilization and perplexity,
  collisions before and after resolution, unique-ID share, prefix headroom, ID changes against yesterday)
  from group counts and sums on the table; what reaches the driver is bounded by the codebooks' sizes. The
  prefix-sharing similarity needs vectors, so it is measured on the training sample (every item of a
  catalog up to ``train_sample``, so the same figure as in process there).
* ``validate_ids``: the Great Expectations suite (``schemas.semantic_ids``) on a Spark frame: the day's
  vocabulary full outer joined with the IDs, one column per code, each code checked against its own
  level's size.
"""
from __future__ import annotations

import math

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.semantic_ids_spark import view_columns
from schemas import C
from schemas import semantic_ids as sid_schema
from synergen_core.config import SemanticIdConfig

VIEWS = (("search", C.SEARCH_CODES), ("rec", C.REC_CODES))


class SemanticIdsInvalid(RuntimeError):
    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _pick(col: str, positions: list[int]):
    return F.array(*[F.col(col)[j] for j in positions])


def _groups(df: DataFrame, key) -> tuple[int, int, int]:
    """(distinct values of ``key``, rows whose value another row also has, rows of the largest group)."""
    row = df.groupBy(key.alias("_k")).count().agg(
        F.count("*"), F.sum(F.when(F.col("count") > 1, F.col("count"))), F.max("count")).first()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


def _levels(t: DataFrame, cfg: SemanticIdConfig, n: int) -> dict:
    from synergen_core.rqvae_capacity import level_sizes

    # collected: one row per (level, code) used, at most the sum of the codebooks' sizes
    rows = t.select(F.posexplode(C.RAW_CODES).alias("_j", "_c")).groupBy("_j", "_c").count().collect()
    names = ([f"shared_{j}" for j in range(cfg.shared_levels)] + [f"text_{j}" for j in range(cfg.specific_levels)]
             + [f"collab_{j}" for j in range(cfg.specific_levels)])
    sizes = level_sizes(cfg)
    counts = [np.zeros(size, np.int64) for size in sizes]
    for r in rows:
        j, c = int(r["_j"]), int(r["_c"])
        if c >= len(counts[j]):
            counts[j] = np.concatenate([counts[j], np.zeros(c + 1 - len(counts[j]), np.int64)])
        counts[j][c] += int(r["count"])
    out = {}
    for name, cnt in zip(names, counts):
        p = cnt / max(n, 1)
        nz = p[p > 0]
        out[name] = {"utilization": float((p > 0).mean()), "perplexity": float(math.exp(-(nz * np.log(nz)).sum()))}
    return out


def id_metrics(t: DataFrame, prev: DataFrame | None, cfg: SemanticIdConfig, recon: dict, sample,
               pairs: int = 20_000) -> dict:
    """The day's figures (``rqvae.id_metrics``'s keys) of table ``t``; ``prev``: yesterday's table when its
    widths are today's (then ``old_items``, ``id_change_share`` and ``either_id_change_share``), ``recon``:
    ``recon_figures`` of the model, ``sample``: the training sample (``semantic_ids_spark.Sample``)."""
    from synergen_core.rqvae import _prefix_similarity

    L = len(view_columns(cfg)[0])
    raw_views = [_pick(C.RAW_CODES, cols) for cols in view_columns(cfg)]
    df = t if prev is None else t.join(prev.select(
        C.ITEM_INDEX, *[F.col(c).alias(f"_p{c}") for c in (C.SEARCH_CODES, C.REC_CODES, C.RAW_CODES)]),
        C.ITEM_INDEX, "left")
    long = lambda cond: F.sum(cond.cast("long"))  # noqa: E731
    aggs = [F.count("*").alias("n")]
    for (view, col), raw_v in zip(VIEWS, raw_views):
        aggs += [long(F.slice(col, 1, L) != raw_v).alias(f"{view}_moved"),
                 F.max(F.element_at(col, -1)).alias(f"{view}_last")]
    if prev is not None:
        found = F.col(f"_p{C.SEARCH_CODES}").isNotNull()
        changed = [found & (F.col(f"_p{col}") != F.col(col)) for _, col in VIEWS]
        aggs += [long(found).alias("old"), long(changed[0]).alias("search_changed"),
                 long(changed[1]).alias("rec_changed"), long(changed[0] | changed[1]).alias("either_changed"),
                 long(found & (F.col(f"_p{C.RAW_CODES}") != F.col(C.RAW_CODES))).alias("raw_changed")]
    totals = df.agg(*aggs).first().asDict()
    n = int(totals["n"])
    first = _sample_first_codes(t, sample)
    rng = np.random.default_rng(cfg.seed)
    out = {"n_items": n, "recon_text": recon["text"], "recon_collab": recon["collab"], "levels": _levels(t, cfg, n)}
    for v, ((view, col), raw_v) in enumerate(zip(VIEWS, raw_views)):
        before, after = _groups(t, raw_v)[1], _groups(t, F.col(col))
        stats = {
            "collision_rate_before": before / n if n else 0.0,
            "collision_rate_after": after[1] / n if n else 0.0,
            "unique_id_share": after[0] / max(n, 1),
            "moved_by_resolution": float(totals[f"{view}_moved"] / n) if n else 0.0,
            "max_prefix_group": _groups(t, F.slice(raw_v, 1, L - 1))[2],
            "max_extra_code": int(totals[f"{view}_last"]) if n and cfg.collision == "extra_code" else None,
            "prefix_similarity": _prefix_similarity(
                first[:, v], [("text", sample.text), ("collab", sample.collab)], pairs, rng) if len(first) > 1 else {},
        }
        if prev is not None:
            old = int(totals["old"])
            stats["old_items"] = old
            stats["id_change_share"] = float(totals[f"{view}_changed"] / old) if old else 0.0
        out[view] = stats
    if prev is not None:
        old = int(totals["old"])
        out["either_id_change_share"] = float(totals["either_changed"] / old) if old else 0.0
        out["raw_codes_changed_share"] = float(totals["raw_changed"] / old) if old else None
    return out


def _sample_first_codes(t: DataFrame, sample) -> np.ndarray:
    """[m, 2] first code of the search and the rec ID of the sample's items, in the sample's order.

    Collected: the training sample's rows only (``train_sample`` bounds them)."""
    index = sample.index
    got = (t.join(sample.chosen, C.ITEM_INDEX, "left_semi")
           .select(C.ITEM_INDEX, F.col(C.SEARCH_CODES)[0].alias("s"), F.col(C.REC_CODES)[0].alias("r"))
           .toArrow().sort_by(C.ITEM_INDEX))
    if not np.array_equal(got[C.ITEM_INDEX].to_numpy().astype(np.int64), np.asarray(index, np.int64)):
        raise RuntimeError("the training sample's items are missing from the day's IDs")
    return np.stack([got["s"].to_numpy(), got["r"].to_numpy()], 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# validation


def view_sizes(cfg: SemanticIdConfig) -> dict[str, list[int]]:
    """Codes of each level, per position of the search, rec and raw codes (without the extra code)."""
    from synergen_core.rqvae_capacity import level_sizes

    sizes = level_sizes(cfg)
    search, rec = ([sizes[j] for j in cols] for cols in view_columns(cfg))
    return {"search": search, "rec": rec, "raw": sizes}


def check_frame(ids: DataFrame, vocab: DataFrame, cfg: SemanticIdConfig) -> DataFrame:
    """The frame the suite reads: vocabulary (full outer join) IDs, one column per code, computed checks."""
    extra = cfg.collision == "extra_code"
    cols = [C.ITEM_INDEX, F.lit(True).alias("_ids")]
    for view, sizes in view_sizes(cfg).items():
        col = {"search": C.SEARCH_CODES, "rec": C.REC_CODES, "raw": C.RAW_CODES}[view]
        cols.append(F.coalesce(F.size(col), F.lit(0)).alias(sid_schema.length_column(view)))
        for j in range(len(sizes) + (extra and view != "raw")):
            cols.append(F.try_element_at(col, F.lit(j + 1)).alias(sid_schema.code_column(view, j)))
    frame = vocab.select(C.ITEM_INDEX, F.lit(True).alias("_vocab")).join(ids.select(*cols), C.ITEM_INDEX, "full")
    return frame.select(
        "*", F.when(F.col("_vocab").isNotNull(), F.col("_ids").isNotNull()).alias(sid_schema.HAS_IDS),
        F.when(F.col("_ids").isNotNull(), F.col("_vocab").isNotNull()).alias(sid_schema.IN_VOCAB),
    ).drop("_vocab", "_ids")


def validate_ids(ids: DataFrame, vocab: DataFrame, cfg: SemanticIdConfig) -> dict:
    """Run the semantic-IDs suite on ``ids`` against the vocabulary's ``item_index``; returns its summary,
    or raises ``SemanticIdsInvalid`` naming each failure. ``cfg``: the assigning model's (its level sizes)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = check_frame(ids, vocab, cfg).cache()  # every expectation reads it
    try:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch_def = (ctx.data_sources.add_spark("semantic_ids", persist=False).add_dataframe_asset("ids")
                     .add_batch_definition_whole_dataframe("day"))
        suite = ctx.suites.add(sid_schema.suite(view_sizes(cfg), cfg.collision == "extra_code"))
        result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        rows = frame.count()
    finally:
        frame.unpersist()
    failed = []
    for r in result.results:
        if not r.success:
            kw = r.expectation_config.kwargs
            failed.append({"check": r.expectation_config.meta.get("check"),
                           "expectation": r.expectation_config.type,
                           "columns": kw.get("column_list") or [kw.get("column")],
                           "unexpected_count": r.result.get("unexpected_count")})
    summary = {"success": bool(result.success), "rows": int(rows), "expectations": len(result.results),
               "failed": failed}
    if not result.success:
        raise SemanticIdsInvalid(
            "semantic IDs failed validation: " + "; ".join(
                f"{f['check']} ({', '.join(map(str, f['columns']))}: {f['unexpected_count']} rows)" for f in failed),
            summary)
    return summary
