"""Instruction tuning across tasks (``--task instruct``): the causal-LM loss on response tokens, scored per task by
each task's own answer rule, with standard benchmarks beside it as the forgetting check.

A split holds the tokenised prompt/response pairs the loss trains on and, per example, what scoring needs: the
prompt, every accepted answer, the answer rule and the task. :meth:`InstructTask.evaluate` generates an answer for
every prompt (greedy, batched, through :mod:`fedlora.federation.evaluation`) and returns the share judged correct;
:meth:`InstructTask.global_metrics` adds each task's score (``heldout/<task>/exact``) and the benchmarks'
(``mmlu/acc``, ``mmlu/<subject>/acc``, ``gsm8k/exact``, …). The run loop knows none of them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlora.federation.causal_lm import CausalLMSplit, CausalLMTask
from fedlora.federation.evaluation import Evaluation, evaluate, evaluate_all

HELDOUT = "heldout"  # the metric-key prefix of the held-out tasks' scores


@dataclass
class InstructSplit(CausalLMSplit):
    """A :class:`CausalLMSplit` with, per example, its prompt text, accepted answers, answer rule and task."""

    prompts: list[str] = None
    answers: list[list[str]] = None
    rules: list[str] = None
    tasks: list[str] = None

    @classmethod
    def from_rows(cls, tokenizer, rows: Sequence[dict], max_length: int) -> InstructSplit:
        """``rows``: dicts with ``prompt``, ``response``, ``references``, ``rule`` and ``task``."""
        base = CausalLMSplit.from_records(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                          [r["references"][0] for r in rows], None, max_length)
        return cls(**vars(base), prompts=[r["prompt"] for r in rows], answers=[list(r["references"]) for r in rows],
                   rules=[r["rule"] for r in rows], tasks=[r["task"] for r in rows])

    def evaluation(self, *, max_new_tokens: int, stop: tuple[str, ...] = ()) -> Evaluation:
        """Every example as a generate item of one evaluation grouped by task (the chat template wraps each prompt
        exactly as training does)."""
        items = [{"prompt": p, "references": a, "rule": r, "task": t} for p, a, r, t in zip(self.prompts, self.answers, self.rules, self.tasks)]
        return Evaluation(HELDOUT, items, "generate", group="task", chat=True, max_new_tokens=max_new_tokens, stop=stop)


class InstructTask:
    """Loss on response tokens (:class:`CausalLMTask`'s); scores by generation with each example's answer rule.

    ``benchmarks``: evaluations scored on the global model every round (MMLU, GSM8K, …). ``on_progress`` as for
    :class:`CausalLMTask` (``"generate"``, prompts answered)."""

    name = "instruct"

    def __init__(self, tokenizer, *, benchmarks: Sequence[Evaluation] = (), max_new_tokens: int = 32, eval_batch_size: int = 16,
                 on_progress: Callable[[str, int], None] | None = None):
        self.tokenizer = tokenizer
        self.benchmarks = list(benchmarks)
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.on_progress = on_progress
        self._lm = CausalLMTask(tokenizer, on_progress=on_progress)
        self._last: tuple[int, dict[str, float]] | None = None  # (id of the split, its scores) of the latest evaluate()
        self.reference: dict[str, float] | None = None  # the base model's scores before training, recorded every round

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self._lm.loss(model, batch)

    def scores(self, model: nn.Module, split: InstructSplit, device: torch.device | str = "cpu") -> dict[str, float]:
        """``heldout/exact`` (every example) and ``heldout/<task>/exact`` of the model on ``split``."""
        scores = evaluate(model, self.tokenizer, split.evaluation(max_new_tokens=self.max_new_tokens), device=device,
                          batch_size=self.eval_batch_size)
        if self.on_progress:
            self.on_progress("generate", len(split))
        self._last = (id(split), scores)
        return scores

    def evaluate(self, model: nn.Module, split: InstructSplit, device: torch.device | str = "cpu") -> float:
        """The share of examples answered correctly under their task's rule (NaN for an empty split)."""
        if len(split) == 0:
            return float("nan")
        return self.scores(model, split, device)[f"{HELDOUT}/exact"]

    def global_metrics(self, model: nn.Module, split: InstructSplit, device: torch.device | str = "cpu") -> dict[str, float]:
        """Each held-out task's score (from the :meth:`evaluate` the round just made on ``split``) and every benchmark's."""
        held = self._last[1] if self._last is not None and self._last[0] == id(split) else self.scores(model, split, device)
        out = {k: v for k, v in held.items() if not k.endswith("/n")}
        if self.benchmarks:
            out |= {k: v for k, v in evaluate_all(model, self.tokenizer, self.benchmarks, device=device,
                                                  batch_size=self.eval_batch_size).items() if not k.endswith("/n")}
        if self.reference is not None:  # so that every history carries its own reference row
            out["reference"] = dict(self.reference)
        return out
