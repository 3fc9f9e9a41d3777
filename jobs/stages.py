"""Pipeline stages as tracked functions of ``(cfg, ds)``: what the CLI and the Airflow tasks call.

Each wraps a stage module in an MLflow stage run (synergen_core.tracking) and logs its counts,
durations and reports. ``group`` ties the stages of one pipeline run (an Airflow DAG run) together.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from synergen_core.config import Config
from synergen_core.tracking import close_parent, stage_run


def validate_raw(cfg: Config, ds: str, group: str | None = None, last_ds: str | None = None) -> dict:
    from jobs import validate

    last_ds = last_ds or ds
    with stage_run(cfg, "validate_raw", ds, group) as run:
        run.tags({"synergen.inputs": ",".join(f"raw/{t}/ds={ds}" for t in validate.TABLES),
                  "synergen.last_ds": last_ds})
        try:
            out = validate.run_range(cfg, ds, last_ds)
        except validate.ValidationFailed as e:
            _log_reports(run, e.report_dirs)
            raise
        run.metrics({"days_without_events": out["days_without_events"]})
        for table, counts in ((t, out[t]) for t in validate.TABLES if t in out):
            _log_reports(run, counts["report_dirs"])
            run.metrics({f"{table}.rows_in": counts["rows_in"], f"{table}.rows_out": counts["rows_valid"],
                         f"{table}.rows_quarantined": counts["rows_quarantined"]})
            for reason, n in counts["reasons"].items():
                run.metrics({f"{table}.quarantined.{reason.replace(':', '_')}": n})
        return out


def _log_reports(run, report_dirs: list[Path]) -> None:
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


def sessionize(cfg: Config, ds: str, group: str | None = None, from_ds: str | None = None) -> dict:
    from jobs import sessionize as job

    with stage_run(cfg, "sessionize", ds, group) as run:
        run.tags({"synergen.inputs": ",".join(f"validated/{t}/ds={ds}" for t in ("search_events", "browse_events")),
                  "synergen.from_ds": from_ds or ""})
        out = job.stage(cfg, ds, from_ds)
        run.metrics({k: v for k, v in _numbers(out).items()})
        run.text(json.dumps(out, indent=1, default=str), "sessionize.json")
        return out


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


def item_embeddings(cfg: Config, ds: str, group: str | None = None, champion=None) -> dict:
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

    with stage_run(cfg, "item_embeddings", ds, group) as run:
        run.tags({"synergen.inputs": f"{cfg.sessionize.output}/item_vocab/ds={ds},"
                                     f"{cfg.sessionize.output}/query_vocab/ds={ds},{cfg.sessionize.source}/catalog"})
        with session(cfg) as spark:
            out = item_vectors(spark, cfg, ds, champion)
        run.tags({"synergen.collab.mode": out["collab"]["mode"], "synergen.collab.basis": out["collab"].get("basis"),
                  "synergen.items.mode": out["items"]["mode"]})
        run.metrics(_numbers(out))
        run.text(json.dumps(out, indent=1, default=str), "item_embeddings.json")
        return out


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


def semantic_ids(cfg: Config, ds: str, group: str | None = None) -> dict:
    """RQ-VAE semantic IDs of every item (jobs.semantic_ids): quality figures as metrics."""
    from jobs import semantic_ids as job

    with stage_run(cfg, "semantic_ids", ds, group) as run:
        run.tags({"synergen.inputs": f"{cfg.embeddings.output}/items/ds={ds},{cfg.embeddings.output}/collab/ds={ds}"})
        try:
            out = job.stage(cfg, ds)
        except job.SemanticIdsInvalid as e:
            run.text(json.dumps(e.summary, indent=1), "semantic_ids_validation.json")
            raise
        run.tags({"synergen.semantic_ids.mode": out["mode"], "synergen.semantic_ids.reasons": "; ".join(out["reasons"])[:5000]})
        run.metrics(_numbers(out))
        run.text(json.dumps(out, indent=1, default=str), "semantic_ids.json")
        if out.get("levels"):
            from synergen_core import plots

            run.figure(plots.codebook_utilization(out["levels"], f"semantic IDs {ds}"), "plots/codebook_utilization.png")
        return out


def build_training_data(cfg: Config, ds: str, group: str | None = None, **kwargs) -> dict:
    """Training windows and side inputs of every protocol (jobs.train.prepare)."""
    from jobs import train as job

    return job.prepare_stage(cfg, ds, group, **kwargs)


def train(cfg: Config, ds: str, group: str | None = None, **kwargs) -> dict:
    """The model and its trained baselines (jobs.train): CUDA when present, else the CPU; data-parallel
    over ``train.processes`` processes when above 1."""
    from jobs import train as job
    from synergen_core import distributed

    if cfg.train.processes > 1 and not distributed.launched(os.environ):
        return _torchrun_train(cfg, ds, group, **kwargs)
    return job.stage(cfg, ds, group, **kwargs)


def _torchrun_train(cfg: Config, ds: str, group: str | None, variants=None, protocols=None) -> dict:
    """``synergen train`` under ``torchrun --standalone``, with this exact config (written to a file)."""
    import subprocess
    import sys
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "train.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict()))
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               f"--nproc_per_node={cfg.train.processes}", "-m", "jobs.cli", "train", "--ds", ds,
               "--config", str(config_file)]
        cmd += ["--group", group] if group else []
        cmd += [a for v in variants or [] for a in ("--variant", v)]
        cmd += [a for p in protocols or [] for a in ("--protocol", p)]
        subprocess.run(cmd, check=True)
    return {"ds": ds, "processes": cfg.train.processes}


def evaluate(cfg: Config, ds: str, group: str | None = None, **kwargs) -> dict:
    """Every trained variant and baseline on the same test targets (jobs.evaluate)."""
    from jobs import evaluate as job

    return job.stage(cfg, ds, group, **kwargs)


def register(cfg: Config, ds: str, group: str | None = None) -> dict:
    """The day's model as a new version of the registered model (jobs.register)."""
    from jobs import register as job

    return job.register(cfg, ds, group)


def promote(cfg: Config, ds: str, group: str | None = None) -> dict:
    """The promotion gate: champion if not worse than the current one on the same data and every
    validation of the run passed; challenger otherwise, with the reason (jobs.promote)."""
    from jobs import promote as job

    return job.promote(cfg, ds, None, group, skip=cfg.registry.skip_promotion)


def score(cfg: Config, ds: str, group: str | None = None, **kwargs) -> dict:
    """Candidate lists of every request of the day, staged for validation (jobs.score)."""
    from jobs import score as job

    return job.stage(cfg, ds, group, **kwargs)


def validate_candidates(cfg: Config, ds: str, group: str | None = None) -> dict:
    """The candidate lists' Great Expectations suite (schemas.candidates); fails the run when broken."""
    from jobs import candidates as job

    return job.validate_stage(cfg, ds, group)


def publish(cfg: Config, ds: str, group: str | None = None) -> dict:
    """Validated lists renamed into ``<lake>/<score.output>/ds=D`` with ``_SUCCESS`` (jobs.candidates)."""
    from jobs import candidates as job

    return job.publish_stage(cfg, ds, group)


# ---------------------------------------------------------------- Airflow

STAGES = {
    "validate_raw": validate_raw,
    "sessionize": sessionize,
    "item_embeddings": item_embeddings,
    "semantic_ids": semantic_ids,
    "build_training_data": build_training_data,
    "train": train,
    "evaluate": evaluate,
    "register": register,
    "promote": promote,
    "score": score,
    "validate_candidates": validate_candidates,
    "publish": publish,
}


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
    """Failed data checks: the same input fails the same way, so a retry cannot help."""
    from jobs.candidates import CandidatesInvalid
    from jobs.semantic_ids import SemanticIdsInvalid
    from jobs.validate import ValidationFailed

    return ValidationFailed, SemanticIdsInvalid, CandidatesInvalid


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
