"""Stage 3c: GenSAR semantic IDs of every item (``synergen_core.rqvae``), trained on the driver, assigned
by Spark, made unique on the driver, checked by Great Expectations.

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
  (a new champion).
* ``reuse``: otherwise yesterday's model as it is. An item whose vectors did not change gets the same raw
  codes as yesterday (same model, same input; hysteresis covers float noise), so with the sticky collision
  handling it keeps its IDs; new items are coded by the same model and take free IDs.

ID capacity and training sample (issue 29; ``synergen_core.rqvae_capacity``): IDs keep their length, and
the last level of each view has ``codebook_size`` codes until the catalog's expected items per prefix
(``n_items / codebook_size**(levels-1)``) pass ``capacity_load`` of it; then it takes the smallest power
of two that holds them at that load (``last_codebook_size`` in the model's ``arch`` and ``_stats.json``).
The size is chosen from the day's catalog; a size other than yesterday model's is a cold start. The
RQ-VAE trains (cold or warm) on a seeded sample of ``semantic_ids.train_sample`` items (every item of a
smaller catalog); every item is assigned on Spark.

Assignment at scale: the state dict is broadcast and every partition of the joined vectors runs
``assign_with_candidates`` in ``mapInArrow`` (one torch thread per task; yesterday's raw codes are joined
in for the hysteresis); the raw codes and last-level candidates come back to the driver, where
``resolve_collisions`` sees the whole catalog at once, as uniqueness needs.

Every run reports ``id_metrics`` (reconstruction per view, per-level utilization and perplexity,
collision rate before/after, unique-ID share, prefix-sharing similarity, ID changes vs yesterday) in
``_stats.json`` and its return value (logged to MLflow by ``jobs.stages.semantic_ids``). The table is
validated (``schemas.semantic_ids.suite``) before anything is published: a failing table raises
``SemanticIdsInvalid`` and leaves yesterday's outputs as the latest.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.collab import COLLAB
from jobs.collab import META_FILE as COLLAB_META
from jobs.spark import session, spark_partition
from jobs.text_vectors import ITEMS, META_FILE as ITEMS_META
from schemas import C
from schemas import semantic_ids as sid_schema
from synergen_core import lake
from synergen_core.config import Config, SemanticIdConfig, parse_ds
from synergen_core.vectors import combined, list_array, list_matrix, vectors_matrix

log = logging.getLogger(__name__)

MODEL_FILE, MODEL_META = "rqvae.pt", "_model.json"
STATS_FILE, VALIDATION_FILE = "_stats.json", "_validation.json"
ARCH_FIELDS = ("latent_dim", "hidden_dims", "shared_levels", "specific_levels", "codebook_size", "collision")


class SemanticIdsInvalid(RuntimeError):
    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class Inputs:
    index: np.ndarray  # [n] item_index, ascending
    item_ids: np.ndarray  # [n] object
    text: np.ndarray  # [n, text_dim]
    collab: np.ndarray  # [n, collab_dim]
    text_fingerprint: str | None
    collab_basis: str | None


@dataclass
class Previous:
    ds: str
    meta: dict
    state: dict  # RQ-VAE state dict
    ids: object  # rqvae.SemanticIds aligned to today's items, -1 rows for items it lacks
    id_ds: np.ndarray  # [n] object, None for items it lacks
    found: np.ndarray  # [n] bool


def arch(cfg: SemanticIdConfig) -> dict:
    """The settings a stored model and its IDs depend on: another value needs a cold start. The last level's
    size only when it is not ``codebook_size`` (so a model of today's capacity keeps its arch)."""
    from synergen_core.rqvae_capacity import last_size

    grown = last_size(cfg) != cfg.codebook_size
    return {k: getattr(cfg, k) for k in ARCH_FIELDS} | ({"last_codebook_size": last_size(cfg)} if grown else {})


def day_config(cfg: Config, inputs: Inputs) -> SemanticIdConfig:
    """``semantic_ids`` with the last level sized for the day's catalog (``rqvae_capacity.with_capacity``)."""
    from synergen_core.rqvae_capacity import with_capacity

    return with_capacity(cfg.semantic_ids, len(inputs.index))


def id_widths(cfg: SemanticIdConfig) -> tuple[int, int]:
    """(codes per view ID, raw codes) of ``cfg``."""
    S, T = cfg.shared_levels, cfg.specific_levels
    return S + T + (cfg.collision == "extra_code"), S + 2 * T


# ---------------------------------------------------------------------------------------------
# inputs and yesterday's state (driver)


def load_inputs(cfg: Config, ds: str) -> Inputs:
    root = Path(cfg.lake.root)
    items = lake.read_partition(root, cfg.layout.vectors(ITEMS), ds, [C.ITEM_INDEX, C.ITEM_ID, C.VECTOR]).sort_by(C.ITEM_INDEX)
    collab = lake.read_partition(root, cfg.layout.vectors(COLLAB), ds, [C.ITEM_INDEX, C.VECTOR]).sort_by(C.ITEM_INDEX)
    index = items[C.ITEM_INDEX].to_numpy().astype(np.int64)
    if not np.array_equal(index, collab[C.ITEM_INDEX].to_numpy().astype(np.int64)):
        raise ValueError(f"{cfg.layout.vectors(ITEMS)} and {cfg.layout.vectors(COLLAB)} of {ds} hold different items: "
                         "rerun the item_embeddings stage for that day")
    return Inputs(index, np.asarray(items[C.ITEM_ID].to_pylist(), object), vectors_matrix(items[C.VECTOR]),
                  vectors_matrix(collab[C.VECTOR]),
                  (lake.read_meta(root, cfg.layout.vectors(ITEMS), ds, ITEMS_META) or {}).get("fingerprint"),
                  (lake.read_meta(root, cfg.layout.vectors(COLLAB), ds, COLLAB_META) or {}).get("basis"))


def state_day(cfg: Config, ds: str) -> str | None:
    """The latest day before ``ds`` with published IDs and model (the IDs are published last)."""
    layout = cfg.layout
    return layout.day_before(layout.semantic_ids, ds,
                             ready=lambda d: (layout.part(layout.semantic_ids_model, d) / MODEL_FILE).is_file())


def load_previous(cfg: Config, ds: str, inputs: Inputs) -> Previous | None:
    import torch

    from synergen_core.rqvae import SemanticIds

    prev_ds = state_day(cfg, ds)
    if prev_ds is None:
        return None
    root = Path(cfg.lake.root)
    part = cfg.layout.part(cfg.layout.semantic_ids_model, prev_ds)
    meta = json.loads((part / MODEL_META).read_text())
    state = torch.load(part / MODEL_FILE, weights_only=True)
    t = lake.read_partition(root, cfg.layout.semantic_ids, prev_ds, [C.ITEM_INDEX, C.SEARCH_CODES, C.REC_CODES, C.RAW_CODES, C.ID_DS])
    rows = np.searchsorted(inputs.index, t[C.ITEM_INDEX].to_numpy().astype(np.int64))
    ok = (rows < len(inputs.index)) & (inputs.index[np.minimum(rows, len(inputs.index) - 1)] ==
                                       t[C.ITEM_INDEX].to_numpy())
    found = np.zeros(len(inputs.index), bool)
    found[rows[ok]] = True

    def aligned(col: str) -> np.ndarray:
        codes = _codes_matrix(t[col])
        out = np.full((len(inputs.index), codes.shape[1]), -1, np.int64)
        out[rows[ok]] = codes[ok]
        return out

    id_ds = np.full(len(inputs.index), None, object)
    id_ds[rows[ok]] = np.asarray(t[C.ID_DS].to_pylist(), object)[ok]
    ids = SemanticIds(raw=aligned(C.RAW_CODES), search=aligned(C.SEARCH_CODES), rec=aligned(C.REC_CODES))
    return Previous(prev_ds, meta, state, ids, id_ds, found)


def _codes_matrix(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A code-list column (every list of one length) -> [n, width] int64."""
    return list_matrix(values, np.int64)


# ---------------------------------------------------------------------------------------------
# the model of the day


def recon(model, text: np.ndarray, collab: np.ndarray) -> dict:
    """Mean reconstruction loss per view of ``model`` on these items."""
    import torch

    n, bs = len(text), model.cfg.assign_batch_size
    rt = rc = 0.0
    with torch.no_grad():
        model.eval()
        for i in range(0, n, bs):
            out = model(torch.as_tensor(text[i:i + bs]), torch.as_tensor(collab[i:i + bs]))
            m = min(bs, n - i)
            rt, rc = rt + float(out["recon_t"]) * m / n, rc + float(out["recon_c"]) * m / n
    return {"text": rt, "collab": rc, "total": rt + rc}


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
                    f"{last_size(sid)} codes for {len(inputs.index)} items (capacity_load {sid.capacity_load})")
    if (m.get("text_dim"), m.get("collab_dim")) != (inputs.text.shape[1], inputs.collab.shape[1]):
        cold.append(f"vector widths changed: {(m.get('text_dim'), m.get('collab_dim'))} -> "
                    f"{(inputs.text.shape[1], inputs.collab.shape[1])}")
    if m.get("text_fingerprint") != inputs.text_fingerprint:
        cold.append(f"text encoder changed: {m.get('text_fingerprint')} -> {inputs.text_fingerprint}")
    if cold:
        return "cold", cold, {}
    model = build_rqvae(inputs.text.shape[1], inputs.collab.shape[1], sid, prev.state)
    now = recon(model, inputs.text, inputs.collab)["total"]
    drift = {
        "new_item_share": float((inputs.index > m["trained_max_item_index"]).sum() / max(m["trained_items"], 1)),
        "recon_drift": float((now - m["recon_at_training"]) / max(m["recon_at_training"], 1e-12)),
        "recon_now": now,
    }
    warm = []
    if m.get("collab_basis") != inputs.collab_basis:
        warm.append(f"collaborative vectors moved: {m.get('collab_basis')} -> {inputs.collab_basis}")
    for key in ("new_item_share", "recon_drift"):
        if drift[key] > sid.retrain_drift_threshold:
            warm.append(f"{key} {drift[key]:.4f} > retrain_drift_threshold {sid.retrain_drift_threshold}")
    return ("warm" if warm else "reuse"), (warm or ["drift below retrain_drift_threshold"]), drift


def model_of_day(cfg: Config, inputs: Inputs, prev: Previous | None, mode: str):
    """(model, per-epoch history, seconds): trained cold, fine-tuned warm, or yesterday's as it is."""
    from synergen_core.rqvae import build_rqvae, train_rqvae

    t0 = time.perf_counter()
    sid = day_config(cfg, inputs)
    if mode == "reuse":
        model = build_rqvae(inputs.text.shape[1], inputs.collab.shape[1], sid, prev.state).eval()
        return model, [], 0.0
    model, history = train_rqvae(inputs.text, inputs.collab, sid, state=prev.state if mode == "warm" else None)
    return model, history, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# assignment in Spark


def _assigner(payload, width: int):
    """The ``mapInArrow`` function: (item_index, text, collab, previous raw codes) -> raw codes and candidates."""

    def assign_part(batches):
        import torch

        from synergen_core.rqvae import assign_with_candidates, build_rqvae

        torch.set_num_threads(1)  # tasks already run in parallel; more threads per task only contend
        p = torch.load(io.BytesIO(payload.value), weights_only=True)
        model = build_rqvae(p["text_dim"], p["collab_dim"], SemanticIdConfig(**p["cfg"]), p["state"]).eval()
        for b in batches:
            n = b.num_rows
            text = vectors_matrix(b.column("_text"), p["text_dim"])
            collab = vectors_matrix(b.column("_collab"), p["collab_dim"])
            prev_col = b.column("_prev")
            prev = np.full((n, width), -1, np.int64)
            has = ~np.asarray(prev_col.is_null().to_numpy(zero_copy_only=False), bool)
            if has.any():
                prev[has] = _codes_matrix(prev_col.filter(pa.array(has)))
            raw, cands, dists = assign_with_candidates(model, text, collab, prev if has.any() else None)
            arrays = [list_array(c, pa.int32()) for c in (raw, cands[:, 0], cands[:, 1])]
            arrays += [list_array(dists[:, v], pa.float32()) for v in (0, 1)]
            yield pa.RecordBatch.from_arrays([b.column(C.ITEM_INDEX), *arrays],
                                             names=[C.ITEM_INDEX, "raw", "cand_text", "cand_collab", "dist_text",
                                                    "dist_collab"])

    return assign_part


def assign_spark(spark: SparkSession, cfg: Config, ds: str, model, prev_ds: str | None = None):
    """Raw codes of every item of ``items/ds=D`` by ``model``, computed on the executors.

    ``prev_ds``: the day whose raw codes feed the hysteresis (None: no previous codes).
    Returns (item_index [n] ascending, raw [n, S+2T], cands [n, 2, k], dists [n, 2, k]) as
    ``assign_with_candidates`` gives them.
    """
    import torch

    root = Path(cfg.lake.root)
    width = id_widths(model.cfg)[1]
    df = (spark_partition(spark, root, cfg.layout.vectors(ITEMS), ds, sid_schema.ITEM_EMBEDDINGS)
          .select(C.ITEM_INDEX, F.col(C.VECTOR).alias("_text"))
          .join(spark_partition(spark, root, cfg.layout.vectors(COLLAB), ds, sid_schema.COLLAB_EMBEDDINGS)
                .select(C.ITEM_INDEX, F.col(C.VECTOR).alias("_collab")), C.ITEM_INDEX))
    if prev_ds is not None:
        prev = spark_partition(spark, root, cfg.layout.semantic_ids, prev_ds, sid_schema.SEMANTIC_IDS)
        df = df.join(prev.select(C.ITEM_INDEX, F.col(C.RAW_CODES).alias("_prev")), C.ITEM_INDEX, "left")
    else:
        df = df.withColumn("_prev", F.lit(None).cast("array<int>"))
    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "text_dim": model.text_dim, "collab_dim": model.collab_dim,
                "cfg": model.cfg.model_dump(mode="json")}, buf)
    payload = spark.sparkContext.broadcast(buf.getvalue())
    schema = (f"{C.ITEM_INDEX} int, raw array<int>, cand_text array<int>, cand_collab array<int>, "
              "dist_text array<float>, dist_collab array<float>")
    try:
        out = df.mapInArrow(_assigner(payload, width), schema).toArrow().sort_by(C.ITEM_INDEX)
    finally:
        payload.destroy()
    index = out[C.ITEM_INDEX].to_numpy().astype(np.int64)
    raw = _codes_matrix(out["raw"])
    cands = np.stack([_codes_matrix(out["cand_text"]), _codes_matrix(out["cand_collab"])], 1)
    dists = np.stack([vectors_matrix(out["dist_text"]), vectors_matrix(out["dist_collab"])], 1)
    return index, raw, cands, dists


# ---------------------------------------------------------------------------------------------
# the table and its validation


def ids_table(inputs: Inputs, ids, id_ds: np.ndarray) -> pa.Table:
    return pa.table({
        C.ITEM_INDEX: pa.array(inputs.index, pa.int32()),
        C.ITEM_ID: pa.array(inputs.item_ids.tolist(), pa.string()),
        C.SEARCH_CODES: list_array(ids.search, pa.int32()),
        C.REC_CODES: list_array(ids.rec, pa.int32()),
        C.RAW_CODES: list_array(ids.raw, pa.int32()),
        C.ID_DS: pa.array(id_ds.tolist(), pa.string()),
    }, schema=sid_schema.SEMANTIC_IDS)


def _code_columns(values: pa.ChunkedArray | pa.Array, view: str, width: int) -> dict[str, np.ndarray]:
    """A list column as one float column per position (NaN past a list's end) plus its lengths."""
    values = combined(values)
    lengths = np.asarray(values.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.float64)
    cols = {sid_schema.length_column(view): lengths.astype(np.float64)}
    for j in range(max(width, int(lengths.max()) if len(lengths) else 0)):
        inside = lengths > j
        col = np.full(len(values), np.nan)
        col[inside] = flat[starts[inside] + j]
        cols[sid_schema.code_column(view, j)] = col
    return cols


def check_frame(ids: pa.Table, vocab_index: np.ndarray, cfg: SemanticIdConfig) -> pd.DataFrame:
    """The batch the suite reads: vocabulary (full outer join) IDs, one column per code, computed checks."""
    id_len, raw_len = id_widths(cfg)
    cols: dict = {C.ITEM_INDEX: ids[C.ITEM_INDEX].to_numpy().astype(np.int64), "_ids": True}
    for view, col, width in (("search", C.SEARCH_CODES, id_len), ("rec", C.REC_CODES, id_len),
                             ("raw", C.RAW_CODES, raw_len)):
        cols.update(_code_columns(ids[col], view, width))
    frame = pd.DataFrame({C.ITEM_INDEX: np.asarray(vocab_index, np.int64), "_vocab": True}).merge(
        pd.DataFrame(cols), on=C.ITEM_INDEX, how="outer")
    in_vocab, in_ids = frame.pop("_vocab").notna().to_numpy(), frame.pop("_ids").notna().to_numpy()
    frame[sid_schema.HAS_IDS] = pd.Series(np.where(in_vocab, in_ids, None), dtype=object)
    frame[sid_schema.IN_VOCAB] = pd.Series(np.where(in_ids, in_vocab, None), dtype=object)
    return frame


def validate_ids(ids: pa.Table, vocab_index: np.ndarray, cfg: SemanticIdConfig) -> dict:
    """Run the semantic-IDs suite; returns its summary, or raises ``SemanticIdsInvalid`` naming each failure."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from synergen_core.rqvae_capacity import level_sizes

    frame = check_frame(ids, vocab_index, cfg)
    id_len, raw_len = id_widths(cfg)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = ctx.data_sources.add_pandas("semantic_ids").add_dataframe_asset("semantic_ids").add_batch_definition_whole_dataframe("b")
    # one range for every code column: the largest level's (the last one's when it grew with the catalog)
    suite = ctx.suites.add(sid_schema.suite(id_len, raw_len, max(level_sizes(cfg)), cfg.collision == "extra_code"))
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    failed = []
    for r in result.results:
        if not r.success:
            kw = r.expectation_config.kwargs
            failed.append({"check": r.expectation_config.meta.get("check"),
                           "expectation": r.expectation_config.type,
                           "columns": kw.get("column_list") or [kw.get("column")],
                           "unexpected_count": r.result.get("unexpected_count")})
    summary = {"success": bool(result.success), "rows": int(len(frame)), "expectations": len(result.results),
               "failed": failed}
    if not result.success:
        raise SemanticIdsInvalid(
            "semantic IDs failed validation: " + "; ".join(
                f"{f['check']} ({', '.join(map(str, f['columns']))}: {f['unexpected_count']} rows)" for f in failed),
            summary)
    return summary


# ---------------------------------------------------------------------------------------------
# the job


def run(spark: SparkSession, cfg: Config, ds: str) -> dict:
    """Semantic IDs of ``ds``; see the module doc. Returns the run's figures (also ``_stats.json``)."""
    from synergen_core.rqvae import id_metrics, resolve_collisions
    from synergen_core.rqvae_capacity import last_size

    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    root = Path(cfg.lake.root)
    inputs = load_inputs(cfg, ds)
    prev = load_previous(cfg, ds, inputs)
    mode, reasons, drift = decide(cfg, inputs, prev)
    model, history, train_s = model_of_day(cfg, inputs, prev, mode)
    sid = model.cfg  # the day's settings with the size its last level has
    sticky = prev if mode != "cold" else None  # a new model's codes are unrelated to yesterday's

    t1 = time.perf_counter()
    index, raw, cands, dists = assign_spark(spark, cfg, ds, model, sticky.ds if sticky else None)
    if not np.array_equal(index, inputs.index):
        raise RuntimeError(f"assignment returned {len(index)} items for {len(inputs.index)} inputs")
    assign_s = time.perf_counter() - t1
    ids = resolve_collisions(raw, cands, dists, sid, previous=sticky.ids if sticky else None)

    same_shape = prev is not None and prev.ids.search.shape == ids.search.shape and prev.ids.raw.shape == ids.raw.shape
    metrics = id_metrics(model, inputs.text, inputs.collab, ids, previous=prev.ids if same_shape else None,
                         seed=sid.seed)
    id_ds = np.full(len(index), ds, object)
    if same_shape:
        kept = prev.found & (prev.ids.search == ids.search).all(1) & (prev.ids.rec == ids.rec).all(1)
        id_ds[kept] = prev.id_ds[kept]
    out_table = ids_table(inputs, ids, id_ds)
    vocab = lake.read_partition(root, cfg.layout.sessions("item_vocab"), ds, [C.ITEM_INDEX])
    validation = validate_ids(out_table, vocab[C.ITEM_INDEX].to_numpy(), sid)

    trained = mode != "reuse"
    after = recon(model, inputs.text, inputs.collab) if trained else None
    meta = {
        "ds": ds, "mode": mode, "reasons": reasons, "arch": arch(sid),
        "text_dim": int(inputs.text.shape[1]), "collab_dim": int(inputs.collab.shape[1]),
        "text_fingerprint": inputs.text_fingerprint, "collab_basis": inputs.collab_basis,
        **({"trained_ds": ds, "trained_items": int(len(index)), "trained_max_item_index": int(index.max()),
            "recon_at_training": after["total"]} if trained else
           {k: prev.meta[k] for k in ("trained_ds", "trained_items", "trained_max_item_index", "recon_at_training")}),
    }
    new_items = int((~prev.found).sum()) if prev is not None else int(len(index))
    stats = {
        "ds": ds, "mode": mode, "reasons": reasons, "previous_ds": prev.ds if prev else None,
        "retrained": int(trained), "items": int(len(index)), "new_items": new_items,
        "trained_ds": meta["trained_ds"], "drift": drift,
        "train": ({"epochs": len(history), **{k: v for k, v in history[-1].items() if k != "epoch"},
                   "rows": min(len(index), sid.train_sample), "seconds": round(train_s, 3)} if history else {}),
        "last_codebook_size": last_size(sid),
        **metrics,
        "existing_id_change_share": metrics.get("either_id_change_share"),
        "raw_codes_changed_share": (float((prev.ids.raw[prev.found] != ids.raw[prev.found]).any(1).mean())
                                    if same_shape and prev.found.any() else None),
        "assign_seconds": round(assign_s, 3), "validation": validation,
    }
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    _publish(cfg, ds, model, meta, out_table, stats, validation)
    log.info("semantic_ids %s: mode=%s items=%d new=%d changed=%s", ds, mode, len(index), new_items,
             stats["existing_id_change_share"])
    return stats


def _publish(cfg: Config, ds: str, model, meta: dict, ids: pa.Table, stats: dict, validation: dict) -> None:
    """The model, then the IDs (whose partition marks the day complete)."""
    import torch

    layout = cfg.layout
    for written in (layout.semantic_ids_model, layout.semantic_ids):  # what a killed run left aside
        lake.remove_stale(layout.root, written)
    lake.write_files(layout.part(layout.semantic_ids_model, ds), {MODEL_META: json.dumps(meta, indent=1)},
                     lambda tmp: torch.save(model.state_dict(), tmp / MODEL_FILE))
    lake.write_partition(ids, layout.part(layout.semantic_ids, ds), extra_files={
        STATS_FILE: json.dumps(stats, indent=1, default=str), VALIDATION_FILE: json.dumps(validation, indent=1)})


def stage(cfg: Config, ds: str) -> dict:
    """The pipeline stage (CLI ``synergen semantic-ids``, Airflow ``semantic_ids``): ``run`` in a session
    from ``cfg.spark``, stopped at the end unless it was already active (a caller's)."""
    with session(cfg) as spark:
        return run(spark, cfg, ds)
