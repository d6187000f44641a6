"""End-to-end federation on a tiny random BERT: every method × adapter, bytes, exactness, FedSA privacy, reload."""

import json
import math

import pytest
import torch

from conftest import tiny_config
from fedlora.adapters import ADAPTERS
from fedlora.app.experiment import build, run_experiment
from fedlora.federation import REGISTRY, nbytes

COMBOS = [(m, a) for a in ADAPTERS for m, cls in REGISTRY.items() if a in cls.adapters()]

D = K = 32  # tiny BERT hidden size: every adapted query/value matrix is 32×32
R = 4
MODULES = 4  # 2 layers × (query, value)
HEAD = 3 * 32 + 3  # classifier weight + bias (3 labels)
F32 = 4


def hand_count(method: str, adapter: str, U: int, rnd: int = 1, *, setup: bool = True) -> tuple[int, int] | None:
    """Bytes up and down per client in round ``rnd``, from the shapes alone (DESIGN.md's table, METHODS.md): an
    independent check of the declarations for the methods it knows; None for any other (a new method is held to its
    declaration alone). ``setup``: round 1's row also carries round 0 (fedsb). fedmomentum's download is its bound."""
    if adapter == "vera":  # vectors λ_b ∈ R^d and λ_d ∈ R^r stand in for B and A
        b, a = D, R
    else:
        b, a = D * R, R * K
    extra = MODULES * D if adapter == "dora" else 0  # DoRA's magnitude vectors, shared even by FedSA
    shared_other = HEAD + extra
    per = {
        "fedit": (b + a, b + a),
        "florana": (b + a, b + a),
        "svd": (b + a, b + a),
        "ffa": (b, b),
        "fedsa": (a, a),
        "flora": (b + a, U * R * (D + K)),
        "fedex": (b + a, b + a + min(D * K, (U + 1) * R * (D + K))),
        "flexlora": (b + a, b + a),
        "hetlora": (b + a, b + a),
        "rolora": (b, b) if rnd % 2 else (a, a),  # B-rounds (odd) send B, A-rounds A
        "fedsvd": (b, D * R + R * K),  # up B; down the re-factored B and A
        "lorafair": (b + a, b + a),
        "fedrot": (b + a, b + a),
        "frlora": (b + a, min(D * K, R * (D + K))),  # down: only the fold B̄Ā (clients re-initialise)
        # plus each matrix's fold, of rank f ≤ min(Ur, d) − r: which rank depends on the data (checked below)
        "fedmomentum": (b + a, b + a + min(D * K, (U * R - R) * (D + K))),
        # only the r×r core (B and A are frozen shared bases); round 1's row also carries round 0, the gradient
        # estimates up (d·k) and the bases from their SVD down (r(d+k))
        "fedsb": (R * R + (D * K if rnd == 1 and setup else 0), R * R + (R * (D + K) if rnd == 1 and setup else 0)),
        "ravan": (4 * (R * R + 1), 4 * R * R),  # 4 heads: H_i and s_i up, the averaged s_i·H_i down
        "feddpa": (b + a, b + a),  # the global adapter, as FedIT; the local one never travels
        # down: only each matrix's fold [ΔW*]_p, p ≤ min(Ur, d) the kept rank: which p the round reports (checked below)
        "florist": (b + a, min(D * K, min(U * R, D) * (D + K))),
        "central": (0, 0),  # reference points: nothing crosses a network
        "local": (0, 0),
    }.get(method)
    if per is None:
        return None
    if method in ("central", "local"):
        return 0, 0
    other_up = extra if method == "fedsa" else shared_other  # FedSA keeps its head local by default
    other_down = other_up
    return F32 * (MODULES * per[0] + other_up), F32 * (MODULES * per[1] + other_down)


def declared_count(sim, clients: list[int], rnd: int) -> tuple[int, int]:
    """Bytes up and down of round ``rnd`` with ``clients`` accepted, by the method's declaration: per adapted d×k
    matrix and client its rule's ``comm`` at the client's rank (``Method.declared_elements``), in the factors'
    dtype, plus the non-factor trainables its upload layout lists (the head unless kept local, DoRA's magnitudes),
    averaged and sent back, plus its declared side bytes up (``Method.side_bytes``: LoRA-A²'s
    mask). The declaration counts LoRA-form factors (not VeRA's vectors) and no round 0."""
    h, method = sim.handle, sim.method
    size = next(iter(sim.global_tensors.values())).element_size()
    up = down = 0
    for cid in clients:
        for module, layer in h.layers.items():
            e_up, e_down = method.declared_elements(layer.out_features, layer.in_features, sim.peers[cid].rank, len(clients), rnd,
                                                    module=module, peer=sim.peers[cid])
            up, down = up + e_up * size, down + e_down * size
        if method.communicates:
            state = sim.held[cid] | sim.private.get(cid, {})  # what the client holds (FedLEASE: its slot map is private)
            sent = method.upload(h, state, rnd, peer=sim.peers[cid])
            others = nbytes({n: t for n, t in sent.items() if n in h.other_names and n not in method.factor_names(h)})
            side_up, side_down = method.side_bytes(h, rnd, peer=sim.peers[cid])
            up, down = up + others + side_up, down + others + side_down
    return up, down


def check_bytes(sim, adapter: str, h: dict) -> None:
    """A round's counted bytes (from the tensors the simulator sent) against the hand count where the method is in
    it, and against the method's declaration, which the hand count checks in turn."""
    method, rnd, U = sim.method.name, h["round"], len(h["clients"])
    counted = h["bytes_up"], h["bytes_down"]
    hand = hand_count(method, adapter, U, rnd)
    if hand is not None:
        assert counted[0] == U * hand[0], (counted[0], U * hand[0])
        if method == "fedmomentum":  # r(d+k) + min(dk, f(d+k)) per matrix, f the fold's rank: 0 ≤ f ≤ min(Ur, d) − r
            fold = U * hand[1] - counted[1]
            assert 0 <= fold <= U * F32 * MODULES * min(D * K, (U * R - R) * (D + K)) and fold % (U * F32 * (D + K)) == 0
        elif method == "florist":  # the fold's kept rank p per matrix, as the round reports it
            folds = sum(min(D * K, p * (D + K)) for p in h["florist_rank_per_layer"].values())
            assert counted[1] == U * (F32 * folds + hand[1] - F32 * MODULES * min(D * K, min(U * R, D) * (D + K)))
        else:
            assert counted[1] == U * hand[1], (counted[1], U * hand[1])
    if adapter == "vera":  # the declaration counts d×r and r×k factors; VeRA sends vectors (hand count only)
        return
    declared = declared_count(sim, h["clients"], rnd)
    if hand is not None:  # the hand count, independently, says what the declaration says
        assert declared == tuple(U * x for x in hand_count(method, adapter, U, rnd, setup=False)), (method, declared)
    elif sim.method.needs_setup() and rnd == 1:  # round 0's bytes (not in the declaration) ride on round 1's row
        assert counted[0] >= declared[0] and counted[1] >= declared[1], (counted, declared)
    else:
        assert counted == declared, f"{method} sent {counted} bytes (up, down) in round {rnd}; its rule's comm declares {declared}"


def check_run(exp, method: str, adapter: str) -> None:
    """What every method's run must show: both rounds, scores in range, bytes as counted and as declared, ρ finite
    and never below the Eckart–Young bound (or ≈ 0 for an exact method)."""
    history = exp.simulator.history
    assert [h["round"] for h in history] == [1, 2]
    U = 3
    if method == "local":  # a reference point: clients never communicate, nothing to aggregate or measure
        assert all(h["bytes_up"] == h["bytes_down"] == 0 and h["divergence"] is None for h in history)
        return
    if method == "central":  # one pooled client holding every client's data
        U = 1
    for h in history:
        assert h["clients"] == list(range(U))
        assert 0.0 <= h["global_accuracy"] <= 1.0 and 0.0 <= h["local_accuracy"] <= 1.0
        assert math.isfinite(h["train_loss"])
        assert h["local_global_gap"] == pytest.approx(h["local_accuracy"] - h["global_accuracy"])
        check_bytes(exp.simulator, adapter, h)
        # fedsa: ρ of the shared Â with the clients' mean B, the rank-r stand-in its global model is scored with
        if h["divergence"] is None:  # no one global aggregate this round (HiLoRA's cluster tiers, FedLEASE's experts)
            assert REGISTRY[method].personalised, f"{method} reports no divergence in round {h['round']}"
            continue
        assert set(h["divergence_per_layer"]) == set(exp.simulator.handle.layers)
        # ρ is not bounded by 1 in general (test_aggregation: ρ = 8.35 for opposed clients); it is finite here
        assert math.isfinite(h["divergence"]) and h["divergence"] >= 0.0
        if REGISTRY[method].exact:  # exact by construction (fedex and flora broadcast more than rank r)
            assert h["divergence"] < 1e-5
        elif method == "fedmomentum":  # folds beyond rank r, exact up to the energy threshold τ = 0.9999
            assert h["divergence"] <= math.sqrt(1 - 0.9999) + 1e-6
        elif method == "florist":  # folds [ΔW*]_p with energy ≥ τ = 0.9, p possibly beyond r
            assert h["divergence"] <= math.sqrt(1 - 0.9) + 1e-6
        else:  # no rank-r broadcast beats the Eckart–Young bound
            assert h["bound"] <= h["divergence"] + 1e-6
        if method in ("svd", "flexlora"):  # equal ranks: FlexLoRA is the rank-r optimum
            assert h["divergence"] == pytest.approx(h["bound"], rel=1e-3, abs=1e-6)
    # training moved the adapter: the second round's update is not zero
    assert (history[-1]["divergence"] is None and REGISTRY[method].personalised) or history[-1]["divergence"] > 0 or REGISTRY[method].exact


@pytest.mark.parametrize("method,adapter", COMBOS)
def test_every_method_and_adapter_runs(small_csv, method, adapter):
    exp = build(tiny_config(small_csv, method=method, adapter=adapter))
    exp.simulator.run()
    check_run(exp, method, adapter)


def test_florana_never_worse_than_fedit_in_a_run(small_csv):
    runs = {m: build(tiny_config(small_csv, method=m)).simulator.run() for m in ("fedit", "florana")}
    # Same seed: round 1's clients train from the same start, so the uploads are identical.
    assert runs["florana"][0]["divergence"] <= runs["fedit"][0]["divergence"] + 1e-9
    assert runs["fedit"][0]["divergence"] > 1e-4  # FedIT is inexact on real updates


@pytest.mark.parametrize("adapter", ["lora", "vera"])
def test_fedsa_keeps_each_clients_B_private_and_persistent(small_csv, adapter, monkeypatch):
    import fedlora.federation.simulator as simulator

    exp = build(tiny_config(small_csv, method="fedsa", adapter=adapter))
    sim, h = exp.simulator, exp.simulator.handle
    sim.round(1)
    after_round1 = {cid: {n: t.clone() for n, t in sim.private[cid].items()} for cid in range(3)}
    seen = []
    original = simulator.train_local

    def spy(*args, **kwargs):
        seen.append(h.get(h.B_names()))  # what the client starts round 2 from, in sampled order 0, 1, 2
        return original(*args, **kwargs)

    monkeypatch.setattr(simulator, "train_local", spy)
    sim.round(2)
    assert len(seen) == 3
    for cid in range(3):
        for n in h.B_names():
            assert torch.equal(seen[cid][n], after_round1[cid][n])
    name = h.B_names()[0]
    assert not torch.allclose(after_round1[0][name], after_round1[1][name])
    # the head stays local too, and differs between clients
    head = h.head_names[0]
    assert not torch.allclose(sim.private[0][head], sim.private[1][head])


def test_ffa_keeps_A_frozen_at_shared_init(small_csv):
    exp = build(tiny_config(small_csv, method="ffa"))
    h = exp.simulator.handle
    A0 = h.get(h.A_names())
    exp.simulator.run()
    A1 = h.get(h.A_names())
    assert all(torch.equal(A0[n], A1[n]) for n in A0)


def test_deterministic_on_cpu(small_csv):
    a = build(tiny_config(small_csv, method="florana")).simulator.run()
    b = build(tiny_config(small_csv, method="florana")).simulator.run()
    for x, y in zip(a, b):
        for key in ("global_accuracy", "local_accuracy", "divergence", "bytes_up", "bytes_down", "train_loss"):
            assert x[key] == y[key]


@pytest.mark.parametrize("method,adapter", [("florana", "lora"), ("fedex", "lora"), ("flora", "rslora"), ("fedsa", "lora"), ("fedex", "hira")])
def test_saved_adapter_reloads_and_reproduces_global_accuracy(small_csv, tmp_path, method, adapter):
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask

    out = tmp_path / "run"
    exp, history = run_experiment(tiny_config(small_csv, method=method, adapter=adapter, out=str(out)))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for key in ("round", "method", "global_accuracy", "local_accuracy", "divergence", "divergence_per_layer", "bytes_up", "bytes_down", "wall_seconds"):
        assert key in lines[-1]
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert (out / "summary.md").read_text().startswith("# fedlora run")
    if method == "fedsa":
        assert sorted(p.name for p in (out / "private").iterdir()) == [f"client_{i}.safetensors" for i in range(3)]

    if adapter in ("lora", "rslora"):  # plain PEFT, no fedlora code, on a fresh base
        from peft import PeftModel

        from fedlora.app.models import load_classifier

        base, _ = load_classifier("tiny:bert", 3, seed=0)
        model = PeftModel.from_pretrained(base, str(out / "adapter"))
    else:
        model, _, _ = load_global_model(out)
    acc = ClassificationTask().evaluate(model, exp.simulator.global_test)
    assert acc == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)


def test_catch_up_broadcasts_are_counted_when_a_client_that_missed_rounds_is_sampled(small_csv):
    """With partial participation a client sampled again after missing rounds is sent every broadcast it missed
    (on Flower, literally: one record per missed round); bytes_down counts them, catch_up_bytes says how many."""
    from conftest import tiny_config
    from fedlora.app.experiment import build

    sim = build(tiny_config(small_csv, method="fedit", clients=5, fraction=0.4, rounds=6)).simulator
    hist = sim.run()
    per_client = hist[0]["bytes_down"] // len(hist[0]["clients"])  # fedit's broadcast, the same size every round
    sent = {c: 0 for c in range(5)}
    assert any(h["catch_up_bytes"] for h in hist)
    for h in hist:
        rnd = h["round"]
        sampled = set(h["clients"]) | {r["client"] for r in h["rejected"]}
        missed = sum(rnd - 1 - sent[c] for c in sampled)
        assert h["catch_up_bytes"] == missed * per_client
        assert h["bytes_down"] == (len(h["clients"]) + missed) * per_client
        for c in sampled:
            sent[c] = rnd - 1
        for c in h["clients"]:
            sent[c] = rnd


def test_a_resumed_run_counts_catch_up_as_an_uninterrupted_one(small_csv):
    from conftest import tiny_config
    from fedlora.app.experiment import build

    cfg = tiny_config(small_csv, method="fedit", clients=5, fraction=0.4, rounds=5)
    full = build(cfg).simulator.run()
    first = build(cfg).simulator
    for rnd in (1, 2):
        first.round(rnd)
    tensors, meta = first.snapshot()
    meta = json.loads(json.dumps(meta))  # as the checkpoint stores it
    second = build(cfg).simulator
    second.restore(tensors, meta)
    rest = [second.round(rnd) for rnd in (3, 4, 5)]
    assert [h["catch_up_bytes"] for h in full[2:]] == [h["catch_up_bytes"] for h in rest]
    assert [h["bytes_down"] for h in full[2:]] == [h["bytes_down"] for h in rest]
