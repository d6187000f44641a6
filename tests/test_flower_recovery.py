"""Flower runs that survive: a ServerApp resumed from its checkpoint, SuperNodes restarted with and without a state
directory, a client whose state is gone rejoining with a snapshot (its bytes counted). Driven through the in-process
grid (:mod:`fedlora.flower.inline`), which serialises every message and client context as Flower does; a restart
is a new node id with an empty ``context.state``, a resumed run is a new grid (Flower gives it a new run id)."""

import json

import pytest
import torch

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.flower import client_app  # noqa: E402
from fedlora.flower.inline import InlineGrid  # noqa: E402
from fedlora.flower.server_app import run_federation  # noqa: E402
from test_flower import assert_same_history  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def lines(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def private_b(grid: InlineGrid, partition: int) -> dict:
    """The FedSA client's private tensors as its SuperNode holds them (after the round it last trained)."""
    ctx = next(c for c in grid.contexts.values() if c.node_config["partition-id"] == partition)
    rec = ctx.state.array_records.get(client_app.STATE_RESULT) or ctx.state.array_records[client_app.STATE_PRIVATE]
    return {k: v.clone() for k, v in rec.to_torch_state_dict().items()}


@pytest.mark.parametrize("method", ["fedsa", "fedex"])
def test_a_resumed_serverapp_ends_with_the_uninterrupted_metrics(small_csv, tmp_path, method):
    """Killed after round 2 (the run directory has its checkpoint), resumed by a new `flwr run` (new run id, so
    empty contexts): with state directories the clients continue from their own state, and every number equals the
    uninterrupted run's, bytes included."""
    cfg = tiny_config(small_csv, method=method, rounds=4, fraction=0.67)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))

    out = tmp_path / "killed"
    run_federation(InlineGrid(cfg, state_dir=tmp_path / "nodes"), cfg.replace(rounds=2, out=str(out)))
    assert (out / "checkpoint.safetensors").exists() and len(lines(out)) == 2
    client_app._ProcessModel._loaded = None  # new processes
    resumed = run_federation(InlineGrid(cfg, state_dir=tmp_path / "nodes", fresh=True), cfg.replace(out=str(out)), resume=True)
    assert_same_history(resumed, full)
    assert_same_history(lines(out), full)


def test_resumed_without_state_directories_the_clients_rejoin_with_a_snapshot(small_csv, tmp_path):
    """Nothing of the clients survived: each reports no state, the server sends it the state it should hold (the
    global trainables, and fedex's folded base weights) instead of failing, and counts those bytes."""
    cfg = tiny_config(small_csv, method="fedex", rounds=4)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))
    out = tmp_path / "killed"
    run_federation(InlineGrid(cfg), cfg.replace(rounds=2, out=str(out)))
    client_app._ProcessModel._loaded = None
    grid = InlineGrid(cfg, fresh=True)
    resumed = run_federation(grid, cfg.replace(out=str(out)), resume=True)
    snapshots = [m for m in grid.sent if m.metadata.message_type == "train" and "snapshot-round" in m.content.config_records["config"]]
    assert len(snapshots) == cfg.clients and all(len(m.content.array_records["snapshot.base"]) for m in snapshots)
    third = resumed[2]
    assert third["n_rejected"] == 0 and third["rejoin_bytes"] > 0
    assert third["bytes_down"] == full[2]["bytes_down"] + third["rejoin_bytes"]
    for key in ("global_accuracy", "local_accuracy", "divergence"):  # fedex holds no private state: nothing was lost
        assert third[key] == pytest.approx(full[2][key], abs=1e-9) and resumed[3][key] == pytest.approx(full[3][key], abs=1e-9)
    assert "rejoin_bytes" not in resumed[3]


class RestartingGrid(InlineGrid):
    """Right after round ``after``'s train messages were answered, starts a new SuperNode for ``partition`` (a new
    node id, no in-memory state). ``old``: what happens to the one it replaces: ``"stop"``, gone (kill -9, and the
    SuperLink no longer lists it); ``"kill"``, killed -9 but still listed, never answering again; ``"keep"``, alive
    (the newcomer is a duplicate)."""

    def __init__(self, *args, partition: int, after: int, old: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        self.partition, self.after, self.old, self.before = partition, after, old, None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == str(self.after) for m in messages):
            old = next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == self.partition)
            if self.config.method == "fedsa":
                self.before = private_b(self, self.partition)
            if self.old == "stop":
                self.stop_supernode(old)
            elif self.old == "kill":
                self.kill_supernode(old)
            self.start_supernode(old + 100, self.partition)
        return replies


def test_a_supernode_restarted_with_its_state_directory_continues_with_its_own_b(small_csv, tmp_path, monkeypatch):
    cfg = tiny_config(small_csv, method="fedsa", rounds=4)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))
    starts = {}
    real_turn = client_app.client_turn

    def turn(h, method, task, client, start, fcfg, rnd):  # what client 1 trains from in round 3
        if client.cid == 1 and rnd == 3:
            starts.update({k: v.clone() for k, v in start.items()})
        return real_turn(h, method, task, client, start, fcfg, rnd)

    monkeypatch.setattr(client_app, "client_turn", turn)
    grid = RestartingGrid(cfg, partition=1, after=2, state_dir=tmp_path / "nodes")
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "restarted")))
    assert_same_history(history, full)  # its B came back from the state directory: nothing differs
    assert grid.before and all(torch.equal(starts[k], v) for k, v in grid.before.items())  # its own B, bit for bit
    flower = json.loads((tmp_path / "restarted" / "flower.json").read_text())
    assert flower["supernodes"]["1"] == 601  # the partition moved to the restarted SuperNode


def test_a_supernode_restarted_without_state_rejoins_and_only_it_loses_its_b(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="fedsa", rounds=4)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))
    grid = RestartingGrid(cfg, partition=1, after=2)
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "restarted")))
    assert history[2]["clients"] == [0, 1, 2] and history[2]["n_rejected"] == 0  # it rejoined at once (it said it had no state)
    assert history[2]["rejoin_bytes"] > 0
    assert_same_history(history[:2], full[:2])


def test_causal_lm_fedsa_on_flower_and_its_private_b_exported_from_the_state_directories(tmp_path, small_csv, capsys):
    """Instruction tuning (tiny Llama) through the Flower app equals `fedlora run`; FedSA's private B, which never
    left the SuperNodes, comes out of their state directories into the layout `fedlora run` writes."""
    import pandas as pd
    from safetensors.torch import load_file

    from fedlora.app.experiment import run_experiment
    from fedlora.cli.main import main
    from test_causal_lm import tiny_lm_config

    data = tmp_path / "instr.jsonl"
    frame = pd.read_csv(small_csv).groupby("label").head(20)
    data.write_text("".join(json.dumps({"prompt": f"Sentiment of: {t[:80]}", "response": lab, "label": lab}) + "\n"
                            for t, lab in zip(frame["text"], frame["label"])))
    cfg = tiny_lm_config(data, method="fedsa", rounds=2)
    run_experiment(cfg.replace(out=str(tmp_path / "inprocess")))
    want = lines(tmp_path / "inprocess")
    grid = InlineGrid(cfg, fresh=True, state_dir=tmp_path / "nodes")
    got = run_federation(grid, cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(got, want)
    assert not (tmp_path / "flower" / "private").exists()  # nothing private reached the server
    for i in range(cfg.clients):
        assert main(["export-private", str(tmp_path / "flower"), "--state-dir", str(tmp_path / "nodes" / f"supernode-{i}")]) == 0
    for i in range(cfg.clients):
        a = load_file(str(tmp_path / "flower" / "private" / f"client_{i}.safetensors"))
        b = load_file(str(tmp_path / "inprocess" / "private" / f"client_{i}.safetensors"))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert main(["export-private", str(tmp_path / "flower"), "--state-dir", str(tmp_path)]) == 2
    assert "holds no private state of the run" in capsys.readouterr().err


def test_a_fresh_supernode_takes_over_a_dead_ones_partition_and_catches_up(small_csv, tmp_path):
    """The dead SuperNode is still listed when the fresh one appears, so the fresh one waits on standby; the dead one
    misses round 2 (no reply, recorded) and the fresh one takes its partition at round 3, sent what it missed."""
    cfg = tiny_config(small_csv, method="fedsa", rounds=4)
    grid = RestartingGrid(cfg, partition=1, after=1, old="kill")
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "replaced")))
    assert history[1]["clients"] == [0, 2] and "no reply" in history[1]["rejected"][0]["reason"]
    assert history[2]["clients"] == [0, 1, 2] and history[2]["n_rejected"] == 0
    # it never applied round 1's broadcast and the server still holds it (client 1 had not applied it either): the
    # fresh client gets rounds 1 and 2 as catch-up, counted, and starts its private B afresh
    assert history[2]["catch_up_bytes"] > 0 and "rejoin_bytes" not in history[2] and history[3]["catch_up_bytes"] == 0
    assert history[3]["clients"] == [0, 1, 2]
    flower = json.loads((tmp_path / "replaced" / "flower.json").read_text())
    assert flower["supernodes"]["1"] == 601


def test_a_duplicate_supernode_for_a_live_partition_waits_on_standby(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="fedsa", rounds=3)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))
    grid = RestartingGrid(cfg, partition=1, after=1, old="keep")
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "duplicate")))
    assert_same_history(history, full)  # the live SuperNode kept its partition
    assert json.loads((tmp_path / "duplicate" / "flower.json").read_text())["supernodes"]["1"] == 501
