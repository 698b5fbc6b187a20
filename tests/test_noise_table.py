"""The shared noise table (``distribution="noise_table"``) against its exact covariance.

A noise-table direction is a circular slice of one pre-drawn table at a
uniform random offset, so it is *not* unbiased: E[v vᵀ] = C with
C_ij = r((j − i) mod L), r the table's circular autocorrelation, and the
forward gradient's expectation is C ∇f (``estimators/directions.py``). With a
tiny table every offset can be enumerated, so these checks are exact, not
Monte Carlo: the mean over all L offsets of what the estimator returns must
equal C ∇f, with C built directly from the table and ∇f from autograd.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from bpfree import estimators
from bpfree.estimators import directions
from conftest import exact_gradient, flat_grad, make_problem, param_bits


@pytest.fixture
def table_size():
    """Set the table length for one test; the old length (and an empty cache) afterwards."""
    old = directions.NOISE_TABLE_SIZE
    yield directions.set_noise_table_size
    directions.set_noise_table_size(old)


def direct_autocorrelation(table: torch.Tensor) -> torch.Tensor:
    """r(ℓ) = (1/L) Σ_t T[t] T[(t + ℓ) mod L], summed directly (the oracle for the FFT)."""
    t = table.double()
    return torch.stack([(t * t.roll(-lag)).mean() for lag in range(t.numel())])


def dense_covariance(r: torch.Tensor, n: int) -> torch.Tensor:
    """C_ij = r((j − i) mod L) for i, j < n."""
    i = torch.arange(n)
    return r[(i[None, :] - i[:, None]) % r.numel()]


def all_slices(table: torch.Tensor, n: int) -> torch.Tensor:
    """Row o is the direction at offset o: T[(o + i) mod L], i < n."""
    size = table.numel()
    return table.double()[(torch.arange(size)[:, None] + torch.arange(n)[None, :]) % size]


def quadratic_problem(bias: bool = False):
    """A Linear layer under a squared loss: central differences are exact (up to rounding)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 4, bias=bias).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return model, lambda: 0.5 * (model(x) - y).square().mean()


# --------------------------------------------------------------------------- the table itself


def test_no_table_is_built_or_drawn_at_import(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the directions module drew random numbers at import")

    monkeypatch.setattr(torch, "randn", refuse)
    spec = importlib.util.spec_from_file_location("_fresh_directions", directions.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._NOISE_TABLES == {}
    assert fresh.NOISE_TABLE_SIZE == 1 << 24
    assert [k for k, v in vars(fresh).items() if isinstance(v, torch.Tensor)] == []


def test_table_is_standardised_and_gaussian(table_size):
    table = directions.noise_table(torch.float32)  # the default L = 2**24, as users get it
    assert table.numel() == directions.NOISE_TABLE_SIZE == 1 << 24
    t = table.double()
    assert abs(float(t.mean())) < 1e-9 and abs(float(t.square().mean()) - 1) < 1e-9
    assert abs(float(t.pow(4).mean()) - 3) < 0.01  # Gaussian fourth moment
    assert directions.noise_table(torch.float32) is table  # built once
    table_size(1 << 12)
    t64 = directions.noise_table(torch.float64)
    assert t64.numel() == 1 << 12
    assert abs(float(t64.mean())) < 1e-15 and abs(float(t64.square().mean()) - 1) < 1e-14
    assert list(directions._NOISE_TABLES) == [(1 << 12, torch.float64, "cpu")]  # the old L was freed
    with pytest.raises(ValueError, match="int >= 2"):
        directions.set_noise_table_size(1)


def test_offsets_are_uniform_over_the_whole_table(table_size):
    table_size(64)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([directions.noise_table_offset(g) for _ in range(32_000)]), minlength=64)
    assert counts.numel() == 64 and int(counts.min()) > 375 and int(counts.max()) < 625  # 500 ± 5.6σ


def test_fill_is_the_circular_slice_at_the_drawn_offset(table_size):
    table_size(64)
    table = directions.noise_table(torch.float32)
    n, seen = 20, set()
    for seed in range(200):
        o = directions.noise_table_offset(torch.Generator().manual_seed(seed), n)
        expect = torch.cat([table, table])[o:o + n]
        out = directions.fill_(torch.empty(4, 5), "noise_table", torch.Generator().manual_seed(seed))
        assert torch.equal(out.reshape(-1), expect)
        again = directions.sample((4, 5), distribution="noise_table", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again, out)  # same generator state, same direction
        view = directions.table_slice(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(view, expect)
        wraps = o + n > 64
        assert (view.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()) is not wraps
        seen.add(wraps)
    assert seen == {True, False}  # both the zero-copy view and the wrapped copy were exercised


def test_a_direction_longer_than_the_table_is_an_error(table_size):
    table_size(64)
    g = torch.Generator().manual_seed(0)
    directions.fill_(torch.empty(64), "noise_table", g)  # exactly L is fine
    with pytest.raises(ValueError, match=r"65 values.*NOISE_TABLE_SIZE is 64.*set_noise_table_size\(128\)"):
        directions.fill_(torch.empty(65), "noise_table", g)
    with pytest.raises(ValueError, match="set_noise_table_size"):
        directions.table_slice(65, generator=g)
    model, closure = quadratic_problem()  # 24 parameters: K = 3 stacked directions are one 72-value draw
    est = estimators.make("forward_gradient", distribution="noise_table", rank="full", num_directions=3)
    with pytest.raises(ValueError, match="72 values"):
        est.estimate(model, closure, generator=g)
    with pytest.raises(ValueError, match="orthogonal=True re-mixes"):
        estimators.make("forward_gradient", distribution="noise_table", rank="full", orthogonal=True)


# --------------------------------------------------------------------------- its covariance


def test_fft_autocorrelation_and_covariance_match_the_dense_sums(table_size):
    for size, lengths in [(64, [64, 40, 33, 32, 7, 1]), (4096, [100, 2049])]:
        table_size(size)
        r = direct_autocorrelation(directions.noise_table(torch.float32))
        fft_r = directions.noise_table_autocorrelation()
        torch.testing.assert_close(fft_r, r, rtol=0, atol=1e-13)
        assert float(r[0]) == pytest.approx(1.0, abs=1e-6)
        for n in lengths:
            x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            dense = x @ dense_covariance(r, n).T
            torch.testing.assert_close(directions.noise_table_covariance_apply(x), dense, rtol=0, atol=1e-12)
            torch.testing.assert_close(directions.noise_table_covariance_apply(x[0], autocorrelation=fft_r),
                                       dense[0], rtol=0, atol=1e-12)


def test_relative_bias_grows_as_sqrt_n_over_l(table_size):
    """‖(C − I)x‖/‖x‖ ≈ √((n − 1)/L): each component sums n − 1 terms of size ~1/√L, random signs."""
    size = 1 << 16
    table_size(size)
    r = directions.noise_table_autocorrelation(torch.float64)
    assert 0.9 < float(r[1:].std()) * math.sqrt(size) < 1.1
    for n in [1 << 8, 1 << 10, 1 << 12, 1 << 14]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        rel = float((directions.noise_table_covariance_apply(x, autocorrelation=r) - x).norm() / x.norm())
        assert 0.75 < rel / math.sqrt((n - 1) / size) < 1.25, (n, rel)


@pytest.mark.parametrize(
    "name, options",
    [
        ("forward_gradient", {"rank": "full"}),
        ("spsa", {"rank": "full", "eps": 1e-2}),
        ("mezo", {"rank": "full", "eps": 1e-2}),
    ],
)
def test_mean_over_all_offsets_is_exactly_c_times_the_gradient(name, options, table_size):
    """End to end through the estimator and real generator draws: collect one estimate per offset
    (each checked to be (∇f·v_o) v_o for the circular slice v_o), then their mean — the exact
    expectation, offsets being uniform — must equal C ∇f with C built from the table directly."""
    size = 64
    table_size(size)
    model, closure = quadratic_problem()
    grad = exact_gradient(model, closure)
    n = grad.numel()
    slices = all_slices(directions.noise_table(torch.float64), n)
    est = estimators.make(name, distribution="noise_table", **options)
    before = param_bits(model)
    by_offset: dict[int, torch.Tensor] = {}
    for seed in range(3000):
        est.estimate(model, closure, generator=torch.Generator().manual_seed(seed))
        g = flat_grad(model)
        o = int((slices @ g).abs().argmax())  # g is parallel to exactly one slice
        torch.testing.assert_close(g, (grad @ slices[o]) * slices[o], rtol=1e-9, atol=1e-12)
        by_offset.setdefault(o, g)
        if len(by_offset) == size:
            break
    assert len(by_offset) == size
    assert all(torch.equal(a, b) for a, b in zip(before, param_bits(model)))
    mean = torch.stack(list(by_offset.values())).mean(0)
    c_grad = dense_covariance(direct_autocorrelation(directions.noise_table(torch.float64)), n) @ grad
    torch.testing.assert_close(mean, c_grad, rtol=0, atol=1e-10 * float(grad.norm()))
    # and that is measurably not ∇f: the bias (C − I)∇f of relative size ≈ √((n − 1)/L)
    rel_bias = float((c_grad - grad).norm() / grad.norm())
    assert 0.3 * math.sqrt((n - 1) / size) < rel_bias < 3 * math.sqrt((n - 1) / size)
    torch.testing.assert_close(directions.noise_table_covariance_apply(grad, dtype=torch.float64), c_grad)


@pytest.mark.parametrize("bias, k", [(True, 1), (False, 2)])
def test_each_draw_is_its_own_block_of_the_covariance(bias, k, table_size, monkeypatch):
    """Every ``fill_`` call takes its own offset: K = 1 dense directions draw one per parameter
    tensor (E[v vᵀ] block-diagonal, one C per tensor), K > 1 one for the whole K × N block (each
    row marginally C_N). With the offsets scripted, enumerate each call's offset over all L
    values (the others fixed) and compare the mean with that call's C."""
    size = 64
    table_size(size)
    model, closure = quadratic_problem(bias=bias)
    grad = exact_gradient(model, closure)
    sizes = [p.numel() for p in model.parameters()]
    blocks = [k * sum(sizes)] if k > 1 else sizes
    r = direct_autocorrelation(directions.noise_table(torch.float64))
    est = estimators.make("forward_gradient", distribution="noise_table", rank="full", num_directions=k)
    script: list[int] = []
    calls: list[int] = []

    def scripted(generator, n=1):
        calls.append(n)
        return script[len(calls) - 1]

    monkeypatch.setattr(directions, "noise_table_offset", scripted)
    fixed = [5 + 17 * b for b in range(len(blocks))]
    start = 0
    for b, n_b in enumerate(blocks):
        total = torch.zeros_like(grad)
        for o in range(size):
            script[:] = fixed[:b] + [o] + fixed[b + 1:]
            calls.clear()
            est.estimate(model, closure, generator=torch.Generator())
            assert calls == blocks  # one draw per call, of exactly that call's length
            total += flat_grad(model)
        mean = total / size
        width = min(n_b, grad.numel())
        piece = slice(start, start + width) if k == 1 else slice(0, grad.numel())
        c_block = dense_covariance(r, width) @ grad[piece]
        torch.testing.assert_close(mean[piece], c_block, rtol=0, atol=1e-10 * float(grad.norm()))
        start += width


# --------------------------------------------------------------------------- every estimator runs


CONFIGS = [
    ("forward_gradient", {}),
    ("forward_gradient", {"rank": "full"}),
    ("forward_gradient", {"num_directions": 4}),
    ("forward_gradient", {"num_directions": 4, "rank": "full"}),
    ("spsa", {}),
    ("spsa", {"rank": "full", "num_directions": 2, "scheme": "forward"}),
    ("mezo", {}),
    ("mezo", {"rank": "full"}),
]


def test_every_estimator_accepts_the_table_and_never_writes_it():
    prob = make_problem("mlp", dtype=torch.float32)
    table = directions.noise_table(torch.float32)
    reference = table.clone()
    exact = exact_gradient(prob.model, prob.closure)
    for name, options in CONFIGS:
        est = estimators.make(name, distribution="noise_table", **options)
        before = param_bits(prob.model)
        grads = []
        for _ in range(2):
            est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(3))
            grads.append(flat_grad(prob.model))
            assert all(torch.equal(a, b) for a, b in zip(before, param_bits(prob.model))), (name, options)
        assert torch.equal(grads[0], grads[1]), (name, options)  # same generator state, same estimate
        assert torch.isfinite(grads[0]).all() and float(grads[0] @ exact) != 0.0
    for rank in [1, "full"]:  # MeZO's update mode: parameters move, no gradient buffer
        before = [p.detach().clone() for p in prob.model.parameters()]
        estimators.make("mezo", distribution="noise_table", lr=1e-3, rank=rank).estimate(
            prob.model, prob.closure, generator=torch.Generator().manual_seed(3))
        assert all(p.grad is None for p in prob.model.parameters())
        assert not all(torch.equal(a, p) for a, p in zip(before, prob.model.parameters()))
    assert torch.equal(table, reference)  # the shared table was only ever read
