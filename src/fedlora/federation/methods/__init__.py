"""The built-in methods, one protocol file each; importing this package registers them (the order is the CLI's).

Each file is one small class whose hooks read like the paper's algorithm box; its math is the file of the same
name in :mod:`fedlora.aggregation`. A method added elsewhere (a plug-in, a test) registers the same way.
"""

from . import fedit, ffa, fedsa, flora, fedex, florana, svd, flexlora, hetlora  # noqa: F401  # isort: skip
