"""LoRA-A² (Koo, Jang, Ok, ACL 2025): alternating freeze with rank selection under a per-client upload budget.
Math: :mod:`fedlora.aggregation.loraa2`."""

import math

import torch

from fedlora.aggregation import aggregate, comm_elements
from fedlora.aggregation.loraa2 import AVERAGES, default_budget, pack_mask, rank_scores, select_top, unpack_mask
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, ServerUpdate, register

MASK = "loraa2.mask"  # the upload's packed N·r-bit selection (as the server reads it: the N×r boolean mask)
SELECTED = ".selected"  # suffix of a factor's wire key: its selected columns of ΔB (rows of ΔA)


@register
class LoRAA2(Method):
    """Every client holds the global (B, A) at rank r. Rounds alternate as rolora: odd rounds train B (A frozen),
    even rounds A (Algorithm 1, ``t % 2 = 1`` → B; §4.1's sentence states the opposite parity and would train A
    against B = 0 first: a lost round). Client u has an upload budget of b_u ranks per module on average
    (``--client-ranks`` read as budgets, given to clients in turn; else ``--loraa2-budget``, default ⌈r/4⌉: our
    choice, the paper's analysis uses 2 of 16).

    Rank selection (eq. 4, Alg. 2): before training, a probe from the global state trains the round's factor unmasked
    for ⌈K/5⌉ of the round's K local steps (the paper: 1 epoch before 5; our mapping), with the round's seeds (it
    sees the first batches the training will see), and is discarded. Scores ``S_{m,i} = ‖ΔB[:, i]‖·‖A[i, :]‖``
    (A-rounds ``‖B[:, i]‖·‖ΔA[i, :]‖``); the top b_u·N (module, rank) pairs over all N modules are kept (ties: the
    earlier module, then the lower rank). Training restarts from the global state and after every optimizer step
    the unselected columns (rows) are reset to their start values: eq. 6 masks the update, weight decay included.

    Up: per module the selected columns of ΔB (d each; rows of ΔA, k each) and one N·r-bit mask, packed in
    ⌈N·r/8⌉ bytes (``side_bytes``); the head, trained every round, as in rolora. The server reads them back into the
    dense trained factor (``receive``; unselected columns = the start) and applies Alg. 1:
    ``B^{t+1} = B^t + Σ_u w_u (ΔB_u ⊙ M_u)`` over this round's clients, unselected entries as zero
    (``--loraa2-average selected``: renormalised per (module, rank) over its selectors; off by default).
    Down: the trained factor (``dr`` or ``rk``) and the head. ``η_B = 5η_A`` (App. B, after LoRA+):
    ``--loraa2-lr-ratio 5`` multiplies the lr of B (``--lr`` is η_A; the head trains at ``--lr``).

    Exact (A shared and frozen): ``B^{t+1}A − B^tA = Σ_u w_u (B_u − B^t) A``. One rank for all clients. The rule is
    a weighted sum, but the compact upload (columns chosen per client) cannot be summed securely as sent. Under
    secure aggregation (Flower's SecAgg+) each client adds instead its dense trained factor ``B^t + ΔB_u ⊙ M_u``
    (d×r per module; A-rounds r×k) and its N×r mask as floats (``secure_upload``): no saving, as METHODS.md says. The
    server's mean factor is then ``B^t + Σ_u w_u ΔB_u ⊙ M_u`` itself (Σ w = 1), the rule's result; with
    ``--loraa2-average selected`` the mean mask is each component's ``Σ_u w_u M_{u,i}`` to renormalise by. The
    budget is then not enforced by the server (it sees no single mask). Client-level DP is refused (it would clip
    the compact uploads). Adapters:
    LoRA, rsLoRA and HiRA (their B columns and A rows are rank components); DoRA and VeRA are refused. No public
    code exists to compare with."""

    name = "loraa2"
    async_refusal = "every client's rank selection is one phase for all"
    title = "LoRA-A² (Koo, Jang, Ok, ACL 2025)"
    rule = "loraa2"
    summary = ("alternating as rolora; client u keeps the top b_u·N (module, rank) pairs by ‖ΔB_i‖‖A_i‖ from a probe, "
               "trains masked; B ← B + Σ w_u ΔB_u ⊙ M_u (A-rounds alike); up + N·r mask bits")
    up = "⌈r/4⌉d (B-rounds), ⌈r/4⌉k (A-rounds)"
    down = "dr (B-rounds), rk (A-rounds)"
    exact = True
    client_ranks_are = "upload budgets"
    server_opt = SERVER_OPT_FACTORS  # on the trained factor: the frozen one is not in the broadcast
    unsupported = {
        "dora": "DoRA's magnitude vectors train unmasked every round and its normalisation is not linear in B, so a rank "
                "mask neither bounds the upload nor keeps the round exact; choose lora, rslora or hira",
        "vera": "VeRA's trainables are scaling vectors over shared projections, not factor columns a mask can select; "
                "choose lora, rslora or hira",
    }
    options = {
        "budget": Option(0, "LoRA-A²: upload budget in ranks per module on average (0: ⌈r/4⌉); --client-ranks gives one per client"),
        "average": Option("all", "LoRA-A²: the server's mean over all clients (unselected = 0) or per rank over its selectors", AVERAGES),
        "lr_ratio": Option(5.0, "LoRA-A²: η_B/η_A, the lr multiplier of B (--lr is η_A)"),
    }

    @classmethod
    def linear_text(cls) -> str:
        return "masked sum (secure sum: dense upload)"

    def secure_summable(self):
        return True

    @classmethod
    def ranks(cls, rank, given, clients):
        if given and max(given) > rank:
            raise ValueError(f"loraa2 reads --client-ranks as upload budgets in ranks per module, but {max(given)} exceeds "
                             f"the rank {rank}; pass budgets from 1 to {rank}, or raise --rank")
        return rank, None  # every client holds the global adapter at --rank

    def __init__(self, **options):
        super().__init__(**options)
        if self.settings["budget"] < 0:
            raise ValueError(f"loraa2-budget={self.settings['budget']} is negative; pass a budget ≥ 1, or 0 for ⌈r/4⌉")
        if not self.settings["lr_ratio"] > 0:
            raise ValueError(f"loraa2-lr-ratio={self.settings['lr_ratio']} must be positive; pass e.g. 5")
        self._round: dict[int, tuple[int, dict, dict]] = {}  # cid → (round, start of the trained factor, masks)

    @staticmethod
    def trained(rnd: int) -> str:
        """The factor round ``rnd`` trains and sends: B in odd rounds (round 1 first), A in even ones."""
        return "B" if rnd % 2 == 1 else "A"

    def budget(self, r: int, peer=None) -> int:
        """Client ``peer``'s upload budget b_u (ranks per module on average) at rank r."""
        if self.client_ranks and peer is not None and peer.cid >= 0:
            b = self.client_ranks[peer.cid % len(self.client_ranks)]
        else:
            b = self.settings["budget"] or default_budget(r)
        if b > r:
            raise ValueError(f"loraa2's upload budget {b} exceeds the rank {r}; pass a budget from 1 to {r}")
        return b

    def _names(self, h, rnd):
        """Per module, the round's trained factor's parameter name and its rank dimension."""
        return {m: (k.B if self.trained(rnd) == "B" else k.A) for m, k in h.keys.items()}

    def frozen(self, h, rnd, peer=None):
        return h.A_names() if self.trained(rnd) == "B" else h.B_names()

    def learning_rates(self, h, rnd, peer):
        return {n: self.settings["lr_ratio"] for n in h.B_names()} if self.trained(rnd) == "B" else {}

    def comm_options(self, rnd):
        return {"trained": self.trained(rnd)}

    def declared_elements(self, d, k, r, U, rnd, *, module=None, peer=None):
        """Per matrix: b_u·d (b_u·k) up on average over the modules (exact per matrix when the adapted matrices share
        their shape), the trained factor down; the mask's bits are ``side_bytes``."""
        return comm_elements(self.rule, d, k, r, U, trained=self.trained(rnd), budget=self.budget(r, peer))

    def side_bytes(self, h, rnd, peer=None):
        return math.ceil(len(h.keys) * h.rank / 8), 0

    # ---- the client -------------------------------------------------------------------------------------------
    def select(self, h, start, probe, rnd, peer) -> dict[str, torch.Tensor]:
        """Per module the boolean mask (length r) of the components client ``peer`` keeps, from the probe's update."""
        B0, A0 = h.factors(start)
        B1, A1 = h.factors(probe)
        trained = self.trained(rnd)
        scores = [rank_scores(B1[m] - B0[m], A0[m], "B") if trained == "B" else rank_scores(A1[m] - A0[m], B0[m], "A")
                  for m in h.keys]
        masks = select_top(scores, self.budget(h.rank, peer) * len(h.keys))
        return dict(zip(h.keys, masks))

    def before_training(self, h, peer, rnd, steps, local_steps):
        start = h.get()
        steps(math.ceil(local_steps / 5))
        probe = h.get()
        h.set(start, rank=peer.rank, scale=peer.scale)
        masks = self.select(h, start, probe, rnd, peer)
        names = self._names(h, rnd)
        self._round[peer.cid] = (rnd, {names[m]: start[names[m]] for m in h.keys}, masks)

    def after_step(self, h, peer, rnd):
        held = self._round.get(peer.cid)
        if held is None or held[0] != rnd:
            return
        _, starts, masks = held
        with torch.no_grad():
            for m, name in self._names(h, rnd).items():
                off = (~masks[m]).nonzero().flatten()
                if len(off):
                    p, dim = h.parameter(name), h.rank_dim[name]
                    idx = off.to(p.device)
                    p.index_copy_(dim, idx, starts[name].to(p.device).index_select(dim, idx))

    def upload(self, h, tensors, rnd, start=None, peer=None):
        base = super().upload(h, tensors, rnd, start=start, peer=peer)
        names = self._names(h, rnd)
        if start is None or peer is None or peer.cid not in self._round:  # the layout the server reads (receive)
            return base | {MASK: torch.zeros(len(h.keys), h.rank, dtype=torch.bool)}
        _, starts, masks = self._round.pop(peer.cid)
        out = {n: t for n, t in base.items() if n not in starts}
        for m, name in names.items():
            on = masks[m].nonzero().flatten()
            if len(on):
                dim = h.rank_dim[name]
                delta = tensors[name] - starts[name].to(tensors[name].device)
                out[name + SELECTED] = delta.index_select(dim, on.to(delta.device)).contiguous()
        out[MASK] = pack_mask(torch.stack([masks[m] for m in h.keys]))
        return out

    # ---- the server -------------------------------------------------------------------------------------------
    def receive(self, h, upload, start, rnd, peer):
        """The dense trained factor (start + the selected columns; the others the start) and the N×r mask; a mask
        over the client's budget, a missing or surplus column block, or a block of the wrong shape fails."""
        if not isinstance(upload, dict) or MASK not in upload:
            raise ValueError(f"it lacks {MASK!r}")
        masks = unpack_mask(upload[MASK], len(h.keys), h.rank)
        allowed = self.budget(h.rank, peer) * len(h.keys)
        if int(masks.sum()) > allowed:
            raise ValueError(f"its mask selects {int(masks.sum())} (module, rank) pairs, over its budget of {allowed}")
        out = {n: t for n, t in upload.items() if n != MASK and not n.endswith(SELECTED)}
        for i, name in enumerate(self._names(h, rnd).values()):
            dim, on, block = h.rank_dim[name], masks[i].nonzero().flatten(), upload.get(name + SELECTED)
            dense = start[name].clone()
            if len(on):
                shape = list(dense.shape)
                shape[dim] = len(on)
                if not isinstance(block, torch.Tensor) or list(block.shape) != shape or block.dtype != dense.dtype:
                    raise ValueError(f"{name + SELECTED!r} must be a {dense.dtype} tensor of shape {tuple(shape)}")
                idx = on.to(dense.device)
                dense.index_copy_(dim, idx, dense.index_select(dim, idx) + block.to(dense.device))
            elif block is not None:
                raise ValueError(f"it sends {name + SELECTED!r}, which its mask does not select")
            out[name] = dense
        surplus = [n for n in upload if n.endswith(SELECTED) and n.removesuffix(SELECTED) not in out]
        if surplus:
            raise ValueError(f"it sends {surplus[0]!r}, no factor this round trains")
        return out | {MASK: masks}

    # ---- secure aggregation: dense uploads -----------------------------------------------------------------------
    def secure_upload(self, h, upload, start, rnd, peer=None):
        """The dense trained factor (start + ΔB ⊙ M: the compact upload decoded as the server's ``receive`` does) and
        the N×r mask as float32, both summable; ``start`` None: the layout (the dense factor and an N×r mask)."""
        dense = dict(upload) if start is None else self.receive(h, upload, start, rnd, peer)
        return dense | {MASK: dense[MASK].to(torch.float32)}

    def _from_secure_mean(self, h, mean, current, rnd):
        """The secure sum's weighted mean as the one input of the dense rule: its factor is already
        ``B^t + Σ_u w_u ΔB_u ⊙ M_u`` (Σ w = 1); ``--loraa2-average selected`` divides each rank component's update by
        its share of selectors ``Σ_u w_u M_{u,i}`` (the mean of the masks; none: unchanged)."""
        out = dict(mean)
        if self.settings["average"] != "selected":
            return out
        shares = mean[MASK].to(torch.float64)
        for i, name in enumerate(self._names(h, rnd).values()):
            dim, start = h.rank_dim[name], current[name].to(torch.float64)
            c = torch.where(shares[i] > 0, 1.0 / shares[i].clamp_min(1e-300), torch.zeros_like(shares[i])).to(start.device)
            c = c[None, :] if dim == 1 else c[:, None]
            out[name] = (start + (mean[name].to(torch.float64) - start) * c).to(mean[name].dtype)
        return out

    def aggregate(self, h, uploads, weights, current, ctx):
        trained, rnd = self.trained(ctx.number), ctx.number
        new, layers = dict(current), {}
        secure = len(uploads) == 1 and uploads[0][MASK].is_floating_point()  # a secure sum's mean (secure_upload)
        if secure:
            uploads = [self._from_secure_mean(h, uploads[0], current, rnd)]
        B0, A0 = h.factors(current)
        for i, (m, k) in enumerate(h.keys.items()):
            Bs = [u[k.B] for u in uploads] if trained == "B" else [B0[m]] * len(uploads)
            As = [u[k.A] for u in uploads] if trained == "A" else [A0[m]] * len(uploads)
            masks = None if secure else [u[MASK][i] for u in uploads]
            layers[m] = aggregate(self.rule, Bs, As, weights, name=m, trained=trained, masks=masks,
                                  average=self.settings["average"], start=current[self._names(h, rnd)[m]])
        h.write_factors(layers, uploads, new, B=trained == "B", A=trained == "A")
        for n in h.other_names:  # the head (and any other shared trainable), averaged
            if all(n in u for u in uploads):
                new[n] = sum(float(w) * u[n].to(torch.float64) for w, u in zip(weights, uploads)).to(current[n].dtype)
        frozen = set(self.frozen(h, rnd))
        return ServerUpdate(broadcast={n: t for n, t in new.items() if n not in frozen}, layers=layers)
