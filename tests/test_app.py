"""The application layer's contract: every front end resolves the same settings, a run validates once and builds its
method once, settings are owned by parts, and the run directory is held by whoever writes it (the Flower ServerApp
too). The public API is importable from the package."""

import json
import tomllib
from pathlib import Path

import pytest

from conftest import tiny_config
from fedlora.app.config import PARTS, TASK_DEPENDENT, RunConfig
from fedlora.app.tasks import KINDS, TASKS
from fedlora.cli.main import _config_from, build_parser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli_config(*argv: str) -> RunConfig:
    return _config_from(build_parser().parse_args(["run", *argv]))


def flower_config(**keys) -> RunConfig:
    """What the ServerApp resolves from pyproject.toml's defaults with ``keys`` given by ``--run-config``."""
    pytest.importorskip("flwr")
    from fedlora.flower.config import from_flower

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return from_flower(defaults | keys)


@pytest.mark.parametrize("task,data", [("classification", "tweets"), ("classification", "synthetic:0.5,0.5"), ("causal-lm", "gsm8k")])
def test_cli_and_flower_resolve_the_same_settings_for_every_task_kind(task, data):
    cli = cli_config("--task", task, "--data", data)
    flower = flower_config(task=task, data=data)
    assert cli.to_dict() == flower.to_dict() == RunConfig(task=task, data=data).to_dict()
    kind = cli.task_kind()
    assert {k: cli.to_dict()[k] for k in TASK_DEPENDENT} == kind.defaults  # each kind's own defaults, not classification's
    cli.validate()
    flower.validate()


def test_every_task_kind_declares_every_task_dependent_default():
    assert set(TASKS) <= set(KINDS)
    for kind in KINDS.values():
        assert set(kind.defaults) == set(TASK_DEPENDENT), kind.name


def test_a_given_setting_wins_over_the_task_default_and_survives_replace():
    cfg = RunConfig(task="causal-lm", model="tiny:llama", max_length=64)
    assert (cfg.model, cfg.target_modules, cfg.max_length) == ("tiny:llama", "q_proj,v_proj", 64)
    back = cfg.replace(task="classification", model="tiny:bert", max_length=None)
    assert (back.model, back.target_modules, back.max_length) == ("tiny:bert", "query,value", 64)  # not the LM's, resolved anew
    assert RunConfig(**cfg.to_dict()) .to_dict() == cfg.to_dict()  # config.json reads back to the same settings


def test_every_setting_has_one_owner_with_help_and_the_flags_come_from_them():
    names = [f.name for f in RunConfig.fields()]
    assert len(names) == len(set(names))
    for part, cls in PARTS.items():
        assert cls.__doc__ and callable(cls.check), part
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest for a in run._actions}
    for f in RunConfig.fields():
        assert f.metadata["help"], f.name
        assert f.name in flags or f.name == "out", f.name
    assert set(RunConfig().parts.__dict__) == set(PARTS)


def test_toml_by_part_equals_flat_toml(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('method = "fedsa"\nrounds = 3\ndp = "example"\ndp-noise = 0.7\n')
    parts = tmp_path / "parts.toml"
    parts.write_text('[federation]\nmethod = "fedsa"\nrounds = 3\n[privacy]\ndp = "example"\ndp-noise = 0.7\n')
    assert RunConfig.from_toml(flat) == RunConfig.from_toml(parts) == RunConfig(method="fedsa", rounds=3, dp="example", dp_noise=0.7)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[privacy]\nrounds = 3\n')
    with pytest.raises(ValueError, match=r"\[privacy\] has no setting 'rounds'"):
        RunConfig.from_toml(wrong)


def test_one_fedlora_run_validates_once_and_builds_its_method_once(small_csv, tmp_path, monkeypatch):
    import fedlora.app.config as config_module
    from fedlora.cli.main import main

    checks, methods = [], []
    for part, cls in PARTS.items():
        original = cls.check
        monkeypatch.setattr(cls, "check", lambda self, run, _o=original, _p=part: (checks.append(_p), _o(self, run))[1])
    make = config_module.make_method
    monkeypatch.setattr(config_module, "make_method", lambda *a, **k: (methods.append(a[0]), make(*a, **k))[1])
    config_module.parse_ranks.cache_clear()
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--local-steps", "1",
            "--batch-size", "4", "--examples-per-client", "20", "--test-examples", "20", "--max-length", "16", "--partition", "iid",
            "--method", "flexlora", "--client-ranks", "2,4,8", "--quiet", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert sorted(checks) == sorted(PARTS), checks  # each part checked once
    assert methods == ["flexlora"]  # one method object, the one the build uses
    assert config_module.parse_ranks.cache_info().misses == 1  # "2,4,8" parsed once
    assert json.loads((tmp_path / "run" / "config.json").read_text())["client_ranks"] == "2,4,8"


def test_a_changed_setting_is_validated_again():
    cfg = RunConfig(model="tiny:bert").validate()
    cfg.rounds = 0
    with pytest.raises(ValueError, match="rounds=0"):
        cfg.validate()


def test_the_flower_server_app_holds_the_run_directory_lock(small_csv, tmp_path):
    pytest.importorskip("flwr")
    from fedlora.app.rundir import RunDir
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation

    cfg = tiny_config(small_csv, rounds=1, out=str(tmp_path / "run"))
    held = RunDir(tmp_path / "run").prepare()
    (held.path / ".running").write_text("1")  # pid 1 is alive: another process writes the directory
    with pytest.raises(ValueError, match="is being written by process 1"):
        run_federation(InlineGrid(cfg), cfg)
    assert not (held.path / "metrics.jsonl").exists()
    (held.path / ".running").unlink()
    history = run_federation(InlineGrid(cfg), cfg)
    assert len(history) == 1 and not (held.path / ".running").exists()


def test_central_is_refused_on_flower_before_anything_is_written(small_csv, tmp_path):
    pytest.importorskip("flwr")
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation

    cfg = tiny_config(small_csv, method="central", out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="runs in-process only"):
        run_federation(InlineGrid(tiny_config(small_csv)), cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_causal_lm_round_runs_on_flower_as_in_process(instructions_jsonl, tmp_path):
    """task = causal-lm on tiny:llama through the Flower ServerApp/ClientApp round equals the in-process run."""
    pytest.importorskip("flwr")
    from fedlora.app.experiment import run_experiment
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation
    from test_flower import assert_same_history

    keys = dict(task="causal-lm", model="tiny:llama", data=str(instructions_jsonl), clients=2, rounds=1, local_steps=1, batch_size=4,
                examples_per_client=8, test_examples=4, max_new_tokens=4, partition="iid", method="fedsa", device="cpu")
    cfg = flower_config(**{k.replace("_", "-"): v for k, v in keys.items()})
    assert cfg.to_dict() == RunConfig(**keys).to_dict()
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    _, reference = run_experiment(RunConfig(**keys, out=str(tmp_path / "inprocess")))
    assert_same_history(flower, reference)


def test_the_public_api():
    import fedlora

    for name in ("RunConfig", "run", "compare", "load_global_model", "aggregate", "methods"):
        assert hasattr(fedlora, name), name
    assert fedlora.RunConfig is RunConfig
    assert "fedit" in fedlora.methods() and "florana" in fedlora.methods()
    import torch

    Bs, As = [torch.randn(6, 2, dtype=torch.float64) for _ in range(2)], [torch.randn(2, 5, dtype=torch.float64) for _ in range(2)]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    agg = fedlora.aggregate("flora", Bs, As, w)
    ideal = sum(wi * B @ A for wi, B, A in zip(w, Bs, As))
    assert torch.allclose(agg.B @ agg.A, ideal)  # FLoRA stacks: exact
