"""The step every weight-perturbation estimator shares: draw → evaluate → combine → write.

For K directions v_k (a :class:`~bpfree.estimators.direction_set.DirectionSet`) and
their directional derivatives d_k (exact, from forward mode, or finite differences,
from zeroth order), the estimate is

    g = Σ_k w_k v_k,      w_k = t(d_k) / K,

with t the identity (or a scheme's transform, e.g. sign), written into ``p.grad``.
A subclass says how to draw (:meth:`DirectionalEstimator.draw_options`) and how to
evaluate (:meth:`DirectionalEstimator.evaluate`); the variance-reduction schemes
(``bpfree.estimators.variance``) hook into the stages in a fixed order. So an
estimator module reads as its formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from bpfree.estimators import _embedding_rows
from bpfree.estimators.base import Closure, Estimate, Estimator
from bpfree.estimators.direction_set import DirectionSet


@dataclass
class Evaluation:
    """One evaluation of K directions: the loss (at the evaluation point, or the mean of the
    perturbed losses), d (K,), its cost and engine details."""

    loss: torch.Tensor
    d: torch.Tensor
    forward_passes: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """What the schemes see of one step: the estimator, the model, its trainable parameters,
    the batch's closure, the generator, the step index (calls of ``estimate`` so far), the
    forward passes counted so far and the details going into ``Estimate.details``."""

    estimator: DirectionalEstimator
    model: nn.Module
    params: list[tuple[str, nn.Parameter]]
    closure: Closure
    generator: torch.Generator
    index: int
    forward_passes: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    loss: float = float("nan")


class DirectionalEstimator(Estimator):
    """Base of ``forward_gradient``, ``spsa`` and ``mezo``. Subclasses (frozen dataclasses) have the
    options ``num_directions`` (or a fixed K), ``distribution``, ``rank``, ``schemes`` (and
    optionally ``embedding_rows``, on when absent: ``_embedding_rows``) and implement :meth:`evaluate`."""

    single_direction = False  # True: evaluates one direction at a time (MeZO's in-place path)

    def draw_options(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "rank": self.rank,
                "orthogonal": getattr(self, "orthogonal", False), "embedding_rows": self.rows_on}

    @property
    def rows_on(self) -> bool:
        """The ``embedding_rows`` option (on for a subclass that does not declare it)."""
        return getattr(self, "embedding_rows", True)

    @property
    def k(self) -> int:
        return getattr(self, "num_directions", 1)

    # ------------------------------------------------------------------ the stages

    def draw(self, step: Step, k: int, masks: dict[int, torch.Tensor] | None = None, *,
             materialise: bool = True) -> DirectionSet:
        """K directions for the step's parameters, the step seed drawn from its generator."""
        return DirectionSet.draw(step.model, step.params, num_directions=k, generator=step.generator,
                                 masks=masks, materialise=materialise, **self.draw_options())

    def evaluate(self, step: Step, dirs: DirectionSet, *, closure: Closure | None = None,
                 at: Sequence[torch.Tensor] | None = None) -> Evaluation:
        """d_k for ``dirs`` on ``closure`` (default: the step's batch) at ``at`` (default: θ)."""
        raise NotImplementedError

    def weights(self, d: torch.Tensor) -> torch.Tensor:
        """w_k = t(d_k)/K: every scheme's transform, then the estimator's own (e.g. jvp_clip)."""
        for s in self.schemes:
            d = s.transform(d)
        return self.clip(d) / d.numel()

    def clip(self, d: torch.Tensor) -> torch.Tensor:
        return d

    def write(self, step: Step, dirs: DirectionSet, weights: torch.Tensor,
              extra: dict[int, torch.Tensor] | None) -> None:
        dirs.write_gradients(weights, extra)

    def _estimate(self, model, params, closure, generator) -> Estimate:
        step = Step(self, model, params, closure, generator, index=self._next_step())
        masks: dict[int, torch.Tensor] = {}
        candidates = 1
        for s in self.schemes:
            masks.update(s.masks(step))
            candidates *= s.num_candidates(step)
        dirs = self.draw(step, self.k * candidates, masks, materialise=self.materialise(candidates))
        ev = self.evaluate(step, dirs)
        step.forward_passes += ev.forward_passes
        step.loss = float(ev.loss)
        step.details.update(ev.details)
        step.details["directional_derivatives"] = ev.d.detach().float().clone()
        if dirs.rows or dirs.dense_reasons:
            step.details["embedding_rows"] = dirs.embedding_summary()
        d = ev.d
        for s in self.schemes:
            dirs, d = s.select(step, dirs, d)
        weights, extra = self.weights(d), None
        for s in self.schemes:
            weights, more = s.correct(step, dirs, d, weights)
            if more:
                extra = more if extra is None else {i: extra.get(i, 0) + more.get(i, 0) for i in {*extra, *more}}
        self.write(step, dirs, weights, extra)
        for s in self.schemes:
            s.finish(step)
        if self.schemes:
            step.details["schemes"] = [s.name for s in self.schemes]
        return Estimate(loss=step.loss, forward_passes=step.forward_passes, details=step.details)

    def materialise(self, candidates: int) -> bool:
        return True

    # ------------------------------------------------------------------ state (checkpoints)

    def _next_step(self) -> int:
        counter = self.__dict__.setdefault("_step_counter", [0])
        counter[0] += 1
        return counter[0] - 1

    def state_dict(self) -> dict[str, Any]:
        """The step counter and every scheme's state (plain values and tensors)."""
        return {"step": self.__dict__.get("_step_counter", [0])[0],
                "schemes": {s.name: s.state_dict() for s in self.schemes}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__["_step_counter"] = [int(state.get("step", 0))]
        for s in self.schemes:
            s.load_state_dict(state.get("schemes", {}).get(s.name, {}))

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Which embedding weights of ``model`` get directions on the looked-up rows only and why
        each other one is dense (``_embedding_rows``); ``{}`` for a model without embeddings."""
        params = [n for n, p in model.named_parameters() if p.requires_grad]
        masked = {i for s in self.schemes if s.name == "sparse" for i in range(len(params))}
        rows, dense = _embedding_rows.embedding_weights(model, params, enabled=self.rows_on, masked=masked,
                                                        orthogonal=getattr(self, "orthogonal", False))
        if not rows and not dense:
            return {}
        return {"embedding_rows": {"rows": [params[i] for i in sorted(rows)], "dense": dense}}

    def options(self) -> dict[str, Any]:
        """The estimator's own options and every active scheme's, flat (``svrg_every``, ...)."""
        out = {k: v for k, v in super().options().items() if k != "schemes"}
        for s in self.schemes:
            out.update(s.options())
        return out
