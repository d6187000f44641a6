"""Front ends: the ``fedlora`` command line, experiments and run directories, studies, reports, exports, and model
loading. The top layer: it may import every other layer (federation, adapters, aggregation, data, generation);
nothing below imports it. The Flower app (:mod:`fedlora.flower`) is a front end beside it."""
