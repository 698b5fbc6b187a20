"""Forward gradient by weight perturbation (forward-mode AD).

Baydin, Pearlmutter, Syme, Wood, Torr (2022), "Gradients without
Backpropagation"; compared with tuned backprop in seed 002 (Rike & Førland).

For K directions v_k (``bpfree.estimators.directions``, E[v vᵀ] = I), one
forward-mode pass gives the directional derivatives d_k = ∇f(θ)·v_k (jvp) and

    g = (1/K) Σ_k d_k v_k,     E[g] = ∇f(θ).

For Gaussian v and K ≪ N, cos(g, ∇f) ≈ √(χ²_K / N), i.e. about √(K/N)
(``bpfree.estimators.theory.forward_gradient_cosine``). The K > 1 case is one batched
pass: with dense directions (``rank="full"``) the K tangents are stacked and
``torch.func.vmap`` runs ``torch.func.jvp`` over them; with low-rank
directions (the default) on a plain Linear/Conv2d/ReLU/MaxPool2d/Flatten
``nn.Sequential``, ``_lowrank.chain_directional_derivatives`` carries them.
Either way the primal forward is computed once.

``jvp_clip = c`` replaces d_k by clamp(d_k, −c, c) (seed 002's stabiliser,
"capping |∇f·v| at 1"); the estimate is then biased towards smaller steps
when |d_k| > c, and ``details["clipped"]`` counts how often it happened.

Cost (forward-pass equivalents): dense, 1 forward + 2 per tangent (dW·x and
W·dx), memory ≈ inference + K tangents (one per parameter); low-rank, 2 per
direction in separate passes, or 1 + K in the batched pass, whose memory is
inference + the ReLU masks and pooling indices + one chunk of tangents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bpfree.estimators import _lowrank, directions, engines
from bpfree.estimators.base import check_bool, check_positive, check_positive_int
from bpfree.estimators.directional import DirectionalEstimator, Evaluation
from bpfree.estimators.registry import register

# Kept importable from here (tests and user code used them before the engines module existed).
directional_derivative = engines.directional_derivative
directional_derivatives = engines.stacked_directional_derivatives
_load_forward_ad_decompositions = engines.load_forward_ad_decompositions


@register("forward_gradient")
@dataclass(frozen=True)
class ForwardGradient(DirectionalEstimator):
    """g = (1/K) Σ_k (∇f·v_k) v_k from forward-mode passes (module docstring).

    Draw K directions (``DirectionSet``), get d_k = ∇f·v_k from the first engine that applies
    (``engines.directional_derivatives``: the batched K-tangent chain, a vmapped jvp, or one
    forward-AD pass per direction), combine Σ_k w_k v_k with w_k = clip(d_k)/K, write ``p.grad``.
    ``schemes``: variance reduction (``bpfree.estimators.variance``). ``embedding_rows`` (default
    on): an ``nn.Embedding`` weight's directions live on the rows the batch looks up
    (``_embedding_rows``; unbiased, (V − |T|)·D fewer noise dimensions), dense where that does not
    apply (a tied weight, ...: the reason is in ``details["embedding_rows"]``).
    """

    num_directions: int = 1
    distribution: str = "rademacher"  # fastest unbiased choice (directions.fill_)
    orthogonal: bool = False
    jvp_clip: float | None = None
    rank: int | str = 1  # low-rank Linear/Conv2d-weight directions (_lowrank); "full": dense directions
    embedding_rows: bool = True  # nn.Embedding directions on the looked-up rows only (_embedding_rows)
    seed: int = 0
    schemes: tuple = ()

    def __post_init__(self) -> None:
        check_positive_int("num_directions", self.num_directions)
        check_bool("embedding_rows", self.embedding_rows)
        directions.check_distribution(self.distribution, orthogonal=self.orthogonal)
        if self.jvp_clip is not None:
            check_positive("jvp_clip", self.jvp_clip)
        _lowrank.check_rank(self.rank)
        if self.orthogonal and self.rank != "full":
            raise ValueError('orthogonal directions are dense: set rank="full" with orthogonal=True')

    def evaluate(self, step, dirs, *, closure=None, at=None) -> Evaluation:
        ev = engines.directional_derivatives(step.model, dirs, closure or step.closure, at=at, estimator=self.name)
        clipped = int((ev.d.abs() > self.jvp_clip).sum()) if self.jvp_clip is not None else 0
        details = {"clipped": clipped, "engine": ev.engine, "batched_tangents": ev.engine == "batched_chain"}
        return Evaluation(ev.loss, ev.d, ev.forward_passes, details)

    def clip(self, d: torch.Tensor) -> torch.Tensor:
        """clamp(d, −c, c) with c = ``jvp_clip`` (seed 002's stabiliser), or d."""
        return d if self.jvp_clip is None else d.clamp(-self.jvp_clip, self.jvp_clip)
