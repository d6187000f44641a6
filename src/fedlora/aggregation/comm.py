"""Bytes each method sends per client and adapted matrix, from what each rule declares (``register_rule(comm=…)``).

A rule's ``comm`` is the one declaration of a method's bytes: this module reads it, the federation layer's
``Method.declared_elements`` reads it (with the round's options), the methods table states it, and the tests hold
the bytes the simulator counts from the tensors it actually sends to it. It counts the factor tensors only (LoRA's
d×r and r×k, or the r×r cores of the core structures); heads and other non-LoRA trainables are counted by the
federation layer from the tensors it sends. Imports only torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._common import check_int
from .registry import check_options, get_rule

__all__ = ["CommBytes", "comm_bytes", "comm_elements", "model_comm_bytes"]


@dataclass(frozen=True)
class CommBytes:
    """Bytes one client uploads (``up``) and downloads (``down``) in one round."""

    up: int
    down: int

    def __add__(self, other: CommBytes) -> CommBytes:
        return CommBytes(self.up + other.up, self.down + other.down)


def comm_elements(method: str, d: int, k: int, r: int, n_clients: int, **options: object) -> tuple[int, int]:
    """``(up, down)`` element counts per client for one d×k matrix adapted at rank r, with U = n_clients.

    Under mixed ranks pass the client's own r_u: every method's per-client counts are in its own rank, except
    ``flora``'s download, which is the sum over all clients (use ``n_clients`` × mean rank). ``options``: the
    rule's options, for a rule whose bytes depend on them (``rolora``'s ``trained="A"``: an A-round)."""
    rule = get_rule(method)
    check_options(rule, options)
    d, k, r = check_int(d, "d", 1), check_int(k, "k", 1), check_int(r, "r", 1)
    U = check_int(n_clients, "n_clients", 1)
    takes = inspect.signature(rule.comm).parameters
    return rule.comm(d, k, r, U, **{n: v for n, v in options.items() if n in takes})


def comm_bytes(
    method: str, d: int, k: int, r: int, n_clients: int, dtype: torch.dtype = torch.float32, **options: object
) -> CommBytes:
    """Bytes up and down per client for one d×k matrix adapted at rank r, factors in ``dtype`` (``options`` as
    for ``comm_elements``)."""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype is {dtype!r}; pass a torch.dtype such as torch.float32")
    up, down = comm_elements(method, d, k, r, n_clients, **options)
    size = torch.empty(0, dtype=dtype).element_size()
    return CommBytes(up * size, down * size)


def model_comm_bytes(
    method: str,
    shapes: Mapping[str, tuple[int, ...]],
    r: int,
    n_clients: int,
    dtype: torch.dtype = torch.float32,
    **options: object,
) -> CommBytes:
    """Sum of ``comm_bytes`` over a model's adapted modules; ``shapes[name]`` is ``(d, k)`` or ``(d, k, r)``."""
    total = CommBytes(0, 0)
    for name, shape in shapes.items():
        if len(shape) not in (2, 3):
            raise ValueError(f"shapes[{name!r}] is {shape!r}; give (d, k) or (d, k, r) for every module")
        d, k, rank = (*shape, r) if len(shape) == 2 else shape
        total = total + comm_bytes(method, d, k, rank, n_clients, dtype, **options)
    return total
