"""The correlation a shared noise table introduces, measured exactly, and what it saves.

    OMP_NUM_THREADS=1 .venv/bin/python bench/noise_table.py [--log2-sizes 22,24,26,28] [--repeats 30]

``distribution="noise_table"`` reads each direction as a circular slice of one
pre-drawn table of L Gaussian values at a uniform random offset (Salimans et
al. 2017). Its exact second moment is E[v vᵀ] = C, C_ij = r((j − i) mod L), so
the forward gradient's expectation is C ∇f, not ∇f (``estimators/directions.py``).
For seed 002's MLP 784-1024-1024-10 (N = 1.86M) and one real gradient
(a Fashion-MNIST batch of 64 when the offline files are there, else a random
batch — the output says which), this prints, for each table size L:

1. the table's autocorrelation: max |r(ℓ)| over ℓ ≠ 0 and the std of r·√L;
2. one draw of N values (what K > 1 dense directions take, each row
   marginally C_N): the exact bias ‖(C − I)∇f‖/‖∇f‖ (FFT,
   ``directions.noise_table_covariance_apply``) next to √((N − 1)/L),
   cos(C∇f, ∇f), the bias's component along ∇f, and S* = N‖∇f‖²/‖b‖², the
   number of averaged independent estimates after which the bias exceeds the
   noise (the mean of S estimates has error² ≈ N‖∇f‖²/S + ‖b‖²), next to L;
3. the bias as the estimators actually draw (one offset per ``fill_`` call,
   so E[v vᵀ] is block-diagonal): K = 1 dense (one block per tensor), MeZO
   dense (one per 65,536-value piece), the rank-1 default (C_m ⊗ C_n per
   Linear weight, one block per bias), each next to its prediction
   √(Σ_b (n_b − 1)‖∇f_b‖² / (L‖∇f‖²));
4. overlap between steps: P(two offsets within N) = (2N − 1)/L and the cosine
   of two directions whose offsets differ by a lag ℓ < N;

and, at the default L = 2**24, the median time (interleaved, after a warm-up)
of drawing N values with ``fill_`` for rademacher, gaussian and noise_table,
and of the zero-copy ``table_slice``.
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import data, models
from bpfree.estimators import directions
from bpfree.estimators.zeroth_order import CHUNK
from bpfree.measure.timing import time_interleaved


def gradient(batch: int) -> tuple[nn.Module, list[torch.Tensor], str]:
    """The MLP and ∇f on one batch (real Fashion-MNIST if available offline)."""
    model = models.make("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(1024, 1024), seed=0)
    try:
        ds = data.load("fashion_mnist", seed=0)
        x, y, source = ds.train.x[:batch], ds.train.y[:batch], f"Fashion-MNIST, first {batch} training images"
    except data.DatasetNotFoundError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        source = f"a random batch of {batch} (Fashion-MNIST not found offline)"
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return model, [g.detach().double() for g in grads], source


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def predicted(blocks: list[torch.Tensor], size: int) -> float:
    """√(Σ_b (n_b − 1)‖g_b‖² / (L‖g‖²)): each block's bias is ≈ √((n_b − 1)/L)‖g_b‖."""
    total = sum(float(b.square().sum()) for b in blocks)
    return math.sqrt(sum((b.numel() - 1) * float(b.square().sum()) for b in blocks) / (size * total))


def per_tensor(grads, r, chunk=None):
    """E[g] for one offset per tensor (or per ``chunk`` values of each tensor): blockwise C."""
    out, blocks = [], []
    for g in grads:
        flat = g.reshape(-1)
        pieces = flat.split(chunk) if chunk else [flat]
        out += [directions.noise_table_covariance_apply(p, autocorrelation=r) for p in pieces]
        blocks += list(pieces)
    return torch.cat(out), blocks


def rank_one(grads, r):
    """E[g] for the rank-1 default: C_m G C_n for each Linear weight, C per bias tensor."""
    out = []
    for g in grads:
        if g.dim() == 2:  # V = a bᵀ, a and b separate draws: E[vec V vec Vᵀ] = C_m ⊗ C_n
            gc = directions.noise_table_covariance_apply(g, autocorrelation=r)  # G C_n (rows)
            out.append(directions.noise_table_covariance_apply(gc.T, autocorrelation=r).T.reshape(-1))  # C_m G C_n
        else:
            out.append(directions.noise_table_covariance_apply(g, autocorrelation=r))
    return torch.cat(out)


def rank_one_prediction(grads, size):
    """Relative bias² ≈ Σ_W ((m − 1) + (n − 1))‖G_W‖²/L + Σ_bias (n_b − 1)‖g_b‖²/L, over ‖g‖²."""
    total = sum(float(g.square().sum()) for g in grads)
    acc = 0.0
    for g in grads:
        terms = (g.shape[0] - 1) + (g.shape[1] - 1) if g.dim() == 2 else g.numel() - 1
        acc += terms * float(g.square().sum())
    return math.sqrt(acc / (size * total))


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2-sizes", default="22,24,26,28")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30, help="timing repeats; 0 skips the timing")
    args = ap.parse_args()
    _, grads, source = gradient(args.batch)
    flat = torch.cat([g.reshape(-1) for g in grads])
    n = flat.numel()
    print(f"# Noise table: correlation and cost — {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"\nMLP 784-1024-1024-10, N = {n:,} parameters; ∇f from {source}.\n")
    main_rows, est_rows, lag_rows, skipped = [], [], [], []
    lags = [1, 2, 1000, n // 2, n - 1]
    for log2 in [int(s) for s in args.log2_sizes.split(",")]:
        size = 1 << log2
        need = 48 * size  # table (fp32 + float64), its spectrum, r and FFT temporaries
        if size < n:
            skipped.append(f"L = 2^{log2}: skipped, smaller than N (a direction of N values would repeat table values)")
            continue
        if need > available_bytes():
            skipped.append(f"L = 2^{log2}: skipped, needs about {need / 2**30:.0f} GiB free, "
                           f"{available_bytes() / 2**30:.0f} GiB available")
            continue
        directions.set_noise_table_size(size)
        r = directions.noise_table_autocorrelation()
        off = r[1:]
        c_g = directions.noise_table_covariance_apply(flat, autocorrelation=r)
        bias = float((c_g - flat).norm() / flat.norm())
        along = float(flat @ (c_g - flat) / flat.square().sum())
        main_rows.append([
            f"2^{log2}", f"{4 * size / 2**20:.0f}", f"{float(off.abs().max()) * math.sqrt(size):.2f}",
            f"{float(off.std()) * math.sqrt(size):.4f}", f"{bias:.4f}", f"{math.sqrt((n - 1) / size):.4f}",
            f"{float(F.cosine_similarity(c_g, flat, dim=0)):.4f}", f"{1 / math.sqrt(1 + bias**2):.4f}",
            f"{along:+.2e}", f"{math.sqrt(2 / size):.1e}", f"{n / bias**2:.3g}", f"{size:.3g}",
            f"{min(1.0, (2 * n - 1) / size):.3f}",
        ])
        dense, dense_blocks = per_tensor(grads, r)
        mezo, mezo_blocks = per_tensor(grads, r, CHUNK)
        low = rank_one(grads, r)
        est_rows.append([
            f"2^{log2}",
            f"{rel(dense, flat):.4f} ({predicted(dense_blocks, size):.4f})",
            f"{rel(mezo, flat):.4f} ({predicted(mezo_blocks, size):.4f})",
            f"{rel(low, flat):.5f} ({rank_one_prediction(grads, size):.5f})",
        ])
        table = directions.noise_table()
        start = 12_345
        if start + max(lags) + n <= size:
            v1 = table[start:start + n].double()
            cos = [float(F.cosine_similarity(v1, table[start + lag:start + lag + n].double(), dim=0)) for lag in lags]
            lag_rows.append([f"2^{log2}", *[f"{c:+.2e} (r = {float(r[lag]):+.1e})" for c, lag in zip(cos, lags)]])
        del r, off, c_g, table
        directions.set_noise_table_size(1 << 24)  # frees this L's table

    print("## One draw of N values (E[g] = C_N ∇f; K > 1 dense rows are each marginally this)\n")
    print("| L | table MiB (fp32) | max\\|r(ℓ≠0)\\|·√L | std r(ℓ≠0)·√L | ‖(C−I)∇f‖/‖∇f‖ | √((N−1)/L) "
          "| cos(C∇f, ∇f) | 1/√(1+bias²) | ∇fᵀ(C−I)∇f/‖∇f‖² | √(2/L) | S* = N/bias² | L | P(offsets within N) |")
    print("|" + "---|" * 13)
    for row in main_rows:
        print("| " + " | ".join(row) + " |")
    print("\n## As the estimators draw (one offset per fill_ call): exact relative bias (prediction)\n")
    print("| L | K=1 dense: one block per tensor | MeZO dense: one block per 65,536-value piece "
          "| rank-1 default: C_m⊗C_n per Linear weight, biases per tensor |")
    print("|---|---|---|---|")
    for row in est_rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n## Overlap between steps: cosine of two N-value directions at offsets o and o + ℓ "
          f"(independent directions: ±{1 / math.sqrt(n):.1e})\n")
    print("| L | " + " | ".join(f"ℓ = {lag:,}" for lag in lags) + " |")
    print("|---|" + "---|" * len(lags))
    for row in lag_rows:
        print("| " + " | ".join(row) + " |")
    for line in skipped:
        print(f"\n{line}")

    if args.repeats < 1:
        return
    directions.set_noise_table_size(1 << 24)
    out = torch.empty(n)
    gen = torch.Generator().manual_seed(0)
    candidates = {
        "fill_ rademacher": lambda: directions.fill_(out, "rademacher", gen),
        "fill_ gaussian": lambda: directions.fill_(out, "gaussian", gen),
        "fill_ noise_table": lambda: directions.fill_(out, "noise_table", gen),
        "table_slice (view unless it wraps)": lambda: directions.table_slice(n, generator=gen),
    }
    timings = time_interleaved(candidates, warmup=3, repeats=args.repeats)
    print(f"\n## Drawing N = {n:,} values, L = 2^24 (median of {args.repeats} interleaved repeats)\n")
    print("| draw | median ms | IQR ms |")
    print("|---|---|---|")
    for label, t in timings.items():
        lo, hi = t.iqr_ms
        print(f"| {label} | {t.median_ms:.3f} | {lo:.3f}–{hi:.3f} |")


if __name__ == "__main__":
    main()
