"""Forward gradient by weight perturbation (forward-mode AD).

Baydin, Pearlmutter, Syme, Wood, Torr (2022), "Gradients without
Backpropagation"; compared with tuned backprop in seed 002 (Rike & Førland).

For K directions v_k (``bpfree.estimators.directions``, E[v vᵀ] = I), one
forward-mode pass gives the directional derivatives d_k = ∇f(θ)·v_k (jvp) and

    g = (1/K) Σ_k d_k v_k,     E[g] = ∇f(θ).

For Gaussian v and K ≪ N, cos(g, ∇f) ≈ √(χ²_K / N), i.e. about √(K/N)
(``bpfree.theory.forward_gradient_cosine``). The K > 1 case is one batched
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

import functools
import warnings
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad as fwAD

from bpfree.estimators import _lowrank, directions
from bpfree.estimators._functional import explain_forward_ad_failure, functional_loss, substituted
from bpfree.estimators.base import (
    Estimate,
    Estimator,
    check_positive,
    check_positive_int,
    check_scalar_loss,
    write_gradients,
)
from bpfree.estimators.registry import register


@register("forward_gradient")
@dataclass(frozen=True)
class ForwardGradient(Estimator):
    """g = (1/K) Σ_k (∇f·v_k) v_k from one forward-mode pass with K tangents."""

    num_directions: int = 1
    distribution: str = "rademacher"  # fastest unbiased choice (directions.fill_)
    orthogonal: bool = False
    jvp_clip: float | None = None
    rank: int | str = 1  # low-rank Linear/Conv2d-weight directions (_lowrank); "full": dense directions
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("num_directions", self.num_directions)
        directions.check_distribution(self.distribution, orthogonal=self.orthogonal)
        if self.jvp_clip is not None:
            check_positive("jvp_clip", self.jvp_clip)
        _lowrank.check_rank(self.rank)
        if self.orthogonal and self.rank != "full":
            raise ValueError('orthogonal directions are dense: set rank="full" with orthogonal=True')

    def _estimate(self, model, params, closure, generator) -> Estimate:
        if self.rank != "full":
            return self._estimate_lowrank(model, params, closure, generator)
        names = [n for n, _ in params]
        primals = [p.detach() for _, p in params]
        k = self.num_directions
        # K = 1: one standalone tensor per parameter (a tangent forward AD uses without
        # copying, and reused in place as the gradient); K > 1: stacked (K, ...) views.
        stacked = k > 1 or self.orthogonal
        tangents = directions.sample_like(
            primals,
            num_directions=k if stacked else None,
            distribution=self.distribution,
            generator=generator,
            orthogonal=self.orthogonal,
        )

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            if stacked:
                return directional_derivatives(model, names, closure, primals, tangents)
            return directional_derivative(model, names, closure, primals, tangents)

        loss, d = _explained(run, model, self.name)
        raw = d.detach().clone()
        d = self._clip(d)
        if stacked:
            grads = directions.combine(d / k, tangents)
        else:
            grads = directions.scale_(tangents, d)
        write_gradients(params, grads)
        return Estimate(
            loss=float(loss),
            forward_passes=1.0 + 2.0 * k,
            details={
                "directional_derivatives": raw,
                "clipped": int((raw.abs() > self.jvp_clip).sum()) if self.jvp_clip is not None else 0,
            },
        )


    def _clip(self, d: torch.Tensor) -> torch.Tensor:
        """clamp(d, −c, c) with c = ``jvp_clip`` (seed 002's stabiliser), or d."""
        return d if self.jvp_clip is None else d.clamp(-self.jvp_clip, self.jvp_clip)

    def _estimate_lowrank(self, model, params, closure, generator) -> Estimate:
        """``rank = r``: nn.Linear and nn.Conv2d weights get tangents V = A Bᵀ applied inside the
        layer (``_lowrank.with_tangents``), the other parameters dense tangents. For K > 1 on a
        plain ``nn.Sequential`` of Linear, Conv2d, ReLU, MaxPool2d and Flatten all K tangents
        ride one pass (:meth:`_estimate_chain`); otherwise each direction is its own
        forward-mode pass (the layer patch does not run under vmap)."""
        k = self.num_directions
        lowrank = _lowrank.lowrank_modules(model, [n for n, _ in params])
        chain = _lowrank.tangent_chain(model) if k > 1 else None
        if chain is not None:
            try:
                return self._estimate_chain(model, params, closure, generator, chain, lowrank)
            except _lowrank.NotAChainLoss:
                pass  # e.g. a penalty on the parameters inside the closure: one pass per direction
        dense = [(n, p) for i, (n, p) in enumerate(params) if i not in lowrank]
        names, primals = [n for n, _ in dense], [p.detach() for _, p in dense]
        d_all, dense_grads, factors = [], None, {i: [] for i in lowrank}
        loss = None
        for _ in range(k):
            tangents = directions.sample_like(primals, num_directions=None, distribution=self.distribution,
                                              generator=generator)
            step_factors = {}
            for i, mod in lowrank.items():
                step_factors[mod] = _lowrank.draw_factors(mod.weight, self.rank, self.distribution, generator)
                factors[i].append(step_factors[mod])

            def run(tangents=tangents, step_factors=step_factors) -> tuple[torch.Tensor, torch.Tensor]:
                with _lowrank.with_tangents(step_factors, model):
                    return directional_derivative(model, names, closure, primals, tangents)

            loss, d = _explained(run, model, self.name)
            raw = d.reshape(())
            d_all.append(raw)
            w = self._clip(raw) / k
            scaled = directions.scale_(tangents, w)
            if dense_grads is None:
                dense_grads = scaled
            elif scaled:
                torch._foreach_add_(dense_grads, scaled)
        raw = torch.stack(d_all)
        weights = self._clip(raw) / k
        write_gradients(dense, dense_grads or [])
        for i in lowrank:
            _lowrank.write_gradient(params[i][1], weights, factors[i])
        return Estimate(
            loss=float(loss),
            forward_passes=2.0 * k,  # per direction: primal + W·dx (the V x term is r/m of a layer)
            details={
                "directional_derivatives": raw.detach().clone(),
                "clipped": int((raw.abs() > self.jvp_clip).sum()) if self.jvp_clip is not None else 0,
            },
        )


    def _estimate_chain(self, model, params, closure, generator, chain, lowrank) -> Estimate:
        """K > 1 on a Linear/Conv2d/ReLU/MaxPool2d chain (an MLP or a plain CNN): the primal once,
        the K tangents batched (``_lowrank.chain_directional_derivatives``); the same estimator,
        one pass."""
        k = self.num_directions
        owner = {}
        for mod in chain:
            if type(mod) in (torch.nn.Linear, torch.nn.Conv2d):
                owner[id(mod.weight)] = (mod, "weight")
                if mod.bias is not None:
                    owner[id(mod.bias)] = (mod, "bias")
        weight_factors, bias_tangents, factors = {}, {}, {}
        for i, (_, p) in enumerate(params):
            mod, kind = owner.get(id(p), (None, None))
            if mod is None or (kind == "weight" and i not in lowrank):
                raise _lowrank.NotAChainLoss
            if kind == "weight":
                factors[i] = [_lowrank.draw_factors(p, self.rank, self.distribution, generator) for _ in range(k)]
                weight_factors[mod] = (torch.stack([a for a, _ in factors[i]]), torch.stack([b for _, b in factors[i]]))
            else:
                bias_tangents[mod] = directions.sample((k, p.numel()), distribution=self.distribution,
                                                       generator=generator, dtype=p.dtype, device=p.device)
        loss, raw = _lowrank.chain_directional_derivatives(model, chain, closure, weight_factors, bias_tangents)
        weights = self._clip(raw) / k
        for i, (_, p) in enumerate(params):
            mod, kind = owner[id(p)]
            if kind == "weight":
                _lowrank.write_gradient(p, weights, factors[i])
            else:
                write_gradients([params[i]], [weights.to(p.dtype) @ bias_tangents[mod]])
        return Estimate(
            loss=float(loss),
            forward_passes=1.0 + k,  # primal once + W·ẋ per tangent (V x is r/m of a layer)
            details={
                "directional_derivatives": raw.detach().clone(),
                "clipped": int((raw.abs() > self.jvp_clip).sum()) if self.jvp_clip is not None else 0,
                "batched_tangents": True,
            },
        )


def _explained(run, model, estimator: str):
    """``run()``, with forward-AD coverage failures turned into ``UnsupportedModelError``."""
    try:
        return run()
    except (NotImplementedError, RuntimeError) as e:
        err = explain_forward_ad_failure(e, model, run, estimator)
        if err is None:
            raise
        raise err from e


def directional_derivative(model, names, closure, primals, tangents) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d)`` with d = ∇f(θ)·v for one tangent per parameter (``torch.autograd.forward_ad``).

    ``d`` has shape (1,). Tangents should be standalone contiguous tensors:
    forward AD copies a tangent that is a view into a larger buffer.
    """
    _load_forward_ad_decompositions()
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(p, v) for p, v in zip(primals, tangents)]
        with substituted(model, names, duals):
            out = closure()
        check_scalar_loss(out)
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # the loss does not depend on the parameters
            tangent = torch.zeros_like(primal)
        return primal.detach().reshape(()), tangent.reshape(1)


def directional_derivatives(model, names, closure, primals, tangents) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d)`` with d_k = ∇f(θ)·v_k for stacked tangents of shape (K, *p.shape).

    Runs ``torch.func.jvp`` under ``torch.func.vmap`` over the K tangents, so the
    primal forward is computed once and the tangent matmuls are batched.
    """
    k = tangents[0].shape[0]
    _load_forward_ad_decompositions()
    with torch.no_grad():
        f = functional_loss(model, names, closure)

        def jvp(*ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.jvp(f, tuple(primals), ts)

        primal, tangent = torch.func.vmap(jvp, in_dims=0, out_dims=(None, 0), randomness="same")(*tangents)
        check_scalar_loss(primal)
        return primal.detach().reshape(()), tangent.reshape(k)


@functools.cache
def _load_forward_ad_decompositions() -> None:
    """Load torch's jvp decompositions once, without its internal deprecation warning.

    torch 2.13 builds them with ``torch.jit.script`` on the first
    ``dual_level()``, which warns; that warning is about torch's internals, not
    the user's code, and would turn into an error under ``-W error``.
    """
    load = getattr(fwAD, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
            load()
