"""The method protocol: what a federated-LoRA method declares and the hooks it may override, and the registry.

A method is two files: its server rule in :mod:`fedlora.aggregation` (``register_rule``) and its protocol class
in :mod:`fedlora.federation.methods` (``@register``). The class declares its traits (DESIGN.md: exact,
personalised, linear, mixed ranks, adapters), its docs row and its options; its hooks say what clients train,
upload and keep, how the server combines, what each client receives and how it applies it. Everything else —
the list of method names, the CLI's choices and help, byte counts, adapter compatibility, the docs table — is
derived from these declarations: no code outside a method's own files decides by a method's name.

Hooks, in the order of a round (Flower's FedProx overrides one hook of FedAvg; so do these):

- once, when the model is built: :meth:`Method.prepare` (an adapter structure PEFT lacks: Fed-SB's core,
  FedDPA's second adapter, HiLoRA's leaf tier, SLoRA's sparse delta) and :meth:`Method.schedule` (the run's rounds
  and clients: HiLoRA's stages, SLoRA's switch round); then, if :meth:`Method.needs_setup`, a round 0:
  :meth:`Method.setup_upload` on every client, :meth:`Method.setup_aggregate` on the server, which sees who sent
  what (Fed-SB's federated gradient init; FedLEASE's round-0 LoRA, clustering and expert init; ``deliver`` then
  gives each client its own part);
- server, each round: :meth:`Method.participants` (who trains besides the seeded sample: HiLoRA's probe round);
- client: :meth:`Method.start` (round 1's start, from the initial state), :meth:`Method.frozen` (per round and
  client), :meth:`Method.private`, :meth:`Method.learning_rates` (per-trainable multipliers of the local lr),
  :meth:`Method.before_training` (a probe before the round's training: LoRA-A²'s rank selection),
  :meth:`Method.probe` (a measurement on the client's data sent with its upload: Fed-HeLLo's Fisher scores),
  :meth:`Method.loss_term`, :meth:`Method.step_correction` (a direction added to every optimizer step: ILoRA's
  control variates), :meth:`Method.after_step` (after every optimizer step: LoRA-A²'s mask reset),
  :meth:`Method.local_training` (training that never leaves the client), :meth:`Method.local_scoring` (how the
  client's own model is scored), :meth:`Method.upload`, :meth:`Method.eval_extras` (evaluation-only tensors: FedSA's
  B, FedLEASE's router), :meth:`Method.secure_upload` (what it adds to a SecAgg+ sum instead: LoRA-A²'s dense factor),
  :meth:`Method.client_state` (method state the client keeps, beside its private trainables: ILoRA's c_u);
- server: :meth:`Method.receive` (an upload read into the trainables' layout, before screening: LoRA-A²'s selected
  columns and mask; bytes are counted from what was sent, with :meth:`Method.side_bytes` declaring non-factor
  side information); :meth:`Method.aggregate` → :class:`ServerUpdate`; :meth:`Method.deliver` (what client ``peer``
  receives, counted per client in bytes down);
- client again: :meth:`Method.fold` (base-weight updates) and :meth:`Method.take` (the trainables to start
  from); :meth:`Method.apply` is both.

State a method keeps on the server across rounds (HiLoRA's tracked B̄, clusters and cluster LoRAs) goes into the
checkpoint through :meth:`Method.server_state` and :meth:`Method.load_server_state`.

Method state that travels like tensors but is no trainable (ILoRA's control variates) is keyed with the prefix
:data:`STATE` (see :func:`is_state`): it may be in a delivery (``deliver``; a client's ``take`` keeps it in its view),
in an upload and in a client's private state (``client_state``); it is counted in bytes like any tensor sent (declare
it in ``side_bytes``), checkpointed with the view or private state that holds it, and never loaded into the model.

Tensors are ``dict[str, Tensor]`` keyed by the PEFT parameter name (see :class:`fedlora.adapters.AdapterHandle`).
May import :mod:`fedlora.adapters` and :mod:`fedlora.aggregation`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor, nn

from fedlora.adapters import ADAPTERS, MIXED_RANK_ADAPTERS, AdapterHandle, AdapterSpec, adapter_kind
from fedlora.aggregation import Aggregate, ModelAggregate, aggregate_model, comm_elements, get_rule

Tensors = dict[str, Tensor]

# Wire keys of base-weight updates in a broadcast, per adapted module: a dense d×k update, or its factors L, R
# (ΔW0 = s·L R at the model's scale s). Any method may send them; Method.fold applies them.
FOLD, FOLD_L, FOLD_R = "fold", "fold_L", "fold_R"
# Method.server_opt: where a server optimiser steps the method's result (see there).
SERVER_OPT_FACTORS, SERVER_OPT_FOLD = "factors", "fold"
# The key prefix of method state carried beside the trainables (module docstring; ILoRA's control variates).
STATE = "state:"


def is_state(name: str) -> bool:
    """Whether ``name`` keys method state (prefix :data:`STATE`), not a trainable of the model."""
    return name.startswith(STATE)


@dataclass(frozen=True)
class Peer:
    """A client as the protocol sees it: its id, adapter rank r_u and scale s_u (α/r_u; α/√r_u for rsLoRA).
    The server's own model is ``Peer(-1, r_max, s(r_max))``."""

    cid: int
    rank: int
    scale: float


@dataclass(frozen=True)
class RoundContext:
    """What the server knows when it aggregates round ``number``: the seed of the round, the accepted clients in
    upload order, and whether the run's clients have different ranks (then the math runs in the scaled space)."""

    number: int
    seed: int
    peers: list[Peer]
    mixed: bool = False
    # Asynchronous aggregation: the seed of the round each peer's upload trained for, where some is not this round's
    # (a stale upload trained for its version's round, ``ClientResult.trained_round``); None: all this round's.
    seeds: tuple[int, ...] | None = None

    @property
    def scales(self) -> list[float] | None:
        return [p.scale for p in self.peers] if self.mixed else None

    def peer_seeds(self) -> list[int]:
        """The seed of the round each peer's upload trained for (``seeds``, else this round's for every peer)."""
        return list(self.seeds) if self.seeds is not None else [self.seed] * len(self.peers)


@dataclass(frozen=True)
class Option:
    """A method option: ``fedlora run --{method}-{name}`` on the CLI, ``method-options`` on Flower. ``interval``: the
    range a number must lie in, e.g. ``"[0, 1]"``, ``"(0, 1]"`` or ``"[0, inf)"`` (the paper's or the math's; a
    number option without one must still be finite)."""

    default: object
    help: str
    choices: tuple | None = None
    to_rule: bool = False  # also passed to the aggregation rule under the same name (e.g. svd's solver)
    interval: str | None = None

    def coerce(self, method: str, name: str, raw: object) -> object:
        kind = type(self.default)
        flag = f"{method}-{name}".replace("_", "-")
        try:
            if kind is bool and isinstance(raw, str):
                if raw.lower() not in ("true", "false"):
                    raise ValueError
                raw = raw.lower() == "true"
            value = raw if isinstance(raw, kind) else kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"option {flag}={raw!r} of method {method} is not a {kind.__name__}; pass e.g. {flag}={self.default}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"option {flag}={value!r} of method {method} is not one of {', '.join(map(str, self.choices))}")
        if kind in (int, float) and not in_interval(value, self.interval or "(-inf, inf)"):
            where = f"in {self.interval}" if self.interval else "a finite number"
            raise ValueError(f"option {flag}={value!r} of method {method} must be {where}; pass e.g. {flag}={self.default}")
        return value


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` (``"[0, 1)"``, ``"(0, inf)"``, …); NaN lies in none, and an infinite
    end is open."""
    lo_text, hi_text = (x.strip() for x in interval[1:-1].split(","))
    lo, hi = float(lo_text), float(hi_text)
    if value != value or value in (math.inf, -math.inf):
        return False
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


@dataclass
class ServerUpdate:
    """What one round's aggregation produced.

    ``broadcast``: what the server sends at the model's rank: trainables keyed by parameter name, and per adapted
    module optionally ``{module}.fold`` or ``{module}.fold_L``/``fold_R`` (base-weight updates). What client
    ``peer`` actually receives is ``Method.deliver(h, broadcast, peer)`` (its own rank and scale).
    ``eval_tensors``: trainables to score the global model with, when that is not what clients start from
    (FedSA: shared Â with the mean of the clients' B and heads; never sent).
    ``layers``: the per-module :class:`~fedlora.aggregation.Aggregate` as the math returned it (in the scaled
    product space under mixed ranks), and ``scales`` the client scales it used: for metrics. ``notes``: the method's
    own diagnostics of the round, added to its metrics line as they are (FLoRIST's kept rank per layer).
    """

    broadcast: Tensors
    eval_tensors: Tensors | None = None
    layers: dict[str, Aggregate] = field(default_factory=dict)
    scales: list[float] | None = None
    notes: dict = field(default_factory=dict)


class Method:
    """Base protocol: clients train every trainable, upload all of it, keep nothing; the server runs ``rule`` on the
    factors and averages the other trainables (FedIT's shape). Subclasses declare and override."""

    # ---- declarations (read by the CLI, docs, byte counts, compatibility checks) ------------------------------
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the paper
    rule: ClassVar[str] = ""  # the registered aggregation rule
    summary: ClassVar[str] = ""  # the server rule, one line, for the methods table
    # The methods table's rendering of the rule's ``comm`` (elements per client per adapted matrix): the declaration
    # is the rule's (``declared_elements``); the tests evaluate this text against it.
    up: ClassVar[str] = "r(d+k)"
    down: ClassVar[str] = "r(d+k)"
    exact: ClassVar[bool] = False  # ΔŴ = ΔW* by construction
    at_bound: ClassVar[bool] = False  # ΔŴ is the best rank-r broadcast: its ρ is the Eckart–Young bound
    exactness: ClassVar[str] = ""  # the table's "exact" column when more than yes/no ("nearly", "personalised")
    personalised: ClassVar[bool] = False  # clients keep private trainables and are scored on their own models
    linear: ClassVar[bool] = False  # the server needs only the weighted sum of the uploads (secure aggregation, DP)
    mixed_ranks: ClassVar[bool] = False  # clients may have different ranks
    # What ``--client-ranks`` gives each client: its adapter rank (the model holds the largest), or the size of its
    # sketch of the global rank-r adapter (``--rank``; FSLoRA): ``Method.ranks`` resolves them.
    client_ranks_are: ClassVar[str] = "ranks"
    unsupported: ClassVar[dict[str, str]] = {}  # adapter -> why this method cannot use it
    options: ClassVar[dict[str, Option]] = {}  # method options (CLI flags --NAME-OPTION)
    keeps_head_local: ClassVar[bool] = False  # default of --keep-head-local
    # Reference points (DESIGN.md, trustworthy comparisons), not federations: ``pooled`` trains one model on the union
    # of the clients' data (``central``); ``communicates = False`` reports no bytes (``central``, ``local``).
    pooled: ClassVar[bool] = False
    communicates: ClassVar[bool] = True
    needs_blocks: ClassVar[bool] = False  # adapts per transformer block (Fed-HeLLo): a model without numbered blocks is refused
    # --async (METHODS.md "Asynchronous aggregation"): "exact" (a stale update moves ΔW as the full-parameter rule
    # would), "inexact" (A and B mixed separately: the stale-product error), "fedbuff" (FedBuff only, in product-delta
    # form: the method truncates BA + (1/K)Σ h(τ)ΔW_u its own way; FedAsync refused), "" refused with ``async_refusal``
    # (why the method must stay synchronous; "" : its asynchronous rule is not implemented in this version)
    asynchronous: ClassVar[str] = ""
    async_refusal: ClassVar[str] = ""
    async_folds: ClassVar[bool] = False  # --async: the base moves (folds), so a stale client trains on its version's base
    # --async: a client starts from ``deliver`` of its version's state with that round's seed, as its Flower view holds
    # it, and an arrival's upload is rewritten in those coordinates (FSLoRA: its version's sketch)
    async_delivers: ClassVar[bool] = False
    in_process_only: ClassVar[str] = ""  # why the method cannot run on Flower ("" : it can)
    # Why the run has no one global model to export (a personalised structure PEFT cannot load: FedLEASE); "" : it has.
    # The artefacts are still written; load_global_model refuses with this reason.
    no_global_model: ClassVar[str] = ""
    # Server optimisers (``--server-opt``; METHODS.md "Server optimisers"; :mod:`fedlora.federation.server_opt`):
    # SERVER_OPT_FACTORS when the method's result lies in the coordinates of the round's start factors (each trained
    # tensor of the broadcast is stepped), SERVER_OPT_FOLD when its result is a fold into the base (the fold is
    # stepped, dense d×k), "" when refused, for the reason ``server_opt_refusal`` (one clause, shown after "because").
    server_opt: ClassVar[str] = ""
    server_opt_refusal: ClassVar[str] = "it declares no coordinates a server optimiser could step (Method.server_opt)"

    # Hooks that grew an argument (wave 3): an override written before it (a plug-in) is wrapped to drop it.
    _grown: ClassVar[dict[str, tuple[str, ...]]] = {"frozen": ("peer", "start"), "upload": ("peer",), "deliver": ("seed",),
                                                    "setup_aggregate": ("peers",)}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for hook, grown in Method._grown.items():
            fn = cls.__dict__.get(hook)
            for arg in grown:
                if fn is not None and arg not in inspect.signature(fn).parameters:
                    fn = _dropping(fn, arg)
                    setattr(cls, hook, fn)

    def __init__(self, *, keep_head_local: bool | None = None, client_ranks: list[int] | None = None, **options):
        # ``--client-ranks`` as given (cycled over clients), for a method that reads it as something other than
        # adapter ranks (``client_ranks_are``; LoRA-A²'s upload budgets); None when not given.
        self.client_ranks = list(client_ranks) if client_ranks else None
        declared = {k: options.pop(k) for k in list(options) if k in self.options}
        self.settings = {k: o.default for k, o in self.options.items()} | {
            k: self.options[k].coerce(self.name, k, v) for k, v in declared.items()
        }
        # Passed to the aggregation rule: declared options marked ``to_rule`` and any others given (florana's tol, max_iter).
        self.rule_options = {k: v for k, v in self.settings.items() if self.options[k].to_rule} | options
        self.keep_head_local = self.keeps_head_local if keep_head_local is None else keep_head_local
        self._delivered: tuple[Tensors | None, dict[int, Tensors]] = (None, {})  # deliver's views of the last broadcast
        self._started: tuple[Tensors | None, dict[int, Tensors]] = (None, {})  # start's views of the initial state

    @classmethod
    def adapters(cls) -> tuple[str, ...]:
        return tuple(a for a in ADAPTERS if a not in cls.unsupported)

    @classmethod
    def exact_text(cls) -> str:
        return cls.exactness or ("yes" if cls.exact else "no")

    @classmethod
    def async_text(cls) -> str:
        """The table's "async" column: exact, inexact, fedbuff only (product delta), sync only (METHODS.md), not yet
        (not implemented), — (no federation)."""
        if not cls.communicates or cls.pooled:
            return "—"
        if cls.asynchronous == "fedbuff":
            return "fedbuff only"
        return cls.asynchronous or ("sync only" if cls.async_refusal else "not yet")

    @classmethod
    def linear_text(cls) -> str:
        return "yes" if cls.linear else "no"

    @classmethod
    def mixed_text(cls) -> str:
        return ("yes" if cls.client_ranks_are == "ranks" else cls.client_ranks_are) if cls.mixed_ranks else "no"

    def stepped_rank(self, h: AdapterHandle, ctx: RoundContext) -> int:
        """The rank components of the global factors the round's clients trained, which a server optimiser steps: the
        largest rank among them (the components beyond it keep the method's result and their state)."""
        return max((p.rank for p in ctx.peers), default=h.rank)

    def untrained(self, h: AdapterHandle, ctx: RoundContext) -> set[str]:
        """Trainables of the round's broadcast nobody trained in round ``ctx.number``: a server optimiser leaves them,
        and their state, alone (stepping them with g = 0 would let momentum move them)."""
        return set()

    def is_linear(self) -> bool:
        """Whether this instance (with its options) needs only the weighted sum of the uploads."""
        return self.linear

    def secure_summable(self) -> bool:
        """Whether secure aggregation can carry this instance: its server needs only the weighted sum of what
        :meth:`secure_upload` gives (a linear method: of the uploads themselves)."""
        return self.is_linear()

    def secure_upload(self, h: AdapterHandle, upload: Tensors, start: Tensors | None, rnd: int, peer: Peer | None = None) -> Tensors:
        """What client ``peer`` adds to a secure sum in place of its round-``rnd`` ``upload`` (``start``: what it
        started the round from); with ``start`` None, ``upload`` is the layout ``upload(h, tensors, rnd)`` gives and the
        result is the secure sum's layout. The upload itself by default; LoRA-A²: its dense masked factor and mask."""
        return upload

    # ---- ranks ------------------------------------------------------------------------------------------------
    @classmethod
    def ranks(cls, rank: int, given: list[int] | None, clients: int) -> tuple[int, list[int] | None]:
        """``(model rank, each client's rank or None for the model's)`` from ``--rank`` and the ``--client-ranks``
        cycle ``given``: by default the model holds the largest client rank."""
        return (max(given) if given else rank), given

    def peer_scale(self, spec: AdapterSpec, rank: int) -> float:
        """The scale s_u a client of rank ``rank`` trains at (``Peer.scale``): its own s(r_u) by default."""
        return spec.scale_at(rank)

    # ---- bytes: declared once, by the rule --------------------------------------------------------------------
    def comm_options(self, rnd: int) -> dict[str, object]:
        """The rule options round ``rnd``'s bytes depend on (RoLoRA: the factor the round sends)."""
        return dict(self.rule_options)

    def declared_elements(self, d: int, k: int, r: int, U: int, rnd: int, *, module: str | None = None,
                          peer: Peer | None = None) -> tuple[int, int]:
        """``(up, down)`` elements one client of rank r sends and receives per adapted d×k matrix in round ``rnd``
        with U clients: the rule's declaration (``register_rule(comm=…)``), the one statement of a method's bytes.
        ``module`` and ``peer``, where given, name the matrix and the client (Fed-HeLLo: only allocated blocks go up).
        Non-factor trainables (the head, DoRA's magnitudes) and round 0 are counted from the tensors sent; a
        reference point that never communicates declares none."""
        if not self.communicates:
            return 0, 0
        return comm_elements(self.rule, d, k, r, U, **self.comm_options(rnd))

    # ---- building the model ------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, spec: AdapterSpec, seed: int) -> None:
        """Change the PEFT model's adapter structure before anything reads it (Fed-SB's and RAVAN's frozen bases and
        cores, FedDPA's second adapter). Called once per process right after PEFT wraps the model, with the run's
        seed, so the simulator, the Flower server and every SuperNode build the same model."""

    def schedule(self, rounds: int, clients: int = 0) -> None:
        """Told the run's number of rounds and of clients once, before round 1 (HiLoRA's stages and clustering)."""

    def participants(self, rnd: int, sampled: list[int], clients: int) -> list[int]:
        """The clients that train in round ``rnd`` (ascending), given the round's seeded sample ``sampled`` of
        ``clients``: the sample itself by default; HiLoRA adds, in its switch round, the clients never sampled in its
        root stage (their probe round). The simulator and the Flower strategy both ask it, after sampling."""
        return sampled

    # ---- state kept on the server across rounds (checkpointed) -------------------------------------------------
    def server_state(self) -> Tensors:
        """What the method keeps on the server between rounds, as tensors for the checkpoint (HiLoRA's tracked B̄,
        clusters and cluster LoRAs); {} for a method that keeps nothing."""
        return {}

    def load_server_state(self, tensors: Tensors) -> None:
        """Put back what :meth:`server_state` returned (a resumed run)."""

    # ---- round 0, for a method that needs one ------------------------------------------------------------------
    def needs_setup(self) -> bool:
        """Whether every client and the server run a round 0 before round 1 (Fed-SB's federated gradient init).
        Its bytes are counted in round 1's row."""
        return False

    def setup_upload(self, h: AdapterHandle, task, train, cfg) -> Tensors:
        """Round 0 on a client holding the initial state: what it sends (``train``: its training split)."""
        raise NotImplementedError(f"{self.name} runs no round 0")

    def setup_aggregate(self, h: AdapterHandle, uploads: list[Tensors], weights: Tensor, current: Tensors,
                        peers: list[Peer] | None = None) -> Tensors:
        """Round 0 on the server: the broadcast every client (and the server's model) applies before round 1;
        ``peers``: who sent each upload (FedLEASE clusters them; ``deliver`` may then give each its own part)."""
        raise NotImplementedError(f"{self.name} runs no round 0")

    # ---- client side -----------------------------------------------------------------------------------------
    def start(self, h: AdapterHandle, initial: Tensors, peer: Peer, seed: int) -> Tensors:
        """What client ``peer`` starts round 1 from, given the initial trainables (rank r_max) and round 1's seed
        (``RoundContext.seed``): its first r_u components, as PEFT would initialise it at r_u (FSLoRA: its sketch).
        Clients of one rank get the same tensors (computed once per initial state and rank)."""
        if self._started[0] is not initial:
            self._started = (initial, {})
        views = self._started[1]
        if peer.rank not in views:
            views[peer.rank] = h.truncate(initial, peer.rank)
        return views[peer.rank]

    def frozen(self, h: AdapterHandle, rnd: int, peer: Peer | None = None, start: Tensors | None = None) -> list[str]:
        """Trainables client ``peer`` must not change in round ``rnd`` (FFA: the shared A0; Fed-HeLLo: the blocks not
        allocated to it). ``peer`` is None where no client is meant (the server's own model): what all clients freeze.
        ``start``: on a client, what it starts the round from, its :data:`STATE` tensors included (Fed-HeLLo's FIM
        allocation, received with a broadcast); None on the server, which answers from its own state."""
        return []

    def probe(self, h: AdapterHandle, peer: Peer, rnd: int, task, train, cfg) -> Tensors:
        """Client ``peer``'s measurement on its start model before round ``rnd``'s training, with its training split
        ``train`` (``task.loss`` on ``train.batch(index, cfg.device)``): :data:`STATE`-keyed tensors sent with its
        upload (Fed-HeLLo's per-block Fisher scores in a FIM round; declare their bytes in ``side_bytes`` and their
        layout in ``upload``). Whatever it changes in the model (trainable flags, mode) it sets back. {} by default."""
        return {}

    def private(self, h: AdapterHandle) -> list[str]:
        """Trainables each client keeps across its rounds instead of taking the global ones."""
        return list(h.head_names) if self.keep_head_local else []

    def has_loss_term(self) -> bool:
        """Whether :meth:`loss_term` adds anything with these options (example-level DP cannot clip such a term per
        example, so the run is refused before training)."""
        return False

    def loss_term(self, h: AdapterHandle, peer: Peer) -> Tensor | None:
        """A term added to the client's training loss (HetLoRA's rank self-pruning regulariser), or None."""
        return None

    def learning_rates(self, h: AdapterHandle, rnd: int, peer: Peer) -> dict[str, float]:
        """Multipliers of the round's local learning rate by trainable name (LoRA-A²'s η_B = 5η_A, after LoRA+);
        trainables not named train at the round's lr."""
        return {}

    def before_training(self, h: AdapterHandle, peer: Peer, rnd: int, steps: Callable[[int], float], local_steps: int) -> None:
        """Client ``peer``'s work after loading its start state and before round ``rnd``'s ``local_steps`` local steps
        (LoRA-A²'s probe for its rank selection). ``steps(n)`` runs n local steps on whatever is trainable, with the
        round's data order, lr, multipliers and loss term and a fresh optimiser, but without :meth:`after_step`;
        whatever the hook changes in the model it must set back (``h.get`` before, ``h.set`` after): the round's
        training starts from the state it was given, with the same seeds."""

    def step_correction(self, h: AdapterHandle, peer: Peer, rnd: int, start: Tensors, lr: float, steps: int) -> Tensors:
        """Directions added to every optimizer step of client ``peer``'s round-``rnd`` training, by trainable name: after
        each step (and before :meth:`after_step`) ``x ← x − η_x·d_x``, η_x the step's lr for x (the round's ``lr`` times
        its :meth:`learning_rates` multiplier), so with AdamW the step is ``η(m̂/(√v̂+ε) + d)`` (weight decay is 0).
        ``start``: what the client starts the round from, its :data:`STATE` keys included; ``steps``: the round's local
        steps K. ILoRA: its control variates ``c[:r_u] − c_u`` (SCAFFOLD in AdamW's step space). {} (default): plain
        steps. Not applied in :meth:`before_training`'s probe steps."""
        return {}

    def after_step(self, h: AdapterHandle, peer: Peer, rnd: int) -> None:
        """After every optimizer step of client ``peer``'s round-``rnd`` training (LoRA-A² resets the components it
        did not select, which masks the whole update, weight decay included)."""

    def local_training(self, h: AdapterHandle, steps: Callable[[], float]) -> None:
        """After the round's training: training whose result never leaves the client (FedDPA's local adapter).
        ``steps()`` runs the round's local steps on whatever is trainable when it is called."""

    def local_scoring(self, h: AdapterHandle, train, device: str) -> AbstractContextManager:
        """The context in which a client's own model is scored on its test shard (FedDPA: the per-instance mix of its
        two adapters, against its training examples ``train``). The global model is always scored as it stands."""
        return nullcontext()

    def upload(self, h: AdapterHandle, tensors: Tensors, rnd: int, start: Tensors | None = None,
               peer: Peer | None = None) -> Tensors:
        """What client ``peer`` sends after local training in round ``rnd``; ``start`` is what it started the round
        from (the global state it received, at its rank: FedRot-LoRA aligns to it). Must keep the keys and shapes when
        ``start`` is None (the server derives the expected upload layout that way)."""
        private = set(self.private(h)) | set(self.frozen(h, rnd, peer=peer))
        return {n: t for n, t in tensors.items() if n not in private}

    def client_state(self, h: AdapterHandle, peer: Peer, rnd: int, start: Tensors, trained: Tensors) -> Tensors:
        """Method state client ``peer`` keeps after round ``rnd``'s training, beside its private trainables, keyed with
        :data:`STATE` (ILoRA's control variate c_u⁺); kept, like private trainables, only when the server accepts the
        round's result, given back in the next ``start`` and checkpointed. ``start``: what it started the round from;
        ``trained``: its trainables after training (at its rank). {} by default."""
        return {}

    def factor_names(self, h: AdapterHandle) -> set[str]:
        """Trainables beyond each layer's (B, A) that the rule's per-matrix declaration already counts (FedLEASE's
        other experts); the byte ledger's checks count every other non-factor trainable from the tensors sent."""
        return set()

    def side_bytes(self, h: AdapterHandle, rnd: int, peer: Peer | None = None) -> tuple[int, int]:
        """``(up, down)`` bytes client ``peer`` sends and receives in round ``rnd`` besides its factors (declared per
        matrix by the rule) and its other trainables: a method's side information (LoRA-A²'s N·r-bit selection mask
        up, packed; HiLoRA's cluster id down at its switch). The declaration the tests hold the counted bytes to;
        none by default."""
        return 0, 0

    def scored_states(self, held: dict[int, Tensors], private: dict[int, Tensors]) -> list[Tensors] | None:
        """The models whose mean accuracy on the global test set is the round's global accuracy, when that is not the
        one global model (``local``: every client's own); ``held``/``private``: each client's state."""
        return None

    def eval_extras(self, h: AdapterHandle, tensors: Tensors) -> Tensors:
        """Private tensors the server needs only to score a global model (FedSA's B and heads); not protocol bytes."""
        return {}

    def async_rewrite(self, h: AdapterHandle, upload: Tensors, start: Tensors, current: Tensors, *, mode: str,
                      weight: float) -> Tensors:
        """An arrival's upload rewritten to this method's rule input under ``--async`` (:mod:`.asynchronous`): FedAsync
        (``weight`` α_t) per tensor (1−α_t)·current + α_t·upload, the rule then takes it as the one client's state;
        FedBuff (``weight`` h(τ)) current + h(τ)(upload − start), whose uniform mean is FedBuff's step."""
        if mode == "fedasync":
            return {n: t if weight == 1.0 else (1 - weight) * current[n] + weight * t for n, t in upload.items()}
        return {n: current[n] + weight * (t - start[n]) for n, t in upload.items()}

    def async_extra(self, h: AdapterHandle, mode: str, items: list[tuple[Tensors, Tensors, float]], current: Tensors) -> dict[str, Tensor]:
        """Per module, the d×k weight update the server folds under ``--async`` beyond what the rule makes of the
        rewritten uploads (``items``: each arrival's upload, its start x_{v_u} and its weight α_t or h(τ)); none by
        default (FedEx: its staleness residual)."""
        return {}

    # ---- server side -----------------------------------------------------------------------------------------
    def receive(self, h: AdapterHandle, upload: Tensors, start: Tensors, rnd: int, peer: Peer) -> Tensors:
        """What the server reads client ``peer``'s round-``rnd`` upload as, before screening checks it against
        ``upload(h, start, rnd, peer=peer)`` (the layout) and the rule is given it; ``start`` is what the client started
        the round from. Default: the upload as sent. LoRA-A²: its selected columns and mask, decoded into the dense
        trained factor. Raises ValueError on an upload it cannot read (the client is rejected with that reason)."""
        return upload

    def aggregate(self, h: AdapterHandle, uploads: list[Tensors], weights: Tensor, current: Tensors, ctx: RoundContext) -> ServerUpdate:
        """Combine the accepted uploads (``ctx.peers`` in the same order) into the next global state."""
        agg = self.combine(h, uploads, weights, current, ctx)
        new = dict(current) | agg.others
        h.write_factors(to_global(h, agg.layers, ctx), uploads, new)
        return ServerUpdate(broadcast=new, layers=agg.layers, scales=ctx.scales)

    def deliver(self, h: AdapterHandle, broadcast: Tensors, peer: Peer, seed: int | None = None) -> Tensors:
        """What client ``peer`` receives of a broadcast: under mixed ranks its own truncation of the global factors
        at its scale (the rank-r_u factors of METHODS.md); base-weight updates are the same for every client.
        Clients of one rank get the same tensors (computed once per broadcast and rank). ``seed``: the
        ``RoundContext.seed`` of the round the client trains with it (FSLoRA draws its sketch from it)."""
        if peer.rank == h.rank:
            return broadcast
        if self._delivered[0] is not broadcast:
            self._delivered = (broadcast, {})
        views = self._delivered[1]
        if peer.rank not in views:
            views[peer.rank] = h.at_rank(broadcast, peer.rank)
        return views[peer.rank]

    def combine(self, h: AdapterHandle, uploads: list[Tensors], weights: Tensor, current: Tensors, ctx: RoundContext,
                **options: object) -> ModelAggregate:
        """Run this method's rule over every module (and average the other trainables); ``options``: this round's rule
        options on top of the method's own (RoLoRA: which factor the round trained).

        A factor a client did not send (frozen this round: FFA's A0, RoLoRA's other factor) is the one it started
        from, which every client shares: the server's own, at the client's rank. Where no client sent any B and
        the rule needs none (FedSA without scoring tensors), the rule gets ``Bs=None``."""
        views = [h.factors(u) for u in uploads]
        starts = {}

        def start(peer_rank: int) -> tuple[Tensors, Tensors]:
            if peer_rank not in starts:
                starts[peer_rank] = h.factors(h.at_rank(current, peer_rank))
            return starts[peer_rank]

        ranks = [p.rank for p in ctx.peers] if ctx.peers else [h.rank] * len(uploads)
        no_B = not any(v[0] for v in views) and not get_rule(self.rule).needs_B
        Bs = None if no_B else [start(r)[0] | v[0] for v, r in zip(views, ranks)]
        As = [start(r)[1] | v[1] for v, r in zip(views, ranks)]
        others = [{n: u[n] for n in h.other_names if n in u} for u in uploads]
        return aggregate_model(self.rule, Bs, As, weights, others, average_others=True, scales=ctx.scales, **(self.rule_options | options))

    # ---- applying a broadcast on a client (or the server's own model) ----------------------------------------
    def fold(self, h: AdapterHandle, delivered: Tensors) -> None:
        """Fold the broadcast's base-weight updates into the frozen base, once per model."""
        if deltas := fold_deltas(delivered):
            h.fold(deltas)

    def take(self, h: AdapterHandle, delivered: Tensors, current: Tensors, peer: Peer, seed: int) -> Tensors:
        """The trainables to start the next round from; ``current`` fills in what was not sent (FFA's A0, FedSA's B).
        It may depend on the client only through what it received, its rank and whether it is the server's own model
        (``peer.cid < 0``: ILoRA's clients keep the :data:`STATE` tensors they receive, the server's model does not). The
        simulator shares the result between clients that hold the same view, receive the same tensors and have the same
        rank, and with the server's model only for a broadcast without :data:`STATE` tensors."""
        return dict(current) | {n: t for n, t in delivered.items() if n in h.trainable_set}

    def apply(self, h: AdapterHandle, delivered: Tensors, current: Tensors, peer: Peer, seed: int) -> Tensors:
        """``fold`` then ``take``: what a client does with what it received."""
        self.fold(h, delivered)
        return self.take(h, delivered, current, peer, seed)


def _dropping(fn: Callable, arg: str) -> Callable:
    """``fn`` (a hook override without keyword ``arg``) called without it."""
    if arg in inspect.signature(inspect.unwrap(fn)).parameters:
        return fn

    def hook(self, *args, **kwargs):
        kwargs.pop(arg, None)
        return fn(self, *args, **kwargs)

    hook.__wrapped__ = fn
    return hook


def to_global(h: AdapterHandle, layers: dict[str, Aggregate], ctx: RoundContext) -> dict[str, Aggregate]:
    """Aggregates from the scaled product space (mixed ranks) back to the model's scale s = s(r_max): factors over
    √s, base-update factors over s (``h.fold`` multiplies by s). Unchanged when the run has one rank."""
    if not ctx.mixed:
        return layers
    root = h.spec.scale_at(h.rank) ** 0.5

    def conv(a: Aggregate) -> Aggregate:
        fold = None if a.base_delta_factors is None else (a.base_delta_factors[0] / root**2, a.base_delta_factors[1])
        return replace(a, B=None if a.B is None else a.B / root, A=None if a.A is None else a.A / root,
                       eval_B=None if a.eval_B is None else a.eval_B / root, base_delta_factors=fold)

    return {m: conv(a) for m, a in layers.items()}


def fold_deltas(delivered: Tensors) -> Tensors:
    """Per module, the d×k base-weight update a broadcast carries (``{module}.fold``, or ``fold_L @ fold_R``)."""
    deltas = {}
    for key, t in delivered.items():
        module, _, kind = key.rpartition(".")
        if kind == FOLD:
            deltas[module] = t
        elif kind == FOLD_L:
            deltas[module] = t @ delivered[f"{module}.{FOLD_R}"]
    return deltas


def send_fold(broadcast: Tensors, module: str, L: Tensor, R: Tensor) -> None:
    """Put ``module``'s base-weight update ``L R`` (d×m, m×k) into a broadcast as whichever is smaller to send: the
    dense d×k update, or its factors (FedEx-LoRA's residual rule; FedMomentum's and FRLoRA's folds)."""
    if L.shape[0] * R.shape[1] <= L.numel() + R.numel():
        broadcast[f"{module}.{FOLD}"] = L @ R
    else:
        broadcast[f"{module}.{FOLD_L}"], broadcast[f"{module}.{FOLD_R}"] = L, R


def broadcast_trained(h: AdapterHandle, agg: ModelAggregate, uploads: list[Tensors], current: Tensors, ctx: RoundContext,
                      frozen: list[str]) -> ServerUpdate:
    """The next global state of a round in which the factors ``frozen`` did not train (FFA's A0, RoLoRA's other
    factor): the trained factors and the averaged other trainables are written and broadcast; the frozen ones, which
    every client holds already, stay as they are and are not sent."""
    frozen_set = set(frozen)
    new = dict(current) | agg.others
    h.write_factors(to_global(h, agg.layers, ctx), uploads, new,
                    B=not frozen_set.issuperset(h.B_names()), A=not frozen_set.issuperset(h.A_names()))
    return ServerUpdate(broadcast={n: t for n, t in new.items() if n not in frozen_set}, layers=agg.layers, scales=ctx.scales)


# ---- the registry ---------------------------------------------------------------------------------------------
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by its ``name`` everywhere (CLI, Flower, compare, docs)."""
    if not cls.name or not cls.rule:
        raise ValueError(f"{cls.__name__} declares no name or rule; set both class attributes before registering it")
    get_rule(cls.rule)  # its math must be registered first
    REGISTRY[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Import every installed package's ``fedlora.methods`` entry point: its module registers its rule and class."""
    from importlib.metadata import entry_points

    for plugin in entry_points(group="fedlora.methods"):
        plugin.load()


def method_names() -> list[str]:
    return list(REGISTRY)


def linear_methods() -> list[str]:
    """The registered methods whose server rule is a weighted sum of the uploads (secure aggregation, central DP)."""
    return [name for name, cls in REGISTRY.items() if cls.linear]


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def make_method(name: str, adapter: str = "lora", *, mixed_ranks: bool = False, **options) -> Method:
    """The protocol object of method ``name``; a combination it cannot run fails here, in one line, before any work."""
    cls = method_class(name)
    if adapter in cls.unsupported:
        raise ValueError(f"method {name} does not support adapter {adapter}: {cls.unsupported[adapter]}")
    if mixed_ranks:
        if not cls.mixed_ranks:
            ok = ", ".join(n for n, c in REGISTRY.items() if c.mixed_ranks)
            raise ValueError(f"method {name} cannot train clients of different ranks (--client-ranks); use one of {ok}, or one rank for all")
        if not adapter_kind(adapter).mixed_ranks:
            raise ValueError(f"adapter {adapter} cannot give clients different ranks (its rank is that of its shared "
                             f"random projections); use {', '.join(MIXED_RANK_ADAPTERS)}, or one rank for all")
    return cls(**options)


def option_flags() -> dict[str, tuple[str, str, Option]]:
    """Every registered method option by its flag name ``METHOD-OPTION`` → (method, option, declaration)."""
    return {f"{m}-{o}".replace("_", "-"): (m, o, opt) for m, cls in REGISTRY.items() for o, opt in cls.options.items()}


def _option_items(text: str) -> list[str]:
    """The ``METHOD-OPTION=VALUE`` items of a comma-separated text. A value may hold commas
    (``fedhello-layers=6,9,12``): a piece without ``=`` after a pair continues its value."""
    items: list[str] = []
    for piece in (x.strip() for x in text.split(",") if x.strip()):
        if "=" not in piece and items and "=" in items[-1]:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def split_method_options(text: str) -> dict[str, list[tuple[str, str, Option, str]]]:
    """``"METHOD-OPTION=VALUE,…"`` by the method each option belongs to: (flag, option, declaration, value). An
    unknown option, or one given twice (``--method-options`` and its own flag, or twice in one string), fails in
    one line."""
    flags = option_flags()
    out: dict[str, list[tuple[str, str, Option, str]]] = {}
    seen: set[str] = set()
    for item in _option_items(text):
        key, eq, value = item.partition("=")
        key = key.strip().replace("_", "-")
        if not eq or key not in flags:
            known = ", ".join(flags) or "none"
            raise ValueError(f"method option {item!r} is not one of {known}; pass METHOD-OPTION=VALUE pairs, e.g. --method-options 'hetlora-weights=data'")
        if key in seen:
            raise ValueError(f"method option {key} is given more than once (as --{key} or in --method-options); give it once")
        seen.add(key)
        method, option, decl = flags[key]
        out.setdefault(method, []).append((key, option, decl, value.strip()))
    return out


def check_option_owners(text: str, methods: list[str] | tuple[str, ...]) -> None:
    """Refuse options of methods that are not run (``--method fedit --ravan-heads 0``): they would be ignored."""
    for method, items in split_method_options(text).items():
        if method not in methods:
            runs = f"--method {methods[0]}" if len(methods) == 1 else f"--methods {','.join(methods)}"
            raise ValueError(f"option {items[0][0]}={items[0][3]} belongs to method {method}, which this run does not use ({runs}); "
                             f"drop it, or run {method}")


def options_of(name: str, text: str) -> str:
    """Only method ``name``'s items of ``"METHOD-OPTION=VALUE,…"`` (a comparison gives each method its own)."""
    return ",".join(f"{flag}={value}" for flag, _, _, value in split_method_options(text).get(name, []))


def parse_method_options(name: str, text: str) -> dict[str, object]:
    """Method ``name``'s validated options from ``"METHOD-OPTION=VALUE,…"`` (``--method-options``; Flower's
    ``method-options``). Options of other registered methods are skipped here (:func:`check_option_owners` refuses
    them where a run is configured); an unknown option, or one given twice, fails in one line."""
    return {option: decl.coerce(name, option, value) for _, option, decl, value in split_method_options(text).get(name, [])}
