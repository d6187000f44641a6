"""The systems settings read (front end of :mod:`fedlora.federation.systems`): ``--devices``, ``--availability``,
``--deadline`` and ``--over-select`` turned into the :class:`~fedlora.federation.systems.Systems` the round consults.

Every file is read and checked when the settings are validated, before any data or model is loaded: an unknown
profile, a trace naming a client the run does not have, a bad number each refused in one line.

``--devices default|FILE.toml``: ``[profiles.NAME]`` tables (``tflops`` achieved training TFLOP/s, or
``examples-per-second``; ``download-mbps``, ``upload-mbps``, ``latency-ms``), then either ``[mix]`` (weights per
profile; each client draws one, seeded by the run's seed) or ``assign = [names]`` (client u gets the (u mod n)-th);
``spread`` (each client's speed × exp(spread·N(0,1)), seeded); ``[server] seconds`` (a number, or "measured"). A
file's profiles are added to the default ones (the same name replaces it); its ``mix``/``assign`` replaces the
default mix.

``--availability dropout:P | diurnal | FILE``: a file is TOML (``period = SECONDS`` optional; ``[clients]`` with
``"CID" = [[start, end], …]``) or CSV (header ``client,start,end``, one window per row); seconds of simulated time;
clients the file does not name are always online.
"""

from __future__ import annotations

import csv
import functools
import math
import random
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedlora.federation.clock import DeviceProfile
from fedlora.federation.systems import Available, Dropout, Instant, Systems, SystemsConfig, Windows, diurnal

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceSet:
    profiles: dict[str, DeviceProfile]
    mix: dict[str, float] | None
    assign: tuple[str, ...] | None
    spread: float
    server_seconds: float | None


def _read_toml(path: str, flag: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path!r} does not exist; pass an existing file (or {flag} default)" if flag == "--devices" else
                         f"{flag} {path!r} does not exist; pass an existing TOML or CSV file, diurnal, or dropout:P") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path!r} is not valid TOML ({exc}); fix the file") from None


def _number(table: dict, key: str, where: str, default: float | None = None) -> float | None:
    value = table.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}: {key} = {value!r} is not a number")
    return None if value is None else float(value)


def _profile(name: str, table: dict, where: str) -> DeviceProfile:
    where = f"{where} [profiles.{name}]"
    known = {"tflops", "examples-per-second", "download-mbps", "upload-mbps", "latency-ms", "source"}
    extra = sorted(set(table) - known)
    if extra:
        raise ValueError(f"{where} has unknown key(s) {', '.join(extra)}; use {', '.join(sorted(known))}")
    missing = [k for k in ("download-mbps", "upload-mbps", "latency-ms") if k not in table]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; give bandwidths in Mbit/s and latency in ms")
    tflops = _number(table, "tflops", where)
    return DeviceProfile(name, None if tflops is None else tflops * 1e12, upload=_number(table, "upload-mbps", where) * MBIT,
                         download=_number(table, "download-mbps", where) * MBIT, latency=_number(table, "latency-ms", where) / 1e3,
                         examples_per_second=_number(table, "examples-per-second", where))


def _check_names(names, profiles: dict, where: str) -> None:
    for name in names:
        if name not in profiles:
            raise ValueError(f"{where} names unknown device profile {name!r}; choose from {', '.join(profiles)} or add [profiles.{name}]")


def _device_set(raw: dict, where: str, base: DeviceSet | None) -> DeviceSet:
    profiles = dict(base.profiles) if base else {}
    tables = raw.get("profiles", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: profiles must be tables, [profiles.NAME]")
    profiles |= {name: _profile(name, t, where) for name, t in tables.items()}
    mix, assign = raw.get("mix"), raw.get("assign")
    if mix is not None and assign is not None:
        raise ValueError(f"{where} gives both [mix] and assign; keep one")
    if assign is not None:
        if not isinstance(assign, list) or not assign or not all(isinstance(a, str) for a in assign):
            raise ValueError(f"{where}: assign must be a list of profile names, e.g. assign = [\"phone-high\", \"laptop-cpu\"]")
        _check_names(assign, profiles, f"{where} assign")
        assign = tuple(assign)
    elif mix is not None:
        _check_names(mix, profiles, f"{where} [mix]")
        mix = {k: _number(mix, k, f"{where} [mix]") for k in mix}
        if any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
            raise ValueError(f"{where} [mix]: weights must be ≥ 0 with a positive sum")
    elif base is not None:
        mix, assign = base.mix, base.assign
    else:
        raise ValueError(f"{where} gives neither [mix] nor assign; say which clients get which profile")
    spread = _number(raw, "spread", where, base.spread if base else 0.0)
    if spread < 0:
        raise ValueError(f"{where}: spread = {spread} must be ≥ 0")
    server = raw.get("server", {}).get("seconds", base.server_seconds if base else 0.0)
    if server != "measured" and (isinstance(server, bool) or not isinstance(server, (int, float)) or server < 0):
        raise ValueError(f"{where}: [server] seconds = {server!r} must be a number ≥ 0 or \"measured\"")
    return DeviceSet(profiles, mix, assign, spread, None if server == "measured" else float(server))


@functools.cache
def default_devices() -> DeviceSet:
    """The packaged profiles (src/fedlora/app/devices.toml)."""
    return _device_set(tomllib.loads(resources.files("fedlora.app").joinpath("devices.toml").read_text()), "default devices", None)


def device_set(spec: str) -> DeviceSet:
    """``--devices``: the packaged default profiles, or a TOML file's added to them."""
    if spec == "default":
        return default_devices()
    return _device_set(_read_toml(spec, "--devices"), f"--devices {spec!r}", default_devices())


def client_profiles(devices: DeviceSet, clients: int, seed: int) -> list[DeviceProfile]:
    """Each client's device: in turn from ``assign``, or drawn from ``mix`` with the run's seed (the same draws for
    every method of a comparison); speeds spread around the profile when ``spread`` > 0."""
    out = []
    names = list(devices.mix or {})
    for cid in range(clients):
        draw = random.Random(f"{seed}/devices/{cid}")
        if devices.assign is not None:
            name = devices.assign[cid % len(devices.assign)]
        else:
            name = draw.choices(names, weights=[devices.mix[n] for n in names])[0]
        profile = devices.profiles[name]
        out.append(profile.scaled(math.exp(devices.spread * draw.gauss(0.0, 1.0))) if devices.spread else profile)
    return out


def availability(spec: str, clients: int, seed: int) -> Available:
    """``--availability``: dropout:P, diurnal, or a TOML/CSV file of online windows."""
    if not spec:
        return Available()
    if spec.startswith("dropout:"):
        try:
            p = float(spec.partition(":")[2])
        except ValueError:
            p = math.nan
        if not 0.0 <= p < 1.0:
            raise ValueError(f"--availability {spec!r}: the dropout probability must lie in [0, 1); pass e.g. dropout:0.2")
        return Dropout(p, seed)
    if spec == "diurnal":
        return diurnal(clients, seed)
    return _windows(spec, clients)


def _windows(path: str, clients: int) -> Windows:
    where = f"--availability {path!r}"
    if not Path(path).is_file():
        raise ValueError(f"{where} is neither dropout:P, diurnal nor an existing file; pass one of them")
    period = None
    if path.endswith(".csv"):
        rows = _csv_rows(path, where)
    else:
        raw = _read_toml(path, "--availability")
        period = _number(raw, "period", where)
        table = raw.get("clients")
        if not isinstance(table, dict):
            raise ValueError(f"{where} has no [clients] table; give \"CID\" = [[start, end], …] per client (seconds)")
        rows = [(k, w) for k, ws in table.items() for w in (ws if isinstance(ws, list) and ws and isinstance(ws[0], list) else [ws])]
    windows: dict[int, list[tuple[float, float]]] = {}
    for key, window in rows:
        try:
            cid, (start, end) = int(key), (float(window[0]), float(window[1]))
        except (ValueError, TypeError, IndexError):
            raise ValueError(f"{where}: client {key!r} window {window!r} is not [start, end] in seconds") from None
        if not 0 <= cid < clients:
            raise ValueError(f"{where} has windows for client {cid}, but the run has clients 0 … {clients - 1}; "
                             "fix the file or raise --clients")
        if not end > start:
            raise ValueError(f"{where}: client {cid}'s window [{start}, {end}] ends before it starts")
        windows.setdefault(cid, []).append((start, end))
    if period is not None and not (period > 0 and all(s >= 0 and e - s <= period for ws in windows.values() for s, e in ws)):
        raise ValueError(f"{where}: period = {period} must be positive and hold every window (0 ≤ start, end − start ≤ period)")
    return Windows(windows, period)


def _csv_rows(path: str, where: str) -> list[tuple[str, tuple[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"client", "start", "end"} <= set(reader.fieldnames):
            raise ValueError(f"{where}: a CSV trace needs the header client,start,end (seconds of simulated time)")
        return [(row["client"], (row["start"], row["end"])) for row in reader]


def check(run) -> None:
    """Every systems setting, in one line each, before anything loads."""
    if run.deadline is not None and not (run.deadline > 0 and math.isfinite(run.deadline)):
        raise ValueError(f"--deadline {run.deadline} must be a positive number of simulated seconds; pass e.g. --deadline 600")
    if not (run.over_select >= 1.0 and math.isfinite(run.over_select)):
        raise ValueError(f"--over-select {run.over_select} is below 1; pass 1 (no over-selection) or more, e.g. --over-select 1.3")
    if run.devices:
        device_set(run.devices)
    if (run.availability == "diurnal" or (run.availability and ":" not in run.availability)) and not run.devices:
        raise ValueError("availability traces (diurnal, a file) need simulated time; add --devices default (or a profiles file)")
    availability(run.availability, run.clients, run.seed)
    if run.over_select > 1 and run.dp == "client":
        raise ValueError("--over-select with --dp client would change the sampling rate the accountant assumes; drop one of the two")
    check_async(run)


def async_methods(mode: str = "fedbuff") -> list[str]:
    """The methods that run under ``--async mode`` (an asynchronous trait declared on the class; trait "fedbuff":
    FedBuff only, in product-delta form)."""
    from fedlora.federation import REGISTRY

    return [n for n, c in REGISTRY.items() if c.asynchronous and (mode == "fedbuff" or c.asynchronous != "fedbuff")]


def check_async(run) -> None:
    """``--async`` and its settings, one line each, before anything loads (the pooled reference ignores them)."""
    from fedlora.federation.asynchronous import MODES, STALENESS, parse_speeds

    if run.async_mode not in ("", *MODES):
        raise ValueError(f"--async {run.async_mode!r} is unknown; choose {' or '.join(MODES)} (or leave it empty for synchronous rounds)")
    if run.staleness not in STALENESS:
        raise ValueError(f"--staleness {run.staleness!r} is unknown; choose one of {', '.join(STALENESS)}")
    for flag, value, ok, fix in (("--buffer", run.buffer, lambda v: v >= 1, "pass 1 or more, e.g. --buffer 5"),
                                 ("--async-concurrency", run.async_concurrency, lambda v: v >= 1, "pass 1 or more, e.g. --async-concurrency 5"),
                                 ("--staleness-a", run.staleness_a, lambda v: v >= 0 and math.isfinite(v), "pass a number ≥ 0, e.g. 0.5"),
                                 ("--staleness-b", run.staleness_b, lambda v: v >= 0 and math.isfinite(v), "pass a number ≥ 0, e.g. 4"),
                                 ("--fedasync-alpha", run.fedasync_alpha, lambda v: 0 < v <= 1, "pass a weight in (0, 1], e.g. 0.6"),
                                 ("--fedasync-rho", run.fedasync_rho, lambda v: v >= 0 and math.isfinite(v), "pass 0 (off) or more")):
        if value is not None and not ok(value):
            raise ValueError(f"{flag} {value} is out of range; {fix}")
    parse_speeds(run.client_speeds, run.clients)
    method = run.method_object()
    if not run.async_mode or method.pooled:
        return
    if not method.asynchronous:
        why = method.async_refusal or "its asynchronous rule (METHODS.md) is not implemented in this version"
        raise ValueError(f"--async {run.async_mode}: {run.method} must run synchronously ({why}); methods that run "
                         f"asynchronously: {', '.join(async_methods(run.async_mode))}")
    if method.asynchronous == "fedbuff" and run.async_mode != "fedbuff":
        raise ValueError(f"--async {run.async_mode}: {run.method} runs asynchronously with --async fedbuff only (it truncates "
                         f"FedBuff's product delta BA + (1/K)Σ h(τ)ΔW_u; one arrival's per-tensor mix has no such form); pass "
                         f"--async fedbuff, or use one of {', '.join(async_methods(run.async_mode))}")
    if method.async_folds and run.adapter not in ("lora", "rslora"):
        raise ValueError(f"--async {run.async_mode} with {run.method} runs on lora or rslora adapters in this version (a stale "
                         f"client trains on its version's base, which {run.adapter} ties to its own factors); pass --adapter lora")
    given = [name for name, on in (("--availability", run.availability), ("--deadline", run.deadline is not None),
                                   ("--over-select", run.over_select > 1), ("--dp", run.dp != "none"), ("--secure-aggregation", run.secure_aggregation),
                                   ("--lr-schedule cosine", run.lr_schedule != "constant")) if on]
    ranks = run.ranks()
    if ranks is not None and len(set(ranks)) > 1:
        given.append("mixed --client-ranks")
    if run.async_mode == "fedasync" and run.server_opt not in ("", "avg"):
        given.append("--server-opt (FedAsync's mixing is its server step; FedBuff takes one)")
    if given:
        raise ValueError(f"--async {run.async_mode} does not run with {', '.join(given)} in this version; drop "
                         f"{'it' if len(given) == 1 else 'them'} or --async")


def check_simulated(run) -> None:
    """What only the simulator refuses: a deadline in simulated seconds needs a clock (on Flower ``--deadline`` is the
    round timeout in real seconds, and needs none)."""
    if run.deadline is not None and not run.devices:
        raise ValueError("--deadline counts simulated seconds in the simulator, which need device profiles; add --devices default "
                         "(or a profiles file)")


def systems_for(run, model, clients: int) -> Instant:
    """The round's systems object: :class:`Instant` (today's federation) unless devices, availability or
    over-selection is given (a deadline alone, without a clock, drops nobody: Flower's round timeout)."""
    if run.async_mode:
        return asynchronous_for(run, model, clients)
    if not (run.devices or run.availability or run.over_select > 1):
        return Instant()
    return Systems(SystemsConfig(
        availability=availability(run.availability, run.clients, run.seed), deadline=run.deadline, over_select=run.over_select,
        **clock_settings(run, model, clients)))


def clock_settings(run, model, clients: int) -> dict:
    """What the simulated clock needs, the same for a synchronous and an asynchronous run: each client's device profile
    and the server step's seconds (none without ``--devices``), and the model class the profiles' FLOP/s are spent on."""
    devices = device_set(run.devices) if run.devices else None
    return {"profiles": None if devices is None else client_profiles(devices, clients, run.seed),
            "server_seconds": 0.0 if devices is None else devices.server_seconds,
            "tokens_per_example": run.max_length, "parameters": sum(p.numel() for p in model.parameters())}


def asynchronous_for(run, model, clients: int):
    """The event loop of ``--async`` (:mod:`fedlora.federation.asynchronous`): budget the synchronous run's client
    updates; client speeds from the device profiles with ``--devices``, else ``--client-speeds`` in turn."""
    from fedlora.federation.asynchronous import AsyncConfig, Asynchronous, parse_speeds

    per_round = max(1, int(round(run.fraction * clients)))
    return Asynchronous(AsyncConfig(
        mode=run.async_mode, buffer=run.buffer or per_round, concurrency=min(run.async_concurrency or per_round, clients),
        budget=run.rounds * per_round, staleness=run.staleness, a=run.staleness_a, b=run.staleness_b, alpha=run.fedasync_alpha,
        rho=run.fedasync_rho, speeds=parse_speeds(run.client_speeds, clients), **clock_settings(run, model, clients)))
