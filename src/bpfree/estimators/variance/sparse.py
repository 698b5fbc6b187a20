"""Sparse perturbation: directions only on a fraction s of each tensor's entries, chosen by magnitude.

``sparse_fraction = s``: every trainable tensor θ_p gets a 0/1 mask M_p with exactly
⌈s·numel⌉ ones, and every direction is restricted to it, v ← M ⊙ v (masked tensors get dense
directions: M ⊙ A Bᵀ is not low-rank). With E[v vᵀ] = I,

    E[g] = E[(∇f·(M⊙v)) (M⊙v)] = diag(M) ∇f = M ⊙ ∇f,

so the estimate is **exactly zero off the mask** and unbiased for the masked coordinates only —
biased as an estimate of ∇f by −(1 − M) ⊙ ∇f — while its variance drops from ~N‖∇f‖² to
~n_M‖M⊙∇f‖² (n_M = Σ M, the perturbed dimension).

* ``sparse_rule = "smallest"`` (default): the smallest-magnitude entries, Sparse-MeZO's choice
  (Liu et al. 2024, "Sparse MeZO": perturbing small weights works better and large weights are
  more sensitive);
* ``sparse_rule = "largest"``: the largest-magnitude entries, what seed 000's code does
  ("sparse": top 1% by |θ|).

``sparse_every = n``: the masks are recomputed from the current |θ| every n steps (step 0, n,
2n, …) and kept in between (the scheme's state, saved in checkpoints).

**Ties and all-zero tensors (the stated rule).** Entries are ranked by |θ| with ties broken in a
uniformly random order drawn from the step's generator, so every tensor gets exactly ⌈s·numel⌉
perturbed entries whatever its values: an all-zero tensor (LoRA B at init) gets a uniformly
random subset of that size — not all of it (seed 000's mask is all ones there, because every
entry ties for the largest) and not none (which would freeze it forever).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bpfree.estimators.variance import Scheme, register_scheme

RULES = ("smallest", "largest")


def magnitude_mask(t: torch.Tensor, fraction: float, rule: str, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask (t's dtype and shape) with exactly ⌈fraction·numel⌉ ones on the entries of smallest
    (or largest) |t|, ties in random order (module docstring)."""
    n = t.numel()
    keep = min(n, max(1, math.ceil(fraction * n)))
    perm = torch.randperm(n, generator=generator, device=generator.device).to(t.device)
    mags = t.detach().reshape(-1).abs()[perm]
    order = torch.argsort(mags, stable=True, descending=rule == "largest")
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[perm[order[:keep]]] = 1
    return mask.view(t.shape)


@register_scheme("sparse")
@dataclass(frozen=True)
class Sparse(Scheme):
    """Restrict every direction to a magnitude mask of ``fraction`` of each tensor (module docstring)."""

    fraction: float = 0.01
    rule: str = "smallest"
    every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"sparse_fraction must be a number in (0, 1], got {self.fraction!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown sparse_rule {self.rule!r}; valid: {', '.join(RULES)} "
                             "(smallest: Sparse-MeZO; largest: seed 000)")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"sparse_every must be an int >= 1, got {self.every!r}")

    def masks(self, step) -> dict[int, torch.Tensor]:
        if step.index % self.every == 0 or "masks" not in self.state:
            self.state["masks"] = [magnitude_mask(p, self.fraction, self.rule, step.generator) for _, p in step.params]
            self.state["refreshed_at"] = step.index
        step.details["sparse_refreshed_at"] = self.state["refreshed_at"]
        return dict(enumerate(self.state["masks"]))
