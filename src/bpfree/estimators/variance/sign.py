"""ZO-SGD-Sign: the sign of the projected gradient (Zhang et al. 2024, ZO-Bench, "ZO-SGD-Sign").

    g = (1/K) Σ_k sign(d_k) v_k,      d_k ≈ ∇f·v_k.

Biased, by a derived factor: for Gaussian v write v = u ĝ + w with ĝ = ∇f/‖∇f‖,
u = ĝ·v ~ N(0, 1) and w ⊥ ĝ independent of u; sign(d) = sign(u), so

    E[g] = E[sign(u) u] ĝ + E[sign(u)] E[w] = E|u| ĝ = √(2/π) · ∇f/‖∇f‖,

the unit gradient direction scaled by √(2/π) ≈ 0.798 — a normalised-gradient step, whatever
‖∇f‖ is (for Rademacher v, u is approximately N(0, 1) when no coordinate of ĝ dominates, so the
same holds up to O(max|ĝ_i|)). For K = 1 its second moment is E‖g‖² = E‖v‖² = N, independent of the loss
scale. Costs nothing extra. Source: ZO-Bench (ICML 2024),
signSGD (Bernstein et al. 2018) for the sign idea.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bpfree.estimators.variance import Scheme, register_scheme


@register_scheme("sign")
@dataclass(frozen=True)
class Sign(Scheme):
    """d_k → sign(d_k) (``sign = true``)."""

    def transform(self, d: torch.Tensor) -> torch.Tensor:
        return torch.sign(d)
