"""infra/compose.yaml as ``docker compose`` would run it, without a container engine: parsed with yaml and
interpolated the way compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``), and a
service's environment and command read the way compose reads them. Used by tests/test_infra.py and
tests/test_production_setup.py."""
import re
import shlex
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
COMPOSE = INFRA / "compose.yaml"
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class Missing(KeyError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (no nesting: the file does not use it)."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return arg if empty else value
        if op in ("?", ":?"):
            if empty:
                raise Missing(f"{name}: {arg}")
            return value
        return value or ""

    return VAR.sub(one, text)


def resolve(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved by the yaml loader


def strings(node):
    """Every string of the parsed file (what compose interpolates; comments are not)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)


def references() -> list[re.Match]:
    return [m for text in strings(raw()) for m in VAR.finditer(text)]


def required_vars() -> set[str]:
    return {m.group(1) for m in references() if m.group(2) in (":?", "?")}


def fake_secrets() -> dict[str, str]:
    return {name: f"fake-{name.lower()}" for name in required_vars()}


def compose(env: dict[str, str] | None = None) -> dict:
    """The file as compose would run it with ``env`` (default: the fake secrets, nothing else set)."""
    return resolve(raw(), fake_secrets() if env is None else env)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
