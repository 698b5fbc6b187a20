"""Estimator statistics against the oracle (exact backprop) and the closed forms.

Each stochastic estimator must (1) be unbiased: the mean of n estimates
converges to ∇f at the rate its closed-form variance predicts, and (2) be
exactly as noisy as theory says for a single draw — cos(g, ∇f) ≈ E[χ_K]/√N —
so that it cannot pass by secretly returning the exact gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bpfree import estimators
from bpfree.estimators import theory
from conftest import STOCHASTIC, exact_gradient, flat_grad, make_problem


def _mean_estimate(prob, name, options, samples, seed=0):
    est = estimators.make(name, **options)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(prob.num_params, dtype=torch.float64)
    for _ in range(samples):
        est.estimate(prob.model, prob.closure, generator=g)
        total += flat_grad(prob.model)
    return total / samples


@pytest.mark.parametrize("label, name, options, k", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_mean_of_estimates_converges_to_exact_gradient(label, name, options, k, problem):
    exact = exact_gradient(problem.model, problem.closure)
    n = problem.num_params
    samples = max(50, 1600 // k)
    mean = _mean_estimate(problem, name, options, samples)
    rel_err = float((mean - exact).norm() ** 2 / exact.norm() ** 2)
    distribution = estimators.make(name, **options).distribution
    # E‖mean − ∇‖²/‖∇‖² = err/(samples) for i.i.d. directions (theory.weight_perturbation_error)
    expected = theory.weight_perturbation_error(n, k, distribution) / samples
    if options.get("orthogonal"):
        assert rel_err < 1.5 * expected  # orthogonal frames are at least as good as i.i.d.
    else:
        assert 0.5 * expected < rel_err < 1.6 * expected, (rel_err, expected)
    cos = float(F.cosine_similarity(mean, exact, dim=0))
    assert cos > 1 / math.sqrt(1 + 2 * expected)


@pytest.mark.parametrize("label, name, options, k", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "layernorm"])
def test_single_estimate_cosine_matches_closed_form(label, name, options, k, kind):
    prob = make_problem(kind, batch=8)
    exact = exact_gradient(prob.model, prob.closure)
    est = estimators.make(name, **options)
    g = torch.Generator().manual_seed(1)
    draws = 150
    cosines = []
    for _ in range(draws):
        est.estimate(prob.model, prob.closure, generator=g)
        cosines.append(float(F.cosine_similarity(flat_grad(prob.model), exact, dim=0)))
    cos = torch.tensor(cosines)
    n = prob.num_params
    expect = theory.forward_gradient_cosine(n, k)
    spread = theory.forward_gradient_cosine_std(n, k)
    # the models have N of a few hundred, so allow the O(K/N) correction plus sampling error
    tolerance = 4 * spread / math.sqrt(draws) + 0.1 * expect
    assert abs(float(cos.mean()) - expect) < tolerance, (float(cos.mean()), expect)
    assert float(cos.max()) < 0.9  # never the exact gradient


def test_backprop_is_the_exact_gradient(problem):
    estimators.make("backprop").estimate(problem.model, problem.closure)
    torch.testing.assert_close(flat_grad(problem.model), exact_gradient(problem.model, problem.closure))


def test_spsa_approaches_forward_gradient_as_eps_shrinks(problem):
    """Same generator state → same direction; the central difference is O(ε²) from the jvp."""
    fg = estimators.make("forward_gradient")
    out = fg.estimate(problem.model, problem.closure, generator=torch.Generator().manual_seed(3))
    d_fg = float(out.details["directional_derivatives"][0])
    g_fg = flat_grad(problem.model)
    errors = []
    for eps in (1e-2, 1e-3, 1e-4, 1e-6):
        spsa = estimators.make("spsa", eps=eps)
        out = spsa.estimate(problem.model, problem.closure, generator=torch.Generator().manual_seed(3))
        errors.append(abs(float(out.details["directional_derivatives"][0]) - d_fg))
        last_grad = flat_grad(problem.model)
    assert errors[-1] < 1e-6 * max(1.0, abs(d_fg))
    assert errors[-1] < errors[0]
    if problem.name == "layernorm":  # smooth model: the central difference is second order in ε
        assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30
    # (ReLU and max-pool kinks add a first-order term until ε is too small to cross one)
    torch.testing.assert_close(last_grad, g_fg, rtol=1e-5, atol=1e-8)
    # forward differences converge too, at first order
    fwd = estimators.make("spsa", eps=1e-6, scheme="forward")
    out = fwd.estimate(problem.model, problem.closure, generator=torch.Generator().manual_seed(3))
    assert abs(float(out.details["directional_derivatives"][0]) - d_fg) < 1e-3 * max(1.0, abs(d_fg))


def test_mezo_matches_spsa_with_the_same_directions():
    """MeZO is central SPSA with K = 1, computed in place; same seed stream ⇒ same d up to rounding."""
    prob = make_problem("mlp")
    exact = exact_gradient(prob.model, prob.closure)
    out = estimators.make("mezo", eps=1e-5).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    d = float(out.details["directional_derivatives"][0])
    g = flat_grad(prob.model)
    # g = d z with d ≈ ∇·z: so g·∇ ≈ d², i.e. the directional derivative is consistent with the oracle
    z = g / d
    assert float(z @ exact) == pytest.approx(d, rel=1e-5)


def test_jvp_clip_caps_directional_derivatives():
    prob = make_problem("mlp")
    raw = estimators.make("forward_gradient", num_directions=8, rank="full").estimate(
        prob.model, prob.closure, generator=torch.Generator().manual_seed(0)
    )
    d = raw.details["directional_derivatives"]
    cap = float(d.abs().median())
    clipped = estimators.make("forward_gradient", num_directions=8, jvp_clip=cap, rank="full").estimate(
        prob.model, prob.closure, generator=torch.Generator().manual_seed(0)
    )
    assert clipped.details["clipped"] == int((d.abs() > cap).sum()) > 0
    torch.testing.assert_close(clipped.details["directional_derivatives"], d)  # raw values are reported
    # the written gradient uses clamp(d): reconstruct it from the K=8 directions
    est = estimators.make("forward_gradient", num_directions=8, rank="full")
    from bpfree.estimators.direction_set import DirectionSet

    # the directions the estimator drew: a DirectionSet from the same generator state
    drawn = DirectionSet.draw(prob.model, estimators.trainable_parameters(prob.model), num_directions=8,
                              distribution=est.distribution, rank="full", orthogonal=False,
                              generator=torch.Generator().manual_seed(0))
    tangents = [drawn.dense[i] for i in range(len(drawn.params))]
    expect = torch.cat([torch.tensordot(d.clamp(-cap, cap).double() / 8, v, dims=1).reshape(-1) for v in tangents])
    torch.testing.assert_close(flat_grad(prob.model), expect)
    assert est.num_directions == 8


def test_orthogonal_directions_are_orthogonal_and_scaled():
    from bpfree.estimators import directions

    ts = [torch.zeros(30, 7), torch.zeros(11)]
    vs = directions.sample_like(
        ts, num_directions=6, distribution="gaussian", generator=torch.Generator().manual_seed(0), orthogonal=True
    )
    flat = torch.cat([v.reshape(6, -1) for v in vs], dim=1)
    gram = flat @ flat.T
    torch.testing.assert_close(gram, 221.0 * torch.eye(6), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_are_standardised(distribution):
    from bpfree.estimators import directions

    v = directions.sample((200_000,), distribution=distribution, generator=torch.Generator().manual_seed(0))
    assert abs(float(v.mean())) < 0.01 and abs(float(v.var()) - 1) < 0.01
    if distribution == "rademacher":
        assert set(v.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("name", ["spsa", "mezo"])
def test_higher_rank_directions_are_unbiased(name):
    """Rank r > 1 (no closed-form variance here): the mean still converges to ∇f."""
    prob = make_problem("mlp")
    exact = exact_gradient(prob.model, prob.closure)
    mean = _mean_estimate(prob, name, {"eps": 1e-4, "rank": 3}, 1600)
    rel = float((mean - exact).norm() ** 2 / exact.norm() ** 2)
    assert rel < 3 * theory.weight_perturbation_error(prob.num_params, 1) / 1600
    assert float(F.cosine_similarity(mean, exact, dim=0)) > 0.8


def test_lowrank_weights_are_never_written_and_shared_weights_stay_dense():
    from torch import nn

    from bpfree.estimators._lowrank import lowrank_modules

    prob = make_problem("mlp", dtype=torch.float32)
    names = [n for n, _ in prob.model.named_parameters()]
    assert sorted(lowrank_modules(prob.model, names)) == [0, 2, 4]  # the three weights, not the biases
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    tied_names = [n for n, _ in tied.named_parameters()]
    assert lowrank_modules(tied, tied_names) == {}  # shared: dense directions
    w = prob.model[0].weight
    version = w._version
    estimators.make("mezo", rank=2).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert w._version == version  # the perturbation never touched the weight's storage


@pytest.mark.parametrize("name", ["forward_gradient", "spsa", "mezo"])
def test_lowrank_refuses_a_linear_used_without_its_forward(name):
    from torch import nn

    from bpfree.estimators import UnsupportedModelError

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 3)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)

    torch.manual_seed(0)
    model = Functional()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModelError, match='proj.*never ran.*rank="full"'):
        estimators.make(name, rank=1).estimate(model, lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    estimators.make(name, rank="full").estimate(model, lambda: F.cross_entropy(model(x), y))  # the fix works
    attn = nn.MultiheadAttention(4, 2)  # out_proj is read functionally: never treated as low-rank
    from bpfree.estimators._lowrank import lowrank_modules

    names = [n for n, _ in attn.named_parameters()]
    assert all(not n.startswith("out_proj") for i, n in enumerate(names) if i in lowrank_modules(attn, names))


def _chain_and_loop_derivatives(model, closure, k=5, seed=0):
    """d_k from the batched chain pass and from one forward-mode pass per direction, same directions."""
    from bpfree.estimators import _lowrank
    from bpfree.estimators.forward_gradient import directional_derivative

    gen = torch.Generator().manual_seed(seed)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    facs = {m: [_lowrank.draw_factors(m.weight, 2, "gaussian", gen) for _ in range(k)] for m in linears}
    biases = {m: torch.randn(k, m.out_features, generator=gen, dtype=m.weight.dtype) for m in linears}
    stacked = {m: (torch.stack([a for a, _ in f]), torch.stack([b for _, b in f])) for m, f in facs.items()}
    loss, d_chain = _lowrank.chain_directional_derivatives(model, list(model), closure, stacked, biases)
    names = [f"{i}.bias" for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    primals = [m.bias.detach() for m in linears]
    d_loop = []
    for j in range(k):
        with _lowrank.with_tangents({m: facs[m][j] for m in linears}, model):
            _, d = directional_derivative(model, names, closure, primals, [biases[m][j] for m in linears])
        d_loop.append(d.reshape(()))
    return loss, d_chain, torch.stack(d_loop)


def test_batched_chain_pass_gives_the_exact_directional_derivatives():
    prob = make_problem("mlp")
    loss, d_chain, d_loop = _chain_and_loop_derivatives(prob.model, prob.closure)
    torch.testing.assert_close(d_chain, d_loop, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(prob.closure().item(), rel=1e-12)
    flat = torch.nn.Sequential(torch.nn.Flatten(), *make_problem("mlp").model).double()
    x = prob.x.reshape(16, 3, 4)
    _, d_chain, d_loop = _chain_and_loop_derivatives(flat, lambda: F.cross_entropy(flat(x), prob.y))
    torch.testing.assert_close(d_chain, d_loop, rtol=1e-10, atol=1e-12)


def test_forward_gradient_k_directions_use_one_pass_on_mlps_and_fall_back_otherwise():
    prob = make_problem("mlp")
    est = estimators.make("forward_gradient", num_directions=4)
    out = est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert out.details.get("batched_tangents") and out.forward_passes == 5
    # a penalty on the parameters inside the closure is not a function of the output: one pass per direction
    penalised = lambda: prob.closure() + 1e-3 * prob.model[0].weight.square().sum()  # noqa: E731
    out = est.estimate(prob.model, penalised, generator=torch.Generator().manual_seed(0))
    assert not out.details.get("batched_tangents") and out.forward_passes == 8
    assert "forward" not in prob.model.__dict__
