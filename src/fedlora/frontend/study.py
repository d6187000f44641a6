"""The papers' analyses as one reproducible command (front end): ``fedlora study``.

Five analyses, each a set of ordinary runs (every one a normal run directory with ``metrics.jsonl``) and a
section of one generated report:

1. comparison: all methods on the offline default under Dirichlet α ∈ {0.1, 0.5} and IID;
2. divergence over rounds and per layer: ``fedit`` vs ``florana`` vs ``svd`` vs the Eckart–Young bound
   (FLoRA-NA Figures 2 and 4), read from the comparison runs;
3. A/B cosine similarity per layer under IID, α = 1 and α = 0.5 (FedSA-LoRA Figure 2), from ``fedit`` runs;
4. accuracy vs heterogeneity α for ``fedit``, ``fedsa``, ``florana`` (FLoRA-NA Figure 3);
5. scale: 10, 50, 100 clients for ``fedit`` and ``florana`` over one fixed pool of examples.

Runs are shared between analyses, skipped when already finished and resumed when interrupted, so a killed
study loses at most the round in progress. Every number in the report is read from those runs' metrics; the
reading of the papers' claims is computed from them with the criteria stated next to each verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlora.frontend.experiment import RunConfig

PARTS = ("comparison", "divergence", "similarity", "heterogeneity", "scale")
PRESETS = ("default", "quick")
# The analyses of the FLoRA-NA and FedSA-LoRA papers, over the methods they compare (a study design, not dispatch).
COMPARISON_METHODS = ("fedit", "ffa", "fedsa", "flora", "fedex", "florana", "svd")
DIVERGENCE_METHODS = ("fedit", "florana", "svd")
HETEROGENEITY_METHODS = ("fedit", "fedsa", "florana")
SCALE_METHODS = ("fedit", "florana")


@dataclass(frozen=True)
class Preset:
    """The knobs that size the study. ``default`` fits about an hour on 2 CPU cores with MiniLM."""

    base: RunConfig
    comparison: tuple[tuple[str, str, float], ...]  # (label, partition, alpha)
    extra_alphas: tuple[float, ...]  # heterogeneity points beyond the comparison's partitions
    similarity: tuple[str, ...]  # partition labels of the A/B similarity analysis
    scale_clients: tuple[int, ...]
    scale_pool: int  # examples (train + local test) spread over the clients of a scale run
    scale_rounds: int


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    partitions = (("α=0.1", "dirichlet", 0.1), ("α=0.5", "dirichlet", 0.5), ("IID", "iid", 0.5))
    if name == "default":
        base = RunConfig(
            model="minilm", data="tweets", clients=10, rounds=5, local_steps=4, batch_size=16, lr=3e-3,
            examples_per_client=128, test_examples=300, max_length=48, similarity=True, seed=0,
        )
        return Preset(base, partitions, (1.0,), ("IID", "α=1", "α=0.5"), (10, 50, 100), 1280, 3)
    base = RunConfig(
        model="tiny:bert", data="tweets", clients=3, rounds=2, local_steps=2, batch_size=8, lr=5e-3, rank=4,
        examples_per_client=40, test_examples=60, max_length=32, similarity=True, seed=0, device="cpu",
    )
    return Preset(base, partitions, (1.0,), ("IID", "α=1", "α=0.5"), (3, 6), 96, 2)


@dataclass(frozen=True)
class StudyRun:
    name: str
    label: str  # partition label, e.g. "α=0.5", or "N=50" for scale runs
    config: RunConfig


def _label(partition: str, alpha: float) -> str:
    return "IID" if partition == "iid" else f"α={alpha:g}"


def plan(p: Preset, *, methods: tuple[str, ...] = COMPARISON_METHODS, parts: tuple[str, ...] = PARTS) -> list[StudyRun]:
    """Every run the requested parts need, each once, cheapest-to-reuse first."""
    runs: dict[str, StudyRun] = {}

    def add(method: str, partition: str, alpha: float, **over) -> None:
        label = _label(partition, alpha)
        name = f"{method}-{label.replace('α=', 'alpha').replace('IID', 'iid')}"
        if "clients" in over:
            name, label = f"{method}-scale{over['clients']}", f"N={over['clients']}"
        if name not in runs:
            cfg = dataclasses.replace(p.base, method=method, partition=partition, alpha=alpha, **over)
            runs[name] = StudyRun(name, label, cfg)

    comparison = {label: (part, alpha) for label, part, alpha in p.comparison}
    extra = {f"α={a:g}": ("dirichlet", a) for a in p.extra_alphas}
    if "comparison" in parts:
        for _name, (part, alpha) in comparison.items():
            for m in methods:
                add(m, part, alpha)
    if "divergence" in parts:
        for _name, (part, alpha) in comparison.items():
            for m in DIVERGENCE_METHODS:
                add(m, part, alpha)
    if "heterogeneity" in parts:
        for _name, (part, alpha) in (comparison | extra).items():
            for m in HETEROGENEITY_METHODS:
                add(m, part, alpha)
    if "similarity" in parts:
        for label in p.similarity:
            known = comparison | extra
            if label not in known:
                raise ValueError(f"similarity partition {label!r} is neither in the comparison nor an extra α of the preset")
            add("fedit", *known[label])
    if "scale" in parts:
        for n in p.scale_clients:
            per_client = max(2, p.scale_pool // n)
            train = max(1, round(per_client * (1 - p.base.local_test_fraction)))
            steps = max(1, round(train / p.base.batch_size))  # about one local epoch per round
            for m in SCALE_METHODS:
                add(m, "dirichlet", 0.5, clients=n, examples_per_client=per_client, local_steps=steps, rounds=p.scale_rounds)
    return list(runs.values())


# ---------------------------------------------------------------------------------------------------------
# Running


def finished_history(out: Path, cfg: RunConfig) -> list[dict] | None:
    path = out / "metrics.jsonl"
    if not (out / "summary.md").exists() or not path.exists():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return history if len(history) >= cfg.rounds else None


def same_settings(out: Path, cfg: RunConfig) -> bool:
    saved = json.loads((out / "config.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    mine = dataclasses.asdict(cfg)
    # a setting added to RunConfig after the run was made counts as its default
    return all(saved.get(k, defaults.get(k)) == v for k, v in mine.items() if k != "out")


def execute(
    runs: list[StudyRun],
    runs_dir: Path,
    *,
    on_start: Callable[[int, StudyRun], None] | None = None,
    on_client: Callable | None = None,
    on_round: Callable | None = None,
) -> dict[str, list[dict]]:
    """Run what is missing (finished runs are read back, interrupted ones resumed); return name → history."""
    from fedlora.frontend.experiment import release_run_lock, run_experiment

    check_runs_dir(runs, runs_dir)
    histories: dict[str, list[dict]] = {}
    for i, run in enumerate(runs):
        out = runs_dir / run.name
        cfg = dataclasses.replace(run.config, out=str(out))
        done = finished_history(out, cfg)
        if done is not None:
            histories[run.name] = done
            continue
        if not _claim(out):
            continue  # another `fedlora study` process on the same --runs directory is running it
        try:
            if on_start:
                on_start(i, run)
            resume = (out / "checkpoint.safetensors").exists()
            if not resume and (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()  # killed before its first checkpoint: nothing to keep
            _, histories[run.name] = run_experiment(cfg, on_client=on_client, on_round=on_round, resume=resume)
        finally:
            release_run_lock(out)
    return histories


def _claim(out: Path) -> bool:
    """Take a run directory for this process (:func:`~fedlora.frontend.experiment.take_run_lock`); False if a live
    process holds it. So several `fedlora study` processes on one --runs directory share the work without overlap."""
    from fedlora.frontend.experiment import take_run_lock

    out.mkdir(parents=True, exist_ok=True)
    return take_run_lock(out) is not False


def check_runs_dir(runs: list[StudyRun], runs_dir: Path) -> None:
    """Refuse, before any work, a runs directory whose runs were made with other settings."""
    for run in runs:
        out = runs_dir / run.name
        if (out / "config.json").exists() and not same_settings(out, dataclasses.replace(run.config, out=str(out))):
            raise ValueError(
                f"{str(out)!r} holds a run with other settings; pass another --runs directory or delete that run"
            )


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
          "ffa": "tab:purple", "flora": "tab:brown", "fedex": "tab:pink"}


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


def fig_heterogeneity(rows: dict[str, dict[str, dict]], order: list[str], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for ax, key, title in ((axes[0][0], "global", "global accuracy"), (axes[0][1], "local", "local accuracy")):
        for m, by_label in rows.items():
            xs = [l for l in order if l in by_label]
            ax.plot(xs, [by_label[l][key] for l in xs], marker="o", label=m, color=COLORS.get(m))
        ax.set_title(title)
        ax.set_xlabel("partition (more heterogeneous → left)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def fig_scale(rows: dict[str, dict[int, dict]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), squeeze=False)
    specs = (("global", "global accuracy", False), ("rho", "mean divergence ρ", True), ("agg_s", "server aggregation s / round", True))
    for ax, (key, title, logy) in zip(axes[0], specs):
        for m, by_n in rows.items():
            ns = sorted(by_n)
            ax.plot(ns, [by_n[n][key] if by_n[n][key] is not None else float("nan") for n in ns], marker="o", label=m, color=COLORS.get(m))
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


# ---------------------------------------------------------------------------------------------------------
# The report


def _settings_line(cfg: RunConfig) -> str:
    return (
        f"model `{cfg.model}`, data `{cfg.data}`, {cfg.adapter} r={cfg.rank} (α={cfg.lora_alpha:g}) on "
        f"`{cfg.target_modules}`, {cfg.clients} clients × {cfg.examples_per_client} examples "
        f"({1 - cfg.local_test_fraction:.0%} train / {cfg.local_test_fraction:.0%} local test), {cfg.rounds} rounds × "
        f"{cfg.local_steps} local steps × batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, max {cfg.max_length} tokens, "
        f"global test {cfg.test_examples} examples, seed {cfg.seed}"
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
    """Write the markdown report and its PNGs (``<report dir>/<report stem>/``); return the report path."""
    report = Path(report)
    figdir = report.parent / report.stem
    figdir.mkdir(parents=True, exist_ok=True)
    rel = lambda path: f"{figdir.name}/{Path(path).name}"  # noqa: E731

    def hist(method: str, label: str) -> list[dict] | None:
        for r in runs:
            if r.config.method == method and r.label == label and r.name in histories:
                return histories[r.name]
        return None

    labels = [label for label, _, _ in p.comparison]
    missing = [r.name for r in runs if r.name not in histories]
    total_wall = sum(summary_row(h)["wall_s"] for h in histories.values())
    L: list[str] = [
        "# Results: the papers' analyses on the offline default",
        "",
        "Generated by `fedlora study`; every number and figure below comes from the runs that command performs "
        "(nothing is typed in by hand). Re-create it with:",
        "",
        f"    {command}",
        "",
        f"Settings of every run unless a section says otherwise: {_settings_line(p.base)}. One seed: differences "
        "of a few points of accuracy are within run-to-run noise; the divergence numbers are exact for the "
        "uploads each run produced.",
        "",
        f"{len(histories)} runs, {total_wall / 60:.0f} min of run time on this machine "
        "(2 CPU cores, no GPU).",
        "",
    ]
    if missing:
        L += [f"**Incomplete**: {len(missing)} run(s) not finished yet ({', '.join(missing)}); sections that need "
              "them are partial. Run the same command again to finish them.", ""]
    L += ["Protocol: global accuracy is the global model on a test set held out before partitioning (for `fedsa`: "
          "shared Â with the clients' mean B and heads); local accuracy is each client's own model right after "
          "local training on its own held-out shard, example-weighted; gap = local − global; ρ = ‖ΔW* − ΔŴ‖/‖ΔW*‖ "
          "per adapted matrix (for `fedsa`, ΔŴ uses the mean B that the global model is scored with); bytes are "
          "the tensors actually sent, summed over clients and rounds.", ""]
    verdicts: list[str] = []

    # 1. comparison ---------------------------------------------------------------------------------------
    if "comparison" in parts:
        L += ["## 1. Method comparison", "",
              "Final-round accuracy; ρ and the bound are means over rounds and matrices; MB summed over rounds.", ""]
        for label in labels:
            L += [f"**{label}**", "", "| method | global acc | local acc | gap | mean ρ | bound | MB up | MB down | run s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for m in methods:
                h = hist(m, label)
                if h is None:
                    continue
                s = summary_row(h)
                L.append(f"| {m} | {_f(s['global'])} | {_f(s['local'])} | {_f(s['gap'])} | {_f(s['rho'], 4)} | "
                         f"{_f(s['bound'], 4)} | {s['mb_up']:.2f} | {s['mb_down']:.2f} | {s['wall_s']:.0f} |")
            L.append("")
        best = []
        for label in labels:
            rows = {m: summary_row(hist(m, label)) for m in methods if hist(m, label)}
            if rows:
                top = max(rows, key=lambda m: rows[m]["global"])
                spread = max(r["global"] for r in rows.values()) - min(r["global"] for r in rows.values())
                best.append(f"{label}: best global accuracy `{top}` {rows[top]['global']:.3f}, spread across methods {spread:.3f}")
        if best:
            L += ["Best per partition: " + "; ".join(best) + ".", ""]
        for label in labels:
            finals = [summary_row(hist(m, label))["global"] for m in methods if hist(m, label)]
            if len(finals) > 2 and len(set(round(x, 6) for x in finals)) <= 2 and max(finals) - min(finals) < 0.02:
                verdicts.append(
                    f"- **{label}: the methods cannot be told apart by accuracy here** — {len(finals)} methods end within "
                    f"{max(finals) - min(finals):.3f} of each other ({', '.join(sorted(set(f'{x:.3f}' for x in finals)))}): "
                    "the global models make (nearly) the same predictions on the test set after this short training, "
                    "so only the divergence and bytes columns separate the methods in that partition."
                )

    # 2. divergence ---------------------------------------------------------------------------------------
    if "divergence" in parts:
        panels = {label: {m: hist(m, label) for m in DIVERGENCE_METHODS if hist(m, label)} for label in labels}
        panels = {k: v for k, v in panels.items() if v}
        if panels:
            L += ["## 2. Aggregation divergence over rounds and per layer (FLoRA-NA Figures 2 and 4)", "",
                  "After round 1 every method's clients train from a different global model, so each run's ρ is read "
                  "against references computed on *that run's own uploads* every round: the Eckart–Young bound "
                  "(dashed in the figures) and FedIT's ρ on the same uploads (`fedit@same`).", ""]
            fig = fig_divergence_rounds(panels, figdir / "divergence_rounds.png")
            L += [f"![divergence over rounds]({rel(fig)})", ""]
            focus = "α=0.5" if "α=0.5" in panels else next(iter(panels))
            fig = fig_divergence_layers(panels[focus], figdir / "divergence_layers.png", focus)
            L += [f"![divergence per layer]({rel(fig)})", ""]
            ms = list(panels[focus])
            L += [f"Mean ρ per round ({focus}; each method: its ρ / FedIT's ρ on the same uploads / the bound):", "",
                  "| round | " + " | ".join(ms) + " |", "|---:|" + "---:|" * len(ms)]
            n_rounds = max(len(h) for h in panels[focus].values())
            for i in range(n_rounds):
                cells = []
                for m in ms:
                    h = panels[focus][m]
                    cells.append(" / ".join(_f(h[i].get(k), 4) for k in ("divergence", "fedit_divergence", "bound")) if i < len(h) else "—")
                L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
            L.append("")
            layer_vals = {m: mean_per_layer(h, "divergence_per_layer") for m, h in panels[focus].items()}
            ref_vals = {m: mean_per_layer(h, "fedit_divergence_per_layer") for m, h in panels[focus].items()}
            bound_vals = {m: mean_per_layer(h, "bound_per_layer") for m, h in panels[focus].items()}
            keys = sorted(set().union(*[set(v) for v in layer_vals.values()]))
            L += [f"Mean ρ per adapted matrix over rounds ({focus}; ρ / fedit@same / bound):", "",
                  "| layer | module | " + " | ".join(ms) + " |", "|---:|---|" + "---:|" * len(ms)]
            for k in keys:
                L.append(f"| {k[0]} | {k[1]} | " + " | ".join(
                    f"{_f(layer_vals[m].get(k), 4)} / {_f(ref_vals[m].get(k), 4)} / {_f(bound_vals[m].get(k), 4)}" for m in ms) + " |")
            L.append("")
            # Claim: FLoRA-NA's divergence is far below FedIT's, layer by layer and round by round.
            ratios, closed, pairs, below = [], [], 0, 0
            svd_dev = []
            for _name, hs in panels.items():
                for h in hs.get("florana", []):
                    for mod, v in (h.get("divergence_per_layer") or {}).items():
                        ref = (h.get("fedit_divergence_per_layer") or {}).get(mod)
                        bnd = (h.get("bound_per_layer") or {}).get(mod)
                        if ref:
                            pairs += 1
                            below += v <= ref * (1 + 1e-9)
                            ratios.append(v / ref)
                            if bnd is not None and ref - bnd > 1e-12:
                                closed.append((ref - v) / (ref - bnd))
                for h in hs.get("svd", []):
                    for mod, v in (h.get("divergence_per_layer") or {}).items():
                        bnd = (h.get("bound_per_layer") or {}).get(mod)
                        if bnd:
                            svd_dev.append(abs(v - bnd) / bnd)
            if ratios:
                ratios.sort()
                med = ratios[len(ratios) // 2]
                far = med <= 0.5
                bound_ratio = []
                for hs in panels.values():
                    for h in hs.get("florana", []):
                        for mod, ref in (h.get("fedit_divergence_per_layer") or {}).items():
                            bnd = (h.get("bound_per_layer") or {}).get(mod)
                            if ref and bnd is not None:
                                bound_ratio.append(bnd / ref)
                bound_ratio.sort()
                verdicts.append(
                    f"- **FLoRA-NA: divergence far below FedIT's, per layer and per round** — "
                    f"{'holds' if far else 'holds in direction, not in size'}. Over all partitions, rounds and matrices "
                    f"({pairs} cases), FLoRA-NA's ρ is at or below FedIT's on the same uploads in {below} (it cannot be "
                    f"above: it starts from the FedIT point); the median ratio ρ_FLoRA-NA / ρ_FedIT is {med:.3f} "
                    f"(criterion for 'far below': ≤ 0.5), and it closes a median "
                    f"{sorted(closed)[len(closed) // 2]:.0%} of the room between FedIT and the Eckart–Young bound. "
                    f"The bound itself is a median {bound_ratio[len(bound_ratio) // 2]:.3f} of FedIT's ρ here: "
                    "no rank-r broadcast can be far below FedIT when the bound is not."
                    if closed and bound_ratio else
                    f"- **FLoRA-NA: divergence below FedIT's** — in {below} of {pairs} cases; median ratio {med:.3f}."
                )
            if svd_dev:
                verdicts.append(f"- **Rank-r optimum**: `svd`'s ρ equals the Eckart–Young bound in every round and matrix "
                                f"(largest relative difference {max(svd_dev):.1e}), as it must.")

    # 3. similarity ---------------------------------------------------------------------------------------
    if "similarity" in parts:
        sims: dict[str, dict[str, dict]] = {}
        for label in p.similarity:
            h = hist("fedit", label)
            if h:
                last = h[-1]
                sims[label] = {k: per_layer(last.get(f"similarity_{k}_per_layer")) for k in ("A", "B", "dA", "dB")}
        if sims:
            L += ["## 3. A/B similarity across clients (FedSA-LoRA Figure 2)", "",
                  "Mean pairwise cosine similarity across the clients of `fedit` runs, final round, per adapted matrix: "
                  "of the factors each client holds after local training (A, B: what FedSA-LoRA plots) and of its "
                  "local update in that round (ΔA, ΔB: the factor minus the broadcast every client started from, "
                  "which removes what clients share by construction).", ""]
            fig = fig_similarity(sims, figdir / "similarity.png")
            L += [f"![A/B similarity]({rel(fig)})", ""]
            L += ["| partition | mean cos A | mean cos B | mean cos ΔA | mean cos ΔB | matrices with cos A > cos B |",
                  "|---|---:|---:|---:|---:|---:|"]
            stats = {}
            for label, per in sims.items():
                means = {k: _mean(per[k].values()) for k in per}
                keys = set(per["A"]) & set(per["B"])
                more = sum(per["A"][k] > per["B"][k] for k in keys)
                stats[label] = (means, more, len(keys))
                L.append(f"| {label} | {_f(means['A'])} | {_f(means['B'])} | {_f(means['dA'])} | {_f(means['dB'])} | {more} / {len(keys)} |")
            L.append("")
            if stats:
                all_more = sum(s[1] for s in stats.values())
                all_n = sum(s[2] for s in stats.values())
                upd_more = sum((s[0]["dA"] or 0) > (s[0]["dB"] or 0) for s in stats.values())
                verdicts.append(
                    f"- **FedSA-LoRA: A similar across clients, B client-specific** — "
                    f"{'holds for the factors' if all_more == all_n else f'holds for the factors in {all_more} of {all_n} matrices'} "
                    f"(cos A − cos B per partition: "
                    + ", ".join(f"{l} {s[0]['A'] - s[0]['B']:+.3f}" for l, s in stats.items() if s[0]['A'] is not None and s[0]['B'] is not None)
                    + f"). For the local updates, ΔA is more aligned than ΔB in {upd_more} of {len(stats)} partitions "
                    "(cos ΔA − cos ΔB: "
                    + ", ".join(f"{l} {s[0]['dA'] - s[0]['dB']:+.3f}" for l, s in stats.items() if s[0]['dA'] is not None and s[0]['dB'] is not None)
                    + "). Where the factors differ much more than the updates, the asymmetry comes from the shared "
                    "random initialisation of A (B starts at zero), not from what the clients learn."
                )
                ordered = [l for l in p.similarity if l in stats and stats[l][0]["B"] is not None]
                if len(ordered) >= 2:
                    bs = [stats[l][0]["B"] for l in ordered]
                    steps = [b - a for a, b in zip(bs, bs[1:])]
                    tol = 0.01
                    if all(st <= tol for st in steps):
                        word = "holds"
                    elif bs[0] - bs[-1] > tol:
                        word = "partly"
                    else:
                        word = "does not hold here"
                    verdicts.append(
                        f"- **FedSA-LoRA: B more client-specific as data gets more heterogeneous** — {word}: mean cos B "
                        + " → ".join(f"{l} {stats[l][0]['B']:.3f}" for l in ordered)
                        + " (steps " + ", ".join(f"{st:+.3f}" for st in steps)
                        + f"; criterion: non-increasing from IID to the most skewed, within {tol}). ΔB: "
                        + " → ".join(f"{l} {_f(stats[l][0]['dB'])}" for l in ordered) + "."
                    )

    # 4. heterogeneity ------------------------------------------------------------------------------------
    if "heterogeneity" in parts:
        order = sorted({r.label for r in runs if r.config.method in HETEROGENEITY_METHODS and not r.label.startswith("N=")},
                       key=lambda l: float("inf") if l == "IID" else float(l.removeprefix("α=")))
        rows = {m: {l: summary_row(hist(m, l)) for l in order if hist(m, l)} for m in HETEROGENEITY_METHODS}
        rows = {m: v for m, v in rows.items() if v}
        if rows:
            L += ["## 4. Accuracy vs heterogeneity (FLoRA-NA Figure 3)", ""]
            fig = fig_heterogeneity(rows, order, figdir / "heterogeneity.png")
            L += [f"![accuracy vs heterogeneity]({rel(fig)})", ""]
            L += ["| method | " + " | ".join(f"{l} global / local / gap" for l in order) + " |", "|---|" + "---|" * len(order)]
            for m, by in rows.items():
                L.append(f"| {m} | " + " | ".join(
                    f"{_f(by[l]['global'])} / {_f(by[l]['local'])} / {_f(by[l]['gap'])}" if l in by else "—" for l in order) + " |")
            L.append("")
            if "fedit" in rows and "florana" in rows:
                common = [l for l in order if l in rows["fedit"] and l in rows["florana"]]
                gaps = [(l, rows["florana"][l]["gap"] - rows["fedit"][l]["gap"], rows["florana"][l]["global"] - rows["fedit"][l]["global"]) for l in common]
                smaller = sum(d < 0 for _, d, _ in gaps)
                better = sum(g > 0 for _, _, g in gaps)
                verdicts.append(
                    f"- **FLoRA-NA: closes the local–global gap** — "
                    f"{'holds' if smaller == len(gaps) else ('mostly' if smaller > len(gaps) / 2 else 'does not hold here')}: "
                    f"FLoRA-NA's gap is smaller than FedIT's in {smaller} of {len(gaps)} partitions and its global "
                    f"accuracy higher in {better} of {len(gaps)} (gap difference, global-accuracy difference: "
                    + ", ".join(f"{l} {d:+.3f}, {g:+.3f}" for l, d, g in gaps) + ")."
                )

    # 5. scale --------------------------------------------------------------------------------------------
    if "scale" in parts:
        rows = {}
        for r in runs:
            if r.label.startswith("N=") and r.name in histories:
                rows.setdefault(r.config.method, {})[r.config.clients] = summary_row(histories[r.name])
        if rows:
            any_run = next(r for r in runs if r.label.startswith("N="))
            L += [f"## 5. Scale: {', '.join(str(n) for n in p.scale_clients)} clients", "",
                  f"One pool of {p.scale_pool} examples (Dirichlet α = 0.5) spread over N clients, so each client holds "
                  f"{p.scale_pool}/N; about one local epoch per round (local steps = train examples / batch), "
                  f"{any_run.config.rounds} rounds, all clients every round; other settings as above. Aggregation "
                  "time is the server's `method.aggregate` wall time per round (all adapted matrices).", ""]
            fig = fig_scale(rows, figdir / "scale.png")
            L += [f"![scale]({rel(fig)})", "",
                  "| clients | method | global acc | local acc | gap | mean ρ | bound | aggregation s / round | MB up / round |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
            for n in sorted({n for by in rows.values() for n in by}):
                for m, by in rows.items():
                    if n in by:
                        s = by[n]
                        rounds = next(r.config.rounds for r in runs if r.label == f"N={n}")
                        L.append(f"| {n} | {m} | {_f(s['global'])} | {_f(s['local'])} | {_f(s['gap'])} | {_f(s['rho'], 4)} | "
                                 f"{_f(s['bound'], 4)} | {_f(s['agg_s'], 4)} | {s['mb_up'] / rounds:.2f} |")
            L.append("")
            if "fedit" in rows and "florana" in rows:
                ns = sorted(set(rows["fedit"]) & set(rows["florana"]))
                if ns:
                    verdicts.append(
                        "- **Scale** — FLoRA-NA's ρ relative to FedIT's on the same uploads (mean over rounds): "
                        + ", ".join(f"N={n} {rows['florana'][n]['rho'] / rows['florana'][n]['rho_fedit']:.3f}" for n in ns if rows['florana'][n]['rho_fedit'])
                        + "; its server time per round: "
                        + ", ".join(f"N={n} {rows['florana'][n]['agg_s']:.3f} s ({rows['florana'][n]['agg_s'] / rows['fedit'][n]['agg_s']:.0f}× FedIT, "
                                    f"{rows['florana'][n]['agg_s'] / rows['florana'][n]['round_s']:.1%} of its round's wall time)"
                                    for n in ns if rows['fedit'][n]['agg_s'])
                        + ". Accuracy at these sizes: "
                        + ", ".join(f"N={n} FedIT {rows['fedit'][n]['global']:.3f} / FLoRA-NA {rows['florana'][n]['global']:.3f}" for n in ns)
                        + "."
                    )

    if verdicts:
        L += ["## Reading: which claims hold here", "",
              "Computed from the tables above with the stated criteria; one seed, a small model and short training, "
              "so accuracy differences below a few points are not evidence either way.", ""] + verdicts + [""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(L) + "\n")
    return report
