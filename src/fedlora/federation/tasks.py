"""What a client trains on and how a model is scored: tokenised splits and the task's loss and metric.

The round loop only calls ``task.loss(model, batch)`` and ``task.evaluate(model, split)``, so a new task
(e.g. causal-LM instruction tuning) plugs in without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` (the global generator that dropout draws from), without its cost where there is no
    CUDA: there it also queues a lazy CUDA seeding that records a stack trace, about 1.5 ms a call, which a client's
    turn pays every round. The CPU generator ends in the same state either way."""
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(int(seed))


@dataclass
class TokenizedSplit:
    """Examples padded to a common length; batches are trimmed to their longest example (dynamic padding)."""

    input_ids: Tensor  # [N, L] long
    attention_mask: Tensor  # [N, L] long
    labels: Tensor  # [N] long

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        mask = self.attention_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1)
        return {
            "input_ids": self.input_ids[index, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[index].to(device),
        }

    @classmethod
    def from_texts(cls, tokenizer, texts: list[str], labels: list[int], max_length: int) -> TokenizedSplit:
        if len(texts) == 0:  # an empty split (--local-test-fraction 0: no local test set), which tokenizers refuse
            empty = torch.zeros((0, max_length), dtype=torch.long)
            return cls(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return cls(enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long))


class ClassificationTask:
    """Sequence classification: cross-entropy on the label, scored by accuracy."""

    name = "classification"

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: TokenizedSplit, device: torch.device | str = "cpu", batch_size: int = 64) -> float:
        if len(split) == 0:
            return float("nan")
        was_training = model.training
        model.eval()
        correct = 0
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            batch = split.batch(index, device)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(dim=-1) == labels).sum())
        model.train(was_training)
        return correct / len(split)


@dataclass
class VectorSplit:
    """Real-valued inputs (the synthetic task): ``x`` [N, D], ``labels`` [N], and ``entropy`` [N], the generating
    teacher's predictive entropy per example (the Bayes loss)."""

    x: Tensor
    labels: Tensor
    entropy: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        return {"x": self.x[index].to(device), "labels": self.labels[index].to(device)}


class SyntheticTask(ClassificationTask):
    """Classification on the synthetic task, scored by accuracy, with the loss and its known floor beside it:
    ``global_loss`` (mean cross-entropy on the global test set), ``bayes_loss`` (the teachers' mean entropy there: no
    model does better on average; the optimum when every client shares one teacher) and ``loss_gap`` between them."""

    name = "synthetic"

    @torch.no_grad()
    def global_metrics(self, model: nn.Module, split: VectorSplit, device: torch.device | str = "cpu") -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = model(x=split.x.to(device), labels=split.labels.to(device))
        model.train(was_training)
        loss, bayes = float(out.loss), float(split.entropy.mean())
        return {"global_loss": loss, "bayes_loss": bayes, "loss_gap": loss - bayes}


def pooled(splits: list):
    """One split holding every example of ``splits`` (the same split type, padded to one width): the union of the
    clients' data that the ``central`` reference trains on."""
    first = splits[0]
    if hasattr(type(first), "pool"):  # a split that knows how to pad itself (causal LM: to the widest example)
        return type(first).pool(splits)
    return concat(splits)


def concat(splits: list):
    """The fields of ``splits`` end to end: tensors concatenated (of one width), lists joined, anything else the first's."""
    import dataclasses

    first = splits[0]
    values = {}
    for f in dataclasses.fields(first):
        parts = [getattr(s, f.name) for s in splits]
        if isinstance(parts[0], Tensor):
            if len({tuple(p.shape[1:]) for p in parts}) != 1:
                raise ValueError(f"cannot pool the clients' data: their {f.name} have different widths; tokenise them to one --max-length")
            values[f.name] = torch.cat(parts)
        elif isinstance(parts[0], list):
            values[f.name] = [x for p in parts for x in p]
        else:
            values[f.name] = parts[0]
    return type(first)(**values)
