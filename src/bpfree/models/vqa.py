"""A small vision-language model for the CPU: a trained CNN image encoder + pretrained MiniLM.

No pretrained VLM ships offline, so the easy-VQA stand-in fuses two towers
into an answer classifier over easy-VQA's 13 answers (``bpfree.data.vqa``)::

    image (B, 3, 64, 64) ─ CNN: [conv3x3 → ReLU → maxpool2] per channels (16, 32, 64) → mean → Linear → u (B, d)
    question (B, 2, T)  ─ MiniLM-L6 (HF encoder) → masked mean over tokens → Linear → q (B, d)
    logits = MLP([u ⊙ q, u, q]) → (B, 13)

The image tower and the fusion head are trained from scratch (PyTorch's
default initialisation under ``models.make``'s seed); the text tower is the
pretrained MiniLM, fine-tuned as ``text_finetune`` says: ``"lora"`` (default:
seed 000's r = 1, α = 1, dropout 0.1 on query/value, as for the LLMs),
``"full"`` or ``"frozen"``. The element-wise product u ⊙ q is the classic
VQA fusion (Antol et al. 2015, "VQA: Visual Question Answering"); the two
plain features beside it let the head use either tower alone. Attention,
dtype, layers and dropout options are those of :func:`bpfree.models.hf.build_hf`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bpfree.models.hf import (
    ATTENTION,
    DTYPES,
    QV_NAMES,
    _check_choice,
    _is_forward_ad_sdpa,
    _offline,
    _quiet_transformers,
    _set_dropout,
    batch_seeded_dropout,
    apply_finetune,
    resolve_path,
)

__all__ = ["VQAFusion", "build_vqa_fusion"]


class VQAFusion(nn.Module):
    """Image CNN ⊕ HF text encoder → answer logits (see the module doc)."""

    def __init__(self, image: nn.Module, text: nn.Module, text_dim: int, dim: int, num_classes: int, attention: str):
        super().__init__()
        self.image = image
        self.text = text
        self.text_proj = nn.Linear(text_dim, dim)
        self.head = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))
        self.attention = attention
        self.dropout_seed = int(torch.initial_seed()) % (2**31)
        self._kernel = "sdpa" if attention in ("auto", "sdpa") else "eager"
        self.text.set_attn_implementation(self._kernel)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens[:, 0], tokens[:, 1]
        try:
            h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        except (NotImplementedError, RuntimeError) as e:
            if not _is_forward_ad_sdpa(e) or self._kernel != "sdpa":
                raise
            if self.attention == "sdpa":
                raise ValueError(
                    "model.attention = 'sdpa' cannot run under forward-mode AD; fix: set model.attention = 'eager' "
                    "(or 'auto')"
                ) from None
            self._kernel = "eager"
            self.text.set_attn_implementation("eager")
            h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def forward(self, x) -> torch.Tensor:
        image, tokens = getattr(x, "image", None), getattr(x, "tokens", None)
        if image is None or tokens is None:
            raise ValueError(
                f"vqa_fusion takes image+question batches (bpfree.data.vqa.ImageText) from data 'easyvqa'; "
                f"got {type(x).__name__}"
            )
        dtype = self.text_proj.weight.dtype
        u = self.image(image.to(dtype))
        with batch_seeded_dropout(self.training, self.dropout_seed, tokens[:, 0]):
            q = self.text_proj(self._text_features(tokens))
        return self.head(torch.cat([u * q, u, q], dim=1))


def image_encoder(channels: Sequence[int], dim: int, in_channels: int = 3) -> nn.Sequential:
    """[conv3x3 → ReLU → maxpool2] per entry of ``channels``, global mean, Linear to ``dim``."""
    layers: list[nn.Module] = []
    c = in_channels
    for out in channels:
        layers += [nn.Conv2d(c, int(out), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = int(out)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, dim), nn.ReLU()]
    return nn.Sequential(*layers)


def build_vqa_fusion(
    input_shape: Sequence[int],
    num_classes: int,
    path: str = "minilm",
    text_finetune: str = "lora",
    lora_r: int = 1,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.1,
    target_modules: Sequence[str] = QV_NAMES,
    channels: Sequence[int] = (16, 32, 64),
    dim: int = 128,
    layers: int | None = None,
    dtype: str = "float32",
    attention: str = "auto",
    dropout: float | None = None,
) -> VQAFusion:
    """The easy-VQA stand-in VLM (module doc); ``path`` is the text tower's local HF directory."""
    _offline()
    _check_choice("model.text_finetune", text_finetune, ("lora", "full", "frozen"))
    _check_choice("model.attention", attention, ATTENTION)
    _check_choice("model.dtype", dtype, tuple(DTYPES))
    if len(input_shape) != 3:
        raise ValueError(f"vqa_fusion needs image inputs (C, H, W) from data 'easyvqa', got input_shape {tuple(input_shape)}")
    if layers is not None and layers < 1:
        raise ValueError(f"model.layers must be >= 1 (or unset for all), got {layers}")
    from transformers import AutoConfig, AutoModel

    path = resolve_path(path)
    config = AutoConfig.from_pretrained(path)
    if layers is not None:
        config.num_hidden_layers = min(int(layers), config.num_hidden_layers)
    if dropout is not None:
        _set_dropout(config, float(dropout))
    with _quiet_transformers():
        text = AutoModel.from_pretrained(path, config=config, dtype=DTYPES[dtype],
                                         attn_implementation="sdpa" if attention != "eager" else "eager")
    if text_finetune == "frozen":
        text.requires_grad_(False)
    else:
        apply_finetune(text, text_finetune, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                       target_modules=target_modules, head=[])
    model = VQAFusion(image_encoder(channels, dim, int(input_shape[0])), text, int(config.hidden_size), dim,
                      int(num_classes), attention)
    for m in (model.image, model.text_proj, model.head):
        m.to(DTYPES[dtype])
    return model
