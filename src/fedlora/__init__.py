"""fedlora: federated fine-tuning of foundation models with LoRA-family adapters.

The public API (imported lazily, so ``import fedlora`` stays cheap)::

    import fedlora
    config = fedlora.RunConfig(method="fedsa", model="tiny:bert", rounds=2)
    experiment, history = fedlora.run(config)          # one run; history: a metrics dict per round
    result = fedlora.compare(config, ["fedit", "fedsa"], seeds=[0, 1, 2], out="runs/cmp")
    model, tokenizer, labels = fedlora.load_global_model("runs/x")
    agg = fedlora.aggregate("flora", Bs, As, weights)   # the server rule of one matrix: agg.B, agg.A
    fedlora.methods()                                   # the registered methods

Layers, each importing only downward:
    aggregation  -> pure tensor math of every server rule (no nn.Module, no I/O)
    adapters     -> PEFT wrapping; reading/writing one client's trainable tensors
    federation   -> the round loop: sample, train, upload, aggregate, apply, evaluate
    app          -> the application: settings by concern, the build per task kind, the run directory, compare,
                    study, report, export, models
    cli, flower  -> the front ends, side by side (neither imports the other)
    data, generation -> leaves: loading and partitioning data; answer extraction and the code sandbox
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["RunConfig", "run", "run_experiment", "compare", "load_global_model", "aggregate", "methods", "__version__"]

_LAZY = {
    "RunConfig": ("fedlora.app.config", "RunConfig"),
    "run": ("fedlora.app.experiment", "run_experiment"),
    "run_experiment": ("fedlora.app.experiment", "run_experiment"),
    "compare": ("fedlora.app.compare", "compare"),
    "load_global_model": ("fedlora.app.export", "load_global_model"),
    "aggregate": ("fedlora.aggregation", "aggregate"),
}


def methods() -> list[str]:
    """The registered methods' names (``fedlora methods`` shows their rules, bytes, traits and adapters)."""
    from fedlora.federation import method_names

    return method_names()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
