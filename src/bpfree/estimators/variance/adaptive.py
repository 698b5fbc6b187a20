"""Adaptive directions: draw c candidates, keep the one a criterion picks.

``adaptive_candidates = c``, ``adaptive_rule = "largest"`` (default): for each of the K
directions draw c candidates v_1 … v_c, evaluate all of them (one batched pass where an
engine batches), and keep the candidate with the largest |d_j| = |∇f·v_j|, the most
informative one. Cost: c·K directions evaluated instead of K.

**Bias (derived).** For Gaussian v write v = u ĝ + w, ĝ = ∇f/‖∇f‖, u = ĝ·v ~ N(0, 1), w ⊥ ĝ
independent of u. The kept candidate j* depends only on the u's, so

    E[d_{j*} v_{j*}] = ‖∇f‖ E[u_{j*} (u_{j*} ĝ + w_{j*})] = E[u_{j*}²] ∇f = κ_c ∇f,

    κ_c = E[max_{j≤c} u_j²] = ∫_0^∞ (1 − erf(√(t/2))^c) dt

(``theory.adaptive_scale``: κ_1 = 1, κ_2 ≈ 1.64, κ_4 ≈ 2.47, κ_8 ≈ 3.46). So the estimate points
along ∇f on average but is κ_c times too long — a biased estimator whose bias (κ_c − 1)∇f is a
pure rescaling, absorbed by the learning rate; the cosine to ∇f of one estimate rises because
the kept v has a larger component along ĝ. For Rademacher v the same holds up to the deviation
of ĝ·v from normality (tested).

``adaptive_rule = "seed000"``: seed 000's rule under its own name, so a study can show what it
did: the *smallest* |jvp| of c candidates (E = κ'_c ∇f with κ'_c = E[min u²] < 1, the least
informative direction; κ'_4 ≈ 0.12), and only at the first step (step 0); later steps draw one plain
direction (the candidate count is 1). Source: seed 000 (Panchal et al. 2025), their repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bpfree.estimators.variance import Scheme, register_scheme

RULES = ("largest", "seed000")


@register_scheme("adaptive")
@dataclass(frozen=True)
class Adaptive(Scheme):
    """Keep one of ``candidates`` directions per direction by ``rule`` (module docstring)."""

    candidates: int = 4
    rule: str = "largest"
    applies_to = ("forward_gradient", "spsa")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"adaptive_candidates must be an int >= 1, got {self.candidates!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown adaptive_rule {self.rule!r}; valid: {', '.join(RULES)}")

    def _active(self, step) -> bool:
        return self.rule == "largest" or step.index == 0

    def num_candidates(self, step) -> int:
        return self.candidates if self._active(step) else 1

    def select(self, step, dirs, d):
        c = self.num_candidates(step)
        if c == 1:
            return dirs, d
        groups = d.reshape(-1, c).abs()  # direction k's candidates are k·c … k·c + c − 1
        pick = groups.argmax(1) if self.rule == "largest" else groups.argmin(1)
        keep = pick + torch.arange(groups.shape[0], device=pick.device) * c
        step.details["adaptive_picked"] = keep.tolist()
        return dirs.select(keep), d[keep]
