"""Guessed gradients from local Jacobians: activity perturbation, W^T, W-perp, W-perp-NS, W^P.

Sources: Ren, Kornblith, Liao, Hinton (2023), "Scaling forward gradient with
local losses" (activity perturbation); Singhal, Sarkar, Uhler, ... (2023),
"How to guess a gradient" (the W^T guess); Wang, Markou, Campbell (2025),
"Towards scalable backpropagation-free gradient estimation" (seed 001: W-perp,
W-perp-NS, W^P). Settings and numbers: ``REFERENCES.md``.

Setting: a ReLU MLP, layers i = 0 … n−1,

    s_i = W_i x_i + b_i,     x_{i+1} = ReLU(s_i),     M_i = diag(1[s_i > 0]),

with s_{n−1} the logits. For every example b and layer i a *guess* u_{i,b} of
the pre-activation gradient g_{i,b} = ∂L/∂s_{i,b} is drawn, independently per
example and per layer. One forward pass carries all guesses as tangents,

    ṡ_i = W_i ẋ_i + u_i,     ẋ_{i+1} = M_i ṡ_i,     (ẋ_0 = 0)

so by the chain rule the per-example directional derivative is
d_b = Σ_i g_{i,b}·u_{i,b} (read off the logits' tangent as ∂L/∂z_b · ż_b). The
estimate is

    ĝ_{s_{i,b}} = d_b u_{i,b},   ĝ_{W_i} = Σ_b d_b u_{i,b} x_{i,b}ᵀ,   ĝ_{b_i} = Σ_b d_b u_{i,b}.

Guesses of different layers are independent with zero mean, so the cross terms
vanish and, with C_{i,b} = Cov(u_{i,b}),

    E[ĝ_{W_i}] = Σ_b C_{i,b} g_{i,b} x_{i,b}ᵀ       (bias: (C − I) g per example).

**Where the guesses come from (the upstream Jacobian).** For a hidden layer,
g_i = M_i W_{i+1}ᵀ g_{i+1} = W̃ᵀ g_{i+1} with W̃ = W_{i+1} M_i: the true
gradient lies in the row space of W̃, which is known in the forward pass (the
next weight and this layer's ReLU mask). The guesses use it:

================== ======================================= =====================
guess              u_{i,b}                                 Cov C_{i,b}
================== ======================================= =====================
activity           ε ~ N(0, I)                             I (unbiased)
W^T (wt_guess)     W̃ᵀ ε,  ε ~ N(0, I_{d_{i+2}})            W̃ᵀW̃
W-perp (w_perp)    V_k η,  η ~ N(0, I_k), W̃ = UΛVᵀ          V_kV_kᵀ (unbiased in the top-k subspace)
W-perp-NS          Xᵀ ε, X ≈ U_kV_kᵀ by Newton–Schulz       ≈ V_kV_kᵀ
W^P (w_p)          (W̃ᵀW̃+σI)^{-1/2} W̃_σᵀ ε                 I (unbiased)
================== ======================================= =====================

The last layer (the logits) has no upstream Jacobian and always uses activity
perturbation. W-perp's V_k η has the distribution of W̃'ᵀε with
W̃' = U_kV_kᵀ (the top-k singular values set to one), drawn with k numbers
instead of d_{i+2}. W^P whitens the Jacobian: with W̃_σ = [W̃; √σ I] (so that
W̃_σᵀW̃_σ = W̃ᵀW̃ + σI, singular values (Λ²+σ)^{1/2}), its covariance is
exactly I — so in distribution it *is* activity perturbation, computed through
the Jacobian as the paper does; it shows what removing the bias costs.

**Extending to convolutions.** Everything above needs only, per layer, the map
from this layer's pre-activation to the next one's (the upstream Jacobian
J = ∂s_{i+1}/∂s_i = W_{i+1} M_i). For a convolution it is the next conv's
linear operator composed with the mask; W^T becomes u = M ⊙ conv_transpose(ε),
and W-perp needs the top singular vectors of that operator (e.g. by
randomized subspace iteration with conv / conv_transpose as the matvecs,
as ``solver="randomized"`` does with matmuls here).

Cost: one forward with tangents (≈ 2 forwards of matmuls) plus the guesses:
a matmul per layer for W^T, a batched SVD per hidden layer for W-perp
(per example: B SVDs of d_{i+2} × d_{i+1}), a batched eigendecomposition for
W^P, 5 × 4 batched matmuls for W-perp-NS. Memory: the layer inputs x_i and
guesses u_i of the batch are kept until d_b is known (like backprop's saved
activations), no backward pass through the network.

The loss must be a sum or mean of per-example terms of the model's output
(cross-entropy, MSE), so that ∂L/∂z_b is example b's own; the directional
derivative itself is exact for any loss of the output. A loss that also uses
the parameters directly (a penalty in the closure) is refused with
``UnsupportedModelError``: the guesses would not see that term.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.estimators import _models, directions
from bpfree.estimators._functional import UnsupportedModelError, loss_gradient_at_output, output_leaf
from bpfree.estimators.base import (
    Estimate,
    Estimator,
    check_positive,
    check_positive_int,
    check_scalar_loss,
    write_gradients,
)
from bpfree.estimators.registry import register

SUPPORTED = (
    "a ReLU MLP written as nn.Sequential(Linear, ReLU, Linear, ReLU, ..., Linear), optionally starting with "
    "nn.Flatten (bpfree.models 'mlp' and 'mlp_mnist1d'), as in the papers"
)


def relu_mlp_layers(model: nn.Module, estimator: str) -> list[nn.Linear]:
    """The Linear layers of a ReLU MLP in order, or an ``UnsupportedModelError`` saying what is supported."""

    def refuse(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{estimator} builds its guesses from the next layer's weight and this layer's ReLU mask, so it "
            f"supports {SUPPORTED}; {why}. Use forward_gradient, spsa or mezo for other models "
            f"(docs/estimators.md, 'Guessed gradients', says how the construction extends to convolutions)."
        )

    if type(model) is nn.Linear:  # no hidden layer: activity perturbation of the logits
        if _models.has_hooks(model):
            raise refuse("the nn.Linear has hooks, which the guessing pass would skip")
        return [model]
    why = _models.why_not_sequential(model, lambda m: True)  # the layer pattern is checked below
    if why is not None:
        raise refuse(why)
    mods = list(model.named_children())
    if mods and isinstance(mods[0][1], nn.Flatten):
        mods = mods[1:]
    linears: list[nn.Linear] = []
    for pos, (name, mod) in enumerate(mods):
        expected = nn.Linear if pos % 2 == 0 else nn.ReLU
        if type(mod) is not expected:
            raise refuse(f"module {name!r} is a {type(mod).__name__} where an nn.{expected.__name__} belongs")
        if expected is nn.Linear:
            linears.append(mod)
    if not linears or len(mods) % 2 == 0:
        raise refuse("it must end with an nn.Linear (the logits)")
    return linears


# --------------------------------------------------------------------------- guesses


class _Guess:
    """Draws u for a hidden layer from its pre-activation s (B × d) and the next weight W (d' × d)."""

    def __call__(self, s: torch.Tensor, w_next: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _gaussian(shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return directions.sample(shape, distribution="gaussian", generator=gen, dtype=like.dtype, device=like.device)


def upstream_jacobian(s: torch.Tensor, w_next: torch.Tensor) -> torch.Tensor:
    """W̃_b = W_{i+1} M_{i,b} for every example: (B, d_{i+2}, d_{i+1}), columns of dead units zeroed."""
    return w_next.unsqueeze(0) * (s > 0).unsqueeze(1).to(s.dtype)


def top_right_singular(s: torch.Tensor, w_next: torch.Tensor, k: int | str, solver: str, gen: torch.Generator,
                       power_iterations: int = 3, oversample: int = 6) -> torch.Tensor:
    """Rows spanning the top-k right singular subspace of each W̃_b = W_{i+1} M_b: (B, k', d_{i+1}).

    Directions whose singular value is numerically zero (fewer than k live
    units) are zeroed, so a guess never points into W̃'s null space.
    ``k = "rank"`` keeps every nonzero singular value.

    ``solver = "svd"``: a batched ``torch.linalg.svd`` of the B matrices W̃_b.
    ``solver = "randomized"``: subspace iteration (Halko, Martinsson, Tropp
    2011) on c = k + ``oversample`` vectors with ``power_iterations`` rounds,
    then Rayleigh–Ritz. W̃ᵀW̃ = M G M with G = W_{i+1}ᵀW_{i+1} shared by the
    batch, so one round is a single (d × d)·(d × B·c) matmul plus a batched
    QR, and W̃ is never materialised (B·d² numbers): O(d²·B·c) per round
    instead of O(B·d³). Accuracy: the subspace error shrinks like
    (σ_{c+1}/σ_k)^{2q+1} (tested against the exact SVD). Falls back to the
    SVD when c ≥ min(d_{i+2}, d_{i+1}).
    """
    m, n = w_next.shape
    full = min(m, n)
    kk = full if k == "rank" else min(int(k), full)
    c = kk + oversample
    if solver == "randomized" and k != "rank" and c < full:
        mask = (s > 0).to(s.dtype).unsqueeze(-1)  # (B, n, 1)
        gram = w_next.T @ w_next
        b = s.shape[0]

        def apply(q: torch.Tensor) -> torch.Tensor:  # M G M q for every example at once
            flat = (q * mask).transpose(0, 1).reshape(n, b * c)
            return (gram @ flat).reshape(n, b, c).transpose(0, 1) * mask

        q = torch.linalg.qr(_gaussian((b, n, c), s, gen) * mask).Q
        for _ in range(power_iterations):
            q = torch.linalg.qr(apply(q)).Q
        evals, z = torch.linalg.eigh(q.mT @ apply(q))  # ascending: σ² of W̃ in the subspace
        vh = (q @ z.flip(-1)[..., :kk]).mT
        sv = evals.flip(-1)[..., :kk].clamp_min(0).sqrt()
        tol = sv[:, :1] * math.sqrt(max(m, n) * torch.finfo(s.dtype).eps)  # eigenvalues carry σ² rounding
    else:
        _, sv, vh = torch.linalg.svd(upstream_jacobian(s, w_next), full_matrices=False)
        vh, sv = vh[:, :kk], sv[:, :kk]
        tol = sv[:, :1] * (max(m, n) * torch.finfo(s.dtype).eps)
    keep = sv > tol + torch.finfo(s.dtype).tiny
    return vh * keep.unsqueeze(-1).to(vh.dtype)


def full_column_rank(weight: torch.Tensor) -> bool:
    """Whether W (m × n, m ≥ n) has rank n: then every W M_b has row space = the live units (any
    subset of independent columns is independent), and the rank-k W-perp projector is M_b itself."""
    m, n = weight.shape
    if m < n:
        return False
    sv = torch.linalg.svdvals(weight.detach())
    return bool(sv[-1] > sv[0] * max(m, n) * torch.finfo(weight.dtype).eps)


class _Activity(_Guess):
    def __call__(self, s, w_next, gen):
        return _gaussian(tuple(s.shape), s, gen)


class _WT(_Guess):
    def __call__(self, s, w_next, gen):
        eps = _gaussian((s.shape[0], w_next.shape[0]), s, gen)
        return (eps @ w_next).mul_(s > 0)


@dataclass(frozen=True)
class _WPerp(_Guess):
    k: int | str
    solver: str

    def __call__(self, s, w_next, gen):
        if self.k == "rank" and full_column_rank(w_next):  # V_r V_rᵀ = M exactly: one SVD of W per step
            return _gaussian(tuple(s.shape), s, gen).mul_(s > 0)
        vh = top_right_singular(s, w_next, self.k, self.solver, gen)
        eta = _gaussian(tuple(vh.shape[:2]), s, gen)
        return torch.bmm(eta.unsqueeze(1), vh).squeeze(1)


@dataclass(frozen=True)
class _WPerpNS(_Guess):
    k: int
    iterations: int
    threshold: float | None

    def __call__(self, s, w_next, gen):
        jac = upstream_jacobian(s, w_next)
        tau = self.threshold if self.threshold is not None else step_threshold(w_next, self.k)
        x = newton_schulz_top_k(jac, tau, self.iterations)
        eps = _gaussian((s.shape[0], w_next.shape[0]), s, gen)
        return torch.bmm(eps.unsqueeze(1), x).squeeze(1)


@dataclass(frozen=True)
class _WP(_Guess):
    sigma: float

    def __call__(self, s, w_next, gen):
        jac = upstream_jacobian(s, w_next)
        b, n = s.shape
        gram = jac.mT @ jac
        gram.diagonal(dim1=-2, dim2=-1).add_(self.sigma)
        evals, evecs = torch.linalg.eigh(gram)  # W̃ᵀW̃ + σI = V (Λ²+σ) Vᵀ
        inv_sqrt = (evecs * evals.clamp_min(self.sigma).rsqrt().unsqueeze(1)) @ evecs.mT
        eps_top = _gaussian((b, w_next.shape[0]), s, gen)
        eps_bottom = _gaussian((b, n), s, gen)
        w_sigma_t_eps = torch.bmm(eps_top.unsqueeze(1), jac).squeeze(1) + math.sqrt(self.sigma) * eps_bottom
        return torch.bmm(w_sigma_t_eps.unsqueeze(1), inv_sqrt).squeeze(1)


# --------------------------------------------------------------------------- Newton–Schulz


def _odd_polynomial(coeffs: torch.Tensor, x: torch.Tensor, iterations: int) -> torch.Tensor:
    """x ↦ p^{∘iterations}(x) with p(x) = c0 x + c1 x³ + c2 x⁵ + c3 x⁷ (scalars)."""
    c0, c1, c2, c3 = coeffs.unbind(-1)
    for _ in range(iterations):
        x2 = x * x
        x = x * (c0 + x2 * (c1 + x2 * (c2 + x2 * c3)))
    return x


@functools.lru_cache(maxsize=256)
def step_polynomial(tau: float, iterations: int = 5) -> tuple[float, float, float, float]:
    """Coefficients of a degree-7 odd p whose ``iterations``-fold composite approximates 1[x ≥ τ] on [0, 1].

    Start: p(x) = x + βx(x² − τ²)(1 − x²) with β = 1/(2(1 − τ²)), which has a
    repelling fixed point at τ and attracting ones at 0 and 1 (p'(1) = 0);
    then least squares on 1001 points of [0, 1], ignoring a band of ±5% around
    τ, by Adam in float64 (deterministic; cached per τ, which callers round to
    0.01). Measured max error of the composite outside a band of ±10% around τ:
    0.01 (τ = 0.85), 0.02 (0.7), 0.07 (0.6), 0.17 (0.5), 0.37 (0.3): the step is
    sharp for τ ≳ 0.6 and soft below (``tests/test_guessed.py``).
    """
    t = torch.tensor(tau, dtype=torch.float64)
    beta = 1.0 / (2.0 * (1.0 - t * t))
    c = torch.stack([1 - beta * t * t, beta * (1 + t * t), -beta, torch.zeros((), dtype=torch.float64)])
    x = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    target = (x >= t).to(torch.float64)
    weight = ((x - t).abs() > 0.05 * t).to(torch.float64)
    c = c.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=3e-3)
    with torch.enable_grad():
        for _ in range(1000):
            opt.zero_grad()
            loss = (((_odd_polynomial(c, x, iterations) - target) ** 2) * weight).mean()
            loss.backward()
            opt.step()
    return tuple(float(v) for v in c.detach())  # type: ignore[return-value]


def step_threshold(weight: torch.Tensor, k: int) -> float:
    """τ = σ_k / σ_1 of the (unmasked) next-layer weight, rounded to 0.01 and kept in [0.05, 0.95].

    One SVD of a d_{i+2} × d_{i+1} matrix per layer and step (not per
    example). Masking columns only lowers singular values (interlacing), so
    this is the typical relative position of σ_k in the per-example W̃.
    """
    sv = torch.linalg.svdvals(weight.detach().double())
    kk = min(k, sv.numel())
    if kk >= sv.numel():
        return 0.05
    return float(min(0.95, max(0.05, round(float(sv[kk - 1] / sv[0].clamp_min(1e-300)), 2))))


def newton_schulz_top_k(jac: torch.Tensor, tau: float, iterations: int = 5) -> torch.Tensor:
    """X ≈ U_k V_kᵀ for each W̃_b = UΛVᵀ: its singular values mapped through a soft step at τ·σ_1.

    W̃ is scaled to unit spectral norm (σ_1 from 10 batched power iterations,
    +2% so that no singular value exceeds 1), then ``iterations`` rounds of
    X ← c0 X + c1 (XXᵀ)X + c2 (XXᵀ)²X + c3 (XXᵀ)³X with the coefficients of
    :func:`step_polynomial` — matmuls only, no SVD. Works on the shorter side.
    """
    tall = jac.shape[-2] > jac.shape[-1]
    x = jac.mT if tall else jac  # (B, m, n), m <= n
    v = torch.ones(x.shape[0], x.shape[-1], 1, dtype=x.dtype, device=x.device)
    for _ in range(10):
        v = x.mT @ (x @ v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    sigma1 = (x @ v).norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (B, 1, 1)
    x = x / (sigma1 * 1.02)
    c0, c1, c2, c3 = step_polynomial(round(tau, 2), iterations)
    for _ in range(iterations):
        a = x @ x.mT
        a2 = a @ a
        poly = c1 * a + c2 * a2 + c3 * (a2 @ a)
        poly.diagonal(dim1=-2, dim2=-1).add_(c0)
        x = poly @ x
    return x.mT if tall else x


# --------------------------------------------------------------------------- the pass


@dataclass
class _Trace:
    """What one guessed forward pass leaves: per layer the input x_i and guess u_i; the logits leaf."""

    inputs: list[torch.Tensor | None]
    guesses: list[torch.Tensor | None]
    calls: list[int]
    tangent: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@contextlib.contextmanager
def _guessing(layers: list[nn.Linear], guess: _Guess, gen: torch.Generator, name: str) -> Iterator[_Trace]:
    """Patch each Linear's forward to carry tangents ṡ_i = W_i ẋ_i + u_i alongside the primal."""
    n = len(layers)
    trace = _Trace(inputs=[None] * n, guesses=[None] * n, calls=[0] * n)

    def forward(x: torch.Tensor, i: int) -> torch.Tensor:
        trace.calls[i] += 1
        if trace.calls[i] > 1 or (i > 0 and trace.calls[i - 1] != 1):
            raise UnsupportedModelError(
                f"{name}: the closure must run the model once, through its layers in order; layer {i} ran "
                f"{trace.calls[i]} times. Call the model once per closure."
            )
        if x.dim() != 2:
            raise UnsupportedModelError(
                f"{name} supports {SUPPORTED} on (batch, features) inputs; layer {i} got shape {tuple(x.shape)}"
            )
        layer = layers[i]
        with torch.no_grad():
            s = F.linear(x, layer.weight, layer.bias)
            u = guess(s, layers[i + 1].weight, gen) if i + 1 < n else _Activity()(s, None, gen)  # type: ignore[arg-type]
            tangent = u if i == 0 else torch.addmm(u, trace.tangent * (x > 0), layer.weight.T)
        trace.inputs[i], trace.guesses[i], trace.tangent = x.detach(), u, tangent
        if i + 1 < n:
            return s
        trace.logits, handed = output_leaf(s)
        return handed

    try:
        for i, layer in enumerate(layers):
            if "forward" in layer.__dict__:
                raise ValueError(f"{type(layer).__name__} already has an instance-level forward; cannot patch it")
            layer.forward = functools.partial(forward, i=i)
        yield trace
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if trace.calls != [1] * n:
        raise UnsupportedModelError(f"{name}: the closure did not run every Linear of the model once ({trace.calls})")


class GuessedGradient(Estimator):
    """Shared engine: one forward pass with per-example, per-layer guesses as tangents (module docstring)."""

    num_directions: int
    seed: int

    def _guess(self) -> _Guess:
        raise NotImplementedError

    def _check_common(self) -> None:
        check_positive_int("num_directions", self.num_directions)

    def _estimate(self, model, params, closure, generator):
        layers = relu_mlp_layers(model, self.name)
        trainable = {id(p) for _, p in params}
        guess = self._guess()
        grads: dict[int, torch.Tensor] = {}
        loss_value = math.nan
        d_all = []
        for k in range(self.num_directions):
            with _guessing(layers, guess, generator, self.name) as trace:
                with torch.enable_grad():
                    loss = closure()
            check_scalar_loss(loss)
            if trace.logits is None or not loss.requires_grad:
                raise UnsupportedModelError(f"{self.name}: the closure's loss does not depend on the model's output")
            dloss_dz = loss_gradient_at_output(loss, trace.logits, [p for _, p in params])
            if dloss_dz is None:
                raise UnsupportedModelError(
                    f"{self.name}: the closure's loss uses the parameters outside the model's forward (e.g. a "
                    f"penalty term); guessed gradients see the loss only through the model's output. Put the penalty "
                    f"in the optimizer (weight_decay) or use forward_gradient, spsa or mezo."
                )
            d = (dloss_dz * trace.tangent).sum(-1)  # per-example directional derivative d_b
            if k == 0:
                loss_value = float(loss.detach())
            d_all.append(d)
            with torch.no_grad():
                for layer, x, u in zip(layers, trace.inputs, trace.guesses):
                    wu = u * d.unsqueeze(1)  # ĝ_{s_i} = d_b u_{i,b}
                    for p, g in ((layer.weight, lambda: wu.T @ x), (layer.bias, lambda: wu.sum(0))):
                        if p is None or id(p) not in trainable:
                            continue
                        grads[id(p)] = g() if k == 0 else grads[id(p)].add_(g())
        if self.num_directions > 1:
            torch._foreach_div_(list(grads.values()), self.num_directions)
        write_gradients(params, [grads[id(p)] for _, p in params])
        d_stack = torch.stack(d_all)
        return Estimate(
            loss=loss_value,
            forward_passes=3.0 * self.num_directions,  # primal + tangent matmuls + Σ d u xᵀ (guesses not counted)
            details={"directional_derivatives": d_stack.sum(-1).tolist(), "per_example_abs_mean": float(d_stack.abs().mean())},
        )


@register("activity_perturbation")
@dataclass(frozen=True)
class ActivityPerturbation(GuessedGradient):
    """Ren et al. (2023): u_{i,b} ~ N(0, I) on every pre-activation, independently per example (unbiased)."""

    num_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()

    def _guess(self) -> _Guess:
        return _Activity()


@register("wt_guess")
@dataclass(frozen=True)
class WTGuess(GuessedGradient):
    """Singhal et al. (2023): u = M_i W_{i+1}ᵀ ε; biased, E[ĝ_s] = W̃ᵀW̃ g."""

    num_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()

    def _guess(self) -> _Guess:
        return _WT()


SOLVERS = ("svd", "randomized")


@register("w_perp")
@dataclass(frozen=True)
class WPerp(GuessedGradient):
    """Wang et al. (2025): u = V_k η from W̃ = UΛVᵀ; unbiased inside the top-k right singular subspace.

    ``k`` an int (default 10) or ``"rank"`` (every nonzero singular value).
    ``solver = "svd"`` (exact, batched ``torch.linalg.svd``) or
    ``"randomized"`` (subspace iteration, much cheaper for k ≪ width; see
    :func:`top_right_singular`).
    """

    k: int | str = 10
    solver: str = "svd"
    num_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        if self.k != "rank":
            check_positive_int("k", self.k)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")

    def _guess(self) -> _Guess:
        return _WPerp(self.k, self.solver)


@register("w_perp_ns")
@dataclass(frozen=True)
class WPerpNS(GuessedGradient):
    """W-perp with the SVD replaced by Newton–Schulz iterations of a degree-7 odd polynomial.

    ``threshold`` τ (relative to σ_1) where the polynomial steps from 0 to 1;
    ``None`` uses σ_k/σ_1 of the next layer's weight (:func:`step_threshold`).
    """

    k: int = 10
    iterations: int = 5
    threshold: float | None = None
    num_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        check_positive_int("k", self.k)
        check_positive_int("iterations", self.iterations)
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) (a fraction of σ_1) or None, got {self.threshold!r}")

    def _guess(self) -> _Guess:
        return _WPerpNS(self.k, self.iterations, self.threshold)


@register("w_p")
@dataclass(frozen=True)
class WP(GuessedGradient):
    """Whitened guess: u = (W̃ᵀW̃ + σI)^{-1/2} W̃_σᵀ ε with Cov = I (unbiased; distributed as activity perturbation)."""

    sigma: float = 1e-5
    num_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        check_positive("sigma", self.sigma)

    def _guess(self) -> _Guess:
        return _WP(self.sigma)


def covariance(estimator: GuessedGradient, s: torch.Tensor, w_next: torch.Tensor) -> torch.Tensor:
    """Cov(u_b) of a hidden layer's guess, in closed form (B, d, d): the C of E[ĝ] = C g.

    Used by the tests and the seed-001 study to compute the exact bias. Not
    defined for W-perp-NS (its covariance is XᵀX of the polynomial output,
    returned as such).
    """
    jac = upstream_jacobian(s, w_next)
    d = s.shape[1]
    eye = torch.eye(d, dtype=s.dtype, device=s.device).expand(s.shape[0], d, d)
    if isinstance(estimator, (ActivityPerturbation, WP)):
        return eye.clone()
    if isinstance(estimator, WTGuess):
        return jac.mT @ jac
    if isinstance(estimator, WPerp):
        vh = top_right_singular(s, w_next, estimator.k, "svd", torch.Generator(device=s.device))
        return vh.mT @ vh
    if isinstance(estimator, WPerpNS):
        tau = estimator.threshold if estimator.threshold is not None else step_threshold(w_next, estimator.k)
        x = newton_schulz_top_k(jac, tau, estimator.iterations)
        return x.mT @ x
    raise TypeError(f"no closed-form covariance for {type(estimator).__name__}")


__all__ = [
    "ActivityPerturbation",
    "GuessedGradient",
    "SOLVERS",
    "WP",
    "WPerp",
    "WPerpNS",
    "WTGuess",
    "covariance",
    "full_column_rank",
    "newton_schulz_top_k",
    "relu_mlp_layers",
    "step_polynomial",
    "step_threshold",
    "top_right_singular",
    "upstream_jacobian",
]
