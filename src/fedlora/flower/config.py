"""Flower's run config ⇄ :class:`~fedlora.app.experiment.RunConfig`: the keys are ``fedlora run``'s long flags.

Flower's run config holds only str, int, float and bool, so the four settings that can be "not given" on the
CLI have a stated stand-in here: ``examples-per-client = 0`` (no cap), ``keep-head-local = "auto"`` (the method's
default), ``dp-target-epsilon = 0`` (no target: ``dp-noise`` as given) and ``out = ""`` (``runs/METHOD-TIMESTAMP`` in
the ServerApp's working directory).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping

from fedlora.app.experiment import RunConfig

_NONE_STANDINS = {"examples_per_client": 0, "keep_head_local": "auto", "dp_target_epsilon": 0.0, "out": ""}

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


def to_flower(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The run config Flower holds for ``config`` (``[tool.flwr.app.config]`` is ``to_flower(RunConfig())``)."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        out[f.name.replace("_", "-")] = _NONE_STANDINS[f.name] if value is None else value
    return out | FLOWER_ONLY


def from_flower(user_config: Mapping[str, object]) -> RunConfig:
    """The :class:`RunConfig` of a Flower run config; a key or value ``fedlora run`` would reject raises ValueError."""
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {}
    for key, raw in user_config.items():
        if key in FLOWER_ONLY:  # the ServerApp's own (flower_options)
            continue
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted([f.replace("_", "-") for f in fields] + list(FLOWER_ONLY)))
            raise ValueError(f"run config key {key!r} is not a flag of `fedlora run`; use one of: {known}")
        values[name] = _coerce(key, name, raw, hints[name])
    return RunConfig(**values)


def _coerce(key: str, name: str, raw: object, hint: object) -> object:
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if optional else hint
    if optional:
        if name == "keep_head_local" and isinstance(raw, str):
            lowered = raw.strip().lower()
            if lowered in ("auto", ""):
                return None
            if lowered in ("true", "false"):
                return lowered == "true"
        if name == "examples_per_client" and isinstance(raw, int) and not isinstance(raw, bool) and raw <= 0:
            return None
        if name == "out" and raw == "":
            return None
        if name == "dp_target_epsilon" and isinstance(raw, int | float) and not isinstance(raw, bool) and raw <= 0:
            return None
    if base is bool and isinstance(raw, bool):
        return raw
    if base is int and isinstance(raw, int | float) and not isinstance(raw, bool) and float(raw).is_integer():
        return int(raw)
    if base is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if base is str and isinstance(raw, str):
        return raw
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a quoted string"}[base]
    extra = {"keep_head_local": ' or "auto"', "examples_per_client": " (0 for no cap)"}.get(name, "")
    raise ValueError(f"run config {key}={raw!r} has the wrong type; pass {expected}{extra}, e.g. --run-config \"{key}=...\"")


def to_toml(config: RunConfig, *, changed_only: bool = True) -> str:
    """``config`` as a TOML file for ``flwr run --run-config FILE`` (by default only what differs from the defaults)."""
    defaults = to_flower(RunConfig())
    lines = []
    for key, value in to_flower(config).items():
        if changed_only and value == defaults[key] and type(value) is type(defaults[key]):
            continue
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML scalars (true/false, numbers, "str")
    return "\n".join(lines) + "\n"
