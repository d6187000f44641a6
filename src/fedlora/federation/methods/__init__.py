"""The built-in methods, one protocol file each; importing this package registers them (the order is the CLI's).

Each file is one small class whose hooks read like the paper's algorithm box; its math is the file of the same
name in :mod:`fedlora.aggregation`. A method added elsewhere registers the same way, when its module is imported:
in a script or test, import it before building a run; for the CLI and Flower's processes (which import nothing of
yours), name the module in your package's entry points, group ``fedlora.methods``
(``[project.entry-points."fedlora.methods"] mymethod = "mypackage.mymethod"``): :mod:`fedlora.federation` imports
it after the built-in methods (:func:`fedlora.federation.protocol.load_plugins`).
"""

from . import fedit, ffa, fedsa, flora, fedex, florana, svd, flexlora, hetlora, rolora, fedsvd  # noqa: F401  # isort: skip
from . import lorafair, fedrot, fedmomentum, frlora, fedsb, ravan, feddpa, florist, fslora, fedhello, fedlease, hilora, ilora, loraa2, slora  # noqa: F401  # isort: skip
from . import central, local  # noqa: F401  # isort: skip
