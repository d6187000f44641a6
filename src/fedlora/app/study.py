"""The papers' analyses as one reproducible command (front end): ``fedlora study``.

Six analyses, each a set of ordinary runs (every one a normal run directory with ``metrics.jsonl``), repeated
over paired seeds, and a section of one generated report:

1. comparison: the papers' methods on BBC News topics (MiniLM) under IID, Dirichlet α = 1 and α = 0.5;
2. divergence over rounds and per layer: ``fedit`` vs ``florana`` vs ``svd`` vs the Eckart–Young bound
   (FLoRA-NA Figures 2 and 4), read from the comparison runs;
3. A/B cosine similarity per layer under IID, α = 1 and α = 0.5 (FedSA-LoRA Figure 2), from ``fedit`` runs;
4. accuracy vs heterogeneity α for ``fedit``, ``fedsa``, ``florana`` (FLoRA-NA Figure 3), adding α = 0.1;
5. scale: 10, 50, 100 clients (IID) for ``fedit`` and ``florana`` over one fixed pool of examples;
6. synthetic: every shipped method on the synthetic teacher–student task over a heterogeneity sweep, 20 seeds;
7. privacy: example-level DP (DP-SGD) at three noise levels on the MiniLM setting; privacy-synthetic: the same on the
   synthetic task, where DP-SGD runs still learn, to test FFA-LoRA's claim;
8. instruct: instruction tuning of a causal LM across tasks; privacy-instruct: DP on that track
   (:mod:`fedlora.app.study_privacy_instruct`);
9. systems: methods under a simulated clock, synchronous vs deadline vs FedBuff (:mod:`fedlora.app.study_systems`).

Seed s gives every method the same partition, test set, initial adapter, client sampling and batch order; numbers
are means with 95 % t-intervals over seeds and comparisons are per-seed (paired) differences (:mod:`stats`).
Runs are shared between analyses, skipped when already finished and resumed when interrupted, so a killed
study loses at most the round in progress; parts can be run (and committed) one at a time with ``--parts``.
Every number in the report is read from those runs' metrics; the reading of the papers' claims is computed from
them with the criteria stated next to each verdict.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.app.config import RunConfig
from fedlora.app.rundir import RunDir, same_settings

if TYPE_CHECKING:  # the modules import this one's helpers; this one imports them where they are used
    from fedlora.app.study_privacy_instruct import PrivacyInstructPlan
    from fedlora.app.study_systems import SystemsPlan

PARTS = ("comparison", "divergence", "similarity", "heterogeneity", "scale", "synthetic", "privacy", "privacy-synthetic", "instruct",
         "privacy-instruct", "systems")
# The privacy–utility curves, the instruction-tuning track and the systems study are asked for by name (--parts
# privacy,instruct,systems): DP-SGD runs and a causal LM's runs are long, the systems part is three arms of every method.
DEFAULT_PARTS = tuple(p for p in PARTS if p not in ("privacy", "privacy-synthetic", "instruct", "privacy-instruct", "systems"))
# The instruction-tuning track's methods: FedIT and the methods its papers compare, FlexLoRA with mixed ranks.
INSTRUCT_METHODS = ("fedit", "ffa", "fedsa", "flora", "fedex", "florana", "flexlora", "fedsb", "feddpa")
PRESETS = ("default", "quick", "dp-large-batch")
# The analyses of the FLoRA-NA and FedSA-LoRA papers, over the methods they compare (a study design, not dispatch).
COMPARISON_METHODS = ("fedit", "ffa", "fedsa", "flora", "fedex", "florana", "svd")
DIVERGENCE_METHODS = ("fedit", "florana", "svd")
HETEROGENEITY_METHODS = ("fedit", "fedsa", "florana")
SCALE_METHODS = ("fedit", "florana")
# The privacy-synthetic part's noise multipliers (default preset), chosen from one run per level (seed 0,
# docs/privacy.md): FedIT's global loss after 30 rounds was the same at z = 0.5, 1 and 2 (1.932, 1.936, 1.933: DP-SGD's
# cost there is its clipping, not its noise); FedIT at z = 8 unlearned (loss 1.98 at round 10, 2.23 at round 30);
# FFA at z = 4.5 still learned a little over 60 rounds (loss 2.04 → 1.975). So three levels in the transition, and
# z = 0 (clipping alone, no privacy): the reference that isolates the noise's cost, which FFA-LoRA's claim is about.
PSYN_NOISES = (0.0, 2.5, 3.5, 4.5)
REFERENCE = "fedit"  # paired differences are taken against FedIT, the method every paper compares against


@dataclass(frozen=True)
class SyntheticPlan:
    """The synthetic-task sweep: every registered method at each heterogeneity level (``synthetic:α,β``), many seeds."""

    base: RunConfig  # data is set per level
    levels: tuple[str, ...]
    seeds: tuple[int, ...]
    # per-method settings where the base's cannot apply: RaVAN's 4 heads of rank r need 4r ≤ 10 (fc2 is 10 × 64),
    # so it gets 4 heads of rank 2, the same total rank 8 as everyone else
    overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (("ravan", (("rank", 2),)),)


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy–utility curve: each method under example-level DP (DP-SGD) at each noise multiplier, and without."""

    methods: tuple[str, ...]
    noises: tuple[float, ...]
    clip: float
    partition: tuple[str, str, float]  # (label, partition, alpha)
    # Fed-SB's gradient initialisation round is not covered by DP-SGD: it runs with its random init, with and without DP
    overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (("fedsb", (("method_options", "fedsb-init=random"),)),)


@dataclass(frozen=True)
class PrivacySyntheticPlan:
    """FFA-LoRA's claim where DP-SGD learns: each method on the synthetic task under example-level DP at each noise
    multiplier and without, many paired seeds. The no-DP runs are the synthetic part's own where the settings agree."""

    base: RunConfig  # the synthetic part's base at ``level``
    level: str  # synthetic:α,β
    methods: tuple[str, ...]
    noises: tuple[float, ...]
    clip: float
    seeds: tuple[int, ...]
    overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (("fedsb", (("method_options", "fedsb-init=random"),)),)


@dataclass(frozen=True)
class InstructPlan:
    """The instruction-tuning track: clients each holding different tasks (--task instruct), every method on the same
    seeds, the base model's scores before training as the reference row."""

    base: RunConfig
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    # FlexLoRA is the track's mixed-rank method: clients at ranks 4, 8 and 16 in turn
    overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (("flexlora", (("client_ranks", "4,8,16"),)),)


@dataclass(frozen=True)
class Preset:
    """The knobs that size the study. ``default`` is about three hours on 2 CPU cores with MiniLM, three seeds."""

    base: RunConfig
    comparison: tuple[tuple[str, str, float], ...]  # (label, partition, alpha)
    extra_alphas: tuple[float, ...]  # heterogeneity points beyond the comparison's partitions
    similarity: tuple[str, ...]  # partition labels of the A/B similarity analysis
    scale_clients: tuple[int, ...]
    scale_pool: int  # examples (train + local test) spread over the clients of a scale run
    scale_rounds: int
    seeds: tuple[int, ...] = (0, 1, 2)
    synthetic: SyntheticPlan | None = None
    privacy: PrivacyPlan | None = None
    instruct: InstructPlan | None = None
    privacy_synthetic: PrivacySyntheticPlan | None = None
    # DP on the instruction-tuning track, planned from ``instruct`` (fedlora.app.study_privacy_instruct)
    privacy_instruct: PrivacyInstructPlan | None = None
    systems: SystemsPlan | None = None


def preset(name: str) -> Preset:
    from fedlora.app.study_privacy_instruct import PrivacyInstructPlan
    from fedlora.app.study_systems import SystemsPlan

    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name == "dp-large-batch":
        return _dp_large_batch(preset("default"))
    partitions = (("IID", "iid", 1.0), ("α=1", "dirichlet", 1.0), ("α=0.5", "dirichlet", 0.5))
    similarity = ("IID", "α=1", "α=0.5")
    levels = ("0,0", "0.5,0.5", "1,1")
    if name == "default":
        # lr 1e-2, not 5e-3: at 5e-3 FFA (which trains B only) was still at the majority-class rate after 5 rounds
        # on an α=0.5 seed; every method is still rising at round 5 there, and more rounds would cost 60 % more
        base = RunConfig(
            model="minilm", data="bbc", clients=10, rounds=5, local_steps=3, batch_size=16, lr=1e-2,
            examples_per_client=128, test_examples=300, max_length=48, similarity=True, seed=0,
        )
        synthetic = SyntheticPlan(
            RunConfig(model="synthetic", data="synthetic:0,0", target_modules="fc1,fc2", rounds=60, local_steps=3,
                      lr=0.1, optimizer="sgd", clients=10, seed=0),
            levels, tuple(range(20)),
        )
        privacy = PrivacyPlan(("fedit", "ffa", "fedsa", "fedsvd", "fedsb"), (0.5, 1.0, 2.0), 1.0, ("IID", "iid", 1.0))
        # SmolLM2 on three OpenAI Evals tasks, one per client; MMLU (100 questions, 0-shot) as the forgetting check
        instruct = InstructPlan(
            RunConfig(task="instruct", data="evals:quartz,logiqa,theory_of_mind.socialiqa", clients=3, partition="one", rounds=3,
                      local_steps=4, batch_size=4, lr=1e-3, examples_per_client=60, test_examples=60, max_new_tokens=4,
                      eval="mmlu:100", seed=0),
            INSTRUCT_METHODS, (0, 1, 2),
        )
        privacy_synthetic = PrivacySyntheticPlan(synthetic.base, "0,0", ("fedit", "ffa", "fedsa", "fedsvd", "fedsb"), PSYN_NOISES, 1.0,
                                                 tuple(range(10)))
        # the systems part: the synthetic task at one level (10 seeds; a run takes seconds) and MiniLM (the study's seeds)
        systems = SystemsPlan("0.5,0.5", tuple(range(10)))
        return Preset(base, partitions, (0.1,), similarity, (10, 50, 100), 1280, 3, (0, 1, 2), synthetic, privacy, instruct,
                      privacy_synthetic, PrivacyInstructPlan(), systems)
    base = RunConfig(
        model="tiny:bert", data="tweets", clients=3, rounds=2, local_steps=2, batch_size=8, lr=5e-3, rank=4,
        examples_per_client=40, test_examples=60, max_length=32, similarity=True, seed=0, device="cpu",
    )
    synthetic = SyntheticPlan(
        RunConfig(model="synthetic", data="synthetic:0,0", target_modules="fc1,fc2", rounds=3, local_steps=2, lr=0.1,
                  optimizer="sgd", clients=3, examples_per_client=40, test_examples=60, seed=0, device="cpu"),
        ("0,0", "1,1"), (0, 1, 2),
    )
    privacy = PrivacyPlan(("fedit", "ffa", "fedsb"), (1.0,), 1.0, ("IID", "iid", 1.0))
    privacy_synthetic = PrivacySyntheticPlan(synthetic.base, "0,0", ("fedit", "ffa", "fedsb"), (0.0, 0.5), 1.0, (0, 1))
    # quick has no instruct plan (a causal LM's data); with one, its DP part is one level of each kind, a small cohort
    privacy_instruct = PrivacyInstructPlan(noises=(1.0,), cohort=100, population=10**4, client_delta=1e-5)
    systems = SystemsPlan("0,0", (0, 1), methods=("fedit", "ffa", "florana"))
    return Preset(base, partitions, (0.1,), similarity, (3, 6), 96, 2, (0, 1), synthetic, privacy, privacy_synthetic=privacy_synthetic,
                  privacy_instruct=privacy_instruct, systems=systems)


def _dp_large_batch(d: Preset) -> Preset:
    """The privacy part where DP-SGD's noise is the size of the signal (docs/privacy.md, "A MiniLM setting with the
    batch DP-SGD needs"): MiniLM at the default's sampling rate q = 16/102 and steps (so the same ε per z) but an
    expected batch B = 275 ≈ √P (P ≈ 75,000 trainables: LoRA r = 8 on query and value, 73,728, and the head), so
    the noise on the averaged gradient, z·C·√P/B, is z times the largest signal instead of 17z. That needs 1,753
    training examples per client (q·1,753 = 275): 10 × 1,845 with 5 % local test, more than BBC News holds (2,225
    articles), so the corpus is the offline tweets (38,158, three sentiments). FedIT and FFA (the claim) at z = 1
    (ε ≈ 5.5, as the default's z = 1), 3 seeds: 6 DP-SGD runs and their 6 runs without DP at the same batch, about
    18 minutes each on this machine alone (41,250 per-example gradients at ~41/s). The preset has no other part (each
    would run at that batch for hours); its no-DP runs have other settings than the default's comparison runs of the
    same names: give it its own --runs directory."""
    base = d.base.replace(data="tweets", batch_size=275, examples_per_client=1845, local_test_fraction=0.05)
    return replace(d, base=base, privacy=PrivacyPlan(("fedit", "ffa"), (1.0,), 1.0, ("IID", "iid", 1.0)), comparison=(),
                   extra_alphas=(), similarity=(), scale_clients=(), synthetic=None, instruct=None, privacy_synthetic=None,
                   privacy_instruct=None, systems=None)


@dataclass(frozen=True)
class StudyRun:
    name: str  # its directory under the runs directory, e.g. "alpha0.5/fedit/seed-2"
    label: str  # partition label, e.g. "α=0.5", "N=50" for scale runs, "synthetic:1,1" for the synthetic sweep
    config: RunConfig

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def seed(self) -> int:
        return self.config.seed


def _label(partition: str, alpha: float) -> str:
    return "IID" if partition == "iid" else f"α={alpha:g}"


def _slug(label: str) -> str:
    return label.replace("α=", "alpha").replace("IID", "iid").replace("N=", "scale").replace(":", "-")


def all_methods() -> tuple[str, ...]:
    """Every method and reference point fedlora ships that runs on the synthetic task (the synthetic sweep runs them
    all; installed plug-ins are not part of the study's fixed design; a method that allocates transformer blocks,
    ``Method.needs_blocks``, has none to allocate in the synthetic task's two-layer network)."""
    from fedlora.federation import method_class, method_names

    return tuple(m for m in method_names() if method_class(m).__module__.startswith("fedlora.") and not method_class(m).needs_blocks)


def plan(p: Preset, *, methods: tuple[str, ...] = COMPARISON_METHODS, parts: tuple[str, ...] = PARTS) -> list[StudyRun]:
    """Every run the requested parts need, each once, seed by seed (so a study cut short has whole seeds)."""
    runs: dict[str, StudyRun] = {}

    def add(method: str, partition: str, alpha: float, seed: int, **over) -> None:
        label = _label(partition, alpha)
        if "clients" in over:
            label = f"N={over['clients']}"
        name = f"{_slug(label)}/{method}/seed-{seed}"
        if name not in runs:
            cfg = p.base.replace(method=method, partition=partition, alpha=alpha, seed=seed, **over)
            runs[name] = StudyRun(name, label, cfg)

    comparison = {label: (part, alpha) for label, part, alpha in p.comparison}
    extra = {f"α={a:g}": ("dirichlet", a) for a in p.extra_alphas}
    for s in p.seeds:
        if "comparison" in parts:
            for part, alpha in comparison.values():
                for m in methods:
                    add(m, part, alpha, s)
        if "divergence" in parts:
            for part, alpha in comparison.values():
                for m in DIVERGENCE_METHODS:
                    add(m, part, alpha, s)
        if "heterogeneity" in parts:
            for part, alpha in (comparison | extra).values():
                for m in HETEROGENEITY_METHODS:
                    add(m, part, alpha, s)
        if "similarity" in parts:
            for label in p.similarity:
                known = comparison | extra
                if label not in known:
                    raise ValueError(f"similarity partition {label!r} is neither in the comparison nor an extra α of the preset")
                add("fedit", *known[label], s)
        if "scale" in parts:
            for n in p.scale_clients:
                per_client = max(2, p.scale_pool // n)
                train = max(1, round(per_client * (1 - p.base.local_test_fraction)))
                steps = max(1, round(train / p.base.batch_size))  # about one local epoch per round
                for m in SCALE_METHODS:
                    # IID: at 100 clients of ~13 examples each, a Dirichlet split of a 5-topic corpus leaves clients
                    # below the partitioner's minimum; the scale analysis is about N, not heterogeneity
                    add(m, "iid", 1.0, s, clients=n, examples_per_client=per_client, local_steps=steps, rounds=p.scale_rounds)
    if "privacy" in parts and p.privacy is not None:
        _privacy_runs(p, add, runs)
    for part, make in _NAMED_PARTS:
        if part in parts:
            runs |= {r.name: r for r in make(p)}
    return list(runs.values())


def _privacy_runs(p: Preset, add: Callable, runs: dict[str, StudyRun]) -> None:
    """The privacy part's runs into ``runs``: each method without DP (the comparison's run, through ``add``, unless
    it has overrides) and at each noise level under example-level DP."""
    pv = p.privacy
    label, part, alpha = pv.partition
    for s in p.seeds:
        for m in pv.methods:
            over = dict(dict(pv.overrides).get(m, ()))
            if over:  # not the comparison's run of this method: its own baseline
                name = f"privacy-none/{m}/seed-{s}"
                runs.setdefault(name, StudyRun(name, "privacy:none", p.base.replace(method=m, partition=part, alpha=alpha, seed=s, **over)))
            else:
                add(m, part, alpha, s)
            for z in pv.noises:
                name = f"privacy-z{z:g}/{m}/seed-{s}"
                cfg = p.base.replace(method=m, partition=part, alpha=alpha, seed=s, dp="example", dp_noise=z, dp_clip=pv.clip, **over)
                runs[name] = StudyRun(name, f"privacy:{z:g}", cfg)


def _instruct_runs(p: Preset) -> list[StudyRun]:
    if p.instruct is None:
        return []
    ip = p.instruct
    return [StudyRun(f"instruct/{m}/seed-{s}", "instruct", ip.base.replace(method=m, seed=s, **dict(dict(ip.overrides).get(m, ()))))
            for s in ip.seeds for m in ip.methods]


def _systems_runs(p: Preset) -> list[StudyRun]:
    from fedlora.app.study_systems import systems_runs

    return [] if p.systems is None else systems_runs(p)


def _privacy_instruct_runs(p: Preset) -> list[StudyRun]:
    from fedlora.app import study_privacy_instruct

    # its no-DP runs are the instruct part's (same names and settings): a dict keeps one of each
    return [] if p.instruct is None or p.privacy_instruct is None else study_privacy_instruct.runs(p.instruct, p.privacy_instruct)


def _synthetic_runs(p: Preset) -> list[StudyRun]:
    """The layout of `fedlora compare --seeds`: synthetic-LEVEL/METHOD/seed-S, so a compare's runs can be reused."""
    sp, out = p.synthetic, []
    for s in sp.seeds if sp is not None else ():
        for level in sp.levels:
            for m in all_methods():
                cfg = sp.base.replace(method=m, data=f"synthetic:{level}", seed=s, **dict(dict(sp.overrides).get(m, ())))
                out.append(StudyRun(f"synthetic-{level}/{m}/seed-{s}", f"synthetic:{level}", cfg))
    return out


# The parts planned from their own plans, in the order their runs are listed after the seeded MiniLM parts'.
_NAMED_PARTS: tuple[tuple[str, Callable[[Preset], list[StudyRun]]], ...] = (
    ("privacy-synthetic", lambda p: [] if p.privacy_synthetic is None else _privacy_synthetic_runs(p.privacy_synthetic)),
    ("instruct", _instruct_runs),
    ("systems", _systems_runs),
    ("privacy-instruct", _privacy_instruct_runs),
    ("synthetic", _synthetic_runs),
)


def _privacy_synthetic_runs(ps: PrivacySyntheticPlan) -> list[StudyRun]:
    """The privacy-synthetic part's runs, seed by seed: without DP (the synthetic part's run, same name and label,
    unless the method has overrides) and at each noise level under example-level DP."""
    out = []
    for s in ps.seeds:
        for m in ps.methods:
            over = dict(dict(ps.overrides).get(m, ()))
            base = ps.base.replace(method=m, data=f"synthetic:{ps.level}", seed=s, **over)
            if over:
                out.append(StudyRun(f"privacy-synthetic-none/{m}/seed-{s}", "privacy-synthetic:none", base))
            else:
                out.append(StudyRun(f"synthetic-{ps.level}/{m}/seed-{s}", f"synthetic:{ps.level}", base))
            for z in ps.noises:
                cfg = base.replace(dp="example", dp_noise=z, dp_clip=ps.clip)
                out.append(StudyRun(f"privacy-synthetic-z{z:g}/{m}/seed-{s}", f"privacy-synthetic:{z:g}", cfg))
    return out


# ---------------------------------------------------------------------------------------------------------
# Running


def finished_history(out: Path, cfg: RunConfig) -> list[dict] | None:
    return RunDir(out).finished(cfg)


def execute(
    runs: list[StudyRun],
    runs_dir: Path,
    *,
    on_start: Callable[[int, StudyRun], None] | None = None,
    on_client: Callable | None = None,
    on_round: Callable | None = None,
    group=None,
) -> dict[str, list[dict]]:
    """Run what is missing (finished runs are read back, interrupted ones resumed); return name → history. A run
    another `fedlora study` process on the same --runs directory holds is left to it, so several processes share the
    work without overlap. ``group``: the study's tracker group (:class:`fedlora.app.tracking.Group`; the runs'
    ``track`` says which trackers), whose children the runs are; a finished run is logged to it when it was not yet."""
    from fedlora.app.experiment import run_or_resume

    check_runs_dir(runs, runs_dir)
    histories: dict[str, list[dict]] = {}
    for i, run in enumerate(runs):
        run_dir = RunDir(runs_dir / run.name)
        cfg = run.config.replace(out=str(run_dir.path))
        done = run_dir.finished(cfg)
        if done is not None:
            histories[run.name] = done
            if cfg.track:
                from fedlora.app.tracking import log_finished

                log_finished(cfg, run_dir.path, done, group)
            continue
        run_dir.path.mkdir(parents=True, exist_ok=True)
        taken = run_dir.take()
        if taken is False:
            continue  # another process is running it
        try:
            if on_start:
                on_start(i, run)
            histories[run.name], _ = run_or_resume(cfg, group, on_client=on_client, on_round=on_round)
        finally:
            if taken:
                run_dir.release()
    return histories


def check_runs_dir(runs: list[StudyRun], runs_dir: Path) -> None:
    """Refuse, before any work, a runs directory whose runs were made with other settings."""
    check_run_configs([run.config.replace(out=str(runs_dir / run.name)) for run in runs], "--runs directory")


def check_run_configs(configs: list[RunConfig], what: str) -> None:
    """Refuse, before any work, a run directory (each config's ``out``) that holds a run made with other settings."""
    for cfg in configs:
        out = Path(cfg.out)
        if (out / "config.json").exists() and not same_settings(out, cfg):
            raise ValueError(f"{str(out)!r} holds a {cfg.method} run with other settings; pass another {what} or delete that run")


def load_histories(runs: list[StudyRun], runs_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for run in runs:
        done = finished_history(runs_dir / run.name, run.config)
        if done is not None:
            out[run.name] = done
    return out


# ---------------------------------------------------------------------------------------------------------
# Numbers read from the runs


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def summary_row(history: list[dict]) -> dict:
    last = history[-1]
    return {
        "global": last["global_accuracy"],
        "local": last["local_accuracy"],
        "gap": last["local_global_gap"],
        "rho": _mean(h["divergence"] for h in history),
        "bound": _mean(h.get("bound") for h in history),
        "rho_fedit": _mean(h.get("fedit_divergence") for h in history),
        "mb_up": sum(h["bytes_up"] for h in history) / 1e6,
        "mb_down": sum(h["bytes_down"] for h in history) / 1e6,
        "agg_s": _mean(h.get("aggregation_seconds") for h in history),
        "wall_s": sum(h["wall_seconds"] for h in history),
        "round_s": _mean(h["wall_seconds"] for h in history),
    }


_LAYER = re.compile(r"layers?\.(\d+)\.")


def module_key(name: str, order: int) -> tuple[int, str]:
    """(layer index, module kind) of an adapted module name, e.g. (3, 'query')."""
    m = _LAYER.search(name)
    return (int(m.group(1)) if m else order), name.rsplit(".", 1)[-1]


def per_layer(values: dict[str, float] | None) -> dict[tuple[int, str], float]:
    if not values:
        return {}
    return {module_key(n, i): v for i, (n, v) in enumerate(values.items())}


def mean_per_layer(history: list[dict], key: str) -> dict[tuple[int, str], float]:
    """Per-module values of ``key`` averaged over the rounds that report them."""
    acc: dict[tuple[int, str], list[float]] = {}
    for h in history:
        for k, v in per_layer(h.get(key)).items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


COLORS = {"fedit": "tab:blue", "florana": "tab:orange", "svd": "tab:green", "bound": "black", "fedsa": "tab:red",
          "ffa": "tab:purple", "flora": "tab:brown", "fedex": "tab:pink", "fedsvd": "tab:olive", "fedsb": "tab:cyan"}


def _at_bound(method: str) -> bool:
    """Its ρ is the bound itself, so the bound is not drawn again."""
    from fedlora.federation import method_class

    return method_class(method).at_bound


def fig_divergence_rounds(panels: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (label, hists) in zip(axes[0], panels.items()):
        for m, hist in hists.items():
            rounds = [h["round"] for h in hist]
            ax.plot(rounds, [max(h["divergence"] or 0, 1e-12) for h in hist], marker="o", label=m, color=COLORS.get(m))
            if not _at_bound(m) and all(h.get("bound") is not None for h in hist):
                ax.plot(rounds, [max(h["bound"], 1e-12) for h in hist], ls="--", color=COLORS.get(m), alpha=0.6,
                        label=f"bound ({m} run)")
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("divergence ρ (mean over matrices)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def fig_divergence_layers(hists: dict[str, list[dict]], path: Path, title: str) -> Path:
    plt = _plt()
    kinds = sorted({k for hist in hists.values() for (_, k) in mean_per_layer(hist, "divergence_per_layer")})
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for m, hist in hists.items():
            vals = {l: v for (l, k), v in mean_per_layer(hist, "divergence_per_layer").items() if k == kind}
            ax.plot(list(vals), list(vals.values()), marker="o", label=m, color=COLORS.get(m))
            if not _at_bound(m):
                bound = {l: v for (l, k), v in mean_per_layer(hist, "bound_per_layer").items() if k == kind}
                ax.plot(list(bound), list(bound.values()), ls="--", color=COLORS.get(m), alpha=0.6, label=f"bound ({m} run)")
        ax.set_yscale("log")
        ax.set_title(f"{kind} · {title}")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ρ, mean over rounds")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def fig_similarity(sims: dict[str, dict[str, dict[tuple[int, str], float]]], path: Path) -> Path:
    """sims[label][kind] = per-(layer, module) similarity; kinds A, B, dA, dB."""
    plt = _plt()
    titles = {"A": "A (factor)", "B": "B (factor)", "dA": "ΔA (local update)", "dB": "ΔB (local update)"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), squeeze=False, sharey=True)
    styles = {"query": "-", "value": ":"}
    for ax, kind in zip(axes[0], titles):
        for label, per_kind in sims.items():
            vals = per_kind.get(kind, {})
            for mod in sorted({k for (_, k) in vals}):
                pts = sorted((l, v) for (l, k), v in vals.items() if k == mod)
                ax.plot([l for l, _ in pts], [v for _, v in pts], marker="o", ls=styles.get(mod, "-"), label=f"{label} · {mod}")
        ax.set_title(titles[kind])
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean pairwise cosine across clients")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _errorbar(ax, xs, samples, **kw):
    """Mean over seeds with the 95 % t-interval as error bars."""
    from fedlora.app.stats import interval

    stats = [interval(v) for v in samples]
    return ax.errorbar(xs, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o", capsize=3, **kw)


def fig_heterogeneity(by_m: dict[str, dict[str, dict[int, list[dict]]]], order: list[str], path: Path,
                      rates: dict[str, float | None] | None = None) -> Path:
    """by_m[method][partition label][seed] = history; mean ± 95 % interval over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for ax, key, title in ((axes[0][0], "global", "global accuracy"), (axes[0][1], "local", "local accuracy")):
        for m, by_label in by_m.items():
            xs = [l for l in order if l in by_label]
            _errorbar(ax, xs, [[summary_row(h)[key] for h in by_label[l].values()] for l in xs], label=m, color=COLORS.get(m))
        if key == "global" and rates:
            xs = [l for l in order if rates.get(l) is not None]
            ax.plot(xs, [rates[l] for l in xs], ls=":", color="grey", label="majority class")
        ax.set_title(title)
        ax.set_xlabel("partition (more heterogeneous → left)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def fig_scale(rows: dict[str, dict[int, dict[int, dict]]], path: Path) -> Path:
    """rows[method][clients][seed] = summary_row; mean ± 95 % interval over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), squeeze=False)
    specs = (("global", "global accuracy", False), ("rho", "mean divergence ρ", True), ("agg_s", "server aggregation s / round", True))
    for ax, (key, title, logy) in zip(axes[0], specs):
        for m, by_n in rows.items():
            ns = sorted(by_n)
            _errorbar(ax, ns, [[r[key] for r in by_n[n].values()] for n in ns], label=m, color=COLORS.get(m))
        if logy:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xticks(sorted({n for by_n in rows.values() for n in by_n}))
        ax.get_xaxis().set_major_formatter(__import__("matplotlib").ticker.ScalarFormatter())
        ax.set_title(title)
        ax.set_xlabel("clients")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def fig_privacy(rows: dict[str, dict[float, list[dict]]], baseline: dict[str, list[float]], majority: float | None, path: Path,
                key: str = "global_accuracy", ylabel: str = "global accuracy (dotted: without DP)") -> Path:
    """``key`` (global accuracy) against ε (log scale) per method, error bars over seeds; each method's ``baseline``
    (its score without DP) dotted."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    from fedlora.app.stats import interval

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ticks: set[float] = set()
    for m, by_z in rows.items():
        zs = sorted(by_z, reverse=True)  # more noise → less ε → left
        xs = [_mean(r.get("epsilon") for r in by_z[z]) for z in zs]
        ticks |= {float(f"{x:.2g}") for x in xs if x is not None}
        line = _errorbar(ax, xs, [[r[key] for r in by_z[z]] for z in zs], label=m, color=COLORS.get(m))
        if baseline.get(m):
            ax.axhline(interval(baseline[m])[0], ls=":", color=line[0].get_color(), alpha=0.7)
    if majority is not None:
        ax.axhline(majority, ls="--", color="grey", label=f"majority class ({majority:.3f})")
    ax.set_xscale("log")
    if ticks:  # the levels' ε as the ticks (a log axis over less than a decade labels its minor ticks on top of each other)
        ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε (δ = 1e-5), largest over clients")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# The report


def _settings_line(cfg: RunConfig) -> str:
    return (
        f"model `{cfg.model}`, data `{cfg.data}`, {cfg.adapter} r={cfg.rank} (α={cfg.lora_alpha:g}) on "
        f"`{cfg.target_modules}`, {cfg.clients} clients × {cfg.examples_per_client} examples "
        f"({1 - cfg.local_test_fraction:.0%} train / {cfg.local_test_fraction:.0%} local test), {cfg.rounds} rounds × "
        f"{cfg.local_steps} local steps × batch {cfg.batch_size}, {'AdamW' if cfg.optimizer == 'adamw' else 'SGD'} "
        f"lr {cfg.lr:g}, max {cfg.max_length} tokens, global test {cfg.test_examples} examples"
    )


def mean_history(hists: list[list[dict]]) -> list[dict]:
    """The round-by-round mean over seeds of every number and every per-layer dict (rounds all seeds reached)."""
    if not hists:
        return []
    out = []
    for i in range(min(len(h) for h in hists)):
        rows = [h[i] for h in hists]
        merged: dict = {}
        for key, value in rows[0].items():
            values = [r.get(key) for r in rows]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = _mean(values)
            elif isinstance(value, dict):  # per-layer numbers (per-client records, dicts of dicts, are not averaged)
                names = [n for n, x in value.items() if isinstance(x, (int, float)) and not isinstance(x, bool)]
                merged[key] = {n: _mean((v or {}).get(n) for v in values) for n in names}
            else:
                merged[key] = value if all(v == value for v in values) else None
        out.append(merged)
    return out


def _pm(values, digits: int = 3) -> str:
    """mean ± half-width of the 95 % t-interval over seeds (the mean alone with one seed)."""
    from fedlora.app.stats import interval

    mean, half = interval(list(values))
    if math.isnan(mean):
        return "—"
    if math.isnan(half):
        return _f(mean, digits)
    return f"{_f(mean, digits)} ± {_f(half, digits)}"


def _t(n: int) -> float:
    """The Student-t quantile of a 95 % interval over n values."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def _diff(values, reference) -> tuple[float, float, str]:
    """Paired per-seed difference: (mean, half-width, 'Δ ± h' text with '(n.d.)' when the interval holds 0)."""
    from fedlora.app.stats import distinguishable, paired

    mean, half = paired(list(values), list(reference))
    if math.isnan(mean):
        return mean, half, "—"
    small = max(abs(mean), 0 if math.isnan(half) else half) < 1e-2
    value = f"{mean:+.2e}" if small and mean != 0 else f"{mean:+.3f}"
    if math.isnan(half):  # one seed: no interval, so never distinguishable
        return mean, half, f"{value} (one seed, n.d.)"
    text = f"{value} ± {half:.1e}" if small and mean != 0 else f"{value} ± {half:.3f}"
    return mean, half, text + ("" if distinguishable(mean, half) else " (n.d.)")


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    return xs[len(xs) // 2] if xs else None


def majority_rates(runs: list[StudyRun]) -> dict[str, float | None]:
    """Each run's global-test majority-class rate (the test set is drawn per seed, before partitioning)."""
    from fedlora.app.experiment import majority_rate

    cache: dict[str, float | None] = {}
    out = {}
    for r in runs:
        c = r.config
        key = json.dumps([c.data, c.seed, c.test_examples, c.clients, c.examples_per_client, c.partition, c.alpha,
                          c.labels_per_client, c.local_test_fraction, c.split_by])
        if key not in cache:
            try:
                cache[key] = majority_rate(c)
            except Exception:  # a report from finished runs must not fail on data that is gone
                cache[key] = None
        out[r.name] = cache[key]
    return out


@dataclass
class ReportContext:
    """What every section of the report reads: the study's settings, its runs, their histories (finished runs
    only), their majority-class rates and where figures go (``figdir``; None for the README table). Sections add
    their reading of the papers' claims to ``verdicts``; the last section prints them."""

    p: Preset
    runs: list[StudyRun]
    histories: dict[str, list[dict]]
    command: str
    parts: tuple[str, ...] = PARTS
    methods: tuple[str, ...] = COMPARISON_METHODS
    figdir: Path | None = None
    rates: dict[str, float | None] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, p: Preset, runs: list[StudyRun], histories: dict[str, list[dict]], **kw) -> ReportContext:
        return cls(p, runs, histories, rates=majority_rates([r for r in runs if r.name in histories]), **kw)

    @property
    def labels(self) -> list[str]:
        """The comparison's partition labels, in the preset's order."""
        return [label for label, _, _ in self.p.comparison]

    @functools.cached_property
    def _finished(self) -> dict[tuple[str, str], dict[int, list[dict]]]:
        by: dict[tuple[str, str], dict[int, list[dict]]] = {}
        for r in self.runs:
            if r.name in self.histories:
                by.setdefault((r.method, r.label), {})[r.seed] = self.histories[r.name]
        return by

    def seeded(self, method: str, label: str) -> dict[int, list[dict]]:
        """seed → history of the finished runs of ``method`` on ``label``."""
        return self._finished.get((method, label), {})

    def rate(self, label: str, seeds=None) -> float | None:
        """The mean majority-class rate of the finished runs on ``label`` (of those seeds)."""
        return _mean(self.rates.get(r.name) for r in self.runs
                     if r.label == label and r.name in self.histories and (seeds is None or r.seed in seeds))

    def common_seeds(self, ms, label: str) -> list[int]:
        """The seeds every method in ``ms`` finished on ``label`` (paired comparisons use only these)."""
        sets = [set(self.seeded(m, label)) for m in ms]
        sets = [x for x in sets if x]
        return sorted(set.intersection(*sets)) if sets else []

    def rel(self, path) -> str:
        """A figure's link, relative to the report."""
        return f"{self.figdir.name}/{Path(path).name}"


def _dagger(accs, majority: float | None) -> str:
    """' †' where the accuracies over seeds do not show learning (:func:`~fedlora.app.report.learned`)."""
    from fedlora.app.report import learned

    return " †" if learned(accs, majority) is False else ""


def _distinct(text: str) -> bool:
    """Whether a :func:`_diff` text is a difference its interval resolves."""
    return "n.d." not in text and text != "—"


def _overrides_note(overrides, ending: str, methods=None) -> str:
    """' `m` runs with k = v.' for the methods a plan runs with settings of their own."""
    return "".join(f" `{m}` runs with {', '.join(f'{k} = {v}' for k, v in o)}{ending}"
                   for m, o in overrides if methods is None or m in methods)


# The parts that run the preset's base settings (MiniLM on BBC News in the default preset) and its seeds.
BASE_PARTS = ("comparison", "divergence", "similarity", "heterogeneity", "scale", "privacy")


def _instruct_only(ctx: ReportContext) -> bool:
    """A report of the instruction-tuning track alone: its settings and seeds head the report."""
    return ctx.p.instruct is not None and not any(part in ctx.parts for part in (*BASE_PARTS, "synthetic", "privacy-synthetic", "systems"))


def _preamble(ctx: ReportContext) -> str:
    """The report's head: how to re-create it, then the settings and seeds of its runs — the preset's base when a part
    runs it, the instruction track's when the report is that track's alone, else none (a report of the synthetic,
    privacy-synthetic or systems parts: each section states its own)."""
    p = ctx.p
    if _instruct_only(ctx):
        p = replace(p, base=p.instruct.base, seeds=p.instruct.seeds)
    lead = _instruct_only(ctx) or any(part in ctx.parts for part in BASE_PARTS)
    seeds_text = ", ".join(map(str, p.seeds))
    same = ("Seed s gives every method the same partition, global test set, initial adapter, client sampling and batch "
            "order. Every number is the mean over the seeds, ± the half-width of its 95 % Student-t interval over them; a "
            "comparison between two methods is the mean of their per-seed differences with its own interval, marked "
            "(n.d.) — not distinguishable — when that interval holds 0.")
    if not lead:
        return "\n".join([*_recreate(ctx), f"Each section states its settings and its seeds. {same} A difference the "
                           "interval does not resolve is not evidence of equality.", ""])
    return "\n".join([
        *_recreate(ctx),
        f"Settings of every run unless a section says otherwise: {_settings_line(p.base)}"
        + (f"; a chat template, the loss on response tokens only, greedy answers of at most {p.base.max_new_tokens} "
           "new tokens." if p.base.task == "instruct" else "."),
        "",
        f"**{len(p.seeds)} seeds** ({seeds_text}). {same}"
        + (f" With {len(p.seeds)} seeds the t-interval is wide (t = {_t(len(p.seeds)):.2f} standard errors): a "
           "difference it does not resolve is not evidence of equality." if len(p.seeds) > 1 else ""),
        "",
    ])


def _recreate(ctx: ReportContext) -> list[str]:
    return ["# Results: the papers' analyses, over paired seeds", "",
            "Generated by `fedlora study`; every number and figure below comes from the runs that command performs "
            "(nothing is typed in by hand). Re-create it with:", "", f"    {ctx.command}", ""]


def _run_time(ctx: ReportContext) -> str:
    kinds: dict[str, float] = {}
    for r in ctx.runs:
        if r.name in ctx.histories:
            kind = ("systems (part 9)" if r.label.startswith("systems:")
                    else "synthetic (part 6)" if r.label.startswith("synthetic:") else "privacy (part 7)" if r.label.startswith("privacy:")
                    else "privacy, synthetic (part 7b)" if r.label.startswith("privacy-synthetic:")
                    else "privacy, instruction tuning (part 8b)" if r.label.startswith("privacy-instruct")
                    else "instruction tuning (part 8)" if r.label == "instruct" else f"`{ctx.p.base.model}` (parts 1–5)")
            kinds[kind] = kinds.get(kind, 0.0) + summary_row(ctx.histories[r.name])["wall_s"]
    total_wall = sum(kinds.values())
    by_kind = ", ".join(f"{k} {v / 60:.0f} min" for k, v in kinds.items()) if len(kinds) > 1 else ""
    L = [f"{len(ctx.histories)} runs, {total_wall / 60:.0f} min of run time on this machine (2 CPU cores, no GPU; the sum "
         "of the runs' wall times" + (f": {by_kind}" if by_kind else "") + "). Two `fedlora study` processes sharing the "
         "runs directory take about half of that on the clock.", ""]
    missing = [r.name for r in ctx.runs if r.name not in ctx.histories]
    if missing:
        L += [f"**Incomplete**: {len(missing)} of {len(ctx.runs)} runs not finished yet; sections that need them are "
              "partial and say on how many seeds they stand. Run the same command again to finish them.", ""]
    return "\n".join(L)


def _protocol(ctx: ReportContext) -> str:
    from fedlora.app.report import MAJORITY_MARGIN

    if not any(part in ctx.parts for part in BASE_PARTS):
        return ""  # the synthetic and instruction-tuning sections state their own protocol
    return "\n".join([
        "Protocol: global accuracy is the global model on a test set held out before partitioning (for `fedsa`: "
        "shared Â with the clients' mean B and heads); local accuracy is each client's own model right after "
        "local training on its own held-out shard, example-weighted; gap = local − global; ρ = ‖ΔW* − ΔŴ‖/‖ΔW*‖ "
        "per adapted matrix (for `fedsa`, ΔŴ uses the mean B that the global model is scored with); bytes are "
        "the tensors actually sent, summed over clients and rounds. A global accuracy whose interval does not "
        f"clear the majority-class rate of the global test set by {MAJORITY_MARGIN} is marked † \"did not learn\".", ""])


def _seeded_block(ctx: ReportContext, ms: list[str], label: str, figname: str) -> tuple[list[str], dict[str, list[dict]], list[int]]:
    """A partition's (or synthetic level's) table over the seeds every method in ``ms`` finished, each method's
    final rows per seed, and its figure of accuracy over rounds; (lines, rows by method, seeds)."""
    from fedlora.app.report import final_row, plot_comparison, seeded_tables

    seeds = ctx.common_seeds(ms, label)
    if not seeds:
        return [], {}, []
    by = {m: ctx.seeded(m, label) for m in ms}
    results = {m: [final_row(m, by[m][s], summary_row(by[m][s])["wall_s"]) for s in seeds] for m in ms}
    table = seeded_tables(results, seeds, REFERENCE if REFERENCE in results else None, [ctx.rate(label, {s}) for s in seeds])
    figs = ctx.figdir / figname
    figs.mkdir(exist_ok=True)
    plot_comparison({m: [by[m][s] for s in seeds] for m in ms}, figs, majority=ctx.rate(label, set(seeds)))
    return [f"### {label}", "", table, f"![accuracy over rounds, {label}]({ctx.figdir.name}/{figs.name}/accuracy.png)", ""], results, seeds


def _comparison(ctx: ReportContext) -> str:
    L = ["## 1. Method comparison", "",
         "Final-round accuracy; ρ is the mean over rounds and matrices; MB summed over rounds; paired "
         f"differences to `{REFERENCE}`.", ""]
    not_learned, lowest, separated = [], [], []
    for label in ctx.labels:
        ms = [m for m in ctx.methods if ctx.seeded(m, label)]
        block, results, seeds = _seeded_block(ctx, ms, label, f"comparison-{_slug(label)}")
        if not seeds:
            continue
        L += block
        maj = ctx.rate(label, set(seeds))
        not_learned += [f"{m} at {label}" for m in ms if _dagger([r["global_accuracy"] for r in results[m]], maj)]
        worst = min(ms, key=lambda m: _mean(r["global_accuracy"] for r in results[m]))
        lowest.append(f"{label}: lowest `{worst}` {_pm([r['global_accuracy'] for r in results[worst]])} against a "
                      f"majority-class rate of {_f(maj)}")
        if REFERENCE in results:
            ref = [r["global_accuracy"] for r in results[REFERENCE]]
            for m in ms:
                if m != REFERENCE:
                    text = _diff([r["global_accuracy"] for r in results[m]], ref)[2]
                    if _distinct(text):
                        separated.append(f"`{m}` {text} at {label}")
    if lowest:
        ctx.verdicts.append(
            ("- **Every method learned** in every partition (its global accuracy's interval clears the "
             "majority-class rate): " if not not_learned else
             f"- **Did not learn** (†, the interval of global accuracy does not clear the majority-class rate): "
             f"{', '.join(not_learned)}. Lowest per partition: ")
            + "; ".join(lowest) + ".")
        ctx.verdicts.append(
            "- **Methods vs FedIT in global accuracy**: "
            + (("distinguishable at these seeds: " + "; ".join(separated) + "; every other method is not "
                "distinguishable from FedIT.") if separated else
               "no method is distinguishable from FedIT at these seeds in any partition.")
        )
    return "\n".join(L)


def _divergence(ctx: ReportContext) -> str:
    panels = {}
    for label in ctx.labels:
        hs = {m: mean_history(list(ctx.seeded(m, label).values())) for m in DIVERGENCE_METHODS if ctx.seeded(m, label)}
        if hs:
            panels[label] = hs
    if not panels:
        return ""
    n_seeds = max(len(ctx.seeded(m, l)) for l in panels for m in panels[l])
    L = ["## 2. Aggregation divergence over rounds and per layer (FLoRA-NA Figures 2 and 4)", "",
         "After round 1 every method's clients train from a different global model, so each run's ρ is read "
         "against references computed on *that run's own uploads* every round: the Eckart–Young bound "
         f"(dashed in the figures) and FedIT's ρ on the same uploads (`fedit@same`). Curves and tables are "
         f"means over {n_seeds} seeds.", ""]
    fig = fig_divergence_rounds(panels, ctx.figdir / "divergence_rounds.png")
    L += [f"![divergence over rounds]({ctx.rel(fig)})", ""]
    focus = "α=0.5" if "α=0.5" in panels else next(iter(panels))
    fig = fig_divergence_layers(panels[focus], ctx.figdir / "divergence_layers.png", focus)
    L += [f"![divergence per layer]({ctx.rel(fig)})", ""]
    L += _divergence_tables(panels[focus], focus)
    _divergence_reading(ctx)
    return "\n".join(L)


def _divergence_tables(hists: dict[str, list[dict]], focus: str) -> list[str]:
    """Each method's mean ρ (with FedIT's on the same uploads and the bound) per round, then per adapted matrix."""
    ms = list(hists)
    L = [f"Mean ρ per round ({focus}; each method: its ρ / FedIT's ρ on the same uploads / the bound):", "",
         "| round | " + " | ".join(ms) + " |", "|---:|" + "---:|" * len(ms)]
    for i in range(max(len(h) for h in hists.values())):
        cells = []
        for m in ms:
            h = hists[m]
            cells.append(" / ".join(_f(h[i].get(k), 4) for k in ("divergence", "fedit_divergence", "bound")) if i < len(h) else "—")
        L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    L.append("")
    keys = ("divergence_per_layer", "fedit_divergence_per_layer", "bound_per_layer")
    vals = {m: [mean_per_layer(h, key) for key in keys] for m, h in hists.items()}
    L += [f"Mean ρ per adapted matrix over rounds ({focus}; ρ / fedit@same / bound):", "",
          "| layer | module | " + " | ".join(ms) + " |", "|---:|---|" + "---:|" * len(ms)]
    for k in sorted(set().union(*[set(v[0]) for v in vals.values()])):
        L.append(f"| {k[0]} | {k[1]} | " + " | ".join(" / ".join(_f(v.get(k), 4) for v in vals[m]) for m in ms) + " |")
    L.append("")
    return L


def _divergence_reading(ctx: ReportContext) -> None:
    """Claim: FLoRA-NA's divergence is far below FedIT's, layer by layer and round by round. Per seed: the median
    over partitions, rounds and matrices of ρ_florana / ρ_fedit@same, and the share of the room to the bound it
    closes; then the interval over seeds. And `svd`'s ρ is the bound."""
    from fedlora.app.stats import interval

    per_seed: dict[int, tuple[list, list, list]] = {}
    pairs = below = 0
    svd_dev = []
    for label in ctx.labels:
        for seed, hist in ctx.seeded("florana", label).items():
            ratios, closed, bound_ratio = per_seed.setdefault(seed, ([], [], []))
            for h in hist:
                for mod, v in (h.get("divergence_per_layer") or {}).items():
                    ref = (h.get("fedit_divergence_per_layer") or {}).get(mod)
                    bnd = (h.get("bound_per_layer") or {}).get(mod)
                    if ref:
                        pairs += 1
                        below += v <= ref * (1 + 1e-9)
                        ratios.append(v / ref)
                        if bnd is not None:
                            bound_ratio.append(bnd / ref)
                            if ref - bnd > 1e-12:
                                closed.append((ref - v) / (ref - bnd))
        for hist in ctx.seeded("svd", label).values():
            for h in hist:
                for mod, v in (h.get("divergence_per_layer") or {}).items():
                    bnd = (h.get("bound_per_layer") or {}).get(mod)
                    if bnd:
                        svd_dev.append(abs(v - bnd) / bnd)
    if per_seed:
        med = [_median(r) for r, _, _ in per_seed.values()]
        cl = [_median(c) for _, c, _ in per_seed.values()]
        br = [_median(b) for _, _, b in per_seed.values()]
        m_med, h_med = interval(med)
        upper = m_med + (0 if math.isnan(h_med) else h_med)
        ctx.verdicts.append(
            f"- **FLoRA-NA: divergence far below FedIT's, per layer and per round** — "
            f"{'holds' if upper <= 0.5 else 'holds in direction, not in size'}. Over all partitions, rounds "
            f"and matrices ({pairs} cases, {len(per_seed)} seeds), FLoRA-NA's ρ is at or below FedIT's on the "
            f"same uploads in {below} (it cannot be above: it starts from the FedIT point). The median ratio "
            f"ρ_FLoRA-NA / ρ_FedIT is {_pm(med)} over seeds (criterion for 'far below': the interval's upper "
            f"end ≤ 0.5); it closes {_pm([100 * c for c in cl if c is not None], 0)} % of the room between FedIT "
            f"and the Eckart–Young bound, and the bound itself is {_pm(br)} of FedIT's ρ: no rank-r broadcast "
            "can be far below FedIT when the bound is not."
        )
    if svd_dev:
        ctx.verdicts.append(f"- **Rank-r optimum**: `svd`'s ρ equals the Eckart–Young bound in every round, matrix "
                            f"and seed (largest relative difference {max(svd_dev):.1e}), as it must.")


def _similarity_stats(ctx: ReportContext) -> tuple[dict[str, dict[str, dict]], dict[str, dict[int, dict]]]:
    """Per similarity partition of the `fedit` runs' final round: the per-matrix cosines averaged over seeds (for
    the figure), and per seed the mean over matrices of cos A, B, ΔA, ΔB with the count of matrices where cos A > cos B."""
    sims: dict[str, dict[str, dict]] = {}  # mean over seeds, for the figure
    stats: dict[str, dict[int, dict]] = {}  # label → seed → {A, B, dA, dB, more, n}
    for label in ctx.p.similarity:
        by = ctx.seeded("fedit", label)
        if not by:
            continue
        stats[label] = {}
        for seed, h in by.items():
            per = {k: per_layer(h[-1].get(f"similarity_{k}_per_layer")) for k in ("A", "B", "dA", "dB")}
            keys = set(per["A"]) & set(per["B"])
            stats[label][seed] = {k: _mean(per[k].values()) for k in per} | {
                "more": sum(per["A"][k] > per["B"][k] for k in keys), "n": len(keys)}
        last = mean_history([[h[-1]] for h in by.values()])[0]
        sims[label] = {k: per_layer(last.get(f"similarity_{k}_per_layer")) for k in ("A", "B", "dA", "dB")}
    return sims, stats


def _similarity(ctx: ReportContext) -> str:
    sims, stats = _similarity_stats(ctx)
    if not sims:
        return ""
    L = ["## 3. A/B similarity across clients (FedSA-LoRA Figure 2)", "",
         "Mean pairwise cosine similarity across the clients of `fedit` runs, final round, per adapted matrix: "
         "of the factors each client holds after local training (A, B: what FedSA-LoRA plots) and of its "
         "local update in that round (ΔA, ΔB: the factor minus the broadcast every client started from, "
         "which removes what clients share by construction). Figure: means over seeds.", ""]
    fig = fig_similarity(sims, ctx.figdir / "similarity.png")
    L += [f"![A/B similarity]({ctx.rel(fig)})", ""]
    L += ["| partition | seeds | cos A | cos B | cos ΔA | cos ΔB | cos A − cos B (paired) | matrices with cos A > cos B |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, by in stats.items():
        v = list(by.values())
        L.append(f"| {label} | {len(v)} | {_pm(x['A'] for x in v)} | {_pm(x['B'] for x in v)} | {_pm(x['dA'] for x in v)} | "
                 f"{_pm(x['dB'] for x in v)} | {_diff([x['A'] for x in v], [x['B'] for x in v])[2]} | "
                 f"{sum(x['more'] for x in v)} / {sum(x['n'] for x in v)} |")
    L.append("")
    _similarity_reading(ctx, stats)
    return "\n".join(L)


def _similarity_reading(ctx: ReportContext, stats: dict[str, dict[int, dict]]) -> None:
    """FedSA-LoRA's claims: A similar across clients and B client-specific, B more so as heterogeneity grows."""
    all_more = sum(x["more"] for by in stats.values() for x in by.values())
    all_n = sum(x["n"] for by in stats.values() for x in by.values())
    ab = {l: _diff([x["A"] for x in by.values()], [x["B"] for x in by.values()]) for l, by in stats.items()}
    dab = {l: _diff([x["dA"] for x in by.values()], [x["dB"] for x in by.values()]) for l, by in stats.items()}
    ctx.verdicts.append(
        f"- **FedSA-LoRA: A similar across clients, B client-specific** — "
        f"{'holds for the factors' if all_more == all_n else f'holds for the factors in {all_more} of {all_n} matrix-seeds'} "
        "(cos A − cos B per partition: " + ", ".join(f"{l} {t}" for l, (_, _, t) in ab.items())
        + "). For the local updates, cos ΔA − cos ΔB: " + ", ".join(f"{l} {t}" for l, (_, _, t) in dab.items())
        + ". Where the factors differ much more than the updates, the asymmetry comes from the shared random "
        "initialisation of A (B starts at zero), not from what the clients learn."
    )
    ordered = [l for l in ctx.p.similarity if l in stats]
    if len(ordered) >= 2:
        first, last_l = ordered[0], ordered[-1]
        seeds = sorted(set(stats[first]) & set(stats[last_l]))
        mean, _, text = _diff([stats[last_l][s]["B"] for s in seeds], [stats[first][s]["B"] for s in seeds])
        word = ("holds" if _distinct(text) and mean < 0 else
                "not distinguishable at these seeds" if not _distinct(text) else "does not hold here")
        ctx.verdicts.append(
            f"- **FedSA-LoRA: B more client-specific as data gets more heterogeneous** — {word}: mean cos B "
            + " → ".join(f"{l} {_pm(x['B'] for x in stats[l].values())}" for l in ordered)
            + f"; paired change {first} → {last_l}: {text}. ΔB: "
            + " → ".join(f"{l} {_pm(x['dB'] for x in stats[l].values())}" for l in ordered) + "."
        )


def _heterogeneity(ctx: ReportContext) -> str:
    other = ("N=", "synthetic:", "privacy:", "privacy-synthetic:", "instruct", "privacy-instruct")  # the other parts' labels
    order = sorted({r.label for r in ctx.runs if r.method in HETEROGENEITY_METHODS and not r.label.startswith(other)},
                   key=lambda l: float("inf") if l == "IID" else float(l.removeprefix("α=")))
    by_m = {m: {l: ctx.seeded(m, l) for l in order if ctx.seeded(m, l)} for m in HETEROGENEITY_METHODS}
    by_m = {m: v for m, v in by_m.items() if v}
    if not by_m:
        return ""
    L = ["## 4. Accuracy vs heterogeneity (FLoRA-NA Figure 3)", "",
         "Final-round accuracy, mean ± 95 % interval over seeds (error bars in the figure); the dotted line "
         "is the majority-class rate.", ""]
    fig = fig_heterogeneity(by_m, order, ctx.figdir / "heterogeneity.png", {l: ctx.rate(l) for l in order})
    L += [f"![accuracy vs heterogeneity]({ctx.rel(fig)})", ""]
    L += ["| method | " + " | ".join(f"{l} global / local / gap" for l in order) + " |", "|---|" + "---|" * len(order)]
    for m, by in by_m.items():
        cells = []
        for l in order:
            if l not in by:
                cells.append("—")
                continue
            rs = [summary_row(h) for h in by[l].values()]
            mark = _dagger([r["global"] for r in rs], ctx.rate(l))
            cells.append(f"{_pm(r['global'] for r in rs)}{mark} / {_pm(r['local'] for r in rs)} / {_pm(r['gap'] for r in rs)}")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", "Majority-class rate: " + ", ".join(f"{l} {_f(ctx.rate(l))}" for l in order) + ". † did not learn.", ""]
    if "fedit" in by_m and "florana" in by_m:
        _heterogeneity_reading(ctx, by_m, order)
    return "\n".join(L)


def _heterogeneity_reading(ctx: ReportContext, by_m: dict[str, dict[str, dict[int, list[dict]]]], order: list[str]) -> None:
    """FLoRA-NA's claim: a smaller local–global gap and a higher global accuracy than FedIT's under heterogeneity."""
    parts_txt, smaller, better, n = [], 0, 0, 0
    for l in order:
        seeds = sorted(set(by_m["fedit"].get(l, {})) & set(by_m["florana"].get(l, {})))
        if not seeds:
            continue
        fl = [summary_row(by_m["florana"][l][s]) for s in seeds]
        fi = [summary_row(by_m["fedit"][l][s]) for s in seeds]
        dg, _, tg = _diff([r["gap"] for r in fl], [r["gap"] for r in fi])
        da, _, ta = _diff([r["global"] for r in fl], [r["global"] for r in fi])
        n += 1
        smaller += "n.d." not in tg and dg < 0
        better += "n.d." not in ta and da > 0
        parts_txt.append(f"{l}: gap {tg}, global {ta}")
    ctx.verdicts.append(
        "- **FLoRA-NA: closes the local–global gap and raises global accuracy under heterogeneity** — "
        + ("holds" if n and smaller == n else "holds in part" if smaller or better else
           "not supported here (no distinguishable difference)" if n else "no data")
        + f": FLoRA-NA − FedIT, paired per seed ({'; '.join(parts_txt)}). A smaller gap distinguishable "
        f"from FedIT's in {smaller} of {n} partitions, a higher global accuracy in {better} of {n}."
    )


def _scale(ctx: ReportContext) -> str:
    scale: dict[str, dict[int, dict[int, dict]]] = {}  # method → clients → seed → summary_row
    for r in ctx.runs:
        if r.label.startswith("N=") and r.name in ctx.histories:
            scale.setdefault(r.method, {}).setdefault(r.config.clients, {})[r.seed] = summary_row(ctx.histories[r.name])
    if not scale:
        return ""
    p = ctx.p
    rounds = next(r for r in ctx.runs if r.label.startswith("N=")).config.rounds
    L = [f"## 5. Scale: {', '.join(str(n) for n in p.scale_clients)} clients", "",
         f"One pool of {p.scale_pool} examples spread IID over N clients, so each client holds "
         f"{p.scale_pool}/N; about one local epoch per round (local steps = train examples / batch), "
         f"{rounds} rounds, all clients every round; other settings as above. Aggregation "
         "time is the server's `method.aggregate` wall time per round (all adapted matrices).", ""]
    fig = fig_scale(scale, ctx.figdir / "scale.png")
    L += [f"![scale]({ctx.rel(fig)})", "",
          "| clients | method | seeds | global acc | local acc | gap | mean ρ | bound | aggregation s / round | MB up / round |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ns = sorted({n for by in scale.values() for n in by})
    for n in ns:
        for m, by in scale.items():
            if n in by:
                rs = list(by[n].values())
                mark = _dagger([r["global"] for r in rs], ctx.rate(f"N={n}", set(by[n])))
                L.append(f"| {n} | {m} | {len(rs)} | {_pm(r['global'] for r in rs)}{mark} | {_pm(r['local'] for r in rs)} | "
                         f"{_pm(r['gap'] for r in rs)} | {_pm((r['rho'] for r in rs), 4)} | {_pm((r['bound'] for r in rs), 4)} | "
                         f"{_pm((r['agg_s'] for r in rs), 4)} | {_f(_mean(r['mb_up'] for r in rs) / rounds, 2)} |")
    L += ["", "Majority-class rate of the global test set: "
          + ", ".join(f"N={n} {_f(ctx.rate(f'N={n}'))}" for n in ns)
          + ". † did not learn (the interval does not clear it).", ""]
    if "fedit" in scale and "florana" in scale:
        _scale_reading(ctx, scale)
    return "\n".join(L)


def _scale_reading(ctx: ReportContext, scale: dict[str, dict[int, dict[int, dict]]]) -> None:
    """FLoRA-NA at scale: its ρ relative to FedIT's, its server cost and its accuracy difference, per client count."""
    cells = []
    for n in sorted(set(scale["fedit"]) & set(scale["florana"])):
        seeds = sorted(set(scale["fedit"][n]) & set(scale["florana"][n]))
        fl, fi = [scale["florana"][n][s] for s in seeds], [scale["fedit"][n][s] for s in seeds]
        ratio = _pm([r["rho"] / r["rho_fedit"] for r in fl if r["rho_fedit"]])
        cost = _pm([a["agg_s"] / b["agg_s"] for a, b in zip(fl, fi) if a["agg_s"] and b["agg_s"]], 1)
        share = _pm([100 * r["agg_s"] / r["round_s"] for r in fl if r["agg_s"] and r["round_s"]], 1)
        cells.append(f"N={n}: ρ ratio {ratio}, server time {cost}× FedIT's ({share} % of its round), "
                     f"global accuracy FLoRA-NA − FedIT {_diff([r['global'] for r in fl], [r['global'] for r in fi])[2]}")
    ctx.verdicts.append("- **Scale** — FLoRA-NA's ρ relative to FedIT's on the same uploads (mean over rounds), "
                        "its server cost and its accuracy difference, per seed: " + "; ".join(cells) + ".")


def _synthetic(ctx: ReportContext) -> str:
    sp = ctx.p.synthetic
    if sp is None or not any(r.name in ctx.histories for r in ctx.runs if r.label.startswith("synthetic:")):
        return ""
    L = ["## 6. The synthetic task: does less divergence converge better?", "",
         f"Every method shipped, on the teacher–student task of docs/synthetic.md at heterogeneity levels "
         f"{', '.join(sp.levels)} (model α, input β), {len(sp.seeds)} paired seeds. "
         f"Settings: {_settings_line(sp.base).replace(', max 64 tokens', '')}. `loss` is the global "
         "model's cross-entropy on the global test set, `loss − floor` its distance to the Bayes loss of the "
         "teachers." + _overrides_note(sp.overrides, " (see the preset)."),
         ""]
    claim = []
    for label in (f"synthetic:{lv}" for lv in sp.levels):
        ms = [m for m in all_methods() if ctx.seeded(m, label)]
        block, results, seeds = _seeded_block(ctx, ms, label, _slug(label))
        L += block
        if REFERENCE in results:
            claim.append(_synthetic_claim(label, results, len(seeds)))
    if claim:
        ctx.verdicts.append("- **Synthetic task: less divergence, better convergence (FLoRA-NA)?** Paired "
                            "differences to FedIT (negative loss is better): " + " · ".join(claim) + ".")
    return "\n".join(L)


def _synthetic_claim(label: str, results: dict[str, list[dict]], n_seeds: int) -> str:
    """One level's paired differences to FedIT: FLoRA-NA's ρ, loss and accuracy, and which final losses differ."""
    ref = results[REFERENCE]
    better = []
    for m, rows in results.items():
        if m == REFERENCE or "global_loss" not in rows[0]:
            continue
        t = _diff([r["global_loss"] for r in rows], [r["global_loss"] for r in ref])[2]
        if _distinct(t):
            better.append(f"`{m}` {t}")
    fl = results.get("florana")
    return (
        f"{label} ({n_seeds} seeds): "
        + (f"FLoRA-NA − FedIT ρ {_diff([r['divergence'] for r in fl], [r['divergence'] for r in ref])[2]}, "
           f"loss {_diff([r['global_loss'] for r in fl], [r['global_loss'] for r in ref])[2]}, global accuracy "
           f"{_diff([r['global_accuracy'] for r in fl], [r['global_accuracy'] for r in ref])[2]}; " if fl else "")
        + ("final loss distinguishable from FedIT's: " + ", ".join(better) if better else
           "no method's final loss is distinguishable from FedIT's")
    )


def _privacy_level(ctx: ReportContext, method: str, z: float | None) -> dict[int, list[dict]]:
    """seed → history of ``method`` in the privacy part at noise multiplier ``z`` (None: its run without DP)."""
    pv = ctx.p.privacy
    if z is None:
        return ctx.seeded(method, "privacy:none") if dict(pv.overrides).get(method) else ctx.seeded(method, pv.partition[0])
    return ctx.seeded(method, f"privacy:{z:g}")


@dataclass
class _PrivacyTable:
    lines: list[str]
    finals: dict[float | None, dict[str, list[float]]]  # level → method → final global accuracy per seed
    eps: dict[float, list[float]]  # noise level → final ε of every method and seed
    floor: dict[float, set[str]]  # noise level → the methods that did not learn under it (†)


def _privacy_table(ctx: ReportContext, ms: list[str], maj: float | None) -> _PrivacyTable:
    """Final global accuracy (and ε) per method and noise level, without DP first."""
    levels: list[float | None] = [None, *ctx.p.privacy.noises]
    t = _PrivacyTable(["| method | " + " | ".join("no DP" if z is None else f"z = {z:g}" for z in levels) + " |",
                       "|---|" + "---:|" * len(levels)], {}, {}, {})
    for m in ms:
        cells = []
        for z in levels:
            hs = list(_privacy_level(ctx, m, z).values())
            if not hs:
                cells.append("—")
                continue
            accs = t.finals.setdefault(z, {})[m] = [h[-1]["global_accuracy"] for h in hs]
            mark = _dagger(accs, maj)
            if mark and z is not None:
                t.floor.setdefault(z, set()).add(m)
            eps = [h[-1].get("epsilon") for h in hs if h[-1].get("epsilon") is not None]
            if z is not None:
                t.eps.setdefault(z, []).extend(eps)
            cells.append(f"{_pm(accs)}{mark}" + (f" (ε {_f(_mean(eps), 2)})" if eps else ""))
        t.lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return t


def _privacy(ctx: ReportContext) -> str:
    pv, base = ctx.p.privacy, ctx.p.base
    if pv is None:
        return ""
    label = pv.partition[0]
    ms = [m for m in pv.methods if any(_privacy_level(ctx, m, z) for z in (None, *pv.noises))]
    if not ms:
        return ""
    L = ["## 7. Privacy–utility: example-level DP (DP-SGD with Opacus)", "",
         f"Each method trained with DP-SGD on every client (per-example clip C = {pv.clip:g}, noise multiplier z, "
         f"Poisson batches of expected size {base.batch_size}) on the {label} partition, against the same run "
         "without DP. ε is at δ = "
         f"{base.dp_delta:g} from Opacus's {base.dp_accountant.upper()} accountant: each client's own batch "
         "sampling rate and steps, the largest over clients (example-level DP protects one example of one client). "
         "Final-round global accuracy, mean ± 95 % interval over seeds; † did not learn."
         + _overrides_note(pv.overrides, ", with and without DP.", ms),
         ""]
    maj = ctx.rate(label)
    t = _privacy_table(ctx, ms, maj)
    L += t.lines
    L += ["", f"Majority-class rate: {_f(maj)}. ε per noise level (mean over methods and seeds): "
          + ", ".join(f"z = {z:g}: {_f(_mean(e), 2)}" for z, e in t.eps.items()) + ".", ""]
    fig = fig_privacy({m: {z: [h[-1] for h in runs.values()] for z in pv.noises if (runs := _privacy_level(ctx, m, z))} for m in ms},
                      {m: t.finals.get(None, {}).get(m, []) for m in ms}, maj, ctx.figdir / "privacy.png")
    L += [f"![privacy–utility]({ctx.rel(fig)})", ""]
    _privacy_utility_reading(ctx, ms, t, maj)
    if "fedit" in ms and "ffa" in ms:
        _ffa_reading(ctx, t)
    return "\n".join(L)


def _privacy_utility_reading(ctx: ReportContext, ms: list[str], t: _PrivacyTable, maj: float | None) -> None:
    """What DP costs: per noise level, which methods still learn and how much of the no-DP accuracy is left."""
    util = []
    for z in ctx.p.privacy.noises:
        final, out = t.finals.get(z, {}), t.floor.get(z, set())
        if not final:
            continue
        kept = {m: _mean(a) / _mean(base) for m, a in final.items() if (base := t.finals.get(None, {}).get(m)) and _mean(base) > 0}
        util.append(f"z = {z:g} (ε {_f(_mean(t.eps.get(z, [])), 2) if t.eps.get(z) else '—'}): "
                    f"{len(final) - len(out)} of {len(final)} learned"
                    + (f" ({', '.join(f'`{m}`' for m in ms if m in out)} did not)" if out else "")
                    + (f", keeping {_f(min(kept.values()), 2)}–{_f(max(kept.values()), 2)} of their no-DP accuracy" if kept else ""))
    if util:
        ctx.verdicts.append("- **Utility under DP-SGD** (learned: the interval clears the majority-class rate, "
                            f"{_f(maj)}; kept: mean accuracy under DP ÷ without): " + "; ".join(util) + ".")


def _ffa_cells(noises, at: Callable[[str, float | None], dict[int, list[dict]]], floor: dict[float, set[str]], key: str,
               sign: int, ref: float | None = None) -> tuple[list[str], int, int, int]:
    """FFA-LoRA's claim at each noise level, per seed: what DP costs FedIT and FFA in ``key`` against the ``ref``
    level (None: without DP; 0: DP-SGD's clipping without noise, so the cost is the noise's alone), cost =
    sign·(ref − DP): sign +1 for accuracy lost, −1 for loss gained; and FedIT's cost − FFA's with its paired interval
    (positive supports the claim). ``at(method, z)``: seed → history. Returns (cells, levels where the claim holds,
    levels where the contrary holds, levels where FedIT or FFA did not learn under DP)."""
    cells, holds, contrary, floored = [], 0, 0, 0
    for z in noises:
        if z == ref:
            continue
        runs = {(m, zz): at(m, zz) for m in ("fedit", "ffa") for zz in (ref, z)}
        seeds = sorted(set.intersection(*(set(v) for v in runs.values())))
        if not seeds:
            continue
        cost = {m: [sign * (runs[m, ref][s][-1][key] - runs[m, z][s][-1][key]) for s in seeds] for m in ("fedit", "ffa")}
        d, _, text = _diff(cost["fedit"], cost["ffa"])
        holds += _distinct(text) and d > 0
        contrary += _distinct(text) and d < 0
        at_floor = {"fedit", "ffa"} & floor.get(z, set())
        floored += bool(at_floor)
        cells.append(f"z = {z:g} ({len(seeds)} seeds): FedIT {_pm(cost['fedit'])}, FFA {_pm(cost['ffa'])}, difference {text}"
                     + (f" ({' and '.join(sorted(at_floor))} did not learn under DP here: the loss is bounded by the "
                        "majority-class rate, so this level cannot separate them)" if at_floor else ""))
    return cells, holds, contrary, floored


def _ffa_word(n: int, holds: int, contrary: int) -> str:
    return ("holds" if holds == n else "holds at some noise levels" if holds else "does not hold here" if contrary
            else "not distinguishable at these seeds")


def _ffa_reading(ctx: ReportContext, t: _PrivacyTable) -> None:
    """FFA-LoRA's claim: noise on both factors (FedIT) hurts more than on one (FFA, A frozen). Per seed, the loss
    of accuracy DP causes to each, then FedIT's minus FFA's."""
    cells, holds, contrary, floored = _ffa_cells(ctx.p.privacy.noises, lambda m, z: _privacy_level(ctx, m, z), t.floor,
                                                 "global_accuracy", 1)
    if cells:
        ctx.verdicts.append(
            "- **FFA-LoRA: DP noise on both factors hurts more than on one** — " + _ffa_word(len(cells), holds, contrary)
            + " (accuracy lost to DP, per seed; difference = FedIT's loss − FFA's, positive supports the claim): "
            + "; ".join(cells) + "."
            + (f" At {floored} of {len(cells)} noise levels FedIT or FFA did not learn under DP; a test of the "
               "claim that can separate them needs a setting where DP-SGD runs learn (more examples per client, "
               "so a larger batch at the same sampling rate): the privacy-synthetic part." if floored else "")
        )


def _psyn_level(ctx: ReportContext, method: str, z: float | None) -> dict[int, list[dict]]:
    """seed → history of ``method`` in the privacy-synthetic part at noise ``z`` (None: without DP)."""
    ps = ctx.p.privacy_synthetic
    if z is None:
        return ctx.seeded(method, "privacy-synthetic:none") if dict(ps.overrides).get(method) else ctx.seeded(method, f"synthetic:{ps.level}")
    return ctx.seeded(method, f"privacy-synthetic:{z:g}")


def _privacy_synthetic(ctx: ReportContext) -> str:
    """Section 7b: each method under DP-SGD on the synthetic task (accuracy, loss, ε per noise level), and the FFA-LoRA
    claim read on the loss (continuous, no majority-class floor) and on accuracy, with paired intervals."""
    ps = ctx.p.privacy_synthetic
    if ps is None:
        return ""
    levels: list[float | None] = [None, *ps.noises]
    ms = [m for m in ps.methods if any(_psyn_level(ctx, m, z) for z in levels)]
    if not ms:
        return ""
    label = f"synthetic:{ps.level}"
    maj = ctx.rate(label)
    L = ["## 7b. FFA-LoRA's claim where DP-SGD learns: the synthetic task", "",
         f"Each method on the synthetic task at {label} with DP-SGD on every client (per-example clip C = {ps.clip:g}, noise "
         f"multiplier z, Poisson batches of expected size {ps.base.batch_size}) and without DP, {len(ps.seeds)} paired seeds"
         + (" (z = 0: DP-SGD's clipping and Poisson batches without noise, no privacy: the reference that isolates the noise)"
            if 0.0 in ps.noises else "") + ". "
         f"Settings: {_settings_line(ps.base).replace(', max 64 tokens', '')}. ε at δ = {ps.base.dp_delta:g} (Opacus RDP, "
         "the largest over clients). Final round, mean ± 95 % interval over seeds; † did not learn (accuracy)."
         + _overrides_note(ps.overrides, ", with and without DP.", ms), "",
         "| method | " + " | ".join("no DP" if z is None else f"z = {z:g}" for z in levels) + " |", "|---|" + "---:|" * len(levels)]
    floor: dict[float, set[str]] = {}
    eps: dict[float, list[float]] = {}
    for m in ms:
        cells = []
        for z in levels:
            finals = [h[-1] for h in _psyn_level(ctx, m, z).values()]
            if not finals:
                cells.append("—")
                continue
            accs = [f["global_accuracy"] for f in finals]
            if _dagger(accs, maj) and z is not None:
                floor.setdefault(z, set()).add(m)
            if z is not None:
                eps.setdefault(z, []).extend(f["epsilon"] for f in finals if f.get("epsilon") is not None)
            loss = [f["global_loss"] for f in finals if f.get("global_loss") is not None]
            cells.append(f"acc {_pm(accs)}{_dagger(accs, maj)}" + (f", loss {_pm(loss)}" if loss else ""))
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", f"Majority-class rate: {_f(maj)}. ε per noise level (mean over methods and seeds): "
          + ", ".join(f"z = {z:g}: {_f(_mean(e), 2)}" for z, e in eps.items() if e) + ".", ""]
    noisy = [z for z in ps.noises if z > 0]
    clip_only = {m: [h[-1]["global_loss"] for h in _psyn_level(ctx, m, 0.0).values()] for m in ms} if 0.0 in ps.noises else {}
    fig = fig_privacy({m: {z: [h[-1] for h in runs.values()] for z in noisy if (runs := _psyn_level(ctx, m, z))} for m in ms},
                      clip_only, None, ctx.figdir / "privacy_synthetic.png", key="global_loss",
                      ylabel="global loss" + (" (dotted: clipping alone, z = 0)" if clip_only else ""))
    L += [f"![loss against ε on the synthetic task]({ctx.rel(fig)})", ""]
    if "fedit" in ms and "ffa" in ms:
        _psyn_reading(ctx, floor, L)
    return "\n".join(L)


def _psyn_reading(ctx: ReportContext, floor: dict[float, set[str]], L: list[str]) -> None:
    """The verdict on FFA-LoRA's claim from the loss DP adds (primary: continuous, no majority-class floor) and the
    accuracy it takes. With a clip-only level (z = 0) in the plan the primary reading is against it: DP-SGD's
    clipping alone also costs each method, differently, and the claim is about the noise."""
    at = lambda m, z: _psyn_level(ctx, m, z)  # noqa: E731
    noises = ctx.p.privacy_synthetic.noises
    ref = 0.0 if 0.0 in noises else None
    against = "DP-SGD's clipping alone (z = 0)" if ref == 0.0 else "no DP"
    loss_cells, holds, contrary, _ = _ffa_cells(noises, at, {}, "global_loss", -1, ref)
    acc_cells, acc_holds, acc_contrary, floored = _ffa_cells(noises, at, floor, "global_accuracy", 1, ref)
    if not loss_cells:
        return
    word = _ffa_word(len(loss_cells), holds, contrary)
    L += [f"FFA-LoRA's claim (noise on both factors costs more than on B alone), read against {against}: **{word}** on the loss.", "",
          f"Loss added by the noise (per seed, against {against}; difference = FedIT's − FFA's, positive supports the claim): "
          + "; ".join(loss_cells) + ".", "", "Accuracy lost: " + "; ".join(acc_cells) + ".", ""]
    if ref is not None:
        total, _, _, _ = _ffa_cells(noises, at, {}, "global_loss", -1, None)
        L += ["Loss added by DP-SGD as a whole (clipping and noise, against no DP): " + "; ".join(total) + ".", ""]
    head, ahead = _psyn_head_to_head(at, [None, *noises])
    L += ["Which is better at each level, the question a user choosing between them asks (FedIT − FFA, paired per seed; "
          "accuracy higher and loss lower favour FedIT): " + "; ".join(head) + ".", ""]
    ctx.verdicts.append(
        f"- **FFA-LoRA's claim where DP-SGD learns (synthetic task)** — {word} on the loss the noise adds (against {against}: "
        + "; ".join(loss_cells) + "); on accuracy " + _ffa_word(len(acc_cells), acc_holds, acc_contrary)
        + (f" ({floored} of {len(acc_cells)} levels with FedIT or FFA at the majority-class floor)" if floored else "")
        + f"; in absolute terms FedIT's final accuracy is above FFA's at {ahead['FedIT']} of {ahead['levels']} DP-SGD levels and below at "
        f"{ahead['FFA']} (paired intervals that clear 0).")


def _psyn_head_to_head(at, levels) -> tuple[list[str], dict[str, int]]:
    """FedIT's final accuracy and loss minus FFA's, paired per seed, at each level (None: without DP); and, over the DP
    levels both ran, at how many each one's accuracy is ahead with an interval that clears 0."""
    from fedlora.app.stats import distinguishable

    cells, ahead = [], {"FedIT": 0, "FFA": 0, "levels": 0}
    for z in levels:
        fedit, ffa = at("fedit", z), at("ffa", z)
        seeds = sorted(set(fedit) & set(ffa))
        if not seeds:
            continue
        diffs = [_diff([fedit[s][-1][k] for s in seeds], [ffa[s][-1][k] for s in seeds]) for k in ("global_accuracy", "global_loss")]
        cells.append(f"{'no DP' if z is None else f'z = {z:g}'} ({len(seeds)} seeds): accuracy {diffs[0][2]}, loss {diffs[1][2]}")
        mean, half = diffs[0][:2]
        if z is not None:
            ahead["levels"] += 1
            if distinguishable(mean, half):
                ahead["FedIT" if mean > 0 else "FFA"] += 1
    return cells, ahead


def _instruct(ctx: ReportContext) -> str:
    """The instruction-tuning track: each method's held-out task score and benchmark scores after the last round,
    their paired change from the base model's (the reference row every run records), and the constant-answer floor
    (a score whose interval does not clear it shows an answer prior learned, not the task)."""
    from fedlora.app.report import MAJORITY_MARGIN

    label = "instruct"
    ms = [m for m in (ctx.p.instruct.methods if ctx.p.instruct else ()) if ctx.seeded(m, label)]
    if not ms:
        return ""
    cfg = next(r.config for r in ctx.runs if r.label == label)
    keys = _instruct_keys(ctx, ms, label)
    floors = _instruct_floors(ctx, cfg, label)
    L = ["## 8. Instruction tuning across tasks", "",
         f"`--task instruct`: {cfg.model} on `{cfg.data}`, {cfg.clients} clients ({cfg.partition}, split by "
         f"{cfg.attribute}), {cfg.rounds} rounds × {cfg.local_steps} local steps, batch {cfg.batch_size}, lr {cfg.lr}; "
         f"benchmarks `{cfg.eval or 'none'}`. Scores after the last round; Δ is the paired per-seed change from the base "
         "model's score before any training (the reference row, the same for every method of a seed).", "",
         f"`heldout/exact`: every held-out test example of every task (the global test set, {cfg.test_examples} examples) "
         f"answered greedily in at most {cfg.max_new_tokens} new tokens and judged by its task's own answer rule (the Evals "
         "registry's match, includes or fuzzy match); `local`: each client's own model on its own tasks' local test "
         "examples. A benchmark's `acc` is lm-evaluation-harness's multiple-choice accuracy (the choice of highest "
         "log-likelihood), 0-shot, on a seeded subset of the size given.", "",
         "*Constant answer* is the floor of each score on the same examples: for the held-out tasks, every example "
         "answered with its task's most frequent answer; for a multiple-choice benchmark, always the position most often "
         "right (e.g. always \"A\"). † marks a score whose interval (its value, with one seed) does not clear the floor "
         f"by {MAJORITY_MARGIN}, paired per seed: that model shows an answer prior, not knowledge of the task.", "",
         "| method | seeds | " + " | ".join(f"{k} | Δ {k}" for k in keys) + " | local |",
         "|---|---:|" + "---:|---:|" * len(keys) + "---:|"]
    base_row, floor_row = None, None
    for m in ms:
        hs = ctx.seeded(m, label)
        refs = {s: h[-1].get("reference", {}) for s, h in hs.items()}
        cells = []
        for k in keys:
            after = {s: h[-1].get(k, math.nan) for s, h in hs.items()}
            cells += [_pm(after.values()) + _floor_mark(after, floors, k), _diff(after.values(), [refs[s].get(k, math.nan) for s in hs])[2]]
        L.append(f"| {m} | {len(hs)} | " + " | ".join(cells) + f" | {_pm(h[-1]['local_accuracy'] for h in hs.values())} |")
        if base_row is None:
            base_row = ["base model", str(len(refs))] + [c for k in keys for c in (
                _pm(r.get(k, math.nan) for r in refs.values()) + _floor_mark({s: r.get(k, math.nan) for s, r in refs.items()}, floors, k), "")] + ["—"]
            floor_row = ["*constant answer*", str(len(refs))] + [c for k in keys for c in (
                _pm(floors.get(s, {}).get(k, math.nan) for s in refs), "")] + ["—"]
    L += ["| " + " | ".join(base_row) + " |", "| " + " | ".join(floor_row) + " |", ""]
    _instruct_verdicts(ctx, ms, label, floors)
    return "\n".join(L)


def _instruct_floors(ctx: ReportContext, cfg, label: str) -> dict[int, dict[str, float]]:
    """seed → the constant-answer floor of every score (``heldout/exact`` and each benchmark's headline) at that seed."""
    from fedlora.app.benchmarks import constant_answer_rates

    out: dict[int, dict[str, float]] = {}
    for r in ctx.runs:
        if r.label == label and r.seed not in out and ctx.rates.get(r.name) is not None:
            out[r.seed] = {"heldout/exact": ctx.rates[r.name]} | (constant_answer_rates(cfg.eval, seed=r.seed) if cfg.eval else {})
    return out


def _clears(values: dict[int, float], floors: dict[int, dict[str, float]], key: str) -> bool | None:
    """Whether the scores clear their seeds' floors: the paired interval's lower end (the value, with one seed) is above
    ``MAJORITY_MARGIN``; None when a seed has no floor for ``key``."""
    from fedlora.app.report import MAJORITY_MARGIN
    from fedlora.app.stats import interval

    if not values or any(key not in floors.get(s, {}) for s in values):
        return None
    mean, half = interval([v - floors[s][key] for s, v in values.items()])
    return mean - (0.0 if math.isnan(half) else half) > MAJORITY_MARGIN


def _floor_mark(values: dict[int, float], floors: dict[int, dict[str, float]], key: str) -> str:
    return " †" if _clears(values, floors, key) is False else ""


def _instruct_verdicts(ctx: ReportContext, ms: list[str], label: str, floors: dict[int, dict[str, float]]) -> None:
    moved = [m for m in ms if _instruct_moved(ctx, m, label)]
    why = ("the paired Δ interval of heldout/exact clears 0" if moved else
           "no paired Δ interval of heldout/exact clears 0: fine-tuning did not measurably help at these settings")
    ctx.verdicts.append(f"- **Instruction tuning moves held-out task scores above the base model's**: "
                        f"{', '.join(moved) if moved else 'no method'} of {len(ms)} ({why}).")
    if not floors:
        return
    cleared = [m for m in ms if _clears({s: h[-1]["heldout/exact"] for s, h in ctx.seeded(m, label).items()}, floors, "heldout/exact")]
    ctx.verdicts.append(
        "- **… and above the constant-answer floor (each task's most frequent answer)**: "
        + (f"{', '.join(cleared)} of {len(ms)}." if cleared else
           f"no method of {len(ms)}: the held-out scores do not clear the score of answering every example with its "
           "task's most frequent answer, so what fine-tuning taught here is the answer prior (the format and the "
           "likeliest answer), not the tasks; these settings cannot rank the methods on task knowledge."))


def _instruct_keys(ctx: ReportContext, ms: list[str], label: str) -> list[str]:
    """heldout/exact, then each benchmark's headline score (acc, exact), in a stable order."""
    final = next(iter(ctx.seeded(ms[0], label).values()))[-1]
    heads = sorted(k for k in final if isinstance(final[k], float) and k.count("/") == 1 and k.split("/")[1] in ("acc", "exact")
                   and not k.startswith("heldout/"))
    return ["heldout/exact", *heads]


def _instruct_moved(ctx: ReportContext, m: str, label: str) -> bool:
    from fedlora.app.stats import distinguishable, paired

    hs = list(ctx.seeded(m, label).values())
    mean, half = paired([h[-1]["heldout/exact"] for h in hs], [h[-1].get("reference", {}).get("heldout/exact", math.nan) for h in hs])
    return not math.isnan(half) and mean > 0 and distinguishable(mean, half)


def _privacy_instruct(ctx: ReportContext) -> str:
    """Section 8b, in its own module (:func:`fedlora.app.study_privacy_instruct.section`)."""
    from fedlora.app.study_privacy_instruct import section

    return section(ctx)


def _systems(ctx: ReportContext) -> str:
    """Section 9, in its own module (:func:`fedlora.app.study_systems.section`)."""
    from fedlora.app.study_systems import section

    return section(ctx)


def _reading(ctx: ReportContext) -> str:
    if not ctx.verdicts:
        return ""
    return "\n".join(["## Reading: which claims hold here", "",
                      "Computed from the tables above with the stated criteria (every interval 95 %, over the seeds shown); "
                      "a small model and short training, so a difference the intervals do not resolve is not evidence either way.",
                      "", *ctx.verdicts, ""])


# The report's sections in the order of the study's parts; a section whose part was not asked for is left out.
# The first three and the last belong to no part and are always written (the last reads what the others concluded).
SECTIONS: tuple[tuple[str, Callable[[ReportContext], str]], ...] = (
    ("preamble", _preamble),
    ("run time", _run_time),
    ("protocol", _protocol),
    ("comparison", _comparison),
    ("divergence", _divergence),
    ("similarity", _similarity),
    ("heterogeneity", _heterogeneity),
    ("scale", _scale),
    ("synthetic", _synthetic),
    ("privacy", _privacy),
    ("privacy-synthetic", _privacy_synthetic),
    ("instruct", _instruct),
    ("privacy-instruct", _privacy_instruct),
    ("systems", _systems),
    ("reading", _reading),
)


def write_report(
    p: Preset,
    runs: list[StudyRun],
    histories: dict[str, list[dict]],
    report: Path,
    *,
    command: str,
    parts: tuple[str, ...] = PARTS,
    methods: tuple[str, ...] = COMPARISON_METHODS,
) -> Path:
    """Write the markdown report and its PNGs (``<report dir>/<report stem>/``); return the report path.

    Every number is the mean over the seeds a run finished for, with the half-width of its 95 % Student-t interval;
    every comparison between methods is a per-seed (paired) difference with its interval. One function per section
    (:data:`SECTIONS`), each returning its markdown ("" when it has nothing to show)."""
    report = Path(report)
    figdir = report.parent / report.stem
    figdir.mkdir(parents=True, exist_ok=True)
    ctx = ReportContext.of(p, runs, histories, command=command, parts=parts, methods=methods, figdir=figdir)
    texts = [section(ctx) for part, section in SECTIONS if part in parts or part not in PARTS]
    report.write_text("\n".join(t for t in texts if t) + "\n")
    return report


README_START, README_END = "<!-- study table: generated by `fedlora study --readme` -->", "<!-- end of study table -->"


def readme_table(p: Preset, runs: list[StudyRun], histories: dict[str, list[dict]], *, command: str,
                 methods: tuple[str, ...] = COMPARISON_METHODS) -> str:
    """The comparison in one table for the README: final global accuracy per method and partition, mean ± 95 %
    interval over the seeds, (n.d.) where its paired difference to FedIT's holds 0, † where it did not learn; then
    the majority-class rate per partition."""
    ctx = ReportContext.of(p, runs, histories, command=command, methods=methods)
    by = {(m, label): {s: h[-1]["global_accuracy"] for s, h in ctx.seeded(m, label).items()}
          for m in methods for label in ctx.labels}
    by = {k: v for k, v in by.items() if v}
    n = max((len(v) for v in by.values()), default=0)
    majority = {label: ctx.rate(label) for label in ctx.labels}
    lines = [f"Final global accuracy, mean ± 95 % t-interval over {n} paired seeds (`{command}`; {_settings_line(p.base)}). "
             f"(n.d.): not distinguishable from `{REFERENCE}` (its per-seed difference's interval holds 0); "
             "†: did not learn (the interval does not clear the majority-class rate).", "",
             "| method | " + " | ".join(ctx.labels) + " |", "|---|" + "---:|" * len(ctx.labels)]
    for m in methods:
        cells = []
        for label in ctx.labels:
            vals = by.get((m, label), {})
            if not vals:
                cells.append("—")
                continue
            seeds = sorted(vals)
            cell = _pm([vals[s] for s in seeds]) + _dagger([vals[s] for s in seeds], majority[label])
            ref = by.get((REFERENCE, label), {})
            common = [s for s in seeds if s in ref]
            if m != REFERENCE and len(common) > 1 and "n.d." in _diff([vals[s] for s in common], [ref[s] for s in common])[2]:
                cell += " (n.d.)"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| *majority-class rate* | " + " | ".join(_f(majority[label]) for label in ctx.labels) + " |")
    return "\n".join(lines) + "\n"


def replace_readme_table(text: str, table: str) -> str:
    if README_START not in text or README_END not in text:
        raise ValueError(f"the README has no study-table markers; add the lines {README_START!r} and {README_END!r} where the table goes")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{table}{README_END}{tail}"
