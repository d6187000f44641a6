"""Evaluation of a causal LM as lm-evaluation-harness (lm-eval, EleutherAI) does it, so our numbers compare with theirs.

Two request types, batched and cached by the functions here, never by an evaluation:

- :func:`loglikelihoods`: the sum of log p(continuation | context) and whether the continuation is the greedy one,
  tokenised and computed as lm-eval's ``HFLM.loglikelihood`` (``lm_eval/api/model.py`` ``_encode_pair``,
  ``lm_eval/models/huggingface.py`` ``_loglikelihood_tokens``). Multiple choice scores each choice this way:
  ``acc`` (argmax of the sums is the gold) and ``acc_norm`` (argmax of sum / len(choice) in characters),
  as ``ConfigurableTask.process_results`` defines them.
- :func:`generations`: greedy continuations cut at the first stop string (lm-eval's ``generate_until``), scored by
  an answer rule of :mod:`fedlora.generation.rules` (``exact``, ``includes``, ``number``, ``choice``).

An :class:`Evaluation` is data (the items, their kind, few-shot exemplars, a description, stop strings), like an
lm-eval task YAML; :func:`evaluate` turns one into stable metric keys (``<name>/acc``, ``<name>/<subject>/acc``,
``<name>/exact``) for metrics.jsonl, so a run loop needs no benchmark by name. :func:`mmlu_evaluation` and
:func:`gsm8k_evaluation` build lm-eval's ``mmlu`` and ``gsm8k`` prompts from records. :func:`base_scores` is the
base model's reference row, computed once per run settings and cached on disk.

Federation layer: imports only :mod:`fedlora.generation` (and torch); never data loading, the app or front ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlora.generation.answers import gsm8k_reference
from fedlora.generation.rules import RULES, judge

KINDS = ("multiple_choice", "generate")
Request = tuple[str, str]


# ---- tokenisation, as lm-eval's HFLM -----------------------------------------------------------------------------

def prefix_token_id(tokenizer) -> int:
    """The token an empty context stands for: BOS, else EOS (lm-eval ``HFLM.prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, text: str) -> list[int]:
    """The tokenizer's own special tokens, unless ``text`` already starts with the BOS text (lm-eval
    ``HFLM.tok_encode`` with ``add_bos_token`` unset)."""
    prefix = prefix_token_id(tokenizer)
    special = not (prefix is not None and text.startswith(tokenizer.decode(prefix)))
    return list(tokenizer.encode(text, add_special_tokens=special))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``LM._encode_pair`` for causal models: the context's trailing
    whitespace moves onto the continuation, ``context + continuation`` is encoded whole and split at the length of
    the context's own encoding, so the boundary tokenises as in running text. An empty context becomes the prefix
    token (``LM.loglikelihood``)."""
    if not context:
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model: nn.Module, tokenizer=None) -> int:
    """The longest input the model takes (lm-eval ``resolve_max_length``: model config, then tokenizer, else 2048)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else 2048


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ---- log-likelihood requests --------------------------------------------------------------------------------------

def _logits(model: nn.Module, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
    """Logits at the last ``keep`` positions (``logits_to_keep``: with a 49k vocabulary and few-shot contexts the full
    [batch × length × vocabulary] tensor is most of the memory); all positions where the model lacks the option."""
    try:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    except TypeError:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _score_tokens(model: nn.Module, encoded: list[tuple[list[int], list[int]]], *, batch_size: int,
                  device: torch.device | str, max_length: int, pad_id: int) -> list[tuple[float, bool]]:
    """lm-eval's ``_loglikelihood_tokens``: the model reads ``(context + continuation)[-(max_length+1):][:-1]``
    right-padded; the log-softmax at the continuation's positions is gathered at its tokens. Requests whose
    inputs are equal (the choices " A".." D" of one question: one-token continuations of one context) share one
    row, as lm-eval's ``group_by="contexts"``; rows run longest first, ``batch_size`` at a time."""
    shared: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (ctx, cont) in enumerate(encoded):
        if not cont or len(cont) > max_length:
            raise ValueError(f"a continuation encodes to {len(cont)} tokens; each must be non-empty and at most the "
                             f"model's {max_length} (check the evaluation's choices/continuations)")
        inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
        shared.setdefault(inp, []).append((index, cont))
    rows = sorted(shared, key=lambda x: (-len(x), x))
    out: list[tuple[float, bool]] = [(math.nan, False)] * len(encoded)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, inp in enumerate(chunk):
            ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
        first = min(len(inp) - max(len(c) for _, c in shared[inp]) for inp in chunk)
        logits = _logits(model, ids.to(device), mask.to(device), width - first)
        offset = width - logits.shape[1]
        for r, inp in enumerate(chunk):
            for index, cont in shared[inp]:
                lo = len(inp) - len(cont) - offset
                logp = logits[r, lo: lo + len(cont)].float().log_softmax(-1)
                target = torch.tensor(cont, device=logp.device)
                out[index] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    return out


def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[Request], *, batch_size: int = 16,
                   device: torch.device | str = "cpu", max_length: int | None = None,
                   cache: dict[Request, tuple[float, bool]] | None = None) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)``: (sum of the continuation tokens' log-probabilities given the context,
    whether greedy decoding would produce exactly the continuation), as lm-eval's ``HFLM.loglikelihood``.

    Each distinct request is computed once per call; ``cache`` (one dict kept by the caller while the model's weights
    do not change, e.g. across the evaluations of one round) carries results over between calls.
    """
    cache = {} if cache is None else cache
    todo = list(dict.fromkeys(r for r in map(tuple, requests) if r not in cache))
    if todo:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in todo]
        with _eval_mode(model):
            scores = _score_tokens(model, encoded, batch_size=batch_size, device=device, pad_id=pad,
                                   max_length=max_length or model_max_length(model, tokenizer))
        cache.update(zip(todo, scores))
    return [cache[tuple(r)] for r in requests]


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one multiple-choice item as lm-eval's ``process_results`` (output type
    ``multiple_choice``): acc = 1 if argmax(lls) is the gold; acc_norm = 1 if argmax(lls / len(choice)) is, with
    len the choice's length in characters, without the target delimiter (lm-eval ≥ 0.4: ``completion_len``)."""
    pred = max(range(len(lls)), key=lambda i: lls[i])  # first maximum, as np.argmax
    pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def mode_share(name: str, lls: Sequence[Sequence[float]]) -> dict[str, float]:
    """``<name>/mode_share``: the share of items whose chosen position (the ``acc`` choice) is the most often chosen
    one. 1.0 is a model that always picks the same position ("A" throughout), whatever its accuracy; compare the
    score with the constant-answer floor then. Empty for no items."""
    if not lls:
        return {}
    picks = [max(range(len(ll)), key=lambda i: ll[i]) for ll in lls]
    return {f"{name}/mode_share": max(picks.count(p) for p in set(picks)) / len(picks)}


# ---- generation requests ------------------------------------------------------------------------------------------

def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} - {None}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return sorted(ids)


def cut_at_stops(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop string in turn (lm-eval ``generate_until``'s ``until``)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def generations(model: nn.Module, tokenizer, prompts: Sequence[str], *, stop: Sequence[str] = (), max_new_tokens: int = 64,
                batch_size: int = 16, device: torch.device | str = "cpu", cache: dict | None = None) -> list[str]:
    """Greedy continuations of ``prompts``, ended by EOS or a stop string (and cut there), at most ``max_new_tokens``.
    Prompts are left-padded in batches of similar length; each distinct prompt is generated once (``cache`` as in
    :func:`loglikelihoods`, keyed by prompt, stop strings and budget)."""
    from transformers import GenerationConfig

    cache = {} if cache is None else cache
    keys = [(p, tuple(stop), max_new_tokens) for p in prompts]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if not todo:
        return [cache[k] for k in keys]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    room = max(model_max_length(model, tokenizer) - max_new_tokens, 1)
    encoded = [tok_encode(tokenizer, p)[-room:] for p, _, _ in todo]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad, eos_token_id=_eos_ids(model, tokenizer) or None,
                              stop_strings=[s for s in stop if s] or None)
    order = sorted(range(len(todo)), key=lambda i: -len(encoded[i]))
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = len(encoded[chunk[0]])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 tokenizer=tokenizer)
            for r, i in enumerate(chunk):
                text = tokenizer.decode(out[r, width:].cpu(), skip_special_tokens=True)
                cache[todo[i]] = cut_at_stops(text, stop)
    return [cache[k] for k in keys]


# ---- declarative evaluations --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    """One benchmark or held-out task as data, an lm-eval task YAML in miniature.

    ``items``: for kind ``multiple_choice``, ``{"context", "choices", "gold"}`` (choice i is scored as the
    continuation ``target_delimiter + choices[i]``, gold an index); for kind ``generate``, ``{"prompt",
    "references"}`` with an optional ``"rule"`` (default ``rule``) and ``"target"`` (its answer when it is a few-shot
    exemplar; default the first reference). Other fields (a subject) serve ``group`` and ``description``.
    ``fewshot``: exemplars before each item, each ``text + target_delimiter + answer + fewshot_delimiter``: the first
    ``fewshot`` of ``exemplars`` with the item's ``group`` value (any, without a group), the item itself skipped
    (lm-eval's ``first_n`` sampler, as MMLU draws from its dev split). ``description``: put first, formatted with the
    item's fields. ``group``: the item field whose values get their own keys (MMLU's subject, BBH's subtask).
    ``stop``/``max_new_tokens``: where generation ends. ``chat``: the whole context is one user turn of the
    tokenizer's chat template (:func:`render_prompt`), for instruction-tuned models.
    """

    name: str
    items: Sequence[Mapping]
    kind: str = "multiple_choice"
    fewshot: int = 0
    exemplars: Sequence[Mapping] = ()
    description: str = ""
    group: str | None = None
    rule: str = "exact"
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 64
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    chat: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"evaluation {self.name!r}: unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.rule not in RULES:
            raise ValueError(f"evaluation {self.name!r}: unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.fewshot < 0 or (self.fewshot and not self.exemplars):
            raise ValueError(f"evaluation {self.name!r}: fewshot={self.fewshot} needs that many exemplars; pass exemplars or fewshot=0")
        for i, item in enumerate([*self.items, *self.exemplars]):
            problem = _item_problem(self, item)
            if problem:
                raise ValueError(f"evaluation {self.name!r}, item {i}: {problem}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc", "acc_norm") if self.kind == "multiple_choice" else ("exact",)


def _item_problem(evaluation: Evaluation, item: Mapping) -> str | None:
    if evaluation.kind == "multiple_choice":
        choices = item.get("choices")
        if not isinstance(item.get("context"), str) or not choices or not all(isinstance(c, str) and c for c in choices):
            return "a multiple-choice item needs a 'context' string and a list of non-empty 'choices' strings"
        if not isinstance(item.get("gold"), int) or not 0 <= item["gold"] < len(choices):
            return f"'gold' must be the index of the right choice, 0..{len(choices) - 1}; got {item.get('gold')!r}"
        return None
    refs = item.get("references")
    if not isinstance(item.get("prompt"), str) or isinstance(refs, str) or not refs:
        return "a generate item needs a 'prompt' string and a non-empty list of 'references'"
    if item.get("rule", evaluation.rule) not in RULES:
        return f"unknown rule {item.get('rule')!r}; choose one of {', '.join(RULES)}"
    return None


def _text(evaluation: Evaluation, item: Mapping) -> str:
    return item["context"] if evaluation.kind == "multiple_choice" else item["prompt"]


def _answer(evaluation: Evaluation, item: Mapping) -> str:
    if evaluation.kind == "multiple_choice":
        return item["choices"][item["gold"]]
    return item.get("target", item["references"][0])


def render_prompt(tokenizer, text: str) -> str:
    """A prompt as fedlora's instruction tuning renders it (:func:`fedlora.federation.causal_lm.render`): one user
    turn of the chat template followed by the assistant header; without a template, ``text + "\\n"``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return f"{text}\n"


def contexts(evaluation: Evaluation, tokenizer=None) -> list[str]:
    """Each item's full context: description, few-shot exemplars, the item's text (lm-eval ``fewshot_context``
    without a system instruction); rendered with the chat template when ``evaluation.chat``."""
    pools: dict[object, list[Mapping]] = {}
    for x in evaluation.exemplars if evaluation.fewshot else ():
        pools.setdefault(x.get(evaluation.group) if evaluation.group else None, []).append(x)
    out = []
    for item in evaluation.items:
        shots: list[Mapping] = []
        if evaluation.fewshot:
            pool = pools.get(item.get(evaluation.group) if evaluation.group else None, [])
            shots = [x for x in pool if x is not item and x != item][: evaluation.fewshot]
            if len(shots) < evaluation.fewshot:
                raise ValueError(f"evaluation {evaluation.name!r}: {len(shots)} exemplars for an item of "
                                 f"{evaluation.group or 'the task'} {item.get(evaluation.group, '')!r}, {evaluation.fewshot} asked; "
                                 "pass more exemplars or a smaller fewshot")
        text = evaluation.description.format_map(item) + "".join(
            _text(evaluation, x) + evaluation.target_delimiter + _answer(evaluation, x) + evaluation.fewshot_delimiter
            for x in shots) + _text(evaluation, item)
        out.append(render_prompt(tokenizer, text) if evaluation.chat else text)
    return out


def aggregate(evaluation: Evaluation, scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``<name>/<metric>`` (mean over all items: lm-eval's ``weight_by_size`` group mean), ``<name>/<value>/<metric>``
    for each value of the ``group`` field (sorted), and ``<name>/n`` (items scored). NaN for no items."""
    def mean(rows: Sequence[Mapping[str, float]], metric: str) -> float:
        return sum(r[metric] for r in rows) / len(rows) if rows else math.nan

    out = {f"{evaluation.name}/{m}": mean(scores, m) for m in evaluation.metrics}
    out[f"{evaluation.name}/n"] = float(len(scores))
    if evaluation.group:
        groups: dict[str, list[Mapping[str, float]]] = {}
        for item, row in zip(evaluation.items, scores):
            groups.setdefault(str(item.get(evaluation.group)), []).append(row)
        for value in sorted(groups):
            out |= {f"{evaluation.name}/{value}/{m}": mean(groups[value], m) for m in evaluation.metrics}
    return out


def evaluate(model: nn.Module, tokenizer, evaluation: Evaluation, *, device: torch.device | str = "cpu",
             batch_size: int = 16, cache: dict | None = None) -> dict[str, float]:
    """The evaluation's scores under stable keys (see :func:`aggregate`): multiple choice by the log-likelihood of
    each choice (``acc``, ``acc_norm``, :func:`choice_metrics`), generation by the item's answer rule (``exact``)."""
    texts = contexts(evaluation, tokenizer)
    items = evaluation.items
    if evaluation.kind == "multiple_choice":
        requests = [(ctx, evaluation.target_delimiter + c) for ctx, item in zip(texts, items) for c in item["choices"]]
        results = iter(loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device, cache=cache))
        lls = [[next(results)[0] for _ in item["choices"]] for item in items]
        scores = [choice_metrics(ll, item["choices"], item["gold"]) for ll, item in zip(lls, items)]
        return aggregate(evaluation, scores) | mode_share(evaluation.name, lls)
    else:
        answers = generations(model, tokenizer, texts, stop=evaluation.stop, max_new_tokens=evaluation.max_new_tokens,
                              batch_size=batch_size, device=device, cache=cache)
        scores = [{"exact": float(judge(item.get("rule", evaluation.rule), a, item["references"]))} for item, a in zip(items, answers)]
    return aggregate(evaluation, scores)


def evaluate_all(model: nn.Module, tokenizer, evaluations: Sequence[Evaluation], *, device: torch.device | str = "cpu",
                 batch_size: int = 16) -> dict[str, float]:
    """Every evaluation's keys in one dict; requests the evaluations share are computed once (one cache for the
    call, which sees one model state)."""
    names = [e.name for e in evaluations]
    if len(set(names)) < len(names):
        raise ValueError(f"evaluation names must be unique (they prefix the metric keys); got {names}")
    cache: dict = {}
    out: dict[str, float] = {}
    for evaluation in evaluations:
        out |= evaluate(model, tokenizer, evaluation, device=device, batch_size=batch_size, cache=cache)
    return out


# ---- lm-eval's mmlu and gsm8k prompts -----------------------------------------------------------------------------

MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject_text}.\n\n"
MMLU_LETTERS = ("A", "B", "C", "D")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")


def mmlu_prompt(question: str, choices: Sequence[str]) -> str:
    """lm-eval's ``mmlu`` ``doc_to_text``: the question, the four lettered choices, ``Answer:``."""
    lines = [question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_item(record: Mapping) -> dict:
    """An item from a ``cais/mmlu`` record (``question``, ``subject``, four ``choices``, ``answer`` as index or letter):
    choices " A".." D" as in lm-eval (``doc_to_choice: [A, B, C, D]``)."""
    answer = record["answer"]
    gold = MMLU_LETTERS.index(answer.strip().upper()) if isinstance(answer, str) else int(answer)
    subject = str(record["subject"])
    return {"context": mmlu_prompt(record["question"], record["choices"]), "choices": list(MMLU_LETTERS), "gold": gold,
            "subject": subject, "subject_text": " ".join(subject.split("_"))}


def mmlu_evaluation(test: Sequence[Mapping], dev: Sequence[Mapping] = (), *, fewshot: int = 0, name: str | None = None) -> Evaluation:
    """MMLU as lm-eval's ``mmlu`` task (by subject and overall): the subject's description, ``fewshot`` exemplars of
    the same subject from ``dev`` (first n), keys ``mmlu/acc`` (0-shot) or ``mmlu_5shot/acc`` and ``.../<subject>/acc``."""
    return Evaluation(name or ("mmlu" if fewshot == 0 else f"mmlu_{fewshot}shot"), [mmlu_item(r) for r in test],
                      "multiple_choice", fewshot=fewshot, exemplars=[mmlu_item(r) for r in dev] if fewshot else (),
                      description=MMLU_DESCRIPTION, group="subject")


def gsm8k_item(record: Mapping) -> dict:
    """An item from an ``openai/gsm8k`` record (``question``, ``answer`` ending ``#### N``): lm-eval's prompt
    ``Question: ...\\nAnswer:``, the full solution as exemplar answer, scored by the final number."""
    return {"prompt": f"Question: {record['question']}\nAnswer:", "references": [gsm8k_reference(record["answer"])],
            "target": record["answer"], "rule": "number"}


def gsm8k_evaluation(test: Sequence[Mapping], train: Sequence[Mapping] = (), *, fewshot: int = 0, name: str = "gsm8k",
                     max_new_tokens: int = 256) -> Evaluation:
    """GSM8K as lm-eval's ``gsm8k`` (its stop strings and 256-token budget; exemplars: the first ``fewshot`` of
    ``train``, where lm-eval draws them at random), scored by the last number (``flexible-extract``): ``gsm8k/exact``."""
    return Evaluation(name, [gsm8k_item(r) for r in test], "generate", fewshot=fewshot,
                      exemplars=[gsm8k_item(r) for r in train[:fewshot]] if fewshot else (), rule="number",
                      stop=GSM8K_STOP, max_new_tokens=max_new_tokens)


# ---- the base model's reference row -------------------------------------------------------------------------------

@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's outputs: PEFT's ``disable_adapter()`` where the model has it. Base weights a method has
    already folded updates into stay folded, so call this before the first round."""
    disable: Callable | None = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else contextlib.nullcontext():
        yield


def run_key_digest(key: object, evaluations: Sequence[Evaluation]) -> str:
    """sha256 of the caller's run settings ``key`` (the model's name and revision, anything that changes its
    outputs) together with the evaluations themselves, so a changed subset or prompt is never read from the cache."""
    text = json.dumps({"key": key, "evaluations": [asdict(e) for e in evaluations]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def base_scores(model: nn.Module, tokenizer, evaluations: Sequence[Evaluation], *, cache_dir: str | os.PathLike,
                key: object, device: torch.device | str = "cpu", batch_size: int = 16) -> dict[str, float]:
    """The base model's scores (adapter disabled) on ``evaluations``: the reference row of every table. Computed
    once per (``key``, evaluations) and kept as ``cache_dir/<sha256>.json``; later calls read that file."""
    path = Path(cache_dir) / f"{run_key_digest(key, evaluations)}.json"
    if path.exists():
        return json.loads(path.read_text())["scores"]
    with adapter_disabled(model):
        scores = evaluate_all(model, tokenizer, evaluations, device=device, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "scores": scores}, default=str, indent=1))
    tmp.replace(path)  # atomic: a killed run never leaves half a row for the next to read
    return scores
