"""Low-rank directions for the weights of ``nn.Linear`` layers, applied without materialising them.

For a weight W (m × n), the direction is V = A Bᵀ with A (m × r) and B (n × r)
of i.i.d. standardised entries, scaled by 1/√r. Then E[V_ij V_kl] =
(1/r) Σ_l E[A_il A_kl] E[B_jl B_ll'] = δ_ik δ_jl: E[vec V vec Vᵀ] = I, so every
estimator built on "E[v vᵀ] = I" stays unbiased. With Rademacher factors and
r = 1, ‖V‖² = m·n exactly, so the estimate's second moment is exactly that of
dense Rademacher directions, E‖g‖² = N‖∇f‖² (``theory.weight_perturbation_error``).

What changes is the cost: the perturbed layer is
(W + εV)x = Wx + ε A (Bᵀx), an extra O(B·r·(m + n)) instead of touching the
m·n weights, drawing takes r·(m + n) values instead of m·n, and the weights
are never written (so nothing needs restoring). Only the gradient itself,
g_W = Σ_k w_k A_k B_kᵀ, is m × n. (The trick is used by evolution strategies at
scale, e.g. low-rank perturbations in EGGROLL, Sarkar et al. 2025.)

Only the weights of modules whose type is exactly ``nn.Linear``, not shared
with another module, are treated this way; every other parameter gets a dense
direction. A Linear whose forward never runs during the closure (its weight
is used some other way, e.g. ``F.linear(x, layer.weight)``) would miss its
perturbation, so that is an ``UnsupportedModelError`` naming the module and
the fix (``rank="full"``). A weight used both inside and outside its forward
cannot be detected.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.estimators import directions
from bpfree.estimators._functional import UnsupportedModelError, loss_gradient_at_output, output_leaf


def check_rank(rank: object) -> None:
    """``rank`` is an int >= 1 or ``"full"`` (dense directions for every parameter)."""
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f'rank must be an int >= 1 or "full" (dense directions), got {rank!r}')


def lowrank_modules(model: nn.Module, names: list[str]) -> dict[int, nn.Linear]:
    """``{index in names: module}`` for each name that is the weight of exactly one nn.Linear."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    out = {}
    for i, name in enumerate(names):
        prefix, _, leaf = name.rpartition(".")
        mod = modules.get(prefix)
        # exactly nn.Linear: subclasses may use their weight without calling forward
        # (nn.MultiheadAttention's out_proj is read by F.multi_head_attention_forward)
        if leaf == "weight" and type(mod) is nn.Linear and owners.get(id(mod.weight)) == 1:
            out[i] = mod
    return out


@contextlib.contextmanager
def _patched(modules: dict[nn.Linear, Callable[..., torch.Tensor]], model: nn.Module) -> Iterator[None]:
    """Instance-level forwards for the block; afterwards, every patched module must have run.

    A Linear whose forward never ran had its weight used some other way (or not
    at all), so its low-rank perturbation would silently be missing: that is an
    error naming the module.
    """
    called: set[int] = set()
    patched = []
    try:
        for mod, fn in modules.items():
            if "forward" in mod.__dict__:
                raise ValueError(f"{type(mod).__name__} already has an instance-level forward; cannot perturb it")

            def forward(*args: Any, fn=fn, mod=mod, **kwargs: Any) -> torch.Tensor:
                called.add(id(mod))
                return fn(*args, **kwargs)

            mod.forward = forward
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward
    missing = [m for m in modules if id(m) not in called]
    if missing:
        names = {m: n for n, m in model.named_modules()}
        missing = [names.get(m, type(m).__name__) for m in missing]
        raise UnsupportedModelError(
            f"low-rank directions (rank=...) perturb an nn.Linear weight inside the layer's forward, but the "
            f"forward of {', '.join(missing)} never ran: its weight is used some other way. Use rank=\"full\" "
            f"(dense directions) for this model."
        )


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

def weight_term(mod: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """V x for the direction V = A Bᵀ of ``mod``'s weight on the layer input x (no bias):
    for ``nn.Linear`` (x B) Aᵀ, an O(batch·r·(m + n)) product; V is never built."""
    return (x @ b) @ a.T


def weight_terms(mod: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """V_k x_k for K directions at once: A (K, m, r), B (K, n, r); x is the shared layer input
    (batch, ...) or one input per direction (K, batch, ...). Returns (K, batch, ...)."""
    xb = project(mod, x, b)
    if a.shape[-1] == 1:  # an outer product: elementwise (bmm with an inner size of 1 is ~10x slower on CPU)
        return xb * a.transpose(1, 2)
    return torch.bmm(xb, a.transpose(1, 2))


def project(mod: nn.Module, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B_kᵀ x for every direction, the cheap half of V_k x = A_k (B_kᵀ x): (K, batch, r), from a
    shared x (batch, n) or per-direction x (K, batch, n)."""
    k, n, r = b.shape
    if x.dim() == 2:  # shared input: one (batch, n)(n, K·r) GEMM
        return (x @ b.permute(1, 0, 2).reshape(n, k * r)).view(x.shape[0], k, r).transpose(0, 1)
    return torch.bmm(b.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)  # (K, r, n)(K, n, batch): ~3x faster


def add_projected(base: torch.Tensor, mod: nn.Module, xb: torch.Tensor, a: torch.Tensor, scales: torch.Tensor,
                  *, inplace: bool = False) -> torch.Tensor:
    """base_k + s_k A_k xb_k for projections xb = :func:`project` (K, batch, r) and ``scales`` (K,);
    ``base`` may broadcast (e.g. (1, batch, m) shared by every direction). In place into
    ``base`` with ``inplace=True``. Rank 1 adds the outer product without building it."""
    xb = xb * scales.view(-1, 1, 1)
    if a.shape[-1] == 1:
        return base.addcmul_(xb, a.transpose(1, 2)) if inplace else torch.addcmul(base, xb, a.transpose(1, 2))
    return base.baddbmm_(xb, a.transpose(1, 2)) if inplace else torch.baddbmm(base, xb, a.transpose(1, 2))


def add_weight_terms_(out: torch.Tensor, mod: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    """out_k += s_k V_k x_k in place for per-direction inputs x (K, batch, ...); no activation-sized
    temporary. (In-place products are not seen by ``FlopCounterMode``; they are O(batch·r·m), under
    0.2% of the layer's GEMM for r = 1 and widths ≥ 512.)"""
    return add_projected(out, mod, project(mod, x, b), a, scales, inplace=True)


def weight_apply(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """W t (no bias) for a tensor with a leading direction axis (K, batch, ...), as one GEMM.

    Out of place (``addmm``/``mm``, not ``addmm_``): ``FlopCounterMode`` does not count in-place
    matmuls, and every FLOP must be counted.
    """
    return (t.reshape(-1, t.shape[-1]) @ mod.weight.T).view(*t.shape[:-1], mod.weight.shape[0])


def perturbed(shifts: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor, float]],
              model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, each Linear computes (W + s·A Bᵀ)x + b as Wx + b + s·(x B) Aᵀ."""

    def make(mod: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = type(mod).forward(mod, x)  # the class's forward, not this instance-level patch
            return out.add_(weight_term(mod, x, a, b), alpha=scale)  # in place: no third activation-sized buffer

        return forward

    return _patched({mod: make(mod, a, b, scale) for mod, (a, b, scale) in shifts.items()}, model)


def write_gradient(weight: torch.Tensor, weights: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``weight.grad`` ← Σ_k w_k A_k B_kᵀ, as one matmul [A_1 … A_K] diag(w ⊗ 1_r) [B_1 … B_K]ᵀ
    written straight into an existing gradient buffer (no m × n temporary)."""
    a = torch.cat([f[0] for f in factors], dim=1)
    b = torch.cat([f[1] for f in factors], dim=1)
    rank = factors[0][0].shape[1]
    a = a * weights.to(a.dtype).repeat_interleave(rank)
    g = weight.grad
    if g is not None and g.shape == weight.shape and g.dtype == weight.dtype and g.is_contiguous():
        torch.mm(a, b.T, out=g.view(a.shape[0], -1))
    else:
        weight.grad = (a @ b.T).view(weight.shape)


def with_tangents(tangents: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]],
                  model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within a ``forward_ad.dual_level``, each Linear's weight has tangent A Bᵀ.

    The layer's output tangent gains (A Bᵀ)x = A(Bᵀx), computed on the primal
    input; the weight itself stays a plain tensor (no m × n tangent exists).
    Primal and tangent are computed separately: torch's own jvp of a matmul
    whose weight has no tangent still spends a second matmul on it (3F instead
    of 2F, measured with ``FlopCounterMode``), so the rule is written out.
    """
    from torch.autograd import forward_ad as fwAD  # noqa: PLC0415

    def make(mod: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            xp, xt = fwAD.unpack_dual(x)
            bias_p, bias_t = fwAD.unpack_dual(mod.bias) if mod.bias is not None else (None, None)
            y = F.linear(xp, mod.weight, bias_p)
            t = weight_term(mod, xp, a, b)
            if xt is not None:
                t = t + F.linear(xt, mod.weight)
            if bias_t is not None:
                t = t + bias_t
            return fwAD.make_dual(y, t)

        return forward

    return _patched({mod: make(mod, a, b) for mod, (a, b) in tangents.items()}, model)


# --------------------------------------------------------------------------- K tangents in one pass

CHAIN_TYPES = (nn.Linear, nn.ReLU, nn.Flatten)


def linear_relu_chain(model: nn.Module) -> list[nn.Module] | None:
    """The modules of ``model`` if it is a plain ``nn.Sequential`` of exactly Linear, ReLU and
    Flatten modules (an MLP such as seed 002's NN), else None."""
    if type(model) is not nn.Sequential:
        return None
    chain = list(model)
    if not chain or not all(type(m) in CHAIN_TYPES for m in chain):
        return None
    return chain


class NotAChainLoss(Exception):
    """The closure used the parameters outside the model's forward: the chain pass does not apply."""


def chain_directional_derivatives(
    model: nn.Sequential,
    chain: list[nn.Module],
    closure: Callable[[], torch.Tensor],
    weight_factors: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]],
    bias_tangents: dict[nn.Linear, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d)`` with d_k = ∇f·v_k for K directions from ONE forward pass.

    Each Linear's weight has K tangents A_k B_kᵀ (``weight_factors[mod] = (A, B)``
    with A (K, m, r), B (K, n, r)) and its bias K dense tangents (K, m). The
    pass carries a (K, batch, ·) tangent beside the primal:

        ṡ_k = W ẋ_k + A_k (B_kᵀ x) + ḃ_k,     ReLU: ẋ_k = 1[s > 0] ṡ_k,

    so the primal runs once and the K tangent matmuls W ẋ_k are one GEMM
    (the first layer's input has no tangent, so it costs nothing there). The
    model's output z is handed to the closure as a fresh autograd leaf; the
    loss's gradient G = ∂L/∂z (the loss head only) gives d_k = Σ G·ż_k, the
    exact jvp. If the loss also depends on the parameters some other way
    (e.g. a penalty in the closure), :class:`NotAChainLoss` is raised and the
    caller falls back to one forward-mode pass per direction.
    """
    state: dict[str, object] = {"calls": 0}

    def forward(inp: torch.Tensor) -> torch.Tensor:
        state["calls"] = int(state["calls"]) + 1  # type: ignore[arg-type]
        with torch.no_grad():
            h, ht = inp, None
            for mod in chain:
                if type(mod) is nn.Flatten:
                    h = mod(h)
                    if ht is not None:  # the tangent has the K axis in front
                        end = mod.end_dim if mod.end_dim < 0 else mod.end_dim + 1
                        ht = ht.flatten(mod.start_dim + 1, end)
                elif type(mod) is nn.Linear:
                    a, b = weight_factors[mod]
                    if h.dim() != 2:
                        raise NotAChainLoss
                    s = F.linear(h, mod.weight, mod.bias)
                    t = weight_terms(mod, h, a, b)  # (K, batch, m) = A_k (B_kᵀ x)
                    if mod in bias_tangents:
                        t += bias_tangents[mod].unsqueeze(1)
                    if ht is not None:  # W ẋ_k for all K at once: one (K·batch × n)(n × m) GEMM
                        t += weight_apply(mod, ht)
                    h, ht = s, t
                else:  # ReLU
                    ht = ht * (h > 0) if ht is not None else None
                    h = torch.relu(h)
        state["tangent"] = ht
        state["leaf"], handed = output_leaf(h)
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
    tangent = state["tangent"]
    if g_out is None or tangent is None:
        raise NotAChainLoss
    d = (tangent * g_out).flatten(1).sum(1)  # type: ignore[operator]
    return loss.detach().reshape(()), d
