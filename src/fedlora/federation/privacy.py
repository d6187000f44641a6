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
ACCOUNTANTS = ("rdp", "prv", "flower")
COHORT_SIMULATED = "cohort-simulated"  # the epsilon_kind of a run whose ε is a noise cohort's, not its own


@dataclass(frozen=True)
class PrivacyConfig:
    """``mode``: none, client or example. ``clip`` C, ``noise`` multiplier z (standard deviation z·C on the sum), ``delta`` δ,
    ``target_epsilon``: when set, z is chosen for it over the run's rounds (``resolved``). ``accountant``: rdp or prv
    (Opacus's), or flower (Flower's ``RdpAccountant``, client level only). Client level only: ``noise_cohort`` and
    ``population`` (the noise cohort, :func:`cohort_noise_std`), ``clip_quantile``, ``clip_lr`` and ``clip_count_std``
    (adaptive clipping, :func:`adapt_clip`)."""

    mode: str = "none"
    clip: float = 1.0
    noise: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    accountant: str = "rdp"
    secure_noise: bool = False
    noise_cohort: int | None = None
    population: int | None = None
    clip_quantile: float | None = None
    clip_lr: float = 0.2
    clip_count_std: float | None = None

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
        self._check_cohort()
        self._check_adaptive()
        if self.accountant == "flower" and self.enabled:
            _check_flower_accountant(self.mode)

    def _check_cohort(self) -> None:
        if (self.noise_cohort is None) != (self.population is None):
            raise ValueError("--dp-noise-cohort and --dp-population go together (a cohort of C out of N clients); pass both, "
                             "e.g. --dp-noise-cohort 5000 --dp-population 1000000")
        if self.noise_cohort is None:
            return
        if self.mode != "client":
            raise ValueError(f"--dp-noise-cohort simulates client-level DP's cohort; it needs --dp client (not --dp {self.mode})")
        if not (isinstance(self.noise_cohort, int) and self.noise_cohort >= 1):
            raise ValueError(f"--dp-noise-cohort {self.noise_cohort} must be a whole number of clients ≥ 1, e.g. --dp-noise-cohort 5000")
        if not (isinstance(self.population, int) and self.population >= self.noise_cohort):
            raise ValueError(f"--dp-population {self.population} is smaller than the noise cohort {self.noise_cohort}; "
                             f"pass a population of at least {self.noise_cohort} clients")

    def _check_adaptive(self) -> None:
        if self.clip_quantile is None:
            return
        if self.mode != "client":
            raise ValueError(f"--dp-clip-quantile adapts client-level DP's clip; it needs --dp client (not --dp {self.mode})")
        if not 0.0 < self.clip_quantile < 1.0:
            raise ValueError(f"--dp-clip-quantile {self.clip_quantile} is outside (0, 1); pass the target quantile of the update "
                             "norms, e.g. --dp-clip-quantile 0.5")
        if not (self.clip_lr > 0 and math.isfinite(self.clip_lr)):
            raise ValueError(f"--dp-clip-lr {self.clip_lr} must be a positive number, e.g. --dp-clip-lr 0.2")
        if self.clip_count_std is not None and not (self.clip_count_std > 0 and math.isfinite(self.clip_count_std)):
            raise ValueError(f"--dp-clip-count-std {self.clip_count_std} must be a positive number (the default is the "
                             "cohort's expected size / 20)")
        if self.clip == math.inf:
            raise ValueError("--dp-clip-quantile needs a finite starting --dp-clip, e.g. --dp-clip 1.0")

    @property
    def cohort_simulated(self) -> bool:
        return self.noise_cohort is not None

    @property
    def adaptive(self) -> bool:
        return self.clip_quantile is not None

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

    # our choice: under the flower accountant z is searched with Opacus's RDP (the two agree to 0.5 % for q ≤ 0.1 at
    # ε < 10, test_flower_rdp_accountant_equals_ours_and_opacus); the ε reported is then Flower's
    try:
        with _quiet_accountant():
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                              accountant="rdp" if accountant == "flower" else accountant))
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
    if accountant == "flower":
        return max(0.0, flower_epsilon(entries, delta))
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(z, q, steps) for (z, q), steps in entries]
    # our choice: at large δ the RDP/PRV conversion can return ε < 0; (ε, δ)-DP with ε < 0 implies (0, δ)-DP, so 0 is
    # the bound reported (never a negative ε)
    with _quiet_accountant():
        return max(0.0, float(acc.get_epsilon(delta=delta)))


def _check_flower_accountant(mode: str) -> None:
    """Flower's ``RdpAccountant`` (``flwr.serverapp``, flwr ≥ 1.41) accounts client-level releases of a sampled client
    population and needs Google's ``dp-accounting`` (``pip install "flwr[dp]"``): refused where it cannot answer."""
    if mode != "client":
        raise ValueError(f"--dp-accountant flower accounts client-level releases (Flower's RdpAccountant samples clients); "
                         f"--dp {mode} accounts each client's examples: pass --dp-accountant rdp or prv")
    try:
        import dp_accounting  # noqa: F401
        from flwr.serverapp import RdpAccountant  # noqa: F401
    except ImportError:
        raise ValueError("--dp-accountant flower needs Flower's RdpAccountant and its backend: pip install \"flwr[dp]\" "
                         "(dp-accounting), or pass --dp-accountant rdp") from None


def flower_epsilon(entries: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    """ε at δ from Flower's ``RdpAccountant`` (Poisson sampling, add-or-remove-one neighbours) over ``entries``
    ((z, q), steps). Flower's event states q as sample_size / population_size in whole clients; our choice: q is
    written as the nearest such fraction with a population up to 10⁹ (exact for C/N and fraction·clients)."""
    from fractions import Fraction

    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
    from flwr.serverapp import PrivacyConfig as FlowerPrivacy

    rates = [Fraction(q).limit_denominator(10**9) for (_, q), _ in entries]
    population = math.lcm(*(r.denominator for r in rates))
    absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl.setLevel(logging.ERROR)  # dp-accounting warns of each fractional RDP order it leaves out (the bound stays valid)
    try:
        acc = RdpAccountant(FlowerPrivacy(target_delta=delta, population_size=population, sampling_method=SamplingMethod.POISSON,
                                          neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE))
        for ((z, _), steps), rate in zip(entries, rates):
            acc.compose(GaussianPrivacyEvent(noise_multiplier=float(z), sample_size=int(rate * population), population_size=population),
                        count=int(steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


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


def cohort_noise_std(noise: float, clip: float, divisor: float) -> float:
    """The standard deviation of the noise on the *average* update: z·C/D. Without a noise cohort D = m = q·N (the
    expected participants, DP-FedAvg); with ``--dp-noise-cohort`` D = C_cohort, as Apple's pfl simulates a cohort
    (``PrivacyAccountant.noise_scale`` = cohort / noise cohort, noise std z·C·noise_scale on the sum of the cohort's
    clipped updates, so z·C/C_cohort on their average): the noise a cohort of C_cohort clients would get, while only
    the sampled clients train. It equals Flower's ``compute_stdv(z, C, C_cohort)``."""
    return noise * clip / divisor


def update_noise_multiplier(noise: float, count_std: float | None) -> float:
    """z_Δ, the noise multiplier left for the update when adaptive clipping spends part of the total z on the count
    (Andrew et al. 2021, Thm. 1): z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2). The two Gaussian releases of a round (the update sum,
    sensitivity C, noise z_Δ·C; the centred count, sensitivity ½, noise σ_b) compose in RDP to one Gaussian of
    multiplier z, which the accountant is stepped with. z = 0 stays 0; without adaptive clipping (``count_std``
    None) z_Δ = z. Needs z < 2σ_b (Flower's ``compute_adaptive_noise_params`` refuses the same)."""
    if count_std is None or noise == 0:
        return noise
    if noise >= 2 * count_std:
        raise ValueError(f"--dp-clip-quantile: the noise multiplier z = {noise:g} is not below 2σ_b = {2 * count_std:g} (σ_b: the noise "
                         "on the clip count, by default the cohort's expected size / 20), so nothing is left for the update; "
                         "lower --dp-noise, raise --dp-clip-count-std or simulate a larger --dp-noise-cohort")
    return (noise ** -2 - (2 * count_std) ** -2) ** -0.5


def adapt_clip(clip: float, norms: list[float], quantile: float, lr: float, count_std: float, expected: float,
               divisor: float, gen: torch.Generator) -> tuple[float, float]:
    """One step of Andrew et al.'s adaptive clipping ("Differentially Private Learning with Adaptive Clipping",
    NeurIPS 2021): each participant's bit b_u = 1[‖Δ_u‖ ≤ C]; the server releases the centred count
    Σ(b_u − ½) + ξ_b, ξ_b ~ N(0, σ_b²) (centring makes its add/remove sensitivity ½, the 2σ_b in
    :func:`update_noise_multiplier`), estimates b̄ = (Σ(b_u − ½))/m + ξ_b/D + ½ (m the expected participants,
    D the noise divisor: m, or the noise cohort) and steps the clip geometrically, C ← C·exp(−η_C(b̄ − Q)). Returns
    (new clip, b̄). Our choices: divide by the expected m, as the paper does (Flower divides by the replies received);
    σ_b's default D/20 and η_C = 0.2 are the paper's and Flower's."""
    noised = float(torch.randn((), generator=gen, dtype=torch.float64)) * count_std
    fraction = sum(float(x <= clip) - 0.5 for x in norms) / expected + noised / divisor + 0.5
    return clip * math.exp(-lr * (fraction - quantile)), fraction


def update_of(upload: Tensors, start: Tensors) -> Tensors:
    """Δ_u: the uploaded trainables minus what the client started from (float64)."""
    return {k: t.double() - start[k].double() for k, t in upload.items() if k in start and t.is_floating_point()}


def l2(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def privatise(uploads: list[Tensors], starts: list[Tensors], cfg: PrivacyConfig, expected: float, seed: int,
              template: Tensors | None = None, divisor: float | None = None) -> tuple[list[Tensors], dict]:
    """The uploads a linear rule must see so that its uniform-weighted sum is ``start + (Σ clip(Δ_u) + ξ·m/D)/m``
    (module docstring); ``expected`` is m = q·N, ``starts[u]`` what client u started from, ``divisor`` D the noise
    divisor (m by default; the noise cohort under ``--dp-noise-cohort``, :func:`cohort_noise_std`). With no uploads,
    ``template`` (the upload layout at the current state) carries the noise alone. Returns the uploads and
    diagnostics: each client's update norm before clipping, how many were clipped, the noise's standard deviation
    on the average (z·C/D)."""
    divisor = expected if divisor is None else divisor
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
    sigma = cohort_noise_std(cfg.noise, cfg.clip, divisor) if cfg.clip != math.inf else (math.inf if cfg.noise > 0 else 0.0)
    if cfg.noise > 0:
        if not math.isfinite(sigma):
            raise ValueError("--dp-noise > 0 with an infinite --dp-clip adds infinite noise; pass a finite --dp-clip")
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if cfg.secure_noise else seed)
        first, ref = out[0], starts[0]
        for k in sorted(first):  # a fixed order: the same seed gives the same noise
            if k in ref and first[k].is_floating_point():
                xi = torch.randn(first[k].shape, generator=gen, dtype=torch.float64) * (cfg.noise * cfg.clip * (expected / divisor))  # on the sum: z·C·m/D
                first[k] = (first[k].double() + xi.to(first[k].device) * scale).to(first[k].dtype)  # ξ·n/m: ξ/m = z·C/D on the mean
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
    """A run's differential privacy: the settled config (``settle_privacy``), the accountant's sampling rate q
    (``--fraction``, or C/N under a noise cohort), and under example-level DP every client's accountant. The round
    asks it whether an empty round still releases noise (client level), has it clip and noise the uploads
    (:meth:`release`, which also steps an adaptive clip), tells it who trained (example level), and reads ε after
    every round. ``expected``: m = fraction·clients, the participants a round expects."""

    config: PrivacyConfig
    sample_rate: float
    accountants: ClientAccountants | None = None
    expected: float = 1.0
    clip: float | None = None  # the current clip under adaptive clipping (None: config.clip)
    clip_fraction: float | None = None  # b̄ of the last round (adaptive clipping)

    @property
    def client_level(self) -> bool:
        return self.config.client_level

    @property
    def divisor(self) -> float:
        """D, what the noise on the sum is divided by: the noise cohort, or m (:func:`cohort_noise_std`)."""
        return float(self.config.noise_cohort) if self.config.cohort_simulated else self.expected

    @property
    def count_std(self) -> float | None:
        """σ_b, the noise on the adaptive clip's count (default D/20, Andrew et al. and Flower); None without."""
        p = self.config
        if not p.adaptive:
            return None
        if p.noise == 0:
            return 0.0
        return p.clip_count_std if p.clip_count_std is not None else self.divisor / 20

    @property
    def update_noise(self) -> float:
        """z_Δ: the update's noise multiplier (z itself unless adaptive clipping spends part of it)."""
        return update_noise_multiplier(self.config.noise, self.count_std)

    def release(self, uploads: list[Tensors], starts: list[Tensors], seed: int, template: Tensors | None) -> tuple[list[Tensors], dict]:
        """Client-level DP's round: clip at the current clip and noise with z_Δ on divisor D (:func:`privatise`), then
        under adaptive clipping step the clip from the update norms (:func:`adapt_clip`, its own noise stream)."""
        clip = self.config.clip if self.clip is None else self.clip
        cfg = dataclasses.replace(self.config, clip=clip, noise=self.update_noise)
        out, diag = privatise(uploads, starts, cfg, self.expected, seed, template, divisor=self.divisor)
        notes = {"dp_clipped": diag["clipped"], "dp_noise_std": diag["noise_std"]}
        if self.config.adaptive:
            gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if cfg.secure_noise else seed + 1)
            self.clip, self.clip_fraction = adapt_clip(clip, diag["update_norms"], self.config.clip_quantile, self.config.clip_lr,
                                                       self.count_std, self.expected, self.divisor, gen)
            notes |= {"dp_clip_used": clip, "dp_clip_fraction": self.clip_fraction}
        return out, notes

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
            if p.cohort_simulated:  # never the small run's own guarantee: the ε a C-of-N cohort would spend
                spent |= {"epsilon_kind": COHORT_SIMULATED, "dp_noise_cohort": p.noise_cohort, "dp_population": p.population}
            if p.adaptive:
                spent |= {"dp_update_noise_multiplier": self.update_noise, "dp_clip_count_std": self.count_std}
        clip = p.clip if self.clip is None else self.clip
        return spent | {"delta": p.delta, "dp_noise_multiplier": p.noise, "dp_clip": clip, "dp_accountant": p.accountant}

    def state(self) -> dict:
        out = {"dp_accountants": self.accountants.state()} if self.accountants is not None else {}
        return out | ({"dp_clip_state": self.clip} if self.clip is not None else {})

    def load(self, meta: dict) -> None:
        if self.accountants is not None:
            self.accountants.load(meta.get("dp_accountants", {}))
        if meta.get("dp_clip_state") is not None:
            self.clip = float(meta["dp_clip_state"])


def check_privacy(p: PrivacyConfig, method, adapter: str, mixed: bool, clients: int, fraction: float = 1.0) -> None:
    """What DP cannot cover, refused before any data or model is loaded: a method's unprotected setup round, a
    method or adapter the mode cannot clip, mixed ranks under client level, a noise cohort smaller than the clients a
    round samples (m = fraction·clients), and a δ at or above 1/N (N: the clients under client level, the population
    under a noise cohort), which would let the mechanism release one participant's data outright."""
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
    if p.cohort_simulated:
        if p.noise_cohort < fraction * clients:
            raise ValueError(f"--dp-noise-cohort {p.noise_cohort} is smaller than the {fraction * clients:g} clients a round samples "
                             f"(--fraction {fraction:g} × --clients {clients}); pass a cohort of at least {math.ceil(fraction * clients)}")
    if p.adaptive and p.target_epsilon is None:  # z < 2σ_b (a target's z is checked once chosen, settle_privacy)
        divisor = p.noise_cohort if p.cohort_simulated else fraction * clients
        update_noise_multiplier(p.noise, None if p.noise == 0 else (p.clip_count_std or divisor / 20))
    if p.cohort_simulated:
        clients = p.population
    if p.delta >= 1 / clients:
        who = "1/--dp-population" if p.cohort_simulated else "1/number of clients"
        suggestion = "1e-5" if clients < 10_000 else f"{0.1 / clients:.0e}"
        raise ValueError(f"--dp-delta {p.delta:g} is not below 1/{clients} ({who}): a δ that large allows "
                         f"releasing one client's data outright; pass e.g. --dp-delta {suggestion}")


def _finite(epsilon: float) -> float | None:
    return epsilon if math.isfinite(epsilon) else None


def settle_privacy(cfg, method, adapter: str, train_sizes: list[int], mixed: bool):
    """``(cfg, RunPrivacy)`` for a run's ``FederationConfig``: refuse what DP cannot cover and fix the noise for a target
    ε. Client level also replaces the weighting and norm screening (uniform weights bound the sensitivity; the
    clipping bounds every update). ``adapter``: the adapter kind; ``train_sizes``: each client's training examples."""
    p = cfg.privacy
    check_privacy(p, method, adapter, mixed, len(train_sizes), cfg.fraction)
    if p.enabled and p.noise == 0 and p.target_epsilon is None:
        log.warning("--dp %s with --dp-noise 0 adds no noise: the run has no privacy guarantee and records epsilon as null", p.mode)
    if p.example_level:
        cfg = _settle_example_level(cfg, adapter, train_sizes)
        return cfg, RunPrivacy(cfg.privacy, cfg.fraction, ClientAccountants(cfg.privacy))
    if not p.client_level:
        return cfg, RunPrivacy(cfg.privacy, cfg.fraction)
    rate = p.noise_cohort / p.population if p.cohort_simulated else cfg.fraction
    cfg = _settle_client_level(cfg, rate)
    run = RunPrivacy(cfg.privacy, rate, expected=cfg.fraction * len(train_sizes))
    run.update_noise  # noqa: B018 - refuses a z that leaves adaptive clipping nothing for the update, before any work
    if cfg.privacy.cohort_simulated:
        log.warning("--dp-noise-cohort: the noise is calibrated for %d of %d clients a round; the ε reported is that cohort's "
                    "(cohort-simulated), not a guarantee for this %d-client run", cfg.privacy.noise_cohort, cfg.privacy.population,
                    len(train_sizes))
    return cfg, run


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


def _settle_client_level(cfg, rate: float):
    if cfg.weighting != "uniform":
        log.warning("--dp client: client weights are uniform (the sensitivity needs bounded weights); --weighting %s is ignored", cfg.weighting)
    privacy = cfg.privacy.resolved(sample_rate=rate, rounds=cfg.rounds)
    return dataclasses.replace(cfg, privacy=privacy, weighting="uniform", max_norm_ratio=0.0)
