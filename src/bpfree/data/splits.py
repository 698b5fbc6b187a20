"""Train/validation/test splits as tensors, and a generator-driven batch iterator.

:func:`make_splits` turns raw arrays into :class:`Splits`:

1. pixels stored as uint8 become float32 in [0, 1] (``/ 255``);
2. the validation set is carved from the official training set by a seeded
   permutation (``torch.randperm`` with a ``torch.Generator`` seeded with
   ``seed``; the global RNG is never used); both index sets are sorted, so
   train and val keep the file order and shuffling is left to :func:`batches`;
3. everything is standardised with the mean and std of the **train** part
   only — per channel for images (N, C, H, W), one scalar for vectors —
   and the values used are recorded in :attr:`Splits.normalization`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch


@dataclasses.dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split: ``x`` float32 (N, *input_shape), ``y`` int64 (N,). Compared by identity.

    ``collate(x, y) -> (x, y)``, when set, turns each batch's rows into the model's
    input (text: trim to the longest sequence; VQA: gather the images); a
    ``collate`` with a ``to(device)`` method is moved along with the tensors.
    """

    x: torch.Tensor
    y: torch.Tensor
    collate: Callable[[torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: Any) -> "TensorSplit":
        """This split with its tensors (and collate's, if it has any) on ``device``."""
        collate = self.collate.to(device) if hasattr(self.collate, "to") else self.collate
        return TensorSplit(self.x.to(device), self.y.to(device), collate)


class Normalization(NamedTuple):
    """Per-channel (images) or single (vectors) mean and std, computed on train."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A data set's train/val/test splits and how they were made.

    ``source`` says exactly which files or generator produced the data (print
    it in every report); ``normalization`` holds the train-split mean/std that
    was subtracted/divided (in the [0, 1] pixel scale for images).
    """

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    normalization: Normalization
    val_fraction: float = 0.0
    seed: int = 0

    def summary(self) -> dict:
        """JSON-ready description for run records."""
        return {
            "name": self.name,
            "source": self.source,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "normalization": {"mean": list(self.normalization.mean), "std": list(self.normalization.std)},
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }


def _as_float(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
    return t.div_(255.0) if x.dtype == np.uint8 else t


def carve_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: positions 0 … n − 1 split into the validation set — the first
    round(``val_fraction``·n) entries of ``torch.randperm(n)`` under a generator seeded ``seed`` —
    and the rest, each sorted. The one place every data set carves validation from its training
    pool (images here, token rows in ``text``); the global RNG is never touched."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training examples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def make_splits(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    source: str,
    val_fraction: float,
    seed: int,
) -> Splits:
    """Carve val from train (:func:`carve_val`), standardise with train statistics (see module doc)."""
    y_all = torch.from_numpy(np.array(y_train, dtype=np.int64))
    train_idx, val_idx = carve_val(len(y_all), val_fraction, seed)
    x_all = _as_float(x_train)
    x_te, y_te = _as_float(x_test), torch.from_numpy(np.array(y_test, dtype=np.int64))
    x_tr, x_va = x_all[train_idx], x_all[val_idx]

    image = x_tr.dim() == 4
    dims = (0, 2, 3) if image else tuple(range(x_tr.dim()))
    std, mean = torch.std_mean(x_tr, dim=dims, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    shape = (1, -1, 1, 1) if image else ()
    for x in (x_tr, x_va, x_te):
        x.sub_(mean.reshape(shape)).div_(std.reshape(shape))
    return Splits(
        train=TensorSplit(x_tr, y_all[train_idx]),
        val=TensorSplit(x_va, y_all[val_idx]),
        test=TensorSplit(x_te, y_te),
        name=name,
        input_shape=tuple(x_tr.shape[1:]),
        num_classes=num_classes,
        source=source,
        normalization=Normalization(tuple(mean.reshape(-1).tolist()), tuple(std.reshape(-1).tolist())),
        val_fraction=val_fraction,
        seed=seed,
    )


class Batches:
    """Iterator of ``(x, y)`` mini-batches over a :class:`TensorSplit`.

    The order is drawn once, when the iterator is made, from ``generator``
    (``torch.randperm``); the global RNG is never touched. ``len()`` is the
    number of batches. Make a new one per epoch.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle and generator is None:
            raise ValueError(
                "batches(shuffle=True) needs generator=torch.Generator().manual_seed(...): "
                "bpfree never draws from the global RNG"
            )
        self.split, self.batch_size = split, batch_size
        n = len(split)
        self.order = torch.randperm(n, generator=generator) if shuffle else None
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self._next = 0

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict:
        """The order and the position in it (for a checkpoint taken mid-epoch)."""
        return {"order": self.order, "next": self._next, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the position of :meth:`state_dict` (same split and batch size)."""
        order = state["order"]
        if order is not None and len(order) != len(self.split):
            raise ValueError(f"the saved batch order covers {len(order)} examples, the split has {len(self.split)}")
        self.order, self._next, self.num_batches = order, int(state["next"]), int(state["num_batches"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next >= self.num_batches:
            raise StopIteration
        start = self._next * self.batch_size
        self._next += 1
        if self.order is None:
            sl = slice(start, start + self.batch_size)
            x, y = self.split.x[sl], self.split.y[sl]
        else:
            idx = self.order[start : start + self.batch_size]
            x, y = self.split.x[idx], self.split.y[idx]
        return self.split.collate(x, y) if self.split.collate is not None else (x, y)


def batches(
    split: TensorSplit,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Batches:
    """Mini-batches of ``split``; the order comes only from ``generator`` (see :class:`Batches`)."""
    return Batches(split, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
