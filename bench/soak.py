"""Soak: 10,000 training steps of every estimator; resident memory must stay flat after warm-up.

Each estimator trains a tiny ReLU MLP (10-16-4) on 512 Gaussian blobs through the real loop
(``bpfree.train.run``: metrics rows, evaluations every epoch, a checkpoint every 1,000 steps),
one run after another in this process. The resident set size (``/proc/self/statm``) is read
every 500 steps; growth = (largest RSS after the warm-up) / (RSS at the end of the warm-up) - 1,
the warm-up being the first 1,000 steps. A leak of even a few hundred bytes per step shows up
as growth; the bar is < 5 %.

    .venv/bin/python bench/soak.py                  # all estimators, 10,000 steps each (minutes)
    .venv/bin/python bench/soak.py --steps 2000 --estimators spsa,mezo

Linux only (``/proc``). Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bpfree import config as C
from bpfree import estimators, runs, train

PAGE = os.sysconf("SC_PAGE_SIZE")

SPECS = {
    "backprop": {"name": "backprop"},
    "backprop:checkpoint=sqrt": {"name": "backprop", "checkpoint": "sqrt"},
    "forward_gradient": {"name": "forward_gradient"},
    "forward_gradient:num_directions=4": {"name": "forward_gradient", "num_directions": 4},
    "spsa": {"name": "spsa"},
    "mezo": {"name": "mezo"},
    "mezo:lr=1e-3 (update mode)": {"name": "mezo", "lr": 1e-3},
    "activity_perturbation": {"name": "activity_perturbation"},
    "wt_guess": {"name": "wt_guess"},
    "w_perp": {"name": "w_perp", "k": 4},
    "w_perp_ns": {"name": "w_perp_ns", "k": 4},
    "w_p": {"name": "w_p"},
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def soak(label: str, estimator: dict, steps: int, warmup_steps: int, every: int, out: Path) -> dict:
    cfg = C.from_dict({
        "data": {"name": "synthetic", "num_train": 512, "num_test": 128, "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16]},
        "estimator": estimator,
        "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.9},
        "train": {"max_steps": steps, "checkpoint_every_steps": 1000, "warmup": False, "measure": False,
                  "progress": False},
    })
    samples: list[tuple[int, int]] = []
    original = runs.RunWriter.log_step

    def log_step(self, row):  # the loop's own per-step hook: sample RSS every `every` steps
        original(self, row)
        if row["step"] % every == 0:
            samples.append((row["step"], rss_bytes()))

    runs.RunWriter.log_step = log_step
    t0 = time.perf_counter()
    try:
        summary = train.run(cfg, out / label.replace(" ", "_").replace(":", "-"))
    finally:
        runs.RunWriter.log_step = original
    base = next((r for s, r in samples if s >= warmup_steps), None)
    after = [r for s, r in samples if s >= warmup_steps]
    growth = max(after) / base - 1 if base else float("nan")
    status = summary["status"] if summary["status"] == "completed" else f"{summary['status']}: {summary.get('reason')}"
    return {"label": label, "status": status, "steps": summary["steps"], "seconds": time.perf_counter() - t0,
            "rss_warm_mb": base / 2**20 if base else float("nan"),
            "rss_end_mb": samples[-1][1] / 2**20 if samples else float("nan"),
            "rss_max_mb": max(after) / 2**20 if after else float("nan"), "growth": growth}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--warmup-steps", type=int, default=1_000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--estimators", help="comma-separated labels of SPECS (default: all)")
    args = p.parse_args(argv)
    labels = [s.strip() for s in args.estimators.split(",")] if args.estimators else list(SPECS)
    unknown = [label for label in labels if label not in SPECS]
    if unknown:
        p.error(f"unknown {unknown}; choose from {', '.join(SPECS)}")
    assert set(s["name"] for s in SPECS.values()) == set(estimators.available()), "SPECS misses an estimator"
    torch.set_num_threads(1)
    print(f"# soak: {args.steps} steps each, warm-up {args.warmup_steps}, RSS every {args.every} steps; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"| estimator | status | steps | s | RSS after warm-up MB | RSS end MB | RSS max MB | growth |")
    print("|---|---|---|---|---|---|---|---|")
    worst, unfinished = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            r = soak(label, SPECS[label], args.steps, args.warmup_steps, args.every, Path(tmp))
            if r["growth"] == r["growth"]:  # not NaN: a run that stopped before the warm-up ended has none
                worst = max(worst, r["growth"])
            unfinished += r["steps"] < args.steps
            print(f"| {r['label']} | {r['status']} | {r['steps']} | {r['seconds']:.0f} | {r['rss_warm_mb']:.1f} | "
                  f"{r['rss_end_mb']:.1f} | {r['rss_max_mb']:.1f} | {100 * r['growth']:+.2f}% |", flush=True)
    verdict = "flat" if worst < 0.05 else "GROWING"
    print(f"\nworst growth after warm-up: {100 * worst:+.2f}% ({verdict}; the bar is < 5%)"
          + (f"; {unfinished} run(s) stopped before {args.steps} steps (see status)" if unfinished else ""))
    return 0 if worst < 0.05 and not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
