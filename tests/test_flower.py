"""The Flower app's logic without Flower's runtime: run config, and the ServerApp/ClientApp round driven through an
in-process Grid that serialises every message (and, in "fresh process" mode, every client's context) as Flower
does. The numbers must equal the in-process simulator's exactly, with partial sampling (catch-up broadcasts),
restarted client processes and failing clients. Flower's own runtime is exercised in test_flower_simulation.py
and test_flower_deployment.py."""

import json
import math
import tomllib
from pathlib import Path

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from fedlora.app.experiment import RunConfig, build  # noqa: E402
from fedlora.flower import client_app  # noqa: E402
from fedlora.flower.config import from_flower, to_flower  # noqa: E402
from fedlora.flower.inline import InlineGrid  # noqa: E402, F401  (also imported from here by other tests)
from fedlora.flower.server_app import run_federation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("round", "method", "clients", "divergence", "divergence_per_layer", "bound", "bound_per_layer", "bytes_up", "bytes_down")
CLOSE = ("global_accuracy", "local_accuracy", "local_global_gap", "train_loss")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def assert_same_history(flower: list[dict], reference: list[dict]) -> None:
    assert len(flower) == len(reference)
    for f, r in zip(flower, reference):
        for key in EXACT:
            assert f[key] == r[key], (f["round"], key, f[key], r[key])
        for key in CLOSE:
            assert (math.isnan(f[key]) and math.isnan(r[key])) or f[key] == pytest.approx(r[key], abs=1e-9), (f["round"], key)
        assert [x["client"] for x in f.get("rejected", [])] == [x["client"] for x in r.get("rejected", [])]


def test_pyproject_declares_the_app_and_every_flag_of_fedlora_run():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlora.flower.server_app:app", "clientapp": "fedlora.flower.thin_client:app"}
    # Every key is a long flag of `fedlora run`, at its default: drift between the two fails here.
    assert app["config"] == to_flower(RunConfig())
    assert from_flower(app["config"]) == RunConfig()


def test_run_config_round_trips_and_rejects_what_fedlora_run_rejects():
    cfg = RunConfig(method="fedsa", keep_head_local=False, examples_per_client=None, out="/tmp/x", lora_alpha=8.0, rounds=3)
    flat = to_flower(cfg)
    assert flat["examples-per-client"] == 0 and flat["keep-head-local"] is False and flat["lora-alpha"] == 8.0
    assert from_flower(flat) == cfg
    assert from_flower({"lora-alpha": 16, "keep-head-local": "auto", "out": ""}) == RunConfig()  # TOML's int for a float
    with pytest.raises(ValueError, match="local-step"):
        from_flower({"local-step": 3})  # a typo names the key and lists the flags
    with pytest.raises(ValueError, match="rounds=2.5"):
        from_flower({"rounds": 2.5})
    with pytest.raises(ValueError, match="method"):
        from_flower({"method": 3})


@pytest.mark.parametrize("method,adapter,fraction,fresh", [
    ("fedsa", "lora", 0.67, True),    # private B across rounds, restarted processes
    ("flora", "lora", 0.67, True),    # stacked folds into the base, re-init; catch-up of missed broadcasts
    ("fedex", "lora", 0.67, False),   # residual folds
    ("ffa", "lora", 1.0, False),      # A0 from the seeded init, never sent
    ("florana", "lora", 1.0, False),
    ("fedit", "dora", 1.0, False),    # magnitude vectors shared
    ("svd", "rslora", 0.67, False),
    ("fedex", "hira", 1.0, True),     # folds as W0 ⊙ R, restored in a new process
    ("fedsa", "vera", 1.0, False),    # λ_d shared, λ_b private
    ("fedsb", "lora", 0.67, True),    # seeded bases rebuilt identically in every process; only cores travel
    ("ravan", "rslora", 1.0, False),  # gains reset to 1 on every client
    ("feddpa", "lora", 0.67, True),   # the local adapter stays in each SuperNode's state
    ("fedlease", "lora", 0.67, True),  # round 0's clustering; routers private, scored from the eval extras
])
def test_flower_round_equals_the_simulator(small_csv, tmp_path, method, adapter, fraction, fresh):
    cfg = tiny_config(small_csv, method=method, adapter=adapter, fraction=fraction, rounds=3)
    reference = build(cfg).simulator.run()
    grid = InlineGrid(cfg, fresh=fresh)
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    if fraction < 1:  # some client missed a round and caught up on more than one broadcast at once
        assert any(len(m.content.config_records["config"]["broadcast-rounds"]) > 1 for m in grid.sent if m.metadata.message_type == "train")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3] and lines[-1]["bytes_up"] == reference[-1]["bytes_up"]
    for name in ("config.json", "summary.md", "flower.json", "adapter/adapter_config.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "base_delta.safetensors").exists() == (method in ("fedex", "flora"))


def test_failing_client_is_left_out_exactly_as_in_the_simulator(small_csv, tmp_path, monkeypatch):
    """Client 1 raises in round 2: the round goes on without it, and its FedSA B from round 2 is never kept."""
    from fedlora.federation.simulator import client_turn

    def flaky(h, method, task, client, start, cfg, rnd):
        if (rnd, client.cid) == (2, 1):
            raise RuntimeError("disk full")
        return client_turn(h, method, task, client, start, cfg, rnd)

    cfg = tiny_config(small_csv, method="fedsa", rounds=3)
    sim = build(cfg).simulator
    sim.turn = flaky
    reference = sim.run()
    monkeypatch.setattr(client_app, "client_turn", flaky)
    history = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "run")))
    assert [x["client"] for x in history[1]["rejected"]] == [1]
    assert "disk full" in history[1]["rejected"][0]["reason"]
    assert_same_history(history, reference)


def test_a_rejected_upload_is_screened_out_and_its_private_state_dropped(small_csv, tmp_path, monkeypatch):
    """Client 0's round-2 upload has the wrong shape: the simulator's screening rejects it, the round goes on, and
    (FedSA) the B it trained in that round is not what it starts round 3 from, exactly as in the simulator."""
    from fedlora.federation.simulator import client_turn

    def corrupt(h, method, task, client, start, cfg, rnd):
        result = client_turn(h, method, task, client, start, cfg, rnd)
        if (rnd, client.cid) == (2, 0):
            name = next(iter(result.upload))
            result.upload[name] = result.upload[name][:1]
        return result

    cfg = tiny_config(small_csv, method="fedsa", rounds=3)
    sim = build(cfg).simulator
    sim.turn = corrupt
    reference = sim.run()
    monkeypatch.setattr(client_app, "client_turn", corrupt)
    history = run_federation(InlineGrid(cfg, fresh=True), cfg.replace(out=str(tmp_path / "run")))
    assert history[1]["clients"] == [1, 2]
    assert [x["client"] for x in history[1]["rejected"]] == [0] and "shape" in history[1]["rejected"][0]["reason"]
    assert_same_history(history, reference)


def test_a_supernode_without_partition_id_says_how_to_start_it():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="--node-config 'partition-id=N"):
        client_app.partition_id(ctx)
