"""The reference points `central` and `local` (DESIGN.md, trustworthy comparisons)."""


import pytest
import torch

from conftest import tiny_config
from fedlora.app.experiment import build

pytestmark = pytest.mark.usefixtures("one_thread")


def test_with_one_client_central_is_fedit(small_csv):
    runs = {m: build(tiny_config(small_csv, method=m, clients=1, examples_per_client=60)).simulator.run() for m in ("central", "fedit")}
    for c, f in zip(runs["central"], runs["fedit"]):
        for key in ("clients", "global_accuracy", "local_accuracy", "train_loss", "divergence"):
            assert c[key] == f[key], (c["round"], key)
        assert c["bytes_up"] == c["bytes_down"] == 0 and f["bytes_up"] > 0


def test_central_pools_every_clients_data_and_steps(small_csv):
    cfg = tiny_config(small_csv, method="central", fraction=0.67)
    sim = build(cfg).simulator
    fed = build(cfg.replace(method="fedit")).simulator
    assert len(sim.clients) == 1
    assert len(sim.clients[0].train) == sum(len(c.train) for c in fed.clients)
    assert len(sim.clients[0].test) == sum(len(c.test) for c in fed.clients)
    assert torch.equal(sim.clients[0].train.labels, torch.cat([c.train.labels for c in fed.clients]))
    assert sim.config.local_steps == cfg.local_steps * 2 and sim.config.fraction == 1.0  # round(0.67 × 3) = 2 clients a round


def test_local_never_communicates_and_scores_the_clients_own_models(small_csv):
    sim = build(tiny_config(small_csv, method="local", rounds=2)).simulator
    start = {n: t.clone() for n, t in sim.global_tensors.items()}
    history = sim.run()
    h = sim.handle
    assert all(m["bytes_up"] == m["bytes_down"] == 0 for m in history)
    assert all(torch.equal(sim.global_tensors[n], start[n]) for n in start)  # the server never learns anything
    own = [sim.held[c] | sim.private[c] for c in sorted(sim.private)]
    assert len(own) == 3 and not torch.equal(own[0][h.head_names[0]], own[1][h.head_names[0]])
    scores = []
    for state in own:
        h.set(state)
        scores.append(sim.task.evaluate(sim.model, sim.global_test))
    assert history[-1]["global_accuracy"] == pytest.approx(sum(scores) / 3)


def test_references_refuse_flower_in_one_line(small_csv, tmp_path):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid

    for method in ("central", "local"):
        cfg = tiny_config(small_csv, method=method)
        with pytest.raises(ValueError, match=f"method {method} runs in-process only"):
            run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / method)))
