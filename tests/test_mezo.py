"""MeZO: in-place perturbation restored bit-exactly, and its no-.grad update mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.estimators.zeroth_order import CHUNK, mezo_direction, shift_exactly, unshift_exactly
from conftest import param_bits


def model_and_closure(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 5)).to(dtype)
    x = torch.randn(16, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 5
    return model, lambda: F.cross_entropy(model(x).float(), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_parameters_restored_bit_exactly_over_many_steps(dtype, eps):
    model, closure = model_and_closure(dtype)
    est = estimators.make("mezo", eps=eps)
    before = param_bits(model)
    g = torch.Generator().manual_seed(0)
    fixups = 0
    for _ in range(20):
        out = est.estimate(model, closure, generator=g)
        fixups += out.details["restore_fixups"]
    after = param_bits(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert fixups > 0  # the naive restore would have drifted here (see next test)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_in_place_restore_drifts(dtype):
    """Why the restore record exists: MeZO's +ε, −2ε, +ε does not return θ."""
    model, _ = model_and_closure(dtype)
    p = model[0].weight.detach()
    z = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    naive = p.clone()
    naive.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    assert not torch.equal(naive, p)
    exact = p.clone()
    rec = shift_exactly(exact, z, 1e-3)
    assert not torch.equal(exact, p)
    unshift_exactly(exact, z, 1e-3, rec)
    assert torch.equal(exact.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_restore_is_exact_for_signed_zeros_tiny_and_huge_values():
    p = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, 1.0, float("inf")], dtype=torch.float32)
    z = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1e-8, 1.0])
    ref = p.clone().view(torch.int32)
    rec = shift_exactly(p, z, 1e-3)
    unshift_exactly(p, z, 1e-3, rec)
    assert torch.equal(p.view(torch.int32), ref)


def test_grad_mode_matches_the_mezo_formula():
    """p.grad = d·z with d = (f(θ+εz) − f(θ−εz))/(2ε), z regenerated from the reported seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 500), nn.ReLU(), nn.Linear(500, 3))  # 150,000 weights: 3 pieces
    x, y = torch.randn(8, 300, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    out = estimators.make("mezo", eps=1e-3, distribution="gaussian", rank="full").estimate(
        model, closure, generator=torch.Generator().manual_seed(4)
    )
    seed, d = out.details["seed"], out.details["directional_derivatives"][0]
    for i, p in enumerate(model.parameters()):
        z = mezo_direction(seed, i, p, "gaussian")
        torch.testing.assert_close(p.grad, z * d)
        if i == 0:
            assert p.numel() > CHUNK  # the regeneration spans several pieces


@pytest.mark.parametrize("rank", ["full", 2])
def test_update_mode_applies_sgd_without_grad_buffers(rank):
    model, closure = model_and_closure(torch.float32)
    ref_model, _ = model_and_closure(torch.float32)
    lr, wd = 1e-2, 0.1
    grad_mode = estimators.make("mezo", eps=1e-3, rank=rank)
    update_mode = estimators.make("mezo", eps=1e-3, lr=lr, weight_decay=wd, rank=rank)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # freed by update mode
    out = update_mode.estimate(model, closure, generator=g1)
    assert out.details["updated_in_place"]
    assert all(p.grad is None for p in model.parameters())
    # the same step computed through .grad and a plain SGD update
    ref_params = dict(ref_model.named_parameters())
    grad_mode.estimate(ref_model, lambda: closure_for(ref_model), generator=g2)
    for name, p in model.named_parameters():
        r = ref_params[name]
        expect = r.detach() * (1 - lr * wd) - lr * r.grad
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-5)  # a few ulps of in-place rounding


def closure_for(model):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    return F.cross_entropy(model(x), torch.arange(16) % 5)


def test_mezo_and_spsa_draw_the_same_cost():
    model, closure = model_and_closure(torch.float32)
    assert estimators.make("mezo").estimate(model, closure).forward_passes == 2.0
    assert estimators.make("spsa").estimate(model, closure).forward_passes == 2.0
    assert estimators.make("spsa", scheme="forward", num_directions=3).estimate(model, closure).forward_passes == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shift_undo_is_exact_for_every_size_and_step(dtype):
    """The in-place undo must reproduce the out-of-place arithmetic bit for bit, including
    the scalar tail of the vectorised kernels (sizes around vector widths)."""
    g = torch.Generator().manual_seed(0)
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    for n in (1, 7, 15, 16, 17, 31, 33, 63, 65, 1000, 65537):
        for eps in (1e-4, 1e-2, 1.0):
            p = (torch.randn(n, generator=g) * 0.05).to(dtype)
            z = torch.randn(n, generator=g).to(dtype)
            ref = p.clone()
            rec = shift_exactly(p, z, eps)
            unshift_exactly(p, z, eps, rec)
            assert torch.equal(p.view(int_type), ref.view(int_type)), (n, eps)


@pytest.mark.parametrize("when", [1, 2])
def test_a_failing_closure_leaves_parameters_exactly_as_found(when):
    model, closure = model_and_closure(torch.float32)
    before = param_bits(model)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == when:
            raise RuntimeError("out of memory (simulated)")
        return closure()

    with pytest.raises(RuntimeError, match="simulated"):
        estimators.make("mezo").estimate(model, failing, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, param_bits(model)))


@pytest.mark.parametrize("options", [{"name": "mezo"}, {"name": "mezo", "lr": 1e-3}, {"name": "spsa"},
                                     {"name": "mezo", "rank": "full"}])
def test_zeroth_order_forwards_record_no_graph(options):
    """Loss values only: with grad mode on, the perturbed forwards would record an autograd graph
    and keep its activations, backprop's memory (MeZO's in-place engine once did, 0.2x backprop
    of time on MiniLM-L6)."""
    model, closure = model_and_closure(torch.float32)
    seen = []

    def recording():
        loss = closure()
        seen.append((torch.is_grad_enabled(), loss.grad_fn is None))
        return loss

    options = dict(options)
    estimators.make(options.pop("name"), **options).estimate(model, recording, generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 2 and all(s == (False, True) for s in seen), seen
