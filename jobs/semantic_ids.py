"""Stage 3c: GenSAR semantic IDs of every item (``synergen_core.rqvae``): trained on the driver on a bounded
sample, assigned, made unique and checked on Spark (``jobs.semantic_ids_spark``, ``jobs.semantic_ids_checks``).

Inputs: ``<lake>/<embeddings.output>/{items,collab}/ds=D`` (text and collaborative vectors, one row per item
of the day's vocabulary) and the previous run's outputs. Outputs (``schemas.semantic_ids``):
``<lake>/semantic_ids/ds=D`` and ``<lake>/semantic_ids_model/ds=D/rqvae.pt`` (+ ``_model.json``).

The model of a day, by ``mode``:

* ``cold``: trained from scratch. First run, or yesterday's model cannot take today's inputs (another
  RQ-VAE shape or collision mode, another text encoder, other vector widths), or today's catalog needs
  another ID capacity (reason ``ID capacity changed``).
* ``warm``: yesterday's model fine-tuned (``semantic_ids.warm_epochs`` at ``warm_lr``), then the catalog is
  re-coded, when since its last training the share of new items (indices above the largest it was trained
  on, over the items it was trained on) or the relative rise of its reconstruction loss on today's items
  exceeds ``semantic_ids.retrain_drift_threshold``, or the collaborative vectors moved to a new space
  that the item-embedding stage could not rotate onto yesterday's (``aligned`` false in its ``_collab.json``).
  A new champion whose vectors were rotated onto yesterday's space is no reason by itself: the
  reconstruction drift says whether yesterday's model still fits them.
* ``reuse``: otherwise yesterday's model as it is. Every item of yesterday's table keeps its raw codes and
  both IDs exactly (carried, whatever its vectors did since: a daily champion or a recomputed fallback
  vector would otherwise move some of them every day); new items are coded by the same model and take the
  free IDs of their prefix. IDs therefore change only on a day that retrains, and that day's stats give
  the reasons and the share changed, the signal a model warm-started on yesterday's IDs needs.

ID capacity and training sample (``synergen_core.rqvae_capacity``): IDs keep their length, and the last
level of each view has ``codebook_size`` codes until the catalog's expected items per prefix
(``n_items / codebook_size**(levels-1)``) pass ``capacity_load`` of it; then it takes the smallest power
of two that holds them at that load (``last_codebook_size`` in the model's ``arch`` and ``_stats.json``).
The size is chosen from the day's catalog; a size other than yesterday model's is a cold start. The
RQ-VAE trains (cold or warm) on at most ``semantic_ids.train_sample`` items chosen on Spark by a hash of
(item_id, seed), the only per-item data the driver holds; every item is assigned on Spark.

Scale: the driver reads figures (counts, widths, sums) and the training sample; assignment
(``mapInArrow``), collision resolution (``applyInArrow`` per prefix), yesterday's IDs (a join), the
figures (aggregates) and validation (Great Expectations on a Spark frame) run on the executors, and the
table is written by Spark into staging and published with the model (``jobs.spark.Staging``).

Every run reports ``id_metrics`` (reconstruction per view, per-level utilization and perplexity,
collision rate before/after, unique-ID share, prefix-sharing similarity, ID changes vs yesterday) in
``_stats.json`` and its return value (logged to MLflow by ``jobs.stages.semantic_ids``). The table is
validated (``schemas.semantic_ids.suite``) before anything is published: a failing table raises
``SemanticIdsInvalid`` and leaves yesterday's outputs as the latest.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import semantic_ids_spark as sids
from jobs.collab import COLLAB
from jobs.collab import META_FILE as COLLAB_META
from jobs.semantic_ids_checks import SemanticIdsInvalid, id_metrics, validate_ids
from jobs.spark import Staging, session, spark_partition, spark_schema
from jobs.text_vectors import ITEMS, META_FILE as ITEMS_META
from schemas import C
from schemas import semantic_ids as sid_schema
from schemas import sequences as seq_schema
from synergen_core import lake
from synergen_core.config import Config, SemanticIdConfig, parse_ds

log = logging.getLogger(__name__)

MODEL_FILE, MODEL_META = "rqvae.pt", "_model.json"
STATS_FILE, VALIDATION_FILE = "_stats.json", "_validation.json"
ARCH_FIELDS = ("latent_dim", "hidden_dims", "shared_levels", "specific_levels", "codebook_size", "collision")
__all__ = ["SemanticIdsInvalid", "run", "stage"]


@dataclass
class Inputs:
    """The day's catalog: its vectors stay on Spark, the driver holds figures only."""
    ds: str
    vectors: DataFrame  # (item_index, item_id, _text, _collab), one row per item
    n: int
    max_index: int
    text_dim: int
    collab_dim: int
    text_fingerprint: str | None
    collab_basis: str | None
    collab_aligned: bool  # the item-embedding stage rotated today's collaborative vectors onto yesterday's
    recon_previous: dict | None = None  # yesterday's model on these items (``decide``; reused if it is kept)


@dataclass
class Previous:
    ds: str
    meta: dict
    state: dict  # RQ-VAE state dict


def arch(cfg: SemanticIdConfig) -> dict:
    """The settings a stored model and its IDs depend on: another value needs a cold start. The last level's
    size only when it is not ``codebook_size`` (so a model of today's capacity keeps its arch)."""
    from synergen_core.rqvae_capacity import last_size

    grown = last_size(cfg) != cfg.codebook_size
    return {k: getattr(cfg, k) for k in ARCH_FIELDS} | ({"last_codebook_size": last_size(cfg)} if grown else {})


def day_config(cfg: Config, inputs: Inputs) -> SemanticIdConfig:
    """``semantic_ids`` with the last level sized for the day's catalog (``rqvae_capacity.with_capacity``)."""
    from synergen_core.rqvae_capacity import with_capacity

    return with_capacity(cfg.semantic_ids, inputs.n)


def id_widths(cfg: SemanticIdConfig) -> tuple[int, int]:
    """(codes per view ID, raw codes) of ``cfg``."""
    S, T = cfg.shared_levels, cfg.specific_levels
    return S + T + (cfg.collision == "extra_code"), S + 2 * T


# ---------------------------------------------------------------------------------------------
# inputs and yesterday's state


def load_inputs(spark: SparkSession, cfg: Config, ds: str) -> Inputs:
    """The day's vectors as a DataFrame and its figures; refuses tables of different items or of vectors of
    unequal length."""
    root = Path(cfg.lake.root)
    vectors = sids.item_vectors(spark, cfg, ds)
    f = sids.catalog_figures(vectors)
    if f["no_text"] or f["no_collab"]:
        raise ValueError(f"{cfg.layout.vectors(ITEMS)} and {cfg.layout.vectors(COLLAB)} of {ds} hold different items: "
                         "rerun the item_embeddings stage for that day")
    for name, table in (("text", ITEMS), ("collab", COLLAB)):
        if f[f"{name}_min"] != f[f"{name}_max"]:
            raise ValueError(f"{cfg.layout.vectors(table)} of {ds}: vectors of unequal length "
                             f"({f[f'{name}_min']} to {f[f'{name}_max']})")
    collab = lake.read_meta(root, cfg.layout.vectors(COLLAB), ds, COLLAB_META) or {}
    return Inputs(ds, vectors, f["n"], f["max_index"], f["text_max"], f["collab_max"],
                  (lake.read_meta(root, cfg.layout.vectors(ITEMS), ds, ITEMS_META) or {}).get("fingerprint"),
                  collab.get("basis"), bool(collab.get("aligned")))


def state_day(cfg: Config, ds: str) -> str | None:
    """The latest day before ``ds`` with published IDs and model (the IDs are published last)."""
    layout = cfg.layout
    return layout.day_before(layout.semantic_ids, ds,
                             ready=lambda d: (layout.part(layout.semantic_ids_model, d) / MODEL_FILE).is_file())


def load_previous(cfg: Config, ds: str) -> Previous | None:
    """Yesterday's model and its metadata (its IDs are joined on Spark: ``semantic_ids_spark.with_previous``)."""
    import torch

    prev_ds = state_day(cfg, ds)
    if prev_ds is None:
        return None
    part = cfg.layout.part(cfg.layout.semantic_ids_model, prev_ds)
    meta = json.loads((part / MODEL_META).read_text())
    return Previous(prev_ds, meta, torch.load(part / MODEL_FILE, weights_only=True))


def previous_table(spark: SparkSession, cfg: Config, prev: Previous) -> DataFrame:
    return spark_partition(spark, Path(cfg.lake.root), cfg.layout.semantic_ids, prev.ds, sid_schema.SEMANTIC_IDS)


def same_widths(prev_ids: DataFrame, cfg: SemanticIdConfig) -> bool:
    """Whether yesterday's IDs have today's widths (their changes are then measured, their days kept)."""
    # collected: the distinct (ID, raw) widths, one row unless the table is broken
    rows = prev_ids.select(F.size(C.SEARCH_CODES), F.size(C.RAW_CODES)).distinct().limit(2).collect()
    return [tuple(r) for r in rows] == [id_widths(cfg)]


# ---------------------------------------------------------------------------------------------
# the model of the day


def decide(cfg: Config, inputs: Inputs, prev: Previous | None) -> tuple[str, list[str], dict]:
    """(mode, reasons, drift figures): see the module doc."""
    from synergen_core.rqvae import build_rqvae
    from synergen_core.rqvae_capacity import last_size

    sid = day_config(cfg, inputs)
    if prev is None:
        return "cold", ["no previous model"], {}
    m = prev.meta
    cold = []
    old, new = m.get("arch") or {}, json.loads(json.dumps(arch(sid)))
    other = lambda a: {k: v for k, v in a.items() if k != "last_codebook_size"}  # noqa: E731
    if m.get("arch") is None or other(old) != other(new):
        cold.append(f"semantic_ids settings changed: {m.get('arch')} -> {arch(sid)}")
    elif old != new:  # the same settings, another catalog size: yesterday's codebook has another shape
        cold.append(f"ID capacity changed: last codebook {old.get('last_codebook_size', old['codebook_size'])} -> "
                    f"{last_size(sid)} codes for {inputs.n} items (capacity_load {sid.capacity_load})")
    if (m.get("text_dim"), m.get("collab_dim")) != (inputs.text_dim, inputs.collab_dim):
        cold.append(f"vector widths changed: {(m.get('text_dim'), m.get('collab_dim'))} -> "
                    f"{(inputs.text_dim, inputs.collab_dim)}")
    if m.get("text_fingerprint") != inputs.text_fingerprint:
        cold.append(f"text encoder changed: {m.get('text_fingerprint')} -> {inputs.text_fingerprint}")
    if cold:
        return "cold", cold, {}
    model = build_rqvae(inputs.text_dim, inputs.collab_dim, sid, prev.state)
    inputs.recon_previous = sids.recon_figures(inputs.vectors, model)
    now = inputs.recon_previous["total"]
    new_items = inputs.vectors.where(F.col(C.ITEM_INDEX) > m["trained_max_item_index"]).count()
    drift = {
        "new_item_share": float(new_items / max(m["trained_items"], 1)),
        "recon_drift": float((now - m["recon_at_training"]) / max(m["recon_at_training"], 1e-12)),
        "recon_now": now,
    }
    warm, notes = [], []
    if m.get("collab_basis") != inputs.collab_basis:
        moved = f"collaborative vectors moved: {m.get('collab_basis')} -> {inputs.collab_basis}"
        if inputs.collab_aligned:
            notes.append(f"{moved}, rotated onto yesterday's")
        else:
            warm.append(f"{moved}, not aligned")
    for key in ("new_item_share", "recon_drift"):
        if drift[key] > sid.retrain_drift_threshold:
            warm.append(f"{key} {drift[key]:.4f} > retrain_drift_threshold {sid.retrain_drift_threshold}")
    return ("warm" if warm else "reuse"), (warm or ["drift below retrain_drift_threshold", *notes]), drift


def model_of_day(cfg: Config, inputs: Inputs, prev: Previous | None, mode: str, sample: sids.Sample):
    """(model, per-epoch history, seconds): trained cold or fine-tuned warm on the training sample, or
    yesterday's as it is."""
    from synergen_core.rqvae import build_rqvae, train_rqvae

    t0 = time.perf_counter()
    sid = day_config(cfg, inputs)
    if mode == "reuse":
        model = build_rqvae(inputs.text_dim, inputs.collab_dim, sid, prev.state).eval()
        return model, [], 0.0
    model, history = train_rqvae(sample.text, sample.collab, sid, state=prev.state if mode == "warm" else None,
                                 n_items=inputs.n)
    return model, history, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the job


def _write_ids(spark: SparkSession, cfg: Config, inputs: Inputs, prev: Previous | None, model, mode: str,
               staging: Staging) -> tuple[DataFrame, bool]:
    """Assign, resolve and stage the day's table; returns it read back from staging, and whether
    yesterday's IDs have today's widths."""
    sid, ds = model.cfg, inputs.ds
    sticky = prev is not None and mode != "cold"  # a new model's codes are unrelated to yesterday's
    rows = sids.with_previous(spark, cfg, inputs.vectors, prev.ds if prev else None)
    same_shape = prev is not None and same_widths(previous_table(spark, cfg, prev), sid)
    assigned, payload = sids.assign(rows, model, hysteresis=sticky, carry=mode == "reuse" and same_shape)
    # read by both views' resolution and by the table: computed once, kept by Spark (memory, else disk)
    assigned = assigned.persist()
    try:
        table = sids.ids_frame(assigned, sids.resolve(assigned, sid, sticky), ds, same_shape)
        staging.write_day(table.orderBy(C.ITEM_INDEX), cfg.layout.semantic_ids, ds)
    finally:
        assigned.unpersist()
        payload.destroy()
    part = staging.staged(cfg.layout.semantic_ids, ds)
    written = spark.read.schema(spark_schema(sid_schema.SEMANTIC_IDS, with_ds=False)).parquet(str(part))
    return written, same_shape


def run(spark: SparkSession, cfg: Config, ds: str) -> dict:
    """Semantic IDs of ``ds``; see the module doc. Returns the run's figures (also ``_stats.json``)."""
    from synergen_core.rqvae_capacity import last_size

    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    root = Path(cfg.lake.root)
    inputs = load_inputs(spark, cfg, ds)
    prev = load_previous(cfg, ds)
    mode, reasons, drift = decide(cfg, inputs, prev)
    sample = sids.collect_sample(inputs.vectors, inputs.n, day_config(cfg, inputs), inputs.text_dim,
                                 inputs.collab_dim)
    model, history, train_s = model_of_day(cfg, inputs, prev, mode, sample)
    sid = model.cfg  # the day's settings with the size its last level has

    t1 = time.perf_counter()
    staging = Staging(spark, root)
    try:
        written, same_shape = _write_ids(spark, cfg, inputs, prev, model, mode, staging)
        assign_s = time.perf_counter() - t1
        vocab = spark_partition(spark, root, cfg.layout.sessions("item_vocab"), ds, seq_schema.ITEM_VOCAB)
        validation = validate_ids(written, vocab, sid)
        # a kept model's figures are the ones decide measured: the same weights on the same items
        figures = inputs.recon_previous if mode == "reuse" else sids.recon_figures(inputs.vectors, model)
        prev_ids = previous_table(spark, cfg, prev) if prev is not None else None
        metrics = id_metrics(written, prev_ids if same_shape else None, sid, figures, sample)
        if metrics["n_items"] != inputs.n:
            raise RuntimeError(f"assignment returned {metrics['n_items']} items for {inputs.n} inputs")
        found = (written.join(prev_ids.select(C.ITEM_INDEX), C.ITEM_INDEX, "left_semi").count()
                 if prev_ids is not None else 0)
        trained = mode != "reuse"
        meta = {
            "ds": ds, "mode": mode, "reasons": reasons, "arch": arch(sid),
            "text_dim": inputs.text_dim, "collab_dim": inputs.collab_dim,
            "text_fingerprint": inputs.text_fingerprint, "collab_basis": inputs.collab_basis,
            **({"trained_ds": ds, "trained_items": inputs.n, "trained_max_item_index": inputs.max_index,
                "recon_at_training": figures["total"]} if trained else
               {k: prev.meta[k] for k in ("trained_ds", "trained_items", "trained_max_item_index",
                                          "recon_at_training")}),
        }
        raw_changed = metrics.pop("raw_codes_changed_share", None)
        stats = {
            "ds": ds, "mode": mode, "reasons": reasons, "previous_ds": prev.ds if prev else None,
            "retrained": int(trained), "items": inputs.n, "new_items": inputs.n - found,
            "trained_ds": meta["trained_ds"], "drift": drift,
            "train": ({"epochs": len(history), **{k: v for k, v in history[-1].items() if k != "epoch"},
                       "rows": len(sample.index), "seconds": round(train_s, 3)} if history else {}),
            "last_codebook_size": last_size(sid),
            **metrics,
            "existing_id_change_share": metrics.get("either_id_change_share"),
            "raw_codes_changed_share": raw_changed,
            "assign_seconds": round(assign_s, 3), "validation": validation,
        }
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        _publish(cfg, ds, model, meta, staging, stats, validation)
    except BaseException:
        staging.discard()
        raise
    log.info("semantic_ids %s: mode=%s items=%d new=%d changed=%s", ds, mode, inputs.n, stats["new_items"],
             stats["existing_id_change_share"])
    return stats


def _publish(cfg: Config, ds: str, model, meta: dict, staging: Staging, stats: dict, validation: dict) -> None:
    """The model, then the staged IDs (whose partition marks the day complete)."""
    import torch

    layout = cfg.layout
    lake.remove_stale(layout.root, layout.semantic_ids_model)  # what a killed run left aside
    lake.write_files(layout.part(layout.semantic_ids_model, ds), {MODEL_META: json.dumps(meta, indent=1)},
                     lambda tmp: torch.save(model.state_dict(), tmp / MODEL_FILE))
    staging.add_side_file(layout.semantic_ids, ds, STATS_FILE, json.dumps(stats, indent=1, default=str))
    staging.add_side_file(layout.semantic_ids, ds, VALIDATION_FILE, json.dumps(validation, indent=1))
    staging.publish()


def stage(cfg: Config, ds: str) -> dict:
    """The pipeline stage (CLI ``synergen semantic-ids``, Airflow ``semantic_ids``): ``run`` in a session
    from ``cfg.spark``, stopped at the end unless it was already active (a caller's)."""
    with session(cfg) as spark:
        return run(spark, cfg, ds)
