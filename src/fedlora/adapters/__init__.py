"""PEFT wrapping and the per-client view of a model's trainable tensors.

This layer turns a PEFT model into plain ``dict[str, Tensor]`` (what a client trains, uploads and keeps) and the
factor pairs ``(B, A)`` that :mod:`fedlora.aggregation` combines. It may import :mod:`fedlora.aggregation`, torch
and PEFT; it must not import :mod:`fedlora.federation`, any front end, or any one method's aggregation rule
(``fedlora.aggregation.fedsb`` etc.: a method's math is the method's). Everything that depends on the adapter kind
(LoRA, rsLoRA, DoRA, VeRA, HiRA) is on its object in :mod:`fedlora.adapters.kinds`, ``ADAPTERS[name]``.
"""

from fedlora.adapters.handle import AdapterHandle
from fedlora.adapters.kinds import ADAPTERS, EXAMPLE_DP_ADAPTERS, MIXED_RANK_ADAPTERS, AdapterKind, adapter_kind, combine_vectors
from fedlora.adapters.spec import AdapterSpec

__all__ = ["ADAPTERS", "EXAMPLE_DP_ADAPTERS", "MIXED_RANK_ADAPTERS", "AdapterHandle", "AdapterKind", "AdapterSpec", "adapter_kind",
           "combine_vectors"]
