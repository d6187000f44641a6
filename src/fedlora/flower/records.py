"""Tensors ⇄ Flower records, and the names of what travels in each message.

A ``dict[str, Tensor]`` crosses the wire as one :class:`~flwr.app.ArrayRecord` under the same keys, bit for bit
(float32 stays float32), so a client's upload reaches the aggregation exactly as the in-process simulator hands it
over. Message layout (``RecordDict`` keys):

- query, server → client: nothing; client → server: ``node`` (partition-id, num-partitions from the SuperNode's
  ``--node-config``, or the simulation's own; synced-round, the last round it applied, -2 without state).
- train, server → client: ``config`` (round, partition-id, broadcast-rounds) and ``broadcast.R`` for every round
  R the client has not applied yet (the previous round's; more after rounds it was not sampled in); or, for a client
  whose state was lost, ``snapshot.current`` and ``snapshot.base`` with ``snapshot-round`` in ``config``.
- train, client → server: ``upload`` (protocol bytes), ``extras`` (FedSA's B and head, only to score a global
  model, as in the simulator), ``metrics``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import Tensor

Tensors = dict[str, Tensor]

CONFIG = "config"
UPLOAD = "upload"
EXTRAS = "extras"
METRICS = "metrics"
NODE = "node"
SNAPSHOT_CURRENT = "snapshot.current"  # a rejoining client's state: the trainables it starts from
SNAPSHOT_BASE = "snapshot.base"  # and the adapted layers' base weights after every fold so far (fedex, flora)


def broadcast_key(rnd: int) -> str:
    return f"broadcast.{rnd}"


def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={n: t.detach().cpu() for n, t in tensors.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> Tensors:
    return {n: t.to(device) for n, t in record.to_torch_state_dict().items()}
