"""One step's K random directions for every trainable parameter, as one value.

A :class:`DirectionSet` is what a weight-perturbation estimator draws once per
step and then uses everywhere: the engines turn it into directional
derivatives or perturbed losses, the estimate is Σ_k w_k v_k over it, and the
variance-reduction schemes replay it (SVRG evaluates the *same* v at the
snapshot θ̃), choose among it (adaptive keeps one of c candidates) or restrict it
to a mask (sparse). Each parameter's direction takes one of these forms:

* **dense** — a (K, *p.shape) tensor;
* **low-rank factors** — for an ``nn.Linear`` / plain ``nn.Conv2d`` weight read as an m × n
  matrix, V_k = A_k B_kᵀ with A (K, m, r), B (K, n, r) (``_lowrank``: never materialised);
* **masked** — a dense direction times a 0/1 mask M (E[(M⊙v)(M⊙v)ᵀ] = diag(M));
* **rows** — an ``nn.Embedding`` weight's direction, zero off the rows the batch looks up (and
  the padding row), drawn at the lookup (``_embedding_rows``: the gradient is exactly zero there,
  so the estimate stays unbiased with (V − |T|)·D fewer noise dimensions);
* **regenerated** — not stored: MeZO's in-place path regenerates pieces on demand
  (:meth:`DirectionSet.pieces`), bit-identical to the stored form; tensors of at most ``SMALL``
  values (biases, norms) are stored even then.

Every value is a pure function of a :class:`DirectionSpec` — (seed, counter, shapes,
options): the step seed s is the only draw from the caller's generator, and the values of
parameter i are counter-based streams (``directions.counter_seed``): the flat (K·numel) block of
a dense direction is filled in pieces of ``CHUNK`` values, piece c from the stream
(s, i, 0, c); a low-rank weight's A and B from one stream (s, i, 1, c), A's K·m·r values first
then B's (one draw per layer); the g-th group of
newly looked-up rows of an embedding from (s, i, 3, g, c). So any piece can
be regenerated alone, in any order, on any machine, from the description alone
(:meth:`DirectionSet.describe` / :meth:`DirectionSet.regenerate`) — a data-parallel mode can
send that and the K scalars d_k instead of gradients. Orthogonal directions (a QR across all
dense parameters) are drawn jointly from the stream (s, −1, 0, c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from bpfree.estimators import _embedding_rows, _lowrank, directions

# Pieces of at most CHUNK values (256 KiB in fp32): MeZO's memory stays at inference + one piece.
CHUNK = 1 << 16
# A regenerated set (materialise=False) still stores the directions of tensors of at most SMALL values
# (biases, norm weights): a few KiB in all, and each regeneration would cost a draw's overhead.
SMALL = 1 << 12
DENSE, FACTORS, JOINT = 0, 1, -1  # stream tags (2 was FACTOR_B before A and B shared one stream)


@dataclass(frozen=True)
class DirectionSpec:
    """The compact description of one step's directions: everything needed to regenerate them.

    ``lowrank`` are the indices (into the trainable parameters) whose direction is rank-``rank``
    factors; every other parameter is dense. ``masked`` are the indices restricted to a mask (the
    masks themselves belong to the scheme that made them, e.g. ``variance.Sparse``'s state).
    ``rows`` are the embedding weights whose directions live on the looked-up rows only (the rows
    are the batch's: a replay runs the closure, ``_embedding_rows``).
    """

    seed: int
    num_directions: int
    distribution: str
    rank: int | str
    orthogonal: bool
    shapes: tuple[tuple[int, ...], ...]
    lowrank: tuple[int, ...] = ()
    masked: tuple[int, ...] = ()
    rows: tuple[int, ...] = ()

    def describe(self) -> dict[str, Any]:
        """A JSON-safe dict (run records, a wire format)."""
        return {"seed": self.seed, "num_directions": self.num_directions, "distribution": self.distribution,
                "rank": self.rank, "orthogonal": self.orthogonal, "shapes": [list(s) for s in self.shapes],
                "lowrank": list(self.lowrank), "masked": list(self.masked), "rows": list(self.rows)}


def draw_seed(generator: torch.Generator) -> int:
    """The step seed s: the one draw from the caller's generator (63 bits)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def fill_stream_(flat: torch.Tensor, distribution: str, key: tuple[int, ...], *, start: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill the contiguous 1-D ``flat`` with values ``start … start + len`` of the stream ``key``:
    piece c (CHUNK values) is drawn from a generator seeded ``counter_seed(*key, c)``. ``start``
    must be a multiple of CHUNK (pieces are never split)."""
    if start % CHUNK:
        raise ValueError(f"a stream is regenerated in whole pieces of {CHUNK} values; start={start}")
    gen = generator or torch.Generator(device=flat.device)
    with directions._drawing():
        for off in range(0, flat.numel(), CHUNK):
            gen.manual_seed(directions.counter_seed(*key, (start + off) // CHUNK))
            directions.fill_(flat[off:off + CHUNK], distribution, gen)
    return flat


@dataclass
class DirectionSet:
    """K directions for each trainable parameter (module docstring). Build with :meth:`draw`.

    ``dense[i]`` (K, *shape), ``factors[i]`` (A (K, m, r), B (K, n, r)) with ``modules[i]`` the
    layer, ``masks[i]`` a 0/1 tensor of p's shape applied to ``dense[i]``. With
    ``materialised=False`` the dense directions of tensors over ``SMALL`` values are not stored:
    :meth:`pieces` regenerates them.
    ``rows[i]`` (an ``_embedding_rows.RowDirection``) is an embedding weight's direction on the rows
    the batch looks up, drawn during the evaluation; ``dense_reasons`` says why each other
    embedding weight got a dense direction.
    """

    spec: DirectionSpec
    params: list[tuple[str, nn.Parameter]]
    modules: dict[int, nn.Module]
    dense: dict[int, torch.Tensor] = field(default_factory=dict)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[int, _embedding_rows.RowDirection] = field(default_factory=dict)
    dense_reasons: dict[str, str] = field(default_factory=dict)
    materialised: bool = True
    picked: tuple[int, ...] | None = None  # after select(): which of the spec's K directions these are

    # ------------------------------------------------------------------ drawing and replaying

    @classmethod
    def draw(cls, model: nn.Module, params: list[tuple[str, nn.Parameter]], *, num_directions: int,
             distribution: str, rank: int | str, orthogonal: bool, generator: torch.Generator,
             masks: dict[int, torch.Tensor] | None = None, materialise: bool = True,
             embedding_rows: bool = True) -> DirectionSet:
        """Draw the step seed from ``generator`` and build the directions from it.

        ``rank`` r: the weights of low-rank-eligible layers (``_lowrank.lowrank_modules``) that
        carry no mask get rank-r factors; ``"full"``: every direction is dense.
        ``embedding_rows``: eligible ``nn.Embedding`` weights (``_embedding_rows.embedding_weights``)
        get directions on the looked-up rows only.
        """
        masks = masks or {}
        names = [n for n, _ in params]
        lowrank = {} if rank == "full" else _lowrank.lowrank_modules(model, names)
        lowrank = {i: m for i, m in lowrank.items() if i not in masks}
        rows, reasons = _embedding_rows.embedding_weights(model, names, enabled=embedding_rows, masked=set(masks),
                                                          orthogonal=orthogonal)
        spec = DirectionSpec(seed=draw_seed(generator), num_directions=num_directions, distribution=distribution,
                             rank=rank, orthogonal=orthogonal, shapes=tuple(tuple(p.shape) for _, p in params),
                             lowrank=tuple(sorted(lowrank)), masked=tuple(sorted(masks)), rows=tuple(sorted(rows)))
        out = cls.regenerate(spec, params, {**lowrank, **rows}, masks=masks, materialise=materialise)
        out.dense_reasons = reasons
        return out

    @classmethod
    def regenerate(cls, spec: DirectionSpec, params: list[tuple[str, nn.Parameter]],
                   modules: dict[int, nn.Module], *, masks: dict[int, torch.Tensor] | None = None,
                   materialise: bool = True) -> DirectionSet:
        """The directions ``spec`` describes, for ``params`` (shapes must match), bit for bit.
        ``modules``: the layer of each low-rank weight and the ``nn.Embedding`` of each rows one."""
        shapes = tuple(tuple(p.shape) for _, p in params)
        if shapes != spec.shapes:
            raise ValueError(f"these directions were drawn for parameter shapes {spec.shapes}, not {shapes}")
        masks = masks or {}
        if tuple(sorted(masks)) != spec.masked:
            raise ValueError(f"the spec names masked parameters {spec.masked}; got masks for {sorted(masks)}")
        missing = [i for i in (*spec.lowrank, *spec.rows) if i not in modules]
        if missing:
            raise ValueError(f"the spec's low-rank / embedding-rows parameters {missing} need their modules")
        out = cls(spec, params, {i: modules[i] for i in spec.lowrank}, masks=dict(masks), materialised=materialise)
        out.rows = {i: _embedding_rows.RowDirection(modules[i], (spec.seed, i), spec.num_directions,
                                                    spec.distribution, fill=fill_stream_) for i in spec.rows}
        with directions._drawing():  # memory instruments count these buffers as "directions"
            out._fill(materialise)
        return out

    def _fill(self, materialise: bool) -> None:
        out, spec, params = self, self.spec, self.params
        k, dist = spec.num_directions, spec.distribution
        gen_by_device: dict[str, torch.Generator] = {}

        def gen(p: torch.Tensor) -> torch.Generator:
            return gen_by_device.setdefault(str(p.device), torch.Generator(device=p.device))

        for i in spec.lowrank:
            w = params[i][1]
            m, n, r = w.shape[0], w[0].numel(), spec.rank
            # A and B from one stream, A's K·m·r values first: one draw per layer, not two (a draw of a
            # few thousand values costs its fixed overhead, ~0.1 ms on a small CPU, more than its values)
            ab = fill_stream_(torch.empty(k * (m + n) * r, dtype=w.dtype, device=w.device), dist,
                              (spec.seed, i, FACTORS), generator=gen(w))
            a, b = ab[: k * m * r].view(k, m, r), ab[k * m * r:].view(k, n, r)
            out.factors[i] = (a.mul_(1.0 / math.sqrt(r)) if r != 1 else a, b)
        dense = out.dense_indices()
        if not materialise:
            if spec.orthogonal or k != 1:
                raise ValueError("only single, non-orthogonal directions can be regenerated piece by piece")
            # small tensors (biases, norms) are stored anyway: regenerating one costs a draw's fixed
            # overhead each time it is used (MeZO uses z three times), and they hold few values
            dense = [i for i in dense if params[i][1].numel() <= SMALL]
        if spec.orthogonal:
            out.dense.update(_orthogonal(spec, [params[i][1] for i in dense], dense))
        else:
            for i in dense:
                p = params[i][1]
                # K = 1: a standalone tensor shaped like p, which write_gradients(consume=True) scales in
                # place into the gradient (no second parameter-sized buffer), as a tangent needs no copy
                buf = torch.empty(p.shape if k == 1 else (k, *p.shape), dtype=p.dtype, device=p.device)
                fill_stream_(buf.view(-1), dist, (spec.seed, i, DENSE), generator=gen(p))
                out.dense[i] = buf.unsqueeze(0) if k == 1 else buf
        for i, mask in out.masks.items():
            if i in out.dense:  # a regenerated one is masked piece by piece (pieces())
                out.dense[i].mul_(mask.to(out.dense[i].dtype))

    def pieces(self, indices: list[int] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(parameter index, flat start, z piece)`` of the dense directions (K = 1), regenerated
        piece by piece into one reused buffer per dtype and device (never more than CHUNK regenerated
        values of z exist, besides the stored tensors of at most SMALL values; the piece is only valid
        until the next one). Masked pieces come out masked."""
        if self.spec.num_directions != 1:
            raise ValueError("pieces() regenerates a single direction (K = 1)")
        indices = self.dense_indices() if indices is None else indices
        buffers: dict[tuple[torch.dtype, str], torch.Tensor] = {}
        gens: dict[str, torch.Generator] = {}
        largest = min(CHUNK, max((self.params[i][1].numel() for i in indices), default=0))
        for i in indices:
            p = self.params[i][1]
            key = (p.dtype, str(p.device))
            if key not in buffers:
                with directions._drawing():
                    buffers[key] = torch.empty(largest, dtype=p.dtype, device=p.device)
            gen = gens.setdefault(str(p.device), torch.Generator(device=p.device))
            mask = self.masks[i].reshape(-1) if i in self.masks else None
            n = p.numel()
            for start in range(0, n, CHUNK):
                if i in self.dense:  # stored: every direction when materialised, else the small ones
                    yield i, start, self.dense[i].view(-1)[start:start + CHUNK]
                    continue
                z = fill_stream_(buffers[key][: min(CHUNK, n - start)], self.spec.distribution,
                                 (self.spec.seed, i, DENSE), start=start, generator=gen)
                if mask is not None:
                    z.mul_(mask[start:start + z.numel()].to(z.dtype))
                yield i, start, z

    def dense_direction(self, i: int) -> torch.Tensor:
        """Parameter i's dense direction (K, *shape), regenerated whole if not stored."""
        if i in self.dense:
            return self.dense[i]
        p = self.params[i][1]
        with directions._drawing():
            flat = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        for _, start, z in self.pieces([i]):
            flat[start:start + z.numel()].copy_(z)
        return flat.view(1, *p.shape)

    def dense_indices(self) -> list[int]:
        """The parameters with dense directions (stored or regenerated): neither low-rank factors nor
        embedding rows."""
        return [i for i in range(len(self.params)) if i not in self.factors and i not in self.rows]

    def embedding_summary(self) -> dict[str, Any]:
        """``{"rows": {name: rows touched}, "dense": {name: reason}}`` for the embedding weights."""
        return _embedding_rows.summary(self.rows, self.params, self.dense_reasons)

    # ------------------------------------------------------------------ transforming

    @property
    def num_directions(self) -> int:
        return self.spec.num_directions if self.picked is None else len(self.picked)

    def select(self, ks: list[int] | torch.Tensor) -> DirectionSet:
        """The directions ``ks`` of this set (in that order), as a set of len(ks) directions."""
        idx = torch.as_tensor(ks, dtype=torch.long)
        if not self.materialised:
            raise ValueError("select() needs stored directions")
        picked = tuple(int(j) for j in idx) if self.picked is None else tuple(self.picked[int(j)] for j in idx)
        return DirectionSet(
            self.spec, self.params, self.modules,
            dense={i: v.index_select(0, idx.to(v.device)) for i, v in self.dense.items()},
            factors={i: (a.index_select(0, idx.to(a.device)), b.index_select(0, idx.to(b.device)))
                     for i, (a, b) in self.factors.items()},
            masks=self.masks, rows={i: rd.select(idx) for i, rd in self.rows.items()},
            dense_reasons=self.dense_reasons, picked=picked)

    def restricted(self, masks: dict[int, torch.Tensor]) -> DirectionSet:
        """These directions times 0/1 ``masks`` (parameter index → mask of its shape); a low-rank
        direction that gets a mask is materialised first (M ⊙ A Bᵀ is not low-rank); an embedding-rows
        direction cannot take one (its rows are the batch's: mask it before drawing)."""
        if not self.materialised:
            raise ValueError("restricted() needs stored directions")
        if any(i in self.rows for i in masks):
            raise ValueError("an embedding-rows direction cannot be masked after drawing; pass the mask to draw()")
        dense, factors = dict(self.dense), dict(self.factors)
        for i, mask in masks.items():
            v = dense[i] if i in dense else _materialise(*factors.pop(i), self.params[i][1].shape)
            dense[i] = v * mask.to(v.dtype)
        return DirectionSet(self.spec, self.params, {i: m for i, m in self.modules.items() if i in factors},
                            dense=dense, factors=factors, masks={**self.masks, **masks}, rows=self.rows,
                            dense_reasons=self.dense_reasons, picked=self.picked)

    # ------------------------------------------------------------------ combining

    def gradients(self, weights: torch.Tensor) -> dict[int, torch.Tensor]:
        """Σ_k w_k v_k for every parameter (index → tensor of its shape), low-rank ones built as one
        matmul, embedding rows zero off the touched rows, regenerated dense ones whole. ``weights``
        has shape (K,)."""
        out = {i: _combine(weights, self.dense_direction(i)) for i in self.dense_indices()}
        for i, (a, b) in self.factors.items():
            out[i] = _lowrank_sum(weights, a, b).view(self.params[i][1].shape)
        for i, rd in self.rows.items():
            out[i] = rd.gradient(weights)
        return out

    def write_gradients(self, weights: torch.Tensor, extra: dict[int, torch.Tensor] | None = None, *,
                        consume: bool = True) -> None:
        """``p.grad`` ← Σ_k w_k v_k (+ ``extra[i]``) for every parameter, into existing buffers.

        ``consume``: a single stored dense direction is scaled in place and becomes the gradient
        (the set must not be used afterwards), so no second parameter-sized buffer exists."""
        from bpfree.estimators.base import write_gradients  # noqa: PLC0415 (base imports nothing of ours)

        with torch.no_grad():
            for i, (_, p) in enumerate(self.params):
                if i in self.factors:
                    a, b = self.factors[i]
                    _lowrank.write_gradient(p, weights, [(a[j], b[j]) for j in range(a.shape[0])])
                    if extra is not None and i in extra:
                        p.grad.add_(extra[i])
                elif i in self.rows:
                    self.rows[i].write_gradient(p, weights)
                    if extra is not None and i in extra:
                        p.grad.add_(extra[i])
                else:
                    v = self.dense_direction(i)
                    if consume and v.shape[0] == 1 and v._base is not None and v._base.shape == v.shape[1:]:
                        g = v._base.mul_(weights.reshape(()).to(v.dtype))  # the standalone buffer itself
                    else:
                        g = _combine(weights, v)
                    if extra is not None and i in extra:
                        g = g.add_(extra[i]) if g._base is None else g + extra[i]
                    write_gradients([self.params[i]], [g])

    def describe(self) -> dict[str, Any]:
        """The compact description (:class:`DirectionSpec`), plus which directions were picked."""
        out = self.spec.describe()
        if self.picked is not None:
            out["picked"] = list(self.picked)
        return out


def _combine(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k v_k for stacked v (K, *shape): a plain scale for K = 1, a tensordot otherwise."""
    if v.shape[0] == 1:
        return v[0] * weights.reshape(()).to(v.dtype)
    return torch.tensordot(weights.to(v.dtype), v, dims=1)


def _lowrank_sum(weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k A_k B_kᵀ as one (m × K·r)(K·r × n) matmul."""
    k, m, r = a.shape
    a_flat = (a * weights.to(a.dtype).view(k, 1, 1)).permute(1, 0, 2).reshape(m, k * r)
    return a_flat @ b.permute(1, 0, 2).reshape(-1, k * r).T


def _materialise(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The dense (K, *shape) directions A_k B_kᵀ."""
    return torch.bmm(a, b.transpose(1, 2)).view(a.shape[0], *shape)


def _orthogonal(spec: DirectionSpec, tensors: list[torch.Tensor], indices: list[int]) -> dict[int, torch.Tensor]:
    """K orthonormal rows of length √N across all dense parameters (``directions`` docstring), from
    the joint stream (s, −1, 0)."""
    k, n = spec.num_directions, sum(t.numel() for t in tensors)
    if k > n:
        raise ValueError(f"orthogonal directions need num_directions <= {n} parameters, got {k}")
    device = tensors[0].device
    raw = fill_stream_(torch.empty(n * k, dtype=torch.float32, device=device), spec.distribution,
                       (spec.seed, JOINT, DENSE)).view(n, k)
    q, r = torch.linalg.qr(raw, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    flat = (q * signs).T.mul_(math.sqrt(n))
    return {i: chunk.reshape(k, *t.shape).to(t.dtype).contiguous()
            for i, t, chunk in zip(indices, tensors, flat.split([t.numel() for t in tensors], dim=1))}
