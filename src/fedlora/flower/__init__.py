"""The Flower front end: ``fedlora run``'s methods, data and models on Flower's Message API (flwr ≥ 1.41).

- :mod:`fedlora.flower.server_app` — the ``ServerApp`` (``[tool.flwr.app.components] serverapp``);
- :mod:`fedlora.flower.client_app` — the ``ClientApp`` (one SuperNode = one partition);
- :mod:`fedlora.flower.strategy` — the simulator's round as a strategy over a Flower ``Grid``;
- :mod:`fedlora.flower.config` — Flower run config ⇄ :class:`~fedlora.frontend.experiment.RunConfig`;
- :mod:`fedlora.flower.records` — tensors ⇄ Flower records, and the message layout;
- :mod:`fedlora.flower.loopback` — certificates, keys and processes for a TLS + authenticated deployment on one machine.

A front end: it may import :mod:`fedlora.frontend.experiment`, :mod:`fedlora.federation`, :mod:`fedlora.frontend.export`,
:mod:`fedlora.frontend.report` and ``flwr``; nothing in fedlora imports it. It implements no method: every rule, byte count
and metric comes from the objects the in-process simulator uses. See docs/flower.md.
"""
