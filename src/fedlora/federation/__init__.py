"""The federation round: client sampling, local training, private per-client state, applying broadcasts
(including base-weight folding), metrics. May import :mod:`fedlora.adapters` and :mod:`fedlora.aggregation`;
must not import the front ends (CLI, data and model loading, Flower, reports)."""

from fedlora.federation.causal_lm import CausalLMSplit, CausalLMTask
from fedlora.federation.methods import METHOD_CLASSES, Method, ServerUpdate, make_method
from fedlora.federation.simulator import FederationConfig, SimClient, Simulator, nbytes
from fedlora.federation.tasks import ClassificationTask, TokenizedSplit

__all__ = [
    "METHOD_CLASSES", "Method", "ServerUpdate", "make_method",
    "FederationConfig", "SimClient", "Simulator", "nbytes",
    "ClassificationTask", "TokenizedSplit", "CausalLMTask", "CausalLMSplit",
]
