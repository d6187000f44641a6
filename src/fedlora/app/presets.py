"""Named settings for the field's standard setups (``fedlora run --preset NAME``): a preset fills settings the way a
``--config`` file does, and a config file and the flags given override it.

- ``flowertune-nlp``: FlowerTune's general-NLP LLM leaderboard configuration as Flower's ``flwr new`` template for
  it writes it: Mistral-7B-v0.3 in 4-bit with gradient checkpointing, LoRA r = 32, α = 64, learning rate
  cosine-annealed from 5e-5 to 1e-6 over 200 rounds, sequences of 512 tokens, batches of 16, 10 local steps, 20
  clients holding IID shards of Alpaca-GPT4 with a tenth of them per round, FedAvg of the factors (``fedit``), MMLU
  as the evaluation. It needs a hub (Alpaca-GPT4, Mistral) and CUDA (4-bit). For the leaderboard's small-model
  entries pass ``--model`` (e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``) and ``--quantize none`` on a CPU.
  Offline, any local file: ``--data my.jsonl``.
- ``dolly-category``: Databricks' Dolly-15k split by its eight categories, one category per client (FedIT's, FLoRA's
  and FLoRIST's non-IID instruction split; the papers' client counts and models vary: set them with flags).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "flowertune-nlp": {
        "task": "instruct", "data": "alpaca-gpt4", "model": "mistralai/Mistral-7B-v0.3", "quantize": "4bit", "gradient_checkpointing": True,
        "adapter": "lora", "rank": 32, "lora_alpha": 64.0, "target_modules": "q_proj,v_proj",
        "method": "fedit", "clients": 20, "fraction": 0.1, "rounds": 200, "local_steps": 10, "batch_size": 16,
        "lr": 5e-5, "lr_schedule": "cosine", "lr_min": 1e-6, "max_length": 512, "partition": "iid", "examples_per_client": None,
        "eval": "mmlu",
    },
    "dolly-category": {
        "task": "instruct", "data": "dolly", "split_by": "category", "partition": "one", "clients": 8, "examples_per_client": None,
    },
}


def preset(name: str) -> dict[str, object]:
    """The settings of preset ``name``; an unknown name is one line listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
