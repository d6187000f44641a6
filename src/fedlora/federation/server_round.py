"""The server half of a round, in the steps the simulator and the Flower strategy share.

Screening splits the round's results into accepted and rejected. Then one of three ways in says what the server's
rule is given, each as the same :class:`RoundInputs` (inputs, weights, peers): the accepted uploads
(:func:`plain_inputs`), the clipped and noised uploads of client-level DP (:func:`client_dp_inputs`), or the one
weighted mean SecAgg+ revealed (:func:`secure_inputs`). :func:`aggregate_step` runs the method's rule on it, the
one aggregation step of every mode, and measures the result against the inputs where they are per client: the
aggregation divergence ρ, the Eckart–Young bound, FedIT's ρ on the same uploads, and (optionally) the clients'
pairwise similarity.

Must not import the simulator (it imports this).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedlora.adapters import AdapterHandle
from fedlora.aggregation import aggregate, divergence, eckart_young_bound
from fedlora.federation.privacy import RunPrivacy
from fedlora.federation.protocol import Method, Peer, RoundContext, ServerUpdate, Tensors
from fedlora.federation.screening import Rejection, check_structure, norm_outliers, schema, update_norm


@dataclass
class ClientResult:
    """What one client's turn produced: its upload (protocol bytes), eval-only extras, private state, scores."""

    cid: int
    upload: Tensors
    extras: Tensors
    private: Tensors
    n_train: int
    n_test: int
    local_accuracy: float
    train_loss: float
    # The round the client trained for, when it is not the one the server closes (asynchronous aggregation: a stale
    # client's round is its version's, v_u + 1): its upload's layout is that round's (Fed-HeLLo's blocks).
    trained_round: int | None = None


@dataclass
class SecureSum:
    """What the server learns in a securely aggregated round: the weighted mean of the accepted clients' uploads and
    eval extras (one tensor dict). The protocol's bytes go to the run's :class:`~fedlora.federation.traffic.Traffic`."""

    mean: Tensors


@dataclass
class RoundInputs:
    """What the server's rule is given in one round, however the round got there: ``inputs[u]`` with weight
    ``weights[u]`` from ``peers[u]``. ``individual``: the inputs are the clients' own (False for a secure sum), so
    per-client measures exist. ``notes``: what the way in reports in the metrics line."""

    inputs: list[Tensors]
    weights: Tensor
    peers: list[Peer]
    individual: bool = True
    notes: dict = field(default_factory=dict)
    # The round each input trained for, where some is not the round the server closes (asynchronous: a stale upload's
    # ``ClientResult.trained_round``; None entries: the closing round); None: all the closing round's.
    rounds: list[int | None] | None = None


def client_weights(sizes: list[int], weighting: str) -> Tensor:
    w = torch.ones(len(sizes), dtype=torch.float64) if weighting == "uniform" else torch.tensor(sizes, dtype=torch.float64)
    return w / w.sum()


# ---- the three ways in ------------------------------------------------------------------------------------------
def plain_inputs(accepted: list[ClientResult], peers: list[Peer], weighting: str) -> RoundInputs:
    """The accepted clients' uploads (with their eval extras), weighted over the accepted clients only."""
    rounds = [r.trained_round for r in accepted]
    return RoundInputs([r.upload | r.extras for r in accepted], client_weights([r.n_train for r in accepted], weighting), peers,
                       rounds=rounds if any(t is not None for t in rounds) else None)


def client_dp_inputs(accepted: list[ClientResult], starts: list[Tensors], privacy: RunPrivacy, seed: int,
                     template: Tensors | None, peers: list[Peer]) -> RoundInputs:
    """Client-level DP (privacy.py): the uploads whose uniform-weighted sum is ``start + (Σ clip(Δ_u) + ξ)/m``
    (m = q·N; the noise as for a noise cohort where one is simulated, the clip adapted where asked:
    :meth:`RunPrivacy.release`). With nobody accepted, ``template`` (the upload layout) carries the noise alone and
    ``peers`` is the server's own."""
    uploads, notes = privacy.release([r.upload for r in accepted], starts, seed, template)
    inputs = [u | r.extras for u, r in zip(uploads, accepted)] if accepted else uploads
    return RoundInputs(inputs, client_weights([1] * len(inputs), "uniform"), peers, notes=notes)


def secure_inputs(secure: SecureSum, peers: list[Peer]) -> RoundInputs:
    """One input, the weighted mean: a linear rule gives the same update from it as from the uploads."""
    return RoundInputs([secure.mean], client_weights([1], "uniform"), peers[:1], individual=False, notes={"secure_aggregation": True})


# ---- the one aggregation step -----------------------------------------------------------------------------------
@dataclass
class Measures:
    """How one round's aggregation compares with its inputs (None where the inputs are not per client)."""

    rho: dict[str, float] | None = None
    rho_min: dict[str, float] | None = None
    rho_fedit: dict[str, float] | None = None
    similarity: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)  # the method's own diagnostics (ServerUpdate.notes)

    def divergence(self) -> dict:
        return {"divergence": _mean(self.rho), "divergence_per_layer": self.rho, "bound": _mean(self.rho_min),
                "bound_per_layer": self.rho_min, "fedit_divergence": _mean(self.rho_fedit), "fedit_divergence_per_layer": self.rho_fedit}


def aggregate_step(h: AdapterHandle, method: Method, step: RoundInputs, current: Tensors, ctx: RoundContext, *, bound: bool,
                   similarity: bool) -> tuple[ServerUpdate, Measures]:
    """The method's rule on the round's inputs (timed), measured against them where they are the clients' own."""
    started = time.perf_counter()
    update = method.aggregate(h, step.inputs, step.weights, current, ctx)
    measures = Measures(seconds=time.perf_counter() - started, notes=dict(update.notes))
    if step.individual:
        measures.rho, measures.rho_min, measures.rho_fedit = layer_metrics(h, step.inputs, step.weights, current, update, bound)
        if similarity:
            measures.similarity = similarity_metrics(h, method, step.inputs, current)
    return update, measures


def _number(x: float) -> float | None:
    """A finite score as a float, else None (strict JSON in metrics.jsonl holds no NaN)."""
    return float(x) if math.isfinite(x) else None


def local_scores(accepted: list[ClientResult]) -> dict[str, float | dict]:
    """The accepted clients' mean training loss and their example-weighted accuracy on their own test shards, and
    each one's own (``client_metrics``: client id → local accuracy, None without local test examples, training loss,
    train and test examples), which trackers log under the client's name."""
    n_local = sum(r.n_test for r in accepted)
    own = {r.cid: {"local_accuracy": _number(r.local_accuracy) if r.n_test else None, "train_loss": _number(r.train_loss),
                   "train_examples": r.n_train, "test_examples": r.n_test} for r in accepted}
    return {"train_loss": sum(r.train_loss for r in accepted) / len(accepted) if accepted else math.nan,
            "local_accuracy": sum(r.local_accuracy * r.n_test for r in accepted if r.n_test) / n_local if n_local else math.nan,
            "client_metrics": own}


def screen(h: AdapterHandle, method: Method, results: list[ClientResult], held: Callable[[int], Tensors], max_norm_ratio: float,
           rnd: int, peer: Callable[[int], Peer] | None = None) -> tuple[list[ClientResult], list[Rejection]]:
    """Split the round's results into accepted and rejected (structure, dtype, NaN/Inf, norm outliers). Each client
    is checked against what it started from (``held(cid)``: its own rank under mixed ranks) and the layout its
    upload has (``peer(cid)``: Fed-HeLLo's clients upload their own blocks). An accepted result carries its upload as
    the server reads it (``Method.receive``); the bytes were counted from what it sent."""
    accepted, rejected, norms = [], [], []
    for r in results:
        start = held(r.cid)
        who = None if peer is None else peer(r.cid)
        trained = rnd if r.trained_round is None else r.trained_round
        layout = method.upload(h, start, trained, peer=who)
        try:  # the upload as the server reads it (Method.receive: LoRA-A² decodes its selected columns)
            upload = r.upload if who is None else method.receive(h, r.upload, start, trained, who)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            rejected.append(Rejection(r.cid, f"client {r.cid}'s upload cannot be read: {exc}"))
            continue
        reason = (check_structure(r.cid, upload, schema(layout), "upload")
                  or check_structure(r.cid, r.extras, schema(method.eval_extras(h, start)), "evaluation tensors"))
        if reason:
            rejected.append(Rejection(r.cid, reason))
        else:
            r = r if upload is r.upload else replace(r, upload=upload)
            accepted.append(r)
            norms.append(update_norm(r.upload, start))
    outliers = norm_outliers([r.cid for r in accepted], norms, max_norm_ratio)
    bad = {o.cid for o in outliers}
    return [r for r in accepted if r.cid not in bad], rejected + outliers


# ---- measures -----------------------------------------------------------------------------------------------------
def layer_metrics(h: AdapterHandle, inputs: list[Tensors], weights: Tensor, current: Tensors, update: ServerUpdate, bound: bool):
    """Per adapted module: the aggregation divergence ρ, and (``bound``) the Eckart–Young bound and FedIT's ρ on
    the same uploads, the two references any method's ρ is read against within one run. Under mixed ranks all
    three are in the scaled product space (ΔW* = Σ w_u s_u B_u A_u; FedIT with segment averaging; the bound at
    the largest rank).

    For FedSA (personalised) ΔŴ is what the global model is scored with: Â and the clients' mean B, so ρ measures
    how far that stand-in is from ΔW*; modules whose B no client reported give no entry. A factor no client sent
    because it was frozen (FFA's A, RoLoRA's other factor) is the shared start every client trained against.
    """
    views = [h.factors(t) for t in inputs]
    B0, A0 = h.factors(current)  # a factor not sent this round (frozen) is the shared start
    rho, rho_min, rho_fedit = {}, {}, {}
    for module, layer in update.layers.items():
        if layer.B is None and layer.eval_B is None:  # FedSA with no client's B to score: nothing to measure
            continue
        Bs = [v[0].get(module, B0[module]) for v in views]
        As = [v[1].get(module, A0[module]) for v in views]
        rho[module] = float(divergence(Bs, As, weights, layer, scales=update.scales))
        if bound:
            rho_min[module] = float(eckart_young_bound(Bs, As, weights, scales=update.scales))
            fedit = aggregate("fedit", Bs, As, weights, scales=update.scales)
            rho_fedit[module] = float(divergence(Bs, As, weights, fedit, scales=update.scales))
    return (rho or None), (rho_min or None), (rho_fedit or None)


def mean_pairwise_cosine(tensors: list[Tensor]) -> float | None:
    """Mean over client pairs u < v of cos(X_u, X_v), the tensors flattened (None below two clients).

    A zero tensor has no direction; its pairs count as 0. O(U²·size) through one Gram matrix.
    """
    if len(tensors) < 2:
        return None
    shape = [max(t.shape[i] for t in tensors) for i in range(tensors[0].dim())]  # mixed ranks: zero-padded
    X = torch.stack([_padded(t.detach().to(torch.float64), shape).reshape(-1) for t in tensors])
    norms = X.norm(dim=1)
    X = X / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    G = X @ X.T
    U = len(tensors)
    return float((G.sum() - G.diagonal().sum()) / (U * (U - 1)))


def _padded(t: Tensor, shape: list[int]) -> Tensor:
    if list(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def similarity_metrics(h: AdapterHandle, method: Method, inputs: list[Tensors], current: Tensors) -> dict[str, dict[str, float] | None]:
    """Mean pairwise cosine similarity across the round's clients, per adapted module, of the factors they hold
    after local training (``A``, ``B``; FedSA-LoRA's Figure 2) and of their local updates relative to the round's
    broadcast (``dA``, ``dB``: the factor minus the start every client shared, which removes the common
    initialisation). A factor a client does not train (FFA's frozen A) is identical across clients (cos 1, no
    update); a private factor (FedSA's B) has no common start, so its update similarity is not defined."""
    views = [h.factors(t) for t in inputs]
    B0, A0 = h.factors(current)
    private = set(method.private(h))
    out: dict[str, dict[str, float] | None] = {}
    for kind, idx, start in (("B", 0, B0), ("A", 1, A0)):
        fac, upd = {}, {}
        for module in h.keys:
            tensors = [v[idx].get(module, start.get(module)) for v in views]
            if any(t is None for t in tensors):
                continue
            fac[module] = mean_pairwise_cosine(tensors)
            name = getattr(h.keys[module], kind)
            if name in private or module not in start or not any(name in t for t in inputs):
                continue  # no common start (private) or never trained (frozen): no update to compare
            upd[module] = mean_pairwise_cosine([t - _cut(start[module], t) for t in tensors])
        out[f"similarity_{kind}_per_layer"] = {k: v for k, v in fac.items() if v is not None} or None
        out[f"similarity_d{kind}_per_layer"] = {k: v for k, v in upd.items() if v is not None} or None
    for kind in ("A", "B", "dA", "dB"):
        out[f"similarity_{kind}"] = _mean(out[f"similarity_{kind}_per_layer"])
    return out


def _cut(start: Tensor, t: Tensor) -> Tensor:
    """The common start cut to a client's shape (mixed ranks: its first r_u components, before its rescale)."""
    return start[tuple(slice(0, n) for n in t.shape)] if start.shape != t.shape else start


def _mean(values: dict[str, float] | None) -> float | None:
    return None if not values else sum(values.values()) / len(values)


def finish_metrics(metrics: dict, global_accuracy: float, wall_seconds: float) -> dict:
    """Add the global score, the local–global gap and the wall time, in the order metrics.jsonl shows them."""
    out = {k: metrics[k] for k in ("round", "method", "clients", "train_loss")}
    out |= {"global_accuracy": global_accuracy, "local_accuracy": metrics["local_accuracy"],
            "local_global_gap": metrics["local_accuracy"] - global_accuracy}
    out |= {k: v for k, v in metrics.items() if k not in out}
    out["wall_seconds"] = wall_seconds
    return out
