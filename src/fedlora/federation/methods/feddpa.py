"""FedDPA (Yang et al., NeurIPS 2024): a global adapter trained, sent and averaged as FedIT, and a local adapter that
never leaves the client, mixed per instance at scoring. Math: the FedIT rule (:mod:`fedlora.aggregation.fedit`);
the structure: :func:`fedlora.adapters.structures.add_local_adapter`."""

from contextlib import contextmanager

import torch

from fedlora.adapters.structures import LOCAL, add_local_adapter, cosine_to, mean_pooled
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, register

REFERENCE_EXAMPLES = 64  # training examples whose representations a client compares each test input with


@register
class FedDPA(Method):
    """Two LoRA adapters on the same layers of every client: the global one (``default``: trained, uploaded and
    averaged exactly as FedIT) and a local one (``local``: trained, kept, never sent). A client's own model is
    ``y = W0x + s(1−α_x)·B_gA_g x + s·α_x·B_lA_l x``; the global model is the global adapter alone.

    Choices where the paper and METHODS.md leave them open:

    - Training, each round: the local steps on the global adapter (and head) with the local adapter off (so what
      goes up is FedIT's), then as many steps on the local adapter alone, the global one frozen, on the fixed mix
      α = ``--feddpa-train-alpha`` (default 0.5): the paper's "FedDPA-T" schedule.
    - α_x: the mean cosine similarity, clipped to [0, 1], of the input's representation to those of the client's
      first 64 training examples; a representation is the frozen base model's last hidden state (adapters off)
      mean-pooled over the real tokens (the public code measures it on a padding token). Computed per batch
      before the adapted forward; in generation once per prompt, then kept for the new tokens.
    - The outputs are mixed, not the A and B tensors (interpolating the factors mixes products that were never
      trained together).
    - The head is global (averaged, as FedIT's); ``--keep-head-local`` keeps it private instead.
    - Linear (FedIT's sums). LoRA and rsLoRA; one rank for all clients.
    """

    name = "feddpa"
    title = "FedDPA (Yang et al., NeurIPS 2024)"
    rule = "fedit"
    server_opt = SERVER_OPT_FACTORS
    summary = "global adapter as FedIT + a private local adapter; outputs mixed per instance by similarity"
    exactness = "personalised"
    personalised = True
    linear = True
    asynchronous = "inexact"  # the global adapter mixed as fedit's; the local one stays the client's (private state)
    options = {"train_alpha": Option(0.5, "FedDPA's mix weight of the local adapter while it trains (0 < α ≤ 1)")}
    unsupported = {
        "dora": "the per-instance mix adds the two adapters' LoRA paths B·A·x; DoRA's normalised update is not of that form; choose lora or rslora",
        "vera": "not offered: the local path would need VeRA's shared projections and λ vectors; choose lora or rslora",
        "hira": "not offered: HiRA's update W0 ⊙ B·A is not a LoRA path B·A·x to mix; choose lora or rslora",
    }

    def __init__(self, **options):
        super().__init__(**options)
        if not 0.0 < self.settings["train_alpha"] <= 1.0:
            raise ValueError(f"feddpa-train-alpha={self.settings['train_alpha']} is outside (0, 1]; pass e.g. 0.5")
        self.mix = None

    def prepare(self, model, spec, seed):
        config = spec.peft_config(None)
        config.modules_to_save = None
        self.mix = add_local_adapter(model, config)

    def local_names(self, h):
        return [n for n in h.trainable_names if f".{LOCAL}." in n]

    def frozen(self, h, rnd):
        return self.local_names(h)  # off while the global adapter trains; trained by local_training

    def private(self, h):
        return self.local_names(h) + super().private(h)

    def aggregate(self, h, uploads, weights, current, ctx):
        update = super().aggregate(h, uploads, weights, current, ctx)  # FedIT on the global adapter and head
        private = set(self.private(h))
        update.broadcast = {n: t for n, t in update.broadcast.items() if n not in private}  # nothing local goes down
        return update

    def local_training(self, h, steps):
        local = self.local_names(h)
        h.set_trainable(h.trainable_names, False)
        h.set_trainable(local, True)
        with self.mix.mixed(self.settings["train_alpha"]):
            steps()

    @contextmanager
    def local_scoring(self, h, train, device):
        reference = self.represent(h, _first(train, REFERENCE_EXAMPLES, device))
        inner = h.model.get_base_model()
        busy = False

        def before(module, args, kwargs):
            nonlocal busy
            ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
            if busy or (ids is None and kwargs.get("x") is None):
                return
            if ids is None:  # the synthetic task's vectors
                busy = True
                try:
                    self.mix.alpha = cosine_to(self.represent(h, {"x": kwargs["x"]}), reference).clamp(0.0, 1.0).float()
                finally:
                    busy = False
                return
            kept = self.mix.alpha
            if ids.shape[1] == 1 and isinstance(kept, torch.Tensor) and kept.shape[0] == ids.shape[0]:
                return  # a generated token with the prompt's cache: keep the prompt's α
            busy = True
            try:
                alpha = cosine_to(self.represent(h, {"input_ids": ids, "attention_mask": mask}), reference).clamp(0.0, 1.0)
            finally:
                busy = False
            self.mix.alpha = alpha.float()

        hook = inner.register_forward_pre_hook(before, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            self.mix.alpha = 0.0

    @torch.no_grad()
    def represent(self, h, batch):
        """The frozen base model's last hidden state, mean-pooled over the real tokens (adapters off); on the synthetic
        task, its network's hidden layer."""
        if "x" in batch:
            with torch.no_grad(), h.model.disable_adapter():
                return h.model.get_base_model().hidden(batch["x"])
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        was_training = h.model.training
        h.model.eval()  # no dropout in a representation
        try:
            with h.model.disable_adapter():
                out = h.model.get_base_model()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        finally:
            h.model.train(was_training)
        return mean_pooled(out.hidden_states[-1], mask)


def _first(split, n, device):
    index = torch.arange(min(n, len(split)))
    batch = getattr(split, "prompt_batch", split.batch)(index, device)  # causal LM: the prompts, as scored
    if "x" in batch:
        return {"x": batch["x"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
