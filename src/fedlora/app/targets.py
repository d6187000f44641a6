"""Time-to-target and bytes-to-target (front end): what ``fedlora compare --target-accuracy`` reports.

A run reaches the target at its first round whose global accuracy is at least the target; its time to target is
that round's ``sim_clock`` (the simulated clock, under ``--devices``) and its bytes to target the bytes up and down
of every round up to it, round 0's included. A run that never reaches the target is reported as such, never as a
number: the table gives, per method, how many seeds reached it and the 95 % t-interval over those seeds (an
interval over the seeds that reached it only, so it reads "when it gets there, how fast").

The default target is ``TARGET_FRACTION`` × ``central``'s final global accuracy (mean over the seeds), when
``central`` is compared (our choice: 0.9, close enough to the pooled-data reference to matter, far enough that
federated methods can reach it in a short run).
"""

from __future__ import annotations

import math
from pathlib import Path

TARGET_FRACTION = 0.9


def check_target(target: float | None) -> None:
    if target is not None and not (0.0 < target <= 1.0):
        raise ValueError(f"--target-accuracy {target} is outside (0, 1]; pass an accuracy such as 0.6 (or leave it out to use "
                         f"{TARGET_FRACTION} × central's)")


def default_target(histories: dict[str, list[list[dict]]]) -> float | None:
    """``TARGET_FRACTION`` × central's final global accuracy (mean over its seeds), or None without central."""
    runs = histories.get("central")
    if not runs:
        return None
    return TARGET_FRACTION * sum(h[-1]["global_accuracy"] for h in runs) / len(runs)


def reach(history: list[dict], target: float) -> dict | None:
    """The first round at or above ``target``: its round, sim_clock (None without a clock) and MB moved up to it; None: never."""
    moved = 0
    for h in history:
        moved += h["bytes_up"] + h["bytes_down"]
        if h["global_accuracy"] >= target:
            return {"round": h["round"], "sim_seconds": h.get("sim_clock"), "mb": moved / 1e6}
    return None


def target_table(histories: dict[str, list[list[dict]]], target: float, how: str) -> str:
    """Per method: seeds that reached ``target``, and rounds, simulated seconds and MB to it (mean ± half-width over them)."""
    from fedlora.app.report import _pm

    lines = ["## Time to target\n", f"Target: global accuracy ≥ {target:.3f} ({how}). Mean ± half-width of the 95 % t-interval "
             "over the seeds that reached it; a method no seed brought there is marked never.", "",
             "| method | reached | rounds to target | sim s to target | MB to target |", "|---|---|---|---|---|"]
    for method, runs in histories.items():
        hits = [r for r in (reach(h, target) for h in runs) if r is not None]
        if not hits:
            lines.append(f"| {method} | never (0/{len(runs)}) | — | — | — |")
            continue
        secs = [r["sim_seconds"] for r in hits]
        sim = "— (no clock)" if any(s is None for s in secs) else _pm(secs, 1)
        lines.append(f"| {method} | {len(hits)}/{len(runs)} | {_pm([r['round'] for r in hits], 1)} | {sim} | {_pm([r['mb'] for r in hits], 3)} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_time(histories: dict[str, list[list[dict]]], out: Path, target: float | None = None) -> Path | None:
    """accuracy_time.png: global accuracy against the simulated clock, one line per method (each seed's run drawn
    thin, the mean over seeds at each round thick, at the seeds' mean clock). None when no run has a clock."""
    if not any("sim_clock" in h[0] for runs in histories.values() for h in runs if h):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in histories.items():
        runs = [h for h in runs if h and all("sim_clock" in m for m in h)]
        if not runs:
            continue
        n = min(len(h) for h in runs)
        xs = [sum(h[i]["sim_clock"] for h in runs) / len(runs) for i in range(n)]
        ys = [sum(h[i]["global_accuracy"] for h in runs) / len(runs) for i in range(n)]
        line = ax.plot(xs, ys, marker="o", markersize=6 if len(xs) <= 30 else 2, label=method)[0]  # many rounds: small marks
        if len(runs) > 1:
            for h in runs:
                ax.plot([m["sim_clock"] for m in h], [m["global_accuracy"] for m in h], color=line.get_color(), alpha=0.25, linewidth=0.8)
    if target is not None and not math.isnan(target):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target ({target:.3f})")
    ax.set_xlabel("simulated seconds (sim_clock)")
    ax.set_ylabel("global accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "accuracy_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
