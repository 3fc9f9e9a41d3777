"""Serving a trained model: batch inference (``Scorer``) and the registry's MLflow pyfunc (``SynerGenPyfunc``).

Both turn token sequences into the model's requests with one function, ``assemble_requests``: each row's
latest tokens up to a chosen end, left-padded to the model's ``max_seq_len``; a request whose last token
is a query asks for search, else recommendation.

* ``Scorer``: a model (eval mode, CPU) and its candidate index scoring Arrow batches of requests into
  candidate lists (retrieval by the index or by semantic-ID generation, consumed items left out, in the
  ranking head's order or the retrieval order, per task: ``Settings.list_order``). ``jobs.score`` builds
  the batches on Spark and runs a ``Scorer`` per Python worker
  (``build_scorer`` from a broadcast payload); pure torch, numpy and faiss, no Spark here.
* ``SynerGenPyfunc``: ``model.pt`` as an ``mlflow.pyfunc`` model (token lists in, top-k items out).
  ``synergen_core.registry.register`` logs it with ``pyfunc_signature``, ``input_example`` and
  ``pyfunc_requirements``; MLflow loads the class back from here when a registered version is served.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import C
from schemas import candidates as candidates_schema
from schemas import sequences as sequences_schema
from synergen_core import checkpoint
from synergen_core.config import Config, ConfigError, parse_ds
from synergen_core.data import HISTORY_KEYS, SURFACES, Requests, Tokens, pad_left

ARTIFACT = "model"  # the pyfunc artifact key (and file stem) of model.pt
# the token columns a pyfunc request may carry, oldest token first (only item_idx is required)
INPUT_COLUMNS = ("token_type", "item_idx", "query_idx", "action", "surface", "position", "ts")
# private columns of a scoring batch, next to the contract's surface, user_id, query and tokens
QUERY_INDEX_COLUMN = "_query_index"  # int, the search request's query as the model indexes it (null on rec)
CONSUMED_COLUMN = "_consumed"  # list<int>, items the list must leave out


# ---- requests -----------------------------------------------------------------------------------


def assemble_requests(tok: Tokens, ends: np.ndarray, max_len: int, request_ts: float,
                      search: np.ndarray | None = None, query_index: np.ndarray | None = None
                      ) -> tuple[Requests, np.ndarray]:
    """The model's requests from each row's tokens before ``ends`` [R] (exclusive token offsets): the
    latest ``max_len`` of them, left-padded. Rows where ``search`` [R] is true get their ``query_index``
    appended as a query token at ``request_ts`` (one history column less to make room for it).

    A request whose last token is a query is a search for that query, else a recommendation (the rule of
    ``SynerGen.request_is_search``). -> (``Requests`` of the rows with at least one token, their row numbers).
    """
    from synergen_core.model.embeddings import TokenType
    from synergen_core.model import RECOMMEND, SEARCH

    search = np.zeros(len(ends), bool) if search is None else search
    starts = tok.offsets[:-1]
    n = np.minimum(ends - starts, max_len - search)
    hist = {k: pad_left(getattr(tok, k), ends - n, n, max_len) for k in HISTORY_KEYS}
    rows = np.nonzero(search)[0]
    if len(rows):  # the query token goes last: shift the (padded) history left by one column
        last_pos = np.where(n[rows] > 0, hist["position"][rows, -1] + 1, 0)
        for k in HISTORY_KEYS:
            hist[k][rows] = np.roll(hist[k][rows], -1, axis=1)
        query_token = {"token_type": int(TokenType.QUERY), "item_idx": 0, "query_idx": query_index[rows],
                       "action": 0, "surface": SURFACES.index(sequences_schema.SURFACE_SEARCH) + 1,
                       "position": last_pos, "ts": request_ts}
        for k, v in query_token.items():
            hist[k][rows, -1] = v
    lengths = n + search
    keep = np.nonzero(lengths > 0)[0]
    is_search = hist["token_type"][keep, -1] == TokenType.QUERY  # left-padded: the last column is the last token
    req = Requests({k: v[keep] for k, v in hist.items()}, np.zeros(len(keep), np.int64),
                   np.where(is_search, SEARCH, RECOMMEND), np.where(is_search, hist["query_idx"][keep, -1], 0),
                   np.full(len(keep), request_ts), lengths[keep])
    return req, keep


# ---- batch inference ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    top_k: int
    retrieve_n: int
    retriever: str  # "dense" or "generative"
    batch_size: int
    request_ts: float  # epoch seconds: the end of ds (the lists serve the next day)
    n_queries: int  # query indices the model reads (its own plus those appended for today's requests)
    threads: int
    progress: bool
    precision: str = "float32"  # score.precision
    # {task: "ranking" | "retrieval"} the order of each task's lists (list_order.served_orders of the model's
    # record and score.order); None: the ranking head's where the model has one
    list_order: dict[str, str] | None = None


def end_of_day(ds: str) -> float:
    d = parse_ds(ds) + dt.timedelta(days=1)
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp()


class Scorer:
    """A model (eval mode, CPU) and its candidate index scoring Arrow batches of requests.

    Input batch columns: ``surface``, ``user_id``, ``query``, ``QUERY_INDEX_COLUMN``, ``tokens``
    (``schemas.sequences.TOKENS_TYPE``, null = no history), ``CONSUMED_COLUMN`` (list<int> items to exclude).
    Output (``score``): ``scored_arrow_schema()``, one row per kept candidate.
    """

    def __init__(self, model, index, settings: Settings):
        self.model, self.index, self.settings = model.eval(), index, settings
        self.max_len = model.cfg.max_seq_len
        from synergen_core.data import TASK_NAMES

        orders = settings.list_order or dict.fromkeys(TASK_NAMES.values(), "ranking")
        head = model.cfg.w_ranking > 0  # a variant trained without it ranks by retrieval
        self.head_tasks = [code for code, name in TASK_NAMES.items() if head and orders[name] == "ranking"]

    def requests(self, batch: pa.RecordBatch):
        """-> (``synergen_core.data.Requests`` of the rows that have a history, their row numbers)."""
        from synergen_core.data import tokens_from_arrow

        tok = _known_tokens(tokens_from_arrow(batch.column(C.TOKENS)), self.model.n_items, self.settings.n_queries)
        search = np.asarray(pc.equal(batch.column(C.SURFACE), candidates_schema.SURFACE_SEARCH)
                            .to_numpy(zero_copy_only=False))
        query_index = pc.fill_null(batch.column(QUERY_INDEX_COLUMN), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        # a recommendation state ends at the last engaged item: trailing queries that engaged nothing are left out
        ends = np.where(search, tok.offsets[1:], _after_last_item(tok))
        return assemble_requests(tok, ends, self.max_len, self.settings.request_ts, search, query_index)

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        import torch

        req, kept = self.requests(batch)
        parts = []
        with torch.no_grad(), self.autocast():
            for lo in range(0, len(kept), self.settings.batch_size):
                chunk = np.arange(lo, min(lo + self.settings.batch_size, len(kept)))
                consumed = batch.column(CONSUMED_COLUMN).take(pa.array(kept[chunk]))
                parts.append(self._score_chunk(req, chunk, consumed))
        return _output(batch, kept, parts)

    def states(self, req, chunk: np.ndarray):
        """-> (hidden states [r, d] at each request's last token, the history cache for ``_rank``)."""
        import torch

        from synergen_core.data import to_batch

        b = to_batch(req.history, chunk, req.lengths, torch.device("cpu"))
        b["request_ts"] = torch.from_numpy(req.ts[chunk])
        hidden, cache = self.model.encode(b)
        return self.model.last_hidden(b, hidden), cache

    def request_vectors(self, req, chunk: np.ndarray) -> np.ndarray:
        """[r, d] unit vectors the dense retriever searches with."""
        import torch

        with torch.no_grad(), self.autocast():
            return self.model.retrieval.query(self.states(req, chunk)[0], self._search(req, chunk)).float().numpy()

    def _search(self, req, chunk: np.ndarray):
        """[r] bool tensor: which requests of the chunk are searches (their own query tower, if any)."""
        import torch

        from synergen_core.model import SEARCH

        return torch.from_numpy(req.task[chunk] == SEARCH)

    def autocast(self):
        """The model's passes in ``score.precision``: bfloat16 autocast, or a no-op for float32."""
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.precision == "bfloat16")

    def _score_chunk(self, req, chunk: np.ndarray, consumed: pa.ListArray) -> tuple:
        """-> (chunk rows, items [r, K], retrieval [r, K], ranking [r, K], valid [r, K])."""
        h, cache = self.states(req, chunk)
        extra = int(pc.max(pc.list_value_length(consumed)).as_py() or 0)  # over-fetch what exclusion removes
        if self.settings.retriever == "generative":
            items, retr = self._generate(h, req.task[chunk], self.settings.retrieve_n + extra)
        else:
            search = self._search(req, chunk)
            q = self.model.retrieval.query(h, search).float().numpy()
            scores, items = self.index.search(q, self.settings.retrieve_n + extra, self.exact_scores)
            temperature = self.model.temperature(search).detach().float().numpy()  # [] or [r, 1]
            retr = scores / temperature  # the model's retrieval logit
        cand, retr, valid = _first_valid(items, retr, _consumed_mask(items, consumed, self.model.n_items),
                                         self.settings.retrieve_n)
        by_head = np.isin(req.task[chunk], self.head_tasks)  # [r] the rest keep the retrieval order
        ranking = np.where(by_head[:, None], self._rank(cache, cand), retr) if by_head.any() else retr.copy()
        ranking[~valid] = -np.inf
        order = np.argsort(-ranking, axis=1, kind="stable")[:, : self.settings.top_k]  # ties keep the retrieval order
        take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
        return chunk, take(cand), take(retr), take(ranking), take(valid)

    def exact_scores(self, queries: np.ndarray, items: np.ndarray) -> np.ndarray:
        """queries [r, d] unit request vectors, items [r, w] -> [r, w] their inner products with the items'
        vectors (what an IVF-PQ index re-ranks its approximate hits by)."""
        import torch

        # float32 even under score.precision bfloat16: these scores order the list and are written out
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            vectors = self.model.item_vectors(torch.from_numpy(items)).float()  # [r, w, d]
            return torch.einsum("rd,rwd->rw", torch.from_numpy(queries).float(), vectors).numpy()

    def _generate(self, h, task: np.ndarray, beam: int) -> tuple[np.ndarray, np.ndarray]:
        """Beam search per semantic-ID view -> (items [r, w], log-probabilities [r, w]; 0 / -inf when missing)."""
        from synergen_core.model import SEARCH

        if self.model.semantic is None:
            raise ConfigError("score.retriever=generative needs a model with a semantic-ID head (model.semantic_head)")
        width = min(beam, max(len(t) for t in self.model.tries.values()))
        items = np.zeros((len(task), width), np.int64)
        scores = np.full((len(task), width), -np.inf, np.float32)
        view_of_row = np.where(task == SEARCH, self.model.view_of("search"), "rec")  # [r]
        for view in np.unique(view_of_row):
            rows = np.nonzero(view_of_row == view)[0]
            res = self.model.generate(h[rows], min(width, len(self.model.tries[view])), str(view))
            w = res.items.shape[1]
            items[rows, :w], scores[rows, :w] = res.items.numpy(), res.scores.float().numpy()
        return items, scores

    def _rank(self, cache: dict, cand: np.ndarray) -> np.ndarray:
        """[r, N] ranking-head logits of the candidates after each request's (cached) history."""
        import torch

        return self.model.rank_cached(cache, torch.from_numpy(cand)).float().numpy()


def _known_tokens(tok, n_items: int, n_queries: int):
    """``tok`` without the tokens of items and queries the model has no row for (added after its training)."""
    from synergen_core.model.embeddings import TokenType

    ok = (((tok.token_type != TokenType.ITEM) | (tok.item_idx < n_items))
          & ((tok.token_type != TokenType.QUERY) | (tok.query_idx < n_queries)))
    return tok if ok.all() else tok.keep(ok)


def _after_last_item(tok) -> np.ndarray:
    """[R] offset just after each row's last item token (the row's start when it has none)."""
    from synergen_core.model.embeddings import TokenType

    items = np.nonzero(tok.token_type == TokenType.ITEM)[0]  # ascending
    k = np.searchsorted(items, tok.offsets[1:]) - 1  # the last item token before each row's end
    found = (k >= 0) & (items[np.maximum(k, 0)] >= tok.offsets[:-1]) if len(items) else np.zeros(len(k), bool)
    return np.where(found, items[np.maximum(k, 0)] + 1 if len(items) else 0, tok.offsets[:-1])


def _consumed_mask(items: np.ndarray, consumed: pa.ListArray, n_items: int) -> np.ndarray:
    """items [r, w] -> [r, w] bool: the item is in its row's consumed list."""
    values = pc.list_flatten(consumed).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(values) == 0:
        return np.zeros(items.shape, bool)
    parents = pc.list_parent_indices(consumed).to_numpy(zero_copy_only=False).astype(np.int64)
    keys = np.arange(len(items))[:, None] * n_items + items  # (row, item) as one int64
    return np.isin(keys, parents * n_items + values)


def _first_valid(items: np.ndarray, scores: np.ndarray, excluded: np.ndarray, n: int):
    """The first ``n`` retrieved items of each row that exist and are not excluded, in retrieval order
    -> (items [r, n'], scores [r, n'], valid [r, n']); n' = min(n, w), invalid slots hold item 0."""
    invalid = excluded | (items <= 0) | ~np.isfinite(scores)
    order = np.argsort(invalid, axis=1, kind="stable")[:, :n]
    valid = ~np.take_along_axis(invalid, order, 1)
    cand = np.where(valid, np.take_along_axis(items, order, 1), 0)
    return cand, np.where(valid, np.take_along_axis(scores, order, 1), 0.0).astype(np.float32), valid


def scored_arrow_schema() -> pa.Schema:
    return pa.schema([(C.SURFACE, pa.string()), (C.USER_ID, pa.string()), (C.QUERY, pa.string()),
                      (C.RANK, pa.int32()), (C.ITEM_INDEX, pa.int32()), (C.RETRIEVAL_SCORE, pa.float32()),
                      (C.RANKING_SCORE, pa.float32())])


def _output(batch: pa.RecordBatch, kept: np.ndarray, parts: list[tuple]) -> pa.RecordBatch:
    """Scored chunks -> one row per valid candidate (``scored_arrow_schema()``)."""
    cols: list[list[np.ndarray]] = [[] for _ in range(5)]  # source row, rank, item, retrieval, ranking
    for chunk, items, retr, ranking, valid in parts:  # chunks differ in width when the catalog is small
        r, c = np.nonzero(valid)  # row-major: request by request, rank by rank (valid slots come first)
        for out, v in zip(cols, (kept[chunk[r]], c + 1, items[r, c], retr[r, c], ranking[r, c])):
            out.append(v)
    src, rank, item, retr, ranking = (np.concatenate(v) if v else np.zeros(0) for v in cols)
    src = pa.array(src.astype(np.int64))
    return pa.RecordBatch.from_arrays(
        [batch.column(C.SURFACE).take(src), batch.column(C.USER_ID).take(src), batch.column(C.QUERY).take(src),
         pa.array(rank, pa.int32()), pa.array(item, pa.int32()), pa.array(retr, pa.float32()),
         pa.array(ranking, pa.float32())],
        schema=scored_arrow_schema())


TABLES_FILE, INDEX_DIR = "tables.pt", "index"


def write_payload(record: dict, cand_index, settings: Settings, folder, source: str) -> dict:
    """What scoring's workers build their ``Scorer`` from (``build_scorer``): a ``checkpoint.serving_record``
    split into files they memory-map (its catalog-sized tensors: content tables, semantic IDs; the
    candidate index) in ``folder`` (a path every worker reads: the lake) and the small value to broadcast
    (the other weights, whose size does not grow with the catalog, settings, the paths).
    ``source``: the model file the record came from, named if a worker refuses it."""
    from pathlib import Path

    folder = Path(folder)
    sd = record["state_dict"]
    checkpoint.save({k: sd[k] for k in checkpoint.CATALOG_TENSORS if k in sd}, folder / TABLES_FILE)
    rest = {**record, "state_dict": {k: v for k, v in sd.items() if k not in checkpoint.CATALOG_TENSORS}}
    return {"record": checkpoint.to_bytes(rest), "source": source, "settings": settings,
            "tables": str(folder / TABLES_FILE),
            "index": None if cand_index is None else str(cand_index.write(folder / INDEX_DIR))}


def build_scorer(payload: dict) -> Scorer:
    """The ``Scorer`` of a ``write_payload`` value: model weights, content tables and index memory-mapped."""
    import faiss
    import torch

    from synergen_core.index import CandidateIndex

    s: Settings = payload["settings"]
    torch.set_num_threads(s.threads)  # Spark tasks already run in parallel: more threads only contend
    faiss.omp_set_num_threads(s.threads)
    # weights only: the bytes are a model file's record, and a pickled object in it would run code here
    record = checkpoint.from_bytes(payload["record"], payload.get("source", "the model record"))
    record["state_dict"].update(checkpoint.load(payload["tables"], mmap=True))
    model = checkpoint.build_from_record(record)
    index = CandidateIndex.read(payload["index"]) if payload["index"] is not None else None
    return Scorer(model, index, s)


# ---- the registry's pyfunc ----------------------------------------------------------------------

try:
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class SynerGenPyfunc(_PythonModel):
    """``model.pt`` as an MLflow pyfunc: next-item retrieval for a batch of token sequences.

    Input: a DataFrame, one row per request, list columns of equal length per row, oldest token first:
    ``item_idx`` (required), ``token_type`` (1 item, 2 query; default: 1 where item_idx > 0 else 2 where
    query_idx > 0), ``query_idx``, ``action``, ``surface``, ``position`` (default 0..n-1), ``ts`` (epoch
    seconds, default 0). A request whose last token is a query asks for search, else recommendation.
    Indices the model does not know are read as unknown. Params: ``k`` (default 10).
    Output: DataFrame ``items`` (top-k item indices, best first) and ``scores`` (what they are ordered by).

    The k best items by retrieval are served in the order the scoring stage serves the task's lists
    (``synergen_core.list_order.served_orders`` of the model file's record, ``score.order`` auto): by
    retrieval (``scores``: retrieval logits), or re-ordered by the ranking head (``scores``: its logits,
    the request at the time of its latest token).
    """

    def load_context(self, context) -> None:
        from pathlib import Path

        from synergen_core.data import TASK_NAMES
        from synergen_core.list_order import served_orders

        path = Path(context.artifacts[ARTIFACT])
        record = checkpoint.load(path if path.suffix == ".pt" else path / checkpoint.MODEL)
        self.model = checkpoint.build_from_record(record, "cpu")
        orders = served_orders(record)
        self.head_tasks = [code for code, name in TASK_NAMES.items() if orders[name] == "ranking"]

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from synergen_core.data import to_batch
        from synergen_core.evaluate import fit_history, model_vocab

        model = self.model
        k = int((params or {}).get("k", 10))
        tok = tokens_from_frame(pd.DataFrame(model_input), model.cfg.max_seq_len)
        req, rows = assemble_requests(tok, tok.offsets[1:], model.cfg.max_seq_len, 0.0)
        history = fit_history(req.history, *model_vocab(model))
        out_items, out_scores = [[] for _ in range(len(tok.lengths))], [[] for _ in range(len(tok.lengths))]
        if len(rows):
            with torch.no_grad():
                batch = to_batch(history, np.arange(len(rows)), req.lengths, "cpu")
                hidden = model(batch)
                logits = model.request_logits(batch, hidden).float()
                top = logits.topk(min(k, logits.shape[1] - 1), dim=1)
                items, scores = self._in_served_order(batch, req.task, top.indices, top.values)
            for j, r in enumerate(rows):
                out_items[r] = items[j].tolist()
                out_scores[r] = [float(s) for s in scores[j].tolist()]
        return pd.DataFrame({"items": out_items, "scores": out_scores})

    def _in_served_order(self, batch: dict, task: np.ndarray, items, scores):
        """items, scores [n, k] in retrieval order -> the same, re-ordered by the ranking head (and its
        logits) in the rows of the tasks it orders; ``batch`` the requests' histories (left-padded)."""
        import torch

        rows = torch.from_numpy(np.nonzero(np.isin(task, self.head_tasks))[0])
        if len(rows) == 0 or items.shape[1] == 0:
            return items, scores
        sub = {key: v[rows] for key, v in batch.items()}
        sub.update(candidates=items[rows], request_ts=sub["ts"][:, -1])  # the last column: the latest token
        head = self.model.ranking_scores(sub, self.model(sub)).float()
        order = head.argsort(dim=1, descending=True, stable=True)
        items, scores = items.clone(), scores.clone()
        items[rows], scores[rows] = items[rows].gather(1, order), head.gather(1, order)
        return items, scores


def tokens_from_frame(df, max_len: int) -> Tokens:
    """The pyfunc's input DataFrame -> ``Tokens`` of each row's latest ``max_len`` tokens, missing columns
    and null cells filled with their defaults (see ``SynerGenPyfunc``)."""
    import pandas as pd

    from synergen_core.model.embeddings import TokenType

    columns: dict[str, list[np.ndarray]] = {c: [] for c in INPUT_COLUMNS}
    lengths = []
    for r in range(len(df)):
        items = np.asarray(df["item_idx"].iloc[r], np.int64)
        n = min(len(items), max_len)

        def cell(col: str, default: np.ndarray) -> np.ndarray:  # the column's last n values, or the default
            v = df[col].iloc[r] if col in df.columns else None
            if v is None or (np.isscalar(v) and pd.isna(v)):
                return default
            return np.broadcast_to(np.asarray(v)[-n:] if n else np.asarray(v)[:0], (n,))

        row = {"item_idx": items[len(items) - n:]}
        row["query_idx"] = cell("query_idx", np.zeros(n, np.int64)).astype(np.int64)
        row["token_type"] = cell("token_type", np.where(row["item_idx"] > 0, int(TokenType.ITEM),
                                                        np.where(row["query_idx"] > 0, int(TokenType.QUERY), 0)))
        row.update({c: cell(c, default) for c, default in
                    (("action", np.zeros(n)), ("surface", np.zeros(n)), ("position", np.arange(n)),
                     ("ts", np.zeros(n)))})
        for c in INPUT_COLUMNS:
            columns[c].append(row[c])
        lengths.append(n)
    flat = {c: np.concatenate(v).astype(np.float64 if c == "ts" else np.int64) if v
            else np.zeros(0, np.float64 if c == "ts" else np.int64) for c, v in columns.items()}
    return Tokens(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64), **flat)


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    long_, double = DataType.long, DataType.double
    inputs = Schema([ColSpec(Array(long_), "item_idx")]
                    + [ColSpec(Array(double if c == "ts" else long_), c, required=False)
                       for c in INPUT_COLUMNS if c != "item_idx"])
    outputs = Schema([ColSpec(Array(long_), "items"), ColSpec(Array(double), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", long_, 10)]))


def input_example(cfg: Config, ds: str, protocol: str, rows: int = 3):
    """A few of the day's test requests (real token sequences) as the pyfunc's input DataFrame: the first
    ``rows`` with a context, read batch by batch from the split's files (not the whole day's test set)."""
    import pandas as pd

    from synergen_core.data import first_requests

    req = first_requests(cfg.layout.part(cfg.layout.split(protocol, "eval"), ds), cfg.model.max_seq_len, rows)
    data: dict[str, list] = {c: [] for c in INPUT_COLUMNS}
    for r in range(len(req)):
        n = int(req.lengths[r])
        for c in INPUT_COLUMNS:
            v = req.history[c][r, len(req.history[c][r]) - n:]
            data[c].append([float(x) for x in v] if c == "ts" else [int(x) for x in v])
    if not data["item_idx"]:
        data = {"item_idx": [[1, 2]], "token_type": [[1, 1]], "ts": [[0.0, 60.0]]}
    return pd.DataFrame(data)


def pyfunc_requirements() -> list[str]:
    import mlflow
    import pandas
    import torch

    # The serving environment also needs this project's package (synergen) at the version tagged
    # synergen.code_version: the model class and its loader live there.
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"]
