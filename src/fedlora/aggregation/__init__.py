"""Server-side aggregation of LoRA-family factors: pure tensor math, one file per method.

``aggregate(method, Bs, As, weights, *, scales=None)`` combines one adapted matrix's client factors (``Bs[u]``
d×r_u, ``As[u]`` r_u×k, ``weights`` summing to 1) into an ``Aggregate``; ``aggregate_model`` does it for every
adapted module of a model's uploads (``dict[str, Tensor]`` keyed by module name) and averages the non-LoRA
trainables. ``divergence`` and ``eckart_young_bound`` measure a result against the ideal update
``ΔW* = Σ w_u s_u B_u A_u``; ``comm_bytes`` counts what each method sends. Each rule's file registers it
(``register_rule``) with what it declares; ``METHODS`` lists the registered names. DESIGN.md and METHODS.md
define every method.

This layer holds no nn.Module and does no I/O; it imports only torch and must not import the adapters,
federation or front-end layers.
"""

from __future__ import annotations

# The rule modules register themselves on import; the order here is the order of METHODS.
from . import fedit, ffa, fedsa, flora, fedex, florana, svd, flexlora, hetlora, rolora, fedsvd, lorafair, fedrot, fedmomentum, frlora, fedsb, ravan  # noqa: F401  # isort: skip
from . import florist, fslora, fedhello, fedlease, hilora, ilora, loraa2, slora  # noqa: F401  # isort: skip
from ._common import block_diagonal
from .comm import CommBytes, comm_bytes, comm_elements, model_comm_bytes
from .metrics import divergence, eckart_young_bound
from .model import ModelAggregate, aggregate_model
from .registry import METHODS, RULES, Rule, aggregate, get_rule, method_options, mixed_rank_rules, register_rule
from .result import Aggregate
from .server_opt import SERVER_OPTIMIZERS, ServerOptRule

__all__ = [
    "METHODS",
    "RULES",
    "SERVER_OPTIMIZERS",
    "ServerOptRule",
    "Aggregate",
    "CommBytes",
    "ModelAggregate",
    "Rule",
    "aggregate",
    "aggregate_model",
    "block_diagonal",
    "comm_bytes",
    "comm_elements",
    "divergence",
    "eckart_young_bound",
    "get_rule",
    "method_options",
    "mixed_rank_rules",
    "model_comm_bytes",
    "register_rule",
]
