"""Causal-LM instruction tuning as a task: prompt/response splits, loss on response tokens only, and scoring
by generation (greedy, bounded new tokens, batched) with answer-level metrics from :mod:`fedlora.generation`.

Plugs into the round loop exactly as :class:`~fedlora.federation.tasks.ClassificationTask` does: the loop
calls ``task.loss(model, batch)`` and ``task.evaluate(model, split, device)`` and uses ``len(split)`` and
``split.batch(index, device)``. ``evaluate`` returns exact match or pass@1, which the metrics record as
``global_accuracy``/``local_accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlora.generation import SCORINGS, score

IGNORE = -100  # labels the loss skips: prompt tokens and padding


def render(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example, together at most ``max_length`` tokens.

    With a chat template: the prompt is the user turn plus the assistant header (``add_generation_prompt``), the
    response is the rest of the rendered conversation (the answer and the template's end-of-turn token). Without
    one: ``"{prompt}\\n"`` (with the tokenizer's BOS if it adds one) and ``"{response}{eos}"``.
    Too long: the response keeps its first ``max(max_length // 2, room)`` tokens; then the prompt's *content*
    is cut at its end (marked "…") and re-rendered, so the template's header and assistant turn stay intact.
    """
    p_text, c_text, special = _texts(tokenizer, prompt, response)
    p = _encode(tokenizer, p_text, special)
    c = _encode(tokenizer, c_text, False)
    c = c[: max(max_length // 2, max_length - len(p), 1)]
    over = len(p) + len(c) - max_length
    if over > 0:
        content = _encode(tokenizer, prompt, False)
        keep = max(len(content) - over - 2, 0)
        p = _encode(tokenizer, _texts(tokenizer, tokenizer.decode(content[:keep]).rstrip() + "…", response)[0], special)
        if len(p) + len(c) > max_length:  # the template alone is longer than the room left: keep the prompt's end
            p = p[len(p) + len(c) - max_length:]
    return p, c


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _texts(tokenizer, prompt: str, response: str) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the prompt text needs the tokenizer's special tokens added)."""
    eos = tokenizer.eos_token or ""
    if has_chat_template(tokenizer):
        user = [{"role": "user", "content": prompt}]
        p_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(p_text):
            c_text = full[len(p_text):].rstrip()
            if eos and not c_text.endswith(eos) and eos not in c_text:
                c_text += eos
            return p_text, c_text, False
        return p_text, response + eos, False  # a template that rewrites earlier turns: plain answer + EOS
    return f"{prompt}\n", response + eos, True


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class CausalLMSplit:
    """Prompt/response examples for training (right-padded; batches trimmed to their longest example) and the
    prompts alone with their references (and tests) for scoring by generation."""

    input_ids: Tensor  # [N, L] long, prompt + response, right-padded
    attention_mask: Tensor  # [N, L]
    labels: Tensor  # [N, L] the response's token ids; IGNORE on the prompt and on padding
    prompt_ids: Tensor  # [N, P] the prompt alone, right-padded
    prompt_lengths: Tensor  # [N]
    references: list[str]
    tests: list[str]
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        mask = self.attention_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1) if len(index) else 1
        return {
            "input_ids": self.input_ids[index, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[index, :width].to(device),
        }

    def prompt_batch(self, index: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Prompts left-padded to their longest (generation appends on the right)."""
        lengths = self.prompt_lengths[index]
        width = max(int(lengths.max()), 1)
        ids = torch.full((len(index), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, (i, n) in enumerate(zip(index.tolist(), lengths.tolist())):
            ids[row, width - n:] = self.prompt_ids[i, :n]
            mask[row, width - n:] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @classmethod
    def pool(cls, splits: list[CausalLMSplit]) -> CausalLMSplit:
        """One split holding every example of ``splits``, padded to the widest (``central``'s union of the clients' data)."""
        import dataclasses

        from fedlora.federation.tasks import concat

        width = max(s.input_ids.shape[1] for s in splits)
        p_width = max(s.prompt_ids.shape[1] for s in splits)

        def padded(t: Tensor, w: int, value: int) -> Tensor:
            return nn.functional.pad(t, (0, w - t.shape[1]), value=value)

        return concat([dataclasses.replace(
            s, input_ids=padded(s.input_ids, width, s.pad_token_id), attention_mask=padded(s.attention_mask, width, 0),
            labels=padded(s.labels, width, IGNORE), prompt_ids=padded(s.prompt_ids, p_width, s.pad_token_id)) for s in splits])

    @classmethod
    def from_records(cls, tokenizer, prompts: list[str], responses: list[str], references: list[str],
                     tests: list[str] | None, max_length: int) -> CausalLMSplit:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; pass a --model whose tokenizer defines one")
        pairs = [render(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
        n = len(pairs)
        width = max([len(p) + len(c) for p, c in pairs], default=1)
        p_width = max([len(p) for p, _ in pairs], default=1)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        prompt_ids = torch.full((n, p_width), pad, dtype=torch.long)
        for i, (p, c) in enumerate(pairs):
            ids = torch.tensor(p + c, dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
            labels[i, len(p): len(ids)] = ids[len(p):]
            prompt_ids[i, : len(p)] = ids[: len(p)]
        lengths = torch.tensor([len(p) for p, _ in pairs], dtype=torch.long)
        return cls(input_ids, attention_mask, labels, prompt_ids, lengths, list(references),
                   list(tests) if tests is not None else [""] * n, int(pad))


class CausalLMTask:
    """Next-token cross-entropy on response tokens only; scored by greedy generation and answer-level matching.

    ``scoring``: ``exact``, ``number`` or ``pass@1`` (see :mod:`fedlora.generation.answers`). ``on_progress``:
    called as ``(kind, n)`` with kind ``"train"`` (examples in a training batch) or ``"generate"`` (prompts
    answered), for a progress display.
    """

    name = "causal-lm"

    def __init__(self, tokenizer, *, scoring: str = "exact", max_new_tokens: int = 64, eval_batch_size: int = 16,
                 code_timeout: float = 10.0, on_progress: Callable[[str, int], None] | None = None):
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.code_timeout = code_timeout
        self.on_progress = on_progress
        self.last_generations: list[str] = []  # of the latest evaluate(), in split order (for inspection)
        self._sparse_head: bool | None = None  # whether the model computes logits at chosen positions only

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy over the batch's response tokens (prompt and padding carry none).

        The LM head runs only at the positions that predict a response token (``logits_to_keep`` as a boolean
        mask, transformers ≥ 5): with short answers most of a batch's [tokens × vocabulary] logits are never
        needed. Same value as ``model(**batch).loss``; models whose forward lacks the option get that instead.
        """
        labels = batch["labels"]
        loss = None
        if self._sparse_head is not False:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t+1
            try:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=keep, use_cache=False).logits
            except TypeError:
                logits = None
            if logits is not None and logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
                self._sparse_head = True
                loss = nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])
            else:
                self._sparse_head = False
        if loss is None:
            loss = model(**batch, use_cache=False).loss
        if self.on_progress:
            self.on_progress("train", int(batch["input_ids"].shape[0]))
        return loss

    def _eos_ids(self, model: nn.Module) -> list[int]:
        ids = set()
        for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    @torch.no_grad()
    def generate(self, model: nn.Module, split: CausalLMSplit, device: torch.device | str = "cpu") -> list[str]:
        """Greedy answers to every prompt of ``split``, in split order. Prompts are batched by length (sorted), so
        little padding is computed; generation stops when every answer in a batch has ended or at max_new_tokens."""
        from transformers import GenerationConfig

        if len(split) == 0:
            return []
        was_training = model.training
        model.eval()
        eos = self._eos_ids(model)
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                  pad_token_id=split.pad_token_id, eos_token_id=eos or None)
        order = torch.argsort(split.prompt_lengths, stable=True)
        answers: list[str] = [""] * len(split)
        try:
            for start in range(0, len(split), self.eval_batch_size):
                index = order[start: start + self.eval_batch_size]
                batch = split.prompt_batch(index, device)
                out = model.generate(**batch, generation_config=config)
                new = out[:, batch["input_ids"].shape[1]:].cpu()
                for i, ids in zip(index.tolist(), new):
                    answers[i] = self.tokenizer.decode(ids, skip_special_tokens=True)
                if self.on_progress:
                    self.on_progress("generate", len(index))
        finally:
            model.train(was_training)
        return answers

    def evaluate(self, model: nn.Module, split: CausalLMSplit, device: torch.device | str = "cpu") -> float:
        """Exact match or pass@1 of greedy generations (NaN for an empty split)."""
        if len(split) == 0:
            return float("nan")
        answers = self.generate(model, split, device)
        self.last_generations = answers
        correct = sum(
            score(self.scoring, a, ref, tests or None, timeout=self.code_timeout)
            for a, ref, tests in zip(answers, split.references, split.tests)
        )
        return correct / len(split)
