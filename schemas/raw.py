"""The raw contract: what users (or the ingest adapters, or the generator) write into the lake.

Layout: ``<lake>/raw/<table>/ds=YYYY-MM-DD/*.parquet``, one folder per day of event time. Data files end
in ``.parquet`` or ``.parq`` (any case); names starting with ``_`` or ``.`` are side files, and any other
file in a partition fails validation by name rather than being skipped.

* ``search_events``: a typed query, and the item engaged from its results if any.
* ``browse_events``: an item engaged outside search (feed, detail page, ratings...).
* ``catalog``: item text. A day's partition holds the items added or changed that day; the catalog
  as of a day is the latest row of every item over all partitions up to that day.

Every field is nullable at the Arrow level on purpose: rows with missing keys must still be readable
so validation can quarantine them with a reason. Which fields are required is part of the contract
(``REQUIRED``) and is enforced by the expectation suites in ``schemas.suites``; the other fields
(``OPTIONAL``) may also be left out of a file. Timestamps are Arrow timestamps: numbers (epoch seconds,
milliseconds...) are refused, not guessed, since their unit is not in the data.
"""
import pyarrow as pa

from schemas import columns as C

TS_TYPE = pa.timestamp("us", tz="UTC")

# Parquet key-value metadata marking tables whose timestamps keep order but are not real times.
TS_DERIVED_KEY = b"synergen.ts_derived"

# "none": a query with no engagement. Every other action engages an item.
SEARCH_ACTIONS = ("none", "click", "add_to_cart", "purchase", "tag", "review")
BROWSE_ACTIONS = ("view", "click", "add_to_cart", "purchase", "rate", "review")
ENGAGEMENT_ACTIONS = tuple(sorted((set(SEARCH_ACTIONS) | set(BROWSE_ACTIONS)) - {"none"}))

SEARCH_EVENTS = pa.schema(
    [
        pa.field(C.EVENT_ID, pa.string()),
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.TS, TS_TYPE),
        pa.field(C.QUERY, pa.string()),
        pa.field(C.ITEM_ID, pa.string()),  # null when the query engaged nothing
        pa.field(C.ACTION, pa.string()),
        pa.field(C.IMPRESSIONS, pa.list_(pa.string())),  # items shown, in display order, if logged
    ]
)

BROWSE_EVENTS = pa.schema(
    [
        pa.field(C.EVENT_ID, pa.string()),
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.TS, TS_TYPE),
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.ACTION, pa.string()),
        pa.field(C.VALUE, pa.float64()),  # action strength, e.g. a rating; null when none
        pa.field(C.SURFACE, pa.string()),  # where it happened, e.g. "home", "detail"
        pa.field(C.IMPRESSIONS, pa.list_(pa.string())),
    ]
)

CATALOG = pa.schema(
    [
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.TITLE, pa.string()),
        pa.field(C.DESCRIPTION, pa.string()),
        pa.field(C.CATEGORIES, pa.list_(pa.string())),  # most general first
        pa.field(C.BRAND, pa.string()),
    ]
)

RAW_TABLES = {
    "catalog": CATALOG,
    "search_events": SEARCH_EVENTS,
    "browse_events": BROWSE_EVENTS,
}

REQUIRED = {
    "catalog": (C.ITEM_ID, C.TITLE),
    "search_events": (C.EVENT_ID, C.USER_ID, C.TS, C.QUERY, C.ACTION),
    "browse_events": (C.EVENT_ID, C.USER_ID, C.TS, C.ITEM_ID, C.ACTION),
}
# Every other field is optional: a row may hold null there, and a file may leave the column out
# altogether (validation fills it with nulls and lists it in the day's report).
OPTIONAL = {table: tuple(f.name for f in schema if f.name not in REQUIRED[table]) for table, schema in RAW_TABLES.items()}

# What an event is, beside its id. Rows of one partition that share an event_id and agree on these fields
# are copies of one event (re-deliveries: valid, sessionize keeps one); rows that share an id but differ
# on any of them conflict and are all quarantined (reasons.CONFLICTING_EVENT_ID). Surface and impressions
# say how the event was shown and logged, not what happened, so copies may differ there.
EVENT_CONTENT = {
    "search_events": (C.USER_ID, C.TS, C.QUERY, C.ITEM_ID, C.ACTION),
    "browse_events": (C.USER_ID, C.TS, C.ITEM_ID, C.ACTION, C.VALUE),
}


def quarantine_schema(table: str) -> pa.Schema:
    """A raw table's schema plus where each quarantined row came from and why."""
    return RAW_TABLES[table].append(pa.field(C.REASON, pa.string())).append(
        pa.field(C.SOURCE_FILE, pa.string())
    ).append(pa.field(C.SOURCE_ROW, pa.int64()))
