"""Gradient estimators behind one contract (see ``bpfree.estimators.base``).

>>> from bpfree import estimators
>>> estimators.available()
['activity_perturbation', 'backprop', 'forward_gradient', 'mezo', 'spsa', 'w_p', 'w_perp', 'w_perp_ns', 'wt_guess']
>>> est = estimators.make("forward_gradient", num_directions=4)

One module per family: ``backprop`` (plain and checkpointed),
``forward_gradient`` (weight perturbation), ``zeroth_order`` (SPSA, MeZO), ``guessed`` (activity perturbation, W^T, W-perp,
W-perp-NS, W^P for ReLU MLPs).
Directions are drawn in ``directions``.
"""

from bpfree.estimators import backprop, forward_gradient, guessed, zeroth_order  # noqa: F401  (registers)
from bpfree.estimators._functional import UnsupportedModelError
from bpfree.estimators.base import Estimate, Estimator, trainable_parameters
from bpfree.estimators.registry import available, make, option_names, register

__all__ = [
    "Estimate",
    "Estimator",
    "UnsupportedModelError",
    "available",
    "make",
    "option_names",
    "register",
    "trainable_parameters",
]
