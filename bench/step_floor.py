"""Where an estimator step's time goes: the irreducible pieces, timed side by side with the steps.

    .venv/bin/python bench/step_floor.py [--task mlp|cnn] [--batch 64] [--repeats 30]

For seed 002's MLP (784-1024-1024-10) or MNIST CNN, one interleaved run
(``bpfree.measure.timing``) of:

* the steps themselves: backprop, forward_gradient K=1 and K=16, spsa, mezo
  (``.grad`` mode) and mezo update mode, all with their default options;
* the pieces a step cannot avoid: one and two forward passes without autograd
  (SPSA/MeZO's arithmetic), forward + backward (backprop), writing one dense
  gradient-sized buffer (every estimator that fills ``p.grad``), and the
  in-place rank-1 update of every Linear weight (MeZO's update mode);
* a **floor** per estimator = the sum of its unavoidable pieces, so the
  printed "overhead" column is what implementation could still remove.

The FLOP floor of K tangents is printed too: with rank-1 directions, a
forward-mode pass costs the primal F plus, per tangent, the matmuls W ẋ of
every layer after the first (the first layer's input has no tangent), so
K = 16 costs (F + 16·T) against (F + T) for K = 1, T the tangent FLOPs.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators, models
from bpfree.measure.flops import count_flops
from bpfree.measure.timing import time_interleaved

TASKS = {"mlp": ("mlp", {"hidden": (1024, 1024)}), "cnn": ("cnn_mnist", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="mlp", choices=sorted(TASKS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    name, opts = TASKS[args.task]
    torch.manual_seed(0)
    model = models.make(name, input_shape=(1, 28, 28), num_classes=10, **opts)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = [p for p in model.parameters()]
    grad_buffers = [torch.empty_like(p) for p in params]
    src = [torch.randn_like(p) for p in params]
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    factors = [(torch.randn(m.out_features), torch.randn(m.in_features)) for m in linears]

    def forward():
        with torch.no_grad():
            closure()

    def two_forwards():
        forward()
        forward()

    def forward_backward():
        torch.autograd.grad(closure(), params)

    def write_dense_gradient():
        torch._foreach_copy_(grad_buffers, src)

    def rank1_update():
        with torch.no_grad():
            for m, (a, b) in zip(linears, factors):
                m.weight.addr_(a, b, alpha=-1e-12)

    gen = torch.Generator().manual_seed(0)
    steps = {
        "backprop": estimators.make("backprop"),
        "forward_gradient K=1": estimators.make("forward_gradient"),
        "forward_gradient K=16": estimators.make("forward_gradient", num_directions=16),
        "spsa": estimators.make("spsa"),
        "mezo": estimators.make("mezo"),
        "mezo update (no .grad)": estimators.make("mezo", lr=1e-12),
    }
    candidates = {label: (lambda e=e: e.estimate(model, closure, generator=gen)) for label, e in steps.items()}
    candidates |= {
        "piece: forward (no grad)": forward,
        "piece: 2 forwards (no grad)": two_forwards,
        "piece: forward + backward": forward_backward,
        "piece: write a dense gradient": write_dense_gradient,
        "piece: rank-1 update of every Linear": rank1_update,
    }
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"task {args.task}, batch {args.batch}, {args.repeats} interleaved repeats\n")
    t = {k: v.median_ms for k, v in time_interleaved(candidates, repeats=args.repeats).items()}
    bp = t["backprop"]
    floors = {
        "backprop": t["piece: forward + backward"],
        "spsa": t["piece: 2 forwards (no grad)"] + t["piece: write a dense gradient"],
        "mezo": t["piece: 2 forwards (no grad)"] + t["piece: write a dense gradient"],
        "mezo update (no .grad)": t["piece: 2 forwards (no grad)"] + t["piece: rank-1 update of every Linear"],
    }
    print("| what | ms | / backprop step | floor (ms) | floor / backprop | overhead above floor |")
    print("|---|---|---|---|---|---|")
    for label, ms in t.items():
        fl = floors.get(label)
        cells = [label, f"{ms:.2f}", f"{ms / bp:.2f}"]
        cells += [f"{fl:.2f}", f"{fl / bp:.2f}", f"{(ms - fl) / bp:+.2f}"] if fl is not None else ["", "", ""]
        print("| " + " | ".join(cells) + " |")

    fwd = count_flops(lambda: forward())
    first = linears[0] if args.task == "mlp" else None
    if first is not None:
        tangent = fwd - 2 * args.batch * first.in_features * first.out_features
        k1, k16 = fwd + tangent, fwd + 16 * tangent
        print(f"\nFLOP floor of batched rank-1 tangents: forward F = {fwd / 1e6:.1f} MFLOP, tangent T = "
              f"{tangent / 1e6:.1f} MFLOP (no first-layer W·ẋ); K=16 / K=1 >= (F + 16T)/(F + T) = {k16 / k1:.2f}x; "
              f"one pass per direction (as now) costs 16(F + T)/(F + T) = 16x in FLOPs")


if __name__ == "__main__":
    main()
