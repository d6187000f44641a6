"""Asynchronous aggregation on Flower's Message API: FedAsync and FedBuff as a ServerApp loop (docs/systems.md).

Flower 1.41 has no asynchronous strategy; this loop is one, on the simulator's own server half
(:class:`fedlora.federation.asynchronous.Asynchronous`: the seeded choice of the next idle client, the version store,
the arrival rule — FedAsync's mix at once, FedBuff's flush after K — and the version step through
:meth:`Simulator.close_round`). Only the event source differs: instead of the simulated clock, the replies as they
reach the SuperLink.

* Dispatch: while a slot is free (``async-concurrency``) and the budget allows, the next idle client is pushed a train
  message (``grid.push_messages``) for round ``v + 1``, ``v`` the current version, carrying the broadcasts it has not
  applied yet (each version step's broadcast is pending as round ``v``'s, as a synchronous round's), so it trains
  from ``x_v`` on its version's base. A client sent again from a version it already started from gets the same
  ``seed-salt`` the simulator gives it.
* Arrivals: the in-flight messages' replies are pulled every ``poll`` seconds (``grid.pull_messages``); the replies of
  one pull are handled in client-id order, all before the next dispatch (the simulator's rule for equal times). A
  client silent for ``round-timeout`` seconds (or whose SuperNode the SuperLink reports unavailable) arrives as a
  rejection, as a client that raises does in the simulator, and its slot is freed.
* Metrics: a line per version step, as ``fedlora run --async`` writes, with the wall clock in place of the simulated
  one: ``clock_seconds`` (since the loop started), ``step_seconds``, and ``arrived_at`` (each arrival's time).

Our choices: private client state (FedSA's B) runs with FedAsync only — the server tells a client whether its last
result was accepted (``last-accepted``), which FedAsync knows at once; under FedBuff it may still be in the buffer
when the client is sent again, so the run is refused. A resume is refused (the clients in flight and the version
store are not recovered from a checkpoint in this version). Before each dispatch the strategy's ``refresh`` runs
without waiting: a SuperNode that (re)connected takes over its partition when the old one is gone or was silent, and
is sent what it missed (the broadcasts, or a snapshot), as before a synchronous round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.federation.screening import Rejection
from fedlora.federation.simulator import ClientResult
from fedlora.flower.client_app import STATE_LOST
from fedlora.flower.strategy import FedLoRAStrategy

POLL_SECONDS = 0.1  # how often the in-flight messages' replies are pulled


def private_refusal(strategy: FedLoRAStrategy) -> str | None:
    """Why the run cannot go asynchronous on Flower, known before any training (module docstring), or None."""
    sim, mode = strategy.sim, strategy.sim.systems.config.mode
    if mode == "fedbuff" and sim.method.private(sim.handle):
        return (f"async-mode = 'fedbuff' on Flower does not run {sim.method.name}, whose clients keep private state (a "
                "client may be sent again before its buffered result is accepted); use async-mode = 'fedasync', or "
                "`fedlora run --async fedbuff`")
    return None


def run_async(strategy: FedLoRAStrategy, grid: Grid, record: Callable[[dict], None], reply_timeout: float,
              poll: float = POLL_SECONDS) -> None:
    """The whole run: dispatch, pull, apply the rule, ``record`` each version step's metrics line; returns when the
    budget of client updates has arrived."""
    loop = strategy.sim.systems
    loop.wall = True
    loop.begin()
    t0 = time.monotonic()
    inflight: dict[str, tuple[int, float]] = {}  # message id → (client, when it was pushed)
    fate: dict[int, bool] = {}  # whether each client's last result was accepted (its private state counts)
    while True:
        _dispatch(strategy, grid, inflight, fate)
        if not inflight:
            return
        arrivals, at = _next_arrivals(strategy, grid, inflight, reply_timeout, poll)
        loop.clock = at - t0
        for cid, got in sorted(arrivals, key=lambda a: a[0]):
            flight = loop.flights[cid]
            if isinstance(got, ClientResult):  # it applied every broadcast up to its version
                strategy.synced[cid] = flight.version
                strategy.snapshot.discard(cid)
                fate[cid] = False
            elif STATE_LOST in got.reason:  # its state is gone: a snapshot next time
                strategy.snapshot.add(cid)
            step = loop.receive(cid, got, time.perf_counter())
            if step is not None:
                update, accepted, metrics = step
                for r in accepted:
                    strategy.accepted[r.cid] = loop.version
                    fate[r.cid] = True
                strategy.keep_broadcast(loop.version, update)
                record(metrics)


def _dispatch(strategy: FedLoRAStrategy, grid: Grid, inflight: dict, fate: dict) -> None:
    """Push a train message to each client the server half picks, from the current version."""
    loop, sent = strategy.sim.systems, []
    if loop.next_client() is not None:  # a SuperNode that (re)connected since takes its partition over, as before a round
        strategy.refresh(grid, wait=0.0)
    while (cid := loop.next_client()) is not None:
        flight = loop.dispatch(cid)
        extra = {"seed-salt": flight.salt} if flight.salt else {}
        if cid in fate:
            extra["last-accepted"] = fate[cid]
        sent.append((cid, strategy.train_message(cid, flight.version + 1, extra)))
    if not sent:
        return
    now = time.monotonic()
    ids = list(grid.push_messages([m for _, m in sent]))
    for (cid, _), mid in zip(sent, ids + [""] * (len(sent) - len(ids)), strict=True):
        inflight[mid or f"unsent/{cid}"] = (cid, now if mid else float("-inf"))  # not pushed: it arrives failed at once


def _next_arrivals(strategy: FedLoRAStrategy, grid: Grid, inflight: dict, timeout: float, poll: float):
    """Wait for the next replies (or silences past ``timeout``): ([(client, ClientResult or Rejection)], when)."""
    while True:
        pulled = list(grid.pull_messages([mid for mid in inflight if not mid.startswith("unsent/")]))
        now = time.monotonic()
        arrivals = []
        for msg in pulled:
            if msg.metadata.reply_to_message_id in inflight:
                cid, _ = inflight.pop(msg.metadata.reply_to_message_id)
                arrivals.append((cid, _reply(strategy, msg, cid)))
        for mid, (cid, pushed) in list(inflight.items()):
            if now - pushed > timeout:
                del inflight[mid]
                how = "its train message could not be sent" if pushed == float("-inf") else f"no reply within {timeout:g} s"
                arrivals.append((cid, Rejection(cid, f"client {cid} sent no reply ({how})")))
                _silent(strategy, cid, True)
        if arrivals:
            return arrivals, now
        time.sleep(poll)


def _reply(strategy: FedLoRAStrategy, msg: Message, cid: int) -> ClientResult | Rejection:
    node = strategy.nodes.get(cid)
    if msg.has_error() and msg.metadata.src_node_id != node:  # the SuperLink's reply for a SuperNode that stopped
        _silent(strategy, cid, True)
        return Rejection(cid, f"client {cid} sent no reply (its SuperNode is unavailable)")
    _silent(strategy, cid, False)
    return strategy._result(msg, cid)


def _silent(strategy: FedLoRAStrategy, cid: int, silent: bool) -> None:
    node = strategy.nodes.get(cid)
    if node is not None:
        (strategy.silent.add if silent else strategy.silent.discard)(node)
