"""Clients trained together: the round's sampled clients' adapters trained in one pass over the shared frozen base.

Multi-LoRA serving routes each request to its own adapter over one base model; here each *client's* batch is
routed to its own trainables. Every trainable of the model is the weight or bias of an ``nn.Linear`` (LoRA's
``lora_A``/``lora_B``, the classifier head PEFT keeps as ``modules_to_save``), so each such layer gets a client
dimension: weight (G, out, in), bias (G, out) for a group of G clients, and its forward becomes one batched product
``y[u] = x[u] W[u]ᵀ + b[u]`` over the rows of client u. The frozen base layers run once on the joint batch (held
once, whatever G), and LoRA's ``x W0ᵀ + s·(x A_uᵀ) B_uᵀ`` comes out per client because PEFT calls ``lora_A`` and
``lora_B`` as modules.

What makes it equal to training the clients one after another (``train_local``), to float tolerance:

- **Data order**: each client draws its batches from its own ``torch.Generator`` seeded as ``train_local`` does.
  Clients' batches differ in length (dynamic padding) and, at the end of a pass, in size: the joint batch takes
  every client's rows at the widest length (the split's own padding columns, attention-masked) and pads a client's
  rows to the largest batch with copies that the loss leaves out.
- **The loss**: the sum over clients of each client's mean cross-entropy over its own examples, so the gradient on
  client u's slice is exactly its sequential gradient.
- **Optimisers**: one AdamW/SGD over the stacked tensors. Both update element by element from that element's
  gradient history and the (shared) step count, so each client's slice gets exactly the update of its own optimiser.
- **Clipping**: ``max_grad_norm`` clips each client's gradient by its own norm over all its trainables (torch's
  ``clip_grad_norm_`` formula, per slice).
- **Dropout**: each client has its own generator, seeded as ``train_local`` seeds the global one, and every dropout
  of the joint pass (``F.dropout``: the model's hidden and attention dropout, the adapter's) draws each client's
  mask from it at the shape the client's own batch has (our choice: the shape is learned once per model by two
  probe forwards, which tell the batch and sequence dimensions of every dropout call apart). SDPA attention with
  dropout is computed by its math path here, which draws the same mask. On a CPU the masks are then bitwise those of
  sequential training. On CUDA sequential training draws its masks in the fused dropout kernel, which no per-client
  generator reproduces; there (our choice) one mask is drawn for the whole joint tensor from a generator seeded with
  the group's first client's seed: independent Bernoulli draws per element as in sequential training, reproducible
  run to run, one kernel per dropout call instead of one per client, but not the sequential run's masks. With
  dropout on, the equality to the sequential run holds on a CPU only.

What cannot be trained together (:func:`blockers`): a method with per-client training hooks (``before_training``,
``after_step``, ``learning_rates``, ``loss_term``, ``local_training``, ``local_scoring``, ``probe``,
``step_correction``, ``client_state``), example-level DP
(DP-SGD clips per example inside one client), adapters other than LoRA and rsLoRA (DoRA's norm, VeRA's and HiRA's
layer math), mixed client ranks, a task other than single-label classification, a trainable outside an
``nn.Linear``, clients that freeze different trainables in a round. ``auto`` then trains them one after another;
``on`` refuses in one line naming the reason.

The ``auto`` rule (:func:`use_together`): on CUDA, together whenever allowed and at least two clients train in the
round; on a CPU, one after another. Our choice: the joint pass is faster on a CPU too (docs/usage.md has the
figures), but sequential training stays the CPU default because it is the reference that Flower's clients and the
resume checks reproduce bit for bit, while the joint pass agrees to float tolerance only; ``on`` uses it on a CPU.
Memory: the base is held once; the stacked trainables, their gradients and optimiser states, and the activations of
one group of at most ``together_group`` clients are held at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.federation.causal_lm import IGNORE, CausalLMTask
from fedlora.federation.protocol import Method
from fedlora.federation.tasks import ClassificationTask

log = logging.getLogger("fedlora")

MODES = ("auto", "on", "off")
TOGETHER_ADAPTERS = ("lora", "rslora")
# Per-client training hooks: a method that overrides any of them trains its clients one after another.
HOOKS = ("before_training", "after_step", "learning_rates", "loss_term", "local_training", "local_scoring", "probe",
         "step_correction", "client_state")
PROBE = ((2, 4), (3, 5))  # (rows, width) of the two probe forwards: every size differs between them and from the others


def blockers(method: Method, adapter: str, cfg, *, mixed: bool, task=None) -> str | None:
    """Why the clients of this run cannot be trained together (None: they can), as the end of a sentence."""
    if cfg.privacy.example_level:
        return "--dp example (DP-SGD) clips each example's gradient within one client's training"
    if adapter not in TOGETHER_ADAPTERS:
        return f"adapter {adapter} (only {' and '.join(TOGETHER_ADAPTERS)} are trained together)"
    if mixed:
        return "mixed --client-ranks (every client must train at the model's rank)"
    hooks = [n for n in HOOKS if getattr(type(method), n) is not getattr(Method, n)]
    if hooks:
        return f"method {method.name} trains each client with its own hooks ({', '.join(hooks)})"
    if task is not None and type(task).loss not in (ClassificationTask.loss, CausalLMTask.loss):
        return f"task {getattr(task, 'name', type(task).__name__)} (its loss is not one the joint pass computes per client)"
    return None


def causal(task) -> bool:
    """Whether the task's loss is next-token cross-entropy on the labelled tokens (else: single-label classification)."""
    return type(task).loss is CausalLMTask.loss


def model_blocker(model: nn.Module, trainable: list[str], *, causal_lm: bool = False) -> str | None:
    """Why this model's trainables cannot be stacked per client (None: they can)."""
    owners = linear_owners(model, trainable)
    missing = [n for n in trainable if n not in owners]
    if missing:
        return f"trainable {missing[0]} is not the weight or bias of a linear layer"
    config = getattr(model, "config", None)
    if causal_lm:
        return None
    if getattr(config, "num_labels", 0) < 2 or getattr(config, "problem_type", None) not in (None, "single_label_classification"):
        return "the model's loss is not single-label cross-entropy"
    return None


def linear_owners(model: nn.Module, names: list[str]) -> dict[str, tuple[str, str]]:
    """Trainable name -> (module name, "weight" or "bias") where its module is an ``nn.Linear``."""
    wanted, out = set(names), {}
    for mname, module in model.named_modules():
        if type(module) is nn.Linear:
            for attr in ("weight", "bias"):
                full = f"{mname}.{attr}"
                if full in wanted:
                    out[full] = (mname, attr)
    return out


def use_together(mode: str, reason: str | None, device: str, clients: int) -> bool:
    """The path a round takes. ``on``: together (``reason`` must be None, else ``ValueError`` naming it); ``off``:
    one after another; ``auto``: together when allowed, on CUDA, with two or more clients in the round."""
    if mode == "on":
        if reason is not None:
            raise ValueError(f"--clients-together on: these clients cannot be trained together: {reason}; pass --clients-together auto or off")
        return True
    return mode == "auto" and reason is None and str(device).startswith("cuda") and clients >= 2


# ---- dropout with one generator per client -------------------------------------------------------------------------
class ClientDropout:
    """``F.dropout`` (and SDPA's dropout) over a joint batch: client u's rows draw their mask from ``gens[u]`` at
    the shape client u's own batch has (``rows[u]`` rows, its width ``widths[u]`` on the sequence dimensions)."""

    def __init__(self, dims: list[tuple[tuple[int, ...], tuple[int, ...]]], gens: list[torch.Generator], rows: list[int],
                 per_client: int, widths: list[int]):
        self.dims, self.gens, self.rows, self.per_client, self.widths, self.call = dims, gens, rows, per_client, widths, 0

    def __call__(self, x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        if not training or p == 0 or x.numel() == 0:
            return x
        if self.call >= len(self.dims):
            raise RuntimeError("the joint pass called dropout more often than the probe forward did")
        batch, seq = self.dims[self.call]
        self.call += 1
        if batch != (0,):
            raise RuntimeError(f"a dropout input's batch is not its first dimension (dimensions {batch})")
        if x.device.type != "cpu":  # one draw for the joint tensor (one kernel, not one per client): see the module's note
            return x * torch.empty_like(x).bernoulli_(1 - p, generator=self.gens[0]).div_(1 - p)
        keep = torch.ones_like(x, requires_grad=False)
        for u, gen in enumerate(self.gens):
            first = u * self.per_client
            shape = [self.rows[u]] + [self.widths[u] if d in seq else x.shape[d] for d in range(1, x.dim())]
            order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # the memory order dropout's mask is drawn in
            drawn = torch.empty([shape[d] for d in order], dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=gen)
            mask = drawn.permute([order.index(d) for d in range(x.dim())]).div_(1 - p)
            region = [slice(first, first + self.rows[u])] + [slice(0, shape[d]) for d in range(1, x.dim())]
            keep[tuple(region)] = mask
        return x * keep


def sdpa_math(dropout: Callable) -> Callable:
    """``F.scaled_dot_product_attention`` whose dropout (when on) goes through ``dropout``: the math path SDPA takes
    on a CPU with dropout, softmax(q kᵀ·scale + mask) then dropout then ·v."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if dropout_p == 0.0:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        w = q @ k.transpose(-2, -1) * scale
        if is_causal:
            L, S = q.shape[-2], k.shape[-2]
            w = w.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if attn_mask is not None:
            w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
        return dropout(torch.softmax(w, dim=-1), dropout_p, True) @ v

    return sdpa


@contextmanager
def patched_dropout(fn: Callable):
    """``F.dropout`` and SDPA replaced by ``fn`` (and SDPA's math path over it) while the block runs."""
    saved = F.dropout, F.scaled_dot_product_attention
    F.dropout, F.scaled_dot_product_attention = fn, sdpa_math(fn)
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = saved


class Recorder:
    """Dropout that records the shape of every call (and drops nothing): the probe forward's."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        if training and p != 0 and x.numel():
            self.shapes.append(tuple(x.shape))
        return x


@torch.no_grad()
def probe_dropout_dims(model: nn.Module, split, device) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per dropout call of a training forward, in order: (batch dimensions, sequence dimensions), told apart by two
    forwards of different rows and widths (``PROBE``)."""
    if len(split) == 0:
        raise RuntimeError("the first client has no training examples to probe the model with")
    runs = []
    for rows, width in PROBE:
        rec = Recorder()
        index = torch.arange(rows) % len(split)
        with patched_dropout(rec):
            model(input_ids=split.input_ids[index, :width].to(device), attention_mask=split.attention_mask[index, :width].to(device))
        runs.append(rec.shapes)
    if len(runs[0]) != len(runs[1]) or any(len(a) != len(b) for a, b in zip(*runs)):
        raise RuntimeError("the model's dropout calls depend on the batch's shape")
    out = []
    rows, widths = (PROBE[0][0], PROBE[1][0]), (PROBE[0][1], PROBE[1][1])
    for a, b in zip(*runs):
        batch = tuple(d for d, xy in enumerate(zip(a, b)) if xy == rows)
        seq = tuple(d for d, xy in enumerate(zip(a, b)) if xy == widths)
        if any(x != y for x, y in zip(a, b)) and len(batch) + len(seq) != sum(x != y for x, y in zip(a, b)):
            raise RuntimeError(f"a dropout input's shape {a} varies with the batch other than by its rows and length")
        out.append((batch, seq))
    return out


def stacked_linear(weight: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """A linear layer's forward with one weight per client: the rows of the joint batch are the clients' in order,
    equally many per client."""
    G = weight.shape[0]

    def forward(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(G, -1, x.shape[-1])
        y = torch.bmm(xs, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, weight.transpose(1, 2))
        return y.reshape(*lead, weight.shape[1])

    return forward


def clip_per_client(stacked: list[Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` on each client's slice of the stacked gradients, by that client's own total norm."""
    grads = [t.grad for t in stacked if t.grad is not None]
    if not grads:
        return
    G = grads[0].shape[0]
    norms = torch.stack([g.reshape(G, -1).norm(dim=1) for g in grads]).norm(dim=0)  # (G,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(G, *([1] * (g.dim() - 1))))


@dataclasses.dataclass
class Group:
    """One group's joint training: stacked trainables per name, per-client seeds, splits and results."""

    names: list[str]
    trainable: list[str]
    states: list[dict[str, Tensor]]
    splits: list
    seeds: list[int]

    def stacks(self, device) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            t = torch.stack([s[n].to(device) for s in self.states]).detach().clone()
            out[n] = t.requires_grad_(n in self.trainable)
        return out


def train_group(model: nn.Module, group: Group, cfg, dims, *, lm: bool = False) -> tuple[list[dict[str, Tensor]], list[float], list[torch.Generator]]:
    """The group's local steps in joint passes: per client its trained tensors and its mean loss, and the dropout
    generators as they end (the last client's is what the global generator would hold after sequential training)."""
    from fedlora.federation.simulator import local_optimizer

    device, G = cfg.device, len(group.states)
    stacks = group.stacks(device)
    owners = linear_owners(model, group.names)
    modules = dict(model.named_modules())
    layers = {m for m, _ in owners.values()}
    for m in layers:
        w, b = f"{m}.weight", f"{m}.bias"
        modules[m].forward = stacked_linear(stacks[w], stacks.get(b) if b in owners else None)
    params = [stacks[n] for n in group.names if n in group.trainable]
    opt = local_optimizer(params, cfg)
    drop_gens = [torch.Generator(device=device).manual_seed(s) for s in group.seeds]
    data_gens = [torch.Generator().manual_seed(s) for s in group.seeds]
    orders = [(torch.empty(0, dtype=torch.long), 0) for _ in range(G)]
    losses: list[Tensor] = []
    model.train()
    try:
        for _ in range(cfg.local_steps):
            batches = []
            for u, split in enumerate(group.splits):
                order, pos = orders[u]
                if pos >= len(order):
                    order, pos = torch.randperm(len(split), generator=data_gens[u]), 0
                batches.append(order[pos : pos + cfg.batch_size])
                orders[u] = (order, pos + cfg.batch_size)
            step_losses = joint_step(model, group.splits, batches, drop_gens, dims, device, lm=lm)
            step_losses.sum().backward()
            if cfg.max_grad_norm:
                clip_per_client(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_losses.detach())  # no host synchronisation per step
    finally:
        for m in layers:
            del modules[m].forward
    trained = [{n: stacks[n][u].detach().clone() for n in group.names} for u in range(G)]
    per_step = torch.stack(losses).double().cpu().tolist()  # [step][client], summed in the steps' order as train_local does
    return trained, [sum(step[u] for step in per_step) / len(per_step) for u in range(G)], drop_gens


def joint_step(model: nn.Module, splits: list, batches: list[Tensor], gens: list[torch.Generator], dims, device, *,
               lm: bool = False) -> Tensor:
    """One forward of every client's batch at once; each client's mean loss over its own examples (a (G,) tensor): cross-entropy on
    the label, or (``lm``) next-token cross-entropy over its labelled tokens, as ``CausalLMTask.loss``."""
    widths = [max(int(s.attention_mask[b].sum(dim=1).max()), 1) for s, b in zip(splits, batches)]
    width, per = max(widths), max(len(b) for b in batches)
    ids, mask, labels = [], [], []
    for s, b in zip(splits, batches):
        padded = torch.cat([b, b[:1].expand(per - len(b))])  # rows beyond the client's batch: left out of its loss
        ids.append(s.input_ids[padded, :width])
        mask.append(s.attention_mask[padded, :width])
        labels.append(s.labels[padded, :width] if lm else s.labels[padded])
    dropout = ClientDropout(dims, gens, [len(b) for b in batches], per, widths)
    labels, inputs = torch.cat(labels).to(device), {"input_ids": torch.cat(ids).to(device), "attention_mask": torch.cat(mask).to(device)}
    if not lm:
        with patched_dropout(dropout):
            logits = model(**inputs).logits
        ce = F.cross_entropy(logits, labels, reduction="none").view(len(batches), per)
        rows = torch.tensor([len(b) for b in batches], device=ce.device)
        real = torch.arange(per, device=ce.device)[None, :] < rows[:, None]
        return torch.where(real, ce, 0.0).sum(dim=1) / rows  # each client's mean over its own rows, in one kernel for all
    return lm_losses(model, inputs, labels, [len(b) for b in batches], per, dropout)


def lm_losses(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor, rows: list[int], per: int, dropout) -> Tensor:
    """Each client's mean next-token cross-entropy over the labelled tokens of its own rows. The LM head runs only
    where a client's token is predicted (``logits_to_keep`` as a mask, as ``CausalLMTask.loss`` does); a model
    without that option gives every position's logits."""
    G = len(rows)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    real = (torch.arange(per, device=labels.device)[None, :] < torch.tensor(rows, device=labels.device)[:, None]).reshape(-1)
    keep &= real[:, None]  # the padding rows of a short batch: no logits, no loss
    with patched_dropout(dropout):
        try:
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        except TypeError:
            logits = model(**inputs, use_cache=False).logits
    if logits.dim() == 3:
        logits = logits[keep]
    ce = F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="none")
    client = keep.nonzero()[:, 0] // per
    sums = torch.zeros(G, dtype=ce.dtype, device=ce.device).index_add(0, client, ce)
    counts = torch.bincount(client, minlength=G).to(ce.dtype)
    return sums / counts


# ---- the round's turns -------------------------------------------------------------------------------------------
def round_blocker(sim, rnd: int, selected: list[int]) -> str | None:
    """Why this simulator's clients cannot be trained together this round (None: they can)."""
    from fedlora.federation.simulator import client_turn

    h, method = sim.handle, sim.method
    reason = blockers(method, h.spec.kind, sim.config, mixed=sim.mixed, task=sim.task)
    if reason is None and sim.turn is not client_turn:
        reason = "the simulator's client turn is replaced"
    if reason is None:
        reason = model_blocker(sim.model, h.trainable_names, causal_lm=causal(sim.task))
    if reason is None:
        frozen = {tuple(sorted(method.frozen(h, rnd, peer=sim.peers[cid], start=sim.held[cid] | sim.private.get(cid, {}))))
                  for cid in selected}
        reason = "the clients freeze different trainables this round" if len(frozen) > 1 else None
    if reason is None:
        need = set(h.trainable_names)
        for cid in selected:
            if not need <= set(sim.held[cid]) | set(sim.private.get(cid, {})):
                return f"client {cid}'s start state does not hold every trainable"
        widths = {sim.clients[cid].train.input_ids.shape[1] for cid in selected}
        reason = "the clients' data are tokenised to different widths" if len(widths) > 1 else None
    return reason


def run_together(sim, rnd: int, selected: list[int]):
    """The round's turns trained together, as ``Simulator._turns`` returns them, or None when the round's clients
    train one after another (``auto`` without the conditions, ``off``); records the path in ``sim.together_ran``."""
    cfg = sim.config
    reason = None if cfg.clients_together == "off" else round_blocker(sim, rnd, selected)
    if not use_together(cfg.clients_together, reason, cfg.device, len(selected)):
        sim.together_ran = False
        return None
    try:
        out = together_turns(sim, rnd, selected)
    except RuntimeError as exc:  # the model does something the joint pass cannot reproduce: this round goes sequential
        if cfg.clients_together == "on":
            raise ValueError(f"--clients-together on: the clients cannot be trained together: {exc}; pass --clients-together auto or off") from None
        log.warning("round %d: clients not trained together (%s); training them one after another", rnd, exc)
        sim.together_ran = False
        return None
    sim.together_ran = True
    return out


def together_turns(sim, rnd: int, selected: list[int]):
    """The selected clients' turns, trained in joint passes of at most ``together_group`` clients, then each scored
    and split into its upload as ``client_turn`` does (``finish_turn``)."""
    from fedlora.federation.screening import Rejection
    from fedlora.federation.simulator import finish_turn, round_lr, round_seed

    h, method, cfg = sim.handle, sim.method, sim.config
    train_cfg = dataclasses.replace(cfg, lr=round_lr(cfg, rnd), lr_schedule="constant") if cfg.lr_schedule != "constant" else cfg
    peer0 = sim.peers[selected[0]]
    frozen = set(method.frozen(h, rnd, peer=peer0, start=sim.held[selected[0]] | sim.private.get(selected[0], {})))
    names = list(h.trainable_names)
    if getattr(sim, "_together_dims", None) is None:
        sim.model.train()
        sim._together_dims = probe_dropout_dims(sim.model, sim.clients[selected[0]].train, cfg.device)
    h.set(sim.held[selected[0]], rank=peer0.rank, scale=peer0.scale)  # every layer's scale s(r): one rank for all
    results, failed, last = [], [], None
    for first in range(0, len(selected), cfg.together_group):
        cids = selected[first : first + cfg.together_group]
        starts = [sim.held[cid] | sim.private.get(cid, {}) for cid in cids]
        group = Group(names, [n for n in names if n not in frozen], [{n: s[n] for n in names} for s in starts],
                      [sim.clients[cid].train for cid in cids], [round_seed(cfg.seed, rnd, cid) for cid in cids])
        trained, losses, gens = train_group(sim.model, group, train_cfg, sim._together_dims, lm=causal(sim.task))
        last = gens[-1]
        for cid, start, state, loss in zip(cids, starts, trained, losses):
            peer = sim.peers[cid]
            try:
                h.set(state, rank=peer.rank, scale=peer.scale)
                results.append(finish_turn(h, method, sim.task, sim.clients[cid], start, cfg, rnd, peer, loss))
            except Exception as exc:
                failed.append(Rejection(cid, f"client {cid} raised {type(exc).__name__} during its turn: {exc}"))
            if sim.on_client:
                sim.on_client(rnd, cid)
    if last is not None and last.device.type == "cpu":  # where sequential training leaves the global generator
        torch.random.default_generator.set_state(last.get_state())
    return results, failed
