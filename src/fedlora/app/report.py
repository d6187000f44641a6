"""Reports (front end): a run's summary.md, the side-by-side comparison table and its plots."""

from __future__ import annotations

import math
from pathlib import Path

PROTOCOL = (
    "Global accuracy: the global model on a test set held out from the pool before partitioning (natural label "
    "mix); for `fedsa` the global model is the shared Â with the example-weighted mean of the clients' B and heads. "
    "Local accuracy: each sampled client's own model right after local training, on its own held-out shard (same "
    "label mix as its training shard), example-weighted mean. Gap = local − global. Divergence ρ = ‖ΔW* − ΔŴ‖/‖ΔW*‖ "
    "per adapted matrix, mean over matrices (for `fedsa`: of Â with the clients' mean B, as scored); bound = Eckart–Young ρ_min. "
    "Bytes: the tensors each method actually sends, summed over the round's participants (down: the round's "
    "result sent to them)."
)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def final_row(method: str, history: list[dict], wall_seconds: float) -> dict:
    last = history[-1]
    divs = [h["divergence"] for h in history if h["divergence"] is not None]
    return {
        "method": method,
        "global_accuracy": last["global_accuracy"],
        "local_accuracy": last["local_accuracy"],
        "gap": last["local_global_gap"],
        "divergence": sum(divs) / len(divs) if divs else None,
        "bound": last.get("bound"),
        "mb_up": sum(h["bytes_up"] for h in history) / 1e6,
        "mb_down": sum(h["bytes_down"] for h in history) / 1e6,
        "wall_seconds": wall_seconds,
        **{key: last[key] for key in ("global_loss", "loss_gap", "epsilon", "epsilon_kind", "sim_clock") if key in last},
    }


# Columns shown only when a run records them: the synthetic task's loss and its gap to the Bayes floor, DP's ε, the
# simulated clock at the end (--devices).
OPTIONAL = (("loss", "global_loss", 3), ("loss − floor", "loss_gap", 3), ("ε", "epsilon", 3), ("sim s", "sim_clock", 1))


def optional_columns(rows: list[dict]) -> tuple:
    """The OPTIONAL columns some row records; the ε column names a noise cohort's ε as simulated where a row's is."""
    simulated = any(r.get("epsilon_kind") == "cohort-simulated" for r in rows)
    return tuple(("ε (cohort-simulated: not a guarantee of this run)", *c[1:]) if c[1] == "epsilon" and simulated else c
                 for c in OPTIONAL if any(c[1] in r for r in rows))


MAJORITY_MARGIN = 0.01  # global accuracy within this of the majority-class rate counts as having learned nothing


def learned(values: list[float], majority: float | None) -> bool | None:
    """Whether accuracies over seeds show learning: their 95 % interval's lower end (the value itself with one seed)
    clears the majority-class rate by ``MAJORITY_MARGIN``; None when there is no rate or no value."""
    from fedlora.app.stats import interval

    if majority is None or not values:
        return None
    mean, half = interval(values)
    return mean - (0.0 if math.isnan(half) else half) > majority + MAJORITY_MARGIN


def markdown_table(rows: list[dict], majority: float | None = None) -> str:
    """The comparison table; with ``majority`` (the global test set's majority-class rate) a global accuracy
    within 0.01 of it is marked † and a line under the table says what that means."""
    extra = optional_columns(rows)  # e.g. a DP run's privacy spent beside its accuracy
    head = ("| method | global acc | local acc | gap | mean ρ | MB up | MB down | wall s |" + "".join(f" {c[0]} |" for c in extra)
            + "\n|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + "\n")

    def acc(r: dict) -> str:
        a = r["global_accuracy"]
        learned_nothing = majority is not None and a is not None and a == a and a <= majority + MAJORITY_MARGIN
        return _fmt(a) + (" †" if learned_nothing else "")

    body = "".join(
        f"| {r['method']} | {acc(r)} | {_fmt(r['local_accuracy'])} | {_fmt(r['gap'])} | "
        f"{_fmt(r['divergence'], 4)} | {_fmt(r['mb_up'], 2)} | {_fmt(r['mb_down'], 2)} | {_fmt(r['wall_seconds'], 0)} |"
        + "".join(f" {_fmt(r.get(c[1]), c[2])} |" for c in extra) + "\n"
        for r in rows
    )
    if majority is None:
        return head + body
    return head + body + (f"\nMajority-class rate of the global test set: {majority:.3f}. † global accuracy within "
                          f"{MAJORITY_MARGIN} of it: the global model learned nothing beyond predicting the most frequent class.\n")


COLUMNS = (("global acc", "global_accuracy", 3), ("local acc", "local_accuracy", 3), ("gap", "gap", 3),
           ("mean ρ", "divergence", 4), ("MB up", "mb_up", 2), ("MB down", "mb_down", 2), ("wall s", "wall_seconds", 0))
PAIRED = COLUMNS[:4]


def _pm(values: list, digits: int) -> str:
    from fedlora.app.stats import interval

    mean, half = interval(values)
    if math.isnan(mean):
        return "—"
    if math.isnan(half) or half == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def seeded_tables(results: dict[str, list[dict]], seeds: list[int], reference: str | None,
                  majority: list[float | None]) -> str:
    """The comparison over paired seeds: every column as mean ± half-width of its 95 % t-interval over the seeds,
    then each method's per-seed difference to ``reference`` with its interval ("n.d.": the interval holds 0, the
    two are not distinguishable at these seeds). ``results[method][i]`` is ``final_row`` for ``seeds[i]``;
    ``majority[i]`` that seed's global test set's majority-class rate (a global accuracy whose interval does not
    clear the mean rate by 0.01 is marked †; with one seed, whose mean does not)."""
    from fedlora.app.stats import distinguishable, paired

    rates = [m for m in majority if m is not None]
    rate = sum(rates) / len(rates) if rates else None
    columns = COLUMNS + optional_columns([r for rows in results.values() for r in rows])
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± half-width of the 95 % t-interval over {len(seeds)} paired seeds.", "",
             "| method | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for method, rows in results.items():
        cells = []
        for _, key, digits in columns:
            cell = _pm([r.get(key, math.nan) for r in rows], digits)
            if key == "global_accuracy" and learned([r[key] for r in rows], rate) is False:
                cell += " †"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if rate is not None:
        span = f"{min(rates):.3f}–{max(rates):.3f}" if max(rates) - min(rates) > 5e-4 else f"{rate:.3f}"
        lines += ["", f"Majority-class rate of the global test set: {span} over the seeds. † the global accuracy's interval "
                      f"does not clear it by {MAJORITY_MARGIN}: the global model is not shown to have learned anything beyond "
                      "predicting the most frequent class."]
    if reference in results and len(results) > 1 and len(seeds) > 1:
        lines += ["", f"Paired difference to `{reference}` (method − {reference}, per seed; n.d.: the interval holds 0, "
                      "not distinguishable at these seeds):", "",
                  "| method | " + " | ".join(f"Δ {c[0]}" for c in PAIRED) + " |", "|---|" + "---|" * len(PAIRED)]
        ref = results[reference]
        for method, rows in results.items():
            if method == reference:
                continue
            cells = []
            for _, key, digits in PAIRED:
                n = min(len(rows), len(ref))  # while a compare is under way: the seeds both have finished
                mean, half = paired([r[key] for r in rows[:n]], [r[key] for r in ref[:n]])
                if math.isnan(mean):
                    cells.append("—")
                    continue
                cells.append(f"{mean:+.{digits}f} ± {half:.{digits}f}" + ("" if distinguishable(mean, half) else " (n.d.)"))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ACCOUNTANT_NAMES = {"rdp": "Opacus's RDP", "prv": "Opacus's PRV", "flower": "Flower's RDP"}


def privacy_line(cfg, last: dict, eps: str) -> str:
    """summary.md's privacy sentence: the mechanism, its ε, and under a noise cohort that the ε is the simulated
    cohort's, never this run's own guarantee."""
    clip = (f"adaptive clip (target quantile {cfg.dp_clip_quantile:g}, η_C = {cfg.dp_clip_lr:g}; started at {cfg.dp_clip}, ended at "
            f"{last['dp_clip']:.4g}), update noise multiplier {last['dp_update_noise_multiplier']:.4g}" if cfg.dp_clip_quantile is not None
            else f"clip C = {cfg.dp_clip}")
    head = ("Client-level differential privacy (DP-FedAvg)" if cfg.dp == "client" else "Example-level differential privacy (DP-SGD)")
    text = (f"{head}: {clip}, noise multiplier z = {last['dp_noise_multiplier']:.4g}, Poisson client sampling at q = {cfg.fraction}; "
            f"ε = {eps} at δ = {last['delta']:g} after {last['round']} rounds ({ACCOUNTANT_NAMES.get(last['dp_accountant'], last['dp_accountant'])} "
            "accountant).")
    if last.get("epsilon_kind") == "cohort-simulated":
        text += (f" **ε is cohort-simulated**: the noise is calibrated as if {last['dp_noise_cohort']} of {last['dp_population']} clients "
                 f"joined each round (sampling rate {last['dp_noise_cohort']}/{last['dp_population']}) while {cfg.clients} clients trained; "
                 "it is the ε such a deployment would spend, not a privacy guarantee for this run.")
    return text


def write_summary(exp, history: list[dict], out: Path, *, wall_seconds: float) -> None:
    cfg = exp.config
    ranks = cfg.ranks()
    # mixed ranks: --rank is unused; the title names the clients' ranks (client u has the (u mod n)-th)
    rank_text = f"r={cfg.rank}" if ranks is None else f"client ranks {cfg.client_ranks.replace(' ', '')} (r_max={max(ranks)})"
    eps = history[-1].get("epsilon")
    eps = "none (no noise, no bound)" if eps is None else f"{eps:.4g}"
    lines = [
        f"# fedlora run: {cfg.method} · {cfg.adapter} {rank_text}",
        "",
        f"Model `{cfg.model}`, data `{cfg.data}`, {cfg.clients} clients ({cfg.partition}"
        + (f", α={cfg.alpha}" if cfg.partition == "dirichlet" else "")
        + f"), {cfg.rounds} rounds × {cfg.local_steps} local steps, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}.",
        "",
        *([privacy_line(cfg, history[-1], eps), ""] if "epsilon" in history[-1] else []),
        "## Final",
        "",
        markdown_table([final_row(cfg.method, history, wall_seconds)]),
        "## Per round",
        "",
        "| round | global acc | local acc | gap | ρ | bound | bytes up | bytes down | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in history:
        lines.append(
            f"| {h['round']} | {_fmt(h['global_accuracy'])} | {_fmt(h['local_accuracy'])} | {_fmt(h['local_global_gap'])} | "
            f"{_fmt(h['divergence'], 4)} | {_fmt(h['bound'], 4)} | {h['bytes_up']} | {h['bytes_down']} | {_fmt(h['wall_seconds'], 1)} |"
        )
    lines += scores_against_base(exp.reference, history[-1])
    lines += ["", "## Protocol", "", PROTOCOL, "", "## Clients", ""]
    lines += ["| client | train | test | labels (train/test) |" + (" rank |" if ranks else ""), "|---|---|---|---|" + ("---|" if ranks else "")]
    names = list(exp.label_names)
    for c in exp.data_summary:
        train, test = c.get("train_labels") or [], c.get("test_labels") or []
        mix = " · ".join(f"{names[i] if i < len(names) else i} {a}/{b}" for i, (a, b) in enumerate(zip(train, test)) if a or b)
        cid = c.get("cid")
        rank = f" {ranks[cid]} |" if ranks and isinstance(cid, int) and cid < len(ranks) else (" — |" if ranks else "")
        lines.append(f"| {cid} | {c.get('n_train')} | {c.get('n_test')} | {mix or '—'} |{rank}")
    Path(out, "summary.md").write_text("\n".join(lines) + "\n")


def scores_against_base(reference: dict | None, last: dict) -> list[str]:
    """Instruct runs: every held-out task's and benchmark's score after the last round beside the base model's
    before any training (the reference row), and the change."""
    if not reference:
        return []
    lines = ["", "## Scores against the base model", "",
             "The base model is scored with no adapter before round 1, on the same global test tasks and benchmarks.", "",
             "| score | base model | after training | change |", "|---|---|---|---|"]
    for key in sorted(reference):
        after = last.get(key)
        if isinstance(after, float | int):
            change = after - reference[key]
            lines.append(f"| {key} | {_fmt(reference[key])} | {_fmt(after)} | {'—' if change != change else f'{change:+.3f}'} |")
    return lines


def plot_comparison(histories: dict[str, list[dict]] | dict[str, list[list[dict]]], out: Path,
                    majority: float | None = None) -> list[Path]:
    """accuracy.png, divergence.png and bytes.png over rounds, one line per method. With several seeds per method
    (a list of histories each) the line is the mean over the seeds and the band its 95 % t-interval. ``majority``:
    the global test set's majority-class rate, drawn on the accuracy plot."""
    import matplotlib

    from fedlora.app.stats import interval

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    specs = [
        ("accuracy.png", "global accuracy", lambda h: h["global_accuracy"], False),
        ("divergence.png", "aggregation divergence ρ (mean over matrices)", lambda h: h["divergence"], True),
        ("bytes.png", "cumulative MB (up + down)", None, False),
    ]
    for name, ylabel, get, logy in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, hists in histories.items():
            runs = hists if hists and isinstance(hists[0], list) else [hists]
            curves = []
            for hist in runs:
                if get is None:
                    total, ys = 0.0, []
                    for h in hist:
                        total += (h["bytes_up"] + h["bytes_down"]) / 1e6
                        ys.append(total)
                else:
                    ys = [get(h) for h in hist]
                curves.append(ys)
            if any(y is None for ys in curves for y in ys):
                continue
            rounds = [h["round"] for h in runs[0]]
            stats = [interval([ys[i] for ys in curves]) for i in range(min(len(ys) for ys in curves))]
            means = [max(m, 1e-12) if logy else m for m, _ in stats]
            line = ax.plot(rounds[: len(means)], means, marker="o", label=method)[0]
            if len(curves) > 1:
                lo = [max(m - h, 1e-12) if logy else m - h for m, h in stats]
                hi = [m + h for m, h in stats]
                ax.fill_between(rounds[: len(means)], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        if majority is not None and name == "accuracy.png":
            ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label=f"majority class ({majority:.3f})")
        if logy:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out) / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_tradeoff(results: dict[str, list[dict]], out: Path, majority: float | None = None) -> Path:
    """tradeoff.png: each method's final global accuracy against the megabytes it moved (up + down, log scale), the
    mean over seeds with its 95 % t-interval as an error bar. Methods that move nothing (``central``, ``local``) have
    no place on a log axis: they are drawn as labelled horizontal lines, with the majority-class rate."""
    import matplotlib

    from fedlora.app.stats import interval

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    refs = {"central": ":", "local": "-."}
    points = []
    for method, rows in results.items():
        accs = [r["global_accuracy"] for r in rows if r["global_accuracy"] is not None]
        mb = [r["mb_up"] + r["mb_down"] for r in rows]
        if not accs:
            continue
        acc, half = interval(accs)
        total = sum(mb) / len(mb)
        if total <= 0:
            ax.axhline(acc, color="black", linestyle=refs.get(method, "--"), linewidth=1, label=f"{method} ({acc:.3f})")
            continue
        ax.errorbar([total], [acc], yerr=None if math.isnan(half) or half == 0 else [half], marker="o", capsize=3, color="C0")
        points.append((method, total, acc))
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label=f"majority class ({majority:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("MB moved in the run (up + down, log scale)")
    ax.set_ylabel("final global accuracy")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _label_points(ax, points, fontsize=7)
    path = Path(out) / "tradeoff.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LABEL_OFFSET = (4.0, 3.0)  # a label's place, in points from its point: just right of and above it


def label_offsets(points: list[tuple[str, float, float]], fontsize: float, step: float = 1.25) -> list[tuple[float, float]]:
    """Offsets in points (from each point, for its text's lower-left corner) so that no two labels overlap: ``points``
    are (label, x, y) in points on the page. Greedy, from the top of the plot down: a label goes to
    :data:`LABEL_OFFSET`, or, where that box is taken (by a label or a marker), the nearest free row above or below it
    (then the left side)."""
    h, w_char = fontsize * step, fontsize * 0.6
    taken = [(x - 3.0, y - 3.0, x + 3.0, y + 3.0) for _, x, y in points]  # the markers, then each label placed
    offsets: list[tuple[float, float]] = [LABEL_OFFSET] * len(points)
    dx0, dy0 = LABEL_OFFSET
    for i in sorted(range(len(points)), key=lambda i: (-points[i][2], points[i][1])):
        name, x, y = points[i]
        size = (w_char * len(name), h)
        tries = [(dx, dy0 + k * h) for k in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6) for dx in (dx0, -dx0 - size[0])]
        offsets[i] = next((t for t in tries if _free(_box(x, y, t, size), taken)), tries[0])
        taken.append(_box(x, y, offsets[i], size))
    return offsets


def _box(x: float, y: float, offset: tuple[float, float], size: tuple[float, float]) -> tuple[float, float, float, float]:
    left, bottom = x + offset[0], y + offset[1]
    return (left, bottom, left + size[0], bottom + size[1])


def _free(box: tuple[float, float, float, float], taken: list) -> bool:
    return all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken)


def _label_points(ax, points: list[tuple[str, float, float]], fontsize: float) -> None:
    """Annotate (label, x, y) data points without overlaps (:func:`label_offsets`); a label moved off its place gets a
    thin line to its point."""
    scale = 72.0 / ax.figure.dpi  # display pixels → points
    page = [(name, *(ax.transData.transform((x, y)) * scale)) for name, x, y in points]
    for (name, x, y), offset in zip(points, label_offsets(page, fontsize)):
        moved = offset != LABEL_OFFSET
        ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3} if moved else None)


COMPARE_START = "<!-- compare table: generated by `fedlora compare --write-table` -->"
COMPARE_END = "<!-- end of compare table -->"


def check_compare_table(path: Path) -> tuple[str, int, int]:
    """``path``'s text and where its compare-table markers are; a missing file or markers: one line (ValueError)."""
    if not Path(path).is_file():
        raise ValueError(f"--write-table {path}: no such file; pass a markdown file that holds the compare-table markers")
    text = Path(path).read_text()
    start, end = text.find(COMPARE_START), text.find(COMPARE_END)
    if start < 0 or end < start:
        raise ValueError(f"--write-table {path}: the file has no compare-table markers; add the lines {COMPARE_START!r} "
                         f"and {COMPARE_END!r} where the table goes")
    return text, start, end


def write_compare_table(path: Path, table: str) -> None:
    """Replace the part of ``path`` between the compare-table markers with ``table`` (the comparison as
    comparison.md shows it); a file without the markers is refused, untouched."""
    text, start, end = check_compare_table(path)
    Path(path).write_text(text[: start + len(COMPARE_START)] + "\n\n" + table.strip() + "\n\n" + text[end:])


TABLE_START, TABLE_END = "<!-- methods table: generated by `fedlora methods` -->", "<!-- end of methods table -->"


def methods_table() -> str:
    """The methods table of the README and docs/design.md, from what each registered method declares."""
    from fedlora.federation import REGISTRY

    rows = ["| method | paper | server rule | up | down | exact | linear | mixed ranks | server opt | async | adapters |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        rows.append(f"| `{name}` | {cls.title} | {cls.summary} | {cls.up} | {cls.down} | {cls.exact_text()} | "
                    f"{cls.linear_text()} | {cls.mixed_text()} | {cls.server_opt or '—'} | {cls.async_text()} | "
                    f"{', '.join(cls.adapters())} |")
    return "\n".join(rows) + "\n"


def replace_methods_table(text: str) -> str:
    """``text`` with the part between the table markers replaced by ``methods_table()``."""
    head, sep, rest = text.partition(TABLE_START)
    if not sep or TABLE_END not in rest:
        raise ValueError(f"no methods table markers ({TABLE_START} … {TABLE_END}) in the file; add them where the table goes")
    return head + TABLE_START + "\n" + methods_table() + TABLE_END + rest.partition(TABLE_END)[2]
