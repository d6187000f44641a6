"""Server-side aggregation of LoRA-family factors: pure tensor math, one file per method.

``aggregate(method, Bs, As, weights)`` combines one adapted matrix's client factors (``Bs[u]`` d×r,
``As[u]`` r×k, ``weights`` summing to 1) into an ``Aggregate``; ``aggregate_model`` does it for every adapted
module of a model's uploads (``dict[str, Tensor]`` keyed by module name) and averages the non-LoRA trainables.
``divergence`` and ``eckart_young_bound`` measure a result against the ideal update ``ΔW* = Σ w_u B_u A_u``;
``comm_bytes`` counts what each method sends. DESIGN.md's table defines every method.

This layer holds no nn.Module and does no I/O; it imports only torch and must not import the adapters,
federation or front-end layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import Tensor

from ._common import METHODS, Uploads, check_method, check_uploads
from .comm import CommBytes, comm_bytes, comm_elements, model_comm_bytes
from .fedex import fedex
from .fedit import fedit
from .fedsa import fedsa
from .ffa import ffa
from .flora import flora
from .florana import florana
from .metrics import divergence, eckart_young_bound
from .result import Aggregate
from .svd import svd

__all__ = [
    "METHODS",
    "Aggregate",
    "CommBytes",
    "ModelAggregate",
    "aggregate",
    "aggregate_model",
    "comm_bytes",
    "comm_elements",
    "divergence",
    "eckart_young_bound",
    "method_options",
    "model_comm_bytes",
]

RULES: dict[str, Callable[..., Aggregate]] = {
    "fedit": fedit,
    "ffa": ffa,
    "fedsa": fedsa,
    "flora": flora,
    "fedex": fedex,
    "florana": florana,
    "svd": svd,
}


def _keyword_options(rule: Callable[..., Aggregate]) -> dict[str, object]:
    params = inspect.signature(rule).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "name"}


_OPTIONS = {method: _keyword_options(rule) for method, rule in RULES.items()}
_TAKES_NAME = {method: "name" in inspect.signature(rule).parameters for method, rule in RULES.items()}


def method_options(method: str) -> dict[str, object]:
    """The options ``aggregate`` accepts for ``method``, with their defaults (e.g. florana's ``tol``)."""
    return dict(_OPTIONS[check_method(method)])


def check_options(method: str, options: dict[str, object]) -> None:
    accepted = _OPTIONS[method]
    for key in options:
        if key not in accepted:
            takes = f"it accepts {', '.join(accepted)}" if accepted else "it takes none"
            raise ValueError(f"unknown option {key!r} for aggregation method {method!r}; {takes}")


def run_rule(method: str, up: Uploads, name: str | None, options: dict[str, object]) -> Aggregate:
    if _TAKES_NAME[method]:
        options = {**options, "name": name}
    return RULES[method](up.Bs, up.As, up.w, **options)


def aggregate(
    method: str,
    Bs: Sequence[Tensor] | None,
    As: Sequence[Tensor],
    weights: Tensor,
    *,
    name: str | None = None,
    **options: object,
) -> Aggregate:
    """Combine one adapted matrix's client factors with ``method`` (one of ``METHODS``).

    ``Bs[u]`` is client u's d×r factor (``None`` allowed for ``fedsa``, which only uploads A), ``As[u]`` its
    r×k factor, ``weights`` non-negative and summing to 1. ``name`` only labels error messages. Options:
    ``florana``: ``tol=1e-10``, ``max_iter=100``, ``restarts=8``, ``seed=0``; ``svd``: ``rank=None`` (the
    clients' r). Clients share one rank r, except for ``flora``, which stacks heterogeneous ranks.
    Output factors keep the uploads' dtype and device. Bad input raises a one-sentence ``ValueError``.
    """
    check_method(method)
    check_options(method, options)
    up = check_uploads(Bs, As, weights, name=name, need_B=method != "fedsa", same_rank=method != "flora")
    return run_rule(method, up, name, options)


from .model import ModelAggregate, aggregate_model  # noqa: E402  (model.py uses the helpers above)
