"""Events -> tokens -> sequences, shared by ``jobs.sessionize`` and ``jobs.splits``.

A search event is a query token followed by the engaged item's token (the query token alone when
nothing was engaged); a browse event is one item token. Both tokens of a search event share its time,
action, surface, session and gap; the item token sits at the event's position + 1 and alone carries
the event's impressions (``shown_items``).
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from schemas import C
from schemas import sequences as S


def is_search() -> Column:
    return F.col(C.KIND) == S.KIND_SEARCH


def token_count() -> Column:
    """Tokens an event contributes (needs ``kind`` and ``item_id``)."""
    return F.when(is_search() & F.col(C.ITEM_ID).isNotNull(), 2).otherwise(1)


def surface() -> Column:
    return F.when(is_search(), S.SURFACE_SEARCH).otherwise(S.SURFACE_REC)


def _token(pos: Column, kind: str, item_index: Column, query_index: Column, shown: Column) -> Column:
    # Field order and types follow schemas.sequences.TOKEN.
    return F.struct(
        pos.cast("int").alias(C.POS),
        F.col(C.TS),
        F.lit(kind).alias(C.TOKEN_TYPE),
        item_index.cast("int").alias(C.ITEM_INDEX),
        query_index.cast("int").alias(C.QUERY_INDEX),
        F.col(C.ACTION),
        F.col(C.SURFACE),
        F.col(C.SESSION).cast("int").alias(C.SESSION),
        F.col(C.GAP_S).cast("double").alias(C.GAP_S),
        shown.cast("array<int>").alias(C.SHOWN_ITEMS),
    )


def event_tokens(events: DataFrame, *keep: str) -> DataFrame:
    """One row per token: ``user_id``, the ``keep`` columns, ``pos`` and the ``token`` struct."""
    none = F.lit(None)
    queries = events.where(is_search()).select(
        C.USER_ID, *keep, F.col(C.POS).cast("int").alias(C.POS),
        _token(F.col(C.POS), S.TOKEN_QUERY, none, F.col(C.QUERY_INDEX), none).alias("token"),
    )
    item_pos = F.col(C.POS) + F.when(is_search(), 1).otherwise(0)
    items = events.where(F.col(C.ITEM_ID).isNotNull()).select(
        C.USER_ID, *keep, item_pos.cast("int").alias(C.POS),
        _token(item_pos, S.TOKEN_ITEM, F.col(C.ITEM_INDEX), none, F.col(C.SHOWN_ITEMS)).alias("token"),
    )
    return queries.unionByName(items)


def sorted_tokens(col: str = "token") -> Column:
    """An aggregate: the group's tokens as an array in position order (pos is the struct's first field)."""
    return F.sort_array(F.collect_list(col))


def update_sequences(state: DataFrame, events: DataFrame, max_len: int) -> DataFrame:
    """The ``sequences`` snapshot: ``state`` with this batch's ``events`` appended, latest tokens kept."""
    totals = events.groupBy(C.USER_ID).agg(
        (F.max(C.EVENT_POS) + 1).cast("long").alias(C.N_EVENTS),
        F.max(F.col(C.POS) + token_count()).cast("long").alias(C.N_TOKENS),
        F.max(C.SESSION).cast("int").alias(C.LAST_SESSION),
        F.max(C.TS).alias("_max_ts"),
    )
    # Only the tokens that can survive the cut are collected (a backfill may bring thousands per user).
    recent = (event_tokens(events).join(totals.select(C.USER_ID, C.N_TOKENS), C.USER_ID)
              .where(F.col(C.POS) >= F.col(C.N_TOKENS) - max_len)
              .groupBy(C.USER_ID).agg(sorted_tokens().alias("_new")))
    old = state.select(C.USER_ID, *[F.col(c).alias(f"_old_{c}") for c in state.columns if c != C.USER_ID])
    both = totals.join(recent, C.USER_ID, "left").join(old, C.USER_ID, "full")
    touched = F.col(C.N_EVENTS).isNotNull()
    joined = F.concat(F.col(f"_old_{C.TOKENS}"), F.col("_new"))
    kept = F.slice(joined, F.greatest(F.size(joined) - max_len + 1, F.lit(1)), max_len)
    tokens = (F.when(~touched, F.col(f"_old_{C.TOKENS}"))
              .when(F.col(f"_old_{C.TOKENS}").isNull(), F.col("_new"))
              .otherwise(kept))
    pick = lambda c: F.when(touched, F.col(c)).otherwise(F.col(f"_old_{c}"))  # noqa: E731
    return both.select(
        C.USER_ID, pick(C.N_EVENTS).alias(C.N_EVENTS), pick(C.N_TOKENS).alias(C.N_TOKENS),
        pick(C.LAST_SESSION).alias(C.LAST_SESSION),
        F.greatest(F.col("_max_ts"), F.col(f"_old_{C.WATERMARK}")).alias(C.WATERMARK),
        tokens.alias(C.TOKENS),
    )


def update_consumed(state: DataFrame, events: DataFrame) -> DataFrame:
    """The ``consumed`` snapshot: ``state`` (user_id, consumed) with the item indices of ``events`` added.

    Only users with a new engagement are merged; the others keep their row as it is, so the snapshot
    is joined, never exploded.
    """
    new = (events.where(F.col(C.ITEM_INDEX).isNotNull())
           .groupBy(C.USER_ID).agg(F.collect_set(F.col(C.ITEM_INDEX).cast("int")).alias("_new")))
    both = state.select(C.USER_ID, F.col(C.CONSUMED).alias("_old")).join(new, C.USER_ID, "full")
    merged = F.array_sort(F.array_union(F.coalesce(F.col("_old"), F.array().cast("array<int>")), F.col("_new")))
    return both.select(C.USER_ID, F.when(F.col("_new").isNull(), F.col("_old")).otherwise(merged).alias(C.CONSUMED))


def snapshot_tokens(sequences: DataFrame) -> DataFrame:
    """The tokens kept in a ``sequences`` snapshot, one row each: ``user_id``, ``pos``, ``token``."""
    return (sequences.select(C.USER_ID, F.explode(C.TOKENS).alias("token"))
            .select(C.USER_ID, F.col(f"token.{C.POS}").alias(C.POS), "token"))
