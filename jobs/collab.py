"""Stage 3b: one collaborative vector per item of the day's vocabulary, the recommendation view of the
semantic IDs: ``<lake>/<embeddings.output>/collab/ds=D`` (``schemas.semantic_ids.COLLAB_EMBEDDINGS``).

Where the vectors come from, in order:

1. The champion model's item embeddings, through a hook: ``run(..., champion=loader)`` with
   ``loader(cfg, ds) -> ChampionVectors | None``, or ``embeddings.champion_vectors`` naming a Parquet file or
   folder of (item_id, vector) rows exported from it (``load_champion_file``). Their space is rotated onto
   yesterday's (orthogonal Procrustes over the items both have a real vector for), so the RQ-VAE trained on
   yesterday's vectors still fits and IDs stay put; for an unchanged champion that rotation is yesterday's.
   The table's ``basis`` names the champion ``version``: a new one tells the semantic-ID stage to retrain.
2. Otherwise yesterday's table: its vectors are carried over unchanged. A refit would put the vectors in
   an unrelated space (ALS factors are only defined up to rotation), and the warm-started RQ-VAE would then
   re-code every item.
3. Otherwise (the first run) Spark MLlib's implicit-feedback ALS over user-item engagement counts from
   the sessionized events up to D; rows are L2-normalized, so the IDs group items by who engages with
   them rather than by how popular they are.

Items without a vector from those (no engagements, not known to the champion, new since yesterday) get
the similarity-weighted mean of the vectors of their ``embeddings.fallback_neighbours`` nearest items by
text (cosine, exact faiss search). Chosen over a linear text->collab projection: the mean stays among
real collaborative vectors (a least-squares projection shrinks towards the global mean and, with fewer
engaged items than text dimensions, overfits), and a cold item lands next to the items it resembles,
so its rec ID shares their prefix, which is what cold-start recommendation needs. Fallback vectors are
recomputed every run from today's text vectors (an item's text may have changed); ``computed_ds`` moves
only when the vector did.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.spark import read_days
from jobs.text_vectors import ITEMS
from schemas import C
from schemas.semantic_ids import COLLAB_EMBEDDINGS, SOURCE_ALS, SOURCE_CHAMPION, SOURCE_TEXT
from schemas.sequences import EVENTS
from synergen_core import lake
from synergen_core.config import Config, parse_ds
from synergen_core.vectors import unit_rows, vectors_array, vectors_matrix

log = logging.getLogger(__name__)

COLLAB = "collab"
META_FILE = "_collab.json"
FALLBACK_BATCH = 65_536  # cold items per neighbour search: bounds the [batch, k, dim] gather


@dataclass
class ChampionVectors:
    """Item embeddings of the champion model. ``version`` identifies the model: another version means
    another vector space, which is aligned to yesterday's before use."""

    version: str
    item_ids: Sequence[str]
    vectors: np.ndarray  # [n, dim]


ChampionLoader = Callable[[Config, str], "ChampionVectors | None"]


def load_champion_file(path: str | Path) -> ChampionVectors:
    """(item_id, vector) rows from a Parquet file or folder; the version is a hash of the content."""
    t = pq.read_table(path, columns=[C.ITEM_ID, C.VECTOR])
    ids = t[C.ITEM_ID].to_pylist()
    vecs = vectors_matrix(t[C.VECTOR])
    digest = hashlib.sha256("\n".join(ids).encode())
    digest.update(vecs.tobytes())
    return ChampionVectors(f"sha256:{digest.hexdigest()[:16]}", ids, vecs)


def champion_from_config(cfg: Config, ds: str) -> ChampionVectors | None:
    path = cfg.embeddings.champion_vectors
    return load_champion_file(path) if path is not None else None


def champion_from_registry(cfg: Config, ds: str) -> ChampionVectors | None:
    """The collaborative (ID) embeddings of ``models:/<name>@champion``, or None without a champion.

    Only items the champion saw engaged before its training day (item vocabulary count > 0 on the day its
    version was trained) are returned: the ID rows of the others were never trained. The version is the
    registry version, so a promotion is a new vector space for the semantic-ID stage."""
    from synergen_core import checkpoint, registry

    name = registry.model_name(cfg)
    try:
        path, _, version = registry.download_model(cfg, f"models:/{name}@{registry.CHAMPION}")
    except registry.RegistryError:
        return None  # no registered model, or no champion yet: the first run
    model = checkpoint.load_model(path)
    if model.embed.id_emb is None:
        return None  # an ID-free champion has no collaborative vectors
    trained_ds = registry.client(cfg).get_model_version(name, version).tags.get("synergen.ds")
    vocab_part = lake.partition(cfg.lake.root, cfg.layout.sessions("item_vocab"), trained_ds or ds)
    vocab = pq.read_table(vocab_part, columns=[C.ITEM_INDEX, C.ITEM_ID, C.COUNT])
    idx = vocab[C.ITEM_INDEX].to_numpy().astype(np.int64)
    keep = (vocab[C.COUNT].to_numpy() > 0) & (idx < model.n_items)
    weights = model.embed.id_emb.weight.detach().cpu().numpy()
    return ChampionVectors(f"{name}/{version}", list(np.asarray(vocab[C.ITEM_ID].to_pylist(), object)[keep]),
                           weights[idx[keep]].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# the three sources and the fallback


def als_vectors(spark: SparkSession, cfg: Config, ds: str) -> tuple[np.ndarray, np.ndarray]:
    """Implicit-feedback ALS over engagement counts of events up to ``ds``.

    Returns (item_index [m] ascending, unit vectors [m, rank]) of the m items with an engagement.
    """
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.recommendation import ALS

    e = cfg.embeddings
    events = read_days(spark, cfg.lake.root, cfg.layout.sessions("events"), EVENTS, upto=ds)
    # an event with an item is an engagement (a search that engaged nothing has none); repeats add confidence
    eng = (events.where(F.col(C.ITEM_INDEX).isNotNull())
           .groupBy(C.USER_ID, C.ITEM_INDEX).agg(F.count("*").cast("float").alias("_weight")))
    users = StringIndexer(inputCol=C.USER_ID, outputCol="_user", stringOrderType="alphabetAsc").fit(eng)
    ratings = users.transform(eng).select(F.col("_user").cast("int").alias("_user"), C.ITEM_INDEX, "_weight")
    blocks = max(1, cfg.spark.shuffle_partitions)
    als = ALS(rank=e.als_rank, maxIter=e.als_max_iter, regParam=e.als_reg, alpha=e.als_alpha, implicitPrefs=True,
              userCol="_user", itemCol=C.ITEM_INDEX, ratingCol="_weight", seed=cfg.semantic_ids.seed,
              numUserBlocks=blocks, numItemBlocks=blocks)
    factors = als.fit(ratings).itemFactors.toArrow()  # id, features
    order = np.argsort(factors["id"].to_numpy())
    return factors["id"].to_numpy()[order].astype(np.int64), unit_rows(vectors_matrix(factors["features"])[order])


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The rotation R minimizing ||new @ R - old|| over paired rows (orthogonal Procrustes)."""
    u, _, vt = np.linalg.svd(new.T.astype(np.float64) @ old.astype(np.float64))
    return (u @ vt).astype(np.float32)


def text_neighbour_vectors(anchor_text: np.ndarray, anchor_vecs: np.ndarray, text: np.ndarray, k: int) -> np.ndarray:
    """For each row of ``text``: the mean of ``anchor_vecs`` of its k nearest anchors by text cosine,
    weighted by the (positive) similarity; the anchors' mean where no anchor is similar (e.g. no text)."""
    import faiss

    if len(anchor_text) == 0:
        raise ValueError("no item has a collaborative vector (no engagements and no champion vectors): "
                         "the fallback has nothing to average")
    index = faiss.IndexFlatIP(anchor_text.shape[1])
    index.add(unit_rows(anchor_text))
    k = min(k, len(anchor_text))
    out = np.empty((len(text), anchor_vecs.shape[1]), np.float32)
    mean = anchor_vecs.mean(0)
    for i in range(0, len(text), FALLBACK_BATCH):
        sims, nn = index.search(unit_rows(text[i:i + FALLBACK_BATCH]), k)  # [b, k]
        w = np.clip(sims, 0.0, None)
        v = (w[..., None] * anchor_vecs[nn]).sum(1)  # [b, dim]
        none = w.sum(1) <= 1e-6
        v[none] = mean
        out[i:i + FALLBACK_BATCH] = v
    return unit_rows(out)


# ---------------------------------------------------------------------------------------------
# the job


def run(spark: SparkSession, cfg: Config, ds: str, champion: ChampionLoader | None = None) -> dict:
    """Write ``collab/ds=D`` for the items of ``items/ds=D`` (text vectors of the same day must exist)."""
    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    root = Path(cfg.lake.root)
    items = lake.read_partition(root, cfg.layout.vectors(ITEMS), ds, [C.ITEM_INDEX, C.ITEM_ID, C.VECTOR])
    items = items.sort_by(C.ITEM_INDEX)
    index, item_ids = items[C.ITEM_INDEX].to_numpy().astype(np.int64), np.asarray(items[C.ITEM_ID].to_pylist(), object)
    text = vectors_matrix(items[C.VECTOR])
    n = len(index)

    prev_ds = cfg.layout.day_before(cfg.layout.vectors(COLLAB), ds)  # yesterday's vectors: the state
    prev_meta = lake.read_meta(root, cfg.layout.vectors(COLLAB), prev_ds, META_FILE) if prev_ds else None
    prev = _previous(root, cfg, prev_ds, item_ids) if prev_ds else None
    loader = champion or (champion_from_config if cfg.embeddings.champion_vectors is not None else None)
    champ = loader(cfg, ds) if loader is not None else None

    has = np.zeros(n, bool)
    source = np.full(n, SOURCE_TEXT, object)
    computed = np.full(n, ds, object)
    stats: dict = {"ds": ds, "previous_ds": prev_ds}
    if champ is not None:
        vecs, has = _champion_rows(champ, item_ids)
        stats.update(mode="champion", basis=f"champion:{champ.version}", champion_items=int(len(champ.item_ids)))
        if prev is not None:
            stats.update(_align(vecs, has, prev))
        source[has] = SOURCE_CHAMPION
    elif prev is not None:
        vecs = np.zeros((n, prev["dim"]), np.float32)
        has = prev["found"] & (prev["source"] != SOURCE_TEXT)
        vecs[has] = prev["vecs"][has]
        source[has] = prev["source"][has]
        stats.update(mode="carried", basis=prev_meta.get("basis") if prev_meta else None)
    else:
        t_als = time.perf_counter()
        als_index, als_vecs = als_vectors(spark, cfg, ds)
        vecs = np.zeros((n, als_vecs.shape[1]), np.float32)
        pos = np.searchsorted(index, als_index)
        ok = (pos < n) & (index[np.minimum(pos, n - 1)] == als_index)
        vecs[pos[ok]], has[pos[ok]] = als_vecs[ok], True
        source[has] = SOURCE_ALS
        stats.update(mode="als", basis=f"als:{ds}", als_items=int(len(als_index)),
                     als_seconds=round(time.perf_counter() - t_als, 3))

    cold = ~has
    if cold.any():
        vecs[cold] = text_neighbour_vectors(text[has], vecs[has], text[cold], cfg.embeddings.fallback_neighbours)
    if prev is not None and prev["dim"] == vecs.shape[1]:
        # lineage: a vector that came out as yesterday's (carried, recomputed fallback, same champion) keeps
        # the day it was made
        same = prev["found"] & (prev["source"] == source) & np.isclose(prev["vecs"], vecs, atol=1e-6).all(1)
        computed[same] = prev["computed"][same]

    out = pa.table({
        C.ITEM_INDEX: pa.array(index, pa.int32()), C.ITEM_ID: pa.array(item_ids.tolist(), pa.string()),
        C.VECTOR: vectors_array(vecs), C.VECTOR_SOURCE: pa.array(source.tolist(), pa.string()),
        C.COMPUTED_DS: pa.array(computed.tolist(), pa.string()),
    }, schema=COLLAB_EMBEDDINGS)
    counts = {s: int((source == s).sum()) for s in (SOURCE_ALS, SOURCE_CHAMPION, SOURCE_TEXT)}
    stats.update(rows=n, dim=int(vecs.shape[1]), sources=counts, computed_today=int((computed == ds).sum()),
                 seconds=round(time.perf_counter() - t0, 3))
    lake.remove_stale(root, cfg.layout.vectors(COLLAB))  # a killed run's staging folder
    lake.write_partition(out, cfg.layout.part(cfg.layout.vectors(COLLAB), ds),
                         extra_files={META_FILE: json.dumps(stats, indent=1)})
    log.info("collab %s: %s", ds, stats)
    return stats


def _previous(root: Path, cfg: Config, prev_ds: str, item_ids: np.ndarray) -> dict:
    """Yesterday's rows aligned to today's items (``found`` False for items it lacks)."""
    t = lake.read_partition(root, cfg.layout.vectors(COLLAB), prev_ds, [C.ITEM_ID, C.VECTOR, C.VECTOR_SOURCE, C.COMPUTED_DS])
    vecs = vectors_matrix(t[C.VECTOR])
    where = {item: i for i, item in enumerate(t[C.ITEM_ID].to_pylist())}
    rows = np.array([where.get(i, -1) for i in item_ids], np.int64)
    found = rows >= 0
    aligned = np.zeros((len(item_ids), vecs.shape[1]), np.float32)
    aligned[found] = vecs[rows[found]]
    pick = lambda col: np.where(found, np.asarray(t[col].to_pylist(), object)[np.maximum(rows, 0)], None)  # noqa: E731
    return {"vecs": aligned, "found": found, "dim": vecs.shape[1],
            "source": pick(C.VECTOR_SOURCE) if len(t) else np.full(len(item_ids), None, object),
            "computed": pick(C.COMPUTED_DS) if len(t) else np.full(len(item_ids), None, object)}


def _champion_rows(champ: ChampionVectors, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vecs_in = unit_rows(champ.vectors)
    where = {item: i for i, item in enumerate(champ.item_ids)}
    rows = np.array([where.get(i, -1) for i in item_ids], np.int64)
    has = rows >= 0
    vecs = np.zeros((len(item_ids), vecs_in.shape[1]), np.float32)
    vecs[has] = vecs_in[rows[has]]
    return vecs, has


def _align(vecs: np.ndarray, has: np.ndarray, prev: dict) -> dict:
    """Rotate the champion's space onto yesterday's (in place), over items with a real vector in both."""
    both = has & prev["found"] & (prev["source"] != SOURCE_TEXT)
    dim = vecs.shape[1]
    if prev["dim"] != dim or both.sum() < dim:
        # too few shared items (or another width) to pin a rotation: the RQ-VAE retrains on the new space
        return {"aligned": False, "aligned_items": int(both.sum())}
    before = float((vecs[both] * prev["vecs"][both]).sum(1).mean())
    vecs[has] = vecs[has] @ procrustes(vecs[both], prev["vecs"][both])
    after = float((vecs[both] * prev["vecs"][both]).sum(1).mean())
    return {"aligned": True, "aligned_items": int(both.sum()), "alignment_cosine_before": before,
            "alignment_cosine_after": after}
