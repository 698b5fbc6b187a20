"""Instruments: FLOPs against the analytic formulas, the CPU memory tracker, timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.measure import flops, memory, timing

WIDTHS = (784, 256, 256, 10)
B = 32


def mlp_problem():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x, y = torch.randn(B, WIDTHS[0]), torch.arange(B) % 10
    return model, lambda: F.cross_entropy(model(x), y)


def test_flops_match_the_analytic_mlp_formulas():
    model, closure = mlp_problem()
    assert flops.forward_flops(closure) == flops.mlp_forward_flops(B, WIDTHS)
    bp = flops.step_flops(estimators.make("backprop"), model, closure)
    assert bp.step == flops.mlp_backprop_flops(B, WIDTHS)
    fg = flops.step_flops(estimators.make("forward_gradient", rank="full"), model, closure)
    assert fg.step == flops.mlp_jvp_flops(B, WIDTHS, tangents=1)  # the counter sees the tangent ops
    assert fg.forward_equivalents == pytest.approx(3.0)
    for name in ("spsa", "mezo"):
        zo = flops.step_flops(estimators.make(name, rank="full"), model, closure)
        assert zo.step == 2 * flops.mlp_forward_flops(B, WIDTHS)
    # rank-1 directions (the default): the weight tangent/perturbation is A(Bᵀx), 2B(m + n) per
    # layer and evaluation; the gradient d·a bᵀ is an elementwise outer product (mn multiplies),
    # which FlopCounterMode (matmuls and convolutions only) does not count; at rank r > 1 it is a
    # GEMM with inner dimension r (2mnr), which it does
    f = flops.mlp_forward_flops(B, WIDTHS)
    layers = list(zip(WIDTHS[:-1], WIDTHS[1:]))
    lowrank = sum(2 * B * (a + b) for a, b in layers)
    fg1 = flops.step_flops(estimators.make("forward_gradient"), model, closure)
    assert fg1.step == f + (f - 2 * B * WIDTHS[0] * WIDTHS[1]) + lowrank  # primal + W·dx (not layer 1)
    fg2 = flops.step_flops(estimators.make("forward_gradient", rank=2), model, closure)
    assert fg2.step == f + (f - 2 * B * WIDTHS[0] * WIDTHS[1]) + 2 * lowrank + sum(4 * a * b for a, b in layers)
    # zeroth order in one pass (_chain): the first layer's W x and Bᵀx once for both branches, every
    # later layer's GEMM and Bᵀx per branch; the rank-1 expansion A(Bᵀx) is an elementwise
    # outer product, which FlopCounterMode (matmuls and convolutions only) does not count
    first = 2 * B * WIDTHS[0] * WIDTHS[1]
    projections = 2 * B * WIDTHS[0] + 2 * sum(2 * B * a for a, _ in layers[1:])
    for name in ("spsa", "mezo"):
        zo1 = flops.step_flops(estimators.make(name), model, closure)
        assert zo1.step == 2 * f - first + projections  # the rank-1 gradient is elementwise too


def test_checkpointing_adds_a_partial_recompute():
    model, closure = mlp_problem()
    plain = flops.step_flops(estimators.make("backprop"), model, closure).step
    ckpt = flops.step_flops(estimators.make("backprop", checkpoint=2), model, closure).step
    fwd = flops.mlp_forward_flops(B, WIDTHS)
    assert plain < ckpt <= plain + fwd


def test_memory_tracker_matches_analytic_saved_activations():
    model, closure = mlp_problem()
    kept = {}

    def forward_only():
        kept["loss"] = closure()  # keep the graph alive: its saved tensors are the activations

    report = memory.measure_step_memory(forward_only, model=model)
    # saved for backward: each hidden Linear's input (= the previous ReLU's output, the same
    # storage) and the log-softmax of the logits; the input batch predates the step.
    expected = 4 * B * (sum(WIDTHS[1:-1]) + WIDTHS[-1])
    assert report.by_category["activations"] == pytest.approx(expected, rel=0.1)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.by_category["parameters"] == params
    assert report.peak_bytes >= params + expected
    del kept


def test_checkpointing_lowers_saved_activation_bytes_on_a_deep_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(24) for m in (nn.Linear(128, 128), nn.ReLU())], nn.Linear(128, 10))
    x, y = torch.randn(64, 128), torch.arange(64) % 10
    peaks = {}
    for spec in ("none", "sqrt"):
        est = estimators.make("backprop", checkpoint=spec)
        kept = {}

        def forward_only(est=est):
            from bpfree.estimators.backprop import checkpointed

            with checkpointed(model, est.checkpoint):
                kept["loss"] = F.cross_entropy(model(x), y)

        peaks[spec] = memory.measure_step_memory(forward_only, model=model).by_category["activations"]
    assert peaks["sqrt"] < 0.4 * peaks["none"]


def test_mezo_update_mode_peak_is_inference_plus_one_tensor():
    model, closure = mlp_problem()
    with torch.no_grad():
        inference = memory.measure_step_memory(closure, model=model).peak_bytes
    est = estimators.make("mezo", lr=1e-6)
    est.estimate(model, closure)
    report = memory.measure_step_memory(lambda: est.estimate(model, closure), model=model)
    largest = max(p.numel() * 4 for p in model.parameters())
    assert report.by_category["gradients"] == 0 and all(p.grad is None for p in model.parameters())
    # MeZO's bound: inference + one regenerated piece of z (CHUNK values) and its random words
    from bpfree.estimators.zeroth_order import CHUNK

    assert report.peak_bytes <= inference + CHUNK * 4 * 1.2
    assert CHUNK * 4 < largest  # so the bound is tighter than "inference + the largest tensor"
    # grad mode writes .grad: at most parameters' worth more, and no persistent copies of θ
    grad_mode = estimators.make("mezo")
    report_grad = memory.measure_step_memory(lambda: grad_mode.estimate(model, closure), model=model)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report_grad.peak_bytes <= inference + params + 4 * largest


def test_directions_and_gradients_are_attributed():
    model, closure = mlp_problem()
    est = estimators.make("spsa", num_directions=2, rank="full")
    opt = torch.optim.Adam(model.parameters())
    est.estimate(model, closure)
    opt.step()

    def step():
        est.estimate(model, closure)
        opt.step()

    report = memory.measure_step_memory(step, model=model, optimizer=opt)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.by_category["optimizer_state"] >= 2 * params  # Adam's two moments
    assert report.category_max["directions"] >= 2 * params  # K = 2 directions drawn at once
    assert report.category_max["gradients"] == params


def test_interleaved_timing_orders_and_reports():
    calls = []
    fast = lambda: calls.append("fast")  # noqa: E731

    def slow():
        calls.append("slow")
        sum(range(20000))

    out = timing.time_interleaved({"fast": fast, "slow": slow}, warmup=2, repeats=9)
    assert out["slow"].median_ms > out["fast"].median_ms
    assert len(out["fast"].samples_ms) == 9 and calls[:4] == ["fast", "fast", "slow", "slow"]
    timed = calls[4:]
    assert timed[:2] == ["fast", "slow"] and timed[2:4] == ["slow", "fast"]  # rotated each round
    lo, hi = out["slow"].iqr_ms
    assert lo <= out["slow"].median_ms <= hi


def test_profile_table_has_every_measurement_and_ratios():
    from bpfree.measure.profile import EstimatorSpec, add_ratios, markdown_table, profile_estimators

    model, closure = mlp_problem()
    specs = [EstimatorSpec("bp", "backprop", {}), EstimatorSpec("fg", "forward_gradient", {"rank": "full"}),
             EstimatorSpec("mezo-update", "mezo", {"lr": 1e-9})]
    rows = profile_estimators(specs, model, closure, repeats=3, warmup=1, cosine_draws=3)
    by = {r["label"]: r for r in rows}
    assert by["bp"]["cosine_mean"] == pytest.approx(1.0)
    assert 0 < by["fg"]["cosine_mean"] < 0.2 and 0 < by["mezo-update"]["cosine_mean"] < 0.2
    assert by["fg"]["flops_forward_equivalents"] == pytest.approx(3.0)
    assert by["bp"]["mb_gradients"] > 0 and by["mezo-update"]["mb_gradients"] == 0
    assert by["mezo-update"]["peak_over_inference"] < by["bp"]["peak_over_inference"]
    ratios = {r["label"]: r for r in add_ratios(rows, "bp")}
    assert ratios["bp"]["time_ratio"] == 1.0 and ratios["fg"]["flops_ratio"] > 1.0
    table = markdown_table(rows, [("label", "estimator", ""), ("ms_per_step", "ms", ".2f")])
    assert table.count("\n") == 4 and "| fg |" in table


def test_views_of_preexisting_data_are_not_counted():
    """A batch that is a view of a big data tensor (and views of it in the model) costs nothing."""
    model, _ = mlp_problem()
    big = torch.randn(5000, WIDTHS[0])  # the "data set", alive before the step
    x, y = big[:B], torch.arange(B) % 10
    with torch.no_grad():
        report = memory.measure_step_memory(lambda: F.cross_entropy(model(x.reshape(B, -1)), y), model=model)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.peak_bytes < params + 4 * B * sum(WIDTHS) + 4096
