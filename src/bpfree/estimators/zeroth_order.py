"""Zeroth-order estimates from loss values only: SPSA and MeZO.

SPSA (Spall 1992, "Multivariate stochastic approximation using a simultaneous
perturbation gradient approximation"), in the Gaussian-direction form used by
MeZO and seed 000: with K directions v_k (E[v vᵀ] = I) and step ε,

    central:  d_k = [f(θ + εv_k) − f(θ − εv_k)] / (2ε)      (2K forwards)
    forward:  d_k = [f(θ + εv_k) − f(θ)] / ε                  (1 + K forwards)
    g = (1/K) Σ_k d_k v_k.

d_k is the directional derivative ∇f·v_k up to O(ε²) (central) or O(ε)
(forward), so as ε → 0 SPSA becomes the forward gradient with the same
directions, and E[g] = ∇f + O(ε²) (central). No derivatives are taken, so
any model that runs forward can be trained.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes", Alg. 1) is central SPSA with K = 1 whose perturbation is applied to
the parameters in place (+εz, −2εz, +εz), z regenerated from a stored seed
for every phase instead of being stored, so the step needs no memory beyond
inference. E‖g‖² = (N + K − 1)/K · E‖∇f‖² for this family (MeZO, Lemma 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Iterator

import torch

from bpfree.estimators import _chain, _lowrank, directions
from bpfree.estimators._functional import functional_loss
from bpfree.estimators.base import (
    Estimate,
    Estimator,
    check_positive,
    check_positive_int,
    check_scalar_loss,
    write_gradients,
)
from bpfree.estimators.registry import register

SCHEMES = ("central", "forward")


@register("spsa")
@dataclass(frozen=True)
class SPSA(Estimator):
    """g = (1/K) Σ_k d_k v_k with finite-difference directional derivatives d_k.

    Perturbed parameters are evaluated functionally (θ ± εv swapped into the
    module for the call), so the stored parameters are never modified; this
    costs one perturbed copy of the parameters at a time. ``mezo`` is the
    in-place, memory-free variant.

    ``Estimate.loss`` is f(θ) for the forward scheme and the mean of the
    perturbed losses (f(θ) + O(ε²)) for the central scheme.
    """

    num_directions: int = 1
    eps: float = 1e-3
    scheme: str = "central"
    distribution: str = "rademacher"  # fastest unbiased choice (directions.fill_)
    rank: int | str = 1  # low-rank Linear/Conv2d-weight directions (_lowrank); "full": dense directions
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("num_directions", self.num_directions)
        check_positive("eps", self.eps)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        directions.check_distribution(self.distribution)
        _lowrank.check_rank(self.rank)

    def _estimate(self, model, params, closure, generator) -> Estimate:
        k, eps = self.num_directions, self.eps
        # rank r: nn.Linear/nn.Conv2d weights get V = A Bᵀ applied inside the layer (_lowrank);
        # every other parameter a dense direction, swapped in functionally.
        lowrank = _lowrank.lowrank_modules(model, [n for n, _ in params]) if self.rank != "full" else {}
        dense = [(n, p) for i, (n, p) in enumerate(params) if i not in lowrank]
        names = [n for n, _ in dense]
        primals = [p.detach() for _, p in dense]
        # K = 1: one standalone direction per parameter, reused in place as the
        # gradient; K > 1: stacked (K, ...) views (as for forward_gradient).
        tangents = directions.sample_like(
            primals, num_directions=k if k > 1 else None, distribution=self.distribution, generator=generator
        )
        per_direction = [[v[i] for v in tangents] for i in range(k)] if k > 1 else [tangents]
        factors = {
            i: [_lowrank.draw_factors(mod.weight, self.rank, self.distribution, generator) for _ in range(k)]
            for i, mod in lowrank.items()
        }
        if self.scheme == "forward":  # branch 0 is θ itself
            scales, which = [0.0] + [eps] * k, [0, *range(k)]
        else:
            scales, which = [eps] * k + [-eps] * k, [*range(k), *range(k)]
        losses = None
        chain = _chain.sequential_chain(model) if lowrank else None
        biases = _chain_biases(chain, dense) if chain is not None else None
        if biases is not None:  # all J losses from one pass sharing the prefix (_chain)
            branches = _chain.Branches(
                weight_factors={mod: (torch.stack([a for a, _ in factors[i]]), torch.stack([b for _, b in factors[i]]))
                                for i, mod in lowrank.items()},
                bias_directions={mod: (tangents[j] if k > 1 else tangents[j].unsqueeze(0))
                                 for j, mod in enumerate(biases)},
                scales=scales, direction=which)
            try:
                losses = _chain.chain_losses(model, chain, closure, branches)
            except _chain.NotAChain:
                losses = None
        losses_from_chain = losses is not None
        if losses is None:  # one closure call per branch, dense directions swapped in functionally
            f = functional_loss(model, names, closure)

            def loss_at(scale: float, i: int) -> torch.Tensor:
                if scale == 0.0:
                    out = f(*primals)
                else:
                    shifted = torch._foreach_add(primals, per_direction[i], alpha=scale) if primals else []
                    with _lowrank.perturbed({mod: (*factors[j][i], scale) for j, mod in lowrank.items()}, model):
                        out = f(*shifted)
                check_scalar_loss(out)
                return out.detach().reshape(()).double()

            with torch.no_grad():
                losses = torch.stack([loss_at(sc, i) for sc, i in zip(scales, which)])

        with torch.no_grad():
            if self.scheme == "forward":
                d = (losses[1:] - losses[0]) / eps
                loss, passes = float(losses[0]), 1.0 + k
            else:
                plus, minus = losses[:k], losses[k:]
                d = (plus - minus) / (2 * eps)
                loss, passes = float((plus + minus).mean() / 2), 2.0 * k
            if k > 1:
                grads = directions.combine(d / k, tangents)
            else:
                grads = directions.scale_(tangents, d)
            for i in lowrank:
                _lowrank.write_gradient(params[i][1], d / k, factors[i])
        write_gradients(dense, grads)
        return Estimate(
            loss=loss,
            forward_passes=passes,
            details={"directional_derivatives": d.float(), "loss_is_exact": self.scheme == "forward",
                     "one_pass": losses_from_chain},
        )


@register("mezo")
@dataclass(frozen=True)
class MeZO(Estimator):
    """Memory-efficient zeroth order (MeZO): central SPSA, K = 1, in place.

    One step (Malladi et al. 2023, Alg. 1), s a fresh seed drawn from the
    generator and z = z(s) regenerated in every phase, piece by piece (at most
    ``CHUNK`` values at a time, each piece a counter-based stream of
    (s, tensor, piece): ``directions.counter_seed``)::

        θ ← θ + εz;  f₊ = f(θ)
        θ ← θ − 2εz; f₋ = f(θ)          (done as: restore θ, then θ − εz)
        θ ← θ + εz                      (restored bit-exactly)
        d = (f₊ − f₋)/(2ε);  p.grad ← d·z

    **Bit-exact restore.** Floating-point addition is not invertible:
    fl(fl(θ + εz) − εz) ≠ θ for a few per cent of entries (those whose
    perturbation crosses a binade, or where |εz| ≫ |θ|), and MeZO's own code
    lets the parameters drift by that much every step. Here each in-place
    shift records the exact old values of exactly those entries (found by
    comparing bits) and writes them back on restore, so parameters come back
    bit for bit in any dtype. The record is sparse: about 3% of entries for
    ε = 1e-3 and weights of scale 0.03 (int64 index + value each); no copy of
    the parameters, or of z, is ever held. Temporaries are a few tensors the
    size of one piece of z (``CHUNK`` values).

    ``rank = r``: the weights of ``nn.Linear`` and ``nn.Conv2d`` layers get low-rank
    directions V = A Bᵀ (``_lowrank``), applied inside the layer as ±ε·Vx, so they
    are never written and need no restore record; the factors (r·(m + n)
    values per layer) are kept for the step.

    **Update mode** (``lr`` set): MeZO's real memory path. Instead of writing
    ``p.grad``, the step applies SGD in place during the restore phase,
    θ ← θ + εz − lr·(d·z + weight_decay·θ), and sets ``p.grad = None``, so no
    gradient buffer ever exists. In this mode the parameters are *updated*,
    not restored; the update differs from the exact θ − lr·(d z + wd θ) by the
    rounding of the three in-place shifts (a few ulps), as in MeZO, and no
    restore record is kept. Use it with no optimizer (or one whose step is a
    no-op): the update is already applied.
    """

    eps: float = 1e-3
    distribution: str = "rademacher"  # fastest unbiased choice (directions.fill_)
    lr: float | None = None
    weight_decay: float = 0.0
    rank: int | str = 1  # low-rank Linear/Conv2d-weight directions (_lowrank); "full": dense directions
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("eps", self.eps)
        directions.check_distribution(self.distribution)
        _lowrank.check_rank(self.rank)
        if self.lr is not None:
            check_positive("lr", self.lr)
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.lr is None:
            raise ValueError("weight_decay applies only in update mode; set lr too (or use the optimizer's weight decay)")

    def _estimate(self, model, params, closure, generator) -> Estimate:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        lowrank = _lowrank.lowrank_modules(model, [n for n, _ in params]) if self.rank != "full" else {}
        factors = {}
        for i, mod in lowrank.items():
            gen = torch.Generator(device=mod.weight.device).manual_seed(directions.counter_seed(seed, i, -1))
            factors[mod] = _lowrank.draw_factors(mod.weight, self.rank, self.distribution, gen)
        params = [pair for i, pair in enumerate(params) if i not in lowrank]  # dense: perturbed in place
        with torch.no_grad():
            one_pass = self._one_pass(model, params, closure, seed, factors)
            if one_pass is not None:  # the dense parameters (biases) were never written
                (f_plus, f_minus, zs), records = one_pass, None
            else:
                f_plus, f_minus, records = self._in_place(model, params, closure, seed, factors)
            d = (f_plus - f_minus) / (2 * self.eps)
            if self.lr is None:
                for mod, (a, b) in factors.items():
                    _lowrank.write_gradient(mod.weight, d.reshape(1), [(a, b)])
            else:
                for mod, (a, b) in factors.items():
                    if self.weight_decay:
                        mod.weight.mul_(1 - self.lr * self.weight_decay)
                    _lowrank.add_lowrank_(mod.weight, a, b, alpha=-float(d) * self.lr)  # W ← W − lr·d·A Bᵀ, rank r
                    mod.weight.grad = None
            if records is None:
                for (_, p), z in zip(params, zs):
                    self._finish(p, z, d, shifted_by=0.0)
            else:
                self._finish_in_place(params, seed, d, records)
            if self.lr is not None:
                for _, p in params:
                    p.grad = None
        fixups = sum(int(r[0].numel()) for r in records) if records else 0  # update mode keeps no record
        return Estimate(
            loss=float((f_plus + f_minus) / 2),
            forward_passes=2.0,
            details={
                "directional_derivatives": d.float().reshape(1),
                "seed": seed,
                "loss_is_exact": False,
                "restore_fixups": fixups,
                "updated_in_place": self.lr is not None,
                "one_pass": records is None,
            },
        )

    def _one_pass(self, model, params, closure, seed, factors):
        """``(f₊, f₋, z of each dense parameter)`` from ``_chain``'s shared-prefix pass, or None
        where it does not apply.

        On a chain whose weights all have low-rank directions, the only dense
        parameters are biases; their z (regenerated from the same counter seeds as
        the in-place path, so the step is the same) is added inside the layers
        and nothing is written. Grad mode shares the first layer's W x + b and
        folds both branches into one batch where the held activations cost no
        more than that layer's weight (``"if_small"``: 2·batch ≤ fan-in, e.g.
        seed 002's MLP at batch 64), else runs them one after the other from
        the input. Update mode, MeZO's
        memory path, shares nothing: every branch starts from the input with its
        terms added in place, so the step's peak is inference's (1.00x measured on
        seed 002's MLP).
        """
        chain = _chain.sequential_chain(model) if factors else None
        biases = _chain_biases(chain, params) if chain is not None else None
        if biases is None:
            return None
        zs = [mezo_direction(seed, i, p, self.distribution) for i, (_, p) in enumerate(params)]
        branches = _chain.Branches(
            weight_factors={mod: (a.unsqueeze(0), b.unsqueeze(0)) for mod, (a, b) in factors.items()},
            bias_directions={mod: z.view(1, -1) for mod, z in zip(biases, zs)},
            scales=[self.eps, -self.eps], direction=[0, 0])
        try:
            grad_mode = self.lr is None
            f_plus, f_minus = _chain.chain_losses(model, chain, closure, branches, max_branches=2 if grad_mode else 1,
                                                  share_prefix="if_small" if grad_mode else "never")
        except _chain.NotAChain:
            return None
        return f_plus, f_minus, zs

    def _in_place(self, model, params, closure, seed, factors):
        """``(f₊, f₋, restore record or [])``: Alg. 1's in-place shifts of the dense parameters,
        leaving them at θ − εz (restored or updated by :meth:`_finish_in_place`)."""
        eps = self.eps

        def loss(sign: float) -> torch.Tensor:
            with _lowrank.perturbed({mod: (a, b, sign * eps) for mod, (a, b) in factors.items()}, model):
                out = closure()
            check_scalar_loss(out)
            return out.detach().reshape(()).double()

        exact = self.lr is None
        records = []  # update mode keeps no record: it does not restore
        for _, part, z in _pieces(params, seed, self.distribution):
            if exact:
                records.append(shift_exactly(part, z, eps))
            else:
                part.add_(z, alpha=eps)
        shifted_by = eps
        try:  # a closure that raises must not leave the parameters perturbed
            f_plus = loss(+1.0)
            if exact:
                records = [(unshift_exactly(part, z, eps, rec), shift_exactly(part, z, -eps))[1]
                           for (_, part, z), rec in zip(_pieces(params, seed, self.distribution), records)]
            else:
                for _, part, z in _pieces(params, seed, self.distribution):
                    part.add_(z, alpha=-2 * eps)
            shifted_by = -eps
            f_minus = loss(-1.0)
        except BaseException:
            for (_, part, z), rec in zip(_pieces(params, seed, self.distribution), records or repeat(None)):
                if exact:
                    unshift_exactly(part, z, shifted_by, rec)
                else:
                    part.sub_(z, alpha=shifted_by)  # back to θ up to rounding (update mode)
            raise
        return f_plus, f_minus, records

    def _finish_in_place(self, params, seed, d, records) -> None:
        """Undo the −εz shift piece by piece (bit-exactly, from the record) and write d·z
        into ``.grad``; in update mode fold the SGD step into the undo instead."""
        if self.lr is None:
            grads = [p.grad if _reusable_grad(p) else torch.empty_like(p) for _, p in params]
            flat_grads = [_flat_view(g) for g in grads]
            offsets = [0] * len(params)
            for (i, part, z), rec in zip(_pieces(params, seed, self.distribution), records):
                unshift_exactly(part, z, -self.eps, rec)
                n = part.numel()
                torch.mul(z, d.to(z.dtype), out=flat_grads[i][offsets[i]:offsets[i] + n])
                offsets[i] += n
            for (_, p), g in zip(params, grads):
                p.grad = g
        else:
            for _, part, z in _pieces(params, seed, self.distribution):
                self._finish(part, z, d, shifted_by=-self.eps)

    def _finish(self, p: torch.Tensor, z: torch.Tensor, d: torch.Tensor, shifted_by: float) -> None:
        """For p currently at θ + ``shifted_by``·z: write ``p.grad`` = d·z (grad mode, p unshifted),
        or apply θ ← θ − lr·(d·z + wd·θ) in place (update mode)."""
        if self.lr is None:
            if _reusable_grad(p):
                torch.mul(z.view_as(p), d.to(z.dtype), out=p.grad)
            else:
                p.grad = z.view_as(p) * d.to(z.dtype)
            return
        decay = 1 - self.lr * self.weight_decay  # (θ + s z)·decay + (−s·decay − lr·d) z = decay·θ − lr·d·z
        if self.weight_decay:
            p.mul_(decay)
        p.add_(z.view_as(p), alpha=-shifted_by * decay - float(d) * self.lr)


def _pieces(params, seed: int, distribution: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(tensor index, flat chunk of the parameter, its z)`` for MeZO's dense parameters, z
    regenerated from the counter seed (seed, tensor, chunk) into one reused buffer per
    dtype and device: never more than CHUNK values of z exist."""
    tensors = [p for _, p in params]
    buffers: dict[tuple[torch.dtype, str], torch.Tensor] = {}
    gens: dict[str, torch.Generator] = {}
    for i, p in enumerate(tensors):
        flat = _flat_view(p)
        key = (p.dtype, str(p.device))
        if key not in buffers:
            buffers[key] = torch.empty(min(CHUNK, max(t.numel() for t in tensors)), dtype=p.dtype, device=p.device)
        if str(p.device) not in gens:
            gens[str(p.device)] = torch.Generator(device=p.device)
        gen = gens[str(p.device)]
        for c, start in enumerate(range(0, flat.numel(), CHUNK)):
            part = flat[start:start + CHUNK]
            gen.manual_seed(directions.counter_seed(seed, i, c))
            with directions._drawing():
                z = directions.fill_(buffers[key][: part.numel()], distribution, gen)
            yield i, part, z


# MeZO regenerates z in pieces of at most CHUNK values (256 KiB in fp32), so its
# memory stays at inference + one piece; each piece costs one reseed (~1 µs).
CHUNK = 1 << 16


def mezo_direction(seed: int, tensor_index: int, like: torch.Tensor, distribution: str) -> torch.Tensor:
    """The z that ``mezo`` used for parameter ``tensor_index`` in the step with ``seed``
    (``Estimate.details["seed"]``), regenerated piece by piece exactly as the estimator does."""
    flat = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    gen = torch.Generator(device=like.device)
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        gen.manual_seed(directions.counter_seed(seed, tensor_index, c))
        directions.fill_(flat[start:start + CHUNK], distribution, gen)
    return flat.view(like.shape)


def _chain_biases(chain: list[torch.nn.Module], dense: list[tuple[str, torch.nn.Parameter]]) -> list[torch.nn.Module] | None:
    """For each dense parameter, the chain layer whose bias it is; None if any is something else
    (then the one-pass evaluation of ``_chain`` does not cover it)."""
    owner = {id(m.bias): m for m in chain if isinstance(m, _chain.LAYERS) and m.bias is not None}
    layers = [owner.get(id(p)) for _, p in dense]
    return None if any(m is None for m in layers) else layers


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("mezo perturbs parameters in place through flat views; make the parameters contiguous")
    return t.view(-1)


def _reusable_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype and p.grad.is_contiguous()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as integers (exact comparison, NaN- and ±0-safe)."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(int_type)


def shift_exactly(p: torch.Tensor, z: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """p ← fl(p + αz) in place; return the record that makes it exactly undoable.

    The record holds the flat indices where the arithmetic undo
    fl(fl(p + αz) − αz) differs from p in any bit, and p's old values there.
    """
    shifted = torch.add(p, z, alpha=alpha)
    undone = torch.sub(shifted, z, alpha=alpha)
    wrong = torch.ne(_bits(undone), _bits(p)).view(-1).nonzero().squeeze(1)
    old = p.view(-1)[wrong]  # advanced indexing copies
    p.copy_(shifted)
    return wrong, old


def unshift_exactly(p: torch.Tensor, z: torch.Tensor, alpha: float, record: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Undo :func:`shift_exactly` bit for bit: p ← fl(p − αz), then patch the record."""
    wrong, old = record
    p.sub_(z, alpha=alpha)  # the same elementwise op as in shift_exactly, so the same bits
    p.view(-1)[wrong] = old
