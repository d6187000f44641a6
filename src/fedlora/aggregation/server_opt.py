"""Server optimisers on one tensor of the server's state: FedAvgM (Hsu et al. 2019) and FedAdam, FedYogi,
FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2). Pure tensor math; which tensors a method's result gives them,
and their state across rounds, are :mod:`fedlora.federation.server_opt`'s.

For a tensor ``x`` whose value at the round's start is ``x_t`` and whose value in the method's own result is
``x̄``, the pseudo-gradient is ``g = x_t − x̄`` and

- ``avg``: ``x ← x̄`` (the method itself; no state);
- ``avgm``: ``m ← βm + g``, ``x ← x_t − ηm`` (Flower's ``fedavgm.py``; the first round's m is g, as there);
- ``adam``: ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``;
- ``yogi``: m as adam, ``v ← v − (1−β2) g² sign(v − g²)``;
- ``adagrad``: m as adam, ``v ← v + g²``;
- then for adam/yogi/adagrad ``x ← x_t − η m / (√v + τ)`` with ``m₀ = 0``, ``v₀ = τ²`` and no bias correction
  (Algorithm 2 as published). Trap: Flower's ``FedAdam`` strategy multiplies η by ``√(1−β2^{t+1})/(1−β1^{t+1})``
  (a bias correction with exponent server_round + 1) and starts v at 0, so its numbers are not Algorithm 2's.

Our choice of arithmetic: the new value is computed as ``x̄ + (g − η·u)`` (u = m, or m/(√v+τ)), which equals
``x_t − η·u`` and makes ``avgm`` with η = 1, β = 0 reproduce ``x̄`` bit for bit (g − g is exactly 0). The state
keeps the tensor's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SERVER_OPTIMIZERS = ("avg", "avgm", "adam", "yogi", "adagrad")
ADAPTIVE = ("adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerOptRule:
    """One server optimiser and its hyper-parameters (``lr``: η; ``momentum``: avgm's β; ``beta1``, ``beta2``,
    ``tau``: Algorithm 2's)."""

    name: str = "avg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """``m₀ = 0`` (and ``v₀ = τ²`` for the adaptive rules), shaped and typed as ``like``."""
        if self.name == "avgm":
            return {"m": torch.zeros_like(like)}
        if self.name in ADAPTIVE:
            return {"m": torch.zeros_like(like), "v": torch.full_like(like, self.tau**2)}
        return {}

    def step(self, x_t: Tensor, x_bar: Tensor, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The new value of a tensor and its new state (``state`` None: the initial one). ``state`` is not changed."""
        if self.name == "avg":
            return x_bar, {}
        state = self.initial_state(x_t) if state is None else state
        g = x_t - x_bar
        if self.name == "avgm":
            m = self.momentum * state["m"] + g
            return x_bar + (g - self.lr * m), {"m": m}
        if self.name not in ADAPTIVE:
            raise ValueError(f"unknown server optimiser {self.name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
        m = self.beta1 * state["m"] + (1 - self.beta1) * g
        g2, v = g * g, state["v"]
        if self.name == "adam":
            v = self.beta2 * v + (1 - self.beta2) * g2
        elif self.name == "yogi":
            v = v - (1 - self.beta2) * g2 * torch.sign(v - g2)
        else:
            v = v + g2
        return x_bar + (g - self.lr * m / (v.sqrt() + self.tau)), {"m": m, "v": v}
