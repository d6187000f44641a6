import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """A 3-class, 600-row slice of the offline tweet corpus as a local CSV (fast to load and partition)."""
    from fedlora.data import load_labelled_text

    data = load_labelled_text("tweets", seed=0)
    ds = data.dataset.shuffle(seed=0)
    per_label = {i: 0 for i in range(len(data.label_names))}
    path = tmp_path_factory.mktemp("data") / "tweets_small.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for row in ds:
            if per_label[row["label"]] < 200:
                per_label[row["label"]] += 1
                w.writerow([row["text"], data.label_names[row["label"]]])
            if all(v >= 200 for v in per_label.values()):
                break
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread here (and in Flower's processes): a shared CI machine's OpenMP contention otherwise
    makes the tiny model's steps 10-30× slower. The numbers compared do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(small_csv, **overrides):
    from fedlora.app.experiment import RunConfig

    base = dict(
        model="tiny:bert", data=str(small_csv), clients=3, rounds=2, local_steps=2, batch_size=8, rank=4,
        examples_per_client=40, test_examples=60, max_length=32, partition="iid", seed=0, lr=5e-3, device="cpu",
    )
    return RunConfig(**(base | overrides))


@pytest.fixture(scope="module")
def instructions_jsonl(small_csv, tmp_path_factory):
    """60 tweets as prompt/response records (label word as the answer), with the label for partitioning."""
    import json

    import pandas as pd

    frame = pd.read_csv(small_csv).groupby("label").head(20)
    path = tmp_path_factory.mktemp("instr") / "tweets.jsonl"
    with open(path, "w") as f:
        for text, label in zip(frame["text"], frame["label"]):
            f.write(json.dumps({"prompt": f"Sentiment of: {text[:80]}", "response": label, "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def tasks_jsonl(tmp_path_factory):
    """Three small tasks with their own answer rules and a second attribute (``kind``)."""
    rows = []
    for a in range(1, 10):
        for b in range(1, 4):
            rows.append({"prompt": f"What is {a} plus {b}?", "response": str(a + b), "task": "add", "rule": "prefix", "kind": "maths"})
            rows.append({"prompt": f"Is {a} larger than {b}? Answer yes or no.", "response": "yes" if a > b else "no", "task": "compare",
                         "rule": "exact", "kind": "maths"})
            rows.append({"prompt": f"Repeat {a}{b}{a} exactly.", "response": f"{a}{b}{a}", "task": "repeat", "rule": "exact", "kind": "text"})
    path = tmp_path_factory.mktemp("instruct") / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def instruct_config(data, **overrides):
    """A tiny --task instruct run on ``data`` (e.g. :func:`tasks_jsonl`): three clients, one task each, one round."""
    from fedlora.app.config import RunConfig

    base = dict(task="instruct", model="tiny:llama", data=str(data), clients=3, partition="one", rounds=1, local_steps=1, batch_size=4,
                rank=4, examples_per_client=12, test_examples=9, max_length=48, max_new_tokens=3, seed=0, lr=5e-3, device="cpu")
    return RunConfig(**(base | overrides))


def flower_resume_and_export(cfg, tmp_path, keys) -> None:
    """A classification run ``cfg`` three ways: the Flower in-process round equals the simulator's history; a run
    resumed from a round-1 checkpoint ends with the same ``keys``; the exported model reproduces the global accuracy."""
    from fedlora.app.experiment import build, run_experiment
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    reference = build(cfg).simulator.run()
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, reference)

    resume_matches(cfg, tmp_path, keys, reference)

    out = tmp_path / "run"
    exp, history = run_experiment(cfg.replace(rounds=2, out=str(out)))
    model, _, _ = load_global_model(out)
    acc = ClassificationTask().evaluate(model, exp.simulator.global_test)
    assert acc == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)


def resumed_from(cfg, path, after: int = 1):
    """(first, resumed): a simulator of ``cfg`` run for ``after`` rounds and checkpointed into ``path`` (through the
    file: safetensors), and a fresh one restored from that checkpoint."""
    from fedlora.app.experiment import build, load_checkpoint, save_checkpoint

    first = build(cfg).simulator
    for rnd in range(1, after + 1):
        first.round(rnd)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(first, path)
    resumed = build(cfg).simulator
    resumed.restore(*load_checkpoint(path))
    return first, resumed


def resume_matches(cfg, tmp_path, keys, reference: list[dict], after: int = 1, restored=None):
    """A run of ``cfg`` resumed from its round-``after`` checkpoint ends with the uninterrupted run's ``keys``
    (``reference``). ``restored(first, resumed)``: checks of the restored state before the resumed run goes on."""
    first, resumed = resumed_from(cfg, tmp_path / "ckpt", after)
    if restored is not None:
        restored(first, resumed)
    for a, b in zip(resumed.run(), reference):
        for key in keys:
            assert a[key] == b[key], (a["round"], key)


@pytest.fixture(autouse=True)
def _aggregation_batch_mode():
    """``FEDLORA_TEST_BATCH_MODE=on`` (or ``off``) runs every test with the aggregation rules forced batched (or per
    client), e.g. the aggregation suite on a CPU with the code an accelerator runs (on CUDA it runs by default)."""
    mode = os.environ.get("FEDLORA_TEST_BATCH_MODE")
    if not mode:
        yield
        return
    from fedlora.aggregation._batch import batch_mode

    with batch_mode(mode):
        yield


# The CLI arguments of a tiny one-round run (the bad-input tests add the flag under test to them).
TINY_CLI = ["--model", "tiny:bert", "--clients", "3", "--rounds", "1", "--examples-per-client", "24", "--test-examples", "60",
            "--max-length", "32", "--local-steps", "2", "--batch-size", "4", "--quiet"]


def refused(capsys, argv, code: int = 2, *, last_line: bool = False) -> str:
    """``fedlora argv`` exits with ``code`` and one line on stderr, ``fedlora: error: …`` with no traceback (the last
    line only with ``last_line``: where a warning may come before it); returns that line."""
    from fedlora.cli.main import main

    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    if last_line:
        err = err.splitlines()[-1]
    assert err.startswith("fedlora: error:") and "\n" not in err and "Traceback" not in err, err
    return err
