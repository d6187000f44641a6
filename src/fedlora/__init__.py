"""fedlora: federated fine-tuning of foundation models with LoRA-family adapters.

Layers, each importing only downward:
    aggregation  -> pure tensor math of every server rule (no nn.Module, no I/O)
    adapters     -> PEFT wrapping; reading/writing one client's trainable tensors
    federation   -> the round loop: sample, train, upload, aggregate, apply, evaluate
    data, models, cli, report -> front ends
"""

__version__ = "0.1.0"
