"""Wall time of steps, measured so that ratios between methods are trustworthy.

The machine is shared and noisy, so comparisons follow airbench / nanoGPT
practice: untimed warm-up first, then the candidates are **interleaved**
(round r runs every candidate once, in an order rotated each round, so slow
drifts and order effects hit all of them alike), and the **median** with its
interquartile range is reported rather than the mean.

On CUDA each call is timed with CUDA events recorded on the current stream
before and after it (kernels are asynchronous, so host clocks would time the
launches), after a ``torch.cuda.synchronize()``; on CPU, ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Timing:
    """Per-call wall times of one candidate, in milliseconds."""

    label: str
    samples_ms: list[float] = field(repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> tuple[float, float]:
        q = statistics.quantiles(self.samples_ms, n=4) if len(self.samples_ms) > 1 else [self.median_ms] * 3
        return q[0], q[2]

    def to_dict(self) -> dict[str, float | str | int]:
        lo, hi = self.iqr_ms
        return {"label": self.label, "median_ms": self.median_ms, "q25_ms": lo, "q75_ms": hi,
                "repeats": len(self.samples_ms)}


def _timer(device: str | None) -> Callable[[Callable[[], object]], float]:
    """``time(fn) -> ms``: CUDA events on a CUDA device, ``time.perf_counter`` otherwise."""
    if device is not None and str(device).startswith("cuda"):
        import torch  # noqa: PLC0415

        def cuda_time(fn: Callable[[], object]) -> float:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    return cpu_time


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str | None = None,
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times, interleaved, after ``warmup`` untimed calls each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timed = _timer(device)
    labels = list(candidates)
    for label in labels:
        for _ in range(warmup):
            candidates[label]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            samples[label].append(timed(candidates[label]))
    return {label: Timing(label, samples[label]) for label in labels}
