"""Differential privacy of a federated run: client-level DP-FedAvg and its accountant.

Client-level DP (``--dp client``; McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018, DESIGN.md "Privacy"): every round each client is included independently with probability q (Poisson
sampling, q = ``--fraction``); each included client's update Δ_u (what it uploads minus what it started the round
from, all uploaded tensors together) is clipped to L2 norm C; the server adds Gaussian noise of standard deviation
z·C to the sum and divides by the *expected* number of participants m = q·N. Client weights are uniform (the
sensitivity of the sum to one client is then C) and the clipping replaces norm screening. Neighbouring datasets
differ by one client (add/remove). Only methods whose server rule is a weighted sum of the uploads (trait
``linear``) qualify: their rule then sees exactly the noisy average ``start + (Σ clip(Δ_u) + ξ)/m`` and whatever it
does after that is post-processing.

How the noisy sum reaches the method: each included client's upload becomes ``start + clip(Δ_u)·n/m`` (n clients
this round) and the noise ``ξ·n/m`` is added to the first of them; with uniform weights 1/n the rule's weighted
sum is then ``start + (Σ clip(Δ_u) + ξ)/m`` exactly, which is all a linear rule reads. A round in which nobody was
sampled still releases ``start + ξ/m`` (a pseudo-upload), as the mechanism requires.

Accounting: Opacus's accountant (RDP by default, or PRV), stepped once per round with noise multiplier z and
sample rate q; ε at δ after every round. ``noise_for_epsilon`` picks z for a target ε over the planned rounds.

The noise comes from a generator seeded by the run's seed and the round (reproducible runs, which a study needs);
a deployment that must not let anyone who knows the seed subtract the noise should seed it from the OS
(``secure_noise=True``).

A run holds its privacy in one :class:`RunPrivacy` (``settle_privacy`` refuses what DP cannot cover and fixes the
noise before any work): the round asks it whether an empty round releases noise, tells it who trained, and reads ε.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.adapters import EXAMPLE_DP_ADAPTERS, adapter_kind  # the kinds whose trait per_example_grads is set
from fedlora.federation.protocol import linear_methods

log = logging.getLogger("fedlora")

Tensors = dict[str, Tensor]
DP_MODES = ("none", "client", "example")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """``mode``: none, client or example. ``clip`` C, ``noise`` multiplier z (standard deviation z·C on the sum), ``delta`` δ,
    ``target_epsilon``: when set, z is chosen for it over the run's rounds (``resolved``). ``accountant``: rdp or prv."""

    mode: str = "none"
    clip: float = 1.0
    noise: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    accountant: str = "rdp"
    secure_noise: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ValueError(f"unknown --dp {self.mode!r}; choose one of {', '.join(DP_MODES)}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown --dp-accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if not (isinstance(self.clip, (int, float)) and self.clip > 0 and math.isfinite(self.clip) or self.clip == math.inf):
            raise ValueError(f"--dp-clip {self.clip} must be positive; pass the L2 bound C on one client's update, e.g. --dp-clip 1.0")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"--dp-noise {self.noise} must be a finite number ≥ 0; pass the noise multiplier z, e.g. --dp-noise 1.0")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"--dp-delta {self.delta} is outside (0, 1); pass e.g. --dp-delta 1e-5 (below 1/number of clients)")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"--dp-target-epsilon {self.target_epsilon} must be a positive number, e.g. 8")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def client_level(self) -> bool:
        return self.mode == "client"

    @property
    def example_level(self) -> bool:
        return self.mode == "example"

    def resolved(self, *, sample_rate: float, rounds: int) -> PrivacyConfig:
        """This config with z chosen for ``target_epsilon`` over ``rounds`` at ``sample_rate`` (unchanged without one)."""
        if self.target_epsilon is None or not self.enabled:
            return self
        from dataclasses import replace

        return replace(self, noise=noise_for_epsilon(self.target_epsilon, self.delta, sample_rate, rounds, self.accountant), target_epsilon=None)


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier z that keeps ``steps`` Poisson-subsampled Gaussian steps within (ε, δ)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_accountant():
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                              accountant=accountant))
    except ValueError as exc:
        raise ValueError(f"no noise multiplier reaches ε = {epsilon} at δ = {delta} over {steps} rounds at sampling rate {sample_rate}: {exc}; "
                         "raise --dp-target-epsilon or --dp-delta") from None


def epsilon_spent(noise: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at δ after ``steps`` rounds of the subsampled Gaussian mechanism (noise multiplier z, rate q), from Opacus's
    accountant. ``inf`` without noise; 0 before the first step."""
    # Constant z and q: one entry covers every round (resume included).
    return _epsilon([(noise, sample_rate, steps)] if steps > 0 else [], delta, accountant)


def _epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε at δ of Opacus's ``accountant`` over ``history`` entries (noise multiplier, sample rate, steps); 0 for none,
    ``inf`` when any entry adds no noise."""
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    # Steps of one (z, q) compose into one entry of their total: the accountant's cost is per entry (about 0.07 s
    # for RDP here), and a ledger of one entry per round made every round's ε cost grow with the rounds so far
    merged: dict[tuple[float, float], int] = {}
    for z, q, steps in history:
        merged[(z, q)] = merged.get((z, q), 0) + int(steps)
    return _accountant_epsilon(tuple(sorted(merged.items())), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _accountant_epsilon(entries: tuple[tuple[tuple[float, float], int], ...], delta: float, accountant: str) -> float:
    # cached: clients with the same ledger (equal shards, or no step since the last round) cost one call per round
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(z, q, steps) for (z, q), steps in entries]
    # our choice: at large δ the RDP/PRV conversion can return ε < 0; (ε, δ)-DP with ε < 0 implies (0, δ)-DP, so 0 is
    # the bound reported (never a negative ε)
    with _quiet_accountant():
        return max(0.0, float(acc.get_epsilon(delta=delta)))


@contextlib.contextmanager
def _quiet_accountant():
    """Opacus's RDP accountant warns on stderr when its best order is the largest or smallest it tries (the bound it
    returns is then valid, only not the tightest), and PRV's numpy warns on log(0) at sampling rate 1: our choice is
    to report that valid ε without the library's warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
        yield


def sample_poisson(n_clients: int, rate: float, seed: int) -> list[int]:
    """Each client independently with probability ``rate`` (the sampling the accountant's amplification assumes)."""
    draws = torch.rand(n_clients, generator=torch.Generator().manual_seed(seed))
    return [i for i in range(n_clients) if float(draws[i]) < rate]


def update_of(upload: Tensors, start: Tensors) -> Tensors:
    """Δ_u: the uploaded trainables minus what the client started from (float64)."""
    return {k: t.double() - start[k].double() for k, t in upload.items() if k in start and t.is_floating_point()}


def l2(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def privatise(uploads: list[Tensors], starts: list[Tensors], cfg: PrivacyConfig, expected: float, seed: int,
              template: Tensors | None = None) -> tuple[list[Tensors], dict]:
    """The uploads a linear rule must see so that its uniform-weighted sum is ``start + (Σ clip(Δ_u) + ξ)/m``
    (module docstring); ``expected`` is m = q·N, ``starts[u]`` what client u started from. With no uploads,
    ``template`` (the upload layout at the current state) carries the noise alone. Returns the uploads and
    diagnostics: each client's update norm before clipping, how many were clipped, the noise's standard deviation
    on the average (z·C/m)."""
    n = len(uploads)
    if n == 0:
        if template is None:
            raise ValueError("a DP round with no participants needs the upload layout (template) to release its noise")
        uploads, starts = [dict(template)], [dict(template)]
    scale = max(n, 1) / expected
    norms, out = [], []
    for up, start in zip(uploads, starts):
        delta = update_of(up, start) if n else {}
        norm = l2(delta)
        norms.append(norm)
        factor = 1.0 if cfg.clip == math.inf or norm <= cfg.clip else cfg.clip / norm
        if factor == 1.0 and scale == 1.0:
            out.append(dict(up))  # nothing to change: bit-for-bit the client's own upload
            continue
        new = dict(up)
        for k, d in delta.items():
            new[k] = (start[k].double() + d * (factor * scale)).to(up[k].dtype)
        out.append(new)
    sigma = cfg.noise * cfg.clip / expected if cfg.clip != math.inf else (math.inf if cfg.noise > 0 else 0.0)
    if cfg.noise > 0:
        if not math.isfinite(sigma):
            raise ValueError("--dp-noise > 0 with an infinite --dp-clip adds infinite noise; pass a finite --dp-clip")
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if cfg.secure_noise else seed)
        first, ref = out[0], starts[0]
        for k in sorted(first):  # a fixed order: the same seed gives the same noise
            if k in ref and first[k].is_floating_point():
                xi = torch.randn(first[k].shape, generator=gen, dtype=torch.float64) * (cfg.noise * cfg.clip)  # on the sum
                first[k] = (first[k].double() + xi.to(first[k].device) * scale).to(first[k].dtype)  # ξ·n/m: ξ/m on the mean
    clipped = sum(1 for x in norms if cfg.clip != math.inf and x > cfg.clip) if n else 0
    return out, {"update_norms": norms if n else [], "clipped": clipped, "noise_std": sigma}


# ---- example-level DP: DP-SGD inside a client's local training (Opacus) -------------------------------------------


def dp_sgd_steps(model, task, train, cfg, seed: int, privacy: PrivacyConfig, loss_term=None, after_step=None, lr_factors=None) -> float:
    """A client's local steps as DP-SGD (Abadi et al. 2016) with Opacus: each step draws a Poisson batch (every example
    with probability q = batch_size/n, the sampling the accountant assumes), Opacus's ``GradSampleModule`` computes the
    per-example gradients of the trainables, its ``DPOptimizer`` clips each to ``privacy.clip`` and adds Gaussian
    noise of standard deviation z·C to their sum before the AdamW step. A step whose batch is empty still adds its
    noise. ``after_step`` and ``lr_factors`` as in ``simulator.train_local`` (post-processing and step sizes: the
    accounting is unchanged). Returns the mean training loss. The caller accounts for (z, q, steps)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedlora.federation.tasks import seed_torch

    seed_torch(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    noise_gen = None if privacy.secure_noise else torch.Generator(device=cfg.device).manual_seed(seed + 1)
    n = len(train)
    rate = example_rate(cfg.batch_size, n)
    params = [p for p in model.parameters() if p.requires_grad]
    gs = GradSampleModule(model, loss_reduction="mean", strict=True)
    quiet = warnings.catch_warnings()  # Opacus's full backward hooks fire on a frozen embedding's outputs: expected here
    quiet.__enter__()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        from fedlora.federation.simulator import local_optimizer

        opt = DPOptimizer(local_optimizer(params, cfg, lr_factors), noise_multiplier=privacy.noise,
                          max_grad_norm=privacy.clip, expected_batch_size=max(1, round(rate * n)), generator=noise_gen,
                          secure_mode=privacy.secure_noise)
        gs.train()
        losses = []
        for _ in range(cfg.local_steps):
            index = torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()
            if len(index) == 0:  # nobody drawn: the step is the noise alone
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            else:
                loss = task.loss(gs, train.batch(index, cfg.device))
                extra = loss_term() if loss_term else None
                if extra is not None:
                    raise ValueError("example-level DP cannot clip a method's extra loss term per example (HetLoRA's regulariser); "
                                     "pass --hetlora-lam 0 or drop --dp example")
                loss.backward()
                losses.append(float(loss.detach()))
            opt.step()
            if after_step:
                after_step()
            opt.zero_grad(set_to_none=True)
    finally:
        gs._close()
        quiet.__exit__(None, None, None)
    return sum(losses) / len(losses) if losses else math.nan


def example_rate(batch_size: int, n: int) -> float:
    """Each example's per-step sampling probability under example-level DP."""
    return min(1.0, batch_size / max(n, 1))


class ClientAccountants:
    """Example-level DP's per-client ledger: each client's (z, q_u, steps) entries, its ε at δ from Opacus."""

    def __init__(self, privacy: PrivacyConfig) -> None:
        self.privacy = privacy
        self.history: dict[int, list[tuple[float, float, int]]] = {}

    def spend(self, cid: int, sample_rate: float, steps: int) -> None:
        self.history.setdefault(cid, []).append((self.privacy.noise, sample_rate, steps))

    def epsilon(self, cid: int) -> float:
        return _epsilon(self.history.get(cid, []), self.privacy.delta, self.privacy.accountant)

    def state(self) -> dict:
        return {str(c): [list(e) for e in v] for c, v in self.history.items()}

    def load(self, state: dict) -> None:
        self.history = {int(c): [tuple(e) for e in v] for c, v in state.items()}


# ---- a run's privacy, as its rounds use it --------------------------------------------------------------------------


@dataclass
class RunPrivacy:
    """A run's differential privacy: the settled config (``settle_privacy``), the client sampling rate q, and under
    example-level DP every client's accountant. The round asks it whether an empty round still releases noise
    (client level), tells it who trained (example level), and reports ε after every round."""

    config: PrivacyConfig
    sample_rate: float
    accountants: ClientAccountants | None = None

    @property
    def client_level(self) -> bool:
        return self.config.client_level

    def spend(self, cids: list[int], rate: Callable[[int], float], steps: int) -> None:
        """Clients ``cids`` trained ``steps`` steps this round (accepted or not): under example-level DP each spent
        privacy at its per-step example sampling rate ``rate(cid)``."""
        if self.accountants is not None:
            for cid in cids:
                self.accountants.spend(cid, rate(cid), steps)

    def metrics(self, rnd: int) -> dict:
        """ε at δ after round ``rnd`` (example level: the largest any client has spent so far, and each client's).
        Without noise (``--dp-noise 0``) no finite ε bounds the run: it is recorded as None (null in metrics.jsonl,
        strict JSON), not as infinity."""
        p = self.config
        if not p.enabled:
            return {}
        if p.example_level:
            per_client = {cid: _finite(self.accountants.epsilon(cid)) for cid in sorted(self.accountants.history)}
            values = list(per_client.values())
            spent = {"epsilon": None if None in values else max(values, default=0.0), "epsilon_per_client": per_client}
        else:
            spent = {"epsilon": _finite(epsilon_spent(p.noise, self.sample_rate, rnd, p.delta, p.accountant))}
        return spent | {"delta": p.delta, "dp_noise_multiplier": p.noise, "dp_clip": p.clip, "dp_accountant": p.accountant}

    def state(self) -> dict:
        return {"dp_accountants": self.accountants.state()} if self.accountants is not None else {}

    def load(self, meta: dict) -> None:
        if self.accountants is not None:
            self.accountants.load(meta.get("dp_accountants", {}))


def check_privacy(p: PrivacyConfig, method, adapter: str, mixed: bool, clients: int) -> None:
    """What DP cannot cover, refused before any data or model is loaded: a method's unprotected setup round, a
    method or adapter the mode cannot clip, mixed ranks under client level, and a δ at or above 1/N (N: the
    clients under client level), which would let the mechanism release one participant's data outright."""
    if not p.enabled:
        return
    if method.needs_setup():
        raise ValueError(f"--dp {p.mode} does not cover {method.name}'s setup round (its uploads are not clipped or noised); "
                         "choose a setup-free option (e.g. --fedsb-init random)")
    if p.example_level:
        if not adapter_kind(adapter).per_example_grads:
            raise ValueError(f"--dp example needs per-example gradients, which Opacus computes for {' and '.join(EXAMPLE_DP_ADAPTERS)} "
                             f"layers but not for {adapter}'s (DoRA's magnitude, VeRA's and HiRA's vectors); pass --adapter lora or rslora")
        if method.has_loss_term():
            raise ValueError(f"--dp example cannot clip {method.name}'s extra loss term per example (HetLoRA's regulariser); "
                             "pass --hetlora-lam 0 or drop --dp example")
        return
    if not method.is_linear():
        raise ValueError(f"--dp client needs a method whose server rule is a weighted sum of the uploads (linear: "
                         f"{', '.join(linear_methods())}); {method.name} needs each client's factors")
    if mixed:
        raise ValueError("--dp client with mixed client ranks is not supported; drop --client-ranks")
    if p.delta >= 1 / clients:
        raise ValueError(f"--dp-delta {p.delta:g} is not below 1/{clients} (1/number of clients): a δ that large allows "
                         f"releasing one client's data outright; pass e.g. --dp-delta 1e-5")


def _finite(epsilon: float) -> float | None:
    return epsilon if math.isfinite(epsilon) else None


def settle_privacy(cfg, method, adapter: str, train_sizes: list[int], mixed: bool):
    """``(cfg, RunPrivacy)`` for a run's ``FederationConfig``: refuse what DP cannot cover and fix the noise for a target
    ε. Client level also replaces the weighting and norm screening (uniform weights bound the sensitivity; the
    clipping bounds every update). ``adapter``: the adapter kind; ``train_sizes``: each client's training examples."""
    p = cfg.privacy
    check_privacy(p, method, adapter, mixed, len(train_sizes))
    if p.enabled and p.noise == 0 and p.target_epsilon is None:
        log.warning("--dp %s with --dp-noise 0 adds no noise: the run has no privacy guarantee and records epsilon as null", p.mode)
    if p.example_level:
        cfg = _settle_example_level(cfg, adapter, train_sizes)
        return cfg, RunPrivacy(cfg.privacy, cfg.fraction, ClientAccountants(cfg.privacy))
    if p.client_level:
        cfg = _settle_client_level(cfg, method, mixed)
    return cfg, RunPrivacy(cfg.privacy, cfg.fraction)


def _settle_example_level(cfg, adapter: str, train_sizes: list[int]):
    privacy = cfg.privacy
    largest = max(train_sizes, default=1)
    if privacy.delta >= 1 / largest:
        raise ValueError(f"--dp-delta {privacy.delta:g} is not below 1/{largest} (1/a client's training examples): a δ that large "
                         "allows releasing one example outright; pass e.g. --dp-delta 1e-5")
    if privacy.target_epsilon is not None:  # the client that samples fastest and joins every round meets it
        rate = max(example_rate(cfg.batch_size, n) for n in train_sizes)
        noise = noise_for_epsilon(privacy.target_epsilon, privacy.delta, rate, cfg.rounds * cfg.local_steps, privacy.accountant)
        privacy = dataclasses.replace(privacy, noise=noise, target_epsilon=None)
    return dataclasses.replace(cfg, privacy=privacy)


def _settle_client_level(cfg, method, mixed: bool):
    if cfg.weighting != "uniform":
        log.warning("--dp client: client weights are uniform (the sensitivity needs bounded weights); --weighting %s is ignored", cfg.weighting)
    privacy = cfg.privacy.resolved(sample_rate=cfg.fraction, rounds=cfg.rounds)
    return dataclasses.replace(cfg, privacy=privacy, weighting="uniform", max_norm_ratio=0.0)
