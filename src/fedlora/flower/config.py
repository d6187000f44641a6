"""Flower's run config ⇄ :class:`~fedlora.app.config.RunConfig`: the keys are ``fedlora run``'s long flags.

Flower's run config holds only str, int, float and bool, so a setting that can be "not given" has a stand-in here,
declared beside the setting itself (``setting(..., flower=...)`` in :mod:`fedlora.app.config`):
``examples-per-client = 0`` (no cap), ``keep-head-local = "auto"`` (the method's default), ``dp-target-epsilon = 0``
(no target: ``dp-noise`` as given), ``model = ""``, ``target-modules = ""`` and ``max-length = 0`` (the task's
defaults, resolved after the run config is merged, as for the CLI) and ``out = ""`` (``runs/METHOD-TIMESTAMP`` in the
ServerApp's working directory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from fedlora.app.config import RunConfig, base_type, optional

# Keys of the Flower run config that are not `fedlora run` flags: how the ServerApp runs, not what it computes.
FLOWER_ONLY: dict[str, bool | float] = {
    "resume": False,  # continue the run in `out` from its checkpoint (written after every round)
    "round-timeout": 1800.0,  # seconds the server waits for a round's replies; a SuperNode silent longer is left out
}


def flower_options(user_config: Mapping[str, object]) -> dict[str, bool | float]:
    """The Flower-only keys of a run config, at their defaults where absent; a wrong type raises one line."""
    out = dict(FLOWER_ONLY)
    for key, default in FLOWER_ONLY.items():
        if key not in user_config:
            continue
        raw = user_config[key]
        if isinstance(default, bool):
            if not isinstance(raw, bool):
                raise ValueError(f"run config {key}={raw!r} has the wrong type; pass true or false, e.g. --run-config \"{key}=true\"")
            out[key] = raw
        else:
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
                raise ValueError(f"run config {key}={raw!r} must be a positive number of seconds, e.g. --run-config \"{key}=600\"")
            out[key] = float(raw)
    return out


def _standin(f) -> object:
    return f.metadata["flower"]


def to_flower(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The run config Flower holds for ``config`` (``[tool.flwr.app.config]`` is ``to_flower(RunConfig())``). Settings
    not given keep their stand-in, so a task set in the run config still gets its own defaults."""
    given = config.given()
    out = {}
    for f in RunConfig.fields():
        value = given[f.name]
        out[f.name.replace("_", "-")] = _standin(f) if value is None else value
    return out | FLOWER_ONLY


def from_flower(user_config: Mapping[str, object]) -> RunConfig:
    """The :class:`RunConfig` of a Flower run config; a key or value ``fedlora run`` would reject raises ValueError."""
    fields = {f.name: f for f in RunConfig.fields()}
    values = {}
    for key, raw in user_config.items():
        if key in FLOWER_ONLY:  # the ServerApp's own (flower_options)
            continue
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted([f.replace("_", "-") for f in fields] + list(FLOWER_ONLY)))
            raise ValueError(f"run config key {key!r} is not a flag of `fedlora run`; use one of: {known}")
        values[name] = _coerce(key, fields[name], raw)
    return RunConfig(**values)


def _coerce(key: str, f, raw: object) -> object:
    base = base_type(f.name)
    if optional(f.name):
        standin = _standin(f)
        if name_is_auto(f.name, raw, standin):
            return None
        if base is bool and isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
    if base is bool and isinstance(raw, bool):
        return raw
    if base is int and isinstance(raw, int | float) and not isinstance(raw, bool) and float(raw).is_integer():
        return int(raw)
    if base is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if base is str and isinstance(raw, str):
        return raw
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a quoted string"}[base]
    extra = f" (or {json.dumps(_standin(f))} for the default)" if optional(f.name) else ""
    raise ValueError(f"run config {key}={raw!r} has the wrong type; pass {expected}{extra}, e.g. --run-config \"{key}=...\"")


def name_is_auto(name: str, raw: object, standin: object) -> bool:
    """Whether ``raw`` is the stand-in for "not given": the stand-in itself, "" or "auto" for a string one, any
    number ≤ 0 for a numeric one."""
    if isinstance(standin, str):
        return isinstance(raw, str) and raw.strip().lower() in ("", "auto", standin)
    if isinstance(standin, int | float) and not isinstance(standin, bool):
        return isinstance(raw, int | float) and not isinstance(raw, bool) and raw <= 0
    return raw == standin


def to_toml(config: RunConfig, *, changed_only: bool = True) -> str:
    """``config`` as a TOML file for ``flwr run --run-config FILE`` (by default only what differs from the defaults)."""
    defaults = to_flower(RunConfig())
    lines = []
    for key, value in to_flower(config).items():
        if changed_only and value == defaults[key] and type(value) is type(defaults[key]):
            continue
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML scalars (true/false, numbers, "str")
    return "\n".join(lines) + "\n"
