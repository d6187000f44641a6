"""Secure aggregation on Flower: a fedlora round whose uploads reach the server only as their weighted sum (SecAgg+).

Flower's SecAgg+ (Bell et al., CCS 2020) lives in its legacy workflow API: :class:`SecAggPlusWorkflow` drives a
``LegacyContext`` strategy over four stages of train messages (setup, share keys, collect masked vectors, unmask),
and the ClientApp's ``secaggplus_mod`` answers three of them itself and masks the legacy fit reply of the fourth.
This module drives one fedlora round through it:

* :class:`_Round` is the legacy strategy the workflow asks: it names the round's sampled SuperNodes and receives
  the unmasked result. Every client's fit message carries fedlora's own train records (the round, the broadcasts
  it has not applied, its last accepted round) beside the workflow's, merged in by :class:`_Workflow`.
* Each client uploads ``[w, w·x]`` with ``w`` its weight (training examples, or 1 under uniform weighting) and
  ``x`` its upload (``Method.secure_upload``: LoRA-A²'s dense) and eval extras flattened in a fixed order; the server learns ``Σ w·x / Σ w``, the weighted
  mean the simulator's linear rule computes from the individual uploads, and nothing per client but its scores
  (local accuracy, train loss, example counts, which travel in the clear).
* Precision: every value is clipped to ``±secagg-clip`` and stochastically quantised in 2^22 steps, so one client's
  contribution is off by less than Δ = 2·clip / 2^22 and the mean by less than Δ·U / Σ_u (w_u / w_max) (U clients).
  ``max_weight`` is the largest client weight, so each ratio is at most 1 (and the bound at most Δ·U/Σ ratio).
* Neighbourhoods: :func:`neighbourhood` (every client up to 9, then 2⌈log2 U⌉ + 1 neighbours; a majority of a
  client's shares reconstructs its keys).
* Dropouts: a SuperNode that fails after the key exchange is unmasked from its neighbours' shares and left out of
  the sum; too few survivors end the round with no update, as a round with no accepted client.
* Bytes: every SecAgg+ message is counted at its serialised size (keys, encrypted shares, masked vectors: up; the
  stage configurations and forwarded shares: down), plus the broadcasts as in a plain round.
"""

from __future__ import annotations

import math
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.serde import recorddict_to_proto
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log

from fedlora.federation.screening import Rejection
from fedlora.federation.simulator import ClientResult, SecureSum

QUANTIZATION_RANGE = 1 << 22  # Flower's default: values are quantised in 2^22 steps over [-clip, clip]
MODULUS_RANGE = 1 << 32


def layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """The fixed order in which a client flattens its upload and extras, and the server unflattens their mean."""
    return [(name, tuple(tensors[name].shape)) for name in sorted(tensors)]


def flatten(tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [tensors[name].detach().to("cpu", torch.float64).numpy() for name, _ in layout(tensors)]


def unflatten(arrays: list[np.ndarray], names: list[tuple[str, tuple[int, ...]]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if len(arrays) != len(names):
        raise ValueError(f"the secure sum holds {len(arrays)} arrays, the upload layout {len(names)}")
    out = {}
    for arr, (name, shape) in zip(arrays, names):
        ref = like[name]
        out[name] = torch.as_tensor(np.asarray(arr).reshape(shape)).to(ref.device, ref.dtype)
    return out


def neighbourhood(u: int) -> tuple[int | float, int | float]:
    """(num_shares, reconstruction_threshold) for U clients in a round. SecAgg+ masks each client against its
    neighbours in a random graph; degree O(log U) keeps its privacy and dropout guarantees (Bell et al., 2020) and
    its cost O(U log U) instead of SecAgg's O(U²). Up to 9 clients: all of them (Flower's 1.0); above: the odd number
    2⌈log2 U⌉ + 1. Threshold: a majority of the shares, so no minority of a client's neighbours can unmask it."""
    if u <= 9:
        return 1.0, 0.5
    k = 2 * math.ceil(math.log2(u)) + 1
    return k, k // 2 + 1


def error_bound(clip: float, ratios: list[float]) -> float:
    """Largest error of one value of the securely aggregated mean (module docstring): Δ·U / Σ ratio."""
    delta = 2 * clip / QUANTIZATION_RANGE
    return delta * len(ratios) / sum(ratios)


class _CountingGrid:
    """The run's Grid, counting the serialised bytes of every message each way."""

    def __init__(self, grid: Grid):
        self.grid, self.up, self.down = grid, 0, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(recorddict_to_proto(m.content).ByteSize() for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(recorddict_to_proto(r.content).ByteSize() for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


class _Round(Strategy):
    """The legacy strategy SecAgg+ drives for one round: who trains, and what came back."""

    def __init__(self, proxies: list[GridClientProxy]):
        self.proxies, self.results, self.failures = proxies, None, []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, list(failures)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose fit messages also carry fedlora's train records for each SuperNode."""

    def __init__(self, records: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.records = records

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        for nid, content in state.nid_to_fitins.items():  # sent in the collect-masked-vectors stage
            for name, record in self.records[nid].items():
                content[name] = record
        return ok


def secure_round(strategy, grid: Grid, rnd: int, started: float, *, timeout: float | None) -> dict:
    """One round of ``strategy`` (a :class:`~fedlora.flower.strategy.FedLoRAStrategy`) under SecAgg+; returns its
    metrics, as :meth:`FedLoRAStrategy.aggregate_train` does for a plain round."""
    sim = strategy.sim
    cfg = sim.config
    messages = strategy.configure_train(rnd)
    by_node = {m.metadata.dst_node_id: m.content for m in messages}
    cid_of = {node: cid for cid, node in strategy.nodes.items()}
    counting = _CountingGrid(grid)
    proxies = [GridClientProxy(node, counting, grid.run.run_id) for node in by_node]
    shim = _Round(proxies)
    weights = {cid: (len(sim.clients[cid].train) if cfg.weighting == "examples" else 1) for cid in strategy.sampled}
    max_weight = float(max(weights.values())) if weights else 1.0
    failed: list[Rejection] = []
    if len(proxies) >= 2:
        shares, threshold = neighbourhood(len(proxies))
        workflow = _Workflow(
            {node: content for node, content in by_node.items()},
            num_shares=shares, reconstruction_threshold=threshold, max_weight=max_weight, clipping_range=float(strategy.exp.config.secagg_clip),
            quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout,
        )
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}), MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(_server_context(grid, state), strategy=shim, client_manager=SimpleClientManager())
        workflow(counting, context)
    else:
        failed = [Rejection(cid, f"client {cid}: secure aggregation needs at least 2 clients in a round, {len(proxies)} sampled")
                  for cid in strategy.sampled]
    results: list[ClientResult] = []
    secure = None
    if shim.results:
        for proxy, fitres in shim.results:
            cid = cid_of.get(proxy.node_id, -1)
            m = fitres.metrics
            results.append(ClientResult(cid=cid, upload={}, extras={}, private={}, n_train=int(m["n-train"]), n_test=int(m["n-test"]),
                                        local_accuracy=float(m["local-accuracy"]), train_loss=float(m["train-loss"])))
        h, method = sim.handle, sim.method
        start = sim.held[results[0].cid]
        like = method.secure_upload(h, method.upload(h, start, rnd), None, rnd) | method.eval_extras(h, start)
        mean = unflatten(parameters_to_ndarrays(shim.results[0][1].parameters), layout(like), like)
        sim.traffic.record_protocol(counting.up, counting.down)
        secure = SecureSum(mean)
    answered = {r.cid for r in results}
    strategy.noted_silence(answered)  # left out of the sum: perhaps dead (a newcomer for its partition may take over)
    reasons = "; ".join(str(f) for f in shim.failures) if shim.failures else "secure aggregation ended before the unmask stage"
    failed += [Rejection(cid, f"client {cid} is not in round {rnd}'s secure sum ({reasons})")
               for cid in strategy.sampled if cid not in answered and cid not in {f.cid for f in failed}]
    if failed:
        log(WARNING, "round %s: %s client(s) left out of the secure sum", rnd, len(failed))
    return strategy.close(rnd, sorted(results, key=lambda r: r.cid), failed, started, secure)


def _server_context(grid: Grid, state: RecordDict) -> Context:
    return Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={})


def reply_arrays(upload: dict[str, torch.Tensor], extras: dict[str, torch.Tensor], clip: float, cid: int) -> list[np.ndarray]:
    """A client's flattened ``upload | extras`` for SecAgg+, refused in one line when a value lies outside the range
    SecAgg+ quantises (it would be clipped silently and the mean would be wrong)."""
    tensors = upload | extras
    arrays = flatten(tensors)
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if not np.isfinite(peak) or peak > clip:
        raise ValueError(f"client {cid}: an uploaded value of magnitude {peak:.3g} is outside SecAgg+'s range ±{clip:g}; "
                         "raise secagg-clip in the run config (each doubling halves the precision)")
    return arrays

