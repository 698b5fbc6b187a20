"""The one-pass evaluation of zeroth-order branches (estimators/_chain.py) against branch-by-branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bpfree import estimators
from bpfree.estimators import _chain
from conftest import flat_grad, make_problem, param_bits

CASES = [
    ("spsa", {"eps": 1e-4}),
    ("spsa", {"eps": 1e-4, "num_directions": 3}),
    ("spsa", {"eps": 1e-6, "scheme": "forward", "num_directions": 3}),
    ("spsa", {"eps": 1e-4, "rank": 2, "distribution": "gaussian"}),
    ("mezo", {"eps": 1e-4}),
    ("mezo", {"eps": 1e-4, "lr": 1e-2, "weight_decay": 0.1}),
]


def _step(name, options, prob, one_pass: bool, monkeypatch):
    """One estimate with the one-pass evaluation allowed or switched off; returns (estimate, grads, params)."""
    with monkeypatch.context() as m:
        if not one_pass:
            m.setattr(_chain, "sequential_chain", lambda model: None)
        out = estimators.make(name, **options).estimate(prob.model, prob.closure,
                                                        generator=torch.Generator().manual_seed(7))
    grads = [p.grad.clone() if p.grad is not None else None for p in prob.model.parameters()]
    return out, grads, [p.detach().clone() for p in prob.model.parameters()]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_one_pass_equals_branch_by_branch(name, options, monkeypatch):
    """Same directions, same losses, same step: the shared prefix and folded batch change only rounding."""
    seq, one = make_problem("mlp"), make_problem("mlp")
    ref, ref_grads, ref_params = _step(name, options, seq, one_pass=False, monkeypatch=monkeypatch)
    out, grads, params = _step(name, options, one, one_pass=True, monkeypatch=monkeypatch)
    assert out.details["one_pass"] and not ref.details["one_pass"]
    torch.testing.assert_close(out.details["directional_derivatives"], ref.details["directional_derivatives"],
                               rtol=1e-6, atol=1e-9)
    assert out.loss == pytest.approx(ref.loss, rel=1e-12)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
    for p, r in zip(params, ref_params):  # update mode moved them, by the same step
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_mezo_one_pass_never_writes_the_parameters():
    prob = make_problem("mlp", dtype=torch.float32)
    before = param_bits(prob.model)
    out = estimators.make("mezo").estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert out.details["one_pass"] and out.details["restore_fixups"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, param_bits(prob.model)))


def _flatten_first():
    prob = make_problem("mlp")
    model = nn.Sequential(nn.Flatten(), *prob.model).double()
    x = prob.x.reshape(16, 3, 4)
    return model, lambda: F.cross_entropy(model(x), prob.y)


def _hooked():
    prob = make_problem("mlp")
    prob.model[2].register_forward_hook(lambda mod, args, out: out * 1.0)
    return prob.model, prob.closure


def test_one_pass_is_taken_exactly_where_it_stands_in_for_the_closure():
    prob = make_problem("mlp")
    model, x, y = prob.model, prob.x, prob.y
    ln = make_problem("layernorm")

    def uses(model, closure, **options):
        est = estimators.make("spsa", **options)
        out = est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
        assert "forward" not in model.__dict__  # the patch is always removed
        return out.details["one_pass"]

    assert uses(model, prob.closure)
    assert uses(*_flatten_first())
    assert uses(model, prob.closure, num_directions=20)  # several groups of MAX_BRANCHES
    # the loss also uses a parameter directly: it must see the perturbation
    assert not uses(model, lambda: prob.closure() + 1e-3 * model[0].bias.square().sum())
    assert not uses(model, lambda: F.cross_entropy(model(x) + model(x), y))  # the model twice per loss
    assert not uses(model, lambda: F.cross_entropy(model(x.clone()), y))  # a new input every call
    assert not uses(model, prob.closure, rank="full")  # dense weight directions: per-branch weights
    assert not uses(ln.model, ln.closure)  # LayerNorm's parameters are not a chain layer's
    assert not uses(*_hooked())  # a forward hook on a layer must run


def test_groups_of_branches_give_the_same_losses():
    prob = make_problem("mlp")
    chain = _chain.sequential_chain(prob.model)
    g = torch.Generator().manual_seed(0)
    layers = [m for m in chain if isinstance(m, nn.Linear)]
    k = 5
    branches = _chain.Branches(
        weight_factors={m: (torch.randn(k, m.out_features, 1, generator=g, dtype=torch.float64),
                            torch.randn(k, m.in_features, 1, generator=g, dtype=torch.float64)) for m in layers},
        bias_directions={m: torch.randn(k, m.out_features, generator=g, dtype=torch.float64) for m in layers},
        scales=[1e-3] * k + [-1e-3] * k + [0.0], direction=[*range(k), *range(k), 0])
    together = _chain.chain_losses(prob.model, chain, prob.closure, branches, max_branches=11)
    for max_branches, share in [(3, "always"), (1, "never"), (4, "if_small"), (2, "never")]:
        grouped = _chain.chain_losses(prob.model, chain, prob.closure, branches, max_branches=max_branches,
                                      share_prefix=share)
        torch.testing.assert_close(together, grouped, rtol=1e-13, atol=0)
    # every branch is the closure at θ + s·v, computed with the materialised direction
    for j in (0, k + 2, 2 * k):
        dk, s = branches.direction[j], branches.scales[j]
        with torch.no_grad():
            saved = [p.clone() for p in prob.model.parameters()]
            for m in layers:
                a, b = branches.weight_factors[m]
                m.weight += s * a[dk] @ b[dk].T
                m.bias += s * branches.bias_directions[m][dk]
            expected = prob.closure()
            for p, v in zip(prob.model.parameters(), saved):
                p.copy_(v)
        assert float(together[j]) == pytest.approx(float(expected), rel=1e-12)
    assert float(together[-1]) == pytest.approx(prob.closure().item(), rel=1e-14)


def _mnist_mlp(width: int, batch: int):
    """``(model, closure)``: a 784-width-width-10 ReLU MLP (seed 0) and its cross-entropy on a
    random MNIST-shaped batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    x, y = torch.randn(batch, 1, 28, 28), torch.arange(batch) % 10
    return model, lambda: F.cross_entropy(model(x), y)


def test_one_pass_shares_the_first_layer():
    """Central SPSA's two losses cost 2F − (first layer's W x) in FLOPs, not 2F."""
    model, closure = _mnist_mlp(width=256, batch=32)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    forward = flops(closure)
    first = 2 * 32 * 784 * 256
    est = estimators.make("spsa")
    step = flops(lambda: est.estimate(model, closure, generator=torch.Generator().manual_seed(0)))
    assert step < 2 * forward - 0.9 * first  # the rank-1 terms add O(batch·(m + n)) per layer and branch
    assert step > 2 * forward - first  # every other matmul is still counted


def test_mezo_update_mode_holds_no_more_than_inference():
    """MeZO's memory path: branches one at a time from the input, terms added in place."""
    from bpfree.measure.memory import measure_step_memory

    model, closure = _mnist_mlp(width=512, batch=64)
    with torch.no_grad():
        inference = measure_step_memory(closure, model=model)
    est, g = estimators.make("mezo", lr=1e-4), torch.Generator().manual_seed(0)
    assert est.estimate(model, closure, generator=g).details["one_pass"]
    step = measure_step_memory(lambda: est.estimate(model, closure, generator=g), model=model)
    assert step.peak_bytes <= 1.02 * inference.peak_bytes
    assert all(p.grad is None for p in model.parameters())
