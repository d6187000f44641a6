"""The Flower front end: ``fedlora run``'s methods, data and models on Flower's Message API (flwr ≥ 1.41).

- :mod:`fedlora.flower.server_app` — the ``ServerApp`` (``[tool.flwr.app.components] serverapp``): rounds, checkpoint, resume;
- :mod:`fedlora.flower.thin_client` — the ``ClientApp`` component: Flower only, hands messages to a model worker;
- :mod:`fedlora.flower.client_app` — the client's turn itself (one SuperNode = one partition), its durable state;
- :mod:`fedlora.flower.worker` — a SuperNode's long-lived model worker (the model built once);
- :mod:`fedlora.flower.strategy` — the simulator's round as a strategy over a Flower ``Grid``; rejoining clients;
- :mod:`fedlora.flower.secure` — a round under SecAgg+ (the server sees the weighted sum only);
- :mod:`fedlora.flower.config` — Flower run config ⇄ :class:`~fedlora.app.experiment.RunConfig`;
- :mod:`fedlora.flower.records` — tensors ⇄ Flower records, and the message layout;
- :mod:`fedlora.flower.gateway` — the TLS gateway that exposes the Fleet API only to the SuperNodes' network;
- :mod:`fedlora.flower.inline` — an in-process ``Grid`` (every message serialised) for checks and benchmarks;
- :mod:`fedlora.flower.loopback` — certificates, keys and processes for a TLS + authenticated deployment on one machine.

A front end: it may import :mod:`fedlora.app.experiment`, :mod:`fedlora.federation`, :mod:`fedlora.app.export`,
:mod:`fedlora.app.report` and ``flwr``; nothing in fedlora imports it. It implements no method: every rule, byte count
and metric comes from the objects the in-process simulator uses. See docs/flower.md.
"""
