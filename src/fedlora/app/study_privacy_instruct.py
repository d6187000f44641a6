"""The study's ``privacy-instruct`` part (front end): differential privacy on the instruction-tuning track.

FedIT, FFA-LoRA and FedSA-LoRA on the instruct part's setting (:class:`fedlora.app.study.InstructPlan`: SmolLM2 on
three Evals tasks, one per client) under example-level DP (DP-SGD on every client) at a few noise multipliers, and
under client-level DP (DP-FedAvg) with a simulated cross-device cohort, on the instruct part's paired seeds. The
no-DP runs are the instruct part's own (same directory, same settings), so a study that ran ``instruct`` reuses
them. The report (section 8b) is the held-out task score against ε, with the base model's score and the
constant-answer floor as the instruct section shows them, paired differences to FedIT at each level and the reading
of FFA-LoRA's claim (noise on B alone costs less than on both factors). ``fedlora study`` calls :func:`runs` from
its plan and :func:`section` from its report; docs/privacy.md has the design and its cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.app.study import (
    COLORS,
    REFERENCE,
    InstructPlan,
    ReportContext,
    StudyRun,
    _clears,
    _diff,
    _distinct,
    _errorbar,
    _f,
    _ffa_cells,
    _ffa_word,
    _floor_mark,
    _instruct_floors,
    _mean,
    _plt,
    _pm,
    _save,
)

NONE, EXAMPLE, CLIENT = "none", "example", "client"
LABEL = "instruct"  # the no-DP runs' label: the instruct part's


@dataclass(frozen=True)
class PrivacyInstructPlan:
    """Which methods, at which noise multipliers, under which DP. The settings, seeds and per-method overrides are
    the instruct part's (:func:`runs` takes its :class:`InstructPlan`), so the no-DP runs are its runs.

    Our choices (docs/privacy.md, "DP on the instruction-tuning track"):

    * example-level z = 0.5, 1, 2: ε ≈ 14, 3.2 and 0.8 at δ = 1e-5 (each client's 48 training examples, Poisson
      batches of expected size 4, 12 steps), a decade of ε. No clip-only level (z = 0): at batch 4 the noise on
      the averaged gradient is z·C·√P/B ≈ 85z (FFA, P = 184,320 trainables of B) to 170z (FedIT, P = 460,800) times
      the largest signal, so the noise, not the clipping, is the cost at every level;
    * client-level z = 1 with a noise cohort of 1,000 clients of a population of 10⁶ (δ = 1e-7, below 1/N): the
      setting DP federated learning is deployed in (Gboard-like cohorts), where the noise on the average update is
      z·C·√P/1000 ≈ 0.7·C for FedIT: comparable to the update, not hundreds of times larger. Its ε (≈ 0.96 over
      3 rounds) is **cohort-simulated**: what a deployment of that size would spend, not a guarantee of the
      3-client run (docs/privacy.md, "Realistic cohorts")."""

    methods: tuple[str, ...] = ("fedit", "ffa", "fedsa")
    noises: tuple[float, ...] = (0.5, 1.0, 2.0)  # example-level (DP-SGD)
    clip: float = 1.0
    client_noises: tuple[float, ...] = (1.0,)  # client-level, noise-cohort simulation
    client_clip: float = 1.0
    cohort: int = 1000
    population: int = 10**6
    client_delta: float = 1e-7

    def levels(self) -> list[tuple[str, float | None]]:
        """(DP kind, z) of every column of the report, without DP first."""
        return [(NONE, None), *((EXAMPLE, z) for z in self.noises), *((CLIENT, z) for z in self.client_noises)]


def run_label(kind: str, z: float | None) -> str:
    """The label of the runs at one level (the no-DP runs carry the instruct part's)."""
    return LABEL if kind == NONE else f"privacy-instruct{'-client' if kind == CLIENT else ''}:{z:g}"


def runs(ip: InstructPlan, pp: PrivacyInstructPlan) -> list[StudyRun]:
    """The part's runs, seed by seed: each method without DP (the instruct part's run, same name and settings), then
    at each example-level and each client-level noise multiplier."""
    out = []
    for s in ip.seeds:
        for m in pp.methods:
            base = ip.base.replace(method=m, seed=s, **dict(dict(ip.overrides).get(m, ())))
            for kind, z in pp.levels():
                label = run_label(kind, z)
                if kind == NONE:
                    out.append(StudyRun(f"instruct/{m}/seed-{s}", label, base))
                    continue
                cfg = base.replace(dp=kind, dp_noise=z, dp_clip=pp.clip)
                if kind == CLIENT:
                    cfg = cfg.replace(dp_clip=pp.client_clip, dp_noise_cohort=pp.cohort, dp_population=pp.population,
                                      dp_delta=pp.client_delta)
                out.append(StudyRun(f"{label.replace(':', '-z')}/{m}/seed-{s}", label, cfg))
    return out


# ---------------------------------------------------------------------------------------------------------
# The report


KEY = "heldout/exact"


def _level_name(kind: str, z: float | None) -> str:
    if kind == NONE:
        return "no DP"
    return f"example (DP-SGD), z = {z:g}" if kind == EXAMPLE else f"client, cohort-simulated, z = {z:g}"


def _scores(ctx: ReportContext, m: str, kind: str, z: float | None) -> dict[int, float]:
    """seed → the held-out score after the last round of ``m`` at one level (finished runs)."""
    return {s: h[-1][KEY] for s, h in ctx.seeded(m, run_label(kind, z)).items()}


def _epsilon(ctx: ReportContext, ms: list[str], kind: str, z: float | None) -> str:
    """The mean final ε over the methods and seeds of one level, with its δ (and 'cohort-simulated' for a cohort)."""
    if kind == NONE:
        return "∞"
    finals = [h[-1] for m in ms for h in ctx.seeded(m, run_label(kind, z)).values()]
    eps = [f["epsilon"] for f in finals if f.get("epsilon") is not None]
    if not eps:
        return "—"
    delta = finals[0].get("delta")
    return f"{_f(_mean(eps), 2)}" + (f" (δ = {delta:g})" if delta is not None else "")


def _floors(ctx: ReportContext, pp: PrivacyInstructPlan) -> dict[int, dict[str, float]]:
    """seed → the constant-answer floor of the held-out score (and the benchmarks'), from any finished run of the seed."""
    out: dict[int, dict[str, float]] = {}
    for kind, z in pp.levels():
        label = run_label(kind, z)
        runs_at = [r for r in ctx.runs if r.label == label]
        if runs_at:
            for s, f in _instruct_floors(ctx, runs_at[0].config, label).items():
                out.setdefault(s, f)
    return out


def _base_scores(ctx: ReportContext, ms: list[str], pp: PrivacyInstructPlan) -> dict[int, float]:
    """seed → the base model's held-out score before training (the reference row every run records)."""
    out: dict[int, float] = {}
    for m in ms:
        for kind, z in pp.levels():
            for s, h in ctx.seeded(m, run_label(kind, z)).items():
                ref = h[-1].get("reference", {}).get(KEY)
                if ref is not None:
                    out.setdefault(s, ref)
    return out


def section(ctx: ReportContext) -> str:
    """Section 8b: the held-out score per method and DP level with ε, the base model and the floor, the paired
    differences to FedIT, and the readings (utility under DP, FFA-LoRA's claim)."""
    ip, pp = ctx.p.instruct, ctx.p.privacy_instruct
    if ip is None or pp is None:
        return ""
    levels = pp.levels()
    ms = [m for m in pp.methods if any(_scores(ctx, m, k, z) for k, z in levels)]
    if not ms:
        return ""
    cfg = ip.base
    floors = _floors(ctx, pp)
    base = _base_scores(ctx, ms, pp)
    L = ["## 8b. Privacy on the instruction-tuning track", "",
         f"The instruct part's setting (section 8: `{cfg.model}` on `{cfg.data}`, {cfg.clients} clients, {cfg.rounds} rounds × "
         f"{cfg.local_steps} local steps, batch {cfg.batch_size}, {len(ip.seeds)} paired seeds) for {', '.join(f'`{m}`' for m in ms)}: "
         f"without DP (the instruct part's runs), under example-level DP (DP-SGD on every client: per-example clip C = {pp.clip:g}, "
         f"Poisson batches of expected size {cfg.batch_size}, ε from Opacus's RDP accountant, the largest over clients) at "
         f"z = {', '.join(f'{z:g}' for z in pp.noises)}, and under client-level DP (DP-FedAvg, update clip C = {pp.client_clip:g}) "
         f"at z = {', '.join(f'{z:g}' for z in pp.client_noises)} with the noise calibrated as if a cohort of {pp.cohort:,} "
         f"clients of a population of {pp.population:,} joined each round: its ε is **cohort-simulated**, what such a "
         f"deployment would spend, not a guarantee of this {cfg.clients}-client run. Score: `heldout/exact` after the last round, "
         "mean ± 95 % interval over seeds; † does not clear the constant-answer floor (section 8).", "",
         "| DP | ε | " + " | ".join(ms) + " |", "|---|---:|" + "---:|" * len(ms)]
    for kind, z in levels:
        cells = []
        for m in ms:
            v = _scores(ctx, m, kind, z)
            cells.append(_pm(v.values()) + _floor_mark(v, floors, KEY) if v else "—")
        L.append(f"| {_level_name(kind, z)} | {_epsilon(ctx, ms, kind, z)} | " + " | ".join(cells) + " |")
    floor = {s: f[KEY] for s, f in floors.items() if KEY in f}
    L += ["| base model (before training) | — | " + " | ".join([_pm(base.values()) + _floor_mark(base, floors, KEY)] * len(ms)) + " |",
          "| *constant answer* | — | " + " | ".join([_pm(floor.values())] * len(ms)) + " |", ""]
    L += _paired_table(ctx, ms, levels)
    if ctx.figdir is not None:
        fig = _figure(ctx, ms, pp, _mean(base.values()), _mean(floor.values()))
        L += [f"![held-out score against ε]({ctx.rel(fig)})", ""]
    _utility_reading(ctx, ms, levels, base, floors)
    if REFERENCE in ms and "ffa" in ms:
        _ffa_instruct_reading(ctx, pp, base)
    return "\n".join(L)


def _figure(ctx: ReportContext, ms: list[str], pp: PrivacyInstructPlan, base: float | None, floor: float | None):
    """The held-out score against ε (log scale), mean ± 95 % interval over seeds: each method's example-level curve, its
    client-level cohort point (unjoined, paler) and its score without DP (dotted); the base model and the
    constant-answer floor as grey lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in ms:
        color = COLORS.get(m)
        for kind, noises in ((EXAMPLE, pp.noises), (CLIENT, pp.client_noises)):
            zs = [z for z in sorted(noises, reverse=True) if _scores(ctx, m, kind, z)]  # more noise → less ε → left
            eps = [_mean(h[-1].get("epsilon") for h in ctx.seeded(m, run_label(kind, z)).values()) for z in zs]
            if zs and None not in eps:
                line = _errorbar(ax, eps, [list(_scores(ctx, m, kind, z).values()) for z in zs], color=color, alpha=1.0 if kind == EXAMPLE else 0.6,
                                 ls="-" if kind == EXAMPLE else "none", label=m if kind == EXAMPLE else f"{m}, client (cohort)")
                color = line[0].get_color()
        none = _scores(ctx, m, NONE, None)
        if none:
            ax.axhline(_mean(none.values()), ls=":", color=color, alpha=0.7)
    for value, style, what in ((base, "--", "base model"), (floor, "-.", "constant answer")):
        if value is not None:
            ax.axhline(value, ls=style, color="grey", label=f"{what} ({value:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("ε (example level: δ = 1e-5, largest over clients; client level: cohort-simulated)")
    ax.set_ylabel("held-out exact match (dotted: without DP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, ctx.figdir / "privacy-instruct.png")


def _paired_table(ctx: ReportContext, ms: list[str], levels) -> list[str]:
    """Each method's paired per-seed difference to FedIT's held-out score at each level."""
    others = [m for m in ms if m != REFERENCE]
    if REFERENCE not in ms or not others:
        return []
    L = [f"Paired per-seed difference to `{REFERENCE}` at each level (n.d.: the interval holds 0):", "",
         "| DP | " + " | ".join(f"{m} − {REFERENCE}" for m in others) + " |", "|---|" + "---:|" * len(others)]
    for kind, z in levels:
        ref = _scores(ctx, REFERENCE, kind, z)
        cells = []
        for m in others:
            v = _scores(ctx, m, kind, z)
            seeds = sorted(set(v) & set(ref))
            cells.append(_diff([v[s] for s in seeds], [ref[s] for s in seeds])[2] if seeds else "—")
        L.append(f"| {_level_name(kind, z)} | " + " | ".join(cells) + " |")
    return [*L, ""]


def _utility_reading(ctx: ReportContext, ms: list[str], levels, base: dict[int, float], floors) -> None:
    """Per DP level: the methods whose held-out score is above the base model's (paired interval clears 0) and those
    that clear the constant-answer floor."""
    cells = []
    for kind, z in levels:
        above, cleared, n = [], [], 0
        for m in ms:
            v = _scores(ctx, m, kind, z)
            seeds = sorted(s for s in v if s in base)
            if not seeds:
                continue
            n += 1
            d, _, text = _diff([v[s] for s in seeds], [base[s] for s in seeds])
            if _distinct(text) and d > 0:
                above.append(m)
            if _clears(v, floors, KEY):
                cleared.append(m)
        if n:
            cells.append(f"{_level_name(kind, z)}: above the base model {', '.join(f'`{m}`' for m in above) or 'none'} of {n}, "
                         f"above the floor {', '.join(f'`{m}`' for m in cleared) or 'none'}")
    if cells:
        ctx.verdicts.append("- **Held-out task score under DP (instruction tuning)** — which methods stay above the base "
                            "model's score (paired per seed, interval clears 0) and above the constant-answer floor: "
                            + "; ".join(cells) + ".")


def _ffa_instruct_reading(ctx: ReportContext, pp: PrivacyInstructPlan, base: dict[int, float]) -> None:
    """FFA-LoRA's claim on this track, stated as the privacy-synthetic part states it: per seed, the held-out score DP
    takes from FedIT and from FFA (against no DP), FedIT's − FFA's with its paired interval, per noise level; for
    example-level and client-level DP apart. A level where neither stays above the base model cannot separate them
    beyond what training without DP gained."""

    def at(kind):
        return lambda m, z: ctx.seeded(m, run_label(NONE if z is None else kind, z))

    parts = []
    for kind, noises, what in ((EXAMPLE, pp.noises, "example-level DP-SGD"), (CLIENT, pp.client_noises, "client-level, cohort-simulated")):
        cells, holds, contrary, _ = _ffa_cells(noises, at(kind), {}, KEY, 1, None)
        if not cells:
            continue
        flat = [f"z = {z:g}" for z in noises if not any(_above_base(_scores(ctx, m, kind, z), base) for m in (REFERENCE, "ffa"))
                and _scores(ctx, REFERENCE, kind, z)]
        parts.append(f"{what}: **{_ffa_word(len(cells), holds, contrary)}** (" + "; ".join(cells) + ")"
                     + (f"; at {', '.join(flat)} neither FedIT nor FFA stays above the base model, so the cost there is "
                        "capped by what training without DP gained and cannot separate them" if flat else ""))
    if parts:
        ctx.verdicts.append("- **FFA-LoRA's claim on the instruction-tuning track** (noise on B alone costs less than on both "
                            "factors; held-out score lost to DP per seed, difference = FedIT's loss − FFA's, positive supports "
                            "the claim) — " + " · ".join(parts) + ".")


def _above_base(values: dict[int, float], base: dict[int, float]) -> bool:
    seeds = sorted(s for s in values if s in base)
    if not seeds:
        return False
    d, _, text = _diff([values[s] for s in seeds], [base[s] for s in seeds])
    return _distinct(text) and d > 0 and not math.isnan(d)
