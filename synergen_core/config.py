"""One typed configuration, loaded once (YAML file + environment overrides) and passed down.

Environment overrides use ``SYNERGEN__<SECTION>__<KEY>=value`` (values parsed as YAML scalars), e.g.
``SYNERGEN__SPARK__MASTER=spark://10.0.0.5:7077``. Unknown keys and bad values are errors that name
the key and where it came from.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "SYNERGEN__"


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LakeConfig(_Section):
    root: Path = Path("var/lake")  # a local folder, or a shared filesystem mounted on every worker


class SparkConfig(_Section):
    master: str = "local[*]"
    app_name: str = "synergen"
    shuffle_partitions: int = Field(8, ge=1)
    driver_memory: str = "4g"
    local_ip: str | None = "127.0.0.1"  # SPARK_LOCAL_IP for local runs; null on a cluster
    conf: dict[str, str] = {}  # any other spark.* setting, passed through


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///var/mlflow.db"
    artifact_root: Path = Path("var/mlartifacts")
    experiment: str = "synergen"
    registered_model: str = "synergen"


class GenerateConfig(_Section):
    """The synthetic log generator: the embedded default input and the scale benchmarks' input."""

    seed: int = 7
    start_ds: str = "2026-01-01"
    days: int = Field(3, ge=1)
    events: int = Field(60_000, ge=1_000)  # search + browse, valid + malformed, over all days
    users: int = Field(2_000, ge=10)
    items: int = Field(3_000, ge=50)
    categories: int = Field(40, ge=2)
    search_share: float = Field(0.25, ge=0.0, le=1.0)
    impressions: int = Field(8, ge=0)  # items shown per event (0: impressions not logged)
    new_item_share_per_day: float = Field(0.01, ge=0.0, le=0.5)
    malformed_share: float = Field(0.01, ge=0.0, le=0.5)
    interest_drift_per_day: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("start_ds")
    @classmethod
    def _iso_day(cls, v: str) -> str:
        parse_ds(v)
        return v


class ValidateConfig(_Section):
    max_bad_row_share: float = Field(0.05, ge=0.0, le=1.0)  # above it the stage fails
    # Events may arrive up to this many days late (ts before the partition's day); older ones and any
    # ts after the partition's day are quarantined as ts_outside_day.
    late_days: int = Field(2, ge=0)
    max_value: float = 1e9  # browse "value" must be finite and within [0, max_value]


class SessionizeConfig(_Section):
    gap_minutes: float = Field(30.0, gt=0)
    max_seq_len: int = Field(200, ge=2)


class ModelConfig(_Section):
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    max_seq_len: int = Field(50, ge=2)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    seed: int = 42
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Config(_Section):
    lake: LakeConfig = LakeConfig()
    spark: SparkConfig = SparkConfig()
    mlflow: MlflowConfig = MlflowConfig()
    generate: GenerateConfig = GenerateConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    sessionize: SessionizeConfig = SessionizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_ds(ds: str) -> dt.date:
    """``YYYY-MM-DD`` -> date, with an error that says what was expected."""
    try:
        if len(ds) == 10:
            return dt.date.fromisoformat(ds)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"bad ds {ds!r}: expected a day as YYYY-MM-DD")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < YAML file < ``SYNERGEN__*`` environment variables."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data, source = loaded, str(path)
    env = _env_overrides(environ)
    if env:
        source += " + SYNERGEN__* environment"
    try:
        return Config.model_validate(_merge(data, env))
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc'])}: "
            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            + ("" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})")
            for err in e.errors()
        ]
        raise ConfigError(f"invalid configuration from {source}:\n" + "\n".join(lines)) from None
