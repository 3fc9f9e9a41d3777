"""The candidate index: the catalog items nearest a request vector by inner product (the model's item and
request vectors are unit length, so this is cosine similarity).

* exact: ``IndexFlatIP`` while the catalog has at most ``score.exact_max_items`` items;
* approximate beyond: IVF-Flat (``IndexIVFFlat``, inner product), and from ``score.pq_min_items`` items
  IVF-PQ (``IndexIVFPQ``: d / 2 sub-quantizers of 8 bits, 32 bytes an item at d = 64 against 256 for
  the float vector). PQ scores are approximate, so a PQ search fetches ``score.pq_refine`` x k items and
  re-scores them exactly with vectors the caller computes (``search(..., exact=)``: the scorer has the
  model's item content table, so the index need not hold the vectors a second time). IVF was chosen over HNSW because
  (1) it builds deterministically (seeded k-means on a seeded sample, then a plain assignment), so a rerun
  of a day gives the same lists, where HNSW's multi-threaded insertion makes a different graph each time;
  (2) its recall knob, ``nprobe``, is set after the build, so the measurement can raise it without a
  rebuild; (3) it stores the vectors plus the centroids, where HNSW adds 2 x M links per item.

The approximate index is measured, not assumed: its recall@k against exact search on a sample of real
request vectors picks the smallest ``nprobe`` (1, 2, 4 ... up to nlist / 4, past which IVF scans about as
much as exact search) that reaches ``min_recall``. When none does, the exact index is used and the report
says so. ``CandidateIndex.report`` holds the choice and its figures.

``write`` / ``read`` keep an index as files that scoring's workers memory-map (``faiss.IO_FLAG_MMAP``):
they share the pages through the OS cache instead of each holding a deserialized copy.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

# faiss (1.15) runs exact search through its BLAS kernel only from nq x d >= 128,000, i.e. 2,000 queries
# per call at d = 64; below that it scans query by query, several times slower per query (and on the
# machines tried, no faster even for a single query). Scoring searches score.batch_size requests at a
# time and measures recall on ~1,000, so: BLAS always. Set once here: a process-wide faiss setting.
faiss.cvar.distance_compute_blas_threshold = 0

EXACT, IVF, IVFPQ = "exact", "ivf", "ivfpq"
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.npy", "index.json"
# exact inner products of queries [q, d] with the items [q, w] each row fetched -> [q, w]
ExactScores = Callable[[np.ndarray, np.ndarray], np.ndarray]
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF list: faiss asks for >= 39; more costs build time only


@dataclass
class CandidateIndex:
    index: faiss.Index  # rows 0..n-1 hold the vectors of items ``ids``
    ids: np.ndarray  # [n] int64 item index of every row
    kind: str  # EXACT, IVF or IVFPQ
    report: dict = field(default_factory=dict)  # what was measured and chosen
    refine: int = 1  # IVFPQ: items fetched per item returned, re-scored exactly

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, exact: ExactScores | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [q, d] -> (inner products [q, k'] best first, item indices [q, k']); k' = min(k, catalog
        size). Never fewer: an IVF search whose probed lists hold fewer than k' items probes them all.
        ``exact``: re-scores what a PQ index fetched (required for IVFPQ: its own scores are approximate)."""
        k = min(k, len(self.ids))
        fetch = min(k * self.refine, len(self.ids))
        scores, rows = search(self.index, queries, fetch)
        short = (rows[:, :k] < 0).any(1)  # IVF: the probed lists held fewer than k items
        if self.kind != EXACT and short.any():  # those requests are searched exhaustively (all lists)
            ivf = faiss.extract_index_ivf(self.index)
            nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
            try:
                scores[short], rows[short] = search(self.index, queries[short], fetch)
            finally:
                ivf.nprobe = nprobe
        items = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], 0)
        if self.kind == IVFPQ:
            if exact is None:
                raise ValueError("an IVF-PQ index needs exact scores to re-rank what it fetched")
            scores = np.where(rows >= 0, exact(queries, items), -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, items = np.take_along_axis(scores, order, 1), np.take_along_axis(items, order, 1)
        return scores, items

    def write(self, folder: Path) -> Path:
        """The index as files in ``folder`` (``read`` maps them back)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        np.save(folder / IDS_FILE, self.ids)
        (folder / META_FILE).write_text(json.dumps({"kind": self.kind, "refine": self.refine, "report": self.report}))
        return folder

    @staticmethod
    def read(folder: Path) -> CandidateIndex:
        """``write``'s files, memory-mapped (read-only): processes reading the same files share their pages."""
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        mmap = faiss.IO_FLAG_MMAP_IFC if meta["kind"] == EXACT else faiss.IO_FLAG_MMAP
        index = faiss.read_index(str(folder / INDEX_FILE), mmap | faiss.IO_FLAG_READ_ONLY)
        if meta["kind"] != EXACT:
            faiss.extract_index_ivf(index).nprobe = meta["report"]["nprobe"]
        return CandidateIndex(index, np.load(folder / IDS_FILE, mmap_mode="r"), meta["kind"], meta["report"],
                              meta["refine"])


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_index(vectors: np.ndarray) -> faiss.IndexFlatIP:
    """vectors [n, d] -> a flat inner-product index over them (rows in order)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(_f32(vectors))
    return index


def default_nlist(n: int) -> int:
    """About sqrt(n) lists, and never fewer than 39 training points per list."""
    return max(1, min(round(math.sqrt(n)), n // 39))


def ivf_index(vectors: np.ndarray, nlist: int, seed: int) -> faiss.IndexIVFFlat:
    """vectors [n, d] -> IVF-Flat over them, its coarse quantizer trained by seeded k-means on a seeded sample."""
    n, d = vectors.shape
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(n, min(n, nlist * TRAIN_POINTS_PER_LIST), replace=False)
    index.train(_f32(vectors[np.sort(sample)]))
    index.add(_f32(vectors))
    return index


def ivfpq_index(vectors: np.ndarray, nlist: int, seed: int) -> faiss.IndexIVFPQ:
    """vectors [n, d] -> IVF-PQ over them: d / 2 sub-quantizers of 8 bits (two dimensions a byte), the coarse
    and product quantizers trained by seeded k-means on the same seeded sample."""
    n, d = vectors.shape
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, d // 2, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = index.pq.cp.seed = seed
    sample = np.random.default_rng(seed).choice(n, min(n, max(nlist * TRAIN_POINTS_PER_LIST, 256 * 39)), replace=False)
    index.train(_f32(vectors[np.sort(sample)]))
    index.add(_f32(vectors))
    return index


def exact_scores(vectors: np.ndarray, ids: np.ndarray) -> ExactScores:
    """``ExactScores`` from the vectors [n, d] of items ``ids`` [n] (ascending)."""
    def scores(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
        rows = np.clip(np.searchsorted(ids, items), 0, len(ids) - 1)
        return np.einsum("qd,qwd->qw", _f32(queries), vectors[rows])
    return scores


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [q, d] -> (scores [q, k], rows [q, k]; -1 where the index returned fewer)."""
    if len(queries) == 0 or k == 0:
        return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
    return index.search(_f32(queries), k)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top-k (``truth`` [q, k], -1 = none) that ``found`` [q, k] holds."""
    hits = total = 0
    for f, t in zip(found, truth):  # q rows of k: small next to the searches that produced them
        t = t[t >= 0]
        hits += np.isin(t, f).sum()
        total += len(t)
    return float(hits / total) if total else 1.0


def tune_nprobe(ivf: CandidateIndex, queries: np.ndarray, truth: np.ndarray, k: int,
                min_recall: float, exact: ExactScores | None = None) -> tuple[int | None, dict[int, float]]:
    """The smallest nprobe (doubling from 1, at most nlist / 4) whose recall@k reaches ``min_recall``
    (None when none does) and the recall measured at every nprobe tried (``truth``: exact top-k items)."""
    tried: dict[int, float] = {}
    inner = faiss.extract_index_ivf(ivf.index)
    nprobe, cap = 1, max(1, inner.nlist // 4)
    while nprobe <= cap:
        inner.nprobe = nprobe
        tried[nprobe] = recall_at_k(ivf.search(queries, k, exact)[1], truth)
        if tried[nprobe] >= min_recall:
            return nprobe, tried
        nprobe *= 2
    return None, tried


def build(vectors: np.ndarray, ids: np.ndarray, sample: np.ndarray | None, k: int, exact_max_items: int,
          min_recall: float, nlist: int | None = None, seed: int = 0, pq_min_items: int | None = None,
          pq_refine: int = 2) -> CandidateIndex:
    """The candidate index over ``vectors`` [n, d] of items ``ids`` [n] (ascending; see the module doc).

    ``sample`` [q, d]: real request vectors the approximate index is measured on (needed only when n >
    ``exact_max_items``); ``k``: the retrieval depth the recall is measured at; IVF-PQ from
    ``pq_min_items`` items (None: never), fetching ``pq_refine`` x k to re-score exactly.
    """
    n = len(ids)
    ids = np.asarray(ids, np.int64)
    if n <= exact_max_items:
        return CandidateIndex(exact_index(vectors), ids, EXACT,
                              {"kind": EXACT, "items": n, "why": f"{n} items <= score.exact_max_items"})
    if sample is None or len(sample) == 0:
        raise ValueError("an approximate index needs a sample of request vectors to measure its recall")
    k = min(k, n)
    nlist = min(nlist or default_nlist(n), n)
    pq = pq_min_items is not None and n >= pq_min_items
    if pq:
        ivf = CandidateIndex(ivfpq_index(vectors, nlist, seed), ids, IVFPQ, refine=pq_refine)
    else:
        ivf = CandidateIndex(ivf_index(vectors, nlist, seed), ids, IVF)
    flat = exact_index(vectors)
    rows = search(flat, sample, k)[1]
    truth = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    nprobe, tried = tune_nprobe(ivf, sample, truth, k, min_recall, exact_scores(vectors, ids))
    report = {"items": n, "nlist": nlist, "recall_k": k, "sample": len(sample), "min_recall": min_recall,
              "recall_by_nprobe": {str(p): round(r, 4) for p, r in tried.items()}}
    if pq:
        report.update(pq_bytes_per_item=vectors.shape[1] // 2, pq_refine=pq_refine)
    name = "IVF-PQ" if pq else "IVF"
    if nprobe is None:
        best = max(tried.values())
        return CandidateIndex(flat, ids, EXACT, {
            **report, "kind": EXACT, "ann_recall": best,
            "why": f"{name} recall@{k} {best:.4f} < score.min_ann_recall {min_recall} at every nprobe up to "
                   f"{max(tried)}: fell back to exact search"})
    faiss.extract_index_ivf(ivf.index).nprobe = nprobe
    ivf.report = {**report, "kind": ivf.kind, "nprobe": nprobe, "ann_recall": tried[nprobe],
                  "why": f"{n} items > score.exact_max_items; {name} recall@{k} {tried[nprobe]:.4f} >= {min_recall} "
                         f"at nprobe {nprobe}"}
    return ivf
