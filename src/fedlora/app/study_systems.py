"""The study's systems part (``fedlora study --parts systems``): methods under a simulated clock, three arms.

Each method of :data:`SYSTEMS_METHODS` runs in three arms on two settings, over paired seeds, every run on the
packaged device profile mix (``--devices default``, docs/systems.md):

* ``sync``: synchronous rounds, every selected client waited for, with an availability pattern
  (:attr:`SystemsPlan.availability`);
* ``deadline``: the same rounds closed at a deadline derived from the profiles (:func:`derive_deadline`), with
  over-selection (:attr:`SystemsPlan.over_select`), the same availability;
* ``fedbuff``: asynchronous FedBuff (``--async fedbuff``, buffer and concurrency the clients per round), without
  availability: this version refuses ``--availability`` under ``--async`` (the report says so). ``florana`` is
  synchronous only (its solve is over clients that share one start): it gets the first two arms.

The settings: the synthetic part's base at one heterogeneity level (many seeds: a run takes seconds) and the
preset's MiniLM base (the study's seeds), each with ``fraction`` clients per round so over-selection has clients to
add; rounds are scaled by (base fraction / fraction), so a run's budget of client updates, rounds × clients per
round, is its base's when that is whole, and the same in every arm (FedBuff's budget is the synchronous run's by
construction, :func:`fedlora.app.systems.asynchronous_for`; an over-selected round trains more clients but
aggregates at most the clients per round, the surplus reported as wasted work).

Our choices, stated again in the report: the deadline is derived from the profile mix (:func:`derive_deadline`); the
target is ``target_fraction`` × the best synchronous method's mean final accuracy in that setting; time- and
bytes-to-target are read as ``fedlora compare --target-accuracy`` reads them (:mod:`fedlora.app.targets`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from fedlora.app.config import RunConfig
from fedlora.app.study import REFERENCE, ReportContext, StudyRun, _dagger, _diff, _f, _pm, _settings_line
from fedlora.app.targets import TARGET_FRACTION, plot_accuracy_time, reach

ARMS = ("sync", "deadline", "fedbuff")
# The methods of issue 32's systems study: FedIT, the methods whose bytes or rounds differ most, FLoRA-NA (synchronous only)
SYSTEMS_METHODS = ("fedit", "flora", "fedex", "florana", "fedsb", "ffa", "fedsa")
SETTINGS = ("synthetic", "base")  # the synthetic part's base at one level; the preset's base (MiniLM on BBC News by default)


@dataclass(frozen=True)
class SystemsPlan:
    """What sizes the systems part. ``level``: the synthetic setting's heterogeneity (``synthetic:α,β``);
    ``synthetic_seeds``: its seeds (the base setting takes the study's seeds, ``--seeds``); ``deadline_quantile``:
    the share of the profile mix (by weight) whose expected round fits the deadline (:func:`derive_deadline`)."""

    level: str
    synthetic_seeds: tuple[int, ...]
    methods: tuple[str, ...] = SYSTEMS_METHODS
    fraction: float = 0.5
    devices: str = "default"
    # dropout, not diurnal: a run lasts simulated minutes, so a daily pattern is a fixed subset of the clients
    # (those whose night it is at time 0), never a pattern over the run (docs/systems.md, "The study's systems part")
    availability: str = "dropout:0.2"
    deadline_quantile: float = 0.7
    over_select: float = 1.4
    target_fraction: float = TARGET_FRACTION


def is_async(method: str) -> bool:
    """Whether ``method`` runs under ``--async`` (its asynchronous trait)."""
    from fedlora.federation import method_class

    return bool(method_class(method).asynchronous)


def arms_of(method: str) -> tuple[str, ...]:
    return ARMS if is_async(method) else tuple(a for a in ARMS if a != "fedbuff")


def update_budget(cfg: RunConfig) -> int:
    """The client updates a run may aggregate: rounds × clients per round (FedBuff's budget, the same formula)."""
    return cfg.rounds * max(1, int(round(cfg.fraction * cfg.clients)))


def setting_bases(p) -> dict[str, tuple[RunConfig, tuple[int, ...]]]:
    """setting → (its base settings with the clock on, before the arm's, and its seeds)."""
    sp = p.systems
    bases = {}
    if p.synthetic is not None:
        bases["synthetic"] = (p.synthetic.base.replace(data=f"synthetic:{sp.level}"), sp.synthetic_seeds)
    bases["base"] = (p.base, p.seeds)
    out = {}
    for name, (cfg, seeds) in bases.items():
        rounds = max(1, round(cfg.rounds * cfg.fraction / sp.fraction))
        out[name] = (cfg.replace(fraction=sp.fraction, rounds=rounds, devices=sp.devices), seeds)
    return out


def arm_config(cfg: RunConfig, arm: str, sp: SystemsPlan, deadline: float) -> RunConfig:
    if arm == "sync":
        return cfg.replace(availability=sp.availability)
    if arm == "deadline":
        return cfg.replace(availability=sp.availability, deadline=deadline, over_select=sp.over_select)
    if arm == "fedbuff":
        return cfg.replace(async_mode="fedbuff")
    raise ValueError(f"unknown systems arm {arm!r}; choose one of {', '.join(ARMS)}")


def label(setting: str, arm: str) -> str:
    return f"systems:{setting}:{arm}"


def systems_runs(p, *, deadlines: dict[str, float] | None = None) -> list[StudyRun]:
    """The part's runs, setting by setting and seed by seed: every method in each of its arms. ``deadlines``: setting →
    seconds (default: :func:`derive_deadline` of the setting's base, which builds its model once)."""
    sp = p.systems
    runs = []
    for setting, (base, seeds) in setting_bases(p).items():
        deadline = (deadlines or {}).get(setting)
        if deadline is None:
            deadline = derive_deadline(base, sp.deadline_quantile)
        for s in seeds:
            for m in sp.methods:
                for arm in arms_of(m):
                    cfg = arm_config(base, arm, sp, deadline).replace(method=m, seed=s)
                    runs.append(StudyRun(f"systems-{setting}/{arm}/{m}/seed-{s}", label(setting, arm), cfg))
    return runs


# ---------------------------------------------------------------------------------------------------------
# The deadline


def derive_deadline(cfg: RunConfig, quantile: float) -> float:
    """The deadline of a setting, from its profile mix (our rule): each profile's expected round, a FedIT client's
    download of the adapter state, its ``local_steps`` × ``batch_size`` examples and its upload (the clock's model,
    :func:`~fedlora.federation.clock.client_work`); the profiles sorted by it; the first whose cumulative weight in the
    mix reaches ``quantile`` is the slowest the deadline is meant to keep, the next the fastest it is meant to drop;
    the deadline is their geometric mean (halfway on a log scale, clear of both, as a client that missed broadcasts
    downloads more than one state)."""
    times = profile_round_times(cfg)
    weights = mix_weights(cfg.devices)
    order = sorted((t, name) for name, t in times.items() if weights.get(name, 0) > 0)
    total, cum = sum(weights[n] for _, n in order), 0.0
    for i, (t, name) in enumerate(order):
        cum += weights[name]
        if cum / total >= quantile - 1e-12:
            slower = [u for u, _ in order[i + 1:] if u > t]
            return math.sqrt(t * slower[0]) if slower else t
    return order[-1][0]


def mix_weights(devices: str) -> dict[str, float]:
    """profile → its weight among the clients: the mix's, or its count in ``assign``."""
    from fedlora.app.systems import device_set

    d = device_set(devices)
    if d.assign is not None:
        return {n: float(d.assign.count(n)) for n in set(d.assign)}
    return dict(d.mix)


def profile_round_times(cfg: RunConfig) -> dict[str, float]:
    return dict(_profile_round_times(json.dumps(cfg.given(), sort_keys=True)))


@functools.cache
def _profile_round_times(cfg_json: str) -> tuple[tuple[str, float], ...]:
    """(profile, seconds of a FedIT client's round on it) for the setting (one build of its model and data)."""
    from fedlora.app.build import build
    from fedlora.app.systems import device_set
    from fedlora.federation.clock import client_work, examples_processed
    from fedlora.federation.traffic import nbytes

    cfg = RunConfig(**json.loads(cfg_json)).replace(method="fedit", async_mode="", availability="", deadline=None,
                                                            over_select=1.0, out="")
    sim = build(cfg).simulator
    parameters = sum(q.numel() for q in sim.model.parameters())  # as the clock counts them (app/systems.py)
    state = nbytes(sim.handle.get())
    shards = sorted(examples_processed(len(c.train), cfg.local_steps, cfg.batch_size) for c in sim.clients)
    examples = shards[len(shards) // 2]
    return tuple((name, client_work(0, prof, bytes_down=state, bytes_up=state, examples=examples,
                                    speed=prof.speed(parameters, cfg.max_length)).seconds)
                 for name, prof in device_set(cfg.devices).profiles.items())


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Cell:
    """One method in one arm of a setting, over its finished seeds: seed → final accuracy, seed → reach() (None: never),
    and the wasted work per run (None where the arm records none: FedBuff drops nobody)."""

    accuracy: dict[int, float]
    reached: dict[int, dict | None]
    final_clock: dict[int, float | None]
    dropped: dict[int, dict[str, int]] | None
    wasted_examples: dict[int, int] | None
    wasted_mb: dict[int, float] | None


def cell(histories: dict[int, list[dict]], target: float | None) -> Cell:
    """A method-arm's numbers from its runs' metrics (``target`` None: no time-to-target)."""
    recorded = all("n_dropped" in m for h in histories.values() for m in h)
    dropped = {s: _reasons(h) for s, h in histories.items()} if recorded else None
    return Cell(
        accuracy={s: h[-1]["global_accuracy"] for s, h in histories.items()},
        reached={s: None if target is None else reach(h, target) for s, h in histories.items()},
        final_clock={s: h[-1].get("sim_clock") for s, h in histories.items()},
        dropped=dropped,
        wasted_examples={s: sum(m["wasted_examples"] for m in h) for s, h in histories.items()} if recorded else None,
        wasted_mb={s: sum(m["wasted_bytes"] for m in h) / 1e6 for s, h in histories.items()} if recorded else None,
    )


def _reasons(history: list[dict]) -> dict[str, int]:
    """Dropped client-rounds of a run, by reason."""
    out: dict[str, int] = {}
    for m in history:
        for d in m.get("dropped", []):
            out[d["reason"]] = out.get(d["reason"], 0) + 1
    return out


def setting_target(ctx: ReportContext, setting: str, sp: SystemsPlan) -> tuple[float | None, str]:
    """(target accuracy, how it was chosen): ``target_fraction`` × the best synchronous method's mean final accuracy."""
    means = {m: sum(a) / len(a) for m in sp.methods
             if (a := [h[-1]["global_accuracy"] for h in ctx.seeded(m, label(setting, "sync")).values()])}
    if not means:
        return None, "no synchronous run finished"
    best = max(means, key=means.get)
    how = f"{sp.target_fraction:g} × `{best}`'s mean final accuracy in the sync arm, {_f(means[best])}"
    accs = [h[-1]["global_accuracy"] for h in ctx.seeded(best, label(setting, "sync")).values()]
    if _dagger(accs, ctx.rate(label(setting, "sync"))):
        how += "; † no synchronous method learned, so reaching this target does not show learning"
    return sp.target_fraction * means[best], how


def _reached_text(c: Cell) -> tuple[str, str, str]:
    """(reached k/n, sim s to target, MB to target): mean ± 95 % interval over the seeds that reached it."""
    hits = [r for r in c.reached.values() if r is not None]
    n = len(c.reached)
    if not hits:
        return f"never (0/{n})", "—", "—"
    secs = [r["sim_seconds"] for r in hits]
    return f"{len(hits)}/{n}", "—" if any(x is None for x in secs) else _pm(secs, 3), _pm([r["mb"] for r in hits], 3)


def _wasted_text(c: Cell) -> tuple[str, str]:
    """(dropped client-rounds per run by reason, wasted examples and MB per run), means over seeds."""
    if c.dropped is None:
        return "— (none recorded)", "—"
    n = len(c.dropped)
    reasons = sorted({r for d in c.dropped.values() for r in d})
    total = sum(sum(d.values()) for d in c.dropped.values()) / n
    by = ", ".join(f"{r} {sum(d.get(r, 0) for d in c.dropped.values()) / n:.1f}" for r in reasons)
    return f"{total:.1f}" + (f" ({by})" if by else ""), f"{_pm(list(c.wasted_examples.values()), 1)} ex, {_pm(list(c.wasted_mb.values()), 3)} MB"


def _paired_text(c: Cell, ref: Cell | None) -> tuple[str, str]:
    """(Δ final accuracy, Δ sim s to target) against fedit-sync, paired over the seeds both have (both reached)."""
    if ref is None or c is ref:
        return "—", "—"
    common = sorted(set(c.accuracy) & set(ref.accuracy))
    acc = _diff([c.accuracy[s] for s in common], [ref.accuracy[s] for s in common])[2] if common else "—"
    both = [s for s in common if c.reached.get(s) and ref.reached.get(s)
            and c.reached[s]["sim_seconds"] is not None and ref.reached[s]["sim_seconds"] is not None]
    t = _diff([c.reached[s]["sim_seconds"] for s in both], [ref.reached[s]["sim_seconds"] for s in both])[2] if both else "—"
    return acc, (f"{t} [{len(both)}]" if both else "—")


def section(ctx: ReportContext) -> str:
    """Section 9: per setting, method × arm: final accuracy, time- and bytes-to-target, wasted work, paired
    differences to FedIT's synchronous runs, and accuracy against simulated time (one figure per arm)."""
    sp = ctx.p.systems
    if sp is None or not any(r.name in ctx.histories for r in ctx.runs if r.label.startswith("systems:")):
        return ""
    L = ["## 9. Systems: synchronous, deadline and FedBuff under a simulated clock", "",
         f"Methods {', '.join(f'`{m}`' for m in sp.methods)} in three arms, every run on the packaged device profile mix "
         f"(`--devices {sp.devices}`, docs/systems.md): **sync**, synchronous rounds with availability `{sp.availability}`; "
         f"**deadline**, the same with a deadline and over-selection {sp.over_select:g} (select ⌈{sp.over_select:g} × clients per "
         "round⌉, keep the first clients per round to finish before the deadline); **fedbuff**, FedBuff "
         "(`--async fedbuff`, buffer and concurrency the clients per round) *without* availability, which this version "
         "refuses under `--async`. `florana` is synchronous only (its solve is over clients that share one start): it has "
         "no fedbuff arm. Every arm has the same budget of client updates, rounds × clients per round (FedBuff's budget is "
         "the synchronous run's); an over-selected round trains more clients and aggregates at most the clients per round. "
         "Every arm's server step takes the profiles' `[server] seconds` (0.5 s in the packaged mix): a synchronous round's "
         "once, FedBuff's once per flush of K arrivals (docs/systems.md).", "",
         f"The deadline (our rule): each profile's expected round for a FedIT client (download of the adapter state, local "
         f"training, upload), the profiles sorted by it; the first whose cumulative weight in the mix reaches "
         f"{sp.deadline_quantile:.0%} is the slowest kept, the next the fastest dropped, and the deadline is the geometric "
         "mean of their two times. The target: "
         f"{sp.target_fraction:g} × the best synchronous method's mean final accuracy in the setting. A run reaches it at its "
         "first round (FedBuff: server step) at or above it; sim s and MB to target (up and down, round 0 included) are "
         "means ± 95 % t-intervals over the seeds that reached it, `reached` says how many. Δ columns: paired per-seed "
         "differences to `fedit` in the sync arm (time: over the seeds both reached, [n]). Wasted work: client-rounds "
         "dropped per run by reason (offline, dropout, deadline, surplus of over-selection) and the examples trained and "
         "bytes moved by the dropped clients before they stopped, mean over seeds. † did not learn (the final accuracy's "
         "interval does not clear the majority-class rate).", ""]
    for setting in SETTINGS:
        L += _setting_block(ctx, setting, sp)
    return "\n".join(L)


def _setting_block(ctx: ReportContext, setting: str, sp: SystemsPlan) -> list[str]:
    runs = [r for r in ctx.runs if r.label.startswith(f"systems:{setting}:")]
    if not any(r.name in ctx.histories for r in runs):
        return []
    title = f"{setting}: `{runs[0].config.model}` on `{runs[0].config.data}`"
    target, how = setting_target(ctx, setting, sp)
    deadline = next((r.config.deadline for r in runs if r.config.deadline is not None), None)
    base = runs[0].config
    seeds = sorted({r.seed for r in runs if r.name in ctx.histories})
    maj = ctx.rate(label(setting, "sync"))
    L = [f"### {title}", "",
         f"Settings: {_settings_line(base).replace(', max 64 tokens', '')}; {update_budget(base)} client updates per run "
         f"({base.rounds} rounds × {max(1, int(round(base.fraction * base.clients)))} clients per round); deadline "
         f"{_f(deadline, 4)} simulated s. {len(seeds)} seed{'' if len(seeds) == 1 else 's'} finished. Target: "
         + (f"global accuracy ≥ {_f(target)} ({how})." if target is not None else f"none ({how}).")
         + f" Majority-class rate: {_f(maj)}.", "",
         "| method | arm | seeds | global acc | reached | sim s to target | MB to target | sim s at the end | dropped / run "
         "| wasted / run | Δ acc vs fedit-sync | Δ sim s to target |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    ref_h = ctx.seeded(REFERENCE, label(setting, "sync"))
    ref = cell(ref_h, target) if ref_h else None
    plots: dict[str, dict[str, list[list[dict]]]] = {}
    for m in sp.methods:
        for arm in ARMS:
            hs = ctx.seeded(m, label(setting, arm))
            if arm not in arms_of(m):
                L.append(f"| {m} | {arm} | — | synchronous only | | | | | | | | |")
                continue
            if not hs:
                continue
            c = ref if (m == REFERENCE and arm == "sync" and ref is not None) else cell(hs, target)
            accs = list(c.accuracy.values())
            reached, secs, mb = _reached_text(c)
            dropped, wasted = _wasted_text(c)
            d_acc, d_t = _paired_text(c, ref)
            L.append(f"| {m} | {arm} | {len(hs)} | {_pm(accs)}{_dagger(accs, maj)} | {reached} | {secs} | {mb} | "
                     f"{_pm([x for x in c.final_clock.values() if x is not None], 3)} | {dropped} | {wasted} | {d_acc} | {d_t} |")
            plots.setdefault(arm, {})[m] = [hs[s] for s in sorted(hs)]
    L.append("")
    L += _figures(ctx, setting, plots, target)
    _reading(ctx, setting, title, target, sp)
    return L


def _reading(ctx: ReportContext, setting: str, title: str, target: float | None, sp: SystemsPlan) -> None:
    """The verdict line of a setting: each arm against the same method's synchronous runs, per seed (paired): whose time
    to target (over the seeds both reached) and whose final accuracy the interval resolves, up or down."""
    parts = []
    for arm in ARMS[1:]:
        words: dict[str, list[str]] = {}
        for m in sp.methods:
            a, b = ctx.seeded(m, label(setting, arm)), ctx.seeded(m, label(setting, "sync"))
            if not a or not b:
                continue
            ca, cb = cell(a, target), cell(b, target)
            acc_d, time_d = _paired_text(ca, cb)
            for what, text in (("time to target", time_d), ("final accuracy", acc_d)):
                if _resolved(text):
                    sign = "shorter" if what == "time to target" else "lower"
                    sign = sign if text.startswith("-") else {"shorter": "longer", "lower": "higher"}[sign]
                    words.setdefault(f"{what} {sign}", []).append(f"`{m}`")
        if words:
            parts.append(f"{arm}: " + "; ".join(f"{k} for {', '.join(v)}" for k, v in words.items()))
        elif any(ctx.seeded(m, label(setting, arm)) for m in sp.methods):
            parts.append(f"{arm}: no difference the intervals resolve")
    if parts:
        ctx.verdicts.append(f"- **Systems, {title}: each arm against the same method's synchronous runs** (paired per seed; "
                            "time over the seeds both reached the target) — " + " · ".join(parts) + ".")


def _resolved(text: str) -> bool:
    """Whether a :func:`_diff` text (or '—') is a difference its interval resolves."""
    return text != "—" and "n.d." not in text


def _figures(ctx: ReportContext, setting: str, plots: dict[str, dict[str, list[list[dict]]]], target: float | None) -> list[str]:
    """One figure of global accuracy against simulated time per arm (each seed thin, the mean over seeds thick)."""
    out = []
    for arm, hists in plots.items():
        d = ctx.figdir / f"systems-{setting}-{arm}"
        d.mkdir(exist_ok=True)
        if plot_accuracy_time(hists, d, target) is not None:
            out.append(f"![accuracy against simulated time, {setting}, {arm}]({ctx.figdir.name}/{d.name}/accuracy_time.png)")
    return [" ".join(out), ""] if out else []
