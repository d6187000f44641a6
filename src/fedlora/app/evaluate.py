"""``fedlora eval RUN_DIR``: score a finished run's model again, on its own test sets or on other data and benchmarks,
and keep every result in ``RUN_DIR/eval.json`` (front end of :func:`fedlora.app.export.open_run`).

Our choices: the run is rebuilt from its ``config.json`` and last checkpoint, so the default re-score runs the very
code that scored each round and equals the last recorded global accuracy. ``--client N`` scores client N's own model
(its view of the global state with its private state, at its rank, under the method's local scoring: FedDPA's mix)
on its own test shard and on the global test set. ``--data`` scores on every example of another data set (its labels
must be among the run's); ``--eval`` adds the instruction-tuning benchmarks (causal-LM runs). ``eval.json`` is a list:
a new evaluation is appended, never written over an earlier one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

EVAL_FILE = "eval.json"


def evaluate_run(run_dir: str | Path, *, client: int | None = None, data: str | None = None, evals: str | None = None) -> dict:
    """Score the run in ``run_dir`` as asked, append the result to ``eval.json`` and return it."""
    from fedlora.app.export import open_run, set_model

    run_dir = Path(run_dir)
    if evals:
        from fedlora.app.benchmarks import parse_eval

        parse_eval(evals)  # a bad list fails before the run is rebuilt
    exp = open_run(run_dir, need="evaluate")
    sim, cfg = exp.simulator, exp.config
    if evals and cfg.task_kind().name not in ("causal-lm", "instruct"):
        raise ValueError(f"--eval benchmarks score a causal LM; this run's task is {cfg.task}: drop --eval")
    what = set_model(exp, client) if client is not None else _global_name(exp)
    results: dict[str, object] = {}
    if data is None:
        results |= _run_test_sets(exp, client)
    else:
        results["accuracy"] = _score(exp, client, _other_split(exp, data))  # the model and data are named beside it
    if evals:
        results |= _benchmarks(exp, client, evals)
    entry = {"model": what, "data": data or "the run's test sets", "eval": evals or None, "round": len(sim.history),
             "recorded_global_accuracy": sim.history[-1].get("global_accuracy") if sim.history else None,
             "results": results, "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    append_result(run_dir, entry)
    if cfg.track:
        from fedlora.app.tracking import log_eval

        log_eval(cfg, run_dir, entry, "global" if client is None else f"client_{client}")
    return entry


def append_result(run_dir: Path, entry: dict) -> Path:
    """Add ``entry`` to ``run_dir/eval.json`` (a list; a file that is not one is kept aside as ``eval.json.bak``).
    The run's trackers are told by :func:`evaluate_run` (:func:`fedlora.app.tracking.log_eval`)."""
    path = Path(run_dir) / EVAL_FILE
    entries: list = []
    if path.exists():
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = None
        if not isinstance(entries, list):
            path.replace(path.with_name(EVAL_FILE + ".bak"))
            entries = []
    entries.append(entry)
    tmp = path.with_name(EVAL_FILE + ".tmp")
    tmp.write_text(json.dumps(_strict(entries), indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def _strict(value):
    """``value`` with every NaN (an empty test shard's accuracy) as None: strict JSON, as metrics.jsonl writes it."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _global_name(exp) -> str:
    sim = exp.simulator
    if sim.method.scored_states(sim.held, sim.private) is not None:
        return "global (the mean of the clients' own models, as the run scored it)"
    from fedlora.app.export import set_model

    return set_model(exp, None)  # refuses a run with no one global model


def _run_test_sets(exp, client: int | None) -> dict:
    """The global model: the global accuracy (and the task's extra metrics) exactly as each round scored it. Client N:
    its model on its own test shard (as its local accuracy was scored) and on the global test set."""
    sim = exp.simulator
    if client is None:
        accuracy, extra = sim._score_global()  # the round's own scoring (global, or the mean of the clients' models)
        return {"global_accuracy": accuracy} | {k: v for k, v in extra.items() if k != "reference"}
    own = next(c for c in sim.clients if c.cid == client)
    return {"local_accuracy": _score(exp, client, own.test, train=own.train), "global_accuracy": _score(exp, client, sim.global_test)}


def _score(exp, client: int | None, split, *, train=None) -> float:
    """Accuracy of the global model (or the mean over the clients' own models where the method scores so), or of
    client ``client``'s model under the method's local scoring, on ``split``."""
    from fedlora.app.export import set_model

    sim = exp.simulator
    h, task, device = sim.handle, sim.task, sim.config.device
    if client is None:
        states = sim.method.scored_states(sim.held, sim.private)
        if states:
            scores = []
            for state in states:
                h.set(state)
                scores.append(task.evaluate(sim.model, split, device))
            return sum(scores) / len(scores)
        set_model(exp, None)
        return task.evaluate(sim.model, split, device)
    set_model(exp, client)
    own = next(c for c in sim.clients if c.cid == client)
    with sim.method.local_scoring(h, own.train if train is None else train, device):
        return task.evaluate(sim.model, split, device)


def _other_split(exp, data: str):
    """Every example of ``data`` as the run's task scores it, tokenised as the run's were (labels mapped by name)."""
    cfg = exp.config
    kind = cfg.task_kind().name
    if kind == "synthetic":
        raise ValueError("--data on a synthetic-task run: its examples are generated from its settings; drop --data")
    if kind == "classification":
        from fedlora.data import load_labelled_text
        from fedlora.federation import TokenizedSplit

        other = load_labelled_text(data, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
        unknown = [n for n in other.label_names if n not in exp.label_names]
        if unknown:
            raise ValueError(f"--data {data!r} has labels the run never saw ({', '.join(map(str, unknown[:5]))}); "
                             f"pass data labelled with the run's labels: {', '.join(exp.label_names)}")
        index = [exp.label_names.index(n) for n in other.label_names]
        ds = other.dataset
        return TokenizedSplit.from_texts(exp.tokenizer, ds["text"], [index[i] for i in ds["label"]], cfg.max_length)
    if kind == "instruct":
        from fedlora.data.instruct import load_instruct

        rows = load_instruct(data, prompt_column=cfg.prompt_column, response_column=cfg.response_column, split_by=cfg.attribute,
                             seed=cfg.seed).dataset
    else:
        from fedlora.data import load_instructions

        rows = load_instructions(data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                                 label_column=cfg.label_column, scoring=cfg.scoring, seed=cfg.seed).dataset
    return exp.split(rows)


def _benchmarks(exp, client: int | None, evals: str) -> dict:
    """The ``--eval`` benchmarks on the model asked for (MMLU, TruthfulQA, GSM8K, BBH)."""
    from fedlora.app.benchmarks import benchmark_evaluations
    from fedlora.app.export import set_model
    from fedlora.federation.evaluation import evaluate_all

    sim, cfg = exp.simulator, exp.config
    set_model(exp, client)
    scores = evaluate_all(sim.model, exp.tokenizer, benchmark_evaluations(evals, seed=cfg.seed), device=sim.config.device,
                          batch_size=max(16, cfg.batch_size))
    return {k: v for k, v in scores.items() if not k.endswith("/n")}
