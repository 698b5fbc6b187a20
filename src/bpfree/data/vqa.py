"""easy-VQA (PyPI ``easy-vqa``): 64×64 images of coloured shapes with questions and 13 answers.

::

    ds = data.load("easyvqa", max_length=16)
    x, y = next(iter(data.batches(ds.train, 32, generator=g)))   # x: ImageText(image, tokens)

The package ships 4,000 train / 1,000 test PNG images and 38,575 train /
9,673 test questions ("what color is the shape?", "does the image contain a
circle?"), each with one of 13 answers (``easy_vqa.get_answers()``, in that
order as the class indices). Questions are tokenised with the model's own
tokenizer like :mod:`bpfree.data.text` (cached the same way, with the images).

Each split stores per question a (3, max_length) int64 row — token ids,
attention mask, and the question's image index repeated — plus one uint8
image table; its collate function (:class:`ImageTextCollate`) gathers each
batch's images, standardises them with the train images' per-channel
mean/std (recorded in ``normalization``) and trims the tokens to the
batch's longest question. Validation holds out whole **images** (a seeded
``val_fraction`` of the training images with all their questions), so no
image is seen in training and validation both; test is the official test set.
``num_train`` keeps only the first n training questions (file order) for quick
runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree.data.files import DatasetNotFoundError
from bpfree.data.splits import Normalization, Splits, TensorSplit
from bpfree.data.text import CACHE_VERSION, _cached, _tokenize, _tokenizer_digest, resolve_tokenizer_path

__all__ = ["ImageText", "ImageTextCollate", "VQA_LOADERS", "easyvqa"]


@dataclasses.dataclass(frozen=True)
class ImageText:
    """A VQA batch: ``image`` float (B, 3, H, W) standardised, ``tokens`` int64 (B, 2, T)."""

    image: torch.Tensor
    tokens: torch.Tensor

    def to(self, device: Any) -> "ImageText":
        return ImageText(self.image.to(device), self.tokens.to(device))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def device(self) -> torch.device:
        return self.tokens.device


@dataclasses.dataclass(frozen=True, eq=False)
class ImageTextCollate:
    """Rows (B, 3, L) → :class:`ImageText` with images gathered from ``images`` (uint8 table)."""

    images: torch.Tensor  # (M, 3, H, W) uint8
    mean: torch.Tensor  # (3,) in [0, 1] pixel scale
    std: torch.Tensor

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[ImageText, torch.Tensor]:
        n = max(int(x[:, 1].sum(dim=1).max()), 1)
        image = self.images[x[:, 2, 0]].float().div_(255.0)
        image = image.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))
        return ImageText(image, x[:, :2, :n]), y

    def to(self, device: Any) -> "ImageTextCollate":
        return ImageTextCollate(self.images.to(device), self.mean.to(device), self.std.to(device))


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise DatasetNotFoundError(
            "the easyvqa data set ships in the PyPI package 'easy-vqa'; install it with `pip install easy-vqa`"
        ) from None
    return easy_vqa


def _read_images(paths: dict[int, str]) -> tuple[torch.Tensor, dict[int, int]]:
    from PIL import Image

    ids = sorted(paths)
    arrays = []
    for i in ids:
        with Image.open(paths[i]) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    table = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return table, {img: k for k, img in enumerate(ids)}


def easyvqa(
    root: Path | None,
    download: bool,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    tokenizer: str = "model",
    max_length: int = 16,
    num_train: int | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
) -> Splits:
    """easy-VQA's train/test questions with their images (see the module doc)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_train is not None and num_train < 1:
        raise ValueError(f"data.num_train must be >= 1 (or unset for all), got {num_train}")
    ev = _package()
    answers = list(ev.get_answers())
    from bpfree.models.hf import load_tokenizer

    tok = load_tokenizer(resolve_tokenizer_path(tokenizer))
    pkg_dir = Path(ev.__file__).parent
    version = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted((pkg_dir / "data").glob("*/questions.json")))
    ).hexdigest()
    key = {"v": CACHE_VERSION, "data": f"easyvqa:{version}", "tokenizer": _tokenizer_digest(tok),
           "max_length": max_length}

    def build() -> dict[str, torch.Tensor]:
        out = {}
        for part, questions, paths in (("train", ev.get_train_questions(), ev.get_train_image_paths()),
                                       ("test", ev.get_test_questions(), ev.get_test_image_paths())):
            texts, ans, image_ids = questions
            table, index = _read_images(paths)
            tokens = _tokenize(tok, [[t] for t in texts], max_length)
            img = torch.tensor([index[i] for i in image_ids], dtype=torch.long)
            out[f"{part}_x"] = torch.cat([tokens, img.view(-1, 1, 1).expand(-1, 1, max_length)], dim=1)
            out[f"{part}_y"] = torch.tensor([answers.index(a) for a in ans], dtype=torch.long)
            out[f"{part}_images"] = table
        return out

    d = _cached(key, cache, cache_dir, build)
    x, y, images = d["train_x"], d["train_y"], d["train_images"]
    # validation: whole images, drawn by seed
    n_img = len(images)
    n_val_img = int(round(val_fraction * n_img))
    val_images = torch.randperm(n_img, generator=torch.Generator().manual_seed(seed))[:n_val_img]
    is_val = torch.isin(x[:, 2, 0], val_images)
    train_idx = torch.nonzero(~is_val).squeeze(1)
    if num_train is not None:
        train_idx = train_idx[:num_train]
    if len(train_idx) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training questions")
    val_idx = torch.nonzero(is_val).squeeze(1)
    train_imgs = images[torch.unique(x[train_idx, 2, 0])].float().div_(255.0)
    std, mean = torch.std_mean(train_imgs, dim=(0, 2, 3), correction=0)
    train_collate = ImageTextCollate(images, mean, std)
    test_collate = ImageTextCollate(d["test_images"], mean, std)
    source = (f"easy-vqa {getattr(ev, '__version__', '1.0')} ({pkg_dir}): {len(y)} train / {len(d['test_y'])} test "
              f"questions on {n_img} / {len(d['test_images'])} 64x64 images, {len(answers)} answers {answers}; "
              f"val = {n_val_img} held-out train images; tokenizer {getattr(tok, 'name_or_path', '?')}, "
              f"max_length {max_length}" + (f"; first {num_train} train questions" if num_train else ""))
    return Splits(
        train=TensorSplit(x[train_idx], y[train_idx], train_collate),
        val=TensorSplit(x[val_idx], y[val_idx], train_collate),
        test=TensorSplit(d["test_x"], d["test_y"], test_collate),
        name="easyvqa",
        input_shape=(3, 64, 64),
        num_classes=len(answers),
        source=source,
        normalization=Normalization(tuple(mean.tolist()), tuple(std.tolist())),
        val_fraction=val_fraction,
        seed=seed,
    )


VQA_LOADERS = {"easyvqa": easyvqa}
