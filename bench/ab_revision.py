"""This checkout's estimators against another git revision's, interleaved in one process.

    .venv/bin/python bench/ab_revision.py REV [--task mlp|cnn] [--repeats 60] [--rounds 3]
    .venv/bin/python bench/ab_revision.py 06f3567            # the commit before the parts refactor

A shared VM's speed drifts by 1.5x between processes (backprop's MLP step: 9.4–16.4 ms on
one day), so two checkouts timed in separate runs cannot be compared. Here ``src/bpfree`` of
REV is extracted (``git archive``) into a temporary directory as the package ``bpfree_old``
and imported beside this checkout's ``bpfree``; every step of both (backprop, forward_gradient
K=1, spsa, mezo on the same model weights and batch) is timed interleaved after a warm-up
(``bpfree.measure.timing``). Printed per round: each revision's ratios to *its own* backprop
step, and the new/old ratio of each estimator's step.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import torch
import torch.nn.functional as F

import bpfree
from bpfree import estimators, models  # noqa: F401  (the new code's registries)
from bpfree.measure import timing

ESTIMATORS = ["backprop", "forward_gradient", "spsa", "mezo"]


def extract_as(rev: str, name: str, into: pathlib.Path) -> None:
    """``src/bpfree`` at ``rev`` into ``into/name``, every ``bpfree`` import renamed to ``name``."""
    repo = pathlib.Path(bpfree.__file__).resolve().parents[2]
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(repo), "archive", rev, "src/bpfree"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "bpfree").rename(into / name)
    pattern = re.compile(r"\bbpfree(?=[. ]|$)", re.MULTILINE)
    for py in (into / name).rglob("*.py"):
        py.write_text(pattern.sub(name, py.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="a git revision of this repository (commit, tag, branch)")
    ap.add_argument("--task", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extract_as(args.rev, "bpfree_old", pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        old = importlib.import_module("bpfree_old")
        importlib.import_module("bpfree_old.models")
        importlib.import_module("bpfree_old.estimators")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
        name, opts = ("mlp", {"hidden": (1024, 1024)}) if args.task == "mlp" else ("cnn_mnist", {})
        steps = {}
        for tag, pkg in (("old", old), ("new", bpfree)):
            model = pkg.models.make(name, input_shape=(1, 28, 28), num_classes=10, seed=0, **opts)

            def closure(model=model):
                return F.cross_entropy(model(x), y)

            for est_name in ESTIMATORS:
                est, gen = pkg.estimators.make(est_name), torch.Generator().manual_seed(0)
                steps[(tag, est_name)] = lambda est=est, gen=gen, m=model, c=closure: est.estimate(m, c, generator=gen)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.task}, batch 64, "
              f"old = {args.rev}, new = this checkout\n")
        print("| round | backprop ms old / new | " + " | ".join(f"{e} / BP old, new" for e in ESTIMATORS[1:])
              + " | " + " | ".join(f"{e} new / old" for e in ESTIMATORS) + " |")
        print("|---" * (2 + 2 * len(ESTIMATORS) - 1) + "|")
        for r in range(args.rounds):
            t = timing.time_interleaved({f"{a} {b}": f for (a, b), f in steps.items()}, warmup=5,
                                        repeats=args.repeats, device="cpu")
            ms = {k: v.median_ms for k, v in t.items()}
            cells = [f"{ms['old backprop']:.2f} / {ms['new backprop']:.2f}"]
            cells += [f"{ms['old ' + e] / ms['old backprop']:.3f}, {ms['new ' + e] / ms['new backprop']:.3f}"
                      for e in ESTIMATORS[1:]]
            cells += [f"{ms['new ' + e] / ms['old ' + e]:.3f}" for e in ESTIMATORS]
            print(f"| {r + 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
