"""A controlled synthetic task, ``--data synthetic:α,β``: heterogeneity of the clients' models and of their inputs as
two knobs, in the style of FedProx's Synthetic(α, β) (Li et al., MLSys 2020), on a small frozen network whose
weight matrices carry the adapters, with a known optimum.

* **Network** (``D_IN`` = 60 → ``HIDDEN`` = 64, tanh → ``CLASSES`` = 10): ``logits = W2·tanh(W1 x + b1) + b2``.
  Its weights W0 are drawn from the run's seed; the model (``frontend.models.load_synthetic``) is this network,
  frozen, with LoRA-family adapters on ``fc1`` and ``fc2``.
* **Teachers.** A shared teacher ``W* = W0 + P`` with a planted rank-``TEACHER_RANK`` perturbation P on each layer
  (as large as the layer itself), and client u's teacher ``W_u = W* + α·Q_u`` with its own rank-``TEACHER_RANK``
  deviation Q_u of the same size: α = 0 gives every client the same teacher (model homogeneity).
* **Inputs** as FedProx: ``x ~ N(v_u, Σ)`` with ``Σ_jj = j^{-1.2}`` and ``m_u ~ N(0, β)``, but ``v_u ~ N(m_u, β)``
  (FedProx draws v_u with variance 1, so its Synthetic(0, 0) is not IID; here β = 0 gives every client the same
  input distribution).
* **Labels** are sampled, ``y ~ softmax(teacher_u(x))``, so no model does better on average than the teacher's own
  entropy: the Bayes loss, recorded per example (``entropy``). With α = 0 and adapters of rank ≥ ``TEACHER_RANK``
  the student can represent the teacher exactly, so that bound is the optimum; with α > 0 it is a lower bound.

``synthetic:0,0`` is IID. Everything is drawn from one seed; no download, and a round of 10 clients takes
milliseconds. Front end: imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

D_IN, HIDDEN, CLASSES, TEACHER_RANK = 60, 64, 10, 4
LOGIT_SCALE = 4.0  # the teacher's logits are sharpened so that its own accuracy on its sampled labels is ~0.6–0.8


@dataclass(frozen=True)
class SyntheticSpec:
    alpha: float
    beta: float

    @property
    def name(self) -> str:
        return f"synthetic:{self.alpha:g},{self.beta:g}"


def is_synthetic(spec: str) -> bool:
    return isinstance(spec, str) and spec.split(":", 1)[0] == "synthetic"


# Our choice: α, β ≤ 10^4. Past it each teacher's labels are already its argmax (the logits saturate) and the inputs'
# tanh saturates, so the task no longer changes; far past it (α ~ 1e38) the float32 weights overflow.
MAX_HETEROGENEITY = 1e4


def parse(spec: str) -> SyntheticSpec:
    """``synthetic:α,β`` (both ≥ 0) → SyntheticSpec; ``synthetic`` alone is ``synthetic:1,1``."""
    _, _, rest = spec.partition(":")
    if not rest:
        return SyntheticSpec(1.0, 1.0)
    try:
        a, b = (float(x) for x in rest.split(","))
    except ValueError:
        raise ValueError(f"--data {spec!r} is not synthetic:ALPHA,BETA; pass e.g. synthetic:1,1 (model and input heterogeneity, ≥ 0)") from None
    if not (a >= 0 and b >= 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"--data {spec!r}: α and β must be finite and ≥ 0; pass e.g. synthetic:0,0 (IID) or synthetic:1,1")
    if max(a, b) > MAX_HETEROGENEITY:
        raise ValueError(f"--data {spec!r}: α and β must be at most {MAX_HETEROGENEITY:g} (beyond it the teachers' logits saturate, "
                         "and far beyond it overflow float32); pass e.g. synthetic:1,1")
    return SyntheticSpec(a, b)


def base_weights(seed: int) -> dict[str, Tensor]:
    """The frozen network W0 (the same for every α, β at one seed)."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return {
        "fc1.weight": torch.randn(HIDDEN, D_IN, generator=g) / math.sqrt(D_IN),
        "fc1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
        "fc2.weight": torch.randn(CLASSES, HIDDEN, generator=g) * (LOGIT_SCALE / math.sqrt(HIDDEN)),
        "fc2.bias": torch.zeros(CLASSES),
    }


def _low_rank_like(w: Tensor, g: torch.Generator) -> Tensor:
    """A rank-TEACHER_RANK matrix with w's shape and Frobenius norm."""
    p = torch.randn(w.shape[0], TEACHER_RANK, generator=g) @ torch.randn(TEACHER_RANK, w.shape[1], generator=g)
    return p * (w.norm() / p.norm())


def forward(weights: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(x @ weights["fc1.weight"].T + weights["fc1.bias"])
    return h @ weights["fc2.weight"].T + weights["fc2.bias"]


@dataclass
class SyntheticShard:
    x: Tensor  # [N, D_IN] float32
    labels: Tensor  # [N] long
    entropy: Tensor  # [N] the generating teacher's predictive entropy at x (nats): the Bayes loss per example


@dataclass
class SyntheticData:
    spec: SyntheticSpec
    clients: list[tuple[SyntheticShard, SyntheticShard]]  # (train, local test) per client
    global_test: SyntheticShard
    weights: dict[str, Tensor]  # W0
    teachers: list[dict[str, Tensor]]  # each client's generating network

    @property
    def label_names(self) -> list[str]:
        return [f"class {c}" for c in range(CLASSES)]

    def partition_summary(self) -> list[dict]:
        return [{"cid": u, "n_train": len(tr.labels), "n_test": len(te.labels),
                 "train_labels": torch.bincount(tr.labels, minlength=CLASSES).tolist(),
                 "test_labels": torch.bincount(te.labels, minlength=CLASSES).tolist()}
                for u, (tr, te) in enumerate(self.clients)]


def generate(spec: SyntheticSpec, *, n_clients: int, examples_per_client: int, test_examples: int, local_test_fraction: float,
             seed: int) -> SyntheticData:
    """Every client's train and local test shards and a global test set of ``test_examples`` drawn evenly over the
    clients (each example from its client's inputs and teacher)."""
    if n_clients < 1 or examples_per_client < 2 or test_examples < 1:
        raise ValueError("synthetic data needs at least one client, 2 examples per client and 1 global test example; "
                         "pass --clients, --examples-per-client and --test-examples accordingly")
    W0 = base_weights(seed)
    g = torch.Generator().manual_seed(seed * 104729 + 3)
    shared = {k: (W0[k] + _low_rank_like(W0[k], g)) if k.endswith("weight") else W0[k] for k in W0}
    sigma = torch.arange(1, D_IN + 1, dtype=torch.float32).pow(-1.2).sqrt()
    teachers, centres = [], []
    for _ in range(n_clients):
        teachers.append({k: (v + spec.alpha * _low_rank_like(W0[k], g)) if k.endswith("weight") else v for k, v in shared.items()})
        m = torch.randn((), generator=g) * math.sqrt(spec.beta)
        centres.append(m + torch.randn(D_IN, generator=g) * math.sqrt(spec.beta))

    def draw(u: int, n: int) -> SyntheticShard:
        x = centres[u] + torch.randn(n, D_IN, generator=g) * sigma
        logp = torch.log_softmax(forward(teachers[u], x), dim=-1)
        y = torch.multinomial(logp.exp(), 1, generator=g).squeeze(1)
        return SyntheticShard(x=x, labels=y, entropy=-(logp.exp() * logp).sum(-1))

    n_test = max(1, round(examples_per_client * local_test_fraction))
    clients = [(draw(u, examples_per_client - n_test), draw(u, n_test)) for u in range(n_clients)]
    per = [test_examples // n_clients + (1 if u < test_examples % n_clients else 0) for u in range(n_clients)]
    parts = [draw(u, k) for u, k in enumerate(per) if k]
    glob = SyntheticShard(x=torch.cat([p.x for p in parts]), labels=torch.cat([p.labels for p in parts]),
                          entropy=torch.cat([p.entropy for p in parts]))
    return SyntheticData(spec=spec, clients=clients, global_test=glob, weights=W0, teachers=teachers)
