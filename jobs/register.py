"""Stage: register the model trained for day ``ds`` as a new version of ``mlflow.registered_model``.

The ``registry.variant`` model of ``registry.protocol`` (``<lake>/<train.output>/ds=D/<protocol>/<variant>/
model.pt``; the other protocol's when that one was not trained) is logged as an ``mlflow.pyfunc`` model
(``synergen_core.serving``: signature and input example from the day's test requests; the file logged is
``checkpoint.serving_record(..., keep_weights=True)``: weights and content tables, no text buffers) and registered
with version tags: ``synergen.ds``, the semantic-ID table it was trained with (``synergen.semantic_ids_ds``:
the day of the ``semantic_ids`` partition, or "none" for in-process IDs), the code version, the model
file's SHA-256 and its evaluation figures (``synergen.metric.<task>.<name>``, from ``evaluation.json``).
Registering the same model file again returns the existing version (reruns and retries are idempotent).
"""
from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from pathlib import Path

from jobs.evaluate import flat_metrics, read_result
from jobs.train import FULL_RETRAIN_TAG
from synergen_core import checkpoint, registry
from synergen_core.config import Config, parse_ds
from synergen_core.registry import RegistryError
from synergen_core.tracking import GROUP_TAG, code_version

log = logging.getLogger(__name__)


def model_sha256(path: Path) -> str:
    """What tells one model file from another: a retrained model is a new version, the same file is not."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trained_protocol(cfg: Config, ds: str) -> str:
    """``registry.protocol`` when its model exists for ``ds``, else the other protocol's."""
    wanted = cfg.registry.protocol
    for protocol in [wanted] + [p for p in ("temporal", "loo") if p != wanted]:
        if (cfg.layout.model_dir(ds, protocol, cfg.registry.variant)
                / checkpoint.MODEL).is_file():
            return protocol
    raise RegistryError(f"no {cfg.registry.variant} model trained for ds={ds} under "
                        f"{cfg.layout.model_dir(ds)} (run `synergen train --ds {ds}`)")


def semantic_ids_version(cfg: Config, ds: str, protocol: str) -> tuple[str, str]:
    """(day of the ``semantic_ids`` table the model was trained with or "none", source note), from the
    notes ``synergen_core.features`` left in ``features.pt``."""
    path = cfg.layout.model_dir(ds, protocol, "") / "features.pt"
    if not path.is_file():
        return "none", "unknown (no features.pt)"
    notes = (checkpoint.load(path).get("notes") or {}).get("semantic_ids")
    if not notes:
        return "none", "not used"
    return str(notes.get("table_ds") or "none"), str(notes.get("source") or "in-process")


def full_retrain_ds(model_dir: Path, ds: str) -> str:
    """The last day the model's lineage trained in full (``start`` of its ``train.json``; ``ds`` when it
    trained in full or has no record): what the next day's warm start counts ``train.full_retrain_days`` from."""
    import json

    summary = model_dir / checkpoint.SUMMARY
    start = json.loads(summary.read_text()).get("start") if summary.is_file() else None
    return (start or {}).get("full_retrain_ds") or ds


def model_file(cfg: Config, ds: str, protocol: str) -> Path:
    """The ``registry.variant`` model of ``protocol`` trained for ``ds``."""
    return cfg.layout.model_dir(ds, protocol, cfg.registry.variant) / checkpoint.MODEL


def register(cfg: Config, ds: str, group: str | None = None, *, run_id: str) -> dict:
    """Log the day's model as a pyfunc and register it as a new version (see the module doc). The model
    and its figures are logged into the active MLflow run ``run_id``, the register stage's run
    (``jobs.stages`` opens it and tags it with the outcome); ``group``: the pipeline run, a version tag.

    -> {"name", "version", "ds", "protocol", "semantic_ids_ds", "metrics", "reused"}."""
    import mlflow

    from synergen_core.serving import ARTIFACT, SynerGenPyfunc, input_example, pyfunc_requirements, pyfunc_signature

    ds = parse_ds(ds).isoformat()
    name = registry.model_name(cfg)
    protocol = trained_protocol(cfg, ds)
    variant = cfg.registry.variant
    path = model_file(cfg, ds, protocol)
    sha = model_sha256(path)
    sid_ds, sid_source = semantic_ids_version(cfg, ds, protocol)
    evaluation = read_result(cfg, ds)
    metrics = {}
    if evaluation and variant in evaluation.get(protocol, {}).get("scorers", {}):
        metrics = flat_metrics(evaluation[protocol]["scorers"][variant])

    def result(version: str, metrics: dict[str, float], reused: bool) -> dict:
        return {"name": name, "version": version, "ds": ds, "protocol": protocol, "semantic_ids_ds": sid_ds,
                "metrics": metrics, "reused": reused}

    c = registry.client(cfg)
    same = [v for v in (registry.versions(c, name) if registry.is_registered(c, name) else [])
            if v.tags.get("synergen.model_sha256") == sha]
    if same:
        mv = same[-1]
        log.info("register %s: model already registered as %s version %s", ds, name, mv.version)
        return result(str(mv.version), registry.version_metrics(mv), True)
    with tempfile.TemporaryDirectory() as tmp:
        # the registered file: the trained weights with content tables instead of the text buffers
        # (checkpoint.serving_record): a sixth of their size at 384-d text, and enough to serve and to
        # start the next day's warm start (which reads the day's own text vectors)
        lean = Path(tmp) / checkpoint.MODEL
        checkpoint.save(checkpoint.serving_record(checkpoint.load(path), keep_weights=True), lean)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SynerGenPyfunc(), artifacts={ARTIFACT: str(lean)},
            signature=pyfunc_signature(), input_example=input_example(cfg, ds, protocol),
            pip_requirements=pyfunc_requirements(),
        )
    tags = {"synergen.ds": ds, "synergen.protocol": protocol, "synergen.variant": variant,
            FULL_RETRAIN_TAG: full_retrain_ds(path.parent, ds),
            "synergen.semantic_ids_ds": sid_ds, "synergen.semantic_ids_source": sid_source,
            "synergen.code_version": code_version(), "synergen.model_sha256": sha,
            "synergen.model_path": str(path), "synergen.run_id": run_id,
            "synergen.registered_at": registry.now(), **({GROUP_TAG: group} if group else {}),
            **{registry.metric_tag(k): repr(v) for k, v in metrics.items() if math.isfinite(v)}}
    # the version is created with its tags in one call (a tag at a time costs a commit each)
    version = str(mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()}).version)
    # on the run and on the logged model (its page in the MLflow UI shows them)
    mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if math.isfinite(v)},
                       model_id=info.model_id)
    log.info("register %s: %s version %s (%s/%s)", ds, name, version, protocol, variant)
    return result(version, metrics, False)
