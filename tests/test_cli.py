"""The `fedlora` command line: a tiny end-to-end run and compare, TOML config, and one-line errors."""

import json
import subprocess
import sys

import pytest

from fedlora.cli.main import main

TINY = ["--model", "tiny:bert", "--clients", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "8",
        "--rank", "4", "--examples-per-client", "40", "--test-examples", "60", "--max-length", "32",
        "--partition", "iid", "--quiet"]


def test_run_writes_the_run_directory(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--data", str(small_csv), "--method", "fedex", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["method"] == "fedex" for r in rows)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert "| fedex |" in capsys.readouterr().out
    clients = (out / "summary.md").read_text().partition("## Clients")[2]
    assert "labels (train/test)" in clients and "negative" in clients and "| 0 |" in clients  # per-client label mix


def test_interrupt_names_the_command_that_continues(small_csv, tmp_path, capsys, monkeypatch):
    import fedlora.app.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    out = tmp_path / "run"
    assert main(["run", *TINY, "--data", str(small_csv), "--out", str(out)]) == 130
    assert f"continue with `fedlora run --resume {out}`" in capsys.readouterr().err
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit", "--out", str(tmp_path / "c")]) == 130
    assert "continue with `fedlora compare" in capsys.readouterr().err


def test_compare_table_and_plots(small_csv, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit,fedsa", "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| fedit |" in table and "| fedsa |" in table
    from fedlora.app.experiment import RunConfig, majority_rate

    settings = json.loads((out / "fedit" / "config.json").read_text())
    rate = majority_rate(RunConfig(**settings))
    assert 1 / 3 <= rate < 1 and f"Majority-class rate of the global test set: {rate:.3f}" in table
    for png in ("accuracy.png", "divergence.png", "bytes.png", "tradeoff.png"):
        assert (out / png).stat().st_size > 1000
    # same data, partition and seed for each method: the global test sets are identical
    a = json.loads((out / "fedit" / "config.json").read_text())
    b = json.loads((out / "fedsa" / "config.json").read_text())
    assert {k: v for k, v in a.items() if k not in ("method", "out")} == {k: v for k, v in b.items() if k not in ("method", "out")}


def test_compare_writes_its_table_between_a_docs_files_markers(small_csv, tmp_path, capsys):
    from fedlora.app.report import COMPARE_END, COMPARE_START

    doc = tmp_path / "doc.md"
    doc.write_text(f"# Results\n\nbefore\n{COMPARE_START}\nold table\n{COMPARE_END}\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no markers here\n")
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "--rounds", "1", "--data", str(small_csv), "--methods", "fedit,ffa", "--out", str(out)]
    assert main([*args, "--write-table", str(doc), str(bare)]) == 2  # refused before any run
    err = capsys.readouterr().err
    assert "bare.md: the file has no compare-table markers" in err and len(err.strip().splitlines()) == 1
    assert not (out / "fedit").exists() and "old table" in doc.read_text()
    assert main([*args, "--write-table", str(doc)]) == 0
    text = doc.read_text()
    table = (out / "comparison.md").read_text().partition("\n\n")[2].partition("\nSettings: ")[0].strip()
    assert "old table" not in text and table in text and "| fedit |" in text and "| ffa |" in text
    assert text.startswith("# Results\n\nbefore\n") and text.endswith(f"{COMPARE_END}\nafter\n")
    assert main([*args, "--write-table", str(doc)]) == 0 and doc.read_text() == text  # read back: the same table


def test_compare_reads_back_finished_runs_and_refuses_other_settings(small_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit", "--out", str(out)]) == 0
    before = (out / "fedit" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit,ffa", "--out", str(out)]) == 0
    assert "fedit: finished run read back" in capsys.readouterr().out
    assert (out / "fedit" / "metrics.jsonl").read_text() == before  # not run again
    table = (out / "comparison.md").read_text()
    assert "| fedit |" in table and "| ffa |" in table
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit", "--out", str(out), "--lr", "0.01"]) != 0
    assert "holds a fedit run with other settings" in capsys.readouterr().err


def test_toml_config_and_flag_override(small_csv, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'method = "fedit"\nrounds = 1\nclients = 3\ndata = "{small_csv}"\nmodel = "tiny:bert"\n'
                   'examples-per-client = 40\ntest-examples = 60\nmax-length = 32\npartition = "iid"\nlocal-steps = 1\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--method", "svd", "--quiet", "--out", str(out)]) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["method"] == "svd" and resolved["rounds"] == 1


@pytest.mark.parametrize("args,needle", [
    (["--method", "fedavg"], "unknown method 'fedavg'"),
    (["--adapter", "lokr"], "unknown adapter 'lokr'"),
    (["--partition", "zipf"], "zipf"),
    (["--alpha", "0"], "alpha=0"),
    (["--fraction", "1.5"], "fraction=1.5"),
    (["--rank", "0"], "r=0"),
    (["--clients", "0"], "clients=0"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--method", "svd", "--adapter", "vera"], "does not support adapter vera"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle, small_csv, tmp_path, capsys):
    code = main(["run", *TINY, "--data", str(small_csv), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedlora: error:") and needle in lines[0], err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # rejected before any work started


@pytest.mark.parametrize("case", ["missing-file", "no-label-column", "too-many-clients", "unknown-model", "unknown-key"])
def test_bad_data_model_and_config_inputs(case, small_csv, tmp_path, capsys):
    args = {"missing-file": ["--data", str(tmp_path / "nope.csv")],
            "too-many-clients": ["--data", str(small_csv), "--clients", "5000"],
            "unknown-model": ["--data", str(small_csv), "--model", str(tmp_path / "no-model")]}.get(case, [])
    needle = {"missing-file": "nope.csv", "no-label-column": "stars", "too-many-clients": "5000",
              "unknown-model": "no-model", "unknown-key": "learning_rate"}[case]
    if case == "no-label-column":
        bad = tmp_path / "reviews.csv"
        bad.write_text("text,stars\ngood,5\nbad,1\nfine,3\n")
        args = ["--data", str(bad)]
    if case == "unknown-key":
        cfg = tmp_path / "c.toml"
        cfg.write_text("learning_rate = 0.1\n")
        args = ["--config", str(cfg)]
    base = [a for a in TINY if a != "--quiet"]
    if case != "unknown-model":
        base = [a for i, a in enumerate(base) if not (a == "--model" or (i > 0 and base[i - 1] == "--model"))] + ["--model", "tiny:bert"]
    code = main(["run", *base, *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "run", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr
