"""Great Expectations suites for the raw tables: the row-level rules of the raw contract.

Every row-level expectation carries ``meta["reason"]``, the quarantine code (schemas/reasons.py) a
failing row gets; validation derives each row's reasons from these expectations (jobs/validate_checks.py),
so only the kinds it knows are used here: not null, in set, not matching a regex. Checks that need
context GE cannot express per row (the partition's day, the catalog as of that day, duplicates keeping
the first, conflicting event ids) are computed by validation into boolean check columns named below, and
the suite expects them to be true, so every rule is reported by GE the same way.
"""
from __future__ import annotations

import great_expectations as gx
import great_expectations.expectations as gxe

from schemas import columns as C
from schemas import reasons as R
from schemas.raw import BROWSE_ACTIONS, REQUIRED, SEARCH_ACTIONS

# Check columns computed by validation (null where the rule does not apply, e.g. ts itself is null).
TS_IN_WINDOW = "check_ts_in_partition_window"
ITEM_IN_CATALOG = "check_item_in_catalog"
VALUE_IN_RANGE = "check_value_in_range"
FIRST_OF_ID = "check_first_of_item_id"
EVENT_ID_CONSISTENT = "check_event_id_consistent"

# A query of nothing but white space, as Python's str.isspace counts it (the contract from when the suites
# ran on pandas). They run on Spark (Java regexes): (?U) makes \s any Unicode white space (no-break and
# ideographic spaces too); Java's \s lacks the four ASCII separators \x1c-\x1f that Python counts.
BLANK = r"(?U)^[\s\x1c-\x1f]*$"


def _true(column: str, reason: str, notes: str) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], meta={"reason": reason, "notes": notes})


def _not_null(table: str) -> list[gxe.Expectation]:
    return [gxe.ExpectColumnValuesToNotBeNull(column=c, meta={"reason": R.null(c)}) for c in REQUIRED[table]]


def _events(table: str, actions: tuple[str, ...]) -> list[gxe.Expectation]:
    return _not_null(table) + [
        gxe.ExpectColumnValuesToBeInSet(column=C.ACTION, value_set=list(actions), meta={"reason": R.UNKNOWN_ACTION}),
        _true(TS_IN_WINDOW, R.TS_OUTSIDE_DAY, "ts within [ds - validate.late_days, ds + 1 day)"),
        _true(ITEM_IN_CATALOG, R.UNKNOWN_ITEM, "item_id present in the validated catalog as of ds"),
        _true(EVENT_ID_CONSISTENT, R.CONFLICTING_EVENT_ID,
              "rows sharing an event_id within a partition have the same content (exact copies pass)"),
    ]


def expectations(table: str) -> list[gxe.Expectation]:
    if table == "catalog":
        return _not_null(table) + [
            _true(FIRST_OF_ID, R.DUPLICATE_ITEM_ID, "item_id unique within the partition (first row kept)"),
        ]
    if table == "search_events":
        return _events(table, SEARCH_ACTIONS) + [
            gxe.ExpectColumnValuesToNotMatchRegex(column=C.QUERY, regex=BLANK, meta={"reason": R.EMPTY_QUERY}),
        ]
    if table == "browse_events":
        return _events(table, BROWSE_ACTIONS) + [
            _true(VALUE_IN_RANGE, R.BAD_VALUE, "value null, or finite and within [0, validate.max_value]"),
        ]
    raise KeyError(f"no expectation suite for table {table!r}")


def check_columns(table: str) -> list[str]:
    """The columns a table's suite reads (contract fields and computed checks)."""
    cols: list[str] = []
    for e in expectations(table):
        if e.column not in cols:
            cols.append(e.column)
    return cols


def suite(table: str) -> gx.ExpectationSuite:
    return gx.ExpectationSuite(name=f"raw_{table}", expectations=expectations(table))
