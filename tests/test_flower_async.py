"""Asynchronous aggregation on Flower (fedlora.flower.asynchronous): FedAsync and FedBuff as a ServerApp loop on the
Message API. On the in-process grid, with replies released in the simulator's event order, every version step equals
``fedlora run --async``'s; what cannot run refuses in one line before any training. A real deployment with a slow
SuperNode is in test_flower_deployment.py."""

import json

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.app.experiment import build  # noqa: E402
from fedlora.federation.asynchronous import parse_speeds  # noqa: E402
from fedlora.flower.inline import InlineGrid  # noqa: E402
from fedlora.flower.server_app import run_federation  # noqa: E402
from test_flower import assert_same_history  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

STEP = ("version", "arrivals", "in_flight", "staleness", "alpha")


@pytest.mark.parametrize("method,mode,fresh", [
    ("fedit", "fedbuff", False),   # buffered arrivals, a fast client sent again from the same version (seed salt)
    ("flora", "fedbuff", True),    # folds: a stale client trains on its version's base, in a fresh process each time
    ("fedex", "fedasync", False),  # a version per arrival; the staleness residual and α_t(base_v − base_now) folded
    ("fedsa", "fedasync", True),   # private B kept by the SuperNode, promoted only when the server accepted it
    ("ilora", "fedbuff", False),   # product-delta FedBuff; the control variate c carried by each version's broadcast
    ("fedhello", "fedasync", False),  # a stale upload screened against the layer blocks of the round it trained for
    ("ravan", "fedasync", False),  # the heads' effective cores s_i·H_i mixed
    ("fslora", "fedbuff", False),  # a client catching up to its version holds that version's sketch; uploads placed by their round
    ("fslora", "fedasync", True),  # the same one arrival at a time, the proximal term anchored at the sketch the client holds
])
def test_flower_async_equals_the_simulator_for_the_same_events(small_csv, tmp_path, method, mode, fresh):
    cfg = tiny_config(small_csv, method=method, async_mode=mode, rounds=2, fedasync_rho=0.1 if method in ("fedex", "fslora") else 0.0)
    reference = build(cfg).simulator.run()
    grid = InlineGrid(cfg, fresh=fresh, speeds=parse_speeds(cfg.client_speeds, cfg.clients))
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    for f, r in zip(history, reference, strict=True):
        assert {k: f.get(k) for k in STEP} == {k: r.get(k) for k in STEP}
        assert len(f["arrived_at"]) == f["arrivals"] - (history[history.index(f) - 1]["arrivals"] if f is not history[0] else 0)
        assert "sim_clock" not in f and f["clock_seconds"] >= 0
    assert history[-1]["arrivals"] == cfg.rounds * cfg.clients
    assert any(t > 0 for m in history for t in m["staleness"])  # the speeds made some update stale
    salts = [m.content.config_records["config"].get("seed-salt", 0) for m in grid.sent if m.metadata.message_type == "train"]
    if mode == "fedbuff":
        assert max(salts) >= 1  # a client sent twice from one version trained with the simulator's other seed


def test_what_cannot_run_async_on_flower_refuses_in_one_line_before_any_training(small_csv, tmp_path, monkeypatch):
    from fedlora.flower import client_app

    monkeypatch.setattr(client_app, "client_turn", lambda *a, **k: pytest.fail("a client trained"))
    cases = [
        (dict(method="florana", async_mode="fedbuff"), "--async fedbuff: florana must run synchronously"),  # the simulator's text
        (dict(method="fedsa", async_mode="fedbuff"), "does not run fedsa, whose clients keep private state"),
        (dict(method="fedit", async_mode="fedasync", client_speeds="1,2"), "client-speeds model simulated time"),
    ]
    for overrides, text in cases:
        cfg = tiny_config(small_csv, **overrides, out=str(tmp_path / overrides["method"]))
        with pytest.raises(ValueError, match=text) as err:
            run_federation(InlineGrid(cfg), cfg)
        assert "\n" not in str(err.value)
    cfg = tiny_config(small_csv, method="fedit", async_mode="fedbuff", out=str(tmp_path / "resumed"))
    with pytest.raises(ValueError, match="resume with async-mode = 'fedbuff' on Flower is not supported") as err:
        run_federation(InlineGrid(cfg), cfg, resume=True)
    assert "\n" not in str(err.value) and not (tmp_path / "resumed").exists()


def test_a_client_that_raises_is_rejected_as_in_the_simulator(small_csv, tmp_path, monkeypatch):
    """Client 1's first turn raises (not its second from the same version, seeded apart): the simulator rejects it at
    its arrival and frees its slot; on Flower its SuperNode's error reply does the same, and every step matches."""
    from fedlora.federation.simulator import client_turn
    from fedlora.flower import client_app

    def flaky(h, method, task, client, start, cfg, rnd):
        if (rnd, client.cid, cfg.seed) == (1, 1, 0):  # its next turn from version 0 has another seed (the salt)
            raise RuntimeError("disk full")
        return client_turn(h, method, task, client, start, cfg, rnd)

    cfg = tiny_config(small_csv, method="fedit", async_mode="fedbuff", rounds=2)
    sim = build(cfg).simulator
    sim.turn = flaky
    reference = sim.run()
    monkeypatch.setattr(client_app, "client_turn", flaky)
    history = run_federation(InlineGrid(cfg, speeds=parse_speeds("", cfg.clients)), cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    rejected = [r for m in history for r in m["rejected"]]
    assert [r["client"] for r in rejected] == [1] and "disk full" in rejected[0]["reason"]
    assert [m["staleness"] for m in history] == [m["staleness"] for m in reference]


def test_a_supernode_replaced_mid_run_takes_its_partition_over(small_csv, tmp_path):
    """After the first arrival, partition 1's SuperNode is gone and a fresh one (no state) holds it: before the next
    dispatch it takes partition 1 over and is sent what it missed, and every version step still equals the simulator's."""
    cfg = tiny_config(small_csv, method="fedit", async_mode="fedasync", rounds=2)

    class Swap(InlineGrid):
        swapped = False

        def pull_messages(self, message_ids):
            got = super().pull_messages(message_ids)
            if not self.swapped and any(m.metadata.message_type == "train" for m in got):
                self.swapped = True
                self.stop_supernode(501)
                self.start_supernode(601, 1)
            return got

    reference = build(cfg).simulator.run()
    grid = Swap(cfg, speeds=parse_speeds("", cfg.clients))
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    to_new = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == 601]
    assert to_new and to_new[0].content.config_records["config"]["broadcast-rounds"]  # caught up from its fresh state
    assert json.loads((tmp_path / "run" / "flower.json").read_text())["supernodes"]["1"] == 601
