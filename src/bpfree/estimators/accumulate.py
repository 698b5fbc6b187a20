"""Gradient accumulation: one estimate per minibatch, averaged over n minibatches before a step.

    g = (1/n) Σ_{b=1..n} ĝ_b,        E[g] = ∇f over the n batches' mean loss,

for any estimator (backprop included: then it is ordinary gradient accumulation, the exact
gradient of the mean loss; for an unbiased estimator the variance drops by 1/n at n times the
cost). Seed 000 sums without dividing (n times too large a step); MeZO's users ask for it
(MeZO issue #44). In the loop: ``train.accumulate = n`` (``bpfree.train``), or in your own::

    out = estimators.accumulate(est, model, [lambda x=x, y=y: F.cross_entropy(model(x), y)
                                             for x, y in batches], generator=g)
    opt.step()

(bind each batch as a default argument: a closure over the loop variable would see the last batch).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bpfree.estimators.base import Closure, Estimate, Estimator, trainable_parameters


def accumulate(estimator: Estimator, model: nn.Module, closures: Sequence[Closure], *,
               generator: torch.Generator | None = None) -> Estimate:
    """``p.grad`` ← the mean of ``estimator``'s estimates on each closure's batch; returns an
    :class:`Estimate` with the mean loss, the summed forward passes and each call's details
    (``details["accumulated"]``). MeZO's update mode is refused (it steps inside each call)."""
    if not closures:
        raise ValueError("accumulate needs at least one closure (one per minibatch)")
    if getattr(estimator, "lr", None) is not None and estimator.name == "mezo":
        raise ValueError("mezo's update mode (lr set) steps inside every estimate, so its estimates cannot be "
                         "accumulated; drop mezo's lr and use an optimizer with train.accumulate")
    params = [p for _, p in trainable_parameters(model)]
    total: list[torch.Tensor] | None = None
    outs = []
    for closure in closures:
        out = estimator.estimate(model, closure, generator=generator)
        outs.append(out)
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if total is None:
                total = [g.clone() for g in grads]
            else:
                torch._foreach_add_(total, grads)
    n = len(closures)
    with torch.no_grad():
        for p, g in zip(params, total):
            p.grad = g.div_(n)
    return Estimate(loss=sum(o.loss for o in outs) / n, forward_passes=sum(o.forward_passes for o in outs),
                    details={"accumulated": n, "per_batch": [o.details for o in outs]})
