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


def export_private(run_dir: Path, state_dir: Path) -> list[Path]:
    """Write the private tensors (FedSA's B and head, FedDPA's local adapter) that the clients of the Flower run in
    ``run_dir`` keep in ``state_dir`` (a SuperNode's ``state-dir``) as ``run_dir/private/client_N.safetensors``, the
    layout ``fedlora run`` writes. Each client's last result counts only if the server accepted it (``flower.json``'s
    ``accepted``), as in-process. Returns the files written; raises one line when nothing in ``state_dir`` is this run's."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = RunConfig(**json.loads((run_dir / "config.json").read_text()))
    mine = run_settings(config)  # a client's state belongs to the run's settings, as its checkpoint does
    flower = json.loads((run_dir / "flower.json").read_text())
    accepted = {int(c): int(r) for c, r in flower.get("accepted", {}).items()}
    written = []
    for path in sorted(Path(state_dir).glob("*/partition-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["fedlora"])
        if meta.get("config") != json.loads(json.dumps(mine)):
            continue  # another run's client
        cid = int(meta["partition-id"])
        tensors = load_file(str(path))
        last = int(meta.get(STATE_META, {}).get("result-round", -1))
        key = STATE_RESULT if accepted.get(cid) == last and STATE_RESULT in meta.get("arrays", []) else STATE_PRIVATE
        private = {n[len(key) + 1:]: t for n, t in tensors.items() if n.startswith(f"{key}/")}
        if not private:
            continue
        (run_dir / "private").mkdir(exist_ok=True)
        out = run_dir / "private" / f"client_{cid}.safetensors"
        save_file({n: t.contiguous() for n, t in private.items()}, str(out))
        written.append(out)
    if not written:
        raise ValueError(f"{str(state_dir)!r} holds no private state of the run in {str(run_dir)!r}; pass the state-dir of a "
                         "SuperNode of that run (its node config), after the run finished")
    return written
