"""The registry of server rules: each rule's file registers itself here by name, with what it declares.

A rule is a function ``rule(Bs, As, w, **options) -> Aggregate`` over one adapted matrix's client factors. What
it declares — whether it needs the clients' B, whether clients may have different ranks, what it sends per client
(``comm``) and whether under mixed ranks each client receives its own truncation — is all the rest of this package
knows about it: nothing outside a rule's own file decides by its name.

Imports only torch and this package's helpers; must not import the rule modules (they import this one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._batch import batched, scale_each, truncate_each
from ._common import Uploads, check_uploads
from .result import Aggregate

Comm = Callable[[int, int, int, int], tuple[int, int]]


@dataclass(frozen=True)
class Rule:
    """A registered server rule and what it declares.

    ``comm(d, k, r, U)``: elements one client uploads and downloads per d×k matrix at rank r with U clients (and any
    rule option it names as a keyword); the one declaration of a method's bytes (``comm.py``).
    ``needs_B``: False when clients upload only A (the rule then gets ``Bs=None`` or the Bs for scoring only).
    ``mixed_ranks``: whether clients may upload different ranks (segment averaging, stacking, truncation…).
    ``truncates``: under mixed ranks or scales, client u receives ``(B̂[:, :r_u], Â[:r_u]) / √s_u`` (``.clients``);
    False when every client receives the same broadcast (stacking).
    ``quadratic``: the rule holds (Σ r_u)² Grams at every number of clients (FedMomentum's eigensolve over all
    components); the others stay linear in U in memory (``svd``/``flexlora``/``florana`` switch solvers above
    ``svd.EXACT_MAX_COLUMNS`` stacked columns). The simulator's memory guard reads it.
    """

    name: str
    fn: Callable[..., Aggregate]
    comm: Comm
    needs_B: bool = True
    mixed_ranks: bool = False
    truncates: bool = True
    quadratic: bool = False

    @property
    def options(self) -> dict[str, object]:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "name"}

    @property
    def takes_name(self) -> bool:
        return "name" in inspect.signature(self.fn).parameters


RULES: dict[str, Rule] = {}


class _Names(Sequence[str]):
    """The registered rule names, live: a rule registered later (a plug-in, a test) is listed too."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(RULES)[i]

    def __len__(self) -> int:
        return len(RULES)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(RULES))

    def __contains__(self, name: object) -> bool:
        return name in RULES

    def __repr__(self) -> str:
        return repr(tuple(RULES))


METHODS: Sequence[str] = _Names()


def register_rule(name: str, *, comm: Comm, needs_B: bool = True, mixed_ranks: bool = False, truncates: bool = True,
                  quadratic: bool = False):
    """Decorator: register ``fn`` as the server rule ``name`` (PEFT's tuners register themselves the same way)."""

    def deco(fn: Callable[..., Aggregate]) -> Callable[..., Aggregate]:
        RULES[name] = Rule(name, fn, comm, needs_B=needs_B, mixed_ranks=mixed_ranks, truncates=truncates, quadratic=quadratic)
        return fn

    return deco


def get_rule(method: object) -> Rule:
    if not isinstance(method, str) or method not in RULES:
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {', '.join(RULES)}")
    return RULES[method]


def check_options(rule: Rule, options: dict[str, object]) -> None:
    accepted = rule.options
    for key in options:
        if key not in accepted:
            takes = f"it accepts {', '.join(accepted)}" if accepted else "it takes none"
            raise ValueError(f"unknown option {key!r} for aggregation method {rule.name!r}; {takes}")


def mixed_rank_rules() -> list[str]:
    return [r.name for r in RULES.values() if r.mixed_ranks]


def validate(rule: Rule, Bs, As, weights, *, scales=None, name: str | None = None) -> Uploads:
    """``check_uploads`` with what ``rule`` declares (need B, same rank) and the one-line hint for mixed ranks."""
    try:
        return check_uploads(Bs, As, weights, name=name, need_B=rule.needs_B, same_rank=not rule.mixed_ranks, scales=scales)
    except ValueError as exc:
        if "same rank r" in str(exc):
            raise ValueError(
                f"{exc.args[0]}; {rule.name} cannot combine clients of different ranks: use one of {', '.join(mixed_rank_rules())}"
            ) from None
        raise


def run_rule(rule: Rule, up: Uploads, name: str | None, options: dict[str, object]) -> Aggregate:
    """Run ``rule`` on validated uploads. With client scales s_u (mixed ranks), it runs on ``√s_u B_u``, ``√s_u A_u``
    (the scaled product space, where ``ΔW* = Σ w_u s_u B_u A_u``) and ``.clients`` gets each client's factors back
    at its own rank and scale."""
    if rule.takes_name:
        options = {**options, "name": name}
    Bs, As = up.Bs, up.As
    fast = batched(As[0].device)  # one broadcast product per distinct rank rather than one per client (_batch)
    if up.scales is not None:
        if fast:
            roots_t = up.scales.sqrt()
            Bs = None if Bs is None else scale_each(Bs, roots_t, 1)
            As = scale_each(As, roots_t, 0)
        else:
            roots = up.scales.sqrt().tolist()
            Bs = None if Bs is None else [B * c for B, c in zip(Bs, roots)]
            As = [A * c for A, c in zip(As, roots)]
    agg = rule.fn(Bs, As, up.w, **options)
    ranks = [A.shape[0] for A in up.As]
    if rule.truncates and (up.scales is not None or len(set(ranks)) > 1):
        if fast:
            roots_t = up.scales.sqrt() if up.scales is not None else torch.ones(len(ranks), dtype=torch.float64)
            return replace(agg, clients=truncate_each(agg.B, agg.A, ranks, roots_t))
        roots = up.scales.sqrt().tolist() if up.scales is not None else [1.0] * len(ranks)
        clients = [
            (None if agg.B is None else agg.B[:, :r] / c, None if agg.A is None else agg.A[:r] / c)
            for r, c in zip(ranks, roots)
        ]
        agg = replace(agg, clients=clients)
    return agg


def aggregate(
    method: str,
    Bs: Sequence[Tensor] | None,
    As: Sequence[Tensor],
    weights: Tensor,
    *,
    scales: Sequence[float] | Tensor | None = None,
    name: str | None = None,
    **options: object,
) -> Aggregate:
    """Combine one adapted matrix's client factors with ``method`` (a registered rule, see ``METHODS``).

    ``Bs[u]`` is client u's d×r_u factor (``None`` allowed where the rule needs no B, e.g. ``fedsa``), ``As[u]``
    its r_u×k factor, ``weights`` non-negative and summing to 1. Clients may have different ranks where the rule
    allows it (``fedit``, ``fedsa``: segment averaging; ``flora``: stacking; ``flexlora``, ``hetlora``).
    ``scales[u]`` is client u's adapter scale s_u (α/r_u; default all 1): the rule then works in the scaled
    product space, ``.B``/``.A`` approximate ``ΔW* = Σ w_u s_u B_u A_u``, and ``.clients[u]`` is the ``(B, A)``
    client u receives at its own rank and scale. ``.clients`` is ``None`` when every client has the same rank and
    no scales are given. ``name`` only labels error messages. Options per rule: ``method_options(method)``.
    Output factors keep the uploads' dtype and device. Bad input raises a one-sentence ``ValueError``.
    """
    rule = get_rule(method)
    check_options(rule, options)
    up = validate(rule, Bs, As, weights, scales=scales, name=name)
    return run_rule(rule, up, name, options)


def method_options(method: str) -> dict[str, object]:
    """The options ``aggregate`` accepts for ``method``, with their defaults (e.g. florana's ``tol``)."""
    return dict(get_rule(method).options)

