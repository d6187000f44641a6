"""One experiment, end to end (front end): validated config → data → model → simulator → run directory.

Configuration is data, validated once here before any work starts; the CLI and the Python API both go
through :func:`run_experiment`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.adapters import ADAPTERS, AdapterHandle, AdapterSpec
from fedlora.federation import (
    FederationConfig,
    PrivacyConfig,
    SimClient,
    Simulator,
    TokenizedSplit,
    make_method,
    method_names,
    parse_method_options,
)

# Per-task defaults of the settings whose right value depends on the task (used where the user passed none).
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "classification": {"model": "minilm", "target_modules": "query,value", "max_length": 64},
    "causal-lm": {"model": "smollm2", "target_modules": "q_proj,v_proj", "max_length": 128},
}


_FED = FederationConfig()  # the round loop's defaults are the run's: one place


def _flag(default, help: str):
    """A RunConfig field with its help: the CLI flags and Flower's run-config defaults are generated from these."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Every knob of ``fedlora run``; field names are the CLI's long flags with dashes as underscores, and each
    field's help is the flag's help (``fedlora run --help``) and Flower's run-config key (``pyproject.toml``)."""

    method: str = _flag("florana", "aggregation method (see the methods table)")
    adapter: str = _flag("lora", "lora, rslora, dora, vera or hira")
    rank: int = _flag(8, "adapter rank r")
    client_ranks: str = _flag("", "mixed ranks: comma-separated ranks given to clients in turn (client u gets the (u mod n)-th), "
                                  "e.g. 4,8,16; empty: --rank for all")
    lora_alpha: float = _flag(16.0, "LoRA alpha; a client's scale is alpha/r (rsLoRA alpha/sqrt r)")
    target_modules: str | None = _flag(None, "comma-separated linear layers to adapt (classification: query,value; causal-lm: q_proj,v_proj)")
    method_options: str = _flag("", "method options as NAME-OPTION=VALUE pairs, e.g. 'hetlora-weights=data' (also as their own flags)")
    clients: int = _flag(10, "number of clients")
    fraction: float = _flag(_FED.fraction, "fraction of clients sampled per round, in (0, 1]")
    rounds: int = _flag(_FED.rounds, "federated rounds")
    local_steps: int = _flag(_FED.local_steps, "optimizer steps per client per round")
    batch_size: int = _flag(_FED.batch_size, "local batch size")
    lr: float = _flag(_FED.lr, "local learning rate")
    optimizer: str = _flag(_FED.optimizer, "local optimizer: adamw, or sgd (plain gradient steps)")
    max_grad_norm: float = _flag(_FED.max_grad_norm, "clip each local step's gradient to this L2 norm; 0 turns it off")
    weighting: str = _flag(_FED.weighting, "client weights: examples (n_u/Σn) or uniform")
    max_norm_ratio: float = _flag(_FED.max_norm_ratio, "reject a client update above this × the round's median norm; 0 turns it off")
    keep_head_local: bool | None = _flag(None, "keep each client's classifier head private (default: the method's; fedsa keeps it)")
    partition: str = _flag("dirichlet", "iid, dirichlet or pathological")
    alpha: float = _flag(0.5, "Dirichlet concentration over labels; smaller is more skewed")
    labels_per_client: int = _flag(2, "labels per client for --partition pathological")
    model: str | None = _flag(None, "minilm (offline default), tiny:bert, tiny:gpt2, or a Hugging Face name/path; "
                                    "causal-lm: smollm2 (offline default), tiny:llama, or a name/path")
    data: str = _flag("tweets", "tweets (offline default), bbc, a .csv/.jsonl file, hf:NAME[:CONFIG], or synthetic:ALPHA,BETA (a generated "
                                "task with model and input heterogeneity, its own small network); causal-lm also gsm8k, mbpp, humaneval")
    text_column: str = _flag("text", "text column of --data files/datasets")
    label_column: str = _flag("label", "label column of --data files/datasets")
    seed: int = _flag(_FED.seed, "seed for partitions, sampling, init and training")
    examples_per_client: int | None = _flag(200, "cap on each client's shard, train+test")
    test_examples: int = _flag(500, "size of the global test set held out before partitioning")
    local_test_fraction: float = _flag(0.2, "fraction of each client's shard held out as its local test set")
    max_length: int | None = _flag(None, "max tokens per example (classification: 64; causal-lm: 128, prompt + response)")
    device: str = _flag("auto", "auto, cpu or cuda[:N]")
    similarity: bool = _flag(_FED.similarity, "also record the clients' mean pairwise cosine similarity of A and B per module")
    # differential privacy (DESIGN.md, "Privacy"; fedlora.federation.privacy)
    dp: str = _flag("none", "differential privacy: none; client (DP-FedAvg: clipped client updates, Gaussian noise on their sum, "
                            "Poisson client sampling at --fraction; linear methods only); example (DP-SGD in every client's "
                            "local training with Opacus; lora and rslora)")
    dp_clip: float = _flag(1.0, "DP: L2 bound C on one client's update (client) or on one example's gradient (example)")
    dp_noise: float = _flag(1.0, "DP: noise multiplier z (standard deviation z·C on the sum of the clipped updates or gradients)")
    dp_delta: float = _flag(1e-5, "DP: δ of the reported (ε, δ); keep it below 1/number of clients")
    dp_target_epsilon: float | None = _flag(None, "DP: choose --dp-noise so that the planned rounds spend this ε at --dp-delta")
    dp_accountant: str = _flag("rdp", "DP: Opacus's accountant, rdp or prv")
    dp_secure_noise: bool = _flag(False, "DP: draw the noise from the OS's randomness, not the run's seed (deployments: nobody who "
                                         "knows the seed can subtract it; runs are then not reproducible)")
    # secure aggregation (Flower only; fedlora.flower.secure)
    secure_aggregation: bool = _flag(False, "Flower only: SecAgg+, so the server sees only the weighted sum of the uploads "
                                            "(linear methods, one rank for all; no per-client divergence or screening)")
    secagg_clip: float = _flag(8.0, "SecAgg+: every uploaded value must lie in [-clip, clip] (quantised over it in 2^22 steps)")
    # causal-LM instruction tuning (--task causal-lm); ignored by classification
    task: str = _flag("classification", "classification or causal-lm (instruction tuning, scored by generation)")
    prompt_column: str = _flag("prompt", "causal-lm: prompt field of --data files/datasets")
    response_column: str = _flag("response", "causal-lm: response field of --data files/datasets")
    scoring: str = _flag("auto", "causal-lm: auto (the data's own), exact, number (last number, GSM8K) or pass@1 (code)")
    max_new_tokens: int = _flag(64, "causal-lm: most tokens generated per answer when scoring")
    code_timeout: float = _flag(10.0, "causal-lm pass@1: seconds each candidate program may run")
    gradient_checkpointing: bool = _flag(False, "causal-lm: recompute activations in the backward pass (less memory, ~30%% slower)")
    out: str | None = _flag(None, "run directory (default runs/METHOD-TIMESTAMP)")

    def __post_init__(self) -> None:
        from fedlora.data.synthetic import is_synthetic

        if is_synthetic(self.data) and self.task == "classification":  # the synthetic task brings its own network
            self.model = self.model or "synthetic"
            self.target_modules = self.target_modules or "fc1,fc2"
        for name, value in TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["classification"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> RunConfig:
        """Checks that need no data or model; raise ValueError with one sentence naming the value and the fix."""
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_DEFAULTS)}")
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        from fedlora.data import PARTITIONS

        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        if self.clients < 1:
            raise ValueError(f"clients={self.clients} is below 1; pass --clients 1 or more")
        if not self.alpha > 0:
            raise ValueError(f"Dirichlet alpha={self.alpha} must be positive; pass e.g. --alpha 0.5 (smaller is more skewed)")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too short; pass --max-length 8 or more")
        if self.examples_per_client is not None and self.examples_per_client < 2:
            raise ValueError(f"examples_per_client={self.examples_per_client} leaves no room for a local test split; pass 2 or more")
        self._validate_device()
        if self.test_examples < 1:
            raise ValueError(f"test_examples={self.test_examples} leaves no global test set to score the global model on; pass --test-examples 1 or more")
        if self.task == "causal-lm":
            self._validate_causal_lm()
        elif self.model in ("smollm2", "tiny:llama"):
            raise ValueError(f"model {self.model!r} is a causal LM; pass --task causal-lm, or --model minilm for classification")
        self.adapter_spec()
        self.federation_config()
        method = self.make_method()
        if self.secure_aggregation:
            self._validate_secure(method)
        return self

    def _validate_secure(self, method) -> None:
        """Secure aggregation gives the server one weighted sum: only a rule that needs nothing else can run on it."""
        if not method.is_linear():
            raise ValueError(f"secure aggregation: method {self.method} needs each client's factors, not only their sum; "
                             "pick a linear method (fedit, ffa, fedsa, …: `fedlora methods`) or drop secure-aggregation")
        ranks = self.ranks()
        if ranks is not None and len(set(ranks)) > 1:
            raise ValueError("secure aggregation sums uploads of one shape; mixed --client-ranks cannot be summed, drop one of the two")
        if self.dp == "client":
            raise ValueError("secure aggregation with --dp client is not supported: the server clips each client's update, "
                             "which it cannot see under SecAgg+; use --dp example (DP-SGD on the clients) instead")
        if self.similarity:
            raise ValueError("secure aggregation hides each client's factors, so --similarity cannot be measured; drop one of the two")
        if not self.secagg_clip > 0:
            raise ValueError(f"secagg_clip={self.secagg_clip} must be positive; pass e.g. secagg-clip = 8.0")

    def ranks(self) -> list[int] | None:
        """Each client's rank under ``--client-ranks`` (in turn), or None for one rank for all."""
        if not self.client_ranks.strip():
            return None
        try:
            cycle = [int(x) for x in self.client_ranks.split(",") if x.strip()]
        except ValueError:
            cycle = []
        if not cycle or min(cycle) < 1:
            raise ValueError(f"client_ranks={self.client_ranks!r} is not a list of ranks ≥ 1; pass e.g. --client-ranks 4,8,16")
        return [cycle[u % len(cycle)] for u in range(self.clients)]

    def make_method(self):
        """The method's protocol object; a method or adapter that cannot take these settings fails here, in one line."""
        ranks = self.ranks()
        return make_method(self.method, self.adapter, mixed_ranks=ranks is not None and len(set(ranks)) > 1,
                           keep_head_local=self.keep_head_local, **parse_method_options(self.method, self.method_options))

    def _validate_causal_lm(self) -> None:
        from fedlora.generation import SCORINGS

        if self.model in ("minilm", "tiny:bert", "tiny:gpt2"):
            raise ValueError(f"model {self.model!r} is a model for classification; "
                             "with --task causal-lm pass --model smollm2, tiny:llama or a causal-LM name/path")
        if self.scoring not in ("auto", *SCORINGS):
            raise ValueError(f"unknown scoring {self.scoring!r}; choose auto, {', '.join(SCORINGS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is below 1; pass --max-new-tokens 1 or more (e.g. 8 for label words, 256 for GSM8K)")
        if not self.code_timeout > 0:
            raise ValueError(f"code_timeout={self.code_timeout} must be positive; pass --code-timeout SECONDS, e.g. 10")

    def adapter_spec(self) -> AdapterSpec:
        """The model's adapter: at the largest client rank under ``--client-ranks``."""
        targets = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        ranks = self.ranks()
        return AdapterSpec(kind=self.adapter, r=max(ranks) if ranks else self.rank, alpha=self.lora_alpha, target_modules=targets)

    def _validate_device(self) -> None:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"unknown device {self.device!r}; pass --device auto, cpu, cuda or cuda:N (N a GPU index)")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device} asks for a GPU but this machine has no CUDA device PyTorch can use; pass --device cpu (or auto)")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                n = torch.cuda.device_count()
                raise ValueError(f"--device {self.device}: this machine has {n} CUDA device(s); pass cuda:0 … cuda:{n - 1}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def federation_config(self) -> FederationConfig:
        return FederationConfig(
            rounds=self.rounds, fraction=self.fraction, local_steps=self.local_steps, batch_size=self.batch_size,
            lr=self.lr, optimizer=self.optimizer, max_grad_norm=self.max_grad_norm, seed=self.seed, weighting=self.weighting,
            device=self.resolved_device(),
            max_norm_ratio=self.max_norm_ratio, similarity=self.similarity, privacy=self.privacy_config(),
        )

    def privacy_config(self) -> PrivacyConfig:
        return PrivacyConfig(mode=self.dp, clip=float(self.dp_clip), noise=float(self.dp_noise), delta=float(self.dp_delta),
                             target_epsilon=None if self.dp_target_epsilon is None else float(self.dp_target_epsilon),
                             accountant=self.dp_accountant, secure_noise=bool(self.dp_secure_noise))

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> RunConfig:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid TOML ({exc}); fix the file or drop --config") from None
        raw = {k.replace("-", "_"): v for k, v in raw.get("run", raw).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"config file {str(path)!r} has unknown key(s) {', '.join(unknown)}; use the long flag names of `fedlora run`")
        for key, value in raw.items():
            cls.check_type(key, value, f"config file {str(path)!r}")
        return cls(**(raw | overrides))

    @classmethod
    def check_type(cls, key: str, value: object, where: str) -> None:
        """Refuse a value of the wrong type for field ``key`` in one line naming the key, ``where`` and the type
        expected (a string where a boolean belongs is an error, not a guess)."""
        import typing

        hint = typing.get_type_hints(cls)[key]
        kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        kind = kinds[0]
        if kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind is float:
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, expected = isinstance(value, str), "a string"
        if not ok:
            default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
            example = f" (e.g. {key.replace('_', '-')} = {json.dumps(default)})" if default is not None else ""
            raise ValueError(f"{where}: {key.replace('_', '-')} = {json.dumps(value, default=str)} is not {expected}{example}")


@dataclass
class Experiment:
    """The built pieces of a run, kept so callers (tests, benchmarks) can inspect them."""

    config: RunConfig
    simulator: Simulator
    tokenizer: object
    label_names: list[str]
    data_summary: list[dict] = field(default_factory=list)


def build(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None,
          on_progress: Callable[[str, int], None] | None = None) -> Experiment:
    """Load data and model, wrap the adapter, and set up the simulator (no training yet).

    ``on_progress(kind, n)``: finer-grained progress of causal-LM runs (examples trained, prompts answered)."""
    import peft

    from fedlora.app.models import load_classifier

    config.validate()
    if config.task == "causal-lm":
        return build_causal_lm(config, on_client=on_client, on_round=on_round, on_progress=on_progress)
    from fedlora.data.synthetic import is_synthetic

    if is_synthetic(config.data):
        return build_synthetic(config, on_client=on_client, on_round=on_round)
    fed = federated_text(config)
    model, tokenizer = load_classifier(config.model, fed.n_labels, seed=config.seed)
    spec = config.adapter_spec().for_model(model)  # fan_in_fan_out for GPT-2-style Conv1D targets
    torch.manual_seed(config.seed)  # the adapter's initial A (FFA's shared A0) comes from the run's seed
    peft_model = peft.get_peft_model(model, spec.peft_config("SEQ_CLS"))
    method = config.make_method()
    method.prepare(peft_model, spec, config.seed)
    handle = AdapterHandle(peft_model, spec)

    def split(ds) -> TokenizedSplit:
        return TokenizedSplit.from_texts(tokenizer, ds["text"], ds["label"], config.max_length)

    ranks = config.ranks()
    clients = [SimClient(c.cid, split(c.train), split(c.test), None if ranks is None else ranks[c.cid]) for c in fed.clients]
    clients, fcfg = reference_clients(method, clients, config.federation_config())
    sim = Simulator(
        peft_model, handle, method, clients, split(fed.global_test), fcfg,
        on_client=on_client, on_round=on_round,
    )
    return Experiment(config, sim, tokenizer, list(fed.label_names), fed.partition_summary())


def synthetic_data(config: RunConfig):
    from fedlora.data.synthetic import generate, parse

    return generate(parse(config.data), n_clients=config.clients, examples_per_client=config.examples_per_client or 100,
                    test_examples=config.test_examples, local_test_fraction=config.local_test_fraction, seed=config.seed)


def build_synthetic(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None) -> Experiment:
    """``build`` for ``--data synthetic:α,β`` (``fedlora.data.synthetic``): the generated clients, the task's own frozen
    network with the adapters on ``fc1`` and ``fc2``, scored by accuracy with the loss and its Bayes floor beside it."""
    import peft

    from fedlora.app.models import SyntheticNet
    from fedlora.federation.tasks import SyntheticTask, VectorSplit

    if config.model != "synthetic":
        raise ValueError(f"--data {config.data} brings its own small network; drop --model {config.model} (or pass --model synthetic)")
    data = synthetic_data(config)
    model = SyntheticNet(data.weights)
    spec = config.adapter_spec()
    torch.manual_seed(config.seed)  # the adapter's initial A (FFA's shared A0) comes from the run's seed
    peft_model = peft.get_peft_model(model, spec.peft_config(None))
    method = config.make_method()
    method.prepare(peft_model, spec, config.seed)
    handle = AdapterHandle(peft_model, spec)
    split = lambda s: VectorSplit(s.x, s.labels, s.entropy)  # noqa: E731
    ranks = config.ranks()
    clients = [SimClient(u, split(tr), split(te), None if ranks is None else ranks[u]) for u, (tr, te) in enumerate(data.clients)]
    clients, fcfg = reference_clients(method, clients, config.federation_config())
    sim = Simulator(peft_model, handle, method, clients, split(data.global_test), fcfg, task=SyntheticTask(),
                    on_client=on_client, on_round=on_round)
    return Experiment(config, sim, None, data.label_names, data.partition_summary())


def reference_clients(method, clients: list[SimClient], fcfg: FederationConfig) -> tuple[list[SimClient], FederationConfig]:
    """For a method that pools the data (``central``): one client holding every client's training and test
    examples, training as many steps per round as the federation's sampled clients together. Otherwise unchanged."""
    if not method.pooled:
        return clients, fcfg
    from fedlora.federation.tasks import pooled

    per_round = max(1, int(round(fcfg.fraction * len(clients))))
    one = SimClient(0, pooled([c.train for c in clients]), pooled([c.test for c in clients]))
    return [one], dataclasses.replace(fcfg, fraction=1.0, local_steps=fcfg.local_steps * per_round)


def federated_text(config: RunConfig):
    """The run's labelled text, partitioned over its clients with a global test set (classification)."""
    from fedlora.data import federate, load_labelled_text

    labelled = load_labelled_text(config.data, text_column=config.text_column, label_column=config.label_column, seed=config.seed)
    return federate(
        labelled, n_clients=config.clients, partition=config.partition, alpha=config.alpha,
        labels_per_client=config.labels_per_client, test_examples=config.test_examples,
        examples_per_client=config.examples_per_client, local_test_fraction=config.local_test_fraction, seed=config.seed,
    )


def majority_rate(config: RunConfig) -> float | None:
    """The share of the most frequent label in the run's global test set (classification; None otherwise): a model
    whose global accuracy is at this rate has learned nothing."""
    if config.task != "classification":
        return None
    from fedlora.data.synthetic import is_synthetic

    if is_synthetic(config.data):
        labels = synthetic_data(config).global_test.labels.tolist()
        return max(labels.count(x) for x in set(labels)) / len(labels) if labels else None
    labels = list(federated_text(config).global_test["label"])
    return max(labels.count(x) for x in set(labels)) / len(labels) if labels else None


def build_causal_lm(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None,
                    on_progress: Callable[[str, int], None] | None = None) -> Experiment:
    """``build`` for ``--task causal-lm``: prompt/response records, a causal LM, loss on response tokens only,
    scored by generation (exact match, last number or pass@1; recorded as global/local accuracy)."""
    import peft

    from fedlora.app.models import load_causal_lm
    from fedlora.data import federate, load_instructions
    from fedlora.federation import CausalLMSplit, CausalLMTask

    data = load_instructions(
        config.data, prompt_column=config.prompt_column, response_column=config.response_column,
        label_column=config.label_column, scoring=config.scoring, seed=config.seed,
    )
    fed = federate(
        data, n_clients=config.clients, partition=config.partition, alpha=config.alpha,
        labels_per_client=config.labels_per_client, test_examples=config.test_examples,
        examples_per_client=config.examples_per_client, local_test_fraction=config.local_test_fraction, seed=config.seed,
    )
    model, tokenizer = load_causal_lm(config.model, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing)
    spec = config.adapter_spec().for_model(model)
    torch.manual_seed(config.seed)  # the adapter's initial A (FFA's shared A0) comes from the run's seed
    try:
        peft_model = peft.get_peft_model(model, spec.peft_config("CAUSAL_LM"))
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise ValueError(f"the adapter targets {config.target_modules!r} matched no layer of {config.model!r}; pass --target-modules "
                         "with names of its linear layers (e.g. q_proj,v_proj, or q_proj,k_proj,v_proj,o_proj for Llama-style models)") from None
    method = config.make_method()
    method.prepare(peft_model, spec, config.seed)
    handle = AdapterHandle(peft_model, spec)

    def split(ds) -> CausalLMSplit:
        return CausalLMSplit.from_records(tokenizer, list(ds["prompt"]), list(ds["response"]), list(ds["reference"]),
                                          list(ds["tests"]), config.max_length)

    task = CausalLMTask(tokenizer, scoring=data.scoring, max_new_tokens=config.max_new_tokens,
                        eval_batch_size=max(16, config.batch_size), code_timeout=config.code_timeout, on_progress=on_progress)
    ranks = config.ranks()
    clients = [SimClient(c.cid, split(c.train), split(c.test), None if ranks is None else ranks[c.cid]) for c in fed.clients]
    clients, fcfg = reference_clients(method, clients, config.federation_config())
    sim = Simulator(
        peft_model, handle, method, clients, split(fed.global_test), fcfg, task=task,
        on_client=on_client, on_round=on_round,
    )
    return Experiment(config, sim, tokenizer, list(fed.label_names), fed.partition_summary())


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj))


def metrics_line(m: dict) -> str:
    """One metrics.jsonl line. NaN (no local test examples, a skipped round) is written as null: strict JSON."""
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in m.items()}
    return json.dumps(clean, default=_json_default) + "\n"


CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(sim: Simulator, out: Path, config: RunConfig | None = None, extra: tuple[dict, dict] | None = None) -> None:
    """One file, replaced atomically: a kill at any moment leaves the previous complete checkpoint. ``config``: the
    run's settings, kept inside the checkpoint so a resume can refuse an edited config.json. ``extra``: (tensors, meta)
    of the Flower strategy, under its own keys (the simulator's restore ignores them)."""
    tensors, meta = sim.snapshot()
    if extra is not None:
        tensors |= extra[0]
        meta["flower"] = extra[1]
    if config is not None:
        meta["config"] = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE}
    tmp = out / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata={"fedlora": json.dumps(meta, default=_json_default)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out / CHECKPOINT
    if not path.exists():
        raise ValueError(f"{str(out)!r} has no {CHECKPOINT}; resume needs a run directory with at least one finished round")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["fedlora"])
        return load_file(str(path)), meta
    except Exception as exc:  # truncated, garbage, or not ours: the file and the directory are left as they are
        raise ValueError(f"{str(path)!r} is not a readable fedlora checkpoint ({type(exc).__name__}); nothing was changed: "
                         "restore the file from a copy, or start a new run with another --out") from None


_RESUMABLE = ("rounds", "out")  # settings a resume may change (more rounds) or that name the place


def check_resume(config: RunConfig, meta: dict, out: Path) -> None:
    """Refuse to resume a checkpoint under settings other than its own (an edited config.json), or with fewer
    rounds than it has finished."""
    done = int(meta.get("round", 0))
    if config.rounds < done:
        raise ValueError(f"{str(out)!r} has finished {done} rounds; --rounds {config.rounds} would cut it short: pass --rounds {done} or more")
    saved = meta.get("config")
    if saved is None:  # a checkpoint from before settings were kept in it
        return
    mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE}
    # a setting added to RunConfig after the checkpoint was written counts as its default there (as for a finished run)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    saved = {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(mine)}
    changed = sorted(k for k in saved if saved.get(k) != mine.get(k))
    if changed:
        diff = ", ".join(f"{k}={mine.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in changed)
        raise ValueError(f"{str(out / 'config.json')!r} no longer matches the run's checkpoint: {diff}; "
                         "restore config.json, or start a new run with another --out")


_LOCK = ".running"


def take_run_lock(out: Path) -> bool | None:
    """Take run directory ``out`` for this process with an exclusive lock file holding our pid. True: taken now
    (give it back with :func:`release_run_lock`); None: this process holds it already; False: another live process
    does. A lock whose process is gone (killed) is stale and taken over."""
    lock = out / _LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                if pid == os.getpid():
                    return None
                os.kill(pid, 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_lock_holder(out: Path) -> str:
    try:
        return (out / _LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def release_run_lock(out: Path) -> None:
    (out / _LOCK).unlink(missing_ok=True)


def prepare_run_dir(out: Path) -> None:
    """Create ``out`` or refuse in one line: an existing file, a path under a file, or no write permission."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a directory; pass a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the run directory {str(out)!r} ({exc.strerror or type(exc).__name__}); pass a writable --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the run directory {str(out)!r} is not writable; pass a writable --out")


def resume_config(out: str | os.PathLike, **overrides) -> RunConfig:
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"{str(out)!r} has no config.json; pass the --out directory of an earlier run to --resume")
    return RunConfig(**(json.loads(path.read_text()) | overrides | {"out": str(out)}))


def run_experiment(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None, resume: bool = False,
                   on_progress: Callable[[str, int], None] | None = None) -> tuple[Experiment, list[dict]]:
    """Build, run every round, write the run directory (when ``config.out`` is set) and return the metrics.

    With ``out`` set, every completed round appends to ``metrics.jsonl`` and replaces ``checkpoint.safetensors``;
    ``resume=True`` continues such a directory from its last completed round.
    """
    out = Path(config.out) if config.out else None
    config.validate()
    if config.secure_aggregation:
        raise ValueError("secure aggregation runs on Flower (SecAgg+ hides each upload from a server across a network); set "
                         "secure-aggregation = true in the Flower run config (docs/flower.md), or drop --secure-aggregation")
    if out is None:
        return _run(config, None, None, on_client, on_round, on_progress)
    prepare_run_dir(out)
    taken = take_run_lock(out)
    if taken is False:
        raise ValueError(f"{str(out)!r} is being written by process {run_lock_holder(out)} (a run, compare or study); "
                         "wait for it to finish, or pass another --out")
    try:
        checkpoint = load_checkpoint(out) if resume else None
        if checkpoint is not None:
            check_resume(config, checkpoint[1], out)
        if not resume and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
            raise ValueError(f"{str(out)!r} already holds a run; pass a new --out, or --resume {out} to continue it")
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        return _run(config, out, checkpoint, on_client, on_round, on_progress)
    finally:
        if taken:
            release_run_lock(out)


def _run(config: RunConfig, out: Path | None, checkpoint, on_client, on_round, on_progress) -> tuple[Experiment, list[dict]]:
    """``run_experiment`` once the run directory (if any) is prepared and held."""

    def write_metrics(history: list[dict]) -> None:
        (out / "metrics.jsonl").write_text("".join(metrics_line(m) for m in history))

    def record(metrics: dict) -> None:
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(metrics_line(metrics))
            save_checkpoint(exp.simulator, out, config)
        if on_round:
            on_round(metrics)

    t0 = time.perf_counter()
    exp = build(config, on_client=on_client, on_round=record, on_progress=on_progress)
    if checkpoint is not None:
        exp.simulator.restore(*checkpoint)
    if out is not None:
        write_metrics(exp.simulator.history)  # drops any line written after the checkpoint a kill interrupted
    history = exp.simulator.run()
    if out is not None:
        from fedlora.app.export import save_run_artifacts
        from fedlora.app.report import write_summary

        save_run_artifacts(exp, out)
        write_summary(exp, history, out, wall_seconds=time.perf_counter() - t0)
    return exp, history
