"""Gradient estimators behind one contract (see ``bpfree.estimators.base``).

>>> from bpfree import estimators
>>> estimators.available()
['activity_perturbation', 'backprop', 'forward_gradient', 'mezo', 'spsa', 'w_p', 'w_perp', 'w_perp_ns', 'wt_guess']
>>> est = estimators.make("forward_gradient", num_directions=4)

One module per family: ``backprop`` (plain and checkpointed),
``forward_gradient`` (weight perturbation), ``zeroth_order`` (SPSA, MeZO), ``guessed`` (activity perturbation, W^T, W-perp,
W-perp-NS, W^P for ReLU MLPs).
Beneath them, the parts: ``directions`` draws values, ``direction_set`` holds one step's
directions as a value, ``engines`` turns them into directional derivatives or perturbed losses
(one dispatcher), ``directional`` is the shared draw → evaluate → combine → write step, and
``variance`` composes variance reduction on top (adaptive, svrg, sparse, sign, conservative);
``accumulate`` averages estimates over minibatches.
"""

from bpfree.estimators import backprop, forward_gradient, guessed, zeroth_order  # noqa: F401  (registers)
from bpfree.estimators._functional import UnsupportedModelError
from bpfree.estimators.accumulate import accumulate
from bpfree.estimators.base import Estimate, Estimator, trainable_parameters
from bpfree.estimators.registry import available, make, option_names, option_types, register

__all__ = [
    "Estimate",
    "accumulate",
    "Estimator",
    "UnsupportedModelError",
    "available",
    "make",
    "option_names",
    "option_types",
    "register",
    "trainable_parameters",
]
