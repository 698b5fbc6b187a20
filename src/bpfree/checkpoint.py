"""Checkpoint files: written atomically, read back without running any code.

A training checkpoint (``RUN_DIR/checkpoint.pt``, made by ``bpfree.train``)
is one ``torch.save`` of a dict of plain values and tensors: the step and
epoch, the current epoch's batch order and position, the model, optimizer
and schedule ``state_dict``s, every generator state (data order, estimator,
the global CPU/CUDA RNGs that dropout draws from), the estimator's own state
(``Estimator.state_dict()``, e.g. an SVRG snapshot), the loop's counters and
latest evaluations, and the byte lengths of ``metrics.csv`` / ``eval.csv``
when it was written (their rows up to there are fsynced first). Restoring all
of it continues the run exactly where it stopped: on CPU the resumed run is
bit-identical to one that was never interrupted.

* :func:`save` writes to ``NAME.tmp``, flushes and ``fsync``\\ s it, renames it
  over ``NAME`` (``os.replace``, atomic on POSIX) and fsyncs the directory,
  so a kill at any instant leaves either the previous checkpoint or the new
  one, never a torn file.
* :func:`load` reads with ``torch.load(weights_only=True)``: only tensors and
  plain containers are accepted, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

FILE = "checkpoint.pt"
FORMAT = 1  # bump when the layout of the saved dict changes


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of another format or from another config."""


def save(path: str | Path, state: dict[str, Any]) -> tuple[int, float]:
    """Write ``state`` to ``path`` atomically; return ``(bytes written, seconds taken)``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size, time.perf_counter() - t0


def load(path: str | Path, *, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``: no code runs).

    Raises:
        CheckpointError: no such file, not a checkpoint, or another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors of every kind: a torn, foreign or crafted file
        raise CheckpointError(f"{path} is not a readable bpfree checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this bpfree reads format {FORMAT}")
    return state


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
