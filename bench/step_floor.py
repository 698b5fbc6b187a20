"""Where an estimator step's time goes: the irreducible pieces, timed side by side with the steps.

    .venv/bin/python bench/step_floor.py [--task mlp|cnn] [--batch 64] [--repeats 30]

For seed 002's MLP (784-1024-1024-10) or MNIST CNN, one interleaved run
(``bpfree.measure.timing``) of:

* the steps themselves: backprop, forward_gradient K=1 and K=16, spsa, mezo
  (``.grad`` mode) and mezo update mode, all with their default options;
* the pieces a step cannot avoid: one and two forward passes without autograd
  (SPSA/MeZO's arithmetic), and on a Linear chain the two losses sharing the
  first layer's W x + b with the later layers run once on both branches folded
  into the batch (zeroth order in one pass, ``_chain``; no perturbation terms),
  forward + backward (backprop), writing one dense
  gradient-sized buffer (every estimator that fills ``p.grad``), and the
  in-place rank-1 update of every low-rank (Linear and plain Conv2d) weight
  (MeZO's update mode);
* a **floor** per estimator = the sum of its unavoidable pieces, so the
  printed "overhead" column is what implementation could still remove.

The FLOP floor of K tangents is printed too (``_lowrank.chain_flops``, the
analytic count, beside ``FlopCounterMode``'s count of the batched pass and of
the whole steps): with rank-1 directions, the batched K-tangent pass costs the
primal F plus, per tangent, T = the products W ẋ of every layer after the
first (the first layer's input has no tangent) and the small low-rank terms
V x = A(Bᵀx), so K = 16 costs F + 16·T against F + T for K = 1. Any
forward-mode pass that carries each direction's tangent through every layer
does at least this arithmetic, so (F + 16T)/(F + T) is the floor of the
K=16 / K=1 step ratio in FLOPs for this method.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators, models
from bpfree.estimators import _chain, _lowrank
from bpfree.measure.flops import count_flops, step_flops
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
    layers = [m for m in model.modules() if _lowrank.lowrank_eligible(m)]  # Linear and plain Conv2d
    factors = [(torch.randn(m.weight.shape[0]), torch.randn(m.weight[0].numel())) for m in layers]

    def forward():
        with torch.no_grad():
            closure()

    def two_forwards():
        forward()
        forward()

    chain = _chain.sequential_chain(model)
    first = next((i for i, m in enumerate(chain) if isinstance(m, nn.Linear)), None) if chain else None

    def one_pass_forwards():
        with torch.no_grad():
            shared = model[: first + 1](x)
            out = model[first + 1:](torch.cat([shared, shared]))
            F.cross_entropy(out[: len(y)], y), F.cross_entropy(out[len(y):], y)

    def forward_backward():
        torch.autograd.grad(closure(), params)

    def write_dense_gradient():
        torch._foreach_copy_(grad_buffers, src)

    def rank1_update():
        with torch.no_grad():
            for m, (a, b) in zip(layers, factors):
                m.weight.view(a.shape[0], -1).addr_(a, b, alpha=-1e-12)

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
        **({"piece: 2 losses sharing the first layer (no grad)": one_pass_forwards} if first is not None else {}),
        "piece: write a dense gradient": write_dense_gradient,
        "piece: rank-1 update of every low-rank weight": rank1_update,
    }
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"task {args.task}, batch {args.batch}, {args.repeats} interleaved repeats\n")
    t = {k: v.median_ms for k, v in time_interleaved(candidates, repeats=args.repeats).items()}
    bp = t["backprop"]
    zo = t.get("piece: 2 losses sharing the first layer (no grad)", t["piece: 2 forwards (no grad)"])
    floors = {
        "backprop": t["piece: forward + backward"],
        "spsa": zo + t["piece: write a dense gradient"],
        "mezo": zo + t["piece: write a dense gradient"],
        "mezo update (no .grad)": t["piece: 2 forwards (no grad)"] + t["piece: rank-1 update of every low-rank weight"],
    }
    print("| what | ms | / backprop step | floor (ms) | floor / backprop | overhead above floor |")
    print("|---|---|---|---|---|---|")
    for label, ms in t.items():
        fl = floors.get(label)
        cells = [label, f"{ms:.2f}", f"{ms / bp:.2f}"]
        cells += [f"{fl:.2f}", f"{fl / bp:.2f}", f"{(ms - fl) / bp:+.2f}"] if fl is not None else ["", "", ""]
        print("| " + " | ".join(cells) + " |")

    print_flop_floor(model, closure, (args.batch, 1, 28, 28), count_flops(forward))


def print_flop_floor(model: nn.Sequential, closure, input_shape: tuple[int, ...], forward_flops: int) -> None:
    """The K=16 / K=1 FLOP floor of the batched tangent pass: analytic, and as FlopCounterMode counts
    the pass itself and the whole forward_gradient steps (which add the gradient writes)."""
    chain = _lowrank.tangent_chain(model)
    fwd, tangent = _lowrank.chain_flops(chain, input_shape, rank=1)
    assert fwd == forward_flops, (fwd, forward_flops)  # the analytic primal is what the counter sees

    def pass_flops(k: int) -> int:
        gen = torch.Generator().manual_seed(0)
        factors, biases = {}, {}
        for m in chain:
            if type(m) in (nn.Linear, nn.Conv2d):
                fs = [_lowrank.draw_factors(m.weight, 1, "rademacher", gen) for _ in range(k)]
                factors[m] = (torch.stack([a for a, _ in fs]), torch.stack([b for _, b in fs]))
                biases[m] = torch.randn(k, m.weight.shape[0], generator=gen)
        return count_flops(lambda: _lowrank.chain_directional_derivatives(model, chain, closure, factors, biases))

    measured = {k: pass_flops(k) for k in (1, 16)}
    steps = {k: step_flops(estimators.make("forward_gradient", num_directions=k), model, closure).step for k in (1, 16)}
    print(f"\nFLOP floor of rank-1 tangents: forward F = {fwd / 1e6:.1f} MFLOP, per tangent T = {tangent / 1e6:.1f} "
          f"MFLOP (W·ẋ of every layer after the first + A(Bᵀx)); T/F = {tangent / fwd:.3f}")
    k1, k16 = fwd + tangent, fwd + 16 * tangent
    print(f"  analytic  K=1: F + T = {k1 / 1e6:.1f} MFLOP, K=16: F + 16T = {k16 / 1e6:.1f} MFLOP, "
          f"ratio (F + 16T)/(F + T) = {k16 / k1:.3f}x")
    print(f"  counted, the batched pass alone: K=1 {measured[1] / 1e6:.1f}, K=16 {measured[16] / 1e6:.1f} MFLOP, "
          f"ratio {measured[16] / measured[1]:.3f}x")
    print(f"  counted, whole steps (K=1 is one forward-mode pass, K=16 the batched pass; + gradient writes): "
          f"K=1 {steps[1] / 1e6:.1f}, K=16 {steps[16] / 1e6:.1f} MFLOP, ratio {steps[16] / steps[1]:.3f}x")
    print("  one forward-mode pass per direction would cost 16(F + T)/(F + T) = 16x")


if __name__ == "__main__":
    main()
