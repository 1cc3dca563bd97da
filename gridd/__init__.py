"""gridd: a Twisted job server that turns idle office machines into one batch grid.

Layers, each in its own module: ``gridd.wire`` (framing and parsing),
``gridd.scheduler`` (the scheduling state machine), ``gridd.store`` (durable
state on SQLite or MySQL), ``gridd.server`` (services and the twistd tap),
``gridd.worker`` (the worker daemon) and ``gridd.client`` (the submitter API).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
