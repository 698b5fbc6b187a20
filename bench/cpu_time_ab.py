"""Per-step CPU time (``time.process_time``, all threads) of the default estimators, relative to
backprop — a before/after comparison that a loaded machine disturbs less than wall time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_time_ab.py [--repeats 15] [--task mlp|cnn]
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/src .venv/bin/python bench/cpu_time_ab.py   # another checkout

One thread: with two, OpenMP's waiting threads spin, and the spinning counts as CPU time.

Wall-clock medians (``bench/step_cost.py``) on a shared 2-core VM swing by 3x when other
jobs run; the CPU time a step itself consumes swings far less (what is left: cache and memory
bandwidth contention). Rows are interleaved, after one untimed warm-up each; printed: median CPU
ms per step and the ratio to backprop's. Same models and batch as ``bench/step_cost.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bpfree
from bpfree import estimators, models

ROWS = [("backprop", "backprop", {}), ("forward_gradient K=1", "forward_gradient", {}),
        ("forward_gradient K=16", "forward_gradient", {"num_directions": 16}), ("spsa", "spsa", {}),
        ("mezo", "mezo", {}), ("mezo update", "mezo", {"lr": 1e-6})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--task", default="mlp")
    args = ap.parse_args()
    torch.manual_seed(0)
    opts = {"hidden": (1024, 1024)} if args.task == "mlp" else {}
    model = models.make("mlp" if args.task == "mlp" else "cnn_mnist", input_shape=(1, 28, 28), num_classes=10, **opts)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    ests = [(label, estimators.make(name, **o)) for label, name, o in ROWS]
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {label: [] for label, _ in ests}
    for rep in range(args.repeats + 1):
        for label, est in ests:
            t = time.process_time()
            est.estimate(model, closure, generator=gen)
            if rep:  # the first round is the warm-up
                times[label].append((time.process_time() - t) * 1e3)
    bp = statistics.median(times["backprop"])
    print(f"bpfree at {bpfree.__file__}, task {args.task}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    for label, _ in ests:
        ms = statistics.median(times[label])
        print(f"| {label} | {ms:.2f} | {ms / bp:.2f} |")


if __name__ == "__main__":
    main()
