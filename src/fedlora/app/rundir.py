"""A run directory: the one object every way of making a run (``fedlora run``, ``compare``, ``study``, the Flower
ServerApp) writes through.

``RunDir(out)`` creates the directory or refuses in one line; ``hold()`` takes its lock (another live process
writing it is refused, a lock left by a killed process is taken over); ``start(config, resume=…)`` checks a resume
against the checkpoint's settings or refuses to overwrite a finished run, and writes ``config.json``; every round
``record(metrics, sim, config)`` appends its line to ``metrics.jsonl`` and replaces ``checkpoint.safetensors``
atomically; ``finish`` writes the adapter and ``summary.md``. ``finished(config)`` reads a finished run back.
With ``track`` set, the run's trackers (:mod:`fedlora.app.tracking`) open on the first recorded round, get every
round after its checkpoint is written, and its files at ``finish``; a run that stops early closes them as failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.app.config import RunConfig

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
_LOCK = ".running"
_EMPTY_LOCK_GRACE = 10.0  # seconds an empty lock file counts as being written
# settings a resume may change (more rounds) or that name the place, or where the run is reported (trackers)
_RESUMABLE = ("rounds", "out", "track", "mlflow_uri")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj))


def metrics_line(m: dict) -> str:
    """One metrics.jsonl line. NaN (no local test examples, a skipped round) is written as null: strict JSON."""
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in m.items()}
    return json.dumps(clean, default=_json_default) + "\n"


class TrainedNothing(ValueError):
    """A run that finished without any round aggregating anything (every client failed or was rejected in every
    round): its files are kept, and the front ends end non-zero (the CLI with exit code 3) with the reason."""


def check_trained(history: list[dict], out: str | os.PathLike | None = None) -> None:
    """Refuse a finished history in which no round aggregated anything, in one line naming the most frequent
    rejection (client ids left out, so one cause shared by every client reads once) and the fix."""
    import re
    from collections import Counter

    if not history or not all(m.get("skipped") for m in history):
        return
    reasons = Counter(re.sub(r"client \d+", "a client", r.get("reason", "")) for m in history for r in m.get("rejected") or [])
    if reasons:
        reason, n = reasons.most_common(1)[0]
        total = sum(reasons.values())
        why = f"{f'all {total}' if n == total else f'{n} of {total}'} client turn{'s' if total > 1 else ''} failed the same way: {reason}"
    else:
        why = "no client took part"
    fix = ("training diverged: lower --lr, or clip with --max-grad-norm" if "NaN or Inf" in why or "non-finite" in why
           else "fix the cause above")
    kept = f"; its files are kept in {str(out)!r}" if out else ""
    raise TrainedNothing(f"no round of the run aggregated anything ({len(history)} round{'s' if len(history) > 1 else ''} skipped; "
                         f"{why}): {fix}, and start a new run{kept}")


def run_settings(config: RunConfig) -> dict:
    """The settings a run's state belongs to: all but those a resume may change (``rounds``) or that name the place."""
    return {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # after "pid (comm) ": state is field 3, starttime field 22


def lock_text(pid: int) -> str:
    """What a lock file holds: ``PID [START-TIME BOOT-ID]`` (the last two where /proc has them)."""
    start, boot = _start_time(pid), _boot_id()
    return f"{pid} {start} {boot}" if start and boot else str(pid)


def lock_is_live(lock: Path) -> bool | None:
    """Whether the process that wrote a lock file still runs: None when it is this process, False when it is gone (or
    its pid now belongs to another process: a different start time or boot id), True otherwise. Raises
    FileNotFoundError when the lock is gone."""
    text = lock.read_text()
    parts = text.split()
    if not parts:  # being written this instant, or left empty by a kill between creating and writing it
        return time.time() - lock.stat().st_mtime < _EMPTY_LOCK_GRACE
    try:
        pid = int(parts[0])
    except ValueError:
        return False  # not a lock we wrote: nothing holds it
    if pid <= 0:
        return False
    if len(parts) >= 3:
        if parts[2] != _boot_id():
            return False  # written before a reboot
        start = _start_time(pid)
        if start is not None and start != parts[1]:
            return False  # the pid belongs to another process now
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class RunDir:
    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.trackers = None  # open trackers (fedlora.app.tracking.Trackers)
        self._tracking: tuple | None = None  # (config, resume, group) until the first round opens them
        self._earlier: list[dict] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- the place and its lock ----------------------------------------------------------------------------------
    def prepare(self) -> RunDir:
        """Create the directory or refuse in one line: an existing file, a path under a file, or no write permission."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is an existing file, not a directory; pass a directory path")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the run directory {str(out)!r} ({exc.strerror or type(exc).__name__}); pass a writable --out") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"the run directory {str(out)!r} is not writable; pass a writable --out")
        return self

    def take(self) -> bool | None:
        """Take the directory for this process with an exclusive lock file. True: taken now (give it back with
        :meth:`release`); None: this process holds it already; False: another live process does. A lock whose process
        is gone (killed) is stale and taken over.

        Our choice: the lock holds the pid, the process's start time (``/proc/PID/stat``, clock ticks since boot) and
        the kernel's boot id, so a pid that a new process has taken since (a container or machine restart reuses low
        pids) does not keep a dead run's lock alive. Where /proc is missing (not Linux) the pid alone decides; a lock
        written with the pid alone (older fedlora) too."""
        lock = self.path / _LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    alive = lock_is_live(lock)
                except FileNotFoundError:
                    continue  # released meanwhile
                if alive is None:
                    return None
                if alive:
                    return False
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(lock_text(os.getpid()))
            return True
        return False

    def holder(self) -> str:
        try:
            return (self.path / _LOCK).read_text().split()[0]
        except (OSError, IndexError):
            return "?"

    def release(self) -> None:
        (self.path / _LOCK).unlink(missing_ok=True)

    @contextlib.contextmanager
    def hold(self):
        """The directory's lock for the block, or one line saying which process writes it."""
        taken = self.take()
        if taken is False:
            lock = self.path / _LOCK
            raise ValueError(f"{str(self.path)!r} is being written by process {self.holder()} (a run, compare, study or Flower "
                             f"ServerApp); wait for it to finish, or pass another --out; if no run is writing it (process "
                             f"{self.holder()} is not a fedlora run), delete {str(lock)!r}")
        try:
            yield self
        except BaseException as exc:
            self.close_trackers("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if taken:
                self.release()

    # ---- the run in it -------------------------------------------------------------------------------------------
    def start(self, config: RunConfig, *, resume: bool, new_run_hint: str = "pass a new --out, or --resume {out} to continue it",
              group=None) -> tuple | None:
        """Check and record the run's settings; the checkpoint to resume from (None for a new run). ``group``: the
        comparison or study (:class:`fedlora.app.tracking.Group`) whose trackers this run's are children of."""
        checkpoint = None
        if config.track:  # a tracker without its package: refused before anything trains
            from fedlora.app.tracking import require

            require(config.track)
        if resume:
            checkpoint = self.load_checkpoint()
            check_resume(config, checkpoint[1], self.path)
        elif self.has_metrics():
            raise ValueError(f"{str(self.path)!r} already holds a run; {new_run_hint.format(out=self.path)}")
        (self.path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        self._tracking = (config, resume, group) if config.track else None
        return checkpoint

    def open_trackers(self):
        """The run's trackers, opened on first use (after the model is built: a run refused while loading leaves
        nothing in them); None without ``track``."""
        if self.trackers is None and self._tracking is not None:
            from fedlora.app.tracking import open_run

            config, resume, group = self._tracking
            self._tracking = None
            self.trackers = open_run(config, self.path, resume=resume, group=group, earlier=self._earlier if resume else ())
        return self.trackers

    def close_trackers(self, status: str = "FINISHED") -> None:
        trackers, self.trackers, self._tracking = self.trackers, None, None
        if trackers is not None:
            trackers.finish(status)

    def has_metrics(self) -> bool:
        path = self.path / METRICS
        return path.exists() and path.stat().st_size > 0

    def reset_metrics(self, history: list[dict]) -> None:
        """``metrics.jsonl`` as the checkpoint has it: drops any line written after the checkpoint a kill interrupted."""
        (self.path / METRICS).write_text("".join(metrics_line(m) for m in history))
        self._earlier = list(history)  # the rounds a resume restored: a tracker added on resume gets them first

    def record(self, metrics: dict, sim, config: RunConfig, extra: tuple[dict, dict] | None = None) -> None:
        """One finished round: its metrics line, then the checkpoint."""
        with open(self.path / METRICS, "a") as f:
            f.write(metrics_line(metrics))
        self.save_checkpoint(sim, config, extra)
        if self.open_trackers() is not None:
            self.trackers.log_round(metrics)

    def finish(self, exp, history: list[dict], wall_seconds: float) -> None:
        from fedlora.app.export import save_run_artifacts
        from fedlora.app.report import write_summary

        save_run_artifacts(exp, self.path)
        if exp.reference is not None:  # the base model's scores: the reference row of every table of this run
            (self.path / "reference.json").write_text(json.dumps(exp.reference, indent=1, sort_keys=True) + "\n")
        write_summary(exp, history, self.path, wall_seconds=wall_seconds)
        if self.open_trackers() is not None:
            from fedlora.app.tracking import artifacts

            self.trackers.log_artifacts(artifacts(self.path))
            self.close_trackers()

    def finished(self, config: RunConfig) -> list[dict] | None:
        """The history of a finished run of at least ``config.rounds`` rounds, else None."""
        path = self.path / METRICS
        if not (self.path / "summary.md").exists() or not path.exists():
            return None
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if history and "arrivals" in history[-1]:  # asynchronous: a line per version step, the budget counts updates
            return history if history[-1]["arrivals"] >= config.rounds * max(1, int(round(config.fraction * config.clients))) else None
        return history if len(history) >= config.rounds else None

    def interrupted(self) -> bool:
        """Whether a run here stopped after a checkpoint (resume it); a run killed before its first checkpoint leaves
        nothing worth keeping, and its metrics are removed."""
        if (self.path / CHECKPOINT).exists():
            return True
        (self.path / METRICS).unlink(missing_ok=True)
        return False

    # ---- the checkpoint ------------------------------------------------------------------------------------------
    def save_checkpoint(self, sim, config: RunConfig | None = None, extra: tuple[dict, dict] | None = None) -> None:
        save_checkpoint(sim, self.path, config, extra)

    def load_checkpoint(self) -> tuple[dict, dict]:
        return load_checkpoint(self.path)


def untied(tensors: dict) -> dict:
    """``tensors`` with no two sharing memory, as safetensors requires: a tensor whose storage an earlier one already
    uses (the same start state kept by several clients, a frozen A0 in every stored version) is written as a copy."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_checkpoint(sim, out: Path, config: RunConfig | None = None, extra: tuple[dict, dict] | None = None) -> None:
    """One file, replaced atomically: a kill at any moment leaves the previous complete checkpoint. ``config``: the
    run's settings, kept inside the checkpoint so a resume can refuse an edited config.json. ``extra``: (tensors, meta)
    of the Flower strategy, under its own keys (the simulator's restore ignores them)."""
    tensors, meta = sim.snapshot()
    if extra is not None:
        tensors |= extra[0]
        meta["flower"] = extra[1]
    if config is not None:
        meta["config"] = run_settings(config)
    tmp = out / (CHECKPOINT + ".tmp")
    save_file(untied(tensors), str(tmp), metadata={"fedlora": json.dumps(meta, default=_json_default)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"{str(out)!r} has no {CHECKPOINT}; resume needs a run directory with at least one finished round")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["fedlora"])
        return load_file(str(path)), meta
    except Exception as exc:  # truncated, garbage, or not ours: the file and the directory are left as they are
        raise ValueError(f"{str(path)!r} is not a readable fedlora checkpoint ({type(exc).__name__}); nothing was changed: "
                         "restore the file from a copy, or start a new run with another --out") from None


def _saved_settings(saved: dict, mine: dict) -> dict:
    """A setting added to RunConfig after a run or checkpoint was written counts as its default there."""
    defaults = {f.name: f.default for f in RunConfig.fields()}
    return {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(mine)}


def check_resume(config: RunConfig, meta: dict, out: Path) -> None:
    """Refuse to resume a checkpoint under settings other than its own (an edited config.json), or with fewer
    rounds than it has finished."""
    done = int(meta.get("round", 0))
    if config.rounds < done:
        raise ValueError(f"{str(out)!r} has finished {done} rounds; --rounds {config.rounds} would cut it short: pass --rounds {done} or more")
    if meta.get("config") is None:  # a checkpoint from before settings were kept in it
        return
    mine = run_settings(config)
    saved = _saved_settings({k: v for k, v in meta["config"].items() if k not in _RESUMABLE}, mine)
    changed = sorted(k for k in saved if saved.get(k) != mine.get(k))
    if changed:
        diff = ", ".join(f"{k}={mine.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in changed)
        raise ValueError(f"{str(Path(out) / 'config.json')!r} no longer matches the run's checkpoint: {diff}; "
                         "restore config.json, or start a new run with another --out")


def same_settings(out: Path, config: RunConfig) -> bool:
    """Whether the run in ``out`` was made with ``config``'s settings (all but ``out``)."""
    mine = {k: v for k, v in config.to_dict().items() if k not in ("out", "track", "mlflow_uri")}
    saved = _saved_settings(json.loads((Path(out) / "config.json").read_text()), mine)
    return all(saved.get(k) == v for k, v in mine.items())


def resume_config(out: str | os.PathLike, **overrides) -> RunConfig:
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"{str(out)!r} has no config.json; pass the --out directory of an earlier run to --resume")
    return RunConfig(**(json.loads(path.read_text()) | overrides | {"out": str(out)}))
