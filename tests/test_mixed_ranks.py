"""Mixed ranks end to end on a tiny random BERT: every method that allows them runs in-process and on the Flower
app's in-process round with equal metrics; bytes per client at its own rank; refusals before any training."""

import math

import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.app.experiment import build
from fedlora.cli.main import main
from fedlora.federation import REGISTRY

D = K = 32
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4
RANKS = "2,4,3"  # clients 0, 1, 2 get ranks 2, 4, 3; the model holds rank 4

MIXED = [m for m, cls in REGISTRY.items() if cls.mixed_ranks and cls.client_ranks_are == "ranks"]  # fslora: sketch sizes (test_fslora)
FIXED = [m for m, cls in REGISTRY.items() if not cls.mixed_ranks and cls.client_ranks_are == "ranks"]  # loraa2: budgets (test_loraa2)

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_count(method: str, ranks: list[int], adapter: str, kept: dict[str, int] | None = None) -> tuple[int, int]:
    """Bytes up and down over the round's three clients, each at its own rank (DESIGN.md, METHODS.md); ``kept``:
    FLoRIST's kept rank p per matrix, as the round reports it."""
    extra = MODULES * D if adapter == "dora" else 0
    up = down = 0
    for r in ranks:
        factors = MODULES * r * (D + K)
        if method == "fedsa":  # A only, head kept local
            up += MODULES * r * K + extra
            down += MODULES * r * K + extra
        elif method == "flora":  # everyone receives the whole stack
            up += factors + HEAD + extra
            down += MODULES * sum(ranks) * (D + K) + HEAD + extra
        elif method == "florist":  # everyone receives the folds [ΔW*]_p, dense or factored
            up += factors + HEAD + extra
            down += sum(min(D * K, p * (D + K)) for p in kept.values()) + HEAD + extra
        elif method == "ilora":  # --ilora-cv scaffold (the default): Δc_u up and c[:r_u] down beside the factors
            up += 2 * factors + HEAD + extra
            down += 2 * factors + HEAD + extra
        else:
            up += factors + HEAD + extra
            down += factors + HEAD + extra
    return F32 * up, F32 * down


@pytest.mark.parametrize("method,adapter", [(m, "lora") for m in MIXED] + [("flexlora", "rslora"), ("fedit", "dora"), ("hetlora", "hira")])
def test_mixed_ranks_run_in_process_and_on_flower_with_equal_metrics(small_csv, tmp_path, method, adapter):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method=method, adapter=adapter, client_ranks=RANKS, rank=8)
    exp = build(cfg)
    sim, h = exp.simulator, exp.simulator.handle
    assert h.rank == 4 and [p.rank for p in sim.peers] == [2, 4, 3]  # --rank is superseded by the largest client rank
    history = sim.run()
    restarts = method in ("flora", "florist")  # a fresh LoRA every round
    for m in history:
        assert m["clients"] == [0, 1, 2] and not m["rejected"]
        assert (m["bytes_up"], m["bytes_down"]) == hand_count(method, [2, 4, 3], adapter, m.get("florist_rank_per_layer"))
        assert math.isfinite(m["divergence"]) and math.isfinite(m["global_accuracy"])
        if REGISTRY[method].exact:
            assert m["divergence"] < 1e-5
        elif method == "florist":  # the fold keeps τ = 0.9 of the energy, possibly beyond rank r
            assert m["divergence"] <= math.sqrt(1 - 0.9) + 1e-6
        else:
            assert m["bound"] <= m["divergence"] + 1e-6
    # Each client holds the global state at its own rank: the first r_u components, each factor × √(s_max/s_u)
    # (FLoRA and FLoRIST re-initialise every round: a fresh init at r_u is the first r_u components, unscaled;
    # ILoRA keeps B orthonormal: B unscaled, A × s_max/s_u — the same product).
    s = h.spec.scale_at
    for p in sim.peers:
        c = 1.0 if restarts else (s(4) / s(p.rank)) ** 0.5
        for k in h.keys.values():
            for name, dim in ((k.B, 1), (k.A, 0)):
                held, glob = sim.held[p.cid][name], sim.global_tensors[name]
                assert held.shape[dim] == p.rank
                f = (1.0 if name == k.B else c * c) if method == "ilora" else c
                if name not in method_private(sim):
                    torch.testing.assert_close(held, glob.narrow(dim, 0, p.rank) * f)

    flower = run_federation(InlineGrid(cfg, fresh=restarts), cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(flower, history)


def method_private(sim):
    return set(sim.method.private(sim.handle))


def test_a_lower_rank_clients_padding_stays_zero_and_its_upload_has_its_rank(small_csv):
    from fedlora.federation.simulator import client_turn

    exp = build(tiny_config(small_csv, method="fedit", client_ranks="2,4"))
    sim, h = exp.simulator, exp.simulator.handle
    result = client_turn(h, sim.method, sim.task, sim.clients[0], sim.held[0], sim.config, 1)
    for k in h.keys.values():
        assert result.upload[k.B].shape == (D, 2) and result.upload[k.A].shape == (2, K)
        full_B, full_A = h.parameter(k.B), h.parameter(k.A)
        assert torch.count_nonzero(full_B[:, 2:]) == 0 and torch.count_nonzero(full_A[2:]) == 0  # trained, still zero
        assert torch.count_nonzero(result.upload[k.B]) > 0  # and the client's own components did train
    layer = next(iter(h.layers.values()))
    assert layer.scaling["default"] == pytest.approx(16.0 / 2)  # the client's own scale α/r_u during its turn


@pytest.mark.parametrize("method", FIXED)
def test_methods_without_mixed_ranks_fail_before_training_in_one_line(small_csv, method, capsys):
    with pytest.raises(ValueError, match=rf"^method {method} cannot train clients of different ranks \(--client-ranks\); use one of fedit"):
        tiny_config(small_csv, method=method, client_ranks="4,8").validate()
    code = main(["run", "--method", method, "--client-ranks", "4,8", "--model", "tiny:bert", "--data", str(small_csv), "--quiet",
                 "--out", "/nonexistent/never"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith(f"fedlora: error: method {method} cannot train clients of different ranks")


def test_bad_client_ranks_and_vera_with_mixed_ranks_say_how_to_fix(small_csv):
    with pytest.raises(ValueError, match=r"--client-ranks '4,x' is not a list of ranks ≥ 1; pass e.g. --client-ranks 4,8,16"):
        tiny_config(small_csv, client_ranks="4,x").validate()
    with pytest.raises(ValueError, match=r"adapter vera cannot give clients different ranks"):
        tiny_config(small_csv, method="fedit", adapter="vera", client_ranks="4,8").validate()
    with pytest.raises(ValueError, match="method hetlora does not support adapter vera"):
        tiny_config(small_csv, method="hetlora", adapter="vera").validate()
    # one rank listed: every client at that rank, nothing mixed, any method
    cfg = tiny_config(small_csv, method="svd", client_ranks="2")
    assert cfg.validate().adapter_spec().r == 2


def test_hetlora_options_reach_the_rule_and_the_regulariser_has_a_gradient(small_csv):
    cfg = tiny_config(small_csv, method="hetlora", client_ranks="2,4", method_options="hetlora-weights=data,hetlora-lam=0.5,hetlora-gamma=0.5")
    exp = build(cfg)
    method, h = exp.simulator.method, exp.simulator.handle
    assert method.rule_options == {"weighting": "data"} and method.settings["lam"] == 0.5
    for k in h.keys.values():  # non-zero factors so the penalty is non-zero
        with torch.no_grad():
            h.parameter(k.B).normal_()
    peer = exp.simulator.peers[1]  # rank 4: components 2..3 are penalised
    term = method.loss_term(h, peer)
    term.backward()
    k = next(iter(h.keys.values()))
    assert float(term.detach()) > 0 and h.parameter(k.B).grad[:, 2:4].abs().sum() > 0 and h.parameter(k.B).grad[:, :2].abs().sum() == 0
    with pytest.raises(ValueError, match="method option 'hetlora-weight=data' is not one of"):
        tiny_config(small_csv, method="hetlora", method_options="hetlora-weight=data").validate()
    with pytest.raises(ValueError, match="option hetlora-weights='norm' of method hetlora is not one of sparsity, data"):
        tiny_config(small_csv, method="hetlora", method_options="hetlora-weights=norm").validate()


@pytest.mark.parametrize("method", ["fedsa", "hetlora"])
def test_a_mixed_rank_run_resumed_from_its_checkpoint_ends_with_the_same_metrics(small_csv, tmp_path, method):

    cfg = tiny_config(small_csv, method=method, client_ranks="2,4", rounds=3, fraction=0.67)
    reference = build(cfg).simulator.run()
    # through the file: safetensors, per-client views included
    resume_matches(cfg, tmp_path, ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy"), reference)
