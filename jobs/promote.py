"""Stage: the promotion gate of a registered version (``jobs.register`` registered it).

The current champion's figures are the ones the day's evaluation measured in the same pass as the new
model (``evaluation.json``, ``<protocol>.champion``); when the champion changed since (or the evaluation
ran without it), it is evaluated here on the same test targets and candidate lists (``evaluation_set``,
``jobs.evaluate.champion_figures``). The new version becomes
``champion`` unless its ``registry.metric`` is below the champion's by more than ``registry.tolerance``
(relative) or a validation failed, in which case it becomes ``challenger`` and the reason is recorded
(version tags, the stage run's tags and ``promotion.json``). No champion yet: promoted only if it beats
the popularity baseline on ``registry.metric`` (the day's ``evaluation.json``; no baseline figure:
challenger), so that a model trained on an empty or broken day never becomes the first champion unopposed.

Every metric used here is higher-is-better.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Callable

from jobs.evaluate import EvaluationSet, evaluation_set, flat_metrics, read_result, registered_figures, result_path
from jobs.register import model_sha256, trained_protocol
from synergen_core import checkpoint, registry
from synergen_core.config import Config, parse_ds
from synergen_core.registry import CHALLENGER, CHAMPION
from synergen_core.tracking import GROUP_TAG, _mlflow

log = logging.getLogger(__name__)

EVENT_TABLES = ("search_events", "browse_events")


def validations_status(cfg: Config, ds: str, group: str | None = None) -> tuple[bool, list[str]]:
    """Did every validation of ``ds`` pass? The raw event tables of the day that exist must have a
    published validated partition, the day must have validated rows at all (an empty day passes nothing),
    and no stage run of the pipeline run ``group`` may have failed."""
    import pyarrow.parquet as pq

    from synergen_core import lake

    problems = []
    rows = 0  # validated event rows of the day (raw rows when sessionize reads raw/ directly)
    for table in EVENT_TABLES:
        raw = cfg.layout.part(cfg.layout.raw(table), ds)
        source = cfg.layout.part(cfg.layout.valid(table), ds)
        if raw.is_dir() and cfg.sessionize.source != lake.RAW and not (source / lake.SUCCESS).is_file():
            problems.append(f"{table} ds={ds} has no validated partition (validation failed or did not run)")
        elif source.is_dir() and (cfg.sessionize.source == lake.RAW or (source / lake.SUCCESS).is_file()):
            rows += sum(pq.ParquetFile(f).metadata.num_rows for f in lake.data_files(source))
    if not problems and rows == 0:
        # an empty day is not a pass: a model trained and evaluated on nothing must not be promoted
        problems.append(f"nothing validated for ds={ds}: no rows in {', '.join(EVENT_TABLES)} under "
                        f"{cfg.layout.root / cfg.layout.validated} (run `synergen validate --ds {ds}` "
                        "on the day's raw logs)")
    if group:
        mlflow = _mlflow(cfg)
        exp = mlflow.MlflowClient().get_experiment_by_name(cfg.mlflow.experiment)
        runs = mlflow.MlflowClient().search_runs(
            [exp.experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{group}'") if exp else []
        for r in runs:
            failure = r.data.tags.get("synergen.failure")
            if r.info.status == "FAILED" or failure:
                problems.append(f"stage {r.data.tags.get('synergen.stage')} failed: {failure or r.info.status}"[:500])
    return not problems, problems


def promote(cfg: Config, ds: str, version: str | int | None = None, group: str | None = None,
            validations_passed: bool | None = None, skip: bool = False, *, run_id: str) -> dict:
    """The promotion gate for ``version`` (default: the latest version registered for ``ds``).

    ``validations_passed``: the caller's verdict; None checks ``validations_status``. ``skip``: register as
    challenger without comparing (the DAG's skip_promotion). ``run_id``: the promote stage's MLflow run
    (``jobs.stages`` opens it and logs the decision on it), named by the version's gate tags.
    -> {"decision": "champion" | "challenger", "reasons", "version", "champion_before", "metric", "new_value",
    "champion_value", "tolerance", ...}."""
    ds = parse_ds(ds).isoformat()
    name = registry.model_name(cfg)
    c = registry.client(cfg)
    version = str(version) if version is not None else registry.latest_version_of_day(c, name, ds)
    mv = registry.get_version(c, name, version, "promote")
    protocol = mv.tags.get("synergen.protocol") or trained_protocol(cfg, ds)
    champion = registry.alias_version(c, name, CHAMPION)
    out = {"name": name, "version": version, "ds": ds, "protocol": protocol, "metric": cfg.registry.metric,
           "tolerance": cfg.registry.tolerance, "champion_before": str(champion.version) if champion else None,
           "new_value": None, "champion_value": None, "new_source": None, "reasons": []}
    reasons: list[str] = out["reasons"]
    if skip:
        reasons.append("promotion skipped (skip_promotion)")
    if validations_passed is None:
        passed, problems = validations_status(cfg, ds, group)
    else:
        passed, problems = bool(validations_passed), ([] if validations_passed else ["a validation failed"])
    if not passed:
        reasons.append("validations did not pass: " + "; ".join(problems))
    note = ""
    if champion is None and not skip:
        note = _first_version_gate(cfg, ds, protocol, mv, out, reasons)
    elif champion is None:
        note = "no champion yet"
    elif str(champion.version) == version:
        note = "already the champion"
    elif not skip:
        note = _champion_gate(cfg, ds, protocol, mv, str(champion.version), out, reasons)
    if champion is not None and str(champion.version) == version:
        reasons.clear()  # a rerun never demotes the champion: its gate was passed when it was promoted
    out["decision"] = CHALLENGER if reasons else CHAMPION
    out["why"] = "; ".join(reasons) if reasons else note
    _record_decision(c, run_id, out)
    log.info("promote %s: version %s -> %s (%s)", ds, version, out["decision"], out["why"])
    return out


def _champion_gate(cfg: Config, ds: str, protocol: str, mv, champion: str, out: dict, reasons: list[str]) -> str:
    """The gate against champion version ``champion``, both measured on the day's evaluation set.
    -> the note when it passes; appends the reason to ``reasons`` when it does not."""
    metric, tol, version = cfg.registry.metric, cfg.registry.tolerance, out["version"]

    @functools.cache
    def data() -> EvaluationSet:  # read only if a model has to be evaluated here
        return evaluation_set(cfg, ds, protocol)

    new = _new_metrics(cfg, ds, protocol, mv, data, out)
    saved = ((read_result(cfg, ds) or {}).get(protocol) or {}).get("champion")
    if saved and saved["version"] == champion:
        out["champion_source"] = "evaluation.json"
        champ = flat_metrics(saved["figures"])
    else:
        out["champion_source"] = "evaluated"
        champ = _figures_on(cfg, data(), registry.download_model(cfg, f"models:/{out['name']}/{champion}")[0])
    out["new_value"], out["champion_value"] = new.get(metric), champ.get(metric)
    out["champion_metrics"] = champ
    nv, cv = out["new_value"], out["champion_value"]
    if nv is None or not math.isfinite(nv):
        reasons.append(f"{metric} is not available for version {version} on ds={ds}")
    elif cv is None or not math.isfinite(cv):
        return f"champion version {champion} has no {metric} on ds={ds}"
    elif nv < cv - tol * abs(cv) - 1e-12:
        drop = (cv - nv) / abs(cv)
        reasons.append(f"{metric} {nv:.6g} is {drop:.2%} below champion version {champion}'s "
                       f"{cv:.6g} on the test targets of ds={ds} (tolerance {tol:.2%})")
    else:
        return f"{metric} {nv:.6g} vs champion version {champion}'s {cv:.6g} on ds={ds} (tolerance {tol:.2%})"
    return ""


def _first_version_gate(cfg: Config, ds: str, protocol: str, mv, out: dict, reasons: list[str]) -> str:
    """The gate of the first version (no champion to compare with): it must beat the popularity baseline
    on ``registry.metric``, as ``synergen evaluate`` measured it on the day's test targets, else an empty
    or untrained model would become champion unopposed. No baseline figure: not promoted.
    -> the note when it passes; appends the reason to ``reasons`` when it does not."""
    metric = cfg.registry.metric
    evaluation = read_result(cfg, ds)
    baseline = (evaluation or {}).get(protocol, {}).get("scorers", {}).get("popularity")
    base = flat_metrics(baseline).get(metric) if baseline else None
    out["baseline"], out["baseline_value"] = "popularity", base
    if base is None or not math.isfinite(base):
        reasons.append(f"first version: no popularity baseline {metric} for {protocol} in {result_path(cfg, ds)} "
                       f"to beat (run `synergen evaluate --ds {ds}` with evaluate.baselines including popularity)")
        return ""
    new = _new_metrics(cfg, ds, protocol, mv, lambda: evaluation_set(cfg, ds, protocol), out).get(metric)
    out["new_value"] = new
    if new is None or not math.isfinite(new):
        reasons.append(f"{metric} is not available for version {mv.version} on ds={ds}")
    elif not new > base:
        reasons.append(f"first version: {metric} {new:.6g} does not beat the popularity baseline's {base:.6g} "
                       f"on the test targets of ds={ds}")
    else:
        return f"no champion yet; {metric} {new:.6g} beats the popularity baseline's {base:.6g} on ds={ds}"
    return ""


def _new_metrics(cfg: Config, ds: str, protocol: str, mv, data: Callable[[], EvaluationSet],
                 out: dict) -> dict[str, float]:
    """The new version's figures on ``ds``: evaluation.json when it evaluated this very model on this day
    (same code, same candidate lists), else evaluated here on ``data()`` (built only then: it reads the
    day's splits)."""
    evaluation = read_result(cfg, ds)
    variant = mv.tags.get("synergen.variant", cfg.registry.variant)
    path = cfg.layout.model_dir(ds, protocol, variant) / checkpoint.MODEL
    if (evaluation and mv.tags.get("synergen.ds") == ds and path.is_file()
            and model_sha256(path) == mv.tags.get("synergen.model_sha256")
            and variant in evaluation.get(protocol, {}).get("scorers", {})):
        out["new_source"] = "evaluation.json"
        return flat_metrics(evaluation[protocol]["scorers"][variant])
    out["new_source"] = "evaluated"
    return _figures_on(cfg, data(), registry.download_model(cfg, f"models:/{mv.name}/{mv.version}")[0])


def _figures_on(cfg: Config, data: EvaluationSet, model_dir: Path) -> dict[str, float]:
    """A registered model's figures on the day's evaluation set, flat (``jobs.evaluate.registered_figures``)."""
    return flat_metrics(registered_figures(cfg, data, model_dir))


def _record_decision(c, run_id: str, out: dict) -> None:
    """The decision on the registry: the alias, and ``synergen.gate.*`` version tags naming the stage run."""
    name, version, decision = out["name"], out["version"], out["decision"]
    if decision == CHAMPION:
        if out["champion_before"] != version:
            registry.make_champion(c, name, version, "promote", out["ds"], registry.champion_history(c, name))
    else:
        registry.make_challenger(c, name, version)
    gate = {"decision": decision, "reason": out["why"], "ds": out["ds"], "metric": out["metric"],
            "tolerance": out["tolerance"], "value": out["new_value"], "champion_version": out["champion_before"],
            "champion_value": out["champion_value"], "at": registry.now(), "run_id": run_id}
    for k, v in gate.items():
        c.set_model_version_tag(name, version, f"synergen.gate.{k}", "" if v is None else str(v)[:5000])
