"""Seed 001 reproduced: guessed gradients vs width on MNIST-1D (Wang, Markou, Campbell 2025).

``bpfree study run wang2025 --preset cpu|paper [--out DIR]`` runs, from the
shipped study file ``studies/configs/wang2025.toml``:

1. **Training by width** (their Table 3): every method of the preset at every
   width, AdamW, batch 512, the preset's epochs; final accuracy on all 4000
   training examples (and the 1000 test examples).
2. **k sweep** at one width (their Table 1): W^T and W-perp with k = rank, 25, 10, 1.
3. **Gradient quality** (their Table 2 and the cosine-vs-width argument): for
   every width, at the initial weights and at the weights backprop trained
   (``model.pt``), ``bpfree.measure.quality.estimator_quality`` of each method
   on a fixed batch of 512: mean cosine to the exact gradient, per-coordinate
   variance and (noise-corrected) squared bias.
4. **Low-dimensional structure**: for each hidden layer, the share of the
   exact per-example pre-activation gradient g_{i,b} inside the top-k right
   singular subspace of its upstream Jacobian W̃_b = W_{i+1}M_b (what a
   W-perp guess can reach), k = 1, 5, 10, 25, 50; and the top-k energy of the
   batch's gradient matrix ∂L/∂s_i (``per_example_gradient_structure``).

Every training run is an ordinary run directory under ``DIR/runs/w{width}/``;
a run that already finished is reused, so an interrupted study resumes where
it stopped (pass ``overwrite`` to redo everything). Results go to
``DIR/study.json``, the report to ``DIR/report.md`` and ``DIR/report.html``
with the plots as PNG files beside them; the paper's numbers sit beside ours.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bpfree import config as config_lib
from bpfree import data, estimators, models, provenance, runs, train
from bpfree.config import ConfigError
from bpfree.estimators import guessed
from bpfree.measure import quality
from bpfree.report import memory as memory_view
from bpfree.studies import compare

NAME = "wang2025"
TITLE = "Seed 001: guessed gradients vs width on MNIST-1D (Wang, Markou, Campbell 2025)"

# ----------------------------------------------------------------------------- the paper's numbers (REFERENCES.md)

WEIGHT_PERTURBATION = "forward_gradient"
PAPER_TRAIN_ACC = {  # Table 3: train accuracy after 300 epochs
    64: {"forward_gradient": 0.121, "activity_perturbation": 0.201, "wt_guess": 0.268, "w_perp": 0.268, "backprop": 0.536},
    128: {"forward_gradient": 0.124, "activity_perturbation": 0.275, "wt_guess": 0.312, "w_perp": 0.323, "backprop": 0.709},
    256: {"forward_gradient": 0.179, "activity_perturbation": 0.309, "wt_guess": 0.376, "w_perp": 0.434, "backprop": 0.887},
    512: {"forward_gradient": 0.177, "activity_perturbation": 0.319, "wt_guess": 0.494, "w_perp": 0.581, "backprop": 1.000},
}
PAPER_K_SWEEP = {"wt_guess": 0.312, "rank": 0.311, 25: 0.323, 10: 0.324, 1: 0.275}  # Table 1, width 128
PAPER_BIAS_VARIANCE = {"wt_guess": (1.50e-4, 2.75e-4), "w_perp": (1.03e-5, 2.86e-5)}  # Table 2: (variance, bias)
PAPER_512 = {"w_perp_ns": (0.594, 0.477, "6 h"), "w_perp": (0.581, 0.498, "40 h"), "wt_guess": (0.486, 0.438, "26 min")}
ENERGY_KS = (1, 5, 10, 25, 50)
LABELS = {
    "forward_gradient": "weight pert.",
    "activity_perturbation": "activity pert.",
    "wt_guess": "W^T",
    "w_perp": "W-perp",
    "w_perp_ns": "W-perp-NS",
    "w_p": "W^P",
    "backprop": "backprop",
}


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """One ``[preset.NAME]`` table of the study file (see ``studies/configs/wang2025.toml``)."""

    name: str
    description: str
    epochs: int
    widths: tuple[int, ...]
    methods: tuple[str, ...]
    k_sweep_width: int
    k_sweep: tuple[str, ...]
    quality_methods: tuple[str, ...]
    quality_samples: int
    energy_examples: int
    extra: dict[int, tuple[str, ...]] = field(default_factory=dict)
    quality_max_width: dict[str, int] = field(default_factory=dict)
    num_samples: int | None = None  # MNIST-1D size override (smoke preset only)


def study_file() -> dict[str, Any]:
    """The shipped study file, parsed."""
    text = importlib.resources.files("bpfree.studies").joinpath("configs", f"{NAME}.toml").read_text()
    return tomllib.loads(text)


def presets() -> dict[str, Preset]:
    out = {}
    for name, table in study_file()["preset"].items():
        known = {f.name for f in dataclasses.fields(Preset)} - {"name"}
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"{NAME} preset {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(table)
        values["extra"] = {int(w): tuple(v) for w, v in values.get("extra", {}).items()}
        for key in ("widths", "methods", "k_sweep", "quality_methods"):
            values[key] = tuple(values[key])
        out[name] = Preset(name=name, **values)
    return out


def get_preset(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise ConfigError(f"{NAME} has no preset {name!r}; choose one of {', '.join(sorted(table))}")
    return table[name]


def family(spec: compare.Spec) -> str:
    """The paper's method a spec belongs to (``w_perp:k=10`` → ``w_perp``)."""
    return spec.name


def label(spec: compare.Spec) -> str:
    base = LABELS.get(spec.name, spec.name)
    if spec.name == "w_perp" or spec.name == "w_perp_ns":
        return f"{base} (k={spec.options.get('k', 10)})"
    return base


# ----------------------------------------------------------------------------- runs


def base_config(preset: Preset, width: int) -> config_lib.Config:
    """The study file's ``[base]`` run config at ``width`` with the preset's budget; saves ``model.pt``."""
    raw = json.loads(json.dumps(study_file()["base"]))
    raw["model"]["width"] = width
    raw["train"]["epochs"] = preset.epochs
    raw["train"]["save_model"] = True
    if preset.num_samples is not None:
        raw["data"]["num_samples"] = preset.num_samples
    return config_lib.from_dict(raw)


def planned_runs(preset: Preset, out: Path) -> list[tuple[str, int, compare.Spec, config_lib.Config, Path]]:
    """``(part, width, spec, config, run dir)`` for every training run; shared runs appear once."""
    wanted: list[tuple[str, int, str]] = []
    for width in preset.widths:
        for text in preset.methods + preset.extra.get(width, ()):
            wanted.append(("width", width, text))
    for text in preset.k_sweep:
        wanted.append(("k_sweep", preset.k_sweep_width, text))
    out_runs, seen = [], set()
    for part, width, text in wanted:
        (spec, cfg), = compare.plan(base_config(preset, width), [compare.parse_spec(text)])
        path = out / "runs" / f"w{width}" / spec.dirname
        if path in seen:
            continue
        seen.add(path)
        out_runs.append((part, width, spec, cfg, path))
    return out_runs


def _finished(path: Path, cfg: config_lib.Config) -> dict[str, Any] | None:
    """The summary of a completed run with the same config at ``path``, else None."""
    try:
        summary = json.loads((path / "summary.json").read_text())
        same = config_lib.load(path / "config.toml") == cfg
    except (OSError, ValueError, ConfigError):
        return None
    return summary if summary.get("status") == "completed" and same and (path / "model.pt").exists() else None


def train_all(preset: Preset, out: Path, *, overwrite: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    plan = planned_runs(preset, out)
    results = []
    for i, (part, width, spec, cfg, path) in enumerate(plan, 1):
        summary = None if overwrite else _finished(path, cfg)
        if summary is not None:
            log(f"[{i}/{len(plan)}] w{width} {spec.label}: reusing the finished run in {path}")
        else:
            log(f"[{i}/{len(plan)}] w{width} {spec.label} -> {path}")
            try:
                summary = train.run_or_resume(cfg, path, label=spec.label)  # a killed run continues
            except (ConfigError, data.DatasetNotFoundError):
                raise
            except Exception as e:  # recorded in the run's summary.json and error.txt; the study goes on
                summary = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            log(f"    {summary.get('status')}: train acc {_fmt(summary.get('final_train_accuracy'))}, "
                f"test acc {_fmt(summary.get('final_test_accuracy'))}, {_fmt(summary.get('train_seconds'), '.0f')} s")
        results.append({
            "part": part, "width": width, "spec": spec.label, "method": family(spec), "label": label(spec),
            "k": spec.options.get("k"), "dir": str(path.relative_to(out)),
            **{k: summary.get(k) for k in ("status", "reason", "final_train_accuracy", "final_test_accuracy",
                                           "final_train_loss", "steps", "train_seconds", "ms_per_step")},
        })
    return results


# ----------------------------------------------------------------------------- measurements


def _fixed_batch(preset: Preset, width: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    cfg = config_lib.resolve(base_config(preset, width))
    splits = data.load(cfg.data.name, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, **cfg.data.options)
    model = models.make(cfg.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        seed=cfg.train.seed, **cfg.model.options)
    n = min(cfg.data.batch_size, len(splits.train))
    return model, splits.train.x[:n], splits.train.y[:n]


def subspace_energy(model: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                    ks: tuple[int, ...] = ENERGY_KS) -> dict[str, dict[int, float]]:
    """Per hidden layer: mean_b ‖V_kV_kᵀ g_{i,b}‖² / ‖g_{i,b}‖² with W̃_b = W_{i+1}M_b = UΛVᵀ (exact SVD).

    The share of each example's true pre-activation gradient that a guess
    confined to the top-k right singular subspace of its upstream Jacobian
    can reach (W-perp's premise). Examples with g = 0 are skipped.
    """
    layers = guessed.relu_mlp_layers(model, "subspace_energy")
    acts, h = [], x
    for i, layer in enumerate(layers):
        s = layer(h)
        s.retain_grad()
        acts.append(s)
        h = torch.relu(s) if i + 1 < len(layers) else s
    F.cross_entropy(h, y).backward()
    model.zero_grad(set_to_none=True)
    out = {}
    for i in range(len(layers) - 1):
        s, g = acts[i].detach().double(), acts[i].grad.double()
        w_next = layers[i + 1].weight.detach().double()
        vh = guessed.top_right_singular(s, w_next, "rank", "svd", torch.Generator())  # all, descending
        coords = torch.einsum("bkn,bn->bk", vh, g).square()  # energy per singular direction
        total = g.square().sum(1)
        live = total > 0
        out[f"layer{i}"] = {k: float((coords[live, :k].sum(1) / total[live]).mean()) for k in ks}
    return out


def measure_quality(preset: Preset, width: int, weights: Path | None, *, samples: int, seed: int = 0,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Quality of every quality method, and the gradient structure, at one checkpoint."""
    model, x, y = _fixed_batch(preset, width)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))  # tensors only: no code runs
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    rows = []
    for text in preset.quality_methods:
        spec = compare.parse_spec(text)
        if width > preset.quality_max_width.get(text, 1 << 30):
            continue
        est = estimators.make(spec.name, **spec.options)
        t0 = time.perf_counter()
        rep = quality.estimator_quality(est, model, closure, samples=samples,
                                        generator=torch.Generator().manual_seed(seed), per_layer=False)
        rows.append({
            "spec": text, "method": spec.name, "label": label(spec), "cosine_mean": rep.cosine_mean,
            "cosine_std": rep.cosine_std, "cosine_of_mean": rep.cosine_of_mean,
            "variance_per_coord": rep.variance_per_coord,
            "bias_sq_per_coord": rep.bias_sq_per_coord_corrected, "relative_bias": rep.relative_bias_corrected,
            "seconds_per_draw": (time.perf_counter() - t0) / samples,
        })
    n_energy = min(preset.energy_examples, len(y))
    energy = subspace_energy(model, x[:n_energy], y[:n_energy])
    batch_structure = quality.per_example_gradient_structure(model, closure, ks=ENERGY_KS)
    log(f"    w{width} {'trained' if weights else 'init'}: " + ", ".join(
        f"{r['label']} cos {r['cosine_mean']:.3f}" for r in rows))
    return {
        "methods": rows,
        "subspace_energy": energy,
        "batch_top_k_energy": {name: s["top_k_energy"] for name, s in batch_structure.items()},
    }


def quality_all(preset: Preset, out: Path, trained: dict[int, Path], *, log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for width in preset.widths:
        res[str(width)] = {
            "init": measure_quality(preset, width, None, samples=preset.quality_samples, log=log),
            "trained": measure_quality(preset, width, trained[width], samples=preset.quality_samples, log=log)
            if width in trained else None,
        }
    return res


# ----------------------------------------------------------------------------- the study


def run_study(preset: str = "cpu", out: str | Path = "runs/wang2025", *, overwrite: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole study (resuming finished runs) and write ``study.json`` and the report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = get_preset(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planned_runs(p, out)  # every spec and config error surfaces before anything trains
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "study": NAME, "preset": dataclasses.asdict(p),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        **provenance.code_version(),
    }
    log(f"{NAME} preset {p.name}: {p.description}")
    record["training"] = train_all(p, out, overwrite=overwrite, log=log)
    runs.write_json(out / "study.json", record)
    trained = {}
    for r in record["training"]:
        if r["method"] == "backprop" and r["status"] == "completed":
            trained[r["width"]] = out / r["dir"] / "model.pt"
    log("gradient quality and structure (init and backprop-trained weights)")
    record["quality"] = quality_all(p, out, trained, log=log)
    record["seconds"] = time.perf_counter() - t0
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs.write_json(out / "study.json", record)
    record["report"] = write_report(record, out)
    runs.write_json(out / "study.json", record)
    log(f"report: {out / 'report.html'}")
    return record


# ----------------------------------------------------------------------------- the report


def memory_runs(record: dict[str, Any], out: Path) -> list[runs.Run]:
    """The study's measured training runs, read back for the memory view (``bpfree.report.memory``)."""
    found = []
    for r in record.get("training", []):
        path = out / r["dir"]
        if runs.is_run_dir(path):
            run = runs.read_run(path)
            run.summary.setdefault("label", f"w{r['width']} {r['label']}")
            found.append(run)
    return found


def rebuild_report(out: str | Path) -> dict[str, Any]:
    """Rewrite the report of a finished study from its ``study.json`` alone (no training, no measuring)."""
    out = Path(out)
    try:
        record = json.loads((out / "study.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out} holds no study.json; run the study first (bpfree study run {NAME})") from None
    if "quality" not in record:
        raise ConfigError(f"the study in {out} did not finish (no quality measurements); run it again to resume")
    record["report"] = write_report(record, out)
    runs.write_json(out / "study.json", record)
    return record


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def width_table(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Train accuracy by width, ours / the paper's, one column per method."""
    rows = [r for r in record["training"] if r["part"] == "width"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "w_perp_ns"))
    header = ["width"] + [f"{LABELS.get(m, m)} ours / paper" for m in methods]
    body = []
    for width in sorted({r["width"] for r in rows}):
        cells = [str(width)]
        for m in methods:
            ours = next((r for r in rows if r["width"] == width and r["method"] == m), None)
            paper = PAPER_TRAIN_ACC.get(width, {}).get(m)
            cells.append(f"{_fmt(ours and ours['final_train_accuracy'])} / {_fmt(paper)}")
        body.append(cells)
    return header, body


def k_sweep_table(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    width = record["preset"]["k_sweep_width"]
    rows = {r["spec"]: r for r in record["training"] if r["width"] == width}
    body = []
    for text in record["preset"]["k_sweep"]:
        r = rows.get(text)
        spec = compare.parse_spec(text)
        key = "wt_guess" if spec.name == "wt_guess" else spec.options.get("k", 10)
        body.append([label(spec), _fmt(r and r["final_train_accuracy"]), _fmt(r and r["final_test_accuracy"]),
                     _fmt(PAPER_K_SWEEP.get(key) if width == 128 else None)])
    return ["method", "train acc (ours)", "test acc (ours)", "train acc (paper)"], body


def quality_table(record: dict[str, Any], width: int, where: str) -> tuple[list[str], list[list[str]]]:
    q = (record["quality"].get(str(width)) or {}).get(where)
    body = []
    for r in (q or {}).get("methods", []):
        k10 = r["method"] == "wt_guess" or compare.parse_spec(r["spec"]).options.get("k") == 10
        paper = PAPER_BIAS_VARIANCE.get(r["method"]) if width == 128 and k10 else None
        body.append([r["label"], _fmt(r["cosine_mean"], ".4f"), _fmt(r["cosine_of_mean"], ".3f"),
                     _fmt(r["variance_per_coord"], ".3g"), _fmt(r["bias_sq_per_coord"], ".3g"),
                     _fmt(r["relative_bias"], ".3f"),
                     f"{_fmt(paper[0], '.3g')} / {_fmt(paper[1], '.3g')}" if paper else "",
                     _fmt(r["seconds_per_draw"] * 1e3, ".0f")])
    return ["method", "cos to ∇ (mean of draws)", "cos(mean estimate, ∇)", "variance / coord",
            "bias² / coord (corrected)", "‖bias‖/‖∇‖", "paper var / bias", "ms / draw"], body


def energy_table(record: dict[str, Any], where: str) -> tuple[list[str], list[list[str]]]:
    body = []
    for width, q in record["quality"].items():
        q = q.get(where)
        if not q:
            continue
        for layer, shares in q["subspace_energy"].items():
            body.append([width, layer] + [_fmt(shares[str(k)] if str(k) in shares else shares.get(k)) for k in ENERGY_KS])
    return ["width", "hidden layer"] + [f"top-{k}" for k in ENERGY_KS], body


def verdicts(record: dict[str, Any]) -> list[str]:
    """Plain statements of which of the paper's claims our numbers support."""
    rows = [r for r in record["training"] if r["part"] == "width" and r["status"] == "completed"]
    acc = {(r["width"], r["method"]): r["final_train_accuracy"] for r in rows}
    widths = sorted({w for w, _ in acc})
    out = []
    order = ["forward_gradient", "activity_perturbation", "wt_guess", "w_perp", "backprop"]
    holds = [w for w in widths if all((w, m) in acc for m in order)
             and all(acc[(w, a)] <= acc[(w, b)] + 0.01 for a, b in zip(order, order[1:]))]
    out.append(f"Ordering weight pert. ≤ activity pert. ≤ W^T ≤ W-perp ≤ backprop (within 0.01): holds at widths "
               f"{holds or 'none'} of {widths}.")
    gaps = {w: acc[(w, "w_perp")] - acc[(w, "wt_guess")] for w in widths if (w, "w_perp") in acc and (w, "wt_guess") in acc}
    if len(gaps) >= 2:
        ws = sorted(gaps)
        grows = all(gaps[b] >= gaps[a] - 0.005 for a, b in zip(ws, ws[1:]))
        out.append("W-perp minus W^T train accuracy by width: " + ", ".join(f"{w}: {gaps[w]:+.3f}" for w in ws)
                   + (" — the advantage grows with width." if grows and gaps[ws[-1]] > gaps[ws[0]]
                      else " — it does not grow monotonically with width."))
    guessed_gain = {w: acc[(w, "w_perp")] - acc[(w, "activity_perturbation")] for w in widths
                    if (w, "w_perp") in acc and (w, "activity_perturbation") in acc}
    if guessed_gain:
        out.append("W-perp minus activity perturbation: " + ", ".join(f"{w}: {v:+.3f}" for w, v in sorted(guessed_gain.items())))
    return out


def _plots(record: dict[str, Any], out: Path) -> dict[str, bytes]:
    """``{name: PNG bytes}`` of the study's figures (the training-loss figure reads the runs under ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    rows = [r for r in record["training"] if r["part"] == "width"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "w_perp_ns"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for m in methods:
        ws = sorted(r["width"] for r in rows if r["method"] == m)
        ours = [next(r["final_train_accuracy"] for r in rows if r["method"] == m and r["width"] == w) for w in ws]
        line, = axes[0].plot(ws, ours, "o-", label=LABELS.get(m, m))
        paper_ws = [w for w in ws if m in PAPER_TRAIN_ACC.get(w, {})]
        axes[1].plot(paper_ws, [PAPER_TRAIN_ACC[w][m] for w in paper_ws], "s--", color=line.get_color(), label=LABELS.get(m, m))
    for ax, title in zip(axes, (f"ours ({record['preset']['name']} preset, {record['preset']['epochs']} epochs)",
                                "paper (300 epochs)")):
        if ax.lines and any(len(line.get_xdata()) for line in ax.lines):
            ax.set_xscale("log", base=2)
        else:
            ax.text(0.5, 0.5, "no paper numbers at these widths", ha="center", transform=ax.transAxes)
        ax.set_xlabel("hidden width")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train accuracy (4000 examples)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Train accuracy by width, MNIST-1D, 3 hidden ReLU layers")
    fig.tight_layout()
    files["accuracy_vs_width"] = _png(fig)

    for where in ("init", "trained"):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        per_method: dict[str, list[tuple[int, float]]] = {}
        for width, q in record["quality"].items():
            for r in ((q or {}).get(where) or {}).get("methods", []):
                per_method.setdefault(r["label"], []).append((int(width), r["cosine_mean"]))
        if not per_method:
            plt.close(fig)
            continue
        for name, pts in per_method.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_xscale("log", base=2)
        positive = all(p[1] > 0 for pts in per_method.values() for p in pts)
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("hidden width")
        ax.set_ylabel("mean cosine of one estimate to ∇" + (" (log)" if positive else ""))
        ax.set_title(f"Cosine to the exact gradient vs width ({'backprop-trained' if where == 'trained' else 'initial'} weights)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files[f"cosine_vs_width_{where}"] = _png(fig)

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for width, q in record["quality"].items():
            q = (q or {}).get(where)
            if not q:
                continue
            shares = q["subspace_energy"].get("layer1") or next(iter(q["subspace_energy"].values()))
            ax.plot(ENERGY_KS, [shares.get(str(k), shares.get(k)) for k in ENERGY_KS], "o-", label=f"width {width}")
        ax.set_xscale("log")
        ax.set_xlabel("k (top right singular directions of W̃ = W_{i+1} M_i)")
        ax.set_ylabel("share of ‖∂ℓ/∂s‖² in that subspace")
        ax.set_title(f"Low-dimensional gradients: hidden layer 1 ({where} weights)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files[f"energy_{where}"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = record["preset"]["k_sweep_width"]
    for r in record["training"]:
        if r["width"] != width or r["status"] != "completed":
            continue
        metrics = runs.read_run(out / r["dir"]).metrics
        steps, loss = metrics.get("step", []), metrics.get("loss", [])
        if steps:
            smooth, acc = [], None
            for v in loss:
                acc = v if acc is None else 0.9 * acc + 0.1 * v
                smooth.append(acc)
            ax.plot(steps, smooth, label=r["label"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (EMA 0.9)")
    ax.set_title(f"Training loss at width {width}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files["training_loss"] = _png(fig)
    return files


def _png(fig) -> bytes:
    """The pyplot figure as PNG bytes (110 dpi), closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(record: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``report.md``, ``report.html`` and the figures into ``out``; return their file names."""
    from bpfree.report import document

    written = document.write(report_document(record, out), out)
    return {"markdown": "report.md", "html": "report.html",
            **{Path(f).stem: f for f in written if f.endswith(".png")}}


def report_document(record: dict[str, Any], out: Path) -> Any:
    """The study's report (``bpfree.report.document``): what reproduces, then one section per
    table of the paper with our numbers beside theirs and the figures, then the memory view."""
    from bpfree.report.document import Document, Figure, Heading, Notes, Paragraph, Table

    p = record["preset"]
    figures = _plots(record, out)
    sections: list[tuple[str, str, tuple[list[str], list[list[str]]] | None, list[str]]] = []
    sections.append(("Train accuracy by width (their Table 3)",
                     f"Final accuracy on the 4000 training examples after {p['epochs']} epochs (paper: 300). "
                     "Weight perturbation is the forward gradient with dense Gaussian directions.",
                     width_table(record), ["accuracy_vs_width", "training_loss"]))
    sections.append((f"k sweep at width {p['k_sweep_width']} (their Table 1)", "", k_sweep_table(record), []))
    for where in ("init", "trained"):
        w = 128 if "128" in record["quality"] else int(next(iter(record["quality"])))
        sections.append((f"Gradient quality at width {w}, {where} weights (their Table 2)",
                         f"{p['quality_samples']} draws on one fixed batch of 512 training examples. Variance and "
                         "squared bias are means over coordinates (bias corrected for the sampling noise of the "
                         "mean). The paper's table does not state its normalisation, so compare the W^T / W-perp "
                         "ratios, not the absolute values.", quality_table(record, w, where),
                         [f"cosine_vs_width_{where}"]))
        sections.append((f"Where the gradient lives ({where} weights)",
                         "Share of each example's exact ∂ℓ/∂s_i inside the top-k right singular subspace of its "
                         "upstream Jacobian W̃ = W_{i+1}M_i (what a W-perp guess can reach), averaged over "
                         f"{p['energy_examples']} examples.", energy_table(record, where), [f"energy_{where}"]))
    doc = Document(TITLE)
    doc.add(
        Paragraph(f"Preset **{p['name']}**: {p['description']}", meta=True),
        Paragraph(f"Run {record['started_at']} → {record.get('finished_at')}, "
                  f"{_fmt(record.get('seconds', 0) / 60, '.1f')} min, torch {record['torch_version']} with "
                  f"{record['torch_threads']} thread(s). Runs under `runs/`; all numbers in `study.json`.", meta=True),
        Paragraph(f"Code: {provenance.line(record)}", meta=True),
        Heading("What reproduces"), Notes(verdicts(record)),
    )
    for title, text, table, figs in sections:
        doc.add(Heading(title), [Paragraph(text)] if text else [],
                [Table(*table)] if table and table[1] else [],
                [Figure(f, figures[f], f"{f}.png") for f in figs if f in figures])
    doc.add(memory_view.blocks(memory_runs(record, out)))
    return doc


__all__ = ["NAME", "PAPER_TRAIN_ACC", "Preset", "get_preset", "planned_runs", "presets", "rebuild_report", "run_study",
           "subspace_energy", "write_report"]
