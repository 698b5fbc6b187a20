"""The API contract of DESIGN.md, checked for every registered estimator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.estimators import UnsupportedModelError
from conftest import make_problem, param_bits

ALL = estimators.available()
# guessed gradients need a ReLU MLP (their guesses use the next layer's weight and the ReLU mask)
MLP_ONLY = {"activity_perturbation", "wt_guess", "w_perp", "w_perp_ns", "w_p"}


def test_registry_lists_the_core_estimators():
    assert {"backprop", "forward_gradient", "spsa", "mezo"} | MLP_ONLY <= set(ALL)


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        estimators.make("forward_gradeint")
    msg = str(e.value)
    assert "forward_gradeint" in msg and "did you mean 'forward_gradient'" in msg
    for name in ALL:
        assert name in msg


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        estimators.make("forward_gradient", num_direction=4)
    msg = str(e.value)
    assert "num_direction" in msg and "did you mean 'num_directions'" in msg
    for opt in ("num_directions", "distribution", "orthogonal", "jvp_clip"):
        assert opt in msg


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("forward_gradient", {"distribution": "uniform"}, "gaussian, rademacher"),
        ("forward_gradient", {"num_directions": 0}, "num_directions"),
        ("forward_gradient", {"jvp_clip": -1.0}, "jvp_clip"),
        ("spsa", {"scheme": "backward"}, "central, forward"),
        ("spsa", {"eps": 0.0}, "eps"),
        ("mezo", {"weight_decay": 0.1}, "lr"),
        ("backprop", {"checkpoint": "all"}, "sqrt"),
        ("backprop", {"checkpoint": 0}, ">= 1"),
    ],
)
def test_bad_option_values_are_explained(name, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        estimators.make(name, **options)


@pytest.mark.parametrize("name", ALL)
def test_parameters_bit_identical_and_grads_overwritten(name, problem):
    est = estimators.make(name)
    before = param_bits(problem.model)
    if name in MLP_ONLY and problem.name != "mlp":
        with pytest.raises(UnsupportedModelError, match=r"supports a ReLU MLP.*Use forward_gradient, spsa or mezo"):
            est.estimate(problem.model, problem.closure, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(before, param_bits(problem.model)))
        return
    for p in problem.model.parameters():  # stale gradients must be overwritten, not accumulated
        p.grad = torch.full_like(p, 1e6)
    out = est.estimate(problem.model, problem.closure, generator=torch.Generator().manual_seed(0))
    after = param_bits(problem.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    for p in problem.model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert p.grad.abs().max() < 1e5
    assert isinstance(out.loss, float) and out.forward_passes > 0
    with torch.no_grad():
        exact = problem.closure().item()
    tol = 1e-12 if out.details.get("loss_is_exact", True) else 1e-4
    assert out.loss == pytest.approx(exact, rel=tol, abs=tol)


@pytest.mark.parametrize("name", ALL)
def test_same_generator_state_same_estimate_and_global_rng_untouched(name):
    prob = make_problem("mlp")
    est = estimators.make(name)
    rng_before = torch.get_rng_state()
    grads = []
    for _ in range(2):
        est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(123))
        grads.append([p.grad.clone() for p in prob.model.parameters()])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    if name != "backprop":
        est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(124))
        assert not all(torch.equal(a, p.grad) for a, p in zip(grads[0], prob.model.parameters()))


@pytest.mark.parametrize("name", ALL)
def test_default_generator_comes_from_the_seed_option(name):
    prob = make_problem("mlp")
    a, b = estimators.make(name, seed=7), estimators.make(name, seed=7)
    rng_before = torch.get_rng_state()
    a.estimate(prob.model, prob.closure)
    ga = [p.grad.clone() for p in prob.model.parameters()]
    b.estimate(prob.model, prob.closure)
    assert all(torch.equal(x, p.grad) for x, p in zip(ga, prob.model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_frozen_parameters_are_left_alone():
    prob = make_problem("mlp")
    frozen = prob.model[0].weight
    frozen.requires_grad_(False)
    for name in ALL:
        estimators.make(name).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        assert frozen.grad is None


def test_non_scalar_closure_is_rejected():
    prob = make_problem("mlp")
    for name in ALL:
        with pytest.raises(ValueError, match="scalar loss"):
            estimators.make(name).estimate(
                prob.model, lambda: prob.model(prob.x), generator=torch.Generator().manual_seed(0)
            )


class TinyAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (no forward AD on CPU)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, dim=-1))  # (B, 1 head, L, d)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out(h.mean(dim=(1, 2)))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TinyAttention()

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("name", ["forward_gradient"])
def test_op_without_forward_ad_gets_a_clear_error_and_the_fix_works(name):
    torch.manual_seed(0)
    model = Wrapper()
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 1, 0, 1])
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    est = estimators.make(name)
    with pytest.raises(UnsupportedModelError) as e:
        est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
    msg = str(e.value)
    assert "scaled_dot_product" in msg  # the op
    assert "attn (TinyAttention)" in msg  # the module
    assert "sdpa_kernel" in msg and "SDPBackend.MATH" in msg  # the fix

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fixed():
        with sdpa_kernel(SDPBackend.MATH):
            return closure()

    est.estimate(model, fixed, generator=torch.Generator().manual_seed(0))
    # derivative-free estimators need no fix at all
    for zo in ("spsa", "mezo", "backprop"):
        estimators.make(zo).estimate(model, closure, generator=torch.Generator().manual_seed(0))


def test_cpu_generator_drives_directions_deterministically_for_any_k():
    prob = make_problem("cnn")
    for k in (1, 3):
        dense = estimators.make("forward_gradient", num_directions=k, rank="full")
        out = dense.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(5))
        assert out.details["directional_derivatives"].shape == (k,)
        assert out.forward_passes == 1 + 2 * k  # one batched jvp: primal once, dW·x + W·dx per tangent
        lowrank = estimators.make("forward_gradient", num_directions=k)
        out = lowrank.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(5))
        assert out.details["directional_derivatives"].shape == (k,)
        # K = 1: one forward-mode pass, primal + W·dx; K > 1 on this Conv/ReLU/MaxPool chain: the
        # batched K-tangent pass, primal once + W·dx per tangent
        assert out.forward_passes == (2 if k == 1 else 1 + k)
        assert out.details.get("batched_tangents", False) == (k > 1)
