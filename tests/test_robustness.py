"""What breaking the CLI on purpose found (issue "Robustness"): each case a one-line refusal, no finished work lost."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import TINY_CLI, refused, tiny_config
from fedlora.app.experiment import RunConfig, run_experiment
from fedlora.federation.simulator import check_server_memory

T = TINY_CLI


# 1. a rank the layers cannot hold, a server step that cannot fit
def test_rank_above_the_layers_and_server_memory_are_refused(small_csv, capsys):
    err = refused(capsys, ["run", *T, "--data", str(small_csv), "--rank", "64", "--method", "florana"])
    assert "rank 64 exceeds" in err and "min(d, k) = 32" in err
    h = SimpleNamespace(rank=64, layers={"q": SimpleNamespace(out_features=4096, in_features=4096)})
    with pytest.raises(ValueError, match="needs about .* GiB, more than half"):
        check_server_memory(h, 10_000)
    check_server_memory(h, 10)  # an ordinary federation passes


# 2. two writers on one run directory
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(small_csv, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".running").write_text(str(holder.pid))
        with pytest.raises(ValueError, match=f"being written by process {holder.pid}"):
            run_experiment(tiny_config(small_csv, rounds=1, out=str(out)))
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, the run goes ahead and gives the lock back at the end
    run_experiment(tiny_config(small_csv, rounds=1, out=str(out)))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and not (out / ".running").exists()


# 3. resume trusts only the checkpoint's own settings
def test_resume_refuses_an_edited_config_and_fewer_rounds(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    run_experiment(tiny_config(small_csv, rounds=2, out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = refused(capsys, ["run", "--resume", str(out), "--rounds", "1"])
    assert "has finished 2 rounds" in err
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"method": "fedit", "seed": 5}))
    err = refused(capsys, ["run", "--resume", str(out), "--rounds", "3"])
    assert "no longer matches" in err and "method='fedit'" in err and "seed=5" in err
    (out / "config.json").write_text(json.dumps(cfg | {"rank": 2}))
    assert "rank=2 (checkpoint: 4)" in refused(capsys, ["run", "--resume", str(out), "--rounds", "3"])
    for name, data in before.items():
        if name != "config.json":
            assert (out / name).read_bytes() == data, name


def test_a_checkpoint_older_than_a_setting_resumes_under_its_default(tmp_path):
    """A checkpoint written before a RunConfig field existed lacks that key: it counts as the field's default, so the
    run resumes; a non-default value for it is still a changed setting."""

    from fedlora.app.experiment import RunConfig, check_resume

    cfg = RunConfig(rounds=3)
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("secure_aggregation", "secagg_clip", "rounds", "out")}
    check_resume(cfg, {"round": 1, "config": saved}, tmp_path)  # no error
    with pytest.raises(ValueError, match="secure_aggregation=True"):
        check_resume(cfg.replace(secure_aggregation=True), {"round": 1, "config": saved}, tmp_path)


# 4. TOML values are type-checked at the edge
@pytest.mark.parametrize("line,needle", [
    ('similarity = "no"', 'similarity = "no" is not true or false'),
    ('keep-head-local = "false"', 'keep-head-local = "false" is not true or false'),
    ('lr = "fast"', 'lr = "fast" is not a number'),
    ("rank = 4.5", "rank = 4.5 is not an integer"),
    ('rank = "eight"', 'rank = "eight" is not an integer'),
    ('target-modules = ["query", "value"]', 'target-modules = ["query", "value"] is not a string'),
])
def test_toml_types(tmp_path, capsys, line, needle):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(line + "\n")
    err = refused(capsys, ["run", "--config", str(cfg)])
    assert needle in err and str(cfg) in err


# 5. a corrupted checkpoint
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupted_checkpoint_is_one_line_and_nothing_is_touched(small_csv, tmp_path, capsys, damage):
    out = tmp_path / "run"
    run_experiment(tiny_config(small_csv, rounds=1, out=str(out)))
    ckpt = out / "checkpoint.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(4096))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = refused(capsys, ["run", "--resume", str(out), "--rounds", "2"])
    assert "is not a readable fedlora checkpoint" in err and str(ckpt) in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# 6. tracebacks that are now one line, before any training
def test_bad_out_device_test_examples_and_method_lists(small_csv, tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert "is an existing file" in refused(capsys, ["run", *T, "--data", str(small_csv), "--out", str(afile)])
    assert "cannot create the run directory" in refused(capsys, ["run", *T, "--data", str(small_csv), "--out", str(afile / "run")])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in refused(capsys, ["run", *T, "--data", str(small_csv), "--out", str(locked / "run")])
    assert "unknown device 'cuda:abc'" in refused(capsys, ["run", *T, "--data", str(small_csv), "--device", "cuda:abc"])
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device" in refused(capsys, ["run", *T, "--data", str(small_csv), "--device", "cuda"])
    assert "test_examples=0" in refused(capsys, ["run", *T, "--data", str(small_csv), "--test-examples", "0"])
    assert "names no method" in refused(capsys, ["compare", *T, "--data", str(small_csv), "--methods", ","])
    out = tmp_path / "cmp"
    assert "fedit more than once" in refused(capsys, ["compare", *T, "--data", str(small_csv), "--methods", "fedit,fedit", "--out", str(out)])
    assert not out.exists()  # refused before anything trained


# 7. dropped rows are counted, and nothing left is refused
def test_dropped_rows_are_counted(tmp_path, caplog, capsys):
    from fedlora.data import load_labelled_text

    path = tmp_path / "d.csv"
    rows = ["text,label", "good one,pos", "good one,pos", "bad one,neg", "clash,pos", "clash,neg", ",pos", "no label,"]
    rows += [f"text {i},{'pos' if i % 2 else 'neg'}" for i in range(6)]
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="fedlora"):
        data = load_labelled_text(str(path))
    assert len(data.dataset) == 8
    assert "kept 8 of 13 rows; dropped 2 with empty text or no label, 2 whose text also appears with another label, 1 repeating" in caplog.text
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n,pos\nx,\n")
    assert "no usable rows" in refused(capsys, ["run", *T, "--data", str(empty)])


def test_run_config_check_type_accepts_the_right_types():
    for key, value in (("rank", 4), ("lr", 1), ("lr", 0.5), ("similarity", False), ("target_modules", "query"), ("keep_head_local", True)):
        RunConfig.check_type(key, value, "test")
