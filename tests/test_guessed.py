"""Guessed gradients against the oracle: E[ĝ] = Σ_b C_b g_b x_bᵀ with C computed explicitly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.estimators import UnsupportedModelError, guessed
from conftest import param_bits


def _mlp(widths=(6, 9, 7, 3), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _batch(seed=0, b=5, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)


def _per_layer_terms(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Per layer: inputs x_i, pre-activations s_i and exact per-example g_i = ∂L/∂s_i (autograd)."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    xs, ss = [], []
    h = x
    for i, layer in enumerate(layers):
        xs.append(h.detach())
        s = layer(h)
        s.retain_grad()
        ss.append(s)
        h = torch.relu(s) if i + 1 < len(layers) else s
    F.cross_entropy(h, y).backward()
    for p in model.parameters():
        p.grad = None
    return layers, xs, [s.detach() for s in ss], [s.grad.detach() for s in ss]


def expected_estimate(est, model, x, y) -> dict[str, torch.Tensor]:
    """The closed form E[ĝ_{W_i}] = Σ_b C_{i,b} g_{i,b} x_{i,b}ᵀ (C = I for the logits), E[ĝ_{b_i}] = Σ_b C g."""
    layers, xs, ss, gs = _per_layer_terms(model, x, y)
    out = {}
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            cov = guessed.covariance(est, ss[i], layers[i + 1].weight.detach())
            cg = torch.einsum("bij,bj->bi", cov, gs[i])
        else:
            cg = gs[i]
        out[f"{id(layer.weight)}"] = cg.T @ xs[i]
        out[f"{id(layer.bias)}"] = cg.sum(0)
    return out


def monte_carlo(est, model, x, y, draws: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    total_sq = [torch.zeros_like(p) for p in params]
    for _ in range(draws):
        est.estimate(model, closure, generator=gen)
        for t, t2, p in zip(total, total_sq, params):
            t += p.grad
            t2 += p.grad**2
    mean = [t / draws for t in total]
    stderr = [((t2 / draws - m**2).clamp_min(0) / draws).sqrt() for t2, m in zip(total_sq, mean)]
    return params, mean, stderr


CASES = [
    ("activity_perturbation", {}),
    ("wt_guess", {}),
    ("w_perp", {"k": 2}),
    ("w_perp", {"k": "rank"}),
    ("w_perp", {"k": 3, "solver": "randomized"}),
    ("w_p", {}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_mean_estimate_matches_the_bias_formula(name, options):
    model = _mlp()
    x, y = _batch()
    est = estimators.make(name, **options)
    expected = expected_estimate(est, model, x, y)
    params, mean, stderr = monte_carlo(est, model, x, y, draws=4000)
    for p, m, se in zip(params, mean, stderr):
        e = expected[f"{id(p)}"]
        z = (m - e).abs() / (se + 1e-12)
        assert float(z.max()) < 5.5, (name, p.shape, float(z.max()))


def test_whitened_and_activity_guesses_are_unbiased_wt_is_not():
    model = _mlp()
    x, y = _batch()
    exact = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for name in ("w_p", "activity_perturbation"):
        expected = expected_estimate(estimators.make(name), model, x, y)
        for p, g in zip(model.parameters(), exact):
            torch.testing.assert_close(expected[f"{id(p)}"], g)
    wt = expected_estimate(estimators.make("wt_guess"), model, x, y)
    first = model[0].weight
    assert not torch.allclose(wt[f"{id(first)}"], exact[0])


def test_w_perp_is_unbiased_inside_its_top_k_subspace():
    torch.manual_seed(1)
    s = torch.randn(4, 9, dtype=torch.float64)
    w_next = torch.randn(7, 9, dtype=torch.float64)
    g = torch.randn(4, 9, dtype=torch.float64) * (s > 0)  # true gradients live on live units
    est = estimators.make("w_perp", k=3)
    cov = guessed.covariance(est, s, w_next)
    vh = guessed.top_right_singular(s, w_next, 3, "svd", torch.Generator())
    proj = vh.mT @ vh
    torch.testing.assert_close(cov @ cov, cov)  # a projector ...
    torch.testing.assert_close(torch.einsum("bij,bj->bi", cov, g), torch.einsum("bij,bj->bi", proj, g))
    assert torch.allclose(cov.diagonal(dim1=-2, dim2=-1) * (s <= 0), torch.zeros_like(s))  # ... never onto dead units
    # k = "rank" with a square, full-rank next weight is the ReLU mask itself
    full = guessed.covariance(estimators.make("w_perp", k="rank"), s, torch.randn(9, 9, dtype=torch.float64))
    torch.testing.assert_close(full, torch.diag_embed((s > 0).double()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name, options", [("activity_perturbation", {}), ("wt_guess", {}), ("w_perp", {"k": 4}),
                                           ("w_perp_ns", {"k": 4}), ("w_p", {})])
def test_guess_covariance_matches_the_closed_form(name, options):
    torch.manual_seed(2)
    s = torch.randn(3, 8, dtype=torch.float64)
    w_next = torch.randn(6, 8, dtype=torch.float64)
    est = estimators.make(name, **options)
    guess = est._guess()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([guess(s, w_next, gen) for _ in range(6000)])  # (R, B, d)
    empirical = torch.einsum("rbi,rbj->bij", draws, draws) / draws.shape[0]
    cov = guessed.covariance(est, s, w_next)
    scale = cov.diagonal(dim1=-2, dim2=-1).amax()
    assert float((empirical - cov).abs().max() / scale) < 0.1


@pytest.mark.parametrize("dead", [0, 13])
def test_randomized_solver_finds_the_exact_top_k_subspace(dead):
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    sv = torch.cat([torch.linspace(10, 5, 5), torch.linspace(1, 0.01, 35)]).double()
    w_next = (u * sv) @ v[:, :40].T  # 40 × 50
    s = torch.ones(2, 50, dtype=torch.float64)
    s[1, :dead] = -1.0  # example 1 has dead units: its W̃ = W M has other singular vectors
    exact = guessed.top_right_singular(s, w_next, 5, "svd", torch.Generator())
    approx = guessed.top_right_singular(s, w_next, 5, "randomized", torch.Generator().manual_seed(0))
    tol = 1e-4 if dead == 0 else 1e-2  # (σ_12/σ_5)^(2q+1), q = 3; masking shrinks the gap
    torch.testing.assert_close(approx.mT @ approx, exact.mT @ exact, atol=tol, rtol=0)


def test_rank_k_w_perp_with_a_full_column_rank_next_weight_is_the_relu_mask():
    torch.manual_seed(5)
    s, w_next = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    assert guessed.full_column_rank(w_next) and not guessed.full_column_rank(w_next[:4])
    u = estimators.make("w_perp", k="rank")._guess()(s, w_next, torch.Generator().manual_seed(0))
    assert torch.all(u[s <= 0] == 0) and torch.all(u[s > 0] != 0)


def test_newton_schulz_approximates_the_top_k_polar_factor_when_the_spectrum_has_a_gap():
    torch.manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    sv = torch.cat([torch.linspace(3.0, 2.4, 6), torch.linspace(1.0, 0.01, 24)]).double()  # gap after k = 6
    jac = (u * sv) @ v[:, :30].T
    tau = 0.6  # between σ_7/σ_1 = 0.33 and σ_6/σ_1 = 0.8
    x = guessed.newton_schulz_top_k(jac[None], tau)[0]
    target = u[:, :6] @ v[:, :6].T
    out_sv = torch.linalg.svdvals(x)
    assert float((out_sv[:6] - 1).abs().max()) < 0.08  # measured 0.056
    assert float(out_sv[6:].abs().max()) < 0.05
    assert float((x - target).norm() / target.norm()) < 0.08


def test_step_polynomial_error_is_small_away_from_the_threshold():
    # measured max error outside a band of ±10% (±20% for τ = 0.5) around τ: 0.017, 0.074, 0.088, 0.010
    for tau, band, bound in ((0.7, 0.1, 0.03), (0.6, 0.1, 0.1), (0.5, 0.2, 0.1), (0.85, 0.1, 0.02)):
        c = torch.tensor(guessed.step_polynomial(tau), dtype=torch.float64)
        xs = torch.linspace(0, 1, 2001, dtype=torch.float64)
        ys = guessed._odd_polynomial(c, xs, 5)
        far = (xs - tau).abs() > band * tau
        assert float((ys - (xs >= tau).double())[far].abs().max()) < bound, tau


@pytest.mark.parametrize("name", sorted({"activity_perturbation", "wt_guess", "w_perp", "w_perp_ns", "w_p"}))
def test_parameters_untouched_deterministic_and_flatten_mlp_supported(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 4, (6,))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    est = estimators.make(name)
    before = param_bits(model)
    out = est.estimate(model, closure, generator=torch.Generator().manual_seed(9))
    first = [p.grad.clone() for p in model.parameters()]
    est.estimate(model, closure, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, param_bits(model)))
    assert out.loss == pytest.approx(closure().item(), rel=1e-6)
    assert "forward" not in model[1].__dict__  # the patch is gone


def test_k_directions_average_k_single_draws():
    model = _mlp()
    x, y = _batch()
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    estimators.make("wt_guess", num_directions=3).estimate(model, closure, generator=torch.Generator().manual_seed(5))
    avg = [p.grad.clone() for p in model.parameters()]
    one = estimators.make("wt_guess")
    gen = torch.Generator().manual_seed(5)
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(3):
        one.estimate(model, closure, generator=gen)
        for a, p in zip(acc, model.parameters()):
            a += p.grad / 3
    for a, b in zip(avg, acc):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "model, fragment",
    [
        (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), "module '1' is a Tanh where an nn.ReLU belongs"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)), "is a Conv2d"),
        (nn.Sequential(nn.Linear(4, 5), nn.ReLU()), "must end with an nn.Linear"),
    ],
)
def test_unsupported_models_get_a_clear_error(model, fragment):
    x = torch.randn(3, 4) if isinstance(model[0], nn.Linear) else torch.randn(3, 1, 4, 4)
    with pytest.raises(UnsupportedModelError) as e:
        estimators.make("w_perp").estimate(model, lambda: model(x).sum(), generator=torch.Generator())
    assert fragment in str(e.value) and "forward_gradient, spsa or mezo" in str(e.value)


def test_a_closure_that_runs_the_model_twice_is_refused():
    model = _mlp()
    x, y = _batch()
    with pytest.raises(UnsupportedModelError, match="run the model once"):
        estimators.make("wt_guess").estimate(
            model, lambda: F.cross_entropy(model(x), y) + F.cross_entropy(model(x), y), generator=torch.Generator()
        )
    assert all("forward" not in m.__dict__ for m in model)


@pytest.mark.parametrize("name, options, fragment", [("w_perp", {"k": 0}, "k"), ("w_perp", {"solver": "qr"}, "svd"),
                                                      ("w_p", {"sigma": 0.0}, "sigma"),
                                                      ("w_perp_ns", {"threshold": 1.5}, "threshold")])
def test_bad_options_are_explained(name, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        estimators.make(name, **options)


def test_a_loss_that_uses_the_parameters_outside_the_model_is_refused():
    model = _mlp()
    x, y = _batch()
    penalised = lambda: F.cross_entropy(model(x), y) + model[0].weight.square().sum()  # noqa: E731
    with pytest.raises(UnsupportedModelError, match="outside the model's forward"):
        estimators.make("wt_guess").estimate(model, penalised, generator=torch.Generator())
