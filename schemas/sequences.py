"""Contracts of the sessionize stage's lake tables (written by ``jobs.sessionize`` and ``jobs.splits``).

Layout: ``<lake>/<sessionize.output>/<table>/ds=YYYY-MM-DD/*.parquet`` (+ ``_SUCCESS``), default
output layer ``sessionized``. ``ds`` is in the path, not in the files.

* ``events``: the full event history, one partition per day the events ARRIVED in (the input
  partition), never rewritten by a later day. Search and browse events in one stream, deduplicated,
  with their place in the user's history (``event_pos``, ``pos``, ``session``, ``gap_s``).
* ``sequences``: a full snapshot per day: every user's latest ``sessionize.max_seq_len`` tokens plus
  the counters the next day continues from. The snapshot of ``ds`` is the state after ``ds``.
* ``item_vocab`` / ``query_vocab``: full snapshot per day. Indices start at 1 (0 is left to padding),
  are never changed once given, and new keys get the next ones in order of (first_ds, key).
* ``consumed``: full snapshot per day: every user's engaged items so far (the item of each of their
  events up to ``ds``), so scoring and list validation leave them out without reading the history.
* ``split_{loo,temporal}_{train,eval}``: training inputs and evaluation targets of the day's splits.

Spark writes non-null columns as Parquet "required", so files may be stricter about nullability
than these contracts; ``conforms`` compares names and types only.
"""
import pyarrow as pa

from schemas import columns as C
from schemas.raw import TS_TYPE

# values of the categorical columns
KIND_SEARCH, KIND_BROWSE = "search", "browse"
SURFACE_SEARCH, SURFACE_REC = "search", "recommendation"  # the product surface an event belongs to
TOKEN_QUERY, TOKEN_ITEM = "query", "item"
TASK_SEARCH, TASK_REC = SURFACE_SEARCH, SURFACE_REC  # a task is named after its target's surface
SPLIT_VALID, SPLIT_TEST = "valid", "test"
FIRST_INDEX = 1  # vocabulary indices start here; 0 is free for padding

TOKEN = pa.struct(
    [
        pa.field(C.POS, pa.int32()),  # first: sorting an array of tokens sorts by position
        pa.field(C.TS, TS_TYPE),  # the event's own time (a late event keeps its real time)
        pa.field(C.TOKEN_TYPE, pa.string()),  # "query" or "item"
        pa.field(C.ITEM_INDEX, pa.int32()),  # item tokens only
        pa.field(C.QUERY_INDEX, pa.int32()),  # query tokens only
        pa.field(C.ACTION, pa.string()),  # the event's action, on both tokens of a search event
        pa.field(C.SURFACE, pa.string()),  # "search" or "recommendation"
        pa.field(C.SESSION, pa.int32()),
        pa.field(C.GAP_S, pa.float64()),  # seconds since the previous event; null for the first
        # item tokens: the event's impressions as item indices in display order, without the engaged
        # item (the ranking loss's logged negatives); null where the logs have no impressions
        pa.field(C.SHOWN_ITEMS, pa.list_(pa.int32())),
    ]
)
TOKENS_TYPE = pa.list_(TOKEN)

EVENTS = pa.schema(
    [
        pa.field(C.EVENT_ID, pa.string()),
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.TS, TS_TYPE),
        pa.field(C.KIND, pa.string()),  # "search" or "browse"
        pa.field(C.QUERY, pa.string()),  # as typed; the vocabulary holds the normalized text
        pa.field(C.QUERY_INDEX, pa.int32()),
        pa.field(C.ITEM_ID, pa.string()),  # null for a search that engaged nothing
        pa.field(C.ITEM_INDEX, pa.int32()),
        pa.field(C.ACTION, pa.string()),
        pa.field(C.VALUE, pa.float64()),
        pa.field(C.SURFACE, pa.string()),
        pa.field(C.LATE, pa.bool_()),
        pa.field(C.CLAMPED, pa.bool_()),
        pa.field(C.EVENT_POS, pa.int32()),
        pa.field(C.POS, pa.int32()),  # position of the event's first token
        pa.field(C.SESSION, pa.int32()),
        pa.field(C.GAP_S, pa.float64()),
        pa.field(C.SHOWN_ITEMS, pa.list_(pa.int32())),  # impressions as item indices (see TOKEN)
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.N_EVENTS, pa.int64()),  # over the whole history, not just the kept tokens
        pa.field(C.N_TOKENS, pa.int64()),
        pa.field(C.LAST_SESSION, pa.int32()),
        pa.field(C.WATERMARK, TS_TYPE),
        pa.field(C.TOKENS, TOKENS_TYPE),  # the latest max_seq_len tokens, in order
    ]
)

CONSUMED = pa.schema(
    [
        pa.field(C.USER_ID, pa.string()),
        # every item_index of the user's events, ascending, each once; readers keep those of their catalog
        pa.field(C.CONSUMED, pa.list_(pa.int32())),
    ]
)

ITEM_VOCAB = pa.schema(
    [
        pa.field(C.ITEM_INDEX, pa.int32()),
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.FIRST_DS, pa.string()),  # first day the item was in the catalog or an event
        pa.field(C.COUNT, pa.int64()),  # item tokens (engagements) so far
    ]
)

QUERY_VOCAB = pa.schema(
    [
        pa.field(C.QUERY_INDEX, pa.int32()),
        pa.field(C.QUERY, pa.string()),  # normalized: lower case, trimmed, inner whitespace collapsed
        pa.field(C.FIRST_DS, pa.string()),
        pa.field(C.COUNT, pa.int64()),  # query tokens so far
    ]
)

SPLIT_TRAIN = pa.schema(
    [
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.TOKENS, TOKENS_TYPE),  # the latest max_seq_len tokens before any evaluation token
    ]
)

SPLIT_EVAL = pa.schema(
    [
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.TASK, pa.string()),  # "recommendation" or "search"
        pa.field(C.SPLIT, pa.string()),  # "valid" or "test"
        pa.field(C.TARGET_POS, pa.int32()),  # position of the target item token
        pa.field(C.TARGET_TS, TS_TYPE),
        pa.field(C.ITEM_INDEX, pa.int32()),  # the item to predict
        pa.field(C.QUERY_INDEX, pa.int32()),  # search targets: the query typed just before
        pa.field(C.ACTION, pa.string()),
        pa.field(C.CONTEXT, TOKENS_TYPE),  # the max_seq_len tokens just before the target item
    ]
)

TABLES = {
    "events": EVENTS,
    "sequences": SEQUENCES,
    "item_vocab": ITEM_VOCAB,
    "query_vocab": QUERY_VOCAB,
    "consumed": CONSUMED,
    "split_loo_train": SPLIT_TRAIN,
    "split_loo_eval": SPLIT_EVAL,
    "split_temporal_train": SPLIT_TRAIN,
    "split_temporal_eval": SPLIT_EVAL,
}


def _loose(t: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _loose(f.type)) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_loose(t.value_type))
    return t


def conforms(schema: pa.Schema, contract: pa.Schema) -> bool:
    """Same field names, order and types as ``contract``, nullability aside."""
    return schema.names == contract.names and all(
        _loose(a.type) == _loose(b.type) for a, b in zip(schema, contract)
    )
