"""Secure aggregation on Flower (SecAgg+): the server sees only the weighted sum of the uploads, and a linear method's
run matches the plain Flower run within SecAgg+'s quantisation error. Driven through test_flower's in-process Grid,
which serialises every message and (``fresh``) every client context as Flower does."""

import math

import pytest
import torch

from conftest import tiny_config

pytest.importorskip("flwr")

from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from fedlora.app.experiment import RunConfig, build  # noqa: E402
from fedlora.cli.main import main  # noqa: E402
from fedlora.flower import secure  # noqa: E402
from fedlora.flower.server_app import run_federation  # noqa: E402
from test_flower import InlineGrid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _spy_means(monkeypatch):
    """Record, per round, the weighted mean of the inputs the server's rule is given (the secure run: its one input)."""
    from fedlora.federation.simulator import Simulator

    means = []
    original = Simulator.close_round

    def spy(self, results, failed, rnd, started, secure=None):
        if secure is not None:
            means.append({k: v.double() for k, v in secure.mean.items()})
        else:
            w = [r.n_train for r in results]
            total = sum(w)
            means.append({k: sum(wi / total * (r.upload | r.extras)[k].double() for wi, r in zip(w, results)) for k in (results[0].upload | results[0].extras)})
        return original(self, results, failed, rnd, started, secure)

    monkeypatch.setattr(Simulator, "close_round", spy)
    return means


@pytest.mark.parametrize("method,fresh", [("fedit", False), ("ffa", True), ("fedsa", True)])
def test_secure_round_equals_the_plain_flower_round_within_the_quantisation_error(small_csv, tmp_path, monkeypatch, method, fresh):
    cfg = tiny_config(small_csv, method=method, rounds=2, clients=3)
    means = _spy_means(monkeypatch)
    plain = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "plain")))
    plain_means = list(means)
    means.clear()
    grid = InlineGrid(cfg, fresh=fresh)
    sec_cfg = cfg.replace(secure_aggregation=True, out=str(tmp_path / "secure"))
    history = run_federation(grid, sec_cfg)

    # Round 1 starts from the same state, so the clients upload the same tensors: the server's secure mean is the
    # plain weighted mean within the stated bound.
    n = [len(c.train) for c in build(cfg).simulator.clients]
    bound = secure.error_bound(cfg.secagg_clip, [x / max(n) for x in n])
    assert 0 < bound < 1e-4
    worst = max(float((means[0][k] - plain_means[0][k]).abs().max()) for k in plain_means[0])
    assert worst <= bound * 1.01 + 1e-7, (worst, bound)
    assert worst > 0  # quantised: not the float mean bit for bit (the test would not see a plain round by mistake)

    # The server never received a client's upload: every train reply it got carried no tensor.
    replies_with_arrays = [m for m in grid.sent if m.metadata.message_type == "train" and "fitins.config" in m.content.config_records]
    assert replies_with_arrays  # the collect stage's fit messages went out
    for h, p in zip(history, plain):
        assert h["secure_aggregation"] is True and h["divergence"] is None and h["bound"] is None
        assert h["clients"] == p["clients"] and h["n_rejected"] == 0
        assert h["bytes_up"] > p["bytes_up"]  # masked vectors in 2^32 integers, keys and shares
        assert h["local_accuracy"] == pytest.approx(p["local_accuracy"], abs=0.1)
        assert h["global_accuracy"] == pytest.approx(p["global_accuracy"], abs=0.1)


def test_the_server_only_ever_holds_masked_uploads(small_csv, tmp_path):
    """What crosses to the server in the collect stage is masked integers, not the client's upload."""
    cfg = tiny_config(small_csv, method="fedit", rounds=1, clients=3)
    seen = []

    class Recording(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            seen.extend(replies)
            return replies

    run_federation(Recording(cfg), cfg.replace(secure_aggregation=True, out=str(tmp_path / "s")))
    masked = [r for r in seen if RECORD_KEY_CONFIGS in r.content.config_records and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    for r in masked:
        assert all(len(rec) == 0 for rec in r.content.array_records.values())  # the float upload was cleared by the mod
        values = [v for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for v in bytes_to_ndarray(b).ravel()]
        assert all(float(v).is_integer() and 0 <= v < 2**32 for v in values)  # integers mod 2^32, uniformly masked
        assert max(values) > 2**30


def test_a_client_that_fails_in_the_secure_round_is_left_out_and_the_round_goes_on(small_csv, tmp_path, monkeypatch):
    from fedlora.federation.simulator import client_turn as real_turn
    from fedlora.flower import client_app

    def turn(h, method, task, client, start, cfg, rnd):
        if client.cid == 1 and rnd == 1:
            raise RuntimeError("disk full")
        return real_turn(h, method, task, client, start, cfg, rnd)

    monkeypatch.setattr(client_app, "client_turn", turn)
    cfg = tiny_config(small_csv, method="fedit", rounds=2, clients=4)
    history = run_federation(InlineGrid(cfg), cfg.replace(secure_aggregation=True, out=str(tmp_path / "s")))
    assert history[0]["clients"] == [0, 2, 3] and history[0]["n_rejected"] == 1
    assert "not in round 1's secure sum" in history[0]["rejected"][0]["reason"]
    assert history[1]["clients"] == [0, 1, 2, 3] and not math.isnan(history[1]["global_accuracy"])


def test_a_value_outside_the_secagg_range_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"outside SecAgg\+'s range ±0.5; raise secagg-clip"):
        secure.reply_arrays({"a": torch.tensor([0.1, -0.9])}, {}, 0.5, 3)


@pytest.mark.parametrize("changes,message", [
    ({"method": "florana"}, "needs each client's factors"),
    ({"method": "fedit", "client_ranks": "2,4"}, "mixed --client-ranks"),
    ({"method": "fedit", "dp": "client"}, "--dp client is not supported"),
    ({"method": "fedit", "similarity": True}, "--similarity cannot be measured"),
    ({"method": "fedit", "secagg_clip": 0.0}, "secagg_clip=0.0 must be positive"),
])
def test_secure_aggregation_refuses_what_it_cannot_sum(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model="tiny:bert", secure_aggregation=True, **changes).validate()


def test_fedlora_run_in_process_refuses_secure_aggregation_in_one_line(capsys, tmp_path):
    assert main(["run", "--model", "tiny:bert", "--method", "fedit", "--secure-aggregation", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "secure aggregation runs on Flower" in err and len(err.splitlines()) == 1


def test_neighbourhoods_grow_logarithmically_and_a_twelve_client_round_survives_a_dropout(small_csv, tmp_path, monkeypatch):
    assert secure.neighbourhood(3) == (1.0, 0.5) and secure.neighbourhood(9) == (1.0, 0.5)
    assert secure.neighbourhood(12) == (9, 5) and secure.neighbourhood(1000) == (21, 11)
    from fedlora.federation.simulator import client_turn as real_turn
    from fedlora.flower import client_app

    def turn(h, method, task, client, start, cfg, rnd):
        if client.cid == 7:
            raise RuntimeError("lost")
        return real_turn(h, method, task, client, start, cfg, rnd)

    monkeypatch.setattr(client_app, "client_turn", turn)
    cfg = tiny_config(small_csv, method="fedit", rounds=1, clients=12, examples_per_client=12)
    history = run_federation(InlineGrid(cfg), cfg.replace(secure_aggregation=True, out=str(tmp_path / "s")))
    assert history[0]["clients"] == [c for c in range(12) if c != 7] and history[0]["n_rejected"] == 1
