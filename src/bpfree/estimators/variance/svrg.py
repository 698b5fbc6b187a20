"""SVRG: a control variate from a snapshot θ̃ (Johnson & Zhang 2013; zeroth order: MeZO-SVRG,
Gautam et al. 2024; seed 000's FmAD/ZO-SVRG done right).

Every ``svrg_every = n`` steps (step 0, n, 2n, …) the snapshot is refreshed: θ̃ ← θ (one copy of
the parameters) and

    μ̃ = (1/B) Σ_b (1/M) Σ_m t(d_m(θ̃; b)) v_m,     M = ``svrg_directions``,

the mean estimate over a snapshot set of B batches (the current batch when refreshed inside
``estimate``; any list of closures with :func:`refresh`) and M fresh directions. Each step then
estimates, with the **same** directions v_k and the **same** batch b in both terms,

    g = (1/K) Σ_k [t(d_k(θ; b)) − t(d_k(θ̃; b))] v_k + μ̃,

where d(θ̃; b) is evaluated at the snapshot by swapping θ̃ into the module for the call
(forward mode: the jvp at θ̃; zeroth order: f(θ̃ ± εv)) — the live weights are never written
(seed 000 loads the snapshot into the live weights every step, and its ZO snapshot copies have
``requires_grad=False``, so its control variate does nothing).

Properties (tested): with t the identity, E[g | θ̃, μ̃] = ∇f(θ) − ∇f(θ̃) + μ̃ and E[μ̃] = ∇f(θ̃)
(averaged over the snapshot's batch), so g is unbiased over the snapshot's draws; at θ = θ̃ the
bracket is exactly 0 and g = μ̃, whose variance is that of a K = M estimate, not K; near θ̃ the
bracket's variance scales with ‖∇f(θ) − ∇f(θ̃)‖² instead of ‖∇f(θ)‖². Cost: two evaluations per
step (2x the base estimator) plus B·M/K evaluations per refresh; memory: θ̃ and μ̃, two
parameter-sized copies, counted by the memory tracker as ``snapshot``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from bpfree.estimators.variance import Scheme, register_scheme

# True while SVRG allocates θ̃ and μ̃, so memory instruments attribute them to "snapshot".
SNAPSHOTTING: contextvars.ContextVar[bool] = contextvars.ContextVar("bpfree_svrg_snapshot", default=False)


@contextlib.contextmanager
def _snapshotting() -> Iterator[None]:
    token = SNAPSHOTTING.set(True)
    try:
        yield
    finally:
        SNAPSHOTTING.reset(token)


@register_scheme("svrg")
@dataclass(frozen=True)
class SVRG(Scheme):
    """g = ĝ(θ; v, b) − ĝ(θ̃; v, b) + μ̃, the snapshot refreshed every ``every`` steps."""

    every: int = 100
    directions: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("every", "directions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"svrg_{name} must be an int >= 1, got {v!r}")

    def refresh(self, step, closures: Sequence, masks: dict[int, torch.Tensor] | None = None) -> None:
        """θ̃ ← θ and μ̃ ← the mean estimate at θ̃ over ``closures`` and M directions each (restricted
        to ``masks``, the step's own, when a sparse scheme is on)."""
        est = step.estimator
        with torch.no_grad(), _snapshotting():
            theta = [p.detach().clone(memory_format=torch.contiguous_format) for _, p in step.params]
            mu = [torch.zeros_like(t) for t in theta]
        # an estimator that evaluates one direction at a time (MeZO in place) draws M sets of one
        draws = [(1, self.directions)] * self.directions if est.single_direction else [(self.directions, 1)]
        for closure in closures:
            for k, share in draws:
                dirs = est.draw(step, k, masks, materialise=est.materialise(1))
                ev = est.evaluate(step, dirs, closure=closure, at=theta)
                step.forward_passes += ev.forward_passes
                grads = dirs.gradients(est.weights(ev.d))
                with torch.no_grad(), _snapshotting():
                    for i, g in grads.items():
                        mu[i].add_(g.view_as(mu[i]), alpha=1.0 / (len(closures) * share))
        self.state.update(theta=theta, mu=mu, refreshed_at=step.index)

    def correct(self, step, dirs, d, weights):
        if step.index % self.every == 0 or "theta" not in self.state:
            self.refresh(step, [step.closure], dirs.masks)
        est = step.estimator
        ev = est.evaluate(step, dirs, at=self.state["theta"])  # same v, same batch, at θ̃
        step.forward_passes += ev.forward_passes
        step.details["svrg_snapshot_derivatives"] = ev.d.detach().float().clone()
        step.details["svrg_refreshed_at"] = self.state["refreshed_at"]
        return weights - est.weights(ev.d), dict(enumerate(self.state["mu"]))
