"""ILoRA (Zhou, Liu, Shang, arXiv 2511.16069): QR initialisation with a frozen offset, and QR truncation of the
aggregate. Math: :mod:`fedlora.aggregation.ilora`; the offset: :class:`fedlora.adapters.structures.QROffset`."""

import torch

from fedlora.adapters.structures import QROffset
from fedlora.aggregation import Aggregate, aggregate
from fedlora.aggregation.ilora import TRUNCATIONS, client_variate, pad_to, qr_init, rebase, server_variate
from fedlora.federation.methods.svd import ProductDelta
from fedlora.federation.protocol import STATE, Method, Option, ServerUpdate, is_state, register

CV_MODES = ("scaffold", "off")
# Method-state keys (protocol.STATE), each followed by a factor's parameter name: the server's c segment in a delivery
# (and the client's view), the client's own c_u and the basis (its start B) c_u is expressed in, and the upload's Δc_u.
C, CU, BASIS, DC = STATE + "c.", STATE + "cu.", STATE + "basis.", STATE + "dc."


@register
class ILoRA(ProductDelta, Method):
    """Every process QRs each base weight W0 (Householder, diag R ≥ 0), no bytes. Client u (rank r_u, scale s_u)
    starts from ``T_u = Q[:, :r_u] R[:r_u]`` (``B = Q[:, :r_u]``, ``A = R[:r_u]/s_u``) over the frozen offset
    ``−T_u``, so its round-1 model is W0 exactly. The server keeps the global content G at rank r = r_max
    (``G = s·B_g A_g``, B_g orthonormal; at start ``Q_r R_r``), forms ``M = G + Σ_u w_u (s_u B_u A_u − T_u)``, T_u
    what client u started the round from, and truncates it by QR in factor space: ``Q_r = qr(M[:, :r])``,
    ``G' = Q_r (Q_rᵀ M)``. Client u receives the nested truncation ``(Q_r[:, :r_u], (Q_rᵀM)[:r_u]/s_u)``.

    The method is taken from summaries of the paper (its method section could not be read), as METHODS.md writes it.
    Choices where METHODS.md and the sources leave them open:

    - The offset is a frozen adapter structure (:class:`~fedlora.adapters.structures.QROffset`): one base in memory
      holding ``W0 − T_r`` (folded once, at build; the handle counts it as a fold, so the export reproduces the
      global model on the original W0), and for a client of rank ρ < r a frozen tail ``Q[:, ρ:r]R[ρ:r]``. Never the
      FedLLM-Factory trap of restoring W0 while the adapter still holds B0A0 (W0's QR part added twice).
    - Mixed ranks: the paper's ``Σ w_u s B_u A_u`` is this rule with one rank; with mixed ranks its literal sum mixes
      different init parts and breaks every client's offset even without training. ``M = G + Σ w_u(s_uB_uA_u − T_u)``
      keeps them: without training G' = G.
    - ``--ilora-truncate svd``: ``[M]_r`` instead (one rank only: an SVD truncation does not keep a lower rank's QR
      offset). B is orthonormal in both (svd: U_r, Σ_rV_rᵀ/s).
    - Client control variates (``--ilora-cv scaffold``, the default; "AdamW with rank-aware control variates" in the
      summaries, the formula unread): METHODS.md's SCAFFOLD-II in AdamW's step space. Client u trains its K steps as
      ``x ← x − η(m̂/(√v̂+ε) + c[:r_u] − c_u)`` (the local AdamW has λ = 0; ``Method.step_correction``) and keeps
      ``c_u⁺ = c_u − c[:r_u] + (x_start − x_end)/(Kη)``: SCAFFOLD's option II, the mean of the uncorrected steps
      m̂/(√v̂+ε). METHODS.md writes the shorthand ``(x_start − x_end)/(Kη)``; taken literally it would feed the
      correction c − c_u back into c_u, so the ``c_u − c`` term is SCAFFOLD's and ours. It uploads
      ``Δc_u = c_u⁺ − c_u``; the server sets ``c ← c + (1/N) Σ_{u∈S} pad(Δc_u)`` per rank segment (zeros beyond r_u;
      N the run's clients) and sends client u the segment ``c[:r_u]`` with its factors, not rescaled by s/s_u
      as its A is (AdamW's step directions m̂/(√v̂+ε) do not scale with the factors). Variates exist for the
      factors B and A only (the head trains plainly). Round 1 has ``c = c_u = 0``: its training is plain AdamW, as
      ``--ilora-cv off``. Bytes: ``r_u(d+k)`` more up (Δc_u) and down (c[:r_u]) per matrix (``side_bytes``).
    - Re-basing (our choice): c and every c_u live in the coordinates of the factors they were computed against,
      and the QR gives new factors every round. They are carried to the new basis by the projection the factors
      move by, ``P = B_newᵀ B_old`` (:func:`~fedlora.aggregation.ilora.rebase`: ``c_B ← c_B Pᵀ``, ``c_A ← P c_A``;
      an exact change of coordinates where the spans agree, the part outside the new span dropped otherwise). The
      server re-bases c from the round's global B to the new one after adding the Δc; client u keeps with c_u the B
      it started from and re-bases c_u from it to its next start's B (over any number of rounds it was away), at
      its own rank (``P_u = B_new[:, :r_u]ᵀ B_old[:, :r_u]``). c_u is the client's private state and c the
      method's server state, both checkpointed, so a resumed run continues them. ``--ilora-cv off``: plain AdamW.
    - Metrics: ``ρ`` compares G' with ΔW* = Σ w_u s_u B_u A_u; with one rank M = ΔW*, so ρ is the truncation error.
    - ``--async fedbuff`` (product-delta form, :class:`~fedlora.federation.methods.svd.ProductDelta`): the rule's own
      start terms take the stale starts, ``M = G + Σ_u w_u h(τ_u)(s B_uA_u − s B_{v_u}A_{v_u})`` (B_u and T_u scaled by
      h(τ_u)), the head moves as FedBuff's ``x + Σ w_u h(τ)(x_u − x_{v_u})``, and a stale client's Δc_u, computed in
      its start's basis B_{v_u}, is re-based to the current B before the server adds it (our choice; the variates
      stay a heuristic there). FedAsync is refused.

    Traits: mixed ranks; not exact (the QR truncation is not the best rank-r fit: it projects onto the span of M's
    first r input columns); not linear (the QR needs each client's factors). LoRA and rsLoRA. No server optimiser.
    """

    name = "ilora"
    title = "ILoRA (Zhou, Liu, Shang, arXiv 2511.16069)"
    rule = "ilora"
    summary = ("QR init of W0 with a frozen offset −T_u (round-1 model = W0); M = G + Σ w_u(s_uB_uA_u − T_u), "
               "truncated by QR of its first r columns (factor space); client u gets the nested rank-r_u truncation")
    up = "r_u(d+k) (+ as much again for Δc_u under ilora-cv scaffold)"
    down = "r_u(d+k) (+ as much again for the c segment under ilora-cv scaffold)"
    mixed_ranks = True
    server_opt_refusal = "its result is a new QR basis every round, so per-factor optimiser state would have no fixed coordinates"
    options = {
        "truncate": Option("qr", "ILoRA's truncation of the aggregate: qr (the paper's, of M's first r columns) or svd "
                                 "(the best rank-r fit [M]_r; one rank only)", choices=TRUNCATIONS),
        "cv": Option("scaffold", "ILoRA's client control variates: scaffold (SCAFFOLD-II in AdamW's step space, Δc up and "
                                 "the c segment down: twice the bytes) or off (plain local AdamW)", choices=CV_MODES),
    }
    unsupported = {
        "dora": "ILoRA's offset W0 − T_u + s·BA is a LoRA path; DoRA's weight normalisation of it is not; choose lora or rslora",
        "vera": "VeRA's factors are shared random projections; they cannot hold W0's QR factors; choose lora or rslora",
        "hira": "HiRA's update W0 ⊙ BA cannot start from W0's QR part T; choose lora or rslora",
    }

    def __init__(self, **options):
        super().__init__(**options)
        self.clients = 0  # N, the run's clients (Method.schedule)
        self.c: dict[str, torch.Tensor] = {}  # the server's c per factor name, rank r, in the global factors' basis
        self._turn: tuple[int, int, float, int] | None = None  # (client, round, η, K) of the turn being trained

    @property
    def variates(self) -> bool:
        return self.settings["cv"] == "scaffold"

    def prepare(self, model, spec, seed):
        QROffset(model, spec.r, spec.scale_at(spec.r), qr_init)

    def schedule(self, rounds, clients=0):
        self.clients = clients

    # ---- control variates on the client ------------------------------------------------------------------------
    def _own(self, h, start):
        """Client u's c_u per factor name at its rank, re-based from the B it was computed against to ``start``'s B."""
        out = {}
        for k in h.keys.values():
            B = start[k.B]
            cB, cA = start.get(CU + k.B), start.get(CU + k.A)
            if cB is None:
                out[k.B], out[k.A] = torch.zeros_like(B), torch.zeros_like(start[k.A])
            else:
                out[k.B], out[k.A] = rebase(cB, cA, B, start[BASIS + k.B])
        return out

    def _server(self, h, start, name):
        """The server's c segment for factor ``name`` as the client received it (zero before any was sent)."""
        c = start.get(C + name)
        return torch.zeros_like(start[name]) if c is None else c

    def step_correction(self, h, peer, rnd, start, lr, steps):
        """``c[:r_u] − c_u`` per factor, padded with zeros to the model's rank (the components beyond r_u stay zero)."""
        if not self.variates:
            return {}
        self._turn = (peer.cid, rnd, lr, steps)
        own = self._own(h, start)
        return {n: pad_to(self._server(h, start, n) - own[n], h.rank, h.rank_dim[n]) for n in own}

    def _updated(self, h, peer, rnd, start, trained):
        """c_u⁺ per factor name (client_variate), from the turn's η and K (step_correction)."""
        if self._turn is None or self._turn[:2] != (peer.cid, rnd):
            raise ValueError(f"ilora: client {peer.cid}'s control variate for round {rnd} needs its step size; "
                             "train the turn through client_turn (Method.step_correction) first")
        _, _, lr, steps = self._turn
        own = self._own(h, start)
        return {n: client_variate(own[n], self._server(h, start, n), start[n], trained[n], steps, lr) for n in own}

    def client_state(self, h, peer, rnd, start, trained):
        if not self.variates:
            return {}
        new = self._updated(h, peer, rnd, start, trained)
        return {CU + n: t for n, t in new.items()} | {BASIS + k.B: start[k.B] for k in h.keys.values()}

    def upload(self, h, tensors, rnd, start=None, peer=None):
        """The trained factors and head; with variates also ``Δc_u = c_u⁺ − c_u`` per factor (zeros in the layout)."""
        out = {n: t for n, t in super().upload(h, tensors, rnd, start, peer=peer).items() if not is_state(n)}
        if not self.variates:
            return out
        if start is None:  # the layout the server checks an upload against
            return out | {DC + n: torch.zeros_like(tensors[n]) for k in h.keys.values() for n in (k.B, k.A)}
        new, own = self._updated(h, peer, rnd, start, tensors), self._own(h, start)
        return out | {DC + n: new[n] - own[n] for n in new}

    def side_bytes(self, h, rnd, peer=None):
        """With variates: Δc_u up and c[:r_u] down, r_u(d+k) elements per adapted matrix in the factors' dtype."""
        if not self.variates:
            return 0, 0
        r = h.rank if peer is None else peer.rank
        size = sum(r * (layer.in_features + layer.out_features) * h.parameter(h.keys[m].B).element_size()
                   for m, layer in h.layers.items())
        return size, size

    # ---- the server's c (checkpointed) -------------------------------------------------------------------------
    def server_state(self):
        return {f"c/{n}": t for n, t in self.c.items()}

    def load_server_state(self, tensors):
        self.c = {k.removeprefix("c/"): t for k, t in tensors.items() if k.startswith("c/")}

    def _variates(self, h, uploads, current, new):
        """c ← c + (1/N) Σ pad(Δc_u) in the round's basis, then re-based to the new global B; into the broadcast."""
        N = self.clients or len(uploads)  # a bare method (no schedule): the round's clients
        for k in h.keys.values():
            c = {n: server_variate(self.c.get(n, torch.zeros_like(current[n])), [u[DC + n] for u in uploads], N, h.rank_dim[n])
                 for n in (k.B, k.A)}
            self.c[k.B], self.c[k.A] = rebase(c[k.B], c[k.A], new[k.B], current[k.B])
            new[C + k.B], new[C + k.A] = self.c[k.B], self.c[k.A]

    def _rebased(self, h, uploads, starts, current):
        """--async fedbuff: each upload's Δc_u carried from its start's basis B_{v_u} to the current B."""
        out = []
        for u, st in zip(uploads, starts):
            moved = dict(u)
            for k in h.keys.values():
                if st[k.B] is not current[k.B]:
                    moved[DC + k.B], moved[DC + k.A] = rebase(u[DC + k.B], u[DC + k.A], current[k.B], st[k.B])
            out.append(moved)
        return out

    # ---- what client u holds: the nested truncation at its rank and scale ------------------------------------------
    def deliver(self, h, broadcast, peer, seed=None):
        """``(B_g[:, :r_u], A_g[:r_u]·s/s_u)``: ``s_u B A`` is the rank-r_u QR truncation of the global content."""
        if peer.rank == h.rank and peer.scale == h.spec.scale_at(h.rank):
            return broadcast
        if self._delivered[0] is not broadcast:
            self._delivered = (broadcast, {})
        views = self._delivered[1]
        if peer.rank not in views:
            ratio = h.spec.scale_at(h.rank) / peer.scale
            out = h.truncate(broadcast, peer.rank)
            cut = {n: t.narrow(h.rank_dim[n.removeprefix(C)], 0, peer.rank) for n, t in out.items() if n.startswith(C)}
            views[peer.rank] = out | {k.A: out[k.A] * ratio for k in h.keys.values() if k.A in out} | cut
        return views[peer.rank]

    def start(self, h, initial, peer, seed):
        return self.deliver(h, initial, peer)

    def take(self, h, delivered, current, peer, seed):
        """A client keeps the c segment it received in its view (method state); the server's own model does not."""
        out = super().take(h, delivered, current, peer, seed)
        return out if peer.cid < 0 else out | {n: t for n, t in delivered.items() if n.startswith(C)}

    # ---- the server ----------------------------------------------------------------------------------------------
    def aggregate(self, h, uploads, weights, current, ctx):
        """M = G + Σ w_u (s_u B_u A_u − T_u) per module, truncated; the head (other trainables) averaged."""
        if self.settings["truncate"] == "svd" and ctx.mixed:
            raise ValueError("ilora-truncate=svd needs one rank for all clients (an SVD truncation does not keep a lower rank's QR "
                             "offset); use ilora-truncate=qr with --client-ranks, or drop --client-ranks")
        s = h.spec.scale_at(h.rank)
        new, layers = dict(current), {}
        stale = self.buffered(h, uploads, current)  # --async fedbuff: each upload's (upload, x_{v_u}, h(τ)); else None
        starts = [self.deliver(h, current, p) for p in ctx.peers] if stale is None else [it[1] for it in stale]
        gains = [1.0] * len(uploads) if stale is None else [it[2] for it in stale]
        scales = [p.scale for p in ctx.peers]
        for module, k in h.keys.items():
            T = [(st[k.B] * (p.scale * g), st[k.A]) for st, p, g in zip(starts, ctx.peers, gains)]
            Bs = [u[k.B] if g == 1.0 else u[k.B] * g for u, g in zip(uploads, gains)]
            agg = aggregate(self.rule, Bs, [u[k.A] for u in uploads], weights, scales=scales, name=module,
                            current=(current[k.B] * s, current[k.A]), starts=T, rank=h.rank, truncate=self.settings["truncate"])
            new[k.B], new[k.A] = agg.B, agg.A / s
            # metrics read the layers in the scaled space under mixed ranks, in factor units (÷ s) otherwise
            layers[module] = Aggregate(method=self.rule, B=agg.B, A=agg.A if ctx.mixed else agg.A / s, info=agg.info)
        for n in h.other_names:  # the head (and any other shared trainable), averaged (FedBuff: moved by the deltas)
            if all(n in u for u in uploads):
                total = sum(float(w) * u[n].to(torch.float64) for w, u in zip(weights, uploads)) if stale is None else \
                    current[n].to(torch.float64) + sum(float(w) * g * (u[n] - st[n]).to(torch.float64)
                                                       for w, g, u, st in zip(weights, gains, uploads, starts))
                new[n] = total.to(current[n].dtype)
        if self.variates:
            self._variates(h, uploads if stale is None else self._rebased(h, uploads, starts, current), current, new)
        return ServerUpdate(broadcast=new, layers=layers, scales=ctx.scales)
