"""Federate labelled text over simulated clients, following DESIGN.md's evaluation protocol.

1. Hold out the global test set: `test_examples` rows drawn stratified, so it has the natural label mix.
2. Partition the rest (the pool, seeded-shuffled) over clients with flwr-datasets' partitioners: IID,
   Dirichlet(α) over labels, or pathological (k labels per client, assigned deterministically: client i gets
   labels i, i+1, …, i+k-1 mod C, so every label is used as evenly as the client count allows).
3. Optionally cap each shard at `examples_per_client` rows, stratified within the shard. The cap comes after
   partitioning so the heterogeneity is the partitioner's, not that of a pre-shrunk pool; the partitioners only
   see a two-column (label, row) table, so partitioning the full pool is cheap and no pool subsampling is done.
4. Split each shard into local train/test with the shard's label mix.
Every draw is seeded by `seed`: the same seed gives identical partitions.
Front end: imports nothing from aggregation, adapters or federation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from .sampling import int_column, stratified_choice
from .sources import DataError, LabelledText

PARTITIONS = ("iid", "dirichlet", "pathological")
_FIXES = {  # the one-clause fix when a partition leaves a client with too little data
    "iid": "use fewer clients or more data",
    "dirichlet": "raise alpha, lower n_clients or min_partition_size, or use more data",
    "pathological": "lower n_clients or labels_per_client, or use more data",
}


@dataclass
class ClientData:
    cid: int
    train: Dataset
    test: Dataset


@dataclass
class FederatedData:
    global_test: Dataset
    clients: list[ClientData]
    label_names: list[str]
    scheme: str  # the partition as actually drawn, e.g. "dirichlet(alpha=0.5), seed 0"; goes into reports

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def partition_summary(self) -> list[dict]:
        """Per client: sizes and label histograms (counts indexed by label code)."""
        return [
            {
                "cid": client.cid,
                "n_train": client.train.num_rows,
                "n_test": client.test.num_rows,
                "train_labels": _histogram(client.train, self.n_labels),
                "test_labels": _histogram(client.test, self.n_labels),
            }
            for client in self.clients
        ]

    def describe(self) -> str:
        def mix(counts: list[int]) -> str:
            return "  ".join(f"{name} {n}" for name, n in zip(self.label_names, counts))

        lines = [
            f"{self.scheme}; {len(self.clients)} clients; global test {self.global_test.num_rows}: "
            + mix(_histogram(self.global_test, self.n_labels))
        ]
        for row in self.partition_summary():
            lines.append(
                f"client {row['cid']:>3}: {row['n_train']:>6} train {row['n_test']:>5} test | "
                + mix([a + b for a, b in zip(row["train_labels"], row["test_labels"])])
            )
        return "\n".join(lines)


def federate(
    data: LabelledText,
    *,
    n_clients: int,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    labels_per_client: int = 2,
    test_examples: int = 500,
    examples_per_client: int | None = None,
    local_test_fraction: float = 0.2,
    seed: int = 0,
    min_partition_size: int = 10,
) -> FederatedData:
    """Hold out a global test set, partition the rest over `n_clients`, split each shard train/test.

    `alpha` is used by "dirichlet" only, `labels_per_client` by "pathological" only, and `min_partition_size`
    (rows per client before the cap) by "dirichlet" only: if 10 Dirichlet draws cannot meet it, flwr's
    self-balancing variant is tried before giving up, and `scheme` says which one was used.
    """
    labels = int_column(data.dataset, "label")
    _validate(data, len(labels), n_clients, partition, alpha, labels_per_client, test_examples,
              examples_per_client, local_test_fraction, min_partition_size)
    rng = np.random.default_rng(seed)
    test_rows = stratified_choice(labels, test_examples, rng)
    # Shuffled so that IidPartitioner's contiguous shards are random ones.
    pool = rng.permutation(np.setdiff1d(np.arange(len(labels)), test_rows))
    shards, scheme = _partition(labels, pool, n_clients, partition, alpha, labels_per_client, seed, min_partition_size)

    clients = []
    for cid, rows in enumerate(shards):
        if examples_per_client is not None and len(rows) > examples_per_client:
            rows = rows[stratified_choice(labels[rows], examples_per_client, rng)]
        n_test = min(int(len(rows) * local_test_fraction + 0.5), max(len(rows) - 1, 0))
        local_test = rows[stratified_choice(labels[rows], n_test, rng)]
        train = rng.permutation(np.setdiff1d(rows, local_test))
        if len(train) == 0:
            raise DataError(f"client {cid} ended with 0 training examples under {scheme}; {_FIXES[partition]}")
        clients.append(ClientData(cid, data.dataset.select(train), data.dataset.select(np.sort(local_test))))
    if examples_per_client is not None:
        scheme += f", capped at {examples_per_client} per client"
    return FederatedData(data.dataset.select(test_rows), clients, list(data.label_names), f"{scheme}, seed {seed}")


def _validate(data, n_rows, n_clients, partition, alpha, labels_per_client, test_examples,
              examples_per_client, local_test_fraction, min_partition_size) -> None:
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition {partition!r}; choose iid, dirichlet or pathological")
    if n_clients < 1:
        raise DataError(f"n_clients={n_clients} is not a number of clients; pass 1 or more")
    if partition == "dirichlet" and not alpha > 0:
        raise DataError(
            f"alpha={alpha} must be positive; pass one such as 0.5 (smaller is more skewed, 100 is near IID)"
        )
    if partition == "pathological" and not 1 <= labels_per_client <= data.n_labels:
        raise DataError(
            f"labels_per_client={labels_per_client} is outside 1..{data.n_labels} "
            f"(the labels of '{data.name}'); pass a value in that range"
        )
    if not 1 <= test_examples < n_rows:  # the global model is scored on it: it cannot be empty
        raise DataError(
            f"test_examples={test_examples} must be between 1 and {n_rows - 1} to score the global model and leave a pool to partition "
            f"from the {n_rows} examples of '{data.name}'; pass a value in that range"
        )
    pool = n_rows - test_examples
    if n_clients > pool:
        raise DataError(
            f"n_clients={n_clients} is more than the {pool} examples left after the global test set; "
            "use fewer clients or a smaller test_examples"
        )
    if partition == "dirichlet" and n_clients * min_partition_size > pool:
        raise DataError(
            f"{n_clients} clients × min_partition_size={min_partition_size} needs more than the {pool} pool "
            "examples; lower min_partition_size or n_clients, or use more data"
        )
    if examples_per_client is not None and examples_per_client < 1:
        raise DataError(
            f"examples_per_client={examples_per_client} leaves clients empty; pass 1 or more, or None for no cap"
        )
    if not 0 <= local_test_fraction < 1:
        raise DataError(f"local_test_fraction={local_test_fraction} must be in [0, 1); pass one such as 0.2")


def _partition(labels, pool, n_clients, partition, alpha, labels_per_client, seed, min_partition_size):
    """Row indices of each client's shard, and a description of the partition actually drawn."""
    if partition == "iid":
        attempts = {"iid": IidPartitioner(n_clients)}
    elif partition == "dirichlet":  # plain Dirichlet first; flwr's self-balancing variant if it fails
        attempts = {
            f"dirichlet(alpha={alpha}{', self-balanced' if balanced else ''})": DirichletPartitioner(
                n_clients, partition_by="label", alpha=alpha, min_partition_size=min_partition_size,
                self_balancing=balanced, seed=seed)
            for balanced in (False, True)
        }
    else:
        attempts = {f"pathological({labels_per_client} labels per client)": PathologicalPartitioner(
            n_clients, partition_by="label", num_classes_per_partition=labels_per_client,
            class_assignment_mode="deterministic", seed=seed)}
    # The partitioners see only labels and row numbers: cheap, and their shards map back to our rows.
    table = Dataset.from_dict({"label": labels[pool], "row": pool})
    for scheme, partitioner in attempts.items():
        partitioner.dataset = table
        try:
            with warnings.catch_warnings():  # flwr warns on each failed Dirichlet draw; we report the outcome
                warnings.simplefilter("ignore")
                return [int_column(partitioner.load_partition(i), "row") for i in range(n_clients)], scheme
        except ValueError:  # flwr's messages name its internals; ours says what to change
            pass
    if partition == "dirichlet":
        problem = (f"dirichlet(alpha={alpha}) left some of {n_clients} clients below min_partition_size="
                   f"{min_partition_size} of the {len(pool)} pool examples in 10 draws, self-balanced or not")
    else:
        problem = f"{scheme} has too few examples of some label for the {n_clients} clients that need it"
    raise DataError(f"{problem}; {_FIXES[partition]}")


def _histogram(ds: Dataset, n_labels: int) -> list[int]:
    return np.bincount(int_column(ds, "label"), minlength=n_labels).tolist()
