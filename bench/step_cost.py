"""Step cost of every estimator relative to backprop, measured side by side.

    .venv/bin/python bench/step_cost.py [--tasks mlp,cnn] [--batch 64] [--repeats 20] [--device cpu|cuda]
                                        [--out FILE.json]

Tasks: seed 002's MLP 784-1024-1024-10 and MNIST CNN on 28×28 inputs (random
data of the right shape: step cost does not depend on the values). For each
task all estimators are timed interleaved in one process after a warm-up
(``bpfree.measure.timing``); FLOPs come from ``FlopCounterMode`` and peak memory
from the CPU live-tensor tracker (``torch.cuda.max_memory_allocated`` on CUDA,
where steps are timed with CUDA events). Printed: absolute numbers, the ratios
to plain backprop's step on the same batch, and the fast-estimator targets
(issue "Fast estimators") with the measured value beside each.

"Before" is the dense Gaussian rows: the papers' form, which every estimator
used before the fast paths (Rademacher signs from raw bits, rank-1 directions,
the batched K-tangent pass, zeroth order in one pass). The two groups are
timed separately, each interleaved with its own backprop row.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from bpfree import models
from bpfree.measure.profile import EstimatorSpec, add_ratios, markdown_table, profile_estimators

# Defaults (Rademacher signs from raw bits, rank-1 directions for nn.Linear weights) next to
# the papers' dense Gaussian form, which is what every estimator did before the fast paths.
DENSE = {"distribution": "gaussian", "rank": "full"}
BACKPROP = EstimatorSpec("backprop", "backprop", {})
AFTER = [  # every estimator with its default options
    BACKPROP,
    EstimatorSpec("backprop (ckpt sqrt)", "backprop", {"checkpoint": "sqrt"}),
    EstimatorSpec("forward_gradient K=1", "forward_gradient", {}),
    EstimatorSpec("forward_gradient K=16", "forward_gradient", {"num_directions": 16}),
    EstimatorSpec("spsa", "spsa", {}),
    EstimatorSpec("mezo", "mezo", {}),
    EstimatorSpec("mezo update (no .grad)", "mezo", {"lr": 1e-6}),
]
BEFORE = [  # the papers' dense Gaussian form
    BACKPROP,
    EstimatorSpec("forward_gradient K=1 dense gaussian", "forward_gradient", DENSE),
    EstimatorSpec("forward_gradient K=16 dense gaussian", "forward_gradient", {"num_directions": 16, **DENSE}),
    EstimatorSpec("spsa dense gaussian", "spsa", DENSE),
    EstimatorSpec("mezo dense gaussian", "mezo", DENSE),
    EstimatorSpec("mezo update dense gaussian", "mezo", {"lr": 1e-6, **DENSE}),
]
# Two groups, each timed interleaved with its own backprop: a dense K=16 step moves hundreds of
# MB, and interleaving it with 5 ms steps would time those on a cold cache and allocator.
GROUPS = {"after: defaults": AFTER, "before: dense Gaussian directions": BEFORE}

TASKS = {"mlp": ("mlp", {"hidden": (1024, 1024)}), "cnn": ("cnn_mnist", {})}

# (what, row, measure, limit): measure is "time" (ratio to backprop), "time_k1" (ratio to
# forward_gradient K=1) or "memory" (peak over the inference peak of the same batch).
TARGETS = [
    ("forward_gradient K=1 ≤ 1.2x backprop", "forward_gradient K=1", "time", 1.2),
    ("spsa ≤ 0.9x backprop", "spsa", "time", 0.9),
    ("mezo ≤ 0.9x backprop", "mezo", "time", 0.9),
    ("forward_gradient K=16 ≤ 6x its K=1", "forward_gradient K=16", "time_k1", 6.0),
    ("mezo update peak ≤ 1.05x inference", "mezo update (no .grad)", "memory", 1.05),
]


def target_rows(rows: list[dict]) -> list[tuple[str, float, float, bool]]:
    """``(target, measured, limit, met)`` for each of ``TARGETS`` present in ``rows``."""
    by = {r["label"]: r for r in rows}
    out = []
    for what, label, measure, limit in TARGETS:
        if label not in by:
            continue
        row = by[label]
        value = {"time": row["time_ratio"],
                 "time_k1": row["ms_per_step"] / by["forward_gradient K=1"]["ms_per_step"],
                 "memory": row.get("peak_over_inference", float("nan"))}[measure]
        out.append((what, value, limit, value <= limit))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="mlp,cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cosine-draws", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA events, max_memory_allocated)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"{args.repeats} interleaved repeats\n")
    results = {}
    for task in args.tasks.split(","):
        model_name, opts = TASKS[task]
        torch.manual_seed(0)
        model = models.make(model_name, input_shape=(1, 28, 28), num_classes=10, **opts).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

        def closure(model=model, x=x, y=y):
            return F.cross_entropy(model(x), y)

        n = sum(p.numel() for p in model.parameters())
        print(f"## {task}: {model_name}, {n:,} parameters\n")
        rows = []
        for group, specs in GROUPS.items():
            got = profile_estimators(specs, model, closure, repeats=args.repeats, cosine_draws=args.cosine_draws,
                                     device=str(device))
            add_ratios(got, "backprop")
            for row in got:
                row["group"] = group
            rows += got
        print(markdown_table(rows, [
            ("group", "group", ""),
            ("label", "estimator", ""),
            ("ms_per_step", "ms/step", ".2f"),
            ("time_ratio", "time / BP", ".2f"),
            ("flops_forward_equivalents", "FLOPs / fwd", ".2f"),
            ("flops_ratio", "FLOPs / BP", ".2f"),
            ("peak_mb", "peak MB", ".1f"),
            ("memory_ratio", "mem / BP", ".2f"),
            ("peak_over_inference", "mem / inference", ".2f"),
            ("cosine_mean", "cos to ∇", ".4f"),
        ]))
        print()
        print("| target | measured | met |\n|---|---|---|")
        for what, value, limit, met in target_rows(rows):
            print(f"| {what} | {value:.2f} | {'yes' if met else 'no'} |")
        print()
        results[task] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
