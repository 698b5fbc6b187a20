"""ZO-SGD-Cons: keep the best of three candidate updates (Zhang et al. 2024, ZO-Bench, "ZO-SGD-Cons").

With the estimate ĝ and the SGD step size η (``conservative_lr``, which must be the optimizer's
learning rate, with plain SGD and no momentum, for the candidates to be the updates that happen),
evaluate on the same batch

    f(θ),   f(θ − ηĝ),   f(θ + ηĝ)

and write ``p.grad`` = ĝ, −ĝ or 0, whichever makes ``θ − η·p.grad`` the lowest of the three. The
step never increases the minibatch loss (hence "conservative"); the cost is two extra forwards,
plus one for f(θ) where the estimator did not compute it exactly (central differences report
the mean of f(θ ± εv)), all counted in ``forward_passes``. The parameters are evaluated
functionally (never written); memory: one perturbed copy of the parameters at a time.
As an estimate of ∇f it is biased in a data-dependent way (E[g] has no closed form: it is ĝ
where the step helps, flipped or zeroed elsewhere); the test checks the choice rule exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bpfree.estimators._functional import functional_loss
from bpfree.estimators.base import check_positive, check_scalar_loss
from bpfree.estimators.variance import Scheme, register_scheme


@register_scheme("conservative")
@dataclass(frozen=True)
class Conservative(Scheme):
    """Of ĝ, −ĝ and 0, keep the one whose SGD step ``lr`` has the lowest minibatch loss."""

    lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("conservative_lr", self.lr)

    def finish(self, step) -> None:
        names = [n for n, _ in step.params]
        primals = [p.detach() for _, p in step.params]
        grads = [p.grad for _, p in step.params]
        f = functional_loss(step.model, names, step.closure)

        def loss_at(scale: float) -> float:
            out = f(*(torch._foreach_add(primals, grads, alpha=scale) if scale else primals))
            check_scalar_loss(out)
            return float(out)

        with torch.no_grad():
            exact = step.details.get("loss_is_exact", True)
            f0 = step.loss if exact else loss_at(0.0)
            f_minus, f_plus = loss_at(-self.lr), loss_at(self.lr)
            step.forward_passes += 2.0 + (0.0 if exact else 1.0)
            choice = min(((f_minus, 1.0), (f_plus, -1.0), (f0, 0.0)), key=lambda c: c[0])[1]
            if choice != 1.0:
                torch._foreach_mul_(grads, choice)
        step.details["conservative"] = {"f": f0, "f_step": f_minus, "f_flipped": f_plus, "kept": choice}
