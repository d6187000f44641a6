"""The application layer: what every front end needs to make a run — the settings, the build (data, model, splits
and evaluation of each task kind), the run directory (lock, resume, metrics, checkpoint), comparisons and studies,
exports, reports and statistics.

It may import every layer below it (federation, adapters, aggregation, data, generation) and neither front end:
the CLI (:mod:`fedlora.cli`) and the Flower app (:mod:`fedlora.flower`) import it, never each other.
"""
