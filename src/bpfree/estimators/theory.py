"""Closed-form statistics of the estimators, used by the oracle tests and reports.

Notation: N parameters, K directions per step, ∇ the exact gradient.
"""

from __future__ import annotations

import math


def expected_chi(k: int) -> float:
    """E[χ_K] = √2 Γ((K+1)/2) / Γ(K/2), the mean length of a K-dim standard normal."""
    return math.sqrt(2.0) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))


def forward_gradient_cosine(n: int, k: int = 1) -> float:
    """E[cos(g, ∇)] for g = (1/K) Σ (∇·v_k) v_k, v_k ~ N(0, I_N), to leading order in K/N.

    Write u_k = v_k·∇/‖∇‖ ~ N(0, 1). Then ∇·g = ‖∇‖² Σu_k²/K and, because
    the v_k are nearly orthogonal with ‖v_k‖² ≈ N when K ≪ N,
    ‖g‖ ≈ ‖∇‖ √(N Σu_k²)/K, so cos ≈ √(Σu_k² / N) = χ_K/√N and
    E[cos] ≈ E[χ_K]/√N ≈ √(K/N) (K = 1: √(2/(πN))). Holds for Rademacher
    directions too (‖v‖² = N exactly) and for SPSA/MeZO as ε → 0.
    """
    return expected_chi(k) / math.sqrt(n)


def forward_gradient_cosine_std(n: int, k: int = 1) -> float:
    """Std of cos(g, ∇) under the same approximation: √(K − E[χ_K]²)/√N."""
    return math.sqrt(max(k - expected_chi(k) ** 2, 0.0) / n)


def weight_perturbation_error(n: int, k: int = 1, distribution: str = "gaussian") -> float:
    """E‖g − ∇‖² / ‖∇‖² for the forward gradient with K i.i.d. directions.

    E‖g − ∇‖² = (E[(∇·v)² ‖v‖²] − ‖∇‖²)/K. Gaussian: E[(∇·v)²‖v‖²] =
    (N + 2)‖∇‖², so (N + 1)/K. Rademacher: ‖v‖² = N exactly, so (N − 1)/K.
    (MeZO's Lemma 2 states the second moment, (N + K − 1)/K · ‖∇‖² for K
    Gaussian directions, which is the same statement plus ‖∇‖².)
    """
    if distribution == "gaussian":
        return (n + 1) / k
    if distribution == "rademacher":
        return (n - 1) / k
    raise ValueError(f"unknown distribution {distribution!r}")


def cosine_of_mean(n: int, k: int, samples: int, distribution: str = "gaussian") -> float:
    """E-ish cos(mean of `samples` estimates, ∇) ≈ 1/√(1 + err/samples), err from above."""
    err = weight_perturbation_error(n, k, distribution)
    return 1.0 / math.sqrt(1.0 + err / samples)


def _chi2_1_cdf(t: float) -> float:
    """P(u² ≤ t) for u ~ N(0, 1)."""
    return math.erf(math.sqrt(max(t, 0.0) / 2.0))


def adaptive_scale(candidates: int, rule: str = "largest") -> float:
    """κ with E[g] = κ ∇f for the adaptive forward gradient (``variance.adaptive``), Gaussian v.

    Keeping the candidate with the largest |∇f·v| of c: κ_c = E[max_j u_j²] =
    ∫_0^∞ (1 − F(t)^c) dt; the smallest (seed 000's rule): E[min_j u_j²] = ∫_0^∞ (1 − F(t))^c dt,
    F the χ²₁ CDF. Integrated numerically (substitution t = s², Simpson's rule on [0, 12]; the
    tails beyond contribute below 1e-12).
    """
    if rule not in ("largest", "seed000", "smallest"):
        raise ValueError(f"unknown rule {rule!r}")
    c = candidates

    def integrand(s: float) -> float:  # dt = 2s ds
        f = _chi2_1_cdf(s * s)
        tail = 1.0 - f ** c if rule == "largest" else (1.0 - f) ** c
        return tail * 2.0 * s

    n, hi = 4000, 12.0
    h = hi / n
    total = integrand(0.0) + integrand(hi)
    for i in range(1, n):
        total += (4 if i % 2 else 2) * integrand(i * h)
    return total * h / 3.0


def sign_scale() -> float:
    """E[g] = √(2/π) ∇f/‖∇f‖ for ZO-SGD-Sign with Gaussian v (``variance.sign``)."""
    return math.sqrt(2.0 / math.pi)
