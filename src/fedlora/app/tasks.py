"""Task kinds: what each kind of run supplies to the one build (:func:`fedlora.app.build.build`).

A kind owns its task-dependent defaults (model, adapted layers, max length), its checks, and ``load``: the data
split over the clients with a global test set, the base model and tokenizer, how a split of examples becomes what
the simulator trains on, and the evaluation (``task``) the simulator scores with. A new kind (e.g. instruction tasks
with several evaluations) is one class here and one line in :func:`task_kind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# The --task flag's values. Synthetic data (``synthetic:α,β``) is its own kind under ``classification``.
TASKS = ("classification", "causal-lm", "instruct")


@dataclass
class Loaded:
    """One kind's pieces of a run. ``clients``: (client id, raw train split, raw test split); ``split`` turns a raw split
    into the simulator's; ``task``: the simulator's loss and scoring (None: classification's)."""

    model: object
    tokenizer: object | None
    peft_task_type: str | None
    clients: list[tuple[int, object, object]]
    global_test: object
    split: Callable[[object], object]
    label_names: list[str]
    summary: list[dict] = field(default_factory=list)
    task: object | None = None
    reference: dict | None = None  # the base model's scores before any training (instruct), the reference row


class TaskKind:
    name: str
    defaults: dict[str, object]
    attribute: str | None = None  # the field partitioned over when --split-by is not given (None: the label)

    def check(self, run) -> None:
        """Checks of the settings this kind depends on (no data or model needed)."""
        if run.split_by and self.attribute is None:
            raise ValueError(f"--split-by {run.split_by} partitions instruction data by an attribute; pass --task instruct, or drop --split-by")

    def load(self, run, on_progress: Callable[[str, int], None] | None = None) -> Loaded:
        raise NotImplementedError

    def majority_rate(self, run) -> float | None:
        """The share of the most frequent label of the global test set (None where accuracy has no such floor)."""
        return None


def _majority(labels: list) -> float | None:
    return max(labels.count(x) for x in set(labels)) / len(labels) if labels else None


class TextClassification(TaskKind):
    """Labelled text (tweets, BBC News, a file, a hub dataset) partitioned over the clients by label; a sequence
    classifier with its head; scored by accuracy."""

    name = "classification"
    defaults = {"model": "minilm", "target_modules": "query,value", "max_length": 64}

    def check(self, run) -> None:
        super().check(run)
        if run.model in ("smollm2", "tiny:llama"):
            raise ValueError(f"model {run.model!r} is a causal LM; pass --task causal-lm, or --model minilm for classification")

    def federated(self, run):
        from fedlora.data import federate, load_labelled_text

        labelled = load_labelled_text(run.data, text_column=run.text_column, label_column=run.label_column, seed=run.seed)
        return federate(labelled, **_federate_args(run))

    def load(self, run, on_progress=None) -> Loaded:
        from fedlora.app.models import load_classifier
        from fedlora.federation import TokenizedSplit

        fed = self.federated(run)
        model, tokenizer = load_classifier(run.model, fed.n_labels, seed=run.seed)
        split = lambda ds: TokenizedSplit.from_texts(tokenizer, ds["text"], ds["label"], run.max_length)  # noqa: E731
        return Loaded(model, tokenizer, "SEQ_CLS", [(c.cid, c.train, c.test) for c in fed.clients], fed.global_test, split,
                      list(fed.label_names), fed.partition_summary())

    def majority_rate(self, run) -> float | None:
        return _majority(list(self.federated(run).global_test["label"]))


class Synthetic(TaskKind):
    """``synthetic:α,β`` (:mod:`fedlora.data.synthetic`): generated clients with model and input heterogeneity, the
    task's own frozen network with the adapters on ``fc1`` and ``fc2``, scored by accuracy with the loss and its Bayes
    floor beside it."""

    name = "synthetic"
    defaults = {"model": "synthetic", "target_modules": "fc1,fc2", "max_length": 64}

    def check(self, run) -> None:
        super().check(run)
        from fedlora.data.synthetic import parse

        parse(run.data)  # α and β in range, before anything is generated
        if run.model != "synthetic":
            raise ValueError(f"--data {run.data} brings its own small network; drop --model {run.model} (or pass --model synthetic)")

    def generated(self, run):
        from fedlora.data.synthetic import generate, parse

        return generate(parse(run.data), n_clients=run.clients, examples_per_client=run.examples_per_client or 100,
                        test_examples=run.test_examples, local_test_fraction=run.local_test_fraction, seed=run.seed)

    def load(self, run, on_progress=None) -> Loaded:
        from fedlora.app.models import SyntheticNet
        from fedlora.federation.tasks import SyntheticTask, VectorSplit

        data = self.generated(run)
        split = lambda s: VectorSplit(s.x, s.labels, s.entropy)  # noqa: E731
        clients = [(u, tr, te) for u, (tr, te) in enumerate(data.clients)]
        return Loaded(SyntheticNet(data.weights), None, None, clients, data.global_test, split, data.label_names,
                      data.partition_summary(), SyntheticTask())

    def majority_rate(self, run) -> float | None:
        return _majority(self.generated(run).global_test.labels.tolist())


class CausalLM(TaskKind):
    """Prompt/response records, a causal LM, loss on response tokens only, scored by generation (exact match, last
    number or pass@1; recorded as global/local accuracy)."""

    name = "causal-lm"
    defaults = {"model": "smollm2", "target_modules": "q_proj,v_proj", "max_length": 128}

    def check(self, run) -> None:
        from fedlora.generation import SCORINGS

        super().check(run)
        if run.quantize != "none":
            from fedlora.app.models import quantization_config

            quantization_config(run.quantize)
        if run.model in ("minilm", "tiny:bert", "tiny:gpt2"):
            raise ValueError(f"model {run.model!r} is a model for classification; "
                             "with --task causal-lm pass --model smollm2, tiny:llama or a causal-LM name/path")
        if run.scoring not in ("auto", *SCORINGS):
            raise ValueError(f"unknown scoring {run.scoring!r}; choose auto, {', '.join(SCORINGS)}")
        if run.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={run.max_new_tokens} is below 1; pass --max-new-tokens 1 or more (e.g. 8 for label words, 256 for GSM8K)")
        if not run.code_timeout > 0:
            raise ValueError(f"code_timeout={run.code_timeout} must be positive; pass --code-timeout SECONDS, e.g. 10")

    def load(self, run, on_progress=None) -> Loaded:
        from fedlora.app.models import load_causal_lm
        from fedlora.data import federate, load_instructions
        from fedlora.federation import CausalLMSplit, CausalLMTask

        data = load_instructions(run.data, prompt_column=run.prompt_column, response_column=run.response_column,
                                 label_column=run.label_column, scoring=run.scoring, seed=run.seed)
        fed = federate(data, **_federate_args(run))
        model, tokenizer = load_causal_lm(run.model, seed=run.seed, gradient_checkpointing=run.gradient_checkpointing, quantize=run.quantize)

        def split(ds) -> CausalLMSplit:
            return CausalLMSplit.from_records(tokenizer, list(ds["prompt"]), list(ds["response"]), list(ds["reference"]),
                                              list(ds["tests"]), run.max_length)

        task = CausalLMTask(tokenizer, scoring=data.scoring, max_new_tokens=run.max_new_tokens,
                            eval_batch_size=max(16, run.batch_size), code_timeout=run.code_timeout, on_progress=on_progress)
        return Loaded(model, tokenizer, "CAUSAL_LM", [(c.cid, c.train, c.test) for c in fed.clients], fed.global_test, split,
                      list(fed.label_names), fed.partition_summary(), task)


class Instruct(CausalLM):
    """Clients holding different tasks (``evals:NAME,…``, Dolly, a file), partitioned by a natural attribute (the task
    unless ``--split-by``), trained on response tokens and scored per task by each task's answer rule, with
    ``--eval`` benchmarks on the global model and the base model's scores before training as the reference row."""

    name = "instruct"
    defaults = {"model": "smollm2", "target_modules": "q_proj,v_proj", "max_length": 256}
    attribute = "task"

    def check(self, run) -> None:
        super().check(run)
        if run.scoring != "auto":
            raise ValueError("--scoring is the causal-lm task's; instruct tasks are scored by each task's own rule: drop --scoring")
        if run.eval:
            from fedlora.app.benchmarks import check_archives

            check_archives(run.eval)
        if run.data.startswith("evals:"):
            from fedlora.data.archives import wheel_path

            wheel_path("evals")

    def federated(self, run):
        from fedlora.data import federate
        from fedlora.data.instruct import load_instruct

        data = load_instruct(run.data, prompt_column=run.prompt_column, response_column=run.response_column,
                             split_by=run.attribute, seed=run.seed)
        return federate(data, split_by=run.attribute, **_federate_args(run))

    def majority_rate(self, run) -> float | None:
        """The constant-answer floor of the global test set: the share answered right by giving, for every example of
        a task, that task's most frequent answer (one of the task's own references, matched exactly). A model at this
        rate has learned each task's answer prior (e.g. "always A"), not the tasks."""
        from fedlora.app.benchmarks import constant_answer_rate

        g = self.federated(run).global_test
        return constant_answer_rate(list(g["task"]), [list(r) for r in g["references"]])

    def load(self, run, on_progress=None) -> Loaded:
        from fedlora.app.models import load_causal_lm
        from fedlora.federation.instruct import InstructSplit, InstructTask

        fed = self.federated(run)
        benchmarks = self.benchmarks(run)
        model, tokenizer = load_causal_lm(run.model, seed=run.seed, gradient_checkpointing=run.gradient_checkpointing, quantize=run.quantize)
        columns = ("prompt", "response", "references", "rule", "task")

        def split(ds) -> InstructSplit:
            return InstructSplit.from_rows(tokenizer, [dict(zip(columns, row)) for row in zip(*(ds[c] for c in columns))], run.max_length)

        task = InstructTask(tokenizer, benchmarks=benchmarks, max_new_tokens=run.max_new_tokens, eval_batch_size=max(16, run.batch_size),
                            on_progress=on_progress)
        reference = task.reference = self.reference(run, model, tokenizer, split(fed.global_test), task)
        return Loaded(model, tokenizer, "CAUSAL_LM", [(c.cid, c.train, c.test) for c in fed.clients], fed.global_test, split,
                      list(fed.label_names), fed.partition_summary(), task, reference)

    def benchmarks(self, run) -> list:
        from fedlora.app.benchmarks import benchmark_evaluations

        return benchmark_evaluations(run.eval, seed=run.seed) if run.eval else []

    def reference(self, run, model, tokenizer, global_test, task) -> dict:
        """The base model's scores on the global test tasks and the benchmarks, before any adapter exists: computed
        once per (model, data, evaluations) and cached, so every method and seed of a comparison reads the same row."""
        from fedlora.app.models import cache_dir
        from fedlora.federation.evaluation import base_scores

        evaluations = [global_test.evaluation(max_new_tokens=run.max_new_tokens), *task.benchmarks]
        if run.quantize == "none":
            model.to(run.resolved_device())  # where the simulator will hold it anyway
        key = {"model": run.model, "max_length": run.max_length, "quantize": run.quantize}
        scores = base_scores(model, tokenizer, evaluations, cache_dir=cache_dir() / "base-scores", key=key,
                             device=run.resolved_device(), batch_size=task.eval_batch_size)
        return {k: v for k, v in scores.items() if not k.endswith("/n")}


def _federate_args(run) -> dict:
    return dict(n_clients=run.clients, partition=run.partition, alpha=run.alpha, labels_per_client=run.labels_per_client,
                test_examples=run.test_examples, examples_per_client=run.examples_per_client,
                local_test_fraction=run.local_test_fraction, seed=run.seed)


KINDS: dict[str, TaskKind] = {k.name: k for k in (TextClassification(), Synthetic(), CausalLM(), Instruct())}


def task_kind(task: str, data: str) -> TaskKind:
    """The kind of a run with ``--task task`` on ``--data data``."""
    from fedlora.data.synthetic import is_synthetic

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification" and is_synthetic(data):
        return KINDS["synthetic"]
    return KINDS[task]
