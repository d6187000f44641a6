"""Experiment trackers: ``--track tensorboard,mlflow,wandb`` (any subset), fed from the run directory's rounds.

A run directory (:class:`~fedlora.app.rundir.RunDir`) opens its :class:`Trackers` on its first recorded round, logs
every round to them as it writes ``metrics.jsonl``, and logs its summary and figures as artifacts when it finishes,
so ``fedlora run``, ``compare``, ``study``, the Python API and the Flower ServerApp all log the same way. Each backend
is one small :class:`Tracker`; what they log:

- the run's settings as parameters (TensorBoard: a settings text and, at the end, hparams with the final scores);
- every round's numeric metrics under their metrics.jsonl names, step = the round (global and local accuracy, the
  gap, ρ and the Eckart–Young bound, bytes, ε, times, …), and nested per-key numbers as ``KEY/SUB``;
- each accepted client's own scores as ``client/ID/local_accuracy`` (``client/ID/train_loss``, ``client/ID/epsilon``);
- per-layer divergence (``*_per_layer``) as a histogram per round (TensorBoard) or one table over the rounds
  (MLflow ``divergence_per_layer.json``, W&B ``divergence_per_layer``);
- at the end, ``summary.md``, ``config.json``, ``metrics.jsonl`` and any figure as artifacts.

Our choices: every store is local and inside the run's (or the comparison's) directory unless the user names
another one: MLflow writes a SQLite store ``mlflow.db`` with artifacts in ``mlartifacts/`` (its file store is in
maintenance mode and refuses to open without ``MLFLOW_ALLOW_FILE_STORE``; a ``file:`` ``--mlflow-uri`` sets that
for the process), TensorBoard an event directory ``tensorboard/``, W&B an offline run under ``wandb/`` (``wandb
sync`` uploads it later; nothing here logs in or opens a connection). A comparison or study (:class:`Group`) is one
MLflow parent run with a child run per method and seed (tags ``method``, ``seed``), one W&B group, and one
TensorBoard event directory per run under its directory. What a run opened is kept in ``trackers.json``, so a
resumed run goes on logging into the same MLflow and W&B runs, and a comparison re-run into the same parent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

EXTRA = "pip install 'fedlora[track]'"
STATE = "trackers.json"
PROJECT = "fedlora"  # the MLflow experiment and the W&B project
# tracker → the module it needs (a missing one is reported before anything trains)
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_ARTIFACTS = ("summary.md", "comparison.md", "config.json", "metrics.jsonl", "reference.json")


def tracker_names(track: str) -> list[str]:
    """``--track``: known tracker names, each once (an empty string: none)."""
    names = [t.strip().lower() for t in track.split(",") if t.strip()]
    for name in names:
        if name not in PACKAGES:
            raise ValueError(f"unknown tracker {name!r} in --track; choose from {', '.join(PACKAGES)} (comma-separated)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--track names {', '.join(twice)} more than once; list each tracker once")
    return names


def check(track: str, mlflow_uri: str = "") -> list[str]:
    """The settings' check (every front end, before anything loads): refuse an unknown tracker or an MLflow store
    that is not a URI; the tracker names otherwise. Whether the packages are installed is :func:`require`'s: our
    choice, asked only where a run is logged (a Flower SuperNode validates the same settings, but logs nothing)."""
    names = tracker_names(track)
    if mlflow_uri and ":" not in mlflow_uri:
        raise ValueError(f"--mlflow-uri {mlflow_uri!r} is not a tracking URI; pass sqlite:///PATH/mlflow.db or file:PATH "
                         "(default: a SQLite store in the run directory)")
    if mlflow_uri and "mlflow" not in names:
        raise ValueError(f"--mlflow-uri {mlflow_uri!r} is given but mlflow is not in --track; add --track mlflow or drop --mlflow-uri")
    return names


def require(track: str) -> list[str]:
    """Refuse, before anything trains, a tracker whose package is not installed, in one line naming the extra."""
    import importlib.util

    names = tracker_names(track)
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise ValueError(f"--track {','.join(missing)} needs the {', '.join(PACKAGES[n] for n in missing)} package "
                         f"(not installed); install the trackers with `{EXTRA}`, or drop {','.join(missing)} from --track")
    return names


# ---- what is logged -------------------------------------------------------------------------------------------------
def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def scalars(metrics: dict) -> dict[str, float]:
    """A round's numbers by name: top-level numbers; ``client_metrics`` and ``epsilon_per_client`` as
    ``client/ID/NAME``; any other dict of numbers as ``KEY/SUB``; per-layer dicts are left to :func:`layers`.
    None, NaN, booleans, strings and lists (the clients, the rejections) are not numbers to plot."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "round":
            continue
        if key == "client_metrics" and isinstance(value, dict):
            for cid, own in value.items():
                out |= {f"client/{cid}/{k}": x for k, v in own.items() if (x := _number(v)) is not None}
        elif key == "epsilon_per_client" and isinstance(value, dict):
            out |= {f"client/{cid}/epsilon": x for cid, v in value.items() if (x := _number(v)) is not None}
        elif isinstance(value, dict) and not key.endswith("_per_layer"):
            out |= {f"{key}/{sub}": x for sub, v in value.items() if (x := _number(v)) is not None}
        elif (x := _number(value)) is not None:
            out[key] = x
    return out


def layers(metrics: dict) -> dict[str, dict[str, float]]:
    """The round's per-layer measures (``divergence_per_layer``, ``bound_per_layer``, ``fedit_divergence_per_layer``):
    name → layer → value, finite values only."""
    return {key: {layer: x for layer, v in value.items() if (x := _number(v)) is not None}
            for key, value in metrics.items() if key.endswith("_per_layer") and isinstance(value, dict)}


def layer_rows(metrics: dict) -> dict[str, list]:
    """The round's per-layer measures as one table (columns: round, layer, then one per measure)."""
    per = layers(metrics)
    names = sorted({layer for values in per.values() for layer in values})
    table: dict[str, list] = {"round": [metrics.get("round")] * len(names), "layer": names}
    for key, values in per.items():
        table[key.removesuffix("_per_layer")] = [values.get(layer) for layer in names]
    return table


def parameters(settings: dict) -> dict[str, str | int | float | bool]:
    """The run's settings as tracker parameters: None as the empty string (no tracker takes null)."""
    return {k: ("" if v is None else v) for k, v in settings.items()}


# ---- the backends ---------------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """What a tracker is told about the run it logs. ``path``: the run's (or the comparison's) directory, where local
    stores go; ``group``: the comparison's name (W&B group) and ``parent``: its saved tracker state (the MLflow parent
    run); ``saved``: this run's own saved state (a resume); ``kind``: run, comparison or study."""

    path: Path
    name: str
    params: dict
    tags: dict[str, str] = field(default_factory=dict)
    mlflow_uri: str = ""
    group: str | None = None
    parent: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    kind: str = "run"


class Tracker(Protocol):
    """One tracker backend. ``start`` returns what a resume needs to reopen the same run (kept in trackers.json)."""

    def start(self, info: RunInfo) -> dict: ...

    def log_round(self, metrics: dict) -> None: ...

    def log_artifacts(self, files: Sequence[Path]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """MLflow through ``MlflowClient`` (no global active run, so a parent and its children are open together)."""

    def start(self, info: RunInfo) -> dict:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for name in ("mlflow", "alembic"):  # the store's schema migrations log at INFO on every new store
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_table reads the table back to append
        uri = info.saved.get("uri") or info.parent.get("uri") or info.mlflow_uri or f"sqlite:///{(info.path / 'mlflow.db').resolve()}"
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for by name: MLflow's maintenance-mode store
        self.client = client = MlflowClient(tracking_uri=uri)
        self.step_rows = 0
        if info.saved.get("run_id"):
            self.run_id = info.saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            return {"uri": uri, "run_id": self.run_id}
        experiment = client.get_experiment_by_name(PROJECT)
        if experiment is None:
            store = uri.removeprefix("sqlite:///")
            location = (Path(store).parent / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:///") else None
            experiment_id = client.create_experiment(PROJECT, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = dict(info.tags) | {"kind": info.kind}
        if info.parent.get("run_id"):
            tags["mlflow.parentRunId"] = info.parent["run_id"]
        self.run_id = client.create_run(experiment_id, run_name=info.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in parameters(info.params).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(self.run_id, params=params[i : i + 100])
        return {"uri": uri, "run_id": self.run_id}

    def log_round(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(metrics.get("round", 0)), int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in scalars(metrics).items()]
        for i in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[i : i + 1000])
        table = layer_rows(metrics)
        if table["layer"]:
            self.client.log_table(self.run_id, data=table, artifact_file="divergence_per_layer.json")

    def log_artifacts(self, files: Sequence[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker:
    """TensorBoard through PyTorch's ``SummaryWriter``: scalars per round, per-layer histograms, text and images."""

    def start(self, info: RunInfo) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = info.path / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.params = parameters(info.params)
        self.last: dict[str, float] = {}
        if not info.saved:
            rows = "".join(f"| {k} | {v} |\n" for k, v in self.params.items())
            self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)
        return {"logdir": str(self.logdir)}

    def log_round(self, metrics: dict) -> None:
        import numpy as np

        step = int(metrics.get("round", 0))
        self.last = scalars(metrics)
        for key, value in self.last.items():
            self.writer.add_scalar(key, value, step)
        for key, values in layers(metrics).items():
            if values:
                self.writer.add_histogram(key, np.array(list(values.values())), step)
        self.writer.flush()

    def log_artifacts(self, files: Sequence[Path]) -> None:
        for f in files:
            if f.suffix == ".png":
                import matplotlib.image

                image = matplotlib.image.imread(str(f))
                self.writer.add_image(f.stem, image[..., :3], 0, dataformats="HWC")
            elif f.suffix in (".md", ".json") and f.stat().st_size < 200_000:
                self.writer.add_text(f.name, f.read_text() if f.suffix == ".md" else f"```\n{f.read_text()}\n```", 0)

    def finish(self, status: str = "FINISHED") -> None:
        final = {f"final/{k}": v for k, v in self.last.items() if "/" not in k}
        if status == "FINISHED" and final:
            params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in self.params.items()}
            self.writer.add_hparams(params, final, run_name=".")
        self.writer.close()


class WandbTracker:
    """Weights & Biases in offline mode, under ``wandb/`` in the run's directory (``wandb sync`` uploads it)."""

    def start(self, info: RunInfo) -> dict:
        import wandb

        before = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # no login, no connection, whatever the user's env says
        try:
            settings = wandb.Settings(mode="offline", silent=True, console="off", x_disable_stats=True, disable_git=True,
                                      save_code=False, reinit="create_new")
            self.run = wandb.init(dir=str(info.path), project=PROJECT, group=info.group, name=info.name, job_type=info.kind,
                                  tags=[f"{k}:{v}" for k, v in info.tags.items()], config=parameters(info.params),
                                  id=info.saved.get("id"), resume="allow" if info.saved.get("id") else None, settings=settings)
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return {"id": self.run.id, "dir": str(Path(self.run.dir).parent)}

    def log_round(self, metrics: dict) -> None:
        import wandb

        row: dict = dict(scalars(metrics))
        table = layer_rows(metrics)
        if table["layer"]:
            row["divergence_per_layer"] = wandb.Table(columns=list(table), data=[list(r) for r in zip(*table.values())])
        self.run.log(row, step=int(metrics.get("round", 0)))

    def log_artifacts(self, files: Sequence[Path]) -> None:
        for f in files:
            self.run.save(str(f.resolve()), base_path=str(f.resolve().parent), policy="now")

    def finish(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


# ---- a run's trackers -----------------------------------------------------------------------------------------------
class Trackers:
    """The trackers of one run (or one comparison), opened together; their state is kept in ``PATH/trackers.json``.
    ``earlier``: rounds the run finished before (a resume), logged first to a tracker that opens a new run for them
    (one added on resume), so every tracker holds every round."""

    def __init__(self, names: Iterable[str], info: RunInfo, earlier: Sequence[dict] = ()):
        self.info = info
        self.items: dict[str, Tracker] = {}
        state = read_state(info.path)
        for name in names:
            tracker = BACKENDS[name]()
            run = RunInfo(**(vars(info) | {"saved": info.saved.get(name, {}), "parent": info.parent.get(name, {})}))
            try:
                state[name] = tracker.start(run)
            except Exception as exc:  # a store that cannot be opened: one line, the finished rounds are checkpointed
                self.finish("FAILED")
                raise ValueError(f"{name}: cannot start tracking the run in {str(info.path)!r} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the tracker's store or drop {name} "
                                 "from --track") from None
            self.items[name] = tracker
            if not run.saved:
                for metrics in earlier:
                    tracker.log_round(metrics)
        (info.path / STATE).write_text(json.dumps(state, indent=1) + "\n")
        self.state = state

    def log_round(self, metrics: dict) -> None:
        for tracker in self.items.values():
            tracker.log_round(metrics)

    def log_artifacts(self, files: Sequence[Path]) -> None:
        for tracker in self.items.values():
            tracker.log_artifacts(files)

    def finish(self, status: str = "FINISHED") -> None:
        items, self.items = self.items, {}
        for tracker in items.values():
            tracker.finish(status)


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, ValueError):
        return {}


def artifacts(path: Path) -> list[Path]:
    """What a finished run or comparison directory hands its trackers: its summary files and figures."""
    path = Path(path)
    return [path / n for n in _ARTIFACTS if (path / n).is_file()] + sorted(path.glob("*.png"))


def run_info(config, path: Path, *, resume: bool, group: Group | None = None) -> RunInfo:
    """The :class:`RunInfo` of a run of ``config`` in ``path`` (within ``group``, a comparison or study, if any)."""
    tags = {"method": config.method, "seed": str(config.seed), "adapter": config.adapter}
    settings = {k: v for k, v in config.to_dict().items() if k not in ("track", "mlflow_uri")}
    return RunInfo(path=Path(path), name=group.child_name(path) if group else Path(path).resolve().name, params=settings, tags=tags,
                   mlflow_uri=config.mlflow_uri, group=group.name if group else None, parent=group.state if group else {},
                   saved=read_state(path) if resume else {})


def open_run(config, path: Path, *, resume: bool, group: Group | None = None, earlier: Sequence[dict] = ()) -> Trackers | None:
    """The run's trackers (None when ``config.track`` names none); ``earlier``: the rounds a resumed run restored."""
    names = tracker_names(config.track)
    if not names:
        return None
    return Trackers(names, run_info(config, path, resume=resume, group=group), earlier)


def log_finished(config, path: Path, history: list[dict], group: Group | None = None) -> None:
    """A finished run read back (a comparison or study re-run): logged after the fact to the trackers it was not
    logged to yet, so every run of the comparison is in its group."""
    done = read_state(path)
    names = [n for n in tracker_names(config.track) if n not in done]
    if not names:
        return
    trackers = Trackers(names, run_info(config, path, resume=False, group=group))
    for metrics in history:
        trackers.log_round(metrics)
    trackers.log_artifacts(artifacts(path))
    trackers.finish()


def log_eval(config, path: Path, entry: dict, label: str = "global") -> None:
    """A ``fedlora eval`` result (an ``eval.json`` entry) logged to the run's trackers (those ``config.track`` names),
    reopened where the run left them: its numbers as ``eval/<label>/<name>`` (``label``: ``global`` or
    ``client_N``) at the run's last round, and ``eval.json`` as an artifact. Nothing when the run tracked nothing."""
    names = tracker_names(config.track)
    if not names:
        return
    trackers = Trackers(names, run_info(config, path, resume=True))
    trackers.log_round({"round": entry.get("round", 0)} | {f"eval/{label}/{k}": v for k, v in scalars(entry.get("results", {})).items()})
    trackers.log_artifacts([p for p in (Path(path) / "eval.json",) if p.is_file()])
    trackers.finish()


class Group:
    """A comparison or study: one parent (MLflow parent run, W&B group with a run of its own for the comparison's
    files, a TensorBoard directory for its text and figures) whose runs are its children. ``with`` it around the runs;
    :meth:`finish` logs the comparison's files. Kept in ``PATH/trackers.json``, so a re-run reopens the same parent."""

    def __init__(self, track: str, path: Path, *, mlflow_uri: str = "", params: dict | None = None, kind: str = "comparison"):
        self.path = Path(path)
        self.name = self.path.resolve().name
        self.names = require(track)
        self.trackers: Trackers | None = None
        self.state: dict = {}
        if self.names:
            self.path.mkdir(parents=True, exist_ok=True)
            saved = read_state(self.path)
            info = RunInfo(path=self.path, name=self.name, params=params or {}, tags={"kind": kind}, mlflow_uri=mlflow_uri,
                           group=self.name, saved=saved, kind=kind)
            self.trackers = Trackers(self.names, info)
            self.state = self.trackers.state

    def child_name(self, path: Path) -> str:
        """A child run's name: its path under the comparison's directory (``fedit/seed-0``)."""
        try:
            return Path(path).resolve().relative_to(self.path.resolve()).as_posix()
        except ValueError:
            return Path(path).resolve().name

    def finish(self, files: Sequence[Path] = (), status: str = "FINISHED") -> None:
        if self.trackers is not None:
            self.trackers.log_artifacts([f for f in files if Path(f).is_file()])
            self.trackers.finish(status)
            self.trackers = None

    def __enter__(self) -> Group:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.finish(status="FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
