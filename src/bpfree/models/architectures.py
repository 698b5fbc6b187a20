"""The reference architectures of the source papers, as flat ``nn.Sequential`` models.

Every model is one ``nn.Sequential`` of single layers (Linear, Conv2d, ReLU,
MaxPool2d, Flatten), so activation checkpointing can cut it into segments of
consecutive top-level blocks and guess-based estimators can read its
Linear/ReLU structure. The models return logits: softmax lives in the loss
(``F.cross_entropy``), as in seed 002 ("softmax on the output").

Initialisation is PyTorch's default for ``nn.Linear`` and ``nn.Conv2d``
(``kaiming_uniform_(a=√5)``): weights and biases ~ U(−1/√fan_in, 1/√fan_in),
fan_in = in_features or in_channels·kh·kw. The papers do not state theirs;
seed 002 used PyTorch/functorch, whose default this is.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from bpfree._names import Registry


def _numel(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _flatten(input_shape: tuple[int, ...]) -> list[nn.Module]:
    """``[nn.Flatten()]`` for multi-dimensional inputs, nothing for vectors."""
    return [nn.Flatten()] if len(input_shape) > 1 else []


def _image(name: str, input_shape: tuple[int, ...], downsample: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape[1:]) < downsample:
        raise ValueError(
            f"{name} needs input_shape (C, H, W) with H, W >= {downsample}, got {input_shape}"
        )
    return input_shape  # type: ignore[return-value]


def _positive_ints(name: str, option: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{name}: {option} must be positive integers, got {values!r}")
    return values


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Multinomial logistic regression: flatten + one Linear (Baydin et al. 2022's first model)."""
    return nn.Sequential(*_flatten(input_shape), nn.Linear(_numel(input_shape), num_classes))


INITS = ("torch", "kaiming")


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (1024, 1024),
        init: str = "torch") -> nn.Sequential:
    """ReLU MLP: flatten, Linear+ReLU per ``hidden`` width, Linear out.

    Default = seed 002's "NN": 784-1024-1024-10 on MNIST (Baydin et al. 2022's
    architecture): 1,863,690 parameters.

    ``init``: ``"torch"`` (PyTorch's default, see the module docstring) or ``"kaiming"``
    (He et al. 2015): W ~ N(0, 2/fan_in) before each ReLU and N(0, 1/fan_in) for the output
    layer, biases 0. PyTorch's default has Var(W) = 1/(3·fan_in), so each ReLU layer scales
    the activations' second moment by 1/6: after 8 layers the logits carry 6⁻⁸ ≈ 6e-7 of the
    input's, and the directional derivatives forward gradients and zeroth-order methods
    measure vanish with them (backprop with Adam recovers by rescaling; SGD and the
    estimators stay at chance). He's init keeps the second moment constant with depth.
    """
    if init not in INITS:
        raise ValueError(f"mlp: init must be one of {', '.join(INITS)}, got {init!r}")
    layers, d = _flatten(input_shape), _numel(input_shape)
    for h in _positive_ints("mlp", "hidden", hidden):
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    if init == "kaiming":
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        for i, lin in enumerate(linears):
            gain = 2.0 if i < len(linears) - 1 else 1.0
            nn.init.normal_(lin.weight, std=math.sqrt(gain / lin.in_features))
            nn.init.zeros_(lin.bias)
    return nn.Sequential(*layers)


def cnn_mnist(input_shape: tuple[int, ...], num_classes: int, channels: int = 64, hidden: int = 1024) -> nn.Sequential:
    """Seed 002's MNIST CNN (Rike & Førland, §III-A2).

    4 conv layers, ``channels`` (64) filters of 3x3 with zero padding 1, ReLU;
    2x2 max-pool after conv 2 and conv 4; dense ``hidden`` (1024) + ReLU;
    dense ``num_classes``. On (1, 28, 28): 3,333,962 parameters.
    """
    c, h, w = _image("cnn_mnist", input_shape, 4)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(c if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
    flat = channels * (h // 4) * (w // 4)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def vgg_cifar(
    input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (64, 128, 256), hidden: int = 4096
) -> nn.Sequential:
    """Seed 002's CIFAR-10 CNN (Rike & Førland, §III-B; VGG-style, Simonyan & Zisserman 2014).

    Per width in ``channels`` (64, 128, 256) a block of two 3x3 convs with
    padding 1, each + ReLU, then 2x2 max-pool; flatten; dense ``hidden``
    (4096) + ReLU; dense ``num_classes``. On (3, 32, 32): 17,967,690 parameters.
    """
    channels = _positive_ints("vgg_cifar", "channels", channels)
    c, h, w = _image("vgg_cifar", input_shape, 2 ** len(channels))
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        c, h, w = ch, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def mlp_mnist1d(input_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 3) -> nn.Sequential:
    """Seed 001's MNIST-1D MLP (Wang, Markou, Campbell 2025): ``depth`` (3) hidden ReLU layers of ``width``.

    Only ``nn.Linear`` and ``nn.ReLU`` (no Flatten), as the W^T / W-perp
    guesses need; inputs must be vectors, e.g. (40,). Widths 64..512 in the paper.
    """
    if len(input_shape) != 1:
        raise ValueError(f"mlp_mnist1d needs a vector input_shape such as (40,), got {input_shape}")
    _positive_ints("mlp_mnist1d", "width/depth", (width, depth))
    layers: list[nn.Module] = []
    d = input_shape[0]
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, num_classes))


# Every architecture by name (bpfree._names.Registry); bpfree.models adds the HF models.
REGISTRY: Registry = Registry("model", skip=("input_shape", "num_classes"))
for _name, _builder in {"cnn_mnist": cnn_mnist, "logreg": logreg, "mlp": mlp, "mlp_mnist1d": mlp_mnist1d,
                        "vgg_cifar": vgg_cifar}.items():
    REGISTRY.register(_name, _builder)
BUILDERS = REGISTRY.table  # {name: builder}, kept for readers of the plain table
