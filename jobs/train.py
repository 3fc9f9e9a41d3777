"""Stage: train the model (and its trained baselines) on the splits of day ``ds``.

For every protocol in ``train.protocols`` (each has its own training split, so its own models) and every
variant in ``train.variants`` (``synergen_core.baselines.VARIANTS``): read the split, build or reuse the
side inputs (text vectors, semantic IDs: ``features.pt`` per protocol), then train with checkpoints and
early stopping into ``<lake>/<train.output>/ds=D/<protocol>/<variant>/`` (``synergen_core.checkpoint``),
then the order its lists are served in, chosen on the validation requests (``synergen_core.list_order``).
A rerun after a kill resumes every unfinished model; finished ones are not retrained (``--fresh`` does).

``prepare`` (the DAG's ``build_training_data`` task) does the first half on its own: it reads each split,
cuts the training windows and writes the side inputs to ``features.pt``, so that the train task (the GPU
task on a cluster) starts from files and spends its slot on optimizer steps only.

Under ``torchrun --nproc_per_node N`` (e.g. ``torchrun --standalone --nproc_per_node 2 --no-python synergen
train --ds D``) every model trains data-parallel on N processes (``synergen_core.distributed``): rank 0
computes missing side inputs first and alone writes the models and the MLflow run.

The MLflow stage runs of both (``build_training_data``, ``train``) are ``jobs.stages``'.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from synergen_core import distributed, lake, list_order
from synergen_core.baselines import variant_config
from synergen_core.config import Config, parse_ds
from synergen_core.data import load_split
from synergen_core.model.embeddings import TokenType
from synergen_core.errors import PipelineError
from synergen_core.features import load_features
from synergen_core.train import pick_device, train
from synergen_core.warm_start import Champion

FULL_RETRAIN_TAG = "synergen.full_retrain_ds"  # version tag: the last day its lineage trained in full

log = logging.getLogger(__name__)
FEATURES = "features.pt"


def protocol_dir(cfg: Config, ds: str, protocol: str) -> Path:
    return cfg.layout.model_dir(ds, protocol, "")


def require_tables(cfg: Config, ds: str, tables: list[str]) -> None:
    """Each sessionized table of ``tables`` has a published partition for ``ds`` holding data files, else a
    ``PipelineError`` naming the partition and the command that writes it."""
    for table in tables:
        part = cfg.layout.part(cfg.layout.sessions(table), ds)
        if not (part / lake.SUCCESS).is_file():
            # a protocol the daily job does not write (sessionize.splits: [temporal] by default)
            off = [p for p in ("loo", "temporal") if table.startswith(f"split_{p}_") and p not in cfg.sessionize.splits]
            writes = f"add {off[0]} to sessionize.splits, then `synergen sessionize --ds {ds}`" if off else \
                f"`synergen sessionize --ds {ds}`"
            raise PipelineError(f"{part}: no published partition of {table} for ds={ds} ({writes} writes it)")
        if not lake.data_files(part):
            raise PipelineError(f"{part}: the partition of {table} for ds={ds} holds no data files (sessionize "
                                f"saw no events up to ds={ds}: check the raw and validated logs of the day)")


def split_tables(protocol: str) -> list[str]:
    """The sessionized tables ``load_split`` reads for ``protocol``."""
    return ["item_vocab", "query_vocab", f"split_{protocol}_train"] + (["split_loo_eval"] if protocol == "loo" else [])


def load_training_split(cfg: Config, ds: str, protocol: str):
    """``load_split`` of a day that must have something to train on: a missing partition or a split without
    a single training window (an empty upstream day) is a ``PipelineError`` naming the split and the day,
    not a run of 0 optimizer steps whose untrained model would go on to evaluation and promotion."""
    require_tables(cfg, ds, split_tables(protocol))
    data = load_split(cfg.layout, ds, protocol, cfg.model.max_seq_len, cfg.train.max_windows,
                      cfg.train.rank_impression_negatives)
    if len(data.windows) == 0:
        part = cfg.layout.part(cfg.layout.split(protocol, "train"), ds)
        raise PipelineError(f"{part}: the {protocol} training split of ds={ds} has no training windows "
                            f"({len(data.train.lengths)} user sequences): nothing to train on; check that the "
                            "day's logs reached validation and sessionize")
    return data


def champion_before(cfg: Config, ds: str) -> Champion | None:
    """The champion a warm start of day ``ds`` begins from: the latest champion (the registry's history of
    the alias, latest last) trained for a day before ``ds``. A rerun of ``ds`` after its own model was
    promoted so starts from the same champion as the first run did. None without one."""
    from synergen_core import checkpoint, registry

    c, name = registry.client(cfg), registry.model_name(cfg)
    if not registry.is_registered(c, name):
        return None
    entry = next((h for h in reversed(registry.champion_history(c, name)) if h.get("ds") and h["ds"] < ds), None)
    if entry is None:
        return None
    path, _, version = registry.download_model(cfg, f"models:/{name}/{entry['version']}")
    full_ds = c.get_model_version(name, version).tags.get(FULL_RETRAIN_TAG) or entry["ds"]
    record = checkpoint.load(Path(path) / checkpoint.MODEL)  # weights only: a file, never code
    return Champion(f"{name}/{version}", entry["ds"], full_ds, record["state_dict"])


def _plan(cfg: Config, data, variants: list[str], protocol: str, notes: dict) -> list[tuple[str, Config]]:
    """(variant, its config) to train on ``data``; single-task variants without search events are noted."""
    has_search = bool((data.train.token_type == TokenType.QUERY).any())
    todo = []
    for v in variants:
        if v == "search_only" and not has_search:
            notes[f"{protocol}/{v}"] = "skipped: the training split has no search events"
        elif v == "rec_only" and not has_search:
            notes[f"{protocol}/{v}"] = "skipped: without search events it is the synergen variant"
        else:
            todo.append((v, variant_config(cfg, v)))
    return todo


def _features(cfg: Config, ds: str, protocol: str, data, todo: list[tuple[str, Config]]):
    need_text = any(c.model.use_text_emb for _, c in todo)
    need_codes = any(c.model.use_semantic_ids or c.model.semantic_head for _, c in todo)
    return load_features(cfg.layout, cfg.text_encoder, cfg.semantic_ids, ds, data.train, data.item_vocab, data.query_vocab, data.n_items, data.n_queries,
                         protocol_dir(cfg, ds, protocol) / FEATURES, need_text, need_codes, protocol=protocol)


def prepare(cfg: Config, ds: str, protocols: list[str] | None = None) -> dict:
    """Per protocol: the split's sizes and the side inputs (cached in ``features.pt``) with their sources."""
    ds = parse_ds(ds).isoformat()
    out: dict = {"ds": ds, "notes": {}}
    for protocol in protocols or cfg.train.protocols:
        t0 = time.perf_counter()
        data = load_training_split(cfg, ds, protocol)
        todo = _plan(cfg, data, list(cfg.train.variants), protocol, out["notes"])
        feats = _features(cfg, ds, protocol, data, todo)
        out[protocol] = {"users": len(data.train.lengths), "windows": len(data.windows),
                         "valid_targets": len(data.valid), "n_items": data.n_items, "n_queries": data.n_queries,
                         "features": feats.notes, "seconds": round(time.perf_counter() - t0, 2)}
    return out


def run(
    cfg: Config, ds: str, variants: list[str] | None = None, protocols: list[str] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train every (protocol, variant); returns {protocol: {variant: summary}} plus notes."""
    ds = parse_ds(ds).isoformat()
    variants = list(variants or cfg.train.variants)
    with distributed.session(cfg.train) as ranks:
        return _run(cfg, ds, variants, protocols, on_step, ranks)


def _run(cfg: Config, ds: str, variants: list[str], protocols: list[str] | None,
         on_step: Callable[[int], None] | None, ranks: distributed.Ranks) -> dict:
    out: dict = {"ds": ds, "notes": {}}
    for protocol in protocols or cfg.train.protocols:
        t0 = time.perf_counter()
        data = load_training_split(cfg, ds, protocol)
        todo = _plan(cfg, data, variants, protocol, out["notes"])
        if not todo:
            continue
        with distributed.main_first(ranks):  # rank 0 writes features.pt when missing, the others read it
            feats = _features(cfg, ds, protocol, data, todo)
        out[protocol] = {"windows": len(data.windows), "valid_targets": len(data.valid), "n_items": data.n_items,
                         "n_queries": data.n_queries, "features": feats.notes,
                         "prepare_seconds": round(time.perf_counter() - t0, 2), "models": {}}
        for v, vcfg in todo:
            d = cfg.layout.model_dir(ds, protocol, v)
            log.info("train %s %s/%s -> %s", ds, protocol, v, d)
            daily = None  # the model the daily job registers may start warm; its plan is in the summary
            if (protocol, v) == (cfg.registry.protocol, cfg.registry.variant):
                with distributed.main_first(ranks):  # rank 0 downloads the champion, the others read its copy
                    # the champion's weights beside today's model: one more model in this process
                    daily = (ds, champion_before(cfg, ds) if vcfg.train.warm_start else None)
            summary = train(vcfg, data, feats, d, on_step=on_step, daily=daily)
            with distributed.main_first(ranks):  # rank 0 alone writes the model files
                if ranks.is_main:  # which order its lists are served in, chosen on validation
                    device = distributed.device(pick_device(vcfg.train), ranks)
                    list_order.record_choice(vcfg, data, d, summary, device)
            out[protocol]["models"][v] = summary
    return out
