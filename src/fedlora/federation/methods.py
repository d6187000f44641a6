"""The seven methods as protocol objects: what clients train, upload and keep; how the server combines; what it sends.

One small class per method, its hooks in the order of the paper's algorithm box. The math lives in
:mod:`fedlora.aggregation`; these classes only decide which tensors go where. The same objects serve the
in-process simulator and the Flower app.

Tensors are ``dict[str, Tensor]`` keyed by the PEFT parameter name (see :class:`fedlora.adapters.AdapterHandle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.adapters import AdapterHandle
from fedlora.aggregation import METHODS, Aggregate, aggregate_model

Tensors = dict[str, Tensor]


@dataclass
class ServerUpdate:
    """What one round's aggregation produced.

    ``broadcast``: the tensors sent to each client, all a client needs to apply the round (:meth:`Method.apply`);
    counted for bytes down. Besides trainables keyed by parameter name it may hold, per adapted module,
    ``{module}.residual`` or ``{module}.residual_L``/``residual_R`` (fedex) and ``{module}.stacked_B``/``stacked_A``
    (flora): factor-space updates to fold into the frozen base.
    ``eval_tensors``: trainables to score the global model with, when that is not what clients start from
    (FedSA: shared Â with the mean of the clients' B and heads; never sent).
    ``layers``: the per-module :class:`~fedlora.aggregation.Aggregate`, for metrics.
    """

    broadcast: Tensors
    eval_tensors: Tensors | None = None
    layers: dict[str, Aggregate] = field(default_factory=dict)


class Method:
    """Base protocol: clients train every trainable, upload all of it, keep nothing (FedIT's shape)."""

    name = ""
    personalised = False

    def __init__(self, *, keep_head_local: bool | None = None, **options):
        self.options = options  # passed to the aggregation rule (e.g. florana's tol, max_iter)
        self.keep_head_local = False if keep_head_local is None else keep_head_local

    # -- client side -------------------------------------------------------------------------------------------
    def frozen(self, h: AdapterHandle) -> list[str]:
        """Trainables clients must not change (FFA: the shared A0)."""
        return []

    def private(self, h: AdapterHandle) -> list[str]:
        """Trainables each client keeps across its rounds instead of taking the global ones."""
        return list(h.head_names) if self.keep_head_local else []

    def upload(self, h: AdapterHandle, tensors: Tensors) -> Tensors:
        """What a client sends after local training."""
        private = set(self.private(h)) | set(self.frozen(h))
        return {n: t for n, t in tensors.items() if n not in private}

    def eval_extras(self, h: AdapterHandle, tensors: Tensors) -> Tensors:
        """Private tensors the server needs only to score a global model (FedSA's B and heads); not protocol bytes."""
        return {}

    def apply(self, h: AdapterHandle, broadcast: Tensors, current: Tensors, *, seed: int) -> Tensors:
        """Apply a round's broadcast on a client (or the server's own model): fold base updates into the frozen
        weights once, and return the trainables to start the next round from (``current`` fills in what was not
        sent: FFA's A0, FedSA's initial B)."""
        fold = {}
        for key, t in broadcast.items():
            module, _, kind = key.rpartition(".")
            if kind == "residual":
                fold[module] = t
            elif kind in ("residual_L", "stacked_B"):
                fold[module] = t @ broadcast[f"{module}.{'residual_R' if kind == 'residual_L' else 'stacked_A'}"]
        h.fold(fold)
        return dict(current) | {n: t for n, t in broadcast.items() if n in h.trainable_set}

    # -- server side -------------------------------------------------------------------------------------------
    def aggregate(self, h: AdapterHandle, uploads: list[Tensors], weights: Tensor, current: Tensors, *, seed: int) -> ServerUpdate:
        raise NotImplementedError

    # shared server steps
    def _combine(self, h: AdapterHandle, rule: str, uploads: list[Tensors], weights: Tensor, current: Tensors, *, with_B=True, with_A=True):
        """Run aggregation rule ``rule`` over every module; returns (ModelAggregate, factor views Bs, As)."""
        views = [h.factors(u) for u in uploads]
        Bs = [v[0] for v in views] if with_B else None
        # Clients that upload no A (FFA) all hold the server's A0.
        As = [v[1] for v in views] if with_A else [h.factors(current)[1]] * len(uploads)
        others = [{n: u[n] for n in h.other_names if n in u} for u in uploads]
        agg = aggregate_model(rule, Bs, As, weights, others, average_others=True, **self.options)
        return agg, Bs, As

    def _write(self, h: AdapterHandle, layers: dict[str, Aggregate], uploads: list[Tensors], out: Tensors, *, B=True, A=True) -> None:
        """Write the broadcast factors into trainables ``out`` (VeRA: as coefficient-combined vectors)."""
        for module, agg in layers.items():
            k = h.keys[module]
            if h.spec.kind == "vera":
                if B and agg.p is not None:
                    out[k.B] = _combine_vectors([u[k.B] for u in uploads], agg.p)
                if A and agg.q is not None:
                    out[k.A] = _combine_vectors([u[k.A] for u in uploads], agg.q)
                continue
            if B and agg.B is not None:
                out[k.B] = agg.B.contiguous()
            if A and agg.A is not None:
                out[k.A] = agg.A.contiguous()


def _combine_vectors(vectors: list[Tensor], coef: Tensor) -> Tensor:
    stacked = torch.stack(vectors).to(torch.float64)
    return (coef.to(torch.float64) @ stacked).to(vectors[0].dtype)


class FedIT(Method):
    """FedIT: B̂ = Σ w_u B_u, Â = Σ w_u A_u (inexact: the mean of products is not the product of means)."""

    name = "fedit"
    rule = "fedit"

    def aggregate(self, h, uploads, weights, current, *, seed):
        agg, _, _ = self._combine(h, self.rule, uploads, weights, current)
        new = dict(current) | agg.others
        self._write(h, agg.layers, uploads, new)
        return ServerUpdate(broadcast=new, layers=agg.layers)


class FLoRANA(FedIT):
    """FLoRA-NA: B̂ = Σ p_u B_u, Â = Σ q_u A_u with (p, q) minimising ‖ΔW* − B̂Â‖_F; FedIT's bytes."""

    name = "florana"
    rule = "florana"


class SVD(FedIT):
    """Rank-r optimum: B̂Â = [ΔW*]_r (truncated SVD of the ideal update, never formed densely)."""

    name = "svd"
    rule = "svd"


class FFA(Method):
    """FFA-LoRA: A frozen at the shared seeded A0; only B trains and travels, so B̂A0 = Σ w_u B_u A0 exactly."""

    name = "ffa"

    def frozen(self, h):
        return h.A_names()

    def aggregate(self, h, uploads, weights, current, *, seed):
        agg, _, _ = self._combine(h, "ffa", uploads, weights, current, with_A=False)
        new = dict(current) | agg.others
        self._write(h, agg.layers, uploads, new, A=False)
        broadcast = {n: new[n] for n in new if n not in set(h.A_names())}
        return ServerUpdate(broadcast=broadcast, layers=agg.layers)


class FedSA(Method):
    """FedSA-LoRA: only A is shared (Â = Σ w_u A_u); each client keeps its own B and, by default, its head."""

    name = "fedsa"
    personalised = True

    def __init__(self, *, keep_head_local: bool | None = None, **options):
        super().__init__(keep_head_local=True if keep_head_local is None else keep_head_local, **options)

    def private(self, h):
        return h.B_names() + super().private(h)

    def eval_extras(self, h, tensors):
        return {n: tensors[n] for n in self.private(h)}

    def aggregate(self, h, uploads, weights, current, *, seed):
        # Clients' B (and local heads) reach the server as ``eval_extras``, only to score a global model: the
        # broadcast does not carry them and bytes up count only what ``upload`` returned.
        agg, _, _ = self._combine(h, "fedsa", uploads, weights, current)
        shared_others = {n: t for n, t in agg.others.items() if n not in set(self.private(h))}
        new = dict(current) | shared_others
        self._write(h, agg.layers, uploads, new, B=False)
        evaluation = dict(new) | agg.others
        for module, layer in agg.layers.items():
            k = h.keys[module]
            evaluation[k.B] = (
                _combine_vectors([u[k.B] for u in uploads], weights) if h.spec.kind == "vera" else layer.eval_B
            )
        broadcast = {n: new[n] for n in new if n not in set(self.private(h))}
        return ServerUpdate(broadcast=broadcast, eval_tensors=evaluation, layers=agg.layers)


class FedEx(Method):
    """FedEx-LoRA: FedIT's factors plus the residual ΔW* − B̂Â folded into every client's frozen W0 (exact)."""

    name = "fedex"

    def aggregate(self, h, uploads, weights, current, *, seed):
        agg, _, _ = self._combine(h, "fedex", uploads, weights, current)
        new = dict(current) | agg.others
        self._write(h, agg.layers, uploads, new)
        broadcast = dict(new)
        for module, layer in agg.layers.items():
            L, R = layer.base_delta_factors
            # Sent as whichever is smaller: the dense d×k residual or its factors of rank ≤ (U+1)r.
            if L.shape[0] * R.shape[1] <= L.numel() + R.numel():
                broadcast[f"{module}.residual"] = L @ R
            else:
                broadcast[f"{module}.residual_L"], broadcast[f"{module}.residual_R"] = L, R
        return ServerUpdate(broadcast=broadcast, layers=agg.layers)


class FLoRA(Method):
    """FLoRA: stack every client's factors, fold B̂Â = Σ w_u B_u A_u into W0, re-initialise the LoRA (exact)."""

    name = "flora"

    def aggregate(self, h, uploads, weights, current, *, seed):
        agg, _, _ = self._combine(h, "flora", uploads, weights, current)
        broadcast = dict(agg.others)
        for module, layer in agg.layers.items():
            broadcast[f"{module}.stacked_B"], broadcast[f"{module}.stacked_A"] = layer.B, layer.A
        return ServerUpdate(broadcast=broadcast, layers=agg.layers)

    def apply(self, h, broadcast, current, *, seed):
        new = super().apply(h, broadcast, current, seed=seed)
        # Every client re-initialises from the same seed, so the fresh factors cost no bytes. After the fold:
        # DoRA's fresh magnitude is the norm of the new base weight.
        return new | h.fresh_factors(seed)


METHOD_CLASSES: dict[str, type[Method]] = {c.name: c for c in (FedIT, FFA, FedSA, FLoRA, FedEx, FLoRANA, SVD)}
assert set(METHOD_CLASSES) == set(METHODS)

# Adapter × method combinations that cannot be represented (the rest all work).
UNSUPPORTED = {
    ("svd", "vera"): "the rank-r optimum is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora",
}


def make_method(name: str, adapter: str = "lora", **options) -> Method:
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if (name, adapter) in UNSUPPORTED:
        raise ValueError(f"method {name} does not support adapter {adapter}: {UNSUPPORTED[name, adapter]}")
    return METHOD_CLASSES[name](**options)
