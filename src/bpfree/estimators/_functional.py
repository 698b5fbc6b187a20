"""Running a user's closure with substituted parameters, and explaining failures.

The closure contract (``closure()`` runs ``model`` and returns the loss) lets
an estimator evaluate the loss at other parameter values without touching the
stored parameters: :func:`substituted` swaps tensors into the module for the
duration of a call, exactly as ``torch.func.functional_call`` does.

Estimators that propagate tangents themselves (the batched K-tangent pass,
guessed gradients) hand the closure the model's output as a fresh autograd
leaf (:func:`output_leaf`) and read the directional derivative off
∂L/∂z · ż (:func:`loss_gradient_at_output`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn
from torch.nn.utils import stateless

from bpfree.estimators.base import Closure

T = TypeVar("T")


class UnsupportedModelError(RuntimeError):
    """The model uses something the estimator cannot differentiate through.

    The message names the module and op and says how to work around it.
    """


def output_leaf(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, handed)``: a detached copy z of a model output that requires grad, and a view of
    it to hand to the rest of the closure.

    Gradients are taken with respect to the leaf; the view is what module hooks
    see (``autograd.grad`` refuses a leaf input that FlopCounterMode's module
    tracker registered a hook on).
    """
    leaf = output.detach().requires_grad_(True)
    return leaf, leaf.view_as(leaf)


def loss_gradient_at_output(loss: torch.Tensor, leaf: torch.Tensor,
                            params: list[torch.Tensor]) -> torch.Tensor | None:
    """∂L/∂z at the output leaf, or None when the loss also uses ``params`` directly.

    A penalty on the parameters inside the closure is invisible to a tangent
    carried through the model's output, so then ż · ∂L/∂z is not the
    directional derivative and the caller must not use it. Also None when the
    loss does not depend on z.
    """
    g_out, *direct = torch.autograd.grad(loss, [leaf, *params], allow_unused=True)
    return None if any(g is not None for g in direct) else g_out


@contextlib.contextmanager
def substituted(model: nn.Module, names: list[str], tensors: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s parameters ``names`` are ``tensors``.

    The stored ``nn.Parameter`` objects are untouched and restored on exit.
    """
    with stateless._reparametrize_module(model, dict(zip(names, tensors, strict=True))):
        yield


@contextlib.contextmanager
def patched_forwards(forwards: dict[nn.Module, Callable[..., torch.Tensor]], model: nn.Module,
                     never_ran: Callable[[str], str] | None) -> Iterator[None]:
    """Instance-level forwards ``forwards[mod]`` for the block; afterwards every patched module
    must have run (unless ``never_ran`` is None: a rule that changes how, not what, a layer
    computes may go unused).

    A module whose forward never ran had its weight used some other way (or not at all), so
    the perturbation patched into it would silently be missing: that is an
    ``UnsupportedModelError`` with ``never_ran(names of those modules)``.
    """
    called: set[int] = set()
    patched = []
    try:
        for mod, fn in forwards.items():
            if "forward" in mod.__dict__:
                raise ValueError(f"{type(mod).__name__} already has an instance-level forward; cannot perturb it")

            def forward(*args, fn=fn, mod=mod, **kwargs) -> torch.Tensor:
                called.add(id(mod))
                return fn(*args, **kwargs)

            mod.forward = forward
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward
    missing = [m for m in forwards if id(m) not in called] if never_ran is not None else []
    if missing:
        names = {m: n for n, m in model.named_modules()}
        raise UnsupportedModelError(never_ran(", ".join(names.get(m, type(m).__name__) for m in missing)))


def functional_loss(model: nn.Module, names: list[str], closure: Closure) -> Callable[..., torch.Tensor]:
    """``f(*tensors) -> loss``: the closure as a pure function of the parameters."""

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        with substituted(model, names, list(tensors)):
            return closure()

    return f


# Known forward-mode gaps (ENVIRONMENT.md, checked on torch 2.13) and their fixes.
_FORWARD_AD_FIXES: list[tuple[str, str]] = [
    (
        "scaled_dot_product",
        "run the closure under `with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):` "
        "(or load Hugging Face models with attn_implementation=\"eager\")",
    ),
    (
        "_transformer_encoder_layer_fwd|_native_multi_head_attention",
        "disable the fused fast path: `torch.backends.mha.set_fastpath_enabled(False)`",
    ),
    (
        "mkldnn_rnn|lstm|_thnn_fused",
        "run the closure under `with torch.backends.mkldnn.flags(enabled=False):`",
    ),
    (
        "batch_norm|running_mean|running_var",
        "BatchNorm in train mode updates its running statistics in place; use "
        "`track_running_stats=False`, `torch.func.replace_all_batch_norm_modules_(model)`, or eval mode",
    ),
]


def explain_forward_ad_failure(
    error: BaseException, model: nn.Module, rerun: Callable[[], object], estimator: str
) -> UnsupportedModelError | None:
    """Turn a forward-mode AD failure into an :class:`UnsupportedModelError`.

    Returns ``None`` when ``error`` is not a forward-AD coverage problem.
    ``rerun`` repeats the failing computation with module tracking on, to
    name the innermost module that was running when the op failed.
    """
    text = str(error)
    match = re.search(r"forward AD with (\S+)", text)
    is_fwad = match is not None or "forward AD" in text or "forward-mode" in text or "ForwardAD" in text
    if not is_fwad and not isinstance(error, NotImplementedError):
        return None
    op = match.group(1) if match else None
    module = _failing_module(model, rerun)
    fix = next(
        (hint for pattern, hint in _FORWARD_AD_FIXES if re.search(pattern, (op or "") + " " + text, re.I)),
        "replace the op with one that supports forward-mode AD, or train this model with "
        "`backprop` / a zeroth-order estimator (`spsa`, `mezo`), which need no derivatives",
    )
    where = f" in module {module!r}" if module else ""
    what = f"op `{op}`" if op else "an op"
    return UnsupportedModelError(
        f"estimator {estimator!r} needs forward-mode AD, but {what}{where} does not support it "
        f"(torch {torch.__version__}). Fix: {fix}. Original error: {text.splitlines()[0]}"
    )


def _failing_module(model: nn.Module, rerun: Callable[[], object]) -> str | None:
    """``"name (Type)"`` of the innermost module running when ``rerun()`` raises."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []

    def pre(mod: nn.Module, args: object) -> None:
        stack.append(mod)

    def post(mod: nn.Module, args: object, out: object) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        rerun()
    except Exception:  # noqa: BLE001 — we only want to know where it failed
        failed = list(stack)
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return None
    mod = failed[-1]
    return f"{names.get(mod) or '<root>'} ({type(mod).__name__})"
