"""Contract of the scoring stage's candidate lists (written by ``jobs.score``) and their expectation suite.

Layout: ``<lake>/<score.output>/ds=YYYY-MM-DD/surface=rec|search/*.parquet`` (default layer
``candidates``), with ``_SUCCESS``, ``_score.json`` (the run's figures) and the validation reports
(``_validation.json``, ``_validation.ge.json``) beside the day's data. ``ds`` and ``surface`` are partition
keys: in the path, not in the files. Until validated, a day sits in ``<lake>/<score.output>/_staging/ds=D``.

One list per request. A recommendation request is a user (``query`` null); a search request is a (user,
query) pair, the query normalized as in the query vocabulary. A list holds ``score.top_k`` items, fewer only
when fewer are left in the catalog (after the user's consumed items, where those are excluded), ranked
1..n by ``ranking_score`` (ties keep the retrieval order).
"""
from __future__ import annotations

import pyarrow as pa

from schemas import columns as C

SURFACE_REC, SURFACE_SEARCH = "rec", "search"  # the partition values of ``surface``
SURFACES = (SURFACE_REC, SURFACE_SEARCH)
REQUEST_KEY = (C.SURFACE, C.USER_ID, C.QUERY)  # one list per key (query null for rec)

CANDIDATES = pa.schema(
    [
        pa.field(C.USER_ID, pa.string()),
        pa.field(C.QUERY, pa.string()),  # null for recommendation
        pa.field(C.RANK, pa.int32()),  # 1 = best
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.RETRIEVAL_SCORE, pa.float32()),  # dense: cosine / temperature; generative: ID log-prob
        # the score the list is ordered by: the ranking head's logit, or the retrieval score where the list is
        # in retrieval order (a model without the head, or a task where it lost on validation: score.order)
        pa.field(C.RANKING_SCORE, pa.float32()),
        pa.field(C.MODEL_NAME, pa.string()),
        pa.field(C.MODEL_VERSION, pa.string()),  # registry version, or "path:<model file>"
    ]
)

REQUIRED = (C.USER_ID, C.RANK, C.ITEM_ID, C.RETRIEVAL_SCORE, C.RANKING_SCORE, C.MODEL_NAME, C.MODEL_VERSION)

# ---------------------------------------------------------------------------------------------
# Great Expectations: a day's lists, as written.
#
# The batch is the lists with computed check columns (``jobs.score.check_frame``, Spark window functions
# over each request), so every rule is a GE expectation and GE's report names it. A check column is null
# where its rule does not apply (GE's in-set check skips nulls). GE is imported inside the functions:
# Spark's Python workers load this module through jobs.score and should not pay for importing GE.

LIST_LENGTH = "check_list_length"  # rows of the request == min(top_k, items left for it)
UNIQUE_ITEM = "check_item_unique_in_list"
RANKS = "check_ranks_consecutive"  # ranks are 1..n
SCORE_ORDER = "check_rank_in_score_order"  # ranking_score <= the previous rank's (null at rank 1)
IN_CATALOG = "check_item_in_catalog"  # item in the catalog the model scored (item vocabulary of ds)
NOT_CONSUMED = "check_item_not_consumed"  # null where consumed items are not excluded
QUERY_SURFACE = "check_query_matches_surface"  # query null on rec, set on search

CHECKS = {  # check column -> (check name, what it means)
    LIST_LENGTH: ("list_length", "score.top_k rows per request, fewer only when fewer items are left"),
    UNIQUE_ITEM: ("unique_items", "no item twice in a list"),
    RANKS: ("ranks", "ranks are 1..n within a list"),
    SCORE_ORDER: ("score_order", "ranking_score does not increase with the rank"),
    IN_CATALOG: ("in_catalog", "every item is in the item vocabulary of ds, within the model's catalog"),
    NOT_CONSUMED: ("not_consumed", "no item the user engaged with up to ds, where those are excluded"),
    QUERY_SURFACE: ("query_matches_surface", "query null on recommendation lists, set on search lists"),
}


def expectations() -> list:
    import great_expectations.expectations as gxe

    out = [gxe.ExpectColumnValuesToNotBeNull(column=c, meta={"check": f"not_null:{c}"}) for c in REQUIRED]
    out += [gxe.ExpectColumnValuesToBeInSet(column=C.SURFACE, value_set=list(SURFACES), meta={"check": "surface"})]
    out += [gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[True], meta={"check": name, "notes": notes})
            for col, (name, notes) in CHECKS.items()]
    return out


def suite():
    import great_expectations as gx

    return gx.ExpectationSuite(name="candidates", expectations=expectations())
