"""PEFT wrapping and the per-client view of a model's trainable tensors.

This layer turns a PEFT model into plain ``dict[str, Tensor]`` (what a client trains, uploads and keeps) and the
factor pairs ``(B, A)`` that :mod:`fedlora.aggregation` combines. It may import :mod:`fedlora.aggregation`, torch
and PEFT; it must not import :mod:`fedlora.federation` or any front end.
"""

from fedlora.adapters.handle import AdapterHandle, combine_vectors
from fedlora.adapters.spec import ADAPTERS, MIXED_RANK_ADAPTERS, AdapterSpec

__all__ = ["ADAPTERS", "MIXED_RANK_ADAPTERS", "AdapterSpec", "AdapterHandle", "combine_vectors"]
