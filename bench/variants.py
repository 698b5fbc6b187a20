"""What each variance-reduction variant buys: cosine to the exact gradient, step time, forward passes.

    .venv/bin/python bench/variants.py [--tasks mlp,transformer] [--steps 20] [--lr 1e-3] [--out FILE.json]

Protocol, the same for every variant (stateful ones — SVRG's snapshot, sparse masks — need
steps to show what they do): from one initialisation, on one fixed batch, run ``--steps``
steps of plain SGD (``--lr``) with the variant's estimate; at every step record the cosine of
the estimate to the exact gradient at that θ (backprop, the oracle), the wall time of the
estimate and its forward passes. Printed per variant: cosine mean ± std over the steps, median
ms/step, forward passes per step, and the cosine per unit of step time relative to plain K = 1
((cos/ms) / (cos/ms of K = 1)), which says whether a variant's gain pays for its cost.
``accumulate ×4`` averages the estimates of 4 different batches and is compared with the exact
gradient of their mean loss. Adaptive variants are biased by a scale κ_c (cosine is blind to
scale); sparse ones are zero off the mask by design. Times on a loaded 2-core CPU are noisy.

Tasks: seed 002's MLP 784-1024-1024-10 (batch 64, random data of MNIST's shape) and a small
transformer block stack (2 pre-LayerNorm blocks of hand-written single-head attention + GELU MLP,
width 32, sequence 16, batch 16, mean-pooled to 10 classes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators, models

FG = "forward_gradient"
VARIANTS = [  # (label, estimator, options, accumulate)
    ("fg K=1 (plain)", FG, {}, 1),
    ("fg K=4", FG, {"num_directions": 4}, 1),
    ("fg K=16", FG, {"num_directions": 16}, 1),
    ("fg accumulate ×4", FG, {}, 4),
    ("fg adaptive c=4 (largest)", FG, {"adaptive_candidates": 4}, 1),
    ("fg adaptive seed000 (smallest, step 0)", FG, {"adaptive_candidates": 4, "adaptive_rule": "seed000"}, 1),
    ("fg svrg every=10 M=16", FG, {"svrg_every": 10, "svrg_directions": 16}, 1),
    ("fg svrg K=4 every=10 M=16", FG, {"num_directions": 4, "svrg_every": 10, "svrg_directions": 16}, 1),
    ("fg sparse 1% smallest", FG, {"sparse_fraction": 0.01, "sparse_every": 10}, 1),
    ("mezo (plain)", "mezo", {}, 1),
    ("spsa K=4", "spsa", {"num_directions": 4}, 1),
    ("mezo accumulate ×4", "mezo", {}, 4),
    ("mezo svrg every=10 M=16", "mezo", {"svrg_every": 10, "svrg_directions": 16}, 1),
    ("mezo sparse 1% smallest (Sparse-MeZO)", "mezo", {"sparse_fraction": 0.01, "sparse_every": 10}, 1),
    ("mezo sparse 1% largest (seed 000)", "mezo", {"sparse_fraction": 0.01, "sparse_rule": "largest",
                                                    "sparse_every": 10}, 1),
    ("mezo sign (ZO-SGD-Sign)", "mezo", {"sign": True}, 1),
    ("mezo conservative (ZO-SGD-Cons)", "mezo", {"conservative_lr": 1e-3}, 1),
    ("spsa adaptive c=4", "spsa", {"adaptive_candidates": 4}, 1),
]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x), then x + MLP(LN x); attention written out
    (forward-mode AD has no rule for the fused SDPA kernel on CPU)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class BlockStack(nn.Module):
    def __init__(self, d: int = 32, depth: int = 2, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def task(name: str, batches: int):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = models.make("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(1024, 1024))
        xs = [torch.randn(64, 1, 28, 28, generator=g) for _ in range(batches)]
    else:
        model = BlockStack()
        xs = [torch.randn(16, 16, 32, generator=g) for _ in range(batches)]
    ys = [torch.randint(0, 10, (x.shape[0],), generator=g) for x in xs]
    return model, list(zip(xs, ys))


def run_variant(model0, data, name, options, accumulate, steps, lr):
    model = __import__("copy").deepcopy(model0)
    est = estimators.make(name, **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    closures = [lambda x=x, y=y: F.cross_entropy(model(x), y) for x, y in data[:accumulate]]
    params = [p for p in model.parameters()]
    cos, ms, passes = [], [], []
    for _ in range(steps):
        mean_loss = lambda: sum(c() for c in closures) / len(closures)  # noqa: E731
        exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean_loss(), params)])
        t0 = time.perf_counter()
        if accumulate == 1:
            out = est.estimate(model, closures[0], generator=gen)
        else:
            out = estimators.accumulate(est, model, closures, generator=gen)
        ms.append((time.perf_counter() - t0) * 1e3)
        est_g = torch.cat([p.grad.reshape(-1) for p in params])
        cos.append(float(F.cosine_similarity(est_g, exact, dim=0)))
        passes.append(out.forward_passes)
        opt.step()
    return {"cos_mean": statistics.fmean(cos), "cos_std": statistics.pstdev(cos),
            "ms": statistics.median(ms), "forward_passes": statistics.fmean(passes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="mlp,transformer")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--only", default=None, help="comma-separated substrings of variant labels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.steps} SGD steps (lr {args.lr}) "
          "per variant, one fixed batch\n")
    results = {}
    for t in args.tasks.split(","):
        model, data = task(t, 4)
        n = sum(p.numel() for p in model.parameters())
        # an untimed warm-up of each engine
        for _, name, options, _ in VARIANTS[:2]:
            run_variant(model, data, name, options, 1, 1, args.lr)
        rows = []
        for label, name, options, acc in VARIANTS:
            if args.only and not any(s in label for s in args.only.split(",")):
                continue
            rows.append({"label": label, **run_variant(model, data, name, options, acc, args.steps, args.lr)})
        base = {r["label"].split(" ")[0]: r for r in rows if "(plain)" in r["label"]}
        print(f"## {t}: {n:,} parameters\n")
        print("| variant | cos to ∇ (mean ± std) | ms/step | forward passes | cos per ms vs plain K=1 |")
        print("|---|---|---|---|---|")
        for r in rows:
            b = base.get(r["label"].split(" ")[0]) or base.get("fg")
            rel = (r["cos_mean"] / r["ms"]) / (b["cos_mean"] / b["ms"]) if b and b["cos_mean"] > 0 else float("nan")
            r["cos_per_ms_vs_plain"] = rel
            print(f"| {r['label']} | {r['cos_mean']:.4f} ± {r['cos_std']:.4f} | {r['ms']:.1f} | "
                  f"{r['forward_passes']:.1f} | {rel:.2f} |")
        print()
        results[t] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
