"""Embedding directions only on the rows a batch looks up.

An ``nn.Embedding`` with weight W (V × D) enters the loss only through the rows the batch looks
up: f depends on W through W[x] alone, so for the set T of rows in x

    ∂f/∂W_r = 0   for every row r ∉ T,   and for r = ``padding_idx``

(``F.embedding`` gives the padding row no gradient by definition). Restrict the direction to the
touched rows, v = M_T ⊙ u with u the usual direction (E[u uᵀ] = I) and M_T the 0/1 mask of the
rows of T other than the padding row; then, because ∇f = M_T ⊙ ∇f,

    E[(∇f·v) v] = diag(M_T) ∇f = ∇f,

so forward gradient, SPSA and MeZO stay unbiased while the (V − |T|)·D coordinates that only add
noise are gone: with Rademacher u and K = 1, E‖g‖² = n‖∇f‖² with n the number of perturbed
coordinates, so cos(g, ∇f) ≈ √(K/n) with n = N − (V − |T|)·D instead of N (MiniLM-L6: its
30522 × 384 word table is half of N = 22.7M; a batch of 16 tweets touches a few hundred rows).

**When T is known.** The rows are only known once the closure runs, so the values are drawn at
the lookup, inside the module's forward (patched for the evaluation, as ``_lowrank`` patches a
Linear): the rows that a module's g-th lookup of the step sees for the first time form group g
(sorted), whose K·|group|·D values are the counter-based stream (s, i, ``ROWS``, g) of the step
seed s and parameter index i (``direction_set``). Every replay of the same closure — the ±ε
branches, the K forward-mode passes, SVRG's snapshot θ̃, MeZO's phases — looks the same rows up in
the same order, so it sees exactly the same v; nothing is drawn for a row the batch does not use,
and the weight itself is never written. Several lookups of one module (two id tensors) are fine:
each new row is drawn once, at its first lookup. Memory: the K·|T|·D values are kept for the step
(as low-rank factors are; 229 rows × 384 for MiniLM on 16 tweets, against 30522 × 384 dense), so
MeZO's update mode replays them from the cache instead of regenerating them.

**When it does not apply** (the weight then gets an ordinary dense direction, with the reason in
``Estimate.details["embedding_rows"]`` and in the run record's ``estimator`` block):

* the weight is also a parameter of another module — a tied output layer
  (``lm_head.weight is embed.weight``), where its gradient is dense;
* the module is not exactly ``nn.Embedding`` (a subclass may use its weight otherwise), has
  ``max_norm`` set (the lookup renormalises rows in place, writing the weight) or an
  instance-level ``forward`` (a wrapper's, e.g. accelerate's hooks, which the patch would replace);
* a scheme restricts it to a mask (``sparse``), or the directions are orthogonal (drawn jointly
  across all dense parameters);
* ``embedding_rows=False`` (the estimators' option; ``forward_gradient:embedding_rows=false``).

A weight read by the closure outside the module's forward (``F.linear(h, model.embed.weight)``
with no module sharing it) cannot be seen from the module tree; if the module's forward never
runs during an evaluation, the step fails with an error naming it and the fix
(``embedding_rows=false``), as low-rank directions do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from bpfree.estimators._functional import patched_forwards

ROWS = 3  # the stream tag of row-restricted values (direction_set: DENSE 0, FACTORS 1)


def embedding_weights(model: nn.Module, names: list[str], *, enabled: bool = True,
                      masked: set[int] | frozenset[int] = frozenset(),
                      orthogonal: bool = False) -> tuple[dict[int, nn.Embedding], dict[str, str]]:
    """``({index in names: module}, {name: reason})``: which trainable embedding weights get
    row-restricted directions, and why each other embedding weight falls back to dense."""
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.Embedding) for m in modules.values()):
        return {}, {}  # the common case, without the parameter scan
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    rows: dict[int, nn.Embedding] = {}
    dense: dict[str, str] = {}
    for i, name in enumerate(names):
        prefix, _, leaf = name.rpartition(".")
        mod = modules.get(prefix)
        if leaf != "weight" or not isinstance(mod, nn.Embedding):
            continue
        reason = _why_dense(mod, owners.get(id(mod.weight), [name]), name, enabled=enabled,
                            masked=i in masked, orthogonal=orthogonal)
        if reason is None:
            rows[i] = mod
        else:
            dense[name] = reason
    return rows, dense


def _why_dense(mod: nn.Module, owners: list[str], name: str, *, enabled: bool, masked: bool,
               orthogonal: bool) -> str | None:
    if not enabled:
        return "embedding_rows=false"
    if type(mod) is not nn.Embedding:
        return f"{type(mod).__name__} is a subclass of nn.Embedding, which may use its weight outside the lookup"
    others = [n for n in owners if n != name]
    if others:
        return (f"the weight is also {', '.join(others)} (tied): it is used outside the lookup, "
                "so its gradient is not zero off the looked-up rows")
    if mod.max_norm is not None:
        return "max_norm is set: the lookup renormalises rows in place, writing the weight"
    if "forward" in mod.__dict__:
        return "the module has an instance-level forward (a wrapper's hook), which the lookup patch would replace"
    if masked:
        return "a sparse mask restricts this weight"
    if orthogonal:
        return "orthogonal directions are drawn jointly across all dense parameters"
    return None


class RowDirection:
    """K directions on one embedding weight, zero off the rows the batch looks up (module
    docstring): ``rows`` (n,) in order of first lookup, ``values`` (K, n, D)."""

    def __init__(self, module: nn.Embedding, key: tuple[int, int], num_directions: int, distribution: str,
                 picked: tuple[int, ...] | None = None, fill: Callable[..., torch.Tensor] | None = None):
        from bpfree.estimators.direction_set import fill_stream_  # noqa: PLC0415 (direction_set imports us)

        self.module, self.key, self.distribution = module, key, distribution
        self.num_directions = num_directions  # K of the spec (draws); len(picked) after select()
        self.picked = picked
        self._fill = fill or fill_stream_
        w = module.weight
        self.rows = torch.empty(0, dtype=torch.long, device=w.device)
        self.values = torch.empty(num_directions, 0, w.shape[1], dtype=w.dtype, device=w.device)
        self.groups = 0
        self._sorted, self._order = self.rows, self.rows

    @property
    def k(self) -> int:
        return self.num_directions if self.picked is None else len(self.picked)

    def _draw_new(self, ids: torch.Tensor) -> None:
        """Draw group g for the rows of ``ids`` not seen yet (sorted), from stream (s, i, ROWS, g)."""
        from bpfree.estimators import directions  # noqa: PLC0415

        uniq = torch.unique(ids)
        pad = self.module.padding_idx
        if pad is not None:
            uniq = uniq[uniq != pad]
        new = uniq[~torch.isin(uniq, self.rows)] if self.rows.numel() else uniq
        if not new.numel():
            return
        w = self.module.weight
        k, dim = self.num_directions, w.shape[1]
        with directions._drawing():
            flat = torch.empty(k * new.numel() * dim, dtype=w.dtype, device=w.device)
            block = self._fill(flat, self.distribution, (*self.key, ROWS, self.groups)).view(k, new.numel(), dim)
        if self.picked is not None:
            block = block.index_select(0, torch.as_tensor(self.picked, device=block.device))
        self.groups += 1
        self.rows = torch.cat([self.rows, new])
        self.values = torch.cat([self.values, block], dim=1)
        self._sorted, self._order = torch.sort(self.rows)

    def lookup(self, ids: torch.Tensor, j: int) -> torch.Tensor:
        """v_j[ids]: direction j at the looked-up rows (shape ``(*ids.shape, D)``; the padding row 0)."""
        self._draw_new(ids)
        dim = self.values.shape[2]
        if not self.rows.numel():
            return self.values.new_zeros((*ids.shape, dim))
        flat = ids.reshape(-1)
        pos = torch.searchsorted(self._sorted, flat).clamp_(max=self.rows.numel() - 1)
        out = self.values[j].index_select(0, self._order[pos])
        pad = self.module.padding_idx
        if pad is not None:
            out = out.masked_fill_((flat == pad).unsqueeze(1), 0)
        return out.view(*ids.shape, dim)

    def select(self, ks: torch.Tensor) -> RowDirection:
        """Directions ``ks`` of this set (adaptive's candidates), rows and values shared."""
        full = tuple(int(j) for j in ks) if self.picked is None else tuple(self.picked[int(j)] for j in ks)
        out = RowDirection(self.module, self.key, self.num_directions, self.distribution, picked=full, fill=self._fill)
        out.rows, out.groups, out._sorted, out._order = self.rows, self.groups, self._sorted, self._order
        out.values = self.values.index_select(0, ks.to(self.values.device))
        return out

    def combined(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k v_k on the touched rows, (n, D)."""
        w = weights.to(self.values.dtype)
        return torch.tensordot(w, self.values, dims=1)

    def gradient(self, weights: torch.Tensor) -> torch.Tensor:
        """The full (V, D) gradient Σ_k w_k v_k: exactly zero off the touched rows."""
        w = self.module.weight
        out = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        return out.index_copy_(0, self.rows, self.combined(weights))

    def write_gradient(self, p: torch.Tensor, weights: torch.Tensor) -> None:
        """``p.grad`` ← Σ_k w_k v_k (zero off the touched rows), into an existing buffer."""
        g = p.grad
        if g is not None and g.shape == p.shape and g.dtype == p.dtype and not g.is_sparse:
            g.zero_().index_copy_(0, self.rows, self.combined(weights))
        else:
            p.grad = self.gradient(weights)


def _lookup(mod: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return type(mod).forward(mod, ids)  # the class's forward, not the instance-level patch


def _patched(forwards: dict[nn.Module, Callable[..., torch.Tensor]], model: nn.Module):
    """Instance-level forwards for the block; afterwards every patched module must have run."""
    return patched_forwards(forwards, model, lambda names: (
        f"embedding directions on the looked-up rows (embedding_rows, the default) perturb an nn.Embedding "
        f"weight inside its lookup, but the forward of {names} "
        f"never ran: its weight is used some other way. Set embedding_rows=false (dense directions) for this model."))


def perturbed(rows: dict[int, RowDirection], j: int, scale: float,
              model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block each embedding looks up (W + s·v_j)[ids] = W[ids] + s·v_j[ids] without
    writing W (under ``substituted``/SVRG's ``at=``, W is the evaluation point)."""

    def make(rd: RowDirection) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            return _lookup(rd.module, ids).add_(rd.lookup(ids, j), alpha=scale)

        return forward

    return _patched({rd.module: make(rd) for rd in rows.values()}, model)


def with_tangents(rows: dict[int, RowDirection], j: int, model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within a ``forward_ad.dual_level``, each embedding's output has tangent v_j[ids] (the
    weight stays a plain tensor: no V × D tangent exists)."""

    def make(rd: RowDirection) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            return fwAD.make_dual(_lookup(rd.module, ids), rd.lookup(ids, j))

        return forward

    return _patched({rd.module: make(rd) for rd in rows.values()}, model)


def summary(rows: dict[int, RowDirection], params: list[tuple[str, Any]], dense: dict[str, str]) -> dict[str, Any]:
    """What ``Estimate.details["embedding_rows"]`` holds: rows touched per weight, and the reasons
    the others are dense."""
    return {"rows": {params[i][0]: int(rd.rows.numel()) for i, rd in rows.items()}, "dense": dict(dense)}
