"""The durable state a Flower client keeps between messages (``<state-dir>/<run>/partition-<cid>.safetensors``):
its record names and file layout, written by :mod:`fedlora.flower.client_app` and read back here by
``fedlora export-private``. Application layer: it imports neither front end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedlora.app.experiment import RunConfig
from fedlora.app.rundir import run_settings

STATE_META = "fedlora.meta"
STATE_CURRENT = "fedlora.current"
STATE_PRIVATE = "fedlora.private"
STATE_BASE = "fedlora.base"
STATE_RESULT = "fedlora.private.pending"
STATE_KEYS = (STATE_META, STATE_CURRENT, STATE_PRIVATE, STATE_BASE, STATE_RESULT)


def run_digest(config: RunConfig) -> str:
    """The state-dir folder of a run: a digest of its settings (all but ``rounds``), so a resumed run finds its
    clients' state and another run never does."""
    settings = {k: v for k, v in config.to_dict().items() if k != "rounds"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or one line naming the file and what it should be."""
    if not path.is_file():
        raise ValueError(f"{str(path.parent)!r} has no {path.name}; {what}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not readable JSON ({type(exc).__name__}); restore it from the run, or {what}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds {type(value).__name__}, not a JSON object; restore it from the run, or {what}")
    return value


def _run_of(run_dir: Path) -> tuple[RunConfig, dict[int, int]]:
    """The Flower run in ``run_dir``: its settings and, per client, the round whose result the server accepted last."""
    what = "pass the directory of a finished Flower run (its config.json and flower.json)"
    if not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is not a directory; {what}")
    saved = _read_json(run_dir / "config.json", what)
    try:
        config = RunConfig(**saved)
    except TypeError as exc:
        raise ValueError(f"{str(run_dir / 'config.json')!r} is not a fedlora run's config ({exc}); {what}") from None
    flower = _read_json(run_dir / "flower.json", "it is not a Flower run's directory (`fedlora run` writes its clients' private "
                        "state into RUN/private/ itself); " + what)
    try:
        accepted = {int(c): int(r) for c, r in (flower.get("accepted") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{str(run_dir / 'flower.json')!r} has no valid 'accepted' map of client → round; restore it from the run") from None
    return config, accepted


def _state_file(path: Path) -> tuple[dict, dict] | None:
    """(meta, tensors) of a client's state file, or None for a file that is not one (corrupt, foreign), with a warning."""
    import logging

    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["fedlora"])
        if not isinstance(meta, dict) or "partition-id" not in meta:
            raise KeyError("partition-id")
        int(meta["partition-id"])
        return meta, load_file(str(path))
    except Exception as exc:  # truncated, garbage, or another program's safetensors: not this run's client state
        logging.getLogger("fedlora").warning("export-private: skipped %s: not a readable fedlora client state (%s)", path, type(exc).__name__)
        return None


def export_private(run_dir: Path, state_dir: Path) -> list[Path]:
    """Write the private tensors (FedSA's B and head, FedDPA's local adapter) that the clients of the Flower run in
    ``run_dir`` keep in ``state_dir`` (a SuperNode's ``state-dir``) as ``run_dir/private/client_N.safetensors``, the
    layout ``fedlora run`` writes. Each client's last result counts only if the server accepted it (``flower.json``'s
    ``accepted``), as in-process. A state file that is corrupt or not fedlora's is skipped with a warning. Returns the
    files written; raises one line for a directory that is not a Flower run's, or when nothing in ``state_dir`` is this
    run's."""
    from safetensors.torch import save_file

    run_dir, state_dir = Path(run_dir), Path(state_dir)
    config, accepted = _run_of(run_dir)
    if not state_dir.is_dir():
        raise ValueError(f"--state-dir {str(state_dir)!r} is not a directory; pass the state-dir of a SuperNode of the run (its node config)")
    mine = json.loads(json.dumps(run_settings(config)))  # a client's state belongs to the run's settings, as its checkpoint does
    written, skipped = [], 0
    for path in sorted(state_dir.glob("*/partition-*.safetensors")):
        state = _state_file(path)
        if state is None:
            skipped += 1
            continue
        meta, tensors = state
        if meta.get("config") != mine:
            continue  # another run's client
        cid = int(meta["partition-id"])
        last = int((meta.get(STATE_META) or {}).get("result-round", -1))
        key = STATE_RESULT if accepted.get(cid) == last and STATE_RESULT in meta.get("arrays", []) else STATE_PRIVATE
        private = {n[len(key) + 1:]: t for n, t in tensors.items() if n.startswith(f"{key}/")}
        if not private:
            continue
        (run_dir / "private").mkdir(exist_ok=True)
        out = run_dir / "private" / f"client_{cid}.safetensors"
        save_file({n: t.contiguous() for n, t in private.items()}, str(out))
        written.append(out)
    if not written:
        also = f" ({skipped} unreadable state file(s) skipped)" if skipped else ""
        raise ValueError(f"{str(state_dir)!r} holds no private state of the run in {str(run_dir)!r}{also}; pass the state-dir of a "
                         "SuperNode of that run (its node config), after the run finished")
    return written
