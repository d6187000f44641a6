"""Asynchronous aggregation (issue 32, stage 2): FedAsync and FedBuff in the simulator (fedlora.federation.asynchronous)."""

import json

import pytest
import torch

from conftest import TINY_CLI, refused, tiny_config
from fedlora.app.experiment import build, resume_config, run_experiment
from fedlora.cli.main import main
from fedlora.federation import REGISTRY, make_method
from fedlora.federation.asynchronous import Asynchronous, parse_speeds, staleness_weight
from fedlora.federation.clock import EventQueue
from fedlora.federation.traffic import nbytes

WALL = ("wall_seconds", "aggregation_seconds")
ASYNC_ONLY = ("staleness", "alpha", "version", "arrivals", "in_flight", "sim_seconds", "sim_clock")


def simulated(history):
    """The simulated part of a history, as metrics.jsonl holds it (a resumed run's first lines are read back)."""
    return [json.loads(json.dumps({k: v for k, v in m.items() if k not in WALL})) for m in history]


def synchronous_part(m):
    return {k: v for k, v in m.items() if k not in WALL + ASYNC_ONLY}


# -- the weights by hand ----------------------------------------------------------------------------------------------
def test_staleness_weights_by_hand_and_the_hinge_trap():
    assert [staleness_weight("constant", t, 0.5, 4) for t in (0, 3, 100)] == [1.0, 1.0, 1.0]
    assert staleness_weight("poly", 0, 0.5, 4) == 1.0
    assert staleness_weight("poly", 3, 0.5, 4) == pytest.approx(0.5)  # (3+1)^-1/2
    assert staleness_weight("poly", 8, 1.0, 4) == pytest.approx(1 / 9)
    a, b = 10.0, 4.0
    assert [staleness_weight("hinge", t, a, b) for t in range(5)] == [1.0] * 5  # τ ≤ b
    assert staleness_weight("hinge", 5, a, b) == pytest.approx(1 / (a + 1))  # τ = b+1: the paper's 1/(a+1) ...
    assert staleness_weight("hinge", 5, a, b) != pytest.approx(1 / (a * (2 * b + 1) + 1))  # ... not FedLLM-Factory's
    assert staleness_weight("hinge", 7, a, b) == pytest.approx(1 / (3 * a + 1))
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness_weight("linear", 1, a, b)


def test_client_speeds_are_given_in_turn():
    assert parse_speeds("1,2,4", 5) == (1.0, 2.0, 4.0, 1.0, 2.0)
    assert parse_speeds("", 4) == (1.0, 2.0, 4.0, 1.0)
    for bad in ("1,0", "-1", "x", ",", "1,2,3,4"):
        with pytest.raises(ValueError, match="--client-speeds"):
            parse_speeds(bad, 3)


def test_equal_times_break_ties_by_client_id_never_by_push_order():
    q = EventQueue()
    for cid in (2, 0, 1):
        q.push(5.0, cid, "arrive", tie=cid)
    q.push(1.0, 3, "arrive", tie=3)
    assert [q.pop().cid for _ in range(4)] == [3, 0, 1, 2]


def test_every_method_declares_its_asynchronous_trait():
    for name, cls in REGISTRY.items():
        assert cls.asynchronous in ("", "exact", "inexact", "fedbuff"), name
    assert REGISTRY["ffa"].asynchronous == REGISTRY["fedsb"].asynchronous == REGISTRY["flora"].asynchronous == "exact"
    assert REGISTRY["fedit"].asynchronous == "inexact"
    assert REGISTRY["ravan"].asynchronous == REGISTRY["florist"].asynchronous == "exact"
    for name in ("hetlora", "fedrot", "feddpa", "frlora", "fedhello", "fslora"):
        assert REGISTRY[name].asynchronous == "inexact", name
    assert not make_method("hetlora").asynchronous and make_method("hetlora", weights="data").asynchronous == "inexact"
    for name in ("svd", "flexlora", "fedmomentum", "ilora"):  # METHODS.md: FedBuff only, in product-delta form
        assert REGISTRY[name].asynchronous == "fedbuff" and REGISTRY[name].async_text() == "fedbuff only", name
    for name in ("rolora", "loraa2", "fedsvd", "florana", "lorafair", "hilora", "fedlease", "slora"):  # METHODS.md: synchronous only
        assert not REGISTRY[name].asynchronous and REGISTRY[name].async_refusal, name


# -- what must hold --------------------------------------------------------------------------------------------------
# hetlora: its sparsity weights stay synchronous; fedhello: one block per client, so the upload's layout is its round's
SYNC_OPTIONS = {"hetlora": "hetlora-weights=data", "fedhello": "fedhello-layers=1"}


@pytest.mark.parametrize("method", ["fedit", "ffa", "flora", "florist", "ravan", "svd", "flexlora", "fedmomentum",
                                    "ilora", "hetlora", "fedrot", "feddpa", "frlora", "fedhello", "fslora"])
def test_fedbuff_without_staleness_is_the_synchronous_run(small_csv, method, one_thread):
    """K = clients = C, equal speeds, all available, equal shards, uniform weighting: the synchronous run."""
    sync_cfg = tiny_config(small_csv, method=method, weighting="uniform", rounds=3, method_options=SYNC_OPTIONS.get(method, ""))
    sync = build(sync_cfg).simulator.run()
    buff = build(sync_cfg.replace(async_mode="fedbuff", buffer=3, async_concurrency=3, client_speeds="1")).simulator.run()
    assert len(buff) == len(sync) == 3
    for s, b in zip(sync, buff):
        assert b["staleness"] == [0, 0, 0] and b["version"] == s["round"]
        for key in ("global_accuracy", "bytes_up", "bytes_down", "clients"):
            assert b[key] == s[key], (key, s["round"])
        assert b["train_loss"] == pytest.approx(s["train_loss"], rel=1e-6)
    assert [b["sim_clock"] for b in buff] == [2.0, 4.0, 6.0]  # local_steps × speed 1 per version


def test_fedasync_with_one_client_and_alpha_one_is_its_local_training(small_csv, one_thread):
    cfg = tiny_config(small_csv, method="fedit", clients=1, rounds=3)
    sync = build(cfg).simulator
    sync.run()
    fa = build(cfg.replace(async_mode="fedasync", fedasync_alpha=1.0)).simulator
    history = fa.run()
    assert [m["staleness"] for m in history] == [[0]] * 3 and [m["alpha"] for m in history] == [1.0] * 3
    for name, t in sync.global_tensors.items():
        assert torch.equal(t, fa.global_tensors[name]), name
    assert [m["global_accuracy"] for m in history] == [m["global_accuracy"] for m in sync.history]


# fedsb without its round 0; florist folding all of ΔW* (exact; below τ = 1 it is exact up to its threshold)
OPTIONS = {"fedsb": "fedsb-init=random", "florist": "florist-tau=1.0", "hetlora": "hetlora-weights=data",
           "fedhello": "fedhello-layers=1"}


class Recorder(Asynchronous):
    """Keeps every server state (trainables and base weights) and every client's start and upload."""

    def bind(self, sim):
        super().bind(sim)
        self.steps, self.trained = [], []

    def _close(self, results, taus, started, alpha=None):
        before = ({n: t.clone() for n, t in self.sim.global_tensors.items()}, {m: w.clone() for m, w in self._base().items()})
        arrivals = self.trained[len(self.trained) - len(results):]
        super()._close(results, taus, started, alpha)
        after = (dict(self.sim.global_tensors), {m: w.clone() for m, w in self._base().items()})
        self.steps.append((before, arrivals, taus, alpha, after))

    def _train(self, flight):
        base = self.bases.get(flight.version) or {m: w.clone() for m, w in self._base().items()}
        result = super()._train(flight)
        self.trained.append(({n: t.clone() for n, t in self.store[flight.version].items()}, base, result.upload))
        return result


def recorded_run(cfg):
    """``cfg``'s asynchronous run under a :class:`Recorder`, checked to have had stale arrivals: (recorder, handle)."""
    sim = build(cfg).simulator
    rec = Recorder(sim.systems.config)
    sim.systems = rec
    rec.bind(sim)
    sim.run()
    assert max(t for _, _, taus, _, _ in rec.steps for t in taus) >= 1  # staleness happened
    return rec, sim.handle


def effective(h, tensors, base):
    """Per adapted module the weight the model computes with: base + s·B·A (Fed-SB: s·B·R·A; RAVAN: s·B·blockdiag(s_iH_i)·A),
    as d×k."""
    out = {}
    for module, k in h.keys.items():
        B, A = tensors[k.B], tensors[k.A]
        product = B @ torch.block_diag(*h.core_of(tensors, module)) @ A if k.core else B @ A  # RAVAN: blockdiag(s_i H_i)
        out[module] = h.base_layout(module, base[module]) + h.scaling(module) * product
    return out


@pytest.mark.parametrize("method, mode, exact", [("ffa", "fedasync", True), ("fedsb", "fedasync", True), ("flora", "fedasync", True),
                                                 ("flora", "fedbuff", True), ("fedex", "fedasync", True),
                                                 ("fedex", "fedbuff", True), ("fedit", "fedasync", False),
                                                 ("ravan", "fedasync", True), ("ravan", "fedbuff", True),
                                                 ("florist", "fedasync", True), ("florist", "fedbuff", True),
                                                 ("hetlora", "fedbuff", False), ("fedrot", "fedasync", False),
                                                 ("feddpa", "fedbuff", False), ("frlora", "fedasync", False),
                                                 ("frlora", "fedbuff", False), ("fedhello", "fedbuff", False)])
def test_exact_methods_move_w_as_the_full_parameter_rule_under_staleness(small_csv, method, mode, exact, one_thread):
    """Stale arrivals (speeds 1,2,4, C = 3): FedAsync W ← (1−α_t)W + α_t W_u and FedBuff W ← W + (1/K)Σ h(τ)(W_u − W_{v_u})
    at every step, W_u the client's trained model on its version's base. ffa (B against A0), fedsb (R between fixed
    bases) and flora (fresh factors, the fold with the base term) are that rule, as are ravan (its effective cores
    s_i·H_i mixed) and florist at τ = 1; fedit's separate mixes of B and A are not (the bilinear error
    α_t(1−α_t)s(B_u − B)(A_u − A)), nor those of the other inexact methods (hetlora with data weights, fedrot,
    feddpa's global adapter, frlora's folded mix, fedhello's per-block mixes)."""
    cfg = tiny_config(small_csv, method=method, rounds=3, async_mode=mode, async_concurrency=3, buffer=2,
                      method_options=OPTIONS.get(method, ""))
    rec, h = recorded_run(cfg)
    same = []
    for (x, base), arrivals, taus, alpha, (x_new, base_new) in rec.steps:
        W, W_new = effective(h, x, base), effective(h, x_new, base_new)
        for m in W:
            if mode == "fedasync":
                start, start_base, upload = arrivals[0]
                expected = (1 - alpha) * W[m] + alpha * effective(h, start | upload, start_base)[m]
            else:
                expected = W[m] + sum(staleness_weight("poly", tau, 0.5, 4.0) * (effective(h, s | u, b)[m] - effective(h, s, b)[m])
                                      for (s, b, u), tau in zip(arrivals, taus)) / len(arrivals)
            if exact or not torch.equal(W_new[m], W[m]):  # fedhello: a block nobody in the step trained stays, as it should
                same.append(torch.allclose(W_new[m], expected, atol=1e-5))
    assert same and (all(same) if exact else not any(same))
    assert not any(m["n_rejected"] for m in rec.sim.history)  # stale uploads are screened against their own round's layout
    if method in ("flora", "fedex", "florist", "frlora"):  # stale clients trained on their version's base, not today's
        assert any(not torch.equal(b[m], base[m]) for (_, base), arrivals, taus, _, _ in rec.steps
                   for (_, b, _), tau in zip(arrivals, taus) if tau for m in b)


class SketchRecorder(Recorder):
    """Also keeps each client's id, the version it started from and the start its turn was given."""

    def bind(self, sim):
        super().bind(sim)
        self.who, turn = [], sim.turn

        def recording(h, method, task, client, start, cfg, rnd):
            self.who.append((client.cid, rnd - 1, {n: t.clone() for n, t in start.items()}))
            return turn(h, method, task, client, start, cfg, rnd)

        sim.turn = recording


@pytest.mark.parametrize("mode", ["fedasync", "fedbuff"])
def test_fslora_stale_clients_train_and_are_aggregated_in_their_versions_sketch(small_csv, mode, one_thread):
    """Stale arrivals (speeds 1,2,4, C = 3): a client dispatched at version v trains the sketch J_v of round v + 1's
    seed, cut from x_v, and the server scatters its upload back through that J_v, not the closing round's: FedAsync
    x[J_v] ← (1−α_t)x[J_v] + α_t x_u (the rest of x kept), FedBuff x ← x + (1/K)Σ h(τ)P_u(x_u − x_v[J_u]). Inexact:
    W does not move as the full-parameter rule would on the clients' models W0 + s·(r/k)B_uA_u. Every stale upload
    is accepted."""
    from fedlora.federation.simulator import round_seed

    cfg = tiny_config(small_csv, method="fslora", rounds=3, async_mode=mode, async_concurrency=3, buffer=2,
                      fedasync_rho=0.1)  # the proximal term anchors at the sketch the client holds
    sim = build(cfg).simulator
    rec = SketchRecorder(sim.systems.config)
    sim.systems = rec
    rec.bind(sim)
    sim.run()
    h, method = sim.handle, sim.method
    assert not any(m["n_rejected"] for m in sim.history)
    assert max(t for _, _, taus, _, _ in rec.steps for t in taus) >= 1  # staleness happened
    done, moved_apart, full = 0, 0, []
    for version, ((x, _), arrivals, taus, alpha, (x_new, _)) in enumerate(rec.steps):
        who = rec.who[done:done + len(arrivals)]
        done += len(arrivals)
        for m, k in h.keys.items():
            expected_B, expected_A = x[k.B].double().clone(), x[k.A].double().clone()
            W, W_full = x[k.B] @ x[k.A], x[k.B] @ x[k.A]
            for ((store, _, upload), (cid, v, start), tau) in zip(arrivals, who, taus):
                peer = sim.peers[cid]
                J = method.index_set(h, peer, m, round_seed(cfg.seed, v + 1))
                now = method.index_set(h, peer, m, round_seed(cfg.seed, version + 1))  # the closing round's sketch
                moved_apart += bool(tau) and not torch.equal(J, now)
                assert torch.equal(start[k.B], store[k.B][:, J]) and torch.equal(start[k.A], store[k.A][J])  # its version's
                w = alpha if mode == "fedasync" else staleness_weight("poly", tau, 0.5, 4.0) / len(arrivals)
                if mode == "fedasync":
                    expected_B[:, J] = ((1 - w) * x[k.B][:, J] + w * upload[k.B]).double()
                    expected_A[J] = ((1 - w) * x[k.A][J] + w * upload[k.A]).double()
                else:
                    expected_B[:, J] += w * (upload[k.B] - store[k.B][:, J]).double()
                    expected_A[J] += w * (upload[k.A] - store[k.A][J]).double()
                client = peer.scale / h.scaling(m)  # the client's model: W0 + s·(r/k)B_uA_u, in units of s
                u, s0 = client * upload[k.B] @ upload[k.A], client * store[k.B][:, J] @ store[k.A][J]
                W_full = (1 - w) * W + w * u if mode == "fedasync" else W_full + w * (u - s0)
            assert torch.allclose(x_new[k.B].double(), expected_B, atol=1e-6) and torch.allclose(x_new[k.A].double(), expected_A, atol=1e-6)
            full.append(torch.allclose(x_new[k.B] @ x_new[k.A], W_full, atol=1e-5))
    assert moved_apart  # a stale client's sketch is not the closing round's: the checks above tell them apart
    assert full and not any(full)  # inexact: not the full-parameter rule


class Killed(Exception):
    pass


# ilora: the versions' method state (its c) is checkpointed too; fslora: a stale client's sketch is cut from its stored
# version; flora on devices: the bytes each client owes (the broadcasts it downloads when next dispatched) too
@pytest.mark.parametrize("method", ["fedit", "ilora", "fslora", "flora-devices"])
def test_same_seed_same_events_and_a_resumed_run_continues_the_queue(small_csv, tmp_path, method, one_thread):
    from test_systems import HAND

    (tmp_path / "hand.toml").write_text(HAND)
    timing = {"devices": str(tmp_path / "hand.toml")} if method.endswith("-devices") else {"client_speeds": "1,3"}
    whole = tiny_config(small_csv, method=method.removesuffix("-devices"), rounds=3, async_mode="fedbuff", buffer=2,
                        out=str(tmp_path / "whole"), **timing)
    ran, reference = run_experiment(whole)
    again = build(whole.replace(out=None)).simulator.run()
    assert simulated(again) == simulated(reference)
    assert any(t > 0 for m in reference for t in m["staleness"])  # slow clients arrive stale
    assert sum(len(m["staleness"]) for m in reference) == 9  # the synchronous budget: rounds × clients per round

    def kill(metrics):  # the run dies after its third version step (checkpoint written): clients in flight, queue not empty
        if metrics["version"] == 3:
            assert metrics["in_flight"] > 0
            raise Killed

    cut = whole.replace(out=str(tmp_path / "cut"))
    with pytest.raises(Killed):
        run_experiment(cut, on_round=kill)
    back, resumed = run_experiment(resume_config(cut.out), resume=True)
    assert simulated(resumed) == simulated(reference)
    assert back.simulator.systems.owed == ran.simulator.systems.owed  # the bytes each client would download next
    from fedlora.app.rundir import RunDir

    assert RunDir(whole.out).finished(whole) is not None and len(reference) < 2 * whole.rounds  # finished by updates, not lines


def test_fedasync_records_staleness_and_the_clock_every_arrival(small_csv, one_thread):
    history = build(tiny_config(small_csv, method="fedsa", rounds=2, async_mode="fedasync", staleness="hinge",
                                staleness_a=10.0, staleness_b=0.0, async_concurrency=2)).simulator.run()
    assert len(history) == 6 and [m["version"] for m in history] == list(range(1, 7))
    clocks = [m["sim_clock"] for m in history]
    assert clocks == sorted(clocks) and sum(m["sim_seconds"] for m in history) == pytest.approx(clocks[-1])
    for m in history:
        tau = m["staleness"][0]
        assert m["alpha"] == pytest.approx(0.6 * (1.0 if tau == 0 else 1 / (10 * tau + 1)))
        assert m["bytes_up"] > 0


# -- bad input ----------------------------------------------------------------------------------------------------------
T = TINY_CLI


def test_bad_async_input_is_one_line_before_any_training(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["run", *T, "--data", str(small_csv), "--out", str(out)]
    cases = [
        (["--method", "florana", "--async", "fedbuff"], "florana must run synchronously (its solve is over clients"),
        (["--method", "fslora", "--async", "fedasync", "--client-ranks", "2,3,4"], "does not run with mixed --client-ranks"),  # sketch sizes
        (["--method", "fedhello", "--async", "fedbuff", "--fedhello-pattern", "fim"], "fedhello must run synchronously (its Fisher"),
        (["--method", "hetlora", "--async", "fedbuff"], "hetlora must run synchronously (its sparsity weights"),
        (["--method", "flora", "--async", "fedasync", "--adapter", "dora"], "runs on lora or rslora adapters"),
        (["--method", "fedit", "--async", "fedbuff", "--buffer", "0"], "--buffer 0 is out of range"),
        (["--method", "fedit", "--async", "fedbuff", "--async-concurrency", "0"], "--async-concurrency 0 is out of range"),
        (["--method", "fedit", "--async", "fedasync", "--staleness", "linear"], "--staleness 'linear' is unknown"),
        (["--method", "fedit", "--async", "fedasync", "--client-speeds", "1,2,3,4"], "gives 4 speeds to 3 clients"),
        (["--method", "fedit", "--async", "fedasync", "--client-speeds", "1,0"], "not a list of positive numbers"),
        (["--method", "fedit", "--async", "fedasync", "--fedasync-alpha", "0"], "--fedasync-alpha 0.0 is out of range"),
        (["--method", "fedit", "--async", "sometimes"], "--async 'sometimes' is unknown"),
        (["--method", "fedit", "--async", "fedasync", "--server-opt", "adam"], "FedAsync's mixing is its server step"),
        (["--method", "fedit", "--async", "fedbuff", "--dp", "client", "--dp-noise", "1.0"], "does not run with --dp"),
    ]
    for flags, needle in cases:
        assert needle in refused(capsys, run + flags), flags
        assert not out.exists()
    for mode in ("fedasync", "fedbuff"):  # a synchronous-only method's refusal names the methods that can run in that mode
        named = refused(capsys, run + ["--method", "rolora", "--async", mode]).rpartition("asynchronously: ")[2].split(", ")
        assert all(name in named for name in ("fedit", "ffa", "fedsb", "fedsa", "flora", "florist", "ravan")), mode
        assert ("svd" in named) == (mode == "fedbuff") and "rolora" not in named, mode


def test_flower_refuses_simulated_speeds_in_one_line_before_anything_is_written(small_csv, tmp_path):
    from fedlora.flower.config import from_flower, to_flower
    from fedlora.flower.server_app import run_federation

    with pytest.raises(ValueError, match="client-speeds model simulated time, which the in-process simulator runs") as err:
        run_federation(None, tiny_config(small_csv, method="fedit", async_mode="fedbuff", client_speeds="1,2", out=str(tmp_path / "f")))
    assert "\n" not in str(err.value) and not (tmp_path / "f").exists()
    cfg = tiny_config(small_csv, method="ffa", async_mode="fedasync", buffer=2, staleness="hinge", client_speeds="1,3")
    back = from_flower(to_flower(cfg))  # the settings travel as Flower run config keys
    assert (back.async_mode, back.buffer, back.staleness, back.client_speeds) == ("fedasync", 2, "hinge", "1,3")
    assert from_flower(to_flower(tiny_config(small_csv))).buffer is None  # 0 stands in for "not given"


def test_the_cli_runs_async_and_writes_a_line_per_version_step(small_csv, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["run", *T, "--data", str(small_csv), "--method", "ffa", "--async", "fedasync", "--client-speeds", "1,2",
                 "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in lines] == [1, 2, 3] and [m["arrivals"] for m in lines] == [1, 2, 3]  # 1 round × 3 clients
    assert json.loads((out / "config.json").read_text())["async_mode"] == "fedasync"


HAND_DEVICES = [(16.0, 0.01), (8.0, 0.1), (1.6, 1.0)]  # test_systems.HAND: examples/s and latency, 1e6 B/s each way


def _hand_devices_run(small_csv, tmp_path, mode: str, method: str = "fedit", rounds: int = 1):
    """``method``, ``rounds`` rounds of 3 clients on the three hand-made devices of test_systems.HAND, under ``--async mode``."""
    from test_systems import HAND

    path = tmp_path / "hand.toml"
    path.write_text(HAND)
    return build(tiny_config(small_csv, method=method, rounds=rounds, devices=str(path), async_mode=mode)).simulator


def _hand_trip(sim, cid: int, down: int) -> float:
    """Client ``cid``'s time from a dispatch to its arrival, by hand: its latency each way, ``down`` bytes down and the
    state up at 1e6 B/s, and its examples (2 steps × batch 8) at its speed."""
    from fedlora.federation.clock import examples_processed

    speed, latency = HAND_DEVICES[cid]
    state = nbytes(sim.method.upload(sim.handle, sim.global_tensors, 1))
    return 2 * latency + (down + state) / 1e6 + examples_processed(len(sim.clients[cid].train), 2, 8) / speed


def _hand_arrivals(sim) -> list[float]:
    """Each client's arrival after a dispatch at t = 0 (nothing to download yet: every client holds the initial state)."""
    return [_hand_trip(sim, cid, 0) for cid in range(len(HAND_DEVICES))]


def test_with_devices_a_client_takes_its_download_training_and_upload(small_csv, tmp_path, one_thread):
    """Three hand-made devices (8 Mbit/s = 1e6 B/s each way; 16, 8 and 1.6 examples/s; latency 10, 100, 1000 ms) and
    FedBuff with K = C = 3: the first flush comes when the slowest client's state down + training + upload is done."""
    sim = _hand_devices_run(small_csv, tmp_path, "fedbuff")
    by_hand = _hand_arrivals(sim)
    history = sim.run()
    assert len(history) == 1 and history[0]["staleness"] == [0, 0, 0]
    # the slow board (16 examples at 1.6/s, 1 s latency each way), then the server step's [server] seconds = 0.25
    assert history[0]["sim_clock"] == pytest.approx(max(by_hand) + 0.25) and max(by_hand) > 10


def test_each_server_step_takes_the_profiles_server_seconds_and_an_arrival_waits_for_it(small_csv, tmp_path, one_thread):
    """FedAsync on the three hand-made devices: a version step per arrival, each taking [server] seconds = 0.25 as a
    synchronous round's server step does; an arrival due while the server works is handled when it is done."""
    sim = _hand_devices_run(small_csv, tmp_path, "fedasync")
    clock, expected = 0.0, []
    for a in sorted(_hand_arrivals(sim)):  # the budget (1 round × 3 clients) is dispatched at t = 0: nobody is sent out again
        clock = max(clock, a) + 0.25
        expected.append(clock)
    history = sim.run()
    assert [m["sim_clock"] for m in history] == pytest.approx(expected)
    assert sum(m["sim_seconds"] for m in history) == pytest.approx(expected[-1])


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_a_client_dispatched_again_first_downloads_the_broadcasts_it_missed(small_csv, tmp_path, method, one_thread):
    """FedAsync, 2 rounds' budget on the three hand-made devices, the fast client (0) followed by hand: each time it is
    sent out again it first downloads the broadcasts of the version steps made since it last was, at the method's size
    (FLoRA's stacked factors outgrow FedIT's state), and only then trains."""
    sim = _hand_devices_run(small_csv, tmp_path, "fedasync", method=method, rounds=2)
    first = _hand_arrivals(sim)
    history = sim.run()
    clocks, down = [m["sim_clock"] for m in history], [m["bytes_down"] for m in history]
    step1 = first[0] + 0.25  # client 0 arrives; [server] seconds; sent out again with step 1's broadcast (down[0])
    again = step1 + _hand_trip(sim, 0, down[0])
    assert first[1] < again < first[1] + 0.25  # it arrives while step 2 (client 1's arrival) runs, and waits
    assert clocks[:3] == pytest.approx([step1, first[1] + 0.25, first[1] + 0.5])
    # step 3 is its own: it is sent step 2's broadcast as catch-up and step 3's (down[2]), and downloads both when
    # dispatched again at once, before the next arrival (step 4 is its third)
    assert clocks[3] == pytest.approx(clocks[2] + _hand_trip(sim, 0, down[2]) + 0.25)
    state = nbytes(sim.method.upload(sim.handle, sim.global_tensors, 1))
    assert down[2] == 2 * state if method == "fedit" else down[2] > 4 * state


def truncation(method: str, P: torch.Tensor, r: int) -> torch.Tensor:
    """The method's own truncation of the dense d×k ``P``, computed densely: svd and flexlora [P]_r; fedmomentum its top
    r components and those after them up to τ = 0.9999 of the energy (its default); ilora the projection onto the
    span of P's first r columns (its QR truncation)."""
    from fedlora.aggregation.fedmomentum import components_to_keep

    if method == "ilora":
        Q, _ = torch.linalg.qr(P.double()[:, :r])
        return (Q @ (Q.T @ P.double())).to(P.dtype)
    U, S, Vh = torch.linalg.svd(P.double(), full_matrices=False)
    nonzero = int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0
    keep = min(r, nonzero)
    if method == "fedmomentum":
        keep = max(components_to_keep(S**2, nonzero, 0.9999), keep)
    return ((U[:, :keep] * S[:keep]) @ Vh[:keep]).to(P.dtype)


@pytest.mark.parametrize("method", ["svd", "flexlora", "fedmomentum", "ilora"])
def test_product_delta_methods_truncate_fedbuffs_full_parameter_step_under_staleness(small_csv, method, one_thread):
    """Stale FedBuff flushes (speeds 1,2,4, C = 3, K = 2): the new weight is base + the method's own truncation of
    sBA + (1/K)Σ h(τ)(W_u − W_{v_u}) (product delta), the head moves as FedBuff's x + (1/K)Σ h(τ)(x_u − x_{v_u}), and
    a flush of stale clients is not the rule on the raw uploads (the starts enter it)."""
    cfg = tiny_config(small_csv, method=method, rounds=3, async_mode="fedbuff", async_concurrency=3, buffer=2)
    rec, h = recorded_run(cfg)
    for (x, base), arrivals, taus, _, (x_new, base_new) in rec.steps:
        W, W_new = effective(h, x, base), effective(h, x_new, base_new)
        weights = [staleness_weight("poly", tau, 0.5, 4.0) / len(arrivals) for tau in taus]
        for m in W:
            step = sum(q * (effective(h, s | u, b)[m] - effective(h, s, b)[m]) for (s, b, u), q in zip(arrivals, weights))
            start = h.base_layout(m, base[m])
            expected = start + truncation(method, W[m] - start + step, h.rank)
            assert torch.allclose(W_new[m], expected, atol=1e-5), (m, taus)
        for name in h.other_names:
            moved = x[name] + sum(q * (u[name] - s[name]) for (s, _, u), q in zip(arrivals, weights))
            assert torch.allclose(x_new[name], moved, atol=1e-6), name


def test_fedbuff_only_methods_refuse_fedasync_in_one_line(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    for method in ("svd", "flexlora", "fedmomentum", "ilora"):
        line = refused(capsys, ["run", *T, "--data", str(small_csv), "--out", str(out), "--method", method, "--async", "fedasync"])
        assert f"{method} runs asynchronously with --async fedbuff only" in line and "pass --async fedbuff" in line
        named = line.rpartition("use one of ")[2].split(", ")
        assert "ffa" in named and "fedit" in named and "svd" not in named and not out.exists()
