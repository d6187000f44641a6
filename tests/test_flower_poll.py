"""The ServerApp pulls a round's replies every POLL_SECONDS on Flower's deployment Grid (not HttpGrid's 3 s)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from flwr.superlink.grid.http_grid import HttpGrid  # noqa: E402

from fedlora.flower import server_app  # noqa: E402
from fedlora.flower.server_app import _QuickPoll, quick_poll  # noqa: E402


class _Slow:
    """A grid whose replies arrive after ``delay`` seconds, one pull at a time; counts the pulls."""

    def __init__(self, delay: float):
        self.delay, self.pulls, self.sent = delay, 0, {}

    def push_messages(self, messages):
        now = time.monotonic()
        for i, _ in enumerate(messages):
            self.sent[f"m{i}"] = now + self.delay * (i + 1)
        return list(self.sent)

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic()
        ready = [mid for mid in ids if self.sent[mid] <= now]
        for mid in ready:
            del self.sent[mid]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)) for mid in ready]

    def get_node_ids(self):
        return [1, 2]


def test_quick_poll_returns_every_reply_soon_after_it_arrives(monkeypatch):
    monkeypatch.setattr(server_app, "POLL_SECONDS", 0.01)
    grid = _Slow(0.05)
    t0 = time.monotonic()
    replies = _QuickPoll(grid).send_and_receive([object(), object()], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert time.monotonic() - t0 < 1.0  # HttpGrid's own loop would sleep 3 s after its first empty pull
    assert grid.pulls > 2
    assert _QuickPoll(grid).get_node_ids() == [1, 2]  # everything else is the grid's


def test_quick_poll_stops_at_the_timeout_with_the_replies_it_has(monkeypatch):
    monkeypatch.setattr(server_app, "POLL_SECONDS", 0.01)
    replies = _QuickPoll(_Slow(10)).send_and_receive([object()], timeout=0.1)
    assert replies == []


def test_only_flowers_deployment_grid_is_wrapped():
    http = HttpGrid(token="t")
    assert isinstance(quick_poll(http), _QuickPoll)

    class Faulty(HttpGrid):  # a test's grid that overrides send_and_receive keeps its own
        def send_and_receive(self, messages, *, timeout=None):
            return []

    assert type(quick_poll(Faulty(token="t"))) is Faulty
    other = _Slow(0)
    assert quick_poll(other) is other
