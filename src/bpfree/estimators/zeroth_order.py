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

import torch

from bpfree.estimators import _chain, _lowrank, directions, engines
from bpfree.estimators.base import check_bool, check_positive, check_positive_int
from bpfree.estimators.direction_set import CHUNK, DENSE, fill_stream_
from bpfree.estimators.directional import DirectionalEstimator, Evaluation
from bpfree.estimators.engines import shift_exactly, unshift_exactly  # noqa: F401  (public here too)
from bpfree.estimators.registry import register

SCHEMES = ("central", "forward")


@register("spsa")
@dataclass(frozen=True)
class SPSA(DirectionalEstimator):
    """g = (1/K) Σ_k d_k v_k with finite-difference directional derivatives d_k.

    Draw K directions, get the J perturbed losses f(θ + s_j v_{k_j}) from the first engine that
    applies (``engines.perturbed_losses``: the one-pass chain, or one functional call per branch —
    the stored parameters are never modified; ``mezo`` is the in-place, memory-free variant),
    form d_k, combine, write ``p.grad``.

    ``Estimate.loss`` is f(θ) for the forward scheme and the mean of the
    perturbed losses (f(θ) + O(ε²)) for the central scheme.
    """

    num_directions: int = 1
    eps: float = 1e-3
    scheme: str = "central"
    distribution: str = "rademacher"  # fastest unbiased choice (directions.fill_)
    rank: int | str = 1  # low-rank Linear/Conv2d-weight directions (_lowrank); "full": dense directions
    embedding_rows: bool = True  # nn.Embedding directions on the looked-up rows only (_embedding_rows)
    seed: int = 0
    schemes: tuple = ()

    def __post_init__(self) -> None:
        check_positive_int("num_directions", self.num_directions)
        check_bool("embedding_rows", self.embedding_rows)
        check_positive("eps", self.eps)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        directions.check_distribution(self.distribution)
        _lowrank.check_rank(self.rank)

    def evaluate(self, step, dirs, *, closure=None, at=None) -> Evaluation:
        k, eps = dirs.num_directions, self.eps
        if self.scheme == "forward":  # branch 0 is θ itself
            scales, which = [0.0] + [eps] * k, [0, *range(k)]
        else:
            scales, which = [eps] * k + [-eps] * k, [*range(k), *range(k)]
        got = engines.perturbed_losses(step.model, dirs, closure or step.closure, scales, which, at=at)
        losses = got.losses
        if self.scheme == "forward":
            d, loss, passes = (losses[1:] - losses[0]) / eps, losses[0], 1.0 + k
        else:
            plus, minus = losses[:k], losses[k:]
            d, loss, passes = (plus - minus) / (2 * eps), (plus + minus).mean() / 2, 2.0 * k
        return Evaluation(loss, d, passes, {"loss_is_exact": self.scheme == "forward",
                                            "one_pass": got.engine == "one_pass", "engine": got.engine})


@register("mezo")
@dataclass(frozen=True)
class MeZO(DirectionalEstimator):
    """Memory-efficient zeroth order (MeZO): central SPSA, K = 1, in place.

    One step (Malladi et al. 2023, Alg. 1), s a fresh seed drawn from the
    generator and z = z(s) regenerated in every phase, piece by piece (at most
    ``CHUNK`` values at a time, each piece a counter-based stream of
    (s, tensor, 0, piece): ``direction_set``)::

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
    values per layer) are kept for the step. ``embedding_rows`` (default on): an
    ``nn.Embedding`` weight is perturbed inside its lookup, on the looked-up rows only
    (``_embedding_rows``), never written either; its gradient (or update) touches those rows.

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
    embedding_rows: bool = True  # nn.Embedding directions on the looked-up rows only (_embedding_rows)
    seed: int = 0
    schemes: tuple = ()

    single_direction = True

    def __post_init__(self) -> None:
        check_positive("eps", self.eps)
        check_bool("embedding_rows", self.embedding_rows)
        directions.check_distribution(self.distribution)
        _lowrank.check_rank(self.rank)
        if self.lr is not None:
            check_positive("lr", self.lr)
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.lr is None:
            raise ValueError("weight_decay applies only in update mode; set lr too (or use the optimizer's weight decay)")
        needs_grad = [s.name for s in self.schemes if s.name in ("svrg", "conservative")]
        if self.lr is not None and needs_grad:
            raise ValueError(f"{', '.join(needs_grad)} needs the gradient in p.grad; MeZO's update mode (lr set) "
                             "writes none: drop mezo's lr and use an optimizer")

    def draw_options(self):
        return {"distribution": self.distribution, "rank": self.rank, "orthogonal": False,
                "embedding_rows": self.rows_on}

    def materialise(self, candidates: int) -> bool:
        return False  # z is regenerated piece by piece, never stored

    def evaluate(self, step, dirs, *, closure=None, at=None) -> Evaluation:
        """f(θ ± εz): the one-pass chain where it applies (nothing written), else Alg. 1 in place
        (left at θ − εz with restore records for :meth:`write`; at a snapshot ``at``, restored here)."""
        closure = closure or step.closure
        grad_mode = self.lr is None
        got = engines.perturbed_losses(
            step.model, dirs, closure, [self.eps, -self.eps], [0, 0], at=at, engines=("one_pass", "in_place"),
            exact_restore=grad_mode or at is not None,  # update mode keeps no record: it does not restore
            max_branches=2 if grad_mode else 1, share_prefix="if_small" if grad_mode else "never")
        f_plus, f_minus = got.losses[0], got.losses[1]
        d = ((f_plus - f_minus) / (2 * self.eps)).reshape(1)
        restore_now = at is not None or any(s.name == "svrg" for s in self.schemes)  # SVRG copies θ
        if got.engine == "in_place" and restore_now:  # back to θ (or θ̃) bit-exactly, now
            tensors = list(at) if at is not None else [p.detach() for _, p in dirs.params]
            with torch.no_grad():
                for (_, part, z), rec in zip(engines.in_place_parts(dirs, tensors), got.records):
                    unshift_exactly(part, z, -self.eps, rec)
        elif got.engine == "in_place":
            step.details["_records"] = got.records
        fixups = sum(int(r[0].numel()) for r in got.records) if got.records and at is None else 0
        return Evaluation((f_plus + f_minus) / 2, d, 2.0,
                          {"seed": dirs.spec.seed, "loss_is_exact": False, "restore_fixups": fixups,
                           "updated_in_place": self.lr is not None, "one_pass": got.engine == "one_pass",
                           "engine": got.engine})

    def write(self, step, dirs, weights, extra) -> None:
        """Restore the dense parameters (bit-exactly, from the record) and write d·z (+ extra) into
        ``p.grad`` piece by piece; in update mode fold the SGD step into the restore instead and
        leave ``p.grad = None``. Low-rank weights: p.grad = d·A Bᵀ, or W ← W − lr·d·A Bᵀ."""
        records = step.details.pop("_records", None)
        shifted_by = -self.eps if records is not None or (self.lr is not None and step.details["engine"] == "in_place") \
            else 0.0
        w = weights.reshape(())
        params = dirs.params
        with torch.no_grad():
            for i, (a, b) in dirs.factors.items():
                weight = params[i][1]
                if self.lr is None:
                    _lowrank.write_gradient(weight, weights, [(a[0], b[0])])
                    if extra is not None and i in extra:
                        weight.grad.add_(extra[i])
                else:
                    if self.weight_decay:
                        weight.mul_(1 - self.lr * self.weight_decay)
                    _lowrank.add_lowrank_(weight, a[0], b[0], alpha=-float(w) * self.lr)  # rank r
                    weight.grad = None
            for i, rd in dirs.rows.items():
                weight = params[i][1]
                if self.lr is None:
                    rd.write_gradient(weight, weights)
                    if extra is not None and i in extra:
                        weight.grad.add_(extra[i])
                else:
                    if self.weight_decay:
                        weight.mul_(1 - self.lr * self.weight_decay)
                    weight.index_add_(0, rd.rows, rd.combined(weights), alpha=-self.lr)  # the touched rows
                    weight.grad = None
            dense = dirs.dense_indices()
            if self.lr is None:
                grads = {i: params[i][1].grad if _reusable_grad(params[i][1]) else torch.empty_like(params[i][1])
                         for i in dense}
            recs = iter(records) if records is not None else None
            offsets = dict.fromkeys(dense, 0)
            for i, part, z in engines.in_place_parts(dirs, [p for _, p in params]):
                if self.lr is None:
                    if recs is not None:
                        unshift_exactly(part, z, shifted_by, next(recs))
                    n = z.numel()
                    torch.mul(z, w.to(z.dtype), out=grads[i].view(-1)[offsets[i]:offsets[i] + n])
                    offsets[i] += n
                else:
                    decay = 1 - self.lr * self.weight_decay  # (θ + s z)·decay + (−s·decay − lr·d) z
                    if self.weight_decay:
                        part.mul_(decay)
                    part.add_(z, alpha=-shifted_by * decay - float(w) * self.lr)
            for i in dense:
                p = params[i][1]
                if self.lr is None:
                    if extra is not None and i in extra:
                        grads[i].add_(extra[i])
                    p.grad = grads[i]
                else:
                    p.grad = None


def mezo_direction(seed: int, tensor_index: int, like: torch.Tensor, distribution: str) -> torch.Tensor:
    """The z that ``mezo`` used for parameter ``tensor_index`` in the step with ``seed``
    (``Estimate.details["seed"]``), regenerated piece by piece exactly as the estimator does."""
    flat = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return fill_stream_(flat, distribution, (seed, tensor_index, DENSE)).view(like.shape)


def _reusable_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype and p.grad.is_contiguous()


__all__ = ["CHUNK", "SPSA", "MeZO", "mezo_direction", "shift_exactly", "unshift_exactly", "_chain"]
