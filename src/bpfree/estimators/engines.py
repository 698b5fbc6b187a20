"""Engines: turn a :class:`~bpfree.estimators.direction_set.DirectionSet` into directional
derivatives (forward mode) or perturbed losses (zeroth order) — chosen in one place.

As ``torch.optim`` picks its foreach/fused kernel in one function, every
estimator asks the two dispatchers here and never chooses a fast path inline:

* :func:`directional_derivatives` — d_k = ∇f(θ)·v_k for the K directions:

  - ``batched_chain``: K > 1 on a plain Linear/Conv2d/ReLU/MaxPool2d/Flatten ``nn.Sequential``
    whose weights all have low-rank directions and whose other parameters are the layers'
    biases: the primal once, the K tangents batched by hand (``_lowrank.chain_directional_derivatives``);
    1 + K forward-pass equivalents;
  - ``vmapped_jvp``: dense directions, K > 1 (or orthogonal): ``torch.func.vmap`` of
    ``torch.func.jvp`` over the stacked tangents; 1 + 2K;
  - ``per_direction``: one ``torch.autograd.forward_ad`` pass per direction, low-rank weights
    patched into their layers (``_lowrank.with_tangents``), and the layers whose weights carry no
    tangent (LoRA's frozen ones) given the two-matmul rule (``_lowrank.frozen_layer_tangents``);
    2K (low-rank) or 1 + 2K (dense).

* :func:`perturbed_losses` — f(θ + s_j v_{k_j}) for J branches:

  - ``one_pass``: low-rank Linear weights and bias directions on a plain ``nn.Sequential``
    (``_chain.chain_losses``): the J branches share the prefix and run folded into one batch;
  - ``per_branch``: one closure call per branch, θ + s v swapped in functionally (the stored
    parameters untouched; one perturbed copy at a time);
  - ``in_place``: MeZO's memory path — the dense parameters shifted in place (+εz, then −εz),
    z regenerated piece by piece, a record kept to restore them bit-exactly
    (:func:`shift_exactly`); the caller finishes the step (restore or update).

Embedding weights with directions on the looked-up rows (``DirectionSet.rows``) are applied inside
their lookup (``_embedding_rows``: a tangent v[ids] or a shift s·v[ids]) by ``per_direction``,
``per_branch`` and ``in_place``; the engines that run layers by hand and ``vmapped_jvp`` do not take
them (``DoesNotApply``).

Each engine raises ``DoesNotApply`` (``_models``) when it cannot stand in for the closure; the
dispatcher then tries the next. Models are recognised by one function
(``_models.sequential_modules``), which refuses any module with hooks, for every engine.

**Evaluating elsewhere.** ``at=`` (a list of tensors, one per trainable parameter) evaluates the
same directions at other parameter values — SVRG's snapshot θ̃ — by swapping them into the module
for the call (``_functional.substituted``), so the live weights are never written. The closure
decides the batch, so replaying the same directions on another batch is calling again with
another closure.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from bpfree.estimators import _chain, _embedding_rows, _lowrank
from bpfree.estimators._functional import explain_forward_ad_failure, functional_loss, substituted
from bpfree.estimators._models import DoesNotApply
from bpfree.estimators.base import check_scalar_loss
from bpfree.estimators.direction_set import DirectionSet

FORWARD_ENGINES = ("batched_chain", "vmapped_jvp", "per_direction")
ZEROTH_ORDER_ENGINES = ("one_pass", "per_branch", "in_place")


@dataclass
class Derivatives:
    """What :func:`directional_derivatives` returns: the loss at the evaluation point, d (K,),
    the step's cost in forward-pass equivalents and which engine ran."""

    loss: torch.Tensor
    d: torch.Tensor
    forward_passes: float
    engine: str


@dataclass
class Losses:
    """What :func:`perturbed_losses` returns: the J losses (float64), the engine, and for
    ``in_place`` the restore records (the dense parameters are left at θ + s_last·z)."""

    losses: torch.Tensor
    engine: str
    records: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def evaluated_at(model: nn.Module, params: list[tuple[str, nn.Parameter]],
                 at: Sequence[torch.Tensor] | None) -> Iterator[list[torch.Tensor]]:
    """Within the block the module's trainable parameters read ``at`` (or themselves); yields the
    values, detached. The stored parameters are never written."""
    if at is None:
        yield [p.detach() for _, p in params]
        return
    if len(at) != len(params):
        raise ValueError(f"at= needs one tensor per trainable parameter ({len(params)}), got {len(at)}")
    with substituted(model, [n for n, _ in params], list(at)):
        yield list(at)


# --------------------------------------------------------------------------- forward mode


def directional_derivatives(model: nn.Module, dirs: DirectionSet, closure: Callable[[], torch.Tensor], *,
                            at: Sequence[torch.Tensor] | None = None, estimator: str = "forward_gradient",
                            engines: Sequence[str] = FORWARD_ENGINES) -> Derivatives:
    """d_k = ∇f·v_k for every direction of ``dirs`` by the first engine that applies (module docstring)."""
    with evaluated_at(model, dirs.params, at) as primals:
        for name in engines:
            try:
                return _FORWARD[name](model, dirs, closure, primals, estimator)
            except DoesNotApply:
                continue
    raise DoesNotApply(f"none of the engines {', '.join(engines)} applies")


def _batched_chain(model, dirs: DirectionSet, closure, primals, estimator) -> Derivatives:
    k = dirs.num_directions
    chain = _lowrank.tangent_chain(model) if k > 1 and dirs.factors and not dirs.rows else None
    if chain is None:
        raise DoesNotApply
    owner = {}
    for mod in chain:
        if type(mod) in (nn.Linear, nn.Conv2d):
            owner[id(mod.weight)] = (mod, "weight")
            if mod.bias is not None:
                owner[id(mod.bias)] = (mod, "bias")
    weight_factors, bias_tangents = {}, {}
    for i, (_, p) in enumerate(dirs.params):
        mod, kind = owner.get(id(p), (None, None))
        if mod is None or (kind == "weight") != (i in dirs.factors):
            raise DoesNotApply  # a parameter off the chain, or a dense (e.g. masked) weight
        if kind == "weight":
            weight_factors[mod] = dirs.factors[i]
        else:
            bias_tangents[mod] = dirs.dense_direction(i)
    # under evaluated_at(), mod.weight / mod.bias already read the evaluation point
    loss, d = _lowrank.chain_directional_derivatives(model, chain, closure, weight_factors, bias_tangents)
    return Derivatives(loss, d, 1.0 + k, "batched_chain")


def _vmapped_jvp(model, dirs: DirectionSet, closure, primals, estimator) -> Derivatives:
    k = dirs.num_directions
    if dirs.factors or dirs.rows or not (k > 1 or dirs.spec.orthogonal):
        raise DoesNotApply
    names = [n for n, _ in dirs.params]
    tangents = [dirs.dense[i] for i in range(len(dirs.params))]

    def run():
        return stacked_directional_derivatives(model, names, closure, primals, tangents)

    loss, d = explained(run, model, estimator)
    return Derivatives(loss, d, 1.0 + 2.0 * k, "vmapped_jvp")


def _per_direction(model, dirs: DirectionSet, closure, primals, estimator) -> Derivatives:
    k = dirs.num_directions
    dense = dirs.dense_indices()
    names = [dirs.params[i][0] for i in dense]
    dense_primals = [primals[i] for i in dense]
    loss, d_all = None, []
    lowrank = [dirs.modules[i] for i in dirs.factors]
    with _lowrank.frozen_layer_tangents(model, skip=lowrank):  # once for all K passes
        for j in range(k):
            tangents = [_standalone(dirs.dense_direction(i)[j]) for i in dense]
            step_factors = {dirs.modules[i]: (a[j], b[j]) for i, (a, b) in dirs.factors.items()}

            def run(tangents=tangents, step_factors=step_factors, j=j):
                with contextlib.ExitStack() as layers:
                    if step_factors:
                        layers.enter_context(_lowrank.with_tangents(step_factors, model))
                    if dirs.rows:
                        layers.enter_context(_embedding_rows.with_tangents(dirs.rows, j, model))
                    return directional_derivative(model, names, closure, dense_primals, tangents)

            loss, d = explained(run, model, estimator)
            d_all.append(d.reshape(()))
    passes = 2.0 * k if dirs.factors or dirs.rows else 1.0 + 2.0 * k
    return Derivatives(loss, torch.stack(d_all), passes, "per_direction")


def _standalone(v: torch.Tensor) -> torch.Tensor:
    """A tangent forward AD uses without copying: the standalone buffer behind a single direction's
    view (``DirectionSet`` stores K = 1 that way), else v, made contiguous."""
    base = v._base
    if base is not None and base.shape == v.shape and base.stride() == v.stride() \
            and base.storage_offset() == v.storage_offset():
        return base
    return v if v.is_contiguous() else v.contiguous()


_FORWARD = {"batched_chain": _batched_chain, "vmapped_jvp": _vmapped_jvp, "per_direction": _per_direction}


def explained(run: Callable[[], Any], model: nn.Module, estimator: str) -> Any:
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
    load_forward_ad_decompositions()
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(p, v) for p, v in zip(primals, tangents)]
        with substituted(model, names, duals):
            out = closure()
        check_scalar_loss(out)
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # the loss does not depend on the parameters
            tangent = torch.zeros_like(primal)
        return primal.detach().reshape(()), tangent.reshape(1)


def stacked_directional_derivatives(model, names, closure, primals, tangents) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d)`` with d_k = ∇f(θ)·v_k for stacked tangents of shape (K, *p.shape).

    Runs ``torch.func.jvp`` under ``torch.func.vmap`` over the K tangents, so the
    primal forward is computed once and the tangent matmuls are batched.
    """
    k = tangents[0].shape[0]
    load_forward_ad_decompositions()
    with torch.no_grad():
        f = functional_loss(model, names, closure)

        def jvp(*ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.jvp(f, tuple(primals), ts)

        primal, tangent = torch.func.vmap(jvp, in_dims=0, out_dims=(None, 0), randomness="same")(*tangents)
        check_scalar_loss(primal)
        return primal.detach().reshape(()), tangent.reshape(k)


@functools.cache
def load_forward_ad_decompositions() -> None:
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


# --------------------------------------------------------------------------- zeroth order


def perturbed_losses(model: nn.Module, dirs: DirectionSet, closure: Callable[[], torch.Tensor],
                     scales: Sequence[float], which: Sequence[int], *, at: Sequence[torch.Tensor] | None = None,
                     engines: Sequence[str] = ("one_pass", "per_branch"), exact_restore: bool = True,
                     share_prefix: str = "always", max_branches: int = _chain.MAX_BRANCHES) -> Losses:
    """The closure's loss at θ + ``scales[j]``·v_{``which[j]``} for every branch j, by the first
    engine in ``engines`` that applies (module docstring). ``in_place`` takes exactly the two
    branches (+ε, −ε) of one direction and leaves the dense parameters at θ − εz with the records
    that :func:`unshift_exactly` needs (``exact_restore``; without it, no record: MeZO's update
    mode)."""
    with evaluated_at(model, dirs.params, at) as primals:
        for name in engines:
            try:
                if name == "one_pass":
                    return Losses(_one_pass(model, dirs, closure, scales, which, share_prefix, max_branches), name)
                if name == "per_branch":
                    return Losses(_per_branch(model, dirs, closure, scales, which, primals), name)
                if name == "in_place":
                    losses, records = _in_place(model, dirs, closure, scales, which, primals, exact_restore)
                    return Losses(losses, name, records)
                raise ValueError(f"unknown zeroth-order engine {name!r}; valid: {', '.join(ZEROTH_ORDER_ENGINES)}")
            except DoesNotApply:
                continue
    raise DoesNotApply(f"none of the engines {', '.join(engines)} applies")


def chain_biases(chain: list[nn.Module], dense: list[torch.Tensor]) -> list[nn.Module] | None:
    """For each dense tensor, the chain layer whose bias it is; None if any is something else."""
    owner = {id(m.bias): m for m in chain if isinstance(m, _chain.LAYERS) and m.bias is not None}
    layers = [owner.get(id(p)) for p in dense]
    return None if any(m is None for m in layers) else layers


def _one_pass(model, dirs: DirectionSet, closure, scales, which, share_prefix, max_branches) -> torch.Tensor:
    chain = _chain.sequential_chain(model) if dirs.factors and not dirs.rows else None
    if chain is None:
        raise DoesNotApply
    dense = dirs.dense_indices()
    biases = chain_biases(chain, [dirs.params[i][1] for i in dense])
    if biases is None:
        raise DoesNotApply
    branches = _chain.Branches(
        weight_factors={dirs.modules[i]: ab for i, ab in dirs.factors.items()},
        bias_directions={mod: dirs.dense_direction(i).reshape(dirs.num_directions, -1)
                         for i, mod in zip(dense, biases)},
        scales=list(scales), direction=list(which))
    return _chain.chain_losses(model, chain, closure, branches, max_branches=max_branches, share_prefix=share_prefix)


def _per_branch(model, dirs: DirectionSet, closure, scales, which, primals) -> torch.Tensor:
    dense = dirs.dense_indices()
    names = [dirs.params[i][0] for i in dense]
    base = [primals[i] for i in dense]
    f = functional_loss(model, names, closure)

    def loss_at(scale: float, j: int) -> torch.Tensor:
        if scale == 0.0:
            out = f(*base)
        else:
            vs = [dirs.dense_direction(i)[j] for i in dense]
            shifted = torch._foreach_add(base, vs, alpha=scale) if base else []
            factors = {dirs.modules[i]: (a[j], b[j], scale) for i, (a, b) in dirs.factors.items()}
            with layer_perturbations(model, dirs, factors, j, scale):
                out = f(*shifted)
        check_scalar_loss(out)
        return out.detach().reshape(()).double()

    with torch.no_grad():
        return torch.stack([loss_at(s, j) for s, j in zip(scales, which)])


def _in_place(model, dirs: DirectionSet, closure, scales, which, primals, exact: bool):
    """Alg. 1 of MeZO on the dense tensors ``primals`` (the live parameters, or SVRG's snapshot
    copies under ``at=``): θ + εz, f₊; θ − εz, f₋; left at θ − εz with the restore records."""
    if len(scales) != 2 or scales[0] != -scales[1] or set(which) != {0} or dirs.num_directions != 1:
        raise DoesNotApply  # two branches ±ε of one direction
    eps = float(scales[0])
    dense = dirs.dense_indices()
    flat = {i: _flat_view(primals[i]) for i in dense}

    def loss(sign: float) -> torch.Tensor:
        factors = {dirs.modules[i]: (a[0], b[0], sign * eps) for i, (a, b) in dirs.factors.items()}
        # no_grad: loss values only; with grad on, the forward would record a graph and keep its
        # activations (backprop's memory, which MeZO exists to avoid)
        with torch.no_grad(), layer_perturbations(model, dirs, factors, 0, sign * eps):
            out = closure()
        check_scalar_loss(out)
        return out.detach().reshape(()).double()

    def parts():
        for i, start, z in dirs.pieces(dense):
            yield flat[i][start:start + z.numel()], z

    records: list[Any] = []
    for part, z in parts():
        if exact:
            records.append(shift_exactly(part, z, eps))
        else:
            part.add_(z, alpha=eps)
    shifted_by = eps
    try:  # a closure that raises must not leave the parameters perturbed
        f_plus = loss(+1.0)
        if exact:
            records = [(unshift_exactly(part, z, eps, rec), shift_exactly(part, z, -eps))[1]
                       for (part, z), rec in zip(parts(), records)]
        else:
            for part, z in parts():
                part.add_(z, alpha=-2 * eps)
        shifted_by = -eps
        f_minus = loss(-1.0)
    except BaseException:
        for (part, z), rec in zip(parts(), records if exact else _nones()):
            if exact:
                unshift_exactly(part, z, shifted_by, rec)
            else:
                part.sub_(z, alpha=shifted_by)  # back to θ up to rounding (update mode)
        raise
    return torch.stack([f_plus, f_minus]), (records if exact else None)


@contextlib.contextmanager
def layer_perturbations(model: nn.Module, dirs: DirectionSet, factors: dict, j: int, scale: float) -> Iterator[None]:
    """Within the block the directions applied inside layers are on: low-rank ``factors``
    (module → (A, B, s)) and each embedding's s·v_j on its looked-up rows; nothing is written."""
    with contextlib.ExitStack() as layers:
        if factors:
            layers.enter_context(_lowrank.perturbed(factors, model))
        if dirs.rows:
            layers.enter_context(_embedding_rows.perturbed(dirs.rows, j, scale, model))
        yield


def _nones() -> Iterator[None]:
    while True:
        yield None


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("mezo perturbs parameters in place through flat views; make the parameters contiguous")
    return t.view(-1)


def in_place_parts(dirs: DirectionSet, tensors: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(parameter index, flat piece of its tensor, its z)`` over the dense directions, regenerated
    in the same order as the ``in_place`` engine shifted them (``tensors``: one per parameter)."""
    for i, start, z in dirs.pieces(dirs.dense_indices()):
        yield i, _flat_view(tensors[i])[start:start + z.numel()], z


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
