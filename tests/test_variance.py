"""Variance-reduction schemes against the exact-gradient oracle, and the contract over every variant.

Unbiased schemes (accumulate, SVRG) are checked by per-coordinate z-scores of the mean of many
estimates against ∇f; biased ones (adaptive, sparse, sign, conservative) against their derived
expectation (``bpfree.estimators.theory``, each scheme's docstring). Small models, so each test
takes a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.estimators import theory, variance
from bpfree.estimators.variance.sparse import magnitude_mask
from conftest import exact_gradient, flat_grad, make_problem, param_bits

# (label, name, options): every scheme, and compositions, on the three directional estimators
VARIANTS = [
    ("fg-adaptive", "forward_gradient", {"adaptive_candidates": 4}),
    ("fg-adaptive-seed000", "forward_gradient", {"adaptive_candidates": 4, "adaptive_rule": "seed000"}),
    ("fg-svrg-K4", "forward_gradient", {"num_directions": 4, "svrg_every": 3, "svrg_directions": 4}),
    ("fg-sparse", "forward_gradient", {"sparse_fraction": 0.2}),
    ("fg-sign", "forward_gradient", {"sign": True}),
    ("fg-conservative", "forward_gradient", {"conservative_lr": 1e-2}),
    ("spsa-adaptive-K2", "spsa", {"num_directions": 2, "adaptive_candidates": 3, "eps": 1e-4}),
    ("spsa-svrg-sparse", "spsa", {"svrg_every": 2, "svrg_directions": 3, "sparse_fraction": 0.3, "eps": 1e-4}),
    ("spsa-sign-dense", "spsa", {"sign": True, "rank": "full", "eps": 1e-4}),
    ("spsa-conservative", "spsa", {"conservative_lr": 1e-2, "eps": 1e-4}),
    ("mezo-sparse", "mezo", {"sparse_fraction": 0.1, "sparse_rule": "largest", "eps": 1e-4}),
    ("mezo-sparse-dense", "mezo", {"sparse_fraction": 0.1, "rank": "full", "eps": 1e-4}),
    ("mezo-svrg", "mezo", {"svrg_every": 2, "svrg_directions": 2, "eps": 1e-4}),
    ("mezo-svrg-dense", "mezo", {"svrg_every": 2, "svrg_directions": 2, "rank": "full", "eps": 1e-4}),
    ("mezo-sign", "mezo", {"sign": True, "eps": 1e-4}),
    ("mezo-conservative", "mezo", {"conservative_lr": 1e-2, "eps": 1e-4}),
]
IDS = [v[0] for v in VARIANTS]


def run_steps(est, prob, seeds):
    out = []
    for s in seeds:
        est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(s))
        out.append([p.grad.clone() for p in prob.model.parameters()])
    return out


# --------------------------------------------------------------------------- the contract, every variant


@pytest.mark.parametrize("label, name, options", VARIANTS, ids=IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "layernorm"])
def test_every_variant_keeps_the_contract(label, name, options, kind):
    """Parameters bit-identical, every p.grad overwritten with its shape and dtype, the same
    generator states give the same estimates (two fresh estimators), the global RNG untouched."""
    prob = make_problem(kind)
    before = param_bits(prob.model)
    for p in prob.model.parameters():
        p.grad = torch.full_like(p, 1e6)
    rng = torch.get_rng_state()
    a = run_steps(estimators.make(name, **options), prob, [1, 2, 3])
    b = run_steps(estimators.make(name, **options), prob, [1, 2, 3])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(before, param_bits(prob.model)))
    for ga, gb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    for p in prob.model.parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype and p.grad.abs().max() < 1e5
    c = run_steps(estimators.make(name, **options), prob, [9, 2, 3])
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0]))


@pytest.mark.parametrize("label, name, options", VARIANTS, ids=IDS)
def test_state_dict_resumes_bit_identically(label, name, options):
    """Three steps, save, one more; a fresh estimator loaded with the state gives the same step."""
    prob = make_problem("mlp")
    est = estimators.make(name, **options)
    run_steps(est, prob, [1, 2, 3])
    state = est.state_dict()
    ref = run_steps(est, prob, [4])[0]
    fresh = estimators.make(name, **options)
    fresh.load_state_dict(state)
    got = run_steps(fresh, prob, [4])[0]
    assert all(torch.equal(x, y) for x, y in zip(ref, got))


def test_scheme_options_are_checked_and_reachable_from_specs():
    assert {"svrg_every", "sparse_fraction", "adaptive_candidates", "sign", "conservative_lr"} <= set(
        estimators.option_names("mezo"))
    with pytest.raises(ValueError, match="sparse_rule needs sparse_fraction"):
        estimators.make("mezo", sparse_rule="largest")
    with pytest.raises(ValueError, match="smallest, largest"):
        estimators.make("mezo", sparse_fraction=0.1, sparse_rule="big")
    with pytest.raises(ValueError, match="adaptive does not compose with 'mezo'"):
        estimators.make("mezo", adaptive_candidates=4)
    with pytest.raises(ValueError, match="update mode"):
        estimators.make("mezo", lr=1e-3, svrg_every=10)
    est = estimators.make("forward_gradient", num_directions=4, svrg_every=10, sparse_fraction=0.5)
    assert [s.name for s in est.schemes] == ["sparse", "svrg"]  # canonical order
    opts = est.options()
    assert opts["svrg_every"] == 10 and opts["sparse_fraction"] == 0.5 and "schemes" not in opts
    assert estimators.make("forward_gradient", **opts) == est  # options() round-trips
    from bpfree.studies.compare import parse_spec

    spec = parse_spec("mezo:sparse_fraction=0.01:sparse_rule=smallest:train.accumulate=4")
    assert spec.options == {"sparse_fraction": 0.01, "sparse_rule": "smallest"}
    assert spec.overrides == {"train.accumulate": 4}


# --------------------------------------------------------------------------- unbiased: accumulate


def test_accumulate_with_backprop_is_the_gradient_of_the_mean_loss():
    prob = make_problem("mlp")
    halves = [(prob.x[:8], prob.y[:8]), (prob.x[8:], prob.y[8:])]
    closures = [lambda x=x, y=y: F.cross_entropy(prob.model(x), y) for x, y in halves]
    out = estimators.accumulate(estimators.make("backprop"), prob.model, closures)
    expect = exact_gradient(prob.model, prob.closure)  # equal halves: mean of the two means
    torch.testing.assert_close(flat_grad(prob.model), expect, rtol=1e-10, atol=1e-12)
    assert out.details["accumulated"] == 2 and out.forward_passes == 6


def test_accumulated_forward_gradient_is_unbiased_with_a_smaller_variance():
    """Mean over many accumulated estimates → ∇f of the mean loss (z-scores from the known
    variance (N − 1)/(K·n) per estimate)."""
    prob = make_problem("mlp", batch=8)
    x2, y2 = prob.x.flip(0), prob.y.flip(0)
    closures = [prob.closure, lambda: F.cross_entropy(prob.model(x2), y2)]
    g1 = exact_gradient(prob.model, closures[0])
    g2 = exact_gradient(prob.model, closures[1])
    grad = (g1 + g2) / 2
    est, gen = estimators.make("forward_gradient", rank="full"), torch.Generator().manual_seed(0)
    samples = torch.stack([(estimators.accumulate(est, prob.model, closures, generator=gen), flat_grad(prob.model))[1]
                           for _ in range(300)])
    z = (samples.mean(0) - grad) / (samples.std(0) / math.sqrt(len(samples)))
    assert z.abs().max() < 5.5 and 0.7 < float(z.square().mean()) < 1.3
    n = grad.numel()
    # E‖g − ∇‖² for the mean of two independent estimates of two gradients: (Σ_b (n − 1)‖g_b‖²... )/4
    # bounded by the K = 2 value on the mean gradient when g1 ≈ g2; check it is about half of K = 1's
    err = float((samples - grad).square().sum(1).mean())
    plain = (n - 1) * float(g1.square().sum() + g2.square().sum()) / 4
    assert 0.8 < err / plain < 1.2


def test_train_loop_accumulate_counts_optimizer_steps(tmp_path):
    """``train.accumulate = 2``: each logged step is one optimizer step over two minibatches (twice
    the forward passes), also for backprop; a bad value is a config error naming the key."""
    from bpfree import config as C
    from bpfree import train

    def cfg(name, accumulate, **est):
        return C.from_dict({
            "data": {"name": "synthetic", "num_train": 200, "num_test": 100, "batch_size": 32},
            "model": {"name": "mlp", "hidden": [8]}, "estimator": {"name": name, **est},
            "train": {"max_steps": 3, "warmup": False, "measure": False, "accumulate": accumulate}})

    for name, per_batch in (("forward_gradient", 2.0), ("backprop", 3.0)):
        summary = train.run(cfg(name, 2), tmp_path / name)
        assert summary["steps"] == 3 and summary["status"] == "completed"
        assert summary["forward_passes_per_step"] == pytest.approx(2 * per_batch)
    with pytest.raises(C.ConfigError, match="train.accumulate must be an int >= 1"):
        C.resolve(cfg("backprop", 0))
    with pytest.raises(C.ConfigError, match="update mode"):
        C.resolve(cfg("mezo", 2, lr=1e-3))


# --------------------------------------------------------------------------- SVRG


def _svrg_problem():
    prob = make_problem("mlp", batch=8)
    return prob, estimators.make("forward_gradient", rank="full", svrg_every=10**6, svrg_directions=8)


def test_svrg_at_the_snapshot_is_exactly_mu():
    """At θ = θ̃ the bracket ĝ(θ; v, b) − ĝ(θ̃; v, b) is exactly zero: the estimate is μ̃ alone."""
    prob, est = _svrg_problem()
    gen = torch.Generator().manual_seed(0)
    est.estimate(prob.model, prob.closure, generator=gen)  # step 0: refresh at θ
    mu = torch.cat([m.reshape(-1) for m in est.schemes[0].state["mu"]])
    for _ in range(3):
        out = est.estimate(prob.model, prob.closure, generator=gen)
        assert torch.equal(flat_grad(prob.model), mu)
        torch.testing.assert_close(out.details["svrg_snapshot_derivatives"], out.details["directional_derivatives"],
                                   rtol=0, atol=0)


def test_svrg_mu_is_unbiased_and_has_the_variance_of_m_directions():
    """Refreshed every step at θ = θ̃, each estimate is a fresh μ̃: unbiased, variance (N + 1)/M."""
    prob = make_problem("mlp", batch=8)
    m = 8
    est = estimators.make("forward_gradient", rank="full", distribution="gaussian", svrg_every=1, svrg_directions=m)
    grad = exact_gradient(prob.model, prob.closure)
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([(est.estimate(prob.model, prob.closure, generator=gen), flat_grad(prob.model))[1]
                           for _ in range(200)])
    z = (samples.mean(0) - grad) / (samples.std(0) / math.sqrt(len(samples)))
    assert z.abs().max() < 5.5 and 0.7 < float(z.square().mean()) < 1.3
    err = float((samples - grad).square().sum(1).mean() / grad.square().sum())
    expect = theory.weight_perturbation_error(grad.numel(), m, "gaussian")
    assert 0.8 < err / expect < 1.2


def _moved(prob, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prob.model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=scale)


def test_svrg_near_the_snapshot_is_unbiased_given_the_snapshot_and_beats_plain_k1():
    """With θ̃ and μ̃ fixed, E[g] = ∇f(θ) − ∇f(θ̃) + μ̃ (z-scores), and near θ̃ its variance is far
    below plain K = 1's (N − 1)‖∇f‖² — the point of the control variate."""
    prob, est = _svrg_problem()
    gen = torch.Generator().manual_seed(0)
    est.estimate(prob.model, prob.closure, generator=gen)
    state = est.schemes[0].state
    g_snap = exact_gradient(prob.model, prob.closure)
    mu = torch.cat([m.reshape(-1) for m in state["mu"]])
    _moved(prob, 1e-3)
    grad = exact_gradient(prob.model, prob.closure)
    samples = torch.stack([(est.estimate(prob.model, prob.closure, generator=gen), flat_grad(prob.model))[1]
                           for _ in range(300)])
    expect = grad - g_snap + mu
    std = samples.std(0).clamp_min(1e-15)
    z = (samples.mean(0) - expect) / (std / math.sqrt(len(samples)))
    assert z.abs().max() < 6 and 0.6 < float(z.square().mean()) < 1.4
    var_svrg = float((samples - samples.mean(0)).square().sum(1).mean())
    var_plain = (grad.numel() - 1) * float(grad.square().sum())
    assert var_svrg < 0.05 * var_plain


@pytest.mark.parametrize("name, options", [("forward_gradient", {}), ("spsa", {"eps": 1e-4}), ("mezo", {"eps": 1e-4}),
                                           ("mezo", {"eps": 1e-4, "rank": "full"})])
def test_svrg_never_writes_the_live_weights(name, options):
    """Seed 000's pitfall: FmAD-SVRG loaded the snapshot into the live weights every step. Here the
    live weights stay bit-identical through estimates, and after an optimizer step they differ
    from θ̃ (the snapshot is a copy, not the live tensors)."""
    prob = make_problem("mlp")
    est = estimators.make(name, svrg_every=100, svrg_directions=2, **options)
    opt = torch.optim.SGD(prob.model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        before = param_bits(prob.model)
        est.estimate(prob.model, prob.closure, generator=gen)
        assert all(torch.equal(a, b) for a, b in zip(before, param_bits(prob.model)))
        opt.step()
    theta = est.schemes[0].state["theta"]
    assert all(t.data_ptr() != p.data_ptr() for t, p in zip(theta, prob.model.parameters()))
    assert not all(torch.equal(t, p) for t, p in zip(theta, prob.model.parameters()))


@pytest.mark.parametrize("name", ["forward_gradient", "spsa", "mezo"])
def test_svrg_snapshot_term_changes_the_estimate(name):
    """Seed 000's ZO-SVRG evaluated its 'snapshot' at the current weights (empty snapshot dicts), so
    the control variate did nothing. Away from θ̃, the snapshot term d(θ̃) differs from d(θ)."""
    prob = make_problem("mlp")
    est = estimators.make(name, svrg_every=100, svrg_directions=2)
    gen = torch.Generator().manual_seed(0)
    est.estimate(prob.model, prob.closure, generator=gen)
    _moved(prob, 0.05)
    out = est.estimate(prob.model, prob.closure, generator=gen)
    d, d_snap = out.details["directional_derivatives"], out.details["svrg_snapshot_derivatives"]
    assert not torch.allclose(d, d_snap, rtol=1e-3)
    svrg = flat_grad(prob.model)
    plain = estimators.make(name)
    plain.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(svrg, flat_grad(prob.model))


def test_svrg_snapshot_is_its_own_memory_category():
    from bpfree.measure.memory import measure_step_memory

    prob = make_problem("mlp", dtype=torch.float32)
    est = estimators.make("forward_gradient", svrg_every=10, svrg_directions=2)
    report = measure_step_memory(lambda: est.estimate(prob.model, prob.closure, generator=torch.Generator()),
                                 model=prob.model)
    n_bytes = sum(p.numel() * p.element_size() for p in prob.model.parameters())
    assert report.category_max["snapshot"] >= 2 * n_bytes  # θ̃ and μ̃


# --------------------------------------------------------------------------- adaptive (biased)


def _linear_problem(dtype=torch.float64):
    """A small model whose exact gradient is cheap: N = 15 parameters, so per-coordinate z-scores
    resolve the adaptive scale κ_c."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(4, 3).to(dtype)
    x, y = torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("rule, c", [("largest", 4), ("largest", 2), ("seed000", 4)])
def test_adaptive_mean_is_kappa_times_the_gradient(rule, c):
    """E[g] = κ_c ∇f (adaptive docstring): the projection g·∇f/‖∇f‖² has mean κ_c, and g − κ_c∇f
    has per-coordinate z-scores of a zero-mean estimate. seed000 applies its rule at step 0 only,
    so each sample is the first step of a fresh estimator."""
    model, closure = _linear_problem()
    grad = exact_gradient(model, closure)
    kappa = theory.adaptive_scale(c, rule)
    samples = []
    for s in range(600):
        est = estimators.make("forward_gradient", rank="full", distribution="gaussian", adaptive_candidates=c,
                              adaptive_rule=rule)
        est.estimate(model, closure, generator=torch.Generator().manual_seed(s))
        samples.append(flat_grad(model))
    samples = torch.stack(samples)
    proj = samples @ grad / grad.square().sum()
    assert float(proj.mean()) == pytest.approx(kappa, abs=4 * float(proj.std()) / math.sqrt(len(proj)))
    z = (samples.mean(0) - kappa * grad) / (samples.std(0) / math.sqrt(len(samples)))
    assert z.abs().max() < 5 and 0.2 < float(z.square().mean()) < 3.0  # 15 correlated coordinates
    if rule == "largest":  # the bias is measurably there: not ∇f
        z_unbiased = (samples.mean(0) - grad) / (samples.std(0) / math.sqrt(len(samples)))
        assert float(z_unbiased.square().mean()) > 4


def test_seed000_adaptive_picks_the_smallest_at_step_0_only():
    prob = make_problem("mlp")
    est = estimators.make("forward_gradient", adaptive_candidates=4, adaptive_rule="seed000")
    first = est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert first.details["directional_derivatives"].shape == (4,)
    d = first.details["directional_derivatives"]
    assert first.details["adaptive_picked"] == [int(d.abs().argmin())]
    later = est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(1))
    assert later.details["directional_derivatives"].shape == (1,) and "adaptive_picked" not in later.details
    best = estimators.make("forward_gradient", adaptive_candidates=4)
    out = best.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert out.details["adaptive_picked"] == [int(out.details["directional_derivatives"].abs().argmax())]
    assert out.forward_passes == 1 + 4  # the four candidates ride one batched pass


# --------------------------------------------------------------------------- sparse (biased)


def test_sparse_mean_is_the_masked_gradient_and_exactly_zero_off_the_mask():
    model, closure = _linear_problem()
    grad = exact_gradient(model, closure)
    est = estimators.make("spsa", rank="full", eps=1e-5, sparse_fraction=0.4, sparse_every=10**6)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([(est.estimate(model, closure, generator=gen), flat_grad(model))[1] for _ in range(600)])
    mask = torch.cat([m.reshape(-1) for m in est.schemes[0].state["masks"]])
    assert torch.equal(samples[:, mask == 0], torch.zeros_like(samples[:, mask == 0]))
    on = mask == 1
    z = (samples[:, on].mean(0) - grad[on]) / (samples[:, on].std(0) / math.sqrt(len(samples)))
    assert z.abs().max() < 5  # (only 6 coordinates on the mask: no mean-square check)


def test_sparse_rules_pick_by_magnitude_and_an_all_zero_tensor_gets_a_random_subset():
    t = torch.tensor([0.5, -0.1, 2.0, 0.01, -3.0, 0.2, 0.0, 1.0, -0.3, 0.05])
    gen = torch.Generator().manual_seed(0)
    small = magnitude_mask(t, 0.3, "smallest", gen)
    large = magnitude_mask(t, 0.3, "largest", gen)
    assert small.nonzero().flatten().tolist() == [3, 6, 9]  # |θ| 0.01, 0, 0.05: Sparse-MeZO
    assert large.nonzero().flatten().tolist() == [2, 4, 7]  # |θ| 2, 3, 1: seed 000
    zeros = torch.zeros(1000)
    masks = [magnitude_mask(zeros, 0.01, "largest", torch.Generator().manual_seed(s)) for s in range(2)]
    assert all(int(m.sum()) == 10 for m in masks)  # exactly ⌈s·n⌉, not all (seed 000), not none
    assert not torch.equal(masks[0], masks[1])  # a uniformly random subset


def test_sparse_mask_is_refreshed_every_n_steps_and_lora_b_is_not_all_ones():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # LoRA B at init
    x, y = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    est = estimators.make("mezo", sparse_fraction=0.25, sparse_every=2, sparse_rule="largest")
    refreshed = []
    for s in range(5):
        out = est.estimate(model, closure, generator=torch.Generator().manual_seed(s))
        refreshed.append(out.details["sparse_refreshed_at"])
        assert int((model[2].weight.grad != 0).sum()) <= 3  # ⌈0.25·12⌉ entries at most
    assert refreshed == [0, 0, 2, 2, 4]


# --------------------------------------------------------------------------- sign, conservative (biased)


def test_sign_mean_is_the_unit_gradient_times_sqrt_2_over_pi():
    model, closure = _linear_problem()
    grad = exact_gradient(model, closure)
    unit = grad / grad.norm()
    est = estimators.make("forward_gradient", rank="full", distribution="gaussian", sign=True)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([(est.estimate(model, closure, generator=gen), flat_grad(model))[1] for _ in range(800)])
    proj = samples @ unit
    assert float(proj.mean()) == pytest.approx(theory.sign_scale(), abs=4 * float(proj.std()) / math.sqrt(len(proj)))
    z = (samples.mean(0) - theory.sign_scale() * unit) / (samples.std(0) / math.sqrt(len(samples)))
    assert z.abs().max() < 5 and 0.2 < float(z.square().mean()) < 3.0  # 15 correlated coordinates


@pytest.mark.parametrize("name, options", [("spsa", {"eps": 1e-4}), ("forward_gradient", {})])
def test_conservative_keeps_the_lowest_of_three_candidate_losses(name, options):
    prob = make_problem("mlp")
    lr = 0.5
    est = estimators.make(name, conservative_lr=lr, **options)
    plain = estimators.make(name, **options)
    kept = set()
    for s in range(12):
        plain.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(s))
        g = flat_grad(prob.model)
        out = est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(s))
        cons = out.details["conservative"]
        losses = {1.0: cons["f_step"], -1.0: cons["f_flipped"], 0.0: cons["f"]}
        assert cons["kept"] == min(losses, key=losses.get)
        torch.testing.assert_close(flat_grad(prob.model), cons["kept"] * g, rtol=0, atol=0)
        kept.add(cons["kept"])
        exact = out.details.get("loss_is_exact", True)
        assert out.forward_passes == plain.estimate(prob.model, prob.closure).forward_passes + 2 + (not exact)
    with torch.no_grad():
        assert cons["f"] == pytest.approx(prob.closure().item(), rel=1e-12)


# --------------------------------------------------------------------------- seed 000's pitfalls, by name


@pytest.mark.parametrize("name", ["spsa", "mezo"])
def test_zo_gradient_is_not_scaled_by_eps(name):
    """Seed 000 stored the ZO direction as ε·z, so its gradient was ε times SPSA's. Here the
    estimate is d·v with d ≈ ∇f·v whatever ε: the same generator draws the same directions for
    every estimator, and as ε → 0 the zeroth-order estimate equals the forward gradient's."""
    prob = make_problem("layernorm")  # smooth (GELU): no ReLU kink inside ±εv
    estimators.make("forward_gradient").estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    fg = flat_grad(prob.model)
    for eps in (1e-3, 1e-5):
        estimators.make(name, eps=eps).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(flat_grad(prob.model), fg, rtol=1e-3, atol=1e-12)
    assert float(fg.norm()) > 1e-2 * float(exact_gradient(prob.model, prob.closure).norm())


@pytest.mark.parametrize("label, name, options", VARIANTS[:6] + VARIANTS[10:12], ids=IDS[:6] + IDS[10:12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_method_runs_in_the_model_dtype(label, name, options, dtype):
    """Seed 000 ran FmAD under fp16 autocast and the others in bf16/fp32. Here every gradient (and
    its directional derivatives' arithmetic) is in the model's own dtype; nothing casts."""
    prob = make_problem("mlp", dtype=dtype)
    seen = set()

    class Dtypes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                seen.add(out.dtype)
            return out

    with Dtypes():
        estimators.make(name, **options).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert seen == {dtype}
    assert all(p.grad.dtype == dtype for p in prob.model.parameters())


def test_every_registered_scheme_is_covered_by_the_variants():
    covered = {k.split("_")[0] for _, _, opts in VARIANTS for k in opts} & set(variance.schemes())
    assert covered == set(variance.schemes())
