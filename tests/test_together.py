"""Clients trained together (``--clients-together``, federation/together.py): the joint pass over the shared base
gives the metrics, bytes and uploads of training the clients one after another; the fallback and refusal rules."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from fedlora.app.config import RunConfig
from fedlora.app.experiment import build
from fedlora.cli.main import main
from fedlora.federation import FederationConfig, make_method
from fedlora.federation.together import blockers, clip_per_client, use_together

KEYS = ("global_accuracy", "local_accuracy", "train_loss", "bytes_up", "bytes_down")


def recorded_run(cfg: RunConfig):
    """The run's history, every round's uploads and private state per client, and the final global tensors."""
    sim = build(cfg).simulator
    turns, rounds = sim._turns, []

    def recording(rnd, selected):
        results, failed = turns(rnd, selected)
        rounds.append({r.cid: (r.upload, r.private) for r in results})
        return results, failed

    sim._turns = recording
    return sim.run(), rounds, sim.global_tensors


def assert_same_runs(a, b, tol=1e-5):
    (ha, ua, ga), (hb, ub, gb) = a, b
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        for key in KEYS:
            assert x[key] == pytest.approx(y[key], abs=tol), (x["round"], key)
    for ra, rb in zip(ua, ub):
        assert ra.keys() == rb.keys()
        for cid in ra:
            for part in (0, 1):  # the upload, the private state
                assert ra[cid][part].keys() == rb[cid][part].keys()
                for n, t in ra[cid][part].items():
                    torch.testing.assert_close(t, rb[cid][part][n], atol=tol, rtol=0)
    for n, t in ga.items():
        torch.testing.assert_close(t, gb[n], atol=tol, rtol=0)


@pytest.mark.parametrize("method,adapter,extra", [
    ("fedit", "lora", {}),
    ("ffa", "lora", {}),
    ("fedsa", "lora", {}),
    ("fedit", "rslora", {"clients_together_group": 2}),  # groups of 2: two joint passes per step
    ("ffa", "rslora", {}),
    ("fedsa", "rslora", {"optimizer": "sgd", "max_grad_norm": 0.05}),  # clipping bites, per client
    ("rolora", "lora", {"rounds": 3}),  # A and B frozen in turn, round by round
])
def test_trained_together_equals_one_after_another(method, adapter, extra, small_csv, one_thread):
    # batch 7 over 40 examples: the fifth batch of a pass has 5 rows; dirichlet: shards of different sizes, so
    # clients' batches differ in rows and (dynamic padding) in length within one joint pass.
    cfg = tiny_config(small_csv, method=method, adapter=adapter, clients=4, batch_size=7, local_steps=6, partition="dirichlet", **extra)
    sequential = recorded_run(cfg.replace(clients_together="off"))
    together = recorded_run(cfg.replace(clients_together="on"))
    assert [h["clients_together"] for h in sequential[0]] == [False] * cfg.rounds
    assert [h["clients_together"] for h in together[0]] == [True] * cfg.rounds
    assert_same_runs(sequential, together)


def test_transposed_base_layers_and_last_token_head(small_csv, one_thread):
    """tiny:gpt2: Conv1D base weights (in×out), embedding and residual dropout, a head reading each row's last
    real token: still equal."""
    cfg = tiny_config(small_csv, model="tiny:gpt2", target_modules="c_attn", method="fedit", clients=3, partition="dirichlet")
    assert_same_runs(recorded_run(cfg.replace(clients_together="off")), recorded_run(cfg.replace(clients_together="on")))


def test_dropout_draws_differ_between_clients_and_match_their_own(small_csv, one_thread):
    """The equality above is not dropout-free: with the tiny BERT's dropout (0.1) off, the first round's losses change."""
    from fedlora.app.models import tiny_bert_config

    assert tiny_bert_config(3).hidden_dropout_prob > 0 and tiny_bert_config(3).attention_probs_dropout_prob > 0
    cfg = tiny_config(small_csv, method="fedit", clients=2, rounds=1, clients_together="on")
    sim = build(cfg).simulator
    with_dropout = sim.run()[0]["train_loss"]
    sim = build(cfg).simulator
    sim.model.eval()
    sim.model.train = lambda mode=True: sim.model  # dropout stays off while training
    assert sim.run()[0]["train_loss"] != pytest.approx(with_dropout, abs=1e-6)


def test_per_client_clipping_equals_clip_grad_norm_on_each_client():
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.randn(3, 4, 5, generator=gen, requires_grad=True), torch.randn(3, 6, generator=gen, requires_grad=True)]
    for t, scale in zip(stacked, (1.0, 4.0)):
        t.grad = torch.randn(t.shape, generator=gen) * scale * torch.tensor([0.01, 1.0, 10.0]).view(3, *[1] * (t.dim() - 1))
    expected = []
    for u in range(3):
        ps = [torch.nn.Parameter(t.detach()[u].clone()) for t in stacked]
        for p, t in zip(ps, stacked):
            p.grad = t.grad[u].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        expected.append([p.grad for p in ps])
    clip_per_client(stacked, 1.0)
    for u in range(3):
        for t, e in zip(stacked, expected[u]):
            torch.testing.assert_close(t.grad[u], e)


def test_auto_rule_and_blockers():
    fed = FederationConfig()
    assert use_together("auto", None, "cuda", 2) and use_together("auto", None, "cuda:1", 100)
    assert not use_together("auto", None, "cuda", 1)  # one client: nothing to share
    assert not use_together("auto", None, "cpu", 10)  # on a CPU: one after another (docs/usage.md)
    assert not use_together("auto", "a reason", "cuda", 10) and not use_together("off", None, "cuda", 10)
    assert use_together("on", None, "cpu", 1)
    with pytest.raises(ValueError, match="cannot be trained together: adapter dora"):
        use_together("on", blockers(make_method("fedit", "dora"), "dora", fed, mixed=False), "cpu", 3)
    assert blockers(make_method("fedit"), "lora", fed, mixed=False) is None
    assert blockers(make_method("ffa", "rslora"), "rslora", fed, mixed=False) is None
    assert "hooks (before_training, after_step, learning_rates)" in blockers(make_method("loraa2"), "lora", fed, mixed=False)
    assert "loss_term" in blockers(make_method("hetlora", mixed_ranks=True), "lora", fed, mixed=False)
    assert "mixed --client-ranks" in blockers(make_method("fedit"), "lora", fed, mixed=True)
    from fedlora.federation.privacy import PrivacyConfig

    dp = FederationConfig(privacy=PrivacyConfig(mode="example", noise=1.0))
    assert "DP-SGD" in blockers(make_method("fedit"), "lora", dp, mixed=False)


def test_auto_falls_back_silently_where_it_cannot_run(small_csv, one_thread):
    """auto with a method that has hooks (LoRA-A²) trains one after another and says so in the metrics."""
    cfg = tiny_config(small_csv, method="loraa2", clients=2, rounds=1, clients_together="auto")
    assert build(cfg).simulator.run()[0]["clients_together"] is False


@pytest.mark.parametrize("args,needle", [
    (["--method", "loraa2"], "method loraa2 trains each client with its own hooks"),
    (["--method", "fedit", "--adapter", "vera"], "adapter vera"),
    (["--method", "fedit", "--client-ranks", "2,4"], "mixed --client-ranks"),
])
def test_on_is_refused_in_one_line(args, needle, small_csv, tmp_path, capsys):
    from test_cli import TINY

    code = main(["run", *TINY, "--data", str(small_csv), "--out", str(tmp_path / "x"), "--clients-together", "on", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "--clients-together on" in lines[0], err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~10 s
def test_on_refused_as_a_user_types_it(small_csv, tmp_path):
    from test_cli import TINY

    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), "src") if p)}
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "run", *TINY, "--data", str(small_csv), "--method", "fedit",
                           "--adapter", "dora", "--clients-together", "on", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "adapter dora" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_causal_lm_equals_one_after_another(instructions_jsonl, one_thread):
    """Next-token loss over each client's response tokens (tiny:llama, rows of different lengths, 3 examples a batch
    over 10: a ragged last batch)."""
    cfg = RunConfig(task="causal-lm", model="tiny:llama", data=str(instructions_jsonl), clients=3, rounds=1, local_steps=4,
                    batch_size=3, rank=4, examples_per_client=10, test_examples=6, max_length=48, max_new_tokens=3,
                    partition="iid", seed=0, lr=5e-3, device="cpu", method="fedsa")
    assert_same_runs(recorded_run(cfg.replace(clients_together="off")), recorded_run(cfg.replace(clients_together="on")))


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "causal", "gqa"])
def test_sdpa_math_path_draws_the_masks_of_torch_sdpa_on_a_cpu(mask_kind):
    """The joint pass computes SDPA with dropout by its math path through the per-client dropout; with plain
    ``F.dropout`` in its place it equals torch's own SDPA, masks included."""
    import torch.nn.functional as F

    from fedlora.federation.together import sdpa_math

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = (torch.randn(2, 2 if mask_kind == "gqa" else 4, 6, 8, generator=gen) for _ in range(2))
    kw = {"none": {}, "float": {"attn_mask": torch.randn(2, 1, 6, 6, generator=gen)},
          "bool": {"attn_mask": torch.rand(2, 1, 6, 6, generator=gen) > 0.3}, "causal": {"is_causal": True},
          "gqa": {"enable_gqa": True}}[mask_kind]
    torch.random.default_generator.manual_seed(7)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, **kw)
    torch.random.default_generator.manual_seed(7)
    got = sdpa_math(F.dropout)(q, k, v, dropout_p=0.2, **kw)
    torch.testing.assert_close(got, expected)
