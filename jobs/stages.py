"""Pipeline stages as tracked functions of ``(cfg, ds)``: what the CLI and the Airflow tasks call.

Every stage is a ``Stage`` record of ``TABLE``: its untracked body (``(cfg, ds, **kw) -> dict``, in the job
modules) and what its MLflow stage run logs beyond what every run logs. ``run_stage`` is the one tracking
wrapper: it opens the stage run (``synergen_core.tracking.stage_run``: params, lineage tags, duration,
status, nested under the pipeline run ``group``), tags the stage's inputs, runs the body (a failed data
check's attached report is logged before the error goes on), then logs the result's numeric leaves (or the
stage's own selection), the stage's extras (metrics, tags, figures, artifacts) and the result as JSON.

``STAGES`` (the DAG's tasks, in pipeline order) maps each name to its tracked function of
``(cfg, ds, group=None, **kw)``; ``group`` ties the stages of one pipeline run (an Airflow DAG run) together.
Job modules are imported when a stage runs, not here: parsing the DAG imports this module.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from synergen_core.config import Config
from synergen_core.tracking import StageRun, close_parent, stage_run


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a stage's result, as MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name.replace(":", "_")] = v
    return out


def _always(cfg: Config) -> ContextManager[bool]:
    return nullcontext(True)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its body and what its stage run logs besides ``stage_run``'s own."""

    name: str
    body: Callable[..., dict]  # (cfg, ds, **kw) -> the result; untracked
    doc: str  # what the stage does: its tracked function's docstring (the Airflow task's doc)
    inputs: Callable[..., dict] | None = None  # (cfg, ds, **kw) -> tags set before the body: lineage, arguments
    metrics: Callable[[dict], dict] | None = _numbers  # result -> metrics (None: ``log`` logs them)
    log: Callable[[StageRun, Config, str, dict], None] | None = None  # stage-specific metrics, tags, figures...
    result_file: str | None = None  # the result as a JSON artifact of this name
    error: str | None = None  # "module:Exception" of the failed data check that carries a report ...
    report: Callable[[StageRun, Exception], None] | None = None  # ... logged by this before it is re-raised
    in_run: bool = False  # the body works in the stage run: it gets ``run_id`` and ``group`` (the registry)
    tracks: Callable[[Config], ContextManager[bool]] = _always  # entered around the stage: does this process track?


def _resolve(ref: str):
    """``module:name``, imported now."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _lazy(ref: str) -> Callable:
    """The function ``module:name``, imported (and looked up) when called."""
    return lambda *args, **kwargs: _resolve(ref)(*args, **kwargs)


def run_stage(name: str, cfg: Config, ds: str, group: str | None = None, **kw) -> dict:
    """Stage ``name`` of ``TABLE`` in this process, as one tracked MLflow stage run (see the module doc).
    Under ``torchrun`` every rank runs the body and only rank 0 tracks (``train``)."""
    stage = TABLE[name]
    with stage.tracks(cfg) as tracked:
        if not tracked:
            return stage.body(cfg, ds, **kw)
        with stage_run(cfg, name, ds, group) as run:
            return _tracked(stage, run, cfg, ds, group, kw)


def _tracked(stage: Stage, run: StageRun, cfg: Config, ds: str, group: str | None, kw: dict) -> dict:
    """The body of ``stage`` in its open stage run ``run``, and what the stage logs."""
    if stage.inputs is not None:
        run.tags(stage.inputs(cfg, ds, **kw))
    try:
        out = stage.body(cfg, ds, **({**kw, "run_id": run.run_id, "group": group} if stage.in_run else kw))
    except Exception as e:
        if stage.error is not None and isinstance(e, _resolve(stage.error)):
            stage.report(run, e)
        raise
    if stage.metrics is not None:
        run.metrics(stage.metrics(out))
    if stage.log is not None:
        stage.log(run, cfg, ds, out)
    if stage.result_file is not None:
        run.text(json.dumps(out, indent=1, default=str), stage.result_file)
    return out


# ---------------------------------------------------------------- validate_raw, sessionize


def _validate_raw(cfg: Config, ds: str, last_ds: str | None = None) -> dict:
    from jobs import validate

    return validate.run_range(cfg, ds, last_ds or ds)


def _lineage(cfg: Config, ds: str, *tables: str, whole: list[str] = ()) -> str:
    """The ``synergen.inputs`` tag: the day's partitions of ``tables`` and the ``whole`` tables read, comma-separated."""
    return ",".join([str(cfg.layout.part(t, ds).relative_to(cfg.layout.root)) for t in tables] + list(whole))


def _validate_raw_inputs(cfg: Config, ds: str, last_ds: str | None = None) -> dict:
    from jobs import validate

    return {"synergen.inputs": _lineage(cfg, ds, *(cfg.layout.raw(t) for t in validate.TABLES)),
            "synergen.last_ds": last_ds or ds}


def _log_validate_raw(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    from jobs import validate

    run.metrics({"days_without_events": out["days_without_events"]})
    for table, counts in ((t, out[t]) for t in validate.TABLES if t in out):
        _log_reports(run, counts["report_dirs"])
        run.metrics({f"{table}.rows_in": counts["rows_in"], f"{table}.rows_out": counts["rows_valid"],
                     f"{table}.rows_quarantined": counts["rows_quarantined"]})
        for reason, n in counts["reasons"].items():
            run.metrics({f"{table}.quarantined.{reason.replace(':', '_')}": n})


def _log_reports(run: StageRun, report_dirs: list[Path]) -> None:
    """One day's reports as they are; a range's per-day summaries as one JSON per table (a backfill over
    years would otherwise upload thousands of files)."""
    if len(report_dirs) <= MAX_REPORT_DAYS:
        for part in report_dirs:  # <area>/<table>/ds=D
            for name in ("_validation.json", "_validation.html"):
                run.artifact(part / name, f"validation/{part.parent.name}/{part.name}")
        return
    by_table: dict[str, list] = {}
    for part in report_dirs:
        by_table.setdefault(part.parent.name, []).append(json.loads((part / "_validation.json").read_text()))
    for table, summaries in by_table.items():
        run.text(json.dumps(summaries, indent=1), f"validation/{table}/days.json")


MAX_REPORT_DAYS = 31


def _sessionize_inputs(cfg: Config, ds: str, from_ds: str | None = None) -> dict:
    return {"synergen.inputs": _lineage(cfg, ds, *(cfg.layout.valid(t) for t in ("search_events", "browse_events"))),
            "synergen.from_ds": from_ds or ""}


# ---------------------------------------------------------------- item_embeddings, semantic_ids


def _item_embeddings(cfg: Config, ds: str, champion=None) -> dict:
    """Text vectors of items and queries, then collaborative item vectors (``item_vectors``), in a Spark
    session from ``cfg.spark`` (stopped at the end unless it was already active, a caller's).

    ``champion``: the hook for the champion model's item embeddings (``jobs.collab.ChampionLoader``);
    ``embeddings.champion_vectors`` is the config form of it; by default (``embeddings.from_champion``) the
    registry's champion supplies them once there is one.
    """
    from jobs import collab
    from jobs.spark import session

    if champion is None and cfg.embeddings.champion_vectors is None and cfg.embeddings.from_champion:
        champion = collab.champion_from_registry
    with session(cfg) as spark:
        return item_vectors(spark, cfg, ds, champion)


def item_vectors(spark, cfg: Config, ds: str, champion=None) -> dict:
    """The untracked body of ``item_embeddings`` in ``spark``: the text vectors of ``ds``
    (``jobs.text_vectors.embed_texts``), then the collaborative vectors (``jobs.collab.run``, which reads
    them; ``champion``: its loader hook). Returns {"ds", "fingerprint", "items", "queries", "collab", "seconds"}.
    """
    import time

    from jobs import collab, text_vectors
    from synergen_core.config import parse_ds

    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    out = {"ds": ds, **text_vectors.embed_texts(spark, cfg, ds)}
    out["collab"] = collab.run(spark, cfg, ds, champion)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _item_embeddings_inputs(cfg: Config, ds: str, champion=None) -> dict:
    layout = cfg.layout
    return {"synergen.inputs": _lineage(cfg, ds, layout.sessions("item_vocab"), layout.sessions("query_vocab"),
                                        whole=[layout.valid("catalog")])}


def _log_item_embeddings(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    run.tags({"synergen.collab.mode": out["collab"]["mode"], "synergen.collab.basis": out["collab"].get("basis"),
              "synergen.items.mode": out["items"]["mode"]})


def _semantic_ids_inputs(cfg: Config, ds: str) -> dict:
    return {"synergen.inputs": _lineage(cfg, ds, cfg.layout.vectors("items"), cfg.layout.vectors("collab"))}


def _log_semantic_ids(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    run.tags({"synergen.semantic_ids.mode": out["mode"],
              "synergen.semantic_ids.reasons": "; ".join(out["reasons"])[:5000]})
    if out.get("levels"):
        from synergen_core import plots

        run.figure(plots.codebook_utilization(out["levels"], f"semantic IDs {ds}"), "plots/codebook_utilization.png")


# ---------------------------------------------------------------- build_training_data, train, evaluate


def _log_training_data(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    """Split sizes as metrics, side-input sources as tags, per protocol."""
    for protocol, res in out.items():
        if isinstance(res, dict) and "features" in res:
            run.metrics({f"{protocol}.{k}": res[k] for k in ("users", "windows", "valid_targets",
                                                              "n_items", "n_queries", "seconds")})
            sid = res["features"].get("semantic_ids") or {}
            run.tags({f"synergen.{protocol}.text": res["features"].get("text", "none"),
                      f"synergen.{protocol}.semantic_ids": sid.get("source", "none")})


@contextmanager
def _rank_0_tracks(cfg: Config):
    """The process group of a ``torchrun`` launch, held around the whole stage; only rank 0 tracks (the
    summaries are the same on every rank)."""
    from synergen_core import distributed

    with distributed.session(cfg.train) as ranks:
        yield ranks.is_main


def _log_train(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    """Per model: its best validation metric, steps and time, its list order's choice, curves and summary."""
    import math

    from synergen_core import checkpoint, list_order, plots

    for protocol, res in out.items():
        if not isinstance(res, dict) or "models" not in res:
            continue
        for variant, s in res["models"].items():
            key = f"{protocol}.{variant}"
            run.metrics({f"{key}.train_seconds": s["train_seconds"], f"{key}.steps": s["steps"]})
            list_order.log_choice(run, key, s.get("list_order"))  # the order its lists are served in
            if s.get("start"):  # the daily model: warm start from the champion or full retrain, and why
                run.tags({f"synergen.{key}.start": s["start"]["mode"], f"synergen.{key}.start_reason": s["start"]["reason"]})
            if s["best_valid"] is not None:
                run.metrics({f"{key}.valid_{cfg.train.valid_metric.replace('@', '_at_')}": s["best_valid"]})
            for h in s["history"]:  # the training curves: one point per epoch
                curve = {f"{key}.loss": h.get("loss"), f"{key}.valid": h.get(cfg.train.valid_metric)}
                run.metrics({k: v for k, v in curve.items() if v is not None and math.isfinite(v)}, step=h["epoch"])
            if s["history"]:
                run.figure(plots.training_curves(s["history"], cfg.train.valid_metric, key), f"plots/training_{key}.png")
            run.artifact(Path(s["out_dir"]) / checkpoint.SUMMARY, f"train/{protocol}/{variant}")


def train(cfg: Config, ds: str, group: str | None = None, **kwargs) -> dict:
    """The model and its trained baselines (jobs.train): CUDA when present, else the CPU; data-parallel
    over ``train.processes`` processes on each of ``train.nodes`` machines when either is above 1."""
    from synergen_core import distributed

    if (cfg.train.processes > 1 or cfg.train.nodes > 1) and not distributed.launched(os.environ):
        return _torchrun_train(cfg, ds, group, **kwargs)
    return run_stage("train", cfg, ds, group, **kwargs)


def torchrun_args(tcfg, run_name: str) -> list[str]:
    """torchrun's options for ``train.processes`` processes on this machine: ``--standalone`` on one node;
    on ``train.nodes`` nodes, a c10d rendezvous at ``train.rendezvous`` under an id that every node of the
    same run derives from ``run_name`` (the day and the DAG run), so two runs never meet each other."""
    if tcfg.nodes == 1:
        return ["--standalone", f"--nproc_per_node={tcfg.processes}"]
    run_id = "synergen-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-")
    return [f"--nnodes={tcfg.nodes}", f"--nproc_per_node={tcfg.processes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={tcfg.rendezvous}", f"--rdzv-id={run_id}"]


def _torchrun_train(cfg: Config, ds: str, group: str | None, variants=None, protocols=None) -> dict:
    """``synergen train`` under ``torchrun`` (this node's share of the ranks), with this exact config
    (written to a file)."""
    import subprocess
    import sys
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "train.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict()))
        cmd = [str(Path(sys.executable).parent / "torchrun"), *torchrun_args(cfg.train, f"{ds}-{group or 'cli'}"),
               "-m", "jobs.cli", "train", "--ds", ds, "--config", str(config_file)]
        cmd += ["--group", group] if group else []
        cmd += [a for v in variants or [] for a in ("--variant", v)]
        cmd += [a for p in protocols or [] for a in ("--protocol", p)]
        subprocess.run(cmd, check=True)
    return {"ds": ds, "processes": cfg.train.processes, "nodes": cfg.train.nodes}


def _evaluate_metrics(out: dict) -> dict:
    """The headline figures (``jobs.evaluate.headline``) that are finite."""
    import math

    from jobs.evaluate import headline

    return {k.replace("@", "_at_"): v for k, v in headline(out).items() if math.isfinite(v)}


def _log_evaluate(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    """The result as an artifact; Recall@K per scorer, a figure per protocol; served lists' figures as metrics."""
    from jobs import served_lists
    from jobs.evaluate import result_path
    from synergen_core import list_order, plots

    run.metrics(served_lists.metrics(out.get("served")))
    run.artifact(result_path(cfg, ds), "evaluate")
    for protocol, res in out.items():
        if isinstance(res, dict) and res.get("scorers"):
            run.figure(plots.recall_at_k(res["scorers"], cfg.evaluate.ks, protocol), f"plots/recall_at_k_{protocol}.png")
            list_order.log_served(run, protocol, res["scorers"])  # which order each model's lists are served in


# ---------------------------------------------------------------- register, promote


def _log_register(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    from jobs.register import model_file

    if out["reused"]:
        run.tags({"synergen.registry.version": out["version"], "synergen.registry.reused": "true"})
    else:
        run.tags({"synergen.registry.version": out["version"], "synergen.semantic_ids_ds": out["semantic_ids_ds"],
                  "synergen.inputs": str(model_file(cfg, out["ds"], out["protocol"]))})


def _promote(cfg: Config, ds: str, version: str | int | None = None, skip: bool | None = None, **kw) -> dict:
    """``jobs.promote.promote``; ``skip`` defaults to ``registry.skip_promotion`` (the DAG's param)."""
    from jobs import promote

    return promote.promote(cfg, ds, version, skip=cfg.registry.skip_promotion if skip is None else skip, **kw)


def _gate_metrics(out: dict) -> dict:
    import math

    return {f"gate.{k}": v for k, v in (("new", out["new_value"]), ("champion", out["champion_value"]))
            if v is not None and math.isfinite(v)}


def _log_promote(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    run.tags({"synergen.registry.version": out["version"], "synergen.registry.decision": out["decision"],
              "synergen.registry.reason": out["why"][:5000],
              "synergen.registry.champion_before": out["champion_before"] or ""})
    run.text(f"version {out['version']}: {out['decision']}\n{out['why']}\n", "promotion.txt")


# ---------------------------------------------------------------- score, validate_candidates, publish


def _score(cfg: Config, ds: str, model_dir: str | Path | None = None) -> dict:
    from jobs import score
    from jobs.spark import session

    with session(cfg) as spark:
        return score.run(spark, cfg, ds, model_dir)


def _score_inputs(cfg: Config, ds: str, model_dir: str | Path | None = None) -> dict:
    return {"synergen.inputs": _lineage(cfg, ds, *(cfg.layout.sessions(t) for t in ("sequences", "consumed", "events"))),
            "synergen.score.model_ref": str(model_dir or cfg.score.model),
            "synergen.score.retriever": cfg.score.retriever}


def _score_metrics(out: dict) -> dict:
    """Counts, durations, index recall."""
    figures = _numbers({k: out[k] for k in ("surfaces", "seconds", "users", "users_per_s", "dropped",
                                            "catalog_items", "queries_added")})
    return {**figures, **({"index.ann_recall": out["index"]["ann_recall"]} if "ann_recall" in out["index"] else {})}


def _log_score(run: StageRun, cfg: Config, ds: str, out: dict) -> None:
    run.tags({"synergen.model.name": out["model"]["name"], "synergen.model.version": out["model"]["version"],
              "synergen.score.index": out["index"].get("kind"),
              "synergen.score.index_why": out["index"].get("why", "")})


def _log_json(name: str, attribute: str, **dumps) -> Callable[[StageRun, Exception], None]:
    """A failed check's report (the error's ``attribute``) as the JSON artifact ``name``."""
    return lambda run, e: run.text(json.dumps(getattr(e, attribute), indent=1, **dumps), name)


# ---------------------------------------------------------------- the stages, in pipeline order

TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("validate_raw", _validate_raw, "The day's raw tables (to ``last_ds``: a range of days) validated, bad rows "
          "quarantined with a reason (jobs.validate): counts as metrics, reports as artifacts.",
          inputs=_validate_raw_inputs, metrics=None, log=_log_validate_raw,
          error="jobs.validate:ValidationFailed", report=lambda run, e: _log_reports(run, e.report_dirs)),
    Stage("sessionize", _lazy("jobs.sessionize:stage"), "Events -> sessions, token sequences, vocabularies and "
          "splits (jobs.sessionize; ``from_ds``: rebuild from the state before that day up to ``ds``).",
          inputs=_sessionize_inputs, result_file="sessionize.json"),
    Stage("item_embeddings", _item_embeddings, _item_embeddings.__doc__, inputs=_item_embeddings_inputs,
          log=_log_item_embeddings, result_file="item_embeddings.json"),
    Stage("semantic_ids", _lazy("jobs.semantic_ids:stage"), "RQ-VAE semantic IDs of every item "
          "(jobs.semantic_ids): quality figures as metrics.", inputs=_semantic_ids_inputs, log=_log_semantic_ids,
          result_file="semantic_ids.json", error="jobs.semantic_ids:SemanticIdsInvalid",
          report=_log_json("semantic_ids_validation.json", "summary")),
    Stage("build_training_data", _lazy("jobs.train:prepare"), "Training windows and side inputs of every "
          "protocol (jobs.train.prepare).", metrics=None, log=_log_training_data),
    Stage("train", _lazy("jobs.train:run"), train.__doc__, metrics=None, log=_log_train, tracks=_rank_0_tracks),
    Stage("evaluate", _lazy("jobs.served_lists:evaluate_stage"), "Every trained variant and baseline on the "
          "same test targets (jobs.evaluate); the lists served on the day (jobs.served_lists).",
          metrics=_evaluate_metrics, log=_log_evaluate),
    Stage("register", _lazy("jobs.register:register"), "The day's model as a new version of the registered "
          "model (jobs.register).", metrics=None, log=_log_register, in_run=True),
    Stage("promote", _promote, "The promotion gate: champion if not worse than the current one on the same data "
          "and every validation of the run passed; challenger otherwise, with the reason (jobs.promote).",
          metrics=_gate_metrics, log=_log_promote, result_file="promotion.json", in_run=True),
    Stage("score", _score, "Candidate lists of every request of the day, staged for validation (jobs.score).",
          inputs=_score_inputs, metrics=_score_metrics, log=_log_score, result_file="score.json"),
    Stage("validate_candidates", _lazy("jobs.candidates:validate_candidates"), "The candidate lists' Great "
          "Expectations suite (schemas.candidates); fails the run when broken.",
          metrics=lambda out: {"rows": out["rows"], "lists": out["lists"], "failed_checks": len(out["failed"])},
          result_file="validate_candidates.json", error="jobs.candidates:CandidatesInvalid",
          report=_log_json("validate_candidates.json", "report", default=str)),
    Stage("publish", _lazy("jobs.candidates:publish"), "Validated lists renamed into "
          "``<lake>/<score.output>/ds=D`` with ``_SUCCESS`` (jobs.candidates).",
          metrics=lambda out: {"rows": out["rows"], "lists": out["lists"]},
          log=lambda run, cfg, ds, out: run.tags({"synergen.outputs": out["path"]})),
)}


def _tracked_function(stage: Stage) -> Callable[..., dict]:
    def tracked(cfg: Config, ds: str, group: str | None = None, **kw) -> dict:
        return run_stage(stage.name, cfg, ds, group, **kw)

    tracked.__name__ = tracked.__qualname__ = stage.name
    tracked.__doc__ = stage.doc
    return tracked


# train starts itself under torchrun when asked for more than one process; the others are run_stage as they are
STAGES: dict[str, Callable[..., dict]] = {
    name: train if name == "train" else _tracked_function(stage) for name, stage in TABLE.items()}
validate_raw = STAGES["validate_raw"]
sessionize = STAGES["sessionize"]
item_embeddings = STAGES["item_embeddings"]
semantic_ids = STAGES["semantic_ids"]
build_training_data = STAGES["build_training_data"]
evaluate = STAGES["evaluate"]
register = STAGES["register"]
promote = STAGES["promote"]
score = STAGES["score"]
validate_candidates = STAGES["validate_candidates"]
publish = STAGES["publish"]


# ---------------------------------------------------------------- Airflow


def config_for_run(params: dict | None) -> Config:
    """The config of one DAG run: the file named by the ``config`` param (else defaults + environment),
    then the hand-trigger overrides (``epochs``, ``d_model``...) where set."""
    from synergen_core.config import load_config

    params = dict(params or {})
    cfg = load_config(params.pop("config", None) or None)
    for key, section, field in OVERRIDES:
        if params.get(key) is not None:
            setattr(getattr(cfg, section), field, params[key])
    return cfg


OVERRIDES = (  # DAG param -> config section, field
    ("epochs", "train", "epochs"),
    ("d_model", "model", "d_model"),
    ("n_layers", "model", "n_layers"),
    ("skip_promotion", "registry", "skip_promotion"),
)


def data_errors() -> tuple[type[Exception], ...]:
    """Failed data checks (the stages' ``error``): the same input fails the same way, so a retry cannot help."""
    return tuple(_resolve(s.error) for s in TABLE.values() if s.error is not None)


def run_for_pipeline(stage: str, ds: str, params: dict | None, group: str) -> None:
    """One stage of pipeline run ``group`` (a DAG run) with the run's config; the pipeline's last stage
    closes the run's MLflow parent run as FINISHED (a failure closes it through ``pipeline_failed``)."""
    cfg = config_for_run(params)
    STAGES[stage](cfg, ds, group=group)
    if stage == LAST_STAGE:
        close_parent(cfg, group)


LAST_STAGE = list(STAGES)[-1]


def pipeline_failed(params: dict | None, group: str, reason: str) -> None:
    """Pipeline run ``group`` ended in a failure: its MLflow parent run is closed FAILED with ``reason``."""
    close_parent(config_for_run(params), group, reason)
