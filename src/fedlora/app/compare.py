"""Several methods on the same data, partition and seeds (``fedlora compare``, ``fedlora.compare``).

Finished runs in the comparison's directory are read back and interrupted ones resumed, so a cut-short comparison,
or one with methods added, redoes no finished work. With ``seeds``, seed s gives every method the same partition,
initial adapter, client sampling and batch order, and the table shows 95 % intervals and paired differences to the
reference method. With ``track``, the comparison is one tracker group (:class:`fedlora.app.tracking.Group`): an
MLflow parent run with a child run per method and seed, one W&B group, a TensorBoard directory per run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.app import experiment
from fedlora.app.build import majority_rate
from fedlora.app.config import RunConfig
from fedlora.app.tracking import Group, artifacts


@dataclass
class Comparison:
    """What a comparison wrote: its directory, its markdown table, and per method the final rows and histories
    (one per seed, in the order of ``seeds``)."""

    out: Path
    table: str
    seeds: list[int]
    results: dict[str, list[dict]] = field(default_factory=dict)
    histories: dict[str, list[list[dict]]] = field(default_factory=dict)


def method_list(methods: str | Sequence[str]) -> list[str]:
    """``--methods``: registered names, each once, at least one; checked before anything trains."""
    from fedlora.federation import method_names

    text = methods if isinstance(methods, str) else ",".join(methods)
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods {text!r} names no method; pass a comma-separated list, e.g. --methods fedit,florana")
    for m in names:
        if m not in method_names():
            raise ValueError(f"unknown method {m!r} in --methods; choose from {', '.join(method_names())}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"--methods names {', '.join(twice)} more than once; list each method once")
    return names


def plan(base: RunConfig, methods: Sequence[str], seeds: Sequence[int] | None, out: Path) -> list[tuple[str, int, RunConfig]]:
    """(method, seed, settings) of every run, each validated: every bad input is reported before the first trains.
    Each method's run gets only its own method options (an option of a method not compared is refused)."""
    from fedlora.app.build import check_methods_on_model
    from fedlora.app.study import check_run_configs
    from fedlora.federation.protocol import check_option_owners, options_of

    check_option_owners(base.method_options, list(methods))
    paired = seeds is not None
    runs = [(m, s, base.replace(method=m, seed=s, method_options=options_of(m, base.method_options),
                                out=str(out / m / f"seed-{s}" if paired else out / m)))
            for m in methods for s in (seeds if paired else [base.seed])]
    from fedlora.app.systems import check_simulated

    for _, _, c in runs:
        c.validate()
        check_simulated(c)
    check_run_configs([c for _, _, c in runs], "--out")
    first = {}
    for m, _, c in runs:
        first.setdefault(m, c)
    check_methods_on_model(list(first.values()))  # what only the model can tell (RAVAN's heads × rank), before any training
    return runs


def compare(base: RunConfig, methods: str | Sequence[str], *, seeds: Sequence[int] | None = None, reference: str | None = None,
            out: str | Path | None = None, watch: Callable[[str, RunConfig], contextlib.AbstractContextManager] | None = None,
            target_accuracy: float | None = None) -> Comparison:
    """Run each of ``methods`` with ``base``'s other settings and write ``comparison.md`` and its plots into ``out``.

    ``seeds``: paired seeds (the table then has intervals and paired differences to ``reference``); None: ``base.seed``
    alone. ``reference``: one of ``methods`` (another is refused in one line); None: fedit when it is compared, else
    no paired differences. ``watch(label, config)``: a context manager per run whose ``client``, ``round`` and ``work`` attributes (any
    may be missing) receive the run's progress, as the CLI's progress bar does. ``target_accuracy``: the accuracy whose
    time and bytes to reach are reported (:mod:`fedlora.app.targets`; None: 0.9 × central's when central is compared)."""
    from fedlora.app.targets import check_target

    check_target(target_accuracy)
    methods = method_list(methods)
    out = Path(out or base.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"))
    paired = seeds is not None
    seed_list = list(seeds) if paired else [base.seed]
    if reference is None:
        reference = "fedit" if "fedit" in methods else None
    elif reference not in methods:
        raise ValueError(f"--reference {reference} is not one of the compared methods ({', '.join(methods)}); "
                         f"pass one of them, or add {reference} to --methods")
    runs = plan(base, methods, seeds, out)
    majority = [majority_rate(base.replace(seed=s)) for s in seed_list]
    shared = {k: v for k, v in base.to_dict().items() if k not in ("method", "out", "seed", "track", "mlflow_uri")}
    with Group(base.track, out, mlflow_uri=base.mlflow_uri, kind="comparison",
               params=shared | {"methods": ",".join(methods), "seeds": ",".join(map(str, seed_list))}) as group:
        result = _run_all(runs, out, paired, seed_list, reference, majority, json.dumps(shared), watch, group, target_accuracy)
        group.finish(artifacts(out))
    return result


def _run_all(runs, out: Path, paired: bool, seed_list: list[int], reference, majority, settings: str, watch, group,
             target_accuracy: float | None) -> Comparison:
    """Every run of the comparison in turn, ``comparison.md`` rewritten after each, then the plots."""
    from fedlora.app.report import PROTOCOL, final_row, markdown_table, plot_comparison, plot_tradeoff, seeded_tables

    result = Comparison(out, "", seed_list)
    for method, seed, cfg in runs:
        label = f"{method} (seed {seed})" if paired else method
        history = _one_run(cfg, label, watch, group)
        # wall s: the rounds' own wall time, the same whether a run was made now, resumed or read back
        result.results.setdefault(method, []).append(final_row(method, history, sum(m["wall_seconds"] for m in history)))
        result.histories.setdefault(method, []).append(history)
        if paired:
            result.table = seeded_tables(result.results, seed_list, reference, majority)
        else:
            result.table = markdown_table([rows[0] for rows in result.results.values()], majority[0])
        (out / "comparison.md").write_text(
            f"# fedlora compare\n\n{result.table}\nSettings: {settings}, seed{'s' if paired else ''} "
            f"{', '.join(map(str, seed_list))}\n\n{PROTOCOL}\n"
        )
    rates = [m for m in majority if m is not None]
    plot_comparison(result.histories if paired else {m: h[0] for m, h in result.histories.items()}, out,
                    majority=sum(rates) / len(rates) if rates else None)
    plot_tradeoff(result.results, out, majority=sum(rates) / len(rates) if rates else None)
    _targets(result, target_accuracy)
    return result


def _targets(result: Comparison, target: float | None) -> None:
    """Time-to-target and bytes-to-target under the table (given a target, or central's to take it from), and the
    accuracy-against-simulated-time plot when the runs have a clock."""
    from fedlora.app.targets import default_target, plot_accuracy_time, target_table

    how = "--target-accuracy"
    if target is None:
        target, how = default_target(result.histories), "0.9 × central's final global accuracy"
    plot_accuracy_time(result.histories, result.out, target)
    if target is None:
        return
    section = target_table(result.histories, target, how)
    result.table += "\n" + section
    path = result.out / "comparison.md"
    head, sep, tail = path.read_text().partition("\nSettings: ")
    path.write_text(head + "\n" + section + sep + tail)


def _one_run(cfg: RunConfig, label: str, watch, group: Group | None = None) -> list[dict]:
    """A finished run read back (a compare that was cut short, or one with fewer methods), an interrupted one resumed,
    or a new one made."""
    with (watch(label, cfg) if watch else contextlib.nullcontext()) as w:
        history, read_back = experiment.run_or_resume(cfg, group, on_client=getattr(w, "client", None), on_round=getattr(w, "round", None),
                                                      on_progress=getattr(w, "work", None))
    if read_back:
        print(f"{label}: finished run read back from {cfg.out}")
    return history
