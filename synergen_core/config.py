"""One typed configuration, loaded once (YAML file + environment overrides) and passed down.

Environment overrides use ``SYNERGEN__<SECTION>__<KEY>=value`` (values parsed as YAML scalars), e.g.
``SYNERGEN__SPARK__MASTER=spark://10.0.0.5:7077``. Unknown keys and bad values are errors that name
the key and where it came from.

The sections, their keys and checks are ``synergen_core.config_schema``; ``Config``, ``ConfigError``,
``parse_ds`` and the section classes are imported from here.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from synergen_core.config_schema import (  # noqa: F401  (re-exported: the configuration's one import path)
    Config, ConfigError, EmbeddingsConfig, EvaluateConfig, GenerateConfig, LakeConfig, MlflowConfig,
    ModelConfig, RegistryConfig, ScoreConfig, SemanticIdConfig, SessionizeConfig, SparkConfig,
    TextEncoderConfig, TrainConfig, ValidateConfig, VariantName, parse_ds,
)

ENV_PREFIX = "SYNERGEN__"


# An assignment from outside the file: (key path, raw text, what to call it in an error): the variable
# SYNERGEN__MODEL__DROPOUT, or the override model.dropout=0.4. A bad value is reported by that name.
Assignment = tuple[list[str], str, str]


def _tree(assignments: list[Assignment]) -> dict[str, Any]:
    """Assignments -> nested sections, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for path, raw, origin in assignments:
        if not all(path):
            raise ConfigError(f"{origin}: empty key in {'.'.join(path)!r}: expected SECTION and KEY "
                              f"(e.g. SYNERGEN__SPARK__MASTER or spark.master)")
        node = tree
        for depth, part in enumerate(path[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {'.'.join(path[:depth])} is also given a plain value elsewhere; "
                                  f"set only its keys (e.g. {'.'.join(path)})")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"{origin}: {'.'.join(path)} is a section whose keys are also set; set only its keys")
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin}: value {raw!r} is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote a string in YAML, e.g. '\"{raw}\"'") from None
    return tree


def _env_assignments(environ: Mapping[str, str]) -> list[Assignment]:
    return [([p.lower() for p in key[len(ENV_PREFIX):].split("__")], raw, key)
            for key, raw in sorted(environ.items()) if key.startswith(ENV_PREFIX)]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(cfg: Config, assignments: list[str]) -> Config:
    """``cfg`` with ``section.key=value`` assignments applied (values parsed as YAML scalars): the
    benchmarks' ``--set``, so that a tuned run's settings stay in its recorded command line."""
    parsed: list[Assignment] = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad override {assignment!r}: expected section.key=value")
        parsed.append((key.strip().split("."), raw, f"override {assignment}"))
    return _validated(_merge(cfg.model_dump(by_alias=True), _tree(parsed)), "overrides", parsed)


def _known_keys(section: tuple[str, ...]) -> list[str] | None:
    """The keys a config section accepts (its aliases where it has them), None when it is no section."""
    model: type[BaseModel] = Config
    for part in section:
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def _problem(err: dict[str, Any], source: str, assignments: list[Assignment]) -> str:
    """One pydantic error as ``<where it came from>: <key>: <what is wrong>``."""
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    # The variable or override that set this key (or a section above or below it); else the file.
    origin = next((o for path, _, o in reversed(assignments)
                   if tuple(path[:len(loc)]) == loc or loc[:len(path)] == tuple(path)), source)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1]) or []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
        return f"{origin}: {key}: unknown key ({hint})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{origin}: {key}: {msg} (got {err.get('input')!r})"


def _validated(data: dict[str, Any], source: str, assignments: list[Assignment] = ()) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        # One line, every problem named by key and origin: the CLI prints it as it is.
        raise ConfigError("invalid configuration: "
                          + "; ".join(_problem(err, source, list(assignments)) for err in e.errors())) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {e.problem or e.context}; fix the syntax there") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror})") from None
    if loaded is None:  # an empty file: the defaults
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level (e.g. 'spark:' then "
                          f"'  master: local[*]'), not a {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < YAML file < ``SYNERGEN__*`` environment variables."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data, source = _read_yaml(Path(path)), str(path)
    env = _env_assignments(environ)
    return _validated(_merge(data, _tree(env)), source, env)
