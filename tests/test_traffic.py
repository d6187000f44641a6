"""The byte ledger against hand counts, and every method's byte declaration: its rule's ``comm`` is the one source,
and the methods table's up/down text, read as a formula, must say the same for any registered method."""

import math
import re

import pytest
import torch

from fedlora.federation import REGISTRY, make_method
from fedlora.federation.traffic import Traffic, nbytes


def t(*shape):
    return torch.zeros(*shape)  # float32: 4 bytes an element


def test_the_ledger_counts_uploads_broadcasts_catch_up_snapshots_and_round_0():
    ranks = {0: 4, 1: 4, 2: 2}
    traffic = Traffic(ranks)
    traffic.record_setup([{"g": t(10)}] * 3, [{"b": t(5)}] * 3)  # round 0, in round 1's row
    traffic.record_upload(0, {"B": t(8), "A": t(8)})
    traffic.record_upload(1, {"B": t(8)})
    traffic.record_upload(2, "not tensors")  # a broken reply counts nothing
    traffic.record_sampled({0, 1}, 1)
    traffic.record_broadcast(1, {4: {"B": t(16)}, 2: {"B": t(8)}}, [0, 1])
    first = traffic.close()
    assert (first.up, first.down, first.catch_up, first.rejoin) == (4 * (30 + 24), 4 * (15 + 32), 0, 0)
    assert traffic.close().up == 0  # round 0 counted once, the round's counters reset

    # round 2: nobody accepted; round 3: client 2 (rank 2) is sampled and is sent rounds 1 and 2 as catch-up
    traffic.record_sampled({0}, 2)
    traffic.record_broadcast(2, {4: {"B": t(16)}, 2: {"B": t(8)}}, [])
    traffic.close()
    traffic.record_sampled({2}, 3)
    assert traffic.close().catch_up == 4 * (8 + 8)
    assert traffic.sent == {0: 1, 1: 1, 2: 2}

    # a client that lost its state gets a snapshot: it carries what it missed, so no catch-up for it
    traffic.record_snapshot(1, 4, {"B": t(16)}, {"W": t(4)})
    traffic.record_sampled({1}, 4)
    traffic.record_protocol(100, 7)
    fourth = traffic.close()
    assert (fourth.rejoin, fourth.catch_up, fourth.up, fourth.down) == (80, 0, 100, 87)
    assert fourth.metrics(communicates=False) == {"bytes_up": 0, "bytes_down": 0, "catch_up_bytes": 0}


def test_the_ledger_round_trips_through_a_checkpoint_and_reads_old_ones():
    traffic = Traffic({0: 4, 1: 4})
    traffic.record_sampled({0}, 1)
    traffic.record_broadcast(1, {4: {"B": t(3)}}, [0])
    import json

    state = json.loads(json.dumps(traffic.state()))  # as the checkpoint stores it: string keys
    again = Traffic({0: 4, 1: 4})
    again.load(state, rounds=1)
    assert again.sent == traffic.sent and again.broadcasts == traffic.broadcasts
    old = Traffic({0: 4, 1: 4})
    old.load({}, rounds=3)  # before catch-up was counted: every client as if sent everything
    assert old.sent == {0: 3, 1: 3} and old.broadcasts == {}
    assert nbytes({"x": torch.zeros(3, dtype=torch.float64)}) == 24


# ---- the methods table's text, read as a formula in d, k, r, U (h: RAVAN's heads) -------------------------------
def formula(text: str):
    """A callable for one formula of the table's notation: juxtaposed letters multiply (``dk``, ``r(d+k)``), ``·``
    and ``²`` as written, ``⌈x/n⌉`` a ceiling, ``r_u`` is the client's r."""
    s = text.replace("r_u", "r").replace("·", "*").replace("²", "**2").replace("−", "-").replace(" ", "")
    s = s.replace("⌈", "ceil(").replace("⌉", ")")  # ⌈x⌉; δ: SLoRA's density
    tokens = re.findall(r"min|max|ceil|\*\*|//|\d+|[A-Za-zδ]|[()+\-*/,]", s)
    assert "".join(tokens) == s, f"the table's bytes text {text!r} is not a formula in d, k, r, U"
    out = []
    for prev, tok in zip([None, *tokens], tokens):
        if prev and (prev == ")" or prev[-1].isalnum() and prev not in ("min", "max", "ceil")) and (tok[0].isalpha() or tok == "("):
            out.append("*")
        out.append(tok)
    expr = "".join(out)
    return lambda **v: eval(expr, {"__builtins__": {}, "min": min, "max": max, "ceil": math.ceil}, v)


def readings(text: str, **values) -> set[int]:
    """Every value the text states: alternatives (``dr (B-rounds), rk (A-rounds)``) each, a bound on a named
    quantity (``…, f ≤ min(Ur,d,k) − r the folded rank``) taken at its largest."""
    parts, depth, cur = [], 0, ""
    for ch in text:  # split at the commas outside parentheses
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts, cur = [*parts, cur.strip()], ""
        else:
            cur += ch
    parts.append(cur.strip())
    bounds = [p for p in parts if "≤" in p]
    for p in bounds:
        name, _, rest = p.partition("≤")
        words = rest.split()
        while words and words[-1].isalpha() and len(words[-1]) > 1:  # trailing prose
            words.pop()
        values[name.strip()] = max(formula(" ".join(words))(**values), 0)
    return {formula(re.sub(r"\s\([^()]*[a-z]{2,}[^()]*\)$", "", p))(**values) for p in parts if p not in bounds}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_methods_table_states_what_the_rule_declares(name):
    method = make_method(name)
    method.schedule(10)  # a run of 10 rounds (SLoRA: sparse round 1, the switch in round 2, LoRA from round 3; HiLoRA: leaf from round 8)
    heads = method.comm_options(1).get("heads", 1)
    density = method.comm_options(1).get("density", 0.0)
    experts = method.comm_options(1).get("experts", 1)  # FedLEASE's M (set by its round-0 clustering)
    for d, k, r, U in [(64, 48, 4, 3), (768, 3072, 8, 10), (40, 40, 16, 200)]:
        declared = {method.declared_elements(d, k, r, U, rnd) for rnd in range(1, 11)}  # every round of the 10
        for side, text in ((0, method.up), (1, method.down)):
            stated = readings(text, d=d, k=k, r=r, U=U, h=heads, δ=density, M=experts)
            assert stated == {x[side] for x in declared}, (name, ("up", "down")[side], text, stated, declared)
