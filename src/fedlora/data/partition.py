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

With ``split_by=FIELD`` (a column such as ``task``, ``subject``, ``language``, ``source``, ``category`` or
``user``) the natural attribute takes the label's place in every step: the global test set, the caps and the
local splits keep its mix, and the partition is over its values: ``iid``, ``dirichlet`` (Dirichlet(α) over the
values), ``pathological`` (``labels_per_client`` values per client, assigned as above) or ``one`` (each client
holds exactly one value; with fewer clients than values the largest values are used, and the rest left out).
The summary then reports each client's mix of that attribute. Without ``split_by`` nothing changes.
Front end: imports nothing from aggregation, adapters or federation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from .sampling import int_column, stratified_choice
from .sources import DataError, LabelledText

PARTITIONS = ("iid", "dirichlet", "pathological")
SPLIT_PARTITIONS = (*PARTITIONS, "one")  # with split_by
# Columns that hold content rather than an attribute of the row: never a split_by field.
CONTENT_COLUMNS = frozenset({"text", "prompt", "response", "reference", "references", "tests", "messages", "question",
                             "choices", "gold", "shots"})
_FIXES = {  # the one-clause fix when a partition leaves a client with too little data
    "iid": "use fewer clients or more data",
    "dirichlet": "raise alpha, lower n_clients or min_partition_size, or use more data",
    "pathological": "lower n_clients or labels_per_client, or use more data",
    "one": "use fewer clients, a smaller test_examples or more data of each value",
}
_SHOWN = 8  # attribute values named per client line in describe(); the rest are counted


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
    split_by: str | None = None  # the attribute partitioned over (None: the label)
    value_names: list[str] = field(default_factory=list)  # its values, indexed by code (split_by only)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def partition_summary(self) -> list[dict]:
        """Per client: sizes and label histograms (counts indexed by label code). With `split_by`, also the
        attribute's histograms (``train_values``/``test_values``, indexed like `value_names`) and ``mix``: the
        client's values with their row counts (train + test), largest first."""
        rows = []
        for client in self.clients:
            row = {
                "cid": client.cid,
                "n_train": client.train.num_rows,
                "n_test": client.test.num_rows,
                "train_labels": _histogram(client.train, self.n_labels),
                "test_labels": _histogram(client.test, self.n_labels),
            }
            if self.split_by is not None:
                row["train_values"] = self._values(client.train)
                row["test_values"] = self._values(client.test)
                row["mix"] = self._mix([a + b for a, b in zip(row["train_values"], row["test_values"])])
            rows.append(row)
        return rows

    def describe(self) -> str:
        def mix(counts: list[int]) -> str:
            if self.split_by is not None:
                shown = list(self._mix(counts).items())
                more = f"  (+{len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
                return "  ".join(f"{name} {n}" for name, n in shown[:_SHOWN]) + more
            return "  ".join(f"{name} {n}" for name, n in zip(self.label_names, counts))

        def histogram(ds: Dataset) -> list[int]:
            return self._values(ds) if self.split_by is not None else _histogram(ds, self.n_labels)

        lines = [
            f"{self.scheme}; {len(self.clients)} clients; global test {self.global_test.num_rows}: "
            + mix(histogram(self.global_test))
        ]
        for client in self.clients:
            train, test = histogram(client.train), histogram(client.test)
            lines.append(
                f"client {client.cid:>3}: {client.train.num_rows:>6} train {client.test.num_rows:>5} test | "
                + mix([a + b for a, b in zip(train, test)])
            )
        return "\n".join(lines)

    def _values(self, ds: Dataset) -> list[int]:
        codes, _ = _attribute_codes(ds, self.split_by, self.value_names)
        return np.bincount(codes, minlength=len(self.value_names)).tolist()

    def _mix(self, counts: list[int]) -> dict[str, int]:
        order = sorted((i for i, n in enumerate(counts) if n), key=lambda i: (-counts[i], self.value_names[i]))
        return {self.value_names[i]: int(counts[i]) for i in order}


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
    split_by: str | None = None,
) -> FederatedData:
    """Hold out a global test set, partition the rest over `n_clients`, split each shard train/test.

    `alpha` is used by "dirichlet" only, `labels_per_client` by "pathological" only, and `min_partition_size`
    (rows per client before the cap) by "dirichlet" only: if 10 Dirichlet draws cannot meet it, flwr's
    self-balancing variant is tried before giving up, and `scheme` says which one was used.
    `split_by` names a column of ``data.dataset`` (task, subject, language…) to partition over instead of the
    label, see the module doc; "one" (one value per client) needs it, and `labels_per_client` then counts values.
    """
    labels = int_column(data.dataset, "label")
    if split_by is None:
        keys, key_names, what = labels, list(data.label_names), "label"
        _validate(data, len(labels), n_clients, partition, alpha, labels_per_client, test_examples,
                  examples_per_client, local_test_fraction, min_partition_size)
        members = np.arange(len(labels))
    else:
        keys, key_names, what, members = _split_keys(data, split_by, partition, n_clients)
        _validate(data, len(members), n_clients, partition, alpha, labels_per_client, test_examples,
                  examples_per_client, local_test_fraction, min_partition_size,
                  n_keys=len(np.unique(keys[members])), scope=f"the {split_by} values of '{data.name}'")
    rng = np.random.default_rng(seed)
    test_rows = members[stratified_choice(keys[members], test_examples, rng)]
    # Shuffled so that IidPartitioner's contiguous shards are random ones.
    pool = rng.permutation(np.setdiff1d(members, test_rows))
    if partition == "one":  # client i holds the i-th of the values taking part, in name order
        shards, scheme = [pool[keys[pool] == v] for v in np.unique(keys[members])], f"one {split_by} per client"
    else:
        shards, scheme = _partition(keys, pool, n_clients, partition, alpha, labels_per_client, seed,
                                    min_partition_size, what)
        scheme += f" over {split_by}" if split_by is not None and partition == "dirichlet" else ""

    clients = []
    for cid, rows in enumerate(shards):
        if examples_per_client is not None and len(rows) > examples_per_client:
            rows = rows[stratified_choice(keys[rows], examples_per_client, rng)]
        n_test = min(int(len(rows) * local_test_fraction + 0.5), max(len(rows) - 1, 0))
        local_test = rows[stratified_choice(keys[rows], n_test, rng)]
        train = rng.permutation(np.setdiff1d(rows, local_test))
        if len(train) == 0:
            raise DataError(f"client {cid} ended with 0 training examples under {scheme}; {_FIXES[partition]}")
        clients.append(ClientData(cid, data.dataset.select(train), data.dataset.select(np.sort(local_test))))
    if partition == "one" and len(members) < len(keys):
        left = len(np.unique(keys)) - n_clients
        scheme += f" ({left} smaller {split_by} value{'s' if left > 1 else ''} left out)"
    if examples_per_client is not None:
        scheme += f", capped at {examples_per_client} per client"
    fed = FederatedData(data.dataset.select(test_rows), clients, list(data.label_names), f"{scheme}, seed {seed}")
    if split_by is not None:
        fed.split_by, fed.value_names = split_by, key_names
    return fed


def split_fields(data: LabelledText) -> list[str]:
    """The columns `split_by` may name: every column but the content ones (text, prompt, response…)."""
    return [c for c in data.dataset.column_names if c not in CONTENT_COLUMNS]


def _split_keys(data: LabelledText, split_by: str, partition: str, n_clients: int):
    """(value code per row, value names, the word for one value in schemes, the rows taking part: all of them, but
    with "one" and fewer clients than values only those of the `n_clients` largest values)."""
    fields = split_fields(data)
    if split_by not in fields:
        raise DataError(f"split_by={split_by!r} is not a field of '{data.name}'; pass --split-by with one of its fields: "
                        + ", ".join(fields))
    if partition not in SPLIT_PARTITIONS:
        raise DataError(f"unknown partition {partition!r}; choose iid, dirichlet, pathological or one")
    keys, names = _attribute_codes(data.dataset, split_by)
    rows = np.arange(len(keys))
    if partition == "one":
        present, counts = np.unique(keys, return_counts=True)
        if n_clients > len(present):
            raise DataError(
                f"partition 'one' gives each client one {split_by} but {n_clients} clients exceed the {len(present)} "
                f"{split_by} values of '{data.name}'; use at most {len(present)} clients, or partition pathological or "
                "dirichlet to share values"
            )
        chosen = present[np.lexsort((present, -counts))[:n_clients]]  # the largest values; ties in name order
        rows = np.flatnonzero(np.isin(keys, chosen))
    return keys, names, f"{split_by} value", rows


def _attribute_codes(ds: Dataset, column: str, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """A column as codes into `names` (default: its distinct values as strings, sorted; ClassLabel names kept)."""
    feature = ds.features[column]
    values = ds[column][:]
    if hasattr(feature, "names"):  # a ClassLabel: codes already, names from the feature
        values = [feature.names[v] for v in values]
    if any(isinstance(v, (list, dict)) for v in values[:100]):
        raise DataError(f"split_by field '{column}' holds lists, not one value per row; pass a field such as task or language")
    text = ["(missing)" if v is None else str(v) for v in values]
    names = sorted(set(text)) if names is None else names
    index = {name: code for code, name in enumerate(names)}
    return np.array([index[t] for t in text], dtype=np.int64), names


def _validate(data, n_rows, n_clients, partition, alpha, labels_per_client, test_examples,
              examples_per_client, local_test_fraction, min_partition_size, n_keys=None, scope=None) -> None:
    """`n_keys`/`scope`: the attribute values partitioned over and their description (None: the data's labels)."""
    split = scope is not None
    n_keys = data.n_labels if n_keys is None else n_keys
    scope = f"the labels of '{data.name}'" if scope is None else scope
    if partition == "one" and not split:
        raise DataError("partition 'one' gives each client one value of an attribute and needs split_by; pass --split-by "
                        "FIELD (task, subject, language…), or use pathological with labels_per_client=1")
    if partition not in (SPLIT_PARTITIONS if split else PARTITIONS):
        raise DataError(f"unknown partition {partition!r}; choose iid, dirichlet or pathological")
    if n_clients < 1:
        raise DataError(f"n_clients={n_clients} is not a number of clients; pass 1 or more")
    if partition == "dirichlet" and not alpha > 0:
        raise DataError(
            f"alpha={alpha} must be positive; pass one such as 0.5 (smaller is more skewed, 100 is near IID)"
        )
    if partition == "pathological" and not 1 <= labels_per_client <= n_keys:
        raise DataError(
            f"labels_per_client={labels_per_client} is outside 1..{n_keys} ({scope}); pass a value in that range"
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


def _partition(labels, pool, n_clients, partition, alpha, labels_per_client, seed, min_partition_size, what="label"):
    """Row indices of each client's shard, and a description of the partition actually drawn. `labels` are the
    codes partitioned over: the labels, or an attribute's values (`what` names one: "label", "task value")."""
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
        attempts = {f"pathological({labels_per_client} {what}s per client)": PathologicalPartitioner(
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
        problem = f"{scheme} has too few examples of some {what} for the {n_clients} clients that need it"
    raise DataError(f"{problem}; {_FIXES[partition]}")


def _histogram(ds: Dataset, n_labels: int) -> list[int]:
    return np.bincount(int_column(ds, "label"), minlength=n_labels).tolist()
