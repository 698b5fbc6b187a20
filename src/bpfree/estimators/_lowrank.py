"""Low-rank directions for the weights of ``nn.Linear`` and ``nn.Conv2d`` layers, applied without
materialising them.

For a weight W read as the matrix m × n (m = ``weight.shape[0]``, the output
features or channels; n the rest: in·kh·kw for a convolution), the direction
is V = A Bᵀ with A (m × r) and B (n × r) of i.i.d. standardised entries,
scaled by 1/√r. Then E[V_ij V_kl] = (1/r) Σ_l E[A_il A_kl] E[B_jl B_ll'] =
δ_ik δ_jl: E[vec V vec Vᵀ] = I, so every estimator built on "E[v vᵀ] = I"
stays unbiased. With Rademacher factors and r = 1, ‖V‖² = m·n exactly, so the
estimate's second moment is exactly that of dense Rademacher directions,
E‖g‖² = N‖∇f‖² (``theory.weight_perturbation_error``).

What changes is the cost. Drawing takes r·(m + n) values instead of m·n, the
weights are never written (so nothing needs restoring), and only the gradient
itself, g_W = Σ_k w_k A_k B_kᵀ, is m × n. The layer's term Vx is

* Linear: Vx = A(Bᵀx), an extra O(batch·r·(m + n));
* Conv2d (weight m × Cin × kh × kw, no groups): conv(x, A Bᵀ) =
  Σ_l A[:, l] ⊗ conv(x, B[:, l] as a (1, Cin, kh, kw) filter), i.e. one extra
  convolution with r output channels followed by a channel mix by A, r/m of
  the layer's FLOPs (plus 2·r·m FLOPs per output pixel for the mix).

Forward mode needs Vx itself (the tangent W ẋ + Vx + ḃ). Zeroth order only
needs the perturbed layer (W + εV)x: a Linear adds ε·A(Bᵀx) to its output,
while a Conv2d runs on the temporary weight W + ε·A Bᵀ (m·n values, tiny next
to its activations, since a convolution reuses its weight at every pixel).
(Low-rank perturbations are used by evolution strategies at scale, e.g.
EGGROLL, Sarkar et al. 2025.)

Only the weights of modules whose type is exactly ``nn.Linear``, or exactly
``nn.Conv2d`` with ``groups == 1`` and ``padding_mode == "zeros"``
(:func:`lowrank_eligible`), not shared with another module, are treated this
way; every other parameter gets a dense direction. A layer whose forward
never runs during the closure (its weight is used some other way, e.g.
``F.linear(x, layer.weight)``) would miss its perturbation, so that is an
``UnsupportedModelError`` naming the module and the fix (``rank="full"``). A
weight used both inside and outside its forward cannot be detected.

The arithmetic of each layer type lives in one place: :func:`weight_term`,
:func:`weight_terms` (V x for one or K directions), :func:`weight_apply`
(W t for K tangents at once), :func:`_layer` (the layer's own map) and
:func:`chain_flops` (what the batched K-tangent pass costs).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.estimators import _models, directions
from bpfree.estimators._functional import loss_gradient_at_output, output_leaf, patched_forwards


def check_rank(rank: object) -> None:
    """``rank`` is an int >= 1 or ``"full"`` (dense directions for every parameter)."""
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f'rank must be an int >= 1 or "full" (dense directions), got {rank!r}')


def lowrank_eligible(mod: nn.Module) -> bool:
    """Whether ``mod``'s weight takes low-rank directions applied inside the layer: its type is
    exactly ``nn.Linear``, or exactly ``nn.Conv2d`` with ``groups == 1`` and ``padding_mode ==
    "zeros"``.

    Exact types only: subclasses may use their weight without calling forward
    (``nn.MultiheadAttention``'s out_proj is read by ``F.multi_head_attention_forward``).
    A grouped convolution's weight is a block-diagonal matrix (a dense-in-the-blocks V would
    not be one), and other padding modes pad the input before a padding-0 convolution.
    """
    if type(mod) is nn.Linear:
        return True
    return type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"


def lowrank_modules(model: nn.Module, names: list[str]) -> dict[int, nn.Module]:
    """``{index in names: module}`` for each name that is the weight of exactly one
    :func:`lowrank_eligible` module (an ``nn.Linear`` or a plain ``nn.Conv2d``)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    out = {}
    for i, name in enumerate(names):
        prefix, _, leaf = name.rpartition(".")
        mod = modules.get(prefix)
        if leaf == "weight" and mod is not None and lowrank_eligible(mod) and owners.get(id(mod.weight)) == 1:
            out[i] = mod
    return out


def _patched(modules: dict[nn.Module, Callable[..., torch.Tensor]], model: nn.Module):
    """Instance-level forwards for the block; afterwards every patched layer must have run
    (a layer whose weight is used some other way would silently miss its perturbation)."""
    return patched_forwards(modules, model, lambda names: (
        f"low-rank directions (rank=...) perturb an nn.Linear/nn.Conv2d weight inside the layer's forward, but the "
        f"forward of {names} never ran: its weight is used some other way. Use rank=\"full\" "
        f"(dense directions) for this model."))


def draw_factors(weight: torch.Tensor, rank: int, distribution: str,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with V = A Bᵀ a standardised rank-``rank`` direction for ``weight``, read as the
    matrix m × n with m = ``weight.shape[0]`` (output features or channels) and n the rest."""
    m, n = weight.shape[0], weight[0].numel()
    a = directions.sample((m, rank), distribution=distribution, generator=generator, dtype=weight.dtype,
                          device=weight.device)
    b = directions.sample((n, rank), distribution=distribution, generator=generator, dtype=weight.dtype,
                          device=weight.device)
    return a.mul_(1.0 / math.sqrt(rank)), b


# ---------------------------------------------------------------- the layer arithmetic, one place per module type

def _layer(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           groups: int = 1) -> torch.Tensor:
    """The layer's own map with ``weight``: ``F.linear``, or ``F.conv2d`` with the module's stride,
    padding and dilation (``groups`` > 1 only for K directions folded into the channel axis)."""
    if type(mod) is nn.Conv2d:
        return F.conv2d(x, weight, bias, mod.stride, mod.padding, mod.dilation, groups)
    return F.linear(x, weight, bias)


def _bias_shaped(mod: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A bias (…, m) shaped to broadcast over the layer's output: as is for Linear, (…, m, 1, 1)
    for Conv2d (channels before height and width)."""
    return v[..., None, None] if type(mod) is nn.Conv2d else v


def weight_term(mod: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """V x for the direction V = A Bᵀ of ``mod``'s weight on the layer input x (no bias); V is never built.

    * ``nn.Linear``: (x B) Aᵀ, an O(batch·r·(m + n)) product.
    * ``nn.Conv2d``: Σ_l A[:, l] ⊗ conv(x, B[:, l] as a filter), as :func:`weight_terms` with K = 1;
      x is (batch, C, H, W) or unbatched (C, H, W), like the layer's own input.
    """
    if type(mod) is nn.Conv2d:
        batched = x.dim() == 4
        out = weight_terms(mod, x if batched else x.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0))[0]
        return out if batched else out.squeeze(0)
    return (x @ b) @ a.T


def add_weight_term(mod: nn.Module, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha·V x`` in place (``out``: a fresh, contiguous layer output) and return it: for
    ``nn.Linear`` one ``addmm`` (with ``out=``, which ``FlopCounterMode`` counts; it does not count
    ``addmm_``) of the (x B) features against Aᵀ, so the (batch, m) term is never allocated (the
    allocation and its first touch cost about as much as the add); other layers add
    :func:`weight_term`."""
    if type(mod) is nn.Linear and out.is_contiguous():
        flat = out.view(-1, out.shape[-1])
        torch.addmm(flat, (x @ b).reshape(-1, b.shape[-1]), a.T, alpha=alpha, out=flat)
        return out
    return out.add_(weight_term(mod, x, a, b), alpha=alpha)


def weight_terms(mod: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                 add_to: torch.Tensor | None = None) -> torch.Tensor:
    """V_k x_k for K directions at once: A (K, m, r), B (K, n, r); x is the shared layer input
    (batch, ...) or one input per direction (K, batch, ...). Returns (K, batch, ...).

    Two steps, :func:`_factor_features` (x against every B_k) then :func:`_mix` (each A_k).
    ``nn.Conv2d`` (weight m × C × kh × kw, n = C·kh·kw): column l of B_k, reshaped to a
    (1, C, kh, kw) filter, is one output channel of a convolution with the layer's own stride,
    padding and dilation, so all K·r filters are one convolution, u = conv(x, [B_1 … B_K]),
    (batch, K·r, H', W'); with one input per direction it is a grouped convolution (the K inputs
    stacked on the channel axis, groups = K). Then the channel mix V_k x = A_k u_k is one batched
    matmul over the H'·W' pixels. Cost: 2·batch·H'W'·K·r·(n + m) FLOPs, r/m of the layer's own
    2·batch·H'W'·m·n per direction (plus the mix). The result is channels-last per sample
    (``torch.channels_last``) where the layer's own output would be, or where ``add_to`` is.

    ``add_to``: a (K, batch, ...) tensor, contiguous or channels-last per sample, to add the result
    into, in place, and return (``baddbmm`` with ``out=``, which ``FlopCounterMode`` counts): no
    new activation-sized buffer, whose first touch (page faults) costs more than the mix itself.
    """
    return _mix(mod, _factor_features(mod, x, b), a, add_to=add_to)


def _factor_features(mod: nn.Module, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer input against every B_k (B: (K, n, r)): Linear (K, batch, r) = x B_k;
    Conv2d (batch, K·r, H', W') = conv(x, [B_1 … B_K] as K·r filters), channel k·r + l
    from column l of B_k (a grouped convolution for one input per direction, (K, batch, …))."""
    k, n, r = b.shape
    if type(mod) is nn.Conv2d:
        filters = b.transpose(1, 2).reshape(k * r, *mod.weight.shape[1:])
        if x.dim() == 4:  # shared input
            return _layer(mod, x, filters)
        # (K, batch, C, H, W) → (batch, K·C, H, W): direction k's channels are group k
        return _layer(mod, x.transpose(0, 1).flatten(1, 2), filters, groups=k)
    if x.dim() == 2:  # shared input: (batch, n) @ (n, K·r)
        return (x @ b.permute(1, 0, 2).reshape(n, k * r)).view(x.shape[0], k, r).transpose(0, 1)
    return torch.bmm(b.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)  # ~3x faster than bmm(x, b) on CPU


def _mix(mod: nn.Module, features: torch.Tensor, a: torch.Tensor, *,
         add_to: torch.Tensor | None = None) -> torch.Tensor:
    """V_k x = A_k (x B_k) from :func:`_factor_features` and A (K, m, r), as one bmm: a new
    (K, batch, ...) tensor, or added into ``add_to`` in place (see :func:`weight_terms`)."""
    k, m, r = a.shape
    if type(mod) is nn.Conv2d:
        batch, _, h, w = features.shape
        shape = (k, batch, m, h, w)
        a_rows = a.unsqueeze(1).expand(k, batch, m, r).reshape(k * batch, m, r)  # A_k per (direction, sample)
        u_rows = features.reshape(batch, k, r, h * w).transpose(0, 1).reshape(k * batch, r, h * w)
        if add_to is not None:
            channels_last = _channels_innermost(add_to)
        else:  # where the layer's own output is channels-last (torch: where its input or weight is)
            channels_last = _channels_innermost(features) or _channels_innermost(mod.weight)
        if channels_last:  # (K·batch, H'W', m) = u_rowsᵀ A_kᵀ
            lhs, rhs = u_rows.transpose(1, 2), a_rows.transpose(1, 2)
            fold, unfold = (lambda t: t.movedim(-3, -1)), (lambda t: t.view(k, batch, h, w, m).movedim(-1, -3))
        else:  # (K·batch, m, H'W') = A_k u_rows
            lhs, rhs = a_rows, u_rows
            fold, unfold = (lambda t: t), (lambda t: t.view(shape))
    elif r == 1:  # a rank-1 Linear term is an outer product: elementwise (a bmm with inner size 1 is ~10x slower)
        outer = a.transpose(1, 2)  # (K, 1, m) against features (K, batch, 1)
        return features * outer if add_to is None else add_to.addcmul_(features, outer)
    else:  # (K, batch, r) (K, r, m)
        lhs, rhs = features, a.transpose(1, 2)
        shape = (k, features.shape[1], m)
        fold = unfold = lambda t: t  # noqa: E731
    if add_to is None:
        return unfold(torch.bmm(lhs, rhs))
    acc = fold(add_to) if add_to.shape == shape else None
    if acc is None or not acc.is_contiguous():
        raise ValueError(f"add_to must be a contiguous (or, for Conv2d, channels-last) tensor of shape {shape}, "
                         f"got shape {tuple(add_to.shape)} and strides {add_to.stride()}")
    acc = acc.view(lhs.shape[0], lhs.shape[1], rhs.shape[2])
    torch.baddbmm(acc, lhs, rhs, out=acc)
    return add_to


def _channels_innermost(t: torch.Tensor) -> bool:
    """Whether t (…, C, H, W) stores its channels innermost (``torch.channels_last``, also for a
    slice of channels); a tensor that is both (C = 1) counts as contiguous."""
    return t.dim() >= 3 and t.shape[-3] > 1 and t.stride(-3) == 1 and t.stride(-1) > 1


def _gather_pooled(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The tangent t (K, batch, C, H, W) at ``max_pool2d``'s argmax indices idx (batch, C, H', W'),
    each the flat position h·W + w of its window's maximum in its input plane, for all K at once.

    The layout of t is kept: a contiguous t gathers along its H·W axis; a channels-last t gathers
    whole rows of C channels along its pixel axis (a strided gather along H·W is ~3x slower)."""
    k = t.shape[0]
    if _channels_innermost(t):
        index = idx.movedim(-3, -1).flatten(-3, -2)  # (batch, H'W', C)
        out = t.movedim(-3, -1).flatten(-3, -2).gather(-2, index.expand(k, *index.shape))
        return out.view(k, *idx.shape[:-3], *idx.shape[-2:], idx.shape[-3]).movedim(-1, -3)
    index = idx.flatten(-2)  # (batch, C, H'W')
    return t.flatten(-2).gather(-1, index.expand(k, *index.shape)).view(k, *idx.shape)


def _tangent_buffer(k: int, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised (K, *like.shape) tangent on ``device``, each sample in the memory format of
    ``like`` (a channels-last primal gets channels-last tangents, whose convolutions oneDNN runs
    about twice as fast as contiguous ones on this CPU)."""
    if like.dim() == 4 and _channels_innermost(like):
        n, c, h, w = like.shape
        return torch.empty((k, n, h, w, c), dtype=like.dtype, device=device).movedim(-1, -3)
    return torch.empty((k, *like.shape), dtype=like.dtype, device=device)


def weight_apply(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """W t (no bias) for a tensor with a leading direction axis (K, batch, ...): the K directions
    folded into the batch, one GEMM (Linear) or one convolution (Conv2d) of K·batch inputs.

    Out of place (``mm``/``convolution``, not ``addmm_``): ``FlopCounterMode`` does not count
    in-place matmuls, and every FLOP must be counted.
    """
    return _layer(mod, t.flatten(0, 1), mod.weight).unflatten(0, t.shape[:2])


def perturbed(shifts: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, float]],
              model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, each layer computes (W + s·A Bᵀ)x + b without writing W.

    * Linear: its own forward Wx + b plus s·(x B) Aᵀ (:func:`weight_term`), O(batch·r·(m + n))
      instead of an m × n temporary.
    * Conv2d: ``F.conv2d`` (the module's stride, padding and dilation) with the temporary weight
      W + s·A Bᵀ, one out-of-place ``addmm`` of 2·m·n·r FLOPs. A convolution reuses its weight
      at each of the H'·W' output pixels, so the m·n temporary (37k values for a 64→64 3x3
      conv) is far cheaper than the activation-sized s·Vx, which needs an extra r-channel
      convolution (measured at 13–26% of the layer's own time with oneDNN on this CPU, not r/m)
      and a batch × m × H'W' channel mix.
    """

    def make(mod: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
        if type(mod) is nn.Conv2d:
            def forward(x: torch.Tensor) -> torch.Tensor:
                w = torch.addmm(mod.weight.reshape(mod.weight.shape[0], -1), a, b.T, alpha=scale)
                return _layer(mod, x, w.view(mod.weight.shape), mod.bias)

            return forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = type(mod).forward(mod, x)  # the class's forward, not this instance-level patch
            return add_weight_term(mod, out, x, a, b, alpha=scale)  # in place: no third activation-sized buffer

        return forward

    return _patched({mod: make(mod, a, b, scale) for mod, (a, b, scale) in shifts.items()}, model)


def write_gradient(weight: torch.Tensor, weights: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``weight.grad`` ← Σ_k w_k A_k B_kᵀ, as one matmul [A_1 … A_K] diag(w ⊗ 1_r) [B_1 … B_K]ᵀ
    written straight into an existing gradient buffer (no m × n temporary)."""
    if len(factors) == 1:  # one direction: no concatenation
        (a, b), = factors
        a = a * weights.to(a.dtype).reshape(())
    else:
        a = torch.cat([f[0] for f in factors], dim=1)
        b = torch.cat([f[1] for f in factors], dim=1)
        a = a * weights.to(a.dtype).repeat_interleave(factors[0][0].shape[1])
    g = weight.grad
    # rank 1 in total: the outer product a bᵀ elementwise (each entry one product, as the matmul's,
    # so bit-identical), about twice as fast as a GEMM with inner dimension 1 on this CPU
    outer = a.shape[1] == 1
    if g is not None and g.shape == weight.shape and g.dtype == weight.dtype and g.is_contiguous():
        gm = g.view(a.shape[0], -1)
        torch.mul(a, b.T, out=gm) if outer else torch.mm(a, b.T, out=gm)
    else:
        weight.grad = (a * b.T if outer else a @ b.T).view(weight.shape)


def add_lowrank_(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """W ← W + α·A Bᵀ in place, W read as the matrix m × n (a conv weight too): one ``addmm_``
    on a contiguous weight (no m × n temporary); a channels-last conv weight (small) gets the
    update through a temporary."""
    if weight.is_contiguous():
        weight.view(a.shape[0], -1).addmm_(a, b.T, alpha=alpha)
    else:
        weight.add_((a @ b.T).view(weight.shape), alpha=alpha)


def with_tangents(tangents: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
                  model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within a ``forward_ad.dual_level``, each layer's weight has tangent A Bᵀ.

    The layer's output tangent is W ẋ + (A Bᵀ)x + ḃ, the middle term computed on the
    primal input by :func:`weight_term`; the weight itself stays a plain tensor (no m × n
    tangent exists). Primal and tangent are computed separately: torch's own jvp of a matmul
    whose weight has no tangent still spends a second matmul on it (3F instead of 2F,
    measured with ``FlopCounterMode``), so the rule is written out.
    """
    def make(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Callable[..., torch.Tensor]:
        return lambda x: dual_layer(mod, x, mod.weight, (a, b))

    return _patched({mod: make(mod, a, b) for mod, (a, b) in tangents.items()}, model)


def dual_layer(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor,
               factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The layer on a possibly dual input, primal and tangent computed apart:
    (W x + b, W ẋ + V x + ḃ), with V = A Bᵀ for ``factors`` (A, B) and V = 0 without; ``weight``
    is the plain W, ``mod.bias`` may be dual. Terms whose tangent is absent are skipped (no
    input tangent: no W ẋ); with no tangent at all the output is plain.

    The tangent starts as W ẋ and the rest is added into it in place (V x by
    :func:`add_weight_term`): one activation-sized buffer.
    """
    from torch.autograd import forward_ad as fwAD  # noqa: PLC0415

    xp, xt = fwAD.unpack_dual(x)
    bias_p, bias_t = fwAD.unpack_dual(mod.bias) if mod.bias is not None else (None, None)
    y = _layer(mod, xp, weight, bias_p)
    t = _layer(mod, xt, weight) if xt is not None else None
    if factors is not None:
        a, b = factors
        t = weight_term(mod, xp, a, b) if t is None else add_weight_term(mod, t, xp, a, b)
    if bias_t is not None:
        t = (torch.zeros_like(y) if t is None else t).add_(_bias_shaped(mod, bias_t))
    return y if t is None else fwAD.make_dual(y, t)


def frozen_layer_tangents(model: nn.Module, skip: Iterable[nn.Module] = ()) -> contextlib.AbstractContextManager[None]:
    """Within a ``forward_ad.dual_level``, every Linear/Conv2d of ``model`` (``lowrank_eligible``,
    hook-free, not in ``skip``) whose weight carries no tangent maps a dual input (x, ẋ) to
    (W x + b, W ẋ + ḃ), primal and tangent computed separately (:func:`dual_layer`).

    torch's own jvp of ``addmm`` / ``conv2d`` spends a second matmul of the full size on the
    weight's absent tangent (3F instead of 2F: a frozen 1536 × 384 layer on 1024 tokens took
    19–23 ms under forward AD against 11 ms for the two matmuls written out). These are the
    frozen layers of LoRA or head-only fine-tuning, where the tangent flows through every
    frozen weight. A weight that does carry a tangent (a dense direction) falls back to
    torch's rule at call time; a layer whose forward never runs is simply not used.
    """
    from torch.autograd import forward_ad as fwAD  # noqa: PLC0415

    skipped = {id(m) for m in skip}

    def make(mod: nn.Module) -> Callable[..., torch.Tensor]:
        own = type(mod).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, weight_tangent = fwAD.unpack_dual(mod.weight)
            if weight_tangent is not None or not isinstance(x, torch.Tensor):
                return own(mod, x)
            return dual_layer(mod, x, weight)

        return forward

    layers = [m for m in model.modules() if lowrank_eligible(m) and id(m) not in skipped
              and "forward" not in m.__dict__ and not _models.has_hooks(m)]
    return patched_forwards({mod: make(mod) for mod in layers}, model, never_ran=None)


# --------------------------------------------------------------------------- K tangents in one pass

CHAIN_TYPES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)


def tangent_chain(model: nn.Module) -> list[nn.Module] | None:
    """The modules of ``model`` if :func:`chain_directional_derivatives` can carry K tangents through
    it (``_models.sequential_modules``: a plain, hook-free ``nn.Sequential``) of exactly Linear,
    Conv2d, ReLU, MaxPool2d and Flatten modules (an MLP such as seed 002's NN, or its MNIST CNN),
    else None.

    Every Linear/Conv2d must be :func:`lowrank_eligible` (no grouped or non-zero-padded
    convolution) and no MaxPool2d may return its indices (its output would be a tuple).
    """
    return _models.sequential_modules(model, _carries_tangents)


def _carries_tangents(m: nn.Module) -> bool:
    if type(m) not in CHAIN_TYPES:
        return False
    if type(m) in (nn.Linear, nn.Conv2d):
        return lowrank_eligible(m)
    return not (type(m) is nn.MaxPool2d and m.return_indices)


def chain_flops(chain: list[nn.Module], input_shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """``(F, T)``: the analytic FLOPs of :func:`chain_directional_derivatives` are F + K·T.

    Counted as ``FlopCounterMode`` counts (2 FLOPs per multiply-accumulate of a matmul or
    convolution; elementwise ops, the max-pool gather and the loss head are not counted). For a
    layer with weight m × n (n = C·kh·kw for a convolution), batch B and P output positions per
    sample (1 for a Linear, H'·W' for a Conv2d):

    * F, the primal: 2·B·P·m·n per layer;
    * T, per tangent: W ẋ, 2·B·P·m·n, for every layer whose input carries a tangent (all but a
      leading Linear/Conv2d), plus the low-rank term Vx = A(Bᵀx), 2·B·P·r·(n + m), for each
      (for a rank-1 Linear the A(·) half is an elementwise outer product, which the counter does
      not see: 2·B·r·n counted).

    ``input_shape`` includes the batch. With ``rank`` r the weights of every layer are assumed
    to have rank-r directions (as ``forward_gradient`` draws them).
    """
    x = torch.empty(input_shape, device="meta")
    primal = tangent = 0
    carries = False
    for mod in chain:
        if type(mod) in (nn.Linear, nn.Conv2d):  # shapes only: the layer on meta tensors
            x = _layer(mod, x, torch.empty_like(mod.weight, device="meta"))
            m, n = mod.weight.shape[0], mod.weight[0].numel()
            rows = x.numel() // m  # B·P
            primal += 2 * rows * m * n
            mix = 0 if type(mod) is nn.Linear and rank == 1 else 2 * rows * rank * m  # see _mix
            tangent += 2 * rows * rank * n + mix + (2 * rows * m * n if carries else 0)
            carries = True
        else:
            x = mod(x)
    return primal, tangent


# The chain pass does not apply: the closure used the parameters outside the model's forward or
# ran the model other than once, or a layer got an unbatched input. The one signal of every engine.
NotAChainLoss = _models.DoesNotApply


# The K tangents are carried in chunks of directions whose largest tangent stays below this
# many bytes. That bounds the step's memory: seed 002's CNN at K = 16 carries 2 directions at a
# time (25.6 MB tangents; the step peaks at 109 MB, backprop's at 74 MB, bench/step_cost.py)
# instead of all 16 (205 MB tangents, a conv's input and output both live: 437 MB). It is also
# faster (about 600 vs 720 ms here): glibc serves buffers above 32 MiB with fresh mmap pages,
# whose first touch (page faults) is expensive on this machine, while smaller ones are
# recycled. The MLP's 16 tangents (4 MB) go in one chunk.
CHUNK_BYTES = 32 << 20


def chain_directional_derivatives(
    model: nn.Sequential,
    chain: list[nn.Module],
    closure: Callable[[], torch.Tensor],
    weight_factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
    bias_tangents: dict[nn.Module, torch.Tensor],
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d)`` with d_k = ∇f·v_k for K directions from ONE primal forward pass.

    Each Linear/Conv2d weight has K tangents A_k B_kᵀ (``weight_factors[mod] = (A, B)``
    with A (K, m, r), B (K, n, r)) and its bias K dense tangents (K, m); a layer missing
    from ``weight_factors`` (a frozen weight) has no weight tangent. Beside the primal, a
    (K, batch, ·) tangent goes through the jvp rule of each module:

        Linear/Conv2d:  ṡ_k = W ẋ_k + V_k x + ḃ_k    (V_k x as in :func:`weight_terms`),
        ReLU:           ẋ_k = 1[s > 0] ṡ_k,
        MaxPool2d:      ẋ_k = ṡ_k at the argmax of each window (the primal's indices),
        Flatten:        the same reshape behind the K axis.

    The primal runs once, inside the closure, and keeps what the rules need: each layer's
    input against every B_k (:func:`_factor_features`, one matmul or one K·r-filter
    convolution), the ReLU masks and the pooling indices (``return_indices=True``: torch's own
    jvp of ``max_pool2d_with_indices`` gathers at them, so ties go to the same element). The
    model's output z is handed to the closure as a fresh autograd leaf, and the loss's
    gradient G = ∂L/∂z (the loss head only) gives d_k = Σ G·ż_k, the exact jvp. Then the
    tangents run through the recorded chain in chunks of directions (at most ``chunk_bytes``
    for the largest tangent), the products W ẋ_k of a chunk as one GEMM or one convolution of
    chunk·batch inputs (a leading layer's input has no tangent, so it costs nothing there).
    FLOPs: F + K·T, :func:`chain_flops`, for any chunking.

    If the loss also depends on the parameters some other way (e.g. a penalty in the
    closure), or the closure calls the model other than once, :class:`NotAChainLoss` is
    raised and the caller falls back to one forward-mode pass per direction.
    """
    counts = {a.shape[0] for a, _ in weight_factors.values()} | {t.shape[0] for t in bias_tangents.values()}
    if len(counts) != 1:
        raise ValueError(f"every weight and bias needs the same number K of tangents, got {sorted(counts)}")
    k = counts.pop()
    state: dict[str, object] = {"calls": 0}

    def forward(inp: torch.Tensor) -> torch.Tensor:
        state["calls"] = int(state["calls"]) + 1  # type: ignore[arg-type]
        state["record"], out = _record_primal(chain, inp, weight_factors)
        state["leaf"], handed = output_leaf(out)
        return handed

    if "forward" in model.__dict__:
        raise NotAChainLoss
    model.forward = forward
    try:
        with torch.enable_grad():
            loss = closure()
    finally:
        del model.forward
    if state["calls"] != 1 or not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise NotAChainLoss
    params = [p for p in model.parameters() if p.requires_grad]
    g_out = loss_gradient_at_output(loss, state["leaf"], params)  # type: ignore[arg-type]
    record, largest = state["record"]  # type: ignore[misc]
    if g_out is None or not any(mod in weight_factors or mod in bias_tangents for mod, _ in record):
        raise NotAChainLoss
    step = max(1, chunk_bytes // largest)
    with torch.no_grad():
        d = torch.cat([(_tangent_chunk(record, weight_factors, bias_tangents, start, min(start + step, k)) * g_out)
                       .flatten(1).sum(1) for start in range(0, k, step)])
    return loss.detach().reshape(()), d


def _record_primal(chain: list[nn.Module], x: torch.Tensor,
                   weight_factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]):
    """The primal pass of :func:`chain_directional_derivatives`: ``((record, largest), output)``.

    ``record`` holds ``(module, what its tangent rule needs)`` in order: a Linear/Conv2d's input
    against every B_k (or None) and an empty stand-in with its output's shape and strides, a
    ReLU's mask 1[s > 0], a MaxPool2d's argmax indices, a Flatten's nothing; ``largest`` is the
    size in bytes of one direction's largest tangent.
    """
    record, largest = [], 0
    with torch.no_grad():
        h = x
        for mod in chain:
            kind = type(mod)
            if kind is nn.Linear or kind is nn.Conv2d:
                if h.dim() != (2 if kind is nn.Linear else 4):  # batched inputs only
                    raise NotAChainLoss
                features = _factor_features(mod, h, weight_factors[mod][1]) if mod in weight_factors else None
                h = _layer(mod, h, mod.weight, mod.bias)
                stand_in = torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device="meta")
                record.append((mod, (features, stand_in)))
            elif kind is nn.MaxPool2d:
                h, idx = F.max_pool2d(h, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                      ceil_mode=mod.ceil_mode, return_indices=True)
                record.append((mod, idx))
            elif kind is nn.ReLU:  # the mask in the activation's dtype: a bool mask multiplies ~1.5x slower
                record.append((mod, (h > 0).to(h.dtype)))
                h = torch.relu(h)
            else:  # Flatten
                record.append((mod, None))
                h = mod(h)
            largest = max(largest, h.numel() * h.element_size())
    return (record, largest), h


def _tangent_chunk(record, weight_factors, bias_tangents, start: int, stop: int) -> torch.Tensor:
    """The output tangents ż_k, (stop − start, batch, …), of directions start … stop − 1, through
    the recorded chain (see :func:`chain_directional_derivatives`). All in place on our own
    buffers, except the products W ẋ_k, which ``FlopCounterMode`` must see."""
    k = stop - start
    ht = None
    for mod, saved in record:
        kind = type(mod)
        if kind is nn.Linear or kind is nn.Conv2d:
            features, out = saved
            # W ẋ_k for the chunk at once: one (chunk·batch × n)(n × m) GEMM or one convolution
            t = weight_apply(mod, ht) if ht is not None else None
            if features is not None:  # + A_k (B_kᵀ x), added into t in place
                a = weight_factors[mod][0][start:stop]
                r = a.shape[2]
                features = features[:, start * r:stop * r] if kind is nn.Conv2d else features[start:stop]
                t = _mix(mod, features, a, add_to=t)
            if mod in bias_tangents:
                bt = _bias_shaped(mod, bias_tangents[mod][start:stop]).unsqueeze(1)  # (k, 1, m[, 1, 1])
                t = t.add_(bt) if t is not None else _tangent_buffer(k, out, bt.device).copy_(bt.expand(k, *out.shape))
            ht = t  # None only if this layer's input and parameters have no tangent
        elif kind is nn.MaxPool2d:
            ht = _gather_pooled(ht, saved) if ht is not None else None
        elif kind is nn.ReLU:
            ht = ht.mul_(saved) if ht is not None else None
        elif ht is not None:  # Flatten: the tangent has the K axis in front (negative dims stay)
            ht = ht.flatten(*(d + 1 if d >= 0 else d for d in (mod.start_dim, mod.end_dim)))
    return ht
