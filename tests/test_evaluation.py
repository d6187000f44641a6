"""Evaluation as lm-evaluation-harness does it: log-likelihoods against a plain one-request-at-a-time loop, acc and
acc_norm by hand, is_greedy by hand, lm-eval itself where installed, MMLU's prompt, aggregation, the cached base row."""

import copy
import json

import pytest
import torch

from fedlora.federation import evaluation as E
from fedlora.federation.evaluation import Evaluation
from fedlora.generation.rules import choice_letter, judge, squad_normalise

pytestmark = pytest.mark.usefixtures("one_thread")

# Mixed lengths, shared contexts, a context with trailing whitespace, an empty context, multi-token continuations.
REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Lyon, a city on the Rhône"),
    ("Question: 2+2?\nAnswer: ", "4"),
    ("Hi", " there my friend, how are you today?"),
    ("", "hello world"),
    ("A much longer context, with several clauses, to force padding in the batch: one, two, three.", " four"),
    ("The capital of France is", " Paris"),  # a duplicate: computed once, returned twice
]


@pytest.fixture(scope="module")
def lm():
    from fedlora.app.models import load_causal_lm

    model, tokenizer = load_causal_lm("tiny:llama", seed=0)
    return model.eval(), tokenizer


def by_hand(model, tokenizer, context, continuation):
    """One request, one unpadded forward: log_softmax at the positions before each continuation token."""
    ctx, cont = E.encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total, greedy = 0.0, True
    for j, token in enumerate(cont):
        row = logp[len(ctx) + j - 1]
        total += float(row[token])
        greedy &= int(row.argmax()) == token
    return total, greedy


# ---- (a) log-likelihoods ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_equal_a_plain_loop(lm, batch_size):
    model, tokenizer = lm
    got = E.loglikelihoods(model, tokenizer, REQUESTS, batch_size=batch_size)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        want_ll, want_greedy = by_hand(model, tokenizer, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-5), (ctx, cont)
        assert greedy == want_greedy
    assert got[0] == got[-1]


def test_encode_pair_moves_the_contexts_trailing_space_onto_the_continuation(lm):
    _, tokenizer = lm
    ctx, cont = E.encode_pair(tokenizer, "Answer: ", "4")
    assert tokenizer.decode(ctx) == "Answer:" and tokenizer.decode(cont) == " 4"
    assert ctx + cont == tokenizer.encode("Answer: 4")
    # An empty context is the prefix token (BOS, else EOS).
    ctx, cont = E.encode_pair(tokenizer, "", "hello world")
    assert ctx == [E.prefix_token_id(tokenizer)] and cont == tokenizer.encode("hello world", add_special_tokens=False)


def test_one_forward_row_per_context_for_one_token_choices_and_a_cache_across_calls(lm):
    """MMLU's four choices " A".." D" are one-token continuations of one context: one model row per question, all
    questions in one batch; a second call with the same cache runs no forward at all."""
    model, tokenizer = lm
    items = [dict(question=f"What is {i}+{i}?", subject="math", choices=["1", "2", "3", "4"], answer=i) for i in range(3)]
    evaluation = E.mmlu_evaluation(items)
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        cache: dict = {}
        first = E.evaluate(model, tokenizer, evaluation, batch_size=16, cache=cache)
        assert rows == [3]
        assert E.evaluate(model, tokenizer, evaluation, batch_size=16, cache=cache) == first and rows == [3]
        E.evaluate(model, tokenizer, evaluation, batch_size=2)  # a fresh cache: two batches (2 + 1 questions)
        assert rows == [3, 2, 1]
    finally:
        handle.remove()


def test_a_continuation_longer_than_the_model_takes_is_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="at most the model's 4"):
        E.loglikelihoods(model, tokenizer, [("Hi", " there my friend, how are you")], max_length=4)


def test_a_long_context_is_cut_from_the_left_as_lm_eval_does(lm):
    model, tokenizer = lm
    context, continuation = "one two three four five six seven eight nine ten", " eleven"
    ctx, cont = E.encode_pair(tokenizer, context, continuation)
    limit = len(cont) + 3
    ids = torch.tensor([(ctx + cont)[-(limit + 1):]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    want = sum(float(logp[ids.shape[1] - len(cont) - 1 + j, t]) for j, t in enumerate(cont))
    [(got, _)] = E.loglikelihoods(model, tokenizer, [(context, continuation)], max_length=limit)
    assert got == pytest.approx(want, abs=1e-5)


# ---- (b) acc and acc_norm -----------------------------------------------------------------------------------------

def test_acc_and_acc_norm_by_hand():
    # acc: argmax(-4, -9) = 0; acc_norm: argmax(-4/2, -9/10) = argmax(-2, -0.9) = 1.
    assert E.choice_metrics([-4.0, -9.0], ["ab", "abcdefghij"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert E.choice_metrics([-4.0, -9.0], ["ab", "abcdefghij"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    # Length in characters (lm-eval's completion_len), not bytes and not tokens: "é" is one character, two bytes.
    assert E.choice_metrics([-3.0, -4.0], ["éé", "abc"], gold=1)["acc_norm"] == 1.0  # -1.5 < -1.33 in characters
    # Ties go to the first choice, as np.argmax.
    assert E.choice_metrics([-1.0, -1.0], ["a", "b"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}


def test_mode_share_is_the_share_of_the_most_often_chosen_position():
    # picks: 0, 0, 2, 0 (the tie in the last item goes to the first choice) -> 3 of 4 pick position 0
    lls = [[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0], [-3.0, -2.0, -1.0], [-1.0, -1.0, -2.0]]
    assert E.mode_share("mmlu", lls) == {"mmlu/mode_share": 0.75}
    assert E.mode_share("mmlu", []) == {}


def test_evaluate_multiple_choice_matches_hand_computed_acc_and_acc_norm(lm):
    """Choices of very different lengths, so that acc and acc_norm pick differently on some items."""
    model, tokenizer = lm
    items = [
        {"context": "Pick one:", "choices": ["A", "a very long answer that goes on and on for many words"], "gold": 1},
        {"context": "Which is it?", "choices": ["yes it certainly is the one described above", "no"], "gold": 0},
        {"context": "Colour of the sky?", "choices": ["blue", "green", "a deep and fairly unusual shade of grey"], "gold": 2},
    ]
    evaluation = Evaluation("toy", items)
    acc, acc_norm, picks = [], [], []
    for item in items:
        lls = [by_hand(model, tokenizer, item["context"], " " + c)[0] for c in item["choices"]]
        picks.append(max(range(len(lls)), key=lls.__getitem__))
        acc.append(picks[-1] == item["gold"])
        acc_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i])) == item["gold"])
    assert acc != acc_norm, "the case must tell acc from acc_norm"
    got = E.evaluate(model, tokenizer, evaluation, batch_size=4)
    assert got == {"toy/acc": pytest.approx(sum(acc) / 3), "toy/acc_norm": pytest.approx(sum(acc_norm) / 3), "toy/n": 3.0,
                   "toy/mode_share": pytest.approx(max(map(picks.count, picks)) / 3)}


# ---- (c) is_greedy, and generation ------------------------------------------------------------------------------

def greedy_by_hand(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(lm):
    """A continuation made of the model's own argmax tokens is greedy; changing its last token makes it not."""
    model, tokenizer = lm
    found = 0
    for context in ["The capital of France is", "Once upon a time", "Question: what is 3+4?\nAnswer:", "def f(x):"]:
        ctx = E.tok_encode(tokenizer, context)
        tokens = greedy_by_hand(model, ctx, 3)
        text = tokenizer.decode(tokens)
        if E.encode_pair(tokenizer, context, text) != (ctx, tokens):
            continue  # the greedy tokens do not survive a decode/encode round trip; try another context
        found += 1
        other = tokens[:-1] + [(tokens[-1] + 1) % len(tokenizer)]
        other_text = tokenizer.decode(other)
        (_, greedy), (_, not_greedy) = E.loglikelihoods(model, tokenizer, [(context, text), (context, other_text)])
        assert greedy and not not_greedy
        assert by_hand(model, tokenizer, context, text)[1] and not by_hand(model, tokenizer, context, other_text)[1]
        # generations() is greedy decoding too: its text is that continuation.
        assert E.generations(model, tokenizer, [context], max_new_tokens=3) == [text]
    assert found >= 2, "too few contexts whose greedy tokens round-trip through the tokenizer"


def test_generations_batch_left_padded_prompts_like_one_at_a_time(lm):
    model, tokenizer = lm
    prompts = ["Hello", "Question: what is the capital of France?\nAnswer:", "One two three", "Hello"]
    want = [tokenizer.decode(greedy_by_hand(model, E.tok_encode(tokenizer, p), 4), skip_special_tokens=True) for p in prompts]
    assert E.generations(model, tokenizer, prompts, max_new_tokens=4, batch_size=3) == want


def test_stop_strings_cut_the_generation():
    assert E.cut_at_stops("42\nQuestion: next", ("Question:", "\n")) == "42"
    assert E.cut_at_stops("no stop here", ("\n",)) == "no stop here"
    assert E.cut_at_stops("\nleading", ("\n",)) == ""  # as lm-eval's until: a leading stop leaves nothing


def test_answer_rules():
    assert squad_normalise("The Eiffel  Tower!") == "eiffel tower"
    assert judge("exact", "the Eiffel tower.", ["Big Ben", "eiffel tower"])
    assert not judge("exact", "Eiffel tower in Paris", ["eiffel tower"])
    # Evals' own rules: Includes is a plain substring (case-sensitive unless includes_nocase), Match a prefix
    assert judge("includes", "It is Paris, France.", ["Paris"]) and not judge("includes", "It is Paris.", ["paris"])
    assert judge("includes_nocase", "It is Paris.", ["paris"]) and judge("prefix", " B) yes", ["B"]) and not judge("prefix", "(B)", ["B"])
    assert judge("number", "so she pays $1,000.00 in total", ["Natalia sold 48... #### 1000"])
    assert not judge("number", "no number", ["3"])
    assert [choice_letter(t) for t in ["B", "(c)", "D. Paris", "the answer is (A).", "A dog runs", "none"]] == ["B", "C", "D", "A", None, None]
    assert judge("choice", "(B) because", ["(B)"]) and not judge("choice", "A", ["B"])
    with pytest.raises(ValueError, match="unknown answer rule"):
        judge("bleu", "a", ["a"])


def test_generate_evaluation_scores_by_each_items_rule(lm, monkeypatch):
    model, tokenizer = lm
    train = [{"question": "1+1?", "answer": "One and one.\n#### 2"}]
    test = [{"question": "2+3?", "answer": "#### 5"}, {"question": "10*10?", "answer": "#### 100"}, {"question": "0?", "answer": "#### 0"}]
    evaluation = E.gsm8k_evaluation(test, train, fewshot=1)
    seen = {}

    def fake(model, tokenizer, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        return ["It is 5.", "100 or maybe 99", "zero"]

    monkeypatch.setattr(E, "generations", fake)
    assert E.evaluate(model, tokenizer, evaluation) == {"gsm8k/exact": pytest.approx(1 / 3), "gsm8k/n": 3.0}
    assert seen["prompts"][0] == "Question: 1+1?\nAnswer: One and one.\n#### 2\n\nQuestion: 2+3?\nAnswer:"
    assert seen["stop"] == ("Question:", "</s>", "<|im_end|>") and seen["max_new_tokens"] == 256


# ---- (d) against lm-evaluation-harness itself ---------------------------------------------------------------------

def test_loglikelihoods_equal_lm_evals_hflm(lm):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = lm
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    want = harness.loglikelihood(instances, disable_tqdm=True)
    got = E.loglikelihoods(model, tokenizer, REQUESTS, batch_size=2)
    for (ll, greedy), (want_ll, want_greedy) in zip(got, want):
        assert ll == pytest.approx(want_ll, abs=1e-5) and greedy == want_greedy


MMLU_TEMPLATE = dict(
    output_type="multiple_choice", test_split="test", fewshot_split="dev", fewshot_config={"sampler": "first_n"},
    doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
)  # lm_eval/tasks/mmlu/default/_default_template_yaml, with acc_norm added


def lm_eval_task(tmp_path, splits: dict, **config):
    from lm_eval.api.task import ConfigurableTask

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    kwargs = {"data_files": files, "cache_dir": str(tmp_path / "cache")}
    return ConfigurableTask(config=dict(task="local", dataset_path="json", dataset_kwargs=kwargs, **config))


def test_mmlu_contexts_requests_and_metrics_equal_lm_evals_task(lm, tmp_path):
    """lm-eval's own ``mmlu`` template on local files: the 0- and 2-shot contexts, the requests and acc/acc_norm."""
    pytest.importorskip("lm_eval")
    model, tokenizer = lm
    dev = [dict(question=f" Dev {i}? ", subject="college_biology", choices=[f"d{i}", "e", "f", "g"], answer=i) for i in range(3)]
    test = [dict(question=f"Test {i}?", subject="college_biology", choices=["w", f"x{i}", "y", "z"], answer=(i + 1) % 4) for i in range(3)]
    description = "The following are multiple choice questions (with answers) about college biology.\n\n"
    task = lm_eval_task(tmp_path, {"test": test, "dev": dev}, description=description, **MMLU_TEMPLATE)
    docs = list(task.test_docs())
    for shots in (0, 2):
        ours = E.mmlu_evaluation(test, dev, fewshot=shots)
        theirs = [task.fewshot_context(doc, num_fewshot=shots) for doc in docs]
        assert E.contexts(ours) == theirs
        requests = [r.arguments for doc, ctx in zip(docs, theirs) for r in task.construct_requests(doc, ctx)]
        assert requests == [(ctx, " " + c) for ctx in theirs for c in "ABCD"]
        lls = E.loglikelihoods(model, tokenizer, requests)
        per_doc = [task.process_results(doc, lls[4 * i: 4 * i + 4]) for i, doc in enumerate(docs)]
        got = E.evaluate(model, tokenizer, ours)
        for metric in ("acc", "acc_norm"):
            assert got[f"{ours.name}/{metric}"] == pytest.approx(sum(r[metric] for r in per_doc) / len(docs))


def test_acc_norm_equals_lm_evals_process_results_on_choices_of_different_lengths(tmp_path):
    pytest.importorskip("lm_eval")
    docs = [{"q": "x", "choices": ["a", "bbbbbbbbbb", "cccc"], "gold": g} for g in range(3)]
    task = lm_eval_task(tmp_path, {"test": docs}, output_type="multiple_choice", test_split="test", doc_to_text="{{q}}",
                        doc_to_choice="{{choices}}", doc_to_target="gold", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    generator = torch.Generator().manual_seed(0)
    for doc in task.test_docs():
        for _ in range(20):
            lls = (-20 * torch.rand(3, generator=generator)).tolist()
            want = task.process_results(doc, [(x, False) for x in lls])
            assert E.choice_metrics(lls, doc["choices"], doc["gold"]) == {"acc": want["acc"], "acc_norm": want["acc_norm"]}


# ---- (e) MMLU's prompt --------------------------------------------------------------------------------------------

MMLU_DEV = [
    dict(question="What is 1+1?", subject="elementary_mathematics", choices=["1", "2", "3", "4"], answer=1),
    dict(question="Which organ pumps blood?", subject="anatomy", choices=["Liver", "Heart", "Lung", "Skin"], answer="B"),
    dict(question="What is 2*3?", subject="elementary_mathematics", choices=["5", "6", "7", "8"], answer=1),
]
MMLU_TEST = [
    dict(question="  What is 3+4? ", subject="elementary_mathematics", choices=["6", "7", "8", "9"], answer=1),
    dict(question="Where is the femur?", subject="anatomy", choices=["Arm", "Leg", "Head", "Chest"], answer=1),
    dict(question="What is 9-3?", subject="elementary_mathematics", choices=["6", "5", "4", "3"], answer=0),
    dict(question="What is 2+2?", subject="elementary_mathematics", choices=["3", "4", "5", "6"], answer=1),
]


def test_mmlu_prompt_zero_and_few_shot():
    zero = E.contexts(E.mmlu_evaluation(MMLU_TEST))[0]
    assert zero == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 3+4?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    )
    two = E.mmlu_evaluation(MMLU_TEST[:1], MMLU_DEV, fewshot=2)
    assert two.name == "mmlu_2shot" and two.items[0]["choices"] == ["A", "B", "C", "D"] and two.items[0]["gold"] == 1
    assert E.contexts(two)[0] == (  # the anatomy exemplar is skipped: exemplars come from the item's own subject
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2*3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: B\n\n"
        "What is 3+4?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    )
    with pytest.raises(ValueError, match="1 exemplars for an item of subject 'anatomy', 2 asked"):
        E.contexts(E.mmlu_evaluation(MMLU_TEST[1:2], MMLU_DEV, fewshot=2))


def test_chat_rendering_matches_instruction_tuning(lm):
    """With ``chat=True`` a prompt is tokenised exactly as fedlora's causal-LM training renders it."""
    from fedlora.federation.causal_lm import render

    _, tokenizer = lm
    for tok in (tokenizer, _without_template(tokenizer)):
        prompt = "Sentiment of: what a day"
        evaluation = Evaluation("t", [{"prompt": prompt, "references": ["positive"]}], "generate", chat=True)
        assert E.tok_encode(tok, E.contexts(evaluation, tok)[0]) == render(tok, prompt, "positive", 512)[0]


def _without_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


# ---- (f) aggregation by subject and overall -----------------------------------------------------------------------

def test_overall_is_the_mean_over_questions_and_each_subject_its_own_mean(lm, monkeypatch):
    """3 mathematics questions (2 right) and 1 anatomy question (wrong): overall 2/4 (lm-eval's size-weighted mean),
    not the mean of subject means (1/3); the keys are exactly these."""
    model, tokenizer = lm
    evaluation = E.mmlu_evaluation(MMLU_TEST)
    picks = {0: 1, 1: 0, 2: 0, 3: 3}  # item → the choice given the highest log-likelihood (gold: 1, 1, 0, 1)

    def fake(model, tokenizer, requests, **kw):
        return [(0.0 if i % 4 == picks[i // 4] else -1.0, False) for i in range(len(requests))]

    monkeypatch.setattr(E, "loglikelihoods", fake)
    got = E.evaluate(model, tokenizer, evaluation)
    assert got == {
        "mmlu/acc": 0.5, "mmlu/acc_norm": 0.5, "mmlu/n": 4.0, "mmlu/mode_share": 0.5,  # picks 1, 0, 0, 3: position 0 twice
        "mmlu/anatomy/acc": 0.0, "mmlu/anatomy/acc_norm": 0.0,
        "mmlu/elementary_mathematics/acc": pytest.approx(2 / 3), "mmlu/elementary_mathematics/acc_norm": pytest.approx(2 / 3),
    }


def test_evaluate_all_joins_keys_and_refuses_duplicate_names(lm):
    model, tokenizer = lm
    a = Evaluation("a", [{"context": "x", "choices": ["y", "z"], "gold": 0}])
    b = Evaluation("b", [{"context": "x", "choices": ["y", "zz"], "gold": 1}])
    got = E.evaluate_all(model, tokenizer, [a, b])
    assert set(got) == {"a/acc", "a/acc_norm", "a/n", "a/mode_share", "b/acc", "b/acc_norm", "b/n", "b/mode_share"}
    with pytest.raises(ValueError, match="unique"):
        E.evaluate_all(model, tokenizer, [a, a])
    assert E.evaluate(model, tokenizer, Evaluation("empty", [])) == {"empty/acc": pytest.approx(float("nan"), nan_ok=True),
                                                                    "empty/acc_norm": pytest.approx(float("nan"), nan_ok=True), "empty/n": 0.0}


@pytest.mark.parametrize("kwargs,message", [
    (dict(items=[{"context": "x", "choices": ["a"], "gold": 1}]), "'gold' must be the index"),
    (dict(items=[{"context": "x", "choices": ["a", ""], "gold": 0}]), "non-empty 'choices'"),
    (dict(items=[{"prompt": "x", "references": "y"}], kind="generate"), "non-empty list of 'references'"),
    (dict(items=[], kind="rank"), "unknown kind"),
    (dict(items=[], fewshot=2), "needs that many exemplars"),
])
def test_bad_evaluations_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Evaluation("bad", **kwargs)


# ---- (g) the base model's reference row ---------------------------------------------------------------------------

def test_base_row_is_the_adapter_free_model_computed_once_per_settings(lm, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = lm
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)  # an adapter that changes the outputs
    items = [{"context": f"Question {i}: which?", "choices": ["a", "bb", "a longer choice here"], "gold": i % 3} for i in range(6)]
    evaluations = [Evaluation("toy", items)]
    ll_base = E.loglikelihoods(model, tokenizer, [("Question 0: which?", " a")])
    ll_adapted = E.loglikelihoods(peft_model, tokenizer, [("Question 0: which?", " a")])
    assert abs(ll_base[0][0] - ll_adapted[0][0]) > 1e-3, "the adapter must change the outputs for the test to mean anything"
    want = E.evaluate_all(model, tokenizer, evaluations)

    calls = []
    real = E.evaluate_all
    monkeypatch.setattr(E, "evaluate_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    monkeypatch.setattr(E, "loglikelihoods", lambda m, *a, **k: seen.append(_lora_on(m)) or _real_ll(m, *a, **k))
    key = {"model": "tiny:llama", "seed": 0}
    first = E.base_scores(peft_model, tokenizer, evaluations, cache_dir=tmp_path, key=key)
    assert first == want  # the base model's scores, not the adapted one's
    assert seen == [False] and _lora_on(peft_model)  # the adapter was off while scoring, and is back on after
    second = E.base_scores(peft_model, tokenizer, evaluations, cache_dir=tmp_path, key=dict(key))
    assert second == first and len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    E.base_scores(peft_model, tokenizer, evaluations, cache_dir=tmp_path, key=key | {"seed": 1})  # other settings
    E.base_scores(peft_model, tokenizer, [Evaluation("toy", items[:3])], cache_dir=tmp_path, key=key)  # other items
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3


_real_ll = E.loglikelihoods


def _lora_on(model) -> bool:
    return any(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_B"))
