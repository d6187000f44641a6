"""The federation round: client sampling, local training, private per-client state, applying broadcasts
(including base-weight folding), metrics; and the method protocol with its registry. May import
:mod:`fedlora.adapters`, :mod:`fedlora.aggregation` and :mod:`fedlora.generation`; must not import the front ends
(CLI, experiments, data and model loading, Flower, reports)."""

from fedlora.federation.causal_lm import CausalLMSplit, CausalLMTask
from fedlora.federation.privacy import PrivacyConfig
from fedlora.federation.protocol import (
    REGISTRY,
    Method,
    Option,
    Peer,
    RoundContext,
    ServerUpdate,
    make_method,
    method_class,
    method_names,
    parse_method_options,
    register,
)
from fedlora.federation.simulator import FederationConfig, SimClient, Simulator, nbytes
from fedlora.federation.tasks import ClassificationTask, TokenizedSplit

__all__ = [
    "Method", "Option", "Peer", "REGISTRY", "RoundContext", "ServerUpdate", "make_method", "method_class",
    "method_names", "parse_method_options", "register",
    "FederationConfig", "PrivacyConfig", "SimClient", "Simulator", "nbytes",
    "ClassificationTask", "TokenizedSplit", "CausalLMTask", "CausalLMSplit",
]

# After every name above exists: the built-in methods register themselves, then installed plug-ins (which import
# this package) do.
from fedlora.federation import methods  # noqa: E402, F401, I001  # isort: skip
from fedlora.federation.protocol import load_plugins  # noqa: E402  # isort: skip

load_plugins()
