"""The ``fedlora`` command line, a front end: it turns flags and TOML files into the application layer's objects
(:mod:`fedlora.app`) and shows progress. It imports the application layer and below, never the Flower front end
(:mod:`fedlora.flower`), and nothing imports it."""
