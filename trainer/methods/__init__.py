"""Training methods, chosen by ``method:`` in the train config through the ``METHODS`` registry.

A method turns a batch into a loss. It declares its own pydantic ``Config`` (validated from
``method_args``), may own extra trainable modules (heads, projectors) that the loop optimises and
checkpoints with the backbone, and may build the model it trains (``teacher`` puts a cosine head on the
backbone). Registered: ``ce``, ``teacher``, ``oe``, ``energy_margin``, ``vos``, ``isomax_plus``, ``oal``.
"""

from trainer.methods.base import METHODS, Method, MethodContext

# importing a method module registers it
from trainer.methods import ce, isomax_plus, oal, outlier_exposure, teacher, vos  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method", "MethodContext"]
