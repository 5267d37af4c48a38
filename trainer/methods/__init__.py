"""Training methods, chosen by ``method:`` in the train config through the ``METHODS`` registry.

A method declares its own pydantic ``Config`` (validated from ``method_args``), builds what it trains in
``setup`` (the model, its own modules, its outlier sets: a :class:`Plan`) and turns a batch into a loss.
Importing this package registers the built-in methods.
"""

from trainer.methods.base import METHODS, Method, Plan, build_method

# importing a method module registers it
from trainer.methods import ce, isomax_plus, oal, outlier_exposure, teacher, vos  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method", "Plan", "build_method"]
