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
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "fedlora.json"


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
    """``base_model_name_or_path`` of the exported adapter: what PEFT recorded when it names the base absolutely (a
    hub name, an absolute path); otherwise (None for a model built from a config, ``tiny:bert``; a relative path) the
    run's ``--model``, absolute when it is a local path, so the adapter says which base it belongs to."""
    import os

    cfg = json.loads(path.read_text())
    recorded = cfg.get("base_model_name_or_path")
    if recorded and (os.path.isabs(recorded) or not os.path.exists(recorded)):
        return
    cfg["base_model_name_or_path"] = os.path.abspath(model) if os.path.exists(model) and ":" not in model else model
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_global_model(run_dir: str | Path):
    """(PeftModel, tokenizer, label_names) of a finished run's global model, on the original base model
    (a causal LM for ``--task causal-lm`` runs)."""
    from peft import PeftModel

    from fedlora.app.models import load_causal_lm, load_classifier

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    manifest = json.loads((run_dir / "adapter" / MANIFEST).read_text())
    if manifest.get("no_global_model"):
        raise ValueError(manifest["no_global_model"])
    if config.get("task") == "causal-lm":  # label_names are then the partition's labels, not a head's
        base, tokenizer = load_causal_lm(config["model"], seed=config["seed"])
    else:
        base, tokenizer = load_classifier(config["model"], len(manifest["label_names"]), seed=config["seed"])
    if manifest["base_delta"] and not manifest["folds_in_adapter"]:
        deltas = load_file(str(run_dir / manifest["base_delta"]))
        with torch.no_grad():
            for module, delta in deltas.items():  # each in its weight's own layout (HiRA's, DoRA's, VeRA's folds)
                base.get_submodule(module).weight.add_(delta)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return model, tokenizer, manifest["label_names"]
