"""A run's settings, owned by concern: federation, adapter, data, task, privacy and runtime.

Each part is a dataclass whose fields carry their default and help, and whose ``check`` raises one sentence naming
the value and the fix. :class:`RunConfig` composes the parts and is read and written by the flat names that every
edge shares: ``fedlora run``'s long flags (``--local-steps``), TOML keys (``local-steps``), Flower's run config keys
and ``config.json``. The CLI flags, the TOML reader and the Flower run config are all generated from these fields.

Three settings depend on the task (``model``, ``target_modules``, ``max_length``): "not given" is kept as None
through every merge (flags over a TOML file, a Flower run config over ``pyproject.toml``'s defaults) and resolved
from the task kind (:mod:`fedlora.app.tasks`) when read, the same way for every front end. Validation runs once per
settings, at the edge (:meth:`RunConfig.validate`); the method object it builds to check them is the one the build
then uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

from fedlora.app.stats import SEED_MAX  # seeds are mixed into generator seeds (×1,000,003 and more): 32 bits keep them in range
from fedlora.federation import REGISTRY, FederationConfig, Method, PrivacyConfig, make_method, method_class, method_names, parse_method_options
from fedlora.federation.privacy import check_privacy
from fedlora.federation.protocol import check_option_owners
from fedlora.federation.server_opt import ServerOptConfig, check_server_opt

_FED = FederationConfig()  # the round loop's defaults are the run's: one place
_DP = PrivacyConfig()
_OPT = ServerOptConfig()


def setting(default, help: str, *, flower=None, alias: str = ""):
    """A settings field with its help (the flag's help, the TOML key's and Flower's). ``flower``: where ``default``
    is None ("not given"), the stand-in Flower's run config holds for it (it holds no null). ``alias``: a second
    flag (``--async`` for ``async_mode``, a Python keyword as a field name)."""
    return field(default=default, metadata={"help": help, "flower": flower, "alias": alias})


class Part:
    """One concern's settings. ``check(run)`` may read other parts' (resolved) values through ``run``."""

    def check(self, run: RunConfig) -> None:  # pragma: no cover - every part overrides it
        raise NotImplementedError


@dataclass
class FederationSettings(Part):
    """The method and the round loop: who trains, how much, and how the server combines it."""

    method: str = setting("florana", "aggregation method (see the methods table)")
    method_options: str = setting("", "method options as NAME-OPTION=VALUE pairs, e.g. 'hetlora-weights=data' (also as their own flags)")
    clients: int = setting(10, "number of clients")
    fraction: float = setting(_FED.fraction, "fraction of clients sampled per round, in (0, 1]")
    rounds: int = setting(_FED.rounds, "federated rounds")
    local_steps: int = setting(_FED.local_steps, "optimizer steps per client per round")
    batch_size: int = setting(_FED.batch_size, "local batch size")
    lr: float = setting(_FED.lr, "local learning rate (with --lr-schedule cosine: the first rounds')")
    lr_schedule: str = setting(_FED.lr_schedule, "constant, or cosine: annealed from --lr to --lr-min over the rounds (FlowerTune's)")
    lr_min: float = setting(_FED.lr_min, "the last round's learning rate under --lr-schedule cosine")
    optimizer: str = setting(_FED.optimizer, "local optimizer: adamw, or sgd (plain gradient steps)")
    max_grad_norm: float = setting(_FED.max_grad_norm, "clip each local step's gradient to this L2 norm; 0 turns it off")
    weighting: str = setting(_FED.weighting, "client weights: examples (n_u/Σn) or uniform")
    max_norm_ratio: float = setting(_FED.max_norm_ratio, "reject a client update above this × the round's median norm; 0 turns it off")
    keep_head_local: bool | None = setting(None, "keep each client's classifier head private (default: the method's; fedsa keeps it)",
                                           flower="auto")
    similarity: bool = setting(_FED.similarity, "also record the clients' mean pairwise cosine similarity of A and B per module")
    server_opt: str = setting(_OPT.name, "server optimiser on the method's result each round: avg (none), avgm (FedAvgM), adam, yogi or "
                                         "adagrad (Reddi et al.'s Alg. 2: v0 = tau^2, no bias correction); see docs/usage.md")
    server_lr: float | None = setting(_OPT.lr, "server learning rate eta (default: 1 for avgm, 1e-2 for adam, yogi, adagrad)", flower=0.0)
    server_momentum: float = setting(_OPT.momentum, "avgm: the server momentum beta")
    server_beta1: float = setting(_OPT.beta1, "adam, yogi, adagrad: beta1 of the first moment")
    server_beta2: float = setting(_OPT.beta2, "adam, yogi: beta2 of the second moment")
    server_tau: float = setting(_OPT.tau, "adam, yogi, adagrad: tau, the adaptivity (v starts at tau^2)")
    clients_together: str = setting(_FED.clients_together, "train the round's clients in one pass over the shared base (lora, rslora; "
                                                           "same metrics): auto (on CUDA where allowed), on (refused where it cannot "
                                                           "run), off (one after another)")
    clients_together_group: int = setting(_FED.together_group, "at most this many clients per joint pass (their activations are held at once)")

    def check(self, run: RunConfig) -> None:
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        if self.clients < 1:
            raise ValueError(f"clients={self.clients} is below 1; pass --clients 1 or more")
        check_option_owners(self.method_options, [self.method])  # another method's option would be ignored silently
        fed = run.federation_config()  # the round loop's own checks (rounds, fraction, lr, optimizer, server optimiser, …)
        check_server_opt(method_class(self.method), fed.server_opt)
        if fed.clients_together == "on":
            self._check_together(run, fed)

    def _check_together(self, run: RunConfig, fed: FederationConfig) -> None:
        """``--clients-together on`` where the run's clients cannot be trained together: refused before any training."""
        from fedlora.federation.together import blockers, use_together

        ranks = run.ranks()
        reason = blockers(run.method_object(), run.adapter, fed, mixed=ranks is not None and len(set(ranks)) > 1)
        use_together("on", reason, fed.device, run.clients)


@dataclass
class AdapterSettings(Part):
    """The adapter every client trains: its kind, rank(s), scale and the layers it adapts."""

    adapter: str = setting("lora", "lora, rslora, dora, vera or hira")
    rank: int = setting(8, "adapter rank r")
    client_ranks: str = setting("", "mixed ranks: comma-separated ranks given to clients in turn (client u gets the (u mod n)-th), "
                                    "e.g. 4,8,16; empty: --rank for all")
    lora_alpha: float = setting(16.0, "LoRA alpha; a client's scale is alpha/r (rsLoRA alpha/sqrt r)")
    target_modules: str | None = setting(None, "comma-separated linear layers to adapt (default: the task's; classification: query,value; "
                                               "causal-lm: q_proj,v_proj)", flower="")

    def check(self, run: RunConfig) -> None:
        from fedlora.adapters import ADAPTERS

        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"--lora-alpha {self.lora_alpha} must be a finite positive number; pass e.g. --lora-alpha 16")
        run.ranks()
        run.adapter_spec()


@dataclass
class DataSettings(Part):
    """Where the examples come from, how they are split over the clients, and what is held out."""

    data: str = setting("tweets", "tweets (offline default), bbc, a .csv/.jsonl file, hf:NAME[:CONFIG], or synthetic:ALPHA,BETA (a generated "
                                  "task with model and input heterogeneity, its own small network); causal-lm also gsm8k, mbpp, humaneval")
    text_column: str = setting("text", "text column of --data files/datasets")
    label_column: str = setting("label", "label column of --data files/datasets")
    partition: str = setting("dirichlet", "iid, dirichlet or pathological")
    alpha: float = setting(0.5, "Dirichlet concentration over labels; smaller is more skewed")
    labels_per_client: int = setting(2, "labels per client for --partition pathological")
    examples_per_client: int | None = setting(200, "cap on each client's shard, train+test", flower=0)
    test_examples: int = setting(500, "size of the global test set held out before partitioning")
    local_test_fraction: float = setting(0.2, "fraction of each client's shard held out as its local test set")
    max_length: int | None = setting(None, "max tokens per example (default: the task's; classification: 64; causal-lm: 128, "
                                           "instruct: 256, prompt + response)", flower=0)
    split_by: str = setting("", "partition over this attribute instead of the label (task, category, subject, language, source, "
                                "user: a field of --data); --partition one gives each client one value (instruct: default task)")

    def check(self, run: RunConfig) -> None:
        from fedlora.data.partition import PARTITIONS, SPLIT_PARTITIONS

        allowed = SPLIT_PARTITIONS if run.attribute else PARTITIONS
        if self.partition not in allowed:
            hint = " (one: with --split-by, one attribute value per client)" if self.partition == "one" else ""
            raise ValueError(f"unknown partition {self.partition!r}; choose one of {', '.join(allowed)}{hint}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"Dirichlet alpha={self.alpha} (--alpha) must be a finite positive number; pass e.g. --alpha 0.5 "
                             "(smaller is more skewed; for equal label mixes pass --partition iid)")
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ValueError(f"--local-test-fraction {self.local_test_fraction} is outside [0, 1); pass e.g. 0.2 (0: no local test set)")
        if run.max_length < 8:
            raise ValueError(f"max_length={run.max_length} is too short; pass --max-length 8 or more")
        if self.examples_per_client is not None and self.examples_per_client < 2:
            raise ValueError(f"examples_per_client={self.examples_per_client} leaves no room for a local test split; pass 2 or more")
        if self.test_examples < 1:
            raise ValueError(f"test_examples={self.test_examples} leaves no global test set to score the global model on; "
                             "pass --test-examples 1 or more")


@dataclass
class TaskSettings(Part):
    """The task kind and its model; the causal-LM task's prompt/response fields and how answers are scored."""

    task: str = setting("classification", "classification; causal-lm (instruction tuning on one task, scored by generation); instruct "
                                          "(clients holding different tasks, scored per task and on --eval benchmarks)")
    model: str | None = setting(None, "minilm (offline default), tiny:bert, tiny:gpt2, or a Hugging Face name/path; "
                                      "causal-lm: smollm2 (offline default), tiny:llama, or a name/path", flower="")
    prompt_column: str = setting("prompt", "causal-lm: prompt field of --data files/datasets")
    response_column: str = setting("response", "causal-lm: response field of --data files/datasets")
    scoring: str = setting("auto", "causal-lm: auto (the data's own), exact, number (last number, GSM8K) or pass@1 (code)")
    max_new_tokens: int = setting(64, "causal-lm: most tokens generated per answer when scoring")
    code_timeout: float = setting(10.0, "causal-lm pass@1: seconds each candidate program may run")
    gradient_checkpointing: bool = setting(False, "causal-lm: recompute activations in the backward pass (less memory, ~30%% slower)")
    eval: str = setting("", "instruct: benchmarks scored on the global model every round (the forgetting check): mmlu[:N], mmlu5[:N], "
                            "truthfulqa[:N], gsm8k[:N], bbh[:N] (N: a fixed seeded subset), comma-separated")
    quantize: str = setting("none", "causal-lm, instruct: 4bit loads the base in bitsandbytes' NF4 (QLoRA, FlowerTune; CUDA only)")

    def check(self, run: RunConfig) -> None:
        from fedlora.app.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        run.task_kind().check(run)


@dataclass
class PrivacySettings(Part):
    """Differential privacy (DESIGN.md, "Privacy"; fedlora.federation.privacy) and secure aggregation (Flower only)."""

    dp: str = setting(_DP.mode, "differential privacy: none; client (DP-FedAvg: clipped client updates, Gaussian noise on their sum, "
                                "Poisson client sampling at --fraction; linear methods only); example (DP-SGD in every client's "
                                "local training with Opacus; lora and rslora)")
    dp_clip: float = setting(_DP.clip, "DP: L2 bound C on one client's update (client) or on one example's gradient (example)")
    dp_noise: float = setting(_DP.noise, "DP: noise multiplier z (standard deviation z·C on the sum of the clipped updates or gradients)")
    dp_delta: float = setting(_DP.delta, "DP: δ of the reported (ε, δ); keep it below 1/number of clients")
    dp_target_epsilon: float | None = setting(None, "DP: choose --dp-noise so that the planned rounds spend this ε at --dp-delta", flower=0.0)
    dp_accountant: str = setting(_DP.accountant, "DP: the accountant: Opacus's rdp or prv, or flower (Flower's RdpAccountant, "
                                                 "--dp client only; needs flwr[dp])")
    dp_secure_noise: bool = setting(_DP.secure_noise, "DP: draw the noise from the OS's randomness, not the run's seed (deployments: nobody "
                                                      "who knows the seed can subtract it; runs are then not reproducible)")
    dp_noise_cohort: int | None = setting(None, "DP client: calibrate the noise as if this many clients (of --dp-population) joined "
                                                "each round (pfl's noise cohort; noise z·C/cohort on the average, sampling rate "
                                                "cohort/population); a simulation device: its ε is the cohort's, not this run's", flower=0)
    dp_population: int | None = setting(None, "DP client: the population the noise cohort is drawn from (with --dp-noise-cohort)", flower=0)
    dp_clip_quantile: float | None = setting(None, "DP client: adaptive clipping (Andrew et al. 2021): the clip tracks this quantile "
                                                   "of the update norms, starting at --dp-clip; its count's noise is accounted", flower=0.0)
    dp_clip_lr: float = setting(_DP.clip_lr, "DP client, adaptive clipping: the clip's geometric learning rate η_C")
    dp_clip_count_std: float | None = setting(None, "DP client, adaptive clipping: noise σ_b on the clipped count (default: the "
                                                    "expected participants, or the noise cohort, / 20)", flower=0.0)
    secure_aggregation: bool = setting(False, "Flower only: SecAgg+, so the server sees only the weighted sum of the uploads "
                                              "(linear methods, one rank for all; no per-client divergence or screening)")
    secagg_clip: float = setting(8.0, "SecAgg+: every uploaded value must lie in [-clip, clip] (quantised over it in 2^22 steps)")

    def check(self, run: RunConfig) -> None:
        ranks = run.ranks()  # the accountant's own checks (mode, clip, noise, δ, target ε), then what DP cannot cover
        check_privacy(run.privacy_config(), run.method_object(), run.adapter, ranks is not None and len(set(ranks)) > 1, run.clients,
                      run.fraction)
        if self.secure_aggregation:
            self._check_secure(run)

    def _check_secure(self, run: RunConfig) -> None:
        """Secure aggregation gives the server one weighted sum: only a rule that needs nothing else can run on it."""
        if not run.method_object().secure_summable():
            raise ValueError(f"secure aggregation: method {run.method} needs each client's factors, not only their sum; "
                             "pick a linear method (fedit, ffa, fedsa, …: `fedlora methods`) or drop secure-aggregation")
        ranks = run.ranks()
        if ranks is not None and len(set(ranks)) > 1:
            raise ValueError("secure aggregation sums uploads of one shape; mixed --client-ranks cannot be summed, drop one of the two")
        if self.dp == "client":
            raise ValueError("secure aggregation with --dp client is not supported: the server clips each client's update, "
                             "which it cannot see under SecAgg+; use --dp example (DP-SGD on the clients) instead")
        if run.similarity:
            raise ValueError("secure aggregation hides each client's factors, so --similarity cannot be measured; drop one of the two")
        if not self.secagg_clip > 0:
            raise ValueError(f"secagg_clip={self.secagg_clip} must be positive; pass e.g. secagg-clip = 8.0")


@dataclass
class RuntimeSettings(Part):
    """Where and how reproducibly the run executes, where it writes, and which trackers it logs to."""

    seed: int = setting(_FED.seed, "seed for partitions, sampling, init and training")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    out: str | None = setting(None, "run directory (default runs/METHOD-TIMESTAMP)", flower="")
    track: str = setting("", "experiment trackers to log to, comma-separated: tensorboard, mlflow, wandb (W&B offline); "
                             "stores are local, in the run directory (pip install 'fedlora[track]')")
    mlflow_uri: str = setting("", "MLflow tracking store, e.g. sqlite:///PATH/mlflow.db or file:PATH (default: mlflow.db "
                                  "in the run's or the comparison's directory)")

    def check(self, run: RunConfig) -> None:
        from fedlora.app.tracking import check as check_trackers

        check_trackers(self.track, self.mlflow_uri)
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"--seed {self.seed} is outside [0, {SEED_MAX}] (2^32 − 1); pass e.g. --seed 0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"unknown device {self.device!r}; pass --device auto, cpu, cuda or cuda:N (N a GPU index)")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device} asks for a GPU but this machine has no CUDA device PyTorch can use; "
                                 "pass --device cpu (or auto)")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                n = torch.cuda.device_count()
                raise ValueError(f"--device {self.device}: this machine has {n} CUDA device(s); pass cuda:0 … cuda:{n - 1}")


@dataclass
class SystemsSettings(Part):
    """Clients that are slow, absent and late: a simulated clock, availability and deadlines (docs/systems.md)."""

    devices: str = setting("", "simulated clock: default (the packaged device profiles) or a profiles TOML file; every round then "
                               "records sim_seconds and sim_clock; empty: no clock")
    availability: str = setting("", "dropout:P (each selected client drops out with probability P), diurnal (online overnight in its "
                                    "time zone) or a TOML/CSV file of per-client online windows; empty: always online")
    deadline: float | None = setting(None, "simulated seconds a round waits for updates; later ones are dropped (needs --devices; on Flower: "
                                           "the round timeout, in real seconds)",
                                     flower=0.0)
    over_select: float = setting(1.0, "select ceil(F x clients per round) and keep the first clients per round to finish")
    async_mode: str = setting("", "asynchronous aggregation (also --async): fedasync or fedbuff (docs/systems.md; methods with an "
                                  "async trait); empty: synchronous rounds", alias="--async")
    buffer: int | None = setting(None, "FedBuff: updates buffered per server step, K (default: clients per round)", flower=0)
    staleness: str = setting("poly", "staleness weight h(tau): constant, poly ((tau+1)^-a) or hinge (1 if tau <= b, else 1/(a(tau-b)+1))")
    staleness_a: float = setting(0.5, "staleness weight: a of poly and hinge")
    staleness_b: float = setting(4.0, "staleness weight: b of hinge")
    fedasync_alpha: float = setting(0.6, "FedAsync: mixing weight alpha in (0, 1]; alpha_t = alpha h(tau)")
    fedasync_rho: float = setting(0.0, "FedAsync: the local proximal term (rho/2)||x - x_start||^2 (0: off)")
    async_concurrency: int | None = setting(None, "asynchronous: clients in flight at once, C (default: clients per round)", flower=0)
    client_speeds: str = setting("", "asynchronous without --devices: each client's seconds per local step, given to clients in turn "
                                     "(empty: 1,2,4)")

    def check(self, run: RunConfig) -> None:
        from fedlora.app.systems import check

        check(run)


# The parts in the order their checks run (and their flags are listed): a run's method before its privacy.
PARTS: dict[str, type[Part]] = {
    "federation": FederationSettings,
    "adapter": AdapterSettings,
    "data": DataSettings,
    "task": TaskSettings,
    "privacy": PrivacySettings,
    "systems": SystemsSettings,
    "runtime": RuntimeSettings,
}
# Settings whose default depends on the task kind: None ("not given") until read.
TASK_DEPENDENT = ("model", "target_modules", "max_length")


@functools.cache
def _whole(value, flag: str) -> int | None:
    """An optional count given as a number: a whole number stays an int (a TOML or Flower float 5000.0 included)."""
    if value is None:
        return None
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{flag} {value} must be a whole number of clients, e.g. {flag} 5000")
    return int(value)


def _fields() -> tuple[tuple[str, dataclasses.Field], ...]:
    return tuple((part, f) for part, cls in PARTS.items() for f in dataclasses.fields(cls))


@functools.cache
def _owner() -> dict[str, str]:
    return {f.name: part for part, f in _fields()}


@functools.lru_cache(maxsize=256)
def parse_ranks(text: str, clients: int) -> tuple[int, ...] | None:
    """Each client's rank under ``--client-ranks`` (in turn), or None for one rank for all."""
    if not text.strip():
        return None
    try:
        cycle = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        cycle = []
    if not cycle or min(cycle) < 1:
        raise ValueError(f"--client-ranks {text!r} is not a list of ranks ≥ 1; pass e.g. --client-ranks 4,8,16")
    if len(cycle) > clients:
        raise ValueError(f"--client-ranks {text!r} gives {len(cycle)} ranks to {clients} clients, so {len(cycle) - clients} would go "
                         f"unused; pass at most {clients} ranks (they are given to clients in turn) or raise --clients")
    return tuple(cycle[u % len(cycle)] for u in range(clients))


class _Parts:
    """``config.parts.federation`` … ``config.parts.runtime``."""

    def __init__(self, parts: dict[str, Part]):
        self.__dict__.update(parts)

    def items(self):
        return self.__dict__.items()


class RunConfig:
    """Every setting of a run, composed of the parts above (``config.parts.privacy``, …) and read or written by its
    flat name (``config.dp_noise``), which is ``fedlora run``'s long flag with dashes as underscores."""

    def __init__(self, **settings):
        owner = _owner()
        unknown = sorted(set(settings) - set(owner))
        if unknown:
            raise TypeError(f"RunConfig got unknown setting(s) {', '.join(unknown)}")
        parts = {name: cls(**{k: v for k, v in settings.items() if owner[k] == name}) for name, cls in PARTS.items()}
        object.__setattr__(self, "parts", _Parts(parts))
        object.__setattr__(self, "_validated", None)  # the settings last validated
        object.__setattr__(self, "_method", None)  # (settings, the method object built for them), until a build takes it

    # ---- the flat view -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        owner = _owner()
        if name not in owner:
            raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}")
        value = getattr(self.parts.__dict__[owner[name]], name)
        if value is None and name in TASK_DEPENDENT:
            return self.task_kind().defaults[name]
        return value

    def __setattr__(self, name: str, value) -> None:
        owner = _owner()
        if name not in owner:
            raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}")
        setattr(self.parts.__dict__[owner[name]], name, value)

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """Every setting's field (name, default, type, help in ``metadata``), part by part."""
        return [f for _, f in _fields()]

    def given(self) -> dict[str, object]:
        """The settings as stored: a task-dependent one not given is None (what ``replace`` and Flower's defaults use)."""
        return {f.name: getattr(self.parts.__dict__[part], f.name) for part, f in _fields()}

    def given_only(self) -> dict[str, object]:
        """The settings that differ from the defaults (what a config file or flags set)."""
        defaults = type(self)().given()
        return {k: v for k, v in self.given().items() if v != defaults[k]}

    def to_dict(self) -> dict[str, object]:
        """The settings as the run uses them (task defaults resolved): ``config.json``, checkpoints, digests."""
        return {f.name: getattr(self, f.name) for _, f in _fields()}

    def replace(self, **changes) -> RunConfig:
        """A new config with ``changes``; settings not given stay not given (a new task gets its own defaults)."""
        return type(self)(**(self.given() | changes))

    def __eq__(self, other) -> bool:
        return isinstance(other, RunConfig) and self.given() == other.given()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"RunConfig({', '.join(f'{k}={v!r}' for k, v in self.given_only().items())})"

    def with_absolute_paths(self) -> RunConfig:
        """``model`` and ``data`` that name an existing local path made absolute, in place (what a front end does before
        writing config.json): a run resumed, reloaded or exported from another working directory then finds the same
        files, and a relative name is never looked up on a model hub instead. Names (minilm, tweets, hf:…, tiny:…)
        and paths that do not exist are kept as given."""
        for name in ("model", "data"):
            value = getattr(self.parts.__dict__[_owner()[name]], name)
            if _local_path(value, directory_ok=name == "model"):
                setattr(self, name, os.path.abspath(value))
        return self

    # ---- derived objects ---------------------------------------------------------------------------------------
    def task_kind(self):
        """The task kind (:mod:`fedlora.app.tasks`) that builds this run: its defaults, checks, data and model."""
        from fedlora.app.tasks import task_kind

        return task_kind(self.parts.task.task, self.parts.data.data)

    @property
    def attribute(self) -> str | None:
        """The field partitioned over instead of the label: ``--split-by``, or the task for instruct runs."""
        return self.split_by or self.task_kind().attribute

    def _resolved_ranks(self) -> tuple[int, list[int] | None]:
        """(the model's rank, each client's rank or None): the method's reading of ``--rank`` and ``--client-ranks``
        (``Method.ranks``: by default the model holds the largest client rank; FSLoRA's are sketch sizes)."""
        given = parse_ranks(self.client_ranks, self.clients)
        return REGISTRY.get(self.method, Method).ranks(self.rank, None if given is None else list(given), self.clients)

    def ranks(self) -> list[int] | None:
        """Each client's rank under ``--client-ranks`` (in turn), or None for one rank for all."""
        return self._resolved_ranks()[1]

    def adapter_spec(self):
        """The model's adapter: at the largest client rank under ``--client-ranks`` (the method says: ``Method.ranks``)."""
        from fedlora.adapters import AdapterSpec

        targets = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        return AdapterSpec(kind=self.adapter, r=self._resolved_ranks()[0], alpha=self.lora_alpha, target_modules=targets)

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def federation_config(self) -> FederationConfig:
        return FederationConfig(
            rounds=self.rounds, fraction=self.fraction, local_steps=self.local_steps, batch_size=self.batch_size,
            lr=self.lr, lr_schedule=self.lr_schedule, lr_min=self.lr_min, optimizer=self.optimizer, max_grad_norm=self.max_grad_norm,
            seed=self.seed, weighting=self.weighting,
            device=self.resolved_device(),
            max_norm_ratio=self.max_norm_ratio, similarity=self.similarity, privacy=self.privacy_config(),
            server_opt=self.server_opt_config(), clients_together=self.clients_together, together_group=self.clients_together_group,
        )

    def server_opt_config(self) -> ServerOptConfig:
        return ServerOptConfig(name=self.server_opt, lr=None if self.server_lr is None else float(self.server_lr),
                               momentum=float(self.server_momentum), beta1=float(self.server_beta1), beta2=float(self.server_beta2),
                               tau=float(self.server_tau))

    def privacy_config(self) -> PrivacyConfig:
        return PrivacyConfig(mode=self.dp, clip=float(self.dp_clip), noise=float(self.dp_noise), delta=float(self.dp_delta),
                             target_epsilon=None if self.dp_target_epsilon is None else float(self.dp_target_epsilon),
                             accountant=self.dp_accountant, secure_noise=bool(self.dp_secure_noise),
                             noise_cohort=_whole(self.dp_noise_cohort, "--dp-noise-cohort"), population=_whole(self.dp_population, "--dp-population"),
                             clip_quantile=None if self.dp_clip_quantile is None else float(self.dp_clip_quantile),
                             clip_lr=float(self.dp_clip_lr),
                             clip_count_std=None if self.dp_clip_count_std is None else float(self.dp_clip_count_std))

    def _key(self) -> str:
        return json.dumps(self.given(), sort_keys=True, default=str)

    def method_object(self):
        """The method object these settings make: built once per settings and kept for :meth:`make_method`."""
        key = self._key()
        if self._method is None or self._method[0] != key:
            ranks = self.ranks()
            given = {}  # --client-ranks read as something else than adapter ranks (LoRA-A²'s budgets): as given
            if REGISTRY.get(self.method, Method).client_ranks_are != "ranks" and self.client_ranks.strip():
                given = {"client_ranks": list(parse_ranks(self.client_ranks, self.clients))}
            method = make_method(self.method, self.adapter, mixed_ranks=ranks is not None and len(set(ranks)) > 1,
                                 keep_head_local=self.keep_head_local, **given, **parse_method_options(self.method, self.method_options))
            object.__setattr__(self, "_method", (key, method))
        return self._method[1]

    def make_method(self):
        """The method's protocol object for a build: the one validation made, handed over once; a fresh one after."""
        method = self.method_object()
        object.__setattr__(self, "_method", None)
        return method

    # ---- validation, once, at the edge -------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Every part's checks (none needs data or a model); ValueError with one sentence naming the value and the
        fix. Settings already validated, unchanged since, are not checked again."""
        key = self._key()
        if self._validated == key:
            return self
        for _, part in self.parts.items():
            part.check(self)
        self.method_object()  # the method × adapter × ranks × options checks; the object is kept for the build
        object.__setattr__(self, "_validated", key)
        return self

    # ---- TOML ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> RunConfig:
        """Settings from a TOML file: flat keys (``local-steps = 4``, at the top or under ``[run]``) or one table per
        part (``[privacy]`` with ``dp = "client"``); ``overrides`` (the flags given) win."""
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid TOML ({exc}); fix the file or drop --config") from None
        flat = _flatten(raw.get("run", raw), str(path))
        for key, value in flat.items():
            cls.check_type(key, value, f"config file {str(path)!r}")
        return cls(**(flat | overrides))

    @classmethod
    def check_type(cls, key: str, value: object, where: str) -> None:
        """Refuse a value of the wrong type for setting ``key`` in one line naming the key, ``where`` and the type
        expected (a string where a boolean belongs is an error, not a guess)."""
        kind = base_type(key)
        if kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind is float:
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, expected = isinstance(value, str), "a string"
        if not ok:
            default = next(f.default for f in cls.fields() if f.name == key)
            example = f" (e.g. {key.replace('_', '-')} = {json.dumps(default)})" if default is not None else ""
            raise ValueError(f"{where}: {key.replace('_', '-')} = {json.dumps(value, default=str)} is not {expected}{example}")


# names the loaders resolve before looking at the file system (models, then packaged data sets)
_NAMES = ("minilm", "smollm2", "synthetic", "tweets", "bbc", "gsm8k", "mbpp", "humaneval")


def _local_path(value: str | None, *, directory_ok: bool) -> bool:
    """Whether ``value`` names an existing local file (or, ``directory_ok``, a model directory) by a relative path;
    not a name (minilm, tweets) or a prefixed one (hf:…, tiny:…), which a same-named folder must not shadow."""
    if not value or os.path.isabs(value) or ":" in value or value in _NAMES:
        return False
    if os.path.isfile(value):
        return True
    return os.path.isdir(value) and (directory_ok or os.sep in value or value.startswith("."))


def _flatten(raw: dict, where: str) -> dict[str, object]:
    owner = _owner()
    flat: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in PARTS and isinstance(value, dict):
            for k, v in value.items():
                n = k.replace("-", "_")
                if owner.get(n) != name:
                    raise ValueError(f"config file {where!r}: [{name}] has no setting {k!r}; its settings are "
                                     f"{', '.join(f.name.replace('_', '-') for f in dataclasses.fields(PARTS[name]))}")
                flat[n] = v
        else:
            flat[name] = value
    unknown = sorted(set(flat) - set(owner))
    if unknown:
        raise ValueError(f"config file {where!r} has unknown key(s) {', '.join(unknown)}; use the long flag names of `fedlora run`")
    return flat


@functools.cache
def base_type(name: str) -> type:
    """The setting's type without ``| None`` (bool, int, float or str)."""
    part = PARTS[_owner()[name]]
    hint = typing.get_type_hints(part)[name]
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return kinds[0]


@functools.cache
def optional(name: str) -> bool:
    """Whether the setting can be "not given" (None)."""
    return type(None) in typing.get_args(typing.get_type_hints(PARTS[_owner()[name]])[name])
