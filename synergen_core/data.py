"""Split tables (``schemas.sequences``) -> padded numpy arrays -> the model's batch tensors.

Token lists are handled in CSR form (``Tokens``: one flat array per field plus row offsets), so every
step is a numpy operation over all tokens at once: no per-token Python loop on the hot path.

Layouts (both left-padded, so the latest token of every row sits in the last column):

* ``Windows`` (training): each user's training sequence is cut, from the end, into windows of at most
  L tokens. Every position carries its retrieval target, computed on the whole sequence before the cut
  (``next_targets``), so a window's last position predicts the first token after the window. The
  sequence's own last token is only a target, never an input (nothing after it to predict). A window's
  last position is also its ranking request: history = the window, positive = that target, which is
  outside the window, so the candidates never see their own answer.
* ``Requests`` (evaluation): one row per evaluation target: the last L tokens of its context (for a
  search target the last one is its query), the item to find and the task.

Action and surface vocabularies are fixed here (index 0 = padding / unknown) so that indices never change
between days.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from schemas import C
from schemas import sequences as S
from schemas.raw import BROWSE_ACTIONS, SEARCH_ACTIONS
from synergen_core import lake
from synergen_core.model.embeddings import TokenType
from synergen_core.model import RECOMMEND, SEARCH

ACTIONS = tuple(sorted(set(SEARCH_ACTIONS) | set(BROWSE_ACTIONS)))  # index = position + 1
SURFACES = (S.SURFACE_SEARCH, S.SURFACE_REC)
N_ACTIONS, N_SURFACES = len(ACTIONS) + 1, len(SURFACES) + 1
TASKS = {S.TASK_SEARCH: SEARCH, S.TASK_REC: RECOMMEND}  # split task name -> model.prediction_task code
TASK_NAMES = {SEARCH: "search", RECOMMEND: "rec"}
HISTORY_KEYS = ("token_type", "item_idx", "query_idx", "action", "surface", "position", "ts")


# ---- reading the lake ---------------------------------------------------------------------------


def read_table(part: Path) -> pa.Table:
    """One published partition of a sessionized table, e.g. ``layout.part(layout.split("loo", "train"), ds)``."""
    files = lake.data_files(part)
    if not files:
        raise FileNotFoundError(f"{part}: no published partition (run `synergen sessionize --ds {part.name[3:]}` first)")
    return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()


def vocab_size(table: pa.Table, index: str) -> int:
    """Rows of an embedding table for a vocabulary: largest index + 1 (row 0 = padding)."""
    return int(pc.max(table[index]).as_py() or 0) + 1


# ---- tokens in CSR form -------------------------------------------------------------------------


@dataclass
class Tokens:
    """Token lists of R rows: field arrays [T] and ``offsets`` [R + 1] (row r = offsets[r]:offsets[r+1])."""

    offsets: np.ndarray  # int64
    token_type: np.ndarray  # int64, TokenType
    item_idx: np.ndarray  # int64, 0 at query tokens
    query_idx: np.ndarray  # int64, 0 at item tokens
    action: np.ndarray  # int64, index into ACTIONS + 1
    surface: np.ndarray  # int64, index into SURFACES + 1
    position: np.ndarray  # int64, the token's position in its user's history
    ts: np.ndarray  # float64, epoch seconds
    # [T, M] int64: items logged as shown with an item token's event (impressions), 0-padded; M = 0
    # unless asked for (the ranking loss's negatives)
    shown: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.shown is None:
            self.shown = np.zeros((len(self.ts), 0), np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take_rows(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> Tokens:
        """Rows ``rows`` keeping their first ``lengths`` tokens (all by default)."""
        starts = self.offsets[:-1][rows]
        lengths = self.lengths[rows] if lengths is None else lengths
        return self._gather(_ranges(starts, lengths), lengths)

    def keep(self, mask: np.ndarray) -> Tokens:
        """Every row with only the tokens where ``mask`` [T] is true."""
        lengths = np.bincount(row_ids(self.offsets)[mask], minlength=len(self.lengths))
        return self._gather(np.nonzero(mask)[0], lengths)

    def _gather(self, src: np.ndarray, lengths: np.ndarray) -> Tokens:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Tokens(offsets, **{f.name: getattr(self, f.name)[src] for f in fields(self) if f.name != "offsets"})


def _codes(values: pa.Array, vocab: tuple[str, ...]) -> np.ndarray:
    """Strings -> 1 + their index in ``vocab``; null or unknown -> 0."""
    idx = pc.index_in(values, value_set=pa.array(vocab, pa.string()))
    return (pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1)


def tokens_from_arrow(lists: pa.Array | pa.ChunkedArray, max_shown: int = 0) -> Tokens:
    """A ``list<TOKEN>`` column (``schemas.sequences.TOKENS_TYPE``) -> ``Tokens``; null lists are empty.
    ``max_shown``: keep the first that many impressions of every item token (``Tokens.shown``)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks else pa.array([], S.TOKENS_TYPE)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(lists)  # struct array [T]

    def col(name: str) -> pa.Array:
        return flat.field(name)

    def ints(name: str) -> np.ndarray:
        return pc.fill_null(col(name), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    is_query = pc.fill_null(pc.equal(col(C.TOKEN_TYPE), S.TOKEN_QUERY), False).to_numpy(zero_copy_only=False)
    ts_us = pc.fill_null(col(C.TS).cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    return Tokens(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        token_type=np.where(is_query, int(TokenType.QUERY), int(TokenType.ITEM)).astype(np.int64),
        item_idx=np.where(is_query, 0, ints(C.ITEM_INDEX)),
        query_idx=np.where(is_query, ints(C.QUERY_INDEX), 0),
        action=_codes(col(C.ACTION), ACTIONS),
        surface=_codes(col(C.SURFACE), SURFACES),
        position=ints(C.POS),
        ts=ts_us.astype(np.float64) / 1e6,
        shown=_first_of_lists(col(C.SHOWN_ITEMS), max_shown) if C.SHOWN_ITEMS in flat.type.names else None,
    )


def _first_of_lists(lists: pa.Array, m: int) -> np.ndarray:
    """A list<int> array [T] -> [T, m] int64 of each list's first m values, 0-padded (null = empty)."""
    out = np.zeros((len(lists), m), np.int64)
    if m == 0 or len(lists) == 0:
        return out
    lengths = np.minimum(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), m)
    starts = lists.offsets.to_numpy()[:-1].astype(np.int64)  # into .values, which ignores a slice's offset
    values = pc.fill_null(lists.values, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    out[rows, _ranges(np.zeros(len(lists), np.int64), lengths)] = values[_ranges(starts, lengths)]
    return out


def row_ids(offsets: np.ndarray) -> np.ndarray:
    """[T] row of every token."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def next_targets(tok: Tokens) -> np.ndarray:
    """[T] item each token should retrieve, 0 = none: ``model.next_item_targets`` on whole rows.

    At an item token the next token's item if it is an item token; at a query token the next token's
    item only if it is the same event (same ts): the query's engagement.
    """
    T = len(tok.ts)
    if T == 0:
        return np.zeros(0, np.int64)
    nxt = np.minimum(np.arange(T) + 1, T - 1)
    has = np.arange(T) + 1 < np.repeat(tok.offsets[1:], tok.lengths)  # next token in the same row
    next_item = tok.token_type[nxt] == TokenType.ITEM
    same_event = tok.ts[nxt] == tok.ts
    ok = has & next_item & ((tok.token_type == TokenType.ITEM) | ((tok.token_type == TokenType.QUERY) & same_event))
    return np.where(ok, tok.item_idx[nxt], 0)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lengths[i])."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts.astype(np.int64), lengths) + np.arange(total) - first


def pad_left(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, L: int, fill=0) -> np.ndarray:
    """Segments values[starts[i] : starts[i] + lengths[i]] (lengths <= L) -> [R, L], left-padded."""
    R = len(starts)
    out = np.full((R, L), fill, dtype=values.dtype)
    rows = np.repeat(np.arange(R), lengths)
    src = _ranges(starts, lengths)
    within = src - np.repeat(starts, lengths)
    out[rows, L - np.repeat(lengths, lengths) + within] = values[src]
    return out


def _history(tok: Tokens, starts: np.ndarray, lengths: np.ndarray, L: int) -> dict[str, np.ndarray]:
    return {k: pad_left(getattr(tok, k), starts, lengths, L) for k in HISTORY_KEYS}


# ---- training windows ---------------------------------------------------------------------------


@dataclass
class Windows:
    history: dict[str, np.ndarray]  # HISTORY_KEYS -> [R, L]
    target: np.ndarray  # [R, L] int64 item to retrieve at each position, 0 = none
    next_ts: np.ndarray  # [R] float64 time of the token after the window (the ranking request's time)
    lengths: np.ndarray  # [R] valid tokens per row
    shown: np.ndarray  # [R, M] items logged as shown with the token after the window (its impressions)

    def __len__(self) -> int:
        return len(self.lengths)

    def select(self, rows: np.ndarray) -> Windows:
        """The windows at ``rows`` (indices or a boolean mask), as ``Requests.select``."""
        return Windows({k: v[rows] for k, v in self.history.items()}, self.target[rows], self.next_ts[rows],
                       self.lengths[rows], self.shown[rows])


def make_windows(tok: Tokens, L: int, max_windows: int | None = None) -> Windows:
    """Cut every row into windows of at most L input tokens, latest first (see module doc).

    ``max_windows``: keep only the latest that many windows of each row. Windows without any target
    are dropped.
    """
    targets = next_targets(tok)
    n_in = np.maximum(tok.lengths - 1, 0)  # the last token is only a target
    n_win = -(-n_in // L)
    if max_windows is not None:
        n_win = np.minimum(n_win, max_windows)
    row = np.repeat(np.arange(len(n_in)), n_win)
    j = _ranges(np.zeros(len(n_win), np.int64), n_win)  # 0 = latest window of its row
    end = n_in[row] - j * L  # exclusive, relative to the row start
    start = np.maximum(end - L, 0)
    base = tok.offsets[:-1][row]
    starts, lengths = base + start, end - start
    tgt = pad_left(targets, starts, lengths, L)
    keep = (tgt > 0).any(1)
    starts, lengths, tgt = starts[keep], lengths[keep], tgt[keep]
    return Windows(
        history=_history(tok, starts, lengths, L),
        target=tgt,
        next_ts=tok.ts[starts + lengths] if len(starts) else np.zeros(0),
        lengths=lengths,
        shown=tok.shown[starts + lengths] if len(starts) else tok.shown[:0],
    )


# ---- evaluation requests ------------------------------------------------------------------------


@dataclass
class Requests:
    history: dict[str, np.ndarray]  # HISTORY_KEYS -> [N, L]
    target: np.ndarray  # [N] item to find
    task: np.ndarray  # [N] SEARCH or RECOMMEND
    query_idx: np.ndarray  # [N] the search target's query (0 for recommendation)
    ts: np.ndarray  # [N] float64 time of the target event (the request time)
    lengths: np.ndarray  # [N] valid history tokens
    # [N, M] items the user engaged with before the request (the whole context, not only the L
    # tokens of history), 0-padded: what the served lists leave out (evaluate.exclude_consumed)
    consumed: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)

    def select(self, rows: np.ndarray) -> Requests:
        return Requests(
            {k: v[rows] for k, v in self.history.items()}, self.target[rows], self.task[rows],
            self.query_idx[rows], self.ts[rows], self.lengths[rows],
            None if self.consumed is None else self.consumed[rows],
        )


def consumed_items(tok: Tokens, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[N, M] int32 the item tokens' items of tokens starts[i] .. ends[i] - 1 of ``tok``, 0-padded
    (M = the longest span, at most sessionize.max_seq_len; repeats kept, they mask the same column).
    int32: a day's test targets times M can be large, and item indices fit."""
    n = np.maximum(ends - starts, 0)
    M = max(int(n.max()) if len(n) else 0, 1)
    if not len(tok.item_idx):
        return np.zeros((len(n), M), np.int32)
    col = np.arange(M)[None, :]
    inside = col < n[:, None]  # [N, M]
    idx = np.where(inside, starts[:, None] + col, 0)
    return np.where(inside & (tok.token_type[idx] == TokenType.ITEM), tok.item_idx[idx], 0).astype(np.int32)


def requests_from_eval(table: pa.Table, L: int, split: str | None = None) -> tuple[Requests, int]:
    """``split_*_eval`` rows of ``split`` (all when None) with a non-empty context -> (requests, rows
    dropped for an empty context: a user's first event has no history for any sequence model)."""
    if split is not None:
        table = table.filter(pc.equal(table[C.SPLIT], split))
    tok = tokens_from_arrow(table[C.CONTEXT])
    has = tok.lengths > 0
    task = np.array([TASKS.get(t, 0) for t in table[C.TASK].to_pylist()], np.int64)
    has &= task > 0
    n = np.minimum(tok.lengths, L)
    starts = tok.offsets[1:] - n
    keep = np.nonzero(has)[0]
    req = Requests(
        history=_history(tok, starts[keep], n[keep], L),
        target=pc.fill_null(table[C.ITEM_INDEX], 0).to_numpy().astype(np.int64)[keep],
        task=task[keep],
        query_idx=pc.fill_null(table[C.QUERY_INDEX], 0).to_numpy().astype(np.int64)[keep],
        ts=pc.fill_null(table[C.TARGET_TS].cast(pa.int64()), 0).to_numpy().astype(np.float64)[keep] / 1e6,
        lengths=n[keep],
        consumed=consumed_items(tok, tok.offsets[:-1][keep], tok.offsets[1:][keep]),
    )
    return req, int((~has).sum())


def _eval_batches(part: Path, split: str, columns: list[str] | None = None, batch_rows: int = 65_536):
    """The rows of ``split`` of an ``split_*_eval`` partition, record batch by record batch (as tables)."""
    for f in lake.data_files(part):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            table = pa.Table.from_batches([batch])
            yield table.filter(pc.equal(table[C.SPLIT], split))


def _scorable(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(context length, whether a sequence model can score the row) per row: the rule of ``requests_from_eval``."""
    n = pc.fill_null(pc.list_value_length(table[C.CONTEXT]), 0).to_numpy().astype(np.int64)
    task = np.array([TASKS.get(t, 0) for t in table[C.TASK].to_pylist()], np.int64)
    return n, (n > 0) & (task > 0)


def first_requests(part: Path, L: int, rows: int, split: str = S.SPLIT_TEST, batch_rows: int = 256) -> Requests:
    """The first ``rows`` requests of ``split`` (with a context) of an ``split_*_eval`` partition, in the
    order ``load_test`` reads them, reading record batches only until they are found."""
    found: list[pa.Table] = []
    have = 0
    for table in _eval_batches(part, split, batch_rows=batch_rows):
        if have >= rows:
            break
        found.append(table)
        have += int(_scorable(table)[1].sum())
    req, _ = requests_from_eval(pa.concat_tables(found) if found else S.SPLIT_EVAL.empty_table(), L, split)
    return req.select(np.arange(min(rows, len(req))))


def activity_stratum(context_len: np.ndarray) -> np.ndarray:
    """A request's user-activity stratum: floor(log2) of its context length (1, 2-3, 4-7, ... tokens)."""
    return np.floor(np.log2(np.maximum(context_len, 1))).astype(np.int64)


def proportional_quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` rows shared out over strata of ``counts`` rows in proportion (largest remainders)."""
    share = counts * (total / max(int(counts.sum()), 1))
    q = np.floor(share).astype(np.int64)
    q[np.argsort(-(share - q), kind="stable")[:total - int(q.sum())]] += 1
    return np.minimum(q, counts)


def sample_test(part: Path, L: int, max_rows: int, seed: int, split: str = S.SPLIT_TEST,
                batch_rows: int = 65_536) -> tuple[Requests, int, int]:
    """At most ``max_rows`` requests of ``split`` (with a context) of an ``split_*_eval`` partition: all of
    them, as ``load_test`` gives them, when there are no more; else a seeded sample stratified by user
    activity (``activity_stratum``), each stratum in proportion, in the partition's row order.
    -> (requests, rows without a context, rows with one).

    Two passes over the files, batch by batch: the strata's sizes, then each stratum's rows of smallest
    seeded random key. A process holds a batch and the sample (``max_rows``), never the split.
    """
    strata = np.zeros(64, np.int64)
    no_context = 0
    for t in _eval_batches(part, split, [C.SPLIT, C.TASK, C.CONTEXT], batch_rows):
        n, ok = _scorable(t)
        no_context += int((~ok).sum())
        strata += np.bincount(activity_stratum(n[ok]), minlength=64)
    total = int(strata.sum())
    if total <= max_rows:
        req, _ = requests_from_eval(read_table(part), L, split)
        return req, no_context, total
    quota = proportional_quotas(strata, max_rows)
    rng = np.random.default_rng(seed)
    kept, key, stratum = None, np.zeros(0), np.zeros(0, np.int64)
    for t in _eval_batches(part, split, batch_rows=batch_rows):
        n, ok = _scorable(t)
        t = t.filter(pa.array(ok))
        kept = t if kept is None else pa.concat_tables([kept, t])
        key = np.concatenate([key, rng.random(len(t))])
        stratum = np.concatenate([stratum, activity_stratum(n[ok])])
        order = np.lexsort((key, stratum))  # by stratum, then key
        rank = np.arange(len(order)) - np.searchsorted(stratum[order], stratum[order])  # rank within stratum
        keep = np.sort(order[rank < quota[stratum[order]]])  # the quota's smallest keys, in row order
        kept, key, stratum = kept.take(pa.array(keep)), key[keep], stratum[keep]
    req, _ = requests_from_eval(kept.combine_chunks(), L, split)
    return req, no_context, total


def holdout_last(tok: Tokens, L: int, min_items: int = 3) -> tuple[Tokens, Requests]:
    """Validation for a protocol without one (temporal): the last token of every row with at least
    ``min_items`` item tokens, when it is an item, becomes a target; the training rows lose that event.

    The held-out item's task is search when its event is a search (a query token of the same time just
    before it), and the request's history then ends with that query.
    """
    R = len(tok.lengths)
    is_item = tok.token_type == TokenType.ITEM
    n_items = np.bincount(row_ids(tok.offsets), weights=is_item, minlength=R)
    last = np.maximum(tok.offsets[1:] - 1, 0)
    ok = (tok.lengths > 1) & (n_items >= min_items)
    ok[ok] = is_item[last[ok]]
    rows = np.nonzero(ok)[0]
    last = last[rows]
    prev = last - 1
    search = (tok.token_type[prev] == TokenType.QUERY) & (tok.ts[prev] == tok.ts[last])
    ctx_len = np.minimum(last - tok.offsets[:-1][rows], L)  # the query stays in the request's history
    valid = Requests(
        history=_history(tok, last - ctx_len, ctx_len, L),
        target=tok.item_idx[last],
        task=np.where(search, SEARCH, RECOMMEND).astype(np.int64),
        query_idx=np.where(search, tok.query_idx[prev], 0),
        ts=tok.ts[last],
        lengths=ctx_len,
        consumed=consumed_items(tok, tok.offsets[:-1][rows], last),
    )
    keep_len = tok.lengths.copy()
    keep_len[rows] -= 1 + search  # drop the whole held-out event
    return tok.take_rows(np.arange(len(keep_len)), keep_len), valid


def item_counts(tok: Tokens, n_items: int) -> np.ndarray:
    """[n_items] item tokens per item in ``tok`` (training popularity); index 0 stays 0."""
    items = tok.item_idx[(tok.token_type == TokenType.ITEM) & (tok.item_idx > 0) & (tok.item_idx < n_items)]
    return np.bincount(items, minlength=n_items).astype(np.int64)


# ---- tensors ------------------------------------------------------------------------------------


def to_batch(history: dict[str, np.ndarray], rows: np.ndarray, lengths: np.ndarray, device) -> dict[str, Tensor]:
    """Rows of left-padded [R, L] arrays -> the model's batch dict, trimmed to the longest row."""
    width = max(int(lengths[rows].max()) if len(rows) else 1, 1)
    out = {}
    for k, v in history.items():
        t = torch.from_numpy(np.ascontiguousarray(v[rows, -width:]))
        out[k] = t.to(device, dtype=torch.float64 if k == "ts" else torch.long)
    return out


# ---- one protocol's data ------------------------------------------------------------------------


@dataclass
class SplitData:
    """Everything training needs from one day's split of one protocol."""

    protocol: str
    n_items: int
    n_queries: int
    item_vocab: pa.Table
    query_vocab: pa.Table
    train: Tokens  # training sequences (minus the validation hold-out where the protocol has none)
    windows: Windows
    valid: Requests
    counts: np.ndarray  # [n_items] item tokens per item in ``train`` (popularity)


def load_split(layout: lake.Layout, ds: str, protocol: str, L: int, max_windows: int | None = None,
               impression_negatives: int = 0) -> SplitData:
    """``split_<protocol>_train`` + validation targets: ``loo`` has its own ``valid`` rows, ``temporal``
    holds out every user's last training engagement (``holdout_last``). ``L``: the model's context length."""
    items = read_table(layout.part(layout.sessions("item_vocab"), ds))
    queries = read_table(layout.part(layout.sessions("query_vocab"), ds))
    n_items, n_queries = vocab_size(items, C.ITEM_INDEX), vocab_size(queries, C.QUERY_INDEX)
    train = tokens_from_arrow(read_table(layout.part(layout.split(protocol, "train"), ds))[C.TOKENS],
                              impression_negatives)
    if protocol == "loo":
        valid, _ = requests_from_eval(read_table(layout.part(layout.split("loo", "eval"), ds)), L, S.SPLIT_VALID)
    else:
        train, valid = holdout_last(train, L)
    return SplitData(
        protocol, n_items, n_queries, items, queries, train,
        make_windows(train, L, max_windows), valid, item_counts(train, n_items),
    )


def load_test(layout: lake.Layout, ds: str, protocol: str, L: int) -> tuple[Requests, int]:
    """The ``test`` targets of a protocol's split and how many had no context."""
    return requests_from_eval(read_table(layout.part(layout.split(protocol, "eval"), ds)), L, S.SPLIT_TEST)
