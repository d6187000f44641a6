"""Robustness, round 2 (issue 28): the newer features under bad input, each a one-line refusal naming the problem and
the fix (exit 2, or 3 for a run that trained nothing), before any training where the settings can tell."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_CLI, refused
from fedlora.cli.main import main

T = [*TINY_CLI[:-1], "--device", "cpu", "--quiet"]


def one_line_error(capsys, argv, code: int = 2) -> str:
    return refused(capsys, argv, code, last_line=True)


def run_args(small_csv, tmp_path, *extra):
    return ["run", *T, "--data", str(small_csv), "--out", str(tmp_path / "run"), *extra]


# 2. --seeds is a bounded count; --synthetic-seeds names itself
@pytest.mark.parametrize("argv,needle", [
    (["--seeds", "1000000000"], "--seeds '1000000000' asks for 1000000000 seeds, more than 1000"),
    (["--seeds", "99999999999999999999"], "more than 1000"),
    (["--seeds", "0,4294967296"], "seed 4294967296 is outside [0, 4294967295]"),
])
def test_seed_counts_are_bounded(small_csv, tmp_path, capsys, argv, needle):
    out = tmp_path / "cmp"
    assert needle in one_line_error(capsys, ["compare", *T, "--data", str(small_csv), "--methods", "fedit", "--out", str(out), *argv])
    assert not out.exists()


def test_study_seed_flags_and_parts(tmp_path, capsys):
    base = ["study", "--preset", "quick", "--runs", str(tmp_path / "s")]
    assert "--synthetic-seeds 'x' is not a list of integers" in one_line_error(capsys, [*base, "--synthetic-seeds", "x"])
    assert "--synthetic-seeds '5000'" in one_line_error(capsys, [*base, "--synthetic-seeds", "5000"])
    assert "--parts ',' names no part" in one_line_error(capsys, [*base, "--parts", ","])
    assert not (tmp_path / "s").exists()


# 3. no impossible δ, no negative or non-JSON ε
def test_delta_at_or_above_one_over_n_is_refused(small_csv, tmp_path, capsys):
    for delta in ("0.5", "0.9"):
        err = one_line_error(capsys, run_args(small_csv, tmp_path, "--method", "fedit", "--dp", "client", "--dp-noise", "5", "--dp-delta", delta))
        assert f"--dp-delta {delta} is not below 1/3" in err and "--dp-delta 1e-5" in err
    assert not (tmp_path / "run").exists()


def test_epsilon_is_never_negative():
    import warnings

    from fedlora.federation.privacy import epsilon_spent

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the accountant's own warnings stay quiet
        for accountant in ("rdp", "prv"):
            assert epsilon_spent(5.0, 1.0, 1, 0.9, accountant) == 0.0  # Opacus returns about -1.75 / -2.27 here


def test_no_noise_records_epsilon_as_null(small_csv, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fedlora"):
        assert main(run_args(small_csv, tmp_path, "--method", "fedit", "--dp", "client", "--dp-noise", "0")) == 0
    assert "--dp-noise 0 adds no noise" in caplog.text
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    assert "Infinity" not in line and json.loads(line)["epsilon"] is None
    assert "ε = none (no noise, no bound)" in (tmp_path / "run" / "summary.md").read_text()


# 4. configuration errors before training; a run that trained nothing ends non-zero
@pytest.mark.parametrize("extra,needle", [
    (["--method", "hetlora", "--hetlora-lam", "0.1", "--hetlora-gamma", "0.5", "--dp", "example"], "--dp example cannot clip hetlora's extra loss term"),
    (["--lr", "inf"], "lr=inf must be a finite positive number"),
    (["--lora-alpha", "inf"], "--lora-alpha inf must be a finite positive number"),
    (["--method", "hetlora", "--hetlora-gamma", "nan"], "option hetlora-gamma=nan of method hetlora must be in (0, 1]"),
    (["--method", "hetlora", "--hetlora-lam", "nan"], "option hetlora-lam=nan of method hetlora must be in [0, inf)"),
])
def test_settings_that_can_be_checked_are_checked_before_training(small_csv, tmp_path, capsys, extra, needle):
    assert needle in one_line_error(capsys, run_args(small_csv, tmp_path, *extra))
    assert not (tmp_path / "run").exists()


def test_a_run_that_aggregated_nothing_exits_3_and_keeps_its_files(small_csv, tmp_path, capsys):
    err = one_line_error(capsys, run_args(small_csv, tmp_path, "--method", "fedit", "--lr", "1e30", "--optimizer", "sgd",
                                          "--max-grad-norm", "0"), code=3)
    assert "no round of the run aggregated anything" in err and "all 3 client turns failed the same way" in err
    assert "contains NaN or Inf" in err and "lower --lr" in err and str(tmp_path / "run") in err
    assert {"metrics.jsonl", "summary.md", "config.json"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_check_trained_names_the_shared_reason():
    from fedlora.app.rundir import TrainedNothing, check_trained

    ok = [{"skipped": True, "rejected": []}, {"skipped": False, "rejected": []}]
    check_trained(ok)  # one round aggregated: trained
    bad = [{"skipped": True, "rejected": [{"client": c, "reason": f"client {c} raised ValueError during its turn: boom"}]} for c in range(2)]
    with pytest.raises(TrainedNothing, match="all 2 client turns failed the same way: a client raised ValueError during its turn: boom"):
        check_trained(bad)


# 5. no local test set
def test_local_test_fraction_zero_runs(small_csv, tmp_path, capsys):
    assert main(run_args(small_csv, tmp_path, "--method", "fedit", "--local-test-fraction", "0")) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["local_accuracy"] is None and row["global_accuracy"] is not None
    assert "outside [0, 1)" in one_line_error(capsys, run_args(small_csv, tmp_path / "x", "--local-test-fraction", "1"))


# 6. export-private
def test_export_private_refuses_in_one_line(small_csv, tmp_path, capsys):
    state = tmp_path / "state"
    (state / "run0").mkdir(parents=True)
    exp = ["export-private", "--state-dir", str(state)]
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert "is not a directory" in one_line_error(capsys, [exp[0], str(afile), *exp[1:]])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in one_line_error(capsys, [exp[0], str(empty), *exp[1:]])
    run = tmp_path / "run"
    assert main(["run", *T, "--data", str(small_csv), "--method", "fedsa", "--out", str(run)]) == 0
    err = one_line_error(capsys, [exp[0], str(run), *exp[1:]])
    assert "has no flower.json" in err and "not a Flower run's directory" in err
    (run / "flower.json").write_text("{not json")
    err = one_line_error(capsys, [exp[0], str(run), *exp[1:]])
    assert str(run / "flower.json") in err and "not readable JSON" in err
    (run / "flower.json").write_text('{"accepted": {}}')
    (state / "run0" / "partition-0.safetensors").write_bytes(os.urandom(100))  # corrupt
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(state / "run0" / "partition-1.safetensors"), metadata={"other": "tool"})  # foreign
    err = one_line_error(capsys, [exp[0], str(run), *exp[1:]])
    assert "holds no private state" in err and "2 unreadable state file(s) skipped" in err


# 7. paths are stored absolute; the adapter names its base
def test_relative_paths_are_stored_absolute(small_csv, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(small_csv, work / "d.csv")
    monkeypatch.chdir(work)
    assert main(["run", *T, "--data", "d.csv", "--method", "fedit", "--out", "run"]) == 0
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["data"] == str(work / "d.csv")
    adapter = json.loads((work / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny:bert"


# 8, 9. compare validates every method, and its reference, before training any
@pytest.mark.parametrize("methods,extra,needle", [
    ("fedit,central", ["--dp", "client"], "--dp client needs a method whose server rule is a weighted sum"),
    ("fedit,fedsb", ["--dp", "client"], "does not cover fedsb's setup round"),
    ("fedit,ravan", ["--ravan-heads", "100"], "100 head(s) of rank 8 need 800 orthonormal directions"),
    ("fedit,fedsa", ["--reference", "ravan"], "--reference ravan is not one of the compared methods (fedit, fedsa)"),
    ("fedit,fedsa", ["--ravan-heads", "2"], "option ravan-heads=2 belongs to method ravan, which this run does not use (--methods fedit,fedsa)"),
])
def test_compare_refuses_before_training_any(small_csv, tmp_path, capsys, methods, extra, needle):
    out = tmp_path / "cmp"
    assert needle in one_line_error(capsys, ["compare", *T, "--data", str(small_csv), "--methods", methods, "--out", str(out), *extra])
    assert not (out / "fedit").exists()


# 10. absurd data
def test_absurd_data_is_refused(tmp_path, capsys):
    wide = tmp_path / "wide.csv"
    wide.write_text("text,label\n" + ",".join(["x"] * 200_000) + "\n")
    out = tmp_path / "refused"  # refused once the data is read: the run directory it created is not left behind
    assert "line 2 has 200000 fields, more than 10000" in one_line_error(capsys, ["run", *T, "--data", str(wide), "--out", str(out)])
    assert not out.exists()
    out.mkdir()  # a directory the user made is theirs: kept
    one_line_error(capsys, ["run", *T, "--data", str(wide), "--out", str(out)])
    assert out.is_dir()
    header = tmp_path / "header.csv"
    header.write_text(",".join(["x"] * 600_000))
    assert "header line is longer than 1 MiB" in one_line_error(capsys, ["run", *T, "--data", str(header)])
    folder = tmp_path / "x.csv"
    folder.mkdir()
    assert "is a directory, not a csv file" in one_line_error(capsys, ["run", *T, "--data", str(folder)])
    err = one_line_error(capsys, ["run", "--data", "synthetic:1e60,1e60", "--quiet", "--out", str(tmp_path / "s")])
    assert "α and β must be at most 10000" in err and not (tmp_path / "s").exists()


# 13. the summary of a mixed-rank run names the client ranks
def test_mixed_rank_summary_names_client_ranks(small_csv, tmp_path):
    assert main(run_args(small_csv, tmp_path, "--method", "hetlora", "--client-ranks", "2,4", "--rank", "64")) == 0
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "client ranks 2,4 (r_max=4)" in summary.splitlines()[0] and "r=64" not in summary
    clients = summary.partition("## Clients")[2]
    assert "| rank |" in clients and clients.count(" | 2 |") + clients.count(" | 4 |") >= 3


# 14. option values and owners
@pytest.mark.parametrize("extra,needle", [
    (["--method", "hetlora", "--hetlora-lam", "-1000"], "option hetlora-lam=-1000.0 of method hetlora must be in [0, inf)"),
    (["--method", "hetlora", "--hetlora-gamma", "5"], "option hetlora-gamma=5.0 of method hetlora must be in (0, 1]"),
    (["--method", "fedit", "--ravan-heads", "0"], "option ravan-heads=0 belongs to method ravan, which this run does not use (--method fedit)"),
    (["--method", "fedit", "--method-options", "fedrot-first=X"], "option fedrot-first=X belongs to method fedrot"),
    (["--method", "hetlora", "--hetlora-lam", "1", "--method-options", "hetlora-lam=2"], "method option hetlora-lam is given more than once"),
    (["--method", "hetlora", "--method-options", "hetlora-lam=1,hetlora-lam=2"], "method option hetlora-lam is given more than once"),
])
def test_method_options_are_checked(small_csv, tmp_path, capsys, extra, needle):
    assert needle in one_line_error(capsys, run_args(small_csv, tmp_path, *extra))


# 15. small ones
@pytest.mark.parametrize("extra,needle", [
    (["--seed", "-1"], "--seed -1 is outside [0, 4294967295]"),
    (["--seed", str(2**64)], f"--seed {2**64} is outside [0, 4294967295]"),
    (["--method", "hetlora", "--client-ranks", "2,x"], "--client-ranks '2,x' is not a list of ranks"),
    (["--method", "hetlora", "--client-ranks", "2,4,8,16"], "--client-ranks '2,4,8,16' gives 4 ranks to 3 clients, so 1 would go unused"),
    (["--method", "hetlora", "--client-ranks", "2,64"], "no client rank above 32"),
    (["--alpha", "inf"], "Dirichlet alpha=inf (--alpha) must be a finite positive number"),
])
def test_small_ones(small_csv, tmp_path, capsys, extra, needle):
    assert needle in one_line_error(capsys, run_args(small_csv, tmp_path, *extra))


def _fedlora(*args, timeout=300) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "fedlora.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_a_real_process_refuses_in_one_line(small_csv, tmp_path):
    """A real `fedlora` process, as a user runs it: exit 2, one line on stderr, nothing written."""
    bad = _fedlora("run", *T, "--data", str(small_csv), "--method", "fedit", "--dp", "client", "--dp-delta", "0.5", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--dp-delta 0.5 is not below 1/3" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_dp_run_stderr_is_plain_lines(small_csv, tmp_path):
    """A real DP run: its stderr holds no Opacus warning and no timestamped log line (Opacus configures the root logger
    with timestamps when imported)."""
    done = _fedlora("run", *T, "--data", str(small_csv), "--method", "fedit", "--dp", "client", "--dp-target-epsilon", "8",
                    "--weighting", "uniform", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and ":WARNING:" not in done.stderr and ":INFO:" not in done.stderr, done.stderr
    done = _fedlora("run", *T, "--data", str(small_csv), "--method", "fedit", "--lr", "1e30", "--optimizer", "sgd", "--max-grad-norm", "0",
                    "--dp", "client", "--dp-noise", "1", "--out", str(tmp_path / "diverged"))
    assert done.returncode == 3 and ":WARNING:" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fedlora: error: no round of the run aggregated anything")
