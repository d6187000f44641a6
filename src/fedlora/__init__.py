"""fedlora: federated fine-tuning of foundation models with LoRA-family adapters.

Layers, each importing only downward:
    aggregation  -> pure tensor math of every server rule (no nn.Module, no I/O)
    adapters     -> PEFT wrapping; reading/writing one client's trainable tensors
    federation   -> the round loop: sample, train, upload, aggregate, apply, evaluate
    data, models, cli, report -> front ends
    generation   -> answer extraction, exact match / last number / pass@1, the code sandbox (imports nothing from
                    fedlora; used by the causal-LM task in federation and by data loading)
"""

__version__ = "0.1.0"
