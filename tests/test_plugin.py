"""A method defined entirely in this file — its math and its protocol, registered here — runs through the simulator,
the CLI and the Flower app's in-process round with no edit anywhere else in fedlora."""

import math

import pytest
import torch

from conftest import tiny_config
from fedlora.aggregation import RULES, Aggregate, aggregate, divergence, register_rule
from fedlora.federation import REGISTRY, Method, register
from fedlora.federation.protocol import ServerUpdate, broadcast_trained

NAME = "shrunkmean"

pytestmark = pytest.mark.usefixtures("one_thread")


def shrunk_mean(Bs, As, w, *, keep: float = 0.5):
    """A toy rule: FedIT's means, B shrunk toward zero by ``keep`` (a stand-in for any new paper's rule)."""
    B = sum(c * b for c, b in zip(w.tolist(), Bs)) * keep
    A = sum(c * a for c, a in zip(w.tolist(), As))
    return Aggregate(method=NAME, B=B, A=A)


class ShrunkMean(Method):
    """Clients train A only in even rounds (a hook that knows the round) and the server sends client 0 nothing new
    in B (a hook that knows the client): enough to exercise what RoLoRA and FlexLoRA need."""

    name = NAME
    rule = NAME
    title = "a test method"
    summary = "B̂ = keep·Σ w_u B_u, Â = Σ w_u A_u"
    mixed_ranks = False
    unsupported = {"vera": "test only"}

    def frozen(self, h, rnd):
        return h.B_names() if rnd % 2 == 0 else []

    def aggregate(self, h, uploads, weights, current, ctx):
        update = super().aggregate(h, uploads, weights, current, ctx)
        return ServerUpdate(broadcast=update.broadcast, layers=update.layers, scales=update.scales)

    def deliver(self, h, broadcast, peer):
        if peer.cid == 0:  # client 0 keeps its B: it receives A and the head only
            return {n: t for n, t in broadcast.items() if n not in set(h.B_names())}
        return broadcast


@pytest.fixture
def plugin():
    register_rule(NAME, comm=lambda d, k, r, U: (r * (d + k), r * (d + k)))(shrunk_mean)
    register(ShrunkMean)
    yield
    RULES.pop(NAME)
    REGISTRY.pop(NAME)


def test_the_math_is_reachable_through_aggregate(plugin):
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    As = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    res = aggregate(NAME, Bs, As, w, keep=0.25)
    torch.testing.assert_close(res.B, 0.25 * sum(c * b for c, b in zip(w.tolist(), Bs)))
    assert math.isfinite(divergence(Bs, As, w, res))
    with pytest.raises(ValueError, match=f"unknown option 'kep' for aggregation method '{NAME}'; it accepts keep"):
        aggregate(NAME, Bs, As, w, kep=0.25)


def test_a_method_registered_here_runs_in_process_on_the_cli_and_on_flower(plugin, small_csv, tmp_path, capsys):
    from fedlora.app.experiment import build
    from fedlora.cli.main import main
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method=NAME, rounds=3)
    exp = build(cfg)
    sim, h = exp.simulator, exp.simulator.handle
    history = sim.run()
    assert [m["method"] for m in history] == [NAME] * 3
    # round 2 froze B on every client: their B uploads are absent, so bytes up are A and head only
    per_client_A = 4 * 4 * 32 * 4  # modules × r × k × float32
    head = (3 * 32 + 3) * 4
    assert history[1]["bytes_up"] == 3 * (per_client_A + head)
    # the per-client hook: client 0 never takes the global B after round 1, so its view keeps the initial B
    name = h.B_names()[0]
    assert torch.count_nonzero(sim.held[0][name]) == 0 and torch.count_nonzero(sim.held[1][name]) > 0
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, history)

    # the CLI lists it and runs it; an adapter it declares unsupported fails in one line
    assert main(["run", "--method", NAME, "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3",
                 "--rounds", "1", "--local-steps", "1", "--examples-per-client", "40", "--test-examples", "60",
                 "--max-length", "32", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    assert main(["run", "--method", NAME, "--adapter", "vera", "--quiet", "--out", str(tmp_path / "no")]) == 2
    assert f"method {NAME} does not support adapter vera: test only" in capsys.readouterr().err


def test_an_installed_plugin_is_found_through_its_entry_point(tmp_path):
    """The CLI and Flower's processes import nothing of the user's: a package's ``fedlora.methods`` entry point is."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "myplug_method.py").write_text(textwrap.dedent('''
        from fedlora.aggregation import register_rule
        from fedlora.aggregation.fedit import factors_comm, fedit
        from fedlora.federation import Method, register

        register_rule("myplug", comm=factors_comm, mixed_ranks=True)(fedit)

        @register
        class MyPlug(Method):
            name = rule = "myplug"
            title = "an installed plug-in"
            summary = "FedIT under another name"
            mixed_ranks = True
    '''))
    info = tmp_path / "myplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedlora.methods]\nmyplug = myplug_method\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "methods"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| `myplug` | an installed plug-in | FedIT under another name |" in res.stdout


BONLY = "bonly"


class BOnly(Method):
    """A second test method whose bytes differ from every built-in's table row: A frozen at the shared init, only B
    travels, and its rule declares exactly that."""

    name = rule = BONLY
    title = "a test method sending only B"
    summary = "B̂ = Σ w_u B_u, A frozen"
    up = down = "dr"
    exact = True
    unsupported = {"vera": "test only"}

    def frozen(self, h, rnd):
        return h.A_names()

    def aggregate(self, h, uploads, weights, current, ctx):
        agg = self.combine(h, uploads, weights, current, ctx)
        return broadcast_trained(h, agg, uploads, current, ctx, self.frozen(h, ctx.number))  # A stays where it is


@pytest.fixture
def bonly():
    from fedlora.aggregation.ffa import ffa

    def register_with(comm):
        register_rule(BONLY, comm=comm)(ffa)
        register(BOnly)

    yield register_with
    RULES.pop(BONLY, None)
    REGISTRY.pop(BONLY, None)


def test_a_new_method_is_held_to_its_own_declaration_with_no_test_table_edit(bonly, small_csv):
    """test_simulator's every-method check, which knows nothing of this method, counts its bytes against the bytes
    its rule declares: right, they agree; declared wrongly, the check fails."""
    from fedlora.app.experiment import build
    from test_simulator import check_run

    bonly(lambda d, k, r, U: (d * r, d * r))
    exp = build(tiny_config(small_csv, method=BONLY))
    exp.simulator.run()
    check_run(exp, BONLY, "lora")

    RULES.pop(BONLY)
    bonly(lambda d, k, r, U: (r * (d + k), r * (d + k)))  # declares A too, which never travels
    exp = build(tiny_config(small_csv, method=BONLY))
    exp.simulator.run()
    with pytest.raises(AssertionError, match="its rule's comm declares"):
        check_run(exp, BONLY, "lora")
