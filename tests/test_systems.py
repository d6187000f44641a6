"""Clients that are slow, absent and late (issue 32, stage 1): the simulated clock, device profiles, availability,
over-selection and deadlines (fedlora.federation.clock, fedlora.federation.systems, fedlora.app.systems)."""

import json
import math

import pytest
import torch

from conftest import TINY_CLI, refused, tiny_config
from fedlora.app.experiment import build, resume_config, run_experiment
from fedlora.federation.clock import ClientWork, DeviceProfile, EventQueue, client_work, examples_processed
from fedlora.federation.simulator import train_local
from fedlora.federation.systems import Instant, Windows, diurnal

# Three hand-made devices: 8 Mbit/s = 1e6 bytes/s both ways; 16, 8 and 1.6 examples/s; latency 10, 100, 1000 ms.
HAND = """
assign = ["fast", "mid", "slow"]
[server]
seconds = 0.25
[profiles.fast]
examples-per-second = 16.0
download-mbps = 8.0
upload-mbps = 8.0
latency-ms = 10.0
[profiles.mid]
examples-per-second = 8.0
download-mbps = 8.0
upload-mbps = 8.0
latency-ms = 100.0
[profiles.slow]
examples-per-second = 1.6
download-mbps = 8.0
upload-mbps = 8.0
latency-ms = 1000.0
"""
WALL = ("wall_seconds", "aggregation_seconds")  # measured, not simulated: they differ between any two runs


@pytest.fixture
def hand(tmp_path):
    path = tmp_path / "hand.toml"
    path.write_text(HAND)
    return str(path)


def simulated(history):
    """As metrics.jsonl holds it (a resumed run's first lines are read back: client_metrics' keys are strings there)."""
    return [json.loads(json.dumps({k: v for k, v in m.items() if k not in WALL})) for m in history]


# -- the clock's pieces -----------------------------------------------------------------------------------------------
def test_examples_processed_is_what_local_training_touches():
    class Counting:
        def __init__(self):
            self.seen = 0

        def loss(self, model, batch):
            self.seen += len(batch["labels"])
            return (model.weight * 0).sum() + model.weight.sum() * 0

    class Split:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def batch(self, index, device):
            return {"labels": index}

    from fedlora.federation import FederationConfig

    for n, steps, batch in [(32, 2, 8), (10, 3, 4), (5, 7, 16), (1, 3, 2)]:
        task, model = Counting(), torch.nn.Linear(1, 1)
        train_local(model, task, Split(n), FederationConfig(local_steps=steps, batch_size=batch), seed=0)
        assert examples_processed(n, steps, batch) == task.seen, (n, steps, batch)


def test_work_done_by_a_time_is_prorated_phase_by_phase():
    profile = DeviceProfile("p", None, upload=1000.0, download=500.0, latency=0.5, examples_per_second=10.0)
    w = client_work(3, profile, bytes_down=1000, bytes_up=2000, examples=20, speed=profile.speed(10**9, 64))
    assert (w.download_s, w.train_s, w.upload_s, w.seconds) == (2.5, 2.0, 2.5, 7.0)
    assert w.done_by(0.0) == (0.0, 0, 0)
    assert w.done_by(2.5) == (2.5, 0, 1000)  # downloaded, not trained
    assert w.done_by(3.5) == (3.5, 10, 1000)  # half the examples
    assert w.done_by(5.75) == (5.75, 20, 1000 + 1000)  # half the upload phase
    assert w.done_by(99.0) == (7.0, 20, 3000)
    flops = DeviceProfile("f", 4e12, upload=1.0, download=1.0, latency=0.0)
    assert flops.speed(10**6, 100) == pytest.approx(4e12 / (4 * 10**6 * 100))  # FLOP/s ÷ (4 · N · tokens)


def test_event_queue_breaks_ties_in_push_order_and_survives_a_checkpoint():
    q = EventQueue()
    for t, cid in [(2.0, 5), (1.0, 9), (2.0, 1), (1.0, 0)]:
        q.push(t, cid, "arrive")
    copy = EventQueue()
    copy.load(json.loads(json.dumps(q.state())))
    order = [(e.time, e.cid) for e in (q.pop() for _ in range(4))]
    assert order == [(1.0, 9), (1.0, 0), (2.0, 5), (2.0, 1)]
    assert [(e.time, e.cid) for e in (copy.pop() for _ in range(4))] == order


def test_windows_and_the_diurnal_generator():
    w = Windows({0: [(10.0, 20.0)], 1: [(80.0, 130.0)]}, period=100.0)
    assert not w.online(0, 1, 5.0) and w.online(0, 1, 10.0) and not w.online(0, 1, 20.0) and w.online(0, 1, 115.0)
    assert w.online(1, 1, 20.0) and w.online(1, 1, 120.0) and not w.online(1, 1, 40.0)  # a window past the period's end
    assert w.online(7, 1, 1e9)  # a client the trace does not name is always online
    work = ClientWork(0, 0, 10, 0, 0.0, 8.0, 0.0)
    assert w.stop(0, 1, 15.0, work) == (5.0, "window-closed") and w.stop(0, 1, 10.0, work) is None
    d = diurnal(50, seed=3)
    share = sum(d.online(c, 1, t) for c in range(50) for t in range(0, 86_400, 3600)) / (50 * 24)
    assert share == pytest.approx(9 / 24)  # online 9 hours a day, whatever the time zone
    assert diurnal(50, seed=3) == d and diurnal(50, seed=4) != d


def test_trace_files_in_toml_and_csv_read_the_same(tmp_path):
    from fedlora.app.systems import availability

    toml, csv = tmp_path / "t.toml", tmp_path / "t.csv"
    toml.write_text('period = 100.0\n[clients]\n"0" = [10, 20]\n"2" = [[0, 5], [50, 60]]\n')
    csv.write_text("client,start,end\n0,10,20\n2,0,5\n2,50,60\n")
    a, b = availability(str(toml), 3, 0), availability(str(csv), 3, 0)
    assert a.windows == b.windows == {0: [(10.0, 20.0)], 2: [(0.0, 5.0), (50.0, 60.0)]}
    assert a.period == 100.0 and b.period is None and a.online(2, 1, 155.0) and not b.online(2, 1, 155.0)


def test_default_profiles_load_with_their_sources_and_clients_draw_them_from_the_seed():
    from fedlora.app.systems import client_profiles, default_devices

    devices = default_devices()
    assert set(devices.profiles) == {"datacenter-gpu", "laptop-cpu", "jetson", "phone-high", "phone-low", "raspberry-pi"}
    speed = {n: p.speed(22_000_000, 64) for n, p in devices.profiles.items()}
    assert speed["datacenter-gpu"] > speed["jetson"] > speed["laptop-cpu"] > speed["phone-low"] > speed["raspberry-pi"]
    a, b = client_profiles(devices, 40, 0), client_profiles(devices, 40, 0)
    assert a == b and a != client_profiles(devices, 40, 1) and len({p.name for p in a}) > 3


# -- the clock by hand -----------------------------------------------------------------------------------------------
def test_the_clock_by_hand_on_three_clients_with_a_deadline(small_csv, hand, one_thread):
    """Shards of 32 training examples, 2 steps of 8: 16 examples per round. Deadline 5 s.

    Round 1 (no catch-up): fast 0.01 + 16/16 + 0.01 + U/1e6; mid 0.1 + 2 + 0.1 + U/1e6; slow 1 + 10 + 1 + U/1e6 > 5:
    dropped at the deadline after 1 s of download (0 bytes) and 4 s of its 10 s of training (6 of 16 examples). The
    round closes at the deadline: 5 + 0.25 (server) + the broadcast to mid, 0.1 + U/1e6 (fedit broadcasts U bytes).
    Round 2: slow first catches up on round 1's broadcast (U bytes, 1 + U/1e6 s), then is dropped at 5 s again,
    having trained (5 − 1 − U/1e6)/10 of its examples."""
    cfg = tiny_config(small_csv, method="fedit", devices=hand, deadline=5.0)
    history = build(cfg).simulator.run()
    per = history[0]["bytes_up"] // 2  # fast and mid upload U each
    spec = build(cfg).simulator.handle
    assert per == sum(t.numel() * t.element_size() for t in spec.get().values())  # U: the adapter's A and B
    one = 5 + 0.25 + 0.1 + per / 1e6
    for rnd, m in enumerate(history, start=1):
        assert m["selected"] == [0, 1, 2] and m["finished"] == [0, 1] and m["clients"] == [0, 1]
        assert m["sim_seconds"] == pytest.approx(one, abs=1e-12)
        assert m["sim_clock"] == pytest.approx(rnd * one, abs=1e-12)
        assert m["bytes_up"] == 2 * per and m["n_dropped"] == 1
    d1, d2 = history[0]["dropped"][0], history[1]["dropped"][0]
    assert d1 == {"cid": 2, "reason": "deadline", "seconds": 5.0, "examples": 6, "bytes": 0}
    assert d2["reason"] == "deadline" and d2["bytes"] == per  # the catch-up it downloaded, then lost
    assert d2["examples"] == math.floor((5 - 1 - per / 1e6) / 10 * 16)
    assert history[1]["wasted_examples"] == d2["examples"] and history[1]["wasted_bytes"] == per


def test_over_selection_keeps_the_first_to_finish(small_csv, hand, one_thread):
    """2 of 3 per round, over-selected ×1.5: all three train, the slow one is surplus once two updates are in."""
    history = build(tiny_config(small_csv, method="fedit", devices=hand, fraction=0.67, over_select=1.5, rounds=1)).simulator.run()
    m = history[0]
    assert m["selected"] == [0, 1, 2] and m["finished"] == [0, 1]
    assert m["dropped"][0]["cid"] == 2 and m["dropped"][0]["reason"] == "surplus"
    assert m["sim_seconds"] == pytest.approx(2.2 + m["bytes_up"] / 2 / 1e6 + 0.25 + 0.1 + m["bytes_up"] / 2 / 1e6, abs=1e-12)


# -- a dropped client changes nothing on the server ---------------------------------------------------------------------
class Picked(Instant):
    """The round's clients are these, whatever the sample: the run where the others were never selected."""

    def __init__(self, cids):
        self.cids = cids

    def select(self, rnd):
        return list(self.cids)


def server_state(sim) -> dict:
    tensors, meta = sim.snapshot()
    return {"tensors": tensors, "traffic": json.dumps(sim.traffic.state(), sort_keys=True)}


@pytest.mark.parametrize("method", ["fedit", "fedsa"])
def test_a_dropped_client_changes_nothing_on_the_server(small_csv, hand, method, one_thread):
    dropped = build(tiny_config(small_csv, method=method, devices=hand, deadline=5.0)).simulator
    never = build(tiny_config(small_csv, method=method)).simulator
    never.systems = Picked([0, 1])
    never.systems.bind(never)
    a, b = dropped.run(), never.run()
    for x, y in zip(a, b):
        for key in ("clients", "global_accuracy", "train_loss", "bytes_up", "bytes_down", "catch_up_bytes", "divergence"):
            assert x[key] == y[key], (x["round"], key)
    sa, sb = server_state(dropped), server_state(never)
    assert sa["traffic"] == sb["traffic"] and sa["tensors"].keys() == sb["tensors"].keys()
    for k in sa["tensors"]:
        assert torch.equal(sa["tensors"][k], sb["tensors"][k]), k


# -- availability: every reason, determinism, resume -------------------------------------------------------------------
TRACE = """
[clients]
1 = [[0.0, 6.0], [12.0, 1000.0]]
"""


def trace_config(small_csv, hand, tmp_path, **over):
    trace = tmp_path / "trace.toml"
    trace.write_text(TRACE)
    return tiny_config(small_csv, method="fedit", devices=hand, deadline=5.0, availability=str(trace), rounds=3, **over)


def test_a_window_that_closes_mid_training_loses_the_work_and_offline_clients_do_not_train(small_csv, hand, tmp_path, one_thread):
    """Rounds take 5.35… s: client 1 (2.2 s) finishes round 1, its window closes 0.65 s into round 2, and it is
    offline when round 3 starts at 10.7 s."""
    history = build(trace_config(small_csv, hand, tmp_path)).simulator.run()
    reasons = [{d["cid"]: d["reason"] for d in m["dropped"]} for m in history]
    assert reasons == [{2: "deadline"}, {1: "window-closed", 2: "deadline"}, {1: "offline", 2: "deadline"}]
    closed = history[1]["dropped"][0]
    assert closed["seconds"] == pytest.approx(6.0 - history[0]["sim_clock"]) and 0 < closed["examples"] < 16
    assert history[2]["dropped"][0] == {"cid": 1, "reason": "offline", "seconds": 0.0, "examples": 0, "bytes": 0}
    assert [m["clients"] for m in history] == [[0, 1], [0], [0]]


def test_the_same_seed_gives_the_same_events_and_metrics(small_csv, one_thread):
    cfg = tiny_config(small_csv, method="fedit", devices="default", availability="dropout:0.4", over_select=1.5, fraction=0.67, rounds=3)
    a, b = build(cfg).simulator.run(), build(cfg).simulator.run()
    assert simulated(a) == simulated(b)
    assert any(m["n_dropped"] for m in a) and all(m["sim_clock"] > 0 for m in a)
    c = build(cfg.replace(seed=1)).simulator.run()
    assert [m["dropped"] for m in c] != [m["dropped"] for m in a] or [m["sim_seconds"] for m in c] != [m["sim_seconds"] for m in a]


def test_a_resumed_run_continues_the_clock_and_the_availability(small_csv, hand, tmp_path, one_thread):
    whole = trace_config(small_csv, hand, tmp_path, out=str(tmp_path / "whole"))
    _, reference = run_experiment(whole)
    cut = whole.replace(rounds=2, out=str(tmp_path / "cut"))
    run_experiment(cut)
    _, resumed = run_experiment(resume_config(cut.out, rounds=3), resume=True)
    assert simulated(resumed) == simulated(reference)
    assert resumed[2]["dropped"][0]["reason"] == "offline"  # only a continued clock puts round 3 in client 1's gap


def test_without_systems_settings_nothing_is_recorded(small_csv, one_thread):
    sim = build(tiny_config(small_csv, method="fedit", rounds=1)).simulator
    assert type(sim.systems) is Instant
    assert not {"sim_seconds", "sim_clock", "selected", "dropped"} & set(sim.run()[0])


# -- bad input: one line, exit 2, before any training ---------------------------------------------------------------------
T = TINY_CLI


def test_bad_systems_input_is_one_line_before_any_training(small_csv, tmp_path, capsys):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('assign = ["phone-high", "smartwatch"]\n')
    ghost = tmp_path / "ghost.csv"
    ghost.write_text("client,start,end\n0,0,100\n7,0,100\n")
    out = tmp_path / "run"
    run = ["run", *T, "--data", str(small_csv), "--method", "fedit", "--out", str(out)]
    cases = [
        (["--devices", str(unknown)], "unknown device profile 'smartwatch'"),
        (["--devices", str(tmp_path / "missing.toml")], "does not exist"),
        (["--devices", "default", "--availability", str(ghost)], "windows for client 7, but the run has clients 0 … 2"),
        (["--devices", "default", "--deadline", "0"], "--deadline 0.0 must be a positive number"),
        (["--devices", "default", "--deadline", "-3"], "--deadline -3.0 must be a positive number"),
        (["--over-select", "0.5"], "--over-select 0.5 is below 1"),
        (["--availability", "dropout:1"], "dropout probability must lie in [0, 1)"),
        (["--availability", "dropout:-0.1"], "dropout probability must lie in [0, 1)"),
        (["--deadline", "30"], "--deadline counts simulated seconds in the simulator, which need device profiles"),
        (["--availability", "diurnal"], "need simulated time; add --devices default"),
        (["--devices", "default", "--availability", "weekly"], "neither dropout:P, diurnal nor an existing file"),
        (["--dp", "client", "--over-select", "1.5"], "would change the sampling rate the accountant assumes"),
    ]
    for flags, needle in cases:
        assert needle in refused(capsys, run + flags), flags
        assert not out.exists()  # refused before anything was written or trained
    assert "--target-accuracy 1.5 is outside (0, 1]" in refused(
        capsys, ["compare", *T, "--data", str(small_csv), "--methods", "fedit", "--target-accuracy", "1.5", "--out", str(out)])
    assert not out.exists()


def test_flower_refuses_simulated_time_in_one_line_and_takes_the_deadline_as_the_round_timeout(small_csv, tmp_path, one_thread):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    with pytest.raises(ValueError, match="devices, over-select model"):
        run_federation(None, tiny_config(small_csv, method="fedit", devices="default", over_select=1.5, out=str(tmp_path / "f")))
    assert not (tmp_path / "f").exists()

    class Timed(InlineGrid):
        waits: list = []

        def send_and_receive(self, messages, *, timeout=None):
            self.waits.append(timeout)
            return super().send_and_receive(messages, timeout=timeout)

    cfg = tiny_config(small_csv, method="fedit", rounds=1, deadline=7.5)
    history = run_federation(Timed(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert Timed.waits == [7.5]  # the round waits the deadline (shorter than round-timeout's 1800 s), not more
    assert_same_history(history, build(cfg.replace(deadline=None)).simulator.run())  # nobody was late: the plain round


# -- compare: time and bytes to target -----------------------------------------------------------------------------------
def test_reach_and_the_target_table():
    from fedlora.app.targets import default_target, reach, target_table

    def run(accs, clock=True):
        return [{"round": i + 1, "global_accuracy": a, "bytes_up": 1_000_000, "bytes_down": 500_000} | ({"sim_clock": 10.0 * (i + 1)} if clock else {})
                for i, a in enumerate(accs)]

    assert reach(run([0.2, 0.5, 0.7]), 0.5) == {"round": 2, "sim_seconds": 20.0, "mb": 3.0}
    assert reach(run([0.2, 0.4]), 0.5) is None
    histories = {"fedit": [run([0.2, 0.6]), run([0.6, 0.7]), run([0.1, 0.2])], "ffa": [run([0.1, 0.2])] * 3, "central": [run([0.7, 0.8])] * 2}
    assert default_target(histories) == pytest.approx(0.72)
    table = target_table(histories, 0.6, "--target-accuracy")
    assert "| fedit | 2/3 | 1.5 ± 6.4 | 15.0 ± 63.5 | 2.250 ± 9.530 |" in table
    assert "| ffa | never (0/3) | — | — | — |" in table
    assert "— (no clock)" in target_table({"fedit": [run([0.9], clock=False)]}, 0.5, "x")


def test_compare_reports_time_to_target_and_plots_accuracy_against_time(small_csv, tmp_path, one_thread):
    from fedlora.app.compare import compare

    base = tiny_config(small_csv, devices="default", rounds=2)
    result = compare(base, "fedit,central", out=tmp_path / "cmp")
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Time to target" in text and "0.9 × central's final global accuracy" in text
    assert (tmp_path / "cmp" / "accuracy_time.png").stat().st_size > 0
    assert "| central | 1/1 |" in result.table  # central reaches 0.9 × its own final accuracy


def test_dropout_drops_at_its_rate_somewhere_inside_the_round():
    from fedlora.federation.systems import Dropout

    work = ClientWork(0, 0, 10, 0, 0.0, 4.0, 0.0)
    stops = [Dropout(0.2, seed=0).stop(cid, rnd, 0.0, work) for rnd in range(1, 101) for cid in range(100)]
    hit = [s for s in stops if s is not None]
    assert 0.18 < len(hit) / len(stops) < 0.22
    assert all(0.0 <= t < 4.0 and why == "dropout" for t, why in hit)
    assert stops == [Dropout(0.2, seed=0).stop(cid, rnd, 0.0, work) for rnd in range(1, 101) for cid in range(100)]
