"""One build for every task kind: validated settings → the kind's data and model → the adapter → the method → the
simulator (no training yet). The CLI, the Python API, comparisons, studies and the Flower apps all build here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedlora.adapters import AdapterHandle
from fedlora.app.config import RunConfig
from fedlora.app.systems import systems_for
from fedlora.federation import FederationConfig, SimClient, Simulator
from fedlora.federation.systems import Instant


@dataclass
class Experiment:
    """The built pieces of a run, kept so callers (tests, benchmarks) can inspect them."""

    config: RunConfig
    simulator: Simulator
    tokenizer: object
    label_names: list[str]
    data_summary: list[dict] = field(default_factory=list)
    reference: dict | None = None  # the base model's scores before any training (instruct runs), the reference row
    split: Callable | None = None  # a raw split of the run's data → what the simulator scores (``fedlora eval --data``)
    from_flower: bool = False  # rebuilt from a Flower run's directory: private state only where export-private put it


def build(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None,
          on_progress: Callable[[str, int], None] | None = None) -> Experiment:
    """Load the task kind's data and model, wrap the adapter, and set up the simulator (no training yet).

    ``on_progress(kind, n)``: finer-grained progress of causal-LM runs (examples trained, prompts answered)."""
    config.validate()
    loaded = config.task_kind().load(config, on_progress)
    spec = config.adapter_spec().for_model(loaded.model)  # fan_in_fan_out for GPT-2-style Conv1D targets
    torch.manual_seed(config.seed)  # the adapter's initial A (FFA's shared A0) comes from the run's seed
    peft_model = wrap(loaded.model, spec, loaded.peft_task_type, config)
    method = config.make_method()
    method.prepare(peft_model, spec, config.seed)
    handle = AdapterHandle(peft_model, spec)
    ranks = config.ranks()
    clients = [SimClient(cid, loaded.split(train), loaded.split(test), None if ranks is None else ranks[cid])
               for cid, train, test in loaded.clients]
    clients, fcfg = reference_clients(method, clients, config.federation_config())
    extra = {} if loaded.task is None else {"task": loaded.task}
    # the simulated clock, availability, deadline (app/systems.py); the pooled-data reference (central) has none
    systems = Instant() if method.pooled else systems_for(config, peft_model, len(clients))
    sim = Simulator(peft_model, handle, method, clients, loaded.split(loaded.global_test), fcfg,
                    on_client=on_client, on_round=on_round, systems=systems, **extra)
    return Experiment(config, sim, loaded.tokenizer, loaded.label_names, loaded.summary, loaded.reference, loaded.split)


def check_methods_on_model(configs: list[RunConfig]) -> None:
    """What only the model can tell about each config's method (RAVAN's heads × rank against a layer's sides), checked
    on one load of the model before any of them trains (a comparison). Only methods that change the adapter's
    structure (:meth:`~fedlora.federation.Method.prepare`) are tried: each on its own copy of the model."""
    import copy

    from fedlora.federation import Method

    structural = [c for c in configs if type(c.method_object()).prepare is not Method.prepare]
    if not structural:
        return
    loaded = structural[0].task_kind().load(structural[0])
    for config in structural:
        model = copy.deepcopy(loaded.model)
        spec = config.adapter_spec().for_model(model)
        peft_model = wrap(model, spec, loaded.peft_task_type, config)
        config.make_method().prepare(peft_model, spec, config.seed)  # handed over: the build makes a fresh one
        del model, peft_model


def wrap(model, spec, task_type: str | None, config: RunConfig):
    """The PEFT model of ``model`` with ``spec``'s adapter; adapted layers that match nothing fail in one line."""
    import peft

    try:
        return peft.get_peft_model(model, spec.peft_config(task_type))
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise ValueError(f"the adapter targets {config.target_modules!r} matched no layer of {config.model!r}; pass --target-modules "
                         "with names of its linear layers (e.g. q_proj,v_proj, or q_proj,k_proj,v_proj,o_proj for Llama-style models)") from None


def reference_clients(method, clients: list[SimClient], fcfg: FederationConfig) -> tuple[list[SimClient], FederationConfig]:
    """For a method that pools the data (``central``): one client holding every client's training and test
    examples, training as many steps per round as the federation's sampled clients together. Otherwise unchanged."""
    if not method.pooled:
        return clients, fcfg
    from fedlora.federation.tasks import pooled

    per_round = max(1, int(round(fcfg.fraction * len(clients))))
    one = SimClient(0, pooled([c.train for c in clients]), pooled([c.test for c in clients]))
    return [one], dataclasses.replace(fcfg, fraction=1.0, local_steps=fcfg.local_steps * per_round)


def majority_rate(config: RunConfig) -> float | None:
    """The share of the most frequent label in the run's global test set (classification; None otherwise): a model
    whose global accuracy is at this rate has learned nothing."""
    return config.task_kind().majority_rate(config)
