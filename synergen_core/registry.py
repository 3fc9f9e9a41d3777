"""The MLflow model registry, as the pipeline uses it: versions, aliases, the champion's history.

Plain functions over ``mlflow.MlflowClient`` (the registry lives in the tracking store, e.g. SQLite). The
stages that write versions and move aliases are ``jobs.register`` and ``jobs.promote``; what is here
reads and keeps the registry's own state:

* versions of ``mlflow.registered_model`` and their ``synergen.*`` tags (``synergen.metric.<task>.<name>``:
  the evaluation figures a version was registered with), the ``champion`` and ``challenger`` aliases;
* ``download_model(cfg, ref)``: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> a local
  folder holding ``model.pt`` (what scoring reads);
* ``status(cfg)``, ``rollback(cfg, version=None)``: the champion's history is a stack kept in the registered
  model's tag ``synergen.champion_history``; a rollback without a version pops the current champion and
  restores the one before it, so successive rollbacks walk back in time. ``synergen registry``
  (``jobs.cli``) prints them.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

from synergen_core import checkpoint
from synergen_core.config import Config
from synergen_core.errors import PipelineError
# SynerGenPyfunc stays importable from here: versions registered before it moved pickled this module path
from synergen_core.serving import SynerGenPyfunc  # noqa: F401
from synergen_core.tracking import _mlflow, stage_run

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "synergen.champion_history"  # registered-model tag: JSON stack of champions, latest last
HISTORY_MAX = 100
METRIC_TAG = "synergen.metric."  # version tag prefix: synergen.metric.<task>.<name> (@ -> _at_)


class RegistryError(PipelineError):
    """A registry failure the person running the pipeline can act on (bad version, nothing registered)."""


# ---- versions and aliases -----------------------------------------------------------------------


def model_name(cfg: Config) -> str:
    return cfg.mlflow.registered_model


def client(cfg: Config):
    return _mlflow(cfg).MlflowClient()


def now() -> str:
    """The time stamp of registry tags (promoted_at, rolled_back_at, ...): UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def metric_tag(metric: str) -> str:
    return METRIC_TAG + metric.replace("@", "_at_")


def version_metrics(mv) -> dict[str, float]:
    out = {}
    for k, v in mv.tags.items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):].replace("_at_", "@")] = float(v)
            except ValueError:
                pass
    return out


def versions(c, name: str) -> list:
    return sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def get_version(c, name: str, version: str, doing: str):
    """Model version ``version`` of ``name``, or a ``RegistryError`` naming it and the versions there are
    (MLflow's own error for a missing or non-numeric version is a stack trace from its REST layer)."""
    known = [str(v.version) for v in versions(c, name)] if is_registered(c, name) else []
    if str(version) not in known:
        shown = known if len(known) <= 15 else known[:3] + ["..."] + known[-10:]  # one line, even after years
        there = f"registered versions: {', '.join(shown)}" if known else f"no version of {name} is registered yet"
        raise RegistryError(f"cannot {doing} {name} version {version!r}: no such version ({there})")
    return c.get_model_version(name, str(version))


def alias_version(c, name: str, alias: str):
    try:
        return c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST: no such alias
        return None


def is_registered(c, name: str) -> bool:
    try:
        c.get_registered_model(name)
        return True
    except Exception:  # noqa: BLE001 - not registered yet
        return False


def latest_version_of_day(c, name: str, ds: str) -> str:
    found = [v for v in versions(c, name) if v.tags.get("synergen.ds") == ds]
    if not found:
        raise RegistryError(f"no version of {name} registered for ds={ds} (run the register stage first)")
    return str(found[-1].version)


# ---- champion and challenger --------------------------------------------------------------------


def champion_history(c, name: str) -> list[dict]:
    raw = c.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _set_history(c, name: str, history: list[dict]) -> None:
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:], separators=(",", ":")))


def make_champion(c, name: str, version: str, how: str, ds: str, history: list[dict]) -> None:
    at = now()
    c.set_registered_model_alias(name, CHAMPION, version)
    challenger = alias_version(c, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    c.set_model_version_tag(name, version, "synergen.promoted_at", at)
    c.set_model_version_tag(name, version, "synergen.promoted_by", how)
    _set_history(c, name, history + [{"version": version, "at": at, "by": how, "ds": ds}])


def make_challenger(c, name: str, version: str) -> None:
    c.set_registered_model_alias(name, CHALLENGER, version)


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
        mv = alias_version(c, name, alias)
        if mv is None:
            raise RegistryError(f"{ref}: model {name!r} has no version with alias {alias!r} (`synergen register "
                                f"--ds D` then `synergen promote --ds D` set the champion and challenger aliases)")
    else:
        mv = get_version(c, name, version, "download")
    key = (getattr(mv, "model_id", None) or mv.run_id or "x")[-12:]
    cache = Path(cfg.registry.cache_dir or cfg.layout.registry_cache) / name / f"v{mv.version}-{key}"
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
            "metrics": version_metrics(mv), "promoted_at": t.get("synergen.promoted_at"),
            "promoted_by": t.get("synergen.promoted_by"), "semantic_ids_ds": t.get("synergen.semantic_ids_ds"),
            "code_version": t.get("synergen.code_version"), "gate": t.get("synergen.gate.decision"),
            "gate_reason": t.get("synergen.gate.reason"), "gate_value": t.get("synergen.gate.value"),
            "gate_champion_value": t.get("synergen.gate.champion_value")}


def status(cfg: Config) -> dict:
    """{"name", "champion", "challenger" (each None or version, ds, metrics, promoted_at, gate...),
    "versions", "history"}."""
    name = model_name(cfg)
    c = client(cfg)
    if not is_registered(c, name):
        return {"name": name, "champion": None, "challenger": None, "versions": 0, "history": []}
    champion, challenger = alias_version(c, name, CHAMPION), alias_version(c, name, CHALLENGER)
    return {"name": name, "champion": _describe(champion) if champion else None,
            "challenger": _describe(challenger) if challenger else None,
            "versions": len(versions(c, name)), "history": champion_history(c, name)}


def rollback(cfg: Config, version: str | int | None = None) -> dict:
    """Move ``champion`` to ``version``, default the champion before the current one (the current one is
    taken off the history stack). -> {"name", "champion", "previous", "history"}."""
    name = model_name(cfg)
    c = client(cfg)
    current = alias_version(c, name, CHAMPION) if is_registered(c, name) else None
    history = champion_history(c, name) if current else []
    if version is None:
        stack = list(history)
        while stack and current is not None and stack[-1]["version"] == str(current.version):
            stack.pop()
        if not stack:
            raise RegistryError(f"{name}: no previous champion to roll back to")
        target, how, history = stack[-1]["version"], "rollback", stack[:-1]
    else:
        target, how = str(version).strip(), "rollback to a chosen version"
        get_version(c, name, target, "roll back to")
    if current is not None and str(current.version) == target:
        return {"name": name, "champion": target, "previous": target, "history": history, "changed": False}
    ds = dt.date.today().isoformat()
    with stage_run(cfg, "rollback", ds) as run:
        make_champion(c, name, target, how, c.get_model_version(name, target).tags.get("synergen.ds", ""), history)
        if current is not None:
            c.set_model_version_tag(name, str(current.version), "synergen.rolled_back_at", now())
        run.tags({"synergen.registry.version": target,
                  "synergen.registry.previous": str(current.version) if current else ""})
        run.text(f"champion {current.version if current else None} -> {target} ({how})\n", "rollback.txt")
    log.info("rollback: %s champion %s -> %s", name, current.version if current else None, target)
    return {"name": name, "champion": target, "previous": str(current.version) if current else None,
            "history": champion_history(c, name), "changed": True}
