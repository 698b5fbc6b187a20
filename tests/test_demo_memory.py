"""The demo's memory story (``configs/demo.toml``): the measured peaks of its settings follow
the arithmetic written into the report (``bpfree.report.memory``).

Memory depends on shapes only, so each spec's step is measured on a Fashion-MNIST-shaped
random batch (no data set needed), exactly as ``bpfree.train`` measures it before training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bpfree import config as C
from bpfree import estimators, models
from bpfree.measure.profile import training_step_cost
from bpfree.report import memory as memory_view
from bpfree.runs import Run
from bpfree.studies import compare
from bpfree.train import make_optimizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def measured_runs(config_path: Path) -> list[Run]:
    base = C.load(config_path)
    out = []
    for spec, cfg in compare.plan(base, compare.parse_specs(list(base.compare.estimators)), base.compare.lr):
        model = models.make(cfg.model.name, input_shape=(1, 28, 28), num_classes=10, seed=cfg.train.seed,
                            **cfg.model.options)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(cfg.data.batch_size, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (cfg.data.batch_size,), generator=g)
        est = estimators.make(cfg.estimator.name, **cfg.estimator.options)
        cost = training_step_cost(model, est, lambda m=model: F.cross_entropy(m(x), y),
                                  lambda m: make_optimizer(cfg.optimizer, m.parameters()))
        summary = {"label": spec.label, "estimator": {"name": cfg.estimator.name, "options": cfg.estimator.options},
                   "optimizer": dataclasses.asdict(cfg.optimizer), **cost}
        out.append(Run(Path(spec.dirname), {}, summary))
    return out


@pytest.fixture(scope="module")
def demo_runs():
    return measured_runs(DEMO)


def test_demo_peaks_follow_the_arithmetic(demo_runs):
    assert memory_view.ordering_violations(demo_runs) == []
    classes = {memory_view.memory_class(r.summary) for r in demo_runs}
    assert classes == {0, 1, 2, 3}, "the demo shows every memory class"


def test_demo_peaks_differ_where_the_arithmetic_says(demo_runs):
    by = {r.label: r.summary for r in demo_runs}
    est = {k: s["estimate_peak_memory_mb"] for k, s in by.items()}
    step = {k: s["peak_memory_mb"] for k, s in by.items()}
    p = by["backprop"]["parameters_mb"]
    # MeZO's update mode holds no p.grad: about one inference
    update = next(k for k, s in by.items() if memory_view.memory_class(s) == 0)
    assert est[update] == pytest.approx(by[update]["inference_peak_mb"], abs=0.05 * p)
    # backprop saves activations, checkpointing saves part of them
    bp, ck = by["backprop"], by["backprop:checkpoint=sqrt"]
    assert bp["estimate_memory_by_category_mb"]["activations"] > 0.5 * p
    assert est["backprop:checkpoint=sqrt"] < est["backprop"] - 0.25 * p
    assert ck["estimate_memory_by_category_mb"]["activations"] < bp["estimate_memory_by_category_mb"]["activations"]
    # SGD rows beside Adam rows: same estimate, the step differs by Adam's state
    sgd = [k for k, s in by.items() if s["optimizer"]["name"] == "sgd" and memory_view.memory_class(s)]
    assert sgd, "the demo has SGD rows"
    for k in sgd:
        assert step[k] == pytest.approx(est[k], abs=memory_view.resolution(demo_runs))
    for k, s in by.items():
        if s["optimizer"]["name"] == "adam" and memory_view.memory_class(s):
            assert step[k] >= 4 * p - memory_view.resolution(demo_runs)


def test_ordering_check_catches_a_wrong_peak(demo_runs):
    """The check can fail: swap backprop's estimate peak with MeZO update mode's."""
    runs = [dataclasses.replace(r, summary=dict(r.summary)) for r in demo_runs]
    bp = next(r for r in runs if r.label == "backprop")
    upd = next(r for r in runs if memory_view.memory_class(r.summary) == 0)
    bp.summary["estimate_peak_memory_mb"], upd.summary["estimate_peak_memory_mb"] = (
        upd.summary["estimate_peak_memory_mb"], bp.summary["estimate_peak_memory_mb"])
    bad = memory_view.ordering_violations(runs)
    assert bad and any("is not below" in b for b in bad) and any("exceeds inference" in b for b in bad)
