"""The estimator contract shared by every method.

An :class:`Estimator` is ``loss.backward()`` with a different engine:
``estimate(model, closure, generator=g)`` evaluates ``closure()`` (which runs the
model on the current batch and returns a scalar loss, never calling
``backward()``) as often as the method needs, then **overwrites** ``p.grad`` of
every parameter with ``requires_grad=True`` and leaves the parameter values
bit-for-bit as it found them. Any ``torch.optim`` optimizer then steps as usual.

Options are the fields of a frozen dataclass, so an estimator's repr and
``dataclasses.asdict`` are its full, reproducible configuration.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

Closure = Callable[[], torch.Tensor]


@dataclass
class Estimate:
    """What one call of :meth:`Estimator.estimate` reports.

    Attributes:
        loss: the loss at the unperturbed parameters where the method computes
            it; for central zeroth-order schemes, the mean of the perturbed
            losses (``f(θ) + O(ε²)``), flagged by ``details["loss_is_exact"]``.
        forward_passes: cost of the step in forward-pass equivalents, by the
            usual analytic accounting for matmul-dominated models: a forward
            counts 1, a backward 2 (input and weight gradients), a jvp 1 for
            the primal plus 2 per tangent (dW·x and W·dx). Measured FLOPs
            live in ``bpfree.measure``.
        details: method-specific values, e.g. ``"directional_derivatives"``
            (the K scalars ∇f·v_k that a data-parallel mode shares instead of
            gradients) or ``"seed"`` (the seed MeZO regenerates directions from).
    """

    loss: float
    forward_passes: float
    details: dict[str, Any] = field(default_factory=dict)


class Estimator(abc.ABC):
    """Base class. Subclasses are frozen dataclasses whose fields are options.

    Subclasses implement :meth:`_estimate`; :meth:`estimate` validates the
    model, resolves the generator and enforces the ``p.grad`` contract.
    """

    name: ClassVar[str] = ""

    def estimate(
        self,
        model: nn.Module,
        closure: Closure,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        """Estimate ∇f and write it to ``p.grad`` of every trainable parameter.

        Args:
            model: the module whose trainable parameters are differentiated.
            closure: runs ``model`` on the current batch and returns a scalar
                loss tensor. It may be called several times; it must not call
                ``backward()``.
            generator: the only source of randomness. ``None`` uses the
                estimator's own generator, seeded from its ``seed`` option.
        """
        params = trainable_parameters(model)
        if not params:
            raise ValueError(
                f"{type(model).__name__} has no parameters with requires_grad=True; "
                "nothing to estimate"
            )
        if generator is None:
            generator = self._own_generator(params[0][1].device)
        return self._estimate(model, params, closure, generator)

    @abc.abstractmethod
    def _estimate(
        self,
        model: nn.Module,
        params: list[tuple[str, nn.Parameter]],
        closure: Closure,
        generator: torch.Generator,
    ) -> Estimate:
        """Compute the estimate; ``params`` are ``trainable_parameters(model)``."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """What the estimator will do on ``model`` beyond its options (for the run record's
        ``estimator`` block), e.g. which embedding weights get row-restricted directions and why
        the others fall back to dense. ``{}`` when there is nothing to say."""
        return {}

    def options(self) -> dict[str, Any]:
        """The estimator's options as a plain dict (for run records)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def state_dict(self) -> dict[str, Any]:
        """What the estimator keeps between steps (plain values and tensors), for checkpoints:
        restored with :meth:`load_state_dict`, a resumed run is bit-identical. Stateless: ``{}``.
        (The generator's state is the caller's: save it with ``generator.get_state()``.)"""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a no-op for stateless estimators)."""

    def _own_generator(self, device: torch.device) -> torch.Generator:
        # Lazily created per device; frozen dataclasses need object.__setattr__.
        gens = self.__dict__.get("_generators")
        if gens is None:
            gens = {}
            object.__setattr__(self, "_generators", gens)
        key = str(device)
        if key not in gens:
            gens[key] = torch.Generator(device=device).manual_seed(getattr(self, "seed", 0))
        return gens[key]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad=True``.

    Shared (tied) parameters appear once, as in ``model.named_parameters()``.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def write_gradients(params: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor]) -> None:
    """Overwrite ``p.grad`` with ``g`` for each pair, reusing an existing buffer.

    Same semantics as ``zero_grad(set_to_none=True); loss.backward()``: after
    the call ``p.grad`` holds exactly ``g`` (cast to ``p``'s dtype).
    """
    with torch.no_grad():
        for (_, p), g in zip(params, grads, strict=True):
            g = g.detach()
            if p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype:
                p.grad.copy_(g)
            else:
                # A view into a larger buffer (e.g. a slice of stacked
                # directions) is copied so that it does not keep the buffer alive.
                p.grad = g.to(dtype=p.dtype, copy=g._base is not None)


def check_scalar_loss(loss: Any) -> None:
    """Raise ``ValueError`` unless ``closure()`` returned a one-element tensor."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise ValueError(f"closure() must return a scalar loss tensor, got {type(loss).__name__}{shape}")


def check_positive_int(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
