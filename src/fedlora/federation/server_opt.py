"""Server optimisers (``--server-opt avg|avgm|adam|yogi|adagrad``) on a method's result: METHODS.md, "Server
optimisers". The per-tensor math is :class:`fedlora.aggregation.server_opt.ServerOptRule`; here: which tensors of
a round's :class:`~fedlora.federation.protocol.ServerUpdate` it steps, the state it keeps between rounds, and which
methods may use it (their class declaration ``Method.server_opt``).

Where it sits: after the method's ``aggregate`` (and so after client-level DP's noise, which is in the inputs), as a
post-processing of the broadcast, in :meth:`Simulator.close_round`, the server half the Flower strategy runs too.
A linear method stays linear: the optimiser needs only the method's result. The state lives on the server only
(bytes unchanged, except the dense fold of a folding method) and is saved in the run's checkpoint, so a resumed run
continues it bit for bit. The round's metrics (ρ, bound) measure the method's own aggregate, before the step.

Choices where METHODS.md leaves them open (our choice):

- ``x_t`` is the server's own global state at the round's start (what every client started from, at the model's
  rank and scale) and ``x̄`` the broadcast the method computed from it.
- ``SERVER_OPT_FACTORS``: every trainable tensor in the broadcast is stepped. A tensor the broadcast does not carry
  (a factor frozen this round: FFA's A0, RoLoRA's other factor, Fed-SB's bases, a private one) is not stepped and
  its state is untouched; so is one the method names as trained by nobody this round (``Method.untrained``:
  Fed-HeLLo's blocks no client was allocated). Under mixed ranks the rank components beyond the largest rank of the
  round's clients were trained by nobody: they take the method's result as it is and their state is untouched
  (``Method.stepped_rank``; FSLoRA steps every component: the zeros outside a sketch are part of its estimator).
- ``SERVER_OPT_FOLD`` (FLoRA, FRLoRA): the base's pseudo-gradient is ``g = −F`` with F the round's fold as sent
  (d×k, ``fold`` or ``fold_L @ fold_R``; the base moves by ``s·F`` on LoRA, ``W0 ⊙ F`` on HiRA), the state is a
  dense d×k per matrix and the stepped fold goes down dense: the LoRA saving of bytes down is gone (a one-line
  warning says so). The other trainables the broadcast carries (the averaged head) are stepped as above.
- Trap: Flower's ``FedAdam``/``FedYogi``/``FedAdagrad`` strategies start v at 0 and scale η by a bias correction
  ``√(1−β2^{t+1})/(1−β1^{t+1})``; Algorithm 2 (and this module) has neither, with ``v₀ = τ²``. FSLoRA's server AdamW
  adds weight decay; this has none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from torch import Tensor

from fedlora.adapters import AdapterHandle
from fedlora.aggregation import SERVER_OPTIMIZERS, ServerOptRule
from fedlora.federation.protocol import (
    FOLD,
    FOLD_L,
    FOLD_R,
    REGISTRY,
    SERVER_OPT_FOLD,
    Method,
    RoundContext,
    ServerUpdate,
    Tensors,
)

log = logging.getLogger("fedlora")

DEFAULT_LR = {"avgm": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-2}  # η when --server-lr is not given


@dataclass(frozen=True)
class ServerOptConfig:
    """The run's server optimiser: ``name`` and its hyper-parameters; ``lr`` None is the optimiser's default η
    (avgm 1, adam/yogi/adagrad 1e-2: tune it)."""

    name: str = "avg"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimiser {self.name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)} (--server-opt)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"server_lr={self.lr} must be positive; pass e.g. --server-lr 1e-2 (or leave it out for the default)")
        for name in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"server_{name}={getattr(self, name)} is outside [0, 1); pass e.g. --server-{name} 0.9")
        if not self.tau > 0:
            raise ValueError(f"server_tau={self.tau} must be positive; pass e.g. --server-tau 1e-3")

    @property
    def active(self) -> bool:
        return self.name != "avg"

    def rule(self) -> ServerOptRule:
        lr = DEFAULT_LR.get(self.name, 1.0) if self.lr is None else self.lr
        return ServerOptRule(self.name, lr, self.momentum, self.beta1, self.beta2, self.tau)


def allowed_methods() -> list[str]:
    return [n for n, cls in REGISTRY.items() if cls.server_opt]


def check_server_opt(method: type[Method] | Method, cfg: ServerOptConfig) -> None:
    """Refuse in one line a server optimiser for a method that declares none (``Method.server_opt``)."""
    if cfg.active and not method.server_opt:
        raise ValueError(f"--server-opt {cfg.name} cannot run with method {method.name} because {method.server_opt_refusal}; "
                         f"use --server-opt avg, or one of {', '.join(allowed_methods())}")


class ServerOptimizer:
    """The run's server optimiser and its state: per stepped tensor (a trainable's name, or ``{module}.fold``) the
    rule's ``m`` (and ``v``). :meth:`step` post-processes a round's update; :meth:`state`/:meth:`load` are its part
    of the checkpoint."""

    def __init__(self, cfg: ServerOptConfig, method: Method):
        check_server_opt(method, cfg)
        self.cfg, self.rule, self.method = cfg, cfg.rule(), method
        self.moments: dict[str, dict[str, Tensor]] = {}
        if cfg.active and method.server_opt == SERVER_OPT_FOLD:
            log.warning("--server-opt %s on %s: its state is a dense d×k matrix per adapted layer and each round's step goes down "
                        "as a dense fold, so the LoRA saving of bytes down is gone", cfg.name, method.name)

    def step(self, h: AdapterHandle, update: ServerUpdate, current: Tensors, ctx: RoundContext) -> ServerUpdate:
        """The round's update with its trained tensors and folds stepped (``current``: the round's start ``x_t``)."""
        if not self.cfg.active:
            return update
        trained, untrained = self.method.stepped_rank(h, ctx), self.method.untrained(h, ctx)
        broadcast, stepped = dict(update.broadcast), {}
        for name, t in update.broadcast.items():
            if name in h.trainable_set and name in current and name not in untrained:
                stepped[name] = broadcast[name] = self._tensor(h, name, current[name], t, trained)
        folds = dict.fromkeys(key.rpartition(".")[0] for key in update.broadcast if key.rpartition(".")[2] in (FOLD, FOLD_L, FOLD_R))
        for module in folds:  # in the broadcast's order (the same in every process)
            fold = update.broadcast.get(f"{module}.{FOLD}")
            F = fold if fold is not None else update.broadcast[f"{module}.{FOLD_L}"] @ update.broadcast[f"{module}.{FOLD_R}"]
            for key in (FOLD, FOLD_L, FOLD_R):
                broadcast.pop(f"{module}.{key}", None)
            # x_t = 0 (the base now), x̄ = F: the stepped fold is the new base's offset from the current one.
            broadcast[f"{module}.{FOLD}"] = self._moved(f"{module}.{FOLD}", F.new_zeros(F.shape), F)
        evaluation = update.eval_tensors
        if evaluation is not None:  # FedSA scores with the stepped shared factor too
            evaluation = dict(evaluation) | {n: t for n, t in stepped.items() if n in evaluation}
        return replace(update, broadcast=broadcast, eval_tensors=evaluation)

    def _tensor(self, h: AdapterHandle, name: str, x_t: Tensor, x_bar: Tensor, trained: int) -> Tensor:
        """One trainable stepped; under mixed ranks only its first ``trained`` rank components, the rest keep x̄ and
        their state."""
        dim = h.rank_dim.get(name)
        if dim is None or trained >= x_bar.shape[dim]:
            return self._moved(name, x_t, x_bar)
        full = self.moments.get(name)
        full = self.rule.initial_state(x_bar) if full is None else full
        new, moments = self.rule.step(x_t.narrow(dim, 0, trained), x_bar.narrow(dim, 0, trained),
                                      {k: s.narrow(dim, 0, trained) for k, s in full.items()})
        self.moments[name] = {k: _pasted(full[k], v, dim) for k, v in moments.items()}
        return _pasted(x_bar, new, dim)

    def _moved(self, key: str, x_t: Tensor, x_bar: Tensor) -> Tensor:
        new, self.moments[key] = self.rule.step(x_t, x_bar, self.moments.get(key))
        return new

    # ---- the checkpoint ------------------------------------------------------------------------------------------
    def state(self) -> Tensors:
        """The optimiser's state as checkpoint tensors ``serveropt/{m|v}/{key}``."""
        return {f"serveropt/{k}/{key}": t for key, moments in self.moments.items() for k, t in moments.items()}

    def load(self, tensors: Tensors) -> None:
        """Put :meth:`state`'s tensors back (other keys are ignored)."""
        self.moments = {}
        for name, t in tensors.items():
            if name.startswith("serveropt/"):
                k, _, key = name.removeprefix("serveropt/").partition("/")
                self.moments.setdefault(key, {})[k] = t


def _pasted(full: Tensor, head: Tensor, dim: int) -> Tensor:
    """A copy of ``full`` with its first components along ``dim`` replaced by ``head``."""
    out = full.clone()
    out.narrow(dim, 0, head.shape[dim]).copy_(head)
    return out
