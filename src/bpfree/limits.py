"""Refuse a run that cannot fit in memory before anything large is allocated.

``bpfree.train`` calls :func:`check_data` before loading the data set and
:func:`check_run` after it, before the model is built. Both compare an
estimate with the memory this machine has available now (``MemAvailable``
of ``/proc/meminfo`` on Linux, else the physical memory; on CUDA the free
device memory from ``torch.cuda.mem_get_info`` for what lives on the device)
and raise :class:`MemoryLimitError` — a one-line message with the estimate,
its parts and the machine's memory — when it does not fit.

The estimate (bytes, float32 = 4 bytes per value):

* **data**, before loading, for the data sets whose size is known from their
  options (:data:`DATA_SHAPES`): examples × (features · 4 + 8 for the label) ×
  3, because a loader holds the raw arrays, the float tensors and the split
  copies at its peak. After loading: the tensors' actual bytes.
* **model**, from the model built on the ``meta`` device (no memory):
  N parameters × 4 × (1 value + 1 gradient + the optimizer's state per
  value: Adam/AdamW 2, SGD with momentum 1, else 0 + 1 for the copy the
  warm-up and measurement make).
* **directions**: K × N × 4 for an estimator with ``num_directions = K`` (the
  most any engine holds at once: K dense directions, or K tangents of a
  batched jvp; rank-1 and chunked paths hold less, so this is an upper bound).

Activations are not counted (they scale with the batch; see ``bpfree.measure``),
so a run that passes can still run out of memory: :func:`is_out_of_memory`
recognises the allocation failure, which the CLI prints as one line.
"""

from __future__ import annotations

import os
from typing import Any

from bpfree.config import Config, ConfigError

GIB = 2**30
LOAD_COPIES = 3  # raw arrays + float tensors + split copies at a loader's peak


class MemoryLimitError(ConfigError):
    """The configuration needs more memory than this machine has available."""


def _fixed(n: int, features: int) -> Any:
    return lambda options: (n, features)


# data set -> options -> (examples, features per example); data sets not listed are not estimated
DATA_SHAPES = {
    "synthetic": lambda o: (int(o.get("num_train", 1000)) + int(o.get("num_test", 500)), int(o.get("num_features", 10))),
    "mnist1d": lambda o: (int(o.get("num_samples", 5000)), 40),
    "mnist": _fixed(70_000, 784),
    "fashion_mnist": _fixed(70_000, 784),
    "cifar10": _fixed(60_000, 3072),
}


def available_bytes() -> int:
    """Memory available to a new allocation on this machine now (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not refuse


def total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def data_bytes(cfg: Config) -> int | None:
    """Estimated peak bytes of loading ``cfg``'s data set, or ``None`` when its size is unknown."""
    shape = DATA_SHAPES.get(cfg.data.name)
    if shape is None:
        return None
    n, features = shape(cfg.data.options)
    return LOAD_COPIES * n * (features * 4 + 8)


def check_data(cfg: Config) -> None:
    """Raise :class:`MemoryLimitError` if loading ``cfg``'s data set cannot fit."""
    need = data_bytes(cfg)
    if need is not None:
        _refuse_above({"data": need}, available_bytes(), "this machine")


def run_bytes(cfg: Config, num_parameters: int, data_nbytes: int) -> dict[str, int]:
    """The estimate's parts for a model of ``num_parameters`` and loaded data of ``data_nbytes``."""
    o = cfg.optimizer
    states = {"adam": 2, "adamw": 2}.get(o.name, 1 if (o.momentum or 0) > 0 else 0)
    copies = 1 if (cfg.train.warmup or cfg.train.measure) else 0
    out = {"data": data_nbytes, "model": num_parameters * 4 * (2 + states + copies)}
    k = cfg.estimator.options.get("num_directions")
    if isinstance(k, int) and not isinstance(k, bool):
        out["directions"] = k * num_parameters * 4
    return out


def count_parameters_on_meta(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> int | None:
    """Trainable parameters of ``cfg``'s model, built on the ``meta`` device (allocates nothing)."""
    import torch

    from bpfree import models

    try:
        with torch.device("meta"):
            model = models.make(cfg.model.name, input_shape=input_shape, num_classes=num_classes,
                                seed=None, **cfg.model.options)
    except Exception:  # a model that cannot be built on meta (e.g. loads weights): not estimated
        return None
    return models.count_parameters(model)


def check_run(cfg: Config, input_shape: tuple[int, ...], num_classes: int, data_nbytes: int) -> dict[str, int]:
    """Raise :class:`MemoryLimitError` if the model, its optimizer state and directions cannot fit."""
    n = count_parameters_on_meta(cfg, input_shape, num_classes)
    if n is None:
        return {}
    parts = run_bytes(cfg, n, data_nbytes)
    if cfg.train.device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(cfg.train.device))
        _refuse_above(parts, free, f"{cfg.train.device} (free memory)")
    else:
        _refuse_above(parts, available_bytes(), "this machine")
    return parts


def _refuse_above(parts: dict[str, int], available: int, where: str) -> None:
    need = sum(parts.values())
    if need <= available:
        return
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
    total = total_bytes()
    of = f" of {format_bytes(total)}" if total and where == "this machine" else ""
    raise MemoryLimitError(
        f"this run needs about {format_bytes(need)} ({detail}) but {where} has {format_bytes(available)} available{of}; "
        "make it smaller (data.num_train, estimator.num_directions, model size, optimizer) "
        "or run it on a larger machine"
    )


def format_bytes(n: float) -> str:
    if n >= 1e3 * GIB:
        return f"{n / GIB:.3g} GiB"
    if n >= 0.01 * GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 0.1 * 2**20 else f"{n / 2**10:.1f} KiB"


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CPU ``MemoryError`` / allocator error, CUDA OOM)."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
