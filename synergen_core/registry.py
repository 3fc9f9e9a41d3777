"""The MLflow model registry: register every trained model, gate its promotion, serve ``@champion``.

Plain functions over ``mlflow.MlflowClient`` (the registry lives in the tracking store, e.g. SQLite):

* ``register(cfg, ds)``: the ``registry.variant`` model of ``registry.protocol`` trained for ``ds``
  (``<lake>/<train.output>/ds=D/<protocol>/<variant>/model.pt``) is logged as an ``mlflow.pyfunc`` model
  (``synergen_core.serving.SynerGenPyfunc``: token sequences in, top-k item indices and scores out;
  signature and input example from the day's test requests) and registered as a new version of
  ``mlflow.registered_model``, with version tags: ``synergen.ds``, the semantic-ID table it was trained
  with (``synergen.semantic_ids_ds``: the day of the ``semantic_ids`` partition, or "none" for in-process
  IDs), the code version and its evaluation figures (``synergen.metric.<task>.<name>``, from
  ``evaluation.json``). Registering the same model file again returns the existing version (reruns and
  retries are idempotent).
* ``promote(cfg, ds, version)``: the gate. The current champion is re-evaluated on the same day's test
  targets with the same code and candidate lists (``OlderVocabScorer`` adapts a model trained on smaller
  vocabularies); the new version becomes ``champion`` unless its ``registry.metric`` is below the
  champion's by more than ``registry.tolerance`` (relative) or a validation failed, in which case it
  becomes ``challenger`` and the reason is recorded (version tags, the stage run's tags and
  ``promotion.json``). No champion yet: promoted only if it beats the popularity baseline on
  ``registry.metric`` (the day's ``evaluation.json``; no baseline figure: challenger), so that a model
  trained on an empty or broken day never becomes the first champion unopposed.
* ``download_model(cfg, ref)``: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> a local
  folder holding ``model.pt`` (what scoring reads).
* ``status(cfg)``, ``rollback(cfg, version=None)``: the champion's history is a stack kept in the registered
  model's tag ``synergen.champion_history``; a rollback without a version pops the current champion and
  restores the one before it, so successive rollbacks walk back in time.

Every metric used here is higher-is-better.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from synergen_core import checkpoint
from synergen_core.config import Config, parse_ds
from synergen_core.errors import PipelineError
# SynerGenPyfunc stays importable from here: versions registered before it moved pickled this module path
from synergen_core.serving import ARTIFACT, SynerGenPyfunc, input_example, pyfunc_requirements, pyfunc_signature
from synergen_core.tracking import GROUP_TAG, _mlflow, code_version, stage_run

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "synergen.champion_history"  # registered-model tag: JSON stack of champions, latest last
HISTORY_MAX = 100
METRIC_TAG = "synergen.metric."  # version tag prefix: synergen.metric.<task>.<name> (@ -> _at_)
EVENT_TABLES = ("search_events", "browse_events")


class RegistryError(PipelineError):
    """A registry failure the person running the pipeline can act on (bad version, nothing registered)."""


# ---- small helpers ------------------------------------------------------------------------------


def model_name(cfg: Config) -> str:
    return cfg.mlflow.registered_model


def client(cfg: Config):
    return _mlflow(cfg).MlflowClient()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _tag_key(metric: str) -> str:
    return METRIC_TAG + metric.replace("@", "_at_")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flat_metrics(scorer_result: dict) -> dict[str, float]:
    """One scorer's ``evaluate_scorer`` output -> {"<task>.<name>": value}: catalog metrics as they are
    (recall@K, ndcg@K, mrr, n), candidate-list ones as rank_auc, rank_ndcg@K, rank_lists."""
    out: dict[str, float] = {}
    for task, m in scorer_result.get("catalog", {}).items():
        out.update({f"{task}.{k}": float(v) for k, v in m.items()})
    for task, m in scorer_result.get("ranking", {}).items():
        for k, v in m.items():
            out[f"{task}.rank_{'auc' if k == 'auc' else k}"] = float(v)
    return {**out, **_both_tasks(out)}


def _both_tasks(per_task: dict[str, float]) -> dict[str, float]:
    """``all.<name>``: the geometric mean of ``<task>.<name>`` over the tasks that have it (one model
    serves both surfaces, so the gate's default weighs both, as training's ``valid_metric`` does)."""
    names = {key.split(".", 1)[1] for key in per_task if key.startswith(("rec.", "search."))}
    out = {}
    for name in names - {"n", "rank_lists"}:
        values = [per_task[f"{t}.{name}"] for t in ("rec", "search") if f"{t}.{name}" in per_task]
        out[f"all.{name}"] = float(np.prod(values) ** (1 / len(values))) if min(values) >= 0 else float("nan")
    return out


def _resolve_protocol(cfg: Config, ds: str) -> str:
    """``registry.protocol`` when its model exists for ``ds``, else the other protocol's."""
    wanted = cfg.registry.protocol
    for protocol in [wanted] + [p for p in ("temporal", "loo") if p != wanted]:
        if (checkpoint.run_dir(cfg.lake.root, cfg.train.output, ds, protocol, cfg.registry.variant)
                / checkpoint.MODEL).is_file():
            return protocol
    raise RegistryError(f"no {cfg.registry.variant} model trained for ds={ds} under "
                        f"{Path(cfg.lake.root) / cfg.train.output / f'ds={ds}'} (run `synergen train --ds {ds}`)")


def semantic_ids_version(cfg: Config, ds: str, protocol: str) -> tuple[str, str]:
    """(day of the ``semantic_ids`` table the model was trained with or "none", source note), from the
    notes ``synergen_core.features`` left in ``features.pt``."""
    path = checkpoint.run_dir(cfg.lake.root, cfg.train.output, ds, protocol, "") / "features.pt"
    if not path.is_file():
        return "none", "unknown (no features.pt)"
    notes = (checkpoint.load(path).get("notes") or {}).get("semantic_ids")
    if not notes:
        return "none", "not used"
    return str(notes.get("table_ds") or "none"), str(notes.get("source") or "in-process")


def _evaluation(cfg: Config, ds: str) -> dict | None:
    path = Path(cfg.lake.root) / cfg.train.output / f"ds={ds}" / "evaluation.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _version_metrics(mv) -> dict[str, float]:
    out = {}
    for k, v in mv.tags.items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):].replace("_at_", "@")] = float(v)
            except ValueError:
                pass
    return out


def _versions(c, name: str) -> list:
    return sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _get_version(c, name: str, version: str, doing: str):
    """Model version ``version`` of ``name``, or a ``RegistryError`` naming it and the versions there are
    (MLflow's own error for a missing or non-numeric version is a stack trace from its REST layer)."""
    known = [str(v.version) for v in _versions(c, name)] if _registered(c, name) else []
    if str(version) not in known:
        shown = known if len(known) <= 15 else known[:3] + ["..."] + known[-10:]  # one line, even after years
        there = f"registered versions: {', '.join(shown)}" if known else f"no version of {name} is registered yet"
        raise RegistryError(f"cannot {doing} {name} version {version!r}: no such version ({there})")
    return c.get_model_version(name, str(version))


def _alias_version(c, name: str, alias: str):
    try:
        return c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST: no such alias
        return None


# ---- register -----------------------------------------------------------------------------------


def register(cfg: Config, ds: str, group: str | None = None) -> dict:
    """Log the day's model as a pyfunc and register it as a new version (see the module doc).

    -> {"name", "version", "ds", "protocol", "semantic_ids_ds", "metrics", "reused"}."""
    import mlflow

    ds = parse_ds(ds).isoformat()
    name = model_name(cfg)
    protocol = _resolve_protocol(cfg, ds)
    variant = cfg.registry.variant
    model_dir = checkpoint.run_dir(cfg.lake.root, cfg.train.output, ds, protocol, variant)
    model_file = model_dir / checkpoint.MODEL
    sha = _sha256(model_file)
    sid_ds, sid_source = semantic_ids_version(cfg, ds, protocol)
    evaluation = _evaluation(cfg, ds)
    metrics = {}
    if evaluation and variant in evaluation.get(protocol, {}).get("scorers", {}):
        metrics = flat_metrics(evaluation[protocol]["scorers"][variant])
    with stage_run(cfg, "register", ds, group) as run:
        c = client(cfg)
        same = [v for v in (_versions(c, name) if _registered(c, name) else [])
                if v.tags.get("synergen.model_sha256") == sha]
        if same:
            mv = same[-1]
            run.tags({"synergen.registry.version": str(mv.version), "synergen.registry.reused": "true"})
            log.info("register %s: model already registered as %s version %s", ds, name, mv.version)
            return _register_result(name, str(mv.version), ds, protocol, sid_ds, _version_metrics(mv), True)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SynerGenPyfunc(), artifacts={ARTIFACT: str(model_file)},
            signature=pyfunc_signature(), input_example=input_example(cfg, ds, protocol),
            pip_requirements=pyfunc_requirements(),
        )
        tags = {"synergen.ds": ds, "synergen.protocol": protocol, "synergen.variant": variant,
                "synergen.semantic_ids_ds": sid_ds, "synergen.semantic_ids_source": sid_source,
                "synergen.code_version": code_version(), "synergen.model_sha256": sha,
                "synergen.model_path": str(model_file), "synergen.run_id": run.run_id,
                "synergen.registered_at": _now(), **({GROUP_TAG: group} if group else {}),
                **{_tag_key(k): repr(v) for k, v in metrics.items() if math.isfinite(v)}}
        # the version is created with its tags in one call (a tag at a time costs a commit each)
        version = str(mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()}).version)
        run.tags({"synergen.registry.version": version, "synergen.semantic_ids_ds": sid_ds,
                  "synergen.inputs": str(model_file)})
        # on the run and on the logged model (its page in the MLflow UI shows them)
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if math.isfinite(v)},
                           model_id=info.model_id)
        log.info("register %s: %s version %s (%s/%s)", ds, name, version, protocol, variant)
        return _register_result(name, version, ds, protocol, sid_ds, metrics, False)


def _registered(c, name: str) -> bool:
    try:
        c.get_registered_model(name)
        return True
    except Exception:  # noqa: BLE001 - not registered yet
        return False


def _register_result(name, version, ds, protocol, sid_ds, metrics, reused) -> dict:
    return {"name": name, "version": str(version), "ds": ds, "protocol": protocol, "semantic_ids_ds": sid_ds,
            "metrics": metrics, "reused": reused}


# ---- evaluation on the same data ----------------------------------------------------------------


class _SameData:
    """The test targets and candidate lists of one day and protocol, built once, exactly as
    ``jobs.evaluate`` builds them."""

    def __init__(self, cfg: Config, ds: str, protocol: str):
        from schemas import C
        from synergen_core.data import item_counts, load_test, read_table, tokens_from_arrow, vocab_size
        from synergen_core.evaluate import ranking_lists

        self.cfg, self.ds, self.protocol = cfg, ds, protocol
        self.test, _ = load_test(cfg, ds, protocol)
        train_tokens = tokens_from_arrow(read_table(cfg, f"split_{protocol}_train", ds)[C.TOKENS])
        self.n_items = vocab_size(read_table(cfg, "item_vocab", ds), C.ITEM_INDEX)
        counts = item_counts(train_tokens, self.n_items)
        self.cand = ranking_lists(self.test, counts, cfg.evaluate)

    def evaluate(self, model_dir: Path) -> dict[str, float]:
        from synergen_core.evaluate import OlderVocabScorer, evaluate_scorer
        from synergen_core.train import pick_device

        device = pick_device(self.cfg.train)
        model = checkpoint.load_model(model_dir, device)
        scorer = OlderVocabScorer(model, self.n_items, device=device, use_ranking_head=model.cfg.w_ranking > 0)
        return flat_metrics(evaluate_scorer(scorer, self.test, self.cand, self.cfg.evaluate))


def validations_status(cfg: Config, ds: str, group: str | None = None) -> tuple[bool, list[str]]:
    """Did every validation of ``ds`` pass? The raw event tables of the day that exist must have a
    published validated partition, the day must have validated rows at all (an empty day passes nothing),
    and no stage run of the pipeline run ``group`` may have failed."""
    import pyarrow.parquet as pq

    from synergen_core import lake

    problems = []
    rows = 0  # validated event rows of the day (raw rows when sessionize reads raw/ directly)
    for table in EVENT_TABLES:
        raw = lake.partition(cfg.lake.root, f"raw/{table}", ds)
        source = lake.partition(cfg.lake.root, f"{cfg.sessionize.source}/{table}", ds)
        if raw.is_dir() and cfg.sessionize.source != "raw" and not (source / lake.SUCCESS).is_file():
            problems.append(f"{table} ds={ds} has no validated partition (validation failed or did not run)")
        elif source.is_dir() and (cfg.sessionize.source == "raw" or (source / lake.SUCCESS).is_file()):
            rows += sum(pq.ParquetFile(f).metadata.num_rows for f in lake.data_files(source))
    if not problems and rows == 0:
        # an empty day is not a pass: a model trained and evaluated on nothing must not be promoted
        problems.append(f"nothing validated for ds={ds}: no rows in {', '.join(EVENT_TABLES)} under "
                        f"{Path(cfg.lake.root) / cfg.sessionize.source} (run `synergen validate --ds {ds}` "
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


# ---- promote ------------------------------------------------------------------------------------


def _history(c, name: str) -> list[dict]:
    raw = c.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _set_history(c, name: str, history: list[dict]) -> None:
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:], separators=(",", ":")))


def _make_champion(c, name: str, version: str, how: str, ds: str, history: list[dict]) -> None:
    at = _now()
    c.set_registered_model_alias(name, CHAMPION, version)
    challenger = _alias_version(c, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    c.set_model_version_tag(name, version, "synergen.promoted_at", at)
    c.set_model_version_tag(name, version, "synergen.promoted_by", how)
    _set_history(c, name, history + [{"version": version, "at": at, "by": how, "ds": ds}])


def _default_version(c, name: str, ds: str) -> str:
    found = [v for v in _versions(c, name) if v.tags.get("synergen.ds") == ds]
    if not found:
        raise RegistryError(f"no version of {name} registered for ds={ds} (run the register stage first)")
    return str(found[-1].version)


def promote(cfg: Config, ds: str, version: str | int | None = None, group: str | None = None,
            validations_passed: bool | None = None, skip: bool = False) -> dict:
    """The promotion gate for ``version`` (default: the latest version registered for ``ds``).

    ``validations_passed``: the caller's verdict; None checks ``validations_status``. ``skip``: register as
    challenger without comparing (the DAG's skip_promotion). -> {"decision": "champion" | "challenger",
    "reasons", "version", "champion_before", "metric", "new_value", "champion_value", "tolerance", ...}."""
    ds = parse_ds(ds).isoformat()
    name = model_name(cfg)
    metric, tol = cfg.registry.metric, cfg.registry.tolerance
    with stage_run(cfg, "promote", ds, group) as run:
        c = client(cfg)
        version = str(version) if version is not None else _default_version(c, name, ds)
        mv = _get_version(c, name, version, "promote")
        protocol = mv.tags.get("synergen.protocol") or _resolve_protocol(cfg, ds)
        champion = _alias_version(c, name, CHAMPION)
        out = {"name": name, "version": version, "ds": ds, "protocol": protocol, "metric": metric,
               "tolerance": tol, "champion_before": str(champion.version) if champion else None,
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
            same = _SameData(cfg, ds, protocol)
            new = _new_metrics(cfg, ds, protocol, mv, lambda: same, out)
            champ_model = download_model(cfg, f"models:/{name}/{champion.version}")[0]
            champ = same.evaluate(champ_model)
            out["new_value"], out["champion_value"] = new.get(metric), champ.get(metric)
            out["champion_metrics"] = champ
            nv, cv = out["new_value"], out["champion_value"]
            if nv is None or not math.isfinite(nv):
                reasons.append(f"{metric} is not available for version {version} on ds={ds}")
            elif cv is None or not math.isfinite(cv):
                note = f"champion version {champion.version} has no {metric} on ds={ds}"
            elif nv < cv - tol * abs(cv) - 1e-12:
                drop = (cv - nv) / abs(cv)
                reasons.append(f"{metric} {nv:.6g} is {drop:.2%} below champion version {champion.version}'s "
                               f"{cv:.6g} on the test targets of ds={ds} (tolerance {tol:.2%})")
            else:
                note = (f"{metric} {nv:.6g} vs champion version {champion.version}'s {cv:.6g} on ds={ds} "
                        f"(tolerance {tol:.2%})")
        if champion is not None and str(champion.version) == version:
            reasons.clear()  # a rerun never demotes the champion: its gate was passed when it was promoted
        decision = CHALLENGER if reasons else CHAMPION
        out["decision"] = decision
        out["why"] = "; ".join(reasons) if reasons else note
        if decision == CHAMPION:
            if champion is None or str(champion.version) != version:
                _make_champion(c, name, version, "promote", ds, _history(c, name))
        else:
            c.set_registered_model_alias(name, CHALLENGER, version)
        gate = {"decision": decision, "reason": out["why"], "ds": ds, "metric": metric, "tolerance": tol,
                "value": out["new_value"], "champion_version": out["champion_before"],
                "champion_value": out["champion_value"], "at": _now(), "run_id": run.run_id}
        for k, v in gate.items():
            c.set_model_version_tag(name, version, f"synergen.gate.{k}", "" if v is None else str(v)[:5000])
        run.tags({"synergen.registry.version": version, "synergen.registry.decision": decision,
                  "synergen.registry.reason": out["why"][:5000],
                  "synergen.registry.champion_before": out["champion_before"] or ""})
        run.metrics({f"gate.{k}": v for k, v in (("new", out["new_value"]), ("champion", out["champion_value"]))
                     if v is not None and math.isfinite(v)})
        run.text(json.dumps(out, indent=1, default=str), "promotion.json")
        run.text(f"version {version}: {decision}\n{out['why']}\n", "promotion.txt")
        log.info("promote %s: version %s -> %s (%s)", ds, version, decision, out["why"])
        return out


def _first_version_gate(cfg: Config, ds: str, protocol: str, mv, out: dict, reasons: list[str]) -> str:
    """The gate of the first version (no champion to compare with): it must beat the popularity baseline
    on ``registry.metric``, as ``synergen evaluate`` measured it on the day's test targets, else an empty
    or untrained model would become champion unopposed. No baseline figure: not promoted.
    -> the note when it passes; appends the reason to ``reasons`` when it does not."""
    metric = cfg.registry.metric
    evaluation = _evaluation(cfg, ds)
    baseline = (evaluation or {}).get(protocol, {}).get("scorers", {}).get("popularity")
    base = flat_metrics(baseline).get(metric) if baseline else None
    out["baseline"], out["baseline_value"] = "popularity", base
    if base is None or not math.isfinite(base):
        path = Path(cfg.lake.root) / cfg.train.output / f"ds={ds}" / "evaluation.json"
        reasons.append(f"first version: no popularity baseline {metric} for {protocol} in {path} to beat "
                       f"(run `synergen evaluate --ds {ds}` with evaluate.baselines including popularity)")
        return ""
    new = _new_metrics(cfg, ds, protocol, mv, lambda: _SameData(cfg, ds, protocol), out).get(metric)
    out["new_value"] = new
    if new is None or not math.isfinite(new):
        reasons.append(f"{metric} is not available for version {mv.version} on ds={ds}")
    elif not new > base:
        reasons.append(f"first version: {metric} {new:.6g} does not beat the popularity baseline's {base:.6g} "
                       f"on the test targets of ds={ds}")
    else:
        return f"no champion yet; {metric} {new:.6g} beats the popularity baseline's {base:.6g} on ds={ds}"
    return ""


def _new_metrics(cfg: Config, ds: str, protocol: str, mv, same, out: dict) -> dict[str, float]:
    """The new version's figures on ``ds``: evaluation.json when it evaluated this very model on this day
    (same code, same candidate lists), else evaluated here (``same()``: the day's ``_SameData``, built
    only then)."""
    evaluation = _evaluation(cfg, ds)
    variant = mv.tags.get("synergen.variant", cfg.registry.variant)
    path = checkpoint.run_dir(cfg.lake.root, cfg.train.output, ds, protocol, variant) / checkpoint.MODEL
    if (evaluation and mv.tags.get("synergen.ds") == ds and path.is_file()
            and _sha256(path) == mv.tags.get("synergen.model_sha256")
            and variant in evaluation.get(protocol, {}).get("scorers", {})):
        out["new_source"] = "evaluation.json"
        return flat_metrics(evaluation[protocol]["scorers"][variant])
    out["new_source"] = "evaluated"
    return same().evaluate(download_model(cfg, f"models:/{mv.name}/{mv.version}")[0])


# ---- download -----------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` -> (name, alias, None); ``models:/<name>/<version>`` -> (name, None, version)."""
    if not ref.startswith("models:/"):
        raise RegistryError(f"bad model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    body = ref[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise RegistryError(f"bad model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def download_model(cfg: Config, ref: str) -> tuple[Path, str, str]:
    """-> (local folder holding ``model.pt``, model name, version). Versions are immutable, so a download
    is kept in ``registry.cache_dir`` (keyed by name, version and logged-model id) and reused."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in task logs
    name, alias, version = parse_ref(ref)
    c = client(cfg)
    if alias is not None:
        mv = _alias_version(c, name, alias)
        if mv is None:
            raise RegistryError(f"{ref}: model {name!r} has no version with alias {alias!r} (`synergen register "
                                f"--ds D` then `synergen promote --ds D` set the champion and challenger aliases)")
    else:
        mv = _get_version(c, name, version, "download")
    key = (getattr(mv, "model_id", None) or mv.run_id or "x")[-12:]
    cache = Path(cfg.registry.cache_dir or Path(cfg.lake.root) / "_registry_cache") / name / f"v{mv.version}-{key}"
    found = list(cache.glob(f"**/{checkpoint.MODEL}")) if cache.is_dir() else []
    if not found:
        tmp = cache.parent / f".{cache.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
        found = list(cache.glob(f"**/{checkpoint.MODEL}"))
        if not found:
            raise RegistryError(f"{ref}: version {mv.version} holds no {checkpoint.MODEL}")
    return found[0].parent, name, str(mv.version)


# ---- status and rollback ------------------------------------------------------------------------


def _describe(mv) -> dict:
    t = mv.tags
    return {"version": str(mv.version), "ds": t.get("synergen.ds"), "protocol": t.get("synergen.protocol"),
            "metrics": _version_metrics(mv), "promoted_at": t.get("synergen.promoted_at"),
            "promoted_by": t.get("synergen.promoted_by"), "semantic_ids_ds": t.get("synergen.semantic_ids_ds"),
            "code_version": t.get("synergen.code_version"), "gate": t.get("synergen.gate.decision"),
            "gate_reason": t.get("synergen.gate.reason"), "gate_value": t.get("synergen.gate.value"),
            "gate_champion_value": t.get("synergen.gate.champion_value")}


def status(cfg: Config) -> dict:
    """{"name", "champion", "challenger" (each None or version, ds, metrics, promoted_at, gate...),
    "versions", "history"}."""
    name = model_name(cfg)
    c = client(cfg)
    if not _registered(c, name):
        return {"name": name, "champion": None, "challenger": None, "versions": 0, "history": []}
    champion, challenger = _alias_version(c, name, CHAMPION), _alias_version(c, name, CHALLENGER)
    return {"name": name, "champion": _describe(champion) if champion else None,
            "challenger": _describe(challenger) if challenger else None,
            "versions": len(_versions(c, name)), "history": _history(c, name)}


def rollback(cfg: Config, version: str | int | None = None) -> dict:
    """Move ``champion`` to ``version``, default the champion before the current one (the current one is
    taken off the history stack). -> {"name", "champion", "previous", "history"}."""
    name = model_name(cfg)
    c = client(cfg)
    current = _alias_version(c, name, CHAMPION) if _registered(c, name) else None
    history = _history(c, name) if current else []
    if version is None:
        stack = list(history)
        while stack and current is not None and stack[-1]["version"] == str(current.version):
            stack.pop()
        if not stack:
            raise RegistryError(f"{name}: no previous champion to roll back to")
        target, how, history = stack[-1]["version"], "rollback", stack[:-1]
    else:
        target, how = str(version).strip(), "rollback to a chosen version"
        _get_version(c, name, target, "roll back to")
    if current is not None and str(current.version) == target:
        return {"name": name, "champion": target, "previous": target, "history": history, "changed": False}
    ds = dt.date.today().isoformat()
    with stage_run(cfg, "rollback", ds) as run:
        _make_champion(c, name, target, how, c.get_model_version(name, target).tags.get("synergen.ds", ""), history)
        if current is not None:
            c.set_model_version_tag(name, str(current.version), "synergen.rolled_back_at", _now())
        run.tags({"synergen.registry.version": target,
                  "synergen.registry.previous": str(current.version) if current else ""})
        run.text(f"champion {current.version if current else None} -> {target} ({how})\n", "rollback.txt")
    log.info("rollback: %s champion %s -> %s", name, current.version if current else None, target)
    return {"name": name, "champion": target, "previous": str(current.version) if current else None,
            "history": _history(c, name), "changed": True}


# ---- the command line (``synergen registry [--rollback [VERSION]]``) ----------------------------


def format_status(st: dict, metrics: tuple[str, ...] = ("all.ndcg@10", "rec.ndcg@10", "rec.recall@10", "search.ndcg@10",
                                                         "search.recall@10", "rec.rank_auc")) -> str:
    lines = [f"registered model {st['name']}: {st['versions']} version(s)"]
    for alias in (CHAMPION, CHALLENGER):
        d = st.get(alias)
        if d is None:
            lines.append(f"  {alias}: none")
            continue
        figures = ", ".join(f"{m} {d['metrics'][m]:.4f}" for m in metrics if m in d["metrics"])
        when = f", promoted {d['promoted_at']}" if alias == CHAMPION and d["promoted_at"] else ""
        lines.append(f"  {alias}: version {d['version']} (ds {d['ds']}, {d['protocol']}, "
                     f"semantic IDs {d['semantic_ids_ds']}{when})")
        if figures:
            lines.append(f"    {figures}")
        if alias == CHALLENGER and d.get("gate_reason"):
            lines.append(f"    not promoted: {d['gate_reason']}")
    if st.get("history"):
        lines.append("  champions: " + " -> ".join(f"v{h['version']}" for h in st["history"]))
    return "\n".join(lines)


def add_cli_arguments(parser) -> None:
    """The arguments of ``synergen registry`` (besides ``--config``)."""
    parser.add_argument("--rollback", nargs="?", const="previous", metavar="VERSION",
                        help="move the champion alias back: to VERSION, or to the previous champion")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def cli(cfg: Config, rollback_to: str | None = None, as_json: bool = False) -> str:
    """What ``synergen registry`` prints: the status, after a rollback when ``rollback_to`` is given
    ("previous" = the champion before the current one)."""
    lines = []
    if rollback_to is not None:
        done = rollback(cfg, None if rollback_to in ("", "previous") else rollback_to)
        lines.append(f"champion: version {done['previous']} -> {done['champion']}")
    st = status(cfg)
    lines.append(json.dumps(st, indent=2, default=str) if as_json else format_status(st))
    return "\n".join(lines)
