"""Experiment trackers (``--track``): every tracker's output read back with the tracker's own reader (MlflowClient,
TensorBoard's EventAccumulator, the W&B offline run file), comparisons as parent/child runs, and the bad inputs."""

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from fedlora.app import tracking
from fedlora.cli.main import main

# The tests that read a tracker's output back need the [track] extra; the settings and bad-input tests do not.
needs_trackers = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mlflow", "tensorboard", "wandb")),
                                    reason="the [track] extra is not installed: pip install 'fedlora[track]'")

TINY = ["--model", "tiny:bert", "--clients", "3", "--rounds", "2", "--local-steps", "1", "--batch-size", "8",
        "--rank", "4", "--examples-per-client", "40", "--test-examples", "60", "--max-length", "32",
        "--partition", "iid", "--quiet"]


@pytest.fixture(scope="module")
def tracked(small_csv, tmp_path_factory, one_thread):
    """One `fedlora run ... --track tensorboard,mlflow,wandb`, as a user types it: (run directory, its history)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert main(["run", *TINY, "--data", str(small_csv), "--method", "florana", "--out", str(out),
                 "--track", "tensorboard,mlflow,wandb"]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, history


def mlflow_client(path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(path / 'mlflow.db').resolve()}")


def wandb_records(run_dir: Path) -> list:
    """Every record of the W&B offline run under ``run_dir/wandb`` (its ``run-ID.wandb`` file: W&B's LevelDB-style
    log of protobuf records, in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, buf, records, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def wandb_run(run_dir: Path):
    return next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")


def test_scalars_name_clients_and_skip_what_is_not_a_number():
    m = {"round": 3, "method": "fedit", "clients": [0, 2], "global_accuracy": 0.5, "local_accuracy": math.nan, "skipped": False,
         "epsilon": None, "bytes_up": 10, "client_metrics": {0: {"local_accuracy": 0.25, "train_loss": 1.5}, "2": {"local_accuracy": None}},
         "epsilon_per_client": {2: 0.7}, "similarity": {"A": 0.1}, "divergence_per_layer": {"q": 0.2, "v": math.inf}}
    assert tracking.scalars(m) == {"global_accuracy": 0.5, "bytes_up": 10.0, "client/0/local_accuracy": 0.25,
                                   "client/0/train_loss": 1.5, "client/2/epsilon": 0.7, "similarity/A": 0.1}
    assert tracking.layer_rows(m) == {"round": [3], "layer": ["q"], "divergence": [0.2]}


@needs_trackers
def test_client_metrics_make_up_the_rounds_local_scores(tracked):
    """Each round's ``client_metrics`` are the accepted clients' own: their example-weighted local accuracy and mean
    training loss are the round's."""
    _, history = tracked
    for h in history:
        own = h["client_metrics"]
        assert sorted(int(c) for c in own) == sorted(h["clients"])
        n = sum(o["test_examples"] for o in own.values())
        assert sum(o["local_accuracy"] * o["test_examples"] for o in own.values()) / n == pytest.approx(h["local_accuracy"], abs=1e-12)
        assert sum(o["train_loss"] for o in own.values()) / len(own) == pytest.approx(h["train_loss"], abs=1e-12)
        assert all(o["train_examples"] > 0 for o in own.values())


@needs_trackers
def test_mlflow_store_holds_settings_every_round_and_the_files(tracked):
    out, history = tracked
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "florana" and run.data.tags["seed"] == "0"
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["method"] == "florana" and run.data.params["rank"] == "4" and run.data.params["clients"] == "3"
    assert set(run.data.params) == set(config) - {"track", "mlflow_uri"}
    for key in ("global_accuracy", "local_accuracy", "local_global_gap", "divergence", "bound", "bytes_up", "bytes_down", "wall_seconds"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in logged] == [(h["round"], pytest.approx(h[key])) for h in history], key
    for h in history:  # each client's own scores under its own name
        for cid, own in h["client_metrics"].items():
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"client/{cid}/local_accuracy")}
            assert logged[h["round"]] == pytest.approx(own["local_accuracy"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.md", "config.json", "metrics.jsonl", "divergence_per_layer.json"} <= files
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "divergence_per_layer.json", str(out.parent))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert sorted({r["round"] for r in rows}) == [1, 2]
    assert {r["layer"]: r["divergence"] for r in rows if r["round"] == 2} == pytest.approx(history[-1]["divergence_per_layer"])


@needs_trackers
@pytest.mark.slow
def test_eval_of_a_tracked_run_logs_to_its_mlflow_run(small_csv, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--data", str(small_csv), "--method", "fedit", "--out", str(out), "--track", "mlflow"]) == 0
    assert main(["eval", str(out)]) == 0
    [entry] = json.loads((out / "eval.json").read_text())
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])  # the run's own, reopened
    logged = client.get_metric_history(run.info.run_id, "eval/global/global_accuracy")
    assert [(m.step, m.value) for m in logged] == [(2, pytest.approx(entry["results"]["global_accuracy"]))]
    assert "eval.json" in {f.path for f in client.list_artifacts(run.info.run_id)}


@needs_trackers
def test_tensorboard_events_hold_every_round(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, history = tracked
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    for key in ("global_accuracy", "local_accuracy", "divergence", "bound", "bytes_up"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(h["round"], pytest.approx(h[key], rel=1e-6)) for h in history], key
    assert "client/0/local_accuracy" in tags["scalars"]
    assert [e.step for e in events.Histograms("divergence_per_layer")] == [1, 2]
    last = events.Histograms("divergence_per_layer")[-1].histogram_value
    assert last.num == len(history[-1]["divergence_per_layer"]) and last.max == pytest.approx(max(history[-1]["divergence_per_layer"].values()))
    assert {"settings/text_summary", "summary.md/text_summary"} <= set(tags["tensors"])


@needs_trackers
def test_wandb_offline_run_holds_the_settings_and_every_round(tracked):
    out, history = tracked
    rows = wandb_history(out)
    assert [r["_step"] for r in rows] == [1, 2]
    for row, h in zip(rows, history):
        assert row["global_accuracy"] == pytest.approx(h["global_accuracy"]) and row["bytes_up"] == h["bytes_up"]
        assert row["divergence_per_layer/_type"] == "table-file"
    run = wandb_run(out)
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"] == "florana" and config["rank"] == 4 and config["clients"] == 3
    (files,) = (out / "wandb").glob("offline-run-*/files")
    assert (files / "summary.md").read_text() == (out / "summary.md").read_text()
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == run.run_id


def test_the_summary_is_a_rich_table_in_a_terminal(capsys, monkeypatch):
    import re
    import sys

    from fedlora.app.report import markdown_table
    from fedlora.cli.main import print_summary

    row = {"method": "florana", "global_accuracy": 0.41, "local_accuracy": 0.5, "gap": 0.09, "divergence": 0.0123, "mb_up": 0.03,
           "mb_down": 0.03, "wall_seconds": 12.0, "epsilon": 2.5}
    markdown = markdown_table([row], majority=0.4)
    print_summary(markdown)  # stdout not a terminal (a pipe, a file): the markdown as it is
    assert capsys.readouterr().out == markdown + "\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: no header wraps
    print_summary(markdown)
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "┃ method" in printed and re.search(r"┃ +ε ┃", printed) and "|---|" not in printed and "Majority-class rate" in printed
    assert re.search(r"│ florana +│ +0\.410 † │ +0\.500 │ +0\.090 │ +0\.0123 │", printed)


@needs_trackers
@pytest.mark.slow
def test_a_comparison_is_one_parent_run_with_a_child_per_method_and_seed(small_csv, tmp_path, one_thread):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit,florana", "--seeds", "0,1", "--rounds", "1",
                 "--out", str(out), "--track", "mlflow,wandb,tensorboard"]) == 0
    client = mlflow_client(out)
    runs = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["methods"] == "fedit,florana" and parent.data.params["seeds"] == "0,1"
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in children) == [("fedit", "0"), ("fedit", "1"), ("florana", "0"), ("florana", "1")]
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    assert {"comparison.md", "accuracy.png"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    for r in children:
        run_dir = out / r.data.tags["method"] / f"seed-{r.data.tags['seed']}"
        line = json.loads((run_dir / "metrics.jsonl").read_text())
        assert client.get_metric_history(r.info.run_id, "global_accuracy")[0].value == pytest.approx(line["global_accuracy"])
        assert (run_dir / "tensorboard").is_dir() and not (run_dir / "mlflow.db").exists()  # the comparison's store
        assert wandb_run(run_dir).run_group == "cmp"
    # the same comparison again, with a method added: the parent is reopened, finished runs are not logged twice
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit,florana,ffa", "--seeds", "0,1", "--rounds", "1",
                 "--out", str(out), "--track", "mlflow"]) == 0
    runs = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert len(runs) == 7 and sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 6


@needs_trackers
@pytest.mark.slow
def test_a_resumed_run_goes_on_in_the_same_mlflow_run_and_a_tracker_added_gets_every_round(small_csv, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--data", str(small_csv), "--out", str(out), "--track", "mlflow"]) == 0
    assert main(["run", "--resume", str(out), "--rounds", "2", "--track", "mlflow,tensorboard", "--quiet"]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global_accuracy")] == [1, 2]
    assert run.info.status == "FINISHED"
    events = EventAccumulator(str(out / "tensorboard")).Reload()  # added on resume: round 1 logged from the checkpoint's history
    assert [(e.step, e.value) for e in events.Scalars("global_accuracy")] == [(h["round"], pytest.approx(h["global_accuracy"])) for h in history]
    assert json.loads((out / "config.json").read_text())["track"] == "mlflow,tensorboard"


@pytest.mark.parametrize("args, message", [
    (["--track", "neptune"], "unknown tracker 'neptune' in --track; choose from tensorboard, mlflow, wandb"),
    (["--track", "mlflow,mlflow"], "--track names mlflow more than once"),
    (["--track", "mlflow", "--mlflow-uri", "mlruns"], "is not a tracking URI; pass sqlite:///"),
    (["--mlflow-uri", "sqlite:///x.db"], "mlflow is not in --track"),
])
def test_bad_tracker_settings_are_one_line_and_exit_2(small_csv, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    assert main(["run", *TINY, "--data", str(small_csv), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # refused before anything trained or was written


def test_a_tracker_without_its_package_names_the_extra(small_csv, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "x"
    assert main(["run", *TINY, "--data", str(small_csv), "--out", str(out), "--track", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "--track wandb needs the wandb package (not installed); install the trackers with `pip install 'fedlora[track]'`" in err
    assert err.count("\n") == 1 and not out.exists()
    assert main(["compare", *TINY, "--data", str(small_csv), "--methods", "fedit", "--out", str(out), "--track", "wandb"]) == 2
    assert "pip install 'fedlora[track]'" in capsys.readouterr().err and not out.exists()
    from conftest import tiny_config

    tiny_config(small_csv, track="wandb").validate()  # the settings themselves are fine: a Flower SuperNode, which logs
    # nothing, validates them too and needs no tracker package


def test_track_is_a_setting_of_toml_and_the_flower_run_config(tmp_path):
    from fedlora.app.config import RunConfig
    from fedlora.flower.config import from_flower, to_flower

    toml = tmp_path / "run.toml"
    toml.write_text('track = "tensorboard,wandb"\n[runtime]\nmlflow-uri = ""\n')
    assert RunConfig.from_toml(toml).track == "tensorboard,wandb"
    cfg = from_flower(to_flower(RunConfig()) | {"track": "mlflow", "mlflow-uri": "sqlite:////tmp/m.db"})
    assert (cfg.track, cfg.mlflow_uri) == ("mlflow", "sqlite:////tmp/m.db")
    with pytest.raises(ValueError, match="unknown tracker 'tb'"):
        from_flower(to_flower(RunConfig()) | {"track": "tb"}).validate()


@needs_trackers
@pytest.mark.slow
def test_the_flower_server_app_logs_its_rounds_too(small_csv, tmp_path, one_thread):
    """`track = "tensorboard"` in the Flower run config: the ServerApp's run directory gets the same event files."""
    pytest.importorskip("flwr")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_config
    from fedlora.flower.config import from_flower, to_flower
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation

    cfg = tiny_config(small_csv, local_steps=1, method="fedit")
    flower_cfg = from_flower(to_flower(cfg) | {"track": "tensorboard", "out": str(tmp_path / "flower")})
    history = run_federation(InlineGrid(cfg), flower_cfg)
    events = EventAccumulator(str(tmp_path / "flower" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("global_accuracy")] == [(h["round"], pytest.approx(h["global_accuracy"])) for h in history]


@needs_trackers
@pytest.mark.slow
def test_a_study_run_again_with_track_logs_its_finished_runs_under_one_parent(small_csv, tmp_path, capsys, one_thread):
    runs = tmp_path / "runs"
    base = ["study", "--preset", "quick", "--data", str(small_csv), "--methods", "fedit", "--parts", "comparison",
            "--seeds", "1", "--runs", str(runs), "--quiet"]
    assert main(base) == 0
    made = sorted(p.parent for p in runs.glob("**/metrics.jsonl"))
    stamps = [(p / "metrics.jsonl").stat().st_mtime_ns for p in made]
    assert main([*base, "--track", "mlflow"]) == 0  # the same settings: nothing retrains, every run is logged once
    assert [(p / "metrics.jsonl").stat().st_mtime_ns for p in made] == stamps
    client = mlflow_client(runs)
    logged = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    (parent,) = [r for r in logged if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["kind"] == "study" and "results.md" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    children = {r.info.run_name: r for r in logged if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(p.relative_to(runs).as_posix() for p in made)
    for p in made:
        history = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
        steps = client.get_metric_history(children[p.relative_to(runs).as_posix()].info.run_id, "global_accuracy")
        assert [(m.step, m.value) for m in steps] == [(h["round"], pytest.approx(h["global_accuracy"])) for h in history]
    assert main([*base, "--track", "mlflow"]) == 0  # and again: nothing logged twice
    assert len(client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])) == len(logged)
