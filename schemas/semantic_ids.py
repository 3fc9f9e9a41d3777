"""Contracts of stage 3: text and collaborative vectors, semantic IDs, and the semantic IDs' suite.

Layout (``ds`` in the path, not in the files; every table a full snapshot per day):

* ``<lake>/<embeddings.output>/items/ds=D``: one frozen text vector per item of the day's item
  vocabulary (``jobs.text_vectors``); ``text_hash`` decides which vectors the next day carries over.
  Side file ``_embeddings.json``: encoder fingerprint, dimension and counts.
* ``<lake>/<embeddings.output>/queries/ds=D``: the same for every query of the query vocabulary.
* ``<lake>/<embeddings.output>/collab/ds=D``: one collaborative vector per item (``jobs.collab``).
  Side file ``_collab.json``: the vector space (``basis``) and counts.
* ``<lake>/semantic_ids/ds=D``: one row per item of the vocabulary, its search and rec IDs
  (``jobs.semantic_ids``). Side files ``_stats.json`` (quality figures) and ``_validation.json`` (GE).
* ``<lake>/semantic_ids_model/ds=D``: ``rqvae.pt`` (the RQ-VAE state dict that assigned the day's codes)
  and ``_model.json`` (when and on what it was last trained; the next day's drift check reads it).

Vectors are L2-normalized float32 lists of one length per table (an item without text has zeros).
"""
from __future__ import annotations

import pyarrow as pa

from schemas import columns as C

VECTOR_TYPE = pa.list_(pa.float32())
CODES_TYPE = pa.list_(pa.int32())

ITEM_EMBEDDINGS = pa.schema(
    [
        pa.field(C.ITEM_INDEX, pa.int32()),
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.TEXT_HASH, pa.string()),
        pa.field(C.VECTOR, VECTOR_TYPE),
        pa.field(C.EMBEDDED_DS, pa.string()),
    ]
)

QUERY_EMBEDDINGS = pa.schema(
    [
        pa.field(C.QUERY_INDEX, pa.int32()),
        pa.field(C.QUERY, pa.string()),  # the query vocabulary's normalized text
        pa.field(C.TEXT_HASH, pa.string()),
        pa.field(C.VECTOR, VECTOR_TYPE),
        pa.field(C.EMBEDDED_DS, pa.string()),
    ]
)

COLLAB_EMBEDDINGS = pa.schema(
    [
        pa.field(C.ITEM_INDEX, pa.int32()),
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.VECTOR, VECTOR_TYPE),
        pa.field(C.VECTOR_SOURCE, pa.string()),
        pa.field(C.COMPUTED_DS, pa.string()),
    ]
)

SEMANTIC_IDS = pa.schema(
    [
        pa.field(C.ITEM_INDEX, pa.int32()),
        pa.field(C.ITEM_ID, pa.string()),
        pa.field(C.SEARCH_CODES, CODES_TYPE),  # shared_levels + specific_levels codes (+1 with extra_code)
        pa.field(C.REC_CODES, CODES_TYPE),
        pa.field(C.RAW_CODES, CODES_TYPE),  # shared_levels + 2 * specific_levels codes
        pa.field(C.ID_DS, pa.string()),
    ]
)

SOURCE_ALS, SOURCE_CHAMPION, SOURCE_TEXT = "als", "champion", "text_neighbours"

TABLES = {  # name (under <embeddings.output>/ for the first three) -> contract
    "items": ITEM_EMBEDDINGS,
    "queries": QUERY_EMBEDDINGS,
    "collab": COLLAB_EMBEDDINGS,
    "semantic_ids": SEMANTIC_IDS,
}

# ---------------------------------------------------------------------------------------------
# Great Expectations: the semantic IDs of a day against the day's item vocabulary.
#
# The batch is the full outer join of the vocabulary and the IDs on item_index, with every code in
# its own column (``code_column``) and two computed checks, so every rule is a GE expectation and GE's
# report names the rows that fail it. GE is imported inside the functions: Spark's Python workers load this
# module (through the jobs that ship functions to them) and should not pay for importing GE.

HAS_IDS = "check_vocab_item_has_ids"  # a vocabulary item has a row in the IDs (null: row not in vocab)
IN_VOCAB = "check_ids_item_in_vocab"  # a row of the IDs is a vocabulary item (null: vocab item w/o row)
VIEWS = ("search", "rec", "raw")


def code_column(view: str, level: int) -> str:
    return f"{view}_{level}"


def length_column(view: str) -> str:
    return f"{view}_length"


def _true(column: str, check: str, notes: str):
    import great_expectations.expectations as gxe

    return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], meta={"check": check, "notes": notes})


def expectations(sizes: dict[str, list[int]], extra_code: bool) -> list:
    """``sizes``: per view (search, rec, raw), the codes of each position's level, so each code is checked
    against its own level (the last level may be larger than the others); ``extra_code``: the view IDs
    have one more code that numbers the items sharing an ID (collision=extra_code), bounded by the
    catalog, not by a codebook."""
    import great_expectations.expectations as gxe

    out = [
        _true(HAS_IDS, "item_covered", "every item of the day's vocabulary has semantic IDs"),
        _true(IN_VOCAB, "item_known", "every row of the IDs is an item of the day's vocabulary"),
        gxe.ExpectColumnValuesToBeUnique(column=C.ITEM_INDEX, meta={"check": "one_row_per_item"}),
    ]
    for view in VIEWS:
        levels = sizes[view]
        length = len(levels) + (extra_code and view != "raw")
        out.append(gxe.ExpectColumnValuesToBeInSet(
            column=length_column(view), value_set=[length], meta={"check": f"{view}_id_length"}))
        for j in range(length):
            last_extra = j == len(levels)
            out.append(gxe.ExpectColumnValuesToBeBetween(
                column=code_column(view, j), min_value=0, max_value=None if last_extra else levels[j] - 1,
                meta={"check": "code_in_range", "notes": "extra code >= 0" if last_extra else
                      f"0 <= code < {levels[j]} (the codes of level {j})"}))
        if view != "raw":
            out.append(gxe.ExpectCompoundColumnsToBeUnique(
                column_list=[code_column(view, j) for j in range(length)], meta={"check": f"unique_{view}_id"}))
    return out


def suite(sizes: dict[str, list[int]], extra_code: bool):
    import great_expectations as gx

    return gx.ExpectationSuite(name="semantic_ids", expectations=expectations(sizes, extra_code))
