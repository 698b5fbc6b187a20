"""Reference architectures by name.

::

    from bpfree import models
    model = models.make("mlp", input_shape=(1, 28, 28), num_classes=10, seed=0)
    models.count_parameters(model)          # 1863690

==============  =====================================================  ==========
name            architecture (default options)                         source
==============  =====================================================  ==========
``logreg``      flatten + Linear                                        Baydin 2022
``mlp``         flatten, Linear+ReLU per ``hidden=(1024, 1024)``, out   seed 002
``cnn_mnist``   4 conv3x3(64)+ReLU, pool after 2 and 4, dense 1024, out seed 002
``vgg_cifar``   VGG blocks 64/128/256 (2 conv3x3 + pool), dense 4096    seed 002
``mlp_mnist1d`` 40 → ``depth=3`` x ``width=128`` ReLU → 10               seed 001
==============  =====================================================  ==========

All are flat ``nn.Sequential`` models returning logits, with PyTorch's default
initialisation (see :mod:`bpfree.models.architectures`).

Pretrained transformers (local directories, never hub names; ``transformers``
and ``peft`` are imported only when one is built):

==============  =====================================================  ==========
``hf``          any local HF classifier or causal LM; full, LoRA, head  seed 000
``minilm``      ``hf`` with its default path: MiniLM-L6 (the wheel)      seed 000
``vqa_fusion``  trained CNN + MiniLM (LoRA) → easy-VQA's 13 answers      —
==============  =====================================================  ==========

See :mod:`bpfree.models.hf` and :mod:`bpfree.models.vqa`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from bpfree.models.architectures import REGISTRY
from bpfree.models.hf import attention_for, build_hf
from bpfree.models.vqa import build_vqa_fusion

__all__ = ["HF_MODELS", "available", "count_parameters", "link_options", "make", "option_defaults", "option_names",
           "option_types"]

HF_MODELS = {"hf": build_hf, "minilm": build_hf, "vqa_fusion": build_vqa_fusion}
for _name, _builder in HF_MODELS.items():
    REGISTRY.register(_name, _builder)


def link_options(
    data_name: str, data_options: dict[str, Any], model_name: str, model_options: dict[str, Any], estimator: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options that depend on the other tables, filled in by ``bpfree.config.resolve``.

    * a HF model's ``attention = "auto"`` becomes ``"eager"`` for forward-mode
      estimators and ``"sdpa"`` otherwise (:func:`bpfree.models.hf.attention_for`);
    * a text data set's ``tokenizer = "model"`` becomes the HF model's ``path``, so
      the data is tokenised by the model's own tokenizer.
    """
    data_options, model_options = dict(data_options), dict(model_options)
    if model_name in HF_MODELS:
        if model_options.get("attention") == "auto":
            model_options["attention"] = attention_for(estimator)
        if data_options.get("tokenizer") == "model":
            data_options["tokenizer"] = model_options.get("path", "minilm")
    return data_options, model_options


def available() -> list[str]:
    """Names :func:`make` accepts, sorted."""
    return REGISTRY.available()


def option_names(name: str) -> list[str]:
    """The architecture options ``make(name, ...)`` accepts (e.g. ``hidden`` for ``mlp``)."""
    return REGISTRY.option_names(name)


def option_defaults(name: str) -> dict[str, Any]:
    """``{option: default}`` of model ``name``'s options."""
    return REGISTRY.option_defaults(name)


def option_types(name: str) -> dict[str, Any]:
    """``{option: annotation}`` of model ``name``'s annotated options (for config checks)."""
    return REGISTRY.option_types(name)


def make(
    name: str, *, input_shape: Sequence[int], num_classes: int, seed: int | None = None, **options: Any
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (without batch) and ``num_classes`` outputs.

    ``seed``: when given, the initial weights come from ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so they are reproducible and the global
    RNG is left as it was; when ``None`` they come from the global RNG, as
    for any ``nn.Module``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones),
            or an input shape the architecture cannot take.
    """
    builder = REGISTRY.get(name)
    REGISTRY.check_options(name, options)
    input_shape = tuple(int(d) for d in input_shape)
    if seed is None:
        return builder(input_shape, int(num_classes), **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(input_shape, int(num_classes), **options)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` unless ``trainable_only=False``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
