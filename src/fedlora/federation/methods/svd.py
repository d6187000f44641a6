"""The rank-r optimum: broadcast the truncated SVD of ΔW*. Math: :mod:`fedlora.aggregation.svd`."""

from dataclasses import replace

import torch

from fedlora.federation.protocol import Method, Option, register

# The factor-space SVD's path (aggregation.svd), shared with flexlora.
SOLVER = Option("auto", "the SVD's path: exact (Gram core, exact to float64), randomized (range finder, linear in the number of clients, "
                "ρ within 1 part in 100 of the bound), or auto (exact up to 256 stacked columns U·r)", ("auto", "exact", "randomized"), to_rule=True)


class ProductDelta:
    """``--async fedbuff`` in product-delta form (METHODS.md, "Asynchronous aggregation"), for a method that truncates
    ``ΔW*`` (svd, flexlora, fedmomentum; ilora through ``buffered`` in its own rule): a flush truncates ``BA + Σ_u q_u(B_uA_u − B_{v_u}A_{v_u})`` its own way,
    ``q_u = w_u h(τ_u)`` (FedBuff's 1/K times the staleness weight), never the factors mixed apart.

    How (our choices): the uploads reach screening and the byte count as sent (``async_rewrite`` leaves them);
    ``async_extra`` keeps each buffered upload's start ``x_{v_u}`` and h(τ) for the flush; ``combine`` hands the rule
    the signed sum as rank-r pairs: each upload (+q_u), the current factors (1) and each stale start (−Σ q_u of the
    clients that started there), every pair's coefficient moved into its B (the rules take non-negative weights
    summing to 1: pair j is given 1/n and n·c_j·B_j), so the rule's ``Σ (1/n)·n c_j B_jA_j`` is the target.
    Other trainables (the head) move as FedBuff's ``x + Σ q_u(x_u − x_{v_u})``. When every start is the current
    state and every h(τ) is 1 the target is ``Σ w_u B_uA_u`` and the rule runs on the uploads themselves (the
    synchronous round, bit for bit). FedAsync is refused: one arrival's per-tensor mix has no product-delta form.
    The round's ρ is still measured against the uploads' own ``Σ w_u B_uA_u``."""

    asynchronous = "fedbuff"
    _buffered: tuple = ()

    def async_rewrite(self, h, upload, start, current, *, mode, weight):
        if mode != "fedbuff":
            raise ValueError(f"--async {mode}: {self.name} runs asynchronously with --async fedbuff only (its truncation "
                             "needs FedBuff's product delta); pass --async fedbuff")
        return upload  # as sent: combine forms the product delta

    def async_extra(self, h, mode, items, current):
        self._buffered = tuple((upload, start, w) for upload, start, w in items)
        return {}

    def buffered(self, h, uploads, current) -> list[tuple[dict, dict, float]] | None:
        """Each accepted upload's (upload, start x_{v_u}, h(τ)) from this flush's buffer (taken once), or None when
        the flush is the synchronous round (no buffer, or every start the current state with h(τ) = 1)."""
        buffered, self._buffered = self._buffered, ()
        items = [next((b for b in buffered if all(u.get(n) is t for n, t in b[0].items())), None) for u in uploads]
        factors = [n for k in h.keys.values() for n in (k.B, k.A)]
        if not buffered or all(it is not None and it[2] == 1.0 and all(it[1][n] is current[n] for n in factors) for it in items):
            return None
        if None in items:
            raise ValueError(f"{self.name}: an accepted upload of this FedBuff flush was not buffered; its start is unknown")
        return items

    def combine(self, h, uploads, weights, current, ctx, **options):
        if (items := self.buffered(h, uploads, current)) is None:
            return super().combine(h, uploads, weights, current, ctx, **options)
        factors = [n for k in h.keys.values() for n in (k.B, k.A)]
        qs = [weight * w for weight, (_, _, w) in zip(weights.tolist(), items)]  # q_u = w_u h(τ_u)
        pairs, starts = [], [(current, 1.0)]  # (tensors, coefficient c_j)
        for u, (_, start, _), q in zip(uploads, items, qs):
            pairs.append((u, q))
            at = next((i for i, (x, _) in enumerate(starts) if all(x[n] is start[n] for n in factors)), None)
            if at is None:
                starts.append((start, -q))
            else:
                starts[at] = (starts[at][0], starts[at][1] - q)
        pairs += [(x, c) for x, c in starts if c != 0.0]
        n, B_names = len(pairs), {k.B for k in h.keys.values()}
        stack = [{name: (n * c * x[name] if name in B_names else x[name]) for name in factors} for x, c in pairs]
        pairs_ctx = replace(ctx, peers=ctx.peers[:1] * n)  # one rank for all under --async: each pair at the first's
        agg = super().combine(h, stack, torch.full((n,), 1.0 / n, dtype=torch.float64), current, pairs_ctx, **options)
        others = {name: current[name] + sum(q * (u[name] - it[1][name]) for u, it, q in zip(uploads, items, qs))
                  for name in h.other_names if name in current and all(name in u for u in uploads)}
        return replace(agg, others={name: t.to(current[name].dtype) for name, t in others.items()})


@register
class SVD(ProductDelta, Method):
    """B̂Â = [ΔW*]_r (truncated SVD of the ideal update, never formed densely). Mixed ranks: use flexlora."""

    name = "svd"
    title = "rank-r optimum (Eckart–Young)"
    rule = "svd"
    server_opt_refusal = "its result is a new rank-r basis every round (a truncated SVD), so per-factor optimiser state would have no fixed coordinates"
    summary = "B̂Â = [ΔW*]_r in factor space (a (Ur)² Gram core; above U·r = 256 a randomized range finder, linear in U)"
    at_bound = True
    exactness = "at the Eckart–Young bound"
    unsupported = {"vera": "the rank-r optimum is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora"}
    options = {"solver": SOLVER}
